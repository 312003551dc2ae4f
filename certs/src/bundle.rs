//! Trust bundles: the set of root certificates peers' chains must lead to.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;

use crate::cert::{self, uri_sans};
use crate::error::{Error, Problem};
use crate::id::check_trust_domain;
use crate::pemfile;

/// A set of trusted roots. Several roots are allowed so a CA can be rotated: publish a bundle
/// with old and new root, switch the signer, later drop the old root.
///
/// The first root names the mesh trust domain ([`TrustBundle::trust_domain`]): its
/// `spiffe://<td>` URI SAN, or failing that its `O=` attribute (Istio's self-signed roots carry
/// only `O=<trust domain>`).
///
/// Every root is trusted only for the trust domains it names itself (all its `spiffe://<td>` URI
/// SANs, else its `O=`); a root that names none is taken to be the bundle's own (the operator
/// put it into this trust domain's bundle). Peers are verified against the roots of the trust
/// domain of the identity they claim ([`TrustBundle::root_store_for`]), so a federated root in
/// the bundle cannot sign identities of our trust domain.
#[derive(Clone)]
pub struct TrustBundle {
    inner: Arc<Inner>,
}

struct Inner {
    roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    /// Roots per trust domain they vouch for.
    by_domain: BTreeMap<String, Arc<RootCertStore>>,
    trust_domain: String,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.inner.trust_domain)
            .field("roots", &self.inner.roots.len())
            .field("trust_domains", &self.inner.by_domain.keys())
            .finish()
    }
}

impl TrustBundle {
    /// Parses one or more PEM `CERTIFICATE` blocks; `source` names them in errors.
    pub fn from_pem(pem: &[u8], source: &str) -> Result<Self, Error> {
        let roots = pemfile::certs_from_pem(pem, source)?;
        Self::build(roots).map_err(|p| p.in_file(source))
    }

    /// Reads a PEM bundle such as `root-cert.pem`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let pem = pemfile::read(path)?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    pub fn from_der(roots: Vec<CertificateDer<'static>>) -> Result<Self, Error> {
        Self::from_der_named(roots, "<trust bundle>")
    }

    pub(crate) fn from_der_named(
        roots: Vec<CertificateDer<'static>>,
        source: impl fmt::Display,
    ) -> Result<Self, Error> {
        Self::build(roots).map_err(|p| p.in_file(source))
    }

    fn build(roots: Vec<CertificateDer<'static>>) -> Result<Self, Problem> {
        let first = roots.first().ok_or(Problem::Missing("CERTIFICATE"))?;
        let trust_domain = trust_domain_of_root(&cert::parse(first)?)?;
        let mut store = RootCertStore::empty();
        let mut by_domain: BTreeMap<String, RootCertStore> = BTreeMap::new();
        for root in &roots {
            // Parse each with x509-parser too, so a garbled later root is reported, not skipped.
            let x509 = cert::parse(root)?;
            let mut domains = trust_domains_of_root(&x509)?;
            if domains.is_empty() {
                domains.push(trust_domain.clone());
            }
            for domain in domains {
                by_domain
                    .entry(domain)
                    .or_insert_with(RootCertStore::empty)
                    .add(root.clone())
                    .map_err(|e| Problem::Malformed(e.to_string()))?;
            }
            store
                .add(root.clone())
                .map_err(|e| Problem::Malformed(e.to_string()))?;
        }
        Ok(TrustBundle {
            inner: Arc::new(Inner {
                roots,
                store: Arc::new(store),
                by_domain: by_domain
                    .into_iter()
                    .map(|(domain, store)| (domain, Arc::new(store)))
                    .collect(),
                trust_domain,
            }),
        })
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.inner.roots
    }

    /// The mesh trust domain this bundle stands for.
    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// All roots as a rustls store (shared, built once), whatever trust domain they vouch for.
    ///
    /// Verifying a SPIFFE peer against this store lets any root sign any identity; use
    /// [`root_store_for`](Self::root_store_for) with the trust domain the peer claims instead.
    pub fn root_store(&self) -> &Arc<RootCertStore> {
        &self.inner.store
    }

    /// The roots that vouch for `trust_domain`, or `None` when the bundle has none.
    pub fn root_store_for(&self, trust_domain: &str) -> Option<&Arc<RootCertStore>> {
        self.inner.by_domain.get(trust_domain)
    }

    /// Every trust domain some root of the bundle vouches for, sorted.
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.inner.by_domain.keys().map(String::as_str)
    }

    /// The roots as PEM, e.g. for `root-cert.pem`.
    pub fn to_pem(&self) -> String {
        pemfile::encode_certs(&self.inner.roots)
    }

    /// Writes the roots as PEM to `path` (e.g. `root-cert.pem`), atomically.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        pemfile::write(path, self.to_pem().as_bytes(), pemfile::CERT_MODE)
    }
}

/// The trust domain a root names first: see [`trust_domains_of_root`]; an error when it names
/// none.
fn trust_domain_of_root(x509: &X509Certificate<'_>) -> Result<String, Problem> {
    trust_domains_of_root(x509)?
        .into_iter()
        .next()
        .ok_or(Problem::NoTrustDomain)
}

/// Every `spiffe://<td>` URI SAN (the SPIFFE convention for CA certificates), in order; if there
/// are none, the first valid `O=<td>` (Istio's self-signed roots); possibly nothing.
fn trust_domains_of_root(x509: &X509Certificate<'_>) -> Result<Vec<String>, Problem> {
    let mut domains: Vec<String> = Vec::new();
    for uri in uri_sans(x509)? {
        if let Some(td) = uri.strip_prefix("spiffe://") {
            let td = td.strip_suffix('/').unwrap_or(td);
            if check_trust_domain(td).is_ok() && !domains.iter().any(|d| d == td) {
                domains.push(td.to_owned());
            }
        }
    }
    if domains.is_empty()
        && let Some(o) = x509
            .subject()
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .find(|o| check_trust_domain(o).is_ok())
    {
        domains.push(o.to_owned());
    }
    Ok(domains)
}
