//! Connecting upstream and copying, shared by every listener; the listeners
//! only decide where a connection goes and how.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{info, warn};

use super::{copy, socket, tracker::Registration, CONNECT_TIMEOUT};
use crate::state::Snapshot;

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

/// Connects to `dst` directly (from `bind_ip` when given). Logs and returns
/// `None` on failure.
pub async fn connect_direct(direction: Direction, src: SocketAddr, dst: SocketAddr, bind_ip: Option<IpAddr>) -> Option<TcpStream> {
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

/// What a relayed connection is, for its log lines.
pub struct Labels<'a> {
    pub direction: Direction,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_workload: &'a str,
    pub dst_workload: &'a str,
    /// `hbone`, `same-node`, `direct`, ...
    pub path: &'static str,
}

/// Copies bytes between `downstream` and `upstream` until both sides are
/// done (or authorization revokes the connection), logging the start and
/// the outcome.
pub async fn pipe<D, U>(labels: Labels<'_>, mut downstream: D, mut upstream: U, registration: Option<Registration>)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let Labels {
        direction,
        src,
        dst,
        src_workload,
        dst_workload,
        path,
    } = labels;
    let dir = direction.as_str();
    let started = Instant::now();
    info!(direction = dir, %src, %dst, src_workload, dst_workload, path, "connection captured");
    let result = match registration {
        Some(mut registration) => tokio::select! {
            result = copy::relay(&mut downstream, &mut upstream) => result,
            Ok(denial) = &mut registration.closed => {
                // Dropping both streams closes them.
                info!(direction = dir, %src, %dst, path, policy = %denial.policy(), reason = %denial, duration_ms = started.elapsed().as_millis() as u64, "connection closed by policy");
                return;
            }
        },
        None => copy::relay(&mut downstream, &mut upstream).await,
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(t) => info!(direction = dir, %src, %dst, path, sent = t.sent, received = t.received, duration_ms, "connection closed"),
        Err(e) => info!(direction = dir, %src, %dst, path, error = %e, duration_ms, "connection ended with error"),
    }
}

/// Refuses a connection with a reset.
pub fn refuse(downstream: TcpStream) {
    copy::reset(downstream);
}
