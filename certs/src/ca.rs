//! The certificate authority: a self-signed ECDSA P-256 root that issues workload certificates.

use std::fmt;
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cert::{self, Part, fmt_time};
use crate::error::{Error, Problem};
use crate::id::check_trust_domain;
use crate::{SpiffeId, TrustBundle, WorkloadCert, pemfile};

/// File names of a CA directory (Istio's plugged-in CA names: `ca-cert.pem`, `ca-key.pem`,
/// `cert-chain.pem`, `root-cert.pem`).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// In a CA directory: the CA certificate followed by its issuers up to the root.
pub const CA_CHAIN_FILE: &str = crate::cert::CERT_CHAIN_FILE;

/// Istio's default self-signed root lifetime.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this far in the past so peers whose clocks lag slightly accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A CA that signs workload certificates for one trust domain.
///
/// Either a self-signed root ([`generate`](Self::generate)) or a loaded CA, which may be an
/// intermediate (Istio's plugged-in CA): then issued chains carry the CA certificate and its
/// issuers below the root ([`chain`](Self::chain)), so peers that trust only the root can
/// verify them.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// What issued chains carry after the leaf: empty for a root; for an intermediate, the CA
    /// certificate and then its issuers, without self-signed roots.
    chain: Vec<CertificateDer<'static>>,
    bundle: TrustBundle,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed root for `trust_domain`: subject `O=<td>` (as Istio's) and URI SAN
    /// `spiffe://<td>`, valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        check_trust_domain(trust_domain).map_err(|reason| Error::InvalidSpiffeId {
            input: format!("spiffe://{trust_domain}"),
            reason,
        })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ROOT_TTL).into();
        let cert = params.self_signed(&key)?.der().clone();
        let bundle = TrustBundle::from_der(vec![cert.clone()])?;
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            cert,
            chain: Vec::new(),
            bundle,
        })
    }

    /// Loads `ca-cert.pem` and `ca-key.pem`. Refuses a certificate that is garbled, expired, not
    /// a CA or names no trust domain, and a key that does not match it.
    ///
    /// Certificates after the first in `ca-cert.pem` are taken as the CA's issuers (see
    /// [`chain`](Self::chain)); [`load_dir`](Self::load_dir) also reads them from
    /// `cert-chain.pem`.
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<Self, Error> {
        let cert_name = cert_pem.display();
        let mut certs = pemfile::certs_from_pem(&pemfile::read(cert_pem)?, &cert_name)?;
        if certs.is_empty() {
            return Err(Problem::Missing("CERTIFICATE").in_file(&cert_name));
        }
        let issuers = certs.split_off(1);
        let cert = certs.remove(0);
        let x509 = cert::parse(&cert).map_err(|p| p.in_file(&cert_name))?;
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => return Err(Problem::NotCa.in_file(&cert_name)),
        }
        let (not_before, not_after) = cert::validity(&x509);
        let now = SystemTime::now();
        if now >= not_after {
            return Err(Problem::Expired(fmt_time(not_after)).in_file(&cert_name));
        }
        if now < not_before {
            return Err(Problem::NotYetValid(fmt_time(not_before)).in_file(&cert_name));
        }

        let key_name = key_pem.display();
        let key_bytes = pemfile::read(key_pem)?;
        let key_str = std::str::from_utf8(&key_bytes)
            .map_err(|_| Problem::Pem("not UTF-8 text".into()).in_file(&key_name))?;
        let key = KeyPair::from_pem(key_str).map_err(|e| match e {
            rcgen::Error::PemError(_) => Problem::Pem(e.to_string()).in_file(&key_name),
            _ => Problem::Key(e.to_string()).in_file(&key_name),
        })?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(Problem::KeyMismatch.in_file(&key_name));
        }

        let root = is_self_signed(&x509);
        let bundle = TrustBundle::from_der_named(vec![cert.clone()], &cert_name)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| Problem::Malformed(e.to_string()).in_file(&cert_name))?;
        let mut ca = CertificateAuthority {
            issuer,
            cert,
            chain: Vec::new(),
            bundle,
        };
        if !root {
            ca.set_issuers(issuers, &cert_name)?;
        }
        Ok(ca)
    }

    /// Loads `ca-cert.pem` and `ca-key.pem` from `dir`, and for an intermediate CA its issuers
    /// from `cert-chain.pem` when that starts with the CA certificate (Istio's plugged-in CA
    /// layout; a `cert-chain.pem` that does not is someone else's and is ignored).
    pub fn load_dir(dir: &Path) -> Result<Self, Error> {
        let mut ca = Self::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))?;
        let chain_path = dir.join(CA_CHAIN_FILE);
        if ca.is_root() || !chain_path.exists() {
            return Ok(ca);
        }
        let chain_name = chain_path.display();
        let mut chain = pemfile::certs_from_pem(&pemfile::read(&chain_path)?, &chain_name)?;
        if chain.first() != Some(&ca.cert) {
            tracing::warn!(
                file = %chain_name,
                "does not start with the CA certificate; not used as the CA's chain"
            );
            return Ok(ca);
        }
        let issuers = chain.split_off(1);
        ca.set_issuers(issuers, &chain_name)?;
        Ok(ca)
    }

    /// The chain issued certificates carry after the leaf: the CA certificate and its issuers
    /// for an intermediate CA (self-signed roots left out: peers have them), for a root nothing.
    fn set_issuers(
        &mut self,
        issuers: Vec<CertificateDer<'static>>,
        source: &impl fmt::Display,
    ) -> Result<(), Error> {
        let mut chain = vec![self.cert.clone()];
        for cert in issuers {
            let x509 = cert::parse(&cert).map_err(|p| p.in_file(source))?;
            if !is_self_signed(&x509) {
                chain.push(cert.clone());
            }
        }
        self.chain = chain;
        Ok(())
    }

    /// Whether this CA is a self-signed root (issued chains are then just the leaf).
    pub fn is_root(&self) -> bool {
        self.chain.is_empty()
    }

    /// What issued chains carry after the leaf: nothing for a root CA; for an intermediate CA,
    /// its own certificate and then its issuers below the root.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Writes `ca-cert.pem`, `ca-key.pem` (0600) and `root-cert.pem` (the bundle workloads
    /// trust) into `dir`, creating it if needed; for an intermediate CA also `cert-chain.pem`
    /// (the CA certificate and its issuers, as [`chain`](Self::chain)).
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        fs::create_dir_all(dir).map_err(|e| Problem::Io(e).in_file(dir.display()))?;
        let cert_pem = pemfile::encode_certs(std::slice::from_ref(&self.cert));
        pemfile::write(
            &dir.join(CA_CERT_FILE),
            cert_pem.as_bytes(),
            pemfile::CERT_MODE,
        )?;
        pemfile::write(
            &dir.join(CA_KEY_FILE),
            self.issuer.key().serialize_pem().as_bytes(),
            pemfile::KEY_MODE,
        )?;
        if !self.chain.is_empty() {
            pemfile::write(
                &dir.join(CA_CHAIN_FILE),
                pemfile::encode_certs(&self.chain).as_bytes(),
                pemfile::CERT_MODE,
            )?;
        }
        self.bundle.write(&dir.join(cert::ROOT_CERT_FILE))
    }

    pub fn trust_domain(&self) -> &str {
        self.bundle.trust_domain()
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A bundle holding just this CA's certificate.
    pub fn trust_bundle(&self) -> TrustBundle {
        self.bundle.clone()
    }

    /// Issues a certificate for `id`, valid from now (less a minute for clock skew) for `ttl`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCert, Error> {
        let now = SystemTime::now();
        self.issue_with_validity(id, now - CLOCK_SKEW, now + ttl)
    }

    /// Issues a certificate with an explicit validity window (tests use one in the past).
    ///
    /// The certificate is what Istio issues: ECDSA P-256, empty subject, the SPIFFE ID as the
    /// only (critical) SAN, keyUsage digitalSignature + keyEncipherment, extKeyUsage serverAuth +
    /// clientAuth, CA:FALSE.
    pub fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, Error> {
        id.validate()?;
        if id.trust_domain != self.trust_domain() {
            return Err(Error::ForeignTrustDomain {
                id: id.to_string(),
                expected: self.trust_domain().to_owned(),
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let leaf = params.signed_by(&key, &self.issuer)?.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(leaf);
        chain.extend(self.chain.iter().cloned());
        WorkloadCert::from_parts(chain, key).map_err(|p| match p {
            // Only a bug here could produce a certificate we cannot read back.
            Part::Chain(p) | Part::Key(p) => Error::Certificate(p),
        })
    }
}

/// Subject and issuer are the same name: a root (or at least not something a peer can chain
/// further from).
fn is_self_signed(x509: &x509_parser::certificate::X509Certificate<'_>) -> bool {
    x509.subject().as_raw() == x509.issuer().as_raw()
}
