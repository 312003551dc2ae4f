//! Route planning: given a request and the routes of the service it reached, what to do
//! (pure; randomness is passed in).

use mesh_config::ServiceRoutes;
use mesh_config::route::{
    HeaderOps, HttpRequestInfo, HttpRoute, RouteAction, RouteMatch, StringMatcher,
};

use super::redirect;
use crate::observe::DEFAULT_ROUTE_NAME;

/// Where a forwarded request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest<'a> {
    /// Borrowed from the route (or the service): planning runs per request.
    pub host: &'a str,
    /// `None` = the port the request came in on.
    pub port: Option<u16>,
    pub subset: Option<&'a str>,
}

/// The decision for one request.
#[derive(Debug)]
pub enum Plan<'a> {
    /// Send it upstream. `route` is `None` when the service has no HTTP routes (the request goes
    /// to the service itself).
    Forward {
        route: Option<RouteMatch<'a>>,
        dest: Dest<'a>,
        /// Header operations of the chosen weighted destination.
        dest_headers: Option<&'a HeaderOps>,
    },
    /// Answer with a redirect.
    Redirect {
        route: RouteMatch<'a>,
        status: u16,
        location: String,
    },
    /// Answer directly.
    Direct {
        route: RouteMatch<'a>,
        status: u16,
        body: Option<String>,
    },
    /// Routes exist but none matches: Envoy's 404 `NR`.
    NoMatch,
    /// The matched route has no destination with weight: 503 `UH` (Envoy: no healthy upstream).
    NoDestination { route: RouteMatch<'a> },
}

impl Plan<'_> {
    /// `route_name` for the access log.
    pub fn route_name(&self) -> &str {
        let route = match self {
            Plan::Forward { route, .. } => route.as_ref(),
            Plan::Redirect { route, .. }
            | Plan::Direct { route, .. }
            | Plan::NoDestination { route } => Some(route),
            Plan::NoMatch => None,
        };
        route
            .and_then(|r| r.route.name.as_deref())
            .unwrap_or(DEFAULT_ROUTE_NAME)
    }
}

/// Plans `req` against `routes` (the VirtualService / HTTPRoute routes of `service_host`).
/// `random` picks the weighted destination.
pub fn plan<'a>(
    routes: Option<&'a ServiceRoutes>,
    service_host: &'a str,
    req: &HttpRequestInfo<'_>,
    random: u64,
) -> Plan<'a> {
    let Some(routes) = routes.filter(|r| !r.http.is_empty()) else {
        return Plan::Forward {
            route: None,
            dest: Dest {
                host: service_host,
                port: None,
                subset: None,
            },
            dest_headers: None,
        };
    };
    let Some(m) = routes.select_http(req) else {
        return Plan::NoMatch;
    };
    match &m.route.action {
        RouteAction::Forward(dests) => match dests.pick(random) {
            Some(w) => Plan::Forward {
                route: Some(m),
                dest: Dest {
                    host: &w.destination.host,
                    port: w.destination.port,
                    subset: w.destination.subset.as_deref(),
                },
                dest_headers: Some(&w.headers),
            },
            None => Plan::NoDestination { route: m },
        },
        RouteAction::Redirect(r) => {
            let matched_prefix = match m.matched.and_then(|mm| mm.uri.as_ref()) {
                Some(StringMatcher::Prefix(p)) | Some(StringMatcher::PathPrefix(p)) => {
                    Some(p.as_str())
                }
                _ => None,
            };
            Plan::Redirect {
                route: m,
                status: r.status,
                location: redirect::location(r, req, matched_prefix),
            }
        }
        RouteAction::DirectResponse { status, body } => Plan::Direct {
            route: m,
            status: *status,
            body: body.clone(),
        },
    }
}

/// The route, for callers holding a plan.
pub fn route_of<'a>(plan: &Plan<'a>) -> Option<&'a HttpRoute> {
    match plan {
        Plan::Forward { route, .. } => route.map(|r| r.route),
        Plan::Redirect { route, .. }
        | Plan::Direct { route, .. }
        | Plan::NoDestination { route } => Some(route.route),
        Plan::NoMatch => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use mesh_config::Snapshot;

    const CONFIG: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: istio-egress}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  http:
  - name: old
    match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - name: teapot
    match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
  - name: split
    match: [{uri: {prefix: /split}}]
    route:
    - destination: {host: aliyun.com}
      weight: 80
    - destination: {host: httpbin.org, port: {number: 80}}
      weight: 20
      headers: {request: {set: {x-split: b}}}
  - match: [{headers: {x-canary: {exact: "yes"}}}]
    route:
    - destination: {host: httpbin.org}
"#;

    fn snap() -> Snapshot {
        mesh_config::load_sources([("c.yaml", CONFIG)]).expect("valid config")
    }

    fn info<'a>(path: &'a str, headers: &'a HeaderMap) -> HttpRequestInfo<'a> {
        HttpRequestInfo {
            method: "GET",
            path,
            authority: "aliyun.com",
            scheme: "http",
            port: 80,
            headers,
            source_namespace: Some("default"),
            source_labels: None,
        }
    }

    fn describe(p: &Plan<'_>) -> String {
        match p {
            Plan::Forward { dest, .. } => format!("forward {} {:?}", dest.host, dest.port),
            Plan::Redirect {
                status, location, ..
            } => format!("redirect {status} {location}"),
            Plan::Direct { status, body, .. } => {
                format!("direct {status} {}", body.as_deref().unwrap_or(""))
            }
            Plan::NoMatch => "no match".into(),
            Plan::NoDestination { .. } => "no destination".into(),
        }
    }

    #[test]
    fn plans() {
        let s = snap();
        let routes = s.routes_for_host("aliyun.com");
        let none = HeaderMap::new();
        let mut canary = HeaderMap::new();
        canary.insert("x-canary", "yes".parse().expect("value"));
        let cases: [(&str, &HeaderMap, u64, &str, &str); 7] = [
            (
                "/old/page?q=1",
                &none,
                0,
                "redirect 302 http://aliyun.com/new?q=1",
                "old",
            ),
            ("/teapot", &none, 0, "direct 418 short and stout", "teapot"),
            // 80/20 over cumulative weights [80, 100).
            ("/split", &none, 0, "forward aliyun.com None", "split"),
            ("/split", &none, 79, "forward aliyun.com None", "split"),
            ("/split", &none, 80, "forward httpbin.org Some(80)", "split"),
            ("/other", &canary, 0, "forward httpbin.org None", "default"),
            ("/other", &none, 0, "no match", "default"),
        ];
        for (path, headers, random, want, name) in cases {
            let p = plan(
                routes.map(|r| r.as_ref()),
                "aliyun.com",
                &info(path, headers),
                random,
            );
            assert_eq!(describe(&p), want, "{path}");
            assert_eq!(p.route_name(), name, "{path}");
        }
        // A host without routes goes to itself.
        let p = plan(
            s.routes_for_host("httpbin.org").map(|r| r.as_ref()),
            "httpbin.org",
            &info("/", &none),
            0,
        );
        assert_eq!(describe(&p), "forward httpbin.org None");
    }

    #[test]
    fn weights_hold_over_many_picks() {
        let s = snap();
        let routes = s.routes_for_host("aliyun.com").map(|r| r.as_ref());
        let none = HeaderMap::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 10_000;
        let to_b = (0..n)
            .filter(|_| {
                matches!(plan(routes, "aliyun.com", &info("/split", &none), rng.u64(..)),
                    Plan::Forward { ref dest, .. } if dest.host == "httpbin.org")
            })
            .count();
        let share = to_b as f64 / n as f64;
        assert!((0.18..0.22).contains(&share), "{share}");
    }
}
