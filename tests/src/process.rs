//! Child processes that cannot outlive the test.

use std::{
    cell::RefCell,
    fs::File,
    future::Future,
    io::{Read, Seek, SeekFrom},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, PoisonError},
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

/// Log tails of children stopped inside a [`lab_test`], kept until the test's outcome is known.
type Tails = Arc<Mutex<Vec<String>>>;

thread_local! {
    /// The [`lab_test`] running on this thread, if any.
    static SYNC_SCOPE: RefCell<Option<Tails>> = const { RefCell::new(None) };
}

tokio::task_local! {
    /// The [`lab_test_async`] this task belongs to, if any.
    static ASYNC_SCOPE: Tails;
}

fn current_scope() -> Option<Tails> {
    ASYNC_SCOPE
        .try_with(Tails::clone)
        .ok()
        .or_else(|| SYNC_SCOPE.with(|scope| scope.borrow().clone()))
}

/// Runs a lab test that reports failure as `Err` and turns that into a panic, printing the log
/// tails of every [`ChildGuard`] spawned (on this thread) during the test.
///
/// A test returning `anyhow::Result` drops its guards while the `Err` travels up, when nothing is
/// panicking yet, so the guards alone would stay silent about exactly the failures that need
/// their logs. Inside `lab_test` a guard hands its tail over on drop instead; the tails are
/// printed if `f` fails and discarded if it succeeds.
///
/// ```no_run
/// #[test]
/// fn my_lab_test() {
///     mesh_tests::lab_test(|| {
///         // ... spawn guards, `?` freely ...
///         Ok(())
///     })
/// }
/// ```
pub fn lab_test<F: FnOnce() -> Result<()>>(f: F) {
    let (result, tails) = run_collecting(f);
    conclude(result, tails);
}

/// Runs `f` with a fresh scope on this thread; returns its result and the tails of the guards
/// spawned and dropped inside it.
fn run_collecting<F: FnOnce() -> Result<()>>(f: F) -> (Result<()>, Vec<String>) {
    // Restores the outer scope even if `f` panics.
    struct Restore(Option<Tails>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            SYNC_SCOPE.with(|scope| *scope.borrow_mut() = outer);
        }
    }
    let tails = Tails::default();
    let restore = Restore(SYNC_SCOPE.with(|scope| scope.borrow_mut().replace(tails.clone())));
    let result = f();
    drop(restore);
    (result, take(&tails))
}

/// [`lab_test`] for async tests: guards spawned by this future (not by tasks it spawns) report
/// to it.
///
/// ```no_run
/// #[tokio::test]
/// async fn my_lab_test() {
///     mesh_tests::lab_test_async(async {
///         // ...
///         Ok(())
///     })
///     .await
/// }
/// ```
pub async fn lab_test_async<F: Future<Output = Result<()>>>(f: F) {
    let tails = Tails::default();
    let result = ASYNC_SCOPE.scope(tails.clone(), f).await;
    conclude(result, take(&tails));
}

fn take(tails: &Tails) -> Vec<String> {
    std::mem::take(&mut *tails.lock().unwrap_or_else(PoisonError::into_inner))
}

fn conclude(result: Result<()>, tails: Vec<String>) {
    if let Err(error) = result {
        for tail in tails {
            eprintln!("{tail}");
        }
        panic!("lab test failed: {error:?}");
    }
}

/// A running child process, stopped (SIGTERM, then SIGKILL) when dropped. Its stdout and stderr
/// go to one temporary log file; if the test is panicking when the guard drops, the tail of that
/// log is printed, which is usually what explains the failure. Inside [`lab_test`] /
/// [`lab_test_async`] the tail is also printed when the test returns an error.
pub struct ChildGuard {
    label: String,
    child: Child,
    log: tempfile::NamedTempFile,
    /// The lab test this guard was spawned in.
    scope: Option<Tails>,
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
        // One open file description for both streams (dup shares the offset): two separate
        // opens would each write from offset 0 and overwrite each other's lines.
        let stdout = log.reopen().context("opening the log file")?;
        let stderr = stdout.try_clone().context("duplicating the log file")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {label}: {command:?}"))?;
        Ok(Self {
            label,
            child,
            log,
            scope: current_scope(),
        })
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

    fn framed_tail(&self) -> String {
        format!(
            "----- {} (pid {}) log tail -----\n{}\n----- end of {} log -----",
            self.label,
            self.child.id(),
            self.log_tail(),
            self.label
        )
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
            eprintln!("{}", self.framed_tail());
        }
        if let Err(e) = self.stop() {
            eprintln!("mesh-tests: stopping {}: {e:#}", self.label);
        }
        if !thread::panicking()
            && let Some(scope) = &self.scope
        {
            // Read after the stop, so shutdown messages are included, and before the log file
            // is deleted with the guard.
            let tail = self.framed_tail();
            scope
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(tail);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(marker: &str) -> Result<ChildGuard> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("echo {marker}; exec sleep 30"));
        let mut guard = ChildGuard::spawn("echo", command)?;
        guard.wait_for_log(marker, Duration::from_secs(5))?;
        Ok(guard)
    }

    #[test]
    fn guards_dropped_in_a_failing_lab_test_hand_over_their_logs() {
        let (result, tails) = run_collecting(|| {
            let _guard = echo("marker-of-the-failing-test")?;
            bail!("the test failed")
        });
        assert!(result.is_err());
        assert_eq!(tails.len(), 1, "{tails:?}");
        assert!(tails[0].contains("marker-of-the-failing-test"), "{tails:?}");
        // The scope ends with the test: a guard spawned afterwards reports nowhere.
        assert!(current_scope().is_none());
    }

    #[test]
    fn lab_test_panics_on_err_and_passes_on_ok() {
        lab_test(|| {
            let _guard = echo("fine")?;
            Ok(())
        });
        let panicked = std::panic::catch_unwind(|| lab_test(|| bail!("boom")));
        let message = panicked.expect_err("an Err must fail the test");
        let text = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(text.contains("boom"), "{text}");
    }

    #[tokio::test]
    async fn async_scope_collects_from_its_own_future() {
        let tails = Tails::default();
        let result: Result<()> = ASYNC_SCOPE
            .scope(tails.clone(), async {
                let _guard = echo("async-marker")?;
                bail!("failed")
            })
            .await;
        assert!(result.is_err());
        let tails = take(&tails);
        assert_eq!(tails.len(), 1, "{tails:?}");
        assert!(tails[0].contains("async-marker"), "{tails:?}");
    }
}
