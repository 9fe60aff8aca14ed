//! The node's interfaces and routes as capture needs them: which veth a pod
//! sits behind, which devices traffic from elsewhere can enter through, and
//! whether a device's packets carry an Ethernet header. Pure data, read
//! from the kernel by [`super::netlink`].

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// How packets on a device start, which decides the program variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkLayer {
    /// An Ethernet header (veths, physical NICs, bridges, VXLAN).
    Ethernet,
    /// None: packets start at the IP header (IPIP, WireGuard, TUN, GRE).
    L3,
    /// Something capture cannot parse (loopback, InfiniBand, ...).
    Unsupported,
}

impl LinkLayer {
    /// From the device's `ARPHRD_*` type.
    pub fn from_arphrd(kind: u16) -> Self {
        const ARPHRD_ETHER: u16 = 1;
        const ARPHRD_PPP: u16 = 512;
        const ARPHRD_RAWIP: u16 = 519;
        const ARPHRD_TUNNEL: u16 = 768;
        const ARPHRD_TUNNEL6: u16 = 769;
        const ARPHRD_SIT: u16 = 776;
        const ARPHRD_IPGRE: u16 = 778;
        const ARPHRD_NONE: u16 = 0xfffe;
        match kind {
            ARPHRD_ETHER => LinkLayer::Ethernet,
            ARPHRD_PPP | ARPHRD_RAWIP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT
            | ARPHRD_IPGRE | ARPHRD_NONE => LinkLayer::L3,
            _ => LinkLayer::Unsupported,
        }
    }
}

/// A network interface in ztunnel's netns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

/// An interface and how its packets start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub interface: Interface,
    pub layer: LinkLayer,
    pub loopback: bool,
    /// Its IPv4 `src_valid_mark` setting (see [`super::netlink`]).
    pub src_valid_mark: bool,
}

/// A unicast route of the main table, reduced to what capture uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Net,
    /// Output devices (several for a multipath route).
    pub devices: Vec<u32>,
}

/// One reading of the node's links and main-table IPv4 unicast routes.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub links: Vec<Link>,
    pub routes: Vec<Route>,
}

impl Topology {
    pub fn link_by_index(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.interface.index == index)
    }

    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.interface.name == name)
    }

    /// The interface the node routes `pod_ip` through with a host route: for
    /// routed (Calico-style) wiring, the pod's host-side veth. `None` when the
    /// pod has no host route of its own yet (e.g. before its sandbox exists).
    pub fn pod_interface(&self, pod_ip: Ipv4Addr) -> Option<Interface> {
        let host = Ipv4Net::new(pod_ip, 32).ok()?;
        let route = self.routes.iter().find(|r| r.destination == host)?;
        let [index] = route.devices[..] else {
            return None;
        };
        self.link_by_index(index).map(|l| l.interface.clone())
    }

    /// Devices that carry traffic into the node from anything but a known
    /// local pod: every device the main table routes through, except
    /// loopback and the given pod veths. This includes the veths of local
    /// pods ztunnel has no workload for, which is what we want: to an
    /// enrolled pod they are just another outside client.
    pub fn route_devices(&self, pod_interfaces: &[u32]) -> Vec<Link> {
        let mut indexes: Vec<u32> = self
            .routes
            .iter()
            .flat_map(|r| r.devices.iter().copied())
            .filter(|i| !pod_interfaces.contains(i))
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        let mut links: Vec<Link> = indexes
            .into_iter()
            .filter_map(|i| self.link_by_index(i).cloned())
            .filter(|l| !l.loopback)
            .collect();
        links.sort_by(|a, b| a.interface.cmp(&b.interface));
        links
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, index: u32, layer: LinkLayer) -> Link {
        Link {
            interface: Interface {
                name: name.into(),
                index,
            },
            layer,
            loopback: name == "lo",
            src_valid_mark: false,
        }
    }

    fn route(dst: &str, devices: &[u32]) -> Route {
        Route {
            destination: dst.parse().unwrap(),
            devices: devices.to_vec(),
        }
    }

    fn topology() -> Topology {
        Topology {
            links: vec![
                link("lo", 1, LinkLayer::Unsupported),
                link("eth0", 2, LinkLayer::Ethernet),
                link("tunl0", 3, LinkLayer::L3),
                link("vzclient", 4, LinkLayer::Ethernet),
                link("vzother", 5, LinkLayer::Ethernet),
                link("bond0", 6, LinkLayer::Ethernet),
                link("bond1", 7, LinkLayer::Ethernet),
            ],
            routes: vec![
                route("198.18.0.0/24", &[2]),
                route("198.18.2.0/24", &[3]),
                route("198.18.1.10/32", &[4]),
                route("198.18.1.11/32", &[5]),
                route("10.0.0.0/8", &[6, 7]),
                route("127.0.0.0/8", &[1]),
            ],
        }
    }

    #[test]
    fn a_pod_is_behind_its_host_route() {
        let t = topology();
        assert_eq!(
            t.pod_interface("198.18.1.10".parse().unwrap())
                .unwrap()
                .name,
            "vzclient"
        );
        assert_eq!(
            t.pod_interface("198.18.2.10".parse().unwrap()),
            None,
            "not a host route"
        );
        assert_eq!(t.pod_interface("198.18.1.99".parse().unwrap()), None);
    }

    #[test]
    fn route_devices_skip_pods_and_loopback_and_keep_every_nexthop() {
        let names: Vec<String> = topology()
            .route_devices(&[4])
            .into_iter()
            .map(|l| l.interface.name)
            .collect();
        assert_eq!(names, ["bond0", "bond1", "eth0", "tunl0", "vzother"]);
    }

    #[test]
    fn link_layers() {
        assert_eq!(LinkLayer::from_arphrd(1), LinkLayer::Ethernet);
        assert_eq!(LinkLayer::from_arphrd(768), LinkLayer::L3, "ipip");
        assert_eq!(
            LinkLayer::from_arphrd(0xfffe),
            LinkLayer::L3,
            "wireguard, tun"
        );
        assert_eq!(
            LinkLayer::from_arphrd(772),
            LinkLayer::Unsupported,
            "loopback"
        );
        assert_eq!(
            LinkLayer::from_arphrd(32),
            LinkLayer::Unsupported,
            "infiniband"
        );
    }
}
