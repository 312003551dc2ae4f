//! Which endpoints a service port has, as a pure function of the compiled service.

use std::net::SocketAddr;

use mesh_config::model::Labels;
use mesh_config::snapshot::{EndpointAddress, Resolution};
use mesh_config::{Service, ServicePort};

/// One upstream endpoint before DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSpec {
    Addr(SocketAddr),
    /// Resolve `host` and dial `port`.
    Name {
        host: String,
        port: u16,
    },
}

impl EndpointSpec {
    pub fn port(&self) -> u16 {
        match self {
            EndpointSpec::Addr(a) => a.port(),
            EndpointSpec::Name { port, .. } => *port,
        }
    }
}

/// The endpoints of `service` port `sp`:
///
/// * DNS resolution: the service host itself when the entry lists no endpoints, else each
///   endpoint (addresses as they are, host names resolved).
/// * STATIC and Kubernetes Services: the endpoints' addresses.
/// * NONE: the original destination, unless that is one of the service's VIPs (then the request's
///   host, `hint_host`, is resolved instead: a VIP is only meaningful inside the mesh).
///
/// The port is the endpoint's override for the port name, else `targetPort`, else the service
/// port. `subset` keeps only endpoints carrying all of its labels.
pub fn endpoints_for(
    service: &Service,
    sp: &ServicePort,
    subset: Option<&Labels>,
    original: Option<SocketAddr>,
    hint_host: Option<&str>,
) -> Vec<EndpointSpec> {
    let in_subset = |labels: &Labels| {
        subset.is_none_or(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    let host_name = (!service.is_wildcard())
        .then_some(service.hostname.as_str())
        .or(hint_host);
    match service.resolution {
        Resolution::None => {
            let port = sp.upstream_port();
            match original {
                Some(dst) if !service.vips.contains(&dst.ip()) => {
                    vec![EndpointSpec::Addr(SocketAddr::new(dst.ip(), port))]
                }
                _ => hint_host
                    .map(|h| EndpointSpec::Name {
                        host: strip_port(h).to_owned(),
                        port,
                    })
                    .into_iter()
                    .collect(),
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin if service.endpoints.is_empty() => host_name
            .map(|host| EndpointSpec::Name {
                host: host.to_owned(),
                port: sp.upstream_port(),
            })
            .into_iter()
            .collect(),
        _ => service
            .endpoints
            .iter()
            .filter(|ep| in_subset(&ep.labels) && ep.weight > 0)
            .filter_map(|ep| {
                let port = service.endpoint_port(ep, sp);
                match &ep.address {
                    Some(EndpointAddress::Ip(ip)) => {
                        Some(EndpointSpec::Addr(SocketAddr::new(*ip, port)))
                    }
                    Some(EndpointAddress::Hostname(h)) => Some(EndpointSpec::Name {
                        host: h.clone(),
                        port,
                    }),
                    // An endpoint without address stands for the service host itself.
                    None => host_name.map(|h| EndpointSpec::Name {
                        host: h.to_owned(),
                        port,
                    }),
                    // Unix sockets are a sidecar feature; a waypoint cannot reach them.
                    Some(EndpointAddress::Unix(_)) => None,
                }
            })
            .collect(),
    }
}

/// `host[:port]` → `host` (IPv6 literals in brackets kept intact).
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h).unwrap_or(authority);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_config::Snapshot;

    const CONFIG: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  addresses: [240.240.0.7]
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 443}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static, namespace: istio-egress}
spec:
  hosts: [static.example]
  addresses: [240.240.0.8]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  resolution: STATIC
  endpoints:
  - {address: 203.0.113.20, labels: {version: v1}}
  - {address: 203.0.113.21, labels: {version: v2}, ports: {http: 8080}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dnseps, namespace: istio-egress}
spec:
  hosts: [dnseps.example]
  addresses: [240.240.0.9]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  resolution: DNS
  endpoints:
  - {address: mirror-a.example}
  - {address: 203.0.113.30}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: istio-egress}
spec:
  hosts: ["*.wild.example"]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  resolution: NONE
"#;

    fn snap() -> Snapshot {
        mesh_config::load_sources([("c.yaml", CONFIG)]).expect("valid config")
    }

    fn eps(
        s: &Snapshot,
        host: &str,
        subset: Option<&[(&str, &str)]>,
        original: Option<&str>,
        hint: Option<&str>,
    ) -> Vec<EndpointSpec> {
        let svc = s.service_by_host(host).expect("service");
        let labels: Option<Labels> = subset.map(|l| {
            l.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        });
        endpoints_for(
            svc,
            &svc.ports[0],
            labels.as_ref(),
            original.map(|o| o.parse().expect("addr")),
            hint,
        )
    }

    fn name(host: &str, port: u16) -> EndpointSpec {
        EndpointSpec::Name {
            host: host.into(),
            port,
        }
    }

    fn addr(a: &str) -> EndpointSpec {
        EndpointSpec::Addr(a.parse().expect("addr"))
    }

    #[test]
    fn endpoint_sets() {
        let s = snap();
        let v1: &[(&str, &str)] = &[("version", "v1")];
        let v3: &[(&str, &str)] = &[("version", "v3")];
        let cases: Vec<(Vec<EndpointSpec>, Vec<EndpointSpec>)> = vec![
            // Seed 000: DNS host, targetPort 443.
            (
                eps(&s, "aliyun.com", None, None, None),
                vec![name("aliyun.com", 443)],
            ),
            (
                eps(&s, "static.example", None, None, None),
                vec![addr("203.0.113.20:80"), addr("203.0.113.21:8080")],
            ),
            (
                eps(&s, "static.example", Some(v1), None, None),
                vec![addr("203.0.113.20:80")],
            ),
            (eps(&s, "static.example", Some(v3), None, None), vec![]),
            (
                eps(&s, "dnseps.example", None, None, None),
                vec![name("mirror-a.example", 80), addr("203.0.113.30:80")],
            ),
            // NONE: the original destination when it is a real address...
            (
                eps(
                    &s,
                    "a.wild.example",
                    None,
                    Some("203.0.113.40:80"),
                    Some("a.wild.example"),
                ),
                vec![addr("203.0.113.40:80")],
            ),
            // ...else the request's host.
            (
                eps(&s, "a.wild.example", None, None, Some("a.wild.example:80")),
                vec![name("a.wild.example", 80)],
            ),
        ];
        for (i, (got, want)) in cases.into_iter().enumerate() {
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn ports_are_stripped() {
        for (input, want) in [
            ("aliyun.com", "aliyun.com"),
            ("aliyun.com:80", "aliyun.com"),
            ("[fd00::1]:80", "fd00::1"),
            ("fd00::1", "fd00::1"),
            ("203.0.113.1:8080", "203.0.113.1"),
        ] {
            assert_eq!(strip_port(input), want, "{input}");
        }
    }
}
