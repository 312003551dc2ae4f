//! Locating the workspace's binaries (ztunnel, waypoint, certs) for tests that drive them.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Overrides where binaries are looked for (a directory).
pub const BIN_DIR_ENV: &str = "MESH_TESTS_BIN_DIR";

/// The path of workspace binary `name`.
///
/// `CARGO_BIN_EXE_*` only exists for binaries of the test's own package, so this looks in
/// `$MESH_TESTS_BIN_DIR`, then `$CARGO_TARGET_DIR` (or the workspace's `target/`) under the
/// profile this test was built with first, then the other profile. The binaries must have been
/// built beforehand: `scripts/test` runs `cargo build --workspace --bins`; by hand,
/// `cargo build -p ztunnel -p waypoint -p certs`.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        candidates.push(PathBuf::from(dir).join(name));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profiles = if cfg!(debug_assertions) {
        ["debug", "release"]
    } else {
        ["release", "debug"]
    };
    for profile in profiles {
        candidates.push(target.join(profile).join(name));
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "binary `{name}` not found (looked in: {}). Build it first: \
         `cargo build -p ztunnel -p waypoint -p certs` (scripts/test does this), \
         or point {BIN_DIR_ENV} at a directory holding it",
        looked.join(", ")
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
}
