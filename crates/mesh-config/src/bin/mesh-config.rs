//! `mesh-config check DIR` / `mesh-config dump DIR`.
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mesh-config",
    about = "Validate or dump the strait mesh configuration"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate every YAML under DIR; print all errors; exit 1 if any.
    Check { dir: PathBuf },
    /// Print the compiled snapshot of DIR as JSON.
    Dump { dir: PathBuf },
}

fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    let ok = match cli.cmd {
        Cmd::Check { dir } => mesh_config::cli::check(&dir, &mut stdout)?,
        Cmd::Dump { dir } => mesh_config::cli::dump(&dir, &mut stdout)?,
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
