//! Packet captures on a lab interface, to check what crosses the wire.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{lab::Node, netns::run};

/// tcpdump running on one interface of a node.
pub struct Sniffer {
    child: Option<Child>,
    file: PathBuf,
    log: PathBuf,
}

impl Sniffer {
    /// Starts capturing TCP on `iface` in `node`'s namespace.
    pub fn start(node: &Node, iface: &str) -> Result<Self> {
        let base =
            std::env::temp_dir().join(format!("{}-{iface}-{}", node.ns.name(), std::process::id()));
        let file = base.with_extension("pcap");
        let log = base.with_extension("tcpdump.log");
        let child = node
            .ns
            .command("tcpdump")
            .args(["-i", iface, "--immediate-mode", "-U", "-s", "0", "-n", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting tcpdump")?;
        let sniffer = Sniffer {
            child: Some(child),
            file,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&sniffer.log)
            .unwrap_or_default()
            .contains("listening on")
        {
            if Instant::now() > deadline {
                bail!(
                    "tcpdump did not start: {}",
                    std::fs::read_to_string(&sniffer.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(sniffer)
    }

    /// Stops the capture and returns it.
    pub fn stop(mut self) -> Result<Pcap> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGINT);
            }
            child.wait()?;
        }
        let bytes = std::fs::read(&self.file)?;
        Ok(Pcap {
            file: self.file.clone(),
            bytes,
        })
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A finished capture.
pub struct Pcap {
    file: PathBuf,
    bytes: Vec<u8>,
}

impl Pcap {
    /// Whether `needle` appears anywhere in the captured bytes.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.bytes.windows(needle.len()).any(|w| w == needle)
    }

    /// Packets matching a tcpdump filter.
    pub fn count(&self, filter: &str) -> Result<usize> {
        let out = run(Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .arg(filter))?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }

    /// The capture as tcpdump prints it, for failure messages.
    pub fn summary(&self, filter: &str) -> String {
        Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .arg(filter)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }
}

impl Drop for Pcap {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}
