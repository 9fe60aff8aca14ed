//! Hand-made IPv4/TCP packets, for tests that attack capture the way a pod
//! with `CAP_NET_RAW` (in the default container capability set) could: IP
//! fragments, truncated TCP headers. And a watcher that reports which TCP
//! segments reached a namespace's own stack.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::netns::Netns;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;

/// A TCP header with no options (20 bytes), checksummed for `src` -> `dst`.
pub fn tcp_header(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, flags: u8) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = tcp_checksum(*src.ip(), *dst.ip(), &tcp);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    internet_checksum(&pseudo)
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (20 bytes) for a TCP payload of `payload_len` bytes.
/// `offset_units` is the fragment offset in 8-byte units.
fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    more_fragments: bool,
    offset_units: u16,
    payload_len: usize,
) -> Vec<u8> {
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    let flags_offset = (if more_fragments { 0x2000 } else { 0 }) | (offset_units & 0x1fff);
    ip[6..8].copy_from_slice(&flags_offset.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

/// A TCP SYN from `src` to `dst`, cut into IP fragments after the first
/// `first_len` bytes of the TCP header (a multiple of 8; 8 is the "tiny
/// first fragment" that hides the flags from anything reading only the
/// first fragment).
pub fn fragmented_syn(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    id: u16,
    first_len: usize,
) -> Vec<Vec<u8>> {
    assert!(first_len.is_multiple_of(8) && first_len > 0 && first_len < 20);
    let tcp = tcp_header(src, dst, 0x1000_0000 ^ id as u32, TCP_SYN);
    let (head, tail) = tcp.split_at(first_len);
    let mut first = ipv4_header(*src.ip(), *dst.ip(), id, true, 0, head.len());
    first.extend_from_slice(head);
    let mut second = ipv4_header(
        *src.ip(),
        *dst.ip(),
        id,
        false,
        (first_len / 8) as u16,
        tail.len(),
    );
    second.extend_from_slice(tail);
    vec![first, second]
}

/// A whole SYN from `src` to `dst`, whatever address `src` claims.
pub fn syn(src: SocketAddrV4, dst: SocketAddrV4, id: u16) -> Vec<u8> {
    let tcp = tcp_header(src, dst, 0x3000_0000 ^ id as u32, TCP_SYN);
    let mut packet = ipv4_header(*src.ip(), *dst.ip(), id, false, 0, tcp.len());
    packet.extend_from_slice(&tcp);
    packet
}

/// A whole TCP segment from `src` to `dst` carrying `payload`, with the
/// given sequence number and flags, whatever flow it claims to belong to.
pub fn data_segment(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = tcp_header(src, dst, seq, flags);
    tcp.extend_from_slice(payload);
    tcp[16..18].copy_from_slice(&[0, 0]);
    let sum = tcp_checksum(*src.ip(), *dst.ip(), &tcp);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut packet = ipv4_header(*src.ip(), *dst.ip(), 0x4242, false, 0, tcp.len());
    packet.extend_from_slice(&tcp);
    packet
}

/// A packet whose IP payload holds only the first `len` bytes of a SYN's
/// TCP header: too short for the flags (or the whole header) to be read.
pub fn truncated_syn(src: SocketAddrV4, dst: SocketAddrV4, id: u16, len: usize) -> Vec<u8> {
    let tcp = tcp_header(src, dst, 0x2000_0000 ^ id as u32, TCP_SYN);
    let mut packet = ipv4_header(*src.ip(), *dst.ip(), id, false, 0, len);
    packet.extend_from_slice(&tcp[..len]);
    packet
}

/// `packet` (an IPv4 packet) in an Ethernet frame from `src_mac` to
/// `dst_mac` under two VLAN tags, 802.1ad outside and 802.1Q inside, both
/// VLAN 0: what a pod with `CAP_NET_RAW` can hand a bridge.
pub fn double_tagged(dst_mac: [u8; 6], src_mac: [u8; 6], packet: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(22 + packet.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&[0x88, 0xa8, 0, 0, 0x81, 0x00, 0, 0, 0x08, 0x00]);
    frame.extend_from_slice(packet);
    frame
}

/// A raw socket of `domain` and `protocol`, owned.
fn raw_socket(domain: libc::c_int, protocol: libc::c_int, what: &str) -> Result<OwnedFd> {
    // SAFETY: socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// sendto(2) of `buf` to the socket address `addr` (a `sockaddr_*`).
fn send_to<A>(fd: &OwnedFd, buf: &[u8], addr: &A, what: &str) -> Result<()> {
    // SAFETY: the buffer and address are valid for the call, and `A` is
    // the sockaddr type of the socket's family.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            0,
            addr as *const A as *const libc::sockaddr,
            std::mem::size_of::<A>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(())
}

/// Sends whole Ethernet frames out of `iface` inside `ns` (AF_PACKET).
pub fn send_frames(ns: &Netns, iface: &str, frames: Vec<Vec<u8>>) -> Result<()> {
    let iface = std::ffi::CString::new(iface)?;
    ns.run(move || -> Result<()> {
        let fd = raw_socket(libc::AF_PACKET, 0, "packet socket")?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(iface.as_ptr()) };
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error()).context("if_nametoindex");
        }
        for frame in &frames {
            let dst_mac = frame
                .get(..6)
                .context("a frame shorter than its MAC header")?;
            // SAFETY: an all-zero sockaddr_ll is valid; fields set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(dst_mac);
            send_to(&fd, frame, &addr, "sending a frame")?;
        }
        Ok(())
    })?
}

/// Sends whole IPv4 packets (header included) from inside `ns`, as a raw
/// socket with `IP_HDRINCL` does: the kernel sends them as they are.
pub fn send_packets(ns: &Netns, packets: Vec<Vec<u8>>) -> Result<()> {
    ns.run(move || -> Result<()> {
        let fd = raw_socket(libc::AF_INET, libc::IPPROTO_RAW, "raw socket")?;
        for packet in &packets {
            let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.octets()),
                },
                sin_zero: [0; 8],
            };
            send_to(&fd, packet, &addr, "sending a raw packet")?;
        }
        Ok(())
    })?
}

/// One TCP segment a namespace's stack received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u8,
}

impl Segment {
    pub fn is_syn(&self) -> bool {
        self.flags & TCP_SYN != 0 && self.flags & TCP_ACK == 0
    }

    pub fn is_syn_ack(&self) -> bool {
        self.flags & TCP_SYN != 0 && self.flags & TCP_ACK != 0
    }
}

/// Records every TCP segment delivered to the stack of a namespace (after
/// reassembly), through a raw `IPPROTO_TCP` socket. Stops on drop.
pub struct TcpWatch {
    seen: Arc<Mutex<Vec<Segment>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpWatch {
    pub fn start(ns: &Netns) -> Result<Self> {
        let fd = ns.run(|| -> Result<OwnedFd> {
            // SAFETY: socket(2); the descriptor is owned right away.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("raw TCP socket");
            }
            // SAFETY: fresh descriptor.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })??;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt with a timeval we own.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::SeqCst) {
                    // SAFETY: reading into a buffer we own.
                    let n = unsafe {
                        libc::recv(
                            fd.as_raw_fd(),
                            buf.as_mut_ptr() as *mut libc::c_void,
                            buf.len(),
                            0,
                        )
                    };
                    if n <= 0 {
                        continue;
                    }
                    if let Some(segment) = parse(&buf[..n as usize]) {
                        if let Ok(mut v) = seen.lock() {
                            v.push(segment);
                        }
                    }
                }
            })
        };
        Ok(TcpWatch {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// Segments seen so far that match `f`.
    pub fn matching(&self, f: impl Fn(&Segment) -> bool) -> Vec<Segment> {
        self.seen
            .lock()
            .map(|v| v.iter().filter(|s| f(s)).copied().collect())
            .unwrap_or_default()
    }

    /// Waits up to `timeout` for a segment matching `f`.
    pub fn wait_for(&self, timeout: Duration, f: impl Fn(&Segment) -> bool) -> Option<Segment> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.matching(&f).first() {
                return Some(*s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TcpWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn parse(packet: &[u8]) -> Option<Segment> {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 6 {
        return None;
    }
    let ihl = (packet[0] & 0x0f) as usize * 4;
    // Truncated segments are recorded too (flags 0): that they arrived at
    // all is what some tests look for.
    let tcp = packet.get(ihl..ihl + 4)?;
    let flags = packet.get(ihl + 13).copied().unwrap_or(0);
    let ip = |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    Some(Segment {
        src: SocketAddrV4::new(ip(12), port(0)),
        dst: SocketAddrV4::new(ip(16), port(2)),
        flags,
    })
}
