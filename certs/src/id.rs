//! Workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the form
//! Istio puts in the URI SAN of every workload certificate.

use std::fmt;
use std::str::FromStr;

use crate::Error;

const SCHEME: &str = "spiffe://";
/// The SPIFFE spec caps trust domains at 255 bytes and whole IDs at 2048.
const MAX_TRUST_DOMAIN: usize = 255;
const MAX_ID: usize = 2048;

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// Builds an ID without checking the parts; [`SpiffeId::validate`] (or [`SpiffeId::try_new`])
    /// checks them. The CA refuses to issue for an invalid ID.
    pub fn new(td: impl Into<String>, ns: impl Into<String>, sa: impl Into<String>) -> Self {
        SpiffeId {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    /// Builds and validates an ID.
    pub fn try_new(
        td: impl Into<String>,
        ns: impl Into<String>,
        sa: impl Into<String>,
    ) -> Result<Self, Error> {
        let id = Self::new(td, ns, sa);
        id.validate()?;
        Ok(id)
    }

    /// Checks every part against the SPIFFE character rules.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |reason| Error::InvalidSpiffeId {
            input: self.to_string(),
            reason,
        };
        check_trust_domain(&self.trust_domain).map_err(bad)?;
        check_segment(&self.namespace, Part::Namespace).map_err(bad)?;
        check_segment(&self.service_account, Part::ServiceAccount).map_err(bad)?;
        if self.to_string().len() > MAX_ID {
            return Err(bad("longer than 2048 bytes"));
        }
        Ok(())
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason| Error::InvalidSpiffeId {
            input: s.to_owned(),
            reason,
        };
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("does not start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad("path is not /ns/<namespace>/sa/<service-account>"));
        };
        let id = SpiffeId::new(td, ns, sa);
        // Same checks as `validate`, but report the input as given.
        id.validate().map_err(|e| match e {
            Error::InvalidSpiffeId { reason, .. } => bad(reason),
            other => other,
        })?;
        Ok(id)
    }
}

/// Trust domain: lowercase letters, digits, `.`, `-`, `_` (SPIFFE ID spec §2.1).
pub(crate) fn check_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("empty trust domain");
    }
    if td.len() > MAX_TRUST_DOMAIN {
        return Err("trust domain longer than 255 bytes");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("trust domain may only hold lowercase letters, digits, '.', '-', '_'");
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Part {
    Namespace,
    ServiceAccount,
}

/// Path segment: letters, digits, `.`, `-`, `_`; not empty, not `.` or `..` (spec §2.2).
fn check_segment(seg: &str, part: Part) -> Result<(), &'static str> {
    use Part::*;
    if seg.is_empty() {
        return Err(match part {
            Namespace => "empty namespace",
            ServiceAccount => "empty service account",
        });
    }
    if seg == "." || seg == ".." {
        return Err(match part {
            Namespace => "namespace is '.' or '..'",
            ServiceAccount => "service account is '.' or '..'",
        });
    }
    if !seg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(match part {
            Namespace => "namespace may only hold letters, digits, '.', '-', '_'",
            ServiceAccount => "service account may only hold letters, digits, '.', '-', '_'",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let good = [
            (
                "spiffe://cluster.local/ns/default/sa/sleep",
                ("cluster.local", "default", "sleep"),
            ),
            ("spiffe://td/ns/a-b/sa/c.d_e", ("td", "a-b", "c.d_e")),
            (
                "spiffe://my_mesh-1.example/ns/NS/sa/Sa9",
                ("my_mesh-1.example", "NS", "Sa9"),
            ),
        ];
        for (input, (td, ns, sa)) in good {
            let id: SpiffeId = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id, SpiffeId::new(td, ns, sa), "{input}");
            assert_eq!(id.to_string(), input, "round trip");
        }

        let bad = [
            ("", "does not start with spiffe://"),
            (
                "http://cluster.local/ns/a/sa/b",
                "does not start with spiffe://",
            ),
            (
                "SPIFFE://cluster.local/ns/a/sa/b",
                "does not start with spiffe://",
            ),
            ("spiffe://cluster.local", "no path"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                "trust domain may only hold",
            ),
            (
                "spiffe://cluster.local:443/ns/a/sa/b",
                "trust domain may only hold",
            ),
            (
                "spiffe://user@cluster.local/ns/a/sa/b",
                "trust domain may only hold",
            ),
            ("spiffe://cluster.local/", "path is not"),
            ("spiffe://cluster.local/ns/a", "path is not"),
            ("spiffe://cluster.local/ns/a/sa", "path is not"),
            ("spiffe://cluster.local/ns/a/sa/b/", "path is not"),
            ("spiffe://cluster.local/ns/a/sa/b/c", "path is not"),
            ("spiffe://cluster.local/sa/b/ns/a", "path is not"),
            ("spiffe://cluster.local/ns//sa/b", "empty namespace"),
            ("spiffe://cluster.local/ns/a/sa/", "empty service account"),
            (
                "spiffe://cluster.local/ns/../sa/b",
                "namespace is '.' or '..'",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/.",
                "service account is '.' or '..'",
            ),
            (
                "spiffe://cluster.local/ns/a b/sa/b",
                "namespace may only hold",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b?x=1",
                "service account may only hold",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b#frag",
                "service account may only hold",
            ),
            (
                "spiffe://cluster.local/ns/a%2F/sa/b",
                "namespace may only hold",
            ),
        ];
        for (input, want) in bad {
            let err = input
                .parse::<SpiffeId>()
                .expect_err(&format!("{input:?} should be refused"));
            let msg = err.to_string();
            assert!(msg.contains(want), "{input:?}: {msg:?} lacks {want:?}");
            assert!(
                msg.contains(&format!("{input:?}")),
                "{msg:?} names the input"
            );
        }
    }

    #[test]
    fn long_ids_are_refused() {
        let td = "a".repeat(256);
        assert!(SpiffeId::try_new(td, "ns", "sa").is_err());
        let sa = "a".repeat(2048);
        assert!(SpiffeId::try_new("td", "ns", sa).is_err());
        assert!(SpiffeId::try_new("td", "ns", "sa").is_ok());
    }
}
