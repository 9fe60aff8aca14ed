//! Bounded under abuse: each bound on what a peer can hold on 15008, or a
//! connection can hold idle, is hit by a flood while real clients go on.

use std::{
    io::Write,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use ztunnel::identity::{Identity, LocalCa};
use ztunnel_tests::{
    http::{self, sample},
    lab,
    netns::Netns,
    peer::{self, Held, Outcome},
    setup::Setup,
    traffic::{request, Connection, Server},
    wait::eventually,
    ztunnel::{sockets_in, ztunnel_owns, Ztunnel},
};

struct Lab {
    s: Setup,
    zt2: Ztunnel,
    _zt1: Ztunnel,
    _server: Server,
}

impl Lab {
    /// node2's ztunnel, serving the server pod, gets `zt2_flags`.
    fn new(zt2_flags: &[&str]) -> Result<Self> {
        let s = Setup::new(&lab::config_yaml(&[]))?;
        let _zt1 = s.ztunnel("node1", &[])?;
        let zt2 = s.ztunnel("node2", zt2_flags)?;
        let server_pod = s.lab.pod("server");
        let _server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
        Ok(Lab {
            s,
            zt2,
            _zt1,
            _server,
        })
    }

    fn hbone_addr(&self) -> SocketAddr {
        self.s.lab.pod("server").addr(15008)
    }

    fn server_addr(&self) -> SocketAddr {
        self.s.lab.pod("server").addr(8080)
    }

    fn cert(&self, service_account: &str) -> Result<ztunnel::identity::WorkloadCert> {
        Ok(LocalCa::load(&self.s.lab.ca_dir)?.issue(
            &Identity::new("cluster.local", "default", service_account),
            Duration::from_secs(3600),
        )?)
    }

    /// `ztunnel_connections_refused_total` on node2 for `listener`, `reason`.
    fn refused(&self, listener: &str, reason: &str) -> Result<f64> {
        let node = self.s.lab.node("node2");
        let addr = SocketAddr::from((node.underlay_ip, 15020));
        let m = http::get(&node.ns, addr, "/metrics")?.body;
        Ok(sample(
            &m,
            "ztunnel_connections_refused_total",
            &[("listener", listener), ("reason", reason)],
        )
        .unwrap_or(0.0))
    }

    /// A real client's connection through both ztunnels.
    fn real_request(&self) -> Result<()> {
        let client = self.s.lab.pod("client");
        let report = request(&client.ns, self.server_addr(), 16 * 1024)?;
        anyhow::ensure!(report.peer.ip() == std::net::IpAddr::V4(client.spec.ip));
        Ok(())
    }
}

/// Opens stalled handshakes (half a TLS record, then nothing) from `ns` as
/// fast as it can until `stop`, keeping the newest 400 open; returns how
/// many it opened.
fn flood(
    ns: &Netns,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<usize>>> {
    ns.spawn(move || {
        let mut held = std::collections::VecDeque::new();
        let mut opened = 0usize;
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut s) =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            {
                let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]);
                held.push_back(s);
                opened += 1;
            }
            if held.len() > 400 {
                held.pop_front();
            }
        }
        opened
    })
}

#[test]
fn a_handshake_flood_from_two_sources_does_not_starve_real_clients() -> Result<()> {
    ztunnel_tests::load::raise_fd_limit(65536);
    // A small table, so the flood fills it many times over; and pooled
    // connections closed when idle for 300 ms, so each real request below
    // needs a handshake of its own in the middle of the flood.
    let mut l = Lab::new(&[
        "--max-handshakes",
        "32",
        "--max-handshakes-per-source",
        "24",
        "--handshake-timeout",
        "5s",
        "--hbone-idle-timeout",
        "300ms",
    ])?;
    let stop = Arc::new(AtomicBool::new(false));
    let floods = [
        flood(&l.s.lab.pod("bystander").ns, l.hbone_addr(), stop.clone())?,
        flood(&l.s.lab.node("node1").ns, l.hbone_addr(), stop.clone())?,
    ];
    std::thread::sleep(Duration::from_millis(500));
    let mut slowest = Duration::ZERO;
    let result = (|| {
        for _ in 0..15 {
            let started = Instant::now();
            l.real_request()?;
            slowest = slowest.max(started.elapsed());
            // Let the server close the idle pooled connection.
            std::thread::sleep(Duration::from_millis(700));
        }
        anyhow::Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let opened: usize = floods
        .into_iter()
        .map(|f| f.join().ok().and_then(Result::ok).unwrap_or(0))
        .sum();
    result?;
    eprintln!("{opened} stalled handshakes during 15 real requests; slowest request {slowest:?}");
    let evicted = l.refused("hbone", "handshakes")?;
    assert!(
        evicted >= 200.0,
        "the flood ({opened} handshakes) evicted only {evicted}"
    );
    assert!(
        slowest < Duration::from_secs(3),
        "a real request took {slowest:?}"
    );
    // Every real handshake finished: none of the client's was evicted.
    let log = l.zt2.log_text();
    assert!(
        !log.lines()
            .any(|line| line.contains("evicted") && line.contains("peer=198.18.1.10")),
        "a real client's handshake was evicted"
    );
    // Each real request did need a handshake: the server closed the
    // client's idle pooled connection between them.
    let idle_closed = l.refused("hbone", "idle")?;
    assert!(idle_closed >= 10.0, "only {idle_closed} idle closes");
    l.zt2.wait_for_log(
        "evicted, too many handshakes in progress",
        Duration::from_secs(1),
    )?;
    Ok(())
}

#[test]
fn a_peer_past_its_connection_cap_is_refused_and_others_are_not() -> Result<()> {
    let mut l = Lab::new(&["--max-connections-per-peer", "4"])?;
    let attacker = &l.s.lab.pod("bystander").ns;
    let hoarder = Held::open(attacker, l.hbone_addr(), &l.cert("hoarder")?, 6)?;
    // The two past the cap get GOAWAY and close; the four within it stay.
    assert_eq!(hoarder.wait_closed(2, Duration::from_secs(5)), 2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        hoarder.closed(),
        2,
        "connections within the cap were closed"
    );
    assert_eq!(l.refused("hbone", "peer_connections")?, 2.0);
    // Another identity, and real clients, are not affected.
    let other = peer::connect(
        attacker,
        l.hbone_addr(),
        Some(&l.cert("bystander")?),
        "198.18.2.10:8080",
    )?;
    assert_eq!(other, Outcome::Status(200));
    l.real_request()?;
    l.zt2.wait_for_log(
        "the peer holds its cap of connections",
        Duration::from_secs(1),
    )?;
    drop(hoarder);
    Ok(())
}

#[test]
fn an_hbone_connection_without_streams_is_closed_when_idle_and_a_busy_one_is_not() -> Result<()> {
    let l = Lab::new(&["--hbone-idle-timeout", "1s"])?;
    // A long, slow transfer keeps its tunnel busy past the idle timeout.
    let client = l.s.lab.pod("client");
    let conn = Connection::open(&client.ns, l.server_addr(), Duration::from_secs(5))?;
    let slow = std::thread::spawn(move || {
        conn.exchange_slowly(&[5u8; 32 * 1024], 12, Duration::from_millis(250))
    });
    let attacker = &l.s.lab.pod("bystander").ns;
    let idle = Held::open(attacker, l.hbone_addr(), &l.cert("idler")?, 2)?;
    assert_eq!(idle.wait_closed(2, Duration::from_secs(5)), 2);
    slow.join()
        .map_err(|_| anyhow::anyhow!("transfer thread panicked"))??;
    assert!(l.refused("hbone", "idle")? >= 2.0);
    Ok(())
}

#[test]
fn a_relayed_connection_idle_past_the_timeout_is_closed_and_an_active_one_is_not() -> Result<()> {
    let l = Lab::new(&["--idle-timeout", "1s"])?;
    let client = l.s.lab.pod("client");
    let quiet = Connection::open(&client.ns, l.server_addr(), Duration::from_secs(5))?;
    let active = Connection::open(&client.ns, l.server_addr(), Duration::from_secs(5))?;
    let started = Instant::now();
    let busy = std::thread::spawn(move || {
        active.exchange_slowly(&[9u8; 16 * 1024], 12, Duration::from_millis(250))
    });
    std::thread::sleep(Duration::from_millis(2500));
    // The quiet one was closed by node2's ztunnel: nothing gets through.
    assert!(
        quiet.exchange(1024).is_err(),
        "a connection idle for 2.5 s outlived a 1 s idle timeout"
    );
    busy.join()
        .map_err(|_| anyhow::anyhow!("transfer thread panicked"))??;
    assert!(started.elapsed() > Duration::from_secs(2));
    assert!(l.refused("inbound", "idle")? >= 1.0);
    Ok(())
}

/// Whether every TCP connection in `ns` has empty queues: nothing waits to
/// be read or to be acknowledged.
fn queues_empty(ns: &Netns) -> Result<bool> {
    Ok(sockets_in(ns)?
        .iter()
        .filter(|s| s.state != "LISTEN")
        .all(|s| s.recv_q == 0 && s.send_q == 0))
}

#[test]
fn a_connection_that_moved_bulk_holds_no_copy_buffer_once_quiet() -> Result<()> {
    // Both copies a proxied connection can take: TCP to TCP (a same-node
    // connection, kept in userspace by a dry-run policy) and TCP to HBONE
    // (cross-node). Each connection moves 1 MiB, which grows its reads to
    // their largest (256 KiB), then stays open with nothing to send. A copy
    // that kept its buffer would hold 256 KiB per connection from then on.
    const WARM_UP: usize = 20;
    const MEASURED: usize = 100;
    let s = Setup::new(&lab::config_yaml_with(
        &[],
        &[],
        "policies:\n- {name: audit, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[[{destinationPorts: [9999]}]]]}\n",
    ))?;
    let zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let neighbor_pod = s.lab.pod("neighbor");
    let server_pod = s.lab.pod("server");
    let neighbor = Server::start(&neighbor_pod.ns, neighbor_pod.addr(9000))?;
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let node1 = s.lab.node("node1");
    let blob = vec![7u8; 1 << 20];
    // One transfer at a time, each relayed to its last byte before the
    // next: what is measured is what quiet connections keep, not the peak
    // of many transfers at once.
    let open_and_move = |to: SocketAddr, held: &mut Vec<Connection>| -> Result<()> {
        let mut c = Connection::open(&client.ns, to, Duration::from_secs(5))?;
        c.write_all(&blob)?;
        eventually("every byte relayed", Duration::from_secs(10), || {
            Ok(queues_empty(&client.ns)? && queues_empty(&node1.ns)?)
        })?;
        held.push(c);
        Ok(())
    };
    for (path, to) in [("TCP to TCP", neighbor.addr), ("TCP to HBONE", server.addr)] {
        let mut held = Vec::new();
        // The first transfers grow what every later one shares (the
        // HBONE connection's TLS and HTTP/2 buffers, the allocator's
        // arenas); measured after them, growth is per connection.
        for _ in 0..WARM_UP {
            open_and_move(to, &mut held)?;
        }
        let before = zt1.rss_bytes()?;
        for _ in 0..MEASURED {
            open_and_move(to, &mut held)?;
        }
        // The copy drops its buffer on the read that finds the socket
        // drained, right after its last write.
        std::thread::sleep(Duration::from_millis(200));
        let per_connection = zt1.rss_bytes()?.saturating_sub(before) / MEASURED as u64;
        eprintln!("{path}: node1 grew {per_connection} bytes per quiet connection");
        assert!(
            per_connection < 64 * 1024,
            "{path}: node1 grew {per_connection} bytes per quiet connection that had moved 1 MiB"
        );
        if path == "TCP to TCP" {
            assert!(
                ztunnel_owns(node1, neighbor.addr, client.spec.ip)?,
                "the same-node connections did not go through ztunnel"
            );
        }
        // Still working, and nothing lost or reordered.
        for c in held {
            let report = c.exchange_rest(4096, &blob)?;
            assert_eq!(report.bytes, (1 << 20) + 4096);
        }
    }
    Ok(())
}
