//! Telemetry shared by ztunnel and the waypoint, shaped like Istio's so existing dashboards,
//! alerts and log pipelines work unchanged:
//!
//! - [`init_tracing`]: diagnostics via `tracing`, to **stderr** (stdout carries access logs).
//! - [`metrics`]: Prometheus metrics with Istio's names and labels, plus our config metrics.
//! - [`access_log`]: Istio's default JSON access-log lines and ztunnel-style connection lines.
//! - [`admin`]: readiness, `/metrics` (`/stats/prometheus`) and `/config_dump` over HTTP.
//! - [`flags`]: Envoy's response flags.

pub mod access_log;
pub mod admin;
pub mod flags;
pub mod metrics;

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

pub use access_log::{
    AccessLogEntry, AccessLogger, ConnectionLogEntry, ConnectionOutcome, Direction, LogStr,
};
pub use admin::{AdminState, Endpoints, Readiness};
pub use flags::{ResponseFlag, ResponseFlags};
pub use metrics::{
    ConnectionLabels, ConnectionMetrics, Metrics, Reporter, RequestLabels, RequestLabelsRef,
    RequestProtocol, SecurityPolicy, ServiceLabels, ServiceLabelsRef, TrafficLabels,
    WorkloadLabels, WorkloadLabelsRef,
};

/// Errors from setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter directive did not parse.
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
    /// A global tracing subscriber is already installed.
    #[error("tracing is already initialised: {0}")]
    AlreadyInitialized(String),
    /// Registering or encoding metrics failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// How diagnostic logs are formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per event.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Plain => "plain",
            LogFormat::Json => "json",
        })
    }
}

/// A log format other than `plain` or `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format {0:?} (expected \"plain\" or \"json\")")]
pub struct UnknownLogFormat(pub String);

impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "plain" | "text" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            _ => Err(UnknownLogFormat(s.to_owned())),
        }
    }
}

/// Installs the global `tracing` subscriber: `filter` uses `RUST_LOG` syntax (e.g.
/// `info,hickory_server=warn`), output goes to stderr. Fails if `filter` does not parse or a
/// subscriber is already installed.
pub fn init_tracing(format: LogFormat, filter: &str) -> Result<(), TelemetryError> {
    let env_filter = tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|e| TelemetryError::Filter {
            filter: filter.to_owned(),
            reason: e.to_string(),
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Plain => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|e| TelemetryError::AlreadyInitialized(e.to_string()))
}
