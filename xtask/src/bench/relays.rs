//! The floors: a userspace relay on each node (`tcp-relay`, built in
//! release as ztunnel is) in front of a target. The client connects to
//! node1's relay, which connects to node2's, which connects to the target.
//!
//! Two kinds. TCP relays copy in the clear: what two proxy hops cost on
//! their own, the floor for any design with a proxy on both nodes. TLS
//! relays also encrypt between the nodes, with ztunnel's TLS stack and
//! settings but without HTTP/2 or anything else of ztunnel's: the floor
//! for any design that encrypts in user space with rustls, as HBONE must
//! without kernel TLS.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use ztunnel::identity::ca::{files, LocalCa};
use ztunnel_tests::lab::Lab;

/// The name node2's TLS relay proves; `tcp-relay` checks this name.
const SERVER_NAME: &str = "tcp-relay";

/// What the TLS relays present and trust: a serving certificate for node2's
/// relay from the lab's CA, and the lab's root for node1's relay to check
/// it. The files live in the lab's CA directory and go with it.
pub struct RelayTls {
    root: PathBuf,
    chain: PathBuf,
    key: PathBuf,
}

impl RelayTls {
    pub fn issue(lab: &Lab) -> Result<Self> {
        let ca = LocalCa::load(&lab.ca_dir).context("loading the lab's CA")?;
        let (chain_pem, key_pem) = ca
            .issue_server(&[SERVER_NAME.to_string()], Duration::from_secs(24 * 3600))
            .context("issuing the TLS relay's certificate")?;
        let tls = RelayTls {
            root: lab.ca_dir.join(files::ROOT_CERT),
            chain: lab.ca_dir.join("tcp-relay-chain.pem"),
            key: lab.ca_dir.join("tcp-relay-key.pem"),
        };
        for (path, pem) in [(&tls.chain, chain_pem), (&tls.key, key_pem)] {
            std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(tls)
    }
}

/// A relay per node in front of each target. Killed on drop.
pub struct Relays {
    /// Each relay with the node it runs on.
    children: Vec<(&'static str, Child)>,
    fronts: Vec<(SocketAddr, SocketAddr)>,
}

impl Relays {
    /// TCP relays listen on the target's port plus this, on the node
    /// addresses; TLS relays on the port after, so both kinds can run at
    /// once and alternate.
    const TCP_PORT_OFFSET: u16 = 20_000;
    const TLS_PORT_OFFSET: u16 = 21_000;

    /// TCP relays, or TLS relays between the nodes when `tls` is given.
    pub fn start(
        lab: &Lab,
        exe: &Path,
        targets: &[SocketAddr],
        tls: Option<&RelayTls>,
    ) -> Result<Self> {
        let (node1, node2) = (lab.node("node1"), lab.node("node2"));
        let mut relays = Relays {
            children: Vec::new(),
            fronts: Vec::new(),
        };
        let offset = match tls {
            Some(_) => Self::TLS_PORT_OFFSET,
            None => Self::TCP_PORT_OFFSET,
        };
        for &target in targets {
            let port = target.port() + offset;
            let front = SocketAddr::from((node1.underlay_ip, port));
            let back = SocketAddr::from((node2.underlay_ip, port));
            let path = |p: &Path| p.display().to_string();
            let (back_tls, front_tls) = match tls {
                Some(t) => (
                    vec!["--accept-tls".into(), path(&t.chain), path(&t.key)],
                    vec!["--connect-tls".into(), path(&t.root)],
                ),
                None => (Vec::new(), Vec::new()),
            };
            for (name, node, tls_args, listen, to) in [
                ("node2", node2, back_tls, back, target),
                ("node1", node1, front_tls, front, back),
            ] {
                let child = node
                    .ns
                    .command(exe)
                    .args(tls_args)
                    .args([listen.to_string(), to.to_string()])
                    .stdout(Stdio::null())
                    .spawn()
                    .with_context(|| format!("starting {}", exe.display()))?;
                relays.children.push((name, child));
            }
            relays.fronts.push((target, front));
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(relays)
    }

    /// The relays' processes: node1's, then node2's.
    pub fn pids(&self) -> (Vec<u32>, Vec<u32>) {
        let on = |node: &str| {
            self.children
                .iter()
                .filter(|(n, _)| *n == node)
                .map(|(_, c)| c.id())
                .collect()
        };
        (on("node1"), on("node2"))
    }

    /// Where to connect to reach `target` through both relays.
    pub fn front(&self, target: SocketAddr) -> SocketAddr {
        self.fronts
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, f)| *f)
            .unwrap_or(target)
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
