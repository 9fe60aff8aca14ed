//! Builds the eBPF programs (ztunnel-ebpf, through `ztunnel-ebpf-build`, the
//! build `cargo xtask build-ebpf` runs too) so the ztunnel binary embeds
//! them: one file is all a node needs. Also generates the gRPC code for the
//! control plane's protocols (xDS, CA) from `proto/`, with a protobuf
//! compiler written in Rust (no `protoc`).

use std::{
    env,
    path::{Path, PathBuf},
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
    for path in ztunnel_ebpf_build::INPUTS {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(path).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("ztunnel-common/src").display()
    );

    let object = ztunnel_ebpf_build::build(&ebpf_dir, &ztunnel_ebpf_build::target_dir(root))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("ztunnel.bpf.o");
    std::fs::copy(&object, &out)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", object.display(), out.display()));
}
