//! The waypoint's upstream side and lifecycle: TLS origination failures (bad certificate, SAN
//! mismatch), connect failures, mutual TLS origination with a client certificate from a Secret
//! (`credentialName`), HTTP/2 downstream, metrics, and draining on SIGTERM.

mod waypoint_lab;

use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_tests::{lab_enabled, lab_test};
use nix::sys::signal::Signal;
use waypoint_lab::{LabConfig, WaypointLab, field};

fn upstreams(ca_pem: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: badcert, namespace: istio-egress}}
spec:
  hosts: [badcert.example]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: badcert, namespace: istio-egress}}
spec:
  host: badcert.example
  trafficPolicy:
    tls: {{mode: SIMPLE}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: aliyun, namespace: istio-egress}}
spec:
  hosts: [aliyun.com]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  resolution: DNS
---
# caCertificates from a file, and a SAN the server certificate does not have.
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: aliyun, namespace: istio-egress}}
spec:
  host: aliyun.com
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls: {{mode: SIMPLE, caCertificates: {ca_pem}, subjectAltNames: [pay.aliyun.com]}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: httpbin, namespace: istio-egress}}
spec:
  hosts: [httpbin.org]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin, namespace: istio-egress}}
spec:
  host: httpbin.org
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca_pem}, subjectAltNames: [httpbin.org]}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: refused, namespace: istio-egress}}
spec:
  hosts: [refused.example]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 81}}]
  resolution: STATIC
  endpoints: [{{address: 203.0.113.13}}]
"#
    )
}

#[test]
fn tls_origination_failures_and_connect_failures() {
    if !lab_enabled() {
        return;
    }
    lab_test(|| {
        // The CA path must be known before the lab writes its config: use a fixed location
        // inside a temp dir we fill after the lab made its PKI.
        let ca_dir = tempfile::tempdir()?;
        let ca_pem = ca_dir.path().join("ca.pem");
        let lab = WaypointLab::start(LabConfig::new(
            upstreams(&ca_pem.display().to_string()),
            &[
                "badcert.example:80",
                "aliyun.com:80",
                "httpbin.org:80",
                "refused.example:80",
            ],
        ))?;
        std::fs::copy(lab.ca_pem(), &ca_pem)?;

        // A certificate from an unknown CA: 503, UF, the TLS failure in the log.
        let out = lab.curl(0, "http://badcert.example/", &[])?;
        assert_eq!(out.status, 503, "{out:?}");
        assert_eq!(out.header("server"), Some("envoy"));
        assert!(
            out.body_text().contains("CERTIFICATE_VERIFY_FAILED"),
            "{}",
            out.body_text()
        );
        let e = lab.wait_log(0, |e| field(e, "authority") == "badcert.example")?;
        assert!(field(&e, "response_flags").contains("UF"), "{e}");
        assert!(
            field(&e, "upstream_transport_failure_reason").contains("CERTIFICATE_VERIFY_FAILED"),
            "{e}"
        );
        assert_eq!(field(&e, "upstream_host"), "203.0.113.14:443");
        assert!(
            !lab.nginx_log().contains("should never"),
            "no request went over the bad TLS"
        );

        // Trusted CA but the DestinationRule's subjectAltNames do not match: refused too.
        let out = lab.curl(1, "http://aliyun.com/ok", &[])?;
        assert_eq!(out.status, 503, "{out:?}");
        let e = lab.wait_log(0, |e| field(e, "authority") == "aliyun.com")?;
        assert!(
            field(&e, "upstream_transport_failure_reason").contains("CERTIFICATE_VERIFY_FAILED"),
            "{e}"
        );
        // A matching SAN with the same CA file works.
        let out = lab.curl(2, "http://httpbin.org/", &[])?;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.body_text(), "httpbin-tls\n");
        lab.wait_nginx(&["203.0.113.11:443", "\"httpbin.org\""])?;

        // Nothing listens on the target port: 503 UF (after Istio's default connect-failure
        // retries, hence URX too).
        let out = lab.curl(3, "http://refused.example/", &[])?;
        assert_eq!(out.status, 503, "{out:?}");
        let e = lab.wait_log(0, |e| field(e, "authority") == "refused.example")?;
        assert!(field(&e, "response_flags").contains("UF"), "{e}");
        assert!(field(&e, "response_flags").contains("URX"), "{e}");
        assert_eq!(field(&e, "upstream_host"), "203.0.113.13:81");
        Ok(())
    });
}

/// Istio's egress "mutual TLS origination": the client certificate, key and CA come from a
/// Secret named by `credentialName`, in the waypoint's namespace.
const MTLS_UPSTREAM: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mtls, namespace: istio-egress}
spec:
  hosts: [mtls.example]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mtls, namespace: istio-egress}
spec:
  host: mtls.example
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: MUTUAL, credentialName: mtls-client, sni: mtls.example}
"#;

#[test]
fn mutual_tls_origination_with_credential_name() {
    if !lab_enabled() {
        return;
    }
    lab_test(|| {
        let lab = WaypointLab::start(LabConfig::new(MTLS_UPSTREAM, &["mtls.example:80"]))?;

        // No Secret yet: 503 UF before any connection, never plaintext or certificate-less.
        let out = lab.curl(0, "http://mtls.example/", &[])?;
        assert_eq!(out.status, 503, "{out:?}");
        assert!(
            out.body_text().contains("Secret is not supplied by SDS"),
            "{}",
            out.body_text()
        );
        let e = lab.wait_log(0, |e| field(e, "authority") == "mtls.example")?;
        assert!(field(&e, "response_flags").contains("UF"), "{e}");
        let reason = field(&e, "upstream_transport_failure_reason");
        for want in [
            "Secret is not supplied by SDS",
            "DestinationRule istio-egress/mtls",
            "portLevelSettings[0].tls.credentialName",
            "Secret istio-egress/mtls-client not found",
        ] {
            assert!(reason.contains(want), "{want:?} missing: {e}");
        }
        assert!(
            !lab.nginx_log().contains("203.0.113.15:443"),
            "nothing reached the server: {}",
            lab.nginx_log()
        );
        let dump = lab.admin("/config_dump")?;
        assert!(
            dump.contains("credential_warnings") && dump.contains("mtls-client not found"),
            "the snapshot records the unusable credentialName: {dump}"
        );

        // The Secret arrives in the config directory (kubernetes.io/tls, base64 `data`): the
        // next snapshot carries it and nginx accepts the client certificate.
        let key_b64 = lab.pki_base64("client.key")?;
        let secret = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: mtls-client, namespace: istio-egress}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {key_b64}\n  ca.crt: {}\n",
            lab.pki_base64("client.pem")?,
            lab.pki_base64("ca.pem")?,
        );
        std::fs::write(lab.config.path().join("secret.yaml"), secret)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let out = loop {
            let out = lab.curl(0, "http://mtls.example/", &[])?;
            if out.status == 200 || Instant::now() > deadline {
                break out;
            }
            thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(out.status, 200, "{out:?}\n{}", lab.waypoint.log());
        assert!(
            out.body_text().starts_with("mtls-ok ")
                && out.body_text().contains("CN=waypoint-egress-client"),
            "nginx verified the client certificate: {}",
            out.body_text()
        );
        lab.wait_nginx(&["203.0.113.15:443", "\"mtls.example\"", "status=200"])?;

        // Key material stays out of the dump and the logs.
        let dump = lab.admin("/config_dump")?;
        assert!(dump.contains("istio-egress/mtls-client"), "{dump}");
        assert!(!dump.contains("mtls-client not found"), "{dump}");
        let log = lab.waypoint.log();
        for text in [&dump, &log] {
            assert!(!text.contains("PRIVATE KEY"));
            let middle = key_b64.len() / 2;
            assert!(!text.contains(&key_b64[middle..middle + 24]));
        }
        Ok(())
    });
}

#[test]
fn http2_downstream_metrics_and_drain_on_sigterm() {
    if !lab_enabled() {
        return;
    }
    lab_test(|| {
        let mut lab =
            WaypointLab::start(LabConfig::new(waypoint_lab::ALIYUN_SE, &["aliyun.com:80"]))?;
        // HTTP/2 with prior knowledge inside the tunnel.
        let out = lab.curl(0, "http://aliyun.com/ok", &["--http2-prior-knowledge"])?;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.header("server"), Some("envoy"));
        let e = lab.wait_log(0, |e| field(e, "protocol") == "HTTP/2")?;
        assert_eq!(field(&e, "authority"), "aliyun.com");
        assert_eq!(
            field(&e, "upstream_cluster"),
            "inbound-vip|80|http|aliyun.com;"
        );

        // Istio's request metrics, reported by the waypoint.
        let metrics = lab.admin("/stats/prometheus")?;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
            .with_context(|| format!("no istio_requests_total in\n{metrics}"))?;
        for label in [
            "reporter=\"waypoint\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
            "source_workload_namespace=\"default\"",
            "destination_service=\"aliyun.com\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(line.contains(label), "{label} missing: {line}");
        }
        assert!(metrics.contains("istio_request_duration_milliseconds_bucket{"));
        assert!(metrics.contains("istio_response_bytes_bucket{"));
        assert_eq!(lab.admin("/healthz/ready")?.trim(), "ready");
        let dump = lab.admin("/config_dump")?;
        assert!(
            dump.contains("\"aliyun.com\""),
            "config dump shows the snapshot"
        );

        // SIGTERM while a 3 s request is in flight: it completes, then the waypoint exits.
        let via = lab.connect_to(0);
        let ns = lab.ns.name().to_owned();
        let slow = thread::spawn(move || {
            std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "curl",
                    "-sS",
                    "--max-time",
                    "20",
                    "-w",
                    " %{http_code}",
                    "--connect-to",
                    &via,
                    "http://aliyun.com/slow",
                ])
                .output()
        });
        // Let the request reach nginx before the signal.
        thread::sleep(Duration::from_millis(800));
        lab.waypoint.signal(Signal::SIGTERM)?;
        let out = slow
            .join()
            .map_err(|_| anyhow::anyhow!("curl thread panicked"))??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with("slow") && stdout.trim_end().ends_with(" 200"),
            "in-flight request finished: {stdout:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = lab.waypoint.try_wait()? {
                break s;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "waypoint did not exit after SIGTERM"
            );
            thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "clean exit: {status}");
        Ok(())
    });
}
