//! AuthorizationPolicy at the waypoint: the policies bound to its Gateway plus those bound to
//! the destination Service / ServiceEntry, evaluated together (DENY first, then ALLOW).

use mesh_config::authz::{self, Decision, HttpAttrs, RequestAttrs};
use mesh_config::{NamespacedName, Service, Snapshot};

use super::Downstream;
use crate::upstream::endpoints::strip_port;

/// The L7 request being authorized.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// Host / :authority (a port is stripped).
    pub host: &'a str,
    pub method: &'a str,
    /// Path, with or without query (the query is not matched).
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Attributes of a flow through the waypoint. The source is the tunnel's verified identity; the
/// source IP is the original client from `forwarded` (the HBONE peer is ztunnel, not the
/// client), falling back to the peer when `forwarded` is absent. The source's labels (for
/// selector-style sources such as ASMEgressTrafficPolicy's `workloadSelector`) are only taken
/// from the pod at the client IP when that pod's identity is the tunnel's verified peer.
pub fn attrs<'a>(
    snap: &'a Snapshot,
    downstream: &'a Downstream,
    principal: &'a str,
    port: u16,
    sni: Option<&'a str>,
    http: Option<HttpRequest<'a>>,
) -> RequestAttrs<'a> {
    let remote = downstream.remote().ip();
    RequestAttrs {
        source_principal: Some(principal),
        source_namespace: Some(downstream.peer_identity.namespace.as_str()),
        source_labels: crate::observe::source_workload_labels(snap, downstream),
        source_ip: Some(remote),
        remote_ip: Some(remote),
        destination_ip: Some(downstream.local.ip()),
        destination_port: port,
        sni,
        http: http.map(|h| HttpAttrs {
            host: strip_port(h.host),
            method: h.method,
            path: h.path.split_once('?').map_or(h.path, |(p, _)| p),
            headers: h.headers,
        }),
    }
}

/// The decision for `attrs` towards `service` at waypoint `gateway`.
pub fn decide(
    snap: &Snapshot,
    gateway: &NamespacedName,
    service: Option<&Service>,
    attrs: &RequestAttrs<'_>,
) -> Decision {
    let gw = snap.authz_for_waypoint(gateway);
    match service {
        Some(s) => authz::evaluate_all(&[gw, snap.authz_for_service(s)], attrs),
        None => gw.evaluate(attrs),
    }
}

/// `%RESPONSE_CODE_DETAILS%` for a denial, as Envoy's RBAC filter writes it.
pub fn denial_details(d: &Decision) -> String {
    match d {
        Decision::Deny { policy: Some(p) } => format!(
            "rbac_access_denied_matched_policy[ns[{}]-policy[{}]]",
            p.namespace, p.name
        ),
        _ => "rbac_access_denied_matched_policy[none]".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    const CONFIG: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: istio-egress}
spec:
  gatewayClassName: istio-waypoint
  addresses: [{value: 10.244.1.20}]
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  addresses: [240.240.0.7]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: istio-egress}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: istio-egress}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: aliyun}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {methods: ["GET", "HEAD"], hosts: ["aliyun.com"]}}]
  - from: [{source: {ipBlocks: ["10.244.9.0/24"]}}]
"#;

    fn downstream(sa: &str, client: &str) -> Downstream {
        Downstream {
            peer_identity: certs::SpiffeId::new("cluster.local", "default", sa),
            hbone_peer: "10.244.1.1:40000".parse().expect("addr"),
            client: Some(client.parse().expect("addr")),
            local: "240.240.0.7:80".parse().expect("addr"),
        }
    }

    #[test]
    fn decisions() {
        let snap = mesh_config::load_sources([("c.yaml", CONFIG)]).expect("valid config");
        let gw = NamespacedName::new("istio-egress", "waypoint");
        let svc = snap.service_by_host("aliyun.com").expect("service").clone();
        let h = HeaderMap::new();
        let req = |method: &'static str, path: &'static str, host: &'static str| HttpRequest {
            host,
            method,
            path,
            headers: &h,
        };
        // (service account, client, request, allowed?)
        let cases = [
            (
                "sleep",
                "10.244.1.10:5000",
                Some(req("GET", "/", "aliyun.com:80")),
                true,
            ),
            (
                "sleep",
                "10.244.1.10:5000",
                Some(req("HEAD", "/x?y", "aliyun.com")),
                true,
            ),
            // DENY on the gateway wins over the ALLOW on the service.
            (
                "sleep",
                "10.244.1.10:5000",
                Some(req("GET", "/admin/x", "aliyun.com")),
                false,
            ),
            (
                "sleep",
                "10.244.1.10:5000",
                Some(req("POST", "/", "aliyun.com")),
                false,
            ),
            (
                "other",
                "10.244.1.10:5000",
                Some(req("GET", "/", "aliyun.com")),
                false,
            ),
            // ipBlocks match the original client from `forwarded`, not the HBONE peer.
            (
                "other",
                "10.244.9.3:5000",
                Some(req("POST", "/", "aliyun.com")),
                true,
            ),
            // At L4 the method-bound rule cannot match (ALLOW fails closed)...
            ("sleep", "10.244.1.10:5000", None, false),
            // ...and the gateway's path-bound DENY applies (fail closed), whatever the source.
            ("other", "10.244.9.3:5000", None, false),
        ];
        for (i, (sa, client, req, want)) in cases.into_iter().enumerate() {
            let d = downstream(sa, client);
            let principal = d.peer_identity.to_string();
            let a = attrs(&snap, &d, &principal, 80, None, req);
            let got = decide(&snap, &gw, Some(&svc), &a);
            assert_eq!(got.is_allow(), want, "case {i}: {got:?}");
        }
        let d = downstream("sleep", "10.244.1.10:5000");
        let principal = d.peer_identity.to_string();
        let a = attrs(
            &snap,
            &d,
            &principal,
            80,
            None,
            Some(req("GET", "/admin", "aliyun.com")),
        );
        assert_eq!(
            denial_details(&decide(&snap, &gw, Some(&svc), &a)),
            "rbac_access_denied_matched_policy[ns[istio-egress]-policy[deny-admin]]"
        );
    }
}
