//! The admin HTTP server: readiness, Prometheus metrics, config dump.
//!
//! Routes (GET or HEAD; other methods get 405):
//! - `/healthz/ready`: 200 `ready` once [`Readiness::set_ready`] was called, else 503.
//! - `/metrics`, `/stats/prometheus`: the registry in text format 0.0.4.
//! - `/config_dump`: JSON from the caller's closure (404 when none is set).
//! - anything else: 404.
//!
//! The same router can serve Istio's separate ports (15000 admin, 15020 metrics, 15021
//! readiness): call [`serve`] once per listener with clones of one [`AdminState`].

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

/// Serves the admin endpoints on `listener` until `shutdown` completes, then gives open
/// connections a few seconds to finish. Accept errors (e.g. out of file descriptors) are
/// logged and retried, never fatal.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
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
            let response = route(&state, &request);
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

fn route<B>(state: &AdminState, request: &Request<B>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let known = matches!(
        path,
        "/healthz/ready" | "/metrics" | "/stats/prometheus" | "/config_dump"
    );
    if !known {
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
        assert_eq!(route(&state, &get("/nope")).status(), StatusCode::NOT_FOUND);
        assert_eq!(
            route(&state, &get("/healthz/ready")).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.readiness().set_ready(true);
        let ready = route(&state, &get("/healthz/ready?verbose"));
        assert_eq!(ready.status(), StatusCode::OK);
        assert_eq!(body(ready).await, "ready");

        let post = Request::post("/metrics").body(()).expect("request");
        let refused = route(&state, &post);
        assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(refused.headers()[header::ALLOW], "GET, HEAD");

        let dump = route(&state, &get("/config_dump"));
        assert_eq!(dump.headers()[header::CONTENT_TYPE], "application/json");
        let value: serde_json::Value = serde_json::from_str(&body(dump).await).expect("json");
        assert_eq!(value["generation"], 3);

        let without = super::tests::state();
        assert_eq!(
            route(&without, &get("/config_dump")).status(),
            StatusCode::NOT_FOUND
        );
    }
}
