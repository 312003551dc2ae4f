//! Where an intercepted outbound connection goes: a pure function of the snapshot, the source
//! workload and the original destination ([`decide_outbound`]). No I/O here; the caller
//! ([`super::serve`]) carries the answer out.
//!
//! Order of the checks (first match wins):
//!
//! 1. Outside the pod's capture scope (`excludeOutboundIPRanges`, ports, ...) → straight out.
//! 2. A Service / ServiceEntry VIP:port (or ServiceEntry CIDR) visible to the source namespace:
//!    - bound to a waypoint → HBONE to the waypoint, `:authority` = the VIP:port as dialled;
//!    - bound to a waypoint that does not resolve → refused (fail closed, never bypass);
//!    - a Kubernetes Service → one of its endpoint pods (HBONE when that pod is captured);
//!    - a ServiceEntry → its endpoints, the original address, or a DNS lookup of its host,
//!      by `resolution`.
//! 3. A known workload IP: through its waypoint if it has one, HBONE to its own 15008 when it
//!    is captured, directly otherwise.
//! 4. Anything else: the mesh's outbound traffic policy. `ALLOW_ANY` passes it through;
//!    `REGISTRY_ONLY` refuses it (upstream Istio's ztunnel does not enforce this; we do).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_config::snapshot::{EndpointAddress, Resolution, ServiceKind, ServicePortRef};
use mesh_config::{
    Identity, NamespacedName, OutboundTrafficPolicy, Service, Snapshot, Waypoint, WaypointBinding,
    Workload,
};

/// What to do with one outbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundAction {
    /// Proxy it to one of the upstreams.
    Forward(Forward),
    /// Refuse it: the client gets a TCP reset.
    Deny(DenyReason),
}

/// A connection to proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Why this path was taken (logs, metrics).
    pub via: Via,
    /// The destination service, when the address belongs to one.
    pub service: Option<ServiceRef>,
    /// Candidates, never empty; one is picked per connection ([`Forward::pick`]).
    pub upstreams: Vec<Upstream>,
}

impl Forward {
    /// The upstream for a connection, `random` being any random number (load balancing over
    /// endpoints and waypoint replicas).
    pub fn pick(&self, random: u64) -> Option<&Upstream> {
        if self.upstreams.is_empty() {
            return None;
        }
        let len = self.upstreams.len() as u64;
        // `len` is at least 1 and the result is below it, so the cast back cannot truncate.
        self.upstreams.get((random % len) as usize)
    }
}

/// One way to reach the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// HTTP/2 CONNECT over mTLS to an HBONE peer (a waypoint or a pod's ztunnel).
    Hbone {
        /// The peer, `ip:15008`.
        peer: SocketAddr,
        /// The CONNECT `:authority`.
        authority: SocketAddr,
        /// The peer must present one of these.
        identities: Vec<Identity>,
        /// The destination pod, when the peer is a pod's ztunnel.
        workload: Option<NamespacedName>,
    },
    /// Plain TCP from the pod's namespace (marked so it is not captured again).
    Direct {
        addr: SocketAddr,
        workload: Option<NamespacedName>,
    },
    /// Plain TCP to whatever `host` resolves to (a DNS ServiceEntry reached through its VIP).
    Dns { host: String, port: u16 },
}

/// How the decision was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// The destination's waypoint.
    Waypoint(NamespacedName),
    /// A Kubernetes Service's endpoints.
    ServiceEndpoints,
    /// A ServiceEntry without waypoint, by its resolution.
    ServiceEntry,
    /// A pod addressed by its IP.
    Workload,
    /// Not in the registry, let through by `ALLOW_ANY`.
    Passthrough,
    /// Outside the pod's capture scope.
    NotCaptured,
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::Waypoint(name) => write!(f, "waypoint {name}"),
            Via::ServiceEndpoints => f.write_str("service endpoints"),
            Via::ServiceEntry => f.write_str("service entry"),
            Via::Workload => f.write_str("workload"),
            Via::Passthrough => f.write_str("passthrough (ALLOW_ANY)"),
            Via::NotCaptured => f.write_str("outside the capture scope"),
        }
    }
}

/// The service a destination address belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    /// FQDN or ServiceEntry host.
    pub hostname: String,
    /// The Service / ServiceEntry object.
    pub name: NamespacedName,
    pub kind: ServiceKind,
}

impl ServiceRef {
    fn of(service: &Service) -> Self {
        ServiceRef {
            hostname: service.hostname.clone(),
            name: service.name.clone(),
            kind: service.kind,
        }
    }
}

/// Why a connection is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// `REGISTRY_ONLY` and the destination is neither a service nor a workload of the mesh.
    RegistryOnly { dst: SocketAddr },
    /// The destination is bound to a waypoint that does not exist or cannot be used.
    WaypointUnresolved {
        target: String,
        gateway: NamespacedName,
        reason: String,
    },
    /// A service without any endpoint that could be dialled.
    NoEndpoints { service: String },
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::RegistryOnly { dst } => write!(
                f,
                "{dst} is not a registered service or workload and the outbound traffic policy is REGISTRY_ONLY"
            ),
            DenyReason::WaypointUnresolved {
                target,
                gateway,
                reason,
            } => write!(
                f,
                "{target} is bound to waypoint {gateway}, which cannot be used ({reason}); refusing rather than bypassing it"
            ),
            DenyReason::NoEndpoints { service } => write!(f, "service {service} has no endpoints"),
        }
    }
}

/// The decision for a connection from `source` to the original destination `dst`.
pub fn decide_outbound(snap: &Snapshot, source: &Workload, dst: SocketAddr) -> OutboundAction {
    if !source.capture.captures_outbound(dst) {
        return forward(Via::NotCaptured, None, vec![direct(dst, None)]);
    }
    if let Some(found) = snap.service_by_addr(dst)
        && found.service.is_visible_to(&source.name.namespace)
    {
        return to_service(snap, found, dst);
    }
    if let Some(workload) = snap.workload_by_ip(dst.ip()) {
        return to_workload(workload, dst);
    }
    match snap.outbound_traffic_policy() {
        OutboundTrafficPolicy::AllowAny => forward(Via::Passthrough, None, vec![direct(dst, None)]),
        OutboundTrafficPolicy::RegistryOnly => {
            OutboundAction::Deny(DenyReason::RegistryOnly { dst })
        }
    }
}

fn forward(via: Via, service: Option<ServiceRef>, upstreams: Vec<Upstream>) -> OutboundAction {
    OutboundAction::Forward(Forward {
        via,
        service,
        upstreams,
    })
}

fn direct(addr: SocketAddr, workload: Option<NamespacedName>) -> Upstream {
    Upstream::Direct { addr, workload }
}

fn to_service(snap: &Snapshot, found: ServicePortRef<'_>, dst: SocketAddr) -> OutboundAction {
    let service = found.service;
    let svc_ref = Some(ServiceRef::of(service));
    match snap.waypoint_for_service(service) {
        WaypointBinding::Bound(waypoint) => {
            return via_waypoint(waypoint, dst, svc_ref, &service.hostname);
        }
        WaypointBinding::Unresolved { gateway, reason } => {
            return OutboundAction::Deny(DenyReason::WaypointUnresolved {
                target: format!("service {}", service.hostname),
                gateway: gateway.clone(),
                reason: reason.clone(),
            });
        }
        WaypointBinding::None => {}
    }
    let san: Vec<Identity> = service
        .subject_alt_names
        .iter()
        .filter_map(|s| Identity::parse(s))
        .collect();
    match service.kind {
        ServiceKind::Service => {
            let upstreams = endpoint_upstreams(snap, found, &san);
            if upstreams.is_empty() {
                return OutboundAction::Deny(DenyReason::NoEndpoints {
                    service: service.hostname.clone(),
                });
            }
            forward(Via::ServiceEndpoints, svc_ref, upstreams)
        }
        ServiceKind::ServiceEntry => {
            let via_vip = service.vips.contains(&dst.ip());
            let upstreams = match service.resolution {
                // The client already has the real address (or asked for exactly this one).
                Resolution::None => vec![direct(dst, None)],
                Resolution::Static => endpoint_upstreams(snap, found, &san),
                Resolution::Dns | Resolution::DnsRoundRobin => {
                    if via_vip {
                        dns_upstreams(service, found)
                    } else {
                        // The client resolved the host itself (no VIP): dial what it dialled.
                        vec![direct(dst, None)]
                    }
                }
            };
            if upstreams.is_empty() {
                return OutboundAction::Deny(DenyReason::NoEndpoints {
                    service: service.hostname.clone(),
                });
            }
            forward(Via::ServiceEntry, svc_ref, upstreams)
        }
    }
}

fn via_waypoint(
    waypoint: &Arc<Waypoint>,
    authority: SocketAddr,
    service: Option<ServiceRef>,
    target: &str,
) -> OutboundAction {
    let upstreams: Vec<Upstream> = waypoint
        .hbone_addrs()
        .map(|peer| Upstream::Hbone {
            peer,
            authority,
            identities: vec![waypoint.identity.clone()],
            workload: None,
        })
        .collect();
    if upstreams.is_empty() {
        // The compiler marks address-less waypoints Unresolved; be defensive anyway.
        return OutboundAction::Deny(DenyReason::WaypointUnresolved {
            target: target.to_owned(),
            gateway: waypoint.name.clone(),
            reason: "the waypoint has no address".to_owned(),
        });
    }
    forward(Via::Waypoint(waypoint.name.clone()), service, upstreams)
}

/// Endpoints with an IP of the dialled family first; a pod endpoint that is captured is
/// reached over HBONE (its ztunnel enforces its policy), anything else directly.
fn endpoint_upstreams(
    snap: &Snapshot,
    found: ServicePortRef<'_>,
    san: &[Identity],
) -> Vec<Upstream> {
    let service = found.service;
    let mut upstreams = Vec::new();
    for ep in &service.endpoints {
        let Some(EndpointAddress::Ip(ip)) = &ep.address else {
            continue;
        };
        let addr = SocketAddr::new(*ip, service.endpoint_port(ep, found.port));
        let workload = snap.workload_by_ip(*ip);
        match workload.filter(|w| w.in_mesh()) {
            Some(w) => {
                let mut identities =
                    vec![ep.identity.clone().unwrap_or_else(|| w.identity.clone())];
                identities.extend(san.iter().cloned());
                upstreams.push(Upstream::Hbone {
                    peer: SocketAddr::new(*ip, mesh_config::snapshot::HBONE_PORT),
                    authority: addr,
                    identities,
                    workload: Some(w.name.clone()),
                });
            }
            None => upstreams.push(direct(addr, workload.map(|w| w.name.clone()))),
        }
    }
    upstreams
}

/// A DNS ServiceEntry reached through its VIP: endpoint hostnames if it lists any, else its
/// own host (a wildcard host cannot be looked up, so then there is nothing to dial).
fn dns_upstreams(service: &Service, found: ServicePortRef<'_>) -> Vec<Upstream> {
    let mut upstreams: Vec<Upstream> = service
        .endpoints
        .iter()
        .filter_map(|ep| {
            let port = service.endpoint_port(ep, found.port);
            match &ep.address {
                Some(EndpointAddress::Hostname(host)) => Some(Upstream::Dns {
                    host: host.clone(),
                    port,
                }),
                Some(EndpointAddress::Ip(ip)) => Some(direct(SocketAddr::new(*ip, port), None)),
                Some(EndpointAddress::Unix(_)) | None => None,
            }
        })
        .collect();
    if upstreams.is_empty() && !service.is_wildcard() {
        upstreams.push(Upstream::Dns {
            host: service.hostname.clone(),
            port: found.port.upstream_port(),
        });
    }
    upstreams
}

fn to_workload(workload: &Arc<Workload>, dst: SocketAddr) -> OutboundAction {
    match &workload.waypoint {
        WaypointBinding::Bound(waypoint) => {
            return via_waypoint(waypoint, dst, None, &format!("workload {}", workload.name));
        }
        WaypointBinding::Unresolved { gateway, reason } => {
            return OutboundAction::Deny(DenyReason::WaypointUnresolved {
                target: format!("workload {}", workload.name),
                gateway: gateway.clone(),
                reason: reason.clone(),
            });
        }
        WaypointBinding::None => {}
    }
    let upstream = if workload.in_mesh() {
        Upstream::Hbone {
            peer: SocketAddr::new(dst.ip(), mesh_config::snapshot::HBONE_PORT),
            authority: dst,
            identities: vec![workload.identity.clone()],
            workload: Some(workload.name.clone()),
        }
    } else {
        direct(dst, Some(workload.name.clone()))
    };
    forward(Via::Workload, None, vec![upstream])
}

/// `ip` without the IPv4-mapped IPv6 wrapping a dual-stack socket puts on IPv4 peers.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

/// See [`canonical`].
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mesh with: two captured pods on two nodes, one on a third node known captured only by
    /// its kube-source marker, an uncaptured pod, a Service over the captured `web` pods, a
    /// Service without endpoints, a waypoint and services bound to it, ServiceEntries of each
    /// resolution, one bound to a missing waypoint.
    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-egress}
---
apiVersion: v1
kind: Namespace
metadata: {name: private}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: default
  annotations: {strait.dev/netns: /run/netns/client}
spec: {nodeName: node-1, serviceAccountName: client}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata:
  name: scoped
  namespace: default
  annotations:
    strait.dev/netns: /run/netns/scoped
    traffic.sidecar.istio.io/excludeOutboundIPRanges: 192.0.2.0/24
spec: {nodeName: node-1, serviceAccountName: scoped}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: default
  labels: {app: web}
  annotations: {strait.dev/netns: /run/netns/web}
spec: {nodeName: node-2, serviceAccountName: web}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata:
  name: legacy
  namespace: default
  labels: {app: legacy}
spec: {nodeName: node-2}
status: {podIP: 10.244.2.20}
---
apiVersion: v1
kind: Pod
metadata:
  name: opted-out
  namespace: default
  labels: {istio.io/dataplane-mode: none}
  annotations: {strait.dev/netns: /run/netns/opted-out}
spec: {nodeName: node-2}
status: {podIP: 10.244.2.30}
---
apiVersion: v1
kind: Pod
metadata:
  name: remote
  namespace: default
  labels: {app: remote}
  annotations: {strait.dev/captured: "true"}
spec: {nodeName: node-3, serviceAccountName: remote}
status: {podIP: 10.244.3.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: default}
spec:
  clusterIP: 10.96.0.11
  selector: {app: legacy}
  ports: [{port: 80, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.12
  selector: {app: nothing}
  ports: [{port: 80, name: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: istio-egress}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: istio-egress
  labels: {gateway.networking.k8s.io/gateway-name: waypoint}
  annotations: {strait.dev/netns: /run/netns/waypoint}
spec: {nodeName: node-1, serviceAccountName: waypoint}
status: {podIP: 10.244.1.20}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: aliyun
  namespace: istio-egress
  labels: {istio.io/use-waypoint: waypoint}
spec:
  hosts: [aliyun.com]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: broken
  namespace: istio-egress
  labels: {istio.io/use-waypoint: missing}
spec:
  hosts: [broken.example]
  addresses: [198.51.100.7]
  location: MESH_EXTERNAL
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns-no-waypoint, namespace: default}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static, namespace: default}
spec:
  hosts: [db.example]
  addresses: [198.51.100.20]
  location: MESH_EXTERNAL
  ports: [{number: 5432, name: tcp, protocol: TCP, targetPort: 15432}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.5}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cidr, namespace: default}
spec:
  hosts: [range.example]
  addresses: [198.51.100.128/25]
  location: MESH_EXTERNAL
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: hidden, namespace: private}
spec:
  hosts: [hidden.example]
  addresses: [198.51.100.9]
  exportTo: ["."]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
"#;

    fn mesh(policy: &str) -> Snapshot {
        let mesh_cfg = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\n\
             data:\n  mesh: |-\n    outboundTrafficPolicy:\n      mode: {policy}\n"
        );
        match mesh_config::load_sources([("mesh.yaml", MESH), ("istio.yaml", mesh_cfg.as_str())]) {
            Ok(snap) => snap,
            Err(errs) => panic!("test mesh does not compile: {errs}"),
        }
    }

    fn workload<'a>(snap: &'a Snapshot, ip: &str) -> &'a Arc<Workload> {
        snap.workload_by_ip(ip.parse().expect("ip"))
            .expect("workload")
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    fn nn(ns: &str, name: &str) -> NamespacedName {
        NamespacedName::new(ns, name)
    }

    fn hbone(
        peer: &str,
        authority: &str,
        ids: Vec<Identity>,
        workload: Option<NamespacedName>,
    ) -> Upstream {
        Upstream::Hbone {
            peer: sa(peer),
            authority: sa(authority),
            identities: ids,
            workload,
        }
    }

    /// (description, source pod IP, destination, expected via, expected upstreams) for the
    /// connections that are forwarded.
    #[test]
    fn forwarded_connections() {
        let snap = mesh("ALLOW_ANY");
        let aliyun_vip = snap
            .resolve_name("aliyun.com")
            .and_then(|ips| ips.iter().find(|ip| ip.is_ipv4()).copied())
            .expect("aliyun.com has an IPv4 VIP");
        let api_vip = snap
            .resolve_name("api.example.com")
            .and_then(|ips| ips.iter().find(|ip| ip.is_ipv4()).copied())
            .expect("api.example.com has an IPv4 VIP");
        let aliyun = format!("{aliyun_vip}:80");
        let api = format!("{api_vip}:443");
        let waypoint = nn("istio-egress", "waypoint");
        let cases: Vec<(&str, &str, String, Via, Vec<Upstream>)> = vec![
            (
                "ServiceEntry bound to a waypoint: HBONE to the waypoint, authority = VIP:port",
                "10.244.1.10",
                aliyun.clone(),
                Via::Waypoint(waypoint.clone()),
                vec![hbone(
                    "10.244.1.20:15008",
                    &aliyun,
                    vec![id("istio-egress", "waypoint")],
                    None,
                )],
            ),
            (
                "captured pod on another node: HBONE to its 15008, authority = pod ip:port",
                "10.244.1.10",
                "10.244.2.10:8080".into(),
                Via::Workload,
                vec![hbone(
                    "10.244.2.10:15008",
                    "10.244.2.10:8080",
                    vec![id("default", "web")],
                    Some(nn("default", "web-0")),
                )],
            ),
            (
                "pod on another node, captured per kube-source (no netns here): HBONE",
                "10.244.1.10",
                "10.244.3.10:8080".into(),
                Via::Workload,
                vec![hbone(
                    "10.244.3.10:15008",
                    "10.244.3.10:8080",
                    vec![id("default", "remote")],
                    Some(nn("default", "remote")),
                )],
            ),
            (
                "Service without waypoint: its captured endpoint over HBONE, target port",
                "10.244.1.10",
                "10.96.0.10:80".into(),
                Via::ServiceEndpoints,
                vec![hbone(
                    "10.244.2.10:15008",
                    "10.244.2.10:8080",
                    vec![id("default", "web")],
                    Some(nn("default", "web-0")),
                )],
            ),
            (
                "Service whose endpoint is not captured: direct to the endpoint",
                "10.244.1.10",
                "10.96.0.11:80".into(),
                Via::ServiceEndpoints,
                vec![Upstream::Direct {
                    addr: sa("10.244.2.20:80"),
                    workload: Some(nn("default", "legacy")),
                }],
            ),
            (
                "uncaptured pod by IP: direct",
                "10.244.1.10",
                "10.244.2.20:80".into(),
                Via::Workload,
                vec![Upstream::Direct {
                    addr: sa("10.244.2.20:80"),
                    workload: Some(nn("default", "legacy")),
                }],
            ),
            (
                "pod opted out with dataplane-mode=none: direct, never HBONE",
                "10.244.1.10",
                "10.244.2.30:80".into(),
                Via::Workload,
                vec![Upstream::Direct {
                    addr: sa("10.244.2.30:80"),
                    workload: Some(nn("default", "opted-out")),
                }],
            ),
            (
                "DNS ServiceEntry without waypoint via its VIP: resolve the host",
                "10.244.1.10",
                api.clone(),
                Via::ServiceEntry,
                vec![Upstream::Dns {
                    host: "api.example.com".into(),
                    port: 443,
                }],
            ),
            (
                "STATIC ServiceEntry: its endpoint with the target port",
                "10.244.1.10",
                "198.51.100.20:5432".into(),
                Via::ServiceEntry,
                vec![Upstream::Direct {
                    addr: sa("203.0.113.5:15432"),
                    workload: None,
                }],
            ),
            (
                "ServiceEntry CIDR with resolution NONE: the original address",
                "10.244.1.10",
                "198.51.100.200:9000".into(),
                Via::ServiceEntry,
                vec![Upstream::Direct {
                    addr: sa("198.51.100.200:9000"),
                    workload: None,
                }],
            ),
            (
                "unknown address under ALLOW_ANY: passthrough",
                "10.244.1.10",
                "203.0.113.99:443".into(),
                Via::Passthrough,
                vec![Upstream::Direct {
                    addr: sa("203.0.113.99:443"),
                    workload: None,
                }],
            ),
            (
                "ServiceEntry exported only to its namespace is unknown elsewhere: passthrough",
                "10.244.1.10",
                "198.51.100.9:80".into(),
                Via::Passthrough,
                vec![Upstream::Direct {
                    addr: sa("198.51.100.9:80"),
                    workload: None,
                }],
            ),
            (
                "excluded CIDR: straight out, whatever is there",
                "10.244.1.11",
                "192.0.2.10:80".into(),
                Via::NotCaptured,
                vec![Upstream::Direct {
                    addr: sa("192.0.2.10:80"),
                    workload: None,
                }],
            ),
        ];
        for (what, src, dst, via, upstreams) in cases {
            let source = workload(&snap, src);
            let action = decide_outbound(&snap, source, sa(&dst));
            let OutboundAction::Forward(fwd) = action else {
                panic!("{what}: expected a forward, got {action:?}");
            };
            assert_eq!(fwd.via, via, "{what}");
            assert_eq!(fwd.upstreams, upstreams, "{what}");
        }
    }

    #[test]
    fn service_ref_names_the_destination_service() {
        let snap = mesh("ALLOW_ANY");
        let source = workload(&snap, "10.244.1.10");
        let OutboundAction::Forward(fwd) = decide_outbound(&snap, source, sa("10.96.0.10:80"))
        else {
            panic!("expected a forward");
        };
        let svc = fwd.service.expect("service");
        assert_eq!(svc.hostname, "web.default.svc.cluster.local");
        assert_eq!(svc.name, nn("default", "web"));
        assert_eq!(svc.kind, ServiceKind::Service);
    }

    #[test]
    fn refused_connections() {
        let registry_only = mesh("REGISTRY_ONLY");
        let allow_any = mesh("ALLOW_ANY");
        type Check = fn(&DenyReason) -> bool;
        let cases: Vec<(&str, &Snapshot, &str, &str, Check)> = vec![
            (
                "unknown address under REGISTRY_ONLY",
                &registry_only,
                "10.244.1.10",
                "203.0.113.99:443",
                |r| matches!(r, DenyReason::RegistryOnly { .. }),
            ),
            (
                "service bound to a missing waypoint fails closed",
                &allow_any,
                "10.244.1.10",
                "198.51.100.7:443",
                |r| matches!(r, DenyReason::WaypointUnresolved { gateway, .. } if gateway.name == "missing"),
            ),
            (
                "service without endpoints",
                &allow_any,
                "10.244.1.10",
                "10.96.0.12:80",
                |r| matches!(r, DenyReason::NoEndpoints { service } if service == "empty.default.svc.cluster.local"),
            ),
            (
                "ServiceEntry hidden by exportTo is unknown under REGISTRY_ONLY",
                &registry_only,
                "10.244.1.10",
                "198.51.100.9:80",
                |r| matches!(r, DenyReason::RegistryOnly { .. }),
            ),
        ];
        for (what, snap, src, dst, check) in cases {
            let source = workload(snap, src);
            match decide_outbound(snap, source, sa(dst)) {
                OutboundAction::Deny(reason) => {
                    assert!(check(&reason), "{what}: wrong reason {reason:?}")
                }
                other => panic!("{what}: expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn registry_only_still_allows_registered_and_excluded_destinations() {
        let snap = mesh("REGISTRY_ONLY");
        let client = workload(&snap, "10.244.1.10");
        for dst in ["10.96.0.10:80", "10.244.2.20:80", "198.51.100.20:5432"] {
            assert!(
                matches!(
                    decide_outbound(&snap, client, sa(dst)),
                    OutboundAction::Forward(_)
                ),
                "{dst} is registered"
            );
        }
        // The scope check comes first: an excluded range is never the mesh's business.
        let scoped = workload(&snap, "10.244.1.11");
        assert!(matches!(
            decide_outbound(&snap, scoped, sa("192.0.2.10:80")),
            OutboundAction::Forward(Forward {
                via: Via::NotCaptured,
                ..
            })
        ));
    }

    #[test]
    fn captured_predicate() {
        let snap = mesh("ALLOW_ANY");
        assert!(workload(&snap, "10.244.1.10").in_mesh());
        assert!(
            !workload(&snap, "10.244.2.20").in_mesh(),
            "no netns annotation"
        );
        assert!(!workload(&snap, "10.244.2.30").in_mesh(), "opted out");
        assert!(!workload(&snap, "10.244.1.20").in_mesh(), "waypoint");
        assert!(
            workload(&snap, "10.244.3.10").in_mesh(),
            "marked by kube-source, no netns"
        );
    }

    #[test]
    fn pick_spreads_over_candidates() {
        let fwd = Forward {
            via: Via::ServiceEndpoints,
            service: None,
            upstreams: vec![
                Upstream::Direct {
                    addr: sa("10.0.0.1:80"),
                    workload: None,
                },
                Upstream::Direct {
                    addr: sa("10.0.0.2:80"),
                    workload: None,
                },
            ],
        };
        assert_ne!(fwd.pick(0), fwd.pick(1));
        assert_eq!(fwd.pick(0), fwd.pick(2));
        let empty = Forward {
            upstreams: Vec::new(),
            ..fwd
        };
        assert_eq!(empty.pick(7), None);
    }

    #[test]
    fn canonical_unmaps_ipv4() {
        assert_eq!(canonical(sa("[::ffff:10.0.0.1]:80")), sa("10.0.0.1:80"));
        assert_eq!(canonical(sa("[fd00::1]:80")), sa("[fd00::1]:80"));
    }
}
