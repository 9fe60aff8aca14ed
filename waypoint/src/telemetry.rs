//! Istio's request metrics, with Istio's names, help and labels, so that
//! Kiali and the Istio Grafana dashboards read the waypoint as they read
//! Istio's: `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes` (reporter `waypoint`), plus one access-log line per
//! request.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use ztunnel::{
    identity::Identity,
    state::{Snapshot, Workload},
};

/// Istio's standard request labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";

/// A label value: `unknown` when empty, escaped otherwise (the encoder
/// writes values as they are; a quote or newline must not end one).
fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_string()
    } else {
        ztunnel::metrics::labels::escape(s).into_owned()
    }
}

/// What one request's labels are made of.
pub struct RequestFacts<'a> {
    pub state: &'a Snapshot,
    pub source: Option<&'a Workload>,
    pub source_identity: Option<&'a Identity>,
    /// `(hostname, namespace, name)` of the service addressed.
    pub service: Option<(&'a str, &'a str, &'a str)>,
    pub destination: Option<&'a Workload>,
    pub grpc: bool,
    pub status: u16,
    pub flags: &'static str,
}

impl RequestLabels {
    pub fn new(f: &RequestFacts<'_>) -> Self {
        let src = f.source;
        let dst = f.destination;
        let field =
            |w: Option<&Workload>, get: fn(&Workload) -> &str| or_unknown(w.map(get).unwrap_or(""));
        let dst_principal = dst
            .map(|w| or_unknown(&f.state.identity_of(w).to_string()))
            .unwrap_or_else(|| UNKNOWN.into());
        RequestLabels {
            reporter: "waypoint",
            source_workload: field(src, |w| &w.workload_name),
            source_canonical_service: field(src, |w| &w.canonical_name),
            source_canonical_revision: field(src, |w| &w.canonical_revision),
            source_workload_namespace: match (src, f.source_identity) {
                (Some(w), _) => or_unknown(&w.namespace),
                (None, Some(id)) => or_unknown(&id.namespace),
                _ => UNKNOWN.into(),
            },
            source_principal: f
                .source_identity
                .map(|id| or_unknown(&id.to_string()))
                .unwrap_or_else(|| UNKNOWN.into()),
            source_app: field(src, |w| &w.canonical_name),
            source_version: field(src, |w| &w.canonical_revision),
            source_cluster: field(src, |w| &w.cluster_id),
            destination_service: or_unknown(f.service.map(|s| s.0).unwrap_or("")),
            destination_service_namespace: or_unknown(f.service.map(|s| s.1).unwrap_or("")),
            destination_service_name: or_unknown(f.service.map(|s| s.2).unwrap_or("")),
            destination_workload: field(dst, |w| &w.workload_name),
            destination_canonical_service: field(dst, |w| &w.canonical_name),
            destination_canonical_revision: field(dst, |w| &w.canonical_revision),
            destination_workload_namespace: field(dst, |w| &w.namespace),
            destination_principal: dst_principal,
            destination_app: field(dst, |w| &w.canonical_name),
            destination_version: field(dst, |w| &w.canonical_revision),
            destination_cluster: field(dst, |w| &w.cluster_id),
            request_protocol: if f.grpc { "grpc" } else { "http" },
            response_code: f.status.to_string(),
            grpc_response_status: String::new(),
            response_flags: f.flags,
            connection_security_policy: "mutual_tls",
        }
    }
}

/// The waypoint's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    pub denied: Counter,
    pub connections: prometheus_client::metrics::gauge::Gauge,
}

/// Istio's buckets for request duration (milliseconds).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(DURATION_BUCKETS)) as fn() -> Histogram,
        );
        let request_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1.0, 10.0, 9,
                ))
            }) as fn() -> Histogram,
        );
        registry.register("istio_requests", "Total requests.", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds.",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request size in bytes.",
            request_bytes.clone(),
        );
        let denied = Counter::default();
        registry.register(
            "waypoint_requests_denied",
            "Requests refused by an AuthorizationPolicy.",
            denied.clone(),
        );
        let connections = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "waypoint_connections",
            "Client connections (HBONE streams) being served.",
            connections.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            duration,
            request_bytes,
            denied,
            connections,
        })
    }

    /// Records one finished request.
    pub fn record(&self, labels: &RequestLabels, millis: f64, request_bytes: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(millis);
        self.request_bytes
            .get_or_create(labels)
            .observe(request_bytes as f64);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_empty_ones_unknown() {
        assert_eq!(or_unknown(""), "unknown");
        assert_eq!(or_unknown("reviews"), "reviews");
        assert_eq!(or_unknown("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
    }
}
