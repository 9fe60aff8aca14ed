//! ztunnel joined to a control plane (the repo's, speaking Istio's Delta
//! ADS and CA APIs as istiod does): pushes take effect, outages cost
//! nothing, bad pushes are refused one resource at a time, certificates
//! rotate under traffic, and impostors are turned away on both sides.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use prost::Message;
use ztunnel::{
    config::local::LocalConfig,
    protos::istio::{security as pb_sec, workload as pb},
    xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE},
};
use ztunnel_tests::{
    controlplane::{self, ControlPlane, InProcess},
    http,
    lab::{self, PodSpec},
    setup::Setup,
    traffic::{request, Server, Stream},
    ztunnel::{base_command, counters, Ztunnel},
};

const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
const METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);

/// A pod that exists before the control plane has heard of it.
const LATE: PodSpec = PodSpec {
    name: "late",
    node: 1,
    ip: Ipv4Addr::new(198, 18, 2, 20),
    enrolled: true,
    service_account: "late",
};

fn policy(name: &str, action: &str, rules: &str) -> String {
    format!("- name: {name}\n  namespace: default\n  scope: Namespace\n  action: {action}\n  dryRun: false\n  rules: {rules}\n")
}

fn deny_principal(sa: &str) -> String {
    format!("[[[{{principals: [!Exact cluster.local/ns/default/sa/{sa}]}}]]]")
}

/// The namespace policy `name` denying service account `sa`, as the
/// control plane pushes it.
fn pushed_deny(name: &str, sa: &str) -> Result<prost_types::Any> {
    let config = parse(&lab::config_yaml_with(
        &[],
        &[],
        &format!("policies:\n{}", policy(name, "Deny", &deny_principal(sa))),
    ))?;
    let proto = ztunnel::xds::convert::authorization_to_proto(&config.policies[0]);
    Ok(prost_types::Any {
        type_url: AUTHORIZATION_TYPE.into(),
        value: proto.encode_to_vec(),
    })
}

fn parse(yaml: &str) -> Result<LocalConfig> {
    Ok(LocalConfig::parse(
        yaml,
        std::path::Path::new("pushed.yaml"),
    )?)
}

/// Polls `check` every 20 ms until it holds; returns how long that took.
fn within(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn config_dump(zt_node: &lab::Node) -> Result<serde_json::Value> {
    let r = http::get(&zt_node.ns, ADMIN, "/config_dump")?;
    serde_json::from_str(&r.body).context("config_dump is not JSON")
}

/// Whether the node's ztunnel holds a workload with address `ip`.
fn knows_workload(zt_node: &lab::Node, ip: Ipv4Addr) -> Result<bool> {
    let dump = config_dump(zt_node)?;
    let workloads = dump["workloads"]
        .as_array()
        .context("config_dump has no workloads")?;
    let ip = ip.to_string();
    Ok(workloads.iter().any(|w| {
        w["ips"]
            .as_array()
            .is_some_and(|ips| ips.iter().any(|a| *a == *ip))
    }))
}

/// How many connections to `dst` the access log shows arriving through
/// HBONE.
fn tunnels_to(zt: &Ztunnel, dst: SocketAddr) -> usize {
    zt.log_text()
        .lines()
        .filter(|l| {
            l.contains("connection complete")
                && l.contains("direction=\"inbound\"")
                && l.contains(&format!("dst={dst} "))
                && l.contains("path=\"hbone\"")
        })
        .count()
}

#[test]
fn pushed_workloads_and_policies_take_effect_within_a_second() -> Result<()> {
    let mut s = Setup::new(&lab::config_yaml(&[]))?;
    s.lab.add_extra_pod(LATE)?;
    let cp = InProcess::start(&s.lab, &s.config)?;
    let _zt1 = controlplane::ztunnel(&s.lab, cp.address, "node1", &[], &[])?;
    let mut zt2 = controlplane::ztunnel(&s.lab, cp.address, "node2", &[], &[])?;
    let late = s.lab.pod("late");
    let server = Server::start(&late.ns, late.addr(8080))?;
    let client = &s.lab.pod("client").ns;

    // Unknown to the mesh: plain TCP, no capture on its side.
    request(client, server.addr, 1024)?;
    assert_eq!(tunnels_to(&zt2, server.addr), 0);
    assert!(counters(s.lab.node("node2"), LATE.ip)?.is_none());

    // The workload appears: from the push on, the client reaches it
    // through the tunnel, and its node captures it.
    let with_late = lab::config_yaml_extra(&[], &[], &[LATE], "");
    cp.control_plane.update(parse(&with_late)?);
    let took_workload = within(
        Duration::from_secs(1),
        "traffic to a pushed workload goes through HBONE",
        || Ok(request(client, server.addr, 1024).is_ok() && tunnels_to(&zt2, server.addr) > 0),
    )
    .with_context(|| format!("node2's log:\n{}", zt2.log_text()))?;
    assert!(
        counters(s.lab.node("node2"), LATE.ip)?.is_some(),
        "the pushed workload is not enrolled"
    );

    // A policy appears: the client is refused from the push on.
    let denied = lab::config_yaml_extra(
        &[],
        &[],
        &[LATE],
        &format!(
            "policies:\n{}",
            policy("deny-client", "Deny", &deny_principal("client"))
        ),
    );
    cp.control_plane.update(parse(&denied)?);
    let took_policy = within(Duration::from_secs(1), "a pushed policy denies", || {
        Ok(request(client, server.addr, 1024).is_err())
    })?;
    zt2.wait_for_log("policy=default/deny-client", Duration::from_secs(2))
        .context("the refusal is not the pushed policy's")?;
    let dump = config_dump(s.lab.node("node2"))?;
    assert_eq!(dump["policies"][0]["name"], "deny-client", "{dump:#}");

    // Removals apply too: the policy goes, then the workload.
    cp.control_plane.update(parse(&with_late)?);
    let took_policy_removal = within(
        Duration::from_secs(1),
        "a removed policy stops denying",
        || Ok(request(client, server.addr, 1024).is_ok()),
    )?;
    cp.control_plane.update(parse(&lab::config_yaml(&[]))?);
    // Both nodes must have applied the removal: until the client's node
    // has, it still tunnels to the workload, and node2, which no longer
    // serves it, refuses the tunnel (pushes to two nodes land apart).
    let took_removal = within(
        Duration::from_secs(1),
        "a removed workload leaves capture",
        || {
            Ok(counters(s.lab.node("node2"), LATE.ip)?.is_none()
                && !knows_workload(s.lab.node("node1"), LATE.ip)?)
        },
    )?;
    let tunnels = tunnels_to(&zt2, server.addr);
    request(client, server.addr, 1024)?;
    assert_eq!(
        tunnels_to(&zt2, server.addr),
        tunnels,
        "a removed workload still gets tunnels"
    );
    eprintln!(
        "push to effect: workload {took_workload:?}, policy {took_policy:?}, policy removal {took_policy_removal:?}, workload removal {took_removal:?}"
    );

    // What the admin shows: the stream, both types acknowledged, and the
    // certificates the control plane issued.
    let dump = config_dump(s.lab.node("node2"))?;
    let xds = &dump["source"]["xds"];
    assert_eq!(xds["connected"], true, "{xds:#}");
    assert_eq!(xds["complete"], true, "{xds:#}");
    for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let t = &xds["types"][type_url];
        assert!(
            t["last_ack"].is_string(),
            "{type_url} never acknowledged: {xds:#}"
        );
        assert!(t["last_nack"].is_null(), "{type_url} refused: {xds:#}");
    }
    assert_eq!(xds["types"][AUTHORIZATION_TYPE]["resources"], 0, "{xds:#}");
    let certs = dump["certificates"].as_array().context("no certificates")?;
    let server_cert = certs
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/default/sa/server")
        .with_context(|| format!("no certificate for the server: {certs:#?}"))?;
    assert!(server_cert["serial"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(server_cert["expires_in_seconds"]
        .as_i64()
        .is_some_and(|s| s > 0));
    let metrics = http::get(&s.lab.node("node2").ns, METRICS, "/metrics")?.body;
    let pushes = http::sample(
        &metrics,
        "istio_xds_message_total",
        &[("url", ADDRESS_TYPE)],
    );
    // The first push, the workload's arrival and its removal.
    assert!(
        pushes.is_some_and(|n| n >= 3.0),
        "istio_xds_message_total: {pushes:?}\n{metrics}"
    );
    Ok(())
}

#[test]
fn an_outage_of_the_control_plane_costs_nothing() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut cp = ControlPlane::start(&s.lab, &s.config, &[])?;
    let mut zt1 = controlplane::ztunnel(&s.lab, cp.address, "node1", &[], &[])?;
    let mut zt2 = controlplane::ztunnel(&s.lab, cp.address, "node2", &[], &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let before = config_dump(s.lab.node("node1"))?;

    let stream = Stream::start(&s.lab.pod("client").ns, server.addr, 4096);
    std::thread::sleep(Duration::from_secs(1));
    cp.kill();
    zt1.wait_for_log("xDS stream ended", Duration::from_secs(5))?;
    zt2.wait_for_log("xDS stream ended", Duration::from_secs(5))?;
    // While it is down, a workload goes away: the reconnect must remove it.
    let mut without_bystander = String::from("workloads:\n");
    for spec in lab::PODS.iter().filter(|p| p.name != "bystander") {
        without_bystander.push_str(&lab::workload_yaml(spec, spec.enrolled, ""));
    }
    s.write(&without_bystander)?;
    std::thread::sleep(Duration::from_secs(10));
    let during = config_dump(s.lab.node("node1"))?;
    assert_eq!(during["source"]["xds"]["connected"], false);
    assert_eq!(
        during["workloads"], before["workloads"],
        "workloads lost in the outage"
    );
    cp.restart()?;
    // Backoff grows to a few seconds over a 10 s outage.
    zt1.wait_for_log_count("xDS stream open", 2, Duration::from_secs(30))?;
    zt2.wait_for_log_count("xDS stream open", 2, Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(1));
    let connections = stream.finish_unbroken("through a 10 s control plane outage", 50)?;
    eprintln!("{connections} connections through a 10 s control plane outage, none failed");

    // The reconnect named what was held: only the removal was sent.
    for zt in [&zt1, &zt2] {
        let log = zt.log_text();
        let after_reconnect: Vec<&str> = log
            .lines()
            .skip_while(|l| !l.contains("xDS stream ended"))
            .filter(|l| l.contains("xDS push applied"))
            .collect();
        let pushed = |kind: &str| {
            after_reconnect
                .iter()
                .filter(|l| l.contains(&format!("type_url={kind} ")))
                .copied()
                .collect::<Vec<_>>()
        };
        assert!(
            pushed("Address")
                .iter()
                .any(|l| l.contains("resources=0") && l.contains("removed=1")),
            "the reconnect did not remove what went away:\n{}",
            after_reconnect.join("\n")
        );
        assert!(
            after_reconnect.iter().all(|l| l.contains("resources=0")),
            "the reconnect re-sent resources the node held:\n{}",
            after_reconnect.join("\n")
        );
        assert!(!pushed("Authorization").is_empty(), "{log}");
    }
    let after = config_dump(s.lab.node("node1"))?;
    assert_eq!(after["source"]["xds"]["connected"], true);
    let names = |dump: &serde_json::Value| -> Vec<String> {
        dump["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w["name"].as_str().map(str::to_string))
            .collect()
    };
    let mut expected = names(&before);
    expected.retain(|n| n != "bystander");
    assert_eq!(names(&after), expected, "the removal made in the outage");
    let metrics = http::get(&s.lab.node("node1").ns, METRICS, "/metrics")?.body;
    assert!(
        http::sample(&metrics, "istio_xds_connection_terminations_total", &[])
            .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );

    // And the stream is live: a change made after the outage arrives.
    s.write(&lab::config_yaml_with(
        &[],
        &[],
        &format!(
            "policies:\n{}",
            policy("deny-client", "Deny", &deny_principal("client"))
        ),
    ))?;
    within(
        Duration::from_secs(5),
        "a policy pushed after the outage applies",
        || Ok(request(&s.lab.pod("client").ns, server.addr, 1024).is_err()),
    )?;
    Ok(())
}

/// A policy no ztunnel can enforce: a port that does not exist.
fn bad_policy(name: &str) -> prost_types::Any {
    let policy = pb_sec::Authorization {
        name: name.into(),
        namespace: "default".into(),
        scope: pb_sec::Scope::Namespace as i32,
        action: pb_sec::Action::Deny as i32,
        rules: vec![pb_sec::Rule {
            clauses: vec![pb_sec::Clause {
                matches: vec![pb_sec::Match {
                    destination_ports: vec![70000],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    prost_types::Any {
        type_url: AUTHORIZATION_TYPE.into(),
        value: policy.encode_to_vec(),
    }
}

/// A workload whose address is three bytes long.
fn bad_workload(uid: &str) -> prost_types::Any {
    let workload = pb::Workload {
        uid: uid.into(),
        name: "broken".into(),
        namespace: "default".into(),
        addresses: vec![vec![198, 18, 2]],
        ..Default::default()
    };
    prost_types::Any {
        type_url: ADDRESS_TYPE.into(),
        value: pb::Address {
            r#type: Some(pb::address::Type::Workload(workload)),
        }
        .encode_to_vec(),
    }
}

#[test]
fn a_bad_push_is_refused_by_name_and_the_rest_applies() -> Result<()> {
    // The neighbor is denied; the client is not (yet).
    let s = Setup::new(&lab::config_yaml_with(
        &[],
        &[],
        &format!(
            "policies:\n{}",
            policy("deny-neighbor", "Deny", &deny_principal("neighbor"))
        ),
    ))?;
    let cp = InProcess::start(&s.lab, &s.config)?;
    let _zt1 = controlplane::ztunnel(&s.lab, cp.address, "node1", &[], &[])?;
    let mut zt2 = controlplane::ztunnel(&s.lab, cp.address, "node2", &[], &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let (client, neighbor) = (&s.lab.pod("client").ns, &s.lab.pod("neighbor").ns);
    request(client, server.addr, 1024)?;
    assert!(request(neighbor, server.addr, 1024).is_err());

    // One push: a broken version of the neighbor's policy, a broken
    // workload, and a good new policy that denies the client.
    let good = pushed_deny("deny-client", "client")?;
    cp.control_plane.inject_all(vec![
        ("default/deny-neighbor".into(), bad_policy("deny-neighbor")),
        (
            "lab//v1/Pod/default/broken".into(),
            bad_workload("lab//v1/Pod/default/broken"),
        ),
        ("default/deny-client".into(), good),
    ]);
    zt2.wait_for_log_count(
        "NACK: a pushed resource was refused",
        2,
        Duration::from_secs(5),
    )?;
    let log = zt2.log_text();
    let nacks: Vec<&str> = log.lines().filter(|l| l.contains("NACK")).collect();
    assert!(
        nacks
            .iter()
            .any(|l| l.contains("default/deny-neighbor") && l.contains("70000")),
        "the policy NACK does not name the resource and the reason:\n{}",
        nacks.join("\n")
    );
    assert!(
        nacks
            .iter()
            .any(|l| l.contains("lab//v1/Pod/default/broken") && l.contains("address")),
        "the workload NACK does not name the resource and the reason:\n{}",
        nacks.join("\n")
    );

    // The good part applied, the old version of the bad one holds.
    within(
        Duration::from_secs(1),
        "the good policy of a NACKed push applies",
        || Ok(request(client, server.addr, 1024).is_err()),
    )?;
    zt2.wait_for_log("policy=default/deny-client", Duration::from_secs(2))?;
    let neighbor_denials = || {
        zt2.log_text()
            .matches("policy=default/deny-neighbor")
            .count()
    };
    let before = neighbor_denials();
    assert!(
        request(neighbor, server.addr, 1024).is_err(),
        "the previous version of a refused policy stopped holding"
    );
    within(
        Duration::from_secs(2),
        "the old version of the refused policy denies",
        || Ok(neighbor_denials() > before),
    )?;
    let dump = config_dump(s.lab.node("node2"))?;
    let names: Vec<&str> = dump["policies"]
        .as_array()
        .context("policies")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["deny-client", "deny-neighbor"], "{dump:#}");
    let nack = &dump["source"]["xds"]["types"][AUTHORIZATION_TYPE]["last_nack"];
    assert!(
        nack["error"]
            .as_str()
            .is_some_and(|e| e.contains("default/deny-neighbor")),
        "config_dump does not show the NACK: {nack:#}"
    );
    let workloads = dump["workloads"].as_array().context("workloads")?;
    assert!(
        !workloads.iter().any(|w| w["name"] == "broken"),
        "a refused workload made it into the state: {workloads:#?}"
    );

    // The control plane heard the refusal, from that node, with the reason.
    let rejections = cp.control_plane.rejections.list();
    assert!(
        rejections.iter().any(|r| r.node == "node2"
            && r.type_url == AUTHORIZATION_TYPE
            && r.error.contains("default/deny-neighbor")),
        "the control plane did not record the NACK: {rejections:?}"
    );
    Ok(())
}

#[test]
fn a_new_policy_that_cannot_be_enforced_fails_closed() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let cp = InProcess::start(&s.lab, &s.config)?;
    let _zt1 = controlplane::ztunnel(&s.lab, cp.address, "node1", &[], &[])?;
    let mut zt2 = controlplane::ztunnel(&s.lab, cp.address, "node2", &[], &[])?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let (client, plain) = (&s.lab.pod("client").ns, &s.lab.pod("plain").ns);
    request(client, server.addr, 1024)?;
    request(plain, server.addr, 1024)?;

    // A Deny this node cannot enforce as written. Left out, it would deny
    // nothing; in its place stands one that denies its whole scope.
    cp.control_plane
        .inject("default/deny-unreadable", bad_policy("deny-unreadable"));
    zt2.wait_for_log("fail-closed stand-in", Duration::from_secs(5))?;
    within(Duration::from_secs(1), "the stand-in denies HBONE", || {
        Ok(request(client, server.addr, 1024).is_err())
    })?;
    zt2.wait_for_log("policy=default/deny-unreadable", Duration::from_secs(2))?;
    assert!(
        request(plain, server.addr, 1024).is_err(),
        "the stand-in let plaintext through"
    );

    // A valid version replaces it (it denies only the neighbor).
    let fixed = pushed_deny("deny-unreadable", "neighbor")?;
    cp.control_plane.inject("default/deny-unreadable", fixed);
    within(
        Duration::from_secs(1),
        "a valid version replaces the stand-in",
        || Ok(request(client, server.addr, 1024).is_ok()),
    )?;
    assert!(request(&s.lab.pod("neighbor").ns, server.addr, 1024).is_err());
    Ok(())
}

#[test]
fn certificates_rotate_under_traffic_without_a_failed_connection() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let cp = ControlPlane::start(&s.lab, &s.config, &[])?;
    let ttl = [("SECRET_TTL", "0h0m8s")];
    let mut zt1 = controlplane::ztunnel(&s.lab, cp.address, "node1", &[], &ttl)?;
    let mut zt2 = controlplane::ztunnel(&s.lab, cp.address, "node2", &[], &ttl)?;
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;

    let stream = Stream::start(&s.lab.pod("client").ns, server.addr, 4096);
    // Renewal at about half of 8 s: three rotations take some 15 s; the
    // pooled tunnels outlive the certificates they were opened with.
    zt1.wait_for_log_count("certificate rotated", 3, Duration::from_secs(40))?;
    zt2.wait_for_log_count("certificate rotated", 3, Duration::from_secs(40))?;
    // Those rotations may be of other identities of the node: traffic
    // goes on until the client's own certificates have rotated into use
    // (checked below), or the deadline passes.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while tunnel_serials(&zt1).len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let connections = stream.finish_unbroken("across certificate rotations", 50)?;
    for zt in [&zt1, &zt2] {
        let log = zt.log_text();
        assert!(!log.contains("certificate request failed"), "{log}");
        assert!(!log.contains("expired"), "{log}");
    }
    // The new certificates were used, not only fetched: tunnels opened
    // with at least three of the client's.
    let serials = tunnel_serials(&zt1);
    assert!(
        serials.len() >= 3,
        "tunnels were opened with only {} certificate(s): {serials:?}",
        serials.len()
    );
    let signed = cp.log_text().matches("certificate signed").count();
    assert!(
        signed >= 8,
        "the control plane signed only {signed} certificates"
    );
    eprintln!("{connections} connections across {signed} signed certificates, none failed");
    Ok(())
}

/// The serials of the certificates `zt`'s HBONE tunnels were opened with.
fn tunnel_serials(zt: &ztunnel_tests::ztunnel::Ztunnel) -> std::collections::BTreeSet<String> {
    zt.log_text()
        .lines()
        .filter(|l| l.contains("HBONE connection established"))
        .filter_map(|l| l.split("cert_serial=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// A lab with the standard configuration, served by a control plane.
fn lab_and_control_plane() -> Result<(Setup, ControlPlane)> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let cp = ControlPlane::start(&s.lab, &s.config, &[])?;
    Ok((s, cp))
}

/// Starts node1's ztunnel against `cp`, with `overrides` of its
/// environment; does not wait for it to be ready (it may never be).
fn node1_with(s: &Setup, cp: &ControlPlane, overrides: &[(&str, &str)]) -> Result<Ztunnel> {
    let node1 = s.lab.node("node1");
    controlplane::spawn(&s.lab, cp.address, "node1", base_command(node1)?, overrides)?.start()
}

#[test]
fn a_node_with_a_wrong_token_is_refused_on_both_sides() -> Result<()> {
    let (s, cp) = lab_and_control_plane()?;
    let wrong = std::env::temp_dir().join(format!("{}-wrong.token", s.lab.prefix));
    std::fs::write(&wrong, "not-the-token")?;
    let wrong_path = wrong.display().to_string();
    let mut zt = node1_with(&s, &cp, &[("AUTH_TOKEN", &wrong_path)])?;
    zt.wait_for_log("refused this node", Duration::from_secs(10))?;
    let _ = std::fs::remove_file(&wrong);
    let log = zt.log_text();
    assert!(
        log.contains("AUTH_TOKEN"),
        "the refusal does not say what to check:\n{log}"
    );
    assert!(
        !s.lab.node("node1").pin_dir.exists(),
        "a refused node touched the kernel:\n{log}"
    );
    cp.wait_for_log("refused a node", Duration::from_secs(5))?;
    assert!(cp.log_text().contains("unknown token"), "{}", cp.log_text());
    Ok(())
}

#[test]
fn a_control_plane_with_a_foreign_root_is_refused_on_both_sides() -> Result<()> {
    let (s, cp) = lab_and_control_plane()?;
    let foreign = std::env::temp_dir().join(format!("{}-foreign-ca", s.lab.prefix));
    ztunnel::identity::ca::generate_dev_root(&foreign)?;
    let root = foreign.join("root-cert.pem").display().to_string();
    let mut zt = node1_with(&s, &cp, &[("XDS_ROOT_CA", &root), ("CA_ROOT_CA", &root)])?;
    let waited = zt.wait_for_log("xDS stream ended", Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&foreign);
    waited?;
    let log = zt.log_text();
    assert!(
        log.lines().any(|l| l.contains("xDS stream ended")
            && l.contains("invalid peer certificate")
            && l.contains("XDS_ROOT_CA")),
        "the refusal does not say the server's certificate is not trusted:\n{log}"
    );
    cp.wait_for_log("TLS handshake failed", Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn a_node_asking_for_another_nodes_identity_is_refused_on_both_sides() -> Result<()> {
    let (s, cp) = lab_and_control_plane()?;
    // node1's token, claiming to be node2: it would serve node2's server.
    let node1 = s.lab.node("node1");
    let mut cmd = node1.ns.command(ztunnel_tests::ztunnel::binary()?);
    cmd.arg("--node-name")
        .arg("node2")
        .arg("--bpf-pin-dir")
        .arg(&node1.pin_dir)
        .env("RUST_LOG", "info");
    let mut zt = controlplane::spawn(&s.lab, cp.address, "node1", cmd, &[])?.start()?;
    zt.wait_for_log("certificate request failed", Duration::from_secs(20))?;
    let log = zt.log_text();
    assert!(
        log.lines().any(|l| l.contains("certificate request failed")
            && l.contains("spiffe://cluster.local/ns/default/sa/server")
            && l.contains("PermissionDenied")),
        "the refusal does not name the identity and the reason:\n{log}"
    );
    cp.wait_for_log("certificate refused", Duration::from_secs(5))?;
    let cp_log = cp.log_text();
    assert!(
        cp_log.lines().any(|l| l.contains("certificate refused")
            && l.contains("node1")
            && l.contains("sa/server")),
        "{cp_log}"
    );
    assert!(!cp_log
        .lines()
        .any(|l| l.contains("certificate signed") && l.contains("sa/server")));
    Ok(())
}

#[test]
fn a_node_with_a_control_plane_refuses_to_hold_a_ca_key() -> Result<()> {
    let (s, cp) = lab_and_control_plane()?;
    let node1 = s.lab.node("node1");
    let mut cmd = base_command(node1)?;
    cmd.arg("--ca-dir").arg(&s.lab.ca_dir);
    let mut zt = controlplane::spawn(&s.lab, cp.address, "node1", cmd, &[])?.start()?;
    let status = zt.wait_exit(Duration::from_secs(10))?;
    assert!(!status.success());
    let log = zt.log_text();
    assert!(
        log.contains("must not hold a CA key"),
        "the refusal does not say why:\n{log}"
    );
    assert!(!node1.pin_dir.exists(), "a refused start left pins behind");
    Ok(())
}
