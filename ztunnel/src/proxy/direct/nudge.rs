//! Ending a revoked same-node connection now, not at its next packet.
//!
//! A revoked flow's packets go to the node's stack, which answers each with
//! a reset whose sequence number is the one the sender expects (taken from
//! the packet's acknowledgement). An idle connection sends nothing, so
//! each end is made to: a bare SYN for its 4-tuple, sent from the node as
//! if from its peer, is answered by an established socket with a
//! "challenge" ACK (RFC 5961, section 4). That ACK is the revoked flow's
//! next packet, and the reset it earns ends the socket.
//!
//! The SYN carries no data and no options and changes nothing at the pod;
//! a stray one (the socket already gone) is answered with a reset by the
//! pod itself and dropped by the node's stack.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
};

use socket2::{Domain, Protocol, Socket, Type};

const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;

/// A raw IPv4 socket in ztunnel's (the node's) network namespace.
pub struct Nudger {
    socket: Socket,
}

impl Nudger {
    pub fn new() -> io::Result<Self> {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        // The source is a pod's address, not the node's: the route lookup
        // refuses it without this.
        socket.set_ip_transparent(true)?;
        Ok(Nudger { socket })
    }

    /// Makes both ends of the connection `a` <-> `b` send a packet.
    pub fn nudge(&self, a: SocketAddrV4, b: SocketAddrV4) -> io::Result<()> {
        for (from, to) in [(b, a), (a, b)] {
            let target = SocketAddr::V4(SocketAddrV4::new(*to.ip(), 0));
            self.socket.send_to(&syn(from, to), &target.into())?;
        }
        Ok(())
    }
}

/// An IPv4 packet holding a bare TCP SYN from `src` to `dst`.
fn syn(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    // Sequence number 0, no acknowledgement; a header of 5 words.
    tcp[12] = 5 << 4;
    tcp[13] = TCP_SYN;
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12 + tcp.len());
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    tcp[16..18].copy_from_slice(&checksum(&pseudo).to_be_bytes());

    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    // Don't fragment; the kernel fills in the identification and checksum.
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = IPPROTO_TCP;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let mut packet = ip.to_vec();
    packet.extend_from_slice(&tcp);
    packet
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn the_syn_is_well_formed_and_its_checksum_verifies() {
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 12), 9000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 40000);
        let p = syn(src, dst);
        assert_eq!(p.len(), 40);
        assert_eq!(p[0], 0x45);
        assert_eq!(&p[12..16], &[198, 18, 1, 12]);
        assert_eq!(&p[16..20], &[198, 18, 1, 10]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 9000);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 40000);
        assert_eq!(p[33], TCP_SYN);
        // Summing the pseudo-header and segment, checksum included, gives 0.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, IPPROTO_TCP, 0, 20]);
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(checksum(&pseudo), 0);
    }
}
