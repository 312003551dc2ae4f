//! Errors. Whenever a file is involved the error names it, so an operator can tell which of
//! several mounted PEM files is wrong.

use std::fmt;

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string is not a `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` ID.
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId { input: String, reason: &'static str },

    /// Something is wrong with a file (or a named in-memory PEM source).
    #[error("{file}: {problem}")]
    File { file: String, problem: Problem },

    /// Something is wrong with an in-memory certificate (e.g. one a peer presented).
    #[error("certificate: {0}")]
    Certificate(Problem),

    /// An identity outside the trust domain this CA or manager serves.
    #[error("identity {id} is not in trust domain {expected:?}")]
    ForeignTrustDomain { id: String, expected: String },

    /// A server presented a valid chain but none of the identities the client expects.
    #[error("server identities {found:?} are not among the expected {expected:?}")]
    UnexpectedServer {
        found: Vec<String>,
        expected: Vec<String>,
    },

    /// The trust bundle holds no root for the trust domain a peer must be verified in.
    #[error("the trust bundle has no root for trust domain {trust_domain:?}")]
    NoTrustAnchor { trust_domain: String },

    /// A client config needs at least one acceptable server identity.
    #[error("no expected server identity given: every server would be refused")]
    NoExpectedServer,

    /// Key generation or signing failed.
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),

    /// rustls refused a configuration (e.g. a key it cannot use).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// What is wrong with a certificate, key or bundle.
#[derive(Debug)]
pub enum Problem {
    /// The file could not be read or written.
    Io(std::io::Error),
    /// No PEM block of the expected kind (`"CERTIFICATE"`, `"PRIVATE KEY"`).
    Missing(&'static str),
    /// The PEM framing itself is broken.
    Pem(String),
    /// The DER inside does not parse as a certificate.
    Malformed(String),
    /// The private key cannot be used.
    Key(String),
    /// The private key does not belong to the certificate.
    KeyMismatch,
    /// `not_after` lies in the past.
    Expired(String),
    /// `not_before` lies in the future.
    NotYetValid(String),
    /// No URI SAN, or the first URI SAN is not a workload SPIFFE ID.
    NoSpiffeId(String),
    /// The certificate is not a CA (basicConstraints CA:TRUE missing).
    NotCa,
    /// No trust domain can be read from a root (no `spiffe://<td>` URI SAN, no O=).
    NoTrustDomain,
    /// The certificate belongs to another trust domain.
    ForeignTrustDomain { found: String, expected: String },
    /// The chain does not verify against the trust bundle.
    Untrusted(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Io(e) => write!(f, "{e}"),
            Problem::Missing(kind) => write!(f, "no PEM {kind} block found"),
            Problem::Pem(e) => write!(f, "malformed PEM: {e}"),
            Problem::Malformed(e) => write!(f, "malformed certificate: {e}"),
            Problem::Key(e) => write!(f, "unusable private key: {e}"),
            Problem::KeyMismatch => f.write_str("private key does not match the certificate"),
            Problem::Expired(t) => write!(f, "certificate expired at {t}"),
            Problem::NotYetValid(t) => write!(f, "certificate not valid before {t}"),
            Problem::NoSpiffeId(why) => write!(f, "no SPIFFE identity: {why}"),
            Problem::NotCa => {
                f.write_str("not a CA certificate (basicConstraints CA:TRUE missing)")
            }
            Problem::NoTrustDomain => f.write_str(
                "no trust domain in root certificate (neither a spiffe://<td> URI SAN nor O=)",
            ),
            Problem::ForeignTrustDomain { found, expected } => {
                write!(f, "trust domain {found:?} is not {expected:?}")
            }
            Problem::Untrusted(e) => {
                write!(f, "chain does not verify against the trust bundle: {e}")
            }
        }
    }
}

impl std::error::Error for Problem {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Problem::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl Problem {
    /// Attach the file (or source name) the problem was found in.
    pub(crate) fn in_file(self, file: impl fmt::Display) -> Error {
        Error::File {
            file: file.to_string(),
            problem: self,
        }
    }
}
