//! Workload certificates and reading identities out of X.509 certificates.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use crate::error::{Error, Problem};
use crate::{SpiffeId, TrustBundle, pemfile, tls};

/// File names Istio uses for a workload's credentials.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const KEY_FILE: &str = "key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// A workload certificate: leaf + chain + key.
///
/// Built by [`crate::CertificateAuthority::issue`] or [`WorkloadCert::load`]; the fields are
/// public for reading. The rustls [`CertifiedKey`] is prepared once at construction.
#[derive(Clone)]
pub struct WorkloadCert {
    pub id: SpiffeId,
    /// Leaf first, then intermediates (no root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("WorkloadCert")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Which of the two inputs a problem belongs to.
pub(crate) enum Part {
    Chain(Problem),
    Key(Problem),
}

impl WorkloadCert {
    /// Assembles a certificate from a chain and key, checking that the leaf carries a SPIFFE ID
    /// and that the key belongs to it. Validity is recorded, not enforced (see [`Self::load`]).
    pub(crate) fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, Part> {
        let leaf = chain
            .first()
            .ok_or(Part::Chain(Problem::Missing("CERTIFICATE")))?;
        let x509 = parse(leaf).map_err(Part::Chain)?;
        let id = spiffe_id(&x509).map_err(Part::Chain)?;
        let (not_before, not_after) = validity(&x509);
        let certified = CertifiedKey::from_der(chain.clone(), key.clone_key(), &tls::provider())
            .map_err(|e| {
                Part::Key(match e {
                    rustls::Error::InconsistentKeys(_) => Problem::KeyMismatch,
                    other => Problem::Key(other.to_string()),
                })
            })?;
        Ok(WorkloadCert {
            id,
            chain,
            key: Arc::new(key),
            not_before,
            not_after,
            certified: Arc::new(certified),
        })
    }

    /// Loads `cert-chain.pem` (leaf first) and `key.pem`. Refuses a garbled or expired
    /// certificate, one without a SPIFFE URI SAN, and a key that does not match; the error names
    /// the offending file.
    pub fn load(cert_chain_pem: &Path, key_pem: &Path) -> Result<Self, Error> {
        let chain =
            pemfile::certs_from_pem(&pemfile::read(cert_chain_pem)?, cert_chain_pem.display())?;
        let key = pemfile::key_from_pem(&pemfile::read(key_pem)?, key_pem.display())?;
        let cert = Self::from_parts(chain, key).map_err(|p| match p {
            Part::Chain(p) => p.in_file(cert_chain_pem.display()),
            Part::Key(p) => p.in_file(key_pem.display()),
        })?;
        cert.check_time(SystemTime::now())
            .map_err(|p| p.in_file(cert_chain_pem.display()))?;
        Ok(cert)
    }

    /// [`Self::load`], then [`Self::verify`] against `bundle`; errors name the chain file.
    pub fn load_verified(
        cert_chain_pem: &Path,
        key_pem: &Path,
        bundle: &TrustBundle,
    ) -> Result<Self, Error> {
        let cert = Self::load(cert_chain_pem, key_pem)?;
        cert.check_trust(bundle)
            .map_err(|p| p.in_file(cert_chain_pem.display()))?;
        Ok(cert)
    }

    /// Checks that the chain verifies against `bundle` now and that the identity is in the
    /// bundle's trust domain.
    pub fn verify(&self, bundle: &TrustBundle) -> Result<(), Error> {
        self.check_trust(bundle).map_err(Error::Certificate)
    }

    fn check_trust(&self, bundle: &TrustBundle) -> Result<(), Problem> {
        let (leaf, intermediates) = self
            .chain
            .split_first()
            .ok_or(Problem::Missing("CERTIFICATE"))?;
        let parsed =
            ParsedCertificate::try_from(leaf).map_err(|e| Problem::Malformed(e.to_string()))?;
        // Only roots vouching for the identity's own trust domain count (see `TrustBundle`).
        let td = &self.id.trust_domain;
        let roots = bundle.root_store_for(td).ok_or_else(|| {
            Problem::Untrusted(format!("no root for trust domain {td:?} in the bundle"))
        })?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            roots,
            intermediates,
            UnixTime::now(),
            tls::provider().signature_verification_algorithms.all,
        )
        .map_err(|e| Problem::Untrusted(e.to_string()))?;
        if *td != bundle.trust_domain() {
            return Err(Problem::ForeignTrustDomain {
                found: td.clone(),
                expected: bundle.trust_domain().to_owned(),
            });
        }
        Ok(())
    }

    fn check_time(&self, now: SystemTime) -> Result<(), Problem> {
        if now >= self.not_after {
            return Err(Problem::Expired(fmt_time(self.not_after)));
        }
        if now < self.not_before {
            return Err(Problem::NotYetValid(fmt_time(self.not_before)));
        }
        Ok(())
    }

    /// The leaf certificate (as issued or loaded).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `certified` is private and was built from a non-empty chain, unlike the public `chain`.
        &self.certified.cert[0]
    }

    /// The chain and signing key as rustls wants them.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// Writes `cert-chain.pem` and `key.pem` (0600) into `dir`, which must exist.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        pemfile::write(
            &dir.join(CERT_CHAIN_FILE),
            pemfile::encode_certs(&self.chain).as_bytes(),
            pemfile::CERT_MODE,
        )?;
        pemfile::write(
            &dir.join(KEY_FILE),
            pemfile::encode_key(&self.key).as_bytes(),
            pemfile::KEY_MODE,
        )
    }
}

/// The SPIFFE identity of a peer: the first URI SAN of the leaf (`certs[0]`), as rustls'
/// `CommonState::peer_certificates()` returns them.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, Error> {
    let leaf = certs
        .first()
        .ok_or(Error::Certificate(Problem::Missing("CERTIFICATE")))?;
    identity_of(leaf)
}

/// The SPIFFE identity in a certificate's first URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    parse(cert)
        .and_then(|x509| spiffe_id(&x509))
        .map_err(Error::Certificate)
}

pub(crate) fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, Problem> {
    match X509Certificate::from_der(der.as_ref()) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(Problem::Malformed("trailing data after certificate".into())),
        Err(e) => Err(Problem::Malformed(e.to_string())),
    }
}

/// All URI SANs, in order.
pub(crate) fn uri_sans<'a>(x509: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, Problem> {
    let san = x509
        .subject_alternative_name()
        .map_err(|e| Problem::Malformed(format!("subjectAltName: {e}")))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The identity is the first URI SAN, as in Istio.
fn spiffe_id(x509: &X509Certificate<'_>) -> Result<SpiffeId, Problem> {
    let sans = uri_sans(x509)?;
    let first = sans
        .first()
        .ok_or_else(|| Problem::NoSpiffeId("certificate has no URI SAN".into()))?;
    first
        .parse()
        .map_err(|e: Error| Problem::NoSpiffeId(e.to_string()))
}

pub(crate) fn validity(x509: &X509Certificate<'_>) -> (SystemTime, SystemTime) {
    let v = x509.validity();
    (to_system_time(v.not_before), to_system_time(v.not_after))
}

fn to_system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

pub(crate) fn fmt_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}
