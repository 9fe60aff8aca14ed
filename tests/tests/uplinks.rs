//! Where traffic enters and leaves a node: uplinks without an Ethernet
//! header, pods whose veth capture has not caught up with yet, uplinks that
//! vanish, and a full enrolled-pods map. Capture either sees the traffic or
//! drops it; it never lets it pass unseen.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ztunnel_tests::{
    lab::{self, PodSpec},
    raw::TcpWatch,
    setup::Setup,
    sniff::Sniffer,
    traffic::{request, Connection, Server},
    tun::TunLink,
    wait::{eventually, never},
    ztunnel::{counters, ztunnel_owns, Ztunnel},
};

#[test]
fn capture_works_through_an_uplink_without_an_ethernet_header() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let (node1, node2) = (s.lab.node("node1"), s.lab.node("node2"));
    // Pod traffic between the nodes crosses an L3 device (as with IPIP or
    // WireGuard); the underlay veth carries only the nodes' own addresses.
    let _tun = TunLink::new(&node1.ns, &node2.ns, "ztl3")?;
    node1
        .ns
        .ip(&["route", "replace", "198.18.2.0/24", "dev", "ztl3"])?;
    node2
        .ns
        .ip(&["route", "replace", "198.18.1.0/24", "dev", "ztl3"])?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let zt2 = s.ztunnel("node2", &[])?;
    assert!(
        zt2.log_text().contains("ztl3"),
        "the L3 device was not picked as an uplink:\n{}",
        zt2.log_text()
    );
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;

    // Mesh to mesh: HBONE arrives on the L3 device and is captured there.
    let client = s.lab.pod("client");
    let conn = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    // The tunnel is opened once node1's ztunnel has accepted the client:
    // across the relay it may take a moment longer than the accept.
    eventually(
        "the tunnel arriving on the L3 uplink captured by node2's ztunnel",
        Duration::from_secs(3),
        || ztunnel_owns(node2, server_pod.addr(15008), client.spec.ip),
    )?;
    conn.exchange(256 * 1024)?;

    // Plaintext into an enrolled pod, across the L3 device: captured.
    let bystander = s.lab.pod("bystander");
    let conn = Connection::open(&bystander.ns, server.addr, Duration::from_secs(5))?;
    assert!(
        ztunnel_owns(node2, server.addr, bystander.spec.ip)?,
        "plaintext arriving on the L3 uplink bypassed capture"
    );
    conn.exchange(1024)?;
    Ok(())
}

#[test]
fn ztunnel_needs_no_ip_binary() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    // Only nsenter on PATH: any `ip` the daemon ran would fail.
    let bin_dir = std::env::temp_dir().join(format!("{}-path", s.lab.prefix));
    std::fs::create_dir_all(&bin_dir)?;
    let _ = std::os::unix::fs::symlink("/usr/bin/nsenter", bin_dir.join("nsenter"));
    let path = bin_dir.display().to_string();
    let started = s
        .spawn_ztunnel("node1", &[], &[("PATH", path.as_str())])
        .and_then(Ztunnel::ready);
    let _ = std::fs::remove_dir_all(&bin_dir);
    let _zt1 = started?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let client = s.lab.pod("client");
    let conn = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    assert!(ztunnel_owns(
        s.lab.node("node1"),
        server.addr,
        client.spec.ip
    )?);
    conn.exchange(1024)?;
    Ok(())
}

/// A pod beyond the standard ones.
const LATE: PodSpec = PodSpec {
    name: "late",
    node: 0,
    ip: Ipv4Addr::new(198, 18, 1, 30),
    enrolled: true,
    service_account: "late",
};

#[test]
fn a_new_pod_is_captured_from_its_first_connection() -> Result<()> {
    // The workload is known before its pod exists (its veth appears later).
    let mut s = Setup::new(&lab::config_yaml_extra(&[], &[], &[LATE], ""))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let server_addr = server.addr;
    let underlay = Sniffer::start(s.lab.node("node1"), "eth0")?;

    s.lab.add_extra_pod(LATE)?;
    // Connect at once and keep trying: every connection that works went
    // through the mesh, and none left in clear before capture caught up.
    let late = s.lab.pod("late");
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut ok = 0;
    while Instant::now() < deadline {
        match Connection::open(&late.ns, server_addr, Duration::from_millis(300)) {
            Ok(conn) => {
                conn.exchange(256)?;
                ok += 1;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let pcap = underlay.stop()?;
    assert_eq!(
        pcap.count("tcp port 8080")?,
        0,
        "the new pod's traffic left in clear:\n{}",
        pcap.summary("tcp port 8080")
    );
    assert!(ok > 0, "the new pod never got through");
    Ok(())
}

#[test]
fn a_veth_capture_has_not_seen_cannot_reach_an_enrolled_pod() -> Result<()> {
    let mut s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    // A pod whose veth the node's routes never name: capture has no program
    // on it, and its packets to the enrolled neighbor are not seen at
    // ingress.
    s.lab.add_unrouted_pod(PodSpec {
        name: "rogue",
        node: 0,
        ip: Ipv4Addr::new(198, 18, 1, 40),
        enrolled: false,
        service_account: "rogue",
    })?;
    let node1 = s.lab.node("node1");
    let neighbor = s.lab.pod("neighbor");
    let _server = Server::start(&neighbor.ns, neighbor.addr(8080))?;
    let watch = TcpWatch::start(&neighbor.ns)?;
    let rogue = s.lab.pod("rogue");
    let attempt = || {
        let _ = Connection::open(&rogue.ns, neighbor.addr(8080), Duration::from_millis(500));
        never(
            "a SYN from an uncaptured veth reached the enrolled pod",
            Duration::from_millis(500),
            || {
                !watch
                    .matching(|seg| seg.is_syn() && seg.src.ip() == &rogue.spec.ip)
                    .is_empty()
            },
        )
    };
    // The catch-all route hands it to ztunnel instead of the pod.
    attempt()?;
    // With ztunnel gone and the catch-all rule removed (as a CNI flushing
    // rules would), the egress guard still drops it.
    zt1.kill();
    node1.ns.ip(&["rule", "del", "priority", "83"])?;
    attempt()?;
    let c = counters(node1, neighbor.spec.ip)?.context("neighbor counters")?;
    assert!(
        c.dropped_uncaptured >= 1,
        "the guard did not count it: {c:?}"
    );
    Ok(())
}

#[test]
fn an_enrolled_pod_whose_veth_is_unknown_cannot_get_out() -> Result<()> {
    const GHOST: PodSpec = PodSpec {
        name: "ghost",
        node: 0,
        ip: Ipv4Addr::new(198, 18, 1, 41),
        enrolled: true,
        service_account: "ghost",
    };
    let mut s = Setup::new(&lab::config_yaml_extra(&[], &[], &[GHOST], ""))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    // Enrolled in the configuration; its veth is one the node's routes
    // never name, so capture has no program on it.
    s.lab.add_unrouted_pod(GHOST)?;
    let plain = s.lab.pod("plain");
    let _server = Server::start(&plain.ns, plain.addr(8080))?;
    let watch = TcpWatch::start(&plain.ns)?;
    let underlay = Sniffer::start(s.lab.node("node1"), "eth0")?;
    let ghost = s.lab.pod("ghost");
    let result = Connection::open(&ghost.ns, plain.addr(8080), Duration::from_millis(500));
    assert!(result.is_err(), "the uncaptured enrolled pod connected");
    never(
        "a SYN from the uncaptured enrolled pod reached the other node",
        Duration::from_millis(300),
        || {
            !watch
                .matching(|seg| seg.src.ip() == &ghost.spec.ip)
                .is_empty()
        },
    )?;
    let pcap = underlay.stop()?;
    assert_eq!(pcap.count(&format!("src host {}", ghost.spec.ip))?, 0);
    Ok(())
}

#[test]
fn an_uplink_that_vanishes_does_not_stop_the_sync() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let node1 = s.lab.node("node1");
    node1.ns.ip(&[
        "link", "add", "extra0", "type", "veth", "peer", "name", "extra0p",
    ])?;
    node1.ns.ip(&["link", "set", "extra0", "up"])?;
    let mut zt1 = s.ztunnel("node1", &["--uplink", "eth0,extra0"])?;
    node1.ns.ip(&["link", "del", "extra0"])?;
    // Enroll the bystander and release the neighbor.
    s.write(&lab::config_yaml(&[
        ("bystander", true),
        ("neighbor", false),
    ]))?;
    zt1.wait_for_log("configuration reloaded", Duration::from_secs(10))?;
    let bystander = s.lab.pod("bystander");
    let neighbor = s.lab.pod("neighbor");
    eventually(
        "bystander enrolled, neighbor released",
        Duration::from_secs(10),
        || {
            Ok(counters(node1, bystander.spec.ip)?.is_some()
                && counters(node1, neighbor.spec.ip)?.is_none())
        },
    )?;
    let plain = s.lab.pod("plain");
    let server = Server::start(&plain.ns, plain.addr(8080))?;
    let conn = Connection::open(&bystander.ns, server.addr, Duration::from_secs(5))?;
    assert!(ztunnel_owns(node1, server.addr, bystander.spec.ip)?);
    conn.exchange(1024)?;
    request(&neighbor.ns, server.addr, 1024)?;
    Ok(())
}

/// `count` enrolled workloads on node1 at addresses no pod has, the `n`-th
/// at 198.19.(n / 250).(n % 250 + 1) offset by `base`.
fn many_workloads(base: usize, count: usize) -> String {
    let mut out = String::new();
    for n in base..base + count {
        out.push_str(&format!(
            "- uid: lab//v1/Pod/default/w{n}\n  name: w{n}\n  namespace: default\n  serviceAccount: w\n  workloadIps: [\"198.19.{}.{}\"]\n  protocol: HBONE\n  node: node1\n  services: {{}}\n",
            n / 250,
            n % 250 + 1
        ));
    }
    out
}

/// The IPv4 keys of node1's pinned enrolled-pods map.
fn enrolled_keys(s: &Setup) -> Result<Vec<Ipv4Addr>> {
    let map = s.lab.node("node1").pin_dir.join("maps/ZT_ENROLLED_PODS");
    let out = ztunnel_tests::netns::run(
        std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&map),
    )?;
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(entries
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let b: Vec<u8> = e["key"]
                .as_array()?
                .iter()
                .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
                .collect();
            (b.len() == 4).then(|| Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        })
        .collect())
}

#[test]
fn a_full_enrolled_pods_map_can_be_replaced_entirely() -> Result<()> {
    // The lab enrolls two pods on node1; with these the map is full.
    let room = 4096 - 2;
    let s = Setup::new(&format!(
        "{}{}",
        lab::config_yaml(&[]),
        many_workloads(0, room)
    ))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    assert_eq!(enrolled_keys(&s)?.len(), 4096, "the map is not full");
    s.write(&format!(
        "{}{}",
        lab::config_yaml(&[]),
        many_workloads(room, room)
    ))?;
    zt1.wait_for_log("configuration reloaded", Duration::from_secs(10))?;
    let last = 2 * room - 1;
    let newest = Ipv4Addr::new(198, 19, (last / 250) as u8, (last % 250 + 1) as u8);
    eventually("the new set enrolled", Duration::from_secs(20), || {
        let keys = enrolled_keys(&s)?;
        Ok(keys.len() == 4096 && keys.contains(&newest))
    })?;
    let keys = enrolled_keys(&s)?;
    assert!(
        !keys.contains(&Ipv4Addr::new(198, 19, 0, 1)),
        "a removed workload is still enrolled"
    );
    assert!(keys.contains(&s.lab.pod("client").spec.ip));
    let log = zt1.log_text();
    assert!(!log.contains("capture sync failed"), "{log}");
    Ok(())
}
