//! Helpers shared by the outbound and inbound paths: resets, byte counting, plain TCP splicing.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Closes `stream` with a TCP reset (SO_LINGER 0) so the client fails at once instead of
/// reading a clean EOF it could mistake for an empty answer.
pub(crate) fn reset(stream: TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        tracing::debug!(%error, "setting SO_LINGER 0 failed; closing normally");
    }
    drop(stream);
}

/// Bytes moved by a splice, readable even after the splice failed half-way. Kept beside the
/// connection's other state and lent to the [`Counted`] streams: no allocation per connection.
#[derive(Debug, Default)]
pub(crate) struct ByteCounts {
    /// Client → destination.
    sent: AtomicU64,
    /// Destination → client.
    received: AtomicU64,
}

impl ByteCounts {
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A stream that counts the bytes read from it and written to it, into counters that outlive
/// it (so a splice that fails or is cancelled half-way still reports what it moved).
pub(crate) struct Counted<'a, S> {
    inner: S,
    reads: &'a AtomicU64,
    writes: &'a AtomicU64,
}

impl<'a, S> Counted<'a, S> {
    /// The client's stream: what is read from it is sent, what is written to it received.
    pub(crate) fn client(inner: S, counts: &'a ByteCounts) -> Self {
        Counted {
            inner,
            reads: &counts.sent,
            writes: &counts.received,
        }
    }

    /// The destination's stream (inbound: the application): the other way round.
    pub(crate) fn destination(inner: S, counts: &'a ByteCounts) -> Self {
        Counted {
            inner,
            reads: &counts.received,
            writes: &counts.sent,
        }
    }

    pub(crate) fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        self.reads.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.writes.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Splices two TCP connections both ways with half-close (tokio's copy: EOF on one side shuts
/// down the other's write half). `counts` follows the traffic as it goes: `sent` is what the
/// client sent, `received` what it got back.
pub(crate) async fn splice_tcp(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    counts: &ByteCounts,
) -> io::Result<()> {
    let mut client = Counted::client(client, counts);
    tokio::io::copy_bidirectional(&mut client, upstream)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    #[tokio::test]
    async fn splice_counts_and_half_closes() {
        let (mut client, mut client_side) = pair().await;
        let (mut upstream_side, mut upstream) = pair().await;
        let task = tokio::spawn(async move {
            let counts = ByteCounts::default();
            let spliced = splice_tcp(&mut client_side, &mut upstream_side, &counts).await;
            (spliced, counts)
        });
        client.write_all(b"hello").await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        upstream
            .read_to_end(&mut got)
            .await
            .expect("upstream sees EOF after the bytes");
        assert_eq!(got, b"hello");
        // The other direction still works after the client's half-close.
        upstream.write_all(b"world!").await.expect("write back");
        upstream.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"world!");
        let (spliced, counts) = task.await.expect("join");
        spliced.expect("splice ok");
        assert_eq!((counts.sent(), counts.received()), (5, 6));
    }

    #[tokio::test]
    async fn reset_is_seen_as_reset() {
        let (mut client, server) = pair().await;
        reset(server);
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).await.expect_err("reset, not EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
