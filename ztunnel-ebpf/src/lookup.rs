//! Listener selection (BPF sk_lookup) for captured SYNs.
//!
//! The TC programs only mark a captured SYN for local delivery; the kernel's
//! own TCP demux then finds the listener through this program. Going through
//! the kernel's lookup rather than assigning the listener from TC matters
//! when a TIME_WAIT socket of an earlier relayed connection holds the same
//! 4-tuple: the kernel retires it for a new SYN only on this path (as it
//! does for TPROXY); assigned from TC, the SYN would be dropped as a
//! duplicate for up to a minute.

use aya_ebpf::{bindings::sk_action, macros::map, maps::SockMap, programs::SkLookupContext};
use ztunnel_common::{listener_index, ports};

use crate::maps::is_enrolled;

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;

#[map(name = "ZT_LISTENERS")]
static ZT_LISTENERS: SockMap = SockMap::with_max_entries(3, 0);

#[inline(always)]
pub fn steer(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the context pointer is the one this program was given.
    let (family, protocol, remote, local, local_port) = unsafe {
        let l = &*ctx.lookup;
        (
            l.family,
            l.protocol,
            l.remote_ip4,
            l.local_ip4,
            l.local_port,
        )
    };
    if family != AF_INET || protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let index = if is_enrolled(remote) {
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
    // No listener registered: the normal lookup runs (and the TC programs
    // already dropped captured SYNs while nothing listens).
    let _ = ZT_LISTENERS.redirect_sk_lookup(ctx, index, 0);
    sk_action::SK_PASS
}
