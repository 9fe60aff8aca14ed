//! Istio's xDS resources to and from the local file's types, so that both
//! sources feed one state (the control plane in this repo converts the other
//! way). A resource that cannot be converted is refused with the field named,
//! never half applied: a policy with an unreadable condition must not be
//! evaluated without it.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use crate::{
    config::local::{
        ApplicationTunnel, ApplicationTunnelProtocol, Authorization, GatewayAddress,
        GatewayDestination, HealthStatus, InboundProtocol, IpFamily, LoadBalancer,
        LoadBalancerHealthPolicy, LoadBalancerMode, LoadBalancerScope, LocalWorkload, Locality,
        NamespacedHostname, NetworkAddress, NetworkCidr, NetworkMode, RbacAction, RbacMatch,
        RbacScope, Service, ServiceAccountMatch, StringMatch, Visibility,
    },
    protos::istio::{security as pb_sec, workload as pb},
};

/// Why a resource was refused: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct ConvertError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConvertError {
    ConvertError {
        field: field.into(),
        message: message.into(),
    }
}

fn ip(field: &str, bytes: &[u8]) -> Result<IpAddr, ConvertError> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default())),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(bytes).unwrap_or_default(),
        )),
        n => Err(err(
            field,
            format!("{n} bytes is not an IPv4 or IPv6 address"),
        )),
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn port(field: &str, value: u32) -> Result<u16, ConvertError> {
    u16::try_from(value).map_err(|_| err(field, format!("{value} is not a port")))
}

fn enum_value<T: TryFrom<i32>>(field: &str, value: i32) -> Result<T, ConvertError> {
    T::try_from(value).map_err(|_| err(field, format!("unknown value {value}")))
}

/// A workload resource.
pub fn workload_from_proto(w: &pb::Workload) -> Result<LocalWorkload, ConvertError> {
    let workload_ips = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip(&format!("addresses[{i}]"), a))
        .collect::<Result<Vec<_>, _>>()?;
    if workload_ips.is_empty() && w.hostname.is_empty() {
        return Err(err(
            "addresses",
            "a workload needs an address or a hostname",
        ));
    }
    let protocol = match enum_value::<pb::TunnelProtocol>("tunnelProtocol", w.tunnel_protocol)? {
        pb::TunnelProtocol::Hbone => InboundProtocol::HBONE,
        // A sidecar speaks its own mTLS; ztunnel reaches it as plain TCP.
        pb::TunnelProtocol::None | pb::TunnelProtocol::LegacyIstioMtls => InboundProtocol::TCP,
    };
    let workload_type = match enum_value::<pb::WorkloadType>("workloadType", w.workload_type)? {
        pb::WorkloadType::Deployment => "deployment",
        pb::WorkloadType::Cronjob => "cronjob",
        pb::WorkloadType::Pod => "pod",
        pb::WorkloadType::Job => "job",
    };
    let mut services = BTreeMap::new();
    for (key, ports) in &w.services {
        let field = format!("services[{key}]");
        let name: NamespacedHostname = key.parse().map_err(|e: String| err(&field, e))?;
        let mut map = BTreeMap::new();
        for (i, p) in ports.ports.iter().enumerate() {
            map.insert(
                port(&format!("{field}.ports[{i}].servicePort"), p.service_port)?,
                port(&format!("{field}.ports[{i}].targetPort"), p.target_port)?,
            );
        }
        services.insert(name, map);
    }
    Ok(LocalWorkload {
        workload_ips,
        waypoint: gateway("waypoint", w.waypoint.as_ref())?,
        network_gateway: gateway("networkGateway", w.network_gateway.as_ref())?,
        protocol,
        network_mode: match enum_value::<pb::NetworkMode>("networkMode", w.network_mode)? {
            pb::NetworkMode::Standard => NetworkMode::Standard,
            pb::NetworkMode::HostNetwork => NetworkMode::HostNetwork,
        },
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        network: w.network.clone(),
        workload_name: w.workload_name.clone(),
        workload_type: workload_type.into(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        hostname: w.hostname.clone(),
        node: w.node.clone(),
        native_tunnel: w.native_tunnel,
        application_tunnel: match &w.application_tunnel {
            None => None,
            Some(t) => Some(ApplicationTunnel {
                protocol: match enum_value::<pb::application_tunnel::Protocol>(
                    "applicationTunnel.protocol",
                    t.protocol,
                )? {
                    pb::application_tunnel::Protocol::None => ApplicationTunnelProtocol::NONE,
                    pb::application_tunnel::Protocol::Proxy => ApplicationTunnelProtocol::PROXY,
                },
                port: match t.port {
                    0 => None,
                    p => Some(port("applicationTunnel.port", p)?),
                },
            }),
        },
        authorization_policies: w.authorization_policies.clone(),
        status: match enum_value::<pb::WorkloadStatus>("status", w.status)? {
            pb::WorkloadStatus::Healthy => HealthStatus::Healthy,
            pb::WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
        },
        cluster_id: w.cluster_id.clone(),
        locality: w.locality.as_ref().map(|l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }),
        capacity: w.capacity,
        services,
        // Not in Istio's schema: from the pod watcher or the file only.
        capture_exclusions: Default::default(),
    })
}

fn gateway(
    field: &str,
    g: Option<&pb::GatewayAddress>,
) -> Result<Option<GatewayAddress>, ConvertError> {
    let Some(g) = g else { return Ok(None) };
    let destination = match &g.destination {
        Some(pb::gateway_address::Destination::Address(a)) => {
            GatewayDestination::Address(NetworkAddress {
                network: a.network.clone(),
                address: ip(&format!("{field}.address.address"), &a.address)?,
            })
        }
        Some(pb::gateway_address::Destination::Hostname(h)) => {
            GatewayDestination::Hostname(NamespacedHostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            })
        }
        None => return Err(err(field, "neither an address nor a hostname")),
    };
    Ok(Some(GatewayAddress {
        destination,
        hbone_mtls_port: port(&format!("{field}.hboneMtlsPort"), g.hbone_mtls_port)?,
    }))
}

/// A service resource.
pub fn service_from_proto(s: &pb::Service) -> Result<Service, ConvertError> {
    let mut vips = Vec::new();
    let mut cidr_vips = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let field = format!("addresses[{i}]");
        let address = ip(&format!("{field}.address"), &a.address)?;
        match a.length {
            None => vips.push(NetworkAddress {
                network: a.network.clone(),
                address,
            }),
            Some(length) => cidr_vips.push(NetworkCidr {
                network: a.network.clone(),
                cidr: u8::try_from(length)
                    .ok()
                    .and_then(|l| IpNet::new(address, l).ok())
                    .ok_or_else(|| {
                        err(
                            format!("{field}.length"),
                            format!("/{length} is not a prefix length for {address}"),
                        )
                    })?,
            }),
        }
    }
    let mut ports = BTreeMap::new();
    for (i, p) in s.ports.iter().enumerate() {
        ports.insert(
            port(&format!("ports[{i}].servicePort"), p.service_port)?,
            port(&format!("ports[{i}].targetPort"), p.target_port)?,
        );
    }
    let load_balancer = match &s.load_balancing {
        None => None,
        Some(lb) => {
            let mut routing_preferences = Vec::new();
            for (i, scope) in lb.routing_preference.iter().enumerate() {
                use pb::load_balancing::Scope;
                let field = format!("loadBalancing.routingPreference[{i}]");
                routing_preferences.push(match enum_value::<Scope>(&field, *scope)? {
                    Scope::UnspecifiedScope => return Err(err(field, "unspecified scope")),
                    Scope::Region => LoadBalancerScope::Region,
                    Scope::Zone => LoadBalancerScope::Zone,
                    Scope::Subzone => LoadBalancerScope::Subzone,
                    Scope::Node => LoadBalancerScope::Node,
                    Scope::Cluster => LoadBalancerScope::Cluster,
                    Scope::Network => LoadBalancerScope::Network,
                });
            }
            use pb::load_balancing::{HealthPolicy, Mode};
            Some(LoadBalancer {
                routing_preferences,
                mode: match enum_value::<Mode>("loadBalancing.mode", lb.mode)? {
                    Mode::UnspecifiedMode => LoadBalancerMode::Standard,
                    Mode::Strict => LoadBalancerMode::Strict,
                    Mode::Failover => LoadBalancerMode::Failover,
                    Mode::Passthrough => LoadBalancerMode::Passthrough,
                },
                health_policy: match enum_value::<HealthPolicy>(
                    "loadBalancing.healthPolicy",
                    lb.health_policy,
                )? {
                    HealthPolicy::OnlyHealthy => LoadBalancerHealthPolicy::OnlyHealthy,
                    HealthPolicy::AllowAll => LoadBalancerHealthPolicy::AllowAll,
                },
            })
        }
    };
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        cidr_vips,
        ports,
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: gateway("waypoint", s.waypoint.as_ref())?,
        load_balancer,
        ip_families: match enum_value::<pb::IpFamilies>("ipFamilies", s.ip_families)? {
            pb::IpFamilies::Automatic => None,
            pb::IpFamilies::Ipv4Only => Some(IpFamily::IPv4),
            pb::IpFamilies::Ipv6Only => Some(IpFamily::IPv6),
            pb::IpFamilies::Dual => Some(IpFamily::Dual),
        },
        canonical: s.canonical,
        visibility: match enum_value::<pb::service::Visibility>("visibility", s.visibility)? {
            pb::service::Visibility::Public => Visibility::Public,
            pb::service::Visibility::Namespace => Visibility::Namespace,
        },
    })
}

/// An authorization policy resource.
pub fn authorization_from_proto(a: &pb_sec::Authorization) -> Result<Authorization, ConvertError> {
    if let Some(e) = a.extensions.first() {
        return Err(err(
            "extensions",
            format!("extension `{}` is not supported; the policy is refused rather than enforced without it", e.name),
        ));
    }
    let mut rules = Vec::new();
    for (r, rule) in a.rules.iter().enumerate() {
        let mut clauses = Vec::new();
        for (c, clause) in rule.clauses.iter().enumerate() {
            let mut matches = Vec::new();
            for (m, matcher) in clause.matches.iter().enumerate() {
                matches.push(rbac_match(
                    &format!("rules[{r}].clauses[{c}].matches[{m}]"),
                    matcher,
                )?);
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    Ok(Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: rbac_scope(a.scope)?,
        action: rbac_action(a.action)?,
        rules,
        dry_run: a.dry_run,
    })
}

/// What stands in for a new policy that cannot be enforced as written: the
/// same name, scope and action, erring towards refusal. A `Deny` denies
/// every connection in its scope (one empty rule matches everything); an
/// `Allow` allows nothing (no rule ever matches), so in its scope only the
/// other `Allow` policies let anything through. `None` when even the scope
/// or the action cannot be read.
pub fn fail_closed_stand_in(a: &pb_sec::Authorization) -> Option<Authorization> {
    let action = rbac_action(a.action).ok()?;
    Some(Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: rbac_scope(a.scope).ok()?,
        action,
        rules: match action {
            RbacAction::Allow => Vec::new(),
            RbacAction::Deny => vec![Vec::new()],
        },
        dry_run: a.dry_run,
    })
}

fn rbac_scope(value: i32) -> Result<RbacScope, ConvertError> {
    Ok(match enum_value::<pb_sec::Scope>("scope", value)? {
        pb_sec::Scope::Global => RbacScope::Global,
        pb_sec::Scope::Namespace => RbacScope::Namespace,
        pb_sec::Scope::WorkloadSelector => RbacScope::WorkloadSelector,
    })
}

fn rbac_action(value: i32) -> Result<RbacAction, ConvertError> {
    Ok(match enum_value::<pb_sec::Action>("action", value)? {
        pb_sec::Action::Allow => RbacAction::Allow,
        pb_sec::Action::Deny => RbacAction::Deny,
    })
}

fn rbac_match(field: &str, m: &pb_sec::Match) -> Result<RbacMatch, ConvertError> {
    if let Some(e) = m.extensions.first() {
        return Err(err(
            format!("{field}.extensions"),
            format!("extension `{}` is not supported; the policy is refused rather than enforced without it", e.name),
        ));
    }
    let strings = |name: &str, list: &[pb_sec::StringMatch]| {
        list.iter()
            .enumerate()
            .map(|(i, s)| string_match(&format!("{field}.{name}[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()
    };
    let cidrs = |name: &str, list: &[pb_sec::Address]| {
        list.iter()
            .enumerate()
            .map(|(i, a)| {
                let f = format!("{field}.{name}[{i}]");
                let address = ip(&format!("{f}.address"), &a.address)?;
                u8::try_from(a.length)
                    .ok()
                    .and_then(|l| IpNet::new(address, l).ok())
                    .ok_or_else(|| {
                        err(
                            format!("{f}.length"),
                            format!("/{} is not a prefix length for {address}", a.length),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |name: &str, list: &[u32]| {
        list.iter()
            .enumerate()
            .map(|(i, p)| {
                let f = format!("{field}.{name}[{i}]");
                match port(&f, *p)? {
                    0 => Err(err(f, "port 0 is not a destination port")),
                    p => Ok(p),
                }
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let accounts = |list: &[pb_sec::ServiceAccountMatch]| {
        list.iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    Ok(RbacMatch {
        namespaces: strings("namespaces", &m.namespaces)?,
        not_namespaces: strings("notNamespaces", &m.not_namespaces)?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings("principals", &m.principals)?,
        not_principals: strings("notPrincipals", &m.not_principals)?,
        source_ips: cidrs("sourceIps", &m.source_ips)?,
        not_source_ips: cidrs("notSourceIps", &m.not_source_ips)?,
        destination_ips: cidrs("destinationIps", &m.destination_ips)?,
        not_destination_ips: cidrs("notDestinationIps", &m.not_destination_ips)?,
        destination_ports: ports("destinationPorts", &m.destination_ports)?,
        not_destination_ports: ports("notDestinationPorts", &m.not_destination_ports)?,
    })
}

fn string_match(field: &str, s: &pb_sec::StringMatch) -> Result<StringMatch, ConvertError> {
    use pb_sec::string_match::MatchType;
    match &s.match_type {
        Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
        Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
        Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
        Some(MatchType::Presence(_)) => Ok(StringMatch::Presence()),
        // An empty match would match nothing or everything depending on
        // who reads it: refused.
        None => Err(err(field, "a string match with no kind")),
    }
}

/// The other way, for the control plane in this repo: a workload as istiod
/// would send it.
pub fn workload_to_proto(w: &LocalWorkload) -> pb::Workload {
    pb::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.workload_ips.iter().map(ip_bytes).collect(),
        hostname: w.hostname.clone(),
        network: w.network.clone(),
        tunnel_protocol: match w.protocol {
            InboundProtocol::HBONE => pb::TunnelProtocol::Hbone,
            InboundProtocol::TCP => pb::TunnelProtocol::None,
        } as i32,
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        waypoint: w.waypoint.as_ref().map(gateway_to_proto),
        network_gateway: w.network_gateway.as_ref().map(gateway_to_proto),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: match w.workload_type.as_str() {
            "cronjob" => pb::WorkloadType::Cronjob,
            "pod" => pb::WorkloadType::Pod,
            "job" => pb::WorkloadType::Job,
            _ => pb::WorkloadType::Deployment,
        } as i32,
        workload_name: w.workload_name.clone(),
        native_tunnel: w.native_tunnel,
        application_tunnel: w
            .application_tunnel
            .as_ref()
            .map(|t| pb::ApplicationTunnel {
                protocol: match t.protocol {
                    ApplicationTunnelProtocol::NONE => pb::application_tunnel::Protocol::None,
                    ApplicationTunnelProtocol::PROXY => pb::application_tunnel::Protocol::Proxy,
                } as i32,
                port: t.port.unwrap_or(0) as u32,
            }),
        services: w
            .services
            .iter()
            .map(|(name, ports)| {
                (
                    name.to_string(),
                    pb::PortList {
                        ports: ports
                            .iter()
                            .map(|(s, t)| pb::Port {
                                service_port: *s as u32,
                                target_port: *t as u32,
                                app_protocol: 0,
                            })
                            .collect(),
                    },
                )
            })
            .collect(),
        authorization_policies: w.authorization_policies.clone(),
        status: match w.status {
            HealthStatus::Healthy => pb::WorkloadStatus::Healthy,
            HealthStatus::Unhealthy => pb::WorkloadStatus::Unhealthy,
        } as i32,
        cluster_id: w.cluster_id.clone(),
        locality: w.locality.as_ref().map(|l| pb::Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }),
        network_mode: match w.network_mode {
            NetworkMode::Standard => pb::NetworkMode::Standard,
            NetworkMode::HostNetwork => pb::NetworkMode::HostNetwork,
        } as i32,
        extensions: Vec::new(),
        capacity: w.capacity,
    }
}

fn gateway_to_proto(g: &GatewayAddress) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(match &g.destination {
            GatewayDestination::Address(a) => {
                pb::gateway_address::Destination::Address(pb::NetworkAddress {
                    network: a.network.clone(),
                    address: ip_bytes(&a.address),
                    length: None,
                })
            }
            GatewayDestination::Hostname(h) => {
                pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                    namespace: h.namespace.clone(),
                    hostname: h.hostname.clone(),
                })
            }
        }),
        hbone_mtls_port: g.hbone_mtls_port as u32,
    }
}

/// A service as istiod would send it.
pub fn service_to_proto(s: &Service) -> pb::Service {
    let mut addresses: Vec<pb::NetworkAddress> = s
        .vips
        .iter()
        .map(|v| pb::NetworkAddress {
            network: v.network.clone(),
            address: ip_bytes(&v.address),
            length: None,
        })
        .collect();
    addresses.extend(s.cidr_vips.iter().map(|c| pb::NetworkAddress {
        network: c.network.clone(),
        address: ip_bytes(&c.cidr.addr()),
        length: Some(c.cidr.prefix_len() as u32),
    }));
    pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses,
        ports: s
            .ports
            .iter()
            .map(|(p, t)| pb::Port {
                service_port: *p as u32,
                target_port: *t as u32,
                app_protocol: 0,
            })
            .collect(),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(gateway_to_proto),
        load_balancing: s.load_balancer.as_ref().map(|lb| {
            use pb::load_balancing::{HealthPolicy, Mode, Scope};
            pb::LoadBalancing {
                routing_preference: lb
                    .routing_preferences
                    .iter()
                    .map(|s| {
                        let scope = match s {
                            LoadBalancerScope::Region => Scope::Region,
                            LoadBalancerScope::Zone => Scope::Zone,
                            LoadBalancerScope::Subzone => Scope::Subzone,
                            LoadBalancerScope::Node => Scope::Node,
                            LoadBalancerScope::Cluster => Scope::Cluster,
                            LoadBalancerScope::Network => Scope::Network,
                        };
                        scope as i32
                    })
                    .collect(),
                mode: match lb.mode {
                    LoadBalancerMode::Standard => Mode::UnspecifiedMode,
                    LoadBalancerMode::Strict => Mode::Strict,
                    LoadBalancerMode::Failover => Mode::Failover,
                    LoadBalancerMode::Passthrough => Mode::Passthrough,
                } as i32,
                health_policy: match lb.health_policy {
                    LoadBalancerHealthPolicy::OnlyHealthy => HealthPolicy::OnlyHealthy,
                    LoadBalancerHealthPolicy::AllowAll => HealthPolicy::AllowAll,
                } as i32,
            }
        }),
        ip_families: match s.ip_families {
            None => pb::IpFamilies::Automatic,
            Some(IpFamily::IPv4) => pb::IpFamilies::Ipv4Only,
            Some(IpFamily::IPv6) => pb::IpFamilies::Ipv6Only,
            Some(IpFamily::Dual) => pb::IpFamilies::Dual,
        } as i32,
        extensions: Vec::new(),
        canonical: s.canonical,
        visibility: match s.visibility {
            Visibility::Public => pb::service::Visibility::Public,
            Visibility::Namespace => pb::service::Visibility::Namespace,
        } as i32,
    }
}

/// An authorization policy as istiod would send it.
pub fn authorization_to_proto(a: &Authorization) -> pb_sec::Authorization {
    let strings = |list: &[StringMatch]| {
        list.iter()
            .map(|s| {
                use pb_sec::string_match::MatchType;
                pb_sec::StringMatch {
                    match_type: Some(match s {
                        StringMatch::Exact(v) => MatchType::Exact(v.clone()),
                        StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
                        StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
                        StringMatch::Presence() => MatchType::Presence(()),
                    }),
                }
            })
            .collect()
    };
    let cidrs = |list: &[IpNet]| {
        list.iter()
            .map(|c| pb_sec::Address {
                address: ip_bytes(&c.addr()),
                length: c.prefix_len() as u32,
            })
            .collect()
    };
    let accounts = |list: &[ServiceAccountMatch]| {
        list.iter()
            .map(|s| pb_sec::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    let ports = |list: &[u16]| list.iter().map(|p| *p as u32).collect();
    pb_sec::Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: match a.scope {
            RbacScope::Global => pb_sec::Scope::Global,
            RbacScope::Namespace => pb_sec::Scope::Namespace,
            RbacScope::WorkloadSelector => pb_sec::Scope::WorkloadSelector,
        } as i32,
        action: match a.action {
            RbacAction::Allow => pb_sec::Action::Allow,
            RbacAction::Deny => pb_sec::Action::Deny,
        } as i32,
        rules: a
            .rules
            .iter()
            .map(|rule| pb_sec::Rule {
                clauses: rule
                    .iter()
                    .map(|clause| pb_sec::Clause {
                        matches: clause
                            .iter()
                            .map(|m| pb_sec::Match {
                                namespaces: strings(&m.namespaces),
                                not_namespaces: strings(&m.not_namespaces),
                                service_accounts: accounts(&m.service_accounts),
                                not_service_accounts: accounts(&m.not_service_accounts),
                                principals: strings(&m.principals),
                                not_principals: strings(&m.not_principals),
                                source_ips: cidrs(&m.source_ips),
                                not_source_ips: cidrs(&m.not_source_ips),
                                destination_ips: cidrs(&m.destination_ips),
                                not_destination_ips: cidrs(&m.not_destination_ips),
                                destination_ports: ports(&m.destination_ports),
                                not_destination_ports: ports(&m.not_destination_ports),
                                extensions: Vec::new(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: a.dry_run,
        extensions: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use prost::Message;

    use super::*;
    use crate::{
        config::local::LocalConfig,
        protos::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource},
        xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE},
    };

    fn corpus(target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target)
    }

    /// The `xds_convert` fuzz target's seeds: the resources of the `config`
    /// target's seed files, encoded as the control plane sends them, each
    /// behind the byte that tells the target what follows (0 an Address,
    /// 1 an Authorization, 2 a whole DeltaDiscoveryResponse).
    fn xds_seeds() -> Vec<(String, Vec<u8>)> {
        let mut seeds = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(corpus("config"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for path in files {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            let config = LocalConfig::load(&path).unwrap();
            let mut addresses = Vec::new();
            for w in &config.workloads {
                addresses.push((
                    format!("workload-{}", w.name),
                    pb::address::Type::Workload(workload_to_proto(w)),
                ));
            }
            for s in &config.services {
                addresses.push((
                    format!("service-{}", s.name),
                    pb::address::Type::Service(service_to_proto(s)),
                ));
            }
            let mut resources = Vec::new();
            for (name, address) in addresses {
                let bytes = pb::Address {
                    r#type: Some(address),
                }
                .encode_to_vec();
                seeds.push((format!("{stem}-{name}"), [&[0u8][..], &bytes].concat()));
                resources.push(Resource {
                    name,
                    version: "1".into(),
                    resource: Some(prost_types::Any {
                        type_url: ADDRESS_TYPE.into(),
                        value: bytes,
                    }),
                    aliases: Vec::new(),
                });
            }
            for p in &config.policies {
                let bytes = authorization_to_proto(p).encode_to_vec();
                seeds.push((
                    format!("{stem}-policy-{}", p.name),
                    [&[1u8][..], &bytes].concat(),
                ));
            }
            if !resources.is_empty() {
                let push = DeltaDiscoveryResponse {
                    type_url: ADDRESS_TYPE.into(),
                    resources,
                    removed_resources: vec!["gone".into()],
                    nonce: "1".into(),
                    ..Default::default()
                };
                seeds.push((
                    format!("{stem}-push"),
                    [&[2u8][..], &push.encode_to_vec()].concat(),
                ));
            }
        }
        seeds
    }

    /// Rewrites fuzz/corpus/xds_convert/ from fuzz/corpus/config/.
    #[test]
    #[ignore = "writes the fuzz seed corpus: run it after changing the config seeds or the protos"]
    fn write_fuzz_seeds() {
        let dir = corpus("xds_convert");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in xds_seeds() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// The seeds in the repo are what the current schema makes, and each
    /// resource converts: seeds that no longer decode would only make the
    /// fuzzer start from nothing.
    #[test]
    fn the_fuzz_seeds_are_current() {
        for (name, bytes) in xds_seeds() {
            let on_disk = std::fs::read(corpus("xds_convert").join(&name)).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "fuzz/corpus/xds_convert/{name} is stale: cargo test -p ztunnel --lib -- --ignored write_fuzz_seeds"
            );
            match bytes[0] {
                0 => match pb::Address::decode(&bytes[1..]).unwrap().r#type.unwrap() {
                    pb::address::Type::Workload(w) => drop(workload_from_proto(&w).unwrap()),
                    pb::address::Type::Service(s) => drop(service_from_proto(&s).unwrap()),
                },
                1 => drop(
                    authorization_from_proto(&pb_sec::Authorization::decode(&bytes[1..]).unwrap())
                        .unwrap(),
                ),
                _ => assert!(!DeltaDiscoveryResponse::decode(&bytes[1..])
                    .unwrap()
                    .resources
                    .is_empty()),
            }
        }
        let _ = AUTHORIZATION_TYPE;
    }
}
