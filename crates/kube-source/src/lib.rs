//! The Kubernetes API as the mesh configuration source.
//!
//! One watcher + reflector per kind mesh-config compiles (see [`kinds::KINDS`]). Kinds that
//! older control planes serve at older versions (Istio < 1.22: `v1beta1`) are watched at the
//! first version the API server's discovery lists. On any change the source waits for a quiet
//! period (debounce), turns every cached object into JSON and compiles the lot with
//! [`mesh_config::load_sources`] — the same loader, validation and error messages as directory
//! mode. A valid result is published with [`ConfigStore::replace`]; an
//! invalid one is recorded ([`ConfigStore::record_error`]) and the last good snapshot stays.
//!
//! No snapshot is published before every kind has been listed once (a kind whose CRD is not
//! installed counts as listed and empty), so readers never see a half-loaded mesh.
//!
//! Secrets are read by a waypoint only ([`KubeSourceOptions::secret_namespace`]), in its own
//! namespace, and only those a DestinationRule names as `credentialName` reach the loader; a
//! 403 there (no RoleBinding) counts as listed and empty.
//!
//! ```no_run
//! # async fn f() -> Result<(), kube_source::KubeSourceError> {
//! let opts = kube_source::KubeSourceOptions::default();
//! let (store, handle) = kube_source::KubeSource::start_default(opts).await?;
//! // ... serve from `store`; keep `handle` alive (dropping it stops watching).
//! # drop((store, handle)); Ok(()) }
//! ```
pub mod kinds;
pub mod metrics;
pub mod netns;

mod build;

pub use metrics::KubeSourceMetrics;

use futures::StreamExt;
use kinds::{KINDS, KindSpec, Scope};
use kube::api::{Api, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff as _;
use kube::runtime::{WatchStreamExt, watcher};
use mesh_config::{ConfigStore, LoadErrors};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// While pods on this node wait for their network namespace, rescan this often even without
/// API changes (the sandbox process may start after the pod's last status update).
const NETNS_RESCAN: Duration = Duration::from_secs(2);

/// Where a binary takes its mesh configuration from (`--config-source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConfigSource {
    /// A directory of YAML (or the embedded default), watched for changes.
    #[default]
    Dir,
    /// The Kubernetes API server (in-cluster config or `KUBECONFIG`).
    Kube,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown config source {0:?} (use dir or kube)")]
pub struct UnknownConfigSource(String);

impl FromStr for ConfigSource {
    type Err = UnknownConfigSource;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dir" => Ok(ConfigSource::Dir),
            "kube" => Ok(ConfigSource::Kube),
            other => Err(UnknownConfigSource(other.to_owned())),
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigSource::Dir => "dir",
            ConfigSource::Kube => "kube",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("cannot create a Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    #[error(
        "initial sync from the Kubernetes API did not finish within {timeout:?}; not listed yet: {pending}"
    )]
    InitialSyncTimeout { timeout: Duration, pending: String },
    #[error("the mesh configuration in the cluster is invalid: {0}")]
    Invalid(Arc<LoadErrors>),
    #[error("cannot create metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Settings of [`KubeSource`].
#[derive(Debug, Clone)]
pub struct KubeSourceOptions {
    /// ztunnel: the node it serves. Pods on this node get their network namespace discovered
    /// under `proc_root`. `None` (waypoint): no discovery.
    pub node: Option<String>,
    /// The host's `/proc` (needs `hostPID`, see [`netns`]).
    pub proc_root: PathBuf,
    /// Quiet period after a change before rebuilding.
    pub debounce: Duration,
    /// How long [`KubeSource::start`] waits for the first valid snapshot.
    pub initial_sync_timeout: Duration,
    /// Waypoint: its own namespace, whose Secrets are watched for DestinationRule
    /// `credentialName` (Istio's rule for gateways). `None` (ztunnel): no Secret is read.
    pub secret_namespace: Option<String>,
}

impl Default for KubeSourceOptions {
    fn default() -> Self {
        KubeSourceOptions {
            node: None,
            proc_root: PathBuf::from("/proc"),
            debounce: mesh_config::store::DEBOUNCE,
            initial_sync_timeout: Duration::from_secs(60),
            secret_namespace: None,
        }
    }
}

/// Sync state of one kind.
#[derive(Default)]
struct KindState {
    listed: AtomicBool,
    missing: AtomicBool,
    /// 1 + index into the kind's `versions` of the version watched last; 0 before the first.
    version: AtomicUsize,
}

struct Shared {
    kinds: Vec<KindState>,
    changed: Notify,
    store: watch::Sender<Option<ConfigStore>>,
    /// Errors of the last rejected rebuild before the first snapshot (for the timeout error).
    initial_errors: Mutex<Option<Arc<LoadErrors>>>,
    metrics: KubeSourceMetrics,
}

impl Shared {
    fn all_listed(&self) -> bool {
        self.kinds.iter().all(|k| k.listed.load(Ordering::Acquire))
    }

    fn pending(&self) -> Vec<&'static str> {
        KINDS
            .iter()
            .zip(&self.kinds)
            .filter(|(_, k)| !k.listed.load(Ordering::Acquire))
            .map(|(s, _)| s.kind)
            .collect()
    }

    /// The version of `KINDS[index]` watched last (kept while the kind is missing: cached
    /// objects stay and are handed to the loader at that version).
    fn version(&self, index: usize) -> Option<&'static str> {
        let i = self.kinds[index].version.load(Ordering::Acquire);
        KINDS[index].versions.get(i.checked_sub(1)?).copied()
    }

    /// Records that `KINDS[index]` is watched at `version` (metric, log on change).
    fn use_version(&self, index: usize, version: &'static str) {
        let spec = &KINDS[index];
        let Some(pos) = spec.versions.iter().position(|v| *v == version) else {
            return;
        };
        let previous = self.version(index);
        if previous == Some(version) {
            return;
        }
        self.kinds[index].version.store(pos + 1, Ordering::Release);
        let gauge = &self.metrics.version;
        if let Some(old) = previous {
            // Drop the old series instead of leaving a stale 0 behind.
            let _ = gauge.remove_label_values(&[spec.kind, old]);
        }
        gauge.with_label_values(&[spec.kind, version]).set(1);
        let api_version = spec.api_version(version);
        if pos == 0 {
            info!(kind = spec.kind, %api_version, "watching");
        } else {
            info!(kind = spec.kind, %api_version, preferred = %spec.api_version(spec.preferred_version()),
                "watching an older version: the API server does not serve the preferred one (older control plane)");
        }
    }

    /// `KINDS[index]` is not served: logged once per disappearance, treated as listed and
    /// empty (its cached objects stay), retried with backoff by the caller.
    fn mark_missing(&self, index: usize) {
        let spec = &KINDS[index];
        let state = &self.kinds[index];
        if !state.missing.swap(true, Ordering::AcqRel) {
            self.metrics.missing.with_label_values(&[spec.kind]).set(1);
            let versions: Vec<String> = spec.versions.iter().map(|v| spec.api_version(v)).collect();
            warn!(kind = spec.kind, resource = %spec.resource_name(), api_versions = ?versions,
                "resource not served by the API server (CRD not installed?); treating it as empty and retrying");
        }
        if !state.listed.swap(true, Ordering::AcqRel) {
            self.changed.notify_one();
        }
    }
}

/// Entry points; see the crate docs.
pub struct KubeSource;

impl KubeSource {
    /// [`KubeSource::start`] with `kube::Client::try_default()` (in-cluster service account,
    /// else `KUBECONFIG` / `~/.kube/config`).
    pub async fn start_default(
        opts: KubeSourceOptions,
    ) -> Result<(ConfigStore, KubeSourceHandle), KubeSourceError> {
        let client = kube::Client::try_default()
            .await
            .map_err(KubeSourceError::Client)?;
        Self::start(client, opts).await
    }

    /// Starts watching and waits (up to `opts.initial_sync_timeout`) for the first valid
    /// snapshot, which becomes generation 1 of the returned store.
    pub async fn start(
        client: kube::Client,
        opts: KubeSourceOptions,
    ) -> Result<(ConfigStore, KubeSourceHandle), KubeSourceError> {
        let timeout = opts.initial_sync_timeout;
        let handle = Self::spawn(client, opts)?;
        let store = handle.wait_ready(timeout).await?;
        Ok((store, handle))
    }

    /// Starts watching without waiting; [`KubeSourceHandle::wait_ready`] /
    /// [`KubeSourceHandle::store`] give the store once the first snapshot is built.
    pub fn spawn(
        client: kube::Client,
        opts: KubeSourceOptions,
    ) -> Result<KubeSourceHandle, KubeSourceError> {
        let metrics = KubeSourceMetrics::new()?;
        let (store_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            kinds: KINDS.iter().map(|_| KindState::default()).collect(),
            changed: Notify::new(),
            store: store_tx,
            initial_errors: Mutex::new(None),
            metrics: metrics.clone(),
        });
        let mut tasks = Vec::with_capacity(KINDS.len() + 1);
        let mut stores = Vec::with_capacity(KINDS.len());
        for (i, spec) in KINDS.iter().enumerate() {
            // The store's key type only; objects keep their keys across version switches.
            let writer = reflector::store::Writer::new(spec.api_resource(spec.preferred_version()));
            stores.push(writer.as_reader());
            let namespace = match spec.scope {
                Scope::OwnNamespace => match &opts.secret_namespace {
                    Some(ns) => Some(ns.clone()),
                    None => {
                        // Not wanted: listed and empty from the start.
                        shared.kinds[i].listed.store(true, Ordering::Release);
                        continue;
                    }
                },
                _ => None,
            };
            tasks.push(tokio::spawn(watch_kind(
                i,
                client.clone(),
                namespace,
                writer,
                shared.clone(),
            )));
        }
        tasks.push(tokio::spawn(build_loop(shared.clone(), stores, opts)));
        Ok(KubeSourceHandle { shared, tasks })
    }
}

/// Keeps the watchers running; dropping it stops them (the store keeps its last snapshot).
pub struct KubeSourceHandle {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for KubeSourceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSourceHandle")
            .field("ready", &self.is_ready())
            .field("pending", &self.shared.pending())
            .finish()
    }
}

impl KubeSourceHandle {
    /// True once every kind was listed and a first valid snapshot was published.
    pub fn is_ready(&self) -> bool {
        self.shared.store.borrow().is_some()
    }

    /// The store, once ready.
    pub fn store(&self) -> Option<ConfigStore> {
        self.shared.store.borrow().clone()
    }

    /// Waits for the first snapshot.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<ConfigStore, KubeSourceError> {
        let mut rx = self.shared.store.subscribe();
        let ready = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        if let Ok(Ok(store)) = ready
            && let Some(store) = store.clone()
        {
            return Ok(store);
        }
        let pending = self.shared.pending();
        if pending.is_empty() {
            let errors = self
                .shared
                .initial_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(errors) = errors {
                return Err(KubeSourceError::Invalid(errors));
            }
        }
        Err(KubeSourceError::InitialSyncTimeout {
            timeout,
            pending: pending.join(", "),
        })
    }

    /// Kinds the API server does not serve right now (CRD not installed); treated as empty.
    pub fn missing_kinds(&self) -> Vec<&'static str> {
        KINDS
            .iter()
            .zip(&self.shared.kinds)
            .filter(|(_, k)| k.missing.load(Ordering::Acquire))
            .map(|(s, _)| s.kind)
            .collect()
    }

    /// The `apiVersion` `kind` is watched at (`networking.istio.io/v1beta1` on an Istio
    /// older than 1.22); `None` for an unknown kind or before its version is known.
    pub fn api_version(&self, kind: &str) -> Option<String> {
        let index = KINDS.iter().position(|k| k.kind == kind)?;
        let version = self.shared.version(index)?;
        Some(KINDS[index].api_version(version))
    }

    pub fn metrics(&self) -> &KubeSourceMetrics {
        &self.shared.metrics
    }
}

impl Drop for KubeSourceHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A 404 from the API server. A missing CRD (or group version) answers with a plain-text 404
/// ("404 page not found"), which kube turns into a Status without the NotFound reason: check
/// the code as well.
fn is_404(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404 || s.is_not_found())
}

/// A 403: the service account may not list this resource here.
fn is_forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => {
            matches!(e, kube::Error::Api(s) if s.code == 403)
        }
        _ => false,
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => is_404(e),
        _ => false,
    }
}

/// The first of `spec.versions` the API server serves `spec.plural` at, from the discovery
/// document of each group version (`GET /apis/<group>/<version>`, readable by every
/// authenticated client). `Ok(None)`: not served at any of them (CRD not installed).
async fn served_version(
    client: &kube::Client,
    spec: &KindSpec,
) -> Result<Option<&'static str>, kube::Error> {
    for &version in spec.versions {
        match client
            .list_api_group_resources(&spec.api_version(version))
            .await
        {
            // A group version lists every CRD of the group served at it; ours may not be one.
            Ok(list) if list.resources.iter().any(|r| r.name == spec.plural) => {
                return Ok(Some(version));
            }
            Ok(_) => {}
            Err(e) if is_404(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Why a watch run ended.
enum WatchEnd {
    /// The resource is not served at this version any more: discover again.
    NotServed,
    /// The watcher stream ended. With backoff it never does; the task then stops.
    Ended,
}

/// Watches `KINDS[index]` into its reflector store, forever. Kinds with several candidate
/// versions discover the served one first, and again whenever it stops being served; errors
/// are retried with exponential backoff (0.8 s … 30 s) while the store keeps its objects.
async fn watch_kind(
    index: usize,
    client: kube::Client,
    namespace: Option<String>,
    mut writer: reflector::store::Writer<DynamicObject>,
    shared: Arc<Shared>,
) {
    let spec: &'static KindSpec = &KINDS[index];
    let m = &shared.metrics;
    let kind = spec.kind;
    let mut backoff = watcher::DefaultBackoff::default();
    let mut lists = 0u64;
    loop {
        let version = if spec.discovers_version() {
            match served_version(&client, spec).await {
                Ok(Some(v)) => v,
                Ok(None) => {
                    m.errors.with_label_values(&[kind]).inc();
                    shared.mark_missing(index);
                    tokio::time::sleep(backoff.next().unwrap_or(MAX_BACKOFF)).await;
                    continue;
                }
                Err(e) => {
                    // Not "missing": a 403 or an unreachable server must stay visible (the kind
                    // stays unlisted, so `start` times out naming it).
                    m.errors.with_label_values(&[kind]).inc();
                    warn!(kind, error = %e, "API discovery failed; retrying with backoff");
                    tokio::time::sleep(backoff.next().unwrap_or(MAX_BACKOFF)).await;
                    continue;
                }
            }
        } else {
            spec.preferred_version()
        };
        shared.use_version(index, version);
        let lists_before = lists;
        let end = watch_version(
            index,
            &client,
            namespace.as_deref(),
            version,
            &mut writer,
            &shared,
            &mut lists,
        )
        .await;
        if lists > lists_before {
            // It was served and listed: the next disappearance starts from a short delay.
            backoff.reset();
        }
        match end {
            WatchEnd::NotServed => {
                tokio::time::sleep(backoff.next().unwrap_or(MAX_BACKOFF)).await;
            }
            WatchEnd::Ended => return,
        }
    }
}

/// Upper bound of the watcher's default backoff, used if the iterator ever runs dry.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs one watcher of `KINDS[index]` at `version` into `writer`. Returns when the resource
/// turns out not to be served at this version and the kind can discover another; otherwise
/// a 404 means "CRD not installed" and the watcher keeps retrying by itself.
#[allow(clippy::too_many_arguments)]
async fn watch_version(
    index: usize,
    client: &kube::Client,
    namespace: Option<&str>,
    version: &'static str,
    writer: &mut reflector::store::Writer<DynamicObject>,
    shared: &Shared,
    lists: &mut u64,
) -> WatchEnd {
    let spec: &'static KindSpec = &KINDS[index];
    let state = &shared.kinds[index];
    let m = &shared.metrics;
    let kind = spec.kind;
    let ar = spec.api_resource(version);
    let (api, config) = match spec.scope {
        Scope::Cluster | Scope::AllNamespaces => (
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            watcher::Config::default(),
        ),
        Scope::Single { namespace, name } => (
            Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &ar),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        ),
        Scope::OwnNamespace => (
            Api::<DynamicObject>::namespaced_with(
                client.clone(),
                namespace.unwrap_or_default(),
                &ar,
            ),
            watcher::Config::default(),
        ),
    };
    let stream = watcher(api, config).default_backoff().modify(build::strip);
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        // The reflector's own logic, applied by hand so the store outlives a version switch.
        if let Ok(ev) = &event {
            writer.apply_watcher_event(ev);
        }
        match event {
            Ok(watcher::Event::Init) => {
                m.events.with_label_values(&[kind, "init"]).inc();
                if *lists > 0 {
                    m.restarts.with_label_values(&[kind]).inc();
                    info!(
                        kind,
                        "relisting (watch restarted); serving the last good snapshot meanwhile"
                    );
                }
            }
            Ok(watcher::Event::InitApply(_)) => {
                m.events.with_label_values(&[kind, "init_apply"]).inc();
            }
            Ok(watcher::Event::InitDone) => {
                m.events.with_label_values(&[kind, "init_done"]).inc();
                *lists += 1;
                if state.missing.swap(false, Ordering::AcqRel) {
                    m.missing.with_label_values(&[kind]).set(0);
                    info!(kind, resource = %spec.resource_name(), version, "resource is served now");
                }
                state.listed.store(true, Ordering::Release);
                debug!(kind, version, "listed");
                shared.changed.notify_one();
            }
            Ok(watcher::Event::Apply(_)) => {
                m.events.with_label_values(&[kind, "apply"]).inc();
                shared.changed.notify_one();
            }
            Ok(watcher::Event::Delete(_)) => {
                m.events.with_label_values(&[kind, "delete"]).inc();
                shared.changed.notify_one();
            }
            Err(e) if is_not_found(&e) => {
                m.errors.with_label_values(&[kind]).inc();
                shared.mark_missing(index);
                if spec.discovers_version() {
                    debug!(
                        kind,
                        version, "not served at this version any more; rediscovering"
                    );
                    return WatchEnd::NotServed;
                }
            }
            // The waypoint's Secrets are optional: without the RoleBinding in its namespace it
            // still serves, and rules naming a credentialName fail with "Secret not found".
            Err(e) if spec.scope == Scope::OwnNamespace && is_forbidden(&e) => {
                m.errors.with_label_values(&[kind]).inc();
                if !state.listed.swap(true, Ordering::AcqRel) {
                    warn!(kind, namespace = namespace.unwrap_or_default(), error = %e,
                        "may not read Secrets here (no RoleBinding to strait-waypoint-secrets, see deploy/README.md); DestinationRule credentialName will not resolve; retrying with backoff");
                    shared.changed.notify_one();
                }
            }
            Err(e) => {
                m.errors.with_label_values(&[kind]).inc();
                warn!(kind, error = %e, "list/watch failed; retrying with backoff, keeping the last good snapshot");
            }
        }
    }
    WatchEnd::Ended
}

/// Rebuilds the snapshot after changes (debounced) once every kind is listed.
async fn build_loop(
    shared: Arc<Shared>,
    stores: Vec<Store<DynamicObject>>,
    opts: KubeSourceOptions,
) {
    let mut discovery = netns::NetnsDiscovery::new(opts.proc_root.clone());
    let mut last_input: Option<u64> = None;
    let mut rescan = false;
    let mut store: Option<ConfigStore> = None;
    let m = shared.metrics.clone();
    loop {
        if rescan {
            tokio::select! {
                _ = shared.changed.notified() => {}
                _ = tokio::time::sleep(NETNS_RESCAN) => {}
            }
        } else {
            shared.changed.notified().await;
        }
        // Debounce: a relist or a burst of applies arrives as many events.
        loop {
            tokio::select! {
                _ = shared.changed.notified() => continue,
                _ = tokio::time::sleep(opts.debounce) => break,
            }
        }
        if !shared.all_listed() {
            debug!(pending = ?shared.pending(), "waiting for the initial list of every kind");
            continue;
        }
        let objects: build::Objects = stores.iter().map(Store::state).collect();
        let versions: Vec<&'static str> = KINDS
            .iter()
            .enumerate()
            .map(|(i, k)| shared.version(i).unwrap_or(k.preferred_version()))
            .collect();
        for (spec, objs) in KINDS.iter().zip(&objects) {
            m.objects
                .with_label_values(&[spec.kind])
                .set(i64::try_from(objs.len()).unwrap_or(i64::MAX));
        }
        let node = opts.node.clone();
        // Lent to the blocking build and given back; a build that panics leaves a fresh one.
        let mut disc = std::mem::replace(
            &mut discovery,
            netns::NetnsDiscovery::new(opts.proc_root.clone()),
        );
        let prev = last_input;
        // Serializing, scanning /proc and compiling are CPU/file work: off the async workers.
        let built = tokio::task::spawn_blocking(move || {
            let sources =
                build::sources(&objects, &versions, node.as_deref().map(|n| (n, &mut disc)));
            let hash = input_hash(&sources.files);
            let result = (prev != Some(hash)).then(|| {
                mesh_config::load_sources(
                    sources.files.iter().map(|(n, t)| (n.as_str(), t.as_str())),
                )
            });
            (disc, hash, sources.pods_without_netns, result)
        })
        .await;
        let (disc, hash, pending_netns, result) = match built {
            Ok(b) => b,
            Err(e) => {
                error!(error = %e, "snapshot build failed; keeping the last good snapshot");
                continue;
            }
        };
        discovery = disc;
        rescan = pending_netns > 0;
        m.pods_without_netns
            .set(i64::try_from(pending_netns).unwrap_or(i64::MAX));
        last_input = Some(hash);
        let Some(result) = result else {
            debug!("configuration unchanged");
            continue;
        };
        match result {
            Ok(snap) => {
                m.reloads.with_label_values(&["ok"]).inc();
                let (services, workloads) = (snap.services().len(), snap.workloads().len());
                let generation = match &store {
                    Some(s) => s.replace(snap),
                    None => {
                        let s = ConfigStore::from_snapshot(snap);
                        let g = s.generation();
                        store = Some(s.clone());
                        shared.store.send_replace(Some(s));
                        g
                    }
                };
                info!(
                    generation,
                    services,
                    workloads,
                    pods_without_netns = pending_netns,
                    "mesh configuration loaded from the Kubernetes API"
                );
            }
            Err(errs) => {
                for e in errs.iter() {
                    error!(error = %e, "invalid mesh configuration");
                }
                let count = errs.len();
                match &store {
                    Some(s) => {
                        s.record_error(errs);
                        error!(
                            count,
                            generation = s.generation(),
                            "configuration change rejected; keeping the last good snapshot"
                        );
                    }
                    None => {
                        *shared
                            .initial_errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(errs));
                        error!(
                            count,
                            "initial configuration from the Kubernetes API is invalid; not ready"
                        );
                    }
                }
                // Counted after the errors are recorded, so whoever sees the count sees them.
                m.reloads.with_label_values(&["rejected"]).inc();
            }
        }
    }
}

/// Identifies a loader input, so a resync that changed nothing does not bump the generation.
fn input_hash(files: &[(String, String)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_source_flag_values() {
        assert_eq!("dir".parse::<ConfigSource>().ok(), Some(ConfigSource::Dir));
        assert_eq!(
            "kube".parse::<ConfigSource>().ok(),
            Some(ConfigSource::Kube)
        );
        assert!("k8s".parse::<ConfigSource>().is_err());
        assert_eq!(ConfigSource::default(), ConfigSource::Dir);
        assert_eq!(ConfigSource::Kube.to_string(), "kube");
    }

    #[test]
    fn missing_crd_is_recognised() {
        // What kube makes of the API server's plain-text "404 page not found".
        let status =
            kube::core::Status::failure("404 page not found", "Failed to parse error data")
                .with_code(404);
        let e = watcher::Error::InitialListFailed(kube::Error::Api(status.boxed()));
        assert!(is_not_found(&e));
        let forbidden = kube::core::Status::failure("forbidden", "Forbidden").with_code(403);
        let e = watcher::Error::InitialListFailed(kube::Error::Api(forbidden.boxed()));
        assert!(!is_not_found(&e));
    }
}
