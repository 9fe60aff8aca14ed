//! The egress guard, at the TC egress of every pod veth and uplink: the
//! backstop that makes capture fail closed wherever traffic came in.
//!
//! Every legitimate new connection to or from an enrolled pod is taken at
//! ingress and re-originated by ztunnel from a local socket. So a SYN that
//! is being *forwarded* (no local socket owns the packet) to or from an
//! enrolled pod got past capture: it entered through a veth capture has not
//! synced yet, a device ztunnel does not know, or a routing rule that went
//! missing. It is dropped and counted, as are fragments and truncated
//! segments that did the same. A SYN a pod excluded from capture (capture
//! rule 9) passes, as does one capture let pass directly between two local
//! pods (capture rule 10). Locally originated packets (ztunnel's own
//! connections, the node's health probes) came in on no device and pass.

use aya_ebpf::programs::TcContext;
use ztunnel_common::{BYPASS_MARK, CAPTURE_MARK_MASK};

use crate::{
    capture::{drop_unjudgeable, TC_NEXT},
    direct, drops,
    maps::{excluded, is_enrolled, Counter},
    packet::{parse, Packet},
};

#[inline(always)]
pub fn egress<const L2: usize>(ctx: &TcContext) -> i32 {
    // SAFETY: reading the context field the kernel gave this program. A
    // packet this node received (and now forwards, routed or bridged or
    // redirected) carries the index of the device it came in on; only one
    // a local socket originated has none. (A received packet may still hold
    // its sender's socket when it skipped IP input, so that is no test.)
    let originated_here = unsafe { (*ctx.skb.skb).ingress_ifindex == 0 };
    if originated_here {
        return TC_NEXT;
    }
    match parse::<L2>(ctx) {
        Packet::Other => TC_NEXT,
        Packet::Unjudgeable {
            saddr,
            daddr,
            fragment,
        } => drop_unjudgeable(ctx, saddr, daddr, fragment),
        Packet::Tcp(flow) if flow.is_syn => {
            let pod = if is_enrolled(flow.daddr) {
                flow.daddr
            } else if is_enrolled(flow.saddr) {
                // The pod's own exclusion, which capture let pass and
                // marked so; unmarked, it came in where capture was not.
                // SAFETY: reading a context field the kernel gave this program.
                let mark = unsafe { (*ctx.skb.skb).mark } & CAPTURE_MARK_MASK;
                if mark == BYPASS_MARK && excluded(flow.saddr, flow.daddr, flow.dport) {
                    return TC_NEXT;
                }
                flow.saddr
            } else {
                return TC_NEXT;
            };
            // A same-node flow capture let pass directly (capture rule 10).
            // SAFETY: reading a context field the kernel gave this program.
            let mark = unsafe { (*ctx.skb.skb).mark } & CAPTURE_MARK_MASK;
            if mark == BYPASS_MARK && direct::is_open(&flow) {
                return TC_NEXT;
            }
            drops::drop_flow(ctx, pod, Counter::DroppedUncaptured, &flow)
        }
        Packet::Tcp(_) => TC_NEXT,
    }
}
