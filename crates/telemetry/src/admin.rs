//! The admin HTTP server: readiness, Prometheus metrics, config dump.
//!
//! Routes (GET or HEAD; other methods get 405):
//! - `/healthz/ready`: 200 `ready` once [`Readiness::set_ready`] was called, else 503.
//! - `/metrics`, `/stats/prometheus`: the registry in text format 0.0.4.
//! - `/config_dump`: JSON from the caller's closure (404 when none is set).
//! - anything else: 404.
//!
//! Istio's separate ports each get only their own routes: call [`serve_endpoints`] once per
//! listener with clones of one [`AdminState`] and the [`Endpoints`] that port exposes —
//! [`Endpoints::ADMIN`] on 15000 (localhost only: `/config_dump` shows the whole configuration),
//! [`Endpoints::METRICS`] on 15020, [`Endpoints::READINESS`] on 15021. Routes a listener does not
//! expose answer 404, as unknown paths do. [`serve`] exposes everything and is meant for a
//! localhost admin port only.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tracing::{debug, warn};

use crate::metrics::{Metrics, TEXT_CONTENT_TYPE};

/// How long open admin connections get to finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The process's readiness flag. Clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets or clears readiness.
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

type ConfigDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the admin endpoints expose. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    metrics: Arc<Metrics>,
    readiness: Readiness,
    config_dump: Option<ConfigDump>,
}

impl fmt::Debug for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminState")
            .field("ready", &self.readiness.is_ready())
            .field("config_dump", &self.config_dump.is_some())
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// Metrics and readiness; no config dump.
    pub fn new(metrics: Arc<Metrics>, readiness: Readiness) -> Self {
        Self {
            metrics,
            readiness,
            config_dump: None,
        }
    }

    /// Serves `/config_dump` from `dump`, called per request.
    pub fn with_config_dump(
        mut self,
        dump: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        self.config_dump = Some(Arc::new(dump));
        self
    }

    /// The readiness flag.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }
}

/// Which routes a listener exposes: a small set of flags, combined with `|`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoints(u8);

impl Endpoints {
    /// `/healthz/ready` (Istio's 15021).
    pub const READINESS: Endpoints = Endpoints(1);
    /// `/metrics` and `/stats/prometheus` (Istio's 15020).
    pub const METRICS: Endpoints = Endpoints(1 << 1);
    /// `/config_dump`. Exposes the whole configuration: localhost listeners only.
    pub const CONFIG_DUMP: Endpoints = Endpoints(1 << 2);
    /// Everything (Istio's 15000, bound to localhost): config dump, readiness and metrics.
    pub const ADMIN: Endpoints =
        Endpoints(Self::READINESS.0 | Self::METRICS.0 | Self::CONFIG_DUMP.0);
    /// No route at all (every path answers 404).
    pub const NONE: Endpoints = Endpoints(0);

    /// Whether every route of `other` is exposed.
    pub fn contains(self, other: Endpoints) -> bool {
        self.0 & other.0 == other.0
    }

    /// The routes of either.
    pub const fn union(self, other: Endpoints) -> Endpoints {
        Endpoints(self.0 | other.0)
    }
}

impl std::ops::BitOr for Endpoints {
    type Output = Endpoints;

    fn bitor(self, other: Endpoints) -> Endpoints {
        self.union(other)
    }
}

impl std::ops::BitOrAssign for Endpoints {
    fn bitor_assign(&mut self, other: Endpoints) {
        *self = self.union(other);
    }
}

impl fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::READINESS, "READINESS"),
            (Self::METRICS, "METRICS"),
            (Self::CONFIG_DUMP, "CONFIG_DUMP"),
        ];
        let mut set = f.debug_set();
        for (flag, name) in names {
            if self.contains(flag) {
                set.entry(&format_args!("{name}"));
            }
        }
        set.finish()
    }
}

/// Serves every admin route ([`Endpoints::ADMIN`]) on `listener` until `shutdown` completes.
///
/// For a localhost admin port only (Istio's 15000): it includes `/config_dump`. Ports reachable
/// from elsewhere (metrics, readiness) should use [`serve_endpoints`] with just their routes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()>,
) {
    serve_endpoints(listener, state, Endpoints::ADMIN, shutdown).await
}

/// Serves the routes in `endpoints` on `listener` until `shutdown` completes, then gives open
/// connections a few seconds to finish; other paths answer 404. Accept errors (e.g. out of file
/// descriptors) are logged and retried, never fatal.
pub async fn serve_endpoints(
    listener: tokio::net::TcpListener,
    state: AdminState,
    endpoints: Endpoints,
    shutdown: impl Future<Output = ()>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "admin accept failed");
                // Avoid spinning when the process is out of descriptors.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let response = route(&state, endpoints, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("admin connections still open after the grace period; dropping them");
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    response(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// The endpoint group a path belongs to, if it is one of ours.
fn endpoint_of(path: &str) -> Option<Endpoints> {
    match path {
        "/healthz/ready" => Some(Endpoints::READINESS),
        "/metrics" | "/stats/prometheus" => Some(Endpoints::METRICS),
        "/config_dump" => Some(Endpoints::CONFIG_DUMP),
        _ => None,
    }
}

fn route<B>(
    state: &AdminState,
    endpoints: Endpoints,
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    // A route this listener does not expose is indistinguishable from an unknown one.
    let exposed = endpoint_of(path).is_some_and(|group| endpoints.contains(group));
    if !exposed {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/healthz/ready" => {
            if state.readiness.is_ready() {
                text(StatusCode::OK, "ready")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready")
            }
        }
        "/metrics" | "/stats/prometheus" => match state.metrics.encode_text_bytes() {
            Ok(body) => response(StatusCode::OK, TEXT_CONTENT_TYPE, Bytes::from(body)),
            Err(error) => {
                warn!(%error, "encoding metrics failed");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding metrics failed\n",
                )
            }
        },
        _ => match &state.config_dump {
            Some(dump) => match serde_json::to_vec_pretty(&dump()) {
                Ok(body) => response(StatusCode::OK, "application/json", Bytes::from(body)),
                Err(error) => {
                    warn!(%error, "encoding config dump failed");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "encoding config dump failed\n",
                    )
                }
            },
            None => text(StatusCode::NOT_FOUND, "no config dump available\n"),
        },
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn state() -> AdminState {
        AdminState::new(Arc::new(Metrics::new().expect("metrics")), Readiness::new())
    }

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf8")
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).expect("request")
    }

    #[tokio::test]
    async fn routes() {
        let state = state().with_config_dump(|| serde_json::json!({"generation": 3}));
        assert_eq!(
            route(&state, Endpoints::ADMIN, &get("/nope")).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&state, Endpoints::ADMIN, &get("/healthz/ready")).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.readiness().set_ready(true);
        let ready = route(&state, Endpoints::ADMIN, &get("/healthz/ready?verbose"));
        assert_eq!(ready.status(), StatusCode::OK);
        assert_eq!(body(ready).await, "ready");

        let post = Request::post("/metrics").body(()).expect("request");
        let refused = route(&state, Endpoints::ADMIN, &post);
        assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(refused.headers()[header::ALLOW], "GET, HEAD");

        let dump = route(&state, Endpoints::ADMIN, &get("/config_dump"));
        assert_eq!(dump.headers()[header::CONTENT_TYPE], "application/json");
        let value: serde_json::Value = serde_json::from_str(&body(dump).await).expect("json");
        assert_eq!(value["generation"], 3);

        // Restricted listeners 404 what they do not expose, whatever the method.
        let metrics_only = [
            ("/metrics", StatusCode::OK),
            ("/stats/prometheus", StatusCode::OK),
            ("/config_dump", StatusCode::NOT_FOUND),
            ("/healthz/ready", StatusCode::NOT_FOUND),
        ];
        for (path, want) in metrics_only {
            assert_eq!(
                route(&state, Endpoints::METRICS, &get(path)).status(),
                want,
                "{path}"
            );
        }
        let delete = Request::delete("/config_dump").body(()).expect("request");
        assert_eq!(
            route(&state, Endpoints::READINESS, &delete).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&state, Endpoints::READINESS, &get("/healthz/ready")).status(),
            StatusCode::OK
        );
        let both = Endpoints::METRICS | Endpoints::READINESS;
        assert_eq!(
            route(&state, both, &get("/healthz/ready")).status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&state, both, &get("/config_dump")).status(),
            StatusCode::NOT_FOUND
        );

        let without = super::tests::state();
        assert_eq!(
            route(&without, Endpoints::ADMIN, &get("/config_dump")).status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn endpoint_sets() {
        assert!(Endpoints::ADMIN.contains(Endpoints::CONFIG_DUMP));
        assert!(Endpoints::ADMIN.contains(Endpoints::METRICS | Endpoints::READINESS));
        assert!(!Endpoints::METRICS.contains(Endpoints::CONFIG_DUMP));
        assert!(!Endpoints::NONE.contains(Endpoints::READINESS));
        let mut set = Endpoints::NONE;
        set |= Endpoints::READINESS;
        assert_eq!(set, Endpoints::READINESS);
        assert_eq!(
            format!("{:?}", Endpoints::METRICS | Endpoints::READINESS),
            "{READINESS, METRICS}"
        );
    }
}
