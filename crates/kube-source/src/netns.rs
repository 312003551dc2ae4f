//! Pod network-namespace discovery for ztunnel.
//!
//! The kubelet puts every container of a pod in a cgroup whose path names the pod UID: the
//! cgroupfs driver as `…/kubepods/burstable/pod<uid>/<container>` and the systemd driver as
//! `…/kubepods-burstable-pod<uid with '_' for '-'>.slice/…`. Any process of a pod that does
//! not use the host network lives in the pod's network namespace, so `/proc/<pid>/ns/net` of
//! such a process is a path ztunnel can open to enter it.
//!
//! Requirements: the host's `/proc` (pod `hostPID: true`, or the host's `/proc` mounted at
//! `proc_root`), and `CAP_SYS_PTRACE` to open other users' `ns/net` plus `CAP_SYS_ADMIN` for
//! `setns` (ztunnel needs that one anyway).
use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use tracing::debug;

/// Length of a pod UID (an RFC 4122 UUID in its 8-4-4-4-12 text form).
const UID_LEN: usize = 36;

/// Pod UIDs named in a `/proc/<pid>/cgroup` text, normalised to lowercase with dashes.
pub fn pod_uids_in_cgroup(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("pod") {
        let after = &rest[i + 3..];
        if let Some(candidate) = after.get(..UID_LEN)
            && let Some(uid) = normalise_uid(candidate)
            && !out.contains(&uid)
        {
            out.push(uid);
        }
        rest = after;
    }
    out
}

/// `candidate` as a canonical UID if it is one, with `-` or (systemd) `_` separators.
fn normalise_uid(candidate: &str) -> Option<String> {
    let b = candidate.as_bytes();
    let mut out = String::with_capacity(UID_LEN);
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' && c != b'_' {
                return None;
            }
            out.push('-');
        } else if c.is_ascii_hexdigit() {
            out.push(c.to_ascii_lowercase() as char);
        } else {
            return None;
        }
    }
    Some(out)
}

/// Scans `proc_root` for processes of the pods in `wanted` (normalised UIDs): UID → pids,
/// ascending. Processes that vanish or cannot be read are skipped (they come and go).
pub fn scan(
    proc_root: &Path,
    wanted: &HashSet<String>,
) -> io::Result<HashMap<String, BTreeSet<u32>>> {
    let mut found: HashMap<String, BTreeSet<u32>> = HashMap::new();
    if wanted.is_empty() {
        return Ok(found);
    }
    for entry in std::fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        for uid in pod_uids_in_cgroup(&cgroup) {
            if wanted.contains(&uid) {
                found.entry(uid).or_default().insert(pid);
            }
        }
    }
    Ok(found)
}

/// Finds the network namespace of pods, remembering the pid chosen for each pod so the path
/// handed to ztunnel stays the same while that process lives (a changed path would make
/// ztunnel re-capture the pod).
#[derive(Debug)]
pub struct NetnsDiscovery {
    proc_root: PathBuf,
    chosen: HashMap<String, u32>,
}

impl NetnsDiscovery {
    pub fn new(proc_root: PathBuf) -> Self {
        NetnsDiscovery {
            proc_root,
            chosen: HashMap::new(),
        }
    }

    /// `<proc_root>/<pid>/ns/net` for each of `uids` (any case, dashes) whose namespace was
    /// found. Pods not found yet are left out (their sandbox may not run yet).
    pub fn resolve<'a>(
        &mut self,
        uids: impl IntoIterator<Item = &'a str>,
    ) -> HashMap<String, PathBuf> {
        let wanted: HashSet<String> = uids.into_iter().filter_map(normalise_uid_any).collect();
        // Every pod already has a live process: re-check just those instead of reading every
        // process's cgroup (the scan would pick the same pids, as it prefers the previous one).
        if let Some(out) = self.still_chosen(&wanted) {
            self.chosen.retain(|uid, _| wanted.contains(uid));
            return out;
        }
        let found = match scan(&self.proc_root, &wanted) {
            Ok(f) => f,
            Err(error) => {
                // Without /proc nothing can be found; the pods are reported as pending.
                debug!(proc_root = %self.proc_root.display(), %error, "cannot scan processes");
                HashMap::new()
            }
        };
        let mut out = HashMap::new();
        let mut chosen = HashMap::new();
        for (uid, pids) in found {
            let previous = self.chosen.get(&uid).filter(|p| pids.contains(p)).copied();
            // The lowest pid is normally the sandbox (pause) process, which lives as long as
            // the pod.
            let candidates = previous.into_iter().chain(pids.iter().copied());
            for pid in candidates {
                let path = self.proc_root.join(pid.to_string()).join("ns").join("net");
                if std::fs::symlink_metadata(&path).is_ok() {
                    chosen.insert(uid.clone(), pid);
                    out.insert(uid.clone(), path);
                    break;
                }
            }
        }
        self.chosen = chosen;
        out
    }
}

impl NetnsDiscovery {
    /// The namespaces of `wanted` when each one's previously chosen process still belongs to
    /// that pod and still has its namespace; `None` as soon as one does not.
    fn still_chosen(&self, wanted: &HashSet<String>) -> Option<HashMap<String, PathBuf>> {
        let mut out = HashMap::with_capacity(wanted.len());
        for uid in wanted {
            let pid = self.chosen.get(uid)?;
            let dir = self.proc_root.join(pid.to_string());
            let cgroup = std::fs::read_to_string(dir.join("cgroup")).ok()?;
            if !pod_uids_in_cgroup(&cgroup).iter().any(|u| u == uid) {
                return None;
            }
            let path = dir.join("ns").join("net");
            std::fs::symlink_metadata(&path).ok()?;
            out.insert(uid.clone(), path);
        }
        Some(out)
    }
}

/// A pod UID as the API server prints it, normalised like [`pod_uids_in_cgroup`] does.
pub fn normalise_uid_any(uid: &str) -> Option<String> {
    if uid.len() == UID_LEN {
        normalise_uid(uid)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const UID_A: &str = "0c6f1a4e-2b1d-4a4e-9b77-1d2e3f405060";
    const UID_B: &str = "7a8b9c0d-1e2f-4a5b-8c6d-7e8f90a1b2c3";

    fn fake_proc(procs: &[(u32, &str, bool)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (pid, cgroup, has_ns) in procs {
            let p = dir.path().join(pid.to_string());
            fs::create_dir_all(p.join("ns")).expect("mkdir");
            fs::write(p.join("cgroup"), cgroup).expect("write cgroup");
            if *has_ns {
                fs::write(p.join("ns").join("net"), "").expect("write ns");
            }
        }
        // Non-process entries of a real /proc.
        fs::create_dir_all(dir.path().join("sys")).expect("mkdir");
        fs::write(dir.path().join("uptime"), "1 1").expect("write");
        dir
    }

    #[test]
    fn uids_from_cgroup_lines() {
        let cases: &[(&str, &[&str])] = &[
            // cgroupfs driver, cgroup v1 (several hierarchies, same pod).
            (
                "12:memory:/kubepods/burstable/pod0c6f1a4e-2b1d-4a4e-9b77-1d2e3f405060/abc\n11:cpu:/kubepods/burstable/pod0c6f1a4e-2b1d-4a4e-9b77-1d2e3f405060/abc\n",
                &[UID_A],
            ),
            // systemd driver, cgroup v2.
            (
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7a8b9c0d_1e2f_4a5b_8c6d_7e8f90a1b2c3.slice/cri-containerd-1234.scope\n",
                &[UID_B],
            ),
            // Upper-case hex is normalised.
            (
                "0::/kubepods/pod0C6F1A4E-2B1D-4A4E-9B77-1D2E3F405060/x",
                &[UID_A],
            ),
            // Host processes, and near-misses.
            ("0::/system.slice/sshd.service\n", &[]),
            ("0::/kubepods.slice/kubepods-pod1234\n", &[]),
            (
                "0::/kubepods/podzzzzzzzz-2b1d-4a4e-9b77-1d2e3f405060/x",
                &[],
            ),
            ("", &[]),
        ];
        for (text, want) in cases {
            assert_eq!(pod_uids_in_cgroup(text), *want, "{text}");
        }
    }

    #[test]
    fn finds_the_pods_process_and_keeps_it() {
        let proc = fake_proc(&[
            (1, "0::/init.scope\n", true),
            (
                4242,
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0c6f1a4e_2b1d_4a4e_9b77_1d2e3f405060.slice/cri-containerd-aa.scope\n",
                true,
            ),
            (
                4300,
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0c6f1a4e_2b1d_4a4e_9b77_1d2e3f405060.slice/cri-containerd-bb.scope\n",
                true,
            ),
            // Pod B's only process has no readable ns/net (e.g. exiting): not found yet.
            (
                5000,
                "0::/kubepods/besteffort/pod7a8b9c0d-1e2f-4a5b-8c6d-7e8f90a1b2c3/cc\n",
                false,
            ),
        ]);
        let mut d = NetnsDiscovery::new(proc.path().to_path_buf());
        let got = d.resolve([UID_A, UID_B, "not-a-uid"]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[UID_A], proc.path().join("4242/ns/net"));

        // A new process of pod A with a lower pid does not move the path while 4242 lives.
        fs::create_dir_all(proc.path().join("100/ns")).expect("mkdir");
        fs::write(
            proc.path().join("100/cgroup"),
            "0::/kubepods/pod0c6f1a4e-2b1d-4a4e-9b77-1d2e3f405060/dd\n",
        )
        .expect("write");
        fs::write(proc.path().join("100/ns/net"), "").expect("write");
        assert_eq!(d.resolve([UID_A])[UID_A], proc.path().join("4242/ns/net"));
        // Once it is gone, another process of the pod is used.
        fs::remove_dir_all(proc.path().join("4242")).expect("rm");
        assert_eq!(d.resolve([UID_A])[UID_A], proc.path().join("100/ns/net"));
    }

    #[test]
    fn missing_proc_finds_nothing() {
        let mut d = NetnsDiscovery::new(PathBuf::from("/nonexistent/proc"));
        assert!(d.resolve([UID_A]).is_empty());
        // Nothing wanted: /proc is not even read.
        assert!(
            scan(Path::new("/nonexistent"), &HashSet::new())
                .expect("empty")
                .is_empty()
        );
    }
}
