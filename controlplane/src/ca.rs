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
