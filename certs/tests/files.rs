//! Bad input files: every error names the file and says what is wrong with it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use certs::{CertificateAuthority, SpiffeId, TrustBundle, WorkloadCert};

struct Fixture {
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        ca.write(&dir.path().join("ca")).unwrap();
        let good = ca.issue(&id(), Duration::from_secs(600)).unwrap();
        good.write(dir.path()).unwrap();
        Fixture { dir, ca }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    fn chain(&self) -> PathBuf {
        self.path("cert-chain.pem")
    }

    fn key(&self) -> PathBuf {
        self.path("key.pem")
    }
}

fn id() -> SpiffeId {
    SpiffeId::new("cluster.local", "ns", "sa")
}

/// The error must name `file` and contain `problem`.
fn check<T>(result: Result<T, certs::Error>, file: &Path, problem: &str) {
    let msg = match result {
        Ok(_) => panic!("{} accepted; expected {problem:?}", file.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(&file.display().to_string()),
        "{msg:?} does not name {}",
        file.display()
    );
    assert!(msg.contains(problem), "{msg:?} lacks {problem:?}");
}

const GARBLED_PEM: &str = "-----BEGIN CERTIFICATE-----\nnot*base64!\n-----END CERTIFICATE-----\n";
const GARBLED_DER: &str = "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n";
const GARBLED_KEY: &str = "-----BEGIN PRIVATE KEY-----\nAAECAwQF\n-----END PRIVATE KEY-----\n";

#[test]
fn workload_cert_files() {
    let f = Fixture::new();
    WorkloadCert::load(&f.chain(), &f.key()).expect("the good pair loads");

    let missing = f.path("nope.pem");
    check(
        WorkloadCert::load(&missing, &f.key()),
        &missing,
        "No such file",
    );
    check(
        WorkloadCert::load(&f.chain(), &missing),
        &missing,
        "No such file",
    );
    // A directory cannot be read as a file (chmod 000 would not stop root).
    let dir = f.path("ca");
    check(WorkloadCert::load(&dir, &f.key()), &dir, "directory");

    let empty = f.write("empty.pem", "");
    check(
        WorkloadCert::load(&empty, &f.key()),
        &empty,
        "no PEM CERTIFICATE block",
    );
    check(
        WorkloadCert::load(&f.chain(), &empty),
        &empty,
        "no PEM PRIVATE KEY block",
    );
    let text = f.write("text.pem", "hello, not PEM at all\n");
    check(
        WorkloadCert::load(&text, &f.key()),
        &text,
        "no PEM CERTIFICATE block",
    );
    let pem = f.write("garbled-pem.pem", GARBLED_PEM);
    check(WorkloadCert::load(&pem, &f.key()), &pem, "malformed PEM");
    let der = f.write("garbled-der.pem", GARBLED_DER);
    check(
        WorkloadCert::load(&der, &f.key()),
        &der,
        "malformed certificate",
    );
    let key = f.write("garbled-key.pem", GARBLED_KEY);
    check(
        WorkloadCert::load(&f.chain(), &key),
        &key,
        "unusable private key",
    );

    // A valid key that belongs to another certificate.
    let other = f.ca.issue(&id(), Duration::from_secs(600)).unwrap();
    let other_dir = f.path("other");
    std::fs::create_dir(&other_dir).unwrap();
    other.write(&other_dir).unwrap();
    let other_key = other_dir.join("key.pem");
    check(
        WorkloadCert::load(&f.chain(), &other_key),
        &other_key,
        "does not match",
    );
}

#[test]
fn expired_and_not_yet_valid() {
    let f = Fixture::new();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    for (name, from, to, problem) in [
        ("expired", now - 2 * hour, now - hour, "expired at"),
        ("future", now + hour, now + 2 * hour, "not valid before"),
    ] {
        let cert = f.ca.issue_with_validity(&id(), from, to).unwrap();
        let dir = f.path(name);
        std::fs::create_dir(&dir).unwrap();
        cert.write(&dir).unwrap();
        let chain = dir.join("cert-chain.pem");
        check(
            WorkloadCert::load(&chain, &dir.join("key.pem")),
            &chain,
            problem,
        );
    }
}

#[test]
fn certificate_without_spiffe_id() {
    let f = Fixture::new();
    for (name, sans) in [
        (
            "dns-only",
            vec![rcgen::SanType::DnsName("sleep.default".try_into().unwrap())],
        ),
        (
            "http-uri",
            vec![rcgen::SanType::URI(
                "https://example.com/x".try_into().unwrap(),
            )],
        ),
    ] {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        let cert = params.self_signed(&key).unwrap();
        let chain = f.write(&format!("{name}.pem"), cert.pem());
        let key_file = f.write(&format!("{name}-key.pem"), key.serialize_pem());
        check(
            WorkloadCert::load(&chain, &key_file),
            &chain,
            "no SPIFFE identity",
        );
    }
}

#[test]
fn foreign_trust_domain_and_untrusted_chain() {
    let f = Fixture::new();
    let foreign = CertificateAuthority::generate("other.local").unwrap();
    let dir = f.path("foreign");
    std::fs::create_dir(&dir).unwrap();
    foreign
        .issue(
            &SpiffeId::new("other.local", "ns", "sa"),
            Duration::from_secs(600),
        )
        .unwrap()
        .write(&dir)
        .unwrap();
    let chain = dir.join("cert-chain.pem");
    let key = dir.join("key.pem");
    // The bundle trusts the foreign root, so only the trust domain is wrong.
    let both = TrustBundle::from_der(vec![f.ca.cert().clone(), foreign.cert().clone()]).unwrap();
    check(
        WorkloadCert::load_verified(&chain, &key, &both),
        &chain,
        "trust domain \"other.local\" is not \"cluster.local\"",
    );
    check(
        WorkloadCert::load_verified(&chain, &key, &f.ca.trust_bundle()),
        &chain,
        "does not verify against the trust bundle",
    );
    WorkloadCert::load_verified(&f.chain(), &f.key(), &both).expect("local cert passes");
}

#[test]
fn ca_files() {
    let f = Fixture::new();
    let cert = f.path("ca/ca-cert.pem");
    let key = f.path("ca/ca-key.pem");
    CertificateAuthority::load(&cert, &key).expect("the good CA loads");

    let missing = f.path("ca/missing.pem");
    check(
        CertificateAuthority::load(&missing, &key),
        &missing,
        "No such file",
    );
    check(
        CertificateAuthority::load(&cert, &missing),
        &missing,
        "No such file",
    );
    let pem = f.write("garbled.pem", GARBLED_PEM);
    check(
        CertificateAuthority::load(&pem, &key),
        &pem,
        "malformed PEM",
    );
    let der = f.write("garbled-der.pem", GARBLED_DER);
    check(
        CertificateAuthority::load(&der, &key),
        &der,
        "malformed certificate",
    );
    let bad_key = f.write("garbled-key.pem", GARBLED_KEY);
    check(
        CertificateAuthority::load(&cert, &bad_key),
        &bad_key,
        "private key",
    );
    // A workload certificate is not a CA.
    check(
        CertificateAuthority::load(&f.chain(), &f.key()),
        &f.chain(),
        "not a CA",
    );
    // Another CA's key.
    let other = CertificateAuthority::generate("cluster.local").unwrap();
    other.write(&f.path("other-ca")).unwrap();
    let other_key = f.path("other-ca/ca-key.pem");
    check(
        CertificateAuthority::load(&cert, &other_key),
        &other_key,
        "does not match",
    );

    // An expired CA.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let old = f.write("old-ca.pem", params.self_signed(&ca_key).unwrap().pem());
    let old_key = f.write("old-ca-key.pem", ca_key.serialize_pem());
    check(
        CertificateAuthority::load(&old, &old_key),
        &old,
        "expired at 2001-01-01",
    );
}

#[test]
fn bundle_files() {
    let f = Fixture::new();
    let missing = f.path("missing-root.pem");
    check(TrustBundle::load(&missing), &missing, "No such file");
    let empty = f.write("empty-root.pem", "");
    check(
        TrustBundle::load(&empty),
        &empty,
        "no PEM CERTIFICATE block",
    );
    let der = f.write("garbled-root.pem", GARBLED_DER);
    check(TrustBundle::load(&der), &der, "malformed certificate");
    // A garbled root after a good one is reported, not skipped.
    let good = std::fs::read_to_string(f.path("ca/root-cert.pem")).unwrap();
    let mixed = f.write("mixed-root.pem", format!("{good}{GARBLED_DER}"));
    check(TrustBundle::load(&mixed), &mixed, "malformed certificate");
    // A root that names no trust domain.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let anon = f.write("anon-root.pem", params.self_signed(&key).unwrap().pem());
    check(TrustBundle::load(&anon), &anon, "no trust domain");
}
