//! Metrics, with `prometheus-client`, named, labelled and described as
//! Istio's ztunnel reports them so existing dashboards (Grafana, Kiali) work:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_connections_failed_total`, `istio_tcp_sent_bytes_total`,
//! `istio_tcp_received_bytes_total`, with Istio's `response_flags` (`DENY`,
//! `CONNECT`) on the connections that were denied or could not be made.
//!
//! A connection takes its byte counters once, when it opens; the copy loop
//! then adds to them as bytes move (an atomic add), not only at close. What
//! ztunnel's own bounds turned away is `ztunnel_connections_refused_total`.
//! The kernel's counters, certificate expiry, the control plane's figures
//! and the process's are read when scraped ([`scrape`]).

pub mod kernel;
pub mod labels;
pub mod process;
pub mod scrape;

use prometheus_client::{
    collector::Collector,
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

pub use labels::{ConnectionLabels, PeerLabels, Reporter, ResponseFlags};

/// The `istio_tcp_*` families.
#[derive(Clone, Default)]
struct Tcp {
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    failed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
}

/// What a bound refused: which listener, and which bound.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

/// Every series ztunnel serves on `/metrics`.
pub struct Metrics {
    registry: Registry,
    tcp: Tcp,
    refused: Family<RefusedLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Metrics {
    /// The families, and `scrape` for what is read at scrape time.
    pub fn new(scrape: Option<Box<dyn Collector>>) -> Self {
        let mut registry = Registry::default();
        let tcp = Tcp::default();
        // Istio's names and help texts (the encoder appends `_total` to
        // counters and a full stop to help).
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            tcp.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            tcp.closed.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish (unstable)",
            tcp.failed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            tcp.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            tcp.received.clone(),
        );
        let refused = Family::default();
        registry.register(
            "ztunnel_connections_refused",
            "Connections ztunnel turned away to stay within a bound (handshakes in progress, connections per peer, idle time), by listener and bound",
            refused.clone(),
        );
        if let Some(scrape) = scrape {
            registry.register_collector(scrape);
        }
        Metrics {
            registry,
            tcp,
            refused,
        }
    }

    /// Counts a connection as opened. It is counted closed (with the flags
    /// set on it by then) when the handle drops.
    pub fn open(&self, labels: ConnectionLabels) -> ConnectionMetrics {
        self.tcp.opened.get_or_create(&labels).inc();
        ConnectionMetrics {
            // Istio's ztunnel counts, as Envoy does, what the proxy sends
            // back to the client as sent, and what it receives from the
            // client as received.
            request_bytes: self.tcp.received.get_or_create(&labels).clone(),
            response_bytes: self.tcp.sent.get_or_create(&labels).clone(),
            tcp: self.tcp.clone(),
            labels,
            flags: ResponseFlags::None,
        }
    }

    /// Counts a connection that failed before any byte moved: opened,
    /// closed and failed, the last two with `flags`, as Istio's ztunnel does.
    pub fn failed(&self, labels: ConnectionLabels, flags: ResponseFlags) {
        let mut connection = self.open(labels);
        connection.fail(flags);
    }

    /// Counts a connection that a bound turned away.
    pub fn refused(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }

    /// How many connections a bound has turned away so far.
    #[cfg(test)]
    pub fn refused_count(&self, listener: &'static str, reason: &'static str) -> u64 {
        self.refused
            .get_or_create(&RefusedLabels { listener, reason })
            .get()
    }

    /// Everything, in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// One connection's handle on its series.
pub struct ConnectionMetrics {
    labels: ConnectionLabels,
    tcp: Tcp,
    flags: ResponseFlags,
    /// Bytes from the connection's initiator to its destination
    /// (`istio_tcp_received_bytes_total`).
    pub request_bytes: Counter,
    /// Bytes from the destination back to the initiator
    /// (`istio_tcp_sent_bytes_total`).
    pub response_bytes: Counter,
}

impl ConnectionMetrics {
    /// Marks the connection as failed with `flags`; it is counted so when
    /// it closes.
    pub fn fail(&mut self, flags: ResponseFlags) {
        self.flags = flags;
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        if self.flags == ResponseFlags::None {
            self.tcp.closed.get_or_create(&self.labels).inc();
            return;
        }
        let labels = self.labels.clone().with_flags(self.flags);
        self.tcp.closed.get_or_create(&labels).inc();
        self.tcp.failed.get_or_create(&labels).inc();
    }
}

#[cfg(test)]
mod tests;
