//! The pod watcher: this node's pods and every namespace, from the
//! Kubernetes API. It says which pod addresses ambient mode captures (from
//! the pods' status, and from the CNI plugin before the status has them),
//! and once capture is attached for a pod it annotates the pod so istiod
//! treats it as a mesh workload; a pod that leaves ambient mode loses the
//! annotation.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

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
use crate::config::local::CaptureExclusions;

/// Annotations that failed are tried again at least this often.
const RETRY: Duration = Duration::from_secs(5);
/// How long one annotation may take.
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What enrollment needs to know of an ambient pod to stand in for its
/// workload until the configuration source has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmbientPod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// What its annotations exclude from outbound capture (nothing when
    /// they are invalid: see [`ambient::exclusions`]).
    pub exclusions: CaptureExclusions,
}

/// The addresses ambient mode captures on this node, and whose they are.
pub type Wanted = BTreeMap<Ipv4Addr, AmbientPod>;

/// `namespace/name`.
pub type PodName = (String, String);

/// The watcher's view, shared with the CNI server.
pub struct Enrollment {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    /// Addresses the CNI plugin announced for pods whose status does not
    /// list them yet, with the sandbox (container id) they were set up for.
    announced: Mutex<HashMap<PodName, (String, Vec<Ipv4Addr>)>>,
    changed: Arc<Notify>,
    /// Set once pods and namespaces have been listed.
    ready: std::sync::atomic::AtomicBool,
    /// The addresses capture is attached for.
    pub captured: watch::Receiver<super::Captured>,
}

impl Enrollment {
    /// Starts watching this node's pods and every namespace.
    pub fn watch(
        client: &Client,
        node: &str,
        captured: watch::Receiver<super::Captured>,
    ) -> Arc<Self> {
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
        Arc::new(Enrollment {
            pods,
            namespaces,
            announced: Mutex::new(HashMap::new()),
            changed,
            ready: std::sync::atomic::AtomicBool::new(false),
            captured,
        })
    }

    /// The pod `namespace/name` as the API last showed it, if it did.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }

    /// Whether `pod` is in ambient mode, with its namespace as last seen.
    pub fn wants_capture(&self, pod: &Pod) -> bool {
        let ns = self
            .namespaces
            .get(&ObjectRef::new(&pod.namespace().unwrap_or_default()));
        ambient::wants_capture(pod, ns.as_deref())
    }

    /// Adds (`Some`) or forgets (`None`) addresses the CNI plugin gave for
    /// a pod's sandbox `container`, and wakes the watcher. Forgetting is
    /// for that sandbox only: a late DEL of an earlier sandbox of the same
    /// pod leaves the new one's addresses in place.
    pub fn announce(&self, pod: PodName, container: &str, ips: Option<Vec<Ipv4Addr>>) {
        {
            let mut announced = self.announced.lock().unwrap_or_else(|p| p.into_inner());
            match ips {
                Some(ips) => {
                    announced.insert(pod, (container.to_string(), ips));
                }
                None => {
                    if announced.get(&pod).is_some_and(|(c, _)| c == container) {
                        announced.remove(&pod);
                    }
                }
            }
        }
        self.changed.notify_one();
    }

    /// Whether the watch has listed pods and namespaces once.
    pub fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The namespace as last seen.
    pub fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&ObjectRef::new(name))
    }

    /// The pod's addresses: its status's, and what the plugin announced.
    fn addresses(&self, pod: &Pod) -> Vec<Ipv4Addr> {
        let mut ips = ambient::ipv4_addresses(pod);
        let key = (pod.namespace().unwrap_or_default(), pod.name_any());
        if let Some(more) = self
            .announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            ips.extend(&more.1);
        }
        ips.sort();
        ips.dedup();
        ips
    }

    /// Forgets announcements for pods the API no longer shows.
    fn prune(&self) {
        let mut announced = self.announced.lock().unwrap_or_else(|p| p.into_inner());
        announced.retain(|(ns, name), _| self.pods.get(&ObjectRef::new(name).within(ns)).is_some());
    }
}

/// Runs until the process ends: keeps `wanted` (this node's ambient pods
/// by address) current, and the pods' annotations in line with what
/// capture is attached for.
pub async fn run(
    client: Client,
    node: String,
    enrollment: Arc<Enrollment>,
    wanted: watch::Sender<Option<Wanted>>,
) {
    let e = &enrollment;
    if e.pods.wait_until_ready().await.is_err() || e.namespaces.wait_until_ready().await.is_err() {
        return;
    }
    e.ready.store(true, std::sync::atomic::Ordering::Release);
    info!(%node, pods = e.pods.len(), namespaces = e.namespaces.len(), "Kubernetes pods listed");
    let mut captured = e.captured.clone();
    let mut retry = tokio::time::interval(RETRY);
    // Bad exclusion annotations already reported, so each is logged once.
    let mut reported: HashMap<PodName, String> = HashMap::new();
    loop {
        e.prune();
        let mut addresses = Wanted::new();
        let mut decided = Vec::new();
        for pod in e.pods.state() {
            let wants = e.wants_capture(&pod);
            let ips = e.addresses(&pod);
            if wants {
                let key = (pod.namespace().unwrap_or_default(), pod.name_any());
                let exclusions = match ambient::exclusions(&pod) {
                    Ok(x) => {
                        reported.remove(&key);
                        x
                    }
                    Err(error) => {
                        if reported.get(&key) != Some(&error) {
                            warn!(pod = %format!("{}/{}", key.0, key.1), %error, "ignoring the pod's capture exclusions: all its traffic is captured");
                            reported.insert(key, error);
                        }
                        CaptureExclusions::default()
                    }
                };
                let who = AmbientPod {
                    uid: pod.uid().unwrap_or_default(),
                    name: pod.name_any(),
                    namespace: pod.namespace().unwrap_or_default(),
                    service_account: pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_else(|| "default".into()),
                    exclusions,
                };
                addresses.extend(ips.iter().map(|ip| (*ip, who.clone())));
            }
            decided.push((pod, wants, ips));
        }
        wanted.send_if_modified(|w| {
            let new = Some(addresses);
            let differs = *w != new;
            *w = new;
            differs
        });
        let captured_now = captured.borrow_and_update().clone();
        for (pod, wants, ips) in decided {
            let attached = !ips.is_empty() && ips.iter().all(|ip| captured_now.contains_key(ip));
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
            _ = e.changed.notified() => {}
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
    // Bounded: a slow API server must not hold up enrollment, which the
    // CNI plugin waits on. A patch that did not finish is tried again.
    let patched = tokio::time::timeout(
        PATCH_TIMEOUT,
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await
    .unwrap_or_else(|_| {
        Err(kube::Error::Service(
            format!("no answer within {PATCH_TIMEOUT:?}").into(),
        ))
    });
    match patched {
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
