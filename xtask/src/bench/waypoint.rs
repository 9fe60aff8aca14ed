//! What the waypoint adds to an HTTP request, against the ztunnel-only
//! path to the same backend, side by side in one run: latency (p50, p99)
//! of requests on a kept-alive connection, request rate, and the
//! waypoint's memory per idle HTTP/2 client connection.
//!
//! Both paths start at the client pod (node1) and end at an HTTP server in
//! the server pod (node2): ztunnel only dials the pod; through the waypoint
//! dials the `echo` service, whose waypoint runs on node2.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use ztunnel_tests::{
    lab::Lab,
    waypoint::{self, Backend, IdleH2, BACKEND_PORT, ECHO_VIP, WAYPOINT},
    ztunnel::Ztunnel,
};

use super::{median, Params, Row};

/// The measured figures: (ztunnel only, through the waypoint) per row.
pub fn run(params: &Params) -> Result<Vec<Row>> {
    let mut lab = Lab::up()?;
    lab.add_extra_pod(WAYPOINT)?;
    let config = std::env::temp_dir().join(format!("{}-waypoint-bench.yaml", lab.prefix));
    let l7 = std::env::temp_dir().join(format!("{}-waypoint-bench-l7.yaml", lab.prefix));
    std::fs::write(&config, waypoint::config(true, false, ""))?;
    // One ALLOW policy, so every request is evaluated as in production.
    std::fs::write(
        &l7,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-client, namespace: default}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/default/sa/client\"]}}]\n",
    )?;
    let result = measure(&lab, &config, &l7, params);
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&l7);
    result
}

fn measure(
    lab: &Lab,
    config: &std::path::Path,
    l7: &std::path::Path,
    params: &Params,
) -> Result<Vec<Row>> {
    let _zt1 = Ztunnel::start(lab.node("node1"), config, &lab.ca_dir)?;
    let _zt2 = Ztunnel::start(lab.node("node2"), config, &lab.ca_dir)?;
    let wp = waypoint::start(lab, config, l7, &[])?;
    let server = lab.pod("server");
    let _backend = Backend::start(&server.ns, "server", server.addr(BACKEND_PORT))?;
    let client = &lab.pod("client").ns;
    let direct = server.addr(BACKEND_PORT);
    let via = SocketAddr::from((ECHO_VIP, 80));

    let (mut d50, mut d99, mut w50, mut w99, mut drate, mut wrate) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let count = params.latency_round_trips / 2;
    for _ in 0..params.repetitions {
        // Alternating, so drift of a shared machine lands on both.
        let (p50, p99) = waypoint::http_latency(client, direct, count).context("ztunnel only")?;
        d50.push(p50);
        d99.push(p99);
        let (p50, p99) =
            waypoint::http_latency(client, via, count).context("through the waypoint")?;
        w50.push(p50);
        w99.push(p99);
        drate.push(waypoint::http_rate(
            client,
            direct,
            params.rate_threads,
            params.rate_seconds,
        )?);
        wrate.push(waypoint::http_rate(
            client,
            via,
            params.rate_threads,
            params.rate_seconds,
        )?);
    }

    // Idle HTTP/2 client connections held at the waypoint.
    let idle = (params.idle_connections / 10).max(50);
    std::thread::sleep(Duration::from_millis(500));
    let before = wp.rss_bytes()?;
    let held = IdleH2::open(client, via, idle)?;
    std::thread::sleep(Duration::from_millis(500));
    let after = wp.rss_bytes()?;
    drop(held);
    let per_conn_kib = after.saturating_sub(before) as f64 / idle as f64 / 1024.0;

    let pair = |name: &str, unit: &str, base: &[f64], via: &[f64]| {
        let (b, v) = (median(base.to_vec()), median(via.to_vec()));
        Row {
            name: name.into(),
            unit: unit.into(),
            no_mesh: Some(b),
            mesh: v,
            ratio: Some(v / b),
            relays: None,
            relays_ratio: None,
            floor_ratio: None,
            target: None,
            met: None,
            pairs: Vec::new(),
        }
    };
    Ok(vec![
        pair(
            "waypoint: HTTP latency p50 (baseline: ztunnel only)",
            "us",
            &d50,
            &w50,
        ),
        pair(
            "waypoint: HTTP latency p99 (baseline: ztunnel only)",
            "us",
            &d99,
            &w99,
        ),
        pair(
            "waypoint: HTTP requests/s (baseline: ztunnel only)",
            "req/s",
            &drate,
            &wrate,
        ),
        Row {
            name: format!("waypoint: memory per idle HTTP/2 connection, {idle} held"),
            unit: "KiB".into(),
            no_mesh: None,
            mesh: per_conn_kib,
            ratio: None,
            relays: None,
            relays_ratio: None,
            floor_ratio: None,
            target: None,
            met: None,
            pairs: Vec::new(),
        },
    ])
}
