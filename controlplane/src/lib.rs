//! A control plane for the lab, the demo and the tests, on Istio's wire
//! formats: the local file's schema served over Delta ADS, and workload
//! certificates signed over Istio's CA API with the plug-in CA. It is the
//! only process that holds the CA key; each node proves who it is with a
//! bearer token and gets certificates only for workloads it runs.
//!
//! It stands in for istiod where no Kubernetes runs; ztunnel talks to it
//! exactly as it talks to istiod.

pub mod ads;
pub mod ca;
pub mod resources;

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{metadata::MetadataMap, transport::Server, Status};
use tracing::warn;
use ztunnel::{
    config::local::LocalConfig,
    identity::LocalCa,
    protos::{
        envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
        istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer,
    },
};

pub use resources::Resources;

/// The nodes allowed in, by bearer token.
pub struct Nodes {
    /// SHA-256 of each token, with its node.
    tokens: Vec<([u8; 32], String)>,
}

/// Tokens shorter than this are refused at load: guessable.
const MIN_TOKEN_LEN: usize = 16;

fn digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

impl Nodes {
    /// `(node name, token)` pairs. An empty or short token, or one shared
    /// by two nodes (either could then pass for the other), is refused.
    pub fn new(tokens: impl IntoIterator<Item = (String, String)>) -> Result<Self, String> {
        let mut nodes = Nodes { tokens: Vec::new() };
        for (node, token) in tokens {
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "the token of {node} has {} characters; at least {MIN_TOKEN_LEN} are needed",
                    token.len()
                ));
            }
            let d = digest(&token);
            if let Some((_, other)) = nodes.tokens.iter().find(|(t, _)| *t == d) {
                return Err(format!("{other} and {node} have the same token"));
            }
            nodes.tokens.push((d, node));
        }
        Ok(nodes)
    }

    /// The node a request comes from, or the refusal.
    pub fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer: &str,
        service: &str,
    ) -> Result<String, Status> {
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let node = token.and_then(|t| {
            // Every stored digest is compared in full, so the time taken
            // says nothing about how close a guess came.
            let d = digest(t);
            let mut found = None;
            for (stored, node) in &self.tokens {
                let differs = stored
                    .iter()
                    .zip(d.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b));
                if differs == 0 {
                    found = Some(node.clone());
                }
            }
            found
        });
        match node {
            Some(node) => Ok(node),
            None => {
                let why = if token.is_none() {
                    "no bearer token"
                } else {
                    "unknown token"
                };
                warn!(%peer, service, reason = why, "refused a node");
                Err(Status::unauthenticated(format!(
                    "{why}: this control plane does not know the caller"
                )))
            }
        }
    }
}

/// NACKs the nodes sent, the newest [`Rejections::KEPT`]: what an operator
/// (or a test) asks to learn which push a node refused and why.
#[derive(Clone, Default)]
pub struct Rejections(Arc<std::sync::Mutex<std::collections::VecDeque<Rejection>>>);

#[derive(Debug, Clone)]
pub struct Rejection {
    pub node: String,
    pub type_url: String,
    pub error: String,
}

impl Rejections {
    const KEPT: usize = 64;

    fn record(&self, node: &str, type_url: &str, error: &str) {
        if let Ok(mut list) = self.0.lock() {
            if list.len() == Self::KEPT {
                list.pop_front();
            }
            list.push_back(Rejection {
                node: node.into(),
                type_url: type_url.into(),
                error: error.into(),
            });
        }
    }

    pub fn list(&self) -> Vec<Rejection> {
        self.0
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// The served state, shared by the services and whoever updates it.
pub struct ControlPlane {
    config: watch::Sender<Arc<LocalConfig>>,
    resources: watch::Sender<Arc<Resources>>,
    generation: Arc<AtomicU64>,
    /// Raw resources added by [`ControlPlane::inject`], kept across updates.
    injected: std::sync::Mutex<Vec<(String, prost_types::Any)>>,
    pub rejections: Rejections,
}

/// How the control plane serves.
pub struct Settings {
    pub listen: SocketAddr,
    pub ca: LocalCa,
    /// Names (DNS or IP) its serving certificate carries: what clients
    /// check (`ALT_XDS_HOSTNAME` lets them check a name other than the
    /// address they connect to).
    pub server_names: Vec<String>,
    pub nodes: Nodes,
    pub trust_domain: String,
    pub max_cert_ttl: Duration,
}

impl ControlPlane {
    pub fn new(config: LocalConfig) -> Arc<Self> {
        let resources = Resources::from_config(&config);
        Arc::new(ControlPlane {
            config: watch::channel(Arc::new(config)).0,
            resources: watch::channel(Arc::new(resources)).0,
            generation: Arc::new(AtomicU64::new(1)),
            injected: std::sync::Mutex::new(Vec::new()),
            rejections: Rejections::default(),
        })
    }

    /// Serves a new configuration: connected nodes get what changed.
    pub fn update(&self, config: LocalConfig) {
        let mut resources = Resources::from_config(&config);
        if let Ok(injected) = self.injected.lock() {
            for (name, body) in injected.iter() {
                resources.insert_raw(name, body.clone());
            }
        }
        self.config.send_replace(Arc::new(config));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.resources.send_replace(Arc::new(resources));
    }

    /// Serves a resource exactly as given, beside the configuration's (for
    /// tests: what a well-behaved control plane would never push).
    pub fn inject(&self, name: &str, body: prost_types::Any) {
        self.inject_all(vec![(name.to_string(), body)]);
    }

    /// [`ControlPlane::inject`] for several resources, in one push.
    pub fn inject_all(&self, resources: Vec<(String, prost_types::Any)>) {
        if let Ok(mut injected) = self.injected.lock() {
            for (name, body) in resources {
                injected.retain(|(n, b)| !(*n == name && b.type_url == body.type_url));
                injected.push((name, body));
            }
        }
        let config = (**self.config.borrow()).clone();
        self.update(config);
    }

    /// Serves ADS and the CA over TLS on `settings.listen` until the future
    /// is dropped.
    pub async fn serve(self: Arc<Self>, settings: Settings) -> anyhow::Result<()> {
        let (chain, key) = settings
            .ca
            .issue_server(&settings.server_names, Duration::from_secs(365 * 24 * 3600))?;
        let nodes = Arc::new(settings.nodes);
        let ads = ads::Ads {
            nodes: nodes.clone(),
            resources: self.resources.subscribe(),
            generation: self.generation.clone(),
            rejections: self.rejections.clone(),
        };
        let ca = ca::Ca {
            nodes,
            ca: Arc::new(settings.ca),
            config: self.config.subscribe(),
            trust_domain: settings.trust_domain,
            max_ttl: settings.max_cert_ttl,
        };
        let incoming = tls_incoming(settings.listen, &chain, &key).await?;
        Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(ads))
            .add_service(IstioCertificateServiceServer::new(ca))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts on `listen` and completes TLS handshakes, each in its own task,
/// logging the ones that fail (a client with the wrong root, or not
/// speaking TLS) with the peer's address.
async fn tls_incoming(
    listen: SocketAddr,
    chain_pem: &str,
    key_pem: &str,
) -> anyhow::Result<ReceiverStream<std::io::Result<TlsStream<TcpStream>>>> {
    let chain =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut config = rustls::ServerConfig::builder_with_provider(ztunnel::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => warn!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}
