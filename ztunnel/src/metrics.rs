//! Per-connection telemetry: Istio's `istio_tcp_*` metrics and one JSON line on stdout per
//! closed connection ([`telemetry::ConnectionLogEntry`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use mesh_config::Workload;
use telemetry::{
    AccessLogger, ConnectionLabels, ConnectionLogEntry, ConnectionMetrics, ConnectionOutcome,
    Direction, Metrics, Reporter, ResponseFlag, ResponseFlags, SecurityPolicy, ServiceLabels,
    WorkloadLabels,
};
use tracing::{info, warn};

use crate::outbound::ServiceRef;

/// Istio's default cluster name (`k8s.cluster.name`, `*_cluster` labels).
pub const CLUSTER_NAME: &str = "Kubernetes";

/// Metrics registry and connection log, shared by every pod. Cheap to clone: one pointer,
/// since every open connection holds a clone.
#[derive(Clone, Debug)]
pub struct Telemetry {
    inner: Arc<TelemetryInner>,
}

#[derive(Debug)]
struct TelemetryInner {
    metrics: Arc<Metrics>,
    log: AccessLogger,
}

impl Telemetry {
    pub fn new(metrics: Arc<Metrics>, log: AccessLogger) -> Self {
        Telemetry {
            inner: Arc::new(TelemetryInner { metrics, log }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Waits until every connection line logged so far is written.
    pub async fn flush(&self) {
        self.inner.log.flush().await;
    }
}

/// Label that names a pod's workload outright (Istio's `service.istio.io/workload-name`).
const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";
/// Label Deployments put on their pods; their ReplicaSet is `<deployment>-<hash>`.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// The same for Argo Rollouts.
const ROLLOUTS_POD_TEMPLATE_HASH: &str = "rollouts-pod-template-hash";

/// The workload a pod belongs to: its name and kind (`Deployment`, `StatefulSet`, …, `Pod`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadMeta {
    pub name: String,
    pub kind: String,
}

/// Names a pod's workload the way Istio does (`GetWorkloadMetaFromPod`), so that
/// `source_workload` / `destination_workload` group replicas the same way:
///
/// 1. the `service.istio.io/workload-name` label, when set;
/// 2. for a pod with a generated name, its controller: a ReplicaSet `<name>-<pod-template-hash>`
///    is Deployment `<name>` (likewise Argo Rollouts), a ReplicationController with a
///    `deploymentconfig` label is that DeploymentConfig, a Job `<name>-<8 to 10 digits>` is
///    CronJob `<name>`, any other controller names the workload itself;
/// 3. otherwise the pod's own name (StatefulSet pods, bare pods).
///
/// Beyond Istio, for configuration written by hand without `ownerReferences`: a generated name
/// without a controller gives its `generateName` prefix, and a pod named
/// `<name>-<pod-template-hash>-<suffix>` gives Deployment `<name>`. Istio would report such pods
/// by their pod name, splitting one workload into one series per replica.
pub fn workload_meta(w: &Workload) -> WorkloadMeta {
    let meta = derive_workload(w);
    match w.labels.get(WORKLOAD_NAME_LABEL).filter(|n| !n.is_empty()) {
        Some(name) => WorkloadMeta {
            name: name.clone(),
            ..meta
        },
        None => meta,
    }
}

fn derive_workload(w: &Workload) -> WorkloadMeta {
    let pod = &w.name.name;
    let meta = |name: &str, kind: &str| WorkloadMeta {
        name: if name.is_empty() {
            pod.clone()
        } else {
            name.to_owned()
        },
        kind: kind.to_owned(),
    };
    let label = |key: &str| {
        w.labels
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    // "<name>-<hash>" → "<name>", when the hash really is the suffix.
    let trim_hash = |owner: &str, hash: &str| {
        owner
            .strip_suffix(hash)
            .and_then(|rest| rest.strip_suffix('-'))
            .map(str::to_owned)
    };
    if let (Some(_), Some(ctl)) = (&w.generate_name, &w.controller) {
        return match ctl.kind.as_str() {
            "ReplicaSet" => {
                if let Some(name) = label(POD_TEMPLATE_HASH).and_then(|h| trim_hash(&ctl.name, h)) {
                    meta(&name, "Deployment")
                } else if let Some(name) =
                    label(ROLLOUTS_POD_TEMPLATE_HASH).and_then(|h| trim_hash(&ctl.name, h))
                {
                    meta(&name, "Rollout")
                } else {
                    meta(&ctl.name, "ReplicaSet")
                }
            }
            "ReplicationController" => match label("deploymentconfig") {
                Some(dc) => meta(dc, "DeploymentConfig"),
                None => meta(&ctl.name, &ctl.kind),
            },
            "Job" => match cron_job_name(&ctl.name) {
                Some(name) => meta(name, "CronJob"),
                None => meta(&ctl.name, "Job"),
            },
            kind => meta(&ctl.name, kind),
        };
    }
    if let Some(prefix) = w.generate_name.as_deref() {
        let prefix = prefix.trim_end_matches('-');
        if !prefix.is_empty() {
            return meta(prefix, "Pod");
        }
    }
    if let Some(hash) = label(POD_TEMPLATE_HASH)
        && let Some((name, _suffix)) = pod.split_once(&format!("-{hash}-"))
        && !name.is_empty()
    {
        return meta(name, "Deployment");
    }
    meta(pod, "Pod")
}

/// `<name>` of a Job `<name>-<8 to 10 digits>` (the scheduled time a CronJob appends).
fn cron_job_name(job: &str) -> Option<&str> {
    let (name, stamp) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (digits && !name.is_empty()).then_some(name)
}

/// `source_*` / `destination_*` labels of a workload, following Istio's label conventions:
/// workload from [`workload_meta`]; canonical service from `service.istio.io/canonical-name`,
/// then `app.kubernetes.io/name`, then `app`, else the workload name; revision likewise from
/// version labels, `latest` when none.
pub fn workload_labels(w: &Workload) -> WorkloadLabels {
    let label = |keys: &[&str]| keys.iter().find_map(|k| w.labels.get(*k)).cloned();
    let workload = workload_meta(w).name;
    let app = label(&["app", "app.kubernetes.io/name"]).unwrap_or_default();
    let version = label(&["version", "app.kubernetes.io/version"]).unwrap_or_default();
    let canonical_service = label(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or_else(|| workload.clone());
    let canonical_revision = label(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_owned());
    WorkloadLabels {
        workload,
        namespace: w.name.namespace.clone(),
        principal: w.identity.to_string(),
        app,
        version,
        canonical_service,
        canonical_revision,
        cluster: CLUSTER_NAME.to_owned(),
    }
}

/// A peer known only by its SPIFFE identity.
pub fn principal_labels(principal: &str) -> WorkloadLabels {
    let namespace = mesh_config::Identity::parse(principal)
        .map(|id| id.namespace)
        .unwrap_or_default();
    WorkloadLabels {
        principal: principal.to_owned(),
        namespace,
        ..WorkloadLabels::default()
    }
}

pub fn service_labels(service: &ServiceRef) -> ServiceLabels {
    ServiceLabels {
        host: service.hostname.clone(),
        name: service.name.name.clone(),
        namespace: service.name.namespace.clone(),
    }
}

/// One end of a connection as the telemetry names it. Kept as a shared reference to the
/// snapshot's workload (or the peer's identity) rather than as rendered labels: an idle
/// connection would otherwise hold a dozen label strings until it closes. Rendered when the
/// connection is counted and when it is logged, from the same workload, so the values are
/// those of connect time.
#[derive(Debug, Clone, Default)]
pub enum Peer {
    /// Nothing is known: empty labels.
    #[default]
    Unknown,
    /// A workload of the mesh: all of [`workload_labels`].
    Workload(Arc<Workload>),
    /// A workload guessed from an unauthenticated address: its workload name and namespace,
    /// never a principal.
    Unauthenticated(Arc<Workload>),
    /// Known only by its SPIFFE identity ([`principal_labels`]). Boxed twice: a thin pointer
    /// keeps every `Peer` (two per open connection) at 16 bytes instead of 24.
    Principal(Box<Box<str>>),
}

impl Peer {
    /// A peer known only by its SPIFFE identity.
    pub fn principal_only(identity: impl Into<Box<str>>) -> Self {
        Peer::Principal(Box::new(identity.into()))
    }

    /// The metric labels of this end.
    pub fn labels(&self) -> WorkloadLabels {
        match self {
            Peer::Unknown => WorkloadLabels::default(),
            Peer::Workload(w) => workload_labels(w),
            Peer::Unauthenticated(w) => WorkloadLabels {
                workload: workload_meta(w).name,
                namespace: w.name.namespace.clone(),
                ..WorkloadLabels::default()
            },
            Peer::Principal(p) => principal_labels(p),
        }
    }

    /// The `principal` label, for the log's identity fields (`None` when empty).
    fn principal(&self) -> Option<String> {
        match self {
            Peer::Workload(w) => Some(w.identity.to_string()),
            Peer::Principal(p) if !p.is_empty() => Some(p.to_string()),
            _ => None,
        }
    }
}

/// The telemetry of one connection, from accept to close.
///
/// It lives as long as the connection, so it holds only what the metric labels and the log
/// line are made from (addresses, shared workloads, flags) and renders both when needed: the
/// labels when the connection is counted as opened (and again for a close with response
/// flags), the log line at close. `connection_trace_stays_small` guards its size.
pub struct ConnTrace {
    telemetry: Telemetry,
    /// Monotonic ([`monotonic_nanos`]), for the duration; the logged wall-clock start is
    /// derived from it at close (now minus the duration), which saves a second timestamp.
    started: u64,
    src: Addr,
    dst: Addr,
    dst_hbone: Option<Addr>,
    source: Peer,
    destination: Peer,
    /// Boxed: most connections have none, and the box is smaller than the reference inline.
    service: Option<Box<ServiceRef>>,
    counters: Option<ConnectionMetrics>,
    direction: Direction,
    security: SecurityPolicy,
}

/// Nanoseconds on a monotonic clock (since its first use): 8 bytes where an `Instant` is 16.
fn monotonic_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    u64::try_from(BASE.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A socket address as IP and port: 20 bytes where a `SocketAddr` takes 32. The addresses a
/// connection logs carry no IPv6 flow label or scope (they are canonical, or parsed from an
/// authority, which cannot name a scope), so nothing is lost.
#[derive(Debug, Clone, Copy)]
struct Addr {
    ip: IpAddr,
    port: u16,
}

impl From<SocketAddr> for Addr {
    fn from(addr: SocketAddr) -> Self {
        Addr {
            ip: addr.ip(),
            port: addr.port(),
        }
    }
}

impl From<Addr> for SocketAddr {
    fn from(addr: Addr) -> Self {
        SocketAddr::new(addr.ip, addr.port)
    }
}

impl ConnTrace {
    pub fn new(
        telemetry: &Telemetry,
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        ConnTrace {
            telemetry: telemetry.clone(),
            started: monotonic_nanos(),
            src: src.into(),
            dst: dst.into(),
            dst_hbone: None,
            source: Peer::Unknown,
            destination: Peer::Unknown,
            service: None,
            counters: None,
            direction,
            security: SecurityPolicy::default(),
        }
    }

    pub fn set_source(&mut self, source: Peer) {
        self.source = source;
    }

    pub fn set_destination(&mut self, destination: Peer) {
        self.destination = destination;
    }

    pub fn set_service(&mut self, service: ServiceRef) {
        self.service = Some(Box::new(service));
    }

    pub fn set_security(&mut self, policy: SecurityPolicy) {
        self.security = policy;
    }

    /// The HBONE address (`ip:15008`) the connection was carried to or came in on.
    pub fn set_hbone_addr(&mut self, addr: SocketAddr) {
        self.dst_hbone = Some(addr.into());
    }

    /// The metric labels of this connection.
    fn labels(&self) -> ConnectionLabels {
        let mut labels = ConnectionLabels::default();
        labels.traffic.reporter = match self.direction {
            Direction::Outbound => Reporter::Source,
            Direction::Inbound => Reporter::Destination,
        };
        labels.traffic.source = self.source.labels();
        labels.traffic.destination = self.destination.labels();
        if let Some(service) = &self.service {
            labels.traffic.destination_service = service_labels(service);
        }
        labels.traffic.connection_security_policy = self.security;
        labels
    }

    /// Counts the connection as opened (once its labels are known).
    pub fn opened(&mut self) {
        if self.counters.is_none() {
            let counters = self.telemetry.inner.metrics.connection(&self.labels());
            counters.opened();
            self.counters = Some(counters);
        }
    }

    /// Counts the close, adds the bytes and logs the connection line.
    pub fn finish(
        self,
        sent: u64,
        received: u64,
        outcome: ConnectionOutcome,
        flag: Option<ResponseFlag>,
        error: Option<String>,
    ) {
        self.finish_verified(None, sent, received, outcome, flag, error);
    }

    /// [`ConnTrace::finish`], logging `verified` (the identity the destination proved, the
    /// HBONE peer's certificate) as `dst_identity` instead of the destination's principal.
    /// Given at the end, so an idle connection does not hold the string.
    pub fn finish_verified(
        mut self,
        verified: Option<String>,
        sent: u64,
        received: u64,
        outcome: ConnectionOutcome,
        flag: Option<ResponseFlag>,
        error: Option<String>,
    ) {
        self.opened();
        if let Some(counters) = &self.counters {
            counters.add_sent(sent);
            counters.add_received(received);
            match flag {
                None => counters.closed(),
                Some(flag) => {
                    let mut labels = self.labels();
                    labels.response_flags = ResponseFlags::single(flag);
                    self.telemetry.inner.metrics.tcp_closed(&labels);
                }
            }
        }
        let duration = Duration::from_nanos(monotonic_nanos().saturating_sub(self.started));
        let now = SystemTime::now();
        let entry = ConnectionLogEntry {
            start_time: now.checked_sub(duration).unwrap_or(now),
            direction: self.direction,
            src_addr: self.src.into(),
            dst_addr: self.dst.into(),
            dst_hbone_addr: self
                .dst_hbone
                .map(|addr| SocketAddr::from(addr).to_string()),
            dst_service: self.service.as_ref().map(|s| s.hostname.clone()),
            src_identity: self.source.principal(),
            dst_identity: verified.or_else(|| self.destination.principal()),
            bytes_sent: sent,
            bytes_received: received,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            outcome,
            response_flags: flag.map(ResponseFlags::single).unwrap_or_default(),
            error,
        };
        let e = &entry;
        match outcome {
            ConnectionOutcome::Success => info!(
                direction = ?e.direction, src = %e.src_addr, dst = %e.dst_addr,
                sent, received, duration_ms = e.duration_ms, "connection closed"
            ),
            _ => warn!(
                direction = ?e.direction, src = %e.src_addr, dst = %e.dst_addr, ?outcome,
                error = e.error.as_deref().unwrap_or(""), "connection failed"
            ),
        }
        self.telemetry.inner.log.log(&entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> mesh_config::Snapshot {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels: {app: web, version: v2}
spec: {serviceAccountName: web}
status: {podIP: 10.0.0.5}
"#;
        mesh_config::load_sources([("pod.yaml", yaml)]).expect("compiles")
    }

    #[test]
    fn workload_labels_follow_istio() {
        let snap = mesh();
        let w = snap
            .workload_by_ip("10.0.0.5".parse().expect("ip"))
            .expect("pod");
        let l = workload_labels(w);
        assert_eq!(l.workload, "web-0");
        assert_eq!(l.namespace, "shop");
        assert_eq!(l.principal, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!((l.app.as_str(), l.version.as_str()), ("web", "v2"));
        assert_eq!(
            (l.canonical_service.as_str(), l.canonical_revision.as_str()),
            ("web", "v2")
        );
        assert_eq!(
            principal_labels("spiffe://cluster.local/ns/a/sa/b").namespace,
            "a"
        );
    }

    /// One pod per case: name, generateName, controller (kind, name), labels.
    fn pod(
        name: &str,
        generate_name: Option<&str>,
        controller: Option<(&str, &str)>,
        labels: &[(&str, &str)],
    ) -> Workload {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\nstatus: {{podIP: 10.0.0.5}}\n"
        );
        let snap = mesh_config::load_sources([("pod.yaml", yaml.as_str())]).expect("compiles");
        let mut w = snap
            .workload_by_ip("10.0.0.5".parse().expect("ip"))
            .expect("pod")
            .as_ref()
            .clone();
        w.generate_name = generate_name.map(str::to_owned);
        w.controller = controller.map(|(kind, name)| mesh_config::Controller {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
        });
        w.labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        w
    }

    #[test]
    fn workload_names_follow_istio() {
        let hash = [("pod-template-hash", "7d4b9c8f6")];
        let cases: &[(&str, Workload, &str, &str)] = &[
            (
                "deployment: ReplicaSet name minus the template hash",
                pod(
                    "web-7d4b9c8f6-x2x4z",
                    Some("web-7d4b9c8f6-"),
                    Some(("ReplicaSet", "web-7d4b9c8f6")),
                    &hash,
                ),
                "web",
                "Deployment",
            ),
            (
                "ReplicaSet whose name does not end with the hash",
                pod("rs-abcde", Some("rs-"), Some(("ReplicaSet", "rs")), &hash),
                "rs",
                "ReplicaSet",
            ),
            (
                "bare ReplicaSet",
                pod("rs-abcde", Some("rs-"), Some(("ReplicaSet", "rs")), &[]),
                "rs",
                "ReplicaSet",
            ),
            (
                "Argo Rollout",
                pod(
                    "ro-5f6d-abcde",
                    Some("ro-5f6d-"),
                    Some(("ReplicaSet", "ro-5f6d")),
                    &[("rollouts-pod-template-hash", "5f6d")],
                ),
                "ro",
                "Rollout",
            ),
            (
                "DeploymentConfig",
                pod(
                    "dc-1-abcde",
                    Some("dc-1-"),
                    Some(("ReplicationController", "dc-1")),
                    &[("deploymentconfig", "dc")],
                ),
                "dc",
                "DeploymentConfig",
            ),
            (
                "CronJob: Job name minus the schedule stamp",
                pod(
                    "backup-28000000-abcde",
                    Some("backup-28000000-"),
                    Some(("Job", "backup-28000000")),
                    &[],
                ),
                "backup",
                "CronJob",
            ),
            (
                "plain Job",
                pod("once-abcde", Some("once-"), Some(("Job", "once")), &[]),
                "once",
                "Job",
            ),
            (
                "DaemonSet",
                pod(
                    "agent-abcde",
                    Some("agent-"),
                    Some(("DaemonSet", "agent")),
                    &[],
                ),
                "agent",
                "DaemonSet",
            ),
            (
                "StatefulSet pods have no generated name: the pod name",
                pod("db-0", None, Some(("StatefulSet", "db")), &[]),
                "db-0",
                "Pod",
            ),
            (
                "generated name without a controller: the prefix",
                pod("batch-x7k2p", Some("batch-"), None, &[]),
                "batch",
                "Pod",
            ),
            (
                "hand-written deployment pod without owner: name minus hash and suffix",
                pod("web-7d4b9c8f6-x2x4z", None, None, &hash),
                "web",
                "Deployment",
            ),
            (
                "hash label that is not in the name",
                pod("web-0", None, None, &hash),
                "web-0",
                "Pod",
            ),
            ("bare pod", pod("sleep", None, None, &[]), "sleep", "Pod"),
            (
                "workload-name label wins",
                pod(
                    "web-7d4b9c8f6-x2x4z",
                    Some("web-7d4b9c8f6-"),
                    Some(("ReplicaSet", "web-7d4b9c8f6")),
                    &[
                        ("pod-template-hash", "7d4b9c8f6"),
                        ("service.istio.io/workload-name", "storefront"),
                    ],
                ),
                "storefront",
                "Deployment",
            ),
        ];
        for (what, w, name, kind) in cases {
            let got = workload_meta(w);
            assert_eq!(
                (got.name.as_str(), got.kind.as_str()),
                (*name, *kind),
                "{what}"
            );
        }
    }

    #[test]
    fn canonical_service_falls_back_to_the_workload_name() {
        let hash = [("pod-template-hash", "7d4b9c8f6")];
        /// What, extra labels, canonical service, canonical revision.
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case<'_>] = &[
            ("no app labels: the workload", &[], "web", "latest"),
            ("app", &[("app", "shop"), ("version", "v1")], "shop", "v1"),
            (
                "app.kubernetes.io/name beats app",
                &[
                    ("app", "a"),
                    ("app.kubernetes.io/name", "b"),
                    ("app.kubernetes.io/version", "2"),
                ],
                "b",
                "2",
            ),
            (
                "canonical labels beat both",
                &[
                    ("app", "a"),
                    ("app.kubernetes.io/name", "b"),
                    ("service.istio.io/canonical-name", "c"),
                    ("service.istio.io/canonical-revision", "r"),
                    ("version", "v"),
                ],
                "c",
                "r",
            ),
        ];
        for (what, extra, service, revision) in cases {
            let labels: Vec<(&str, &str)> = hash.iter().chain(extra.iter()).copied().collect();
            let w = pod(
                "web-7d4b9c8f6-x2x4z",
                Some("web-7d4b9c8f6-"),
                Some(("ReplicaSet", "web-7d4b9c8f6")),
                &labels,
            );
            let l = workload_labels(&w);
            assert_eq!(l.workload, "web", "{what}");
            assert_eq!(
                (l.canonical_service.as_str(), l.canonical_revision.as_str()),
                (*service, *revision),
                "{what}"
            );
        }
    }

    /// Every open connection holds its trace (inline, in its task): it keeps the inputs of its
    /// labels and log line, not the rendered strings (it was 770 bytes plus ~20 strings), as
    /// compactly as they go (264 bytes with `SocketAddr`s, two timestamps and a second
    /// telemetry pointer).
    #[test]
    fn connection_trace_stays_small() {
        let size = std::mem::size_of::<ConnTrace>();
        assert!(size <= 152, "ConnTrace: {size} bytes");
    }

    /// Telemetry whose connection log lines can be read back.
    fn capture() -> (Telemetry, Arc<Metrics>, std::sync::mpsc::Receiver<Vec<u8>>) {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        struct Sink(std::sync::mpsc::Sender<Vec<u8>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.send(buf.to_vec());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let log = AccessLogger::to_writer(Sink(tx)).expect("logger");
        (Telemetry::new(metrics.clone(), log), metrics, rx)
    }

    /// An outbound connection from the test pod (10.0.0.5) to `dst`, its source set.
    fn pod_trace(tel: &Telemetry, dst: &str) -> ConnTrace {
        let snap = mesh();
        let w = snap
            .workload_by_ip("10.0.0.5".parse().expect("ip"))
            .expect("pod");
        let mut trace = ConnTrace::new(
            tel,
            Direction::Outbound,
            "10.0.0.5:40000".parse().expect("addr"),
            dst.parse().expect("addr"),
        );
        trace.set_source(Peer::Workload(w.clone()));
        trace
    }

    #[tokio::test]
    async fn finish_renders_tunnel_fields_and_flagged_closes() {
        let (tel, metrics, rx) = capture();
        let mut trace = pod_trace(&tel, "240.240.0.1:443");
        trace.set_service(ServiceRef {
            hostname: "api.example.com".into(),
            name: mesh_config::NamespacedName {
                namespace: "egress".into(),
                name: "api".into(),
            },
            kind: mesh_config::snapshot::ServiceKind::ServiceEntry,
        });
        trace.set_hbone_addr("10.0.0.20:15008".parse().expect("addr"));
        trace.set_destination(Peer::principal_only(
            "spiffe://cluster.local/ns/egress/sa/expected",
        ));
        trace.set_security(SecurityPolicy::MutualTls);
        trace.opened();
        // The identity the peer proved replaces the expected one in the log.
        trace.finish_verified(
            Some("spiffe://cluster.local/ns/egress/sa/waypoint".into()),
            7,
            0,
            ConnectionOutcome::Failed,
            Some(ResponseFlag::UpstreamConnectionTermination),
            Some("cut".into()),
        );
        tel.flush().await;
        let line: Vec<u8> = rx.try_iter().flatten().collect();
        let json: serde_json::Value = serde_json::from_slice(&line).expect("one JSON line");
        assert_eq!(json["dst_hbone_addr"], "10.0.0.20:15008");
        assert_eq!(json["dst_service"], "api.example.com");
        assert_eq!(
            json["dst_identity"],
            "spiffe://cluster.local/ns/egress/sa/waypoint"
        );
        assert_eq!(
            json["src_identity"],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(json["error"], "cut");
        let text = metrics.encode_text().expect("encode");
        // Opened with the labels of connect time; closed with the same labels plus the flag.
        let opened = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .expect("opened");
        let closed = text
            .lines()
            .find(|l| {
                l.starts_with("istio_tcp_connections_closed_total{")
                    && l.contains("response_flags=\"UC\"")
            })
            .expect("a close counted with the flag");
        for needle in [
            "destination_service=\"api.example.com\"",
            "destination_service_name=\"api\"",
            "destination_service_namespace=\"egress\"",
            "destination_principal=\"spiffe://cluster.local/ns/egress/sa/expected\"",
            "destination_workload_namespace=\"egress\"",
            "source_workload=\"web-0\"",
        ] {
            assert!(opened.contains(needle), "missing {needle} in {opened}");
            assert!(closed.contains(needle), "missing {needle} in {closed}");
        }
        assert!(closed.ends_with(" 1"), "{closed}");
        assert!(opened.contains("response_flags=\"-\""), "{opened}");
    }

    #[tokio::test]
    async fn finish_counts_and_logs_one_line() {
        let (tel, metrics, rx) = capture();
        let mut trace = pod_trace(&tel, "10.0.0.9:80");
        trace.set_security(SecurityPolicy::MutualTls);
        trace.finish(100, 2000, ConnectionOutcome::Success, None, None);
        tel.flush().await;
        let line: Vec<u8> = rx.try_iter().flatten().collect();
        let json: serde_json::Value = serde_json::from_slice(&line).expect("one JSON line");
        assert_eq!(json["bytes_sent"], 100);
        assert_eq!(json["bytes_received"], 2000);
        assert_eq!(
            json["src_identity"],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        let text = metrics.encode_text().expect("encode");
        for needle in [
            "istio_tcp_connections_opened_total{",
            "istio_tcp_connections_closed_total{",
            "istio_tcp_sent_bytes_total{",
            "reporter=\"source\"",
            "source_workload=\"web-0\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_received_bytes_total{") && l.ends_with(" 2000")),
            "{text}"
        );
    }
}
