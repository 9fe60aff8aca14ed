//! Istio's standard TCP labels, as typed label sets.
//!
//! A connection's labels are mostly two workloads' descriptions. Those are
//! built once per workload when a configuration is applied ([`PeerLabels`],
//! held by the `Snapshot`), so opening a connection clones a few `Arc`s
//! instead of formatting twenty strings.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder};

use crate::{
    identity::Identity,
    state::{Snapshot, Workload},
};

/// What Istio writes for a label it does not know.
pub const UNKNOWN: &str = "unknown";

/// Which end of the connection reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client's node (outbound).
    Source,
    /// The server's node (inbound).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Why a connection failed, with Istio's spelling (Envoy's response flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResponseFlags {
    /// Nothing went wrong: `-`.
    #[default]
    None,
    /// An authorization policy denied it: `DENY`.
    AuthorizationPolicyDenied,
    /// The upstream (or the tunnel to it) could not be reached: `CONNECT`.
    ConnectionFailure,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::AuthorizationPolicyDenied => "DENY",
            ResponseFlags::ConnectionFailure => "CONNECT",
        }
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// A label value written with the exposition format's escapes. The
/// encoder writes values as they are, and some come from peers (baggage)
/// or files: a quote or a newline there would end the value and let a peer
/// forge series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Escaped<'a>(pub &'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &escape(self.0))
    }
}

/// `value` with the exposition format's escapes, for label values kept in
/// label sets that the encoder writes as they are (the waypoint's).
pub fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// One end of a connection, as Istio labels it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerLabels {
    pub workload: String,
    pub namespace: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
    pub principal: String,
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_string()
    } else {
        s.to_string()
    }
}

impl PeerLabels {
    /// A peer nothing is known of.
    pub fn unknown() -> Arc<Self> {
        static UNKNOWN_PEER: std::sync::OnceLock<Arc<PeerLabels>> = std::sync::OnceLock::new();
        UNKNOWN_PEER
            .get_or_init(|| {
                Arc::new(PeerLabels {
                    workload: UNKNOWN.into(),
                    namespace: UNKNOWN.into(),
                    canonical_service: UNKNOWN.into(),
                    canonical_revision: UNKNOWN.into(),
                    cluster: UNKNOWN.into(),
                    principal: UNKNOWN.into(),
                })
            })
            .clone()
    }

    /// A workload of the configuration, with the identity it would present
    /// (its principal is `unknown` when it does not speak HBONE).
    pub fn of_workload(w: &Workload, identity: &Identity) -> Self {
        PeerLabels {
            workload: or_unknown(&w.workload_name),
            namespace: or_unknown(&w.namespace),
            canonical_service: or_unknown(&w.canonical_name),
            canonical_revision: or_unknown(&w.canonical_revision),
            cluster: or_unknown(&w.cluster_id),
            principal: if w.hbone {
                identity.to_string()
            } else {
                UNKNOWN.into()
            },
        }
    }

    /// A peer described only by what it said of itself in `baggage` (a
    /// W3C baggage member list) and by the identity its certificate proved.
    /// Istio's ztunnel fills an unknown source this way.
    pub fn from_baggage<'a>(
        mut get: impl FnMut(&str) -> Option<&'a str>,
        identity: &Identity,
    ) -> Self {
        let workload = [
            "k8s.deployment.name",
            "k8s.statefulset.name",
            "k8s.daemonset.name",
            "k8s.job.name",
            "k8s.cronjob.name",
            "k8s.pod.name",
        ]
        .into_iter()
        .find_map(&mut get)
        .unwrap_or_default();
        PeerLabels {
            workload: or_unknown(workload),
            namespace: or_unknown(get("k8s.namespace.name").unwrap_or_default()),
            canonical_service: or_unknown(get("service.name").unwrap_or_default()),
            canonical_revision: or_unknown(get("service.version").unwrap_or_default()),
            cluster: or_unknown(get("k8s.cluster.name").unwrap_or_default()),
            principal: identity.to_string(),
        }
    }
}

/// The destination service of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceLabels {
    pub hostname: String,
    pub namespace: String,
    pub name: String,
}

/// Istio's label set for its `istio_tcp_*` series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source: Arc<PeerLabels>,
    pub destination: Arc<PeerLabels>,
    pub service: Option<Arc<ServiceLabels>>,
    /// Through HBONE (`mutual_tls`), or not (`unknown`).
    pub mutual_tls: bool,
    pub response_flags: ResponseFlags,
}

impl ConnectionLabels {
    /// Labels for a connection from `src` to `dst` (either may be outside
    /// the mesh), reported by this node as `reporter`. `src_identity` is the
    /// identity the source proved (inbound) or will present (outbound).
    pub fn new(
        snapshot: &Snapshot,
        reporter: Reporter,
        src: Option<&Workload>,
        src_identity: Option<&Identity>,
        dst: Option<&Workload>,
        service: Option<Arc<ServiceLabels>>,
        mutual_tls: bool,
    ) -> Self {
        let source = match (src, src_identity) {
            (Some(w), Some(id)) => {
                let known = snapshot.peer_labels(w);
                if known.principal == UNKNOWN || id_matches(&known.principal, id) {
                    known
                } else {
                    // A proved identity other than the configuration's: the
                    // proof is what gets reported.
                    let mut labels = (*known).clone();
                    labels.principal = id.to_string();
                    Arc::new(labels)
                }
            }
            (Some(w), None) => snapshot.peer_labels(w),
            (None, Some(id)) => Arc::new(PeerLabels::from_baggage(|_| None, id)),
            (None, None) => PeerLabels::unknown(),
        };
        ConnectionLabels {
            reporter,
            source,
            destination: dst
                .map(|w| snapshot.peer_labels(w))
                .unwrap_or_else(PeerLabels::unknown),
            service,
            mutual_tls,
            response_flags: ResponseFlags::None,
        }
    }

    /// The same labels with the source described by `source` instead.
    pub fn with_source(mut self, source: Arc<PeerLabels>) -> Self {
        self.source = source;
        self
    }

    /// The same labels with `flags`.
    pub fn with_flags(mut self, flags: ResponseFlags) -> Self {
        self.response_flags = flags;
        self
    }
}

/// Whether the principal string `principal` names `id`, without formatting it.
fn id_matches(principal: &str, id: &Identity) -> bool {
    principal
        .strip_prefix("spiffe://")
        .and_then(|r| r.strip_prefix(&*id.trust_domain))
        .and_then(|r| r.strip_prefix("/ns/"))
        .and_then(|r| r.strip_prefix(&*id.namespace))
        .and_then(|r| r.strip_prefix("/sa/"))
        == Some(&*id.service_account)
}

impl EncodeLabelSet for ConnectionLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let (src, dst) = (&*self.source, &*self.destination);
        let (svc_host, svc_ns, svc_name) = match &self.service {
            Some(s) => (s.hostname.as_str(), s.namespace.as_str(), s.name.as_str()),
            None => (UNKNOWN, UNKNOWN, UNKNOWN),
        };
        let pairs: [(&str, Escaped); 22] = [
            ("reporter", Escaped(self.reporter.as_str())),
            ("source_workload", Escaped(&src.workload)),
            ("source_canonical_service", Escaped(&src.canonical_service)),
            (
                "source_canonical_revision",
                Escaped(&src.canonical_revision),
            ),
            ("source_workload_namespace", Escaped(&src.namespace)),
            ("source_principal", Escaped(&src.principal)),
            ("source_app", Escaped(&src.canonical_service)),
            ("source_version", Escaped(&src.canonical_revision)),
            ("source_cluster", Escaped(&src.cluster)),
            ("destination_service", Escaped(svc_host)),
            ("destination_service_namespace", Escaped(svc_ns)),
            ("destination_service_name", Escaped(svc_name)),
            ("destination_workload", Escaped(&dst.workload)),
            (
                "destination_canonical_service",
                Escaped(&dst.canonical_service),
            ),
            (
                "destination_canonical_revision",
                Escaped(&dst.canonical_revision),
            ),
            ("destination_workload_namespace", Escaped(&dst.namespace)),
            ("destination_principal", Escaped(&dst.principal)),
            ("destination_app", Escaped(&dst.canonical_service)),
            ("destination_version", Escaped(&dst.canonical_revision)),
            ("destination_cluster", Escaped(&dst.cluster)),
            ("request_protocol", Escaped("tcp")),
            (
                "connection_security_policy",
                Escaped(if self.mutual_tls {
                    "mutual_tls"
                } else {
                    UNKNOWN
                }),
            ),
        ];
        pairs.as_slice().encode(encoder)?;
        [("response_flags", self.response_flags)]
            .as_slice()
            .encode(encoder)
    }
}
