//! JSON access logs: Istio's default JSON format for requests, and ztunnel-style connection lines.
//!
//! [`AccessLogger`] writes one JSON object per line. Entries are serialised by the caller's task
//! and appended, whole, to a bounded shared buffer that one writer thread writes in batches, so
//! lines from concurrent tasks never interleave, a busy proxy pays one wake-up and one `write`
//! per batch rather than per line, and a slow stdout never blocks the data path: when the queue
//! is full the entry is dropped and counted. A disabled logger costs one branch.

use std::cell::RefCell;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};
use tokio::sync::oneshot;
use tracing::warn;

use crate::flags::ResponseFlags;

/// Formats `time` as Envoy's `%START_TIME%`: RFC 3339, UTC, milliseconds
/// (`2024-05-01T12:00:00.123Z`).
pub fn format_start_time(time: SystemTime) -> String {
    let buf = start_time_bytes(time);
    String::from_utf8_lossy(&buf).into_owned()
}

/// `%START_TIME%` into a stack buffer: every access-log line has one, so no `format!`.
fn start_time_bytes(time: SystemTime) -> [u8; 24] {
    let t = time::OffsetDateTime::from(time);
    // Years outside 0..=9999 cannot be written in RFC 3339; clamp rather than misalign.
    let year = t.year().clamp(0, 9999).unsigned_abs();
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, digits: usize, mut v: u32| {
        for i in (at..at + digits).rev() {
            // `v % 10` is a single decimal digit.
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, u8::from(t.month()).into());
    put(8, 2, t.day().into());
    put(11, 2, t.hour().into());
    put(14, 2, t.minute().into());
    put(17, 2, t.second().into());
    put(20, 3, t.millisecond().into());
    out
}

fn start_time<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    let buf = start_time_bytes(*time);
    // Only ASCII digits and separators were written.
    match std::str::from_utf8(&buf) {
        Ok(s) => serializer.serialize_str(s),
        Err(_) => serializer.serialize_none(),
    }
}

/// `a.b.c.d:port` into a stack buffer. Every request line has up to four addresses, and the
/// generic `Display` path (a formatter call per octet) showed in profiles; IPv6 keeps it.
fn socket_addr<S: Serializer>(addr: &Option<SocketAddr>, serializer: S) -> Result<S::Ok, S::Error> {
    let v4 = match addr {
        None => return serializer.serialize_none(),
        Some(SocketAddr::V6(v6)) => return serializer.collect_str(v6),
        Some(SocketAddr::V4(v4)) => v4,
    };
    /// Appends `n` in decimal at `buf[at..]`, returning the new end.
    fn put(n: u16, buf: &mut [u8; 21], at: usize) -> usize {
        let mut digits = [0u8; 5];
        let mut i = digits.len();
        let mut n = n;
        loop {
            i -= 1;
            // `n % 10` is one decimal digit.
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let d = &digits[i..];
        buf[at..at + d.len()].copy_from_slice(d);
        at + d.len()
    }
    // At most `255.255.255.255:65535`.
    let mut buf = [0u8; 21];
    let mut len = 0;
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        len = put(octet.into(), &mut buf, len);
    }
    buf[len] = b':';
    len = put(v4.port(), &mut buf, len + 1);
    // Digits, dots and a colon only.
    match std::str::from_utf8(&buf[..len]) {
        Ok(s) => serializer.serialize_str(s),
        Err(_) => serializer.collect_str(v4),
    }
}

/// Envoy prints `%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%` as the header's string value.
fn header_number<S: Serializer>(value: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(ms) => serializer.collect_str(ms),
        None => serializer.serialize_none(),
    }
}

/// A text field of an access-log line. A proxy logs every request, so the line borrows what
/// already exists where it can — a constant, a string shared with the configuration, the
/// request's own header value or path (reference-counted bytes) — instead of copying each field
/// into a fresh `String`. Serialises as a JSON string.
#[derive(Clone)]
pub struct LogStr(Repr);

#[derive(Clone)]
enum Repr {
    Static(&'static str),
    Shared(Arc<str>),
    Owned(String),
    /// Checked to be visible ASCII (`HeaderValue::to_str`) when built.
    Header(http::HeaderValue),
    Path(http::uri::PathAndQuery),
}

impl LogStr {
    /// A header value, when it is text (`None` for values with opaque bytes, which Envoy's
    /// JSON log could not print either).
    pub fn from_header(value: &http::HeaderValue) -> Option<Self> {
        value
            .to_str()
            .is_ok()
            .then(|| LogStr(Repr::Header(value.clone())))
    }

    /// The header value this text was taken from, if it was one (to send it on without a
    /// copy).
    pub fn header_value(&self) -> Option<&http::HeaderValue> {
        match &self.0 {
            Repr::Header(v) => Some(v),
            _ => None,
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Static(s) => s,
            Repr::Shared(s) => s,
            Repr::Owned(s) => s,
            // Checked in `from_header`; a failure here cannot happen, and prints as empty.
            Repr::Header(v) => v.to_str().unwrap_or_default(),
            Repr::Path(p) => p.as_str(),
        }
    }
}

impl std::ops::Deref for LogStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for LogStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for LogStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for LogStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for LogStr {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for LogStr {}

impl PartialEq<str> for LogStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for LogStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl From<&'static str> for LogStr {
    fn from(s: &'static str) -> Self {
        LogStr(Repr::Static(s))
    }
}

impl From<String> for LogStr {
    fn from(s: String) -> Self {
        LogStr(Repr::Owned(s))
    }
}

impl From<Arc<str>> for LogStr {
    fn from(s: Arc<str>) -> Self {
        LogStr(Repr::Shared(s))
    }
}

impl From<&Arc<str>> for LogStr {
    fn from(s: &Arc<str>) -> Self {
        LogStr(Repr::Shared(s.clone()))
    }
}

impl From<http::uri::PathAndQuery> for LogStr {
    fn from(p: http::uri::PathAndQuery) -> Self {
        LogStr(Repr::Path(p))
    }
}

impl Serialize for LogStr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
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
    pub route_name: Option<LogStr>,
    /// `%REQ(:METHOD)%`.
    pub method: Option<LogStr>,
    /// `%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%`.
    pub path: Option<LogStr>,
    /// `%PROTOCOL%`, e.g. `HTTP/1.1`, `HTTP/2`.
    pub protocol: Option<LogStr>,
    /// `%RESPONSE_CODE%`; 0 when no response was sent (Envoy prints 0 too).
    pub response_code: u16,
    /// `%RESPONSE_FLAGS%`.
    pub response_flags: ResponseFlags,
    /// `%RESPONSE_CODE_DETAILS%`, e.g. `via_upstream`.
    pub response_code_details: Option<LogStr>,
    /// `%CONNECTION_TERMINATION_DETAILS%`.
    pub connection_termination_details: Option<LogStr>,
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
    pub x_forwarded_for: Option<LogStr>,
    /// `%REQ(USER-AGENT)%`.
    pub user_agent: Option<LogStr>,
    /// `%REQ(X-REQUEST-ID)%`.
    pub request_id: Option<LogStr>,
    /// `%REQ(:AUTHORITY)%`.
    pub authority: Option<LogStr>,
    /// `%UPSTREAM_HOST%`.
    #[serde(serialize_with = "socket_addr")]
    pub upstream_host: Option<SocketAddr>,
    /// `%UPSTREAM_CLUSTER%`, e.g. `outbound|443||aliyun.com`.
    pub upstream_cluster: Option<LogStr>,
    /// `%UPSTREAM_LOCAL_ADDRESS%`.
    #[serde(serialize_with = "socket_addr")]
    pub upstream_local_address: Option<SocketAddr>,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`.
    #[serde(serialize_with = "socket_addr")]
    pub downstream_local_address: Option<SocketAddr>,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`.
    #[serde(serialize_with = "socket_addr")]
    pub downstream_remote_address: Option<SocketAddr>,
    /// `%REQUESTED_SERVER_NAME%` (SNI).
    pub requested_server_name: Option<LogStr>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub upstream_transport_failure_reason: Option<LogStr>,
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

/// How long the writer lets lines gather after the first one before writing them: lines reach
/// stdout within about this delay, and a busy proxy pays one wake-up and one `write` per batch
/// instead of per line.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(5);

/// Queued bytes that make the writer write at once instead of waiting for [`FLUSH_INTERVAL`].
const HIGH_WATER_BYTES: usize = 128 * 1024;

#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    write_errors: AtomicU64,
}

/// What the loggers hand to the writer thread, under one mutex held only to append or swap.
#[derive(Default)]
struct Queue {
    /// Whole JSON lines, in order.
    buf: Vec<u8>,
    /// Lines in `buf` (the capacity is counted in lines).
    lines: usize,
    /// Waiters of [`AccessLogger::flush`], answered once `buf` as of their call is written.
    flushes: Vec<oneshot::Sender<()>>,
    /// The writer sleeps without a deadline and needs a wake-up for the next line.
    writer_idle: bool,
    /// A wake-up is already on its way (high water or flush): do not send another.
    woken: bool,
    /// Every logger is gone: write what is left and exit.
    closed: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    wake: Condvar,
    capacity: usize,
    counters: Counters,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves a consistent queue (appends are single calls).
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Held by the loggers only: dropping the last one tells the writer to finish.
struct Shared(Arc<Inner>);

impl Drop for Shared {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

thread_local! {
    /// Serialisation scratch space, so a line costs no allocation and the queue lock is held
    /// only for a copy.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// Writes serialisable entries as JSON lines. Cheap to clone; clones share the writer.
///
/// Entries are serialised by the calling task and appended to a shared buffer; one writer thread
/// writes the buffer in batches, [`FLUSH_INTERVAL`] after the first line of a batch or sooner when
/// it grows large. The writer thread exits once every clone is dropped, after writing what is
/// queued; [`flush`](Self::flush) waits for everything logged before it (call it on shutdown).
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
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            capacity: capacity.max(1),
            counters: Counters::default(),
        });
        let thread_inner = inner.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_batches(&thread_inner, writer))?;
        Ok(Self {
            shared: Some(Arc::new(Shared(inner))),
        })
    }

    /// Whether entries are written at all; check it before building an expensive entry.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Queues `entry` as one JSON line. Never blocks on I/O; drops the entry if the queue is
    /// full.
    pub fn log<T: Serialize + ?Sized>(&self, entry: &T) {
        let Some(shared) = &self.shared else {
            return;
        };
        let inner = &shared.0;
        SCRATCH.with(|scratch| {
            // `try_borrow_mut`: a `Serialize` impl that logs would re-enter; give it a fresh
            // buffer rather than panic.
            let mut fresh = Vec::new();
            let mut borrowed = scratch.try_borrow_mut();
            let line = match borrowed.as_deref_mut() {
                Ok(buf) => buf,
                Err(_) => &mut fresh,
            };
            line.clear();
            if let Err(error) = serde_json::to_writer(&mut *line, entry) {
                warn!(%error, "access log entry could not be serialised");
                return;
            }
            line.push(b'\n');
            let wake = {
                let mut q = inner.lock();
                if q.lines >= inner.capacity {
                    None
                } else {
                    q.buf.extend_from_slice(line);
                    q.lines += 1;
                    // Wake the writer only to start a batch, or once when the batch is big.
                    let wake = (q.writer_idle || q.buf.len() >= HIGH_WATER_BYTES) && !q.woken;
                    if wake {
                        q.woken = true;
                    }
                    Some(wake)
                }
            };
            match wake {
                Some(true) => inner.wake.notify_one(),
                Some(false) => {}
                None => {
                    let dropped = inner.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    // The first drop and then every 1000th, so a stuck stdout does not flood
                    // stderr.
                    if dropped % 1000 == 1 {
                        warn!(dropped, "access log queue full; dropping entries");
                    }
                }
            }
            // Keep the scratch buffer from growing without bound after one huge entry.
            if line.capacity() > 64 * 1024 {
                *line = Vec::with_capacity(1024);
            }
        });
    }

    /// Waits until every entry queued before this call has been written and flushed.
    pub async fn flush(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let (ack, done) = oneshot::channel();
        {
            let mut q = shared.0.lock();
            q.flushes.push(ack);
            q.woken = true;
        }
        shared.0.wake.notify_one();
        let _ = done.await;
    }

    /// Entries dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.0.counters.dropped.load(Ordering::Relaxed))
    }

    /// Failed writes to the underlying writer.
    pub fn write_errors(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.0.counters.write_errors.load(Ordering::Relaxed))
    }
}

/// The writer thread: sleep until a line arrives, let a batch gather for [`FLUSH_INTERVAL`]
/// (less when it grows past [`HIGH_WATER_BYTES`] or someone flushes), write it with one call,
/// repeat; exit after the last batch once every logger is gone.
fn write_batches<W: Write>(inner: &Inner, mut writer: W) {
    let mut batch = Vec::new();
    loop {
        let (flushes, closed) = {
            let mut q = inner.lock();
            // Idle: nothing queued, wait for the first line without a deadline.
            while q.buf.is_empty() && q.flushes.is_empty() && !q.closed {
                q.writer_idle = true;
                q.woken = false;
                q = inner.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            q.writer_idle = false;
            // Linger so the batch fills, unless it is urgent.
            let urgent =
                |q: &Queue| q.closed || !q.flushes.is_empty() || q.buf.len() >= HIGH_WATER_BYTES;
            if !urgent(&q) {
                q.woken = false;
                q = inner
                    .wake
                    .wait_timeout_while(q, FLUSH_INTERVAL, |q| !urgent(q))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut q.buf, &mut batch);
            q.lines = 0;
            q.woken = false;
            (std::mem::take(&mut q.flushes), q.closed)
        };
        if !batch.is_empty() && writer.write_all(&batch).is_err() {
            inner.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        if (!batch.is_empty() || !flushes.is_empty()) && writer.flush().is_err() {
            inner.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        batch.clear();
        // Do not keep a burst's worth of memory forever.
        if batch.capacity() > 4 * HIGH_WATER_BYTES {
            batch = Vec::new();
        }
        for ack in flushes {
            let _ = ack.send(());
        }
        if closed && inner.lock().buf.is_empty() {
            return;
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
        let t = UNIX_EPOCH + Duration::from_millis(4_102_444_799_999);
        assert_eq!(format_start_time(t), "2099-12-31T23:59:59.999Z");
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
    fn socket_addresses_print_like_display() {
        #[derive(Serialize)]
        struct One(#[serde(serialize_with = "socket_addr")] Option<SocketAddr>);
        for text in [
            "0.0.0.0:0",
            "1.2.3.4:5",
            "10.244.1.20:15008",
            "255.255.255.255:65535",
            "203.0.113.10:443",
            "[fd00::1]:5555",
            "[::ffff:1.2.3.4]:80",
        ] {
            let addr: SocketAddr = text.parse().expect("addr");
            assert_eq!(addr.to_string(), text);
            assert_eq!(
                serde_json::to_string(&One(Some(addr))).expect("serialize"),
                format!("\"{text}\"")
            );
        }
        assert_eq!(
            serde_json::to_string(&One(None)).expect("serialize"),
            "null"
        );
    }

    #[test]
    fn log_str_sources_serialise_as_their_text() {
        let header = http::HeaderValue::from_static("curl/8.5.0");
        let path = http::uri::PathAndQuery::from_static("/a/b?c=d");
        let shared: Arc<str> = Arc::from("outbound|443||aliyun.com");
        let all = [
            (LogStr::from("HTTP/1.1"), "HTTP/1.1"),
            (LogStr::from(String::from("owned")), "owned"),
            (LogStr::from(&shared), "outbound|443||aliyun.com"),
            (LogStr::from_header(&header).expect("text"), "curl/8.5.0"),
            (LogStr::from(path), "/a/b?c=d"),
        ];
        for (s, text) in all {
            assert_eq!(s, text);
            assert_eq!(s.to_string(), text);
            assert_eq!(
                serde_json::to_string(&s).expect("serialize"),
                format!("\"{text}\"")
            );
        }
        let from_header = LogStr::from_header(&header).expect("text");
        assert_eq!(from_header.header_value(), Some(&header));
        assert_eq!(LogStr::from("x").header_value(), None);
        // Opaque bytes are not text: no field rather than a lossy one.
        let opaque = http::HeaderValue::from_bytes(b"\xffabc").expect("value");
        assert!(LogStr::from_header(&opaque).is_none());
        // Quotes and control characters are escaped like any JSON string.
        let quoted = http::HeaderValue::from_static("a \"b\"");
        assert_eq!(
            serde_json::to_string(&LogStr::from_header(&quoted)).expect("serialize"),
            r#""a \"b\"""#
        );
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
                        entry.path =
                            Some(format!("/task/{task}/{}", "x".repeat(i as usize % 300)).into());
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

    /// Blocks every write until the gate opens; records what was written.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        written: Capture,
    }

    impl Gate {
        fn open(&self) {
            *self.open.0.lock().expect("lock") = true;
            self.open.1.notify_all();
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cvar) = &*self.open;
            let _open = cvar
                .wait_while(lock.lock().expect("lock"), |open| !*open)
                .expect("lock");
            self.written.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn full_queue_drops_instead_of_blocking() {
        let gate = Gate::default();
        let logger = AccessLogger::with_capacity(gate.clone(), 2).expect("logger");
        let started = std::time::Instant::now();
        for i in 0..10 {
            logger.log(&format!("line {i}"));
            // Let the writer take the first batch and block in `write`.
            if i == 0 {
                tokio::time::sleep(FLUSH_INTERVAL * 4).await;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "log() must not block"
        );
        // The writer holds the first line; two more fit in the queue; the rest are dropped.
        assert_eq!(logger.dropped(), 7);
        gate.open();
        logger.flush().await;
        let text = String::from_utf8(gate.written.0.lock().expect("lock").clone()).expect("utf8");
        assert_eq!(text, "\"line 0\"\n\"line 1\"\n\"line 2\"\n");
    }

    /// Counts `write` calls.
    #[derive(Clone, Default)]
    struct Counting {
        data: Capture,
        writes: Arc<AtomicU64>,
    }

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.data.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn lines_are_written_in_batches() {
        let out = Counting::default();
        let logger = AccessLogger::to_writer(out.clone()).expect("logger");
        for i in 0..2000u64 {
            let mut entry = AccessLogEntry::new(SystemTime::now());
            entry.bytes_sent = i;
            logger.log(&entry);
        }
        logger.flush().await;
        let text = String::from_utf8(out.data.0.lock().expect("lock").clone()).expect("utf8");
        let sent: Vec<u64> = text
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("json line");
                v["bytes_sent"].as_u64().expect("bytes_sent")
            })
            .collect();
        assert_eq!(sent, (0..2000).collect::<Vec<_>>(), "every line, in order");
        let writes = out.writes.load(Ordering::Relaxed);
        // ~700 bytes a line: a handful of high-water batches, not one write per line.
        assert!(writes < 100, "{writes} writes for 2000 lines");
    }

    #[tokio::test]
    async fn lines_arrive_without_flush_and_when_the_logger_is_dropped() {
        let out = Counting::default();
        let logger = AccessLogger::to_writer(out.clone()).expect("logger");
        let wait_for = |n: usize| {
            let data = out.data.clone();
            async move {
                for _ in 0..200 {
                    if data
                        .0
                        .lock()
                        .expect("lock")
                        .iter()
                        .filter(|b| **b == b'\n')
                        .count()
                        >= n
                    {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                false
            }
        };
        logger.log("first");
        assert!(
            wait_for(1).await,
            "a lone line is written after the interval"
        );
        logger.log("second");
        drop(logger);
        assert!(
            wait_for(2).await,
            "the last logger's drop writes what is queued"
        );
        assert_eq!(
            out.data.0.lock().expect("lock").as_slice(),
            b"\"first\"\n\"second\"\n"
        );
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
