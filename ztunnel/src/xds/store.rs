//! The xDS resources ztunnel holds: what the control plane pushed, by type,
//! name and version, converted to the local file's types. A push is applied
//! resource by resource: one that cannot be converted is rejected (and the
//! version held before stays), the rest applies.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;

use super::{convert, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::{
    config::local::{Authorization, LocalConfig, LocalWorkload, RbacAction, Service},
    protos::{
        envoy::service::discovery::v3::DeltaDiscoveryResponse,
        istio::{security as pb_sec, workload as pb},
    },
};

/// How many refused resources a NACK names (the rest are counted).
const NACK_DETAILS: usize = 20;

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
    /// When its content last changed: of two workloads claiming one
    /// address (a pod terminating, its IP already reused), the newer wins.
    seq: u64,
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
        // Bounded: a push of many bad resources must not make a NACK the
        // server cannot take (nor a log line of megabytes).
        let mut each: Vec<String> = self
            .rejected
            .iter()
            .take(NACK_DETAILS)
            .map(|(name, why)| format!("{name}: {why}"))
            .collect();
        if self.rejected.len() > NACK_DETAILS {
            each.push(format!("and {} more", self.rejected.len() - NACK_DETAILS));
        }
        Some(format!(
            "rejected {} resource(s), the previous version of each kept: {}",
            self.rejected.len(),
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
    /// The next [`Held::seq`].
    seq: u64,
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
                        self.seq += 1;
                        applied.changed |=
                            put(&mut self.addresses, &name, &resource.version, a, self.seq);
                    }),
                    AUTHORIZATION_TYPE => {
                        self.apply_authorization(&name, &resource.version, &any.value, &mut applied)
                    }
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

    /// Applies one policy. A policy that cannot be enforced as written
    /// keeps its previous version; a new one is replaced by a fail-closed
    /// stand-in (see [`convert::fail_closed_stand_in`]) rather than left
    /// out, since leaving out a `Deny` would let through what it denies.
    fn apply_authorization(
        &mut self,
        name: &str,
        version: &str,
        bytes: &[u8],
        applied: &mut Applied,
    ) -> Result<(), String> {
        let policy = pb_sec::Authorization::decode(bytes)
            .map_err(|e| format!("not an Authorization: {e}"))?;
        let why = match convert::authorization_from_proto(&policy) {
            Ok(a) => {
                self.seq += 1;
                applied.changed |= put(&mut self.policies, name, version, a, self.seq);
                return Ok(());
            }
            Err(e) => e.to_string(),
        };
        if self.policies.contains_key(name) {
            return Err(why);
        }
        match convert::fail_closed_stand_in(&policy) {
            Some(stand_in) => {
                let effect = match stand_in.action {
                    RbacAction::Deny => "denies every connection in its scope",
                    RbacAction::Allow => "allows nothing",
                };
                // No version: a reconnect asks for the real one again.
                self.seq += 1;
                applied.changed |= put(&mut self.policies, name, "", stand_in, self.seq);
                Err(format!("{why}; a fail-closed stand-in that {effect} is enforced until a valid version arrives"))
            }
            None => Err(why),
        }
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

    /// The configuration the resources make, in the local file's shape,
    /// in the order their contents arrived: where two workloads claim an
    /// address, the later one is what the snapshot keeps.
    pub fn local_config(&self) -> LocalConfig {
        let mut config = LocalConfig::default();
        let mut addresses: Vec<&Held<AddressEntry>> = self.addresses.values().collect();
        addresses.sort_by_key(|held| held.seq);
        for held in addresses {
            match &held.value {
                AddressEntry::Workload(w) => config.workloads.push((**w).clone()),
                AddressEntry::Service(s) => config.services.push((**s).clone()),
            }
        }
        config.policies = self.policies.values().map(|h| h.value.clone()).collect();
        config
    }
}

/// Holds `value` under `name`; says whether its content changed (only then
/// does it take `seq`).
fn put<T: PartialEq>(
    map: &mut BTreeMap<String, Held<T>>,
    name: &str,
    version: &str,
    value: T,
    seq: u64,
) -> bool {
    match map.get_mut(name) {
        Some(held) if held.value == value => {
            held.version = version.to_string();
            false
        }
        _ => {
            map.insert(
                name.to_string(),
                Held {
                    version: version.to_string(),
                    value,
                    seq,
                },
            );
            true
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protos::envoy::service::discovery::v3::Resource;

    fn resource(name: &str, version: &str, type_url: &str, value: Vec<u8>) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(prost_types::Any {
                type_url: type_url.into(),
                value,
            }),
            aliases: Vec::new(),
        }
    }

    fn push(type_url: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: "1".into(),
            ..Default::default()
        }
    }

    fn deny_port(name: &str, port: u32) -> Vec<u8> {
        pb_sec::Authorization {
            name: name.into(),
            namespace: "default".into(),
            scope: pb_sec::Scope::Namespace as i32,
            action: pb_sec::Action::Deny as i32,
            rules: vec![pb_sec::Rule {
                clauses: vec![pb_sec::Clause {
                    matches: vec![pb_sec::Match {
                        destination_ports: vec![port],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn workload(uid: &str, ip: [u8; 4]) -> Vec<u8> {
        pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "default".into(),
                addresses: vec![ip.to_vec()],
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn a_new_policy_that_cannot_be_enforced_stands_in_closed() {
        let mut store = Store::default();
        let applied = store.apply(&push(
            AUTHORIZATION_TYPE,
            vec![resource(
                "default/d",
                "1",
                AUTHORIZATION_TYPE,
                deny_port("d", 70000),
            )],
            &[],
        ));
        let error = applied.error().expect("a NACK");
        assert!(
            error.contains("default/d") && error.contains("70000") && error.contains("stand-in"),
            "{error}"
        );
        let policies = store.local_config().policies;
        assert_eq!(policies.len(), 1);
        // One empty rule: denies everything in its scope.
        assert_eq!(policies[0].action, RbacAction::Deny);
        assert_eq!(policies[0].rules, vec![Vec::<Vec<_>>::new()]);
        // No version: a reconnect asks for the real one again.
        assert_eq!(store.versions(AUTHORIZATION_TYPE)["default/d"], "");
    }

    #[test]
    fn a_bad_version_of_a_held_policy_keeps_the_held_one() {
        let mut store = Store::default();
        store.apply(&push(
            AUTHORIZATION_TYPE,
            vec![resource(
                "default/d",
                "1",
                AUTHORIZATION_TYPE,
                deny_port("d", 80),
            )],
            &[],
        ));
        let applied = store.apply(&push(
            AUTHORIZATION_TYPE,
            vec![resource(
                "default/d",
                "2",
                AUTHORIZATION_TYPE,
                deny_port("d", 70000),
            )],
            &[],
        ));
        assert!(applied.error().is_some());
        assert!(!applied.changed);
        assert_eq!(store.versions(AUTHORIZATION_TYPE)["default/d"], "1");
        assert_eq!(
            store.local_config().policies[0].rules[0][0][0].destination_ports,
            vec![80]
        );
    }

    #[test]
    fn of_two_workloads_claiming_one_address_the_later_comes_last() {
        let mut store = Store::default();
        let mut arrive = |uid: &str, version: &str| {
            let w = workload(uid, [10, 0, 0, 1]);
            store.apply(&push(
                ADDRESS_TYPE,
                vec![resource(uid, version, ADDRESS_TYPE, w)],
                &[],
            ));
            store
                .local_config()
                .workloads
                .iter()
                .map(|w| w.uid.clone())
                .collect::<Vec<_>>()
        };
        // "z-old" sorts after "a-new" by name; arrival order must win.
        arrive("z-old", "1");
        assert_eq!(arrive("a-new", "1"), ["z-old", "a-new"]);
        // Re-sent unchanged, the old one does not become newer.
        assert_eq!(arrive("z-old", "2"), ["z-old", "a-new"]);
    }

    #[test]
    fn a_nack_names_a_bounded_number_of_resources() {
        let mut store = Store::default();
        let bad: Vec<Resource> = (0..100)
            .map(|i| resource(&format!("w{i}"), "1", ADDRESS_TYPE, vec![0xff, 0xff]))
            .collect();
        let error = store
            .apply(&push(ADDRESS_TYPE, bad, &[]))
            .error()
            .expect("a NACK");
        assert!(error.starts_with("rejected 100 resource(s)"), "{error}");
        assert!(error.ends_with("and 80 more"), "{error}");
    }

    #[test]
    fn removals_apply_and_unknown_names_are_harmless() {
        let mut store = Store::default();
        store.apply(&push(
            ADDRESS_TYPE,
            vec![resource(
                "w",
                "1",
                ADDRESS_TYPE,
                workload("w", [10, 0, 0, 1]),
            )],
            &[],
        ));
        let applied = store.apply(&push(ADDRESS_TYPE, vec![], &["w", "never-held"]));
        assert!(applied.changed && applied.error().is_none());
        assert_eq!(store.count(ADDRESS_TYPE), 0);
    }
}
