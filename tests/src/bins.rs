//! Locating the workspace's binaries (ztunnel, waypoint, certs) for tests that drive them.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Overrides where binaries are looked for (a directory).
pub const BIN_DIR_ENV: &str = "MESH_TESTS_BIN_DIR";

/// The profile this test was built with; binaries of the other profile may be stale.
const PROFILE: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

/// The path of workspace binary `name`.
///
/// `CARGO_BIN_EXE_*` only exists for binaries of the test's own package, so this looks in
/// `$MESH_TESTS_BIN_DIR` when it is set (and only there), else in `$CARGO_TARGET_DIR` (or the
/// workspace's `target/`) under the profile this test was built with. It never falls back to the
/// other profile: a leftover release binary would silently test old code. The path used is
/// logged to stderr. The binaries must have been built beforehand: `scripts/test` runs
/// `cargo build --workspace --bins`; by hand, `cargo build -p ztunnel -p waypoint -p certs`.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let found = locate(
        name,
        std::env::var_os(BIN_DIR_ENV).map(PathBuf::from),
        &target,
    )?;
    eprintln!("mesh-tests: using {name} at {}", found.display());
    Ok(found)
}

fn locate(name: &str, bin_dir: Option<PathBuf>, target: &Path) -> Result<PathBuf> {
    let (candidate, hint) = match bin_dir {
        Some(dir) => (
            dir.join(name),
            format!("{BIN_DIR_ENV} is set, so nothing else is searched"),
        ),
        None => (
            target.join(PROFILE).join(name),
            format!(
                "build it first with the {PROFILE} profile: \
                 `cargo build -p ztunnel -p waypoint -p certs` (scripts/test does this), \
                 or point {BIN_DIR_ENV} at a directory holding it"
            ),
        ),
    };
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "binary `{name}` not found at {}: {hint}",
        candidate.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_is_a_clear_error() {
        let err = workspace_bin("no-such-binary-mesh-tests")
            .expect_err("must not exist")
            .to_string();
        assert!(err.contains("no-such-binary-mesh-tests"), "{err}");
        assert!(err.contains("cargo build -p ztunnel"), "{err}");
    }

    #[test]
    fn only_the_same_profile_or_the_explicit_dir_is_used() {
        let other = if PROFILE == "debug" {
            "release"
        } else {
            "debug"
        };
        let target = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(target.path().join(other)).expect("mkdir");
        std::fs::write(target.path().join(other).join("ztunnel"), b"").expect("write");
        // Only the other profile's binary exists: refused, not used.
        let err = locate("ztunnel", None, target.path())
            .expect_err("other profile must not be used")
            .to_string();
        assert!(err.contains(PROFILE), "{err}");

        std::fs::create_dir_all(target.path().join(PROFILE)).expect("mkdir");
        std::fs::write(target.path().join(PROFILE).join("ztunnel"), b"").expect("write");
        assert_eq!(
            locate("ztunnel", None, target.path()).expect("same profile"),
            target.path().join(PROFILE).join("ztunnel")
        );

        // An explicit directory is the only place looked at.
        let dir = tempfile::tempdir().expect("tempdir");
        let err = locate("ztunnel", Some(dir.path().to_owned()), target.path())
            .expect_err("not in the explicit dir")
            .to_string();
        assert!(err.contains(BIN_DIR_ENV), "{err}");
        std::fs::write(dir.path().join("ztunnel"), b"").expect("write");
        assert_eq!(
            locate("ztunnel", Some(dir.path().to_owned()), target.path()).expect("explicit"),
            dir.path().join("ztunnel")
        );
    }
}
