//! iperf3 servers and clients inside lab namespaces.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
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
    let mut cmd = ns.command("iperf3");
    if let Some(cpus) = cpus {
        cpus.on_node1(&mut cmd);
    }
    cmd.args([
        "-c",
        &dst.ip().to_string(),
        "-p",
        &dst.port().to_string(),
        "-J",
        "-P",
        &streams.to_string(),
        "-t",
        &secs.to_string(),
    ]);
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    loop {
        match run_once(&mut cmd, dst)? {
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

/// One run of the client `cmd`, whose server is `dst`.
fn run_once(cmd: &mut Command, dst: SocketAddr) -> Result<Outcome> {
    let out = cmd.output()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that finds the server busy with another test waits for it
    /// instead of failing: iperf3 servers take one test at a time.
    #[test]
    fn a_busy_server_is_waited_for() -> Result<()> {
        let ns = Netns::create(&format!("ztx-iperf-{}", std::process::id()))?;
        let _server = Server::start(&ns, 5201)?;
        let dst: SocketAddr = "127.0.0.1:5201".parse()?;
        let mut first = ns
            .command("iperf3")
            .args(["-c", "127.0.0.1", "-p", "5201", "-t", "2"])
            .stdout(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(500));
        let started = std::time::Instant::now();
        let run = run(&ns, dst, 1, 1)?;
        assert!(run.gbits > 0.0);
        // It could only start once the first test (2 s) had ended.
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        assert!(first.wait()?.success());
        Ok(())
    }
}
