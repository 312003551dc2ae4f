//! Compiled DestinationRules: upstream TLS, connection pool, outlier detection and load
//! balancing per (host, port, subset). Field precedence (Istio's): the subset's port-level
//! settings, the subset's policy, the rule's port-level settings, the rule's policy — per
//! field, so a port-level `tls` does not erase a rule-wide `connectionPool`.
use crate::duration;
use crate::error::ObjErrors;
use crate::model::Labels;
use crate::model::networking as m;
use crate::snapshot::NamespacedName;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

/// Upstream (origination) TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientTls {
    pub mode: TlsMode,
    /// SNI to send; `None` = the destination host name.
    pub sni: Option<String>,
    /// PEM file of roots; `None` = the system roots.
    pub ca_certificates: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    /// A Secret holding the certificates (`tls.crt` / `tls.key` / `ca.crt`, or `cert` / `key` /
    /// `cacert`), in the namespace of the waypoint that applies the rule; resolved per waypoint
    /// with [`crate::secret::resolve_credential`]. Wins over the file paths.
    pub credential_name: Option<String>,
    /// Where `credential_name` was written (`spec.trafficPolicy.tls.credentialName`), for
    /// messages about an unusable Secret.
    pub credential_path: Option<String>,
    /// Accept the server only if a SAN matches one of these (`None`-empty = verify the host).
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    #[serde(serialize_with = "duration::ser::opt")]
    pub time: Option<Duration>,
    #[serde(serialize_with = "duration::ser::opt")]
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    #[serde(serialize_with = "duration::ser::opt")]
    pub connect_timeout: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    #[serde(serialize_with = "duration::ser::opt")]
    pub max_connection_duration: Option<Duration>,
    #[serde(serialize_with = "duration::ser::opt")]
    pub tcp_idle_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    #[serde(serialize_with = "duration::ser::opt")]
    pub http_idle_timeout: Option<Duration>,
    /// `h2UpgradePolicy: UPGRADE`.
    pub h2_upgrade: bool,
    pub use_client_protocol: bool,
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub split_external_local_origin_errors: bool,
    #[serde(serialize_with = "duration::ser::one")]
    pub interval: Duration,
    #[serde(serialize_with = "duration::ser::one")]
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    Header(String),
    Cookie(String),
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    RoundRobin,
    LeastRequest,
    Random,
    Passthrough,
    ConsistentHash(HashKey),
}

/// One level of traffic settings (each field may be unset and inherited).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct TrafficSettings {
    pub tls: Option<ClientTls>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub load_balancer: Option<LoadBalancer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct PolicyLevel {
    pub default: TrafficSettings,
    pub ports: BTreeMap<u16, TrafficSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubsetPolicy {
    pub name: String,
    pub labels: Labels,
    pub policy: PolicyLevel,
}

/// A compiled DestinationRule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationPolicy {
    pub rule: NamespacedName,
    pub host: String,
    pub policy: PolicyLevel,
    pub subsets: Vec<SubsetPolicy>,
}

/// Effective settings for one (port, subset).
#[derive(Debug, Clone, Copy, Default)]
pub struct ResolvedTraffic<'a> {
    pub tls: Option<&'a ClientTls>,
    pub connection_pool: Option<&'a ConnectionPool>,
    pub outlier_detection: Option<&'a OutlierDetection>,
    pub load_balancer: Option<&'a LoadBalancer>,
}

impl DestinationPolicy {
    pub fn subset(&self, name: &str) -> Option<&SubsetPolicy> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// Every `tls` setting of the rule (rule-wide, port-level, subsets).
    pub fn tls_settings(&self) -> impl Iterator<Item = &ClientTls> {
        std::iter::once(&self.policy)
            .chain(self.subsets.iter().map(|s| &s.policy))
            .flat_map(|l| std::iter::once(&l.default).chain(l.ports.values()))
            .filter_map(|t| t.tls.as_ref())
    }

    pub fn resolve(&self, port: u16, subset: Option<&str>) -> ResolvedTraffic<'_> {
        let mut levels: Vec<&TrafficSettings> = Vec::with_capacity(4);
        if let Some(s) = subset.and_then(|s| self.subset(s)) {
            levels.extend(s.policy.ports.get(&port));
            levels.push(&s.policy.default);
        }
        levels.extend(self.policy.ports.get(&port));
        levels.push(&self.policy.default);
        ResolvedTraffic {
            tls: levels.iter().find_map(|l| l.tls.as_ref()),
            connection_pool: levels.iter().find_map(|l| l.connection_pool.as_ref()),
            outlier_detection: levels.iter().find_map(|l| l.outlier_detection.as_ref()),
            load_balancer: levels.iter().find_map(|l| l.load_balancer.as_ref()),
        }
    }
}

// ---------------------------------------------------------------- compile

pub(crate) fn compile(
    rule: NamespacedName,
    host: String,
    spec: &m::DestinationRuleSpec,
    e: &mut ObjErrors<'_>,
) -> DestinationPolicy {
    let policy = spec
        .traffic_policy
        .as_ref()
        .map(|tp| level(tp, "spec.trafficPolicy", e))
        .unwrap_or_default();
    let mut subsets = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if subsets.iter().any(|x: &SubsetPolicy| x.name == s.name) {
            e.push(
                format!("{path}.name"),
                format!("duplicate subset {:?}", s.name),
            );
        }
        let policy = s
            .traffic_policy
            .as_ref()
            .map(|tp| level(tp, &format!("{path}.trafficPolicy"), e))
            .unwrap_or_default();
        subsets.push(SubsetPolicy {
            name: s.name.clone(),
            labels: s.labels.clone(),
            policy,
        });
    }
    DestinationPolicy {
        rule,
        host,
        policy,
        subsets,
    }
}

fn level(tp: &m::TrafficPolicy, path: &str, e: &mut ObjErrors<'_>) -> PolicyLevel {
    for (set, field) in [
        (tp.tunnel.is_some(), "tunnel"),
        (tp.proxy_protocol.is_some(), "proxyProtocol"),
        (tp.retry_budget.is_some(), "retryBudget"),
    ] {
        if set {
            tracing::warn!(rule = %e.object, field, "DestinationRule field not implemented; ignored");
        }
    }
    let default = settings(
        tp.tls.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.load_balancer.as_ref(),
        path,
        e,
    );
    let mut ports = BTreeMap::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let p = format!("{path}.portLevelSettings[{i}]");
        let number = pl.port.as_ref().map(|p| p.number).unwrap_or(0);
        let Ok(number) = u16::try_from(number)
            .map_err(drop)
            .and_then(|n| if n == 0 { Err(()) } else { Ok(n) })
        else {
            e.push(
                format!("{p}.port.number"),
                "required: a port number 1-65535",
            );
            continue;
        };
        let s = settings(
            pl.tls.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            pl.load_balancer.as_ref(),
            &p,
            e,
        );
        if ports.insert(number, s).is_some() {
            e.push(
                format!("{p}.port.number"),
                format!("port {number} appears twice"),
            );
        }
    }
    PolicyLevel { default, ports }
}

fn settings(
    tls: Option<&m::ClientTlsSettings>,
    pool: Option<&m::ConnectionPoolSettings>,
    od: Option<&m::OutlierDetection>,
    lb: Option<&m::LoadBalancerSettings>,
    path: &str,
    e: &mut ObjErrors<'_>,
) -> TrafficSettings {
    TrafficSettings {
        tls: tls.and_then(|t| client_tls(t, &format!("{path}.tls"), e)),
        connection_pool: pool.map(|p| connection_pool(p, &format!("{path}.connectionPool"), e)),
        outlier_detection: od.map(|o| outlier(o, &format!("{path}.outlierDetection"), e)),
        load_balancer: lb.and_then(|l| load_balancer(l, &format!("{path}.loadBalancer"), e)),
    }
}

fn opt_duration(v: &Option<String>, path: &str, e: &mut ObjErrors<'_>) -> Option<Duration> {
    let s = v.as_ref()?;
    match duration::parse(s) {
        Ok(d) => Some(d),
        Err(msg) => {
            e.push(path, msg);
            None
        }
    }
}

fn client_tls(t: &m::ClientTlsSettings, path: &str, e: &mut ObjErrors<'_>) -> Option<ClientTls> {
    let mode = match t.mode.as_deref().unwrap_or("DISABLE") {
        "DISABLE" => TlsMode::Disable,
        "SIMPLE" => TlsMode::Simple,
        "MUTUAL" => TlsMode::Mutual,
        "ISTIO_MUTUAL" => TlsMode::IstioMutual,
        other => {
            e.push(
                format!("{path}.mode"),
                format!("unknown TLS mode {other:?} (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL)"),
            );
            return None;
        }
    };
    let credential_name = t.credential_name.clone().filter(|s| !s.is_empty());
    if mode == TlsMode::Mutual
        && credential_name.is_none()
        && (t.client_certificate.is_none() || t.private_key.is_none())
    {
        e.push(
            path,
            "MUTUAL needs clientCertificate and privateKey (or credentialName)",
        );
    }
    if credential_name.is_some()
        && (t.client_certificate.is_some()
            || t.private_key.is_some()
            || t.ca_certificates.is_some())
    {
        // Istio's precedence: the Secret is used and the file paths are not read.
        tracing::warn!(rule = %e.object, field = %format!("{path}.credentialName"),
            "credentialName and certificate file paths are both set; the Secret wins");
    }
    if t.ca_crl.is_some() {
        tracing::warn!(rule = %e.object, "DestinationRule tls.caCrl not implemented; ignored");
    }
    Some(ClientTls {
        mode,
        sni: t.sni.clone().filter(|s| !s.is_empty()),
        ca_certificates: t
            .ca_certificates
            .clone()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        client_certificate: t
            .client_certificate
            .clone()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        private_key: t
            .private_key
            .clone()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        credential_path: credential_name
            .is_some()
            .then(|| format!("{path}.credentialName")),
        credential_name,
        subject_alt_names: t.subject_alt_names.clone(),
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
    })
}

fn connection_pool(
    p: &m::ConnectionPoolSettings,
    path: &str,
    e: &mut ObjErrors<'_>,
) -> ConnectionPool {
    let mut out = ConnectionPool::default();
    if let Some(tcp) = &p.tcp {
        out.max_connections = tcp.max_connections;
        out.connect_timeout = opt_duration(
            &tcp.connect_timeout,
            &format!("{path}.tcp.connectTimeout"),
            e,
        );
        out.max_connection_duration = opt_duration(
            &tcp.max_connection_duration,
            &format!("{path}.tcp.maxConnectionDuration"),
            e,
        );
        out.tcp_idle_timeout =
            opt_duration(&tcp.idle_timeout, &format!("{path}.tcp.idleTimeout"), e);
        out.tcp_keepalive = tcp.tcp_keepalive.as_ref().map(|k| TcpKeepalive {
            probes: k.probes,
            time: opt_duration(&k.time, &format!("{path}.tcp.tcpKeepalive.time"), e),
            interval: opt_duration(&k.interval, &format!("{path}.tcp.tcpKeepalive.interval"), e),
        });
    }
    if let Some(h) = &p.http {
        out.http1_max_pending_requests = h.http1_max_pending_requests;
        out.http2_max_requests = h.http2_max_requests;
        out.max_requests_per_connection = h.max_requests_per_connection;
        out.max_retries = h.max_retries;
        out.http_idle_timeout =
            opt_duration(&h.idle_timeout, &format!("{path}.http.idleTimeout"), e);
        out.use_client_protocol = h.use_client_protocol.unwrap_or(false);
        out.max_concurrent_streams = h.max_concurrent_streams;
        out.h2_upgrade = match h.h2_upgrade_policy.as_deref() {
            None | Some("DEFAULT") | Some("DO_NOT_UPGRADE") => false,
            Some("UPGRADE") => true,
            Some(other) => {
                e.push(
                    format!("{path}.http.h2UpgradePolicy"),
                    format!("unknown value {other:?}"),
                );
                false
            }
        };
    }
    out
}

fn outlier(o: &m::OutlierDetection, path: &str, e: &mut ObjErrors<'_>) -> OutlierDetection {
    let pct = |v: Option<u32>, field: &str, default: u32, e: &mut ObjErrors<'_>| match v {
        Some(p) if p > 100 => {
            e.push(format!("{path}.{field}"), "must be 0-100");
            default
        }
        Some(p) => p,
        None => default,
    };
    OutlierDetection {
        // `consecutiveErrors` is the deprecated spelling of consecutiveGatewayErrors' 5xx cousin.
        consecutive_5xx_errors: o.consecutive_5xx_errors.or(o.consecutive_errors),
        consecutive_gateway_errors: o.consecutive_gateway_errors,
        consecutive_local_origin_failures: o.consecutive_local_origin_failures,
        split_external_local_origin_errors: o.split_external_local_origin_errors.unwrap_or(false),
        interval: opt_duration(&o.interval, &format!("{path}.interval"), e)
            .unwrap_or(Duration::from_secs(10)),
        base_ejection_time: opt_duration(
            &o.base_ejection_time,
            &format!("{path}.baseEjectionTime"),
            e,
        )
        .unwrap_or(Duration::from_secs(30)),
        max_ejection_percent: pct(o.max_ejection_percent, "maxEjectionPercent", 10, e),
        min_health_percent: pct(o.min_health_percent, "minHealthPercent", 0, e),
    }
}

fn load_balancer(
    l: &m::LoadBalancerSettings,
    path: &str,
    e: &mut ObjErrors<'_>,
) -> Option<LoadBalancer> {
    if l.locality_lb_setting.is_some() || l.warmup.is_some() || l.warmup_duration_secs.is_some() {
        tracing::warn!(rule = %e.object, "DestinationRule locality / warmup settings not implemented; ignored");
    }
    if let Some(ch) = &l.consistent_hash {
        let key = if let Some(h) = &ch.http_header_name {
            HashKey::Header(h.to_ascii_lowercase())
        } else if ch.use_source_ip == Some(true) {
            HashKey::SourceIp
        } else if let Some(q) = &ch.http_query_parameter_name {
            HashKey::QueryParameter(q.clone())
        } else if let Some(c) = &ch.http_cookie {
            match c.get("name").and_then(|n| n.as_str()) {
                Some(n) => HashKey::Cookie(n.to_owned()),
                None => {
                    e.push(format!("{path}.consistentHash.httpCookie.name"), "required");
                    return None;
                }
            }
        } else {
            e.push(
                format!("{path}.consistentHash"),
                "needs one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
            );
            return None;
        };
        return Some(LoadBalancer::ConsistentHash(key));
    }
    match l.simple.as_deref() {
        None | Some("UNSPECIFIED") | Some("LEAST_REQUEST") | Some("LEAST_CONN") => {
            Some(LoadBalancer::LeastRequest)
        }
        Some("ROUND_ROBIN") => Some(LoadBalancer::RoundRobin),
        Some("RANDOM") => Some(LoadBalancer::Random),
        Some("PASSTHROUGH") => Some(LoadBalancer::Passthrough),
        Some(other) => {
            e.push(
                format!("{path}.simple"),
                format!("unknown load balancer {other:?}"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SourceRef;

    fn compile_yaml(y: &str) -> (DestinationPolicy, Vec<crate::error::ConfigError>) {
        let spec: m::DestinationRuleSpec = serde_yaml_ng::from_str(y).unwrap();
        let src = SourceRef {
            file: "t.yaml".into(),
            document: 1,
        };
        let mut out = Vec::new();
        let mut e = ObjErrors {
            source: &src,
            kind: "DestinationRule",
            object: "ns/dr".into(),
            out: &mut out,
        };
        let p = compile(
            NamespacedName::new("ns", "dr"),
            spec.host.clone(),
            &spec,
            &mut e,
        );
        (p, out)
    }

    #[test]
    fn port_level_wins_per_field() {
        let (p, errs) = compile_yaml(
            r#"
host: aliyun.com
trafficPolicy:
  tls: {mode: DISABLE}
  connectionPool: {tcp: {maxConnections: 7, connectTimeout: 2s}}
  portLevelSettings:
  - port: {number: 80}
    tls: {mode: SIMPLE, sni: aliyun.com}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}
"#,
        );
        assert!(errs.is_empty(), "{errs:?}");
        let cases: [(u16, Option<&str>, TlsMode); 4] = [
            (80, None, TlsMode::Simple),
            (443, None, TlsMode::Disable),
            (80, Some("v1"), TlsMode::Mutual),
            (443, Some("v1"), TlsMode::Disable),
        ];
        for (port, subset, want) in cases {
            let r = p.resolve(port, subset);
            assert_eq!(r.tls.map(|t| t.mode), Some(want), "{port} {subset:?}");
            // the rule-wide connection pool survives a port-level tls override
            assert_eq!(r.connection_pool.and_then(|c| c.max_connections), Some(7));
        }
        assert_eq!(
            p.resolve(80, None).tls.unwrap().sni.as_deref(),
            Some("aliyun.com")
        );
    }

    #[test]
    fn errors_all_reported() {
        let (_, errs) = compile_yaml(
            r#"
host: x
trafficPolicy:
  tls: {mode: BOGUS}
  connectionPool: {tcp: {connectTimeout: soon}}
  loadBalancer: {simple: FASTEST}
  portLevelSettings:
  - tls: {mode: MUTUAL}
"#,
        );
        let paths: Vec<_> = errs
            .iter()
            .map(|e| e.path.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            paths,
            [
                "spec.trafficPolicy.tls.mode",
                "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
                "spec.trafficPolicy.loadBalancer.simple",
                "spec.trafficPolicy.portLevelSettings[0].port.number",
            ]
        );
    }
}
