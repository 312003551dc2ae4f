//! Every YAML block of the seeds (extracted verbatim into tests/fixtures/seeds) loads with no
//! errors and yields the objects the seed describes.
mod common;
use common::*;
use mesh_config::snapshot::{Resolution, ServiceKind};
use mesh_config::{NamespacedName, Protocol, RouteAction, TlsMode, WaypointBinding};
use std::net::{IpAddr, SocketAddr};

fn ok(rel: &str) -> mesh_config::Snapshot {
    match load_seed(rel) {
        Ok(s) => s,
        Err(e) => panic!("{rel}: {e}"),
    }
}

fn in_vip_range(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..2] == [240, 240],
        IpAddr::V6(v6) => v6.segments()[..3] == [0x2001, 0x2, 0],
    }
}

#[test]
fn every_fixture_loads() {
    let mut n = 0;
    let root = seeds_dir();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                ok(&rel);
                n += 1;
            }
        }
    }
    assert_eq!(n, 14, "one fixture per YAML block of the seeds");
}

#[test]
fn seed_000_and_001_sleep() {
    for f in ["000-step1-sleep.yaml", "001-step1-sleep.yaml"] {
        let s = ok(f);
        let svc = s
            .service_by_host("sleep.default.svc.cluster.local")
            .expect("sleep service");
        assert_eq!(svc.kind, ServiceKind::Service);
        assert_eq!(svc.ports[0].port, 80);
        assert_eq!(svc.ports[0].protocol, Protocol::Http);
        // ServiceAccount and Deployment are skipped.
        assert_eq!(s.services().len(), 1);
        assert!(s.workloads().is_empty());
    }
}

#[test]
fn seed_000_waypoint_gateway_in_istio_egress() {
    let s = ok("istio-egress/000-step2-waypoint-gateway.yaml");
    let w = s
        .waypoint(&NamespacedName::new("istio-egress", "waypoint"))
        .expect("waypoint from -n istio-egress");
    assert_eq!(w.hbone_port, 15008);
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/istio-egress/sa/waypoint"
    );
}

#[test]
fn seed_000_serviceentry_and_upgrade() {
    let s = ok("istio-egress/000-step3-serviceentry.yaml");
    let se = s.service_by_host("aliyun.com").unwrap();
    assert_eq!(
        se.name,
        NamespacedName::new("istio-egress", "external-svc-aliyun")
    );
    assert_eq!(se.resolution, Resolution::Dns);
    assert!(
        se.auto_allocated && se.vips.len() == 2 && se.vips.iter().all(in_vip_range),
        "{:?}",
        se.vips
    );
    assert_eq!(se.port(443).unwrap().protocol, Protocol::Https);
    assert_eq!(s.resolve_name("aliyun.com"), Some(se.vips.as_slice()));
    let hit = s.service_by_addr(SocketAddr::new(se.vips[0], 80)).unwrap();
    assert_eq!(hit.port.name, "http");

    let s = ok("istio-egress/000-step4-serviceentry-https-upgrade.yaml");
    let p = s
        .service_by_host("aliyun.com")
        .unwrap()
        .port(80)
        .unwrap()
        .clone();
    assert_eq!(
        (p.protocol, p.target_port, p.upstream_port()),
        (Protocol::Http, Some(443), 443)
    );

    let s = ok("istio-egress/000-step4-destinationrule.yaml");
    assert_eq!(
        s.upstream_tls("aliyun.com", 80, None).map(|t| t.mode),
        Some(TlsMode::Simple)
    );
    assert!(s.upstream_tls("aliyun.com", 443, None).is_none());
}

#[test]
fn seed_001_serviceentry_and_virtualservice() {
    let s = ok("001-step3-serviceentry.yaml");
    let se = s.service_by_host("aliyun.com").unwrap();
    assert_eq!(se.name, NamespacedName::new("default", "external-svc-http"));

    let s = ok("001-step4c-virtualservice.yaml");
    let r = s.routes_for_host("aliyun.com").expect("routes");
    // Only the `mesh` route applies to the data plane; the egress-gw one is gateway-only.
    assert_eq!(r.http.len(), 1);
    let RouteAction::Forward(d) = &r.http[0].action else {
        panic!("forward")
    };
    assert_eq!(
        d.list[0].destination.host,
        "istio-egressgateway.istio-system.svc.cluster.local"
    );
    assert_eq!(d.list[0].destination.port, Some(80));
    assert_eq!(r.http[0].matches[0].port, Some(80));
}

#[test]
fn seed_002_serviceentry_and_fault() {
    let s = ok("002-step1-serviceentry.yaml");
    let se = s.service_by_host("www.aliyun.com").unwrap();
    assert_eq!(
        se.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        [80, 443]
    );
    let s = ok("002-step2-virtualservice-fault.yaml");
    let r = s.routes_for_host("www.aliyun.com").unwrap();
    let f = r.http[0].fault.as_ref().unwrap();
    assert_eq!(
        f.delay.as_ref().unwrap().delay,
        std::time::Duration::from_secs(5)
    );
    assert_eq!(f.delay.as_ref().unwrap().percentage, 100.0);
}

#[test]
fn seed_003_example1_http() {
    let s = ok("003-example1-http.yaml");
    let e = s.egress_entries();
    assert_eq!(e.len(), 1);
    assert_eq!(
        (e[0].port, e[0].gateway_port, e[0].gateway_port_auto),
        (80, 80, false)
    );
    assert_eq!(
        e[0].gateway,
        NamespacedName::new("istio-egress", "egressgateway-a")
    );
    for h in ["www.httpbin.org", "httpbin.org"] {
        let svc = s.service_by_host(h).unwrap();
        assert_eq!(svc.name.namespace, "istio-egress");
        // The gateway is not in this fixture: the binding is unresolved (fail closed).
        assert!(
            matches!(&svc.waypoint, WaypointBinding::Unresolved { gateway, .. } if gateway.name == "egressgateway-a")
        );
        assert!(!s.authz_for_service(svc).allow().is_empty());
    }
}

#[test]
fn seed_003_example2_upgrade() {
    let s = ok("003-example2-https-upgrade.yaml");
    let e = s.egress_entries();
    assert_eq!(
        e.iter()
            .map(|x| (x.name.as_str(), x.gateway_port))
            .collect::<Vec<_>>(),
        [
            ("httpbin-service-http", 80),
            ("httpbin-service-https", 444),
            ("aliyun-service-https", 445)
        ]
    );
    assert_eq!(e[0].https_upgrade_port, Some(443));
    let svc = s.service_by_host("httpbin.org").unwrap();
    assert_eq!(svc.port(80).unwrap().target_port, Some(443));
    assert_eq!(svc.port(443).unwrap().protocol, Protocol::Https);
    assert_eq!(
        s.upstream_tls("httpbin.org", 80, None).map(|t| t.mode),
        Some(TlsMode::Simple)
    );
    assert_eq!(
        s.upstream_tls("httpbin.org", 80, None)
            .and_then(|t| t.sni.as_deref()),
        Some("httpbin.org")
    );
    assert!(s.upstream_tls("httpbin.org", 443, None).is_none());
    assert!(s.service_by_host("www.aliyun.com").is_some());
}

#[test]
fn seed_003_example3_auto_ports_and_tcp() {
    let s = ok("003-example3-http-tcp-auto-ports.yaml");
    let e = s.egress_entries();
    assert_eq!(e.len(), 5);
    let mut ports: Vec<u16> = e.iter().map(|x| x.gateway_port).collect();
    assert!(
        e.iter()
            .all(|x| x.gateway_port_auto && (10000..=20000).contains(&x.gateway_port)),
        "{ports:?}"
    );
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 5, "distinct ports");
    // Deterministic: same config, same ports.
    let again = ok("003-example3-http-tcp-auto-ports.yaml");
    assert_eq!(
        again
            .egress_entries()
            .iter()
            .map(|x| x.gateway_port)
            .collect::<Vec<_>>(),
        e.iter().map(|x| x.gateway_port).collect::<Vec<_>>()
    );
    // TCP by IP: the IP itself is the address.
    let hit = s
        .service_by_addr("1.1.1.1:44".parse().unwrap())
        .expect("tcp-svc1");
    assert_eq!(hit.port.protocol, Protocol::Tcp);
    assert_eq!(hit.service.resolution, Resolution::Static);
    // TCP by name gets a VIP.
    let t = s.service_by_host("test-tcp.com").unwrap();
    assert!(t.auto_allocated);
    assert_eq!(t.port(444).unwrap().protocol, Protocol::Tcp);
    // aliyun.com: HTTP 80 and HTTPS 443 merged into one ServiceEntry.
    let a = s.service_by_host("aliyun.com").unwrap();
    assert_eq!(
        a.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        [80, 443]
    );
    assert_eq!(
        s.upstream_tls("taobao.com", 80, None).map(|t| t.mode),
        Some(TlsMode::Simple)
    );
}

#[test]
fn seed_004_waypoint_allowed_routes() {
    let s = ok("004-step1-waypoint.yaml");
    let w = s
        .waypoint(&NamespacedName::new("default", "waypoint"))
        .unwrap();
    assert_eq!(w.allowed_from, mesh_config::snapshot::AllowedFrom::Same);
}

/// The seed 000 walkthrough applied together: steps 1, 2, 4 (+ the namespace label), with the
/// pods a cluster would run.
#[test]
fn seed_000_scenario_end_to_end() {
    let read = |rel: &str| std::fs::read_to_string(seeds_dir().join(rel)).unwrap();
    let (a, b, c, d) = (
        read("000-step1-sleep.yaml"),
        read("istio-egress/000-step2-waypoint-gateway.yaml"),
        read("istio-egress/000-step4-serviceentry-https-upgrade.yaml"),
        read("istio-egress/000-step4-destinationrule.yaml"),
    );
    let extra = r#"
apiVersion: v1
kind: Namespace
metadata: {name: istio-egress, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: istio-egress, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep-0, labels: {app: sleep}}
spec: {serviceAccountName: sleep, nodeName: node-1}
status: {podIP: 10.244.1.10}
"#;
    let s = must(&[
        ("000-step1-sleep.yaml", &a),
        ("istio-egress/000-step2-waypoint-gateway.yaml", &b),
        ("istio-egress/000-step4-serviceentry-https-upgrade.yaml", &c),
        ("istio-egress/000-step4-destinationrule.yaml", &d),
        ("extra.yaml", extra),
    ]);
    let se = s.service_by_host("aliyun.com").unwrap();
    let w = se
        .waypoint
        .waypoint()
        .expect("bound via the namespace label");
    assert_eq!(w.addresses, ["10.244.1.20".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        se.inbound_vip_cluster(se.port(80).unwrap()),
        "inbound-vip|80|http|aliyun.com"
    );
    let sleep = s.workload_by_ip("10.244.1.10".parse().unwrap()).unwrap();
    assert_eq!(
        sleep.identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    // The sleep Service now has the pod as endpoint; it is not bound to a waypoint.
    let svc = s
        .service_by_host("sleep.default.svc.cluster.local")
        .unwrap();
    assert_eq!(svc.endpoints.len(), 1);
    assert!(svc.waypoint.is_none());
}
