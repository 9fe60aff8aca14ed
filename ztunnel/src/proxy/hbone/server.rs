//! The inbound half of HBONE: port 15008.
//!
//! Each accepted connection was captured for one local workload (the
//! accepted socket's local address is that pod's IP): its certificate is
//! served, a client certificate from our trust domain is required, and every
//! CONNECT must name that same pod. What a hostile peer can cost is bounded:
//! handshakes are limited in number and time, and HTTP/2 limits header sizes
//! and streams per connection.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tracing::{debug, info, warn};

use super::{settings, status, stream::H2Stream};
use crate::{
    authz::Connection,
    identity::Identity,
    metrics::ConnectionLabels,
    proxy::{
        copy,
        relay::{pipe, ConnInfo, Direction, Ends},
        socket, Proxy, CONNECT_TIMEOUT,
    },
    state::Snapshot,
    tls::{spiffe_ids, TlsContext},
};

/// Limits that bound what unauthenticated peers can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TLS and HTTP/2 handshakes must finish within this.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once. When a new one would exceed it, the
    /// oldest still in progress is abandoned: a flood of stalled handshakes
    /// evicts itself, while real clients finish in milliseconds.
    pub max_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
        }
    }
}

/// Serves the HBONE listener.
pub async fn serve(
    listener: TcpListener,
    state: watch::Receiver<Arc<Snapshot>>,
    proxy: Arc<Proxy>,
) {
    let limits = proxy.limits;
    let handshakes = Arc::new(HandshakeSlots::new(limits.max_handshakes));
    let mut draining = proxy.drain.signal.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = draining.wait_for(|d| *d) => {
                info!("HBONE listener stopped accepting: draining");
                return;
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = handshakes.admit();
        let tasks = proxy.drain.tasks.clone();
        let proxy = proxy.clone();
        let state = state.clone();
        tasks.spawn(async move {
            serve_connection(stream, peer, state, proxy, slot).await;
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    live_state: watch::Receiver<Arc<Snapshot>>,
    proxy: Arc<Proxy>,
    mut slot: HandshakeSlot,
) {
    let state = live_state.borrow().clone();
    let limits = proxy.limits;
    let tls: &TlsContext = &proxy.tls;
    let Ok(dst) = stream.local_addr() else { return };
    let Some(workload) = state.local_workload_by_ip(dst.ip()).cloned() else {
        warn!(%peer, %dst, "refused: HBONE connection for an address that is not a local workload");
        copy::reset(stream);
        return;
    };
    let identity = state.identity_of(&workload);
    let config = match tls.server_config(&identity).await {
        Ok(config) => config,
        Err(e) => {
            warn!(%peer, %dst, %identity, error = %e, "refused: no certificate to serve");
            copy::reset(stream);
            return;
        }
    };
    let _ = socket::set_keepalive(&stream);
    // Small HTTP/2 frames (window updates, a request's headers) must not
    // wait for Nagle.
    let _ = stream.set_nodelay(true);
    let handshake = handshake(
        stream,
        config,
        tls.trust_domain(),
        settings::SERVER_MAX_STREAMS,
    );
    let bounded = tokio::time::timeout(limits.handshake_timeout, handshake);
    let (peer_id, mut h2) = tokio::select! {
        result = bounded => match result {
            Ok(Ok(done)) => done,
            Ok(Err(reason)) => {
                warn!(%peer, %dst, "refused HBONE connection: {reason}");
                return;
            }
            Err(_) => {
                warn!(%peer, %dst, timeout = ?limits.handshake_timeout, "refused HBONE connection: handshake timed out");
                return;
            }
        },
        _ = &mut slot.evicted => {
            warn!(%peer, %dst, limit = limits.max_handshakes, "refused HBONE connection: evicted, too many handshakes in progress");
            return;
        }
    };
    drop(slot);
    info!(%peer, %dst, peer_identity = %peer_id, local_identity = %identity, "HBONE connection accepted");
    let served = serve_streams(&mut h2, proxy.drain.signal.clone(), |request, respond| {
        // Each stream is judged by the configuration current when it
        // opens: pooled connections live long, policies change.
        let ctx = StreamContext {
            peer,
            dst,
            peer_id: peer_id.clone(),
            state: live_state.borrow().clone(),
            proxy: proxy.clone(),
        };
        proxy.drain.tasks.spawn(ctx.handle(request, respond));
    })
    .await;
    if let Err(e) = served {
        info!(%peer, %dst, error = %e, "HBONE connection ended");
    }
}

/// An inbound HBONE connection once its handshakes are done.
pub type Http2Connection = h2::server::Connection<TlsStream<TcpStream>, Bytes>;

/// The TLS and HTTP/2 handshakes of an inbound HBONE connection, with
/// HBONE's settings and at most `max_streams` streams at once: the peer's
/// identity in `trust_domain` (the verifier made sure there is one) and
/// the connection, or why it was refused. Shared with the waypoint.
pub async fn handshake(
    stream: TcpStream,
    config: Arc<ServerConfig>,
    trust_domain: &str,
    max_streams: u32,
) -> Result<(Identity, Http2Connection), String> {
    let tls_stream = TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let peer_id = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| {
            spiffe_ids(leaf)
                .into_iter()
                .find(|id| id.trust_domain == trust_domain)
        })
        .ok_or_else(|| "client certificate names no identity".to_string())?;
    let h2 = h2::server::Builder::new()
        .initial_window_size(settings::STREAM_WINDOW)
        .initial_connection_window_size(settings::CONNECTION_WINDOW)
        .max_frame_size(settings::MAX_FRAME_SIZE)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(settings::SERVER_MAX_HEADER_LIST)
        .max_send_buffer_size(settings::MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(tls_stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    Ok((peer_id, h2))
}

/// Hands every stream of `h2` to `on_stream` until the connection ends.
/// When `draining` turns true, GOAWAY is sent: no new streams, and those
/// open run to completion.
pub async fn serve_streams(
    h2: &mut Http2Connection,
    mut draining: watch::Receiver<bool>,
    mut on_stream: impl FnMut(Request<h2::RecvStream>, SendResponse<Bytes>),
) -> Result<(), h2::Error> {
    let mut goaway_sent = false;
    loop {
        let request = tokio::select! {
            request = h2.accept() => request,
            _ = draining.wait_for(|d| *d), if !goaway_sent => {
                h2.graceful_shutdown();
                goaway_sent = true;
                continue;
            }
        };
        match request {
            None => return Ok(()),
            Some(Ok((request, respond))) => on_stream(request, respond),
            Some(Err(e)) => return Err(e),
        }
    }
}

struct StreamContext {
    peer: SocketAddr,
    /// The pod this connection was captured for (its IP, port 15008).
    dst: SocketAddr,
    peer_id: Identity,
    state: Arc<Snapshot>,
    proxy: Arc<Proxy>,
}

impl StreamContext {
    async fn handle(self, request: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>) {
        let target = match self.validate(&request) {
            Ok(target) => target,
            Err((code, reason)) => {
                warn!(peer = %self.peer, peer_identity = %self.peer_id, uri = %request.uri(), status = code.as_u16(), "refused CONNECT: {reason}");
                reply(&mut respond, code);
                return;
            }
        };
        let Some(workload) = self.state.local_workload_by_ip(target.ip()).cloned() else {
            warn!(peer = %self.peer, %target, "refused CONNECT: the workload is gone");
            reply(&mut respond, status::UNREACHABLE);
            return;
        };
        // Authorization sees the peer's verified identity and the real
        // target port, never 15008.
        let conn = Connection {
            src: self.peer,
            dst: target,
            src_identity: Some(self.peer_id.clone()),
        };
        let registration = match self.proxy.tracker.authorize(&self.state, &workload, conn) {
            Ok(registration) => registration,
            Err(denial) => {
                warn!(peer = %self.peer, peer_identity = %self.peer_id, %target, policy = %denial.policy(), reason = %denial, "CONNECT denied by policy");
                reply(&mut respond, status::DENIED);
                return;
            }
        };
        // Delivered from the client pod's own address: the HBONE peer is
        // that address, spoofed by the sending ztunnel.
        let upstream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            socket::connect(Some(self.peer.ip()), target),
        )
        .await;
        let upstream = match upstream {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                info!(peer = %self.peer, %target, error = %e, "CONNECT target unreachable");
                reply(&mut respond, status::UNREACHABLE);
                return;
            }
            Err(_) => {
                info!(peer = %self.peer, %target, "CONNECT target timed out");
                reply(&mut respond, status::UNREACHABLE);
                return;
            }
        };
        let _ = socket::set_keepalive(&upstream);
        let send = match respond.send_response(ok_response(&workload), false) {
            Ok(send) => send,
            Err(e) => {
                info!(peer = %self.peer, %target, error = %e, "client went away before the tunnel opened");
                return;
            }
        };
        let tunnel = H2Stream::new(send, request.into_body());
        debug!(src = %self.peer, dst = %target, src_identity = %self.peer_id, "HBONE stream opened");
        let src_workload = self.state.workload_by_ip(self.peer.ip()).cloned();
        let dst_identity = self.state.identity_of(&workload);
        let metrics = self.proxy.metrics.open(ConnectionLabels::new(
            &self.state,
            "destination",
            src_workload.as_deref(),
            Some(&self.peer_id),
            Some(&workload),
            None,
            true,
        ));
        let info = ConnInfo {
            direction: Direction::Inbound,
            src: self.peer,
            dst: target,
            src_workload: src_workload
                .as_ref()
                .map(|w| w.name.as_str())
                .unwrap_or("-"),
            dst_workload: &workload.name,
            src_identity: Some(&self.peer_id),
            dst_identity: Some(&dst_identity),
            // A waypoint's tunnel carries the traffic of the clients it
            // serves; its identity is what policy here sees.
            path: match &src_workload {
                Some(w) if self.state.is_waypoint(w) => "from-waypoint",
                _ => "hbone",
            },
        };
        pipe(
            info,
            Ends::Hbone(upstream, tunnel, false),
            Some(registration),
            vec![metrics],
        )
        .await;
    }

    /// The target of a CONNECT, or the status to refuse it with.
    fn validate(
        &self,
        request: &Request<h2::RecvStream>,
    ) -> Result<SocketAddr, (StatusCode, String)> {
        if request.method() != Method::CONNECT {
            return Err((
                status::BAD_REQUEST,
                format!("method {} is not CONNECT", request.method()),
            ));
        }
        let authority = request
            .uri()
            .authority()
            .ok_or((status::BAD_REQUEST, "no authority".to_string()))?;
        let target: SocketAddr = authority.as_str().parse().map_err(|_| {
            (
                status::BAD_REQUEST,
                format!("authority {authority} is not ip:port"),
            )
        })?;
        // The tunnel may only reach the workload it was addressed to.
        if target.ip() != self.dst.ip() {
            return Err((
                status::BAD_REQUEST,
                format!(
                    "authority {target} is not the workload this connection was made to ({})",
                    self.dst.ip()
                ),
            ));
        }
        if crate::proxy::is_capture_port(target.port()) {
            return Err((
                status::UNREACHABLE,
                format!("authority {target} is one of ztunnel's own ports"),
            ));
        }
        Ok(target)
    }
}

/// Handshakes in progress, oldest first, each with a way to abandon it.
/// Shared with the waypoint, whose 15008 faces the same floods.
pub struct HandshakeSlots {
    max: usize,
    /// The last id given out, and the handshakes in progress by id.
    inner: std::sync::Mutex<(u64, InProgress)>,
}

type InProgress = std::collections::VecDeque<(u64, oneshot::Sender<()>)>;

/// One handshake's place; leaving it (drop) frees the place.
pub struct HandshakeSlot {
    id: u64,
    slots: Arc<HandshakeSlots>,
    /// Fires when a newer handshake pushed this one out.
    pub evicted: oneshot::Receiver<()>,
}

impl HandshakeSlots {
    pub fn new(max: usize) -> Self {
        HandshakeSlots {
            max: max.max(1),
            inner: std::sync::Mutex::new((0, std::collections::VecDeque::new())),
        }
    }

    pub fn admit(self: &Arc<Self>) -> HandshakeSlot {
        let (tx, rx) = oneshot::channel();
        let mut guard = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (next_id, queue) = &mut *guard;
        while queue.len() >= self.max {
            if let Some((_, oldest)) = queue.pop_front() {
                let _ = oldest.send(());
            }
        }
        *next_id += 1;
        let id = *next_id;
        queue.push_back((id, tx));
        HandshakeSlot {
            id,
            slots: self.clone(),
            evicted: rx,
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut guard = match self.slots.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let queue = &mut guard.1;
        if let Some(pos) = queue.iter().position(|(id, _)| *id == self.id) {
            queue.remove(pos);
        }
    }
}

/// 200, with `baggage` describing the destination for the client's telemetry.
fn ok_response(workload: &crate::state::Workload) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status::OK;
    if let Ok(value) = http::HeaderValue::from_str(&super::baggage(workload)) {
        response
            .headers_mut()
            .insert(super::headers::BAGGAGE, value);
    }
    response
}

fn reply(respond: &mut SendResponse<Bytes>, code: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = code;
    let _ = respond.send_response(response, true);
}
