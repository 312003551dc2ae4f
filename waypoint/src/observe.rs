//! Access-log entries and metric labels shaped like Istio's waypoint (Envoy) telemetry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use mesh_config::model::Labels;
use mesh_config::snapshot::ServiceKind;
use mesh_config::{Service, Snapshot};
use telemetry::{
    AccessLogEntry, ConnectionLabels, Metrics, Reporter, RequestLabelsRef, RequestProtocol,
    ResponseFlags, SecurityPolicy, ServiceLabels, ServiceLabelsRef, TrafficLabels, WorkloadLabels,
    WorkloadLabelsRef,
};

use crate::http::Downstream;
use crate::http::body::BodyEnd;
use crate::proxy::Proxy;

/// `route_name` when the request matched no named VirtualService route.
pub const DEFAULT_ROUTE_NAME: &str = "default";

/// The `source_*` labels: the peer's verified identity, plus the workload found by the original
/// client IP when it runs as that identity (a forged `forwarded` cannot borrow another pod's
/// labels).
pub fn source_labels(snap: &Snapshot, downstream: &Downstream) -> WorkloadLabels {
    let id = &downstream.peer_identity;
    let mut labels = WorkloadLabels {
        principal: id.to_string(),
        namespace: id.namespace.clone(),
        ..WorkloadLabels::default()
    };
    if let Some(w) = verified_source_workload(snap, downstream) {
        labels.workload = w
            .labels
            .get("app")
            .cloned()
            .unwrap_or_else(|| w.name.name.clone());
        labels.app = w.labels.get("app").cloned().unwrap_or_default();
        labels.version = w.labels.get("version").cloned().unwrap_or_default();
        labels.canonical_service = canonical_service(&w.labels, &w.name.name);
        labels.canonical_revision = canonical_revision(&w.labels);
    }
    labels
}

/// The source workload's labels for routing matches, under the same identity check.
pub fn source_workload_labels<'s>(
    snap: &'s Snapshot,
    downstream: &Downstream,
) -> Option<&'s Labels> {
    verified_source_workload(snap, downstream).map(|w| &w.labels)
}

/// The workload at the original client IP, if it runs as the tunnel's verified identity.
/// Compared field by field: this runs per request, and rendering both URIs allocated twice.
fn verified_source_workload<'s>(
    snap: &'s Snapshot,
    downstream: &Downstream,
) -> Option<&'s Arc<mesh_config::Workload>> {
    let id = &downstream.peer_identity;
    downstream
        .client
        .and_then(|c| snap.workload_by_ip(c.ip()))
        .filter(|w| {
            w.identity.trust_domain == id.trust_domain
                && w.identity.namespace == id.namespace
                && w.identity.service_account == id.service_account
        })
}

fn canonical_service(labels: &Labels, fallback: &str) -> String {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| fallback.to_owned())
}

fn canonical_revision(labels: &Labels) -> String {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| "latest".to_owned())
}

/// The `destination_service*` labels of a service (Istio names ServiceEntries by host).
pub fn service_labels(service: &Service) -> ServiceLabels {
    ServiceLabels {
        host: service.hostname.clone(),
        name: match service.kind {
            ServiceKind::Service => service.name.name.clone(),
            ServiceKind::ServiceEntry => service.hostname.clone(),
        },
        namespace: service.name.namespace.clone(),
    }
}

/// The destination workload labels of an external service: only what is known.
fn destination_labels(service: Option<&Service>) -> WorkloadLabels {
    let Some(s) = service else {
        return WorkloadLabels::default();
    };
    WorkloadLabels {
        canonical_service: s.hostname.clone(),
        ..WorkloadLabels::default()
    }
}

/// Everything about one request that ends up in its log line and metrics; finished once the
/// response body is done.
pub struct RequestLog {
    pub entry: AccessLogEntry,
    pub start: Instant,
    pub request_bytes: Arc<AtomicU64>,
    /// The tunnel's `source_*` labels, shared by its requests.
    pub source: Arc<WorkloadLabels>,
    pub service: Option<Arc<Service>>,
    pub grpc: bool,
}

impl RequestLog {
    pub fn new(
        start: Instant,
        start_time: SystemTime,
        downstream: &Downstream,
        source: Arc<WorkloadLabels>,
    ) -> Self {
        let mut entry = AccessLogEntry::new(start_time);
        entry.downstream_local_address = Some(downstream.local);
        entry.downstream_remote_address = Some(downstream.remote());
        entry.route_name = Some(DEFAULT_ROUTE_NAME.into());
        RequestLog {
            entry,
            start,
            request_bytes: Arc::new(AtomicU64::new(0)),
            source,
            service: None,
            grpc: false,
        }
    }

    pub fn flag(&mut self, flag: telemetry::ResponseFlag) {
        self.entry.response_flags.insert(flag);
    }

    /// Writes the access-log line and records the request metrics.
    pub fn finish(mut self, proxy: &Proxy, response_bytes: u64, how: BodyEnd) {
        let duration = self.start.elapsed();
        if how == BodyEnd::Dropped {
            self.flag(telemetry::ResponseFlag::DownstreamConnectionTermination);
        }
        if how == BodyEnd::Error {
            self.flag(telemetry::ResponseFlag::UpstreamConnectionTermination);
        }
        self.entry.duration = millis(duration);
        self.entry.bytes_sent = response_bytes;
        self.entry.bytes_received = self.request_bytes.load(Ordering::Relaxed);
        // Borrowed labels: the metrics cache finds the series without building owned labels.
        let service = self.service.as_deref();
        let labels = RequestLabelsRef {
            reporter: Reporter::Waypoint,
            source: self.source.as_ref().as_ref(),
            destination: WorkloadLabelsRef {
                canonical_service: service.map_or("", |s| s.hostname.as_str()),
                ..WorkloadLabelsRef::default()
            },
            destination_service: service.map_or_else(ServiceLabelsRef::default, |s| {
                ServiceLabelsRef {
                    host: &s.hostname,
                    name: match s.kind {
                        ServiceKind::Service => &s.name.name,
                        ServiceKind::ServiceEntry => &s.hostname,
                    },
                    namespace: &s.name.namespace,
                }
            }),
            connection_security_policy: SecurityPolicy::MutualTls,
            request_protocol: if self.grpc {
                RequestProtocol::Grpc
            } else {
                RequestProtocol::Http
            },
            response_code: self.entry.response_code,
            response_flags: self.entry.response_flags,
        };
        proxy.metrics.record_request_ref(
            labels,
            duration,
            self.entry.bytes_received,
            response_bytes,
        );
        proxy.access_log.log(&self.entry);
    }
}

/// Milliseconds, as Envoy prints durations.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Labels of an L4 flow's `istio_tcp_*` metrics.
pub fn connection_labels(
    source: WorkloadLabels,
    service: Option<&Service>,
    flags: ResponseFlags,
) -> ConnectionLabels {
    ConnectionLabels {
        traffic: TrafficLabels {
            reporter: Reporter::Waypoint,
            source,
            destination: destination_labels(service),
            destination_service: service.map(service_labels).unwrap_or_default(),
            connection_security_policy: SecurityPolicy::MutualTls,
        },
        response_flags: flags,
    }
}

/// Logs and counts one finished L4 flow.
#[allow(clippy::too_many_arguments)]
pub fn tcp_flow(
    metrics: &Metrics,
    log: &telemetry::AccessLogger,
    mut entry: AccessLogEntry,
    start: Instant,
    labels: &ConnectionLabels,
    sent: u64,
    received: u64,
    upstream: Option<SocketAddr>,
) {
    entry.duration = millis(start.elapsed());
    entry.bytes_received = sent;
    entry.bytes_sent = received;
    entry.upstream_host = upstream;
    let counters = metrics.connection(labels);
    counters.add_sent(sent);
    counters.add_received(received);
    counters.closed();
    log.log(&entry);
}
