//! L4 flows: TCP / TLS / HTTPS ports of registered services (with L4 authorization and, for
//! TLS, the SNI read from the ClientHello), and ALLOW_ANY passthrough of unregistered ones.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hbone::Tunnel;
use mesh_config::authz::Decision;
use mesh_config::route::L4Info;
use mesh_config::{Service, ServicePort, Snapshot};
use telemetry::{AccessLogEntry, ResponseFlag, ResponseFlags};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::http::{Downstream, authz};
use crate::observe;
use crate::proxy::Proxy;
use crate::sniff::{self, Hello};
use crate::upstream::outlier::Observation;
use crate::upstream::{self, ClusterRequest, HttpVersion, PoolLimits};

/// How long a TLS client may take to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// L4 authorization of a flow to `service` (`sni` for TLS ports).
pub fn authorize(
    proxy: &Proxy,
    snap: &Snapshot,
    downstream: &Downstream,
    service: &Service,
    port: &ServicePort,
    sni: Option<&str>,
) -> Result<(), Decision> {
    let principal = downstream.peer_identity.to_string();
    let attrs = authz::attrs(snap, downstream, &principal, port.port, sni, None);
    let decision = authz::decide(snap, &proxy.gateway, Some(service), &attrs);
    if decision.is_allow() {
        Ok(())
    } else {
        Err(decision)
    }
}

fn entry(downstream: &Downstream, sni: Option<&str>) -> AccessLogEntry {
    let mut e = AccessLogEntry::new(SystemTime::now());
    e.downstream_local_address = Some(downstream.local);
    e.downstream_remote_address = Some(downstream.remote());
    e.requested_server_name = sni.map(|s| s.to_owned().into());
    e
}

/// Logs a flow refused by policy.
pub fn log_denied(
    proxy: &Proxy,
    downstream: &Downstream,
    service: &Service,
    port: &ServicePort,
    sni: Option<&str>,
    decision: &Decision,
) {
    let mut e = entry(downstream, sni);
    e.upstream_cluster = Some(upstream::cluster_name(service, port, None, &proxy.gateway).into());
    e.connection_termination_details = Some(authz::denial_details(decision).into());
    let snap = proxy.store.current();
    let labels = observe::connection_labels(
        observe::source_labels(&snap, downstream),
        Some(service),
        ResponseFlags::empty(),
    );
    proxy.metrics.connection(&labels).opened();
    observe::tcp_flow(
        &proxy.metrics,
        &proxy.access_log,
        e,
        Instant::now(),
        &labels,
        0,
        0,
        None,
    );
}

/// Logs an unregistered, non-HTTP flow closed under REGISTRY_ONLY.
pub fn log_unregistered(proxy: &Proxy, downstream: &Downstream) {
    let mut e = entry(downstream, None);
    e.upstream_cluster = Some("BlackHoleCluster".into());
    e.response_flags = ResponseFlags::single(ResponseFlag::NoRouteFound);
    e.connection_termination_details = Some("registry_only".into());
    let snap = proxy.store.current();
    let labels = observe::connection_labels(
        observe::source_labels(&snap, downstream),
        None,
        e.response_flags,
    );
    proxy.metrics.connection(&labels).opened();
    observe::tcp_flow(
        &proxy.metrics,
        &proxy.access_log,
        e,
        Instant::now(),
        &labels,
        0,
        0,
        None,
    );
}

/// Forwards a TCP / TLS flow to `service`.
pub async fn serve(
    proxy: Arc<Proxy>,
    downstream: Downstream,
    service: Arc<Service>,
    port: ServicePort,
    tls: bool,
    mut tunnel: Tunnel,
) {
    let start = Instant::now();
    let snap = proxy.store.current();
    let (sni, prefix) = if tls {
        match sniff::peek_client_hello(&mut tunnel, HELLO_TIMEOUT).await {
            Ok((Hello::Tls { sni }, prefix)) => (sni, prefix),
            Ok((Hello::NotTls, prefix)) => {
                debug!("TLS port without a ClientHello; forwarding as opaque TCP");
                (None, prefix)
            }
            Err(e) => {
                debug!(error = %e, "tunnel failed before the ClientHello");
                return;
            }
        }
    } else {
        (None, Bytes::new())
    };
    let mut e = entry(&downstream, sni.as_deref());
    let source = observe::source_labels(&snap, &downstream);
    if tls
        && let Err(decision) =
            authorize(&proxy, &snap, &downstream, &service, &port, sni.as_deref())
    {
        debug!(?decision, sni = ?sni, "TLS flow denied by policy");
        log_denied(
            &proxy,
            &downstream,
            &service,
            &port,
            sni.as_deref(),
            &decision,
        );
        let _ = tunnel.shutdown().await;
        return;
    }

    // TCP / TLS routes, else the service itself.
    let info = L4Info {
        destination_ip: Some(downstream.local.ip()),
        port: port.port,
        sni: sni.as_deref(),
        source_namespace: Some(downstream.peer_identity.namespace.as_str()),
        source_labels: observe::source_workload_labels(&snap, &downstream),
    };
    let routes = snap.routes_for_host(&service.hostname);
    let picked = routes
        .and_then(|r| {
            if tls {
                r.select_tls(&info)
            } else {
                r.select_tcp(&info)
            }
        })
        .and_then(|route| route.destinations.pick(fastrand::u64(..)))
        .map(|w| w.destination.clone());
    let (dest_service, dest_port, subset) = match &picked {
        Some(d) => {
            let svc = if d.host == service.hostname {
                Some(service.clone())
            } else {
                snap.service_by_host(&d.host).cloned()
            };
            let sp = svc
                .as_ref()
                .and_then(|s| s.port(d.port.unwrap_or(port.port)).cloned());
            match (svc, sp) {
                (Some(s), Some(p)) => (s, p, d.subset.clone()),
                _ => {
                    e.response_flags.insert(ResponseFlag::NoClusterFound);
                    e.upstream_cluster = Some(
                        format!("outbound|{}||{}", d.port.unwrap_or(port.port), d.host).into(),
                    );
                    finish(&proxy, e, start, source, Some(&service), None);
                    return;
                }
            }
        }
        None => (service.clone(), port.clone(), None),
    };
    let cluster = proxy.upstream.clusters.get(
        &snap,
        &proxy.gateway,
        &dest_service,
        &dest_port,
        subset.as_deref(),
        ClusterRequest {
            original: Some(downstream.local),
            request_host: sni.as_deref(),
            downstream: HttpVersion::Http1,
            upgrade: false,
        },
    );
    e.upstream_cluster = Some((&cluster.name).into());
    let hash = crate::upstream::lb::request_hash(
        cluster.lb.as_ref(),
        &http::HeaderMap::new(),
        None,
        Some(downstream.remote().ip()),
    );
    let addr = match proxy.upstream.pick(&snap, &cluster, hash).await {
        Ok(a) => a,
        Err(err) => {
            debug!(error = %err, "no upstream for TCP flow");
            e.response_flags.insert(err.flag());
            finish(&proxy, e, start, source, Some(&dest_service), None);
            return;
        }
    };
    e.upstream_host = Some(addr);
    // A client that speaks TLS itself (TLS / HTTPS ports) is never wrapped a second time.
    if tls && cluster.tls.is_some() {
        debug!("DestinationRule tls on a TLS port: the client's TLS is forwarded as is");
    } else if let Some(spec) = &cluster.tls {
        debug!(sni = %spec.sni, "originating TLS for a TCP flow");
    }
    // Mesh endpoints are reached over HBONE either way.
    let tcp = proxy.upstream.connect_l4(&snap, &cluster, addr, !tls).await;
    let observation = match &tcp {
        Ok(_) => Observation::LocalOriginSuccess,
        Err(_) => Observation::LocalOriginFailure,
    };
    proxy.upstream.observe(&cluster, addr, observation);
    let tcp = match tcp {
        Ok(t) => t,
        Err(err) => {
            debug!(error = %err, "upstream connect failed");
            e.response_flags.insert(err.flag());
            e.upstream_transport_failure_reason = err.transport_failure_reason().map(Into::into);
            finish(&proxy, e, start, source, Some(&dest_service), None);
            return;
        }
    };
    let (sent, received) = relay(
        &proxy,
        &mut e,
        tunnel,
        tcp,
        &prefix,
        source.clone(),
        &dest_service,
    )
    .await;
    finish(
        &proxy,
        e,
        start,
        source,
        Some(&dest_service),
        Some((sent, received)),
    );
}

/// ALLOW_ANY: an unregistered destination is reached directly at its address.
pub async fn passthrough(proxy: Arc<Proxy>, downstream: Downstream, tunnel: Tunnel) {
    let start = Instant::now();
    let snap = proxy.store.current();
    let source = observe::source_labels(&snap, &downstream);
    let mut e = entry(&downstream, None);
    e.upstream_cluster = Some("PassthroughCluster".into());
    let principal = downstream.peer_identity.to_string();
    let attrs = authz::attrs(
        &snap,
        &downstream,
        &principal,
        downstream.local.port(),
        None,
        None,
    );
    let decision = authz::decide(&snap, &proxy.gateway, None, &attrs);
    if !decision.is_allow() {
        e.connection_termination_details = Some(authz::denial_details(&decision).into());
        finish(&proxy, e, start, source, None, None);
        return;
    }
    let addr = downstream.local;
    e.upstream_host = Some(addr);
    if upstream::resolver::is_mesh_vip(addr.ip(), |ip| !snap.services_by_vip(ip).is_empty()) {
        // A mesh VIP without a service port behind it: dialling it would loop.
        e.response_flags.insert(ResponseFlag::NoRouteFound);
        finish(&proxy, e, start, source, None, None);
        return;
    }
    let tcp = match proxy
        .upstream
        .connect_tcp(addr, PoolLimits::default().connect_timeout)
        .await
    {
        Ok(t) => t,
        Err(err) => {
            e.response_flags.insert(err.flag());
            e.upstream_transport_failure_reason = err.transport_failure_reason().map(Into::into);
            finish(&proxy, e, start, source, None, None);
            return;
        }
    };
    let labels = observe::connection_labels(source.clone(), None, ResponseFlags::empty());
    proxy.metrics.connection(&labels).opened();
    let (sent, received) = copy(tunnel, tcp, &[], &mut e).await;
    observe::tcp_flow(
        &proxy.metrics,
        &proxy.access_log,
        e,
        start,
        &labels,
        sent,
        received,
        Some(addr),
    );
}

async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    proxy: &Proxy,
    e: &mut AccessLogEntry,
    tunnel: Tunnel,
    tcp: S,
    prefix: &[u8],
    source: telemetry::WorkloadLabels,
    service: &Service,
) -> (u64, u64) {
    // Opened is counted with the flags known at open (none), as Envoy does.
    let labels = observe::connection_labels(source, Some(service), ResponseFlags::empty());
    proxy.metrics.connection(&labels).opened();
    copy(tunnel, tcp, prefix, e).await
}

/// Copies both ways (the already-read `prefix` first). Returns (client → upstream,
/// upstream → client) bytes.
async fn copy<S: AsyncRead + AsyncWrite + Unpin>(
    mut tunnel: Tunnel,
    mut tcp: S,
    prefix: &[u8],
    e: &mut AccessLogEntry,
) -> (u64, u64) {
    if !prefix.is_empty()
        && let Err(err) = tcp.write_all(prefix).await
    {
        debug!(error = %err, "upstream write failed");
        e.response_flags
            .insert(ResponseFlag::UpstreamConnectionTermination);
        return (0, 0);
    }
    let extra = prefix.len() as u64;
    match hbone::copy_bidirectional(&mut tunnel, &mut tcp).await {
        Ok((up, down)) => (up + extra, down),
        Err(err) => {
            debug!(error = %err, "L4 flow ended with an error");
            let flag = match err.step {
                hbone::CopyStep::ReadTunnel | hbone::CopyStep::WriteTunnel => {
                    ResponseFlag::DownstreamConnectionTermination
                }
                hbone::CopyStep::ReadStream | hbone::CopyStep::WriteStream => {
                    ResponseFlag::UpstreamConnectionTermination
                }
            };
            e.response_flags.insert(flag);
            (err.tunnel_to_stream + extra, err.stream_to_tunnel)
        }
    }
}

/// Logs and counts a flow. `relayed`: the bytes moved, or `None` when the flow ended before
/// relaying (then it is counted as opened here, so opened and closed always pair up).
fn finish(
    proxy: &Proxy,
    e: AccessLogEntry,
    start: Instant,
    source: telemetry::WorkloadLabels,
    service: Option<&Service>,
    relayed: Option<(u64, u64)>,
) {
    if relayed.is_none() {
        proxy
            .metrics
            .connection(&observe::connection_labels(
                source.clone(),
                service,
                ResponseFlags::empty(),
            ))
            .opened();
    }
    let labels = observe::connection_labels(source, service, e.response_flags);
    let (sent, received) = relayed.unwrap_or((0, 0));
    let host = e.upstream_host;
    observe::tcp_flow(
        &proxy.metrics,
        &proxy.access_log,
        e,
        start,
        &labels,
        sent,
        received,
        host,
    );
}
