//! Capture across a ztunnel's life: start, clean stop, crash, handover. At
//! no instant may a SYN from or to an enrolled pod leave the node in clear
//! or land on a socket that is not ztunnel's, and only a root peer gets the
//! listeners handed over.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result};
use ztunnel_tests::{
    lab::{self, Node},
    setup::Setup,
    sniff::Sniffer,
    traffic::{request, Connection, Server, Stream},
    ztunnel::{binary, counters},
};

/// ztunnel's three capture listeners, bound the way a starting ztunnel
/// binds them (transparent, every address) and nothing else done yet.
fn bind_capture_listeners(node: &Node) -> Result<Vec<std::net::TcpListener>> {
    node.ns.run(|| -> Result<Vec<std::net::TcpListener>> {
        [15001u16, 15006, 15008]
            .into_iter()
            .map(|port| {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                socket.set_ip_transparent(true)?;
                socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
                socket.listen(128)?;
                Ok(socket.into())
            })
            .collect()
    })?
}

/// A node service listening on every address of the node (what a
/// hostNetwork pod's server looks like).
fn host_service(node: &Node, port: u16) -> Result<Server> {
    Server::start(&node.ns, SocketAddr::from(([0, 0, 0, 0], port)))
}

/// Stop ztunnel (cleanly or by SIGKILL), then do the first thing a new one
/// does, bind its listeners, and try to connect while it is "starting".
fn half_started(crash: bool) -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let node1 = s.lab.node("node1");
    let service = host_service(node1, 8080)?;
    request(&client.ns, server.addr, 1024)?;
    let accepted_before = server.accepted().len();

    if crash {
        zt1.kill();
    } else {
        let status = zt1.stop()?;
        assert!(status.success(), "clean stop exited with {status}");
    }
    let _listeners = bind_capture_listeners(node1)?;
    let underlay = Sniffer::start(node1, "eth0")?;
    for _ in 0..4 {
        let attempt = Connection::open(&client.ns, server.addr, Duration::from_millis(500));
        assert!(
            attempt.is_err(),
            "the enrolled client connected while ztunnel was only half started"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let pcap = underlay.stop()?;
    assert_eq!(
        pcap.count("tcp port 8080")?,
        0,
        "SYNs left the node in clear:\n{}",
        pcap.summary("tcp port 8080")
    );
    assert_eq!(
        server.accepted().len(),
        accepted_before,
        "a plaintext connection reached the server"
    );
    assert!(
        service.accepted().is_empty(),
        "the enrolled client's connection landed on a node service: {:?}",
        service.accepted()
    );
    let c = counters(node1, client.spec.ip)?.context("client counters")?;
    assert!(c.dropped_no_listener >= 1, "drops not counted: {c:?}");
    Ok(())
}

#[test]
fn a_half_started_ztunnel_lets_nothing_through_after_a_clean_stop() -> Result<()> {
    half_started(false)
}

#[test]
fn a_half_started_ztunnel_lets_nothing_through_after_a_crash() -> Result<()> {
    half_started(true)
}

#[test]
fn starts_stops_crashes_and_handovers_under_new_connections_leak_nothing() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let node1 = s.lab.node("node1");
    let service = host_service(node1, 8080)?;
    let underlay = Sniffer::start(node1, "eth0")?;
    let stream = Stream::start(&client.ns, server.addr, 256);
    // Each start is held between its stages, widening any window in which
    // a half-started ztunnel could let a SYN through.
    let hold = [("ZTUNNEL_TEST_STARTUP_HOLD", "300ms")];

    zt1.stop()?;
    let mut zt1 = s.spawn_ztunnel("node1", &[], &hold)?.ready()?;
    std::thread::sleep(Duration::from_millis(500));
    zt1.kill();
    let mut zt1 = s.spawn_ztunnel("node1", &[], &hold)?.ready()?;
    std::thread::sleep(Duration::from_millis(500));
    let zt1b = s
        .spawn_ztunnel("node1", &["--drain-deadline", "5s"], &hold)?
        .ready()?;
    assert!(
        zt1b.log_text().contains("took the listeners over"),
        "no handover:\n{}",
        zt1b.log_text()
    );
    zt1.wait_exit(Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_millis(500));
    let (reports, _failures) = stream.finish();

    let pcap = underlay.stop()?;
    assert_eq!(
        pcap.count("tcp port 8080")?,
        0,
        "SYNs left the node in clear:\n{}",
        pcap.summary("tcp port 8080")
    );
    assert!(
        service.accepted().is_empty(),
        "connections landed on a node service"
    );
    assert!(
        reports.len() > 5,
        "too few connections got through to prove anything: {}",
        reports.len()
    );
    for report in &reports {
        assert_eq!(
            report.peer.ip(),
            std::net::IpAddr::V4(client.spec.ip),
            "a connection arrived without the client's address"
        );
    }
    eprintln!("{} connections through three restarts", reports.len());
    Ok(())
}

/// A connection the node opens to an enrolled pod (as ztunnel's inbound
/// path does, from a remote client's address) is remembered. When its
/// socket goes first (ztunnel resets its side of a relay that broke), the
/// pod's segments still in flight are answered with a reset on the node,
/// never forwarded to the client's address in clear. (CI once caught a
/// server's byte on the underlay this way, in the restart test above.)
#[test]
fn a_pods_late_segments_on_a_connection_the_node_dropped_stay_on_the_node() -> Result<()> {
    use std::net::SocketAddrV4;
    use ztunnel_tests::raw::{data_segment, send_packets, TcpWatch, TCP_ACK, TCP_PSH, TCP_RST};
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let node2 = s.lab.node("node2");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let server_addr = SocketAddrV4::new(server_pod.spec.ip, 8080);
    let client_addr = SocketAddrV4::new(s.lab.pod("client").spec.ip, 41306);
    let opened = node2.ns.run(move || -> std::io::Result<socket2::Socket> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_ip_transparent(true)?;
        socket.bind(&SocketAddr::V4(client_addr).into())?;
        socket.connect_timeout(&SocketAddr::V4(server_addr).into(), Duration::from_secs(5))?;
        Ok(socket)
    })??;
    ztunnel_tests::wait::eventually(
        "the server accepting the node's connection",
        Duration::from_secs(5),
        || Ok(server.accepted().contains(&SocketAddr::V4(client_addr))),
    )?;
    let underlay = Sniffer::start(node2, "eth0")?;
    let watch = TcpWatch::start(&server_pod.ns)?;
    let resets = || {
        watch
            .matching(|seg| {
                seg.src == client_addr && seg.dst == server_addr && seg.flags & TCP_RST != 0
            })
            .len()
    };
    // Closed with a reset: the socket is gone at once, no TIME_WAIT.
    opened.set_linger(Some(Duration::ZERO))?;
    drop(opened);
    ztunnel_tests::wait::eventually("the close's reset", Duration::from_secs(3), || {
        Ok(resets() == 1)
    })?;

    let secret = b"sent after the node's socket was gone";
    send_packets(
        &server_pod.ns,
        vec![data_segment(
            server_addr,
            client_addr,
            0x5eed_0000,
            TCP_ACK | TCP_PSH,
            secret,
        )],
    )?;
    let answered = ztunnel_tests::wait::eventually(
        "a reset for the late segment",
        Duration::from_secs(3),
        || Ok(resets() == 2),
    );
    let pcap = underlay.stop()?;
    assert!(
        !pcap.contains(secret) && pcap.count("tcp port 8080")? == 0,
        "the pod's late segment left the node in clear:\n{}",
        pcap.summary("tcp port 8080")
    );
    answered?;
    Ok(())
}

/// Asks for the listeners at `socket` as `uid`, from a thread that alone
/// takes that identity (raw syscalls, not libc's process-wide wrappers).
/// Returns the reply's text (descriptors sent with it are closed unread).
fn takeover_as(uid: u32, socket: &str) -> Result<String> {
    use std::io::{Read, Write};
    let socket = socket.to_string();
    std::thread::spawn(move || -> Result<String> {
        // SAFETY: setresgid/setresuid on the calling thread only.
        unsafe {
            if libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error()).context("dropping privileges");
            }
        }
        let mut stream = std::os::unix::net::UnixStream::connect(&socket)
            .with_context(|| format!("connecting to {socket} as uid {uid}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        // A refusing server may close before the request is even written.
        let _ = stream.write_all(b"ztunnel-takeover v1\n");
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        Ok(reply)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("takeover thread panicked"))?
}

/// The ztunnel command line for `node`, for running it some other way than
/// the lab's helpers do.
fn ztunnel_args(s: &Setup, node: &Node) -> Vec<String> {
    vec![
        "--config".into(),
        s.config.display().to_string(),
        "--node-name".into(),
        node.name.into(),
        "--bpf-pin-dir".into(),
        node.pin_dir.display().to_string(),
        "--ca-dir".into(),
        s.lab.ca_dir.display().to_string(),
    ]
}

#[test]
fn refuses_to_start_where_its_pins_would_die_with_it() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let node1 = s.lab.node("node1");
    let bin = binary()?;
    let args = ztunnel_args(&s, node1);

    // `ip netns exec` remounts /sys in a mount namespace of its own.
    let out = Command::new("timeout")
        .args(["20", "ip", "netns", "exec", node1.ns.name()])
        .arg(&bin)
        .args(&args)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("mount namespace"),
        "started under `ip netns exec` ({}):\n{stderr}",
        out.status
    );

    // A bpffs mounted over the host's inside a private mount namespace.
    let script = format!(
        "mount -t bpf bpf /sys/fs/bpf && exec nsenter --net={} -- {} {}",
        node1.ns.path().display(),
        bin.display(),
        args.join(" ")
    );
    let out = Command::new("timeout")
        .args([
            "20",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
        ])
        .arg(&script)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("mount namespace"),
        "started on a private bpffs ({}):\n{stderr}",
        out.status
    );

    // Neither left anything behind on the host's bpffs, nor captures.
    assert!(
        !node1.pin_dir.join("links").exists(),
        "pins were created on the host"
    );
    let plain = s.lab.pod("plain");
    let server = Server::start(&plain.ns, plain.addr(8080))?;
    let report = request(&s.lab.pod("client").ns, server.addr, 1024)?;
    assert_eq!(
        report.peer.ip(),
        std::net::IpAddr::V4(s.lab.pod("client").spec.ip)
    );
    Ok(())
}

#[test]
fn handover_refuses_a_peer_that_is_not_root() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    // A handover socket in a directory open to everyone, so that only the
    // credential check stands between an unprivileged process and the
    // listeners (the default lives in a root-only directory).
    let dir = std::env::temp_dir().join(format!("{}-handover", s.lab.prefix));
    std::fs::create_dir_all(&dir)?;
    Command::new("chmod").arg("0755").arg(&dir).status()?;
    let socket = dir.join("handover.sock").display().to_string();
    let mut zt1 = s.ztunnel("node1", &["--handover-socket", &socket])?;
    Command::new("chmod").args(["0777", &socket]).status()?;
    let reply = takeover_as(65534, &socket);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(reply?, "", "an unprivileged peer got an answer");
    zt1.wait_for_log("refused a handover", Duration::from_secs(5))?;
    assert!(
        !zt1.log_text().contains("listeners handed over"),
        "listeners were handed to uid 65534:\n{}",
        zt1.log_text()
    );
    // Still serving.
    let plain = s.lab.pod("plain");
    let server = Server::start(&plain.ns, plain.addr(8080))?;
    request(&s.lab.pod("client").ns, server.addr, 1024)?;
    Ok(())
}

#[test]
fn a_draining_ztunnel_offers_no_listeners() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &["--drain-deadline", "20s"])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    // A slow transfer keeps the drain going.
    let conn = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    let transfer = std::thread::spawn(move || {
        conn.exchange_slowly(&[7u8; 64 * 1024], 20, Duration::from_millis(200))
    });
    std::thread::sleep(Duration::from_millis(300));
    zt1.terminate();
    zt1.wait_for_log("draining", Duration::from_secs(5))?;

    // A new ztunnel arriving mid-drain starts fresh instead of taking the
    // closed listeners.
    let zt1b = s.ztunnel("node1", &[])?;
    assert!(
        !zt1b.log_text().contains("took the listeners over"),
        "a draining ztunnel handed its listeners over:\n{}",
        zt1b.log_text()
    );
    request(&client.ns, server.addr, 1024)?;
    transfer
        .join()
        .map_err(|_| anyhow::anyhow!("transfer thread panicked"))??;
    zt1.wait_exit(Duration::from_secs(25))?;
    // And it keeps serving once the old one is gone.
    request(&client.ns, server.addr, 1024)?;
    Ok(())
}

#[test]
fn maps_of_another_layout_are_set_aside_and_refilled() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let node1 = s.lab.node("node1");
    // The counters map as a ztunnel with fewer counters (b091a11) pinned it.
    let maps = node1.pin_dir.join("maps");
    std::fs::create_dir_all(&maps)?;
    ztunnel_tests::netns::run(
        Command::new("bpftool")
            .args(["map", "create"])
            .arg(maps.join("ZT_POD_COUNTERS"))
            .args([
                "type",
                "percpu_hash",
                "key",
                "4",
                "value",
                "32",
                "entries",
                "4096",
            ])
            .args(["name", "ZT_POD_COUNTERS"]),
    )?;
    let zt1 = s.ztunnel("node1", &[])?;
    assert!(
        zt1.log_text().contains("set aside"),
        "the old map was not noticed:\n{}",
        zt1.log_text()
    );
    assert!(
        !node1.pin_dir.join("maps-retired").exists(),
        "the retired maps stayed although no link used them"
    );
    let client = s.lab.pod("client");
    let plain = s.lab.pod("plain");
    let server = Server::start(&plain.ns, plain.addr(8080))?;
    request(&client.ns, server.addr, 1024)?;
    let c = counters(node1, client.spec.ip)?.context("client counters")?;
    assert_eq!(c.outbound_captured, 1, "{c:?}");
    Ok(())
}

#[test]
fn a_new_ztunnel_that_dies_before_it_serves_leaves_the_old_one_in_charge() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let client = s.lab.pod("client");
    let plain = s.lab.pod("plain");
    let server = Server::start(&plain.ns, plain.addr(8080))?;
    // The new one takes the listeners over, then dies while still starting.
    let mut new = s.spawn_ztunnel("node1", &[], &[("ZTUNNEL_TEST_STARTUP_HOLD", "2s")])?;
    new.wait_for_log("took the listeners over", Duration::from_secs(30))?;
    new.kill();
    zt1.wait_for_log(
        "did not confirm; this one keeps serving",
        Duration::from_secs(10),
    )?;
    // The old one still serves, and a later handover still works.
    for _ in 0..5 {
        request(&client.ns, server.addr, 1024)?;
    }
    let newer = s.ztunnel("node1", &[])?;
    assert!(newer.log_text().contains("took the listeners over"));
    zt1.wait_exit(Duration::from_secs(40))?;
    request(&client.ns, server.addr, 1024)?;
    Ok(())
}

/// The capture listeners ztunnel's process `pid` holds on `port`.
fn listeners_of(node: &Node, port: u16, pid: u32) -> Result<usize> {
    Ok(ztunnel_tests::ztunnel::sockets(node)?
        .iter()
        .filter(|s| {
            s.state == "LISTEN"
                && s.local.port() == port
                && s.process.contains(&format!("pid={pid},"))
        })
        .count())
}

/// Each proxy worker has its own member of each capture port's reuseport
/// group. Handovers between ztunnels with different numbers of workers pass
/// every member on, grow the groups when the new one has more workers, and
/// serve them all when it has fewer: no connection fails, and none waits in
/// an accept queue that nobody serves (it would hang until the stream's
/// timeout and count as failed).
#[test]
fn handovers_between_different_worker_counts_lose_no_connection() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let node1 = s.lab.node("node1");
    let mut old = s.ztunnel("node1", &["--worker-threads", "1"])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let pid = |zt: &ztunnel_tests::ztunnel::Ztunnel| zt.pid().context("no pid");
    assert_eq!(listeners_of(node1, 15001, pid(&old)?)?, 1);
    let stream = Stream::start(&client.ns, server.addr, 256);

    for (workers, listeners) in [("3", 3), ("2", 3), ("1", 3)] {
        std::thread::sleep(Duration::from_millis(500));
        let new = s.ztunnel(
            "node1",
            &["--worker-threads", workers, "--drain-deadline", "5s"],
        )?;
        assert!(
            new.log_text().contains("took the listeners over"),
            "no handover:\n{}",
            new.log_text()
        );
        old.wait_exit(Duration::from_secs(15))?;
        for port in [15001, 15006, 15008] {
            assert_eq!(
                listeners_of(node1, port, pid(&new)?)?,
                listeners,
                "port {port} after the handover to {workers} workers"
            );
        }
        old = new;
    }
    std::thread::sleep(Duration::from_millis(500));
    let n = stream.finish_unbroken("through handovers between 1, 3, 2 and 1 workers", 10)?;
    eprintln!("{n} connections through three handovers");
    Ok(())
}

/// Capture listeners are `SO_REUSEPORT` groups, and the kernel spreads new
/// flows over every member of a group. A fresh ztunnel must therefore never
/// join a group another process still holds (a draining ztunnel, which no
/// longer accepts): the flows hashed to that process's member would wait
/// in a queue nobody serves. Here a test-held member of 15001's group
/// stands in for it; ztunnel waits for the port, then refuses to start.
#[test]
fn a_fresh_ztunnel_never_joins_another_processs_listener_group() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let node1 = s.lab.node("node1");
    let _held = node1.ns.run(|| -> Result<std::net::TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_ip_transparent(true)?;
        socket.bind(&SocketAddr::from(([0, 0, 0, 0], 15001)).into())?;
        socket.listen(128)?;
        Ok(socket.into())
    })??;
    let out = Command::new("timeout")
        .args(["40", "nsenter"])
        .arg(format!("--net={}", node1.ns.path().display()))
        .arg("--")
        .arg(binary()?)
        .args(ztunnel_args(&s, node1))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("binding the capture listeners"),
        "started beside another process's listener on 15001 ({}):\n{stderr}",
        out.status
    );
    Ok(())
}
