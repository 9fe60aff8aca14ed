//! The maps shared with userspace, pinned by name so a restarted ztunnel
//! re-adopts them (userspace is the single source of truth; the kernel only
//! reads enrollment and bumps counters).

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuHashMap},
};
use ztunnel_common::{pod_flags, PodCounters, PodInfo, PodKey, MAX_PODS};

#[map(name = "ZT_ENROLLED_PODS")]
static ZT_ENROLLED_PODS: HashMap<PodKey, PodInfo> = HashMap::pinned(MAX_PODS, 0);

#[map(name = "ZT_POD_COUNTERS")]
static ZT_POD_COUNTERS: PerCpuHashMap<PodKey, PodCounters> = PerCpuHashMap::pinned(MAX_PODS, 0);

/// Whether the address (network byte order) is an enrolled local pod.
#[inline(always)]
pub fn is_enrolled(ipv4_be: u32) -> bool {
    match ZT_ENROLLED_PODS.get_ptr(PodKey { ipv4_be }) {
        // SAFETY: the pointer comes from a successful map lookup and the value
        // is plain integers; a concurrent update can at worst show old flags.
        Some(info) => unsafe { (*info).flags & pod_flags::ENROLLED != 0 },
        None => false,
    }
}

/// Which counter of a pod to bump.
#[derive(Clone, Copy)]
pub enum Counter {
    OutboundCaptured,
    InboundCaptured,
    DroppedNoListener,
}

/// Bumps a pod's counter. Userspace creates the entry when it enrolls the pod;
/// an unknown pod is not counted (the map never grows from the datapath).
#[inline(always)]
pub fn count(ipv4_be: u32, counter: Counter) {
    if let Some(c) = ZT_POD_COUNTERS.get_ptr_mut(PodKey { ipv4_be }) {
        // SAFETY: per-CPU value, so no other CPU writes it concurrently.
        unsafe {
            match counter {
                Counter::OutboundCaptured => (*c).outbound_captured += 1,
                Counter::InboundCaptured => (*c).inbound_captured += 1,
                Counter::DroppedNoListener => (*c).dropped_no_listener += 1,
            }
        }
    }
}
