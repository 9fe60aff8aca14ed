//! Authorization in the lab: HBONE denials, plaintext dropped in the kernel,
//! dry run, live revocation, and malformed policies.

use std::time::Duration;

use anyhow::Result;
use ztunnel_tests::{
    lab,
    setup::Setup,
    traffic::{request, Connection, Server},
    ztunnel::counters,
};

fn policy(name: &str, action: &str, dry_run: bool, rules: &str) -> String {
    format!("- name: {name}\n  namespace: default\n  scope: Namespace\n  action: {action}\n  dryRun: {dry_run}\n  rules: {rules}\n")
}

const DENY_CLIENT: &str = "[[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]";

#[test]
fn hbone_connection_denied_by_principal() -> Result<()> {
    let s = Setup::new(&lab::config_yaml_with(
        &[],
        &[],
        &format!(
            "policies:\n{}",
            policy("deny-client", "Deny", false, DENY_CLIENT)
        ),
    ))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let mut zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;

    let result = request(&s.lab.pod("client").ns, server.addr, 1024);
    assert!(result.is_err(), "a denied client got through: {result:?}");
    zt2.wait_for_log("CONNECT denied by policy", Duration::from_secs(5))?;
    let log = zt2.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("CONNECT denied by policy")
                && l.contains("policy=default/deny-client")),
        "the denial does not name the policy:\n{log}"
    );
    assert!(
        server.accepted().is_empty(),
        "the denied connection reached the server"
    );
    // The policy names a principal; a plaintext client has none, so it passes.
    let report = request(&s.lab.pod("plain").ns, server.addr, 1024)?;
    assert_eq!(
        report.peer.ip(),
        std::net::IpAddr::V4(s.lab.pod("plain").spec.ip)
    );
    Ok(())
}

/// A lab where every workload in `default` requires a mesh identity.
fn requiring_identity() -> Result<Setup> {
    Setup::new(&lab::config_yaml_with(
        &[],
        &[],
        &format!(
            "policies:\n{}",
            policy(
                "require-mtls",
                "Allow",
                false,
                "[[[{principals: [!Prefix cluster.local/]}]]]"
            )
        ),
    ))
}

#[test]
fn plaintext_denied_in_the_kernel() -> Result<()> {
    let s = requiring_identity()?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let mut zt2 = s.ztunnel("node2", &[])?;
    zt2.wait_for_log("kernel policy tables updated", Duration::from_secs(5))?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let plain = s.lab.pod("plain");
    let node2 = s.lab.node("node2");
    let before = counters(node2, server_pod.spec.ip)?.expect("server has counters");

    let attempt = Connection::open(&plain.ns, server.addr, Duration::from_secs(2));
    assert!(
        attempt.is_err(),
        "a plaintext client reached a workload that requires identity"
    );
    let after = counters(node2, server_pod.spec.ip)?.expect("server has counters");
    assert!(
        after.policy_denied > before.policy_denied,
        "the kernel did not count the drop: {after:?}"
    );
    assert_eq!(
        after.inbound_captured, before.inbound_captured,
        "the SYN reached ztunnel's listener"
    );
    assert!(
        !zt2.log_text().contains(&plain.spec.ip.to_string()),
        "userspace saw the plaintext attempt:\n{}",
        zt2.log_text()
    );
    assert!(server.accepted().is_empty());
    // The enrolled client has an identity and is allowed.
    let report = request(&s.lab.pod("client").ns, server.addr, 1024)?;
    assert_eq!(
        report.peer.ip(),
        std::net::IpAddr::V4(s.lab.pod("client").spec.ip)
    );
    Ok(())
}

#[test]
fn dry_run_deny_only_logs() -> Result<()> {
    let s = Setup::new(&lab::config_yaml_with(
        &[],
        &[],
        &format!("policies:\n{}", policy("audit", "Deny", true, "[[]]")),
    ))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let mut zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    request(&s.lab.pod("client").ns, server.addr, 1024)?;
    // Plaintext too: a workload under a dry-run policy stays out of the
    // kernel fast path so its connections are logged.
    request(&s.lab.pod("plain").ns, server.addr, 1024)?;
    zt2.wait_for_log_count("dry-run: deny policy match", 2, Duration::from_secs(5))?;
    assert!(zt2.log_text().contains("policy=default/audit"));
    Ok(())
}

#[test]
fn live_connection_closed_when_a_policy_forbids_it() -> Result<()> {
    let s = Setup::new(&lab::config_yaml_with(&[], &[], ""))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let mut zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let held = Connection::open(&s.lab.pod("client").ns, server.addr, Duration::from_secs(5))?;
    // Let the tunnel reach the server before the policy arrives.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.accepted().is_empty() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the held connection never reached the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    s.write(&lab::config_yaml_with(
        &[],
        &[],
        &format!(
            "policies:\n{}",
            policy("deny-client", "Deny", false, DENY_CLIENT)
        ),
    ))?;
    zt2.wait_for_log(
        "connection closed: no longer allowed after a policy update",
        Duration::from_secs(10),
    )?;
    let log = zt2.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("no longer allowed after a policy update")
                && l.contains("policy=default/deny-client")),
        "the close does not name the policy:\n{log}"
    );
    assert!(
        held.exchange(1024).is_err(),
        "the revoked connection still works"
    );
    Ok(())
}

#[test]
fn malformed_policy_is_refused_and_the_previous_set_stays() -> Result<()> {
    let good = format!(
        "policies:\n{}",
        policy("deny-client", "Deny", false, DENY_CLIENT)
    );
    let s = Setup::new(&lab::config_yaml_with(&[], &[], &good))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let mut zt2 = s.ztunnel("node2", &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let client = s.lab.pod("client");
    assert!(request(&client.ns, server.addr, 1024).is_err());

    let bad = [
        (
            "[[[{sourcIps: [\"10.0.0.0/8\"]}]]]",
            "policies[0].rules[0][0][0]",
        ),
        (
            "[[[{sourceIps: [\"10.0.0.0/33\"]}]]]",
            "policies[0].rules[0][0][0].sourceIps[0]",
        ),
        (
            "[[[{destinationPorts: [70000]}]]]",
            "policies[0].rules[0][0][0].destinationPorts[0]",
        ),
    ];
    for (n, (rules, field)) in bad.iter().enumerate() {
        // A bad policy that would allow everything if it were taken.
        s.write(&lab::config_yaml_with(
            &[],
            &[],
            &format!("policies:\n{}", policy("broken", "Allow", false, rules)),
        ))?;
        zt2.wait_for_log_count("configuration rejected", n + 1, Duration::from_secs(10))?;
        let log = zt2.log_text();
        let line = log
            .lines()
            .filter(|l| l.contains("configuration rejected"))
            .nth(n)
            .unwrap_or_default();
        assert!(
            line.contains(field),
            "the rejection does not name {field}: {line}"
        );
        assert!(
            request(&client.ns, server.addr, 1024).is_err(),
            "the previous deny stopped applying after {rules}"
        );
    }
    assert!(server.accepted().is_empty());
    Ok(())
}

#[test]
fn kernel_drops_are_described_at_debug_level_only_when_asked() -> Result<()> {
    let s = requiring_identity()?;
    let server_pod = s.lab.pod("server");
    let _server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let plain = s.lab.pod("plain");
    let node2 = s.lab.node("node2");
    let expected = format!(
        "dropped reason=policy src={} dst={}",
        plain.spec.ip,
        server_pod.addr(8080)
    );
    // Asked for: the kernel's drop reasons appear in the log.
    let mut zt2 = ztunnel_tests::ztunnel::Ztunnel::start_env(
        node2,
        &s.config,
        &s.lab.ca_dir,
        &[],
        &[("RUST_LOG", "info,ztunnel::drops=debug")],
    )?;
    zt2.wait_for_log("kernel policy tables updated", Duration::from_secs(5))?;
    assert!(Connection::open(&plain.ns, server_pod.addr(8080), Duration::from_secs(2)).is_err());
    zt2.wait_for_log(&expected, Duration::from_secs(5))?;
    zt2.stop()?;
    // Not asked for (the default): dropped and counted, not described.
    let before = counters(node2, server_pod.spec.ip)?.map(|c| c.policy_denied);
    let mut zt2 = s.ztunnel("node2", &[])?;
    zt2.wait_for_log("kernel policy tables updated", Duration::from_secs(5))?;
    assert!(Connection::open(&plain.ns, server_pod.addr(8080), Duration::from_secs(2)).is_err());
    let after = counters(node2, server_pod.spec.ip)?.map(|c| c.policy_denied);
    assert!(
        after > before,
        "the drop was not counted: {before:?} -> {after:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !zt2.log_text().contains("dropped reason="),
        "drop reasons logged without being asked for:\n{}",
        zt2.log_text()
    );
    Ok(())
}
