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

use std::{fmt, path::PathBuf, str::FromStr, sync::Arc};

pub use ca::{LocalCa, WorkloadCert};
pub use caclient::CaClient;
pub use manager::{CaSource, CertManager};

/// The default trust domain, as Istio's.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity.
///
/// Shared strings: an identity is cloned several times per proxied
/// connection (its labels, the pool key, the tunnel target, authorization),
/// and a clone must not allocate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Identity {
    pub trust_domain: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
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
        // Written in place: every access-log line formats two identities.
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Identity, IdentityError> {
        s.parse()
    }

    fn assert_refused(inputs: &[&str]) {
        for bad in inputs {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_spiffe_id_parses_into_its_three_parts() {
        let id = parse("spiffe://example.org/ns/shop/sa/cart").unwrap();
        assert_eq!(id, Identity::new("example.org", "shop", "cart"));
        assert_eq!(&*id.trust_domain, "example.org");
        assert_eq!(&*id.namespace, "shop");
        assert_eq!(&*id.service_account, "cart");
    }

    #[test]
    fn display_and_parse_round_trip() {
        for id in [
            Identity::new("cluster.local", "default", "default"),
            Identity::new("td", "a-b", "c.d_e"),
            Identity::new("x", "%2F", "100%"),
        ] {
            let text = id.to_string();
            assert!(text.starts_with("spiffe://"), "{text}");
            assert_eq!(parse(&text).unwrap(), id, "{text}");
        }
    }

    #[test]
    fn the_principal_is_the_id_without_its_scheme() {
        let id = Identity::new("cluster.local", "shop", "cart");
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/cart");
        assert_eq!(id.to_string(), format!("spiffe://{}", id.principal()));
    }

    #[test]
    fn of_workload_fills_the_default_trust_domain_and_service_account() {
        assert_eq!(
            Identity::of_workload("", "mesh.local", "shop", ""),
            Identity::new("mesh.local", "shop", "default")
        );
        // Configured values win over the defaults.
        assert_eq!(
            Identity::of_workload("other.td", "mesh.local", "shop", "cart"),
            Identity::new("other.td", "shop", "cart")
        );
        assert_eq!(
            &*Identity::of_workload("", DEFAULT_TRUST_DOMAIN, "ns", "sa").trust_domain,
            "cluster.local"
        );
    }

    #[test]
    fn ids_with_missing_or_extra_segments_are_refused() {
        assert_refused(&[
            "spiffe://",
            "spiffe://td",
            "spiffe://td/ns/shop",
            "spiffe://td/ns/shop/sa",
            "spiffe://td/ns/shop/cart",
            "spiffe://td/shop/sa/cart",
            "spiffe://td/ns/shop/sa/cart/extra",
            "spiffe://td/ns/shop/sa/cart/",
            "spiffe://td/x/ns/shop/sa/cart",
            "spiffe:///td/ns/shop/sa/cart",
        ]);
    }

    #[test]
    fn ids_with_empty_parts_are_refused() {
        assert_refused(&[
            "spiffe:///ns/shop/sa/cart",
            "spiffe://td/ns//sa/cart",
            "spiffe://td/ns/shop/sa/",
            "spiffe://td//shop/sa/cart",
        ]);
    }

    #[test]
    fn only_the_spiffe_scheme_is_accepted() {
        assert_refused(&[
            "td/ns/shop/sa/cart",
            "https://td/ns/shop/sa/cart",
            "spiffe:/td/ns/shop/sa/cart",
            "spiffe:td/ns/shop/sa/cart",
            "SPIFFE://td/ns/shop/sa/cart",
            " spiffe://td/ns/shop/sa/cart",
            "",
        ]);
    }

    #[test]
    fn keywords_are_literal_and_case_sensitive() {
        assert!(parse("spiffe://td/NS/shop/sa/cart").is_err());
        assert!(parse("spiffe://td/ns/shop/SA/cart").is_err());
        // `ns` and `sa` as values are fine: only positions matter.
        assert_eq!(
            parse("spiffe://td/ns/ns/sa/sa").unwrap(),
            Identity::new("td", "ns", "sa")
        );
    }

    #[test]
    fn percent_escapes_are_not_decoded() {
        // An escaped slash stays three characters: it cannot add a segment
        // or make two different ids compare equal.
        let id = parse("spiffe://td/ns/a%2Fb/sa/c%20d").unwrap();
        assert_eq!(&*id.namespace, "a%2Fb");
        assert_eq!(&*id.service_account, "c%20d");
        assert_ne!(id, Identity::new("td", "a/b", "c d"));
        assert_eq!(id.principal(), "td/ns/a%2Fb/sa/c%20d");
    }

    #[test]
    fn the_error_names_the_rejected_input() {
        let e = parse("spiffe://td/ns/shop").unwrap_err();
        assert!(matches!(&e, IdentityError::BadSpiffeId(s) if s == "spiffe://td/ns/shop"));
        assert!(e.to_string().contains("`spiffe://td/ns/shop`"), "{e}");
    }

    #[test]
    fn very_long_ids_parse_exactly_and_long_garbage_is_refused() {
        let long = "a".repeat(100_000);
        let id = parse(&format!("spiffe://td/ns/{long}/sa/{long}")).unwrap();
        assert_eq!(id.namespace.len(), 100_000);
        assert_eq!(&*id.service_account, long);
        let garbage = format!("spiffe://td{}", "/ns".repeat(50_000));
        assert!(parse(&garbage).is_err());
    }
}
