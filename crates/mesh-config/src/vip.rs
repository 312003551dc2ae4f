//! Virtual IPs for ServiceEntry hosts without addresses.
//!
//! Each non-wildcard host gets one IPv4 address from 240.240.0.0/16 and the matching IPv6
//! address in 2001:2::/48 (`2001:2::f0f0:<low 16 bits>`, so the pair is easy to correlate).
//! The address is derived from the host name alone (FNV-1a 64, a fixed, documented function,
//! so every process and every release computes the same value), which keeps VIPs stable across
//! reloads and identical in ztunnel and the waypoint. Collisions are resolved
//! deterministically: first every host whose home slot is free takes it (hosts in sorted
//! order), then the remaining hosts, in sorted order, probe upwards (wrapping) for a free slot.
//! Adding an unrelated host therefore moves an existing VIP only when the two collide.
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// 240.240.0.0/16.
pub const V4_PREFIX: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 0);
/// 2001:2::/48.
pub const V6_PREFIX: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 0);
/// Usable offsets: 1..=65534 (skip the all-zeros and all-ones addresses).
const SLOTS: u32 = 65534;

/// FNV-1a, 64 bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The address pair for slot offset `off` (1..=65534).
pub fn addrs(off: u32) -> (Ipv4Addr, Ipv6Addr) {
    let hi = (off >> 8) as u8;
    let lo = (off & 0xff) as u8;
    let v4 = Ipv4Addr::new(240, 240, hi, lo);
    let v6 = Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0xf0f0, off as u16);
    (v4, v6)
}

/// The slot offset of an address in our ranges, if it is one.
pub fn offset_of(ip: IpAddr) -> Option<u32> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (o[0] == 240 && o[1] == 240).then(|| u32::from(o[2]) << 8 | u32::from(o[3]))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (s[0] == 0x2001 && s[1] == 0x2 && s[2] == 0 && s[6] == 0xf0f0 && s[3..6] == [0, 0, 0])
                .then(|| u32::from(s[7]))
        }
    }
}

fn home(host: &str) -> u32 {
    1 + (fnv1a64(host.as_bytes()) % u64::from(SLOTS)) as u32
}

/// Allocates VIPs for `hosts` (lowercase; duplicates ignored). `reserved` are addresses already
/// used by explicit ServiceEntry addresses. Hosts beyond the pool's capacity get none (logged).
pub fn allocate<'a>(
    hosts: impl IntoIterator<Item = &'a str>,
    reserved: &HashSet<IpAddr>,
) -> BTreeMap<String, (Ipv4Addr, Ipv6Addr)> {
    let sorted: std::collections::BTreeSet<&str> = hosts.into_iter().collect();
    let mut taken: HashSet<u32> = reserved.iter().filter_map(|ip| offset_of(*ip)).collect();
    let mut out = BTreeMap::new();
    let mut pending = Vec::new();
    for h in &sorted {
        let slot = home(h);
        if taken.insert(slot) {
            out.insert((*h).to_owned(), addrs(slot));
        } else {
            pending.push(*h);
        }
    }
    for h in pending {
        let start = home(h);
        let mut found = None;
        for i in 1..SLOTS {
            let slot = (start - 1 + i) % SLOTS + 1;
            if taken.insert(slot) {
                found = Some(slot);
                break;
            }
        }
        match found {
            Some(slot) => {
                out.insert(h.to_owned(), addrs(slot));
            }
            None => tracing::error!(
                host = h,
                "VIP pool 240.240.0.0/16 exhausted; host gets no VIP"
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 64 test vectors: the function must never change.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn pair_and_offsets() {
        let (v4, v6) = addrs(0x0107);
        assert_eq!(v4, Ipv4Addr::new(240, 240, 1, 7));
        assert_eq!(v6, "2001:2::f0f0:107".parse::<Ipv6Addr>().unwrap());
        assert_eq!(offset_of(v4.into()), Some(0x0107));
        assert_eq!(offset_of(v6.into()), Some(0x0107));
        assert_eq!(offset_of("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn stable_and_deterministic() {
        let hosts = ["aliyun.com", "www.aliyun.com", "httpbin.org", "taobao.com"];
        let a = allocate(hosts, &HashSet::new());
        let b = allocate(hosts.iter().rev().copied(), &HashSet::new());
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
        // Adding an unrelated host does not move the others (no collision here).
        let mut more = hosts.to_vec();
        more.push("example.org");
        let c = allocate(more, &HashSet::new());
        for h in hosts {
            assert_eq!(a[h], c[h], "{h}");
        }
    }

    #[test]
    fn collisions_resolved_by_probing() {
        // Reserve the home slot of one host: it must move to the next free slot.
        let home_slot = home("aliyun.com");
        let reserved: HashSet<IpAddr> = [IpAddr::V4(addrs(home_slot).0)].into();
        let a = allocate(["aliyun.com"], &reserved);
        assert_eq!(a["aliyun.com"].0, addrs(home_slot % SLOTS + 1).0);
        // Many hosts: all distinct.
        let names: Vec<String> = (0..5000).map(|i| format!("h{i}.example.com")).collect();
        let m = allocate(names.iter().map(String::as_str), &HashSet::new());
        let distinct: HashSet<_> = m.values().map(|p| p.0).collect();
        assert_eq!(distinct.len(), 5000);
    }
}
