//! Kernel-level capture tests: real eBPF programs, real traffic through the
//! lab's namespaces. Run as root (CI does).

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use ztunnel_tests::{
    lab::{self, Lab},
    traffic::{request, Connection, Server},
    ztunnel::{counters, ztunnel_owns, Ztunnel},
};

/// A lab with its config file written.
struct Setup {
    lab: Lab,
    config: PathBuf,
}

impl Setup {
    fn new() -> Result<Self> {
        let lab = Lab::up()?;
        let config = std::env::temp_dir().join(format!("{}-config.yaml", lab.prefix));
        std::fs::write(&config, lab::config_yaml(&[]))?;
        Ok(Setup { lab, config })
    }

    fn ztunnel(&self, node: &str) -> Result<Ztunnel> {
        Ztunnel::start(self.lab.node(node), &self.config)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

#[test]
fn enrolled_pod_to_other_node_is_captured_and_keeps_client_ip() -> Result<()> {
    let s = Setup::new()?;
    let _zt1 = s.ztunnel("node1")?;
    let _zt2 = s.ztunnel("node2")?;
    let client = s.lab.pod("client");
    let server_pod = s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;

    let conn = Connection::open(&client.ns, server.addr, Duration::from_secs(5))?;
    // While the connection is open, node1's ztunnel owns it: its accepted
    // socket's local address is the server's address.
    assert!(
        ztunnel_owns(s.lab.node("node1"), server.addr, client.spec.ip)?,
        "node1's ztunnel does not own the flow"
    );
    let report = conn.exchange(1 << 20)?;
    assert_eq!(report.peer.ip(), std::net::IpAddr::V4(client.spec.ip), "server saw the wrong client");

    let c1 = counters(s.lab.node("node1"), client.spec.ip)?.expect("client has counters");
    assert_eq!(c1.outbound_captured, 1);
    let c2 = counters(s.lab.node("node2"), server_pod.spec.ip)?.expect("server has counters");
    assert_eq!(c2.inbound_captured, 1);
    Ok(())
}
