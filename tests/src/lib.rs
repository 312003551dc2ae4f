//! The network-namespace lab every integration test in `tests/tests/*.rs` builds on.
//!
//! - Gate: [`lab_enabled`] / [`require_root`]: without root a test prints a loud `SKIPPED` and
//!   returns, except under `CI=true`, where a missing capability fails the test.
//! - [`Netns`]: a uniquely named namespace (`ip netns add`), deleted with everything running in it
//!   when dropped, also during a panic. [`Lab`]: a router namespace with a bridge and hosts
//!   attached to it. Everything is built inside namespaces the test created: the root namespace's
//!   addresses, routes and firewall are never touched.
//! - Processes: [`ChildGuard`] (killed on drop, log printed if the test panicked, or failed inside
//!   [`lab_test`] / [`lab_test_async`]), [`Nginx`],
//!   [`start_dnsmasq`], [`Netns::curl`], [`Netns::wait_tcp`].
//! - [`workspace_bin`]: the real binaries under test. They are not built by `cargo test` of this
//!   package: `scripts/test` runs `cargo build --workspace --bins` first (by hand:
//!   `cargo build -p ztunnel -p waypoint -p certs`).
//!
//! Addresses used by convention: pods in `10.244.0.0/16`, the "internet" in `203.0.113.0/24`
//! (TEST-NET-3) and `2001:db8::/32` (documentation prefix), routed only inside the lab.

mod bins;
mod curl;
mod gate;
mod lab;
mod netns;
mod process;
pub mod seedlab;
mod services;

pub use bins::workspace_bin;
pub use curl::CurlOutput;
pub use gate::{lab_enabled, require_root, require_tools};
pub use lab::{Host, Lab};
pub use netns::Netns;
pub use process::{ChildGuard, lab_test, lab_test_async, wait_until};
pub use services::{Nginx, NginxConfig, start_dnsmasq};

/// Re-exported so tests need only this crate for namespace sockets and capture rules.
pub use inpod;

#[cfg(test)]
mod selftest;
