//! What ztunnel has done to other network namespaces, remembered across restarts.
//!
//! The capture rules outlive the process on purpose (see [`crate::pods`]), so a pod that leaves
//! the configuration while ztunnel is down would keep its `STRAIT_*` chains forever: nothing in
//! the new configuration points at its namespace any more. The ledger records every namespace
//! that got rules (path and inode, written *before* the rules go in) in
//! `<state dir>/<node>.json`; at startup every entry the configuration no longer serves is swept.
//! Scanning `/run/netns` and `/proc/*/ns/net` for our chains would find the same namespaces, but
//! slower and with guesses; the ledger is exact and cheap.
//!
//! The inode guards against a path that now names another namespace: then the rules we
//! installed died with the old one, and the new one is not ours to touch. An exclusive `flock`
//! on `<node>.lock`, held for the process's lifetime, keeps two ztunnels of the same node (a
//! misconfiguration, or two test labs sharing a state directory) from sweeping each other's
//! pods.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use inpod::{IpFamily, NetnsId};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Default `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/run/strait/ztunnel";

/// Why the ledger cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another ztunnel for this node holds {path}")]
    Locked { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One namespace that has (or may have) our rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The pod it was installed for (`namespace/name`), for logs.
    pub pod: String,
    /// `st_dev` / `st_ino` of the namespace when the rules went in.
    pub dev: u64,
    pub ino: u64,
    /// `ipv4` / `ipv6`: the tables that got rules.
    pub families: Vec<Family>,
}

impl Entry {
    pub fn new(pod: String, id: NetnsId, families: &[IpFamily]) -> Self {
        Entry {
            pod,
            dev: id.dev,
            ino: id.ino,
            families: families.iter().copied().map(Family::from).collect(),
        }
    }

    pub fn netns_id(&self) -> NetnsId {
        NetnsId {
            dev: self.dev,
            ino: self.ino,
        }
    }

    pub fn ip_families(&self) -> Vec<IpFamily> {
        self.families.iter().copied().map(IpFamily::from).collect()
    }
}

/// [`IpFamily`] as the file spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl From<IpFamily> for Family {
    fn from(f: IpFamily) -> Self {
        match f {
            IpFamily::V4 => Family::Ipv4,
            IpFamily::V6 => Family::Ipv6,
        }
    }
}

impl From<Family> for IpFamily {
    fn from(f: Family) -> Self {
        match f {
            Family::Ipv4 => IpFamily::V4,
            Family::Ipv6 => IpFamily::V6,
        }
    }
}

/// The file's contents: entries by namespace path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(default)]
    pub netns: BTreeMap<PathBuf, Entry>,
}

impl Ledger {
    /// Entries whose namespace is not in `served` (the paths the configuration still serves).
    pub fn stale<'a>(
        &'a self,
        served: &'a std::collections::BTreeSet<PathBuf>,
    ) -> impl Iterator<Item = (&'a PathBuf, &'a Entry)> + 'a {
        self.netns
            .iter()
            .filter(|(path, _)| !served.contains(*path))
    }
}

/// The ledger file of one node, locked for this process.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    ledger: Ledger,
    /// Held, never read: dropping it releases the lock.
    _lock: Flock<File>,
}

impl StateStore {
    /// Creates `dir` if needed, takes the node's lock and reads the ledger. An unreadable or
    /// corrupt ledger is logged and treated as empty: the worst outcome is a leak, never a
    /// failed start.
    pub fn open(dir: &Path, node: &str) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let stem = file_stem(node);
        let lock_path = dir.join(format!("{stem}.lock"));
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StateError::Dir {
                path: lock_path.clone(),
                source,
            })?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| StateError::Locked { path: lock_path })?;
        let path = dir.join(format!("{stem}.json"));
        let ledger = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                warn!(path = %path.display(), %error, "unreadable capture ledger; starting empty");
                Ledger::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ledger::default(),
            Err(error) => {
                warn!(path = %path.display(), %error, "cannot read the capture ledger; starting empty");
                Ledger::default()
            }
        };
        info!(path = %path.display(), entries = ledger.netns.len(), "capture ledger");
        Ok(StateStore {
            path,
            ledger,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Records `entry` for `netns` (replacing what was there) and writes the file.
    pub fn record(&mut self, netns: &Path, entry: Entry) {
        if self.ledger.netns.get(netns) == Some(&entry) {
            return;
        }
        self.ledger.netns.insert(netns.to_owned(), entry);
        self.persist();
    }

    /// Forgets `netns` and writes the file.
    pub fn forget(&mut self, netns: &Path) {
        if self.ledger.netns.remove(netns).is_some() {
            self.persist();
        }
    }

    /// Failures are logged, not returned: rules must not wait on the ledger, and the cost of
    /// a lost write is at worst a leak that the next successful write does not repeat.
    fn persist(&self) {
        if let Err(error) = self.write() {
            warn!(%error, "capture ledger not updated");
        }
    }

    /// Write then rename, so a crash never leaves half a file.
    fn write(&self) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(&self.ledger).map_err(io::Error::other);
        let json = json.map_err(err)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut file = File::create(&tmp).map_err(err)?;
        file.write_all(&json).map_err(err)?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }
}

/// A file name for `node`: node names are DNS subdomains, but the flag comes from outside.
fn file_stem(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn id(ino: u64) -> NetnsId {
        NetnsId { dev: 4, ino }
    }

    #[test]
    fn records_survive_a_reopen_and_forget_removes_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut store = StateStore::open(dir.path(), "node-1").expect("open");
            assert!(store.ledger().netns.is_empty());
            store.record(
                Path::new("/run/netns/a"),
                Entry::new("default/a".into(), id(1), &[IpFamily::V4, IpFamily::V6]),
            );
            store.record(
                Path::new("/run/netns/b"),
                Entry::new("default/b".into(), id(2), &[IpFamily::V4]),
            );
            store.forget(Path::new("/run/netns/b"));
        }
        let store = StateStore::open(dir.path(), "node-1").expect("reopen");
        let entries: Vec<_> = store.ledger().netns.iter().collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        let (path, entry) = entries[0];
        assert_eq!(path, Path::new("/run/netns/a"));
        assert_eq!(entry.netns_id(), id(1));
        assert_eq!(entry.ip_families(), vec![IpFamily::V4, IpFamily::V6]);
        assert_eq!(store.path(), dir.path().join("node-1.json"));
    }

    #[test]
    fn a_second_process_for_the_node_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = StateStore::open(dir.path(), "node-1").expect("open");
        let second = StateStore::open(dir.path(), "node-1");
        assert!(
            matches!(second, Err(StateError::Locked { .. })),
            "{second:?}"
        );
        // Another node on the same machine has its own file and lock.
        StateStore::open(dir.path(), "node-2").expect("other node");
    }

    #[test]
    fn corrupt_ledger_starts_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("n.json"), b"{not json").expect("write");
        let mut store = StateStore::open(dir.path(), "n").expect("open");
        assert!(store.ledger().netns.is_empty());
        store.record(
            Path::new("/run/netns/x"),
            Entry::new("d/x".into(), id(9), &[IpFamily::V4]),
        );
        let text = std::fs::read_to_string(dir.path().join("n.json")).expect("read");
        assert!(
            text.contains("/run/netns/x") && text.contains("ipv4"),
            "{text}"
        );
    }

    #[test]
    fn stale_entries_are_the_ones_no_longer_served() {
        let mut ledger = Ledger::default();
        for (path, ino) in [
            ("/run/netns/a", 1),
            ("/run/netns/b", 2),
            ("/run/netns/c", 3),
        ] {
            ledger.netns.insert(
                PathBuf::from(path),
                Entry::new(format!("default/{ino}"), id(ino), &[IpFamily::V4]),
            );
        }
        let cases: [(&[&str], &[&str]); 3] = [
            (&[], &["/run/netns/a", "/run/netns/b", "/run/netns/c"]),
            (&["/run/netns/b"], &["/run/netns/a", "/run/netns/c"]),
            (
                &[
                    "/run/netns/a",
                    "/run/netns/b",
                    "/run/netns/c",
                    "/run/netns/d",
                ],
                &[],
            ),
        ];
        for (served, want) in cases {
            let served: BTreeSet<PathBuf> = served.iter().map(PathBuf::from).collect();
            let got: Vec<&Path> = ledger.stale(&served).map(|(p, _)| p.as_path()).collect();
            let want: Vec<&Path> = want.iter().map(Path::new).collect();
            assert_eq!(got, want, "served {served:?}");
        }
    }

    #[test]
    fn file_stems_stay_in_the_directory() {
        assert_eq!(file_stem("node-1.example"), "node-1.example");
        assert_eq!(file_stem("../etc/x"), "_etc_x");
        assert_eq!(file_stem("a/b"), "a_b");
    }
}
