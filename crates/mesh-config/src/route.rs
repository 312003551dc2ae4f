//! Compiled HTTP / TCP / TLS routes (VirtualService and Gateway API HTTPRoute) and the pure
//! functions that pick a route, a destination, a fault and a rewrite for a request.
//!
//! Routes are compiled once per snapshot: regexes compiled (anchored, RE2 semantics like
//! Envoy), durations parsed, weights normalised into cumulative ranges.
use crate::duration;
use crate::model::Labels;
use crate::snapshot::NamespacedName;
use ipnet::IpNet;
use regex::Regex;
use serde::{Serialize, Serializer};
use std::net::IpAddr;
use std::time::Duration;

pub(crate) mod compile;
mod index;

/// The routes that apply to one host.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceRoutes {
    /// In match order: the first route whose match applies wins.
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<L4Route>,
    pub tls: Vec<L4Route>,
    /// Built on the first [`ServiceRoutes::select_http`]. Edit `http` before that (or edit a
    /// clone: clones start unindexed); a list replaced later is detected and scanned linearly,
    /// but in-place edits that keep its buffer and length are not.
    #[serde(skip)]
    index: index::IndexCell,
}

/// Where a route came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteOrigin {
    VirtualService(NamespacedName),
    HttpRoute(NamespacedName),
    /// Generated from an ASMEgressTrafficPolicy.
    EgressPolicy(NamespacedName),
}

/// A request, as routing sees it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequestInfo<'a> {
    pub method: &'a str,
    /// `:path` including any query string.
    pub path: &'a str,
    /// Host / :authority (a `:port` suffix is ignored for matching).
    pub authority: &'a str,
    pub scheme: &'a str,
    /// Destination (service) port.
    pub port: u16,
    pub headers: &'a http::HeaderMap,
    pub source_namespace: Option<&'a str>,
    pub source_labels: Option<&'a Labels>,
}

/// A TCP connection / TLS stream, as routing sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct L4Info<'a> {
    pub destination_ip: Option<IpAddr>,
    pub port: u16,
    pub sni: Option<&'a str>,
    pub source_namespace: Option<&'a str>,
    pub source_labels: Option<&'a Labels>,
}

#[derive(Debug, Clone)]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    /// Gateway API PathPrefix: whole path segments (`/foo` matches `/foo/bar`, not `/foobar`).
    PathPrefix(String),
    /// Full-string match (anchored).
    Regex(Regex),
}

impl Serialize for StringMatcher {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match self {
            StringMatcher::Exact(v) => m.serialize_entry("exact", v)?,
            StringMatcher::Prefix(v) => m.serialize_entry("prefix", v)?,
            StringMatcher::PathPrefix(v) => m.serialize_entry("path_prefix", v)?,
            StringMatcher::Regex(r) => {
                let src = r.as_str();
                let src = src
                    .strip_prefix("^(?:")
                    .and_then(|x| x.strip_suffix(")$"))
                    .unwrap_or(src);
                m.serialize_entry("regex", src)?
            }
        }
        m.end()
    }
}

impl StringMatcher {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatcher::Exact(e) => e == v,
            StringMatcher::Prefix(p) => v.starts_with(p.as_str()),
            StringMatcher::PathPrefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty()
                    || (v.starts_with(p) && matches!(v.as_bytes().get(p.len()), None | Some(b'/')))
            }
            StringMatcher::Regex(r) => r.is_match(v),
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        match self {
            StringMatcher::Exact(e) => e.eq_ignore_ascii_case(v),
            StringMatcher::Prefix(p) => {
                v.len() >= p.len() && v.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            // As `matches` on the lowercased value, without allocating it.
            StringMatcher::PathPrefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty()
                    || (v.len() >= p.len()
                        && v.bytes()
                            .zip(p.bytes())
                            .all(|(a, b)| a.to_ascii_lowercase() == b)
                        && matches!(v.as_bytes().get(p.len()), None | Some(b'/')))
            }
            // Istio's ignoreUriCase applies to exact and prefix matches only.
            StringMatcher::Regex(r) => r.is_match(v),
        }
    }
}

/// One `match` entry: every set field must match.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpMatch {
    pub uri: Option<StringMatcher>,
    pub ignore_uri_case: bool,
    pub scheme: Option<StringMatcher>,
    pub method: Option<StringMatcher>,
    pub authority: Option<StringMatcher>,
    /// Lowercase header name → matcher (`None` = must be present).
    pub headers: Vec<(String, Option<StringMatcher>)>,
    pub without_headers: Vec<(String, Option<StringMatcher>)>,
    pub query_params: Vec<(String, Option<StringMatcher>)>,
    pub port: Option<u16>,
    pub source_labels: Labels,
    pub source_namespace: Option<String>,
}

impl HttpMatch {
    pub fn matches(&self, r: &HttpRequestInfo<'_>) -> bool {
        let (path, query) = split_path(r.path);
        self.matches_split(r, path, query, None)
    }

    /// [`HttpMatch::matches`] with `r.path` already split, and header names parsed once when
    /// `prepared` is given (the route index holds them).
    fn matches_split(
        &self,
        r: &HttpRequestInfo<'_>,
        path: &str,
        query: &str,
        prepared: Option<&index::PreparedMatch>,
    ) -> bool {
        if self.port.is_some_and(|p| p != r.port) {
            return false;
        }
        if let Some(u) = &self.uri {
            let ok = if self.ignore_uri_case {
                u.matches_ignore_case(path)
            } else {
                u.matches(path)
            };
            if !ok {
                return false;
            }
        }
        if self.method.as_ref().is_some_and(|m| !m.matches(r.method))
            || self.scheme.as_ref().is_some_and(|m| !m.matches(r.scheme))
        {
            return false;
        }
        if let Some(a) = &self.authority {
            let host = strip_port(r.authority);
            if !(a.matches(r.authority) || a.matches(host)) {
                return false;
            }
        }
        let header_ok = |without: bool, i: usize, (name, m): &(String, Option<StringMatcher>)| {
            let all = match prepared {
                Some(p) => match p.header(without, i) {
                    Some(n) => r.headers.get_all(n),
                    // Not a valid header name: no request carries it.
                    None => return false,
                },
                None => r.headers.get_all(name.as_str()),
            };
            let mut values = all.iter().filter_map(|v| v.to_str().ok());
            match m {
                None => values.next().is_some(),
                Some(m) => values.any(|v| m.matches(v)),
            }
        };
        if !self
            .headers
            .iter()
            .enumerate()
            .all(|(i, h)| header_ok(false, i, h))
            || self
                .without_headers
                .iter()
                .enumerate()
                .any(|(i, h)| header_ok(true, i, h))
        {
            return false;
        }
        for (name, m) in &self.query_params {
            let mut found = query.split('&').filter_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == name).then_some(v)
            });
            let ok = match m {
                None => found.next().is_some(),
                Some(m) => found.any(|v| m.matches(v)),
            };
            if !ok {
                return false;
            }
        }
        if let Some(ns) = &self.source_namespace
            && r.source_namespace != Some(ns.as_str())
        {
            return false;
        }
        labels_match(&self.source_labels, r.source_labels)
    }
}

/// `:path` → (path, query); the query is `""` when absent.
fn split_path(p: &str) -> (&str, &str) {
    p.split_once('?').unwrap_or((p, ""))
}

fn labels_match(want: &Labels, have: Option<&Labels>) -> bool {
    want.is_empty() || have.is_some_and(|h| want.iter().all(|(k, v)| h.get(k) == Some(v)))
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map(|(h, _)| &h[1..])
            .unwrap_or(authority);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => authority,
    }
}

/// Route destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destination {
    /// FQDN (short names already expanded to `<name>.<ns>.svc.cluster.local`).
    pub host: String,
    pub subset: Option<String>,
    /// `None` = the port the request came in on.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WeightedDestination {
    pub destination: Destination,
    /// Normalised share in percent (sums to 100 across the list, give or take rounding).
    pub weight: f64,
    pub headers: HeaderOps,
}

/// Destinations with cumulative weights.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Destinations {
    pub list: Vec<WeightedDestination>,
    #[serde(skip)]
    cumulative: Vec<u64>,
}

impl Destinations {
    /// Weights as written (`None` = unset). All unset → equal shares; some unset → unset ones get
    /// 0 (Istio requires all or none); all zero → none can be picked.
    pub(crate) fn new(items: Vec<(Destination, Option<u32>, HeaderOps)>) -> Destinations {
        let all_unset = items.iter().all(|(_, w, _)| w.is_none());
        let raw: Vec<u64> = items
            .iter()
            .map(|(_, w, _)| {
                if all_unset {
                    1
                } else {
                    u64::from(w.unwrap_or(0))
                }
            })
            .collect();
        let total: u64 = raw.iter().sum();
        let mut acc = 0;
        let cumulative = raw
            .iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        let list = items
            .into_iter()
            .zip(&raw)
            .map(|((destination, _, headers), w)| WeightedDestination {
                destination,
                weight: if total == 0 {
                    0.0
                } else {
                    *w as f64 * 100.0 / total as f64
                },
                headers,
            })
            .collect();
        Destinations { list, cumulative }
    }

    /// Picks by weight with a caller-supplied random number (pure, testable).
    pub fn pick(&self, random: u64) -> Option<&WeightedDestination> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let r = random % total;
        let i = self.cumulative.partition_point(|c| *c <= r);
        self.list.get(i)
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct HeaderOperations {
    /// Lowercase name, value.
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderOperations {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies remove, then set, then add (Envoy's order); invalid values are skipped (they were
    /// validated at compile time).
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name.as_str());
        }
        for (k, v) in &self.set {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                headers.insert(k, v);
            }
        }
        for (k, v) in &self.add {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                headers.append(k, v);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct HeaderOps {
    pub request: HeaderOperations,
    pub response: HeaderOperations,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Redirect {
    /// Replace the whole path.
    pub path: Option<String>,
    /// Replace the matched prefix (Gateway API ReplacePrefixMatch).
    pub prefix: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    /// Keep the request's port (`derivePort: FROM_REQUEST_PORT`).
    pub derive_port: bool,
    pub scheme: Option<String>,
    pub status: u16,
}

#[derive(Debug, Clone, Serialize)]
pub enum RouteAction {
    Forward(Destinations),
    Redirect(Redirect),
    DirectResponse { status: u16, body: Option<String> },
}

#[derive(Debug, Clone, Serialize)]
pub struct Rewrite {
    /// Replaces the matched prefix (prefix match) or the whole path (other matches).
    pub uri: Option<String>,
    /// Replaces the whole path regardless of the match (Gateway API ReplaceFullPath).
    pub full_path: Option<String>,
    pub authority: Option<String>,
    #[serde(serialize_with = "ser_regex_rewrite")]
    pub uri_regex: Option<(Regex, String)>,
}

fn ser_regex_rewrite<S: Serializer>(v: &Option<(Regex, String)>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some((r, w)) => s.collect_seq([r.as_str(), w.as_str()]),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    pub attempts: u32,
    #[serde(serialize_with = "duration::ser::opt")]
    pub per_try_timeout: Option<Duration>,
    /// Envoy retry-on conditions (`5xx`, `connect-failure`, …).
    pub retry_on: Vec<String>,
    /// Status codes listed in retryOn / HTTPRoute retry.codes.
    pub retriable_status: Vec<u16>,
    #[serde(serialize_with = "duration::ser::opt")]
    pub backoff: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDelay {
    #[serde(serialize_with = "duration::ser::one")]
    pub delay: Duration,
    /// 0–100.
    pub percentage: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum AbortStatus {
    Http(u16),
    Grpc(String),
    Http2Error(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultAbort {
    pub status: AbortStatus,
    pub percentage: f64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

impl Fault {
    /// Delay to inject for a roll uniformly drawn from [0, 100).
    pub fn delay_for(&self, roll: f64) -> Option<Duration> {
        self.delay
            .as_ref()
            .filter(|d| roll < d.percentage)
            .map(|d| d.delay)
    }

    /// Abort to inject for a roll uniformly drawn from [0, 100).
    pub fn abort_for(&self, roll: f64) -> Option<&AbortStatus> {
        self.abort
            .as_ref()
            .filter(|a| roll < a.percentage)
            .map(|a| &a.status)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Mirror {
    pub destination: Destination,
    /// 0–100.
    pub percentage: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRoute {
    pub name: Option<String>,
    pub origin: RouteOrigin,
    /// Empty: matches every request.
    pub matches: Vec<HttpMatch>,
    pub action: RouteAction,
    pub rewrite: Option<Rewrite>,
    #[serde(serialize_with = "duration::ser::opt")]
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    pub headers: HeaderOps,
}

/// A selected route and the match entry that selected it (`None` when the route has none).
#[derive(Debug, Clone, Copy)]
pub struct RouteMatch<'a> {
    pub route: &'a HttpRoute,
    pub matched: Option<&'a HttpMatch>,
}

impl<'a> RouteMatch<'a> {
    /// The path to send upstream after the route's rewrite (`None` = unchanged).
    pub fn rewritten_path(&self, path: &str) -> Option<String> {
        let rw = self.route.rewrite.as_ref()?;
        let (p, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let new = if let Some(full) = &rw.full_path {
            full.clone()
        } else if let Some((re, with)) = &rw.uri_regex {
            re.replace_all(p, with.as_str()).into_owned()
        } else if let Some(uri) = &rw.uri {
            match self.matched.and_then(|m| m.uri.as_ref()) {
                Some(StringMatcher::Prefix(pre)) if p.len() >= pre.len() => {
                    format!("{uri}{}", p.get(pre.len()..).unwrap_or(""))
                }
                Some(StringMatcher::PathPrefix(pre)) => {
                    let pre = pre.trim_end_matches('/');
                    let rest = p.get(pre.len()..).unwrap_or("");
                    let base = uri.trim_end_matches('/');
                    if rest.is_empty() {
                        if base.is_empty() {
                            "/".into()
                        } else {
                            base.to_owned()
                        }
                    } else {
                        format!("{base}{rest}")
                    }
                }
                _ => uri.clone(),
            }
        } else {
            return None;
        };
        Some(match query {
            Some(q) => format!("{new}?{q}"),
            None => new,
        })
    }
}

impl HttpRoute {
    fn select<'a>(&'a self, r: &HttpRequestInfo<'_>) -> Option<RouteMatch<'a>> {
        if self.matches.is_empty() {
            return Some(RouteMatch {
                route: self,
                matched: None,
            });
        }
        self.matches
            .iter()
            .find(|m| m.matches(r))
            .map(|m| RouteMatch {
                route: self,
                matched: Some(m),
            })
    }
}

/// TCP / TLS match entry.
#[derive(Debug, Clone, Default, Serialize)]
pub struct L4Match {
    pub port: Option<u16>,
    pub destination_subnets: Vec<IpNet>,
    /// TLS only: SNI patterns (`*.example.com` allowed).
    pub sni_hosts: Vec<String>,
    pub source_labels: Labels,
    pub source_namespace: Option<String>,
}

impl L4Match {
    pub fn matches(&self, r: &L4Info<'_>) -> bool {
        self.port.is_none_or(|p| p == r.port)
            && (self.destination_subnets.is_empty()
                || r.destination_ip
                    .is_some_and(|ip| self.destination_subnets.iter().any(|n| n.contains(&ip))))
            && (self.sni_hosts.is_empty()
                || r.sni.is_some_and(|sni| {
                    self.sni_hosts
                        .iter()
                        .any(|h| crate::hostmap::host_matches(h, sni))
                }))
            && self
                .source_namespace
                .as_ref()
                .is_none_or(|ns| r.source_namespace == Some(ns.as_str()))
            && labels_match(&self.source_labels, r.source_labels)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct L4Route {
    pub origin: RouteOrigin,
    pub matches: Vec<L4Match>,
    pub destinations: Destinations,
}

impl ServiceRoutes {
    /// First HTTP route that matches.
    pub fn select_http(&self, r: &HttpRequestInfo<'_>) -> Option<RouteMatch<'_>> {
        let (path, query) = split_path(r.path);
        match self.index.get(&self.http) {
            Some(idx) => idx.select(&self.http, r, path, query),
            None => self.select_http_linear(r),
        }
    }

    /// The reference semantics: every route in declaration order, no index.
    pub(crate) fn select_http_linear(&self, r: &HttpRequestInfo<'_>) -> Option<RouteMatch<'_>> {
        self.http.iter().find_map(|route| route.select(r))
    }

    pub fn select_tcp(&self, r: &L4Info<'_>) -> Option<&L4Route> {
        self.tcp
            .iter()
            .find(|t| t.matches.is_empty() || t.matches.iter().any(|m| m.matches(r)))
    }

    pub fn select_tls(&self, r: &L4Info<'_>) -> Option<&L4Route> {
        self.tls
            .iter()
            .find(|t| t.matches.is_empty() || t.matches.iter().any(|m| m.matches(r)))
    }

    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.tcp.is_empty() && self.tls.is_empty()
    }
}
