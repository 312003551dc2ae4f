//! Which A/AAAA queries the proxy answers itself, and with what.
//!
//! This mirrors the lookup of Istio's ztunnel DNS proxy (`src/dns/server.rs`, `Store`):
//!
//! 1. The candidate names ("aliases") for a query `q.` are, in order:
//!    - `q` itself;
//!    - the Kubernetes expansions of a short name: `svc` → `svc.<ns>.svc.<domain>`,
//!      `svc.ns` → `svc.ns.svc.<domain>`, `svc.ns.svc` → `svc.ns.svc.<domain>`;
//!    - for every search domain `s` that `q` ends with, `q` with `s` stripped, and the
//!      Kubernetes expansions of that stripped name.
//! 2. Each alias is tried as-is and then as wildcards of decreasing specificity
//!    (`a.b.c` → `*.b.c` → `*.c`); the first hit wins.
//! 3. A hit found through a stripped search domain is answered with a CNAME from the queried
//!    name to the stripped name plus the addresses under the stripped name (unless the hit was a
//!    wildcard, in which case — like ztunnel — the addresses are put directly under the queried
//!    name). So `aliyun.com.default.svc.cluster.local.` from a pod in `default` is answered
//!    `CNAME aliyun.com.` + `A <VIP>`: the client ends up with the VIP for the real host it
//!    meant, saving the round trips through the search list, and its canonical name is right.
//!    All other hits are answered under the queried name.
//! 4. A host that is found but has no address of the queried family is answered NOERROR with no
//!    records (NODATA), never NXDOMAIN, so resolvers asking A and AAAA in parallel keep the other
//!    family's answer.
//!
//! Differences from ztunnel, on purpose: no headless-service/pod-hostname forms (the name table
//! has no per-pod records) and no per-network VIP filtering (a table entry is one address list).

use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::Error;

/// TTL of the records the proxy answers itself (Istio's value).
pub const LOCAL_TTL_SECS: u32 = 30;

/// The mesh's hostname → address table, consulted on every query (it may change at any time).
///
/// `fqdn` is lowercase ASCII (IDNs in punycode) without the trailing dot, e.g. `aliyun.com`,
/// `reviews.default.svc.cluster.local`, or a wildcard such as `*.aliyun.com`.
///
/// Return `None` for a host the mesh does not know; the query is then forwarded upstream. A
/// host known without any address is treated the same way (there is nothing to answer with).
pub trait NameTable: Send + Sync {
    /// The addresses (service VIPs) of `fqdn`, if it is a mesh host.
    fn lookup(&self, fqdn: &str) -> Option<Vec<IpAddr>>;
}

impl<F> NameTable for F
where
    F: Fn(&str) -> Option<Vec<IpAddr>> + Send + Sync,
{
    fn lookup(&self, fqdn: &str) -> Option<Vec<IpAddr>> {
        self(fqdn)
    }
}

/// What the proxy knows about the pod it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDnsContext {
    namespace: String,
    cluster_domain: String,
    extra_search_domains: Vec<String>,
    ipv6_enabled: bool,
}

impl PodDnsContext {
    /// A pod in `namespace`, cluster domain `cluster.local`, IPv6 answers enabled.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            cluster_domain: "cluster.local".to_owned(),
            extra_search_domains: Vec::new(),
            ipv6_enabled: true,
        }
    }

    /// The cluster DNS domain (default `cluster.local`).
    pub fn with_cluster_domain(mut self, domain: impl Into<String>) -> Self {
        self.cluster_domain = domain.into();
        self
    }

    /// Search domains beyond the Kubernetes ones (`<ns>.svc.<domain>`, `svc.<domain>`,
    /// `<domain>`), typically the pod's resolv.conf `search` list. Duplicates are ignored.
    pub fn with_search_domains<I, S>(mut self, domains: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_search_domains = domains.into_iter().map(Into::into).collect();
        self
    }

    /// Whether AAAA queries for mesh hosts get IPv6 addresses (ztunnel's `ipv6_enabled`). When
    /// off they are answered NOERROR without records, so a v4-only pod never tries a v6 VIP.
    pub fn with_ipv6(mut self, enabled: bool) -> Self {
        self.ipv6_enabled = enabled;
        self
    }

    /// The pod's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

/// [`PodDnsContext`] compiled into DNS names once, so queries do no parsing.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// `<domain>.`
    domain: Name,
    /// `svc.<domain>.`
    svc_domain: Name,
    /// `<ns>.svc.<domain>.`
    namespaced_domain: Name,
    /// Kubernetes search domains first, then the extra ones.
    search: Vec<Name>,
    ipv6_enabled: bool,
}

fn fqdn(name: &str) -> Result<Name, Error> {
    let mut parsed = Name::from_ascii(name)
        .map_err(|source| Error::InvalidName {
            name: name.to_owned(),
            source,
        })?
        .to_lowercase();
    parsed.set_fqdn(true);
    Ok(parsed)
}

fn join(prefix: &str, suffix: &Name) -> Result<Name, Error> {
    fqdn(prefix)?
        .append_domain(suffix)
        .map_err(|source| Error::InvalidName {
            name: format!("{prefix}.{suffix}"),
            source,
        })
}

impl Names {
    pub(crate) fn compile(ctx: &PodDnsContext) -> Result<Self, Error> {
        let domain = fqdn(&ctx.cluster_domain)?;
        let svc_domain = join("svc", &domain)?;
        let namespaced_domain = join(&ctx.namespace, &svc_domain)?;
        let mut search = vec![
            namespaced_domain.clone(),
            svc_domain.clone(),
            domain.clone(),
        ];
        for extra in &ctx.extra_search_domains {
            let extra = fqdn(extra)?;
            // The root "domain" would strip every name to nothing.
            if !extra.is_root() && !search.contains(&extra) {
                search.push(extra);
            }
        }
        Ok(Self {
            domain,
            svc_domain,
            namespaced_domain,
            search,
            ipv6_enabled: ctx.ipv6_enabled,
        })
    }
}

/// The proxy's decision for one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LocalAnswer {
    /// Not a mesh host: forward upstream.
    Forward,
    /// A mesh host: answer authoritatively with these records (empty means NODATA).
    Records(Vec<Record>),
}

#[derive(Debug)]
struct Alias {
    /// Lowercase FQDN to look up.
    name: Name,
    /// The queried name with a search domain stripped, when this alias came from stripping.
    stripped: Option<Name>,
}

/// Decides how to answer an A or AAAA `query_name` (any other type is always forwarded).
pub(crate) fn answer(
    table: &dyn NameTable,
    names: &Names,
    query_name: &Name,
    query_type: RecordType,
) -> LocalAnswer {
    if !matches!(query_type, RecordType::A | RecordType::AAAA) {
        return LocalAnswer::Forward;
    }
    let mut lowered = query_name.to_lowercase();
    lowered.set_fqdn(true);

    let Some((alias, matched, addresses)) = find(table, names, &lowered) else {
        return LocalAnswer::Forward;
    };

    let wanted: Vec<IpAddr> = addresses
        .into_iter()
        .filter(|ip| match (ip, query_type) {
            (IpAddr::V4(_), RecordType::A) => true,
            (IpAddr::V6(_), RecordType::AAAA) => names.ipv6_enabled,
            _ => false,
        })
        .collect();
    if wanted.is_empty() {
        // Known host without an address of this family: NODATA, not NXDOMAIN.
        return LocalAnswer::Records(Vec::new());
    }

    let mut records = Vec::with_capacity(wanted.len() + 1);
    let mut owner = query_name.clone();
    if let Some(stripped) = alias.stripped
        && !matched.is_wildcard()
    {
        records.push(Record::from_rdata(
            query_name.clone(),
            LOCAL_TTL_SECS,
            RData::CNAME(CNAME(stripped.clone())),
        ));
        owner = stripped;
    }
    let mut wanted = wanted;
    // Spread clients over multiple VIPs, as ztunnel does.
    fastrand::shuffle(&mut wanted);
    records.extend(wanted.into_iter().map(|ip| {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        Record::from_rdata(owner.clone(), LOCAL_TTL_SECS, rdata)
    }));
    LocalAnswer::Records(records)
}

/// The first alias/wildcard with a non-empty entry in the table.
fn find(
    table: &dyn NameTable,
    names: &Names,
    lowered: &Name,
) -> Option<(Alias, Name, Vec<IpAddr>)> {
    for alias in aliases(names, lowered) {
        for candidate in wildcards(&alias.name) {
            if let Some(addresses) = table.lookup(&table_key(&candidate))
                && !addresses.is_empty()
            {
                return Some((alias, candidate, addresses));
            }
        }
    }
    None
}

/// `name` as the table spells it: lowercase ASCII without the trailing dot.
fn table_key(name: &Name) -> String {
    let mut key = name.to_ascii();
    if key.ends_with('.') {
        key.pop();
    }
    key
}

fn aliases(names: &Names, name: &Name) -> Vec<Alias> {
    let mut out: Vec<Alias> = Vec::new();
    let mut add = |alias: Alias| {
        if !out.iter().any(|a| a.name == alias.name) {
            out.push(alias);
        }
    };

    add(Alias {
        name: name.clone(),
        stripped: None,
    });
    for expanded in kube_fqdns(names, name) {
        add(Alias {
            name: expanded,
            stripped: None,
        });
    }
    for search in &names.search {
        let Some(stripped) = trim_domain(name, search) else {
            continue;
        };
        add(Alias {
            name: stripped.clone(),
            stripped: Some(stripped.clone()),
        });
        for expanded in kube_fqdns(names, &stripped) {
            add(Alias {
                name: expanded,
                stripped: Some(stripped.clone()),
            });
        }
    }
    out
}

/// The Kubernetes service FQDNs a short name can stand for.
fn kube_fqdns(names: &Names, name: &Name) -> Vec<Name> {
    let append = |suffix: &Name| name.clone().append_domain(suffix).ok();
    let ends_with_svc = name
        .iter()
        .next_back()
        .is_some_and(|label| label.eq_ignore_ascii_case(b"svc"));
    match name.num_labels() {
        // <service>
        1 => append(&names.namespaced_domain).into_iter().collect(),
        // <service>.<namespace>
        2 => append(&names.svc_domain).into_iter().collect(),
        // <service>.<namespace>.svc
        3 if ends_with_svc => append(&names.domain).into_iter().collect(),
        _ => Vec::new(),
    }
}

/// `name` without the `domain` suffix, if `name` is strictly inside `domain`.
fn trim_domain(name: &Name, domain: &Name) -> Option<Name> {
    let keep = usize::from(name.num_labels()).checked_sub(usize::from(domain.num_labels()))?;
    if keep == 0 || !domain.zone_of(name) {
        return None;
    }
    Name::from_labels(name.iter().take(keep)).ok()
}

/// `a.b.c.` → [`a.b.c.`, `*.b.c.`, `*.c.`].
fn wildcards(name: &Name) -> Vec<Name> {
    let mut out = vec![name.clone()];
    let mut rest = name.clone();
    while rest.num_labels() > 1 {
        out.push(rest.clone().into_wildcard());
        rest = rest.base_name();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn n(s: &str) -> Name {
        Name::from_ascii(s).expect("test name")
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse::<Ipv4Addr>().expect("test v4"))
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().expect("test v6"))
    }

    fn table() -> HashMap<&'static str, Vec<IpAddr>> {
        HashMap::from([
            ("aliyun.com", vec![v4("240.240.0.1")]),
            ("dual.example.com", vec![v4("240.240.0.2"), v6("2001:2::2")]),
            ("v6only.example.com", vec![v6("2001:2::3")]),
            ("*.wild.example.com", vec![v4("240.240.0.4")]),
            ("no-address.example.com", vec![]),
            ("reviews.default.svc.cluster.local", vec![v4("10.96.0.10")]),
            ("ratings.other.svc.cluster.local", vec![v4("10.96.0.11")]),
        ])
    }

    fn names() -> Names {
        Names::compile(&PodDnsContext::new("default").with_search_domains(["corp.example"]))
            .expect("valid context")
    }

    fn a(owner: &str, ip: &str) -> Record {
        Record::from_rdata(
            n(owner),
            LOCAL_TTL_SECS,
            RData::A(A(ip.parse().expect("ip"))),
        )
    }

    fn aaaa(owner: &str, ip: &str) -> Record {
        Record::from_rdata(
            n(owner),
            LOCAL_TTL_SECS,
            RData::AAAA(AAAA(ip.parse().expect("ip"))),
        )
    }

    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(n(owner), LOCAL_TTL_SECS, RData::CNAME(CNAME(n(target))))
    }

    #[test]
    fn answers() {
        let table = table();
        let lookup = move |fqdn: &str| table.get(fqdn).cloned();
        let names = names();
        let cases: Vec<(&str, RecordType, LocalAnswer)> = vec![
            // As-is.
            (
                "aliyun.com.",
                RecordType::A,
                LocalAnswer::Records(vec![a("aliyun.com.", "240.240.0.1")]),
            ),
            // Case of the query is kept in the answer; matching ignores it.
            (
                "AliYun.Com.",
                RecordType::A,
                LocalAnswer::Records(vec![a("AliYun.Com.", "240.240.0.1")]),
            ),
            // glibc's search-list forms: CNAME to the real host + its VIP.
            (
                "aliyun.com.default.svc.cluster.local.",
                RecordType::A,
                LocalAnswer::Records(vec![
                    cname("aliyun.com.default.svc.cluster.local.", "aliyun.com."),
                    a("aliyun.com.", "240.240.0.1"),
                ]),
            ),
            (
                "aliyun.com.svc.cluster.local.",
                RecordType::A,
                LocalAnswer::Records(vec![
                    cname("aliyun.com.svc.cluster.local.", "aliyun.com."),
                    a("aliyun.com.", "240.240.0.1"),
                ]),
            ),
            (
                "aliyun.com.cluster.local.",
                RecordType::A,
                LocalAnswer::Records(vec![
                    cname("aliyun.com.cluster.local.", "aliyun.com."),
                    a("aliyun.com.", "240.240.0.1"),
                ]),
            ),
            // A search domain from the pod's resolv.conf.
            (
                "aliyun.com.corp.example.",
                RecordType::A,
                LocalAnswer::Records(vec![
                    cname("aliyun.com.corp.example.", "aliyun.com."),
                    a("aliyun.com.", "240.240.0.1"),
                ]),
            ),
            // Another namespace's search domain is not ours: forwarded.
            (
                "aliyun.com.other.svc.cluster.local.",
                RecordType::A,
                LocalAnswer::Forward,
            ),
            // AAAA for a v4-only host: NODATA, and no CNAME either (as ztunnel).
            (
                "aliyun.com.",
                RecordType::AAAA,
                LocalAnswer::Records(vec![]),
            ),
            (
                "aliyun.com.default.svc.cluster.local.",
                RecordType::AAAA,
                LocalAnswer::Records(vec![]),
            ),
            (
                "dual.example.com.",
                RecordType::AAAA,
                LocalAnswer::Records(vec![aaaa("dual.example.com.", "2001:2::2")]),
            ),
            (
                "v6only.example.com.",
                RecordType::A,
                LocalAnswer::Records(vec![]),
            ),
            // Wildcards; via a search domain the records go under the queried name.
            (
                "api.wild.example.com.",
                RecordType::A,
                LocalAnswer::Records(vec![a("api.wild.example.com.", "240.240.0.4")]),
            ),
            (
                "api.wild.example.com.default.svc.cluster.local.",
                RecordType::A,
                LocalAnswer::Records(vec![a(
                    "api.wild.example.com.default.svc.cluster.local.",
                    "240.240.0.4",
                )]),
            ),
            // The wildcard does not cover its own apex.
            ("wild.example.com.", RecordType::A, LocalAnswer::Forward),
            // Kubernetes short names of services.
            (
                "reviews.",
                RecordType::A,
                LocalAnswer::Records(vec![a("reviews.", "10.96.0.10")]),
            ),
            (
                "ratings.other.",
                RecordType::A,
                LocalAnswer::Records(vec![a("ratings.other.", "10.96.0.11")]),
            ),
            (
                "ratings.other.svc.",
                RecordType::A,
                LocalAnswer::Records(vec![a("ratings.other.svc.", "10.96.0.11")]),
            ),
            (
                "reviews.default.svc.cluster.local.",
                RecordType::A,
                LocalAnswer::Records(vec![a("reviews.default.svc.cluster.local.", "10.96.0.10")]),
            ),
            // `ratings.other` + search domain `default.svc.cluster.local`.
            (
                "ratings.other.default.svc.cluster.local.",
                RecordType::A,
                LocalAnswer::Records(vec![
                    cname("ratings.other.default.svc.cluster.local.", "ratings.other."),
                    a("ratings.other.", "10.96.0.11"),
                ]),
            ),
            // A short name only expands into the pod's own namespace.
            ("ratings.", RecordType::A, LocalAnswer::Forward),
            // Unknown, address-less and non-A/AAAA: forwarded.
            ("example.org.", RecordType::A, LocalAnswer::Forward),
            (
                "no-address.example.com.",
                RecordType::A,
                LocalAnswer::Forward,
            ),
            ("aliyun.com.", RecordType::MX, LocalAnswer::Forward),
            ("aliyun.com.", RecordType::HTTPS, LocalAnswer::Forward),
            (".", RecordType::A, LocalAnswer::Forward),
        ];
        for (query, qtype, expected) in cases {
            let got = answer(&lookup, &names, &n(query), qtype);
            assert_eq!(got, expected, "{query} {qtype}");
        }
    }

    #[test]
    fn ipv6_disabled_gives_nodata_for_aaaa() {
        let table = table();
        let lookup = move |fqdn: &str| table.get(fqdn).cloned();
        let names =
            Names::compile(&PodDnsContext::new("default").with_ipv6(false)).expect("valid context");
        assert_eq!(
            answer(&lookup, &names, &n("dual.example.com."), RecordType::AAAA),
            LocalAnswer::Records(vec![])
        );
        assert_eq!(
            answer(&lookup, &names, &n("dual.example.com."), RecordType::A),
            LocalAnswer::Records(vec![a("dual.example.com.", "240.240.0.2")])
        );
    }

    #[test]
    fn multiple_addresses_are_all_returned() {
        let lookup =
            |fqdn: &str| (fqdn == "multi.example").then(|| vec![v4("10.0.0.1"), v4("10.0.0.2")]);
        let LocalAnswer::Records(records) =
            answer(&lookup, &names(), &n("multi.example."), RecordType::A)
        else {
            panic!("expected a local answer");
        };
        let mut ips: Vec<_> = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(A(ip)) => Some(*ip),
                _ => None,
            })
            .collect();
        ips.sort();
        assert_eq!(
            ips,
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );
    }

    #[test]
    fn lookup_keys_and_order() {
        // The table sees lowercase keys without the trailing dot, the exact name first.
        let seen = std::sync::Mutex::new(Vec::new());
        let lookup = |fqdn: &str| {
            seen.lock().expect("lock").push(fqdn.to_owned());
            None
        };
        let names = Names::compile(&PodDnsContext::new("ns1")).expect("valid context");
        assert_eq!(
            answer(
                &lookup,
                &names,
                &n("Foo.Bar.ns1.svc.cluster.local."),
                RecordType::A
            ),
            LocalAnswer::Forward
        );
        let seen = seen.into_inner().expect("lock");
        assert_eq!(
            seen.first().map(String::as_str),
            Some("foo.bar.ns1.svc.cluster.local")
        );
        assert!(seen.contains(&"*.ns1.svc.cluster.local".to_owned()));
        // Stripping `ns1.svc.cluster.local` leaves `foo.bar`, expanded to `foo.bar.svc.cluster.local`.
        assert!(seen.contains(&"foo.bar".to_owned()));
        assert!(seen.contains(&"foo.bar.svc.cluster.local".to_owned()));
        assert!(
            seen.iter()
                .all(|k| !k.ends_with('.') && k.to_lowercase() == *k)
        );
    }

    #[test]
    fn invalid_context_is_rejected() {
        assert!(Names::compile(&PodDnsContext::new("bad..ns")).is_err());
        assert!(Names::compile(&PodDnsContext::new("ns").with_cluster_domain("a..b")).is_err());
    }

    #[test]
    fn trim_and_wildcards() {
        assert_eq!(
            trim_domain(&n("a.b.svc.cluster.local."), &n("svc.cluster.local.")),
            Some(n("a.b."))
        );
        assert_eq!(
            trim_domain(&n("cluster.local."), &n("cluster.local.")),
            None
        );
        assert_eq!(trim_domain(&n("a.example."), &n("cluster.local.")), None);
        assert_eq!(
            wildcards(&n("a.b.c.")),
            vec![n("a.b.c."), n("*.b.c."), n("*.c.")]
        );
        assert_eq!(wildcards(&n("a.")), vec![n("a.")]);
    }
}
