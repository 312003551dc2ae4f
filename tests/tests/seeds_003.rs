//! Seed 003 ("ASMEgressTrafficPolicy CRD description"): each YAML example applied verbatim to a
//! lab whose egress waypoint is `istio-egress/egressgateway-a`. Workloads named by a rule reach
//! their hosts through the waypoint; others are refused there. On the real ztunnel and waypoint
//! in a [`SeedLab`]; needs root (skipped loudly otherwise; fails under CI=true).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, ensure};
use mesh_tests::seedlab::{
    CurlRun, Expectations, LOG_WAIT, PodSpec, SeedLab, SeedLabBuilder, TCP_BY_IP, WaypointSpec,
    default_sleep, default_sleep_b, run_seed_test, seeds,
};

const POLICY_FILE: &str = "istio-egress/egress-by-egressgateway-a.yaml";
const GATEWAY: &str = "egressgateway-a";

fn waypoint() -> WaypointSpec {
    WaypointSpec::new("istio-egress", GATEWAY, Ipv4Addr::new(10, 244, 0, 20), true)
}

/// Examples 1 and 2: sleep-a and sleep-b in `mytest`.
fn mytest_lab() -> SeedLabBuilder {
    SeedLab::builder()
        .pods(vec![
            PodSpec::new(
                "sleep-a",
                "mytest",
                "sleep-a",
                Ipv4Addr::new(10, 244, 0, 12),
            ),
            PodSpec::new(
                "sleep-b",
                "mytest",
                "sleep-b",
                Ipv4Addr::new(10, 244, 0, 13),
            ),
        ])
        .waypoints(vec![waypoint()])
        .files(Vec::new())
}

/// Example 3: sleep (app=sleep) and sleep-b (app=sleep-b) in `default`.
fn default_lab() -> SeedLabBuilder {
    SeedLab::builder()
        .pods(vec![default_sleep(), default_sleep_b()])
        .waypoints(vec![waypoint()])
        .file("default/sleep.yaml", seeds::SLEEP)
}

fn apply_policy(lab: &SeedLab, yaml: &str) -> Result<()> {
    lab.apply(POLICY_FILE, yaml)?;
    lab.wait_waypoint_ready(GATEWAY, std::time::Duration::from_secs(15))
}

fn https(lab: &SeedLab, pod: &str, url: &str) -> Result<CurlRun> {
    let ca = lab.internet().ca_file().display().to_string();
    lab.curl(pod, &["-s", "--cacert", &ca, url])
}

/// The request was refused at the waypoint by the policy: 403, nothing reached the host.
fn ensure_denied(lab: &SeedLab, pod: &str, url: &str) -> Result<()> {
    let mark = lab.internet().http_log().len();
    let r = lab.curl(pod, &["-s", url])?;
    r.ensure_status(403)
        .with_context(|| format!("{pod} is not allowed {url} by the policy"))?;
    let reached: Vec<_> = lab.internet().http_log().into_iter().skip(mark).collect();
    ensure!(reached.is_empty(), "{pod} reached the host: {reached:?}");
    Ok(())
}

/// The host saw a request from the waypoint, on `port`, with `scheme` (and SNI `host` for https).
fn ensure_upstream_saw(
    lab: &SeedLab,
    mark: usize,
    host: &str,
    port: &str,
    scheme: &str,
) -> Result<()> {
    let waypoint_ip = lab.waypoint(GATEWAY)?.ip().to_string();
    let seen = lab
        .internet()
        .wait_http_log(mark, LOG_WAIT, |e| e["host"] == host)?;
    let sni_ok = scheme != "https" || seen["ssl_server_name"] == host;
    ensure!(
        seen["remote_addr"] == waypoint_ip.as_str()
            && seen["server_port"] == port
            && seen["scheme"] == scheme
            && sni_ok,
        "{host} should see {scheme} on :{port} from the waypoint ({waypoint_ip}): {seen}"
    );
    Ok(())
}

/// Example 1: sleep-a reaches httpbin.org and www.httpbin.org over HTTP through the waypoint;
/// sleep-b, not named by the rule, is refused.
#[test]
fn s003_http_rule_allows_sleep_a_and_refuses_sleep_b() {
    run_seed_test(mytest_lab(), |lab| {
        apply_policy(lab, seeds::S003_HTTP)?;
        let mut expect = Expectations::new();
        for host in ["httpbin.org", "www.httpbin.org"] {
            expect.check(
                &format!("sleep-a: http://{host}/ through the waypoint"),
                (|| {
                    let mark = lab.internet().http_log().len();
                    let r = lab.curl("sleep-a", &["-s", &format!("http://{host}/")])?;
                    r.ensure_status(200)?;
                    r.ensure_via_waypoint()?;
                    ensure_upstream_saw(lab, mark, host, "80", "http")
                })(),
            );
        }
        expect.check(
            "sleep-b: http://httpbin.org/ refused",
            ensure_denied(lab, "sleep-b", "http://httpbin.org/"),
        );
        expect.finish()
    });
}

/// Example 2: sleep-a's HTTP to httpbin.org is upgraded to HTTPS :443 at the waypoint; its
/// HTTPS to httpbin.org passes through; sleep-b's HTTPS to www.aliyun.com passes through; what
/// the rules do not name is refused.
#[test]
fn s003_https_upgrade_and_passthrough() {
    run_seed_test(mytest_lab(), |lab| {
        apply_policy(lab, seeds::S003_HTTPS_UPGRADE)?;
        let mut expect = Expectations::new();
        expect.check(
            "sleep-a: http://httpbin.org/ upgraded to HTTPS :443 at the waypoint",
            (|| {
                let mark = lab.internet().http_log().len();
                let r = lab.curl("sleep-a", &["-s", "http://httpbin.org/"])?;
                r.ensure_status(200)?;
                r.ensure_via_waypoint()?;
                ensure_upstream_saw(lab, mark, "httpbin.org", "443", "https")
            })(),
        );
        expect.check(
            "sleep-a: https://httpbin.org/ passes through the waypoint",
            (|| {
                let mark = lab.internet().http_log().len();
                let r = https(lab, "sleep-a", "https://httpbin.org/")?;
                r.ensure_status(200)?;
                ensure_upstream_saw(lab, mark, "httpbin.org", "443", "https")
            })(),
        );
        expect.check(
            "sleep-b: https://www.aliyun.com/ passes through the waypoint",
            (|| {
                let mark = lab.internet().http_log().len();
                let r = https(lab, "sleep-b", "https://www.aliyun.com/")?;
                r.ensure_status(200)?;
                ensure_upstream_saw(lab, mark, "www.aliyun.com", "443", "https")
            })(),
        );
        expect.check(
            "sleep-a: https://www.aliyun.com/ refused (only sleep-b's rule names it)",
            (|| {
                let mark = lab.internet().http_log().len();
                let r = https(lab, "sleep-a", "https://www.aliyun.com/")?;
                r.ensure_no_response()?;
                ensure!(
                    lab.internet().http_log().len() == mark,
                    "sleep-a reached www.aliyun.com"
                );
                Ok(())
            })(),
        );
        expect.check(
            "sleep-b: http://httpbin.org/ refused",
            ensure_denied(lab, "sleep-b", "http://httpbin.org/"),
        );
        expect.finish()
    });
}

/// Example 3 (ports assigned automatically): sleep reaches aliyun.com over HTTP and HTTPS,
/// taobao.com upgraded to HTTPS, and the TCP services by IP (1.1.1.1:44) and by name
/// (test-tcp.com:444), all through the waypoint; sleep-b is refused.
#[test]
fn s003_http_https_upgrade_and_tcp_services() {
    run_seed_test(default_lab(), |lab| {
        apply_policy(lab, seeds::S003_AUTO_PORTS)?;
        let waypoint_ip = IpAddr::V4(lab.waypoint(GATEWAY)?.ip());
        let mut expect = Expectations::new();
        expect.check(
            "sleep: http://aliyun.com through the waypoint",
            (|| {
                let mark = lab.internet().http_log().len();
                let r = lab.curl("sleep", &["-sI", "aliyun.com"])?;
                r.ensure_status(301)?;
                r.ensure_via_waypoint()?;
                ensure_upstream_saw(lab, mark, "aliyun.com", "80", "http")
            })(),
        );
        expect.check(
            "sleep: https://aliyun.com/ passes through the waypoint",
            (|| {
                let mark = lab.internet().http_log().len();
                let r = https(lab, "sleep", "https://aliyun.com/")?;
                r.ensure_status(301)?;
                ensure_upstream_saw(lab, mark, "aliyun.com", "443", "https")
            })(),
        );
        expect.check(
            "sleep: http://taobao.com/ upgraded to HTTPS :443",
            (|| {
                let mark = lab.internet().http_log().len();
                let r = lab.curl("sleep", &["-s", "http://taobao.com/"])?;
                r.ensure_status(200)?;
                r.ensure_via_waypoint()?;
                ensure_upstream_saw(lab, mark, "taobao.com", "443", "https")
            })(),
        );
        for (host, port) in [
            (TCP_BY_IP.to_string(), 44),
            ("test-tcp.com".to_owned(), 444),
        ] {
            expect.check(
                &format!("sleep: TCP {host}:{port} through the waypoint"),
                (|| {
                    let before = lab.internet().echo_connections().len();
                    let probe = lab.tcp_echo("sleep", &host, port)?;
                    ensure!(probe.echoed(), "no echo: {probe:?}");
                    let conns = lab.internet().echo_connections();
                    ensure!(
                        conns[before..].iter().any(|c| c.peer.ip() == waypoint_ip),
                        "should arrive from the waypoint ({waypoint_ip}): {conns:?}"
                    );
                    Ok(())
                })(),
            );
        }
        expect.check(
            "sleep-b: TCP 1.1.1.1:44 refused",
            (|| {
                let before = lab.internet().echo_connections().len();
                let probe = lab.tcp_echo("sleep-b", &TCP_BY_IP.to_string(), 44)?;
                ensure!(!probe.echoed(), "echoed: {probe:?}");
                ensure!(
                    lab.internet().echo_connections().len() == before,
                    "sleep-b reached 1.1.1.1:44"
                );
                Ok(())
            })(),
        );
        expect.check(
            "sleep-b: http://aliyun.com/ refused",
            ensure_denied(lab, "sleep-b", "http://aliyun.com/"),
        );
        expect.finish()
    });
}
