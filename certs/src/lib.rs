//! SPIFFE identities, a small certificate authority, workload certificates with rotation, and
//! rustls configurations that authenticate HBONE peers by SPIFFE ID the way Istio does.
//!
//! # Identities
//! A workload is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` ([`SpiffeId`]),
//! carried as the first URI SAN of its certificate ([`identity_of`], [`peer_identity`]).
//!
//! # Files
//! Names follow Istio (plugged-in CA and workload secrets):
//!
//! | file | written by | content |
//! |---|---|---|
//! | `ca-cert.pem` | `certs init`, [`CertificateAuthority::write`] | the root CA certificate (ECDSA P-256, `O=<td>`, URI SAN `spiffe://<td>`, 10 years) |
//! | `ca-key.pem` | same, mode 0600 | the CA's PKCS#8 private key |
//! | `root-cert.pem` | `certs init`, `certs issue` | the trust bundle: one or more roots (several during a CA rotation) |
//! | `cert-chain.pem` | `certs issue`, [`WorkloadCert::write`] | workload leaf first, then any intermediates |
//! | `cert-chain.pem` in a CA directory | the operator (plugged-in intermediate CA) | the CA certificate, then its issuers up to the root |
//! | `key.pem` | same, mode 0600 | the workload's PKCS#8 private key |
//!
//! Files are written atomically (temp file + rename); keys are created 0600, never chmod-ed
//! after the fact. Every error about a file names the file and the problem: unreadable, not
//! PEM, garbled DER, expired or not yet valid, no SPIFFE URI SAN, key not matching the
//! certificate, a CA certificate without CA:TRUE, a foreign trust domain.
//!
//! # Workload certificates
//! [`CertificateAuthority::issue`] makes what Istio's CA makes: a fresh ECDSA P-256 key, empty
//! subject, the SPIFFE ID as the only (critical) SAN, keyUsage digitalSignature +
//! keyEncipherment, extKeyUsage serverAuth + clientAuth, CA:FALSE, valid from a minute ago (clock
//! skew) for the TTL (24 h by default in the CLI). [`IdentityManager`] mints one per identity on
//! first use and renews it at half life in the background.
//!
//! # What the TLS configs verify
//! Both sides: TLS 1.3 only, AES-256-GCM / AES-128-GCM, ALPN `h2`, aws-lc-rs; the local
//! certificate is resolved per handshake, so rotation never touches live connections.
//! - **Server** ([`IdentityManager::server_config`]): a client certificate is mandatory; rustls'
//!   webpki verifier checks its chain, validity and clientAuth EKU against the [`TrustBundle`]'s
//!   roots for the trust domain its first URI SAN claims; that trust domain must be the server's
//!   own.
//! - **Client** ([`IdentityManager::client_config`]): one of the server's URI SANs must be in the
//!   expected set, and the chain is verified with `verify_server_cert_signed_by_trust_anchor`
//!   (chain, validity, serverAuth EKU) against the bundle's roots for that identity's trust
//!   domain. The DNS name is not checked. No SNI is sent and sessions are never resumed.
//! - Roots vouch only for the trust domains they name ([`TrustBundle`]): a federated root in the
//!   bundle cannot sign identities of ours.
//! - Handshake signatures are checked with the provider's `verify_tls13_signature`.
//!
//! # Example
//! ```
//! use std::{sync::Arc, time::Duration};
//! use certs::{CertificateAuthority, IdentityManager, SpiffeId};
//!
//! let ca = Arc::new(CertificateAuthority::generate("cluster.local")?);
//! let ids = IdentityManager::new(ca.clone(), ca.trust_bundle(), Duration::from_secs(24 * 3600));
//! let waypoint: SpiffeId = "spiffe://cluster.local/ns/istio-system/sa/waypoint".parse()?;
//! let sleep = SpiffeId::new("cluster.local", "default", "sleep");
//! // Inbound (15008): accept any client of our trust domain.
//! let server = ids.server_config(&waypoint)?;
//! // Outbound: present `sleep`'s certificate, accept only the waypoint.
//! let client = ids.client_config(&sleep, &[waypoint])?;
//! # let _ = (server, client);
//! # Ok::<(), certs::Error>(())
//! ```
//! After the handshake, `certs::peer_identity(conn.peer_certificates().unwrap_or_default())`
//! gives the authenticated peer.
//!
//! A loaded [`CertificateAuthority`] may be an intermediate (Istio's plugged-in CA layout:
//! `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem` = CA certificate then its issuers,
//! `root-cert.pem` = the root): issued chains then carry the CA certificate and its issuers below
//! the root.
//!
//! Not done: revocation (certificates are short-lived instead).

mod bundle;
mod ca;
mod cert;
mod error;
mod id;
mod manager;
mod pemfile;
pub mod tls;

pub use bundle::TrustBundle;
pub use ca::{CA_CERT_FILE, CA_CHAIN_FILE, CA_KEY_FILE, CertificateAuthority};
pub use cert::{
    CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE, WorkloadCert, identity_of, peer_identity,
};
pub use error::{Error, Problem};
pub use id::SpiffeId;
pub use manager::{IdentityManager, MIN_TTL};
