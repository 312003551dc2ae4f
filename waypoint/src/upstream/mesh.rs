//! Mesh endpoints: which upstream addresses are reached over HBONE, and the tunnels to them.
//!
//! As in Istio ambient, a waypoint never talks plaintext to a workload of the mesh: it opens an
//! HTTP/2 CONNECT over mTLS to the pod's ztunnel (`<pod ip>:15008`) with `:authority` =
//! `<pod ip>:<target port>`, presents its own SPIFFE certificate and accepts the server only if
//! it proves the destination's identity. HTTP/1.1 or HTTP/2 is then spoken inside the tunnel
//! exactly as over a TCP connection. The decision ([`hbone_target`]) is a pure function of the
//! snapshot, the cluster and the picked address; [`MeshClient`] carries it out on the shared,
//! pooled [`hbone::Client`].

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use certs::SpiffeId;
use futures::future::BoxFuture;
use hbone::{Baggage, TraceParent, TunnelRequest};
use mesh_config::{Identity, Snapshot};
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

use super::Cluster;

/// Where and how one upstream endpoint is reached over HBONE. Hashable: it keys the
/// connection pools of tunnelled HTTP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HboneTarget {
    /// The pod's ztunnel, `ip:15008`.
    pub peer: SocketAddr,
    /// The CONNECT `:authority`: the endpoint `ip:port` (target port).
    pub authority: SocketAddr,
    /// The peer must prove one of these (sorted, deduplicated).
    pub identities: Vec<SpiffeId>,
}

/// Why a mesh endpoint cannot be reached: refused rather than sent in plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// ISTIO_MUTUAL towards an address whose identity nothing in the configuration names.
    #[error(
        "{addr} must be reached with ISTIO_MUTUAL but no identity is known for it (not a mesh workload, no endpoint serviceAccount, no subjectAltNames)"
    )]
    NoIdentity { addr: SocketAddr },
}

fn spiffe(id: &Identity) -> SpiffeId {
    SpiffeId::new(&id.trust_domain, &id.namespace, &id.service_account)
}

/// How `addr`, picked from `cluster`, is reached: `Some` over HBONE when it is a captured
/// workload of the mesh or the cluster's DestinationRule says ISTIO_MUTUAL, `None` for a plain
/// (possibly TLS-originated) connection.
///
/// Accepted server identities, as ztunnel's: the workload's own, the identity the service's
/// endpoint declares (WorkloadEntry / ServiceEntry endpoint `serviceAccount`), and the service's
/// SPIFFE `subjectAltNames`.
pub fn hbone_target(
    snap: &Snapshot,
    cluster: &Cluster,
    addr: SocketAddr,
) -> Result<Option<HboneTarget>, MeshError> {
    let ip = addr.ip().to_canonical();
    let workload = snap.workload_by_ip(ip).filter(|w| w.in_mesh());
    if workload.is_none() && !cluster.istio_mutual {
        return Ok(None);
    }
    let mut identities: Vec<SpiffeId> = workload.map(|w| spiffe(&w.identity)).into_iter().collect();
    identities.extend(
        cluster
            .service
            .endpoints
            .iter()
            .filter(|ep| {
                matches!(&ep.address, Some(mesh_config::snapshot::EndpointAddress::Ip(a)) if *a == ip)
            })
            .filter_map(|ep| ep.identity.as_ref().map(spiffe)),
    );
    identities.extend(
        cluster
            .service
            .subject_alt_names
            .iter()
            .filter_map(|s| Identity::parse(s))
            .map(|id| spiffe(&id)),
    );
    identities.sort();
    identities.dedup();
    if identities.is_empty() {
        return Err(MeshError::NoIdentity { addr });
    }
    Ok(Some(HboneTarget {
        peer: SocketAddr::new(ip, hbone::HBONE_PORT),
        authority: SocketAddr::new(ip, addr.port()),
        identities,
    }))
}

/// Opens HBONE tunnels to mesh endpoints with the waypoint's own identity.
#[derive(Clone)]
pub struct MeshClient {
    client: hbone::Client,
    identity: SpiffeId,
    /// The waypoint's metadata, sent as `baggage` on each CONNECT (as ztunnel does for its
    /// pods); rendered once, `None` when a name is not header text.
    baggage: Option<http::HeaderValue>,
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClient")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl MeshClient {
    /// A client presenting `identity` (whose certificate `identities` mints), its sockets marked
    /// with [`super::pool::SOCKET_MARK`] like every other upstream socket of the waypoint.
    pub fn new(
        identities: certs::IdentityManager,
        identity: SpiffeId,
        gateway: &mesh_config::NamespacedName,
        config: hbone::Config,
    ) -> Self {
        let client = hbone::Client::with_connector(identities, config, Arc::new(MarkedConnector));
        let baggage = Baggage {
            namespace: Some(gateway.namespace.clone()),
            workload_kind: Some("deployment".into()),
            workload_name: Some(gateway.name.clone()),
            service_name: Some(gateway.name.clone()),
            ..Baggage::default()
        };
        let baggage = baggage
            .to_header_value()
            .inspect_err(|error| debug!(%error, "baggage header left out"))
            .ok();
        MeshClient {
            client,
            identity,
            baggage,
        }
    }

    /// The identity presented to mesh endpoints.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Pool counters of the underlying HBONE client.
    pub fn pool_stats(&self) -> hbone::PoolStats {
        self.client.pool_stats()
    }

    /// Opens a tunnel to `target` (returns once the peer answered 200).
    ///
    /// No `forwarded` header: the tunnel is pooled and carries requests of many clients, whose
    /// addresses travel in the HTTP requests inside it (`x-forwarded-for`).
    pub async fn open(&self, target: &HboneTarget) -> Result<hbone::Tunnel, hbone::Error> {
        let mut request = TunnelRequest::new(
            self.identity.clone(),
            target.peer,
            target.identities.clone(),
            target.authority,
        )
        .traceparent(&TraceParent::random());
        if let Some(baggage) = &self.baggage {
            request = request.header(hbone::headers::BAGGAGE, baggage.clone());
        }
        self.client.open(request).await
    }
}

/// Sockets for HBONE connections: `TCP_NODELAY`, marked 0x539 (see [`super::pool::connect_tcp`]).
struct MarkedConnector;

impl hbone::Connector for MarkedConnector {
    fn connect(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let socket = if dst.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            super::pool::mark(&socket);
            socket.set_nodelay(true)?;
            socket.connect(dst).await
        })
    }

    fn source_ip(&self) -> Option<IpAddr> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{ClusterRequest, HttpVersion, build_cluster};
    use mesh_config::NamespacedName;

    const CONFIG: &str = r#"
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
  name: legacy-0
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
  labels: {app: legacy, istio.io/dataplane-mode: none}
  annotations: {strait.dev/netns: /run/netns/opted-out}
spec: {nodeName: node-2}
status: {podIP: 10.244.2.30}
---
apiVersion: v1
kind: Pod
metadata:
  name: legacy-1
  namespace: default
  labels: {app: legacy}
  annotations: {strait.dev/captured: "true"}
spec: {nodeName: node-3, serviceAccountName: marked}
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
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vm, namespace: default}
spec:
  hosts: [vm.example]
  addresses: [240.240.0.20]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 192.0.2.7, serviceAccount: vm}
  - {address: 192.0.2.8}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: default}
spec:
  hosts: [external.example]
  addresses: [240.240.0.21]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.9}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: vm, namespace: default}
spec:
  host: vm.example
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
"#;

    type Want = Result<Option<HboneTarget>, MeshError>;

    fn target(snap: &Snapshot, host: &str, addr: &str) -> Want {
        let svc = snap
            .services()
            .iter()
            .find(|s| s.hostname == host)
            .expect("service")
            .clone();
        let cluster = build_cluster(
            snap,
            &NamespacedName::new("istio-egress", "waypoint"),
            &svc,
            &svc.ports[0],
            None,
            ClusterRequest {
                original: None,
                request_host: None,
                downstream: HttpVersion::Http1,
                upgrade: false,
            },
        );
        hbone_target(snap, &cluster, addr.parse().expect("addr"))
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa)
    }

    #[test]
    fn which_endpoints_go_over_hbone() {
        let snap = mesh_config::load_sources([("c.yaml", CONFIG)]).expect("valid config");
        let hbone = |peer: &str, authority: &str, ids: Vec<SpiffeId>| {
            Ok(Some(HboneTarget {
                peer: peer.parse().expect("peer"),
                authority: authority.parse().expect("authority"),
                identities: ids,
            }))
        };
        let cases: Vec<(&str, &str, &str, Want)> = vec![
            (
                "captured pod: HBONE to its 15008, authority = pod ip:target port",
                "web.default.svc.cluster.local",
                "10.244.2.10:8080",
                hbone("10.244.2.10:15008", "10.244.2.10:8080", vec![id("web")]),
            ),
            (
                "IPv4-mapped address of a captured pod",
                "web.default.svc.cluster.local",
                "[::ffff:10.244.2.10]:8080",
                hbone("10.244.2.10:15008", "10.244.2.10:8080", vec![id("web")]),
            ),
            (
                "pod with neither a network namespace nor the capture marker: plain",
                "legacy.default.svc.cluster.local",
                "10.244.2.20:80",
                Ok(None),
            ),
            (
                "pod marked captured by kube-source, no netns (as the waypoint sees every pod)",
                "legacy.default.svc.cluster.local",
                "10.244.3.10:80",
                hbone("10.244.3.10:15008", "10.244.3.10:80", vec![id("marked")]),
            ),
            (
                "dataplane-mode none: plain",
                "legacy.default.svc.cluster.local",
                "10.244.2.30:80",
                Ok(None),
            ),
            (
                "ISTIO_MUTUAL endpoint with a serviceAccount",
                "vm.example",
                "192.0.2.7:80",
                hbone("192.0.2.7:15008", "192.0.2.7:80", vec![id("vm")]),
            ),
            (
                "ISTIO_MUTUAL without any identity: refused, not plaintext",
                "vm.example",
                "192.0.2.8:80",
                Err(MeshError::NoIdentity {
                    addr: "192.0.2.8:80".parse().expect("addr"),
                }),
            ),
            (
                "external ServiceEntry: today's path",
                "external.example",
                "192.0.2.9:80",
                Ok(None),
            ),
        ];
        for (what, host, addr, want) in cases {
            assert_eq!(target(&snap, host, addr), want, "{what}");
        }
    }
}
