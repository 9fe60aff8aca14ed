//! What is attached at an interface's TCX hooks, read from the kernel
//! (BPF_PROG_QUERY). Debian's bpftool (7.1) predates TCX and lists nothing.

use std::{fs::File, os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result};
use aya::programs::{tc::TcAttachType, SchedClassifier};

/// The names of the programs at `iface`'s TCX hook in the namespace at
/// `ns`, in the order the kernel runs them.
pub fn programs(ns: &Path, iface: &str, hook: TcAttachType) -> Result<Vec<String>> {
    let file = File::open(ns).with_context(|| format!("opening netns {}", ns.display()))?;
    let iface = iface.to_string();
    let handle = std::thread::spawn(move || -> Result<Vec<String>> {
        // SAFETY: setns on this thread only; the fd is a valid netns file.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        let (_, infos) = SchedClassifier::query_tcx(&iface, hook)
            .with_context(|| format!("querying TCX on {iface}"))?;
        Ok(infos
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_string())
            .collect())
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("TCX query thread panicked"))?
}
