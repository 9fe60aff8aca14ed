//! Capture in the kernel: loading ztunnel's TC programs, attaching them to the
//! pods' veths and the uplinks, and keeping the pinned maps in step with the
//! workloads userspace knows.
//!
//! Userspace is the single source of truth; the kernel only reads the
//! enrolled-pods map and bumps counters.

mod attach;
pub mod bpffs;
pub mod routing;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap, PerCpuValues, SockMap,
    },
    programs::{SchedClassifier, SkLookup},
    Ebpf, EbpfLoader,
};
use ztunnel_common::{
    maps, pod_flags, programs, PodCounters, PodInfo, PodKey, PolicyTuple, PolicyVerdict,
};

pub use attach::{Attached, Role};
pub use routing::Interface;

/// The eBPF object built by build.rs from `ztunnel-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not on a bpffs; pass a --bpf-pin-dir beneath a mounted bpffs")]
    NotBpffs(PathBuf),
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF programs: {0}")]
    Load(String),
    #[error("attaching to {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("`ip {args}` failed: {message}")]
    Ip { args: String, message: String },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("uplink {0} does not exist in this network namespace")]
    NoSuchUplink(String),
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
    /// Whether the program is attached to the veth.
    pub attached: bool,
    /// Whether the kernel captures the pod's traffic now.
    pub captured: bool,
}

/// What a sync left in place.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaptureStatus {
    pub pods: Vec<PodCapture>,
    pub uplinks: Vec<String>,
}

/// The loaded programs and the pinned maps of one ztunnel instance.
pub struct Capture {
    ebpf: Ebpf,
    links_dir: PathBuf,
    enrolled: BpfHashMap<MapData, PodKey, PodInfo>,
    counters: PerCpuHashMap<MapData, PodKey, PodCounters>,
    policy_tables: [LpmTrie<MapData, PolicyTuple, PolicyVerdict>; 2],
    policy_active: Array<MapData, u32>,
    /// Links this process attached or re-adopted; others are re-adopted on
    /// first sight, then left alone.
    owned_links: HashSet<String>,
    /// This process's listening sockets, for the sk_lookup program.
    listeners: SockMap<MapData>,
}

impl Capture {
    /// Loads the programs, creating the pinned maps or re-adopting the ones
    /// an earlier ztunnel left in `pin_dir`.
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
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(EBPF_OBJECT)
            .map_err(|e| RedirectError::Load(e.to_string()))?;
        for name in [programs::POD_INGRESS, programs::UPLINK_INGRESS] {
            program(&mut ebpf, name)?
                .load()
                .map_err(|e| RedirectError::Load(format!("{name}: {e}")))?;
        }
        let enrolled = take_map(&mut ebpf, maps::ENROLLED_PODS, |m| BpfHashMap::try_from(m))?;
        let counters = take_map(&mut ebpf, maps::POD_COUNTERS, |m| {
            PerCpuHashMap::try_from(m)
        })?;
        let [a, b] = maps::POLICY_TABLES;
        let policy_tables = [
            take_map(&mut ebpf, a, |m| LpmTrie::try_from(m))?,
            take_map(&mut ebpf, b, |m| LpmTrie::try_from(m))?,
        ];
        let policy_active = take_map(&mut ebpf, maps::POLICY_ACTIVE, |m| Array::try_from(m))?;
        let listeners = take_map(&mut ebpf, maps::LISTENERS, |m| SockMap::try_from(m))?;
        Ok(Capture {
            ebpf,
            links_dir,
            enrolled,
            counters,
            policy_tables,
            policy_active,
            listeners,
            owned_links: HashSet::new(),
        })
    }

    /// Hands the kernel this process's listening sockets and attaches the
    /// listener-lookup program to the current network namespace, for as long
    /// as this process lives: captured SYNs marked by the TC programs are
    /// then delivered to these listeners by the kernel's own lookup.
    pub fn serve_listeners(
        &mut self,
        listeners: &[(u32, std::os::fd::RawFd)],
    ) -> Result<(), RedirectError> {
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
        let netns =
            std::fs::File::open("/proc/self/ns/net").map_err(|source| RedirectError::PinDir {
                path: PathBuf::from("/proc/self/ns/net"),
                source,
            })?;
        let program: &mut SkLookup = self
            .ebpf
            .program_mut(programs::LISTENER_LOOKUP)
            .ok_or_else(|| {
                RedirectError::Load(format!(
                    "program {} missing from the object",
                    programs::LISTENER_LOOKUP
                ))
            })?
            .try_into()
            .map_err(|e| {
                RedirectError::Load(format!("program {}: {e}", programs::LISTENER_LOOKUP))
            })?;
        program
            .load()
            .map_err(|e| RedirectError::Load(format!("{}: {e}", programs::LISTENER_LOOKUP)))?;
        program.attach(netns).map_err(|e| RedirectError::Attach {
            iface: "network namespace (sk_lookup)".into(),
            message: e.to_string(),
        })?;
        Ok(())
    }

    /// Makes the kernel capture exactly what `plan` says: programs on every
    /// local pod's veth and every uplink, the enrolled-pods map holding the
    /// enrolled pods whose veth carries the program, and nothing else.
    ///
    /// Order matters for never leaking a flow in clear: a pod is attached
    /// before it is enrolled, and un-enrolled before it is detached.
    pub fn sync(&mut self, plan: &CapturePlan) -> Result<CaptureStatus, RedirectError> {
        let mut status = CaptureStatus::default();
        let mut wanted_links = BTreeSet::new();
        let mut wanted_pods: BTreeMap<PodKey, PodInfo> = BTreeMap::new();
        let mut pod_ifaces = Vec::new();
        let routes = routing::RouteTable::read()?;

        for pod in &plan.pods {
            let iface = routes.pod_interface(pod.ip);
            let mut attached = false;
            if let Some(iface) = &iface {
                pod_ifaces.push(iface.name.clone());
                match self.ensure_link(Role::Pod, iface) {
                    Ok(name) => {
                        wanted_links.insert(name);
                        attached = true;
                    }
                    // One pod's veth vanishing mid-sync must not stop the others.
                    Err(e) => {
                        tracing::warn!(pod = %pod.ip, error = %e, "cannot attach to pod veth")
                    }
                }
            }
            let captured = pod.enrolled && attached;
            if captured {
                if let Some(iface) = &iface {
                    wanted_pods.insert(
                        PodKey::from_octets(pod.ip.octets()),
                        PodInfo {
                            flags: pod_flags::ENROLLED,
                            ifindex: iface.index,
                        },
                    );
                }
            }
            status.pods.push(PodCapture {
                ip: pod.ip,
                enrolled: pod.enrolled,
                interface: iface.as_ref().map(|i| i.name.clone()),
                ifindex: iface.as_ref().map(|i| i.index),
                attached,
                captured,
            });
        }

        let uplinks = if plan.uplinks.is_empty() {
            routes.uplinks(&pod_ifaces)
        } else {
            plan.uplinks
                .iter()
                .map(|name| {
                    routing::ifindex(name)
                        .map(|index| Interface {
                            name: name.clone(),
                            index,
                        })
                        .ok_or_else(|| RedirectError::NoSuchUplink(name.clone()))
                })
                .collect::<Result<_, _>>()?
        };
        for uplink in &uplinks {
            wanted_links.insert(self.ensure_link(Role::Uplink, uplink)?);
            status.uplinks.push(uplink.name.clone());
        }

        self.sync_maps(&wanted_pods)?;

        for stale in attach::pinned_links(&self.links_dir)? {
            if !wanted_links.contains(&stale) {
                attach::detach(&self.links_dir, &stale)?;
                self.owned_links.remove(&stale);
                tracing::info!(link = %stale, "detached");
            }
        }
        Ok(status)
    }

    fn ensure_link(&mut self, role: Role, iface: &Interface) -> Result<String, RedirectError> {
        let name = attach::pin_name(role, iface);
        let pinned = self.links_dir.join(&name).exists();
        if self.owned_links.contains(&name) && pinned {
            return Ok(name);
        }
        let program_name = match role {
            Role::Pod => programs::POD_INGRESS,
            Role::Uplink => programs::UPLINK_INGRESS,
        };
        let links_dir = self.links_dir.clone();
        let outcome = attach::attach(
            program(&mut self.ebpf, program_name)?,
            &links_dir,
            role,
            iface,
        )?;
        tracing::info!(iface = %iface.name, ifindex = iface.index, ?role, ?outcome, "capture attached");
        self.owned_links.insert(name.clone());
        Ok(name)
    }

    fn sync_maps(&mut self, wanted: &BTreeMap<PodKey, PodInfo>) -> Result<(), RedirectError> {
        let map_err = |map| move |source| RedirectError::Map { map, source };
        // Counters first, so the first captured SYN is counted.
        let present_counters: HashSet<PodKey> =
            self.counters.keys().filter_map(Result::ok).collect();
        for key in wanted.keys() {
            if !present_counters.contains(key) {
                let cpus = aya::util::nr_cpus()
                    .map_err(|(_, e)| RedirectError::Load(format!("counting CPUs: {e}")))?;
                let zeros = PerCpuValues::try_from(vec![PodCounters::default(); cpus])
                    .map_err(|e| RedirectError::Load(format!("per-CPU counters: {e}")))?;
                self.counters
                    .insert(key, zeros, 0)
                    .map_err(map_err(maps::POD_COUNTERS))?;
            }
        }
        for (key, info) in wanted {
            let current = self.enrolled.get(key, 0).ok();
            if current != Some(*info) {
                self.enrolled
                    .insert(key, info, 0)
                    .map_err(map_err(maps::ENROLLED_PODS))?;
                tracing::info!(pod = %Ipv4Addr::from(key.octets()), "enrolled");
            }
        }
        let present: Vec<PodKey> = self.enrolled.keys().filter_map(Result::ok).collect();
        for key in present.into_iter().filter(|k| !wanted.contains_key(k)) {
            self.enrolled
                .remove(&key)
                .map_err(map_err(maps::ENROLLED_PODS))?;
            tracing::info!(pod = %Ipv4Addr::from(key.octets()), "un-enrolled");
        }
        for key in present_counters
            .into_iter()
            .filter(|k| !wanted.contains_key(k))
        {
            self.counters
                .remove(&key)
                .map_err(map_err(maps::POD_COUNTERS))?;
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

    /// A pod's kernel counters, summed over CPUs.
    pub fn counters(&self, ip: Ipv4Addr) -> Option<PodCounters> {
        let values = self
            .counters
            .get(&PodKey::from_octets(ip.octets()), 0)
            .ok()?;
        Some(
            values
                .iter()
                .fold(PodCounters::default(), |acc, c| acc.plus(*c)),
        )
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, RedirectError> {
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

/// Removes everything one ztunnel instance pinned: links (detaching the
/// programs) and maps. For uninstalling; a restart must not do this.
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
