//! A small routed network made only of namespaces the test created.
//!
//! ```text
//!   host "pod" 10.244.0.10/16 ─┐                 ┌─ host "web" 203.0.113.10/24
//!                   eth0 ══ vhN ┤ br0 (router ns) ├ vhM ══ eth0
//!                               │ 10.244.0.1/16   │
//!                               │ 203.0.113.1/24  │
//! ```
//!
//! Each host gets a veth pair created directly between the router namespace and its own (never
//! in the root namespace), a default route via the router's address in its subnet (the subnet's
//! first address, added to the bridge on first use), and the router forwards between subnets.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Deref,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;

use crate::Netns;

const BRIDGE: &str = "br0";

/// A router namespace with a bridge, and hosts attached to it. Dropping the lab deletes the
/// router; hosts are deleted when their [`Host`] drops (in any order).
pub struct Lab {
    router: Netns,
    next_port: AtomicU32,
    /// Subnets whose gateway address is already on the bridge.
    subnets: Mutex<Vec<IpNet>>,
}

/// A namespace attached to a [`Lab`]. Derefs to its [`Netns`].
pub struct Host {
    ns: Netns,
    ip: IpAddr,
    net: IpNet,
}

impl Host {
    /// The address given to [`Lab::add_host`].
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Its subnet.
    pub fn net(&self) -> IpNet {
        self.net
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }
}

impl Deref for Host {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl Lab {
    /// Creates the router namespace with its bridge, forwarding enabled (in that namespace only).
    pub fn new() -> Result<Self> {
        let router = Netns::new("router")?;
        router.ip_cmd(&["link", "add", BRIDGE, "type", "bridge"])?;
        router.ip_cmd(&["link", "set", BRIDGE, "up"])?;
        router.exec_ok(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ])?;
        Ok(Self {
            router,
            next_port: AtomicU32::new(0),
            subnets: Mutex::new(Vec::new()),
        })
    }

    pub fn router(&self) -> &Netns {
        &self.router
    }

    /// The router's address in `net`: the subnet's first address (`10.244.0.1` for
    /// `10.244.0.0/16`). Hosts must not use it.
    pub fn gateway(net: IpNet) -> IpAddr {
        match net.network() {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(1))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(1))),
        }
    }

    /// Creates a namespace attached to the bridge with `addr` (`"10.244.0.10/16"`) on its `eth0`
    /// and a default route via the router.
    pub fn add_host(&self, label: &str, addr: &str) -> Result<Host> {
        let net: IpNet = addr
            .parse()
            .with_context(|| format!("{addr:?} is not address/prefix"))?;
        let ns = Netns::new(label)?;
        let port = format!("vh{}", self.next_port.fetch_add(1, Ordering::Relaxed));
        // Both ends are created in lab namespaces: the root namespace never sees the link.
        self.router.ip_cmd(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.router
            .ip_cmd(&["link", "set", &port, "master", BRIDGE, "up"])?;
        ns.ip_cmd(&["link", "set", "eth0", "up"])?;
        let host = Host {
            ns,
            ip: net.addr(),
            net: net.trunc(),
        };
        self.add_address(&host, addr)?;
        Ok(host)
    }

    /// Adds another address (typically of the other IP family) to `host`'s `eth0`, with a default
    /// route for that family if it has none yet.
    pub fn add_address(&self, host: &Host, addr: &str) -> Result<IpAddr> {
        let net: IpNet = addr
            .parse()
            .with_context(|| format!("{addr:?} is not address/prefix"))?;
        let gateway = Self::gateway(net);
        if net.addr() == gateway {
            bail!("{addr}: {gateway} is the router's address in this subnet");
        }
        self.ensure_gateway(net)?;
        let shown = net.to_string();
        let mut args = vec!["addr", "add", shown.as_str(), "dev", "eth0"];
        if net.addr().is_ipv6() {
            // Duplicate address detection would hold the address back for a second or two.
            args.push("nodad");
        }
        host.ip_cmd(&args)?;
        let family = if net.addr().is_ipv6() { "-6" } else { "-4" };
        let has_default = !host
            .ip_cmd(&[family, "route", "show", "default"])?
            .trim()
            .is_empty();
        if !has_default {
            host.ip_cmd(&[
                family,
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
            ])?;
        }
        Ok(net.addr())
    }

    fn ensure_gateway(&self, net: IpNet) -> Result<()> {
        let subnet = net.trunc();
        let mut subnets = self
            .subnets
            .lock()
            .map_err(|_| anyhow::anyhow!("lab subnet list poisoned"))?;
        if subnets.contains(&subnet) {
            return Ok(());
        }
        let gateway = format!("{}/{}", Self::gateway(net), net.prefix_len());
        let mut args = vec!["addr", "add", gateway.as_str(), "dev", BRIDGE];
        if net.addr().is_ipv6() {
            args.push("nodad");
        }
        self.router.ip_cmd(&args)?;
        subnets.push(subnet);
        Ok(())
    }
}
