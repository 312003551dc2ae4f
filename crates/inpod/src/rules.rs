//! The in-pod redirect ruleset, rendered as `iptables-restore --noflush` input. Pure: no I/O here.
//!
//! Shape, following Istio's in-pod rules (istio-cni `AppendInpodRules`, REDIRECT variant), in our
//! own `nat` chains so that installing is idempotent and removal touches nothing else:
//!
//! ```text
//! PREROUTING -> STRAIT_PREROUTING (inbound)        OUTPUT -> STRAIT_OUTPUT (outbound)
//!   -i lo                    RETURN                  mark 0x539/0xfff          RETURN
//!   tcp from kubelet probe   RETURN                  tcp to kubelet probe addr RETURN
//!   tcp dport 15008          RETURN                  udp 53, not out lo        REDIRECT 15053
//!   [excluded ports]         RETURN                  tcp 53, not to loopback   REDIRECT 15053
//!   tcp [included ports]     REDIRECT 15006          out lo                    RETURN
//!                                                    tcp [excluded ports]      RETURN
//!                                                    tcp [included ports]      REDIRECT 15001
//!                                                    [excluded CIDRs]          RETURN
//!                                                    tcp [included CIDRs]      REDIRECT 15001
//! ```
//!
//! The outbound scope follows Istio's order: excluded ports, included ports (whatever the
//! address), excluded CIDRs, included CIDRs — the same order as the mesh's
//! `CaptureScope::captures_outbound`, so the kernel and ztunnel agree on what is captured.
//!
//! Istio's PREROUTING also returns packets carrying the mark; that rule is left out because a
//! mark is per-packet kernel state that does not cross the veth into the pod's namespace, so no
//! inbound packet can carry it (ztunnel's own connections into the pod arrive on `lo`).
//!
//! We chose REDIRECT over Istio's default TPROXY: REDIRECT needs no IP_TRANSPARENT listener, no
//! `fwmark` policy route (`local 0.0.0.0/0 dev lo table 100`) and no connmark bookkeeping, because
//! conntrack reverses the NAT on replies by itself; Istio's own REDIRECT mode has the same shape.
//! The price: ztunnel's inbound side cannot present the original client address to the
//! application (it connects from the pod's own address). The connmark 0x111 rules only serve the
//! TPROXY route, so they are left out. `RETURN` is used where Istio says `ACCEPT`, so that other
//! rules in the built-in chains still see the packet.

use std::{fmt::Write as _, net::IpAddr, str::FromStr};

use ipnet::IpNet;

use crate::ConfigError;

/// Our chain in `nat` for traffic leaving the pod (hooked from `OUTPUT`).
pub const CHAIN_OUTPUT: &str = "STRAIT_OUTPUT";
/// Our chain in `nat` for traffic entering the pod (hooked from `PREROUTING`).
pub const CHAIN_PREROUTING: &str = "STRAIT_PREROUTING";

/// The mark on ztunnel's own sockets (Istio's 1337).
pub const DEFAULT_MARK: u32 = 0x539;
/// The bits of the mark that are ours (Istio's mask).
pub const DEFAULT_MARK_MASK: u32 = 0xfff;

/// Source address of kubelet health probes in ambient mode; they must reach the app unproxied.
pub const KUBELET_PROBE_V4: &str = "169.254.7.127/32";
/// IPv6 counterpart of [`KUBELET_PROBE_V4`].
pub const KUBELET_PROBE_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128";

/// Which `iptables` flavour a ruleset is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    pub fn save_command(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables-save",
            IpFamily::V6 => "ip6tables-save",
        }
    }

    pub fn restore_command(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables-restore",
            IpFamily::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            IpFamily::V4 => "127.0.0.1/32",
            IpFamily::V6 => "::1/128",
        }
    }

    fn kubelet_probe(self) -> &'static str {
        match self {
            IpFamily::V4 => KUBELET_PROBE_V4,
            IpFamily::V6 => KUBELET_PROBE_V6,
        }
    }

    fn contains(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (IpFamily::V4, IpNet::V4(_)) | (IpFamily::V6, IpNet::V6(_))
        )
    }
}

/// Which outbound destinations are captured: everything (`*`, the default) or a list of CIDRs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CidrSelector {
    #[default]
    All,
    Only(Vec<IpNet>),
}

impl FromStr for CidrSelector {
    type Err = ConfigError;

    /// `*`, or a comma-separated list of CIDRs (a bare address means just that host), as in the
    /// mesh's "addresses to which external access is redirected" setting. Empty means none.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" {
            return Ok(CidrSelector::All);
        }
        parse_cidr_list(s).map(CidrSelector::Only)
    }
}

/// A comma-separated list of CIDRs; a bare address is a host route (/32 or /128).
pub fn parse_cidr_list(s: &str) -> Result<Vec<IpNet>, ConfigError> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(parse_cidr)
        .collect()
}

fn parse_cidr(item: &str) -> Result<IpNet, ConfigError> {
    if let Ok(net) = item.parse::<IpNet>() {
        return Ok(net);
    }
    match item.parse::<IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => Err(ConfigError::Cidr {
            input: item.to_owned(),
            reason: "expected an address or address/prefix".to_owned(),
        }),
    }
}

/// Which inbound ports are captured: all (`*`, the default) or a list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PortSelector {
    #[default]
    All,
    Only(Vec<u16>),
}

impl FromStr for PortSelector {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" {
            return Ok(PortSelector::All);
        }
        parse_port_list(s).map(PortSelector::Only)
    }
}

/// A comma-separated list of ports (1–65535).
pub fn parse_port_list(s: &str) -> Result<Vec<u16>, ConfigError> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| match item.parse::<u16>() {
            Ok(0) => Err(ConfigError::Port {
                input: item.to_owned(),
                reason: "port 0".to_owned(),
            }),
            Ok(port) => Ok(port),
            Err(e) => Err(ConfigError::Port {
                input: item.to_owned(),
                reason: e.to_string(),
            }),
        })
        .collect()
}

/// What part of the pod's traffic is captured. Exclusions win over inclusions, except that an
/// included outbound port is captured even to an excluded CIDR (Istio's order).
///
/// The scope applies to TCP capture; DNS capture is all-or-nothing
/// ([`CaptureConfig::capture_dns`]) because the DNS proxy must see every query to answer mesh hosts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CaptureScope {
    /// Outbound destinations sent to the outbound port (default: all).
    pub include_outbound_cidrs: CidrSelector,
    /// Outbound destinations that go straight out.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Outbound destination ports that go straight out.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination ports sent to the outbound port whatever the address (after the
    /// excluded ports, before the CIDR checks).
    pub include_outbound_ports: Vec<u16>,
    /// Inbound destination ports sent to the inbound plaintext port (default: all).
    pub include_inbound_ports: PortSelector,
    /// Inbound destination ports delivered directly to the application.
    pub exclude_inbound_ports: Vec<u16>,
}

/// Everything the capture ruleset depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Mark on ztunnel's own sockets; marked traffic is never captured.
    pub mark: u32,
    pub mark_mask: u32,
    /// Outbound capture port (15001).
    pub outbound_port: u16,
    /// Inbound plaintext capture port (15006).
    pub inbound_plaintext_port: u16,
    /// HBONE port (15008): inbound connections to it reach ztunnel's own listener unredirected.
    pub hbone_port: u16,
    /// DNS capture port (15053).
    pub dns_port: u16,
    /// Redirect DNS (udp and tcp 53) to `dns_port`.
    pub capture_dns: bool,
    /// Let kubelet probes (from 169.254.7.127 / fd16:9254:7127:1337:ffff:ffff:ffff:ffff) through.
    pub allow_kubelet_probes: bool,
    /// Families to install rules for.
    pub families: Vec<IpFamily>,
    pub scope: CaptureScope,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            mark: DEFAULT_MARK,
            mark_mask: DEFAULT_MARK_MASK,
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            hbone_port: 15008,
            dns_port: 15053,
            capture_dns: true,
            allow_kubelet_probes: true,
            families: IpFamily::ALL.to_vec(),
            scope: CaptureScope::default(),
        }
    }
}

impl CaptureConfig {
    /// Checks what rendering cannot: a mark that is matchable, and distinct non-zero ports.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mark == 0 {
            return Err(ConfigError::ZeroMark);
        }
        if self.mark & !self.mark_mask != 0 {
            return Err(ConfigError::MarkOutsideMask {
                mark: self.mark,
                mask: self.mark_mask,
            });
        }
        let roles = [
            ("outbound port", self.outbound_port),
            ("inbound plaintext port", self.inbound_plaintext_port),
            ("HBONE port", self.hbone_port),
            ("DNS port", self.dns_port),
        ];
        for (i, (role, port)) in roles.iter().enumerate() {
            if *port == 0 {
                return Err(ConfigError::ZeroPort(role));
            }
            if roles[..i].iter().any(|(_, other)| other == port) {
                return Err(ConfigError::DuplicatePort(*port));
            }
        }
        let scope = &self.scope;
        let included = match &scope.include_inbound_ports {
            PortSelector::All => &[][..],
            PortSelector::Only(ports) => ports,
        };
        let lists = [
            ("excluded outbound port", &scope.exclude_outbound_ports[..]),
            ("included outbound port", &scope.include_outbound_ports[..]),
            ("excluded inbound port", &scope.exclude_inbound_ports[..]),
            ("included inbound port", included),
        ];
        for (role, ports) in lists {
            if ports.contains(&0) {
                return Err(ConfigError::ZeroPort(role));
            }
        }
        if self.families.is_empty() {
            return Err(ConfigError::NoFamily);
        }
        Ok(())
    }
}

/// What of ours is present in a `nat` table, read from `iptables-save` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NatState {
    pub has_output_chain: bool,
    pub has_prerouting_chain: bool,
    /// How many `-A OUTPUT -j STRAIT_OUTPUT` rules exist (more than one only after a leak).
    pub output_jumps: usize,
    pub prerouting_jumps: usize,
}

impl NatState {
    /// Reads the `*nat` section of `iptables-save` (or `ip6tables-save`) output.
    pub fn parse(saved: &str) -> Self {
        let output_jump = format!("-A OUTPUT -j {CHAIN_OUTPUT}");
        let prerouting_jump = format!("-A PREROUTING -j {CHAIN_PREROUTING}");
        let output_decl = format!(":{CHAIN_OUTPUT} ");
        let prerouting_decl = format!(":{CHAIN_PREROUTING} ");
        let mut state = NatState::default();
        let mut in_nat = false;
        for line in saved.lines().map(str::trim_end) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
                continue;
            }
            if line == "COMMIT" {
                in_nat = false;
                continue;
            }
            if !in_nat {
                continue;
            }
            if line.starts_with(&output_decl) {
                state.has_output_chain = true;
            } else if line.starts_with(&prerouting_decl) {
                state.has_prerouting_chain = true;
            } else if line == output_jump {
                state.output_jumps += 1;
            } else if line == prerouting_jump {
                state.prerouting_jumps += 1;
            }
        }
        state
    }

    /// Whether anything of ours is there.
    pub fn is_empty(&self) -> bool {
        *self == NatState::default()
    }
}

/// The complete ruleset for a namespace with none of our rules yet: our chains, their rules and
/// the jumps into them, as `iptables-restore --noflush` input.
pub fn render_rules(cfg: &CaptureConfig, family: IpFamily) -> String {
    render_install(cfg, family, &NatState::default())
}

/// The `iptables-restore --noflush` input that brings a namespace from `current` to exactly the
/// ruleset for `cfg`: declaring our chains flushes and refills them, jumps are added only where
/// missing, and jumps duplicated by an earlier leak are deleted down to one.
pub fn render_install(cfg: &CaptureConfig, family: IpFamily, current: &NatState) -> String {
    let mut out = String::from("*nat\n");
    let _ = writeln!(out, ":{CHAIN_PREROUTING} - [0:0]");
    let _ = writeln!(out, ":{CHAIN_OUTPUT} - [0:0]");
    for rule in prerouting_rules(cfg, family) {
        let _ = writeln!(out, "-A {CHAIN_PREROUTING} {rule}");
    }
    for rule in output_rules(cfg, family) {
        let _ = writeln!(out, "-A {CHAIN_OUTPUT} {rule}");
    }
    write_jumps(
        &mut out,
        "PREROUTING",
        CHAIN_PREROUTING,
        current.prerouting_jumps,
    );
    write_jumps(&mut out, "OUTPUT", CHAIN_OUTPUT, current.output_jumps);
    out.push_str("COMMIT\n");
    out
}

fn write_jumps(out: &mut String, from: &str, to: &str, present: usize) {
    match present {
        0 => {
            let _ = writeln!(out, "-A {from} -j {to}");
        }
        1 => {}
        n => {
            for _ in 1..n {
                let _ = writeln!(out, "-D {from} -j {to}");
            }
        }
    }
}

/// The `iptables-restore --noflush` input that removes exactly our jumps and chains, or `None`
/// when nothing of ours is present.
pub fn render_remove(current: &NatState) -> Option<String> {
    if current.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for _ in 0..current.prerouting_jumps {
        let _ = writeln!(out, "-D PREROUTING -j {CHAIN_PREROUTING}");
    }
    for _ in 0..current.output_jumps {
        let _ = writeln!(out, "-D OUTPUT -j {CHAIN_OUTPUT}");
    }
    for (present, chain) in [
        (current.has_prerouting_chain, CHAIN_PREROUTING),
        (current.has_output_chain, CHAIN_OUTPUT),
    ] {
        if present {
            let _ = writeln!(out, "-F {chain}");
            let _ = writeln!(out, "-X {chain}");
        }
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// Removes duplicates, keeping first occurrences, so the output is stable and minimal.
fn dedup<T: PartialEq + Copy>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// CIDRs of `family`, with host bits cleared (as `iptables-save` prints them).
fn cidrs(nets: &[IpNet], family: IpFamily) -> Vec<IpNet> {
    dedup(
        nets.iter()
            .filter(|net| family.contains(net))
            .map(IpNet::trunc),
    )
}

fn mark_match(cfg: &CaptureConfig) -> String {
    format!("-m mark --mark {:#x}/{:#x}", cfg.mark, cfg.mark_mask)
}

// Rules are written in the canonical order `iptables-save` prints them (addresses, interfaces,
// protocol, then matches in order), so what we render is literally what a save shows.

fn prerouting_rules(cfg: &CaptureConfig, family: IpFamily) -> Vec<String> {
    let scope = &cfg.scope;
    // Loopback traffic was already decided in OUTPUT; never capture it twice. There is no mark
    // rule here (Istio's has one): a packet's mark does not survive the veth into the pod's
    // namespace, so inbound packets never carry ztunnel's mark and such a rule could not match.
    let mut rules = vec!["-i lo -j RETURN".to_owned()];
    if cfg.allow_kubelet_probes {
        rules.push(format!("-s {} -p tcp -j RETURN", family.kubelet_probe()));
    }
    // HBONE arrives at ztunnel's own in-pod listener; redirecting it would hide the tunnel.
    rules.push(format!(
        "-p tcp -m tcp --dport {} -j RETURN",
        cfg.hbone_port
    ));
    for port in dedup(scope.exclude_inbound_ports.iter().copied()) {
        rules.push(format!("-p tcp -m tcp --dport {port} -j RETURN"));
    }
    let to = cfg.inbound_plaintext_port;
    match &scope.include_inbound_ports {
        PortSelector::All => rules.push(format!("-p tcp -j REDIRECT --to-ports {to}")),
        PortSelector::Only(ports) => {
            for port in dedup(ports.iter().copied()) {
                rules.push(format!(
                    "-p tcp -m tcp --dport {port} -j REDIRECT --to-ports {to}"
                ));
            }
        }
    }
    rules
}

fn output_rules(cfg: &CaptureConfig, family: IpFamily) -> Vec<String> {
    let scope = &cfg.scope;
    let mut rules = vec![format!("{} -j RETURN", mark_match(cfg))];
    if cfg.allow_kubelet_probes {
        rules.push(format!("-d {} -p tcp -j RETURN", family.kubelet_probe()));
    }
    if cfg.capture_dns {
        let dns = cfg.dns_port;
        // A resolver on loopback (e.g. a node-local cache) is left alone for UDP, as Istio does.
        rules.push(format!(
            "! -o lo -p udp -m udp --dport 53 -j REDIRECT --to-ports {dns}"
        ));
        rules.push(format!(
            "! -d {} -p tcp -m tcp --dport 53 -j REDIRECT --to-ports {dns}",
            family.loopback()
        ));
    }
    // The pod talking to itself (loopback or its own address) stays inside the pod.
    rules.push("-o lo -j RETURN".to_owned());
    // Istio's order: excluded ports, included ports, excluded CIDRs, included CIDRs.
    let excluded_ports = dedup(scope.exclude_outbound_ports.iter().copied());
    for port in &excluded_ports {
        rules.push(format!("-p tcp -m tcp --dport {port} -j RETURN"));
    }
    let to = cfg.outbound_port;
    // A port both excluded and included is excluded (its RETURN comes first); not rendering the
    // unreachable redirect keeps the chain minimal.
    for port in dedup(scope.include_outbound_ports.iter().copied()) {
        if !excluded_ports.contains(&port) {
            rules.push(format!(
                "-p tcp -m tcp --dport {port} -j REDIRECT --to-ports {to}"
            ));
        }
    }
    for net in cidrs(&scope.exclude_outbound_cidrs, family) {
        rules.push(format!("-d {net} -j RETURN"));
    }
    match &scope.include_outbound_cidrs {
        CidrSelector::All => rules.push(format!("-p tcp -j REDIRECT --to-ports {to}")),
        CidrSelector::Only(nets) => {
            for net in cidrs(nets, family) {
                rules.push(format!("-d {net} -p tcp -j REDIRECT --to-ports {to}"));
            }
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An edit applied to the default config by a table-driven case.
    type Change = fn(&mut CaptureConfig);

    fn nets(s: &str) -> Vec<IpNet> {
        parse_cidr_list(s).expect("test CIDRs")
    }

    const DEFAULT_V4: &str = "\
*nat
:STRAIT_PREROUTING - [0:0]
:STRAIT_OUTPUT - [0:0]
-A STRAIT_PREROUTING -i lo -j RETURN
-A STRAIT_PREROUTING -s 169.254.7.127/32 -p tcp -j RETURN
-A STRAIT_PREROUTING -p tcp -m tcp --dport 15008 -j RETURN
-A STRAIT_PREROUTING -p tcp -j REDIRECT --to-ports 15006
-A STRAIT_OUTPUT -m mark --mark 0x539/0xfff -j RETURN
-A STRAIT_OUTPUT -d 169.254.7.127/32 -p tcp -j RETURN
-A STRAIT_OUTPUT ! -o lo -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053
-A STRAIT_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053
-A STRAIT_OUTPUT -o lo -j RETURN
-A STRAIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -j STRAIT_PREROUTING
-A OUTPUT -j STRAIT_OUTPUT
COMMIT
";

    #[test]
    fn default_v4_ruleset_is_istios_shape() {
        assert_eq!(
            render_rules(&CaptureConfig::default(), IpFamily::V4),
            DEFAULT_V4
        );
    }

    #[test]
    fn default_v6_uses_v6_loopback_and_probe_address() {
        let v6 = render_rules(&CaptureConfig::default(), IpFamily::V6);
        let expected = DEFAULT_V4
            .replace("169.254.7.127/32", KUBELET_PROBE_V6)
            .replace("127.0.0.1/32", "::1/128");
        assert_eq!(v6, expected);
    }

    /// (case, config change, family, rules that must appear in this order, rules that must not)
    #[test]
    fn scoped_rulesets() {
        type Case = (
            &'static str,
            Change,
            IpFamily,
            &'static [&'static str],
            &'static [&'static str],
        );
        let cases: &[Case] = &[
            (
                "excluded CIDR returns before the outbound redirect",
                |c| c.scope.exclude_outbound_cidrs = nets("203.0.113.0/24"),
                IpFamily::V4,
                &[
                    "-A STRAIT_OUTPUT -o lo -j RETURN",
                    "-A STRAIT_OUTPUT -d 203.0.113.0/24 -j RETURN",
                    "-A STRAIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                ],
                &[],
            ),
            (
                "host bits are cleared and duplicates dropped",
                |c| c.scope.exclude_outbound_cidrs = nets("10.1.2.3/8, 10.0.0.0/8, 192.0.2.7"),
                IpFamily::V4,
                &[
                    "-A STRAIT_OUTPUT -d 10.0.0.0/8 -j RETURN",
                    "-A STRAIT_OUTPUT -d 192.0.2.7/32 -j RETURN",
                ],
                &["10.1.2.3"],
            ),
            (
                "CIDRs of the other family are not rendered",
                |c| c.scope.exclude_outbound_cidrs = nets("203.0.113.0/24,2001:db8::/32"),
                IpFamily::V6,
                &["-A STRAIT_OUTPUT -d 2001:db8::/32 -j RETURN"],
                &["203.0.113.0/24"],
            ),
            (
                "included CIDRs replace the catch-all redirect",
                |c| {
                    c.scope.include_outbound_cidrs =
                        CidrSelector::Only(nets("10.96.0.0/12,240.240.0.0/16"))
                },
                IpFamily::V4,
                &[
                    "-A STRAIT_OUTPUT -d 10.96.0.0/12 -p tcp -j REDIRECT --to-ports 15001",
                    "-A STRAIT_OUTPUT -d 240.240.0.0/16 -p tcp -j REDIRECT --to-ports 15001",
                ],
                &["-A STRAIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001"],
            ),
            (
                "an include list without this family's CIDRs captures no outbound TCP",
                |c| c.scope.include_outbound_cidrs = CidrSelector::Only(nets("10.96.0.0/12")),
                IpFamily::V6,
                &["-A STRAIT_OUTPUT -o lo -j RETURN"],
                &["--to-ports 15001"],
            ),
            (
                "exclusions come before inclusions",
                |c| {
                    c.scope.include_outbound_cidrs = CidrSelector::Only(nets("10.0.0.0/8"));
                    c.scope.exclude_outbound_cidrs = nets("10.1.0.0/16");
                    c.scope.exclude_outbound_ports = vec![22, 22, 3306];
                },
                IpFamily::V4,
                &[
                    "-A STRAIT_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
                    "-A STRAIT_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN",
                    "-A STRAIT_OUTPUT -d 10.1.0.0/16 -j RETURN",
                    "-A STRAIT_OUTPUT -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 15001",
                ],
                &["--dport 22 -j RETURN\n-A STRAIT_OUTPUT -p tcp -m tcp --dport 22"],
            ),
            (
                "included ports: after excluded ports, before the CIDR checks, deduplicated",
                |c| {
                    c.scope.include_outbound_cidrs = CidrSelector::Only(nets("10.0.0.0/8"));
                    c.scope.exclude_outbound_cidrs = nets("192.0.2.0/24");
                    c.scope.exclude_outbound_ports = vec![22];
                    c.scope.include_outbound_ports = vec![9000, 9000, 8443];
                },
                IpFamily::V4,
                &[
                    "-A STRAIT_OUTPUT -o lo -j RETURN",
                    "-A STRAIT_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
                    "-A STRAIT_OUTPUT -p tcp -m tcp --dport 9000 -j REDIRECT --to-ports 15001",
                    "-A STRAIT_OUTPUT -p tcp -m tcp --dport 8443 -j REDIRECT --to-ports 15001",
                    "-A STRAIT_OUTPUT -d 192.0.2.0/24 -j RETURN",
                    "-A STRAIT_OUTPUT -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 15001",
                ],
                &[
                    "--dport 9000 -j REDIRECT --to-ports 15001\n-A STRAIT_OUTPUT -p tcp -m tcp --dport 9000",
                    "-A STRAIT_OUTPUT -p tcp -j REDIRECT",
                ],
            ),
            (
                "included ports apply in a family with no included CIDRs",
                |c| {
                    c.scope.include_outbound_cidrs = CidrSelector::Only(nets("10.0.0.0/8"));
                    c.scope.include_outbound_ports = vec![9000];
                },
                IpFamily::V6,
                &["-A STRAIT_OUTPUT -p tcp -m tcp --dport 9000 -j REDIRECT --to-ports 15001"],
                &["-d 10.0.0.0/8", "-A STRAIT_OUTPUT -p tcp -j REDIRECT"],
            ),
            (
                "a port both excluded and included is only excluded",
                |c| {
                    c.scope.exclude_outbound_ports = vec![9000];
                    c.scope.include_outbound_ports = vec![9000, 9001];
                },
                IpFamily::V4,
                &[
                    "-A STRAIT_OUTPUT -p tcp -m tcp --dport 9000 -j RETURN",
                    "-A STRAIT_OUTPUT -p tcp -m tcp --dport 9001 -j REDIRECT --to-ports 15001",
                    "-A STRAIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                ],
                &["--dport 9000 -j REDIRECT"],
            ),
            (
                "inbound port scope",
                |c| {
                    c.scope.include_inbound_ports = PortSelector::Only(vec![8080, 9090]);
                    c.scope.exclude_inbound_ports = vec![9090];
                },
                IpFamily::V4,
                &[
                    "-A STRAIT_PREROUTING -p tcp -m tcp --dport 15008 -j RETURN",
                    "-A STRAIT_PREROUTING -p tcp -m tcp --dport 9090 -j RETURN",
                    "-A STRAIT_PREROUTING -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15006",
                    "-A STRAIT_PREROUTING -p tcp -m tcp --dport 9090 -j REDIRECT --to-ports 15006",
                ],
                &["-A STRAIT_PREROUTING -p tcp -j REDIRECT"],
            ),
            (
                "DNS capture off",
                |c| c.capture_dns = false,
                IpFamily::V4,
                &["-A STRAIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001"],
                &["--dport 53", "15053"],
            ),
            (
                "custom mark and ports",
                |c| {
                    c.mark = 0x20;
                    c.mark_mask = 0xff;
                    c.outbound_port = 25001;
                    c.dns_port = 25053;
                },
                IpFamily::V4,
                &[
                    "-A STRAIT_OUTPUT -m mark --mark 0x20/0xff -j RETURN",
                    "--dport 53 -j REDIRECT --to-ports 25053",
                    "-A STRAIT_OUTPUT -p tcp -j REDIRECT --to-ports 25001",
                ],
                &["0x539", "15001"],
            ),
            (
                "kubelet probes not special",
                |c| c.allow_kubelet_probes = false,
                IpFamily::V4,
                &[
                    "-A STRAIT_PREROUTING -i lo -j RETURN",
                    "-A STRAIT_PREROUTING -p tcp -m tcp --dport 15008 -j RETURN",
                ],
                &["169.254.7.127"],
            ),
        ];
        for (name, change, family, ordered, absent) in cases {
            let mut cfg = CaptureConfig::default();
            change(&mut cfg);
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            let text = render_rules(&cfg, *family);
            let mut from = 0;
            for want in *ordered {
                match text[from..].find(want) {
                    Some(at) => from += at + want.len(),
                    None => panic!("{name}: missing or out of order: {want}\n{text}"),
                }
            }
            for unwanted in *absent {
                assert!(!text.contains(unwanted), "{name}: has {unwanted}\n{text}");
            }
        }
    }

    /// The whole outbound chain, so duplicates and stray rules cannot hide behind an ordered
    /// substring match.
    #[test]
    fn included_outbound_ports_chain_is_exact() {
        let mut cfg = CaptureConfig::default();
        cfg.scope.include_outbound_cidrs = CidrSelector::Only(nets("10.0.0.0/8,2001:db8::/32"));
        cfg.scope.exclude_outbound_cidrs = nets("10.1.0.0/16");
        cfg.scope.exclude_outbound_ports = vec![22, 22];
        cfg.scope.include_outbound_ports = vec![9000, 22, 9000, 8443];
        cfg.validate().expect("valid");
        let chain = |text: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix("-A STRAIT_OUTPUT "))
                .skip_while(|l| *l != "-o lo -j RETURN")
                .map(str::to_owned)
                .collect()
        };
        let rendered = render_rules(&cfg, IpFamily::V4);
        assert_eq!(
            chain(&rendered),
            [
                "-o lo -j RETURN",
                "-p tcp -m tcp --dport 22 -j RETURN",
                "-p tcp -m tcp --dport 9000 -j REDIRECT --to-ports 15001",
                "-p tcp -m tcp --dport 8443 -j REDIRECT --to-ports 15001",
                "-d 10.1.0.0/16 -j RETURN",
                "-d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
        // Rendering is a pure function of the config: re-installing yields the same chain.
        assert_eq!(render_rules(&cfg, IpFamily::V4), rendered);
        assert_eq!(
            chain(&render_rules(&cfg, IpFamily::V6)),
            [
                "-o lo -j RETURN",
                "-p tcp -m tcp --dport 22 -j RETURN",
                "-p tcp -m tcp --dport 9000 -j REDIRECT --to-ports 15001",
                "-p tcp -m tcp --dport 8443 -j REDIRECT --to-ports 15001",
                "-d 2001:db8::/32 -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
    }

    const SAVED_WITH_OURS: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j STRAIT_PREROUTING
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:STRAIT_OUTPUT - [0:0]
:STRAIT_PREROUTING - [0:0]
-A PREROUTING -j STRAIT_PREROUTING
-A OUTPUT -j KUBE-SERVICES
-A OUTPUT -j STRAIT_OUTPUT
-A OUTPUT -j STRAIT_OUTPUT
-A OUTPUT -j STRAIT_OUTPUT_OTHER
-A STRAIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

    #[test]
    fn parse_counts_only_our_nat_jumps() {
        // The mangle jump, other chains and prefixes of our names do not count.
        let state = NatState::parse(SAVED_WITH_OURS);
        assert_eq!(
            state,
            NatState {
                has_output_chain: true,
                has_prerouting_chain: true,
                output_jumps: 2,
                prerouting_jumps: 1,
            }
        );
        assert!(NatState::parse("").is_empty());
        assert!(NatState::parse("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n").is_empty());
    }

    #[test]
    fn install_adds_only_missing_jumps_and_removes_leaked_ones() {
        let cfg = CaptureConfig::default();
        // (current jumps: prerouting, output) -> jump lines in the script
        let cases: &[((usize, usize), &[&str])] = &[
            (
                (0, 0),
                &[
                    "-A PREROUTING -j STRAIT_PREROUTING",
                    "-A OUTPUT -j STRAIT_OUTPUT",
                ],
            ),
            ((1, 1), &[]),
            ((1, 0), &["-A OUTPUT -j STRAIT_OUTPUT"]),
            (
                (3, 2),
                &[
                    "-D PREROUTING -j STRAIT_PREROUTING",
                    "-D PREROUTING -j STRAIT_PREROUTING",
                    "-D OUTPUT -j STRAIT_OUTPUT",
                ],
            ),
        ];
        for ((pre, out), want) in cases {
            let state = NatState {
                has_output_chain: true,
                has_prerouting_chain: true,
                output_jumps: *out,
                prerouting_jumps: *pre,
            };
            let text = render_install(&cfg, IpFamily::V4, &state);
            let jumps: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("-A OUTPUT") || l.starts_with("-A PREROUTING"))
                .chain(text.lines().filter(|l| l.starts_with("-D ")))
                .collect();
            assert_eq!(&jumps, want, "state ({pre}, {out})");
            // Our chains are always redeclared, which flushes them before they are refilled.
            assert!(text.contains(":STRAIT_OUTPUT - [0:0]\n"));
            assert!(text.ends_with("COMMIT\n"));
        }
    }

    #[test]
    fn remove_deletes_exactly_ours() {
        assert_eq!(render_remove(&NatState::default()), None);
        let text = render_remove(&NatState::parse(SAVED_WITH_OURS)).expect("something to remove");
        assert_eq!(
            text,
            "*nat\n\
             -D PREROUTING -j STRAIT_PREROUTING\n\
             -D OUTPUT -j STRAIT_OUTPUT\n\
             -D OUTPUT -j STRAIT_OUTPUT\n\
             -F STRAIT_PREROUTING\n\
             -X STRAIT_PREROUTING\n\
             -F STRAIT_OUTPUT\n\
             -X STRAIT_OUTPUT\n\
             COMMIT\n"
        );
        // Only the output chain left behind by a half-done removal.
        let partial = NatState {
            has_output_chain: true,
            ..NatState::default()
        };
        assert_eq!(
            render_remove(&partial).as_deref(),
            Some("*nat\n-F STRAIT_OUTPUT\n-X STRAIT_OUTPUT\nCOMMIT\n")
        );
    }

    #[test]
    fn selectors_parse() {
        assert_eq!("*".parse::<CidrSelector>(), Ok(CidrSelector::All));
        assert_eq!(" * ".parse::<PortSelector>(), Ok(PortSelector::All));
        assert_eq!(
            "10.0.0.0/8, 2001:db8::/32,192.0.2.1".parse::<CidrSelector>(),
            Ok(CidrSelector::Only(vec![
                "10.0.0.0/8".parse().expect("net"),
                "2001:db8::/32".parse().expect("net"),
                "192.0.2.1/32".parse().expect("net"),
            ]))
        );
        assert_eq!("".parse::<CidrSelector>(), Ok(CidrSelector::Only(vec![])));
        assert_eq!(
            "80, 443".parse::<PortSelector>(),
            Ok(PortSelector::Only(vec![80, 443]))
        );
        for bad in ["10.0.0.0/33", "example.com", "10.0.0.0/8;"] {
            assert!(
                matches!(bad.parse::<CidrSelector>(), Err(ConfigError::Cidr { .. })),
                "{bad}"
            );
        }
        for bad in ["0", "65536", "http", "-1"] {
            assert!(
                matches!(bad.parse::<PortSelector>(), Err(ConfigError::Port { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn validate_rejects_unsound_configs() {
        let cases: &[(Change, ConfigError)] = &[
            (|c| c.mark = 0, ConfigError::ZeroMark),
            (
                |c| c.mark = 0x1539,
                ConfigError::MarkOutsideMask {
                    mark: 0x1539,
                    mask: 0xfff,
                },
            ),
            (|c| c.dns_port = 15001, ConfigError::DuplicatePort(15001)),
            (|c| c.hbone_port = 0, ConfigError::ZeroPort("HBONE port")),
            (
                |c| c.scope.exclude_outbound_ports = vec![0],
                ConfigError::ZeroPort("excluded outbound port"),
            ),
            (
                |c| c.scope.include_outbound_ports = vec![9000, 0],
                ConfigError::ZeroPort("included outbound port"),
            ),
            (|c| c.families.clear(), ConfigError::NoFamily),
        ];
        assert_eq!(CaptureConfig::default().validate(), Ok(()));
        for (change, want) in cases {
            let mut cfg = CaptureConfig::default();
            change(&mut cfg);
            assert_eq!(cfg.validate().as_ref(), Err(want));
        }
    }
}
