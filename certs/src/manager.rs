//! Certificates per identity, minted in-process by the CA and renewed at half life.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use tracing::{debug, info, warn};

use crate::cert::fmt_time;
use crate::{CertificateAuthority, Error, SpiffeId, TrustBundle, WorkloadCert, tls};

/// Shortest certificate lifetime: X.509 times have one-second resolution, so anything shorter
/// would expire before its half-life renewal.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// Holds a certificate per identity, minted through the CA on first use and renewed at half
/// its lifetime by a background task on the current tokio runtime. Clone-able handle.
///
/// Without a tokio runtime at first use, renewal happens lazily instead: the first lookup past
/// half life re-issues inline.
#[derive(Clone)]
pub struct IdentityManager {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<CertificateAuthority>,
    bundle: TrustBundle,
    ttl: Duration,
    slots: Mutex<HashMap<SpiffeId, Arc<Slot>>>,
}

impl fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityManager")
            .field("trust_domain", &self.trust_domain())
            .field("ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

impl IdentityManager {
    /// `bundle` is what peers are verified against; during a CA rotation it holds both roots.
    /// `ttl` is raised to [`MIN_TTL`] if shorter.
    pub fn new(ca: Arc<CertificateAuthority>, bundle: TrustBundle, ttl: Duration) -> Self {
        if ttl < MIN_TTL {
            warn!(?ttl, min = ?MIN_TTL, "certificate TTL too short; raised");
        }
        let ttl = ttl.max(MIN_TTL);
        if bundle.trust_domain() != ca.trust_domain() {
            warn!(
                ca = ca.trust_domain(),
                bundle = bundle.trust_domain(),
                "CA and trust bundle name different trust domains"
            );
        }
        if !bundle.roots().contains(ca.cert()) {
            warn!(
                "trust bundle does not contain the CA certificate: peers using it will refuse ours"
            );
        }
        IdentityManager {
            inner: Arc::new(Inner {
                ca,
                bundle,
                ttl,
                slots: Mutex::default(),
            }),
        }
    }

    pub fn trust_bundle(&self) -> TrustBundle {
        self.inner.bundle.clone()
    }

    /// The trust domain our identities live in (the CA's).
    pub fn trust_domain(&self) -> &str {
        self.inner.ca.trust_domain()
    }

    /// The current certificate for `id`, minted on first use.
    pub async fn fetch(&self, id: &SpiffeId) -> Result<WorkloadCert, Error> {
        Ok(WorkloadCert::clone(&self.slot(id)?.current()))
    }

    /// See [`tls::server_config`]; the certificate is `local`'s, looked up per handshake.
    pub fn server_config(&self, local: &SpiffeId) -> Result<Arc<ServerConfig>, Error> {
        let slot = self.slot(local)?;
        tls::server_config(
            Arc::new(Rotating(slot)),
            &self.inner.bundle,
            &local.trust_domain,
        )
    }

    /// See [`tls::client_config`]; the certificate is `source`'s, looked up per handshake.
    pub fn client_config(
        &self,
        source: &SpiffeId,
        expected_server: &[SpiffeId],
    ) -> Result<Arc<ClientConfig>, Error> {
        if expected_server.is_empty() {
            return Err(Error::NoExpectedServer);
        }
        let slot = self.slot(source)?;
        tls::client_config(
            Arc::new(Rotating(slot)),
            &self.inner.bundle,
            expected_server,
        )
    }

    fn slot(&self, id: &SpiffeId) -> Result<Arc<Slot>, Error> {
        let mut slots = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(id) {
            return Ok(slot.clone());
        }
        // Issue under the lock: it takes about a millisecond and prevents two certificates for
        // one identity when callers race.
        let cert = self.inner.ca.issue(id, self.inner.ttl)?;
        info!(%id, not_after = fmt_time(cert.not_after), "issued workload certificate");
        let runtime = tokio::runtime::Handle::try_current().ok();
        let slot = Arc::new(Slot {
            id: id.clone(),
            ca: self.inner.ca.clone(),
            ttl: self.inner.ttl,
            cert: ArcSwap::from_pointee(Issued::new(cert, self.inner.ttl)),
            background: runtime.is_some(),
        });
        if let Some(rt) = runtime {
            rt.spawn(refresh(Arc::downgrade(&slot)));
        }
        slots.insert(id.clone(), slot.clone());
        Ok(slot)
    }
}

/// One identity's current certificate.
struct Slot {
    id: SpiffeId,
    ca: Arc<CertificateAuthority>,
    ttl: Duration,
    cert: ArcSwap<Issued>,
    /// A background task renews this slot; otherwise `current` does.
    background: bool,
}

struct Issued {
    cert: Arc<WorkloadCert>,
    /// Half the lifetime, counted from issuance. Not derived from the certificate: its
    /// `not_before` is backdated for clock skew and its `not_after` is truncated to seconds.
    refresh_at: SystemTime,
}

impl Issued {
    fn new(cert: WorkloadCert, ttl: Duration) -> Self {
        Issued {
            cert: Arc::new(cert),
            refresh_at: SystemTime::now() + ttl / 2,
        }
    }
}

impl Slot {
    fn current(&self) -> Arc<WorkloadCert> {
        let issued = self.cert.load();
        if !self.background
            && SystemTime::now() >= issued.refresh_at
            && let Some(cert) = self.renew()
        {
            return cert;
        }
        issued.cert.clone()
    }

    fn renew(&self) -> Option<Arc<WorkloadCert>> {
        match self.ca.issue(&self.id, self.ttl) {
            Ok(cert) => {
                info!(id = %self.id, not_after = fmt_time(cert.not_after), "rotated workload certificate");
                let issued = Issued::new(cert, self.ttl);
                let cert = issued.cert.clone();
                self.cert.store(Arc::new(issued));
                Some(cert)
            }
            Err(e) => {
                warn!(id = %self.id, error = %e, "certificate renewal failed; keeping the current one");
                None
            }
        }
    }
}

/// Renews the slot at half life until the slot is dropped (manager and configs gone).
async fn refresh(slot: Weak<Slot>) {
    loop {
        let wait = {
            let Some(s) = slot.upgrade() else { return };
            let at = s.cert.load().refresh_at;
            at.duration_since(SystemTime::now()).unwrap_or_default()
        };
        tokio::time::sleep(wait).await;
        let Some(s) = slot.upgrade() else { return };
        if s.renew().is_none() {
            // The CA is local, so failure is unlikely to clear fast; retry well before expiry.
            let retry = (s.ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(30));
            drop(s);
            tokio::time::sleep(retry).await;
        }
    }
}

/// rustls resolver over a slot: asked on every handshake, so it picks up rotations.
struct Rotating(Arc<Slot>);

impl fmt::Debug for Rotating {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Rotating").field(&self.0.id).finish()
    }
}

impl ResolvesServerCert for Rotating {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        debug!(id = %self.0.id, "serving certificate");
        Some(self.0.current().certified_key())
    }
}

impl ResolvesClientCert for Rotating {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
