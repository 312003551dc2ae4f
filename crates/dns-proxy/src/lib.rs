//! The pod DNS proxy: answers A/AAAA for mesh hosts with their VIPs, forwards everything else.
//!
//! ztunnel binds `127.0.0.1:15053` and `[::1]:15053` (UDP and TCP) inside each pod's network
//! namespace, where the pod's DNS traffic is redirected, and hands the sockets to
//! [`DnsProxy::serve_all`]. For each query:
//!
//! - A/AAAA (class IN) for a host in the [`NameTable`], directly or through the pod's search
//!   domains, is answered authoritatively with TTL 30 s ([`names`] documents the exact rules,
//!   which follow Istio's ztunnel). A mesh host without an address of the asked family gets
//!   NOERROR with no records, never NXDOMAIN.
//! - Everything else (other names, other types such as MX/TXT/HTTPS even for mesh hosts, as
//!   ztunnel does) is asked of the [`Upstreams`] over the client's transport, and the upstream's
//!   answer is relayed unchanged: rcode, flags, answer/authority/additional sections. No upstream
//!   answer within the timeout → SERVFAIL.
//! - Malformed input never stops the server: datagrams too short for a DNS header are dropped,
//!   undecodable messages with a readable header get FORMERR, non-QUERY opcodes NOTIMP.
//! - DNS responses (QR=1) sent to the proxy are dropped without a reply: answering them would
//!   let two servers bounce messages between them forever, or reflect spoofed traffic.
//!
//! The table is consulted on every query, so configuration changes apply at once; nothing is
//! cached. Upstream queries leave through sockets from an [`AsyncUpstreamSocketFactory`] (or a
//! synchronous [`UpstreamSocketFactory`], which runs on the Tokio worker) so the caller can
//! create them in the pod's namespace with ztunnel's mark (0x539); otherwise the pod's DNS
//! redirect would capture the proxy's own queries. The waypoint must not use this proxy for its
//! own lookups (it would resolve external hosts to their VIPs and loop).
//!
//! [`Upstreams::lookup_ip`] resolves a name through the same upstreams and sockets, for the
//! proxy's owner (ztunnel reaching a `resolution: DNS` ServiceEntry host itself).
//!
//! hickory-server logs every request at INFO under the `hickory_server` target; binaries should
//! filter it to `warn`. Our own per-query events are DEBUG under the `dns` target.

mod lookup;
pub mod names;
mod server;
mod upstream;

pub use lookup::LookupError;
pub use names::{LOCAL_TTL_SECS, NameTable, PodDnsContext};
pub use server::DnsProxy;
pub use upstream::{
    AsyncUpstreamSocketFactory, DEFAULT_UPSTREAM_TIMEOUT, DefaultSocketFactory, ResolvConf,
    SocketFuture, UpstreamSocketFactory, Upstreams,
};

use std::path::PathBuf;

/// Errors from setting up or running the DNS proxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A namespace, cluster domain or search domain is not a valid DNS name.
    #[error("invalid DNS name {name:?}: {source}")]
    InvalidName {
        name: String,
        #[source]
        source: hickory_proto::ProtoError,
    },
    /// A resolv.conf could not be read or parsed.
    #[error("resolv.conf {path:?}: {reason}")]
    ResolvConf { path: PathBuf, reason: String },
    /// `serve_all` was given no socket.
    #[error("no socket to serve DNS on")]
    NoListeners,
    /// A handed-in socket could not be registered with the runtime.
    #[error("preparing a DNS socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The server stopped because a socket failed.
    #[error("DNS server failed: {0}")]
    Server(#[source] hickory_resolver::net::NetError),
}
