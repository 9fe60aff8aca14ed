//! The Delta ADS stream to the control plane.
//!
//! One stream carries both types. On connect ztunnel subscribes to all
//! resources of each (a wildcard, as Istio's ztunnel does), naming the
//! versions it already holds so a reconnect costs only what changed. Every
//! response is applied resource by resource and answered: an ACK, or a NACK
//! naming what was refused. Through an outage the last state keeps serving;
//! reconnects back off exponentially, with jitter.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use prost_types::{value::Kind, Struct, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use super::{store::Store, ADDRESS_TYPE, TYPES};
use crate::{
    config::local::LocalConfig,
    grpc::ControlPlaneEndpoint,
    protos::{
        envoy::{
            config::core::v3::Node,
            service::discovery::v3::{
                aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
                DeltaDiscoveryRequest, DeltaDiscoveryResponse,
            },
        },
        google::rpc,
    },
};

const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The largest response accepted, as Istio's ztunnel.
const MAX_RESPONSE_BYTES: usize = 200 * 1024 * 1024;
/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

/// Who this ztunnel is, as istiod expects a ztunnel to say it.
#[derive(Debug, Clone, Default)]
pub struct NodeIdentity {
    /// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
    pub id: String,
    /// `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, `CLUSTER_ID`, and
    /// every `ISTIO_META_*` variable without its prefix.
    pub metadata: BTreeMap<String, String>,
}

impl NodeIdentity {
    fn node(&self) -> Node {
        Node {
            id: self.id.clone(),
            cluster: String::new(),
            metadata: Some(Struct {
                fields: self
                    .metadata
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            Value {
                                kind: Some(Kind::StringValue(v.clone())),
                            },
                        )
                    })
                    .collect(),
            }),
        }
    }
}

/// The stream's state, for `/config_dump` and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct XdsStatus {
    pub address: String,
    pub connected: bool,
    /// Sessions opened (the first included).
    pub connects: u64,
    /// Why the last session ended, or could not start.
    pub last_error: Option<String>,
    /// Whether both types have been received: ztunnel serves from then on.
    pub complete: bool,
    pub types: BTreeMap<String, TypeStatus>,
    /// Sessions ended, by Istio's reasons: `ConnectionError` (none could be
    /// opened), `Error` (the stream failed), `Complete` (the server ended it).
    #[serde(skip)]
    pub terminations: BTreeMap<&'static str, u64>,
}

/// One type's state.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TypeStatus {
    pub resources: usize,
    /// The control plane's `system_version_info` of the last response
    /// accepted whole (a NACKed one is in `last_nack`).
    pub version: String,
    pub responses: u64,
    /// Bytes of resources received, for `istio_xds_message_bytes_total`.
    pub bytes: u64,
    pub last_ack: Option<String>,
    pub last_nack: Option<Nack>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Nack {
    pub nonce: String,
    pub error: String,
    pub at_unix: u64,
}

/// The client. [`XdsClient::run`] drives it; the configuration it makes
/// comes out of the receiver [`XdsClient::new`] returns, once complete and
/// then on every change.
pub struct XdsClient {
    endpoint: ControlPlaneEndpoint,
    node: NodeIdentity,
    store: Mutex<Store>,
    status: Mutex<XdsStatus>,
    config: watch::Sender<Option<Arc<LocalConfig>>>,
}

/// Why a session ended.
enum SessionEnd {
    /// No stream could be opened.
    Connect(String),
    /// The stream failed after it was open.
    Stream(String),
    /// The server closed it.
    Closed,
}

impl XdsClient {
    pub fn new(
        endpoint: ControlPlaneEndpoint,
        node: NodeIdentity,
    ) -> (Arc<Self>, watch::Receiver<Option<Arc<LocalConfig>>>) {
        let (config, rx) = watch::channel(None);
        let status = XdsStatus {
            address: endpoint.address.clone(),
            ..XdsStatus::default()
        };
        let client = Arc::new(XdsClient {
            endpoint,
            node,
            store: Mutex::new(Store::default()),
            status: Mutex::new(status),
            config,
        });
        (client, rx)
    }

    /// The stream's state now.
    pub fn status(&self) -> XdsStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Keeps a session open for as long as the process runs.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let (end, received) = self.session().await;
            let (reason, message) = match end {
                SessionEnd::Connect(e) => ("ConnectionError", e),
                SessionEnd::Stream(e) => ("Error", e),
                SessionEnd::Closed => ("Complete", "the control plane closed the stream".into()),
            };
            self.update(|s| {
                s.connected = false;
                s.last_error = Some(message.clone());
                *s.terminations.entry(reason).or_default() += 1;
            });
            if received {
                backoff = INITIAL_BACKOFF;
            }
            let wait = jittered(backoff);
            warn!(
                address = %self.endpoint.address,
                error = %message,
                retry_in = ?wait,
                "xDS stream ended; the last configuration keeps serving"
            );
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One stream, until it ends. Also says whether it received anything.
    async fn session(&self) -> (SessionEnd, bool) {
        let channel = match self.endpoint.channel() {
            Ok(c) => c,
            Err(e) => return (SessionEnd::Connect(e.to_string()), false),
        };
        // istiod sends a whole mesh in its first response: tonic's 4 MiB
        // default would refuse it in a mid-size cluster, and every reconnect
        // would fail the same way. Istio's ztunnel allows as much.
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let (requests, outbox) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        for type_url in TYPES {
            let initial = self.initial_request(type_url);
            // The receiver is alive: it is moved into the call just below.
            let _ = requests.try_send(initial);
        }
        self.update(|s| s.connects += 1);
        let mut stream = match client
            .delta_aggregated_resources(ReceiverStream::new(outbox))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return (
                    SessionEnd::Connect(crate::grpc::describe(
                        &status,
                        "XDS_ROOT_CA",
                        "ALT_XDS_HOSTNAME",
                    )),
                    false,
                )
            }
        };
        info!(address = %self.endpoint.address, "xDS stream open");
        self.update(|s| {
            s.connected = true;
            s.last_error = None;
        });
        let mut received = false;
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return (SessionEnd::Closed, received),
                Err(status) => {
                    return (
                        SessionEnd::Stream(crate::grpc::describe(
                            &status,
                            "XDS_ROOT_CA",
                            "ALT_XDS_HOSTNAME",
                        )),
                        received,
                    )
                }
            };
            received = true;
            let reply = self.handle(&response);
            if requests.send(reply).await.is_err() {
                return (
                    SessionEnd::Stream("the request stream closed".into()),
                    received,
                );
            }
        }
    }

    /// The first request of a type on a stream: who we are, a wildcard
    /// subscription, and the versions already held.
    fn initial_request(&self, type_url: &str) -> DeltaDiscoveryRequest {
        let held = self
            .store
            .lock()
            .map(|s| s.versions(type_url))
            .unwrap_or_default();
        DeltaDiscoveryRequest {
            node: Some(self.node.node()),
            type_url: type_url.to_string(),
            initial_resource_versions: held,
            ..DeltaDiscoveryRequest::default()
        }
    }

    /// Applies a response and builds the ACK or NACK for it.
    fn handle(&self, response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        if !TYPES.contains(&response.type_url.as_str()) {
            // Refused before it costs anything: no status entry, no metric
            // label, nothing held for a type the server made up.
            warn!(type_url = %response.type_url, "NACK: a push of a type ztunnel did not subscribe to");
            return nack(
                response,
                format!("ztunnel does not subscribe to {}", response.type_url),
            );
        }
        let bytes: u64 = response
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .map(|any| any.value.len() as u64)
            .sum();
        let (applied, complete, count, config) = match self.store.lock() {
            Ok(mut store) => {
                let applied = store.apply(response);
                let complete = store.complete();
                let count = store.count(&response.type_url);
                let config = complete.then(|| store.local_config());
                (applied, complete, count, config)
            }
            Err(_) => return nack(response, "internal error: the xDS store is poisoned".into()),
        };
        let error = applied.error();
        match &error {
            Some(e) => {
                warn!(type_url = %response.type_url, nonce = %response.nonce, error = %e, "NACK: a pushed resource was refused")
            }
            None => info!(
                type_url = %short(&response.type_url),
                version = %response.system_version_info,
                resources = response.resources.len(),
                removed = response.removed_resources.len(),
                "xDS push applied"
            ),
        }
        self.update(|s| {
            let was_complete = s.complete;
            s.complete = complete;
            let t = s.types.entry(response.type_url.clone()).or_default();
            t.resources = count;
            if error.is_none() {
                t.version = response.system_version_info.clone();
            }
            t.responses += 1;
            t.bytes += bytes;
            match &error {
                None => t.last_ack = Some(response.nonce.clone()),
                Some(e) => {
                    t.last_nack = Some(Nack {
                        nonce: response.nonce.clone(),
                        error: e.clone(),
                        at_unix: SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0),
                    })
                }
            }
            if complete && !was_complete {
                info!("xDS state complete: both types received");
            }
        });
        if let Some(config) = config {
            if applied.changed || self.config.borrow().is_none() {
                self.config.send_replace(Some(Arc::new(config)));
            }
        }
        match error {
            None => DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..DeltaDiscoveryRequest::default()
            },
            Some(e) => nack(response, e),
        }
    }

    fn update(&self, f: impl FnOnce(&mut XdsStatus)) {
        if let Ok(mut status) = self.status.lock() {
            f(&mut status);
        }
    }
}

fn nack(response: &DeltaDiscoveryResponse, message: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        error_detail: Some(rpc::Status {
            code: INVALID_ARGUMENT,
            message,
            details: Vec::new(),
        }),
        ..DeltaDiscoveryRequest::default()
    }
}

fn short(type_url: &str) -> &str {
    if type_url == ADDRESS_TYPE {
        "Address"
    } else {
        type_url.rsplit('.').next().unwrap_or(type_url)
    }
}

/// `d` give or take a quarter, so that nodes that lost the control plane
/// together do not all come back at the same instant.
pub fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() / 2.0)
}
