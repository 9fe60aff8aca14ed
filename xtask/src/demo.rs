//! `cargo xtask demo`: the lab, two ztunnels, and traffic that shows what
//! capture does, printed as it happens.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ztunnel_tests::{
    lab::{Lab, Node},
    traffic::{Connection, Server},
    ztunnel::{counters, ztunnel_owns, Ztunnel},
};

pub fn run(bin: &Path, config: &Path) -> Result<()> {
    std::env::set_var("ZTUNNEL_BIN", bin);
    println!("== bringing up the lab: 2 nodes, 5 pods (network namespaces)");
    let lab = Lab::up()?;
    for pod in &lab.pods {
        println!(
            "   {:10} {:13} on {}  {}",
            pod.spec.name,
            pod.spec.ip,
            ztunnel_tests::lab::NODES[pod.spec.node],
            if pod.spec.enrolled {
                "enrolled (protocol: HBONE)"
            } else {
                "not enrolled"
            }
        );
    }
    println!("== starting ztunnel on each node with {}", config.display());
    let mut zt1 = Ztunnel::start(lab.node("node1"), config, &lab.ca_dir)?;
    let zt2 = Ztunnel::start(lab.node("node2"), config, &lab.ca_dir)?;

    let server = lab.pod("server");
    let plain = lab.pod("plain");
    let neighbor = lab.pod("neighbor");
    let client_pod = lab.pod("client");
    let servers = [
        Server::start(&server.ns, server.addr(8080))?,
        Server::start(&plain.ns, plain.addr(8080))?,
        Server::start(&neighbor.ns, neighbor.addr(8080))?,
        Server::start(&client_pod.ns, client_pod.addr(8080))?,
    ];
    let _ = &servers;

    println!("\n== traffic (1 MiB each, checksummed at both ends)");
    println!(
        "   {:34} {:26} {:17} {}",
        "flow", "owned by ztunnel on", "server saw", "result"
    );
    flow(
        &lab,
        "client -> server (other node)",
        FlowFrom::Pod("client"),
        server.addr(8080),
    )?;
    flow(
        &lab,
        "client -> neighbor (same node)",
        FlowFrom::Pod("client"),
        neighbor.addr(8080),
    )?;
    flow(
        &lab,
        "plain -> client (into enrolled)",
        FlowFrom::Pod("plain"),
        client_pod.addr(8080),
    )?;
    flow(
        &lab,
        "bystander -> plain (neither)",
        FlowFrom::Pod("bystander"),
        plain.addr(8080),
    )?;
    flow(
        &lab,
        "node1 -> client (health probe)",
        FlowFrom::Node("node1"),
        client_pod.addr(8080),
    )?;

    println!("\n== kernel counters (read with bpftool from the pinned maps)");
    for (node, pod) in [
        ("node1", "client"),
        ("node1", "neighbor"),
        ("node2", "server"),
    ] {
        let ip = lab.pod(pod).spec.ip;
        if let Some(c) = counters(lab.node(node), ip)? {
            println!(
                "   {pod:9} outbound captured {:2}  inbound captured {:2}  dropped (no ztunnel) {:2}",
                c.outbound_captured, c.inbound_captured, c.dropped_no_listener
            );
        }
    }

    println!("\n== killing ztunnel on node1: capture stays in the kernel and fails closed");
    zt1.kill();
    flow(
        &lab,
        "client -> server (ztunnel down)",
        FlowFrom::Pod("client"),
        server.addr(8080),
    )?;
    flow(
        &lab,
        "bystander -> plain (ztunnel down)",
        FlowFrom::Pod("bystander"),
        plain.addr(8080),
    )?;
    println!("== restarting it: pinned programs and maps are re-adopted");
    let zt1 = Ztunnel::start(lab.node("node1"), config, &lab.ca_dir)?;
    flow(
        &lab,
        "client -> server (ztunnel back)",
        FlowFrom::Pod("client"),
        server.addr(8080),
    )?;

    // The access log line is written when the connection has closed on
    // ztunnel's side too; give it a moment.
    std::thread::sleep(std::time::Duration::from_millis(300));
    println!("\n== node1's ztunnel said:");
    for line in zt1.log_text().lines().filter(|l| {
        l.contains("connection complete")
            || l.contains("Readopted")
            || l.contains("HBONE connection established")
    }) {
        println!("   {}", line.trim());
    }
    drop(zt2);
    println!("\n== tearing the lab down");
    Ok(())
}

enum FlowFrom {
    Pod(&'static str),
    Node(&'static str),
}

fn flow(lab: &Lab, label: &str, from: FlowFrom, to: SocketAddr) -> Result<()> {
    let (ns, src_ip) = match from {
        FlowFrom::Pod(name) => (&lab.pod(name).ns, lab.pod(name).spec.ip),
        FlowFrom::Node(name) => (&lab.node(name).ns, lab.node(name).underlay_ip),
    };
    let conn = match Connection::open(ns, to, Duration::from_secs(2)) {
        Ok(c) => c,
        Err(e) => {
            println!(
                "   {label:34} {:26} {:17} refused in the kernel ({})",
                "-",
                "nothing",
                root_cause(&e)
            );
            return Ok(());
        }
    };
    // The capturing side owns the connection to the destination address; the
    // receiving side of a tunnel owns the destination's 15008.
    let tunnel_end = SocketAddr::new(to.ip(), 15008);
    let owners: Vec<&str> = lab
        .nodes
        .iter()
        .filter(|n: &&Node| {
            ztunnel_owns(n, to, src_ip).unwrap_or(false)
                || ztunnel_owns(n, tunnel_end, src_ip).unwrap_or(false)
        })
        .map(|n| n.name)
        .collect();
    let started = Instant::now();
    let report = conn.exchange(1 << 20).context("exchange")?;
    println!(
        "   {label:34} {:26} {:17} ok, {} bytes intact in {:?}",
        if owners.is_empty() {
            "none (bypass)".to_string()
        } else {
            owners.join(" + ")
        },
        report.peer.ip().to_string(),
        report.bytes,
        started.elapsed()
    );
    Ok(())
}

fn root_cause(e: &anyhow::Error) -> String {
    e.root_cause().to_string()
}
