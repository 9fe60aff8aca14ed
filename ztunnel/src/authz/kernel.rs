//! Compiling authorization into the kernel's policy tables.
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
//! A connection between two local enrolled pods has an identity the kernel
//! knows too: the source pod's, bound to the veth its SYN comes in on. For
//! each such source the tables get a /32 entry per port group, evaluated by
//! the same evaluator with that identity: [`verdict::DIRECT`] when the
//! connection is allowed and nothing else needs userspace (no waypoint, not
//! one of ztunnel's ports), so it passes with no proxy in the path.
//! Otherwise the entry says what the source's region says, and the kernel
//! hands the SYN to userspace, which decides it as before.
//!
//! Workloads with a dry-run policy in scope are left out: userspace must see
//! their connections to log what the dry-run policy would have done.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use ipnet::Ipv4Net;
use tracing::warn;
use ztunnel_common::{
    ports::{INBOUND_HBONE, INBOUND_PLAINTEXT, OUTBOUND_CAPTURE},
    verdict, PolicyTuple, PolicyVerdict, MAX_POLICY_ENTRIES, POLICY_FIXED_BITS,
};

use super::{evaluate, has_dry_run, rbac, Connection};
use crate::{
    config::local::{Authorization, RbacAction},
    identity::Identity,
    proxy::is_capture_port,
    redirect::PolicyEntry,
    state::{Snapshot, Workload},
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

    /// The table's verdict for a plaintext connection from `src`.
    fn verdict(&self, src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> u32 {
        let conn = Connection {
            src: SocketAddr::new(IpAddr::V4(src), 0),
            dst: SocketAddr::new(IpAddr::V4(dst), port),
            src_identity: None,
        };
        if self.denies(&conn) {
            verdict::DENY
        } else {
            verdict::PASS
        }
    }
}

/// A local enrolled pod's address, as a source of same-node connections.
struct LocalSource<'a> {
    ip: Ipv4Addr,
    workload: &'a Workload,
    identity: Identity,
}

/// The kernel policy entries for `snapshot`'s local enrolled workloads.
/// Same-node direct entries grow with the square of the local pods; if
/// they would not fit the tables, they are left out (those connections
/// take the userspace path) and the identity-free entries kept.
pub fn compile(snapshot: &Snapshot) -> Vec<PolicyEntry> {
    // Every local pair needs at least one entry: too many pods are known
    // before anything is evaluated (4,096 pods would be 16 million pairs).
    let pods = snapshot
        .local_workloads()
        .filter(|w| snapshot.captures(w))
        .map(|w| ipv4s(w).count())
        .sum::<usize>();
    let pairs = pods.saturating_mul(pods.saturating_sub(1));
    if pairs <= MAX_POLICY_ENTRIES as usize {
        let entries = compile_with(snapshot, true);
        if entries.len() <= MAX_POLICY_ENTRIES as usize {
            return entries;
        }
    }
    warn!(
        local_pods = pods,
        capacity = MAX_POLICY_ENTRIES,
        "same-node connections do not fit the kernel policy tables; they take the userspace path"
    );
    compile_with(snapshot, false)
}

/// [`compile`], with or without the same-node direct entries.
pub fn compile_with(snapshot: &Snapshot, direct: bool) -> Vec<PolicyEntry> {
    let store = &snapshot.policy_store;
    let mut entries = Vec::new();
    let sources: Vec<LocalSource> = if direct {
        snapshot
            .local_workloads()
            .filter(|w| snapshot.captures(w))
            .flat_map(|w| {
                let identity = snapshot.identity_of(w);
                ipv4s(w).map(move |ip| LocalSource {
                    ip,
                    workload: w,
                    identity: identity.clone(),
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    for workload in snapshot.local_workloads().filter(|w| w.hbone) {
        if has_dry_run(store, workload) {
            continue;
        }
        let policies: Vec<_> = store.in_scope(workload).collect();
        let sources: Vec<&LocalSource> = if snapshot.captures(workload) {
            sources
                .iter()
                .filter(|s| !std::ptr::eq(s.workload, &**workload))
                .collect()
        } else {
            Vec::new()
        };
        if policies.is_empty() && sources.is_empty() {
            continue;
        }
        if !sources.is_empty() && entries.len() > MAX_POLICY_ENTRIES as usize {
            // Too many already: `compile` falls back without these.
            break;
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
        // Everything the policies can tell sources and ports apart by:
        // for same-node sources, the ports of every policy in scope.
        let mut cidrs: BTreeSet<Ipv4Net> = BTreeSet::new();
        let mut ports: BTreeSet<u16> = BTreeSet::new();
        let port_policies: Vec<&Authorization> = if sources.is_empty() {
            view.deny.iter().chain(&view.allow).copied().collect()
        } else {
            policies.iter().map(|p| &***p).collect()
        };
        for policy in view.deny.iter().chain(&view.allow) {
            for m in policy.rules.iter().flatten().flatten() {
                for net in m.source_ips.iter().chain(&m.not_source_ips) {
                    if let ipnet::IpNet::V4(net) = net {
                        cidrs.insert(net.trunc());
                    }
                }
            }
        }
        for policy in port_policies {
            for m in policy.rules.iter().flatten().flatten() {
                ports.extend(m.destination_ports.iter().chain(&m.not_destination_ports));
            }
        }
        if !sources.is_empty() {
            // Never direct: entries of their own, so the table alone says so.
            ports.extend([OUTBOUND_CAPTURE, INBOUND_PLAINTEXT, INBOUND_HBONE]);
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
        for ip in ipv4s(workload) {
            let judge = |port: u16| -> BTreeMap<Ipv4Net, u32> {
                let mut judged: BTreeMap<Ipv4Net, u32> = regions
                    .iter()
                    .map(|(net, rep)| (*net, view.verdict(*rep, ip, port)))
                    .collect();
                for source in &sources {
                    let v = if direct_allowed(snapshot, source, workload, ip, port) {
                        verdict::DIRECT
                    } else {
                        view.verdict(source.ip, ip, port)
                    };
                    judged.insert(Ipv4Net::from(source.ip), v);
                }
                judged
            };
            let other = judge(other_port);
            let other_set = other.values().any(|v| *v != verdict::PASS);
            if other_set {
                push(&mut entries, ip, 0, &other);
            }
            for port in &ports {
                let judged = judge(*port);
                // A named port needs entries of its own whenever it could
                // differ from what the port-0 entries would say.
                if other_set || judged.values().any(|v| *v != verdict::PASS) {
                    push(&mut entries, ip, *port, &judged);
                }
            }
        }
    }
    entries
}

/// Whether a connection from the local pod `source` to `dst_ip:port` of
/// the local workload `dst` may pass in the kernel: what the userspace
/// same-node path would allow, with nothing it must do on the way (a
/// waypoint to go through).
fn direct_allowed(
    snapshot: &Snapshot,
    source: &LocalSource,
    dst: &Workload,
    dst_ip: Ipv4Addr,
    port: u16,
) -> bool {
    let target = SocketAddr::new(IpAddr::V4(dst_ip), port);
    if is_capture_port(port)
        || snapshot
            .waypoint_for(Some(source.workload), target)
            .is_some()
    {
        return false;
    }
    if snapshot.identity_of(dst).trust_domain != source.identity.trust_domain {
        return false;
    }
    let conn = Connection {
        src: SocketAddr::new(IpAddr::V4(source.ip), 0),
        dst: target,
        src_identity: Some(source.identity.clone()),
    };
    evaluate(&snapshot.policy_store, dst, &conn).is_ok()
}

fn ipv4s(w: &Workload) -> impl Iterator<Item = Ipv4Addr> + '_ {
    w.ips.iter().filter_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}

fn push(entries: &mut Vec<PolicyEntry>, dst: Ipv4Addr, port: u16, judged: &BTreeMap<Ipv4Net, u32>) {
    for (net, verdict) in judged {
        entries.push(PolicyEntry {
            tuple: PolicyTuple {
                dst_ipv4_be: u32::from_ne_bytes(dst.octets()),
                dst_port_be: port.to_be(),
                _pad: 0,
                src_ipv4_be: u32::from_ne_bytes(net.network().octets()),
            },
            prefix_len: POLICY_FIXED_BITS + u32::from(net.prefix_len()),
            verdict: PolicyVerdict { verdict: *verdict },
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
        let v = if deny { DENY } else { PASS };
        push(&mut out, ip(dst), port, &BTreeMap::from([(net(src), v)]));
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

#[cfg(test)]
mod direct_tests {
    //! The same-node entries: DIRECT exactly where the userspace same-node
    //! path would allow the connection and nothing needs userspace.

    use std::path::Path;

    use ztunnel_common::verdict::{DENY, DIRECT, PASS};

    use super::*;
    use crate::config::local::LocalConfig;

    /// Three local pods (`s1` in namespace a, `s2` in b, the destination
    /// `d` in a), a remote one, and `w`, a local pod with a waypoint.
    const WORKLOADS: &str = r#"
workloads:
- {uid: d, name: d, namespace: a, serviceAccount: d, workloadIps: ["10.9.0.1"], protocol: HBONE, node: n, services: {}}
- {uid: s1, name: s1, namespace: a, serviceAccount: s1, workloadIps: ["10.9.0.11"], protocol: HBONE, node: n, services: {}}
- {uid: s2, name: s2, namespace: b, serviceAccount: s2, workloadIps: ["10.9.0.12"], protocol: HBONE, node: n, services: {}}
- {uid: r, name: remote, namespace: a, workloadIps: ["10.9.1.1"], protocol: HBONE, node: other, services: {}}
- {uid: wp, name: wp, namespace: a, serviceAccount: wp, workloadIps: ["10.9.0.50"], protocol: HBONE, node: n, services: {}}
- {uid: w, name: w, namespace: a, serviceAccount: w, workloadIps: ["10.9.0.2"], protocol: HBONE, node: n, services: {}, waypoint: {destination: "/10.9.0.50", hboneMtlsPort: 15008}}
"#;

    fn snapshot(policies: &str) -> Snapshot {
        let yaml = if policies.is_empty() {
            WORKLOADS.to_string()
        } else {
            format!("{WORKLOADS}policies:\n{policies}")
        };
        let config = LocalConfig::parse(&yaml, Path::new("direct-test.yaml"))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        Snapshot::new("n", "cluster.local", &config)
    }

    fn verdict_of(entries: &[PolicyEntry], src: &str, dst: &str, port: u16) -> u32 {
        lookup(entries, src.parse().unwrap(), dst.parse().unwrap(), port).unwrap_or(PASS)
    }

    #[test]
    fn without_policies_every_local_pair_passes_directly() {
        let s = snapshot("");
        let e = compile(&s);
        assert_eq!(verdict_of(&e, "10.9.0.11", "10.9.0.1", 80), DIRECT);
        assert_eq!(verdict_of(&e, "10.9.0.12", "10.9.0.1", 5201), DIRECT);
        assert_eq!(verdict_of(&e, "10.9.0.1", "10.9.0.11", 80), DIRECT);
        // Plaintext from anywhere else: nothing to deny.
        assert_eq!(verdict_of(&e, "10.9.1.1", "10.9.0.1", 80), PASS);
        assert_eq!(verdict_of(&e, "192.0.2.1", "10.9.0.1", 80), PASS);
    }

    #[test]
    fn a_destination_with_a_waypoint_stays_in_userspace() {
        let s = snapshot("");
        let e = compile(&s);
        assert_eq!(verdict_of(&e, "10.9.0.11", "10.9.0.2", 80), PASS);
        // The waypoint itself is not captured: never a direct destination.
        assert_eq!(verdict_of(&e, "10.9.0.11", "10.9.0.50", 80), PASS);
    }

    #[test]
    fn ztunnels_own_ports_are_never_direct() {
        let s = snapshot(
            "- {name: p, namespace: a, scope: Namespace, action: Allow, dryRun: false, rules: [[[{destinationPorts: [15008, 80]}]]]}\n",
        );
        let e = compile(&s);
        assert_eq!(verdict_of(&e, "10.9.0.11", "10.9.0.1", 80), DIRECT);
        assert_ne!(verdict_of(&e, "10.9.0.11", "10.9.0.1", 15008), DIRECT);
    }

    #[test]
    fn a_deny_by_principal_and_port_keeps_only_that_pair_and_port_in_userspace() {
        let s = snapshot(
            "- {name: p, namespace: a, scope: Namespace, action: Deny, dryRun: false, rules: [[[{principals: [!Exact cluster.local/ns/b/sa/s2], destinationPorts: [80]}]]]}\n",
        );
        let e = compile(&s);
        assert_eq!(verdict_of(&e, "10.9.0.12", "10.9.0.1", 80), PASS);
        assert_eq!(verdict_of(&e, "10.9.0.12", "10.9.0.1", 81), DIRECT);
        assert_eq!(verdict_of(&e, "10.9.0.11", "10.9.0.1", 80), DIRECT);
    }

    #[test]
    fn an_allow_by_namespace_passes_only_that_namespace_and_denies_plaintext() {
        let s = snapshot(
            "- {name: p, namespace: a, scope: Namespace, action: Allow, dryRun: false, rules: [[[{namespaces: [!Exact a]}]]]}\n",
        );
        let e = compile(&s);
        assert_eq!(verdict_of(&e, "10.9.0.11", "10.9.0.1", 80), DIRECT);
        // s2 (namespace b) goes to userspace, which denies it; its /32
        // says what plaintext from its address would get.
        assert_eq!(verdict_of(&e, "10.9.0.12", "10.9.0.1", 80), DENY);
        assert_eq!(verdict_of(&e, "192.0.2.1", "10.9.0.1", 80), DENY);
    }

    #[test]
    fn a_dry_run_policy_leaves_the_destination_to_userspace() {
        let s = snapshot(
            "- {name: p, namespace: a, scope: Namespace, action: Deny, dryRun: true, rules: [[[{namespaces: [!Exact b]}]]]}\n",
        );
        let e = compile(&s);
        assert_eq!(verdict_of(&e, "10.9.0.11", "10.9.0.1", 80), PASS);
        // Namespace b has no dry-run policy: its pods stay direct targets.
        assert_eq!(verdict_of(&e, "10.9.0.11", "10.9.0.12", 80), DIRECT);
    }

    #[test]
    fn without_direct_entries_only_plaintext_is_compiled() {
        let s = snapshot("");
        assert!(compile_with(&s, false).is_empty());
        assert!(!compile_with(&s, true).is_empty());
    }
}
