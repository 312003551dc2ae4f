//! A network namespace owned by one test.

use std::{
    ffi::OsStr,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Once, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::process::{ChildGuard, sanitize, wait_until};

/// Every namespace this harness creates starts with this, then the creating process's pid.
const PREFIX: &str = "mt-";
const NETNS_DIR: &str = "/run/netns";
/// `ip netns exec` bind-mounts files from here over `/etc` (used for per-namespace resolv.conf).
const ETC_NETNS_DIR: &str = "/etc/netns";
/// Proxy settings from the developer's shell must not leak into lab commands.
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace named `mt-<pid>-<n>-<label>` (unique per test process, so labs of parallel
/// test binaries do not collide), with `lo` up. Dropping it kills every process inside and
/// deletes it; that also happens while a test panics.
pub struct Netns {
    name: String,
    path: PathBuf,
    handle: OnceLock<inpod::NetnsHandle>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns").field("name", &self.name).finish()
    }
}

impl Netns {
    /// Creates the namespace. `label` only makes names readable in `ip netns list`.
    pub fn new(label: &str) -> Result<Self> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);

        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut label = sanitize(label);
        label.truncate(24);
        let name = format!("{PREFIX}{}-{n}-{label}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating netns {name}"))?;
        let ns = Self {
            path: Path::new(NETNS_DIR).join(&name),
            name,
            handle: OnceLock::new(),
        };
        // From here on Drop cleans up, also if bringing lo up fails.
        ns.ip_cmd(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what `setns`/`nsenter --net=` take.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A thread inside this namespace for creating sockets (see [`inpod::NetnsHandle`]). Opened on
    /// first use and shared afterwards.
    pub fn handle(&self) -> Result<inpod::NetnsHandle> {
        if let Some(handle) = self.handle.get() {
            return Ok(handle.clone());
        }
        let handle = inpod::NetnsHandle::open(&self.path)?;
        Ok(self.handle.get_or_init(|| handle).clone())
    }

    /// `ip netns exec <name> <program>`, ready for more arguments. Proxy variables are removed.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        for var in PROXY_VARS {
            command.env_remove(var);
        }
        command
    }

    /// Runs `argv` inside the namespace and returns its output, whatever the exit status.
    pub fn exec<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<Output> {
        let (program, args) = argv.split_first().context("empty command")?;
        let mut command = self.command(program);
        command.args(args);
        command
            .output()
            .with_context(|| format!("running {command:?}"))
    }

    /// Runs `argv` inside the namespace; fails (with stderr) unless it exits 0. Returns stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<String> {
        let (program, args) = argv.split_first().context("empty command")?;
        let mut command = self.command(program);
        command.args(args);
        run_ok(&mut command)
    }

    /// `sh -c <script>` inside the namespace; fails unless it exits 0. Returns stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.exec_ok(&["sh", "-c", script])
    }

    /// `ip -n <name> <args>` (no new mount namespace, unlike `exec`). Returns stdout.
    pub fn ip_cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Starts `argv` inside the namespace; it is stopped when the guard drops.
    pub fn spawn<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<ChildGuard> {
        let (program, args) = argv.split_first().context("empty command")?;
        let mut command = self.command(program);
        command.args(args);
        let label = format!("{} in {}", program.as_ref().to_string_lossy(), self.name);
        ChildGuard::spawn(label, command)
    }

    /// Makes `/etc/resolv.conf` inside this namespace (for commands run through [`exec`] and
    /// friends) list `nameservers`. The file lives in `/etc/netns/<name>/` and is removed on drop.
    ///
    /// [`exec`]: Self::exec
    pub fn set_resolv_conf(&self, nameservers: &[IpAddr]) -> Result<()> {
        let dir = Path::new(ETC_NETNS_DIR).join(&self.name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let body: String = nameservers
            .iter()
            .map(|ns| format!("nameserver {ns}\n"))
            .collect();
        let file = dir.join("resolv.conf");
        fs::write(&file, body).with_context(|| format!("writing {}", file.display()))
    }

    /// Blocks until a TCP connection to `addr`, made from inside the namespace, succeeds.
    pub fn wait_tcp(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let handle = self.handle()?;
        wait_until(&format!("tcp {addr} in {}", self.name), timeout, || {
            let connected = handle.run_blocking(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(250))
            })?;
            Ok(connected.is_ok())
        })
    }

    /// [`wait_tcp`](Self::wait_tcp) for async tests whose server runs on the same runtime.
    pub async fn wait_tcp_async(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let handle = self.handle()?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_millis(250),
                inpod::connect_in(&handle, addr, None),
            )
            .await;
            if let Ok(Ok(_)) = attempt {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for tcp {addr} in {}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Blocks until something inside the namespace has a UDP socket bound to `port`.
    pub fn wait_udp_bound(&self, port: u16, timeout: Duration) -> Result<()> {
        wait_until(&format!("udp :{port} in {}", self.name), timeout, || {
            self.udp_bound(port)
        })
    }

    /// Whether something inside the namespace has a UDP socket bound to `port`.
    pub fn udp_bound(&self, port: u16) -> Result<bool> {
        let filter = format!("sport = :{port}");
        Ok(!self.exec_ok(&["ss", "-Hlun", &filter])?.trim().is_empty())
    }

    /// PIDs of processes whose network namespace is this one.
    fn pids(&self) -> Vec<i32> {
        let Ok(out) = run_ok(Command::new("ip").args(["netns", "pids", &self.name])) else {
            return Vec::new();
        };
        out.split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let me = std::process::id() as i32;
        for pid in self.pids() {
            // Threads of this process (NetnsHandle) are never listed: `ip netns pids` looks at
            // each process's main thread only. Guard anyway.
            if pid != me {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Err(e) = run_ok(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("mesh-tests: deleting netns {}: {e:#}", self.name);
        }
        let etc = Path::new(ETC_NETNS_DIR).join(&self.name);
        if etc.exists() {
            let _ = fs::remove_dir_all(&etc);
        }
    }
}

/// Runs `command`; fails with its stderr unless it exits 0. Returns stdout.
pub(crate) fn run_ok(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Deletes namespaces left behind by earlier test processes that were killed before their Drop
/// guards could run (their pid no longer exists). Namespaces of live processes are left alone.
fn sweep_stale() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(pids) = run_ok(Command::new("ip").args(["netns", "pids", &name])) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = run_ok(Command::new("ip").args(["netns", "del", &name]));
        let _ = fs::remove_dir_all(Path::new(ETC_NETNS_DIR).join(&name));
    }
}
