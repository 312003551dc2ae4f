//! VirtualService / HTTPRoute → [`super::HttpRoute`] / [`super::L4Route`].
use super::*;
use crate::error::ObjErrors;
use crate::model::gateway as gw;
use crate::model::networking as m;
use crate::snapshot::CLUSTER_DOMAIN;

/// Istio's short-name rule: a host without dots is a Service in the object's namespace.
pub(crate) fn expand_host(host: &str, ns: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_ascii_lowercase()
    } else {
        format!("{}.{ns}.svc.{CLUSTER_DOMAIN}", host.to_ascii_lowercase())
    }
}

fn regex(src: &str, path: &str, e: &mut ObjErrors<'_>) -> Option<Regex> {
    // Envoy's safe_regex is a full match: anchor it.
    match Regex::new(&format!("^(?:{src})$")) {
        Ok(r) => Some(r),
        Err(err) => {
            // regex errors are multi-line drawings; keep the last line (the reason).
            let msg = err.to_string();
            let reason = msg
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim();
            let reason = reason.strip_prefix("error: ").unwrap_or(reason);
            e.push(path, format!("invalid regex {src:?}: {reason}"));
            None
        }
    }
}

/// `Err(())` = invalid (already reported); `Ok(None)` = `{}` (presence match).
fn string_match(
    sm: &m::StringMatch,
    path: &str,
    e: &mut ObjErrors<'_>,
) -> Result<Option<StringMatcher>, ()> {
    let set = [sm.exact.is_some(), sm.prefix.is_some(), sm.regex.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set > 1 {
        e.push(path, "set only one of exact, prefix, regex");
        return Err(());
    }
    if let Some(x) = &sm.exact {
        return Ok(Some(StringMatcher::Exact(x.clone())));
    }
    if let Some(x) = &sm.prefix {
        return Ok(Some(StringMatcher::Prefix(x.clone())));
    }
    if let Some(x) = &sm.regex {
        return regex(x, &format!("{path}.regex"), e)
            .map(|r| Some(StringMatcher::Regex(r)))
            .ok_or(());
    }
    Ok(None)
}

fn required_match(
    sm: &Option<m::StringMatch>,
    path: &str,
    e: &mut ObjErrors<'_>,
) -> Result<Option<StringMatcher>, ()> {
    match sm {
        None => Ok(None),
        Some(sm) => match string_match(sm, path, e)? {
            Some(m) => Ok(Some(m)),
            None => {
                e.push(path, "needs one of exact, prefix, regex");
                Err(())
            }
        },
    }
}

fn header_name_ok(name: &str, path: &str, e: &mut ObjErrors<'_>) -> bool {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        e.push(path, format!("{name:?} is not a valid header name"));
        false
    } else {
        true
    }
}

fn port16(n: u32, path: &str, e: &mut ObjErrors<'_>) -> Option<u16> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            e.push(path, format!("{n} is not a port number (1-65535)"));
            None
        }
    }
}

fn opt_duration(v: &Option<String>, path: &str, e: &mut ObjErrors<'_>) -> Option<Duration> {
    let s = v.as_ref()?;
    duration::parse(s).map_err(|msg| e.push(path, msg)).ok()
}

fn percent(p: &Option<m::Percent>, old: Option<i64>, path: &str, e: &mut ObjErrors<'_>) -> f64 {
    let v = match (p, old) {
        (Some(p), _) => p.value,
        (None, Some(i)) => i as f64,
        // Istio: unset percentage means every request.
        (None, None) => 100.0,
    };
    if !(0.0..=100.0).contains(&v) || v.is_nan() {
        e.push(path, format!("percentage {v} is outside 0-100"));
        return 0.0;
    }
    v
}

fn header_ops(h: &Option<m::Headers>, path: &str, e: &mut ObjErrors<'_>) -> HeaderOps {
    let Some(h) = h else {
        return HeaderOps::default();
    };
    let one = |o: &Option<m::HeaderOperations>, p: &str, e: &mut ObjErrors<'_>| {
        let Some(o) = o else {
            return HeaderOperations::default();
        };
        let mut out = HeaderOperations::default();
        for (k, v) in &o.set {
            if header_name_ok(k, &format!("{p}.set.{k}"), e) {
                if http::HeaderValue::from_str(v).is_err() {
                    e.push(format!("{p}.set.{k}"), "invalid header value");
                }
                out.set.push((k.to_ascii_lowercase(), v.clone()));
            }
        }
        for (k, v) in &o.add {
            if header_name_ok(k, &format!("{p}.add.{k}"), e) {
                if http::HeaderValue::from_str(v).is_err() {
                    e.push(format!("{p}.add.{k}"), "invalid header value");
                }
                out.add.push((k.to_ascii_lowercase(), v.clone()));
            }
        }
        for (i, k) in o.remove.iter().enumerate() {
            if header_name_ok(k, &format!("{p}.remove[{i}]"), e) {
                out.remove.push(k.to_ascii_lowercase());
            }
        }
        out
    };
    HeaderOps {
        request: one(&h.request, &format!("{path}.request"), e),
        response: one(&h.response, &format!("{path}.response"), e),
    }
}

fn destination(d: &m::Destination, ns: &str, path: &str, e: &mut ObjErrors<'_>) -> Destination {
    if d.host.is_empty() {
        e.push(format!("{path}.host"), "required");
    }
    Destination {
        host: expand_host(&d.host, ns),
        subset: d.subset.clone().filter(|s| !s.is_empty()),
        port: d
            .port
            .as_ref()
            .and_then(|p| port16(p.number, &format!("{path}.port.number"), e)),
    }
}

fn weight(w: Option<i64>, path: &str, e: &mut ObjErrors<'_>) -> Option<u32> {
    match w {
        None => None,
        Some(w) => match u32::try_from(w) {
            Ok(w) => Some(w),
            Err(_) => {
                e.push(path, format!("weight {w} must be non-negative"));
                Some(0)
            }
        },
    }
}

/// Does a VirtualService `gateways` list include the mesh (sidecars / ztunnel / waypoints)?
fn includes_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

/// A compiled VirtualService: its hosts (expanded) and routes.
pub(crate) struct CompiledVs {
    pub hosts: Vec<String>,
    pub routes: ServiceRoutes,
}

pub(crate) fn virtual_service(
    name: &NamespacedName,
    spec: &m::VirtualServiceSpec,
    e: &mut ObjErrors<'_>,
) -> Option<CompiledVs> {
    let ns = name.namespace.as_str();
    if spec.hosts.is_empty() {
        e.push("spec.hosts", "at least one host is required");
    }
    let origin = RouteOrigin::VirtualService(name.clone());
    let applies = includes_mesh(&spec.gateways);
    if !applies {
        // Bound to gateways only (sidecar-era egress gateway config): nothing for the mesh.
        tracing::debug!(vs = %name, gateways = ?spec.gateways, "VirtualService does not apply to the mesh; skipped");
    }
    let mut out = ServiceRoutes::default();
    for (i, r) in spec.http.iter().enumerate() {
        let path = format!("spec.http[{i}]");
        if let Some(route) = http_route(r, &origin, ns, &path, e)
            && applies
        {
            out.http.extend(route);
        }
    }
    for (i, r) in spec.tcp.iter().enumerate() {
        let path = format!("spec.tcp[{i}]");
        let mut matches = Vec::new();
        let mut all_other_gateways = !r.matches.is_empty();
        for (j, mm) in r.matches.iter().enumerate() {
            let mp = format!("{path}.match[{j}]");
            let l4 = L4Match {
                port: mm.port.and_then(|p| port16(p, &format!("{mp}.port"), e)),
                destination_subnets: subnets(
                    &mm.destination_subnets,
                    &format!("{mp}.destinationSubnets"),
                    e,
                ),
                sni_hosts: Vec::new(),
                source_labels: mm.source_labels.clone(),
                source_namespace: mm.source_namespace.clone(),
            };
            if includes_mesh(&mm.gateways) {
                all_other_gateways = false;
                matches.push(l4);
            }
        }
        let destinations = route_destinations(&r.route, ns, &format!("{path}.route"), e);
        if applies && !all_other_gateways {
            out.tcp.push(L4Route {
                origin: origin.clone(),
                matches,
                destinations,
            });
        }
    }
    for (i, r) in spec.tls.iter().enumerate() {
        let path = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            e.push(
                format!("{path}.match"),
                "TLS routes need at least one match with sniHosts",
            );
        }
        let mut matches = Vec::new();
        let mut all_other_gateways = !r.matches.is_empty();
        for (j, mm) in r.matches.iter().enumerate() {
            let mp = format!("{path}.match[{j}]");
            if mm.sni_hosts.is_empty() {
                e.push(format!("{mp}.sniHosts"), "required");
            }
            let l4 = L4Match {
                port: mm.port.and_then(|p| port16(p, &format!("{mp}.port"), e)),
                destination_subnets: subnets(
                    &mm.destination_subnets,
                    &format!("{mp}.destinationSubnets"),
                    e,
                ),
                sni_hosts: mm
                    .sni_hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                source_labels: mm.source_labels.clone(),
                source_namespace: mm.source_namespace.clone(),
            };
            if includes_mesh(&mm.gateways) {
                all_other_gateways = false;
                matches.push(l4);
            }
        }
        let destinations = route_destinations(&r.route, ns, &format!("{path}.route"), e);
        if applies && !all_other_gateways {
            out.tls.push(L4Route {
                origin: origin.clone(),
                matches,
                destinations,
            });
        }
    }
    Some(CompiledVs {
        hosts: spec.hosts.iter().map(|h| expand_host(h, ns)).collect(),
        routes: out,
    })
}

fn subnets(v: &[String], path: &str, e: &mut ObjErrors<'_>) -> Vec<IpNet> {
    v.iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let n = s
                .parse::<IpNet>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from));
            if n.is_none() {
                e.push(format!("{path}[{i}]"), format!("{s:?} is not a CIDR"));
            }
            n
        })
        .collect()
}

fn route_destinations(
    r: &[m::RouteDestination],
    ns: &str,
    path: &str,
    e: &mut ObjErrors<'_>,
) -> Destinations {
    if r.is_empty() {
        e.push(path, "at least one destination is required");
    }
    Destinations::new(
        r.iter()
            .enumerate()
            .map(|(i, d)| {
                let p = format!("{path}[{i}]");
                (
                    destination(&d.destination, ns, &format!("{p}.destination"), e),
                    weight(d.weight, &format!("{p}.weight"), e),
                    HeaderOps::default(),
                )
            })
            .collect(),
    )
}

/// `Ok(None)` when every match names only non-mesh gateways (route does not apply).
fn http_route(
    r: &m::HttpRoute,
    origin: &RouteOrigin,
    ns: &str,
    path: &str,
    e: &mut ObjErrors<'_>,
) -> Option<Option<HttpRoute>> {
    let before = e.out.len();
    let mut matches = Vec::new();
    let mut all_other_gateways = !r.matches.is_empty();
    for (j, mm) in r.matches.iter().enumerate() {
        let mp = format!("{path}.match[{j}]");
        let m = http_match(mm, &mp, e);
        if includes_mesh(&mm.gateways) {
            all_other_gateways = false;
            if let Some(m) = m {
                matches.push(m);
            }
        }
    }
    if r.delegate.is_some() {
        e.push(
            format!("{path}.delegate"),
            "delegate VirtualServices are not supported",
        );
    }
    if r.cors_policy.is_some() {
        tracing::warn!(route = ?origin, "VirtualService corsPolicy not implemented; ignored");
    }
    let kinds = [
        !r.route.is_empty(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ];
    let action = match kinds {
        [true, false, false] => RouteAction::Forward(Destinations::new(
            r.route
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let p = format!("{path}.route[{i}]");
                    (
                        destination(&d.destination, ns, &format!("{p}.destination"), e),
                        weight(d.weight, &format!("{p}.weight"), e),
                        header_ops(&d.headers, &format!("{p}.headers"), e),
                    )
                })
                .collect(),
        )),
        [false, true, false] => {
            let rd = r.redirect.as_ref()?;
            let status = match rd.redirect_code.unwrap_or(301) {
                c @ (301 | 302 | 303 | 307 | 308) => c as u16,
                c => {
                    e.push(
                        format!("{path}.redirect.redirectCode"),
                        format!("{c} is not a redirect status"),
                    );
                    301
                }
            };
            let derive_port = match rd.derive_port.as_deref() {
                None | Some("FROM_PROTOCOL_DEFAULT") => false,
                Some("FROM_REQUEST_PORT") => true,
                Some(o) => {
                    e.push(
                        format!("{path}.redirect.derivePort"),
                        format!("unknown value {o:?}"),
                    );
                    false
                }
            };
            RouteAction::Redirect(Redirect {
                path: rd.uri.clone(),
                prefix: None,
                authority: rd.authority.clone(),
                port: rd
                    .port
                    .and_then(|p| port16(p, &format!("{path}.redirect.port"), e)),
                derive_port,
                scheme: rd.scheme.clone(),
                status,
            })
        }
        [false, false, true] => {
            let d = r.direct_response.as_ref()?;
            let status = match u16::try_from(d.status) {
                Ok(s) if (200..=599).contains(&s) => s,
                _ => {
                    e.push(
                        format!("{path}.directResponse.status"),
                        "must be an HTTP status 200-599",
                    );
                    500
                }
            };
            let body = d.body.as_ref().and_then(|b| {
                if b.bytes.is_some() {
                    e.push(
                        format!("{path}.directResponse.body.bytes"),
                        "binary bodies are not supported; use string",
                    );
                }
                b.string.clone()
            });
            RouteAction::DirectResponse { status, body }
        }
        [false, false, false] => {
            e.push(path, "needs one of route, redirect, directResponse");
            return None;
        }
        _ => {
            e.push(path, "set only one of route, redirect, directResponse");
            return None;
        }
    };
    let rewrite = r.rewrite.as_ref().map(|rw| {
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            e.push(
                format!("{path}.rewrite"),
                "set only one of uri and uriRegexRewrite",
            );
        }
        let uri_regex = rw.uri_regex_rewrite.as_ref().and_then(|rr| {
            regex(
                &rr.match_,
                &format!("{path}.rewrite.uriRegexRewrite.match"),
                e,
            )
            .map(|re| {
                // Envoy's rewrite substitutions are \1; the regex crate uses ${1}.
                let with = convert_backrefs(&rr.rewrite);
                // The match regex must not be anchored for replace_all semantics.
                (Regex::new(&rr.match_).unwrap_or(re), with)
            })
        });
        Rewrite {
            uri: rw.uri.clone(),
            full_path: None,
            authority: rw.authority.clone(),
            uri_regex,
        }
    });
    let timeout = opt_duration(&r.timeout, &format!("{path}.timeout"), e);
    let retries = r.retries.as_ref().map(|rt| {
        let mut retry_on = Vec::new();
        let mut retriable_status = Vec::new();
        for cond in rt
            .retry_on
            .as_deref()
            .unwrap_or(
                "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            )
            .split(',')
        {
            let c = cond.trim();
            if c.is_empty() {
                continue;
            }
            match c.parse::<u16>() {
                Ok(code) => retriable_status.push(code),
                Err(_) => retry_on.push(c.to_owned()),
            }
        }
        RetryPolicy {
            // Istio's default when `retries` is present without attempts is 2.
            attempts: rt.attempts.unwrap_or(2),
            per_try_timeout: opt_duration(
                &rt.per_try_timeout,
                &format!("{path}.retries.perTryTimeout"),
                e,
            ),
            retry_on,
            retriable_status,
            backoff: opt_duration(&rt.backoff, &format!("{path}.retries.backoff"), e),
        }
    });
    let fault = r.fault.as_ref().map(|f| {
        let delay = f.delay.as_ref().and_then(|d| {
            let p = format!("{path}.fault.delay");
            if d.exponential_delay.is_some() {
                e.push(
                    format!("{p}.exponentialDelay"),
                    "exponentialDelay is not supported; use fixedDelay",
                );
            }
            let Some(fixed) = &d.fixed_delay else {
                e.push(format!("{p}.fixedDelay"), "required");
                return None;
            };
            let delay = duration::parse(fixed)
                .map_err(|m| e.push(format!("{p}.fixedDelay"), m))
                .ok()?;
            Some(FaultDelay {
                delay,
                percentage: percent(&d.percentage, d.percent, &format!("{p}.percentage"), e),
            })
        });
        let abort = f.abort.as_ref().and_then(|a| {
            let p = format!("{path}.fault.abort");
            let status = if let Some(s) = a.http_status {
                match u16::try_from(s) {
                    Ok(s) if (200..=599).contains(&s) => AbortStatus::Http(s),
                    _ => {
                        e.push(format!("{p}.httpStatus"), "must be an HTTP status 200-599");
                        return None;
                    }
                }
            } else if let Some(g) = &a.grpc_status {
                AbortStatus::Grpc(g.clone())
            } else if let Some(h) = &a.http2_error {
                AbortStatus::Http2Error(h.clone())
            } else {
                e.push(p.clone(), "needs httpStatus, grpcStatus or http2Error");
                return None;
            };
            Some(FaultAbort {
                status,
                percentage: percent(&a.percentage, a.percent, &format!("{p}.percentage"), e),
            })
        });
        Fault { delay, abort }
    });
    let mut mirrors = Vec::new();
    if let Some(md) = &r.mirror {
        let pct = match (&r.mirror_percentage, r.mirror_percent) {
            (None, None) => 100.0,
            (p, old) => percent(
                p,
                old.map(i64::from),
                &format!("{path}.mirrorPercentage"),
                e,
            ),
        };
        mirrors.push(Mirror {
            destination: destination(md, ns, &format!("{path}.mirror"), e),
            percentage: pct,
        });
    }
    for (i, mp) in r.mirrors.iter().enumerate() {
        let p = format!("{path}.mirrors[{i}]");
        mirrors.push(Mirror {
            destination: destination(&mp.destination, ns, &format!("{p}.destination"), e),
            percentage: percent(&mp.percentage, None, &format!("{p}.percentage"), e),
        });
    }
    let headers = header_ops(&r.headers, &format!("{path}.headers"), e);
    if e.out.len() != before {
        return None;
    }
    if all_other_gateways {
        return Some(None);
    }
    Some(Some(HttpRoute {
        name: r.name.clone(),
        origin: origin.clone(),
        matches,
        action,
        rewrite,
        timeout,
        retries,
        fault,
        mirrors,
        headers,
    }))
}

/// `\1` (Envoy / RE2 substitution) → `${1}` (regex crate).
fn convert_backrefs(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.peek().is_some_and(char::is_ascii_digit) {
            let mut n = String::new();
            while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                n.push(d);
                chars.next();
            }
            out.push_str(&format!("${{{n}}}"));
        } else if c == '$' {
            out.push_str("$$");
        } else {
            out.push(c);
        }
    }
    out
}

fn http_match(mm: &m::HttpMatchRequest, path: &str, e: &mut ObjErrors<'_>) -> Option<HttpMatch> {
    let before = e.out.len();
    let uri = required_match(&mm.uri, &format!("{path}.uri"), e)
        .ok()
        .flatten();
    let scheme = required_match(&mm.scheme, &format!("{path}.scheme"), e)
        .ok()
        .flatten();
    let method = required_match(&mm.method, &format!("{path}.method"), e)
        .ok()
        .flatten();
    let authority = required_match(&mm.authority, &format!("{path}.authority"), e)
        .ok()
        .flatten();
    let named = |map: &std::collections::BTreeMap<String, m::StringMatch>,
                 field: &str,
                 header: bool,
                 e: &mut ObjErrors<'_>| {
        let mut out = Vec::new();
        for (k, v) in map {
            let p = format!("{path}.{field}.{k}");
            if header && !header_name_ok(k, &p, e) {
                continue;
            }
            if let Ok(m) = string_match(v, &p, e) {
                out.push((
                    if header {
                        k.to_ascii_lowercase()
                    } else {
                        k.clone()
                    },
                    m,
                ));
            }
        }
        out
    };
    let headers = named(&mm.headers, "headers", true, e);
    let without_headers = named(&mm.without_headers, "withoutHeaders", true, e);
    let query_params = named(&mm.query_params, "queryParams", false, e);
    let port = mm.port.and_then(|p| port16(p, &format!("{path}.port"), e));
    (e.out.len() == before).then(|| HttpMatch {
        uri,
        ignore_uri_case: mm.ignore_uri_case.unwrap_or(false),
        scheme,
        method,
        authority,
        headers,
        without_headers,
        query_params,
        port,
        source_labels: mm.source_labels.clone(),
        source_namespace: mm.source_namespace.clone(),
    })
}

// ---------------------------------------------------------------- Gateway API HTTPRoute

/// What an HTTPRoute parentRef points at, resolved by the snapshot compiler.
pub(crate) struct Parent {
    pub kind: crate::snapshot::ServiceKind,
    pub name: NamespacedName,
    pub port: Option<u16>,
}

/// `(group, kind, namespace, name)` of a backendRef → its host name.
pub(crate) type ResolveBackend<'a> = dyn Fn(&str, &str, &str, &str) -> Result<String, String> + 'a;

/// Sort key: (path match kind, path length, has method, header count, query param count).
type Precedence = (u8, usize, bool, usize, usize);

/// Gateway API precedence key for one (rule, match): exact path, then longer prefix, then
/// method, then more headers, then more query params.
fn precedence(m: &HttpMatch) -> Precedence {
    let (kind, len) = match &m.uri {
        Some(StringMatcher::Exact(p)) => (3, p.len()),
        Some(StringMatcher::PathPrefix(p)) | Some(StringMatcher::Prefix(p)) => (2, p.len()),
        Some(StringMatcher::Regex(r)) => (1, r.as_str().len()),
        None => (0, 0),
    };
    (
        kind,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query_params.len(),
    )
}

/// Compiles an HTTPRoute into routes ordered by Gateway API precedence, and the parents it
/// attaches to. `resolve_backend(group, kind, ns, name)` gives the host of a backendRef.
pub(crate) fn http_route_gateway_api(
    name: &NamespacedName,
    spec: &gw::HttpRouteSpec,
    resolve_backend: &ResolveBackend<'_>,
    e: &mut ObjErrors<'_>,
) -> (Vec<Parent>, Vec<HttpRoute>) {
    let ns = name.namespace.as_str();
    let mut parents = Vec::new();
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let path = format!("spec.parentRefs[{i}]");
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        let k = match (group, kind) {
            ("" | "core", "Service") => crate::snapshot::ServiceKind::Service,
            ("networking.istio.io", "ServiceEntry") => crate::snapshot::ServiceKind::ServiceEntry,
            ("gateway.networking.k8s.io", "Gateway") => {
                // A waypoint serves the routes of its services; routes attached to the Gateway
                // itself are ingress-style and not used in the mesh.
                tracing::warn!(route = %name, gateway = %p.name, "HTTPRoute attached to a Gateway is not used by waypoints; attach it to a Service or ServiceEntry");
                continue;
            }
            _ => {
                e.push(format!("{path}.kind"), format!("unsupported parent {group}/{kind} (use Service or networking.istio.io ServiceEntry)"));
                continue;
            }
        };
        parents.push(Parent {
            kind: k,
            name: NamespacedName::new(
                p.namespace.clone().unwrap_or_else(|| ns.to_owned()),
                p.name.clone(),
            ),
            port: p.port.and_then(|x| port16(x, &format!("{path}.port"), e)),
        });
    }
    let origin = RouteOrigin::HttpRoute(name.clone());
    let mut keyed: Vec<(Precedence, usize, HttpRoute)> = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let before = e.out.len();
        let mut headers = HeaderOps::default();
        let mut redirect = None;
        let mut rewrite: Option<Rewrite> = None;
        let mut mirrors = Vec::new();
        for (j, f) in rule.filters.iter().enumerate() {
            let fp = format!("{path}.filters[{j}]");
            match f.type_.as_str() {
                "RequestHeaderModifier" => {
                    headers.request = header_filter(
                        &f.request_header_modifier,
                        &format!("{fp}.requestHeaderModifier"),
                        e,
                    )
                }
                "ResponseHeaderModifier" => {
                    headers.response = header_filter(
                        &f.response_header_modifier,
                        &format!("{fp}.responseHeaderModifier"),
                        e,
                    )
                }
                "RequestRedirect" => {
                    let Some(rr) = &f.request_redirect else {
                        e.push(
                            format!("{fp}.requestRedirect"),
                            "required for type RequestRedirect",
                        );
                        continue;
                    };
                    let (full, prefix) =
                        path_modifier(&rr.path, &format!("{fp}.requestRedirect.path"), e);
                    let status = match rr.status_code.unwrap_or(302) {
                        c @ (301 | 302) => c as u16,
                        c => {
                            e.push(
                                format!("{fp}.requestRedirect.statusCode"),
                                format!("{c} is not 301 or 302"),
                            );
                            302
                        }
                    };
                    redirect = Some(Redirect {
                        path: full,
                        prefix,
                        authority: rr.hostname.clone(),
                        port: rr
                            .port
                            .and_then(|p| port16(p, &format!("{fp}.requestRedirect.port"), e)),
                        derive_port: false,
                        scheme: rr.scheme.clone(),
                        status,
                    });
                }
                "URLRewrite" => {
                    let Some(rw) = &f.url_rewrite else {
                        e.push(format!("{fp}.urlRewrite"), "required for type URLRewrite");
                        continue;
                    };
                    let (full, prefix) =
                        path_modifier(&rw.path, &format!("{fp}.urlRewrite.path"), e);
                    rewrite = Some(Rewrite {
                        uri: prefix,
                        full_path: full,
                        authority: rw.hostname.clone(),
                        uri_regex: None,
                    });
                }
                "RequestMirror" => {
                    let Some(m) = &f.request_mirror else {
                        e.push(
                            format!("{fp}.requestMirror"),
                            "required for type RequestMirror",
                        );
                        continue;
                    };
                    let b = &m.backend_ref;
                    let host = resolve_backend(
                        b.group.as_deref().unwrap_or(""),
                        b.kind.as_deref().unwrap_or("Service"),
                        b.namespace.as_deref().unwrap_or(ns),
                        &b.name,
                    );
                    let pct = match (&m.fraction, m.percent) {
                        (Some(fr), _) => {
                            let d = fr.denominator.unwrap_or(100).max(1);
                            (f64::from(fr.numerator) * 100.0 / f64::from(d)).min(100.0)
                        }
                        (None, Some(p)) => f64::from(p.min(100)),
                        (None, None) => 100.0,
                    };
                    match host {
                        Ok(host) => mirrors.push(Mirror {
                            destination: Destination {
                                host,
                                subset: None,
                                port: b.port.and_then(|p| {
                                    port16(p, &format!("{fp}.requestMirror.backendRef.port"), e)
                                }),
                            },
                            percentage: pct,
                        }),
                        Err(msg) => e.push(format!("{fp}.requestMirror.backendRef"), msg),
                    }
                }
                other => e.push(
                    format!("{fp}.type"),
                    format!("filter type {other:?} is not supported"),
                ),
            }
        }
        let mut dests = Vec::new();
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let bp = format!("{path}.backendRefs[{j}]");
            if !b.filters.is_empty() {
                e.push(
                    format!("{bp}.filters"),
                    "per-backend filters are not supported",
                );
            }
            let kind = b.kind.as_deref().unwrap_or("Service");
            let port = b.port.and_then(|p| port16(p, &format!("{bp}.port"), e));
            if kind == "Service" && port.is_none() {
                e.push(format!("{bp}.port"), "required for a Service backend");
            }
            match resolve_backend(
                b.group.as_deref().unwrap_or(""),
                kind,
                b.namespace.as_deref().unwrap_or(ns),
                &b.name,
            ) {
                Ok(host) => dests.push((
                    Destination {
                        host,
                        subset: None,
                        port,
                    },
                    // Gateway API default weight is 1.
                    Some(weight(b.weight, &format!("{bp}.weight"), e).unwrap_or(1)),
                    HeaderOps::default(),
                )),
                Err(msg) => e.push(bp, msg),
            }
        }
        let action = match redirect {
            Some(r) => RouteAction::Redirect(r),
            // Gateway API: a rule without backends answers 500.
            None if rule.backend_refs.is_empty() => RouteAction::DirectResponse {
                status: 500,
                body: None,
            },
            None => RouteAction::Forward(Destinations::new(dests)),
        };
        let timeouts = rule.timeouts.as_ref();
        let timeout =
            timeouts.and_then(|t| opt_duration(&t.request, &format!("{path}.timeouts.request"), e));
        let per_try = timeouts.and_then(|t| {
            opt_duration(
                &t.backend_request,
                &format!("{path}.timeouts.backendRequest"),
                e,
            )
        });
        let retries = match (&rule.retry, per_try) {
            (Some(r), _) => Some(RetryPolicy {
                attempts: r.attempts.unwrap_or(1),
                per_try_timeout: per_try,
                retry_on: Vec::new(),
                retriable_status: r
                    .codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok())
                    .collect(),
                backoff: opt_duration(&r.backoff, &format!("{path}.retry.backoff"), e),
            }),
            (None, Some(pt)) => Some(RetryPolicy {
                attempts: 0,
                per_try_timeout: Some(pt),
                retry_on: Vec::new(),
                retriable_status: Vec::new(),
                backoff: None,
            }),
            (None, None) => None,
        };
        let mut matches = Vec::new();
        for (j, m) in rule.matches.iter().enumerate() {
            if let Some(hm) = gateway_match(m, &format!("{path}.matches[{j}]"), e) {
                matches.push(hm);
            }
        }
        if matches.is_empty() {
            // Gateway API default: PathPrefix "/".
            matches.push(HttpMatch {
                uri: Some(StringMatcher::PathPrefix("/".into())),
                ..Default::default()
            });
        }
        if e.out.len() != before {
            continue;
        }
        // One route per match so precedence can be applied across rules.
        for m in matches {
            let key = precedence(&m);
            keyed.push((
                key,
                keyed.len(),
                HttpRoute {
                    name: rule.name.clone(),
                    origin: origin.clone(),
                    matches: vec![m],
                    action: action.clone(),
                    rewrite: rewrite.clone(),
                    timeout,
                    retries: retries.clone(),
                    fault: None,
                    mirrors: mirrors.clone(),
                    headers: headers.clone(),
                },
            ));
        }
    }
    keyed.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    (parents, keyed.into_iter().map(|(_, _, r)| r).collect())
}

fn path_modifier(
    p: &Option<gw::HttpPathModifier>,
    path: &str,
    e: &mut ObjErrors<'_>,
) -> (Option<String>, Option<String>) {
    let Some(p) = p else { return (None, None) };
    match p.type_.as_str() {
        "ReplaceFullPath" => (
            p.replace_full_path.clone().or_else(|| Some("/".into())),
            None,
        ),
        "ReplacePrefixMatch" => (
            None,
            p.replace_prefix_match.clone().or_else(|| Some("/".into())),
        ),
        other => {
            e.push(
                format!("{path}.type"),
                format!("unknown path modifier {other:?}"),
            );
            (None, None)
        }
    }
}

fn header_filter(
    f: &Option<gw::HttpHeaderFilter>,
    path: &str,
    e: &mut ObjErrors<'_>,
) -> HeaderOperations {
    let Some(f) = f else {
        e.push(path, "required for this filter type");
        return HeaderOperations::default();
    };
    let mut out = HeaderOperations::default();
    for (i, h) in f.set.iter().enumerate() {
        if header_name_ok(&h.name, &format!("{path}.set[{i}].name"), e) {
            out.set.push((h.name.to_ascii_lowercase(), h.value.clone()));
        }
    }
    for (i, h) in f.add.iter().enumerate() {
        if header_name_ok(&h.name, &format!("{path}.add[{i}].name"), e) {
            out.add.push((h.name.to_ascii_lowercase(), h.value.clone()));
        }
    }
    for (i, h) in f.remove.iter().enumerate() {
        if header_name_ok(h, &format!("{path}.remove[{i}]"), e) {
            out.remove.push(h.to_ascii_lowercase());
        }
    }
    out
}

fn gateway_match(m: &gw::HttpRouteMatch, path: &str, e: &mut ObjErrors<'_>) -> Option<HttpMatch> {
    let before = e.out.len();
    let uri = m.path.as_ref().and_then(|p| {
        let v = p.value.clone().unwrap_or_else(|| "/".into());
        match p.type_.as_deref().unwrap_or("PathPrefix") {
            "Exact" => Some(StringMatcher::Exact(v)),
            "PathPrefix" => Some(StringMatcher::PathPrefix(v)),
            "RegularExpression" => {
                regex(&v, &format!("{path}.path.value"), e).map(StringMatcher::Regex)
            }
            other => {
                e.push(
                    format!("{path}.path.type"),
                    format!("unknown path match type {other:?}"),
                );
                None
            }
        }
    });
    let named = |list: &[gw::HttpNameMatch], field: &str, header: bool, e: &mut ObjErrors<'_>| {
        let mut out = Vec::new();
        for (i, h) in list.iter().enumerate() {
            let p = format!("{path}.{field}[{i}]");
            if header && !header_name_ok(&h.name, &format!("{p}.name"), e) {
                continue;
            }
            let m = match h.type_.as_deref().unwrap_or("Exact") {
                "Exact" => Some(StringMatcher::Exact(h.value.clone())),
                "RegularExpression" => {
                    regex(&h.value, &format!("{p}.value"), e).map(StringMatcher::Regex)
                }
                other => {
                    e.push(format!("{p}.type"), format!("unknown match type {other:?}"));
                    None
                }
            };
            if let Some(m) = m {
                out.push((
                    if header {
                        h.name.to_ascii_lowercase()
                    } else {
                        h.name.clone()
                    },
                    Some(m),
                ));
            }
        }
        out
    };
    let headers = named(&m.headers, "headers", true, e);
    let query_params = named(&m.query_params, "queryParams", false, e);
    let method = m.method.clone().map(StringMatcher::Exact);
    (e.out.len() == before).then(|| HttpMatch {
        uri,
        method,
        headers,
        query_params,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SourceRef;

    fn vs(yaml: &str) -> (Option<CompiledVs>, Vec<crate::error::ConfigError>) {
        let spec: m::VirtualServiceSpec = serde_yaml_ng::from_str(yaml).unwrap();
        let src = SourceRef {
            file: "t.yaml".into(),
            document: 1,
        };
        let mut out = Vec::new();
        let mut e = ObjErrors {
            source: &src,
            kind: "VirtualService",
            object: "ns/vs".into(),
            out: &mut out,
        };
        let c = virtual_service(&NamespacedName::new("ns", "vs"), &spec, &mut e);
        (c, out)
    }

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        port: u16,
        headers: &'a http::HeaderMap,
    ) -> HttpRequestInfo<'a> {
        HttpRequestInfo {
            method,
            path,
            authority: "aliyun.com",
            scheme: "http",
            port,
            headers,
            source_namespace: Some("default"),
            source_labels: None,
        }
    }

    #[test]
    fn seed_fault_and_weights() {
        let (c, errs) = vs(r#"
hosts: ['www.aliyun.com']
http:
- fault:
    delay:
      percent: 100
      fixedDelay: 5s
  route:
    - destination:
        host: www.aliyun.com
      weight: 100
"#);
        assert!(errs.is_empty(), "{errs:?}");
        let c = c.unwrap();
        assert_eq!(c.hosts, ["www.aliyun.com"]);
        let h = http::HeaderMap::new();
        let m = c.routes.select_http(&req("GET", "/", 80, &h)).unwrap();
        let f = m.route.fault.as_ref().unwrap();
        assert_eq!(f.delay_for(99.9), Some(Duration::from_secs(5)));
        let RouteAction::Forward(d) = &m.route.action else {
            panic!("forward")
        };
        assert_eq!(d.pick(12345).unwrap().destination.host, "www.aliyun.com");
    }

    #[test]
    fn match_table() {
        let (c, errs) = vs(r#"
hosts: [reviews]
http:
- match:
  - uri: {prefix: /api/}
    headers: {x-canary: {exact: "1"}}
  route: [{destination: {host: reviews, subset: canary}}]
- match:
  - uri: {regex: "/v[0-9]+/.*"}
    method: {exact: POST}
  - queryParams: {debug: {exact: "true"}}
  rewrite: {uri: /new}
  route: [{destination: {host: reviews, subset: v2}}]
- match:
  - uri: {prefix: /old/}
  rewrite: {uri: /new/}
  route: [{destination: {host: reviews, port: {number: 9080}}}]
- match:
  - port: 8080
  redirect: {uri: /moved, redirectCode: 308}
"#);
        assert!(errs.is_empty(), "{errs:?}");
        let c = c.unwrap();
        assert_eq!(c.hosts, ["reviews.ns.svc.cluster.local"]);
        let mut canary = http::HeaderMap::new();
        canary.insert("x-canary", "1".parse().unwrap());
        let none = http::HeaderMap::new();
        let subset = |r: RouteMatch<'_>| match &r.route.action {
            RouteAction::Forward(d) => d.list[0].destination.subset.clone().unwrap_or_default(),
            RouteAction::Redirect(r) => format!(
                "redirect {} {}",
                r.status,
                r.path.clone().unwrap_or_default()
            ),
            RouteAction::DirectResponse { status, .. } => format!("direct {status}"),
        };
        let cases: Vec<(HttpRequestInfo<'_>, Option<&str>)> = vec![
            (req("GET", "/api/x", 80, &canary), Some("canary")),
            (req("GET", "/api/x", 80, &none), None),
            (req("POST", "/v1/items", 80, &none), Some("v2")),
            (req("GET", "/v1/items", 80, &none), None),
            (req("GET", "/x?a=1&debug=true", 80, &none), Some("v2")),
            (req("GET", "/old/thing", 80, &none), Some("")),
            (
                req("GET", "/anything", 8080, &none),
                Some("redirect 308 /moved"),
            ),
        ];
        for (r, want) in cases {
            let got = c.routes.select_http(&r).map(subset);
            assert_eq!(got.as_deref(), want, "{} {} :{}", r.method, r.path, r.port);
        }
        let m = c
            .routes
            .select_http(&req("GET", "/old/thing?q=1", 80, &none))
            .unwrap();
        assert_eq!(
            m.rewritten_path("/old/thing?q=1").as_deref(),
            Some("/new/thing?q=1")
        );
        let m = c
            .routes
            .select_http(&req("POST", "/v1/items", 80, &none))
            .unwrap();
        assert_eq!(m.rewritten_path("/v1/items").as_deref(), Some("/new"));
    }

    #[test]
    fn mesh_gateway_filter_seed_001() {
        let (c, errs) = vs(r#"
hosts: [aliyun.com]
gateways: [egress-gw, mesh]
http:
- match: [{gateways: [mesh], port: 80}]
  route: [{destination: {host: istio-egressgateway.istio-system.svc.cluster.local, port: {number: 80}}, weight: 100}]
- match: [{gateways: [egress-gw], port: 80}]
  route: [{destination: {host: aliyun.com, port: {number: 80}}, weight: 100}]
"#);
        assert!(errs.is_empty(), "{errs:?}");
        let c = c.unwrap();
        assert_eq!(c.routes.http.len(), 1, "only the mesh route applies");
        let RouteAction::Forward(d) = &c.routes.http[0].action else {
            panic!()
        };
        assert_eq!(
            d.list[0].destination.host,
            "istio-egressgateway.istio-system.svc.cluster.local"
        );
    }

    #[test]
    fn weights_normalised_and_picked() {
        let d = Destinations::new(vec![
            (
                Destination {
                    host: "a".into(),
                    subset: None,
                    port: None,
                },
                Some(1),
                HeaderOps::default(),
            ),
            (
                Destination {
                    host: "b".into(),
                    subset: None,
                    port: None,
                },
                Some(3),
                HeaderOps::default(),
            ),
            (
                Destination {
                    host: "c".into(),
                    subset: None,
                    port: None,
                },
                Some(0),
                HeaderOps::default(),
            ),
        ]);
        assert_eq!(
            d.list.iter().map(|w| w.weight).collect::<Vec<_>>(),
            [25.0, 75.0, 0.0]
        );
        let picks: Vec<_> = (0..4)
            .map(|r| d.pick(r).unwrap().destination.host.clone())
            .collect();
        assert_eq!(picks, ["a", "b", "b", "b"]);
        let unset = Destinations::new(vec![
            (
                Destination {
                    host: "a".into(),
                    subset: None,
                    port: None,
                },
                None,
                HeaderOps::default(),
            ),
            (
                Destination {
                    host: "b".into(),
                    subset: None,
                    port: None,
                },
                None,
                HeaderOps::default(),
            ),
        ]);
        assert_eq!(unset.list[0].weight, 50.0);
        let zero = Destinations::new(vec![(
            Destination {
                host: "a".into(),
                subset: None,
                port: None,
            },
            Some(0),
            HeaderOps::default(),
        )]);
        assert!(zero.pick(7).is_none());
    }

    #[test]
    fn many_errors_reported() {
        let (_, errs) = vs(r#"
hosts: []
http:
- match: [{uri: {exact: /a, prefix: /b}}, {uri: {regex: "("}}]
  route: [{destination: {host: x}, weight: -1}]
  timeout: 10 seconds
- fault: {abort: {percentage: {value: 150}, httpStatus: 503}}
  route: [{destination: {host: x}}]
- redirect: {uri: /x}
  route: [{destination: {host: y}}]
"#);
        let paths: Vec<_> = errs
            .iter()
            .map(|e| e.path.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            paths,
            [
                "spec.hosts",
                "spec.http[0].match[0].uri",
                "spec.http[0].match[1].uri.regex",
                "spec.http[0].route[0].weight",
                "spec.http[0].timeout",
                "spec.http[1].fault.abort.percentage",
                "spec.http[2]",
            ]
        );
    }

    #[test]
    fn tcp_tls_routes() {
        let (c, errs) = vs(r#"
hosts: ["*.example.com"]
tls:
- match: [{sniHosts: ["*.example.com"], port: 443}]
  route: [{destination: {host: a.example.com, port: {number: 443}}}]
tcp:
- match: [{port: 5432, destinationSubnets: ["10.0.0.0/8"]}]
  route: [{destination: {host: db.example.com}}]
"#);
        assert!(errs.is_empty(), "{errs:?}");
        let r = c.unwrap().routes;
        let tls = L4Info {
            port: 443,
            sni: Some("x.example.com"),
            ..Default::default()
        };
        assert!(r.select_tls(&tls).is_some());
        assert!(
            r.select_tls(&L4Info {
                sni: Some("example.org"),
                ..tls
            })
            .is_none()
        );
        let tcp = L4Info {
            port: 5432,
            destination_ip: "10.1.1.1".parse().ok(),
            ..Default::default()
        };
        assert!(r.select_tcp(&tcp).is_some());
        assert!(
            r.select_tcp(&L4Info {
                destination_ip: "11.1.1.1".parse().ok(),
                ..tcp
            })
            .is_none()
        );
    }

    #[test]
    fn backrefs() {
        assert_eq!(convert_backrefs(r"/v\1/\2x$"), "/v${1}/${2}x$$");
    }

    #[test]
    fn gateway_api_precedence() {
        let spec: gw::HttpRouteSpec = serde_yaml_ng::from_str(
            r#"
parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
rules:
- backendRefs: [{name: reviews-v1, port: 9080}]
- matches: [{path: {type: PathPrefix, value: /api}}]
  backendRefs: [{name: reviews-v2, port: 9080, weight: 3}, {name: reviews-v3, port: 9080}]
- matches: [{path: {type: Exact, value: /api/login}}]
  filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-A, value: b}]}}]
  backendRefs: [{name: reviews-v3, port: 9080}]
"#,
        )
        .unwrap();
        let src = SourceRef {
            file: "t.yaml".into(),
            document: 1,
        };
        let mut out = Vec::new();
        let mut e = ObjErrors {
            source: &src,
            kind: "HTTPRoute",
            object: "ns/r".into(),
            out: &mut out,
        };
        let resolve =
            |_: &str, _: &str, ns: &str, name: &str| Ok(format!("{name}.{ns}.svc.cluster.local"));
        let (parents, routes) =
            http_route_gateway_api(&NamespacedName::new("ns", "r"), &spec, &resolve, &mut e);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(parents.len(), 1);
        assert_eq!(parents[0].port, Some(9080));
        let sr = ServiceRoutes {
            http: routes,
            ..Default::default()
        };
        let h = http::HeaderMap::new();
        let host_of = |p: &str| match &sr
            .select_http(&req("GET", p, 9080, &h))
            .unwrap()
            .route
            .action
        {
            RouteAction::Forward(d) => d.list[0].destination.host.clone(),
            _ => String::new(),
        };
        assert_eq!(host_of("/api/login"), "reviews-v3.ns.svc.cluster.local");
        assert_eq!(host_of("/api/x"), "reviews-v2.ns.svc.cluster.local");
        assert_eq!(host_of("/apix"), "reviews-v1.ns.svc.cluster.local");
        let m = sr.select_http(&req("GET", "/api/login", 9080, &h)).unwrap();
        assert_eq!(
            m.route.headers.request.set,
            [("x-a".to_string(), "b".to_string())]
        );
    }
}
