//! `cargo xtask ...`: the developer entry points.

mod background;
mod bench;
mod demo;
mod deploy;
mod fuzz;
mod soak;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ztunnel_tests::{controlplane, lab};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent; seconds when done).
    Bootstrap,
    /// Build the eBPF object with nightly (the ztunnel build embeds it).
    BuildEbpf,
    /// Build ztunnel (release) and run it with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Bring the lab (nodes and pods as network namespaces) up or down.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Bootstrap, build, bring up a lab, run both ztunnels, show traffic
    /// being captured, tear everything down.
    Demo,
    /// Measure what the mesh costs (iperf3, latency, connection rate,
    /// memory, CPU) against no mesh, side by side; under ten minutes.
    Bench {
        /// A quick run that proves the suite works (CI); numbers mean nothing.
        #[arg(long)]
        smoke: bool,
    },
    /// Latency and connection rate between two pods of a running lab
    /// (`cargo xtask lab up`, then e.g. `probe client server 198.18.2.10:7000`).
    Probe {
        /// The pod to measure from (its namespace is `<prefix>-<pod>`).
        from: String,
        /// The pod to run the echo server in.
        to: String,
        /// The echo server's address, in `to`.
        dst: std::net::SocketAddr,
        #[arg(long, default_value = "ztlab-dev")]
        prefix: String,
        /// Connect here instead of DST (e.g. a relay in front of it).
        #[arg(long)]
        via: Option<std::net::SocketAddr>,
        /// Seconds of connection-rate measurement (0: latency only).
        #[arg(long, default_value_t = 2.0)]
        rate_seconds: f64,
        /// Keep the CPUs out of idle states while measuring, as `bench` does.
        #[arg(long)]
        cpus_awake: bool,
    },
    /// (Internal) hold every connection accepted on ADDR; run by `bench`
    /// inside a pod's namespace.
    #[command(hide = true)]
    HoldServer { addr: std::net::SocketAddr },
    /// Validate deploy/'s manifests offline against Kubernetes' schema,
    /// and build the statically linked CNI plugin the image ships.
    CheckDeploy,
    /// Build the CNI plugin statically linked, into target/cni/ztunnel-cni
    /// (it runs on the host, whatever its C library).
    BuildCni,
    /// Build fuzz/'s cargo-fuzz targets and run each for a bounded time
    /// (`cargo xtask test` runs them for 30 s each).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The targets to run (default: all).
        targets: Vec<String>,
    },
    /// Mixed traffic through the lab for MINUTES while faults are injected
    /// (kill -9, handover, policy and enrolment changes, control plane
    /// restarts, certificate rotation); fails unless everything held.
    /// Writes target/soak/report.json.
    Soak {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Seconds between faults.
        #[arg(long, default_value_t = 30)]
        interval: u64,
    },
    /// Bootstrap, build, and run every test (needs root).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Create the lab, start a ztunnel per node with examples/lab.yaml, and
    /// leave it all running.
    Up {
        #[arg(long, default_value = "ztlab-dev")]
        prefix: String,
        /// Only the namespaces; no ztunnel.
        #[arg(long)]
        no_ztunnel: bool,
        /// Serve examples/lab.yaml and the certificates from the repo's
        /// control plane (as istiod would) instead of giving each ztunnel
        /// the file and the CA.
        #[arg(long, conflicts_with = "no_ztunnel")]
        control_plane: bool,
    },
    /// Remove labs (by default every lab: names starting with `ztlab`).
    Down {
        #[arg(long, default_value = lab::NAME_PREFIX)]
        prefix: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Bootstrap => bootstrap(),
        Cmd::BuildEbpf => build_ebpf().map(|p| println!("{}", p.display())),
        Cmd::Run { args } => {
            let bin = build_release()?;
            let status = Command::new(bin).args(args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Lab {
            action:
                LabAction::Up {
                    prefix,
                    no_ztunnel,
                    control_plane,
                },
        } => {
            require_root()?;
            let mode = if no_ztunnel {
                None
            } else {
                build_release()?;
                Some(if control_plane {
                    Source::ControlPlane
                } else {
                    Source::LocalFile
                })
            };
            lab_up(&prefix, mode)
        }
        Cmd::Lab {
            action: LabAction::Down { prefix },
        } => {
            require_root()?;
            for stopped in background::stop_all(&prefix)? {
                println!("stopped {stopped}");
            }
            for removed in lab::teardown(&prefix)? {
                println!("removed {removed}");
            }
            Ok(())
        }
        Cmd::Probe {
            from,
            to,
            dst,
            prefix,
            via,
            rate_seconds,
            cpus_awake,
        } => {
            require_root()?;
            let _awake = cpus_awake.then(bench::hold_cpus_awake).flatten();
            let pod = |name: &str| {
                let mut ns = ztunnel_tests::netns::Netns::existing(&format!("{prefix}-{name}"));
                ns.keep();
                ns
            };
            let (ns, server_ns) = (pod(&from), pod(&to));
            let _echo = ztunnel_tests::load::LoadServer::start(
                &server_ns,
                dst,
                ztunnel_tests::load::Mode::Echo,
            )?;
            let dst = via.unwrap_or(dst);
            let l = ztunnel_tests::load::latency(&ns, dst, 64, 4000, None)?;
            println!(
                "latency p50 {:.1} us  p90 {:.1} us  p99 {:.1} us",
                l.p50_us, l.p90_us, l.p99_us
            );
            if rate_seconds > 0.0 {
                let rate = ztunnel_tests::load::connection_rate(
                    &ns,
                    dst,
                    std::time::Duration::from_secs_f64(rate_seconds),
                    4,
                )?;
                println!("connections {rate:.0}/s");
            }
            Ok(())
        }
        Cmd::Demo => {
            require_root()?;
            bootstrap()?;
            build_release()?;
            demo::run(&root().join("examples/lab.yaml"))
        }
        Cmd::Bench { smoke } => {
            require_root()?;
            bootstrap()?;
            let bin = build_release()?;
            let params = if smoke {
                bench::Params::smoke()
            } else {
                bench::Params::full()
            };
            bench::run(
                &bin,
                &root().join("examples/lab.yaml"),
                params,
                &bench::out_dir(&root()),
            )
        }
        Cmd::Soak { minutes, interval } => {
            require_root()?;
            bootstrap()?;
            build_bins(&[])?;
            soak::run(
                minutes,
                std::time::Duration::from_secs(interval),
                &root().join("target/soak"),
            )
        }
        Cmd::CheckDeploy => deploy::check(&root()),
        Cmd::BuildCni => deploy::build_cni(&root()).map(|p| println!("{}", p.display())),
        Cmd::Fuzz { seconds, targets } => fuzz::run(&root(), seconds, &targets),
        Cmd::HoldServer { addr } => ztunnel_tests::load::hold_forever(addr),
        Cmd::Test { args } => {
            require_root()?;
            bootstrap()?;
            // Built in the background meanwhile, on idle CPU only; run below.
            let fuzz_build = fuzz::Build::start(&root(), true)?;
            // The benchmark suite must keep working: a short run proves it
            // (its numbers are not checked). First, so the test totals end
            // the output.
            let bin = build_release()?;
            let smoke_dir = root().join("target/bench-smoke");
            bench::run(
                &bin,
                &root().join("examples/lab.yaml"),
                bench::Params::smoke(),
                &smoke_dir,
            )
            .map_err(|e| anyhow::anyhow!("benchmark smoke run failed: {e:#}"))?;
            bench::check_chart(&smoke_dir)?;
            // The manifests of deploy/, offline; the release binary the
            // image would hold was built just above.
            deploy::check(&root())?;
            // The authorization benchmark, once each (criterion's test mode):
            // as root, so its kernel-table part runs too.
            cargo(&[
                "bench",
                "--package",
                "ztunnel",
                "--bench",
                "authz",
                "--",
                "--test",
            ])?;
            build_bins(&[])?;
            // A short soak: each fault once or twice (`cargo xtask soak`
            // runs 30 minutes).
            soak::run(
                1.5,
                std::time::Duration::from_secs(12),
                &root().join("target/soak-smoke"),
            )
            .map_err(|e| anyhow::anyhow!("soak failed: {e:#}"))?;
            // Every fuzz target, briefly (`cargo xtask fuzz` runs longer).
            fuzz_build.wait()?;
            fuzz::run_built(&root(), fuzz::TEST_SECONDS, &fuzz::TARGETS)?;
            let mut test_args = vec!["test", "--workspace"];
            test_args.extend(args.iter().map(String::as_str));
            cargo_test(&test_args)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root: the lab creates network namespaces and loads eBPF programs");
    }
    Ok(())
}

fn bootstrap() -> Result<()> {
    // `cargo xtask` ran it before building this crate.
    if std::env::var_os("ZTUNNEL_BOOTSTRAPPED").is_some() {
        return Ok(());
    }
    let status = Command::new("bash")
        .arg(root().join("scripts/bootstrap.sh"))
        .status()
        .context("running scripts/bootstrap.sh")?;
    if !status.success() {
        bail!("bootstrap failed ({status})");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with one line totalling
/// every test binary's result (cargo prints one per binary, the last often
/// a binary with no tests).
fn cargo_test(args: &[&str]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match kind {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("\ntotal: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

/// The same build ztunnel/build.rs runs, into the same target directory.
fn build_ebpf() -> Result<PathBuf> {
    Ok(ztunnel_ebpf_build::build(
        &root().join("ztunnel-ebpf"),
        &ztunnel_ebpf_build::target_dir(&root()),
    )?)
}

/// Builds the binaries the tests, the lab and the bench run (ztunnel, the
/// control plane, the CNI plugin, the waypoint, the bench's TCP relay),
/// with `profile` flags. One cargo invocation, so that tokio's features are
/// unified and the relay adds no second build of it.
fn build_bins(profile: &[&str]) -> Result<()> {
    let mut args = vec!["build"];
    args.extend_from_slice(profile);
    for package in [
        "ztunnel",
        "ztunnel-controlplane",
        "ztunnel-cni",
        "ztunnel-waypoint",
        "tcp-relay",
    ] {
        args.extend(["--package", package]);
    }
    args.push("--bins");
    cargo(&args)
}

/// Builds ztunnel and the control plane (release), and points the lab's
/// harness at them. Returns ztunnel's path.
fn build_release() -> Result<PathBuf> {
    build_bins(&["--release"])?;
    let bin = root().join("target/release/ztunnel");
    std::env::set_var("ZTUNNEL_BIN", &bin);
    std::env::set_var(
        "ZTUNNEL_CONTROLPLANE_BIN",
        root().join("target/release/ztunnel-controlplane"),
    );
    std::env::set_var("WAYPOINT_BIN", root().join("target/release/waypoint"));
    Ok(bin)
}

/// Where a lab's ztunnels get the mesh from.
enum Source {
    /// examples/lab.yaml and the lab's CA, on each node.
    LocalFile,
    /// The repo's control plane, serving examples/lab.yaml.
    ControlPlane,
}

fn lab_up(prefix: &str, ztunnels: Option<Source>) -> Result<()> {
    let mut lab = lab::Lab::up_named(prefix)?;
    lab.keep();
    lab.reuse_time_wait()?;
    let config = root().join("examples/lab.yaml");
    if let Some(source) = &ztunnels {
        if let Source::ControlPlane = source {
            let log = background::start_controlplane(&lab, &config)?;
            println!(
                "control plane serving {} on {} (log: {})",
                config.display(),
                controlplane::address(&lab),
                log.display()
            );
        }
        for node in &lab.nodes {
            let cmd = match source {
                Source::LocalFile => ztunnel_tests::ztunnel::command(node, &config, &lab.ca_dir)?,
                Source::ControlPlane => {
                    let mut cmd = ztunnel_tests::ztunnel::base_command(node)?;
                    cmd.envs(controlplane::environment(
                        &lab,
                        controlplane::address(&lab),
                        node.name,
                    ));
                    cmd
                }
            };
            let log = background::start_ztunnel(prefix, node, cmd)?;
            println!("ztunnel running on {} (log: {})", node.name, log.display());
        }
    }
    println!("lab {prefix} is up:");
    for node in &lab.nodes {
        println!(
            "  node {:6} netns {:24} underlay {}",
            node.name,
            node.ns.name(),
            node.underlay_ip
        );
    }
    for pod in &lab.pods {
        println!(
            "  pod  {:10} netns {:24} ip {:13} on {} (veth {}){}",
            pod.spec.name,
            pod.ns.name(),
            pod.spec.ip,
            lab::NODES[pod.spec.node],
            pod.veth,
            if pod.spec.enrolled {
                ", enrolled in examples/lab.yaml"
            } else {
                ""
            }
        );
    }
    let node = &lab.nodes[0];
    let client = lab
        .pods
        .iter()
        .find(|p| p.spec.name == "client")
        .context("lab has a client pod")?;
    let server = lab
        .pods
        .iter()
        .find(|p| p.spec.name == "server")
        .context("lab has a server pod")?;
    println!(
        "\ntry it:\n  ip netns exec {server_ns} iperf3 -s -D          # a server in the enrolled server pod\n  ip netns exec {client_ns} iperf3 -c {server_ip} -t 3   # through both ztunnels\n  nsenter --net=/run/netns/{node_ns} ss -tnp           # ztunnel's sockets on {node}",
        server_ns = server.ns.name(),
        client_ns = client.ns.name(),
        server_ip = server.spec.ip,
        node_ns = node.ns.name(),
        node = node.name,
    );
    if ztunnels.is_none() {
        println!(
            "run a ztunnel on {}:\n  nsenter --net=/run/netns/{} target/release/ztunnel --config examples/lab.yaml --node-name {} --bpf-pin-dir {}",
            node.name,
            node.ns.name(),
            node.name,
            node.pin_dir.display()
        );
    }
    println!("remove it: cargo xtask lab down --prefix {prefix}");
    Ok(())
}
