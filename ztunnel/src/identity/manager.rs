//! Certificates per identity: issued on first use, replaced half way through
//! their life. A replaced certificate is only used for new handshakes;
//! established connections keep theirs, so rotation drops nothing.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tracing::info;

use super::{Identity, IdentityError, LocalCa, WorkloadCert};

/// Issues and caches workload certificates.
pub struct CertManager {
    ca: LocalCa,
    ttl: Duration,
    certs: RwLock<HashMap<Identity, Arc<WorkloadCert>>>,
}

impl CertManager {
    pub fn new(ca: LocalCa, ttl: Duration) -> Self {
        CertManager {
            ca,
            ttl,
            certs: RwLock::new(HashMap::new()),
        }
    }

    pub fn ca(&self) -> &LocalCa {
        &self.ca
    }

    /// A current certificate for `identity`, issuing one if there is none or
    /// the one cached is due for rotation.
    pub fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        let now = SystemTime::now();
        if let Some(cert) = self.cached(identity) {
            if cert.refresh_at() > now {
                return Ok(cert);
            }
        }
        self.issue(identity)
    }

    fn cached(&self, identity: &Identity) -> Option<Arc<WorkloadCert>> {
        self.certs.read().ok()?.get(identity).cloned()
    }

    fn issue(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        let cert = Arc::new(self.ca.issue(identity, self.ttl)?);
        let previous = match self.certs.write() {
            Ok(mut certs) => certs.insert(identity.clone(), cert.clone()),
            // A poisoned lock only means another issuer panicked; the map is
            // still a map of valid certificates.
            Err(poisoned) => poisoned.into_inner().insert(identity.clone(), cert.clone()),
        };
        match previous {
            Some(old) => {
                info!(%identity, serial = %cert.serial, previous = %old.serial, "certificate rotated")
            }
            None => info!(%identity, serial = %cert.serial, "certificate issued"),
        }
        Ok(cert)
    }

    /// Makes sure every identity in `identities` has a certificate that is
    /// not due for rotation, and forgets identities no longer in use.
    /// Returns the earliest time one will be due again.
    pub fn refresh(&self, identities: &[Identity]) -> Result<SystemTime, IdentityError> {
        let mut next = SystemTime::now() + self.ttl / 2;
        for identity in identities {
            let cert = self.fetch(identity)?;
            next = next.min(cert.refresh_at());
        }
        if let Ok(mut certs) = self.certs.write() {
            certs.retain(|id, _| identities.contains(id));
        }
        Ok(next)
    }

    /// The certificates held now, for status pages and readiness.
    pub fn snapshot(&self) -> Vec<Arc<WorkloadCert>> {
        self.certs
            .read()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }
}
