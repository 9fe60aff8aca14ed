//! iperf3 servers and clients inside lab namespaces.

use std::{
    net::SocketAddr,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use ztunnel_tests::netns::Netns;

use super::placement::NodeCpus;

/// An `iperf3 -s` in a pod, killed on drop.
pub struct Server(Child);

impl Server {
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        let child = ns
            .command("iperf3")
            .args(["-s", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s (is iperf3 installed? `cargo xtask bootstrap`)")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Server(child))
    }

    /// The server's process (nsenter execs iperf3 in its place).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One client run's result.
pub struct Run {
    pub gbits: f64,
    pub bytes: f64,
}

/// `iperf3 -c dst -P streams -t secs` from `ns`.
pub fn run(ns: &Netns, dst: SocketAddr, streams: u32, secs: u32) -> Result<Run> {
    run_on(ns, dst, streams, secs, None)
}

/// How long a client waits for a server still finishing the previous test:
/// an iperf3 server takes one test at a time, and through relays its side
/// of the last test can close after the client has already returned.
const BUSY_WAIT: Duration = Duration::from_secs(5);

/// [`run`], with the client on node1's CPU when `cpus` is given.
pub fn run_on(
    ns: &Netns,
    dst: SocketAddr,
    streams: u32,
    secs: u32,
    cpus: Option<&NodeCpus>,
) -> Result<Run> {
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    loop {
        match run_once(ns, dst, streams, secs, cpus)? {
            Outcome::Done(run) => return Ok(run),
            Outcome::Busy if std::time::Instant::now() < deadline => {
                eprintln!("[bench]   iperf3 server at {dst} still busy with the last test; again");
                std::thread::sleep(Duration::from_millis(200));
            }
            Outcome::Busy => {
                anyhow::bail!("iperf3 to {dst}: the server stayed busy for {BUSY_WAIT:?}")
            }
        }
    }
}

enum Outcome {
    Done(Run),
    /// The server refused the test: it is still running another.
    Busy,
}

fn run_once(
    ns: &Netns,
    dst: SocketAddr,
    streams: u32,
    secs: u32,
    cpus: Option<&NodeCpus>,
) -> Result<Outcome> {
    let mut cmd = ns.command("iperf3");
    if let Some(cpus) = cpus {
        cpus.on_node1(&mut cmd);
    }
    let out = cmd
        .args([
            "-c",
            &dst.ip().to_string(),
            "-p",
            &dst.port().to_string(),
            "-J",
            "-P",
            &streams.to_string(),
            "-t",
            &secs.to_string(),
        ])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    if let Some(e) = v["error"].as_str() {
        if e.contains("server is busy") {
            return Ok(Outcome::Busy);
        }
        anyhow::bail!("iperf3 to {dst}: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no sum_received")?;
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    Ok(Outcome::Done(Run {
        gbits: bps / 1e9,
        bytes,
    }))
}
