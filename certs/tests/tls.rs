//! Real TLS handshakes between `server_config` and `client_config`, accepted and refused.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use certs::tls::{self, StaticCert};
use certs::{CertificateAuthority, IdentityManager, SpiffeId, TrustBundle, peer_identity};
use common::{handshake, ping, server_refused};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{HandshakeKind, ProtocolVersion, SignatureScheme};

const TTL: Duration = Duration::from_secs(3600);

fn id(td: &str, ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td, ns, sa)
}

fn manager(ca: &Arc<CertificateAuthority>, bundle: TrustBundle) -> IdentityManager {
    IdentityManager::new(ca.clone(), bundle, TTL)
}

fn ca(td: &str) -> Arc<CertificateAuthority> {
    Arc::new(CertificateAuthority::generate(td).expect("generate CA"))
}

/// Roots of several CAs, the first naming the bundle's trust domain.
fn bundle(cas: &[&Arc<CertificateAuthority>]) -> TrustBundle {
    TrustBundle::from_der(cas.iter().map(|c| c.cert().clone()).collect()).expect("bundle")
}

#[tokio::test]
async fn handshake_succeeds_and_both_sides_see_the_peer() {
    let ca = ca("cluster.local");
    let m = manager(&ca, ca.trust_bundle());
    let server_id = id("cluster.local", "istio-system", "waypoint");
    let client_id = id("cluster.local", "default", "sleep");
    let server = m.server_config(&server_id).unwrap();
    // Several acceptable identities: one match is enough.
    let expected = [id("cluster.local", "other", "x"), server_id.clone()];
    let client = m.client_config(&client_id, &expected).unwrap();

    let (c, s) = handshake(client.clone(), server.clone()).await;
    let (mut c, mut s) = (c.expect("client"), s.expect("server"));
    let (_, cs) = c.get_ref();
    let (_, ss) = s.get_ref();
    assert_eq!(
        peer_identity(cs.peer_certificates().unwrap()).unwrap(),
        server_id
    );
    assert_eq!(
        peer_identity(ss.peer_certificates().unwrap()).unwrap(),
        client_id
    );

    // Istio's HBONE parameters.
    assert_eq!(cs.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(cs.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(ss.alpn_protocol(), Some(&b"h2"[..]));
    let suite = cs.negotiated_cipher_suite().unwrap().suite();
    // Our client prefers AES-128-GCM (cheaper; Istio's set, our order).
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert_eq!(ss.server_name(), None, "client must not send SNI");
    ping(&mut c, &mut s, b"hello").await;

    // No resumption: a second connection is a full handshake.
    let (c2, s2) = handshake(client, server).await;
    let c2 = c2.expect("second client");
    s2.expect("second server");
    assert_eq!(c2.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
}

#[test]
fn configs_are_tls13_only_with_hbone_suites() {
    let ca = ca("cluster.local");
    let m = manager(&ca, ca.trust_bundle());
    let me = id("cluster.local", "a", "b");
    let client = m.client_config(&me, std::slice::from_ref(&me)).unwrap();
    let server = m.server_config(&me).unwrap();
    for cfg in [client.crypto_provider(), server.crypto_provider()] {
        let suites: Vec<_> = cfg.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites,
            [
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
            ]
        );
    }
    assert!(!client.enable_sni);
    assert_eq!(client.alpn_protocols, [b"h2".to_vec()]);
    assert_eq!(server.alpn_protocols, [b"h2".to_vec()]);
    assert!(matches!(
        m.client_config(&me, &[]),
        Err(certs::Error::NoExpectedServer)
    ));
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let ca1 = ca("cluster.local");
    // A rogue CA claiming the same trust domain.
    let ca2 = ca("cluster.local");
    let server_id = id("cluster.local", "ns", "server");
    let server = manager(&ca1, ca1.trust_bundle())
        .server_config(&server_id)
        .unwrap();
    // The client trusts the real server, but its own certificate comes from ca2.
    let client = manager(&ca2, bundle(&[&ca2, &ca1]))
        .client_config(&id("cluster.local", "ns", "client"), &[server_id])
        .unwrap();
    let err = server_refused(handshake(client, server).await).await;
    // Same issuer name as the real CA, so webpki finds "its" issuer and the signature fails.
    assert!(err.contains("BadSignature"), "{err}");

    // A CA with another name: no issuer found at all.
    let ca3 = ca("other.local");
    let server = manager(&ca1, ca1.trust_bundle())
        .server_config(&server_id_again())
        .unwrap();
    let client = manager(&ca3, bundle(&[&ca3, &ca1]))
        .client_config(&id("other.local", "ns", "client"), &[server_id_again()])
        .unwrap();
    let err = server_refused(handshake(client, server).await).await;
    assert!(err.contains("UnknownIssuer"), "{err}");
}

fn server_id_again() -> SpiffeId {
    id("cluster.local", "ns", "server")
}

#[derive(Debug)]
struct NoCert;

impl ResolvesClientCert for NoCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }
    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let ca = ca("cluster.local");
    let server_id = id("cluster.local", "ns", "server");
    let server = manager(&ca, ca.trust_bundle())
        .server_config(&server_id)
        .unwrap();
    let client = tls::client_config(Arc::new(NoCert), &ca.trust_bundle(), &[server_id]).unwrap();
    let err = server_refused(handshake(client, server).await).await;
    assert!(err.contains("peer sent no certificates"), "{err}");
}

#[tokio::test]
async fn server_outside_expected_set_is_refused() {
    let ca = ca("cluster.local");
    let m = manager(&ca, ca.trust_bundle());
    let server = m
        .server_config(&id("cluster.local", "ns", "impostor"))
        .unwrap();
    let client = m
        .client_config(
            &id("cluster.local", "ns", "client"),
            &[id("cluster.local", "ns", "server")],
        )
        .unwrap();
    let (c, s) = handshake(client, server).await;
    let err = c.expect_err("client must refuse").to_string();
    assert!(err.contains("not among the expected"), "{err}");
    assert!(
        err.contains("spiffe://cluster.local/ns/ns/sa/impostor"),
        "{err}"
    );
    assert!(s.is_err(), "server sees the alert");
}

#[tokio::test]
async fn client_from_foreign_trust_domain_is_refused() {
    let local = ca("cluster.local");
    let foreign = ca("other.local");
    let server_id = id("cluster.local", "ns", "server");
    // The server's bundle trusts the foreign root (a shared or federated root), so the chain
    // verifies; only the trust-domain check can refuse.
    let server = manager(&local, bundle(&[&local, &foreign]))
        .server_config(&server_id)
        .unwrap();
    let client = manager(&foreign, bundle(&[&foreign, &local]))
        .client_config(
            &id("other.local", "ns", "client"),
            std::slice::from_ref(&server_id),
        )
        .unwrap();
    let err = server_refused(handshake(client, server.clone()).await).await;
    assert!(
        err.contains("\"other.local\" is not \"cluster.local\""),
        "{err}"
    );

    // Control: a local client passes the same server.
    let client = manager(&local, bundle(&[&local, &foreign]))
        .client_config(&id("cluster.local", "ns", "client"), &[server_id])
        .unwrap();
    let (c, s) = handshake(client, server).await;
    c.expect("client");
    s.expect("server");
}

#[tokio::test]
async fn expired_certificates_are_refused() {
    let ca = ca("cluster.local");
    let b = ca.trust_bundle();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let server_id = id("cluster.local", "ns", "server");
    let client_id = id("cluster.local", "ns", "client");
    let expired_server = ca
        .issue_with_validity(&server_id, now - 2 * hour, now - hour)
        .unwrap();
    let expired_client = ca
        .issue_with_validity(&client_id, now - 2 * hour, now - hour)
        .unwrap();
    let good = manager(&ca, b.clone());

    // Expired server certificate: the client refuses.
    let server = tls::server_config(StaticCert::new(&expired_server), &b, "cluster.local").unwrap();
    let client = good
        .client_config(&client_id, std::slice::from_ref(&server_id))
        .unwrap();
    let (c, _) = handshake(client, server).await;
    let err = c.expect_err("client must refuse").to_string();
    assert!(err.contains("certificate expired"), "{err}");

    // Expired client certificate: the server refuses.
    let server = good.server_config(&server_id).unwrap();
    let client = tls::client_config(StaticCert::new(&expired_client), &b, &[server_id]).unwrap();
    let err = server_refused(handshake(client, server).await).await;
    assert!(err.contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn static_certs_interoperate_with_managed_ones() {
    let ca = ca("cluster.local");
    let b = ca.trust_bundle();
    let server_id = id("cluster.local", "ns", "server");
    let cert = ca.issue(&server_id, TTL).unwrap();
    let server = tls::server_config(StaticCert::new(&cert), &b, "cluster.local").unwrap();
    let client = manager(&ca, b)
        .client_config(&id("cluster.local", "ns", "client"), &[server_id])
        .unwrap();
    let (c, s) = handshake(client, server).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.get_ref().1.peer_certificates().unwrap()[0], *cert.leaf());
    ping(&mut c, &mut s, b"x").await;
}

/// A resolver over a certificate built outside the crate (by rcgen directly).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A CA for `other.local` (URI SAN `spiffe://other.local`, `O=other.local`), built with rcgen so
/// nothing stops it from signing identities of another trust domain, and a leaf it signed for
/// `leaf_id`. Returns the root and the leaf as rustls wants it.
fn forged(leaf_id: &SpiffeId) -> (rustls::pki_types::CertificateDer<'static>, Arc<Fixed>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(rcgen::DnType::OrganizationName, "other.local");
    ca.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://other.local".try_into().unwrap(),
    )];
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let root = ca.self_signed(&ca_key).unwrap().der().clone();
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(leaf_id.to_string().try_into().unwrap())];
    leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.use_authority_key_identifier_extension = true;
    let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap().der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let certified = CertifiedKey::from_der(vec![leaf], key, &tls::provider()).unwrap();
    (root, Arc::new(Fixed(Arc::new(certified))))
}

#[tokio::test]
async fn foreign_root_cannot_sign_our_trust_domain() {
    let local = ca("cluster.local");
    let server_id = id("cluster.local", "ns", "server");

    // A client claiming our trust domain, signed by the federated other.local root that the
    // server's bundle trusts (for other.local).
    let (foreign_root, forged_client) = forged(&id("cluster.local", "ns", "client"));
    let both = TrustBundle::from_der(vec![local.cert().clone(), foreign_root.clone()]).unwrap();
    assert_eq!(
        both.trust_domains().collect::<Vec<_>>(),
        ["cluster.local", "other.local"]
    );
    let server = manager(&local, both.clone())
        .server_config(&server_id)
        .unwrap();
    let client = tls::client_config(
        forged_client,
        &local.trust_bundle(),
        std::slice::from_ref(&server_id),
    )
    .unwrap();
    let err = server_refused(handshake(client, server.clone()).await).await;
    assert!(err.contains("UnknownIssuer"), "{err}");

    // A server claiming our trust domain, signed by the same kind of root the client trusts.
    let (foreign_root, forged_server) = forged(&server_id);
    let both = TrustBundle::from_der(vec![local.cert().clone(), foreign_root]).unwrap();
    let forged_server = tls::server_config(forged_server, &both, "cluster.local").unwrap();
    let client = manager(&local, both.clone())
        .client_config(
            &id("cluster.local", "ns", "client"),
            std::slice::from_ref(&server_id),
        )
        .unwrap();
    let (c, _) = handshake(client.clone(), forged_server).await;
    let err = c.expect_err("client must refuse").to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // Control: the genuine server passes the same client, with the same bundle.
    let genuine = manager(&local, both).server_config(&server_id).unwrap();
    let (c, s) = handshake(client, genuine).await;
    c.expect("client");
    s.expect("server");
}

#[tokio::test]
async fn federated_identity_verifies_against_its_own_roots() {
    let local = ca("cluster.local");
    let other_server = id("other.local", "ns", "server");
    let (foreign_root, foreign_server) = forged(&other_server);
    let both = TrustBundle::from_der(vec![local.cert().clone(), foreign_root]).unwrap();
    // The client expects the other.local server explicitly: its root vouches for it.
    let server = tls::server_config(
        foreign_server,
        &TrustBundle::from_der(vec![local.cert().clone()]).unwrap(),
        "cluster.local",
    )
    .unwrap();
    let client = manager(&local, both.clone())
        .client_config(&id("cluster.local", "ns", "client"), &[other_server])
        .unwrap();
    let (c, s) = handshake(client, server).await;
    let c = c.expect("client accepts the federated server");
    s.expect("server");
    assert_eq!(
        peer_identity(c.get_ref().1.peer_certificates().unwrap()).unwrap(),
        id("other.local", "ns", "server")
    );

    // A bundle without any root for our own trust domain cannot make a server config.
    let (only_foreign, _) = forged(&id("other.local", "ns", "x"));
    let foreign_bundle = TrustBundle::from_der(vec![only_foreign]).unwrap();
    assert!(matches!(
        tls::server_config(
            StaticCert::new(&local.issue(&id("cluster.local", "ns", "s"), TTL).unwrap()),
            &foreign_bundle,
            "cluster.local"
        ),
        Err(certs::Error::NoTrustAnchor { .. })
    ));
}
