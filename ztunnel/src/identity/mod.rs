//! Workload identities and their certificates.
//!
//! - [`Identity`]: a SPIFFE id, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`;
//! - [`ca`]: the local CA (Istio's plug-in layout, or a generated
//!   development root) that issues short-lived workload certificates;
//! - [`caclient`]: the client of the control plane's CA (Istio's
//!   certificate service), used instead when there is a control plane;
//! - [`manager`]: per-identity certificates, fetched on demand and renewed
//!   before they expire.

pub mod ca;
pub mod caclient;
pub mod manager;

use std::{fmt, path::PathBuf, str::FromStr};

pub use ca::{LocalCa, WorkloadCert};
pub use caclient::CaClient;
pub use manager::{CaSource, CertManager};

/// The default trust domain, as Istio's.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// A workload's identity from its fields as configured: an empty trust
    /// domain is `default_trust_domain`, an empty service account is
    /// `default` (as Kubernetes runs such a pod). One definition for every
    /// side that derives it: the proxy, the certificate manager, the CA.
    pub fn of_workload(
        trust_domain: &str,
        default_trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Self {
        let td = if trust_domain.is_empty() {
            default_trust_domain
        } else {
            trust_domain
        };
        let sa = if service_account.is_empty() {
            "default"
        } else {
            service_account
        };
        Identity::new(td, namespace, sa)
    }

    /// The id without its `spiffe://` scheme, as authorization policies
    /// compare principals.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::BadSpiffeId(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("`{0}` is not a SPIFFE id of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    BadSpiffeId(String),
    #[error("CA file {}: {message}", path.display())]
    CaFile { path: PathBuf, message: String },
    #[error("issuing a certificate for {identity}: {message}")]
    Issue { identity: String, message: String },
    #[error("state directory {}: {message}", path.display())]
    StateDir { path: PathBuf, message: String },
}
