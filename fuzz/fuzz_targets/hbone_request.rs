//! HBONE: an inbound CONNECT as h2 hands it to the 15008 listener, read by
//! the listener's own code (`parse_connect`), and the `baggage` a ztunnel
//! writes read back.
//!
//! Input: lines. The first is the method, the second the `:authority`, the
//! third the pod the connection was captured for (an IP; 10.0.0.2 if not
//! one); each further line is a header, `name: value`. A line `--` starts
//! workload fields for the baggage check instead: cluster, namespace,
//! workload name, workload type, service name, service version.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use http::{header::HeaderName, uri, HeaderValue, Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use ztunnel::proxy::hbone::{
    self,
    request::{parse_connect, Baggage},
};

fuzz_target!(|data: &[u8]| {
    let (request, workload) = match data.windows(4).position(|w| w == b"\n--\n") {
        Some(i) => (&data[..i], Some(&data[i + 4..])),
        None => (data, None),
    };
    connect(request);
    if let Some(fields) = workload {
        baggage_round_trip(fields);
    }
});

fn connect(data: &[u8]) {
    let mut lines = data.split(|b| *b == b'\n');
    let method = lines.next().unwrap_or_default();
    let authority = lines.next().unwrap_or_default();
    let dst: IpAddr = std::str::from_utf8(lines.next().unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(IpAddr::from([10, 0, 0, 2]));
    // As h2's server builds the request of a CONNECT: the authority alone
    // (one h2 cannot parse is a protocol error before any of our code).
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let mut parts = uri::Parts::default();
    parts.authority = uri::Authority::try_from(authority).ok();
    let Ok(uri) = Uri::from_parts(parts) else {
        return;
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[colon + 1..]
            .strip_prefix(b" ")
            .unwrap_or(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            request.headers_mut().append(name, value);
        }
    }

    let Ok(connect) = parse_connect(&request, dst) else {
        return;
    };
    // Only the captured pod, never ztunnel's own ports.
    assert_eq!(connect.target.ip(), dst);
    assert!(!ztunnel::proxy::is_capture_port(connect.target.port()));
    // The target written out is an authority that reads back the same.
    let written = connect.target.to_string();
    let authority = uri::Authority::try_from(written.as_str())
        .unwrap_or_else(|e| panic!("{written:?} is not an authority: {e}"));
    assert_eq!(
        authority.as_str().parse::<SocketAddr>().ok(),
        Some(connect.target)
    );
    if let Ok(forwarded) = &connect.forwarded {
        for (name, value) in forwarded.0.iter().flatten() {
            assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()));
            assert_eq!(*name, name.to_ascii_lowercase());
            assert!(value
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b)));
        }
    }
    if let Ok(baggage) = &connect.baggage {
        assert!(baggage.0.len() <= Baggage::MAX_MEMBERS);
    }
}

/// What a ztunnel writes in `baggage` reads back as what it described.
fn baggage_round_trip(fields: &[u8]) {
    let text = String::from_utf8_lossy(fields);
    let mut f = text.split('\n').map(str::to_string);
    let mut next = || f.next().unwrap_or_default();
    let mut w = workload();
    w.cluster_id = next();
    w.namespace = next();
    w.workload_name = next();
    w.workload_type = next();
    w.canonical_name = next();
    w.canonical_revision = next();
    let header = hbone::baggage(&w);
    // Whatever the workload holds, the header can be sent.
    HeaderValue::from_str(&header).unwrap_or_else(|e| panic!("{header:?}: {e}"));
    let read = Baggage::parse(&header).unwrap_or_else(|e| panic!("{header:?}: {e}"));
    let kind = if w.workload_type.is_empty() {
        "deployment"
    } else {
        &w.workload_type
    };
    for (key, value) in &read.0 {
        let expected = match key.as_str() {
            "k8s.cluster.name" => &w.cluster_id,
            "k8s.namespace.name" => &w.namespace,
            "service.name" => &w.canonical_name,
            "service.version" => &w.canonical_revision,
            k if k == format!("k8s.{kind}.name") => &w.workload_name,
            other => panic!("{header:?}: a member {other:?} no field wrote"),
        };
        assert_eq!(value, expected, "{header:?}");
    }
}

fn workload() -> ztunnel::state::Workload {
    let local: ztunnel::config::local::LocalWorkload =
        serde_yaml::from_str("{workloadIps: [10.0.0.1], namespace: x, services: {}}")
            .expect("a minimal workload");
    ztunnel::state::Workload::from(&local)
}
