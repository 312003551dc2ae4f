//! `check DIR` and `dump DIR`, shared by the `mesh-config` binary, ztunnel and the waypoint.
use std::io::Write;
use std::path::Path;

/// Validates `dir`, printing every error (one per line) to `out`. Returns true when valid.
pub fn check(dir: &Path, out: &mut dyn Write) -> std::io::Result<bool> {
    match crate::load_dir(dir) {
        Ok(snap) => {
            writeln!(
                out,
                "{}: OK ({} services, {} workloads, {} waypoints)",
                dir.display(),
                snap.services().len(),
                snap.workloads().len(),
                snap.waypoints().count()
            )?;
            Ok(true)
        }
        Err(errs) => {
            for e in errs.iter() {
                writeln!(out, "{e}")?;
            }
            writeln!(out, "{}: {} error(s)", dir.display(), errs.len())?;
            Ok(false)
        }
    }
}

/// Writes the compiled snapshot of `dir` as pretty JSON. Returns false (after printing the
/// errors) when the configuration is invalid.
pub fn dump(dir: &Path, out: &mut dyn Write) -> std::io::Result<bool> {
    match crate::load_dir(dir) {
        Ok(snap) => {
            serde_json::to_writer_pretty(&mut *out, &snap).map_err(std::io::Error::other)?;
            writeln!(out)?;
            Ok(true)
        }
        Err(errs) => {
            for e in errs.iter() {
                writeln!(out, "{e}")?;
            }
            Ok(false)
        }
    }
}
