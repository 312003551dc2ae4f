//! Body types of the pipeline: byte counting, buffering small request bodies so they can be
//! replayed (retries, mirrors), and a completion hook for the access log.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    async fn counted_counts_data() {
        let n = Arc::new(AtomicU64::new(0));
        let _ = Counted::new(stream(&[b"abc", b"de"]), n.clone())
            .collect()
            .await
            .expect("collect");
        assert_eq!(n.load(Ordering::Relaxed), 5);
    }
}
