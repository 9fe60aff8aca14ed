//! `cargo xtask fuzz`: builds fuzz/'s cargo-fuzz targets and runs each for
//! a bounded time, failing on the first crash, timeout or memory blow-up.
//! `cargo xtask test` runs every target for [`TEST_SECONDS`]; a long run is
//! `cargo xtask fuzz --seconds 600`.
//!
//! - Built with `--sanitizer none`: the code under test is safe Rust, so
//!   AddressSanitizer would find nothing the panics and limits do not, and
//!   it makes the build slower and the runs about twice as slow.
//! - Built into `target/fuzz` (ignored by git and the image build); the
//!   eBPF object ztunnel's build script embeds is still `target/ebpf`'s.
//! - The committed seeds (`fuzz/corpus/<target>`) are only read: what a run
//!   discovers goes to `target/fuzz/corpus/<target>`, given to libFuzzer
//!   first, which is where it writes. A crashing input is saved under
//!   `fuzz/artifacts/<target>/` (ignored by git).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// Every target, in the order they run.
pub const TARGETS: [&str; 5] = [
    "config",
    "hbone_request",
    "xds_convert",
    "handover",
    "admin_query",
];

/// Seconds per target in `cargo xtask test`: five targets in under three
/// minutes, plus the build.
pub const TEST_SECONDS: u64 = 30;

/// One input taking longer than this is a failure (a slow input).
const INPUT_TIMEOUT_SECONDS: u64 = 10;
/// Resident memory past this is a failure (an unbounded allocation).
const RSS_LIMIT_MB: u64 = 2048;

/// Builds `targets` (every one when empty) and runs each for `seconds`.
pub fn run(root: &Path, seconds: u64, targets: &[String]) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!(
            "no fuzz target `{unknown}`; there are {}",
            TARGETS.join(", ")
        );
    }
    let started = Instant::now();
    // One build of all targets (the first `run` would otherwise build them
    // one at a time).
    let mut build = cargo_fuzz(root, "build");
    if targets.len() == 1 {
        build.arg(targets[0]);
    }
    let status = build
        .status()
        .context("running `cargo +nightly fuzz`; `cargo xtask bootstrap` installs cargo-fuzz")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    println!("fuzz targets built in {:.0?}", started.elapsed());
    let logs = root.join("target/fuzz/logs");
    fs::create_dir_all(&logs)?;
    let mut failed = Vec::new();
    for target in &targets {
        let started = Instant::now();
        let scratch = root.join("target/fuzz/corpus").join(target);
        fs::create_dir_all(&scratch)?;
        let seeds = root.join("fuzz/corpus").join(target);
        let log_path = logs.join(format!("{target}.log"));
        let log = fs::File::create(&log_path)?;
        let status = cargo_fuzz(root, "run")
            .arg(target)
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg("-print_final_stats=1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()?;
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let runs = stat(&text, "stat::number_of_executed_units").unwrap_or(0);
        let outcome = if status.success() { "ok" } else { "FAILED" };
        println!(
            "fuzz {target:14} {outcome}: {runs} inputs in {:.0?}, {} in its corpus (log: {})",
            started.elapsed(),
            fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0),
            log_path.display()
        );
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                println!("    {line}");
            }
            failed.push(*target);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {}; the inputs are in fuzz/artifacts/, replay one with `cargo +nightly fuzz run --sanitizer none TARGET FILE`",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `cargo +nightly fuzz <command>` for fuzz/, with this module's build
/// settings, away from the outer (stable) cargo's.
fn cargo_fuzz(root: &Path, command: &str) -> Command {
    let mut cmd = Command::new("rustup");
    for key in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(key);
    }
    cmd.args(["run", "nightly", "cargo", "fuzz", command])
        .args(["--fuzz-dir", "fuzz", "--sanitizer", "none"])
        .arg("--target-dir")
        .arg(target_dir(root))
        .current_dir(root)
        .stdin(Stdio::null());
    cmd
}

fn target_dir(root: &Path) -> PathBuf {
    root.join("target/fuzz")
}

/// A `-print_final_stats` figure.
fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        l.strip_prefix(name)?
            .trim()
            .strip_prefix(':')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executions_are_read_from_libfuzzers_final_stats() {
        let log = "#2 INITED\nDone 1234 runs in 31 second(s)\nstat::number_of_executed_units: 1234\nstat::peak_rss_mb: 71\n";
        assert_eq!(stat(log, "stat::number_of_executed_units"), Some(1234));
        assert_eq!(stat(log, "stat::peak_rss_mb"), Some(71));
        assert_eq!(stat("", "stat::peak_rss_mb"), None);
    }

    #[test]
    fn every_target_is_in_fuzz_cargo_toml_with_seeds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let manifest = fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
        for target in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target} is not a [[bin]] of fuzz/Cargo.toml"
            );
            let seeds = fs::read_dir(root.join("fuzz/corpus").join(target)).unwrap();
            assert!(seeds.count() > 0, "fuzz/corpus/{target} has no seeds");
        }
    }
}
