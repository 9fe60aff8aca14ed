//! The pod watcher: this node's pods and every namespace, from the
//! Kubernetes API. It says which pod addresses ambient mode captures, and
//! once capture is attached for a pod it annotates the pod so istiod treats
//! it as a mesh workload; a pod that leaves ambient mode loses the
//! annotation.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, ResourceExt,
};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::ambient::{self, REDIRECTION_ANNOTATION, REDIRECTION_ENABLED};

/// Annotations that failed are tried again at least this often.
const RETRY: Duration = Duration::from_secs(5);

/// Runs until the process ends: keeps `wanted` (the addresses of this
/// node's ambient pods) current, and the pods' annotations in line with
/// `captured` (the addresses capture is attached for).
pub async fn run(
    client: Client,
    node: String,
    wanted: watch::Sender<Option<BTreeSet<Ipv4Addr>>>,
    mut captured: watch::Receiver<BTreeSet<Ipv4Addr>>,
) {
    let changed = Arc::new(Notify::new());
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        changed.clone(),
    );
    let namespaces = reflect(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
    );
    if pods.wait_until_ready().await.is_err() || namespaces.wait_until_ready().await.is_err() {
        return;
    }
    info!(%node, pods = pods.len(), namespaces = namespaces.len(), "Kubernetes pods listed");
    let mut retry = tokio::time::interval(RETRY);
    loop {
        let state = pods.state();
        let mut addresses = BTreeSet::new();
        let mut decided = Vec::with_capacity(state.len());
        for pod in state {
            let ns = namespaces.get(&ObjectRef::new(&pod.namespace().unwrap_or_default()));
            let wants = ambient::wants_capture(&pod, ns.as_deref());
            let ips = ambient::ipv4_addresses(&pod);
            if wants {
                addresses.extend(ips.iter().copied());
            }
            decided.push((pod, wants, ips));
        }
        wanted.send_if_modified(|w| {
            let new = Some(addresses.clone());
            let differs = *w != new;
            *w = new;
            differs
        });
        let captured_now = captured.borrow_and_update().clone();
        for (pod, wants, ips) in decided {
            let attached = !ips.is_empty() && ips.iter().all(|ip| captured_now.contains(ip));
            let annotated = ambient::is_annotated(&pod);
            // Annotated only once capture is in place; un-annotated only
            // when the pod leaves ambient mode (not while its capture is
            // still being attached, say after a restart).
            let value = match (wants && attached, annotated) {
                (true, false) => Some(REDIRECTION_ENABLED),
                (false, true) if !wants => None,
                _ => continue,
            };
            annotate(&client, &pod, value).await;
        }
        tokio::select! {
            _ = changed.notified() => {}
            r = captured.changed() => if r.is_err() { return },
            _ = retry.tick() => {}
        }
    }
}

/// A store of `api`'s objects kept current in the background; `changed` is
/// notified at every event.
fn reflect<K>(api: Api<K>, config: watcher::Config, changed: Arc<Notify>) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                warn!(error = %e, "watching the Kubernetes API (retrying)");
            }
            changed.notify_one();
        }
    });
    store
}

/// Sets (`Some`) or removes (`None`) the redirection annotation.
async fn annotate(client: &Client, pod: &Pod, value: Option<&str>) {
    let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    let api = Api::<Pod>::namespaced(client.clone(), &namespace);
    let patch = serde_json::json!({
        "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } }
    });
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => match value {
            Some(_) => {
                info!(pod = %format!("{namespace}/{name}"), "pod captured; annotated for istiod")
            }
            None => {
                info!(pod = %format!("{namespace}/{name}"), "pod left ambient mode; annotation removed")
            }
        },
        Err(e) => {
            warn!(pod = %format!("{namespace}/{name}"), error = %e, "annotating the pod failed; will retry")
        }
    }
}
