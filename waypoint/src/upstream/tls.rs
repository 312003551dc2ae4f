//! TLS origination from DestinationRule `tls` (SIMPLE / MUTUAL): rustls client configurations
//! built once per setting and cached, and the handshake with Envoy-style failure reasons.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use mesh_config::{ClientTls, TlsCredential, TlsMode};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor, verify_server_name,
};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

/// ALPN ids.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Client configurations are rebuilt this often so rotated CA / client certificate files are
/// picked up without a restart. (Secrets come with the snapshot: new material is a new spec.)
const CONFIG_TTL: Duration = Duration::from_secs(60);

/// The origination settings of one upstream, hashable so it can key pools and the config cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TlsSpec {
    /// Sent as SNI and, without `subject_alt_names`, what the certificate must be valid for.
    pub sni: String,
    /// PEM roots; `None` = the system's roots (`rustls-native-certs`, honours `SSL_CERT_FILE`).
    pub ca_certificates: Option<PathBuf>,
    /// MUTUAL: client certificate chain and key (PEM files).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// DestinationRule `credentialName`: the Secret's material, which replaces the file paths
    /// above (Istio's precedence), or why there is none — then every connection fails closed.
    pub credential: Option<Credential>,
    /// Accept the server only if one of its SANs is one of these (DNS, IP or URI).
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: bool,
    /// Offered ALPN protocols, in preference order.
    pub alpn: Vec<Vec<u8>>,
}

/// Where a `credentialName` spec gets its certificates from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Credential {
    /// Resolved from a Secret (PEM in memory).
    Secret(Arc<TlsCredential>),
    /// The Secret is missing or incomplete; the text names the rule, field and Secret.
    Unavailable(Arc<str>),
}

impl TlsSpec {
    /// The spec for `tls` towards `host` (the SNI when `tls.sni` is unset), offering `alpn`.
    /// `None` when the mode originates no TLS here: DISABLE, and ISTIO_MUTUAL, which is the
    /// mesh's own mTLS — the endpoints are then reached over HBONE ([`super::mesh`]), never in
    /// plaintext.
    ///
    /// `credential` is `tls.credentialName` resolved for this waypoint
    /// ([`mesh_config::Snapshot::tls_credential`]; the error already says which rule and
    /// field). With a `credentialName` the file paths are not used, and without a resolved
    /// credential the spec fails every connection: never plaintext, never without the client
    /// certificate.
    pub fn from_client_tls(
        tls: &ClientTls,
        host: &str,
        alpn: &[&[u8]],
        credential: Option<Result<TlsCredential, String>>,
    ) -> Option<TlsSpec> {
        let credential = tls.credential_name.as_ref().map(|name| match credential {
            Some(Ok(c)) => Credential::Secret(Arc::new(c)),
            Some(Err(why)) => Credential::Unavailable(why.into()),
            None => {
                Credential::Unavailable(format!("credentialName {name:?} was not resolved").into())
            }
        });
        let files = credential.is_none();
        match tls.mode {
            TlsMode::Disable | TlsMode::IstioMutual => None,
            TlsMode::Simple | TlsMode::Mutual => Some(TlsSpec {
                sni: tls.sni.clone().unwrap_or_else(|| host.to_owned()),
                ca_certificates: tls.ca_certificates.clone().filter(|_| files),
                client_cert: match (tls.mode, &tls.client_certificate, &tls.private_key) {
                    (TlsMode::Mutual, Some(c), Some(k)) if files => Some((c.clone(), k.clone())),
                    _ => None,
                },
                credential,
                subject_alt_names: tls.subject_alt_names.clone(),
                insecure_skip_verify: tls.insecure_skip_verify,
                alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            }),
        }
    }
}

/// Why origination could not even start (bad files) or the handshake failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Config(String),
    /// `credentialName` names no usable Secret: the connection is not even attempted.
    #[error("TLS credential unavailable: {0}")]
    CredentialUnavailable(String),
    /// `reason` is what `%UPSTREAM_TRANSPORT_FAILURE_REASON%` prints.
    #[error("TLS handshake failed: {reason}")]
    Handshake { reason: String },
}

impl TlsError {
    /// Envoy-style `upstream_transport_failure_reason`.
    pub fn transport_failure_reason(&self) -> String {
        match self {
            TlsError::Config(m) => format!("TLS_error:|{m}:TLS_error_end"),
            // Envoy's words for a credential its SDS never delivered, then which one.
            TlsError::CredentialUnavailable(m) => {
                format!("TLS error: Secret is not supplied by SDS ({m})")
            }
            TlsError::Handshake { reason } => reason.clone(),
        }
    }
}

/// rustls's default suites, AES-128-GCM first within each TLS version, as Envoy originates TLS:
/// BoringSSL offers TLS 1.3's AES-128-GCM first on hardware with AES instructions, and Envoy's
/// default TLS 1.2 client list starts with the AES-128 suites. It is also the cheaper cipher
/// here (~20 % per byte with AES-NI), for the waypoint and for the upstream that decrypts it.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = aws_lc_rs::default_provider();
            // Stable: the version groups and the rest of rustls's order stay as they are.
            p.cipher_suites.sort_by_key(|s| {
                let tls13 = matches!(s, rustls::SupportedCipherSuite::Tls13(_));
                let aes128 = matches!(
                    s.suite(),
                    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                        | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
                );
                (!tls13, !aes128)
            });
            Arc::new(p)
        })
        .clone()
}

/// Built client configurations, per [`TlsSpec`].
#[derive(Default)]
pub struct TlsCache {
    configs: Mutex<HashMap<TlsSpec, (Arc<ClientConfig>, Instant)>>,
    system_roots: OnceLock<Result<Arc<RootCertStore>, String>>,
}

impl fmt::Debug for TlsCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCache").finish_non_exhaustive()
    }
}

impl TlsCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The client configuration for `spec` (built on first use, rebuilt every minute).
    pub fn config(&self, spec: &TlsSpec) -> Result<Arc<ClientConfig>, TlsError> {
        let mut configs = self.configs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((config, built)) = configs.get(spec)
            && built.elapsed() < CONFIG_TTL
        {
            return Ok(config.clone());
        }
        let config = Arc::new(self.build(spec)?);
        // Specs of replaced Secrets would otherwise stay forever.
        configs.retain(|_, (_, built)| built.elapsed() < CONFIG_TTL);
        configs.insert(spec.clone(), (config.clone(), Instant::now()));
        Ok(config)
    }

    fn roots(&self, spec: &TlsSpec) -> Result<Arc<RootCertStore>, TlsError> {
        let (source, certs) = match (&spec.credential, &spec.ca_certificates) {
            (Some(Credential::Secret(c)), _) => {
                let (Some(ca), Some(from)) = (&c.ca, &c.ca_secret) else {
                    // Resolution guarantees a CA unless verification is skipped.
                    return Err(TlsError::CredentialUnavailable(format!(
                        "Secret {} has no CA certificate",
                        c.secret
                    )));
                };
                let source = format!("Secret {from} CA certificate");
                let certs = parse_certs(&source, CertificateDer::pem_slice_iter(ca.as_bytes()))?;
                (source, certs)
            }
            (Some(Credential::Unavailable(why)), _) => {
                return Err(TlsError::CredentialUnavailable(why.to_string()));
            }
            (None, Some(path)) => (path.display().to_string(), load_certs(path)?),
            (None, None) => {
                return self
                    .system_roots
                    .get_or_init(load_system_roots)
                    .clone()
                    .map_err(TlsError::Config);
            }
        };
        let mut store = RootCertStore::empty();
        let (added, _ignored) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsError::Config(format!(
                "{source}: no usable CA certificate"
            )));
        }
        Ok(Arc::new(store))
    }

    fn build(&self, spec: &TlsSpec) -> Result<ClientConfig, TlsError> {
        if let Some(Credential::Unavailable(why)) = &spec.credential {
            return Err(TlsError::CredentialUnavailable(why.to_string()));
        }
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = if spec.insecure_skip_verify {
            Arc::new(SkipVerify(provider.clone()))
        } else {
            let roots = self.roots(spec)?;
            if spec.subject_alt_names.is_empty() {
                WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?
            } else {
                Arc::new(SanVerifier {
                    roots,
                    provider: provider.clone(),
                    sans: spec.subject_alt_names.clone(),
                })
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let client = match (&spec.credential, &spec.client_cert) {
            (Some(Credential::Secret(c)), _) => match &c.client {
                Some((cert, key)) => {
                    let source = format!("Secret {}", c.secret);
                    let chain = parse_certs(
                        &format!("{source} certificate"),
                        CertificateDer::pem_slice_iter(cert.as_bytes()),
                    )?;
                    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| {
                        TlsError::Config(format!("{source} private key: {}", redacted(&e)))
                    })?;
                    Some((chain, key))
                }
                None => None,
            },
            (_, Some((cert, key))) => {
                let chain = load_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| TlsError::Config(format!("{}: {e}", key.display())))?;
                Some((chain, key))
            }
            (_, None) => None,
        };
        let mut config = match client {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = spec.alpn.clone();
        Ok(config)
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let source = path.display().to_string();
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Config(format!("{source}: {e}")))?;
    parse_certs(&source, iter)
}

/// A PEM error about a private key, without the bytes some variants quote (Secret material
/// must not reach logs).
fn redacted(e: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { .. } => "missing section end marker",
        Error::IllegalSectionStart { .. } => "illegal section start",
        Error::Base64Decode(_) => "invalid base64 in the PEM section",
        Error::NoItemsFound => "no private key found",
        _ => "unreadable PEM",
    }
}

/// Every certificate of a PEM source (a file or a Secret's key); `source` names it in errors.
fn parse_certs(
    source: &str,
    iter: impl Iterator<Item = Result<CertificateDer<'static>, rustls_pki_types::pem::Error>>,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = iter.collect();
    let certs = certs.map_err(|e| TlsError::Config(format!("{source}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Config(format!("{source}: no PEM certificate")));
    }
    Ok(certs)
}

fn load_system_roots() -> Result<Arc<RootCertStore>, String> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        warn!(error = %e, "loading a system root certificate failed");
    }
    let mut store = RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(found.certs);
    debug!(added, ignored, "system roots loaded");
    if added == 0 {
        return Err("no system root certificates found".into());
    }
    Ok(Arc::new(store))
}

/// Connects TLS over `io` (a TCP connection, or an HBONE tunnel to a mesh endpoint) with
/// `config`, sending `sni` (IP literals send no SNI, per RFC 6066).
pub async fn handshake<IO>(
    config: Arc<ClientConfig>,
    sni: &str,
    io: IO,
) -> Result<TlsStream<IO>, TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(sni.to_owned()).map_err(|e| TlsError::Handshake {
        reason: format!("TLS_error:|invalid server name {sni:?}: {e}:TLS_error_end"),
    })?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(|e| TlsError::Handshake {
            reason: failure_reason(&e),
        })
}

/// Envoy prints e.g. `TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end`;
/// we keep the shape and the OpenSSL reason name, with rustls' explanation.
pub fn failure_reason(e: &std::io::Error) -> String {
    let detail = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(cert)) => {
            format!("CERTIFICATE_VERIFY_FAILED:{cert}")
        }
        Some(rustls::Error::AlertReceived(alert)) => format!("TLSV1_ALERT:{alert:?}"),
        Some(rustls::Error::NoApplicationProtocol) => "NO_APPLICATION_PROTOCOL".to_owned(),
        Some(other) => format!("SSL_HANDSHAKE_FAILURE:{other}"),
        None => format!("CONNECTION_FAILURE:{e}"),
    };
    format!("TLS_error:|{detail}:TLS_error_end")
}

/// Chain verification against the roots, then a SAN from DestinationRule `subjectAltNames`
/// must be in the certificate (instead of the SNI host name).
#[derive(Debug)]
struct SanVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    sans: Vec<String>,
}

impl SanVerifier {
    fn san_matches(&self, end_entity: &CertificateDer<'_>, parsed: &ParsedCertificate<'_>) -> bool {
        let uri_sans = uri_sans(end_entity);
        self.sans.iter().any(|want| {
            if want.contains("://") {
                uri_sans.iter().any(|u| u == want)
            } else {
                ServerName::try_from(want.as_str())
                    .is_ok_and(|name| verify_server_name(parsed, &name).is_ok())
            }
        })
    }
}

fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.san_matches(end_entity, &parsed) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ))
        }
    }

    certs::handshake_signature_methods!(|v| &v.provider.signature_verification_algorithms);
}

/// `insecureSkipVerify: true`: any certificate, but the handshake signature must still be
/// made by its key.
#[derive(Debug)]
struct SkipVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    certs::handshake_signature_methods!(|v| &v.0.signature_verification_algorithms);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    use tokio::net::{TcpListener, TcpStream};

    struct Pki {
        dir: tempfile::TempDir,
        ca_pem: PathBuf,
    }

    /// A CA plus a server certificate for `names` signed by it, written to a temp dir.
    fn pki(names: &[&str]) -> (Pki, rustls::ServerConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        for n in names {
            params.subject_alt_names.push(if n.contains("://") {
                SanType::URI((*n).try_into().expect("uri"))
            } else {
                SanType::DnsName((*n).try_into().expect("dns"))
            });
        }
        let leaf = params.signed_by(&leaf_key, &issuer).expect("leaf");
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca_cert.pem()).expect("write");
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("key"),
            )
            .expect("server config");
        (Pki { dir, ca_pem }, server)
    }

    fn spec(pki: &Pki, sni: &str, sans: &[&str], skip: bool) -> TlsSpec {
        TlsSpec {
            sni: sni.to_owned(),
            ca_certificates: Some(pki.ca_pem.clone()),
            client_cert: None,
            credential: None,
            subject_alt_names: sans.iter().map(|s| (*s).to_owned()).collect(),
            insecure_skip_verify: skip,
            alpn: vec![ALPN_HTTP11.to_vec()],
        }
    }

    /// Runs one handshake against a server presenting `server`'s certificate.
    /// A handshake from `spec`'s client config with a one-connection server.
    async fn try_handshake(
        server: rustls::ServerConfig,
        spec: &TlsSpec,
    ) -> Result<TlsStream<TcpStream>, TlsError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        tokio::spawn(async move {
            if let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let config = TlsCache::new().config(spec)?;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        handshake(config, &spec.sni, tcp).await
    }

    #[test]
    fn aes_128_gcm_is_offered_first_in_each_tls_version() {
        use rustls::CipherSuite as C;
        let ours: Vec<C> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut default: Vec<C> = aws_lc_rs::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(ours[0], C::TLS13_AES_128_GCM_SHA256, "{ours:?}");
        let first_tls12 = provider()
            .cipher_suites
            .iter()
            .find(|s| matches!(s, rustls::SupportedCipherSuite::Tls12(_)))
            .map(|s| s.suite());
        assert!(
            matches!(
                first_tls12,
                Some(
                    C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                        | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
                )
            ),
            "{ours:?}"
        );
        // A reordering of rustls's defaults: nothing added, nothing dropped.
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| u16::from(*s));
        default.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, default);
    }

    #[tokio::test]
    async fn an_upstream_following_the_client_order_negotiates_aes_128_gcm() {
        let (pki, server) = pki(&["aliyun.com"]);
        let spec = spec(&pki, "aliyun.com", &[], false);
        let tls = try_handshake(server, &spec).await.expect("handshake");
        assert_eq!(
            tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }

    #[tokio::test]
    async fn verification_cases() {
        let (pki_a, _) = pki(&["aliyun.com"]);
        // Each case: SNI, DR subjectAltNames, insecureSkipVerify, names on the server cert,
        // whether the handshake must succeed.
        type Case<'a> = (&'a str, &'a [&'a str], bool, &'a [&'a str], bool);
        let cases: [Case<'_>; 7] = [
            ("aliyun.com", &[], false, &["aliyun.com"], true),
            ("aliyun.com", &[], false, &["evil.example"], false),
            (
                "aliyun.com",
                &["other.example"],
                false,
                &["other.example"],
                true,
            ),
            (
                "aliyun.com",
                &["other.example"],
                false,
                &["aliyun.com"],
                false,
            ),
            (
                "aliyun.com",
                &["spiffe://td/ns/a/sa/b"],
                false,
                &["spiffe://td/ns/a/sa/b"],
                true,
            ),
            ("aliyun.com", &[], true, &["evil.example"], true),
            ("*.wild.example", &[], false, &["aliyun.com"], false),
        ];
        for (sni, sans, skip, names, ok) in cases {
            let (pki, server) = pki(names);
            let spec = spec(&pki, sni, sans, skip);
            let got = try_handshake(server, &spec).await;
            assert_eq!(
                got.is_ok(),
                ok,
                "sni {sni} sans {sans:?} skip {skip} names {names:?}: {got:?}"
            );
        }
        // A certificate from another CA is refused with Envoy's reason shape.
        let (_other, server) = pki(&["aliyun.com"]);
        let err = try_handshake(server, &spec(&pki_a, "aliyun.com", &[], false))
            .await
            .expect_err("foreign CA");
        let reason = err.transport_failure_reason();
        assert!(
            reason.starts_with("TLS_error:|CERTIFICATE_VERIFY_FAILED:"),
            "{reason}"
        );
        drop(pki_a.dir);
    }

    #[test]
    fn spec_from_destination_rule() {
        let tls = ClientTls {
            mode: TlsMode::Simple,
            sni: None,
            ca_certificates: None,
            client_certificate: Some("/c.pem".into()),
            private_key: Some("/k.pem".into()),
            credential_name: None,
            credential_path: None,
            subject_alt_names: vec![],
            insecure_skip_verify: false,
        };
        let s = TlsSpec::from_client_tls(&tls, "aliyun.com", &[ALPN_HTTP11], None).expect("simple");
        assert_eq!(s.sni, "aliyun.com");
        // SIMPLE never presents a client certificate, even if files are named.
        assert_eq!(s.client_cert, None);
        let mutual = ClientTls {
            mode: TlsMode::Mutual,
            sni: Some("api.example".into()),
            ..tls.clone()
        };
        let s = TlsSpec::from_client_tls(&mutual, "aliyun.com", &[ALPN_H2], None).expect("mutual");
        assert_eq!(s.sni, "api.example");
        assert!(s.client_cert.is_some());
        assert_eq!(s.alpn, vec![b"h2".to_vec()]);
        let disable = ClientTls {
            mode: TlsMode::Disable,
            ..tls
        };
        assert!(TlsSpec::from_client_tls(&disable, "aliyun.com", &[], None).is_none());
    }

    #[test]
    fn unreadable_ca_file_is_a_config_error() {
        let spec = TlsSpec {
            sni: "a".into(),
            ca_certificates: Some("/nonexistent/ca.pem".into()),
            client_cert: None,
            credential: None,
            subject_alt_names: vec![],
            insecure_skip_verify: false,
            alpn: vec![],
        };
        let err = TlsCache::new().config(&spec).expect_err("missing file");
        assert!(
            matches!(err, TlsError::Config(ref m) if m.contains("/nonexistent/ca.pem")),
            "{err}"
        );
    }

    /// A CA, a server certificate for `api.example` and a client certificate, all PEM.
    struct MtlsPki {
        ca: String,
        server: rustls::ServerConfig,
        client_cert: String,
        client_key: String,
    }

    fn mtls_pki() -> MtlsPki {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "egress CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().expect("key");
        let server_cert = CertificateParams::new(vec!["api.example".to_owned()])
            .expect("params")
            .signed_by(&server_key, &issuer)
            .expect("server");
        let client_key = KeyPair::generate().expect("key");
        let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        client_params
            .distinguished_name
            .push(DnType::CommonName, "waypoint-client");
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &issuer)
            .expect("client");
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).expect("root");
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .expect("client verifier");
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server_cert.der().clone()],
                PrivateKeyDer::try_from(server_key.serialize_der()).expect("key"),
            )
            .expect("server config");
        MtlsPki {
            ca: ca_cert.pem(),
            server,
            client_cert: client_cert.pem(),
            client_key: client_key.serialize_pem(),
        }
    }

    /// A `kubernetes.io/tls` Secret in `egress` with PEM values as `stringData`.
    fn secret_yaml(name: &str, keys: &[(&str, &str)]) -> String {
        let mut y = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: egress}}\nstringData:\n"
        );
        for (k, pem) in keys {
            y.push_str(&format!("  {k}: |\n"));
            for line in pem.lines() {
                y.push_str(&format!("    {line}\n"));
            }
        }
        y
    }

    fn credential_tls(mode: TlsMode, name: &str) -> ClientTls {
        ClientTls {
            mode,
            sni: None,
            // credentialName wins: these files are never read.
            ca_certificates: Some("/nonexistent/ca.pem".into()),
            client_certificate: Some("/nonexistent/c.pem".into()),
            private_key: Some("/nonexistent/k.pem".into()),
            credential_name: Some(name.to_owned()),
            credential_path: Some("spec.trafficPolicy.tls.credentialName".into()),
            subject_alt_names: vec![],
            insecure_skip_verify: false,
        }
    }

    /// One handshake against `server`; the client certificate chain the server saw.
    async fn server_saw(
        server: rustls::ServerConfig,
        spec: &TlsSpec,
    ) -> Result<Option<usize>, TlsError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.ok()?;
            let tls = acceptor.accept(tcp).await.ok()?;
            Some(tls.get_ref().1.peer_certificates().map_or(0, <[_]>::len))
        });
        let config = TlsCache::new().config(spec)?;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let stream = handshake(config, &spec.sni, tcp).await?;
        let saw = accepted.await.expect("server task");
        drop(stream);
        Ok(saw)
    }

    #[tokio::test]
    async fn credential_name_from_secret() {
        let pki = mtls_pki();
        let secret = secret_yaml(
            "client",
            &[
                ("tls.crt", &pki.client_cert),
                ("tls.key", &pki.client_key),
                ("ca.crt", &pki.ca),
            ],
        );
        let snap = mesh_config::load_sources([("s.yaml", secret.as_str())]).expect("secret");
        let resolve = |tls: &ClientTls, ns: &str| {
            let cred = snap
                .tls_credential(ns, tls)
                .map(|r| r.map_err(|e| format!("DestinationRule egress/dr: {e}")));
            TlsSpec::from_client_tls(tls, "api.example", &[ALPN_HTTP11], cred).expect("spec")
        };

        // MUTUAL: the server verifies the client certificate from the Secret, and the waypoint
        // verifies the server with the Secret's ca.crt (the file paths would fail).
        let spec = resolve(&credential_tls(TlsMode::Mutual, "client"), "egress");
        assert_eq!(spec.ca_certificates, None);
        assert_eq!(spec.client_cert, None);
        let saw = server_saw(pki.server.clone(), &spec).await.expect("mutual");
        assert_eq!(saw, Some(1), "client certificate presented");

        // The Secret is in the waypoint's namespace only: another waypoint fails closed before
        // connecting, naming the rule and the missing Secret.
        let spec = resolve(&credential_tls(TlsMode::Mutual, "client"), "other");
        let err = TlsCache::new().config(&spec).expect_err("no secret");
        let reason = err.transport_failure_reason();
        assert!(
            reason.starts_with("TLS error: Secret is not supplied by SDS (")
                && reason.contains("DestinationRule egress/dr")
                && reason.contains("Secret other/client not found"),
            "{reason}"
        );

        // SIMPLE with the same Secret: only ca.crt is used, so the server (which requires a
        // client certificate) refuses.
        let spec = resolve(&credential_tls(TlsMode::Simple, "client"), "egress");
        assert_eq!(
            server_saw(pki.server.clone(), &spec).await.ok().flatten(),
            None
        );

        // A credentialName nobody resolved is never silently ignored.
        let spec = TlsSpec::from_client_tls(
            &credential_tls(TlsMode::Mutual, "client"),
            "api.example",
            &[],
            None,
        )
        .expect("spec");
        assert!(matches!(
            TlsCache::new().config(&spec),
            Err(TlsError::CredentialUnavailable(_))
        ));
    }
}
