//! Certificates per identity, minted in-process by the CA and renewed at half life.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, TryLockError, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use tokio::task::JoinHandle;
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
/// half life re-issues inline. Lookups also take over when the background task is gone (its
/// runtime shut down) or late by more than a grace period, so renewal never silently stops.
/// Renewal is single-flight: concurrent handshakes past half life mint one certificate, not one
/// each; the others keep using the current (still valid) one meanwhile.
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
        // An intermediate CA's certificate is not a root; its issued chains are checked by
        // whoever verifies them.
        if ca.is_root() && !bundle.roots().contains(ca.cert()) {
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
        let slot = Arc::new(Slot {
            id: id.clone(),
            ca: self.inner.ca.clone(),
            ttl: self.inner.ttl,
            cert: ArcSwap::from_pointee(Issued::new(cert, self.inner.ttl)),
            renewing: Mutex::new(()),
            refresher: OnceLock::new(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let task = rt.spawn(refresh(Arc::downgrade(&slot)));
            // Set once, right after creation; nothing else can have set it.
            let _ = slot.refresher.set(task);
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
    /// Held while minting, so one renewal runs at a time.
    renewing: Mutex<()>,
    /// The background task renewing this slot, if a runtime was there to run it.
    refresher: OnceLock<JoinHandle<()>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Otherwise the task sleeps until the next half life before noticing the slot is gone.
        if let Some(task) = self.refresher.get() {
            task.abort();
        }
    }
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

/// How late the background renewal may be before lookups renew inline: a tenth of the
/// lifetime, so inline renewal still happens well before expiry (at 60% of the lifetime).
fn grace(ttl: Duration) -> Duration {
    ttl / 10
}

impl Slot {
    fn current(&self) -> Arc<WorkloadCert> {
        let issued = self.cert.load();
        let now = SystemTime::now();
        if now >= issued.refresh_at
            && self.renews_inline(now, issued.refresh_at)
            && let Some(cert) = self.renew()
        {
            return cert;
        }
        issued.cert.clone()
    }

    /// Whether a lookup past `refresh_at` should renew itself rather than leave it to the task.
    fn renews_inline(&self, now: SystemTime, refresh_at: SystemTime) -> bool {
        match self.refresher.get() {
            None => true,
            // A runtime that shut down takes its tasks with it.
            Some(task) if task.is_finished() => true,
            Some(_) => now >= refresh_at + grace(self.ttl),
        }
    }

    /// Mints a new certificate unless another caller is doing so (then `None`: keep using the
    /// current one) or just did (then that one).
    fn renew(&self) -> Option<Arc<WorkloadCert>> {
        let _minting = match self.renewing.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        let issued = self.cert.load();
        if SystemTime::now() < issued.refresh_at {
            // Renewed by whoever held the lock before us.
            return Some(issued.cert.clone());
        }
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
        let renewed = s.renew().is_some();
        if !renewed && SystemTime::now() >= s.cert.load().refresh_at {
            // Failed (or a lookup is minting right now): the CA is local, so failure is
            // unlikely to clear fast; retry well before expiry.
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
