//! A CPU of its own for each lab node, for the cross-node rows that model
//! two machines.
//!
//! The lab's two nodes share this machine's CPUs. Left to the scheduler,
//! one stream's four busy threads (a pod and a proxy on each node) land
//! wherever it puts them, and the placement, not the path, decides much of
//! a run: by hand, one stream through two TLS relays moved 8.0-10.0 Gbit/s
//! from one run to the next. Pinned, the client and node1's proxy share
//! the first CPU, node2's proxy and the server the second, as on two
//! one-CPU machines. Softirq work still runs where the kernel raises it
//! (mostly on the sending CPU): that cannot be pinned from here.

use std::{io, os::unix::process::CommandExt, process::Command};

use ztunnel_tests::load;

/// The CPUs the two nodes' processes run on.
#[derive(Debug, Clone, Copy)]
pub struct NodeCpus {
    pub node1: usize,
    pub node2: usize,
}

impl NodeCpus {
    /// The first two CPUs this process may use, or `None` with fewer.
    pub fn detect() -> io::Result<Option<Self>> {
        let cpus = load::allowed_cpus()?;
        Ok(match cpus.as_slice() {
            [node1, node2, ..] => Some(NodeCpus {
                node1: *node1,
                node2: *node2,
            }),
            _ => None,
        })
    }

    /// Keeps every thread of the `node1` processes on the first CPU and of
    /// the `node2` processes on the second, until the guard is dropped.
    pub fn pin(&self, node1: &[u32], node2: &[u32]) -> io::Result<Pinned> {
        let mut pinned = Pinned {
            pids: Vec::new(),
            restore: load::allowed_cpus()?,
        };
        for (pids, cpu) in [(node1, self.node1), (node2, self.node2)] {
            for &pid in pids {
                // Pushed first: a failure part-way still restores it.
                pinned.pids.push(pid);
                set_process_affinity(pid, &[cpu])?;
            }
        }
        Ok(pinned)
    }

    /// Starts `cmd` on node1's CPU (the client's side).
    pub fn on_node1(&self, cmd: &mut Command) {
        let cpu = [self.node1];
        // SAFETY: between fork and exec only set_thread_affinity runs: a
        // set built on the stack and one async-signal-safe system call.
        unsafe {
            cmd.pre_exec(move || load::set_thread_affinity(0, &cpu));
        }
    }
}

/// Pinned processes; dropping it lets them run on every CPU again.
pub struct Pinned {
    pids: Vec<u32>,
    restore: Vec<usize>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // A process that has exited needs nothing back.
            let _ = set_process_affinity(pid, &self.restore);
        }
    }
}

/// Sets the affinity of every thread `pid` has now. Threads it starts
/// later inherit their creator's.
fn set_process_affinity(pid: u32, cpus: &[usize]) -> io::Result<()> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("listing the threads of process {pid}: {e}"),
        )
    })?;
    for entry in tasks {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if let Err(e) = load::set_thread_affinity(tid, cpus) {
            // A thread that ended since the listing is not an error.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("pinning thread {tid} of process {pid}: {e}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each thread's allowed CPUs, as /proc lists them.
    fn allowed_lists(pid: u32) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|task| {
                let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .unwrap()
                    .trim()
                    .to_string()
            })
            .collect()
    }

    fn allowed_list(pid: u32) -> String {
        allowed_lists(pid).swap_remove(0)
    }

    /// A process with three threads besides its main one, ready when it
    /// has printed a line.
    fn threaded() -> std::process::Child {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import threading, time\n\
                 for _ in range(3): threading.Thread(target=time.sleep, args=(30,)).start()\n\
                 print('up', flush=True)\n",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "up");
        child
    }

    /// Every thread of a pinned process is held on its node's CPU, and the
    /// guard gives them all back.
    #[test]
    fn pins_every_thread_and_restores_them() {
        let cpus = load::allowed_cpus().unwrap();
        let before = {
            let mut child = Command::new("sleep").arg("30").spawn().unwrap();
            let list = allowed_list(child.id());
            child.kill().unwrap();
            child.wait().unwrap();
            list
        };
        let nodes = NodeCpus {
            node1: cpus[0],
            node2: *cpus.last().unwrap(),
        };
        let mut a = threaded();
        let mut b = threaded();
        assert_eq!(allowed_lists(a.id()).len(), 4);
        let pinned = nodes.pin(&[a.id()], &[b.id()]).unwrap();
        assert_eq!(allowed_lists(a.id()), vec![nodes.node1.to_string(); 4]);
        assert_eq!(allowed_lists(b.id()), vec![nodes.node2.to_string(); 4]);
        drop(pinned);
        assert_eq!(allowed_lists(a.id()), vec![before.clone(); 4]);
        assert_eq!(allowed_lists(b.id()), vec![before; 4]);
        for c in [&mut a, &mut b] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// A client started on node1's CPU stays there.
    #[test]
    fn starts_a_client_on_node1s_cpu() {
        let cpus = load::allowed_cpus().unwrap();
        let nodes = NodeCpus {
            node1: *cpus.last().unwrap(),
            node2: cpus[0],
        };
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        nodes.on_node1(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        assert_eq!(allowed_list(child.id()), nodes.node1.to_string());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A process that has gone is an error naming it, not a panic.
    #[test]
    fn a_gone_process_is_an_error() {
        let nodes = NodeCpus { node1: 0, node2: 0 };
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let e = nodes
            .pin(&[pid], &[])
            .err()
            .expect("pinning a reaped process");
        assert!(e.to_string().contains(&pid.to_string()), "{e}");
    }
}
