//! A pod with `CAP_NET_RAW` (in the default container capability set) sends
//! what a normal TCP stack never does: its SYN cut into IP fragments, or a
//! TCP header too short to read. Capture must not be fooled: such packets to
//! or from an enrolled pod are dropped in the kernel and counted, in both
//! directions, whatever the size of the first fragment.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::Result;
use ztunnel_tests::{
    lab,
    raw::{fragmented_syn, send_packets, truncated_syn, TcpWatch},
    setup::Setup,
    sniff::Sniffer,
    traffic::{Connection, Server},
    wait::never,
    ztunnel::counters,
};

/// Every workload in `default` requires a mesh identity: plaintext into an
/// enrolled pod is denied (in the kernel, at the SYN).
fn require_mtls() -> String {
    lab::config_yaml_with(
        &[],
        &[],
        "policies:\n- name: require-mtls\n  namespace: default\n  scope: Namespace\n  action: Allow\n  dryRun: false\n  rules: [[[{principals: [!Prefix cluster.local/]}]]]\n",
    )
}

fn v4(pod: &lab::Pod, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(pod.spec.ip, port)
}

#[test]
fn fragmented_syns_into_an_enrolled_pod_are_dropped_in_the_kernel() -> Result<()> {
    let s = Setup::new(&require_mtls())?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let mut zt2 = s.ztunnel("node2", &[])?;
    zt2.wait_for_log("kernel policy tables updated", Duration::from_secs(5))?;
    let server = s.lab.pod("server");
    let _listener = Server::start(&server.ns, server.addr(8080))?;
    let watch = TcpWatch::start(&server.ns)?;

    // What the attack gets around: a normal plaintext connect is denied.
    assert!(
        Connection::open(
            &s.lab.pod("plain").ns,
            server.addr(8080),
            Duration::from_secs(1)
        )
        .is_err(),
        "plaintext into the enrolled server was not denied to begin with"
    );

    // From another node (through the uplink) and from the same node
    // (through the sender's veth); a tiny first fragment (8 bytes of TCP
    // header: ports and sequence number, no flags) and a larger one.
    let attempts = [
        ("bystander", 8, 40001),
        ("bystander", 16, 40002),
        ("plain", 8, 40003),
        ("plain", 16, 40004),
    ];
    for (attacker, first_len, port) in attempts {
        let a = s.lab.pod(attacker);
        send_packets(
            &a.ns,
            fragmented_syn(v4(a, port), v4(server, 8080), port, first_len),
        )?;
    }
    never(
        "a fragmented SYN reached the enrolled server's stack",
        Duration::from_secs(1),
        || {
            !watch
                .matching(|seg| seg.is_syn() && (40001..=40004).contains(&seg.src.port()))
                .is_empty()
        },
    )?;
    let c = counters(s.lab.node("node2"), server.spec.ip)?.expect("server has counters");
    assert_eq!(
        c.dropped_fragment, 8,
        "each of the 8 fragments is dropped and counted once: {c:?}"
    );
    Ok(())
}

#[test]
fn fragmented_syns_from_an_enrolled_pod_never_leave_its_node() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let plain = s.lab.pod("plain");
    let neighbor = s.lab.pod("neighbor");
    let _servers = [
        Server::start(&plain.ns, plain.addr(8080))?,
        Server::start(&neighbor.ns, neighbor.addr(8080))?,
    ];
    let plain_watch = TcpWatch::start(&plain.ns)?;
    let neighbor_watch = TcpWatch::start(&neighbor.ns)?;
    let underlay = Sniffer::start(s.lab.node("node1"), "eth0")?;

    let client = s.lab.pod("client");
    for (first_len, port) in [(8, 41001), (16, 41002)] {
        // To another node, where nothing is enrolled, and to an enrolled
        // pod on the same node.
        send_packets(
            &client.ns,
            fragmented_syn(v4(client, port), v4(plain, 8080), port, first_len),
        )?;
        send_packets(
            &client.ns,
            fragmented_syn(v4(client, port + 100), v4(neighbor, 8080), port, first_len),
        )?;
    }
    let from_client = |seg: &ztunnel_tests::raw::Segment| seg.src.ip() == &client.spec.ip;
    never(
        "a fragmented SYN from the enrolled client reached a pod's stack",
        Duration::from_secs(1),
        || {
            !plain_watch.matching(from_client).is_empty()
                || !neighbor_watch.matching(from_client).is_empty()
        },
    )?;
    let pcap = underlay.stop()?;
    let leaked = pcap.count(&format!("src host {}", client.spec.ip))?;
    assert_eq!(
        leaked,
        0,
        "fragments from the enrolled client left the node in clear:\n{}",
        pcap.summary(&format!("src host {}", client.spec.ip))
    );
    let c = counters(s.lab.node("node1"), client.spec.ip)?.expect("client has counters");
    assert_eq!(c.dropped_fragment, 8, "fragments not counted: {c:?}");
    Ok(())
}

#[test]
fn truncated_tcp_headers_to_or_from_enrolled_pods_are_dropped_and_counted() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let client = s.lab.pod("client");
    let plain = s.lab.pod("plain");
    let bystander = s.lab.pod("bystander");
    let underlay = Sniffer::start(s.lab.node("node1"), "eth0")?;
    let client_watch = TcpWatch::start(&client.ns)?;

    // 12 bytes: ports, sequence and acknowledgement numbers, no flags.
    send_packets(
        &client.ns,
        vec![truncated_syn(v4(client, 42001), v4(plain, 8080), 42001, 12)],
    )?;
    send_packets(
        &bystander.ns,
        vec![truncated_syn(
            v4(bystander, 42002),
            v4(client, 8080),
            42002,
            12,
        )],
    )?;
    never(
        "a truncated segment from the bystander reached the enrolled client",
        Duration::from_millis(500),
        || {
            !client_watch
                .matching(|seg| seg.src.port() == 42002)
                .is_empty()
        },
    )?;
    let pcap = underlay.stop()?;
    assert_eq!(
        pcap.count(&format!("src host {}", client.spec.ip))?,
        0,
        "a truncated segment from the enrolled client left the node"
    );
    let c = counters(s.lab.node("node1"), client.spec.ip)?.expect("client has counters");
    assert_eq!(
        c.dropped_truncated, 2,
        "truncated segments not counted: {c:?}"
    );
    Ok(())
}
