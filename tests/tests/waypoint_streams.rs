//! Streams through the waypoint, driven through the real binary: the route timeout and the
//! per-try timeout cut a response body that stalls, large request bodies are retried and
//! mirrored up to the buffer limit (beyond it: mirrored as they stream, not retried), WebSocket upgrades are spliced both ways (on HTTP/1.1 even under h2UpgradePolicy: UPGRADE), and DestinationRule
//! `tls` on a TCP port wraps the L4 stream in TLS.

mod waypoint_lab;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use waypoint_lab::{CLIENT_IP, LabConfig, WaypointLab, field, lab_case};

const STREAMS: &str = r#"
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
  - name: route-timeout
    match: [{uri: {prefix: /stall}, headers: {x-case: {exact: route}}}]
    timeout: 1s
    retries: {attempts: 0}
    route: [{destination: {host: aliyun.com}}]
  - name: per-try-timeout
    match: [{uri: {prefix: /stall}, headers: {x-case: {exact: try}}}]
    retries: {attempts: 1, perTryTimeout: 1s, retryOn: 5xx}
    route: [{destination: {host: aliyun.com}}]
  - name: mirror-upload
    match: [{uri: {prefix: /upload}}]
    mirror: {host: httpbin.org}
    mirrorPercentage: {value: 100}
    route: [{destination: {host: good.example}}]
  - name: rest
    route: [{destination: {host: aliyun.com}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: good, namespace: istio-egress}
spec:
  hosts: [good.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
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
kind: VirtualService
metadata: {name: flaky, namespace: istio-egress}
spec:
  hosts: [flaky.example]
  http:
  - retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: flaky.example}}]
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
metadata: {name: always-bad, namespace: istio-egress}
spec:
  hosts: [always-bad.example]
  http:
  - retries: {attempts: 2, retryOn: 5xx}
    route: [{destination: {host: always-bad.example}}]
"#;

/// curl's exit code for a transfer cut short (`CURLE_PARTIAL_FILE`) or a failed receive.
const CUT_SHORT: [i32; 3] = [18, 56, 92];

#[test]
fn route_and_per_try_timeouts_cover_the_response_body() {
    lab_case(|| {
        let lab = WaypointLab::start(LabConfig::new(STREAMS, &["aliyun.com:80"]))?;
        for (case, route) in [("route", "route-timeout"), ("try", "per-try-timeout")] {
            let before = lab.access_log().len();
            let header = format!("x-case: {case}");
            // nginx sends the headers and "head", then stalls 3 s before "tail".
            let out = lab.curl(0, "http://aliyun.com/stall", &["-H", &header])?;
            assert_eq!(out.status, 200, "headers came in time: {out:?}");
            assert_eq!(out.body_text(), "head\n", "{out:?}");
            assert!(
                CUT_SHORT.contains(&out.exit_code),
                "the stream was cut, not completed: {out:?}"
            );
            assert!(
                out.time_total >= Duration::from_millis(900)
                    && out.time_total < Duration::from_millis(2800),
                "cut at the 1 s deadline, not at the upstream's 3 s: {:?}",
                out.time_total
            );
            let e = lab.wait_log(before, |e| field(e, "route_name") == route)?;
            assert_eq!(field(&e, "response_flags"), "UT", "{e}");
            assert_eq!(e["response_code"], 200, "{e}");
        }
        // A complete body within the deadline is untouched (the same routes, another path
        // falls to "rest": no timeout at all; /ok under the timeout route works too).
        let out = lab.curl(0, "http://aliyun.com/ok", &["-H", "x-case: route"])?;
        assert_eq!((out.status, out.exit_code), (200, 0), "{out:?}");
        assert_eq!(out.body_text(), "aliyun\n");
        Ok(())
    });
}

#[test]
fn one_mib_bodies_are_retried_and_mirrored() {
    lab_case(|| {
        // A streamed mirror copy that lags the original by more than the allowance is
        // abandoned by design (body.rs tests that); here the allowance is wide so a loaded
        // machine, where the mirror connects late, still sees the whole copy arrive.
        let lab = WaypointLab::start(
            LabConfig::new(
                STREAMS,
                &["flaky.example:80", "aliyun.com:80", "always-bad.example:80"],
            )
            .waypoint_args(&["--mirror-max-lag-bytes", "67108864"]),
        )?;
        let dir = tempfile::tempdir()?;
        let one_mib = dir.path().join("1mib");
        std::fs::write(&one_mib, vec![b'x'; 1 << 20])?;
        let two_mib = dir.path().join("2mib");
        std::fs::write(&two_mib, vec![b'y'; 2 << 20])?;
        let data = |p: &std::path::Path| format!("@{}", p.display());
        let one = data(&one_mib);
        let two = data(&two_mib);

        // Round-robin over a 503 and a 200 endpoint, 5xx retries: every 1 MiB POST succeeds
        // and the good endpoint read all of it each time.
        for i in 0..6 {
            let url = format!("http://flaky.example/upload?{i}");
            let out = lab.curl(0, &url, &["--data-binary", &one])?;
            assert_eq!(out.status, 200, "{out:?}");
            assert_eq!(out.body_text(), "good got 1048576\n");
        }
        let retried = lab
            .nginx_log()
            .lines()
            .filter(|l| {
                l.starts_with("203.0.113.12:80")
                    && l.contains("host=flaky.example")
                    && l.contains("POST /upload")
            })
            .count();
        assert!(retried > 0, "the bad endpoint was tried and retried away");

        // Mirror: the main response is good.example's, httpbin.org read the whole copy.
        let out = lab.curl(1, "http://aliyun.com/upload", &["--data-binary", &one])?;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.body_text(), "good got 1048576\n");
        let line = lab.wait_nginx(&[
            "203.0.113.11:80",
            "\"POST /upload HTTP/1.1\"",
            "host=aliyun.com-shadow",
            "status=200",
        ])?;
        let len: u64 = line
            .rsplit_once("len=")
            .and_then(|(_, n)| n.trim().parse().ok())
            .with_context(|| format!("no len= in {line}"))?;
        assert!(len > 1 << 20, "the mirror received the whole body: {line}");

        // Over the buffer limit the mirror gets a copy of the body as it streams.
        let out = lab.curl(1, "http://aliyun.com/upload?big", &["--data-binary", &two])?;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.body_text(), "good got 2097152\n");
        let line = lab.wait_nginx(&[
            "203.0.113.11:80",
            "\"POST /upload?big HTTP/1.1\"",
            "host=aliyun.com-shadow",
            "status=200",
        ])?;
        let len: u64 = line
            .rsplit_once("len=")
            .and_then(|(_, n)| n.trim().parse().ok())
            .with_context(|| format!("no len= in {line}"))?;
        assert!(len > 2 << 20, "the streamed copy was complete: {line}");

        // Beyond the buffer limit (1 MiB by default) a body streams once: no retry.
        let before = lab
            .nginx_log()
            .lines()
            .filter(|l| l.contains("host=always-bad.example"))
            .count();
        let out = lab.curl(
            2,
            "http://always-bad.example/upload",
            &["--data-binary", &two],
        )?;
        assert_eq!(out.status, 503, "{out:?}");
        thread::sleep(Duration::from_millis(300));
        let tries = lab
            .nginx_log()
            .lines()
            .filter(|l| l.contains("host=always-bad.example"))
            .count()
            - before;
        assert_eq!(tries, 1, "{}", lab.nginx_log());
        Ok(())
    });
}

const WEBSOCKET: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ws, namespace: istio-egress}
spec:
  hosts: [ws.example]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8081}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.13}]
---
# HTTP/2 upstream for ordinary requests; a WebSocket Upgrade stays on HTTP/1.1 (the stand-in
# speaks only HTTP/1.1, so the test fails if the upgrade went out as HTTP/2).
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ws, namespace: istio-egress}
spec:
  host: ws.example
  trafficPolicy:
    connectionPool: {http: {h2UpgradePolicy: UPGRADE}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcptls, namespace: istio-egress}
spec:
  hosts: [tcptls.example]
  ports: [{number: 9000, name: tcp, protocol: TCP, targetPort: 443}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.10}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcptls, namespace: istio-egress}
spec:
  host: tcptls.example
  trafficPolicy:
    tls: {mode: SIMPLE, sni: aliyun.com}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcpbad, namespace: istio-egress}
spec:
  hosts: [tcpbad.example]
  ports: [{number: 9000, name: tcp, protocol: TCP, targetPort: 443}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.14}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcpbad, namespace: istio-egress}
spec:
  host: tcpbad.example
  trafficPolicy:
    tls: {mode: SIMPLE, sni: badcert.example}
"#;

/// Reads until the end of an HTTP head (`\r\n\r\n`); returns the head and what followed it.
fn read_head(s: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!(
                "closed before the end of the head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A WebSocket stand-in: answers the upgrade with 101, then echoes bytes (no frame parsing is
/// needed: after 101 the proxy moves opaque bytes).
fn websocket_echo(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept() {
        thread::spawn(move || -> Result<()> {
            let (head, rest) = read_head(&mut s)?;
            ensure!(
                head.to_ascii_lowercase().contains("upgrade: websocket"),
                "not an upgrade: {head}"
            );
            s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nServer: ws-echo\r\n\r\n",
            )?;
            s.write_all(&rest)?;
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n])?;
            }
        });
    }
}

#[test]
fn websocket_upgrade_and_tls_origination_on_a_tcp_port() {
    lab_case(|| {
        let lab = WaypointLab::start(LabConfig::new(
            WEBSOCKET,
            &[
                "ws.example:80",
                "tcptls.example:9000",
                "tcpbad.example:9000",
            ],
        ))?;
        let handle = lab.ns.handle()?;
        let listener = handle
            .run_blocking(|| TcpListener::bind("203.0.113.13:8081"))
            .map_err(|e| anyhow::anyhow!("{e}"))??;
        thread::spawn(move || websocket_echo(listener));

        // The client: HTTP/1.1 Upgrade through the relay (HBONE) and the waypoint.
        let relay: SocketAddr = format!("{CLIENT_IP}:18000").parse()?;
        let mut ws = handle
            .run_blocking(move || TcpStream::connect(relay))
            .map_err(|e| anyhow::anyhow!("{e}"))??;
        ws.set_read_timeout(Some(Duration::from_secs(10)))?;
        ws.write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )?;
        let (head, mut echoed) = read_head(&mut ws)?;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("upgrade: websocket"), "{head}");
        assert!(lower.contains("connection: upgrade"), "{head}");
        assert!(lower.contains("server: envoy"), "{head}");
        // Bytes flow both ways, several round trips on the same stream.
        for msg in ["hello over the tunnel", "second message", "third"] {
            ws.write_all(msg.as_bytes())?;
            let mut buf = [0u8; 256];
            while echoed.len() < msg.len() {
                let n = ws.read(&mut buf)?;
                ensure!(n > 0, "upgraded stream closed early");
                echoed.extend_from_slice(&buf[..n]);
            }
            assert_eq!(String::from_utf8_lossy(&echoed), msg);
            echoed.clear();
        }
        drop(ws);
        let e = lab.wait_log(0, |e| field(e, "authority") == "ws.example")?;
        assert_eq!(e["response_code"], 101, "{e}");
        assert_eq!(field(&e, "upstream_host"), "203.0.113.13:8081");
        let sent = e["bytes_sent"].as_u64().unwrap_or(0);
        assert_eq!(
            sent,
            ("hello over the tunnel".len() + "second message".len() + "third".len()) as u64,
            "{e}"
        );

        // TCP port with DestinationRule tls SIMPLE: the client speaks plain HTTP, the waypoint
        // wraps the stream in TLS (SNI aliyun.com, verified with the lab's CA) to nginx's 443.
        let out = lab.curl(1, "http://tcptls.example:9000/ok", &[])?;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.body_text(), "aliyun-tls\n");
        lab.wait_nginx(&["203.0.113.10:443", "\"aliyun.com\"", "GET /ok"])?;
        let e = lab.wait_log(0, |e| {
            field(e, "upstream_cluster").contains("tcptls.example")
        })?;
        assert_eq!(field(&e, "upstream_host"), "203.0.113.10:443", "{e}");

        // A certificate from an unknown CA: the flow is closed, nothing reaches the server.
        let out = lab.curl(2, "http://tcpbad.example:9000/", &[])?;
        assert_eq!(out.status, 0, "{out:?}");
        let e = lab.wait_log(0, |e| {
            field(e, "upstream_cluster").contains("tcpbad.example")
        })?;
        assert!(field(&e, "response_flags").contains("UF"), "{e}");
        assert!(
            field(&e, "upstream_transport_failure_reason").contains("CERTIFICATE_VERIFY_FAILED"),
            "{e}"
        );
        assert!(
            !lab.nginx_log().contains("should never"),
            "no request over the bad TLS"
        );
        Ok(())
    });
}

const OUTLIER: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pair, namespace: istio-egress}
spec:
  hosts: [pair.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.12}, {address: 203.0.113.13}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pair, namespace: istio-egress}
spec:
  hosts: [pair.example]
  http:
  - retries: {attempts: 0}
    route: [{destination: {host: pair.example}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pair, namespace: istio-egress}
spec:
  host: pair.example
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 2s
      maxEjectionPercent: 50
"#;

#[test]
fn outlier_detection_ejects_the_failing_endpoint() {
    lab_case(|| {
        let lab = WaypointLab::start(LabConfig::new(OUTLIER, &["pair.example:80"]))?;
        let hits_on_bad = |lab: &WaypointLab| {
            lab.nginx_log()
                .lines()
                .filter(|l| l.starts_with("203.0.113.12:80") && l.contains("host=pair.example"))
                .count()
        };
        let batch = |n: usize| -> Result<Vec<String>> {
            let urls: Vec<String> = (0..n)
                .map(|k| format!("http://pair.example/?{k}"))
                .collect();
            Ok(lab
                .curl_statuses(0, &urls)?
                .lines()
                .map(str::to_owned)
                .collect())
        };
        // Round-robin over a 503 and a 200 endpoint, no retries: the 503 endpoint answers
        // twice, is ejected, and the rest all go to the healthy one.
        let codes = batch(20)?;
        assert_eq!(codes.len(), 20, "{codes:?}");
        let failed = codes.iter().filter(|c| *c == "503").count();
        assert_eq!(failed, 2, "{codes:?}");
        assert!(
            codes[codes.len() - 10..].iter().all(|c| c == "200"),
            "{codes:?}"
        );
        assert_eq!(hits_on_bad(&lab), 2, "{}", lab.nginx_log());

        // After baseEjectionTime the endpoint is back in the rotation (and fails again).
        thread::sleep(Duration::from_millis(2200));
        let codes = batch(4)?;
        assert!(codes.iter().any(|c| c == "503"), "{codes:?}");
        Ok(())
    });
}
