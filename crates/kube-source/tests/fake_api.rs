//! The source against a scripted API server: `tower_test::mock::pair` behind
//! `kube::Client::new`, answering list and watch requests with recorded-style JSON bodies.
//! Covers the initial sync (one CRD not installed: 404), the seeds' ServiceEntry +
//! VirtualService, an invalid update (rejected, last good kept), a deletion, a watch that
//! ends in `410 Gone` followed by a relist, and netns discovery from a fake /proc.
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use kube_source::{KubeSource, KubeSourceOptions};
use mesh_config::{ConfigStore, OutboundTrafficPolicy};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NAMESPACES: &str = "/api/v1/namespaces";
const SERVICES: &str = "/api/v1/services";
const PODS: &str = "/api/v1/pods";
const CONFIGMAPS: &str = "/api/v1/namespaces/istio-system/configmaps";
const SERVICE_ENTRIES: &str = "/apis/networking.istio.io/v1/serviceentries";
const DESTINATION_RULES: &str = "/apis/networking.istio.io/v1/destinationrules";
const VIRTUAL_SERVICES: &str = "/apis/networking.istio.io/v1/virtualservices";
const AUTHZ: &str = "/apis/security.istio.io/v1/authorizationpolicies";
const GATEWAYS: &str = "/apis/gateway.networking.k8s.io/v1/gateways";
const HTTP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
/// Secrets are read in the waypoint's own namespace only.
const EGRESS_SECRETS: &str = "/api/v1/namespaces/istio-egress/secrets";

/// The list paths of every kind a cluster without the optional CRD (ASMEgressTrafficPolicy)
/// serves, at their preferred versions.
const CORE_LISTS: [&str; 10] = [
    NAMESPACES,
    SERVICES,
    PODS,
    CONFIGMAPS,
    SERVICE_ENTRIES,
    DESTINATION_RULES,
    VIRTUAL_SERVICES,
    AUTHZ,
    GATEWAYS,
    HTTP_ROUTES,
];

/// The same resource path at `v1beta1` (what Istio < 1.22 serves).
fn v1beta1(path: &str) -> String {
    path.replacen("/v1/", "/v1beta1/", 1)
}

const POD_UID: &str = "0c6f1a4e-2b1d-4a4e-9b77-1d2e3f405060";

enum ListReply {
    Items { items: Vec<Value>, rv: String },
}

#[derive(Default)]
struct State {
    lists: HashMap<String, ListReply>,
    /// Bodies (newline-separated watch events) for the next watch requests, per path.
    watches: HashMap<String, VecDeque<String>>,
    /// Paths answered with an error Status (code, reason, message) instead.
    failures: HashMap<String, (StatusCode, &'static str, &'static str)>,
    requests: Vec<String>,
}

impl State {
    /// The discovery document of a group version (`/apis/<group>/<version>`): the resources
    /// with a list reply under it, like the API server lists the served CRD versions. `None`
    /// (so 404) when nothing is served there.
    fn discovery(&self, path: &str) -> Option<Value> {
        let gv = path.strip_prefix("/apis/")?;
        if gv.split('/').count() != 2 {
            return None;
        }
        let prefix = format!("{path}/");
        let resources: Vec<Value> = self
            .lists
            .keys()
            .filter_map(|p| p.strip_prefix(&prefix))
            .filter(|plural| !plural.contains('/'))
            .map(|plural| {
                json!({"name": plural, "singularName": "", "namespaced": true, "kind": plural,
                       "verbs": ["get", "list", "watch"]})
            })
            .collect();
        (!resources.is_empty()).then(|| {
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                   "resources": resources})
        })
    }
}

/// A scripted API server. Paths without a list reply answer like a missing CRD does: 404
/// with a plain-text body.
#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<State>>);

impl FakeApi {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("fake api lock")
    }

    fn set_list(&self, path: &str, items: Vec<Value>, rv: &str) {
        self.state().lists.insert(
            path.to_owned(),
            ListReply::Items {
                items,
                rv: rv.into(),
            },
        );
    }

    /// Stops serving `path` (its list and discovery answer 404 from now on).
    fn remove_list(&self, path: &str) {
        self.state().lists.remove(path);
    }

    /// Queues one watch response for `path`: these events, then the stream ends (the watcher
    /// resumes from the last resourceVersion).
    fn push_watch(&self, path: &str, events: &[Value]) {
        let body = events
            .iter()
            .map(|e| e.to_string() + "\n")
            .collect::<String>();
        self.state()
            .watches
            .entry(path.to_owned())
            .or_default()
            .push_back(body);
    }

    /// From now on `path` answers every request with this error Status.
    fn fail(&self, path: &str, code: StatusCode, reason: &'static str, message: &'static str) {
        self.state()
            .failures
            .insert(path.to_owned(), (code, reason, message));
    }

    /// Serves an empty list at every path of [`CORE_LISTS`] but `except`.
    fn empty_lists_except(&self, except: &[&str]) {
        for p in CORE_LISTS.iter().filter(|p| !except.contains(p)) {
            self.set_list(p, vec![], "1");
        }
    }

    fn requests(&self, path: &str) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| r.split('?').next() == Some(path))
            .count()
    }

    fn client(&self) -> kube::Client {
        let (svc, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<Full<Bytes>>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let api = api.clone();
                let uri = req.uri().clone();
                tokio::spawn(async move {
                    let resp = api.answer(uri).await;
                    send.send_response(resp);
                });
            }
        });
        kube::Client::new(svc, "default")
    }

    async fn answer(&self, uri: http::Uri) -> Response<Full<Bytes>> {
        let path = uri.path().to_owned();
        let query = uri.query().unwrap_or("").to_owned();
        self.state().requests.push(format!("{path}?{query}"));
        if let Some((code, reason, message)) = self.state().failures.get(&path).copied() {
            return reply(
                code,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "code": code.as_u16(), "reason": reason, "message": message})
                .to_string(),
            );
        }
        if query.split('&').any(|p| p == "watch=true") {
            // Held open until the test queues events, like a quiet watch.
            loop {
                if let Some(body) = self
                    .state()
                    .watches
                    .get_mut(&path)
                    .and_then(VecDeque::pop_front)
                {
                    return reply(StatusCode::OK, body);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let state = self.state();
        if let Some(doc) = state.discovery(&path) {
            return reply(StatusCode::OK, doc.to_string());
        }
        match state.lists.get(&path) {
            Some(ListReply::Items { items, rv }) => reply(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List",
                       "metadata": {"resourceVersion": rv}, "items": items})
                .to_string(),
            ),
            None => reply(StatusCode::NOT_FOUND, "404 page not found\n".into()),
        }
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

fn meta(ns: Option<&str>, name: &str, rv: &str) -> Value {
    let mut m = json!({"name": name, "resourceVersion": rv, "uid": format!("uid-{name}"),
                       "creationTimestamp": "2026-11-23T10:00:00Z",
                       "managedFields": [{"manager": "kubectl", "operation": "Apply"}]});
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

fn namespace(name: &str) -> Value {
    json!({"metadata": meta(None, name, "1"), "spec": {"finalizers": ["kubernetes"]},
           "status": {"phase": "Active"}})
}

/// A namespace enrolled in the ambient mesh (`istio.io/dataplane-mode: ambient`).
fn ambient_namespace(name: &str) -> Value {
    let mut ns = namespace(name);
    ns["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "ambient"});
    ns
}

fn service(name: &str, ip: &str, rv: &str) -> Value {
    json!({
        "metadata": meta(Some("default"), name, rv),
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
                 "ipFamilies": ["IPv4"], "sessionAffinity": "None",
                 "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
        "status": {"loadBalancer": {}}
    })
}

fn pod() -> Value {
    let mut m = meta(Some("default"), "web-1", "7");
    m["uid"] = json!(POD_UID);
    m["labels"] = json!({"app": "web"});
    json!({
        "metadata": m,
        "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                 "containers": [{"name": "web", "image": "nginx",
                                 "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}],
                   "hostIP": "192.0.2.10"}
    })
}

/// Seed 002's ServiceEntry, as the API server returns it (served at v1).
fn service_entry() -> Value {
    json!({
        "metadata": meta(Some("default"), "aliyun-com-ext", "20"),
        "spec": {"hosts": ["www.aliyun.com"],
                 "ports": [{"number": 80, "name": "http", "protocol": "HTTP"},
                           {"number": 443, "name": "https", "protocol": "HTTPS"}],
                 "resolution": "DNS", "location": "MESH_EXTERNAL"}
    })
}

/// Seed 002's VirtualService (fault delay), with `extra` merged into its first HTTP route.
fn virtual_service(rv: &str, fault: bool, extra: Option<(&str, Value)>) -> Value {
    let mut route = json!({"route": [{"destination": {"host": "www.aliyun.com"}, "weight": 100}]});
    if fault {
        route["fault"] = json!({"delay": {"percent": 100, "fixedDelay": "5s"}});
    }
    if let Some((k, v)) = extra {
        route[k] = v;
    }
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": meta(Some("default"), "aliyun-com-ext", rv),
        "spec": {"hosts": ["www.aliyun.com"], "http": [route]}
    })
}

fn typed(mut obj: Value, api_version: &str, kind: &str) -> Value {
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    obj
}

fn fake_proc(dir: &Path) {
    // pid 1: the host; 4242: the pod's sandbox (systemd cgroup driver).
    for (pid, cgroup) in [
        ("1", "0::/init.scope\n".to_owned()),
        (
            "4242",
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-abc.scope\n",
                POD_UID.replace('-', "_")
            ),
        ),
    ] {
        let p = dir.join(pid);
        std::fs::create_dir_all(p.join("ns")).expect("mkdir");
        std::fs::write(p.join("cgroup"), cgroup).expect("cgroup");
        std::fs::write(p.join("ns/net"), "").expect("ns");
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn has_host(store: &ConfigStore, host: &str) -> bool {
    store.current().service_by_host(host).is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_cluster() {
    let api = FakeApi::default();
    api.set_list(
        NAMESPACES,
        vec![ambient_namespace("default"), namespace("istio-system")],
        "1",
    );
    api.set_list(SERVICES, vec![service("web", "10.96.0.10", "5")], "5");
    api.set_list(PODS, vec![pod()], "7");
    api.set_list(
        CONFIGMAPS,
        vec![json!({"metadata": meta(Some("istio-system"), "istio", "3"),
                    "data": {"mesh": "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"}})],
        "3",
    );
    api.set_list(SERVICE_ENTRIES, vec![service_entry()], "20");
    api.set_list(
        VIRTUAL_SERVICES,
        vec![virtual_service("21", true, None)],
        "21",
    );
    for empty in [DESTINATION_RULES, AUTHZ, GATEWAYS, HTTP_ROUTES] {
        api.set_list(empty, vec![], "1");
    }
    // ASMEgressTrafficPolicy: no list reply, so 404 (CRD not installed).

    let proc = tempfile::tempdir().expect("tempdir");
    fake_proc(proc.path());
    let opts = KubeSourceOptions {
        node: Some("node-a".into()),
        proc_root: proc.path().to_path_buf(),
        debounce: Duration::from_millis(50),
        initial_sync_timeout: Duration::from_secs(20),
        secret_namespace: None,
    };
    let (store, handle) = KubeSource::start(api.client(), opts)
        .await
        .expect("initial sync");
    assert!(handle.is_ready());
    assert_eq!(store.generation(), 1);
    assert_eq!(handle.missing_kinds(), ["ASMEgressTrafficPolicy"]);
    // ztunnel (no secret namespace) never asks for a Secret.
    assert!(
        !api.state().requests.iter().any(|r| r.contains("secrets")),
        "{:?}",
        api.state().requests
    );
    let m = handle.metrics();
    assert_eq!(m.reloads("ok"), 1);
    // A current control plane: everything at the preferred version, no fallback.
    assert_eq!(
        handle.api_version("ServiceEntry").as_deref(),
        Some("networking.istio.io/v1")
    );
    assert_eq!(m.resource_version("AuthorizationPolicy", "v1"), 1);
    assert_eq!(m.resource_version("AuthorizationPolicy", "v1beta1"), 0);
    assert_eq!(api.requests(&v1beta1(SERVICE_ENTRIES)), 0);
    assert!(m.watch_errors("ASMEgressTrafficPolicy") >= 1);
    assert_eq!(m.watch_events("Service", "init_apply"), 1);

    // The first snapshot has everything: the seed's ServiceEntry with its auto-allocated VIP
    // and its routes, the Kubernetes Service, the mesh settings, the pod with its netns.
    let snap = store.current();
    let se = snap
        .service_by_host("www.aliyun.com")
        .expect("ServiceEntry host");
    let vips: Vec<IpAddr> = snap.resolve_name("www.aliyun.com").expect("VIPs").to_vec();
    assert!(
        vips.iter()
            .any(|ip| matches!(ip, IpAddr::V4(v4) if v4.octets()[..2] == [240, 240])),
        "{vips:?}"
    );
    assert_eq!(se.port(80).map(|p| p.port), Some(80));
    let routes = snap.routes_for_host("www.aliyun.com").expect("routes");
    assert!(format!("{routes:?}").contains("5s"), "{routes:?}");
    let web = snap
        .service_by_host("web.default.svc.cluster.local")
        .expect("Kubernetes Service");
    assert!(format!("{web:?}").contains("10.96.0.10"));
    assert_eq!(
        snap.outbound_traffic_policy(),
        OutboundTrafficPolicy::RegistryOnly
    );
    let on_node = snap.workloads_on_node("node-a");
    assert_eq!(on_node.len(), 1);
    assert_eq!(
        on_node[0].netns.as_deref(),
        Some(proc.path().join("4242/ns/net").as_path())
    );
    // Running on its node: marked captured too, so it is in the mesh for every reader.
    assert!(on_node[0].captured && on_node[0].in_mesh());

    // An invalid VirtualService update: rejected, the previous snapshot stays, the error is
    // mesh-config's own message naming the object and field.
    api.push_watch(
        VIRTUAL_SERVICES,
        &[json!({"type": "MODIFIED",
                 "object": virtual_service("30", true, Some(("bogus", json!(1))))})],
    );
    eventually("rejected reload", || m.reloads("rejected") == 1).await;
    assert_eq!(store.generation(), 1);
    assert!(Arc::ptr_eq(&snap, &store.current()));
    let err = store.last_error().expect("recorded error").to_string();
    assert!(
        err.contains("default/virtualservices/aliyun-com-ext:document 1: VirtualService default/aliyun-com-ext: spec.http[0]")
            && err.contains("bogus"),
        "{err}"
    );

    // Fixed: published as generation 2 (fault gone), error cleared.
    api.push_watch(
        VIRTUAL_SERVICES,
        &[json!({"type": "MODIFIED", "object": virtual_service("31", false, None)})],
    );
    eventually("generation 2", || store.generation() == 2).await;
    assert!(store.last_error().is_none());
    let routes = store.current().routes_for_host("www.aliyun.com").cloned();
    assert!(!format!("{routes:?}").contains("5s"), "{routes:?}");

    // Deletion removes the service.
    api.push_watch(
        SERVICES,
        &[json!({"type": "DELETED",
                 "object": typed(service("web", "10.96.0.10", "40"), "v1", "Service")})],
    );
    eventually("web deleted", || {
        !has_host(&store, "web.default.svc.cluster.local")
    })
    .await;
    assert_eq!(store.generation(), 3);
    assert_eq!(m.watch_events("Service", "delete"), 1);

    // The services watch expires (410 Gone): the source relists, picks up what changed
    // meanwhile, and the restart is visible in the metrics.
    let lists_before = api.requests(SERVICES);
    api.set_list(SERVICES, vec![service("api", "10.96.0.20", "60")], "60");
    api.push_watch(
        SERVICES,
        &[
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                 "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                 "message": "too old resource version: 40 (55)"}}),
        ],
    );
    eventually("relisted service", || {
        has_host(&store, "api.default.svc.cluster.local")
    })
    .await;
    assert_eq!(store.generation(), 4);
    assert!(m.watch_restarts("Service") >= 1);
    assert!(m.watch_errors("Service") >= 1);
    assert!(api.requests(SERVICES) > lists_before + 1);
    // What did not change survived the relist.
    assert!(has_host(&store, "www.aliyun.com"));
    assert_eq!(m.reloads("rejected"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_every_kind_before_the_first_snapshot() {
    // Pods never list (the server keeps failing with 500): no snapshot is published, and the
    // timeout names the kind.
    let api = FakeApi::default();
    api.empty_lists_except(&[PODS]);
    api.fail(
        PODS,
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        "etcd down",
    );
    let opts = KubeSourceOptions {
        initial_sync_timeout: Duration::from_secs(2),
        debounce: Duration::from_millis(20),
        ..KubeSourceOptions::default()
    };
    let source = KubeSource::spawn(api.client(), opts.clone()).expect("spawn");
    let err = source
        .wait_ready(opts.initial_sync_timeout)
        .await
        .expect_err("pods never listed");
    let msg = err.to_string();
    assert!(msg.contains("not listed yet: Pod"), "{msg}");
    assert!(!source.is_ready());
    assert!(source.store().is_none());
    assert!(source.metrics().watch_errors("Pod") >= 1);
    assert_eq!(source.metrics().reloads("ok"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_cluster_is_reported_at_startup() {
    let api = FakeApi::default();
    api.empty_lists_except(&[VIRTUAL_SERVICES]);
    api.set_list(
        VIRTUAL_SERVICES,
        vec![virtual_service("2", false, Some(("bogus", json!(1))))],
        "2",
    );
    let opts = KubeSourceOptions {
        initial_sync_timeout: Duration::from_secs(3),
        debounce: Duration::from_millis(20),
        ..KubeSourceOptions::default()
    };
    let err = KubeSource::start(api.client(), opts)
        .await
        .expect_err("invalid VirtualService");
    match err {
        kube_source::KubeSourceError::Invalid(errs) => {
            assert!(errs.to_string().contains("bogus"), "{errs}");
        }
        other => panic!("unexpected error: {other}"),
    }
}

/// An AuthorizationPolicy on seed 002's ServiceEntry, denying DELETE.
fn authorization_policy() -> Value {
    json!({
        "metadata": meta(Some("default"), "no-delete", "22"),
        "spec": {"action": "DENY",
                 "targetRefs": [{"group": "networking.istio.io", "kind": "ServiceEntry",
                                 "name": "aliyun-com-ext"}],
                 "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}
    })
}

/// A cluster where every kind but the Istio ones lists empty at v1 (ASMEgressTrafficPolicy
/// missing).
fn non_istio_kinds(api: &FakeApi) {
    api.set_list(
        NAMESPACES,
        vec![ambient_namespace("default"), namespace("istio-system")],
        "1",
    );
    for empty in [SERVICES, PODS, CONFIGMAPS, GATEWAYS, HTTP_ROUTES] {
        api.set_list(empty, vec![], "1");
    }
}

fn quick_opts() -> KubeSourceOptions {
    KubeSourceOptions {
        debounce: Duration::from_millis(20),
        initial_sync_timeout: Duration::from_secs(20),
        ..KubeSourceOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_istio_is_read_at_v1beta1() {
    // Istio < 1.22: the CRDs serve v1beta1 only, so every v1 path (discovery included) is 404.
    let api = FakeApi::default();
    non_istio_kinds(&api);
    api.set_list(&v1beta1(SERVICE_ENTRIES), vec![service_entry()], "20");
    api.set_list(
        &v1beta1(VIRTUAL_SERVICES),
        vec![virtual_service("21", true, None)],
        "21",
    );
    api.set_list(&v1beta1(DESTINATION_RULES), vec![], "1");
    api.set_list(&v1beta1(AUTHZ), vec![authorization_policy()], "22");

    let (store, handle) = KubeSource::start(api.client(), quick_opts())
        .await
        .expect("initial sync");
    // The objects are loaded, not mistaken for missing CRDs.
    assert_eq!(handle.missing_kinds(), ["ASMEgressTrafficPolicy"]);
    let snap = store.current();
    let se = snap
        .service_by_host("www.aliyun.com")
        .expect("ServiceEntry read at v1beta1");
    let routes = snap.routes_for_host("www.aliyun.com").expect("routes");
    assert!(format!("{routes:?}").contains("5s"), "{routes:?}");
    let authz = snap.authz_for_service(se);
    assert_eq!(authz.deny().len(), 1, "{authz:?}");
    assert_eq!(authz.deny()[0].name.name, "no-delete");

    // Which version is in use is visible, and v1 was never listed.
    let m = handle.metrics();
    for (kind, group) in [
        ("ServiceEntry", "networking.istio.io"),
        ("DestinationRule", "networking.istio.io"),
        ("VirtualService", "networking.istio.io"),
        ("AuthorizationPolicy", "security.istio.io"),
    ] {
        assert_eq!(
            handle.api_version(kind),
            Some(format!("{group}/v1beta1")),
            "{kind}"
        );
        assert_eq!(m.resource_version(kind, "v1beta1"), 1, "{kind}");
        assert_eq!(m.resource_version(kind, "v1"), 0, "{kind}");
    }
    assert_eq!(
        handle.api_version("Gateway").as_deref(),
        Some("gateway.networking.k8s.io/v1")
    );
    assert_eq!(handle.api_version("Pod").as_deref(), Some("v1"));
    assert!(api.requests("/apis/networking.istio.io/v1") >= 1);
    for path in [SERVICE_ENTRIES, DESTINATION_RULES, VIRTUAL_SERVICES, AUTHZ] {
        assert_eq!(api.requests(path), 0, "{path}");
    }

    // Changes arrive through the v1beta1 watch.
    api.push_watch(
        &v1beta1(VIRTUAL_SERVICES),
        &[json!({"type": "MODIFIED", "object": virtual_service("30", false, None)})],
    );
    eventually("generation 2", || store.generation() == 2).await;
    let routes = store.current().routes_for_host("www.aliyun.com").cloned();
    assert!(!format!("{routes:?}").contains("5s"), "{routes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_installed_later_is_discovered_at_its_version() {
    // AuthorizationPolicy is not served at any version at first: missing, treated as empty.
    let api = FakeApi::default();
    non_istio_kinds(&api);
    api.set_list(SERVICE_ENTRIES, vec![service_entry()], "20");
    api.set_list(DESTINATION_RULES, vec![], "1");
    api.set_list(VIRTUAL_SERVICES, vec![], "1");
    let (store, handle) = KubeSource::start(api.client(), quick_opts())
        .await
        .expect("initial sync");
    let mut missing = handle.missing_kinds();
    missing.sort_unstable();
    assert_eq!(missing, ["ASMEgressTrafficPolicy", "AuthorizationPolicy"]);
    assert_eq!(handle.api_version("AuthorizationPolicy"), None);
    assert!(handle.metrics().watch_errors("AuthorizationPolicy") >= 1);
    let se = store
        .current()
        .service_by_host("www.aliyun.com")
        .cloned()
        .expect("ServiceEntry");
    assert!(store.current().authz_for_service(&se).is_empty());

    // The (older) CRD gets installed: rediscovery finds v1beta1 and its objects load.
    api.set_list(&v1beta1(AUTHZ), vec![authorization_policy()], "22");
    eventually("policy loaded", || {
        !store.current().authz_for_service(&se).is_empty()
    })
    .await;
    assert_eq!(handle.missing_kinds(), ["ASMEgressTrafficPolicy"]);
    assert_eq!(
        handle.api_version("AuthorizationPolicy").as_deref(),
        Some("security.istio.io/v1beta1")
    );
    assert_eq!(
        handle
            .metrics()
            .resource_version("AuthorizationPolicy", "v1beta1"),
        1
    );

    // The control plane goes back to an older Istio: v1 disappears while being watched. The
    // relist answers 404, the version is discovered again and the v1beta1 objects are read.
    let vs_v1 = virtual_service("40", true, None);
    api.set_list(&v1beta1(VIRTUAL_SERVICES), vec![vs_v1], "40");
    api.remove_list(VIRTUAL_SERVICES);
    api.push_watch(
        VIRTUAL_SERVICES,
        &[
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                 "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                 "message": "too old resource version"}}),
        ],
    );
    eventually("VirtualService at v1beta1", || {
        handle.api_version("VirtualService").as_deref() == Some("networking.istio.io/v1beta1")
    })
    .await;
    eventually("routes from v1beta1", || {
        store.current().routes_for_host("www.aliyun.com").is_some()
    })
    .await;
    let m = handle.metrics();
    assert_eq!(m.resource_version("VirtualService", "v1beta1"), 1);
    assert_eq!(m.resource_version("VirtualService", "v1"), 0);
    assert!(!handle.missing_kinds().contains(&"VirtualService"));
}

/// A waypoint's source: Secrets listed and watched in its own namespace only, and of those only
/// the ones a DestinationRule names as `credentialName` reach the snapshot — another Secret of
/// the namespace whose `key` is not PEM does not fail the configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_reads_credential_secrets_from_its_namespace() {
    let api = FakeApi::default();
    api.empty_lists_except(&[DESTINATION_RULES]);
    api.set_list(
        DESTINATION_RULES,
        vec![json!({
            "metadata": meta(Some("istio-egress"), "aliyun", "4"),
            "spec": {"host": "aliyun.com",
                     "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "aliyun-client"}}}
        })],
        "4",
    );
    let pem = |label: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!(
            "-----BEGIN {label}-----\nQUJD\n-----END {label}-----\n"
        ))
    };
    api.set_list(
        EGRESS_SECRETS,
        vec![
            json!({"metadata": meta(Some("istio-egress"), "aliyun-client", "5"),
                   "type": "kubernetes.io/tls",
                   "data": {"tls.crt": pem("CERTIFICATE"), "tls.key": pem("PRIVATE KEY")}}),
            json!({"metadata": meta(Some("istio-egress"), "payments-api", "6"),
                   "type": "Opaque", "data": {"key": "c2stbGl2ZS0xMjM="}}),
        ],
        "6",
    );
    let opts = KubeSourceOptions {
        debounce: Duration::from_millis(20),
        initial_sync_timeout: Duration::from_secs(20),
        secret_namespace: Some("istio-egress".into()),
        ..KubeSourceOptions::default()
    };
    let (store, _handle) = KubeSource::start(api.client(), opts)
        .await
        .expect("initial sync despite the non-TLS Secret");
    let dump = serde_json::to_string(&*store.current()).expect("dump");
    assert!(dump.contains("\"istio-egress/aliyun-client\""), "{dump}");
    assert!(!dump.contains("payments-api"), "{dump}");
    assert!(api.requests(EGRESS_SECRETS) >= 1);
    assert_eq!(api.requests("/api/v1/secrets"), 0, "never cluster-wide");
}

/// Without the RoleBinding that lets it read Secrets (403), a waypoint still starts: the kind
/// counts as listed and empty, and it keeps retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_without_secret_rbac_still_starts() {
    let api = FakeApi::default();
    api.empty_lists_except(&[]);
    api.fail(
        EGRESS_SECRETS,
        StatusCode::FORBIDDEN,
        "Forbidden",
        "secrets is forbidden: User \"system:serviceaccount:istio-egress:waypoint\" cannot list resource \"secrets\"",
    );
    let opts = KubeSourceOptions {
        debounce: Duration::from_millis(20),
        initial_sync_timeout: Duration::from_secs(10),
        secret_namespace: Some("istio-egress".into()),
        ..KubeSourceOptions::default()
    };
    let (store, source) = KubeSource::start(api.client(), opts)
        .await
        .expect("starts without Secret access");
    assert_eq!(store.generation(), 1);
    assert!(source.metrics().watch_errors("Secret") >= 1);
    assert!(api.requests(EGRESS_SECRETS) >= 1);
}
