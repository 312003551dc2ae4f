//! What ztunnel captures inside a pod: Istio's `traffic.sidecar.istio.io/*` annotations, read
//! from the Pod, else its Namespace, else the root namespace (`istio-system`) Namespace object
//! (our stand-in for the mesh-wide "global" setting of seed 002), else Istio's defaults
//! (everything captured).
use ipnet::IpNet;
use serde::Serialize;
use std::net::SocketAddr;

pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// `*` or a list of CIDRs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IpRanges {
    All,
    Cidrs(Vec<IpNet>),
}

impl IpRanges {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        match self {
            IpRanges::All => true,
            IpRanges::Cidrs(c) => c.iter().any(|n| n.contains(&ip)),
        }
    }
}

/// `*` or a list of ports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortSet {
    All,
    Ports(Vec<u16>),
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        match self {
            PortSet::All => true,
            PortSet::Ports(p) => p.contains(&port),
        }
    }
}

/// Interception scope of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CaptureScope {
    pub include_outbound_ip_ranges: IpRanges,
    pub exclude_outbound_ip_ranges: Vec<IpNet>,
    pub include_outbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub include_inbound_ports: PortSet,
    pub exclude_inbound_ports: Vec<u16>,
}

impl Default for CaptureScope {
    fn default() -> Self {
        CaptureScope {
            include_outbound_ip_ranges: IpRanges::All,
            exclude_outbound_ip_ranges: Vec::new(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_inbound_ports: PortSet::All,
            exclude_inbound_ports: Vec::new(),
        }
    }
}

impl CaptureScope {
    /// Istio's order: excluded ports, then included ports (regardless of address), then
    /// excluded ranges, then included ranges.
    pub fn captures_outbound(&self, dst: SocketAddr) -> bool {
        if self.exclude_outbound_ports.contains(&dst.port()) {
            return false;
        }
        if self.include_outbound_ports.contains(&dst.port()) {
            return true;
        }
        if self
            .exclude_outbound_ip_ranges
            .iter()
            .any(|n| n.contains(&dst.ip()))
        {
            return false;
        }
        self.include_outbound_ip_ranges.contains(dst.ip())
    }

    pub fn captures_inbound(&self, port: u16) -> bool {
        !self.exclude_inbound_ports.contains(&port) && self.include_inbound_ports.contains(port)
    }

    /// Builds a scope from layered annotation maps (most specific first). Errors are
    /// `(annotation key, message)` for the first layer that set the key.
    pub(crate) fn from_layers(
        layers: &[&crate::model::Labels],
    ) -> (CaptureScope, Vec<(String, String)>) {
        let mut scope = CaptureScope::default();
        let mut errors = Vec::new();
        let get = |key: &str| layers.iter().find_map(|l| l.get(key).map(String::as_str));
        let mut err = |key: &str, msg: String| errors.push((key.to_owned(), msg));
        if let Some(v) = get(INCLUDE_OUTBOUND_IP_RANGES) {
            match parse_ranges(v) {
                Ok(r) => scope.include_outbound_ip_ranges = r,
                Err(e) => err(INCLUDE_OUTBOUND_IP_RANGES, e),
            }
        }
        if let Some(v) = get(EXCLUDE_OUTBOUND_IP_RANGES) {
            match parse_ranges(v) {
                Ok(IpRanges::Cidrs(c)) => scope.exclude_outbound_ip_ranges = c,
                Ok(IpRanges::All) => err(
                    EXCLUDE_OUTBOUND_IP_RANGES,
                    "\"*\" is not allowed here".into(),
                ),
                Err(e) => err(EXCLUDE_OUTBOUND_IP_RANGES, e),
            }
        }
        for (key, slot) in [
            (INCLUDE_OUTBOUND_PORTS, &mut scope.include_outbound_ports),
            (EXCLUDE_OUTBOUND_PORTS, &mut scope.exclude_outbound_ports),
            (EXCLUDE_INBOUND_PORTS, &mut scope.exclude_inbound_ports),
        ] {
            if let Some(v) = get(key) {
                match parse_ports(v) {
                    Ok(PortSet::Ports(p)) => *slot = p,
                    Ok(PortSet::All) => err(key, "\"*\" is not allowed here".into()),
                    Err(e) => err(key, e),
                }
            }
        }
        if let Some(v) = get(INCLUDE_INBOUND_PORTS) {
            match parse_ports(v) {
                Ok(p) => scope.include_inbound_ports = p,
                Err(e) => err(INCLUDE_INBOUND_PORTS, e),
            }
        }
        (scope, errors)
    }
}

/// `*`, empty (nothing), or comma-separated CIDRs / bare IPs.
pub fn parse_ranges(v: &str) -> Result<IpRanges, String> {
    let v = v.trim();
    if v == "*" {
        return Ok(IpRanges::All);
    }
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net = part
            .parse::<IpNet>()
            .or_else(|_| part.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{part:?} is not a CIDR (e.g. 10.0.0.0/8) or \"*\""))?;
        out.push(net.trunc());
    }
    Ok(IpRanges::Cidrs(out))
}

/// `*`, empty, or comma-separated ports.
pub fn parse_ports(v: &str) -> Result<PortSet, String> {
    let v = v.trim();
    if v == "*" {
        return Ok(PortSet::All);
    }
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: u16 = part
            .parse()
            .map_err(|_| format!("{part:?} is not a port number"))?;
        out.push(p);
    }
    Ok(PortSet::Ports(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Labels;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn outbound_table() {
        let pod = labels(&[
            (INCLUDE_OUTBOUND_IP_RANGES, "10.96.0.0/12, 192.168.1.0/24"),
            (EXCLUDE_OUTBOUND_PORTS, "5432"),
        ]);
        let ns = labels(&[
            (INCLUDE_OUTBOUND_IP_RANGES, "*"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.96.0.10/32"),
            (INCLUDE_OUTBOUND_PORTS, "9000"),
        ]);
        let (s, errs) = CaptureScope::from_layers(&[&pod, &ns]);
        assert!(errs.is_empty(), "{errs:?}");
        let cases = [
            ("10.96.1.1:80", true),    // included range
            ("10.96.0.10:80", false),  // excluded range beats included
            ("192.168.1.5:443", true), // second included range
            ("8.8.8.8:80", false),     // pod's include list overrides the namespace's "*"
            ("8.8.8.8:9000", true),    // included port regardless of address
            ("10.96.1.1:5432", false), // excluded port beats everything
        ];
        for (addr, want) in cases {
            assert_eq!(s.captures_outbound(addr.parse().unwrap()), want, "{addr}");
        }
    }

    #[test]
    fn defaults_capture_everything() {
        let (s, _) = CaptureScope::from_layers(&[]);
        assert!(s.captures_outbound("1.1.1.1:443".parse().unwrap()));
        assert!(s.captures_inbound(8080));
        let none = labels(&[(INCLUDE_OUTBOUND_IP_RANGES, "")]);
        let (s, _) = CaptureScope::from_layers(&[&none]);
        assert!(!s.captures_outbound("1.1.1.1:443".parse().unwrap()));
    }

    #[test]
    fn inbound_and_errors() {
        let pod = labels(&[
            (INCLUDE_INBOUND_PORTS, "80,8080"),
            (EXCLUDE_INBOUND_PORTS, "8080"),
        ]);
        let (s, _) = CaptureScope::from_layers(&[&pod]);
        assert!(s.captures_inbound(80));
        assert!(!s.captures_inbound(8080));
        assert!(!s.captures_inbound(9090));
        let bad = labels(&[
            (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33"),
            (EXCLUDE_OUTBOUND_PORTS, "x"),
        ]);
        let (_, errs) = CaptureScope::from_layers(&[&bad]);
        assert_eq!(errs.len(), 2, "{errs:?}");
    }
}
