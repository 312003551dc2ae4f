//! HBONE: TCP tunnelled through HTTP/2 `CONNECT` over mutual TLS, as Istio's ztunnel and
//! waypoints speak it (port 15008).
//!
//! * [`Client`]: opens [`Tunnel`]s on pooled, multiplexed connections (ztunnel outbound).
//! * [`Server`]: accepts connections and hands each CONNECT to a [`Handler`] that accepts it
//!   (200, and gets the [`Tunnel`]) or rejects it with a status (ztunnel inbound, waypoint).
//! * [`copy_bidirectional`]: moves bytes between a tunnel and a TCP (or TLS) stream with
//!   half-close, byte counts and buffers that grow with traffic.
//! * [`headers`]: `forwarded`, `baggage`, `traceparent` and `:authority` helpers.
//!
//! # On the wire
//!
//! **TLS.** TLS 1.3 only, AES-128-GCM / AES-256-GCM (Istio's two suites; our client offers
//! AES-128 first, ~20 % cheaper per byte, and our server follows the client's order, so an Istio
//! peer gets its own preference), ALPN `h2` on both sides (a peer that does not negotiate `h2` is
//! dropped). The rustls configurations come from
//! [`certs::IdentityManager`]: the client presents the source workload's certificate, sends no
//! SNI and does no session resumption, and accepts the server only if its chain verifies
//! against the trust bundle and one of its URI SANs is in the request's expected identities.
//! The server requires a client certificate chaining to its bundle, from its own trust domain;
//! the client's first URI SAN is its identity ([`ConnectMeta::peer_identity`]).
//!
//! **HTTP/2 settings** (both sides, [`Config::default`]): initial stream window 4 MiB,
//! connection window 16 MiB, max frame size 1 MiB, max header list 64 KiB, send buffer per
//! stream 4 MiB; the server advertises `SETTINGS_MAX_CONCURRENT_STREAMS` 200, the client
//! disables push. Both sides PING every 10 s and drop a connection whose PING is not answered
//! within 20 s. The h2 "data frame budget" is disabled, as in ztunnel: peers that start with
//! 1 KiB copy buffers legitimately send many small DATA frames, and flow control already bounds
//! what they can make us hold.
//!
//! **Request** (client → server), one stream per tunnel:
//! ```text
//! :method    CONNECT
//! :authority <target ip:port>          e.g. 10.0.0.7:8080 or [fd00::7]:8080
//! forwarded  for="<client ip:port>";host=<service hostname>    (optional, Forwarded helper)
//! baggage    k8s.cluster.name=..,k8s.namespace.name=..,k8s.deployment.name=..,service.name=..,service.version=..
//! traceparent 00-<32 hex>-<16 hex>-00
//! ```
//! No `:scheme`, no `:path` (a classic, not extended, CONNECT). `:authority` is the original
//! destination (the VIP:port when going to a waypoint), never translated; extra headers are
//! whatever the caller put in [`TunnelRequest::headers`].
//!
//! **Response** (server → client): `200` (possibly with `baggage`) and the stream carries the
//! bytes both ways; END_STREAM is a half-close (our [`Tunnel`] maps it to `shutdown()` / EOF),
//! a reset stream is an error. Refusals end the stream with no body:
//!
//! | status | when |
//! |---|---|
//! | 400 | `:authority` missing or not an `ip:port` literal with a non-zero port (host names, zone ids, no port) |
//! | 405 | any method other than CONNECT (the anchors record Istio answering 400 here; both are refusals to a client) |
//! | 401 | the handler denied it by policy |
//! | 503 / 502 / 504 | the handler could not reach the target (also 503 if the handler dropped the request unanswered) |
//!
//! Whether the authority must be the address the connection reached (ztunnel inbound: 400 if
//! not) is the handler's decision, since a waypoint accepts any target.
//!
//! # Pooling (client)
//!
//! Connections are keyed by [`PoolKey`]: (source identity, sorted destination identities,
//! destination `ip:port`, source IP of the [`Connector`]). A connection carries at most
//! [`Config::max_streams_per_connection`] (100) concurrent streams; the next open starts
//! another connection, and openers arriving while a connection is being established wait for it
//! rather than each dialing. A connection with no stream for 5 minutes is closed. A connection
//! found dead (GOAWAY, I/O error, refused stream, failed PING) leaves the pool; an open that
//! failed on it before the server accepted the stream is retried once on a new connection, so the
//! caller does not see it. Sockets come from a [`Connector`] ([`PlainConnector`] by default;
//! ztunnel plugs in one that creates sockets inside the pod's network namespace with SO_MARK).
//!
//! # Server
//!
//! [`Server::serve`] accepts until its shutdown future resolves, then stops accepting, sends
//! GOAWAY on each connection (h2's graceful shutdown: in-flight streams finish) and waits
//! [`Config::drain_timeout`] before dropping what is left. Garbage, plain-TCP or non-h2 clients
//! are closed with a warning log line.
//!
//! Measured throughput and latency are in this crate's README.md.

pub mod alloc;
mod client;
mod coalesce;
mod config;
mod copy;
mod error;
pub mod headers;
mod keepalive;
mod server;
mod tunnel;

pub use client::{Client, Connector, PlainConnector, PoolKey, PoolStats, TunnelRequest};
pub use config::Config;
pub use copy::{CopyError, CopyStep, copy_bidirectional};
pub use error::Error;
pub use headers::{Baggage, Forwarded, ForwardedNode, HeaderError, TraceParent, parse_authority};
pub use server::{ConnectMeta, Handler, IncomingConnect, Server};
pub use tunnel::{Tunnel, TunnelReader, TunnelWriter};

/// The port HBONE listens on.
pub const HBONE_PORT: u16 = 15008;
