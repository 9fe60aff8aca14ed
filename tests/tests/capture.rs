//! Kernel-level capture tests: real eBPF programs, real traffic through the
//! lab's namespaces. Run as root (CI does).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Result;
use ztunnel_tests::{
    lab,
    setup::Setup,
    traffic::{request, Connection, Server},
    wait::eventually,
    ztunnel::{counters, keepalive_armed, ztunnel_owns},
};

fn ip(pod: &lab::Pod) -> IpAddr {
    IpAddr::V4(pod.spec.ip)
}

/// Opens a connection and reports whether `node`'s ztunnel owns it, then
/// completes the exchange and returns what the server saw.
fn held_exchange(s: &Setup, from: &str, to: SocketAddr, node: &str) -> Result<(bool, IpAddr)> {
    let pod = s.lab.pod(from);
    let conn = Connection::open(&pod.ns, to, Duration::from_secs(5))?;
    let owned = ztunnel_owns(s.lab.node(node), to, pod.spec.ip)?;
    let report = conn.exchange(64 * 1024)?;
    Ok((owned, report.peer.ip()))
}

#[test]
fn enrolled_pod_to_other_node_is_captured_and_tunnelled_keeping_client_ip() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;

    let conn = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    // While the connection is open, node1's ztunnel owns it (its accepted
    // socket has the server's address as its local address), and node2's
    // owns the tunnel it arrived in (on the server's 15008, from the client's IP).
    assert!(
        ztunnel_owns(s.lab.node("node1"), server.addr, client.spec.ip)?,
        "node1's ztunnel does not own the flow"
    );
    assert!(
        ztunnel_owns(s.lab.node("node2"), server_pod.addr(15008), client.spec.ip)?,
        "node2's ztunnel does not own the tunnel"
    );
    let report = conn.exchange(1 << 20)?;
    assert_eq!(report.peer.ip(), ip(client), "server saw the wrong client");

    let c1 = counters(s.lab.node("node1"), client.spec.ip)?.expect("client has counters");
    assert_eq!(c1.outbound_captured, 1);
    let c2 = counters(s.lab.node("node2"), server_pod.spec.ip)?.expect("server has counters");
    assert_eq!(c2.inbound_captured, 1);
    Ok(())
}

/// Every socket of a proxied connection probes a silent peer: those ztunnel
/// accepts get keepalive from their listener (set there once, not per
/// connection), those it opens set it themselves.
#[test]
fn every_socket_of_a_proxied_connection_has_keepalive() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let bystander = s.lab.pod("bystander");

    let conn = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    let plain = Connection::open(&bystander.ns, server.addr, Duration::from_secs(5))?;
    assert!(ztunnel_owns(
        s.lab.node("node1"),
        server.addr,
        client.spec.ip
    )?);
    let node1 = s.lab.node("node1");
    let node2 = s.lab.node("node2");
    let checks = [
        // node1 accepted the client's connection (outbound capture)...
        ("outbound, accepted", node1, server.addr, client.spec.ip),
        // ...node2 accepted the tunnel (HBONE)...
        (
            "HBONE, accepted",
            node2,
            server_pod.addr(15008),
            client.spec.ip,
        ),
        // ...and the plaintext connection from a pod outside the mesh
        // (inbound capture).
        ("inbound, accepted", node2, server.addr, bystander.spec.ip),
    ];
    for (what, node, local, peer) in checks {
        eventually(
            &format!("keepalive on the {what} socket {local} <- {peer}"),
            Duration::from_secs(2),
            || keepalive_armed(node, local, peer),
        )?;
    }
    conn.exchange(1024)?;
    plain.exchange(1024)?;
    Ok(())
}

#[test]
fn same_node_flows_pass_and_inbound_flows_are_captured() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let neighbor = s.lab.pod("neighbor");
    let server = Server::start(&neighbor.ns, neighbor.addr(9000))?;

    // Enrolled -> enrolled on the same node, allowed: passed in the kernel
    // with no proxy (see tests/direct.rs), the client's address kept.
    let (owned, peer) = held_exchange(&s, "client", server.addr, "node1")?;
    assert!(!owned, "an allowed same-node flow went through ztunnel");
    assert_eq!(peer, ip(s.lab.pod("client")));
    let c =
        counters(s.lab.node("node1"), s.lab.pod("client").spec.ip)?.expect("client has counters");
    assert_eq!((c.outbound_direct, c.outbound_captured), (1, 0));

    // Not enrolled, same node -> enrolled: inbound capture at the sender's veth.
    let (owned, peer) = held_exchange(&s, "bystander", server.addr, "node1")?;
    assert!(owned, "inbound flow from a local pod not owned by ztunnel");
    assert_eq!(peer, ip(s.lab.pod("bystander")));

    // Not enrolled, other node -> enrolled: inbound capture at the uplink.
    let (owned, peer) = held_exchange(&s, "plain", server.addr, "node1")?;
    assert!(owned, "inbound flow from another node not owned by ztunnel");
    assert_eq!(peer, ip(s.lab.pod("plain")));

    let c = counters(s.lab.node("node1"), neighbor.spec.ip)?.expect("neighbor has counters");
    assert_eq!(
        c.inbound_captured, 2,
        "bystander and plain flows counted at the destination"
    );
    Ok(())
}

#[test]
fn unenrolled_pods_and_node_probes_bypass_ztunnel() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;

    // Not enrolled -> not enrolled across nodes.
    let plain = s.lab.pod("plain");
    let server = Server::start(&plain.ns, plain.addr(8080))?;
    let (owned1, peer) = held_exchange(&s, "bystander", server.addr, "node1")?;
    let (owned2, _) = held_exchange(&s, "bystander", server.addr, "node2")?;
    assert!(
        !owned1 && !owned2,
        "a flow between unenrolled pods went through ztunnel"
    );
    assert_eq!(peer, ip(s.lab.pod("bystander")));
    assert_eq!(
        counters(s.lab.node("node1"), s.lab.pod("bystander").spec.ip)?,
        None
    );

    // The node probing its own enrolled pod (a kubelet health check).
    let client = s.lab.pod("client");
    let probed = Server::start(&client.ns, client.addr(8081))?;
    let node1 = s.lab.node("node1");
    let node_ip = node1.underlay_ip;
    let conn = node1_connect(&s, probed.addr)?;
    assert!(
        !ztunnel_owns(node1, probed.addr, node_ip)?,
        "node probe went through ztunnel"
    );
    let report = conn.exchange(1024)?;
    assert_eq!(report.peer.ip(), IpAddr::V4(node_ip));
    let c = counters(node1, client.spec.ip)?.expect("client has counters");
    assert_eq!(c.inbound_captured, 0, "node probe was captured");
    assert_eq!(c.dropped_no_listener, 0);
    Ok(())
}

fn node1_connect(s: &Setup, to: SocketAddr) -> Result<Connection> {
    Connection::open(&s.lab.node("node1").ns, to, Duration::from_secs(5))
}

#[test]
fn editing_the_config_enrolls_and_releases_a_running_pod() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let bystander = s.lab.pod("bystander");
    let plain = s.lab.pod("plain");
    let server = Server::start(&plain.ns, plain.addr(8080))?;
    let node1 = s.lab.node("node1");

    let (owned, _) = held_exchange(&s, "bystander", server.addr, "node1")?;
    assert!(!owned, "bystander captured before enrollment");
    // A connection opened before enrollment must survive it.
    let before = Connection::open(&bystander.ns, server.addr, Duration::from_secs(5))?;

    s.write(&lab::config_yaml(&[("bystander", true)]))?;
    zt1.wait_for_log("configuration reloaded", Duration::from_secs(10))?;
    eventually(
        "bystander enrolled in the kernel",
        Duration::from_secs(10),
        || Ok(counters(node1, bystander.spec.ip)?.is_some()),
    )?;
    let (owned, peer) = held_exchange(&s, "bystander", server.addr, "node1")?;
    assert!(owned, "bystander not captured after enrollment");
    assert_eq!(peer, ip(bystander));
    let report = before.exchange(256 * 1024)?;
    assert_eq!(
        report.peer.ip(),
        ip(bystander),
        "pre-enrollment connection broke"
    );

    s.write(&lab::config_yaml(&[("bystander", false)]))?;
    eventually(
        "bystander released in the kernel",
        Duration::from_secs(10),
        || Ok(counters(node1, bystander.spec.ip)?.is_none()),
    )?;
    let (owned, peer) = held_exchange(&s, "bystander", server.addr, "node1")?;
    assert!(!owned, "bystander still captured after removal");
    assert_eq!(peer, ip(bystander));
    Ok(())
}

#[test]
fn killed_ztunnel_fails_closed_and_restart_readopts_capture() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    request(&client.ns, server.addr, 1024)?;
    let accepted_before = server.accepted().len();

    zt1.kill();
    // Fail closed: the SYN is dropped in the kernel, nothing reaches the server.
    let attempt = Connection::open(&client.ns, server.addr, Duration::from_secs(2));
    assert!(attempt.is_err(), "connection succeeded with ztunnel dead");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server.accepted().len(),
        accepted_before,
        "a connection reached the server in clear"
    );
    let c = counters(s.lab.node("node1"), client.spec.ip)?.expect("counters survive the process");
    assert!(c.dropped_no_listener >= 1, "drop not counted: {c:?}");

    let zt1 = s.ztunnel("node1", &[])?;
    assert!(
        zt1.log_text().contains("Readopted"),
        "restart did not re-adopt the pinned links"
    );
    let report = request(&client.ns, server.addr, 1024)?;
    assert_eq!(report.peer.ip(), ip(client));
    let c2 = counters(s.lab.node("node1"), client.spec.ip)?.expect("counters");
    assert_eq!(
        c2.outbound_captured,
        c.outbound_captured + 1,
        "counters were reset by the restart"
    );
    Ok(())
}

#[test]
fn stopped_ztunnel_leaves_enrolled_pods_unable_to_connect() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let client = s.lab.pod("client");
    let plain = s.lab.pod("plain");
    let server = Server::start(&plain.ns, plain.addr(8080))?;
    request(&client.ns, server.addr, 1024)?;
    let accepted_before = server.accepted().len();

    let status = zt1.stop()?;
    assert!(status.success(), "clean shutdown exited with {status}");
    // The routing rule stays for the next start; with no listener
    // published, nothing is delivered through it.
    let rules = s.lab.node("node1").ns.ip(&["rule", "show"])?;
    assert!(
        rules.contains("81:"),
        "capture rule removed by a clean shutdown:\n{rules}"
    );

    let attempt = Connection::open(&client.ns, server.addr, Duration::from_secs(2));
    assert!(
        attempt.is_err(),
        "enrolled pod connected with ztunnel stopped"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server.accepted().len(),
        accepted_before,
        "a connection bypassed the mesh"
    );
    // Unenrolled pods are untouched.
    request(&s.lab.pod("bystander").ns, server.addr, 1024)?;
    Ok(())
}

#[test]
fn pod_connecting_to_ztunnel_ports_is_refused() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let client = s.lab.pod("client");
    let own = SocketAddr::from((s.lab.node("node1").underlay_ip, 15001));
    let result =
        Connection::open(&client.ns, own, Duration::from_secs(2)).and_then(|c| c.exchange(16));
    assert!(
        result.is_err(),
        "connection to ztunnel's own port was served"
    );
    zt1.wait_for_log(
        "refused: a pod connected to ztunnel's own port",
        Duration::from_secs(5),
    )?;
    Ok(())
}

#[test]
fn one_gib_arrives_intact_through_the_relay() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    // `exchange` compares the SHA-256 of what was sent with the server's.
    let report =
        Connection::open(&client.ns, server.addr, Duration::from_secs(5))?.exchange(1 << 30)?;
    assert_eq!(report.bytes, 1 << 30);
    assert_eq!(report.peer.ip(), ip(client));
    Ok(())
}

/// A server that speaks first and closes first, so ztunnel's side of the
/// client's connection is the one left in TIME_WAIT.
fn start_greeter(
    ns: &ztunnel_tests::netns::Netns,
    addr: SocketAddr,
) -> Result<std::thread::JoinHandle<()>> {
    let listener = ns.run(move || std::net::TcpListener::bind(addr))??;
    Ok(std::thread::spawn(move || {
        for mut s in listener.incoming().take(2).flatten() {
            use std::io::Write;
            let _ = s.write_all(b"hello\n");
        }
    }))
}

#[test]
fn a_port_reused_right_away_is_not_stalled_by_time_wait() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let plain = s.lab.pod("plain");
    let greeter = start_greeter(&plain.ns, plain.addr(8080))?;
    let client = s.lab.pod("client");
    let dst = plain.addr(8080);
    // Twice from the same source port: the first connection leaves
    // ztunnel's accepted socket (same 4-tuple) in TIME_WAIT on the node.
    for round in 0..2 {
        let started = Instant::now();
        let greeting = client.ns.run(move || -> std::io::Result<Vec<u8>> {
            use std::io::Read;
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from(([198, 18, 1, 10], 42424)).into())?;
            socket.connect_timeout(&dst.into(), Duration::from_secs(3))?;
            let mut stream: std::net::TcpStream = socket.into();
            let mut out = Vec::new();
            stream.read_to_end(&mut out)?;
            Ok(out)
        })??;
        assert_eq!(greeting, b"hello\n", "round {round}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "round {round} stalled for {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    greeter
        .join()
        .map_err(|_| anyhow::anyhow!("greeter panicked"))?;
    Ok(())
}

#[test]
fn connections_complete_when_every_syn_is_answered_with_a_cookie() -> Result<()> {
    // What a SYN flood on ztunnel's listeners brings about: no request
    // sockets, only cookies. The client's ACK finds no socket of its own and
    // must still reach the listener, not be forwarded to the pod.
    let s = Setup::new(&lab::config_yaml(&[]))?;
    for node in ["node1", "node2"] {
        s.lab.node(node).ns.sysctl("net.ipv4.tcp_syncookies", "2")?;
    }
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    for _ in 0..3 {
        let report = request(&client.ns, server.addr, 64 * 1024)?;
        assert_eq!(report.peer.ip(), ip(client));
    }
    // Plaintext into an enrolled pod, from another node.
    let inbound = Server::start(&client.ns, client.addr(9090))?;
    let plain = s.lab.pod("plain");
    let report = request(&plain.ns, inbound.addr, 64 * 1024)?;
    assert_eq!(report.peer.ip(), ip(plain));
    Ok(())
}
