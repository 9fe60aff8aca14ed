//! The maps shared with userspace, pinned by name so a restarted ztunnel
//! re-adopts them (userspace is the single source of truth; the kernel only
//! reads enrollment and policy, and bumps counters).

use aya_ebpf::{
    helpers::generated::{bpf_map_lookup_elem, bpf_sk_release},
    macros::map,
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, LruHashMap, PerCpuHashMap, RingBuf, SockMap,
    },
};
use ztunnel_common::{
    pod_flags, verdict, DirectFlow, ExclusionKey, FlowKey, PodCounters, PodInfo, PodKey,
    PolicyTuple, PolicyVerdict, DIRECT_EVENTS_BYTES, EXCLUSION_FIXED_BITS, MAX_CAPTURED_FLOWS,
    MAX_DIRECT_FLOWS, MAX_EXCLUSIONS, MAX_PODS, MAX_POLICY_ENTRIES, POLICY_FIXED_BITS,
};

#[map(name = "ZT_ENROLLED_PODS")]
static ZT_ENROLLED_PODS: HashMap<PodKey, PodInfo> = HashMap::pinned(MAX_PODS, 0);

#[map(name = "ZT_POD_COUNTERS")]
static ZT_POD_COUNTERS: PerCpuHashMap<PodKey, PodCounters> = PerCpuHashMap::pinned(MAX_PODS, 0);

#[map(name = "ZT_POLICY_A")]
static ZT_POLICY_A: LpmTrie<PolicyTuple, PolicyVerdict> = LpmTrie::pinned(MAX_POLICY_ENTRIES, 0);

#[map(name = "ZT_POLICY_B")]
static ZT_POLICY_B: LpmTrie<PolicyTuple, PolicyVerdict> = LpmTrie::pinned(MAX_POLICY_ENTRIES, 0);

#[map(name = "ZT_POLICY_ACTIVE")]
static ZT_POLICY_ACTIVE: Array<u32> = Array::pinned(1, 0);

/// ztunnel's listening sockets by `listener_index`. A slot holds a socket
/// only while a ztunnel is ready to receive on it; the kernel empties the
/// slot itself when the socket closes.
#[map(name = "ZT_LISTENERS")]
pub static ZT_LISTENERS: SockMap = SockMap::pinned(3, 0);

#[map(name = "ZT_CAPTURED_FLOWS")]
static ZT_CAPTURED_FLOWS: LruHashMap<FlowKey, u8> = LruHashMap::pinned(MAX_CAPTURED_FLOWS, 0);

#[map(name = "ZT_DIRECT_FLOWS")]
pub static ZT_DIRECT_FLOWS: LruHashMap<FlowKey, DirectFlow> =
    LruHashMap::pinned(MAX_DIRECT_FLOWS, 0);

#[map(name = "ZT_DIRECT_EVENTS")]
pub static ZT_DIRECT_EVENTS: RingBuf = RingBuf::pinned(DIRECT_EVENTS_BYTES, 0);

#[map(name = "ZT_OUTBOUND_EXCLUSIONS")]
static ZT_OUTBOUND_EXCLUSIONS: LpmTrie<ExclusionKey, u8> = LpmTrie::pinned(MAX_EXCLUSIONS, 0);

/// Whether the pod `pod` (network byte order) excludes new flows to
/// `dst:port` from capture: by the port, or by a range holding `dst`.
#[inline(always)]
pub fn excluded(pod: u32, dst: u32, port: u16) -> bool {
    for port in [port, 0] {
        let key = Key::new(
            EXCLUSION_FIXED_BITS + 32,
            ExclusionKey {
                pod_ipv4_be: pod,
                dst_port_be: port,
                _pad: 0,
                dst_ipv4_be: dst,
            },
        );
        if ZT_OUTBOUND_EXCLUSIONS.get(&key).is_some() {
            return true;
        }
    }
    false
}

/// Remembers that capture took the flow this SYN opens.
#[inline(always)]
pub fn remember_flow(key: &FlowKey) {
    let _ = ZT_CAPTURED_FLOWS.insert(key, &1, 0);
}

/// Whether capture took this flow (seen in either direction).
#[inline(always)]
pub fn was_captured(key: &FlowKey) -> bool {
    let reverse = key.reversed();
    // SAFETY: only the presence of a plain value is read.
    unsafe { ZT_CAPTURED_FLOWS.get(key).is_some() || ZT_CAPTURED_FLOWS.get(&reverse).is_some() }
}

/// Whether authorization policy denies a plaintext connection from `src`
/// to `dst:port` (all network byte order) whatever else userspace learns.
/// A port with entries of its own is judged by them; any other port by the
/// port-0 entries.
#[inline(always)]
pub fn policy_denies(src: u32, dst: u32, port: u16) -> bool {
    policy_verdict(src, dst, port) == verdict::DENY
}

/// The live policy table's verdict for `src` to `dst:port` (all network
/// byte order): [`verdict::PASS`] where it has no entry.
#[inline(always)]
pub fn policy_verdict(src: u32, dst: u32, port: u16) -> u32 {
    let table = match ZT_POLICY_ACTIVE.get(0) {
        Some(1) => &ZT_POLICY_B,
        _ => &ZT_POLICY_A,
    };
    for port in [port, 0] {
        let key = Key::new(
            POLICY_FIXED_BITS + 32,
            PolicyTuple {
                dst_ipv4_be: dst,
                dst_port_be: port,
                _pad: 0,
                src_ipv4_be: src,
            },
        );
        if let Some(v) = table.get(&key) {
            return v.verdict;
        }
    }
    verdict::PASS
}

/// The enrolled pod with this address (network byte order), if any.
#[inline(always)]
pub fn enrolled_pod(ipv4_be: u32) -> Option<PodInfo> {
    let info = ZT_ENROLLED_PODS.get_ptr(PodKey { ipv4_be })?;
    // SAFETY: the pointer comes from a successful map lookup and the value
    // is plain integers; a concurrent update can at worst show old values.
    let info = unsafe { *info };
    (info.flags & pod_flags::ENROLLED != 0).then_some(info)
}

/// Whether the address (network byte order) is an enrolled local pod.
#[inline(always)]
pub fn is_enrolled(ipv4_be: u32) -> bool {
    enrolled_pod(ipv4_be).is_some()
}

/// Whether a ztunnel is ready to receive on listener `slot`.
#[inline(always)]
pub fn listener_ready(slot: u32) -> bool {
    // SAFETY: a lookup in a sockmap returns a referenced socket or null;
    // the reference is released right away.
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::addr_of!(ZT_LISTENERS) as *mut _,
            core::ptr::addr_of!(slot) as *const _,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
        true
    }
}

/// Which counter of a pod to bump.
#[derive(Clone, Copy)]
pub enum Counter {
    OutboundCaptured,
    InboundCaptured,
    DroppedNoListener,
    PolicyDenied,
    DroppedFragment,
    DroppedTruncated,
    DroppedSpoofed,
    DroppedUncaptured,
    OutboundExcluded,
    OutboundDirect,
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
                Counter::PolicyDenied => (*c).policy_denied += 1,
                Counter::DroppedFragment => (*c).dropped_fragment += 1,
                Counter::DroppedTruncated => (*c).dropped_truncated += 1,
                Counter::DroppedSpoofed => (*c).dropped_spoofed += 1,
                Counter::DroppedUncaptured => (*c).dropped_uncaptured += 1,
                Counter::OutboundExcluded => (*c).outbound_excluded += 1,
                Counter::OutboundDirect => (*c).outbound_direct += 1,
            }
        }
    }
}
