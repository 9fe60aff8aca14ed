//! One relayed connection: connect upstream, copy both ways, log the outcome.
//! Shared by every listener; the listeners only decide where a connection
//! goes and from which address.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{info, warn};

use super::{copy, socket, CONNECT_TIMEOUT};
use crate::state::Snapshot;

/// Which way a relayed connection goes, for logs.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Accepts connections until the listener fails, handing each to `handle`
/// with the configuration snapshot current at accept time.
pub async fn accept_loop<F, Fut>(direction: Direction, listener: TcpListener, state: watch::Receiver<Arc<Snapshot>>, handle: F)
where
    F: Fn(TcpStream, SocketAddr, SocketAddr, Arc<Snapshot>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, src)) => {
                // For a transparent listener, the local address is the original destination.
                let Ok(dst) = stream.local_addr() else { continue };
                let snapshot = state.borrow().clone();
                tokio::spawn(handle(stream, src, dst, snapshot));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(direction = direction.as_str(), error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connects to `dst` (from `bind_ip` when given) and copies bytes between it
/// and `downstream` until both sides are done. A connection that cannot be
/// made is reset, so the client sees a refusal.
pub async fn relay(direction: Direction, mut downstream: TcpStream, src: SocketAddr, dst: SocketAddr, bind_ip: Option<IpAddr>, state: &Snapshot) {
    let dir = direction.as_str();
    let started = Instant::now();
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, socket::connect(bind_ip, dst)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            info!(direction = dir, %src, %dst, error = %e, "upstream connect failed");
            copy::reset(downstream);
            return;
        }
        Err(_) => {
            info!(direction = dir, %src, %dst, timeout = ?CONNECT_TIMEOUT, "upstream connect timed out");
            copy::reset(downstream);
            return;
        }
    };
    for stream in [&downstream, &upstream] {
        if let Err(e) = socket::set_keepalive(stream) {
            warn!(direction = dir, %src, %dst, error = %e, "cannot enable keepalive");
        }
    }
    let name = |ip: IpAddr| state.workload_by_ip(ip).map(|w| w.name.clone()).unwrap_or_else(|| "-".into());
    info!(direction = dir, %src, %dst, src_workload = %name(src.ip()), dst_workload = %name(dst.ip()), "connection captured");
    let result = copy::relay(&mut downstream, &mut upstream).await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(t) => info!(direction = dir, %src, %dst, sent = t.sent, received = t.received, duration_ms, "connection closed"),
        Err(e) => info!(direction = dir, %src, %dst, error = %e, duration_ms, "connection ended with error"),
    }
}
