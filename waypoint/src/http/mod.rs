//! HTTP inside a tunnel: HTTP/1.1 (keep-alive, many requests per tunnel) and HTTP/2 with prior
//! knowledge, served by hyper-util's auto server; every request goes through [`pipeline`].

pub mod authz;
pub mod body;
pub mod headers;
pub mod mirror;
pub mod pipeline;
pub mod redirect;
pub mod retry;
pub mod route;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use certs::SpiffeId;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_config::{Service, ServicePort};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{Instrument, debug, debug_span};

use crate::proxy::Proxy;

/// Who is on the other side of a tunnel.
#[derive(Debug, Clone)]
pub struct Downstream {
    /// The HBONE client's verified identity (the source workload's, as ztunnel presents it).
    pub peer_identity: SpiffeId,
    /// The HBONE connection's peer (ztunnel).
    pub hbone_peer: SocketAddr,
    /// The original client, from the tunnel's `forwarded: for=`.
    pub client: Option<SocketAddr>,
    /// The CONNECT authority: the VIP:port the client dialled.
    pub local: SocketAddr,
}

impl Downstream {
    /// The original client when known, else the HBONE peer.
    pub fn remote(&self) -> SocketAddr {
        self.client.unwrap_or(self.hbone_peer)
    }
}

/// Per-tunnel context of the HTTP server.
#[derive(Debug)]
pub struct ConnCtx {
    pub downstream: Downstream,
    /// The service port the tunnel targets; `None` for an unregistered destination
    /// (REGISTRY_ONLY: every request gets 502).
    pub target: Option<(Arc<Service>, ServicePort)>,
    /// `downstream.peer_identity` rendered once.
    pub principal: String,
    /// The `source_*` metric labels, looked up once per tunnel (shared, not copied, per request).
    pub source: Arc<telemetry::WorkloadLabels>,
}

impl ConnCtx {
    pub fn new(
        snap: &mesh_config::Snapshot,
        downstream: Downstream,
        target: Option<(Arc<Service>, ServicePort)>,
    ) -> Self {
        let principal = downstream.peer_identity.to_string();
        let source = Arc::new(crate::observe::source_labels(snap, &downstream));
        ConnCtx {
            downstream,
            target,
            principal,
            source,
        }
    }
}

/// Serves HTTP on `io` until the client closes it or the proxy shuts down (then in-flight
/// requests finish: HTTP/1.1 closes after the current response, HTTP/2 sends GOAWAY).
pub async fn serve_tunnel<IO>(proxy: Arc<Proxy>, ctx: ConnCtx, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(ctx);
    let p = proxy.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let proxy = p.clone();
        let ctx = ctx.clone();
        let span = debug_span!("request", method = %req.method(), uri = %req.uri());
        async move { Ok::<_, Infallible>(pipeline::handle(&proxy, &ctx, req).await) }
            .instrument(span)
    });
    let conn = proxy
        .http_server
        // With upgrades: an HTTP/1.1 `Upgrade` (WebSocket) answered 101 by the upstream hands
        // the tunnel's bytes to the pipeline, which splices them to the upstream connection.
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = proxy.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP connection in tunnel ended with an error");
    }
}
