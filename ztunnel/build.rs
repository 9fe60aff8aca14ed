//! Builds the eBPF programs (ztunnel-ebpf) with nightly for bpfel-unknown-none
//! so the ztunnel binary embeds them: one file is all a node needs. Also
//! generates the gRPC code for the control plane's protocols (xDS, CA) from
//! `proto/`, with a protobuf compiler written in Rust (no `protoc`).
//!
//! The eBPF crate is its own workspace with its own target directory
//! (`target/ebpf`), shared by every profile of this crate and by
//! `cargo xtask build-ebpf`, so it is built once, not once per profile.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The protocol files, relative to `proto/`.
const PROTOS: [&str; 5] = [
    "envoy/service/discovery/v3/discovery.proto",
    "istio/workload/workload.proto",
    "istio/security/authorization.proto",
    "istio/v1/auth/ca.proto",
    "google/rpc/status.proto",
];

fn compile_protos(manifest_dir: &Path) {
    let include = manifest_dir.join("proto");
    println!("cargo:rerun-if-changed={}", include.display());
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| include.join(p)).collect();
    let descriptors = protox::compile(&files, [&include])
        .unwrap_or_else(|e| panic!("compiling the .proto files in {}: {e:?}", include.display()));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("generating gRPC code: {e}"));
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    compile_protos(&manifest_dir);
    let root = manifest_dir
        .parent()
        .expect("ztunnel/ lives in the workspace root");
    let ebpf_dir = root.join("ztunnel-ebpf");
    for path in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        ".cargo",
        "rust-toolchain.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(path).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("ztunnel-common/src").display()
    );

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("ebpf");
    let object = build(&ebpf_dir, &target_dir);
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("ztunnel.bpf.o");
    std::fs::copy(&object, &out)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", object.display(), out.display()));
}

fn build(ebpf_dir: &Path, target_dir: &Path) -> PathBuf {
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .arg("--target-dir")
    .arg(target_dir)
    .current_dir(ebpf_dir)
    // BTF lets bpftool and aya describe the maps; debuginfo feeds it.
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    // The outer cargo's settings name the stable toolchain; the nested build must pick nightly.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(key);
    }
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_PKG_")
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("running `rustup run nightly cargo build` for the eBPF programs: {e}; run `cargo xtask bootstrap` (or scripts/bootstrap.sh) first")
    });
    if !status.success() {
        panic!("building the eBPF programs failed ({status}); `cargo xtask bootstrap` installs nightly's rust-src and bpf-linker");
    }
    target_dir.join("bpfel-unknown-none/release/ztunnel")
}
