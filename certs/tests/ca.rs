//! The CA: round trip through files, and the shape of what it issues.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use certs::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, CertificateAuthority, Error, KEY_FILE,
    ROOT_CERT_FILE, SpiffeId, TrustBundle, WorkloadCert, identity_of,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::{FromDer, X509Certificate};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn generate_write_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let out = dir.path().join("ca"); // created by write
    ca.write(&out).unwrap();
    assert_eq!(mode(&out.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&out.join(CA_CERT_FILE)), 0o644);

    let loaded = CertificateAuthority::load_dir(&out).unwrap();
    assert_eq!(loaded.trust_domain(), "cluster.local");
    assert_eq!(loaded.cert(), ca.cert());
    let bundle = TrustBundle::load(&out.join(ROOT_CERT_FILE)).unwrap();
    assert_eq!(bundle.roots(), [ca.cert().clone()]);
    assert_eq!(bundle.trust_domain(), "cluster.local");

    // The loaded CA signs certificates the original bundle accepts, and vice versa.
    let id = SpiffeId::new("cluster.local", "default", "sleep");
    loaded
        .issue(&id, Duration::from_secs(60))
        .unwrap()
        .verify(&ca.trust_bundle())
        .unwrap();
    ca.issue(&id, Duration::from_secs(60))
        .unwrap()
        .verify(&bundle)
        .unwrap();
    // A different CA's bundle does not.
    let other = CertificateAuthority::generate("cluster.local").unwrap();
    let err = loaded
        .issue(&id, Duration::from_secs(60))
        .unwrap()
        .verify(&other.trust_bundle())
        .unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
}

#[test]
fn issued_certificate_has_exactly_the_spiffe_uri_san() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let id = SpiffeId::new("cluster.local", "ns1", "sa1");
    let ttl = Duration::from_secs(24 * 3600);
    let before = SystemTime::now();
    let cert = ca.issue(&id, ttl).unwrap();
    assert_eq!(cert.id, id);
    assert_eq!(cert.chain.len(), 1);
    assert_eq!(identity_of(cert.leaf()).unwrap(), id);

    let (_, x) = X509Certificate::from_der(cert.leaf()).unwrap();
    assert!(x.subject().iter().next().is_none(), "empty subject");
    let san = x.subject_alternative_name().unwrap().expect("SAN");
    assert!(san.critical, "SAN must be critical with an empty subject");
    assert_eq!(
        san.value.general_names,
        [GeneralName::URI("spiffe://cluster.local/ns/ns1/sa/sa1")]
    );
    let ku = x.key_usage().unwrap().expect("key usage").value;
    assert!(ku.digital_signature() && ku.key_encipherment());
    assert!(!ku.key_cert_sign());
    let eku = x.extended_key_usage().unwrap().expect("EKU").value;
    assert!(eku.server_auth && eku.client_auth);
    let bc = x
        .basic_constraints()
        .unwrap()
        .expect("basic constraints")
        .value;
    assert!(!bc.ca);
    // ECDSA P-256.
    let alg = &x.public_key().algorithm;
    assert_eq!(alg.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
    let curve = alg.parameters.as_ref().unwrap().as_oid().unwrap();
    assert_eq!(curve, OID_EC_P256);
    // Issued by the CA.
    let (_, root) = X509Certificate::from_der(ca.cert()).unwrap();
    assert_eq!(x.issuer(), root.subject());
    assert!(x.extensions().iter().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));
    // Lifetime: the TTL from now (whole seconds), starting a little earlier for clock skew.
    let lifetime = cert.not_after.duration_since(before).unwrap();
    assert!(
        lifetime > ttl - Duration::from_secs(2) && lifetime <= ttl,
        "{lifetime:?}"
    );
    assert!(cert.not_before <= before);
}

#[test]
fn refuses_ids_it_cannot_vouch_for() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let err = ca
        .issue(
            &SpiffeId::new("other.local", "ns", "sa"),
            Duration::from_secs(60),
        )
        .unwrap_err();
    assert!(matches!(err, Error::ForeignTrustDomain { .. }), "{err}");
    let err = ca
        .issue(
            &SpiffeId::new("cluster.local", "a/b", "sa"),
            Duration::from_secs(60),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidSpiffeId { .. }), "{err}");
    assert!(CertificateAuthority::generate("Bad Domain").is_err());
}

#[test]
fn workload_files_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let id = SpiffeId::new("cluster.local", "default", "sleep");
    let cert = ca.issue(&id, Duration::from_secs(600)).unwrap();
    cert.write(dir.path()).unwrap();
    assert_eq!(mode(&dir.path().join(KEY_FILE)), 0o600);
    let loaded = WorkloadCert::load_verified(
        &dir.path().join(CERT_CHAIN_FILE),
        &dir.path().join(KEY_FILE),
        &ca.trust_bundle(),
    )
    .unwrap();
    assert_eq!(loaded.id, id);
    assert_eq!(loaded.chain, cert.chain);
    assert_eq!(loaded.not_after, cert.not_after);
}

#[test]
fn bundle_with_several_roots_trusts_each() {
    let old = CertificateAuthority::generate("cluster.local").unwrap();
    let new = CertificateAuthority::generate("cluster.local").unwrap();
    let pem = format!(
        "{}{}",
        old.trust_bundle().to_pem(),
        new.trust_bundle().to_pem()
    );
    let bundle = TrustBundle::from_pem(pem.as_bytes(), "root-cert.pem").unwrap();
    assert_eq!(bundle.roots().len(), 2);
    let id = SpiffeId::new("cluster.local", "ns", "sa");
    for ca in [&old, &new] {
        ca.issue(&id, Duration::from_secs(60))
            .unwrap()
            .verify(&bundle)
            .unwrap();
    }
}

/// Istio's plugged-in CA layout with an intermediate: ca-cert.pem (intermediate), ca-key.pem,
/// cert-chain.pem (intermediate, root), root-cert.pem (root).
#[test]
fn intermediate_ca_puts_its_chain_into_issued_certificates() {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::default();
    root.distinguished_name = rcgen::DistinguishedName::new();
    root.distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "Root CA");
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let root_pem = root.self_signed(&root_key).unwrap().pem();
    let root_issuer = rcgen::Issuer::new(root, root_key);

    let mid_key = rcgen::KeyPair::generate().unwrap();
    let mut mid = rcgen::CertificateParams::default();
    mid.distinguished_name = rcgen::DistinguishedName::new();
    mid.distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    mid.distinguished_name
        .push(rcgen::DnType::CommonName, "Intermediate CA");
    mid.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local".try_into().unwrap(),
    )];
    mid.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    mid.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let mid_pem = mid.signed_by(&mid_key, &root_issuer).unwrap().pem();

    let id = SpiffeId::new("cluster.local", "ns", "sa");
    let roots = TrustBundle::from_pem(root_pem.as_bytes(), "root-cert.pem").unwrap();
    for layout in ["cert-chain.pem", "ca-cert.pem with chain"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("ca-key.pem"), mid_key.serialize_pem()).unwrap();
        std::fs::write(d.join("root-cert.pem"), &root_pem).unwrap();
        if layout == "cert-chain.pem" {
            std::fs::write(d.join("ca-cert.pem"), &mid_pem).unwrap();
            std::fs::write(d.join("cert-chain.pem"), format!("{mid_pem}{root_pem}")).unwrap();
        } else {
            std::fs::write(d.join("ca-cert.pem"), format!("{mid_pem}{root_pem}")).unwrap();
        }
        let ca = CertificateAuthority::load_dir(d).unwrap();
        assert!(!ca.is_root(), "{layout}");
        // The intermediate, without the self-signed root.
        assert_eq!(ca.chain(), std::slice::from_ref(ca.cert()), "{layout}");
        let cert = ca.issue(&id, Duration::from_secs(60)).unwrap();
        assert_eq!(cert.chain.len(), 2, "{layout}");
        assert_eq!(&cert.chain[1], ca.cert(), "{layout}");
        // Peers that trust only the root accept it; without the intermediate they could not.
        cert.verify(&roots).unwrap();
        let mut bare = cert.clone();
        bare.chain.truncate(1);
        assert!(bare.verify(&roots).is_err(), "{layout}");
    }

    // A cert-chain.pem that does not start with the CA certificate (e.g. a workload's) is not
    // taken as the CA's chain.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("ca-key.pem"), mid_key.serialize_pem()).unwrap();
    std::fs::write(d.join("ca-cert.pem"), &mid_pem).unwrap();
    std::fs::write(d.join("cert-chain.pem"), &root_pem).unwrap();
    let ca = CertificateAuthority::load_dir(d).unwrap();
    assert_eq!(ca.chain(), std::slice::from_ref(ca.cert()));

    // A self-signed CA issues bare leaves, as before.
    let root_ca = CertificateAuthority::generate("cluster.local").unwrap();
    assert!(root_ca.is_root());
    assert_eq!(
        root_ca
            .issue(&id, Duration::from_secs(60))
            .unwrap()
            .chain
            .len(),
        1
    );
}
