//! Retry policy: which outcomes are retried (Envoy's `retryOn` semantics) and the back-off.

use std::borrow::Cow;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use mesh_config::route::RetryPolicy;

/// Envoy's default base back-off interval.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// Conditions from `retryOn`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub retriable_4xx: bool,
    pub retriable_status_codes: bool,
    /// gRPC statuses (from `grpc-status`): cancelled, deadline-exceeded, resource-exhausted,
    /// unavailable, internal.
    pub grpc: [bool; 5],
}

const GRPC_NAMES: [(&str, u8); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("unavailable", 14),
    ("internal", 13),
];

impl RetryOn {
    pub fn parse<'a>(conditions: impl IntoIterator<Item = &'a str>) -> RetryOn {
        let mut on = RetryOn::default();
        for c in conditions {
            match c.trim() {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" | "reset-before-request" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "retriable-status-codes" => on.retriable_status_codes = true,
                other => match GRPC_NAMES.iter().position(|(n, _)| *n == other) {
                    Some(i) => on.grpc[i] = true,
                    // Status codes in retryOn are handled by the config crate (retriable_status).
                    None if other.parse::<u16>().is_ok() => on.retriable_status_codes = true,
                    None => {
                        tracing::debug!(condition = other, "unsupported retryOn condition ignored")
                    }
                },
            }
        }
        on
    }
}

/// The effective retry behaviour of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPlan {
    /// Retries after the first try.
    pub retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// Borrowed for Istio's default (`[503]`): the plan is made per request.
    pub retriable_status: Cow<'static, [u16]>,
    pub backoff: Duration,
}

impl RetryPlan {
    /// The route's policy, or Istio's default when the route sets none: 2 retries on
    /// connect-failure, refused-stream, unavailable, cancelled and 503.
    pub fn from_route(policy: Option<&RetryPolicy>) -> RetryPlan {
        match policy {
            Some(p) => RetryPlan {
                retries: p.attempts,
                per_try_timeout: p.per_try_timeout,
                on: RetryOn::parse(p.retry_on.iter().map(String::as_str)),
                retriable_status: Cow::Owned(p.retriable_status.clone()),
                backoff: p.backoff.unwrap_or(DEFAULT_BACKOFF),
            },
            None => RetryPlan {
                retries: 2,
                per_try_timeout: None,
                on: RetryOn::parse([
                    "connect-failure",
                    "refused-stream",
                    "unavailable",
                    "cancelled",
                    "retriable-status-codes",
                ]),
                retriable_status: Cow::Borrowed(&[503]),
                backoff: DEFAULT_BACKOFF,
            },
        }
    }

    /// Whether `outcome` of a try should be retried (ignoring the budget).
    pub fn should_retry(&self, outcome: &Outcome<'_>) -> bool {
        let on = &self.on;
        match outcome {
            Outcome::Response(status, headers) => {
                let code = status.as_u16();
                (on.five_xx && status.is_server_error())
                    || (on.gateway_error && matches!(code, 502..=504))
                    || (on.retriable_4xx && code == 409)
                    || (on.retriable_status_codes && self.retriable_status.contains(&code))
                    || grpc_status(headers).is_some_and(|g| {
                        GRPC_NAMES
                            .iter()
                            .zip(on.grpc)
                            .any(|((_, c), enabled)| enabled && *c == g)
                    })
            }
            Outcome::ConnectFailure => {
                on.connect_failure || on.five_xx || on.gateway_error || on.reset
            }
            Outcome::Reset => on.reset || on.five_xx || on.gateway_error,
            Outcome::RefusedStream => {
                on.refused_stream || on.reset || on.five_xx || on.gateway_error
            }
            // A per-try timeout reads as a 504 to the retry logic.
            Outcome::Timeout => on.five_xx || on.gateway_error || on.reset,
            Outcome::Overflow => false,
        }
    }

    /// Back-off before retry number `n` (1-based): uniformly jittered in
    /// `[0, base * 2^(n-1)]`, capped at 10 × base (Envoy's rule). `unit` is a random in [0, 1).
    pub fn backoff(&self, n: u32, unit: f64) -> Duration {
        let cap = self.backoff * 10;
        let ceiling = self
            .backoff
            .checked_mul(1u32 << n.saturating_sub(1).min(16))
            .unwrap_or(cap)
            .min(cap);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// What one try produced, as the retry logic sees it.
#[derive(Debug)]
pub enum Outcome<'a> {
    Response(StatusCode, &'a HeaderMap),
    ConnectFailure,
    Reset,
    RefusedStream,
    Timeout,
    Overflow,
}

fn grpc_status(headers: &HeaderMap) -> Option<u8> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(retry_on: &[&str], statuses: &[u16]) -> RetryPlan {
        RetryPlan::from_route(Some(&RetryPolicy {
            attempts: 3,
            per_try_timeout: None,
            retry_on: retry_on.iter().map(|s| (*s).to_owned()).collect(),
            retriable_status: statuses.to_vec(),
            backoff: None,
        }))
    }

    #[test]
    fn retry_conditions() {
        let none = HeaderMap::new();
        let mut unavailable = HeaderMap::new();
        unavailable.insert("grpc-status", "14".parse().expect("value"));
        let s = |c: u16| StatusCode::from_u16(c).expect("status");
        let default = RetryPlan::from_route(None);
        let cases: Vec<(RetryPlan, Outcome<'_>, bool)> = vec![
            (plan(&["5xx"], &[]), Outcome::Response(s(500), &none), true),
            (plan(&["5xx"], &[]), Outcome::Response(s(404), &none), false),
            (plan(&["5xx"], &[]), Outcome::Reset, true),
            (plan(&["5xx"], &[]), Outcome::Timeout, true),
            (
                plan(&["gateway-error"], &[]),
                Outcome::Response(s(500), &none),
                false,
            ),
            (
                plan(&["gateway-error"], &[]),
                Outcome::Response(s(503), &none),
                true,
            ),
            (
                plan(&["connect-failure"], &[]),
                Outcome::ConnectFailure,
                true,
            ),
            (plan(&["connect-failure"], &[]), Outcome::Reset, false),
            (
                plan(&["connect-failure"], &[]),
                Outcome::Response(s(503), &none),
                false,
            ),
            (plan(&["reset"], &[]), Outcome::Reset, true),
            (
                plan(&["retriable-status-codes"], &[418]),
                Outcome::Response(s(418), &none),
                true,
            ),
            (
                plan(&["retriable-4xx"], &[]),
                Outcome::Response(s(409), &none),
                true,
            ),
            (
                plan(&["unavailable"], &[]),
                Outcome::Response(s(200), &unavailable),
                true,
            ),
            (plan(&["5xx"], &[]), Outcome::Overflow, false),
            // Istio's default: 503 and connect failures, not 500.
            (default.clone(), Outcome::Response(s(503), &none), true),
            (default.clone(), Outcome::Response(s(500), &none), false),
            (default.clone(), Outcome::ConnectFailure, true),
            (default, Outcome::RefusedStream, true),
        ];
        for (i, (p, outcome, want)) in cases.iter().enumerate() {
            assert_eq!(
                p.should_retry(outcome),
                *want,
                "case {i}: {:?} {outcome:?}",
                p.on
            );
        }
    }

    #[test]
    fn backoff_is_bounded() {
        let p = plan(&["5xx"], &[]);
        assert_eq!(p.backoff(1, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(25));
        assert_eq!(p.backoff(2, 1.0), Duration::from_millis(50));
        assert_eq!(p.backoff(20, 1.0), Duration::from_millis(250));
        assert_eq!(RetryPlan::from_route(None).retries, 2);
    }
}
