//! Prometheus metrics of the Kubernetes configuration source. Created unregistered, like
//! `telemetry::Metrics` they go into whatever registry the binary serves
//! ([`KubeSourceMetrics::register`]).
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// `strait_kube_*` metrics. Clones share the same counters.
#[derive(Clone, Debug)]
pub struct KubeSourceMetrics {
    /// Watch events per kind and event (`apply`, `delete`, `init`, `init_apply`, `init_done`).
    pub(crate) events: IntCounterVec,
    /// Errors from the list/watch of a kind (the watcher retries with backoff).
    pub(crate) errors: IntCounterVec,
    /// Relists after the first one (watch expired / 410 Gone / reconnect after an error).
    pub(crate) restarts: IntCounterVec,
    /// 1 while the kind's resource is not served (CRD not installed: 404).
    pub(crate) missing: IntGaugeVec,
    /// Objects per kind in the local cache.
    pub(crate) objects: IntGaugeVec,
    /// Snapshot rebuilds by result: `ok` (published) or `rejected` (invalid; last good kept).
    pub(crate) reloads: IntCounterVec,
    /// 1 for the version each kind is watched at (`kind`, `version`).
    pub(crate) version: IntGaugeVec,
    /// Running pods on this node whose network namespace was not found (yet).
    pub(crate) pods_without_netns: IntGauge,
}

impl KubeSourceMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        Ok(KubeSourceMetrics {
            events: counter(
                "strait_kube_watch_events_total",
                "Watch events received from the Kubernetes API, by kind and event",
                &["kind", "event"],
            )?,
            errors: counter(
                "strait_kube_watch_errors_total",
                "List/watch errors from the Kubernetes API (retried with backoff), by kind",
                &["kind"],
            )?,
            restarts: counter(
                "strait_kube_watch_restarts_total",
                "Relists after the initial list (expired watch, 410 Gone, reconnect), by kind",
                &["kind"],
            )?,
            missing: IntGaugeVec::new(
                Opts::new(
                    "strait_kube_resource_missing",
                    "1 while the API server does not serve the kind (CRD not installed)",
                ),
                &["kind"],
            )?,
            objects: IntGaugeVec::new(
                Opts::new(
                    "strait_kube_objects",
                    "Objects of each kind in the local cache",
                ),
                &["kind"],
            )?,
            reloads: counter(
                "strait_kube_config_reloads_total",
                "Snapshot rebuilds from the Kubernetes API by result (ok, rejected)",
                &["result"],
            )?,
            version: IntGaugeVec::new(
                Opts::new(
                    "strait_kube_resource_version",
                    "1 for the API version each kind is watched at (discovered for Istio and Gateway API kinds)",
                ),
                &["kind", "version"],
            )?,
            pods_without_netns: IntGauge::new(
                "strait_kube_pods_without_netns",
                "Running pods on this node whose network namespace was not found yet",
            )?,
        })
    }

    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.events.clone()))?;
        registry.register(Box::new(self.errors.clone()))?;
        registry.register(Box::new(self.restarts.clone()))?;
        registry.register(Box::new(self.missing.clone()))?;
        registry.register(Box::new(self.objects.clone()))?;
        registry.register(Box::new(self.reloads.clone()))?;
        registry.register(Box::new(self.version.clone()))?;
        registry.register(Box::new(self.pods_without_netns.clone()))?;
        Ok(())
    }

    /// Rebuilds with `result` (`ok` / `rejected`) so far.
    pub fn reloads(&self, result: &str) -> u64 {
        self.reloads.with_label_values(&[result]).get()
    }

    /// Errors seen while listing/watching `kind`.
    pub fn watch_errors(&self, kind: &str) -> u64 {
        self.errors.with_label_values(&[kind]).get()
    }

    /// Relists of `kind` after its first list.
    pub fn watch_restarts(&self, kind: &str) -> u64 {
        self.restarts.with_label_values(&[kind]).get()
    }

    /// Watch events of `kind` with `event` (`apply`, `delete`, `init`, `init_apply`, `init_done`).
    pub fn watch_events(&self, kind: &str, event: &str) -> u64 {
        self.events.with_label_values(&[kind, event]).get()
    }

    /// 1 while `kind` is watched at `version` (e.g. `ServiceEntry`, `v1beta1`), else 0.
    pub fn resource_version(&self, kind: &str, version: &str) -> i64 {
        // Read through `collect` so that asking does not create the series.
        use prometheus::core::Collector;
        let want = [("kind", kind), ("version", version)];
        self.version
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .find(|m| {
                want.iter().all(|(n, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *n && l.value() == *v)
                })
            })
            .map_or(0, |m| m.get_gauge().get_value() as i64)
    }
}
