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

/// What a foreign program answers for every packet.
#[derive(Debug, Clone, Copy)]
pub enum Verdict {
    /// `TCX_NEXT`: leave the packet to the programs after it (a CNI's
    /// program for traffic it does not handle).
    Next,
    /// `TC_ACT_OK`: accept it and end the chain (a CNI's program for traffic
    /// it forwards itself): programs after it never see the packet.
    Accept,
}

/// Another agent's TC program (a CNI's, as far as ztunnel can tell), loaded
/// and attached with raw bpf(2) calls so it shares nothing with ztunnel's
/// loader. Detached when dropped.
pub struct ForeignProgram {
    _prog: std::os::fd::OwnedFd,
    _link: std::os::fd::OwnedFd,
}

/// The name the foreign programs carry.
pub const FOREIGN_NAME: &str = "cni_foreign";

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_F_BEFORE: u32 = 1 << 3;

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u64; 16],
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
    _rest: [u64; 8],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: `attr` is a properly sized, zero-padded bpf_attr variant that
    // lives for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("bpf(2)");
    }
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

impl ForeignProgram {
    /// Loads `r0 = verdict; exit` and attaches it at `iface`'s `hook` in
    /// the namespace at `ns`: in front of everything (`first`), as a CNI
    /// re-attaching itself would, or after everything.
    pub fn attach(
        ns: &Path,
        iface: &str,
        hook: TcAttachType,
        verdict: Verdict,
        first: bool,
    ) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let imm: i32 = match verdict {
            Verdict::Next => -1,
            Verdict::Accept => 0,
        };
        // BPF_ALU64 | BPF_MOV | BPF_K into r0, then BPF_JMP | BPF_EXIT.
        let mut insns = [0u8; 16];
        insns[0] = 0xb7;
        insns[4..8].copy_from_slice(&imm.to_le_bytes());
        insns[8] = 0x95;
        let license = b"GPL\0";
        let mut name = [0u8; 16];
        name[..FOREIGN_NAME.len()].copy_from_slice(FOREIGN_NAME.as_bytes());
        let mut load = ProgLoad {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            ..Default::default()
        };
        let prog = bpf(BPF_PROG_LOAD, &mut load).context("loading the foreign program")?;
        let file = File::open(ns).with_context(|| format!("opening netns {}", ns.display()))?;
        let iface_c = std::ffi::CString::new(iface)?;
        let prog_fd = prog.as_raw_fd() as u32;
        let attach_type = match hook {
            TcAttachType::Ingress => BPF_TCX_INGRESS,
            _ => BPF_TCX_EGRESS,
        };
        let link = std::thread::spawn(move || -> Result<std::os::fd::OwnedFd> {
            // SAFETY: setns on this thread only; the fd is a valid netns file.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns");
            }
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(iface_c.as_ptr()) };
            if ifindex == 0 {
                return Err(std::io::Error::last_os_error()).context("if_nametoindex");
            }
            let mut create = LinkCreate {
                prog_fd,
                target_ifindex: ifindex,
                attach_type,
                flags: if first { BPF_F_BEFORE } else { 0 },
                ..Default::default()
            };
            bpf(BPF_LINK_CREATE, &mut create).context("attaching the foreign program")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("attach thread panicked"))??;
        Ok(ForeignProgram {
            _prog: prog,
            _link: link,
        })
    }
}
