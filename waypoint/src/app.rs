//! The waypoint process: flags, identity, state, listeners.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tracing::{error, info, warn};
use ztunnel::{
    config::{local::LocalConfig, parse_duration},
    grpc::ControlPlaneEndpoint,
    identity::{CaClient, CaSource, CertManager, Identity, LocalCa},
    proxy::hbone::pool::Pool,
    state::Snapshot,
    tls::TlsContext,
};

use crate::{
    l7config::{self, WaypointRef},
    proxy::Waypoint,
    server::{self, Limits},
    telemetry::Metrics,
    upstream::Upstreams,
};

/// The waypoint's flags; each has the environment variable Istio's
/// waypoint deployments set, where there is one.
#[derive(Debug, Parser)]
#[command(name = "waypoint", version, about = "The mesh's L7 proxy (waypoint)")]
pub struct Args {
    /// Workloads and services, in the schema ztunnel reads (LOCAL_XDS_PATH);
    /// watched. The waypoint balances across the endpoints it lists. Not
    /// with --xds-address.
    #[arg(
        long = "config",
        env = "LOCAL_XDS_PATH",
        value_name = "FILE",
        conflicts_with = "xds_address"
    )]
    pub config: Option<PathBuf>,

    /// The control plane's xDS service (istiod: https://istiod.istio-system.svc:15012):
    /// workloads and services come from it, as ztunnel's do.
    #[arg(long, env = "XDS_ADDRESS", value_name = "URL")]
    pub xds_address: Option<String>,

    #[arg(
        long,
        env = "XDS_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub xds_root_ca: PathBuf,

    /// Names to verify the control plane's certificates against instead of
    /// the addresses' hosts.
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    pub alt_xds_hostname: Option<String>,
    #[arg(long, env = "ALT_CA_HOSTNAME")]
    pub alt_ca_hostname: Option<String>,

    /// The pod's name and node, for the control plane (POD_NAME, NODE_NAME).
    #[arg(long, env = "POD_NAME", default_value = "waypoint")]
    pub pod_name: String,
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,

    /// AuthorizationPolicy and HTTPRoute resources (Kubernetes YAML, many
    /// per file): files or directories, repeatable; watched.
    #[arg(long = "l7-config", value_name = "PATH")]
    pub l7_config: Vec<PathBuf>,

    /// The waypoint's Gateway name: policies with `targetRefs` naming it apply.
    #[arg(long, env = "WAYPOINT_NAME", default_value = "waypoint")]
    pub name: String,

    /// The waypoint's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// The waypoint's service account: its identity is
    /// spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "waypoint")]
    pub service_account: String,

    /// The waypoint pod's address: where clients reach it, and where its
    /// own tunnels come from.
    #[arg(long, env = "INSTANCE_IP")]
    pub pod_ip: IpAddr,

    #[arg(long, env = "TRUST_DOMAIN", default_value = ztunnel::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// A CA in Istio's plug-in layout that issues the waypoint's certificate.
    #[arg(
        long,
        env = "ZTUNNEL_CA_DIR",
        value_name = "DIR",
        conflicts_with = "ca_address"
    )]
    pub ca_dir: Option<PathBuf>,

    /// The control plane's CA (istiod: https://istiod.istio-system.svc:15012);
    /// default: the xDS address.
    #[arg(long, env = "CA_ADDRESS", value_name = "URL")]
    pub ca_address: Option<String>,

    #[arg(
        long,
        env = "CA_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub ca_root_ca: PathBuf,

    #[arg(
        long,
        env = "AUTH_TOKEN",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    pub auth_token: PathBuf,

    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// Lifetime of the waypoint's certificate; renewed half way.
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,

    /// The HBONE listener.
    #[arg(long, default_value = "0.0.0.0:15008")]
    pub listen: SocketAddr,

    /// Prometheus metrics (`/metrics`) and readiness (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_address: SocketAddr,

    /// TLS and HTTP/2 handshakes of an HBONE connection must finish in this.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// HBONE handshakes in progress at once; a new one beyond it evicts the oldest.
    #[arg(long, default_value_t = 1024)]
    pub max_handshakes: usize,

    /// Client connections (CONNECT streams) per HBONE connection.
    #[arg(long, default_value_t = ztunnel::proxy::hbone::settings::SERVER_MAX_STREAMS)]
    pub max_tunnels_per_connection: u32,

    /// A request's headers must arrive within this.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Header bytes per request; more gets 431 (HTTP/1.1) or a reset (HTTP/2).
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,

    /// Concurrent HTTP/2 requests per client connection.
    #[arg(long, default_value_t = 100)]
    pub max_streams: u32,

    /// A client connection with no request for this long is closed.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A client connection silent for this long is taken for a server-first
    /// TCP protocol and relayed as bytes (HTTP clients speak first).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub protocol_detection_timeout: Duration,

    /// On SIGTERM, how long connections get to finish what is in flight.
    #[arg(long, env = "WAYPOINT_DRAIN_DEADLINE", default_value = "25s", value_parser = parse_duration)]
    pub drain_deadline: Duration,
}

impl Args {
    fn limits(&self) -> Limits {
        Limits {
            handshake_timeout: self.handshake_timeout,
            max_handshakes: self.max_handshakes,
            max_tunnels_per_connection: self.max_tunnels_per_connection,
            header_read_timeout: self.header_read_timeout,
            max_header_bytes: self.max_header_bytes,
            max_streams: self.max_streams,
            idle_timeout: self.idle_timeout,
            protocol_detection_timeout: self.protocol_detection_timeout,
        }
    }

    fn endpoint(
        &self,
        address: &str,
        root: &std::path::Path,
        alt: &Option<String>,
    ) -> ControlPlaneEndpoint {
        ControlPlaneEndpoint {
            address: address.to_string(),
            root_cert: root.to_path_buf(),
            alt_hostname: alt.clone(),
            token: Some(self.auth_token.clone()),
            cluster_id: self.cluster_id.clone(),
            headers: Vec::new(),
        }
    }

    fn ca(&self) -> anyhow::Result<CaSource> {
        match (
            &self.ca_dir,
            self.ca_address.as_ref().or(self.xds_address.as_ref()),
        ) {
            (Some(dir), _) => Ok(CaSource::Local(LocalCa::load(dir)?)),
            (None, Some(address)) => Ok(CaSource::Remote(CaClient::new(self.endpoint(
                address,
                &self.ca_root_ca,
                &self.alt_ca_hostname,
            )))),
            (None, None) => anyhow::bail!(
                "no CA: give --ca-dir DIR (ZTUNNEL_CA_DIR) or --ca-address URL (CA_ADDRESS)"
            ),
        }
    }
}

/// Runs the waypoint until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let identity = Identity::new(&args.trust_domain, &args.namespace, &args.service_account);
    let certs = CertManager::new(args.ca()?, args.workload_cert_ttl);
    let tls = Arc::new(TlsContext::new(certs.clone(), &args.trust_domain)?);
    certs
        .get(&identity)
        .await
        .with_context(|| format!("the waypoint's certificate ({identity})"))?;

    let state = workload_state(&args).await?;

    let waypoint = WaypointRef {
        namespace: args.namespace.clone(),
        name: args.name.clone(),
    };
    let (l7, fingerprint) = l7config::load(&args.l7_config, &waypoint)?;
    info!(
        policies = l7.policies.len(),
        routes = l7.routes.len(),
        files = %l7config::describe(&args.l7_config),
        "L7 configuration loaded"
    );
    let (l7_tx, l7_rx) = watch::channel(Arc::new(l7));
    tokio::spawn(l7config::watch(
        args.l7_config.clone(),
        waypoint,
        fingerprint,
        l7_tx,
    ));

    let baggage = state
        .borrow()
        .workload_by_ip(args.pod_ip)
        .map(|w| ztunnel::proxy::hbone::baggage(w))
        .unwrap_or_default();
    if baggage.is_empty() {
        warn!(pod_ip = %args.pod_ip, "the waypoint's own address is not a workload in --config; destinations will not know it by name");
    }
    let metrics = Metrics::new();
    let (drain_tx, drain_signal) = watch::channel(false);
    let drain = ztunnel::proxy::Drain {
        signal: drain_signal,
        tasks: tokio_util::task::TaskTracker::new(),
    };
    let wp = Arc::new(Waypoint {
        state,
        l7: l7_rx,
        upstreams: Upstreams::new(
            Pool::from_own_address(tls.clone()),
            identity.clone(),
            args.pod_ip,
            baggage,
        ),
        metrics: metrics.clone(),
        identity: identity.clone(),
        drain: drain.clone(),
    });

    let hbone = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let admin = TcpListener::bind(args.metrics_address)
        .await
        .with_context(|| format!("--metrics-address {}", args.metrics_address))?;
    info!(listen = %args.listen, metrics = %args.metrics_address, %identity, "waypoint ready");
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
    tokio::spawn(serve_metrics(admin, metrics, ready.clone()));
    {
        let certs = certs.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                certs.maintain(std::slice::from_ref(&identity));
            }
        });
    }
    let mut serving = tokio::spawn(server::serve(hbone, tls, identity, wp, args.limits()));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
        _ = &mut serving => {
            error!("the HBONE listener stopped");
            return Ok(());
        }
    }
    // Readiness fails first, so new clients go elsewhere; the listener
    // stops; connections finish what is in flight (GOAWAY for HTTP/2 and
    // HBONE, `Connection: close` for HTTP/1.1), up to the deadline.
    ready.store(false, std::sync::atomic::Ordering::Release);
    let _ = drain_tx.send(true);
    drain.tasks.close();
    let started = std::time::Instant::now();
    match tokio::time::timeout(args.drain_deadline, drain.tasks.wait()).await {
        Ok(()) => info!(took = ?started.elapsed(), "drained: every connection finished"),
        Err(_) => warn!(
            deadline = ?args.drain_deadline,
            left = drain.tasks.len(),
            "drain deadline reached; closing the connections still open"
        ),
    }
    Ok(())
}

/// Workloads and services, in the same snapshot ztunnel builds: from the
/// file (watched) or from the control plane (the first complete push, then
/// every later one).
async fn workload_state(args: &Args) -> anyhow::Result<watch::Receiver<Arc<Snapshot>>> {
    let trust_domain = args.trust_domain.clone();
    let snapshot = move |c: &LocalConfig| Arc::new(Snapshot::new("", &trust_domain, c));
    match (&args.config, &args.xds_address) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--config {}", path.display()))?;
            let config = LocalConfig::parse(&text, path)?;
            let (tx, rx) = watch::channel(snapshot(&config));
            tokio::spawn(ztunnel::config::source::watch_file(
                path.clone(),
                text,
                l7config::POLL,
                move |c| tx.send(snapshot(&c)).is_ok(),
            ));
            Ok(rx)
        }
        (None, Some(address)) => {
            let endpoint = args.endpoint(address, &args.xds_root_ca, &args.alt_xds_hostname);
            // Istio's node metadata, as ztunnel sends it: istiod serves
            // the workload and service addresses to such a node.
            let ip = args.pod_ip.to_string();
            let node = ztunnel::xds::NodeIdentity {
                id: format!(
                    "ztunnel~{ip}~{}.{ns}~{ns}.svc.cluster.local",
                    args.pod_name,
                    ns = args.namespace
                ),
                metadata: [
                    ("NAME", args.pod_name.clone()),
                    ("NAMESPACE", args.namespace.clone()),
                    ("INSTANCE_IPS", ip),
                    ("NODE_NAME", args.node_name.clone()),
                    ("CLUSTER_ID", args.cluster_id.clone()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            };
            let (client, mut updates) = ztunnel::xds::XdsClient::new(endpoint, node);
            tokio::spawn(client.run());
            info!(%address, "waiting for the control plane's first complete push");
            let first = updates
                .wait_for(Option::is_some)
                .await
                .map_err(|_| anyhow::anyhow!("the xDS client stopped"))?
                .clone()
                .ok_or_else(|| anyhow::anyhow!("no configuration"))?;
            let (tx, rx) = watch::channel(snapshot(&first));
            tokio::spawn(async move {
                while updates.changed().await.is_ok() {
                    let Some(config) = updates.borrow_and_update().clone() else { continue };
                    if tx.send(snapshot(&config)).is_err() {
                        return;
                    }
                }
            });
            Ok(rx)
        }
        (None, None) => anyhow::bail!(
            "no workload state: give --config FILE (LOCAL_XDS_PATH) or --xds-address URL (XDS_ADDRESS)"
        ),
    }
}

/// `/metrics` and `/healthz/ready` (503 once draining), over plain HTTP/1.1.
async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    ztunnel::accept::accept_until_drained("metrics", &listener, None, |stream, _| {
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let ready = ready.load(std::sync::atomic::Ordering::Acquire);
                async move {
                    let (status, body, kind) = match request.uri().path() {
                        "/metrics" | "/stats/prometheus" => (
                            200,
                            metrics.render(),
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                        "/healthz/ready" if ready => (200, "ready\n".to_string(), "text/plain"),
                        "/healthz/ready" => (503, "draining\n".to_string(), "text/plain"),
                        _ => (404, "not found\n".to_string(), "text/plain"),
                    };
                    http::Response::builder()
                        .status(status)
                        .header(http::header::CONTENT_TYPE, kind)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    })
    .await
}
