//! Bidirectional copy between a [`Tunnel`] and another byte stream (the application's TCP
//! connection, or an upstream connection), with half-close and byte counts.
//!
//! Memory follows traffic the way Istio's ztunnel does: the buffer reading the plain stream
//! starts at 1 KiB, grows to 16 KiB after 128 KiB have gone through and to 256 KiB after
//! 10 MiB, so ten thousand idle connections stay small while bulk transfers get large reads.
//! The tunnel side needs no buffer of ours: DATA frames are handed over as received, and what
//! we read from the plain stream is sent as frames without another copy.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::tunnel::{Tunnel, TunnelReader, TunnelWriter};

/// Buffer sizes and the traffic after which each applies (ztunnel's numbers). The larger sizes
/// leave room for an HTTP/2 frame header inside TLS records of 16 KiB.
const INITIAL_BUFFER: usize = 1024;
const LARGE_BUFFER: usize = 16 * 1024 - 64;
const JUMBO_BUFFER: usize = 16 * 16 * 1024 - 64;
const LARGE_AFTER: u64 = 128 * 1024;
const JUMBO_AFTER: u64 = 10 * 1024 * 1024;

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
pub async fn copy_bidirectional<S>(
    tunnel: &mut Tunnel,
    stream: &mut S,
) -> Result<(u64, u64), CopyError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (reader, writer) = tunnel.parts_mut();
    let mut down = TunnelToStream::default();
    let mut up = StreamToTunnel::default();
    poll_fn(|cx| {
        let down_done = match down.poll(cx, reader, stream) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err((step, e))) => return Poll::Ready(Err(error(step, e, &down, &up))),
            Poll::Pending => false,
        };
        let up_done = match up.poll(cx, stream, writer) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err((step, e))) => return Poll::Ready(Err(error(step, e, &down, &up))),
            Poll::Pending => false,
        };
        if down_done && up_done {
            Poll::Ready(Ok((down.copied, up.copied)))
        } else {
            Poll::Pending
        }
    })
    .await
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
                // Reuses the allocation once h2 has written (and dropped) earlier chunks.
                self.buf.reserve(buffer_size(self.copied));
                let n = ready!(tokio_util::io::poll_read_buf(
                    Pin::new(&mut *stream),
                    cx,
                    &mut self.buf
                ))
                .map_err(|e| (ReadStream, e))?;
                if n == 0 {
                    self.eof = true;
                } else {
                    self.pending = self.buf.split().freeze();
                }
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
}
