//! Just enough Ethernet/IPv4/TCP parsing to name a flow.

use aya_ebpf::programs::TcContext;

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

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
}

/// Parses an Ethernet frame carrying the first fragment of an IPv4 TCP
/// segment. Anything else (IPv6, UDP, later fragments, truncated headers) is
/// `None` and left alone by the caller.
#[inline(always)]
pub fn parse_tcp_flow(ctx: &TcContext) -> Option<TcpFlow> {
    let ether_type = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ether_type != ETH_P_IPV4 {
        return None;
    }
    let version_ihl: u8 = ctx.load(ETH_HDR_LEN).ok()?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let ip_header_len = ((version_ihl & 0x0f) as usize) * 4;
    if ip_header_len < 20 {
        return None;
    }
    let protocol: u8 = ctx.load(ETH_HDR_LEN + 9).ok()?;
    if protocol != IPPROTO_TCP {
        return None;
    }
    // A non-first fragment has no TCP header to read.
    let frag = u16::from_be(ctx.load::<u16>(ETH_HDR_LEN + 6).ok()?);
    if frag & 0x1fff != 0 {
        return None;
    }
    let saddr: u32 = ctx.load(ETH_HDR_LEN + 12).ok()?;
    let daddr: u32 = ctx.load(ETH_HDR_LEN + 16).ok()?;
    let tcp = ETH_HDR_LEN + ip_header_len;
    let sport: u16 = ctx.load(tcp).ok()?;
    let dport: u16 = ctx.load(tcp + 2).ok()?;
    let flags: u8 = ctx.load(tcp + 13).ok()?;
    Some(TcpFlow {
        saddr,
        daddr,
        sport,
        dport,
        is_syn: flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0,
    })
}
