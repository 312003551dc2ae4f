//! Real servers started inside lab namespaces: nginx (HTTP/TCP upstreams) and dnsmasq.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{ChildGuard, Netns};

/// Where Debian keeps nginx's dynamic modules.
const SYSTEM_MODULES: &str = "/usr/lib/nginx/modules";

/// How an nginx instance is configured.
#[derive(Debug, Clone)]
pub enum NginxConfig {
    /// Contents of the `http { }` block (and optionally of a `stream { }` block); the harness
    /// writes the rest: pid, logs and temp paths in the instance's temp dir, `user root`, one
    /// worker, and the system's enabled dynamic modules (stream, echo).
    Blocks {
        http: String,
        stream: Option<String>,
    },
    /// A complete `nginx.conf`. `@DIR@` is replaced by the instance's temp dir; `daemon off` is
    /// given on the command line, so the file must not set it.
    Full(String),
}

impl NginxConfig {
    /// Just an `http { }` block body, e.g. `server { listen 80; location / { return 200 "hi"; } }`.
    pub fn http(body: impl Into<String>) -> Self {
        NginxConfig::Blocks {
            http: body.into(),
            stream: None,
        }
    }
}

/// A running nginx, stopped on drop. Logs and temp files live in [`dir`](Self::dir).
pub struct Nginx {
    // Field order matters: the process stops before its directory is deleted.
    child: ChildGuard,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Writes the config to a temp dir and starts `nginx -c <conf> -g 'daemon off;'` inside `ns`.
    /// Readiness is the caller's: use [`Netns::wait_tcp`] on a port the config listens on.
    pub fn start(ns: &Netns, config: &NginxConfig) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mesh-tests-nginx-")
            .tempdir()
            .context("nginx temp dir")?;
        let d = dir.path().display().to_string();
        let text = match config {
            NginxConfig::Full(text) => text.replace("@DIR@", &d),
            NginxConfig::Blocks { http, stream } => {
                let stream = stream
                    .as_ref()
                    .map(|body| format!("stream {{\n{body}\n}}\n"))
                    .unwrap_or_default();
                format!(
                    "include /etc/nginx/modules-enabled/*.conf;\n\
                     user root;\n\
                     worker_processes 1;\n\
                     pid {d}/nginx.pid;\n\
                     error_log {d}/error.log info;\n\
                     events {{ worker_connections 1024; }}\n\
                     http {{\n\
                     access_log {d}/access.log;\n\
                     client_body_temp_path {d}/client_body;\n\
                     proxy_temp_path {d}/proxy;\n\
                     fastcgi_temp_path {d}/fastcgi;\n\
                     uwsgi_temp_path {d}/uwsgi;\n\
                     scgi_temp_path {d}/scgi;\n\
                     {http}\n\
                     }}\n\
                     {stream}"
                )
            }
        };
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        // Debian's module snippets say `load_module modules/x.so`, relative to the prefix.
        if Path::new(SYSTEM_MODULES).is_dir() {
            std::os::unix::fs::symlink(SYSTEM_MODULES, dir.path().join("modules"))
                .context("linking nginx modules into the prefix")?;
        }
        let command = |extra: &[&str]| {
            let mut command = ns.command("nginx");
            command
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"])
                .args(extra);
            command
        };
        // A config error is reported here, with nginx's message, instead of as a port that never
        // opens.
        crate::netns::run_ok(&mut command(&["-t", "-q"])).with_context(|| {
            format!(
                "nginx rejected its config:\n{}",
                std::fs::read_to_string(&conf).unwrap_or_default()
            )
        })?;
        let child = ChildGuard::spawn(format!("nginx in {}", ns.name()), command(&[]))?;
        Ok(Self { child, dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    pub fn error_log(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }

    pub fn child(&mut self) -> &mut ChildGuard {
        &mut self.child
    }
}

/// Starts dnsmasq inside `ns`, answering `records` (name → address; subdomains included, as
/// `--address=/name/ip` does) on `listen`:53 and nothing else: no upstream, no /etc/hosts, no
/// config file. Returns once it has bound port 53.
pub fn start_dnsmasq(ns: &Netns, listen: IpAddr, records: &[(&str, IpAddr)]) -> Result<ChildGuard> {
    let mut command = ns.command("dnsmasq");
    command.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--port=53",
        "--pid-file=",
        "--user=root",
        "--log-facility=-",
        "--log-queries",
    ]);
    command.arg(format!("--listen-address={listen}"));
    for (name, ip) in records {
        command.arg(format!("--address=/{name}/{ip}"));
    }
    let mut child = ChildGuard::spawn(format!("dnsmasq in {}", ns.name()), command)?;
    // Generous: on a loaded CI machine `ip netns exec` (a mount namespace per call) can take
    // seconds before dnsmasq itself runs.
    let bound = crate::process::wait_until(
        &format!("udp :53 in {}", ns.name()),
        Duration::from_secs(30),
        || {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("dnsmasq exited ({status})");
            }
            ns.udp_bound(53)
        },
    );
    if let Err(e) = bound {
        return Err(e.context(format!(
            "dnsmasq did not start ({}); log:\n{}",
            process_state(child.id()),
            child.log()
        )));
    }
    Ok(child)
}

/// What a process is doing (its state and kernel wait channel), for a failure message.
fn process_state(pid: u32) -> String {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{f}"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("<{e}>"))
    };
    let state = read("status")
        .lines()
        .find(|l| l.starts_with("State:"))
        .map(str::to_owned)
        .unwrap_or_default();
    format!(
        "pid {pid} {state}, wchan {}, cmdline {:?}",
        read("wchan"),
        read("cmdline").replace('\0', " ")
    )
}
