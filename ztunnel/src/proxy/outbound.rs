//! Outbound capture (15001): connections an enrolled pod opens.
//!
//! For now every destination is reached directly, from the pod's own address,
//! so the destination sees the real client. (HBONE tunnelling to mesh
//! destinations builds on this.)

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use super::{copy, is_own_listener, socket, CONNECT_TIMEOUT};
use crate::state::Snapshot;

/// Accepts captured outbound connections until the listener fails.
pub async fn serve(listener: TcpListener, state: watch::Receiver<Arc<Snapshot>>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let snapshot = state.borrow().clone();
                tokio::spawn(handle(stream, peer, snapshot));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut downstream: TcpStream, src: SocketAddr, state: Arc<Snapshot>) {
    let dst = match downstream.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            debug!(%src, error = %e, "connection gone before it was handled");
            return;
        }
    };
    if is_own_listener(dst) {
        warn!(%src, %dst, "refused: a pod connected to ztunnel's own port");
        copy::reset(downstream);
        return;
    }
    let src_workload = state.workload_by_ip(src.ip());
    // A destination on this host itself cannot be reached from a spoofed pod
    // address (its reply would be routed to the pod, not to us).
    let bind_ip = (!socket::is_local_address(dst.ip())).then_some(src.ip());
    let started = Instant::now();
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, socket::connect(bind_ip, dst)).await;
    let mut upstream = match upstream {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            info!(%src, %dst, error = %e, "outbound connect failed");
            copy::reset(downstream);
            return;
        }
        Err(_) => {
            info!(%src, %dst, timeout = ?CONNECT_TIMEOUT, "outbound connect timed out");
            copy::reset(downstream);
            return;
        }
    };
    let dst_workload = state.workload_by_ip(dst.ip());
    info!(
        %src, %dst,
        src_workload = src_workload.map(|w| w.name.as_str()).unwrap_or("-"),
        dst_workload = dst_workload.map(|w| w.name.as_str()).unwrap_or("-"),
        "outbound connection captured"
    );
    match copy::relay(&mut downstream, &mut upstream).await {
        Ok(t) => info!(%src, %dst, sent = t.sent, received = t.received, duration_ms = started.elapsed().as_millis() as u64, "outbound connection closed"),
        Err(e) => info!(%src, %dst, error = %e, duration_ms = started.elapsed().as_millis() as u64, "outbound connection ended with error"),
    }
}
