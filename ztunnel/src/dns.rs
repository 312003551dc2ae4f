//! The pod's DNS proxy (15053, UDP and TCP, on the pod's loopback where its port-53 traffic is
//! redirected): mesh hosts are answered from the current snapshot (Service FQDNs through the
//! pod's search domains, ServiceEntry hosts with their VIPs), everything else is forwarded to the
//! upstream resolvers through sockets created in the pod's namespace with the mark, so the
//! capture rules do not send the proxy's own queries back to itself.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use dns_proxy::{
    AsyncUpstreamSocketFactory, DnsProxy, NameTable, PodDnsContext, SocketFuture, Upstreams,
};
use inpod::NetnsHandle;
use mesh_config::ConfigStore;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

use crate::pods::{PodCtx, PodError};
use crate::{DNS_PORT, MARK};

/// Mesh names from whatever snapshot is current when the query arrives.
pub struct SnapshotNames {
    store: ConfigStore,
}

impl SnapshotNames {
    pub fn new(store: ConfigStore) -> Self {
        SnapshotNames { store }
    }
}

impl NameTable for SnapshotNames {
    fn lookup(&self, fqdn: &str) -> Option<Vec<IpAddr>> {
        self.store
            .current()
            .resolve_name(fqdn)
            .filter(|ips| !ips.is_empty())
            .map(<[IpAddr]>::to_vec)
    }
}

/// Upstream DNS sockets inside a pod's namespace, marked so they leave unredirected. Created
/// on the namespace's thread and awaited, so a Tokio worker never blocks on that hop.
pub struct NetnsSockets {
    netns: NetnsHandle,
    mark: u32,
}

impl NetnsSockets {
    pub fn new(netns: NetnsHandle, mark: u32) -> Self {
        NetnsSockets { netns, mark }
    }

    /// A non-blocking, marked socket of `addr`'s family, made in the namespace; `bind` is
    /// bound there too.
    async fn socket(
        &self,
        addr: SocketAddr,
        ty: Type,
        protocol: Protocol,
        bind: Option<SocketAddr>,
    ) -> io::Result<Socket> {
        let mark = self.mark;
        self.netns
            .run(move || -> io::Result<Socket> {
                let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
                socket.set_mark(mark)?;
                socket.set_nonblocking(true)?;
                if let Some(local) = bind {
                    socket.bind(&local.into())?;
                }
                Ok(socket)
            })
            .await
            .map_err(io::Error::other)?
    }
}

impl AsyncUpstreamSocketFactory for NetnsSockets {
    fn udp_bind_async(&self, local: SocketAddr) -> SocketFuture<'_, std::net::UdpSocket> {
        Box::pin(async move {
            let socket = self
                .socket(local, Type::DGRAM, Protocol::UDP, Some(local))
                .await?;
            Ok(socket.into())
        })
    }

    fn tcp_socket_async(&self, peer: SocketAddr) -> SocketFuture<'_, tokio::net::TcpSocket> {
        Box::pin(async move {
            let socket = self.socket(peer, Type::STREAM, Protocol::TCP, None).await?;
            Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
        })
    }
}

/// The pod's upstream resolvers, reached through marked sockets in its namespace: what the DNS
/// proxy forwards to, and what ztunnel resolves ServiceEntry hosts with.
pub(crate) fn upstreams(netns: &NetnsHandle, servers: Vec<SocketAddr>) -> Upstreams {
    Upstreams::new(servers)
        .with_async_socket_factory(Arc::new(NetnsSockets::new(netns.clone(), MARK)))
}

/// The DNS sockets of one pod.
pub(crate) struct DnsListeners {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

/// Binds 127.0.0.1:15053 (required) and [::1]:15053 (when the pod has IPv6), UDP and TCP:
/// REDIRECT sends a pod's own traffic to the loopback address of its family.
pub(crate) async fn bind(netns: &NetnsHandle) -> Result<DnsListeners, PodError> {
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DNS_PORT);
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), DNS_PORT);
    let listen = |source| PodError::Listen {
        port: DNS_PORT,
        source,
    };
    let mut udp = vec![netns.udp_socket_std(v4, None).await.map_err(listen)?];
    let mut tcp = vec![netns.tcp_listener_std(v4).await.map_err(listen)?];
    match (
        netns.udp_socket_std(v6, None).await,
        netns.tcp_listener_std(v6).await,
    ) {
        (Ok(u), Ok(t)) => {
            udp.push(u);
            tcp.push(t);
        }
        (Err(e), _) | (_, Err(e)) => debug!(error = %e, "no IPv6 DNS listener in this pod"),
    }
    Ok(DnsListeners { udp, tcp })
}

/// The proxy for `ctx`'s pod: its namespace's search domains, IPv6 answers only when the pod has
/// an IPv6 address (a v4-only pod must never be handed a v6 VIP).
pub(crate) fn proxy(ctx: &PodCtx) -> Result<DnsProxy, dns_proxy::Error> {
    let shared = &ctx.shared;
    let dns_ctx = PodDnsContext::new(ctx.name.namespace.clone())
        .with_search_domains(shared.dns_search.clone())
        .with_ipv6(ctx.ips.iter().any(IpAddr::is_ipv6));
    DnsProxy::new(
        Arc::new(SnapshotNames::new(shared.store.clone())),
        ctx.dns_upstreams.clone(),
        dns_ctx,
    )
}

/// Serves until the pod stops.
pub(crate) async fn serve(ctx: Arc<PodCtx>, proxy: DnsProxy, listeners: DnsListeners) {
    let stop = ctx.stop.clone();
    if let Err(error) = proxy
        .serve_all(listeners.udp, listeners.tcp, stop.cancelled_owned())
        .await
    {
        warn!(%error, "DNS proxy stopped");
    }
    debug!("DNS proxy closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_current_snapshot() {
        let se = |host: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: e, namespace: default}}\n\
                 spec:\n  hosts: [{host}]\n  location: MESH_EXTERNAL\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n"
            )
        };
        let first =
            mesh_config::load_sources([("se.yaml", se("one.example").as_str())]).expect("compiles");
        let store = ConfigStore::from_snapshot(first);
        let names = SnapshotNames::new(store.clone());
        let one = names.lookup("one.example").expect("known");
        assert!(one.iter().any(|ip| ip.is_ipv4()), "{one:?}");
        assert_eq!(names.lookup("two.example"), None);
        store.replace(
            mesh_config::load_sources([("se.yaml", se("two.example").as_str())]).expect("compiles"),
        );
        assert!(
            names.lookup("two.example").is_some(),
            "reload is seen without a restart"
        );
        assert_eq!(names.lookup("one.example"), None);
    }
}
