//! Outbound capture (15001): connections an enrolled pod opens.
//!
//! Where the connection goes decides how:
//! - a mesh workload (`protocol: HBONE`) on another node: an HBONE tunnel to
//!   its 15008, presenting the source workload's certificate and checking
//!   the destination's identity;
//! - a mesh workload on this node: delivered directly (the network is
//!   skipped), with the checks an inbound tunnel would get;
//! - a service VIP: one of its endpoints, with the port mapping applied, then
//!   as above;
//! - anything else: relayed directly.
//!
//! Every connection leaves from the source pod's own address, so the
//! destination sees the real client.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};
use ztunnel_common::ports;

use super::{
    hbone::{
        client::{self, Target},
        first_flight::FirstFlight,
    },
    is_capture_port, is_own_listener,
    relay::{accept_loop, connect_direct, refuse, ConnInfo, Direction, Ends, Relay},
    socket, Proxy,
};
use crate::{
    authz::Connection,
    metrics::{labels::ServiceLabels, ConnectionLabels, Reporter, ResponseFlags},
    state::{Snapshot, Upstream, Waypoint},
};

/// How a failed tunnel is counted: a peer's denial is `DENY`, anything
/// else `CONNECT`.
fn tunnel_failure(e: &client::HboneError) -> ResponseFlags {
    match e {
        client::HboneError::Status { status, .. } if *status == super::hbone::status::DENIED => {
            ResponseFlags::AuthorizationPolicyDenied
        }
        _ => ResponseFlags::ConnectionFailure,
    }
}

/// Serves the outbound listener.
pub async fn serve(
    listener: TcpListener,
    state: watch::Receiver<Arc<Snapshot>>,
    proxy: Arc<Proxy>,
) {
    let drain = proxy.drain.clone();
    accept_loop(
        Direction::Outbound,
        listener,
        state,
        drain,
        move |stream, src, dst, snapshot| handle(proxy.clone(), stream, src, dst, snapshot),
    )
    .await
}

/// The service a destination was reached through: its hostname (named in
/// the tunnel) and its metric labels.
fn service_of<'a>(
    state: &'a Snapshot,
    dst: SocketAddr,
    upstream: Option<&Upstream>,
) -> Option<(&'a str, Arc<ServiceLabels>)> {
    upstream.filter(|u| u.addr != dst)?;
    state
        .service_by_vip_labelled(dst.ip())
        .map(|(s, labels)| (s.hostname.as_str(), labels))
}

async fn handle(
    proxy: Arc<Proxy>,
    downstream: TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
    state: Arc<Snapshot>,
) -> Option<Relay> {
    if is_own_listener(dst) {
        warn!(%src, %dst, "refused: a pod connected to ztunnel's own port");
        refuse(downstream);
        return None;
    }
    let src_workload = state.workload_by_ip(src.ip()).cloned();
    // A destination that names a waypoint is reached through it, or not
    // at all: its L7 policy lives there.
    match state.waypoint_for(src_workload.as_deref(), dst) {
        Some(Ok(waypoint)) => {
            return via_waypoint(proxy, downstream, src, dst, state, waypoint).await;
        }
        Some(Err(e)) => {
            warn!(%src, %dst, error = %e, "refused: the destination's waypoint cannot be reached");
            refuse(downstream);
            return None;
        }
        None => {}
    }
    let resolved = state.resolve(dst);
    let service = service_of(&state, dst, resolved.as_ref());
    let Some(upstream) = resolved.clone().filter(|u| u.workload.hbone) else {
        // Outside the mesh (or a workload without HBONE): relay directly.
        let addr = resolved.as_ref().map(|u| u.addr).unwrap_or(dst);
        // A destination on this host itself cannot be reached from a spoofed
        // pod address (its reply would be routed to the pod, not to us).
        let bind_ip = (!socket::is_local_address(addr.ip())).then_some(src.ip());
        let dst_workload = state.workload_by_ip(addr.ip()).cloned();
        let src_id = src_workload
            .as_ref()
            .filter(|w| w.hbone)
            .map(|w| state.identity_of(w));
        let labels = ConnectionLabels::new(
            &state,
            Reporter::Source,
            src_workload.as_deref(),
            src_id.as_ref(),
            dst_workload.as_deref(),
            service.map(|(_, labels)| labels),
            false,
        );
        let Some(stream) = connect_direct(Direction::Outbound, src, addr, bind_ip).await else {
            proxy
                .metrics
                .failed(labels, ResponseFlags::ConnectionFailure);
            refuse(downstream);
            return None;
        };
        let metrics = vec![proxy.metrics.open(labels)];
        return Some(Relay {
            proxy,
            info: ConnInfo {
                direction: Direction::Outbound,
                src,
                dst: addr,
                src_workload,
                dst_workload,
                src_identity: src_id,
                dst_identity: None,
                path: "direct",
            },
            ends: Ends::Tcp(downstream, stream),
            registration: None,
            metrics,
        });
    };

    // A mesh destination: the source must be a local mesh workload, whose
    // identity the destination will see.
    let Some(src_workload) = state
        .local_workload_by_ip(src.ip())
        .filter(|w| w.hbone)
        .cloned()
    else {
        warn!(%src, %dst, "refused: source is not a local mesh workload, so it has no identity to present");
        refuse(downstream);
        return None;
    };
    let src_id = state.identity_of(&src_workload);
    let dst_id = state.identity_of(&upstream.workload);
    let target = upstream.addr;
    let info = |path| ConnInfo {
        direction: Direction::Outbound,
        src,
        dst: target,
        src_workload: Some(src_workload.clone()),
        dst_workload: Some(upstream.workload.clone()),
        src_identity: Some(src_id.clone()),
        dst_identity: Some(dst_id.clone()),
        path,
    };
    let labels = |reporter: Reporter| {
        ConnectionLabels::new(
            &state,
            reporter,
            Some(&src_workload),
            Some(&src_id),
            Some(&upstream.workload),
            service.as_ref().map(|(_, labels)| labels.clone()),
            true,
        )
    };

    if upstream.workload.node == state.node {
        // Same node: what the inbound side of a tunnel would check, without
        // the tunnel. The source identity is ours to vouch for (we issued it).
        if dst_id.trust_domain != src_id.trust_domain || is_capture_port(target.port()) {
            warn!(%src, %target, %src_id, %dst_id, "refused same-node connection: identity or port check failed");
            refuse(downstream);
            return None;
        }
        let conn = Connection {
            src,
            dst: target,
            src_identity: Some(src_id.clone()),
        };
        // Both ends are ours: reported as source and as destination.
        let both = |flags| {
            for reporter in [Reporter::Source, Reporter::Destination] {
                proxy.metrics.failed(labels(reporter), flags);
            }
        };
        let registration = match proxy.tracker.authorize(&state, &upstream.workload, conn) {
            Ok(registration) => registration,
            Err(denial) => {
                warn!(%src, %target, src_identity = %src_id, policy = %denial.policy(), reason = %denial, "same-node connection denied by policy");
                both(ResponseFlags::AuthorizationPolicyDenied);
                refuse(downstream);
                return None;
            }
        };
        info!(%src, %target, src_identity = %src_id, dst_identity = %dst_id, "same-node mesh connection");
        let Some(stream) = connect_direct(Direction::Outbound, src, target, Some(src.ip())).await
        else {
            both(ResponseFlags::ConnectionFailure);
            refuse(downstream);
            return None;
        };
        let metrics = vec![
            proxy.metrics.open(labels(Reporter::Source)),
            proxy.metrics.open(labels(Reporter::Destination)),
        ];
        return Some(Relay {
            info: info("same-node"),
            proxy,
            ends: Ends::Tcp(downstream, stream),
            registration: Some(registration),
            metrics,
        });
    }

    let opened = {
        // Scoped to the open, as the target is: nothing after it needs them.
        let mut first = first_flight(&downstream, src)?;
        let mut dst_ids = upstream.service_sans.clone();
        dst_ids.push(dst_id.clone());
        let tunnel_target = Target {
            src_id: src_id.clone(),
            src,
            forwarded_for: src,
            dst_id: dst_ids,
            authority: target,
            peer: SocketAddr::new(target.ip(), ports::INBOUND_HBONE),
            baggage: super::hbone::baggage(&src_workload),
            service_host: service.as_ref().map(|(host, _)| host.to_string()),
        };
        // Boxed, and the target scoped to this block: opening may dial a new
        // pooled connection (TLS and HTTP/2 handshakes), a future many times
        // larger than the rest of this setup. The setup is freed before the
        // relay starts (see `spawn_connection`), but while a burst of
        // connections opens, each would hold that much.
        Box::pin(client::open(&proxy.pool, &tunnel_target, &mut first)).await
    };
    match opened {
        Ok(stream) => {
            let metrics = vec![proxy.metrics.open(labels(Reporter::Source))];
            Some(Relay {
                info: info("hbone"),
                proxy,
                ends: Ends::Hbone(downstream, stream, true),
                registration: None,
                metrics,
            })
        }
        Err(e) => {
            info!(%src, %target, error = %e, "HBONE tunnel failed");
            proxy
                .metrics
                .failed(labels(Reporter::Source), tunnel_failure(&e));
            refuse(downstream);
            None
        }
    }
}

/// The client's first bytes, to go with its CONNECT; `None` if the client
/// already reset (its connection is gone: nothing to open).
fn first_flight(downstream: &TcpStream, src: SocketAddr) -> Option<FirstFlight<'_>> {
    match FirstFlight::from_client(downstream) {
        Ok(first) => Some(first),
        Err(e) => {
            debug!(%src, error = %e, "the client reset before its tunnel was opened");
            None
        }
    }
}

/// Tunnels a connection to the waypoint its destination names. The CONNECT
/// authority is what the client dialled (a service's `VIP:port`, or a pod's
/// `IP:port`), so the waypoint applies that destination's routes and
/// policies; the tunnel presents the client's identity, as any tunnel does.
async fn via_waypoint(
    proxy: Arc<Proxy>,
    downstream: TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
    state: Arc<Snapshot>,
    waypoint: Waypoint,
) -> Option<Relay> {
    let Some(src_workload) = state
        .local_workload_by_ip(src.ip())
        .filter(|w| state.captures(w))
        .cloned()
    else {
        warn!(%src, %dst, "refused: source is not a local mesh workload, so it has no identity to present to the waypoint");
        refuse(downstream);
        return None;
    };
    let src_id = state.identity_of(&src_workload);
    let waypoint_id = state.identity_of(&waypoint.workload);
    let service = state.service_by_vip_labelled(dst.ip());
    let opened = {
        let mut first = first_flight(&downstream, src)?;
        let tunnel_target = Target {
            src_id: src_id.clone(),
            src,
            forwarded_for: src,
            dst_id: waypoint.sans.clone(),
            authority: dst,
            peer: waypoint.addr,
            baggage: super::hbone::baggage(&src_workload),
            service_host: service.as_ref().map(|(s, _)| s.hostname.clone()),
        };
        Box::pin(client::open(&proxy.pool, &tunnel_target, &mut first)).await
    };
    let labels = ConnectionLabels::new(
        &state,
        Reporter::Source,
        Some(&src_workload),
        Some(&src_id),
        Some(&waypoint.workload),
        service.map(|(_, labels)| labels),
        true,
    );
    let stream = match opened {
        Ok(stream) => stream,
        Err(e) => {
            info!(%src, %dst, waypoint = %waypoint.addr, error = %e, "HBONE tunnel to the waypoint failed");
            proxy.metrics.failed(labels, tunnel_failure(&e));
            refuse(downstream);
            return None;
        }
    };
    let metrics = vec![proxy.metrics.open(labels)];
    Some(Relay {
        proxy,
        info: ConnInfo {
            direction: Direction::Outbound,
            src,
            dst,
            src_workload: Some(src_workload),
            dst_workload: Some(waypoint.workload),
            src_identity: Some(src_id),
            dst_identity: Some(waypoint_id),
            path: "waypoint",
        },
        ends: Ends::Hbone(downstream, stream, true),
        registration: None,
        metrics,
    })
}
