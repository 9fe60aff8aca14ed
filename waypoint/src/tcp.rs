//! Client connections that are not HTTP (a database protocol, TLS to the
//! backend itself): relayed as bytes to an endpoint of the destination,
//! after the waypoint's policies are applied to what a TCP connection
//! shows (identity, addresses, port). A DENY rule with HTTP conditions
//! denies such a connection; an ALLOW rule with them does not allow it.

use std::sync::Arc;

use tracing::{debug, info};

use crate::{
    policy::{ConnInfo, Decision},
    proxy::{self, Tunnel, Waypoint},
};

/// Relays `client` to the tunnel's destination if policy allows it.
pub async fn relay<I>(mut client: I, tunnel: Arc<Tunnel>, wp: &Waypoint)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let state = wp.state.borrow().clone();
    let l7 = wp.l7.borrow().clone();
    let dialled = state
        .service_by_vip(tunnel.dst.ip())
        .map(|s| (s.hostname.clone(), s.namespace.clone(), s.name.clone()));
    let services = proxy::services_of(&state, tunnel.dst, dialled.as_ref());
    let service_refs: Vec<(&str, &str)> = services
        .iter()
        .map(|(ns, name)| (ns.as_str(), name.as_str()))
        .collect();
    let principal = tunnel.peer_id.principal();
    let conn = ConnInfo {
        source_principal: Some(&principal),
        source_namespace: Some(&tunnel.peer_id.namespace),
        source_ip: tunnel.peer.ip(),
        destination_ip: tunnel.dst.ip(),
        destination_port: tunnel.dst.port(),
    };
    if let Decision::Deny { reason, .. } = l7.policies.evaluate_tcp(&service_refs, &conn) {
        wp.metrics.denied.inc();
        info!(target: "waypoint::access", src = %tunnel.peer, src_principal = %tunnel.peer_id, authority = %tunnel.dst, protocol = %"tcp", policy = %reason, "TCP connection denied");
        return;
    }
    let upstream = match proxy::pick(&state, &tunnel, dialled.as_ref(), None) {
        Ok(upstream) => upstream,
        Err(e) => {
            info!(target: "waypoint::access", src = %tunnel.peer, authority = %tunnel.dst, protocol = %"tcp", flags = e.flag(), error = %e, "TCP connection refused");
            return;
        }
    };
    let mut server = match wp.upstreams.stream(&state, &upstream).await {
        Ok(server) => server,
        Err(e) => {
            info!(target: "waypoint::access", src = %tunnel.peer, authority = %tunnel.dst, upstream = %upstream.addr, protocol = %"tcp", flags = e.flag(), error = %e, "TCP connection refused");
            return;
        }
    };
    let started = std::time::Instant::now();
    let copied = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    let (sent, received) = match copied {
        Ok(counts) => counts,
        Err(e) => {
            debug!(error = %e, "TCP relay ended with an error");
            (0, 0)
        }
    };
    info!(
        target: "waypoint::access",
        src = %tunnel.peer,
        src_principal = %tunnel.peer_id,
        authority = %tunnel.dst,
        upstream = %upstream.addr,
        protocol = %"tcp",
        bytes_received = sent,
        bytes_sent = received,
        duration_ms = started.elapsed().as_millis() as u64,
        "connection"
    );
}
