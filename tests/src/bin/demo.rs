//! `sudo scripts/demo`: seed 000 ("Manage access from in-cluster clients to external
//! services") end to end on a [`SeedLab`], printing what a person would type and what came back.
//!
//! Every expectation the seed documents is checked; the exit status is non-zero if any fails,
//! so the demo doubles as a check. The lab is torn down on exit, also on failure or Ctrl-C.
//!
//! Flags: `--pause` keeps the lab up at the end (until Ctrl-C) to look around.

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use mesh_tests::seedlab::{
    self, ALIYUN_IP, MOVED_BODY, SeedLab, USE_WAYPOINT_LABEL, WAYPOINT_ADMIN, is_auto_vip, log_ip,
    seeds,
};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use serde_json::Value;

/// `println!` that ignores a closed stdout (`demo | head`): panicking there would unwind
/// through the lab's guards while they print to the same closed pipe, and abort the tear-down.
macro_rules! say {
    () => {
        say!("")
    };
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` counterpart of [`say!`].
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// Set by SIGINT / SIGTERM; checked between steps so the lab's guards tear everything down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

const USAGE: &str = "usage: demo [--pause]\n\n\
Runs seed 000 end to end in a lab of network namespaces (needs root; build first with\n\
`cargo build --workspace --bins`, or run `sudo scripts/demo`, which does).\n\n\
  --pause   keep the lab up at the end, until Ctrl-C, to look around\n";

const WAYPOINT: &str = "waypoint";
const SE_FILE: &str = "istio-egress/external-svc-aliyun.yaml";
const GATEWAY_FILE: &str = "istio-egress/waypoint.yaml";
const DR_FILE: &str = "istio-egress/aliyun-com.yaml";
const LOG_WAIT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let mut pause = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--pause" => pause = true,
            "-h" | "--help" => {
                say_raw!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprint!("demo: unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("demo: needs root (network namespaces, iptables inside them): sudo scripts/demo");
        return ExitCode::from(2);
    }
    if !mesh_tests::require_tools(&["ip", "nginx", "dnsmasq", "curl", "bash", "ss"]) {
        return ExitCode::from(2);
    }
    let handler = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { sigaction(signal, &handler) } {
            eprintln!("demo: cannot install the {signal} handler: {e}");
            return ExitCode::from(2);
        }
    }

    let mut demo = Demo::default();
    let outcome = demo.run(pause);
    say!();
    match outcome {
        Ok(()) if demo.failures.is_empty() => {
            say!(
                "All {} expectations of seed 000 held. The lab is gone.",
                demo.passed
            );
            ExitCode::SUCCESS
        }
        Ok(()) => {
            say!(
                "{} of {} expectations FAILED:",
                demo.failures.len(),
                demo.passed + demo.failures.len()
            );
            for f in &demo.failures {
                say!("  ✗ {f}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            say!("The demo stopped: {e:#}");
            for f in &demo.failures {
                say!("  ✗ {f}");
            }
            ExitCode::FAILURE
        }
    }
}

#[derive(Default)]
struct Demo {
    passed: usize,
    failures: Vec<String>,
}

impl Demo {
    fn run(&mut self, pause: bool) -> Result<()> {
        section("strait demo — seed 000: egress from pods through a waypoint");
        say!(
            "Building the lab: a node (ztunnel), pods, a waypoint and an \"internet\", all in network namespaces."
        );
        let mut builder = SeedLab::builder();
        if let Some(dir) = sibling_bin_dir() {
            builder = builder.bin_dir(dir);
        }
        let lab = builder.start().context("starting the lab")?;
        let outcome = self.walk(&lab, pause);
        if let Err(e) = &outcome {
            say!("\n{e:#}\n\n{}", lab.diagnostics());
        }
        say!("\nTearing the lab down…");
        drop(lab);
        outcome
    }

    fn walk(&mut self, lab: &SeedLab, pause: bool) -> Result<()> {
        describe(lab);
        checkpoint()?;

        // ---- Step 1 ----
        section("Step 1: the sleep application reaches aliyun.com directly");
        say!(
            "kubectl apply -f sleep.yaml   (the seed's manifest, in the lab's config at default/sleep.yaml;"
        );
        say!(
            "                               the lab runs its pod: sleep, 10.244.0.10, netns {})",
            lab.pod("sleep")?.host().name()
        );
        let before = self.curl_aliyun(lab)?;
        self.check(before.status == 301, "HTTP/1.1 301 Moved Permanently");
        self.check(
            before.header("server") == Some("Tengine"),
            "Server: Tengine — the request reached the external service directly",
        );
        self.check(
            before.header("location") == Some("https://aliyun.com/"),
            "Location: https://aliyun.com/",
        );
        self.check(
            before.header("content-length") == Some(&MOVED_BODY.len().to_string()),
            "Content-Length: 239",
        );
        self.check(
            before.header("x-envoy-upstream-service-time").is_none(),
            "no x-envoy-upstream-service-time (no waypoint on the path)",
        );
        checkpoint()?;

        // ---- Step 2 ----
        section("Step 2: a waypoint in the istio-egress namespace");
        show_apply("istio-egress", seeds::S000_WAYPOINT_GATEWAY);
        lab.apply(GATEWAY_FILE, seeds::S000_WAYPOINT_GATEWAY)?;
        say!("$ kubectl label namespace istio-egress istio.io/use-waypoint=waypoint --overwrite");
        lab.label_namespace("istio-egress", USE_WAYPOINT_LABEL, Some(WAYPOINT))?;
        let ready = lab.wait_waypoint_ready(WAYPOINT, Duration::from_secs(15));
        self.check(
            ready.is_ok(),
            &format!(
                "the waypoint reports ready{}",
                ready
                    .as_ref()
                    .err()
                    .map(|e| format!(" ({e:#})"))
                    .unwrap_or_default()
            ),
        );
        checkpoint()?;

        // ---- Step 3 ----
        section(
            "Step 3: register aliyun.com (ServiceEntry) — traffic now flows through the waypoint",
        );
        show_apply("istio-egress", seeds::S000_SERVICE_ENTRY);
        lab.apply(SE_FILE, seeds::S000_SERVICE_ENTRY)?;
        let waypoint = lab.waypoint(WAYPOINT)?;
        let log_mark = waypoint.access_log().len();
        let up_mark = lab.internet().http_log().len();
        let through = self.curl_aliyun(lab)?;
        self.check(through.status == 301, "HTTP/1.1 301 Moved Permanently");
        self.check(
            through.header("server") == Some("envoy"),
            "server: envoy — the waypoint answered",
        );
        self.check(
            through
                .header("x-envoy-upstream-service-time")
                .is_some_and(|v| v.parse::<u64>().is_ok()),
            "x-envoy-upstream-service-time: <ms>",
        );
        self.check(
            through.header("content-length") == Some("239"),
            "content-length: 239",
        );
        self.check(
            through.header("location") == Some("https://aliyun.com/"),
            "location: https://aliyun.com/",
        );
        let wp_ip = IpAddr::V4(waypoint.ip());
        let seen = lab.internet().wait_http_log(up_mark, LOG_WAIT, |e| {
            e["host"] == "aliyun.com" && e["server_port"] == "80"
        });
        self.check(
            matches!(&seen, Ok(e) if e["remote_addr"] == wp_ip.to_string()),
            &format!("aliyun.com saw the request coming from the waypoint ({wp_ip}) on port 80"),
        );

        say!("\n$ kubectl -n istio-egress logs deployments/waypoint | tail -1 | jq");
        let entry = waypoint.wait_access_log(log_mark, LOG_WAIT, |_| true);
        match &entry {
            Ok(entry) => say!("{}", pretty(entry)),
            Err(e) => say!("(no access-log entry: {e:#})"),
        }
        let entry = entry.unwrap_or(Value::Null);
        self.check(entry["response_code"] == 301, "response_code: 301");
        self.check(
            entry["upstream_cluster"]
                .as_str()
                .is_some_and(|c| c.starts_with("inbound-vip|80|http|aliyun.com")),
            "upstream_cluster: inbound-vip|80|http|aliyun.com",
        );
        let upstream_80 = SocketAddr::new(IpAddr::V4(ALIYUN_IP), 80).to_string();
        self.check(
            entry["upstream_host"] == upstream_80.as_str(),
            &format!("upstream_host: {upstream_80} (aliyun.com, port 80)"),
        );
        self.check(
            log_ip(&entry, "downstream_remote_address") == Some(IpAddr::V4(lab.pod("sleep")?.ip())),
            "downstream_remote_address: the sleep pod",
        );
        self.check(
            log_ip(&entry, "downstream_local_address").is_some_and(is_auto_vip),
            "downstream_local_address: aliyun.com's VIP (240.240.0.0/16) port 80",
        );
        checkpoint()?;

        // ---- Step 4 ----
        section("Step 4: upgrade HTTP to HTTPS at the waypoint");
        show_apply("istio-egress", seeds::S000_SERVICE_ENTRY_UPGRADE);
        lab.apply(SE_FILE, seeds::S000_SERVICE_ENTRY_UPGRADE)?;
        show_apply("istio-egress", seeds::S000_DESTINATION_RULE);
        lab.apply(DR_FILE, seeds::S000_DESTINATION_RULE)?;
        say!(
            "(The DestinationRule has no caCertificates: the waypoint verifies aliyun.com against its\n \
             system roots, which in the lab are the lab internet's CA: SSL_CERT_FILE={})",
            lab.internet().ca_file().display()
        );
        let log_mark = waypoint.access_log().len();
        let up_mark = lab.internet().http_log().len();
        let upgraded = self.curl_aliyun(lab)?;
        self.check(upgraded.status == 301, "HTTP/1.1 301 Moved Permanently");
        self.check(upgraded.header("server") == Some("envoy"), "server: envoy");
        self.check(
            upgraded.header("x-envoy-upstream-service-time").is_some(),
            "x-envoy-upstream-service-time present",
        );
        self.check(
            upgraded.header("location") == Some("https://aliyun.com/"),
            "location: https://aliyun.com/",
        );
        say!("\n$ kubectl -n istio-egress logs deployments/waypoint | tail -1 | jq");
        let entry = waypoint.wait_access_log(log_mark, LOG_WAIT, |_| true);
        match &entry {
            Ok(entry) => say!("{}", pretty(entry)),
            Err(e) => say!("(no access-log entry: {e:#})"),
        }
        let entry = entry.unwrap_or(Value::Null);
        let upstream_443 = SocketAddr::new(IpAddr::V4(ALIYUN_IP), 443).to_string();
        self.check(
            entry["upstream_host"] == upstream_443.as_str(),
            &format!("upstream_host: {upstream_443} — forwarded to port 443 instead of 80"),
        );
        let seen = lab.internet().wait_http_log(up_mark, LOG_WAIT, |e| {
            e["host"] == "aliyun.com" && e["server_port"] == "443"
        });
        if let Ok(seen) = &seen {
            say!(
                "\naliyun.com's own log: {}",
                serde_json::to_string(seen).unwrap_or_default()
            );
        }
        self.check(
            matches!(&seen, Ok(e) if e["scheme"] == "https" && e["ssl_server_name"] == "aliyun.com"),
            "aliyun.com saw TLS on port 443 with SNI aliyun.com",
        );
        checkpoint()?;

        // ---- Where next ----
        section("Where to look next (while the lab runs)");
        let zt = lab.ztunnel();
        say!("ztunnel metrics:      curl -s {}", zt.metrics_url());
        say!(
            "ztunnel config dump:  curl -s {} | jq",
            zt.admin_url("/config_dump")
        );
        let ns = waypoint.host().name();
        say!(
            "waypoint metrics:     ip netns exec {ns} curl -s http://{WAYPOINT_ADMIN}/stats/prometheus"
        );
        say!(
            "waypoint config dump: ip netns exec {ns} curl -s http://{WAYPOINT_ADMIN}/config_dump | jq"
        );
        say!(
            "mesh configuration:   {}  (edit a file: both proxies reload it)",
            lab.config_dir().display()
        );
        say!(
            "a shell in the pod:   ip netns exec {} bash",
            lab.pod("sleep")?.host().name()
        );
        if let Ok((200, metrics)) = waypoint.admin_get("/stats/prometheus") {
            let requests: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("istio_requests_total"))
                .take(3)
                .collect();
            if !requests.is_empty() {
                say!("\nFrom the waypoint's metrics:");
                for line in requests {
                    say!("  {line}");
                }
            }
        }
        if pause {
            say!("\nThe lab is up. Press Ctrl-C to tear it down.");
            while !INTERRUPTED.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// `kubectl exec deployment/sleep -- curl aliyun.com -s -I`, shown and run.
    fn curl_aliyun(&mut self, lab: &SeedLab) -> Result<seedlab::CurlRun> {
        say!("\n$ kubectl exec deployment/sleep -- curl aliyun.com -s -I");
        let run = lab.curl("sleep", &["aliyun.com", "-s", "-I"])?;
        say!("  (in the lab: {})", run.command);
        if run.raw_headers.trim().is_empty() {
            say!(
                "(no response: curl exit code {}; {})",
                run.exit_code,
                run.stderr.trim()
            );
        } else {
            say_raw!("{}", run.raw_headers.replace("\r\n", "\n"));
        }
        Ok(run)
    }

    fn check(&mut self, ok: bool, what: &str) {
        if ok {
            self.passed += 1;
            say!("  ✓ {what}");
        } else {
            self.failures.push(what.to_owned());
            say!("  ✗ EXPECTED: {what}");
        }
    }
}

fn describe(lab: &SeedLab) {
    say!(
        "  node {}: ztunnel (root netns) — {}",
        lab.node(),
        lab.ztunnel().command_line()
    );
    for pod in lab.pods() {
        let s = pod.spec();
        say!(
            "  pod {}/{} (sa {}) {} — netns {}",
            s.namespace,
            s.name,
            s.service_account,
            s.ip,
            pod.host().name()
        );
    }
    for w in lab.waypoints() {
        say!(
            "  waypoint pod for Gateway {} {} — {}",
            w.spec().gateway(),
            w.ip(),
            w.command_line()
        );
    }
    say!(
        "  internet (netns {}): nginx as aliyun.com 203.0.113.10, www.aliyun.com .11, httpbin.org .12, taobao.com .13; dnsmasq 203.0.113.53",
        lab.internet().host().name()
    );
    say!("  mesh config: {}", lab.config_dir().display());
}

fn show_apply(namespace: &str, yaml: &str) {
    say!("\n$ kubectl apply -n {namespace} -f - <<EOF\n{}EOF", yaml);
}

fn section(title: &str) {
    say!("\n=== {title}");
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn checkpoint() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The directory of this executable when `ztunnel` and `waypoint` were built next to it.
fn sibling_bin_dir() -> Option<std::path::PathBuf> {
    let dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
    (dir.join("ztunnel").is_file() && dir.join("waypoint").is_file()).then_some(dir)
}
