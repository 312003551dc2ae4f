//! JSON access logs: Istio's default JSON format for requests, and ztunnel-style connection lines.
//!
//! [`AccessLogger`] writes one JSON object per line. Entries are serialised by the caller's task
//! and handed over a bounded channel to one writer thread, so lines from concurrent tasks never
//! interleave and a slow stdout never blocks the data path: when the queue is full the entry is
//! dropped and counted. A disabled logger costs one branch.

use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::{Serialize, Serializer};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::flags::ResponseFlags;

/// Formats `time` as Envoy's `%START_TIME%`: RFC 3339, UTC, milliseconds
/// (`2024-05-01T12:00:00.123Z`).
pub fn format_start_time(time: SystemTime) -> String {
    let t = time::OffsetDateTime::from(time);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn start_time<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_start_time(*time))
}

/// Envoy prints `%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%` as the header's string value.
fn header_number<S: Serializer>(value: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(ms) => serializer.collect_str(ms),
        None => serializer.serialize_none(),
    }
}

/// One HTTP request in Istio's default JSON access-log format (same fields, same order).
/// `None` prints as `null`, as Envoy prints missing values in JSON logs.
#[derive(Debug, Clone, Serialize)]
pub struct AccessLogEntry {
    /// `%START_TIME%`.
    #[serde(serialize_with = "start_time")]
    pub start_time: SystemTime,
    /// `%ROUTE_NAME%`.
    pub route_name: Option<String>,
    /// `%REQ(:METHOD)%`.
    pub method: Option<String>,
    /// `%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%`.
    pub path: Option<String>,
    /// `%PROTOCOL%`, e.g. `HTTP/1.1`, `HTTP/2`.
    pub protocol: Option<String>,
    /// `%RESPONSE_CODE%`; 0 when no response was sent (Envoy prints 0 too).
    pub response_code: u16,
    /// `%RESPONSE_FLAGS%`.
    pub response_flags: ResponseFlags,
    /// `%RESPONSE_CODE_DETAILS%`, e.g. `via_upstream`.
    pub response_code_details: Option<String>,
    /// `%CONNECTION_TERMINATION_DETAILS%`.
    pub connection_termination_details: Option<String>,
    /// `%BYTES_RECEIVED%` (request body bytes).
    pub bytes_received: u64,
    /// `%BYTES_SENT%` (response body bytes).
    pub bytes_sent: u64,
    /// `%DURATION%` in milliseconds.
    pub duration: u64,
    /// `%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%` in milliseconds; printed as a string like Envoy.
    #[serde(serialize_with = "header_number")]
    pub upstream_service_time: Option<u64>,
    /// `%REQ(X-FORWARDED-FOR)%`.
    pub x_forwarded_for: Option<String>,
    /// `%REQ(USER-AGENT)%`.
    pub user_agent: Option<String>,
    /// `%REQ(X-REQUEST-ID)%`.
    pub request_id: Option<String>,
    /// `%REQ(:AUTHORITY)%`.
    pub authority: Option<String>,
    /// `%UPSTREAM_HOST%`.
    pub upstream_host: Option<SocketAddr>,
    /// `%UPSTREAM_CLUSTER%`, e.g. `outbound|443||aliyun.com`.
    pub upstream_cluster: Option<String>,
    /// `%UPSTREAM_LOCAL_ADDRESS%`.
    pub upstream_local_address: Option<SocketAddr>,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`.
    pub downstream_local_address: Option<SocketAddr>,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`.
    pub downstream_remote_address: Option<SocketAddr>,
    /// `%REQUESTED_SERVER_NAME%` (SNI).
    pub requested_server_name: Option<String>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub upstream_transport_failure_reason: Option<String>,
}

impl AccessLogEntry {
    /// An entry for a request that started at `start_time`, every other field empty.
    pub fn new(start_time: SystemTime) -> Self {
        Self {
            start_time,
            route_name: None,
            method: None,
            path: None,
            protocol: None,
            response_code: 0,
            response_flags: ResponseFlags::empty(),
            response_code_details: None,
            connection_termination_details: None,
            bytes_received: 0,
            bytes_sent: 0,
            duration: 0,
            upstream_service_time: None,
            x_forwarded_for: None,
            user_agent: None,
            request_id: None,
            authority: None,
            upstream_host: None,
            upstream_cluster: None,
            upstream_local_address: None,
            downstream_local_address: None,
            downstream_remote_address: None,
            requested_server_name: None,
            upstream_transport_failure_reason: None,
        }
    }
}

/// Which way a ztunnel connection went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From a local pod out (ztunnel 15001).
    Outbound,
    /// Into a local pod (ztunnel 15008/15006).
    Inbound,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionOutcome {
    /// Proxied and closed normally.
    Success,
    /// Refused by policy.
    Denied,
    /// Failed: upstream unreachable, handshake error, reset, …
    Failed,
}

/// One ztunnel connection, logged when it closes.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionLogEntry {
    /// When the connection was accepted (RFC 3339, UTC, ms).
    #[serde(serialize_with = "start_time")]
    pub start_time: SystemTime,
    /// `outbound` or `inbound`.
    pub direction: Direction,
    /// The client's address.
    pub src_addr: SocketAddr,
    /// The address the client connected to (original destination).
    pub dst_addr: SocketAddr,
    /// The HBONE `:authority`, when the connection was tunnelled.
    pub dst_hbone_addr: Option<String>,
    /// The destination service host, when known.
    pub dst_service: Option<String>,
    /// The client's SPIFFE identity.
    pub src_identity: Option<String>,
    /// The destination's SPIFFE identity (the peer certificate's).
    pub dst_identity: Option<String>,
    /// Bytes from the client towards the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination back to the client.
    pub bytes_received: u64,
    /// Lifetime of the connection.
    pub duration_ms: u64,
    /// How it ended.
    pub outcome: ConnectionOutcome,
    /// Envoy-style flags explaining a failure (`-` when none).
    pub response_flags: ResponseFlags,
    /// The error, for failed or denied connections.
    pub error: Option<String>,
}

/// Entries waiting for the writer thread before new ones are dropped.
pub const DEFAULT_QUEUE_CAPACITY: usize = 16 * 1024;

enum Msg {
    Line(Vec<u8>),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    write_errors: AtomicU64,
}

struct Shared {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
}

/// Writes serialisable entries as JSON lines. Cheap to clone; clones share the writer.
///
/// The writer thread exits once every clone is dropped, after writing what is queued.
#[derive(Clone)]
pub struct AccessLogger {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for AccessLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogger")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl AccessLogger {
    /// A logger that logs nothing.
    pub fn disabled() -> Self {
        Self { shared: None }
    }

    /// Logs to stdout (reserved for access logs; diagnostics go to stderr).
    pub fn stdout() -> io::Result<Self> {
        Self::to_writer(io::stdout())
    }

    /// Logs to `writer` with [`DEFAULT_QUEUE_CAPACITY`].
    pub fn to_writer<W: Write + Send + 'static>(writer: W) -> io::Result<Self> {
        Self::with_capacity(writer, DEFAULT_QUEUE_CAPACITY)
    }

    /// Logs to `writer`, queueing at most `capacity` entries (at least 1).
    pub fn with_capacity<W: Write + Send + 'static>(
        writer: W,
        capacity: usize,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let thread_counters = counters.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, writer, &thread_counters))?;
        Ok(Self {
            shared: Some(Arc::new(Shared { tx, counters })),
        })
    }

    /// Whether entries are written at all; check it before building an expensive entry.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Queues `entry` as one JSON line. Never blocks; drops the entry if the queue is full.
    pub fn log<T: Serialize + ?Sized>(&self, entry: &T) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut line = Vec::with_capacity(768);
        if let Err(error) = serde_json::to_writer(&mut line, entry) {
            warn!(%error, "access log entry could not be serialised");
            return;
        }
        line.push(b'\n');
        if shared.tx.try_send(Msg::Line(line)).is_err() {
            let dropped = shared.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // The first drop and then every 1000th, so a stuck stdout does not flood stderr.
            if dropped % 1000 == 1 {
                warn!(dropped, "access log queue full; dropping entries");
            }
        }
    }

    /// Waits until every entry queued before this call has been written and flushed.
    pub async fn flush(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let (ack, done) = oneshot::channel();
        if shared.tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Entries dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.counters.dropped.load(Ordering::Relaxed))
    }

    /// Failed writes to the underlying writer.
    pub fn write_errors(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.counters.write_errors.load(Ordering::Relaxed))
    }
}

fn write_lines<W: Write>(mut rx: mpsc::Receiver<Msg>, writer: W, counters: &Counters) {
    let mut out = BufWriter::with_capacity(64 * 1024, writer);
    let write = |out: &mut BufWriter<W>, msg: Msg| match msg {
        Msg::Line(line) => {
            if out.write_all(&line).is_err() {
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        Msg::Flush(ack) => {
            if out.flush().is_err() {
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            let _ = ack.send(());
        }
    };
    while let Some(msg) = rx.blocking_recv() {
        write(&mut out, msg);
        // Batch what queued up meanwhile, then flush once: whole lines reach the writer
        // promptly without a syscall per entry under load.
        while let Ok(msg) = rx.try_recv() {
            write(&mut out, msg);
        }
        if out.flush().is_err() {
            counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::Value;

    use super::*;
    use crate::flags::ResponseFlag;

    #[test]
    fn start_time_is_rfc3339_utc_millis() {
        let t = UNIX_EPOCH + Duration::from_millis(1_714_564_800_123);
        assert_eq!(format_start_time(t), "2024-05-01T12:00:00.123Z");
        assert_eq!(format_start_time(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    const ISTIO_FIELDS: [&str; 24] = [
        "start_time",
        "route_name",
        "method",
        "path",
        "protocol",
        "response_code",
        "response_flags",
        "response_code_details",
        "connection_termination_details",
        "bytes_received",
        "bytes_sent",
        "duration",
        "upstream_service_time",
        "x_forwarded_for",
        "user_agent",
        "request_id",
        "authority",
        "upstream_host",
        "upstream_cluster",
        "upstream_local_address",
        "downstream_local_address",
        "downstream_remote_address",
        "requested_server_name",
        "upstream_transport_failure_reason",
    ];

    #[test]
    fn empty_entry_has_every_field_with_nulls() {
        let entry = AccessLogEntry::new(UNIX_EPOCH);
        let line = serde_json::to_string(&entry).expect("serialize");
        let value: Value = serde_json::from_str(&line).expect("valid JSON");
        let object = value.as_object().expect("object");
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        let mut expected = ISTIO_FIELDS.to_vec();
        expected.sort_unstable();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, expected);
        // Fields print in Istio's order.
        let positions: Vec<usize> = ISTIO_FIELDS
            .iter()
            .map(|f| line.find(&format!("\"{f}\":")).expect("field"))
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");

        for null_field in [
            "route_name",
            "method",
            "path",
            "protocol",
            "response_code_details",
            "connection_termination_details",
            "upstream_service_time",
            "x_forwarded_for",
            "user_agent",
            "request_id",
            "authority",
            "upstream_host",
            "upstream_cluster",
            "upstream_local_address",
            "downstream_local_address",
            "downstream_remote_address",
            "requested_server_name",
            "upstream_transport_failure_reason",
        ] {
            assert_eq!(object[null_field], Value::Null, "{null_field}");
        }
        assert_eq!(object["response_flags"], "-");
        assert_eq!(object["response_code"], 0);
        assert_eq!(object["start_time"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn full_entry_types() {
        let mut entry = AccessLogEntry::new(UNIX_EPOCH + Duration::from_millis(1500));
        entry.method = Some("GET".into());
        entry.path = Some("/index.html".into());
        entry.protocol = Some("HTTP/1.1".into());
        entry.response_code = 200;
        entry.response_flags = ResponseFlag::UpstreamRetryLimitExceeded.into();
        entry.bytes_received = 12;
        entry.bytes_sent = 3456;
        entry.duration = 78;
        entry.upstream_service_time = Some(70);
        entry.authority = Some("aliyun.com".into());
        entry.upstream_host = Some("47.246.0.1:443".parse().expect("addr"));
        entry.upstream_cluster = Some("outbound|443||aliyun.com".into());
        entry.downstream_remote_address = Some("[fd00::1]:5555".parse().expect("addr"));
        let value: Value = serde_json::to_value(&entry).expect("serialize");
        assert_eq!(value["start_time"], "1970-01-01T00:00:01.500Z");
        assert_eq!(value["response_code"], 200);
        assert_eq!(value["bytes_sent"], 3456);
        assert_eq!(value["duration"], 78);
        assert_eq!(value["upstream_service_time"], "70");
        assert_eq!(value["response_flags"], "URX");
        assert_eq!(value["upstream_host"], "47.246.0.1:443");
        assert_eq!(value["downstream_remote_address"], "[fd00::1]:5555");
    }

    #[test]
    fn connection_entry() {
        let entry = ConnectionLogEntry {
            start_time: UNIX_EPOCH,
            direction: Direction::Outbound,
            src_addr: "10.0.0.5:40000".parse().expect("addr"),
            dst_addr: "240.240.0.1:443".parse().expect("addr"),
            dst_hbone_addr: Some("240.240.0.1:443".into()),
            dst_service: Some("aliyun.com".into()),
            src_identity: Some("spiffe://cluster.local/ns/default/sa/sleep".into()),
            dst_identity: None,
            bytes_sent: 10,
            bytes_received: 20,
            duration_ms: 30,
            outcome: ConnectionOutcome::Failed,
            response_flags: ResponseFlag::UpstreamConnectionFailure.into(),
            error: Some("connection refused".into()),
        };
        let value: Value = serde_json::to_value(&entry).expect("serialize");
        assert_eq!(value["direction"], "outbound");
        assert_eq!(value["outcome"], "failed");
        assert_eq!(value["response_flags"], "UF");
        assert_eq!(value["dst_identity"], Value::Null);
        assert_eq!(value["bytes_received"], 20);
        assert_eq!(value["src_addr"], "10.0.0.5:40000");
    }

    /// A writer that records each `write` call separately, so a torn line would show.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            // Accept at most 100 bytes per call to provoke partial writes.
            let n = buf.len().min(100);
            self.0.lock().expect("lock").extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_produce_whole_lines() {
        let capture = Capture::default();
        let logger = AccessLogger::with_capacity(capture.clone(), 100_000).expect("logger");
        let tasks: Vec<_> = (0..8)
            .map(|task| {
                let logger = logger.clone();
                tokio::spawn(async move {
                    for i in 0..500u64 {
                        let mut entry = AccessLogEntry::new(SystemTime::now());
                        entry.path = Some(format!("/task/{task}/{}", "x".repeat(i as usize % 300)));
                        entry.bytes_sent = i;
                        logger.log(&entry);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        logger.flush().await;

        let data = capture.0.lock().expect("lock").clone();
        let text = String::from_utf8(data).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8 * 500);
        assert_eq!(logger.dropped(), 0);
        for line in lines {
            let value: Value = serde_json::from_str(line).expect("each line is whole JSON");
            assert!(
                value["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/task/"))
            );
        }
    }

    #[tokio::test]
    async fn full_queue_drops_instead_of_blocking() {
        /// Blocks every write until released.
        struct Gate(Arc<std::sync::Barrier>);
        impl Write for Gate {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.wait();
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let barrier = Arc::new(std::sync::Barrier::new(2));
        // BufWriter with a 64 KiB buffer would absorb small lines; make each line bigger.
        let logger = AccessLogger::with_capacity(Gate(barrier.clone()), 2).expect("logger");
        let big = "y".repeat(70 * 1024);
        let started = std::time::Instant::now();
        for _ in 0..10 {
            logger.log(&big);
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "log() must not block"
        );
        let dropped = logger.dropped();
        assert!(dropped >= 7, "dropped {dropped}");
        // Release one write per accepted line so the writer thread can finish.
        for _ in 0..(10 - dropped) {
            barrier.wait();
        }
    }

    #[tokio::test]
    async fn disabled_logger_does_nothing() {
        let logger = AccessLogger::disabled();
        assert!(!logger.is_enabled());
        logger.log(&AccessLogEntry::new(SystemTime::now()));
        logger.flush().await;
        assert_eq!(logger.dropped(), 0);
    }

    #[tokio::test]
    async fn write_errors_are_counted_not_fatal() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"))
            }
        }
        let logger = AccessLogger::to_writer(Broken).expect("logger");
        logger.log(&AccessLogEntry::new(SystemTime::now()));
        logger.flush().await;
        assert!(logger.write_errors() > 0);
        // Still accepting entries.
        logger.log(&AccessLogEntry::new(SystemTime::now()));
        logger.flush().await;
    }
}
