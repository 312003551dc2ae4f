//! The controller's Prometheus metrics.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// How one reconcile ended; the `result` label of [`ControllerMetrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Objects applied; the Gateway is Programmed.
    Programmed,
    /// Objects applied; waiting for the Service address or an available replica.
    Pending,
    /// Another class, never ours: nothing done.
    Ignored,
    /// The class changed away from ours: our objects and status were removed.
    Released,
    /// The Gateway is being deleted: our objects were removed.
    Deleted,
    /// The Gateway cannot be deployed as is (e.g. its name is not a valid Service name).
    Invalid,
    /// An API request failed; retried with backoff.
    Error,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Programmed => "programmed",
            Outcome::Pending => "pending",
            Outcome::Ignored => "ignored",
            Outcome::Released => "released",
            Outcome::Deleted => "deleted",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

/// Reconcile counts by result and their duration. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ControllerMetrics {
    reconciles: IntCounterVec,
    duration: HistogramVec,
}

impl ControllerMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reconciles = IntCounterVec::new(
            Opts::new(
                "strait_waypoint_controller_reconciles_total",
                "Gateway reconciles by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "strait_waypoint_controller_reconcile_duration_seconds",
                "Time one Gateway reconcile took, API round trips included",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["result"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            reconciles,
            duration,
        })
    }

    /// Counts one reconcile.
    pub fn record(&self, outcome: Outcome, seconds: f64) {
        let label = [outcome.as_str()];
        self.reconciles.with_label_values(&label).inc();
        self.duration.with_label_values(&label).observe(seconds);
    }

    /// Reconciles so far that ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.reconciles.with_label_values(&[outcome.as_str()]).get()
    }
}
