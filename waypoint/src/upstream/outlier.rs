//! Outlier detection (DestinationRule `outlierDetection`), Envoy's consecutive-error rules:
//!
//! * `consecutive5xxErrors` (default 5; 0 disables) counts 5xx responses in a row; connect
//!   failures, resets and timeouts count as 5xx too unless `splitExternalLocalOriginErrors`,
//!   which counts them separately against `consecutiveLocalOriginFailures` (default 5).
//! * `consecutiveGatewayErrors` (off by default) counts 502/503/504 and local-origin failures.
//! * Reaching a threshold ejects the host for `baseEjectionTime` × the number of times it was
//!   ejected (capped at Envoy's 300 s `max_ejection_time`), unless more than
//!   `maxEjectionPercent` of the hosts would then be ejected; as Envoy does, one host can always
//!   be ejected.
//! * While fewer than `minHealthPercent` of the hosts are available, ejections are ignored
//!   (Envoy's panic threshold; Istio's default 0 turns panic mode off).
//!
//! Ejections end lazily, when a pick finds the time passed (Envoy un-ejects on its next
//! `interval` sweep, so its ejections last up to one interval longer). A host that went
//! `interval` without being ejected again has its multiplier reset.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_config::policy::OutlierDetection;

/// Envoy's default cap on an ejection.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Istio's default for `consecutive5xxErrors` (and Envoy's for local-origin failures).
const DEFAULT_CONSECUTIVE: u32 = 5;

/// What one try told about a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A response with this status.
    Status(u16),
    /// Connect failure, reset or timeout: the error originated here, not in a response.
    LocalOriginFailure,
    /// Connected (a response will follow and be observed separately).
    LocalOriginSuccess,
}

#[derive(Debug, Clone, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    ejected_until: Option<Instant>,
    /// When the last ejection ended (for the multiplier's reset).
    released_at: Option<Instant>,
    times_ejected: u32,
}

impl Host {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }
}

/// The outlier state of one cluster's hosts.
#[derive(Debug, Default)]
pub struct Detector {
    hosts: HashMap<SocketAddr, Host>,
}

impl Detector {
    /// Records `obs` for `addr`; returns whether that ejected the host. `total_hosts` is the
    /// size of the cluster (at least the hosts seen so far are counted).
    pub fn record(
        &mut self,
        cfg: &OutlierDetection,
        addr: SocketAddr,
        obs: Observation,
        total_hosts: usize,
        now: Instant,
    ) -> bool {
        let host = self.hosts.entry(addr).or_default();
        if let Some(until) = host.ejected_until.filter(|t| now >= *t) {
            host.ejected_until = None;
            host.released_at = Some(until);
        }
        if host
            .released_at
            .is_some_and(|r| now.duration_since(r) >= cfg.interval)
        {
            host.times_ejected = 0;
            host.released_at = None;
        }
        let split = cfg.split_external_local_origin_errors;
        let (counts_5xx, counts_gateway, counts_local) = match obs {
            Observation::Status(code) => {
                let is_5xx = (500..600).contains(&code);
                let gateway = matches!(code, 502..=504);
                (Some(is_5xx), Some(gateway), None)
            }
            Observation::LocalOriginFailure if split => (None, None, Some(true)),
            // Not split: a local failure reads as a 503 to both 5xx rules.
            Observation::LocalOriginFailure => (Some(true), Some(true), None),
            Observation::LocalOriginSuccess if split => (None, None, Some(false)),
            Observation::LocalOriginSuccess => (None, None, None),
        };
        let bump = |counter: &mut u32, hit: Option<bool>| match hit {
            Some(true) => *counter = counter.saturating_add(1),
            Some(false) => *counter = 0,
            None => {}
        };
        bump(&mut host.consecutive_5xx, counts_5xx);
        bump(&mut host.consecutive_gateway, counts_gateway);
        bump(&mut host.consecutive_local, counts_local);
        if host.is_ejected(now) {
            return false;
        }
        let reached =
            |count: u32, threshold: Option<u32>| threshold.is_some_and(|t| t > 0 && count >= t);
        let tripped = reached(
            host.consecutive_5xx,
            Some(cfg.consecutive_5xx_errors.unwrap_or(DEFAULT_CONSECUTIVE)),
        ) || reached(host.consecutive_gateway, cfg.consecutive_gateway_errors)
            || (split
                && reached(
                    host.consecutive_local,
                    Some(
                        cfg.consecutive_local_origin_failures
                            .unwrap_or(DEFAULT_CONSECUTIVE),
                    ),
                ));
        if !tripped {
            return false;
        }
        let total = total_hosts.max(self.hosts.len()).max(1);
        let ejected = self.hosts.values().filter(|h| h.is_ejected(now)).count();
        let percent_after = (ejected + 1) * 100 / total;
        if ejected > 0 && percent_after > cfg.max_ejection_percent as usize {
            return false;
        }
        let Some(host) = self.hosts.get_mut(&addr) else {
            return false;
        };
        host.times_ejected = host.times_ejected.saturating_add(1);
        let time = cfg
            .base_ejection_time
            .saturating_mul(host.times_ejected)
            .min(MAX_EJECTION_TIME.max(cfg.base_ejection_time));
        host.ejected_until = Some(now + time);
        host.released_at = None;
        host.consecutive_5xx = 0;
        host.consecutive_gateway = 0;
        host.consecutive_local = 0;
        true
    }

    /// Whether a pick must skip `addr`: it is ejected and the cluster is not in panic (fewer
    /// than `minHealthPercent` of its hosts available).
    pub fn skips(
        &self,
        cfg: &OutlierDetection,
        addr: SocketAddr,
        total_hosts: usize,
        now: Instant,
    ) -> bool {
        if !self.hosts.get(&addr).is_some_and(|h| h.is_ejected(now)) {
            return false;
        }
        let total = total_hosts.max(self.hosts.len()).max(1);
        let ejected = self.hosts.values().filter(|h| h.is_ejected(now)).count();
        let healthy_percent = (total - ejected.min(total)) * 100 / total;
        healthy_percent >= cfg.min_health_percent as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(c5xx: Option<u32>, gateway: Option<u32>, max_pct: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx_errors: c5xx,
            consecutive_gateway_errors: gateway,
            consecutive_local_origin_failures: None,
            split_external_local_origin_errors: false,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: max_pct,
            min_health_percent: 0,
        }
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, i], 80))
    }

    /// Feeds `observations` to host 1 of a `hosts`-host cluster; returns after which
    /// observation (1-based) it was ejected.
    fn ejected_after(
        c: &OutlierDetection,
        hosts: usize,
        observations: &[Observation],
    ) -> Option<usize> {
        let mut d = Detector::default();
        let now = Instant::now();
        observations
            .iter()
            .position(|o| d.record(c, addr(1), *o, hosts, now))
            .map(|i| i + 1)
    }

    #[test]
    fn consecutive_error_rules() {
        use Observation::*;
        let s = Status;
        let cases: Vec<(&str, OutlierDetection, Vec<Observation>, Option<usize>)> = vec![
            (
                "5xx default threshold is 5",
                cfg(None, None, 100),
                vec![s(500); 5],
                Some(5),
            ),
            (
                "5xx custom threshold",
                cfg(Some(2), None, 100),
                vec![s(503), s(500)],
                Some(2),
            ),
            (
                "a success resets the count",
                cfg(Some(2), None, 100),
                vec![s(503), s(200), s(503), s(200)],
                None,
            ),
            (
                "0 disables the 5xx rule",
                cfg(Some(0), None, 100),
                vec![s(500); 10],
                None,
            ),
            (
                "4xx is not an error",
                cfg(Some(1), None, 100),
                vec![s(404), s(429)],
                None,
            ),
            (
                "gateway errors: 502-504 only",
                cfg(Some(0), Some(2), 100),
                vec![s(500), s(502), s(500), s(504), s(503)],
                Some(5),
            ),
            (
                "local failures count as 5xx when not split",
                cfg(Some(3), None, 100),
                vec![LocalOriginFailure, s(503), LocalOriginFailure],
                Some(3),
            ),
        ];
        for (name, c, obs, want) in cases {
            assert_eq!(ejected_after(&c, 2, &obs), want, "{name}");
        }
    }

    #[test]
    fn split_local_origin_failures() {
        let mut c = cfg(Some(5), None, 100);
        c.split_external_local_origin_errors = true;
        c.consecutive_local_origin_failures = Some(2);
        let fail = Observation::LocalOriginFailure;
        assert_eq!(ejected_after(&c, 2, &[fail, fail]), Some(2));
        // A successful connect in between resets only the local-origin count.
        assert_eq!(
            ejected_after(&c, 2, &[fail, Observation::LocalOriginSuccess, fail]),
            None
        );
    }

    #[test]
    fn ejection_time_grows_and_ends() {
        let c = cfg(Some(1), None, 100);
        let mut d = Detector::default();
        let t0 = Instant::now();
        assert!(d.record(&c, addr(1), Observation::Status(500), 2, t0));
        assert!(d.skips(&c, addr(1), 2, t0 + Duration::from_secs(29)));
        assert!(!d.skips(&c, addr(1), 2, t0 + Duration::from_secs(30)));
        assert!(!d.skips(&c, addr(2), 2, t0), "other hosts are not affected");
        // Ejected again right after release: twice the base time.
        let t1 = t0 + Duration::from_secs(31);
        assert!(d.record(&c, addr(1), Observation::Status(500), 2, t1));
        assert!(d.skips(&c, addr(1), 2, t1 + Duration::from_secs(59)));
        assert!(!d.skips(&c, addr(1), 2, t1 + Duration::from_secs(60)));
        // A full interval later without trouble, the multiplier starts over.
        let t2 = t1 + Duration::from_secs(60 + 10);
        assert!(!d.record(&c, addr(1), Observation::Status(200), 2, t2));
        assert!(d.record(&c, addr(1), Observation::Status(500), 2, t2));
        assert!(!d.skips(&c, addr(1), 2, t2 + Duration::from_secs(30)));
    }

    #[test]
    fn max_ejection_percent_and_panic() {
        let now = Instant::now();
        let bad = Observation::Status(503);
        // 10 % of 4 hosts is less than one, but one host can always be ejected...
        let c = cfg(Some(1), None, 10);
        let mut d = Detector::default();
        assert!(d.record(&c, addr(1), bad, 4, now));
        // ...and no more.
        assert!(!d.record(&c, addr(2), bad, 4, now));
        // 50 % of 4: two hosts.
        let c = cfg(Some(1), None, 50);
        let mut d = Detector::default();
        assert!(d.record(&c, addr(1), bad, 4, now));
        assert!(d.record(&c, addr(2), bad, 4, now));
        assert!(!d.record(&c, addr(3), bad, 4, now));
        assert!(d.skips(&c, addr(1), 4, now));
        // minHealthPercent 60 with only 50 % available: panic, ejections are ignored.
        let mut panic = c.clone();
        panic.min_health_percent = 60;
        assert!(!d.skips(&panic, addr(1), 4, now));
    }
}
