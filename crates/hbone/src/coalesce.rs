//! Gathers h2's small writes so that the frames one poll of a connection produces leave in one
//! TLS write.
//!
//! h2 queues at most one DATA frame larger than 256 bytes and writes it out (and flushes)
//! before it encodes the next one (hyperium/h2#902). A waypoint answering 64 requests that
//! became ready together therefore made 64 TLS records and 64 `writev`s on the HBONE
//! connection, and on loopback each `writev` also pays the receiver's TCP processing: about
//! a fifth of the waypoint's CPU per request went there.
//!
//! [`Coalesce`] sits between h2 and the TLS stream. Writes below [`DIRECT`] are copied into
//! a buffer (at most [`CAPACITY`]) and a flush of a small buffer is deferred. The task that
//! drives the connection runs it inside [`flushing`], which writes the buffer out at the end of
//! each poll: the frames one poll produced leave in one TLS record and one system call. Large
//! writes (bulk transfers) go straight through, after anything buffered, so they are not
//! copied twice.
//!
//! Before [`flushing`] first runs (h2's handshake), a deferred flush wakes the task instead,
//! and the bytes go out at the start of its next poll: h2 reads in every poll of an open
//! connection, and our `poll_read` writes the buffer before reading (a full socket never stops
//! the read). A buffer is also written by a `poll_write` that does not fit, by `poll_shutdown`,
//! and by any flush once it holds [`FLUSH_AT`] bytes.
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes at least this large bypass the buffer: a TLS record's worth, h2's bulk DATA frames.
pub(crate) const DIRECT: usize = 16 * 1024;
/// The buffer never grows past this: a write that does not fit first drains it.
pub(crate) const CAPACITY: usize = 64 * 1024;
/// A flush with this much buffered is not deferred: batching more saves little.
pub(crate) const FLUSH_AT: usize = 32 * 1024;
/// What a burst's first buffered write reserves.
const FIRST_ALLOCATION: usize = 4 * 1024;

/// An I/O adapter gathering small writes; see the module docs.
#[derive(Debug)]
pub struct Coalesce<IO> {
    io: IO,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to `io`.
    written: usize,
    /// A flush was deferred: the task was woken to write the buffer on its next poll.
    deferred: bool,
    /// [`flushing`] drives the connection: deferred flushes need no wake-up.
    managed: bool,
    /// A write error met by [`flushing`], reported by the next operation.
    error: Option<io::Error>,
}

impl<IO> Coalesce<IO> {
    pub fn new(io: IO) -> Self {
        Coalesce {
            io,
            buf: Vec::new(),
            written: 0,
            deferred: false,
            managed: false,
            error: None,
        }
    }

    fn take_error<T>(&mut self) -> Option<Poll<io::Result<T>>> {
        self.error.take().map(|e| Poll::Ready(Err(e)))
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Reserves for `len` more bytes: a burst's first write allocates room for a few small
    /// frames (then the buffer doubles as needed). Not more: every connection of a ztunnel
    /// setting up thousands of tunnels at once holds one, and the heap's peak stays in its RSS.
    fn gather(&mut self, len: usize) {
        if self.buf.capacity() == 0 {
            self.buf.reserve(len.max(FIRST_ALLOCATION));
        }
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Hands the whole buffer to `io` and flushes it.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        // A grown buffer is freed: an idle connection (ztunnel holds thousands) should not pin
        // up to CAPACITY bytes. The first allocation is kept: allocating and freeing it per
        // burst fragmented ztunnel's heap (+0.15 KiB RSS per idle tunnel at 10,000).
        if self.buf.capacity() > FIRST_ALLOCATION {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        self.written = 0;
        self.deferred = false;
        // TLS may hold records it could not send yet.
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Makes room for `len` more bytes, or reports that `len` should bypass the buffer.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if len >= DIRECT {
            ready!(self.poll_drain(cx))?;
            return Poll::Ready(Ok(false));
        }
        if self.pending() + len > CAPACITY {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(true))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.take_error() {
            return e;
        }
        if this.pending() > 0 {
            // The connection polls again: what the last poll gathered goes out first. A full
            // socket must not stop us reading (the peer may be waiting for us to read before
            // it reads); the write side's waker is registered and retries.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        // One path for both: a single slice is a vectored write of one.
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.take_error() {
            return e;
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        if !ready!(this.poll_room(cx, len))? {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        this.gather(len);
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.take_error() {
            return e;
        }
        let pending = this.pending();
        if pending == 0 {
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        if pending < FLUSH_AT {
            if !this.deferred && !this.managed {
                this.deferred = true;
                cx.waker().wake_by_ref();
            }
            return Poll::Ready(Ok(()));
        }
        this.poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Wraps `io` for h2: the I/O half, and the [`Flusher`] for [`flushing`].
pub fn coalesce<IO>(io: IO) -> (Shared<IO>, Flusher<IO>) {
    let shared = Arc::new(Mutex::new(Coalesce::new(io)));
    let flusher = Flusher(Arc::downgrade(&shared));
    (Shared(shared), flusher)
}

/// The [`Coalesce`] h2 owns; the connection's [`Flusher`] reaches the same buffer. Both are
/// used by the one task driving the connection, so the lock is never contended.
#[derive(Debug)]
pub struct Shared<IO>(Arc<Mutex<Coalesce<IO>>>);

impl<IO> Shared<IO> {
    fn lock(&self) -> MutexGuard<'_, Coalesce<IO>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Shared<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Shared<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

/// Writes out what a poll of the connection gathered; weak, so it never keeps a closed
/// connection's socket open.
#[derive(Debug)]
pub struct Flusher<IO>(Weak<Mutex<Coalesce<IO>>>);

impl<IO: AsyncWrite + Unpin> Flusher<IO> {
    /// Runs `f` on the adapter, unless h2 has dropped the connection.
    fn with(&self, f: impl FnOnce(&mut Coalesce<IO>)) {
        if let Some(shared) = self.0.upgrade() {
            f(&mut shared.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// From now on each poll of the connection ends with [`Flusher::after_poll`].
    fn manage(&self) {
        self.with(|c| c.managed = true);
    }

    fn after_poll(&self, cx: &mut Context<'_>) {
        self.with(|c| {
            if c.pending() > 0
                && let Poll::Ready(Err(e)) = c.poll_drain(cx)
            {
                c.error = Some(e);
            }
        });
    }
}

/// Runs `fut`, the task driving a connection, writing out what each of its polls gathered.
pub async fn flushing<F: Future, IO: AsyncWrite + Unpin>(
    fut: F,
    flusher: Flusher<IO>,
) -> F::Output {
    let mut fut = pin!(fut);
    flusher.manage();
    std::future::poll_fn(move |cx| {
        let out = fut.as_mut().poll(cx);
        flusher.after_poll(cx);
        out
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    /// Records each write reaching the socket; accepts at most `limit` bytes per call and
    /// returns Pending while `blocked`.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        limit: Option<usize>,
        blocked: bool,
        shut: bool,
        input: Vec<u8>,
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.blocked {
                return Poll::Pending;
            }
            let n = self.limit.map_or(data.len(), |l| l.min(data.len()));
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Socket {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.input.is_empty() {
                return Poll::Pending;
            }
            let input = std::mem::take(&mut self.input);
            buf.put_slice(&input);
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);
    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn context() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes::default());
        (wakes.clone(), Waker::from(wakes))
    }

    fn write(c: &mut Coalesce<Socket>, cx: &mut Context<'_>, data: &[u8]) -> Poll<usize> {
        Pin::new(c).poll_write(cx, data).map(|r| r.expect("write"))
    }

    fn flush(c: &mut Coalesce<Socket>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(c).poll_flush(cx).map(|r| r.expect("flush"))
    }

    fn read(c: &mut Coalesce<Socket>, cx: &mut Context<'_>) -> Poll<Vec<u8>> {
        let mut space = [0u8; 64];
        let mut buf = ReadBuf::new(&mut space);
        Pin::new(c)
            .poll_read(cx, &mut buf)
            .map(|r| r.map(|()| buf.filled().to_vec()).expect("read"))
    }

    #[test]
    fn small_frames_of_one_poll_leave_in_one_write_on_the_next_read() {
        let (wakes, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesce::new(Socket::default());
        for frame in [&b"one"[..], b"two", b"three"] {
            assert_eq!(write(&mut c, &mut cx, frame), Poll::Ready(frame.len()));
            // h2 flushes after each large frame: deferred, nothing written yet.
            assert_eq!(flush(&mut c, &mut cx), Poll::Ready(()));
        }
        assert!(c.io.writes.is_empty());
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "one wake-up per deferral"
        );
        // The next poll of the connection reads first: the gathered bytes go out in one write.
        assert_eq!(read(&mut c, &mut cx), Poll::Pending);
        assert_eq!(c.io.writes, vec![b"onetwothree".to_vec()]);
        assert_eq!(c.pending(), 0);
        assert!(
            c.buf.capacity() <= FIRST_ALLOCATION,
            "an idle connection holds a small buffer at most"
        );
        // Nothing is left: a flush goes straight to the socket, with no new deferral.
        assert_eq!(flush(&mut c, &mut cx), Poll::Ready(()));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn flushing_writes_at_the_end_of_the_poll_without_a_wake_up() {
        let (wakes, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let (mut io, flusher) = coalesce(Socket::default());
        let shared = io.0.clone();
        let mut polls = 0;
        // Stands for h2's connection future: two frames, each flushed, in one poll.
        let conn = std::future::poll_fn(|cx| {
            polls += 1;
            for frame in [&b"ab"[..], b"cd"] {
                assert!(Pin::new(&mut io).poll_write(cx, frame).is_ready());
                assert!(Pin::new(&mut io).poll_flush(cx).is_ready());
            }
            if polls == 1 {
                // Nothing reached the socket inside the poll.
                assert!(shared.lock().expect("lock").io.writes.is_empty());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        });
        let mut driven = Box::pin(flushing(conn, flusher));
        assert!(driven.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            shared.lock().expect("lock").io.writes,
            vec![b"abcd".to_vec()],
            "one write when the poll ends"
        );
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "no extra poll");
        assert!(driven.as_mut().poll(&mut cx).is_ready());
        assert_eq!(shared.lock().expect("lock").io.writes.len(), 2);
    }

    #[test]
    fn reading_is_not_held_up_by_a_full_socket() {
        let (_, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesce::new(Socket::default());
        assert_eq!(write(&mut c, &mut cx, b"reply"), Poll::Ready(5));
        c.io.blocked = true;
        c.io.input = b"request".to_vec();
        assert_eq!(read(&mut c, &mut cx), Poll::Ready(b"request".to_vec()));
        assert_eq!(c.pending(), 5, "kept for when the socket drains");
        c.io.blocked = false;
        assert_eq!(read(&mut c, &mut cx), Poll::Pending);
        assert_eq!(c.io.writes, vec![b"reply".to_vec()]);
    }

    #[test]
    fn large_writes_bypass_the_buffer_after_what_it_holds() {
        let (_, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesce::new(Socket::default());
        assert_eq!(write(&mut c, &mut cx, b"head"), Poll::Ready(4));
        let bulk = vec![7u8; DIRECT];
        assert_eq!(write(&mut c, &mut cx, &bulk), Poll::Ready(DIRECT));
        assert_eq!(c.io.writes, vec![b"head".to_vec(), bulk]);
        assert_eq!(c.pending(), 0);
        let bufs = [IoSlice::new(&[1u8; 9]), IoSlice::new(&[2u8; DIRECT])];
        let n = Pin::new(&mut c).poll_write_vectored(&mut cx, &bufs);
        assert!(
            matches!(n, Poll::Ready(Ok(9))),
            "the socket's own vectored write: {n:?}"
        );
    }

    #[test]
    fn the_buffer_is_bounded_and_big_flushes_are_not_deferred() {
        let (wakes, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesce::new(Socket::default());
        let frame = vec![1u8; DIRECT - 1];
        for _ in 0..4 {
            assert_eq!(write(&mut c, &mut cx, &frame), Poll::Ready(frame.len()));
        }
        assert!(c.io.writes.is_empty());
        // A fifth frame would pass CAPACITY: the four go out first.
        assert_eq!(write(&mut c, &mut cx, &frame), Poll::Ready(frame.len()));
        assert_eq!(c.io.writes.len(), 1);
        assert_eq!(c.io.writes[0].len(), 4 * frame.len());
        assert_eq!(write(&mut c, &mut cx, &frame), Poll::Ready(frame.len()));
        assert_eq!(write(&mut c, &mut cx, &frame), Poll::Ready(frame.len()));
        assert!(c.pending() >= FLUSH_AT);
        assert_eq!(flush(&mut c, &mut cx), Poll::Ready(()));
        assert_eq!(c.pending(), 0, "flushed at once");
        assert_eq!(c.buf.capacity(), 0, "a grown buffer is freed");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn partial_socket_writes_and_shutdown_send_everything() {
        let (_, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesce::new(Socket {
            limit: Some(3),
            ..Socket::default()
        });
        assert_eq!(write(&mut c, &mut cx, b"goaway-frame"), Poll::Ready(12));
        assert!(matches!(
            Pin::new(&mut c).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(c.io.writes.concat(), b"goaway-frame".to_vec());
        assert_eq!(c.io.writes.len(), 4);
        assert!(c.io.shut);
        assert!(c.io.flushes >= 1);
    }

    #[test]
    fn a_blocked_socket_makes_writes_wait_only_when_the_buffer_is_full() {
        let (_, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesce::new(Socket {
            blocked: true,
            ..Socket::default()
        });
        let frame = vec![1u8; DIRECT - 1];
        for _ in 0..4 {
            assert_eq!(write(&mut c, &mut cx, &frame), Poll::Ready(frame.len()));
        }
        assert_eq!(write(&mut c, &mut cx, &frame), Poll::Pending);
        assert!(Pin::new(&mut c).poll_shutdown(&mut cx).is_pending());
    }
}
