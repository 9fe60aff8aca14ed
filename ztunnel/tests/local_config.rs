//! The local file: Istio's ztunnel schema loads, and bad input is refused
//! with the file and the field named.

use std::path::Path;

use ztunnel::{
    config::local::{
        ConfigError, InboundProtocol, LocalConfig, RbacAction, RbacScope, StringMatch,
    },
    state::Snapshot,
};

const FULL: &str = r#"
workloads:
- uid: cluster1//v1/Pod/shop/cart-1
  name: cart-1
  namespace: shop
  serviceAccount: cart
  trustDomain: cluster.local
  workloadIps: ["10.1.0.5"]
  protocol: HBONE
  node: worker-1
  network: ""
  canonicalName: cart
  canonicalRevision: v2
  authorizationPolicies: ["shop/only-frontend"]
  locality: {region: eu, zone: eu-1, subzone: a}
  services:
    "shop/cart.shop.svc.cluster.local":
      80: 8080
- uid: cluster1//v1/Pod/shop/db-0
  name: db-0
  namespace: shop
  workloadIps: ["10.1.1.7"]
  node: worker-2
  services: {}
services:
- name: cart
  namespace: shop
  hostname: cart.shop.svc.cluster.local
  vips: ["/10.96.0.10", "remote/10.96.0.11"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/shop/sa/cart"]
  canonical: true
policies:
- name: only-frontend
  namespace: shop
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals: [!Exact cluster.local/ns/shop/sa/frontend, !Prefix cluster.local/ns/ops/]
    - - destinationPorts: [8080]
        notSourceIps: ["10.9.0.0/16"]
  - - - namespaces: [!Suffix -canary]
        serviceAccounts: [{namespace: shop, serviceAccount: probe}]
      - notPrincipals: [!Presence []]
- name: no-debug
  namespace: ""
  scope: Global
  action: Deny
  dryRun: true
  rules:
  - - - notDestinationPorts: [22]
        destinationIps: ["10.1.0.0/24"]
"#;

fn parse(yaml: &str) -> Result<LocalConfig, ConfigError> {
    LocalConfig::parse(yaml, Path::new("test.yaml"))
}

fn error_of(yaml: &str) -> String {
    parse(yaml)
        .expect_err("config should be refused")
        .to_string()
}

#[test]
fn istio_schema_loads_with_every_section() {
    let c = parse(FULL).expect("full config parses");
    assert_eq!(c.workloads.len(), 2);
    assert_eq!(c.workloads[0].protocol, InboundProtocol::HBONE);
    assert_eq!(
        c.workloads[1].protocol,
        InboundProtocol::TCP,
        "protocol defaults to TCP"
    );
    assert_eq!(c.services[0].vips[1].network, "remote");
    assert_eq!(c.services[0].ports.get(&80), Some(&8080));
    let p = &c.policies[0];
    assert_eq!(
        (p.scope, p.action),
        (RbacScope::WorkloadSelector, RbacAction::Allow)
    );
    assert_eq!(
        p.rules[0][0][0].principals[1],
        StringMatch::Prefix("cluster.local/ns/ops/".into())
    );
    assert_eq!(p.rules[1][0][1].not_principals[0], StringMatch::Presence());
    assert!(c.policies[1].dry_run);
}

#[test]
fn the_shipped_lab_example_matches_the_lab() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lab.yaml");
    let c = LocalConfig::load(&path).expect("examples/lab.yaml parses");
    let node1 = Snapshot::new("node1", "cluster.local", &c);
    let plan = node1.capture_plan(&[]);
    let enrolled: Vec<String> = plan
        .pods
        .iter()
        .filter(|p| p.enrolled)
        .map(|p| p.ip.to_string())
        .collect();
    assert_eq!(enrolled, ["198.18.1.10", "198.18.1.12"]);
    assert_eq!(plan.pods.len(), 3, "node1 has three local pods");
}

#[test]
fn snapshot_knows_which_workloads_are_local() {
    let c = parse(FULL).unwrap();
    let s = Snapshot::new("worker-1", "cluster.local", &c);
    assert!(s
        .local_workload_by_ip("10.1.0.5".parse().unwrap())
        .is_some());
    assert!(
        s.local_workload_by_ip("10.1.1.7".parse().unwrap())
            .is_none(),
        "db-0 is on worker-2"
    );
    assert!(s.workload_by_ip("10.1.1.7".parse().unwrap()).is_some());
}

#[test]
fn empty_file_is_an_empty_mesh() {
    assert_eq!(parse("").unwrap(), LocalConfig::default());
    assert_eq!(parse("# nothing yet\n").unwrap(), LocalConfig::default());
}

#[test]
fn unknown_workload_field_names_the_field() {
    let e = error_of(&FULL.replace("  canonicalRevision: v2\n", "  canonicalRevison: v2\n"));
    assert!(
        e.contains("test.yaml") && e.contains("workloads[0]") && e.contains("canonicalRevison"),
        "{e}"
    );
}

#[test]
fn unknown_policy_match_field_is_refused_unlike_istio() {
    let e = error_of(&FULL.replace("notDestinationPorts: [22]", "notDestinationPort: [22]"));
    assert!(
        e.contains("policies[1].rules[0][0][0]") && e.contains("notDestinationPort"),
        "{e}"
    );
}

#[test]
fn bad_values_name_their_field() {
    let cases = [
        (
            FULL.replace("\"10.1.0.5\"", "\"10.1.0.500\""),
            "workloads[0].workloadIps[0]",
        ),
        (
            FULL.replace("\"10.9.0.0/16\"", "\"10.9.0.0/33\""),
            "policies[0].rules[0][1][0].notSourceIps[0]",
        ),
        (
            FULL.replace("destinationPorts: [8080]", "destinationPorts: [80800]"),
            "policies[0].rules[0][1][0].destinationPorts[0]",
        ),
        (
            FULL.replace("!Suffix -canary", "!Ends -canary"),
            "policies[0].rules[1][0][0].namespaces[0]",
        ),
        (
            FULL.replace("\"/10.96.0.10\"", "\"10.96.0.10\""),
            "services[0].vips[0]",
        ),
        (
            FULL.replace("protocol: HBONE", "protocol: hbone"),
            "workloads[0].protocol",
        ),
        (FULL.replace("  dryRun: true\n", ""), "policies[1]"),
        (
            FULL.replace("\"shop/cart.shop.svc.cluster.local\"", "\"cart\""),
            "workloads[0].services",
        ),
    ];
    for (yaml, field) in cases {
        let e = error_of(&yaml);
        assert!(e.contains("test.yaml"), "{e}");
        assert!(e.contains(field), "expected {field} in: {e}");
    }
}

#[test]
fn an_address_claimed_twice_is_refused() {
    let e = error_of(&FULL.replace("\"10.1.1.7\"", "\"10.1.0.5\""));
    assert!(
        e.contains("workloads[1].workloadIps[0]") && e.contains("workloads[0]"),
        "{e}"
    );
}

#[test]
fn a_policy_defined_twice_is_refused() {
    let e = error_of(&FULL.replace(
        "name: no-debug\n  namespace: \"\"",
        "name: only-frontend\n  namespace: shop",
    ));
    assert!(e.contains("policies[1].name"), "{e}");
}

#[test]
fn capture_exclusions_are_checked_like_the_annotations() {
    let with = |x: &str| {
        FULL.replacen(
            "workloadIps: [\"10.1.0.5\"]",
            &format!("workloadIps: [\"10.1.0.5\"]\n  captureExclusions: {x}"),
            1,
        )
    };
    let ok = parse(&with(
        "{outboundPorts: [5432], outboundIpRanges: [\"10.9.0.0/16\"]}",
    ));
    assert!(ok.is_ok(), "{ok:?}");
    let e = error_of(&with("{outboundPorts: [5432, 0]}"));
    assert!(
        e.contains("workloads[0].captureExclusions.outboundPorts[1]"),
        "{e}"
    );
    let many: Vec<String> = (1..=33).map(|p| p.to_string()).collect();
    let e = error_of(&with(&format!("{{outboundPorts: [{}]}}", many.join(", "))));
    assert!(e.contains("at most 32"), "{e}");
}
