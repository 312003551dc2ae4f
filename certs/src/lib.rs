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
//!   webpki verifier checks its chain to the [`TrustBundle`], validity and clientAuth EKU; then the
//!   first URI SAN must be a SPIFFE ID whose trust domain is the server's own.
//! - **Client** ([`IdentityManager::client_config`]): the server chain is verified with
//!   `verify_server_cert_signed_by_trust_anchor` (chain, validity, serverAuth EKU); the DNS name is
//!   not checked, instead one of the server's URI SANs must be in the expected set. No SNI is
//!   sent and sessions are never resumed.
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
//! Not done: revocation (certificates are short-lived instead), intermediate CAs in
//! [`CertificateAuthority`] (it is a root; loaded chains with intermediates are verified fine).

mod bundle;
mod ca;
mod cert;
mod error;
mod id;
mod manager;
mod pemfile;
pub mod tls;

pub use bundle::TrustBundle;
pub use ca::{CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority};
pub use cert::{
    CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE, WorkloadCert, identity_of, peer_identity,
};
pub use error::{Error, Problem};
pub use id::SpiffeId;
pub use manager::{IdentityManager, MIN_TTL};
