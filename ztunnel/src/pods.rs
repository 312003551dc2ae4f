//! Per-pod lifecycle: enter the pod's network namespace, bind the listeners there, install the
//! redirect rules, serve; on removal stop accepting, remove the rules, let live connections
//! finish. Reconciled against every new snapshot.
//!
//! Order matters both ways: listeners are bound **before** the rules are installed (a redirect
//! to a port nobody listens on would reset the pod's connections) and the rules are removed
//! right after the listeners close. On ztunnel shutdown the rules stay: a pod whose ztunnel is
//! restarting gets resets rather than unproxied (unauthorised) traffic, and the next ztunnel
//! re-installs them idempotently, without duplicates. Every namespace that gets rules is
//! recorded in the [`crate::state`] ledger first, so that a pod which left the configuration
//! while ztunnel was down is cleaned at the next start ([`PodManager::sweep_stale`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use certs::SpiffeId;
use futures::future::BoxFuture;
use inpod::{CaptureConfig, CidrSelector, IpFamily, NetnsHandle, PortSelector};
use mesh_config::capture::{IpRanges, PortSet};
use mesh_config::{CaptureScope, Identity, NamespacedName, Snapshot, Workload};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::identity::spiffe;
use crate::proxy::Shared;
use crate::state::{Entry, StateStore};
use crate::{DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT, MARK, OUTBOUND_PORT};

/// What a served pod depends on; a change of anything but `capture` restarts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: NamespacedName,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
    pub capture: CaptureScope,
}

impl PodSpec {
    /// The spec of a workload this node should serve, `None` if it should not be served.
    pub fn of(w: &Workload) -> Option<PodSpec> {
        if !w.in_mesh() {
            return None;
        }
        Some(PodSpec {
            name: w.name.clone(),
            netns: w.netns.clone()?,
            ips: w.ips.clone(),
            identity: w.identity.clone(),
            capture: (*w.capture).clone(),
        })
    }
}

/// The pods `node` must serve: on the node, with a network namespace, not waypoints.
pub fn desired_pods(snap: &Snapshot, node: &str) -> BTreeMap<NamespacedName, PodSpec> {
    snap.workloads_on_node(node)
        .iter()
        .filter_map(|w| PodSpec::of(w))
        .map(|spec| (spec.name.clone(), spec))
        .collect()
}

/// What a reconcile does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub start: Vec<NamespacedName>,
    pub stop: Vec<NamespacedName>,
    /// Same pod, new namespace / addresses / identity.
    pub restart: Vec<NamespacedName>,
    /// Same pod, new capture scope: rules re-installed in place.
    pub update_rules: Vec<NamespacedName>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.start.is_empty()
            && self.stop.is_empty()
            && self.restart.is_empty()
            && self.update_rules.is_empty()
    }
}

/// The difference between what runs and what should.
pub fn plan(
    running: &BTreeMap<NamespacedName, PodSpec>,
    desired: &BTreeMap<NamespacedName, PodSpec>,
) -> Plan {
    let mut plan = Plan::default();
    for (name, want) in desired {
        match running.get(name) {
            None => plan.start.push(name.clone()),
            Some(have) if have == want => {}
            Some(have) => {
                let only_capture = PodSpec {
                    capture: want.capture.clone(),
                    ..have.clone()
                } == *want;
                if only_capture {
                    plan.update_rules.push(name.clone());
                } else {
                    plan.restart.push(name.clone());
                }
            }
        }
    }
    plan.stop = running
        .keys()
        .filter(|n| !desired.contains_key(*n))
        .cloned()
        .collect();
    plan
}

/// The redirect rules for a pod's capture scope.
///
/// The ruleset expresses the whole outbound scope in Istio's order (excluded ports, included
/// ports, excluded ranges, included ranges), so traffic outside it never reaches ztunnel.
pub fn capture_config(scope: &CaptureScope, families: &[IpFamily]) -> CaptureConfig {
    CaptureConfig {
        mark: MARK,
        outbound_port: OUTBOUND_PORT,
        inbound_plaintext_port: INBOUND_PLAINTEXT_PORT,
        hbone_port: HBONE_PORT,
        dns_port: DNS_PORT,
        families: families.to_vec(),
        scope: inpod::CaptureScope {
            include_outbound_cidrs: match &scope.include_outbound_ip_ranges {
                IpRanges::All => CidrSelector::All,
                IpRanges::Cidrs(nets) => CidrSelector::Only(nets.clone()),
            },
            exclude_outbound_cidrs: scope.exclude_outbound_ip_ranges.clone(),
            exclude_outbound_ports: scope.exclude_outbound_ports.clone(),
            include_outbound_ports: scope.include_outbound_ports.clone(),
            include_inbound_ports: match &scope.include_inbound_ports {
                PortSet::All => PortSelector::All,
                PortSet::Ports(ports) => PortSelector::Only(ports.clone()),
            },
            exclude_inbound_ports: scope.exclude_inbound_ports.clone(),
        },
        ..CaptureConfig::default()
    }
}

/// Why a pod could not be served.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("network namespace: {0}")]
    Netns(#[source] inpod::Error),
    #[error("listener on port {port}: {source}")]
    Listen {
        port: u16,
        #[source]
        source: inpod::Error,
    },
    #[error("capture rules: {0}")]
    Rules(#[source] inpod::Error),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("HBONE server: {0}")]
    Hbone(#[source] hbone::Error),
    #[error("DNS proxy: {0}")]
    Dns(#[source] dns_proxy::Error),
}

/// Everything a connection handler of one pod needs.
pub(crate) struct PodCtx {
    pub shared: Arc<Shared>,
    pub name: NamespacedName,
    /// The workload as it was when the pod started; handlers prefer the current snapshot's.
    pub workload: Arc<Workload>,
    pub spiffe: SpiffeId,
    pub ips: Vec<IpAddr>,
    pub netns: NetnsHandle,
    pub connector: Arc<NetnsConnector>,
    /// The node's resolvers, reached from this pod's namespace with the mark: used by the pod's
    /// DNS proxy and for ztunnel's own lookups of `resolution: DNS` hosts.
    pub dns_upstreams: dns_proxy::Upstreams,
    /// Cancelled to stop accepting.
    pub stop: CancellationToken,
    /// Cancelled to reset the connections still open after the drain period.
    pub force: CancellationToken,
    /// Live connections.
    pub tasks: TaskTracker,
    /// Live inbound connections with what they were admitted on, re-checked on new policies.
    pub live_inbound: crate::inbound::LiveInbound,
}

impl PodCtx {
    /// This pod's workload in `snap` (it may have changed labels or policies since start).
    pub fn workload(&self, snap: &Snapshot) -> Arc<Workload> {
        self.ips
            .first()
            .and_then(|ip| snap.workload_by_ip(*ip))
            .filter(|w| w.name == self.name)
            .cloned()
            .unwrap_or_else(|| self.workload.clone())
    }

    /// Spawns a connection handler, tracked for draining.
    pub fn spawn_conn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut);
    }
}

/// HBONE sockets created inside the pod's namespace with ztunnel's mark.
pub(crate) struct NetnsConnector {
    netns: NetnsHandle,
    source_ip: Option<IpAddr>,
}

impl hbone::Connector for NetnsConnector {
    fn connect(&self, dst: SocketAddr) -> BoxFuture<'_, std::io::Result<tokio::net::TcpStream>> {
        Box::pin(async move {
            let stream = inpod::connect_in(&self.netns, dst, Some(MARK))
                .await
                .map_err(std::io::Error::other)?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }

    fn source_ip(&self) -> Option<IpAddr> {
        // Distinct per pod, so pooled connections are never shared across namespaces.
        self.source_ip
    }
}

/// One served pod.
struct RunningPod {
    spec: PodSpec,
    ctx: Arc<PodCtx>,
    families: Vec<IpFamily>,
    /// Accept loops; they end soon after `ctx.stop` is cancelled.
    listeners: Vec<JoinHandle<()>>,
}

/// What the config dump shows of a pod.
#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    pub name: String,
    pub netns: String,
    pub ips: Vec<IpAddr>,
    pub identity: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub rule_families: Vec<&'static str>,
}

/// The served pods, reconciled against snapshots. Owned by one task.
pub(crate) struct PodManager {
    shared: Arc<Shared>,
    running: BTreeMap<NamespacedName, RunningPod>,
    /// Pods that could not be started, with why; retried on every resync.
    failed: BTreeMap<NamespacedName, (PodSpec, String)>,
    status: Arc<Mutex<Vec<PodStatus>>>,
    /// The namespaces that have our rules, across restarts.
    state: StateStore,
}

impl PodManager {
    pub fn new(shared: Arc<Shared>, status: Arc<Mutex<Vec<PodStatus>>>, state: StateStore) -> Self {
        PodManager {
            shared,
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
            status,
            state,
        }
    }

    /// Removes our rules from every namespace in the ledger that `snap` no longer serves: pods
    /// that left the configuration while no ztunnel was running. Call before the first
    /// [`reconcile`](Self::reconcile).
    pub async fn sweep_stale(&mut self, snap: &Snapshot) {
        let served: BTreeSet<PathBuf> = desired_pods(snap, &self.shared.node)
            .into_values()
            .map(|spec| spec.netns)
            .collect();
        let stale: Vec<(PathBuf, Entry)> = self
            .state
            .ledger()
            .stale(&served)
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        for (path, entry) in stale {
            if sweep_one(&path, &entry).await {
                self.state.forget(&path);
            }
        }
    }

    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Brings the served pods in line with `snap`.
    pub async fn reconcile(&mut self, snap: &Snapshot) {
        let desired = desired_pods(snap, &self.shared.node);
        let running: BTreeMap<NamespacedName, PodSpec> = self
            .running
            .iter()
            .map(|(n, p)| (n.clone(), p.spec.clone()))
            .collect();
        let plan = plan(&running, &desired);
        self.failed.retain(|name, _| desired.contains_key(name));
        if !plan.is_empty() {
            info!(
                start = plan.start.len(),
                stop = plan.stop.len(),
                restart = plan.restart.len(),
                update_rules = plan.update_rules.len(),
                "reconciling pods"
            );
        }
        for name in &plan.stop {
            if let Some(pod) = self.running.remove(name) {
                self.stop_pod(pod, true).await;
            }
        }
        for name in &plan.restart {
            if let Some(pod) = self.running.remove(name) {
                // Same namespace: the new start re-installs in place. A new one: the old
                // namespace must not keep redirecting to listeners that are gone.
                let moved = desired.get(name).is_none_or(|d| d.netns != pod.spec.netns);
                self.stop_pod(pod, moved).await;
            }
        }
        for name in &plan.update_rules {
            if let (Some(pod), Some(spec)) = (self.running.get_mut(name), desired.get(name)) {
                let cfg = capture_config(&spec.capture, &pod.families);
                match inpod::install_rules(&pod.ctx.netns, &cfg).await {
                    Ok(()) => {
                        info!(pod = %name, "capture scope updated");
                        pod.spec = spec.clone();
                    }
                    Err(error) => warn!(pod = %name, %error, "updating capture rules failed"),
                }
            }
        }
        for name in plan.start.iter().chain(&plan.restart) {
            let (Some(spec), Some(workload)) = (
                desired.get(name),
                snap.workloads_on_node(&self.shared.node)
                    .iter()
                    .find(|w| &w.name == name),
            ) else {
                continue;
            };
            self.start(spec.clone(), workload.clone()).await;
        }
        self.publish();
    }

    /// Checks the running pods' live inbound connections against `snap` and closes those its
    /// AuthorizationPolicies no longer allow (a new DENY must cut pooled tunnels too).
    pub fn recheck_inbound(&self, snap: &Snapshot) {
        for pod in self.running.values() {
            let workload = pod.ctx.workload(snap);
            crate::inbound::recheck(&pod.ctx.live_inbound, snap, &workload);
        }
    }

    /// Tries again the pods that failed to start (their namespace may exist by now).
    pub async fn retry_failed(&mut self, snap: &Snapshot) {
        let failed: Vec<PodSpec> = self.failed.values().map(|(s, _)| s.clone()).collect();
        for spec in failed {
            if let Some(workload) = snap
                .workloads_on_node(&self.shared.node)
                .iter()
                .find(|w| w.name == spec.name)
            {
                self.start(spec, workload.clone()).await;
            }
        }
        self.publish();
    }

    async fn start(&mut self, spec: PodSpec, workload: Arc<Workload>) {
        let name = spec.name.clone();
        match start_pod(self.shared.clone(), spec.clone(), workload, &mut self.state).await {
            Ok(pod) => {
                self.failed.remove(&name);
                self.running.insert(name, pod);
            }
            Err(error) => {
                let first = !self.failed.contains_key(&name);
                if first {
                    warn!(pod = %name, netns = %spec.netns.display(), %error, "cannot serve pod; will retry");
                } else {
                    debug!(pod = %name, %error, "pod still cannot be served");
                }
                self.failed.insert(name, (spec, error.to_string()));
            }
        }
    }

    /// Stops accepting, optionally removes the rules, and leaves live connections the drain
    /// period (in the background) before resetting them.
    async fn stop_pod(&mut self, pod: RunningPod, remove_rules: bool) {
        let name = pod.spec.name.clone();
        pod.ctx.stop.cancel();
        for listener in pod.listeners {
            let _ = listener.await;
        }
        if remove_rules {
            match inpod::remove_rules(&pod.ctx.netns, &pod.families).await {
                Ok(()) => {
                    info!(pod = %name, "capture rules removed");
                    self.state.forget(&pod.spec.netns);
                }
                // Kept in the ledger: the next start tries again.
                Err(error) => warn!(pod = %name, %error, "removing capture rules failed"),
            }
        }
        info!("stopped serving pod {name}");
        let drain = self.shared.drain;
        tokio::spawn(drain_connections(pod.ctx, drain));
    }

    /// Graceful shutdown: every pod stops accepting, connections get `drain` to finish, the
    /// rest are reset. Rules stay in place (see the module docs).
    pub async fn shutdown(mut self, drain: Duration) {
        let pods = std::mem::take(&mut self.running);
        let mut ctxs = Vec::new();
        for (_, pod) in pods {
            pod.ctx.stop.cancel();
            for listener in pod.listeners {
                let _ = listener.await;
            }
            ctxs.push(pod.ctx);
        }
        let live: usize = ctxs.iter().map(|c| c.tasks.len()).sum();
        info!(
            connections = live,
            ?drain,
            "listeners closed; draining connections"
        );
        futures::future::join_all(ctxs.into_iter().map(|ctx| drain_connections(ctx, drain))).await;
        self.publish();
    }

    fn publish(&self) {
        let mut status: Vec<PodStatus> = self
            .running
            .values()
            .map(|p| PodStatus {
                name: p.spec.name.to_string(),
                netns: p.spec.netns.display().to_string(),
                ips: p.spec.ips.clone(),
                identity: p.spec.identity.to_string(),
                state: "serving",
                error: None,
                rule_families: p.families.iter().map(|f| family_name(*f)).collect(),
            })
            .collect();
        status.extend(self.failed.values().map(|(spec, error)| PodStatus {
            name: spec.name.to_string(),
            netns: spec.netns.display().to_string(),
            ips: spec.ips.clone(),
            identity: spec.identity.to_string(),
            state: "failed",
            error: Some(error.clone()),
            rule_families: Vec::new(),
        }));
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }
}

fn family_name(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    }
}

async fn drain_connections(ctx: Arc<PodCtx>, drain: Duration) {
    ctx.tasks.close();
    if tokio::time::timeout(drain, ctx.tasks.wait()).await.is_err() {
        warn!(pod = %ctx.name, connections = ctx.tasks.len(), "drain period over; resetting the remaining connections");
        ctx.force.cancel();
        // Handlers reset their sockets as soon as they see the cancellation.
        let _ = tokio::time::timeout(Duration::from_secs(2), ctx.tasks.wait()).await;
    }
}

/// Removes the rules of a ledger entry. `true` when the entry can be forgotten: rules removed,
/// namespace gone, or the path now names another namespace (ours died with the old one).
async fn sweep_one(path: &Path, entry: &Entry) -> bool {
    let open = path.to_owned();
    let netns = match tokio::task::spawn_blocking(move || NetnsHandle::open(&open)).await {
        Ok(Ok(netns)) => netns,
        Ok(Err(error)) => {
            info!(netns = %path.display(), pod = %entry.pod, %error, "stale capture entry: namespace gone");
            return true;
        }
        Err(error) => {
            warn!(netns = %path.display(), %error, "opening a stale namespace failed");
            return false;
        }
    };
    if netns.id() != entry.netns_id() {
        info!(netns = %path.display(), pod = %entry.pod, "stale capture entry: the path names another namespace now; left alone");
        return true;
    }
    match inpod::remove_rules(&netns, &entry.ip_families()).await {
        Ok(()) => {
            info!(netns = %path.display(), pod = %entry.pod, "removed the capture rules of a pod no longer served");
            true
        }
        Err(error) => {
            warn!(netns = %path.display(), pod = %entry.pod, %error, "removing stale capture rules failed; will retry at next start");
            false
        }
    }
}

/// A TCP listener on `port` of every address in the pod: dual-stack `[::]` when the namespace
/// has IPv6, else `0.0.0.0`.
async fn listen_any(netns: &NetnsHandle, port: u16) -> Result<TcpListener, PodError> {
    match netns
        .tcp_listener(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
        .await
    {
        Ok(l) => Ok(l),
        Err(v6) => {
            debug!(port, error = %v6, "no IPv6 listener; trying IPv4");
            netns
                .tcp_listener(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
                .await
                .map_err(|source| PodError::Listen { port, source })
        }
    }
}

async fn start_pod(
    shared: Arc<Shared>,
    spec: PodSpec,
    workload: Arc<Workload>,
    state: &mut StateStore,
) -> Result<RunningPod, PodError> {
    let span = info_span!("pod", pod = %spec.name);
    async move {
        let path = spec.netns.clone();
        let netns = tokio::task::spawn_blocking(move || NetnsHandle::open(&path))
            .await
            .map_err(|e| PodError::Netns(inpod::Error::Thread {
                path: spec.netns.clone(),
                source: std::io::Error::other(e.to_string()),
            }))?
            .map_err(PodError::Netns)?;
        let id = spiffe(&spec.identity);
        shared.identities.ensure(&id).await?;
        let hbone_server = hbone::Server::new(shared.identities.manager(), &id, shared.hbone_config.clone())
            .map_err(PodError::Hbone)?;

        let outbound = listen_any(&netns, OUTBOUND_PORT).await?;
        let inbound = listen_any(&netns, INBOUND_PLAINTEXT_PORT).await?;
        let hbone_listener = listen_any(&netns, HBONE_PORT).await?;
        let dns = crate::dns::bind(&netns).await?;

        let ctx = Arc::new(PodCtx {
            connector: Arc::new(NetnsConnector {
                netns: netns.clone(),
                source_ip: spec.ips.first().copied(),
            }),
            dns_upstreams: crate::dns::upstreams(&netns, shared.dns_upstreams.clone()),
            shared: shared.clone(),
            name: spec.name.clone(),
            workload,
            spiffe: id,
            ips: spec.ips.clone(),
            netns: netns.clone(),
            stop: CancellationToken::new(),
            force: CancellationToken::new(),
            tasks: TaskTracker::new(),
            live_inbound: Default::default(),
        });
        let dns_proxy = crate::dns::proxy(&ctx).map_err(PodError::Dns)?;
        let here = tracing::Span::current();
        let listeners = vec![
            tokio::spawn(crate::outbound::serve(ctx.clone(), outbound).instrument(here.clone())),
            tokio::spawn(crate::inbound::serve_plaintext(ctx.clone(), inbound).instrument(here.clone())),
            tokio::spawn(crate::inbound::serve_hbone(ctx.clone(), hbone_listener, hbone_server).instrument(here.clone())),
            tokio::spawn(crate::dns::serve(ctx.clone(), dns_proxy, dns).instrument(here.clone())),
        ];

        // Rules last: by now every port they redirect to has a listener. Recorded before they
        // go in, so that a crash in between cannot leak them.
        let pod_name = spec.name.to_string();
        state.record(&spec.netns, Entry::new(pod_name.clone(), netns.id(), &IpFamily::ALL));
        let families = match install(&netns, &spec.capture).await {
            Ok(families) => families,
            Err(e) => {
                ctx.stop.cancel();
                for l in listeners {
                    let _ = l.await;
                }
                // Whatever half got in goes again; if even that fails the ledger keeps it.
                if inpod::remove_rules(&netns, &IpFamily::ALL).await.is_ok() {
                    state.forget(&spec.netns);
                }
                return Err(e);
            }
        };
        state.record(&spec.netns, Entry::new(pod_name, netns.id(), &families));
        info!(netns = %spec.netns.display(), ips = ?spec.ips, identity = %spec.identity, "serving pod {}", spec.name);
        Ok(RunningPod {
            spec,
            ctx,
            families,
            listeners,
        })
    }
    .instrument(span)
    .await
}

/// Installs the rules for IPv4 and, when the namespace supports it, IPv6.
async fn install(netns: &NetnsHandle, scope: &CaptureScope) -> Result<Vec<IpFamily>, PodError> {
    inpod::install_rules(netns, &capture_config(scope, &[IpFamily::V4]))
        .await
        .map_err(PodError::Rules)?;
    match inpod::install_rules(netns, &capture_config(scope, &[IpFamily::V6])).await {
        Ok(()) => Ok(vec![IpFamily::V4, IpFamily::V6]),
        Err(error) => {
            warn!(%error, "no IPv6 capture rules in this pod; IPv4 only");
            Ok(vec![IpFamily::V4])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(extra_pod_annotations: &str) -> Snapshot {
        let yaml = format!(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: default
  annotations:
    strait.dev/netns: /run/netns/a
{extra_pod_annotations}
spec: {{nodeName: node-1, serviceAccountName: sa-a}}
status: {{podIP: 10.244.1.10}}
---
apiVersion: v1
kind: Pod
metadata:
  name: b
  namespace: default
  annotations: {{strait.dev/netns: /run/netns/b}}
spec: {{nodeName: node-2}}
status: {{podIP: 10.244.2.10}}
---
apiVersion: v1
kind: Pod
metadata:
  name: no-netns
  namespace: default
spec: {{nodeName: node-1}}
status: {{podIP: 10.244.1.11}}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: default
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}
  annotations: {{strait.dev/netns: /run/netns/waypoint}}
spec: {{nodeName: node-1}}
status: {{podIP: 10.244.1.20}}
"#
        );
        mesh_config::load_sources([("pods.yaml", yaml.as_str())]).expect("compiles")
    }

    fn names(v: &[NamespacedName]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn desired_pods_are_this_nodes_captured_pods() {
        let s = snap("");
        let node1 = desired_pods(&s, "node-1");
        assert_eq!(
            node1.keys().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["default/a"]
        );
        let a = &node1[&NamespacedName::new("default", "a")];
        assert_eq!(a.netns, PathBuf::from("/run/netns/a"));
        assert_eq!(
            a.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/sa-a"
        );
        assert_eq!(desired_pods(&s, "node-2").len(), 1);
        assert!(desired_pods(&s, "node-3").is_empty());
    }

    #[test]
    fn plan_table() {
        let base = desired_pods(&snap(""), "node-1");
        let scoped = desired_pods(
            &snap("    traffic.sidecar.istio.io/excludeOutboundIPRanges: 192.0.2.0/24"),
            "node-1",
        );
        let mut moved = base.clone();
        for spec in moved.values_mut() {
            spec.netns = PathBuf::from("/run/netns/elsewhere");
        }
        let empty = BTreeMap::new();
        let cases = [
            (
                "nothing running",
                &empty,
                &base,
                vec!["default/a"],
                vec![],
                vec![],
                vec![],
            ),
            ("unchanged", &base, &base, vec![], vec![], vec![], vec![]),
            (
                "pod left",
                &base,
                &empty,
                vec![],
                vec!["default/a"],
                vec![],
                vec![],
            ),
            (
                "new netns",
                &base,
                &moved,
                vec![],
                vec![],
                vec!["default/a"],
                vec![],
            ),
            (
                "new scope",
                &base,
                &scoped,
                vec![],
                vec![],
                vec![],
                vec!["default/a"],
            ),
        ];
        for (what, running, desired, start, stop, restart, update) in cases {
            let p = plan(running, desired);
            assert_eq!(names(&p.start), start, "{what}: start");
            assert_eq!(names(&p.stop), stop, "{what}: stop");
            assert_eq!(names(&p.restart), restart, "{what}: restart");
            assert_eq!(names(&p.update_rules), update, "{what}: update");
        }
    }

    #[test]
    fn capture_config_maps_the_scope() {
        let s = snap(
            "    traffic.sidecar.istio.io/excludeOutboundIPRanges: 192.0.2.0/24\n    traffic.sidecar.istio.io/excludeInboundPorts: \"9090\"",
        );
        let spec = &desired_pods(&s, "node-1")[&NamespacedName::new("default", "a")];
        let cfg = capture_config(&spec.capture, &[IpFamily::V4]);
        cfg.validate().expect("valid");
        assert_eq!(cfg.mark, 0x539);
        assert_eq!(
            (
                cfg.outbound_port,
                cfg.inbound_plaintext_port,
                cfg.hbone_port,
                cfg.dns_port
            ),
            (15001, 15006, 15008, 15053)
        );
        assert_eq!(cfg.scope.include_outbound_cidrs, CidrSelector::All);
        assert_eq!(
            cfg.scope.exclude_outbound_cidrs,
            vec!["192.0.2.0/24".parse().expect("net")]
        );
        assert_eq!(cfg.scope.exclude_inbound_ports, vec![9090]);

        // includeOutboundPorts is passed to the rules as is; the ranges stay narrow.
        let s = snap(
            "    traffic.sidecar.istio.io/includeOutboundIPRanges: 10.0.0.0/8\n    traffic.sidecar.istio.io/excludeOutboundIPRanges: 10.1.0.0/16\n    traffic.sidecar.istio.io/includeOutboundPorts: \"9000\"",
        );
        let spec = &desired_pods(&s, "node-1")[&NamespacedName::new("default", "a")];
        let cfg = capture_config(&spec.capture, &[IpFamily::V4]);
        cfg.validate().expect("valid");
        assert_eq!(
            cfg.scope.include_outbound_cidrs,
            CidrSelector::Only(vec!["10.0.0.0/8".parse().expect("net")])
        );
        assert_eq!(
            cfg.scope.exclude_outbound_cidrs,
            vec!["10.1.0.0/16".parse().expect("net")]
        );
        assert_eq!(cfg.scope.include_outbound_ports, vec![9000]);
        // The rendered order matches the mesh's decision: port 9000 is captured before the
        // excluded range is looked at.
        let rules = inpod::render_rules(&cfg, IpFamily::V4);
        let redirect_9000 = rules
            .find("--dport 9000 -j REDIRECT --to-ports 15001")
            .expect("port 9000 redirected");
        let excluded_range = rules
            .find("-d 10.1.0.0/16 -j RETURN")
            .expect("range excluded");
        assert!(redirect_9000 < excluded_range, "{rules}");
        assert!(
            spec.capture
                .captures_outbound("10.1.0.1:9000".parse().expect("addr"))
        );
        assert!(
            spec.capture
                .captures_outbound("192.0.2.1:9000".parse().expect("addr"))
        );
        assert!(
            !spec
                .capture
                .captures_outbound("192.0.2.1:80".parse().expect("addr"))
        );
    }
}
