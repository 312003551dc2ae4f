//! Upstream name resolution: hickory-resolver against a configured nameserver (or
//! `/etc/resolv.conf`), answers cached for their TTL, round-robin across answers.
//!
//! The waypoint resolves *real* addresses: answers that are mesh VIPs (the DNS proxy's
//! auto-allocated 240.240.0.0/16 and 2001:2::/48, or any VIP in the snapshot) are dropped, since
//! connecting to one would loop back into the mesh.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Answers are kept at least this long: a TTL of 0 (dnsmasq's default for local names) would
/// otherwise mean one query per request. Envoy's floor (dns_min_refresh_rate) is 5 s; ours is
/// shorter so that DNS changes are seen quickly.
pub const MIN_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum DnsError {
    #[error("DNS lookup of {name} failed: {reason}")]
    Lookup { name: String, reason: String },
    #[error("DNS lookup of {name} returned no usable address (mesh VIPs are ignored: {ignored:?})")]
    NoAddress { name: String, ignored: Vec<IpAddr> },
    #[error("resolver setup: {0}")]
    Setup(String),
}

struct Entry {
    addrs: Arc<[IpAddr]>,
    valid_until: Instant,
}

/// Resolves upstream host names.
pub struct DnsResolver {
    inner: TokioResolver,
    cache: Mutex<HashMap<String, Entry>>,
    /// Round-robin position per name; survives cache refreshes.
    next: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResolver").finish_non_exhaustive()
    }
}

/// The DNS proxy's VIP ranges (Istio's auto-allocation).
fn auto_vip_ranges() -> [IpNet; 2] {
    [
        IpNet::V4(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(240, 240, 0, 0), 16).expect("valid prefix"),
        ),
        IpNet::V6(
            ipnet::Ipv6Net::new(std::net::Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0), 48)
                .expect("valid prefix"),
        ),
    ]
}

/// Whether `ip` must never be used as an upstream address (pure).
pub fn is_mesh_vip(ip: IpAddr, snapshot_vip: impl Fn(IpAddr) -> bool) -> bool {
    auto_vip_ranges().iter().any(|n| n.contains(&ip)) || snapshot_vip(ip)
}

impl DnsResolver {
    /// `server`: one nameserver (UDP, then TCP on truncation); `None` reads `/etc/resolv.conf`.
    pub fn new(server: Option<SocketAddr>) -> Result<Self, DnsError> {
        let mut opts = ResolverOpts::default();
        // Our own cache honours TTLs; hickory's would just add a second layer.
        opts.cache_size = 0;
        // Names are resolved as given (FQDN), never expanded with search domains.
        opts.ndots = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        let inner = match server {
            Some(addr) => {
                let conn = |mut c: ConnectionConfig| {
                    c.port = addr.port();
                    c
                };
                let ns = NameServerConfig::new(
                    addr.ip(),
                    true,
                    vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
                );
                let config = ResolverConfig::from_parts(None, vec![], vec![ns]);
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
                    .with_options(opts)
                    .build()
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| DnsError::Setup(e.to_string()))?
                .with_options(opts)
                .build(),
        }
        .map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(DnsResolver {
            inner,
            cache: Mutex::new(HashMap::new()),
            next: Mutex::new(HashMap::new()),
        })
    }

    /// All usable addresses of `name` (cached for the answer's TTL, at least [`MIN_TTL`]).
    /// `snapshot_vip` tells which addresses are mesh VIPs (dropped).
    pub async fn lookup(
        &self,
        name: &str,
        snapshot_vip: impl Fn(IpAddr) -> bool,
    ) -> Result<Arc<[IpAddr]>, DnsError> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(Arc::from([ip]));
        }
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = cache.get(&key)
                && e.valid_until > Instant::now()
            {
                return Ok(e.addrs.clone());
            }
        }
        let fqdn = format!("{key}.");
        // Boxed: the resolver's future is large and this is the cache-miss path; unboxed it
        // would grow every request's future (and each move of it) by a kilobyte.
        let answer = Box::pin(self.inner.lookup_ip(fqdn.as_str()))
            .await
            .map_err(|e| DnsError::Lookup {
                name: key.clone(),
                reason: e.to_string(),
            })?;
        let valid_until = Instant::from_std(answer.valid_until()).max(Instant::now() + MIN_TTL);
        let (good, ignored): (Vec<IpAddr>, Vec<IpAddr>) = answer
            .iter()
            .partition(|ip| !is_mesh_vip(*ip, &snapshot_vip));
        if !ignored.is_empty() {
            warn!(name = %key, ?ignored, "DNS answered with mesh VIPs; ignoring them (is the waypoint's DNS captured?)");
        }
        if good.is_empty() {
            return Err(DnsError::NoAddress { name: key, ignored });
        }
        debug!(name = %key, addrs = ?good, ttl = ?valid_until.saturating_duration_since(Instant::now()), "resolved");
        let addrs: Arc<[IpAddr]> = Arc::from(good);
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                key,
                Entry {
                    addrs: addrs.clone(),
                    valid_until,
                },
            );
        Ok(addrs)
    }

    /// The next address of `name`, round-robin across its answers.
    pub async fn pick(
        &self,
        name: &str,
        snapshot_vip: impl Fn(IpAddr) -> bool,
    ) -> Result<IpAddr, DnsError> {
        let addrs = self.lookup(name, snapshot_vip).await?;
        let counter = self
            .next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_ascii_lowercase())
            .or_default()
            .clone();
        let i = counter.fetch_add(1, Ordering::Relaxed);
        Ok(addrs[i % addrs.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_vips_are_never_upstreams() {
        let snapshot_vips: [IpAddr; 1] = ["10.96.0.20".parse().expect("ip")];
        let known = |ip: IpAddr| snapshot_vips.contains(&ip);
        let cases = [
            ("240.240.0.7", true),
            ("240.241.0.7", false),
            ("2001:2::7", true),
            ("10.96.0.20", true),
            ("203.0.113.10", false),
        ];
        for (ip, want) in cases {
            assert_eq!(is_mesh_vip(ip.parse().expect("ip"), known), want, "{ip}");
        }
    }

    #[tokio::test]
    async fn ip_literals_skip_dns() {
        // A nameserver nobody answers on: an IP literal must not need it.
        let r = DnsResolver::new(Some("127.0.0.1:9".parse().expect("addr"))).expect("resolver");
        let got = r.lookup("203.0.113.10", |_| false).await.expect("literal");
        assert_eq!(&got[..], &["203.0.113.10".parse::<IpAddr>().expect("ip")]);
    }
}
