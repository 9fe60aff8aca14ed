//! Same-node connections with no proxy in the path.
//!
//! When a local enrolled pod opens a connection to another local enrolled
//! pod, the node owns both ends, and the source's identity is bound to the
//! veth the SYN came in on (capture rule 2). Userspace compiles, for every
//! such pair and port, whether authorization allows the connection and
//! nothing else needs the proxy (no waypoint, no dry-run policy): the
//! [`verdict::DIRECT`] entries of the policy tables. A SYN they allow is
//! forwarded as it is, and the flow is remembered in `ZT_DIRECT_FLOWS`,
//! where its later packets in both directions add up its bytes. Opens and
//! closes go to userspace through a ring buffer, for Istio's metrics and
//! the access log. Anything the tables do not allow goes the userspace way,
//! which decides (and denies) it as before.
//!
//! A connection userspace revokes (a policy change denies it) is flagged:
//! its later packets go to the local stack, which has no socket for them
//! and answers with a reset.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_ktime_get_ns, bpf_redirect_peer},
    programs::TcContext,
};
use ztunnel_common::{
    direct_event, direct_state, ports, verdict, DirectEnd, DirectEvent, DirectFlow, PodInfo,
    BYPASS_MARK, CAPTURE_MARK,
};

use crate::{
    capture::{set_mark, TC_NEXT},
    maps::{count, policy_verdict, Counter, ZT_DIRECT_EVENTS, ZT_DIRECT_FLOWS},
    packet::{TcpFlow, TCP_FLAG_FIN, TCP_FLAG_RST},
};

/// Whether this SYN, from a local enrolled pod (its source already checked
/// against its veth) to the local enrolled pod `dst`, passes in the kernel.
/// If it does, the flow is remembered and its open reported.
#[inline(always)]
pub fn open(ctx: &TcContext, flow: &TcpFlow, src: &PodInfo, dst: &PodInfo) -> bool {
    if !routed(src) || !routed(dst) || is_ztunnel_port(u16::from_be(flow.dport)) {
        return false;
    }
    if policy_verdict(flow.saddr, flow.daddr, flow.dport) != verdict::DIRECT {
        return false;
    }
    let key = flow.key();
    // A retransmitted SYN finds its flow already open: reported once.
    // SAFETY: the value is plain integers; only its state is read.
    if let Some(open) = unsafe { ZT_DIRECT_FLOWS.get(&key) } {
        if open.state & direct_state::CLOSED == 0 {
            return open.state & direct_state::REVOKED == 0;
        }
    }
    let entry = DirectFlow {
        // SAFETY: a helper without arguments.
        opened_ns: unsafe { bpf_ktime_get_ns() },
        initiator: sender(ctx, src.ifindex),
        ..DirectFlow::default()
    };
    if ZT_DIRECT_FLOWS.insert(&key, &entry, 0).is_err() {
        // Untracked, it would be invisible to metrics and revocation.
        return false;
    }
    report(direct_event::OPENED, flow, &entry);
    count(flow.saddr, Counter::OutboundDirect);
    true
}

/// For a packet no ztunnel socket owns: if it belongs to a direct flow,
/// adds it to the flow's bytes and reports the close it completes, and
/// returns the packet's verdict: forwarded past the catch-all route, or,
/// for a revoked flow, to the local stack to be reset. Decided here, not
/// by the captured-flows map, which may remember an earlier connection
/// with the same addresses and ports that went through ztunnel. `None`
/// when it is not a direct flow's.
#[inline(always)]
pub fn track(ctx: &TcContext, flow: &TcpFlow) -> Option<i32> {
    track_flow(ctx, flow, None)
}

/// [`track`] for a flow that is open and allowed, `None` for anything else.
/// A live direct flow's packet is decided by this before the socket lookup,
/// which costs more than the rest of the program together (about 1 µs per
/// packet, most of it the lookup and the `sk_lookup` program it runs).
/// No ztunnel socket can own a live direct flow: its SYN was not captured,
/// and both its ends are the pods'. Closed and revoked flows take the full
/// path, where a socket ztunnel accepted for a later connection on the
/// same addresses and ports comes first. `receiver`: the enrolled pod the
/// packet is addressed to, as userspace knows it now.
#[inline(always)]
pub fn track_live(ctx: &TcContext, flow: &TcpFlow, receiver: &PodInfo) -> Option<i32> {
    track_flow(ctx, flow, Some(receiver))
}

/// `receiver` is given for live flows only (see [`track_live`]).
#[inline(always)]
fn track_flow(ctx: &TcContext, flow: &TcpFlow, receiver: Option<&PodInfo>) -> Option<i32> {
    let live_only = receiver.is_some();
    let key = flow.key();
    let (entry, request) = match ZT_DIRECT_FLOWS.get_ptr_mut(&key) {
        Some(entry) => (entry, true),
        None => (ZT_DIRECT_FLOWS.get_ptr_mut(&key.reversed())?, false),
    };
    // SAFETY: the pointer comes from a successful lookup. Two CPUs may
    // update one flow at once (each direction is usually one CPU's): a
    // lost update costs a byte count, never a verdict.
    let entry = unsafe { &mut *entry };
    if live_only && entry.state & (direct_state::CLOSED | direct_state::REVOKED) != 0 {
        return None;
    }
    if entry.state & direct_state::REVOKED != 0 {
        set_mark(ctx, CAPTURE_MARK);
        return Some(TC_ACT_OK as i32);
    }
    let (bytes, fin) = if request {
        (&mut entry.request_bytes, direct_state::FIN_REQUEST)
    } else {
        (&mut entry.response_bytes, direct_state::FIN_RESPONSE)
    };
    // Pure ACKs (most of one direction's packets) write nothing: the two
    // directions usually run on different CPUs, and each write takes the
    // entry's cache line from the other.
    if flow.payload != 0 {
        *bytes += u64::from(flow.payload);
    }
    if entry.state & direct_state::CLOSED == 0 {
        if flow.flags & TCP_FLAG_FIN != 0 {
            entry.state |= fin;
        }
        let both = direct_state::FIN_REQUEST | direct_state::FIN_RESPONSE;
        if flow.flags & TCP_FLAG_RST != 0 || entry.state & both == both {
            entry.state |= direct_state::CLOSED;
            let as_opened = if request { *flow } else { flow.reversed() };
            report(direct_event::CLOSED, &as_opened, entry);
        }
    }
    if let Some(receiver) = receiver {
        // Both ends are enrolled local pods and the sender's veth was
        // checked (capture rule 2): this packet shows where its sender
        // sits, and the other end may be known already.
        if !request && entry.destination.ifindex == 0 {
            // SAFETY: reading the context field the kernel gave this program.
            entry.destination = sender(ctx, unsafe { (*ctx.skb.skb).ingress_ifindex });
        }
        let to = if request {
            entry.destination
        } else {
            entry.initiator
        };
        // Only to the veth the receiver has now: an entry outlives its pod
        // (one deleted mid-connection, its address given to a new pod that
        // happens to reuse the ports) until userspace closes it, and its
        // learned veth may be gone or another pod's.
        if to.ifindex != 0 && to.ifindex == receiver.ifindex {
            return Some(deliver(ctx, &to));
        }
    }
    set_mark(ctx, BYPASS_MARK);
    Some(TC_NEXT)
}

/// The end that sent this packet, which came in on `ifindex`: its MAC
/// addresses as the Ethernet header has them. An unreadable header leaves
/// the end unknown, and the flow on the node's routing.
#[inline(always)]
fn sender(ctx: &TcContext, ifindex: u32) -> DirectEnd {
    match ctx.load::<[u8; 12]>(0) {
        Ok(eth) => DirectEnd {
            mac: [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]],
            gateway_mac: [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]],
            ifindex,
        },
        Err(_) => DirectEnd::default(),
    }
}

/// Hands the packet straight to the pod at `to`: addressed as its gateway
/// would address it, then moved into the pod's namespace at its side of
/// the veth (`bpf_redirect_peer`). It skips what the node's routing would
/// do for it (the routing rules, netfilter, both veth hops and the egress
/// guard, which only judges SYNs), so a same-node connection costs less
/// than it does with no mesh at all. The TTL is left as it is.
#[inline(always)]
fn deliver(ctx: &TcContext, to: &DirectEnd) -> i32 {
    let m = to.mac;
    let g = to.gateway_mac;
    let eth = [
        m[0], m[1], m[2], m[3], m[4], m[5], g[0], g[1], g[2], g[3], g[4], g[5],
    ];
    if ctx.store(0, &eth, 0).is_err() {
        // Unchanged, the packet still reaches the pod the usual way.
        set_mark(ctx, BYPASS_MARK);
        return TC_NEXT;
    }
    // SAFETY: a helper taking plain integers; from TC ingress, as it must be.
    unsafe { bpf_redirect_peer(to.ifindex, 0) as i32 }
}

/// Whether this SYN opened a direct flow (for the egress guard, which
/// drops every other forwarded SYN to or from an enrolled pod).
#[inline(always)]
pub fn is_open(flow: &TcpFlow) -> bool {
    // SAFETY: only the presence of the entry and its state are read.
    unsafe { ZT_DIRECT_FLOWS.get(&flow.key()) }
        .is_some_and(|f| f.state & (direct_state::CLOSED | direct_state::REVOKED) == 0)
}

#[inline(always)]
fn report(kind: u32, flow: &TcpFlow, entry: &DirectFlow) {
    let event = DirectEvent {
        kind,
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        flow: *entry,
    };
    // A full ring loses the event, not the packet.
    let _ = ZT_DIRECT_EVENTS.output::<DirectEvent>(&event, 0);
}

/// Bridged pods are captured at their bridge, where a pass would need its
/// own forwarding: they keep the userspace path.
#[inline(always)]
fn routed(pod: &PodInfo) -> bool {
    pod.flags & ztunnel_common::pod_flags::BRIDGED == 0
}

/// ztunnel's own ports are refused in userspace, never passed.
#[inline(always)]
fn is_ztunnel_port(port: u16) -> bool {
    port == ports::OUTBOUND_CAPTURE
        || port == ports::INBOUND_PLAINTEXT
        || port == ports::INBOUND_HBONE
        || port == ports::ADMIN
        || port == ports::METRICS
        || port == ports::READINESS
}
