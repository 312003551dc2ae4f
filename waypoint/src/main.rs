//! `waypoint`: the egress waypoint binary. Flags only; everything else is the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use telemetry::LogFormat;
use waypoint::options::{DEFAULT_SERVER_HEADER, Options, parse_gateway};

#[derive(Parser)]
#[command(
    name = "waypoint",
    version,
    about = "Egress waypoint: HBONE in, Istio policy and routing, TLS origination"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration directory (exit 1 on errors).
    Check { dir: PathBuf },
    /// Print the compiled snapshot of a configuration directory as JSON.
    Dump { dir: PathBuf },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Configuration directory, hot-reloaded (default: the embedded default configuration).
    #[arg(long, env = "WAYPOINT_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Where the configuration comes from: `dir` (--config-dir or the embedded default) or
    /// `kube` (the Kubernetes API: in-cluster config or KUBECONFIG).
    #[arg(long, env = "STRAIT_CONFIG_SOURCE", default_value = "dir")]
    config_source: kube_source::ConfigSource,
    /// Which waypoint Gateway this is.
    #[arg(long, default_value = "istio-egress/waypoint", value_parser = parse_gateway)]
    gateway: mesh_config::NamespacedName,
    /// Directory with ca-cert.pem and ca-key.pem: the waypoint mints its own certificate.
    #[arg(long, env = "WAYPOINT_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// HBONE listener.
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    /// Admin listener (readiness, metrics, config dump); "off" disables it.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: String,
    /// Metrics-only listener (Istio's 15020), e.g. 0.0.0.0:15020.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Readiness-only listener (Istio's 15021), e.g. 0.0.0.0:15021.
    #[arg(long)]
    readiness: Option<SocketAddr>,
    /// Nameserver for upstream names (default: /etc/resolv.conf).
    #[arg(long)]
    dns_server: Option<SocketAddr>,
    /// `server` response header; an empty value keeps the upstream's.
    #[arg(long, default_value = DEFAULT_SERVER_HEADER)]
    server_header: String,
    /// Diagnostic log format on stderr (access logs are JSON on stdout).
    #[arg(long, default_value = "plain")]
    log_format: LogFormat,
    /// Diagnostic log filter (RUST_LOG syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
    /// After SIGTERM, how long in-flight requests may take (seconds).
    #[arg(long, default_value_t = 20)]
    drain_seconds: u64,
    /// Largest request body buffered so a request can be retried or mirrored (bytes); larger
    /// bodies stream and are neither retried nor mirrored (Envoy's per-request buffer limit).
    #[arg(long, default_value_t = waypoint::options::DEFAULT_MAX_BUFFERED_BODY)]
    max_request_buffer_bytes: usize,
    /// How far (bytes) a mirror copy of a larger, streamed body may fall behind the original
    /// before the copy is abandoned (the original never waits for it); default: the buffer limit.
    #[arg(long)]
    mirror_max_lag_bytes: Option<usize>,
    /// HBONE worker threads (Envoy's `--concurrency`), each with its own listener (SO_REUSEPORT),
    /// single-threaded runtime and upstream pools; default: one per core.
    #[arg(long, env = "WAYPOINT_CONCURRENCY")]
    concurrency: Option<usize>,
}

/// mimalloc: per request the waypoint allocates and frees dozens of small objects (headers,
/// bodies' `Bytes`, futures) across its tasks. Against glibc's malloc in A/B runs of
/// `scripts/bench-waypoint` (`WAYPOINT_ALT`, three runs, both orders) it cut CPU per request
/// 10-13 % and p99 2-9 %, and raised req/s 8 %, for 2.6 MiB more RSS. ztunnel keeps glibc: its
/// memory targets are met with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // glibc's malloc still serves C code (aws-lc).
    hbone::alloc::tune_glibc_malloc();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Check { dir }) => {
            mesh_config::cli::check(&dir, &mut std::io::stdout()).map_err(anyhow::Error::from)
        }
        Some(Command::Dump { dir }) => {
            mesh_config::cli::dump(&dir, &mut std::io::stdout()).map_err(anyhow::Error::from)
        }
        None => run(cli.run).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        // `waypoint dump DIR | head`: the reader left, nothing to report.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("waypoint: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    let json_pipe = |err: &(dyn std::error::Error + 'static)| {
        err.downcast_ref::<serde_json::Error>()
            .is_some_and(|j| j.io_error_kind() == Some(BrokenPipe))
    };
    e.chain().any(|cause| {
        json_pipe(cause)
            || cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
                io.kind() == BrokenPipe || io.get_ref().is_some_and(|inner| json_pipe(inner))
            })
    })
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init_tracing(args.log_format, &args.log_level)?;
    let ca_dir = args
        .ca_dir
        .context("--ca-dir is required (a directory with ca-cert.pem and ca-key.pem)")?;
    let mut opts = Options::new(ca_dir);
    opts.config_dir = args.config_dir;
    opts.config_source = args.config_source;
    opts.gateway = args.gateway;
    opts.listen = args.listen;
    opts.admin = match args.admin.as_str() {
        "off" | "none" | "" => None,
        a => Some(a.parse().with_context(|| format!("--admin {a:?}"))?),
    };
    opts.metrics = args.metrics;
    opts.readiness = args.readiness;
    opts.dns_server = args.dns_server;
    opts.server_header = Some(args.server_header);
    opts.drain_timeout = Duration::from_secs(args.drain_seconds);
    opts.max_buffered_body = args.max_request_buffer_bytes;
    opts.mirror_max_lag = args.mirror_max_lag_bytes;
    opts.workers = match args.concurrency {
        Some(0) => anyhow::bail!("--concurrency must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // The main thread is worker 0 (and runs admin, config reloads and the Kubernetes watches);
    // the others start their own runtimes (see `Options::workers`).
    let runtime = waypoint::worker_runtime().context("starting the tokio runtime")?;
    runtime.block_on(waypoint::run(opts, shutdown_signal()))?;
    Ok(())
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
