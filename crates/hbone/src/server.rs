//! The HBONE server: accepts mTLS HTTP/2 connections and hands each CONNECT to a handler.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use certs::SpiffeId;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};

use crate::coalesce::{self, coalesce, flushing};
use crate::config::Config;
use crate::error::Error;
use crate::headers::{Forwarded, parse_authority};
use crate::keepalive::{KeepaliveFailure, keepalive};
use crate::tunnel::{ConnInfo, Tunnel, TunnelInfo};

/// Decides what to do with each CONNECT. Called on its own task per stream; it must answer
/// with [`IncomingConnect::accept`] or [`IncomingConnect::reject`] (dropping it unanswered
/// answers 503).
///
/// Implemented for closures `Fn(IncomingConnect) -> impl Future<Output = ()>`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, connect: IncomingConnect) -> impl Future<Output = ()> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(IncomingConnect) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    fn handle(&self, connect: IncomingConnect) -> impl Future<Output = ()> + Send {
        self(connect)
    }
}

/// What is known about a CONNECT when the handler gets it.
#[derive(Clone, Debug)]
pub struct ConnectMeta {
    /// The client's SPIFFE identity (first URI SAN of its verified certificate).
    pub peer_identity: SpiffeId,
    /// The target, from `:authority`.
    pub authority: SocketAddr,
    /// All request headers.
    pub headers: HeaderMap,
    /// The first `forwarded` element, if the header is present and well-formed.
    pub forwarded: Option<Forwarded>,
    /// Our end of the TCP connection (for ztunnel inbound: the pod address it reached).
    pub local_addr: SocketAddr,
    /// The client's end of the TCP connection.
    pub remote_addr: SocketAddr,
}

/// A CONNECT awaiting the handler's answer.
pub struct IncomingConnect {
    meta: ConnectMeta,
    /// The connection, shared by its tunnels (`meta` has a copy of it for the handler).
    conn: Arc<ConnInfo>,
    respond: Option<SendResponse<Bytes>>,
    recv: Option<RecvStream>,
}

impl IncomingConnect {
    pub fn meta(&self) -> &ConnectMeta {
        &self.meta
    }

    /// Answers 200 and returns the stream.
    pub fn accept(self) -> Result<Tunnel, Error> {
        self.accept_with_headers(HeaderMap::new())
    }

    /// Answers 200 with `headers` (e.g. `baggage`) and returns the stream.
    ///
    /// The tunnel keeps none of the request's headers ([`Tunnel::headers`] is empty on the
    /// server): they are in [`IncomingConnect::meta`] until the CONNECT is answered, and a
    /// tunnel can stay open, idle, for hours.
    pub fn accept_with_headers(mut self, headers: HeaderMap) -> Result<Tunnel, Error> {
        let remote = self.meta.remote_addr;
        let (Some(mut respond), Some(recv)) = (self.respond.take(), self.recv.take()) else {
            // Both are only taken here, and this consumes `self`.
            return Err(Error::InvalidRequest {
                authority: self.meta.authority,
                reason: "CONNECT already answered".into(),
            });
        };
        let mut response = Response::new(());
        *response.headers_mut() = headers;
        let send = respond
            .send_response(response, false)
            .map_err(|e| Error::h2(remote, e))?;
        let info = TunnelInfo::new(self.conn.clone(), HeaderMap::new());
        Ok(Tunnel::new(send, recv, info, None))
    }

    /// Answers `status` (401 policy denial, 503 target unreachable, 502, 504...) and ends the
    /// stream. A status below 300 is not a rejection: it is answered as 500.
    pub fn reject(self, status: StatusCode) {
        self.reject_with_headers(status, HeaderMap::new());
    }

    /// Like [`IncomingConnect::reject`], with response headers.
    pub fn reject_with_headers(mut self, status: StatusCode, headers: HeaderMap) {
        let status = if status.as_u16() < 300 {
            warn!(%status, "handler rejected a CONNECT with a success status; answering 500");
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            status
        };
        if let Some(respond) = self.respond.take() {
            answer(respond, status, headers);
        }
    }
}

impl Drop for IncomingConnect {
    fn drop(&mut self) {
        if let Some(respond) = self.respond.take() {
            warn!(authority = %self.meta.authority, "CONNECT handler returned without answering; answering 503");
            answer(respond, StatusCode::SERVICE_UNAVAILABLE, HeaderMap::new());
        }
    }
}

/// A final, bodiless response.
fn answer(mut respond: SendResponse<Bytes>, status: StatusCode, headers: HeaderMap) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    // Fails only if the client already reset the stream: nothing left to tell it.
    if let Err(e) = respond.send_response(response, true) {
        debug!(error = %e, %status, "could not answer CONNECT");
    }
}

/// The HBONE server. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

struct ServerInner {
    acceptor: tokio_rustls::TlsAcceptor,
    config: Config,
}

impl Server {
    /// A server presenting `local`'s certificate and requiring client certificates of our
    /// trust domain.
    pub fn new(
        identities: &certs::IdentityManager,
        local: &SpiffeId,
        config: Config,
    ) -> Result<Self, Error> {
        let tls = identities.server_config(local).map_err(|e| Error::Certs {
            identity: local.to_string(),
            source: Arc::new(e),
        })?;
        Ok(Self::from_tls_config(tls, config))
    }

    /// A server with a ready rustls configuration; it must negotiate ALPN `h2` and require
    /// client certificates.
    pub fn from_tls_config(tls: Arc<rustls::ServerConfig>, config: Config) -> Self {
        Server {
            inner: Arc::new(ServerInner {
                acceptor: tokio_rustls::TlsAcceptor::from(tls),
                config,
            }),
        }
    }

    /// Accepts connections until `shutdown` resolves, then stops accepting, sends GOAWAY on
    /// every connection and waits up to `drain_timeout` for in-flight streams to finish.
    pub async fn serve<H: Handler>(
        &self,
        listener: TcpListener,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let handler = Arc::new(handler);
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => {
                        let server = self.clone();
                        let handler = handler.clone();
                        let mut drain = drain_rx.clone();
                        conns.spawn(async move {
                            let drained = async move {
                                let _ = drain.wait_for(|draining| *draining).await;
                            };
                            // Failures are logged where they happen.
                            let _ = server.serve_connection(tcp, handler, drained).await;
                        });
                    }
                    Err(e) => {
                        // E.g. out of file descriptors: back off rather than spin.
                        warn!(error = %e, "HBONE accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        let _ = drain_tx.send(true);
        info!(connections = conns.len(), "HBONE server draining");
        let drained = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(self.inner.config.drain_timeout, drained)
            .await
            .is_err()
        {
            warn!(
                connections = conns.len(),
                timeout = ?self.inner.config.drain_timeout,
                "HBONE drain timed out, closing the remaining connections"
            );
            conns.shutdown().await;
        }
    }

    /// Serves one accepted TCP connection until it closes. When `shutdown` resolves, GOAWAY is
    /// sent and the connection ends once its in-flight streams have finished.
    ///
    /// Handshake failures (not TLS, untrusted or missing client certificate, no ALPN `h2`, not
    /// HTTP/2) are logged and returned; the socket is closed.
    pub async fn serve_connection<H: Handler>(
        &self,
        tcp: TcpStream,
        handler: Arc<H>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        let (local, remote) = match (tcp.local_addr(), tcp.peer_addr()) {
            (Ok(l), Ok(r)) => (l, r),
            (Err(e), _) | (_, Err(e)) => {
                debug!(error = %e, "HBONE connection gone before it was served");
                return Ok(());
            }
        };
        // Debug level: an enabled span keeps an allocation for the connection's life; the
        // warnings below name the peer themselves.
        let span = tracing::debug_span!("hbone_server", %remote, %local);
        self.serve_tls(tcp, local, remote, handler, shutdown)
            .instrument(span)
            .await
    }

    async fn serve_tls<H: Handler>(
        &self,
        tcp: TcpStream,
        local: SocketAddr,
        remote: SocketAddr,
        handler: Arc<H>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        let config = &self.inner.config;
        // Frames are batched by h2 already; Nagle would only add latency.
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            let tls = self
                .inner
                .acceptor
                .accept(tcp)
                .await
                .map_err(|e| Error::Tls {
                    addr: remote,
                    source: Arc::new(e),
                })?;
            let session = tls.get_ref().1;
            if session.alpn_protocol() != Some(b"h2") {
                return Err(Error::Alpn { addr: remote });
            }
            let peer = certs::peer_identity(session.peer_certificates().unwrap_or_default())
                .map_err(|e| Error::PeerIdentity {
                    addr: remote,
                    source: Arc::new(e),
                })?;
            let (io, flusher) = coalesce(tls);
            let conn = config
                .server_builder()
                .handshake::<_, Bytes>(io)
                .await
                .map_err(|e| Error::h2(remote, e))?;
            Ok((peer, conn, flusher))
        };
        let (peer, mut conn, flusher) =
            match tokio::time::timeout(config.handshake_timeout, handshake).await {
                Ok(Ok(established)) => established,
                Ok(Err(e)) => {
                    warn!(error = %e, "HBONE handshake failed, closing the connection");
                    return Err(e);
                }
                Err(_) => {
                    let e = Error::Timeout {
                        addr: remote,
                        timeout: config.handshake_timeout,
                    };
                    warn!(error = %e, "HBONE handshake timed out, closing the connection");
                    return Err(e);
                }
            };
        debug!(%peer, "HBONE connection accepted");
        // One copy per connection, shared by its tunnels (each used to hold its own).
        let conn_info = Arc::new(ConnInfo {
            peer_identity: peer,
            local_addr: local,
            peer_addr: remote,
        });

        let keepalive = keepalive(conn.ping_pong(), config.ping_interval, config.ping_timeout);
        // Each poll of this task ends by writing out the frames it produced, in one write.
        let streams = serve_streams(conn, conn_info, handler, keepalive, shutdown);
        flushing(streams, flusher).await
    }
}

type ServerConnection =
    h2::server::Connection<coalesce::Shared<tokio_rustls::server::TlsStream<TcpStream>>, Bytes>;

/// Accepts a connection's CONNECT streams and hands each to `handler`, until the client closes,
/// fails its keepalive, or the connection has drained after `shutdown`.
async fn serve_streams<H: Handler>(
    mut conn: ServerConnection,
    conn_info: Arc<ConnInfo>,
    handler: Arc<H>,
    keepalive: impl Future<Output = KeepaliveFailure>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let remote = conn_info.peer_addr;
    let mut keepalive = std::pin::pin!(keepalive);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown, if !draining => {
                debug!("draining: GOAWAY sent, waiting for in-flight streams");
                conn.graceful_shutdown();
                draining = true;
            }
            failure = &mut keepalive => {
                warn!(%remote, %failure, "HBONE client unresponsive, dropping the connection");
                return Ok(());
            }
            next = conn.accept() => match next {
                // Every stream finished after GOAWAY, or the client closed.
                None => break,
                Some(Ok((request, respond))) => {
                    let stream = StreamContext {
                        conn: conn_info.clone(),
                    };
                    let span = tracing::debug_span!("connect", stream = u32::from(respond.stream_id()));
                    // Only the handler's future outlives the request's parsing: this task
                    // lives as long as the tunnel, and ten thousand idle tunnels add up.
                    // Boxed until the handler takes it, so the task does not hold it
                    // twice; the box is freed as it is emptied (inner block), not when
                    // the task ends, which would pin its allocation for the tunnel's life.
                    if let Some(connect) = stream.connect(request, respond).map(Box::new) {
                        let handler = handler.clone();
                        tokio::spawn(
                            async move {
                                handler
                                    .handle({
                                        let boxed = connect;
                                        *boxed
                                    })
                                    .await
                            }
                            .instrument(span),
                        );
                    }
                }
                Some(Err(e)) => {
                    debug!(error = %e, "HBONE connection ended with an error");
                    return Err(Error::h2(remote, e));
                }
            },
        }
    }
    debug!("HBONE connection closed");
    Ok(())
}

struct StreamContext {
    conn: Arc<ConnInfo>,
}

impl StreamContext {
    /// Checks a request: a CONNECT to `ip:port` is returned for the handler, anything else is
    /// answered here.
    fn connect(
        self,
        request: Request<RecvStream>,
        respond: SendResponse<Bytes>,
    ) -> Option<IncomingConnect> {
        let (parts, recv) = request.into_parts();
        if parts.method != Method::CONNECT {
            debug!(method = %parts.method, "not a CONNECT: 405");
            answer(respond, StatusCode::METHOD_NOT_ALLOWED, HeaderMap::new());
            return None;
        }
        let authority = match parts.uri.authority() {
            Some(a) => parse_authority(a.as_str()),
            None => parse_authority(""),
        };
        let authority = match authority {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "bad CONNECT authority: 400");
                answer(respond, StatusCode::BAD_REQUEST, HeaderMap::new());
                return None;
            }
        };
        let forwarded = match Forwarded::from_headers(&parts.headers) {
            Some(Ok(f)) => Some(f),
            Some(Err(e)) => {
                debug!(error = %e, "ignoring malformed forwarded header");
                None
            }
            None => None,
        };
        Some(IncomingConnect {
            meta: ConnectMeta {
                peer_identity: self.conn.peer_identity.clone(),
                authority,
                headers: parts.headers,
                forwarded,
                local_addr: self.conn.local_addr,
                remote_addr: self.conn.peer_addr,
            },
            conn: self.conn,
            respond: Some(respond),
            recv: Some(recv),
        })
    }
}
