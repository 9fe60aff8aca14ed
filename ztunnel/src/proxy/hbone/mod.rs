//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams inside mutual TLS, the
//! wire format Istio's ztunnel speaks on port 15008.
//!
//! - [`client`]: opens CONNECT streams over pooled connections ([`pool`]);
//! - [`server`]: the 15008 listener;
//! - [`stream`]: one CONNECT stream.
//!
//! On the wire (matching Istio's ztunnel): TLS 1.3, ALPN `h2`, no SNI; the
//! request is a plain CONNECT (`:method` and `:authority` only) whose
//! authority is the destination pod's `ip:port`, with `forwarded`,
//! `baggage` and `traceparent` headers; the answer is 200, or 400 for a bad
//! request, 401 for a policy deny, 503 when the destination is unreachable.

pub mod client;
pub mod pool;
pub mod server;
pub mod stream;

/// HTTP/2 settings, Istio's ztunnel's defaults: windows large enough for one
/// stream to run at full speed across a fast link.
pub mod settings {
    pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
    pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
    pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
    /// Streams a server accepts on one connection.
    pub const SERVER_MAX_STREAMS: u32 = 200;
    /// Streams a client puts on one pooled connection before opening another.
    pub const CLIENT_MAX_STREAMS: usize = 100;
    /// Request headers a server accepts (bytes).
    pub const SERVER_MAX_HEADER_LIST: u32 = 64 * 1024;
    pub const CLIENT_MAX_HEADER_LIST: u32 = 16 * 1024;
    /// Bytes buffered per stream before a writer waits.
    pub const MAX_SEND_BUFFER: usize = 400 * 1024;
}

/// Response statuses, as Istio's ztunnel uses them.
pub mod status {
    use http::StatusCode;
    pub const OK: StatusCode = StatusCode::OK;
    pub const BAD_REQUEST: StatusCode = StatusCode::BAD_REQUEST;
    pub const DENIED: StatusCode = StatusCode::UNAUTHORIZED;
    pub const UNREACHABLE: StatusCode = StatusCode::SERVICE_UNAVAILABLE;
}

/// Header names.
pub mod headers {
    pub const FORWARDED: &str = "forwarded";
    pub const BAGGAGE: &str = "baggage";
    pub const TRACEPARENT: &str = "traceparent";
}

/// The `baggage` header describing `workload`, as Istio's ztunnel sends it
/// (its telemetry reads it): the non-empty ones of cluster, namespace,
/// workload name (under its type), service name and version.
pub fn baggage(workload: &crate::state::Workload) -> String {
    let kind = if workload.workload_type.is_empty() {
        "deployment"
    } else {
        workload.workload_type.as_str()
    };
    [
        ("k8s.cluster.name".to_string(), workload.cluster_id.as_str()),
        (
            "k8s.namespace.name".to_string(),
            workload.namespace.as_str(),
        ),
        (format!("k8s.{kind}.name"), workload.workload_name.as_str()),
        ("service.name".to_string(), workload.canonical_name.as_str()),
        (
            "service.version".to_string(),
            workload.canonical_revision.as_str(),
        ),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("{k}={v}"))
    .collect::<Vec<_>>()
    .join(",")
}
