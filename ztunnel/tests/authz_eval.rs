//! The authorization evaluator against a table of cases: every match field
//! and its `not` twin, each string match kind, each scope, dry run, and the
//! allow/deny combination rules. Semantics are Istio's ztunnel's.

use std::{net::SocketAddr, path::Path};

use ztunnel::{
    authz::{evaluate, Connection, Denial, PolicyStore},
    config::local::LocalConfig,
    identity::Identity,
    state::Snapshot,
};

/// The destination: workload `dst` in namespace `shop` at 10.0.0.2, which
/// selects the policy `shop/selected`; `other` in namespace `ops`.
const WORKLOADS: &str = r#"
workloads:
- uid: u/dst
  name: dst
  namespace: shop
  serviceAccount: cart
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  node: n1
  authorizationPolicies: ["shop/selected"]
  services: {}
- uid: u/other
  name: other
  namespace: ops
  workloadIps: ["10.0.0.9"]
  protocol: HBONE
  node: n1
  services: {}
"#;

fn policy(name: &str, scope: &str, action: &str, dry_run: bool, rules: &str) -> String {
    let namespace = if scope == "Global" {
        "istio-system"
    } else {
        "shop"
    };
    format!("- name: {name}\n  namespace: {namespace}\n  scope: {scope}\n  action: {action}\n  dryRun: {dry_run}\n  rules: {rules}\n")
}

/// One match clause as a one-rule, one-clause policy body.
fn one(m: &str) -> String {
    format!("[[[{m}]]]")
}

fn store(policies: &[String]) -> (Snapshot, PolicyStore) {
    let yaml = format!("{WORKLOADS}policies:\n{}", policies.concat());
    let config =
        LocalConfig::parse(&yaml, Path::new("case.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let snapshot = Snapshot::new("n1", "cluster.local", &config);
    let store = PolicyStore::new(&config.policies);
    (snapshot, store)
}

fn tls(ns: &str, sa: &str, src: &str, dst: &str) -> Connection {
    Connection {
        src: src.parse::<SocketAddr>().unwrap(),
        dst: dst.parse::<SocketAddr>().unwrap(),
        src_identity: Some(Identity::new("cluster.local", ns, sa)),
    }
}

fn plain(src: &str, dst: &str) -> Connection {
    Connection {
        src: src.parse::<SocketAddr>().unwrap(),
        dst: dst.parse::<SocketAddr>().unwrap(),
        src_identity: None,
    }
}

/// Frontend in `web`, from 10.1.2.3, to dst:8080.
fn frontend() -> Connection {
    tls("web", "frontend", "10.1.2.3:5000", "10.0.0.2:8080")
}

fn allowed(policies: &[String], conn: &Connection) -> bool {
    decide(policies, conn, "10.0.0.2").is_ok()
}

fn decide(policies: &[String], conn: &Connection, workload_ip: &str) -> Result<(), Denial> {
    let (snapshot, store) = store(policies);
    let workload = snapshot
        .workload_by_ip(workload_ip.parse().unwrap())
        .expect("workload exists")
        .clone();
    evaluate(&store, &workload, conn)
}

/// An allow policy with one match `m`: allowed iff `m` matches.
fn allow_if(m: &str, conn: &Connection) -> bool {
    allowed(&[policy("p", "Namespace", "Allow", false, &one(m))], conn)
}

#[test]
fn field_matches() {
    let f = frontend();
    let p = plain("10.1.2.3:5000", "10.0.0.2:8080");
    // (match, connection, expected) — every field and its `not` twin.
    let cases: Vec<(&str, &Connection, bool)> = vec![
        ("{namespaces: [!Exact web]}", &f, true),
        ("{namespaces: [!Exact ops]}", &f, false),
        ("{namespaces: [!Exact web]}", &p, false),
        ("{notNamespaces: [!Exact web]}", &f, false),
        ("{notNamespaces: [!Exact ops]}", &f, true),
        ("{notNamespaces: [!Exact web]}", &p, true),
        (
            "{serviceAccounts: [{namespace: web, serviceAccount: frontend}]}",
            &f,
            true,
        ),
        (
            "{serviceAccounts: [{namespace: web, serviceAccount: admin}]}",
            &f,
            false,
        ),
        (
            "{serviceAccounts: [{namespace: web, serviceAccount: frontend}]}",
            &p,
            false,
        ),
        (
            "{notServiceAccounts: [{namespace: web, serviceAccount: frontend}]}",
            &f,
            false,
        ),
        (
            "{notServiceAccounts: [{namespace: web, serviceAccount: frontend}]}",
            &p,
            true,
        ),
        (
            "{principals: [!Exact cluster.local/ns/web/sa/frontend]}",
            &f,
            true,
        ),
        (
            "{principals: [!Exact spiffe://cluster.local/ns/web/sa/frontend]}",
            &f,
            false,
        ),
        (
            "{principals: [!Exact cluster.local/ns/web/sa/frontend]}",
            &p,
            false,
        ),
        (
            "{notPrincipals: [!Exact cluster.local/ns/web/sa/frontend]}",
            &f,
            false,
        ),
        (
            "{notPrincipals: [!Exact cluster.local/ns/web/sa/frontend]}",
            &p,
            true,
        ),
        ("{sourceIps: [10.1.2.3/32]}", &f, true),
        ("{sourceIps: [10.1.0.0/16]}", &f, true),
        ("{sourceIps: [10.2.0.0/16]}", &f, false),
        ("{notSourceIps: [10.1.0.0/16]}", &f, false),
        ("{notSourceIps: [10.2.0.0/16]}", &p, true),
        ("{destinationIps: [10.0.0.2/32]}", &f, true),
        ("{destinationIps: [10.0.0.0/24]}", &p, true),
        ("{destinationIps: [10.0.1.0/24]}", &f, false),
        ("{notDestinationIps: [10.0.0.0/24]}", &f, false),
        ("{notDestinationIps: [10.0.1.0/24]}", &f, true),
        ("{destinationPorts: [8080]}", &f, true),
        ("{destinationPorts: [80, 8080]}", &p, true),
        ("{destinationPorts: [15008]}", &f, false),
        ("{notDestinationPorts: [8080]}", &f, false),
        ("{notDestinationPorts: [9090]}", &p, true),
        // String match kinds.
        ("{principals: [!Prefix cluster.local/ns/web/]}", &f, true),
        ("{principals: [!Prefix cluster.local/ns/ops/]}", &f, false),
        ("{principals: [!Suffix /sa/frontend]}", &f, true),
        ("{principals: [!Suffix /sa/admin]}", &f, false),
        ("{principals: [!Presence []]}", &f, true),
        ("{principals: [!Presence []]}", &p, false),
        ("{namespaces: [!Presence []]}", &p, false),
        ("{namespaces: [!Suffix eb]}", &f, true),
        // Within a match, every field must hold; within a field, any entry.
        (
            "{namespaces: [!Exact web], destinationPorts: [9090]}",
            &f,
            false,
        ),
        (
            "{namespaces: [!Exact ops, !Exact web], destinationPorts: [8080]}",
            &f,
            true,
        ),
        (
            "{sourceIps: [10.0.0.0/8], notSourceIps: [10.1.2.0/24]}",
            &f,
            false,
        ),
        (
            "{sourceIps: [10.0.0.0/8], notSourceIps: [10.1.3.0/24]}",
            &f,
            true,
        ),
    ];
    for (m, conn, expected) in cases {
        assert_eq!(allow_if(m, conn), expected, "match {m} for {conn:?}");
    }
}

#[test]
fn rule_structure() {
    let f = frontend();
    let body = |rules: &str| vec![policy("p", "Namespace", "Allow", false, rules)];
    // No rules: never matches, so the lone allow policy denies.
    assert!(!allowed(&body("[]"), &f));
    // An empty rule matches everything.
    assert!(allowed(&body("[[]]"), &f));
    // An empty clause matches.
    assert!(allowed(&body("[[[]]]"), &f));
    // A match with no constraint is skipped, not a wildcard.
    assert!(!allowed(&body("[[[{}]]]"), &f));
    // Rules: any. Clauses: all. Matches in a clause: any.
    assert!(allowed(
        &body("[[[{namespaces: [!Exact ops]}]], [[{namespaces: [!Exact web]}]]]"),
        &f
    ));
    assert!(!allowed(
        &body("[[[{namespaces: [!Exact web]}], [{destinationPorts: [9090]}]]]"),
        &f
    ));
    assert!(allowed(&body("[[[{namespaces: [!Exact web]}], [{destinationPorts: [9090]}, {destinationPorts: [8080]}]]]"), &f));
}

#[test]
fn scopes_select_the_policies_that_apply() {
    let f = frontend();
    let deny_all = "[[]]";
    // Namespace scope applies to workloads in the policy's namespace only.
    let ns = vec![policy("ns", "Namespace", "Deny", false, deny_all)];
    assert!(decide(&ns, &f, "10.0.0.2").is_err());
    assert!(decide(
        &ns,
        &tls("web", "frontend", "10.1.2.3:1", "10.0.0.9:8080"),
        "10.0.0.9"
    )
    .is_ok());
    // Global scope applies everywhere.
    let global = vec![policy("g", "Global", "Deny", false, deny_all)];
    assert!(decide(&global, &f, "10.0.0.2").is_err());
    assert!(decide(
        &global,
        &tls("web", "frontend", "10.1.2.3:1", "10.0.0.9:8080"),
        "10.0.0.9"
    )
    .is_err());
    // WorkloadSelector applies only to workloads that list it.
    let selected = vec![policy(
        "selected",
        "WorkloadSelector",
        "Deny",
        false,
        deny_all,
    )];
    assert!(decide(&selected, &f, "10.0.0.2").is_err());
    let unselected = vec![policy(
        "elsewhere",
        "WorkloadSelector",
        "Deny",
        false,
        deny_all,
    )];
    assert!(decide(&unselected, &f, "10.0.0.2").is_ok());
}

#[test]
fn allow_and_deny_combine_like_istio() {
    let f = frontend();
    let allow_web = policy(
        "allow-web",
        "Namespace",
        "Allow",
        false,
        &one("{namespaces: [!Exact web]}"),
    );
    let allow_ops = policy(
        "allow-ops",
        "Namespace",
        "Allow",
        false,
        &one("{namespaces: [!Exact ops]}"),
    );
    let deny_8080 = policy(
        "deny-8080",
        "Namespace",
        "Deny",
        false,
        &one("{destinationPorts: [8080]}"),
    );
    let deny_9090 = policy(
        "deny-9090",
        "Namespace",
        "Deny",
        false,
        &one("{destinationPorts: [9090]}"),
    );
    // No policy: allowed.
    assert!(allowed(&[], &f));
    // Only a non-matching deny: allowed (no allow policy in scope).
    assert!(allowed(std::slice::from_ref(&deny_9090), &f));
    // A matching deny wins over a matching allow, and is named.
    assert_eq!(
        decide(&[allow_web.clone(), deny_8080.clone()], &f, "10.0.0.2"),
        Err(Denial::ExplicitlyDenied("shop/deny-8080".into()))
    );
    // Allow policies exist: one must match.
    assert_eq!(
        decide(std::slice::from_ref(&allow_ops), &f, "10.0.0.2"),
        Err(Denial::NotAllowed)
    );
    assert!(allowed(&[allow_ops, allow_web], &f));
}

#[test]
fn dry_run_policies_never_decide() {
    let f = frontend();
    let dry_deny = policy("dry-deny", "Namespace", "Deny", true, "[[]]");
    let dry_allow_none = policy(
        "dry-allow",
        "Namespace",
        "Allow",
        true,
        &one("{namespaces: [!Exact ops]}"),
    );
    assert!(allowed(std::slice::from_ref(&dry_deny), &f));
    // A dry-run allow that matches nothing does not make allow policies "exist".
    assert!(allowed(std::slice::from_ref(&dry_allow_none), &f));
    let real_deny = policy("deny", "Namespace", "Deny", false, "[[]]");
    assert!(!allowed(&[dry_allow_none, real_deny], &f));
}
