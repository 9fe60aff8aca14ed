//! The node netns's routing over rtnetlink: reading links and routes (what
//! capture attaches to), following the kernel's link, route and rule events
//! (so a new veth is captured when it appears, not at the next poll), and
//! the policy route that delivers captured packets locally. Only ztunnel's
//! own rule and table are ever changed; no `ip` binary is needed.

use std::net::Ipv4Addr;

use futures_util::{Stream, StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        link::{LinkAttribute, LinkFlags, LinkMessage},
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
            RouteType,
        },
        rule::{RuleAction, RuleAttribute, RuleMessage},
        AddressFamily, RouteNetlinkMessage,
    },
    Handle, IpVersion, MulticastGroup, RouteMessageBuilder,
};
use ztunnel_common::{CAPTURE_MARK, CAPTURE_MARK_MASK, CAPTURE_ROUTE_TABLE, CAPTURE_RULE_PRIORITY};

use super::topology::{Interface, Link, LinkLayer, Route, Topology};

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
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(request("dumping links"))?;
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(request("dumping routes"))?;
        Ok(Topology {
            links: links.iter().filter_map(link).collect(),
            routes: routes.iter().filter_map(main_unicast_route).collect(),
        })
    }

    /// Installs `ip rule fwmark CAPTURE_MARK/CAPTURE_MARK_MASK lookup
    /// CAPTURE_ROUTE_TABLE` and the table's `local 0.0.0.0/0 dev lo` route.
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
        if self.capture_rule().await?.is_none() {
            let mut add = self
                .handle
                .rule()
                .add()
                .v4()
                .fw_mark(CAPTURE_MARK)
                .priority(CAPTURE_RULE_PRIORITY)
                .table_id(CAPTURE_ROUTE_TABLE)
                .action(RuleAction::ToTable);
            add.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(CAPTURE_MARK_MASK));
            add.execute()
                .await
                .map_err(request("adding the capture rule"))?;
        }
        Ok(())
    }

    /// Whether the capture rule is in place.
    pub async fn capture_rule_present(&self) -> Result<bool, NetlinkError> {
        Ok(self.capture_rule().await?.is_some())
    }

    /// Removes the rule and the route installed by
    /// [`Netlink::install_capture_route`]; absent already is fine.
    pub async fn remove_capture_route(&self) -> Result<(), NetlinkError> {
        while let Some(rule) = self.capture_rule().await? {
            self.handle
                .rule()
                .del(rule)
                .execute()
                .await
                .map_err(request("deleting the capture rule"))?;
        }
        let route = capture_route(self.loopback_index().await?);
        // Nothing else uses this table: an error here means it is gone.
        let _ = self.handle.route().del(route).execute().await;
        Ok(())
    }

    async fn capture_rule(&self) -> Result<Option<RuleMessage>, NetlinkError> {
        let mut rules = self.handle.rule().get(IpVersion::V4).execute();
        while let Some(rule) = rules.try_next().await.map_err(request("dumping rules"))? {
            if is_capture_rule(&rule) {
                return Ok(Some(rule));
            }
        }
        Ok(None)
    }

    async fn loopback_index(&self) -> Result<u32, NetlinkError> {
        let topology = self.topology().await?;
        topology
            .links
            .iter()
            .find(|l| l.loopback)
            .map(|l| l.interface.index)
            .ok_or(NetlinkError::Missing(
                "no loopback device in this network namespace",
            ))
    }
}

/// The kernel's link, IPv4 route and IPv4 rule events: each item says
/// something changed (and whether a rule went away), so capture resyncs
/// at once instead of at the next poll.
pub fn events() -> Result<impl Stream<Item = Event>, NetlinkError> {
    let (connection, _, messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv4Rule,
    ])
    .map_err(NetlinkError::Socket)?;
    tokio::spawn(connection);
    Ok(messages.filter_map(|(message, _)| async move {
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRule(_)) => {
                Some(Event::RuleRemoved)
            }
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(_)
                | RouteNetlinkMessage::DelLink(_)
                | RouteNetlinkMessage::NewRoute(_)
                | RouteNetlinkMessage::DelRoute(_),
            ) => Some(Event::TopologyChanged),
            _ => None,
        }
    }))
}

/// What a kernel event means for capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A link or route appeared, changed or went away.
    TopologyChanged,
    /// A policy rule was deleted (perhaps ours).
    RuleRemoved,
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

fn is_capture_rule(rule: &RuleMessage) -> bool {
    let mut priority = None;
    let mut mark = None;
    let mut table = Some(rule.header.table as u32);
    for attribute in &rule.attributes {
        match attribute {
            RuleAttribute::Priority(p) => priority = Some(*p),
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::Table(t) => table = Some(*t),
            _ => {}
        }
    }
    priority == Some(CAPTURE_RULE_PRIORITY)
        && mark == Some(CAPTURE_MARK)
        && table == Some(CAPTURE_ROUTE_TABLE)
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
    })
}

fn main_unicast_route(message: &RouteMessage) -> Option<Route> {
    let header = &message.header;
    if header.address_family != AddressFamily::Inet || header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = header.table as u32;
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let mut devices = Vec::new();
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = *ip,
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
