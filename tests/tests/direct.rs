//! Same-node connections between enrolled pods, passed in the kernel with
//! no proxy in the path: what passes, what users still see (Istio's
//! metrics, the access log), the same denials, a policy change ending a
//! live connection, and a pod claiming another pod's address to pass.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context, Result};
use ztunnel_tests::{
    http::{self, sample},
    lab,
    raw::{send_packets, syn, TcpWatch},
    setup::Setup,
    traffic::{Connection, Server},
    wait::eventually,
    ztunnel::{counters, ztunnel_owns, Ztunnel},
};

fn policy(name: &str, action: &str, rules: &str) -> String {
    format!("- name: {name}\n  namespace: default\n  scope: Namespace\n  action: {action}\n  dryRun: false\n  rules: {rules}\n")
}

const DENY_CLIENT: &str = "[[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]";
const ALLOW_CLIENT: &str = "[[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]";

fn config(policies: &[String]) -> String {
    if policies.is_empty() {
        return lab::config_yaml_with(&[], &[], "");
    }
    lab::config_yaml_with(&[], &[], &format!("policies:\n{}", policies.concat()))
}

fn metrics(s: &Setup) -> Result<String> {
    let node = s.lab.node("node1");
    let r = http::get(
        &node.ns,
        SocketAddr::from((node.underlay_ip, 15020)),
        "/metrics",
    )?;
    anyhow::ensure!(r.status == 200, "metrics answered {}", r.status);
    Ok(r.body)
}

/// A lab with `policies` and node1's ztunnel, its kernel tables written.
fn node1_ready(policies: &[String]) -> Result<(Setup, Ztunnel)> {
    let s = Setup::new(&config(policies))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    zt1.wait_for_log("kernel policy tables updated", Duration::from_secs(10))?;
    Ok((s, zt1))
}

#[test]
fn a_same_node_connection_passes_in_the_kernel_and_is_reported_as_before() -> Result<()> {
    let s = Setup::new(&config(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let client = s.lab.pod("client");
    let neighbor = s.lab.pod("neighbor");
    let server = Server::start(&neighbor.ns, neighbor.addr(9000))?;
    let before = counters(s.lab.node("node1"), client.spec.ip)?.context("client counters")?;

    let conn = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    assert!(
        !ztunnel_owns(s.lab.node("node1"), server.addr, client.spec.ip)?,
        "ztunnel proxies a same-node connection the kernel could pass"
    );
    let len = 256 * 1024;
    let report = conn.exchange(len)?;
    assert_eq!(report.peer.ip(), IpAddr::V4(client.spec.ip));
    let after = counters(s.lab.node("node1"), client.spec.ip)?.context("client counters")?;
    assert_eq!(after.outbound_direct, before.outbound_direct + 1);
    assert_eq!(after.outbound_captured, before.outbound_captured);

    // The access log line, from the kernel's close event.
    zt1.wait_for_log("path=\"kernel\"", Duration::from_secs(5))?;
    let log = zt1.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("connection complete") && l.contains("path=\"kernel\""))
        .with_context(|| format!("no access log line for the kernel path:\n{log}"))?;
    for field in [
        "src_workload=\"client\"",
        "dst_workload=\"neighbor\"",
        "src_identity=spiffe://cluster.local/ns/default/sa/client",
        "outcome=ok",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }

    // Istio's series, as source and as destination (both ends are ours).
    let m = metrics(&s)?;
    for reporter in ["source", "destination"] {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("destination_workload", "neighbor"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            ("connection_security_policy", "mutual_tls"),
            ("response_flags", "-"),
        ];
        let get = |name| {
            sample(&m, name, &labels).with_context(|| format!("no {name} for {reporter}:\n{m}"))
        };
        assert_eq!(get("istio_tcp_connections_opened_total")?, 1.0);
        assert_eq!(get("istio_tcp_connections_closed_total")?, 1.0);
        let received = get("istio_tcp_received_bytes_total")?;
        assert!(
            (len as f64..=len as f64 + 64.0 * 1024.0).contains(&received),
            "{reporter}: received {received}, the client sent {len}"
        );
        let sent = get("istio_tcp_sent_bytes_total")?;
        assert!(sent > 0.0 && sent < 1024.0, "{reporter}: sent {sent}");
    }
    let direct = sample(
        &m,
        "ztunnel_kernel_flows_direct_total",
        &[("workload", "client")],
    );
    assert_eq!(direct, Some(1.0), "{m}");
    Ok(())
}

/// Packets `veth`, in `ns`, has sent and received so far.
fn veth_packets(ns: &ztunnel_tests::netns::Netns, veth: &str) -> Result<(u64, u64)> {
    let out = ztunnel_tests::netns::run(
        ns.command("ip")
            .args(["-j", "-s", "link", "show", "dev", veth]),
    )?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let stats = &links[0]["stats64"];
    let get = |dir: &str| {
        stats[dir]["packets"]
            .as_u64()
            .with_context(|| format!("no {dir} packets for {veth}: {links}"))
    };
    Ok((get("tx")?, get("rx")?))
}

#[test]
fn a_same_node_connection_is_handed_to_the_pod_past_the_nodes_routing() -> Result<()> {
    // Past the handshake, each packet of a kernel-passed connection goes
    // from the sender's veth straight into the other pod: the node's
    // routing never forwards it, so the host-side veths send none of it:
    // only the SYN and the last ACK (after both FINs the flow is closed,
    // and its stragglers take the usual way), and the node's ARP.
    let (s, _zt1) = node1_ready(&[])?;
    let client = s.lab.pod("client");
    let neighbor = s.lab.pod("neighbor");
    let node1 = s.lab.node("node1");
    let server = Server::start(&neighbor.ns, neighbor.addr(9000))?;
    let (to_neighbor, _) = veth_packets(&node1.ns, &neighbor.veth)?;
    let (to_client, from_client) = veth_packets(&node1.ns, &client.veth)?;

    let len = 4 << 20;
    let report =
        Connection::open(&client.ns, server.addr, Duration::from_secs(5))?.exchange(len)?;
    assert_eq!(report.peer.ip(), IpAddr::V4(client.spec.ip));
    assert_eq!(report.bytes, len);
    let c = counters(node1, client.spec.ip)?.context("client counters")?;
    assert_eq!((c.outbound_captured, c.outbound_direct), (0, 1));

    let (to_neighbor_after, _) = veth_packets(&node1.ns, &neighbor.veth)?;
    let (to_client_after, from_client_after) = veth_packets(&node1.ns, &client.veth)?;
    let sent = from_client_after - from_client;
    assert!(sent >= 20, "the client sent only {sent} packets for 4 MiB");
    let forwarded = (to_neighbor_after - to_neighbor) + (to_client_after - to_client);
    eprintln!("the client sent {sent} packets, the node forwarded {forwarded}");
    assert!(
        forwarded <= 10,
        "the node forwarded {forwarded} packets of the connection (the client sent {sent})"
    );
    Ok(())
}

#[test]
fn a_denied_same_node_connection_is_refused_as_before() -> Result<()> {
    let (s, mut zt1) = node1_ready(&[policy("deny-client", "Deny", DENY_CLIENT)])?;
    let client = s.lab.pod("client");
    let neighbor = s.lab.pod("neighbor");
    let server = Server::start(&neighbor.ns, neighbor.addr(9000))?;
    let before = counters(s.lab.node("node1"), client.spec.ip)?.context("client counters")?;

    let attempt = Connection::open(&client.ns, server.addr, Duration::from_secs(5))
        .and_then(|c| c.exchange(1024));
    assert!(attempt.is_err(), "a denied client got through");
    zt1.wait_for_log(
        "same-node connection denied by policy",
        Duration::from_secs(5),
    )?;
    assert!(zt1
        .log_text()
        .lines()
        .any(|l| l.contains("denied by policy") && l.contains("policy=default/deny-client")));
    assert!(
        server.accepted().is_empty(),
        "the denied connection reached the server"
    );
    let after = counters(s.lab.node("node1"), client.spec.ip)?.context("client counters")?;
    assert_eq!(
        after.outbound_direct, before.outbound_direct,
        "passed in the kernel"
    );
    assert_eq!(after.outbound_captured, before.outbound_captured + 1);

    // The other way round is allowed, and passes in the kernel.
    let back = Server::start(&client.ns, client.addr(9001))?;
    let report =
        Connection::open(&neighbor.ns, back.addr, Duration::from_secs(5))?.exchange(1024)?;
    assert_eq!(report.peer.ip(), IpAddr::V4(neighbor.spec.ip));
    let n = counters(s.lab.node("node1"), neighbor.spec.ip)?.context("neighbor counters")?;
    assert_eq!(n.outbound_direct, 1);
    Ok(())
}

#[test]
fn a_policy_change_ends_a_live_kernel_connection() -> Result<()> {
    let s = Setup::new(&config(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let client = s.lab.pod("client");
    let neighbor = s.lab.pod("neighbor");
    let server = Server::start(&neighbor.ns, neighbor.addr(9000))?;
    let held = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    eventually("the server accepts", Duration::from_secs(5), || {
        Ok(!server.accepted().is_empty())
    })?;
    let c = counters(s.lab.node("node1"), client.spec.ip)?.context("client counters")?;
    assert_eq!(
        c.outbound_direct, 1,
        "the held connection is not a kernel one"
    );

    s.write(&config(&[policy("deny-client", "Deny", DENY_CLIENT)]))?;
    zt1.wait_for_log(
        "connection closed: no longer allowed after a policy update",
        Duration::from_secs(10),
    )?;
    let log = zt1.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("no longer allowed after a policy update")
                && l.contains("policy=default/deny-client")
                && l.contains("path=\"kernel\"")),
        "the close does not name the policy:\n{log}"
    );
    // Idle, it ends at once: both ends are made to send, and reset.
    let mut held = held;
    assert!(
        held.ended_within(Duration::from_secs(3))?,
        "the revoked idle connection is still open at the client"
    );
    assert!(
        held.exchange(1024).is_err(),
        "the revoked connection still works"
    );
    let m = metrics(&s)?;
    let failed = sample(
        &m,
        "istio_tcp_connections_failed_total",
        &[
            ("reporter", "destination"),
            ("source_workload", "client"),
            ("response_flags", "DENY"),
        ],
    );
    assert_eq!(failed, Some(1.0), "{m}");
    // New connections are refused as well, in userspace.
    let again = Connection::open(&client.ns, server.addr, Duration::from_secs(5))
        .and_then(|c| c.exchange(64));
    assert!(again.is_err(), "a new denied connection got through");
    Ok(())
}

#[test]
fn a_connection_reusing_the_ports_of_a_proxied_one_passes() -> Result<()> {
    // Denied first: the SYN goes through ztunnel, and capture remembers
    // the 4-tuple. Allowed then, the same 4-tuple passes in the kernel and
    // must not be taken for the old, proxied connection.
    let s = Setup::new(&config(&[policy("deny-client", "Deny", DENY_CLIENT)]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let client = s.lab.pod("client");
    let neighbor = s.lab.pod("neighbor");
    let server = Server::start(&neighbor.ns, neighbor.addr(9000))?;
    let port = 41234;
    let denied = Connection::open_from_port(&client.ns, port, server.addr, Duration::from_secs(5))
        .and_then(|c| c.exchange(64));
    assert!(denied.is_err(), "the denied connection got through");

    s.write(&config(&[]))?;
    zt1.wait_for_log_count("kernel policy tables updated", 2, Duration::from_secs(10))?;
    let report = Connection::open_from_port(&client.ns, port, server.addr, Duration::from_secs(5))?
        .exchange(256 * 1024)?;
    assert_eq!(report.peer, SocketAddr::from((client.spec.ip, port)));
    let c = counters(s.lab.node("node1"), client.spec.ip)?.context("client counters")?;
    assert_eq!((c.outbound_captured, c.outbound_direct), (1, 1));
    Ok(())
}

#[test]
fn a_proxied_connection_reusing_the_ports_of_a_kernel_one_reaches_ztunnel() -> Result<()> {
    // The reverse order. A live direct flow's packets are decided before
    // the socket lookup; a closed one's must not be: here the same 4-tuple
    // comes back through ztunnel (a dry-run policy now needs its log
    // lines), and its packets after the SYN belong to ztunnel's socket,
    // not to the neighbour, which never saw this connection's SYN.
    let (s, mut zt1) = node1_ready(&[])?;
    let client = s.lab.pod("client");
    let neighbor = s.lab.pod("neighbor");
    // The first connection leaves the 4-tuple in TIME_WAIT on the client;
    // a connect more than a second later may take it over.
    client.ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let server = Server::start(&neighbor.ns, neighbor.addr(9000))?;
    let port = 41235;
    let report = Connection::open_from_port(&client.ns, port, server.addr, Duration::from_secs(5))?
        .exchange(64 * 1024)?;
    assert_eq!(report.peer, SocketAddr::from((client.spec.ip, port)));
    let c = counters(s.lab.node("node1"), client.spec.ip)?.context("client counters")?;
    assert_eq!((c.outbound_captured, c.outbound_direct), (0, 1));

    let dry_run =
        policy("dry-deny-client", "Deny", DENY_CLIENT).replace("dryRun: false", "dryRun: true");
    s.write(&config(&[dry_run]))?;
    zt1.wait_for_log_count("kernel policy tables updated", 2, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(1100));
    let report = Connection::open_from_port(&client.ns, port, server.addr, Duration::from_secs(5))?
        .exchange(256 * 1024)?;
    assert_eq!(report.peer.ip(), IpAddr::V4(client.spec.ip));
    assert_eq!(report.bytes, 256 * 1024);
    let c = counters(s.lab.node("node1"), client.spec.ip)?.context("client counters")?;
    assert_eq!((c.outbound_captured, c.outbound_direct), (1, 1));
    Ok(())
}

#[test]
fn a_pod_cannot_claim_another_local_pods_address_to_pass() -> Result<()> {
    // Only client may reach neighbor; bystander (not enrolled) and
    // neighbor forge client's address.
    let (s, _zt1) = node1_ready(&[policy("allow-client", "Allow", ALLOW_CLIENT)])?;
    let client = s.lab.pod("client");
    let neighbor = s.lab.pod("neighbor");
    let bystander = s.lab.pod("bystander");
    let server = Server::start(&neighbor.ns, neighbor.addr(9000))?;
    let node1 = s.lab.node("node1");
    let before = counters(node1, client.spec.ip)?.context("client counters")?;

    let watch = TcpWatch::start(&neighbor.ns)?;
    let forged = syn(
        SocketAddrV4::new(client.spec.ip, 40000),
        SocketAddrV4::new(neighbor.spec.ip, 9000),
        7,
    );
    send_packets(&bystander.ns, vec![forged])?;
    eventually(
        "the forged SYN counted as spoofed",
        Duration::from_secs(2),
        || {
            Ok(counters(node1, client.spec.ip)?
                .is_some_and(|c| c.dropped_spoofed > before.dropped_spoofed))
        },
    )?;
    assert!(
        watch
            .wait_for(Duration::from_millis(500), |seg| seg.is_syn())
            .is_none(),
        "a SYN with a forged source reached the destination"
    );
    let after = counters(node1, client.spec.ip)?.context("client counters")?;
    assert_eq!(after.outbound_direct, before.outbound_direct);

    // The real client passes in the kernel.
    let report =
        Connection::open(&client.ns, server.addr, Duration::from_secs(5))?.exchange(1024)?;
    assert_eq!(report.peer.ip(), IpAddr::V4(client.spec.ip));
    let after = counters(node1, client.spec.ip)?.context("client counters")?;
    assert_eq!(after.outbound_direct, before.outbound_direct + 1);
    Ok(())
}

/// `field` of `link` in `ns`, as `ip -j link` gives it.
fn link_field(
    ns: &ztunnel_tests::netns::Netns,
    link: &str,
    field: &str,
) -> Result<serde_json::Value> {
    let out =
        ztunnel_tests::netns::run(ns.command("ip").args(["-j", "link", "show", "dev", link]))?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let value = links[0][field].clone();
    anyhow::ensure!(!value.is_null(), "no {field} for {link}: {links}");
    Ok(value)
}

#[test]
fn a_live_kernel_connection_is_never_handed_to_a_veth_its_receiver_no_longer_has() -> Result<()> {
    // A live kernel connection's entry remembers the veth each end sent
    // from, and outlives that veth until the connection ends. Here the
    // receiver's veth goes mid-connection, its ifindex is taken by another
    // pod's veth (a pod with the old receiver's MAC and address, so that
    // its stack would take the packets), and the receiver comes back on a
    // new veth, as a recreated pod with the same address would. The
    // client's next packets must not reach the pod at the old ifindex.
    let (s, zt1) = node1_ready(&[])?;
    let client = s.lab.pod("client");
    let neighbor = s.lab.pod("neighbor");
    let node1 = s.lab.node("node1");
    let server = Server::start(&neighbor.ns, neighbor.addr(9000))?;
    let mut conn = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    let client_addr = conn.local_addr()?;
    conn.write_all(&[1u8; 1000])?;
    // The neighbor's ACKs teach the kernel its end.
    std::thread::sleep(Duration::from_millis(300));
    let c = counters(node1, client.spec.ip)?.context("client counters")?;
    assert_eq!(
        c.outbound_direct, 1,
        "the connection did not pass in the kernel"
    );

    let old_ifindex = link_field(&node1.ns, &neighbor.veth, "ifindex")?
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .context("ifindex")?;
    let old_mac = link_field(&neighbor.ns, "eth0", "address")?;
    let old_mac = old_mac.as_str().context("MAC address")?;
    node1.ns.ip(&["link", "del", &neighbor.veth])?;
    let thief = ztunnel_tests::netns::Netns::create(&format!("{}-thief", s.lab.prefix))?;
    lab::add_veth_pair(&node1.ns, "vzthief", Some(old_ifindex), &thief)?;
    node1.ns.ip(&["link", "set", "vzthief", "up"])?;
    thief.ip(&["link", "set", "eth0", "address", old_mac])?;
    thief.ip(&[
        "addr",
        "add",
        &format!("{}/32", neighbor.spec.ip),
        "dev",
        "eth0",
    ])?;
    thief.ip(&["link", "set", "eth0", "up"])?;
    s.lab.rewire_pod("neighbor")?;
    let new_ifindex = link_field(&node1.ns, &neighbor.veth, "ifindex")?;
    let new_ifindex = new_ifindex.as_u64().context("ifindex")?;
    assert_ne!(new_ifindex, u64::from(old_ifindex));
    // ztunnel follows the receiver to its new veth.
    let pod = format!("pod={}", neighbor.spec.ip);
    let ifindex = format!("ifindex={new_ifindex}");
    eventually(
        "ztunnel knows the new veth",
        Duration::from_secs(10),
        || {
            Ok(zt1.log_text().lines().any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.contains(&pod.as_str()) && fields.contains(&ifindex.as_str())
            }))
        },
    )?;

    let watch = TcpWatch::start(&thief)?;
    conn.write_all(&[2u8; 1000])?;
    let from_client = |seg: &ztunnel_tests::raw::Segment| SocketAddr::V4(seg.src) == client_addr;
    assert!(
        watch
            .wait_for(Duration::from_secs(2), from_client)
            .is_none(),
        "the client's packets reached the pod now at the receiver's old veth"
    );
    Ok(())
}
