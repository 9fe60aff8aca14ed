//! `cargo xtask ...` starts here. The xtask crate itself depends on the
//! ztunnel crate, whose build script compiles the eBPF programs with
//! nightly's `rust-src` and bpf-linker: on a fresh machine it cannot even
//! be built until `scripts/bootstrap.sh` has installed them. So this small
//! program, which depends on nothing, runs the bootstrap first for the
//! commands that build, then hands the command line to the xtask crate.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

/// Commands that build ztunnel (directly or through the xtask crate) and
/// so need the bootstrap first. The others (`lab down`, `probe`, help)
/// only need the xtask crate, which is then already built or buildable.
const NEEDS_BOOTSTRAP: &[&str] = &[
    "bootstrap",
    "build-ebpf",
    "run",
    "lab",
    "demo",
    "bench",
    "test",
    "check-deploy",
];

fn workspace_root() -> PathBuf {
    // xtask/launch/ -> the workspace.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    let wants_help = args.iter().any(|a| a == "-h" || a == "--help");
    let needs = args
        .first()
        .is_some_and(|c| NEEDS_BOOTSTRAP.contains(&c.as_str()))
        && !wants_help
        && !(args.first().map(String::as_str) == Some("lab")
            && args.get(1).map(String::as_str) == Some("down"));
    if needs {
        match Command::new("bash")
            .arg(root.join("scripts/bootstrap.sh"))
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => {
                eprintln!("cargo xtask: scripts/bootstrap.sh failed ({s})");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("cargo xtask: cannot run scripts/bootstrap.sh: {e}");
                return ExitCode::FAILURE;
            }
        }
        if args.first().map(String::as_str) == Some("bootstrap") {
            return ExitCode::SUCCESS;
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["run", "--quiet", "--package", "xtask", "--"])
        .args(&args)
        .current_dir(&root);
    if needs {
        // The xtask crate need not run it again.
        cmd.env("ZTUNNEL_BOOTSTRAPPED", "1");
    }
    match cmd.status() {
        Ok(s) => ExitCode::from(s.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1)),
        Err(e) => {
            eprintln!("cargo xtask: cannot run the xtask crate: {e}");
            ExitCode::FAILURE
        }
    }
}
