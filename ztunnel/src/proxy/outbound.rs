//! Outbound capture (15001): connections an enrolled pod opens.
//!
//! For now every destination is reached directly, from the pod's own address,
//! so the destination sees the real client. (HBONE tunnelling to mesh
//! destinations builds on this.)

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::warn;

use super::{
    copy, is_own_listener,
    relay::{accept_loop, relay, Direction},
    socket,
};
use crate::state::Snapshot;

/// Serves the outbound listener.
pub async fn serve(listener: TcpListener, state: watch::Receiver<Arc<Snapshot>>) {
    accept_loop(Direction::Outbound, listener, state, handle).await
}

async fn handle(downstream: TcpStream, src: SocketAddr, dst: SocketAddr, state: Arc<Snapshot>) {
    if is_own_listener(dst) {
        warn!(%src, %dst, "refused: a pod connected to ztunnel's own port");
        copy::reset(downstream);
        return;
    }
    // A destination on this host itself cannot be reached from a spoofed pod
    // address (its reply would be routed to the pod, not to us).
    let bind_ip = (!socket::is_local_address(dst.ip())).then_some(src.ip());
    relay(Direction::Outbound, downstream, src, dst, bind_ip, &state).await
}
