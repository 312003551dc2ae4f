//! Looking up a ServiceEntry host for ztunnel itself (a `resolution: DNS` ServiceEntry reached
//! through its VIP, without waypoint), from inside the pod's namespace with the mark so the
//! pod's DNS capture does not answer us with the VIP again: the dns-proxy crate's
//! [`Upstreams::lookup_ip`](dns_proxy::Upstreams::lookup_ip) over the same sockets the pod's DNS
//! proxy forwards with.

use std::net::{IpAddr, SocketAddr};

use inpod::NetnsHandle;

use dns_proxy::LookupError;

/// The A and AAAA addresses of `host` (IPv4 first).
pub async fn lookup(
    netns: &NetnsHandle,
    upstreams: &[SocketAddr],
    host: &str,
) -> Result<Vec<IpAddr>, LookupError> {
    crate::dns::upstreams(netns, upstreams.to_vec())
        .lookup_ip(host)
        .await
}
