//! One request through the waypoint: authorization, routing, the upstream
//! attempt(s), and the telemetry of the outcome.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use tokio::sync::watch;
use tracing::{info, warn};
use ztunnel::{
    identity::Identity,
    state::{Snapshot, Upstream},
};

use crate::{
    l7config::L7Config,
    policy::Decision,
    request::RequestInfo,
    route::Action,
    telemetry::{Metrics, RequestFacts, RequestLabels},
    upstream::{Body, BoxError, UpstreamError, Upstreams},
};

/// Request bodies up to this size are kept so a retry can send them again;
/// larger ones are streamed once.
const REPLAYABLE_BODY: u64 = 64 * 1024;

/// What every request shares.
pub struct Waypoint {
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub l7: watch::Receiver<Arc<L7Config>>,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    /// The waypoint's identity (the `By` of `x-forwarded-client-cert`).
    pub identity: Identity,
    /// Shutdown: connections stop taking new requests, and are waited for.
    pub drain: ztunnel::proxy::Drain,
}

/// One client tunnel: who the client is, what it dialled.
pub struct Tunnel {
    /// The client's address (the tunnel's peer).
    pub peer: SocketAddr,
    /// The identity the client proved in the tunnel's mTLS handshake.
    pub peer_id: Identity,
    /// The CONNECT authority: a service VIP and port, or a pod's.
    pub dst: SocketAddr,
}

/// The outcome of one request, for telemetry.
struct Outcome {
    status: StatusCode,
    flags: &'static str,
    upstream: Option<Upstream>,
    /// The service the request was sent to (a route's backend), when it is
    /// not the one dialled: metrics name the service that served it.
    backend: Option<ServiceName>,
    route: Option<String>,
    policy: Option<String>,
}

/// `(hostname, namespace, name)` of a service.
type ServiceName = (String, String, String);

impl Outcome {
    fn local(status: StatusCode, flags: &'static str, policy: Option<String>) -> Self {
        Outcome {
            status,
            flags,
            upstream: None,
            backend: None,
            route: None,
            policy,
        }
    }
}

/// Serves one request.
pub async fn handle(
    wp: Arc<Waypoint>,
    tunnel: Arc<Tunnel>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let state = wp.state.borrow().clone();
    let l7 = wp.l7.borrow().clone();
    let service = state
        .service_by_vip(tunnel.dst.ip())
        .map(|s| (s.hostname.clone(), s.namespace.clone(), s.name.clone()));
    let method = request.method().clone();
    // One authority, one path: what policy checks is what the backend gets.
    let host = crate::authority::of_request(request.version(), request.uri(), request.headers());
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let principal = tunnel.peer_id.principal();
    // Policies and routes see one spelling of the path, and so does the
    // backend: what is checked is what is served.
    let checked = crate::path::normalize(request.uri().path())
        .map_err(|e| e.to_string())
        .and_then(|path| host.map(|host| (path, host)).map_err(|e| e.to_string()));
    let (path, host) = match checked {
        Ok(checked) => checked,
        Err(reason) => {
            let raw = request.uri().path().to_string();
            let (response, outcome) = failed(StatusCode::BAD_REQUEST, "-", &reason, None, None);
            let described = Described {
                grpc,
                method,
                path: raw,
                host: String::new(),
            };
            return Ok(observe(
                wp,
                tunnel,
                state,
                service,
                described,
                started,
                Arc::new(AtomicU64::new(0)),
                response,
                outcome,
            ));
        }
    };
    let path_and_query = match request.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let info = RequestInfo {
        source_principal: Some(&principal),
        source_namespace: Some(&tunnel.peer_id.namespace),
        source_ip: tunnel.peer.ip(),
        destination_ip: tunnel.dst.ip(),
        destination_port: tunnel.dst.port(),
        method: &method,
        path: &path,
        query: request.uri().query().unwrap_or(""),
        host: &host,
        headers: request.headers(),
    };
    // Policies aimed at a service apply to it whether the client dialled
    // its VIP or one of its pods.
    let services = services_of(&state, tunnel.dst, service.as_ref());
    let service_refs: Vec<(&str, &str)> = services
        .iter()
        .map(|(ns, name)| (ns.as_str(), name.as_str()))
        .collect();
    let decision = l7.policies.evaluate(&service_refs, &info);
    let audited = match &decision {
        Decision::Allow { audited } | Decision::Deny { audited, .. } => audited.clone(),
    };
    for policy in &audited {
        info!(target: "waypoint::audit", policy = %policy, src = %tunnel.peer, principal = %principal, method = %method, path = %path_and_query, "AUDIT policy matched");
    }
    let routed = match (&service, &decision) {
        (_, Decision::Deny { .. }) => None,
        (Some((_, ns, name)), _) => l7.routes.route((ns, name), tunnel.dst.port(), &info),
        (None, _) => None,
    };
    let request_bytes = Arc::new(AtomicU64::new(0));
    let (response, outcome) = match decision {
        Decision::Deny { reason, .. } => {
            wp.metrics.denied.inc();
            (
                text(StatusCode::FORBIDDEN, "RBAC: access denied"),
                Outcome::local(StatusCode::FORBIDDEN, "-", Some(reason)),
            )
        }
        Decision::Allow { .. } => match routed {
            Some(Err(status)) => (
                text(
                    status,
                    if status == StatusCode::NOT_FOUND {
                        ""
                    } else {
                        "no backend"
                    },
                ),
                Outcome::local(
                    status,
                    if status == StatusCode::NOT_FOUND {
                        "NR"
                    } else {
                        "-"
                    },
                    None,
                ),
            ),
            routed => {
                let action = routed.and_then(Result::ok);
                forward(
                    &wp,
                    &tunnel,
                    &state,
                    service.as_ref(),
                    action,
                    request,
                    (&path_and_query, &host),
                    request_bytes.clone(),
                )
                .await
            }
        },
    };
    let described = Described {
        grpc,
        method,
        path: path_and_query,
        host,
    };
    Ok(observe(
        wp,
        tunnel,
        state,
        service,
        described,
        started,
        request_bytes,
        response,
        outcome,
    ))
}

/// Sends the request on: to the route's backend, or to the service (or pod)
/// the client dialled; retried as the route says.
#[allow(clippy::too_many_arguments)] // the request's facts, each used once
async fn forward(
    wp: &Arc<Waypoint>,
    tunnel: &Tunnel,
    state: &Arc<Snapshot>,
    service: Option<&(String, String, String)>,
    action: Option<Action>,
    request: Request<Incoming>,
    (path_and_query, host): (&str, &str),
    request_bytes: Arc<AtomicU64>,
) -> (Response<Body>, Outcome) {
    let route = action.as_ref().map(|a| a.route.clone());
    let backend = action.as_ref().and_then(|a| {
        state
            .services
            .iter()
            .find(|s| s.namespace == a.backend.namespace && s.name == a.backend.name)
            .map(|s| (s.hostname.clone(), s.namespace.clone(), s.name.clone()))
    });
    let h2 = request.version() == Version::HTTP_2;
    let idempotent = matches!(
        *request.method(),
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::TRACE
    );
    let (mut parts, body) = request.into_parts();
    sanitize(&mut parts.headers, tunnel, &wp.identity);
    // The authority policy checked: in Host for HTTP/1.1, in `:authority`
    // (and nowhere else) for HTTP/2.
    if h2 {
        parts.headers.remove(header::HOST);
    } else if let Ok(value) = HeaderValue::from_str(host) {
        parts.headers.insert(header::HOST, value);
    }
    // The normalized path; HTTP/1.1 upstream in origin form (the Host
    // header says the rest), HTTP/2 with the scheme and authority it came with.
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = path_and_query.parse().ok();
    if h2 {
        uri.authority = host.parse().ok().or(uri.authority);
        uri.scheme.get_or_insert(http::uri::Scheme::HTTP);
    } else {
        uri.scheme = None;
        uri.authority = None;
    }
    match http::Uri::from_parts(uri) {
        Ok(uri) => parts.uri = uri,
        Err(e) => {
            return failed(
                StatusCode::BAD_REQUEST,
                "-",
                &format!("request target: {e}"),
                None,
                route,
            )
        }
    }
    let retry = action.as_ref().and_then(|a| a.retry.clone());
    let attempts = retry.as_ref().map(|r| r.attempts).unwrap_or(0);
    // A body is sent again only if it was kept; one too large to keep is
    // sent once.
    let mut replay: Option<Bytes> = None;
    let mut stream: Option<Incoming> = None;
    if attempts > 0
        && body
            .size_hint()
            .upper()
            .is_some_and(|n| n <= REPLAYABLE_BODY)
    {
        match Limited::new(body, REPLAYABLE_BODY as usize).collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                request_bytes.store(bytes.len() as u64, Ordering::Relaxed);
                replay = Some(bytes);
            }
            Err(e) => {
                return failed(
                    StatusCode::BAD_REQUEST,
                    "-",
                    &format!("reading the request body: {e}"),
                    None,
                    route,
                )
            }
        }
    } else {
        stream = Some(body);
    }
    let whole = action.as_ref().and_then(|a| a.request_timeout);
    let each = action.as_ref().and_then(|a| a.backend_timeout);
    let attempt_loop = async {
        let mut last: Option<(Response<Body>, Outcome)> = None;
        for attempt in 0..=attempts {
            if attempt > 0 {
                let backoff = retry.as_ref().map(|r| r.backoff).unwrap_or(Duration::ZERO);
                tokio::time::sleep(backoff).await;
            }
            let upstream = match pick(state, tunnel, service, action.as_ref()) {
                Ok(upstream) => upstream,
                Err(e) => {
                    return failed(
                        StatusCode::SERVICE_UNAVAILABLE,
                        e.flag(),
                        "no healthy upstream",
                        None,
                        route.clone(),
                    )
                }
            };
            let body: Body = match (&replay, stream.take()) {
                (Some(bytes), _) => Full::new(bytes.clone())
                    .map_err(|never| match never {})
                    .boxed(),
                (None, Some(incoming)) => Counted {
                    inner: incoming,
                    bytes: request_bytes.clone(),
                }
                .boxed(),
                // A streamed body went with the first attempt.
                (None, None) => break,
            };
            let upstream_request = Request::from_parts(parts.clone(), body);
            let sent = wp.upstreams.send(state, &upstream, upstream_request, h2);
            let sent = match each {
                Some(limit) => match tokio::time::timeout(limit, sent).await {
                    Ok(sent) => sent,
                    Err(_) => {
                        let out = failed(
                            StatusCode::GATEWAY_TIMEOUT,
                            "UT",
                            "upstream request timeout",
                            Some(upstream),
                            route.clone(),
                        );
                        // The backend may have acted on it: only a request
                        // that may be repeated is.
                        if !idempotent {
                            return out;
                        }
                        last = Some(out);
                        continue;
                    }
                },
                None => sent.await,
            };
            match sent {
                Ok(response) => {
                    let status = response.status();
                    let retry_on = retry
                        .as_ref()
                        .is_some_and(|r| r.codes.contains(&status.as_u16()));
                    let (mut head, body) = response.into_parts();
                    strip_hop_by_hop(&mut head.headers);
                    let out = (
                        Response::from_parts(head, body.map_err(BoxError::from).boxed()),
                        Outcome {
                            status,
                            flags: "-",
                            upstream: Some(upstream),
                            backend: None,
                            route: route.clone(),
                            policy: None,
                        },
                    );
                    if retry_on && attempt < attempts && replay.is_some() {
                        last = Some(out);
                        continue;
                    }
                    return out;
                }
                Err(e) => {
                    warn!(src = %tunnel.peer, upstream = %upstream.addr, error = %e, "upstream request failed");
                    // A request that was written may have been acted on:
                    // only one that may be repeated is sent again.
                    let sent_before_failing = matches!(e, UpstreamError::Reset(_));
                    let give_up = sent_before_failing && !idempotent;
                    last = Some(failed(
                        StatusCode::SERVICE_UNAVAILABLE,
                        e.flag(),
                        &format!("upstream connect error or disconnect/reset before headers. reset reason: {}", match e { UpstreamError::Reset(_) => "connection termination", _ => "connection failure" }),
                        Some(upstream),
                        route.clone(),
                    ));
                    if give_up {
                        break;
                    }
                }
            }
        }
        last.unwrap_or_else(|| {
            failed(
                StatusCode::SERVICE_UNAVAILABLE,
                "UF",
                "upstream connect error",
                None,
                route.clone(),
            )
        })
    };
    let (response, mut outcome) = match whole {
        Some(limit) => match tokio::time::timeout(limit, attempt_loop).await {
            Ok(out) => out,
            Err(_) => failed(
                StatusCode::GATEWAY_TIMEOUT,
                "UT",
                "upstream request timeout",
                None,
                route,
            ),
        },
        None => attempt_loop.await,
    };
    outcome.backend = backend;
    (response, outcome)
}

/// The endpoint for one attempt: of the route's backend, else of the
/// service dialled, else the pod dialled.
pub(crate) fn pick(
    state: &Snapshot,
    tunnel: &Tunnel,
    service: Option<&(String, String, String)>,
    action: Option<&Action>,
) -> Result<Upstream, UpstreamError> {
    match (action, service) {
        (Some(action), _) => Upstreams::pick(
            state,
            &action.backend.namespace,
            &action.backend.name,
            action.backend.port.unwrap_or(tunnel.dst.port()),
        ),
        (None, Some((_, ns, name))) => Upstreams::pick(state, ns, name, tunnel.dst.port()),
        (None, None) => state
            .resolve(tunnel.dst)
            .ok_or_else(|| UpstreamError::NoHealthy(format!("{} is not a workload", tunnel.dst))),
    }
}

/// Headers the client must not set for the backend, and the ones that say
/// who the client is: `x-forwarded-client-cert` from the identity it
/// proved (never the one it sent), and its address in `x-forwarded-for`.
fn sanitize(headers: &mut HeaderMap, tunnel: &Tunnel, own: &Identity) {
    strip_hop_by_hop(headers);
    headers.remove("x-forwarded-client-cert");
    if let Ok(v) = HeaderValue::from_str(&format!("By={own};URI={}", tunnel.peer_id)) {
        headers.insert("x-forwarded-client-cert", v);
    }
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", tunnel.peer.ip()),
        None => tunnel.peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
}

/// Connection-scoped headers (RFC 9110 7.6.1) stay on their hop.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    // Host is the request's, whatever `Connection` says (it is set again
    // from the checked authority anyway).
    for name in named.iter().filter(|n| *n != "host") {
        headers.remove(name.as_str());
    }
    // `te: trailers` is end to end in HTTP/2 (gRPC servers require it).
    let trailers_only = headers
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "trailer",
    ] {
        headers.remove(name);
    }
}

/// The services whose policies apply to a request for `dst`: the one
/// dialled, or every service the dialled pod is an endpoint of, as
/// `(namespace, name)`.
pub(crate) fn services_of(
    state: &Snapshot,
    dst: SocketAddr,
    dialled: Option<&ServiceName>,
) -> Vec<(String, String)> {
    if let Some((_, ns, name)) = dialled {
        return vec![(ns.clone(), name.clone())];
    }
    let Some(workload) = state.workload_by_ip(dst.ip()) else {
        return Vec::new();
    };
    workload
        .services
        .keys()
        .filter_map(|key| state.service_by_host(&key.namespace, &key.hostname))
        .map(|s| (s.namespace.clone(), s.name.clone()))
        .collect()
}

/// A plain-text answer made by the waypoint itself.
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn failed(
    status: StatusCode,
    flags: &'static str,
    body: &str,
    upstream: Option<Upstream>,
    route: Option<String>,
) -> (Response<Body>, Outcome) {
    (
        text(status, body.to_string()),
        Outcome {
            status,
            flags,
            upstream,
            backend: None,
            route,
            policy: None,
        },
    )
}

/// What the access log says of a request.
struct Described {
    grpc: bool,
    method: http::Method,
    /// Path and query.
    path: String,
    host: String,
}

/// Wraps the response so that its metrics and access-log line are written
/// when its body ends (or the client goes away): the duration then covers
/// the whole response, as Istio's does.
#[allow(clippy::too_many_arguments)]
fn observe(
    wp: Arc<Waypoint>,
    tunnel: Arc<Tunnel>,
    state: Arc<Snapshot>,
    service: Option<(String, String, String)>,
    described: Described,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    response: Response<Body>,
    outcome: Outcome,
) -> Response<Body> {
    let (head, body) = response.into_parts();
    let Described {
        grpc,
        method,
        path,
        host,
    } = described;
    let done = move |response_bytes: u64, ending: Ending| {
        let millis = started.elapsed().as_secs_f64() * 1000.0;
        let flags = match ending {
            Ending::Complete => outcome.flags,
            Ending::UpstreamFailed => "UR",
            Ending::Dropped => "DC",
        };
        // The service that served it: a route's backend, else the one dialled.
        let service = outcome.backend.as_ref().or(service.as_ref());
        let source = state.workload_by_ip(tunnel.peer.ip()).cloned();
        let destination = outcome.upstream.as_ref().map(|u| u.workload.clone());
        let labels = RequestLabels::new(&RequestFacts {
            state: &state,
            source: source.as_deref(),
            source_identity: Some(&tunnel.peer_id),
            service: service.map(|(h, n, s)| (h.as_str(), n.as_str(), s.as_str())),
            destination: destination.as_deref(),
            grpc,
            status: outcome.status.as_u16(),
            flags,
        });
        let sent = request_bytes.load(Ordering::Relaxed);
        wp.metrics.record(&labels, millis, sent);
        info!(
            target: "waypoint::access",
            src = %tunnel.peer,
            src_principal = %tunnel.peer_id,
            authority = %tunnel.dst,
            %method,
            %path,
            %host,
            code = outcome.status.as_u16(),
            flags = %flags,
            upstream = %outcome.upstream.as_ref().map(|u| u.addr.to_string()).unwrap_or_else(|| "-".into()),
            route = %outcome.route.as_deref().unwrap_or("-"),
            policy = %outcome.policy.as_deref().unwrap_or("-"),
            bytes_received = sent,
            bytes_sent = response_bytes,
            duration_ms = millis as u64,
            "request"
        );
    };
    Response::from_parts(
        head,
        Observed {
            inner: body,
            bytes: 0,
            done: Some(Box::new(done)),
        }
        .boxed(),
    )
}

type Done = Box<dyn FnOnce(u64, Ending) + Send + Sync>;

/// How a response body ended.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Complete,
    /// The backend's side failed mid-body.
    UpstreamFailed,
    /// The client went away first.
    Dropped,
}

/// A response body that reports when it ended, and how many bytes it had.
struct Observed {
    inner: Body,
    bytes: u64,
    done: Option<Done>,
}

impl Observed {
    fn finish(&mut self, ending: Ending) {
        if let Some(done) = self.done.take() {
            done(self.bytes, ending);
        }
    }
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(Ending::Complete);
                }
            }
            Poll::Ready(None) => self.finish(Ending::Complete),
            Poll::Ready(Some(Err(_))) => self.finish(Ending::UpstreamFailed),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // An empty body may never be polled; a client that left midway is
        // a downstream disconnect.
        let ending = if self.inner.is_end_stream() {
            Ending::Complete
        } else {
            Ending::Dropped
        };
        self.finish(ending);
    }
}

/// A request body that counts what passes through it.
struct Counted {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
