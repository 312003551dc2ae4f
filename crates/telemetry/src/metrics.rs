//! Prometheus metrics with Istio's standard names and labels, plus a few of our own.
//!
//! TCP metrics carry the labels ztunnel gives them (no `response_code`; `request_protocol` is
//! always `tcp`); request metrics add `response_code`, as Envoy's Istio stats do. Empty label
//! values are exported as `unknown`, like ztunnel. Histograms use Envoy's default buckets, which
//! is what Istio's proxies export unless reconfigured.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::TelemetryError;
use crate::flags::ResponseFlags;

/// `Content-Type` of the text exposition format.
pub const TEXT_CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Envoy's default histogram buckets (milliseconds for durations, bytes for sizes).
pub const ENVOY_DEFAULT_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

const UNKNOWN: &str = "unknown";

/// Who reports the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reporter {
    /// The client side (ztunnel outbound).
    #[default]
    Source,
    /// The server side (ztunnel inbound).
    Destination,
    /// A waypoint proxy.
    Waypoint,
}

impl Reporter {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }
}

/// `connection_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SecurityPolicy {
    /// Not known (ztunnel's default).
    #[default]
    Unknown,
    /// Mutual TLS (HBONE).
    MutualTls,
    /// Plaintext.
    None,
}

impl SecurityPolicy {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::Unknown => "unknown",
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
        }
    }
}

/// `request_protocol` of request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RequestProtocol {
    /// HTTP/1.x or HTTP/2.
    #[default]
    Http,
    /// gRPC.
    Grpc,
}

impl RequestProtocol {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
        }
    }
}

/// The `source_*` or `destination_*` workload labels. Empty strings export as `unknown`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct WorkloadLabels {
    /// `*_workload`: the workload (deployment) name.
    pub workload: String,
    /// `*_workload_namespace`.
    pub namespace: String,
    /// `*_principal`: the SPIFFE identity, `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub principal: String,
    /// `*_app`.
    pub app: String,
    /// `*_version`.
    pub version: String,
    /// `*_canonical_service`.
    pub canonical_service: String,
    /// `*_canonical_revision`.
    pub canonical_revision: String,
    /// `*_cluster`.
    pub cluster: String,
}

/// The `destination_service*` labels. Empty strings export as `unknown`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ServiceLabels {
    /// `destination_service`: the service host, e.g. `aliyun.com`.
    pub host: String,
    /// `destination_service_name`.
    pub name: String,
    /// `destination_service_namespace`.
    pub namespace: String,
}

impl ServiceLabels {
    pub fn as_ref(&self) -> ServiceLabelsRef<'_> {
        ServiceLabelsRef {
            host: &self.host,
            name: &self.name,
            namespace: &self.namespace,
        }
    }
}

/// Labels shared by TCP and request metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TrafficLabels {
    /// `reporter`.
    pub reporter: Reporter,
    /// `source_*`.
    pub source: WorkloadLabels,
    /// `destination_*` (workload).
    pub destination: WorkloadLabels,
    /// `destination_service*`.
    pub destination_service: ServiceLabels,
    /// `connection_security_policy`.
    pub connection_security_policy: SecurityPolicy,
}

/// Labels of the `istio_tcp_*` metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    /// Who and what.
    pub traffic: TrafficLabels,
    /// `response_flags`.
    pub response_flags: ResponseFlags,
}

/// Labels of the `istio_request*` metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    /// Who and what.
    pub traffic: TrafficLabels,
    /// `request_protocol`.
    pub request_protocol: RequestProtocol,
    /// `response_code` (0 when no response was sent, as Envoy).
    pub response_code: u16,
    /// `response_flags`.
    pub response_flags: ResponseFlags,
}

/// [`WorkloadLabels`] borrowed: what a hot path passes when it has the values but not an owned
/// label struct (see [`Metrics::record_request_ref`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct WorkloadLabelsRef<'a> {
    pub workload: &'a str,
    pub namespace: &'a str,
    pub principal: &'a str,
    pub app: &'a str,
    pub version: &'a str,
    pub canonical_service: &'a str,
    pub canonical_revision: &'a str,
    pub cluster: &'a str,
}

impl WorkloadLabels {
    /// Borrowed view.
    pub fn as_ref(&self) -> WorkloadLabelsRef<'_> {
        WorkloadLabelsRef {
            workload: &self.workload,
            namespace: &self.namespace,
            principal: &self.principal,
            app: &self.app,
            version: &self.version,
            canonical_service: &self.canonical_service,
            canonical_revision: &self.canonical_revision,
            cluster: &self.cluster,
        }
    }
}

/// [`ServiceLabels`] borrowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ServiceLabelsRef<'a> {
    pub host: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
}

/// [`RequestLabels`] borrowed: building one allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RequestLabelsRef<'a> {
    pub reporter: Reporter,
    pub source: WorkloadLabelsRef<'a>,
    pub destination: WorkloadLabelsRef<'a>,
    pub destination_service: ServiceLabelsRef<'a>,
    pub connection_security_policy: SecurityPolicy,
    pub request_protocol: RequestProtocol,
    pub response_code: u16,
    pub response_flags: ResponseFlags,
}

impl RequestLabels {
    /// Borrowed view.
    pub fn as_ref(&self) -> RequestLabelsRef<'_> {
        let t = &self.traffic;
        RequestLabelsRef {
            reporter: t.reporter,
            source: t.source.as_ref(),
            destination: t.destination.as_ref(),
            destination_service: t.destination_service.as_ref(),
            connection_security_policy: t.connection_security_policy,
            request_protocol: self.request_protocol,
            response_code: self.response_code,
            response_flags: self.response_flags,
        }
    }
}

impl RequestLabelsRef<'_> {
    /// A 128-bit digest of the label set: two independently seeded foldhash passes. The cache
    /// trusts it as the identity of the label set: comparing the strings themselves read cache
    /// lines other threads write (the owned copies sit next to hot allocations) and cost more
    /// than the rest of the recording; a collision among a few thousand label sets has a
    /// probability around 2^-100. Not SipHash: twenty strings per request made it ~2 % of the
    /// waypoint's CPU; the seeds are random per process, so label values cannot aim at a
    /// collision.
    fn key(&self, digest: &[foldhash::quality::RandomState; 2]) -> u128 {
        let lo = digest[0].hash_one(self);
        let hi = digest[1].hash_one(self);
        (u128::from(hi) << 64) | u128::from(lo)
    }
}

/// The four `istio_request*` series of one label set: recording is four atomic updates.
#[derive(Debug, Clone)]
struct RequestSeries {
    requests: IntCounter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// Series already looked up, by label set. Prometheus' `with_label_values` hashes every label
/// value and takes a lock per metric; this is one digest and one read lock for all four, with no
/// allocation once a label set has been seen.
#[derive(Debug, Default)]
struct SeriesCache {
    /// [`RequestLabelsRef::key`] → the label set's series (the key is a digest already: a
    /// fast hasher is enough for the table).
    map: RwLock<HashMap<u128, RequestSeries, foldhash::fast::RandomState>>,
    /// The seeds of [`RequestLabelsRef::key`].
    digest: [foldhash::quality::RandomState; 2],
}

/// Label sets kept in [`SeriesCache`]; past this it starts over (the series themselves stay
/// registered), so label churn cannot grow it without bound.
const SERIES_CACHE_MAX: usize = 4096;

const TRAFFIC_LABEL_NAMES: [&str; 20] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
];

fn or_unknown(value: &str) -> &str {
    if value.is_empty() { UNKNOWN } else { value }
}

/// The values of [`TRAFFIC_LABEL_NAMES`], in that order.
fn traffic_values<'a>(
    reporter: Reporter,
    s: WorkloadLabelsRef<'a>,
    d: WorkloadLabelsRef<'a>,
    svc: ServiceLabelsRef<'a>,
) -> [&'a str; 20] {
    [
        reporter.as_str(),
        or_unknown(s.workload),
        or_unknown(s.namespace),
        or_unknown(s.principal),
        or_unknown(s.app),
        or_unknown(s.version),
        or_unknown(s.canonical_service),
        or_unknown(s.canonical_revision),
        or_unknown(s.cluster),
        or_unknown(d.workload),
        or_unknown(d.namespace),
        or_unknown(d.principal),
        or_unknown(d.app),
        or_unknown(d.version),
        or_unknown(svc.host),
        or_unknown(svc.name),
        or_unknown(svc.namespace),
        or_unknown(d.canonical_service),
        or_unknown(d.canonical_revision),
        or_unknown(d.cluster),
    ]
}

impl<'a> RequestLabelsRef<'a> {
    fn values(&self) -> [&'a str; 20] {
        traffic_values(
            self.reporter,
            self.source,
            self.destination,
            self.destination_service,
        )
    }
}

impl TrafficLabels {
    fn values(&self) -> [&str; 20] {
        traffic_values(
            self.reporter,
            self.source.as_ref(),
            self.destination.as_ref(),
            self.destination_service.as_ref(),
        )
    }
}

fn tcp_label_names() -> Vec<&'static str> {
    let mut names = TRAFFIC_LABEL_NAMES.to_vec();
    names.extend([
        "request_protocol",
        "response_flags",
        "connection_security_policy",
    ]);
    names
}

fn request_label_names() -> Vec<&'static str> {
    let mut names = TRAFFIC_LABEL_NAMES.to_vec();
    names.extend([
        "request_protocol",
        "response_code",
        "response_flags",
        "connection_security_policy",
    ]);
    names
}

/// Runs `f` with the label values of `labels` (flags rendered without allocating when possible).
fn with_tcp_values<R>(labels: &ConnectionLabels, f: impl FnOnce(&[&str]) -> R) -> R {
    let rendered;
    let flags = match labels.response_flags.as_static_str() {
        Some(s) => s,
        None => {
            rendered = labels.response_flags.to_string();
            rendered.as_str()
        }
    };
    let traffic = labels.traffic.values();
    let mut values = Vec::with_capacity(23);
    values.extend_from_slice(&traffic);
    values.extend([
        "tcp",
        flags,
        labels.traffic.connection_security_policy.as_str(),
    ]);
    f(&values)
}

fn with_request_values<R>(labels: &RequestLabelsRef<'_>, f: impl FnOnce(&[&str]) -> R) -> R {
    let rendered;
    let flags = match labels.response_flags.as_static_str() {
        Some(s) => s,
        None => {
            rendered = labels.response_flags.to_string();
            rendered.as_str()
        }
    };
    let code = labels.response_code.to_string();
    let traffic = labels.values();
    let mut values = Vec::with_capacity(24);
    values.extend_from_slice(&traffic);
    values.extend([
        labels.request_protocol.as_str(),
        code.as_str(),
        flags,
        labels.connection_security_policy.as_str(),
    ]);
    f(&values)
}

/// The labelled TCP counters of one connection: look them up once, then each update is one
/// atomic add.
#[derive(Debug, Clone)]
pub struct ConnectionMetrics {
    opened: IntCounter,
    closed: IntCounter,
    sent: IntCounter,
    received: IntCounter,
}

impl ConnectionMetrics {
    /// Counts the connection as opened.
    pub fn opened(&self) {
        self.opened.inc();
    }

    /// Counts the connection as closed (with the labels it was looked up with; see
    /// [`Metrics::tcp_closed`] when the close carries other response flags).
    pub fn closed(&self) {
        self.closed.inc();
    }

    /// Bytes sent towards the destination (`istio_tcp_sent_bytes_total`).
    pub fn add_sent(&self, bytes: u64) {
        self.sent.inc_by(bytes);
    }

    /// Bytes received from the destination (`istio_tcp_received_bytes_total`).
    pub fn add_received(&self, bytes: u64) {
        self.received.inc_by(bytes);
    }
}

/// All metrics of a proxy, in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    request_series: Arc<SeriesCache>,
    config_generation: IntGauge,
    config_reload_errors: IntCounter,
    config_last_success: Gauge,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, TelemetryError> {
        Self::with_registry(Registry::new())
    }

    /// Registers every metric in `registry` (which may hold other collectors too).
    pub fn with_registry(registry: Registry) -> Result<Self, TelemetryError> {
        let tcp = tcp_label_names();
        let req = request_label_names();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, TelemetryError> {
                let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let histogram = |name: &str, help: &str| -> Result<HistogramVec, TelemetryError> {
            let opts = HistogramOpts::new(name, help).buckets(ENVOY_DEFAULT_BUCKETS.to_vec());
            let metric = HistogramVec::new(opts, &req)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };

        let tcp_opened = counter(
            "istio_tcp_connections_opened_total",
            "The total number of TCP connections opened",
            &tcp,
        )?;
        let tcp_closed = counter(
            "istio_tcp_connections_closed_total",
            "The total number of TCP connections closed",
            &tcp,
        )?;
        let tcp_sent = counter(
            "istio_tcp_sent_bytes_total",
            "The size of total bytes sent during response in case of a TCP connection",
            &tcp,
        )?;
        let tcp_received = counter(
            "istio_tcp_received_bytes_total",
            "The size of total bytes received during request in case of a TCP connection",
            &tcp,
        )?;
        let requests = counter("istio_requests_total", "The total number of requests", &req)?;
        let request_duration = histogram(
            "istio_request_duration_milliseconds",
            "The duration of requests in milliseconds",
        )?;
        let request_bytes = histogram(
            "istio_request_bytes",
            "The size of HTTP requests (headers and body) in bytes",
        )?;
        let response_bytes = histogram(
            "istio_response_bytes",
            "The size of HTTP responses (headers and body) in bytes",
        )?;

        let config_generation = IntGauge::new(
            "strait_config_generation",
            "Generation of the configuration snapshot in use",
        )?;
        registry.register(Box::new(config_generation.clone()))?;
        let config_reload_errors = IntCounter::new(
            "strait_config_reload_errors_total",
            "Configuration reloads rejected (the previous snapshot stays in use)",
        )?;
        registry.register(Box::new(config_reload_errors.clone()))?;
        let config_last_success = Gauge::new(
            "strait_config_last_load_success_timestamp_seconds",
            "Unix time of the last successful configuration load",
        )?;
        registry.register(Box::new(config_last_success.clone()))?;

        Ok(Self {
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            requests,
            request_duration,
            request_bytes,
            response_bytes,
            request_series: Arc::default(),
            config_generation,
            config_reload_errors,
            config_last_success,
        })
    }

    /// The registry, e.g. to register more collectors or to gather.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The TCP counters for a connection with `labels`. Nothing is counted until the caller
    /// calls [`ConnectionMetrics::opened`] and friends.
    pub fn connection(&self, labels: &ConnectionLabels) -> ConnectionMetrics {
        with_tcp_values(labels, |values| ConnectionMetrics {
            opened: self.tcp_opened.with_label_values(values),
            closed: self.tcp_closed.with_label_values(values),
            sent: self.tcp_sent.with_label_values(values),
            received: self.tcp_received.with_label_values(values),
        })
    }

    /// Counts one closed connection with `labels` — for closes whose response flags differ from
    /// those the connection's counters were looked up with.
    pub fn tcp_closed(&self, labels: &ConnectionLabels) {
        with_tcp_values(labels, |values| {
            self.tcp_closed.with_label_values(values).inc()
        });
    }

    /// Records one finished request.
    pub fn record_request(
        &self,
        labels: &RequestLabels,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.record_request_ref(labels.as_ref(), duration, request_bytes, response_bytes);
    }

    /// [`record_request`](Self::record_request) from borrowed labels: no allocation once the
    /// label set has been seen.
    pub fn record_request_ref(
        &self,
        labels: RequestLabelsRef<'_>,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let record = |series: &RequestSeries| {
            series.requests.inc();
            series.duration.observe(duration.as_secs_f64() * 1000.0);
            // u64 → f64 loses precision only above 2^53 bytes.
            series.request_bytes.observe(request_bytes as f64);
            series.response_bytes.observe(response_bytes as f64);
        };
        let key = labels.key(&self.request_series.digest);
        {
            // Recorded under the read lock: no reference counts to bump on the hot path.
            let map = self
                .request_series
                .map
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(series) = map.get(&key) {
                record(series);
                return;
            }
        }
        record(&self.request_series_slow(key, labels));
    }

    fn request_series_slow(&self, key: u128, labels: RequestLabelsRef<'_>) -> RequestSeries {
        let cache = &self.request_series.map;
        let series = with_request_values(&labels, |values| RequestSeries {
            requests: self.requests.with_label_values(values),
            duration: self.request_duration.with_label_values(values),
            request_bytes: self.request_bytes.with_label_values(values),
            response_bytes: self.response_bytes.with_label_values(values),
        });
        let mut map = cache.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= SERIES_CACHE_MAX {
            map.clear();
        }
        map.insert(key, series.clone());
        series
    }

    /// A configuration snapshot `generation` was loaded and is now in use.
    pub fn config_loaded(&self, generation: u64) {
        self.config_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.config_last_success.set(now.as_secs_f64());
    }

    /// A configuration reload was rejected.
    pub fn config_reload_failed(&self) {
        self.config_reload_errors.inc();
    }

    /// The registry in Prometheus text format (version 0.0.4).
    pub fn encode_text(&self) -> Result<String, TelemetryError> {
        let families = self.registry.gather();
        let mut out = String::with_capacity(16 * 1024);
        TextEncoder::new().encode_utf8(&families, &mut out)?;
        Ok(out)
    }

    /// Like [`encode_text`](Self::encode_text) into bytes.
    pub fn encode_text_bytes(&self) -> Result<Vec<u8>, TelemetryError> {
        let families = self.registry.gather();
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&families, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::ResponseFlag;

    fn traffic() -> TrafficLabels {
        TrafficLabels {
            reporter: Reporter::Source,
            source: WorkloadLabels {
                workload: "sleep".into(),
                namespace: "default".into(),
                principal: "spiffe://cluster.local/ns/default/sa/sleep".into(),
                app: "sleep".into(),
                version: "v1".into(),
                canonical_service: "sleep".into(),
                canonical_revision: "v1".into(),
                cluster: "Kubernetes".into(),
            },
            destination: WorkloadLabels {
                workload: "egress-waypoint".into(),
                namespace: "istio-egress".into(),
                ..Default::default()
            },
            destination_service: ServiceLabels {
                host: "aliyun.com".into(),
                name: "aliyun.com".into(),
                namespace: "istio-egress".into(),
            },
            connection_security_policy: SecurityPolicy::MutualTls,
        }
    }

    /// The exposition line of `name` whose labels include all of `labels`.
    fn line<'a>(text: &'a str, name: &str, labels: &[&str]) -> Option<&'a str> {
        text.lines().find(|line| {
            line.starts_with(&format!("{name}{{")) && labels.iter().all(|l| line.contains(l))
        })
    }

    #[test]
    fn tcp_metrics_have_istio_names_and_labels() {
        let metrics = Metrics::new().expect("metrics");
        let labels = ConnectionLabels {
            traffic: traffic(),
            response_flags: ResponseFlags::empty(),
        };
        let conn = metrics.connection(&labels);
        conn.opened();
        conn.add_sent(100);
        conn.add_sent(23);
        conn.add_received(7);
        conn.closed();
        metrics.tcp_closed(&ConnectionLabels {
            traffic: traffic(),
            response_flags: ResponseFlags::single(ResponseFlag::UpstreamConnectionFailure)
                .with(ResponseFlag::UpstreamRetryLimitExceeded),
        });

        let text = metrics.encode_text().expect("encode");
        let expected_labels = [
            r#"reporter="source""#,
            r#"source_workload="sleep""#,
            r#"source_workload_namespace="default""#,
            r#"source_principal="spiffe://cluster.local/ns/default/sa/sleep""#,
            r#"source_app="sleep""#,
            r#"source_version="v1""#,
            r#"source_canonical_service="sleep""#,
            r#"source_canonical_revision="v1""#,
            r#"source_cluster="Kubernetes""#,
            r#"destination_workload="egress-waypoint""#,
            r#"destination_workload_namespace="istio-egress""#,
            r#"destination_principal="unknown""#,
            r#"destination_app="unknown""#,
            r#"destination_version="unknown""#,
            r#"destination_service="aliyun.com""#,
            r#"destination_service_name="aliyun.com""#,
            r#"destination_service_namespace="istio-egress""#,
            r#"destination_canonical_service="unknown""#,
            r#"destination_canonical_revision="unknown""#,
            r#"destination_cluster="unknown""#,
            r#"request_protocol="tcp""#,
            r#"response_flags="-""#,
            r#"connection_security_policy="mutual_tls""#,
        ];
        for (name, value) in [
            ("istio_tcp_connections_opened_total", "1"),
            ("istio_tcp_connections_closed_total", "1"),
            ("istio_tcp_sent_bytes_total", "123"),
            ("istio_tcp_received_bytes_total", "7"),
        ] {
            let line = line(&text, name, &expected_labels)
                .unwrap_or_else(|| panic!("{name} missing in\n{text}"));
            assert!(line.ends_with(&format!("}} {value}")), "{line}");
            assert!(!line.contains("response_code"), "{line}");
            assert_eq!(line.matches('=').count(), 23, "{line}");
        }
        let failed = line(
            &text,
            "istio_tcp_connections_closed_total",
            &[r#"response_flags="UF,URX""#],
        )
        .expect("close with flags");
        assert!(failed.ends_with("} 1"), "{failed}");
        assert!(text.contains("# TYPE istio_tcp_connections_opened_total counter"));
    }

    #[test]
    fn request_metrics_have_istio_names_labels_and_buckets() {
        let metrics = Metrics::new().expect("metrics");
        let labels = RequestLabels {
            traffic: TrafficLabels {
                reporter: Reporter::Waypoint,
                ..traffic()
            },
            request_protocol: RequestProtocol::Http,
            response_code: 503,
            response_flags: ResponseFlag::NoHealthyUpstream.into(),
        };
        metrics.record_request(&labels, Duration::from_millis(42), 300, 2000);
        metrics.record_request(&labels, Duration::from_micros(400), 0, 0);

        let text = metrics.encode_text().expect("encode");
        let common = [
            r#"reporter="waypoint""#,
            r#"request_protocol="http""#,
            r#"response_code="503""#,
            r#"response_flags="UH""#,
            r#"destination_service="aliyun.com""#,
        ];
        let total = line(&text, "istio_requests_total", &common).expect("requests_total");
        assert!(total.ends_with("} 2"), "{total}");
        assert_eq!(total.matches('=').count(), 24, "{total}");

        let mut le_05 = common.to_vec();
        le_05.push(r#"le="0.5""#);
        let bucket =
            line(&text, "istio_request_duration_milliseconds_bucket", &le_05).expect("0.5 bucket");
        assert!(bucket.ends_with("} 1"), "{bucket}");
        let mut le_50 = common.to_vec();
        le_50.push(r#"le="50""#);
        let bucket =
            line(&text, "istio_request_duration_milliseconds_bucket", &le_50).expect("50 bucket");
        assert!(bucket.ends_with("} 2"), "{bucket}");
        let mut le_max = common.to_vec();
        le_max.push(r#"le="3600000""#);
        assert!(line(&text, "istio_request_duration_milliseconds_bucket", &le_max).is_some());

        let sum = line(&text, "istio_request_bytes_sum", &common).expect("request bytes sum");
        assert!(sum.ends_with("} 300"), "{sum}");
        let count = line(&text, "istio_response_bytes_count", &common).expect("count");
        assert!(count.ends_with("} 2"), "{count}");
        assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram"));
    }

    #[test]
    fn cached_series_keep_label_sets_apart() {
        let metrics = Metrics::new().expect("metrics");
        let mut labels = RequestLabels {
            traffic: traffic(),
            response_code: 200,
            ..RequestLabels::default()
        };
        metrics.record_request(&labels, Duration::from_millis(1), 10, 20);
        metrics.record_request_ref(labels.as_ref(), Duration::from_millis(1), 10, 20);
        labels.response_code = 503;
        metrics.record_request(&labels, Duration::from_millis(1), 10, 20);
        labels.traffic.source.workload = "other".into();
        metrics.record_request_ref(labels.as_ref(), Duration::from_millis(1), 10, 20);

        let text = metrics.encode_text().expect("encode");
        let count = |code: &str, workload: &str| {
            line(
                &text,
                "istio_requests_total",
                &[
                    &format!(r#"response_code="{code}""#),
                    &format!(r#"source_workload="{workload}""#),
                ],
            )
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
        };
        assert_eq!(count("200", "sleep").as_deref(), Some("2"));
        assert_eq!(count("503", "sleep").as_deref(), Some("1"));
        assert_eq!(count("503", "other").as_deref(), Some("1"));
        assert_eq!(count("200", "other"), None);
        let sum = line(
            &text,
            "istio_response_bytes_sum",
            &[r#"response_code="200""#],
        )
        .expect("response bytes");
        assert!(sum.ends_with("} 40"), "{sum}");
    }

    #[test]
    fn config_metrics() {
        let metrics = Metrics::new().expect("metrics");
        metrics.config_loaded(7);
        metrics.config_reload_failed();
        metrics.config_reload_failed();
        let text = metrics.encode_text().expect("encode");
        assert!(text.contains("\nstrait_config_generation 7\n"), "{text}");
        assert!(
            text.contains("\nstrait_config_reload_errors_total 2\n"),
            "{text}"
        );
        let stamp = text
            .lines()
            .find_map(|l| l.strip_prefix("strait_config_last_load_success_timestamp_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("timestamp");
        assert!(stamp > 1.7e9, "{stamp}");
        assert_eq!(
            metrics.encode_text_bytes().expect("bytes"),
            text.into_bytes()
        );
    }

    #[test]
    fn label_values_with_quotes_are_escaped() {
        let metrics = Metrics::new().expect("metrics");
        let mut labels = ConnectionLabels::default();
        labels.traffic.source.workload = "we\"ird\nname".into();
        metrics.connection(&labels).opened();
        let text = metrics.encode_text().expect("encode");
        assert!(
            text.contains(r#"source_workload="we\"ird\nname""#),
            "{text}"
        );
    }
}
