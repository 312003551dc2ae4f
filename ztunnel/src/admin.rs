//! The admin endpoints: `/config_dump` (15000), `/metrics` + `/stats/prometheus` (15020) and
//! `/healthz/ready` (15021), each on its own configurable address (tests run several ztunnels on
//! one loopback). Every listener serves the same router ([`telemetry::admin`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use mesh_config::ConfigStore;
use serde_json::{Value, json};
use telemetry::{AdminState, Metrics, Readiness};
use tokio::net::TcpListener;

use crate::identity::Identities;
use crate::pods::PodStatus;

/// What `/config_dump` shows: node, snapshot generation (and the last rejected reload), the pods
/// served with their state, the identities minted, and the snapshot itself.
pub fn config_dump(
    node: &str,
    store: &ConfigStore,
    pods: &Mutex<Vec<PodStatus>>,
    identities: &Identities,
) -> Value {
    let snap = store.current();
    let pods = pods.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let last_error = store
        .last_error()
        .map(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>());
    json!({
        "node": node,
        "generation": store.generation(),
        "config_dir": store.dir().map(|d| d.display().to_string()),
        "last_error": last_error,
        "pods": pods,
        "identities": identities.served(),
        "snapshot": serde_json::to_value(&*snap).unwrap_or(Value::Null),
    })
}

/// The router state shared by the three listeners.
pub fn state(
    metrics: Arc<Metrics>,
    readiness: Readiness,
    dump: impl Fn() -> Value + Send + Sync + 'static,
) -> AdminState {
    AdminState::new(metrics, readiness).with_config_dump(dump)
}

/// Binds one admin listener; a clear error names the address (typically already in use).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Bind { addr, source })
}
