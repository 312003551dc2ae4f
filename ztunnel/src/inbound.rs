//! Inbound: HBONE on 15008 and plaintext on 15006, both inside the pod's namespace.
//!
//! HBONE: the peer is authenticated by mTLS (the pod's certificate; client certificates of our
//! trust domain only). Each CONNECT is checked ([`check_inbound`], pure): the authority must be
//! one of the pod's own addresses (else 400), then the pod's L4 AuthorizationPolicies decide
//! (DENY before ALLOW; 401 on deny). An accepted tunnel is spliced to the application at the
//! pod's `ip:port`, dialled from inside the namespace with the mark so it is not captured again.
//!
//! Plaintext (15006): the same policy with no peer identity; the source IP is the socket's.
//!
//! Live connections keep what they were admitted on ([`Admission`]); each new configuration
//! snapshot checks them again ([`recheck`]) and closes those its policies now deny, as Istio's
//! ztunnel does, so a new DENY also cuts a waypoint's pooled tunnel.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use http::StatusCode;
use mesh_config::authz::Decision;
use mesh_config::{RequestAttrs, Snapshot, Workload};
use telemetry::{ConnectionOutcome, Direction, ResponseFlag, SecurityPolicy};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, debug_span, warn};

use crate::conn::{ByteCounts, InSpan, Tallied, reset, splice_tcp, until_cancelled};
use crate::metrics::{ConnTrace, Peer};
use crate::outbound::canonical;
use crate::pods::PodCtx;

/// Bound on dialling the application.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The verdict on an inbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundVerdict {
    Allow,
    /// The target is not this pod (HBONE: 400).
    WrongTarget,
    /// Denied by policy (HBONE: 401); names the DENY policy when one matched.
    Denied {
        policy: Option<String>,
    },
}

/// Checks a connection to `target` (an `ip:port` of the pod) from `source_ip`, authenticated as
/// `principal` when it came over HBONE.
pub fn check_inbound(
    snap: &Snapshot,
    pod: &Workload,
    principal: Option<&str>,
    source_ip: IpAddr,
    target: SocketAddr,
) -> InboundVerdict {
    if !pod.ips.contains(&target.ip()) {
        return InboundVerdict::WrongTarget;
    }
    // Source labels only when the workload at the source address is the authenticated peer.
    let source_labels = snap
        .workload_by_ip(source_ip)
        .filter(|w| principal.is_some_and(|p| w.identity.to_string() == p))
        .map(|w| &w.labels);
    let attrs = RequestAttrs {
        source_principal: principal,
        source_labels,
        source_ip: Some(source_ip),
        destination_ip: Some(target.ip()),
        destination_port: target.port(),
        ..RequestAttrs::default()
    };
    match snap.authz_for_workload(pod).evaluate(&attrs) {
        Decision::Allow => InboundVerdict::Allow,
        Decision::Deny { policy } => InboundVerdict::Denied {
            policy: policy.map(|p| p.to_string()),
        },
    }
}

/// What a live inbound connection was admitted on, kept so that a new configuration can be
/// checked against it ([`recheck`]): the inputs of [`check_inbound`] and the token that closes
/// the connection. Held by the connection's task; the pod's [`LiveInbound`] only has a weak
/// reference, so the entry goes with the connection and its future grows by one pointer.
pub(crate) struct Admission {
    principal: Option<Box<str>>,
    source_ip: IpAddr,
    target: SocketAddr,
    /// A child of the pod's `force`: cancelled at the end of the drain or when revoked.
    revoke: CancellationToken,
    /// Why the connection was revoked, for its close log; unset when it was the drain.
    reason: OnceLock<String>,
}

impl Admission {
    /// Why the connection was cut off, once `revoke` is cancelled.
    fn close_reason(&self) -> String {
        self.reason
            .get()
            .cloned()
            .unwrap_or_else(|| "drain period over".to_owned())
    }
}

/// The pod's live inbound connections (HBONE and plaintext). Weak references: an entry dies
/// with its connection and the dead ones are pruned when the list has doubled since the last
/// prune (amortised, so it stays within twice the live count) and at each re-check.
#[derive(Default)]
pub(crate) struct LiveInbound {
    list: Mutex<LiveList>,
}

#[derive(Default)]
struct LiveList {
    entries: Vec<Weak<Admission>>,
    prune_at: usize,
}

impl LiveList {
    fn prune(&mut self) {
        self.entries.retain(|w| w.strong_count() > 0);
        self.prune_at = (self.entries.len() * 2).max(64);
    }
}

impl LiveInbound {
    /// Registers a connection about to be checked. Registered before the snapshot is read, so
    /// a configuration published meanwhile is re-checked against it ([`recheck`] runs after
    /// each publication).
    pub(crate) fn admit(
        &self,
        force: &CancellationToken,
        principal: Option<&str>,
        source_ip: IpAddr,
        target: SocketAddr,
    ) -> Arc<Admission> {
        let admission = Arc::new(Admission {
            principal: principal.map(Box::from),
            source_ip,
            target,
            revoke: force.child_token(),
            reason: OnceLock::new(),
        });
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list.entries.len() >= list.prune_at {
            list.prune();
        }
        list.entries.push(Arc::downgrade(&admission));
        admission
    }

    /// The connections still open.
    fn live(&self) -> Vec<Arc<Admission>> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.prune();
        list.entries.iter().filter_map(Weak::upgrade).collect()
    }

    /// How many connections are registered and still open.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.live().len()
    }
}

/// Checks every live inbound connection of `pod` again against `snap`, with the inputs it was
/// admitted on (the same pure [`check_inbound`]), and closes those now denied: their tasks
/// reset the stream and log the close as usual. Returns how many were closed.
pub(crate) fn recheck(live: &LiveInbound, snap: &Snapshot, pod: &Workload) -> usize {
    let mut closed = 0;
    for conn in live.live() {
        if conn.revoke.is_cancelled() {
            continue;
        }
        let principal = conn.principal.as_deref();
        let verdict = check_inbound(snap, pod, principal, conn.source_ip, conn.target);
        let InboundVerdict::Denied { policy } = verdict else {
            continue;
        };
        let who = principal.unwrap_or("unauthenticated plaintext client");
        let why = denial(who, policy.as_deref());
        let policy = policy.unwrap_or_else(|| "(no ALLOW policy matches)".to_owned());
        warn!(
            pod = %pod.name, src = %conn.source_ip, dst = %conn.target, reason = %why,
            "connection closed: no longer allowed by policy {policy}"
        );
        let _ = conn
            .reason
            .set(format!("no longer allowed by policy: {why}"));
        conn.revoke.cancel();
        closed += 1;
    }
    closed
}

/// The source as telemetry names it: the workload at the source address only when it is the
/// authenticated peer.
fn source_peer(snap: &Snapshot, source_ip: IpAddr, principal: Option<&str>) -> Peer {
    let by_ip = snap.workload_by_ip(source_ip);
    match (by_ip, principal) {
        (Some(w), Some(p)) if w.identity.to_string() == p => Peer::Workload(w.clone()),
        (_, Some(p)) => Peer::principal_only(p),
        // Unauthenticated: the workload is a guess from the address, never a principal.
        (Some(w), None) => Peer::Unauthenticated(w.clone()),
        (None, None) => Peer::Unknown,
    }
}

/// HBONE accept loop; each TCP connection is served (TLS + HTTP/2) on its own tracked task and
/// gets GOAWAY when the pod stops.
pub(crate) async fn serve_hbone(ctx: Arc<PodCtx>, listener: TcpListener, server: hbone::Server) {
    let handler = Arc::new(InboundHandler { ctx: ctx.clone() });
    loop {
        tokio::select! {
            () = ctx.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let server = server.clone();
                    let handler = handler.clone();
                    let stop = ctx.stop.clone();
                    let force = ctx.force.clone();
                    ctx.spawn_conn(async move {
                        tokio::select! {
                            // Failures are logged by the server.
                            _ = server.serve_connection(tcp, handler, stop.cancelled_owned()) => {}
                            () = force.cancelled() => {}
                        }
                    });
                }
                Err(error) => {
                    warn!(%error, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    debug!("HBONE listener closed");
}

pub(crate) struct InboundHandler {
    ctx: Arc<PodCtx>,
}

impl hbone::Handler for InboundHandler {
    // Not an `async fn`: its argument would stay in the future for the tunnel's life. The
    // CONNECT goes boxed to the set-up, which frees it once answered.
    fn handle(
        &self,
        connect: hbone::IncomingConnect,
    ) -> impl std::future::Future<Output = ()> + Send {
        let meta = connect.meta();
        // Debug level, as outbound: the warnings below name the connection themselves.
        let span =
            debug_span!("inbound", src = %canonical(meta.remote_addr), peer = %meta.peer_identity);
        InSpan::new(handle_connect(self.ctx.clone(), Box::new(connect)), span)
    }
}

/// One CONNECT: set up (check, dial the application, answer 200), then relay.
///
/// The set-up runs boxed and only what relaying needs outlives it: a task is as large as its
/// largest state, and ten thousand idle tunnels would otherwise each keep room for the dial.
/// An `async fn`'s arguments stay in its future to the end, hence the CONNECT in a box, which
/// the set-up consumes.
pub(crate) async fn handle_connect(ctx: Arc<PodCtx>, connect: Box<hbone::IncomingConnect>) {
    // `ctx` moves into the set-up: the relay does not need it, and its slot is reused.
    let Some((mut tunnel, app, trace, admission)) = Box::pin(set_up(ctx, connect)).await else {
        return;
    };
    // Written to the application is what the client sent, read from it what it received.
    let mut app = Tallied::new(app);
    let copy = hbone::copy_bidirectional(&mut tunnel, &mut app);
    // The admission's token: the drain's, or a revocation by a new policy.
    let copied = match until_cancelled(copy, &admission.revoke).await {
        Some(copied) => copied.map_err(|e| e.to_string()),
        None => Err(admission.close_reason()),
    };
    let (sent, received) = (app.written(), app.read());
    match copied {
        Ok(_) => trace.finish(sent, received, ConnectionOutcome::Success, None, None),
        Err(error) => {
            reset(app.into_inner());
            trace.finish(
                sent,
                received,
                ConnectionOutcome::Failed,
                Some(ResponseFlag::UpstreamConnectionTermination),
                Some(error),
            );
        }
    }
}

/// Checks the CONNECT, dials the application and accepts the tunnel; `None` when the CONNECT
/// was answered with an error (logged and counted).
async fn set_up(
    ctx: Arc<PodCtx>,
    connect: Box<hbone::IncomingConnect>,
) -> Option<(hbone::Tunnel, TcpStream, ConnTrace, Arc<Admission>)> {
    let connect = *connect;
    let meta = connect.meta();
    let authority = meta.authority;
    let target = canonical(authority);
    let remote = canonical(meta.remote_addr);
    // The client pod's address: HBONE sockets are created in the client pod's namespace.
    let source = meta
        .forwarded
        .as_ref()
        .and_then(|f| f.client_addr())
        .map(canonical)
        .filter(|client| client.ip() == remote.ip())
        .unwrap_or(remote);
    let principal = meta.peer_identity.to_string();
    let admission = ctx
        .live_inbound
        .admit(&ctx.force, Some(&principal), remote.ip(), target);
    let snap = ctx.shared.store.current();
    let pod = ctx.workload(&snap);
    let mut trace = ConnTrace::new(&ctx.shared.telemetry, Direction::Inbound, source, target);
    trace.set_hbone_addr(authority);
    trace.set_source(source_peer(&snap, remote.ip(), Some(&principal)));
    trace.set_destination(Peer::Workload(pod.clone()));
    trace.set_security(SecurityPolicy::MutualTls);
    match check_inbound(&snap, &pod, Some(&principal), remote.ip(), target) {
        InboundVerdict::Allow => {}
        InboundVerdict::WrongTarget => {
            warn!(src = %source, peer = %principal, authority = %authority, "CONNECT target is not this pod: 400");
            connect.reject(StatusCode::BAD_REQUEST);
            trace.finish(
                0,
                0,
                ConnectionOutcome::Failed,
                Some(ResponseFlag::NoRouteFound),
                Some(format!(
                    "authority {} is not an address of {}",
                    authority, ctx.name
                )),
            );
            return None;
        }
        InboundVerdict::Denied { policy } => {
            let why = denial(&principal, policy.as_deref());
            warn!(src = %source, %target, reason = %why, "inbound connection denied: 401");
            connect.reject(StatusCode::UNAUTHORIZED);
            trace.finish(0, 0, ConnectionOutcome::Denied, None, Some(why));
            return None;
        }
    }
    let app = Box::pin(tokio::time::timeout(
        APP_CONNECT_TIMEOUT,
        inpod::connect_in(&ctx.netns, target, Some(crate::MARK)),
    ))
    .await;
    let app = match app {
        Ok(Ok(app)) => app,
        Ok(Err(error)) => {
            warn!(src = %source, %target, %error, "application unreachable: 503");
            connect.reject(StatusCode::SERVICE_UNAVAILABLE);
            trace.finish(
                0,
                0,
                ConnectionOutcome::Failed,
                Some(ResponseFlag::UpstreamConnectionFailure),
                Some(error.to_string()),
            );
            return None;
        }
        Err(_) => {
            warn!(src = %source, %target, "application connect timed out: 504");
            connect.reject(StatusCode::GATEWAY_TIMEOUT);
            trace.finish(
                0,
                0,
                ConnectionOutcome::Failed,
                Some(ResponseFlag::UpstreamConnectionFailure),
                Some("connect timed out".into()),
            );
            return None;
        }
    };
    let _ = app.set_nodelay(true);
    trace.opened();
    let tunnel = match connect.accept() {
        Ok(tunnel) => tunnel,
        Err(error) => {
            debug!(%error, "client went away before the CONNECT was answered");
            trace.finish(
                0,
                0,
                ConnectionOutcome::Failed,
                Some(ResponseFlag::DownstreamConnectionTermination),
                Some(error.to_string()),
            );
            return None;
        }
    };
    Some((tunnel, app, trace, admission))
}

fn denial(principal: &str, policy: Option<&str>) -> String {
    match policy {
        Some(policy) => format!("{principal} denied by AuthorizationPolicy {policy}"),
        None => format!("{principal} matched no ALLOW AuthorizationPolicy"),
    }
}

/// Plaintext inbound (15006) accept loop.
pub(crate) async fn serve_plaintext(ctx: Arc<PodCtx>, listener: TcpListener) {
    loop {
        tokio::select! {
            () = ctx.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = debug_span!("inbound_plaintext", src = %canonical(peer));
                    ctx.spawn_conn(InSpan::new(handle_plaintext(ctx.clone(), stream, canonical(peer)), span));
                }
                Err(error) => {
                    warn!(%error, "plaintext inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    debug!("plaintext inbound listener closed");
}

async fn handle_plaintext(ctx: Arc<PodCtx>, mut stream: TcpStream, source: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let target = match inpod::original_dst(&stream) {
        Ok(dst) => canonical(dst),
        Err(error) => {
            warn!(src = %source, %error, "plaintext inbound connection without an original destination; resetting");
            reset(stream);
            return;
        }
    };
    let admission = ctx
        .live_inbound
        .admit(&ctx.force, None, source.ip(), target);
    let snap = ctx.shared.store.current();
    let pod = ctx.workload(&snap);
    let mut trace = ConnTrace::new(&ctx.shared.telemetry, Direction::Inbound, source, target);
    trace.set_source(source_peer(&snap, source.ip(), None));
    trace.set_destination(Peer::Workload(pod.clone()));
    trace.set_security(SecurityPolicy::None);
    match check_inbound(&snap, &pod, None, source.ip(), target) {
        InboundVerdict::Allow => {}
        InboundVerdict::WrongTarget => {
            warn!(src = %source, %target, "plaintext connection not addressed to this pod; resetting");
            reset(stream);
            trace.finish(
                0,
                0,
                ConnectionOutcome::Failed,
                Some(ResponseFlag::NoRouteFound),
                Some("not addressed to this pod".into()),
            );
            return;
        }
        InboundVerdict::Denied { policy } => {
            let why = denial("unauthenticated plaintext client", policy.as_deref());
            warn!(src = %source, %target, reason = %why, "plaintext inbound connection denied");
            reset(stream);
            trace.finish(0, 0, ConnectionOutcome::Denied, None, Some(why));
            return;
        }
    }
    let app = tokio::time::timeout(
        APP_CONNECT_TIMEOUT,
        inpod::connect_in(&ctx.netns, target, Some(crate::MARK)),
    )
    .await;
    let mut app = match app {
        Ok(Ok(app)) => app,
        Ok(Err(error)) => {
            reset(stream);
            trace.finish(
                0,
                0,
                ConnectionOutcome::Failed,
                Some(ResponseFlag::UpstreamConnectionFailure),
                Some(error.to_string()),
            );
            return;
        }
        Err(_) => {
            reset(stream);
            trace.finish(
                0,
                0,
                ConnectionOutcome::Failed,
                Some(ResponseFlag::UpstreamConnectionFailure),
                Some("connect timed out".into()),
            );
            return;
        }
    };
    trace.opened();
    let counts = ByteCounts::default();
    let copied = tokio::select! {
        copied = splice_tcp(&mut stream, &mut app, &counts) => copied.map_err(|e| e.to_string()),
        () = admission.revoke.cancelled() => Err(admission.close_reason()),
    };
    match copied {
        Ok(()) => trace.finish(
            counts.sent(),
            counts.received(),
            ConnectionOutcome::Success,
            None,
            None,
        ),
        Err(error) => {
            reset(stream);
            trace.finish(
                counts.sent(),
                counts.received(),
                ConnectionOutcome::Failed,
                Some(ResponseFlag::UpstreamConnectionTermination),
                Some(error),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
  annotations: {strait.dev/netns: /run/netns/web}
spec: {nodeName: node-1, serviceAccountName: web}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: front
  annotations: {strait.dev/netns: /run/netns/client}
spec: {nodeName: node-1, serviceAccountName: client}
status: {podIP: 10.244.1.11}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-front, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [front]}}]
  - from: [{source: {ipBlocks: [192.0.2.0/24]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-banned, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/front/sa/banned]}}]
"#;

    #[test]
    fn inbound_table() {
        let snap = mesh_config::load_sources([("mesh.yaml", MESH)]).expect("compiles");
        let pod = snap
            .workload_by_ip("10.244.1.10".parse().expect("ip"))
            .expect("pod")
            .clone();
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let sa = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        let cases: Vec<(&str, Option<&str>, &str, &str, InboundVerdict)> = vec![
            (
                "allowed namespace",
                Some("spiffe://cluster.local/ns/front/sa/client"),
                "10.244.1.11",
                "10.244.1.10:80",
                InboundVerdict::Allow,
            ),
            (
                "authority is another address",
                Some("spiffe://cluster.local/ns/front/sa/client"),
                "10.244.1.11",
                "10.244.1.99:80",
                InboundVerdict::WrongTarget,
            ),
            (
                "DENY beats the namespace ALLOW",
                Some("spiffe://cluster.local/ns/front/sa/banned"),
                "10.244.1.11",
                "10.244.1.10:80",
                InboundVerdict::Denied {
                    policy: Some("shop/deny-banned".into()),
                },
            ),
            (
                "other namespace matches no ALLOW",
                Some("spiffe://cluster.local/ns/other/sa/x"),
                "10.244.1.11",
                "10.244.1.10:80",
                InboundVerdict::Denied { policy: None },
            ),
            (
                "plaintext from an allowed ipBlock on an allowed port",
                None,
                "192.0.2.7",
                "10.244.1.10:8080",
                InboundVerdict::Allow,
            ),
            (
                "plaintext from the ipBlock, other port",
                None,
                "192.0.2.7",
                "10.244.1.10:80",
                InboundVerdict::Denied { policy: None },
            ),
        ];
        for (what, principal, src, target, want) in cases {
            assert_eq!(
                check_inbound(&snap, &pod, principal, ip(src), sa(target)),
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn no_policy_allows() {
        let snap = mesh_config::load_sources([("mesh.yaml", MESH)]).expect("compiles");
        let client = snap
            .workload_by_ip("10.244.1.11".parse().expect("ip"))
            .expect("pod")
            .clone();
        assert_eq!(
            check_inbound(
                &snap,
                &client,
                None,
                "203.0.113.1".parse().expect("ip"),
                "10.244.1.11:80".parse().expect("addr")
            ),
            InboundVerdict::Allow
        );
    }

    #[test]
    fn source_labels_trust_only_matching_identity() {
        let snap = mesh_config::load_sources([("mesh.yaml", MESH)]).expect("compiles");
        let ip: IpAddr = "10.244.1.11".parse().expect("ip");
        let good = source_peer(&snap, ip, Some("spiffe://cluster.local/ns/front/sa/client"));
        assert_eq!(good.labels().workload, "client");
        let unauthenticated = source_peer(&snap, ip, None).labels();
        assert_eq!(
            (
                unauthenticated.workload.as_str(),
                unauthenticated.namespace.as_str(),
                unauthenticated.principal.as_str()
            ),
            ("client", "front", "")
        );
        let spoofed = source_peer(&snap, ip, Some("spiffe://cluster.local/ns/evil/sa/x")).labels();
        assert_eq!(
            (spoofed.workload.as_str(), spoofed.namespace.as_str()),
            ("", "evil")
        );
    }

    #[test]
    fn new_deny_revokes_live_connections() {
        let before = mesh_config::load_sources([("mesh.yaml", MESH)]).expect("compiles");
        let pod = before
            .workload_by_ip("10.244.1.10".parse().expect("ip"))
            .expect("pod")
            .clone();
        let force = CancellationToken::new();
        let live = LiveInbound::default();
        let client = "10.244.1.11".parse().expect("ip");
        let web: SocketAddr = "10.244.1.10:80".parse().expect("addr");
        let tunnel = live.admit(
            &force,
            Some("spiffe://cluster.local/ns/front/sa/client"),
            client,
            web,
        );
        let plaintext = live.admit(
            &force,
            None,
            "192.0.2.7".parse().expect("ip"),
            "10.244.1.10:8080".parse().expect("addr"),
        );
        let gone = live.admit(&force, None, client, web);
        drop(gone);
        assert_eq!(live.len(), 2, "a closed connection leaves the registry");
        // The same configuration: nothing changes.
        assert_eq!(recheck(&live, &before, &pod), 0);
        assert!(!tunnel.revoke.is_cancelled() && !plaintext.revoke.is_cancelled());

        // A DENY for the client's namespace: the tunnel goes, the plaintext client stays.
        let deny = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-front, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {namespaces: [front]}}]
"#;
        let after = mesh_config::load_sources([("mesh.yaml", MESH), ("deny.yaml", deny)])
            .expect("compiles");
        // The pod as the new snapshot has it: its policies are resolved per snapshot.
        let pod = after
            .workload_by_ip("10.244.1.10".parse().expect("ip"))
            .expect("pod")
            .clone();
        assert_eq!(recheck(&live, &after, &pod), 1);
        assert!(tunnel.revoke.is_cancelled());
        assert!(!plaintext.revoke.is_cancelled());
        assert!(
            tunnel.close_reason().contains("shop/deny-front"),
            "{}",
            tunnel.close_reason()
        );
        // Already closed: not counted twice.
        assert_eq!(recheck(&live, &after, &pod), 0);
        // The drain still closes the others, with the drain's reason.
        force.cancel();
        assert!(plaintext.revoke.is_cancelled());
        assert_eq!(plaintext.close_reason(), "drain period over");
    }

    #[test]
    fn registry_stays_within_twice_the_live_count() {
        let force = CancellationToken::new();
        let live = LiveInbound::default();
        let addr: SocketAddr = "10.244.1.10:80".parse().expect("addr");
        let kept = live.admit(&force, None, addr.ip(), addr);
        for _ in 0..10_000 {
            drop(live.admit(&force, None, addr.ip(), addr));
        }
        let entries = live.list.lock().expect("lock").entries.len();
        assert!(entries <= 128, "{entries} entries for one live connection");
        assert_eq!(live.len(), 1);
        drop(kept);
        assert_eq!(live.len(), 0);
    }
}
