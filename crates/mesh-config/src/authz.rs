//! AuthorizationPolicy evaluation: pure functions over compiled policies.
//!
//! Semantics (Istio's): CUSTOM is not supported; any matching DENY policy denies; otherwise if
//! any ALLOW policy applies, one of them must match; AUDIT policies never change the decision.
//! A policy matches when any rule matches; a rule matches when every present part (`from`,
//! `to`, `when`) matches; inside a part, any entry may match; inside an entry, every field must
//! match (with `not*` fields inverted).
//!
//! L4 evaluation (ztunnel, `attrs.http == None`): a rule that needs HTTP attributes (methods,
//! paths, hosts, `request.headers`) cannot be checked. In an ALLOW policy such a rule does not
//! match (less access); in a DENY policy its HTTP parts are treated as matching (more denial).
//! That is Istio's fail-closed translation for ztunnel.
use crate::error::ObjErrors;
use crate::model::Labels;
use crate::model::security as m;
use crate::snapshot::NamespacedName;
use ipnet::IpNet;
use serde::Serialize;
use std::net::IpAddr;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// Attributes of a connection / request to authorize.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestAttrs<'a> {
    /// Peer SPIFFE identity, `spiffe://td/ns/x/sa/y` or Istio's principal form without scheme.
    pub source_principal: Option<&'a str>,
    /// Source namespace; derived from the principal when `None`.
    pub source_namespace: Option<&'a str>,
    /// Labels of the source workload. Only set them when the caller verified that the workload
    /// found by source IP carries the peer's identity.
    pub source_labels: Option<&'a Labels>,
    /// Direct peer IP.
    pub source_ip: Option<IpAddr>,
    /// Original client IP (X-Forwarded-For / `forwarded: for=`); defaults to `source_ip`.
    pub remote_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
    /// TLS SNI when the payload is TLS.
    pub sni: Option<&'a str>,
    /// HTTP attributes; `None` at L4.
    pub http: Option<HttpAttrs<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct HttpAttrs<'a> {
    /// Host / :authority, without port.
    pub host: &'a str,
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl<'a> RequestAttrs<'a> {
    fn principal(&self) -> Option<&'a str> {
        self.source_principal
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
    }

    fn namespace(&self) -> Option<&'a str> {
        if self.source_namespace.is_some() {
            return self.source_namespace;
        }
        // td/ns/<ns>/sa/<sa>
        let p = self.principal()?;
        let mut it = p.split('/');
        it.next()?;
        (it.next()? == "ns").then_some(())?;
        it.next()
    }

    fn remote(&self) -> Option<IpAddr> {
        self.remote_ip.or(self.source_ip)
    }
}

/// The outcome of [`AuthzPolicies::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` is the DENY policy that matched, or `None` when ALLOW policies exist and none
    /// matched.
    Deny {
        policy: Option<NamespacedName>,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Istio string match: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StrPattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StrPattern {
    pub fn parse(s: &str) -> StrPattern {
        if s == "*" {
            StrPattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StrPattern::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            StrPattern::Suffix(p.to_owned())
        } else {
            StrPattern::Exact(s.to_owned())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrPattern::Any => !v.is_empty(),
            StrPattern::Exact(e) => e == v,
            StrPattern::Prefix(p) => v.starts_with(p.as_str()),
            StrPattern::Suffix(s) => v.ends_with(s.as_str()),
        }
    }

    fn matches_ci(&self, v: &str) -> bool {
        match self {
            StrPattern::Any => !v.is_empty(),
            StrPattern::Exact(e) => e.eq_ignore_ascii_case(v),
            StrPattern::Prefix(p) => {
                v.len() >= p.len() && v.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StrPattern::Suffix(s) => {
                v.len() >= s.len()
                    && v.as_bytes()[v.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// Source workloads selected by namespace + labels (used by compiled ASMEgressTrafficPolicy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadSelector {
    pub namespace: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceMatch {
    pub principals: Vec<StrPattern>,
    pub not_principals: Vec<StrPattern>,
    pub namespaces: Vec<StrPattern>,
    pub not_namespaces: Vec<StrPattern>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    pub remote_ip_blocks: Vec<IpNet>,
    pub not_remote_ip_blocks: Vec<IpNet>,
    /// Any of these source workloads (our extension, not expressible in Istio YAML).
    pub workloads: Vec<WorkloadSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OperationMatch {
    pub hosts: Vec<StrPattern>,
    pub not_hosts: Vec<StrPattern>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StrPattern>,
    pub not_methods: Vec<StrPattern>,
    pub paths: Vec<StrPattern>,
    pub not_paths: Vec<StrPattern>,
    /// `methods` as a bit set ([`method_bit`]) when all of them are exact standard methods:
    /// a request's method is then one bit test instead of a string compare per pattern (a
    /// waypoint runs every rule of every policy on every request). `None`: use `methods`.
    #[serde(skip)]
    pub method_set: Option<u16>,
}

/// Standard HTTP methods as bits (methods match case-sensitively, as in Istio).
fn method_bit(m: &str) -> Option<u16> {
    let i = match m {
        "GET" => 0,
        "HEAD" => 1,
        "POST" => 2,
        "PUT" => 3,
        "DELETE" => 4,
        "PATCH" => 5,
        "OPTIONS" => 6,
        "CONNECT" => 7,
        "TRACE" => 8,
        _ => return None,
    };
    Some(1 << i)
}

/// The bit set of `methods`, when every pattern is an exact standard method.
fn method_set(methods: &[StrPattern]) -> Option<u16> {
    if methods.is_empty() {
        return None;
    }
    methods.iter().try_fold(0, |set, p| match p {
        StrPattern::Exact(m) => method_bit(m).map(|b| set | b),
        _ => None,
    })
}

impl OperationMatch {
    /// Whether `method` is one of `methods` (non-empty).
    fn method_matches(&self, method: &str) -> bool {
        match self.method_set {
            // A method outside the standard set cannot equal a standard one.
            Some(set) => method_bit(method).is_some_and(|b| set & b != 0),
            None => any_pat(&self.methods, Some(method)),
        }
    }

    fn needs_http(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

/// `when` keys we can evaluate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditionKey {
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    /// `request.headers[<name>]`; the name parsed once (lower case), not per lookup.
    RequestHeader(#[serde(serialize_with = "header_name")] http::HeaderName),
}

fn header_name<S: serde::Serializer>(n: &http::HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(n.as_str())
}

/// One `when` value, parsed at compile time for its key: evaluation does no string parsing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ConditionValue {
    /// `source.ip`, `remote.ip`, `destination.ip`: an address or CIDR.
    Net(IpNet),
    /// `destination.port`.
    Port(u16),
    /// Every string key: exact, `prefix*`, `*suffix` or `*`.
    Pattern(StrPattern),
}

impl ConditionValue {
    /// Parses `v` as the type `key` compares; `None` when it is not one (an IP key with a
    /// value that is no address or CIDR, a port key with no port number).
    pub fn parse(key: &ConditionKey, v: &str) -> Option<ConditionValue> {
        match key {
            ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
                parse_net(v).map(ConditionValue::Net)
            }
            ConditionKey::DestinationPort => v.parse().ok().map(ConditionValue::Port),
            ConditionKey::SourceNamespace
            | ConditionKey::SourcePrincipal
            | ConditionKey::ConnectionSni
            | ConditionKey::RequestHeader(_) => Some(ConditionValue::Pattern(StrPattern::parse(v))),
        }
    }

    // A value of another type than the key's never matches; `ConditionValue::parse` does not
    // build such pairs.
    fn contains_ip(&self, ip: IpAddr) -> bool {
        matches!(self, ConditionValue::Net(n) if n.contains(&ip))
    }

    fn is_port(&self, port: u16) -> bool {
        matches!(self, ConditionValue::Port(p) if *p == port)
    }

    fn matches_str(&self, v: &str) -> bool {
        matches!(self, ConditionValue::Pattern(p) if p.matches(v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Vec<ConditionValue>,
    pub not_values: Vec<ConditionValue>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub from: Vec<SourceMatch>,
    pub to: Vec<OperationMatch>,
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub name: NamespacedName,
    pub action: Action,
    pub rules: Vec<Rule>,
}

/// A necessary condition of one rule, checked before the rule itself.
///
/// A waypoint runs every rule of every policy on every request, and in a large set most rules
/// fail on the method or the principal. [`AuthzPolicies`] keeps these two facts for all its
/// DENY and ALLOW rules in one array, so the evaluation skips such rules without touching the
/// policies and the rules' own vectors (on a busy proxy, each a cache miss). A filter may pass
/// a rule that then does not match (a principal hash collision, or conditions it does not
/// track); it never fails a rule that would match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RuleFilter {
    /// Method bits ([`method_bit`], [`OTHER_METHOD`]) a request may have; [`ANY_METHOD`] when
    /// the rule does not constrain it to standard methods.
    methods: u16,
    /// One bit per exact principal the rule accepts ([`principal_bit`]); [`ANY_PRINCIPAL`] when
    /// the rule does not constrain the principal to exact values.
    principals: u64,
}

/// A request method outside [`method_bit`]'s set: no method bit set contains it.
const OTHER_METHOD: u16 = 1 << 15;
const ANY_METHOD: u16 = u16::MAX;
const ANY_PRINCIPAL: u64 = u64::MAX;

/// The bit of `principal` (without `spiffe://`) in [`RuleFilter::principals`].
fn principal_bit(principal: &str) -> u64 {
    use std::hash::BuildHasher;
    // Fixed seed: rules and requests must agree, and tests are reproducible.
    let h = foldhash::fast::FixedState::with_seed(0x5EED).hash_one(principal);
    1 << (h % 64)
}

impl RuleFilter {
    fn of(rule: &Rule) -> RuleFilter {
        // A rule matches only if one `from` entry and one `to` entry match: the union over the
        // entries of what each lets through. An empty list constrains nothing.
        let principals = if rule.from.is_empty() {
            ANY_PRINCIPAL
        } else {
            rule.from.iter().fold(0, |acc, s| {
                let entry = if s.principals.is_empty() {
                    ANY_PRINCIPAL
                } else {
                    s.principals.iter().fold(0, |bits, p| match p {
                        StrPattern::Exact(e) => bits | principal_bit(e),
                        _ => ANY_PRINCIPAL,
                    })
                };
                acc | entry
            })
        };
        let methods = if rule.to.is_empty() {
            ANY_METHOD
        } else {
            // `method_set` is `None` for no methods or non-standard ones: any method then.
            rule.to
                .iter()
                .fold(0, |acc, o| acc | o.method_set.unwrap_or(ANY_METHOD))
        };
        RuleFilter {
            methods,
            principals,
        }
    }

    /// Whether the rule may match a request with these bits ([`RequestBits`]).
    fn admits(self, r: RequestBits) -> bool {
        self.methods & r.method != 0
            && (self.principals == ANY_PRINCIPAL || self.principals & r.principal != 0)
    }
}

/// The request's side of [`RuleFilter`], computed once per evaluation.
#[derive(Debug, Clone, Copy)]
struct RequestBits {
    /// The method's bit, or [`ANY_METHOD`] at L4, where a DENY rule's HTTP conditions count as
    /// matching.
    method: u16,
    /// The principal's bit, 0 without a principal (no exact principal can match then).
    principal: u64,
}

impl RequestBits {
    fn of(a: &RequestAttrs<'_>) -> RequestBits {
        RequestBits {
            method: a
                .http
                .map_or(ANY_METHOD, |h| method_bit(h.method).unwrap_or(OTHER_METHOD)),
            principal: a.principal().map_or(0, principal_bit),
        }
    }
}

/// The policies that apply to one target, split by action.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuthzPolicies {
    deny: Vec<Arc<Policy>>,
    allow: Vec<Arc<Policy>>,
    audit: Vec<Arc<Policy>>,
    /// Every rule of `deny` and of `allow`, in order, with its filter.
    #[serde(skip)]
    deny_rules: Vec<FilteredRule>,
    #[serde(skip)]
    allow_rules: Vec<FilteredRule>,
}

/// A rule of an [`AuthzPolicies`]: its filter and where it is.
#[derive(Debug, Clone, Copy)]
struct FilteredRule {
    filter: RuleFilter,
    policy: u32,
    rule: u32,
}

impl AuthzPolicies {
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    pub fn deny(&self) -> &[Arc<Policy>] {
        &self.deny
    }

    pub fn allow(&self) -> &[Arc<Policy>] {
        &self.allow
    }

    pub fn audit(&self) -> &[Arc<Policy>] {
        &self.audit
    }

    pub(crate) fn push(&mut self, p: Arc<Policy>) {
        let (policies, rules) = match p.action {
            Action::Allow => (&mut self.allow, &mut self.allow_rules),
            Action::Deny => (&mut self.deny, &mut self.deny_rules),
            Action::Audit => return self.audit.push(p),
        };
        // Policies and rules come from YAML, far below u32::MAX.
        let policy = policies.len() as u32;
        rules.extend(p.rules.iter().enumerate().map(|(i, r)| FilteredRule {
            filter: RuleFilter::of(r),
            policy,
            rule: i as u32,
        }));
        policies.push(p);
    }

    /// The first policy of `policies` with a rule that matches, through `rules`' filters.
    fn first_match<'s>(
        policies: &'s [Arc<Policy>],
        rules: &[FilteredRule],
        a: &RequestAttrs<'_>,
        bits: RequestBits,
        lenient_l7: bool,
    ) -> Option<&'s Policy> {
        rules.iter().find_map(|fr| {
            if !fr.filter.admits(bits) {
                return None;
            }
            let p = &policies[fr.policy as usize];
            p.rules[fr.rule as usize]
                .matches(a, lenient_l7)
                .then_some(&**p)
        })
    }

    /// DENY before ALLOW; ALLOW present but none matching → deny; AUDIT ignored.
    pub fn evaluate(&self, attrs: &RequestAttrs<'_>) -> Decision {
        evaluate_all(&[self], attrs)
    }

    /// AUDIT policies that match (for logging).
    pub fn audit_matches<'s>(
        &'s self,
        attrs: &RequestAttrs<'_>,
    ) -> impl Iterator<Item = &'s NamespacedName> {
        self.audit
            .iter()
            .filter(|p| p.matches(attrs))
            .map(|p| &p.name)
    }
}

/// Evaluates several policy sets as one (a waypoint: policies on the Gateway plus those on the
/// destination service).
pub fn evaluate_all(sets: &[&AuthzPolicies], attrs: &RequestAttrs<'_>) -> Decision {
    if sets.iter().all(|s| s.deny.is_empty() && s.allow.is_empty()) {
        return Decision::Allow; // the common case: nothing to evaluate
    }
    // Derive principal / namespace / remote IP once, not once per policy.
    let mut a = *attrs;
    a.source_principal = attrs.principal();
    a.source_namespace = attrs.namespace();
    a.remote_ip = attrs.remote();
    let attrs = &a;
    let bits = RequestBits::of(attrs);
    for set in sets {
        if let Some(p) = AuthzPolicies::first_match(&set.deny, &set.deny_rules, attrs, bits, true) {
            return Decision::Deny {
                policy: Some(p.name.clone()),
            };
        }
    }
    let mut any_allow = false;
    for set in sets {
        any_allow |= !set.allow.is_empty();
        if AuthzPolicies::first_match(&set.allow, &set.allow_rules, attrs, bits, false).is_some() {
            return Decision::Allow;
        }
    }
    if any_allow {
        Decision::Deny { policy: None }
    } else {
        Decision::Allow
    }
}

impl Policy {
    pub fn matches(&self, a: &RequestAttrs<'_>) -> bool {
        let deny = self.action == Action::Deny;
        self.rules.iter().any(|r| r.matches(a, deny))
    }
}

impl Rule {
    /// `lenient_l7`: at L4, treat HTTP-only conditions as matching (DENY) instead of not (ALLOW).
    fn matches(&self, a: &RequestAttrs<'_>, lenient_l7: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a, lenient_l7)))
            && self.when.iter().all(|c| c.matches(a, lenient_l7))
    }
}

fn any_pat(pats: &[StrPattern], v: Option<&str>) -> bool {
    v.is_some_and(|v| pats.iter().any(|p| p.matches(v)))
}

fn any_net(nets: &[IpNet], ip: Option<IpAddr>) -> bool {
    ip.is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)))
}

impl SourceMatch {
    fn matches(&self, a: &RequestAttrs<'_>) -> bool {
        let principal = a.principal();
        let ns = a.namespace();
        (self.principals.is_empty() || any_pat(&self.principals, principal))
            && !any_pat(&self.not_principals, principal)
            && (self.namespaces.is_empty() || any_pat(&self.namespaces, ns))
            && !any_pat(&self.not_namespaces, ns)
            && (self.ip_blocks.is_empty() || any_net(&self.ip_blocks, a.source_ip))
            && !any_net(&self.not_ip_blocks, a.source_ip)
            && (self.remote_ip_blocks.is_empty() || any_net(&self.remote_ip_blocks, a.remote()))
            && !any_net(&self.not_remote_ip_blocks, a.remote())
            && (self.workloads.is_empty()
                || self.workloads.iter().any(|w| {
                    ns == Some(w.namespace.as_str())
                        && a.source_labels
                            .is_some_and(|l| w.labels.iter().all(|(k, v)| l.get(k) == Some(v)))
                }))
    }
}

impl OperationMatch {
    fn matches(&self, a: &RequestAttrs<'_>, lenient_l7: bool) -> bool {
        let port_ok = (self.ports.is_empty() || self.ports.contains(&a.destination_port))
            && !self.not_ports.contains(&a.destination_port);
        if !port_ok {
            return false;
        }
        // Hosts: the HTTP host, else the TLS SNI (so TLS passthrough can be authorized by name).
        let host = a.http.map(|h| h.host).or(a.sni);
        let hosts_set = !(self.hosts.is_empty() && self.not_hosts.is_empty());
        match a.http {
            Some(h) => {
                (self.hosts.is_empty() || self.hosts.iter().any(|p| p.matches_ci(h.host)))
                    && !self.not_hosts.iter().any(|p| p.matches_ci(h.host))
                    && (self.methods.is_empty() || self.method_matches(h.method))
                    && !any_pat(&self.not_methods, Some(h.method))
                    && (self.paths.is_empty() || any_pat(&self.paths, Some(h.path)))
                    && !any_pat(&self.not_paths, Some(h.path))
            }
            None => {
                if self.needs_http() || (hosts_set && host.is_none()) {
                    return lenient_l7;
                }
                match host {
                    Some(h) => {
                        (self.hosts.is_empty() || self.hosts.iter().any(|p| p.matches_ci(h)))
                            && !self.not_hosts.iter().any(|p| p.matches_ci(h))
                    }
                    None => true,
                }
            }
        }
    }
}

impl Condition {
    fn matches(&self, a: &RequestAttrs<'_>, lenient_l7: bool) -> bool {
        let ip_in = |vals: &[ConditionValue], ip: Option<IpAddr>| {
            ip.is_some_and(|ip| vals.iter().any(|v| v.contains_ip(ip)))
        };
        let str_in = |vals: &[ConditionValue], s: Option<&str>| {
            s.is_some_and(|s| vals.iter().any(|v| v.matches_str(s)))
        };
        let check = |vals: &[ConditionValue]| -> Option<bool> {
            Some(match &self.key {
                ConditionKey::SourceIp => ip_in(vals, a.source_ip),
                ConditionKey::RemoteIp => ip_in(vals, a.remote()),
                ConditionKey::DestinationIp => ip_in(vals, a.destination_ip),
                ConditionKey::SourceNamespace => str_in(vals, a.namespace()),
                ConditionKey::SourcePrincipal => str_in(vals, a.principal()),
                ConditionKey::DestinationPort => vals.iter().any(|v| v.is_port(a.destination_port)),
                ConditionKey::ConnectionSni => str_in(vals, a.sni),
                ConditionKey::RequestHeader(name) => {
                    // The name is looked up once per condition; no per-request allocation.
                    let values = a.http?.headers.get_all(name);
                    vals.iter().any(|v| {
                        values
                            .iter()
                            .filter_map(|hv| hv.to_str().ok())
                            .any(|hv| v.matches_str(hv))
                    })
                }
            })
        };
        let pos = if self.values.is_empty() {
            Some(true)
        } else {
            check(&self.values)
        };
        let neg = if self.not_values.is_empty() {
            Some(false)
        } else {
            check(&self.not_values)
        };
        match (pos, neg) {
            (Some(p), Some(n)) => p && !n,
            // HTTP-only condition evaluated at L4.
            _ => lenient_l7,
        }
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

// ---------------------------------------------------------------- compile

pub(crate) fn compile(
    name: NamespacedName,
    spec: &m::AuthorizationPolicySpec,
    e: &mut ObjErrors<'_>,
) -> Option<Policy> {
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => {
            e.push(
                "spec.action",
                "CUSTOM (external authorization) is not supported",
            );
            return None;
        }
        other => {
            e.push(
                "spec.action",
                format!("unknown action {other:?} (ALLOW, DENY, AUDIT)"),
            );
            return None;
        }
    };
    if spec.provider.is_some() {
        e.push(
            "spec.provider",
            "provider is only meaningful with CUSTOM, which is not supported",
        );
    }
    // `rules` absent: ALLOW matches nothing (Istio: allow-nothing); `rules: [{}]` matches all.
    let rules = spec.rules.as_deref().unwrap_or(&[]);
    let mut out = Vec::with_capacity(rules.len());
    for (i, r) in rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let from = r
            .from
            .iter()
            .enumerate()
            .map(|(j, f)| {
                source(
                    &f.source,
                    &name.namespace,
                    &format!("{path}.from[{j}].source"),
                    e,
                )
            })
            .collect();
        let to =
            r.to.iter()
                .enumerate()
                .map(|(j, t)| operation(&t.operation, &format!("{path}.to[{j}].operation"), e))
                .collect();
        let when = r
            .when
            .iter()
            .enumerate()
            .filter_map(|(j, c)| condition(c, &format!("{path}.when[{j}]"), e))
            .collect();
        out.push(Rule { from, to, when });
    }
    Some(Policy {
        name,
        action,
        rules: out,
    })
}

fn pats(v: &[String]) -> Vec<StrPattern> {
    v.iter().map(|s| StrPattern::parse(s)).collect()
}

fn nets(v: &[String], path: &str, e: &mut ObjErrors<'_>) -> Vec<IpNet> {
    v.iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let n = parse_net(s);
            if n.is_none() {
                e.push(
                    format!("{path}[{i}]"),
                    format!("{s:?} is not an IP address or CIDR"),
                );
            }
            n
        })
        .collect()
}

fn source(s: &m::Source, policy_ns: &str, path: &str, e: &mut ObjErrors<'_>) -> SourceMatch {
    if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
        let f = if s.request_principals.is_empty() {
            "notRequestPrincipals"
        } else {
            "requestPrincipals"
        };
        e.push(
            format!("{path}.{f}"),
            "request principals (JWT) are not supported",
        );
    }
    let mut principals = pats(&s.principals);
    let mut not_principals = pats(&s.not_principals);
    // serviceAccounts: `ns/sa` or `sa` (policy namespace) → principal suffix `/ns/<ns>/sa/<sa>`.
    let sa = |v: &String| {
        let (ns, sa) = v.split_once('/').unwrap_or((policy_ns, v));
        StrPattern::Suffix(format!("/ns/{ns}/sa/{sa}"))
    };
    principals.extend(s.service_accounts.iter().map(sa));
    not_principals.extend(s.not_service_accounts.iter().map(sa));
    SourceMatch {
        principals,
        not_principals,
        namespaces: pats(&s.namespaces),
        not_namespaces: pats(&s.not_namespaces),
        ip_blocks: nets(&s.ip_blocks, &format!("{path}.ipBlocks"), e),
        not_ip_blocks: nets(&s.not_ip_blocks, &format!("{path}.notIpBlocks"), e),
        remote_ip_blocks: nets(&s.remote_ip_blocks, &format!("{path}.remoteIpBlocks"), e),
        not_remote_ip_blocks: nets(
            &s.not_remote_ip_blocks,
            &format!("{path}.notRemoteIpBlocks"),
            e,
        ),
        workloads: Vec::new(),
    }
}

fn ports(v: &[crate::model::IntOrString], path: &str, e: &mut ObjErrors<'_>) -> Vec<u16> {
    v.iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let s = p.to_string();
            let n = s.parse::<u16>().ok().filter(|n| *n != 0);
            if n.is_none() {
                e.push(
                    format!("{path}[{i}]"),
                    format!("{s:?} is not a port number"),
                );
            }
            n
        })
        .collect()
}

fn operation(o: &m::Operation, path: &str, e: &mut ObjErrors<'_>) -> OperationMatch {
    let methods = pats(&o.methods);
    OperationMatch {
        hosts: pats(&o.hosts),
        not_hosts: pats(&o.not_hosts),
        ports: ports(&o.ports, &format!("{path}.ports"), e),
        not_ports: ports(&o.not_ports, &format!("{path}.notPorts"), e),
        method_set: method_set(&methods),
        methods,
        not_methods: pats(&o.not_methods),
        paths: pats(&o.paths),
        not_paths: pats(&o.not_paths),
    }
}

fn condition(c: &m::Condition, path: &str, e: &mut ObjErrors<'_>) -> Option<Condition> {
    let key = match c.key.as_str() {
        "source.ip" => ConditionKey::SourceIp,
        "remote.ip" => ConditionKey::RemoteIp,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.principal" => ConditionKey::SourcePrincipal,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        "connection.sni" => ConditionKey::ConnectionSni,
        k => match k
            .strip_prefix("request.headers[")
            .and_then(|r| r.strip_suffix(']'))
            // `from_bytes` lower-cases: header names match case-insensitively.
            .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
        {
            Some(h) => ConditionKey::RequestHeader(h),
            None => {
                e.push(
                    format!("{path}.key"),
                    format!(
                        "unsupported condition key {k:?} (supported: source.ip, remote.ip, source.namespace, \
                         source.principal, destination.ip, destination.port, connection.sni, request.headers[<name>])"
                    ),
                );
                return None;
            }
        },
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        e.push(path, "needs values or notValues");
    }
    let mut ok = true;
    let mut parse = |field: &str, vals: &[String]| -> Vec<ConditionValue> {
        vals.iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let parsed = ConditionValue::parse(&key, v);
                if parsed.is_none() {
                    e.push(
                        format!("{path}.{field}[{i}]"),
                        format!("invalid value {v:?} for {}", c.key),
                    );
                    ok = false;
                }
                parsed
            })
            .collect()
    };
    let values = parse("values", &c.values);
    let not_values = parse("notValues", &c.not_values);
    ok.then_some(Condition {
        key,
        values,
        not_values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SourceRef;

    #[test]
    fn method_bit_sets_agree_with_the_patterns() {
        // (patterns, request method, matches, compiled to a bit set)
        let cases: &[(&[&str], &str, bool, bool)] = &[
            (&["GET"], "GET", true, true),
            (&["POST", "PUT"], "GET", false, true),
            (&["POST", "PUT"], "PUT", true, true),
            (
                &["DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "HEAD"],
                "TRACE",
                true,
                true,
            ),
            // Case-sensitive, as Istio.
            (&["GET"], "get", false, true),
            // A non-standard request method never equals a standard pattern.
            (&["GET", "POST"], "PURGE", false, true),
            // Non-standard or wildcard patterns keep the string match.
            (&["PURGE"], "PURGE", true, false),
            (&["GET", "PURGE"], "GET", true, false),
            (&["G*"], "GET", true, false),
            (&["*"], "PATCH", true, false),
        ];
        for (patterns, method, want, compiled) in cases {
            let methods: Vec<StrPattern> = patterns.iter().map(|p| StrPattern::parse(p)).collect();
            let op = OperationMatch {
                method_set: method_set(&methods),
                methods: methods.clone(),
                ..Default::default()
            };
            assert_eq!(op.method_set.is_some(), *compiled, "{patterns:?}");
            assert_eq!(op.method_matches(method), *want, "{patterns:?} vs {method}");
            assert_eq!(
                op.method_matches(method),
                any_pat(&methods, Some(method)),
                "{patterns:?} vs {method}: the bit set decides as the patterns do"
            );
        }
        assert_eq!(method_set(&[]), None);
    }

    #[test]
    fn rule_filters_skip_only_rules_that_cannot_match() {
        // Every rule against every request, at L7 and at L4, in DENY and ALLOW policies: the
        // filtered evaluation decides as the rule alone does, and the filter does skip the rules
        // a method or an exact principal rules out.
        let rules = [
            "{}",
            "{to: [{operation: {methods: [POST, PUT]}}]}",
            "{to: [{operation: {methods: [GET]}}, {operation: {paths: [/x]}}]}",
            "{to: [{operation: {methods: [PURGE]}}]}",
            "{to: [{operation: {methods: [G*]}}]}",
            "{to: [{operation: {ports: ['8080']}}]}",
            "{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}",
            "{from: [{source: {principals: [cluster.local/ns/a/sa/x, cluster.local/ns/b/sa/y]}}]}",
            "{from: [{source: {principals: [cluster.local/ns/default/*]}}]}",
            "{from: [{source: {principals: ['*']}}]}",
            "{from: [{source: {notPrincipals: [cluster.local/ns/default/sa/sleep]}}]}",
            "{from: [{source: {namespaces: [default]}}, {source: {principals: [cluster.local/ns/a/sa/x]}}]}",
            "{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}], to: [{operation: {methods: [DELETE]}}]}",
            "{from: [{source: {serviceAccounts: [default/sleep]}}]}",
            "{from: [{source: {principals: [cluster.local/ns/a/sa/x, cluster.local/ns/default/*]}}]}",
            "{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}, {source: {principals: ['*/sa/sleep']}}]}",
            "{to: [{operation: {methods: [GET], notMethods: [POST]}}, {operation: {notMethods: [DELETE]}}]}",
        ];
        let principals = [
            None,
            Some(SLEEP),
            Some(OTHER),
            Some("spiffe://cluster.local/ns/a/sa/x"),
            Some("cluster.local/ns/b/sa/y"),
        ];
        let methods = ["GET", "POST", "DELETE", "PURGE", "get"];
        let headers = http::HeaderMap::new();
        let mut skipped = 0;
        for (i, rule) in rules.iter().enumerate() {
            for action in ["ALLOW", "DENY"] {
                let p = policy(
                    "ns",
                    &format!("r{i}"),
                    &format!("action: {action}\nrules: [{rule}]"),
                );
                for principal in principals {
                    for http in [None, Some(())] {
                        for method in methods {
                            let a = RequestAttrs {
                                source_principal: principal,
                                destination_port: 80,
                                http: http.map(|()| HttpAttrs {
                                    host: "h.example",
                                    method,
                                    path: "/x",
                                    headers: &headers,
                                }),
                                ..Default::default()
                            };
                            let deny = p.action == Action::Deny;
                            let reference = p.rules[0].matches(&a, deny);
                            let want = match (deny, reference) {
                                (true, true) => Decision::Deny {
                                    policy: Some(p.name.clone()),
                                },
                                (false, false) => Decision::Deny { policy: None },
                                _ => Decision::Allow,
                            };
                            assert_eq!(
                                set(std::slice::from_ref(&p)).evaluate(&a),
                                want,
                                "{action} {rule} for {principal:?} {method} (http: {})",
                                http.is_some()
                            );
                            if !RuleFilter::of(&p.rules[0]).admits(RequestBits::of(&a)) {
                                assert!(!reference);
                                skipped += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(skipped > 100, "the filters skipped only {skipped} rules");
        let f = |rule: &str| {
            RuleFilter::of(&policy("ns", "f", &format!("action: ALLOW\nrules: [{rule}]")).rules[0])
        };
        let get = HttpAttrs {
            host: "h",
            method: "GET",
            path: "/",
            headers: &headers,
        };
        let sleep_get = RequestBits::of(&RequestAttrs {
            source_principal: Some(SLEEP),
            http: Some(get),
            ..Default::default()
        });
        assert!(!f(rules[1]).admits(sleep_get), "POST, PUT rule vs GET");
        assert!(f(rules[2]).admits(sleep_get));
        assert!(f(rules[6]).admits(sleep_get), "the exact principal");
        assert_eq!(
            f(rules[8]).principals,
            ANY_PRINCIPAL,
            "a prefix is not filtered"
        );
        assert!(
            !f(rules[12]).admits(sleep_get),
            "right principal, wrong method"
        );
    }

    #[test]
    fn filtered_evaluation_reports_the_first_matching_deny_policy() {
        // The first DENY policy's rules are all filtered out (wrong method, other principal),
        // the second's match: its name is the one reported, from the second set too, and an
        // ALLOW set whose rules are all filtered out denies with no policy named.
        let deny =
            |name: &str, rules: &str| policy("ns", name, &format!("action: DENY\nrules: {rules}"));
        let skipped = deny(
            "skipped",
            "[{to: [{operation: {methods: [POST]}}]}, {from: [{source: {principals: [cluster.local/ns/a/sa/x]}}]}]",
        );
        let hit = deny(
            "hit",
            "[{to: [{operation: {methods: [PUT]}}]}, {to: [{operation: {paths: [/x]}}]}]",
        );
        let later = deny("later", "[{}]");
        let headers = http::HeaderMap::new();
        let a = RequestAttrs {
            source_principal: Some(SLEEP),
            http: Some(HttpAttrs {
                host: "h",
                method: "GET",
                path: "/x",
                headers: &headers,
            }),
            ..Default::default()
        };
        let named = |n: &str| Decision::Deny {
            policy: Some(NamespacedName::new("ns", n)),
        };
        let first = set(std::slice::from_ref(&skipped));
        let second = set(&[hit.clone(), later]);
        assert_eq!(evaluate_all(&[&first, &second], &a), named("hit"));
        assert_eq!(set(&[skipped, hit]).evaluate(&a), named("hit"));
        let allow_none = set(&[policy(
            "ns",
            "allow-post",
            "action: ALLOW\nrules: [{to: [{operation: {methods: [POST]}}]}]",
        )]);
        assert_eq!(
            evaluate_all(&[&first, &allow_none], &a),
            Decision::Deny { policy: None }
        );
        assert_eq!(evaluate_all(&[&first], &a), Decision::Allow);
    }

    /// How `when` string values were matched before they were pre-parsed (parsing the
    /// pattern on every request): the reference the compiled form must agree with.
    fn reference_pattern_matches(pat: &str, v: &str) -> bool {
        if pat == "*" {
            !v.is_empty()
        } else if let Some(p) = pat.strip_suffix('*') {
            v.starts_with(p)
        } else if let Some(p) = pat.strip_prefix('*') {
            v.ends_with(p)
        } else {
            pat == v
        }
    }

    #[test]
    fn preparsed_string_conditions_agree_with_the_reference() {
        let pats = ["*", "", "a", "a*", "*a", "ab*", "*ab", "**", "a*b"];
        let vals = ["", "a", "b", "ab", "ba", "aab", "abb", "*", "a*b"];
        let mut headers = http::HeaderMap::new();
        for p in pats {
            let allow = |key: &str| {
                let yaml = format!("rules: [{{when: [{{key: '{key}', values: ['{p}']}}]}}]");
                set(&[policy("ns", "p", &yaml)])
            };
            let (sni, header, ns) = (
                allow("connection.sni"),
                allow("request.headers[X-Tag]"),
                allow("source.namespace"),
            );
            for v in vals {
                let want = reference_pattern_matches(p, v);
                let by_sni = RequestAttrs {
                    sni: Some(v),
                    ..Default::default()
                };
                assert_eq!(sni.evaluate(&by_sni).is_allow(), want, "sni {p:?} vs {v:?}");
                let by_ns = RequestAttrs {
                    source_namespace: Some(v),
                    ..Default::default()
                };
                assert_eq!(ns.evaluate(&by_ns).is_allow(), want, "ns {p:?} vs {v:?}");
                headers.insert(
                    "x-tag",
                    http::HeaderValue::from_str(v).expect("header value"),
                );
                let by_header = RequestAttrs {
                    http: Some(HttpAttrs {
                        host: "h",
                        method: "GET",
                        path: "/",
                        headers: &headers,
                    }),
                    ..Default::default()
                };
                assert_eq!(
                    header.evaluate(&by_header).is_allow(),
                    want,
                    "header {p:?} vs {v:?}"
                );
            }
        }
    }

    #[test]
    fn condition_values_are_parsed_at_compile_time() {
        let p = policy(
            "ns",
            "p",
            r#"
rules:
- when:
  - {key: source.ip, values: ["10.0.0.0/8", "192.0.2.1"], notValues: ["10.1.0.0/16"]}
  - {key: destination.port, values: ["443"]}
  - {key: "request.headers[X-Env]", values: ["prod*", "*-eu", "*", "canary"]}
"#,
        );
        let when = &p.rules[0].when;
        let net = |s: &str| ConditionValue::Net(s.parse().expect("cidr"));
        let pat = |p: StrPattern| ConditionValue::Pattern(p);
        assert_eq!(when[0].key, ConditionKey::SourceIp);
        assert_eq!(when[0].values, [net("10.0.0.0/8"), net("192.0.2.1/32")]);
        assert_eq!(when[0].not_values, [net("10.1.0.0/16")]);
        assert_eq!(when[1].values, [ConditionValue::Port(443)]);
        assert_eq!(
            when[2].key,
            ConditionKey::RequestHeader(http::HeaderName::from_static("x-env"))
        );
        assert_eq!(
            when[2].values,
            [
                pat(StrPattern::Prefix("prod".into())),
                pat(StrPattern::Suffix("-eu".into())),
                pat(StrPattern::Any),
                pat(StrPattern::Exact("canary".into())),
            ]
        );
        // Shown in config dumps as the plain values, like the other match fields.
        let dump = serde_json::to_value(&when[..2]).expect("json");
        assert_eq!(
            dump,
            serde_json::json!([
                {"key": "source_ip", "values": ["10.0.0.0/8", "192.0.2.1/32"],
                 "not_values": ["10.1.0.0/16"]},
                {"key": "destination_port", "values": [443], "not_values": []},
            ])
        );
    }

    #[test]
    fn ip_and_port_conditions() {
        let allow = |when: &str| set(&[policy("ns", "p", &format!("rules: [{{when: [{when}]}}]"))]);
        let src = |ip: &str| RequestAttrs {
            source_ip: ip.parse().ok(),
            ..Default::default()
        };
        let cases: &[(&str, RequestAttrs<'_>, bool)] = &[
            (
                "{key: source.ip, values: ['10.0.0.0/8']}",
                src("10.2.3.4"),
                true,
            ),
            (
                "{key: source.ip, values: ['10.0.0.0/8']}",
                src("11.0.0.1"),
                false,
            ),
            (
                "{key: source.ip, values: ['10.0.0.0/8']}",
                RequestAttrs::default(),
                false,
            ),
            (
                "{key: source.ip, values: ['192.0.2.1']}",
                src("192.0.2.1"),
                true,
            ),
            (
                "{key: source.ip, values: ['192.0.2.1']}",
                src("192.0.2.2"),
                false,
            ),
            (
                "{key: source.ip, values: ['2001:db8::/32']}",
                src("2001:db8::1"),
                true,
            ),
            (
                "{key: source.ip, values: ['10.0.0.0/8'], notValues: ['10.1.0.0/16']}",
                src("10.1.2.3"),
                false,
            ),
            (
                "{key: remote.ip, values: ['203.0.113.0/24']}",
                RequestAttrs {
                    source_ip: "10.0.0.1".parse().ok(),
                    remote_ip: "203.0.113.9".parse().ok(),
                    ..Default::default()
                },
                true,
            ),
            (
                "{key: destination.ip, notValues: ['169.254.0.0/16']}",
                RequestAttrs {
                    destination_ip: "169.254.169.254".parse().ok(),
                    ..Default::default()
                },
                false,
            ),
            (
                "{key: destination.port, values: ['443', '8443']}",
                RequestAttrs {
                    destination_port: 8443,
                    ..Default::default()
                },
                true,
            ),
            (
                "{key: destination.port, notValues: ['80']}",
                RequestAttrs {
                    destination_port: 80,
                    ..Default::default()
                },
                false,
            ),
            (
                "{key: source.principal, values: ['*/sa/sleep']}",
                RequestAttrs {
                    source_principal: Some(SLEEP),
                    ..Default::default()
                },
                true,
            ),
            // An HTTP-only condition at L4 does not match in an ALLOW policy.
            (
                "{key: 'request.headers[x-env]', values: ['*']}",
                RequestAttrs::default(),
                false,
            ),
        ];
        for (when, attrs, want) in cases {
            assert_eq!(allow(when).evaluate(attrs).is_allow(), *want, "{when}");
        }
    }

    #[test]
    fn invalid_condition_values_are_named() {
        let (p, out) = compile_yaml(
            "ns",
            "p",
            "rules: [{when: [{key: source.ip, values: ['10.0.0.0/8', nope]}, \
             {key: destination.port, notValues: ['http']}]}]",
        );
        let p = p.expect("policy");
        let paths: Vec<_> = out.iter().map(|e| e.path.as_deref()).collect();
        assert_eq!(
            paths,
            [
                Some("spec.rules[0].when[0].values[1]"),
                Some("spec.rules[0].when[1].notValues[0]")
            ]
        );
        // A condition with an invalid value is dropped (the object is reported invalid).
        assert!(p.rules[0].when.is_empty());
    }

    /// Compiles one policy's spec, returning it and the errors reported against it.
    fn compile_yaml(
        ns: &str,
        name: &str,
        yaml: &str,
    ) -> (Option<Policy>, Vec<crate::error::ConfigError>) {
        let spec: m::AuthorizationPolicySpec = serde_yaml_ng::from_str(yaml).unwrap();
        let src = SourceRef {
            file: "t.yaml".into(),
            document: 1,
        };
        let mut out = Vec::new();
        let mut e = ObjErrors {
            source: &src,
            kind: "AuthorizationPolicy",
            object: format!("{ns}/{name}"),
            out: &mut out,
        };
        let p = compile(NamespacedName::new(ns, name), &spec, &mut e);
        (p, out)
    }

    fn policy(ns: &str, name: &str, yaml: &str) -> Arc<Policy> {
        let (p, out) = compile_yaml(ns, name, yaml);
        assert!(out.is_empty(), "{out:?}");
        Arc::new(p.unwrap())
    }

    fn set(ps: &[Arc<Policy>]) -> AuthzPolicies {
        let mut s = AuthzPolicies::default();
        for p in ps {
            s.push(p.clone());
        }
        s
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/curl";

    #[test]
    fn evaluate_table() {
        let allow_sleep_get = policy(
            "istio-egress",
            "allow-sleep",
            r#"
action: ALLOW
rules:
- from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
  to: [{operation: {methods: ["GET", "HEAD"], paths: ["/public*"]}}]
"#,
        );
        let deny_admin = policy(
            "istio-egress",
            "deny-admin",
            r#"
action: DENY
rules:
- to: [{operation: {paths: ["/public/admin*"]}}]
"#,
        );
        let audit_all = policy("istio-egress", "audit", "action: AUDIT\nrules: [{}]\n");
        let allow_nothing = policy("istio-egress", "nothing", "{}");
        let allow_ns = policy(
            "istio-egress",
            "allow-ns",
            r#"
rules:
- from: [{source: {namespaces: ["other"], notIpBlocks: ["10.0.0.0/8"]}}]
  to: [{operation: {ports: ["443"], hosts: ["*.aliyun.com"]}}]
  when: [{key: connection.sni, values: ["www.aliyun.com"]}]
"#,
        );
        let headers = http::HeaderMap::new();
        let http = |method: &'static str, path: &'static str| HttpAttrs {
            host: "aliyun.com",
            method,
            path,
            headers: &headers,
        };
        let deny_none = Decision::Deny { policy: None };
        let denied_by = |n: &str| Decision::Deny {
            policy: Some(NamespacedName::new("istio-egress", n)),
        };

        struct Case<'a> {
            name: &'a str,
            set: AuthzPolicies,
            attrs: RequestAttrs<'a>,
            want: Decision,
        }
        let cases = vec![
            Case {
                name: "no policies allow",
                set: set(&[]),
                attrs: RequestAttrs::default(),
                want: Decision::Allow,
            },
            Case {
                name: "allow matches",
                set: set(std::slice::from_ref(&allow_sleep_get)),
                attrs: RequestAttrs {
                    source_principal: Some(SLEEP),
                    destination_port: 80,
                    http: Some(http("GET", "/public/x")),
                    ..Default::default()
                },
                want: Decision::Allow,
            },
            Case {
                name: "allow present, wrong method",
                set: set(std::slice::from_ref(&allow_sleep_get)),
                attrs: RequestAttrs {
                    source_principal: Some(SLEEP),
                    destination_port: 80,
                    http: Some(http("POST", "/public/x")),
                    ..Default::default()
                },
                want: deny_none.clone(),
            },
            Case {
                name: "allow present, wrong principal",
                set: set(std::slice::from_ref(&allow_sleep_get)),
                attrs: RequestAttrs {
                    source_principal: Some(OTHER),
                    http: Some(http("GET", "/public")),
                    ..Default::default()
                },
                want: deny_none.clone(),
            },
            Case {
                name: "deny beats allow",
                set: set(&[allow_sleep_get.clone(), deny_admin.clone()]),
                attrs: RequestAttrs {
                    source_principal: Some(SLEEP),
                    http: Some(http("GET", "/public/admin/x")),
                    ..Default::default()
                },
                want: denied_by("deny-admin"),
            },
            Case {
                name: "audit never decides",
                set: set(std::slice::from_ref(&audit_all)),
                attrs: RequestAttrs::default(),
                want: Decision::Allow,
            },
            Case {
                name: "allow nothing",
                set: set(std::slice::from_ref(&allow_nothing)),
                attrs: RequestAttrs::default(),
                want: deny_none.clone(),
            },
            Case {
                name: "L4: allow with L7 rule does not match",
                set: set(std::slice::from_ref(&allow_sleep_get)),
                attrs: RequestAttrs {
                    source_principal: Some(SLEEP),
                    destination_port: 80,
                    ..Default::default()
                },
                want: deny_none.clone(),
            },
            Case {
                name: "L4: deny with L7 rule denies (fail closed)",
                set: set(std::slice::from_ref(&deny_admin)),
                attrs: RequestAttrs {
                    source_principal: Some(SLEEP),
                    destination_port: 80,
                    ..Default::default()
                },
                want: denied_by("deny-admin"),
            },
            Case {
                name: "TLS by SNI, namespace, port, not ipBlock",
                set: set(std::slice::from_ref(&allow_ns)),
                attrs: RequestAttrs {
                    source_principal: Some(OTHER),
                    source_ip: "192.168.0.1".parse().ok(),
                    destination_port: 443,
                    sni: Some("www.aliyun.com"),
                    ..Default::default()
                },
                want: Decision::Allow,
            },
            Case {
                name: "notIpBlocks excludes",
                set: set(std::slice::from_ref(&allow_ns)),
                attrs: RequestAttrs {
                    source_principal: Some(OTHER),
                    source_ip: "10.1.2.3".parse().ok(),
                    destination_port: 443,
                    sni: Some("www.aliyun.com"),
                    ..Default::default()
                },
                want: deny_none.clone(),
            },
            Case {
                name: "wrong SNI fails when",
                set: set(std::slice::from_ref(&allow_ns)),
                attrs: RequestAttrs {
                    source_principal: Some(OTHER),
                    destination_port: 443,
                    sni: Some("api.aliyun.com"),
                    ..Default::default()
                },
                want: deny_none.clone(),
            },
        ];
        for c in cases {
            assert_eq!(c.set.evaluate(&c.attrs), c.want, "{}", c.name);
        }
    }

    #[test]
    fn workload_selector_source() {
        let mut p = (*policy("istio-egress", "asm", "rules: [{}]")).clone();
        p.rules[0].from.push(SourceMatch {
            workloads: vec![WorkloadSelector {
                namespace: "default".into(),
                labels: [("app".to_string(), "sleep".to_string())].into(),
            }],
            ..Default::default()
        });
        let s = set(&[Arc::new(p)]);
        let sleep_labels: Labels = [
            ("app".to_string(), "sleep".to_string()),
            ("x".into(), "y".into()),
        ]
        .into();
        let other_labels: Labels = [("app".to_string(), "curl".to_string())].into();
        let ok = RequestAttrs {
            source_principal: Some(SLEEP),
            source_labels: Some(&sleep_labels),
            ..Default::default()
        };
        assert_eq!(s.evaluate(&ok), Decision::Allow);
        let wrong_labels = RequestAttrs {
            source_labels: Some(&other_labels),
            ..ok
        };
        assert!(!s.evaluate(&wrong_labels).is_allow());
        let wrong_ns = RequestAttrs {
            source_principal: Some(OTHER),
            ..ok
        };
        assert!(!s.evaluate(&wrong_ns).is_allow());
        let no_labels = RequestAttrs {
            source_labels: None,
            ..ok
        };
        assert!(!s.evaluate(&no_labels).is_allow());
    }

    #[test]
    fn unsupported_when_key_is_named() {
        let (_, out) = compile_yaml(
            "ns",
            "p",
            "rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]",
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].path.as_deref(), Some("spec.rules[0].when[0].key"));
        assert!(
            out[0].message.contains("request.auth.claims[iss]"),
            "{}",
            out[0].message
        );
    }

    #[test]
    fn patterns() {
        let cases = [
            ("*", "x", true),
            ("*", "", false),
            ("abc*", "abcdef", true),
            ("*def", "abcdef", true),
            ("abc", "abcd", false),
        ];
        for (p, v, want) in cases {
            assert_eq!(StrPattern::parse(p).matches(v), want, "{p} {v}");
        }
    }
}
