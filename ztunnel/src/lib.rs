//! ztunnel: the per-node proxy of the ambient data plane.
//!
//! For every pod of its node (from the mesh configuration: `spec.nodeName == --node` and the
//! `strait.dev/netns` annotation) it opens listeners **inside the pod's network namespace** and
//! installs the pod's redirect rules there, the way Istio's in-pod ztunnel does:
//!
//! | port  | in the pod                      | module       |
//! |-------|---------------------------------|--------------|
//! | 15001 | outbound TCP, redirected        | [`outbound`] |
//! | 15006 | inbound plaintext, redirected   | [`inbound`]  |
//! | 15008 | inbound HBONE (mTLS HTTP/2)     | [`inbound`]  |
//! | 15053 | DNS (UDP + TCP 53), redirected  | [`dns`]      |
//!
//! Its own upstream sockets are created in the pod's namespace with mark 0x539, which the rules
//! let through. Pods come and go with configuration reloads ([`pods`]); each served identity
//! gets its certificate from [`identity`]; [`metrics`] and [`admin`] expose Istio's telemetry;
//! [`state`] remembers which namespaces got capture rules, so none leak across restarts.
//!
//! The binary (`src/main.rs`) only parses flags and calls [`run`].

pub mod admin;
pub mod cli;
mod conn;
pub mod dns;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod pods;
mod proxy;
pub mod state;

pub use cli::{Args, Command, RunArgs};
pub use outbound::{DenyReason, Forward, OutboundAction, Upstream, Via, decide_outbound};
pub use proxy::{Error, Settings, run};

/// The mark on ztunnel's own sockets (Istio's 1337); the capture rules never redirect it.
pub const MARK: u32 = inpod::DEFAULT_MARK;
/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE port.
pub const HBONE_PORT: u16 = hbone::HBONE_PORT;
/// DNS capture port.
pub const DNS_PORT: u16 = 15053;
