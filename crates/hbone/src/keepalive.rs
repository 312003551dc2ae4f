//! HTTP/2 PING keepalive, shared by client and server connections.

use std::time::Duration;

/// Why a keepalive gave up on a connection.
#[derive(Debug)]
pub(crate) enum KeepaliveFailure {
    Timeout(Duration),
    Error(h2::Error),
}

impl std::fmt::Display for KeepaliveFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepaliveFailure::Timeout(t) => write!(f, "no PING ack within {t:?}"),
            KeepaliveFailure::Error(e) => write!(f, "PING failed: {e}"),
        }
    }
}

/// Pings every `interval` and returns once a PING is not acknowledged within `timeout`: the
/// caller then drops the connection. Never returns when keepalive is off. The connection must
/// be polled concurrently (it sends the PING and reads the ack).
pub(crate) async fn keepalive(
    ping_pong: Option<h2::PingPong>,
    interval: Option<Duration>,
    timeout: Duration,
) -> KeepaliveFailure {
    let (Some(mut ping_pong), Some(interval)) = (ping_pong, interval) else {
        return std::future::pending().await;
    };
    loop {
        // Sleep first: a fresh connection has just proven itself alive.
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return KeepaliveFailure::Error(e),
            Err(_) => return KeepaliveFailure::Timeout(timeout),
        }
    }
}
