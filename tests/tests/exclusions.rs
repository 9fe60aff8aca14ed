//! Per-pod outbound exclusions, enforced by the kernel programs: a pod that
//! opts a port or an address range out of capture reaches it directly, the
//! flows are counted, other pods are unaffected, and an exclusion never
//! lets a pod reach another enrolled pod of its node past capture.

use std::time::Duration;

use anyhow::Result;
use ztunnel_tests::{
    apiserver::{api_server, enrolling_ztunnel},
    lab,
    setup::Setup,
    traffic::{request, Server},
    wait::eventually,
    ztunnel::{counters, Counters},
};

const EXCLUDE_PORTS: &str = "traffic.ztunnel.dev/excludeOutboundPorts";
const EXCLUDE_RANGES: &str = "traffic.ztunnel.dev/excludeOutboundIPRanges";

/// The lab's configuration with `client` excluding port 9000 and `plain`'s
/// address (both on node2).
fn config_with_exclusions(exclusions: &str) -> String {
    let client = "  workloadIps: [\"198.18.1.10\"]\n";
    let yaml = lab::config_yaml(&[]);
    assert!(yaml.contains(client));
    yaml.replacen(
        client,
        &format!("{client}  captureExclusions: {exclusions}\n"),
        1,
    )
}

fn client_counters(s: &Setup) -> Result<Counters> {
    counters(s.lab.node("node1"), s.lab.pod("client").spec.ip)?
        .ok_or_else(|| anyhow::anyhow!("client is not enrolled"))
}

#[test]
fn excluded_destinations_bypass_capture_and_are_counted() -> Result<()> {
    let s = Setup::new(&config_with_exclusions(
        "{outboundPorts: [9000], outboundIpRanges: [\"198.18.2.11/32\"]}",
    ))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let on_9000 = Server::start(&server_pod.ns, server_pod.addr(9000))?;
    let on_8080 = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let plain_pod = s.lab.pod("plain");
    let on_plain = Server::start(&plain_pod.ns, plain_pod.addr(8080))?;
    let neighbor_pod = s.lab.pod("neighbor");
    let on_neighbor = Server::start(&neighbor_pod.ns, neighbor_pod.addr(9000))?;
    let client = s.lab.pod("client");

    let before = client_counters(&s)?;
    // The excluded port: straight to the destination, not through node1's
    // ztunnel (node2's still judges it as a plaintext arrival).
    let report = request(&client.ns, on_9000.addr, 4096)?;
    assert_eq!(report.peer.ip(), client.spec.ip);
    let after_port = client_counters(&s)?;
    assert_eq!(after_port.outbound_excluded, before.outbound_excluded + 1);
    assert_eq!(after_port.outbound_captured, before.outbound_captured);

    // The excluded range.
    request(&client.ns, on_plain.addr, 4096)?;
    let after_range = client_counters(&s)?;
    assert_eq!(after_range.outbound_excluded, before.outbound_excluded + 2);
    assert_eq!(after_range.outbound_captured, before.outbound_captured);

    // Any other port is captured as before.
    request(&client.ns, on_8080.addr, 4096)?;
    let after_other = client_counters(&s)?;
    assert_eq!(after_other.outbound_captured, before.outbound_captured + 1);

    // An enrolled pod of the same node is never excluded, even on the
    // excluded port: policy still applies (here it allows, so the kernel
    // passes the flow as a same-node mesh connection, not as excluded).
    request(&client.ns, on_neighbor.addr, 4096)?;
    let after_neighbor = client_counters(&s)?;
    assert_eq!(
        after_neighbor.outbound_excluded,
        before.outbound_excluded + 2
    );
    assert_eq!(
        after_neighbor.outbound_direct + after_neighbor.outbound_captured,
        before.outbound_direct + before.outbound_captured + 2
    );
    assert_eq!(after_neighbor.outbound_direct, before.outbound_direct + 1);

    // Another pod's flows to the same port are captured: exclusions are
    // per pod.
    let n_before = counters(s.lab.node("node1"), neighbor_pod.spec.ip)?.unwrap_or_default();
    request(&neighbor_pod.ns, on_9000.addr, 4096)?;
    let n_after = counters(s.lab.node("node1"), neighbor_pod.spec.ip)?.unwrap_or_default();
    assert_eq!(n_after.outbound_captured, n_before.outbound_captured + 1);
    assert_eq!(n_after.outbound_excluded, 0);

    // Taking the exclusion away captures the port again.
    s.write(&lab::config_yaml(&[]))?;
    eventually("port 9000 captured again", Duration::from_secs(5), || {
        let c = client_counters(&s)?;
        request(&client.ns, on_9000.addr, 64)?;
        Ok(client_counters(&s)?.outbound_captured > c.outbound_captured)
    })?;
    Ok(())
}

#[test]
fn a_pods_annotations_set_its_exclusions_and_bad_ones_are_refused() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let api = api_server(&s.lab, &[])?;
    let kubeconfig = api.kubeconfig()?;
    let mut zt1 = enrolling_ztunnel(&s, "node1", &kubeconfig, &[])?;
    let _zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let on_9000 = Server::start(&server_pod.ns, server_pod.addr(9000))?;
    let bystander = s.lab.pod("bystander");
    let count = || -> Result<Counters> {
        Ok(counters(s.lab.node("node1"), bystander.spec.ip)?.unwrap_or_default())
    };
    eventually(
        "bystander enrolled from the API",
        Duration::from_secs(5),
        || Ok(counters(s.lab.node("node1"), bystander.spec.ip)?.is_some()),
    )?;

    // A typo is refused by name and leaves everything captured.
    api.annotate("bystander", EXCLUDE_PORTS, Some("9000,postgres"));
    zt1.wait_for_log("`postgres` is not a port", Duration::from_secs(5))?;
    let before = count()?;
    request(&bystander.ns, on_9000.addr, 64)?;
    assert_eq!(count()?.outbound_captured, before.outbound_captured + 1);

    api.annotate("bystander", EXCLUDE_PORTS, Some("9000"));
    api.annotate("bystander", EXCLUDE_RANGES, Some("192.0.2.0/24"));
    eventually(
        "port 9000 excluded from the annotation",
        Duration::from_secs(5),
        || {
            let c = count()?;
            request(&bystander.ns, on_9000.addr, 64)?;
            Ok(count()?.outbound_excluded > c.outbound_excluded)
        },
    )?;
    Ok(())
}
