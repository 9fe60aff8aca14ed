//! The series as Prometheus reads them: names, labels, escaping, flags.

use std::sync::Arc;

use super::*;
use crate::identity::Identity;

fn peer(workload: &str, principal: &str) -> Arc<PeerLabels> {
    Arc::new(PeerLabels {
        workload: workload.into(),
        namespace: "default".into(),
        canonical_service: "app".into(),
        canonical_revision: "v1".into(),
        cluster: "Kubernetes".into(),
        principal: principal.into(),
    })
}

fn labels() -> ConnectionLabels {
    ConnectionLabels {
        reporter: Reporter::Destination,
        source: peer("client", "spiffe://cluster.local/ns/default/sa/client"),
        destination: PeerLabels::unknown(),
        service: None,
        mutual_tls: true,
        response_flags: ResponseFlags::None,
    }
}

/// The sample of `name` whose label set contains every `want` pair.
fn sample(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn a_connection_counts_opened_now_and_closed_when_dropped() {
    let metrics = Metrics::default();
    let connection = metrics.open(labels());
    connection.request_bytes.inc_by(100);
    connection.response_bytes.inc_by(7);
    let text = metrics.encode();
    let any = [("reporter", "destination")];
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &any),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &any),
        None
    );
    // Istio's directions: received is what the client sent.
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &any),
        Some(100.0)
    );
    assert_eq!(sample(&text, "istio_tcp_sent_bytes_total", &any), Some(7.0));
    drop(connection);
    let text = metrics.encode();
    assert_eq!(
        sample(
            &text,
            "istio_tcp_connections_closed_total",
            &[("response_flags", "-")]
        ),
        Some(1.0)
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn labels_carry_istios_names_and_unknowns() {
    let metrics = Metrics::default();
    drop(metrics.open(labels()));
    let text = metrics.encode();
    let want = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_app", "app"),
        ("source_version", "v1"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/client",
        ),
        ("destination_workload", "unknown"),
        ("destination_service", "unknown"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &want),
        Some(1.0),
        "{text}"
    );
    assert!(text.contains(
        "# HELP istio_tcp_connections_opened The total number of TCP connections opened.\n# TYPE istio_tcp_connections_opened counter\n"
    ), "{text}");
}

#[test]
fn a_denied_connection_is_closed_and_failed_with_deny() {
    let metrics = Metrics::default();
    metrics.failed(labels(), ResponseFlags::AuthorizationPolicyDenied);
    let mut refused = metrics.open(labels());
    refused.fail(ResponseFlags::ConnectionFailure);
    drop(refused);
    let text = metrics.encode();
    let deny = [("response_flags", "DENY")];
    let connect = [("response_flags", "CONNECT")];
    // Opened before anything was known: no flag.
    assert_eq!(
        sample(
            &text,
            "istio_tcp_connections_opened_total",
            &[("response_flags", "-")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &deny),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_failed_total", &deny),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_failed_total", &connect),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "istio_tcp_connections_failed_total",
            &[("response_flags", "-")]
        ),
        None
    );
}

#[test]
fn label_values_are_escaped() {
    let metrics = Metrics::default();
    let odd = labels().with_source(peer("a\"b\\c\nd", "unknown"));
    drop(metrics.open(odd));
    let text = metrics.encode();
    assert!(text.contains(r#"source_workload="a\"b\\c\nd""#), "{text}");
}

#[test]
fn refusals_are_counted_by_listener_and_bound() {
    let metrics = Metrics::default();
    metrics.refused("hbone", "handshakes");
    metrics.refused("hbone", "handshakes");
    metrics.refused("hbone", "peer_connections");
    assert_eq!(metrics.refused_count("hbone", "handshakes"), 2);
    let text = metrics.encode();
    assert_eq!(
        sample(
            &text,
            "ztunnel_connections_refused_total",
            &[("listener", "hbone"), ("reason", "peer_connections")]
        ),
        Some(1.0)
    );
}

#[test]
fn baggage_fills_an_unknown_source() {
    let id = Identity::new("cluster.local", "shop", "cart");
    let members = [
        ("k8s.cluster.name", "east"),
        ("k8s.namespace.name", "shop"),
        ("k8s.statefulset.name", "cart-db"),
        ("service.name", "cart"),
        ("service.version", "v2"),
    ];
    let labels = PeerLabels::from_baggage(
        |k| members.iter().find(|(m, _)| *m == k).map(|(_, v)| *v),
        &id,
    );
    assert_eq!(labels.workload, "cart-db");
    assert_eq!(labels.namespace, "shop");
    assert_eq!(labels.canonical_service, "cart");
    assert_eq!(labels.canonical_revision, "v2");
    assert_eq!(labels.cluster, "east");
    assert_eq!(labels.principal, "spiffe://cluster.local/ns/shop/sa/cart");
    // Nothing said: unknown, but the proved identity stays.
    let bare = PeerLabels::from_baggage(|_| None, &id);
    assert_eq!(bare.workload, "unknown");
    assert_eq!(bare.principal, "spiffe://cluster.local/ns/shop/sa/cart");
}
