//! The node netns's routing over rtnetlink: reading links and routes (what
//! capture attaches to), following the kernel's link, route and rule events
//! (so a new veth is captured when it appears, not at the next poll), and
//! the policy route that delivers captured packets locally. Only ztunnel's
//! own rule and table are ever changed; no `ip` binary is needed.

use std::{collections::BTreeSet, net::Ipv4Addr};

use futures_util::{Stream, StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        link::{
            AfSpecInet, AfSpecUnspec, InetDevConf, InfoKind, LinkAttribute, LinkFlags, LinkInfo,
            LinkMessage,
        },
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
            RouteType,
        },
        rule::{RuleAction, RuleAttribute, RuleMessage},
        AddressFamily, IpProtocol, RouteNetlinkMessage,
    },
    Handle, IpVersion, LinkUnspec, MulticastGroup, RouteMessageBuilder,
};
use ztunnel_common::{
    BYPASS_MARK, CAPTURE_MARK, CAPTURE_MARK_MASK, CAPTURE_ROUTE_TABLE, CAPTURE_RULE_PRIORITY,
    CATCHALL_ROUTE_TABLE, CATCHALL_RULE_PRIORITY, RULES_END_PRIORITY, SKIP_BYPASS_RULE_PRIORITY,
    SKIP_LOCAL_RULE_PRIORITY,
};

use super::topology::{FdbEntry, Interface, Link, LinkLayer, Neighbour, Route, Topology};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("netlink: {what}: {source}")]
    Request {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("netlink: {0}")]
    Missing(&'static str),
}

fn request(what: &'static str) -> impl Fn(rtnetlink::Error) -> NetlinkError {
    move |source| NetlinkError::Request { what, source }
}

/// A netlink connection in ztunnel's network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Connects; the connection runs as a task on the current runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The links and main-table IPv4 unicast routes, read now.
    pub async fn topology(&self) -> Result<Topology, NetlinkError> {
        let links = self.links().await?;
        // Neighbours and forwarding entries only matter behind a bridge.
        let (neighbours, fdb) = if links.iter().any(|l| l.bridge) {
            (self.neighbours().await?, self.fdb().await?)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Topology {
            links,
            routes: self
                .routes()
                .await?
                .iter()
                .filter_map(main_unicast_route)
                .collect(),
            neighbours,
            fdb,
            learned_ports: Default::default(),
        })
    }

    /// IPv4 neighbour entries that name a MAC address.
    async fn neighbours(&self) -> Result<Vec<Neighbour>, NetlinkError> {
        let entries = self
            .dump_neighbours(AddressFamily::Inet, "dumping neighbours")
            .await?;
        Ok(entries
            .iter()
            .filter(|n| {
                !matches!(
                    n.header.state,
                    NeighbourState::Failed | NeighbourState::Incomplete
                )
            })
            .filter_map(|n| {
                Some(Neighbour {
                    ip: neighbour_ip(n)?,
                    mac: neighbour_mac(n)?,
                    ifindex: n.header.ifindex,
                })
            })
            .collect())
    }

    /// The neighbour table of `family` (`Bridge`: forwarding entries).
    async fn dump_neighbours(
        &self,
        family: AddressFamily,
        what: &'static str,
    ) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        self.handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(request(what))
    }

    /// Bridge forwarding entries: which port each learned MAC is behind.
    async fn fdb(&self) -> Result<Vec<FdbEntry>, NetlinkError> {
        let entries = self
            .dump_neighbours(AddressFamily::Bridge, "dumping bridge forwarding entries")
            .await?;
        Ok(entries
            .iter()
            .filter_map(|n| {
                let bridge = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Controller(index) => Some(*index),
                    _ => None,
                })?;
                Some(FdbEntry {
                    mac: neighbour_mac(n)?,
                    port: n.header.ifindex,
                    bridge,
                })
            })
            .collect())
    }

    async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(request("dumping links"))?;
        Ok(links.iter().filter_map(link).collect())
    }

    /// Every IPv4 route, of every table.
    async fn routes(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        self.handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(request("dumping routes"))
    }

    /// Installs ztunnel's policy routing, what is missing of it:
    /// - 80 `iif lo goto END`: locally originated packets, and the
    ///   reverse-path checks of locally delivered ones, skip the rest;
    /// - 81 `fwmark CAPTURE_MARK/CAPTURE_MARK_MASK lookup
    ///   CAPTURE_ROUTE_TABLE`, whose table holds `local 0.0.0.0/0 dev lo`:
    ///   captured packets are delivered locally;
    /// - 82 `fwmark BYPASS_MARK goto END`: flows older than capture;
    /// - 83 `ipproto tcp lookup CATCHALL_ROUTE_TABLE`, whose table holds
    ///   a local route per enrolled pod ([`Netlink::set_catchall`]);
    /// - 84 (END) `nop`.
    ///
    /// Idempotent, so a restart after a crash finds them in place.
    pub async fn install_capture_route(&self) -> Result<(), NetlinkError> {
        let route = capture_route(self.loopback_index().await?);
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(request("adding the capture route"))?;
        let present = self.our_rules().await?;
        for wanted in wanted_rules() {
            if present.iter().any(|r| wanted.matches(r)) {
                continue;
            }
            let mut add = self.handle.rule().add().v4().priority(wanted.priority);
            let attributes = &mut add.message_mut().attributes;
            if let Some((mark, mask)) = wanted.fwmark {
                attributes.push(RuleAttribute::FwMark(mark));
                attributes.push(RuleAttribute::FwMask(mask));
            }
            if wanted.from_local {
                attributes.push(RuleAttribute::Iifname("lo".into()));
            }
            if wanted.tcp_only {
                attributes.push(RuleAttribute::IpProtocol(IpProtocol::Tcp));
            }
            add = match wanted.action {
                Action::Table(table) => add.table_id(table).action(RuleAction::ToTable),
                Action::Goto(target) => {
                    add.message_mut()
                        .attributes
                        .push(RuleAttribute::Goto(target));
                    add.action(RuleAction::Goto)
                }
                Action::Nop => add.action(RuleAction::Nop),
            };
            add.execute()
                .await
                .map_err(request("adding a capture rule"))?;
        }
        Ok(())
    }

    /// Puts back whatever of the capture rules and route is missing.
    /// Returns whether something was.
    pub async fn repair_capture_route(&self) -> Result<bool, NetlinkError> {
        let present = self.our_rules().await?;
        let rules_complete = wanted_rules()
            .iter()
            .all(|w| present.iter().any(|r| w.matches(r)));
        let route_present =
            self.routes().await?.iter().any(|r| {
                route_table(r) == CAPTURE_ROUTE_TABLE && r.header.kind == RouteType::Local
            });
        if rules_complete && route_present {
            return Ok(false);
        }
        self.install_capture_route().await?;
        Ok(true)
    }

    /// Removes the rules and routes installed by
    /// [`Netlink::install_capture_route`] and [`Netlink::set_catchall`];
    /// absent already is fine.
    pub async fn remove_capture_route(&self) -> Result<(), NetlinkError> {
        for rule in self.our_rules().await? {
            self.handle
                .rule()
                .del(rule)
                .execute()
                .await
                .map_err(request("deleting a capture rule"))?;
        }
        let route = capture_route(self.loopback_index().await?);
        // Nothing else uses this table: an error here means it is gone.
        let _ = self.handle.route().del(route).execute().await;
        self.set_catchall(&BTreeSet::new()).await
    }

    /// Turns on IPv4 `src_valid_mark` on the link `index`.
    ///
    /// The catch-all table makes every enrolled pod's address local for
    /// TCP. When an enrolled pod's flow older than capture is forwarded, the
    /// kernel's reverse-path check looks its source up, would find that
    /// local route, and drop the packet as a martian. The TC program marks
    /// such packets to skip the catch-all, and `src_valid_mark` lets the
    /// check see the mark (as wg-quick sets it for WireGuard's marked
    /// routing). Set over netlink, not `/proc/sys`, which a container sees
    /// read-only unless it is privileged: with this, CAP_NET_ADMIN is enough.
    pub async fn enable_src_valid_mark(&self, index: u32) -> Result<(), NetlinkError> {
        // A request carries only the non-zero settings: this one alone.
        let mut conf = InetDevConf::default();
        conf.src_vmark = 1;
        let message = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
                AfSpecInet::DevConfRequest(conf),
            ])]))
            .build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(request("setting src_valid_mark"))
    }

    /// Makes the catch-all table hold a local route for exactly `pods`.
    pub async fn set_catchall(&self, pods: &BTreeSet<Ipv4Addr>) -> Result<(), NetlinkError> {
        let present = self.prune_catchall(pods).await?;
        let lo = self.loopback_index().await?;
        for pod in pods.difference(&present) {
            self.handle
                .route()
                .add(catchall_route(lo, *pod))
                .replace()
                .execute()
                .await
                .map_err(request("adding a catch-all route"))?;
        }
        Ok(())
    }

    /// Removes the catch-all routes of addresses not in `keep`; returns the
    /// addresses whose routes remain.
    pub async fn prune_catchall(
        &self,
        keep: &BTreeSet<Ipv4Addr>,
    ) -> Result<BTreeSet<Ipv4Addr>, NetlinkError> {
        let mut present = BTreeSet::new();
        for route in self
            .routes()
            .await?
            .into_iter()
            .filter(|r| route_table(r) == CATCHALL_ROUTE_TABLE)
        {
            match route_destination(&route) {
                Some(ip) if keep.contains(&ip) && route.header.destination_prefix_length == 32 => {
                    present.insert(ip);
                }
                _ => self
                    .handle
                    .route()
                    .del(route)
                    .execute()
                    .await
                    .map_err(request("deleting a catch-all route"))?,
            }
        }
        Ok(present)
    }

    /// ztunnel's rules, as the kernel holds them now: exactly the ones it
    /// installs, never another program's rule at the same priority.
    async fn our_rules(&self) -> Result<Vec<RuleMessage>, NetlinkError> {
        let rules: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(request("dumping rules"))?;
        Ok(rules
            .into_iter()
            .filter(|r| wanted_rules().iter().any(|w| w.matches(r)))
            .collect())
    }

    async fn loopback_index(&self) -> Result<u32, NetlinkError> {
        self.links()
            .await?
            .iter()
            .find(|l| l.loopback)
            .map(|l| l.interface.index)
            .ok_or(NetlinkError::Missing(
                "no loopback device in this network namespace",
            ))
    }
}

/// The kernel's link, IPv4 route, IPv4 rule and neighbour events: each item
/// says something changed (and whether a rule went away), so capture
/// resyncs at once instead of at the next poll. Neighbour entries (which
/// tell a bridged pod's port) count only when one appears, moves or goes:
/// their state changes all the time.
pub fn events() -> Result<impl Stream<Item = Event>, NetlinkError> {
    let (connection, _, messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Neigh,
    ])
    .map_err(NetlinkError::Socket)?;
    tokio::spawn(connection);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    Ok(messages.filter_map(move |(message, _)| {
        let seen = seen.clone();
        async move {
            use RouteNetlinkMessage::{
                DelLink, DelNeighbour, DelRoute, DelRule, NewLink, NewNeighbour, NewRoute,
            };
            match message.payload {
                NetlinkPayload::InnerMessage(NewNeighbour(n)) => {
                    let key = (
                        u8::from(n.header.family),
                        n.header.ifindex,
                        neighbour_key(&n),
                    );
                    let mac = neighbour_mac(&n);
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    (mac.is_some() && seen.insert(key, mac) != Some(mac))
                        .then_some(Event::TopologyChanged)
                }
                NetlinkPayload::InnerMessage(DelNeighbour(n)) => {
                    let key = (
                        u8::from(n.header.family),
                        n.header.ifindex,
                        neighbour_key(&n),
                    );
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    seen.remove(&key).map(|_| Event::TopologyChanged)
                }
                // Events were lost: everything may have changed.
                NetlinkPayload::Overrun(_) => Some(Event::Lost),
                NetlinkPayload::InnerMessage(DelRule(_)) => Some(Event::RoutingRemoved),
                NetlinkPayload::InnerMessage(NewLink(_) | DelLink(_)) => {
                    Some(Event::TopologyChanged)
                }
                // Only the main table says where pods and uplinks are. ztunnel's
                // own tables change with every enrollment and must not echo,
                // but a capture route someone else deleted is put back.
                NetlinkPayload::InnerMessage(NewRoute(route) | DelRoute(route))
                    if route_table(&route) == RouteHeader::RT_TABLE_MAIN as u32 =>
                {
                    Some(Event::TopologyChanged)
                }
                NetlinkPayload::InnerMessage(DelRoute(route))
                    if route_table(&route) == CAPTURE_ROUTE_TABLE =>
                {
                    Some(Event::RoutingRemoved)
                }
                _ => None,
            }
        }
    }))
}

/// What a neighbour entry is for: its IP address, or (bridge forwarding
/// entries) its MAC address.
fn neighbour_key(n: &NeighbourMessage) -> Vec<u8> {
    neighbour_ip(n)
        .map(|ip| ip.octets().to_vec())
        .or_else(|| neighbour_mac(n).map(|m| m.to_vec()))
        .unwrap_or_default()
}

/// What a kernel event means for capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A link or route appeared, changed or went away.
    TopologyChanged,
    /// A policy rule, or the capture route, was deleted (perhaps ours).
    RoutingRemoved,
    /// The kernel dropped events (a full socket buffer).
    Lost,
}

/// `local 0.0.0.0/0 dev lo table CAPTURE_ROUTE_TABLE`.
fn capture_route(loopback: u32) -> RouteMessage {
    let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .table_id(CAPTURE_ROUTE_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .output_interface(loopback)
        .build();
    route.header.protocol = RouteProtocol::Boot;
    route
}

/// `local <pod>/32 dev lo table CATCHALL_ROUTE_TABLE`.
fn catchall_route(loopback: u32, pod: Ipv4Addr) -> RouteMessage {
    let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(pod, 32)
        .table_id(CATCHALL_ROUTE_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .output_interface(loopback)
        .build();
    route.header.protocol = RouteProtocol::Boot;
    route
}

/// What one of ztunnel's rules does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Table(u32),
    Goto(u32),
    Nop,
}

/// One of ztunnel's rules, as installed.
struct WantedRule {
    priority: u32,
    fwmark: Option<(u32, u32)>,
    from_local: bool,
    tcp_only: bool,
    action: Action,
}

impl WantedRule {
    fn matches(&self, rule: &RuleMessage) -> bool {
        let mut fwmark = (None, None);
        let mut iif = None;
        let mut tcp = false;
        let mut table = rule.header.table as u32;
        let mut goto = None;
        for attribute in &rule.attributes {
            match attribute {
                RuleAttribute::FwMark(m) => fwmark.0 = Some(*m),
                RuleAttribute::FwMask(m) => fwmark.1 = Some(*m),
                RuleAttribute::Iifname(name) => iif = Some(name.as_str()),
                RuleAttribute::IpProtocol(p) => tcp = *p == IpProtocol::Tcp,
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::Goto(t) => goto = Some(*t),
                _ => {}
            }
        }
        let action = match rule.header.action {
            RuleAction::ToTable => Some(Action::Table(table)),
            RuleAction::Goto => goto.map(Action::Goto),
            RuleAction::Nop => Some(Action::Nop),
            _ => None,
        };
        rule_priority(rule) == self.priority
            && self
                .fwmark
                .map(|(m, k)| (Some(m), Some(k)))
                .unwrap_or((None, None))
                == fwmark
            && (iif == Some("lo")) == self.from_local
            && tcp == self.tcp_only
            && action == Some(self.action)
    }
}

fn wanted_rules() -> [WantedRule; 5] {
    let rule = |priority, action| WantedRule {
        priority,
        fwmark: None,
        from_local: false,
        tcp_only: false,
        action,
    };
    [
        WantedRule {
            from_local: true,
            ..rule(SKIP_LOCAL_RULE_PRIORITY, Action::Goto(RULES_END_PRIORITY))
        },
        WantedRule {
            fwmark: Some((CAPTURE_MARK, CAPTURE_MARK_MASK)),
            ..rule(CAPTURE_RULE_PRIORITY, Action::Table(CAPTURE_ROUTE_TABLE))
        },
        WantedRule {
            fwmark: Some((BYPASS_MARK, CAPTURE_MARK_MASK)),
            ..rule(SKIP_BYPASS_RULE_PRIORITY, Action::Goto(RULES_END_PRIORITY))
        },
        WantedRule {
            tcp_only: true,
            ..rule(CATCHALL_RULE_PRIORITY, Action::Table(CATCHALL_ROUTE_TABLE))
        },
        rule(RULES_END_PRIORITY, Action::Nop),
    ]
}

fn rule_priority(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(route.header.table as u32)
}

fn route_destination(route: &RouteMessage) -> Option<Ipv4Addr> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

fn neighbour_ip(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

fn neighbour_mac(n: &NeighbourMessage) -> Option<[u8; 6]> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => mac.as_slice().try_into().ok(),
        _ => None,
    })
}

fn link(message: &LinkMessage) -> Option<Link> {
    let name = message.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })?;
    Some(Link {
        interface: Interface {
            name,
            index: message.header.index,
        },
        layer: LinkLayer::from_arphrd(u16::from(message.header.link_layer_type)),
        loopback: message.header.flags.contains(LinkFlags::Loopback),
        src_valid_mark: message.attributes.iter().any(|a| match a {
            LinkAttribute::AfSpecUnspec(specs) => specs.iter().any(|s| match s {
                AfSpecUnspec::Inet(inet) => inet
                    .iter()
                    .any(|i| matches!(i, AfSpecInet::DevConf(conf) if conf.src_vmark != 0)),
                _ => false,
            }),
            _ => false,
        }),
        bridge: message.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos
                .iter()
                .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
            _ => false,
        }),
        controller: message.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(index) => Some(*index),
            _ => None,
        }),
        mac: message.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => mac.as_slice().try_into().ok(),
            _ => None,
        }),
    })
}

fn main_unicast_route(message: &RouteMessage) -> Option<Route> {
    let header = &message.header;
    if header.address_family != AddressFamily::Inet || header.kind != RouteType::Unicast {
        return None;
    }
    let table = route_table(message);
    let destination = route_destination(message).unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut devices = Vec::new();
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Oif(index) => devices.push(*index),
            RouteAttribute::MultiPath(hops) => {
                devices.extend(hops.iter().map(|h| h.interface_index))
            }
            _ => {}
        }
    }
    if table != RouteHeader::RT_TABLE_MAIN as u32 || devices.is_empty() {
        return None;
    }
    Some(Route {
        destination: Ipv4Net::new(destination, header.destination_prefix_length).ok()?,
        devices,
    })
}
