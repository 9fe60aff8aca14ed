//! The kernel's counters, read from the pinned per-pod map at scrape time.

use std::{net::Ipv4Addr, path::Path};

use aya::maps::{Map, MapData, PerCpuHashMap};
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
};
use ztunnel_common::{maps, PodCounters, PodKey};

use super::labels::Escaped;
use crate::state::Snapshot;

/// A read-only view of the pinned per-pod counters.
pub struct KernelCounters {
    map: PerCpuHashMap<MapData, PodKey, PodCounters>,
}

impl KernelCounters {
    /// Opens the counter map pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, String> {
        let path = crate::redirect::bpffs::maps_dir(pin_dir).join(maps::POD_COUNTERS);
        let data = MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let map = PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(|e| e.to_string())?;
        Ok(KernelCounters { map })
    }

    /// Per-pod sums.
    pub fn read(&self) -> Vec<(Ipv4Addr, PodCounters)> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .map(|(key, values)| {
                let sum = values
                    .iter()
                    .fold(PodCounters::default(), |a, c| a.plus(*c));
                (Ipv4Addr::from(key.octets()), sum)
            })
            .collect()
    }

    /// The kernel families, labelled by workload.
    pub fn encode(
        &self,
        snapshot: &Snapshot,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let pods: Vec<(PodLabels, PodCounters)> = self
            .read()
            .into_iter()
            .map(|(ip, c)| (PodLabels::of(snapshot, ip), c))
            .collect();
        family(
            encoder,
            &pods,
            "ztunnel_kernel_flows_captured",
            "New TCP flows the kernel handed to ztunnel",
            "direction",
            |c| {
                [
                    ("outbound", c.outbound_captured),
                    ("inbound", c.inbound_captured),
                ]
                .to_vec()
            },
        )?;
        family(
            encoder,
            &pods,
            "ztunnel_kernel_flows_excluded",
            "New outbound TCP flows the kernel left uncaptured because the pod excludes their destination (a port or an address range it opted out)",
            "direction",
            |c| [("outbound", c.outbound_excluded)].to_vec(),
        )?;
        family(
            encoder,
            &pods,
            "ztunnel_kernel_flows_direct",
            "New same-node TCP flows the kernel let pass with no proxy in the path, authorization allowing them",
            "direction",
            |c| [("outbound", c.outbound_direct)].to_vec(),
        )?;
        family(
            encoder,
            &pods,
            "ztunnel_kernel_syn_dropped",
            "SYNs the kernel dropped: denied by policy, or no ztunnel listening (fail closed)",
            "reason",
            |c| {
                [
                    ("policy", c.policy_denied),
                    ("no_listener", c.dropped_no_listener),
                ]
                .to_vec()
            },
        )?;
        family(
            encoder,
            &pods,
            "ztunnel_kernel_packets_dropped",
            "TCP packets to or from an enrolled pod the kernel dropped because they could bypass capture: IP fragments, truncated TCP headers, another pod's address (spoofed), or SYNs forwarded past capture (uncaptured)",
            "reason",
            |c| {
                [
                    ("fragment", c.dropped_fragment),
                    ("truncated", c.dropped_truncated),
                    ("spoofed", c.dropped_spoofed),
                    ("uncaptured", c.dropped_uncaptured),
                ]
                .to_vec()
            },
        )
    }
}

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCounters")
    }
}

/// The labels that name a pod in the kernel families.
struct PodLabels {
    address: String,
    workload: String,
    namespace: String,
}

impl PodLabels {
    fn of(snapshot: &Snapshot, ip: Ipv4Addr) -> Self {
        let w = snapshot.workload_by_ip(ip.into());
        PodLabels {
            address: ip.to_string(),
            workload: w
                .map(|w| w.name.clone())
                .unwrap_or_else(|| "unknown".into()),
            namespace: w
                .map(|w| w.namespace.clone())
                .unwrap_or_else(|| "unknown".into()),
        }
    }
}

/// One counter family: a sample per pod and per value of `key`.
fn family(
    encoder: &mut DescriptorEncoder,
    pods: &[(PodLabels, PodCounters)],
    name: &str,
    help: &str,
    key: &str,
    samples: impl Fn(&PodCounters) -> Vec<(&'static str, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (pod, counters) in pods {
        for (value, n) in samples(counters) {
            let labels = [
                ("workload", Escaped(&pod.workload)),
                ("workload_namespace", Escaped(&pod.namespace)),
                ("address", Escaped(&pod.address)),
                (key, Escaped(value)),
            ];
            ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
        }
    }
    Ok(())
}
