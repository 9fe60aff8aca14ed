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
use http::{Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tracing::{debug, info, warn};

use super::{
    bounds::{HandshakeSlot, HandshakeSlots, PeerConnections},
    request::{baggage_of, check_connect, forwarded_of},
    settings, status,
    stream::H2Stream,
};
use crate::{
    authz::Connection,
    identity::Identity,
    metrics::{ConnectionLabels, PeerLabels, Reporter, ResponseFlags},
    proxy::{
        copy,
        relay::{spawn_connection, ConnInfo, Direction, Ends, Relay},
        socket, Proxy, CONNECT_TIMEOUT,
    },
    state::Snapshot,
    tls::{spiffe_ids, TlsContext},
};

/// Limits that bound what peers can hold, authenticated or not.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TLS and HTTP/2 handshakes must finish within this.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once, and from one source address (see
    /// [`HandshakeSlots`] for who is evicted past them).
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
    /// Established HBONE connections from one identity; past it, new ones
    /// are refused.
    pub max_connections_per_peer: usize,
    /// An HBONE connection with no stream open for this long is closed
    /// (GOAWAY). Longer than a client pool keeps an idle connection, so
    /// clients normally close first.
    pub hbone_idle_timeout: Duration,
    /// A relayed connection on which no byte has moved either way for this
    /// long is closed (zero: never).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            max_handshakes_per_source: 64,
            max_connections_per_peer: 2048,
            hbone_idle_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// What bounds peers across every listener of 15008: the node's limits,
/// not one worker's, however many workers serve the port.
pub struct Admission {
    handshakes: Arc<HandshakeSlots>,
    peers: Arc<PeerConnections>,
}

impl Admission {
    pub fn new(limits: &Limits) -> Self {
        Admission {
            handshakes: Arc::new(HandshakeSlots::new(
                limits.max_handshakes,
                limits.max_handshakes_per_source,
            )),
            peers: Arc::new(PeerConnections::new(limits.max_connections_per_peer)),
        }
    }
}

/// Serves the HBONE listener.
pub async fn serve(
    listener: TcpListener,
    state: watch::Receiver<Arc<Snapshot>>,
    proxy: Arc<Proxy>,
) {
    let handshakes = proxy.admission.handshakes.clone();
    let peers = proxy.admission.peers.clone();
    let draining = Some(proxy.drain.signal.clone());
    // Keepalive, and TCP_NODELAY so that small HTTP/2 frames (window
    // updates, a request's headers) do not wait for Nagle: both from the
    // listener.
    socket::prepare_listener(&listener, "hbone");
    crate::accept::accept_until_drained("hbone", &listener, draining, |stream, peer| {
        let slot = handshakes.admit(peer.ip());
        let tasks = proxy.drain.tasks.clone();
        let proxy = proxy.clone();
        let state = state.clone();
        let peers = peers.clone();
        tasks.spawn(async move {
            serve_connection(stream, peer, state, proxy, slot, peers).await;
        });
    })
    .await
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    live_state: watch::Receiver<Arc<Snapshot>>,
    proxy: Arc<Proxy>,
    mut slot: HandshakeSlot,
    peers: Arc<PeerConnections>,
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
            proxy.metrics.refused("hbone", "handshakes");
            warn!(%peer, %dst, limit = limits.max_handshakes, per_source = limits.max_handshakes_per_source, "refused HBONE connection: evicted, too many handshakes in progress");
            return;
        }
    };
    drop(slot);
    let Some(_peer_slot) = peers.admit(&peer_id) else {
        proxy.metrics.refused("hbone", "peer_connections");
        warn!(%peer, %dst, peer_identity = %peer_id, limit = limits.max_connections_per_peer, "refused HBONE connection: the peer holds its cap of connections");
        // GOAWAY before any stream: the peer's pool retries elsewhere or
        // later instead of reusing this connection.
        h2.graceful_shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(1), h2.accept()).await;
        return;
    };
    info!(%peer, %dst, peer_identity = %peer_id, local_identity = %identity, "HBONE connection accepted");
    let idle = limits.hbone_idle_timeout;
    let served = serve_streams(
        &mut h2,
        proxy.drain.signal.clone(),
        idle,
        |request, respond, token| {
            // Each stream is judged by the configuration current when it
            // opens: pooled connections live long, policies change.
            let ctx = StreamContext {
                peer,
                dst,
                peer_id: peer_id.clone(),
                state: live_state.borrow().clone(),
                proxy: proxy.clone(),
            };
            // What opening needs (the request, its headers, the snapshot)
            // is not held in the task for the tunnel's life.
            spawn_connection(&proxy.drain, ctx.open(request, respond), token);
        },
    )
    .await;
    match served {
        Ok(Ended::Idle) => {
            proxy.metrics.refused("hbone", "idle");
            info!(%peer, %dst, peer_identity = %peer_id, idle = ?idle, "HBONE connection closed: no stream for the idle timeout");
        }
        Ok(Ended::Closed) => {}
        Err(e) => info!(%peer, %dst, error = %e, "HBONE connection ended"),
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
    let mut tls_stream = TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    tls_stream
        .get_mut()
        .1
        .set_buffer_limit(Some(settings::TLS_SEND_BUFFER));
    let peer_id = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| {
            spiffe_ids(leaf)
                .into_iter()
                .find(|id| *id.trust_domain == *trust_domain)
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

/// A stream's hold on its connection: while any is alive, the connection
/// is not idle. The stream's task drops it when it ends.
pub struct StreamToken(#[allow(dead_code)] Arc<()>);

/// How [`serve_streams`] ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The peer closed, or a GOAWAY (drain) ran its course.
    Closed,
    /// No stream was open for the idle timeout.
    Idle,
}

/// Hands every stream of `h2` to `on_stream` until the connection ends.
/// When `draining` turns true, GOAWAY is sent: no new streams, and those
/// open run to completion. A connection with no stream open for `idle`
/// (zero: never) is closed the same way.
pub async fn serve_streams(
    h2: &mut Http2Connection,
    mut draining: watch::Receiver<bool>,
    idle: Duration,
    mut on_stream: impl FnMut(Request<h2::RecvStream>, SendResponse<Bytes>, StreamToken),
) -> Result<Ended, h2::Error> {
    let mut goaway_sent = false;
    let mut went_idle = false;
    let streams = Arc::new(());
    // Checked a few times per period: a timer per stream would cost more.
    let step = (idle / 4).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        let request = tokio::select! {
            request = h2.accept() => request,
            _ = draining.wait_for(|d| *d), if !goaway_sent => {
                h2.graceful_shutdown();
                goaway_sent = true;
                continue;
            }
            _ = tick.tick(), if !idle.is_zero() && !goaway_sent => {
                if Arc::strong_count(&streams) > 1 {
                    quiet_since = tokio::time::Instant::now();
                } else if quiet_since.elapsed() >= idle {
                    h2.graceful_shutdown();
                    goaway_sent = true;
                    went_idle = true;
                }
                continue;
            }
        };
        match request {
            // How the peer takes the GOAWAY (a clean close or a reset) does
            // not change why the connection ended.
            None | Some(Err(_)) if went_idle => return Ok(Ended::Idle),
            None => return Ok(Ended::Closed),
            Some(Ok((request, respond))) => {
                quiet_since = tokio::time::Instant::now();
                on_stream(request, respond, StreamToken(streams.clone()))
            }
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
    /// Judges a CONNECT and opens its upstream: the tunnel to relay, or
    /// `None` once it is refused (and answered).
    async fn open(
        self,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> Option<Relay> {
        let target = match check_connect(&request, self.dst.ip()) {
            Ok(target) => target,
            Err((code, reason)) => {
                warn!(peer = %self.peer, peer_identity = %self.peer_id, uri = %request.uri(), status = code.as_u16(), "refused CONNECT: {reason}");
                reply(&mut respond, code);
                return None;
            }
        };
        let Some(workload) = self.state.local_workload_by_ip(target.ip()).cloned() else {
            warn!(peer = %self.peer, %target, "refused CONNECT: the workload is gone");
            reply(&mut respond, status::UNREACHABLE);
            return None;
        };
        let src_workload = self.state.workload_by_ip(self.peer.ip()).cloned();
        let mut labels = ConnectionLabels::new(
            &self.state,
            Reporter::Destination,
            src_workload.as_deref(),
            Some(&self.peer_id),
            Some(&workload),
            None,
            true,
        );
        // The peer's baggage is read only for a source this node does not
        // know: it describes nothing the configuration does not.
        let baggage = match &src_workload {
            None => Some(baggage_of(request.headers())),
            Some(_) => None,
        };
        if let Some(Ok(baggage)) = &baggage {
            // A source this node's configuration does not hold (another
            // cluster's, say): described by what its ztunnel said of it,
            // with the identity its certificate proved, as Istio does.
            labels = labels.with_source(Arc::new(PeerLabels::from_baggage(
                |k| baggage.get(k),
                &self.peer_id,
            )));
        }
        let metrics = &self.proxy.metrics;
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
                metrics.failed(labels, ResponseFlags::AuthorizationPolicyDenied);
                reply(&mut respond, status::DENIED);
                return None;
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
                metrics.failed(labels, ResponseFlags::ConnectionFailure);
                reply(&mut respond, status::UNREACHABLE);
                return None;
            }
            Err(_) => {
                info!(peer = %self.peer, %target, "CONNECT target timed out");
                metrics.failed(labels, ResponseFlags::ConnectionFailure);
                reply(&mut respond, status::UNREACHABLE);
                return None;
            }
        };
        let _ = socket::set_keepalive(&upstream);
        let send = match respond.send_response(ok_response(&workload), false) {
            Ok(send) => send,
            Err(e) => {
                info!(peer = %self.peer, %target, error = %e, "client went away before the tunnel opened");
                return None;
            }
        };
        // What the peer says of its client, for the log only.
        // Read and formatted only when someone reads it: this runs for
        // every stream.
        if tracing::enabled!(tracing::Level::DEBUG) {
            let forwarded_for = match forwarded_of(request.headers()) {
                Ok(f) => f.first("for").unwrap_or("-").to_string(),
                Err(why) => why,
            };
            let baggage = match baggage.unwrap_or_else(|| baggage_of(request.headers())) {
                Ok(b) => format!("{:?}", b.0),
                Err(why) => why,
            };
            debug!(src = %self.peer, dst = %target, src_identity = %self.peer_id, %forwarded_for, %baggage, "HBONE stream opened");
        }
        let stream = H2Stream::new(send, request.into_body());
        let dst_identity = self.state.identity_of(&workload);
        // A waypoint's tunnel carries the traffic of the clients it serves;
        // its identity is what policy here sees.
        let path = match &src_workload {
            Some(w) if self.state.is_waypoint(w) => "from-waypoint",
            _ => "hbone",
        };
        Some(Relay {
            metrics: vec![metrics.open(labels)],
            info: ConnInfo {
                direction: Direction::Inbound,
                src: self.peer,
                dst: target,
                src_workload,
                dst_workload: Some(workload),
                src_identity: Some(self.peer_id),
                dst_identity: Some(dst_identity),
                path,
            },
            proxy: self.proxy,
            ends: Ends::Hbone(upstream, stream, false),
            registration: Some(registration),
        })
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
