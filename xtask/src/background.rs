//! ztunnels that outlive `cargo xtask lab up`, tracked by pid files so
//! `cargo xtask lab down` can stop them.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ztunnel_tests::lab::Node;

fn state_dir() -> PathBuf {
    std::env::temp_dir().join("ztlab-state")
}

/// Starts ztunnel in `node`'s namespace, detached, and waits until it is ready.
/// Returns its log file.
pub fn start_ztunnel(
    prefix: &str,
    node: &Node,
    bin: &Path,
    config: &Path,
    ca_dir: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(state_dir())?;
    let base = state_dir().join(format!("{prefix}-{}", node.name));
    let log = base.with_extension("log");
    let log_file = File::create(&log)?;
    std::env::set_var("ZTUNNEL_BIN", bin);
    let child = ztunnel_tests::ztunnel::command(node, config, ca_dir)?
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        // Its own process group: it must not die with this command's terminal.
        .process_group(0)
        .spawn()
        .context("starting ztunnel")?;
    std::fs::write(base.with_extension("pid"), child.id().to_string())?;
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
            stopped.push(format!("ztunnel {name}"));
        }
        let _ = std::fs::remove_file(entry.path());
    }
    // Give them a moment to remove their routing rules before the namespaces go.
    if !stopped.is_empty() {
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(stopped)
}
