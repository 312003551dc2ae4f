//! Workload identities: one certificate per served identity (pod namespace + service account),
//! minted in-process through [`certs::IdentityManager`] from the mesh CA and renewed by it at
//! half-life.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use certs::{CertificateAuthority, IdentityManager, SpiffeId, TrustBundle};
use tracing::{info, warn};

/// Why the identity source could not be set up. (Sources are boxed: certs errors are large.)
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("loading the CA from {dir}: {source}")]
    Ca {
        dir: PathBuf,
        #[source]
        source: Box<certs::Error>,
    },
    #[error("loading the trust bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: Box<certs::Error>,
    },
    #[error("generating a throw-away CA: {0}")]
    Generate(#[source] Box<certs::Error>),
    #[error("certificate for {id}: {source}")]
    Issue {
        id: SpiffeId,
        #[source]
        source: Box<certs::Error>,
    },
}

/// The certificates of the identities this ztunnel serves. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Identities {
    manager: IdentityManager,
    served: Arc<Mutex<BTreeSet<SpiffeId>>>,
}

impl Identities {
    /// The CA in `ca_dir` (`ca-cert.pem`, `ca-key.pem`; `root-cert.pem` as the trust bundle if
    /// present, e.g. during a CA rotation), or a throw-away CA for `trust_domain` when `None`.
    pub fn load(
        ca_dir: Option<&Path>,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<Self, IdentityError> {
        let (ca, bundle) = match ca_dir {
            Some(dir) => {
                let ca =
                    CertificateAuthority::load_dir(dir).map_err(|source| IdentityError::Ca {
                        dir: dir.to_owned(),
                        source: Box::new(source),
                    })?;
                let root = dir.join(certs::ROOT_CERT_FILE);
                let bundle = if root.is_file() {
                    TrustBundle::load(&root).map_err(|source| IdentityError::Bundle {
                        path: root,
                        source: Box::new(source),
                    })?
                } else {
                    ca.trust_bundle()
                };
                (ca, bundle)
            }
            None => {
                warn!(
                    trust_domain,
                    "no --ca-dir: using a throw-away CA; other nodes will not trust this one"
                );
                let ca = CertificateAuthority::generate(trust_domain)
                    .map_err(|e| IdentityError::Generate(Box::new(e)))?;
                let bundle = ca.trust_bundle();
                (ca, bundle)
            }
        };
        if ca.trust_domain() != trust_domain {
            warn!(
                ca = ca.trust_domain(),
                mesh = trust_domain,
                "the CA's trust domain differs from the mesh's; peers will be refused"
            );
        }
        info!(trust_domain = ca.trust_domain(), "workload CA ready");
        Ok(Identities {
            manager: IdentityManager::new(Arc::new(ca), bundle, ttl),
            served: Arc::default(),
        })
    }

    pub fn manager(&self) -> &IdentityManager {
        &self.manager
    }

    /// Mints (or finds) the certificate of `id` and records it as served.
    pub async fn ensure(&self, id: &SpiffeId) -> Result<(), IdentityError> {
        self.manager
            .fetch(id)
            .await
            .map_err(|source| IdentityError::Issue {
                id: id.clone(),
                source: Box::new(source),
            })?;
        self.lock().insert(id.clone());
        Ok(())
    }

    /// Identities minted so far (for the config dump).
    pub fn served(&self) -> Vec<String> {
        self.lock().iter().map(ToString::to_string).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<SpiffeId>> {
        // The set is plain data; a panic elsewhere while holding the lock cannot corrupt it.
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The certs crate's form of a mesh identity.
pub fn spiffe(id: &mesh_config::Identity) -> SpiffeId {
    SpiffeId::new(&id.trust_domain, &id.namespace, &id.service_account)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loads_a_ca_dir_and_mints_per_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("cluster.local").expect("ca");
        ca.write(dir.path()).expect("write ca");
        let ids = Identities::load(Some(dir.path()), "cluster.local", Duration::from_secs(3600))
            .expect("load");
        let a = spiffe(&mesh_config::Identity::new(
            "cluster.local",
            "default",
            "sleep",
        ));
        let b = spiffe(&mesh_config::Identity::new("cluster.local", "web", "web"));
        ids.ensure(&a).await.expect("mint a");
        ids.ensure(&b).await.expect("mint b");
        ids.ensure(&a).await.expect("a again");
        assert_eq!(
            ids.served(),
            vec![
                "spiffe://cluster.local/ns/default/sa/sleep".to_owned(),
                "spiffe://cluster.local/ns/web/sa/web".to_owned()
            ]
        );
        let cert = ids.manager().fetch(&a).await.expect("fetch");
        assert_eq!(certs::identity_of(cert.leaf()).expect("identity"), a);
    }

    #[test]
    fn missing_ca_dir_is_a_clear_error() {
        let err = Identities::load(
            Some(Path::new("/nonexistent/ca")),
            "cluster.local",
            Duration::from_secs(60),
        )
        .expect_err("no CA there");
        assert!(err.to_string().contains("/nonexistent/ca"), "{err}");
    }
}
