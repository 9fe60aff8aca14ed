//! The capture rules, at the TC ingress of pod veths and uplinks: which
//! packets go to which ztunnel socket.
//!
//! 1. TCP that cannot be judged by its header (an IP fragment, or a header
//!    too short to read) to or from an enrolled pod is dropped.
//! 2. TCP claiming an enrolled pod's address is dropped unless it arrives on
//!    that pod's own veth.
//! 3. A packet of a flow that a ztunnel socket already owns goes to that
//!    socket. This carries accepted connections after their SYN and the
//!    return path of connections ztunnel opens from a pod's address. The
//!    SYN-ACK of a connection a node socket opened is remembered (rule 8).
//!    Past the handshake, a packet of a remembered flow between a local pod
//!    and another node is sent to the local stack without a socket lookup:
//!    the stack's own lookup (early demux) finds the owner, and rule 8 would
//!    send it there anyway if there were none.
//! 4. A SYN from an enrolled pod goes to the outbound listener (15001).
//! 5. A SYN to an enrolled pod goes to the inbound HBONE listener (15008) when
//!    addressed to port 15008, else to the inbound plaintext listener (15006).
//!    Rules 4 and 5 mark the SYN for local delivery; the sk_lookup program
//!    (`lookup`) then picks the listener inside the kernel's own lookup.
//! 6. Rules 4 and 5 fail closed: unless a ztunnel is ready to receive (its
//!    listener is in the pinned listener map), the SYN is dropped, so an
//!    enrolled pod's traffic never bypasses the mesh.
//! 7. Before rule 5 hands a plaintext SYN (not to 15008) to userspace, the
//!    policy tables may drop it: they hold only what userspace would deny
//!    without knowing an identity, which a plaintext connection never has.
//! 8. A packet to or from an enrolled pod that no ztunnel socket owns: if
//!    capture took its flow's SYN, or handed its SYN-ACK to a node socket
//!    (both remembered in an LRU map), it goes to the local stack (a
//!    cookie handshake, or a reset), never out in clear;
//!    otherwise its flow is older than capture, and it is marked to bypass
//!    the catch-all route (which delivers TCP to enrolled pods locally, for
//!    flows whose destination DNAT rewrote after this program ran) and
//!    forwarded.
//! 9. A SYN from an enrolled pod to a destination the pod excluded (a port,
//!    or an address range; never another enrolled pod of this node) is left
//!    uncaptured, counted, and marked to skip the catch-all route; the
//!    egress guard lets it out. Its later packets are ownerless and never
//!    captured (rule 8).
//! 10. A SYN from an enrolled pod to another enrolled pod of this node that
//!     the policy tables let pass directly ([`direct`]) is forwarded with no
//!     proxy in the path, and its flow remembered; the packets of such a
//!     flow (rule 8's ownerless ones) count its bytes and report its close.
//! 11. Everything else is left to the next program or the kernel.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use ztunnel_common::{
    listener_index, ports, PodInfo, BYPASS_MARK, CAPTURE_MARK, CAPTURE_MARK_MASK,
};

use crate::{
    direct, drops,
    maps::{
        count, enrolled_pod, excluded, is_enrolled, listener_ready, policy_denies, remember_flow,
        was_captured, Counter,
    },
    packet::{parse, Packet, TcpFlow, ETH_HLEN, TCP_FLAG_SYN},
    socket::owner_of,
};

/// TCX's "not mine, run the next program" verdict (`TCX_NEXT`).
pub const TC_NEXT: i32 = -1;
pub const TC_DROP: i32 = TC_ACT_SHOT as i32;

/// Packets entering the node from a pod's veth (always Ethernet).
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    let flow = match tcp_flow::<ETH_HLEN>(ctx) {
        Ok(flow) => flow,
        Err(verdict) => return verdict,
    };
    let src = enrolled_pod(flow.saddr);
    let dst = enrolled_pod(flow.daddr);
    if src.is_none() && dst.is_none() {
        return TC_NEXT;
    }
    if let Some(pod) = src {
        // SAFETY: reading the context field the kernel gave this program.
        let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
        if pod.ifindex != ingress {
            // Another pod (or a veth capture does not know) using this
            // pod's address: it would be tunnelled with this pod's identity.
            return drops::spoofed(ctx, &flow);
        }
    }
    from_pods(ctx, &flow, src, dst)
}

/// Rules 3-10 for a packet a local pod sent, its source already checked
/// against where it came in: on the pod's veth (routed wiring) or, for
/// bridged wiring, on its bridge port (see `bridge`).
#[inline(always)]
pub fn from_pods(
    ctx: &TcContext,
    flow: &TcpFlow,
    src: Option<PodInfo>,
    dst: Option<PodInfo>,
) -> i32 {
    let flow = *flow;
    if let (false, Some(_), Some(receiver)) = (flow.is_syn, src, dst) {
        // Same-node traffic passed in the kernel: its flow decides, before
        // the socket lookup (see `direct::track_live`).
        if let Some(verdict) = direct::track_live(ctx, &flow, &receiver) {
            return verdict;
        }
    }
    if (src.is_none() || dst.is_none()) && flow.flags & TCP_FLAG_SYN == 0 {
        return between_nodes_after_handshake(ctx, &flow);
    }
    if let Some(verdict) = to_owner(ctx, &flow) {
        return verdict;
    }
    if !flow.is_syn {
        return ownerless(ctx, &flow);
    }
    if let Some(src) = src {
        if let Some(dst) = dst {
            if direct::open(ctx, &flow, &src, &dst) {
                // Rule 10: forwarded, past the catch-all route; the egress
                // guard knows the flow.
                set_mark(ctx, BYPASS_MARK);
                return TC_NEXT;
            }
        } else if excluded(flow.saddr, flow.daddr, flow.dport) {
            count(flow.saddr, Counter::OutboundExcluded);
            set_mark(ctx, BYPASS_MARK);
            return TC_NEXT;
        }
        return to_listener(
            ctx,
            &flow,
            listener_index::OUTBOUND,
            flow.saddr,
            Counter::OutboundCaptured,
        );
    }
    inbound(ctx, &flow)
}

/// Packets entering the node from another node (or from a local pod's veth
/// that has no workload in the configuration). `L2` is the link-layer
/// header's length: `ETH_HLEN`, or 0 on L3 devices.
#[inline(always)]
pub fn from_uplink<const L2: usize>(ctx: &TcContext) -> i32 {
    let flow = match tcp_flow::<L2>(ctx) {
        Ok(flow) => flow,
        Err(verdict) => return verdict,
    };
    if is_enrolled(flow.saddr) {
        // A local enrolled pod's address never arrives from outside.
        return drops::spoofed(ctx, &flow);
    }
    if !is_enrolled(flow.daddr) {
        return TC_NEXT;
    }
    if flow.flags & TCP_FLAG_SYN == 0 {
        return between_nodes_after_handshake(ctx, &flow);
    }
    if let Some(verdict) = to_owner(ctx, &flow) {
        return verdict;
    }
    if !flow.is_syn {
        return ownerless(ctx, &flow);
    }
    inbound(ctx, &flow)
}

/// Rules 3 and 8 for a segment past the handshake (no SYN flag) between a
/// local pod and another node. A remembered flow goes to the local stack
/// with no socket lookup here: if a ztunnel socket owns it, the stack's
/// early demux finds it by its 4-tuple (and reuses the socket's cached
/// route, skipping the routing rules); if none does, the stack resets or
/// drops the segment, as rule 8 has it. Assigning the socket here cost a
/// lookup per packet, and an assigned packet skips early demux, so every
/// one also went through the routing rules. Any other flow (older than
/// capture, excluded, or evicted from the LRU map) takes rule 3's lookup,
/// then rule 8 knowing it was not captured.
///
/// Not for flows between two local pods: those may be kernel-decided
/// ([`direct`]), whose own verdicts come first. Not for SYN or SYN-ACK:
/// rule 3 remembers node-opened flows at their SYN-ACK.
#[inline(always)]
fn between_nodes_after_handshake(ctx: &TcContext, flow: &TcpFlow) -> i32 {
    if was_captured(&flow.key()) {
        return to_local_stack(ctx);
    }
    if let Some(verdict) = to_owner(ctx, flow) {
        return verdict;
    }
    if let Some(verdict) = direct::track(ctx, flow) {
        return verdict;
    }
    forward_uncaptured(ctx)
}

/// Rule 8: a packet of a flow no ztunnel socket owns. If capture took the
/// flow's SYN, ztunnel's socket is gone (a crash, a connection closed for
/// policy) or the SYN was answered with a cookie: the packet goes to the
/// local stack, which completes the cookie handshake or answers with a
/// reset (or drops it, with no ztunnel listening), and is never forwarded
/// in clear. Otherwise the flow is older than capture: forwarded as before,
/// marked to skip the catch-all route.
#[inline(always)]
fn ownerless(ctx: &TcContext, flow: &TcpFlow) -> i32 {
    if let Some(verdict) = direct::track(ctx, flow) {
        return verdict;
    }
    if was_captured(&flow.key()) {
        return to_local_stack(ctx);
    }
    forward_uncaptured(ctx)
}

/// Rule 8's verdict for a captured flow: the local stack, by the capture
/// route.
#[inline(always)]
fn to_local_stack(ctx: &TcContext) -> i32 {
    set_mark(ctx, CAPTURE_MARK);
    TC_ACT_OK as i32
}

/// Rule 8's verdict for a flow older than capture: forwarded, marked to
/// skip the catch-all route.
#[inline(always)]
fn forward_uncaptured(ctx: &TcContext) -> i32 {
    set_mark(ctx, BYPASS_MARK);
    TC_NEXT
}

/// The packet's TCP flow, or the verdict for a packet that is not one:
/// left alone if not TCP, dropped by rule 1 if it cannot be judged.
#[inline(always)]
pub fn tcp_flow<const L2: usize>(ctx: &TcContext) -> Result<TcpFlow, i32> {
    match parse::<L2>(ctx) {
        Packet::Other => Err(TC_NEXT),
        Packet::Unjudgeable {
            saddr,
            daddr,
            fragment,
        } => Err(drop_unjudgeable(ctx, saddr, daddr, fragment)),
        Packet::Tcp(flow) => Ok(flow),
    }
}

/// Rule 1, shared with the egress guard: a fragment or truncated segment
/// involving an enrolled pod is dropped and counted on that pod.
#[inline(always)]
pub fn drop_unjudgeable(ctx: &TcContext, saddr: u32, daddr: u32, fragment: bool) -> i32 {
    let pod = if is_enrolled(saddr) {
        saddr
    } else if is_enrolled(daddr) {
        daddr
    } else {
        return TC_NEXT;
    };
    let reason = if fragment {
        Counter::DroppedFragment
    } else {
        Counter::DroppedTruncated
    };
    // No port: the TCP header is what could not be read.
    drops::drop(ctx, pod, reason, saddr, daddr, 0)
}

fn inbound(ctx: &TcContext, flow: &TcpFlow) -> i32 {
    let slot = if u16::from_be(flow.dport) == ports::INBOUND_HBONE {
        listener_index::INBOUND_HBONE
    } else {
        if policy_denies(flow.saddr, flow.daddr, flow.dport) {
            return drops::drop_flow(ctx, flow.daddr, Counter::PolicyDenied, &flow);
        }
        listener_index::INBOUND_PLAINTEXT
    };
    to_listener(ctx, flow, slot, flow.daddr, Counter::InboundCaptured)
}

/// Rule 3: hands the packet to the socket that owns its flow, if there is one.
#[inline(always)]
fn to_owner(ctx: &TcContext, flow: &TcpFlow) -> Option<i32> {
    let sk = owner_of(ctx, flow)?;
    if !sk.assign(ctx) {
        // An assignment the kernel refused would otherwise be forwarded in
        // clear past the mesh.
        return Some(TC_DROP);
    }
    if flow.flags & TCP_FLAG_SYN != 0 {
        // The SYN-ACK of a connection a node socket opened (ztunnel's, from
        // a remote client's address): remembered like a captured flow, so
        // that once the socket goes first (ztunnel resets a relay that
        // broke), the peer's segments still in flight go to the local
        // stack (rule 8) instead of out to that address in clear.
        remember_flow(&flow.key());
    }
    set_mark(ctx, CAPTURE_MARK);
    Some(TC_ACT_OK as i32)
}

/// Rules 4-6: marks a SYN for local delivery to ztunnel's listener, or
/// drops it when no ztunnel is ready to receive it. The listener itself is
/// picked by the netns's sk_lookup program (see `lookup`), so the kernel's
/// TIME_WAIT handling sees the SYN.
#[inline(always)]
fn to_listener(ctx: &TcContext, flow: &TcpFlow, slot: u32, pod_be: u32, counter: Counter) -> i32 {
    if !listener_ready(slot) {
        return drops::drop_flow(ctx, pod_be, Counter::DroppedNoListener, &flow);
    }
    count(pod_be, counter);
    remember_flow(&flow.key());
    set_mark(ctx, CAPTURE_MARK);
    TC_ACT_OK as i32
}

/// Sets ztunnel's part of the packet's mark: [`CAPTURE_MARK`] for the
/// policy route that delivers it locally, [`BYPASS_MARK`] to skip the
/// catch-all route.
///
/// A function of its own (a BPF subprogram): inlined, the optimiser may
/// add the field's offset to the context pointer itself and store through
/// the modified pointer, which the verifier refuses.
#[inline(never)]
pub fn set_mark(ctx: &TcContext, value: u32) {
    // Whole-word volatile accesses: the verifier only allows 4-byte access
    // to `mark`, and the optimiser would otherwise store just the changed half.
    // SAFETY: the skb pointer is the one this program was given.
    unsafe {
        let mark = core::ptr::addr_of_mut!((*ctx.skb.skb).mark);
        let old = core::ptr::read_volatile(mark);
        core::ptr::write_volatile(mark, (old & !CAPTURE_MARK_MASK) | value);
    }
}
