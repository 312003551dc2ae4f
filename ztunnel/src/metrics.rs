//! Per-connection telemetry: Istio's `istio_tcp_*` metrics and one JSON line on stdout per
//! closed connection ([`telemetry::ConnectionLogEntry`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

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

/// Metrics registry and connection log, shared by every pod. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    log: AccessLogger,
}

impl Telemetry {
    pub fn new(metrics: Arc<Metrics>, log: AccessLogger) -> Self {
        Telemetry { metrics, log }
    }

    /// Waits until every connection line logged so far is written.
    pub async fn flush(&self) {
        self.log.flush().await;
    }
}

/// `source_*` / `destination_*` labels of a workload, following Istio's label conventions
/// (canonical service from `service.istio.io/canonical-name`, then `app.kubernetes.io/name`,
/// then `app`; revision likewise from version labels, `latest` when none).
pub fn workload_labels(w: &Workload) -> WorkloadLabels {
    let label = |keys: &[&str]| keys.iter().find_map(|k| w.labels.get(*k)).cloned();
    let app = label(&["app", "app.kubernetes.io/name"]).unwrap_or_default();
    let version = label(&["version", "app.kubernetes.io/version"]).unwrap_or_default();
    let canonical_service = label(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or_else(|| w.name.name.clone());
    let canonical_revision = label(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_owned());
    WorkloadLabels {
        workload: w.name.name.clone(),
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

/// The telemetry of one connection, from accept to close.
pub struct ConnTrace {
    telemetry: Telemetry,
    started: Instant,
    pub entry: ConnectionLogEntry,
    pub labels: ConnectionLabels,
    counters: Option<ConnectionMetrics>,
}

impl ConnTrace {
    pub fn new(
        telemetry: &Telemetry,
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        let start = SystemTime::now();
        let reporter = match direction {
            Direction::Outbound => Reporter::Source,
            Direction::Inbound => Reporter::Destination,
        };
        let mut labels = ConnectionLabels::default();
        labels.traffic.reporter = reporter;
        ConnTrace {
            telemetry: telemetry.clone(),
            started: Instant::now(),
            entry: ConnectionLogEntry {
                start_time: start,
                direction,
                src_addr: src,
                dst_addr: dst,
                dst_hbone_addr: None,
                dst_service: None,
                src_identity: None,
                dst_identity: None,
                bytes_sent: 0,
                bytes_received: 0,
                duration_ms: 0,
                outcome: ConnectionOutcome::Success,
                response_flags: ResponseFlags::empty(),
                error: None,
            },
            labels,
            counters: None,
        }
    }

    pub fn set_source(&mut self, labels: WorkloadLabels) {
        if !labels.principal.is_empty() {
            self.entry.src_identity = Some(labels.principal.clone());
        }
        self.labels.traffic.source = labels;
    }

    pub fn set_destination(&mut self, labels: WorkloadLabels) {
        if !labels.principal.is_empty() {
            self.entry.dst_identity = Some(labels.principal.clone());
        }
        self.labels.traffic.destination = labels;
    }

    pub fn set_service(&mut self, service: &ServiceRef) {
        self.entry.dst_service = Some(service.hostname.clone());
        self.labels.traffic.destination_service = service_labels(service);
    }

    pub fn set_security(&mut self, policy: SecurityPolicy) {
        self.labels.traffic.connection_security_policy = policy;
    }

    /// Counts the connection as opened (once its labels are known).
    pub fn opened(&mut self) {
        if self.counters.is_none() {
            let counters = self.telemetry.metrics.connection(&self.labels);
            counters.opened();
            self.counters = Some(counters);
        }
    }

    /// Counts the close, adds the bytes and logs the connection line.
    pub fn finish(
        mut self,
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
                    let mut labels = self.labels.clone();
                    labels.response_flags = ResponseFlags::single(flag);
                    self.telemetry.metrics.tcp_closed(&labels);
                }
            }
        }
        self.entry.bytes_sent = sent;
        self.entry.bytes_received = received;
        self.entry.duration_ms =
            u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.entry.outcome = outcome;
        self.entry.response_flags = flag.map(ResponseFlags::single).unwrap_or_default();
        self.entry.error = error;
        let e = &self.entry;
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
        self.telemetry.log.log(&self.entry);
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

    #[tokio::test]
    async fn finish_counts_and_logs_one_line() {
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
        let tel = Telemetry::new(metrics.clone(), log);
        let snap = mesh();
        let w = snap
            .workload_by_ip("10.0.0.5".parse().expect("ip"))
            .expect("pod");
        let mut trace = ConnTrace::new(
            &tel,
            Direction::Outbound,
            "10.0.0.5:40000".parse().expect("addr"),
            "10.0.0.9:80".parse().expect("addr"),
        );
        trace.set_source(workload_labels(w));
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
