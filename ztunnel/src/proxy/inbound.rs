//! Inbound plaintext capture (15006): connections to an enrolled pod that did
//! not come through an HBONE tunnel. Delivered to the pod from the client's
//! own address.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use super::{copy, socket, CONNECT_TIMEOUT};
use crate::state::Snapshot;

/// Accepts captured inbound plaintext connections until the listener fails.
pub async fn serve(listener: TcpListener, state: watch::Receiver<Arc<Snapshot>>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let snapshot = state.borrow().clone();
                tokio::spawn(handle(stream, peer, snapshot));
            }
            Err(e) => {
                warn!(error = %e, "inbound accept failed");
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
    // Only local workloads are served: anything else reaching this port was
    // not captured for a pod (someone connected to the port directly).
    let Some(workload) = state.local_workload_by_ip(dst.ip()) else {
        warn!(%src, %dst, "refused: inbound connection for an address that is not a local workload");
        copy::reset(downstream);
        return;
    };
    let started = Instant::now();
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, socket::connect(Some(src.ip()), dst)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            info!(%src, %dst, error = %e, "inbound delivery failed");
            copy::reset(downstream);
            return;
        }
        Err(_) => {
            info!(%src, %dst, "inbound delivery timed out");
            copy::reset(downstream);
            return;
        }
    };
    info!(%src, %dst, dst_workload = %workload.name, "inbound plaintext connection captured");
    match copy::relay(&mut downstream, &mut upstream).await {
        Ok(t) => info!(%src, %dst, sent = t.sent, received = t.received, duration_ms = started.elapsed().as_millis() as u64, "inbound connection closed"),
        Err(e) => info!(%src, %dst, error = %e, "inbound connection ended with error"),
    }
}
