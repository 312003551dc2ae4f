//! `check` / `dump` (library side of the `mesh-config` binary).
use std::path::Path;

#[test]
fn check_reports_every_error_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nstatus: {podIP: y}\n",
    )
    .unwrap();
    let mut out = Vec::new();
    assert!(!mesh_config::cli::check(dir.path(), &mut out).unwrap());
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("bad.yaml:document 1: Pod default/a: status.podIP:"),
        "{text}"
    );
    assert!(
        text.contains("bad.yaml:document 2: Pod default/b: status.podIP:"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("2 error(s)"), "{text}");
}

#[test]
fn check_and_dump_default_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default");
    let mut out = Vec::new();
    assert!(mesh_config::cli::check(&dir, &mut out).unwrap());
    assert!(
        String::from_utf8(out)
            .unwrap()
            .contains("OK (2 services, 2 workloads, 1 waypoints)")
    );
    let mut out = Vec::new();
    assert!(mesh_config::cli::dump(&dir, &mut out).unwrap());
    let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(json["mesh"]["outbound_traffic_policy"], "ALLOW_ANY");
    let hosts: Vec<&str> = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["aliyun.com", "sleep.default.svc.cluster.local"]);
    assert!(json["dns"]["aliyun.com"].as_array().unwrap().len() == 2);
}
