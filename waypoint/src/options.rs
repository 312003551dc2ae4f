//! Runtime settings of a waypoint (what the command line sets).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_config::NamespacedName;

/// The `server` header Envoy-based waypoints send.
pub const DEFAULT_SERVER_HEADER: &str = "envoy";

/// Request bodies up to this size are buffered so they can be retried or mirrored (Envoy's
/// default per-connection buffer limit, which also bounds its retry buffer).
pub const DEFAULT_MAX_BUFFERED_BODY: usize = 1024 * 1024;

/// Everything [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Configuration directory (hot-reloaded); `None` = the embedded default configuration.
    pub config_dir: Option<PathBuf>,
    /// `Dir` (`config_dir` / embedded default) or `Kube` (the Kubernetes API server).
    pub config_source: kube_source::ConfigSource,
    /// Which waypoint Gateway this process is.
    pub gateway: NamespacedName,
    /// Holds `ca-cert.pem` + `ca-key.pem` (and optionally `root-cert.pem`): the waypoint mints its
    /// own workload certificate in-process.
    pub ca_dir: PathBuf,
    /// HBONE listener.
    pub listen: SocketAddr,
    /// Admin listener (Istio's 15000, localhost): `/healthz/ready`, `/metrics`,
    /// `/stats/prometheus`, `/config_dump`.
    pub admin: Option<SocketAddr>,
    /// Metrics-only listener (Istio's 15020).
    pub metrics: Option<SocketAddr>,
    /// Readiness-only listener (Istio's 15021).
    pub readiness: Option<SocketAddr>,
    /// Nameserver for upstream resolution; `None` = `/etc/resolv.conf`.
    pub dns_server: Option<SocketAddr>,
    /// Value of the `server` response header; `None` keeps the upstream's.
    pub server_header: Option<String>,
    /// Lifetime of the minted workload certificate (renewed at half life).
    pub cert_ttl: Duration,
    /// Largest request body buffered so the request can be retried or mirrored.
    pub max_buffered_body: usize,
    /// How far (bytes) a mirror copy of a streamed (unbuffered) body may fall behind the
    /// original before the copy is abandoned; `None` = `max_buffered_body`.
    pub mirror_max_lag: Option<usize>,
    /// After SIGTERM, how long in-flight requests get before connections are dropped.
    pub drain_timeout: Duration,
    /// Threads serving HBONE (Envoy's `--concurrency`). Each runs a single-threaded runtime with
    /// its own `SO_REUSEPORT` listener and upstream pools, so a request never crosses threads:
    /// cross-thread wake-ups cost the multi-threaded runtime about a third of its CPU per
    /// request (`scripts/bench-waypoint`). 1 = serve on the caller's runtime only.
    pub workers: usize,
}

impl Options {
    /// Defaults for everything but the CA directory.
    pub fn new(ca_dir: PathBuf) -> Self {
        Options {
            config_dir: None,
            config_source: kube_source::ConfigSource::Dir,
            gateway: NamespacedName::new("istio-egress", "waypoint"),
            ca_dir,
            listen: SocketAddr::from(([0, 0, 0, 0], hbone::HBONE_PORT)),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 15000))),
            metrics: None,
            readiness: None,
            dns_server: None,
            server_header: Some(DEFAULT_SERVER_HEADER.to_owned()),
            cert_ttl: Duration::from_secs(24 * 3600),
            max_buffered_body: DEFAULT_MAX_BUFFERED_BODY,
            mirror_max_lag: None,
            drain_timeout: Duration::from_secs(20),
            workers: 1,
        }
    }
}

/// Parses `namespace/name`.
pub fn parse_gateway(s: &str) -> Result<NamespacedName, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(NamespacedName::new(ns, name))
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_names() {
        let cases: [(&str, Option<(&str, &str)>); 6] = [
            ("istio-egress/waypoint", Some(("istio-egress", "waypoint"))),
            ("a/b", Some(("a", "b"))),
            ("waypoint", None),
            ("/waypoint", None),
            ("ns/", None),
            ("a/b/c", None),
        ];
        for (input, want) in cases {
            let got = parse_gateway(input).ok();
            let want = want.map(|(ns, n)| NamespacedName::new(ns, n));
            assert_eq!(got, want, "{input}");
        }
    }
}
