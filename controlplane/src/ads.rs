//! Delta ADS, as istiod serves it to ztunnels: every resource of each type
//! a node subscribes to, then what changes. A reconnecting node names the
//! versions it holds and gets only the difference (including removals).

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use ztunnel::protos::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::AggregatedDiscoveryService, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, Resource,
};

use crate::{resources::Resources, Nodes, Rejections};

/// The ADS service.
pub struct Ads {
    pub nodes: Arc<Nodes>,
    pub resources: watch::Receiver<Arc<Resources>>,
    /// The version of the whole state, sent as `system_version_info`.
    pub generation: Arc<AtomicU64>,
    /// NACKs received, newest last.
    pub rejections: Rejections,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let node = self.nodes.authenticate(request.metadata(), &peer, "xDS")?;
        info!(%node, %peer, "xDS stream open");
        let (tx, rx) = mpsc::channel(16);
        let stream = NodeStream {
            node,
            requests: request.into_inner(),
            responses: tx,
            resources: self.resources.clone(),
            generation: self.generation.clone(),
            rejections: self.rejections.clone(),
            subscribed: HashMap::new(),
            nonce: 0,
        };
        tokio::spawn(stream.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One node's stream.
struct NodeStream {
    node: String,
    requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    resources: watch::Receiver<Arc<Resources>>,
    generation: Arc<AtomicU64>,
    rejections: Rejections,
    /// Per subscribed type: name -> version the node holds.
    subscribed: HashMap<String, BTreeMap<String, String>>,
    nonce: u64,
}

impl NodeStream {
    async fn run(mut self) {
        loop {
            tokio::select! {
                request = self.requests.message() => match request {
                    Ok(Some(request)) => {
                        if !self.handle(request).await {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        debug!(node = %self.node, error = %status, "xDS stream ended");
                        break;
                    }
                },
                changed = self.resources.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let types: Vec<String> = self.subscribed.keys().cloned().collect();
                    for type_url in types {
                        if !self.push(&type_url, false).await {
                            return;
                        }
                    }
                }
            }
        }
        info!(node = %self.node, "xDS stream closed");
    }

    /// Handles one request; false when the stream is gone.
    async fn handle(&mut self, request: DeltaDiscoveryRequest) -> bool {
        let type_url = request.type_url.clone();
        if !self.subscribed.contains_key(&type_url) {
            // A new subscription (wildcard): what the node already holds,
            // then everything that differs, even if that is nothing.
            info!(
                node = %self.node,
                id = request.node.as_ref().map(|n| n.id.as_str()).unwrap_or_default(),
                type_url = %type_url,
                held = request.initial_resource_versions.len(),
                "subscribed"
            );
            self.subscribed.insert(
                type_url.clone(),
                request.initial_resource_versions.into_iter().collect(),
            );
            return self.push(&type_url, true).await;
        }
        match &request.error_detail {
            Some(error) => {
                warn!(
                    node = %self.node,
                    type_url = %type_url,
                    nonce = %request.response_nonce,
                    error = %error.message,
                    "NACK: the node refused a push"
                );
                self.rejections
                    .record(&self.node, &type_url, &error.message);
            }
            None => {
                debug!(node = %self.node, type_url = %type_url, nonce = %request.response_nonce, "ACK")
            }
        }
        true
    }

    /// Sends the difference between what the node holds of `type_url` and
    /// what is served (always, when `initial`). False when the stream is gone.
    async fn push(&mut self, type_url: &str, initial: bool) -> bool {
        let current = self.resources.borrow().clone();
        let empty = BTreeMap::new();
        let served = current.of(type_url).unwrap_or(&empty);
        let Some(held) = self.subscribed.get_mut(type_url) else {
            return true;
        };
        let mut resources = Vec::new();
        for (name, s) in served {
            if held.get(name) != Some(&s.version) {
                resources.push(Resource {
                    version: s.version.clone(),
                    resource: Some(s.body.clone()),
                    name: name.clone(),
                    aliases: Vec::new(),
                });
                held.insert(name.clone(), s.version.clone());
            }
        }
        let removed: Vec<String> = held
            .keys()
            .filter(|name| !served.contains_key(*name))
            .cloned()
            .collect();
        for name in &removed {
            held.remove(name);
        }
        if resources.is_empty() && removed.is_empty() && !initial {
            return true;
        }
        self.nonce += 1;
        let response = DeltaDiscoveryResponse {
            system_version_info: self.generation.load(Ordering::SeqCst).to_string(),
            resources,
            type_url: type_url.to_string(),
            nonce: self.nonce.to_string(),
            removed_resources: removed,
        };
        debug!(
            node = %self.node,
            type_url,
            resources = response.resources.len(),
            removed = response.removed_resources.len(),
            "push"
        );
        self.responses.send(Ok(response)).await.is_ok()
    }
}
