//! Compiling the identity-free part of authorization into the kernel's
//! policy tables.
//!
//! A plaintext connection has no identity, so its decision depends only on
//! source address, destination address and destination port. For each local
//! enrolled workload address, every policy in scope mentions finitely many
//! source CIDRs and ports; the decision is constant on each region of the
//! CIDR tree (a CIDR minus the CIDRs inside it) and for every port not
//! mentioned. So one evaluation per (region, port) — by the userspace
//! evaluator itself — gives an exact table, and an LPM trie looks a source up
//! in its region. The kernel only ever drops what userspace would deny.
//!
//! Workloads with a dry-run policy in scope are left out: userspace must see
//! their connections to log what the dry-run policy would have done.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use ipnet::Ipv4Net;
use ztunnel_common::{verdict, PolicyTuple, PolicyVerdict, POLICY_FIXED_BITS};

use super::{has_dry_run, rbac, Connection};
use crate::{
    config::local::{Authorization, RbacAction},
    redirect::PolicyEntry,
    state::Snapshot,
};

/// The policies that can decide a plaintext connection to one workload
/// (dry-run ones excluded: such workloads are not compiled).
struct PlaintextView<'a> {
    deny: Vec<&'a Authorization>,
    allow: Vec<&'a Authorization>,
    /// Some allow policy is in scope, even one plaintext can never match.
    allow_exists: bool,
}

impl PlaintextView<'_> {
    /// `evaluate`'s verdict for a connection without identity.
    fn denies(&self, conn: &Connection) -> bool {
        let subject = rbac::Subject::new(conn);
        if self.deny.iter().any(|p| rbac::policy_matches(p, &subject)) {
            return true;
        }
        self.allow_exists && !self.allow.iter().any(|p| rbac::policy_matches(p, &subject))
    }
}

/// The kernel policy entries for `snapshot`'s local enrolled workloads.
pub fn compile(snapshot: &Snapshot) -> Vec<PolicyEntry> {
    let store = &snapshot.policy_store;
    let mut entries = Vec::new();
    if store.is_empty() {
        return entries;
    }
    for workload in snapshot.local_workloads().filter(|w| w.hbone) {
        if has_dry_run(store, workload) {
            continue;
        }
        let policies: Vec<_> = store.in_scope(workload).collect();
        if policies.is_empty() {
            continue;
        }
        // What decides plaintext: policies that can match without an
        // identity, and whether any allow policy exists at all (then one
        // must match). Evaluating only these is exact for plaintext and far
        // cheaper than every policy in scope.
        let view = PlaintextView {
            deny: policies
                .iter()
                .filter(|p| p.action == RbacAction::Deny && rbac::can_match_plaintext(p))
                .map(|p| &***p)
                .collect(),
            allow: policies
                .iter()
                .filter(|p| p.action == RbacAction::Allow && rbac::can_match_plaintext(p))
                .map(|p| &***p)
                .collect(),
            allow_exists: policies.iter().any(|p| p.action == RbacAction::Allow),
        };
        // Everything the policies can tell sources and ports apart by.
        let mut cidrs: BTreeSet<Ipv4Net> = BTreeSet::new();
        let mut ports: BTreeSet<u16> = BTreeSet::new();
        for policy in view.deny.iter().chain(&view.allow) {
            for m in policy.rules.iter().flatten().flatten() {
                for net in m.source_ips.iter().chain(&m.not_source_ips) {
                    if let ipnet::IpNet::V4(net) = net {
                        cidrs.insert(net.trunc());
                    }
                }
                ports.extend(m.destination_ports.iter().chain(&m.not_destination_ports));
            }
        }
        cidrs.insert(Ipv4Net::default());
        ports.remove(&0);
        let regions: Vec<(Ipv4Net, Ipv4Addr)> = cidrs
            .iter()
            .filter_map(|net| representative(net, &cidrs).map(|rep| (*net, rep)))
            .collect();
        // Port 0 stands for every port no policy names.
        let Some(other_port) = (1..=u16::MAX).find(|p| !ports.contains(p)) else {
            continue;
        };
        for ip in workload.ips.iter().filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        }) {
            let judge = |port: u16| -> Vec<(Ipv4Net, bool)> {
                regions
                    .iter()
                    .map(|(net, rep)| {
                        let conn = Connection {
                            src: SocketAddr::new(IpAddr::V4(*rep), 0),
                            dst: SocketAddr::new(IpAddr::V4(ip), port),
                            src_identity: None,
                        };
                        (*net, view.denies(&conn))
                    })
                    .collect()
            };
            let other = judge(other_port);
            let other_denies = other.iter().any(|(_, deny)| *deny);
            if other_denies {
                push(&mut entries, ip, 0, &other);
            }
            for port in &ports {
                let judged = judge(*port);
                // A named port needs entries of its own whenever it could
                // differ from what the port-0 entries would say.
                if other_denies || judged.iter().any(|(_, deny)| *deny) {
                    push(&mut entries, ip, *port, &judged);
                }
            }
        }
    }
    entries
}

fn push(entries: &mut Vec<PolicyEntry>, dst: Ipv4Addr, port: u16, judged: &[(Ipv4Net, bool)]) {
    for (net, deny) in judged {
        entries.push(PolicyEntry {
            tuple: PolicyTuple {
                dst_ipv4_be: u32::from_ne_bytes(dst.octets()),
                dst_port_be: port.to_be(),
                _pad: 0,
                src_ipv4_be: u32::from_ne_bytes(net.network().octets()),
            },
            prefix_len: POLICY_FIXED_BITS + u32::from(net.prefix_len()),
            verdict: PolicyVerdict {
                verdict: if *deny { verdict::DENY } else { verdict::PASS },
            },
        });
    }
}

/// An address in `net` but in no smaller CIDR of `all`: the addresses an
/// LPM lookup sends to `net`'s entry. `None` if smaller CIDRs cover `net`.
fn representative(net: &Ipv4Net, all: &BTreeSet<Ipv4Net>) -> Option<Ipv4Addr> {
    let inner: Vec<&Ipv4Net> = all
        .iter()
        .filter(|c| c.prefix_len() > net.prefix_len() && net.contains(*c))
        .collect();
    let free = |a: u32| {
        let addr = Ipv4Addr::from(a);
        net.contains(&addr) && !inner.iter().any(|c| c.contains(&addr))
    };
    // Every uncovered stretch of `net` starts at its network address or just
    // past an inner CIDR, so one of these is in it.
    let mut candidates = vec![u32::from(net.network()), u32::from(net.broadcast())];
    for c in &inner {
        candidates.push(u32::from(c.broadcast()).wrapping_add(1));
        candidates.push(u32::from(c.network()).wrapping_sub(1));
    }
    candidates
        .into_iter()
        .find(|a| free(*a))
        .map(Ipv4Addr::from)
}

/// The verdict an LPM lookup in `entries` gives, as the kernel computes it
/// (for tests that cannot load the maps).
pub fn lookup(entries: &[PolicyEntry], src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Option<u32> {
    for port in [port, 0] {
        let best = entries
            .iter()
            .filter(|e| {
                e.tuple.dst_ipv4_be == u32::from_ne_bytes(dst.octets())
                    && e.tuple.dst_port_be == port.to_be()
            })
            .filter(|e| {
                let len = (e.prefix_len - POLICY_FIXED_BITS) as u8;
                let net = Ipv4Net::new(Ipv4Addr::from(e.tuple.src_ipv4_be.to_ne_bytes()), len);
                net.is_ok_and(|n| n.contains(&src))
            })
            .max_by_key(|e| e.prefix_len);
        if let Some(e) = best {
            return Some(e.verdict.verdict);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ztunnel_common::verdict::{DENY, PASS};

    use super::*;
    use crate::{authz::evaluate, config::local::LocalConfig, identity::Identity};

    /// `d` (10.9.0.1 and fd00::1, HBONE, on this node `n`) selects `a/sel`;
    /// `remote` is on another node, `plain` is not HBONE.
    const WORKLOADS: &str = r#"
workloads:
- {uid: d, name: d, namespace: a, serviceAccount: d, workloadIps: ["10.9.0.1", "fd00::1"], protocol: HBONE, node: n, authorizationPolicies: ["a/sel"], services: {}}
- {uid: r, name: remote, namespace: a, workloadIps: ["10.9.1.1"], protocol: HBONE, node: other, services: {}}
- {uid: p, name: plain, namespace: a, workloadIps: ["10.9.0.2"], node: n, services: {}}
"#;

    const D: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

    /// A policy in namespace `a` (Namespace scope, so it applies to every
    /// workload there) with one rule of one clause holding `m`.
    fn policy(name: &str, action: &str, m: &str) -> String {
        format!("- {{name: {name}, namespace: a, scope: Namespace, action: {action}, dryRun: false, rules: [[[{m}]]]}}\n")
    }

    fn snapshot(policies: &[String]) -> Snapshot {
        let yaml = format!("{WORKLOADS}policies:\n{}", policies.concat());
        let yaml = if policies.is_empty() {
            WORKLOADS.to_string()
        } else {
            yaml
        };
        let config = LocalConfig::parse(&yaml, Path::new("kernel-test.yaml"))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        Snapshot::new("n", "cluster.local", &config)
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// What the kernel decides for a plaintext `src` -> d:`port`.
    fn kernel(entries: &[PolicyEntry], src: &str, port: u16) -> Option<u32> {
        lookup(entries, ip(src), D, port)
    }

    /// Every source and port that matters below, on both sides of every
    /// CIDR edge used.
    const SOURCES: [&str; 10] = [
        "10.1.0.0",
        "10.1.2.3",
        "10.1.255.255",
        "10.0.255.255",
        "10.2.0.0",
        "10.255.0.1",
        "11.0.0.0",
        "192.168.1.1",
        "0.0.0.0",
        "255.255.255.255",
    ];
    const PORTS: [u16; 5] = [80, 443, 8080, 1, 65535];

    /// The kernel's answer agrees with userspace for every plaintext
    /// connection in the grid: a drop exactly when userspace denies.
    fn assert_exact(snapshot: &Snapshot, entries: &[PolicyEntry]) {
        let workload = snapshot.workload_by_ip(IpAddr::V4(D)).unwrap();
        for src in SOURCES {
            for port in PORTS {
                let conn = Connection {
                    src: SocketAddr::new(ip(src).into(), 40000),
                    dst: SocketAddr::new(D.into(), port),
                    src_identity: None,
                };
                let user = evaluate(&snapshot.policy_store, workload, &conn).is_err();
                let kernel = kernel(entries, src, port) == Some(DENY);
                assert_eq!(kernel, user, "{src} -> {D}:{port}");
            }
        }
    }

    #[test]
    fn no_policies_compile_to_no_entries() {
        assert!(compile(&snapshot(&[])).is_empty());
    }

    #[test]
    fn a_deny_by_source_and_port_drops_only_that_region_and_port() {
        let s = snapshot(&[policy(
            "deny",
            "Deny",
            r#"{sourceIps: ["10.1.0.0/16"], destinationPorts: [80]}"#,
        )]);
        let entries = compile(&s);
        assert_eq!(kernel(&entries, "10.1.2.3", 80), Some(DENY));
        assert_eq!(kernel(&entries, "10.2.0.0", 80), Some(PASS));
        // Port 443 is decided by nothing: no entry, userspace decides.
        assert_eq!(kernel(&entries, "10.1.2.3", 443), None);
        assert_exact(&s, &entries);
    }

    #[test]
    fn an_allow_policy_drops_every_source_and_port_it_does_not_allow() {
        let s = snapshot(&[policy("allow", "Allow", r#"{sourceIps: ["10.1.0.0/16"]}"#)]);
        let entries = compile(&s);
        assert_eq!(kernel(&entries, "10.1.0.0", 12345), Some(PASS));
        assert_eq!(kernel(&entries, "10.1.255.255", 80), Some(PASS));
        assert_eq!(kernel(&entries, "10.2.0.0", 12345), Some(DENY));
        assert_eq!(kernel(&entries, "0.0.0.0", 1), Some(DENY));
        assert_exact(&s, &entries);
    }

    #[test]
    fn an_allow_policy_plaintext_can_never_match_drops_all_plaintext() {
        let s = snapshot(&[policy(
            "mtls-only",
            "Allow",
            r#"{principals: [!Prefix cluster.local/]}"#,
        )]);
        let entries = compile(&s);
        for src in SOURCES {
            assert_eq!(kernel(&entries, src, 8080), Some(DENY), "{src}");
        }
        assert_exact(&s, &entries);
    }

    #[test]
    fn a_deny_policy_that_needs_an_identity_leaves_plaintext_alone() {
        let s = snapshot(&[policy(
            "deny-ns",
            "Deny",
            r#"{namespaces: [!Exact b], destinationPorts: [80]}"#,
        )]);
        assert!(compile(&s).is_empty());
    }

    #[test]
    fn a_not_source_hole_inside_a_denied_range_passes() {
        let s = snapshot(&[policy(
            "deny",
            "Deny",
            r#"{sourceIps: ["10.0.0.0/8"], notSourceIps: ["10.1.0.0/16"]}"#,
        )]);
        let entries = compile(&s);
        assert_eq!(kernel(&entries, "10.2.0.0", 80), Some(DENY));
        assert_eq!(kernel(&entries, "10.255.0.1", 443), Some(DENY));
        assert_eq!(kernel(&entries, "10.1.2.3", 80), Some(PASS));
        assert_eq!(kernel(&entries, "11.0.0.0", 80), Some(PASS));
        assert_exact(&s, &entries);
    }

    #[test]
    fn deny_and_allow_combine_as_userspace_decides() {
        let s = snapshot(&[
            policy("allow", "Allow", r#"{sourceIps: ["10.0.0.0/8"]}"#),
            policy(
                "deny",
                "Deny",
                r#"{sourceIps: ["10.1.2.0/24"], notDestinationPorts: [443]}"#,
            ),
        ]);
        let entries = compile(&s);
        assert_eq!(kernel(&entries, "10.1.2.3", 80), Some(DENY));
        assert_eq!(kernel(&entries, "10.1.2.3", 443), Some(PASS));
        assert_eq!(kernel(&entries, "10.2.0.0", 80), Some(PASS));
        assert_eq!(kernel(&entries, "192.168.1.1", 443), Some(DENY));
        assert_exact(&s, &entries);
    }

    #[test]
    fn a_dry_run_policy_in_scope_leaves_the_workload_to_userspace() {
        let mut dry = policy("dry", "Allow", r#"{sourceIps: ["10.1.0.0/16"]}"#);
        dry = dry.replace("dryRun: false", "dryRun: true");
        let s = snapshot(&[
            policy("deny", "Deny", r#"{sourceIps: ["10.2.0.0/16"]}"#),
            dry,
        ]);
        assert!(compile(&s).is_empty());
    }

    #[test]
    fn only_local_hbone_ipv4_addresses_get_entries() {
        let s = snapshot(&[policy("deny", "Deny", r#"{sourceIps: ["10.2.0.0/16"]}"#)]);
        let entries = compile(&s);
        assert!(!entries.is_empty());
        let d = u32::from_ne_bytes(D.octets());
        assert!(
            entries.iter().all(|e| e.tuple.dst_ipv4_be == d),
            "only d's IPv4 address, not remote's, plain's or d's IPv6 one"
        );
    }

    #[test]
    fn ipv6_sources_in_policies_are_not_regions() {
        let s = snapshot(&[policy(
            "deny",
            "Deny",
            r#"{sourceIps: ["fd00::/8", "10.2.0.0/16"]}"#,
        )]);
        let entries = compile(&s);
        let mut regions: Vec<u32> = entries.iter().map(|e| e.prefix_len).collect();
        regions.sort();
        regions.dedup();
        assert_eq!(regions, [POLICY_FIXED_BITS, POLICY_FIXED_BITS + 16]);
        assert_exact(&s, &entries);
    }

    #[test]
    fn a_selected_policy_applies_only_to_the_workload_selecting_it() {
        let sel =
            "- {name: sel, namespace: a, scope: WorkloadSelector, action: Deny, dryRun: false, \
                   rules: [[[{sourceIps: [\"10.2.0.0/16\"]}]]]}\n";
        let s = snapshot(&[sel.to_string()]);
        let entries = compile(&s);
        assert_eq!(kernel(&entries, "10.2.0.0", 80), Some(DENY));
        assert_exact(&s, &entries);
    }

    #[test]
    fn an_entry_is_keyed_in_network_byte_order_with_the_fixed_bits() {
        let s = snapshot(&[policy(
            "deny",
            "Deny",
            r#"{sourceIps: ["10.1.0.0/16"], destinationPorts: [8080]}"#,
        )]);
        let entries = compile(&s);
        let entry = entries
            .iter()
            .find(|e| e.prefix_len == POLICY_FIXED_BITS + 16)
            .expect("an entry for 10.1.0.0/16");
        // The key's bytes in memory are the address's bytes on the wire.
        assert_eq!(entry.tuple.dst_ipv4_be.to_ne_bytes(), [10, 9, 0, 1]);
        assert_eq!(entry.tuple.src_ipv4_be.to_ne_bytes(), [10, 1, 0, 0]);
        assert_eq!(entry.tuple.dst_port_be.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(entry.verdict.verdict, DENY);
    }

    #[test]
    fn source_cidrs_with_host_bits_are_truncated() {
        let s = snapshot(&[policy("deny", "Deny", r#"{sourceIps: ["10.1.2.3/16"]}"#)]);
        let entries = compile(&s);
        assert!(entries
            .iter()
            .any(|e| e.tuple.src_ipv4_be.to_ne_bytes() == [10, 1, 0, 0]));
        assert_exact(&s, &entries);
    }

    #[test]
    fn identity_is_not_part_of_the_kernel_decision() {
        // An mTLS connection allowed by principal is not something the
        // kernel sees: the compiled table denies plaintext only.
        let s = snapshot(&[policy(
            "mtls-only",
            "Allow",
            r#"{principals: [!Exact cluster.local/ns/b/sa/c]}"#,
        )]);
        let workload = s.workload_by_ip(IpAddr::V4(D)).unwrap();
        let mtls = Connection {
            src: "10.1.2.3:40000".parse().unwrap(),
            dst: "10.9.0.1:80".parse().unwrap(),
            src_identity: Some(Identity::new("cluster.local", "b", "c")),
        };
        assert!(evaluate(&s.policy_store, workload, &mtls).is_ok());
        assert_eq!(kernel(&compile(&s), "10.1.2.3", 80), Some(DENY));
    }

    /// `rep` is an address an LPM lookup would send to `net`'s entry.
    fn assert_lands_in(rep: Option<Ipv4Addr>, region: &str, all: &BTreeSet<Ipv4Net>) {
        let region = net(region);
        let rep = rep.unwrap_or_else(|| panic!("{region} has a free address"));
        assert!(region.contains(&rep), "{rep} is outside {region}");
        for inner in all.iter().filter(|c| c.prefix_len() > region.prefix_len()) {
            assert!(!inner.contains(&rep), "{rep} of {region} is in {inner}");
        }
    }

    #[test]
    fn the_representative_is_in_the_region_and_outside_inner_cidrs() {
        let all: BTreeSet<Ipv4Net> = ["0.0.0.0/0", "10.0.0.0/8", "10.0.0.0/9"]
            .map(net)
            .into_iter()
            .collect();
        for region in ["0.0.0.0/0", "10.0.0.0/8", "10.0.0.0/9"] {
            assert_lands_in(representative(&net(region), &all), region, &all);
        }
        // 10.0.0.0/9 covers the start of 10/8: its free half is the rest.
        let rep = representative(&net("10.0.0.0/8"), &all).unwrap();
        assert!(net("10.128.0.0/9").contains(&rep), "{rep}");
    }

    #[test]
    fn a_region_covered_by_inner_cidrs_has_no_representative() {
        let all: BTreeSet<Ipv4Net> = ["10.0.0.0/8", "10.0.0.0/9", "10.128.0.0/9"]
            .map(net)
            .into_iter()
            .collect();
        assert_eq!(representative(&net("10.0.0.0/8"), &all), None);
        let full: BTreeSet<Ipv4Net> = ["0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1"]
            .map(net)
            .into_iter()
            .collect();
        assert_eq!(representative(&net("0.0.0.0/0"), &full), None);
    }

    #[test]
    fn a_region_free_only_in_the_middle_finds_the_gap() {
        let all: BTreeSet<Ipv4Net> = [
            "10.0.0.0/24",
            "10.0.0.0/26",
            "10.0.0.192/26",
            "10.0.0.64/27",
            "10.0.0.160/27",
        ]
        .map(net)
        .into_iter()
        .collect();
        // Covered: .0-.63 and .192-.255 (both ends), .64-.95, .160-.191;
        // free: .96-.159.
        let rep = representative(&net("10.0.0.0/24"), &all);
        assert_lands_in(rep, "10.0.0.0/24", &all);
        let rep = u32::from(rep.unwrap());
        assert!((u32::from(ip("10.0.0.96"))..=u32::from(ip("10.0.0.159"))).contains(&rep));
    }

    fn entry(dst: &str, port: u16, src: &str, deny: bool) -> PolicyEntry {
        let mut out = Vec::new();
        push(&mut out, ip(dst), port, &[(net(src), deny)]);
        out.pop().unwrap()
    }

    #[test]
    fn lookup_takes_the_longest_prefix() {
        let entries = [
            entry("10.9.0.1", 80, "0.0.0.0/0", true),
            entry("10.9.0.1", 80, "10.0.0.0/8", false),
            entry("10.9.0.1", 80, "10.1.0.0/16", true),
        ];
        assert_eq!(kernel(&entries, "11.0.0.1", 80), Some(DENY));
        assert_eq!(kernel(&entries, "10.2.0.1", 80), Some(PASS));
        assert_eq!(kernel(&entries, "10.1.0.1", 80), Some(DENY));
    }

    #[test]
    fn lookup_tries_the_exact_port_then_port_zero() {
        let entries = [
            entry("10.9.0.1", 0, "0.0.0.0/0", true),
            entry("10.9.0.1", 443, "0.0.0.0/0", false),
        ];
        assert_eq!(kernel(&entries, "1.2.3.4", 443), Some(PASS));
        assert_eq!(kernel(&entries, "1.2.3.4", 80), Some(DENY));
        // A port entry that does not cover the source falls back to port 0.
        let entries = [
            entry("10.9.0.1", 0, "0.0.0.0/0", true),
            entry("10.9.0.1", 443, "10.0.0.0/8", false),
        ];
        assert_eq!(kernel(&entries, "1.2.3.4", 443), Some(DENY));
    }

    #[test]
    fn lookup_of_another_destination_finds_nothing() {
        let entries = [entry("10.9.0.1", 0, "0.0.0.0/0", true)];
        assert_eq!(lookup(&entries, ip("1.2.3.4"), ip("10.9.0.2"), 80), None);
        assert_eq!(lookup(&[], ip("1.2.3.4"), D, 80), None);
    }
}
