//! Istio's older API versions load exactly like v1: a control plane before Istio 1.22 serves
//! (and kube-source hands over) `networking.istio.io/v1beta1` / `v1alpha3` and
//! `security.istio.io/v1beta1`; the fields we read are the same.
mod common;
use common::*;

/// A ServiceEntry, DestinationRule, VirtualService and AuthorizationPolicy, with the apiVersion
/// of each group substituted.
fn mesh(networking: &str, security: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/{networking}
kind: ServiceEntry
metadata: {{name: aliyun-com-ext, namespace: default}}
spec:
  hosts: [www.aliyun.com]
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  - {{number: 443, name: https, protocol: HTTPS}}
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/{networking}
kind: DestinationRule
metadata: {{name: aliyun-com, namespace: default}}
spec:
  host: www.aliyun.com
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls: {{mode: SIMPLE}}
---
apiVersion: networking.istio.io/{networking}
kind: VirtualService
metadata: {{name: aliyun-com-ext, namespace: default}}
spec:
  hosts: [www.aliyun.com]
  http:
  - fault: {{delay: {{percent: 100, fixedDelay: 5s}}}}
    route:
    - destination: {{host: www.aliyun.com}}
      weight: 100
---
apiVersion: security.istio.io/{security}
kind: AuthorizationPolicy
metadata: {{name: no-delete, namespace: default}}
spec:
  action: DENY
  targetRefs:
  - {{group: networking.istio.io, kind: ServiceEntry, name: aliyun-com-ext}}
  rules:
  - to: [{{operation: {{methods: [DELETE], paths: ["/admin*"]}}}}]
"#
    )
}

fn compiled(networking: &str, security: &str) -> serde_json::Value {
    let text = mesh(networking, security);
    let snap = must(&[("mesh.yaml", &text)]);
    // Everything was read: a skipped object would make the comparison below vacuous.
    let se = snap
        .service_by_host("www.aliyun.com")
        .expect("ServiceEntry");
    assert_eq!(snap.authz_for_service(se).deny().len(), 1);
    assert!(snap.routes_for_host("www.aliyun.com").is_some());
    assert!(snap.destination_policy("www.aliyun.com").is_some());
    serde_json::to_value(&snap).expect("snapshot serializes")
}

#[test]
fn older_istio_versions_compile_like_v1() {
    let v1 = compiled("v1", "v1");
    for (networking, security) in [("v1beta1", "v1beta1"), ("v1alpha3", "v1beta1")] {
        assert_eq!(
            compiled(networking, security),
            v1,
            "networking.istio.io/{networking}, security.istio.io/{security}"
        );
    }
}

#[test]
fn unserved_versions_are_rejected_not_skipped() {
    // A version Istio never had for the kind is an error naming it, never silently dropped.
    let text = mesh("v1", "v1alpha1");
    let err = load(&[("mesh.yaml", &text)]).expect_err("security.istio.io/v1alpha1");
    let msg = err.to_string();
    assert!(
        msg.contains("security.istio.io/v1alpha1") && msg.contains("AuthorizationPolicy"),
        "{msg}"
    );
}
