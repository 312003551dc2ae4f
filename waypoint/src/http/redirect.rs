//! The `Location` of a VirtualService `redirect` / HTTPRoute `RequestRedirect` (pure).

use mesh_config::route::{HttpRequestInfo, Redirect};

use crate::upstream::endpoints::strip_port;

fn default_port(scheme: &str) -> u16 {
    if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    }
}

/// Builds the redirect target from the request. `matched_prefix` is the route's matched path
/// prefix (for Gateway API `ReplacePrefixMatch`).
///
/// * scheme: the redirect's, else the request's;
/// * host: the redirect's authority, else the request's host;
/// * port: the redirect's port, else the request's when `derivePort: FROM_REQUEST_PORT`, else
///   the request's own `Host` port when neither scheme nor authority changed; omitted when it
///   is the scheme's default;
/// * path: replaced whole (`uri` / `ReplaceFullPath`) or by prefix; the query is kept.
pub fn location(r: &Redirect, req: &HttpRequestInfo<'_>, matched_prefix: Option<&str>) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(req.scheme);
    let req_host = strip_port(req.authority);
    let host = r.authority.as_deref().unwrap_or(req_host);
    let authority_port = req
        .authority
        .rsplit_once(':')
        .filter(|(h, _)| !h.ends_with(':') && (h.starts_with('[') || !h.contains(':')))
        .and_then(|(_, p)| p.parse::<u16>().ok());
    let port = r.port.or_else(|| {
        if r.derive_port {
            Some(req.port)
        } else if r.scheme.is_none() && r.authority.is_none() {
            authority_port
        } else {
            None
        }
    });
    let (path, query) = match req.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path, None),
    };
    let new_path = if let Some(full) = &r.path {
        full.clone()
    } else if let (Some(with), Some(prefix)) = (&r.prefix, matched_prefix) {
        let rest = path.get(prefix.trim_end_matches('/').len()..).unwrap_or("");
        let base = with.trim_end_matches('/');
        match (base.is_empty(), rest.is_empty()) {
            (true, true) => "/".to_owned(),
            (_, true) => base.to_owned(),
            (_, false) => format!("{base}{rest}"),
        }
    } else {
        path.to_owned()
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let mut out = format!("{scheme}://{host}");
    if let Some(p) = port.filter(|p| *p != default_port(scheme)) {
        out.push_str(&format!(":{p}"));
    }
    out.push_str(&new_path);
    // A path given with its own query replaces the request's (Envoy's path_redirect rule).
    if let Some(q) = query.filter(|_| !new_path.contains('?')) {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn redirect(
        path: Option<&str>,
        prefix: Option<&str>,
        authority: Option<&str>,
        port: Option<u16>,
        derive: bool,
        scheme: Option<&str>,
    ) -> Redirect {
        Redirect {
            path: path.map(str::to_owned),
            prefix: prefix.map(str::to_owned),
            authority: authority.map(str::to_owned),
            port,
            derive_port: derive,
            scheme: scheme.map(str::to_owned),
            status: 301,
        }
    }

    #[test]
    fn locations() {
        let h = HeaderMap::new();
        let req = |authority: &'static str, path: &'static str| HttpRequestInfo {
            method: "GET",
            path,
            authority,
            scheme: "http",
            port: 80,
            headers: &h,
            source_namespace: None,
            source_labels: None,
        };
        let cases: Vec<(Redirect, HttpRequestInfo<'_>, Option<&str>, &str)> = vec![
            // The seeds' upgrade: http://aliyun.com/ → https://aliyun.com/.
            (
                redirect(None, None, None, None, false, Some("https")),
                req("aliyun.com", "/"),
                None,
                "https://aliyun.com/",
            ),
            (
                redirect(Some("/new"), None, None, None, false, None),
                req("aliyun.com", "/old?a=1"),
                None,
                "http://aliyun.com/new?a=1",
            ),
            (
                redirect(Some("/new?b=2"), None, None, None, false, None),
                req("aliyun.com", "/old?a=1"),
                None,
                "http://aliyun.com/new?b=2",
            ),
            (
                redirect(None, None, Some("www.aliyun.com"), None, false, None),
                req("aliyun.com:8080", "/x"),
                None,
                "http://www.aliyun.com/x",
            ),
            (
                redirect(None, None, None, None, false, None),
                req("aliyun.com:8080", "/x"),
                None,
                "http://aliyun.com:8080/x",
            ),
            (
                redirect(None, None, None, Some(8443), false, Some("https")),
                req("aliyun.com", "/"),
                None,
                "https://aliyun.com:8443/",
            ),
            (
                redirect(None, None, None, Some(443), false, Some("https")),
                req("aliyun.com", "/"),
                None,
                "https://aliyun.com/",
            ),
            (
                redirect(None, None, Some("b.example"), None, true, None),
                req("aliyun.com", "/"),
                None,
                "http://b.example/",
            ),
            (
                redirect(None, Some("/v2"), None, None, false, None),
                req("aliyun.com", "/v1/items?x"),
                Some("/v1"),
                "http://aliyun.com/v2/items?x",
            ),
            (
                redirect(None, Some("/"), None, None, false, None),
                req("aliyun.com", "/v1"),
                Some("/v1"),
                "http://aliyun.com/",
            ),
            (
                redirect(None, None, None, None, false, None),
                req("[fd00::1]:8080", "/"),
                None,
                "http://[fd00::1]:8080/",
            ),
        ];
        for (i, (r, rq, prefix, want)) in cases.iter().enumerate() {
            assert_eq!(location(r, rq, *prefix), *want, "case {i}");
        }
    }
}
