//! What the waypoint knows of one HTTP request when it decides on it:
//! the attributes Istio's policies and Gateway API routes match on.

use std::net::IpAddr;

/// One request, with the facts about its connection.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The client's SPIFFE id without `spiffe://`
    /// (`cluster.local/ns/<ns>/sa/<sa>`), as Istio's `principals` compare
    /// it. `None` when the client proved no identity.
    pub source_principal: Option<&'a str>,
    /// The namespace of that identity.
    pub source_namespace: Option<&'a str>,
    /// The client's address (the tunnel's peer).
    pub source_ip: IpAddr,
    /// The address the client dialled (a service VIP or a pod IP) and port.
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub method: &'a http::Method,
    /// The path, without the query.
    pub path: &'a str,
    /// The query string, without `?` (empty when there is none).
    pub query: &'a str,
    /// The `Host` header (HTTP/1.1) or `:authority` (HTTP/2), as sent.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}
