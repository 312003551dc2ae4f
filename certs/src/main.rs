//! `certs`: create a mesh root CA and issue workload certificates from it.
//!
//! ```text
//! certs init  --trust-domain cluster.local --out ca/
//! certs issue --namespace default --service-account sleep --ca-dir ca/ --ttl 24h --out sleep/
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use certs::{CA_KEY_FILE, CertificateAuthority, ROOT_CERT_FILE, SpiffeId, TrustBundle};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "certs",
    version,
    about = "Mesh CA and workload certificates (Istio file layout)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a root CA: ca-cert.pem, ca-key.pem (0600), root-cert.pem.
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Replace an existing CA key in --out.
        #[arg(long)]
        force: bool,
    },
    /// Issue a workload certificate: cert-chain.pem, key.pem (0600), root-cert.pem.
    Issue {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// Directory holding ca-cert.pem and ca-key.pem (and optionally root-cert.pem, the
        /// bundle to hand out, e.g. old + new root during a rotation).
        #[arg(long, default_value = ".")]
        ca_dir: PathBuf,
        /// Lifetime, e.g. 24h, 90m, 1h30m, 45s.
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: Duration,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Init {
            trust_domain,
            out,
            force,
        } => init(&trust_domain, &out, force),
        Cmd::Issue {
            namespace,
            service_account,
            ca_dir,
            ttl,
            out,
        } => issue(&namespace, &service_account, &ca_dir, ttl, &out),
    }
}

fn init(trust_domain: &str, out: &Path, force: bool) -> anyhow::Result<()> {
    let key = out.join(CA_KEY_FILE);
    if key.exists() && !force {
        bail!(
            "{}: a CA key already exists (use --force to replace it)",
            key.display()
        );
    }
    let ca = CertificateAuthority::generate(trust_domain)?;
    ca.write(out)?;
    println!(
        "root CA for trust domain {trust_domain} written to {}",
        out.display()
    );
    Ok(())
}

fn issue(ns: &str, sa: &str, ca_dir: &Path, ttl: Duration, out: &Path) -> anyhow::Result<()> {
    let ca = CertificateAuthority::load_dir(ca_dir)?;
    let id = SpiffeId::try_new(ca.trust_domain(), ns, sa)?;
    let bundle = bundle_for(&ca, ca_dir)?;
    let cert = ca.issue(&id, ttl)?;
    // Refuse to hand out a certificate the bundle we write next to it would not accept.
    cert.verify(&bundle)
        .context("issued certificate does not verify against the bundle")?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    cert.write(out)?;
    bundle.write(&out.join(ROOT_CERT_FILE))?;
    println!(
        "{id} written to {} (expires in {}s)",
        out.display(),
        ttl.as_secs()
    );
    Ok(())
}

/// `<ca-dir>/root-cert.pem` if present (it may hold several roots), else the CA certificate.
fn bundle_for(ca: &CertificateAuthority, ca_dir: &Path) -> anyhow::Result<TrustBundle> {
    let path = ca_dir.join(ROOT_CERT_FILE);
    if !path.exists() {
        return Ok(ca.trust_bundle());
    }
    let bundle = TrustBundle::load(&path)?;
    if bundle.trust_domain() != ca.trust_domain() {
        bail!(
            "{}: trust domain {:?} is not the CA's {:?}",
            path.display(),
            bundle.trust_domain(),
            ca.trust_domain()
        );
    }
    // An intermediate CA is not in the bundle; `issue` verifies what it hands out instead.
    if ca.is_root() && !bundle.roots().contains(ca.cert()) {
        bail!("{}: does not contain the CA certificate", path.display());
    }
    Ok(bundle)
}

/// Go-style durations as Istio takes them: one or more `<n><unit>`, units ms, s, m, h, d.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    let mut millis: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{s:?}: expected a number"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("{s:?}: missing unit (ms, s, m, h, d)")),
            u => return Err(format!("{s:?}: unknown unit {u:?} (ms, s, m, h, d)")),
        };
        rest = &rest[unit_len..];
        millis = n
            .checked_mul(unit)
            .and_then(|v| millis.checked_add(v))
            .ok_or_else(|| format!("{s:?}: too long"))?;
    }
    if millis == 0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl() {
        let h = 3600;
        for (input, secs) in [
            ("24h", 24 * h),
            ("90m", 90 * 60),
            ("1h30m", h + 30 * 60),
            ("45s", 45),
            ("2d", 48 * h),
        ] {
            assert_eq!(parse_ttl(input), Ok(Duration::from_secs(secs)), "{input}");
        }
        assert_eq!(parse_ttl("1500ms"), Ok(Duration::from_millis(1500)));
        for bad in [
            "",
            "24",
            "h",
            "0s",
            "1x",
            "1.5h",
            "-1h",
            "99999999999999999999h",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} accepted");
        }
    }
}
