//! ztunnel runs in the node's network namespace, so its TCP ports are open
//! to every node process and hostNetwork pod, and 15020/15021 to every pod.
//! What changes state is reachable only through a root-only Unix socket,
//! and no pod can starve the readiness or metrics port.

use std::{
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use ztunnel_tests::{
    http,
    lab::{self, Node},
    setup::Setup,
};

/// The admin socket of the lab's ztunnel on `node`.
fn admin_socket(node: &Node) -> String {
    format!(
        "/run/ztunnel/{}.admin.sock",
        node.pin_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    )
}

/// Runs curl in `node`'s network namespace, as `uid` (0: root), and returns
/// the HTTP status it got (0 when it could not connect).
fn curl(node: &Node, uid: u32, args: &[&str]) -> Result<u16> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node.ns.path().display()));
    if uid != 0 {
        cmd.args(["--setuid", &uid.to_string(), "--setgid", &uid.to_string()]);
    }
    let out = cmd
        .args([
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .args(args)
        .output()
        .context("running curl")?;
    let code = String::from_utf8_lossy(&out.stdout);
    Ok(code.trim().parse().unwrap_or(0))
}

const NOBODY: u32 = 65534;

/// `POST path` on the admin socket of `node`'s ztunnel, as `uid`.
fn post_to_socket(node: &Node, uid: u32, path: &str) -> Result<u16> {
    let socket = admin_socket(node);
    curl(
        node,
        uid,
        &[
            "--unix-socket",
            &socket,
            "-X",
            "POST",
            &format!("http://localhost{path}"),
        ],
    )
}

#[test]
fn a_host_network_process_cannot_change_ztunnel_state() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let mut zt1 = s.ztunnel("node1", &[])?;
    let node1 = s.lab.node("node1");

    // What every process in the node's namespace can reach: read-only.
    assert_eq!(
        curl(node1, NOBODY, &["http://127.0.0.1:15000/config_dump"])?,
        200
    );
    for (method, path) in [
        ("POST", "/quitquitquit"),
        ("GET", "/logging?level=trace"),
        ("POST", "/logging?level=trace"),
    ] {
        let status = curl(
            node1,
            NOBODY,
            &["-X", method, &format!("http://127.0.0.1:15000{path}")],
        )?;
        assert!(
            (400..500).contains(&status),
            "{method} {path} from an unprivileged process got {status}"
        );
    }
    // The admin socket is root's only.
    assert_eq!(
        post_to_socket(node1, NOBODY, "/quitquitquit")?,
        0,
        "an unprivileged process reached the admin socket"
    );
    std::thread::sleep(Duration::from_millis(500));
    let log = zt1.log_text();
    assert!(
        !log.contains("log filter changed"),
        "the log filter changed:\n{log}"
    );
    assert!(!log.contains("draining"), "ztunnel was stopped:\n{log}");
    let ready = http::get(
        &node1.ns,
        SocketAddr::from((node1.underlay_ip, 15021)),
        "/healthz/ready",
    )?;
    assert_eq!(ready.status, 200);

    // Root, through the socket; a bad filter changes nothing.
    assert_eq!(
        post_to_socket(node1, 0, "/logging?level=not%5Ba%5Bfilter")?,
        400
    );
    assert_eq!(post_to_socket(node1, 0, "/logging?level=debug")?, 200);
    zt1.wait_for_log("log filter changed", Duration::from_secs(5))?;
    assert_eq!(post_to_socket(node1, 0, "/quitquitquit")?, 200);
    let status = zt1.wait_exit(Duration::from_secs(15))?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

#[test]
fn a_pod_holding_idle_connections_cannot_starve_readiness_or_metrics() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let _zt1 = s.ztunnel("node1", &[])?;
    let node1 = s.lab.node("node1");
    let bystander = s.lab.pod("bystander");
    // A pod opens many connections to the node's readiness and metrics
    // ports and never sends a byte.
    let mut held: Vec<TcpStream> = Vec::new();
    for port in [15021u16, 15020] {
        let addr = SocketAddr::from((node1.underlay_ip, port));
        let batch = bystander
            .ns
            .run(move || -> std::io::Result<Vec<TcpStream>> {
                (0..400)
                    .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
                    .collect()
            })??;
        held.extend(batch);
    }
    std::thread::sleep(Duration::from_millis(300));
    // The kubelet's probe and Prometheus's scrape still get answers.
    let ready = http::get(
        &node1.ns,
        SocketAddr::from((node1.underlay_ip, 15021)),
        "/healthz/ready",
    )?;
    assert_eq!(ready.status, 200, "readiness: {}", ready.body);
    let metrics = http::get(
        &node1.ns,
        SocketAddr::from((node1.underlay_ip, 15020)),
        "/metrics",
    )?;
    assert_eq!(metrics.status, 200);
    drop(held);
    Ok(())
}
