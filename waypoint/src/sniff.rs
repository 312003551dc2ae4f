//! Looking at the first bytes of a stream without consuming them: "is this HTTP?" (httparse)
//! and "which SNI does this ClientHello carry?" (rustls' `Acceptor`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Largest prefix read while sniffing: a request head or a ClientHello larger than this is
/// treated as what it looks like so far.
pub const MAX_SNIFF: usize = 16 * 1024;

/// A stream whose first bytes were already read: they are replayed before the rest.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Prefixed { prefix, inner }
    }

    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Whether a prefix is an HTTP/1.x request head (or the HTTP/2 preface, which parses as one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpGuess {
    Http,
    NotHttp,
    /// A valid prefix of a request head: read more.
    NeedMore,
}

/// RFC 9113 §3.4.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies `prefix` with httparse.
pub fn guess_http(prefix: &[u8]) -> HttpGuess {
    if prefix.is_empty() {
        return HttpGuess::NeedMore;
    }
    // The HTTP/2 connection preface (prior knowledge) is a fixed string httparse rejects.
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            HttpGuess::Http
        } else {
            HttpGuess::NeedMore
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(prefix) {
        Ok(httparse::Status::Complete(_)) => HttpGuess::Http,
        // More headers than we have slots for: still a request head.
        Err(httparse::Error::TooManyHeaders) => HttpGuess::Http,
        Err(_) => HttpGuess::NotHttp,
        // A request line already parsed (method, path, version) is enough to call it HTTP.
        Ok(httparse::Status::Partial) if req.version.is_some() => HttpGuess::Http,
        Ok(httparse::Status::Partial) => HttpGuess::NeedMore,
    }
}

/// What [`sniff_http`] found; either way the stream is returned with nothing lost.
pub enum Sniffed<T> {
    Http(Prefixed<T>),
    Other(Prefixed<T>),
}

/// Reads until the prefix is known to be HTTP or not, [`MAX_SNIFF`] bytes, EOF or `timeout`
/// (a silent client, e.g. a server-first protocol, is "not HTTP").
pub async fn sniff_http<T: AsyncRead + Unpin>(
    mut io: T,
    timeout: Duration,
) -> io::Result<Sniffed<T>> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let is_http = loop {
        match guess_http(&buf) {
            HttpGuess::Http => break true,
            HttpGuess::NotHttp => break false,
            HttpGuess::NeedMore if buf.len() >= MAX_SNIFF => break false,
            HttpGuess::NeedMore => {}
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break false,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    let io = Prefixed::new(buf.freeze(), io);
    Ok(if is_http {
        Sniffed::Http(io)
    } else {
        Sniffed::Other(io)
    })
}

/// The outcome of reading a TLS ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello; the SNI if it carried one.
    Tls { sni: Option<String> },
    /// Not a TLS ClientHello (or EOF / timeout before one completed).
    NotTls,
}

/// Feeds `prefix` to rustls' `Acceptor`, which parses the ClientHello without any certificate.
/// `None`: a valid but incomplete ClientHello (read more).
pub fn parse_client_hello(prefix: &[u8]) -> Option<Hello> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = prefix;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) => break,
            Ok(_) => {}
            // The acceptor's buffer is full: that is no ClientHello we want.
            Err(_) => return Some(Hello::NotTls),
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(Hello::Tls {
            sni: accepted.client_hello().server_name().map(str::to_owned),
        }),
        Ok(None) => None,
        Err(_) => Some(Hello::NotTls),
    }
}

/// Reads the ClientHello from `io`, returning what it says plus everything read (to be
/// replayed upstream).
pub async fn peek_client_hello<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: Duration,
) -> io::Result<(Hello, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Hello::NotTls, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
        if let Some(hello) = parse_client_hello(&buf) {
            return Ok((hello, buf.freeze()));
        }
        if buf.len() >= MAX_SNIFF {
            return Ok((Hello::NotTls, buf.freeze()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn http_guesses() {
        let cases: [(&[u8], HttpGuess); 9] = [
            (b"", HttpGuess::NeedMore),
            (b"GE", HttpGuess::NeedMore),
            (b"GET / HTTP/1.1\r\n", HttpGuess::Http),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", HttpGuess::Http),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", HttpGuess::Http),
            (b"PRI * HTTP/2", HttpGuess::NeedMore),
            (b"\x16\x03\x01\x02\x00\x01", HttpGuess::NotHttp),
            (b"SSH-2.0-OpenSSH_9.2\r\n", HttpGuess::NotHttp),
            (b"\x00\x00\x00\x01", HttpGuess::NotHttp),
        ];
        for (input, want) in cases {
            assert_eq!(
                guess_http(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// A real ClientHello, as rustls' client writes it.
    fn client_hello(sni: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("conn");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn sni_is_read_from_a_client_hello() {
        let hello = client_hello("aliyun.com");
        assert_eq!(
            parse_client_hello(&hello),
            Some(Hello::Tls {
                sni: Some("aliyun.com".into())
            })
        );
        // An IP-literal server name sends no SNI.
        let hello = client_hello("203.0.113.10");
        assert_eq!(parse_client_hello(&hello), Some(Hello::Tls { sni: None }));
        // A truncated hello needs more bytes; plain text is not TLS.
        assert_eq!(parse_client_hello(&client_hello("a.example")[..20]), None);
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n\r\n"),
            Some(Hello::NotTls)
        );
    }

    #[tokio::test]
    async fn peeked_bytes_are_returned_for_replay() {
        let hello = client_hello("httpbin.org");
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, &hello)
            .await
            .expect("write");
        let (got, prefix) = peek_client_hello(&mut server, Duration::from_secs(5))
            .await
            .expect("peek");
        assert_eq!(
            got,
            Hello::Tls {
                sni: Some("httpbin.org".into())
            }
        );
        assert_eq!(&prefix[..], &hello[..]);
    }

    #[tokio::test]
    async fn sniffed_prefix_is_replayed() {
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let Sniffed::Http(mut io) = sniff_http(server, Duration::from_secs(5))
            .await
            .expect("sniff")
        else {
            panic!("not http");
        };
        let mut first = [0u8; 6];
        io.read_exact(&mut first).await.expect("read");
        assert_eq!(&first, b"GET /x");
    }
}
