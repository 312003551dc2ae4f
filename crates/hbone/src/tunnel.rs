//! `Tunnel`: one HBONE stream (an HTTP/2 CONNECT stream after its 200) as a byte stream.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::h2_to_io;

/// Most bytes one `poll_write` copies into a DATA frame. Larger writes are split (`write_all`
/// loops): blocks above glibc's 128 KiB mmap threshold would be mmap-ed and unmapped on every
/// write, and the resulting page faults cost more than the extra frames (see README.md).
const MAX_WRITE_COPY: usize = 64 * 1024;

/// Holds a slot of a pooled client connection; the slot is given back when both halves of
/// the tunnel are gone.
pub(crate) type SlotGuard = Arc<dyn Send + Sync>;

/// A bidirectional byte stream carried by one HBONE CONNECT stream.
///
/// * Reading returns the peer's DATA frames; the peer's END_STREAM reads as EOF (a
///   `RST_STREAM(NO_ERROR)` too). Any other reset or a broken connection is an error.
/// * Writing sends DATA frames, waiting for HTTP/2 flow-control credit.
///   [`poll_shutdown`](AsyncWrite::poll_shutdown) sends END_STREAM (a half-close: reading goes
///   on). `poll_flush` is a no-op: the connection task writes frames as soon as it can.
/// * Dropping a tunnel that is not closed both ways resets the stream (`RST_STREAM(CANCEL)`).
pub struct Tunnel {
    reader: TunnelReader,
    writer: TunnelWriter,
    info: TunnelInfo,
}

/// The HBONE connection a tunnel is carried on; one per connection, shared by its tunnels.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    pub(crate) peer_identity: certs::SpiffeId,
    pub(crate) local_addr: SocketAddr,
    pub(crate) peer_addr: SocketAddr,
}

/// What is known about the peer of a tunnel. Small on purpose: every open tunnel holds one,
/// and idle tunnels are counted in the ten thousands.
#[derive(Clone, Debug)]
pub(crate) struct TunnelInfo {
    conn: Arc<ConnInfo>,
    /// `None` when there are none, the usual case (an empty map is 96 bytes inline).
    headers: Option<Box<HeaderMap>>,
}

impl TunnelInfo {
    pub(crate) fn new(conn: Arc<ConnInfo>, headers: HeaderMap) -> Self {
        TunnelInfo {
            conn,
            headers: (!headers.is_empty()).then(|| Box::new(headers)),
        }
    }
}

/// What [`Tunnel::headers`] returns for a tunnel without headers.
fn no_headers() -> &'static HeaderMap {
    static EMPTY: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
    EMPTY.get_or_init(HeaderMap::new)
}

impl Tunnel {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        info: TunnelInfo,
        slot: Option<SlotGuard>,
    ) -> Self {
        Tunnel {
            reader: TunnelReader {
                recv,
                buf: Bytes::new(),
                eof: false,
                _slot: slot.clone(),
            },
            writer: TunnelWriter {
                send,
                shutdown: false,
                _slot: slot,
            },
            info,
        }
    }

    /// The verified SPIFFE identity of the peer: the server's on the client side, the client's
    /// on the server side.
    pub fn peer_identity(&self) -> &certs::SpiffeId {
        &self.info.conn.peer_identity
    }

    /// Headers of the 200 response that opened the tunnel, on the client (it may carry
    /// `baggage`). Empty on the server: the CONNECT's headers are in
    /// [`crate::ConnectMeta::headers`] until it is answered, and are not kept for the tunnel's
    /// life.
    pub fn headers(&self) -> &HeaderMap {
        match &self.info.headers {
            Some(headers) => headers,
            None => no_headers(),
        }
    }

    /// Our end of the TCP connection carrying the tunnel.
    pub fn local_addr(&self) -> SocketAddr {
        self.info.conn.local_addr
    }

    /// The HBONE peer's end of the TCP connection carrying the tunnel.
    pub fn peer_addr(&self) -> SocketAddr {
        self.info.conn.peer_addr
    }

    /// Splits into independently usable halves, without a lock (HTTP/2 send and receive sides
    /// are separate objects).
    pub fn into_split(self) -> (TunnelReader, TunnelWriter) {
        (self.reader, self.writer)
    }

    pub(crate) fn parts_mut(&mut self) -> (&mut TunnelReader, &mut TunnelWriter) {
        (&mut self.reader, &mut self.writer)
    }
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("peer_identity", &self.info.conn.peer_identity)
            .field("local_addr", &self.info.conn.local_addr)
            .field("peer_addr", &self.info.conn.peer_addr)
            .field("stream_id", &self.writer.send.stream_id())
            .finish()
    }
}

/// The receiving half of a [`Tunnel`].
pub struct TunnelReader {
    recv: RecvStream,
    /// The rest of a DATA frame a caller's buffer could not take.
    buf: Bytes,
    eof: bool,
    _slot: Option<SlotGuard>,
}

impl TunnelReader {
    /// The next chunk of received data, `None` at EOF. Flow-control credit is given back as
    /// soon as a chunk leaves h2, so the peer can keep a full window in flight while we copy.
    pub(crate) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.buf.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.buf))));
        }
        if self.eof {
            return Poll::Ready(Ok(None));
        }
        loop {
            match ready!(self.recv.poll_data(cx)) {
                None => {
                    self.eof = true;
                    return Poll::Ready(Ok(None));
                }
                Some(Ok(chunk)) => {
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    if chunk.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Ok(Some(chunk)));
                }
                // A peer that is done both ways may reset with NO_ERROR instead of END_STREAM
                // (RFC 9113 §8.1): that is a clean end.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) && e.is_reset() => {
                    self.eof = true;
                    return Poll::Ready(Ok(None));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }
}

impl AsyncRead for TunnelReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let Some(mut chunk) = ready!(this.poll_chunk(cx))? else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(out.remaining());
        out.put_slice(&chunk[..n]);
        chunk.advance(n);
        // An empty `Bytes` would still pin h2's read buffer and force it to allocate a new one
        // for the next frame.
        if !chunk.is_empty() {
            this.buf = chunk;
        }
        Poll::Ready(Ok(()))
    }
}

/// The sending half of a [`Tunnel`].
pub struct TunnelWriter {
    send: SendStream<Bytes>,
    shutdown: bool,
    _slot: Option<SlotGuard>,
}

impl TunnelWriter {
    /// Sends a prefix of `data` (as much as flow control allows) without copying it; returns
    /// how many bytes went. `data` is advanced past them.
    pub(crate) fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_credit(cx, data.len()))?;
        let chunk = data.split_to(n);
        self.send_chunk(cx, chunk).map_ok(|()| n)
    }

    /// Waits until h2 grants up to `want` bytes of send capacity.
    fn poll_credit(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.shutdown {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        self.send.reserve_capacity(want);
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) => Poll::Ready(Ok(n.min(want))),
            // The stream can no longer send: find out why.
            Some(Err(_)) | None => self.poll_reset_error(cx),
        }
    }

    fn send_chunk(&mut self, cx: &mut Context<'_>, chunk: Bytes) -> Poll<io::Result<()>> {
        match self.send.send_data(chunk, false) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => self.poll_reset_error(cx),
        }
    }

    /// The error to report once h2 refuses to send on this stream.
    fn poll_reset_error<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let err = match self.send.poll_reset(cx) {
            Poll::Ready(Ok(Reason::NO_ERROR)) => io::Error::new(
                io::ErrorKind::BrokenPipe,
                "peer closed the stream (RST_STREAM NO_ERROR)",
            ),
            Poll::Ready(Ok(reason)) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("stream reset by peer: {reason}"),
            ),
            Poll::Ready(Err(e)) => h2_to_io(e),
            // Not reset, yet unable to send: the stream or connection is gone.
            Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "HTTP/2 stream closed"),
        };
        Poll::Ready(Err(err))
    }
}

impl AsyncWrite for TunnelWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_WRITE_COPY);
        let n = ready!(this.poll_credit(cx, want))?;
        // Only copy what flow control lets us send now.
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        this.send_chunk(cx, chunk).map_ok(|()| n)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shutdown {
            return Poll::Ready(Ok(()));
        }
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                this.shutdown = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => match this.send.poll_reset(cx) {
                // The peer finished the stream cleanly: nothing left to close.
                Poll::Ready(Ok(Reason::NO_ERROR)) => {
                    this.shutdown = true;
                    Poll::Ready(Ok(()))
                }
                _ => this.poll_reset_error(cx),
            },
        }
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}
