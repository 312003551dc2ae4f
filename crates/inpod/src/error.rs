use std::{io, path::PathBuf, process::ExitStatus};

/// Errors from entering a network namespace, creating sockets in it and applying capture rules.
///
/// Every variant that concerns a namespace names its path, so a log line is enough to find the pod.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening netns {path}: {source}")]
    Open { path: PathBuf, source: io::Error },

    #[error("entering netns {path} (setns CLONE_NEWNET): {source}")]
    Enter { path: PathBuf, source: io::Error },

    #[error("starting the thread for netns {path}: {source}")]
    Thread { path: PathBuf, source: io::Error },

    #[error("the thread for netns {path} has stopped")]
    ThreadGone { path: PathBuf },

    #[error("a task run in netns {path} panicked")]
    Panicked { path: PathBuf },

    #[error("in netns {path}: {op}: {source}")]
    Socket {
        path: PathBuf,
        op: String,
        source: io::Error,
    },

    #[error("in netns {path}: `{command}` could not be run: {source}")]
    Spawn {
        path: PathBuf,
        command: String,
        source: io::Error,
    },

    #[error("in netns {path}: `{command}` did not finish within {timeout:?} and was killed")]
    Timeout {
        path: PathBuf,
        command: String,
        timeout: std::time::Duration,
    },

    #[error("in netns {path}: `{command}` failed ({status}): {stderr}")]
    Command {
        path: PathBuf,
        command: String,
        status: ExitStatus,
        stderr: String,
    },

    #[error("invalid capture config: {0}")]
    Config(#[from] ConfigError),
}

/// A capture configuration that cannot be rendered into a sound ruleset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("mark {mark:#x} has bits outside its mask {mask:#x}")]
    MarkOutsideMask { mark: u32, mask: u32 },

    #[error("mark must not be 0: unmarked traffic could not be told apart from ztunnel's")]
    ZeroMark,

    #[error("port {0} is used for two capture roles")]
    DuplicatePort(u16),

    #[error("port 0 is not a valid {0}")]
    ZeroPort(&'static str),

    #[error("no IP family selected")]
    NoFamily,

    #[error("invalid CIDR {input:?}: {reason}")]
    Cidr { input: String, reason: String },

    #[error("invalid port {input:?}: {reason}")]
    Port { input: String, reason: String },
}
