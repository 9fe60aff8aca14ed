//! The node's interfaces and routes as capture needs them: which veth a pod
//! sits behind, which devices traffic from elsewhere can enter through, and
//! whether a device's packets carry an Ethernet header. Pure data, read
//! from the kernel by [`super::netlink`].

use std::{collections::BTreeMap, net::Ipv4Addr};

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
    /// A bridge device (`cni0`).
    pub bridge: bool,
    /// The device it is enslaved to (a bridge port's bridge).
    pub controller: Option<u32>,
    /// Its MAC address, for Ethernet devices.
    pub mac: Option<[u8; 6]>,
}

/// A unicast route of the main table, reduced to what capture uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Net,
    /// Output devices (several for a multipath route).
    pub devices: Vec<u32>,
}

/// An IPv4 neighbour entry: who has an address on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub ifindex: u32,
}

/// A bridge forwarding entry: which port a MAC address is behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    pub port: u32,
    pub bridge: u32,
}

/// A pod wired to a bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgedPod {
    pub bridge: Interface,
    pub bridge_mac: [u8; 6],
    /// Its port, once the bridge has learned the pod's MAC address behind
    /// one (the pod's first frame, usually its ARP for the gateway).
    pub port: Option<Interface>,
}

/// One reading of the node's links and main-table IPv4 unicast routes,
/// and, for bridged wiring, neighbours and bridge forwarding entries.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub links: Vec<Link>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
    /// Bridged pods' ports found in earlier readings, which win over the
    /// neighbour entries: those are flushed when the bridge's address
    /// changes, collected when idle, and rewritten by any pod that sends
    /// ARP for another's address, while the pod still sits on its port.
    pub learned_ports: BTreeMap<Ipv4Addr, u32>,
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

    /// The bridge `pod_ip` sits behind, for bridged wiring: a bridge the
    /// main table routes the address's subnet through (no host route of
    /// its own), and the pod's port on it when the neighbour and forwarding
    /// entries name one.
    pub fn bridged_pod(&self, pod_ip: Ipv4Addr) -> Option<BridgedPod> {
        let bridge = self
            .routes
            .iter()
            .filter(|r| r.destination.contains(&pod_ip) && r.destination.prefix_len() < 32)
            .max_by_key(|r| r.destination.prefix_len())
            .and_then(|r| match r.devices[..] {
                [index] => self.link_by_index(index),
                _ => None,
            })
            .filter(|l| l.bridge)?;
        let bridge_mac = bridge.mac?;
        let index = bridge.interface.index;
        let on_bridge = |port: u32| {
            self.link_by_index(port)
                .filter(|l| l.controller == Some(index))
                .map(|l| l.interface.clone())
        };
        // A port once found is kept while it exists: any pod on the bridge
        // can answer or send ARP for another pod's address and so rewrite
        // the neighbour entry, which must not move that pod's identity to
        // the sender's port.
        let port = self
            .learned_ports
            .get(&pod_ip)
            .and_then(|port| on_bridge(*port))
            .or_else(|| {
                self.neighbours
                    .iter()
                    .find(|n| n.ip == pod_ip && n.ifindex == index)
                    .and_then(|n| {
                        self.fdb
                            .iter()
                            .find(|f| f.mac == n.mac && f.bridge == index && f.port != index)
                    })
                    .and_then(|f| on_bridge(f.port))
            });
        Some(BridgedPod {
            bridge: bridge.interface.clone(),
            bridge_mac,
            port,
        })
    }

    /// Remembers the ports of the bridged pods at `ips` this reading found,
    /// and forgets ports that are gone, for the next reading.
    pub fn learn_ports(
        &self,
        ips: impl Iterator<Item = Ipv4Addr>,
        learned: &mut BTreeMap<Ipv4Addr, u32>,
    ) {
        for ip in ips {
            if let Some(port) = self.bridged_pod(ip).and_then(|b| b.port) {
                learned.insert(ip, port.index);
            }
        }
        learned.retain(|_, port| {
            self.link_by_index(*port)
                .is_some_and(|l| l.controller.is_some())
        });
    }

    /// The ports of bridge `index`.
    pub fn bridge_ports(&self, index: u32) -> Vec<Link> {
        self.links
            .iter()
            .filter(|l| l.controller == Some(index))
            .cloned()
            .collect()
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
            bridge: name.starts_with("cni"),
            controller: None,
            mac: Some([2, 0, 0, 0, 0, index as u8]),
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
            neighbours: Vec::new(),
            fdb: Vec::new(),
            learned_ports: BTreeMap::new(),
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
    fn a_bridged_pod_is_found_behind_its_port() {
        let mut t = topology();
        let mut port = link("veth1", 9, LinkLayer::Ethernet);
        port.controller = Some(8);
        t.links.push(link("cni0", 8, LinkLayer::Ethernet));
        t.links.push(port);
        t.routes.push(route("10.244.1.0/24", &[8]));
        let ip = "10.244.1.5".parse().unwrap();
        let found = t.bridged_pod(ip).unwrap();
        assert_eq!(found.bridge.name, "cni0");
        assert_eq!(found.port, None, "no neighbour entry yet");
        let mac = [0x0a, 0, 0, 0, 0, 5];
        t.neighbours.push(Neighbour {
            ip,
            mac,
            ifindex: 8,
        });
        t.fdb.push(FdbEntry {
            mac,
            port: 9,
            bridge: 8,
        });
        assert_eq!(t.bridged_pod(ip).unwrap().port.unwrap().name, "veth1");
        assert_eq!(t.bridge_ports(8).len(), 1);
        // The neighbour entry is flushed; the port learned earlier stays.
        let mut learned = BTreeMap::new();
        t.learn_ports([ip].into_iter(), &mut learned);
        t.neighbours.clear();
        assert_eq!(t.bridged_pod(ip).unwrap().port, None);
        t.learned_ports = learned.clone();
        assert_eq!(t.bridged_pod(ip).unwrap().port.unwrap().name, "veth1");
        // Another pod claims the address by ARP: the known port stays.
        let mut intruder = link("veth2", 10, LinkLayer::Ethernet);
        intruder.controller = Some(8);
        t.links.push(intruder);
        let forged = [0x0a, 0, 0, 0, 0, 6];
        t.neighbours.push(Neighbour {
            ip,
            mac: forged,
            ifindex: 8,
        });
        t.fdb.push(FdbEntry {
            mac: forged,
            port: 10,
            bridge: 8,
        });
        assert_eq!(t.bridged_pod(ip).unwrap().port.unwrap().name, "veth1");
        // Until the port goes.
        t.links.retain(|l| l.interface.name != "veth1");
        t.learn_ports(std::iter::empty(), &mut learned);
        assert!(learned.is_empty());
        assert_eq!(
            t.bridged_pod("198.18.1.10".parse().unwrap()),
            None,
            "routed"
        );
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
