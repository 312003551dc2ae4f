//! Seed 000 through the real waypoint: the ServiceEntry'd aliyun.com answers with the
//! waypoint's headers, the access log has the seed's fields, and the port 80 → 443 upgrade
//! (targetPort + DestinationRule SIMPLE) originates TLS with SNI aliyun.com.

mod waypoint_lab;

use mesh_tests::{lab_enabled, lab_test};
use waypoint_lab::{ALIYUN_SE, CLIENT_IP, LabConfig, WaypointLab, field};

#[test]
fn http_through_the_waypoint_has_envoy_headers_and_an_access_log() {
    if !lab_enabled() {
        return;
    }
    lab_test(|| {
        let lab = WaypointLab::start(LabConfig::new(ALIYUN_SE, &["aliyun.com:80"]))?;
        let out = lab.curl(0, "http://aliyun.com/", &["-I", "-A", "curl/8.8.0"])?;
        assert_eq!(out.status, 301, "{out:?}");
        assert_eq!(
            out.header("server"),
            Some("envoy"),
            "the upstream's Tengine is replaced"
        );
        assert_eq!(out.header("location"), Some("https://aliyun.com/"));
        let ust = out
            .header("x-envoy-upstream-service-time")
            .expect("x-envoy-upstream-service-time");
        assert!(ust.parse::<u64>().is_ok(), "{ust}");

        let e = lab.wait_log(0, |e| field(e, "path") == "/")?;
        assert_eq!(e["response_code"], 301);
        assert_eq!(field(&e, "method"), "HEAD");
        assert_eq!(field(&e, "protocol"), "HTTP/1.1");
        assert_eq!(field(&e, "authority"), "aliyun.com");
        assert_eq!(field(&e, "route_name"), "default");
        assert_eq!(field(&e, "response_flags"), "-");
        assert_eq!(
            field(&e, "upstream_cluster"),
            "inbound-vip|80|http|aliyun.com;"
        );
        assert_eq!(field(&e, "upstream_host"), "203.0.113.10:80");
        assert_eq!(field(&e, "user_agent"), "curl/8.8.0");
        assert!(
            field(&e, "downstream_remote_address").starts_with(&format!("{CLIENT_IP}:")),
            "{e}"
        );
        assert!(
            field(&e, "downstream_local_address").starts_with("240.240."),
            "{e}"
        );
        assert!(
            field(&e, "downstream_local_address").ends_with(":80"),
            "{e}"
        );
        assert!(!field(&e, "request_id").is_empty());
        assert!(field(&e, "start_time").ends_with('Z'));
        assert!(
            e["upstream_service_time"]
                .as_str()
                .is_some_and(|s| s.parse::<u64>().is_ok()),
            "{e}"
        );
        assert!(e["duration"].as_u64().is_some());

        // The request id reaches the upstream.
        let rid = field(&e, "request_id").to_owned();
        lab.wait_nginx(&["203.0.113.10:80", &format!("rid={rid}")])?;

        // Many requests on one keep-alive connection through one tunnel.
        let urls: Vec<String> = (0..5)
            .map(|i| format!("http://aliyun.com/ok?{i}"))
            .collect();
        let via = lab.connect_to(0);
        let mut args: Vec<&str> = vec![
            "-w",
            "%{http_code} %{num_connects}\\n",
            "--connect-to",
            &via,
        ];
        for u in &urls {
            args.extend(["-o", "/dev/null", u.as_str()]);
        }
        let out = lab.curl_raw(&args)?;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert_eq!(lines[0], "200 1");
        assert!(
            lines[1..].iter().all(|l| *l == "200 0"),
            "connection reused: {out}"
        );
        Ok(())
    });
}

#[test]
fn port_80_is_upgraded_to_tls_on_443() {
    if !lab_enabled() {
        return;
    }
    lab_test(|| {
        // Seed 000 step 4: targetPort 443 plus a DestinationRule originating TLS on port 80.
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-svc-aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  location: MESH_EXTERNAL
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 443}
  - {number: 443, name: https, protocol: HTTPS}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: aliyun-com, namespace: istio-egress}
spec:
  host: aliyun.com
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: SIMPLE}
"#;
        let lab = WaypointLab::start(LabConfig::new(yaml, &["aliyun.com:80"]))?;
        let out = lab.curl(0, "http://aliyun.com/", &["-I"])?;
        assert_eq!(out.status, 301, "{out:?}");
        assert_eq!(out.header("server"), Some("envoy"));
        assert_eq!(out.header("location"), Some("https://aliyun.com/"));
        assert!(out.header("x-envoy-upstream-service-time").is_some());
        // nginx saw TLS on 443 with SNI aliyun.com.
        lab.wait_nginx(&["203.0.113.10:443", "\"aliyun.com\"", "HEAD / HTTP/1.1"])?;
        let e = lab.wait_log(0, |e| e["response_code"] == 301)?;
        assert_eq!(field(&e, "upstream_host"), "203.0.113.10:443");
        assert_eq!(
            field(&e, "upstream_cluster"),
            "inbound-vip|80|http|aliyun.com;"
        );
        Ok(())
    });
}
