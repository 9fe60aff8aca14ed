//! The capture rules: which packets go to which ztunnel socket.
//!
//! 1. A packet of a flow that a ztunnel socket already owns goes to that
//!    socket. This carries accepted connections after their SYN and the
//!    return path of connections ztunnel opens from a pod's address.
//! 2. A SYN from an enrolled pod goes to the outbound listener (15001).
//! 3. A SYN to an enrolled pod goes to the inbound HBONE listener (15008) when
//!    addressed to port 15008, else to the inbound plaintext listener (15006).
//!    Rules 2 and 3 mark the SYN for local delivery; the sk_lookup program
//!    (`lookup`) then picks the listener inside the kernel's own lookup.
//! 4. Rules 2 and 3 fail closed: with no listener the SYN is dropped, so an
//!    enrolled pod's traffic never bypasses the mesh.
//! 5. Before rule 3 hands a plaintext SYN (not to 15008) to userspace, the
//!    policy tables may drop it: they hold only what userspace would deny
//!    without knowing an identity, which a plaintext connection never has.
//! 6. Everything else is left to the next program or the kernel.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use ztunnel_common::{ports, CAPTURE_MARK, CAPTURE_MARK_MASK};

use crate::{
    maps::{count, is_enrolled, policy_denies, Counter},
    packet::{parse_tcp_flow, TcpFlow},
    socket::{listener, owner_of},
};

/// TCX's "not mine, run the next program" verdict (`TCX_NEXT`).
const TC_NEXT: i32 = -1;

/// Packets entering the node from a pod's veth.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    let Some(flow) = parse_tcp_flow(ctx) else {
        return TC_NEXT;
    };
    let src_enrolled = is_enrolled(flow.saddr);
    let dst_enrolled = is_enrolled(flow.daddr);
    if !src_enrolled && !dst_enrolled {
        return TC_NEXT;
    }
    if let Some(verdict) = to_owner(ctx, &flow) {
        return verdict;
    }
    if !flow.is_syn {
        return TC_NEXT;
    }
    if src_enrolled {
        return to_listener(
            ctx,
            &flow,
            ports::OUTBOUND_CAPTURE,
            flow.saddr,
            Counter::OutboundCaptured,
        );
    }
    inbound(ctx, &flow)
}

/// Packets entering the node from another node.
#[inline(always)]
pub fn from_uplink(ctx: &TcContext) -> i32 {
    let Some(flow) = parse_tcp_flow(ctx) else {
        return TC_NEXT;
    };
    if !is_enrolled(flow.daddr) {
        return TC_NEXT;
    }
    if let Some(verdict) = to_owner(ctx, &flow) {
        return verdict;
    }
    if !flow.is_syn {
        return TC_NEXT;
    }
    inbound(ctx, &flow)
}

fn inbound(ctx: &TcContext, flow: &TcpFlow) -> i32 {
    let port = if u16::from_be(flow.dport) == ports::INBOUND_HBONE {
        ports::INBOUND_HBONE
    } else {
        if policy_denies(flow.saddr, flow.daddr, flow.dport) {
            count(flow.daddr, Counter::PolicyDenied);
            return TC_ACT_SHOT as i32;
        }
        ports::INBOUND_PLAINTEXT
    };
    to_listener(ctx, flow, port, flow.daddr, Counter::InboundCaptured)
}

/// Rule 1: hands the packet to the socket that owns its flow, if there is one.
#[inline(always)]
fn to_owner(ctx: &TcContext, flow: &TcpFlow) -> Option<i32> {
    let sk = owner_of(ctx, flow)?;
    Some(assign(ctx, sk))
}

/// Rules 2-4: sends a SYN to ztunnel's listener, or drops it when none is
/// listening. The SYN is only marked for local delivery; the listener is
/// picked by the netns's sk_lookup program (see `lookup`), so the kernel's
/// TIME_WAIT handling sees the SYN.
#[inline(always)]
fn to_listener(ctx: &TcContext, flow: &TcpFlow, port: u16, pod_be: u32, counter: Counter) -> i32 {
    match listener(ctx, flow, port.to_be()) {
        Some(sk) => {
            drop(sk);
            count(pod_be, counter);
            mark_local(ctx);
            TC_ACT_OK as i32
        }
        None => {
            count(pod_be, Counter::DroppedNoListener);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn assign(ctx: &TcContext, sk: crate::socket::SocketRef) -> i32 {
    if !sk.assign(ctx) {
        // An assignment the kernel refused would otherwise be forwarded in
        // clear past the mesh.
        return TC_ACT_SHOT as i32;
    }
    mark_local(ctx);
    TC_ACT_OK as i32
}

/// Marks the packet for the policy route that delivers it locally.
#[inline(always)]
fn mark_local(ctx: &TcContext) {
    // Whole-word volatile accesses: the verifier only allows 4-byte access
    // to `mark`, and the optimiser would otherwise store just the changed half.
    // SAFETY: the skb pointer is the one this program was given.
    unsafe {
        let mark = core::ptr::addr_of_mut!((*ctx.skb.skb).mark);
        let old = core::ptr::read_volatile(mark);
        core::ptr::write_volatile(mark, (old & !CAPTURE_MARK_MASK) | CAPTURE_MARK);
    }
}
