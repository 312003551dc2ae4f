//! Whether this machine can run the lab, and what to do when it cannot.

use std::{os::unix::fs::PermissionsExt, sync::OnceLock};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Under `CI=true` a missing capability is a failure; elsewhere the test is skipped, loudly.
fn skip_or_fail(why: &str) -> bool {
    if in_ci() {
        panic!("CI=true and this test {why}: a missing capability is a failure in CI");
    }
    eprintln!("\n************************************************************");
    eprintln!("*** SKIPPED: {why}");
    eprintln!("************************************************************\n");
    false
}

/// True when running as root. Otherwise: panics under `CI=true`, else prints
/// `SKIPPED: needs root` and returns false (the test should return early).
pub fn require_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        true
    } else {
        skip_or_fail("needs root (network namespaces, iptables)")
    }
}

/// [`require_root`], plus a one-time probe that `ip netns add` really works here (root inside a
/// container without CAP_SYS_ADMIN cannot). Same skip/fail rule.
pub fn lab_enabled() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    if !require_root() {
        return false;
    }
    match PROBE.get_or_init(probe_netns) {
        Ok(()) => true,
        Err(why) => skip_or_fail(why),
    }
}

fn probe_netns() -> Result<(), String> {
    // Creating a real lab namespace exercises exactly what the tests need; dropping deletes it.
    crate::Netns::new("probe")
        .map(drop)
        .map_err(|e| format!("needs working network namespaces ({e:#})"))
}

/// True when every program in `tools` is an executable file on `PATH`. Same skip/fail rule as
/// [`require_root`], naming the missing tools.
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        true
    } else {
        skip_or_fail(&format!("needs {} on PATH", missing.join(", ")))
    }
}

fn on_path(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(tool))
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_path_finds_real_programs_only() {
        assert!(super::on_path("sh"));
        assert!(!super::on_path("no-such-tool-mesh-tests"));
    }
}
