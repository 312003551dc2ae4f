//! The `certs` binary, run as a user would.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use certs::{SpiffeId, TrustBundle, WorkloadCert};

fn certs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_certs"))
        .args(args)
        .output()
        .expect("run certs")
}

fn ok(args: &[&str]) -> String {
    let out = certs(args);
    assert!(
        out.status.success(),
        "certs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let out = certs(args);
    assert!(!out.status.success(), "certs {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn init_then_issue() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let out = tmp.path().join("sleep");
    ok(&["init", "--trust-domain", "example.org", "--out", s(&ca)]);
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
    assert!(ca.join("ca-cert.pem").is_file());
    assert!(ca.join("root-cert.pem").is_file());

    // A second init must not silently replace the CA key.
    let key_before = std::fs::read(ca.join("ca-key.pem")).unwrap();
    let err = fails(&["init", "--trust-domain", "example.org", "--out", s(&ca)]);
    assert!(err.contains(s(&ca.join("ca-key.pem"))), "{err}");
    assert_eq!(std::fs::read(ca.join("ca-key.pem")).unwrap(), key_before);

    let stdout = ok(&[
        "issue",
        "--namespace",
        "default",
        "--service-account",
        "sleep",
        "--ca-dir",
        s(&ca),
        "--out",
        s(&out),
    ]);
    assert!(
        stdout.contains("spiffe://example.org/ns/default/sa/sleep"),
        "{stdout}"
    );
    assert_eq!(mode(&out.join("key.pem")), 0o600);
    let bundle = TrustBundle::load(&out.join("root-cert.pem")).unwrap();
    let cert =
        WorkloadCert::load_verified(&out.join("cert-chain.pem"), &out.join("key.pem"), &bundle)
            .unwrap();
    // The trust domain comes from the CA.
    assert_eq!(cert.id, SpiffeId::new("example.org", "default", "sleep"));
    let left = cert.not_after.duration_since(SystemTime::now()).unwrap();
    let day = Duration::from_secs(24 * 3600);
    assert!(
        left <= day && left > day - Duration::from_secs(60),
        "default TTL 24h: {left:?}"
    );

    // --ttl
    ok(&[
        "issue",
        "--namespace",
        "ns",
        "--service-account",
        "sa",
        "--ca-dir",
        s(&ca),
        "--ttl",
        "1h30m",
        "--out",
        s(&out),
    ]);
    let cert = WorkloadCert::load(&out.join("cert-chain.pem"), &out.join("key.pem")).unwrap();
    assert_eq!(cert.id, SpiffeId::new("example.org", "ns", "sa"));
    let left = cert.not_after.duration_since(SystemTime::now()).unwrap();
    let want = Duration::from_secs(90 * 60);
    assert!(
        left <= want && left > want - Duration::from_secs(60),
        "{left:?}"
    );
}

#[test]
fn bad_input_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let out = tmp.path().join("out");

    // No CA yet: the missing file is named.
    let err = fails(&[
        "issue",
        "--namespace",
        "ns",
        "--service-account",
        "sa",
        "--ca-dir",
        s(&ca),
        "--out",
        s(&out),
    ]);
    assert!(err.contains(s(&ca.join("ca-cert.pem"))), "{err}");
    assert!(!out.exists(), "nothing written on failure");

    let err = fails(&["init", "--trust-domain", "Not A Domain", "--out", s(&ca)]);
    assert!(err.contains("trust domain"), "{err}");

    ok(&["init", "--trust-domain", "cluster.local", "--out", s(&ca)]);
    let err = fails(&[
        "issue",
        "--namespace",
        "a/b",
        "--service-account",
        "sa",
        "--ca-dir",
        s(&ca),
    ]);
    assert!(err.contains("namespace"), "{err}");
    let err = fails(&[
        "issue",
        "--namespace",
        "ns",
        "--service-account",
        "sa",
        "--ca-dir",
        s(&ca),
        "--ttl",
        "soon",
    ]);
    assert!(err.contains("soon"), "{err}");

    // A garbled CA key.
    std::fs::write(ca.join("ca-key.pem"), "garbage").unwrap();
    let err = fails(&[
        "issue",
        "--namespace",
        "ns",
        "--service-account",
        "sa",
        "--ca-dir",
        s(&ca),
        "--out",
        s(&out),
    ]);
    assert!(err.contains(s(&ca.join("ca-key.pem"))), "{err}");
}
