//! Traffic that reaches an enrolled pod through the node's own NAT: a
//! Kubernetes service through kube-proxy, a NodePort, a hostPort. The
//! destination is rewritten after the TC programs have seen the packet, so
//! capture cannot take it at ingress; the catch-all route delivers it to
//! ztunnel instead of forwarding it past the mesh.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use ztunnel_tests::{
    lab::{self, Node},
    netns::run,
    setup::Setup,
    traffic::{Connection, Server},
    ztunnel::ztunnel_owns,
};

/// Rewrites TCP to `from` into `to` at `node`'s prerouting, as kube-proxy
/// does for a service (the rules go with the node's namespace).
fn dnat(node: &Node, from: SocketAddr, to: SocketAddr) -> Result<()> {
    let nft = |args: &str| run(node.ns.command("nft").args(args.split(' ')));
    nft("add table ip ztlab")?;
    nft("add chain ip ztlab pre { type nat hook prerouting priority dstnat ; }")?;
    nft(&format!(
        "add rule ip ztlab pre ip daddr {} tcp dport {} dnat to {to}",
        from.ip(),
        from.port()
    ))?;
    Ok(())
}

#[test]
fn a_service_address_rewritten_on_the_node_is_captured() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let node1 = s.lab.node("node1");
    let neighbor = s.lab.pod("neighbor");
    let server = Server::start(&neighbor.ns, neighbor.addr(8080))?;
    let vip = SocketAddr::from(([198, 18, 100, 7], 80));
    dnat(node1, vip, server.addr)?;

    // An unenrolled pod on the same node, through the "service".
    let bystander = s.lab.pod("bystander");
    let conn = Connection::open(&bystander.ns, vip, Duration::from_secs(5))?;
    assert!(
        ztunnel_owns(node1, server.addr, bystander.spec.ip)?,
        "the DNAT'ed connection went past ztunnel"
    );
    let report = conn.exchange(64 * 1024)?;
    assert_eq!(report.peer.ip(), std::net::IpAddr::V4(bystander.spec.ip));
    Ok(())
}

#[test]
fn a_nodeport_from_another_node_is_captured_and_policed() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let node1 = s.lab.node("node1");
    let client = s.lab.pod("client");
    let server = Server::start(&client.ns, client.addr(8080))?;
    let node_port = SocketAddr::from((node1.underlay_ip, 30080));
    dnat(node1, node_port, server.addr)?;

    let plain = s.lab.pod("plain");
    let conn = Connection::open(&plain.ns, node_port, Duration::from_secs(5))?;
    assert!(
        ztunnel_owns(node1, server.addr, plain.spec.ip)?,
        "the NodePort connection went past ztunnel"
    );
    conn.exchange(64 * 1024)?;

    // A policy that requires a mesh identity now refuses it.
    s.write(&lab::config_yaml_with(
        &[],
        &[],
        "policies:\n- name: require-mtls\n  namespace: default\n  scope: Namespace\n  action: Allow\n  dryRun: false\n  rules: [[[{principals: [!Prefix cluster.local/]}]]]\n",
    ))?;
    zt1.wait_for_log(
        "kernel policy tables updated entries",
        Duration::from_secs(10),
    )?;
    zt1.wait_for_log_count("kernel policy tables updated", 2, Duration::from_secs(10))?;
    let accepted = server.accepted().len();
    let denied = Connection::open(&plain.ns, node_port, Duration::from_secs(2))
        .and_then(|c| c.exchange(1024));
    assert!(
        denied.is_err(),
        "a plaintext NodePort connection got past the policy"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        server.accepted().len(),
        accepted,
        "the server saw the denied connection"
    );
    Ok(())
}
