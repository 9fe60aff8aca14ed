//! What ztunnel knows about the mesh: one immutable snapshot of workloads,
//! services and policies, replaced whole when the configuration changes.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use crate::{
    config::local::{Authorization, InboundProtocol, LocalConfig, LocalWorkload, Service},
    redirect::{CapturePlan, PlannedPod},
};

/// A workload as the data path uses it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// Speaks HBONE: its traffic is captured (when local) and tunnelled.
    pub hbone: bool,
}

impl From<&LocalWorkload> for Workload {
    fn from(w: &LocalWorkload) -> Self {
        Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            node: w.node.clone(),
            ips: w.workload_ips.clone(),
            hbone: w.protocol == InboundProtocol::HBONE,
        }
    }
}

/// One consistent view of the configuration, from this node's point of view.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub node: String,
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Service>,
    pub policies: Vec<Authorization>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
}

impl Snapshot {
    pub fn new(node: &str, config: &LocalConfig) -> Self {
        let workloads: Vec<Arc<Workload>> = config.workloads.iter().map(|w| Arc::new(Workload::from(w))).collect();
        let by_ip = workloads
            .iter()
            .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w.clone())))
            .collect();
        Snapshot {
            node: node.to_string(),
            workloads,
            services: config.services.clone(),
            policies: config.policies.clone(),
            by_ip,
        }
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The workload at `ip` if it runs on this node.
    pub fn local_workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip).filter(|w| w.node == self.node)
    }

    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.iter().filter(move |w| w.node == self.node)
    }

    /// What the kernel should capture: every local workload's veth carries
    /// the program (so the return path of ztunnel's own connections to any
    /// local pod is seen), and the HBONE ones are enrolled.
    ///
    /// IPv6 addresses are not captured yet; such workloads' IPv4 addresses are.
    pub fn capture_plan(&self, uplinks: &[String]) -> CapturePlan {
        let mut pods: Vec<PlannedPod> = Vec::new();
        for w in self.local_workloads() {
            for ip in &w.ips {
                if let IpAddr::V4(ip) = ip {
                    pods.push(PlannedPod {
                        ip: *ip,
                        enrolled: w.hbone,
                    });
                }
            }
        }
        CapturePlan {
            pods,
            uplinks: uplinks.to_vec(),
        }
    }

    /// IPv6 addresses of local HBONE workloads, which capture skips.
    pub fn uncaptured_ipv6(&self) -> Vec<IpAddr> {
        self.local_workloads()
            .filter(|w| w.hbone)
            .flat_map(|w| w.ips.iter().copied().filter(IpAddr::is_ipv6))
            .collect()
    }
}

/// The IPv4 addresses of local enrolled workloads.
pub fn enrolled_ipv4(snapshot: &Snapshot) -> Vec<Ipv4Addr> {
    snapshot
        .capture_plan(&[])
        .pods
        .into_iter()
        .filter(|p| p.enrolled)
        .map(|p| p.ip)
        .collect()
}
