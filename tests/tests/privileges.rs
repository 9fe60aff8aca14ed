//! What ztunnel needs from the kernel, as the DaemonSet grants it: root with
//! only the capabilities `deploy/kubernetes/daemonset.yaml` adds (read from
//! that file), and `/proc/sys` read-only, as a container that is not
//! privileged sees it. With that much the mesh works; with less it refuses
//! to start and says why.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result};
use ztunnel_tests::{
    lab::{self, Node},
    setup::Setup,
    traffic::{request, Server},
    ztunnel::{binary, Ztunnel},
};

/// The capabilities the shipped DaemonSet grants, as a `setpriv` bounding
/// set (`+net_admin,+bpf,+perfmon`); it must drop every other and not be
/// privileged.
fn daemonset_capabilities() -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/daemonset.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let daemonset: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let context = &daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(
        context["privileged"],
        serde_yaml::Value::Bool(false),
        "{context:?}"
    );
    let drop: Vec<&str> = context["capabilities"]["drop"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(drop, ["ALL"]);
    let add: Vec<String> = context["capabilities"]["add"]
        .as_sequence()
        .context("no capabilities added")?
        .iter()
        .filter_map(|c| c.as_str())
        .map(|c| format!("+{}", c.to_ascii_lowercase()))
        .collect();
    Ok(add.join(","))
}

/// ztunnel for `node`, confined as a container is: a mount namespace of its
/// own whose `/proc/sys` is read-only, and a bounding set of `capabilities`
/// (so root has those and no others).
fn confined(node: &Node, config: &Path, ca_dir: &Path, capabilities: &str) -> Result<Command> {
    let mut cmd = node.ns.command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && \
             exec setpriv --bounding-set=\"-all,$0\" -- \"$@\"",
        )
        .arg(capabilities)
        .arg(binary()?)
        .arg("--config")
        .arg(config)
        .arg("--ca-dir")
        .arg(ca_dir)
        .arg("--node-name")
        .arg(node.name)
        .arg("--bpf-pin-dir")
        .arg(&node.pin_dir)
        .env("RUST_LOG", "info");
    Ok(cmd)
}

fn src_valid_mark(node: &Node, veth: &str) -> Result<String> {
    let out = node
        .ns
        .command("cat")
        .arg(format!("/proc/sys/net/ipv4/conf/{veth}/src_valid_mark"))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn the_mesh_runs_with_the_daemonsets_capabilities_and_a_read_only_proc_sys() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let client = s.lab.pod("client");
    assert_eq!(src_valid_mark(s.lab.node("node1"), &client.veth)?, "0");
    let mut ztunnels = Vec::new();
    for node in ["node1", "node2"] {
        let n = s.lab.node(node);
        let cmd = confined(n, &s.config, &s.lab.ca_dir, &daemonset_capabilities()?)?;
        ztunnels.push(Ztunnel::spawn_command(n, cmd, &[], &[])?.ready()?);
    }
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    let report = request(&client.ns, server.addr, 64 * 1024)?;
    assert_eq!(report.peer.ip(), std::net::IpAddr::V4(client.spec.ip));
    ztunnels[1].wait_for_log("path=\"hbone\"", Duration::from_secs(5))?;
    // Set over netlink: /proc/sys could not have been written.
    assert_eq!(src_valid_mark(s.lab.node("node1"), &client.veth)?, "1");
    for zt in &ztunnels {
        let log = zt.log_text();
        assert!(
            !log.contains("not everything could be attached"),
            "something needed more privilege:\n{log}"
        );
    }
    Ok(())
}

#[test]
fn without_cap_perfmon_ztunnel_refuses_to_start_and_says_why() -> Result<()> {
    let s = Setup::new(&lab::config_yaml(&[]))?;
    let n = s.lab.node("node1");
    let without = daemonset_capabilities()?.replace(",+perfmon", "");
    assert!(!without.contains("perfmon"));
    let cmd = confined(n, &s.config, &s.lab.ca_dir, &without)?;
    let mut zt = Ztunnel::spawn_command(n, cmd, &[], &[])?;
    let status = zt.wait_exit(Duration::from_secs(20))?;
    assert!(!status.success());
    let log = zt.log_text();
    assert!(
        log.contains("loading the eBPF programs") && log.contains("Permission denied"),
        "the refusal does not say what was denied:\n{log}"
    );
    Ok(())
}
