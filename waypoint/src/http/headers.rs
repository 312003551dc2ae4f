//! Header handling shared by the pipeline: hop-by-hop headers, `x-request-id`, the proxy's own
//! response headers.

use http::header::{
    CONNECTION, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method, Version};
use telemetry::LogStr;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_ENVOY_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");

/// The fixed hop-by-hop names; `TE` is handled apart (`te: trailers` survives).
const HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

/// Removes connection-specific headers (RFC 9110 §7.6.1), including those named by
/// `Connection`. `te: trailers` survives (gRPC needs it).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present rather than a hash lookup per hop-by-hop name (this runs
    // twice per request): most messages carry none, or only `connection: keep-alive`.
    let (mut present, mut te) = (0u8, false);
    for k in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present |= 1 << i;
        }
        te |= k == TE;
    }
    if present != 0 {
        // Headers `Connection` names, matched against the names present (no parsing and no
        // allocation for a named header that is absent, like `keep-alive` usually is).
        let named: Vec<HeaderName> = headers
            .keys()
            .filter(|k| {
                headers
                    .get_all(CONNECTION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .any(|n| n.trim().eq_ignore_ascii_case(k.as_str()))
            })
            .cloned()
            .collect();
        for name in named {
            headers.remove(name);
        }
        for (i, name) in HOP_BY_HOP.into_iter().enumerate() {
            if present & (1 << i) != 0 {
                headers.remove(name);
            }
        }
    }
    if te {
        let te_trailers = headers
            .get(TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
        headers.remove(TE);
        if te_trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` + `Upgrade`), e.g.
/// `websocket`. `h2c` is not offered upstream: the waypoint speaks HTTP/2 by prior knowledge.
pub fn upgrade_protocol(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let proto = headers.get(UPGRADE)?;
    let h2c = proto
        .to_str()
        .is_ok_and(|p| p.trim().eq_ignore_ascii_case("h2c"));
    (asks && !h2c).then(|| proto.clone())
}

/// The request's `x-request-id`, generated (UUID v4) when absent or unusable (not text, or
/// empty). The value is the header's own (shared bytes), so logging it copies nothing.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers
        .get(X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.to_str().is_ok())
    {
        return id.clone();
    }
    let uuid = uuid_v4(fastrand::u128(..));
    // Hex digits and dashes only: always a valid header value.
    let id = HeaderValue::from_bytes(&uuid).unwrap_or(HeaderValue::from_static(""));
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// Formats 128 random bits as an RFC 9562 version-4 UUID (lower-case hex, on the stack: one is
/// made per request).
pub fn uuid_v4(random: u128) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = (random & !(0xF << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let mut out = [b'-'; 36];
    let mut nibble = 32;
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        nibble -= 1;
        // Masked to 4 bits: a valid index.
        *slot = HEX[((b >> (nibble * 4)) & 0xF) as usize];
    }
    out
}

/// `%REQ(:METHOD)%`: the standard methods are constants, so logging them copies nothing.
pub fn method_name(m: &Method) -> LogStr {
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::PATCH, "PATCH"),
        (Method::TRACE, "TRACE"),
    ];
    match STANDARD.iter().find(|(s, _)| s == m) {
        Some((_, name)) => (*name).into(),
        None => m.as_str().to_owned().into(),
    }
}

/// `%PROTOCOL%`.
pub fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// Whether the request is gRPC (`content-type: application/grpc...`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Header value of a string we built, skipping values HTTP cannot carry.
pub fn value(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_static(v));
            }
            m
        };
        let ws = h(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(
            upgrade_protocol(Version::HTTP_11, &ws),
            Some(HeaderValue::from_static("websocket"))
        );
        // HTTP/2 has no Upgrade; h2c is not forwarded; both headers are needed.
        assert_eq!(upgrade_protocol(Version::HTTP_2, &ws), None);
        let h2c = h(&[("connection", "upgrade"), ("upgrade", "h2c")]);
        assert_eq!(upgrade_protocol(Version::HTTP_11, &h2c), None);
        let no_conn = h(&[("upgrade", "websocket")]);
        assert_eq!(upgrade_protocol(Version::HTTP_11, &no_conn), None);
        let no_proto = h(&[("connection", "upgrade")]);
        assert_eq!(upgrade_protocol(Version::HTTP_11, &no_proto), None);
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        // (headers in, headers left, sorted)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case<'_>] = &[
            (
                &[
                    ("connection", "keep-alive, x-secret"),
                    ("keep-alive", "timeout=5"),
                    ("x-secret", "1"),
                    ("te", "trailers, deflate"),
                    ("transfer-encoding", "chunked"),
                    ("upgrade", "h2c"),
                    ("x-kept", "yes"),
                ],
                &["te: trailers", "x-kept: yes"],
            ),
            // None present: untouched.
            (
                &[("host", "a"), ("x-kept", "yes")],
                &["host: a", "x-kept: yes"],
            ),
            // The usual response: `connection: keep-alive`, no keep-alive header.
            (
                &[("server", "nginx"), ("connection", "keep-alive")],
                &["server: nginx"],
            ),
            // Names in `Connection` match case-insensitively, across repeated headers.
            (
                &[
                    ("connection", "X-Secret"),
                    ("connection", " x-other ,close"),
                    ("x-secret", "1"),
                    ("x-other", "2"),
                    ("x-kept", "yes"),
                ],
                &["x-kept: yes"],
            ),
            (
                &[
                    ("proxy-connection", "keep-alive"),
                    ("proxy-authorization", "Basic x"),
                    ("proxy-authenticate", "Basic"),
                    ("x-kept", "yes"),
                ],
                &["x-kept: yes"],
            ),
            // `te` without `trailers` goes; with it, only `trailers` stays.
            (&[("te", "deflate"), ("x-kept", "yes")], &["x-kept: yes"]),
            (&[("te", "Trailers")], &["te: trailers"]),
        ];
        for (input, want) in cases {
            let mut h = HeaderMap::new();
            for (k, v) in *input {
                h.append(*k, v.parse().expect("value"));
            }
            remove_hop_by_hop(&mut h);
            let mut left: Vec<_> = h
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("")))
                .collect();
            left.sort();
            assert_eq!(left, *want, "{input:?}");
        }
    }

    #[test]
    fn method_names() {
        for m in [
            "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "CONNECT", "PATCH",
        ] {
            let method = Method::from_bytes(m.as_bytes()).expect("method");
            assert_eq!(method_name(&method), m);
        }
        let custom = Method::from_bytes(b"PURGE").expect("method");
        assert_eq!(method_name(&custom), "PURGE");
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, "abc".parse().expect("value"));
        assert_eq!(ensure_request_id(&mut h), "abc");
        // Empty or opaque ids are replaced.
        for bad in [&b""[..], &b"\xff"[..]] {
            let mut h = HeaderMap::new();
            h.insert(X_REQUEST_ID, HeaderValue::from_bytes(bad).expect("value"));
            let id = ensure_request_id(&mut h);
            assert_eq!(id.len(), 36);
            assert_eq!(h.get(X_REQUEST_ID), Some(&id));
        }
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(h.get(X_REQUEST_ID), Some(&id));
        assert_eq!(h.len(), 1);
        let text = |b: [u8; 36]| String::from_utf8(b.to_vec()).expect("ascii");
        assert_eq!(text(uuid_v4(0)), "00000000-0000-4000-8000-000000000000");
        assert_eq!(
            text(uuid_v4(u128::MAX)),
            "ffffffff-ffff-4fff-bfff-ffffffffffff"
        );
        assert_eq!(
            text(uuid_v4(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef)),
            "01234567-89ab-4def-8123-456789abcdef"
        );
    }
}
