//! rustls configurations for HBONE mTLS, as Istio's ztunnel builds them: TLS 1.3 only,
//! AES-256-GCM / AES-128-GCM, ALPN `h2`, no SNI, no resumption; peers are identified by the
//! SPIFFE ID in their certificate, never by DNS name.
//!
//! The certificate is supplied by a resolver that rustls asks on every handshake, so a rotated
//! certificate is used by the next handshake while established connections carry on.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock};

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DistinguishedName, OtherError, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::cert::{self, uri_sans};
use crate::error::{Error, Problem};
use crate::{SpiffeId, TrustBundle, WorkloadCert};

/// ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    let mut provider = aws_lc_rs::default_provider();
    // Istio's HBONE suites; TLS 1.3 only, so no TLS 1.2 suites either. AES-128-GCM first: ~20 %
    // cheaper per byte than AES-256-GCM with AES-NI (`openssl speed` here), and an Istio peer
    // accepts either (rustls servers follow the client's order unless told otherwise).
    provider.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
});

/// The aws-lc-rs provider restricted to HBONE's cipher suites.
pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

/// Server side of HBONE: presents the certificate `certs` resolves, requires a client
/// certificate whose SPIFFE trust domain is `trust_domain` and that chains to one of `bundle`'s
/// roots for that trust domain ([`TrustBundle::root_store_for`]).
///
/// Fails with [`Error::NoTrustAnchor`] when the bundle has no root for `trust_domain`.
pub fn server_config(
    certs: Arc<dyn ResolvesServerCert>,
    bundle: &TrustBundle,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, Error> {
    if bundle.root_store_for(trust_domain).is_none() {
        return Err(Error::NoTrustAnchor {
            trust_domain: trust_domain.to_owned(),
        });
    }
    // One webpki verifier per trust domain, over that domain's roots only. Foreign clients are
    // refused whatever their chain; verifying it first just tells "unknown issuer" apart from
    // "foreign trust domain" in the error.
    let mut chains = HashMap::new();
    for domain in bundle.trust_domains() {
        let roots = bundle
            .root_store_for(domain)
            .ok_or_else(|| Error::NoTrustAnchor {
                trust_domain: domain.to_owned(),
            })?;
        let chain = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| Error::Tls(rustls::Error::General(e.to_string())))?;
        chains.insert(domain.to_owned(), chain);
    }
    let own = chains
        .get(trust_domain)
        .cloned()
        .ok_or_else(|| Error::NoTrustAnchor {
            trust_domain: trust_domain.to_owned(),
        })?;
    let verifier = Arc::new(TrustDomainVerifier {
        own,
        chains,
        trust_domain: trust_domain.to_owned(),
    });
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE clients never resume; tickets would be wasted bytes on every connection.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// Client side of HBONE: presents the certificate `certs` resolves, accepts the server only if
/// one of its URI SANs is in `expected_server` and its chain verifies against `bundle`'s roots
/// for that identity's trust domain.
/// The `ServerName` passed to rustls is not checked (and no SNI is sent): pass any, e.g. the IP.
///
/// Fails with [`Error::NoExpectedServer`] when `expected_server` is empty.
pub fn client_config(
    certs: Arc<dyn ResolvesClientCert>,
    bundle: &TrustBundle,
    expected_server: &[SpiffeId],
) -> Result<Arc<ClientConfig>, Error> {
    if expected_server.is_empty() {
        return Err(Error::NoExpectedServer);
    }
    let verifier = Arc::new(IdentityVerifier {
        bundle: bundle.clone(),
        expected: expected_server.to_vec(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(certs);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// A fixed certificate, for callers that hold a [`WorkloadCert`] themselves.
#[derive(Debug, Clone)]
pub struct StaticCert(Arc<CertifiedKey>);

impl StaticCert {
    pub fn new(cert: &WorkloadCert) -> Arc<Self> {
        Arc::new(StaticCert(cert.certified_key()))
    }
}

impl ResolvesServerCert for StaticCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for StaticCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn reject(e: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejected(e)))))
}

/// rustls formats `OtherError` with `Debug`; make that the readable message.
struct Rejected(Error);

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Rejected {}

/// Re-exported for [`handshake_signature_methods!`], so its expansion names rustls' types
/// whatever the calling crate calls its rustls dependency.
#[doc(hidden)]
pub use rustls as __rustls;

/// Expands, inside an `impl ServerCertVerifier` or `impl ClientCertVerifier` block, to the
/// three handshake-signature methods (`verify_tls12_signature`, `verify_tls13_signature`,
/// `supported_verify_schemes`), all checking with the `WebPkiSupportedAlgorithms` that the
/// closure-like argument returns for the verifier, e.g.
/// `handshake_signature_methods!(|v| &v.provider.signature_verification_algorithms);`.
///
/// Every custom verifier must check the handshake signature properly, even one that accepts
/// any certificate, so the key holder is proven; this keeps those checks identical everywhere.
#[macro_export]
macro_rules! handshake_signature_methods {
    (|$verifier:ident| $algorithms:expr) => {
        $crate::handshake_signature_methods!(@verify verify_tls12_signature, |$verifier| $algorithms);
        $crate::handshake_signature_methods!(@verify verify_tls13_signature, |$verifier| $algorithms);

        fn supported_verify_schemes(
            &self,
        ) -> ::std::vec::Vec<$crate::tls::__rustls::SignatureScheme> {
            let $verifier = self;
            $algorithms.supported_schemes()
        }
    };
    // The trait methods share their names with the rustls functions that implement them.
    (@verify $method:ident, |$verifier:ident| $algorithms:expr) => {
        fn $method(
            &self,
            message: &[u8],
            cert: &$crate::tls::__rustls::pki_types::CertificateDer<'_>,
            dss: &$crate::tls::__rustls::DigitallySignedStruct,
        ) -> ::std::result::Result<
            $crate::tls::__rustls::client::danger::HandshakeSignatureValid,
            $crate::tls::__rustls::Error,
        > {
            let $verifier = self;
            $crate::tls::__rustls::crypto::$method(message, cert, dss, $algorithms)
        }
    };
}

/// Verifies a server: one of its URI SANs must be an expected identity, and the chain must lead
/// (webpki: signatures, serverAuth EKU, validity) to a root of that identity's trust domain.
#[derive(Debug)]
struct IdentityVerifier {
    bundle: TrustBundle,
    expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let x509 = cert::parse(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let sans = uri_sans(&x509).map_err(|p| reject(Error::Certificate(p)))?;
        let mut domains: Vec<&str> = Vec::new();
        for id in sans.iter().filter_map(|u| u.parse::<SpiffeId>().ok()) {
            if let Some(expected) = self.expected.iter().find(|e| **e == id)
                && !domains.contains(&expected.trust_domain.as_str())
            {
                domains.push(&expected.trust_domain);
            }
        }
        if domains.is_empty() {
            return Err(reject(Error::UnexpectedServer {
                found: sans.iter().map(|s| s.to_string()).collect(),
                expected: self.expected.iter().map(ToString::to_string).collect(),
            }));
        }
        let parsed = ParsedCertificate::try_from(end_entity)?;
        // Only roots of the claimed identity's trust domain may vouch for it. A certificate
        // naming expected identities of several trust domains needs to verify in one of them.
        let mut refusal = None;
        for domain in domains {
            let Some(roots) = self.bundle.root_store_for(domain) else {
                refusal = Some(reject(Error::NoTrustAnchor {
                    trust_domain: domain.to_owned(),
                }));
                continue;
            };
            match verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                PROVIDER.signature_verification_algorithms.all,
            ) {
                Ok(()) => return Ok(ServerCertVerified::assertion()),
                Err(e) => refusal = Some(e),
            }
        }
        Err(refusal.unwrap_or(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )))
    }

    // TLS 1.2 is unreachable with our TLS 1.3-only configs; it is verified properly anyway
    // rather than accepted.
    crate::handshake_signature_methods!(|_verifier| &PROVIDER.signature_verification_algorithms);
}

/// Verifies a client: rustls' webpki client verifier over the roots of the trust domain the
/// client's first URI SAN claims (chain, clientAuth EKU, validity), then that trust domain must
/// be ours.
struct TrustDomainVerifier {
    /// The verifier over our own trust domain's roots (for the root hints).
    own: Arc<dyn ClientCertVerifier>,
    /// A verifier per trust domain of the bundle, each over that domain's roots only.
    chains: HashMap<String, Arc<dyn ClientCertVerifier>>,
    trust_domain: String,
}

impl fmt::Debug for TrustDomainVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustDomainVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.own.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = cert::identity_of(end_entity).map_err(reject)?;
        let chain = self
            .chains
            .get(&id.trust_domain)
            .ok_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))?;
        chain.verify_client_cert(end_entity, intermediates, now)?;
        if id.trust_domain != self.trust_domain {
            return Err(reject(Error::Certificate(Problem::ForeignTrustDomain {
                found: id.trust_domain,
                expected: self.trust_domain.clone(),
            })));
        }
        Ok(ClientCertVerified::assertion())
    }

    // TLS 1.2 is unreachable with our TLS 1.3-only configs; it is verified properly anyway
    // rather than accepted.
    crate::handshake_signature_methods!(|_verifier| &PROVIDER.signature_verification_algorithms);
}
