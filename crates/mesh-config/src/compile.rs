//! Resources → [`Snapshot`]: semantic validation (with located errors), VIP allocation,
//! waypoint binding, policy attachment, route and DestinationRule compilation, and the lookup
//! indexes.
use crate::authz::{self, AuthzPolicies, Policy};
use crate::capture::CaptureScope;
use crate::error::{ConfigError, LoadErrors, ObjErrors, SourceRef};
use crate::hostmap::HostMap;
use crate::load::{Loaded, Object, Resources};
use crate::model::{IntOrString, Labels, core as k8s, mesh as meshm};
use crate::policy::{self, DestinationPolicy};
use crate::route::{self, ServiceRoutes, compile as rc};
use crate::snapshot::*;
use crate::{asm, vip};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{debug, warn};

/// Compiles what the loader read; any error (structural or semantic) fails the whole load.
pub fn compile_loaded(loaded: Loaded) -> Result<Snapshot, LoadErrors> {
    let Loaded {
        resources,
        mut errors,
    } = loaded;
    let snap = compile(&resources, &mut errors);
    // Report in file / document order (structural errors come from the loader first).
    errors.sort_by(|a, b| (&a.file, a.document).cmp(&(&b.file, b.document)));
    if errors.is_empty() {
        Ok(snap)
    } else {
        Err(LoadErrors(errors))
    }
}

/// Builds a snapshot, appending every semantic error to `errors`. The snapshot is always
/// built (best effort) so `check` can report everything at once; callers must not serve it
/// when `errors` is non-empty.
pub fn compile(res: &Resources, errors: &mut Vec<ConfigError>) -> Snapshot {
    let mut snap = Snapshot {
        mesh: mesh_settings(res, errors),
        ..Default::default()
    };
    let td = snap.mesh.trust_domain.clone();
    let root_ns = snap.mesh.root_namespace.clone();

    // ---- namespaces
    let mut ns_annotations: HashMap<String, (&Labels, &SourceRef)> = HashMap::new();
    for n in &res.namespaces {
        snap.namespaces.insert(
            n.name.clone(),
            NamespaceInfo {
                labels: n.value.metadata.labels.clone(),
            },
        );
        ns_annotations.insert(n.name.clone(), (&n.value.metadata.annotations, &n.source));
        // Validate capture annotations on the namespace itself, located there.
        let (_, errs) = CaptureScope::from_layers(&[&n.value.metadata.annotations]);
        let mut e = ObjErrors {
            source: &n.source,
            kind: "Namespace",
            object: n.name.clone(),
            out: errors,
        };
        for (k, msg) in errs {
            e.push(format!("metadata.annotations.{k}"), msg);
        }
    }
    // ---- secrets (TLS material only, for DestinationRule credentialName)
    for s in &res.secrets {
        let mut e = ObjErrors {
            source: &s.source,
            kind: "Secret",
            object: s.display_name(),
            out: errors,
        };
        let tls = crate::secret::decode(&s.value, &mut e);
        snap.secrets.insert(
            NamespacedName::new(s.namespace.clone(), s.name.clone()),
            Arc::new(tls),
        );
    }
    let empty_labels = Labels::new();

    // ---- ASMEgressTrafficPolicy → primitives
    let expanded = asm::expand(&res.egress_policies, errors);
    snap.egress = expanded.entries;

    // ---- waypoints (Gateways of class istio-waypoint)
    let waypoint_pods: HashMap<NamespacedName, Vec<&Object<k8s::Pod>>> = {
        let mut m: HashMap<NamespacedName, Vec<&Object<k8s::Pod>>> = HashMap::new();
        for p in &res.pods {
            if let Some(gw) = p.value.metadata.labels.get(GATEWAY_NAME_LABEL) {
                m.entry(NamespacedName::new(p.namespace.clone(), gw.clone()))
                    .or_default()
                    .push(p);
            }
        }
        m
    };
    for g in &res.gateways {
        let mut e = ObjErrors {
            source: &g.source,
            kind: "Gateway",
            object: g.display_name(),
            out: errors,
        };
        if let Some(w) = compile_waypoint(
            g,
            &td,
            waypoint_pods.get(&NamespacedName::new(g.namespace.clone(), g.name.clone())),
            &mut e,
        ) {
            snap.waypoints.insert(w.name.clone(), Arc::new(w));
        }
    }

    // ---- pods → workloads (authz and endpoints filled below)
    struct PodC<'a> {
        obj: &'a Object<k8s::Pod>,
        w: Workload,
    }
    let mut pods: Vec<PodC<'_>> = Vec::with_capacity(res.pods.len());
    let mut capture_cache: HashMap<CaptureScope, Arc<CaptureScope>> = HashMap::new();
    for p in &res.pods {
        let mut e = ObjErrors {
            source: &p.source,
            kind: "Pod",
            object: p.display_name(),
            out: errors,
        };
        let meta = &p.value.metadata;
        let mut ips = Vec::new();
        let mut add_ip = |s: &str, path: &str, e: &mut ObjErrors<'_>| match s.parse::<IpAddr>() {
            Ok(ip) => {
                if !ips.contains(&ip) {
                    ips.push(ip)
                }
            }
            Err(_) => e.push(path, format!("{s:?} is not an IP address")),
        };
        if let Some(ip) = p.value.status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
            add_ip(ip, "status.podIP", &mut e);
        }
        for (i, ip) in p.value.status.pod_ips.iter().enumerate() {
            add_ip(&ip.ip, &format!("status.podIPs[{i}].ip"), &mut e);
        }
        let netns = meta.annotations.get(NETNS_ANNOTATION).and_then(|v| {
            if v.starts_with('/') {
                Some(PathBuf::from(v))
            } else {
                e.push(
                    format!("metadata.annotations.{NETNS_ANNOTATION}"),
                    format!("{v:?} must be an absolute path like /run/netns/<name>"),
                );
                None
            }
        });
        let ns_ann = ns_annotations
            .get(&p.namespace)
            .map(|(a, _)| *a)
            .unwrap_or(&empty_labels);
        let root_ann = ns_annotations
            .get(&root_ns)
            .map(|(a, _)| *a)
            .unwrap_or(&empty_labels);
        let (scope, cap_errs) = CaptureScope::from_layers(&[&meta.annotations, ns_ann, root_ann]);
        for (k, msg) in cap_errs {
            // Namespace-level errors are reported on the Namespace; report pod-level ones here.
            if meta.annotations.contains_key(&k) {
                e.push(format!("metadata.annotations.{k}"), msg);
            }
        }
        let capture = capture_cache
            .entry(scope.clone())
            .or_insert_with(|| Arc::new(scope))
            .clone();
        let sa = p
            .value
            .spec
            .service_account_name
            .clone()
            .or_else(|| p.value.spec.service_account.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let waypoint_of = meta
            .labels
            .get(GATEWAY_NAME_LABEL)
            .map(|g| NamespacedName::new(p.namespace.clone(), g.clone()));
        pods.push(PodC {
            obj: p,
            w: Workload {
                name: NamespacedName::new(p.namespace.clone(), p.name.clone()),
                ips,
                node: p.value.spec.node_name.clone().filter(|n| !n.is_empty()),
                identity: Identity::new(td.clone(), p.namespace.clone(), sa.clone()),
                service_account: sa,
                labels: meta.labels.clone(),
                netns,
                // Only kube-source writes this marker (it drops the cluster's own value).
                captured: meta
                    .annotations
                    .get(CAPTURED_ANNOTATION)
                    .is_some_and(|v| v == "true"),
                capture,
                waypoint: WaypointBinding::None,
                waypoint_of,
                generate_name: meta.generate_name.clone().filter(|g| !g.is_empty()),
                // Kubernetes allows one controller per object; the first one wins, as in Istio.
                controller: meta
                    .owner_references
                    .iter()
                    .find(|r| r.controller == Some(true))
                    .map(|r| Controller {
                        api_version: r.api_version.clone(),
                        kind: r.kind.clone(),
                        name: r.name.clone(),
                    }),
                authz: Arc::default(),
            },
        });
    }

    // ---- services
    // Pods per namespace: selectors only look inside their own namespace.
    let mut pods_by_ns: HashMap<&str, Vec<(&Object<k8s::Pod>, &Workload)>> = HashMap::new();
    for p in &pods {
        pods_by_ns
            .entry(p.obj.namespace.as_str())
            .or_default()
            .push((p.obj, &p.w));
    }
    let pods_in = |ns: &str| pods_by_ns.get(ns).map(Vec::as_slice).unwrap_or(&[]);
    let mut services: Vec<Service> = Vec::new();
    for s in &res.services {
        let mut e = ObjErrors {
            source: &s.source,
            kind: "Service",
            object: s.display_name(),
            out: errors,
        };
        services.push(compile_k8s_service(s, pods_in(&s.namespace), &mut e));
    }
    let mut se_hosts: HashMap<NamespacedName, Vec<String>> = HashMap::new();
    let mut auto_hosts: BTreeSet<String> = BTreeSet::new();
    let mut reserved: HashSet<IpAddr> = HashSet::new();
    let all_ses = res
        .service_entries
        .iter()
        .chain(expanded.service_entries.iter());
    let mut se_services: Vec<(Service, bool)> = Vec::new();
    for se in all_ses {
        let mut e = ObjErrors {
            source: &se.source,
            kind: "ServiceEntry",
            object: se.display_name(),
            out: errors,
        };
        let compiled = compile_service_entry(se, pods_in(&se.namespace), &td, &mut e);
        se_hosts.insert(
            NamespacedName::new(se.namespace.clone(), se.name.clone()),
            compiled.iter().map(|(s, _)| s.hostname.clone()).collect(),
        );
        for (svc, wants_vip) in compiled {
            reserved.extend(svc.vips.iter().copied());
            if wants_vip {
                auto_hosts.insert(svc.hostname.clone());
            }
            se_services.push((svc, wants_vip));
        }
    }
    let vips = vip::allocate(auto_hosts.iter().map(String::as_str), &reserved);
    for (mut svc, wants_vip) in se_services {
        if wants_vip && let Some((v4, v6)) = vips.get(&svc.hostname) {
            svc.vips = vec![IpAddr::V4(*v4), IpAddr::V6(*v6)];
            svc.auto_allocated = true;
        }
        services.push(svc);
    }

    // ---- waypoint binding
    let ns_labels = |ns: &str| snap.namespaces.get(ns).map(|n| &n.labels);
    let resolve = |labels: &Labels,
                   own_ns: &str,
                   for_service: bool,
                   from_ns_label: bool|
     -> WaypointBinding {
        let ns_l = ns_labels(own_ns);
        let (name, wp_ns) = match labels.get(USE_WAYPOINT_LABEL) {
            Some(n) => (n.as_str(), labels.get(USE_WAYPOINT_NAMESPACE_LABEL)),
            None => match ns_l.and_then(|l| l.get(USE_WAYPOINT_LABEL)) {
                Some(n) => (
                    n.as_str(),
                    ns_l.and_then(|l| l.get(USE_WAYPOINT_NAMESPACE_LABEL)),
                ),
                None => return WaypointBinding::None,
            },
        };
        let via_namespace = !labels.contains_key(USE_WAYPOINT_LABEL);
        if name == "none" || name.is_empty() {
            return WaypointBinding::None;
        }
        let gw = NamespacedName::new(
            wp_ns.cloned().unwrap_or_else(|| own_ns.to_owned()),
            name.to_owned(),
        );
        let Some(w) = snap.waypoints.get(&gw) else {
            return WaypointBinding::Unresolved {
                gateway: gw,
                reason: "no Gateway of class istio-waypoint with that name".into(),
            };
        };
        let serves = if for_service {
            w.waypoint_for.serves_services()
        } else {
            w.waypoint_for.serves_workloads()
        };
        if !serves {
            if via_namespace && from_ns_label {
                // A namespace label aimed at services does not capture workload-addressed traffic.
                return WaypointBinding::None;
            }
            return WaypointBinding::Unresolved {
                gateway: gw,
                reason: format!("waypoint serves {:?} traffic only", w.waypoint_for),
            };
        }
        let allowed = match &w.allowed_from {
            AllowedFrom::Same => gw.namespace == own_ns,
            AllowedFrom::All => true,
            AllowedFrom::Selector(sel) => {
                gw.namespace == own_ns
                    || ns_l.is_some_and(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v)))
            }
        };
        if !allowed {
            return WaypointBinding::Unresolved {
                gateway: gw,
                reason: format!("waypoint's allowedRoutes do not admit namespace {own_ns}"),
            };
        }
        if w.addresses.is_empty() {
            return WaypointBinding::Unresolved {
                gateway: gw,
                reason: "waypoint has no address (no pod with an IP, no Gateway address)".into(),
            };
        }
        WaypointBinding::Bound(w.clone())
    };
    for s in &mut services {
        s.waypoint = resolve(&s.labels, &s.name.namespace, true, false);
        if let WaypointBinding::Unresolved { gateway, reason } = &s.waypoint {
            warn!(service = %s.hostname, waypoint = %gateway, reason, "service is bound to an unusable waypoint; traffic to it will be refused");
        }
    }
    for p in &mut pods {
        if p.w.waypoint_of.is_none() {
            p.w.waypoint = resolve(&p.w.labels, &p.w.name.namespace, false, true);
        }
    }

    // ---- authorization policies
    let mut compiled_policies: Vec<(Arc<Policy>, Target)> = Vec::new();
    for ap in &res.authorization_policies {
        let mut e = ObjErrors {
            source: &ap.source,
            kind: "AuthorizationPolicy",
            object: ap.display_name(),
            out: errors,
        };
        let name = NamespacedName::new(ap.namespace.clone(), ap.name.clone());
        let Some(target) = policy_target(ap, &root_ns, &mut e) else {
            continue;
        };
        if let Some(p) = authz::compile(name, &ap.value.spec, &mut e) {
            compiled_policies.push((Arc::new(p), target));
        }
    }
    for (target, p) in expanded.policies {
        compiled_policies.push((Arc::new(p), Target::Services(vec![target])));
    }
    let mut by_gateway: BTreeMap<NamespacedName, AuthzPolicies> = BTreeMap::new();
    let mut by_service: BTreeMap<(ServiceKind, NamespacedName), AuthzPolicies> = BTreeMap::new();
    let mut all_waypoints: Vec<Arc<Policy>> = Vec::new();
    // Workload policies grouped by namespace: (selector, index).
    let mut ns_policies: HashMap<&str, Vec<(Option<&Labels>, usize)>> = HashMap::new();
    for (i, (p, t)) in compiled_policies.iter().enumerate() {
        match t {
            Target::Gateways(gs) => {
                for g in gs {
                    by_gateway.entry(g.clone()).or_default().push(p.clone());
                }
            }
            Target::Services(ss) => {
                for s in ss {
                    by_service.entry(s.clone()).or_default().push(p.clone());
                }
            }
            Target::AllWaypoints => all_waypoints.push(p.clone()),
            Target::Workloads(sel) => ns_policies
                .entry(p.name.namespace.as_str())
                .or_default()
                .push((sel.as_ref(), i)),
        }
    }
    for w in snap.waypoints.keys() {
        let set = by_gateway.entry(w.clone()).or_default();
        for p in &all_waypoints {
            set.push(p.clone());
        }
    }
    snap.authz_by_gateway = by_gateway
        .into_iter()
        .map(|(k, v)| (k, Arc::new(v)))
        .collect();
    for ((kind, name), v) in by_service {
        snap.authz_by_service[kind as usize].insert(name, Arc::new(v));
    }
    let mut interned: HashMap<Vec<usize>, Arc<AuthzPolicies>> = HashMap::new();
    for p in &mut pods {
        if p.w.waypoint_of.is_some() {
            // Waypoints enforce targetRef policies themselves; selector policies do not apply.
            continue;
        }
        let mut idx = Vec::new();
        for ns in [root_ns.as_str(), p.w.name.namespace.as_str()] {
            for (sel, i) in ns_policies.get(ns).map(Vec::as_slice).unwrap_or(&[]) {
                if sel.is_none_or(|s| s.iter().all(|(k, v)| p.w.labels.get(k) == Some(v))) {
                    idx.push(*i);
                }
            }
            if root_ns == p.w.name.namespace {
                break; // a pod in the root namespace: its policies were just added once
            }
        }
        if idx.is_empty() {
            continue;
        }
        idx.sort_unstable();
        idx.dedup();
        let set = interned
            .entry(idx.clone())
            .or_insert_with(|| {
                let mut s = AuthzPolicies::default();
                for i in &idx {
                    s.push(compiled_policies[*i].0.clone());
                }
                Arc::new(s)
            })
            .clone();
        p.w.authz = set;
    }

    // ---- routes
    let mut vs_routes: HostMap<(NamespacedName, ServiceRoutes)> = HostMap::default();
    for vs in &res.virtual_services {
        let name = NamespacedName::new(vs.namespace.clone(), vs.name.clone());
        let mut e = ObjErrors {
            source: &vs.source,
            kind: "VirtualService",
            object: vs.display_name(),
            out: errors,
        };
        if !vs.value.spec.export_to.is_empty() {
            debug!(vs = %name, "VirtualService exportTo is not enforced (routes apply mesh-wide)");
        }
        let Some(c) = rc::virtual_service(&name, &vs.value.spec, &mut e) else {
            continue;
        };
        for h in c.hosts {
            match vs_routes.get_pattern_mut(&h) {
                Some((first, existing)) => {
                    // Istio would pick one; we merge in (namespace, name) order and say so.
                    warn!(host = %h, first = %first, also = %name, "several VirtualServices for one host; routes are merged in load order");
                    existing.http.extend(c.routes.http.iter().cloned());
                    existing.tcp.extend(c.routes.tcp.iter().cloned());
                    existing.tls.extend(c.routes.tls.iter().cloned());
                }
                None => {
                    vs_routes.insert(&h, (name.clone(), c.routes.clone()));
                }
            }
        }
    }
    let se_objects: HashMap<NamespacedName, &Vec<String>> =
        se_hosts.iter().map(|(k, v)| (k.clone(), v)).collect();
    let resolve_backend = |group: &str,
                           kind: &str,
                           ns: &str,
                           name: &str|
     -> Result<String, String> {
        match (group, kind) {
            ("" | "core", "Service") => Ok(format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}")),
            ("networking.istio.io", "ServiceEntry") => se_objects
                .get(&NamespacedName::new(ns, name))
                .and_then(|h| h.first().cloned())
                .ok_or_else(|| format!("ServiceEntry {ns}/{name} not found")),
            ("networking.istio.io", "Hostname") => Ok(name.to_ascii_lowercase()),
            _ => Err(format!(
                "unsupported backend {group}/{kind} (Service, networking.istio.io ServiceEntry or Hostname)"
            )),
        }
    };
    let mut gw_routes: BTreeMap<String, Vec<route::HttpRoute>> = BTreeMap::new();
    for hr in &res.http_routes {
        let name = NamespacedName::new(hr.namespace.clone(), hr.name.clone());
        let mut e = ObjErrors {
            source: &hr.source,
            kind: "HTTPRoute",
            object: hr.display_name(),
            out: errors,
        };
        let (parents, routes) =
            rc::http_route_gateway_api(&name, &hr.value.spec, &resolve_backend, &mut e);
        for parent in parents {
            let hosts: Vec<String> = match parent.kind {
                ServiceKind::Service => vec![format!(
                    "{}.{}.svc.{CLUSTER_DOMAIN}",
                    parent.name.name, parent.name.namespace
                )],
                ServiceKind::ServiceEntry => match se_objects.get(&parent.name) {
                    Some(h) => (*h).clone(),
                    None => {
                        warn!(route = %name, parent = %parent.name, "HTTPRoute parent ServiceEntry not found; route unused");
                        continue;
                    }
                },
            };
            for h in hosts {
                let list = gw_routes.entry(h).or_default();
                for r in &routes {
                    let mut r = r.clone();
                    if let Some(port) = parent.port {
                        for m in &mut r.matches {
                            m.port = Some(port);
                        }
                    }
                    list.push(r);
                }
            }
        }
    }
    let mut routes: HostMap<Arc<ServiceRoutes>> = HostMap::default();
    for (pattern, (_, r)) in vs_routes.iter() {
        routes.insert(&pattern, Arc::new(r.clone()));
    }
    for (host, http) in gw_routes {
        let mut sr = vs_routes
            .get_pattern(&host)
            .map(|(_, r)| r.clone())
            .unwrap_or_default();
        if !sr.http.is_empty() {
            warn!(host = %host, "HTTPRoute and VirtualService both route this host; the HTTPRoute's HTTP routes win");
        }
        sr.http = http;
        routes.insert(&host, Arc::new(sr));
    }
    snap.routes = routes;

    // ---- destination rules
    let mut drs: HostMap<Arc<DestinationPolicy>> = HostMap::default();
    for dr in res
        .destination_rules
        .iter()
        .chain(expanded.destination_rules.iter())
    {
        let name = NamespacedName::new(dr.namespace.clone(), dr.name.clone());
        let mut e = ObjErrors {
            source: &dr.source,
            kind: "DestinationRule",
            object: dr.display_name(),
            out: errors,
        };
        let spec = &dr.value.spec;
        if spec.host.is_empty() {
            e.push("spec.host", "required");
            continue;
        }
        if spec.workload_selector.is_some() {
            warn!(rule = %name, "DestinationRule workloadSelector is not supported; the rule applies to every client");
        }
        let host = rc::expand_host(&spec.host, &dr.namespace);
        let p = policy::compile(name.clone(), host.clone(), spec, &mut e);
        if let Some(first) = drs.get_pattern(&host) {
            warn!(host = %host, first = %first.rule, ignored = %name, "several DestinationRules for one host; the first is used");
            continue;
        }
        drs.insert(&host, Arc::new(p));
    }
    snap.destination_policies = drs;

    // ---- indexes
    services.sort_by(|a, b| (&a.hostname, a.kind, &a.name).cmp(&(&b.hostname, b.kind, &b.name)));
    for s in services {
        let s = Arc::new(s);
        if let Some(first) = snap.by_host.get_pattern(&s.hostname) {
            warn!(host = %s.hostname, first = %first.name, ignored = %s.name, "hostname defined twice; the first (Service, then namespace/name order) is used");
        } else {
            snap.by_host.insert(&s.hostname, s.clone());
            if !s.is_wildcard() && !s.vips.is_empty() {
                snap.dns.insert(s.hostname.clone(), s.vips.clone());
            }
        }
        for ip in &s.vips {
            snap.by_vip.entry(*ip).or_default().push(s.clone());
            for (i, p) in s.ports.iter().enumerate() {
                let addr = SocketAddr::new(*ip, p.port);
                match snap.by_addr.get(&addr) {
                    Some((first, _)) => {
                        warn!(%addr, first = %first.hostname, ignored = %s.hostname, "address:port shared by two services; the first is used")
                    }
                    None => {
                        snap.by_addr.insert(addr, (s.clone(), i));
                    }
                }
            }
        }
        for net in &s.cidrs {
            snap.cidr_services.push((*net, s.clone()));
        }
        snap.services.push(s);
    }
    // Most specific CIDR first.
    snap.cidr_services
        .sort_by_key(|c| std::cmp::Reverse(c.0.prefix_len()));

    // ---- workloads
    pods.sort_by(|a, b| a.w.name.cmp(&b.w.name));
    for p in pods {
        let w = Arc::new(p.w);
        for ip in &w.ips {
            if let Some(prev) = snap.workload_by_ip.insert(*ip, w.clone()) {
                let mut e = ObjErrors {
                    source: &p.obj.source,
                    kind: "Pod",
                    object: p.obj.display_name(),
                    out: errors,
                };
                e.push(
                    "status.podIP",
                    format!("IP {ip} is also used by pod {}", prev.name),
                );
            }
        }
        if let Some(node) = &w.node {
            snap.workloads_by_node
                .entry(node.clone())
                .or_default()
                .push(w.clone());
        }
        snap.workloads.push(w);
    }
    snap.credential_warnings = credential_warnings(&snap);
    snap
}

/// `credentialName`s that a waypoint serving the rule's host cannot use. Not errors: the Secret
/// may arrive later, and meanwhile connections with the rule fail closed (503 UF).
fn credential_warnings(snap: &Snapshot) -> Vec<crate::secret::CredentialWarning> {
    let mut found = BTreeSet::new();
    for s in &snap.services {
        let Some(w) = s.waypoint.waypoint() else {
            continue;
        };
        let Some(p) = snap.destination_policy(&s.hostname) else {
            continue;
        };
        for tls in p.tls_settings() {
            if let Some(Err(err)) = snap.tls_credential(&w.name.namespace, tls) {
                found.insert(crate::secret::CredentialWarning {
                    rule: p.rule.clone(),
                    field: tls.credential_path.clone().unwrap_or_default(),
                    waypoint: w.name.clone(),
                    message: err.to_string(),
                });
            }
        }
    }
    for w in &found {
        warn!(warning = %w, "credentialName cannot be used; connections with this rule fail closed");
    }
    found.into_iter().collect()
}

enum Target {
    Workloads(Option<Labels>),
    Gateways(Vec<NamespacedName>),
    Services(Vec<(ServiceKind, NamespacedName)>),
    AllWaypoints,
}

fn policy_target(
    ap: &Object<crate::load::AuthorizationPolicy>,
    root_ns: &str,
    e: &mut ObjErrors<'_>,
) -> Option<Target> {
    let spec = &ap.value.spec;
    let mut refs: Vec<(String, &crate::model::security::PolicyTargetReference)> = Vec::new();
    if let Some(r) = &spec.target_ref {
        refs.push(("spec.targetRef".into(), r));
    }
    for (i, r) in spec.target_refs.iter().enumerate() {
        refs.push((format!("spec.targetRefs[{i}]"), r));
    }
    if spec.target_ref.is_some() && !spec.target_refs.is_empty() {
        e.push("spec.targetRef", "set targetRef or targetRefs, not both");
        return None;
    }
    if refs.is_empty() {
        return Some(Target::Workloads(
            spec.selector.as_ref().map(|s| s.match_labels.clone()),
        ));
    }
    if spec.selector.is_some() {
        e.push("spec.selector", "set selector or targetRefs, not both");
        return None;
    }
    let mut gateways = Vec::new();
    let mut services = Vec::new();
    let mut all = false;
    for (path, r) in refs {
        if let Some(ns) = r.namespace.as_deref().filter(|n| !n.is_empty())
            && ns != ap.namespace
        {
            e.push(
                format!("{path}.namespace"),
                "must be the policy's own namespace",
            );
            continue;
        }
        let name = NamespacedName::new(ap.namespace.clone(), r.name.clone());
        match (r.group.as_deref().unwrap_or(""), r.kind.as_str()) {
            ("gateway.networking.k8s.io", "Gateway") => gateways.push(name),
            ("gateway.networking.k8s.io", "GatewayClass") => {
                if ap.namespace != root_ns || r.name != "istio-waypoint" {
                    e.push(path, format!("GatewayClass targets are only allowed for istio-waypoint in the root namespace {root_ns}"));
                } else {
                    all = true;
                }
            }
            ("" | "core", "Service") => services.push((ServiceKind::Service, name)),
            ("networking.istio.io", "ServiceEntry") => services.push((ServiceKind::ServiceEntry, name)),
            (g, k) => e.push(
                path,
                format!("unsupported target {g}/{k} (gateway.networking.k8s.io Gateway, Service, networking.istio.io ServiceEntry)"),
            ),
        }
    }
    match (gateways.is_empty(), services.is_empty(), all) {
        (_, _, true) => Some(Target::AllWaypoints),
        (false, true, _) => Some(Target::Gateways(gateways)),
        (true, false, _) => Some(Target::Services(services)),
        (false, false, _) => {
            // Mixed kinds: register both ways by splitting into two attachments.
            // Rare; keep it simple by treating it as an error rather than guessing.
            e.push(
                "spec.targetRefs",
                "mix of Gateway and Service/ServiceEntry targets; use separate policies",
            );
            None
        }
        (true, true, false) => None,
    }
}

fn mesh_settings(res: &Resources, errors: &mut Vec<ConfigError>) -> MeshSettings {
    let mut m = MeshSettings::default();
    for cm in &res.config_maps {
        if cm.namespace != ROOT_NAMESPACE || cm.name != "istio" {
            debug!(configmap = %cm.display_name(), "ConfigMap not used by the mesh");
            continue;
        }
        let Some(text) = cm.value.data.get("mesh") else {
            continue;
        };
        let mut e = ObjErrors {
            source: &cm.source,
            kind: "ConfigMap",
            object: cm.display_name(),
            out: errors,
        };
        let value: serde_yaml_ng::Value = match serde_yaml_ng::from_str(text) {
            Ok(v) => v,
            Err(err) => {
                e.push("data.mesh", format!("invalid YAML: {err}"));
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        let mc: meshm::MeshConfig = match serde_path_to_error::deserialize(value) {
            Ok(v) => v,
            Err(err) => {
                e.push(
                    format!("data.mesh.{}", err.path()),
                    err.into_inner().to_string(),
                );
                continue;
            }
        };
        if let Some(td) = mc.trust_domain.filter(|t| !t.is_empty()) {
            m.trust_domain = td;
        }
        if let Some(rn) = mc.root_namespace.filter(|t| !t.is_empty()) {
            m.root_namespace = rn;
        }
        if let Some(mode) = mc.outbound_traffic_policy.and_then(|o| o.mode) {
            m.outbound_traffic_policy = match mode.as_str() {
                "ALLOW_ANY" => OutboundTrafficPolicy::AllowAny,
                "REGISTRY_ONLY" => OutboundTrafficPolicy::RegistryOnly,
                other => {
                    e.push(
                        "data.mesh.outboundTrafficPolicy.mode",
                        format!("unknown mode {other:?} (ALLOW_ANY, REGISTRY_ONLY)"),
                    );
                    OutboundTrafficPolicy::AllowAny
                }
            };
        }
    }
    m
}

fn compile_waypoint(
    g: &Object<crate::load::Gateway>,
    td: &str,
    pods: Option<&Vec<&Object<k8s::Pod>>>,
    e: &mut ObjErrors<'_>,
) -> Option<Waypoint> {
    let spec = &g.value.spec;
    if spec.gateway_class_name != "istio-waypoint" {
        debug!(gateway = %g.display_name(), class = %spec.gateway_class_name, "Gateway is not a waypoint; not used");
        return None;
    }
    let mut hbone = None;
    let mut allowed_from = AllowedFrom::Same;
    for (i, l) in spec.listeners.iter().enumerate() {
        let p = format!("spec.listeners[{i}]");
        let port = match u16::try_from(l.port) {
            Ok(x) if x != 0 => x,
            _ => {
                e.push(format!("{p}.port"), "must be 1-65535");
                continue;
            }
        };
        if l.protocol != "HBONE" {
            debug!(gateway = %g.display_name(), listener = %l.name, protocol = %l.protocol, "non-HBONE waypoint listener ignored");
            continue;
        }
        hbone = Some(port);
        if let Some(ns) = l
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref())
        {
            allowed_from = match ns.from.as_deref().unwrap_or("Same") {
                "Same" => AllowedFrom::Same,
                "All" => AllowedFrom::All,
                "Selector" => match &ns.selector {
                    Some(sel) if sel.match_expressions.is_empty() => {
                        AllowedFrom::Selector(sel.match_labels.clone())
                    }
                    Some(_) => {
                        e.push(
                            format!("{p}.allowedRoutes.namespaces.selector.matchExpressions"),
                            "not supported; use matchLabels",
                        );
                        AllowedFrom::Same
                    }
                    None => {
                        e.push(
                            format!("{p}.allowedRoutes.namespaces.selector"),
                            "required when from is Selector",
                        );
                        AllowedFrom::Same
                    }
                },
                other => {
                    e.push(
                        format!("{p}.allowedRoutes.namespaces.from"),
                        format!("unknown value {other:?} (Same, All, Selector)"),
                    );
                    AllowedFrom::Same
                }
            };
        }
    }
    let Some(hbone_port) = hbone else {
        e.push(
            "spec.listeners",
            "a waypoint needs a listener with protocol HBONE (port 15008)",
        );
        return None;
    };
    let waypoint_for = match g
        .value
        .metadata
        .labels
        .get(WAYPOINT_FOR_LABEL)
        .map(String::as_str)
    {
        None | Some("service") => WaypointFor::Service,
        Some("workload") => WaypointFor::Workload,
        Some("all") => WaypointFor::All,
        Some("none") => WaypointFor::None,
        Some(other) => {
            e.push(
                format!("metadata.labels.{WAYPOINT_FOR_LABEL}"),
                format!("unknown value {other:?} (service, workload, all, none)"),
            );
            WaypointFor::Service
        }
    };
    let mut addresses = Vec::new();
    let mut pod_names = Vec::new();
    let mut sa = None;
    for p in pods.into_iter().flatten() {
        pod_names.push(NamespacedName::new(p.namespace.clone(), p.name.clone()));
        for ip in p
            .value
            .status
            .pod_ip
            .iter()
            .chain(p.value.status.pod_ips.iter().map(|x| &x.ip))
        {
            if let Ok(ip) = ip.parse::<IpAddr>()
                && !addresses.contains(&ip)
            {
                addresses.push(ip);
            }
        }
        if sa.is_none() {
            sa = p
                .value
                .spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty());
        }
    }
    if addresses.is_empty() {
        let status = g
            .value
            .status
            .as_ref()
            .map(|s| s.addresses.as_slice())
            .unwrap_or(&[]);
        for (i, a) in spec.addresses.iter().enumerate() {
            if a.type_.as_deref().is_none_or(|t| t == "IPAddress") {
                match a.value.parse::<IpAddr>() {
                    Ok(ip) => addresses.push(ip),
                    Err(_) => e.push(
                        format!("spec.addresses[{i}].value"),
                        format!("{:?} is not an IP address", a.value),
                    ),
                }
            }
        }
        if addresses.is_empty() {
            addresses.extend(
                status
                    .iter()
                    .filter(|a| a.type_.as_deref().is_none_or(|t| t == "IPAddress"))
                    .filter_map(|a| a.value.parse::<IpAddr>().ok()),
            );
        }
    }
    Some(Waypoint {
        name: NamespacedName::new(g.namespace.clone(), g.name.clone()),
        addresses,
        hbone_port,
        identity: Identity::new(
            td,
            g.namespace.clone(),
            sa.unwrap_or_else(|| g.name.clone()),
        ),
        waypoint_for,
        allowed_from,
        pods: pod_names,
    })
}

fn port16(n: u32, path: &str, e: &mut ObjErrors<'_>) -> Option<u16> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            e.push(path, format!("{n} is not a port number (1-65535)"));
            None
        }
    }
}

fn export_to(list: &[String], ns: &str, path: &str, e: &mut ObjErrors<'_>) -> ExportTo {
    if list.is_empty() || list.iter().any(|x| x == "*") {
        return ExportTo::All;
    }
    let mut out = Vec::new();
    for (i, x) in list.iter().enumerate() {
        match x.as_str() {
            "." => out.push(ns.to_owned()),
            "~" => {}
            n if !n.is_empty() => out.push(n.to_owned()),
            _ => e.push(format!("{path}[{i}]"), "empty namespace"),
        }
    }
    ExportTo::Namespaces(out)
}

/// `pods`: the pods of the Service's namespace.
fn compile_k8s_service(
    s: &Object<k8s::Service>,
    pods: &[(&Object<k8s::Pod>, &Workload)],
    e: &mut ObjErrors<'_>,
) -> Service {
    let spec = &s.value.spec;
    let mut vips = Vec::new();
    for (path, ip) in spec
        .cluster_ip
        .iter()
        .map(|ip| ("spec.clusterIP".to_owned(), ip))
        .chain(
            spec.cluster_ips
                .iter()
                .enumerate()
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)),
        )
    {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(ip) => {
                if !vips.contains(&ip) {
                    vips.push(ip)
                }
            }
            Err(_) => e.push(path, format!("{ip:?} is not an IP address")),
        }
    }
    let mut ports = Vec::new();
    let mut named_targets = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        if p.port == 0 {
            e.push(format!("spec.ports[{i}].port"), "must be 1-65535");
            continue;
        }
        if p.protocol
            .as_deref()
            .is_some_and(|x| x.eq_ignore_ascii_case("UDP") || x.eq_ignore_ascii_case("SCTP"))
        {
            debug!(service = %s.display_name(), port = p.port, "non-TCP service port not handled by the mesh");
            continue;
        }
        let name = p.name.clone().unwrap_or_default();
        let protocol = p
            .app_protocol
            .as_deref()
            .map(Protocol::from_port_name)
            .unwrap_or_else(|| Protocol::from_port_name(&name));
        let target_port = match &p.target_port {
            None => None,
            Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                Ok(n) if n != 0 => Some(n),
                _ => {
                    e.push(
                        format!("spec.ports[{i}].targetPort"),
                        format!("{n} is not a port number"),
                    );
                    None
                }
            },
            Some(IntOrString::String(n)) => {
                named_targets.push((name.clone(), n.clone()));
                None
            }
        };
        ports.push(ServicePort {
            port: p.port,
            name,
            protocol,
            target_port,
        });
    }
    let mut endpoints = Vec::new();
    if let Some(sel) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
        for (obj, w) in pods {
            if obj.namespace != s.namespace || !sel.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            {
                continue;
            }
            // Named target ports resolve against the pod's container ports.
            let mut ep_ports = BTreeMap::new();
            for (port_name, target) in &named_targets {
                if let Some(cp) = obj
                    .value
                    .spec
                    .containers
                    .iter()
                    .flat_map(|c| &c.ports)
                    .find(|cp| cp.name.as_deref() == Some(target))
                {
                    ep_ports.insert(port_name.clone(), cp.container_port);
                }
            }
            for ip in &w.ips {
                endpoints.push(Endpoint {
                    address: Some(EndpointAddress::Ip(*ip)),
                    ports: ep_ports.clone(),
                    labels: w.labels.clone(),
                    weight: 1,
                    identity: Some(w.identity.clone()),
                    workload: Some(w.name.clone()),
                });
            }
        }
    }
    Service {
        hostname: format!("{}.{}.svc.{CLUSTER_DOMAIN}", s.name, s.namespace),
        kind: ServiceKind::Service,
        name: NamespacedName::new(s.namespace.clone(), s.name.clone()),
        vips,
        auto_allocated: false,
        cidrs: Vec::new(),
        ports,
        resolution: Resolution::Static,
        location: Location::MeshInternal,
        endpoints,
        labels: s.value.metadata.labels.clone(),
        export_to: ExportTo::All,
        subject_alt_names: Vec::new(),
        waypoint: WaypointBinding::None,
    }
}

fn valid_host(h: &str) -> bool {
    let body = h.strip_prefix("*.").unwrap_or(h);
    h == "*"
        || (!body.is_empty()
            && body.len() <= 253
            && body.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            }))
}

/// One Service per host; the bool says whether it should get an auto-allocated VIP.
/// `pods`: the pods of the ServiceEntry's namespace (for `workloadSelector`).
fn compile_service_entry(
    se: &Object<crate::load::ServiceEntry>,
    pods: &[(&Object<k8s::Pod>, &Workload)],
    td: &str,
    e: &mut ObjErrors<'_>,
) -> Vec<(Service, bool)> {
    let spec = &se.value.spec;
    let ns = se.namespace.as_str();
    if spec.hosts.is_empty() {
        e.push("spec.hosts", "at least one host is required");
    }
    let resolution = match spec.resolution.as_deref().unwrap_or("NONE") {
        "NONE" => Resolution::None,
        "STATIC" => Resolution::Static,
        "DNS" => Resolution::Dns,
        "DNS_ROUND_ROBIN" => Resolution::DnsRoundRobin,
        other => {
            e.push(
                "spec.resolution",
                format!("unknown resolution {other:?} (NONE, STATIC, DNS, DNS_ROUND_ROBIN)"),
            );
            Resolution::None
        }
    };
    let location = match spec.location.as_deref().unwrap_or("MESH_EXTERNAL") {
        "MESH_EXTERNAL" => Location::MeshExternal,
        "MESH_INTERNAL" => Location::MeshInternal,
        other => {
            e.push(
                "spec.location",
                format!("unknown location {other:?} (MESH_EXTERNAL, MESH_INTERNAL)"),
            );
            Location::MeshExternal
        }
    };
    if spec.ports.is_empty() {
        e.push("spec.ports", "at least one port is required");
    }
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        let Some(port) = port16(p.number, &format!("{path}.number"), e) else {
            continue;
        };
        let proto_s = p.protocol.as_deref().unwrap_or("TCP");
        let protocol = match Protocol::parse(proto_s) {
            Some(Protocol::Udp) | None => {
                e.push(
                    format!("{path}.protocol"),
                    format!(
                        "unsupported protocol {proto_s:?} (HTTP, HTTP2, HTTPS, TLS, TCP, GRPC)"
                    ),
                );
                continue;
            }
            Some(x) => x,
        };
        let name = p
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{port}", protocol.as_str().to_ascii_lowercase()));
        if ports.iter().any(|x| x.port == port) {
            e.push(
                format!("{path}.number"),
                format!("port {port} is declared twice"),
            );
            continue;
        }
        if ports.iter().any(|x| x.name == name) {
            e.push(
                format!("{path}.name"),
                format!("port name {name:?} is used twice"),
            );
        }
        let target_port = p
            .target_port
            .and_then(|t| port16(t, &format!("{path}.targetPort"), e));
        ports.push(ServicePort {
            port,
            name,
            protocol,
            target_port,
        });
    }
    let mut vips = Vec::new();
    let mut cidrs = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        if let Ok(ip) = a.parse::<IpAddr>() {
            vips.push(ip);
        } else if let Ok(net) = a.parse::<IpNet>() {
            if net.prefix_len() == net.max_prefix_len() {
                vips.push(net.addr());
            } else {
                cidrs.push(net.trunc());
            }
        } else {
            e.push(
                format!("spec.addresses[{i}]"),
                format!("{a:?} is not an IP address or CIDR"),
            );
        }
    }
    let mut endpoints = Vec::new();
    for (i, ep) in spec.endpoints.iter().enumerate() {
        let path = format!("spec.endpoints[{i}]");
        let address = match ep.address.as_deref() {
            None | Some("") => {
                if resolution != Resolution::Dns && resolution != Resolution::DnsRoundRobin {
                    e.push(
                        format!("{path}.address"),
                        "required unless resolution is DNS",
                    );
                }
                None
            }
            Some(a) => {
                if let Some(p) = a.strip_prefix("unix://") {
                    Some(EndpointAddress::Unix(PathBuf::from(p)))
                } else if let Ok(ip) = a.parse::<IpAddr>() {
                    Some(EndpointAddress::Ip(ip))
                } else if valid_host(a) && !a.contains('*') {
                    if resolution == Resolution::Static {
                        e.push(
                            format!("{path}.address"),
                            "STATIC resolution needs IP addresses",
                        );
                    }
                    Some(EndpointAddress::Hostname(a.to_ascii_lowercase()))
                } else {
                    e.push(
                        format!("{path}.address"),
                        format!("{a:?} is not an IP, hostname or unix:// path"),
                    );
                    None
                }
            }
        };
        let mut ep_ports = BTreeMap::new();
        for (name, n) in &ep.ports {
            if let Some(p) = port16(*n, &format!("{path}.ports.{name}"), e) {
                if !ports.iter().any(|sp| &sp.name == name) {
                    e.push(
                        format!("{path}.ports.{name}"),
                        "no service port with this name",
                    );
                }
                ep_ports.insert(name.clone(), p);
            }
        }
        endpoints.push(Endpoint {
            address,
            ports: ep_ports,
            labels: ep.labels.clone(),
            weight: ep.weight.unwrap_or(1),
            identity: ep
                .service_account
                .as_ref()
                .map(|sa| Identity::new(td, ns, sa.clone())),
            workload: None,
        });
    }
    if let Some(sel) = &spec.workload_selector {
        if !spec.endpoints.is_empty() {
            e.push(
                "spec.workloadSelector",
                "set endpoints or workloadSelector, not both",
            );
        }
        for (obj, w) in pods {
            if obj.namespace == ns && sel.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)) {
                for ip in &w.ips {
                    endpoints.push(Endpoint {
                        address: Some(EndpointAddress::Ip(*ip)),
                        ports: BTreeMap::new(),
                        labels: w.labels.clone(),
                        weight: 1,
                        identity: Some(w.identity.clone()),
                        workload: Some(w.name.clone()),
                    });
                }
            }
        }
    }
    if resolution == Resolution::Static
        && spec.endpoints.is_empty()
        && spec.workload_selector.is_none()
    {
        e.push(
            "spec.endpoints",
            "STATIC resolution needs endpoints (or a workloadSelector)",
        );
    }
    let export = export_to(&spec.export_to, ns, "spec.exportTo", e);
    let auto_ok = se
        .value
        .metadata
        .labels
        .get(AUTO_ALLOCATE_LABEL)
        .map(String::as_str)
        != Some("false");
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        let host = h.to_ascii_lowercase();
        let host = host.trim_end_matches('.').to_owned();
        let ip_host = host.parse::<IpAddr>().ok();
        if ip_host.is_none() && !valid_host(&host) {
            e.push(
                format!("spec.hosts[{i}]"),
                format!("{h:?} is not a valid host name"),
            );
            continue;
        }
        if !seen.insert(host.clone()) {
            e.push(
                format!("spec.hosts[{i}]"),
                format!("host {h:?} listed twice"),
            );
            continue;
        }
        let wildcard = host.starts_with('*');
        if wildcard
            && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
            && spec.endpoints.is_empty()
        {
            e.push(
                format!("spec.hosts[{i}]"),
                "wildcard hosts cannot be resolved with DNS; use resolution NONE or endpoints",
            );
        }
        let mut svc_vips = vips.clone();
        if let Some(ip) = ip_host
            && !svc_vips.contains(&ip)
        {
            svc_vips.push(ip);
        }
        let wants_vip = svc_vips.is_empty() && cidrs.is_empty() && !wildcard && auto_ok;
        out.push((
            Service {
                hostname: host,
                kind: ServiceKind::ServiceEntry,
                name: NamespacedName::new(ns, se.name.clone()),
                vips: svc_vips,
                auto_allocated: false,
                cidrs: cidrs.clone(),
                ports: ports.clone(),
                resolution,
                location,
                endpoints: endpoints.clone(),
                labels: se.value.metadata.labels.clone(),
                export_to: export.clone(),
                subject_alt_names: spec.subject_alt_names.clone(),
                waypoint: WaypointBinding::None,
            },
            wants_vip,
        ));
    }
    out
}
