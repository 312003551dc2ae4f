//! ztunnel's process lifecycle on real network namespaces: the SIGTERM drain, and the startup
//! sweep of capture rules left in namespaces of pods that left the configuration while ztunnel
//! was down (kill -9, edit, start again).
//!
//! ```text
//!  client 10.244.1.10 (node-1) ─┐
//!  server 10.244.1.11 (node-1) ─┘ br0 (router ns)      server: nginx :80 serving files
//! ```
//!
//! Needs root (skipped loudly otherwise; fails under CI=true) and the ztunnel binary built
//! (`scripts/test` does it).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{
    ChildGuard, Host, Lab, Netns, Nginx, NginxConfig, lab_enabled, lab_test, require_tools,
    wait_until, workspace_bin,
};
use nix::sys::signal::Signal;

const CLIENT: &str = "10.244.1.10";
const SERVER: &str = "10.244.1.11";
const WAIT: Duration = Duration::from_secs(20);
/// Files the server pod's nginx serves.
const SMALL: usize = 1024;
const MEDIUM: usize = 1024 * 1024;
const LARGE: usize = 16 * 1024 * 1024;

const STATIC_YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    trustDomain: cluster.local
    outboundTrafficPolicy:
      mode: ALLOW_ANY
"#;

fn pod_yaml(name: &str, ip: &str, netns: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {name}}}\n  annotations:\n    strait.dev/netns: {}\nspec: {{nodeName: node-1, serviceAccountName: {name}}}\nstatus: {{podIP: {ip}}}\n",
        netns.display()
    )
}

/// Two pods of node-1, nginx serving three files from the server pod, a CA, a config dir and
/// a state dir.
struct LifecycleLab {
    client: Host,
    server: Host,
    _nginx: Nginx,
    _files: tempfile::TempDir,
    _lab: Lab,
    config: tempfile::TempDir,
    ca: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl LifecycleLab {
    fn new() -> Result<Self> {
        let lab = Lab::new()?;
        let client = lab.add_host("client", &format!("{CLIENT}/16"))?;
        let server = lab.add_host("server", &format!("{SERVER}/16"))?;
        let files = tempfile::tempdir()?;
        for (name, size) in [("small", SMALL), ("medium", MEDIUM), ("large", LARGE)] {
            std::fs::write(files.path().join(name), vec![b'x'; size])?;
        }
        let nginx = Nginx::start(
            &server,
            &NginxConfig::http(format!(
                // Paced by the server, so no buffer between ztunnel and curl holds much: a cut
                // reaches curl at once.
                "server {{ listen 80; location / {{ root {d}; }} \
                 location /fast/ {{ alias {d}/; limit_rate 256k; }} \
                 location /slow/ {{ alias {d}/; limit_rate 64k; }} }}",
                d = files.path().display()
            )),
        )?;
        server.wait_tcp(format!("{SERVER}:80").parse()?, WAIT)?;

        let ca = tempfile::tempdir()?;
        certs::CertificateAuthority::generate("cluster.local")?.write(ca.path())?;
        let config = tempfile::tempdir()?;
        let this = LifecycleLab {
            client,
            server,
            _nginx: nginx,
            _files: files,
            _lab: lab,
            config,
            ca,
            state: tempfile::tempdir()?,
        };
        this.write("static.yaml", STATIC_YAML)?;
        this.write(
            "client.yaml",
            &pod_yaml("client", CLIENT, this.client.path()),
        )?;
        this.write(
            "server.yaml",
            &pod_yaml("server", SERVER, this.server.path()),
        )?;
        if let Err(errs) = mesh_config::load_dir(this.config.path()) {
            bail!("test mesh does not compile:\n{errs}");
        }
        Ok(this)
    }

    fn write(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.config.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.config.path().join(file))?;
        Ok(())
    }

    fn ledger(&self) -> PathBuf {
        self.state.path().join("node-1.json")
    }
}

/// A ztunnel for node-1 with its loopback readiness port.
struct Ztunnel {
    child: ChildGuard,
    readiness: SocketAddr,
}

impl Ztunnel {
    fn start(lab: &LifecycleLab, drain_seconds: u32) -> Result<Self> {
        let [admin, metrics, readiness] = free_ports()?;
        let mut command = Command::new(workspace_bin("ztunnel")?);
        command
            .args(["--node", "node-1", "--config-dir"])
            .arg(lab.config.path())
            .arg("--ca-dir")
            .arg(lab.ca.path())
            .arg("--state-dir")
            .arg(lab.state.path())
            .args(["--dns-upstream", "127.0.0.1:53"])
            .args(["--admin", &admin.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .args(["--readiness", &readiness.to_string()])
            .args(["--drain-seconds", &drain_seconds.to_string()])
            .args(["--log-level", "info,ztunnel=debug,hickory_server=warn"]);
        let mut child = ChildGuard::spawn("ztunnel node-1", command)?;
        child.wait_for_log("ztunnel ready", WAIT)?;
        Ok(Ztunnel { child, readiness })
    }

    /// HTTP status of `/healthz/ready`; 0 when nothing answers.
    fn readiness_status(&self) -> Result<u16> {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--noproxy",
                "*",
            ])
            .args([
                "-m",
                "2",
                &format!("http://{}/healthz/ready", self.readiness),
            ])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0))
    }

    /// Polls for the exit until `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("ztunnel still running {timeout:?} later");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn free_ports() -> Result<[SocketAddr; 3]> {
    let listeners = [(); 3].map(|_| std::net::TcpListener::bind("127.0.0.1:0"));
    let mut out = Vec::new();
    for l in listeners {
        out.push(l?.local_addr()?);
    }
    Ok([out[0], out[1], out[2]])
}

/// `iptables-save -t nat` lines of `ns` that belong to ztunnel's capture.
fn strait_rules(ns: &Netns) -> Result<Vec<String>> {
    Ok(ns
        .exec_ok(&["iptables-save", "-t", "nat"])?
        .lines()
        .filter(|l| l.contains("STRAIT_"))
        .map(str::to_owned)
        .collect())
}

/// How many times the jump into our OUTPUT chain is installed (1 when captured, 0 when not).
fn output_jumps(ns: &Netns) -> Result<usize> {
    Ok(strait_rules(ns)?
        .iter()
        .filter(|l| *l == "-A OUTPUT -j STRAIT_OUTPUT")
        .count())
}

/// Listening TCP sockets on `port` inside `ns`.
fn listening(ns: &Netns, port: u16) -> Result<bool> {
    let filter = format!("sport = :{port}");
    Ok(!ns.exec_ok(&["ss", "-Hltn", &filter])?.trim().is_empty())
}

#[test]
fn sigterm_stops_accepting_and_lets_live_connections_finish() {
    if !lab_enabled() || !require_tools(&["nginx", "curl", "ss"]) {
        return;
    }
    lab_test(|| {
        let lab = LifecycleLab::new()?;
        // Long enough for the 4 s download, short enough that the 4-minute one is cut.
        let drain = Duration::from_secs(8);
        let mut zt = Ztunnel::start(&lab, 8)?;
        zt.child.wait_for_log("serving pod default/client", WAIT)?;
        zt.child.wait_for_log("serving pod default/server", WAIT)?;
        let url = |file: &str| format!("http://{SERVER}/{file}");
        let out = lab.client.curl(&["-m", "10", &url("small")])?;
        ensure!(
            out.status == 200 && out.body.len() == SMALL,
            "before SIGTERM: {out:?}"
        );
        ensure!(zt.readiness_status()? == 200, "ready before SIGTERM");

        // Two long transfers through both pods' ztunnel handlers (client outbound, HBONE,
        // server inbound): 1 MiB at 256 KiB/s finishes inside the drain period, 16 MiB at
        // 64 KiB/s cannot (nginx paces them).
        let finishing = spawn_curl(&lab.client, &url("fast/medium"));
        let cut = spawn_curl(&lab.client, &url("slow/large"));
        thread::sleep(Duration::from_millis(1500));
        let signalled = Instant::now();
        zt.child.signal(Signal::SIGTERM)?;

        // Readiness drops at once, and the listeners are closed in the pod.
        wait_until(
            "readiness 503 after SIGTERM",
            Duration::from_secs(3),
            || Ok(zt.readiness_status()? == 503),
        )?;
        wait_until(
            "listeners closed after SIGTERM",
            Duration::from_secs(4),
            || Ok(!listening(&lab.client, 15001)? && !listening(&lab.server, 15008)?),
        )?;
        // A new connection is not served: the rules stay (no unproxied escape) and nothing
        // listens behind them.
        let out = lab.client.curl(&["-m", "3", &url("small")])?;
        ensure!(
            out.status == 0 && out.exit_code != 0,
            "a connection opened after SIGTERM was served: {out:?}"
        );
        ensure!(
            output_jumps(&lab.client)? == 1,
            "rules must stay across shutdown"
        );
        ensure!(
            zt.child.try_wait()?.is_none(),
            "ztunnel must wait for live connections"
        );

        let finished = join(finishing)?;
        ensure!(
            finished.exit_code == 0 && finished.status == 200 && finished.bytes == MEDIUM,
            "the live transfer must complete across SIGTERM: exit {}, status {}, {} bytes, {}",
            finished.exit_code,
            finished.status,
            finished.bytes,
            finished.stderr
        );

        let status = zt.wait_exit(drain + Duration::from_secs(4))?;
        let took = signalled.elapsed();
        ensure!(status.success(), "exit after the drain: {status}");
        ensure!(
            took >= drain - Duration::from_millis(500),
            "exited after {took:?}, before the drain period ended, with a transfer still live"
        );
        let cut = join(cut)?;
        let cut_after = signalled.elapsed();
        ensure!(
            cut_after < took + Duration::from_secs(2),
            "the cut transfer lingered {cut_after:?} after SIGTERM (ztunnel exited after {took:?})"
        );
        // Reset, not closed: curl's 56 is a receive error (a FIN would be 18, partial file).
        ensure!(
            cut.exit_code == 56 && cut.bytes < LARGE,
            "the transfer outliving the drain period must be reset: exit {}, {} bytes, {}",
            cut.exit_code,
            cut.bytes,
            cut.stderr
        );
        ensure!(
            zt.child.log().contains("drain period over"),
            "the cut must be logged"
        );
        Ok(())
    });
}

/// What a background download got.
struct Download {
    exit_code: i32,
    status: u16,
    bytes: usize,
    stderr: String,
}

/// `curl <url>` inside `ns`, on its own thread.
fn spawn_curl(ns: &Host, url: &str) -> thread::JoinHandle<Result<Download>> {
    let mut command = ns.command("curl");
    command.args(["-sS", "-o", "/dev/null", "-m", "60"]);
    command.args(["-w", "%{http_code} %{size_download}", url]);
    thread::spawn(move || {
        let out = command.output().context("running curl")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut fields = stdout.split_whitespace();
        Ok(Download {
            exit_code: out.status.code().unwrap_or(-1),
            status: fields.next().and_then(|f| f.parse().ok()).unwrap_or(0),
            bytes: fields.next().and_then(|f| f.parse().ok()).unwrap_or(0),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    })
}

fn join(handle: thread::JoinHandle<Result<Download>>) -> Result<Download> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("curl thread panicked"))?
}

#[test]
fn rules_of_pods_removed_while_ztunnel_was_down_are_swept_at_start() {
    if !lab_enabled() || !require_tools(&["iptables-save"]) {
        return;
    }
    lab_test(|| {
        let lab = LifecycleLab::new()?;
        let mut zt = Ztunnel::start(&lab, 1)?;
        zt.child.wait_for_log("serving pod default/client", WAIT)?;
        zt.child.wait_for_log("serving pod default/server", WAIT)?;
        ensure!(output_jumps(&lab.server)? == 1 && output_jumps(&lab.client)? == 1);
        let ledger = std::fs::read_to_string(lab.ledger()).context("the ledger")?;
        ensure!(
            ledger.contains(&lab.server.path().display().to_string()),
            "server netns not recorded: {ledger}"
        );

        // kill -9: no chance to clean anything; then the server pod leaves the configuration.
        zt.child.signal(Signal::SIGKILL)?;
        zt.wait_exit(Duration::from_secs(5))?;
        ensure!(
            output_jumps(&lab.server)? == 1,
            "rules outlive a killed ztunnel"
        );
        std::fs::remove_file(lab.config.path().join("server.yaml"))?;

        let mut zt = Ztunnel::start(&lab, 1)?;
        zt.child.wait_for_log("serving pod default/client", WAIT)?;
        ensure!(
            strait_rules(&lab.server)?.is_empty(),
            "rules left in the removed pod's namespace: {:#?}\n{}",
            strait_rules(&lab.server)?,
            zt.child.log()
        );
        ensure!(
            zt.child
                .log()
                .contains("removed the capture rules of a pod no longer served"),
            "the sweep is logged"
        );
        ensure!(
            output_jumps(&lab.client)? == 1,
            "the served pod's rules once, not duplicated: {:#?}",
            strait_rules(&lab.client)?
        );
        let ledger = std::fs::read_to_string(lab.ledger())?;
        ensure!(
            !ledger.contains(&lab.server.path().display().to_string())
                && ledger.contains(&lab.client.path().display().to_string()),
            "ledger after the sweep: {ledger}"
        );
        let out = lab
            .client
            .curl(&["-m", "10", &format!("http://{SERVER}/small")])?;
        ensure!(
            out.status == 200,
            "client → unmeshed server after restart: {out:?}"
        );

        // A clean restart with the pod still there: same rules, once.
        let before = strait_rules(&lab.client)?;
        let status = zt.child.stop()?;
        ensure!(status.success(), "clean exit: {status}");
        let mut zt = Ztunnel::start(&lab, 1)?;
        zt.child.wait_for_log("serving pod default/client", WAIT)?;
        ensure!(
            strait_rules(&lab.client)? == before,
            "restart changed the rules: {:#?} → {:#?}",
            before,
            strait_rules(&lab.client)?
        );
        // A second ztunnel for the same node is refused before it touches anything.
        match Ztunnel::start(&lab, 1) {
            Ok(_) => bail!("a second ztunnel for node-1 started"),
            Err(error) => ensure!(
                format!("{error:#}").contains("another ztunnel for this node"),
                "{error:#}"
            ),
        }
        ensure!(output_jumps(&lab.client)? == 1);
        Ok(())
    });
}
