//! An L3 link between two lab nodes: a TUN device in each node namespace
//! and a relay that copies packets between them. Packets on a TUN device
//! start at the IP header, with no Ethernet header, like those of the
//! devices real clusters use between nodes (IPIP `tunl0`, WireGuard), which
//! this kernel does not have.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates TUN device `name` inside `ns` (it lives as long as the file).
fn open_tun(ns: &Netns, name: &str) -> Result<File> {
    let name = name.to_string();
    ns.run(move || -> Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads the ifreq we own.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
        }
        Ok(file)
    })?
}

/// Two TUN devices joined by a userspace relay. Dropping it removes both.
pub struct TunLink {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TunLink {
    /// Creates `name` in `a` and in `b` and relays packets between them.
    pub fn new(a: &Netns, b: &Netns, name: &str) -> Result<Self> {
        let fa = open_tun(a, name)?;
        let fb = open_tun(b, name)?;
        for ns in [a, b] {
            ns.ip(&["link", "set", name, "up"])?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![
            relay(fa.try_clone()?, fb.try_clone()?, stop.clone()),
            relay(fb, fa, stop.clone()),
        ];
        Ok(TunLink { stop, threads })
    }
}

fn relay(mut from: File, mut to: File, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            match from.read(&mut buf) {
                Ok(n) if n > 0 => {
                    let _ = to.write(&buf[..n]);
                }
                _ => {}
            }
        }
    })
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
