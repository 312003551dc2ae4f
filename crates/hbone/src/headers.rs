//! The CONNECT target and the headers Istio puts on HBONE requests: `forwarded` (RFC 7239),
//! `baggage` (W3C Baggage, Istio's keys) and `traceparent` (W3C Trace Context).

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// `forwarded: for="<client ip:port>";host=<service hostname>`.
pub const FORWARDED: HeaderName = http::header::FORWARDED;
/// `baggage: k8s.namespace.name=...,k8s.deployment.name=...,service.name=...`.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// `traceparent: 00-<32 hex>-<16 hex>-<2 hex>`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A header value this crate could not parse or build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    #[error("CONNECT authority {authority:?}: {reason}")]
    Authority {
        authority: String,
        reason: &'static str,
    },
    #[error("forwarded header {value:?}: {reason}")]
    Forwarded { value: String, reason: &'static str },
    #[error("traceparent {value:?}: {reason}")]
    TraceParent { value: String, reason: &'static str },
    #[error("{header} header is not visible ASCII")]
    NotAscii { header: &'static str },
}

/// Parses a CONNECT `:authority`: exactly an IP literal and a non-zero port (`10.0.0.1:80`,
/// `[fd00::1]:443`). HBONE targets are addresses, never host names.
pub fn parse_authority(authority: &str) -> Result<SocketAddr, HeaderError> {
    let err = |reason| HeaderError::Authority {
        authority: authority.to_owned(),
        reason,
    };
    // std accepts "[fe80::1%2]:80"; a scope id means nothing to the peer, so it is refused.
    if authority.contains('%') {
        return Err(err("zone identifiers are not allowed"));
    }
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| err("not an ip:port socket address"))?;
    if addr.port() == 0 {
        return Err(err("port 0"));
    }
    Ok(addr)
}

/// `tchar` of RFC 9110 §5.6.2: what a `token` may contain.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// Writes `value` as a token when it is one, else as a quoted-string.
fn push_token_or_quoted(out: &mut String, value: &str) {
    if !value.is_empty() && value.chars().all(is_tchar) {
        out.push_str(value);
    } else {
        out.push('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
}

/// The `for=` node of a `forwarded` element (RFC 7239 §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardedNode {
    /// `for="10.0.0.1:34567"` / `for="[fd00::1]:34567"`: what Istio sends.
    Addr(SocketAddr),
    /// `for=10.0.0.1` / `for="[fd00::1]"`.
    Ip(IpAddr),
    /// `unknown`, an obfuscated identifier, or a node we cannot interpret.
    Other(String),
}

impl ForwardedNode {
    fn parse(v: &str) -> Self {
        if let Ok(addr) = v.parse::<SocketAddr>() {
            return ForwardedNode::Addr(addr);
        }
        let ip = v
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(v);
        match ip.parse::<IpAddr>() {
            Ok(ip) => ForwardedNode::Ip(ip),
            Err(_) => ForwardedNode::Other(v.to_owned()),
        }
    }

    /// The client IP, when the node carries one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            ForwardedNode::Addr(a) => Some(a.ip()),
            ForwardedNode::Ip(ip) => Some(*ip),
            ForwardedNode::Other(_) => None,
        }
    }
}

impl fmt::Display for ForwardedNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardedNode::Addr(a) => write!(f, "{a}"),
            ForwardedNode::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            ForwardedNode::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            ForwardedNode::Other(s) => f.write_str(s),
        }
    }
}

/// One `forwarded` element: the original client (`for=`) and the service host name (`host=`).
///
/// Istio's ztunnel sends `forwarded: for="<client ip:port>";host=<service hostname>` (the
/// `host` pair only when the destination is a known service).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub for_node: Option<ForwardedNode>,
    pub host: Option<String>,
}

impl Forwarded {
    /// `for="<client>"`.
    pub fn new(client: SocketAddr) -> Self {
        Forwarded {
            for_node: Some(ForwardedNode::Addr(client)),
            host: None,
        }
    }

    /// Adds `host=<service hostname>`.
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// The client's socket address, when `for=` carried one.
    pub fn client_addr(&self) -> Option<SocketAddr> {
        match self.for_node {
            Some(ForwardedNode::Addr(a)) => Some(a),
            _ => None,
        }
    }

    /// The header value, e.g. `for="10.0.0.1:34567";host=svc.ns.svc.cluster.local`.
    pub fn to_header_value(&self) -> Result<HeaderValue, HeaderError> {
        let mut out = String::new();
        if let Some(node) = &self.for_node {
            out.push_str("for=");
            push_token_or_quoted(&mut out, &node.to_string());
        }
        if let Some(host) = &self.host {
            if !out.is_empty() {
                out.push(';');
            }
            out.push_str("host=");
            push_token_or_quoted(&mut out, host);
        }
        HeaderValue::try_from(out).map_err(|_| HeaderError::NotAscii {
            header: "forwarded",
        })
    }

    /// Parses the first element of a `forwarded` value (RFC 7239 §4): the one the first proxy
    /// wrote, i.e. the original client. Pairs other than `for` and `host` are ignored.
    pub fn parse(value: &str) -> Result<Self, HeaderError> {
        let err = |reason| HeaderError::Forwarded {
            value: value.to_owned(),
            reason,
        };
        let mut parsed = Forwarded::default();
        let mut rest = value.trim_start_matches([' ', '\t']);
        let mut seen_for = false;
        let mut seen_host = false;
        loop {
            // forwarded-pair = token "=" value
            let name_len = rest.find(|c: char| !is_tchar(c)).unwrap_or(rest.len());
            if name_len == 0 {
                return Err(err("expected a parameter name"));
            }
            let name = &rest[..name_len];
            rest = rest[name_len..]
                .strip_prefix('=')
                .ok_or_else(|| err("expected '=' after a parameter name"))?;
            let v;
            if let Some(quoted) = rest.strip_prefix('"') {
                let mut s = String::new();
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '"' => {
                            end = Some(i);
                            break;
                        }
                        '\\' => match chars.next() {
                            Some((_, e)) => s.push(e),
                            None => return Err(err("unterminated escape")),
                        },
                        c => s.push(c),
                    }
                }
                let end = end.ok_or_else(|| err("unterminated quoted string"))?;
                rest = &quoted[end + 1..];
                v = s;
            } else {
                let len = rest.find(|c: char| !is_tchar(c)).unwrap_or(rest.len());
                if len == 0 {
                    return Err(err("empty value"));
                }
                v = rest[..len].to_owned();
                rest = &rest[len..];
            }
            if name.eq_ignore_ascii_case("for") {
                if std::mem::replace(&mut seen_for, true) {
                    return Err(err("duplicate 'for'"));
                }
                parsed.for_node = Some(ForwardedNode::parse(&v));
            } else if name.eq_ignore_ascii_case("host") {
                if std::mem::replace(&mut seen_host, true) {
                    return Err(err("duplicate 'host'"));
                }
                parsed.host = Some(v);
            }
            let trimmed = rest.trim_start_matches([' ', '\t']);
            if let Some(next) = trimmed.strip_prefix(';') {
                rest = next.trim_start_matches([' ', '\t']);
            } else if trimmed.is_empty() || trimmed.starts_with(',') {
                // The end of the first element; later elements are other proxies' hops.
                return Ok(parsed);
            } else {
                return Err(err("unexpected character after a value"));
            }
        }
    }

    /// The first `forwarded` header of `headers`, parsed; `None` when there is none.
    pub fn from_headers(headers: &HeaderMap) -> Option<Result<Self, HeaderError>> {
        let value = headers.get(FORWARDED)?;
        Some(match value.to_str() {
            Ok(v) => Forwarded::parse(v),
            Err(_) => Err(HeaderError::NotAscii {
                header: "forwarded",
            }),
        })
    }
}

/// Workload metadata Istio carries in the W3C `baggage` header (ztunnel's keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`
    pub cluster: Option<String>,
    /// `k8s.namespace.name`
    pub namespace: Option<String>,
    /// The `<kind>` of `k8s.<kind>.name`, e.g. `deployment` (the default when writing).
    pub workload_kind: Option<String>,
    /// `k8s.<kind>.name`
    pub workload_name: Option<String>,
    /// `service.name` (the canonical service)
    pub service_name: Option<String>,
    /// `service.version` (the canonical revision)
    pub service_version: Option<String>,
    /// `cloud.region`
    pub region: Option<String>,
    /// `cloud.availability_zone`
    pub zone: Option<String>,
}

/// Workload kinds ztunnel writes as `k8s.<kind>.name`.
const WORKLOAD_KINDS: &[&str] = &[
    "deployment",
    "daemonset",
    "statefulset",
    "replicaset",
    "cronjob",
    "job",
    "pod",
];

/// W3C baggage-octet: anything else in a value is percent-encoded.
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E) && b != b'%'
}

fn percent_encode(out: &mut String, v: &str) {
    for b in v.bytes() {
        if is_baggage_octet(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = v.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Baggage {
    /// The header value, e.g.
    /// `k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1`.
    pub fn to_header_value(&self) -> Result<HeaderValue, HeaderError> {
        let kind = self.workload_kind.as_deref().unwrap_or("deployment");
        let workload_key = format!("k8s.{kind}.name");
        let members = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (workload_key.as_str(), &self.workload_name),
            ("service.name", &self.service_name),
            ("service.version", &self.service_version),
            ("cloud.region", &self.region),
            ("cloud.availability_zone", &self.zone),
        ];
        let mut out = String::new();
        for (key, value) in members {
            let Some(value) = value else { continue };
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(key);
            out.push('=');
            percent_encode(&mut out, value);
        }
        HeaderValue::try_from(out).map_err(|_| HeaderError::NotAscii { header: "baggage" })
    }

    /// Merges every `baggage` header of `headers`. Unknown keys, member properties (`;...`) and
    /// malformed members are skipped, as ztunnel does; empty values count as absent.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut b = Baggage::default();
        for value in headers.get_all(BAGGAGE) {
            let Ok(value) = value.to_str() else { continue };
            b.merge(value);
        }
        b
    }

    /// Parses one `baggage` value (see [`Baggage::from_headers`]).
    pub fn parse(value: &str) -> Self {
        let mut b = Baggage::default();
        b.merge(value);
        b
    }

    fn merge(&mut self, value: &str) {
        for member in value.split(',') {
            let member = member.split(';').next().unwrap_or_default();
            let Some((key, v)) = member.split_once('=') else {
                continue;
            };
            let key = key.trim();
            let v = v.trim();
            let v = (!v.is_empty()).then(|| percent_decode(v));
            match key {
                "k8s.cluster.name" => self.cluster = v,
                "k8s.namespace.name" => self.namespace = v,
                "service.name" => self.service_name = v,
                "service.version" => self.service_version = v,
                "cloud.region" => self.region = v,
                "cloud.availability_zone" => self.zone = v,
                k => {
                    let kind = k
                        .strip_prefix("k8s.")
                        .and_then(|k| k.strip_suffix(".name"))
                        .filter(|kind| WORKLOAD_KINDS.contains(kind));
                    if let Some(kind) = kind {
                        self.workload_kind = Some(kind.to_owned());
                        self.workload_name = v;
                    }
                }
            }
        }
    }
}

/// A W3C `traceparent`: `00-<trace id>-<parent span id>-<flags>`. ztunnel sends flags `00`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

impl TraceParent {
    /// A new trace with random (non-zero) ids and flags `00` (not sampled), as ztunnel does.
    pub fn random() -> Self {
        TraceParent {
            trace_id: fastrand::u128(1..),
            span_id: fastrand::u64(1..),
            flags: 0,
        }
    }

    /// The same trace with a new span id: what a hop forwards.
    pub fn child(&self) -> Self {
        TraceParent {
            span_id: fastrand::u64(1..),
            ..*self
        }
    }

    pub fn to_header_value(&self) -> HeaderValue {
        // Only hex digits and dashes: always a valid header value.
        HeaderValue::try_from(self.to_string()).unwrap_or(HeaderValue::from_static(""))
    }

    /// Parses version `00` strictly (lowercase hex, non-zero ids); a later version is read
    /// through its first four fields, as the W3C spec asks.
    pub fn parse(value: &str) -> Result<Self, HeaderError> {
        let err = |reason| HeaderError::TraceParent {
            value: value.to_owned(),
            reason,
        };
        let v = value.trim();
        let is_hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let mut parts = v.splitn(5, '-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err("expected version-traceid-parentid-flags"));
        };
        let extra = parts.next();
        if !is_hex(version, 2) || version == "ff" {
            return Err(err("bad version"));
        }
        if version == "00" && extra.is_some() {
            return Err(err("trailing data after version 00 fields"));
        }
        if !is_hex(trace, 32) || !is_hex(span, 16) || !is_hex(flags, 2) {
            return Err(err("fields must be lowercase hex of the right length"));
        }
        let parsed = TraceParent {
            trace_id: u128::from_str_radix(trace, 16).map_err(|_| err("bad trace id"))?,
            span_id: u64::from_str_radix(span, 16).map_err(|_| err("bad parent id"))?,
            flags: u8::from_str_radix(flags, 16).map_err(|_| err("bad flags"))?,
        };
        if parsed.trace_id == 0 || parsed.span_id == 0 {
            return Err(err("all-zero id"));
        }
        Ok(parsed)
    }

    /// The `traceparent` header of `headers`, parsed; `None` when there is none.
    pub fn from_headers(headers: &HeaderMap) -> Option<Result<Self, HeaderError>> {
        let v = headers.get(TRACEPARENT)?;
        Some(match v.to_str() {
            Ok(v) => TraceParent::parse(v),
            Err(_) => Err(HeaderError::NotAscii {
                header: "traceparent",
            }),
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}
