//! `cargo xtask ...`: the developer entry points.

mod demo;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ztunnel_tests::lab;

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
    /// Bootstrap, build, and run every test (needs root).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Create the lab and leave it running.
    Up {
        #[arg(long, default_value = "ztlab-dev")]
        prefix: String,
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
        Cmd::Lab { action: LabAction::Up { prefix } } => lab_up(&prefix),
        Cmd::Lab { action: LabAction::Down { prefix } } => {
            for removed in lab::teardown(&prefix)? {
                println!("removed {removed}");
            }
            Ok(())
        }
        Cmd::Demo => {
            require_root()?;
            bootstrap()?;
            let bin = build_release()?;
            demo::run(&bin, &root().join("examples/lab.yaml"))
        }
        Cmd::Test { args } => {
            require_root()?;
            bootstrap()?;
            cargo(&["build", "--package", "ztunnel", "--bins"])?;
            let mut test_args = vec!["test", "--workspace"];
            test_args.extend(args.iter().map(String::as_str));
            cargo(&test_args)
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
    let status = Command::new(cargo).args(args).current_dir(root()).status()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The same build ztunnel/build.rs runs, into the same target directory.
fn build_ebpf() -> Result<PathBuf> {
    let target_dir = root().join("target/ebpf");
    let status = Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(root().join("ztunnel-ebpf"))
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .status()?;
    if !status.success() {
        bail!("building the eBPF programs failed ({status}); try `cargo xtask bootstrap`");
    }
    Ok(target_dir.join("bpfel-unknown-none/release/ztunnel"))
}

fn build_release() -> Result<PathBuf> {
    cargo(&["build", "--release", "--package", "ztunnel", "--bins"])?;
    Ok(root().join("target/release/ztunnel"))
}

fn lab_up(prefix: &str) -> Result<()> {
    let mut lab = lab::Lab::up_named(prefix)?;
    lab.keep();
    println!("lab {prefix} is up:");
    for node in &lab.nodes {
        println!("  node {:6} netns {:24} underlay {}", node.name, node.ns.name(), node.underlay_ip);
    }
    for pod in &lab.pods {
        println!(
            "  pod  {:10} netns {:24} ip {:13} on {} (veth {}){}",
            pod.spec.name,
            pod.ns.name(),
            pod.spec.ip,
            lab::NODES[pod.spec.node],
            pod.veth,
            if pod.spec.enrolled { ", enrolled in examples/lab.yaml" } else { "" }
        );
    }
    let node = &lab.nodes[0];
    println!(
        "\nrun a ztunnel on {}:\n  nsenter --net=/run/netns/{} target/release/ztunnel --config examples/lab.yaml --node-name {} --bpf-pin-dir {}",
        node.name,
        node.ns.name(),
        node.name,
        node.pin_dir.display()
    );
    println!("remove it: cargo xtask lab down --prefix {prefix}");
    Ok(())
}
