//! Connecting upstream and copying, shared by every listener; the listeners
//! only decide where a connection goes and how.

use std::{
    borrow::Cow,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::future::OptionFuture;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::info;

use super::{
    copy, hbone::stream::H2Stream, socket, tracker::Registration, Drain, Proxy, CONNECT_TIMEOUT,
};
use crate::{
    identity::Identity,
    metrics::{ConnectionMetrics, ResponseFlags},
    state::{Snapshot, Workload},
};

/// Which way a relayed connection goes, for logs.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Accepts connections until the proxy starts draining, handing each to
/// `handle` with the configuration snapshot current at accept time, then
/// relaying what it sets up (tracked, so a drain can wait for it).
pub async fn accept_loop<F, Fut>(
    direction: Direction,
    listener: TcpListener,
    state: watch::Receiver<Arc<Snapshot>>,
    drain: Drain,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, SocketAddr, Arc<Snapshot>) -> Fut,
    Fut: Future<Output = Option<Relay>> + Send + 'static,
{
    let draining = Some(drain.signal.clone());
    // Keepalive and TCP_NODELAY come from the listener.
    socket::prepare_listener(&listener, direction.as_str());
    crate::accept::accept_until_drained(direction.as_str(), &listener, draining, |stream, src| {
        // For a transparent listener, the local address is the original destination.
        let Ok(dst) = stream.local_addr() else {
            return;
        };
        let snapshot = state.borrow().clone();
        spawn_connection(&drain, handle(stream, src, dst, snapshot), ());
    })
    .await
}

/// Connects to `dst` directly (from `bind_ip` when given). Logs and returns
/// `None` on failure.
pub async fn connect_direct(
    direction: Direction,
    src: SocketAddr,
    dst: SocketAddr,
    bind_ip: Option<IpAddr>,
) -> Option<TcpStream> {
    let dir = direction.as_str();
    match tokio::time::timeout(CONNECT_TIMEOUT, socket::connect(bind_ip, dst)).await {
        Ok(Ok(stream)) => {
            let _ = socket::set_keepalive(&stream);
            Some(stream)
        }
        Ok(Err(e)) => {
            info!(direction = dir, %src, %dst, error = %e, "upstream connect failed");
            None
        }
        Err(_) => {
            info!(direction = dir, %src, %dst, timeout = ?CONNECT_TIMEOUT, "upstream connect timed out");
            None
        }
    }
}

/// What a relayed connection is, for its access log line. Owned: it lives
/// as long as the connection, and everything it names is shared (`Arc`s).
pub struct ConnInfo {
    pub direction: Direction,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_workload: Option<Arc<Workload>>,
    pub dst_workload: Option<Arc<Workload>>,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    /// `hbone`, `same-node`, `plaintext`, `direct`, `waypoint`,
    /// `from-waypoint`.
    pub path: &'static str,
}

/// The two ends of a relayed connection.
pub enum Ends {
    /// TCP on both sides.
    Tcp(TcpStream, TcpStream),
    /// A TCP connection and an HBONE stream; `bool`: the TCP side opened
    /// the connection.
    Hbone(TcpStream, H2Stream, bool),
}

/// A connection that is set up (authorized, its upstream connected) and
/// ready to relay: everything it holds for its life, and nothing else.
///
/// Listeners build one in a setup future that ends before the relay
/// starts, so the snapshot, the request and whatever else deciding needed
/// are gone by then; see [`spawn_connection`].
pub struct Relay {
    pub proxy: Arc<Proxy>,
    pub info: ConnInfo,
    pub ends: Ends,
    pub registration: Option<Registration>,
    pub metrics: Vec<ConnectionMetrics>,
}

/// Spawns a connection's task: `setup` (boxed, and freed once it is done),
/// then the relay it hands back, if any; `token` is dropped when the task
/// ends.
///
/// Every idle connection costs its task, so the task holds little besides
/// the relay: an async fn awaiting both inline would be sized for the
/// larger await (an HBONE or waypoint dial, several KiB) for as long as the
/// connection lives. (A second task for the relay, allocated once setting
/// up is done, measured worse: 10,000 idle connections took 0.3 KiB more
/// each on the client's node.)
pub fn spawn_connection<S>(drain: &Drain, setup: S, token: impl Send + 'static)
where
    S: Future<Output = Option<Relay>> + Send + 'static,
{
    let setup = Box::pin(setup);
    drain.tasks.spawn(async move {
        // Not `if let Some(relay) = ...`: a binding that outlives the await
        // keeps its own slot (the whole `Relay`) beside the relay's future.
        OptionFuture::from(setup.await.map(Relay::run)).await;
        drop(token);
    });
}

impl Relay {
    /// Copies bytes between the two ends until both sides are done, nothing
    /// has moved either way for `idle_timeout`, or authorization revokes the
    /// connection, counting them into `metrics` as they move, then writes
    /// the access log line.
    ///
    /// Not an async fn: one stores its arguments twice in its future (as
    /// passed and as bound in the body). The block below captures each
    /// field once, and borrows rather than rebinds them.
    pub fn run(self) -> impl Future<Output = ()> + Send + 'static {
        let Relay {
            proxy,
            info,
            mut ends,
            mut registration,
            mut metrics,
        } = self;
        async move {
            let started = Instant::now();
            let tally = copy::Tally::new(&metrics);
            let outcome = {
                let copy = async {
                    match &mut ends {
                        Ends::Tcp(a, b) => copy::relay(a, b, &tally).await,
                        Ends::Hbone(tcp, h2, tcp_initiates) => {
                            copy::relay_h2(tcp, h2, &tally, *tcp_initiates).await
                        }
                    }
                };
                let idle = idle_watch(&tally, proxy.limits.idle_timeout);
                match &mut registration {
                    Some(registration) => tokio::select! {
                        result = copy => Outcome::Done(result),
                        Ok(denial) = &mut registration.closed => Outcome::Revoked(denial),
                        () = idle => Outcome::Idle,
                    },
                    None => tokio::select! {
                        result = copy => Outcome::Done(result),
                        () = idle => Outcome::Idle,
                    },
                }
            };
            // Dropping both ends closes them; the tally holds the byte
            // counts even when the copy was cut short.
            drop(ends);
            drop(registration);
            log_complete(&proxy, &info, started, &tally, outcome, &mut metrics);
        }
    }
}

/// Writes a finished connection's access log line (and marks a revoked
/// one denied in its metrics).
fn log_complete(
    proxy: &Proxy,
    info: &ConnInfo,
    started: Instant,
    tally: &copy::Tally,
    outcome: Outcome,
    metrics: &mut [ConnectionMetrics],
) {
    let so_far = tally.transferred();
    let (sent, received, result) = match &outcome {
        // Borrowed in the common case: this runs for every connection.
        Outcome::Done(Ok(t)) => (t.sent, t.received, Cow::Borrowed("ok")),
        Outcome::Done(Err(e)) => (
            so_far.sent,
            so_far.received,
            Cow::Owned(format!("error: {e}")),
        ),
        Outcome::Revoked(denial) => {
            // Istio's ztunnel flags a late rejection as a denial.
            for m in metrics.iter_mut() {
                m.fail(ResponseFlags::AuthorizationPolicyDenied);
            }
            (
                so_far.sent,
                so_far.received,
                Cow::Owned(format!("closed by policy {}: {denial}", denial.policy())),
            )
        }
        Outcome::Idle => {
            proxy.metrics.refused(info.direction.as_str(), "idle");
            (
                so_far.sent,
                so_far.received,
                Cow::Owned(format!("closed: idle for {:?}", proxy.limits.idle_timeout)),
            )
        }
    };
    info!(
        target: "access",
        direction = info.direction.as_str(),
        src = %info.src,
        dst = %info.dst,
        src_workload = name_of(&info.src_workload),
        dst_workload = name_of(&info.dst_workload),
        src_identity = %OrDash(info.src_identity.as_ref()),
        dst_identity = %OrDash(info.dst_identity.as_ref()),
        path = info.path,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = started.elapsed().as_millis() as u64,
        outcome = %result,
        "connection complete"
    );
}

/// A workload's name for the access log, or `-`.
fn name_of(workload: &Option<Arc<Workload>>) -> &str {
    workload.as_ref().map_or("-", |w| w.name.as_str())
}

/// An identity for the access log, or `-`: formatted in place (the
/// proxied and the kernel paths write the same line).
pub(super) struct OrDash<'a>(pub(super) Option<&'a Identity>);

impl std::fmt::Display for OrDash<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => id.fmt(f),
            None => f.write_str("-"),
        }
    }
}

enum Outcome {
    Done(std::io::Result<super::copy::Transferred>),
    Revoked(crate::authz::Denial),
    Idle,
}

/// Resolves once no byte has moved either way for `timeout` (never, for a
/// zero timeout). Checks a few times per period rather than arming a timer
/// per read, so bulk transfers pay nothing for it.
async fn idle_watch(tally: &copy::Tally, timeout: Duration) {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    let step = (timeout / 4).max(Duration::from_millis(50));
    let mut last = tally.transferred();
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(step).await;
        let now = tally.transferred();
        if now.sent != last.sent || now.received != last.received {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= timeout {
            return;
        }
    }
}

/// Refuses a connection with a reset.
pub fn refuse(downstream: TcpStream) {
    copy::reset(downstream);
}
