//! Cached objects → mesh-config sources. Pure except for the netns scan handed in.
//!
//! Each object becomes one JSON "file" (JSON is YAML) named `<namespace>/<plural>/<name>` (or
//! `<plural>/<name>` for cluster-scoped kinds), so mesh-config's errors read
//! `istio-egress/virtualservices/foo:document 1: VirtualService istio-egress/foo: spec…: …`.
use crate::kinds::{DESTINATION_RULE, KINDS, KindSpec, NAMESPACE, POD, SECRET};
use crate::netns::{NetnsDiscovery, normalise_uid_any};
use kube::api::DynamicObject;
use mesh_config::snapshot::{CAPTURED_ANNOTATION, DATAPLANE_MODE_LABEL, NETNS_ANNOTATION};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{debug, warn};

/// Annotation `kubectl apply` leaves on objects: a full copy of the object, never read here.
pub(crate) const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what is never read, to keep the cache (and every rebuild) small.
pub(crate) fn strip(obj: &mut DynamicObject) {
    obj.metadata.managed_fields = None;
    if let Some(a) = obj.metadata.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// The objects of every kind, index-aligned with [`KINDS`].
pub(crate) type Objects = Vec<Vec<Arc<DynamicObject>>>;

/// Result of [`sources`]: the loader input, in a stable order.
#[derive(Debug, Default)]
pub(crate) struct Sources {
    pub files: Vec<(String, String)>,
    /// Running pods on this node whose netns was not found.
    pub pods_without_netns: usize,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

/// Namespaces enrolled in the ambient mesh (label `istio.io/dataplane-mode: ambient`).
struct Enrolled<'a>(HashSet<&'a str>);

impl<'a> Enrolled<'a> {
    fn new(objects: &'a Objects) -> Self {
        let namespaces = objects
            .get(NAMESPACE)
            .map(Vec::as_slice)
            .unwrap_or_default();
        Enrolled(
            namespaces
                .iter()
                .filter(|ns| dataplane_mode(ns) == Some("ambient"))
                .filter_map(|ns| ns.metadata.name.as_deref())
                .collect(),
        )
    }

    /// Istio's opt-in: the pod's own label, else its namespace's; the pod's `none` opts out of
    /// an enrolled namespace. Nothing is captured unless someone enrolled it (kube-system and
    /// every other namespace stay untouched).
    fn pod(&self, pod: &DynamicObject) -> bool {
        match dataplane_mode(pod) {
            Some("ambient") => true,
            Some(_) => false,
            None => pod
                .metadata
                .namespace
                .as_deref()
                .is_some_and(|ns| self.0.contains(ns)),
        }
    }
}

fn dataplane_mode(obj: &DynamicObject) -> Option<&str> {
    obj.metadata
        .labels
        .as_ref()?
        .get(DATAPLANE_MODE_LABEL)
        .map(String::as_str)
}

/// Whether ztunnel on `node` serves this pod: enrolled, scheduled here, running, own network
/// namespace.
fn captured_on(pod: &DynamicObject, node: &str, enrolled: &Enrolled) -> bool {
    enrolled.pod(pod)
        && str_at(&pod.data, &["spec", "nodeName"]) == Some(node)
        && str_at(&pod.data, &["status", "phase"]) == Some("Running")
        && pod
            .data
            .get("spec")
            .and_then(|s| s.get("hostNetwork"))
            .and_then(Value::as_bool)
            != Some(true)
}

/// Whether the ztunnel of the pod's own node serves it, so that it answers HBONE on 15008.
fn captured_anywhere(pod: &DynamicObject, enrolled: &Enrolled) -> bool {
    str_at(&pod.data, &["spec", "nodeName"])
        .filter(|n| !n.is_empty())
        .is_some_and(|node| captured_on(pod, node, enrolled))
}

/// Every `credentialName` a DestinationRule gives (at any level: traffic policy, port-level,
/// subsets). Walked generically so that no placement of the field is missed.
fn credential_names(rules: &[Arc<DynamicObject>]) -> HashSet<&str> {
    fn walk<'a>(v: &'a Value, out: &mut HashSet<&'a str>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("credentialName", Value::String(name)) => {
                            out.insert(name.as_str());
                        }
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = HashSet::new();
    for rule in rules {
        walk(&rule.data, &mut out);
    }
    out
}

/// Whether a Secret is one a DestinationRule names (or its `<name>-cacert` CA companion).
/// Only those reach the loader: the rest of a namespace's Secrets (service-account tokens,
/// Helm releases, API keys under a `key` field) are none of ours, and decoding them as TLS
/// material could only fail the whole snapshot over data nobody asked us to use.
fn is_referenced(secret: &DynamicObject, names: &HashSet<&str>) -> bool {
    let Some(name) = secret.metadata.name.as_deref() else {
        return false;
    };
    names.contains(name)
        || name
            .strip_suffix(mesh_config::secret::CA_SECRET_SUFFIX)
            .is_some_and(|n| names.contains(n))
}

/// Turns the cached objects into loader sources, each kind at the version it is watched at
/// (`versions`, index-aligned with [`KINDS`]). With `netns` (ztunnel: node name and
/// discovery), pods on that node get the [`NETNS_ANNOTATION`] of their network namespace.
/// Whatever the cluster says in that annotation is dropped: it names a namespace ztunnel
/// enters as root, so only our own discovery may set it.
///
/// Pods captured by their node's ztunnel get [`CAPTURED_ANNOTATION`] (also only ours; the
/// cluster's value is dropped), so that ztunnels of other nodes and the waypoint reach them over
/// HBONE. On our own node the netns is the sole truth: a pod whose namespace is not found yet
/// is not served here, so it gets no marker and is reached in plaintext until it is.
pub(crate) fn sources(
    objects: &Objects,
    versions: &[&str],
    netns: Option<(&str, &mut NetnsDiscovery)>,
) -> Sources {
    let mut found: HashMap<String, PathBuf> = HashMap::new();
    let mut wanted = 0usize;
    let node = netns.as_ref().map(|(n, _)| *n);
    let enrolled = Enrolled::new(objects);
    if let (Some((node, discovery)), Some(pods)) = (netns, objects.get(POD)) {
        let uids: Vec<&str> = pods
            .iter()
            .filter(|p| captured_on(p, node, &enrolled))
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        wanted = uids.len();
        found = discovery.resolve(uids);
    }
    let credentials = objects
        .get(DESTINATION_RULE)
        .map(|rules| credential_names(rules))
        .unwrap_or_default();
    let mut out = Sources::default();
    for ((spec, objs), version) in KINDS.iter().zip(objects).zip(versions) {
        let is_secret = std::ptr::eq(spec, &KINDS[SECRET]);
        let mut sorted: Vec<&Arc<DynamicObject>> = objs
            .iter()
            .filter(|o| !is_secret || is_referenced(o, &credentials))
            .collect();
        // Stable input order: the loader reports duplicates and merges VirtualServices in
        // load order, and a stable text lets unchanged input skip the rebuild.
        sorted.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        for obj in sorted {
            let is_pod = std::ptr::eq(spec, &KINDS[POD]);
            let netns = match node {
                Some(node) if is_pod && captured_on(obj, node, &enrolled) => {
                    let path = obj
                        .metadata
                        .uid
                        .as_deref()
                        .and_then(normalise_uid_any)
                        .and_then(|u| found.get(&u));
                    if path.is_none() {
                        out.pods_without_netns += 1;
                        debug!(pod = %obj_name(obj), "network namespace not found yet; will rescan");
                    }
                    path
                }
                _ => None,
            };
            let local = node.is_some() && str_at(&obj.data, &["spec", "nodeName"]) == node;
            let captured =
                is_pod && captured_anywhere(obj, &enrolled) && (!local || netns.is_some());
            match to_json(spec, version, obj, netns, captured) {
                Ok(text) => out.files.push((file_name(spec, obj), text)),
                // Cannot happen for data that came from JSON; never drop silently though.
                Err(error) => {
                    warn!(kind = spec.kind, object = %obj_name(obj), %error, "cannot serialize object")
                }
            }
        }
    }
    debug_assert!(out.pods_without_netns <= wanted);
    out
}

fn obj_name(obj: &DynamicObject) -> String {
    match (&obj.metadata.namespace, &obj.metadata.name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n.clone(),
        _ => "<unnamed>".into(),
    }
}

fn file_name(spec: &KindSpec, obj: &DynamicObject) -> String {
    let name = obj.metadata.name.as_deref().unwrap_or("");
    match obj.metadata.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{}/{name}", spec.plural),
        _ => format!("{}/{name}", spec.plural),
    }
}

/// The object as the loader reads it. List items carry no apiVersion/kind, so they are set
/// from the watched resource.
fn to_json(
    spec: &KindSpec,
    version: &str,
    obj: &DynamicObject,
    netns: Option<&PathBuf>,
    captured: bool,
) -> Result<String, serde_json::Error> {
    let mut v = serde_json::to_value(obj)?;
    if let Some(map) = v.as_object_mut() {
        map.insert(
            "apiVersion".into(),
            Value::String(spec.api_version(version)),
        );
        map.insert("kind".into(), Value::String(spec.kind.into()));
        if std::ptr::eq(spec, &KINDS[POD]) {
            set_mesh_annotations(map, netns, captured);
        }
    }
    serde_json::to_string(&v)
}

/// Replaces the cluster's [`NETNS_ANNOTATION`] and [`CAPTURED_ANNOTATION`] with ours.
fn set_mesh_annotations(
    obj: &mut serde_json::Map<String, Value>,
    netns: Option<&PathBuf>,
    captured: bool,
) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(ann) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
        ann.remove(NETNS_ANNOTATION);
        ann.remove(CAPTURED_ANNOTATION);
    }
    let mut ours = Vec::new();
    if let Some(path) = netns {
        ours.push((NETNS_ANNOTATION, path.display().to_string()));
    }
    if captured {
        ours.push((CAPTURED_ANNOTATION, "true".to_owned()));
    }
    if ours.is_empty() {
        return;
    }
    let ann = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(ann) = ann.as_object_mut() {
        for (k, v) in ours {
            ann.insert(k.into(), Value::String(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Arc<DynamicObject> {
        Arc::new(serde_json::from_value(v).expect("object"))
    }

    fn preferred() -> Vec<&'static str> {
        KINDS.iter().map(KindSpec::preferred_version).collect()
    }

    #[test]
    fn objects_carry_the_version_they_were_watched_at() {
        // List items have no apiVersion; the loader must see the one actually served.
        let vs = KINDS
            .iter()
            .position(|k| k.kind == "VirtualService")
            .expect("VirtualService");
        let mut o: Objects = vec![Vec::new(); KINDS.len()];
        o[vs] = vec![obj(serde_json::json!({
            "metadata": {"name": "a", "namespace": "default"},
            "spec": {"hosts": ["a.example"]},
        }))];
        let mut versions = preferred();
        versions[vs] = "v1beta1";
        let s = sources(&o, &versions, None);
        assert_eq!(s.files.len(), 1);
        assert_eq!(s.files[0].0, "default/virtualservices/a");
        let v: Value = serde_json::from_str(&s.files[0].1).expect("json");
        assert_eq!(v["apiVersion"], "networking.istio.io/v1beta1");
        assert_eq!(v["kind"], "VirtualService");
    }

    #[test]
    fn only_secrets_a_destination_rule_names_reach_the_loader() {
        let secret = |name: &str| {
            obj(serde_json::json!({
                "metadata": {"name": name, "namespace": "istio-egress"},
                "type": "Opaque",
                // Not PEM: decoded as TLS material this would fail the snapshot.
                "data": {"key": "c2stbGl2ZS0xMjM="},
            }))
        };
        let mut o: Objects = vec![Vec::new(); KINDS.len()];
        o[SECRET] = [
            "helm-release",
            "client-cert",
            "client-cert-cacert",
            "subset-cert",
            "port-cert-cacert",
            "api-key",
        ]
        .into_iter()
        .map(secret)
        .collect();
        // (names given at the top level, in a subset, and port-level) → the Secrets kept.
        let rule = obj(serde_json::json!({
            "metadata": {"name": "aliyun", "namespace": "istio-egress"},
            "spec": {
                "host": "aliyun.com",
                "trafficPolicy": {
                    "tls": {"mode": "MUTUAL", "credentialName": "client-cert"},
                    "portLevelSettings": [
                        {"port": {"number": 443}, "tls": {"mode": "SIMPLE", "credentialName": "port-cert"}},
                    ],
                },
                "subsets": [{"name": "v1", "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "subset-cert"}}}],
            },
        }));
        let secrets_of = |o: &Objects| -> Vec<String> {
            sources(o, &preferred(), None)
                .files
                .into_iter()
                .map(|(name, _)| name)
                .filter(|n| n.contains("/secrets/"))
                .collect()
        };
        assert!(secrets_of(&o).is_empty(), "no rule names a Secret yet");
        o[DESTINATION_RULE] = vec![rule];
        assert_eq!(
            secrets_of(&o),
            [
                "istio-egress/secrets/client-cert",
                "istio-egress/secrets/client-cert-cacert",
                "istio-egress/secrets/port-cert-cacert",
                "istio-egress/secrets/subset-cert",
            ]
        );
    }

    fn objects(pods: Vec<Arc<DynamicObject>>) -> Objects {
        let mut o: Objects = vec![Vec::new(); KINDS.len()];
        o[POD] = pods;
        o
    }

    #[test]
    fn mesh_annotations_come_only_from_us() {
        let uid = "0c6f1a4e-2b1d-4a4e-9b77-1d2e3f405060";
        let proc = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(proc.path().join("77/ns")).expect("mkdir");
        std::fs::write(proc.path().join("77/ns/net"), "").expect("write");
        std::fs::write(
            proc.path().join("77/cgroup"),
            format!("0::/kubepods/pod{uid}/c\n"),
        )
        .expect("write");
        let in_ns = |ns: &str, name: &str, uid: &str, node: &str, labels: Value| {
            obj(serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels,
                             "annotations": {NETNS_ANNOTATION: "/proc/1/ns/net",
                                             CAPTURED_ANNOTATION: "true"}},
                "spec": {"nodeName": node, "containers": []},
                "status": {"phase": "Running"},
            }))
        };
        let pod = |name: &str, uid: &str, node: &str, host_net: bool, phase: &str| {
            obj(serde_json::json!({
                "metadata": {"name": name, "namespace": "default", "uid": uid,
                             "annotations": {NETNS_ANNOTATION: "/proc/1/ns/net",
                                             CAPTURED_ANNOTATION: "true"}},
                "spec": {"nodeName": node, "hostNetwork": host_net, "containers": []},
                "status": {"phase": phase},
            }))
        };
        let none = serde_json::json!({DATAPLANE_MODE_LABEL: "none"});
        let ambient = serde_json::json!({DATAPLANE_MODE_LABEL: "ambient"});
        let mut o = objects(vec![
            // Istio's opt-in: kube-system is not enrolled, default is; pod labels override.
            in_ns("kube-system", "dns", uid, "n1", serde_json::json!({})),
            in_ns("kube-system", "enrolled", uid, "n2", ambient),
            in_ns("default", "opted-out", uid, "n2", none),
            pod("a", uid, "n1", false, "Running"),
            pod(
                "b",
                "7a8b9c0d-1e2f-4a5b-8c6d-7e8f90a1b2c3",
                "n1",
                false,
                "Running",
            ),
            pod("c", uid, "n1", true, "Running"),
            pod("d", uid, "n2", false, "Running"),
            pod("e", uid, "n1", false, "Pending"),
            pod("f", uid, "n2", false, "Pending"),
            pod("g", uid, "n2", true, "Running"),
            pod("h", uid, "", false, "Running"),
        ]);
        o[NAMESPACE] = vec![
            obj(serde_json::json!({"metadata": {"name": "default",
                                   "labels": {DATAPLANE_MODE_LABEL: "ambient"}}})),
            obj(serde_json::json!({"metadata": {"name": "kube-system"}})),
        ];
        let mut d = NetnsDiscovery::new(proc.path().to_path_buf());
        let s = sources(&o, &preferred(), Some(("n1", &mut d)));
        // (file, netns, captured marker)
        let ann = |s: &Sources| -> Vec<(String, Option<String>, bool)> {
            s.files
                .iter()
                .filter(|(name, _)| !name.starts_with("namespaces/"))
                .map(|(name, text)| {
                    let v: Value = serde_json::from_str(text).expect("json");
                    assert_eq!(v["kind"], "Pod");
                    assert_eq!(v["apiVersion"], "v1");
                    let a = &v["metadata"]["annotations"];
                    let captured = match a[CAPTURED_ANNOTATION].as_str() {
                        Some("true") => true,
                        None => false,
                        Some(other) => panic!("{name}: unexpected marker {other:?}"),
                    };
                    (
                        name.clone(),
                        a[NETNS_ANNOTATION].as_str().map(str::to_owned),
                        captured,
                    )
                })
                .collect()
        };
        let want = |a: Option<String>, local_b: bool| {
            vec![
                ("default/pods/a".to_owned(), a, true),
                // On our node but its netns is not found: not served here yet.
                ("default/pods/b".to_owned(), None, local_b),
                ("default/pods/c".to_owned(), None, false),
                // Another node's pod: reached over HBONE, but never entered from here.
                ("default/pods/d".to_owned(), None, true),
                ("default/pods/e".to_owned(), None, false),
                ("default/pods/f".to_owned(), None, false),
                ("default/pods/g".to_owned(), None, false),
                ("default/pods/h".to_owned(), None, false),
                ("default/pods/opted-out".to_owned(), None, false),
                ("kube-system/pods/dns".to_owned(), None, false),
                ("kube-system/pods/enrolled".to_owned(), None, true),
            ]
        };
        let want_a = proc.path().join("77/ns/net").display().to_string();
        assert_eq!(ann(&s), want(Some(want_a), false));
        assert_eq!(s.pods_without_netns, 1);

        // Waypoint (no node): no netns at all (the cluster's value is still dropped), and every
        // pod its node's ztunnel captures is marked.
        let s = sources(&o, &preferred(), None);
        assert_eq!(ann(&s), want(None, true));
        assert_eq!(s.pods_without_netns, 0);
    }

    #[test]
    fn strip_drops_unread_metadata() {
        let mut o: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "managedFields": [{"manager": "kubectl"}],
                         "annotations": {LAST_APPLIED: "{}", "keep": "1"}},
        }))
        .expect("object");
        strip(&mut o);
        assert!(o.metadata.managed_fields.is_none());
        let ann = o.metadata.annotations.expect("annotations");
        assert_eq!(ann.keys().collect::<Vec<_>>(), ["keep"]);
    }
}
