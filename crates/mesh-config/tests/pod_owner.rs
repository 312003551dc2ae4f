//! Pods carry what a workload name is derived from: `generateName` and the controlling owner
//! reference (only the one with `controller: true`).
use std::net::IpAddr;

use mesh_config::Controller;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9c8f6-x2x4z
  generateName: web-7d4b9c8f6-
  namespace: shop
  labels: {app: web, pod-template-hash: 7d4b9c8f6}
  ownerReferences:
  - {apiVersion: v1, kind: ConfigMap, name: not-a-controller, uid: 1}
  - {apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4b9c8f6, uid: 2, controller: true, blockOwnerDeletion: true}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Pod
metadata:
  name: bare
  namespace: shop
  ownerReferences: [{kind: ReplicaSet, name: not-controlling}]
status: {podIP: 10.0.0.6}
"#;

#[test]
fn controller_and_generate_name_are_kept() {
    let snap = mesh_config::load_sources([("pods.yaml", PODS)]).expect("compiles");
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    let web = snap.workload_by_ip(ip("10.0.0.5")).expect("web");
    assert_eq!(web.generate_name.as_deref(), Some("web-7d4b9c8f6-"));
    assert_eq!(
        web.controller,
        Some(Controller {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: "web-7d4b9c8f6".into(),
        })
    );
    let bare = snap.workload_by_ip(ip("10.0.0.6")).expect("bare");
    assert_eq!(bare.generate_name, None);
    assert_eq!(bare.controller, None, "an owner that is not the controller");
}
