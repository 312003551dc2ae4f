//! Helpers shared by the outbound and inbound paths: resets, byte counting, plain TCP splicing.

use std::future::Future;
use std::io;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Span;

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

/// A stream that counts the bytes read from it and written to it, in itself: for the tunnel
/// splices, which borrow it, so the counts are still there when a copy fails or is cancelled
/// half-way. No counters beside it and no references to them: 24 bytes less than [`Counted`]
/// in every idle connection's task.
pub(crate) struct Tallied<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S> Tallied<S> {
    pub(crate) fn new(inner: S) -> Self {
        Tallied {
            inner,
            read: 0,
            written: 0,
        }
    }

    /// Bytes read from the stream so far.
    pub(crate) fn read(&self) -> u64 {
        self.read
    }

    /// Bytes written to the stream so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    pub(crate) fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tallied<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += buf.filled().len().saturating_sub(before) as u64;
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tallied<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written += *n as u64;
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

/// A future polled (and dropped) inside its span, as with [`tracing::Instrument`], but holding
/// the span boxed and only when it is enabled: 8 bytes where `Instrumented` takes 40, in every
/// connection's task, and a span is disabled unless the log level shows it.
pub(crate) struct InSpan<F> {
    inner: ManuallyDrop<F>,
    span: Option<Box<Span>>,
}

impl<F> InSpan<F> {
    pub(crate) fn new(inner: F, span: Span) -> Self {
        InSpan {
            inner: ManuallyDrop::new(inner),
            span: (!span.is_disabled()).then(|| Box::new(span)),
        }
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `inner` is structurally pinned: it is never moved (only dropped in place, in
        // `drop`), and `InSpan` is `Unpin` only when `F` is.
        let this = unsafe { self.get_unchecked_mut() };
        let _entered = this.span.as_deref().map(Span::enter);
        // SAFETY: see above; `this` came from a pinned reference.
        unsafe { Pin::new_unchecked(&mut *this.inner) }.poll(cx)
    }
}

impl<F> Drop for InSpan<F> {
    fn drop(&mut self) {
        // Like `Instrumented`: what the future does while dropped is logged in its span.
        let _entered = self.span.as_deref().map(Span::enter);
        // SAFETY: dropped in place, once; `inner` is not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.inner) }
    }
}

/// Runs `future` until `token` is cancelled: `None` if the token won. A plain future in place
/// of `tokio::select!`, whose tuple, flags and closure took 32 more bytes in every idle
/// connection's task. When both are ready, the future's result wins.
pub(crate) fn until_cancelled<F: Future>(
    future: F,
    token: &CancellationToken,
) -> UntilCancelled<'_, F> {
    UntilCancelled {
        future,
        cancelled: token.cancelled(),
    }
}

pin_project_lite::pin_project! {
    pub(crate) struct UntilCancelled<'a, F> {
        #[pin]
        future: F,
        #[pin]
        cancelled: WaitForCancellationFuture<'a>,
    }
}

impl<F: Future> Future for UntilCancelled<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        match this.cancelled.poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
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
    async fn tallied_counts_both_ways() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut ours = Tallied::new(ours);
        peer.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        ours.read_exact(&mut buf).await.expect("read");
        ours.write_all(b"abc").await.expect("write back");
        assert_eq!((ours.read(), ours.written()), (5, 3));
        let mut back = [0u8; 3];
        peer.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"abc");
    }

    #[tokio::test]
    async fn until_cancelled_prefers_the_result_and_stops_on_cancel() {
        let token = CancellationToken::new();
        assert_eq!(until_cancelled(async { 7 }, &token).await, Some(7));
        let pending = until_cancelled(std::future::pending::<()>(), &token);
        token.cancel();
        assert_eq!(pending.await, None);
        // Both ready: the future's result wins.
        assert_eq!(until_cancelled(async { 8 }, &token).await, Some(8));
    }

    #[tokio::test]
    async fn in_span_holds_no_disabled_span() {
        // No subscriber here: the span is disabled, and nothing is kept for it.
        let wrapped = InSpan::new(async { 9 }, tracing::info_span!("test"));
        assert!(wrapped.span.is_none());
        assert_eq!(wrapped.await, 9);
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
