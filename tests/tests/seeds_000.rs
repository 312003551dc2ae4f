//! Seed 000 ("Manage access from in-cluster clients to external services"), step by step, on
//! the real ztunnel and waypoint in a [`SeedLab`]. Needs root (skipped loudly otherwise; fails
//! under CI=true).

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, ensure};
use mesh_tests::seedlab::{
    ALIYUN_IP, LOG_WAIT, SeedLab, apply_seed_000_waypoint, is_auto_vip, log_ip, run_seed_test,
    seeds,
};

const SE_FILE: &str = "istio-egress/external-svc-aliyun.yaml";

/// Istio's default JSON access-log fields (ANCHORS.md, "Telemetry shapes").
const ISTIO_LOG_FIELDS: [&str; 24] = [
    "start_time",
    "route_name",
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "response_code_details",
    "connection_termination_details",
    "bytes_received",
    "bytes_sent",
    "duration",
    "upstream_service_time",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "upstream_host",
    "upstream_cluster",
    "upstream_local_address",
    "downstream_local_address",
    "downstream_remote_address",
    "requested_server_name",
    "upstream_transport_failure_reason",
];

/// Step 1, and step 2 without step 3: the pod reaches aliyun.com itself (`Server: Tengine`),
/// also once a waypoint is deployed but no ServiceEntry sends traffic to it.
#[test]
fn s000_direct_access_before_the_service_entry() {
    run_seed_test(SeedLab::builder(), |lab| {
        let sleep_ip = lab.pod("sleep")?.ip().to_string();
        for stage in ["nothing applied", "waypoint deployed, no ServiceEntry"] {
            if stage != "nothing applied" {
                apply_seed_000_waypoint(lab)?;
            }
            let mark = lab.internet().http_log().len();
            let r = lab.curl("sleep", &["aliyun.com", "-s", "-I"])?;
            r.ensure_status(301).context(stage)?;
            r.ensure_direct().context(stage)?;
            ensure!(
                r.header("location") == Some("https://aliyun.com/")
                    && r.header("content-length") == Some("239"),
                "{stage}: {}",
                r.summary()
            );
            // The seed's Location, Content-Length 239, and the request came from the pod itself.
            let seen = lab.internet().wait_http_log(mark, LOG_WAIT, |e| {
                e["host"] == "aliyun.com" && e["method"] == "HEAD"
            })?;
            ensure!(
                seen["remote_addr"] == sleep_ip.as_str() && seen["server_port"] == "80",
                "{stage}: aliyun.com should see the sleep pod ({sleep_ip}) on :80, saw {seen}"
            );
        }
        let waypoint_log = lab.waypoint("waypoint")?.access_log();
        ensure!(
            waypoint_log.is_empty(),
            "nothing went through the waypoint yet, but it logged {waypoint_log:?}"
        );
        Ok(())
    });
}

/// Step 3: with the ServiceEntry, the same `curl` goes through the waypoint: `server: envoy`,
/// `x-envoy-upstream-service-time`, and the upstream sees the waypoint, not the pod.
#[test]
fn s000_through_the_waypoint_after_the_service_entry() {
    run_seed_test(SeedLab::builder(), |lab| {
        apply_seed_000_waypoint(lab)?;
        lab.apply(SE_FILE, seeds::S000_SERVICE_ENTRY)?;

        // aliyun.com now resolves, in the pod, to its auto-allocated VIP.
        let hosts = lab
            .pod("sleep")?
            .host()
            .exec_ok(&["getent", "ahostsv4", "aliyun.com"])?;
        let vip: IpAddr = hosts
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("getent printed {hosts:?}"))?;
        ensure!(
            is_auto_vip(vip),
            "aliyun.com resolved to {vip}, not a VIP in 240.240.0.0/16"
        );

        let mark = lab.internet().http_log().len();
        let r = lab.curl("sleep", &["aliyun.com", "-s", "-I"])?;
        r.ensure_status(301)?;
        r.ensure_via_waypoint()?;
        ensure!(
            r.header("location") == Some("https://aliyun.com/")
                && r.header("content-length") == Some("239"),
            "{}",
            r.summary()
        );
        let waypoint_ip = lab.waypoint("waypoint")?.ip().to_string();
        let seen = lab
            .internet()
            .wait_http_log(mark, LOG_WAIT, |e| e["host"] == "aliyun.com")?;
        ensure!(
            seen["remote_addr"] == waypoint_ip.as_str() && seen["server_port"] == "80",
            "aliyun.com should see the waypoint ({waypoint_ip}) on :80, saw {seen}"
        );
        Ok(())
    });
}

/// Step 3.3: the waypoint's access-log line for the request, with the fields the seed shows
/// and Istio's default field set.
#[test]
fn s000_waypoint_access_log_fields() {
    run_seed_test(SeedLab::builder(), |lab| {
        apply_seed_000_waypoint(lab)?;
        lab.apply(SE_FILE, seeds::S000_SERVICE_ENTRY)?;
        let waypoint = lab.waypoint("waypoint")?;
        let mark = waypoint.access_log().len();
        let r = lab.curl("sleep", &["aliyun.com", "-s"])?;
        r.ensure_status(301)?;
        ensure!(r.body.len() == 239, "body of {} bytes", r.body.len());

        let e = waypoint.wait_access_log(mark, LOG_WAIT, |_| true)?;
        let missing: Vec<&str> = ISTIO_LOG_FIELDS
            .iter()
            .copied()
            .filter(|f| e.get(f).is_none())
            .collect();
        ensure!(
            missing.is_empty(),
            "access log lacks Istio's fields {missing:?}: {e}"
        );
        let sleep_ip = IpAddr::V4(lab.pod("sleep")?.ip());
        let upstream = SocketAddr::new(IpAddr::V4(ALIYUN_IP), 80).to_string();
        let checks: [(&str, bool); 13] = [
            ("method GET", e["method"] == "GET"),
            ("path /", e["path"] == "/"),
            ("protocol HTTP/1.1", e["protocol"] == "HTTP/1.1"),
            ("response_code 301", e["response_code"] == 301),
            ("bytes_received 0", e["bytes_received"] == 0),
            ("bytes_sent 239", e["bytes_sent"] == 239),
            ("authority aliyun.com", e["authority"] == "aliyun.com"),
            ("route_name default", e["route_name"] == "default"),
            (
                "user_agent curl/*",
                e["user_agent"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("curl/")),
            ),
            (
                "upstream_cluster inbound-vip|80|http|aliyun.com",
                e["upstream_cluster"]
                    .as_str()
                    .is_some_and(|c| c.trim_end_matches(';') == "inbound-vip|80|http|aliyun.com"),
            ),
            (
                "upstream_host 203.0.113.10:80",
                e["upstream_host"] == upstream.as_str(),
            ),
            (
                "downstream_remote_address is the sleep pod",
                log_ip(&e, "downstream_remote_address") == Some(sleep_ip),
            ),
            (
                "downstream_local_address is aliyun.com's VIP:80",
                log_ip(&e, "downstream_local_address").is_some_and(is_auto_vip)
                    && e["downstream_local_address"]
                        .as_str()
                        .is_some_and(|a| a.ends_with(":80")),
            ),
        ];
        let failed: Vec<&str> = checks
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(what, _)| *what)
            .collect();
        ensure!(failed.is_empty(), "access log entry {e}: not {failed:?}");
        // duration and upstream_service_time are numbers of milliseconds (the latter printed
        // as a string, like Envoy prints a header value).
        ensure!(e["duration"].is_u64(), "duration {}", e["duration"]);
        ensure!(
            e["upstream_service_time"]
                .as_str()
                .is_some_and(|t| t.parse::<u64>().is_ok()),
            "upstream_service_time {}",
            e["upstream_service_time"]
        );
        Ok(())
    });
}

/// Step 4: `targetPort: 443` plus a DestinationRule `tls.mode: SIMPLE`: the application still
/// sends plain HTTP to port 80; the waypoint originates TLS to aliyun.com:443 with SNI
/// `aliyun.com`, verifying it against its system roots (the lab internet's CA).
#[test]
fn s000_http_to_https_upgrade_at_the_waypoint() {
    run_seed_test(SeedLab::builder(), |lab| {
        apply_seed_000_waypoint(lab)?;
        lab.apply(SE_FILE, seeds::S000_SERVICE_ENTRY)?;
        lab.apply(SE_FILE, seeds::S000_SERVICE_ENTRY_UPGRADE)?;
        lab.apply("istio-egress/aliyun-com.yaml", seeds::S000_DESTINATION_RULE)?;

        let waypoint = lab.waypoint("waypoint")?;
        let log_mark = waypoint.access_log().len();
        let up_mark = lab.internet().http_log().len();
        let r = lab.curl("sleep", &["aliyun.com", "-s", "-I"])?;
        r.ensure_status(301)?;
        r.ensure_via_waypoint()?;
        ensure!(
            r.header("location") == Some("https://aliyun.com/"),
            "{}",
            r.summary()
        );

        let seen = lab
            .internet()
            .wait_http_log(up_mark, LOG_WAIT, |e| e["host"] == "aliyun.com")?;
        let waypoint_ip = waypoint.ip().to_string();
        ensure!(
            seen["server_port"] == "443"
                && seen["scheme"] == "https"
                && seen["ssl_server_name"] == "aliyun.com"
                && seen["remote_addr"] == waypoint_ip.as_str(),
            "aliyun.com should see TLS on :443 with SNI aliyun.com from the waypoint ({waypoint_ip}), saw {seen}"
        );
        let e = waypoint.wait_access_log(log_mark, LOG_WAIT, |_| true)?;
        let upstream = SocketAddr::new(IpAddr::V4(ALIYUN_IP), 443).to_string();
        ensure!(
            e["upstream_host"] == upstream.as_str() && e["response_code"] == 301,
            "the access log should show {upstream}: {e}"
        );
        Ok(())
    });
}
