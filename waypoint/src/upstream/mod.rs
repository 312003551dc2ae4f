//! Upstream side: clusters (what a destination host/port/subset means in the snapshot),
//! endpoint selection (DNS or STATIC, round-robin), connection pools, TLS origination, and
//! HBONE to endpoints that are workloads of the mesh ([`mesh`]).

pub mod endpoints;
pub mod lb;
pub mod mesh;
pub mod outlier;
pub mod pool;
pub mod resolver;
pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mesh_config::{NamespacedName, Protocol, Service, ServicePort, Snapshot};
use telemetry::ResponseFlag;

pub use endpoints::{EndpointSpec, endpoints_for};
pub use mesh::{HboneTarget, MeshClient, MeshError};
pub use pool::{HttpVersion, Lease, PoolKey, PoolLimits, PooledBody, Pools};
pub use resolver::{DnsError, DnsResolver};
pub use tls::{Credential, TlsError, TlsSpec};

/// Maps looked up per request, keyed from the configuration: foldhash, not SipHash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Why no upstream connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no healthy upstream: {0}")]
    NoHealthyUpstream(String),
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("TLS to {addr}: {error}")]
    Tls { addr: SocketAddr, error: TlsError },
    #[error("connection pool of {addr} overflowed")]
    Overflow { addr: SocketAddr },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// The HBONE tunnel to a mesh endpoint failed (connect, mTLS, identity, CONNECT refused).
    #[error("HBONE to {addr} via {peer}: {error}")]
    Hbone {
        addr: SocketAddr,
        peer: SocketAddr,
        error: hbone::Error,
    },
    /// A mesh endpoint that cannot be tunnelled to (no identity to expect).
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// A mesh endpoint, but this waypoint has no HBONE client (only in tests and tools).
    #[error("{addr} is a mesh endpoint and no HBONE client is configured")]
    NoMeshClient { addr: SocketAddr },
}

impl UpstreamError {
    /// The Envoy response flag for this failure.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            UpstreamError::NoHealthyUpstream(_) => ResponseFlag::NoHealthyUpstream,
            UpstreamError::Overflow { .. } => ResponseFlag::UpstreamOverflow,
            _ => ResponseFlag::UpstreamConnectionFailure,
        }
    }

    /// Counts as `connect-failure` for retries.
    pub fn is_connect_failure(&self) -> bool {
        !matches!(self, UpstreamError::Overflow { .. })
    }

    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub fn transport_failure_reason(&self) -> Option<String> {
        match self {
            UpstreamError::Tls { error, .. } => Some(error.transport_failure_reason()),
            UpstreamError::Connect { source, .. } => Some(format!(
                "delayed connect error: {}",
                source
                    .raw_os_error()
                    .map_or_else(|| source.to_string(), |c| c.to_string())
            )),
            UpstreamError::ConnectTimeout { .. } => Some("connect timeout".into()),
            UpstreamError::Hbone { error, peer, .. } => Some(hbone_failure_reason(error, *peer)),
            UpstreamError::Mesh(e) => Some(format!("HBONE_error:|{e}")),
            UpstreamError::NoMeshClient { .. } => {
                Some("HBONE_error:|no HBONE client for a mesh endpoint".into())
            }
            _ => None,
        }
    }

    /// The address the failure happened on, when there was one.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            UpstreamError::NoHealthyUpstream(_) => None,
            UpstreamError::Connect { addr, .. }
            | UpstreamError::ConnectTimeout { addr, .. }
            | UpstreamError::Tls { addr, .. }
            | UpstreamError::Overflow { addr }
            | UpstreamError::Handshake { addr, .. }
            | UpstreamError::Hbone { addr, .. }
            | UpstreamError::NoMeshClient { addr }
            | UpstreamError::Mesh(MeshError::NoIdentity { addr }) => Some(*addr),
        }
    }

    /// Envoy's local-reply body.
    pub fn local_reply_body(&self) -> String {
        match self {
            UpstreamError::NoHealthyUpstream(_) => "no healthy upstream".into(),
            UpstreamError::Overflow { .. } => {
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
                    .into()
            }
            other => format!(
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure{}",
                other
                    .transport_failure_reason()
                    .map(|r| format!(", transport failure reason: {r}"))
                    .unwrap_or_default()
            ),
        }
    }
}

/// `%UPSTREAM_TRANSPORT_FAILURE_REASON%` for a failed tunnel: TLS failures in Envoy's
/// `TLS_error:|…:TLS_error_end` shape (a wrong peer identity is `CERTIFICATE_VERIFY_FAILED`),
/// the rest prefixed `HBONE_error:|` and naming the pod's ztunnel.
fn hbone_failure_reason(error: &hbone::Error, peer: SocketAddr) -> String {
    match error {
        hbone::Error::Tls { source, .. } => tls::failure_reason(source),
        hbone::Error::Connect { source, .. } => format!(
            "HBONE_error:|delayed connect error to {peer}: {}",
            source
                .raw_os_error()
                .map_or_else(|| source.to_string(), |c| c.to_string())
        ),
        hbone::Error::Status {
            status, authority, ..
        } => format!(
            "HBONE_error:|CONNECT {authority} via {peer} answered {}",
            status.as_u16()
        ),
        other => format!("HBONE_error:|{other}"),
    }
}

/// Where traffic for one (service, port, subset) goes and how.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `inbound-vip|80|http|aliyun.com;` or `outbound|80|v1|aliyun.com`. Shared: every request's
    /// log line names it.
    pub name: Arc<str>,
    /// The destination host: the service host name (the request's host for wildcard entries).
    pub host: String,
    pub service: Arc<Service>,
    pub port: ServicePort,
    pub subset: Option<String>,
    pub endpoints: Vec<EndpointSpec>,
    pub version: HttpVersion,
    /// Shared with the pool keys: a key is made per request.
    pub tls: Option<Arc<TlsSpec>>,
    pub limits: PoolLimits,
    /// DestinationRule `outlierDetection`.
    pub outlier: Option<mesh_config::policy::OutlierDetection>,
    /// DestinationRule `loadBalancer` ([`lb`]); `None`: round-robin.
    pub lb: Option<mesh_config::policy::LoadBalancer>,
    /// DestinationRule `tls.mode: ISTIO_MUTUAL`: every endpoint is reached over HBONE, mesh
    /// workload or not ([`mesh::hbone_target`]).
    pub istio_mutual: bool,
}

/// Istio's cluster name. Services bound to this waypoint are its `inbound-vip` clusters (with
/// the trailing `;` of Envoy's stat-name form, as the seeds' logs show); anything else the
/// waypoint reaches (another host of a route, a subset) is an `outbound` cluster.
pub fn cluster_name(
    service: &Service,
    sp: &ServicePort,
    subset: Option<&str>,
    gateway: &NamespacedName,
) -> String {
    let bound_here = service
        .waypoint
        .waypoint()
        .is_some_and(|w| &w.name == gateway);
    if bound_here && subset.is_none() {
        format!("{};", service.inbound_vip_cluster(sp))
    } else {
        format!(
            "outbound|{}|{}|{}",
            sp.port,
            subset.unwrap_or(""),
            service.hostname
        )
    }
}

/// How a cluster's HTTP is spoken upstream: HTTP2 / gRPC ports (and `h2UpgradePolicy: UPGRADE`)
/// use HTTP/2, `useClientProtocol` follows the downstream, the rest HTTP/1.1.
///
/// `h2UpgradePolicy` leaves an HTTP/1.1 Upgrade (WebSocket) on HTTP/1.1: over HTTP/2 it would
/// need extended CONNECT, which the upstream, an HTTP/1.1 server by the port's protocol, need
/// not speak (Envoy, without `allow_connect`, breaks such requests; istio/istio#27078).
pub fn upstream_version(
    protocol: Protocol,
    pool: Option<&mesh_config::policy::ConnectionPool>,
    downstream: HttpVersion,
    upgrade: bool,
) -> HttpVersion {
    if pool.is_some_and(|p| p.use_client_protocol) {
        return downstream;
    }
    match protocol {
        Protocol::Http2 | Protocol::Grpc => HttpVersion::Http2,
        _ if pool.is_some_and(|p| p.h2_upgrade) && !upgrade => HttpVersion::Http2,
        _ => HttpVersion::Http1,
    }
}

/// What the cluster for a destination needs to know about the request.
#[derive(Debug, Clone, Copy)]
pub struct ClusterRequest<'a> {
    /// The CONNECT authority (original destination).
    pub original: Option<SocketAddr>,
    /// The request's host (for wildcard / NONE entries).
    pub request_host: Option<&'a str>,
    pub downstream: HttpVersion,
    /// An HTTP/1.1 Upgrade request (WebSocket): see [`upstream_version`].
    pub upgrade: bool,
}

/// Builds the cluster for `service` port `sp` (pure: snapshot in, description out).
pub fn build_cluster(
    snap: &Snapshot,
    gateway: &NamespacedName,
    service: &Arc<Service>,
    sp: &ServicePort,
    subset: Option<&str>,
    req: ClusterRequest<'_>,
) -> Cluster {
    let policy = snap.destination_policy(&service.hostname);
    let traffic = policy
        .map(|p| p.resolve(sp.port, subset))
        .unwrap_or_default();
    let version = upstream_version(
        sp.protocol,
        traffic.connection_pool,
        req.downstream,
        req.upgrade,
    );
    let host = if service.is_wildcard() {
        req.request_host
            .map(|h| endpoints::strip_port(h).to_owned())
            .unwrap_or_else(|| service.hostname.clone())
    } else {
        service.hostname.clone()
    };
    let alpn: &[&[u8]] = match version {
        // An opaque TCP stream wrapped in TLS: no application protocol to announce.
        _ if !sp.protocol.is_http() => &[],
        HttpVersion::Http2 => &[tls::ALPN_H2],
        HttpVersion::Http1 => &[tls::ALPN_HTTP11],
    };
    let subset_labels = subset
        .and_then(|s| policy.and_then(|p| p.subset(s)))
        .map(|s| &s.labels);
    Cluster {
        name: cluster_name(service, sp, subset, gateway).into(),
        endpoints: endpoints_for(service, sp, subset_labels, req.original, req.request_host),
        tls: traffic
            .tls
            .and_then(|t| {
                // credentialName: a Secret in this waypoint's namespace (Istio's rule for gateways).
                let credential = snap.tls_credential(&gateway.namespace, t).map(|r| {
                    r.map_err(|err| {
                        format!(
                            "DestinationRule {} {}: {err}",
                            policy.map(|p| p.rule.to_string()).unwrap_or_default(),
                            t.credential_path.as_deref().unwrap_or("credentialName")
                        )
                    })
                });
                TlsSpec::from_client_tls(t, &host, alpn, credential)
            })
            .map(Arc::new),
        limits: PoolLimits::from_settings(traffic.connection_pool, version),
        outlier: traffic.outlier_detection.cloned(),
        lb: traffic.load_balancer.cloned(),
        istio_mutual: traffic
            .tls
            .is_some_and(|t| t.mode == mesh_config::TlsMode::IstioMutual),
        host,
        service: service.clone(),
        port: sp.clone(),
        subset: subset.map(str::to_owned),
        version,
    }
}

/// Clusters built from the current snapshot, reused across requests. Only clusters that do not
/// depend on the request (no wildcard host, resolution other than NONE) are cached; the cache
/// empties whenever the snapshot changes.
#[derive(Default)]
pub struct ClusterCache {
    inner: Mutex<CacheInner>,
}

/// (service address within the cached snapshot, port, subset, downstream version, upgrade).
type ClusterKey = (usize, u16, Option<String>, HttpVersion, bool);

#[derive(Default)]
struct CacheInner {
    /// The snapshot the entries were built from. Holding it keeps its services alive, so the
    /// service addresses in the keys cannot be reused while the entries exist.
    snapshot: Option<Arc<Snapshot>>,
    clusters: FastMap<ClusterKey, Arc<Cluster>>,
}

impl std::fmt::Debug for ClusterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCache").finish_non_exhaustive()
    }
}

impl ClusterCache {
    /// [`build_cluster`], cached when the result does not depend on the request.
    pub fn get(
        &self,
        snap: &Arc<Snapshot>,
        gateway: &NamespacedName,
        service: &Arc<Service>,
        sp: &ServicePort,
        subset: Option<&str>,
        req: ClusterRequest<'_>,
    ) -> Arc<Cluster> {
        let cacheable =
            !service.is_wildcard() && service.resolution != mesh_config::snapshot::Resolution::None;
        if !cacheable {
            return Arc::new(build_cluster(snap, gateway, service, sp, subset, req));
        }
        let key = (
            Arc::as_ptr(service) as usize,
            sp.port,
            subset.map(str::to_owned),
            req.downstream,
            req.upgrade,
        );
        {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if !inner
                .snapshot
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s, snap))
            {
                inner.snapshot = Some(snap.clone());
                inner.clusters.clear();
            } else if let Some(c) = inner.clusters.get(&key) {
                return c.clone();
            }
        }
        let cluster = Arc::new(build_cluster(snap, gateway, service, sp, subset, req));
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner
            .snapshot
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, snap))
        {
            inner.clusters.insert(key, cluster.clone());
        }
        cluster
    }
}

/// Endpoint selection and connections.
pub struct Upstream {
    resolver: DnsResolver,
    pools: Pools,
    /// Clusters of the current snapshot.
    pub clusters: ClusterCache,
    /// Round-robin position per cluster name.
    next: Mutex<FastMap<String, Arc<AtomicUsize>>>,
    /// Outlier state per cluster name (clusters with `outlierDetection` only).
    outliers: Mutex<FastMap<String, outlier::Detector>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Upstream {
    /// Must be called inside a tokio runtime. `mesh` opens the tunnels to mesh endpoints;
    /// without it they fail with `UF` (never plaintext).
    pub fn new(dns_server: Option<SocketAddr>, mesh: Option<MeshClient>) -> Result<Self, DnsError> {
        Ok(Upstream {
            resolver: DnsResolver::new(dns_server)?,
            pools: Pools::with_mesh(mesh),
            clusters: ClusterCache::default(),
            next: Mutex::default(),
            outliers: Mutex::default(),
        })
    }

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// The next endpoint of `cluster`: by its `loadBalancer` ([`lb::choose`]; `hash` is
    /// [`lb::request_hash`] of the request) over its endpoints, round-robin over DNS answers
    /// within a name, skipping hosts that outlier detection ejected.
    pub async fn pick(
        &self,
        snap: &Snapshot,
        cluster: &Cluster,
        hash: Option<u64>,
    ) -> Result<SocketAddr, UpstreamError> {
        let Some(od) = &cluster.outlier else {
            return self.pick_any(snap, cluster, hash).await;
        };
        // Every endpoint once, a few more for names with several addresses.
        let tries = (cluster.endpoints.len() * 2).clamp(2, 16);
        for attempt in 0..tries {
            // A consistent-hash pick is the same every time: after an ejection, go on at random.
            let hash = if attempt == 0 { hash } else { None };
            let addr = self.pick_any(snap, cluster, hash).await?;
            let skip = self
                .outliers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&*cluster.name)
                .is_some_and(|d| {
                    d.skips(od, addr, cluster.endpoints.len(), std::time::Instant::now())
                });
            if !skip {
                return Ok(addr);
            }
        }
        Err(UpstreamError::NoHealthyUpstream(format!(
            "every endpoint of {} is ejected by outlier detection",
            cluster.name
        )))
    }

    /// Tells outlier detection how a try on `addr` went (no-op without `outlierDetection`).
    pub fn observe(&self, cluster: &Cluster, addr: SocketAddr, obs: outlier::Observation) {
        let Some(od) = &cluster.outlier else { return };
        let mut outliers = self.outliers.lock().unwrap_or_else(PoisonError::into_inner);
        let detector = match outliers.get_mut(&*cluster.name) {
            Some(d) => d,
            None => outliers.entry(cluster.name.to_string()).or_default(),
        };
        let ejected = detector.record(
            od,
            addr,
            obs,
            cluster.endpoints.len(),
            std::time::Instant::now(),
        );
        if ejected {
            tracing::info!(cluster = %cluster.name, %addr, "endpoint ejected by outlier detection");
        }
    }

    /// [`Upstream::pick`] without outlier detection.
    async fn pick_any(
        &self,
        snap: &Snapshot,
        cluster: &Cluster,
        hash: Option<u64>,
    ) -> Result<SocketAddr, UpstreamError> {
        if cluster.endpoints.is_empty() {
            return Err(UpstreamError::NoHealthyUpstream(format!(
                "{} has no endpoints",
                cluster.name
            )));
        }
        let round_robin = || {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            match next.get(&*cluster.name) {
                Some(c) => c.fetch_add(1, Ordering::Relaxed),
                None => next
                    .entry(cluster.name.to_string())
                    .or_default()
                    .fetch_add(1, Ordering::Relaxed),
            }
        };
        // Requests in flight on a STATIC endpoint; a DNS name's are not tracked (its answers
        // take turns in the resolver).
        let active = |i: usize| match &cluster.endpoints[i] {
            EndpointSpec::Addr(a) => self.in_flight(snap, cluster, *a),
            EndpointSpec::Name { .. } => 0,
        };
        let i = lb::choose(
            cluster.lb.as_ref(),
            cluster.endpoints.len(),
            round_robin,
            |n| fastrand::usize(..n),
            hash,
            active,
        );
        match &cluster.endpoints[i] {
            EndpointSpec::Addr(a) => Ok(*a),
            EndpointSpec::Name { host, port } => {
                let is_vip = |ip: IpAddr| !snap.services_by_vip(ip).is_empty();
                let ip = self
                    .resolver
                    .pick(host, is_vip)
                    .await
                    .map_err(|e| UpstreamError::NoHealthyUpstream(e.to_string()))?;
                Ok(SocketAddr::new(ip, *port))
            }
        }
    }

    /// A connection to `addr` for `cluster`'s HTTP: over HBONE when `addr` is a mesh endpoint
    /// ([`mesh::hbone_target`]), else TCP (with TLS when the cluster originates it).
    pub async fn checkout(
        &self,
        snap: &Snapshot,
        cluster: &Cluster,
        addr: SocketAddr,
    ) -> Result<Lease, UpstreamError> {
        let hbone = mesh::hbone_target(snap, cluster, addr)?;
        self.pools
            .checkout(&Self::pool_key(cluster, addr, hbone))
            .await
    }

    fn pool_key(cluster: &Cluster, addr: SocketAddr, hbone: Option<HboneTarget>) -> PoolKey {
        PoolKey {
            addr,
            tls: cluster.tls.clone(),
            hbone: hbone.map(Arc::new),
            version: cluster.version,
            limits: cluster.limits,
        }
    }

    /// Requests in flight (and waiting for a connection) to `addr` for `cluster`.
    fn in_flight(&self, snap: &Snapshot, cluster: &Cluster, addr: SocketAddr) -> usize {
        match mesh::hbone_target(snap, cluster, addr) {
            Ok(hbone) => self.pools.in_flight(&Self::pool_key(cluster, addr, hbone)),
            Err(_) => 0,
        }
    }

    /// An L4 connection for `cluster`: an HBONE tunnel to a mesh endpoint, else TCP; wrapped in
    /// TLS when the cluster originates it (DestinationRule `tls` on a TCP port) and `wrap_tls`
    /// (false when the client speaks TLS itself).
    pub async fn connect_l4(
        &self,
        snap: &Snapshot,
        cluster: &Cluster,
        addr: SocketAddr,
        wrap_tls: bool,
    ) -> Result<pool::Stream, UpstreamError> {
        let timeout = cluster.limits.connect_timeout;
        let spec = cluster.tls.as_ref().filter(|_| wrap_tls);
        if let Some(target) = mesh::hbone_target(snap, cluster, addr)? {
            let tunnel = self.pools.open_tunnel(&target, addr, timeout).await?;
            let Some(spec) = spec else {
                return Ok(pool::Stream::Hbone(Box::new(tunnel)));
            };
            let config = self
                .pools
                .tls()
                .config(spec)
                .map_err(|error| UpstreamError::Tls { addr, error })?;
            return match tokio::time::timeout(timeout, tls::handshake(config, &spec.sni, tunnel))
                .await
            {
                Ok(Ok(stream)) => Ok(pool::Stream::HboneTls(Box::new(stream))),
                Ok(Err(error)) => Err(UpstreamError::Tls { addr, error }),
                Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
            };
        }
        let Some(spec) = spec else {
            return Ok(pool::Stream::Plain(pool::connect_tcp(addr, timeout).await?));
        };
        let config = self
            .pools
            .tls()
            .config(spec)
            .map_err(|error| UpstreamError::Tls { addr, error })?;
        let tcp = pool::connect_tcp(addr, timeout).await?;
        match tokio::time::timeout(timeout, tls::handshake(config, &spec.sni, tcp)).await {
            Ok(Ok(stream)) => Ok(pool::Stream::Tls(Box::new(stream))),
            Ok(Err(error)) => Err(UpstreamError::Tls { addr, error }),
            Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
        }
    }

    /// A plain TCP connection (L4 forwarding).
    pub async fn connect_tcp(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<tokio::net::TcpStream, UpstreamError> {
        pool::connect_tcp(addr, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: istio-egress
  labels: {istio.io/use-waypoint: waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: istio-egress}
spec:
  gatewayClassName: istio-waypoint
  addresses: [{value: 10.244.1.20}]
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 443}
  - {number: 8080, name: h2, protocol: HTTP2}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: aliyun, namespace: istio-egress}
spec:
  host: aliyun.com
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 4}}
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: SIMPLE}
  subsets:
  - {name: v1, labels: {version: v1}}
"#;

    #[test]
    fn seed_000_cluster() {
        let snap = mesh_config::load_sources([("c.yaml", CONFIG)]).expect("valid config");
        let gw = NamespacedName::new("istio-egress", "waypoint");
        let svc = snap.service_by_host("aliyun.com").expect("service").clone();
        let req = ClusterRequest {
            original: None,
            request_host: Some("aliyun.com"),
            downstream: HttpVersion::Http1,
            upgrade: false,
        };
        let c = build_cluster(&snap, &gw, &svc, &svc.ports[0], None, req);
        assert_eq!(&*c.name, "inbound-vip|80|http|aliyun.com;");
        assert_eq!(
            c.endpoints,
            vec![EndpointSpec::Name {
                host: "aliyun.com".into(),
                port: 443
            }]
        );
        let tls = c.tls.expect("port-level SIMPLE");
        assert_eq!(tls.sni, "aliyun.com");
        assert_eq!(tls.alpn, vec![b"http/1.1".to_vec()]);
        assert_eq!(c.version, HttpVersion::Http1);
        assert_eq!(c.limits.max_requests, 4);

        // Another port: no TLS (port-level), HTTP/2, and a subset makes it an outbound cluster.
        let c = build_cluster(&snap, &gw, &svc, &svc.ports[1], Some("v1"), req);
        assert_eq!(&*c.name, "outbound|8080|v1|aliyun.com");
        assert!(c.tls.is_none());
        assert_eq!(c.version, HttpVersion::Http2);

        // Seen from another waypoint, the same service is an outbound cluster.
        let other = NamespacedName::new("istio-egress", "other");
        let c = build_cluster(&snap, &other, &svc, &svc.ports[0], None, req);
        assert_eq!(&*c.name, "outbound|80||aliyun.com");
    }

    #[test]
    fn credential_name_resolves_in_the_waypoint_namespace() {
        let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: aliyun, namespace: istio-egress}
spec:
  host: aliyun.com
  trafficPolicy:
    tls: {mode: MUTUAL, credentialName: aliyun-client, caCertificates: /ignored.pem}
"#;
        let secret = r#"
apiVersion: v1
kind: Secret
metadata: {name: aliyun-client, namespace: istio-egress}
stringData:
  cert: "-----BEGIN CERTIFICATE-----\nQ0VSVA==\n-----END CERTIFICATE-----\n"
  key: "-----BEGIN PRIVATE KEY-----\nS0VZ\n-----END PRIVATE KEY-----\n"
  cacert: "-----BEGIN CERTIFICATE-----\nQ0E=\n-----END CERTIFICATE-----\n"
"#;
        let se = CONFIG
            .split("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule")
            .next();
        let base = se.expect("config");
        let req = ClusterRequest {
            original: None,
            request_host: Some("aliyun.com"),
            downstream: HttpVersion::Http1,
            upgrade: false,
        };
        let gw = NamespacedName::new("istio-egress", "waypoint");
        let cluster = |sources: &[(&str, &str)]| {
            let snap = mesh_config::load_sources(sources.iter().copied()).expect("valid config");
            let svc = snap.service_by_host("aliyun.com").expect("service").clone();
            let c = build_cluster(&snap, &gw, &svc, &svc.ports[0], None, req);
            (*c.tls.expect("MUTUAL originates TLS")).clone()
        };
        // Missing Secret: the spec fails closed and says which rule, field and Secret.
        let spec = cluster(&[("a.yaml", base), ("dr.yaml", dr)]);
        let Some(Credential::Unavailable(why)) = &spec.credential else {
            panic!("{spec:?}");
        };
        assert_eq!(
            &**why,
            "DestinationRule istio-egress/aliyun spec.trafficPolicy.tls.credentialName: Secret istio-egress/aliyun-client not found"
        );
        // With the Secret: its material, and the file path is not used.
        let spec = cluster(&[("a.yaml", base), ("dr.yaml", dr), ("s.yaml", secret)]);
        let Some(Credential::Secret(c)) = &spec.credential else {
            panic!("{spec:?}");
        };
        assert!(c.client.is_some() && c.ca.is_some());
        assert_eq!(spec.ca_certificates, None);
        assert!(
            !format!("{spec:?}").contains("S0VZ"),
            "key material in Debug"
        );
    }

    #[test]
    fn versions() {
        use mesh_config::policy::ConnectionPool;
        let upgrade = ConnectionPool {
            h2_upgrade: true,
            ..Default::default()
        };
        let client = ConnectionPool {
            use_client_protocol: true,
            ..Default::default()
        };
        use HttpVersion::{Http1, Http2};
        // (port protocol, connection pool, downstream version, Upgrade request, upstream version)
        let cases = [
            (Protocol::Http, None, Http2, false, Http1),
            (Protocol::Http2, None, Http1, false, Http2),
            (Protocol::Grpc, None, Http1, false, Http2),
            (Protocol::Http, Some(&upgrade), Http1, false, Http2),
            // h2UpgradePolicy leaves WebSocket on HTTP/1.1; an HTTP2 port stays HTTP/2.
            (Protocol::Http, Some(&upgrade), Http1, true, Http1),
            (Protocol::Http2, Some(&upgrade), Http1, true, Http2),
            (Protocol::Http2, Some(&client), Http1, false, Http1),
        ];
        for (proto, pool, downstream, upgrade, want) in cases {
            assert_eq!(
                upstream_version(proto, pool, downstream, upgrade),
                want,
                "{proto:?} {pool:?} upgrade={upgrade}"
            );
        }
    }

    #[test]
    fn failure_shapes() {
        let addr: SocketAddr = "203.0.113.10:443".parse().expect("addr");
        let refused = UpstreamError::Connect {
            addr,
            source: io::Error::from_raw_os_error(111),
        };
        assert_eq!(refused.flag(), ResponseFlag::UpstreamConnectionFailure);
        assert!(refused.is_connect_failure());
        assert_eq!(
            refused.transport_failure_reason().as_deref(),
            Some("delayed connect error: 111")
        );
        let tls = UpstreamError::Tls {
            addr,
            error: TlsError::Handshake {
                reason: "TLS_error:|CERTIFICATE_VERIFY_FAILED:x:TLS_error_end".into(),
            },
        };
        assert!(tls.local_reply_body().contains("CERTIFICATE_VERIFY_FAILED"));
        let overflow = UpstreamError::Overflow { addr };
        assert_eq!(overflow.flag(), ResponseFlag::UpstreamOverflow);
        assert!(!overflow.is_connect_failure());
        assert_eq!(
            UpstreamError::NoHealthyUpstream("x".into()).flag(),
            ResponseFlag::NoHealthyUpstream
        );
    }
}
