//! A mesh workload behind a waypoint, end to end on the real binaries: pod `client` → its
//! ztunnel → HBONE → waypoint → HBONE → ztunnel inbound on `<web pod>:15008` (inside the web
//! pod's namespace) → nginx in the web pod.
//!
//! ```text
//!  default/client 10.244.0.10 ──HBONE──▶ shop/waypoint 10.244.0.20 ──HBONE──▶ 10.244.0.30:15008
//!  curl web.shop.svc.cluster.local       (access log: upstream_host         ztunnel inbound ──▶
//!  (VIP 10.96.0.50:80)                    10.244.0.30:8080)                 nginx :8080 (shop/web)
//! ```
//!
//! The configuration is what a user would `kubectl apply`: the web Deployment's Service
//! (selector, `istio.io/use-waypoint: waypoint`), the waypoint Gateway in `shop`, and L4
//! AuthorizationPolicies on the web workload. Needs root (skipped loudly otherwise; fails
//! under CI=true), nginx, tcpdump and curl.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use mesh_tests::{
    Nginx, NginxConfig, require_tools,
    seedlab::{
        CurlRun, LOG_WAIT, PodSpec, SeedLab, SeedLabBuilder, WaypointSpec, log_ip, run_seed_test,
        seeds, tail,
    },
};
use serde_json::Value;

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const WAYPOINT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 30);
/// The web container's port (the Service's `targetPort`).
const WEB_PORT: u16 = 8080;
const HOST: &str = "web.shop.svc.cluster.local";
const WAYPOINT_PRINCIPAL: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
const CLIENT_PRINCIPAL: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const WEB_PRINCIPAL: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// What only the web app answers.
const APP_BANNER: &str = "strait-web-app";
/// Sent in the request path and echoed in the body: must never cross a wire in plaintext.
const MARKER: &str = "waypoint-mesh-upstream-5e1f7a";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The web app as a user deploys it. The clusterIP is the one the API server assigned (as
/// `kubectl get service web -o yaml` shows it): the mesh configuration carries it.
const WEB_YAML: &str = r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: web
  namespace: shop
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels:
    app: web
    istio.io/use-waypoint: waypoint
spec:
  clusterIP: 10.96.0.50
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 1
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      serviceAccountName: web
      containers:
      - name: web
        image: nginx
        ports:
        - containerPort: 8080
"#;

/// `istioctl waypoint generate -n shop`.
const WAYPOINT_YAML: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: shop
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"#;

const DENY_FILE: &str = "shop/deny-waypoint.yaml";
/// L4 (ztunnel-enforced) policy on the web workload refusing the waypoint's identity.
const DENY_WAYPOINT_YAML: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-waypoint
  namespace: shop
spec:
  selector:
    matchLabels:
      app: web
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/waypoint"]
"#;

const ALLOW_FILE: &str = "shop/allow-waypoint-only.yaml";
/// L4 policy on the web workload admitting nothing but the waypoint's identity.
const ALLOW_WAYPOINT_ONLY_YAML: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-waypoint-only
  namespace: shop
spec:
  selector:
    matchLabels:
      app: web
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/waypoint"]
"#;

/// `client` (sleep) in `default`, `web` in `shop`, the waypoint pod of `shop/waypoint`.
fn builder() -> SeedLabBuilder {
    SeedLab::builder()
        .pods(vec![
            PodSpec::new("client", "default", "sleep", CLIENT_IP),
            PodSpec::new("web", "shop", "web", WEB_IP),
        ])
        .waypoints(vec![WaypointSpec::new(
            "shop",
            "waypoint",
            WAYPOINT_IP,
            false,
        )])
        .files(vec![
            ("default/sleep.yaml".to_owned(), seeds::SLEEP.to_owned()),
            ("shop/web.yaml".to_owned(), WEB_YAML.to_owned()),
            ("shop/waypoint.yaml".to_owned(), WAYPOINT_YAML.to_owned()),
        ])
}

fn tools() -> bool {
    require_tools(&["nginx", "tcpdump", "curl"])
}

/// nginx in the web pod on :8080, answering with what it saw of the connection.
fn start_web(lab: &SeedLab) -> Result<Nginx> {
    let web = lab.pod("web")?;
    let nginx = Nginx::start(
        web.host(),
        &NginxConfig::http(format!(
            "server {{ listen {WEB_PORT}; location / {{ default_type text/plain; \
             return 200 \"{APP_BANNER} uri=$request_uri remote=$remote_addr\\n\"; }} }}"
        )),
    )?;
    // Loopback: the pod's own capture never sees it.
    web.host()
        .wait_tcp(SocketAddr::from(([127, 0, 0, 1], WEB_PORT)), READY_TIMEOUT)?;
    lab.wait_waypoint_ready("waypoint", READY_TIMEOUT)?;
    Ok(nginx)
}

/// Requests the service from the client pod.
fn get_service(lab: &SeedLab, path: &str) -> Result<CurlRun> {
    lab.curl("client", &["-m", "10", &format!("http://{HOST}{path}")])
}

/// Requests the app straight by pod IP from the client pod (no waypoint: only the Service is
/// bound to it).
fn get_pod(lab: &SeedLab) -> Result<CurlRun> {
    lab.curl(
        "client",
        &["-m", "10", &format!("http://{WEB_IP}:{WEB_PORT}/direct")],
    )
}

/// The web app answered (through its pod's ztunnel: the app sees its own pod address).
fn ensure_from_app(r: &CurlRun, path: &str) -> Result<()> {
    r.ensure_status(200)?;
    let want = format!("{APP_BANNER} uri={path} remote={WEB_IP}\n");
    ensure!(
        r.body_text() == want,
        "expected the web app's answer {want:?} (remote = its own pod address, as dialled by its \
         ztunnel; the waypoint is {WAYPOINT_IP}); {}, body {:?}",
        r.summary(),
        r.body_text()
    );
    Ok(())
}

/// Sum of the series of counter `name` carrying every `labels` pair.
fn counter(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Inbound HBONE connections the web pod's ztunnel accepted from the waypoint.
fn waypoint_inbound_opened(lab: &SeedLab) -> Result<f64> {
    Ok(counter(
        &lab.ztunnel().metrics()?,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", WAYPOINT_PRINCIPAL),
            ("destination_principal", WEB_PRINCIPAL),
            ("connection_security_policy", "mutual_tls"),
        ],
    ))
}

/// Requests nginx in the web pod has logged.
fn app_requests(nginx: &Nginx) -> usize {
    std::fs::read_to_string(nginx.access_log())
        .unwrap_or_default()
        .lines()
        .count()
}

/// Waits for the waypoint's access-log entry of the request to `path`.
fn waypoint_entry(lab: &SeedLab, mark: usize, path: &str) -> Result<Value> {
    lab.waypoint("waypoint")?
        .wait_access_log(mark, LOG_WAIT, |e| e["path"] == path)
}

fn web_endpoint() -> String {
    format!("{WEB_IP}:{WEB_PORT}")
}

/// The waypoint logged a 200 from the web pod's address and target port.
fn ensure_waypoint_forwarded(e: &Value) -> Result<()> {
    ensure!(
        e["response_code"] == 200 && e["upstream_host"] == web_endpoint().as_str(),
        "the waypoint's log should show 200 from upstream_host {}: {e}",
        web_endpoint()
    );
    Ok(())
}

/// Step 1: the request reaches the web app through the waypoint; the waypoint reached the pod
/// over HBONE as itself, and nothing but HBONE crossed the web pod's interface.
#[test]
fn client_reaches_the_pod_behind_the_waypoint_over_hbone() {
    if !tools() {
        return;
    }
    run_seed_test(builder(), |lab| {
        let nginx = start_web(lab)?;
        let web = lab.pod("web")?;
        let waypoint = lab.waypoint("waypoint")?;

        // Everything on the web pod's interface while the request runs.
        let pcap = tempfile::Builder::new().suffix(".pcap").tempfile()?;
        let pcap_path = pcap.path().display().to_string();
        let mut dump = web.host().spawn(&[
            "tcpdump",
            "-Z",
            "root",
            "--immediate-mode",
            "-i",
            "eth0",
            "-U",
            "-n",
            "-w",
            &pcap_path,
            "tcp",
        ])?;
        dump.wait_for_log("listening on", READY_TIMEOUT)?;

        let opened_before = waypoint_inbound_opened(lab)?;
        let mark = waypoint.access_log().len();
        let path = format!("/{MARKER}");
        let r = get_service(lab, &path)?;
        ensure_from_app(&r, &path)?;
        r.ensure_via_waypoint()?;

        // The waypoint: the pod's ip:targetPort as upstream, 200, for the client.
        let e = waypoint_entry(lab, mark, &path)?;
        ensure_waypoint_forwarded(&e)?;
        ensure!(e["authority"] == HOST, "authority: {e}");
        ensure!(
            e["upstream_cluster"]
                .as_str()
                .is_some_and(|c| c.contains(HOST)),
            "upstream_cluster should name {HOST}: {e}"
        );

        // The web pod's ztunnel accepted an mTLS tunnel whose peer is the waypoint.
        let opened_after = waypoint_inbound_opened(lab)?;
        ensure!(
            opened_after > opened_before,
            "ztunnel counted no inbound mutual_tls connection from {WAYPOINT_PRINCIPAL} to \
             {WEB_PRINCIPAL} (before {opened_before}, after {opened_after}); metrics:\n{}",
            lab.ztunnel()
                .metrics()?
                .lines()
                .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );

        // On the wire: waypoint ↔ web only on 15008, never the app port, never the marker.
        std::thread::sleep(Duration::from_millis(300));
        dump.stop()?;
        let captured = std::fs::read(pcap.path())?;
        let pair = format!("host {WAYPOINT_IP} and host {WEB_IP}");
        let read = |filter: &str| {
            web.host()
                .exec_ok(&["tcpdump", "-r", &pcap_path, "-n", filter])
        };
        let hbone = read(&format!("{pair} and tcp port 15008"))?;
        ensure!(
            hbone.lines().count() > 4,
            "no HBONE between the waypoint and the web pod in the capture ({} bytes):\n{hbone}\n\
             tcpdump log:\n{}",
            captured.len(),
            dump.log()
        );
        let other = read(&format!("{pair} and not tcp port 15008"))?;
        ensure!(
            other.trim().is_empty(),
            "waypoint ↔ web traffic outside HBONE:\n{other}"
        );
        let app_port = read(&format!("tcp port {WEB_PORT}"))?;
        ensure!(
            app_port.trim().is_empty(),
            "the app port was reached over the wire (plaintext):\n{app_port}"
        );
        ensure!(
            !captured
                .windows(MARKER.len())
                .any(|w| w == MARKER.as_bytes()),
            "the request path crossed the web pod's interface in plaintext"
        );
        ensure!(app_requests(&nginx) == 1, "the app served one request");
        Ok(())
    });
}

/// Step 2: a DENY of the waypoint's principal on the web workload (enforced by the web pod's
/// ztunnel) makes the waypoint's tunnel fail (CONNECT answered 401) and the client get 503;
/// deleting the policy (hot reload) lets requests through again.
#[test]
fn l4_deny_of_the_waypoint_principal_fails_the_request_until_removed() {
    if !tools() {
        return;
    }
    run_seed_test(builder(), |lab| {
        let nginx = start_web(lab)?;
        // Before any request: no tunnel to the pod exists yet (see the pooled-tunnel test).
        lab.apply(DENY_FILE, DENY_WAYPOINT_YAML)?;
        let waypoint = lab.waypoint("waypoint")?;
        let zt_mark = lab.ztunnel().connection_log().len();
        let mark = waypoint.access_log().len();

        let r = get_service(lab, "/denied")?;
        r.ensure_status(503)?;
        ensure!(
            r.body_text()
                .starts_with("upstream connect error or disconnect/reset before headers"),
            "the waypoint's local reply: {}, body {:?}",
            r.summary(),
            r.body_text()
        );
        let e = waypoint_entry(lab, mark, "/denied")?;
        let flags: Vec<&str> = e["response_flags"]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .collect();
        ensure!(
            e["response_code"] == 503 && flags.contains(&"UF"),
            "the waypoint should log 503 UF: {e}"
        );
        ensure!(
            e["upstream_transport_failure_reason"]
                .as_str()
                .is_some_and(|r| r.contains(&web_endpoint()) && r.contains("answered 401")),
            "the failure reason should name the CONNECT to {} refused with 401: {e}",
            web_endpoint()
        );
        ensure!(
            log_ip(&e, "upstream_host") == Some(IpAddr::V4(WEB_IP)),
            "upstream_host: {e}"
        );

        // The web pod's ztunnel refused the waypoint by that policy.
        let denied = lab.ztunnel().wait_connection_log(zt_mark, LOG_WAIT, |l| {
            l["direction"] == "inbound" && l["outcome"] == "denied"
        })?;
        ensure!(
            denied["src_identity"] == WAYPOINT_PRINCIPAL
                && denied["dst_addr"] == web_endpoint().as_str()
                && denied["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("shop/deny-waypoint")),
            "the denied inbound connection should be the waypoint's, by shop/deny-waypoint: \
             {denied}"
        );
        ensure!(
            app_requests(&nginx) == 0,
            "the app must not see a denied request"
        );

        // Removed: the next request goes through.
        lab.delete(DENY_FILE)?;
        let mark = waypoint.access_log().len();
        let r = get_service(lab, "/allowed-again")?;
        ensure_from_app(&r, "/allowed-again")?;
        ensure_waypoint_forwarded(&waypoint_entry(lab, mark, "/allowed-again")?)?;
        Ok(())
    });
}

/// Step 3: an ALLOW for the waypoint's principal alone admits the request through the waypoint
/// (at the destination the L4 peer is the waypoint, not the original client), while the same
/// policy refuses the client dialling the pod directly.
#[test]
fn l4_allow_of_only_the_waypoint_principal_admits_waypoint_traffic() {
    if !tools() {
        return;
    }
    run_seed_test(builder(), |lab| {
        let nginx = start_web(lab)?;
        lab.apply(ALLOW_FILE, ALLOW_WAYPOINT_ONLY_YAML)?;
        let waypoint = lab.waypoint("waypoint")?;

        let mark = waypoint.access_log().len();
        let opened_before = waypoint_inbound_opened(lab)?;
        let r = get_service(lab, "/via-waypoint")?;
        ensure_from_app(&r, "/via-waypoint")?;
        ensure_waypoint_forwarded(&waypoint_entry(lab, mark, "/via-waypoint")?)?;
        ensure!(
            waypoint_inbound_opened(lab)? > opened_before,
            "the admitted connection should be the waypoint's"
        );

        // The policy is in force: the client's own identity is not admitted.
        let zt_mark = lab.ztunnel().connection_log().len();
        let served = app_requests(&nginx);
        let r = get_pod(lab)?;
        r.ensure_no_response()
            .context("the client dialling the pod directly must be refused")?;
        let denied = lab.ztunnel().wait_connection_log(zt_mark, LOG_WAIT, |l| {
            l["direction"] == "inbound" && l["outcome"] == "denied"
        })?;
        ensure!(
            denied["src_identity"] == CLIENT_PRINCIPAL
                && denied["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("matched no ALLOW")),
            "the client's direct connection should be denied for matching no ALLOW: {denied}"
        );
        ensure!(
            app_requests(&nginx) == served,
            "the app must not see the refused request"
        );
        Ok(())
    });
}

/// A DENY applied while the waypoint holds a pooled tunnel to the pod must apply to the next
/// request too: Istio's ztunnel re-checks live inbound connections when policies change and
/// closes those no longer allowed (`PolicyWatcher` in its `proxy/connection_manager.rs`), so
/// the waypoint cannot keep using a tunnel the destination has since refused.
#[test]
fn l4_deny_applied_after_traffic_also_stops_pooled_tunnels() {
    if !tools() {
        return;
    }
    run_seed_test(builder(), |lab| {
        let nginx = start_web(lab)?;
        let waypoint = lab.waypoint("waypoint")?;
        let r = get_service(lab, "/before-deny")?;
        ensure_from_app(&r, "/before-deny")?;

        lab.apply(DENY_FILE, DENY_WAYPOINT_YAML)?;
        let served = app_requests(&nginx);
        let mark = waypoint.access_log().len();
        let r = get_service(lab, "/after-deny")?;
        let e = waypoint_entry(lab, mark, "/after-deny")?;
        ensure!(
            r.status == 503 && e["response_code"] == 503,
            "a request after the DENY must be refused, not carried by the tunnel opened before \
             it; {}; waypoint log: {e}; app log:\n{}",
            r.summary(),
            tail(
                &std::fs::read_to_string(nginx.access_log()).unwrap_or_default(),
                5
            )
        );
        ensure!(
            app_requests(&nginx) == served,
            "the app must not see a request after the DENY"
        );
        Ok(())
    });
}
