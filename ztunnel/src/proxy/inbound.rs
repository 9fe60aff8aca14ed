//! Inbound plaintext capture (15006): connections to an enrolled pod that did
//! not come through an HBONE tunnel. Delivered to the pod from the client's
//! own address.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::warn;

use super::{
    copy,
    relay::{accept_loop, relay, Direction},
};
use crate::state::Snapshot;

/// Serves the inbound plaintext listener.
pub async fn serve(listener: TcpListener, state: watch::Receiver<Arc<Snapshot>>) {
    accept_loop(Direction::Inbound, listener, state, handle).await
}

async fn handle(downstream: TcpStream, src: SocketAddr, dst: SocketAddr, state: Arc<Snapshot>) {
    // Only local workloads are served: anything else reaching this port was
    // not captured for a pod (someone connected to the port directly).
    if state.local_workload_by_ip(dst.ip()).is_none() {
        warn!(%src, %dst, "refused: inbound connection for an address that is not a local workload");
        copy::reset(downstream);
        return;
    }
    relay(Direction::Inbound, downstream, src, dst, Some(src.ip()), &state).await
}
