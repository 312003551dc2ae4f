//! Outbound (15001): connections the pod made, redirected here by its capture rules.
//!
//! Per connection: read the original destination (`SO_ORIGINAL_DST` / its IPv6 form), ask
//! [`decide_outbound`], then either open an HBONE tunnel with the pod's identity (sockets in the
//! pod's namespace with mark 0x539) or dial directly from the pod's namespace (marked too), and
//! splice both ways with half-close. Refusals and failures reset the client (SO_LINGER 0), so
//! it fails fast instead of hanging or reading an empty answer; each is logged with its reason.
//! The exception is REGISTRY_ONLY's refusal, which answers HTTP/1 requests `502 Bad Gateway`
//! the way Envoy's BlackHoleCluster does (`blackhole.rs`).

mod blackhole;
mod decide;

pub use decide::{
    DATAPLANE_MODE_LABEL, DenyReason, Forward, OutboundAction, ServiceRef, Upstream, Via,
    canonical, canonical_ip, decide_outbound, is_captured,
};

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hbone::{Baggage, Forwarded, TraceParent, TunnelRequest};
use mesh_config::{Snapshot, Workload};
use telemetry::{ConnectionOutcome, Direction, ResponseFlag, SecurityPolicy};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};

use crate::conn::{ByteCounts, Counted, reset, splice_tcp};
use crate::identity::spiffe;
use crate::metrics::{CLUSTER_NAME, ConnTrace, principal_labels, workload_labels};
use crate::pods::PodCtx;

/// Bound on dialling a direct upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts until the pod stops; each connection is handled on its own tracked task.
pub(crate) async fn serve(ctx: Arc<PodCtx>, listener: TcpListener) {
    loop {
        tokio::select! {
            () = ctx.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = info_span!("outbound", src = %canonical(peer));
                    ctx.spawn_conn(handle(ctx.clone(), stream, peer).instrument(span));
                }
                Err(error) => {
                    // Out of descriptors, typically: back off rather than spin.
                    warn!(%error, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    debug!("outbound listener closed");
}

/// Why a forward failed, for the connection log.
struct Failure {
    flag: ResponseFlag,
    error: String,
}

async fn handle(ctx: Arc<PodCtx>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let src = canonical(peer);
    let dst = match inpod::original_dst(&stream) {
        Ok(dst) => canonical(dst),
        Err(error) => {
            // Not redirected: someone dialled 15001 directly. Proxying it would loop.
            warn!(%error, "connection to the outbound port without an original destination; resetting");
            reset(stream);
            return;
        }
    };
    let snap = ctx.shared.store.current();
    let source = ctx.workload(&snap);
    let mut trace = ConnTrace::new(&ctx.shared.telemetry, Direction::Outbound, src, dst);
    trace.set_source(workload_labels(&source));
    let action = decide_outbound(&snap, &source, dst);
    let fwd = match action {
        OutboundAction::Deny(reason @ DenyReason::RegistryOnly { .. }) => {
            // Envoy's BlackHoleCluster: HTTP clients get a 502 saying why, others a reset.
            let counts = ByteCounts::default();
            let answer = tokio::select! {
                answer = blackhole::refuse(stream, dst, &counts) => answer,
                // Dropping the socket mid-way resets it (SO_LINGER 0 until the 502 is out).
                () = ctx.force.cancelled() => blackhole::Answer::Reset("drain period over".into()),
            };
            warn!(%dst, %reason, %answer, "outbound connection refused");
            trace.finish(
                counts.sent(),
                counts.received(),
                ConnectionOutcome::Denied,
                Some(ResponseFlag::NoRouteFound),
                Some(format!("{reason}; {answer}")),
            );
            return;
        }
        OutboundAction::Deny(reason) => {
            warn!(%dst, %reason, "outbound connection refused; resetting");
            reset(stream);
            let flag = match reason {
                DenyReason::NoEndpoints { .. } => ResponseFlag::NoHealthyUpstream,
                _ => ResponseFlag::NoRouteFound,
            };
            trace.finish(
                0,
                0,
                ConnectionOutcome::Denied,
                Some(flag),
                Some(reason.to_string()),
            );
            return;
        }
        OutboundAction::Forward(fwd) => fwd,
    };
    if let Some(service) = &fwd.service {
        trace.set_service(service);
    }
    let Some(upstream) = fwd.pick(fastrand::u64(..)).cloned() else {
        reset(stream);
        trace.finish(
            0,
            0,
            ConnectionOutcome::Failed,
            Some(ResponseFlag::NoHealthyUpstream),
            Some("no upstream".into()),
        );
        return;
    };
    debug!(%dst, via = %fwd.via, ?upstream, "outbound decision");
    let counts = ByteCounts::default();
    let result = match upstream {
        Upstream::Hbone {
            peer,
            authority,
            identities,
            workload,
        } => {
            trace.entry.dst_hbone_addr = Some(authority.to_string());
            trace.set_security(SecurityPolicy::MutualTls);
            let dest = workload
                .as_ref()
                .and_then(|name| find_workload(&snap, authority.ip(), name))
                .map(|w| workload_labels(&w))
                .or_else(|| {
                    identities
                        .first()
                        .map(|id| principal_labels(&id.to_string()))
                });
            if let Some(dest) = dest {
                trace.set_destination(dest);
            }
            let request = tunnel_request(
                &ctx,
                &source,
                src,
                peer,
                authority,
                &identities,
                fwd.service.as_ref(),
            );
            trace.opened();
            via_hbone(&ctx, stream, request, &counts, &mut trace).await
        }
        Upstream::Direct { addr, workload } => {
            trace.set_security(SecurityPolicy::None);
            if let Some(w) = workload
                .as_ref()
                .and_then(|name| find_workload(&snap, addr.ip(), name))
            {
                trace.set_destination(workload_labels(&w));
            }
            trace.opened();
            direct(&ctx, stream, addr, &counts).await
        }
        Upstream::Dns { host, port } => {
            trace.set_security(SecurityPolicy::None);
            trace.opened();
            match crate::resolve::lookup(&ctx.netns, &ctx.shared.dns_upstreams, &host).await {
                Ok(ips) => match pick_address(&ips, dst.ip()) {
                    Some(ip) => direct(&ctx, stream, SocketAddr::new(ip, port), &counts).await,
                    None => {
                        reset(stream);
                        Err(Failure {
                            flag: ResponseFlag::DnsResolutionFailed,
                            error: format!("{host} has no address"),
                        })
                    }
                },
                Err(error) => {
                    reset(stream);
                    Err(Failure {
                        flag: ResponseFlag::DnsResolutionFailed,
                        error: format!("resolving {host}: {error}"),
                    })
                }
            }
        }
    };
    match result {
        Ok(()) => trace.finish(
            counts.sent(),
            counts.received(),
            ConnectionOutcome::Success,
            None,
            None,
        ),
        Err(failure) => trace.finish(
            counts.sent(),
            counts.received(),
            ConnectionOutcome::Failed,
            Some(failure.flag),
            Some(failure.error),
        ),
    }
}

/// The workload `name` at `ip` in the current snapshot.
fn find_workload(
    snap: &Snapshot,
    ip: IpAddr,
    name: &mesh_config::NamespacedName,
) -> Option<Arc<Workload>> {
    snap.workload_by_ip(ip).filter(|w| &w.name == name).cloned()
}

/// An address of the family the client dialled, else any.
fn pick_address(ips: &[IpAddr], dialled: IpAddr) -> Option<IpAddr> {
    let same_family: Vec<IpAddr> = ips
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv4() == dialled.is_ipv4())
        .collect();
    let pool = if same_family.is_empty() {
        ips.to_vec()
    } else {
        same_family
    };
    if pool.is_empty() {
        return None;
    }
    pool.get(fastrand::usize(..pool.len())).copied()
}

/// The CONNECT request, with the headers Istio's ztunnel sends: `forwarded` (client address
/// and service host), `baggage` (source workload metadata) and a fresh `traceparent`.
fn tunnel_request(
    ctx: &PodCtx,
    source: &Workload,
    client: SocketAddr,
    peer: SocketAddr,
    authority: SocketAddr,
    identities: &[mesh_config::Identity],
    service: Option<&ServiceRef>,
) -> TunnelRequest {
    let expected = identities.iter().map(spiffe).collect();
    let mut request = TunnelRequest::new(ctx.spiffe.clone(), peer, expected, authority)
        .connector(ctx.connector.clone());
    let mut forwarded = Forwarded::new(client);
    if let Some(service) = service {
        forwarded = forwarded.with_host(service.hostname.clone());
    }
    let labels = workload_labels(source);
    let baggage = Baggage {
        cluster: Some(CLUSTER_NAME.to_owned()),
        namespace: Some(source.name.namespace.clone()),
        workload_kind: Some("pod".to_owned()),
        workload_name: Some(source.name.name.clone()),
        service_name: Some(labels.canonical_service),
        service_version: Some(labels.canonical_revision),
        region: None,
        zone: None,
    };
    // Header helpers only fail on values that are not valid header text; then the header is
    // left out rather than failing the connection.
    request = match request.clone().forwarded(&forwarded) {
        Ok(r) => r,
        Err(error) => {
            debug!(%error, "forwarded header left out");
            request
        }
    };
    request = match request.clone().baggage(&baggage) {
        Ok(r) => r,
        Err(error) => {
            debug!(%error, "baggage header left out");
            request
        }
    };
    request.traceparent(&TraceParent::random())
}

async fn via_hbone(
    ctx: &PodCtx,
    stream: TcpStream,
    request: TunnelRequest,
    counts: &ByteCounts,
    trace: &mut ConnTrace,
) -> Result<(), Failure> {
    let peer = request.destination;
    let authority = request.authority;
    let opened = tokio::select! {
        opened = ctx.shared.hbone.open(request) => opened,
        () = ctx.force.cancelled() => {
            reset(stream);
            return Err(Failure { flag: ResponseFlag::LocalReset, error: "drained before the tunnel opened".into() });
        }
    };
    let mut tunnel = match opened {
        Ok(tunnel) => tunnel,
        Err(error) => {
            warn!(%peer, %authority, %error, "HBONE tunnel failed; resetting the client");
            reset(stream);
            let flag = match error.status() {
                Some(status) if status.as_u16() == 401 => ResponseFlag::UnauthorizedExternalService,
                Some(_) => ResponseFlag::UpstreamConnectionFailure,
                None => ResponseFlag::UpstreamConnectionFailure,
            };
            return Err(Failure {
                flag,
                error: format!("HBONE to {peer} for {authority}: {error}"),
            });
        }
    };
    trace.entry.dst_identity = Some(tunnel.peer_identity().to_string());
    let mut client = Counted::new(stream, counts.sent.clone(), counts.received.clone());
    let copied = tokio::select! {
        copied = hbone::copy_bidirectional(&mut tunnel, &mut client) => copied.map_err(|e| e.to_string()),
        () = ctx.force.cancelled() => Err("drain period over".to_owned()),
    };
    match copied {
        Ok(_) => Ok(()),
        Err(error) => {
            reset(client.into_inner());
            Err(Failure {
                flag: ResponseFlag::UpstreamConnectionTermination,
                error,
            })
        }
    }
}

async fn direct(
    ctx: &PodCtx,
    mut stream: TcpStream,
    addr: SocketAddr,
    counts: &ByteCounts,
) -> Result<(), Failure> {
    let connect = tokio::time::timeout(
        CONNECT_TIMEOUT,
        inpod::connect_in(&ctx.netns, addr, Some(crate::MARK)),
    );
    let connected = tokio::select! {
        connected = connect => connected,
        () = ctx.force.cancelled() => {
            reset(stream);
            return Err(Failure { flag: ResponseFlag::LocalReset, error: "drained before connecting".into() });
        }
    };
    let mut upstream = match connected {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            warn!(%addr, %error, "direct connect failed; resetting the client");
            reset(stream);
            return Err(Failure {
                flag: ResponseFlag::UpstreamConnectionFailure,
                error: format!("connect to {addr}: {error}"),
            });
        }
        Err(_) => {
            warn!(%addr, "direct connect timed out; resetting the client");
            reset(stream);
            return Err(Failure {
                flag: ResponseFlag::UpstreamConnectionFailure,
                error: format!("connect to {addr} timed out after {CONNECT_TIMEOUT:?}"),
            });
        }
    };
    let _ = upstream.set_nodelay(true);
    let copied = tokio::select! {
        copied = splice_tcp(&mut stream, &mut upstream, counts) => copied.map_err(|e| e.to_string()),
        () = ctx.force.cancelled() => Err("drain period over".to_owned()),
    };
    match copied {
        Ok(()) => Ok(()),
        Err(error) => {
            reset(stream);
            reset(upstream);
            Err(Failure {
                flag: ResponseFlag::UpstreamConnectionTermination,
                error,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_address_prefers_the_dialled_family() {
        let v4: IpAddr = "192.0.2.1".parse().expect("ip");
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        assert_eq!(
            pick_address(&[v6, v4], "240.240.0.1".parse().expect("ip")),
            Some(v4)
        );
        assert_eq!(
            pick_address(&[v6, v4], "2001:2::1".parse().expect("ip")),
            Some(v6)
        );
        assert_eq!(
            pick_address(&[v6], "240.240.0.1".parse().expect("ip")),
            Some(v6)
        );
        assert_eq!(pick_address(&[], v4), None);
    }
}
