//! Error reporting: every problem at once, each located as
//! `file:document N: Kind namespace/name: field.path: problem`.
mod common;
use common::*;

const A: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: typo}
spec:
  hostz: [aliyun.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad-regex, namespace: apps}
spec:
  hosts: [aliyun.com]
  http:
  - match: [{uri: {regex: "(unclosed"}}]
    route: [{destination: {host: aliyun.com}}]
    timeout: ten seconds
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dup}
spec:
  hosts: [a.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
spec: {whatever: true}
"#;

const B: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dup}
spec:
  hosts: [b.example.com]
  ports: [{number: 80, name: http, protocol: SMTP}]
  resolution: DNS
"#;

const C: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt}
spec:
  rules:
  - when:
    - key: request.auth.claims[iss]
      values: ["https://issuer"]
---
apiVersion: security.istio.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: old}
spec: {}
"#;

const D: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x\n";

#[test]
fn all_errors_reported_with_locations() {
    let err = load(&[
        ("a.yaml", A),
        ("b.yaml", B),
        ("team/c.yaml", C),
        ("d.yaml", D),
    ])
    .unwrap_err();
    let lines: Vec<String> = err.iter().map(|e| e.to_string()).collect();
    let expect_prefixes = [
        "a.yaml:document 1: ServiceEntry default/typo: spec.hostz: unknown field `hostz`, expected one of `hosts`",
        "a.yaml:document 2: VirtualService apps/bad-regex: spec.http[0].match[0].uri.regex: invalid regex \"(unclosed\"",
        "a.yaml:document 2: VirtualService apps/bad-regex: spec.http[0].timeout: invalid duration \"ten seconds\"",
        "b.yaml:document 1: ServiceEntry default/dup: duplicate ServiceEntry default/dup: already defined at a.yaml:document 3",
        "team/c.yaml:document 1: AuthorizationPolicy team/jwt: spec.rules[0].when[0].key: unsupported condition key \"request.auth.claims[iss]\"",
        "team/c.yaml:document 2: AuthorizationPolicy old: apiVersion: apiVersion \"security.istio.io/v1alpha1\" is not supported",
        "d.yaml:document 1: invalid YAML:",
    ];
    for p in expect_prefixes {
        assert!(
            lines.iter().any(|l| l.starts_with(p)),
            "missing {p:?} in:\n{}",
            lines.join("\n")
        );
    }
    assert_eq!(lines.len(), expect_prefixes.len(), "{}", lines.join("\n"));
    // The structured fields are there for tools.
    let e = err
        .iter()
        .find(|e| e.kind.as_deref() == Some("VirtualService"))
        .unwrap();
    assert_eq!(
        (e.file.as_str(), e.document, e.object.as_deref()),
        ("a.yaml", Some(2), Some("apps/bad-regex"))
    );
}

#[test]
fn semantic_errors_in_several_objects_at_once() {
    let bad = r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: s1}
spec:
  hosts: ["bad host!"]
  ports: [{number: 70000, name: x}]
  resolution: SOMETIMES
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: d1}
spec:
  host: aliyun.com
  trafficPolicy:
    tls: {mode: MAYBE}
---
apiVersion: v1
kind: Pod
metadata:
  name: p1
  annotations:
    traffic.sidecar.istio.io/includeOutboundIPRanges: "10.0.0.0/40"
    strait.dev/netns: relative/path
status: {podIP: not-an-ip}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: SOMETIMES
"#;
    let err = load(&[("x.yaml", bad)]).unwrap_err();
    let got: Vec<(String, String)> = err
        .iter()
        .map(|e| {
            (
                format!(
                    "{} {}",
                    e.kind.clone().unwrap_or_default(),
                    e.object.clone().unwrap_or_default()
                ),
                e.path.clone().unwrap_or_default(),
            )
        })
        .collect();
    let want = [
        ("ServiceEntry default/s1", "spec.resolution"),
        ("ServiceEntry default/s1", "spec.ports[0].number"),
        ("ServiceEntry default/s1", "spec.hosts[0]"),
        ("DestinationRule default/d1", "spec.trafficPolicy.tls.mode"),
        ("Pod default/p1", "status.podIP"),
        ("Pod default/p1", "metadata.annotations.strait.dev/netns"),
        (
            "Pod default/p1",
            "metadata.annotations.traffic.sidecar.istio.io/includeOutboundIPRanges",
        ),
        (
            "ConfigMap istio-system/istio",
            "data.mesh.outboundTrafficPolicy.mode",
        ),
    ];
    for (obj, path) in want {
        assert!(
            got.iter().any(|(o, p)| o == obj && p == path),
            "missing {obj} {path} in {got:#?}"
        );
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");
}

#[test]
fn unknown_kinds_are_skipped_and_core_kinds_tolerate_extra_fields() {
    let s = must(&[(
        "k.yaml",
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: sa}
---
apiVersion: v1
kind: Pod
metadata:
  name: p
  uid: 1234
  resourceVersion: "5"
  managedFields: [{manager: kubectl}]
spec:
  serviceAccountName: sa
  containers: [{name: c, image: busybox, command: [sleep]}]
  tolerations: []
status:
  phase: Running
  podIP: 10.0.0.1
  conditions: [{type: Ready, status: "True"}]
"#,
    )]);
    assert_eq!(s.workloads().len(), 1);
}

#[test]
fn namespace_from_directory_and_default() {
    let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec: {hosts: [HOST], ports: [{number: 80, name: http}]}\n";
    let s = must(&[
        ("top.yaml", &se.replace("HOST", "a.com")),
        (
            "istio-egress/nested/deeper.yaml",
            &se.replace("HOST", "b.com"),
        ),
        (
            "explicit/x.yaml",
            &se.replace("HOST", "c.com")
                .replace("{name: s}", "{name: s, namespace: chosen}"),
        ),
    ]);
    assert_eq!(
        s.service_by_host("a.com").unwrap().name.namespace,
        "default"
    );
    assert_eq!(
        s.service_by_host("b.com").unwrap().name.namespace,
        "istio-egress"
    );
    assert_eq!(s.service_by_host("c.com").unwrap().name.namespace, "chosen");
}

#[test]
fn every_structural_error_in_one_document() {
    // serde stops at the first problem; the loader keeps going past each one, and the field
    // it had to drop (`number`) does not come back as a spurious "missing field".
    let se = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: many, namespace: egress}
spec:
  hosts: [aliyun.com]
  exportTo: ["."]
  colour: blue
  ports:
  - {number: eighty, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: TLS, tls: true}
  resolution: DNS
"#;
    let err = load(&[("se.yaml", se)]).unwrap_err();
    let got: Vec<(Option<&str>, &str)> = err
        .iter()
        .map(|e| (e.path.as_deref(), e.message.as_str()))
        .collect();
    let want = [
        ("spec.colour", "unknown field `colour`"),
        ("spec.ports[0].number", "invalid type: string \"eighty\""),
        ("spec.ports[1].tls", "unknown field `tls`"),
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for ((path, msg), (want_path, want_msg)) in got.iter().zip(want) {
        assert_eq!(*path, Some(want_path), "{got:#?}");
        assert!(msg.starts_with(want_msg), "{msg:?} for {want_path}");
    }
    let lines: Vec<String> = err.iter().map(|e| e.to_string()).collect();
    assert!(
        lines[0].starts_with("se.yaml:document 1: ServiceEntry egress/many: spec.colour: "),
        "{}",
        lines[0]
    );
}
