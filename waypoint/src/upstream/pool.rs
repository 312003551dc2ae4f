//! Keep-alive connection pools, one per (endpoint, TLS settings, HTTP version, limits).
//!
//! * HTTP/1.1: idle connections are reused most-recently-used first; a connection goes back to
//!   the pool once its response body has been read to the end (a body dropped half-way closes
//!   it). `maxRequestsPerConnection` retires connections.
//! * HTTP/2: one multiplexed connection per pool, replaced when it dies.
//! * Limits (DestinationRule `connectionPool`): concurrent requests per endpoint
//!   (`tcp.maxConnections` for HTTP/1.1, `http.http2MaxRequests` for HTTP/2) and how many may
//!   wait for a slot (`http.http1MaxPendingRequests`); beyond that a request fails fast with
//!   overflow (Envoy's `UO`).
//! * Idle connections older than the idle timeout are closed by a sweeper; unused pools are
//!   removed.
//! * Mesh endpoints ([`PoolKey::hbone`]): each connection is an HBONE tunnel instead of a TCP
//!   connection (HTTP/1.1: one tunnel per keep-alive connection; HTTP/2: one tunnel carrying the
//!   multiplexed connection); the tunnels share the HBONE client's own pooled HTTP/2
//!   connections to the pod's ztunnel.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

use super::UpstreamError;
use super::mesh::{HboneTarget, MeshClient};
use super::tls::{self, TlsCache, TlsSpec};
use crate::http::body::{BoxError, ProxyBody};

/// The pools by key, looked up per request: foldhash, not SipHash (keys come from the
/// configuration and resolved addresses).
type PoolMap = HashMap<PoolKey, Arc<EndpointPool>, foldhash::fast::RandomState>;

/// HTTP version spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// Per-endpoint limits, from DestinationRule `connectionPool` (Istio's defaults: effectively
/// unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolLimits {
    pub max_requests: usize,
    pub max_pending: usize,
    pub max_requests_per_connection: Option<u32>,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_requests: u32::MAX as usize,
            max_pending: u32::MAX as usize,
            max_requests_per_connection: None,
            // Envoy's upstream idle timeout is 1 h; external servers close far earlier, so a
            // shorter one saves failing the first request on a connection they already closed.
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl PoolLimits {
    /// Concurrent requests an endpoint's pool admits: its semaphore's permits.
    fn request_slots(&self) -> usize {
        self.max_requests.clamp(1, Semaphore::MAX_PERMITS)
    }

    /// Limits from a DestinationRule connection pool, for `version`.
    pub fn from_settings(
        pool: Option<&mesh_config::policy::ConnectionPool>,
        version: HttpVersion,
    ) -> Self {
        let mut limits = PoolLimits::default();
        let Some(p) = pool else { return limits };
        let max = match version {
            HttpVersion::Http1 => p.max_connections,
            HttpVersion::Http2 => p.http2_max_requests.or(p.max_connections),
        };
        if let Some(m) = max {
            limits.max_requests = (m as usize).max(1);
        }
        if let Some(m) = p.http1_max_pending_requests {
            limits.max_pending = m as usize;
        }
        limits.max_requests_per_connection = p.max_requests_per_connection.filter(|m| *m > 0);
        if let Some(t) = p.http_idle_timeout.or(p.tcp_idle_timeout) {
            limits.idle_timeout = t;
        }
        if let Some(t) = p.connect_timeout {
            limits.connect_timeout = t;
        }
        limits
    }
}

/// What identifies a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    pub tls: Option<Arc<TlsSpec>>,
    /// Set for mesh endpoints: connections are HBONE tunnels to this target.
    pub hbone: Option<Arc<HboneTarget>>,
    pub version: HttpVersion,
    pub limits: PoolLimits,
}

/// TCP, TLS-over-TCP, an HBONE tunnel (mesh endpoints) or TLS inside one (a DestinationRule
/// SIMPLE / MUTUAL towards a mesh endpoint).
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Hbone(Box<hbone::Tunnel>),
    HboneTls(Box<TlsStream<hbone::Tunnel>>),
}

/// Runs `$e` on whichever stream `$s` holds, bound as `$io` (pinned).
macro_rules! each {
    ($s:expr, $io:ident => $e:expr) => {
        match $s {
            Stream::Plain(s) => {
                let $io = Pin::new(s);
                $e
            }
            Stream::Tls(s) => {
                let $io = Pin::new(s.as_mut());
                $e
            }
            Stream::Hbone(s) => {
                let $io = Pin::new(s.as_mut());
                $e
            }
            Stream::HboneTls(s) => {
                let $io = Pin::new(s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), io => io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), io => io.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Hbone(s) => s.is_write_vectored(),
            Stream::HboneTls(s) => s.is_write_vectored(),
        }
    }
}

/// Istio's mark on a proxy's own sockets (1337). In-pod capture rules let marked packets through,
/// so a waypoint running in a captured network namespace is not redirected back into the mesh.
pub const SOCKET_MARK: u32 = 0x539;

/// Marks `socket` with [`SOCKET_MARK`]. Needs CAP_NET_ADMIN; without it the connection still
/// works (only capture bypass is lost), so that is said once and not treated as an error.
pub(crate) fn mark(socket: &TcpSocket) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = socket2::SockRef::from(socket).set_mark(SOCKET_MARK)
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        warn!(error = %e, mark = SOCKET_MARK, "cannot mark upstream sockets (needs CAP_NET_ADMIN); a capturing ztunnel in this namespace would redirect them");
    }
}

/// Opens a TCP connection with `timeout`, `TCP_NODELAY` on, marked with [`SOCKET_MARK`].
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|source| UpstreamError::Connect { addr, source })?;
    mark(&socket);
    let tcp = match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
        Err(_) => return Err(UpstreamError::ConnectTimeout { addr, timeout }),
    };
    // Requests are written whole; Nagle would only delay them.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
    served: u32,
    local: Option<SocketAddr>,
}

#[derive(Clone)]
struct H2Conn {
    sender: http2::SendRequest<ProxyBody>,
    local: Option<SocketAddr>,
}

/// One endpoint's connections.
struct EndpointPool {
    key: PoolKey,
    idle: Mutex<Vec<Idle>>,
    h2: tokio::sync::Mutex<Option<H2Conn>>,
    slots: Arc<Semaphore>,
    pending: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl EndpointPool {
    fn new(key: PoolKey) -> Self {
        let slots = key.limits.request_slots();
        EndpointPool {
            key,
            idle: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
            slots: Arc::new(Semaphore::new(slots)),
            pending: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    async fn slot(&self) -> Result<OwnedSemaphorePermit, UpstreamError> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        // Every slot is busy: wait, unless too many already do.
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.key.limits.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(UpstreamError::Overflow {
                addr: self.key.addr,
            });
        }
        let permit = self.slots.clone().acquire_owned().await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        permit.map_err(|_| UpstreamError::Overflow {
            addr: self.key.addr,
        })
    }

    fn in_flight(&self) -> usize {
        let busy = self
            .key
            .limits
            .request_slots()
            .saturating_sub(self.slots.available_permits());
        busy + self.pending.load(Ordering::Acquire)
    }

    fn pop_idle(&self) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            // Not yet ready is fine: hyper finishes the previous message a moment after its
            // body's last frame; `Lease::send` waits for it.
            if conn.since.elapsed() < self.key.limits.idle_timeout && !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    fn push_idle(&self, conn: Idle) {
        if conn.sender.is_closed() {
            return;
        }
        if self
            .key
            .limits
            .max_requests_per_connection
            .is_some_and(|max| conn.served >= max)
        {
            return;
        }
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }

    fn is_unused(&self) -> bool {
        let idle_for = self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        self.slots.available_permits() == self.key.limits.request_slots()
            && idle_for > self.key.limits.idle_timeout
    }

    fn sweep(&self) {
        let timeout = self.key.limits.idle_timeout;
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|c| c.since.elapsed() < timeout && !c.sender.is_closed());
    }
}

/// All pools.
pub struct Pools {
    pools: Arc<Mutex<PoolMap>>,
    tls: TlsCache,
    /// Tunnels to mesh endpoints; without it they fail (never plaintext).
    mesh: Option<MeshClient>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools").finish_non_exhaustive()
    }
}

/// How often idle connections and unused pools are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

impl Default for Pools {
    fn default() -> Self {
        Self::new()
    }
}

impl Pools {
    /// Must be called inside a tokio runtime (it starts the sweeper).
    pub fn new() -> Self {
        Self::with_mesh(None)
    }

    /// [`Pools::new`] with the client that opens tunnels to mesh endpoints.
    pub fn with_mesh(mesh: Option<MeshClient>) -> Self {
        let pools: Arc<Mutex<PoolMap>> = Arc::default();
        let weak: Weak<Mutex<PoolMap>> = Arc::downgrade(&pools);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                let Some(pools) = weak.upgrade() else { return };
                let mut pools = pools.lock().unwrap_or_else(PoisonError::into_inner);
                pools.retain(|_, p| {
                    p.sweep();
                    !p.is_unused()
                });
            }
        });
        Pools {
            pools,
            tls: TlsCache::new(),
            mesh,
        }
    }

    pub fn tls(&self) -> &TlsCache {
        &self.tls
    }

    pub fn mesh(&self) -> Option<&MeshClient> {
        self.mesh.as_ref()
    }

    /// A tunnel to a mesh endpoint, within `timeout`. The local address reported is the one of
    /// the HBONE connection to the pod's ztunnel.
    pub async fn open_tunnel(
        &self,
        target: &HboneTarget,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<hbone::Tunnel, UpstreamError> {
        let Some(mesh) = &self.mesh else {
            return Err(UpstreamError::NoMeshClient { addr });
        };
        match tokio::time::timeout(timeout, mesh.open(target)).await {
            Ok(Ok(tunnel)) => Ok(tunnel),
            Ok(Err(error)) => Err(UpstreamError::Hbone {
                addr,
                peer: target.peer,
                error,
            }),
            Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
        }
    }

    /// Number of pools (for tests and the admin page).
    pub fn len(&self) -> usize {
        self.pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn pool(&self, key: &PoolKey) -> Arc<EndpointPool> {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = pools.get(key) {
            return p.clone();
        }
        let p = Arc::new(EndpointPool::new(key.clone()));
        pools.insert(key.clone(), p.clone());
        p
    }

    /// Requests holding a slot of `key`'s pool or waiting for one (0 for a pool not made yet).
    pub fn in_flight(&self, key: &PoolKey) -> usize {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools.get(key).map_or(0, |p| p.in_flight())
    }

    /// A connection to `key.addr` ready for one request: pooled, or newly connected.
    pub async fn checkout(&self, key: &PoolKey) -> Result<Lease, UpstreamError> {
        let pool = self.pool(key);
        pool.touch();
        let permit = pool.slot().await?;
        match key.version {
            HttpVersion::Http1 => {
                if let Some(idle) = pool.pop_idle() {
                    return Ok(Lease {
                        sender: Sender::H1(idle.sender),
                        served: idle.served,
                        local: idle.local,
                        reused: true,
                        permit,
                        pool,
                    });
                }
                // Boxed: connecting (TCP or HBONE, then TLS, then the handshake) is the cold
                // path, and its future is kilobytes that every request's future would otherwise
                // carry and copy at each move.
                let (sender, local) = Box::pin(self.open_h1(key)).await?;
                Ok(Lease {
                    sender: Sender::H1(sender),
                    served: 0,
                    local,
                    reused: false,
                    permit,
                    pool,
                })
            }
            HttpVersion::Http2 => {
                let mut slot = pool.h2.lock().await;
                if let Some(conn) = slot.as_ref()
                    && !conn.sender.is_closed()
                {
                    return Ok(Lease {
                        sender: Sender::H2(conn.sender.clone()),
                        served: 0,
                        local: conn.local,
                        reused: true,
                        permit,
                        pool: pool.clone(),
                    });
                }
                let (sender, local) = Box::pin(self.open_h2(key)).await?;
                *slot = Some(H2Conn {
                    sender: sender.clone(),
                    local,
                });
                drop(slot);
                Ok(Lease {
                    sender: Sender::H2(sender),
                    served: 0,
                    local,
                    reused: false,
                    permit,
                    pool,
                })
            }
        }
    }

    /// A new HTTP/1.1 connection to `key`, its connection task spawned.
    async fn open_h1(
        &self,
        key: &PoolKey,
    ) -> Result<(http1::SendRequest<ProxyBody>, Option<SocketAddr>), UpstreamError> {
        let (stream, local) = self.connect(key).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(handshake_error(key.addr))?;
        let addr = key.addr;
        tokio::spawn(async move {
            // With upgrades, a 101 hands the connection to `hyper::upgrade::on`.
            if let Err(e) = conn.with_upgrades().await {
                debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended with an error");
            }
        });
        Ok((sender, local))
    }

    /// A new HTTP/2 connection to `key`, its connection task spawned.
    async fn open_h2(
        &self,
        key: &PoolKey,
    ) -> Result<(http2::SendRequest<ProxyBody>, Option<SocketAddr>), UpstreamError> {
        let (stream, local) = self.connect(key).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(handshake_error(key.addr))?;
        let addr = key.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%addr, error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok((sender, local))
    }

    async fn connect(&self, key: &PoolKey) -> Result<(Stream, Option<SocketAddr>), UpstreamError> {
        // Build the TLS config first: a bad CA file is a configuration error, not a connect one.
        let tls = match &key.tls {
            Some(spec) => Some((
                self.tls.config(spec).map_err(|e| UpstreamError::Tls {
                    addr: key.addr,
                    error: e,
                })?,
                spec,
            )),
            None => None,
        };
        if let Some(target) = &key.hbone {
            let tunnel = self
                .open_tunnel(target, key.addr, key.limits.connect_timeout)
                .await?;
            let local = Some(tunnel.local_addr());
            let stream = match tls {
                Some((config, spec)) => {
                    let handshake = tls::handshake(config, &spec.sni, tunnel);
                    match tokio::time::timeout(key.limits.connect_timeout, handshake).await {
                        Ok(r) => Stream::HboneTls(Box::new(r.map_err(|e| UpstreamError::Tls {
                            addr: key.addr,
                            error: e,
                        })?)),
                        Err(_) => {
                            return Err(UpstreamError::ConnectTimeout {
                                addr: key.addr,
                                timeout: key.limits.connect_timeout,
                            });
                        }
                    }
                }
                None => Stream::Hbone(Box::new(tunnel)),
            };
            debug!(addr = %key.addr, peer = %target.peer, tls = key.tls.is_some(), ?local, "upstream tunnel opened (HBONE)");
            return Ok((stream, local));
        }
        let tcp = connect_tcp(key.addr, key.limits.connect_timeout).await?;
        let local = tcp.local_addr().ok();
        let stream = match tls {
            Some((config, spec)) => {
                let handshake = tls::handshake(config, &spec.sni, tcp);
                let tls = match tokio::time::timeout(key.limits.connect_timeout, handshake).await {
                    Ok(r) => r.map_err(|e| UpstreamError::Tls {
                        addr: key.addr,
                        error: e,
                    })?,
                    Err(_) => {
                        return Err(UpstreamError::ConnectTimeout {
                            addr: key.addr,
                            timeout: key.limits.connect_timeout,
                        });
                    }
                };
                Stream::Tls(Box::new(tls))
            }
            None => Stream::Plain(tcp),
        };
        debug!(addr = %key.addr, tls = key.tls.is_some(), ?local, "upstream connected");
        Ok((stream, local))
    }
}

/// The error of a failed HTTP handshake with `addr`.
fn handshake_error(addr: SocketAddr) -> impl FnOnce(hyper::Error) -> UpstreamError {
    move |source| UpstreamError::Handshake { addr, source }
}

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

/// A connection checked out for one request.
pub struct Lease {
    sender: Sender,
    served: u32,
    local: Option<SocketAddr>,
    reused: bool,
    permit: OwnedSemaphorePermit,
    pool: Arc<EndpointPool>,
}

impl Lease {
    /// The local address of the upstream connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// Whether the connection was already used (a failure on it may just be a stale connection).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Sends `req`; the returned body gives the connection back when read to the end.
    pub async fn send(self, req: Request<ProxyBody>) -> Result<Response<PooledBody>, hyper::Error> {
        let Lease {
            sender,
            served,
            local,
            permit,
            pool,
            ..
        } = self;
        match sender {
            Sender::H1(mut sender) => {
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    // The connection now carries the upgraded stream: never pooled again.
                    return Ok(resp.map(|inner| PooledBody {
                        inner,
                        release: None,
                    }));
                }
                let release = Release::H1 {
                    idle: Idle {
                        sender,
                        since: Instant::now(),
                        served: served + 1,
                        local,
                    },
                    pool,
                    permit,
                };
                Ok(resp.map(|inner| PooledBody::new(inner, release)))
            }
            Sender::H2(mut sender) => {
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                Ok(resp.map(|inner| PooledBody::new(inner, Release::H2 { _permit: permit })))
            }
        }
    }
}

enum Release {
    H1 {
        idle: Idle,
        pool: Arc<EndpointPool>,
        permit: OwnedSemaphorePermit,
    },
    H2 {
        _permit: OwnedSemaphorePermit,
    },
}

impl Release {
    /// The response is complete: an HTTP/1.1 connection may serve the next request.
    fn reuse(self) {
        let Release::H1 {
            mut idle,
            pool,
            permit,
        } = self
        else {
            return;
        };
        drop(permit);
        idle.since = Instant::now();
        pool.push_idle(idle);
    }
}

/// An upstream response body that returns its connection to the pool at its end.
pub struct PooledBody {
    inner: Incoming,
    release: Option<Release>,
}

impl PooledBody {
    fn new(inner: Incoming, release: Release) -> Self {
        let mut body = PooledBody {
            inner,
            release: Some(release),
        };
        if body.inner.is_end_stream() {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let Some(r) = self.release.take() {
            r.reuse();
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // A broken body: the connection is not reusable.
                this.release = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body;
    use http_body_util::BodyExt;
    use mesh_config::policy::ConnectionPool;
    use std::convert::Infallible;
    use tokio::net::TcpListener;

    /// An HTTP/1.1 server answering "hi", counting accepted connections.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"hi"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<ProxyBody> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, "test")
            .body(body::empty())
            .expect("request")
    }

    #[tokio::test]
    async fn connections_are_reused_and_limits_overflow() {
        let (addr, accepted) = server().await;
        let pools = Pools::new();
        let key = PoolKey {
            addr,
            tls: None,
            hbone: None,
            version: HttpVersion::Http1,
            limits: PoolLimits {
                max_requests: 1,
                max_pending: 0,
                ..PoolLimits::default()
            },
        };
        for i in 0..3 {
            let lease = pools.checkout(&key).await.expect("checkout");
            assert_eq!(lease.reused(), i > 0, "request {i}");
            let resp = lease.send(get()).await.expect("send");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"hi");
            // The connection returns to the pool once hyper has finished the message.
            for _ in 0..100 {
                if !pools.pool(&key).idle.lock().expect("lock").is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one keep-alive connection"
        );

        // One request at a time and nobody may wait: a second checkout overflows.
        let held = pools.checkout(&key).await.expect("checkout");
        let err = pools.checkout(&key).await.err().expect("overflow");
        assert!(matches!(err, UpstreamError::Overflow { .. }), "{err}");
        drop(held);
        assert!(pools.checkout(&key).await.is_ok());
    }

    #[tokio::test]
    async fn a_body_dropped_half_way_does_not_return_the_connection() {
        let (addr, accepted) = server().await;
        let pools = Pools::new();
        let key = PoolKey {
            addr,
            tls: None,
            hbone: None,
            version: HttpVersion::Http1,
            limits: PoolLimits::default(),
        };
        let resp = pools
            .checkout(&key)
            .await
            .expect("checkout")
            .send(get())
            .await
            .expect("send");
        drop(resp);
        let lease = pools.checkout(&key).await.expect("checkout");
        assert!(!lease.reused());
        // Once a request went through, the server has surely counted the second accept.
        let resp = lease.send(get()).await.expect("send");
        let _ = resp.into_body().collect().await.expect("body");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn upstream_sockets_carry_the_mark() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tcp = connect_tcp(addr, Duration::from_secs(5))
            .await
            .expect("connect");
        let can_mark = nix::unistd::Uid::effective().is_root();
        let got = socket2::SockRef::from(&tcp).mark().expect("SO_MARK");
        if can_mark {
            assert_eq!(got, SOCKET_MARK);
        } else {
            // Unprivileged: the mark cannot be set, the connection works all the same.
            assert_eq!(got, 0);
        }
    }

    #[test]
    fn limits_from_destination_rule() {
        let pool = ConnectionPool {
            max_connections: Some(7),
            http1_max_pending_requests: Some(3),
            http2_max_requests: Some(50),
            max_requests_per_connection: Some(0),
            connect_timeout: Some(Duration::from_millis(250)),
            ..ConnectionPool::default()
        };
        let h1 = PoolLimits::from_settings(Some(&pool), HttpVersion::Http1);
        assert_eq!(h1.max_requests, 7);
        assert_eq!(h1.max_pending, 3);
        // 0 means unlimited in Istio.
        assert_eq!(h1.max_requests_per_connection, None);
        assert_eq!(h1.connect_timeout, Duration::from_millis(250));
        let h2 = PoolLimits::from_settings(Some(&pool), HttpVersion::Http2);
        assert_eq!(h2.max_requests, 50);
        assert_eq!(
            PoolLimits::from_settings(None, HttpVersion::Http1),
            PoolLimits::default()
        );
    }
}
