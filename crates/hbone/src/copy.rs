//! Bidirectional copy between a [`Tunnel`] and another byte stream (the application's TCP
//! connection, or an upstream connection), with half-close and byte counts.
//!
//! Memory follows traffic the way Istio's ztunnel does: the buffer reading the plain stream
//! is 1 KiB, 16 KiB after 128 KiB have gone through and 256 KiB after 10 MiB, so bulk
//! transfers get large reads. An idle direction holds no buffer at all: a read first goes into
//! a small stack buffer, and a heap buffer is only taken once data has arrived, and given back
//! as soon as the stream has nothing more to read. The tunnel side needs no buffer of ours:
//! DATA frames are handed over as received, and what we read from the plain stream is sent as
//! frames without another copy.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::tunnel::{Tunnel, TunnelReader, TunnelWriter};

/// Buffer sizes and the traffic after which each applies (ztunnel's numbers). The larger sizes
/// leave room for an HTTP/2 frame header inside TLS records of 16 KiB.
const INITIAL_BUFFER: usize = 1024;
const LARGE_BUFFER: usize = 16 * 1024 - 64;
const JUMBO_BUFFER: usize = 16 * 16 * 1024 - 64;
const LARGE_AFTER: u64 = 128 * 1024;
const JUMBO_AFTER: u64 = 10 * 1024 * 1024;
/// The stack buffer a read starts with when no heap buffer is held.
const PROBE: usize = INITIAL_BUFFER;

/// The read-buffer size for a direction that has moved `copied` bytes.
pub(crate) fn buffer_size(copied: u64) -> usize {
    if copied >= JUMBO_AFTER {
        JUMBO_BUFFER
    } else if copied >= LARGE_AFTER {
        LARGE_BUFFER
    } else {
        INITIAL_BUFFER
    }
}

/// Which operation of a copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStep {
    ReadTunnel,
    WriteTunnel,
    ReadStream,
    WriteStream,
}

/// A copy that ended with an I/O error, with what had been copied until then.
#[derive(Debug, thiserror::Error)]
#[error(
    "{step:?} after {tunnel_to_stream} bytes tunnel->stream, {stream_to_tunnel} bytes stream->tunnel: {source}"
)]
pub struct CopyError {
    pub step: CopyStep,
    pub tunnel_to_stream: u64,
    pub stream_to_tunnel: u64,
    #[source]
    pub source: io::Error,
}

/// Copies both ways until both directions have ended, propagating half-closes: EOF from the
/// tunnel (the peer's END_STREAM) shuts down `stream`'s write side, and EOF from `stream`
/// sends END_STREAM on the tunnel, while the other direction goes on.
///
/// Returns `(bytes tunnel -> stream, bytes stream -> tunnel)`. The first I/O error ends both
/// directions; dropping the tunnel afterwards resets the HTTP/2 stream.
pub fn copy_bidirectional<'a, S>(
    tunnel: &'a mut Tunnel,
    stream: &'a mut S,
) -> impl Future<Output = Result<(u64, u64), CopyError>> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    CopyBidirectional {
        tunnel,
        stream,
        down: TunnelToStream::default(),
        up: StreamToTunnel::default(),
    }
}

/// The future of [`copy_bidirectional`]. A plain struct rather than an `async fn`: that one
/// kept its arguments, the tunnel's halves and a closure's references next to the state
/// (192 bytes instead of 144), and an idle tunnel holds this future for its whole life.
struct CopyBidirectional<'a, S: ?Sized> {
    tunnel: &'a mut Tunnel,
    stream: &'a mut S,
    down: TunnelToStream,
    up: StreamToTunnel,
}

impl<S> Future for CopyBidirectional<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = Result<(u64, u64), CopyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let CopyBidirectional {
            tunnel,
            stream,
            down,
            up,
        } = self.get_mut();
        let (reader, writer) = tunnel.parts_mut();
        let down_done = match down.poll(cx, reader, *stream) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err((step, e))) => return Poll::Ready(Err(error(step, e, down, up))),
            Poll::Pending => false,
        };
        let up_done = match up.poll(cx, *stream, writer) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err((step, e))) => return Poll::Ready(Err(error(step, e, down, up))),
            Poll::Pending => false,
        };
        if down_done && up_done {
            Poll::Ready(Ok((down.copied, up.copied)))
        } else {
            Poll::Pending
        }
    }
}

fn error(
    step: CopyStep,
    source: io::Error,
    down: &TunnelToStream,
    up: &StreamToTunnel,
) -> CopyError {
    CopyError {
        step,
        tunnel_to_stream: down.copied,
        stream_to_tunnel: up.copied,
        source,
    }
}

type StepResult = Poll<Result<(), (CopyStep, io::Error)>>;

/// Tunnel DATA frames written to the stream as they come.
#[derive(Default)]
struct TunnelToStream {
    pending: Bytes,
    eof: bool,
    done: bool,
    need_flush: bool,
    copied: u64,
}

impl TunnelToStream {
    fn poll<S>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut TunnelReader,
        stream: &mut S,
    ) -> StepResult
    where
        S: AsyncWrite + Unpin + ?Sized,
    {
        use CopyStep::*;
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pending.is_empty() && !self.eof {
                match reader.poll_chunk(cx) {
                    Poll::Ready(Ok(Some(chunk))) => self.pending = chunk,
                    Poll::Ready(Ok(None)) => self.eof = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((ReadTunnel, e))),
                    Poll::Pending => {
                        // Nothing more to read for now: push out what the writer buffered
                        // (a TLS stream holds records until flushed).
                        if self.need_flush {
                            ready!(Pin::new(&mut *stream).poll_flush(cx))
                                .map_err(|e| (WriteStream, e))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            if !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *stream).poll_write(cx, &self.pending))
                    .map_err(|e| (WriteStream, e))?;
                if n == 0 {
                    return Poll::Ready(Err((WriteStream, io::ErrorKind::WriteZero.into())));
                }
                self.pending.advance(n);
                if self.pending.is_empty() {
                    // Release the frame now: an empty `Bytes` still pins h2's read buffer.
                    self.pending = Bytes::new();
                }
                self.copied += n as u64;
                self.need_flush = true;
                continue;
            }
            // EOF and everything written: half-close the stream.
            ready!(Pin::new(&mut *stream).poll_shutdown(cx)).map_err(|e| (WriteStream, e))?;
            self.done = true;
            return Poll::Ready(Ok(()));
        }
    }
}

/// Stream bytes read into a growing buffer and sent on the tunnel without another copy.
/// `buf` is empty with no capacity while the stream is idle.
struct StreamToTunnel {
    buf: BytesMut,
    pending: Bytes,
    eof: bool,
    done: bool,
    copied: u64,
}

impl Default for StreamToTunnel {
    fn default() -> Self {
        StreamToTunnel {
            // Allocated on the first read, so a connection that never sends holds nothing.
            buf: BytesMut::new(),
            pending: Bytes::new(),
            eof: false,
            done: false,
            copied: 0,
        }
    }
}

impl StreamToTunnel {
    fn poll<S>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
        writer: &mut TunnelWriter,
    ) -> StepResult
    where
        S: AsyncRead + Unpin + ?Sized,
    {
        use CopyStep::*;
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pending.is_empty() && !self.eof {
                ready!(self.poll_fill(cx, stream)).map_err(|e| (ReadStream, e))?;
            }
            if !self.pending.is_empty() {
                let n = ready!(writer.poll_send(cx, &mut self.pending))
                    .map_err(|e| (WriteTunnel, e))?;
                if self.pending.is_empty() {
                    // Drop our reference so `buf` can reuse its allocation once h2 is done.
                    self.pending = Bytes::new();
                }
                self.copied += n as u64;
                continue;
            }
            ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(|e| (WriteTunnel, e))?;
            self.done = true;
            return Poll::Ready(Ok(()));
        }
    }

    /// Reads what the stream has into `pending` (or sets `eof`).
    fn poll_fill<S>(&mut self, cx: &mut Context<'_>, stream: &mut S) -> Poll<io::Result<()>>
    where
        S: AsyncRead + Unpin + ?Sized,
    {
        if self.buf.capacity() > 0 {
            // The rest of a buffer taken earlier: read straight into it.
            match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => self.pending = self.buf.split().freeze(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle: give the buffer back (h2 frees what it still holds once written).
                    self.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
            return Poll::Ready(Ok(()));
        }
        let mut probe = [0u8; PROBE];
        let mut probe = ReadBuf::new(&mut probe);
        ready!(Pin::new(&mut *stream).poll_read(cx, &mut probe))?;
        let got = probe.filled();
        let size = buffer_size(self.copied);
        if got.is_empty() {
            self.eof = true;
        } else if got.len() < PROBE || size <= PROBE {
            // All there was (or all this stage reads at once): a frame of exactly this size.
            self.pending = Bytes::copy_from_slice(got);
        } else {
            // A full probe in a bulk transfer: more is likely waiting, read it in one go.
            self.buf.reserve(size);
            self.buf.extend_from_slice(got);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) | Poll::Pending => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
            self.pending = self.buf.split().freeze();
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_grow_with_traffic() {
        assert_eq!(buffer_size(0), 1024);
        assert_eq!(buffer_size(LARGE_AFTER - 1), 1024);
        assert_eq!(buffer_size(LARGE_AFTER), LARGE_BUFFER);
        assert_eq!(buffer_size(JUMBO_AFTER - 1), LARGE_BUFFER);
        assert_eq!(buffer_size(JUMBO_AFTER), JUMBO_BUFFER);
    }

    fn fill(up: &mut StreamToTunnel, stream: &mut tokio::io::DuplexStream) -> Poll<io::Result<()>> {
        let waker = futures::task::noop_waker();
        up.poll_fill(&mut Context::from_waker(&waker), stream)
    }

    #[tokio::test]
    async fn idle_direction_holds_no_buffer() {
        use tokio::io::AsyncWriteExt;
        let (mut app, mut ours) = tokio::io::duplex(1 << 20);
        let mut up = StreamToTunnel::default();
        assert!(fill(&mut up, &mut ours).is_pending());
        assert_eq!(up.buf.capacity(), 0);

        app.write_all(b"hello").await.expect("write");
        assert!(matches!(fill(&mut up, &mut ours), Poll::Ready(Ok(()))));
        assert_eq!(&up.pending[..], b"hello");
        assert_eq!(up.buf.capacity(), 0, "small reads are sent as they came");

        // A bulk transfer reads large chunks, then gives the buffer back once drained.
        up.pending = Bytes::new();
        up.copied = JUMBO_AFTER;
        let bulk = vec![7u8; 200 * 1024];
        app.write_all(&bulk).await.expect("write");
        assert!(matches!(fill(&mut up, &mut ours), Poll::Ready(Ok(()))));
        assert_eq!(up.pending.len(), bulk.len(), "probe and rest in one frame");
        assert!(fill(&mut up, &mut ours).is_pending());
        assert_eq!(up.buf.capacity(), 0, "drained: buffer released");

        drop(app);
        assert!(matches!(fill(&mut up, &mut ours), Poll::Ready(Ok(()))));
        assert!(up.eof);
    }
}
