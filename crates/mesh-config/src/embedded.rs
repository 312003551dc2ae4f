//! The default configuration (`config/default/`), compiled into the crate so a binary can run
//! with no configuration directory. The pod IPs (10.244.x.x) and netns paths in it are
//! placeholders used by `scripts/demo`.
mod files {
    include!(concat!(env!("OUT_DIR"), "/embedded_default.rs"));
}

/// `(path relative to config/default, YAML text)`, sorted by path.
pub fn files() -> &'static [(&'static str, &'static str)] {
    files::FILES
}

/// Compiles the embedded default configuration.
pub fn default_snapshot() -> Result<crate::Snapshot, crate::LoadErrors> {
    crate::load_sources(files().iter().copied())
}
