//! Policy at the waypoint: AuthorizationPolicy at L7 (403) and L4 (closed flows, SNI), the
//! REGISTRY_ONLY 502 of seed 001, and ALLOW_ANY passthrough.

mod waypoint_lab;

use waypoint_lab::{LabConfig, WaypointLab, field, lab_case};

const POLICIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: istio-egress}
spec:
  hosts: [httpbin.org]
  ports:
  - {number: 443, name: tls, protocol: TLS}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: good-tcp, namespace: istio-egress}
spec:
  hosts: [good.example]
  ports:
  - {number: 80, name: tcp, protocol: TCP}
  resolution: DNS
---
# Bound to the waypoint Gateway: no admin paths, and no TLS to httpbin.org.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: egress-deny, namespace: istio-egress}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  # Scoped to port 80: at L4 a DENY rule's HTTP-only fields cannot be checked and count as
  # matching (Istio fails closed), which would otherwise deny every TLS flow.
  - to: [{operation: {ports: ["80"], paths: ["/admin*"]}}]
  - to: [{operation: {hosts: ["httpbin.org"], ports: ["443"]}}]
---
# Bound to the ServiceEntry: only sleep, only reads.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: aliyun-readers, namespace: istio-egress}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: aliyun}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"], ipBlocks: ["10.244.1.0/24"]}}]
    to: [{operation: {methods: ["GET", "HEAD"]}}]
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {ports: ["443"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nobody-tcp, namespace: istio-egress}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: good-tcp}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/other/sa/nobody"]}}]
"#;

#[test]
fn authorization_policies_at_l7_and_l4() {
    lab_case(|| {
        let lab = WaypointLab::start(LabConfig::new(
            POLICIES,
            &[
                "aliyun.com:80",
                "aliyun.com:443",
                "httpbin.org:443",
                "good.example:80",
            ],
        ))?;
        // Allowed read.
        let out = lab.curl(0, "http://aliyun.com/ok", &[])?;
        assert_eq!(out.status, 200, "{out:?}");
        // DENY on the Gateway.
        let out = lab.curl(0, "http://aliyun.com/admin/users", &[])?;
        assert_eq!(out.status, 403, "{out:?}");
        assert_eq!(out.body_text(), "RBAC: access denied");
        assert_eq!(out.header("server"), Some("envoy"));
        let e = lab.wait_log(0, |e| field(e, "path") == "/admin/users")?;
        assert_eq!(
            field(&e, "response_code_details"),
            "rbac_access_denied_matched_policy[ns[istio-egress]-policy[egress-deny]]"
        );
        // ALLOW on the ServiceEntry without a matching rule: a write is denied.
        let out = lab.curl(0, "http://aliyun.com/ok", &["-X", "POST", "-d", "x"])?;
        assert_eq!(out.status, 403, "{out:?}");
        assert!(
            !lab.nginx_log().contains("/admin"),
            "denied requests never reach the upstream"
        );

        // L4, TLS passthrough: the SNI is read, policy allows aliyun.com:443...
        let ca = lab.ca_pem();
        let ca = ca.to_str().unwrap_or_default();
        let out = lab.curl(1, "https://aliyun.com/ok", &["--cacert", ca])?;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.body_text(), "aliyun-tls\n");
        assert_eq!(
            out.header("server"),
            Some("Tengine"),
            "TLS passes through untouched"
        );
        let e = lab.wait_log(0, |e| field(e, "requested_server_name") == "aliyun.com")?;
        assert_eq!(
            field(&e, "upstream_cluster"),
            "inbound-vip|443|tcp|aliyun.com;"
        );
        assert_eq!(field(&e, "upstream_host"), "203.0.113.10:443");
        assert!(e["bytes_sent"].as_u64().is_some_and(|b| b > 0), "{e}");
        // ...and denies TLS to httpbin.org by SNI: the flow is closed before any upstream.
        let out = lab.curl(2, "https://httpbin.org/", &["--cacert", ca])?;
        assert_ne!(out.exit_code, 0, "{out:?}");
        assert_eq!(out.status, 0);
        let e = lab.wait_log(0, |e| field(e, "requested_server_name") == "httpbin.org")?;
        assert!(
            field(&e, "connection_termination_details").contains("egress-deny"),
            "{e}"
        );
        assert!(!lab.nginx_log().contains("203.0.113.11:443"));

        // Plain TCP denied by an ALLOW policy nobody matches: the CONNECT is refused, curl sees
        // the connection close without a response.
        let out = lab.curl(3, "http://good.example/", &[])?;
        assert_ne!(out.exit_code, 0, "{out:?}");
        assert_eq!(out.status, 0);
        assert!(!lab.nginx_log().contains("203.0.113.13:80"));
        Ok(())
    });
}

#[test]
fn registry_only_answers_502_for_unregistered_hosts() {
    lab_case(|| {
        // 203.0.113.13 (good.example) is reachable but not registered.
        let lab = WaypointLab::start(
            LabConfig::new(
                waypoint_lab::ALIYUN_SE,
                &["aliyun.com:80", "203.0.113.13:80"],
            )
            .registry_only(),
        )?;
        assert_eq!(lab.curl(0, "http://aliyun.com/ok", &[])?.status, 200);
        let out = lab.curl(1, "http://good.example/", &["-I"])?;
        assert_eq!(out.status, 502, "seed 001: {out:?}");
        assert_eq!(out.header("server"), Some("envoy"));
        let out = lab.curl(1, "http://good.example/", &[])?;
        assert!(
            out.body_text().contains("REGISTRY_ONLY"),
            "{}",
            out.body_text()
        );
        let e = lab.wait_log(0, |e| field(e, "authority") == "good.example")?;
        assert_eq!(field(&e, "upstream_cluster"), "BlackHoleCluster");
        assert_eq!(e["response_code"], 502);
        assert!(!lab.nginx_log().contains("203.0.113.13"));
        Ok(())
    });
}

#[test]
fn allow_any_passes_unregistered_destinations_through() {
    lab_case(|| {
        let lab = WaypointLab::start(LabConfig::new(
            waypoint_lab::ALIYUN_SE,
            &["203.0.113.13:80"],
        ))?;
        let out = lab.curl(0, "http://good.example/", &[])?;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.body_text(), "good\n");
        // Passthrough is L4: the upstream's own server header arrives.
        assert_eq!(out.header("server"), Some("Tengine"));
        let e = lab.wait_log(0, |e| field(e, "upstream_cluster") == "PassthroughCluster")?;
        assert_eq!(field(&e, "upstream_host"), "203.0.113.13:80");
        Ok(())
    });
}
