//! Table-driven tests for the snapshot lookups, waypoint binding, VIP allocation, policy
//! attachment and ASMEgressTrafficPolicy compilation.
mod common;
use common::*;
use mesh_config::snapshot::AllowedFrom;
use mesh_config::{
    AddressMatch, Decision, HttpAttrs, NamespacedName, OutboundTrafficPolicy, RequestAttrs,
    Snapshot, WaypointBinding,
};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const WAYPOINTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ns-a, labels: {istio.io/use-waypoint: wp-a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ns-b}
---
apiVersion: v1
kind: Namespace
metadata: {name: ns-c, labels: {istio.io/use-waypoint: wp-x, istio.io/use-waypoint-namespace: shared}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ns-d, labels: {team: blue}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-a, namespace: ns-a}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-svc, namespace: ns-a}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 10.96.9.9}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-x, namespace: shared}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-same, namespace: shared}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Same}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-sel, namespace: shared}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: blue}}}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-wl, namespace: ns-b, labels: {istio.io/waypoint-for: workload}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: ns-a}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-a-0, namespace: ns-a, labels: {gateway.networking.k8s.io/gateway-name: wp-a}}
spec: {serviceAccountName: wp-a-sa, nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-x-0, namespace: shared, labels: {gateway.networking.k8s.io/gateway-name: wp-x}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-same-0, namespace: shared, labels: {gateway.networking.k8s.io/gateway-name: wp-same}}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-sel-0, namespace: shared, labels: {gateway.networking.k8s.io/gateway-name: wp-sel}}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-wl-0, namespace: ns-b, labels: {gateway.networking.k8s.io/gateway-name: wp-wl}}
status: {podIP: 10.0.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: app-b, namespace: ns-b, labels: {app: b, istio.io/use-waypoint: wp-wl}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: app-a, namespace: ns-a, labels: {app: a}}
spec: {nodeName: n2}
status: {podIP: 10.1.0.1}
"#;

fn se(ns: &str, name: &str, host: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{hosts: [{host}], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: DNS}}\n"
    )
}

#[test]
fn use_waypoint_precedence() {
    let mut objs = String::new();
    let cases: &[(&str, &str, &str, &str, Option<&str>)] = &[
        // (namespace, name, labels, description, expected bound waypoint "ns/name" | "unresolved" | none)
        (
            "ns-a",
            "se1",
            "",
            "namespace label applies",
            Some("ns-a/wp-a"),
        ),
        (
            "ns-a",
            "se2",
            "istio.io/use-waypoint: wp-svc",
            "resource label beats namespace",
            Some("ns-a/wp-svc"),
        ),
        (
            "ns-a",
            "se3",
            "istio.io/use-waypoint: none",
            "none opts out",
            None,
        ),
        ("ns-b", "se4", "", "no labels", None),
        (
            "ns-b",
            "se5",
            "istio.io/use-waypoint: wp-x, istio.io/use-waypoint-namespace: shared",
            "other namespace, from All",
            Some("shared/wp-x"),
        ),
        (
            "ns-b",
            "se6",
            "istio.io/use-waypoint: wp-same, istio.io/use-waypoint-namespace: shared",
            "other namespace, from Same",
            Some("unresolved"),
        ),
        (
            "ns-b",
            "se7",
            "istio.io/use-waypoint: missing",
            "no such gateway",
            Some("unresolved"),
        ),
        (
            "ns-c",
            "se8",
            "",
            "namespace label with waypoint namespace",
            Some("shared/wp-x"),
        ),
        (
            "ns-b",
            "se9",
            "istio.io/use-waypoint: wp-wl",
            "workload-only waypoint",
            Some("unresolved"),
        ),
        (
            "ns-d",
            "se10",
            "istio.io/use-waypoint: wp-sel, istio.io/use-waypoint-namespace: shared",
            "selector admits team=blue",
            Some("shared/wp-sel"),
        ),
        (
            "ns-b",
            "se11",
            "istio.io/use-waypoint: wp-sel, istio.io/use-waypoint-namespace: shared",
            "selector rejects",
            Some("unresolved"),
        ),
        (
            "ns-a",
            "se12",
            "istio.io/use-waypoint: ingress",
            "not a waypoint class",
            Some("unresolved"),
        ),
    ];
    for (ns, name, labels, _, _) in cases {
        objs.push_str(&se(ns, name, &format!("{name}.example.com"), labels));
    }
    let s = must(&[("w.yaml", WAYPOINTS), ("se.yaml", &objs)]);
    for (_, name, _, what, want) in cases {
        let svc = s.service_by_host(&format!("{name}.example.com")).unwrap();
        let got = match &svc.waypoint {
            WaypointBinding::None => None,
            WaypointBinding::Bound(w) => Some(w.name.to_string()),
            WaypointBinding::Unresolved { .. } => Some("unresolved".to_string()),
        };
        assert_eq!(got.as_deref(), *want, "{name}: {what}");
    }
    // Addresses and identity.
    let wpa = s.waypoint(&NamespacedName::new("ns-a", "wp-a")).unwrap();
    assert_eq!(wpa.addresses, [ip("10.0.0.1")]);
    assert_eq!(
        wpa.identity.to_string(),
        "spiffe://cluster.local/ns/ns-a/sa/wp-a-sa",
        "pod's serviceAccountName wins"
    );
    let wpx = s.waypoint(&NamespacedName::new("shared", "wp-x")).unwrap();
    assert_eq!(
        wpx.identity.to_string(),
        "spiffe://cluster.local/ns/shared/sa/wp-x"
    );
    assert_eq!(wpx.allowed_from, AllowedFrom::All);
    let svc_wp = s.waypoint(&NamespacedName::new("ns-a", "wp-svc")).unwrap();
    assert_eq!(
        svc_wp.addresses,
        [ip("10.96.9.9")],
        "spec address when no pods"
    );
    assert_eq!(
        svc_wp.hbone_addrs().collect::<Vec<_>>(),
        [sa("10.96.9.9:15008")]
    );
    assert!(
        s.waypoint(&NamespacedName::new("ns-a", "ingress"))
            .is_none()
    );
    // Workload-addressed traffic: pod label with a workload waypoint binds; the namespace label
    // aimed at services does not capture workload traffic; waypoint pods are never bound.
    assert_eq!(
        s.workload_by_ip(ip("10.1.0.2"))
            .unwrap()
            .waypoint
            .waypoint()
            .unwrap()
            .name
            .to_string(),
        "ns-b/wp-wl"
    );
    assert!(s.workload_by_ip(ip("10.1.0.1")).unwrap().waypoint.is_none());
    let wp_pod = s.workload_by_ip(ip("10.0.0.1")).unwrap();
    assert!(wp_pod.waypoint.is_none());
    assert_eq!(
        wp_pod.waypoint_of,
        Some(NamespacedName::new("ns-a", "wp-a"))
    );
    // What a waypoint serves.
    let served: Vec<_> = s
        .services_for_waypoint(&NamespacedName::new("shared", "wp-x"))
        .map(|s| s.hostname.clone())
        .collect();
    assert_eq!(served, ["se5.example.com", "se8.example.com"]);
}

const LOOKUPS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http-web, port: 80, targetPort: 8080}, {name: grpc, port: 9000, targetPort: grpc-port}]
  selector: {app: web}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}, annotations: {strait.dev/netns: /run/netns/web-0}}
spec:
  nodeName: node-1
  containers: [{name: c, ports: [{name: grpc-port, containerPort: 9090}]}]
status: {podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}, {ip: "fd00::5"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-2}
status: {podIP: 10.244.2.5}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: ext}
spec:
  hosts: ["*.example.com"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: exact, namespace: ext}
spec:
  hosts: [api.example.com]
  addresses: [192.0.2.10]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: ext}
spec:
  hosts: [db.internal]
  addresses: [198.51.100.0/24]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 198.51.100.7, ports: {tcp: 6432}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: noalloc, namespace: ext, labels: {networking.istio.io/enable-autoallocate-ip: "false"}}
spec:
  hosts: [noalloc.example.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
"#;

#[test]
fn lookup_tables() {
    let s = must(&[("l.yaml", LOOKUPS)]);
    // address → service
    let by_addr: &[(&str, Option<(&str, &str)>)] = &[
        (
            "10.96.0.10:80",
            Some(("web.shop.svc.cluster.local", "http-web")),
        ),
        (
            "10.96.0.10:9000",
            Some(("web.shop.svc.cluster.local", "grpc")),
        ),
        ("10.96.0.10:81", None),
        ("192.0.2.10:443", Some(("api.example.com", "https"))),
        ("198.51.100.99:5432", Some(("db.internal", "tcp"))),
        ("198.51.101.1:5432", None),
        ("10.244.1.5:80", None),
    ];
    for (addr, want) in by_addr {
        let got = s
            .service_by_addr(sa(addr))
            .map(|r| (r.service.hostname.as_str(), r.port.name.as_str()));
        assert_eq!(got, *want, "{addr}");
    }
    // hostname → service
    let by_host: &[(&str, Option<&str>)] = &[
        ("api.example.com", Some("ext/exact")),
        ("API.Example.com.", Some("ext/exact")),
        ("www.example.com", Some("ext/wild")),
        ("a.b.example.com", Some("ext/wild")),
        ("example.com", None),
        ("web.shop.svc.cluster.local", Some("shop/web")),
        ("web", None),
    ];
    for (h, want) in by_host {
        assert_eq!(
            s.service_by_host(h).map(|x| x.name.to_string()).as_deref(),
            *want,
            "{h}"
        );
    }
    // workloads
    let w = s.workload_by_ip(ip("fd00::5")).unwrap();
    assert_eq!(w.name.to_string(), "shop/web-0");
    assert_eq!(
        w.netns.as_deref(),
        Some(std::path::Path::new("/run/netns/web-0"))
    );
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/shop/sa/default"
    );
    assert_eq!(
        s.workloads_on_node("node-1")
            .iter()
            .map(|w| w.name.name.as_str())
            .collect::<Vec<_>>(),
        ["web-0"]
    );
    assert!(s.workloads_on_node("node-9").is_empty());
    assert!(
        matches!(s.lookup_addr(sa("10.244.2.5:8080")), Some(AddressMatch::Workload(w)) if w.name.name == "web-1")
    );
    assert!(matches!(
        s.lookup_addr(sa("10.96.0.10:80")),
        Some(AddressMatch::Service(_))
    ));
    // endpoints and ports
    let web = s.service_by_host("web.shop.svc.cluster.local").unwrap();
    assert_eq!(web.endpoints.len(), 3, "web-0 (two IPs) and web-1");
    let grpc = web.port(9000).unwrap();
    let ep0 = web
        .endpoints
        .iter()
        .find(|e| e.workload.as_ref().unwrap().name == "web-0")
        .unwrap();
    let ep1 = web
        .endpoints
        .iter()
        .find(|e| e.workload.as_ref().unwrap().name == "web-1")
        .unwrap();
    assert_eq!(
        web.endpoint_port(ep0, grpc),
        9090,
        "named targetPort resolved from container ports"
    );
    assert_eq!(web.endpoint_port(ep0, web.port(80).unwrap()), 8080);
    assert_eq!(
        web.endpoint_port(ep1, grpc),
        9000,
        "unresolvable named port falls back to the service port"
    );
    let db = s.service_by_host("db.internal").unwrap();
    assert_eq!(
        db.endpoint_port(&db.endpoints[0], db.port(5432).unwrap()),
        6432
    );
    // DNS: exact names only; wildcard and opted-out hosts have no answer.
    assert_eq!(
        s.resolve_name("api.example.com"),
        Some(&[ip("192.0.2.10")][..])
    );
    assert_eq!(
        s.resolve_name("web.shop.svc.cluster.local"),
        Some(&[ip("10.96.0.10")][..])
    );
    assert_eq!(s.resolve_name("www.example.com"), None);
    assert_eq!(s.resolve_name("noalloc.example.org"), None);
    assert!(
        s.service_by_host("noalloc.example.org")
            .unwrap()
            .vips
            .is_empty()
    );
}

fn vips(s: &Snapshot) -> BTreeMap<String, Vec<IpAddr>> {
    s.services()
        .iter()
        .filter(|x| x.auto_allocated)
        .map(|x| (x.hostname.clone(), x.vips.clone()))
        .collect()
}

#[test]
fn vip_allocation_is_stable() {
    let base: String = ["aliyun.com", "www.aliyun.com", "httpbin.org", "taobao.com"]
        .iter()
        .enumerate()
        .map(|(i, h)| se("ext", &format!("s{i}"), h, ""))
        .collect();
    let a = must(&[("a.yaml", &base)]);
    let b = must(&[("a.yaml", &base)]);
    assert_eq!(vips(&a), vips(&b), "same config, same VIPs");
    assert_eq!(vips(&a).len(), 4);
    // Multi-host ServiceEntries get one VIP per host.
    let multi = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: m}\nspec: {hosts: [x.org, y.org], ports: [{number: 80, name: http}]}\n";
    let m = must(&[("m.yaml", multi)]);
    let vm = vips(&m);
    assert_eq!(vm.len(), 2);
    assert_ne!(vm["x.org"], vm["y.org"]);
    // Adding unrelated hosts does not move the existing VIPs (no collision among these).
    let more = format!(
        "{base}{}{}",
        se("ext", "n1", "example.org", ""),
        se("other", "n2", "example.net", "")
    );
    let c = must(&[("a.yaml", &more)]);
    let vc = vips(&c);
    for (h, v) in vips(&a) {
        assert_eq!(vc[&h], v, "{h} moved");
    }
    // An explicit address inside the range is never handed out again.
    let home = vips(&a)["aliyun.com"][0];
    let taken = format!(
        "{base}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: pinned, namespace: ext}}\nspec: {{hosts: [pinned.org], addresses: [{home}], ports: [{{number: 80, name: http}}]}}\n"
    );
    let d = must(&[("a.yaml", &taken)]);
    assert_ne!(vips(&d)["aliyun.com"][0], home);
    assert_eq!(
        d.service_by_addr(SocketAddr::new(home, 80))
            .unwrap()
            .service
            .hostname,
        "pinned.org"
    );
}

#[test]
fn asm_policy_compiles_to_waypoint_binding_and_authz() {
    let text =
        std::fs::read_to_string(seeds_dir().join("003-example3-http-tcp-auto-ports.yaml")).unwrap();
    let extra = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: egressgateway-a, namespace: istio-egress}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: egressgateway-a-0, namespace: istio-egress, labels: {gateway.networking.k8s.io/gateway-name: egressgateway-a}}
status: {podIP: 10.244.9.9}
"#;
    let s = must(&[("asm.yaml", &text), ("gw.yaml", extra)]);
    let svc = s.service_by_host("aliyun.com").unwrap();
    assert_eq!(
        svc.waypoint.waypoint().unwrap().name.to_string(),
        "istio-egress/egressgateway-a"
    );
    let authz = s.authz_for_service(svc);
    let sleep: mesh_config::model::Labels = [("app".into(), "sleep".into())].into();
    let curl: mesh_config::model::Labels = [("app".into(), "curl".into())].into();
    let headers = http::HeaderMap::new();
    let cases = [
        (
            "sleep in default, port 80",
            "spiffe://cluster.local/ns/default/sa/sleep",
            &sleep,
            80,
            true,
        ),
        (
            "sleep in default, port 443",
            "spiffe://cluster.local/ns/default/sa/sleep",
            &sleep,
            443,
            true,
        ),
        (
            "other workload in default",
            "spiffe://cluster.local/ns/default/sa/curl",
            &curl,
            80,
            false,
        ),
        (
            "right labels, other namespace",
            "spiffe://cluster.local/ns/prod/sa/sleep",
            &sleep,
            80,
            false,
        ),
        (
            "undeclared port",
            "spiffe://cluster.local/ns/default/sa/sleep",
            &sleep,
            8080,
            false,
        ),
    ];
    for (what, principal, labels, port, allow) in cases {
        let a = RequestAttrs {
            source_principal: Some(principal),
            source_labels: Some(labels),
            destination_port: port,
            http: Some(HttpAttrs {
                host: "aliyun.com",
                method: "GET",
                path: "/",
                headers: &headers,
            }),
            ..Default::default()
        };
        assert_eq!(authz.evaluate(&a).is_allow(), allow, "{what}");
    }
    // The TCP entry by IP is reachable through the same waypoint.
    let tcp = s.service_by_addr(sa("1.1.1.1:44")).unwrap();
    assert!(tcp.service.waypoint.waypoint().is_some());
}

#[test]
fn policy_attachment() {
    let cfg = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: istio-egress}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw-deny-delete, namespace: istio-egress}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: se-allow, namespace: istio-egress}
spec:
  targetRef: {group: networking.istio.io, kind: ServiceEntry, name: aliyun}
  rules: [{from: [{source: {namespaces: [default]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all-waypoints-audit, namespace: istio-system}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}]
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-deny-ip, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: [203.0.113.0/24]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny-port, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ["2222"]}}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: istio-egress}
spec: {hosts: [aliyun.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
status: {podIP: 10.1.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: other-0, namespace: other}
status: {podIP: 10.1.1.3}
"#;
    let s = must(&[("p.yaml", cfg)]);
    let gw = s.authz_for_waypoint(&NamespacedName::new("istio-egress", "waypoint"));
    assert_eq!(
        (gw.deny().len(), gw.audit().len(), gw.allow().len()),
        (1, 1, 0)
    );
    let svc = s.service_by_host("aliyun.com").unwrap();
    let se = s.authz_for_service(svc);
    assert_eq!(se.allow().len(), 1);
    let h = http::HeaderMap::new();
    let principals: Vec<String> = ["default", "prod"]
        .iter()
        .map(|ns| format!("spiffe://cluster.local/ns/{ns}/sa/x"))
        .collect();
    let attrs = |ns: usize, method: &'static str| RequestAttrs {
        source_principal: Some(principals[ns].as_str()),
        destination_port: 80,
        http: Some(HttpAttrs {
            host: "aliyun.com",
            method,
            path: "/",
            headers: &h,
        }),
        ..Default::default()
    };
    let eval = |a: &RequestAttrs<'_>| mesh_config::authz::evaluate_all(&[gw, se], a);
    assert_eq!(eval(&attrs(0, "GET")), Decision::Allow);
    assert_eq!(
        eval(&attrs(0, "DELETE")),
        Decision::Deny {
            policy: Some(NamespacedName::new("istio-egress", "gw-deny-delete"))
        }
    );
    assert_eq!(eval(&attrs(1, "GET")), Decision::Deny { policy: None });
    assert_eq!(gw.audit_matches(&attrs(0, "GET")).count(), 1);
    // Workloads: selector + namespace-wide + mesh-wide.
    let counts = |ipa: &str| {
        let w = s.workload_by_ip(ip(ipa)).unwrap();
        let a = s.authz_for_workload(w);
        (a.allow().len(), a.deny().len())
    };
    assert_eq!(
        counts("10.1.1.1"),
        (1, 2),
        "web: selector allow, ns deny, mesh deny"
    );
    assert_eq!(counts("10.1.1.2"), (0, 2), "db: ns deny, mesh deny");
    assert_eq!(
        counts("10.1.1.3"),
        (0, 1),
        "other namespace: mesh deny only"
    );
    let web = s.workload_by_ip(ip("10.1.1.1")).unwrap();
    let l4 = |principal: &'static str, src: &str, port: u16| RequestAttrs {
        source_principal: Some(principal),
        source_ip: Some(ip(src)),
        destination_port: port,
        ..Default::default()
    };
    let a = s.authz_for_workload(web);
    assert!(
        a.evaluate(&l4(
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "10.9.9.9",
            8080
        ))
        .is_allow()
    );
    assert!(
        !a.evaluate(&l4(
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "203.0.113.5",
            8080
        ))
        .is_allow()
    );
    assert!(
        !a.evaluate(&l4(
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "10.9.9.9",
            2222
        ))
        .is_allow()
    );
    assert!(
        !a.evaluate(&l4(
            "spiffe://cluster.local/ns/shop/sa/backend",
            "10.9.9.9",
            8080
        ))
        .is_allow()
    );
}

#[test]
fn mesh_config_and_capture_annotations() {
    let cfg = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    trustDomain: example.org
    accessLogFile: /dev/stdout
    defaultConfig: {discoveryAddress: istiod:15012}
    outboundTrafficPolicy: {mode: REGISTRY_ONLY}
---
apiVersion: v1
kind: Namespace
metadata:
  name: istio-system
  annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: "9999"}
---
apiVersion: v1
kind: Namespace
metadata:
  name: apps
  annotations: {traffic.sidecar.istio.io/includeOutboundIPRanges: "10.96.0.0/12"}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: apps}
spec: {serviceAccountName: sa}
status: {podIP: 10.2.0.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: b
  namespace: apps
  annotations: {traffic.sidecar.istio.io/includeOutboundIPRanges: "*", traffic.sidecar.istio.io/excludeOutboundIPRanges: "1.1.1.1/32"}
status: {podIP: 10.2.0.2}
"#;
    let s = must(&[("m.yaml", cfg)]);
    assert_eq!(
        s.outbound_traffic_policy(),
        OutboundTrafficPolicy::RegistryOnly
    );
    assert_eq!(s.trust_domain(), "example.org");
    let a = s.workload_by_ip(ip("10.2.0.1")).unwrap();
    let b = s.workload_by_ip(ip("10.2.0.2")).unwrap();
    assert_eq!(a.identity.to_string(), "spiffe://example.org/ns/apps/sa/sa");
    let cases = [
        (a, "10.96.0.1:80", true),
        (a, "8.8.8.8:80", false),
        (a, "10.96.0.1:9999", false),
        (b, "8.8.8.8:80", true),
        (b, "1.1.1.1:80", false),
        (b, "8.8.8.8:9999", false),
    ];
    for (w, dst, want) in cases {
        assert_eq!(
            w.capture.captures_outbound(sa(dst)),
            want,
            "{} {dst}",
            w.name
        );
    }
    // Defaults without any ConfigMap.
    let d = must(&[(
        "x.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
    )]);
    assert_eq!(d.outbound_traffic_policy(), OutboundTrafficPolicy::AllowAny);
    assert_eq!(d.trust_domain(), "cluster.local");
}

#[test]
fn routes_and_destination_rules_by_host() {
    let cfg = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wild, namespace: ext}
spec:
  hosts: ["*.example.com"]
  http: [{route: [{destination: {host: fallback.example.com}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: ext}
spec:
  hosts: [api.example.com]
  http: [{timeout: 3s, route: [{destination: {host: api.example.com}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: wild, namespace: ext}
spec:
  host: "*.example.com"
  trafficPolicy: {tls: {mode: SIMPLE}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    connectionPool: {http: {http2MaxRequests: 10}}
    portLevelSettings: [{port: {number: 9080}, tls: {mode: ISTIO_MUTUAL}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules: [{backendRefs: [{name: reviews-v2, port: 9080}]}]
"#;
    let s = must(&[("r.yaml", cfg)]);
    assert_eq!(
        s.routes_for_host("api.example.com").unwrap().http[0].timeout,
        Some(std::time::Duration::from_secs(3))
    );
    assert!(
        s.routes_for_host("www.example.com").unwrap().http[0]
            .timeout
            .is_none()
    );
    assert!(s.routes_for_host("example.org").is_none());
    let r = s.routes_for_host("reviews.shop.svc.cluster.local").unwrap();
    assert_eq!(
        r.http[0].matches[0].port,
        Some(9080),
        "HTTPRoute parent port becomes a match"
    );
    assert_eq!(
        s.upstream_tls("x.example.com", 443, None).unwrap().mode,
        mesh_config::TlsMode::Simple
    );
    let dr = s
        .destination_policy("reviews.shop.svc.cluster.local")
        .unwrap();
    assert_eq!(
        dr.resolve(9080, None).tls.unwrap().mode,
        mesh_config::TlsMode::IstioMutual
    );
    assert!(dr.resolve(80, None).tls.is_none());
    assert_eq!(
        dr.resolve(80, None)
            .connection_pool
            .unwrap()
            .http2_max_requests,
        Some(10)
    );
}

#[test]
fn embedded_default_config() {
    let s = mesh_config::embedded::default_snapshot().unwrap_or_else(|e| panic!("{e}"));
    let aliyun = s.service_by_host("aliyun.com").unwrap();
    let w = aliyun
        .waypoint
        .waypoint()
        .expect("istio-egress namespace label binds the waypoint");
    assert_eq!(w.addresses, [ip("10.244.1.20")]);
    let sleep = s.workload_by_ip(ip("10.244.1.10")).unwrap();
    assert_eq!(
        sleep.netns.as_deref(),
        Some(std::path::Path::new("/run/netns/sleep"))
    );
    assert_eq!(s.workloads_on_node("node-1").len(), 2);
    // The embedded copy matches the directory on disk.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default");
    let from_dir = mesh_config::load_dir(&dir).unwrap();
    assert_eq!(
        serde_json::to_string(&from_dir).unwrap(),
        serde_json::to_string(&s).unwrap()
    );
}

/// One pod: (name, node, ip, annotations, labels, in the mesh).
type MeshCase<'a> = (
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
    &'a str,
    bool,
);

#[test]
fn in_mesh_needs_a_captured_pod_with_a_node_and_an_address() {
    let cases: &[MeshCase<'_>] = &[
        (
            "netns",
            Some("n1"),
            Some("10.244.0.1"),
            "strait.dev/netns: /run/netns/a",
            "{}",
            true,
        ),
        (
            "marker",
            Some("n2"),
            Some("10.244.0.2"),
            "strait.dev/captured: \"true\"",
            "{}",
            true,
        ),
        ("neither", Some("n2"), Some("10.244.0.3"), "{}", "{}", false),
        (
            "marker-false",
            Some("n2"),
            Some("10.244.0.4"),
            "strait.dev/captured: \"false\"",
            "{}",
            false,
        ),
        (
            "opted-out",
            Some("n2"),
            Some("10.244.0.5"),
            "strait.dev/captured: \"true\"",
            "{istio.io/dataplane-mode: none}",
            false,
        ),
        (
            "ambient",
            Some("n2"),
            Some("10.244.0.6"),
            "strait.dev/captured: \"true\"",
            "{istio.io/dataplane-mode: ambient}",
            true,
        ),
        (
            "waypoint",
            Some("n2"),
            Some("10.244.0.7"),
            "strait.dev/captured: \"true\"",
            "{gateway.networking.k8s.io/gateway-name: wp}",
            false,
        ),
        (
            "no-node",
            None,
            Some("10.244.0.8"),
            "strait.dev/captured: \"true\"",
            "{}",
            false,
        ),
        (
            "no-ip",
            Some("n2"),
            None,
            "strait.dev/captured: \"true\"",
            "{}",
            false,
        ),
    ];
    let yaml: Vec<String> = cases
        .iter()
        .map(|(name, node, ip, ann, labels, _)| {
            let ann = if ann.starts_with('{') { (*ann).to_owned() } else { format!("{{{ann}}}") };
            let node = node.map(|n| format!("nodeName: {n}")).unwrap_or_default();
            let ip = ip.map(|i| format!("podIP: {i}")).unwrap_or_default();
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, annotations: {ann}, labels: {labels}}}\nspec: {{{node}}}\nstatus: {{{ip}}}\n"
            )
        })
        .collect();
    let s = must(&[("pods.yaml", &yaml.join("---\n"))]);
    for (name, .., want) in cases {
        let w = s
            .workloads()
            .iter()
            .find(|w| w.name.name == *name)
            .unwrap_or_else(|| panic!("pod {name} not compiled"));
        assert_eq!(w.in_mesh(), *want, "{name}");
    }
    assert!(
        s.workloads()
            .iter()
            .find(|w| w.name.name == "marker")
            .unwrap()
            .captured
    );
    assert!(
        s.workloads()
            .iter()
            .find(|w| w.name.name == "marker")
            .unwrap()
            .netns
            .is_none()
    );
}
