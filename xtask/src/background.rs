//! ztunnels (and the control plane) that outlive `cargo xtask lab up`, tracked by pid files so
//! `cargo xtask lab down` can stop them.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ztunnel_tests::{
    controlplane,
    lab::{Lab, Node},
};

fn state_dir() -> PathBuf {
    std::env::temp_dir().join("ztlab-state")
}

/// Starts `cmd` (a ztunnel command line for `node`) detached, and waits
/// until it is ready. Returns its log file.
pub fn start_ztunnel(prefix: &str, node: &Node, cmd: Command) -> Result<PathBuf> {
    let log = start_detached(&format!("{prefix}-{}", node.name), cmd)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)?.contains("ready") {
        if Instant::now() > deadline {
            bail!(
                "ztunnel on {} not ready after 30s; see {}",
                node.name,
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(log)
}

/// Starts the lab's control plane detached, serving `config`, and waits
/// until it listens. Returns its log file.
pub fn start_controlplane(lab: &Lab, config: &Path) -> Result<PathBuf> {
    let cmd = controlplane::command(lab, config, &[])?;
    let log = start_detached(&format!("{}-controlplane", lab.prefix), cmd)?;
    controlplane::wait_listening(
        &lab.node("node1").ns,
        controlplane::address(lab),
        Duration::from_secs(30),
    )
    .with_context(|| format!("see {}", log.display()))?;
    Ok(log)
}

/// Spawns `cmd` in its own process group (it must not die with this
/// command's terminal), logging to `<name>.log` and tracked by `<name>.pid`.
fn start_detached(name: &str, mut cmd: Command) -> Result<PathBuf> {
    std::fs::create_dir_all(state_dir())?;
    let base = state_dir().join(name);
    let log = base.with_extension("log");
    let log_file = File::create(&log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    std::fs::write(base.with_extension("pid"), child.id().to_string())?;
    Ok(log)
}

/// Stops (SIGTERM) every tracked ztunnel whose lab name starts with `prefix`.
pub fn stop_all(prefix: &str) -> Result<Vec<String>> {
    let mut stopped = Vec::new();
    let Ok(entries) = std::fs::read_dir(state_dir()) else {
        return Ok(stopped);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) || !name.ends_with(".pid") {
            continue;
        }
        if let Ok(pid) = std::fs::read_to_string(entry.path())?.trim().parse::<i32>() {
            // SAFETY: kill(2) with a pid we started; a stale pid only yields ESRCH.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            stopped.push(name.trim_end_matches(".pid").to_string());
        }
        let _ = std::fs::remove_file(entry.path());
    }
    // Give them a moment to remove their routing rules before the namespaces go.
    if !stopped.is_empty() {
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(stopped)
}
