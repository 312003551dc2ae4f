//! Child processes that cannot outlive the test.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// How long a child gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How much of a child's log is printed when the test panics.
const LOG_TAIL: u64 = 16 * 1024;

/// A running child process, stopped (SIGTERM, then SIGKILL) when dropped. Its stdout and stderr
/// go to one temporary log file; if the test is panicking when the guard drops, the tail of that
/// log is printed, which is usually what explains the failure.
pub struct ChildGuard {
    label: String,
    child: Child,
    log: tempfile::NamedTempFile,
}

impl ChildGuard {
    /// Spawns `command` with stdin closed and stdout+stderr captured to the log.
    pub fn spawn(label: impl Into<String>, mut command: Command) -> Result<Self> {
        let label = label.into();
        let log = tempfile::Builder::new()
            .prefix(&format!("mesh-tests-{}-", sanitize(&label)))
            .suffix(".log")
            .tempfile()
            .context("creating the child's log file")?;
        let stdout = log.reopen().context("opening the log file")?;
        let stderr = log.reopen().context("opening the log file")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {label}: {command:?}"))?;
        Ok(Self { label, child, log })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        self.log.path()
    }

    /// Everything the child has written so far.
    pub fn log(&self) -> String {
        std::fs::read(self.log.path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("<cannot read log: {e}>"))
    }

    /// `Some(status)` once the child has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().context("polling child")
    }

    /// Sends `signal` (e.g. SIGHUP for a reload) without waiting.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(pid(&self.child)?, signal).with_context(|| format!("signalling {}", self.label))
    }

    /// Waits until the log contains `needle`, failing early if the child exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited ({status}) before logging {needle:?}; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, up to 5 s for a clean exit, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // ESRCH means it exited between the check and the signal; the wait below reaps it.
        let _ = kill(pid(&self.child)?, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.child.kill().context("SIGKILL")?;
        self.child.wait().context("reaping child")
    }

    fn log_tail(&self) -> String {
        let Ok(mut file) = File::open(self.log.path()) else {
            return String::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "----- {} (pid {}) log tail -----\n{}\n----- end of {} log -----",
                self.label,
                self.child.id(),
                self.log_tail(),
                self.label
            );
        }
        if let Err(e) = self.stop() {
            eprintln!("mesh-tests: stopping {}: {e:#}", self.label);
        }
    }
}

fn pid(child: &Child) -> Result<Pid> {
    let raw = i32::try_from(child.id()).context("pid out of range")?;
    Ok(Pid::from_raw(raw))
}

pub(crate) fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Polls `check` every 50 ms until it returns `Ok(true)`, failing after `timeout` with the last
/// error (if any) as context.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            return match last {
                Some(e) => {
                    Err(e.context(format!("timed out after {timeout:?} waiting for {what}")))
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            };
        }
        thread::sleep(Duration::from_millis(50));
    }
}
