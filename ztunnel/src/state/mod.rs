//! What ztunnel knows about the mesh: one immutable snapshot of workloads,
//! services and policies, replaced whole when the configuration changes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

mod waypoint;

pub use waypoint::{Waypoint, WaypointError, WaypointOwner};

use crate::{
    authz::PolicyStore,
    config::local::{
        Authorization, CaptureExclusions, GatewayAddress, HealthStatus, InboundProtocol,
        LocalConfig, LocalWorkload, NamespacedHostname, Service,
    },
    identity::Identity,
    metrics::{labels::ServiceLabels, PeerLabels},
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
    /// Empty means the mesh's trust domain.
    pub trust_domain: String,
    pub healthy: bool,
    /// Services it is an endpoint of: service port -> target port.
    #[serde(skip)]
    pub services: BTreeMap<NamespacedHostname, BTreeMap<u16, u16>>,
    /// Keys (`namespace/name`) of the `WorkloadSelector` policies it selects.
    pub authorization_policies: Vec<String>,
    /// For metrics labels, as Istio reports them.
    pub workload_name: String,
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub cluster_id: String,
    /// Outbound destinations its traffic skips capture for.
    pub capture_exclusions: CaptureExclusions,
    /// The waypoint traffic addressed to this workload's own IP goes through.
    pub waypoint: Option<GatewayAddress>,
    /// Terminates HBONE itself (a waypoint, a gateway): never captured.
    pub native_tunnel: bool,
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
            trust_domain: w.trust_domain.clone(),
            healthy: w.status == HealthStatus::Healthy,
            services: w.services.clone(),
            authorization_policies: w.authorization_policies.clone(),
            workload_name: w.workload_name.clone(),
            workload_type: w.workload_type.clone(),
            canonical_name: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
            cluster_id: w.cluster_id.clone(),
            capture_exclusions: w.capture_exclusions.clone(),
            waypoint: w.waypoint.clone(),
            native_tunnel: w.native_tunnel,
        }
    }
}

/// Where a connection to some address really goes.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub workload: Arc<Workload>,
    /// The workload's address and the target port.
    pub addr: SocketAddr,
    /// Extra identities the destination may prove (a service's
    /// `subjectAltNames`), besides the workload's own.
    pub service_sans: Vec<Identity>,
}

/// One consistent view of the configuration, from this node's point of view.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub node: String,
    /// The mesh's trust domain, for workloads that do not name one.
    pub trust_domain: String,
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Service>,
    pub policies: Vec<Authorization>,
    pub policy_store: PolicyStore,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Service index by VIP.
    by_vip: HashMap<IpAddr, usize>,
    /// Healthy endpoints per service.
    endpoints: HashMap<NamespacedHostname, Vec<Arc<Workload>>>,
    /// Every workload of each service, healthy or not: who is a waypoint
    /// must not change with a readiness probe.
    members: HashMap<NamespacedHostname, Vec<Arc<Workload>>>,
    /// Spreads connections across a service's endpoints.
    next_endpoint: AtomicUsize,
    /// The workloads some waypoint resolves to (by address in `workloads`).
    waypoints: HashSet<usize>,
    /// Each workload's metric labels (by address in `workloads`), and each
    /// service's (by index in `services`), built once here rather than on
    /// every connection.
    peer_labels: HashMap<usize, Arc<PeerLabels>>,
    /// Each workload's identity (by address in `workloads`): cloning one
    /// shares its strings, building one allocates them.
    identities: HashMap<usize, Identity>,
    service_labels: Vec<Arc<ServiceLabels>>,
}

impl Snapshot {
    pub fn new(node: &str, trust_domain: &str, config: &LocalConfig) -> Self {
        let workloads: Vec<Arc<Workload>> = config
            .workloads
            .iter()
            .map(|w| Arc::new(Workload::from(w)))
            .collect();
        let by_ip = workloads
            .iter()
            .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w.clone())))
            .collect();
        let mut by_vip = HashMap::new();
        for (i, service) in config.services.iter().enumerate() {
            for vip in &service.vips {
                by_vip.insert(vip.address, i);
            }
        }
        let mut endpoints: HashMap<NamespacedHostname, Vec<Arc<Workload>>> = HashMap::new();
        let mut members: HashMap<NamespacedHostname, Vec<Arc<Workload>>> = HashMap::new();
        for w in workloads.iter() {
            for key in w.services.keys() {
                members.entry(key.clone()).or_default().push(w.clone());
                if w.healthy {
                    endpoints.entry(key.clone()).or_default().push(w.clone());
                }
            }
        }
        let mut snapshot = Snapshot {
            node: node.to_string(),
            trust_domain: trust_domain.to_string(),
            workloads,
            services: config.services.clone(),
            policies: config.policies.clone(),
            policy_store: PolicyStore::new(&config.policies),
            by_ip,
            by_vip,
            endpoints,
            members,
            next_endpoint: AtomicUsize::new(0),
            waypoints: HashSet::new(),
            peer_labels: HashMap::new(),
            identities: HashMap::new(),
            service_labels: config
                .services
                .iter()
                .map(|s| {
                    Arc::new(ServiceLabels {
                        hostname: s.hostname.clone(),
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                    })
                })
                .collect(),
        };
        snapshot.identities = snapshot
            .workloads
            .iter()
            .map(|w| (Arc::as_ptr(w) as usize, snapshot.identity_of(w)))
            .collect();
        snapshot.peer_labels = snapshot
            .workloads
            .iter()
            .map(|w| {
                let labels = PeerLabels::of_workload(w, &snapshot.identity_of(w));
                (Arc::as_ptr(w) as usize, Arc::new(labels))
            })
            .collect();
        let gateways: Vec<GatewayAddress> = snapshot
            .services
            .iter()
            .filter_map(|s| s.waypoint.clone())
            .chain(snapshot.workloads.iter().filter_map(|w| w.waypoint.clone()))
            .collect();
        for gateway in &gateways {
            for w in snapshot.waypoint_workloads(gateway) {
                snapshot.waypoints.insert(Arc::as_ptr(&w) as usize);
            }
        }
        snapshot
    }

    /// `w`'s metric labels: built with the snapshot for its own workloads,
    /// built now for any other.
    pub fn peer_labels(&self, w: &Workload) -> Arc<PeerLabels> {
        match self.peer_labels.get(&(std::ptr::from_ref(w) as usize)) {
            Some(labels) => labels.clone(),
            None => Arc::new(PeerLabels::of_workload(w, &self.identity_of(w))),
        }
    }

    /// The next pick of a round robin across endpoints.
    pub(crate) fn next_endpoint(&self) -> usize {
        self.next_endpoint.fetch_add(1, Ordering::Relaxed)
    }

    /// The healthy endpoints of the service `namespace/hostname`.
    pub fn endpoints_of(&self, namespace: &str, hostname: &str) -> Vec<Arc<Workload>> {
        let key = NamespacedHostname {
            namespace: namespace.to_string(),
            hostname: hostname.to_string(),
        };
        self.endpoints.get(&key).cloned().unwrap_or_default()
    }

    /// Every workload of the service `namespace/hostname`, healthy or not.
    pub fn members_of(&self, namespace: &str, hostname: &str) -> &[Arc<Workload>] {
        let key = NamespacedHostname {
            namespace: namespace.to_string(),
            hostname: hostname.to_string(),
        };
        self.members
            .get(&key)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The service `namespace/hostname`.
    pub fn service_by_host(&self, namespace: &str, hostname: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.hostname == hostname)
    }

    /// A workload's SPIFFE identity.
    pub fn identity_of(&self, w: &Workload) -> Identity {
        if let Some(id) = self.identities.get(&(std::ptr::from_ref(w) as usize)) {
            return id.clone();
        }
        Identity::of_workload(
            &w.trust_domain,
            &self.trust_domain,
            &w.namespace,
            &w.service_account,
        )
    }

    /// Where a connection to `dst` goes: the workload at that address, or one
    /// endpoint of the service with that VIP (spreading connections across
    /// endpoints, with the service's port mapping applied). `None` for an
    /// address outside the mesh.
    pub fn resolve(&self, dst: SocketAddr) -> Option<Upstream> {
        if let Some(w) = self.by_ip.get(&dst.ip()) {
            return Some(Upstream {
                workload: w.clone(),
                addr: dst,
                service_sans: Vec::new(),
            });
        }
        let service = &self.services[*self.by_vip.get(&dst.ip())?];
        let service_port = dst.port();
        let default_target = *service.ports.get(&service_port)?;
        let key = NamespacedHostname {
            namespace: service.namespace.clone(),
            hostname: service.hostname.clone(),
        };
        let candidates = self.endpoints.get(&key)?;
        if candidates.is_empty() {
            return None;
        }
        let pick = self.next_endpoint() % candidates.len();
        let workload = candidates[pick].clone();
        // The endpoint's own mapping wins; 0 or absent means the service's.
        let target = workload
            .services
            .get(&key)
            .and_then(|ports| ports.get(&service_port))
            .copied()
            .filter(|p| *p != 0)
            .unwrap_or(if default_target == 0 {
                service_port
            } else {
                default_target
            });
        let ip = workload
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == dst.is_ipv4())
            .or(workload.ips.first())?;
        let service_sans = service
            .subject_alt_names
            .iter()
            .filter_map(|san| san.parse().ok())
            .collect();
        Some(Upstream {
            addr: SocketAddr::new(*ip, target),
            workload,
            service_sans,
        })
    }

    /// The service with VIP `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.by_vip.get(&ip).map(|i| &self.services[*i])
    }

    /// The service with the VIP `ip` and its metric labels.
    pub fn service_by_vip_labelled(&self, ip: IpAddr) -> Option<(&Service, Arc<ServiceLabels>)> {
        self.by_vip
            .get(&ip)
            .map(|i| (&self.services[*i], self.service_labels[*i].clone()))
    }

    /// Identities of local workloads, whose certificates ztunnel keeps fresh.
    pub fn local_identities(&self) -> Vec<Identity> {
        let mut ids: Vec<Identity> = self
            .local_workloads()
            .filter(|w| self.captures(w))
            .map(|w| self.identity_of(w))
            .collect();
        ids.sort();
        ids.dedup();
        ids
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
                        enrolled: self.captures(w),
                        exclusions: w.capture_exclusions.clone(),
                    });
                }
            }
        }
        CapturePlan {
            pods,
            uplinks: uplinks.to_vec(),
        }
    }

    /// Whether ztunnel captures `w`'s traffic: it speaks HBONE through
    /// ztunnel, and does not terminate HBONE itself (a waypoint does).
    pub fn captures(&self, w: &Workload) -> bool {
        w.hbone && !w.native_tunnel && !self.is_waypoint(w)
    }

    /// IPv6 addresses of local HBONE workloads, which capture skips.
    pub fn uncaptured_ipv6(&self) -> Vec<IpAddr> {
        self.local_workloads()
            .filter(|w| self.captures(w))
            .flat_map(|w| w.ips.iter().copied().filter(IpAddr::is_ipv6))
            .collect()
    }
}
