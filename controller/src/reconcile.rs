//! The I/O edge: applies [`crate::desired`]'s objects with server-side apply, writes the Gateway
//! and GatewayClass status, removes our objects when a Gateway stops being ours, and runs the
//! [`kube::runtime::Controller`]s (one for Gateways, one for GatewayClasses).
//!
//! Deletion: every object carries a controller ownerReference to its Gateway, so when a Gateway
//! is deleted **Kubernetes' garbage collector does the work**; the controller is not even called
//! for a Gateway that is already gone (it uses no finalizer, so it can never block a deletion).
//! The explicit, idempotent [`cleanup`] runs when the controller sees a Gateway that is
//! terminating (a `deletionTimestamp`: foreground deletion, or someone else's finalizer) and when
//! a Gateway's class changed away from ours — GC would not act then, the owner still exists.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::desired::{
    self, FIELD_MANAGER, GatewayRef, InvalidGateway, MANAGED_BY_LABEL, MANAGED_BY_VALUE, Settings,
};
use crate::gateway::{Gateway, GatewayClass};
use crate::metrics::{ControllerMetrics, Outcome};

/// Resync interval for a healthy Gateway: watches deliver changes, this only repairs drift a
/// missed event would leave.
const RESYNC: Duration = Duration::from_secs(30 * 60);
/// How often readiness re-checks whether the Gateway cache has synced.
const READY_POLL: Duration = Duration::from_secs(1);
/// Retry delays after API errors: doubling from the first, capped at the last.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Gateway cannot be deployed as it is; retrying will not help until it is edited.
    #[error(transparent)]
    Invalid(#[from] InvalidGateway),
    /// An API request failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    settings: Settings,
    metrics: ControllerMetrics,
    /// Consecutive failures per Gateway (`namespace/name`), for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: ControllerMetrics) -> Self {
        Self {
            client,
            settings,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The metrics reconciles are counted in.
    pub fn metrics(&self) -> &ControllerMetrics {
        &self.metrics
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // The map holds plain counters: a panic elsewhere cannot leave it inconsistent.
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more consecutive failure of `key`: the attempt number and its retry delay.
    fn next_retry(&self, key: String) -> (u32, Duration) {
        let mut failures = self.failures();
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        (*n, backoff_delay(*n))
    }
}

/// The backoff key of a GatewayClass. Gateway keys are `namespace/name`; a class name holds no
/// space, a namespace neither, so the two never collide.
fn class_key(class: &GatewayClass) -> String {
    format!(
        "GatewayClass {}",
        class.metadata.name.as_deref().unwrap_or_default()
    )
}

fn key_of(gateway: &Gateway) -> String {
    format!(
        "{}/{}",
        gateway.metadata.namespace.as_deref().unwrap_or_default(),
        gateway.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The reconciler handed to [`Controller::run`]: brings one Gateway's objects and status to
/// their desired state and counts the outcome.
pub async fn reconcile(gateway: Arc<Gateway>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_gateway(&gateway, &ctx).await;
    let outcome = match &result {
        Ok(outcome) => *outcome,
        Err(Error::Invalid(_)) => Outcome::Invalid,
        Err(Error::Kube(_)) => Outcome::Error,
    };
    ctx.metrics.record(outcome, started.elapsed().as_secs_f64());
    let outcome = result?;
    ctx.failures().remove(&key_of(&gateway));
    Ok(match outcome {
        // Watches on the Gateway and on our objects trigger the next reconcile; the resync
        // only repairs drift.
        Outcome::Programmed | Outcome::Pending => Action::requeue(RESYNC),
        _ => Action::await_change(),
    })
}

/// The error policy handed to [`Controller::run`]: API errors retry with per-Gateway exponential
/// backoff; an invalid Gateway waits for an edit (which the watch delivers).
pub fn error_policy(gateway: Arc<Gateway>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = key_of(&gateway);
    match error {
        Error::Invalid(reason) => {
            warn!(gateway = %key, %reason, "cannot deploy a waypoint for this gateway");
            Action::await_change()
        }
        Error::Kube(error) => {
            let (attempt, delay) = ctx.next_retry(key.clone());
            warn!(gateway = %key, %error, attempt, retry_in = ?delay, "reconcile failed");
            Action::requeue(delay)
        }
    }
}

/// The delay before retry number `attempt` (1-based): 1 s, 2 s, 4 s, … capped at 5 minutes.
pub fn backoff_delay(attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(16);
    BACKOFF_BASE
        .saturating_mul(1u32 << exponent)
        .min(BACKOFF_MAX)
}

async fn reconcile_gateway(gateway: &Gateway, ctx: &Context) -> Result<Outcome, Error> {
    let settings = &ctx.settings;
    if !desired::is_ours(gateway, settings) {
        if !desired::was_managed_by_us(gateway) {
            // Another class, and we never wrote to it: not a single request.
            return Ok(Outcome::Ignored);
        }
        let gw = GatewayRef::of(gateway)?;
        info!(gateway = %gw.key(), class = %gateway.spec.gateway_class_name,
            "gateway class changed away from ours; removing its waypoint");
        cleanup(&ctx.client, &gw).await?;
        release_status(&ctx.client, &gw).await?;
        return Ok(Outcome::Released);
    }

    let gw = GatewayRef::of(gateway)?;
    if gateway.metadata.deletion_timestamp.is_some() {
        debug!(gateway = %gw.key(), "gateway is terminating; removing its waypoint");
        cleanup(&ctx.client, &gw).await?;
        return Ok(Outcome::Deleted);
    }

    let (service_account, deployment, service) = desired::desired(gateway, settings)?;
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let ns = gw.namespace.as_str();
    Api::<ServiceAccount>::namespaced(ctx.client.clone(), ns)
        .patch(&gw.name, &apply, &Patch::Apply(&service_account))
        .await?;
    let deployment = Api::<Deployment>::namespaced(ctx.client.clone(), ns)
        .patch(&gw.name, &apply, &Patch::Apply(&deployment))
        .await?;
    let service = Api::<Service>::namespaced(ctx.client.clone(), ns)
        .patch(&gw.name, &apply, &Patch::Apply(&service))
        .await?;

    let now = Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_default());
    let status = desired::desired_status(gateway, settings, &service, &deployment, &now);
    let programmed = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Programmed" && c.status == "True");
    if desired::status_differs(gateway, &status) {
        // Server-side apply on the status subresource: we own `addresses` and our two
        // conditions (a list-map keyed by type), other writers' conditions are left alone.
        let body = serde_json::json!({
            "apiVersion": <Gateway as k8s_openapi::Resource>::API_VERSION,
            "kind": <Gateway as k8s_openapi::Resource>::KIND,
            "metadata": { "name": gw.name, "namespace": gw.namespace },
            "status": status,
        });
        Api::<Gateway>::namespaced(ctx.client.clone(), ns)
            .patch_status(&gw.name, &apply, &Patch::Apply(&body))
            .await?;
        info!(gateway = %gw.key(), programmed, "gateway status updated");
    }
    Ok(if programmed {
        Outcome::Programmed
    } else {
        Outcome::Pending
    })
}

/// The reconciler of the GatewayClass controller: sets `Accepted=True` on our class (see
/// [`desired::is_our_class`]) with a server-side apply of the status subresource, only when that
/// changes it. Any other class — Istio's of the same name included — gets no request at all.
pub async fn reconcile_class(class: Arc<GatewayClass>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !desired::is_our_class(&class, &ctx.settings) {
        // `controllerName` is immutable, so a class that is not ours never becomes ours by an
        // edit; a replacement class is a new object and reconciled on its own.
        debug!(class = ?class.metadata.name, controller = %class.spec.controller_name,
            "gateway class is not ours; leaving it");
        return Ok(Action::await_change());
    }
    let name = class.metadata.name.as_deref().unwrap_or_default();
    let now = Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_default());
    let status = desired::desired_class_status(&class, &now);
    if desired::class_status_differs(&class, &status) {
        // Like the Gateway status: we own our condition (conditions are a list-map keyed by
        // type), other writers' conditions stay.
        let body = serde_json::json!({
            "apiVersion": <GatewayClass as k8s_openapi::Resource>::API_VERSION,
            "kind": <GatewayClass as k8s_openapi::Resource>::KIND,
            "metadata": { "name": name },
            "status": status,
        });
        Api::<GatewayClass>::all(ctx.client.clone())
            .patch_status(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        info!(class = %name, "gateway class accepted");
    }
    ctx.failures().remove(&class_key(&class));
    Ok(Action::requeue(RESYNC))
}

/// The error policy of the GatewayClass controller: API errors retry with exponential backoff.
pub fn class_error_policy(class: Arc<GatewayClass>, error: &Error, ctx: Arc<Context>) -> Action {
    let (attempt, delay) = ctx.next_retry(class_key(&class));
    warn!(class = ?class.metadata.name, %error, attempt, retry_in = ?delay,
        "gateway class reconcile failed");
    Action::requeue(delay)
}

/// Whether `meta` is an object this controller created for `gw`: our label and a controller
/// reference to this very Gateway (by uid, so a re-created Gateway of the same name is not
/// confused with the old one). Anything else of the same name is left alone.
pub fn owned_by(meta: &ObjectMeta, gw: &GatewayRef) -> bool {
    let labelled = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY_VALUE);
    let owned = meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == gw.uid && o.controller == Some(true));
    labelled && owned
}

/// Deletes the Deployment, Service and ServiceAccount we created for `gw`. Idempotent: objects
/// already gone, or not ours, are skipped; the uid precondition makes sure an object replaced
/// between the read and the delete is not removed.
pub async fn cleanup(client: &Client, gw: &GatewayRef) -> Result<(), kube::Error> {
    let ns = gw.namespace.as_str();
    delete_owned(Api::<Deployment>::namespaced(client.clone(), ns), gw).await?;
    delete_owned(Api::<Service>::namespaced(client.clone(), ns), gw).await?;
    delete_owned(Api::<ServiceAccount>::namespaced(client.clone(), ns), gw).await?;
    Ok(())
}

async fn delete_owned<K>(api: Api<K>, gw: &GatewayRef) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let kind = K::kind(&());
    let Some(object) = api.get_opt(&gw.name).await? else {
        return Ok(());
    };
    if !owned_by(object.meta(), gw) {
        debug!(gateway = %gw.key(), %kind, "same-named object is not ours; leaving it");
        return Ok(());
    }
    let params = DeleteParams::background().preconditions(Preconditions {
        uid: object.meta().uid.clone(),
        resource_version: None,
    });
    match api.delete(&gw.name, &params).await {
        Ok(_) => {
            info!(gateway = %gw.key(), %kind, "deleted");
            Ok(())
        }
        // Gone already, or replaced by another object since the read: nothing of ours to delete.
        Err(kube::Error::Api(status)) if status.is_not_found() || status.is_conflict() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Gives up every status field we own: a server-side apply with no status at all releases them,
/// and the API server removes fields no other manager owns.
async fn release_status(client: &Client, gw: &GatewayRef) -> Result<(), kube::Error> {
    let body = serde_json::json!({
        "apiVersion": <Gateway as k8s_openapi::Resource>::API_VERSION,
        "kind": <Gateway as k8s_openapi::Resource>::KIND,
        "metadata": { "name": gw.name, "namespace": gw.namespace },
    });
    let result = Api::<Gateway>::namespaced(client.clone(), &gw.namespace)
        .patch_status(
            &gw.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Runs the controllers until `shutdown` completes: one watches every Gateway (the class is in the
/// spec, which no field selector can filter on) and our own objects (by label), so a change to
/// either — e.g. the Service getting its cluster IP, the Deployment becoming available —
/// reconciles the owning Gateway; the other watches the GatewayClass of our name (a field
/// selector on `metadata.name`) and reports it accepted. `on_ready` is called once the Gateway
/// cache has synced.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: ControllerMetrics,
    on_ready: impl FnOnce() + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    // Both controllers stop on the same signal.
    let shutdown = shutdown.boxed().shared();
    let classes = Controller::new(
        Api::<GatewayClass>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", settings.gateway_class)),
    )
    .graceful_shutdown_on(shutdown.clone());
    let owned = watcher::Config::default().labels(&desired::managed_selector());
    let controller = Controller::new(
        Api::<Gateway>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Deployment>::all(client.clone()), owned.clone())
    .owns(Api::<Service>::all(client.clone()), owned.clone())
    .owns(Api::<ServiceAccount>::all(client.clone()), owned)
    .graceful_shutdown_on(shutdown);
    let store = controller.store();
    tokio::spawn(async move {
        // Re-polled every second rather than awaited once: kube-runtime 5.0.0's store readiness
        // keeps a single waker (a oneshot behind a mutex), and the controller's own applier
        // waits on it too, so one of two concurrent waiters is never woken — seen in the
        // mock-API-server test, where a bare `.await` hung although the cache had synced.
        loop {
            match tokio::time::timeout(READY_POLL, store.wait_until_ready()).await {
                Ok(Ok(())) => {
                    info!("gateway cache synced");
                    on_ready();
                    return;
                }
                // The controller stopped before the cache synced.
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        }
    });
    let ctx = Arc::new(Context::new(client, settings, metrics));
    let gateways = controller
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(gateway = %object, "reconciled"),
                // Children being garbage-collected after their Gateway was deleted trigger
                // reconciles of a Gateway no longer in the cache: expected.
                Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
                    debug!(gateway = %object, "gateway is gone")
                }
                // Already logged with its context by `error_policy`.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(error) => warn!(%error, "controller"),
            }
        });
    let classes = classes
        .run(reconcile_class, class_error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(class = %object, "reconciled"),
                Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
                    debug!(class = %object, "gateway class is gone")
                }
                // Already logged by `class_error_policy`.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(error) => warn!(%error, "gateway class controller"),
            }
        });
    futures::join!(gateways, classes);
}

#[cfg(test)]
mod tests;
