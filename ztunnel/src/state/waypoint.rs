//! Waypoints: the L7 proxies a service or a workload names in its
//! `waypoint`, which its traffic must pass through.
//!
//! Istio's rules, which ztunnel follows:
//! - a service's waypoint applies to traffic addressed to the service's VIP;
//! - a workload's waypoint applies to traffic addressed to the workload's own
//!   IP, except traffic coming from that waypoint (it is on its way out);
//! - a waypoint that cannot be resolved is an error: the connection is
//!   refused, never sent straight to its destination.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{Snapshot, Workload};
use crate::{
    config::local::{GatewayAddress, GatewayDestination},
    identity::Identity,
};

/// A waypoint, resolved to one of its workloads.
#[derive(Debug, Clone)]
pub struct Waypoint {
    pub workload: Arc<Workload>,
    /// The waypoint's address and HBONE port: where the tunnel goes.
    pub addr: SocketAddr,
    /// Identities the waypoint may prove: its workload's, plus its service's
    /// `subjectAltNames` when it was named as a service.
    pub sans: Vec<Identity>,
}

/// Who names a waypoint, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaypointOwner {
    Service(String),
    Workload(String),
}

impl fmt::Display for WaypointOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaypointOwner::Service(s) => write!(f, "service {s}"),
            WaypointOwner::Workload(w) => write!(f, "workload {w}"),
        }
    }
}

/// Why a named waypoint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaypointError {
    #[error("{owner} names waypoint {gateway}, which is neither a workload nor a service in the configuration")]
    Unknown {
        owner: WaypointOwner,
        gateway: String,
    },
    #[error("{owner} names waypoint {gateway}, which has no healthy workload with an address of the destination's family")]
    NoEndpoint {
        owner: WaypointOwner,
        gateway: String,
    },
}

impl fmt::Display for GatewayDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.destination {
            GatewayDestination::Address(a) => write!(f, "{a}:{}", self.0.hbone_mtls_port),
            GatewayDestination::Hostname(h) => write!(f, "{h}:{}", self.0.hbone_mtls_port),
        }
    }
}

struct GatewayDisplay<'a>(&'a GatewayAddress);

impl Snapshot {
    /// The waypoint a connection to `dst` from `src` must go through:
    /// `None` when there is none (or `src` is that waypoint), an error when
    /// the destination names one that cannot be resolved.
    pub fn waypoint_for(
        &self,
        src: Option<&Workload>,
        dst: SocketAddr,
    ) -> Option<Result<Waypoint, WaypointError>> {
        // The owner's name is built only when there is a waypoint: most
        // destinations have none, and this runs for every connection.
        let (owner, gateway) = if let Some(service) = self.service_by_vip(dst.ip()) {
            let gateway = service.waypoint.as_ref()?;
            (
                WaypointOwner::Service(format!("{}/{}", service.namespace, service.hostname)),
                gateway,
            )
        } else {
            let workload = self.workload_by_ip(dst.ip())?;
            let gateway = workload.waypoint.as_ref()?;
            (
                WaypointOwner::Workload(format!("{}/{}", workload.namespace, workload.name)),
                gateway,
            )
        };
        // The waypoint's own traffic to what it serves goes straight on,
        // whichever of its workloads sends it (a captured waypoint would
        // otherwise loop into itself).
        if let Some(src) = src {
            if self
                .waypoint_workloads(gateway)
                .iter()
                .any(|w| std::ptr::eq(&**w, src))
            {
                return None;
            }
        }
        Some(self.resolve_waypoint(owner, gateway, dst))
    }

    /// Whether the destination `dst` names, as its waypoint, the workload
    /// at `waypoint_ip`: what a waypoint checks before serving a tunnel, so
    /// that it serves only the destinations that chose it. The error says
    /// why not.
    pub fn names_waypoint(&self, dst: SocketAddr, waypoint_ip: IpAddr) -> Result<(), String> {
        let (owner, gateway) = if let Some(service) = self.service_by_vip(dst.ip()) {
            (
                format!("service {}/{}", service.namespace, service.hostname),
                service.waypoint.as_ref(),
            )
        } else if let Some(workload) = self.workload_by_ip(dst.ip()) {
            (
                format!("workload {}/{}", workload.namespace, workload.name),
                workload.waypoint.as_ref(),
            )
        } else {
            return Err(format!("{} is neither a service nor a workload", dst.ip()));
        };
        let gateway = gateway.ok_or_else(|| format!("{owner} names no waypoint"))?;
        if self
            .waypoint_workloads(gateway)
            .iter()
            .any(|w| w.ips.contains(&waypoint_ip))
        {
            Ok(())
        } else {
            Err(format!(
                "{owner} names waypoint {}, not this one",
                GatewayDisplay(gateway)
            ))
        }
    }

    /// Every workload `gateway` may resolve to, healthy or not: whether a
    /// workload is a waypoint (not captured, served by it, exempt from the
    /// loop rule) must not flip with its readiness.
    pub fn waypoint_workloads(&self, gateway: &GatewayAddress) -> Vec<Arc<Workload>> {
        match &gateway.destination {
            GatewayDestination::Address(a) => match self.workload_by_ip(a.address) {
                Some(w) => vec![w.clone()],
                None => self
                    .service_by_vip(a.address)
                    .map(|s| self.members_of(&s.namespace, &s.hostname).to_vec())
                    .unwrap_or_default(),
            },
            GatewayDestination::Hostname(h) => self.members_of(&h.namespace, &h.hostname).to_vec(),
        }
    }

    fn resolve_waypoint(
        &self,
        owner: WaypointOwner,
        gateway: &GatewayAddress,
        dst: SocketAddr,
    ) -> Result<Waypoint, WaypointError> {
        let name = GatewayDisplay(gateway).to_string();
        let service = match &gateway.destination {
            GatewayDestination::Address(a) if self.workload_by_ip(a.address).is_some() => None,
            GatewayDestination::Address(a) => Some(self.service_by_vip(a.address).ok_or_else(
                || WaypointError::Unknown {
                    owner: owner.clone(),
                    gateway: name.clone(),
                },
            )?),
            GatewayDestination::Hostname(h) => Some(
                self.service_by_host(&h.namespace, &h.hostname)
                    .ok_or_else(|| WaypointError::Unknown {
                        owner: owner.clone(),
                        gateway: name.clone(),
                    })?,
            ),
        };
        let candidates: Vec<Arc<Workload>> = self
            .waypoint_workloads(gateway)
            .into_iter()
            .filter(|w| w.healthy)
            .filter(|w| w.ips.iter().any(|ip| ip.is_ipv4() == dst.is_ipv4()))
            .collect();
        if candidates.is_empty() {
            return Err(WaypointError::NoEndpoint {
                owner,
                gateway: name,
            });
        }
        let workload = candidates[self.next_endpoint() % candidates.len()].clone();
        let Some(ip) = workload.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()) else {
            return Err(WaypointError::NoEndpoint {
                owner,
                gateway: name,
            });
        };
        let mut sans = vec![self.identity_of(&workload)];
        if let Some(service) = service {
            sans.extend(
                service
                    .subject_alt_names
                    .iter()
                    .filter_map(|san| san.parse().ok()),
            );
        }
        Ok(Waypoint {
            addr: SocketAddr::new(*ip, gateway.hbone_mtls_port),
            workload,
            sans,
        })
    }

    /// Every waypoint named in the configuration that cannot be resolved,
    /// reported when a configuration is applied: such destinations refuse
    /// their traffic until it is fixed.
    pub fn waypoint_problems(&self) -> Vec<WaypointError> {
        let mut problems = Vec::new();
        let named = self
            .services
            .iter()
            .filter_map(|s| {
                let vip = s.vips.first()?.address;
                Some((
                    s.waypoint.as_ref()?,
                    SocketAddr::new(vip, 0),
                    WaypointOwner::Service(format!("{}/{}", s.namespace, s.hostname)),
                ))
            })
            .chain(self.workloads.iter().filter_map(|w| {
                let ip = *w.ips.first()?;
                Some((
                    w.waypoint.as_ref()?,
                    SocketAddr::new(ip, 0),
                    WaypointOwner::Workload(format!("{}/{}", w.namespace, w.name)),
                ))
            }));
        for (gateway, dst, owner) in named {
            if let Err(e) = self.resolve_waypoint(owner, gateway, dst) {
                problems.push(e);
            }
        }
        problems
    }

    /// Whether `w` is the workload of some waypoint: it terminates HBONE
    /// itself, so ztunnel does not capture it.
    pub fn is_waypoint(&self, w: &Workload) -> bool {
        self.waypoints.contains(&(w as *const Workload as usize))
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, path::Path};

    use super::WaypointError;
    use crate::{config::local::LocalConfig, state::Snapshot};

    const CONFIG: &str = r#"
workloads:
- {name: client, namespace: default, serviceAccount: client, workloadIps: ["10.0.1.1"], protocol: HBONE, node: n1, services: {}}
- {name: echo, namespace: default, serviceAccount: echo, workloadIps: ["10.0.2.1"], protocol: HBONE, node: n2,
   services: {"default/echo.default.svc.cluster.local": {80: 8080}},
   waypoint: {destination: "/10.0.2.9", hboneMtlsPort: 15008}}
- {name: waypoint, namespace: default, serviceAccount: waypoint, workloadIps: ["10.0.2.9"], protocol: HBONE, node: n2,
   services: {"default/waypoint.default.svc.cluster.local": {15008: 15008}}}
- {name: plain, namespace: default, workloadIps: ["10.0.2.2"], node: n2, services: {},
   waypoint: {destination: "default/missing.default.svc.cluster.local", hboneMtlsPort: 15008}}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 8080}
  waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}
- name: waypoint
  namespace: default
  hostname: waypoint.default.svc.cluster.local
  vips: ["/10.96.0.9"]
  ports: {15008: 15008}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/waypoint-alt"]
"#;

    fn snapshot(node: &str) -> Snapshot {
        let config = LocalConfig::parse(CONFIG, Path::new("test.yaml")).unwrap();
        Snapshot::new(node, "cluster.local", &config)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_service_vip_goes_to_the_service_waypoint() {
        let s = snapshot("n1");
        let client = s.workload_by_ip("10.0.1.1".parse().unwrap()).cloned();
        let w = s
            .waypoint_for(client.as_deref(), addr("10.96.0.10:80"))
            .expect("the service names a waypoint")
            .expect("it resolves");
        assert_eq!(w.addr, addr("10.0.2.9:15008"));
        assert_eq!(w.workload.name, "waypoint");
        let sans: Vec<String> = w.sans.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            sans,
            [
                "spiffe://cluster.local/ns/default/sa/waypoint",
                "spiffe://cluster.local/ns/default/sa/waypoint-alt"
            ]
        );
    }

    #[test]
    fn a_pod_ip_goes_to_the_workload_waypoint_except_from_the_waypoint() {
        let s = snapshot("n2");
        let client = s.workload_by_ip("10.0.1.1".parse().unwrap()).cloned();
        let w = s
            .waypoint_for(client.as_deref(), addr("10.0.2.1:8080"))
            .expect("the workload names a waypoint")
            .expect("it resolves");
        assert_eq!(w.addr, addr("10.0.2.9:15008"));
        let waypoint = s.workload_by_ip("10.0.2.9".parse().unwrap()).cloned();
        assert!(
            s.waypoint_for(waypoint.as_deref(), addr("10.0.2.1:8080"))
                .is_none(),
            "the waypoint's own traffic must not loop back into it"
        );
    }

    #[test]
    fn an_unknown_waypoint_is_an_error_not_a_bypass() {
        let s = snapshot("n1");
        let client = s.workload_by_ip("10.0.1.1".parse().unwrap()).cloned();
        let e = s
            .waypoint_for(client.as_deref(), addr("10.0.2.2:80"))
            .expect("the workload names a waypoint")
            .expect_err("it does not resolve");
        assert!(
            e.to_string()
                .contains("default/missing.default.svc.cluster.local"),
            "{e}"
        );
        assert_eq!(s.waypoint_problems(), vec![e]);
    }

    #[test]
    fn an_unready_waypoint_replica_stays_a_waypoint() {
        let text = CONFIG.replace(
            "workloadIps: [\"10.0.2.9\"], protocol: HBONE,",
            "workloadIps: [\"10.0.2.9\"], protocol: HBONE, status: Unhealthy,",
        );
        assert_ne!(text, CONFIG);
        let config = LocalConfig::parse(&text, Path::new("test.yaml")).unwrap();
        let s = Snapshot::new("n2", "cluster.local", &config);
        let replica = s.workload_by_ip("10.0.2.9".parse().unwrap()).unwrap();
        assert!(
            s.is_waypoint(replica),
            "readiness must not make a waypoint capturable"
        );
        assert!(!s.captures(replica));
        assert!(s
            .names_waypoint(addr("10.96.0.10:80"), "10.0.2.9".parse().unwrap())
            .is_ok());
        // Nothing healthy to send to: refused, not bypassed.
        let client = s.workload_by_ip("10.0.1.1".parse().unwrap()).cloned();
        assert!(matches!(
            s.waypoint_for(client.as_deref(), addr("10.96.0.10:80")),
            Some(Err(WaypointError::NoEndpoint { .. }))
        ));
    }

    #[test]
    fn a_waypoint_is_never_captured() {
        let s = snapshot("n2");
        let plan = s.capture_plan(&[]);
        let enrolled: Vec<String> = plan
            .pods
            .iter()
            .filter(|p| p.enrolled)
            .map(|p| p.ip.to_string())
            .collect();
        assert_eq!(enrolled, ["10.0.2.1"]);
    }
}
