//! Pod enrollment from the Kubernetes API, in place of istio-cni's node
//! agent (`--enroll-pods`). The watcher decides which of this node's pods
//! are in ambient mode; their addresses are enrolled on top of whatever the
//! configuration source says, so capture attaches before istiod has heard
//! of them; then each is annotated, which is istiod's cue to mark it HBONE
//! and sign its certificates.

pub mod ambient;
mod cni;
mod enroller;

use std::{collections::BTreeSet, net::Ipv4Addr, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::{info, warn};

pub use enroller::{AmbientPod, Wanted};

/// The host-side veth of each address, as the CNI plugin reported it from
/// the previous plugin's result: where a new pod's packets come from, said
/// by the runtime rather than learned from ARP, which any pod can forge.
pub type HostVeths = std::collections::BTreeMap<Ipv4Addr, String>;

/// The addresses capture is attached for, each with the interface its
/// packets are checked against (the veth, or the bridge port).
pub type Captured = std::collections::BTreeMap<Ipv4Addr, Option<String>>;

use crate::config::{
    local::{Authorization, InboundProtocol, LocalConfig, LocalWorkload, RbacAction, RbacScope},
    source::Feed,
};

/// How often a start still waiting for the API says so.
const WAITING_LOG: Duration = Duration::from_secs(10);
/// The policy that holds a pod known only from the API (its workload not
/// yet in the configuration source) at deny-all inbound: its own policies
/// are not known yet, and an ALLOW among them would otherwise fail open.
const PENDING_POLICY: &str = "ztunnel-pending-workload";

/// The pod watcher, started ahead of the configuration source.
pub struct Watcher {
    wanted: watch::Receiver<Option<Wanted>>,
}

/// Starts the watcher (annotating pods as `captured`, the addresses
/// capture is attached for, allows) and, with `cni_socket`, the CNI
/// plugin's server. Both start before the configuration source has
/// answered: a node whose istiod is not up yet (istiod's own pod, say)
/// still answers the plugin for pods outside ambient mode.
pub async fn start(
    node: &str,
    captured: watch::Receiver<Captured>,
    cni_socket: Option<PathBuf>,
    host_veths: watch::Sender<HostVeths>,
) -> anyhow::Result<Watcher> {
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("--enroll-pods: no Kubernetes API (KUBECONFIG, or in-cluster): {e}")
    })?;
    let enrollment = enroller::Enrollment::watch(&client, node, captured);
    if let Some(path) = cni_socket {
        let listener = cni::bind(&path)?;
        tokio::spawn(cni::serve(listener, path, enrollment.clone(), host_veths));
    }
    let (wanted_tx, wanted) = watch::channel(None);
    tokio::spawn(enroller::run(
        client,
        node.to_string(),
        enrollment,
        wanted_tx,
    ));
    Ok(Watcher { wanted })
}

/// Wraps `feed` so that every configuration it gives also enrolls this
/// node's ambient pods. Waits for the watcher's first list of pods and
/// namespaces: until then capture would release pods enrolled before a
/// restart.
pub async fn enroll(node: &str, feed: Feed, watcher: Watcher) -> anyhow::Result<Feed> {
    let mut wanted = watcher.wanted;
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
/// (`protocol: HBONE`), whatever the source said, if they are the same pod
/// (namespace and name). An address no workload
/// has yet (a pod the CNI plugin announced before istiod lists it) gets a
/// workload made from its pod, denied all inbound until the source has it.
pub fn overlay(config: &LocalConfig, node: &str, enrolled: &Wanted) -> LocalConfig {
    let mut config = config.clone();
    let mut known = BTreeSet::new();
    for w in config.workloads.iter_mut() {
        // An address of an ambient pod held by another workload in the
        // source (a pod that had it before, not yet removed there) is the
        // pod's now: the stale workload loses it, so the pod is never
        // given that workload's identity.
        w.workload_ips.retain(|ip| match ip {
            std::net::IpAddr::V4(v4) => enrolled
                .get(v4)
                .is_none_or(|pod| pod.namespace == w.namespace && pod.name == w.name),
            std::net::IpAddr::V6(_) => true,
        });
        let ips: Vec<Ipv4Addr> = w
            .workload_ips
            .iter()
            .filter_map(|ip| match ip {
                std::net::IpAddr::V4(v4) => Some(*v4),
                std::net::IpAddr::V6(_) => None,
            })
            .collect();
        known.extend(ips.iter().copied());
        if w.node != node {
            continue;
        }
        if let Some(pod) = ips.iter().find_map(|ip| enrolled.get(ip)) {
            w.protocol = InboundProtocol::HBONE;
            // The pod's annotations, when it has any, over the source's.
            if !pod.exclusions.is_empty() {
                w.capture_exclusions = pod.exclusions.clone();
            }
        }
    }
    config
        .workloads
        .retain(|w| !w.workload_ips.is_empty() || !w.hostname.is_empty());
    let mut pending: BTreeSet<String> = BTreeSet::new();
    for (ip, pod) in enrolled.iter().filter(|(ip, _)| !known.contains(ip)) {
        config.workloads.push(stand_in(*ip, pod, node));
        pending.insert(pod.namespace.clone());
    }
    for namespace in pending {
        config.policies.push(Authorization {
            name: PENDING_POLICY.into(),
            namespace,
            scope: RbacScope::WorkloadSelector,
            action: RbacAction::Deny,
            // One rule with no clauses: it matches every connection.
            rules: vec![Vec::new()],
            dry_run: false,
        });
    }
    config
}

/// The workload of a pod known only from the API.
fn stand_in(ip: Ipv4Addr, pod: &AmbientPod, node: &str) -> LocalWorkload {
    LocalWorkload {
        workload_ips: vec![ip.into()],
        waypoint: None,
        network_gateway: None,
        protocol: InboundProtocol::HBONE,
        network_mode: Default::default(),
        uid: pod.uid.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        trust_domain: String::new(),
        service_account: pod.service_account.clone(),
        network: String::new(),
        workload_name: pod.name.clone(),
        workload_type: "pod".into(),
        canonical_name: String::new(),
        canonical_revision: String::new(),
        hostname: String::new(),
        node: node.to_string(),
        native_tunnel: false,
        application_tunnel: None,
        authorization_policies: vec![format!("{}/{PENDING_POLICY}", pod.namespace)],
        status: Default::default(),
        cluster_id: String::new(),
        locality: None,
        capacity: None,
        services: Default::default(),
        capture_exclusions: pod.exclusions.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> AmbientPod {
        AmbientPod {
            uid: format!("uid-{name}"),
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
            exclusions: Default::default(),
        }
    }

    #[test]
    fn a_stale_workload_at_a_pods_address_does_not_lend_it_its_identity() {
        let ip: Ipv4Addr = "10.0.0.7".parse().unwrap();
        let mut old = stand_in(ip, &pod("old"), "node1");
        old.protocol = InboundProtocol::TCP;
        old.authorization_policies.clear();
        let config = LocalConfig {
            workloads: vec![old],
            ..Default::default()
        };
        let wanted = Wanted::from([(ip, pod("new"))]);
        let out = overlay(&config, "node1", &wanted);
        let at_ip: Vec<&LocalWorkload> = out
            .workloads
            .iter()
            .filter(|w| w.workload_ips.contains(&ip.into()))
            .collect();
        assert_eq!(at_ip.len(), 1);
        assert_eq!(at_ip[0].name, "new");
        assert_eq!(at_ip[0].service_account, "new");
        assert!(at_ip[0].authorization_policies[0].ends_with(PENDING_POLICY));
        assert!(
            !out.workloads.iter().any(|w| w.name == "old"),
            "the emptied stale workload goes"
        );

        // The same pod in the source: enrolled as it is, no stand-in.
        let mut same = stand_in(ip, &pod("new"), "node1");
        same.protocol = InboundProtocol::TCP;
        same.authorization_policies = vec!["default/allow-web".into()];
        let config = LocalConfig {
            workloads: vec![same],
            ..Default::default()
        };
        let out = overlay(&config, "node1", &wanted);
        assert_eq!(out.workloads.len(), 1);
        assert_eq!(out.workloads[0].protocol, InboundProtocol::HBONE);
        assert_eq!(
            out.workloads[0].authorization_policies,
            ["default/allow-web"]
        );
        assert!(out.policies.is_empty());
    }
}
