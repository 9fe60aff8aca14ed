//! Inbound plaintext capture (15006): connections to an enrolled pod that did
//! not come through an HBONE tunnel. Authorized without an identity, then
//! delivered to the pod from the client's own address.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::warn;

use super::{
    relay::{accept_loop, connect_direct, refuse, ConnInfo, Direction, Ends, Relay},
    Proxy,
};
use crate::{
    authz::Connection,
    metrics::{ConnectionLabels, Reporter, ResponseFlags},
    state::Snapshot,
};

/// Serves the inbound plaintext listener.
pub async fn serve(
    listener: TcpListener,
    state: watch::Receiver<Arc<Snapshot>>,
    proxy: Arc<Proxy>,
) {
    let drain = proxy.drain.clone();
    accept_loop(
        Direction::Inbound,
        listener,
        state,
        drain,
        move |stream, src, dst, snapshot| handle(proxy.clone(), stream, src, dst, snapshot),
    )
    .await
}

async fn handle(
    proxy: Arc<Proxy>,
    downstream: TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
    state: Arc<Snapshot>,
) -> Option<Relay> {
    // Only local workloads are served: anything else reaching this port was
    // not captured for a pod (someone connected to the port directly).
    let Some(workload) = state.local_workload_by_ip(dst.ip()).cloned() else {
        warn!(%src, %dst, "refused: inbound connection for an address that is not a local workload");
        refuse(downstream);
        return None;
    };
    // Plaintext carries no identity: identity clauses fail for it.
    let conn = Connection {
        src,
        dst,
        src_identity: None,
    };
    let src_workload = state.workload_by_ip(src.ip()).cloned();
    let labels = ConnectionLabels::new(
        &state,
        Reporter::Destination,
        src_workload.as_deref(),
        None,
        Some(&workload),
        None,
        false,
    );
    let registration = match proxy.tracker.authorize(&state, &workload, conn) {
        Ok(registration) => registration,
        Err(denial) => {
            warn!(%src, %dst, policy = %denial.policy(), reason = %denial, "plaintext connection denied by policy");
            proxy
                .metrics
                .failed(labels, ResponseFlags::AuthorizationPolicyDenied);
            refuse(downstream);
            return None;
        }
    };
    let Some(upstream) = connect_direct(Direction::Inbound, src, dst, Some(src.ip())).await else {
        proxy
            .metrics
            .failed(labels, ResponseFlags::ConnectionFailure);
        refuse(downstream);
        return None;
    };
    let dst_identity = state.identity_of(&workload);
    let metrics = proxy.metrics.open(labels);
    Some(Relay {
        proxy,
        info: ConnInfo {
            direction: Direction::Inbound,
            src,
            dst,
            src_workload,
            dst_workload: Some(workload),
            src_identity: None,
            dst_identity: Some(dst_identity),
            path: "plaintext",
        },
        ends: Ends::Tcp(downstream, upstream),
        registration: Some(registration),
        metrics: vec![metrics],
    })
}
