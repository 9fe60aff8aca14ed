//! Inbound plaintext capture (15006): connections to an enrolled pod that did
//! not come through an HBONE tunnel. Delivered to the pod from the client's
//! own address.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::warn;

use super::relay::{accept_loop, connect_direct, pipe, refuse, Direction, Labels};
use crate::state::Snapshot;

/// Serves the inbound plaintext listener.
pub async fn serve(listener: TcpListener, state: watch::Receiver<Arc<Snapshot>>) {
    accept_loop(Direction::Inbound, listener, state, handle).await
}

async fn handle(downstream: TcpStream, src: SocketAddr, dst: SocketAddr, state: Arc<Snapshot>) {
    // Only local workloads are served: anything else reaching this port was
    // not captured for a pod (someone connected to the port directly).
    let Some(workload) = state.local_workload_by_ip(dst.ip()) else {
        warn!(%src, %dst, "refused: inbound connection for an address that is not a local workload");
        refuse(downstream);
        return;
    };
    let Some(upstream) = connect_direct(Direction::Inbound, src, dst, Some(src.ip())).await else {
        refuse(downstream);
        return;
    };
    let src_workload = state.workload_by_ip(src.ip()).map(|w| w.name.as_str()).unwrap_or("-");
    let labels = Labels {
        direction: Direction::Inbound,
        src,
        dst,
        src_workload,
        dst_workload: &workload.name,
        path: "plaintext",
    };
    pipe(labels, downstream, upstream).await
}
