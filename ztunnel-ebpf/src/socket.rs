//! Socket lookup and assignment. Every socket a lookup returns holds a
//! reference that must be released on every path; the types here make that
//! impossible to forget.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::generated::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};

use crate::packet::TcpFlow;

/// `sk->state` of a listening socket.
const TCP_LISTEN: u32 = 10;
/// `sk->state` of a closed connection lingering in TIME_WAIT.
const TCP_TIME_WAIT: u32 = 6;

/// A socket reference from `bpf_skc_lookup_tcp`, released on drop.
pub struct SocketRef(*mut bpf_sock);

impl SocketRef {
    fn state(&self) -> u32 {
        // SAFETY: non-null pointer returned by the lookup helper; the verifier
        // allows reading `state` from a socket reference.
        unsafe { (*self.0).state }
    }

    /// Steers the packet to this socket. Returns whether the kernel accepted.
    pub fn assign(self, ctx: &TcContext) -> bool {
        // SAFETY: valid skb and socket pointers; flags must be 0.
        let ret = unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, self.0 as *mut _, 0) };
        ret == 0
    }
}

impl Drop for SocketRef {
    fn drop(&mut self) {
        // SAFETY: the pointer came from bpf_skc_lookup_tcp and is released once.
        unsafe {
            bpf_sk_release(self.0 as *mut _);
        }
    }
}

fn lookup(ctx: &TcContext, saddr: u32, daddr: u32, sport: u16, dport: u16) -> Option<SocketRef> {
    // SAFETY: a zeroed tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = daddr;
    tuple.__bindgen_anon_1.ipv4.sport = sport;
    tuple.__bindgen_anon_1.ipv4.dport = dport;
    // SAFETY: the size passed is that of the IPv4 member, which is initialised.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            &mut tuple,
            // The IPv4 part of the union: 2 addresses and 2 ports.
            12,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        None
    } else {
        Some(SocketRef(sk))
    }
}

/// The non-listening socket in this netns that owns exactly this flow, if
/// any: a connection ztunnel accepted or opened (with a spoofed source).
#[inline(always)]
pub fn owner_of(ctx: &TcContext, flow: &TcpFlow) -> Option<SocketRef> {
    let sk = lookup(ctx, flow.saddr, flow.daddr, flow.sport, flow.dport)?;
    // The lookup falls back to a listener bound to the destination port; a
    // listener does not own the flow (and may be an unrelated node service).
    // A TIME_WAIT socket is a finished connection that happened to use the
    // same ports: a new SYN on that 4-tuple is a new flow, and assigning it
    // to the TIME_WAIT socket would have the kernel answer RST.
    let state = sk.state();
    if state == TCP_LISTEN || state == TCP_TIME_WAIT {
        return None;
    }
    Some(sk)
}
