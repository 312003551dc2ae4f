//! The compiled, immutable view of the mesh that ztunnel and the waypoint read.
//!
//! A [`Snapshot`] is built once per configuration change ([`crate::compile`]) and shared as
//! `Arc<Snapshot>`; every lookup is a hash-map probe (or a short scan where noted), with no I/O
//! and no allocation on the hot path.
use crate::authz::AuthzPolicies;
use crate::capture::CaptureScope;
use crate::hostmap::HostMap;
use crate::model::Labels;
use crate::policy::DestinationPolicy;
use crate::route::ServiceRoutes;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

/// Kubernetes' cluster DNS domain for Service hostnames (`<name>.<ns>.svc.cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Default trust domain when MeshConfig does not set one.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Istio's root namespace: mesh-wide policies and the `istio` ConfigMap live here.
pub const ROOT_NAMESPACE: &str = "istio-system";
/// Label naming the waypoint that serves a Namespace / Service / ServiceEntry / Pod.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Label naming the namespace of that waypoint when it is not the resource's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Label set on a waypoint's pods.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Label on a waypoint Gateway: which traffic it serves (service, workload, all, none).
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// Label on a ServiceEntry: `"false"` opts out of VIP auto-allocation.
pub const AUTO_ALLOCATE_LABEL: &str = "networking.istio.io/enable-autoallocate-ip";
/// Pod annotation: path of the pod's network namespace, for ztunnel outside Kubernetes.
pub const NETNS_ANNOTATION: &str = "strait.dev/netns";
/// Pod annotation `"true"`: the pod is captured by the ztunnel of its node, so it accepts HBONE
/// on its 15008 wherever the connection comes from. Written only by kube-source (for Running,
/// non-hostNetwork pods with a node; whatever the cluster says here is dropped); outside
/// Kubernetes the [`NETNS_ANNOTATION`] says the same. It grants no local capture: entering a
/// pod's network namespace still needs its netns.
pub const CAPTURED_ANNOTATION: &str = "strait.dev/captured";
/// Pod label that opts a pod out of ambient capture (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        NamespacedName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A SPIFFE identity `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(td: impl Into<String>, ns: impl Into<String>, sa: impl Into<String>) -> Self {
        Identity {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    /// Parses `spiffe://td/ns/x/sa/y` (the `spiffe://` prefix is optional, as in Istio
    /// principals).
    pub fn parse(s: &str) -> Option<Identity> {
        let s = s.strip_prefix("spiffe://").unwrap_or(s);
        let mut it = s.split('/');
        let (td, ns_kw, ns, sa_kw, sa) =
            (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
        if it.next().is_some()
            || ns_kw != "ns"
            || sa_kw != "sa"
            || td.is_empty()
            || ns.is_empty()
            || sa.is_empty()
        {
            return None;
        }
        Some(Identity::new(td, ns, sa))
    }

    /// Istio's principal form: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Application protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Protocol {
    Http,
    Http2,
    Https,
    Tls,
    Tcp,
    Grpc,
    Udp,
}

impl Protocol {
    /// Istio protocol names, case-insensitive (`HTTP`, `http2`, `gRPC`, …).
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_uppercase().as_str() {
            "HTTP" => Protocol::Http,
            "HTTP2" => Protocol::Http2,
            "HTTPS" => Protocol::Https,
            "TLS" => Protocol::Tls,
            "TCP" => Protocol::Tcp,
            "GRPC" => Protocol::Grpc,
            "UDP" => Protocol::Udp,
            _ => return None,
        })
    }

    /// Istio's port-name / appProtocol convention for Kubernetes Services (`http`, `http-web`,
    /// `grpc-x`, `tls`, …); unknown names are TCP.
    pub fn from_port_name(name: &str) -> Protocol {
        let prefix = name.split(['-', '_']).next().unwrap_or("");
        match prefix.to_ascii_lowercase().as_str() {
            "http" => Protocol::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
            "https" => Protocol::Https,
            "tls" => Protocol::Tls,
            "grpc" => Protocol::Grpc,
            "udp" => Protocol::Udp,
            _ => Protocol::Tcp,
        }
    }

    /// Does the waypoint parse HTTP on this port?
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    /// Is the client's payload TLS (SNI available, no L7)?
    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Http2 => "HTTP2",
            Protocol::Https => "HTTPS",
            Protocol::Tls => "TLS",
            Protocol::Tcp => "TCP",
            Protocol::Grpc => "GRPC",
            Protocol::Udp => "UDP",
        }
    }
}

/// ServiceEntry resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Connect to the original destination address.
    None,
    /// Connect to the endpoints' addresses.
    Static,
    /// Resolve the host (or the endpoints' hostnames) with DNS; any answer.
    Dns,
    /// Like DNS, but round-robin over answers per connection.
    DnsRoundRobin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

/// Which object a [`Service`] was compiled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ServiceKind {
    Service,
    ServiceEntry,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub port: u16,
    pub name: String,
    pub protocol: Protocol,
    /// Port on the endpoints (Service `targetPort`, ServiceEntry `targetPort`); `None` = same
    /// as `port` (or resolved per endpoint for named Kubernetes target ports).
    pub target_port: Option<u16>,
}

impl ServicePort {
    /// The port to dial on an endpoint that has no per-endpoint override.
    pub fn upstream_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointAddress {
    Ip(IpAddr),
    Hostname(String),
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// `None` for a ServiceEntry endpoint without address (resolve the host itself).
    pub address: Option<EndpointAddress>,
    /// Port name → number overrides (ServiceEntry endpoints; resolved named target ports).
    pub ports: BTreeMap<String, u16>,
    pub labels: Labels,
    pub weight: u32,
    /// Identity of the endpoint, when it is a mesh workload.
    pub identity: Option<Identity>,
    /// The pod behind this endpoint, for Kubernetes Services.
    pub workload: Option<NamespacedName>,
}

/// `exportTo` visibility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportTo {
    All,
    /// Namespaces that may see it (`.` already replaced by the owner's namespace).
    Namespaces(Vec<String>),
}

/// A Kubernetes Service or one host of a ServiceEntry.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    /// FQDN (`name.ns.svc.cluster.local`) or the ServiceEntry host (may be `*.example.com`).
    pub hostname: String,
    pub kind: ServiceKind,
    /// The Service / ServiceEntry object.
    pub name: NamespacedName,
    /// Virtual IPs: clusterIP(s), ServiceEntry addresses, or auto-allocated (240.240/16 and
    /// 2001:2::/48).
    pub vips: Vec<IpAddr>,
    pub auto_allocated: bool,
    /// ServiceEntry addresses given as CIDR prefixes (matched by [`Snapshot::service_by_addr`]
    /// after the exact VIPs).
    pub cidrs: Vec<ipnet::IpNet>,
    pub ports: Vec<ServicePort>,
    pub resolution: Resolution,
    pub location: Location,
    pub endpoints: Vec<Endpoint>,
    pub labels: Labels,
    pub export_to: ExportTo,
    pub subject_alt_names: Vec<String>,
    pub waypoint: WaypointBinding,
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    pub fn is_wildcard(&self) -> bool {
        self.hostname.starts_with('*')
    }

    pub fn is_visible_to(&self, namespace: &str) -> bool {
        match &self.export_to {
            ExportTo::All => true,
            ExportTo::Namespaces(ns) => ns.iter().any(|n| n == namespace),
        }
    }

    /// The port to dial on `ep` for service port `sp`: the endpoint's override for the port
    /// name, else the target port, else the service port (Istio's rule).
    pub fn endpoint_port(&self, ep: &Endpoint, sp: &ServicePort) -> u16 {
        ep.ports
            .get(&sp.name)
            .copied()
            .unwrap_or_else(|| sp.upstream_port())
    }

    /// Istio's upstream cluster name for this service port as seen from a waypoint that serves
    /// it: `inbound-vip|<port>|http|<host>` (protocol part `http` or `tcp`).
    pub fn inbound_vip_cluster(&self, sp: &ServicePort) -> String {
        let proto = if sp.protocol.is_http() { "http" } else { "tcp" };
        format!("inbound-vip|{}|{}|{}", sp.port, proto, self.hostname)
    }
}

/// A service and one of its ports.
#[derive(Debug, Clone, Copy)]
pub struct ServicePortRef<'a> {
    pub service: &'a Arc<Service>,
    pub port: &'a ServicePort,
}

/// Which traffic a waypoint serves (`istio.io/waypoint-for`, default `service`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    pub fn serves_services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }
    pub fn serves_workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// From which namespaces a waypoint may be used (its HBONE listener's `allowedRoutes`;
/// Gateway API's default is `Same`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllowedFrom {
    Same,
    All,
    /// Namespaces whose labels match.
    Selector(Labels),
}

/// A waypoint: a Gateway of class `istio-waypoint`.
#[derive(Debug, Clone, Serialize)]
pub struct Waypoint {
    pub name: NamespacedName,
    /// Addresses to send HBONE to: its pods' IPs (label `gateway.networking.k8s.io/gateway-name`),
    /// else the Gateway's spec/status addresses.
    pub addresses: Vec<IpAddr>,
    pub hbone_port: u16,
    /// spiffe://<td>/ns/<gw ns>/sa/<gw name>, unless a pod names its serviceAccountName.
    pub identity: Identity,
    pub waypoint_for: WaypointFor,
    pub allowed_from: AllowedFrom,
    pub pods: Vec<NamespacedName>,
}

impl Waypoint {
    /// HBONE destinations, `address:15008`.
    pub fn hbone_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.addresses
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.hbone_port))
    }
}

/// How traffic to a service / workload is bound to a waypoint.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaypointBinding {
    /// No waypoint (not labelled, or labelled `none`).
    #[default]
    None,
    Bound(Arc<Waypoint>),
    /// Labelled with a waypoint that does not exist, is not a waypoint, has no address or does
    /// not accept this namespace. Callers must fail closed (deny), not bypass the waypoint.
    Unresolved {
        gateway: NamespacedName,
        reason: String,
    },
}

impl WaypointBinding {
    pub fn waypoint(&self) -> Option<&Arc<Waypoint>> {
        match self {
            WaypointBinding::Bound(w) => Some(w),
            _ => None,
        }
    }
    pub fn is_none(&self) -> bool {
        matches!(self, WaypointBinding::None)
    }
}

/// A pod's controlling owner (`metadata.ownerReferences[]` with `controller: true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Controller {
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

/// A pod.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub name: NamespacedName,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub service_account: String,
    pub identity: Identity,
    pub labels: Labels,
    /// Network namespace path (annotation `strait.dev/netns`), used outside Kubernetes.
    pub netns: Option<PathBuf>,
    /// Captured by its node's ztunnel (annotation [`CAPTURED_ANNOTATION`]), for pods whose
    /// netns this process does not know (other nodes, or any pod as seen by the waypoint).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub captured: bool,
    /// What ztunnel captures in this pod (Istio's traffic.sidecar.istio.io annotations).
    pub capture: Arc<CaptureScope>,
    /// Waypoint for traffic addressed to this workload's IP (pod label, or namespace label
    /// when the waypoint serves workloads).
    pub waypoint: WaypointBinding,
    /// Set when this pod is (one replica of) a waypoint.
    pub waypoint_of: Option<NamespacedName>,
    /// `metadata.generateName`: the pod's name was generated by its controller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    /// The owner reference with `controller: true` (ReplicaSet, StatefulSet, Job, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<Controller>,
    /// L4 authorization policies that select this workload (selector / namespace-wide /
    /// mesh-wide). Enforced by ztunnel on inbound.
    #[serde(skip)]
    pub authz: Arc<AuthzPolicies>,
}

impl Workload {
    /// Whether this pod is in the ambient mesh, i.e. captured by a ztunnel (this node's or
    /// another's) and so reached over HBONE on its 15008 from anywhere: it has a node and an
    /// address, is captured ([`Workload::netns`] known or [`Workload::captured`] marked), is not
    /// a waypoint (waypoints speak HBONE themselves and are never captured) and did not opt out
    /// with `istio.io/dataplane-mode: none`.
    pub fn in_mesh(&self) -> bool {
        self.node.is_some()
            && !self.ips.is_empty()
            && (self.netns.is_some() || self.captured)
            && self.waypoint_of.is_none()
            && self
                .labels
                .get(DATAPLANE_MODE_LABEL)
                .is_none_or(|mode| mode != "none")
    }
}

/// Outbound traffic policy (MeshConfig `outboundTrafficPolicy.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficPolicy {
    #[default]
    AllowAny,
    RegistryOnly,
}

/// Mesh-wide settings.
#[derive(Debug, Clone, Serialize)]
pub struct MeshSettings {
    pub trust_domain: String,
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    pub root_namespace: String,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            outbound_traffic_policy: OutboundTrafficPolicy::AllowAny,
            root_namespace: ROOT_NAMESPACE.to_owned(),
        }
    }
}

/// What an address resolves to.
#[derive(Debug, Clone, Copy)]
pub enum AddressMatch<'a> {
    Service(ServicePortRef<'a>),
    Workload(&'a Arc<Workload>),
}

/// One compiled ASMEgressTrafficPolicy entry (see the README's MAPPING section).
#[derive(Debug, Clone, Serialize)]
pub struct EgressEntry {
    pub policy: NamespacedName,
    /// `to[].name`.
    pub name: String,
    pub gateway: NamespacedName,
    pub hosts: Vec<String>,
    pub port: u16,
    pub protocol: Protocol,
    /// `to[].byEgressGateway.port`, or the auto-assigned port (10000–20000).
    pub gateway_port: u16,
    pub gateway_port_auto: bool,
    /// `httpsUpgrade.port` when enabled: TLS is originated to this port.
    pub https_upgrade_port: Option<u16>,
    /// The ServiceEntries generated for its hosts (one per host).
    pub service_entries: Vec<NamespacedName>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NamespaceInfo {
    pub labels: Labels,
}

/// The compiled mesh. Build with [`crate::compile::compile`] / [`crate::load_dir`].
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    pub mesh: MeshSettings,
    pub(crate) namespaces: BTreeMap<String, NamespaceInfo>,
    /// All services, sorted by hostname then kind/namespace.
    pub(crate) services: Vec<Arc<Service>>,
    #[serde(skip)]
    pub(crate) by_host: HostMap<Arc<Service>>,
    #[serde(skip)]
    pub(crate) by_addr: HashMap<SocketAddr, (Arc<Service>, usize)>,
    #[serde(skip)]
    pub(crate) by_vip: HashMap<IpAddr, Vec<Arc<Service>>>,
    #[serde(skip)]
    pub(crate) cidr_services: Vec<(ipnet::IpNet, Arc<Service>)>,
    pub(crate) workloads: Vec<Arc<Workload>>,
    #[serde(skip)]
    pub(crate) workload_by_ip: HashMap<IpAddr, Arc<Workload>>,
    #[serde(skip)]
    pub(crate) workloads_by_node: HashMap<String, Vec<Arc<Workload>>>,
    #[serde(serialize_with = "ser::values")]
    pub(crate) waypoints: BTreeMap<NamespacedName, Arc<Waypoint>>,
    pub(crate) routes: HostMap<Arc<ServiceRoutes>>,
    pub(crate) destination_policies: HostMap<Arc<DestinationPolicy>>,
    #[serde(serialize_with = "ser::display_keys")]
    pub(crate) authz_by_gateway: BTreeMap<NamespacedName, Arc<AuthzPolicies>>,
    #[serde(serialize_with = "ser::service_keys")]
    /// By [`ServiceKind`] (as index) then name: looked up per request without building a key.
    pub(crate) authz_by_service: [BTreeMap<NamespacedName, Arc<AuthzPolicies>>; 2],
    #[serde(skip)]
    pub(crate) empty_authz: Arc<AuthzPolicies>,
    #[serde(serialize_with = "ser::sorted")]
    pub(crate) dns: HashMap<String, Vec<IpAddr>>,
    pub(crate) egress: Vec<EgressEntry>,
    /// TLS material of the Secrets, for `credentialName`. Redacted in dumps and `Debug`.
    #[serde(serialize_with = "ser::display_keys")]
    pub(crate) secrets: BTreeMap<NamespacedName, Arc<crate::secret::SecretTls>>,
    /// `credentialName`s a waypoint cannot use (missing Secret, missing key).
    pub(crate) credential_warnings: Vec<crate::secret::CredentialWarning>,
}

impl Snapshot {
    /// An empty mesh with default settings.
    pub fn empty() -> Snapshot {
        Snapshot::default()
    }

    pub fn trust_domain(&self) -> &str {
        &self.mesh.trust_domain
    }

    pub fn outbound_traffic_policy(&self) -> OutboundTrafficPolicy {
        self.mesh.outbound_traffic_policy
    }

    // ---------------------------------------------------------------- services

    /// Service port behind a VIP (or ServiceEntry CIDR) and port.
    pub fn service_by_addr(&self, addr: SocketAddr) -> Option<ServicePortRef<'_>> {
        if let Some((svc, i)) = self.by_addr.get(&addr) {
            return Some(ServicePortRef {
                service: svc,
                port: &svc.ports[*i],
            });
        }
        // CIDR addresses are rare (TCP ServiceEntries): a short scan.
        self.cidr_services.iter().find_map(|(net, svc)| {
            if !net.contains(&addr.ip()) {
                return None;
            }
            let port = svc.port(addr.port())?;
            Some(ServicePortRef { service: svc, port })
        })
    }

    /// Services whose VIP is `ip` (several when ServiceEntry hosts share an address).
    pub fn services_by_vip(&self, ip: IpAddr) -> &[Arc<Service>] {
        self.by_vip.get(&ip).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Service by hostname: exact, then the most specific wildcard ServiceEntry host.
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.by_host.lookup(host)
    }

    /// What `addr` (a VIP:port or a workload IP) is.
    pub fn lookup_addr(&self, addr: SocketAddr) -> Option<AddressMatch<'_>> {
        if let Some(s) = self.service_by_addr(addr) {
            return Some(AddressMatch::Service(s));
        }
        self.workload_by_ip(addr.ip()).map(AddressMatch::Workload)
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// Waypoint that serves traffic to `service` (see [`WaypointBinding`]).
    pub fn waypoint_for_service<'a>(&self, service: &'a Service) -> &'a WaypointBinding {
        &service.waypoint
    }

    // ---------------------------------------------------------------- workloads

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip.get(&ip)
    }

    /// Pods scheduled on `node` (spec.nodeName), in name order.
    pub fn workloads_on_node(&self, node: &str) -> &[Arc<Workload>] {
        self.workloads_by_node
            .get(node)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    // ---------------------------------------------------------------- waypoints

    pub fn waypoint(&self, name: &NamespacedName) -> Option<&Arc<Waypoint>> {
        self.waypoints.get(name)
    }

    pub fn waypoints(&self) -> impl Iterator<Item = &Arc<Waypoint>> {
        self.waypoints.values()
    }

    /// Services bound to the waypoint `name` (what a waypoint serves).
    pub fn services_for_waypoint<'a>(
        &'a self,
        name: &'a NamespacedName,
    ) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.services
            .iter()
            .filter(move |s| s.waypoint.waypoint().is_some_and(|w| &w.name == name))
    }

    // ---------------------------------------------------------------- policy

    /// Authorization policies attached to the waypoint Gateway `name` (targetRefs kind Gateway,
    /// plus root-namespace policies targeting GatewayClass istio-waypoint).
    pub fn authz_for_waypoint(&self, name: &NamespacedName) -> &Arc<AuthzPolicies> {
        self.authz_by_gateway.get(name).unwrap_or(&self.empty_authz)
    }

    /// Authorization policies attached to a service (targetRefs kind Service / ServiceEntry).
    pub fn authz_for_service(&self, service: &Service) -> &Arc<AuthzPolicies> {
        self.authz_by_service[service.kind as usize]
            .get(&service.name)
            .unwrap_or(&self.empty_authz)
    }

    /// L4 policies of a workload (selector, namespace-wide, mesh-wide), for ztunnel inbound.
    pub fn authz_for_workload<'a>(&self, workload: &'a Workload) -> &'a Arc<AuthzPolicies> {
        &workload.authz
    }

    /// VirtualService / HTTPRoute routes for `host` (exact, then wildcard VirtualService host).
    /// Port matching happens in [`crate::route`]'s select functions.
    pub fn routes_for_host(&self, host: &str) -> Option<&Arc<ServiceRoutes>> {
        self.routes.lookup(host)
    }

    /// DestinationRule for `host` (exact, then wildcard).
    pub fn destination_policy(&self, host: &str) -> Option<&Arc<DestinationPolicy>> {
        self.destination_policies.lookup(host)
    }

    /// Effective upstream TLS for `host:port` (subset optional): port-level settings win.
    pub fn upstream_tls(
        &self,
        host: &str,
        port: u16,
        subset: Option<&str>,
    ) -> Option<&crate::policy::ClientTls> {
        self.destination_policy(host)?.resolve(port, subset).tls
    }

    /// `tls.credentialName` as the waypoint in namespace `waypoint_ns` uses it (see
    /// [`crate::secret::resolve_credential`]).
    pub fn tls_credential(
        &self,
        waypoint_ns: &str,
        tls: &crate::policy::ClientTls,
    ) -> Option<Result<crate::secret::TlsCredential, crate::secret::CredentialError>> {
        crate::secret::resolve_credential(self, waypoint_ns, tls)
    }

    /// DestinationRules whose `credentialName` a waypoint that applies them cannot use.
    pub fn credential_warnings(&self) -> &[crate::secret::CredentialWarning] {
        &self.credential_warnings
    }

    // ---------------------------------------------------------------- DNS

    /// Exact name → addresses (Service FQDNs, ServiceEntry hosts). Search-domain expansion is
    /// the DNS proxy's business.
    pub fn resolve_name(&self, name: &str) -> Option<&[IpAddr]> {
        let n = crate::hostmap::normalize(name);
        self.dns.get(n.as_ref()).map(Vec::as_slice)
    }

    /// Every exact name with its addresses (unordered).
    pub fn dns_names(&self) -> impl Iterator<Item = (&str, &[IpAddr])> {
        self.dns.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    // ---------------------------------------------------------------- misc

    pub fn namespace_labels(&self, ns: &str) -> Option<&Labels> {
        self.namespaces.get(ns).map(|n| &n.labels)
    }

    /// Compiled ASMEgressTrafficPolicy entries (ports, upgrades), for display and listeners.
    pub fn egress_entries(&self) -> &[EgressEntry] {
        &self.egress
    }
}

/// JSON needs string map keys: helpers for the dump.
mod ser {
    use super::*;
    use serde::ser::{SerializeMap, Serializer};

    pub fn sorted<S: Serializer, V: Serialize>(
        m: &HashMap<String, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let sorted: BTreeMap<&String, &V> = m.iter().collect();
        s.collect_map(sorted)
    }

    pub fn values<S: Serializer, K, V: Serialize>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.values())
    }

    pub fn display_keys<S: Serializer, K: fmt::Display, V: Serialize>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(m.len()))?;
        for (k, v) in m {
            map.serialize_entry(&k.to_string(), v)?;
        }
        map.end()
    }

    pub fn service_keys<S: Serializer, V: Serialize>(
        m: &[BTreeMap<NamespacedName, V>; 2],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(m[0].len() + m[1].len()))?;
        for kind in [ServiceKind::Service, ServiceKind::ServiceEntry] {
            for (name, v) in &m[kind as usize] {
                map.serialize_entry(&format!("{kind:?} {name}"), v)?;
            }
        }
        map.end()
    }
}
