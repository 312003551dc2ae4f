//! In-pod traffic capture, the way Istio's ztunnel does it.
//!
//! - [`NetnsHandle`]: a dedicated OS thread inside a pod's network namespace that creates sockets
//!   there (they keep their namespace for life and are then driven by tokio), plus
//!   [`connect_in`] for marked outbound connections.
//! - [`rules`]: the redirect ruleset as a pure function of [`CaptureConfig`];
//!   [`install_rules`]/[`remove_rules`] apply it with `iptables-restore` inside the namespace.
//! - [`original_dst`]: where a redirected connection was going.

mod apply;
mod error;
mod netns;
mod orig_dst;
pub mod rules;

pub use apply::{install_rules, remove_rules, save_nat};
pub use error::{ConfigError, Error};
pub use netns::{NetnsHandle, NetnsId, connect_in, socket_netns_id};
pub use orig_dst::{NotRedirected, is_not_redirected, original_dst};
pub use rules::{
    CaptureConfig, CaptureScope, CidrSelector, DEFAULT_MARK, IpFamily, PortSelector, render_rules,
};
