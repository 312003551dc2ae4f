//! The seed lab: a one-node ambient cluster made of network namespaces, driven by the real
//! `ztunnel` and `waypoint` binaries, with a fake "internet" that plays the hosts of the seeds.
//!
//! ```text
//!  root netns: ztunnel --node <lab node> (enters every pod netns itself; admin on 127.0.0.1:<unique>)
//!
//!  pod "sleep"   10.244.0.10 ─┐                          ┌─ "internet" 203.0.113.10 aliyun.com     (nginx 80/443)
//!  pod "sleep-b" 10.244.0.11 ─┤  router netns, bridge    ├─           203.0.113.11 www.aliyun.com
//!  waypoint pod  10.244.0.20 ─┤  10.244.0.1/16           ├─           203.0.113.12 httpbin.org, www.httpbin.org
//!   (istio-egress/waypoint,   │  203.0.113.1/24          ├─           203.0.113.13 taobao.com
//!    `ip netns exec`)         │  1.1.1.1/32 → internet   ├─           203.0.113.14 test-tcp.com (TCP echo :444)
//!                             │                          ├─           1.1.1.1      TCP echo :44
//!                                                        └─           203.0.113.53 dnsmasq for all of the above
//! ```
//!
//! Every address exists only inside namespaces the lab created; the root namespace's addresses,
//! routes and firewall are never touched. Pods resolve through `/etc/netns/<ns>/resolv.conf`
//! (dnsmasq's address), which ztunnel captures to its DNS proxy.
//!
//! The mesh configuration is a directory the lab writes (the seeds' YAML plus the lab's own
//! Namespace, Pod and mesh ConfigMap objects) and both proxies watch. [`SeedLab::apply`] and
//! [`SeedLab::delete`] change it like `kubectl apply` / `kubectl delete` would and return once
//! every proxy has loaded a newer configuration generation.
//!
//! Tear-down is by drop guards, in field order: proxies first, then servers, then namespaces,
//! then temporary directories; it also runs after a failure or panic. If the process is killed
//! outright, the proxies die with the thread that started them (`PR_SET_PDEATHSIG`) and the
//! namespaces are swept by the next lab: keep a lab on the thread that built it. Names (namespaces, node,
//! directories) and the ztunnel's loopback ports are unique, so two labs can run side by side.

use std::{
    collections::BTreeMap,
    fmt,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Component, Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

use crate::{ChildGuard, CurlOutput, Host, Lab, Netns, Nginx, NginxConfig, start_dnsmasq};

/// The mesh's trust domain (the seeds' ConfigMap says so too).
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Pod network; the router owns `.0.1`.
pub const POD_PREFIX_LEN: u8 = 16;
/// The internet's subnet (TEST-NET-3); the router owns `.1`.
pub const INTERNET_PREFIX_LEN: u8 = 24;
/// dnsmasq, the internet's DNS server, and what pods have in their resolv.conf.
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
/// Where the internet host's own address (and aliyun.com) lives.
pub const ALIYUN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const WWW_ALIYUN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// httpbin.org and www.httpbin.org ("multiple domains must resolve to the same IP address").
pub const HTTPBIN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);
pub const TAOBAO_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 13);
pub const TEST_TCP_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 14);
/// Seed 003's "TCP service (by IP)": exists only inside the lab, routed to the internet host.
pub const TCP_BY_IP: Ipv4Addr = Ipv4Addr::new(1, 1, 1, 1);
/// TCP echo services: seed 003's `1.1.1.1:44` and `test-tcp.com:444`.
pub const TCP_ECHO_SERVICES: [(Ipv4Addr, u16); 2] = [(TCP_BY_IP, 44), (TEST_TCP_IP, 444)];

/// The external hosts dnsmasq answers and nginx serves (subdomains included, as dnsmasq's
/// `--address=/name/ip` does; the most specific name wins).
pub const EXTERNAL_HOSTS: [(&str, Ipv4Addr); 6] = [
    ("aliyun.com", ALIYUN_IP),
    ("www.aliyun.com", WWW_ALIYUN_IP),
    ("httpbin.org", HTTPBIN_IP),
    ("www.httpbin.org", HTTPBIN_IP),
    ("taobao.com", TAOBAO_IP),
    ("test-tcp.com", TEST_TCP_IP),
];

/// The body of the upstream's `301 Moved Permanently`: 239 bytes, as in the seed's output.
pub const MOVED_BODY: &str = "<html>\r\n<head><title>301 Moved Permanently</title></head>\r\n\
<body bgcolor=\"white\">\r\n<h1>301 Moved Permanently</h1>\r\n\
<p>The requested resource has been assigned a new permanent URI.</p>\r\n\
<hr/>Powered by Tengine/3.1.0 (test)</body>\r\n</html>\r\n";

/// Label binding a namespace / Service / ServiceEntry to a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Label naming the waypoint's namespace when it is not the resource's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Pod label that makes a pod a Gateway's waypoint.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Pod annotation: the pod's network namespace, for a ztunnel running outside Kubernetes.
pub const NETNS_ANNOTATION: &str = "strait.dev/netns";
/// Namespace label enabling ambient capture.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// The waypoint's HBONE port and admin listener (inside its own namespace, so every lab can use
/// the same ones).
pub const WAYPOINT_HBONE_PORT: u16 = 15008;
pub const WAYPOINT_ADMIN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 15000);

/// How long proxies get to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a configuration change gets to be loaded by every proxy.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the generation must stay unchanged before a change is written (so a reload still in
/// flight from an earlier change is not mistaken for the new one).
const SETTLE: Duration = Duration::from_millis(250);
/// Upper bound for an admin HTTP request.
const ADMIN_TIMEOUT_SECS: &str = "3";

/// Counter making node names unique within this process (namespaces carry the pid already).
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static PROBE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The seeds' YAML, verbatim (see `/work/shared/seeds`, the user's reference documents).
/// Read from mesh-config's seed fixtures, so the verbatim YAML lives in one place.
pub mod seeds {
    macro_rules! seed {
        ($file:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../crates/mesh-config/tests/fixtures/seeds/",
                $file
            ))
        };
    }

    /// 000 step 1 (also 001 step 1 with another image): the sleep application.
    pub const SLEEP: &str = seed!("000-step1-sleep.yaml");

    /// 000 step 2: `kubectl apply -n istio-egress` of the waypoint Gateway.
    pub const S000_WAYPOINT_GATEWAY: &str = seed!("istio-egress/000-step2-waypoint-gateway.yaml");

    /// 000 step 3: `kubectl apply -n istio-egress` of the aliyun.com ServiceEntry.
    pub const S000_SERVICE_ENTRY: &str = seed!("istio-egress/000-step3-serviceentry.yaml");

    /// 000 step 4.1: port 80 mapped to the external service's 443.
    pub const S000_SERVICE_ENTRY_UPGRADE: &str =
        seed!("istio-egress/000-step4-serviceentry-https-upgrade.yaml");

    /// 000 step 4.2: TLS origination at the waypoint for port 80.
    pub const S000_DESTINATION_RULE: &str = seed!("istio-egress/000-step4-destinationrule.yaml");

    /// 001 step 3: aliyun.com, HTTP only (applied in the sleep pod's namespace).
    pub const S001_SERVICE_ENTRY: &str = seed!("001-step3-serviceentry.yaml");

    /// 001 step 4c: the VirtualService sending mesh traffic to an egress gateway.
    pub const S001_VIRTUAL_SERVICE: &str = seed!("001-step4c-virtualservice.yaml");

    /// 002 step 1: www.aliyun.com, HTTP and HTTPS.
    pub const S002_SERVICE_ENTRY: &str = seed!("002-step1-serviceentry.yaml");

    /// 002 step 2: a 5 s delay on every request to www.aliyun.com.
    pub const S002_VIRTUAL_SERVICE_DELAY: &str = seed!("002-step2-virtualservice-fault.yaml");

    /// 003 example 1: mytest/sleep-a to httpbin over HTTP through egressgateway-a.
    pub const S003_HTTP: &str = seed!("003-example1-http.yaml");

    /// 003 example 2: HTTPS upgrade, HTTPS passthrough, and a rule for sleep-b.
    pub const S003_HTTPS_UPGRADE: &str = seed!("003-example2-https-upgrade.yaml");

    /// 003 example 3: HTTP, HTTPS, upgrade and TCP (by IP and by name), ports auto-assigned.
    pub const S003_AUTO_PORTS: &str = seed!("003-example3-http-tcp-auto-ports.yaml");

    /// 004 step 1: a waypoint in `default` that only serves its own namespace.
    pub const S004_WAYPOINT: &str = seed!("004-step1-waypoint.yaml");
}

// ---------------------------------------------------------------------------------------------
// Specification
// ---------------------------------------------------------------------------------------------

/// A pod of the lab: what the cluster would have created from a Deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// Used to address the pod in [`SeedLab::pod`] and as the Pod object's name.
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
}

impl PodSpec {
    /// A pod labelled `app: <app>` whose service account is also `<app>`.
    pub fn new(name: &str, namespace: &str, app: &str, ip: Ipv4Addr) -> Self {
        PodSpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: app.to_owned(),
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            ip,
        }
    }
}

/// A waypoint of the lab: a pod of Gateway `namespace/name` running the `waypoint` binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointSpec {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Whether the lab writes the Gateway object itself (otherwise the test applies the seed's).
    pub lab_gateway: bool,
}

impl WaypointSpec {
    pub fn new(namespace: &str, name: &str, ip: Ipv4Addr, lab_gateway: bool) -> Self {
        WaypointSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ip,
            lab_gateway,
        }
    }

    /// `namespace/name`, as `--gateway` takes it.
    pub fn gateway(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The mesh's `outboundTrafficPolicy.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundPolicy {
    AllowAny,
    RegistryOnly,
}

impl OutboundPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundPolicy::AllowAny => "ALLOW_ANY",
            OutboundPolicy::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

/// `sleep` (default/sleep, app=sleep) at 10.244.0.10.
pub fn default_sleep() -> PodSpec {
    PodSpec::new("sleep", "default", "sleep", Ipv4Addr::new(10, 244, 0, 10))
}

/// `sleep-b` (default/sleep-b, app=sleep-b) at 10.244.0.11.
pub fn default_sleep_b() -> PodSpec {
    PodSpec::new(
        "sleep-b",
        "default",
        "sleep-b",
        Ipv4Addr::new(10, 244, 0, 11),
    )
}

/// What a [`SeedLab`] is made of. `SeedLab::builder()` starts with seed 000's cluster: pods
/// `sleep` and `sleep-b` in `default`, the seed's sleep manifest applied, a waypoint pod for
/// `istio-egress/waypoint` (whose Gateway the seed applies), `ALLOW_ANY`.
#[derive(Debug, Clone)]
pub struct SeedLabBuilder {
    pods: Vec<PodSpec>,
    waypoints: Vec<WaypointSpec>,
    policy: OutboundPolicy,
    files: Vec<(String, String)>,
    bin_dir: Option<PathBuf>,
}

impl Default for SeedLabBuilder {
    fn default() -> Self {
        SeedLabBuilder {
            pods: vec![default_sleep(), default_sleep_b()],
            waypoints: vec![WaypointSpec::new(
                "istio-egress",
                "waypoint",
                Ipv4Addr::new(10, 244, 0, 20),
                false,
            )],
            policy: OutboundPolicy::AllowAny,
            files: vec![("default/sleep.yaml".to_owned(), seeds::SLEEP.to_owned())],
            bin_dir: None,
        }
    }
}

impl SeedLabBuilder {
    /// Replaces the pods.
    pub fn pods(mut self, pods: Vec<PodSpec>) -> Self {
        self.pods = pods;
        self
    }

    /// Replaces the waypoints.
    pub fn waypoints(mut self, waypoints: Vec<WaypointSpec>) -> Self {
        self.waypoints = waypoints;
        self
    }

    /// The initial `outboundTrafficPolicy`.
    pub fn outbound_policy(mut self, policy: OutboundPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Replaces the configuration files written before the proxies start (relative path, YAML).
    /// The lab's own Namespace/Pod/mesh files come on top.
    pub fn files(mut self, files: Vec<(String, String)>) -> Self {
        self.files = files;
        self
    }

    /// Adds a configuration file written before the proxies start.
    pub fn file(mut self, path: &str, yaml: &str) -> Self {
        self.files.push((path.to_owned(), yaml.to_owned()));
        self
    }

    /// Where `ztunnel` and `waypoint` are (default: [`crate::workspace_bin`]).
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Builds and starts the lab.
    pub fn start(self) -> Result<SeedLab> {
        SeedLab::start(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering the lab's own configuration (pure)
// ---------------------------------------------------------------------------------------------

/// Labels and annotations of one Namespace object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NamespaceMeta {
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// The lab's view of the objects it owns in the configuration directory.
#[derive(Debug, Clone)]
struct LabObjects {
    namespaces: BTreeMap<String, NamespaceMeta>,
    policy: OutboundPolicy,
}

/// Files the lab owns (others belong to the test).
const NAMESPACES_FILE: &str = "lab-namespaces.yaml";
const PODS_FILE: &str = "lab-pods.yaml";
const MESH_FILE: &str = "istio-system/lab-mesh.yaml";

fn lab_gateway_file(spec: &WaypointSpec) -> String {
    format!("{}/lab-gateway-{}.yaml", spec.namespace, spec.name)
}

impl LabObjects {
    fn new(pods: &[PodSpec], waypoints: &[WaypointSpec], policy: OutboundPolicy) -> Self {
        let mut namespaces: BTreeMap<String, NamespaceMeta> = BTreeMap::new();
        let ambient = || NamespaceMeta {
            labels: BTreeMap::from([(DATAPLANE_MODE_LABEL.to_owned(), "ambient".to_owned())]),
            annotations: BTreeMap::new(),
        };
        for ns in ["default", "istio-egress"]
            .into_iter()
            .chain(pods.iter().map(|p| p.namespace.as_str()))
            .chain(waypoints.iter().map(|w| w.namespace.as_str()))
        {
            namespaces.entry(ns.to_owned()).or_insert_with(ambient);
        }
        // The root namespace: where mesh-wide settings (capture scope) are annotated.
        namespaces.entry("istio-system".to_owned()).or_default();
        LabObjects { namespaces, policy }
    }

    fn render_namespaces(&self) -> Result<String> {
        let docs = self
            .namespaces
            .iter()
            .map(|(name, meta)| {
                let mut metadata = json!({ "name": name });
                if !meta.labels.is_empty() {
                    metadata["labels"] = json!(meta.labels);
                }
                if !meta.annotations.is_empty() {
                    metadata["annotations"] = json!(meta.annotations);
                }
                json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": metadata })
            })
            .collect::<Vec<_>>();
        render_documents(
            "# Namespaces (lab-owned; `kubectl label namespace` rewrites this file).",
            &docs,
        )
    }

    fn render_mesh(&self) -> Result<String> {
        let mesh = format!(
            "trustDomain: {TRUST_DOMAIN}\noutboundTrafficPolicy:\n  mode: {}\n",
            self.policy.as_str()
        );
        let doc = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": "istio", "namespace": "istio-system" },
            "data": { "mesh": mesh },
        });
        render_documents(
            "# MeshConfig as Istio reads it (lab-owned): ConfigMap istio/istio-system, key `mesh`.",
            &[doc],
        )
    }
}

/// The Pod objects a cluster would hold for the lab's pods and waypoints.
fn render_pods(
    pods: &[(PodSpec, String)],
    waypoints: &[(WaypointSpec, String)],
    node: &str,
) -> Result<String> {
    let pod = |name: &str,
               namespace: &str,
               labels: &BTreeMap<String, String>,
               sa: &str,
               ip: Ipv4Addr,
               netns: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "annotations": { NETNS_ANNOTATION: netns },
            },
            "spec": { "serviceAccountName": sa, "nodeName": node },
            "status": { "podIP": ip.to_string() },
        })
    };
    let mut docs = Vec::new();
    for (spec, netns) in pods {
        docs.push(pod(
            &spec.name,
            &spec.namespace,
            &spec.labels,
            &spec.service_account,
            spec.ip,
            netns,
        ));
    }
    for (spec, netns) in waypoints {
        let labels = BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), spec.name.clone())]);
        // Istio's waypoint deployment runs under a service account named after the Gateway.
        docs.push(pod(
            &format!("{}-0", spec.name),
            &spec.namespace,
            &labels,
            &spec.name,
            spec.ip,
            netns,
        ));
    }
    render_documents(
        "# Pods (lab-owned): what the cluster created from the Deployments and Gateways.",
        &docs,
    )
}

/// A Gateway of class `istio-waypoint` the lab writes for a waypoint no seed declares.
fn render_lab_gateway(spec: &WaypointSpec) -> Result<String> {
    let doc = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": { "name": spec.name, "namespace": spec.namespace },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{ "name": "mesh", "port": WAYPOINT_HBONE_PORT, "protocol": "HBONE" }],
        },
    });
    render_documents("# Waypoint Gateway (lab-owned).", &[doc])
}

fn render_documents(header: &str, docs: &[Value]) -> Result<String> {
    let mut out = format!("{header}\n");
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml_ng::to_string(doc).context("rendering YAML")?);
    }
    Ok(out)
}

/// Sets (`Some`) or removes (`None`) label `key` on the single object in `yaml`, as
/// `kubectl label <kind> <name> key=value --overwrite` / `key-` would. Comments are not kept.
pub fn with_label(yaml: &str, key: &str, value: Option<&str>) -> Result<String> {
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).context("parsing YAML")?;
    let metadata = doc
        .get_mut("metadata")
        .and_then(serde_yaml_ng::Value::as_mapping_mut)
        .context("object has no metadata")?;
    let labels_key = serde_yaml_ng::Value::from("labels");
    if !metadata.contains_key(&labels_key) {
        metadata.insert(
            labels_key.clone(),
            serde_yaml_ng::Value::Mapping(Default::default()),
        );
    }
    let labels = metadata
        .get_mut(&labels_key)
        .and_then(serde_yaml_ng::Value::as_mapping_mut)
        .context("metadata.labels is not a map")?;
    match value {
        Some(v) => {
            labels.insert(key.into(), v.into());
        }
        None => {
            labels.remove(key);
        }
    }
    serde_yaml_ng::to_string(&doc).context("rendering YAML")
}

// ---------------------------------------------------------------------------------------------
// The internet: nginx, dnsmasq, TCP echo
// ---------------------------------------------------------------------------------------------

/// The nginx playing the external hosts. `@DIR@` is nginx's instance dir; `@WEB@` the lab's
/// web dir (certificates, the 301 page).
const NGINX_CONF: &str = r#"load_module /usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so;
user root;
worker_processes 1;
pid @DIR@/nginx.pid;
error_log @DIR@/error.log info;
events { worker_connections 1024; }
http {
    # One JSON line per request: what the external service saw (the tests read it).
    log_format lab escape=json '{"remote_addr":"$remote_addr","server_addr":"$server_addr",'
        '"server_port":"$server_port","scheme":"$scheme","ssl_server_name":"$ssl_server_name",'
        '"ssl_protocol":"$ssl_protocol","host":"$host","method":"$request_method",'
        '"uri":"$request_uri","protocol":"$server_protocol","status":"$status",'
        '"user_agent":"$http_user_agent"}';
    access_log @DIR@/access.log lab;
    client_body_temp_path @DIR@/client_body;
    proxy_temp_path @DIR@/proxy;
    fastcgi_temp_path @DIR@/fastcgi;
    uwsgi_temp_path @DIR@/uwsgi;
    scgi_temp_path @DIR@/scgi;
    server_tokens off;
    etag off;
    default_type text/html;
    # The seed's external service answers as Tengine.
    more_set_headers "Server: Tengine";
    ssl_certificate @WEB@/server.pem;
    ssl_certificate_key @WEB@/server-key.pem;

    # Plain HTTP: every host but httpbin redirects to HTTPS, as aliyun.com does.
    server {
        listen 80 default_server;
        server_name aliyun.com www.aliyun.com taobao.com;
        error_page 301 /.moved.html;
        location = /.moved.html { internal; root @WEB@; }
        location / { return 301 https://$host/; }
    }
    # aliyun.com over HTTPS answers like its HTTP port (the seed shows the same 301 after the
    # waypoint upgraded the request to port 443).
    server {
        listen 443 ssl http2 default_server;
        server_name aliyun.com;
        error_page 301 /.moved.html;
        location = /.moved.html { internal; root @WEB@; }
        location / { return 301 https://$host/; }
    }
    server {
        listen 443 ssl http2;
        server_name www.aliyun.com taobao.com;
        location / { return 200 "<html><body>$host over $scheme</body></html>\n"; }
    }
    server {
        listen 80;
        listen 443 ssl http2;
        server_name httpbin.org www.httpbin.org;
        location / {
            default_type application/json;
            return 200 '{"host": "$host", "scheme": "$scheme", "origin": "$remote_addr"}\n';
        }
    }
}
"#;

/// One connection an echo service accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoConn {
    /// The service's address (what the client dialled, after any proxy).
    pub local: SocketAddr,
    /// Who connected: a pod, or the waypoint that forwarded the pod's connection.
    pub peer: SocketAddr,
}

/// A TCP echo service in the internet namespace, served by a thread of this process (the
/// listening socket is created inside the namespace and keeps it).
struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(ns: &Netns, addr: SocketAddr, seen: Arc<Mutex<Vec<EchoConn>>>) -> Result<Self> {
        let handle = ns.handle()?;
        let listener = handle
            .run_blocking(move || TcpListener::bind(addr))?
            .with_context(|| format!("binding the echo service {addr}"))?;
        // Non-blocking accept so the thread notices `stop` promptly.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
        let thread = thread::Builder::new()
            .name(format!("echo {addr}"))
            .spawn(move || {
                while !stop_thread.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            if let Ok(mut seen) = seen.lock() {
                                seen.push(EchoConn { local: addr, peer });
                            }
                            let _ = thread::Builder::new()
                                .name(format!("echo conn {peer}"))
                                .spawn(move || echo(stream));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .context("spawning the echo thread")?;
        Ok(EchoServer {
            stop,
            thread: Some(thread),
        })
    }
}

/// Echoes until EOF, an error, or 30 s of silence.
fn echo(mut stream: TcpStream) {
    if stream.set_nonblocking(false).is_err()
        || stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The external services and their DNS.
pub struct Internet {
    // Drop order: servers before the namespace.
    _echo: Vec<EchoServer>,
    echo_seen: Arc<Mutex<Vec<EchoConn>>>,
    nginx: Nginx,
    dnsmasq: ChildGuard,
    host: Host,
    web_ca: PathBuf,
}

impl Internet {
    fn start(lab: &Lab, web_dir: &Path) -> Result<Self> {
        let host = lab.add_host("internet", &format!("{ALIYUN_IP}/{INTERNET_PREFIX_LEN}"))?;
        let mut extra: Vec<Ipv4Addr> = EXTERNAL_HOSTS.iter().map(|(_, ip)| *ip).collect();
        extra.push(DNS_IP);
        extra.sort();
        extra.dedup();
        for ip in extra.into_iter().filter(|ip| *ip != ALIYUN_IP) {
            lab.add_address(&host, &format!("{ip}/{INTERNET_PREFIX_LEN}"))?;
        }
        // 1.1.1.1 lives on the internet host too, reached through a route in the router only.
        host.ip_cmd(&["addr", "add", &format!("{TCP_BY_IP}/32"), "dev", "eth0"])?;
        lab.router().ip_cmd(&[
            "route",
            "add",
            &format!("{TCP_BY_IP}/32"),
            "via",
            &ALIYUN_IP.to_string(),
        ])?;

        let records: Vec<(&str, IpAddr)> = EXTERNAL_HOSTS
            .iter()
            .map(|(name, ip)| (*name, IpAddr::V4(*ip)))
            .collect();
        let dnsmasq = start_dnsmasq(&host, IpAddr::V4(DNS_IP), &records)?;

        let web = web_dir.display().to_string();
        let conf = NGINX_CONF.replace("@WEB@", &web);
        let nginx = Nginx::start(&host, &NginxConfig::Full(conf))?;
        for port in [80, 443] {
            host.wait_tcp(SocketAddr::new(IpAddr::V4(ALIYUN_IP), port), START_TIMEOUT)
                .with_context(|| format!("nginx did not listen on :{port}"))?;
        }

        let echo_seen = Arc::new(Mutex::new(Vec::new()));
        let echo = TCP_ECHO_SERVICES
            .iter()
            .map(|(ip, port)| {
                EchoServer::start(
                    &host,
                    SocketAddr::new(IpAddr::V4(*ip), *port),
                    echo_seen.clone(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Internet {
            _echo: echo,
            echo_seen,
            nginx,
            dnsmasq,
            host,
            web_ca: web_dir.join("ca.pem"),
        })
    }

    /// The namespace holding the external services.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The CA that signed the external services' certificate (PEM). Pass it to `curl --cacert`.
    pub fn ca_file(&self) -> &Path {
        &self.web_ca
    }

    /// Every request nginx served so far, one JSON object each (remote_addr, server_port,
    /// scheme, ssl_server_name, host, method, uri, status, ...).
    pub fn http_log(&self) -> Vec<Value> {
        json_lines(&std::fs::read_to_string(self.nginx.access_log()).unwrap_or_default())
    }

    /// Waits for a request logged after the first `after` entries that satisfies `pred`.
    pub fn wait_http_log(
        &self,
        after: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_json_log(|| self.http_log(), after, timeout, pred).map_err(|new| {
            anyhow!(
                "no matching request in the upstream's log within {timeout:?}; new entries: {new}"
            )
        })
    }

    /// Connections the TCP echo services accepted so far.
    pub fn echo_connections(&self) -> Vec<EchoConn> {
        self.echo_seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- dnsmasq log tail ---\n{}\n--- nginx error log tail ---\n{}\n",
            tail(&self.dnsmasq.log(), 30),
            tail(
                &std::fs::read_to_string(self.nginx.error_log()).unwrap_or_default(),
                30
            )
        )
    }
}

/// Writes the internet's CA, its server certificate (every external host name) and the 301 page.
fn write_web_files(dir: &Path) -> Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate().context("CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "strait lab internet CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).context("CA certificate")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let names: Vec<String> = EXTERNAL_HOSTS
        .iter()
        .filter(|(name, _)| *name != "test-tcp.com")
        .map(|(name, _)| (*name).to_owned())
        .collect();
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "aliyun.com");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate().context("server key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("server certificate")?;

    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("server.pem"), cert.pem())?;
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem())?;
    std::fs::write(dir.join(".moved.html"), MOVED_BODY)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Proxies
// ---------------------------------------------------------------------------------------------

/// Resolved paths of the binaries under test.
#[derive(Debug, Clone)]
struct Binaries {
    ztunnel: PathBuf,
    waypoint: PathBuf,
}

impl Binaries {
    fn find(dir: Option<&Path>) -> Result<Self> {
        let find = |name: &str| match dir {
            Some(dir) => {
                let path = dir.join(name);
                ensure!(
                    path.is_file(),
                    "{} not found (build it: cargo build --workspace --bins)",
                    path.display()
                );
                Ok(path)
            }
            None => crate::workspace_bin(name),
        };
        Ok(Binaries {
            ztunnel: find("ztunnel")?,
            waypoint: find("waypoint")?,
        })
    }
}

/// The node's ztunnel, a root process in the root namespace.
pub struct Ztunnel {
    child: Option<ChildGuard>,
    command: Vec<String>,
    admin: SocketAddr,
    metrics: SocketAddr,
    readiness: SocketAddr,
}

impl Ztunnel {
    /// `/config_dump` and friends.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// `/metrics` (Prometheus text).
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics)
    }

    pub fn readiness_url(&self) -> String {
        format!("http://{}/healthz/ready", self.readiness)
    }

    /// The command line it runs with.
    pub fn command_line(&self) -> String {
        self.command.join(" ")
    }

    /// Its stdout + stderr so far.
    pub fn log(&self) -> String {
        self.child.as_ref().map(ChildGuard::log).unwrap_or_default()
    }

    /// `/metrics` as Prometheus text.
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = http_get(None, &self.metrics_url())?;
        ensure!(status == 200, "ztunnel /metrics answered {status}");
        Ok(body)
    }

    /// Connection-log entries so far: the JSON lines of its stdout, one per closed (or refused)
    /// connection (`direction`, `src_addr`, `dst_addr`, `src_identity`, `outcome`, `error`, ...).
    pub fn connection_log(&self) -> Vec<Value> {
        json_lines(&self.log())
            .into_iter()
            .filter(|v| v.get("direction").is_some() && v.get("outcome").is_some())
            .collect()
    }

    /// Waits for a connection-log entry written after the first `after` ones that satisfies
    /// `pred` (a line is written when the connection ends).
    pub fn wait_connection_log(
        &self,
        after: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_json_log(|| self.connection_log(), after, timeout, pred).map_err(|new| {
            anyhow!("ztunnel logged no matching connection within {timeout:?}; new entries: {new}")
        })
    }

    /// The JSON `/config_dump`.
    pub fn config_dump(&self) -> Result<Value> {
        let (status, body) = http_get(None, &self.admin_url("/config_dump"))?;
        ensure!(
            status == 200,
            "ztunnel /config_dump answered {status}: {body}"
        );
        serde_json::from_str(&body).context("ztunnel /config_dump is not JSON")
    }

    /// The errors of the last rejected reload (`last_error` in `/config_dump`), if any.
    pub fn last_error(&self) -> Option<Value> {
        self.config_dump()
            .ok()?
            .get("last_error")
            .filter(|e| !e.is_null())
            .cloned()
    }

    /// The configuration generation in use, from `/config_dump` or the metrics.
    pub fn generation(&self) -> Result<Option<u64>> {
        if let Ok(dump) = self.config_dump()
            && let Some(generation) = generation_of(&dump)
        {
            return Ok(Some(generation));
        }
        let (status, body) = http_get(None, &self.metrics_url())?;
        ensure!(status == 200, "ztunnel /metrics answered {status}");
        Ok(metrics_generation(&body))
    }

    fn spawn(&mut self) -> Result<()> {
        let (program, args) = self.command.split_first().context("empty command")?;
        let mut command = Command::new(program);
        command.args(args);
        for var in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
            command.env_remove(var);
        }
        die_with_parent(&mut command);
        self.child = Some(ChildGuard::spawn("ztunnel", command)?);
        Ok(())
    }

    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!("ztunnel exited ({status}); log:\n{}", child.log())),
            _ => None,
        }
    }
}

/// A waypoint: its pod namespace and the `waypoint` process running inside it.
pub struct Waypoint {
    // Drop order: the process before its namespace.
    child: Option<ChildGuard>,
    spec: WaypointSpec,
    command: Vec<String>,
    env: Vec<(String, String)>,
    host: Host,
}

impl Waypoint {
    pub fn spec(&self) -> &WaypointSpec {
        &self.spec
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.spec.ip
    }

    /// Its pod namespace.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The command line it runs with, inside its namespace.
    pub fn command_line(&self) -> String {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "ip netns exec {} env {} {}",
            self.host.name(),
            env.join(" "),
            self.command.join(" ")
        )
    }

    /// Its stdout + stderr so far.
    pub fn log(&self) -> String {
        self.child.as_ref().map(ChildGuard::log).unwrap_or_default()
    }

    /// Access-log entries so far (the JSON lines of its output that are access-log entries).
    pub fn access_log(&self) -> Vec<Value> {
        json_lines(&self.log())
            .into_iter()
            .filter(is_access_log_entry)
            .collect()
    }

    /// Waits for an access-log entry written after the first `after` ones that satisfies `pred`
    /// (the log is written asynchronously, after the response).
    pub fn wait_access_log(
        &self,
        after: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_json_log(|| self.access_log(), after, timeout, pred).map_err(|new| {
            anyhow!(
                "waypoint {} logged no matching access-log entry within {timeout:?}; new entries: {new}",
                self.spec.gateway()
            )
        })
    }

    /// GET on its admin listener (from inside its namespace): `(status, body)`.
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(Some(&self.host), &format!("http://{WAYPOINT_ADMIN}{path}"))
    }

    /// The configuration generation in use, from `/config_dump` or the metrics.
    pub fn generation(&self) -> Result<Option<u64>> {
        if let Ok((200, body)) = self.admin_get("/config_dump")
            && let Ok(dump) = serde_json::from_str::<Value>(&body)
            && let Some(generation) = generation_of(&dump)
        {
            return Ok(Some(generation));
        }
        let (status, body) = self.admin_get("/metrics")?;
        ensure!(status == 200, "waypoint /metrics answered {status}");
        Ok(metrics_generation(&body))
    }

    fn spawn(&mut self) -> Result<()> {
        let (program, args) = self.command.split_first().context("empty command")?;
        let mut command = self.host.command(program);
        command.args(args);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        die_with_parent(&mut command);
        let label = format!("waypoint {}", self.spec.gateway());
        self.child = Some(ChildGuard::spawn(label, command)?);
        Ok(())
    }

    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "waypoint {} exited ({status}); log:\n{}",
                self.spec.gateway(),
                child.log()
            )),
            _ => None,
        }
    }

    /// Waits until its admin listener accepts connections.
    fn wait_up(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(why) = self.exited() {
                bail!(why);
            }
            if self
                .host
                .wait_tcp(WAYPOINT_ADMIN, Duration::from_millis(200))
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "waypoint {} did not open its admin listener {WAYPOINT_ADMIN} within {timeout:?}; log:\n{}",
                    self.spec.gateway(),
                    tail(&self.log(), 40)
                );
            }
        }
    }
}

/// An application pod.
pub struct Pod {
    spec: PodSpec,
    host: Host,
}

impl Pod {
    pub fn spec(&self) -> &PodSpec {
        &self.spec
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.spec.ip
    }

    /// Its network namespace (`kubectl exec` is `ip netns exec <name>`).
    pub fn host(&self) -> &Host {
        &self.host
    }
}

/// One `curl` run in a pod: the parsed result and the response headers as curl printed them.
#[derive(Debug, Clone)]
pub struct CurlRun {
    pub out: CurlOutput,
    /// The raw response header block(s) (`curl -D`), for showing to a person.
    pub raw_headers: String,
    /// What a person would type in the pod.
    pub command: String,
}

impl std::ops::Deref for CurlRun {
    type Target = CurlOutput;

    fn deref(&self) -> &CurlOutput {
        &self.out
    }
}

impl CurlRun {
    /// One line for failure messages: exit code, status, headers, stderr.
    pub fn summary(&self) -> String {
        format!(
            "`{}`: exit {}, status {}, headers {:?}, stderr {:?}",
            self.command,
            self.out.exit_code,
            self.out.status,
            self.out.headers,
            self.out.stderr.trim()
        )
    }

    /// The response has status `status`.
    pub fn ensure_status(&self, status: u16) -> Result<()> {
        ensure!(
            self.out.status == status,
            "expected status {status}; {}",
            self.summary()
        );
        Ok(())
    }

    /// The external service answered itself: `Server: Tengine`, no waypoint header.
    pub fn ensure_direct(&self) -> Result<()> {
        ensure!(
            self.out.header("server") == Some("Tengine")
                && self.out.header("x-envoy-upstream-service-time").is_none(),
            "expected a direct answer (Server: Tengine, no x-envoy-upstream-service-time); {}",
            self.summary()
        );
        Ok(())
    }

    /// The waypoint answered: `server: envoy` and `x-envoy-upstream-service-time: <ms>`.
    pub fn ensure_via_waypoint(&self) -> Result<()> {
        ensure!(
            self.out.header("server") == Some("envoy")
                && self
                    .out
                    .header("x-envoy-upstream-service-time")
                    .is_some_and(|v| v.parse::<u64>().is_ok()),
            "expected the waypoint's answer (server: envoy, x-envoy-upstream-service-time); {}",
            self.summary()
        );
        Ok(())
    }

    /// No HTTP response at all (refused, reset, or TLS failed).
    pub fn ensure_no_response(&self) -> Result<()> {
        ensure!(
            self.out.exit_code != 0 && self.out.status == 0,
            "expected no response; {}",
            self.summary()
        );
        Ok(())
    }
}

/// What a TCP client in a pod got back from an echo service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpProbe {
    /// The line sent.
    pub sent: String,
    /// The line read back, when the exchange completed.
    pub reply: Option<String>,
    /// The client's exit code (0 = echoed).
    pub exit_code: i32,
    pub stderr: String,
}

impl TcpProbe {
    /// The service echoed what was sent.
    pub fn echoed(&self) -> bool {
        self.reply.as_deref() == Some(self.sent.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------------

/// The lab. See the module documentation.
pub struct SeedLab {
    // Field order is tear-down order: proxies, servers, namespaces, then files.
    ztunnel: Ztunnel,
    waypoints: Vec<Waypoint>,
    internet: Internet,
    pods: Vec<Pod>,
    lab: Lab,
    objects: Mutex<LabObjects>,
    node: String,
    config_dir: PathBuf,
    ca_dir: PathBuf,
    _root: tempfile::TempDir,
}

impl fmt::Debug for SeedLab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedLab")
            .field("node", &self.node)
            .field("config_dir", &self.config_dir)
            .finish_non_exhaustive()
    }
}

impl SeedLab {
    /// Seed 000's cluster (see [`SeedLabBuilder`]).
    pub fn builder() -> SeedLabBuilder {
        SeedLabBuilder::default()
    }

    fn start(spec: SeedLabBuilder) -> Result<Self> {
        let bins = Binaries::find(spec.bin_dir.as_deref())?;
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let node = format!("node-{}-{n}", std::process::id());
        sweep_stale_dirs();
        let root = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("lab temp dir")?;
        let config_dir = root.path().join("config");
        let ca_dir = root.path().join("ca");
        let web_dir = root.path().join("web");
        std::fs::create_dir_all(&config_dir)?;

        // The mesh CA, as `certs init --trust-domain cluster.local --out <ca>` writes it.
        certs::CertificateAuthority::generate(TRUST_DOMAIN)
            .context("generating the mesh CA")?
            .write(&ca_dir)
            .context("writing the mesh CA")?;
        write_web_files(&web_dir)?;

        let lab = Lab::new()?;
        let internet = Internet::start(&lab, &web_dir)?;

        let mut pods = Vec::new();
        for spec in &spec.pods {
            let host = lab.add_host(&spec.name, &format!("{}/{POD_PREFIX_LEN}", spec.ip))?;
            host.set_resolv_conf(&[IpAddr::V4(DNS_IP)])?;
            pods.push(Pod {
                spec: spec.clone(),
                host,
            });
        }
        let mut waypoint_hosts = Vec::new();
        for wp in &spec.waypoints {
            let host = lab.add_host(
                &format!("wp-{}", wp.name),
                &format!("{}/{POD_PREFIX_LEN}", wp.ip),
            )?;
            host.set_resolv_conf(&[IpAddr::V4(DNS_IP)])?;
            waypoint_hosts.push((wp.clone(), host));
        }

        // The configuration directory: the test's files, then the lab's own objects.
        let objects = LabObjects::new(&spec.pods, &spec.waypoints, spec.policy);
        for (file, yaml) in &spec.files {
            write_config_file(&config_dir, file, yaml)?;
        }
        write_config_file(&config_dir, NAMESPACES_FILE, &objects.render_namespaces()?)?;
        write_config_file(&config_dir, MESH_FILE, &objects.render_mesh()?)?;
        let pod_netns: Vec<(PodSpec, String)> = pods
            .iter()
            .map(|p| (p.spec.clone(), p.host.path().display().to_string()))
            .collect();
        let wp_netns: Vec<(WaypointSpec, String)> = waypoint_hosts
            .iter()
            .map(|(s, h)| (s.clone(), h.path().display().to_string()))
            .collect();
        write_config_file(
            &config_dir,
            PODS_FILE,
            &render_pods(&pod_netns, &wp_netns, &node)?,
        )?;
        for (wp, _) in &waypoint_hosts {
            if wp.lab_gateway {
                write_config_file(&config_dir, &lab_gateway_file(wp), &render_lab_gateway(wp)?)?;
            }
        }

        // ztunnel: root process in the root namespace; it enters the pods' namespaces itself.
        let [admin, metrics, readiness] = free_loopback_ports()?;
        let mut ztunnel = Ztunnel {
            child: None,
            command: vec![
                bins.ztunnel.display().to_string(),
                "--node".into(),
                node.clone(),
                "--config-dir".into(),
                config_dir.display().to_string(),
                "--ca-dir".into(),
                ca_dir.display().to_string(),
                // The capture ledger lives and dies with the lab, not in /run.
                "--state-dir".into(),
                root.path().join("ztunnel-state").display().to_string(),
                "--dns-upstream".into(),
                format!("{DNS_IP}:53"),
                "--admin".into(),
                admin.to_string(),
                "--metrics".into(),
                metrics.to_string(),
                "--readiness".into(),
                readiness.to_string(),
                // Tear-down and restarts should not wait for the default 10 s drain.
                "--drain-seconds".into(),
                "1".into(),
            ],
            admin,
            metrics,
            readiness,
        };
        ztunnel.spawn()?;

        // Waypoints run inside their pod namespace. The seeds' DestinationRules carry no
        // caCertificates, so the waypoint verifies upstreams against its system roots: point
        // those (rustls-native-certs reads SSL_CERT_FILE) at the lab internet's CA.
        let mut waypoints = Vec::new();
        for (wp, host) in waypoint_hosts {
            let mut waypoint = Waypoint {
                child: None,
                command: vec![
                    bins.waypoint.display().to_string(),
                    "--gateway".into(),
                    wp.gateway(),
                    "--config-dir".into(),
                    config_dir.display().to_string(),
                    "--ca-dir".into(),
                    ca_dir.display().to_string(),
                    "--dns-server".into(),
                    format!("{DNS_IP}:53"),
                    "--admin".into(),
                    WAYPOINT_ADMIN.to_string(),
                    // Tear-down and restarts should not wait for the default 20 s drain.
                    "--drain-seconds".into(),
                    "1".into(),
                ],
                env: vec![(
                    "SSL_CERT_FILE".into(),
                    web_dir.join("ca.pem").display().to_string(),
                )],
                spec: wp,
                host,
            };
            waypoint.spawn()?;
            waypoints.push(waypoint);
        }

        let mut lab = SeedLab {
            ztunnel,
            waypoints,
            internet,
            pods,
            lab,
            objects: Mutex::new(objects),
            node,
            config_dir,
            ca_dir,
            _root: root,
        };
        lab.wait_ztunnel_ready()?;
        for waypoint in &mut lab.waypoints {
            waypoint.wait_up(START_TIMEOUT)?;
        }
        Ok(lab)
    }

    // ----- accessors -----

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The watched configuration directory.
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// The mesh CA (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`).
    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    pub fn router(&self) -> &Netns {
        self.lab.router()
    }

    pub fn ztunnel(&self) -> &Ztunnel {
        &self.ztunnel
    }

    pub fn internet(&self) -> &Internet {
        &self.internet
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .with_context(|| format!("the lab has no pod {name:?}"))
    }

    pub fn waypoints(&self) -> &[Waypoint] {
        &self.waypoints
    }

    /// The waypoint of Gateway `name` (any namespace).
    pub fn waypoint(&self, name: &str) -> Result<&Waypoint> {
        self.waypoints
            .iter()
            .find(|w| w.spec.name == name)
            .with_context(|| format!("the lab has no waypoint {name:?}"))
    }

    // ----- traffic -----

    /// `curl <args>` in pod `pod`, as `kubectl exec <pod> -- curl <args>` would run it.
    pub fn curl(&self, pod: &str, args: &[&str]) -> Result<CurlRun> {
        let pod = self.pod(pod)?;
        let dir = tempfile::tempdir().context("curl temp dir")?;
        let headers = dir.path().join("headers");
        let headers_arg = headers.display().to_string();
        let mut full = vec!["-D", headers_arg.as_str()];
        full.extend_from_slice(args);
        let out = pod.host.curl(&full)?;
        Ok(CurlRun {
            out,
            raw_headers: std::fs::read_to_string(&headers).unwrap_or_default(),
            command: format!("ip netns exec {} curl {}", pod.host.name(), args.join(" ")),
        })
    }

    /// Connects from pod `pod` to `host:port` (a name is resolved in the pod, through the mesh's
    /// DNS), sends one line and reads one line back, within 5 s.
    pub fn tcp_echo(&self, pod: &str, host: &str, port: u16) -> Result<TcpProbe> {
        let pod = self.pod(pod)?;
        let sent = format!(
            "strait-echo-{}-{}",
            std::process::id(),
            PROBE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // bash's /dev/tcp resolves with the pod's resolv.conf, like any client in the pod.
        const SCRIPT: &str = r#"exec 3<>"/dev/tcp/$1/$2" || exit 7
printf '%s\n' "$3" >&3 || exit 55
IFS= read -r -t 5 line <&3 || exit 56
printf '%s' "$line""#;
        let output = pod.host.exec(&[
            "timeout",
            "10",
            "bash",
            "-c",
            SCRIPT,
            "probe",
            host,
            &port.to_string(),
            &sent,
        ])?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let exit_code = output.status.code().unwrap_or(-1);
        Ok(TcpProbe {
            reply: (exit_code == 0).then_some(stdout),
            sent,
            exit_code,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    // ----- configuration -----

    /// Writes `yaml` to `file` (relative to the configuration directory; the first directory
    /// is the default namespace) and waits until every proxy has loaded it. Unchanged content
    /// is a no-op, like `kubectl apply` of an unchanged object.
    pub fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        let path = config_path(&self.config_dir, file)?;
        if std::fs::read_to_string(&path).ok().as_deref() == Some(yaml) {
            return Ok(());
        }
        self.change_config(&format!("apply {file}"), || {
            write_config_file(&self.config_dir, file, yaml)
        })
    }

    /// Removes `file` from the configuration directory and waits until every proxy has loaded
    /// the result.
    pub fn delete(&self, file: &str) -> Result<()> {
        let path = config_path(&self.config_dir, file)?;
        ensure!(
            path.exists(),
            "{file} is not in the configuration directory"
        );
        self.change_config(&format!("delete {file}"), || {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
        })
    }

    /// `kubectl label namespace <ns> <key>=<value> --overwrite` (`Some`) or `<key>-` (`None`).
    pub fn label_namespace(&self, ns: &str, key: &str, value: Option<&str>) -> Result<()> {
        self.edit_namespace(ns, |meta| set_or_remove(&mut meta.labels, key, value))
    }

    /// `kubectl annotate namespace <ns> <key>=<value> --overwrite` (`Some`) or `<key>-`.
    pub fn annotate_namespace(&self, ns: &str, key: &str, value: Option<&str>) -> Result<()> {
        self.edit_namespace(ns, |meta| set_or_remove(&mut meta.annotations, key, value))
    }

    /// Sets the mesh's `outboundTrafficPolicy.mode` (the ConfigMap `istio` in `istio-system`).
    pub fn set_outbound_policy(&self, policy: OutboundPolicy) -> Result<()> {
        let yaml = {
            let mut objects = self.lock_objects()?;
            objects.policy = policy;
            objects.render_mesh()?
        };
        self.apply(MESH_FILE, &yaml)
    }

    fn edit_namespace(&self, ns: &str, edit: impl FnOnce(&mut NamespaceMeta)) -> Result<()> {
        let yaml = {
            let mut objects = self.lock_objects()?;
            edit(objects.namespaces.entry(ns.to_owned()).or_default());
            objects.render_namespaces()?
        };
        self.apply(NAMESPACES_FILE, &yaml)
    }

    fn lock_objects(&self) -> Result<std::sync::MutexGuard<'_, LabObjects>> {
        self.objects
            .lock()
            .map_err(|_| anyhow::anyhow!("lab objects lock poisoned"))
    }

    /// Runs `change` once the proxies' generations are settled, then waits until each has
    /// loaded a newer one.
    fn change_config(&self, what: &str, change: impl FnOnce() -> Result<()>) -> Result<()> {
        let before = self.settled_generations()?;
        let rejected_before = self.ztunnel.last_error();
        change()?;
        if before.iter().all(|(_, g)| g.is_none()) {
            // Neither /config_dump nor the metrics expose a generation: fall back to the
            // watcher's debounce plus a margin, and say so.
            eprintln!(
                "seedlab: no proxy exposes its configuration generation; waiting 1 s after {what}"
            );
            thread::sleep(Duration::from_secs(1));
            return Ok(());
        }
        let deadline = Instant::now() + CONFIG_TIMEOUT;
        loop {
            let now = self.generations();
            let pending: Vec<String> = before
                .iter()
                .zip(&now)
                .filter(|((_, b), (_, n))| match (b, n) {
                    (Some(b), Ok(Some(n))) => n <= b,
                    (Some(_), _) => true,
                    (None, _) => false,
                })
                .map(|((label, b), (_, n))| format!("{label} (was {b:?}, now {n:?})"))
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if let Some(why) = self.any_exited() {
                bail!("{what}: {why}");
            }
            // A rejected reload keeps the old generation: say why instead of timing out.
            let rejected = self.ztunnel.last_error();
            if rejected.is_some() && rejected != rejected_before {
                bail!(
                    "{what}: the configuration was rejected: {}",
                    rejected.map(|e| e.to_string()).unwrap_or_default()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{what}: not loaded within {CONFIG_TIMEOUT:?} by {}\n{}",
                    pending.join(", "),
                    self.diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Each proxy's generation: `(label, Ok(Some(g)) | Ok(None) = not exposed | Err)`.
    fn generations(&self) -> Vec<(String, Result<Option<u64>>)> {
        let mut out = vec![("ztunnel".to_owned(), self.ztunnel.generation())];
        for w in &self.waypoints {
            out.push((format!("waypoint {}", w.spec.gateway()), w.generation()));
        }
        out
    }

    /// Generations once two reads [`SETTLE`] apart agree (bounded by [`CONFIG_TIMEOUT`]).
    fn settled_generations(&self) -> Result<Vec<(String, Option<u64>)>> {
        let read = |lab: &Self| -> Result<Vec<(String, Option<u64>)>> {
            lab.generations()
                .into_iter()
                .map(|(label, g)| g.map(|g| (label.clone(), g)).with_context(|| label))
                .collect()
        };
        let deadline = Instant::now() + CONFIG_TIMEOUT;
        let mut last = read(self)?;
        loop {
            thread::sleep(SETTLE);
            let now = read(self)?;
            if now == last || Instant::now() >= deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    // ----- processes -----

    /// Stops ztunnel (SIGTERM) and starts it again with the same flags; returns once it is
    /// ready and serving every pod again.
    pub fn restart_ztunnel(&mut self) -> Result<()> {
        if let Some(mut child) = self.ztunnel.child.take() {
            child.stop()?;
        }
        self.ztunnel.spawn()?;
        self.wait_ztunnel_ready()
    }

    /// Stops waypoint `name` (SIGTERM) and starts it again; returns once its admin listener is
    /// up and it reports ready.
    pub fn restart_waypoint(&mut self, name: &str) -> Result<()> {
        let waypoint = self
            .waypoints
            .iter_mut()
            .find(|w| w.spec.name == name)
            .with_context(|| format!("the lab has no waypoint {name:?}"))?;
        if let Some(mut child) = waypoint.child.take() {
            child.stop()?;
        }
        waypoint.spawn()?;
        waypoint.wait_up(START_TIMEOUT)?;
        self.wait_waypoint_ready(name, START_TIMEOUT)
    }

    /// Waits until waypoint `name` answers 200 on `/healthz/ready`.
    pub fn wait_waypoint_ready(&self, name: &str, timeout: Duration) -> Result<()> {
        let waypoint = self.waypoint(name)?;
        let deadline = Instant::now() + timeout;
        loop {
            let last = waypoint.admin_get("/healthz/ready");
            if matches!(last, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "waypoint {} not ready within {timeout:?} (last: {last:?}); log:\n{}",
                    waypoint.spec.gateway(),
                    tail(&waypoint.log(), 40)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// ztunnel answers 200 on its readiness endpoint and listens in every pod (15001, 15053).
    fn wait_ztunnel_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = self.ztunnel.readiness_url();
        loop {
            if let Some(why) = self.ztunnel.exited() {
                bail!(why);
            }
            if matches!(http_get(None, &url), Ok((200, _))) {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "ztunnel not ready ({url}) within {START_TIMEOUT:?}; log:\n{}",
                    tail(&self.ztunnel.log(), 60)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        for pod in &self.pods {
            let filter = format!("sport = :{}", 15001);
            let remaining = deadline.saturating_duration_since(Instant::now());
            crate::wait_until(
                &format!("ztunnel's outbound listener in pod {}", pod.spec.name),
                remaining.max(Duration::from_secs(1)),
                || {
                    Ok(!pod
                        .host
                        .exec_ok(&["ss", "-Hltn", &filter])?
                        .trim()
                        .is_empty())
                },
            )
            .with_context(|| format!("ztunnel log:\n{}", tail(&self.ztunnel.log(), 60)))?;
            pod.host
                .wait_udp_bound(15053, remaining.max(Duration::from_secs(1)))
                .with_context(|| {
                    format!(
                        "ztunnel's DNS proxy in pod {}; ztunnel log:\n{}",
                        pod.spec.name,
                        tail(&self.ztunnel.log(), 60)
                    )
                })?;
        }
        Ok(())
    }

    fn any_exited(&self) -> Option<String> {
        let running =
            |child: &Option<ChildGuard>| child.as_ref().is_some_and(|c| is_running(c.id()));
        if !running(&self.ztunnel.child) {
            return Some(format!(
                "ztunnel is not running; log:\n{}",
                tail(&self.ztunnel.log(), 60)
            ));
        }
        for w in &self.waypoints {
            if !running(&w.child) {
                return Some(format!(
                    "waypoint {} is not running; log:\n{}",
                    w.spec.gateway(),
                    tail(&w.log(), 60)
                ));
            }
        }
        None
    }

    /// Log tails of every process of the lab, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "--- ztunnel log tail ({}) ---\n{}\n",
            self.ztunnel.command_line(),
            tail(&self.ztunnel.log(), 60)
        );
        for w in &self.waypoints {
            out.push_str(&format!(
                "--- waypoint {} log tail ---\n{}\n",
                w.spec.gateway(),
                tail(&w.log(), 60)
            ));
        }
        out.push_str(&self.internet.diagnostics());
        out
    }
}

/// Independent expectations of one scenario: each is checked, and the scenario fails at the end
/// with every failure, so one broken behaviour does not hide the state of the others.
#[derive(Debug, Default)]
pub struct Expectations {
    failures: Vec<String>,
}

impl Expectations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `result` as the outcome of expectation `what`.
    pub fn check(&mut self, what: &str, result: Result<()>) {
        if let Err(e) = result {
            self.failures.push(format!("{what}: {e:#}"));
        }
    }

    /// Fails with every recorded failure, if any.
    pub fn finish(self) -> Result<()> {
        if self.failures.is_empty() {
            return Ok(());
        }
        bail!(
            "{} expectation(s) failed:\n- {}",
            self.failures.len(),
            self.failures.join("\n- ")
        )
    }
}

/// How long tests wait for an access-log or upstream-log entry after a response.
pub const LOG_WAIT: Duration = Duration::from_secs(5);

/// Seed 000 step 2: the waypoint Gateway in `istio-egress` and the namespace label, then waits
/// until the waypoint reports ready.
pub fn apply_seed_000_waypoint(lab: &SeedLab) -> Result<()> {
    lab.apply("istio-egress/waypoint.yaml", seeds::S000_WAYPOINT_GATEWAY)?;
    lab.label_namespace("istio-egress", USE_WAYPOINT_LABEL, Some("waypoint"))?;
    lab.wait_waypoint_ready("waypoint", START_TIMEOUT)
}

/// Runs one seed test: skips (loudly) without root, builds the lab from `builder`, runs `test`,
/// and on failure panics with the error and every process's log tail, while the lab is still up
/// (its guards then tear it down).
pub fn run_seed_test(builder: SeedLabBuilder, test: impl FnOnce(&mut SeedLab) -> Result<()>) {
    if !crate::lab_enabled() {
        return;
    }
    let mut lab = match builder.start() {
        Ok(lab) => lab,
        Err(e) => panic!("starting the seed lab: {e:#}"),
    };
    if let Err(e) = test(&mut lab) {
        panic!("{e:#}\n\n{}", lab.diagnostics());
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn set_or_remove(map: &mut BTreeMap<String, String>, key: &str, value: Option<&str>) {
    match value {
        Some(v) => {
            map.insert(key.to_owned(), v.to_owned());
        }
        None => {
            map.remove(key);
        }
    }
}

/// Lab directories are `<tmp>/strait-seedlab-<pid>-<random>`.
const DIR_PREFIX: &str = "strait-seedlab-";

/// Removes lab directories of processes that no longer exist (killed before their guards ran).
fn sweep_stale_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Makes the child get SIGKILL when the thread that spawned it exits, also when this process is
/// killed before its guards run: a ztunnel in the root namespace must never outlive its lab
/// (namespaced processes are swept with their namespace, but the root namespace is not).
/// Hence a lab must stay on the thread that built it, as tests and the demo do.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether process `pid` exists and has not exited (an unreaped child is a zombie, `Z`).
fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

/// `file` under `dir`, refusing absolute paths and `..` (the lab never writes outside).
fn config_path(dir: &Path, file: &str) -> Result<PathBuf> {
    let rel = Path::new(file);
    ensure!(
        !file.is_empty()
            && rel.components().all(|c| matches!(c, Component::Normal(_)))
            && (file.ends_with(".yaml") || file.ends_with(".yml")),
        "{file:?} must be a relative path to a .yaml file inside the configuration directory"
    );
    Ok(dir.join(rel))
}

/// Writes atomically (hidden temp file + rename): the watcher never reads half a file, and
/// hidden files are not loaded.
fn write_config_file(dir: &Path, file: &str, yaml: &str) -> Result<()> {
    let path = config_path(dir, file)?;
    let parent = path.parent().context("file without parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = path
        .file_name()
        .context("file without name")?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
}

/// Three distinct free loopback ports in the root namespace (bound at once, then released).
fn free_loopback_ports() -> Result<[SocketAddr; 3]> {
    let listeners = [(); 3].map(|()| TcpListener::bind("127.0.0.1:0"));
    let mut addrs = [SocketAddr::from(([127, 0, 0, 1], 0)); 3];
    for (slot, listener) in addrs.iter_mut().zip(listeners) {
        *slot = listener
            .context("binding a loopback port")?
            .local_addr()
            .context("local_addr")?;
    }
    Ok(addrs)
}

/// GET `url` with curl, in `ns` or in the root namespace: `(status, body)`.
fn http_get(ns: Option<&Netns>, url: &str) -> Result<(u16, String)> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let body = dir.path().join("body");
    let mut command = match ns {
        Some(ns) => ns.command("curl"),
        None => {
            let mut c = Command::new("curl");
            for var in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
                c.env_remove(var);
            }
            c
        }
    };
    command
        .args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            ADMIN_TIMEOUT_SECS,
            "-o",
        ])
        .arg(&body)
        .args(["-w", "%{http_code}", url]);
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let status: u16 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .with_context(|| format!("GET {url}: no status"))?;
    Ok((status, std::fs::read_to_string(&body).unwrap_or_default()))
}

/// The `generation` number of a config dump: at the top level or one object down.
fn generation_of(dump: &Value) -> Option<u64> {
    if let Some(g) = dump.get("generation").and_then(Value::as_u64) {
        return Some(g);
    }
    dump.as_object()?
        .values()
        .find_map(|v| v.get("generation").and_then(Value::as_u64))
}

/// `strait_config_generation` from Prometheus text.
fn metrics_generation(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("strait_config_generation")?;
        // Also accept a labelled series: `strait_config_generation{...} 3`.
        let value = rest.rsplit(' ').next()?;
        value
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|v| v as u64)
    })
}

/// Every line of `text` that is a JSON object.
/// Polls `read` until an entry after the first `after` satisfies `pred`; on timeout, the new
/// entries as JSON, for the caller's error message.
fn wait_json_log(
    read: impl Fn() -> Vec<Value>,
    after: usize,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> std::result::Result<Value, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = read();
        if let Some(entry) = log.iter().skip(after).find(|e| pred(e)) {
            return Ok(entry.clone());
        }
        if Instant::now() >= deadline {
            return Err(
                serde_json::to_string(&log.iter().skip(after).collect::<Vec<_>>())
                    .unwrap_or_default(),
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if !line.starts_with('{') {
                return None;
            }
            serde_json::from_str::<Value>(line)
                .ok()
                .filter(Value::is_object)
        })
        .collect()
}

/// Access-log entries (HTTP requests and TCP connections) carry an upstream cluster or a
/// response code; diagnostic JSON logs do not.
fn is_access_log_entry(v: &Value) -> bool {
    v.get("response_code").is_some() || v.get("upstream_cluster").is_some()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The IP part of an access-log address field (`"10.244.0.10:33356"`).
pub fn log_ip(entry: &Value, field: &str) -> Option<IpAddr> {
    entry
        .get(field)?
        .as_str()?
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip())
}

/// Whether `ip` is in Istio's auto-allocated ServiceEntry VIP range 240.240.0.0/16.
pub fn is_auto_vip(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.octets()[..2] == [240, 240])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_body_is_the_seeds_239_bytes() {
        assert_eq!(MOVED_BODY.len(), 239);
    }

    #[test]
    fn generation_from_dump_or_metrics() {
        assert_eq!(generation_of(&json!({"generation": 4})), Some(4));
        assert_eq!(
            generation_of(&json!({"config": {"generation": 7}, "x": 1})),
            Some(7)
        );
        assert_eq!(generation_of(&json!({"services": []})), None);
        let text = "# HELP strait_config_generation x\n# TYPE strait_config_generation gauge\nstrait_config_generation 12\n";
        assert_eq!(metrics_generation(text), Some(12));
        assert_eq!(
            metrics_generation("strait_config_generation{proxy=\"w\"} 3\n"),
            Some(3)
        );
        assert_eq!(metrics_generation("other 1\n"), None);
    }

    #[test]
    fn config_paths_stay_inside() {
        let dir = Path::new("/cfg");
        assert_eq!(
            config_path(dir, "istio-egress/se.yaml").unwrap(),
            Path::new("/cfg/istio-egress/se.yaml")
        );
        for bad in ["", "/etc/x.yaml", "../x.yaml", "a/../../x.yaml", "x.txt"] {
            assert!(config_path(dir, bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn labels_are_set_and_removed() {
        let with = with_label(
            seeds::S002_SERVICE_ENTRY,
            USE_WAYPOINT_LABEL,
            Some("waypoint"),
        )
        .unwrap();
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&with).unwrap();
        assert_eq!(
            v["metadata"]["labels"][USE_WAYPOINT_LABEL].as_str(),
            Some("waypoint")
        );
        assert_eq!(v["spec"]["hosts"][0].as_str(), Some("www.aliyun.com"));
        let without = with_label(&with, USE_WAYPOINT_LABEL, None).unwrap();
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&without).unwrap();
        assert!(v["metadata"]["labels"].get(USE_WAYPOINT_LABEL).is_none());
    }

    #[test]
    fn access_log_lines_are_picked_from_mixed_output() {
        let out = "2026-01-01T00:00:00Z INFO waypoint: started\n\
                   {\"response_code\":301,\"upstream_cluster\":\"inbound-vip|80|http|aliyun.com\"}\n\
                   {\"level\":\"INFO\",\"fields\":{}}\nnot json {\n";
        let entries: Vec<Value> = json_lines(out)
            .into_iter()
            .filter(is_access_log_entry)
            .collect();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["response_code"], 301);
    }

    /// The configuration a default lab writes, plus the seed 000 steps, loads without errors
    /// and binds aliyun.com to the lab's waypoint pod.
    #[test]
    fn lab_config_loads_and_binds_the_waypoint() {
        let spec = SeedLabBuilder::default();
        let objects = LabObjects::new(&spec.pods, &spec.waypoints, spec.policy);
        let pods: Vec<(PodSpec, String)> = spec
            .pods
            .iter()
            .map(|p| (p.clone(), format!("/run/netns/mt-test-{}", p.name)))
            .collect();
        let wps: Vec<(WaypointSpec, String)> = spec
            .waypoints
            .iter()
            .map(|w| (w.clone(), format!("/run/netns/mt-test-wp-{}", w.name)))
            .collect();
        let mut objects_ns = objects.clone();
        objects_ns
            .namespaces
            .get_mut("istio-egress")
            .unwrap()
            .labels
            .insert(USE_WAYPOINT_LABEL.into(), "waypoint".into());
        let files = [
            ("default/sleep.yaml".to_owned(), seeds::SLEEP.to_owned()),
            (
                NAMESPACES_FILE.to_owned(),
                objects_ns.render_namespaces().unwrap(),
            ),
            (MESH_FILE.to_owned(), objects.render_mesh().unwrap()),
            (
                PODS_FILE.to_owned(),
                render_pods(&pods, &wps, "node-x").unwrap(),
            ),
            (
                "istio-egress/waypoint.yaml".to_owned(),
                seeds::S000_WAYPOINT_GATEWAY.to_owned(),
            ),
            (
                "istio-egress/aliyun.yaml".to_owned(),
                seeds::S000_SERVICE_ENTRY.to_owned(),
            ),
        ];
        let snap = mesh_config::load_sources(files.iter().map(|(f, y)| (f.as_str(), y.as_str())))
            .unwrap_or_else(|e| panic!("{e}"));
        let sleep = snap
            .workload_by_ip("10.244.0.10".parse().unwrap())
            .expect("sleep pod");
        assert_eq!(
            sleep.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert!(sleep.netns.is_some());
        let se = snap.service_by_host("aliyun.com").expect("aliyun.com");
        let w = se.waypoint.waypoint().expect("bound to the waypoint");
        assert_eq!(w.addresses, ["10.244.0.20".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            snap.outbound_traffic_policy(),
            mesh_config::OutboundTrafficPolicy::AllowAny
        );
    }

    /// REGISTRY_ONLY, a namespace annotation and a lab Gateway render to valid config too.
    #[test]
    fn lab_objects_render_policy_annotations_and_gateways() {
        let wp = WaypointSpec::new(
            "istio-egress",
            "egressgateway-a",
            Ipv4Addr::new(10, 244, 0, 20),
            true,
        );
        let mut objects = LabObjects::new(
            &[default_sleep()],
            std::slice::from_ref(&wp),
            OutboundPolicy::RegistryOnly,
        );
        set_or_remove(
            &mut objects
                .namespaces
                .get_mut("istio-system")
                .unwrap()
                .annotations,
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            Some("10.96.0.0/12"),
        );
        let files = [
            (
                NAMESPACES_FILE.to_owned(),
                objects.render_namespaces().unwrap(),
            ),
            (MESH_FILE.to_owned(), objects.render_mesh().unwrap()),
            (lab_gateway_file(&wp), render_lab_gateway(&wp).unwrap()),
            (
                PODS_FILE.to_owned(),
                render_pods(
                    &[(default_sleep(), "/run/netns/a".into())],
                    &[(wp.clone(), "/run/netns/b".into())],
                    "n",
                )
                .unwrap(),
            ),
            (
                "istio-egress/asm.yaml".to_owned(),
                seeds::S003_AUTO_PORTS.to_owned(),
            ),
        ];
        let snap = mesh_config::load_sources(files.iter().map(|(f, y)| (f.as_str(), y.as_str())))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            snap.outbound_traffic_policy(),
            mesh_config::OutboundTrafficPolicy::RegistryOnly
        );
        let sleep = snap.workload_by_ip("10.244.0.10".parse().unwrap()).unwrap();
        assert!(
            !sleep
                .capture
                .captures_outbound("203.0.113.11:80".parse().unwrap())
        );
        assert!(
            sleep
                .capture
                .captures_outbound("10.96.0.1:80".parse().unwrap())
        );
        let se = snap.service_by_host("test-tcp.com").expect("generated SE");
        assert!(se.waypoint.waypoint().is_some(), "{:?}", se.waypoint);
    }
}
