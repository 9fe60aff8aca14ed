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
    relay::{accept_loop, connect_direct, pipe, refuse, Direction, Labels},
    Proxy,
};
use crate::{authz::Connection, state::Snapshot};

/// Serves the inbound plaintext listener.
pub async fn serve(listener: TcpListener, state: watch::Receiver<Arc<Snapshot>>, proxy: Arc<Proxy>) {
    accept_loop(Direction::Inbound, listener, state, move |stream, src, dst, snapshot| {
        handle(proxy.clone(), stream, src, dst, snapshot)
    })
    .await
}

async fn handle(proxy: Arc<Proxy>, downstream: TcpStream, src: SocketAddr, dst: SocketAddr, state: Arc<Snapshot>) {
    // Only local workloads are served: anything else reaching this port was
    // not captured for a pod (someone connected to the port directly).
    let Some(workload) = state.local_workload_by_ip(dst.ip()) else {
        warn!(%src, %dst, "refused: inbound connection for an address that is not a local workload");
        refuse(downstream);
        return;
    };
    // Plaintext carries no identity: identity clauses fail for it.
    let conn = Connection {
        src,
        dst,
        src_identity: None,
    };
    let registration = match proxy.tracker.authorize(&state, workload, conn) {
        Ok(registration) => registration,
        Err(denial) => {
            warn!(%src, %dst, policy = %denial.policy(), reason = %denial, "plaintext connection denied by policy");
            refuse(downstream);
            return;
        }
    };
    let _ = super::socket::set_keepalive(&downstream);
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
    pipe(labels, downstream, upstream, Some(registration)).await
}
