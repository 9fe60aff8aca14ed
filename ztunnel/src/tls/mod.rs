//! TLS for HBONE: TLS 1.3 only, ALPN `h2`, both ends presenting workload
//! certificates and checking each other's SPIFFE identity.
//!
//! aws-lc-rs is the crypto provider: the fastest rustls has (measured in the
//! benchmark suite); it also backs certificate issuing.

pub mod verify;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use rustls::{crypto::CryptoProvider, ClientConfig, RootCertStore, ServerConfig};

use crate::identity::{CertManager, Identity, IdentityError, WorkloadCert};

pub use verify::{not_after, spiffe_ids};

/// HBONE's ALPN protocol.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider for every TLS context.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Builds TLS configurations from current workload certificates. Peers are
/// checked against the trust roots that came with the local certificate of
/// the handshake, so a new trust bundle applies with the next certificate.
pub struct TlsContext {
    certs: Arc<CertManager>,
    trust_domain: String,
    /// Server configurations by identity, with the serial they were built for.
    servers: Mutex<HashMap<Identity, (String, Arc<ServerConfig>)>>,
}

fn root_store(cert: &WorkloadCert) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for root in &cert.roots {
        roots
            .add(root.clone())
            .map_err(|e| TlsError::Config(format!("trust root: {e}")))?;
    }
    Ok(Arc::new(roots))
}

impl TlsContext {
    pub fn new(certs: Arc<CertManager>, trust_domain: &str) -> Result<Self, TlsError> {
        Ok(TlsContext {
            certs,
            trust_domain: trust_domain.to_string(),
            servers: Mutex::new(HashMap::new()),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The server side of a handshake for the local workload `identity`:
    /// serves its certificate, requires a client certificate from our trust
    /// domain.
    pub async fn server_config(&self, identity: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
        let cert = self.certs.get(identity).await?;
        if let Ok(servers) = self.servers.lock() {
            if let Some((serial, config)) = servers.get(identity) {
                if *serial == cert.serial {
                    return Ok(config.clone());
                }
            }
        }
        let verifier = verify::SpiffeClientVerifier::new(root_store(&cert)?, &self.trust_domain)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(cert.chain.clone(), cert.private_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Tunnels are long-lived and pooled; resumption buys little.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        let config = Arc::new(config);
        if let Ok(mut servers) = self.servers.lock() {
            servers.insert(identity.clone(), (cert.serial.clone(), config.clone()));
        }
        Ok(config)
    }

    /// The client side of a handshake from the local workload `source` to a
    /// destination that must prove one of the `expected` identities.
    pub async fn client_config(
        &self,
        source: &Identity,
        expected: Vec<Identity>,
    ) -> Result<(Arc<ClientConfig>, Arc<WorkloadCert>), TlsError> {
        let cert = self.certs.get(source).await?;
        let verifier = verify::SpiffeServerVerifier::new(root_store(&cert)?, expected);
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(cert.chain.clone(), cert.private_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok((Arc::new(config), cert))
    }
}
