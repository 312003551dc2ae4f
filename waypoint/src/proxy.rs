//! The running waypoint: shared state and [`run`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use certs::{CertificateAuthority, IdentityManager, ROOT_CERT_FILE, SpiffeId, TrustBundle};
use http::HeaderValue;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use mesh_config::{ConfigStore, LoadErrors, NamespacedName, Snapshot};
use telemetry::admin::Endpoints;
use telemetry::{AccessLogger, AdminState, Metrics, Readiness};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::options::Options;
use crate::upstream::{DnsError, MeshClient, Upstream};

/// Why the waypoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("configuration:\n{0}")]
    Config(#[from] LoadErrors),
    #[error("watching the configuration directory: {0}")]
    Watch(#[from] mesh_config::store::WatchError),
    #[error("CA in {dir}: {source}")]
    Ca { dir: String, source: certs::Error },
    #[error("workload certificate for {identity}: {source}")]
    Identity {
        identity: String,
        source: certs::Error,
    },
    #[error("HBONE server: {0}")]
    Hbone(#[from] hbone::Error),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("telemetry: {0}")]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("access log: {0}")]
    AccessLog(std::io::Error),
    #[error("DNS: {0}")]
    Dns(#[from] DnsError),
    #[error("configuration from the Kubernetes API: {0}")]
    Kube(#[from] kube_source::KubeSourceError),
    #[error("starting worker thread: {0}")]
    WorkerThread(std::io::Error),
    #[error("a worker thread exited while starting")]
    WorkerExited,
}

/// State shared by every connection and request.
pub struct Proxy {
    pub store: ConfigStore,
    pub gateway: NamespacedName,
    pub identity: SpiffeId,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLogger,
    pub server_header: Option<HeaderValue>,
    pub max_buffered_body: usize,
    /// Bytes a mirror copy of a streamed body may lag the original before it is abandoned.
    pub mirror_max_lag: usize,
    pub http_server: auto::Builder<TokioExecutor>,
    /// Cancelled on SIGTERM: HTTP connections inside tunnels finish their requests and close.
    pub shutdown: CancellationToken,
    pub mirrors: Arc<Semaphore>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("gateway", &self.gateway)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// At most this many I/O readiness events are taken per poll of a worker's event loop.
///
/// tokio's default (1,024) takes every ready socket at once. When the 64 upstream responses of
/// a burst are ready together, their tasks all run before the HBONE connection's task (which
/// the first of them wakes) gets its turn, so the whole burst leaves in one write at the end:
/// the client's ztunnel sits idle until then, then the waypoint sits idle while the client
/// turns the burst around (`scripts/bench-waypoint` saw the server core 13 % idle in 1-5 ms
/// gaps with the client core 60 % idle). Taking 16 at a time lets the HBONE connection flush
/// every 16 responses, so both sides work at once; it costs one more `epoll_wait` per 16
/// events. A/B in one bench run (req/s, CPU/request, p99 against the default): 8 events
/// 1.14, 1.08, 1.05; 16 events 1.28, 0.91, 0.90; 32 events 1.40, 0.84, 0.74, and 0.75 against
/// 16 in a run with 16 as the base (this VM's spread); 16 is the middle.
pub const IO_EVENTS_PER_TICK: usize = 16;

/// A worker's single-threaded runtime (see [`IO_EVENTS_PER_TICK`]).
pub fn worker_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .max_io_events_per_tick(IO_EVENTS_PER_TICK)
        .enable_all()
        .build()
}

/// The server for HTTP inside tunnels: HTTP/1.1 keep-alive or HTTP/2 prior knowledge.
fn http_server() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1000)
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024);
    b
}

/// The waypoint's identity: its pod's service account when the snapshot knows the Gateway,
/// else Istio's default `spiffe://<td>/ns/<gateway ns>/sa/<gateway name>`.
pub fn waypoint_identity(
    snap: &Snapshot,
    gateway: &NamespacedName,
    trust_domain: &str,
) -> SpiffeId {
    match snap.waypoint(gateway) {
        Some(w) => SpiffeId::new(
            trust_domain,
            w.identity.namespace.clone(),
            w.identity.service_account.clone(),
        ),
        None => SpiffeId::new(
            trust_domain,
            gateway.namespace.clone(),
            gateway.name.clone(),
        ),
    }
}

impl Proxy {
    /// Builds the shared state (inside a tokio runtime). `mesh` opens HBONE tunnels to mesh
    /// endpoints (see [`crate::upstream::mesh`]).
    pub fn new(
        opts: &Options,
        store: ConfigStore,
        identity: SpiffeId,
        mesh: Option<MeshClient>,
        metrics: Arc<Metrics>,
        access_log: AccessLogger,
        shutdown: CancellationToken,
    ) -> Result<Self, RunError> {
        Ok(Proxy {
            store,
            gateway: opts.gateway.clone(),
            identity,
            upstream: Upstream::new(opts.dns_server, mesh)?,
            metrics,
            access_log,
            server_header: opts
                .server_header
                .as_deref()
                .filter(|s| !s.is_empty())
                .and_then(|s| HeaderValue::from_str(s).ok()),
            max_buffered_body: opts.max_buffered_body,
            mirror_max_lag: opts.mirror_max_lag.unwrap_or(opts.max_buffered_body),
            http_server: http_server(),
            shutdown,
            mirrors: Arc::new(Semaphore::new(crate::http::mirror::MAX_IN_FLIGHT)),
        })
    }
}

fn load_identities(ca_dir: &Path, ttl: Duration) -> Result<IdentityManager, RunError> {
    let ca_err = |source| RunError::Ca {
        dir: ca_dir.display().to_string(),
        source,
    };
    let ca = Arc::new(CertificateAuthority::load_dir(ca_dir).map_err(ca_err)?);
    // A root-cert.pem next to the CA is the bundle to trust (old + new roots during rotation).
    let root = ca_dir.join(ROOT_CERT_FILE);
    let bundle = if root.is_file() {
        TrustBundle::load(&root).map_err(ca_err)?
    } else {
        ca.trust_bundle()
    };
    Ok(IdentityManager::new(ca, bundle, ttl))
}

/// Runs the waypoint until `shutdown` resolves, then drains: no new connections, in-flight
/// requests finish (up to `drain_timeout`), the access log is flushed.
pub async fn run(
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let (store, kube_handle) = match opts.config_source {
        kube_source::ConfigSource::Kube => {
            let (store, handle) =
                kube_source::KubeSource::start_default(kube_source::KubeSourceOptions {
                    // DestinationRule credentialName: Secrets of our own namespace, as Istio's
                    // gateways read them.
                    secret_namespace: Some(opts.gateway.namespace.clone()),
                    ..Default::default()
                })
                .await?;
            (store, Some(handle))
        }
        kube_source::ConfigSource::Dir => match &opts.config_dir {
            Some(dir) => (ConfigStore::open(dir)?, None),
            None => (ConfigStore::embedded_default()?, None),
        },
    };
    let _watch = match store.dir() {
        Some(_) => Some(store.watch()?),
        None => None,
    };
    let identities = load_identities(&opts.ca_dir, opts.cert_ttl)?;
    let snap = store.current();
    if snap.waypoint(&opts.gateway).is_none() {
        warn!(gateway = %opts.gateway, "the configuration has no such waypoint Gateway; serving anyway with the default identity");
    }
    if snap.trust_domain() != identities.trust_domain() {
        warn!(
            mesh = snap.trust_domain(),
            ca = identities.trust_domain(),
            "mesh trust domain differs from the CA's; peers will be checked against the CA's"
        );
    }
    let identity = waypoint_identity(&snap, &opts.gateway, identities.trust_domain());
    identities
        .fetch(&identity)
        .await
        .map_err(|source| RunError::Identity {
            identity: identity.to_string(),
            source,
        })?;

    let metrics = Arc::new(Metrics::new()?);
    if let Some(k) = &kube_handle {
        k.metrics()
            .register(metrics.registry())
            .map_err(telemetry::TelemetryError::from)?;
    }
    metrics.config_loaded(store.generation());
    let access_log = AccessLogger::stdout().map_err(RunError::AccessLog)?;
    let hbone_config = hbone::Config {
        drain_timeout: opts.drain_timeout,
        ..hbone::Config::default()
    };
    let server = hbone::Server::new(&identities, &identity, hbone_config)?;
    // Shutdown fans out: HBONE drain, HTTP graceful close inside tunnels, admin.
    let token = CancellationToken::new();
    let workers = Workers {
        opts: opts.clone(),
        store: store.clone(),
        identities: identities.clone(),
        identity: identity.clone(),
        metrics: metrics.clone(),
        access_log: access_log.clone(),
        server,
        shutdown: token.clone(),
    };
    let proxy = workers.proxy()?;
    let mut listeners = bind_hbone(opts.listen, opts.workers.max(1))?.into_iter();
    let listener = workers.listener(listeners.next().expect("bind_hbone binds at least one"))?;
    let listen = listener.local_addr().unwrap_or(opts.listen);

    tokio::spawn({
        let token = token.clone();
        async move {
            shutdown.await;
            info!("shutting down: draining");
            token.cancel();
        }
    });

    let readiness = Readiness::new();
    let dump_store = store.clone();
    let admin_state =
        AdminState::new(metrics.clone(), readiness.clone()).with_config_dump(move || {
            let snap = dump_store.current();
            serde_json::json!({
                "generation": dump_store.generation(),
                "snapshot": serde_json::to_value(&*snap).unwrap_or(serde_json::Value::Null),
            })
        });
    let mut admin_tasks = Vec::new();
    for (what, addr, endpoints) in [
        ("admin", opts.admin, Endpoints::ADMIN),
        ("metrics", opts.metrics, Endpoints::METRICS),
        ("readiness", opts.readiness, Endpoints::READINESS),
    ] {
        let Some(addr) = addr else { continue };
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { what, addr, source })?;
        info!(addr = %l.local_addr().unwrap_or(addr), what, "admin endpoint listening");
        admin_tasks.push(tokio::spawn(telemetry::admin::serve_endpoints(
            l,
            admin_state.clone(),
            endpoints,
            token.clone().cancelled_owned(),
        )));
    }

    // Config generations in metrics, as reloads happen.
    let mut updates = store.subscribe();
    let gen_store = store.clone();
    let gen_metrics = metrics.clone();
    let gen_token = token.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = gen_token.cancelled() => return,
                changed = updates.changed() => {
                    if changed.is_err() { return; }
                    gen_metrics.config_loaded(gen_store.generation());
                    info!(generation = gen_store.generation(), "configuration reloaded");
                }
            }
        }
    });

    // Workers 1.. each get a thread, a single-threaded runtime and their own Proxy (upstream
    // pools, resolver, mesh client); the config store, identities, metrics and log are shared.
    let mut workers_done = Vec::new();
    for (index, listener) in listeners.enumerate() {
        let (started, done) = workers.clone().spawn(index + 1, listener)?;
        started.await.unwrap_or(Err(RunError::WorkerExited))?;
        workers_done.push(done);
    }

    readiness.set_ready(true);
    info!(%listen, %identity, gateway = %opts.gateway, workers = opts.workers.max(1), "waypoint listening (HBONE)");
    workers.serve(listener, proxy).await;
    readiness.set_ready(false);
    for done in workers_done {
        let _ = done.await;
    }
    for task in admin_tasks {
        let _ = task.await;
    }
    access_log.flush().await;
    info!("waypoint stopped");
    Ok(())
}

/// The HBONE handler: every CONNECT goes to [`crate::inbound::handle`] with this worker's proxy.
fn handler_for(proxy: Arc<Proxy>) -> impl hbone::Handler {
    move |connect| {
        let proxy = proxy.clone();
        async move { crate::inbound::handle(proxy, connect).await }
    }
}

/// `workers` listening sockets on `addr`; with more than one they share the port through
/// `SO_REUSEPORT` and the kernel spreads new connections across them. Port 0 is resolved by the
/// first bind so all workers listen on the same port.
fn bind_hbone(addr: SocketAddr, workers: usize) -> Result<Vec<std::net::TcpListener>, RunError> {
    use socket2::{Domain, Socket, Type};
    let bind_err = |source| RunError::Bind {
        what: "HBONE",
        addr,
        source,
    };
    let mut addr_now = addr;
    let mut out = Vec::with_capacity(workers);
    for _ in 0..workers {
        let socket =
            Socket::new(Domain::for_address(addr_now), Type::STREAM, None).map_err(bind_err)?;
        socket.set_reuse_address(true).map_err(bind_err)?;
        if workers > 1 {
            socket.set_reuse_port(true).map_err(bind_err)?;
        }
        socket.set_nonblocking(true).map_err(bind_err)?;
        socket.bind(&addr_now.into()).map_err(bind_err)?;
        socket.listen(1024).map_err(bind_err)?;
        let listener: std::net::TcpListener = socket.into();
        if addr_now.port() == 0 {
            addr_now = listener.local_addr().map_err(bind_err)?;
        }
        out.push(listener);
    }
    Ok(out)
}

/// What every HBONE worker shares; each builds its own [`Proxy`] from it.
#[derive(Clone)]
struct Workers {
    opts: Options,
    store: ConfigStore,
    identities: IdentityManager,
    identity: SpiffeId,
    metrics: Arc<Metrics>,
    access_log: AccessLogger,
    server: hbone::Server,
    shutdown: CancellationToken,
}

type Started = tokio::sync::oneshot::Receiver<Result<(), RunError>>;
type Done = tokio::sync::oneshot::Receiver<()>;

impl Workers {
    /// A worker's own proxy (inside its runtime): its upstream pools, resolver and mesh client.
    fn proxy(&self) -> Result<Arc<Proxy>, RunError> {
        // Upstream tunnels to mesh workloads present the same workload certificate as the server.
        let mesh = MeshClient::new(
            self.identities.clone(),
            self.identity.clone(),
            &self.opts.gateway,
            hbone::Config::default(),
        );
        Ok(Arc::new(Proxy::new(
            &self.opts,
            self.store.clone(),
            self.identity.clone(),
            Some(mesh),
            self.metrics.clone(),
            self.access_log.clone(),
            self.shutdown.clone(),
        )?))
    }

    /// Registers a bound listener with the current runtime.
    fn listener(&self, listener: std::net::TcpListener) -> Result<TcpListener, RunError> {
        TcpListener::from_std(listener).map_err(|source| RunError::Bind {
            what: "HBONE",
            addr: self.opts.listen,
            source,
        })
    }

    /// Serves CONNECTs on `listener` with `proxy` until shutdown, then drains.
    async fn serve(&self, listener: TcpListener, proxy: Arc<Proxy>) {
        self.server
            .serve(
                listener,
                handler_for(proxy),
                self.shutdown.clone().cancelled_owned(),
            )
            .await;
    }

    /// Starts worker `index` on its own thread; `Started` resolves once its proxy is built (or
    /// failed to build), `Done` once it has drained after shutdown.
    fn spawn(
        self,
        index: usize,
        listener: std::net::TcpListener,
    ) -> Result<(Started, Done), RunError> {
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("waypoint-worker-{index}"))
            .spawn(move || {
                let runtime = match worker_runtime() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(RunError::WorkerThread(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let built = self
                        .proxy()
                        .and_then(|proxy| Ok((proxy, self.listener(listener)?)));
                    match built {
                        Ok((proxy, listener)) => {
                            let _ = started_tx.send(Ok(()));
                            self.serve(listener, proxy).await;
                        }
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                        }
                    }
                });
                let _ = done_tx.send(());
            })
            .map_err(RunError::WorkerThread)?;
        Ok((started, done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_share_one_port_and_each_accepts() {
        let listeners = bind_hbone("127.0.0.1:0".parse().unwrap(), 3).expect("bind");
        assert_eq!(listeners.len(), 3);
        let port = listeners[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for l in &listeners {
            assert_eq!(l.local_addr().unwrap().port(), port);
        }
        // The kernel spreads connections over the group by hash; with enough of them every
        // listener gets some, so none is a dead socket.
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
            .collect();
        let mut accepted = 0;
        for l in &listeners {
            let mut got = 0;
            while l.accept().is_ok() {
                got += 1;
            }
            assert!(got > 0, "a worker's listener accepted nothing");
            accepted += got;
        }
        assert_eq!(accepted, clients.len());
        // A second group on the same port is refused: one waypoint per port.
        assert!(matches!(
            bind_hbone(SocketAddr::from(([127, 0, 0, 1], port)), 1),
            Err(RunError::Bind { .. })
        ));
    }

    #[test]
    fn identity_defaults_to_the_gateway_name() {
        let snap = mesh_config::embedded::default_snapshot().expect("embedded config");
        let gw = NamespacedName::new("istio-egress", "waypoint");
        assert_eq!(
            waypoint_identity(&snap, &gw, "cluster.local").to_string(),
            "spiffe://cluster.local/ns/istio-egress/sa/waypoint"
        );
        let unknown = NamespacedName::new("egress", "gw");
        assert_eq!(
            waypoint_identity(&snap, &unknown, "td.example").to_string(),
            "spiffe://td.example/ns/egress/sa/gw"
        );
    }
}
