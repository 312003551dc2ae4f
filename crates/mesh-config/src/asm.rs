//! ASMEgressTrafficPolicy → ServiceEntries, DestinationRules and an authorization policy.
//! The mapping is documented in the crate README (MAPPING).
use crate::authz::{
    Action, OperationMatch, Policy, Rule, SourceMatch, StrPattern, WorkloadSelector,
};
use crate::error::{ConfigError, ObjErrors};
use crate::load::{AsmEgressTrafficPolicy, DestinationRule, Object, ServiceEntry};
use crate::model::meta::{ObjectMeta, Resource};
use crate::model::networking as nm;
use crate::snapshot::{EgressEntry, NamespacedName, Protocol, ServiceKind, USE_WAYPOINT_LABEL};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

/// Namespace ASMEgressTrafficPolicies (and the egress waypoints) live in.
pub const EGRESS_NAMESPACE: &str = "istio-egress";
/// Auto-assigned gateway ports.
pub const AUTO_PORT_MIN: u16 = 10000;
pub const AUTO_PORT_MAX: u16 = 20000;

#[derive(Default)]
pub(crate) struct Expanded {
    pub service_entries: Vec<Object<ServiceEntry>>,
    pub destination_rules: Vec<Object<DestinationRule>>,
    pub policies: Vec<((ServiceKind, NamespacedName), Policy)>,
    pub entries: Vec<EgressEntry>,
}

struct HostAcc {
    ports: BTreeMap<u16, nm::SePort>,
    upgrades: BTreeMap<u16, u16>,
    rules: Vec<Rule>,
}

/// Name of the generated ServiceEntry / DestinationRule for one host of a policy.
pub(crate) fn generated_name(policy: &str, host: &str) -> String {
    format!(
        "{policy}.{}",
        host.to_ascii_lowercase().trim_end_matches('.')
    )
}

pub(crate) fn expand(
    policies: &[Object<AsmEgressTrafficPolicy>],
    errors: &mut Vec<ConfigError>,
) -> Expanded {
    let mut out = Expanded::default();
    // Ports given explicitly are reserved before auto-assignment, per gateway.
    let mut used_ports: BTreeMap<NamespacedName, HashSet<u16>> = BTreeMap::new();
    let mut pending_auto: Vec<(usize, String)> = Vec::new();

    for obj in policies {
        let mut e = ObjErrors {
            source: &obj.source,
            kind: "ASMEgressTrafficPolicy",
            object: obj.display_name(),
            out: errors,
        };
        let before = e.out.len();
        let spec = &obj.value.spec;
        if obj.namespace != EGRESS_NAMESPACE {
            e.push(
                "metadata.namespace",
                format!("must be {EGRESS_NAMESPACE:?} (ASM convention)"),
            );
        }
        let gw_name = spec
            .by_egress_gateway
            .as_ref()
            .and_then(|g| g.name.clone())
            .unwrap_or_default();
        if gw_name.is_empty() {
            e.push("spec.byEgressGateway.name", "required");
        } else if gw_name.len() > 32 {
            e.push("spec.byEgressGateway.name", "must be at most 32 characters");
        }
        if spec
            .by_egress_gateway
            .as_ref()
            .is_some_and(|g| g.port.is_some())
        {
            e.push(
                "spec.byEgressGateway.port",
                "set the port per to[] entry, not at spec level",
            );
        }
        if spec.egress_rules.is_empty() {
            e.push("spec.egressRules", "at least one rule is required");
        }
        let gateway = NamespacedName::new(obj.namespace.clone(), gw_name.clone());
        let all_blank = spec
            .egress_rules
            .iter()
            .flat_map(|r| &r.to)
            .all(|t| t.by_egress_gateway.as_ref().and_then(|b| b.port).is_none());
        let policy_name = NamespacedName::new(obj.namespace.clone(), obj.name.clone());
        let mut hosts: BTreeMap<String, HostAcc> = BTreeMap::new();
        let mut entries = Vec::new();
        for (ri, rule) in spec.egress_rules.iter().enumerate() {
            let rp = format!("spec.egressRules[{ri}]");
            if rule.from.is_empty() {
                e.push(format!("{rp}.from"), "at least one source is required");
            }
            if rule.to.is_empty() {
                e.push(format!("{rp}.to"), "at least one destination is required");
            }
            let sources: Vec<SourceMatch> = rule
                .from
                .iter()
                .map(|f| SourceMatch {
                    namespaces: vec![StrPattern::Exact(f.namespace.clone())],
                    workloads: if f.workload_selector.is_empty() {
                        Vec::new()
                    } else {
                        vec![WorkloadSelector {
                            namespace: f.namespace.clone(),
                            labels: f.workload_selector.clone(),
                        }]
                    },
                    ..Default::default()
                })
                .collect();
            for (ti, to) in rule.to.iter().enumerate() {
                let tp = format!("{rp}.to[{ti}]");
                if to.hosts.is_empty() {
                    e.push(format!("{tp}.hosts"), "at least one host is required");
                }
                let port = match u16::try_from(to.port.number) {
                    Ok(p) if p != 0 => p,
                    _ => {
                        e.push(format!("{tp}.port.number"), "must be 1-65535");
                        continue;
                    }
                };
                let proto_s = to.port.protocol.clone().unwrap_or_else(|| "HTTP".into());
                let protocol = match Protocol::parse(&proto_s) {
                    Some(p @ (Protocol::Http | Protocol::Https | Protocol::Tcp)) => p,
                    _ => {
                        e.push(
                            format!("{tp}.port.protocol"),
                            format!("{proto_s:?} is not one of HTTP, HTTPS, TCP"),
                        );
                        continue;
                    }
                };
                let upgrade = match &to.https_upgrade {
                    Some(u) if u.enabled => {
                        if protocol != Protocol::Http {
                            e.push(
                                format!("{tp}.httpsUpgrade"),
                                "only HTTP ports can be upgraded to HTTPS",
                            );
                        }
                        match u
                            .port
                            .and_then(|p| u16::try_from(p).ok())
                            .filter(|p| *p != 0)
                        {
                            Some(p) => Some(p),
                            None => {
                                e.push(
                                    format!("{tp}.httpsUpgrade.port"),
                                    "required (1-65535) when enabled",
                                );
                                None
                            }
                        }
                    }
                    _ => None,
                };
                let gw_port = to.by_egress_gateway.as_ref().and_then(|b| {
                    if b.name.is_some() {
                        e.push(
                            format!("{tp}.byEgressGateway.name"),
                            "set the gateway name at spec level only",
                        );
                    }
                    b.port
                });
                let gateway_port = match gw_port {
                    Some(p) => match u16::try_from(p) {
                        Ok(p) if p != 0 => {
                            used_ports.entry(gateway.clone()).or_default().insert(p);
                            p
                        }
                        _ => {
                            e.push(format!("{tp}.byEgressGateway.port"), "must be 1-65535");
                            0
                        }
                    },
                    None if all_blank => 0, // assigned below
                    None => {
                        e.push(
                            format!("{tp}.byEgressGateway.port"),
                            "required unless every to[].byEgressGateway is blank (then ports are assigned automatically)",
                        );
                        0
                    }
                };
                for (hi, h) in to.hosts.iter().enumerate() {
                    if h.contains('*') {
                        e.push(
                            format!("{tp}.hosts[{hi}]"),
                            "wildcard hosts are not supported",
                        );
                        continue;
                    }
                    let acc = hosts
                        .entry(h.to_ascii_lowercase())
                        .or_insert_with(|| HostAcc {
                            ports: BTreeMap::new(),
                            upgrades: BTreeMap::new(),
                            rules: Vec::new(),
                        });
                    let se_port = nm::SePort {
                        number: u32::from(port),
                        protocol: Some(protocol.as_str().to_owned()),
                        name: Some(to.port.name.clone().unwrap_or_else(|| {
                            format!("{}-{port}", protocol.as_str().to_ascii_lowercase())
                        })),
                        target_port: upgrade.map(u32::from),
                    };
                    if let Some(prev) = acc.ports.get(&port) {
                        if prev.protocol != se_port.protocol
                            || prev.target_port != se_port.target_port
                        {
                            e.push(
                                format!("{tp}.port"),
                                format!(
                                    "host {h} port {port} is declared twice with different settings"
                                ),
                            );
                        }
                    } else {
                        acc.ports.insert(port, se_port);
                    }
                    if let Some(up) = upgrade {
                        acc.upgrades.insert(port, up);
                    }
                    acc.rules.push(Rule {
                        from: sources.clone(),
                        to: vec![OperationMatch {
                            ports: vec![port],
                            ..Default::default()
                        }],
                        when: Vec::new(),
                    });
                }
                entries.push(EgressEntry {
                    policy: policy_name.clone(),
                    name: to.name.clone(),
                    gateway: gateway.clone(),
                    hosts: to.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    port,
                    protocol,
                    gateway_port,
                    gateway_port_auto: gateway_port == 0 && all_blank,
                    https_upgrade_port: upgrade,
                    service_entries: to
                        .hosts
                        .iter()
                        .map(|h| {
                            NamespacedName::new(obj.namespace.clone(), generated_name(&obj.name, h))
                        })
                        .collect(),
                });
            }
        }
        if e.out.len() != before {
            continue;
        }
        for (host, acc) in hosts {
            let se_name = generated_name(&obj.name, &host);
            let ip_host = host.parse::<IpAddr>().ok();
            let spec = nm::ServiceEntrySpec {
                hosts: vec![host.clone()],
                addresses: ip_host.map(|ip| vec![ip.to_string()]).unwrap_or_default(),
                ports: acc.ports.into_values().collect(),
                location: Some("MESH_EXTERNAL".into()),
                resolution: Some(if ip_host.is_some() { "STATIC" } else { "DNS" }.into()),
                endpoints: ip_host
                    .map(|ip| {
                        vec![nm::WorkloadEntrySpec {
                            address: Some(ip.to_string()),
                            ..Default::default()
                        }]
                    })
                    .unwrap_or_default(),
                ..Default::default()
            };
            let meta = ObjectMeta {
                name: Some(se_name.clone()),
                namespace: Some(obj.namespace.clone()),
                labels: [(USE_WAYPOINT_LABEL.to_owned(), gw_name.clone())].into(),
                annotations: Default::default(),
                ..Default::default()
            };
            out.service_entries.push(Object {
                source: obj.source.clone(),
                namespace: obj.namespace.clone(),
                name: se_name.clone(),
                value: Resource {
                    api_version: "networking.istio.io/v1".into(),
                    kind: "ServiceEntry".into(),
                    metadata: meta.clone(),
                    spec,
                    status: None,
                },
            });
            if !acc.upgrades.is_empty() {
                let dr = nm::DestinationRuleSpec {
                    host: host.clone(),
                    traffic_policy: Some(nm::TrafficPolicy {
                        port_level_settings: acc
                            .upgrades
                            .keys()
                            .map(|p| nm::PortTrafficPolicy {
                                port: Some(nm::PortSelector {
                                    number: u32::from(*p),
                                }),
                                tls: Some(nm::ClientTlsSettings {
                                    mode: Some("SIMPLE".into()),
                                    sni: (ip_host.is_none()).then(|| host.clone()),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                out.destination_rules.push(Object {
                    source: obj.source.clone(),
                    namespace: obj.namespace.clone(),
                    name: se_name.clone(),
                    value: Resource {
                        api_version: "networking.istio.io/v1".into(),
                        kind: "DestinationRule".into(),
                        metadata: meta,
                        spec: dr,
                        status: None,
                    },
                });
            }
            let target = (
                ServiceKind::ServiceEntry,
                NamespacedName::new(obj.namespace.clone(), se_name.clone()),
            );
            out.policies.push((
                target,
                Policy {
                    name: NamespacedName::new(obj.namespace.clone(), se_name),
                    action: Action::Allow,
                    rules: acc.rules,
                },
            ));
        }
        for entry in entries {
            if entry.gateway_port_auto {
                pending_auto.push((
                    out.entries.len(),
                    format!("{}/{}/{}", entry.policy, entry.name, entry.port),
                ));
            }
            out.entries.push(entry);
        }
    }

    // Auto-assign: a hash of (policy, to.name, port) into 10000–20000, probing upwards on
    // collision, in sorted key order — deterministic and stable when entries are added.
    pending_auto.sort_by(|a, b| a.1.cmp(&b.1));
    let span = u32::from(AUTO_PORT_MAX - AUTO_PORT_MIN) + 1;
    for (idx, key) in pending_auto {
        let gw = out.entries[idx].gateway.clone();
        let used = used_ports.entry(gw).or_default();
        let start = (crate::vip::fnv1a64(key.as_bytes()) % u64::from(span)) as u32;
        let port = (0..span)
            .map(|i| AUTO_PORT_MIN + ((start + i) % span) as u16)
            .find(|p| !used.contains(p));
        match port {
            Some(p) => {
                used.insert(p);
                out.entries[idx].gateway_port = p;
            }
            None => tracing::error!(entry = %key, "no free egress gateway port in 10000-20000"),
        }
    }
    out
}
