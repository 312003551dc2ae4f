//! A pod's network namespace, entered by one dedicated OS thread.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole life.
//! So instead of moving the proxy into the pod, we keep one thread per pod that called
//! `setns(CLONE_NEWNET)` once and never leaves; sockets are created there and then used from the
//! ordinary tokio runtime. This is how Istio's ztunnel runs in-pod without a sidecar.

use std::{
    fmt,
    fs::File,
    io::{self, Write},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, mpsc},
    thread::{self, ThreadId},
    time::Duration,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::Error;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Backlog for listeners created in a namespace: ztunnel's listeners take bursts of connections.
const LISTEN_BACKLOG: i32 = 1024;

/// How long [`NetnsHandle::command_output`] lets a command run (`iptables-restore` waits up to
/// 10 s for the xtables lock; anything much slower is stuck, not busy).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Identity of a network namespace: the (device, inode) pair of its nsfs file.
///
/// Two handles (or a handle and a socket) are in the same namespace exactly when their ids are
/// equal; paths cannot tell, since `/run/netns/x` and `/proc/<pid>/ns/net` may name the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    fn of(file: &File) -> io::Result<Self> {
        let meta = file.metadata()?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl fmt::Display for NetnsId {
    /// Same shape as `readlink /proc/self/ns/net`, which prints `net:[<inode>]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// The network namespace a socket lives in (`ioctl(SIOCGSKNS)`, Linux ≥ 4.9).
pub fn socket_netns_id(sock: &impl AsFd) -> io::Result<NetnsId> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new file descriptor (or -1); the fd we
    // pass is borrowed and valid for the duration of the call.
    let fd = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), libc::SIOCGSKNS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    let ns = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    NetnsId::of(&ns)
}

/// A handle on a network namespace, owning a thread that lives inside it.
///
/// Cheap to clone; the thread stops when the last clone is dropped (after finishing queued work).
/// Closures given to [`run`](Self::run) must not change the thread's namespaces themselves.
#[derive(Clone)]
pub struct NetnsHandle {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    id: NetnsId,
    thread: ThreadId,
    // `mpsc::Sender` is `Sync`, so no lock is needed to submit work.
    jobs: mpsc::Sender<Job>,
}

impl fmt::Debug for NetnsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetnsHandle")
            .field("path", &self.inner.path)
            .field("id", &self.inner.id)
            .finish()
    }
}

impl NetnsHandle {
    /// Opens the namespace at `path` (`/run/netns/<name>`, `/proc/<pid>/ns/net`, ...) and starts its
    /// thread. Blocks only for the `setns` call.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        let id = NetnsId::of(&file).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;

        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        // Linux truncates thread names to 15 bytes; the inode is what identifies the namespace.
        let name = format!("netns-{}", id.ino);
        let handle = thread::Builder::new()
            .name(name)
            .spawn(move || {
                let entered = setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|errno| io::Error::from_raw_os_error(errno as i32));
                let ok = entered.is_ok();
                // The opener waits for this message; if it is gone there is nobody to serve.
                if entered_tx.send(entered).is_err() || !ok {
                    return;
                }
                drop(file);
                while let Ok(job) = queue.recv() {
                    job();
                }
            })
            .map_err(|source| Error::Thread {
                path: path.clone(),
                source,
            })?;
        let thread = handle.thread().id();

        match entered_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(Error::Enter { path, source }),
            Err(_) => return Err(Error::ThreadGone { path }),
        }
        tracing::debug!(netns = %path.display(), %id, "entered network namespace");
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                id,
                thread,
                jobs,
            }),
        })
    }

    /// A handle on the namespace of the calling thread (host mode, and tests).
    pub fn current() -> Result<Self, Error> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// The path the namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The namespace's identity, comparable with [`socket_netns_id`].
    pub fn id(&self) -> NetnsId {
        self.inner.id
    }

    /// Runs `f` on the namespace's thread and returns its result.
    ///
    /// `f` should be short: every user of this namespace shares the one thread.
    pub async fn run<F, T>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        }))?;
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(Error::Panicked {
                path: self.inner.path.clone(),
            }),
            Err(_) => Err(self.gone()),
        }
    }

    /// Like [`run`](Self::run), for synchronous callers. Runs `f` directly when called from the
    /// namespace's own thread (waiting for itself would deadlock).
    pub fn run_blocking<F, T>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        if thread::current().id() == self.inner.thread {
            return catch_unwind(AssertUnwindSafe(f)).map_err(|_| Error::Panicked {
                path: self.inner.path.clone(),
            });
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        }))?;
        match rx.recv() {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(Error::Panicked {
                path: self.inner.path.clone(),
            }),
            Err(_) => Err(self.gone()),
        }
    }

    fn submit(&self, job: Job) -> Result<(), Error> {
        self.inner.jobs.send(job).map_err(|_| self.gone())
    }

    fn gone(&self) -> Error {
        Error::ThreadGone {
            path: self.inner.path.clone(),
        }
    }

    fn socket_error(&self, op: String, source: io::Error) -> Error {
        Error::Socket {
            path: self.inner.path.clone(),
            op,
            source,
        }
    }

    /// Creates a socket in the namespace. It is blocking, as `socket2` makes it; everything else
    /// is up to the caller.
    pub async fn socket(
        &self,
        domain: Domain,
        ty: Type,
        protocol: Option<Protocol>,
    ) -> Result<Socket, Error> {
        self.run(move || Socket::new(domain, ty, protocol))
            .await?
            .map_err(|e| self.socket_error(format!("socket({domain:?}, {ty:?})"), e))
    }

    /// Binds a TCP listener in the namespace (SO_REUSEADDR, so a restarted proxy can rebind at
    /// once), non-blocking and ready for [`tokio::net::TcpListener::from_std`].
    pub async fn tcp_listener_std(&self, addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
        self.run(move || -> io::Result<std::net::TcpListener> {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            sock.set_reuse_address(true)?;
            sock.bind(&SockAddr::from(addr))?;
            sock.listen(LISTEN_BACKLOG)?;
            sock.set_nonblocking(true)?;
            Ok(sock.into())
        })
        .await?
        .map_err(|e| self.socket_error(format!("listen on tcp {addr}"), e))
    }

    /// [`tcp_listener_std`](Self::tcp_listener_std), registered with the current tokio runtime.
    pub async fn tcp_listener(&self, addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
        let std = self.tcp_listener_std(addr).await?;
        tokio::net::TcpListener::from_std(std)
            .map_err(|e| self.socket_error(format!("register tcp listener {addr}"), e))
    }

    /// Binds a UDP socket in the namespace, optionally with SO_MARK (ztunnel's own DNS upstream
    /// queries carry the mark so the capture rules let them out), non-blocking and ready for
    /// [`tokio::net::UdpSocket::from_std`].
    pub async fn udp_socket_std(
        &self,
        addr: SocketAddr,
        mark: Option<u32>,
    ) -> Result<std::net::UdpSocket, Error> {
        self.run(move || -> io::Result<std::net::UdpSocket> {
            let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            if let Some(mark) = mark {
                sock.set_mark(mark)?;
            }
            sock.bind(&SockAddr::from(addr))?;
            sock.set_nonblocking(true)?;
            Ok(sock.into())
        })
        .await?
        .map_err(|e| self.socket_error(format!("bind udp {addr}"), e))
    }

    /// [`udp_socket_std`](Self::udp_socket_std), registered with the current tokio runtime.
    pub async fn udp_socket(
        &self,
        addr: SocketAddr,
        mark: Option<u32>,
    ) -> Result<tokio::net::UdpSocket, Error> {
        let std = self.udp_socket_std(addr, mark).await?;
        tokio::net::UdpSocket::from_std(std)
            .map_err(|e| self.socket_error(format!("register udp socket {addr}"), e))
    }

    /// Runs a command inside the namespace and collects its output, killing it if it has not
    /// finished within [`COMMAND_TIMEOUT`].
    ///
    /// The child is spawned from the namespace's thread, so it inherits the namespace (and only the
    /// network namespace: mounts stay the host's, which `iptables` needs for its lock file). The
    /// thread is busy only for the spawn; the wait happens on tokio's blocking pool.
    pub async fn command_output(
        &self,
        command: Command,
        stdin: Option<Vec<u8>>,
    ) -> Result<Output, Error> {
        self.command_output_timeout(command, stdin, COMMAND_TIMEOUT)
            .await
    }

    /// [`command_output`](Self::command_output) with an explicit limit. A child still running
    /// after `timeout` is killed (SIGKILL) and reaped, and the call fails with
    /// [`Error::Timeout`] naming the command.
    pub async fn command_output_timeout(
        &self,
        mut command: Command,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Output, Error> {
        let shown = show_command(&command);
        let piped = stdin.is_some();
        let spawned = self
            .run(move || {
                command
                    .stdin(if piped { Stdio::piped() } else { Stdio::null() })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
            })
            .await?;
        let spawn_error = |source| Error::Spawn {
            path: self.inner.path.clone(),
            command: shown.clone(),
            source,
        };
        let mut child = spawned.map_err(spawn_error)?;
        let pid = child.id();
        let feeder = match (stdin, child.stdin.take()) {
            // A separate thread feeds stdin so a child that writes a lot before reading all its
            // input cannot deadlock against us.
            (Some(input), Some(mut pipe)) => {
                let fed = thread::Builder::new()
                    .name("netns-stdin".to_owned())
                    .spawn(move || pipe.write_all(&input));
                match fed {
                    Ok(handle) => Some(handle),
                    Err(e) => {
                        // The pipe was moved into the closure that never ran, so it is closed
                        // already; the child sees EOF and exits. Reap it before failing.
                        kill_and_reap(&mut child);
                        return Err(spawn_error(e));
                    }
                }
            }
            _ => None,
        };
        let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
        let output = match tokio::time::timeout(timeout, waiting).await {
            Ok(joined) => joined
                .map_err(|join| spawn_error(io::Error::other(join.to_string())))?
                .map_err(spawn_error)?,
            Err(_) => {
                // `wait_with_output` owns the child on the blocking pool. Killing by pid is safe
                // here: the child is not reaped until that wait returns, so the pid cannot have
                // been reused. The wait then returns and the blocking task ends by itself.
                kill_pid(pid);
                return Err(Error::Timeout {
                    path: self.inner.path.clone(),
                    command: shown,
                    timeout,
                });
            }
        };
        if let Some(feeder) = feeder {
            // A child that exits without reading its input is reported through its exit status;
            // the resulting EPIPE here adds nothing.
            let _ = feeder.join();
        }
        Ok(output)
    }
}

/// SIGKILL to a child we own and have not reaped yet (so the pid is still ours).
fn kill_pid(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // ESRCH (already gone) is fine: it is being reaped by its waiter.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn kill_and_reap(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `program arg1 arg2`, for error messages.
pub(crate) fn show_command(command: &Command) -> String {
    let mut shown = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        shown.push(' ');
        shown.push_str(&arg.to_string_lossy());
    }
    shown
}

/// Connects to `dst` over TCP from inside `netns`, with SO_MARK set when `mark` is given
/// (ztunnel marks its own sockets with 0x539 so the capture rules let them through).
///
/// The socket is created and marked on the namespace's thread; the connect itself is an ordinary
/// non-blocking tokio connect.
pub async fn connect_in(
    netns: &NetnsHandle,
    dst: SocketAddr,
    mark: Option<u32>,
) -> Result<tokio::net::TcpStream, Error> {
    let std = netns
        .run(move || -> io::Result<std::net::TcpStream> {
            let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
            if let Some(mark) = mark {
                sock.set_mark(mark)?;
            }
            sock.set_nonblocking(true)?;
            Ok(sock.into())
        })
        .await?
        .map_err(|e| netns.socket_error(format!("create socket for {dst}"), e))?;
    tokio::net::TcpSocket::from_std_stream(std)
        .connect(dst)
        .await
        .map_err(|e| netns.socket_error(format!("connect to {dst}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        let root = nix::unistd::Uid::effective().is_root();
        if !root {
            eprintln!("SKIPPED: entering a network namespace needs root");
        }
        root
    }

    #[tokio::test]
    async fn hung_command_is_killed_and_named() {
        if !is_root() {
            return;
        }
        let ns = NetnsHandle::current().expect("current netns");
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("echo $$ > {}; exec sleep 30", pid_file.display()));
        let started = std::time::Instant::now();
        // Long enough for `sh` to write its pid even on a loaded machine; short enough to wait.
        let err = ns
            .command_output_timeout(command, None, Duration::from_secs(2))
            .await
            .expect_err("must time out");
        assert!(started.elapsed() < Duration::from_secs(10), "not bounded");
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        let shown = err.to_string();
        assert!(shown.contains("sh -c echo"), "{shown}");
        assert!(shown.contains("killed"), "{shown}");

        // The child is gone (killed and reaped), not left running. Without a pid file the shell
        // was killed before it ran its first command: nothing can be left running then.
        let Ok(pid) = std::fs::read_to_string(&pid_file) else {
            return;
        };
        let pid: i32 = pid.trim().parse().expect("pid");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
            if !alive {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} still alive"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn command_with_stdin_completes_within_the_limit() {
        if !is_root() {
            return;
        }
        let ns = NetnsHandle::current().expect("current netns");
        let out = ns
            .command_output(Command::new("cat"), Some(b"fed through stdin".to_vec()))
            .await
            .expect("cat runs");
        assert!(out.status.success());
        assert_eq!(out.stdout, b"fed through stdin");
    }
}
