//! ztunnel processes inside the lab's node namespaces, and what tests read
//! back from them: logs, the sockets they own, their pinned counters.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::lab::Node;

/// The ztunnel binary under test: `$ZTUNNEL_BIN`, else the one cargo built
/// next to this test executable.
pub fn binary() -> Result<PathBuf> {
    built_binary("ztunnel", "ZTUNNEL_BIN")
}

/// A binary of the workspace: `$env_var`, else the one cargo built next to
/// this test executable.
pub fn built_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("no {name} binary found: run `cargo build --workspace --bins` or set {env_var}")
}

/// One running ztunnel. Killed on drop; its log is printed if the test is
/// failing, so CI output explains what the proxy saw.
pub struct Ztunnel {
    child: Option<Child>,
    pub log: PathBuf,
    pub node: String,
}

/// The command that runs ztunnel for `node` with `config`, issuing
/// certificates from the lab's CA in `ca_dir`.
pub fn command(node: &Node, config: &Path, ca_dir: &Path) -> Result<Command> {
    let mut cmd = base_command(node)?;
    cmd.arg("--config").arg(config).arg("--ca-dir").arg(ca_dir);
    Ok(cmd)
}

/// The command that runs ztunnel for `node`, with no source of
/// configuration or certificates yet (the control plane's come as
/// environment variables).
pub fn base_command(node: &Node) -> Result<Command> {
    let mut cmd = node.ns.command(binary()?);
    cmd.arg("--node-name")
        .arg(node.name)
        .arg("--bpf-pin-dir")
        .arg(&node.pin_dir)
        .env("RUST_LOG", "info");
    Ok(cmd)
}

impl Ztunnel {
    /// Starts ztunnel in `node`'s namespace and waits until it is ready.
    pub fn start(node: &Node, config: &Path, ca_dir: &Path) -> Result<Self> {
        Self::start_with(node, config, ca_dir, &[])
    }

    /// [`Ztunnel::start`] with extra arguments.
    pub fn start_with(node: &Node, config: &Path, ca_dir: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_env(node, config, ca_dir, extra, &[])
    }

    /// [`Ztunnel::start_with`] with extra environment variables.
    pub fn start_env(
        node: &Node,
        config: &Path,
        ca_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::spawn(node, config, ca_dir, extra, env)?.ready()
    }

    /// Starts ztunnel without waiting for it to be ready.
    pub fn spawn(
        node: &Node,
        config: &Path,
        ca_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::spawn_command(node, command(node, config, ca_dir)?, extra, env)
    }

    /// Starts `cmd` (a ztunnel command line for `node`) without waiting.
    pub fn spawn_command(
        node: &Node,
        mut cmd: Command,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let log = std::env::temp_dir().join(format!(
            "{}-ztunnel-{}.log",
            node.ns.name(),
            unique_suffix()
        ));
        let log_file = File::create(&log)?;
        let child = cmd
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("spawning ztunnel")?;
        Ok(Ztunnel {
            child: Some(child),
            log,
            node: node.name.to_string(),
        })
    }

    /// Waits until the process says it is ready.
    pub fn ready(mut self) -> Result<Self> {
        self.wait_for_log("ready", Duration::from_secs(60))?;
        Ok(self)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory, from /proc.
    pub fn rss_bytes(&self) -> Result<u64> {
        let pid = self.pid().context("ztunnel is not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")?;
        Ok(kib * 1024)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`, failing early if ztunnel exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits until the log contains `needle` at least `count` times.
    pub fn wait_for_log_count(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().matches(needle).count() >= count {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "ztunnel on {} exited ({status}) before logging {needle:?}:\n{}",
                        self.node,
                        self.log_text()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "ztunnel on {} did not log {needle:?} within {timeout:?}:\n{}",
                    self.node,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        if let Some(child) = self.child.as_ref() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("ztunnel already reaped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "ztunnel on {} still running after {timeout:?}:\n{}",
                    self.node,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the process ends without any cleanup.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("ztunnel already stopped")?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("ztunnel did not exit within 10s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- ztunnel log ({}) ----\n{}", self.node, self.log_text());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}", nanos)
}

/// Runs ztunnel to completion with extra arguments (for refusal tests).
pub fn run_to_exit(node: &Node, config: &Path, ca_dir: &Path, extra: &[&str]) -> Result<Output> {
    Ok(command(node, config, ca_dir)?
        .args(extra)
        .stdin(Stdio::null())
        .output()?)
}

/// A TCP socket in a node namespace, as `ss` reports it.
#[derive(Debug, Clone)]
pub struct SocketEntry {
    pub state: String,
    /// Bytes waiting to be read (for a listener: connections waiting).
    pub recv_q: u64,
    /// Bytes waiting to be acknowledged (for a listener: its backlog).
    pub send_q: u64,
    pub local: SocketAddr,
    pub peer: String,
    pub process: String,
}

/// The TCP sockets of `node`'s namespace, with their owning processes.
pub fn sockets(node: &Node) -> Result<Vec<SocketEntry>> {
    sockets_in(&node.ns)
}

/// The TCP sockets of `ns`, with their owning processes.
pub fn sockets_in(ns: &crate::netns::Netns) -> Result<Vec<SocketEntry>> {
    let out = crate::netns::run(ns.command("ss").args(["-tanpH"]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut entries = Vec::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 5 {
            continue;
        }
        let Ok(local) = cols[3].parse() else { continue };
        entries.push(SocketEntry {
            state: cols[0].to_string(),
            recv_q: cols[1].parse().unwrap_or(0),
            send_q: cols[2].parse().unwrap_or(0),
            local,
            peer: cols[4].to_string(),
            process: cols.get(5).copied().unwrap_or("").to_string(),
        });
    }
    Ok(entries)
}

/// Whether a ztunnel process in `node` owns an established socket whose local
/// address is `local` and whose peer has address `peer_ip`: the accepted side
/// of a captured connection. Looked for during a second: a connection is
/// complete in the kernel's accept queue before ztunnel accepts it, and `ss`
/// names the owning process only then, which a loaded machine (tests in
/// parallel) can delay.
pub fn ztunnel_owns(node: &Node, local: SocketAddr, peer_ip: Ipv4Addr) -> Result<bool> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let owned = sockets(node)?.iter().any(|s| {
            s.state == "ESTAB"
                && s.local == local
                && s.peer.starts_with(&format!("{peer_ip}:"))
                && s.process.contains("\"ztunnel\"")
        });
        if owned || std::time::Instant::now() >= deadline {
            return Ok(owned);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Whether the established socket in `node`'s namespace at `local`, with a
/// peer at `peer_ip`, has its keepalive timer armed (`ss -o`).
pub fn keepalive_armed(node: &Node, local: SocketAddr, peer_ip: Ipv4Addr) -> Result<bool> {
    let out = crate::netns::run(
        node.ns
            .command("ss")
            .args(["-tanoH", "state", "established"]),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Recv-Q, Send-Q, local, peer, timer (no state column when filtered).
        cols.len() >= 4
            && cols[2].parse::<SocketAddr>().ok() == Some(local)
            && cols[3].starts_with(&format!("{peer_ip}:"))
            && line.contains("timer:(keepalive,")
    }))
}

/// A pod's kernel counters, read from the pinned map with bpftool (an
/// independent reader: not ztunnel's own view).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub outbound_captured: u64,
    pub inbound_captured: u64,
    pub dropped_no_listener: u64,
    pub policy_denied: u64,
    /// IP fragments of TCP to or from the pod, dropped.
    pub dropped_fragment: u64,
    /// TCP segments too short to read the header, dropped.
    pub dropped_truncated: u64,
    /// New connections claiming the pod's address from elsewhere, dropped.
    pub dropped_spoofed: u64,
    /// SYNs about to be forwarded past capture (a veth not synced yet, an
    /// uplink ztunnel does not know), dropped on the way out.
    pub dropped_uncaptured: u64,
    /// New outbound flows the pod's exclusions left uncaptured.
    pub outbound_excluded: u64,
    /// New same-node flows from the pod passed in the kernel, no proxy.
    pub outbound_direct: u64,
}

/// Counters for `pod_ip` in `node`'s pinned map, `None` if the pod has no entry.
pub fn counters(node: &Node, pod_ip: Ipv4Addr) -> Result<Option<Counters>> {
    counters_at(&node.pin_dir, pod_ip)
}

/// Like [`counters`], for the node whose pins are under `pin_dir`.
pub fn counters_at(pin_dir: &Path, pod_ip: Ipv4Addr) -> Result<Option<Counters>> {
    let map = pin_dir.join("maps/ZT_POD_COUNTERS");
    let out = crate::netns::run(
        Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&map),
    )?;
    let entries: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool output")?;
    let want: Vec<u8> = pod_ip.octets().to_vec();
    for entry in entries.as_array().into_iter().flatten() {
        let key = hex_bytes(&entry["key"]);
        if key != want {
            continue;
        }
        let mut total = Counters::default();
        for cpu in entry["values"].as_array().into_iter().flatten() {
            let v = hex_bytes(&cpu["value"]);
            let word = |i: usize| -> u64 {
                v.get(i * 8..i * 8 + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                    .unwrap_or(0)
            };
            total.outbound_captured += word(0);
            total.inbound_captured += word(1);
            total.dropped_no_listener += word(2);
            total.policy_denied += word(3);
            total.dropped_fragment += word(4);
            total.dropped_truncated += word(5);
            total.dropped_spoofed += word(6);
            total.dropped_uncaptured += word(7);
            total.outbound_excluded += word(8);
            total.outbound_direct += word(9);
        }
        return Ok(Some(total));
    }
    Ok(None)
}

fn hex_bytes(v: &serde_json::Value) -> Vec<u8> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b.as_str())
        .filter_map(|s| u8::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .collect()
}
