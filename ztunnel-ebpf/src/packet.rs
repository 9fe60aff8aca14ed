//! Just enough link-layer/IPv4/TCP parsing to name a flow, and to say when a
//! TCP packet cannot be judged by its header: a fragment, or a header too
//! short to read. The callers drop those when an enrolled pod is involved;
//! treating them as "not TCP" would let a pod with a raw socket slip a SYN
//! past capture (the receiver reassembles what was let through).

use aya_ebpf::programs::TcContext;

/// Length of the Ethernet header on devices that have one (veths, most
/// uplinks). L3 devices (IPIP, WireGuard, TUN) hand TC packets that start
/// at the IP header: their programs are instantiated with 0.
pub const ETH_HLEN: usize = 14;
/// No link-layer header.
pub const L3_HLEN: usize = 0;

const ETH_P_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_MIN_HLEN: u16 = 20;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;
/// "More fragments" and the fragment offset, in the IPv4 flags word.
const IP_MF_OR_OFFSET: u16 = 0x3fff;

/// A TCP segment's addressing, all fields in network byte order as they sit
/// in the packet (and as `bpf_sock_tuple` wants them).
#[derive(Clone, Copy)]
pub struct TcpFlow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// A SYN without ACK: the first packet of a new connection.
    pub is_syn: bool,
    /// The TCP flags byte.
    pub flags: u8,
    /// TCP payload bytes (of the whole GSO packet, for one that is).
    pub payload: u32,
}

impl TcpFlow {
    pub fn key(&self) -> ztunnel_common::FlowKey {
        ztunnel_common::FlowKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
        }
    }

    /// The same flow seen from the other end.
    pub fn reversed(&self) -> TcpFlow {
        TcpFlow {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }
}

/// What a packet is, as far as capture is concerned.
pub enum Packet {
    /// Not IPv4 TCP: left alone.
    Other,
    /// A whole IPv4 TCP segment with a readable header.
    Tcp(TcpFlow),
    /// IPv4 TCP that cannot be judged: a fragment (first or later), or a
    /// segment too short to hold a TCP header. Addresses in network order.
    Unjudgeable {
        saddr: u32,
        daddr: u32,
        fragment: bool,
    },
}

/// Parses a packet whose IP header starts `L2` bytes in: [`ETH_HLEN`] for
/// Ethernet devices, [`L3_HLEN`] for L3 devices.
#[inline(always)]
pub fn parse<const L2: usize>(ctx: &TcContext) -> Packet {
    match parse_inner::<L2>(ctx) {
        Some(packet) => packet,
        None => Packet::Other,
    }
}

/// The fixed IPv4 header: all the fields read here are in its first 20
/// bytes, whatever options follow.
const IPV4_FIXED_HLEN: usize = 20;
/// The part of the TCP header read here: ports, sequence and
/// acknowledgement numbers, data offset and flags.
const TCP_READ_LEN: usize = 14;

#[inline(always)]
fn parse_inner<const L2: usize>(ctx: &TcContext) -> Option<Packet> {
    // Each header is read with one `bpf_skb_load_bytes` call: the helper
    // call, not the copy, is what costs, and this runs for every packet of
    // every pod (a field at a time, parsing was a dozen calls per packet).
    if L2 == ETH_HLEN {
        let ether_type = u16::from_be(ctx.load::<u16>(12).ok()?);
        if ether_type != ETH_P_IPV4 {
            return Some(Packet::Other);
        }
    } else {
        // No link-layer header to say what follows: the skb's protocol does
        // (network byte order in the low 16 bits).
        if u16::from_be(ctx.skb.protocol() as u16) != ETH_P_IPV4 {
            return Some(Packet::Other);
        }
    }
    // A packet too short for an IPv4 header is not judged here: the kernel
    // drops those on its own.
    let ip: [u8; IPV4_FIXED_HLEN] = ctx.load(L2).ok()?;
    let version_ihl = ip[0];
    if version_ihl >> 4 != 4 {
        return Some(Packet::Other);
    }
    let ip_header_len = ((version_ihl & 0x0f) as usize) * 4;
    // The kernel drops IPv4 headers shorter than 20 bytes on its own.
    if ip_header_len < IPV4_FIXED_HLEN {
        return Some(Packet::Other);
    }
    if ip[9] != IPPROTO_TCP {
        return Some(Packet::Other);
    }
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let unjudgeable = |fragment| {
        Some(Packet::Unjudgeable {
            saddr,
            daddr,
            fragment,
        })
    };
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & IP_MF_OR_OFFSET != 0 {
        return unjudgeable(true);
    }
    // The IP header's own length, not the skb's: Ethernet pads short
    // frames, and the padding is not TCP header. A GSO packet larger than
    // 64 KiB (BIG TCP) says 0 there; its length is the skb's.
    let mut total_len = u16::from_be_bytes([ip[2], ip[3]]);
    // SAFETY: reading a context field the kernel gave this program.
    if total_len == 0 && unsafe { (*ctx.skb.skb).gso_size } != 0 {
        total_len = u16::try_from(ctx.len() as usize - L2).unwrap_or(u16::MAX);
    }
    let tcp = L2 + ip_header_len;
    let Some(tcp_room) = total_len.checked_sub(ip_header_len as u16) else {
        return unjudgeable(false);
    };
    if tcp_room < TCP_MIN_HLEN {
        return unjudgeable(false);
    }
    // Shorter than the IP header says: a truncated segment.
    let Ok(header) = ctx.load::<[u8; TCP_READ_LEN]>(tcp) else {
        return unjudgeable(false);
    };
    let tcp_header_len = ((header[12] >> 4) as u16) * 4;
    if tcp_header_len < TCP_MIN_HLEN || tcp_header_len > tcp_room {
        return unjudgeable(false);
    }
    let flags = header[13];
    Some(Packet::Tcp(TcpFlow {
        saddr,
        daddr,
        sport: u16::from_ne_bytes([header[0], header[1]]),
        dport: u16::from_ne_bytes([header[2], header[3]]),
        is_syn: flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0,
        flags,
        payload: u32::from(tcp_room - tcp_header_len),
    }))
}
