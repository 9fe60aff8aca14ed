//! A scripted Kubernetes API server for the pod watcher's tests: namespaces
//! and pods the test sets, served over the API's list and watch calls
//! (JSON, HTTP/1.1, watch events streamed as lines), and every PATCH of a
//! pod applied as a JSON merge patch and recorded. It runs in node1's
//! namespace on the underlay address, where both nodes' ztunnels reach it,
//! as they would reach a real API server.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::{
    lab::{Lab, PodSpec, NODES, PODS},
    served::Served,
    setup::Setup,
    ztunnel::Ztunnel,
};

/// The port it serves on.
pub const PORT: u16 = 6443;

/// What the test learns about one PATCH.
#[derive(Debug, Clone)]
pub struct PatchRecord {
    pub namespace: String,
    pub name: String,
    pub body: Value,
    /// What the patch hook said when the patch arrived.
    pub note: String,
}

type Hook = Box<dyn Fn(&str, &str) -> String + Send>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Namespace,
    Pod,
}

struct Watcher {
    kind: Kind,
    /// `spec.nodeName` the watch selects, for pods.
    node: Option<String>,
    events: mpsc::UnboundedSender<Bytes>,
}

/// One change, kept so a watch that starts from an older version gets
/// what it missed.
struct LoggedEvent {
    resource_version: u64,
    kind: Kind,
    node: Option<String>,
    line: Bytes,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    log: Vec<LoggedEvent>,
    namespaces: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    watchers: Vec<Watcher>,
    patches: Vec<PatchRecord>,
    hook: Option<Hook>,
}

impl State {
    fn bump(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    /// Logs `event` and sends it to the watches of `kind` that select
    /// `object`.
    fn broadcast(&mut self, kind: Kind, event: &str, object: &Value) {
        let node = object["spec"]["nodeName"].as_str().map(str::to_string);
        let line = Bytes::from(format!("{}\n", json!({"type": event, "object": object})));
        self.log.push(LoggedEvent {
            resource_version: self.resource_version,
            kind,
            node: node.clone(),
            line: line.clone(),
        });
        self.watchers.retain(|w| {
            if w.kind != kind || (w.node.is_some() && w.node != node) {
                return true;
            }
            w.events.send(line.clone()).is_ok()
        });
    }
}

/// The server; stops on drop.
pub struct ApiServer {
    pub address: SocketAddr,
    state: Arc<Mutex<State>>,
    server: Served,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl ApiServer {
    pub fn start(lab: &Lab) -> Result<Self> {
        let address = SocketAddr::from((lab.node("node1").underlay_ip, PORT));
        let state = Arc::new(Mutex::new(State::default()));
        let served = state.clone();
        let dir = std::env::temp_dir().join(format!("{}-apiserver", lab.prefix));
        let server = Served::start(
            &lab.node("node1").ns,
            address,
            dir,
            "the API server",
            move || async move {
                let listener = tokio::net::TcpListener::bind(address).await?;
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = served.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(&state, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            },
        )?;
        Ok(ApiServer {
            address,
            state,
            server,
        })
    }

    /// A kubeconfig that points at this server.
    pub fn kubeconfig(&self) -> Result<PathBuf> {
        let path = self.server.dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\ncurrent-context: lab\nusers:\n- name: lab\n  user: {{}}\n",
                self.address
            ),
        )?;
        Ok(path)
    }

    /// Creates or replaces namespace `name` with `labels`.
    pub fn set_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let mut s = lock(&self.state);
        let rv = s.bump();
        let object = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": format!("ns-{name}"), "resourceVersion": rv,
                         "labels": labels_json(labels)},
        });
        let event = if s.namespaces.contains_key(name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.namespaces.insert(name.to_string(), object.clone());
        s.broadcast(Kind::Namespace, event, &object);
    }

    /// Creates or replaces the pod of lab pod `spec` in `default`, with
    /// `labels`; annotations already on it stay.
    pub fn set_pod(&self, spec: &PodSpec, labels: &[(&str, &str)]) {
        self.put_pod("default", spec, labels, true)
    }

    /// A pod scheduled to its node whose sandbox is being set up: `Pending`,
    /// no address yet (what the API shows while the CNI plugins run).
    pub fn set_new_pod(&self, namespace: &str, spec: &PodSpec, labels: &[(&str, &str)]) {
        self.put_pod(namespace, spec, labels, false)
    }

    fn put_pod(&self, namespace: &str, spec: &PodSpec, labels: &[(&str, &str)], running: bool) {
        let mut s = lock(&self.state);
        let rv = s.bump();
        let key = (namespace.to_string(), spec.name.to_string());
        let annotations = s
            .pods
            .get(&key)
            .map(|p| p["metadata"]["annotations"].clone())
            .unwrap_or_else(|| json!({}));
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": spec.name, "namespace": namespace, "uid": format!("pod-{}", spec.name),
                         "resourceVersion": rv, "labels": labels_json(labels), "annotations": annotations},
            "spec": {"nodeName": NODES[spec.node], "serviceAccountName": spec.service_account,
                     "containers": [{"name": "app", "image": "app"}]},
            "status": if running {
                json!({"phase": "Running", "podIP": spec.ip.to_string(), "podIPs": [{"ip": spec.ip.to_string()}]})
            } else {
                json!({"phase": "Pending"})
            },
        });
        let event = if s.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.pods.insert(key, object.clone());
        s.broadcast(Kind::Pod, event, &object);
    }

    /// Sets (`Some`) or removes an annotation of pod `default/name`, as a
    /// user's `kubectl annotate` would.
    pub fn annotate(&self, name: &str, key: &str, value: Option<&str>) {
        let mut s = lock(&self.state);
        let rv = s.bump();
        let Some(pod) = s.pods.get_mut(&("default".to_string(), name.to_string())) else {
            return;
        };
        let annotations = &mut pod["metadata"]["annotations"];
        if !annotations.is_object() {
            *annotations = json!({});
        }
        match value {
            Some(v) => annotations[key] = Value::String(v.to_string()),
            None => {
                if let Some(map) = annotations.as_object_mut() {
                    map.remove(key);
                }
            }
        }
        pod["metadata"]["resourceVersion"] = json!(rv);
        let object = pod.clone();
        s.broadcast(Kind::Pod, "MODIFIED", &object);
    }

    /// Every PATCH so far.
    pub fn patches(&self) -> Vec<PatchRecord> {
        lock(&self.state).patches.clone()
    }

    /// The annotations the pod holds now.
    pub fn annotations(&self, name: &str) -> Value {
        lock(&self.state)
            .pods
            .get(&("default".to_string(), name.to_string()))
            .map(|p| p["metadata"]["annotations"].clone())
            .unwrap_or(Value::Null)
    }

    /// Runs `hook(namespace, name)` as each PATCH arrives, before it is
    /// applied; what it returns is recorded with the patch.
    pub fn on_patch(&self, hook: impl Fn(&str, &str) -> String + Send + 'static) {
        lock(&self.state).hook = Some(Box::new(hook));
    }

    /// Waits until `check` holds for the patches received.
    pub fn wait_for_patches(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[PatchRecord]) -> bool,
    ) -> Result<Vec<PatchRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            let patches = self.patches();
            if check(&patches) {
                return Ok(patches);
            }
            if Instant::now() > deadline {
                bail!("{what}: not within {timeout:?}; patches so far: {patches:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
    )
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn not_found(what: &str) -> Response<Body> {
    reply(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": what}),
    )
}

fn query_param(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// RFC 7386: `patch` merged into `target`.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn handle(state: &Mutex<State>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let watch = query_param(&query, "watch").is_some_and(|v| v == "true" || v == "1");
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::GET, ["api", "v1", "namespaces"]) => {
            list_or_watch(state, Kind::Namespace, None, watch.then(|| since(&query)))
        }
        (Method::GET, ["api", "v1", "pods"]) => {
            let node = query_param(&query, "fieldSelector")
                .and_then(|s| s.strip_prefix("spec.nodeName=").map(str::to_string));
            list_or_watch(state, Kind::Pod, node, watch.then(|| since(&query)))
        }
        // What deploy/kubernetes/rbac.yaml grants: the status subresource
        // only (which takes metadata too), not the pod itself.
        (Method::PATCH, ["api", "v1", "namespaces", _, "pods", _]) => reply(
            StatusCode::FORBIDDEN,
            json!({"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
                   "message": "pods is forbidden: ztunnel may patch pods/status only"}),
        ),
        (Method::PATCH, ["api", "v1", "namespaces", namespace, "pods", name, "status"]) => {
            let (namespace, name) = (namespace.to_string(), name.to_string());
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return not_found("unreadable body"),
            };
            let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"kind": "Status", "message": "not JSON"}),
                );
            };
            let mut s = lock(state);
            let note = s
                .hook
                .as_ref()
                .map(|h| h(&namespace, &name))
                .unwrap_or_default();
            s.patches.push(PatchRecord {
                namespace: namespace.clone(),
                name: name.clone(),
                body: patch.clone(),
                note,
            });
            let rv = s.bump();
            let Some(pod) = s.pods.get_mut(&(namespace, name.clone())) else {
                return not_found(&format!("pods \"{name}\" not found"));
            };
            merge(pod, &patch);
            pod["metadata"]["resourceVersion"] = Value::String(rv);
            let pod = pod.clone();
            s.broadcast(Kind::Pod, "MODIFIED", &pod);
            reply(StatusCode::OK, pod)
        }
        _ => not_found(&format!("{path} is not scripted")),
    }
}

/// The version a watch starts after.
fn since(query: &str) -> u64 {
    query_param(query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A list, or (`watch`: the version to start after) a watch.
fn list_or_watch(
    state: &Mutex<State>,
    kind: Kind,
    node: Option<String>,
    watch: Option<u64>,
) -> Response<Body> {
    let mut s = lock(state);
    if let Some(after) = watch {
        let (tx, rx) = mpsc::unbounded_channel();
        for e in s.log.iter().filter(|e| {
            e.resource_version > after && e.kind == kind && (node.is_none() || e.node == node)
        }) {
            let _ = tx.send(e.line.clone());
        }
        s.watchers.push(Watcher {
            kind,
            node,
            events: tx,
        });
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map_frames();
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        return response;
    }
    let items: Vec<Value> = match kind {
        Kind::Namespace => s.namespaces.values().cloned().collect(),
        Kind::Pod => s
            .pods
            .values()
            .filter(|p| node.is_none() || p["spec"]["nodeName"].as_str() == node.as_deref())
            .cloned()
            .collect(),
    };
    let list_kind = match kind {
        Kind::Namespace => "NamespaceList",
        Kind::Pod => "PodList",
    };
    reply(
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": list_kind,
               "metadata": {"resourceVersion": s.resource_version.to_string()}, "items": items}),
    )
}

/// Lines of a watch as body frames.
trait MapFrames {
    fn map_frames(
        self,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static;
}

impl MapFrames for tokio_stream::wrappers::UnboundedReceiverStream<Bytes> {
    fn map_frames(
        self,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static
    {
        use futures_util::StreamExt;
        self.map(|b| Ok(Frame::data(b)))
    }
}

/// Whether the pod's capture is in place in the kernel: our program at its
/// veth's ingress in the node namespace `ns`, and its address in the node's
/// pinned pod map (the program lets pods it does not know pass untouched).
pub fn capture_in_place(ns: &Path, veth: &str, pin_dir: &Path, pod: std::net::Ipv4Addr) -> bool {
    let attached = crate::tcx::programs(ns, veth, aya::programs::tc::TcAttachType::Ingress)
        .is_ok_and(|p| p.iter().any(|name| name == "zt_pod_ingress"));
    attached && crate::ztunnel::counters_at(pin_dir, pod).is_ok_and(|c| c.is_some())
}

/// The API server with namespace `default` in ambient mode and every
/// standard lab pod, `plain` opted out. Each PATCH records whether the
/// pod's capture was in the kernel when it arrived (`attached`), for the
/// standard pods and `more` (pods a test adds to the lab later).
pub fn api_server(lab: &Lab, more: &[PodSpec]) -> Result<ApiServer> {
    let api = ApiServer::start(lab)?;
    api.set_namespace("default", &[(MODE_LABEL, "ambient")]);
    for spec in &PODS {
        let labels: &[(&str, &str)] = if spec.name == "plain" {
            &[(MODE_LABEL, "none")]
        } else {
            &[]
        };
        api.set_pod(spec, labels);
    }
    let places: Vec<Place> = PODS
        .iter()
        .chain(more)
        .map(|spec| Place {
            pod: spec.name.to_string(),
            ip: spec.ip,
            ns: lab.nodes[spec.node].ns.path(),
            // As the lab names them.
            veth: format!("vz{}", spec.name),
            pin_dir: lab.nodes[spec.node].pin_dir.clone(),
        })
        .collect();
    api.on_patch(move |_, name| match places.iter().find(|p| p.pod == name) {
        Some(p) if capture_in_place(&p.ns, &p.veth, &p.pin_dir, p.ip) => "attached".into(),
        Some(_) => "not attached".into(),
        None => "unknown pod".into(),
    });
    Ok(api)
}

/// The label namespaces and pods opt in and out with.
pub const MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The annotation istiod waits for.
pub const REDIRECTION: &str = "ambient.istio.io/redirection";

impl PatchRecord {
    /// Whether it sets the redirection annotation.
    pub fn sets_redirection(&self) -> bool {
        self.body["metadata"]["annotations"][REDIRECTION] == "enabled"
    }

    /// Whether it removes the redirection annotation.
    pub fn removes_redirection(&self) -> bool {
        self.body["metadata"]["annotations"]
            .as_object()
            .is_some_and(|a| a.get(REDIRECTION).is_some_and(|v| v.is_null()))
    }
}

/// Where a pod's capture lives: its veth in the node's namespace and the
/// node's pinned maps.
struct Place {
    pod: String,
    ip: std::net::Ipv4Addr,
    ns: PathBuf,
    veth: String,
    pin_dir: PathBuf,
}

/// A ztunnel on `node` that enrolls pods from the API at `kubeconfig`.
pub fn enrolling_ztunnel(
    s: &Setup,
    node: &str,
    kubeconfig: &Path,
    extra: &[&str],
) -> Result<Ztunnel> {
    let kubeconfig = kubeconfig.display().to_string();
    let mut flags = vec!["--enroll-pods"];
    flags.extend_from_slice(extra);
    Ztunnel::start_env(
        s.lab.node(node),
        &s.config,
        &s.lab.ca_dir,
        &flags,
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
}
