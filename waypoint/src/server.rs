//! HBONE in: the waypoint's port 15008. Each connection is mTLS with the
//! waypoint's own certificate (a client certificate from the trust domain
//! is required); each CONNECT stream on it is one client connection, served
//! as HTTP/1.1 or HTTP/2 (detected from its first bytes).
//!
//! What a client can hold is bounded: handshakes in number and time,
//! tunnels per connection, header bytes, HTTP/2 streams and resets per
//! tunnel (hyper's and h2's rapid-reset guards), the time to send a
//! request's headers, and idle time.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};
use ztunnel::{
    accept::accept_until_drained,
    identity::Identity,
    proxy::hbone::{
        bounds::{HandshakeSlot, HandshakeSlots},
        server::{self as hbone_server},
        settings,
        stream::{H2Io, H2Stream},
    },
    tls::TlsContext,
};

use crate::{
    proxy::{self, Tunnel, Waypoint},
    sniff::{sniff, Lingering, Prefixed, Protocol},
};

/// HBONE handshakes in progress from one address (ztunnel's default).
const MAX_HANDSHAKES_PER_SOURCE: usize = 64;

/// The bounds, all configurable from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TLS and HTTP/2 handshakes of an HBONE connection must finish in this.
    pub handshake_timeout: Duration,
    /// HBONE handshakes in progress at once; a new one beyond it evicts
    /// the oldest still in progress.
    pub max_handshakes: usize,
    /// CONNECT streams (client connections) per HBONE connection.
    pub max_tunnels_per_connection: u32,
    /// A request's headers must arrive within this (slow clients).
    pub header_read_timeout: Duration,
    /// Header bytes per request (HTTP/1.1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 requests per client connection.
    pub max_streams: u32,
    /// A client connection with no request in flight for this long is
    /// closed (gracefully: GOAWAY for HTTP/2).
    pub idle_timeout: Duration,
    /// How long a client connection may stay silent before it is taken for
    /// a server-first TCP protocol (HTTP clients speak first).
    pub protocol_detection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            max_tunnels_per_connection: settings::SERVER_MAX_STREAMS,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_streams: 100,
            idle_timeout: Duration::from_secs(3600),
            protocol_detection_timeout: Duration::from_secs(1),
        }
    }
}

/// Serves the HBONE listener until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<TlsContext>,
    identity: Identity,
    wp: Arc<Waypoint>,
    limits: Limits,
) {
    let handshakes = Arc::new(HandshakeSlots::new(
        limits.max_handshakes,
        MAX_HANDSHAKES_PER_SOURCE,
    ));
    let draining = Some(wp.drain.signal.clone());
    accept_until_drained("hbone", &listener, draining, |stream, peer| {
        let tls = tls.clone();
        let identity = identity.clone();
        let wp = wp.clone();
        // A flood of stalled handshakes evicts itself (the flooding
        // source's oldest go first) while real clients finish theirs in
        // milliseconds.
        let slot = handshakes.admit(peer.ip());
        let tasks = wp.drain.tasks.clone();
        tasks.spawn(async move {
            connection(stream, peer, tls, identity, wp, limits, slot).await;
        });
    })
    .await
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Arc<TlsContext>,
    identity: Identity,
    wp: Arc<Waypoint>,
    limits: Limits,
    mut slot: HandshakeSlot,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    // ztunnel's inbound HBONE handshakes, with the waypoint's certificate.
    let handshake = async {
        let config = tls
            .server_config(&identity)
            .await
            .map_err(|e| format!("no certificate to serve: {e}"))?;
        hbone_server::handshake(
            stream,
            config,
            tls.trust_domain(),
            limits.max_tunnels_per_connection,
        )
        .await
    };
    let bounded = tokio::time::timeout(limits.handshake_timeout, handshake);
    let (peer_id, mut h2) = tokio::select! {
        result = bounded => match result {
            Ok(Ok(done)) => done,
            Ok(Err(reason)) => {
                warn!(%peer, "refused HBONE connection: {reason}");
                return;
            }
            Err(_) => {
                warn!(%peer, timeout = ?limits.handshake_timeout, "refused HBONE connection: handshake timed out");
                return;
            }
        },
        _ = &mut slot.evicted => {
            warn!(%peer, limit = limits.max_handshakes, "refused HBONE connection: evicted, too many handshakes in progress");
            return;
        }
    };
    drop(slot);
    debug!(%peer, peer_identity = %peer_id, "HBONE connection accepted");
    // Draining sends GOAWAY; the tunnels already open run to their end. A
    // connection with no tunnel for the idle timeout is closed the same way.
    let served = hbone_server::serve_streams(
        &mut h2,
        wp.drain.signal.clone(),
        limits.idle_timeout,
        |request, respond, token| {
            let tunnel = tunnel(
                request,
                respond,
                peer,
                local,
                peer_id.clone(),
                wp.clone(),
                limits,
            );
            wp.drain.tasks.spawn(async move {
                tunnel.await;
                drop(token);
            });
        },
    )
    .await;
    if let Err(e) = served {
        debug!(%peer, error = %e, "HBONE connection ended");
    }
}

/// One CONNECT: checked, answered, then served as HTTP.
async fn tunnel(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    local: SocketAddr,
    peer_id: Identity,
    wp: Arc<Waypoint>,
    limits: Limits,
) {
    let dst = match validate(&request, &wp, local) {
        Ok(dst) => dst,
        Err((status, reason)) => {
            warn!(%peer, peer_identity = %peer_id, uri = %request.uri(), status = status.as_u16(), "refused CONNECT: {reason}");
            let mut response = Response::new(());
            *response.status_mut() = status;
            let _ = respond.send_response(response, true);
            return;
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(_) => return,
    };
    let mut io = H2Io::new(H2Stream::new(send, request.into_body()));
    let tunnel = Arc::new(Tunnel { peer, peer_id, dst });
    wp.metrics.connections.inc();
    match sniff(&mut io, limits.protocol_detection_timeout).await {
        Ok((Protocol::Http, seen)) => {
            let io = TokioIo::new(Prefixed::new(seen, Lingering::new(io)));
            serve_http(io, tunnel, wp.clone(), limits).await
        }
        Ok((Protocol::Tcp, seen)) => crate::tcp::relay(Prefixed::new(seen, io), tunnel, &wp).await,
        Err(e) => debug!(%peer, error = %e, "client connection ended before it said anything"),
    }
    wp.metrics.connections.dec();
}

/// The destination of a CONNECT, if this waypoint serves it: the authority
/// must be an address whose service or workload names this waypoint.
fn validate(
    request: &Request<h2::RecvStream>,
    wp: &Waypoint,
    local: SocketAddr,
) -> Result<SocketAddr, (StatusCode, String)> {
    let dst = ztunnel::proxy::hbone::request::connect_target(request)?;
    let state = wp.state.borrow().clone();
    state
        .names_waypoint(dst, local.ip())
        .map_err(|reason| (StatusCode::BAD_REQUEST, reason))?;
    Ok(dst)
}

/// Requests in flight and the time of the last one, for the idle timeout.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn touch(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = Instant::now();
        }
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.last.lock().map(|l| l.elapsed()).unwrap_or_default()
    }
}

/// Serves one client connection (the tunnel's bytes) as HTTP.
async fn serve_http(
    io: TokioIo<Prefixed<Lingering>>,
    tunnel: Arc<Tunnel>,
    wp: Arc<Waypoint>,
    limits: Limits,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        // Rapid reset (CVE-2023-44487): resets of streams not yet served,
        // and streams this side had to reset, end the connection.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last: Mutex::new(Instant::now()),
    });
    let mut draining = wp.drain.signal.clone();
    let service = {
        let activity = activity.clone();
        service_fn(move |request| {
            let wp = wp.clone();
            let tunnel = tunnel.clone();
            // Counted until the request's future ends, also when hyper
            // drops it (a client's RST_STREAM).
            let in_flight = InFlight::enter(activity.clone());
            async move {
                let response = proxy::handle(wp, tunnel, request).await;
                drop(in_flight);
                response
            }
        })
    };
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let check = (limits.idle_timeout / 4).max(Duration::from_millis(100));
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(error = %e, "client connection ended");
                }
                return;
            }
            _ = tokio::time::sleep(check), if !closing => {
                if activity.idle_for() >= limits.idle_timeout {
                    info!(idle = ?limits.idle_timeout, "closing an idle client connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            // Draining: requests in flight finish, no new ones start
            // (GOAWAY for HTTP/2, `Connection: close` for HTTP/1.1).
            _ = draining.wait_for(|d| *d), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// One request in flight on a connection; leaving (drop) counts it out.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}
