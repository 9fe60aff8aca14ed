//! Istio's certificate service: signs a workload's CSR for the node that
//! runs the workload, and for no other.

use std::{sync::Arc, time::Duration};

use prost_types::value::Kind;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use ztunnel::{
    config::local::LocalConfig,
    identity::{Identity, IdentityError, LocalCa},
    protos::istio::v1::auth::{
        istio_certificate_service_server::IstioCertificateService, IstioCertificateRequest,
        IstioCertificateResponse,
    },
};

use crate::Nodes;

/// The metadata key that names the workload a node proxy asks for.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The CA service.
pub struct Ca {
    pub nodes: Arc<Nodes>,
    pub ca: Arc<LocalCa>,
    pub config: watch::Receiver<Arc<LocalConfig>>,
    pub trust_domain: String,
    /// Longer requests are cut to this; a request for none gets it.
    pub max_ttl: Duration,
}

impl Ca {
    /// Why `node` may not have `identity`, if it may not: only a node that
    /// runs a workload of that identity gets its certificate.
    fn authorize(&self, node: &str, identity: &Identity) -> Result<(), String> {
        let config = self.config.borrow().clone();
        let runs_it = config.workloads.iter().any(|w| {
            w.node == node
                && Identity::of_workload(
                    &w.trust_domain,
                    &self.trust_domain,
                    &w.namespace,
                    &w.service_account,
                ) == *identity
        });
        if runs_it {
            Ok(())
        } else {
            Err(format!(
                "node {node} may not have {identity}: no workload of that identity runs on it"
            ))
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let node = self.nodes.authenticate(request.metadata(), &peer, "CA")?;
        let request = request.into_inner();
        let impersonated = request.metadata.as_ref().and_then(|m| {
            match m.fields.get(IMPERSONATED_IDENTITY)?.kind.as_ref()? {
                Kind::StringValue(s) => Some(s.clone()),
                _ => None,
            }
        });
        let ttl = match u64::try_from(request.validity_duration) {
            Ok(0) | Err(_) => self.max_ttl,
            Ok(secs) => Duration::from_secs(secs).min(self.max_ttl),
        };
        let refusal = std::cell::RefCell::new(None);
        let signed = self.ca.sign_csr(&request.csr, ttl, |identity| {
            let asked = impersonated.as_deref().unwrap_or_default();
            let check = if impersonated.is_some() && asked != identity.to_string() {
                Err(format!(
                    "the request's ImpersonatedIdentity {asked} is not the CSR's {identity}"
                ))
            } else {
                self.authorize(&node, identity)
            };
            check.map_err(|message| {
                *refusal.borrow_mut() = Some(message.clone());
                IdentityError::Issue {
                    identity: identity.to_string(),
                    message,
                }
            })
        });
        match signed {
            Ok((identity, chain)) => {
                info!(%node, %identity, ttl = ?ttl, "certificate signed");
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: chain,
                }))
            }
            Err(e) => {
                warn!(%node, %peer, error = %e, "certificate refused");
                Err(match refusal.into_inner() {
                    Some(why) => Status::permission_denied(why),
                    None => Status::invalid_argument(e.to_string()),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost_types::{Struct, Value};
    use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};

    use super::*;

    const NODE1_TOKEN: &str = "node1-token-0123456789";
    const NODE2_TOKEN: &str = "node2-token-0123456789";

    /// A CA service whose config runs `default/sa/a` on node1, with a CA in
    /// a directory removed on drop.
    struct Fixture {
        ca: Ca,
        dir: std::path::PathBuf,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "ztunnel-controlplane-ca-{name}-{}",
                std::process::id()
            ));
            ztunnel::identity::ca::generate_dev_root(&dir).expect("a CA");
            let config = LocalConfig::parse(
                "workloads:\n- uid: a\n  name: a\n  namespace: default\n  serviceAccount: a\n  workloadIps: [\"10.0.0.1\"]\n  node: node1\n  services: {}\n",
                std::path::Path::new("test.yaml"),
            )
            .expect("config");
            let nodes = Nodes::new([
                ("node1".to_string(), NODE1_TOKEN.to_string()),
                ("node2".to_string(), NODE2_TOKEN.to_string()),
            ])
            .expect("tokens");
            Fixture {
                ca: Ca {
                    nodes: Arc::new(nodes),
                    ca: Arc::new(LocalCa::load(&dir).expect("the CA loads")),
                    config: watch::channel(Arc::new(config)).1,
                    trust_domain: "cluster.local".into(),
                    max_ttl: Duration::from_secs(3600),
                },
                dir,
            }
        }

        /// Asks, with `token`, for a CSR naming `sans` on behalf of
        /// `impersonated`.
        async fn ask(
            &self,
            token: Option<&str>,
            sans: &[&str],
            impersonated: Option<&str>,
        ) -> Result<IstioCertificateResponse, Status> {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans
                .iter()
                .map(|s| SanType::URI((*s).try_into().expect("URI")))
                .collect();
            let csr = params
                .serialize_request(&key)
                .and_then(|r| r.pem())
                .expect("CSR");
            let metadata = impersonated.map(|id| Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(id.to_string())),
                    },
                )]),
            });
            let mut request = Request::new(IstioCertificateRequest {
                csr,
                validity_duration: 600,
                metadata,
            });
            if let Some(token) = token {
                request.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {token}").parse().expect("ASCII"),
                );
            }
            self.ca
                .create_certificate(request)
                .await
                .map(Response::into_inner)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const A: &str = "spiffe://cluster.local/ns/default/sa/a";
    const B: &str = "spiffe://cluster.local/ns/default/sa/b";

    #[tokio::test]
    async fn the_node_of_a_workload_gets_its_certificate() {
        let f = Fixture::new("ok");
        let answer = f
            .ask(Some(NODE1_TOKEN), &[A], Some(A))
            .await
            .expect("signed");
        // Leaf, then the trust bundle as the last element.
        assert_eq!(answer.cert_chain.len(), 2);
    }

    #[tokio::test]
    async fn another_node_is_refused() {
        let f = Fixture::new("other-node");
        let e = f.ask(Some(NODE2_TOKEN), &[A], Some(A)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("node2 may not have"),
            "{}",
            e.message()
        );
    }

    #[tokio::test]
    async fn an_impersonation_that_is_not_the_csr_is_refused() {
        let f = Fixture::new("mismatch");
        let e = f.ask(Some(NODE1_TOKEN), &[B], Some(A)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("ImpersonatedIdentity"),
            "{}",
            e.message()
        );
    }

    #[tokio::test]
    async fn a_csr_naming_two_identities_is_refused() {
        let f = Fixture::new("two-sans");
        let e = f
            .ask(Some(NODE1_TOKEN), &[A, B], Some(A))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_caller_without_a_known_token_is_refused() {
        let f = Fixture::new("tokens");
        for token in [None, Some("node1-token-0123456788"), Some("")] {
            let e = f.ask(token, &[A], Some(A)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}");
        }
    }

    #[test]
    fn weak_or_shared_tokens_are_refused_at_load() {
        let short = Nodes::new([("n".to_string(), "short".to_string())]);
        assert!(short.is_err());
        let shared = Nodes::new([
            ("n1".to_string(), NODE1_TOKEN.to_string()),
            ("n2".to_string(), NODE1_TOKEN.to_string()),
        ]);
        assert!(shared.err().is_some_and(|e| e.contains("same token")));
    }
}
