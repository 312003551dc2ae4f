//! Body types of the pipeline: byte counting, buffering small request bodies so they can be
//! replayed (retries, mirrors), and a completion hook for the access log.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type flowing through the proxy in both directions.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Counts the DATA bytes that pass through into a shared counter.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
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

/// A request body read completely into memory: it can be sent any number of times.
#[derive(Debug, Clone, Default)]
pub struct Buffered {
    pub data: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Buffered {
    /// A fresh body replaying the buffered bytes (and trailers).
    pub fn body(&self) -> ProxyBody {
        Replay {
            data: (!self.data.is_empty()).then(|| self.data.clone()),
            trailers: self.trailers.clone(),
        }
        .boxed_unsync()
    }
}

struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// A request body, either replayable or (too large) streamed once.
pub enum RequestBody {
    Buffered(Buffered),
    Streaming(ProxyBody),
}

impl RequestBody {
    pub fn is_replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered(_))
    }
}

/// Reads `body` into memory if it ends within `limit` bytes; otherwise returns a body that
/// yields what was read and then the rest, unbuffered.
pub async fn buffer<B>(mut body: B, limit: usize) -> Result<RequestBody, BoxError>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
{
    if body.is_end_stream() {
        return Ok(RequestBody::Buffered(Buffered::default()));
    }
    if body.size_hint().lower() > limit as u64 {
        return Ok(RequestBody::Streaming(body.boxed_unsync()));
    }
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if data.len() > limit {
                    let head =
                        http_body_util::Full::new(data.freeze()).map_err(|never| match never {});
                    return Ok(RequestBody::Streaming(
                        Chain {
                            head: Some(head),
                            tail: body,
                        }
                        .boxed_unsync(),
                    ));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok(RequestBody::Buffered(Buffered {
        data: data.freeze(),
        trailers,
    }))
}

/// `head` then `tail`.
struct Chain<H, T> {
    head: Option<H>,
    tail: T,
}

impl<H, T> Body for Chain<H, T>
where
    H: Body<Data = Bytes, Error = BoxError> + Unpin,
    T: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.as_mut() {
            match Pin::new(head).poll_frame(cx) {
                Poll::Ready(None) => this.head = None,
                other => return other,
            }
        }
        Pin::new(&mut this.tail).poll_frame(cx)
    }
}

/// A mirror copy of a streamed body could not be completed.
#[derive(Debug, thiserror::Error)]
#[error("mirror copy abandoned: the original body failed or the copy fell behind")]
pub struct CopyAbandoned;

/// Splits a body too large to buffer: the returned body yields `body`'s frames, and each of the
/// `n` copies receives them as they pass (Envoy mirrors large bodies this way). Copies never slow
/// the original: one that falls more than `max_lag` bytes behind is abandoned, and a copy that
/// did not see the original's end fails (so a truncated copy is never sent as complete).
pub fn tee(body: ProxyBody, n: usize, max_lag: usize) -> (ProxyBody, Vec<ProxyBody>) {
    let (senders, copies) = (0..n)
        .map(|_| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let state = Arc::new(CopyState::default());
            let copy = TeeCopy {
                rx,
                state: state.clone(),
            };
            ((tx, state), copy.boxed_unsync())
        })
        .unzip();
    let tee = Tee {
        inner: body,
        copies: senders,
        max_lag,
    };
    (tee.boxed_unsync(), copies)
}

/// A frame as the copies get it (`Frame` is not `Clone`).
enum Piece {
    Data(Bytes),
    Trailers(HeaderMap),
}

/// Shared by the tee and one copy.
#[derive(Default)]
struct CopyState {
    /// The original ended and this copy got every frame.
    complete: AtomicBool,
    /// Bytes sent to the copy and not yet taken by it.
    lag: AtomicUsize,
}

struct Tee {
    inner: ProxyBody,
    /// The copies still being fed.
    copies: Vec<(tokio::sync::mpsc::UnboundedSender<Piece>, Arc<CopyState>)>,
    max_lag: usize,
}

impl Tee {
    fn end(&mut self) {
        for (_, state) in self.copies.drain(..) {
            state.complete.store(true, Ordering::Release);
        }
    }

    fn feed(&mut self, frame: &Frame<Bytes>) {
        let max_lag = self.max_lag;
        if let Some(d) = frame.data_ref() {
            self.copies.retain(|(tx, state)| {
                if state.lag.load(Ordering::Acquire) + d.len() > max_lag {
                    return false;
                }
                state.lag.fetch_add(d.len(), Ordering::AcqRel);
                // Bytes clones share the buffer: a copy costs no memcpy.
                tx.send(Piece::Data(d.clone())).is_ok()
            });
        } else if let Some(t) = frame.trailers_ref() {
            self.copies
                .retain(|(tx, _)| tx.send(Piece::Trailers(t.clone())).is_ok());
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.feed(frame);
                if this.inner.is_end_stream() {
                    this.end();
                }
            }
            Poll::Ready(None) => this.end(),
            // The copies see their senders go without `complete`: they fail.
            Poll::Ready(Some(Err(_))) => this.copies.clear(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct TeeCopy {
    rx: tokio::sync::mpsc::UnboundedReceiver<Piece>,
    state: Arc<CopyState>,
}

impl Body for TeeCopy {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Piece::Data(d))) => {
                this.state.lag.fetch_sub(d.len(), Ordering::AcqRel);
                Poll::Ready(Some(Ok(Frame::data(d))))
            }
            Poll::Ready(Some(Piece::Trailers(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Poll::Ready(None) if this.state.complete.load(Ordering::Acquire) => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(Box::new(CopyAbandoned)))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The upstream response outlived the route timeout (or the last try's per-try timeout).
#[derive(Debug, thiserror::Error)]
#[error("upstream response timeout")]
pub struct ResponseTimeout;

/// Ends a response body with [`ResponseTimeout`] when `deadline` passes before its end: Envoy's
/// route timeout covers the whole response, not only its headers. Once headers went out the
/// only way to tell the client is to break the stream (HTTP/2 reset, HTTP/1.1 close), which is
/// what an error frame makes hyper do. `fired` records it for the access log (`UT`).
pub struct Deadline<B> {
    inner: B,
    sleep: Pin<Box<tokio::time::Sleep>>,
    fired: Arc<AtomicBool>,
}

impl<B> Deadline<B> {
    pub fn new(inner: B, deadline: tokio::time::Instant, fired: Arc<AtomicBool>) -> Self {
        Deadline {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            fired,
        }
    }
}

impl<B> Body for Deadline<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.fired.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        // The timer first: a body trickling past the deadline must end too.
        if this.sleep.as_mut().poll(cx).is_ready() {
            this.fired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(ResponseTimeout))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(None) => Poll::Ready(None),
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

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Read to the end.
    Complete,
    /// The upstream body failed.
    Error,
    /// Dropped before the end (the downstream went away).
    Dropped,
}

/// Calls `on_end(bytes, how)` exactly once, when the body ends or is dropped.
pub struct OnEnd<B, F: FnOnce(u64, BodyEnd)> {
    inner: B,
    bytes: u64,
    on_end: Option<F>,
}

impl<B: Body, F: FnOnce(u64, BodyEnd)> OnEnd<B, F> {
    pub fn new(inner: B, on_end: F) -> Self {
        let mut this = OnEnd {
            inner,
            bytes: 0,
            on_end: Some(on_end),
        };
        if this.inner.is_end_stream() {
            this.finish(BodyEnd::Complete);
        }
        this
    }

    fn finish(&mut self, how: BodyEnd) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes, how);
        }
    }
}

impl<B, F> Body for OnEnd<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: FnOnce(u64, BodyEnd) + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(BodyEnd::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(BodyEnd::Error);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish(BodyEnd::Complete);
                Poll::Ready(None)
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

impl<B, F: FnOnce(u64, BodyEnd)> Drop for OnEnd<B, F> {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes, BodyEnd::Dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn stream(chunks: &[&'static [u8]]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn small_bodies_are_buffered_and_replayable() {
        let RequestBody::Buffered(b) = buffer(stream(&[b"ab", b"cd"]), 8).await.expect("buffer")
        else {
            panic!("not buffered");
        };
        for _ in 0..2 {
            let got = b.body().collect().await.expect("collect").to_bytes();
            assert_eq!(&got[..], b"abcd");
        }
        assert!(matches!(
            buffer(empty(), 0).await.expect("empty"),
            RequestBody::Buffered(_)
        ));
    }

    #[tokio::test]
    async fn large_bodies_stream_without_losing_bytes() {
        let body = buffer(stream(&[b"0123", b"4567", b"89"]), 5)
            .await
            .expect("buffer");
        let RequestBody::Streaming(s) = body else {
            panic!("buffered")
        };
        let got = s.collect().await.expect("collect").to_bytes();
        assert_eq!(&got[..], b"0123456789");
        // A declared length over the limit streams without reading anything.
        assert!(matches!(
            buffer(full(vec![0u8; 10]), 5).await.expect("buffer"),
            RequestBody::Streaming(_)
        ));
    }

    #[tokio::test]
    async fn on_end_reports_once_with_the_byte_count() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let body = OnEnd::new(stream(&[b"abc", b"de"]), move |n, how| {
            s.lock().expect("lock").push((n, how))
        });
        let _ = body.collect().await.expect("collect");
        assert_eq!(*seen.lock().expect("lock"), vec![(5, BodyEnd::Complete)]);

        let s = seen.clone();
        let body = OnEnd::new(stream(&[b"abc"]), move |n, how| {
            s.lock().expect("lock").push((n, how))
        });
        drop(body);
        assert_eq!(seen.lock().expect("lock")[1], (0, BodyEnd::Dropped));
    }

    #[tokio::test]
    async fn deadline_ends_a_stalled_body() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, BoxError>>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"head"))))
            .expect("send");
        let fired = Arc::new(AtomicBool::new(false));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(100);
        let mut body = Deadline::new(http_body_util::StreamBody::new(rx), deadline, fired.clone());
        let first = body.frame().await.expect("frame").expect("data");
        assert_eq!(
            first.into_data().expect("data"),
            Bytes::from_static(b"head")
        );
        // Nothing more arrives: the deadline ends the body with an error.
        let err = body.frame().await.expect("frame").expect_err("timeout");
        assert!(err.is::<ResponseTimeout>(), "{err}");
        assert!(fired.load(Ordering::Relaxed));
        assert!(body.frame().await.is_none());
        drop(tx);

        // A body that ends in time is untouched.
        let fired = Arc::new(AtomicBool::new(false));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        let got = Deadline::new(stream(&[b"ab", b"c"]), deadline, fired.clone())
            .collect()
            .await
            .expect("collect")
            .to_bytes();
        assert_eq!(&got[..], b"abc");
        assert!(!fired.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn tee_copies_a_streamed_body() {
        let (main, copies) = tee(stream(&[b"ab", b"cd", b"e"]), 2, 1024);
        let got = main.collect().await.expect("main").to_bytes();
        assert_eq!(&got[..], b"abcde");
        for copy in copies {
            let got = copy.collect().await.expect("copy").to_bytes();
            assert_eq!(&got[..], b"abcde");
        }

        // A copy that falls more than `max_lag` bytes behind fails instead of ending short.
        let chunks: Vec<&'static [u8]> = vec![b"x"; 10];
        let (main, mut copies) = tee(stream(&chunks), 1, 8);
        let got = main.collect().await.expect("main").to_bytes();
        assert_eq!(got.len(), 10, "the original is never held back");
        let err = copies
            .remove(0)
            .collect()
            .await
            .expect_err("abandoned copy");
        assert!(err.is::<CopyAbandoned>(), "{err}");

        // The original failing half-way fails the copy too.
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("broken".into()),
        ];
        let broken = http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
        let (main, mut copies) = tee(broken, 1, 1024);
        assert!(main.collect().await.is_err());
        assert!(copies.remove(0).collect().await.is_err());
    }

    #[tokio::test]
    async fn counted_counts_data() {
        let n = Arc::new(AtomicU64::new(0));
        let _ = Counted::new(stream(&[b"abc", b"de"]), n.clone())
            .collect()
            .await
            .expect("collect");
        assert_eq!(n.load(Ordering::Relaxed), 5);
    }
}
