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
