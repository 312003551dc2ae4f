//! Reading and writing PEM files. Writes are atomic (temp file + rename in the same directory)
//! and create key files 0600 from the start, so a key is never briefly world-readable and a
//! reader never sees half a file.

use std::fmt::Display;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Problem};

/// Mode for private keys.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode for certificates (public).
pub(crate) const CERT_MODE: u32 = 0o644;

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|e| Problem::Io(e).in_file(path.display()))
}

/// All `CERTIFICATE` blocks, in order; at least one.
pub(crate) fn certs_from_pem(
    pem: &[u8],
    source: impl Display,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_problem(e, "CERTIFICATE").in_file(&source))?;
    if certs.is_empty() {
        return Err(Problem::Missing("CERTIFICATE").in_file(source));
    }
    Ok(certs)
}

/// The first private key block (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn key_from_pem(
    pem: &[u8],
    source: impl Display,
) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_problem(e, "PRIVATE KEY").in_file(source))
}

fn pem_problem(e: pem::Error, kind: &'static str) -> Problem {
    match e {
        pem::Error::NoItemsFound => Problem::Missing(kind),
        other => Problem::Pem(other.to_string()),
    }
}

pub(crate) fn encode_certs(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<_> = certs
        .iter()
        .map(|c| ::pem::Pem::new("CERTIFICATE", c.as_ref()))
        .collect();
    ::pem::encode_many(&blocks)
}

pub(crate) fn encode_key(key: &PrivateKeyDer<'_>) -> String {
    let tag = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        // Pkcs8 and any future variant: PKCS#8 is the generic wrapper.
        _ => "PRIVATE KEY",
    };
    ::pem::encode(&::pem::Pem::new(tag, key.secret_der()))
}

/// Writes `contents` to `path` atomically with `mode`.
pub(crate) fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let io = |e| Problem::Io(e).in_file(path.display());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("not a file path")))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` only applies when the file is created; a stale temp file keeps its old mode.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}
