//! Wiring: configuration store, identities, HBONE client, telemetry, admin listeners, the pod
//! reconcile loop, and the SIGTERM drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_config::ConfigStore;
use telemetry::{AccessLogger, Metrics, Readiness};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::identity::{Identities, IdentityError};
use crate::metrics::Telemetry;
use crate::pods::PodManager;

/// How often pods that could not be started are tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// Where the node's resolvers are read from when no --dns-upstream is given.
const NODE_RESOLV_CONF: &str = "/etc/resolv.conf";

/// What the proxy is started with (from the command line, see [`crate::cli`]).
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub config_dir: Option<PathBuf>,
    pub ca_dir: Option<PathBuf>,
    /// Empty: the node's /etc/resolv.conf.
    pub dns_upstreams: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub drain: Duration,
    pub cert_ttl: Duration,
    /// Where the capture ledger lives ([`crate::state`]).
    pub state_dir: PathBuf,
    /// `dir` (config_dir / embedded default) or `kube` (the API server).
    pub config_source: kube_source::ConfigSource,
    /// The host's /proc, where pods' network namespaces are found with `kube`.
    pub proc_root: PathBuf,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mesh configuration:\n{0}")]
    Config(#[from] mesh_config::LoadErrors),
    #[error("watching the configuration directory: {0}")]
    Watch(#[from] mesh_config::store::WatchError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("telemetry: {0}")]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("connection log: {0}")]
    AccessLog(#[source] std::io::Error),
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("capture ledger: {0}")]
    State(#[from] crate::state::StateError),
    #[error("configuration from the Kubernetes API: {0}")]
    Kube(#[from] kube_source::KubeSourceError),
}

/// What every pod's handlers share.
pub(crate) struct Shared {
    pub node: String,
    pub store: ConfigStore,
    pub identities: Identities,
    pub hbone: hbone::Client,
    pub hbone_config: hbone::Config,
    pub telemetry: Telemetry,
    pub dns_upstreams: Vec<SocketAddr>,
    pub dns_search: Vec<String>,
    pub drain: Duration,
}

/// Runs the proxy until SIGTERM or SIGINT, then drains: readiness goes down, every pod stops
/// accepting (HBONE peers get GOAWAY), live connections get `settings.drain` to finish, the
/// rest are reset.
pub async fn run(settings: Settings) -> Result<(), Error> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    // First: a second ztunnel for this node must fail before it touches anything.
    let state = crate::state::StateStore::open(&settings.state_dir, &settings.node)?;

    let (store, kube_handle) = match settings.config_source {
        kube_source::ConfigSource::Kube => {
            let opts = kube_source::KubeSourceOptions {
                node: Some(settings.node.clone()),
                proc_root: settings.proc_root.clone(),
                ..Default::default()
            };
            let (store, handle) = kube_source::KubeSource::start_default(opts).await?;
            (store, Some(handle))
        }
        kube_source::ConfigSource::Dir => match &settings.config_dir {
            Some(dir) => (ConfigStore::open(dir)?, None),
            None => {
                info!("no --config-dir: serving the embedded default mesh");
                (ConfigStore::embedded_default()?, None)
            }
        },
    };
    let _watch = match store.dir() {
        Some(_) => Some(store.watch()?),
        None => None,
    };
    let trust_domain = store.current().trust_domain().to_owned();
    let identities =
        Identities::load(settings.ca_dir.as_deref(), &trust_domain, settings.cert_ttl)?;
    let metrics = Arc::new(Metrics::new()?);
    if let Some(k) = &kube_handle {
        k.metrics()
            .register(metrics.registry())
            .map_err(telemetry::TelemetryError::from)?;
    }
    metrics.config_loaded(store.generation());
    let telemetry = Telemetry::new(
        metrics.clone(),
        AccessLogger::stdout().map_err(Error::AccessLog)?,
    );
    let (dns_upstreams, dns_search) = dns_settings(&settings.dns_upstreams);
    let hbone_config = hbone::Config {
        drain_timeout: settings.drain,
        ..hbone::Config::default()
    };
    let shared = Arc::new(Shared {
        node: settings.node.clone(),
        store: store.clone(),
        hbone: hbone::Client::new(identities.manager().clone(), hbone_config.clone()),
        hbone_config,
        identities: identities.clone(),
        telemetry: telemetry.clone(),
        dns_upstreams,
        dns_search,
        drain: settings.drain,
    });

    // Admin listeners first: a port clash is a startup error, not a silent half-start.
    let readiness = Readiness::new();
    let pod_status = Arc::new(Mutex::new(Vec::new()));
    let admin_state = {
        let (node, store, pods, ids) = (
            settings.node.clone(),
            store.clone(),
            pod_status.clone(),
            identities.clone(),
        );
        crate::admin::state(metrics.clone(), readiness.clone(), move || {
            crate::admin::config_dump(&node, &store, &pods, &ids)
        })
    };
    let admin_stop = CancellationToken::new();
    let mut admin_tasks = Vec::new();
    for addr in [
        settings.admin_addr,
        settings.metrics_addr,
        settings.readiness_addr,
    ] {
        let listener = crate::admin::bind(addr).await?;
        info!(%addr, "admin listener");
        admin_tasks.push(tokio::spawn(telemetry::admin::serve(
            listener,
            admin_state.clone(),
            admin_stop.clone().cancelled_owned(),
        )));
    }

    let mut manager = PodManager::new(shared.clone(), pod_status, state);
    let mut updates = store.subscribe();
    manager.sweep_stale(&store.current()).await;
    manager.reconcile(&store.current()).await;
    readiness.set_ready(true);
    info!(node = %settings.node, generation = store.generation(), "ztunnel ready");

    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: draining"); break; }
            _ = sigint.recv() => { info!("SIGINT: draining"); break; }
            changed = updates.changed() => {
                if changed.is_err() {
                    error!("configuration store closed; stopping");
                    break;
                }
                let snap = updates.borrow_and_update().clone();
                // Before the generation is reported: once it is, live connections the new
                // policies deny are closed. Every snapshot: the check is pure and cheap.
                manager.recheck_inbound(&snap);
                let generation = store.generation();
                metrics.config_loaded(generation);
                info!(generation, "configuration changed");
                manager.reconcile(&snap).await;
            }
            _ = retry.tick(), if manager.has_failures() => {
                manager.retry_failed(&store.current()).await;
            }
        }
    }

    readiness.set_ready(false);
    manager.shutdown(settings.drain).await;
    telemetry.flush().await;
    admin_stop.cancel();
    for task in admin_tasks {
        let _ = task.await;
    }
    info!("ztunnel stopped");
    Ok(())
}

/// Upstream resolvers (flags, else the node's resolv.conf) and the node's search domains, which
/// pods inherit after their Kubernetes ones.
fn dns_settings(flags: &[SocketAddr]) -> (Vec<SocketAddr>, Vec<String>) {
    let conf = match dns_proxy::ResolvConf::read(NODE_RESOLV_CONF) {
        Ok(conf) => Some(conf),
        Err(error) => {
            if flags.is_empty() {
                warn!(%error, "no --dns-upstream and no usable resolv.conf: names outside the mesh will fail");
            }
            None
        }
    };
    let search = conf.as_ref().map(|c| c.search.clone()).unwrap_or_default();
    let upstreams = if flags.is_empty() {
        conf.map(|c| c.nameservers).unwrap_or_default()
    } else {
        flags.to_vec()
    };
    info!(?upstreams, "DNS upstreams");
    (upstreams, search)
}
