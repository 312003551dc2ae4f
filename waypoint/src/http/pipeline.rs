//! One HTTP request through the waypoint:
//!
//! 1. `x-request-id` (generated if absent), log fields from the request and the tunnel;
//! 2. unregistered destination (REGISTRY_ONLY) → 502;
//! 3. AuthorizationPolicy → 403 `RBAC: access denied`;
//! 4. route planning → 404 (no match), redirect, direct response or a destination;
//! 5. fault injection: delay, then abort;
//! 6. the upstream request: rewrite, header operations, mirrors (fire and forget), tries with
//!    per-try timeouts and retries inside the route timeout;
//! 7. the response: header operations, `server`, `x-envoy-upstream-service-time`; the access
//!    log line and metrics are written when its body ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, LOCATION, SERVER, UPGRADE, USER_AGENT,
};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_config::route::{AbortStatus, HeaderOps, HttpRequestInfo, HttpRoute};
use mesh_config::{Service, ServicePort, Snapshot};
use telemetry::{LogStr, ResponseFlag};
use tracing::debug;

use super::body::{self, BodyEnd, Counted, Deadline, OnEnd, ProxyBody, RequestBody};
use super::headers::{self, X_ENVOY_UPSTREAM_SERVICE_TIME, X_FORWARDED_FOR, X_FORWARDED_PROTO};
use super::retry::{Outcome, RetryPlan};
use super::route::{self, Plan};
use super::{ConnCtx, authz, mirror};
use crate::observe::{self, RequestLog};
use crate::proxy::Proxy;
use crate::upstream::outlier::Observation;
use crate::upstream::{Cluster, ClusterRequest, HttpVersion, PooledBody, UpstreamError};

/// Handles one request; never fails (errors become local replies).
pub async fn handle(
    proxy: &Arc<Proxy>,
    ctx: &ConnCtx,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let snap = proxy.store.current();
    let mut log = RequestLog::new(
        start,
        SystemTime::now(),
        &ctx.downstream,
        ctx.source.clone(),
    );
    // An HTTP/1.1 Upgrade (WebSocket): routed like any request; after the upstream's 101 the
    // bytes are spliced both ways.
    let upgrade = headers::upgrade_protocol(req.version(), req.headers())
        .map(|proto| (proto, hyper::upgrade::on(&mut req)));
    let (mut parts, incoming) = req.into_parts();
    let body = Counted::new(incoming, log.request_bytes.clone()).boxed_unsync();

    // The request's own strings (header values and the path share the bytes hyper read) are
    // borrowed by the log line and the upstream request rather than copied.
    let request_id = headers::ensure_request_id(&mut parts.headers);
    let authority: LogStr = parts
        .headers
        .get(HOST)
        .and_then(LogStr::from_header)
        .or_else(|| parts.uri.authority().map(|a| a.to_string().into()))
        .or_else(|| ctx.target.as_ref().map(|(s, _)| s.hostname.clone().into()))
        .unwrap_or_else(|| "".into());
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let e = &mut log.entry;
    e.method = Some(headers::method_name(&parts.method));
    e.path = Some(path.clone().into());
    e.protocol = Some(headers::protocol_name(parts.version).into());
    e.authority = Some(authority.clone());
    e.request_id = LogStr::from_header(&request_id);
    e.user_agent = header_text(&parts.headers, USER_AGENT);
    e.x_forwarded_for = header_text(&parts.headers, X_FORWARDED_FOR);
    log.grpc = headers::is_grpc(&parts.headers);

    let Some((service, port)) = ctx.target.as_ref() else {
        log.entry.upstream_cluster = Some("BlackHoleCluster".into());
        log.flag(ResponseFlag::NoRouteFound);
        let msg = format!(
            "{authority} ({}) is not a registered service and the mesh's outbound traffic policy is REGISTRY_ONLY\n",
            ctx.downstream.local
        );
        return local_reply(proxy, log, StatusCode::BAD_GATEWAY, msg, "registry_only");
    };
    log.service = Some(service.clone());

    // Authorization.
    let decision = {
        let request = authz::HttpRequest {
            host: &authority,
            method: parts.method.as_str(),
            path: path.as_str(),
            headers: &parts.headers,
        };
        let attrs = authz::attrs(
            &snap,
            &ctx.downstream,
            &ctx.principal,
            port.port,
            None,
            Some(request),
        );
        authz::decide(&snap, &proxy.gateway, Some(service.as_ref()), &attrs)
    };
    if !decision.is_allow() {
        debug!(?decision, "request denied by policy");
        let details = authz::denial_details(&decision);
        return local_reply(
            proxy,
            log,
            StatusCode::FORBIDDEN,
            "RBAC: access denied".into(),
            details,
        );
    }

    // Routing.
    let source_labels = observe::source_workload_labels(&snap, &ctx.downstream);
    let info = HttpRequestInfo {
        method: parts.method.as_str(),
        path: path.as_str(),
        authority: &authority,
        scheme: "http",
        port: port.port,
        headers: &parts.headers,
        source_namespace: Some(ctx.downstream.peer_identity.namespace.as_str()),
        source_labels,
    };
    let routes = snap.routes_for_host(&service.hostname).map(|r| r.as_ref());
    let plan = route::plan(routes, &service.hostname, &info, fastrand::u64(..));
    // `RequestLog::new` logged the default name already; only a named route is copied.
    if plan.route_name() != observe::DEFAULT_ROUTE_NAME {
        log.entry.route_name = Some(plan.route_name().to_owned().into());
    }
    let the_route = route::route_of(&plan);
    let response_ops: Option<&HeaderOps> = the_route.map(|r| &r.headers);
    let (route_match, dest, dest_headers) = match plan {
        Plan::Forward {
            route,
            dest,
            dest_headers,
        } => (route, dest, dest_headers),
        Plan::NoMatch => {
            log.flag(ResponseFlag::NoRouteFound);
            return local_reply(
                proxy,
                log,
                StatusCode::NOT_FOUND,
                String::new(),
                "route_not_found",
            );
        }
        Plan::NoDestination { .. } => {
            log.flag(ResponseFlag::NoHealthyUpstream);
            return local_reply(
                proxy,
                log,
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream".into(),
                "no_healthy_upstream",
            );
        }
        Plan::Redirect {
            status, location, ..
        } => {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
            if let Some(v) = headers::value(&location) {
                resp.headers_mut().insert(LOCATION, v);
            }
            apply_response_ops(resp.headers_mut(), response_ops, None);
            log.entry.response_code_details = Some("direct_response".into());
            return finish(proxy, log, resp);
        }
        Plan::Direct {
            status, body: text, ..
        } => {
            let text = text.unwrap_or_default();
            let mut resp = Response::new(body::full(text.clone()));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            if !text.is_empty() {
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            apply_response_ops(resp.headers_mut(), response_ops, None);
            log.entry.response_code_details = Some("direct_response".into());
            return finish(proxy, log, resp);
        }
    };
    let route: Option<&HttpRoute> = route_match.map(|m| m.route);

    // Faults: the delay first, then the abort (Envoy's order).
    if let Some(fault) = route.and_then(|r| r.fault.as_ref()) {
        if let Some(delay) = fault.delay_for(fastrand::f64() * 100.0) {
            log.flag(ResponseFlag::DelayInjected);
            tokio::time::sleep(delay).await;
        }
        if let Some(abort) = fault.abort_for(fastrand::f64() * 100.0) {
            log.flag(ResponseFlag::FaultInjected);
            return abort_reply(proxy, log, abort);
        }
    }

    // The destination cluster.
    let Some((dest_service, dest_port)) = destination(&snap, service, port, dest.host, dest.port)
    else {
        log.flag(ResponseFlag::NoClusterFound);
        log.entry.upstream_cluster = Some(
            format!(
                "outbound|{}|{}|{}",
                dest.port.unwrap_or(port.port),
                dest.subset.unwrap_or(""),
                dest.host
            )
            .into(),
        );
        return local_reply(
            proxy,
            log,
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster not found".into(),
            "cluster_not_found",
        );
    };
    let downstream_version = if parts.version == http::Version::HTTP_2 {
        HttpVersion::Http2
    } else {
        HttpVersion::Http1
    };
    let cluster = proxy.upstream.clusters.get(
        &snap,
        &proxy.gateway,
        dest_service,
        dest_port,
        dest.subset,
        ClusterRequest {
            original: Some(ctx.downstream.local),
            request_host: Some(authority.as_str()),
            downstream: downstream_version,
            upgrade: upgrade.is_some(),
        },
    );
    log.entry.upstream_cluster = Some((&cluster.name).into());
    if let Some(tls) = &cluster.tls {
        debug!(sni = %tls.sni, "originating TLS");
    }

    // The request as sent upstream.
    let rewritten_path = route_match.and_then(|m| m.rewritten_path(path.as_str()));
    let rewritten_authority = route
        .and_then(|r| r.rewrite.as_ref())
        .and_then(|rw| rw.authority.clone());
    let mut out = match Outgoing::new(
        parts.method,
        path,
        rewritten_path,
        &authority,
        rewritten_authority,
        parts.headers,
    ) {
        Ok(out) => out,
        Err(e) => {
            let failure = Failure::BadRequest(e);
            let (status, flag, text, details) = failure.reply();
            log.flag(flag);
            return local_reply(proxy, log, status, text, details);
        }
    };
    out.client = Some(ctx.downstream.remote().ip());
    headers::remove_hop_by_hop(&mut out.headers);
    out.headers.remove(HOST);
    out.headers
        .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(r) = route {
        r.headers.request.apply(&mut out.headers);
    }
    if let Some(ops) = dest_headers {
        ops.request.apply(&mut out.headers);
    }
    match &upgrade {
        Some((proto, _)) if cluster.version == HttpVersion::Http1 => {
            out.headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            out.headers.insert(UPGRADE, proto.clone());
        }
        // HTTP/2 upstreams would need extended CONNECT (RFC 8441): the request goes as a plain one.
        Some(_) => debug!("Upgrade towards an HTTP/2 upstream is not supported; sent without it"),
        None => {}
    }

    let retry = RetryPlan::from_route(route.and_then(|r| r.retries.as_ref()));
    let mirrors = route.map(|r| r.mirrors.as_slice()).unwrap_or_default();
    let want_replay = retry.retries > 0 || !mirrors.is_empty();
    let req_body = if want_replay {
        match body::buffer(body, proxy.max_buffered_body).await {
            Ok(b) => b,
            Err(e) => {
                debug!(error = %e, "downstream request body failed");
                log.flag(ResponseFlag::DownstreamConnectionTermination);
                return local_reply(
                    proxy,
                    log,
                    StatusCode::BAD_REQUEST,
                    "request body error".into(),
                    "downstream_body_error",
                );
            }
        }
    } else {
        RequestBody::Streaming(body)
    };

    let mut req_body = req_body;
    let sampled: Vec<_> = mirrors
        .iter()
        .filter(|m| fastrand::f64() * 100.0 < m.percentage)
        .collect();
    if !sampled.is_empty() {
        let copies = match &mut req_body {
            RequestBody::Buffered(b) => sampled.iter().map(|_| b.body()).collect(),
            RequestBody::Streaming(s) => {
                // Too large to buffer: the mirrors get the frames as the original streams.
                let (main, copies) = body::tee(
                    std::mem::replace(s, body::empty()),
                    sampled.len(),
                    proxy.mirror_max_lag,
                );
                *s = main;
                copies
            }
        };
        for (m, copy) in sampled.into_iter().zip(copies) {
            mirror::spawn(
                proxy,
                &snap,
                service,
                port,
                &m.destination,
                &out,
                copy,
                downstream_version,
                ctx.downstream.local,
            );
        }
    }

    // Upstream, with retries, inside the route timeout.
    let upstream_start = Instant::now();
    let mut info = TryInfo::default();
    let attempt = forward(proxy, &snap, &cluster, &out, req_body, &retry, &mut info);
    let route_timeout = route.and_then(|r| r.timeout).filter(|t| !t.is_zero());
    let result = match route_timeout {
        Some(t) => match tokio::time::timeout(t, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        },
        None => attempt.await,
    };
    let upstream_ms = observe::millis(upstream_start.elapsed());
    // The route timeout (and the last try's per-try timeout) also bound the response body.
    let body_deadline = [
        route_timeout.map(|t| upstream_start + t),
        retry
            .per_try_timeout
            .zip(info.started)
            .map(|(t, started)| started + t),
    ]
    .into_iter()
    .flatten()
    .min();
    log.entry.upstream_host = info.host;
    log.entry.upstream_local_address = info.local;
    if info.retry_limit_hit {
        log.flag(ResponseFlag::UpstreamRetryLimitExceeded);
    }
    match result {
        Ok(mut resp) => {
            log.entry.upstream_service_time = Some(upstream_ms);
            log.entry.response_code_details = Some("via_upstream".into());
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some((_, downstream)) = upgrade
            {
                let upstream = hyper::upgrade::on(&mut resp);
                let (mut rparts, _) = resp.into_parts();
                let proto = rparts.headers.get(UPGRADE).cloned();
                headers::remove_hop_by_hop(&mut rparts.headers);
                apply_response_ops(&mut rparts.headers, response_ops, dest_headers);
                rparts
                    .headers
                    .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                if let Some(p) = proto {
                    rparts.headers.insert(UPGRADE, p);
                }
                rparts.headers.insert(
                    X_ENVOY_UPSTREAM_SERVICE_TIME,
                    HeaderValue::from(upstream_ms),
                );
                return splice_upgraded(proxy, log, rparts, downstream, upstream);
            }
            let (mut rparts, rbody) = resp.into_parts();
            headers::remove_hop_by_hop(&mut rparts.headers);
            apply_response_ops(&mut rparts.headers, response_ops, dest_headers);
            rparts.headers.insert(
                X_ENVOY_UPSTREAM_SERVICE_TIME,
                HeaderValue::from(upstream_ms),
            );
            match body_deadline {
                Some(deadline) => {
                    let fired = Arc::new(AtomicBool::new(false));
                    let rbody = Deadline::new(rbody, deadline.into(), fired.clone());
                    finish_timed(proxy, log, Response::from_parts(rparts, rbody), fired)
                }
                None => finish(proxy, log, Response::from_parts(rparts, rbody)),
            }
        }
        Err(failure) => {
            let (status, flag, text, details) = failure.reply();
            log.flag(flag);
            log.entry.upstream_transport_failure_reason =
                failure.transport_failure_reason().map(Into::into);
            local_reply(proxy, log, status, text, details)
        }
    }
}

/// A request header for the log: its own bytes when it is text.
fn header_text(h: &HeaderMap, name: HeaderName) -> Option<LogStr> {
    h.get(name).and_then(LogStr::from_header)
}

/// The service and port a route destination names: the tunnel's own service when the host is
/// its host, else the registry's (exact host, then wildcard entries).
/// Borrowed from the snapshot: this runs per request.
fn destination<'a>(
    snap: &'a Snapshot,
    service: &'a Arc<Service>,
    port: &'a ServicePort,
    host: &str,
    dest_port: Option<u16>,
) -> Option<(&'a Arc<Service>, &'a ServicePort)> {
    let svc = if host == service.hostname {
        service
    } else {
        snap.service_by_host(host)?
    };
    let number = dest_port.unwrap_or(port.port);
    let sp = svc.port(number).or_else(|| {
        // A single-port destination named without a port uses that port (Istio's rule).
        (dest_port.is_none() && svc.ports.len() == 1).then(|| &svc.ports[0])
    })?;
    Some((svc, sp))
}

fn apply_response_ops(h: &mut HeaderMap, route: Option<&HeaderOps>, dest: Option<&HeaderOps>) {
    for ops in route.into_iter().chain(dest) {
        ops.response.apply(h);
    }
}

/// Puts the proxy's headers on `resp` and arranges for the log line when its body ends.
fn finish<B>(proxy: &Arc<Proxy>, mut log: RequestLog, mut resp: Response<B>) -> Response<ProxyBody>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<body::BoxError>,
{
    if let Some(server) = &proxy.server_header {
        resp.headers_mut().insert(SERVER, server.clone());
    }
    log.entry.response_code = resp.status().as_u16();
    let p = proxy.clone();
    resp.map(move |b| {
        OnEnd::new(b, move |bytes, how: BodyEnd| log.finish(&p, bytes, how)).boxed_unsync()
    })
}

/// [`finish`] for a body bounded by a [`Deadline`]: when it fired, the line says `UT` (the
/// stream was cut on purpose, not by the upstream).
fn finish_timed<B>(
    proxy: &Arc<Proxy>,
    mut log: RequestLog,
    mut resp: Response<B>,
    fired: Arc<AtomicBool>,
) -> Response<ProxyBody>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<body::BoxError>,
{
    if let Some(server) = &proxy.server_header {
        resp.headers_mut().insert(SERVER, server.clone());
    }
    log.entry.response_code = resp.status().as_u16();
    let p = proxy.clone();
    resp.map(move |b| {
        OnEnd::new(b, move |bytes, how: BodyEnd| {
            let how = if fired.load(Ordering::Relaxed) {
                log.flag(ResponseFlag::UpstreamRequestTimeout);
                log.entry.response_code_details = Some("response_timeout".into());
                // Not an upstream failure: keep `UC` off the line.
                BodyEnd::Complete
            } else {
                how
            };
            log.finish(&p, bytes, how)
        })
        .boxed_unsync()
    })
}

/// Answers the upstream's 101 and, once hyper hands both connections over, copies bytes both
/// ways until either side closes; the access-log line is written then, with the bytes moved
/// (as Envoy logs an upgraded stream at its end).
fn splice_upgraded(
    proxy: &Arc<Proxy>,
    mut log: RequestLog,
    mut parts: http::response::Parts,
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) -> Response<ProxyBody> {
    if let Some(server) = &proxy.server_header {
        parts.headers.insert(SERVER, server.clone());
    }
    log.entry.response_code = parts.status.as_u16();
    let p = proxy.clone();
    tokio::spawn(async move {
        let moved = match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                    Ok(moved) => moved,
                    Err(e) => {
                        debug!(error = %e, "upgraded stream ended with an error");
                        log.flag(ResponseFlag::UpstreamConnectionTermination);
                        (0, 0)
                    }
                }
            }
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                log.flag(ResponseFlag::UpstreamConnectionTermination);
                (0, 0)
            }
        };
        log.request_bytes.fetch_add(moved.0, Ordering::Relaxed);
        log.finish(&p, moved.1, BodyEnd::Complete);
    });
    Response::from_parts(parts, body::empty())
}

/// A response made by the waypoint itself (Envoy's "local reply").
fn local_reply(
    proxy: &Arc<Proxy>,
    mut log: RequestLog,
    status: StatusCode,
    text: String,
    details: impl Into<LogStr>,
) -> Response<ProxyBody> {
    log.entry.response_code_details = Some(details.into());
    let len = text.len();
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    if len > 0 {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    finish(proxy, log, resp)
}

fn abort_reply(proxy: &Arc<Proxy>, log: RequestLog, abort: &AbortStatus) -> Response<ProxyBody> {
    match abort {
        AbortStatus::Http(code) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            local_reply(
                proxy,
                log,
                status,
                "fault filter abort".into(),
                "fault_filter_abort",
            )
        }
        AbortStatus::Grpc(grpc) => {
            let mut resp = Response::new(body::empty());
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            if let Some(v) = headers::value(&grpc_code(grpc).to_string()) {
                h.insert("grpc-status", v);
            }
            h.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            let mut log = log;
            log.entry.response_code_details = Some("fault_filter_abort".into());
            finish(proxy, log, resp)
        }
        // A stream reset cannot be produced from inside a hyper service; answer 503 instead.
        AbortStatus::Http2Error(_) => local_reply(
            proxy,
            log,
            StatusCode::SERVICE_UNAVAILABLE,
            "fault filter abort".into(),
            "fault_filter_abort",
        ),
    }
}

/// gRPC status name (Istio's `grpcStatus: UNAVAILABLE`) or number → code.
fn grpc_code(s: &str) -> u8 {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    s.parse()
        .ok()
        .or_else(|| {
            NAMES
                .iter()
                .position(|n| n.eq_ignore_ascii_case(s))
                .and_then(|i| u8::try_from(i).ok())
        })
        .unwrap_or(2)
}

/// The request as sent upstream, reusable across tries. Path and `Host` are kept as the shared
/// bytes they were parsed into, so each try copies neither.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub method: Method,
    /// Path and query.
    pub path: PathAndQuery,
    /// Sent as `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    pub authority: HeaderValue,
    /// Without `Host` and hop-by-hop headers.
    pub headers: HeaderMap,
    /// The original client's address: DestinationRule `consistentHash.useSourceIp` hashes it.
    pub client: Option<std::net::IpAddr>,
}

impl Outgoing {
    /// The request's path and authority, or the route's rewrites of them; fails when a rewrite
    /// cannot be sent.
    pub fn new(
        method: Method,
        path: PathAndQuery,
        rewritten_path: Option<String>,
        authority: &LogStr,
        rewritten_authority: Option<String>,
        headers: HeaderMap,
    ) -> Result<Self, http::Error> {
        let path = match rewritten_path {
            Some(p) => PathAndQuery::try_from(p)?,
            None => path,
        };
        let authority = match rewritten_authority {
            Some(a) => HeaderValue::try_from(a)?,
            None => match authority.header_value() {
                Some(v) => v.clone(),
                None => HeaderValue::from_str(authority)?,
            },
        };
        Ok(Outgoing {
            method,
            path,
            authority,
            headers,
            client: None,
        })
    }

    /// The authority as text (it was text when built).
    pub fn authority_str(&self) -> &str {
        self.authority.to_str().unwrap_or_default()
    }

    pub fn to_request(
        &self,
        version: HttpVersion,
        tls: bool,
        body: ProxyBody,
    ) -> Result<Request<ProxyBody>, http::Error> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.headers_mut() = self.headers.clone();
        match version {
            HttpVersion::Http1 => {
                let mut uri = http::uri::Parts::default();
                uri.path_and_query = Some(self.path.clone());
                *req.uri_mut() = Uri::from_parts(uri)?;
                req.headers_mut().insert(HOST, self.authority.clone());
            }
            HttpVersion::Http2 => {
                let scheme = if tls { "https" } else { "http" };
                *req.uri_mut() = Uri::builder()
                    .scheme(scheme)
                    .authority(self.authority.as_bytes())
                    .path_and_query(self.path.clone())
                    .build()?;
                *req.version_mut() = http::Version::HTTP_2;
            }
        }
        Ok(req)
    }
}

/// Why a request got no upstream response.
#[derive(Debug)]
pub enum Failure {
    Upstream(UpstreamError),
    /// The request failed on an established connection (reset, closed, protocol error).
    Send {
        error: hyper::Error,
        refused: bool,
    },
    /// The per-try or route timeout fired.
    Timeout,
    /// The request could not be expressed (bad rewritten path or authority).
    BadRequest(http::Error),
}

impl Failure {
    fn outcome(&self) -> Outcome<'static> {
        match self {
            Failure::Upstream(UpstreamError::Overflow { .. }) => Outcome::Overflow,
            Failure::Upstream(_) => Outcome::ConnectFailure,
            Failure::Send { refused: true, .. } => Outcome::RefusedStream,
            Failure::Send { .. } => Outcome::Reset,
            Failure::Timeout => Outcome::Timeout,
            Failure::BadRequest(_) => Outcome::Overflow,
        }
    }

    /// Status, flag, body and response code details of the local reply.
    fn reply(&self) -> (StatusCode, ResponseFlag, String, &'static str) {
        match self {
            Failure::Upstream(e) => {
                let details = match e {
                    UpstreamError::NoHealthyUpstream(_) => "no_healthy_upstream",
                    UpstreamError::Overflow { .. } => {
                        "upstream_reset_before_response_started{overflow}"
                    }
                    _ => "upstream_reset_before_response_started{connection_failure}",
                };
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    e.flag(),
                    e.local_reply_body(),
                    details,
                )
            }
            Failure::Send { error, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamConnectionTermination,
                format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: connection termination ({error})"
                ),
                "upstream_reset_before_response_started{connection_termination}",
            ),
            Failure::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlag::UpstreamRequestTimeout,
                "upstream request timeout".into(),
                "response_timeout",
            ),
            Failure::BadRequest(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamProtocolError,
                format!("cannot build the upstream request: {e}"),
                "upstream_request_invalid",
            ),
        }
    }

    fn transport_failure_reason(&self) -> Option<String> {
        match self {
            Failure::Upstream(e) => e.transport_failure_reason(),
            _ => None,
        }
    }
}

/// What the tries learned, for the log.
#[derive(Debug, Default)]
pub struct TryInfo {
    /// When the last try started.
    pub started: Option<Instant>,
    pub host: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub retry_limit_hit: bool,
}

fn is_refused_stream(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// One try: pick an endpoint, check out a connection, send.
pub async fn try_once(
    proxy: &Proxy,
    snap: &Snapshot,
    cluster: &Cluster,
    out: &Outgoing,
    body: ProxyBody,
    info: &mut TryInfo,
) -> Result<Response<PooledBody>, (Failure, bool)> {
    info.started = Some(Instant::now());
    let hash = crate::upstream::lb::request_hash(
        cluster.lb.as_ref(),
        &out.headers,
        out.path.query(),
        out.client,
    );
    let addr = proxy
        .upstream
        .pick(snap, cluster, hash)
        .await
        .map_err(|e| (Failure::Upstream(e), false))?;
    info.host = Some(addr);
    let lease = match proxy.upstream.checkout(snap, cluster, addr).await {
        Ok(lease) => lease,
        Err(e) => {
            if e.is_connect_failure() {
                proxy
                    .upstream
                    .observe(cluster, addr, Observation::LocalOriginFailure);
            }
            return Err((Failure::Upstream(e), false));
        }
    };
    proxy
        .upstream
        .observe(cluster, addr, Observation::LocalOriginSuccess);
    info.local = lease.local_addr();
    let reused = lease.reused();
    let req = out
        .to_request(cluster.version, cluster.tls.is_some(), body)
        .map_err(|e| (Failure::BadRequest(e), false))?;
    match lease.send(req).await {
        Ok(resp) => {
            proxy
                .upstream
                .observe(cluster, addr, Observation::Status(resp.status().as_u16()));
            Ok(resp)
        }
        Err(error) => {
            // A pooled connection the server had already closed: the request never reached it
            // (and says nothing about the host's health).
            let stale = reused
                && (error.is_canceled() || error.is_incomplete_message() || error.is_closed());
            if !stale {
                proxy
                    .upstream
                    .observe(cluster, addr, Observation::LocalOriginFailure);
            }
            let refused = is_refused_stream(&error);
            Err((Failure::Send { error, refused }, stale))
        }
    }
}

/// Tries until a response, a non-retriable failure, or the retry budget is spent.
async fn forward(
    proxy: &Proxy,
    snap: &Snapshot,
    cluster: &Cluster,
    out: &Outgoing,
    body: RequestBody,
    retry: &RetryPlan,
    info: &mut TryInfo,
) -> Result<Response<PooledBody>, Failure> {
    let replayable = body.is_replayable();
    let (buffered, mut once) = match body {
        RequestBody::Buffered(b) => (Some(b), None),
        RequestBody::Streaming(s) => (None, Some(s)),
    };
    let mut retries_done = 0u32;
    let mut stale_retry_used = false;
    loop {
        let body = match (&buffered, once.take()) {
            (Some(b), _) => b.body(),
            (None, Some(s)) => s,
            // Unreachable in practice: a streamed body is never retried.
            (None, None) => return Err(Failure::Timeout),
        };
        let attempt = try_once(proxy, snap, cluster, out, body, info);
        let result = match retry.per_try_timeout {
            Some(t) => match tokio::time::timeout(t, attempt).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(addr) = info.host {
                        proxy
                            .upstream
                            .observe(cluster, addr, Observation::LocalOriginFailure);
                    }
                    Err((Failure::Timeout, false))
                }
            },
            None => attempt.await,
        };
        let can_retry = replayable && retries_done < retry.retries;
        match result {
            Ok(resp) => {
                let wants = retry.should_retry(&Outcome::Response(resp.status(), resp.headers()));
                if !wants {
                    return Ok(resp);
                }
                if !can_retry {
                    info.retry_limit_hit = replayable && retry.retries > 0;
                    return Ok(resp);
                }
                debug!(status = %resp.status(), upstream = ?info.host, "retriable response, retrying");
            }
            Err((failure, stale)) => {
                if stale && replayable && !stale_retry_used {
                    // Not counted: the request never reached the upstream.
                    stale_retry_used = true;
                    debug!("stale pooled connection, retrying on a fresh one");
                    continue;
                }
                let wants = retry.should_retry(&failure.outcome());
                if !(wants && can_retry) {
                    info.retry_limit_hit = wants && replayable && retry.retries > 0;
                    if let Failure::Upstream(e) = &failure
                        && info.host.is_none()
                    {
                        info.host = e.addr();
                    }
                    return Err(failure);
                }
                debug!(error = ?failure, "retriable failure, retrying");
            }
        }
        retries_done += 1;
        tokio::time::sleep(retry.backoff(retries_done, fastrand::f64())).await;
    }
}

/// Reads and drops a response body (mirrors): the connection goes back to its pool.
pub async fn drain(resp: Response<PooledBody>) {
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return;
        }
    }
}

/// Timeout for mirrored requests without a route timeout: they must not pile up.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);
