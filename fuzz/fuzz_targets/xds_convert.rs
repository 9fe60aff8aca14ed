//! xDS: resources as the control plane pushes them, through the code the
//! xDS client runs (`Store::apply`: decode, convert, hold), then the
//! snapshot and the kernel policy tables ztunnel builds from them.
//!
//! Input: the first byte picks what the rest is: an `istio.workload.Address`
//! (0), an `istio.security.Authorization` (1), or a whole
//! `DeltaDiscoveryResponse` (2). A resource that converts must convert back
//! (as the repo's control plane does) to one that converts the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use ztunnel::{
    protos::{
        envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource},
        istio::{security as pb_sec, workload as pb},
    },
    xds::{convert, store::Store, ADDRESS_TYPE, AUTHORIZATION_TYPE},
};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let response = match kind % 3 {
        0 => {
            round_trip_address(bytes);
            one(ADDRESS_TYPE, bytes)
        }
        1 => {
            round_trip_authorization(bytes);
            one(AUTHORIZATION_TYPE, bytes)
        }
        _ => match DeltaDiscoveryResponse::decode(bytes) {
            Ok(response) => response,
            Err(_) => return,
        },
    };
    let mut store = Store::default();
    let applied = store.apply(&response);
    let _ = applied.error();
    // Applying the same resource again changes nothing.
    if kind % 3 != 2 {
        assert!(!store.apply(&response).changed);
    }
    let config = store.local_config();
    let node = config
        .workloads
        .first()
        .map(|w| w.node.clone())
        .unwrap_or_default();
    let snapshot = ztunnel::state::Snapshot::new(&node, "cluster.local", &config);
    let _ = ztunnel::authz::kernel::compile(&snapshot);
});

fn one(type_url: &str, bytes: &[u8]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        resources: vec![Resource {
            name: "fuzz".into(),
            version: "1".into(),
            resource: Some(prost_types::Any {
                type_url: type_url.into(),
                value: bytes.to_vec(),
            }),
            aliases: Vec::new(),
        }],
        nonce: "1".into(),
        ..Default::default()
    }
}

fn round_trip_address(bytes: &[u8]) {
    let Ok(address) = pb::Address::decode(bytes) else {
        return;
    };
    match address.r#type {
        Some(pb::address::Type::Workload(w)) => {
            if let Ok(local) = convert::workload_from_proto(&w) {
                let back = convert::workload_to_proto(&local);
                assert_eq!(convert::workload_from_proto(&back), Ok(local), "{back:?}");
            }
        }
        Some(pb::address::Type::Service(s)) => {
            if let Ok(local) = convert::service_from_proto(&s) {
                let back = convert::service_to_proto(&local);
                assert_eq!(convert::service_from_proto(&back), Ok(local), "{back:?}");
            }
        }
        None => {}
    }
}

fn round_trip_authorization(bytes: &[u8]) {
    let Ok(policy) = pb_sec::Authorization::decode(bytes) else {
        return;
    };
    if let Ok(local) = convert::authorization_from_proto(&policy) {
        let back = convert::authorization_to_proto(&local);
        assert_eq!(
            convert::authorization_from_proto(&back),
            Ok(local),
            "{back:?}"
        );
    }
}
