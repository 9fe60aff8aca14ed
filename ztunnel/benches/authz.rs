//! Authorization cost: one evaluation against 10,000 policies, and
//! rebuilding the kernel policy tables for them.
//!
//! `cargo bench -p ztunnel --bench authz`. Writing the kernel maps needs
//! root (it loads ztunnel's eBPF maps under a temporary pin directory); as
//! another user that part is skipped.

use std::{fmt::Write, net::SocketAddr, path::Path};

use criterion::{criterion_group, criterion_main, Criterion};
use ztunnel::{
    authz::{evaluate, kernel, Connection},
    config::local::LocalConfig,
    identity::Identity,
    redirect::Capture,
    state::Snapshot,
};

const POLICIES: usize = 10_000;
const NAMESPACES: usize = 100;

/// 10,000 policies: 100 namespaces of 100, each allowing one principal from
/// one /24 to one port, plus a global deny; 20 local enrolled workloads
/// spread over the namespaces. `hot` puts all 10,000 in one namespace;
/// `identity_free` drops the principal clause, so every policy shapes the
/// kernel tables.
fn config(hot: bool, identity_free: bool) -> LocalConfig {
    let mut yaml = String::from("workloads:\n");
    for w in 0..20 {
        let ns = if hot { 0 } else { w * (NAMESPACES / 20) };
        let _ = write!(
            yaml,
            "- uid: w{w}\n  name: w{w}\n  namespace: ns{ns}\n  serviceAccount: sa{w}\n  workloadIps: [\"10.200.0.{ip}\"]\n  protocol: HBONE\n  node: bench\n  services: {{}}\n",
            ip = w + 1
        );
    }
    yaml.push_str("policies:\n- name: deny-admin\n  namespace: istio-system\n  scope: Global\n  action: Deny\n  dryRun: false\n  rules: [[[{destinationPorts: [9999]}]]]\n");
    for p in 0..POLICIES - 1 {
        let ns = if hot { 0 } else { p % NAMESPACES };
        let _ = write!(
            yaml,
            "- name: p{p}\n  namespace: ns{ns}\n  scope: Namespace\n  action: Allow\n  dryRun: false\n  rules: [[{principal}[{{sourceIps: [\"10.{a}.{b}.0/24\"]}}], [{{destinationPorts: [{port}]}}]]]\n",
            principal = if identity_free { String::new() } else { format!("[{{principals: [!Exact cluster.local/ns/client{p}/sa/app]}}], ") },
            a = p / 256,
            b = p % 256,
            port = 8000 + p % 10
        );
    }
    LocalConfig::parse(&yaml, Path::new("bench.yaml")).expect("bench config parses")
}

fn bench(c: &mut Criterion) {
    for (label, hot, identity_free) in [
        ("spread", false, false),
        ("one-namespace", true, false),
        ("spread-identity-free", false, true),
    ] {
        let config = config(hot, identity_free);
        let snapshot = Snapshot::new("bench", "cluster.local", &config);
        let workload = snapshot
            .workload_by_ip("10.200.0.1".parse().unwrap())
            .unwrap()
            .clone();
        let last = POLICIES - 2 - (POLICIES - 2) % if hot { 1 } else { NAMESPACES };
        let matching = Connection {
            src: format!("10.{}.{}.7:40000", last / 256, last % 256)
                .parse::<SocketAddr>()
                .unwrap(),
            dst: format!("10.200.0.1:{}", 8000 + last % 10).parse().unwrap(),
            src_identity: Some(Identity::new(
                "cluster.local",
                &format!("client{last}"),
                "app",
            )),
        };
        let nothing = Connection {
            src: "192.0.2.1:40000".parse().unwrap(),
            dst: "10.200.0.1:8001".parse().unwrap(),
            src_identity: Some(Identity::new("cluster.local", "nobody", "app")),
        };
        c.bench_function(&format!("evaluate/{label}/allowed-by-last-policy"), |b| {
            b.iter(|| evaluate(&snapshot.policy_store, &workload, &matching))
        });
        c.bench_function(&format!("evaluate/{label}/not-allowed"), |b| {
            b.iter(|| evaluate(&snapshot.policy_store, &workload, &nothing))
        });
        let entries = kernel::compile(&snapshot);
        eprintln!(
            "{label}: {} policies compile to {} kernel entries",
            config.policies.len(),
            entries.len()
        );
        let mut group = c.benchmark_group("kernel");
        group.sample_size(10);
        group.bench_function(format!("compile/{label}"), |b| {
            b.iter(|| kernel::compile(&snapshot))
        });
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0
            && entries.len() <= ztunnel_common::MAX_POLICY_ENTRIES as usize
        {
            let pin_dir =
                Path::new("/sys/fs/bpf/ztunnel").join(format!("bench-{}", std::process::id()));
            match Capture::open(&pin_dir) {
                Ok(mut capture) => {
                    group.bench_function(format!("write-tables/{label}"), |b| {
                        b.iter(|| capture.set_policy(&entries).unwrap())
                    });
                }
                // As root this part must run: loading the maps failing is a bug.
                Err(e) => panic!("loading ztunnel's maps for the table writes: {e}"),
            }
            let _ = std::fs::remove_dir_all(&pin_dir);
        } else {
            let why = format!(
                "kernel map writes for {label} need root and at most {} entries",
                ztunnel_common::MAX_POLICY_ENTRIES
            );
            // CI runs as root: there, a skip would hide a broken measurement.
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipping: {why}");
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
