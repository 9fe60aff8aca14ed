//! HBONE in the lab: mutual TLS between nodes, identities, pooling,
//! rotation, and what hostile peers on 15008 get.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ztunnel::identity::{ca, Identity, LocalCa};
use ztunnel_tests::{
    hbone_server::ScriptedServer,
    lab,
    peer::{self, Outcome},
    setup::Setup,
    sniff::Sniffer,
    traffic::{request, Connection, Server},
    ztunnel::{sockets, Ztunnel},
};

fn ip_of(pod: &lab::Pod) -> IpAddr {
    IpAddr::V4(pod.spec.ip)
}

/// ztunnel's established TLS connections from `node` to some 15008.
fn hbone_connections(node: &lab::Node) -> Result<usize> {
    Ok(sockets(node)?
        .iter()
        .filter(|s| {
            s.state == "ESTAB" && s.peer.ends_with(":15008") && s.process.contains("\"ztunnel\"")
        })
        .count())
}

#[test]
fn cross_node_traffic_is_mutual_tls_on_the_underlay() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let mut zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;

    let marker = b"ZTUNNEL-PLAINTEXT-MARKER-7f3a9c";
    let payload: Vec<u8> = marker.iter().copied().cycle().take(256 * 1024).collect();
    let sniffer = Sniffer::start(s.lab.node("node1"), "eth0")?;
    let report = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?
        .exchange_bytes(&payload)?;
    let pcap = sniffer.stop()?;

    assert_eq!(
        report.peer.ip(),
        ip_of(client),
        "server saw the wrong client"
    );
    assert!(
        !pcap.contains(marker),
        "the payload crossed the underlay in clear"
    );
    let tunnel = pcap.count("tcp port 15008")?;
    assert!(
        tunnel > 10,
        "no HBONE traffic on the underlay:\n{}",
        pcap.summary("tcp")
    );
    assert_eq!(
        pcap.count("tcp port 8080")?,
        0,
        "the application port was seen on the underlay"
    );
    // TLS 1.3 was negotiated. Every ClientHello carries the legacy version
    // bytes of TLS 1.0-1.2, so those prove nothing; the ServerHello's
    // supported_versions extension (type 0x002b, length 2) names the version
    // the server chose, and a TLS 1.2 ServerHello has no such extension.
    assert!(
        pcap.contains(&[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        "no ServerHello choosing TLS 1.3 on the underlay"
    );
    assert!(
        !pcap.contains(&[0x00, 0x2b, 0x00, 0x02, 0x03, 0x03]),
        "a ServerHello chose TLS 1.2"
    );
    zt2.wait_for_log(
        "peer_identity=spiffe://cluster.local/ns/default/sa/client",
        Duration::from_secs(5),
    )?;
    Ok(())
}

#[test]
fn service_vip_reaches_its_endpoints_with_port_mapping() -> Result<()> {
    let yaml = lab::config_yaml_with(
        &[],
        &[("server", "\"default/echo.default.svc.cluster.local\": {80: 8080}"), ("neighbor", "\"default/echo.default.svc.cluster.local\": {80: 9090}")],
        "services:\n- name: echo\n  namespace: default\n  hostname: echo.default.svc.cluster.local\n  vips: [\"/198.18.100.1\"]\n  ports: {80: 8080}\n",
    );
    let s = Setup::new(&yaml)?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let neighbor = s.lab.pod("neighbor");
    // The service maps 80 to 8080; neighbor's own endpoint mapping says 9090.
    let remote = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let local = Server::start(&neighbor.ns, neighbor.addr(9090))?;
    let client = s.lab.pod("client");
    let vip: SocketAddr = "198.18.100.1:80".parse()?;
    for _ in 0..6 {
        let report = request(&client.ns, vip, 4096)?;
        assert_eq!(report.peer.ip(), ip_of(client));
    }
    assert!(
        !remote.accepted().is_empty(),
        "the remote endpoint got nothing"
    );
    assert!(
        !local.accepted().is_empty(),
        "the local endpoint got nothing"
    );
    assert_eq!(remote.accepted().len() + local.accepted().len(), 6);
    Ok(())
}

#[test]
fn concurrent_streams_share_pooled_connections() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    // One worker, one pool: each worker has its own, and which worker a
    // connection lands on is the kernel's hash of its addresses.
    let zt1 = s.ztunnel("node1", &["--worker-threads", "1"])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;

    // 150 streams at once: 100 fit on one connection, so exactly two.
    let mut open = Vec::new();
    for _ in 0..150 {
        open.push(Connection::open(
            &client.ns,
            server.addr,
            Duration::from_secs(5),
        )?);
    }
    let node1 = s.lab.node("node1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.accepted().len() < 150 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        server.accepted().len(),
        150,
        "not every stream reached the server"
    );
    assert_eq!(
        hbone_connections(node1)?,
        2,
        "150 streams should ride on 2 pooled connections"
    );
    for conn in open {
        conn.exchange(1024)?;
    }
    // Later streams reuse the pool instead of connecting again.
    for _ in 0..20 {
        request(&client.ns, server.addr, 1024)?;
    }
    assert_eq!(
        zt1.log_text()
            .matches("HBONE connection established")
            .count(),
        2
    );
    Ok(())
}

/// What a client sends at once goes with the CONNECT instead of a round trip
/// after the answer: the far end has it before it answers. A stream the far
/// end refuses is retried on a new connection carrying the same bytes, so
/// they arrive once and whole. A client that waits before writing (as with a
/// server-first protocol) is not held up. Bytes are counted as sent once.
#[test]
fn a_clients_first_bytes_travel_with_the_connect_and_survive_a_retry() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    // No ztunnel on node2: a scripted HBONE server in the server pod's place.
    let server = s.lab.pod("server");
    let cert = LocalCa::load(&s.lab.ca_dir)?.issue(
        &Identity::new("cluster.local", "default", "server"),
        Duration::from_secs(3600),
    )?;
    let hold = Duration::from_millis(500);
    let far_end = ScriptedServer::start(&server.ns, server.addr(15008), &cert, hold, true)?;
    let client = s.lab.pod("client");
    let dst = server.addr(7000);
    let exchange = |msg: &str, wait: Duration| -> Result<()> {
        let sent = msg.to_string();
        let echoed = client.ns.run(move || -> Result<Vec<u8>> {
            let mut tcp = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
            std::thread::sleep(wait);
            tcp.write_all(sent.as_bytes())?;
            tcp.shutdown(std::net::Shutdown::Write)?;
            let mut back = Vec::new();
            tcp.read_to_end(&mut back)?;
            Ok(back)
        })??;
        assert_eq!(
            String::from_utf8_lossy(&echoed),
            msg,
            "echo through the tunnel"
        );
        Ok(())
    };
    let messages: Vec<String> = (0..5).map(|i| format!("first flight {i}")).collect();
    for msg in &messages {
        exchange(msg, Duration::ZERO)?;
    }
    // Written only after the far end has answered.
    exchange("late flight 5", hold * 2)?; // 13 bytes

    let seen = far_end.seen();
    assert!(
        seen.iter().all(|c| c.authority.ends_with(":7000")),
        "{seen:?}"
    );
    // The refused stream and its retry, on a fresh connection, with the
    // same bytes; nothing else was retried.
    assert_eq!(seen.len(), messages.len() + 2, "{seen:?}");
    assert!(seen[0].refused, "{seen:?}");
    assert!(seen[1..].iter().all(|c| !c.refused), "{seen:?}");
    assert!(seen[1].connection > seen[0].connection, "{seen:?}");
    let before: Vec<String> = seen
        .iter()
        .map(|c| String::from_utf8_lossy(&c.before_answer).into_owned())
        .collect();
    let mut expected = vec![messages[0].clone()];
    expected.extend(messages.iter().cloned());
    expected.push(String::new());
    assert_eq!(before, expected, "what arrived before each answer");
    // Each connection's bytes counted once, the retried one's too.
    let len = messages[0].len();
    zt1.wait_for_log_count(
        &format!("bytes_sent={len} bytes_received={len} "),
        messages.len(),
        Duration::from_secs(5),
    )?;
    zt1.wait_for_log("bytes_sent=13 bytes_received=13 ", Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn certificates_rotate_during_a_long_transfer() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    // Four-second certificates: replaced every two seconds.
    let mut zt1 = s.ztunnel("node1", &["--workload-cert-ttl", "4s"])?;
    let _zt2 = s.ztunnel("node2", &["--workload-cert-ttl", "4s"])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;

    let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let conn = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    // About seven seconds: the client's certificate is replaced at least twice
    // and has expired before the transfer ends.
    let report = conn.exchange_slowly(&data, 70, Duration::from_millis(100))?;
    assert_eq!(report.peer.ip(), ip_of(client));
    zt1.wait_for_log_count("certificate rotated", 2, Duration::from_secs(5))?;
    // New connections keep working on the fresh certificates.
    request(&client.ns, server.addr, 1024)?;
    Ok(())
}

#[test]
fn same_node_traffic_skips_the_network_with_identity_checks() -> Result<()> {
    // A dry-run policy keeps the destination in userspace (its log lines
    // must be written), so this is the proxied same-node path; the kernel
    // path without a proxy is tests/direct.rs's.
    let s = Setup::new(&lab::config_yaml_with(
        &[],
        &[],
        "policies:\n- {name: audit, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[[{destinationPorts: [9999]}]]]}\n",
    ))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let client = s.lab.pod("client");
    let neighbor = s.lab.pod("neighbor");
    let server = Server::start(&neighbor.ns, neighbor.addr(8080))?;
    let report = request(&client.ns, server.addr, 1 << 20)?;
    assert_eq!(report.peer.ip(), ip_of(client));
    zt1.wait_for_log(
        "same-node mesh connection src=198.18.1.10",
        Duration::from_secs(5),
    )?;
    assert!(zt1
        .log_text()
        .contains("src_identity=spiffe://cluster.local/ns/default/sa/client"));
    assert_eq!(
        hbone_connections(s.lab.node("node1"))?,
        0,
        "same-node traffic used a tunnel"
    );
    Ok(())
}

/// Setup for the hostile-peer cases: node2's ztunnel serves the enrolled
/// server pod; the attacker is the unenrolled bystander pod on node1, whose
/// traffic to server:15008 is captured on node2's uplink.
struct Hostile {
    s: Setup,
    zt2: Ztunnel,
    _zt1: Ztunnel,
    _server: Server,
}

impl Hostile {
    fn new() -> Result<Self> {
        let s = Setup::new(&lab::config_yaml(&[]))?;
        let _zt1 = s.ztunnel("node1", &[])?;
        let zt2 = s.ztunnel("node2", &["--handshake-timeout", "2s"])?;
        let server_pod = s.lab.pod("server");
        let _server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
        Ok(Hostile {
            s,
            zt2,
            _zt1,
            _server,
        })
    }

    fn hbone_addr(&self) -> SocketAddr {
        self.s.lab.pod("server").addr(15008)
    }

    fn attacker(&self) -> &lab::Pod {
        self.s.lab.pod("bystander")
    }

    fn lab_ca(&self) -> Result<LocalCa> {
        Ok(LocalCa::load(&self.s.lab.ca_dir)?)
    }

    /// The refusal was logged naming the attacker, and real traffic still flows.
    fn assert_logged_and_healthy(&mut self, what: &str) -> Result<()> {
        let needle = format!("peer={}", self.attacker().spec.ip);
        self.zt2.wait_for_log(what, Duration::from_secs(10))?;
        let log = self.zt2.log_text();
        assert!(
            log.lines().any(|l| l.contains(what) && l.contains(&needle)),
            "no log line naming the peer for {what:?}:\n{log}"
        );
        let client = self.s.lab.pod("client");
        let report = request(&client.ns, self.s.lab.pod("server").addr(8080), 64 * 1024)?;
        assert_eq!(report.peer.ip(), ip_of(client));
        Ok(())
    }
}

#[test]
fn garbage_on_15008_is_refused() -> Result<()> {
    let mut h = Hostile::new()?;
    let addr = h.hbone_addr();
    let mut tcp = h
        .attacker()
        .ns
        .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut buf = [0u8; 256];
    // The server closes; at most it sends a TLS alert, never an HTTP answer.
    let n = tcp.read(&mut buf).unwrap_or(0);
    assert!(
        !buf[..n].starts_with(b"HTTP"),
        "plaintext got an HTTP answer"
    );
    h.assert_logged_and_healthy("TLS handshake failed")
}

#[test]
fn client_certificate_from_another_root_is_refused() -> Result<()> {
    let mut h = Hostile::new()?;
    let other = std::env::temp_dir().join(format!("{}-other-ca", h.s.lab.prefix));
    ca::generate_dev_root(&other)?;
    let forged = LocalCa::load(&other)?.issue(
        &Identity::new("cluster.local", "default", "client"),
        Duration::from_secs(3600),
    )?;
    let _ = std::fs::remove_dir_all(&other);
    let outcome = peer::connect(
        &h.attacker().ns,
        h.hbone_addr(),
        Some(&forged),
        "198.18.2.10:8080",
    )?;
    assert!(
        matches!(outcome, Outcome::Refused(_)),
        "a foreign root was accepted: {outcome:?}"
    );
    h.assert_logged_and_healthy("TLS handshake failed")
}

#[test]
fn client_certificate_from_another_trust_domain_is_refused() -> Result<()> {
    let mut h = Hostile::new()?;
    let cert = h.lab_ca()?.issue(
        &Identity::new("evil.example", "default", "client"),
        Duration::from_secs(3600),
    )?;
    let outcome = peer::connect(
        &h.attacker().ns,
        h.hbone_addr(),
        Some(&cert),
        "198.18.2.10:8080",
    )?;
    assert!(
        matches!(outcome, Outcome::Refused(_)),
        "another trust domain was accepted: {outcome:?}"
    );
    h.assert_logged_and_healthy("outside trust domain")
}

#[test]
fn missing_client_certificate_is_refused() -> Result<()> {
    let mut h = Hostile::new()?;
    let outcome = peer::connect(&h.attacker().ns, h.hbone_addr(), None, "198.18.2.10:8080")?;
    assert!(
        matches!(outcome, Outcome::Refused(_)),
        "no client certificate was accepted: {outcome:?}"
    );
    h.assert_logged_and_healthy("TLS handshake failed")
}

#[test]
fn connect_to_another_workload_gets_400() -> Result<()> {
    let mut h = Hostile::new()?;
    let cert = h.lab_ca()?.issue(
        &Identity::new("cluster.local", "default", "bystander"),
        Duration::from_secs(3600),
    )?;
    // A valid peer asking node2's tunnel for the client pod on node1.
    let outcome = peer::connect(
        &h.attacker().ns,
        h.hbone_addr(),
        Some(&cert),
        "198.18.1.10:8080",
    )?;
    assert_eq!(outcome, Outcome::Status(400));
    // And a well-formed request for the right workload is served.
    let outcome = peer::connect(
        &h.attacker().ns,
        h.hbone_addr(),
        Some(&cert),
        "198.18.2.10:8080",
    )?;
    assert_eq!(outcome, Outcome::Status(200));
    h.assert_logged_and_healthy("refused CONNECT")
}

#[test]
fn stalled_handshake_is_cut_off() -> Result<()> {
    let mut h = Hostile::new()?;
    let addr = h.hbone_addr();
    let mut tcp = h
        .attacker()
        .ns
        .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    // The first bytes of a TLS record, then nothing.
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])?;
    tcp.set_read_timeout(Some(Duration::from_secs(15)))?;
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let _ = tcp.read(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "a stalled peer was held for {waited:?}"
    );
    h.assert_logged_and_healthy("handshake timed out")
}

#[test]
fn half_open_handshake_flood_keeps_memory_bounded() -> Result<()> {
    let mut h = Hostile::new()?;
    ztunnel_tests::load::raise_fd_limit(65536);
    let before = h.zt2.rss_bytes()?;
    let addr = h.hbone_addr();
    let flood: Vec<std::net::TcpStream> = h
        .attacker()
        .ns
        .run(move || {
            (0..1500)
                .filter_map(|_| {
                    let mut s =
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
                    // Half a ClientHello: the server must hold state for it.
                    let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
                    Some(s)
                })
                .collect()
        })
        .context("flooding")?;
    assert!(
        flood.len() > 1000,
        "could only open {} connections",
        flood.len()
    );
    std::thread::sleep(Duration::from_millis(500));
    let during = h.zt2.rss_bytes()?;
    let growth = during.saturating_sub(before);
    assert!(
        growth < 64 << 20,
        "{} half-open handshakes cost {} MiB",
        flood.len(),
        growth >> 20
    );
    // Real traffic goes on during the flood.
    let client = h.s.lab.pod("client");
    let report = request(&client.ns, h.s.lab.pod("server").addr(8080), 64 * 1024)?;
    assert_eq!(report.peer.ip(), ip_of(client));
    eprintln!(
        "{} half-open handshakes grew ztunnel's RSS by {} KiB",
        flood.len(),
        growth >> 10
    );
    drop(flood);
    // Past the limit, the oldest pending handshakes were pushed out.
    h.assert_logged_and_healthy("evicted, too many handshakes in progress")
}
