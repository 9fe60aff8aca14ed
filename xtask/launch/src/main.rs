//! `cargo xtask ...` starts here. The xtask crate itself depends on the
//! ztunnel crate, whose build script compiles the eBPF programs with
//! nightly's `rust-src` and bpf-linker: on a fresh machine it cannot even
//! be built until `scripts/bootstrap.sh` has installed them. So this small
//! program, which depends on nothing, runs the bootstrap first, then hands
//! the command line to the xtask crate.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

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
    // Every command needs it: even `--help` or `lab down` build the xtask
    // crate, which cannot be built without it. It returns at once when
    // everything is in place.
    {
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
    // The xtask crate need not run it again.
    cmd.env("ZTUNNEL_BOOTSTRAPPED", "1");
    match cmd.status() {
        Ok(s) => ExitCode::from(s.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1)),
        Err(e) => {
            eprintln!("cargo xtask: cannot run the xtask crate: {e}");
            ExitCode::FAILURE
        }
    }
}
