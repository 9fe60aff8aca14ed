//! The kernel may only ever decide what userspace would decide. Generated
//! policies and connections: the entries compiled for the kernel, looked up
//! in the kernel's own LPM tries (loaded from ztunnel's eBPF object), must
//! deny a plaintext connection exactly when the userspace evaluator does,
//! and pass a same-node connection from a local pod directly exactly when
//! the evaluator allows it with that pod's identity.
//!
//! Needs root (it loads maps under a temporary bpffs pin directory).

use std::{
    fmt::Write,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use ztunnel::{
    authz::{evaluate, kernel, Connection},
    config::local::LocalConfig,
    redirect::Capture,
    state::Snapshot,
};
use ztunnel_common::verdict;

/// CIDRs that nest and overlap in every way an LPM trie must handle.
const CIDRS: [&str; 12] = [
    "0.0.0.0/0",
    "0.0.0.0/1",
    "10.1.0.0/17",
    "10.1.2.0/25",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.128/25",
    "10.1.2.3/32",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "10.1.3.0/24",
];
const PORTS: [u16; 4] = [80, 443, 8080, 9000];
/// Sources on both sides of every CIDR edge, and some that are in none.
const SOURCES: [&str; 18] = [
    "10.1.0.0",
    "10.1.128.1",
    "10.1.2.0",
    "127.255.255.255",
    "10.1.2.3",
    "10.1.2.4",
    "10.1.2.200",
    "10.1.2.127",
    "10.1.3.9",
    "10.1.255.1",
    "10.2.0.1",
    "10.0.0.0",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.7.7",
    "8.8.4.4",
    "0.0.0.1",
    "255.255.255.255",
];
/// Local pods (name, namespace, address), sources of same-node
/// connections; their service account is `x`, which some generated
/// policies name.
const LOCAL_SOURCES: [(&str, &str, &str); 2] = [("s1", "a", "10.1.2.3"), ("s2", "b", "10.1.3.9")];
/// The destination workload's two addresses.
const DST: [&str; 2] = ["10.9.0.1", "10.9.0.2"];

fn arb_match() -> impl Strategy<Value = String> {
    let cidrs = || proptest::sample::subsequence(CIDRS.to_vec(), 0..3);
    let ports = || proptest::sample::subsequence(PORTS.to_vec(), 0..3);
    let dsts =
        || proptest::sample::subsequence(vec!["10.9.0.1/32", "10.9.0.0/24", "10.9.0.2/32"], 0..2);
    (
        cidrs(),
        cidrs(),
        ports(),
        ports(),
        dsts(),
        dsts(),
        prop_oneof![
            Just(""),
            Just("principals: [!Prefix cluster.local/]"),
            Just("notPrincipals: [!Exact cluster.local/ns/a/sa/x]"),
            Just("namespaces: [!Presence []]"),
            Just("notNamespaces: [!Exact a]")
        ],
    )
        .prop_map(|(src, not_src, port, not_port, dst, not_dst, identity)| {
            let list = |name: &str, items: Vec<String>| {
                if items.is_empty() {
                    String::new()
                } else {
                    format!("{name}: [{}], ", items.join(", "))
                }
            };
            let quote = |v: Vec<&str>| {
                v.into_iter()
                    .map(|c| format!("\"{c}\""))
                    .collect::<Vec<_>>()
            };
            let nums = |v: Vec<u16>| v.into_iter().map(|p| p.to_string()).collect::<Vec<_>>();
            let mut m = String::from("{");
            m += &list("sourceIps", quote(src));
            m += &list("notSourceIps", quote(not_src));
            m += &list("destinationPorts", nums(port));
            m += &list("notDestinationPorts", nums(not_port));
            m += &list("destinationIps", quote(dst));
            m += &list("notDestinationIps", quote(not_dst));
            if !identity.is_empty() {
                m += identity;
            }
            m + "}"
        })
}

fn arb_policy(i: usize) -> impl Strategy<Value = String> {
    let clause =
        proptest::collection::vec(arb_match(), 1..3).prop_map(|ms| format!("[{}]", ms.join(", ")));
    let rule =
        proptest::collection::vec(clause, 0..3).prop_map(|cs| format!("[{}]", cs.join(", ")));
    let rules = proptest::collection::vec(rule, 0..3).prop_map(|rs| format!("[{}]", rs.join(", ")));
    (
        rules,
        prop_oneof![Just("Allow"), Just("Deny")],
        prop_oneof![Just(("Namespace", "a")), Just(("Global", "istio-system")), Just(("WorkloadSelector", "a")), Just(("Namespace", "b"))],
        proptest::bool::weighted(0.1),
    )
        .prop_map(move |(rules, action, (scope, ns), dry_run)| {
            format!("- name: p{i}\n  namespace: {ns}\n  scope: {scope}\n  action: {action}\n  dryRun: {dry_run}\n  rules: {rules}\n")
        })
}

fn arb_config() -> impl Strategy<Value = String> {
    (1usize..5)
        .prop_flat_map(|n| (0..n).map(arb_policy).collect::<Vec<_>>())
        .prop_map(|policies| {
            let mut yaml = String::from(
                "workloads:\n- uid: d\n  name: d\n  namespace: a\n  serviceAccount: d\n  workloadIps: [\"10.9.0.1\", \"10.9.0.2\"]\n  protocol: HBONE\n  node: n\n  authorizationPolicies: [\"a/p0\", \"a/p2\"]\n  services: {}\n",
            );
            // Local pods at addresses the CIDRs cut finely.
            for (name, ns, ip) in LOCAL_SOURCES {
                let _ = write!(
                    yaml,
                    "- uid: {name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: x\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: n\n  services: {{}}\n"
                );
            }
            yaml.push_str("policies:\n");
            for p in policies {
                let _ = write!(yaml, "{p}");
            }
            yaml
        })
}

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn kernel_decisions_agree_with_userspace() {
    let pins = Pins(
        Path::new("/sys/fs/bpf/ztunnel").join(format!("authz-proptest-{}", std::process::id())),
    );
    let capture = std::cell::RefCell::new(
        Capture::open(&pins.0).expect("loading ztunnel's maps (this test needs root)"),
    );
    let mut runner = TestRunner::new(Config {
        cases: 200,
        ..Config::default()
    });
    let kernel_denials = std::cell::Cell::new(0usize);
    let direct_passes = std::cell::Cell::new(0usize);
    let direct_refusals = std::cell::Cell::new(0usize);
    runner
        .run(&arb_config(), |yaml| {
            let config = LocalConfig::parse(&yaml, Path::new("generated.yaml"))
                .map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
            let snapshot = Snapshot::new("n", "cluster.local", &config);
            let entries = kernel::compile(&snapshot);
            let mut capture = capture.borrow_mut();
            capture
                .set_policy(&entries)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let workload = snapshot
                .workload_by_ip("10.9.0.1".parse().unwrap())
                .unwrap()
                .clone();
            let dry = ztunnel::authz::has_dry_run(&snapshot.policy_store, &workload);
            for dst in DST {
                let dst: Ipv4Addr = dst.parse().unwrap();
                for src in SOURCES {
                    let src: Ipv4Addr = src.parse().unwrap();
                    for port in PORTS.iter().copied().chain([1234, 15006]) {
                        let conn = Connection {
                            src: SocketAddr::from((src, 40000)),
                            dst: SocketAddr::from((dst, port)),
                            src_identity: None,
                        };
                        let user_denies =
                            evaluate(&snapshot.policy_store, &workload, &conn).is_err();
                        let in_kernel = capture
                            .policy_verdict(src, dst, port)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let kernel_denies = in_kernel.is_some_and(|v| v.verdict == verdict::DENY);
                        // The kernel's own lookup and our model of it agree.
                        prop_assert_eq!(
                            kernel::lookup(&entries, src, dst, port)
                                .is_some_and(|v| v == verdict::DENY),
                            kernel_denies
                        );
                        // Sound: the kernel never drops what userspace allows.
                        prop_assert!(
                            !kernel_denies || user_denies,
                            "kernel denies {src}->{dst}:{port} that userspace allows\n{yaml}"
                        );
                        // Exact: without dry-run logging to preserve, it drops all
                        // of it. (A local pod's address never sends plaintext:
                        // its SYNs come in on its veth and are judged below.)
                        let local = LOCAL_SOURCES
                            .iter()
                            .any(|(_, _, ip)| *ip == src.to_string());
                        if !dry && !local {
                            prop_assert_eq!(
                                kernel_denies,
                                user_denies,
                                "{}->{}:{}\n{}",
                                src,
                                dst,
                                port,
                                yaml
                            );
                        }
                        kernel_denials.set(kernel_denials.get() + usize::from(kernel_denies));
                    }
                }
                for (name, _, src) in LOCAL_SOURCES {
                    let src: Ipv4Addr = src.parse().unwrap();
                    let source = snapshot.workload_by_ip(src.into()).unwrap();
                    for port in PORTS.iter().copied().chain([1234, 15006, 15008]) {
                        let conn = Connection {
                            src: SocketAddr::from((src, 40000)),
                            dst: SocketAddr::from((dst, port)),
                            src_identity: Some(snapshot.identity_of(source)),
                        };
                        let user_allows =
                            evaluate(&snapshot.policy_store, &workload, &conn).is_ok();
                        let in_kernel = capture
                            .policy_verdict(src, dst, port)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let direct = in_kernel.is_some_and(|v| v.verdict == verdict::DIRECT);
                        let expected =
                            user_allows && !dry && !ztunnel::proxy::is_capture_port(port);
                        prop_assert_eq!(
                            direct,
                            expected,
                            "{} ({})->{}:{} allowed by userspace: {}\n{}",
                            name,
                            src,
                            dst,
                            port,
                            user_allows,
                            yaml
                        );
                        let counter = if direct {
                            &direct_passes
                        } else {
                            &direct_refusals
                        };
                        counter.set(counter.get() + 1);
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    let kernel_denials = kernel_denials.get();
    assert!(
        kernel_denials > 100,
        "the generator rarely produced denials ({kernel_denials}); the test proves little"
    );
    let (passes, refusals) = (direct_passes.get(), direct_refusals.get());
    assert!(
        passes > 100 && refusals > 100,
        "same-node cases were one-sided ({passes} direct, {refusals} not); the test proves little"
    );
}
