//! HBONE in: classify each CONNECT's authority against the snapshot and hand the tunnel to the
//! HTTP server, the L4 forwarder, or refuse it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hbone::IncomingConnect;
use http::StatusCode;
use mesh_config::snapshot::ServicePortRef;
use mesh_config::{OutboundTrafficPolicy, Service, ServicePort, Snapshot};
use tracing::{Instrument, debug, debug_span, warn};

use crate::http::{ConnCtx, Downstream};
use crate::l4;
use crate::proxy::Proxy;
use crate::sniff::{self, Sniffed};

/// How long an unregistered flow may stay silent before it is treated as opaque TCP.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);

/// What the waypoint does with one CONNECT.
#[derive(Debug, Clone)]
pub enum Target {
    /// An HTTP / HTTP2 / gRPC port of a registered service: L7.
    Http {
        service: Arc<Service>,
        port: ServicePort,
    },
    /// A TCP / TLS / HTTPS port of a registered service: L4 (`tls`: read the SNI).
    Tcp {
        service: Arc<Service>,
        port: ServicePort,
        tls: bool,
    },
    /// No service behind the authority and the mesh is REGISTRY_ONLY: HTTP gets 502, anything
    /// else is closed.
    Unregistered,
    /// No service behind the authority and the mesh is ALLOW_ANY: forward to the authority at L4.
    Passthrough,
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Http { .. } => "http",
            Target::Tcp { tls: true, .. } => "tls",
            Target::Tcp { tls: false, .. } => "tcp",
            Target::Unregistered => "unregistered",
            Target::Passthrough => "passthrough",
        }
    }
}

/// Classifies a CONNECT authority (pure).
pub fn classify(snap: &Snapshot, authority: SocketAddr) -> Target {
    match snap.service_by_addr(authority) {
        Some(ServicePortRef { service, port }) => {
            if port.protocol.is_http() {
                Target::Http {
                    service: service.clone(),
                    port: port.clone(),
                }
            } else {
                Target::Tcp {
                    service: service.clone(),
                    port: port.clone(),
                    tls: port.protocol.is_tls(),
                }
            }
        }
        None => match snap.outbound_traffic_policy() {
            OutboundTrafficPolicy::RegistryOnly => Target::Unregistered,
            OutboundTrafficPolicy::AllowAny => Target::Passthrough,
        },
    }
}

/// The HBONE handler: one call per CONNECT stream.
pub async fn handle(proxy: Arc<Proxy>, connect: IncomingConnect) {
    let meta = connect.meta();
    let snap = proxy.store.current();
    let target = classify(&snap, meta.authority);
    let downstream = Downstream {
        peer_identity: meta.peer_identity.clone(),
        hbone_peer: meta.remote_addr,
        client: meta.forwarded.as_ref().and_then(|f| f.client_addr()),
        local: meta.authority,
    };
    // Debug level, as ztunnel's per-connection spans: at info an enabled span is entered and
    // exited on every poll of every request in the tunnel. Access-log lines carry all of this;
    // the one warning below names its tunnel itself.
    let span = debug_span!(
        "connect",
        authority = %meta.authority,
        peer = %meta.peer_identity,
        client = ?downstream.client,
        target = target.kind(),
    );
    async move {
        debug!("CONNECT");
        match target {
            Target::Http { service, port } => {
                let Some(tunnel) = accept(connect) else {
                    return;
                };
                let ctx = ConnCtx::new(&snap, downstream, Some((service, port)));
                crate::http::serve_tunnel(proxy, ctx, tunnel).await;
            }
            Target::Tcp { service, port, tls } => {
                if !tls {
                    // Plain TCP: everything L4 policy needs is known now, so a denial is a
                    // refused CONNECT (401) rather than an accepted-then-closed stream.
                    if let Err(denied) =
                        l4::authorize(&proxy, &snap, &downstream, &service, &port, None)
                    {
                        l4::log_denied(&proxy, &downstream, &service, &port, None, &denied);
                        connect.reject(StatusCode::UNAUTHORIZED);
                        return;
                    }
                }
                let Some(tunnel) = accept(connect) else {
                    return;
                };
                l4::serve(proxy, downstream, service, port, tls, tunnel).await;
            }
            Target::Unregistered => {
                let Some(tunnel) = accept(connect) else {
                    return;
                };
                match sniff::sniff_http(tunnel, SNIFF_TIMEOUT).await {
                    Ok(Sniffed::Http(io)) => {
                        let ctx = ConnCtx::new(&snap, downstream, None);
                        crate::http::serve_tunnel(proxy, ctx, io).await;
                    }
                    Ok(Sniffed::Other(_)) => {
                        debug!("REGISTRY_ONLY: unregistered non-HTTP destination, closing");
                        l4::log_unregistered(&proxy, &downstream);
                    }
                    Err(e) => debug!(error = %e, "tunnel failed while sniffing"),
                }
            }
            Target::Passthrough => {
                let Some(tunnel) = accept(connect) else {
                    return;
                };
                l4::passthrough(proxy, downstream, tunnel).await;
            }
        }
    }
    .instrument(span)
    .await
}

fn accept(connect: IncomingConnect) -> Option<hbone::Tunnel> {
    let (authority, remote) = (connect.meta().authority, connect.meta().remote_addr);
    match connect.accept() {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(%authority, %remote, error = %e, "could not accept CONNECT");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  addresses: [240.240.0.7]
  location: MESH_EXTERNAL
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 443}
  - {number: 443, name: https, protocol: HTTPS}
  - {number: 3306, name: db, protocol: TCP}
  - {number: 8443, name: grpc, protocol: GRPC}
  resolution: DNS
"#;

    fn snap(policy: &str) -> Snapshot {
        let yaml = MESH.replace("REGISTRY_ONLY", policy);
        mesh_config::load_sources([("mesh.yaml", yaml.as_str())]).expect("valid config")
    }

    #[test]
    fn authorities_are_classified_by_port_protocol() {
        let registry_only = snap("REGISTRY_ONLY");
        let allow_any = snap("ALLOW_ANY");
        let cases: [(&Snapshot, &str, &str); 7] = [
            (&registry_only, "240.240.0.7:80", "http"),
            (&registry_only, "240.240.0.7:8443", "http"),
            (&registry_only, "240.240.0.7:443", "tls"),
            (&registry_only, "240.240.0.7:3306", "tcp"),
            // A registered VIP on a port the service does not declare is not the service.
            (&registry_only, "240.240.0.7:8080", "unregistered"),
            (&registry_only, "203.0.113.9:80", "unregistered"),
            (&allow_any, "203.0.113.9:80", "passthrough"),
        ];
        for (snap, authority, want) in cases {
            let got = classify(snap, authority.parse().expect("addr"));
            assert_eq!(got.kind(), want, "{authority}");
        }
    }

    #[test]
    fn http_target_keeps_the_target_port() {
        let s = snap("REGISTRY_ONLY");
        let Target::Http { service, port } = classify(&s, "240.240.0.7:80".parse().expect("addr"))
        else {
            panic!("not http");
        };
        assert_eq!(service.hostname, "aliyun.com");
        assert_eq!(port.upstream_port(), 443);
    }
}
