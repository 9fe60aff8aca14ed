//! `cargo xtask demo`: the lab, the control plane, two ztunnels that get
//! their workloads, policies and certificates from it, and traffic that
//! shows what capture does, printed as it happens.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ztunnel_tests::{
    controlplane::{self, ControlPlane},
    http,
    lab::{Lab, Node},
    traffic::{Connection, Server},
    waypoint::{self, Backend, Client},
    ztunnel::{counters, ztunnel_owns},
};

/// ztunnel's admin port, in each node's namespace.
const ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);

/// Runs the demo with the binaries [`crate::build_release`] pointed the
/// harness at, serving `example` (copied: the demo pushes a change).
pub fn run(example: &Path) -> Result<()> {
    println!("== bringing up the lab: 2 nodes, 6 pods (network namespaces)");
    let mut lab = Lab::up()?;
    lab.add_extra_pod(waypoint::WAYPOINT)?;
    let config = std::env::temp_dir().join(format!("{}-demo.yaml", lab.prefix));
    let original = std::fs::read_to_string(example)
        .with_context(|| format!("reading {}", example.display()))?;
    std::fs::write(&config, &original)?;
    let result = run_in(&lab, &config, &original, example);
    let _ = std::fs::remove_file(&config);
    result
}

fn run_in(lab: &Lab, config: &Path, original: &str, example: &Path) -> Result<()> {
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
    println!(
        "== starting the control plane on {} (it stands in for istiod): it serves {} over\n   Delta ADS and signs certificates; it alone holds the CA key",
        controlplane::address(lab),
        example.display()
    );
    let cp = ControlPlane::start(lab, config, &[])?;
    println!(
        "== starting ztunnel on each node, pointed at it (XDS_ADDRESS, CA_ADDRESS, AUTH_TOKEN)"
    );
    let mut zt1 = controlplane::ztunnel(lab, cp.address, "node1", &[], &[])?;
    let zt2 = controlplane::ztunnel(lab, cp.address, "node2", &[], &[])?;
    for node in ["node1", "node2"] {
        show_from_control_plane(lab.node(node))?;
    }

    let server = lab.pod("server");
    let plain = lab.pod("plain");
    let neighbor = lab.pod("neighbor");
    let client_pod = lab.pod("client");
    let servers = tcp_servers(lab)?;

    println!("\n== traffic (1 MiB each, checksummed at both ends)");
    println!(
        "   {:34} {:26} {:17} result",
        "flow", "owned by ztunnel on", "server saw"
    );
    flow(
        lab,
        "client -> server (other node)",
        FlowFrom::Pod("client"),
        server.addr(8080),
    )?;
    flow(
        lab,
        "client -> neighbor (same node)",
        FlowFrom::Pod("client"),
        neighbor.addr(8080),
    )?;
    flow(
        lab,
        "plain -> client (into enrolled)",
        FlowFrom::Pod("plain"),
        client_pod.addr(8080),
    )?;
    flow(
        lab,
        "bystander -> plain (neither)",
        FlowFrom::Pod("bystander"),
        plain.addr(8080),
    )?;
    flow(
        lab,
        "node1 -> client (health probe)",
        FlowFrom::Node("node1"),
        client_pod.addr(8080),
    )?;

    println!("\n== pushing a policy: deny the client's identity on every workload of `default`");
    let pushed = format!(
        "{}{}- name: deny-client\n  namespace: default\n  scope: Namespace\n  action: Deny\n  dryRun: false\n  rules: [[[{{principals: [!Exact cluster.local/ns/default/sa/client]}}]]]\n",
        original,
        if original.contains("\npolicies:") { "" } else { "policies:\n" }
    );
    let edited = Instant::now();
    write_atomically(config, &pushed)?;
    let took = wait_until(Duration::from_secs(5), || {
        Connection::open(
            &lab.pod("client").ns,
            server.addr(8080),
            Duration::from_secs(1),
        )
        .and_then(|c| c.exchange(16))
        .is_err()
    });
    println!(
        "   file edited -> control plane pushed -> node2 enforces: {}",
        match took {
            Some(_) => format!(
                "{:?} after the edit (the control plane checks the file every 200 ms)",
                edited.elapsed()
            ),
            None => "not within 5 s".into(),
        }
    );
    flow(
        lab,
        "client -> server (denied)",
        FlowFrom::Pod("client"),
        server.addr(8080),
    )?;
    flow(
        lab,
        "neighbor -> server (allowed)",
        FlowFrom::Pod("neighbor"),
        server.addr(8080),
    )?;
    write_atomically(config, original)?;
    wait_until(Duration::from_secs(5), || {
        Connection::open(
            &lab.pod("client").ns,
            server.addr(8080),
            Duration::from_secs(1),
        )
        .and_then(|c| c.exchange(16))
        .is_ok()
    });
    println!("   policy removed: the client gets through again");

    // The waypoint's HTTP backends take the servers' port for a while.
    drop(servers);
    show_waypoint(lab, config, example)?;
    let _servers = tcp_servers(lab)?;

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
        lab,
        "client -> server (ztunnel down)",
        FlowFrom::Pod("client"),
        server.addr(8080),
    )?;
    flow(
        lab,
        "bystander -> plain (ztunnel down)",
        FlowFrom::Pod("bystander"),
        plain.addr(8080),
    )?;
    println!("== restarting it: pinned programs and maps are re-adopted");
    let zt1 = controlplane::ztunnel(lab, cp.address, "node1", &[], &[])?;
    flow(
        lab,
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
    drop(cp);
    println!("\n== tearing the lab down");
    Ok(())
}

/// A checksumming TCP server on port 8080 of every pod the flows reach.
fn tcp_servers(lab: &Lab) -> Result<Vec<Server>> {
    ["server", "plain", "neighbor", "client"]
        .into_iter()
        .map(|name| {
            let pod = lab.pod(name);
            Server::start(&pod.ns, pod.addr(8080))
        })
        .collect()
}

/// The waypoint: `echo` names it, so ztunnel sends echo's traffic through
/// it, where Istio's L7 policy and a Gateway API route apply.
fn show_waypoint(lab: &Lab, config: &Path, example: &Path) -> Result<()> {
    let l7 = example.with_file_name("waypoint.yaml");
    println!(
        "\n== a waypoint (L7) in the waypoint pod ({}), with {}",
        waypoint::WAYPOINT.ip,
        l7.display()
    );
    println!("   pushing: services echo ({}:80 -> server) and echo-v2 ({}:80 -> neighbor); echo names the waypoint", waypoint::ECHO_VIP, waypoint::ECHO_V2_VIP);
    write_atomically(config, &waypoint::config(true, false, ""))?;
    let wp = waypoint::start(lab, config, &l7, &[])?;
    let server = lab.pod("server");
    let neighbor = lab.pod("neighbor");
    let _backends = [
        Backend::start(&server.ns, "server", server.addr(waypoint::BACKEND_PORT))?,
        Backend::start(
            &neighbor.ns,
            "neighbor",
            neighbor.addr(waypoint::BACKEND_PORT),
        )?,
    ];
    let echo = SocketAddr::from((waypoint::ECHO_VIP, 80));
    // The control plane pushes the services to both ztunnels first.
    let mut client = None;
    wait_until(Duration::from_secs(5), || {
        client = Client::connect(&lab.pod("client").ns, echo, false).ok();
        client
            .as_mut()
            .and_then(|c| c.get("/hello").ok())
            .is_some_and(|r| r.status == 200)
    });
    let mut client = client.context("echo did not answer through the waypoint")?;
    for (method, path) in [("GET", "/hello"), ("GET", "/admin"), ("POST", "/hello")] {
        let reply = client.request(method, path, &[])?;
        println!(
            "   client: {method:4} http://{echo}{path:8} -> {} {}",
            reply.status,
            reply.body.trim()
        );
    }
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..100 {
        match client.get("/canary")?.body.trim() {
            "pod=server" => v1 += 1,
            _ => v2 += 1,
        }
    }
    println!("   client: 100 x GET /canary -> server {v1}, neighbor {v2} (route weights 80/20)");
    let metrics = http::get(
        &lab.pod(waypoint::WAYPOINT.name).ns,
        SocketAddr::from((waypoint::WAYPOINT.ip, 15020)),
        "/metrics",
    )?;
    println!("   the waypoint's metrics (istio_requests_total, as Istio's dashboards read them):");
    for code in ["200", "403"] {
        let n = http::sample(
            &metrics.body,
            "istio_requests_total",
            &[("response_code", code), ("source_workload", "client")],
        )
        .unwrap_or(0.0);
        println!("      response_code={code} source_workload=client reporter=waypoint: {n}");
    }
    std::thread::sleep(Duration::from_millis(200));
    println!("   its access log (the last three lines):");
    let log = wp.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("waypoint::access"))
        .collect();
    for line in lines.iter().skip(lines.len().saturating_sub(3)) {
        println!("      {}", line.trim());
    }
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
    // Same-node flows between enrolled pods pass in the kernel: counted on
    // the source pod, owned by no ztunnel socket.
    let direct = || -> u64 {
        let FlowFrom::Pod(name) = from else { return 0 };
        let pod = lab.pod(name);
        counters(&lab.nodes[pod.spec.node], pod.spec.ip)
            .ok()
            .flatten()
            .map_or(0, |c| c.outbound_direct)
    };
    let direct_before = direct();
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
    let report = match conn.exchange(1 << 20) {
        Ok(report) => report,
        Err(e) => {
            println!(
                "   {label:34} {:26} {:17} closed by ztunnel ({})",
                owners.join(" + "),
                "nothing",
                root_cause(&e)
            );
            return Ok(());
        }
    };
    let passed_in_kernel = owners.is_empty() && direct() > direct_before;
    println!(
        "   {label:34} {:26} {:17} ok, {} bytes intact in {:?}",
        if passed_in_kernel {
            "none (kernel, policy ok)".to_string()
        } else if owners.is_empty() {
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

/// What a node's ztunnel got from the control plane, from its
/// `/config_dump`.
fn show_from_control_plane(node: &Node) -> Result<()> {
    // Certificates are fetched once the workloads are known: give them a
    // moment.
    let started = Instant::now();
    let dump = loop {
        let r = http::get(&node.ns, ADMIN, "/config_dump")?;
        let dump: serde_json::Value = serde_json::from_str(&r.body).context("config_dump")?;
        let fetched = dump["certificates"]
            .as_array()
            .is_some_and(|c| !c.is_empty());
        if fetched || started.elapsed() > Duration::from_secs(5) {
            break dump;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let xds = &dump["source"]["xds"];
    let count = |t: &str| xds["types"][t]["resources"].as_u64().unwrap_or(0);
    println!(
        "   {}: xDS connected={} addresses={} authorizations={}",
        node.name,
        xds["connected"],
        count(ztunnel::xds::ADDRESS_TYPE),
        count(ztunnel::xds::AUTHORIZATION_TYPE),
    );
    for cert in dump["certificates"].as_array().into_iter().flatten() {
        println!(
            "      certificate {} serial {} expires in {}s",
            cert["identity"].as_str().unwrap_or("?"),
            cert["serial"].as_str().unwrap_or("?"),
            cert["expires_in_seconds"]
        );
    }
    Ok(())
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Polls `check` until it holds; how long that took, or `None`.
fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
