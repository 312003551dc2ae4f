//! `ztunnel`: flag parsing and logging setup; everything else is in the library.

use std::process::ExitCode;

use clap::Parser;
use ztunnel::{Args, Command};

fn main() -> ExitCode {
    hbone::alloc::tune_glibc_malloc();
    let args = Args::parse();
    match args.command {
        Some(Command::Check { dir }) => {
            offline(mesh_config::cli::check(&dir, &mut std::io::stdout()))
        }
        Some(Command::Dump { dir }) => {
            offline(mesh_config::cli::dump(&dir, &mut std::io::stdout()))
        }
        None => match serve(args.run) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ztunnel: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn offline(result: std::io::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("ztunnel: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(run: ztunnel::RunArgs) -> anyhow::Result<()> {
    let settings = run.settings().map_err(anyhow::Error::msg)?;
    telemetry::init_tracing(run.log_format, &run.log_level)?;
    let runtime = match run.worker_threads {
        0 => anyhow::bail!("--worker-threads must be at least 1"),
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    runtime.block_on(ztunnel::run(settings))?;
    Ok(())
}
