//! REGISTRY_ONLY's black hole, as Envoy's `BlackHoleCluster` behaves for sidecars: a refused
//! connection that speaks HTTP/1 is answered `502 Bad Gateway` (`server: envoy`), so an HTTP
//! client sees why; anything else (a TLS ClientHello, other protocols, a server-first protocol
//! whose client sends nothing) is reset, like every other refusal.
//!
//! hyper parses the request. Two guards keep non-HTTP clients from getting any HTTP bytes:
//! - hyper answers a malformed request head with its own `400`; [`Gate`] refuses writes until a
//!   request has reached our service, so that `400` fails the connection instead of going out;
//! - the socket carries SO_LINGER 0 until the 502 is out, so every other way out (parse error,
//!   header timeout, drain, drop) closes with a reset.

use std::convert::Infallible;
use std::error::Error as _;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::conn::{ByteCounts, Counted};

/// How long a refused client has to send a complete request head. Short: a server-first
/// protocol's client sends nothing and should fail soon.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on the whole exchange, e.g. a client that never reads the answer.
const SERVE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the answer, how long to wait for the client to close first. Closing with unread
/// request bytes (a body) makes the kernel send a reset, which can destroy the answer in flight.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// hyper's read buffer cap (its minimum is 8 KiB): a request head needs no more.
const MAX_BUF: usize = 16 * 1024;

/// What the refused client got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// `502 Bad Gateway`, then a clean close.
    BadGateway,
    /// A reset, and why no 502 was sent.
    Reset(String),
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::BadGateway => f.write_str("answered 502 Bad Gateway"),
            Answer::Reset(why) => write!(f, "reset ({why})"),
        }
    }
}

/// Serves a connection refused by REGISTRY_ONLY: a 502 to an HTTP/1 request, a reset otherwise.
/// `dst` is the original destination, named in the answer; `counts` gets the bytes moved.
pub(crate) async fn refuse(stream: TcpStream, dst: SocketAddr, counts: &ByteCounts) -> Answer {
    // Armed reset: any path that drops the socket before the answer is out resets it.
    if let Err(error) = stream.set_zero_linger() {
        debug!(%error, "setting SO_LINGER 0 failed; failures will close normally");
    }
    let served = Arc::new(AtomicBool::new(false));
    let io = Gate {
        inner: Counted::client(stream, counts),
        open: served.clone(),
    };
    let body = Bytes::from(format!(
        "upstream connect error: destination {dst} is not registered in the mesh \
         (outboundTrafficPolicy REGISTRY_ONLY)\n"
    ));
    let service = {
        let served = served.clone();
        service_fn(move |_request| {
            served.store(true, Ordering::Release);
            let response = bad_gateway(body.clone());
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(MAX_BUF)
        .serve_connection(TokioIo::new(io), service)
        // Hand the socket back once the answer is out, to close it gracefully ourselves.
        .without_shutdown();
    let parts = match tokio::time::timeout(SERVE_TIMEOUT, conn).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(error)) if !served.load(Ordering::Acquire) => {
            let why = if error.is_timeout() {
                format!("no HTTP/1 request head within {HEADER_READ_TIMEOUT:?}")
            } else {
                format!("not an HTTP/1 request: {}", chain(&error))
            };
            return Answer::Reset(why);
        }
        Ok(Err(error)) => return Answer::Reset(format!("writing the 502: {}", chain(&error))),
        Err(_) => return Answer::Reset(format!("not done within {SERVE_TIMEOUT:?}")),
    };
    if !served.load(Ordering::Acquire) {
        // hyper ends cleanly without a request only when the client closed first.
        return Answer::Reset("closed by the client before any request".into());
    }
    let mut stream = parts.io.into_inner().inner.into_inner();
    // Disarm the reset: the answer is out and must not be destroyed.
    if let Err(error) = socket2::SockRef::from(&stream).set_linger(None) {
        debug!(%error, "clearing SO_LINGER failed");
    }
    close_gracefully(&mut stream).await;
    Answer::BadGateway
}

/// The black hole's answer. hyper adds `content-length`, `date` and `connection: close`.
fn bad_gateway(body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    let headers = response.headers_mut();
    headers.insert(header::SERVER, header::HeaderValue::from_static("envoy"));
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    response
}

/// Half-closes, then discards what the client still sends until it closes or [`CLOSE_WAIT`]
/// passes, like Envoy's delayed close.
async fn close_gracefully(stream: &mut TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
}

/// An error and its sources, for the log.
fn chain(error: &hyper::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Refuses writes until `open`: the only bytes hyper writes before our service has seen a
/// request are its own error responses (`400` and the like) to input that is not HTTP/1.
struct Gate<S> {
    inner: S,
    open: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Gate<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gate<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.open.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::other(
                "hyper's error response withheld: no request was parsed",
            )));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use std::time::Instant;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    const DST: &str = "203.0.113.7:80";

    /// A client connected to a task that refuses it; the task yields the answer and the counts.
    async fn refused_client() -> (TcpStream, JoinHandle<(Answer, ByteCounts)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let task = tokio::spawn(async move {
            let counts = ByteCounts::default();
            let answer = refuse(server, DST.parse().expect("addr"), &counts).await;
            (answer, counts)
        });
        (client, task)
    }

    #[tokio::test]
    async fn http_request_gets_502_from_envoy() {
        let (client, task) = refused_client().await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .expect("handshake");
        let driver = tokio::spawn(conn);
        let request = http::Request::get("/")
            .header(header::HOST, "www.example.com")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("an answer");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[header::SERVER], "envoy");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains(DST) && body.contains("REGISTRY_ONLY"),
            "{body}"
        );
        driver.await.expect("join").expect("clean close");
        let (answer, counts) = task.await.expect("join");
        assert_eq!(answer, Answer::BadGateway);
        assert!(counts.sent() > 0 && counts.received() > body.len() as u64);
    }

    #[tokio::test]
    async fn tls_client_hello_is_reset_without_any_http() {
        let (mut client, task) = refused_client().await;
        // The start of a TLS 1.2+ ClientHello record: hyper would answer it `400 Bad Request`.
        let hello = [
            0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
        ];
        client.write_all(&hello).await.expect("write");
        let mut got = Vec::new();
        let read = client.read_to_end(&mut got).await;
        assert!(
            got.is_empty(),
            "no bytes back: {:?}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(
            read.expect_err("a reset, not EOF").kind(),
            io::ErrorKind::ConnectionReset
        );
        let (answer, counts) = task.await.expect("join");
        assert!(
            matches!(&answer, Answer::Reset(why) if why.starts_with("not an HTTP/1 request")),
            "{answer}"
        );
        assert_eq!(counts.received(), 0);
    }

    #[tokio::test]
    async fn silent_client_is_reset_after_the_header_timeout() {
        let (mut client, task) = refused_client().await;
        let started = Instant::now();
        let mut got = Vec::new();
        let read = client.read_to_end(&mut got).await;
        let waited = started.elapsed();
        assert!(got.is_empty());
        assert_eq!(
            read.expect_err("a reset, not EOF").kind(),
            io::ErrorKind::ConnectionReset
        );
        assert!(
            waited >= HEADER_READ_TIMEOUT - Duration::from_millis(100) && waited < SERVE_TIMEOUT,
            "closed after {waited:?}"
        );
        let (answer, _) = task.await.expect("join");
        assert!(
            matches!(&answer, Answer::Reset(why) if why.starts_with("no HTTP/1 request head")),
            "{answer}"
        );
    }
}
