//! Listener selection (BPF sk_lookup) for captured SYNs.
//!
//! The TC programs only mark a captured SYN for local delivery; the kernel's
//! own TCP demux then finds the listener through this program. Going through
//! the kernel's lookup rather than assigning the listener from TC matters
//! when a TIME_WAIT socket of an earlier relayed connection holds the same
//! 4-tuple: the kernel retires it for a new SYN only on this path (as it
//! does for TPROXY); assigned from TC, the SYN would be dropped as a
//! duplicate for up to a minute.
//!
//! The program's link is pinned, so it outlives a crashed ztunnel: a
//! captured lookup whose listener is gone is dropped here rather than left
//! to the normal lookup, which could hand it to a node service listening on
//! every address.

use aya_ebpf::{bindings::sk_action, programs::SkLookupContext};
use ztunnel_common::{listener_index, pod_flags, ports, PodInfo};

use crate::maps::{enrolled_pod, is_enrolled, ZT_LISTENERS};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
/// `BPF_SK_LOOKUP_F_REPLACE`: another instance of this program (an older
/// ztunnel's, during a restart) may have selected the same socket already.
const REPLACE: u64 = 1;

#[inline(always)]
pub fn steer(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the context pointer is the one this program was given.
    let (family, protocol, remote, local, local_port, ingress) = unsafe {
        let l = &*ctx.lookup;
        (
            l.family,
            l.protocol,
            l.remote_ip4,
            l.local_ip4,
            l.local_port,
            l.ingress_ifindex,
        )
    };
    if family != AF_INET || protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    // Outbound only for what arrived on the pod's own veth (or, for a
    // bridged pod, on its bridge, whose program checked the port): ztunnel's
    // own connections from a pod's address to a node-local service come in
    // on loopback and must reach that service.
    let from_pod = |pod: PodInfo| {
        if pod.flags & pod_flags::BRIDGED != 0 {
            pod.bridge == ingress
        } else {
            pod.ifindex == ingress
        }
    };
    let slot = if enrolled_pod(remote).is_some_and(from_pod) {
        listener_index::OUTBOUND
    } else if is_enrolled(local) {
        if local_port == ports::INBOUND_HBONE as u32 {
            listener_index::INBOUND_HBONE
        } else {
            listener_index::INBOUND_PLAINTEXT
        }
    } else {
        return sk_action::SK_PASS;
    };
    match ZT_LISTENERS.redirect_sk_lookup(ctx, slot, REPLACE) {
        Ok(()) => sk_action::SK_PASS,
        // Captured, and no ztunnel to take it: fail closed.
        Err(_) => sk_action::SK_DROP,
    }
}
