//! The HBONE client: CONNECT streams multiplexed over pooled mTLS HTTP/2 connections.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use certs::SpiffeId;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;
use tracing::{Instrument, debug, warn};

use crate::coalesce::{self, coalesce, flushing};
use crate::config::Config;
use crate::error::Error;
use crate::headers::{
    BAGGAGE, Baggage, FORWARDED, Forwarded, HeaderError, TRACEPARENT, TraceParent,
};
use crate::keepalive::keepalive;
use crate::tunnel::{ConnInfo, Tunnel, TunnelInfo};

/// Creates the TCP sockets HBONE connections run on.
///
/// ztunnel creates its upstream sockets inside a pod's network namespace with `SO_MARK`; it
/// plugs that in here.
pub trait Connector: Send + Sync + 'static {
    /// Opens a TCP connection to `dst` (an HBONE peer, usually port 15008).
    fn connect(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>>;

    /// The source address this connector's sockets use; it is part of the pool key, so
    /// connectors that create sockets in different network namespaces, or bind different
    /// addresses, must report different values. `None` for "whatever the kernel picks".
    fn source_ip(&self) -> Option<IpAddr>;
}

/// Plain `connect(2)` from the current network namespace, `TCP_NODELAY` on, optionally bound to
/// a source IP.
#[derive(Clone, Debug, Default)]
pub struct PlainConnector {
    bind: Option<IpAddr>,
}

impl PlainConnector {
    pub fn new() -> Self {
        PlainConnector { bind: None }
    }

    /// Binds every socket to `ip` (port chosen by the kernel).
    pub fn bound_to(ip: IpAddr) -> Self {
        PlainConnector { bind: Some(ip) }
    }
}

impl Connector for PlainConnector {
    fn connect(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let socket = match dst {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            // HTTP/2 frames are already batched; Nagle would only delay small writes.
            socket.set_nodelay(true)?;
            if let Some(ip) = self.bind {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            socket.connect(dst).await
        })
    }

    fn source_ip(&self) -> Option<IpAddr> {
        self.bind
    }
}

/// One tunnel to open: who we are, which HBONE peer to go through, who it must be, and the
/// target the peer should connect to.
#[derive(Clone)]
pub struct TunnelRequest {
    /// Our identity: the client certificate presented.
    pub source: SpiffeId,
    /// The HBONE peer: a waypoint or a ztunnel, `ip:15008`.
    pub destination: SocketAddr,
    /// The server must present one of these identities (workload identity plus the service's
    /// subjectAltNames). Order and duplicates do not matter.
    pub expected_identities: Vec<SpiffeId>,
    /// The CONNECT `:authority`: the target `ip:port` (the original VIP:port when going to a
    /// waypoint).
    pub authority: SocketAddr,
    /// Extra request headers (`forwarded`, `baggage`, `traceparent`...).
    pub headers: HeaderMap,
    /// Overrides the client's connector for this tunnel (e.g. a pod's network namespace).
    pub connector: Option<Arc<dyn Connector>>,
}

impl TunnelRequest {
    pub fn new(
        source: SpiffeId,
        destination: SocketAddr,
        expected_identities: Vec<SpiffeId>,
        authority: SocketAddr,
    ) -> Self {
        TunnelRequest {
            source,
            destination,
            expected_identities,
            authority,
            headers: HeaderMap::new(),
            connector: None,
        }
    }

    /// Appends a header.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Sets `forwarded` (e.g. `for="10.0.0.1:34567";host=svc.ns.svc.cluster.local`).
    pub fn forwarded(mut self, forwarded: &Forwarded) -> Result<Self, HeaderError> {
        self.headers.insert(FORWARDED, forwarded.to_header_value()?);
        Ok(self)
    }

    /// Sets `baggage` with the source workload's metadata.
    pub fn baggage(mut self, baggage: &Baggage) -> Result<Self, HeaderError> {
        self.headers.insert(BAGGAGE, baggage.to_header_value()?);
        Ok(self)
    }

    /// Sets `traceparent`.
    pub fn traceparent(mut self, traceparent: &TraceParent) -> Self {
        self.headers
            .insert(TRACEPARENT, traceparent.to_header_value());
        self
    }

    /// Uses `connector` instead of the client's default for this tunnel.
    pub fn connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connector = Some(connector);
        self
    }

    /// The CONNECT request: `:method CONNECT`, `:authority <ip:port>`, no `:scheme`/`:path`.
    fn to_request(&self) -> Result<Request<()>, Error> {
        let invalid = |reason: String| Error::InvalidRequest {
            authority: self.authority,
            reason,
        };
        // HTTP/2 forbids connection-specific headers (RFC 9113 §8.2.2); refuse them here rather
        // than have h2 fail the stream.
        for name in [
            "connection",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
            "proxy-connection",
        ] {
            if self.headers.contains_key(name) {
                return Err(invalid(format!("{name} is not allowed in HTTP/2")));
            }
        }
        let uri = Uri::try_from(self.authority.to_string())
            .map_err(|e| invalid(format!("authority: {e}")))?;
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = uri;
        *req.headers_mut() = self.headers.clone();
        Ok(req)
    }
}

impl fmt::Debug for TunnelRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelRequest")
            .field("source", &self.source)
            .field("destination", &self.destination)
            .field("expected_identities", &self.expected_identities)
            .field("authority", &self.authority)
            .field("headers", &self.headers)
            .field("custom_connector", &self.connector.is_some())
            .finish()
    }
}

/// What pooled connections are shared by: (source identity, destination identities, destination
/// `ip:port`, source IP), as in ztunnel.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub source: SpiffeId,
    /// Sorted and deduplicated: the same set in another order is the same key.
    pub destination_identities: Vec<SpiffeId>,
    pub destination: SocketAddr,
    pub source_ip: Option<IpAddr>,
}

impl PoolKey {
    pub fn new(
        source: SpiffeId,
        destination_identities: &[SpiffeId],
        destination: SocketAddr,
        source_ip: Option<IpAddr>,
    ) -> Self {
        let mut ids = destination_identities.to_vec();
        ids.sort();
        ids.dedup();
        PoolKey {
            source,
            destination_identities: ids,
            destination,
            source_ip,
        }
    }
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source_ip {
            Some(ip) => write!(f, "{ip}({})", self.source)?,
            None => write!(f, "{}", self.source)?,
        }
        write!(f, "->{}[", self.destination)?;
        for (i, id) in self.destination_identities.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{id}")?;
        }
        f.write_str("]")
    }
}

/// Counters of a client's pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// HTTP/2 connections established since the client was created.
    pub connections_opened: u64,
    /// Connections in the pool now (established or being established).
    pub connections_pooled: usize,
    /// Tunnels open now.
    pub streams_active: usize,
    /// Tunnels opened since the client was created.
    pub streams_opened: u64,
    /// Opens retried on a new connection after the pooled one turned out to be dead.
    pub retries: u64,
}

/// The HBONE client. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

/// (source identity, accepted server identities).
type TlsKey = (SpiffeId, Vec<SpiffeId>);

struct ClientInner {
    identities: certs::IdentityManager,
    config: Arc<Config>,
    connector: Arc<dyn Connector>,
    /// rustls configs resolve certificates per handshake, so one per (source, expected) is
    /// enough for the life of the client.
    tls: Mutex<HashMap<TlsKey, Arc<rustls::ClientConfig>>>,
    pool: Arc<Pool>,
}

impl Client {
    /// A client using [`PlainConnector`].
    pub fn new(identities: certs::IdentityManager, config: Config) -> Self {
        Self::with_connector(identities, config, Arc::new(PlainConnector::new()))
    }

    /// A client whose sockets come from `connector` unless a request names its own.
    pub fn with_connector(
        identities: certs::IdentityManager,
        config: Config,
        connector: Arc<dyn Connector>,
    ) -> Self {
        Client {
            inner: Arc::new(ClientInner {
                identities,
                config: Arc::new(config),
                connector,
                tls: Mutex::new(HashMap::new()),
                pool: Arc::new(Pool::default()),
            }),
        }
    }

    /// Opens a tunnel: a CONNECT stream on a pooled connection to `req.destination` (opening one
    /// if none has a free slot). Returns once the peer answered 200; any other status is
    /// [`Error::Status`].
    ///
    /// If the pooled connection turns out to be dead before the peer accepted the stream
    /// (GOAWAY, I/O error, refused stream), the open is retried once on a new connection.
    pub async fn open(&self, req: TunnelRequest) -> Result<Tunnel, Error> {
        let inner = &self.inner;
        let connector = req
            .connector
            .clone()
            .unwrap_or_else(|| inner.connector.clone());
        let key = PoolKey::new(
            req.source.clone(),
            &req.expected_identities,
            req.destination,
            connector.source_ip(),
        );
        // Fail on a bad request before any connection is made.
        let mut request = Some(req.to_request()?);
        let tls = inner.tls_config(&key)?;
        let max_streams = inner.config.max_streams_per_connection.max(1);
        let mut retried = false;
        loop {
            let (conn, slot) = inner.pool.checkout(&key, max_streams, |id, state| {
                establish(
                    key.clone(),
                    id,
                    state,
                    connector.clone(),
                    tls.clone(),
                    inner.config.clone(),
                    Arc::downgrade(&inner.pool),
                )
                .boxed()
            });
            let handle = conn.ready.clone().await?;
            let request = match request.take() {
                Some(r) => r,
                None => req.to_request()?,
            };
            match send(&handle, request).await {
                Ok((response, send_stream)) => {
                    let (parts, recv) = response.into_parts();
                    if parts.status != StatusCode::OK {
                        debug!(%key, authority = %req.authority, status = %parts.status, "CONNECT refused");
                        return Err(Error::Status {
                            addr: req.destination,
                            authority: req.authority,
                            status: parts.status,
                            headers: Box::new(parts.headers),
                        });
                    }
                    inner.pool.streams_opened.fetch_add(1, Ordering::Relaxed);
                    let info = TunnelInfo::new(handle.info.clone(), parts.headers);
                    return Ok(Tunnel::new(send_stream, recv, info, Some(Arc::new(slot))));
                }
                Err(Failure {
                    error,
                    before_accept,
                }) => {
                    if before_accept {
                        // The connection is unusable for new streams; never hand it out again.
                        inner.pool.discard(&key, conn.id, &conn.state);
                    }
                    if before_accept && !retried {
                        debug!(%key, error = %error, "pooled HBONE connection failed, retrying on a new one");
                        inner.pool.retries.fetch_add(1, Ordering::Relaxed);
                        retried = true;
                        continue;
                    }
                    return Err(Error::h2(req.destination, error));
                }
            }
        }
    }

    /// Pool counters (for tests and metrics).
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool.stats()
    }
}

impl ClientInner {
    fn tls_config(&self, key: &PoolKey) -> Result<Arc<rustls::ClientConfig>, Error> {
        let cache_key = (key.source.clone(), key.destination_identities.clone());
        let mut cache = lock(&self.tls);
        if let Some(cfg) = cache.get(&cache_key) {
            return Ok(cfg.clone());
        }
        let cfg = self
            .identities
            .client_config(&key.source, &key.destination_identities)
            .map_err(|e| Error::Certs {
                identity: key.source.to_string(),
                source: Arc::new(e),
            })?;
        cache.insert(cache_key, cfg.clone());
        Ok(cfg)
    }
}

/// A failed CONNECT; `before_accept` when the peer cannot have acted on it (the connection was
/// dead, going away, or the stream was refused), so another connection may be tried.
struct Failure {
    error: h2::Error,
    before_accept: bool,
}

impl Failure {
    fn classify(error: h2::Error) -> Self {
        let before_accept =
            error.is_io() || error.is_go_away() || error.reason() == Some(Reason::REFUSED_STREAM);
        Failure {
            error,
            before_accept,
        }
    }
}

async fn send(
    handle: &ConnHandle,
    request: Request<()>,
) -> Result<(Response<RecvStream>, SendStream<Bytes>), Failure> {
    // A connection that cannot open a stream is never usable again, whatever the reason.
    let mut sender = handle.send.clone().ready().await.map_err(|error| Failure {
        error,
        before_accept: true,
    })?;
    let (response, stream) = sender
        .send_request(request, false)
        .map_err(Failure::classify)?;
    let response = response.await.map_err(Failure::classify)?;
    Ok((response, stream))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves consistent data here: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An established connection, as handed to openers.
#[derive(Clone)]
struct ConnHandle {
    send: SendRequest<Bytes>,
    /// Shared by the connection's tunnels.
    info: Arc<ConnInfo>,
}

type Ready = Shared<BoxFuture<'static, Result<ConnHandle, Error>>>;

/// A pooled connection: established, or being established by a task all openers wait on.
struct PooledConn {
    id: u64,
    state: Arc<ConnState>,
    ready: Ready,
}

#[derive(Default)]
struct ConnState {
    /// Streams open or being opened on this connection.
    active: AtomicUsize,
    /// Never hand this connection out again.
    dead: AtomicBool,
    /// Signalled when `active` leaves or reaches zero (drives the idle timer).
    idle_change: Notify,
}

/// A stream slot on a connection, held by a tunnel (or an open in progress).
struct Slot(Arc<ConnState>);

impl Slot {
    fn acquire(state: &Arc<ConnState>) -> Slot {
        if state.active.fetch_add(1, Ordering::AcqRel) == 0 {
            state.idle_change.notify_one();
        }
        Slot(state.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_change.notify_one();
        }
    }
}

#[derive(Default)]
struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    next_id: AtomicU64,
    connections_opened: AtomicU64,
    streams_opened: AtomicU64,
    retries: AtomicU64,
}

impl Pool {
    /// Takes a slot on a live connection with room, or registers a new connection (started by
    /// `connect`) and takes its first slot. Slots are taken under the lock, so a burst of opens
    /// fills connections to exactly `max_streams` each.
    fn checkout(
        &self,
        key: &PoolKey,
        max_streams: usize,
        connect: impl FnOnce(u64, Arc<ConnState>) -> BoxFuture<'static, Result<ConnHandle, Error>>,
    ) -> (Arc<PooledConn>, Slot) {
        let mut conns = lock(&self.conns);
        let list = conns.entry(key.clone()).or_default();
        list.retain(|c| !c.state.dead.load(Ordering::Acquire));
        if let Some(c) = list
            .iter()
            .find(|c| c.state.active.load(Ordering::Acquire) < max_streams)
        {
            let slot = Slot::acquire(&c.state);
            return (c.clone(), slot);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::default());
        let slot = Slot::acquire(&state);
        // A task, so the connection is established even if the opener that started it gives up.
        let task = tokio::spawn(connect(id, state.clone()));
        let addr = key.destination;
        let ready = async move {
            match task.await {
                Ok(r) => r,
                Err(e) => Err(Error::Connect {
                    addr,
                    source: Arc::new(io::Error::other(format!("connection task failed: {e}"))),
                }),
            }
        }
        .boxed()
        .shared();
        let conn = Arc::new(PooledConn { id, state, ready });
        list.push(conn.clone());
        (conn, slot)
    }

    /// Marks a connection dead and removes it from the pool.
    fn discard(&self, key: &PoolKey, id: u64, state: &ConnState) {
        state.dead.store(true, Ordering::Release);
        let mut conns = lock(&self.conns);
        Self::remove_locked(&mut conns, key, id);
    }

    /// Removes a connection that has no stream; false if one was opened meanwhile.
    fn remove_if_idle(&self, key: &PoolKey, id: u64, state: &ConnState) -> bool {
        let mut conns = lock(&self.conns);
        // Slots are only taken under this lock, so no open can race with this check.
        if state.active.load(Ordering::Acquire) != 0 {
            return false;
        }
        state.dead.store(true, Ordering::Release);
        Self::remove_locked(&mut conns, key, id);
        true
    }

    fn remove_locked(conns: &mut HashMap<PoolKey, Vec<Arc<PooledConn>>>, key: &PoolKey, id: u64) {
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }

    fn stats(&self) -> PoolStats {
        let conns = lock(&self.conns);
        let mut stats = PoolStats {
            connections_opened: self.connections_opened.load(Ordering::Relaxed),
            streams_opened: self.streams_opened.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            ..PoolStats::default()
        };
        for c in conns.values().flatten() {
            if !c.state.dead.load(Ordering::Acquire) {
                stats.connections_pooled += 1;
            }
            stats.streams_active += c.state.active.load(Ordering::Acquire);
        }
        stats
    }
}

/// Connects, handshakes TLS and HTTP/2, then leaves the connection to a driver task. On failure
/// the connection is removed from the pool, and every waiting opener gets the error.
async fn establish(
    key: PoolKey,
    id: u64,
    state: Arc<ConnState>,
    connector: Arc<dyn Connector>,
    tls: Arc<rustls::ClientConfig>,
    config: Arc<Config>,
    pool: Weak<Pool>,
) -> Result<ConnHandle, Error> {
    let addr = key.destination;
    let span = tracing::debug_span!("hbone_client", conn = id, %key);
    let attempt = async {
        let tcp = connector.connect(addr).await.map_err(|e| Error::Connect {
            addr,
            source: Arc::new(e),
        })?;
        let local_addr = tcp.local_addr().map_err(|e| Error::Connect {
            addr,
            source: Arc::new(e),
        })?;
        // The name is not sent (no SNI) nor checked: the server is verified by SPIFFE identity.
        let server_name = ServerName::from(addr.ip());
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|e| Error::Tls {
                addr,
                source: Arc::new(e),
            })?;
        let session = stream.get_ref().1;
        if session.alpn_protocol() != Some(b"h2") {
            return Err(Error::Alpn { addr });
        }
        let peer_identity = certs::peer_identity(session.peer_certificates().unwrap_or_default())
            .map_err(|e| Error::PeerIdentity {
            addr,
            source: Arc::new(e),
        })?;
        let (io, flusher) = coalesce(stream);
        let (send, conn) = config
            .client_builder()
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| Error::h2(addr, e))?;
        let handle = ConnHandle {
            send,
            info: Arc::new(ConnInfo {
                peer_identity,
                local_addr,
                peer_addr: addr,
            }),
        };
        Ok((handle, conn, flusher))
    };
    let result = match tokio::time::timeout(config.connect_timeout, attempt)
        .instrument(span.clone())
        .await
    {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            addr,
            timeout: config.connect_timeout,
        }),
    };
    match result {
        Ok((handle, conn, flusher)) => {
            if let Some(pool) = pool.upgrade() {
                pool.connections_opened.fetch_add(1, Ordering::Relaxed);
            }
            debug!(parent: &span, peer = %handle.info.peer_identity, local = %handle.info.local_addr, "HBONE connection established");
            // Each poll of the driver ends by writing out the frames it produced, in one write.
            let driver = flushing(drive(conn, state, pool, key, id, config), flusher);
            tokio::spawn(driver.instrument(span));
            Ok(handle)
        }
        Err(e) => {
            warn!(parent: &span, error = %e, "HBONE connection failed");
            if let Some(pool) = pool.upgrade() {
                pool.discard(&key, id, &state);
            } else {
                state.dead.store(true, Ordering::Release);
            }
            Err(e)
        }
    }
}

type ClientIo = tokio_rustls::client::TlsStream<TcpStream>;
type ClientConnection = h2::client::Connection<coalesce::Shared<ClientIo>, Bytes>;

/// Runs a client connection until it closes, fails its keepalive or sits idle; then takes it
/// out of the pool.
async fn drive(
    mut conn: ClientConnection,
    state: Arc<ConnState>,
    pool: Weak<Pool>,
    key: PoolKey,
    id: u64,
    config: Arc<Config>,
) {
    let ping = conn.ping_pong();
    let keepalive = keepalive(ping, config.ping_interval, config.ping_timeout);
    let idle = idle_watch(&state, &pool, &key, id, config.idle_timeout);
    tokio::pin!(keepalive, idle);
    let idled = tokio::select! {
        biased;
        res = &mut conn => {
            match res {
                Ok(()) => debug!("HBONE connection closed"),
                Err(e) => debug!(error = %e, "HBONE connection ended"),
            }
            false
        }
        failure = &mut keepalive => {
            warn!(%failure, "HBONE connection dead, dropping it");
            false
        }
        () = &mut idle => true,
    };
    if let Some(pool) = pool.upgrade() {
        pool.discard(&key, id, &state);
    } else {
        state.dead.store(true, Ordering::Release);
    }
    if idled {
        debug!(idle = ?config.idle_timeout, "HBONE connection idle, closing");
        // Out of the pool, no request handle is left: h2 sends GOAWAY and closes.
        let _ = tokio::time::timeout(config.ping_timeout, conn).await;
    }
    // Otherwise dropping `conn` closes the socket; streams still on it see an error.
}

/// Resolves once the connection has had no stream for `idle` and was removed from the pool.
async fn idle_watch(
    state: &ConnState,
    pool: &Weak<Pool>,
    key: &PoolKey,
    id: u64,
    idle: std::time::Duration,
) {
    loop {
        if state.active.load(Ordering::Acquire) == 0 {
            tokio::select! {
                () = tokio::time::sleep(idle) => match pool.upgrade() {
                    Some(pool) => {
                        if pool.remove_if_idle(key, id, state) {
                            return;
                        }
                    }
                    // The client is gone: nobody can use this connection any more.
                    None => return,
                },
                () = state.idle_change.notified() => {}
            }
        } else {
            state.idle_change.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "ns", sa)
    }

    #[test]
    fn pool_key_ignores_identity_order_and_duplicates() {
        let dst: SocketAddr = "10.0.0.9:15008".parse().unwrap();
        let a = PoolKey::new(id("client"), &[id("b"), id("a"), id("b")], dst, None);
        let b = PoolKey::new(id("client"), &[id("a"), id("b")], dst, None);
        assert_eq!(a, b);
        assert_eq!(a.destination_identities, vec![id("a"), id("b")]);
    }

    #[test]
    fn pool_key_distinguishes_every_field() {
        let dst: SocketAddr = "10.0.0.9:15008".parse().unwrap();
        let base = PoolKey::new(id("client"), &[id("a")], dst, None);
        let cases = [
            PoolKey::new(id("other"), &[id("a")], dst, None),
            PoolKey::new(id("client"), &[id("a"), id("b")], dst, None),
            PoolKey::new(
                id("client"),
                &[id("a")],
                "10.0.0.9:15009".parse().unwrap(),
                None,
            ),
            PoolKey::new(
                id("client"),
                &[id("a")],
                dst,
                Some("10.1.0.1".parse().unwrap()),
            ),
        ];
        for other in cases {
            assert_ne!(base, other, "{other} must not share {base}'s connections");
        }
    }

    #[test]
    fn pool_key_display() {
        let key = PoolKey::new(
            id("client"),
            &[id("b"), id("a")],
            "10.0.0.9:15008".parse().unwrap(),
            Some("10.1.0.1".parse().unwrap()),
        );
        assert_eq!(
            key.to_string(),
            "10.1.0.1(spiffe://cluster.local/ns/ns/sa/client)->10.0.0.9:15008[spiffe://cluster.local/ns/ns/sa/a,spiffe://cluster.local/ns/ns/sa/b]"
        );
    }

    #[test]
    fn connect_request_has_only_the_authority() {
        let req = TunnelRequest::new(
            id("client"),
            "10.0.0.9:15008".parse().unwrap(),
            vec![id("server")],
            "[fd00::1]:8080".parse().unwrap(),
        )
        .traceparent(&TraceParent {
            trace_id: 1,
            span_id: 2,
            flags: 0,
        });
        let r = req.to_request().unwrap();
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(r.uri().to_string(), "[fd00::1]:8080");
        assert!(r.uri().scheme().is_none());
        assert!(r.uri().path_and_query().is_none());
        assert_eq!(
            r.headers()[TRACEPARENT],
            "00-00000000000000000000000000000001-0000000000000002-00"
        );
    }

    #[test]
    fn connection_specific_headers_are_refused() {
        let req = TunnelRequest::new(
            id("client"),
            "10.0.0.9:15008".parse().unwrap(),
            vec![id("server")],
            "10.0.0.1:80".parse().unwrap(),
        )
        .header(http::header::CONNECTION, HeaderValue::from_static("close"));
        assert!(matches!(
            req.to_request(),
            Err(Error::InvalidRequest { .. })
        ));
    }
}
