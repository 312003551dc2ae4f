//! Command line: `ztunnel [run flags]`, `ztunnel check DIR`, `ztunnel dump DIR`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use telemetry::LogFormat;

use crate::proxy::Settings;

/// The node proxy of the ambient mesh: captures the node's pods and carries their traffic over
/// HBONE.
#[derive(Debug, Parser)]
#[command(name = "ztunnel", version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Offline helpers on a configuration directory.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration directory: prints every error, exits 1 if there is one.
    Check { dir: PathBuf },
    /// Print the compiled snapshot of a configuration directory as JSON.
    Dump { dir: PathBuf },
}

/// Flags of the proxy itself.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// This node's name: pods whose spec.nodeName equals it are served.
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// Mesh configuration directory, watched for changes. Default: the embedded default mesh.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Where the mesh configuration comes from: `dir` (--config-dir or the embedded default)
    /// or `kube` (the Kubernetes API: in-cluster config or KUBECONFIG).
    #[arg(long, env = "STRAIT_CONFIG_SOURCE", default_value = "dir")]
    pub config_source: kube_source::ConfigSource,
    /// The host's /proc, where pods' network namespaces are found with `--config-source kube`
    /// (needs hostPID and CAP_SYS_PTRACE).
    #[arg(long, default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Directory with the mesh CA (ca-cert.pem, ca-key.pem; root-cert.pem is used as the trust
    /// bundle when present). Default: a throw-away CA, which only suits a single node.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Resolver for names the mesh does not know (ADDR:PORT, repeatable). Default: the
    /// nameservers of this node's /etc/resolv.conf.
    #[arg(long)]
    pub dns_upstream: Vec<SocketAddr>,
    /// Admin listener (/config_dump).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Metrics listener (/metrics, /stats/prometheus).
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub metrics: SocketAddr,
    /// Readiness listener (/healthz/ready).
    #[arg(long, default_value = "127.0.0.1:15021")]
    pub readiness: SocketAddr,
    /// Diagnostic log format on stderr: plain or json. Connection logs are always JSON lines
    /// on stdout.
    #[arg(long, default_value = "plain")]
    pub log_format: LogFormat,
    /// Diagnostic log filter (RUST_LOG syntax).
    #[arg(
        long,
        env = "RUST_LOG",
        default_value = "info,hickory_server=warn,hickory_proto=warn"
    )]
    pub log_level: String,
    /// On SIGTERM, how long live connections may go on after listeners closed.
    #[arg(long, default_value_t = 10)]
    pub drain_seconds: u64,
    /// Runtime worker threads (Istio's ZTUNNEL_WORKER_THREADS, default 2). With 1 everything
    /// runs on one single-threaded runtime: no cross-thread wake-ups between a connection's
    /// relay task and its HTTP/2 connection task.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
    /// Lifetime of the workload certificates (renewed at half-life).
    #[arg(long, default_value_t = 24 * 3600)]
    pub cert_ttl_seconds: u64,
    /// Where ztunnel records the namespaces it installed capture rules in (`<node>.json`), so
    /// that pods removed while it was down are cleaned at the next start.
    #[arg(long, default_value = crate::state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

impl RunArgs {
    /// The proxy's settings; fails on flags that are required to run.
    pub fn settings(&self) -> Result<Settings, String> {
        let node = self
            .node
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or("--node (or NODE_NAME) is required")?;
        Ok(Settings {
            node,
            config_dir: self.config_dir.clone(),
            ca_dir: self.ca_dir.clone(),
            dns_upstreams: self.dns_upstream.clone(),
            admin_addr: self.admin,
            metrics_addr: self.metrics,
            readiness_addr: self.readiness,
            drain: Duration::from_secs(self.drain_seconds),
            cert_ttl: Duration::from_secs(self.cert_ttl_seconds),
            state_dir: self.state_dir.clone(),
            config_source: self.config_source,
            proc_root: self.proc_root.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_flags() {
        let args = Args::try_parse_from([
            "ztunnel",
            "--node",
            "node-1",
            "--dns-upstream",
            "10.0.0.53:53",
            "--admin",
            "127.0.0.1:25000",
            "--drain-seconds",
            "3",
        ])
        .expect("parses");
        assert!(args.command.is_none());
        let s = args.run.settings().expect("settings");
        assert_eq!(s.node, "node-1");
        assert_eq!(s.dns_upstreams, vec!["10.0.0.53:53".parse().expect("addr")]);
        assert_eq!(s.admin_addr, "127.0.0.1:25000".parse().expect("addr"));
        assert_eq!(s.metrics_addr, "127.0.0.1:15020".parse().expect("addr"));
        assert_eq!(s.drain, Duration::from_secs(3));
        assert_eq!(s.state_dir, PathBuf::from("/run/strait/ztunnel"));
    }

    #[test]
    fn subcommands_and_missing_node() {
        let args = Args::try_parse_from(["ztunnel", "check", "/tmp/x"]).expect("parses");
        assert!(matches!(args.command, Some(Command::Check { .. })));
        let err = Args::try_parse_from(["ztunnel"])
            .expect("parses")
            .run
            .settings()
            .expect_err("no node");
        assert!(err.contains("--node"), "{err}");
        assert!(Args::try_parse_from(["ztunnel", "--log-format", "xml"]).is_err());
    }
}
