//! [`ConfigStore`]: the current snapshot, swapped atomically on valid changes.
//!
//! Readers call [`ConfigStore::current`] (a lock-free `ArcSwap` load) or
//! [`ConfigStore::subscribe`] (a `tokio::sync::watch` receiver). [`ConfigStore::watch`] follows
//! the directory with `notify`, debounces bursts (~100 ms), recompiles, and swaps only when the
//! new configuration is valid; an invalid change logs every error and keeps the last good
//! snapshot (visible as [`ConfigStore::last_error`]).
use crate::error::{ConfigError, LoadErrors};
use crate::snapshot::Snapshot;
use arc_swap::ArcSwap;
use notify::Watcher;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::{error, info};

/// How long a burst of file events must be quiet before we reload.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {path}: {source}")]
    Notify {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("this store has no directory to watch (embedded or in-memory configuration)")]
    NoDirectory,
}

#[derive(Default)]
struct Status {
    generation: u64,
    last_good_load: Option<SystemTime>,
    last_error: Option<Arc<LoadErrors>>,
}

struct Inner {
    dir: Option<PathBuf>,
    current: ArcSwap<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
    status: Mutex<Status>,
}

/// Shared handle (cheap to clone) to the mesh configuration.
#[derive(Clone)]
pub struct ConfigStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ConfigStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigStore")
            .field("dir", &self.inner.dir)
            .field("generation", &self.generation())
            .finish()
    }
}

impl ConfigStore {
    fn with(dir: Option<PathBuf>, snap: Snapshot) -> ConfigStore {
        let snap = Arc::new(snap);
        let (tx, _) = watch::channel(snap.clone());
        ConfigStore {
            inner: Arc::new(Inner {
                dir,
                current: ArcSwap::new(snap),
                tx,
                status: Mutex::new(Status {
                    generation: 1,
                    last_good_load: Some(SystemTime::now()),
                    last_error: None,
                }),
            }),
        }
    }

    /// Loads `dir`; fails (with every error) if the initial configuration is invalid.
    /// Generation 1 is this first load.
    pub fn open(dir: impl AsRef<Path>) -> Result<ConfigStore, LoadErrors> {
        let dir = dir.as_ref().to_path_buf();
        let snap = crate::load_dir(&dir)?;
        info!(dir = %dir.display(), services = snap.services().len(), workloads = snap.workloads().len(), "mesh configuration loaded");
        Ok(ConfigStore::with(Some(dir), snap))
    }

    /// The embedded default configuration (config/default).
    pub fn embedded_default() -> Result<ConfigStore, LoadErrors> {
        Ok(ConfigStore::with(
            None,
            crate::embedded::default_snapshot()?,
        ))
    }

    /// A fixed snapshot (tests, other crates' fixtures).
    pub fn from_snapshot(snap: Snapshot) -> ConfigStore {
        ConfigStore::with(None, snap)
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.inner.current.load_full()
    }

    /// Receives every new snapshot (the current one is marked seen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.tx.subscribe()
    }

    /// 1 after the first load, +1 per successful reload.
    pub fn generation(&self) -> u64 {
        self.status().generation
    }

    pub fn last_good_load(&self) -> Option<SystemTime> {
        self.status().last_good_load
    }

    /// Errors of the last failed reload; cleared by the next successful one.
    pub fn last_error(&self) -> Option<Arc<LoadErrors>> {
        self.status().last_error.clone()
    }

    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        // A poisoned lock only means a panic elsewhere while holding it; the data is plain.
        self.inner.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs `snap` as the new current snapshot (e.g. built by hand in tests).
    pub fn replace(&self, snap: Snapshot) -> u64 {
        let snap = Arc::new(snap);
        let generation = {
            let mut st = self.status();
            st.generation += 1;
            st.last_good_load = Some(SystemTime::now());
            st.last_error = None;
            st.generation
        };
        self.inner.current.store(snap.clone());
        self.inner.tx.send_replace(snap);
        generation
    }

    /// Records a rejected configuration change from another source (e.g. the Kubernetes API):
    /// the current snapshot stays in use and [`ConfigStore::last_error`] reports `errs` until
    /// the next successful [`ConfigStore::replace`].
    pub fn record_error(&self, errs: LoadErrors) -> Arc<LoadErrors> {
        let errs = Arc::new(errs);
        self.status().last_error = Some(errs.clone());
        errs
    }

    /// Re-reads the directory now. On success swaps and returns the new generation; on failure
    /// logs every error, records it, and keeps serving the previous snapshot.
    pub fn reload(&self) -> Result<u64, Arc<LoadErrors>> {
        let Some(dir) = &self.inner.dir else {
            return Err(Arc::new(LoadErrors(vec![ConfigError::file(
                "<store>",
                "no directory to reload",
            )])));
        };
        match crate::load_dir(dir) {
            Ok(snap) => {
                let generation = self.replace(snap);
                info!(dir = %dir.display(), generation, "mesh configuration reloaded");
                Ok(generation)
            }
            Err(errs) => {
                for e in errs.iter() {
                    error!(error = %e, "invalid mesh configuration");
                }
                error!(dir = %dir.display(), count = errs.len(), generation = self.generation(), "configuration change rejected; keeping the last good snapshot");
                let errs = Arc::new(errs);
                self.status().last_error = Some(errs.clone());
                Err(errs)
            }
        }
    }

    /// Watches the directory and reloads on changes (debounced). Must be called inside a
    /// Tokio runtime. Dropping the handle stops watching.
    pub fn watch(&self) -> Result<WatchHandle, WatchError> {
        let dir = self.inner.dir.clone().ok_or(WatchError::NoDirectory)?;
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            match res {
                Ok(ev) if ev.kind.is_access() => {}
                // Errors (e.g. queue overflow) also trigger a reload so nothing is missed.
                _ => {
                    let _ = ev_tx.send(());
                }
            }
        })
        .map_err(|source| WatchError::Notify {
            path: dir.clone(),
            source,
        })?;
        watcher
            .watch(&dir, notify::RecursiveMode::Recursive)
            .map_err(|source| WatchError::Notify {
                path: dir.clone(),
                source,
            })?;
        let store = self.clone();
        let task = tokio::spawn(async move {
            while ev_rx.recv().await.is_some() {
                // Debounce: wait until the burst has been quiet for DEBOUNCE.
                loop {
                    match tokio::time::timeout(DEBOUNCE, ev_rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let s = store.clone();
                // Parsing is CPU work; keep it off the async workers.
                let _ = tokio::task::spawn_blocking(move || s.reload()).await;
            }
        });
        Ok(WatchHandle {
            _watcher: watcher,
            task,
        })
    }
}

/// Keeps the directory watch alive; dropping it stops watching.
pub struct WatchHandle {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}
