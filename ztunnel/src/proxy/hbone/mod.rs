//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams inside mutual TLS, the
//! wire format Istio's ztunnel speaks on port 15008.
//!
//! - [`client`]: opens CONNECT streams over pooled connections ([`pool`]),
//!   with the client's [`first_flight`] of bytes;
//! - [`server`]: the 15008 listener;
//! - [`request`]: what an inbound CONNECT asks for, read;
//! - [`stream`]: one CONNECT stream.
//!
//! On the wire (matching Istio's ztunnel): TLS 1.3, ALPN `h2`, no SNI; the
//! request is a plain CONNECT (`:method` and `:authority` only) whose
//! authority is the destination pod's `ip:port`, with `forwarded`,
//! `baggage` and `traceparent` headers; the answer is 200, or 400 for a bad
//! request, 401 for a policy deny, 503 when the destination is unreachable.

pub mod bounds;
pub mod client;
pub mod first_flight;
pub mod pool;
pub mod request;
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
    /// TLS records a connection queues before it writes them to its socket.
    /// rustls's default, 64 KiB, cuts a relay's 256 KiB read into writes of
    /// about 50 KiB; each write pushes its own packets, so the kernel handled
    /// half again as many per byte as for a plain relay. The queue is empty
    /// between writes: an idle connection holds none of it.
    pub const TLS_SEND_BUFFER: usize = 256 * 1024;
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
    use http::HeaderName;
    // Names, not strings: a name from a string is parsed and copied on
    // every request.
    pub const FORWARDED: HeaderName = http::header::FORWARDED;
    pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
    pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
}

/// The `baggage` header describing `workload`, as Istio's ztunnel sends it
/// (its telemetry reads it): the non-empty ones of cluster, namespace,
/// workload name (under its type), service name and version. A member
/// whose key or value holds anything but W3C `baggage-octet`s other than
/// `=` is left out: sent verbatim (as Istio's ztunnel reads it, without
/// percent-decoding), it would add members or make the header invalid, and
/// then no CONNECT carrying it could be sent. So is the workload's member
/// when its type makes a key that is not a W3C key (a token) or that
/// another member has (`cluster`, `namespace`): a reader would set the
/// whole header aside, or take the workload's name for the cluster's.
pub fn baggage(workload: &crate::state::Workload) -> String {
    let kind = if workload.workload_type.is_empty() {
        "deployment"
    } else {
        workload.workload_type.as_str()
    };
    // Only the workload's key is built: the others are constants.
    let mut kind_key = String::with_capacity(kind.len() + 9);
    kind_key.push_str("k8s.");
    kind_key.push_str(kind);
    kind_key.push_str(".name");
    let members = [
        ("k8s.cluster.name", workload.cluster_id.as_str()),
        ("k8s.namespace.name", workload.namespace.as_str()),
        (kind_key.as_str(), workload.workload_name.as_str()),
        ("service.name", workload.canonical_name.as_str()),
        ("service.version", workload.canonical_revision.as_str()),
    ];
    // One buffer for the header: this runs for every tunnelled connection.
    let mut out = String::with_capacity(members.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (i, (k, v)) in members.iter().enumerate() {
        let wanted = !v.is_empty()
            && request::is_token(k)
            && carried(v)
            && !members[..i].iter().any(|(earlier, _)| earlier == k);
        if wanted {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(v);
        }
    }
    out
}

/// Whether `s` can be sent verbatim as a baggage value.
fn carried(s: &str) -> bool {
    s.bytes()
        .all(|b| matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c | 0x3e..=0x5b | 0x5d..=0x7e))
}

#[cfg(test)]
mod tests {
    use super::baggage;
    use crate::{config::local::LocalWorkload, state::Workload};

    /// A workload from its configuration (YAML flow mapping fields).
    fn workload(fields: &str) -> Workload {
        let yaml =
            format!("{{workloadIps: [10.0.0.1], namespace: shop, services: {{}}, {fields}}}");
        let local: LocalWorkload = serde_yaml::from_str(&yaml).unwrap();
        Workload::from(&local)
    }

    fn full() -> &'static str {
        "clusterId: c1, workloadName: cart, canonicalName: cart-svc, canonicalRevision: v1"
    }

    #[test]
    fn baggage_lists_every_field_in_istio_order() {
        assert_eq!(
            baggage(&workload(full())),
            "k8s.cluster.name=c1,k8s.namespace.name=shop,k8s.deployment.name=cart,\
             service.name=cart-svc,service.version=v1"
        );
    }

    #[test]
    fn baggage_names_the_workload_under_its_type() {
        let w = workload(&format!("{}, workloadType: statefulset", full()));
        let b = baggage(&w);
        assert!(b.contains(",k8s.statefulset.name=cart,"), "{b}");
        assert!(!b.contains("deployment"), "{b}");
    }

    #[test]
    fn baggage_leaves_out_empty_fields() {
        assert_eq!(baggage(&workload("")), "k8s.namespace.name=shop");
        assert_eq!(
            baggage(&workload("canonicalRevision: v2")),
            "k8s.namespace.name=shop,service.version=v2"
        );
        let mut none = workload("");
        none.namespace.clear();
        assert_eq!(baggage(&none), "");
    }

    /// Splits a baggage header as Istio's ztunnel reads it: `,` between
    /// members, `=` between key and value.
    fn members(header: &str) -> Vec<(String, String)> {
        header
            .split(',')
            .map(|m| {
                let (k, v) = m.split_once('=').unwrap_or((m, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn baggage_round_trips_through_a_header_and_istios_reading() {
        let w = workload(
            "clusterId: Kubernetes, workloadName: cart-7d9f_x.y, canonicalName: cart, \
             canonicalRevision: 1.2.3-rc.1",
        );
        let header = http::HeaderValue::from_str(&baggage(&w)).unwrap();
        let read = members(header.to_str().unwrap());
        assert_eq!(
            read,
            [
                ("k8s.cluster.name", "Kubernetes"),
                ("k8s.namespace.name", "shop"),
                ("k8s.deployment.name", "cart-7d9f_x.y"),
                ("service.name", "cart"),
                ("service.version", "1.2.3-rc.1"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn a_value_that_would_split_or_break_the_header_is_left_out() {
        // A `,` or `=` would make a reader see other members than were
        // sent; a control character makes the header invalid, and the
        // CONNECT carrying it could not be sent at all.
        for bad in [
            "a,k8s.namespace.name=evil",
            "a=b",
            "a;p=1",
            "a b",
            "a\"b",
            "a\\b",
            "a\nb",
            "é",
        ] {
            let mut w = workload(full());
            w.canonical_revision = bad.to_string();
            let b = baggage(&w);
            assert!(http::HeaderValue::from_str(&b).is_ok(), "{bad:?}: {b:?}");
            assert_eq!(
                members(&b)
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>(),
                [
                    "k8s.cluster.name",
                    "k8s.namespace.name",
                    "k8s.deployment.name",
                    "service.name"
                ],
                "{bad:?}: {b:?}"
            );
        }
        let mut w = workload(full());
        w.workload_type = "deploy ment".into();
        assert!(!baggage(&w).contains("deploy"), "{}", baggage(&w));
    }

    /// Found by the `hbone_request` fuzz target: `k8s.{type}.name` with a
    /// type holding `/`, `:` or `]` (baggage octets, but not a token) made
    /// a header the inbound side set aside whole.
    #[test]
    fn a_workload_type_that_makes_a_bad_key_leaves_its_member_out() {
        for kind in ["a/b", "10.0].0:80", "x(y)", "{t}"] {
            let mut w = workload(full());
            w.workload_type = kind.into();
            let b = baggage(&w);
            let read = super::request::Baggage::parse(&b)
                .unwrap_or_else(|e| panic!("{kind:?}: {b:?}: {e}"));
            assert_eq!(read.get("k8s.cluster.name"), Some("c1"), "{b}");
            assert_eq!(read.0.len(), 4, "{kind:?}: {b}");
        }
    }

    /// Next to the one above: a workload of type `cluster` wrote its name
    /// as `k8s.cluster.name`, which a reader took for the cluster's when
    /// the cluster was not sent.
    #[test]
    fn a_workload_type_naming_another_member_leaves_its_member_out() {
        for (kind, key) in [
            ("cluster", "k8s.cluster.name"),
            ("namespace", "k8s.namespace.name"),
        ] {
            let mut w = workload(full());
            w.workload_type = kind.into();
            w.cluster_id.clear();
            let read = super::request::Baggage::parse(&baggage(&w)).unwrap();
            assert_eq!(
                read.0.iter().filter(|(k, _)| k == key).count(),
                usize::from(kind == "namespace")
            );
            assert!(read.0.iter().all(|(_, v)| v != "cart"), "{read:?}");
        }
    }

    #[test]
    fn a_connect_request_can_always_carry_the_baggage() {
        let mut w = workload(full());
        w.cluster_id = "c1\r\nx-injected: 1".into();
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .header(super::headers::BAGGAGE, baggage(&w))
            .body(());
        let request = request.expect("a CONNECT with this baggage");
        assert!(request.headers().get("x-injected").is_none());
    }
}
