//! Types and constants shared by the kernel programs (`ztunnel-ebpf`) and the
//! userspace daemon (`ztunnel`).
//!
//! Everything that crosses the kernel/userspace boundary through a map is
//! `#[repr(C)]` and made of plain integers: no enums, no `Option`, no padding
//! the verifier or the other side could misread.
#![no_std]

/// Ports ztunnel listens on, the same as Istio's ztunnel so existing tooling fits.
pub mod ports {
    /// Transparent listener for connections captured leaving an enrolled pod.
    pub const OUTBOUND_CAPTURE: u16 = 15001;
    /// Transparent listener for plaintext connections captured entering an enrolled pod.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// Transparent listener for HBONE (mTLS HTTP/2 CONNECT) tunnels.
    pub const INBOUND_HBONE: u16 = 15008;
    /// Admin API, bound to localhost.
    pub const ADMIN: u16 = 15000;
    /// Prometheus metrics.
    pub const METRICS: u16 = 15020;
    /// Readiness probe.
    pub const READINESS: u16 = 15021;
}

/// The `skb->mark` the TC programs set on packets they assign to a ztunnel
/// socket. A policy-routing rule in ztunnel's netns sends marked packets to a
/// table whose only route is `local 0.0.0.0/0 dev lo`, so the kernel delivers
/// them locally, to the assigned socket, whatever their destination address.
pub const CAPTURE_MARK: u32 = 0x0539_0000;
/// Mask for [`CAPTURE_MARK`] and [`BYPASS_MARK`], so other users of the
/// mark's low bits coexist.
pub const CAPTURE_MARK_MASK: u32 = 0xffff_0000;
/// Routing table holding the `local` route for marked packets.
pub const CAPTURE_ROUTE_TABLE: u32 = 0x539;
/// Priority of the `ip rule` selecting [`CAPTURE_ROUTE_TABLE`]. ztunnel's
/// rules come early (80-84), before the rules CNIs install (AWS VPC CNI's at
/// 512 and 1536, for example), which would otherwise route captured packets
/// away before ztunnel's are consulted.
pub const CAPTURE_RULE_PRIORITY: u32 = 81;

/// The mark the TC programs set on packets to an enrolled pod that belong
/// to a flow older than capture (no SYN, no ztunnel socket): they are left
/// to normal forwarding, past the catch-all route.
pub const BYPASS_MARK: u32 = 0x0538_0000;
/// The mark a bridge port's program sets on a packet from an enrolled pod
/// that came in on that pod's own port: the bridge device's program, which
/// cannot see the port, captures a packet with an enrolled source only if
/// it carries this mark.
pub const PORT_CHECKED_MARK: u32 = 0x0537_0000;
/// Routing table of the catch-all: a `local` route for every enrolled pod's
/// address. TCP to an enrolled pod that capture did not take at ingress
/// (its destination was rewritten by DNAT after TC saw it: a Kubernetes
/// service through kube-proxy, a NodePort, a hostPort) is delivered
/// locally, to ztunnel's inbound listener, instead of forwarded.
pub const CATCHALL_ROUTE_TABLE: u32 = 0x53a;
/// Priorities of ztunnel's other rules, around [`CAPTURE_RULE_PRIORITY`]:
/// locally originated packets (and the kernel's reverse-path checks of
/// locally delivered ones) skip all of ztunnel's rules (80); packets marked
/// [`BYPASS_MARK`] skip the catch-all (82); TCP looks up
/// [`CATCHALL_ROUTE_TABLE`] (83); the last is the target of the skips.
pub const SKIP_LOCAL_RULE_PRIORITY: u32 = 80;
pub const SKIP_BYPASS_RULE_PRIORITY: u32 = 82;
pub const CATCHALL_RULE_PRIORITY: u32 = 83;
pub const RULES_END_PRIORITY: u32 = 84;

/// Names of the maps, as the eBPF object declares and pins them.
pub mod maps {
    /// Enrolled pods, keyed by IPv4 address: [`super::PodKey`] -> [`super::PodInfo`].
    pub const ENROLLED_PODS: &str = "ZT_ENROLLED_PODS";
    /// Per-pod counters: [`super::PodKey`] -> [`super::PodCounters`] (per CPU).
    pub const POD_COUNTERS: &str = "ZT_POD_COUNTERS";
    /// The two policy tables (LPM tries of [`super::PolicyTuple`] ->
    /// [`super::PolicyVerdict`]); [`POLICY_ACTIVE`] says which one is live.
    /// Userspace fills the idle one, then flips the switch, so the datapath
    /// never sees a half-written policy.
    pub const POLICY_TABLES: [&str; 2] = ["ZT_POLICY_A", "ZT_POLICY_B"];
    /// One `u32`: the index of the live policy table.
    pub const POLICY_ACTIVE: &str = "ZT_POLICY_ACTIVE";
    /// The flows capture took, by their SYN's [`super::FlowKey`] (LRU).
    /// A later packet of such a flow that finds no ztunnel socket (ztunnel
    /// crashed, or closed it for policy; or the SYN was answered with a
    /// cookie) must not be forwarded in clear: it goes to the local stack,
    /// which completes a cookie handshake or answers with a reset.
    pub const CAPTURED_FLOWS: &str = "ZT_CAPTURED_FLOWS";
    /// ztunnel's listening sockets, by [`super::listener_index`]: what the
    /// kernel delivers captured SYNs to. Pinned, so the TC programs see
    /// whether a ztunnel is ready to receive whatever process is running:
    /// a slot is filled only once routing and listener lookup are in place,
    /// emptied at a clean stop, and emptied by the kernel itself when the
    /// socket closes (a crash). An empty slot means "drop the SYN".
    pub const LISTENERS: &str = "ZT_LISTENERS";
    /// Outbound destinations pods opted out of capture (an LPM trie of
    /// [`super::ExclusionKey`] -> `u8`). Empty unless a pod asks.
    pub const OUTBOUND_EXCLUSIONS: &str = "ZT_OUTBOUND_EXCLUSIONS";
    /// Same-node connections the kernel let pass with no proxy in the path
    /// (an LRU hash of the SYN's [`super::FlowKey`] ->
    /// [`super::DirectFlow`]): their byte counts, and whether userspace
    /// revoked them.
    pub const DIRECT_FLOWS: &str = "ZT_DIRECT_FLOWS";
    /// A ring buffer of [`super::DirectEvent`]s: a direct connection opened
    /// or closed. Userspace turns them into metrics and access log lines.
    pub const DIRECT_EVENTS: &str = "ZT_DIRECT_EVENTS";
}

/// Slots of the listener map.
pub mod listener_index {
    pub const OUTBOUND: u32 = 0;
    pub const INBOUND_PLAINTEXT: u32 = 1;
    pub const INBOUND_HBONE: u32 = 2;
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// TC ingress on a pod's host-side veth: everything the pod sends.
    pub const POD_INGRESS: &str = "zt_pod_ingress";
    /// TC ingress on an uplink with an Ethernet header: everything other
    /// nodes send to this node.
    pub const UPLINK_INGRESS: &str = "zt_uplink_ingress";
    /// [`UPLINK_INGRESS`] for L3 devices (IPIP, WireGuard, TUN), whose
    /// packets start at the IP header.
    pub const UPLINK_INGRESS_L3: &str = "zt_uplink_ingress_l3";
    /// TC ingress on every port of a bridge that enrolled pods sit behind
    /// (`cni0`): checks a pod's source address against its port, and sends
    /// TCP between two ports to the bridge device itself, where capture
    /// happens (assigning a socket on a bridge port does not deliver).
    pub const PORT_INGRESS: &str = "zt_port_ingress";
    /// TC ingress on such a bridge device: capture for its pods.
    pub const BRIDGE_INGRESS: &str = "zt_bridge_ingress";
    /// TC egress on every pod veth and uplink: drops a forwarded SYN (or a
    /// fragment) to or from an enrolled pod, which capture must have taken
    /// at ingress; one that got this far came in where capture was not
    /// (a veth not synced yet, a device ztunnel does not know).
    pub const GUARD_EGRESS: &str = "zt_guard_egress";
    /// [`GUARD_EGRESS`] for L3 devices.
    pub const GUARD_EGRESS_L3: &str = "zt_guard_egress_l3";
    /// The netns's listener lookup (BPF sk_lookup): picks ztunnel's
    /// listener for captured SYNs, also when a TIME_WAIT socket holds the
    /// same 4-tuple (the kernel then retires it, as it does for TPROXY).
    pub const LISTENER_LOOKUP: &str = "zt_listener_lookup";
}

/// Capacity of each policy table (entries, not policies).
pub const MAX_POLICY_ENTRIES: u32 = 65536;

/// The part of a connection the kernel can judge without an identity: the
/// key of the policy tables. LPM tries match from the first bit, so the
/// exact part (destination, port) comes first and the source prefix last:
/// a key's prefix length is `POLICY_FIXED_BITS + source prefix length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyTuple {
    /// Destination pod address, network byte order.
    pub dst_ipv4_be: u32,
    /// Destination port, network byte order; 0 means "any port without
    /// entries of its own".
    pub dst_port_be: u16,
    pub _pad: u16,
    /// Source address, network byte order.
    pub src_ipv4_be: u32,
}

/// Bits of [`PolicyTuple`] before the source address.
pub const POLICY_FIXED_BITS: u32 = 64;

/// A policy table's answer for a region of sources.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyVerdict {
    /// [`verdict::DENY`] or [`verdict::PASS`].
    pub verdict: u32,
}

/// Capacity of the outbound exclusion table (all pods together).
pub const MAX_EXCLUSIONS: u32 = 16384;

/// A destination a pod's outbound flows skip capture for. An LPM trie key:
/// the pod and port are exact (the first [`EXCLUSION_FIXED_BITS`]) and the
/// destination a prefix. Port 0 means any port; an excluded port is the
/// destination `0.0.0.0/0` on that port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExclusionKey {
    /// The pod, network byte order.
    pub pod_ipv4_be: u32,
    /// Destination port, network byte order, or 0.
    pub dst_port_be: u16,
    pub _pad: u16,
    /// Destination address, network byte order.
    pub dst_ipv4_be: u32,
}

/// Bits of [`ExclusionKey`] before the destination address.
pub const EXCLUSION_FIXED_BITS: u32 = 64;

/// Values of [`PolicyVerdict::verdict`].
pub mod verdict {
    /// Leave it to userspace (which may still deny).
    pub const PASS: u32 = 0;
    /// Userspace would deny this connection whatever else it learns: drop
    /// the SYN in the kernel.
    pub const DENY: u32 = 1;
    /// Only in an entry for one local enrolled pod's address (a /32), looked
    /// up for a SYN from that pod to a local enrolled destination:
    /// authorization allows the connection with the source's identity and
    /// nothing needs userspace (no waypoint, no dry-run policy). It passes
    /// in the kernel, with no proxy in the path. For any other source (a
    /// plaintext connection never comes from an enrolled pod) it means
    /// [`PASS`].
    pub const DIRECT: u32 = 2;
}

/// Capacity of the direct-flows map (least recently used flows go first).
pub const MAX_DIRECT_FLOWS: u32 = 65536;
/// Size of the direct-events ring buffer, in bytes (a power of two and a
/// multiple of the page size): about 4,000 events of slack for userspace.
pub const DIRECT_EVENTS_BYTES: u32 = 256 * 1024;

/// Bits of [`DirectFlow::state`].
pub mod direct_state {
    /// The initiator sent a FIN.
    pub const FIN_REQUEST: u32 = 1;
    /// The destination sent a FIN.
    pub const FIN_RESPONSE: u32 = 2;
    /// Its close was reported (both FINs, or a reset); or userspace
    /// revoked it and reported the close itself.
    pub const CLOSED: u32 = 4;
    /// Authorization no longer allows it: every later packet goes to the
    /// local stack, which answers with a reset.
    pub const REVOKED: u32 = 8;
}

/// A connection the kernel passed between two local pods.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectFlow {
    /// `bpf_ktime_get_ns` at the SYN.
    pub opened_ns: u64,
    /// TCP payload bytes from the initiator (Istio's "received").
    pub request_bytes: u64,
    /// TCP payload bytes back to the initiator (Istio's "sent").
    pub response_bytes: u64,
    /// [`direct_state`] bits.
    pub state: u32,
    pub _pad: u32,
    /// Where the initiator's packets are delivered: learned from its SYN.
    pub initiator: DirectEnd,
    /// Where the destination's packets are delivered: learned from its
    /// first packet (the SYN-ACK). Until then, the initiator's packets go
    /// through the node's routing.
    pub destination: DirectEnd,
}

/// One end of a [`DirectFlow`], as its own packets show it on its host-side
/// veth: what a packet to it needs to be handed straight to the pod
/// (`bpf_redirect_peer`), past the node's routing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectEnd {
    /// The pod's MAC address: its packets' source.
    pub mac: [u8; 6],
    /// The host-side veth's MAC address: its packets' destination (the
    /// pod's gateway).
    pub gateway_mac: [u8; 6],
    /// The host-side veth's ifindex; 0 while not learned.
    pub ifindex: u32,
}

/// Values of [`DirectEvent::kind`].
pub mod direct_event {
    pub const OPENED: u32 = 1;
    pub const CLOSED: u32 = 2;
}

/// What the kernel tells userspace about a direct connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectEvent {
    /// [`direct_event`] value.
    pub kind: u32,
    /// The connection, as its SYN named it.
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// The flow's counters at the event (zero at open).
    pub flow: DirectFlow,
}

/// Capacity of the enrolled-pods map; one node rarely runs more than a few
/// hundred pods.
pub const MAX_PODS: u32 = 4096;

/// Capacity of the captured-flows map (least recently used flows go first).
pub const MAX_CAPTURED_FLOWS: u32 = 65536;

/// A TCP flow as its SYN named it, addresses and ports in network byte
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl FlowKey {
    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// Key of the per-pod maps: the pod's IPv4 address in network byte order, as
/// it appears in the packet (so the kernel side never converts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub ipv4_be: u32,
}

impl PodKey {
    /// Key for an address given as its four octets.
    pub const fn from_octets(octets: [u8; 4]) -> Self {
        PodKey {
            ipv4_be: u32::from_ne_bytes(octets),
        }
    }

    /// The four octets of the address.
    pub const fn octets(&self) -> [u8; 4] {
        self.ipv4_be.to_ne_bytes()
    }
}

/// Bits of [`PodInfo::flags`].
pub mod pod_flags {
    /// The pod's traffic is captured (it is a local workload with `protocol: HBONE`).
    pub const ENROLLED: u32 = 1;
    /// The pod sits behind a bridge ([`super::PodInfo::bridge`]).
    pub const BRIDGED: u32 = 2;
}

/// What the kernel knows about a local pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// [`pod_flags`] bits.
    pub flags: u32,
    /// Host-side veth ifindex: the only interface the pod's own packets may
    /// arrive on. 0 while the veth is not known yet (nothing may claim the
    /// pod's address then). For a bridged pod, its port on the bridge.
    pub ifindex: u32,
    /// For a bridged pod ([`pod_flags::BRIDGED`]): the bridge's ifindex and
    /// MAC address, where TCP to or from the pod is sent to be captured.
    pub bridge: u32,
    pub bridge_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Counters the TC programs keep per pod (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// New outbound flows assigned to the outbound listener.
    pub outbound_captured: u64,
    /// New inbound flows assigned to the inbound plaintext or HBONE listener.
    pub inbound_captured: u64,
    /// New flows dropped because no ztunnel listener was there (fail closed).
    pub dropped_no_listener: u64,
    /// Plaintext SYNs dropped in the kernel by authorization policy.
    pub policy_denied: u64,
    /// IP fragments of TCP to or from the pod, dropped: a normal stack sets
    /// DF and never fragments TCP, and a fragment can hide a SYN.
    pub dropped_fragment: u64,
    /// TCP segments to or from the pod too short to hold a TCP header.
    pub dropped_truncated: u64,
    /// TCP claiming the pod's address that did not come from its veth.
    pub dropped_spoofed: u64,
    /// SYNs to or from the pod about to be forwarded past capture, dropped
    /// on the way out (see `GUARD_EGRESS`).
    pub dropped_uncaptured: u64,
    /// New outbound flows left uncaptured because the pod excludes their
    /// destination ([`maps::OUTBOUND_EXCLUSIONS`]).
    pub outbound_excluded: u64,
    /// New same-node flows from the pod that passed in the kernel with no
    /// proxy in the path ([`verdict::DIRECT`]).
    pub outbound_direct: u64,
}

impl PodCounters {
    /// Field-wise sum (userspace adds up the per-CPU copies).
    pub const fn plus(self, other: PodCounters) -> PodCounters {
        PodCounters {
            outbound_captured: self.outbound_captured + other.outbound_captured,
            inbound_captured: self.inbound_captured + other.inbound_captured,
            dropped_no_listener: self.dropped_no_listener + other.dropped_no_listener,
            policy_denied: self.policy_denied + other.policy_denied,
            dropped_fragment: self.dropped_fragment + other.dropped_fragment,
            dropped_truncated: self.dropped_truncated + other.dropped_truncated,
            dropped_spoofed: self.dropped_spoofed + other.dropped_spoofed,
            dropped_uncaptured: self.dropped_uncaptured + other.dropped_uncaptured,
            outbound_excluded: self.outbound_excluded + other.outbound_excluded,
            outbound_direct: self.outbound_direct + other.outbound_direct,
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] integers with no padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::PodKey {}
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::PolicyTuple {}
    unsafe impl aya::Pod for super::PolicyVerdict {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ExclusionKey {}
    unsafe impl aya::Pod for super::DirectFlow {}
    unsafe impl aya::Pod for super::DirectEvent {}
}
