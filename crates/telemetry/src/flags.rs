//! Envoy's response flags (`%RESPONSE_FLAGS%`), so our logs and metrics read like Istio's.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

macro_rules! response_flags {
    ($($(#[$doc:meta])* $variant:ident => $short:literal,)*) => {
        /// One of Envoy's response flags. Declared in Envoy's order, which is also the order in
        /// which a [`ResponseFlags`] set prints them.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum ResponseFlag {
            $($(#[$doc])* $variant,)*
        }

        impl ResponseFlag {
            /// Every flag, in Envoy's order.
            pub const ALL: &'static [ResponseFlag] = &[$(ResponseFlag::$variant,)*];

            /// Envoy's short code, e.g. `UF`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ResponseFlag::$variant => $short,)*
                }
            }
        }
    };
}

response_flags! {
    /// LH: the local health check failed.
    FailedLocalHealthCheck => "LH",
    /// UH: no healthy upstream host.
    NoHealthyUpstream => "UH",
    /// UT: upstream request timeout.
    UpstreamRequestTimeout => "UT",
    /// LR: connection reset locally.
    LocalReset => "LR",
    /// UR: upstream reset the connection.
    UpstreamRemoteReset => "UR",
    /// UF: upstream connection failure.
    UpstreamConnectionFailure => "UF",
    /// UC: upstream connection terminated.
    UpstreamConnectionTermination => "UC",
    /// UO: upstream overflow (circuit breaking).
    UpstreamOverflow => "UO",
    /// NR: no route configured (or no matching filter chain).
    NoRouteFound => "NR",
    /// DI: the request was delayed by fault injection.
    DelayInjected => "DI",
    /// FI: the request was aborted by fault injection.
    FaultInjected => "FI",
    /// RL: rate limited locally.
    RateLimited => "RL",
    /// UAEX: denied by the external authorization service.
    UnauthorizedExternalService => "UAEX",
    /// RLSE: rate limit service error.
    RateLimitServiceError => "RLSE",
    /// DC: downstream connection terminated.
    DownstreamConnectionTermination => "DC",
    /// URX: upstream retry limit or max connect attempts reached.
    UpstreamRetryLimitExceeded => "URX",
    /// SI: stream idle timeout.
    StreamIdleTimeout => "SI",
    /// IH: invalid values in `x-envoy-*` request headers.
    InvalidEnvoyRequestHeaders => "IH",
    /// DPE: downstream protocol error.
    DownstreamProtocolError => "DPE",
    /// UMSDR: upstream max stream duration reached.
    UpstreamMaxStreamDurationReached => "UMSDR",
    /// RFCF: response served from cache.
    ResponseFromCacheFilter => "RFCF",
    /// NFCF: no filter config found.
    NoFilterConfigFound => "NFCF",
    /// DT: max connection or request duration exceeded.
    DurationTimeout => "DT",
    /// UPE: upstream protocol error.
    UpstreamProtocolError => "UPE",
    /// NC: no upstream cluster found.
    NoClusterFound => "NC",
    /// OM: the overload manager terminated the request.
    OverloadManager => "OM",
    /// DF: DNS resolution of the upstream failed.
    DnsResolutionFailed => "DF",
    /// DO: dropped by overload (drop_overloads).
    DropOverload => "DO",
    /// DR: downstream reset the stream.
    DownstreamRemoteReset => "DR",
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown response flag code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown response flag {0:?}")]
pub struct UnknownResponseFlag(pub String);

impl FromStr for ResponseFlag {
    type Err = UnknownResponseFlag;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResponseFlag::ALL
            .iter()
            .copied()
            .find(|flag| flag.as_str() == s)
            .ok_or_else(|| UnknownResponseFlag(s.to_owned()))
    }
}

/// A set of response flags, printed as Envoy prints `%RESPONSE_FLAGS%`: `-` when empty, else the
/// codes in Envoy's order joined by commas (`UF,URX`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

impl ResponseFlags {
    /// No flag.
    pub const NONE: ResponseFlags = ResponseFlags(0);

    /// The empty set.
    pub const fn empty() -> Self {
        Self::NONE
    }

    /// A set holding `flag`.
    pub const fn single(flag: ResponseFlag) -> Self {
        Self(1 << flag as u8)
    }

    /// Adds `flag`.
    pub fn insert(&mut self, flag: ResponseFlag) {
        self.0 |= 1 << flag as u8;
    }

    /// `self` plus `flag`.
    #[must_use]
    pub const fn with(self, flag: ResponseFlag) -> Self {
        Self(self.0 | 1 << flag as u8)
    }

    /// Whether `flag` is set.
    pub const fn contains(self, flag: ResponseFlag) -> bool {
        self.0 & (1 << flag as u8) != 0
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The flags set, in Envoy's order.
    pub fn iter(self) -> impl Iterator<Item = ResponseFlag> {
        ResponseFlag::ALL
            .iter()
            .copied()
            .filter(move |flag| self.contains(*flag))
    }

    /// The rendered form as a static string when that needs no allocation (empty or one flag).
    pub fn as_static_str(self) -> Option<&'static str> {
        if self.is_empty() {
            return Some("-");
        }
        let mut flags = self.iter();
        match (flags.next(), flags.next()) {
            (Some(only), None) => Some(only.as_str()),
            _ => None,
        }
    }
}

impl From<ResponseFlag> for ResponseFlags {
    fn from(flag: ResponseFlag) -> Self {
        Self::single(flag)
    }
}

impl FromIterator<ResponseFlag> for ResponseFlags {
    fn from_iter<I: IntoIterator<Item = ResponseFlag>>(iter: I) -> Self {
        let mut set = Self::empty();
        for flag in iter {
            set.insert(flag);
        }
        set
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        for (i, flag) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(flag.as_str())?;
        }
        Ok(())
    }
}

impl FromStr for ResponseFlags {
    type Err = UnknownResponseFlag;

    /// Parses Envoy's rendering (`-` or `UF,URX`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "-" || s.is_empty() {
            return Ok(Self::empty());
        }
        s.split(',').map(|code| code.trim().parse()).collect()
    }
}

impl Serialize for ResponseFlags {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.as_static_str() {
            Some(s) => serializer.serialize_str(s),
            None => serializer.collect_str(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_envoy() {
        let cases: &[(&[ResponseFlag], &str)] = &[
            (&[], "-"),
            (&[ResponseFlag::UpstreamConnectionFailure], "UF"),
            // Envoy's order, whatever the insertion order.
            (
                &[
                    ResponseFlag::UpstreamRetryLimitExceeded,
                    ResponseFlag::UpstreamConnectionFailure,
                ],
                "UF,URX",
            ),
            (
                &[
                    ResponseFlag::DownstreamConnectionTermination,
                    ResponseFlag::NoHealthyUpstream,
                    ResponseFlag::UnauthorizedExternalService,
                ],
                "UH,UAEX,DC",
            ),
            (&[ResponseFlag::DownstreamRemoteReset], "DR"),
        ];
        for (flags, expected) in cases {
            let set: ResponseFlags = flags.iter().copied().collect();
            assert_eq!(set.to_string(), *expected);
            assert_eq!(expected.parse::<ResponseFlags>(), Ok(set));
            assert_eq!(
                serde_json::to_string(&set).expect("serialize"),
                format!("\"{expected}\"")
            );
        }
    }

    #[test]
    fn every_flag_round_trips_and_fits() {
        assert!(ResponseFlag::ALL.len() <= 32);
        for (i, flag) in ResponseFlag::ALL.iter().enumerate() {
            assert_eq!(*flag as usize, i);
            assert_eq!(flag.as_str().parse::<ResponseFlag>(), Ok(*flag));
            assert!(ResponseFlags::single(*flag).contains(*flag));
        }
        let all: ResponseFlags = ResponseFlag::ALL.iter().copied().collect();
        assert_eq!(all.iter().count(), ResponseFlag::ALL.len());
        assert!("UF,XX".parse::<ResponseFlags>().is_err());
    }
}
