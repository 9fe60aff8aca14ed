//! What the control plane serves: the local file's workloads, services and
//! policies as Istio's xDS resources, each with a version that changes when
//! its content does.

use std::{
    collections::{hash_map::DefaultHasher, BTreeMap},
    hash::{Hash, Hasher},
};

use prost::Message;
use prost_types::Any;
use ztunnel::{
    config::local::LocalConfig,
    protos::istio::workload as pb,
    xds::{convert, ADDRESS_TYPE, AUTHORIZATION_TYPE},
};

/// One resource as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub version: String,
    pub body: Any,
}

/// Every resource, by type URL and name.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub by_type: BTreeMap<String, BTreeMap<String, Served>>,
}

fn served<M: Message>(type_url: &str, message: &M) -> Served {
    let value = message.encode_to_vec();
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    Served {
        version: format!("{:016x}", hasher.finish()),
        body: Any {
            type_url: type_url.to_string(),
            value,
        },
    }
}

impl Resources {
    /// The resources a configuration makes, named as istiod names them:
    /// workloads by uid, services `namespace/hostname`, policies
    /// `namespace/name`.
    pub fn from_config(config: &LocalConfig) -> Self {
        let mut addresses = BTreeMap::new();
        for w in &config.workloads {
            let name = if w.uid.is_empty() {
                format!("{}/{}", w.namespace, w.name)
            } else {
                w.uid.clone()
            };
            let address = pb::Address {
                r#type: Some(pb::address::Type::Workload(convert::workload_to_proto(w))),
            };
            addresses.insert(name, served(ADDRESS_TYPE, &address));
        }
        for s in &config.services {
            let address = pb::Address {
                r#type: Some(pb::address::Type::Service(convert::service_to_proto(s))),
            };
            addresses.insert(
                format!("{}/{}", s.namespace, s.hostname),
                served(ADDRESS_TYPE, &address),
            );
        }
        let policies = config
            .policies
            .iter()
            .map(|p| {
                (
                    format!("{}/{}", p.namespace, p.name),
                    served(AUTHORIZATION_TYPE, &convert::authorization_to_proto(p)),
                )
            })
            .collect();
        Resources {
            by_type: BTreeMap::from([
                (ADDRESS_TYPE.to_string(), addresses),
                (AUTHORIZATION_TYPE.to_string(), policies),
            ]),
        }
    }

    /// Adds (or replaces) a resource as given: for tests that need to push
    /// what a well-behaved control plane never would.
    pub fn insert_raw(&mut self, name: &str, body: Any) {
        let mut hasher = DefaultHasher::new();
        body.value.hash(&mut hasher);
        let version = format!("{:016x}", hasher.finish());
        self.by_type
            .entry(body.type_url.clone())
            .or_default()
            .insert(name.to_string(), Served { version, body });
    }

    /// The resources of one type.
    pub fn of(&self, type_url: &str) -> Option<&BTreeMap<String, Served>> {
        self.by_type.get(type_url)
    }
}
