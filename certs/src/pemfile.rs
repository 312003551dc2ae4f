//! Reading and writing PEM files. Writes are atomic (temp file + rename in the same directory)
//! and create key files 0600 from the start, so a key is never briefly world-readable and a
//! reader never sees half a file.

use std::fmt::Display;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
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
///
/// The temporary file gets an unpredictable name and is created with `O_EXCL` (tempfile's
/// `NamedTempFile`), so a symlink planted in the directory cannot redirect the write; its mode is
/// set before anything is written, and it is renamed over `path` only once complete and synced.
pub(crate) fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let io = |e| Problem::Io(e).in_file(path.display());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if path.file_name().is_none() {
        return Err(io(std::io::Error::other("not a file path")));
    }
    // Created 0600 by tempfile; a certificate is then opened up to `mode`, still before writing.
    let mut tmp = tempfile::Builder::new()
        .prefix(".certs-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io)?;
    tmp.write_all(contents).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    // On failure the temporary file is removed when the returned error's file handle drops.
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, symlink};

    use super::*;

    #[test]
    fn planted_symlinks_are_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").expect("write victim");
        // The names the old implementation used, and a symlink at the target itself.
        let target = dir.path().join("key.pem");
        for name in [
            format!(".key.pem.tmp.{}", std::process::id()),
            ".certs-key.tmp".to_owned(),
        ] {
            symlink(&victim, dir.path().join(name)).expect("plant symlink");
        }
        write(&target, b"secret key", KEY_MODE).expect("write");
        assert_eq!(fs::read(&victim).expect("victim"), b"precious");
        assert_eq!(fs::read(&target).expect("target"), b"secret key");
        let meta = fs::symlink_metadata(&target).expect("meta");
        assert!(meta.file_type().is_file(), "target must be a regular file");
        assert_eq!(meta.mode() & 0o777, KEY_MODE);

        // A symlink at the target is replaced, not written through.
        let linked = dir.path().join("cert.pem");
        symlink(&victim, &linked).expect("symlink");
        write(&linked, b"cert", CERT_MODE).expect("write");
        assert_eq!(fs::read(&victim).expect("victim"), b"precious");
        assert_eq!(
            fs::symlink_metadata(&linked).expect("meta").mode() & 0o777,
            CERT_MODE
        );
        // Only the two written files, the victim and the planted links remain: no temp files.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && !n.starts_with(".certs-key"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
