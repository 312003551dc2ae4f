//! The egress waypoint: what a Gateway of class `istio-waypoint` deploys.
//!
//! ```text
//!  ztunnel ══HBONE (mTLS, HTTP/2 CONNECT VIP:port)══▶ inbound ─┬─ HTTP port ─▶ http::serve_tunnel ─▶ pipeline ─▶ upstream pool ─▶ internet
//!                                                               ├─ TCP/TLS ──▶ l4 (SNI peek, L4 authz) ─▶ TCP ─▶ internet
//!                                                               └─ unknown ──▶ 502 (REGISTRY_ONLY) or passthrough (ALLOW_ANY)
//! ```
//!
//! * [`inbound`]: the HBONE handler. Each CONNECT's authority (a VIP:port) is classified against
//!   the current [`mesh_config::Snapshot`] ([`inbound::classify`]).
//! * [`http`]: HTTP/1.1 and HTTP/2 (prior knowledge) served inside the tunnel; the request
//!   pipeline applies AuthorizationPolicy, VirtualService/HTTPRoute routing (matches, weights,
//!   rewrites, redirects, header operations, faults, timeouts, retries, mirroring) and answers
//!   with `server: envoy` and `x-envoy-upstream-service-time`, as Envoy-based waypoints do.
//! * [`upstream`]: DNS (hickory, TTL-honouring cache, round-robin), STATIC endpoints, per-endpoint
//!   keep-alive connection pools (HTTP/1.1 and HTTP/2) with DestinationRule limits, TLS
//!   origination (SIMPLE / MUTUAL, SNI, SAN checks) from DestinationRule `tls`, and HBONE
//!   tunnels to endpoints that are mesh workloads (or under ISTIO_MUTUAL), never plaintext.
//! * [`l4`]: TCP/TLS forwarding with L4 authorization and SNI from the ClientHello.
//! * [`observe`]: Istio-shaped access-log entries and metric labels.
//!
//! Decisions (classification, route planning, authorization attributes, redirects, retry
//! conditions, endpoint sets) are pure functions with table-driven tests; I/O lives at the edges.
//! [`run`] wires everything together; `main.rs` only parses flags.

pub mod http;
pub mod inbound;
pub mod l4;
pub mod observe;
pub mod options;
pub mod proxy;
pub mod sniff;
pub mod upstream;

pub use options::Options;
pub use proxy::{Proxy, RunError, run, worker_runtime};
