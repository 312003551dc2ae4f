//! Shared fixtures: an in-process CA, HBONE servers on loopback, TCP targets.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use certs::{CertificateAuthority, IdentityManager, SpiffeId};
use hbone::{Config, Handler, IncomingConnect, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TRUST_DOMAIN: &str = "cluster.local";

pub fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, "default", sa)
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A mesh CA and an identity manager minting from it.
pub struct Mesh {
    pub ca: Arc<CertificateAuthority>,
    pub identities: IdentityManager,
}

pub fn mesh() -> Mesh {
    init_tracing();
    let ca = Arc::new(CertificateAuthority::generate(TRUST_DOMAIN).expect("CA"));
    let identities = IdentityManager::new(ca.clone(), ca.trust_bundle(), Duration::from_secs(3600));
    Mesh { ca, identities }
}

/// An HBONE server on 127.0.0.1 counting the CONNECTs that reached its handler.
pub struct TestServer {
    pub addr: SocketAddr,
    pub handled: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub async fn start<H: Handler>(
        identities: &IdentityManager,
        local: &SpiffeId,
        config: Config,
        handler: H,
    ) -> TestServer {
        let server = Server::new(identities, local, config).expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handled = Arc::new(AtomicUsize::new(0));
        let counter = handled.clone();
        let handler = Arc::new(handler);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(
                    listener,
                    move |c: IncomingConnect| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let handler = handler.clone();
                        async move { handler.handle(c).await }
                    },
                    async move {
                        let _ = rx.await;
                    },
                )
                .await
        });
        TestServer {
            addr,
            handled,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn handled(&self) -> usize {
        self.handled.load(Ordering::SeqCst)
    }

    /// Triggers graceful shutdown; returns the task that finishes once the server drained.
    pub fn shutdown(mut self) -> JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task
    }
}

/// Handler: connects to the CONNECT authority and copies both ways; 503 if unreachable.
pub async fn forward(c: IncomingConnect) {
    let target = c.meta().authority;
    let mut upstream = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => return c.reject(http::StatusCode::SERVICE_UNAVAILABLE),
    };
    let Ok(mut tunnel) = c.accept() else { return };
    let _ = hbone::copy_bidirectional(&mut tunnel, &mut upstream).await;
}

/// Handler: echoes the tunnel onto itself (no target socket), half-close aware.
pub async fn self_echo(c: IncomingConnect) {
    let Ok(tunnel) = c.accept() else { return };
    let (mut r, mut w) = tunnel.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// A TCP echo server: echoes until EOF, then half-closes.
pub async fn echo_target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A TCP server that reads everything until EOF, then answers `got <n> bytes` and closes:
/// it can only answer if the client's half-close left the other direction open.
pub async fn collect_then_reply_target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_ok() {
                    let _ = s
                        .write_all(format!("got {} bytes", all.len()).as_bytes())
                        .await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, 64-bit: a checksum cheap enough for 64 MiB in a debug build.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A bare HTTP/2-over-TLS client (no hbone::Client), to send what hbone::Client never would.
pub async fn raw_h2(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> Result<h2::client::SendRequest<bytes::Bytes>, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    let (send, conn) = h2::client::handshake(stream).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Sends `request` on a raw connection and returns the response status.
pub async fn raw_status(
    send: &h2::client::SendRequest<bytes::Bytes>,
    request: http::Request<()>,
) -> Result<http::StatusCode, h2::Error> {
    let mut send = send.clone().ready().await?;
    let (response, _stream) = send.send_request(request, false)?;
    Ok(response.await?.status())
}

/// A TCP proxy in front of a server that can freeze (stop forwarding, keep sockets open) and
/// kill (drop every proxied socket) its connections.
pub struct Proxy {
    pub addr: SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    conns: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (frozen, frozen_rx) = tokio::sync::watch::channel(false);
        let conns = Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let set = conns.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let mut set = set.lock().unwrap();
                set.spawn(pump(dr, uw, frozen_rx.clone()));
                set.spawn(pump(ur, dw, frozen_rx.clone()));
            }
        });
        Proxy {
            addr,
            frozen,
            conns,
        }
    }

    pub fn freeze(&self, frozen: bool) {
        let _ = self.frozen.send(frozen);
    }

    /// Drops both sockets of every proxied connection.
    pub fn kill(&self) {
        self.conns.lock().unwrap().abort_all();
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    let _ = w.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if w.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            // Frozen meanwhile: stop reading.
            _ = frozen.changed() => {}
        }
    }
}
