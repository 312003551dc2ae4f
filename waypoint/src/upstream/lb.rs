//! DestinationRule `loadBalancer`: which of a cluster's endpoints a request goes to.
//!
//! Pure: the caller supplies the round-robin counter, the random draws, the request's hash and
//! each endpoint's requests in flight, so the choice is a function of its inputs.
//!
//! * no policy, `ROUND_ROBIN`, `PASSTHROUGH`: round-robin (no DestinationRule keeps the
//!   waypoint's round-robin, which the DNS answers also get);
//! * `RANDOM`: uniform;
//! * `LEAST_REQUEST` (also `simple` unset in a `loadBalancer` block, as Istio reads it): the
//!   less busy of two random endpoints (Envoy's power of two choices);
//! * `consistentHash`: the request's key (header, cookie, query parameter or source IP) hashed
//!   with a fixed seed, so every waypoint replica maps a key to the same endpoint, then
//!   jump consistent hashing, so adding an endpoint moves only the keys it takes; a request
//!   without the key goes to a random endpoint (as Envoy's ring hash does).
use std::hash::BuildHasher;
use std::net::IpAddr;

use http::HeaderMap;
use mesh_config::policy::{HashKey, LoadBalancer};

/// Index of the endpoint (of `len` > 0) for one request.
///
/// `rr` yields the next round-robin position, `random` a uniform draw below its argument,
/// `hash` is [`request_hash`] of the request, `active(i)` the requests in flight on endpoint `i`.
pub fn choose(
    lb: Option<&LoadBalancer>,
    len: usize,
    rr: impl FnOnce() -> usize,
    mut random: impl FnMut(usize) -> usize,
    hash: Option<u64>,
    active: impl Fn(usize) -> usize,
) -> usize {
    if len <= 1 {
        return 0;
    }
    match lb {
        None | Some(LoadBalancer::RoundRobin) | Some(LoadBalancer::Passthrough) => rr() % len,
        Some(LoadBalancer::Random) => random(len),
        Some(LoadBalancer::LeastRequest) => {
            let a = random(len);
            // A second, different endpoint.
            let b = (a + 1 + random(len - 1)) % len;
            if active(b) < active(a) { b } else { a }
        }
        Some(LoadBalancer::ConsistentHash(_)) => match hash {
            Some(h) => jump_hash(h, len),
            None => random(len),
        },
    }
}

/// Jump consistent hash (Lamping and Veach, 2014): `key` → bucket below `buckets`, moving only
/// ~1/n of the keys when bucket n is added.
fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    let buckets = i64::try_from(buckets).unwrap_or(i64::MAX);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    usize::try_from(b).unwrap_or(0)
}

/// Fixed, so that every replica (and every restart) maps a key to the same endpoint.
const HASH_SEED: u64 = 0x7374_7261_6974; // "strait"

/// The consistent-hash key of a request, hashed with a fixed seed; `None` when the request
/// does not carry it (or the policy is not `consistentHash`).
pub fn request_hash(
    lb: Option<&LoadBalancer>,
    headers: &HeaderMap,
    query: Option<&str>,
    source_ip: Option<IpAddr>,
) -> Option<u64> {
    let Some(LoadBalancer::ConsistentHash(key)) = lb else {
        return None;
    };
    let hasher = foldhash::fast::FixedState::with_seed(HASH_SEED);
    match key {
        HashKey::Header(name) => {
            let v = headers.get(name.as_str())?;
            Some(hasher.hash_one(v.as_bytes()))
        }
        HashKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| hasher.hash_one(v.as_bytes()))
            }),
        HashKey::QueryParameter(name) => query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| hasher.hash_one(v.as_bytes()))
        }),
        HashKey::SourceIp => source_ip.map(|ip| hasher.hash_one(ip)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// A deterministic "random" source: the draws in order (each taken modulo the bound).
    fn draws(seq: &[usize]) -> impl FnMut(usize) -> usize + '_ {
        let mut it = seq.iter().cycle();
        move |n| it.next().copied().unwrap_or(0) % n
    }

    #[test]
    fn choice_table() {
        let header = LoadBalancer::ConsistentHash(HashKey::Header("x-user".into()));
        let busy = |i: usize| [5, 0, 9, 1][i];
        // (policy, endpoints, round-robin position, draws, hash, expected index)
        type Case<'a> = (
            Option<&'a LoadBalancer>,
            usize,
            usize,
            Vec<usize>,
            Option<u64>,
            usize,
        );
        let cases: Vec<Case<'_>> = vec![
            (None, 4, 6, vec![], None, 2),
            (Some(&LoadBalancer::RoundRobin), 4, 7, vec![], None, 3),
            (Some(&LoadBalancer::Passthrough), 4, 1, vec![], None, 1),
            (Some(&LoadBalancer::Random), 4, 0, vec![3], None, 3),
            // Two choices: endpoints 0 (5 in flight) and 1 (0): the idle one.
            (Some(&LoadBalancer::LeastRequest), 4, 0, vec![0, 0], None, 1),
            // 2 (9 in flight) against 3 (1).
            (Some(&LoadBalancer::LeastRequest), 4, 0, vec![2, 0], None, 3),
            // 3 (1) against 0 (5): the first draw stays.
            (Some(&LoadBalancer::LeastRequest), 4, 0, vec![3, 0], None, 3),
            // No key: random.
            (Some(&header), 4, 0, vec![2], None, 2),
            // One endpoint: always it.
            (Some(&LoadBalancer::LeastRequest), 1, 5, vec![0, 0], None, 0),
        ];
        for (lb, len, rr, seq, hash, want) in cases {
            let got = choose(lb, len, || rr, draws(&seq), hash, busy);
            assert_eq!(got, want, "{lb:?} len={len} rr={rr} draws={seq:?}");
        }
    }

    #[test]
    fn least_request_never_draws_the_same_endpoint_twice() {
        // Whatever the draws, the two candidates differ, so an idle endpoint wins against any
        // busy one it is paired with.
        for a in 0..3 {
            for b in 0..2 {
                let active = |i: usize| usize::from(i != 1);
                let got = choose(
                    Some(&LoadBalancer::LeastRequest),
                    3,
                    || 0,
                    draws(&[a, b]),
                    None,
                    active,
                );
                let second = (a + 1 + b) % 3;
                assert_ne!(a, second);
                if a == 1 || second == 1 {
                    assert_eq!(got, 1, "draws {a} {b}");
                }
            }
        }
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_little() {
        let lb = LoadBalancer::ConsistentHash(HashKey::Header("x-user".into()));
        let pick = |user: &str, len: usize| {
            let mut h = HeaderMap::new();
            h.insert("x-user", HeaderValue::from_str(user).expect("value"));
            let hash = request_hash(Some(&lb), &h, None, None);
            assert!(hash.is_some());
            choose(Some(&lb), len, || 0, |_| 0, hash, |_| 0)
        };
        let users: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        // The same key, the same endpoint, every time.
        for u in &users[..20] {
            assert_eq!(pick(u, 5), pick(u, 5));
        }
        // Spread over the endpoints (each gets 200 ± 60 of 1,000 keys).
        let mut counts = [0usize; 5];
        for u in &users {
            counts[pick(u, 5)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (140..=260).contains(&c)),
            "{counts:?}"
        );
        // A sixth endpoint takes ~1/6 of the keys, and only keys move to it.
        let moved: Vec<&String> = users.iter().filter(|u| pick(u, 5) != pick(u, 6)).collect();
        assert!((100..=240).contains(&moved.len()), "{}", moved.len());
        assert!(moved.iter().all(|u| pick(u, 6) == 5));
    }

    #[test]
    fn hash_keys() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        h.append(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; session=s1"),
        );
        h.append(http::header::COOKIE, HeaderValue::from_static("theme=dark"));
        let ip: IpAddr = "10.244.1.10".parse().expect("ip");
        let lb = |k: HashKey| LoadBalancer::ConsistentHash(k);
        let hash = |l: &LoadBalancer, q: Option<&str>, src: Option<IpAddr>| {
            request_hash(Some(l), &h, q, src)
        };
        let header = lb(HashKey::Header("x-user".into()));
        let cookie = lb(HashKey::Cookie("session".into()));
        let query = lb(HashKey::QueryParameter("u".into()));
        let source = lb(HashKey::SourceIp);
        // Present keys hash; the same value hashes the same whatever carries it.
        assert_eq!(
            hash(&header, None, None),
            hash(&query, Some("x=1&u=alice"), None)
        );
        assert!(hash(&cookie, None, None).is_some());
        assert_eq!(hash(&cookie, None, None), hash(&query, Some("u=s1"), None));
        assert!(hash(&source, None, Some(ip)).is_some());
        // Absent keys do not.
        assert_eq!(
            hash(&lb(HashKey::Header("x-none".into())), None, None),
            None
        );
        assert_eq!(hash(&lb(HashKey::Cookie("none".into())), None, None), None);
        assert_eq!(hash(&query, Some("x=1"), None), None);
        assert_eq!(hash(&query, None, None), None);
        assert_eq!(hash(&source, None, None), None);
        // Other policies have no key.
        assert_eq!(
            request_hash(Some(&LoadBalancer::Random), &h, None, Some(ip)),
            None
        );
        assert_eq!(request_hash(None, &h, None, Some(ip)), None);
    }
}
