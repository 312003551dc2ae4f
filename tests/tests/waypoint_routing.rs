//! VirtualService routing at the waypoint: faults (seed 002's 5 s delay, aborts), weighted
//! splits, timeouts, retries, mirrors, header operations, rewrites and redirects — all through
//! the real binary, HBONE in, nginx out.

mod waypoint_lab;

use std::time::Duration;

use anyhow::Context;
use waypoint_lab::{LabConfig, WaypointLab, field, lab_case};

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: istio-egress}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  http:
  - name: delay
    match: [{uri: {prefix: /delay}}]
    fault: {delay: {percentage: {value: 100}, fixedDelay: 5s}}
    rewrite: {uri: /ok}
    route: [{destination: {host: aliyun.com}}]
  - name: abort
    match: [{uri: {prefix: /abort}}]
    fault: {abort: {percentage: {value: 100}, httpStatus: 418}}
    route: [{destination: {host: aliyun.com}}]
  - name: split
    match: [{uri: {prefix: /split}}]
    route:
    - {destination: {host: aliyun.com}, weight: 70}
    - {destination: {host: httpbin.org}, weight: 30}
  - name: timeout
    match: [{uri: {prefix: /slow}}]
    timeout: 1s
    retries: {attempts: 0}
    route: [{destination: {host: aliyun.com}}]
  - name: mirror
    match: [{uri: {prefix: /mirror}}]
    mirror: {host: httpbin.org}
    mirrorPercentage: {value: 100}
    rewrite: {uri: /ok}
    route: [{destination: {host: aliyun.com}}]
  - name: headers
    match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /headers/}
    headers:
      request:
        set: {x-added: "yes"}
        remove: [x-removed]
      response:
        add: {x-resp: "1"}
    route: [{destination: {host: aliyun.com}}]
  - name: redirect
    match: [{uri: {exact: /go}}]
    redirect: {uri: /gone, authority: example.org, redirectCode: 302}
  - name: rest
    route: [{destination: {host: aliyun.com}}]
"#;

fn lab() -> anyhow::Result<WaypointLab> {
    WaypointLab::start(LabConfig::new(ROUTES, &["aliyun.com:80"]))
}

#[test]
fn seed_002_five_second_delay_shows_at_curl() {
    lab_case(|| {
        let lab = lab()?;
        let out = lab.curl(0, "http://aliyun.com/delay", &[])?;
        assert_eq!(out.status, 200, "{out:?}");
        let t = out.time_total;
        assert!(
            // Upper bound with slack for a loaded machine; far below two delays.
            t >= Duration::from_millis(4500) && t <= Duration::from_millis(7000),
            "seed 002: ~5 s at curl, got {t:?}"
        );
        let e = lab.wait_log(0, |e| field(e, "route_name") == "delay")?;
        assert_eq!(field(&e, "response_flags"), "DI");
        Ok(())
    });
}

#[test]
fn abort_timeout_redirect_headers_rewrite() {
    lab_case(|| {
        let lab = lab()?;
        // Abort.
        let out = lab.curl(0, "http://aliyun.com/abort", &[])?;
        assert_eq!(out.status, 418, "{out:?}");
        assert_eq!(out.header("server"), Some("envoy"));
        let e = lab.wait_log(0, |e| field(e, "route_name") == "abort")?;
        assert_eq!(field(&e, "response_flags"), "FI");
        assert!(
            !lab.nginx_log().contains("/abort"),
            "aborted requests never reach the upstream"
        );

        // Timeout: nginx sleeps 3 s, the route allows 1 s.
        let out = lab.curl(0, "http://aliyun.com/slow", &[])?;
        assert_eq!(out.status, 504, "{out:?}");
        assert_eq!(out.body_text(), "upstream request timeout");
        assert!(
            out.time_total < Duration::from_millis(2800),
            "{:?}",
            out.time_total
        );
        let e = lab.wait_log(0, |e| field(e, "route_name") == "timeout")?;
        assert_eq!(field(&e, "response_flags"), "UT");

        // Redirect answered by the waypoint.
        let out = lab.curl(0, "http://aliyun.com/go?x=1", &[])?;
        assert_eq!(out.status, 302, "{out:?}");
        assert_eq!(out.header("location"), Some("http://example.org/gone?x=1"));

        // Rewrite + request/response header operations.
        let out = lab.curl(0, "http://aliyun.com/api/v1", &["-H", "x-removed: secret"])?;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(
            out.body_text().trim(),
            "x-added=yes x-removed= path=/headers/v1 host=aliyun.com"
        );
        assert_eq!(out.header("x-resp"), Some("1"));
        let e = lab.wait_log(0, |e| field(e, "route_name") == "headers")?;
        // The log keeps the path the client asked for.
        assert_eq!(field(&e, "path"), "/api/v1");
        Ok(())
    });
}

#[test]
fn weighted_split_and_mirror() {
    lab_case(|| {
        let lab = lab()?;
        // 1,000 requests on keep-alive connections: 70 % to aliyun.com (301), 30 % httpbin (200).
        let urls: Vec<String> = (0..1000)
            .map(|i| format!("http://aliyun.com/split?{i}"))
            .collect();
        let out = lab.curl_statuses(0, &urls)?;
        let codes: Vec<&str> = out.lines().collect();
        assert_eq!(codes.len(), 1000, "{out}");
        let to_httpbin = codes.iter().filter(|c| **c == "200").count();
        let to_aliyun = codes.iter().filter(|c| **c == "301").count();
        assert_eq!(to_httpbin + to_aliyun, 1000, "{out}");
        // 30 % of 1,000 has σ ≈ 14.5: ±60 is beyond 4σ.
        assert!(
            (240..=360).contains(&to_httpbin),
            "httpbin got {to_httpbin} of 1000"
        );

        // Mirror: the main response is aliyun's, httpbin sees a copy with a -shadow host.
        let out = lab.curl(0, "http://aliyun.com/mirror", &[])?;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.body_text(), "aliyun\n");
        let line = lab.wait_nginx(&[
            "203.0.113.11:80",
            "\"GET /ok HTTP/1.1\"",
            "host=aliyun.com-shadow",
        ])?;
        let e = lab.wait_log(0, |e| field(e, "route_name") == "mirror")?;
        let rid = field(&e, "request_id");
        assert!(
            line.contains(&format!("rid={rid}")),
            "the copy carries the request id: {line}"
        );
        Ok(())
    });
}

const FLAKY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: flaky, namespace: istio-egress}
spec:
  hosts: [flaky.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.12}, {address: 203.0.113.13}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: flaky-noretry, namespace: istio-egress}
spec:
  hosts: [flaky-noretry.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.12}, {address: 203.0.113.13}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: always-bad, namespace: istio-egress}
spec:
  hosts: [always-bad.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.12}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: flaky, namespace: istio-egress}
spec:
  hosts: [flaky.example]
  http:
  - retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: flaky.example}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: flaky-noretry, namespace: istio-egress}
spec:
  hosts: [flaky-noretry.example]
  http:
  - retries: {attempts: 0}
    route: [{destination: {host: flaky-noretry.example}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: always-bad, namespace: istio-egress}
spec:
  hosts: [always-bad.example]
  http:
  - retries: {attempts: 2, retryOn: 5xx}
    route: [{destination: {host: always-bad.example}}]
"#;

#[test]
fn retries_hide_a_flaky_upstream() {
    lab_case(|| {
        let lab = WaypointLab::start(LabConfig::new(
            FLAKY,
            &[
                "flaky.example:80",
                "flaky-noretry.example:80",
                "always-bad.example:80",
            ],
        ))?;
        let codes = |i: usize, host: &str, n: usize| -> anyhow::Result<Vec<String>> {
            let urls: Vec<String> = (0..n).map(|k| format!("http://{host}/?{k}")).collect();
            Ok(lab
                .curl_statuses(i, &urls)?
                .lines()
                .map(str::to_owned)
                .collect())
        };
        // Round-robin over a 503 and a 200 endpoint; 5xx retries make every answer a 200...
        let with = codes(0, "flaky.example", 20)?;
        assert_eq!(with.len(), 20);
        assert!(with.iter().all(|c| c == "200"), "{with:?}");
        let bad_hits = lab
            .nginx_log()
            .lines()
            .filter(|l| l.starts_with("203.0.113.12:80") && l.contains("host=flaky.example"))
            .count();
        assert!(
            bad_hits > 0,
            "the bad endpoint was tried (and retried away)"
        );
        // ...while without retries half of them fail.
        let without = codes(1, "flaky-noretry.example", 20)?;
        let failed = without.iter().filter(|c| *c == "503").count();
        assert!((5..=15).contains(&failed), "{without:?}");

        // Only bad endpoints: 1 try + 2 retries, then the 503 with URX.
        let before = lab.access_log().len();
        let out = lab.curl(2, "http://always-bad.example/", &[])?;
        assert_eq!(out.status, 503, "{out:?}");
        let e = lab.wait_log(before, |e| field(e, "authority") == "always-bad.example")?;
        assert_eq!(field(&e, "response_flags"), "URX", "{e}");
        let tries = lab
            .nginx_log()
            .lines()
            .filter(|l| l.contains("host=always-bad.example"))
            .count();
        assert_eq!(tries, 3, "{}", lab.nginx_log());
        Ok(())
    });
}

#[test]
fn config_changes_apply_without_restart() {
    lab_case(|| {
        let lab = lab()?;
        assert_eq!(lab.curl(0, "http://aliyun.com/", &[])?.status, 301);
        let abort_all = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  http:
  - fault: {abort: {percentage: {value: 100}, httpStatus: 429}}
    route: [{destination: {host: aliyun.com}}]
"#;
        let yaml = ROUTES
            .split("---\napiVersion: networking.istio.io/v1\nkind: VirtualService")
            .next()
            .context("split")?;
        std::fs::write(
            lab.config.path().join("test.yaml"),
            format!("{yaml}---{abort_all}"),
        )?;
        mesh_tests::wait_until("the new VirtualService", Duration::from_secs(10), || {
            Ok(lab.curl(0, "http://aliyun.com/", &[])?.status == 429)
        })?;
        Ok(())
    });
}

const STICKY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: sticky, namespace: istio-egress}
spec:
  hosts: [sticky.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.10}, {address: 203.0.113.11}, {address: 203.0.113.13}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: sticky, namespace: istio-egress}
spec:
  host: sticky.example
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user}
"#;

/// DestinationRule `consistentHash`: every request carrying the same `x-user` goes to the same
/// endpoint, and different users spread over the three.
#[test]
fn consistent_hash_sticks_a_key_to_one_endpoint() {
    lab_case(|| {
        let lab = WaypointLab::start(LabConfig::new(STICKY, &["sticky.example:80"]))?;
        // The endpoints (upstream_host) of `n` requests with `x-user: user`, in one curl run.
        let hosts_for = |user: &str, n: usize| -> anyhow::Result<Vec<String>> {
            let before = lab.access_log().len();
            let header = format!("x-user: {user}");
            let via = lab.connect_to(0);
            let urls: Vec<String> = (0..n)
                .map(|i| format!("http://sticky.example/r{i}"))
                .collect();
            let mut args = vec!["-H", header.as_str(), "--connect-to", via.as_str()];
            for u in &urls {
                args.extend(["-o", "/dev/null", u.as_str()]);
            }
            lab.curl_raw(&args)?;
            let mut hosts = Vec::new();
            mesh_tests::wait_until("the access-log lines", Duration::from_secs(10), || {
                hosts = lab
                    .access_log()
                    .iter()
                    .skip(before)
                    .filter(|e| field(e, "authority") == "sticky.example")
                    .map(|e| field(e, "upstream_host").to_owned())
                    .collect();
                Ok(hosts.len() >= n)
            })?;
            Ok(hosts)
        };
        let alice = hosts_for("alice", 12)?;
        assert!(
            alice.iter().all(|h| *h == alice[0]),
            "alice moved: {alice:?}"
        );
        let mut seen: Vec<String> = Vec::new();
        for i in 0..24 {
            let h = hosts_for(&format!("user-{i}"), 2)?;
            assert_eq!(h[0], h[1], "user-{i} moved");
            if !seen.contains(&h[0]) {
                seen.push(h[0].clone());
            }
        }
        assert!(seen.len() >= 2, "24 users all on {seen:?}");
        Ok(())
    });
}
