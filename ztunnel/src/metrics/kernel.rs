//! The kernel's counters, read from the pinned per-pod map at scrape time.

use std::{fmt::Write, net::Ipv4Addr, path::Path};

use aya::maps::{Map, MapData, PerCpuHashMap};
use ztunnel_common::{maps, PodCounters, PodKey};

use super::render_labels;
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

    /// The kernel families in Prometheus text format, labelled by workload.
    pub fn render(&self, snapshot: &Snapshot, out: &mut String) {
        let pods = self.read();
        let label = |ip: Ipv4Addr| {
            let w = snapshot.workload_by_ip(ip.into());
            (
                ip.to_string(),
                w.map(|w| w.name.clone())
                    .unwrap_or_else(|| "unknown".into()),
                w.map(|w| w.namespace.clone())
                    .unwrap_or_else(|| "unknown".into()),
            )
        };
        let _ = writeln!(
            out,
            "# HELP ztunnel_kernel_flows_captured_total New TCP flows the kernel handed to ztunnel.\n# TYPE ztunnel_kernel_flows_captured_total counter"
        );
        for (ip, c) in &pods {
            let (addr, name, ns) = label(*ip);
            for (direction, n) in [
                ("outbound", c.outbound_captured),
                ("inbound", c.inbound_captured),
            ] {
                out.push_str("ztunnel_kernel_flows_captured_total");
                render_labels(
                    out,
                    &[
                        ("workload", &name),
                        ("workload_namespace", &ns),
                        ("address", &addr),
                        ("direction", direction),
                    ],
                );
                let _ = writeln!(out, " {n}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP ztunnel_kernel_syn_dropped_total SYNs the kernel dropped: denied by policy, or no ztunnel listening (fail closed).\n# TYPE ztunnel_kernel_syn_dropped_total counter"
        );
        for (ip, c) in &pods {
            let (addr, name, ns) = label(*ip);
            for (reason, n) in [
                ("policy", c.policy_denied),
                ("no_listener", c.dropped_no_listener),
            ] {
                out.push_str("ztunnel_kernel_syn_dropped_total");
                render_labels(
                    out,
                    &[
                        ("workload", &name),
                        ("workload_namespace", &ns),
                        ("address", &addr),
                        ("reason", reason),
                    ],
                );
                let _ = writeln!(out, " {n}");
            }
        }
    }
}
