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
    DenyReason, Forward, OutboundAction, ServiceRef, Upstream, Via, canonical, canonical_ip,
    decide_outbound,
};

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hbone::{Baggage, Forwarded, TraceParent, TunnelRequest};
use mesh_config::{Snapshot, Workload};
use telemetry::{ConnectionOutcome, Direction, ResponseFlag, SecurityPolicy};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, debug_span, warn};

use crate::conn::{ByteCounts, InSpan, Tallied, reset, until_cancelled};
use crate::identity::spiffe;
use crate::metrics::{CLUSTER_NAME, ConnTrace, Peer, workload_labels, workload_meta};
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
                    // Debug level: an enabled span allocates (its formatted fields) for the
                    // connection's whole life, and at info every warning below names its
                    // connection itself; the close line carries the rest.
                    let span = debug_span!("outbound", src = %canonical(peer));
                    ctx.spawn_conn(InSpan::new(handle(ctx.clone(), stream, peer), span));
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

/// One outbound connection: set up (decide, resolve, dial or open the tunnel), then relay.
///
/// The set-up runs boxed, and only what relaying needs outlives it: a task is as large as its
/// largest state, and ten thousand idle connections would otherwise each keep room for a DNS
/// lookup and a TLS handshake. Not an `async fn`: its arguments would stay in the future for
/// the connection's life; they go to the boxed set-up instead.
fn handle(
    ctx: Arc<PodCtx>,
    stream: TcpStream,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> + Send {
    let set_up = Box::pin(set_up(ctx.clone(), stream, peer));
    relay_connection(ctx, set_up)
}

/// Relays a connection once `set_up` has connected it; logs and counts it at the end.
async fn relay_connection(
    ctx: Arc<PodCtx>,
    set_up: std::pin::Pin<Box<impl std::future::Future<Output = Option<Relay>> + Send>>,
) {
    // Awaiting the box by value frees it (and the finished set-up in it) right away.
    let Some(mut relay) = set_up.await else {
        return;
    };
    // By reference: values moved into a nested future would take room twice in this task.
    let result = match &mut relay.upstream {
        // Spliced here rather than in a helper, whose future would keep its own references
        // to what this one holds: an idle tunnel keeps every byte of its task.
        Connected::Hbone(tunnel) => {
            let copy = hbone::copy_bidirectional(tunnel, &mut relay.client);
            let copied = match until_cancelled(copy, &ctx.force).await {
                Some(copied) => copied.map(drop).map_err(|e| e.to_string()),
                None => Err("drain period over".to_owned()),
            };
            copied.map_err(|error| Failure {
                flag: ResponseFlag::UpstreamConnectionTermination,
                error,
            })
        }
        // Boxed: tokio's copy is larger than the tunnel's, and would set the size of every
        // task, HBONE ones included. A direct connection holds two 8 KiB copy buffers anyway.
        Connected::Direct(upstream) => {
            Box::pin(relay_direct(&ctx, &mut relay.client, upstream)).await
        }
    };
    let Relay {
        client,
        upstream,
        trace,
    } = relay;
    // What is read from the client is sent, what is written to it received.
    let (sent, received) = (client.read(), client.written());
    // Logged as the destination's identity: the one it proved, not the one expected.
    let verified = match &upstream {
        Connected::Hbone(tunnel) => Some(tunnel.peer_identity().to_string()),
        Connected::Direct(_) => None,
    };
    if result.is_err() {
        // Reset, not a clean close: the client must not mistake a cut for a complete answer.
        // A tunnel dropped before its end resets its HTTP/2 stream.
        reset(client.into_inner());
        if let Connected::Direct(upstream) = upstream {
            reset(upstream);
        }
    }
    finish(trace, verified, (sent, received), result);
}

/// An outbound connection whose upstream is connected, ready to be spliced.
struct Relay {
    /// Counts the bytes the client sent (read) and received (written).
    client: Tallied<TcpStream>,
    upstream: Connected,
    trace: ConnTrace,
}

// One per connection and never moved after set-up: boxing the tunnel would only add an
// allocation to every HBONE connection.
#[allow(clippy::large_enum_variant)]
enum Connected {
    Hbone(hbone::Tunnel),
    Direct(TcpStream),
}

/// Logs and counts a connection that ended (or never got an upstream); `verified` is the
/// identity the destination proved, if any.
fn finish(
    trace: ConnTrace,
    verified: Option<String>,
    (sent, received): (u64, u64),
    result: Result<(), Failure>,
) {
    match result {
        Ok(()) => trace.finish_verified(
            verified,
            sent,
            received,
            ConnectionOutcome::Success,
            None,
            None,
        ),
        Err(failure) => trace.finish_verified(
            verified,
            sent,
            received,
            ConnectionOutcome::Failed,
            Some(failure.flag),
            Some(failure.error),
        ),
    }
}

/// Decides where the connection goes and connects the upstream. `None` when the connection
/// was refused or failed (already reset, logged and counted).
async fn set_up(ctx: Arc<PodCtx>, stream: TcpStream, peer: SocketAddr) -> Option<Relay> {
    let ctx = &ctx;
    let _ = stream.set_nodelay(true);
    let src = canonical(peer);
    let dst = match inpod::original_dst(&stream) {
        Ok(dst) => canonical(dst),
        Err(error) => {
            // Not redirected: someone dialled 15001 directly. Proxying it would loop.
            warn!(%src, %error, "connection to the outbound port without an original destination; resetting");
            reset(stream);
            return None;
        }
    };
    let snap = ctx.shared.store.current();
    let source = ctx.workload(&snap);
    let mut trace = ConnTrace::new(&ctx.shared.telemetry, Direction::Outbound, src, dst);
    trace.set_source(Peer::Workload(source.clone()));
    let action = decide_outbound(&snap, &source, dst);
    let fwd = match action {
        OutboundAction::Deny(reason @ DenyReason::RegistryOnly { .. }) => {
            // Envoy's BlackHoleCluster: HTTP clients get a 502 saying why, others a reset.
            let counts = ByteCounts::default();
            // Boxed here and below: a task's size is that of its largest state, and short-lived
            // steps (refusing, dialling, resolving, the TLS handshake) would otherwise make
            // every long-lived idle connection as large as them.
            let answer = tokio::select! {
                answer = Box::pin(blackhole::refuse(stream, dst, &counts)) => answer,
                // Dropping the socket mid-way resets it (SO_LINGER 0 until the 502 is out).
                () = ctx.force.cancelled() => blackhole::Answer::Reset("drain period over".into()),
            };
            warn!(%src, %dst, %reason, %answer, "outbound connection refused");
            trace.finish(
                counts.sent(),
                counts.received(),
                ConnectionOutcome::Denied,
                Some(ResponseFlag::NoRouteFound),
                Some(format!("{reason}; {answer}")),
            );
            return None;
        }
        OutboundAction::Deny(reason) => {
            warn!(%src, %dst, %reason, "outbound connection refused; resetting");
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
            return None;
        }
        OutboundAction::Forward(fwd) => fwd,
    };
    if let Some(service) = &fwd.service {
        trace.set_service(service.clone());
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
        return None;
    };
    debug!(%dst, via = %fwd.via, ?upstream, "outbound decision");
    let connected = match upstream {
        Upstream::Hbone {
            peer,
            authority,
            identities,
            workload,
        } => {
            trace.set_hbone_addr(authority);
            trace.set_security(SecurityPolicy::MutualTls);
            let dest = workload
                .as_ref()
                .and_then(|name| find_workload(&snap, authority.ip(), name))
                .map(Peer::Workload)
                .or_else(|| {
                    identities
                        .first()
                        .map(|id| Peer::principal_only(id.to_string()))
                });
            if let Some(dest) = dest {
                trace.set_destination(dest);
            }
            let request = tunnel_request(
                ctx,
                &source,
                src,
                peer,
                authority,
                &identities,
                fwd.service.as_ref(),
            );
            trace.opened();
            open_hbone(ctx, request).await.map(Connected::Hbone)
        }
        Upstream::Direct { addr, workload } => {
            trace.set_security(SecurityPolicy::None);
            if let Some(w) = workload
                .as_ref()
                .and_then(|name| find_workload(&snap, addr.ip(), name))
            {
                trace.set_destination(Peer::Workload(w));
            }
            trace.opened();
            dial(ctx, addr).await.map(Connected::Direct)
        }
        Upstream::Dns { host, port } => {
            trace.set_security(SecurityPolicy::None);
            trace.opened();
            match Box::pin(ctx.dns_upstreams.lookup_ip(&host)).await {
                Ok(ips) => match pick_address(&ips, dst.ip()) {
                    Some(ip) => dial(ctx, SocketAddr::new(ip, port))
                        .await
                        .map(Connected::Direct),
                    None => Err(Failure {
                        flag: ResponseFlag::DnsResolutionFailed,
                        error: format!("{host} has no address"),
                    }),
                },
                Err(error) => Err(Failure {
                    flag: ResponseFlag::DnsResolutionFailed,
                    error: format!("resolving {host}: {error}"),
                }),
            }
        }
    };
    match connected {
        Ok(upstream) => Some(Relay {
            client: Tallied::new(stream),
            upstream,
            trace,
        }),
        Err(failure) => {
            // Reset, not a clean close: the client must not mistake it for an empty answer.
            reset(stream);
            finish(trace, None, (0, 0), Err(failure));
            None
        }
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
    let workload = workload_meta(source);
    let baggage = Baggage {
        cluster: Some(CLUSTER_NAME.to_owned()),
        namespace: Some(source.name.namespace.clone()),
        // Istio's baggage keys are `k8s.<lowercase kind>.name`.
        workload_kind: Some(workload.kind.to_ascii_lowercase()),
        workload_name: Some(workload.name),
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

/// Opens the tunnel (the CONNECT answered 200).
async fn open_hbone(ctx: &PodCtx, request: TunnelRequest) -> Result<hbone::Tunnel, Failure> {
    let peer = request.destination;
    let authority = request.authority;
    let opened = tokio::select! {
        opened = Box::pin(ctx.shared.hbone.open(request)) => opened,
        () = ctx.force.cancelled() => {
            return Err(Failure { flag: ResponseFlag::LocalReset, error: "drained before the tunnel opened".into() });
        }
    };
    match opened {
        Ok(tunnel) => Ok(tunnel),
        Err(error) => {
            warn!(%peer, %authority, %error, "HBONE tunnel failed; resetting the client");
            let flag = match error.status() {
                Some(status) if status.as_u16() == 401 => ResponseFlag::UnauthorizedExternalService,
                Some(_) => ResponseFlag::UpstreamConnectionFailure,
                None => ResponseFlag::UpstreamConnectionFailure,
            };
            Err(Failure {
                flag,
                error: format!("HBONE to {peer} for {authority}: {error}"),
            })
        }
    }
}

/// Dials a direct upstream from the pod's namespace (marked, so it is not captured again).
async fn dial(ctx: &PodCtx, addr: SocketAddr) -> Result<TcpStream, Failure> {
    let connect = Box::pin(tokio::time::timeout(
        CONNECT_TIMEOUT,
        inpod::connect_in(&ctx.netns, addr, Some(crate::MARK)),
    ));
    let connected = tokio::select! {
        connected = connect => connected,
        () = ctx.force.cancelled() => {
            return Err(Failure { flag: ResponseFlag::LocalReset, error: "drained before connecting".into() });
        }
    };
    match connected {
        Ok(Ok(upstream)) => {
            let _ = upstream.set_nodelay(true);
            Ok(upstream)
        }
        Ok(Err(error)) => {
            warn!(%addr, %error, "direct connect failed; resetting the client");
            Err(Failure {
                flag: ResponseFlag::UpstreamConnectionFailure,
                error: format!("connect to {addr}: {error}"),
            })
        }
        Err(_) => {
            warn!(%addr, "direct connect timed out; resetting the client");
            Err(Failure {
                flag: ResponseFlag::UpstreamConnectionFailure,
                error: format!("connect to {addr} timed out after {CONNECT_TIMEOUT:?}"),
            })
        }
    }
}

async fn relay_direct(
    ctx: &PodCtx,
    client: &mut Tallied<TcpStream>,
    upstream: &mut TcpStream,
) -> Result<(), Failure> {
    // tokio's copy, as `splice_tcp`: EOF on one side shuts down the other's write half.
    tokio::select! {
        copied = tokio::io::copy_bidirectional(client, upstream) => copied.map(drop).map_err(|e| e.to_string()),
        () = ctx.force.cancelled() => Err("drain period over".to_owned()),
    }
    .map_err(|error| Failure {
        flag: ResponseFlag::UpstreamConnectionTermination,
        error,
    })
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

#[cfg(test)]
mod size_tests {
    use super::*;
    use std::future::Future;

    fn future_size<A, B, C, F: Future>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn future_size2<A, B, F: Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Each connection's task is as large as its future, and an idle connection keeps all of
    /// it: the set-up steps are boxed so only relaying state stays (it was 6.3 KB unboxed), and
    /// the per-connection telemetry keeps inputs, not rendered labels (1.7 KB before that).
    ///
    /// tokio allocates a task as 104 bytes plus its future, rounded up to 128 bytes: outbound,
    /// this future plus 16 (task tracker, span) makes a 768-byte task; inbound, plus the HBONE
    /// server's 64 (its wrapper and span), 768 too. Both were 1152 and 1024 bytes before the
    /// direct relay was boxed, the copy and the cancellation became plain futures, the spans
    /// were boxed and the byte counts moved into the client stream.
    #[test]
    fn connection_tasks_stay_small() {
        let outbound = future_size(handle);
        // What the HBONE server spawns per CONNECT (the handler's future, whole).
        let inbound = future_size2(
            |h: &'static crate::inbound::InboundHandler, c: hbone::IncomingConnect| {
                hbone::Handler::handle(h, c)
            },
        );
        // Both tasks hold a tunnel: 136 bytes since its peer's identity and addresses are
        // shared per HBONE connection (it was 352, plus a copied identity).
        let tunnel = std::mem::size_of::<hbone::Tunnel>();
        assert!(tunnel <= 160, "hbone::Tunnel: {tunnel} bytes");
        // 592 and 600 bytes with rustc 1.95 on x86_64 (944 and 840 before).
        assert!(
            outbound <= 592,
            "outbound connection future: {outbound} bytes"
        );
        assert!(inbound <= 600, "inbound connection future: {inbound} bytes");
        // Inbound connections also keep their admission on the heap for re-checks on new
        // policies (with a child token of the drain's, its principal and a registry slot):
        // the future only grew by its pointer, which took the slot of the moved `ctx`.
        let admission = std::mem::size_of::<crate::inbound::Admission>();
        assert!(admission <= 112, "inbound admission: {admission} bytes");
    }
}
