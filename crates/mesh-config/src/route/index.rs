//! Per-host HTTP route index, built once per [`ServiceRoutes`] on its first lookup.
//!
//! Istio picks the first route (in declaration order) with a matching `match` entry. With many
//! routes, testing each one per request dominates the cost, so the index files every route under
//! a cheap necessary condition of each of its match entries:
//!
//! * a case-sensitive exact path → the exact-path table;
//! * a path prefix (prefix, Gateway API PathPrefix, or the literal prefixes a regex's matches
//!   must start with) → the prefix table, probed once per distinct prefix length;
//! * otherwise an exact header value → that header's value table;
//! * otherwise (no cheap condition, or a route without matches) → `always`.
//!
//! A lookup merges the hit lists (each sorted by route position) and fully evaluates only those
//! routes, in ascending position, so the first matching route in declaration order still wins:
//! the index only skips routes none of whose match entries can apply.
//!
//! The index also holds what the matchers would otherwise recompute per request: header names
//! parsed into [`http::HeaderName`].
use super::{HttpMatch, HttpRequestInfo, HttpRoute, RouteMatch, StringMatcher};
use http::HeaderName;
use regex::Regex;
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use std::collections::HashMap;
use std::sync::OnceLock;

/// Hit lists merged per lookup without allocating; more than this (many header values or
/// prefix lengths hitting at once) falls back to a linear scan, which is always correct.
const MAX_LISTS: usize = 16;
/// Regexes whose prefix set is larger than this go to `always` (the set would cost more to
/// probe than it saves).
const MAX_REGEX_PREFIXES: usize = 16;

/// Lazily built index; cloning yields an empty cell so a clone whose `http` is then edited
/// (as the compiler does when merging VirtualServices) never sees a stale index.
#[derive(Default)]
pub(crate) struct IndexCell(OnceLock<HttpIndex>);

impl Clone for IndexCell {
    fn clone(&self) -> Self {
        IndexCell::default()
    }
}

impl std::fmt::Debug for IndexCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.get() {
            Some(i) => write!(f, "HttpIndex({} routes)", i.routes.len()),
            None => f.write_str("HttpIndex(unbuilt)"),
        }
    }
}

impl IndexCell {
    /// The index for `routes`, or `None` when it was built for a different route list (the
    /// public `http` field was replaced after the first lookup): callers then scan linearly.
    pub(crate) fn get(&self, routes: &[HttpRoute]) -> Option<&HttpIndex> {
        let idx = self.0.get_or_init(|| HttpIndex::build(routes));
        (idx.built_for == identity(routes)).then_some(idx)
    }
}

fn identity(routes: &[HttpRoute]) -> (usize, usize) {
    (routes.as_ptr() as usize, routes.len())
}

/// Header names of one match entry, parsed once (`None`: not a valid name, so never present).
pub(crate) struct PreparedMatch {
    headers: Box<[Option<HeaderName>]>,
    without_headers: Box<[Option<HeaderName>]>,
}

impl PreparedMatch {
    fn new(m: &HttpMatch) -> PreparedMatch {
        let parse = |v: &[(String, Option<StringMatcher>)]| {
            v.iter()
                .map(|(n, _)| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect()
        };
        PreparedMatch {
            headers: parse(&m.headers),
            without_headers: parse(&m.without_headers),
        }
    }

    pub(crate) fn header(&self, without: bool, i: usize) -> Option<&HeaderName> {
        let list = if without {
            &self.without_headers
        } else {
            &self.headers
        };
        list.get(i).and_then(Option::as_ref)
    }
}

type PosList = Box<[u32]>;
/// Header value → positions of the routes filed under it.
type ValueTable<L> = HashMap<Box<str>, L>;

/// The position lists a request hits, merged without allocating.
struct Hits<'a> {
    lists: [&'a [u32]; MAX_LISTS],
    n: usize,
    overflow: bool,
}

impl Default for Hits<'_> {
    fn default() -> Self {
        Hits {
            lists: [&[]; MAX_LISTS],
            n: 0,
            overflow: false,
        }
    }
}

impl<'a> Hits<'a> {
    fn add(&mut self, l: &'a [u32]) {
        match self.lists.get_mut(self.n) {
            Some(slot) => {
                *slot = l;
                self.n += 1;
            }
            None => self.overflow = true,
        }
    }
}

pub(crate) struct HttpIndex {
    built_for: (usize, usize),
    linear_only: bool,
    /// Per route, per match entry.
    routes: Box<[Box<[PreparedMatch]>]>,
    always: PosList,
    exact: HashMap<Box<[u8]>, PosList>,
    /// Distinct key lengths in `prefix`, ascending.
    prefix_lens: Box<[usize]>,
    prefix: HashMap<Box<[u8]>, PosList>,
    headers: Box<[(HeaderName, ValueTable<PosList>)]>,
}

/// The cheap necessary condition a match entry is filed under.
#[derive(Debug, PartialEq)]
enum Key {
    Always,
    Exact(Vec<u8>),
    Prefixes(Vec<Vec<u8>>),
    Header(HeaderName, String),
}

fn key_of(m: &HttpMatch) -> Key {
    match &m.uri {
        Some(StringMatcher::Exact(e)) if !m.ignore_uri_case => {
            return Key::Exact(e.as_bytes().to_vec());
        }
        Some(StringMatcher::Prefix(p)) if !m.ignore_uri_case && !p.is_empty() => {
            return Key::Prefixes(vec![p.as_bytes().to_vec()]);
        }
        Some(StringMatcher::PathPrefix(p)) if !m.ignore_uri_case => {
            let p = p.trim_end_matches('/');
            if !p.is_empty() {
                return Key::Prefixes(vec![p.as_bytes().to_vec()]);
            }
        }
        // ignoreUriCase does not apply to regexes (see `matches_ignore_case`).
        Some(StringMatcher::Regex(r)) => {
            if let Some(p) = regex_prefixes(r) {
                return Key::Prefixes(p);
            }
        }
        _ => {}
    }
    for (name, m) in &m.headers {
        if let Some(StringMatcher::Exact(v)) = m
            && let Ok(name) = HeaderName::from_bytes(name.as_bytes())
        {
            return Key::Header(name, v.clone());
        }
    }
    Key::Always
}

/// Literals every match of `r` starts with, or `None` when there is no useful finite set.
fn regex_prefixes(r: &Regex) -> Option<Vec<Vec<u8>>> {
    // Same defaults as `Regex::new`, so the parsed pattern is the one that runs.
    let hir = regex_syntax::parse(r.as_str()).ok()?;
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let mut lits: Vec<Vec<u8>> = seq
        .literals()?
        .iter()
        .map(|l| l.as_bytes().to_vec())
        .collect();
    // Classes expand into many literals (`/v[0-9]` → 10): shorten them all (a prefix of a
    // required prefix is still required) until the set is small.
    while lits.len() > MAX_REGEX_PREFIXES {
        let longest = lits.iter().map(Vec::len).max().unwrap_or(0);
        if longest <= 1 {
            return None;
        }
        for l in &mut lits {
            l.truncate(longest - 1);
        }
        lits.sort_unstable();
        lits.dedup();
    }
    // Empty set: the regex matches nothing; `always` leaves that decision to the regex.
    if lits.is_empty() || lits.iter().any(Vec::is_empty) {
        return None;
    }
    Some(lits)
}

fn push_pos(list: &mut Vec<u32>, pos: u32) {
    // Routes are visited in order, so a duplicate can only be the last entry.
    if list.last() != Some(&pos) {
        list.push(pos);
    }
}

fn freeze<K: std::hash::Hash + Eq>(m: HashMap<K, Vec<u32>>) -> HashMap<K, PosList> {
    m.into_iter()
        .map(|(k, v)| (k, v.into_boxed_slice()))
        .collect()
}

impl HttpIndex {
    fn build(routes: &[HttpRoute]) -> HttpIndex {
        let mut always = Vec::new();
        let mut exact: HashMap<Box<[u8]>, Vec<u32>> = HashMap::new();
        let mut prefix: HashMap<Box<[u8]>, Vec<u32>> = HashMap::new();
        let mut headers: Vec<(HeaderName, ValueTable<Vec<u32>>)> = Vec::new();
        // Positions are u32 to keep the lists small; more routes than that per host is not a
        // real configuration, and is scanned linearly.
        let linear_only = u32::try_from(routes.len()).is_err();
        for (pos, route) in routes.iter().enumerate() {
            let Ok(pos) = u32::try_from(pos) else {
                break;
            };
            if route.matches.is_empty() {
                push_pos(&mut always, pos);
            }
            for m in &route.matches {
                match key_of(m) {
                    Key::Always => push_pos(&mut always, pos),
                    Key::Exact(e) => push_pos(exact.entry(e.into()).or_default(), pos),
                    Key::Prefixes(ps) => {
                        for p in ps {
                            push_pos(prefix.entry(p.into()).or_default(), pos);
                        }
                    }
                    Key::Header(name, value) => {
                        let i = match headers.iter().position(|(n, _)| *n == name) {
                            Some(i) => i,
                            None => {
                                headers.push((name, HashMap::new()));
                                headers.len() - 1
                            }
                        };
                        push_pos(headers[i].1.entry(value.into()).or_default(), pos);
                    }
                }
            }
        }
        let mut prefix_lens: Vec<usize> = prefix.keys().map(|k| k.len()).collect();
        prefix_lens.sort_unstable();
        prefix_lens.dedup();
        HttpIndex {
            built_for: identity(routes),
            linear_only,
            routes: routes
                .iter()
                .map(|r| r.matches.iter().map(PreparedMatch::new).collect())
                .collect(),
            always: always.into_boxed_slice(),
            exact: freeze(exact),
            prefix_lens: prefix_lens.into_boxed_slice(),
            prefix: freeze(prefix),
            headers: headers.into_iter().map(|(n, m)| (n, freeze(m))).collect(),
        }
    }

    /// First matching route, in declaration order. `path` / `query` are `r.path` split at `?`.
    pub(crate) fn select<'a>(
        &self,
        routes: &'a [HttpRoute],
        r: &HttpRequestInfo<'_>,
        path: &str,
        query: &str,
    ) -> Option<RouteMatch<'a>> {
        if self.linear_only {
            return self.select_linear(routes, r, path, query);
        }
        let mut hits = Hits::default();
        hits.add(&self.always);
        let p = path.as_bytes();
        if !self.exact.is_empty()
            && let Some(l) = self.exact.get(p)
        {
            hits.add(l);
        }
        for &len in self.prefix_lens.iter() {
            let Some(head) = p.get(..len) else { break };
            if let Some(l) = self.prefix.get(head) {
                hits.add(l);
            }
        }
        for (name, values) in self.headers.iter() {
            for v in r.headers.get_all(name) {
                if let Some(l) = v.to_str().ok().and_then(|v| values.get(v)) {
                    hits.add(l);
                }
            }
        }
        if hits.overflow {
            return self.select_linear(routes, r, path, query);
        }
        let lists = &mut hits.lists[..hits.n];
        loop {
            let next = lists.iter().filter_map(|l| l.first()).min().copied()?;
            for l in lists.iter_mut() {
                if let Some((&head, rest)) = l.split_first()
                    && head == next
                {
                    *l = rest;
                }
            }
            if let Some(m) = self.try_route(routes, next as usize, r, path, query) {
                return Some(m);
            }
        }
    }

    /// Every route in order with the prepared matchers (for overflowing lookups and tests).
    pub(crate) fn select_linear<'a>(
        &self,
        routes: &'a [HttpRoute],
        r: &HttpRequestInfo<'_>,
        path: &str,
        query: &str,
    ) -> Option<RouteMatch<'a>> {
        (0..routes.len()).find_map(|i| self.try_route(routes, i, r, path, query))
    }

    fn try_route<'a>(
        &self,
        routes: &'a [HttpRoute],
        pos: usize,
        r: &HttpRequestInfo<'_>,
        path: &str,
        query: &str,
    ) -> Option<RouteMatch<'a>> {
        let route = routes.get(pos)?;
        if route.matches.is_empty() {
            return Some(RouteMatch {
                route,
                matched: None,
            });
        }
        let prepared = self.routes.get(pos)?;
        route
            .matches
            .iter()
            .zip(prepared.iter())
            .find(|(m, p)| m.matches_split(r, path, query, Some(p)))
            .map(|(m, _)| RouteMatch {
                route,
                matched: Some(m),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{RouteAction, ServiceRoutes};
    use crate::snapshot::NamespacedName;
    use proptest::prelude::*;

    fn route(name: String, matches: Vec<HttpMatch>) -> HttpRoute {
        HttpRoute {
            name: Some(name),
            origin: super::super::RouteOrigin::VirtualService(NamespacedName::new("ns", "vs")),
            matches,
            action: RouteAction::DirectResponse {
                status: 200,
                body: None,
            },
            rewrite: None,
            timeout: None,
            retries: None,
            fault: None,
            mirrors: Vec::new(),
            headers: Default::default(),
        }
    }

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        headers: &'a http::HeaderMap,
    ) -> HttpRequestInfo<'a> {
        HttpRequestInfo {
            method,
            path,
            authority: "h.example",
            scheme: "http",
            port: 80,
            headers,
            source_namespace: None,
            source_labels: None,
        }
    }

    /// (route position, match position) — what must not change between indexed and linear.
    fn pick(sr: &ServiceRoutes, m: Option<RouteMatch<'_>>) -> Option<(usize, Option<usize>)> {
        m.map(|m| {
            let r = sr
                .http
                .iter()
                .position(|x| std::ptr::eq(x, m.route))
                .expect("route from this table");
            let i = m
                .matched
                .map(|mm| m.route.matches.iter().position(|x| std::ptr::eq(x, mm)))
                .map(|p| p.expect("match from this route"));
            (r, i)
        })
    }

    // Small alphabets so that generated requests often hit generated routes.
    const PATHS: &[&str] = &[
        "/",
        "/a",
        "/a/",
        "/a/b",
        "/A/b",
        "/ab",
        "/b/c",
        "/v1/x",
        "/v22/y",
        "/a/b?q=1",
        "/x?dbg=1&q",
    ];
    const SEGS: &[&str] = &["", "/", "/a", "/a/", "/A", "/ab", "/b", "/v1"];
    const REGEXES: &[&str] = &[
        "/v[0-9]+/.*",
        "/a|/b/c",
        ".*b",
        "(/a)?/b.*",
        "/(?i)ab",
        "[/x]+.*",
    ];
    const VALUES: &[&str] = &["1", "2", "t1"];

    fn string_matcher() -> impl Strategy<Value = StringMatcher> {
        prop_oneof![
            prop::sample::select(SEGS).prop_map(|s| StringMatcher::Exact(s.into())),
            prop::sample::select(SEGS).prop_map(|s| StringMatcher::Prefix(s.into())),
            prop::sample::select(SEGS).prop_map(|s| StringMatcher::PathPrefix(s.into())),
            prop::sample::select(REGEXES).prop_map(|s| StringMatcher::Regex(re(s))),
        ]
    }

    fn value_matcher() -> impl Strategy<Value = Option<StringMatcher>> {
        prop_oneof![
            Just(None),
            prop::sample::select(VALUES).prop_map(|v| Some(StringMatcher::Exact(v.into()))),
            Just(Some(StringMatcher::Prefix("t".into()))),
        ]
    }

    fn http_match() -> impl Strategy<Value = HttpMatch> {
        (
            prop::option::of(string_matcher()),
            prop::bool::weighted(0.2),
            prop::option::of(prop::sample::select(&["GET", "POST"][..])),
            prop::collection::vec(
                (prop::sample::select(&["x-a", "x-b"][..]), value_matcher()),
                0..3,
            ),
            prop::collection::vec((prop::sample::select(&["x-b"][..]), value_matcher()), 0..2),
            prop::collection::vec(
                (prop::sample::select(&["q", "dbg"][..]), value_matcher()),
                0..2,
            ),
        )
            .prop_map(|(uri, ignore_uri_case, method, headers, without, query)| {
                HttpMatch {
                    uri,
                    ignore_uri_case,
                    method: method.map(|m| StringMatcher::Exact(m.into())),
                    headers: headers.into_iter().map(|(n, m)| (n.into(), m)).collect(),
                    without_headers: without.into_iter().map(|(n, m)| (n.into(), m)).collect(),
                    query_params: query.into_iter().map(|(n, m)| (n.into(), m)).collect(),
                    ..Default::default()
                }
            })
    }

    fn routes() -> impl Strategy<Value = Vec<HttpRoute>> {
        prop::collection::vec(prop::collection::vec(http_match(), 0..4), 1..40).prop_map(|rs| {
            rs.into_iter()
                .enumerate()
                .map(|(i, m)| route(format!("r{i}"), m))
                .collect()
        })
    }

    fn header_map(h: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut m = http::HeaderMap::new();
        for (k, v) in h {
            m.append(*k, http::HeaderValue::from_static(v));
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        /// The index only prunes: the route (and match entry) picked is the linear scan's.
        #[test]
        fn indexed_equals_linear(
            http in routes(),
            reqs in prop::collection::vec((
                prop::sample::select(&["GET", "POST"][..]),
                prop::sample::select(PATHS),
                prop::collection::vec((prop::sample::select(&["x-a", "x-b"][..]), prop::sample::select(VALUES)), 0..3),
            ), 1..16),
        ) {
            let sr = ServiceRoutes { http, ..Default::default() };
            for (method, path, h) in reqs {
                let h = header_map(&h);
                let r = req(method, path, &h);
                prop_assert_eq!(
                    pick(&sr, sr.select_http(&r)),
                    pick(&sr, sr.select_http_linear(&r)),
                    "{} {} {:?}", method, path, h
                );
            }
        }
    }

    #[test]
    fn first_match_in_order_wins_across_buckets() {
        let m = |uri: Option<StringMatcher>, header: Option<(&str, &str)>| HttpMatch {
            uri,
            headers: header
                .map(|(n, v)| vec![(n.to_owned(), Some(StringMatcher::Exact(v.to_owned())))])
                .unwrap_or_default(),
            ..Default::default()
        };
        let sr = ServiceRoutes {
            http: vec![
                route(
                    "exact".into(),
                    vec![m(Some(StringMatcher::Exact("/x/y".into())), None)],
                ),
                route("header".into(), vec![m(None, Some(("x-t", "1")))]),
                route(
                    "prefix".into(),
                    vec![m(Some(StringMatcher::Prefix("/x/".into())), None)],
                ),
                route(
                    "regex".into(),
                    vec![m(Some(StringMatcher::Regex(re("/x/[0-9]+"))), None)],
                ),
                route("catch-all".into(), Vec::new()),
                route(
                    "unreachable".into(),
                    vec![m(Some(StringMatcher::Exact("/z".into())), None)],
                ),
            ],
            ..Default::default()
        };
        let none = http::HeaderMap::new();
        let t1 = header_map(&[("x-t", "0"), ("x-t", "1")]);
        let cases = [
            ("/x/y", &t1, "exact"),
            ("/x/7", &t1, "header"),
            ("/x/7?q", &none, "prefix"),
            ("/y", &none, "catch-all"),
            ("/z", &none, "catch-all"),
        ];
        for (path, h, want) in cases {
            let got = sr
                .select_http(&req("GET", path, h))
                .map(|m| m.route.name.clone());
            assert_eq!(got, Some(Some(want.to_owned())), "{path}");
        }
    }

    #[test]
    fn overflow_and_replaced_routes_stay_correct() {
        // 20 distinct prefix lengths all hit by one path: more lists than the merge holds.
        let mut http: Vec<HttpRoute> = (1..=20)
            .map(|n| {
                let p = format!("/{}", "a".repeat(n));
                let m = HttpMatch {
                    uri: Some(StringMatcher::Prefix(p.clone())),
                    method: Some(StringMatcher::Exact("POST".into())),
                    ..Default::default()
                };
                route(p, vec![m])
            })
            .collect();
        http.push(route("last".into(), Vec::new()));
        let mut sr = ServiceRoutes {
            http,
            ..Default::default()
        };
        let h = http::HeaderMap::new();
        let path = format!("/{}", "a".repeat(30));
        let name = |sr: &ServiceRoutes, method| {
            sr.select_http(&req(method, &path, &h))
                .and_then(|m| m.route.name.clone())
        };
        assert_eq!(name(&sr, "GET").as_deref(), Some("last"));
        assert_eq!(name(&sr, "POST").as_deref(), Some("/a"));
        // Replacing the routes after the index was built must not use the stale index.
        sr.http = vec![route("new".into(), Vec::new())];
        assert_eq!(name(&sr, "POST").as_deref(), Some("new"));
        let clone = sr.clone();
        assert_eq!(name(&clone, "POST").as_deref(), Some("new"));
    }

    fn re(s: &str) -> Regex {
        Regex::new(&format!("^(?:{s})$")).unwrap()
    }

    #[test]
    fn regex_prefix_sets() {
        let lits = |s: &str| {
            regex_prefixes(&re(s)).map(|v| {
                v.into_iter()
                    .map(|l| String::from_utf8(l).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        let api = lits("/api/v[0-9]+/t009/.*").unwrap();
        assert_eq!(api.len(), 10);
        assert!(api.iter().all(|l| l.starts_with("/api/v")), "{api:?}");
        assert_eq!(lits("/[a-z]x/.*"), Some(vec!["/".into()]));
        let mut ab = lits("/a/x|/b/y.*").unwrap();
        ab.sort();
        assert_eq!(ab, ["/a/x", "/b/y"]);
        assert_eq!(lits(".*/private"), None);
        let mut xy = lits("(/x)?/y").unwrap();
        xy.sort();
        assert_eq!(xy, ["/x/y", "/y"]);
        assert_eq!(
            lits("(/z)?"),
            None,
            "a regex that matches \"\" has no required prefix"
        );
    }
}
