//! Capture for pods wired to a bridge (`cni0`: flannel, the bridge plugin).
//! A socket assigned at a bridge port's ingress is never delivered (the
//! bridge takes the frame first); assigned at the bridge device's own
//! ingress it is. So capture is split in two:
//!
//! - at each port's ingress (`port_ingress`), VLAN-tagged frames are
//!   dropped (they would hide TCP from this program); a packet from an enrolled pod
//!   must come in on that pod's port (else it is dropped as spoofed) and is
//!   marked as checked; TCP with an enrolled pod at either end that is
//!   addressed to another port (pod to pod on the same bridge, which would
//!   never reach the bridge device) is re-addressed to the bridge's MAC;
//! - at the bridge device's ingress (`bridge_ingress`), the capture rules of
//!   a routed veth apply, with the port's mark standing in for the veth: an
//!   enrolled source without it came in on a port capture does not know.

use aya_ebpf::programs::TcContext;
use ztunnel_common::{pod_flags, PodInfo, CAPTURE_MARK_MASK, PORT_CHECKED_MARK};

use crate::{
    capture::{from_pods, set_mark, tcp_flow, TC_DROP, TC_NEXT},
    drops,
    maps::enrolled_pod,
    packet::ETH_HLEN,
};

/// 802.1Q and 802.1ad.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

#[inline(always)]
pub fn port_ingress(ctx: &TcContext) -> i32 {
    // A pod has no business tagging frames, and a tagged frame is one this
    // program cannot read: the bridge would forward it to another port,
    // whose pod's kernel strips the tags and accepts what is inside,
    // capture never having seen it.
    // SAFETY: reading a context field the kernel gave this program.
    let vlan_present = unsafe { (*ctx.skb.skb).vlan_present } != 0;
    let ether_type = ctx.load::<u16>(12).map(u16::from_be).unwrap_or(0);
    if vlan_present || ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        return TC_DROP;
    }
    let flow = match tcp_flow::<ETH_HLEN>(ctx) {
        Ok(flow) => flow,
        Err(verdict) => return verdict,
    };
    let src = enrolled_pod(flow.saddr);
    let dst = enrolled_pod(flow.daddr);
    if let Some(pod) = src {
        // SAFETY: reading the context field the kernel gave this program.
        let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
        if pod.ifindex != ingress {
            return drops::spoofed(ctx, &flow);
        }
        set_mark(ctx, PORT_CHECKED_MARK);
    }
    let bridged = |p: &PodInfo| p.flags & pod_flags::BRIDGED != 0;
    let Some(bridge) = src.filter(bridged).or(dst.filter(bridged)) else {
        return TC_NEXT;
    };
    if let Ok(dst_mac) = ctx.load::<[u8; 6]>(0) {
        if dst_mac != bridge.bridge_mac && ctx.store(0, &bridge.bridge_mac, 0).is_err() {
            // Left as it is, the frame would go from port to port unseen;
            // the guard would drop its SYN, but nothing else.
            return TC_DROP;
        }
    }
    TC_NEXT
}

#[inline(always)]
pub fn bridge_ingress(ctx: &TcContext) -> i32 {
    let flow = match tcp_flow::<ETH_HLEN>(ctx) {
        Ok(flow) => flow,
        Err(verdict) => return verdict,
    };
    let src = enrolled_pod(flow.saddr);
    let dst = enrolled_pod(flow.daddr);
    if src.is_none() && dst.is_none() {
        return TC_NEXT;
    }
    if src.is_some() {
        // SAFETY: reading the context field the kernel gave this program.
        let mark = unsafe { (*ctx.skb.skb).mark };
        if mark & CAPTURE_MARK_MASK != PORT_CHECKED_MARK {
            return drops::spoofed(ctx, &flow);
        }
    }
    from_pods(ctx, &flow, src, dst)
}
