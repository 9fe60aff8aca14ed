//! Capture in the kernel: loading ztunnel's programs, attaching them to the
//! pods' veths and the uplinks, the listener lookup, and keeping the pinned
//! maps in step with the workloads userspace knows.
//!
//! Userspace is the single source of truth; the kernel only reads the maps
//! and bumps counters. The order of every step here keeps one promise: at
//! no instant does a SYN to or from an enrolled pod leave in clear or reach
//! a socket that is not ztunnel's. Maps are filled before programs that read
//! them run; listeners are published (the kernel's "ready to receive") only
//! after routing and the listener lookup are in place; and the egress guard
//! drops whatever got past ingress capture.

mod abi;
mod attach;
pub mod bpffs;
pub mod kernel_log;
pub mod netlink;
pub mod topology;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
    os::fd::RawFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap, PerCpuValues, RingBuf,
        SockMap,
    },
    programs::{SchedClassifier, SkLookup},
    Ebpf, EbpfLoader,
};
use ztunnel_common::{
    direct_state, listener_index, maps, pod_flags, programs, DirectFlow, ExclusionKey, FlowKey,
    PodCounters, PodInfo, PodKey, PolicyTuple, PolicyVerdict, EXCLUSION_FIXED_BITS,
};

pub use attach::{Attached, Role};
pub use topology::{Interface, LinkLayer, Topology};

/// The eBPF object built by build.rs from `ztunnel-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel.bpf.o"));

/// The embedded eBPF object, for giving back its pages once loaded.
pub(crate) fn embedded_object() -> &'static [u8] {
    EBPF_OBJECT
}

/// Every TC program in the object.
/// How often capture is moved back in front at one hook within
/// [`MOVES_WINDOW`] before it gives up there until the window ends.
const MAX_MOVES: u32 = 5;
const MOVES_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

const CLASSIFIERS: [&str; 7] = [
    programs::POD_INGRESS,
    programs::PORT_INGRESS,
    programs::BRIDGE_INGRESS,
    programs::UPLINK_INGRESS,
    programs::UPLINK_INGRESS_L3,
    programs::GUARD_EGRESS,
    programs::GUARD_EGRESS_L3,
];

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not on a bpffs; pass a --bpf-pin-dir beneath a mounted bpffs")]
    NotBpffs(PathBuf),
    #[error("refusing to pin at {path}: {why}. Pins there would vanish when ztunnel exits, detaching capture and letting enrolled pods' traffic out in clear. Run ztunnel in the host's mount namespace (e.g. `nsenter --net=/run/netns/NAME ztunnel ...`, not `ip netns exec`), or give its container the host's /sys/fs/bpf")]
    PrivatePins { path: PathBuf, why: String },
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF programs: {0}")]
    Load(String),
    #[error("attaching to {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
}

/// One entry of a kernel policy table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyEntry {
    pub tuple: PolicyTuple,
    /// `POLICY_FIXED_BITS` + source prefix length.
    pub prefix_len: u32,
    pub verdict: PolicyVerdict,
}

/// A local workload as capture sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPod {
    pub ip: Ipv4Addr,
    /// Captured (a local workload with `protocol: HBONE`).
    pub enrolled: bool,
    /// Outbound destinations the pod's traffic skips capture for.
    pub exclusions: crate::config::local::CaptureExclusions,
}

/// What should be captured on this node.
#[derive(Debug, Clone, Default)]
pub struct CapturePlan {
    pub pods: Vec<PlannedPod>,
    /// Uplinks named on the command line; empty means found automatically.
    pub uplinks: Vec<String>,
}

/// The state of one local pod after a sync.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodCapture {
    pub ip: Ipv4Addr,
    pub enrolled: bool,
    /// The host-side veth, if the pod's route was found.
    pub interface: Option<String>,
    pub ifindex: Option<u32>,
    /// Whether the pod program is attached to the veth.
    pub attached: bool,
    /// Whether the kernel captures the pod's traffic now. An enrolled pod
    /// that is not captured yet is still enrolled in the kernel: its
    /// traffic is dropped until its veth is attached, never let through.
    pub captured: bool,
}

/// What a sync left in place.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaptureStatus {
    pub pods: Vec<PodCapture>,
    /// Devices with the ingress capture program (traffic from elsewhere).
    pub uplinks: Vec<String>,
    /// Devices with the egress guard.
    pub guarded: Vec<String>,
    /// What could not be done, one line each (a vanished uplink, a device
    /// whose packets capture cannot parse). The rest was synced regardless.
    pub errors: Vec<String>,
}

/// The loaded programs and the pinned maps of one ztunnel instance.
pub struct Capture {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    links_dir: PathBuf,
    enrolled: BpfHashMap<MapData, PodKey, PodInfo>,
    counters: PerCpuHashMap<MapData, PodKey, PodCounters>,
    policy_tables: [LpmTrie<MapData, PolicyTuple, PolicyVerdict>; 2],
    policy_active: Array<MapData, u32>,
    exclusions: LpmTrie<MapData, ExclusionKey, u8>,
    /// ztunnel's listening sockets, as the kernel sees them (pinned).
    listeners: SockMap<MapData>,
    /// Same-node connections passed in the kernel, and the ring buffer
    /// that reports them (taken by the reporter, see `proxy::direct`).
    direct_flows: BpfHashMap<MapData, FlowKey, DirectFlow>,
    direct_events: Option<RingBuf<MapData>>,
    /// Links this process attached or re-adopted; others are re-adopted on
    /// first sight, then left alone.
    owned_links: HashSet<String>,
    /// This process's TC programs by id (copies included), to find them
    /// in a hook's chain.
    our_programs: std::collections::HashMap<u32, &'static str>,
    /// The programs loaded at start (not copies).
    original_programs: HashSet<u32>,
    /// How often each hook (by pin name) had capture moved back in front.
    moves: std::collections::HashMap<String, (u32, std::time::Instant)>,
    /// Maps of an incompatible earlier ztunnel, kept pinned (and serving its
    /// programs) until every link runs this process's programs.
    retired_maps: Option<PathBuf>,
    /// Whether the programs describe their drops (see [`kernel_log`]).
    kernel_log: bool,
}

impl Capture {
    /// Loads the programs, creating the pinned maps or re-adopting the ones
    /// an earlier ztunnel left in `pin_dir`. Nothing is attached yet.
    pub fn open(pin_dir: &Path) -> Result<Self, RedirectError> {
        bpffs::ensure_pin_dir(pin_dir)?;
        let maps_dir = bpffs::maps_dir(pin_dir);
        let links_dir = bpffs::links_dir(pin_dir);
        for dir in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| RedirectError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let retired_maps = abi::retire_incompatible(&maps_dir)?;
        let kernel_log = kernel_log::wanted();
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        kernel_log::configure(&mut loader, kernel_log);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| RedirectError::Load(e.to_string()))?;
        kernel_log::follow(&mut ebpf, kernel_log);
        let mut our_programs = std::collections::HashMap::new();
        for name in CLASSIFIERS {
            let program = classifier(&mut ebpf, name)?;
            program
                .load()
                .map_err(|e| RedirectError::Load(format!("{name}: {e}")))?;
            let info = program
                .info()
                .map_err(|e| RedirectError::Load(format!("{name}: {e}")))?;
            our_programs.insert(info.id(), name);
        }
        let original_programs = our_programs.keys().copied().collect();
        lookup_program(&mut ebpf)?
            .load()
            .map_err(|e| RedirectError::Load(format!("{}: {e}", programs::LISTENER_LOOKUP)))?;
        let enrolled = take_map(&mut ebpf, maps::ENROLLED_PODS, BpfHashMap::try_from)?;
        let counters = take_map(&mut ebpf, maps::POD_COUNTERS, |m| {
            PerCpuHashMap::try_from(m)
        })?;
        let [a, b] = maps::POLICY_TABLES;
        let policy_tables = [
            take_map(&mut ebpf, a, LpmTrie::try_from)?,
            take_map(&mut ebpf, b, LpmTrie::try_from)?,
        ];
        let policy_active = take_map(&mut ebpf, maps::POLICY_ACTIVE, Array::try_from)?;
        let listeners = take_map(&mut ebpf, maps::LISTENERS, SockMap::try_from)?;
        let exclusions = take_map(&mut ebpf, maps::OUTBOUND_EXCLUSIONS, LpmTrie::try_from)?;
        let direct_flows = take_map(&mut ebpf, maps::DIRECT_FLOWS, BpfHashMap::try_from)?;
        let direct_events = take_map(&mut ebpf, maps::DIRECT_EVENTS, RingBuf::try_from)?;
        Ok(Capture {
            direct_flows,
            direct_events: Some(direct_events),
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            links_dir,
            enrolled,
            counters,
            policy_tables,
            policy_active,
            exclusions,
            listeners,
            owned_links: HashSet::new(),
            our_programs,
            moves: Default::default(),
            original_programs,
            retired_maps,
            kernel_log,
        })
    }

    /// Swaps this process's programs into every link an earlier ztunnel
    /// pinned (atomically: no packet sees no program), and removes the pins
    /// of interfaces that are gone. Done before this process binds anything,
    /// so an earlier version's programs never judge this one's sockets.
    /// The maps must be filled first ([`Capture::sync_pods`]).
    pub fn readopt(&mut self, topology: &Topology) -> Vec<String> {
        let mut errors = Vec::new();
        let pins = match attach::pinned_links(&self.links_dir) {
            Ok(pins) => pins,
            Err(e) => return vec![e.to_string()],
        };
        for pin in pins {
            let current = attach::parse_pin_name(&pin).and_then(|(role, name, index)| {
                let link = topology.link_by_index(index)?;
                (link.interface.name == name).then(|| (role, link.clone()))
            });
            let result = match current {
                Some((role, link)) => self
                    .ensure_link(role, &link.interface, link.layer)
                    .map(|_| ()),
                // The interface is gone (or the pin is not one of ours).
                None => attach::detach(&self.links_dir, &pin),
            };
            if let Err(e) = result {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            if let Some(retired) = self.retired_maps.take() {
                // Every link runs our programs: nothing uses the old maps.
                if let Err(e) = std::fs::remove_dir_all(&retired) {
                    tracing::warn!(path = %retired.display(), error = %e, "removing retired maps");
                }
            }
        }
        errors
    }

    /// Attaches the listener-lookup program to the current network
    /// namespace and pins it, replacing an earlier ztunnel's: captured SYNs
    /// marked by the TC programs are delivered to the published listeners
    /// by the kernel's own lookup, or dropped when there are none.
    pub fn attach_listener_lookup(&mut self) -> Result<(), RedirectError> {
        let pin = bpffs::lookup_pin(&self.pin_dir);
        attach::attach_lookup(lookup_program(&mut self.ebpf)?, &pin)
    }

    /// Tells the kernel this process is ready to receive captured SYNs on
    /// these listeners (`listener_index` slot, socket). Until then, and
    /// after [`Capture::unpublish_listeners`] or this process's death, the
    /// TC programs drop captured SYNs.
    pub fn publish_listeners(&mut self, listeners: &[(u32, RawFd)]) -> Result<(), RedirectError> {
        for (index, fd) in listeners {
            // SAFETY: the caller's listeners outlive this call; the map takes
            // its own reference to each socket.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
            self.listeners
                .set(*index, &fd, 0)
                .map_err(|source| RedirectError::Map {
                    map: maps::LISTENERS,
                    source,
                })?;
        }
        Ok(())
    }

    /// Withdraws every listener: new captured SYNs are dropped from now on.
    pub fn unpublish_listeners(&mut self) -> Result<(), RedirectError> {
        for index in [
            listener_index::OUTBOUND,
            listener_index::INBOUND_PLAINTEXT,
            listener_index::INBOUND_HBONE,
        ] {
            match self.listeners.clear_index(&index) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RedirectError::Map {
                        map: maps::LISTENERS,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// The enrolled pods as the kernel map must hold them: every enrolled
    /// local workload, with its veth's ifindex when the veth is known (0
    /// otherwise: its address is then accepted from nowhere).
    fn wanted_pods(plan: &CapturePlan, topology: &Topology) -> BTreeMap<PodKey, PodInfo> {
        plan.pods
            .iter()
            .filter(|pod| pod.enrolled)
            .map(|pod| {
                let mut info = PodInfo {
                    flags: pod_flags::ENROLLED,
                    ifindex: 0,
                    bridge: 0,
                    bridge_mac: [0; 6],
                    _pad: [0; 2],
                };
                if let Some(veth) = topology.pod_interface(pod.ip) {
                    info.ifindex = veth.index;
                } else if let Some(bridged) = topology.bridged_pod(pod.ip) {
                    info.flags |= pod_flags::BRIDGED;
                    info.ifindex = bridged.port.map(|p| p.index).unwrap_or(0);
                    info.bridge = bridged.bridge.index;
                    info.bridge_mac = bridged.bridge_mac;
                }
                (PodKey::from_octets(pod.ip.octets()), info)
            })
            .collect()
    }

    /// Brings the enrolled-pods and counter maps to exactly what `plan`
    /// says. Enrolling a pod whose veth is not attached yet is safe: the
    /// egress guard drops its traffic until capture catches up.
    pub fn sync_pods(
        &mut self,
        plan: &CapturePlan,
        topology: &Topology,
    ) -> Result<(), RedirectError> {
        let wanted = Self::wanted_pods(plan, topology);
        self.sync_maps(&wanted)
    }

    /// Makes the kernel capture exactly what `plan` says: the maps first,
    /// then programs on every local pod's veth, every uplink, and the guard
    /// on every device traffic can leave through; stale links go last. An
    /// interface that cannot be attached is reported in the status and the
    /// rest is synced regardless.
    pub fn sync(&mut self, plan: &CapturePlan, topology: &Topology) -> CaptureStatus {
        let mut status = CaptureStatus::default();
        let maps_synced = match self.sync_pods(plan, topology) {
            Ok(()) => true,
            Err(e) => {
                status.errors.push(e.to_string());
                false
            }
        };
        // A failure leaves the rest captured: exclusions only ever let less
        // through capture.
        if let Err(e) = self.sync_exclusions(plan) {
            status.errors.push(format!("outbound exclusions: {e}"));
        }
        let mut wanted_links = BTreeSet::new();
        let mut pod_ifaces = Vec::new();
        // Bridges pods sit behind, and whether their programs are in place.
        let mut bridges: BTreeMap<u32, bool> = BTreeMap::new();
        let mut bridged_pods = Vec::new();
        for pod in &plan.pods {
            let iface = topology.pod_interface(pod.ip);
            let mut attached = false;
            if let Some(iface) = &iface {
                pod_ifaces.push(iface.index);
                attached = true;
                for role in [Role::Pod, Role::Guard] {
                    if !self.ensure_role(
                        role,
                        iface,
                        LinkLayer::Ethernet,
                        &mut wanted_links,
                        &mut status.errors,
                    ) {
                        attached = false;
                    }
                }
            } else if let Some(bridged) = topology.bridged_pod(pod.ip) {
                bridges.insert(bridged.bridge.index, true);
                bridged_pods.push(status.pods.len());
                status.pods.push(PodCapture {
                    ip: pod.ip,
                    enrolled: pod.enrolled,
                    interface: bridged.port.as_ref().map(|i| i.name.clone()),
                    ifindex: bridged.port.as_ref().map(|i| i.index),
                    // Settled below, with the bridge's own programs.
                    attached: bridged.port.is_some(),
                    captured: false,
                });
                continue;
            }
            status.pods.push(PodCapture {
                ip: pod.ip,
                enrolled: pod.enrolled,
                interface: iface.as_ref().map(|i| i.name.clone()),
                ifindex: iface.as_ref().map(|i| i.index),
                attached,
                captured: pod.enrolled && attached && maps_synced,
            });
        }
        // Bridged wiring: capture at the bridge's ingress, source checks at
        // every port's ingress, the guard at every port's egress.
        for (index, ok) in bridges.iter_mut() {
            let Some(bridge) = topology.link_by_index(*index) else {
                *ok = false;
                continue;
            };
            *ok &= self.ensure_role(
                Role::Bridge,
                &bridge.interface,
                bridge.layer,
                &mut wanted_links,
                &mut status.errors,
            );
            for port in topology.bridge_ports(*index) {
                pod_ifaces.push(port.interface.index);
                for role in [Role::Port, Role::Guard] {
                    *ok &= self.ensure_role(
                        role,
                        &port.interface,
                        port.layer,
                        &mut wanted_links,
                        &mut status.errors,
                    );
                }
            }
        }
        for i in bridged_pods {
            let pod = &mut status.pods[i];
            let bridge_ok = topology
                .bridged_pod(pod.ip)
                .is_some_and(|b| bridges.get(&b.bridge.index).copied().unwrap_or(false));
            pod.attached &= bridge_ok;
            pod.captured = pod.enrolled && pod.attached && maps_synced;
        }

        let route_devices = topology.route_devices(&pod_ifaces);
        let uplinks: Vec<topology::Link> = if plan.uplinks.is_empty() {
            // A bridge pods sit behind has its own program, not the uplink's.
            route_devices
                .iter()
                .filter(|l| !bridges.contains_key(&l.interface.index))
                .cloned()
                .collect()
        } else {
            plan.uplinks
                .iter()
                .filter_map(|name| match topology.link_by_name(name) {
                    Some(link) => Some(link.clone()),
                    None => {
                        status.errors.push(format!(
                            "uplink {name} does not exist in this network namespace"
                        ));
                        None
                    }
                })
                .collect()
        };
        let mut guarded: BTreeMap<u32, topology::Link> = BTreeMap::new();
        for link in &uplinks {
            match self.ensure_link(Role::Uplink, &link.interface, link.layer) {
                Ok(name) => {
                    wanted_links.insert(name);
                    status.uplinks.push(link.interface.name.clone());
                }
                Err(e) => {
                    wanted_links.insert(attach::pin_name(Role::Uplink, &link.interface));
                    status.errors.push(e.to_string());
                }
            }
            guarded.insert(link.interface.index, link.clone());
        }
        for link in route_devices {
            guarded.insert(link.interface.index, link);
        }
        for link in guarded.values() {
            match self.ensure_link(Role::Guard, &link.interface, link.layer) {
                Ok(name) => {
                    wanted_links.insert(name);
                    status.guarded.push(link.interface.name.clone());
                }
                Err(e) => {
                    wanted_links.insert(attach::pin_name(Role::Guard, &link.interface));
                    status.errors.push(e.to_string());
                }
            }
        }

        match attach::pinned_links(&self.links_dir) {
            Ok(pins) => {
                for stale in pins.into_iter().filter(|p| !wanted_links.contains(p)) {
                    match attach::detach(&self.links_dir, &stale) {
                        Ok(()) => {
                            self.owned_links.remove(&stale);
                            tracing::info!(link = %stale, "detached");
                        }
                        Err(e) => status.errors.push(e.to_string()),
                    }
                }
            }
            Err(e) => status.errors.push(e.to_string()),
        }
        status
    }

    /// The ports of the bridged pods in the pinned enrolled-pods map (as an
    /// earlier ztunnel found them).
    pub fn bridged_ports(&self) -> BTreeMap<Ipv4Addr, u32> {
        self.enrolled
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, info)| info.flags & pod_flags::BRIDGED != 0 && info.ifindex != 0)
            .map(|(key, info)| (Ipv4Addr::from(key.octets()), info.ifindex))
            .collect()
    }

    /// Keeps capture first at every hook it holds: a program another agent
    /// attached in front of ours (a CNI re-attaching with "before all")
    /// could redirect pod traffic past capture. Other programs stay where
    /// they are, behind ours. Returns the interfaces where ours was moved
    /// back, and what could not be checked.
    pub fn keep_first(&mut self) -> (Vec<String>, Vec<String>) {
        let (mut moved, mut errors) = (Vec::new(), Vec::new());
        let Ok(pins) = attach::pinned_links(&self.links_dir) else {
            return (moved, errors);
        };
        for pin in pins {
            let Some((role, ifname, index)) = attach::parse_pin_name(&pin) else {
                continue;
            };
            let chain = match attach::chain(ifname, role) {
                Ok(chain) => chain,
                // A device that went away: the next sync removes its pin.
                Err(_) => continue,
            };
            let Some(position) = chain
                .iter()
                .position(|id| self.our_programs.contains_key(id))
            else {
                continue;
            };
            if position == 0 {
                continue;
            }
            // An agent that insists on going first too would have us
            // reload a program every check, forever: after a few rounds
            // capture stays where it is, and the operator is told.
            let now = std::time::Instant::now();
            let (moves, since) = self.moves.entry(pin.clone()).or_insert((0, now));
            if now.duration_since(*since) > MOVES_WINDOW {
                (*moves, *since) = (0, now);
            }
            *moves += 1;
            if *moves > MAX_MOVES {
                if *moves == MAX_MOVES + 1 {
                    errors.push(format!(
                        "{ifname}: another program keeps putting itself in front of capture ({MAX_MOVES} times in {} s); leaving it there for now", MOVES_WINDOW.as_secs()
                    ));
                }
                continue;
            }
            let iface = Interface {
                name: ifname.to_string(),
                index,
            };
            match self.move_to_front(chain[position], role, &iface) {
                Ok(()) => {
                    tracing::warn!(iface = %ifname, ?role, ahead = position, "another program had moved ahead of capture; capture is first again");
                    moved.push(ifname.to_string());
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        (moved, errors)
    }

    /// Attaches the program with id `ours` again, first at `role`'s hook of
    /// `iface`, replacing its link there. The kernel refuses one program
    /// twice on a hook, so the new link runs a fresh copy of it (same code,
    /// same pinned maps), loaded for the purpose.
    fn move_to_front(
        &mut self,
        ours: u32,
        role: Role,
        iface: &Interface,
    ) -> Result<(), RedirectError> {
        let name = *self
            .our_programs
            .get(&ours)
            .ok_or_else(|| RedirectError::Load(format!("program {ours} is not ours")))?;
        let maps_dir = bpffs::maps_dir(&self.pin_dir);
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        kernel_log::configure(&mut loader, self.kernel_log);
        let mut copy = loader
            .load(EBPF_OBJECT)
            .map_err(|e| RedirectError::Load(e.to_string()))?;
        kernel_log::follow(&mut copy, self.kernel_log);
        let program = classifier(&mut copy, name)?;
        program
            .load()
            .map_err(|e| RedirectError::Load(format!("{name}: {e}")))?;
        let id = program
            .info()
            .map_err(|e| RedirectError::Load(format!("{name}: {e}")))?
            .id();
        attach::move_to_front(program, &self.links_dir, role, iface)?;
        // The link holds the copy from now on. A copy it replaced runs
        // nowhere else (the originals may, on other hooks).
        self.our_programs.insert(id, name);
        if !self.original_programs.contains(&ours) {
            self.our_programs.remove(&ours);
        }
        Ok(())
    }

    /// [`Capture::ensure_link`], recording the link as wanted (also when it
    /// failed: whatever is attached there stays) and the error, if any.
    /// Returns whether it is in place.
    fn ensure_role(
        &mut self,
        role: Role,
        iface: &Interface,
        layer: LinkLayer,
        wanted: &mut BTreeSet<String>,
        errors: &mut Vec<String>,
    ) -> bool {
        match self.ensure_link(role, iface, layer) {
            Ok(name) => {
                wanted.insert(name);
                true
            }
            Err(e) => {
                wanted.insert(attach::pin_name(role, iface));
                errors.push(format!("{}: {e}", iface.name));
                false
            }
        }
    }

    fn ensure_link(
        &mut self,
        role: Role,
        iface: &Interface,
        layer: LinkLayer,
    ) -> Result<String, RedirectError> {
        let name = attach::pin_name(role, iface);
        let pinned = self.links_dir.join(&name).exists();
        if self.owned_links.contains(&name) && pinned {
            return Ok(name);
        }
        let program_name = role.program(layer).ok_or_else(|| RedirectError::Attach {
            iface: iface.name.clone(),
            message: format!("capture cannot parse this device's packets ({layer:?} link layer)"),
        })?;
        let links_dir = self.links_dir.clone();
        let outcome = attach::attach(
            classifier(&mut self.ebpf, program_name)?,
            &links_dir,
            role,
            iface,
        )?;
        tracing::info!(iface = %iface.name, ifindex = iface.index, ?role, ?layer, ?outcome, "capture attached");
        self.owned_links.insert(name.clone());
        Ok(name)
    }

    fn sync_maps(&mut self, wanted: &BTreeMap<PodKey, PodInfo>) -> Result<(), RedirectError> {
        let map_err = |map| move |source| RedirectError::Map { map, source };
        // Removals first: both maps hold at most MAX_PODS, so a full map
        // could otherwise never be brought to a new set of pods.
        let present: Vec<PodKey> = self.enrolled.keys().filter_map(Result::ok).collect();
        for key in present.iter().filter(|k| !wanted.contains_key(k)) {
            self.enrolled
                .remove(key)
                .map_err(map_err(maps::ENROLLED_PODS))?;
            tracing::info!(pod = %Ipv4Addr::from(key.octets()), "un-enrolled");
        }
        let present_counters: Vec<PodKey> = self.counters.keys().filter_map(Result::ok).collect();
        for key in present_counters.iter().filter(|k| !wanted.contains_key(k)) {
            self.counters
                .remove(key)
                .map_err(map_err(maps::POD_COUNTERS))?;
        }
        // Counters before enrollment, so the first captured SYN is counted.
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| RedirectError::Load(format!("counting CPUs: {e}")))?;
        for key in wanted.keys().filter(|k| !present_counters.contains(k)) {
            let zeros = PerCpuValues::try_from(vec![PodCounters::default(); cpus])
                .map_err(|e| RedirectError::Load(format!("per-CPU counters: {e}")))?;
            self.counters
                .insert(key, zeros, 0)
                .map_err(map_err(maps::POD_COUNTERS))?;
        }
        for (key, info) in wanted {
            let current = self.enrolled.get(key, 0).ok();
            if current != Some(*info) {
                self.enrolled
                    .insert(key, info, 0)
                    .map_err(map_err(maps::ENROLLED_PODS))?;
                let pod = Ipv4Addr::from(key.octets());
                match current {
                    None => tracing::info!(%pod, ifindex = info.ifindex, "enrolled"),
                    // A pod recreated with the same address, or its veth
                    // found late: the kernel now checks and delivers by
                    // the new one.
                    Some(was) if was.ifindex != info.ifindex => {
                        tracing::info!(%pod, ifindex = info.ifindex, was = was.ifindex, "pod's veth changed")
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Brings the exclusion table to exactly the enrolled pods' exclusions.
    fn sync_exclusions(&mut self, plan: &CapturePlan) -> Result<(), RedirectError> {
        let map_err = |source| RedirectError::Map {
            map: maps::OUTBOUND_EXCLUSIONS,
            source,
        };
        let wanted = exclusion_entries(plan);
        let present: Vec<LpmKey<ExclusionKey>> =
            self.exclusions.keys().filter_map(Result::ok).collect();
        let present_set: BTreeSet<(u32, ExclusionKey)> =
            present.iter().map(|k| (k.prefix_len(), k.data())).collect();
        for key in present
            .iter()
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
        {
            self.exclusions.remove(key).map_err(map_err)?;
        }
        for (prefix_len, data) in wanted.difference(&present_set) {
            self.exclusions
                .insert(&LpmKey::new(*prefix_len, *data), 1, 0)
                .map_err(map_err)?;
        }
        Ok(())
    }

    /// Replaces the kernel's policy entries with `entries`, atomically from
    /// the datapath's point of view: the idle table is rewritten, then the
    /// switch flips to it. Returns how many entries are live.
    pub fn set_policy(&mut self, entries: &[PolicyEntry]) -> Result<usize, RedirectError> {
        let map_err = |map| move |source| RedirectError::Map { map, source };
        let active = self
            .policy_active
            .get(&0, 0)
            .map_err(map_err(maps::POLICY_ACTIVE))?;
        let idle = if active == 1 { 0 } else { 1 };
        let name = maps::POLICY_TABLES[idle];
        let table = &mut self.policy_tables[idle];
        let stale: Vec<LpmKey<PolicyTuple>> = table.keys().filter_map(Result::ok).collect();
        for key in &stale {
            table.remove(key).map_err(map_err(name))?;
        }
        for entry in entries {
            let key = LpmKey::new(entry.prefix_len, entry.tuple);
            table
                .insert(&key, entry.verdict, 0)
                .map_err(map_err(name))?;
        }
        self.policy_active
            .set(0, idle as u32, 0)
            .map_err(map_err(maps::POLICY_ACTIVE))?;
        Ok(entries.len())
    }

    /// Switches the kernel to an empty policy table: it then denies nothing
    /// and leaves every decision to userspace. For when the tables cannot
    /// hold a new policy set: stale entries would keep denying what the new
    /// policies allow.
    pub fn clear_policy(&mut self) -> Result<(), RedirectError> {
        self.set_policy(&[]).map(|_| ())
    }

    /// The live policy table's verdict for a plaintext connection, looked up
    /// in the kernel's own map exactly as the datapath does (for checks).
    pub fn policy_verdict(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        port: u16,
    ) -> Result<Option<PolicyVerdict>, RedirectError> {
        let map_err = |map| move |source| RedirectError::Map { map, source };
        let active = self
            .policy_active
            .get(&0, 0)
            .map_err(map_err(maps::POLICY_ACTIVE))?;
        let table = &self.policy_tables[if active == 1 { 1 } else { 0 }];
        for port in [port, 0] {
            let key = LpmKey::new(
                ztunnel_common::POLICY_FIXED_BITS + 32,
                PolicyTuple {
                    dst_ipv4_be: u32::from_ne_bytes(dst.octets()),
                    dst_port_be: port.to_be(),
                    _pad: 0,
                    src_ipv4_be: u32::from_ne_bytes(src.octets()),
                },
            );
            match table.get(&key, 0) {
                Ok(v) => return Ok(Some(v)),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => {
                    return Err(RedirectError::Map {
                        map: "policy table",
                        source: e,
                    })
                }
            }
        }
        Ok(None)
    }

    /// The ring buffer the kernel reports same-node direct connections on;
    /// `None` once taken.
    pub fn take_direct_events(&mut self) -> Option<RingBuf<MapData>> {
        self.direct_events.take()
    }

    /// The same-node direct connections the kernel holds (closed ones too,
    /// until its LRU reuses their entries).
    pub fn direct_flows(&self) -> Vec<(FlowKey, DirectFlow)> {
        self.direct_flows.iter().filter_map(Result::ok).collect()
    }

    /// Marks a same-node direct connection closed, so the kernel does not
    /// report its close; with `revoke`, its later packets go to the local
    /// stack, which resets it. Returns the flow as it stood (its bytes), or
    /// `None` if the kernel no longer holds it.
    pub fn end_direct(
        &mut self,
        key: &FlowKey,
        revoke: bool,
    ) -> Result<Option<DirectFlow>, RedirectError> {
        let map_err = |source| RedirectError::Map {
            map: maps::DIRECT_FLOWS,
            source,
        };
        let mut flow = match self.direct_flows.get(key, 0) {
            Ok(flow) => flow,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err(e)),
        };
        flow.state |= direct_state::CLOSED;
        if revoke {
            flow.state |= direct_state::REVOKED;
        }
        // Replacing the value may lose the bytes of a packet counted in
        // between; the verdict is what matters.
        self.direct_flows.insert(key, flow, 0).map_err(map_err)?;
        Ok(Some(flow))
    }

    /// The addresses the enrolled-pods map holds now.
    pub fn enrolled_addresses(&self) -> BTreeSet<Ipv4Addr> {
        self.enrolled
            .keys()
            .filter_map(Result::ok)
            .map(|k| Ipv4Addr::from(k.octets()))
            .collect()
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, RedirectError> {
    ebpf.program_mut(name)
        .ok_or_else(|| RedirectError::Load(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e| RedirectError::Load(format!("program {name}: {e}")))
}

fn lookup_program(ebpf: &mut Ebpf) -> Result<&mut SkLookup, RedirectError> {
    let name = programs::LISTENER_LOOKUP;
    ebpf.program_mut(name)
        .ok_or_else(|| RedirectError::Load(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e| RedirectError::Load(format!("program {name}: {e}")))
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, MapError>,
) -> Result<T, RedirectError> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| RedirectError::Load(format!("map {name} missing from the object")))?;
    convert(map).map_err(|source| RedirectError::Map { map: name, source })
}

/// The exclusion table's entries for `plan`'s enrolled pods: an excluded
/// port is any destination on that port, a range any port.
fn exclusion_entries(plan: &CapturePlan) -> BTreeSet<(u32, ExclusionKey)> {
    let mut out = BTreeSet::new();
    for pod in plan.pods.iter().filter(|p| p.enrolled) {
        let pod_ipv4_be = u32::from_ne_bytes(pod.ip.octets());
        for port in &pod.exclusions.outbound_ports {
            let key = ExclusionKey {
                pod_ipv4_be,
                dst_port_be: port.to_be(),
                _pad: 0,
                dst_ipv4_be: 0,
            };
            out.insert((EXCLUSION_FIXED_BITS, key));
        }
        for range in &pod.exclusions.outbound_ip_ranges {
            let key = ExclusionKey {
                pod_ipv4_be,
                dst_port_be: 0,
                _pad: 0,
                dst_ipv4_be: u32::from_ne_bytes(range.network().octets()),
            };
            out.insert((EXCLUSION_FIXED_BITS + u32::from(range.prefix_len()), key));
        }
    }
    out
}

/// Removes everything one ztunnel instance pinned: links (detaching the
/// programs), the listener lookup and maps. For uninstalling; a restart
/// must not do this.
pub fn remove_pins(pin_dir: &Path) -> Result<(), RedirectError> {
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RedirectError::PinDir {
            path: pin_dir.to_path_buf(),
            source,
        }),
    }
}
