//! Pod enrollment from the Kubernetes API, in place of istio-cni's node
//! agent (`--enroll-pods`). The watcher decides which of this node's pods
//! are in ambient mode; their addresses are enrolled on top of whatever the
//! configuration source says, so capture attaches before istiod has heard
//! of them; then each is annotated, which is istiod's cue to mark it HBONE
//! and sign its certificates.

pub mod ambient;
mod enroller;

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{
    local::{InboundProtocol, LocalConfig},
    source::Feed,
};

/// How often a start still waiting for the API says so.
const WAITING_LOG: Duration = Duration::from_secs(10);

/// Wraps `feed` so that every configuration it gives also enrolls this
/// node's ambient pods, and starts the watcher (annotating pods as
/// `captured`, the addresses capture is attached for, allows). Waits for
/// the first list of pods and namespaces: until then capture would release
/// pods enrolled before a restart.
pub async fn enroll(
    node: &str,
    feed: Feed,
    captured: watch::Receiver<BTreeSet<Ipv4Addr>>,
) -> anyhow::Result<Feed> {
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("--enroll-pods: no Kubernetes API (KUBECONFIG, or in-cluster): {e}")
    })?;
    let (wanted_tx, mut wanted) = watch::channel(None);
    tokio::spawn(enroller::run(client, node.to_string(), wanted_tx, captured));
    info!("waiting for the Kubernetes API's pods and namespaces");
    let first = loop {
        match tokio::time::timeout(WAITING_LOG, wanted.wait_for(Option::is_some)).await {
            Ok(Ok(w)) => break w.clone().unwrap_or_default(),
            Ok(Err(_)) => anyhow::bail!("the Kubernetes pod watcher stopped"),
            Err(_) => {
                warn!("still waiting for the Kubernetes API's first list of pods and namespaces")
            }
        }
    };
    let node = node.to_string();
    let initial = Arc::new(overlay(&feed.initial, &node, &first));
    let (tx, updates) = watch::channel(Some(initial.clone()));
    let mut source = feed.updates;
    tokio::spawn(async move {
        let mut config = feed.initial;
        loop {
            tokio::select! {
                r = source.changed() => {
                    if r.is_err() { return }
                    if let Some(c) = source.borrow_and_update().clone() { config = c }
                }
                r = wanted.changed() => if r.is_err() { return },
            }
            let enrolled = wanted.borrow_and_update().clone().unwrap_or_default();
            if tx
                .send(Some(Arc::new(overlay(&config, &node, &enrolled))))
                .is_err()
            {
                return;
            }
        }
    });
    Ok(Feed {
        initial,
        updates,
        xds: feed.xds,
    })
}

/// `config` with this node's workloads at `enrolled` addresses enrolled
/// (`protocol: HBONE`), whatever the source said.
pub fn overlay(config: &LocalConfig, node: &str, enrolled: &BTreeSet<Ipv4Addr>) -> LocalConfig {
    let mut config = config.clone();
    for w in config.workloads.iter_mut().filter(|w| w.node == node) {
        let ours = w.workload_ips.iter().any(|ip| match ip {
            std::net::IpAddr::V4(v4) => enrolled.contains(v4),
            std::net::IpAddr::V6(_) => false,
        });
        if ours {
            w.protocol = InboundProtocol::HBONE;
        }
    }
    config
}
