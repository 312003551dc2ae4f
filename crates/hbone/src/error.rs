//! Errors of opening and serving tunnels.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

/// Why a tunnel could not be opened, or a connection not served.
///
/// Sources are held in `Arc`s so that one failed connection attempt can be reported to every
/// caller that was waiting for it (the error is `Clone`).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No rustls configuration could be built for this identity (no certificate, bad bundle...).
    #[error("TLS configuration for {identity}: {source}")]
    Certs {
        identity: String,
        #[source]
        source: Arc<certs::Error>,
    },
    /// The TCP connection to the HBONE peer failed.
    #[error("TCP connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: Arc<io::Error>,
    },
    /// The TLS handshake failed (untrusted chain, unexpected identity, no client certificate...).
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: Arc<io::Error>,
    },
    /// The peer did not negotiate ALPN `h2`: it does not speak HBONE.
    #[error("{addr} did not negotiate ALPN h2")]
    Alpn { addr: SocketAddr },
    /// The peer's certificate carries no usable SPIFFE identity.
    #[error("peer identity of {addr}: {source}")]
    PeerIdentity {
        addr: SocketAddr,
        #[source]
        source: Arc<certs::Error>,
    },
    /// TCP + TLS + HTTP/2 preface did not complete in time.
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// HTTP/2 failed: handshake, GOAWAY, reset stream, broken connection.
    #[error("HTTP/2 with {addr}: {source}")]
    H2 {
        addr: SocketAddr,
        #[source]
        source: Arc<h2::Error>,
    },
    /// The peer answered the CONNECT with a status other than 200.
    #[error("CONNECT {authority} via {addr} answered {status}")]
    Status {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
        /// The response headers (boxed: they are rarely looked at).
        headers: Box<HeaderMap>,
    },
    /// A header given for the CONNECT request is not a valid HTTP header.
    #[error("invalid CONNECT request for {authority}: {reason}")]
    InvalidRequest {
        authority: SocketAddr,
        reason: String,
    },
}

impl Error {
    /// The status of a non-200 answer to the CONNECT, if that is what this error is.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn h2(addr: SocketAddr, e: h2::Error) -> Self {
        Error::H2 {
            addr,
            source: Arc::new(e),
        }
    }
}

/// Maps an h2 stream error to the `io::Error` a byte stream reports.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return match e.into_io() {
            Some(io) => io,
            None => io::Error::other("HTTP/2 I/O error"),
        };
    }
    let kind = if e.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}
