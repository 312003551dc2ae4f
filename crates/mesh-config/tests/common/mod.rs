#![allow(dead_code)]
use mesh_config::{LoadErrors, Snapshot};
use std::path::{Path, PathBuf};

pub fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seeds")
}

/// Loads one seed fixture on its own, keeping its path relative to the seeds directory (so the
/// `istio-egress/` ones default to that namespace).
pub fn load_seed(rel: &str) -> Result<Snapshot, LoadErrors> {
    let text = std::fs::read_to_string(seeds_dir().join(rel)).expect("fixture exists");
    mesh_config::load_sources([(rel, text.as_str())])
}

pub fn load(files: &[(&str, &str)]) -> Result<Snapshot, LoadErrors> {
    mesh_config::load_sources(files.iter().copied())
}

pub fn must(files: &[(&str, &str)]) -> Snapshot {
    match load(files) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}
