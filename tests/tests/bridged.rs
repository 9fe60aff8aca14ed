//! Bridged pod wiring (flannel, the bridge plugin on `cni0`): pods' veths
//! are ports of a bridge and have no host route. Capture sits on the
//! bridge device (a socket assigned on a port is never delivered), the
//! ports check sources and send pod-to-pod TCP up to the bridge. Every path
//! is captured, and a pod cannot use another pod's address.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::Result;
use aya::programs::tc::TcAttachType;
use ztunnel_tests::{
    lab::{self, PodSpec, BRIDGE},
    netns::Netns,
    raw::{double_tagged, send_frames, send_packets, syn, TcpWatch},
    setup::Setup,
    tcx::programs,
    traffic::{request, Server},
    wait::eventually,
    ztunnel::{counters, Counters},
};

const WEB: PodSpec = PodSpec {
    name: "web",
    node: 0,
    ip: Ipv4Addr::new(198, 18, 3, 10),
    enrolled: true,
    service_account: "web",
};
const PEER: PodSpec = PodSpec {
    name: "peer",
    node: 0,
    ip: Ipv4Addr::new(198, 18, 3, 11),
    enrolled: true,
    service_account: "peer",
};
/// On the same bridge, not in the mesh.
const OUTSIDER: PodSpec = PodSpec {
    name: "outsider",
    node: 0,
    ip: Ipv4Addr::new(198, 18, 3, 12),
    enrolled: false,
    service_account: "outsider",
};

/// The MAC address of `eth0` in `ns`.
fn mac_of(ns: &Netns) -> Result<[u8; 6]> {
    let out = ns.ip(&["-j", "link", "show", "eth0"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let text = v[0]["address"].as_str().unwrap_or("");
    let bytes: Vec<u8> = text
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("no MAC address in {text:?}"))
}

/// What the node believes about who has `ip` on the bridge.
fn set_neighbour(node: &Netns, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
    let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    let (ip, mac) = (ip.to_string(), mac.join(":"));
    node.ip(&["neigh", "replace", &ip, "lladdr", &mac, "dev", BRIDGE])?;
    Ok(())
}

fn count(s: &Setup, pod: &PodSpec) -> Result<Counters> {
    Ok(counters(s.lab.node("node1"), pod.ip)?.unwrap_or_default())
}

#[test]
fn bridged_pods_are_captured_on_every_path() -> Result<()> {
    let mut s = Setup::new(&lab::config_yaml_extra(
        &[],
        &[],
        &[WEB, PEER, OUTSIDER],
        "",
    ))?;
    for pod in [WEB, PEER, OUTSIDER] {
        s.lab.add_bridged_pod(pod)?;
    }
    let mut zt1 = s.ztunnel("node1", &[])?;
    let mut zt2 = s.ztunnel("node2", &[])?;
    let ns = s.lab.node("node1").ns.path();
    // The kernel keeps 15 characters of a program's name.
    assert_eq!(
        programs(&ns, BRIDGE, TcAttachType::Ingress)?,
        ["zt_bridge_ingre"]
    );
    for pod in [WEB, PEER, OUTSIDER] {
        let port = format!("vz{}", pod.name);
        assert_eq!(
            programs(&ns, &port, TcAttachType::Ingress)?,
            ["zt_port_ingress"]
        );
        assert_eq!(
            programs(&ns, &port, TcAttachType::Egress)?,
            ["zt_guard_egress"]
        );
    }
    let (web, peer, outsider) = (s.lab.pod("web"), s.lab.pod("peer"), s.lab.pod("outsider"));

    // To another node: through HBONE, with the pod's identity.
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let before = count(&s, &WEB)?;
    let report = request(&web.ns, server.addr, 64 * 1024)?;
    assert_eq!(report.peer.ip(), WEB.ip);
    assert_eq!(
        count(&s, &WEB)?.outbound_captured,
        before.outbound_captured + 1
    );
    zt2.wait_for_log(
        "src_identity=spiffe://cluster.local/ns/default/sa/web",
        Duration::from_secs(5),
    )?;

    // To a pod on the same bridge: frames that would go port to port are
    // sent up to the bridge and captured there.
    let on_peer = Server::start(&peer.ns, peer.addr(8080))?;
    let before = count(&s, &WEB)?;
    let report = request(&web.ns, on_peer.addr, 64 * 1024)?;
    assert_eq!(report.peer.ip(), WEB.ip);
    assert_eq!(
        count(&s, &WEB)?.outbound_captured,
        before.outbound_captured + 1
    );

    // From a pod outside the mesh on the same bridge: inbound capture.
    let before = count(&s, &PEER)?;
    let report = request(&outsider.ns, on_peer.addr, 4096)?;
    assert_eq!(report.peer.ip(), OUTSIDER.ip);
    assert_eq!(
        count(&s, &PEER)?.inbound_captured,
        before.inbound_captured + 1
    );

    // From another node to a bridged pod: captured where it enters.
    let client_pod = s.lab.pod("client");
    let from_far = request(&client_pod.ns, on_peer.addr, 4096)?;
    assert_eq!(from_far.peer.ip(), client_pod.spec.ip);
    zt1.wait_for_log(
        "src_identity=spiffe://cluster.local/ns/default/sa/client",
        Duration::from_secs(5),
    )?;

    // The outsider claims web's address: dropped at its port, counted on web.
    let before = count(&s, &WEB)?;
    let forged = syn(
        SocketAddrV4::new(WEB.ip, 40000),
        SocketAddrV4::new(server_pod.spec.ip, 8080),
        7,
    );
    send_packets(&outsider.ns, vec![forged])?;
    eventually(
        "the forged SYN counted as spoofed",
        Duration::from_secs(2),
        || Ok(count(&s, &WEB)?.dropped_spoofed > before.dropped_spoofed),
    )?;

    // The outsider hides a SYN to peer under two VLAN tags, which the
    // bridge would forward to peer's port and peer's kernel would unwrap:
    // dropped at the outsider's port, it never arrives.
    let watch = TcpWatch::start(&peer.ns)?;
    let hidden = syn(
        SocketAddrV4::new(OUTSIDER.ip, 40001),
        SocketAddrV4::new(PEER.ip, 8080),
        8,
    );
    let frame = double_tagged(mac_of(&peer.ns)?, mac_of(&outsider.ns)?, &hidden);
    send_frames(&outsider.ns, "eth0", vec![frame])?;
    std::thread::sleep(Duration::from_millis(500));
    let arrived = watch.matching(|seg| seg.src.port() == 40001);
    assert!(
        arrived.is_empty(),
        "a VLAN-tagged SYN slipped past capture: {arrived:?}"
    );

    // A restart after the node forgot every neighbour on the bridge (as
    // when the bridge's address changes): the ports the pinned map holds,
    // and ztunnel's own solicitation, keep the pods reachable.
    zt1.stop()?;
    s.lab
        .node("node1")
        .ns
        .ip(&["neigh", "flush", "dev", BRIDGE])?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let report = request(&web.ns, server.addr, 4096)?;
    assert_eq!(report.peer.ip(), WEB.ip);
    request(&web.ns, on_peer.addr, 4096)?;
    Ok(())
}

/// A bridged pod set up through the CNI plugin, on a node whose neighbour
/// entry for its address was forged by another pod (ARP lies are free on a
/// bridge): capture takes the pod's port from the runtime's report, so the
/// pod's traffic flows and the forger cannot use its address.
#[test]
fn the_cni_report_of_a_bridged_pods_veth_beats_a_forged_neighbour_entry() -> Result<()> {
    use ztunnel_tests::{
        apiserver::{api_server, enrolling_ztunnel},
        cni::Call,
    };
    const FRESH: PodSpec = PodSpec {
        name: "fresh",
        node: 0,
        ip: Ipv4Addr::new(198, 18, 3, 20),
        enrolled: false,
        service_account: "fresh",
    };
    let mut s = Setup::new(&lab::config_yaml_extra(&[], &[], &[OUTSIDER], ""))?;
    s.lab.add_bridged_pod(OUTSIDER)?;
    let api = api_server(&s.lab, &[FRESH])?;
    api.set_new_pod("default", &FRESH, &[]);
    let socket = format!("/run/ztunnel/{}-node1.cni.sock", s.lab.prefix);
    let kubeconfig = api.kubeconfig()?;
    let _zt1 = enrolling_ztunnel(&s, "node1", &kubeconfig, &["--cni-socket", &socket])?;
    let mut zt2 = s.ztunnel("node2", &[])?;

    s.lab.add_bridged_pod(FRESH)?;
    // The outsider's lie, as the node would have taken it from its ARP.
    let node1 = &s.lab.node("node1").ns;
    set_neighbour(node1, FRESH.ip, mac_of(&s.lab.pod("outsider").ns)?)?;

    let fresh = s.lab.pod("fresh");
    let mut call = Call::add("default", &FRESH, &socket).for_lab_pod(fresh);
    call.bridge = Some(BRIDGE);
    let out = call.run()?;
    assert!(out.success, "ADD failed: {}", out.stdout);

    // While the node still believes the lie, the forger cannot use the
    // address: the pod's port came from the runtime's report.
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let before = count(&s, &FRESH)?;
    let forged = syn(
        SocketAddrV4::new(FRESH.ip, 40002),
        SocketAddrV4::new(server_pod.spec.ip, 8080),
        9,
    );
    send_packets(&s.lab.pod("outsider").ns, vec![forged])?;
    eventually(
        "the forger's SYN dropped as spoofed",
        Duration::from_secs(2),
        || Ok(count(&s, &FRESH)?.dropped_spoofed > before.dropped_spoofed),
    )?;

    // The pod's own ARP sets the node right (a lie misroutes replies with
    // or without a mesh); its traffic is then captured with its identity.
    set_neighbour(node1, FRESH.ip, mac_of(&fresh.ns)?)?;
    let report = request(&fresh.ns, server.addr, 4096)?;
    assert_eq!(report.peer.ip(), FRESH.ip);
    zt2.wait_for_log(
        "src_identity=spiffe://cluster.local/ns/default/sa/fresh",
        Duration::from_secs(5),
    )?;
    Ok(())
}
