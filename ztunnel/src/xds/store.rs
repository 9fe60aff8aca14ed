//! The xDS resources ztunnel holds: what the control plane pushed, by type,
//! name and version, converted to the local file's types. A push is applied
//! resource by resource: one that cannot be converted is rejected (and the
//! version held before stays), the rest applies.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;

use super::{convert, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::{
    config::local::{Authorization, LocalConfig, LocalWorkload, Service},
    protos::{
        envoy::service::discovery::v3::DeltaDiscoveryResponse,
        istio::{security as pb_sec, workload as pb},
    },
};

/// An `istio.workload.Address`: one or the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressEntry {
    Workload(Box<LocalWorkload>),
    Service(Box<Service>),
}

#[derive(Debug, Clone)]
struct Held<T> {
    version: String,
    value: T,
}

/// What applying a push did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Whether the configuration the resources make changed.
    pub changed: bool,
    /// Resources refused, by name, with why. The previous version of each
    /// (if any) stays in force.
    pub rejected: Vec<(String, String)>,
}

impl Applied {
    /// The NACK message, if anything was refused.
    pub fn error(&self) -> Option<String> {
        if self.rejected.is_empty() {
            return None;
        }
        let each: Vec<String> = self
            .rejected
            .iter()
            .map(|(name, why)| format!("{name}: {why}"))
            .collect();
        Some(format!(
            "rejected {} resource(s), the previous version of each kept: {}",
            each.len(),
            each.join("; ")
        ))
    }
}

/// Every resource held.
#[derive(Debug, Default)]
pub struct Store {
    addresses: BTreeMap<String, Held<AddressEntry>>,
    policies: BTreeMap<String, Held<Authorization>>,
    /// Types the control plane has sent at least one response for.
    received: BTreeSet<String>,
}

impl Store {
    /// Applies one delta response.
    pub fn apply(&mut self, response: &DeltaDiscoveryResponse) -> Applied {
        let mut applied = Applied::default();
        let type_url = response.type_url.as_str();
        for resource in &response.resources {
            let name = resource.name.clone();
            let result = match &resource.resource {
                None => Err("the resource has no body".to_string()),
                Some(any) if any.type_url != type_url => {
                    Err(format!("a {} in a response for {type_url}", any.type_url))
                }
                Some(any) => match type_url {
                    ADDRESS_TYPE => decode_address(&any.value).map(|a| {
                        applied.changed |= put(&mut self.addresses, &name, &resource.version, a);
                    }),
                    AUTHORIZATION_TYPE => decode_authorization(&any.value).map(|a| {
                        applied.changed |= put(&mut self.policies, &name, &resource.version, a);
                    }),
                    other => Err(format!("ztunnel does not subscribe to {other}")),
                },
            };
            if let Err(why) = result {
                applied.rejected.push((name, why));
            }
        }
        for name in &response.removed_resources {
            let removed = match type_url {
                ADDRESS_TYPE => self.addresses.remove(name).is_some(),
                AUTHORIZATION_TYPE => self.policies.remove(name).is_some(),
                _ => false,
            };
            applied.changed |= removed;
        }
        if matches!(type_url, ADDRESS_TYPE | AUTHORIZATION_TYPE) {
            self.received.insert(type_url.to_string());
        }
        applied
    }

    /// Whether both types have been pushed at least once: only then is the
    /// state complete enough to serve (workloads without their policies
    /// would let through what the policies deny).
    pub fn complete(&self) -> bool {
        self.received.contains(ADDRESS_TYPE) && self.received.contains(AUTHORIZATION_TYPE)
    }

    /// Name -> version of the resources of `type_url` held, for resubscribing
    /// after a reconnect.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        match type_url {
            ADDRESS_TYPE => versions(&self.addresses),
            AUTHORIZATION_TYPE => versions(&self.policies),
            _ => HashMap::new(),
        }
    }

    /// How many resources of `type_url` are held.
    pub fn count(&self, type_url: &str) -> usize {
        match type_url {
            ADDRESS_TYPE => self.addresses.len(),
            AUTHORIZATION_TYPE => self.policies.len(),
            _ => 0,
        }
    }

    /// The configuration the resources make, in the local file's shape.
    pub fn local_config(&self) -> LocalConfig {
        let mut config = LocalConfig::default();
        for held in self.addresses.values() {
            match &held.value {
                AddressEntry::Workload(w) => config.workloads.push((**w).clone()),
                AddressEntry::Service(s) => config.services.push((**s).clone()),
            }
        }
        config.policies = self.policies.values().map(|h| h.value.clone()).collect();
        config
    }
}

fn put<T: PartialEq>(
    map: &mut BTreeMap<String, Held<T>>,
    name: &str,
    version: &str,
    value: T,
) -> bool {
    let changed = map.get(name).is_none_or(|held| held.value != value);
    map.insert(
        name.to_string(),
        Held {
            version: version.to_string(),
            value,
        },
    );
    changed
}

fn versions<T>(map: &BTreeMap<String, Held<T>>) -> HashMap<String, String> {
    map.iter()
        .map(|(name, held)| (name.clone(), held.version.clone()))
        .collect()
}

fn decode_address(bytes: &[u8]) -> Result<AddressEntry, String> {
    let address = pb::Address::decode(bytes).map_err(|e| format!("not an Address: {e}"))?;
    match address.r#type {
        Some(pb::address::Type::Workload(w)) => convert::workload_from_proto(&w)
            .map(|w| AddressEntry::Workload(Box::new(w)))
            .map_err(|e| format!("workload: {e}")),
        Some(pb::address::Type::Service(s)) => convert::service_from_proto(&s)
            .map(|s| AddressEntry::Service(Box::new(s)))
            .map_err(|e| format!("service: {e}")),
        None => Err("an Address with neither a workload nor a service".into()),
    }
}

fn decode_authorization(bytes: &[u8]) -> Result<Authorization, String> {
    let policy =
        pb_sec::Authorization::decode(bytes).map_err(|e| format!("not an Authorization: {e}"))?;
    convert::authorization_from_proto(&policy).map_err(|e| e.to_string())
}
