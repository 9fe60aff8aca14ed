//! The local configuration file: the schema Istio's ztunnel reads from
//! `LOCAL_XDS_PATH` (`workloads`, `services`, `policies`; camelCase; tagged
//! string matches such as `!Exact`), so existing files load unchanged.
//!
//! One deliberate difference: unknown fields are rejected everywhere,
//! including inside policy matches, where Istio's ztunnel ignores them. A
//! misspelled `notDestinationPort` silently widening a policy is the kind of
//! mistake a mesh must not forgive.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::IpNet;
use serde::{de, Deserialize, Deserializer, Serialize};

/// Why a configuration file was refused. Always names the file, and the field
/// (as a path like `workloads[1].workloadIps[0]`) when one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: field `{field}`: {message}", path.display())]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("config file {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    #[serde(default)]
    pub policies: Vec<Authorization>,
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A workload, plus the services it is an endpoint of.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkload {
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    #[serde(default)]
    pub network_gateway: Option<GatewayAddress>,
    #[serde(default)]
    pub protocol: InboundProtocol,
    #[serde(default)]
    pub network_mode: NetworkMode,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub workload_name: String,
    #[serde(default)]
    pub workload_type: String,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub native_tunnel: bool,
    #[serde(default)]
    pub application_tunnel: Option<ApplicationTunnel>,
    /// Keys (`namespace/name`) of the `WorkloadSelector` policies that apply.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    #[serde(default)]
    pub status: HealthStatus,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub locality: Option<Locality>,
    #[serde(default)]
    pub capacity: Option<u32>,
    /// `namespace/hostname` -> service port -> target port.
    pub services: BTreeMap<NamespacedHostname, BTreeMap<u16, u16>>,
    /// Outbound destinations this pod's traffic skips capture for (this
    /// ztunnel's extension: from the pod's annotations with
    /// `--enroll-pods`, or written here). Empty: everything is captured.
    #[serde(default, skip_serializing_if = "CaptureExclusions::is_empty")]
    pub capture_exclusions: CaptureExclusions,
}

/// Outbound flows a pod opts out of capture, enforced in the kernel. They
/// never cover another enrolled pod of the same node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaptureExclusions {
    /// Destination ports, to any address.
    #[serde(default)]
    pub outbound_ports: Vec<u16>,
    /// Destination IPv4 ranges, on any port.
    #[serde(default)]
    pub outbound_ip_ranges: Vec<ipnet::Ipv4Net>,
}

impl CaptureExclusions {
    /// At most this many ports and this many ranges per pod.
    pub const MAX_PER_KIND: usize = 32;

    pub fn is_empty(&self) -> bool {
        self.outbound_ports.is_empty() && self.outbound_ip_ranges.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum InboundProtocol {
    #[default]
    TCP,
    HBONE,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum NetworkMode {
    #[default]
    Standard,
    HostNetwork,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

/// A gateway given by address (`network/ip`) or by `namespace/hostname`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum GatewayDestination {
    Address(NetworkAddress),
    Hostname(NamespacedHostname),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplicationTunnel {
    pub protocol: ApplicationTunnelProtocol,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ApplicationTunnelProtocol {
    NONE,
    PROXY,
}

/// A service: VIPs and ports, its endpoints coming from the workloads that name it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<NetworkAddress>,
    #[serde(default)]
    pub cidr_vips: Vec<NetworkCidr>,
    /// Service port -> target port.
    pub ports: BTreeMap<u16, u16>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default)]
    pub ip_families: Option<IpFamily>,
    #[serde(default)]
    pub canonical: bool,
    #[serde(default)]
    pub visibility: Visibility,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCidr {
    #[serde(default)]
    pub network: String,
    pub cidr: IpNet,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    pub routing_preferences: Vec<LoadBalancerScope>,
    pub mode: LoadBalancerMode,
    #[serde(default)]
    pub health_policy: LoadBalancerHealthPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum LoadBalancerScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum LoadBalancerMode {
    Standard,
    Strict,
    Failover,
    Passthrough,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum LoadBalancerHealthPolicy {
    #[default]
    OnlyHealthy,
    AllowAll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum IpFamily {
    Dual,
    IPv4,
    IPv6,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum Visibility {
    #[default]
    Public,
    Namespace,
}

/// An L4 authorization policy, in Istio's ztunnel shape: `rules` is a list of
/// rules (any may match), each a list of clauses (all must match), each a list
/// of matches (any may match).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: RbacScope,
    pub action: RbacAction,
    pub rules: Vec<Vec<Vec<RbacMatch>>>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum RbacScope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum RbacAction {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RbacMatch {
    #[serde(default)]
    pub namespaces: Vec<StringMatch>,
    #[serde(default)]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default)]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default)]
    pub principals: Vec<StringMatch>,
    #[serde(default)]
    pub not_principals: Vec<StringMatch>,
    #[serde(default)]
    pub source_ips: Vec<IpNet>,
    #[serde(default)]
    pub not_source_ips: Vec<IpNet>,
    #[serde(default)]
    pub destination_ips: Vec<IpNet>,
    #[serde(default)]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(default)]
    pub destination_ports: Vec<u16>,
    #[serde(default)]
    pub not_destination_ports: Vec<u16>,
}

/// A string match, written with a YAML tag: `!Exact a`, `!Prefix a`,
/// `!Suffix a`, `!Presence []`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence(),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// `network/ip`; the network may be empty (`/10.0.0.1`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

impl FromStr for NetworkAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (network, ip) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not in the form network/IP (e.g. `/10.0.0.1`)"))?;
        let address = ip
            .parse()
            .map_err(|_| format!("`{ip}` in `{s}` is not an IP address"))?;
        Ok(NetworkAddress {
            network: network.to_string(),
            address,
        })
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

/// `namespace/hostname`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

impl FromStr for NamespacedHostname {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, hostname)) if !namespace.is_empty() && !hostname.is_empty() => {
                Ok(NamespacedHostname {
                    namespace: namespace.to_string(),
                    hostname: hostname.to_string(),
                })
            }
            _ => Err(format!("`{s}` is not in the form namespace/hostname")),
        }
    }
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}
serde_via_str!(NetworkAddress);
serde_via_str!(NamespacedHostname);

impl LocalConfig {
    /// Parses a configuration; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let config: LocalConfig = match serde_path_to_error::deserialize(deserializer) {
            Ok(c) => c,
            Err(e) => {
                let field = e.path().to_string();
                let mut message = e.into_inner().to_string();
                // serde_yaml prefixes its own (shorter) path; the field is named already.
                if let Some((prefix, rest)) = message.split_once(": ") {
                    if field.starts_with(prefix) {
                        message = rest.to_string();
                    }
                }
                return Err(if field.is_empty() || field == "." {
                    ConfigError::Invalid {
                        path: path.to_path_buf(),
                        message,
                    }
                } else {
                    ConfigError::Field {
                        path: path.to_path_buf(),
                        field,
                        message,
                    }
                });
            }
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_text(path).map(|(config, _)| config)
    }

    /// Reads and parses the file at `path`, and returns its text too (a
    /// watcher compares the next read with it).
    pub fn load_with_text(path: &Path) -> Result<(Self, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok((Self::parse(&text, path)?, text))
    }

    /// Checks what the types alone cannot: nothing claimed twice.
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let field_err = |field: String, message: String| ConfigError::Field {
            path: path.to_path_buf(),
            field,
            message,
        };
        let mut ips: BTreeMap<(String, IpAddr), usize> = BTreeMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            if w.workload_ips.is_empty() && w.hostname.is_empty() {
                return Err(field_err(
                    format!("workloads[{i}].workloadIps"),
                    "a workload needs at least one address".into(),
                ));
            }
            for (j, ip) in w.workload_ips.iter().enumerate() {
                if let Some(other) = ips.insert((w.network.clone(), *ip), i) {
                    return Err(field_err(
                        format!("workloads[{i}].workloadIps[{j}]"),
                        format!("{ip} is already the address of workloads[{other}]"),
                    ));
                }
            }
            let x = &w.capture_exclusions;
            if let Some(j) = x.outbound_ports.iter().position(|p| *p == 0) {
                return Err(field_err(
                    format!("workloads[{i}].captureExclusions.outboundPorts[{j}]"),
                    "port 0 is not a destination port".into(),
                ));
            }
            for (name, n) in [
                ("outboundPorts", x.outbound_ports.len()),
                ("outboundIpRanges", x.outbound_ip_ranges.len()),
            ] {
                if n > CaptureExclusions::MAX_PER_KIND {
                    return Err(field_err(
                        format!("workloads[{i}].captureExclusions.{name}"),
                        format!(
                            "{n} entries, at most {} are allowed",
                            CaptureExclusions::MAX_PER_KIND
                        ),
                    ));
                }
            }
        }
        let mut policy_keys = BTreeMap::new();
        for (i, p) in self.policies.iter().enumerate() {
            for (r, rule) in p.rules.iter().enumerate() {
                for (c, clause) in rule.iter().enumerate() {
                    for (m, matcher) in clause.iter().enumerate() {
                        for (name, ports) in [
                            ("destinationPorts", &matcher.destination_ports),
                            ("notDestinationPorts", &matcher.not_destination_ports),
                        ] {
                            if let Some(j) = ports.iter().position(|p| *p == 0) {
                                return Err(field_err(
                                    format!("policies[{i}].rules[{r}][{c}][{m}].{name}[{j}]"),
                                    "port 0 is not a destination port".into(),
                                ));
                            }
                        }
                    }
                }
            }
            if let Some(other) = policy_keys.insert(format!("{}/{}", p.namespace, p.name), i) {
                return Err(field_err(
                    format!("policies[{i}].name"),
                    format!(
                        "policy {}/{} is already defined by policies[{other}]",
                        p.namespace, p.name
                    ),
                ));
            }
        }
        Ok(())
    }
}
