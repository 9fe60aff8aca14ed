//! Builds the eBPF programs (`ztunnel-ebpf/`) with nightly for
//! `bpfel-unknown-none`. `ztunnel/build.rs` runs it so the binary embeds the
//! object, and `cargo xtask build-ebpf` runs it to print the object's path:
//! one build, so the two cannot drift apart.
//!
//! The eBPF crate is its own workspace with its own target directory
//! (`<target>/ebpf`), shared by every profile and caller, so it is built once.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

/// Files and directories under `ztunnel-ebpf/` whose change means a rebuild.
pub const INPUTS: [&str; 5] = [
    "src",
    "Cargo.toml",
    "Cargo.lock",
    ".cargo",
    "rust-toolchain.toml",
];

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("running `rustup run nightly cargo build` for the eBPF programs: {0}; run `cargo xtask bootstrap` (or scripts/bootstrap.sh) first")]
    Spawn(std::io::Error),
    #[error("building the eBPF programs failed ({0}); `cargo xtask bootstrap` installs nightly's rust-src and bpf-linker")]
    Failed(ExitStatus),
}

/// Where the programs are built: `ebpf/` in the workspace's target directory
/// (`CARGO_TARGET_DIR` when set, else `target/` under `workspace_root`).
pub fn target_dir(workspace_root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root.join("target"))
        .join("ebpf")
}

/// Builds the programs in `ebpf_dir` into `target_dir` and returns the
/// object's path.
pub fn build(ebpf_dir: &Path, target_dir: &Path) -> Result<PathBuf, BuildError> {
    let mut cmd = Command::new("rustup");
    for key in inherited_settings(std::env::vars_os().map(|(k, _)| k)) {
        cmd.env_remove(key);
    }
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
    let status = cmd.status().map_err(BuildError::Spawn)?;
    if !status.success() {
        return Err(BuildError::Failed(status));
    }
    Ok(target_dir.join("bpfel-unknown-none/release/ztunnel"))
}

/// The variables, among `present`, that the outer cargo (stable, a build
/// script's or xtask's settings) sets and the nested nightly build must not
/// inherit: they would name the stable toolchain or another target, or leak
/// the outer package's features and configuration.
fn inherited_settings(present: impl Iterator<Item = OsString>) -> Vec<OsString> {
    const EXACT: [&str; 7] = [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
    ];
    const PREFIXES: [&str; 3] = ["CARGO_FEATURE_", "CARGO_CFG_", "CARGO_PKG_"];
    present
        .filter(|key| {
            let key = key.to_string_lossy();
            EXACT.contains(&key.as_ref()) || PREFIXES.iter().any(|p| key.starts_with(p))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outer_toolchain_and_package_settings_are_dropped() {
        let present = [
            "RUSTUP_TOOLCHAIN",
            "CARGO_FEATURE_DEFAULT",
            "CARGO_CFG_TARGET_ARCH",
            "CARGO_PKG_NAME",
            "PATH",
            "HOME",
            "CARGO_HOME",
            "RUSTUP_HOME",
        ]
        .map(OsString::from);
        let dropped = inherited_settings(present.into_iter());
        assert_eq!(
            dropped,
            [
                "RUSTUP_TOOLCHAIN",
                "CARGO_FEATURE_DEFAULT",
                "CARGO_CFG_TARGET_ARCH",
                "CARGO_PKG_NAME"
            ]
            .map(OsString::from)
        );
    }
}
