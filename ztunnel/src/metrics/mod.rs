//! Metrics in Prometheus text format, named and labelled as Istio's ztunnel
//! reports them so existing dashboards (Grafana, Kiali) work:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`.
//!
//! Byte counters are shared with the copy loop and advance as bytes move,
//! not only when a connection closes. The kernel's counters, certificate
//! expiry and process figures are read when scraped ([`kernel`], [`process`]).

pub mod kernel;
pub mod process;

use std::{
    collections::HashMap,
    fmt::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use crate::{
    identity::Identity,
    state::{Snapshot, Workload},
};

/// Istio's standard TCP labels. Unknown values are `unknown`, as Istio's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    /// `source` (outbound) or `destination` (inbound).
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
    pub response_flags: &'static str,
    /// `mutual_tls` through HBONE, `unknown` otherwise.
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_string()
    } else {
        s.to_string()
    }
}

impl ConnectionLabels {
    /// Labels for a connection from `src` to `dst` (either may be outside
    /// the mesh), reported by this node as `reporter`.
    pub fn new(
        snapshot: &Snapshot,
        reporter: &'static str,
        src: Option<&Workload>,
        src_identity: Option<&Identity>,
        dst: Option<&Workload>,
        service: Option<(&str, &str, &str)>,
        mutual_tls: bool,
    ) -> Self {
        let principal = |w: Option<&Workload>, id: Option<&Identity>| match (id, w) {
            (Some(id), _) => id.to_string(),
            (None, Some(w)) if w.hbone => snapshot.identity_of(w).to_string(),
            _ => UNKNOWN.to_string(),
        };
        let name = |w: Option<&Workload>| {
            w.map(|w| or_unknown(&w.workload_name))
                .unwrap_or_else(|| UNKNOWN.into())
        };
        let ns = |w: Option<&Workload>| {
            w.map(|w| or_unknown(&w.namespace))
                .unwrap_or_else(|| UNKNOWN.into())
        };
        let canonical = |w: Option<&Workload>| {
            w.map(|w| or_unknown(&w.canonical_name))
                .unwrap_or_else(|| UNKNOWN.into())
        };
        let revision = |w: Option<&Workload>| {
            w.map(|w| or_unknown(&w.canonical_revision))
                .unwrap_or_else(|| UNKNOWN.into())
        };
        let cluster = |w: Option<&Workload>| {
            w.map(|w| or_unknown(&w.cluster_id))
                .unwrap_or_else(|| UNKNOWN.into())
        };
        let (svc_host, svc_ns, svc_name) = service
            .map(|(h, n, s)| (h.to_string(), n.to_string(), s.to_string()))
            .unwrap_or_else(|| (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()));
        ConnectionLabels {
            reporter,
            source_workload: name(src),
            source_canonical_service: canonical(src),
            source_canonical_revision: revision(src),
            source_workload_namespace: ns(src),
            source_principal: principal(src, src_identity),
            source_app: canonical(src),
            source_version: revision(src),
            source_cluster: cluster(src),
            destination_service: svc_host,
            destination_service_namespace: svc_ns,
            destination_service_name: svc_name,
            destination_workload: name(dst),
            destination_canonical_service: canonical(dst),
            destination_canonical_revision: revision(dst),
            destination_workload_namespace: ns(dst),
            destination_principal: principal(dst, None),
            destination_app: canonical(dst),
            destination_version: revision(dst),
            destination_cluster: cluster(dst),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if mutual_tls { "mutual_tls" } else { UNKNOWN },
        }
    }

    fn render(&self, out: &mut String) {
        let pairs: [(&str, &str); 23] = [
            ("reporter", self.reporter),
            ("source_workload", &self.source_workload),
            ("source_canonical_service", &self.source_canonical_service),
            ("source_canonical_revision", &self.source_canonical_revision),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("source_app", &self.source_app),
            ("source_version", &self.source_version),
            ("source_cluster", &self.source_cluster),
            ("destination_service", &self.destination_service),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
            ("destination_service_name", &self.destination_service_name),
            ("destination_workload", &self.destination_workload),
            (
                "destination_canonical_service",
                &self.destination_canonical_service,
            ),
            (
                "destination_canonical_revision",
                &self.destination_canonical_revision,
            ),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", &self.destination_principal),
            ("destination_app", &self.destination_app),
            ("destination_version", &self.destination_version),
            ("destination_cluster", &self.destination_cluster),
            ("request_protocol", self.request_protocol),
            ("response_flags", self.response_flags),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
        ];
        render_labels(out, &pairs);
    }
}

/// Writes `{a="x",b="y"}` with Prometheus escaping.
pub fn render_labels(out: &mut String, pairs: &[(&str, &str)]) {
    out.push('{');
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

/// The four TCP counters of one label set.
#[derive(Debug, Default)]
pub struct TcpCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Bytes from the connection's initiator to its destination.
    pub sent: AtomicU64,
    /// Bytes from the destination back to the initiator.
    pub received: AtomicU64,
}

/// Connection metrics, by label set.
#[derive(Default)]
pub struct Metrics {
    tcp: Mutex<HashMap<ConnectionLabels, Arc<TcpCounters>>>,
}

/// One connection's handle on its counters: counts it opened now, closed on drop.
pub struct ConnectionMetrics {
    counters: Arc<TcpCounters>,
}

impl ConnectionMetrics {
    pub fn counters(&self) -> &Arc<TcpCounters> {
        &self.counters
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.counters.closed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts a connection as opened; it is counted closed when the handle drops.
    pub fn open(&self, labels: ConnectionLabels) -> ConnectionMetrics {
        let counters = match self.tcp.lock() {
            Ok(mut map) => map.entry(labels).or_default().clone(),
            Err(poisoned) => poisoned.into_inner().entry(labels).or_default().clone(),
        };
        counters.opened.fetch_add(1, Ordering::Relaxed);
        ConnectionMetrics { counters }
    }

    /// The TCP families in Prometheus text format.
    pub fn render_tcp(&self, out: &mut String) {
        let Ok(map) = self.tcp.lock() else { return };
        let families: [(&str, &str, fn(&TcpCounters) -> u64); 4] = [
            (
                "istio_tcp_connections_opened_total",
                "The total number of TCP connections opened",
                |c| c.opened.load(Ordering::Relaxed),
            ),
            (
                "istio_tcp_connections_closed_total",
                "The total number of TCP connections closed",
                |c| c.closed.load(Ordering::Relaxed),
            ),
            (
                "istio_tcp_sent_bytes_total",
                "The size of total bytes sent during request",
                |c| c.sent.load(Ordering::Relaxed),
            ),
            (
                "istio_tcp_received_bytes_total",
                "The size of total bytes received during request",
                |c| c.received.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
            for (labels, counters) in map.iter() {
                out.push_str(name);
                labels.render(out);
                let _ = writeln!(out, " {}", value(counters));
            }
        }
    }
}
