//! Certificates per identity, from the local CA or the control plane's.
//!
//! - A certificate is fetched the first time an identity needs it (or
//!   ahead of that, for the local workloads); every caller waiting for the
//!   same identity shares the one request in flight.
//! - It is renewed at about half its life, with jitter, so a node's
//!   certificates do not all renew at the same instant.
//! - A failed request is retried with exponential backoff; meanwhile the
//!   current certificate keeps serving until it expires.
//! - A replaced certificate is only used for new handshakes; established
//!   connections keep theirs, so rotation drops nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use futures_util::{
    future::{BoxFuture, Shared},
    FutureExt,
};
use tracing::{info, warn};

use super::{caclient::CaClient, Identity, IdentityError, LocalCa, WorkloadCert};

/// First retry after a failed request; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Where certificates come from.
pub enum CaSource {
    /// A CA whose key this process holds (`--ca-dir`, development root).
    Local(LocalCa),
    /// The control plane's CA: the key stays there.
    Remote(CaClient),
}

impl CaSource {
    async fn issue(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCert, IdentityError> {
        match self {
            CaSource::Local(ca) => ca.issue(identity, ttl),
            CaSource::Remote(client) => client.fetch(identity, ttl).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            CaSource::Local(_) => "local CA".into(),
            CaSource::Remote(client) => format!("CA at {}", client.address()),
        }
    }
}

type Fetch = Shared<BoxFuture<'static, Result<Arc<WorkloadCert>, String>>>;

/// What is known of one identity's certificate.
#[derive(Default)]
struct Entry {
    current: Option<Arc<WorkloadCert>>,
    /// When to replace `current` (half its life, minus jitter).
    renew_at: Option<SystemTime>,
    inflight: Option<Fetch>,
    failures: u32,
    /// No new request before this, after a failure.
    retry_at: Option<Instant>,
}

impl Entry {
    fn may_request(&self) -> bool {
        self.inflight.is_none() && self.retry_at.is_none_or(|t| Instant::now() >= t)
    }
}

/// Issues, caches and renews workload certificates.
pub struct CertManager {
    source: CaSource,
    ttl: Duration,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl CertManager {
    pub fn new(source: CaSource, ttl: Duration) -> Arc<Self> {
        Arc::new(CertManager {
            source,
            ttl,
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// A current certificate for `identity`, fetching one if there is none.
    pub async fn get(
        self: &Arc<Self>,
        identity: &Identity,
    ) -> Result<Arc<WorkloadCert>, IdentityError> {
        let fetch = {
            let mut entries = self.lock();
            let entry = entries.entry(identity.clone()).or_default();
            match &entry.current {
                Some(cert) if cert.not_after > SystemTime::now() => {
                    let cert = cert.clone();
                    if entry.renew_at.is_some_and(|t| SystemTime::now() >= t) && entry.may_request()
                    {
                        // The request runs as its own task; the current
                        // certificate serves meanwhile.
                        drop(self.start(entry, identity));
                    }
                    return Ok(cert);
                }
                _ => match &entry.inflight {
                    Some(fetch) => fetch.clone(),
                    None if entry.may_request() => self.start(entry, identity),
                    // Backing off after a failure: no request per connection.
                    None => {
                        return Err(IdentityError::Issue {
                            identity: identity.to_string(),
                            message: format!(
                                "no certificate yet; {} failed request(s), retrying",
                                entry.failures
                            ),
                        })
                    }
                },
            }
        };
        fetch.await.map_err(|message| IdentityError::Issue {
            identity: identity.to_string(),
            message,
        })
    }

    /// Starts a request for `identity`; the caller holds the lock.
    fn start(self: &Arc<Self>, entry: &mut Entry, identity: &Identity) -> Fetch {
        let this = self.clone();
        let id = identity.clone();
        let task = tokio::spawn(async move { this.fetch(id).await });
        let (this, id) = (self.clone(), identity.clone());
        let fetch = async move {
            match task.await {
                Ok(result) => result,
                Err(e) => {
                    // The task ended without clearing its entry (a panic):
                    // clear it here, or the identity would never be asked
                    // for again.
                    if let Some(entry) = this.lock().get_mut(&id) {
                        entry.inflight = None;
                    }
                    Err(format!("certificate request task failed: {e}"))
                }
            }
        }
        .boxed()
        .shared();
        entry.inflight = Some(fetch.clone());
        fetch
    }

    async fn fetch(self: Arc<Self>, identity: Identity) -> Result<Arc<WorkloadCert>, String> {
        let result = self.source.issue(&identity, self.ttl).await;
        let mut entries = self.lock();
        let entry = entries.entry(identity.clone()).or_default();
        entry.inflight = None;
        match result {
            Ok(cert) => {
                let cert = Arc::new(cert);
                match &entry.current {
                    Some(old) => {
                        info!(%identity, serial = %cert.serial, previous = %old.serial, "certificate rotated")
                    }
                    None => info!(%identity, serial = %cert.serial, "certificate issued"),
                }
                entry.renew_at = Some(renewal_time(&cert));
                entry.current = Some(cert.clone());
                entry.failures = 0;
                entry.retry_at = None;
                Ok(cert)
            }
            Err(e) => {
                entry.failures += 1;
                let wait = crate::xds::client::jittered(
                    FIRST_RETRY
                        .saturating_mul(1 << entry.failures.min(16).saturating_sub(1))
                        .min(MAX_RETRY),
                );
                entry.retry_at = Some(Instant::now() + wait);
                let keeps = entry
                    .current
                    .as_ref()
                    .filter(|c| c.not_after > SystemTime::now())
                    .map(|c| c.serial.clone());
                warn!(
                    %identity,
                    source = %self.source.describe(),
                    error = %e,
                    failures = entry.failures,
                    retry_in = ?wait,
                    still_serving = ?keeps,
                    "certificate request failed"
                );
                Err(e.to_string())
            }
        }
    }

    /// Keeps the certificates of `identities` (this node's workloads) ready:
    /// requests the missing ones, renews those due, drops the expired, and
    /// forgets identities no longer in use. Called about once a second.
    pub fn maintain(self: &Arc<Self>, identities: &[Identity]) {
        let now = SystemTime::now();
        let mut entries = self.lock();
        entries.retain(|id, entry| identities.contains(id) || entry.inflight.is_some());
        for identity in identities {
            let entry = entries.entry(identity.clone()).or_default();
            if entry.current.as_ref().is_some_and(|c| c.not_after <= now) {
                warn!(%identity, "certificate expired before it could be renewed");
                entry.current = None;
            }
            let due = match &entry.current {
                None => true,
                Some(_) => entry.renew_at.is_some_and(|t| now >= t),
            };
            if due && entry.may_request() {
                drop(self.start(entry, identity));
            }
        }
    }

    /// Waits, at most `limit`, until each of `identities` has a certificate
    /// or its request failed: a start that says "ready" then has them.
    pub async fn prefetch(self: &Arc<Self>, identities: &[Identity], limit: Duration) {
        let all = futures_util::future::join_all(identities.iter().map(|id| self.get(id)));
        if tokio::time::timeout(limit, all).await.is_err() {
            warn!(waited = ?limit, "the first certificates are late; serving while they are fetched");
        }
    }

    /// The certificates held now, for status pages and readiness.
    pub fn snapshot(&self) -> Vec<Arc<WorkloadCert>> {
        self.lock()
            .values()
            .filter_map(|e| e.current.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        // A poisoned lock only means a holder panicked; the map is still a
        // map of valid certificates.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Half way through what is left of the certificate's life now (its start
/// is backdated for clock skew, so not from there), minus up to a tenth of
/// it, so that certificates issued together do not renew together.
fn renewal_time(cert: &WorkloadCert) -> SystemTime {
    let now = SystemTime::now();
    let left = cert.not_after.duration_since(now).unwrap_or_default();
    now + left.mul_f64(0.5 - fastrand::f64() * 0.1)
}
