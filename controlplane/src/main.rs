//! `ztunnel-controlplane`: serves a local configuration file to ztunnels
//! over Istio's Delta ADS and signs their workloads' certificates, so that
//! nodes run as they would beside istiod and never hold the CA key.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use tracing::info;
use ztunnel::{
    config::{local::LocalConfig, source::watch_file},
    identity::LocalCa,
};
use ztunnel_controlplane::{ControlPlane, Nodes, Settings};

/// How often the configuration file is checked: pushes in the lab follow
/// an edit within this.
const CONFIG_POLL: Duration = Duration::from_millis(200);

#[derive(Parser)]
#[command(name = "ztunnel-controlplane", version, about)]
struct Args {
    /// Workloads, services and policies in the local-file schema; watched.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,

    /// The CA in Istio's plug-in layout (ca-cert.pem, ca-key.pem,
    /// root-cert.pem, cert-chain.pem). Only this process reads its key.
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,

    /// Where to serve xDS and the CA (TLS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,

    /// A node allowed in: `NODE=FILE`, FILE holding the node's bearer
    /// token (repeatable).
    #[arg(long = "token", value_name = "NODE=FILE", required = true)]
    tokens: Vec<String>,

    /// A name (DNS or IP) of the serving certificate (repeatable).
    #[arg(long = "server-name", default_value = "istiod.istio-system.svc")]
    server_names: Vec<String>,

    #[arg(long, default_value = ztunnel::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,

    /// Longest certificate lifetime granted.
    #[arg(long, default_value = "24h", value_parser = ztunnel::config::parse_duration)]
    max_cert_ttl: Duration,
}

fn tokens(specs: &[String]) -> anyhow::Result<Nodes> {
    let mut pairs = Vec::new();
    for spec in specs {
        let (node, file) = spec
            .split_once('=')
            .with_context(|| format!("--token {spec}: expected NODE=FILE"))?;
        let token = std::fs::read_to_string(file)
            .with_context(|| format!("--token {spec}: reading {file}"))?;
        pairs.push((node.to_string(), token.trim().to_string()));
    }
    Nodes::new(pairs).map_err(|e| anyhow::anyhow!("--token: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let config = LocalConfig::parse(&text, &args.config)?;
    let settings = Settings {
        listen: args.listen,
        ca: LocalCa::load(&args.ca_dir)?,
        server_names: args.server_names.clone(),
        nodes: tokens(&args.tokens)?,
        trust_domain: args.trust_domain.clone(),
        max_cert_ttl: args.max_cert_ttl,
    };
    let control_plane = ControlPlane::new(config);
    // Each valid new version is served; a bad one is logged and the
    // previous one kept.
    let served = control_plane.clone();
    tokio::spawn(watch_file(
        args.config.clone(),
        text,
        CONFIG_POLL,
        move |config| {
            served.update(config);
            true
        },
    ));
    info!(listen = %args.listen, config = %args.config.display(), "serving xDS and the CA");
    control_plane.serve(settings).await
}
