//! `cargo xtask fuzz`: builds fuzz/'s cargo-fuzz targets and runs each for
//! a bounded time, failing on any crash, slow input or memory blow-up.
//! `cargo xtask test` runs every target for [`TEST_SECONDS`]; a long run is
//! `cargo xtask fuzz --seconds 600`.
//!
//! - Built with `--sanitizer none`: the code under test is safe Rust, so
//!   AddressSanitizer would find nothing the panics and limits do not,
//!   while it about doubles the cold build (11 min 30 s against 5 min 39 s
//!   here, though another build shared the machine for the first) and runs
//!   3 to 9 times fewer inputs per second.
//! - Built into `target/fuzz` (ignored by git and the image build); the
//!   eBPF object ztunnel's build script embeds is still `target/ebpf`'s.
//! - A cold build is long (ztunnel's whole dependency tree, instrumented,
//!   with a nightly compiler: about 6 minutes on two cores), so
//!   `cargo xtask test` starts it in the background at the lowest CPU
//!   priority ([`Build::start`]), where it takes only the CPU the other
//!   steps leave idle, and runs the targets once it is done.
//! - The committed seeds (`fuzz/corpus/<target>`) are only read: what a run
//!   discovers goes to `target/fuzz/corpus/<target>`, given to libFuzzer
//!   first, which is where it writes. A crashing input is saved under
//!   `fuzz/artifacts/<target>/` (ignored by git).
//! - Each run has a deadline: without a sanitizer's allocator, libFuzzer's
//!   handler for a slow input can deadlock in `malloc` (it did, on the
//!   regex filter fixed in `admin::log_filter`), and a bounded run must
//!   end. Such a hang fails the run; a build with the default sanitizer
//!   (`cargo +nightly fuzz run TARGET`) saves the slow input.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
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
/// A run still going this long after its time is up is hung: killed.
const GRACE: Duration = Duration::from_secs(60);

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
    Build::start(root, false)?.wait()?;
    run_built(root, seconds, &targets)
}

/// Every target's build, going on.
pub struct Build {
    child: Child,
    started: Instant,
    log: PathBuf,
    background: bool,
}

impl Build {
    /// Starts building every target (at the lowest CPU priority, `nice`
    /// 19, if `background`), its output to `target/fuzz/logs/build.log`.
    pub fn start(root: &Path, background: bool) -> Result<Build> {
        let logs = root.join("target/fuzz/logs");
        fs::create_dir_all(&logs)?;
        let log = logs.join("build.log");
        let file = fs::File::create(&log)?;
        if !background {
            println!("building the fuzz targets (log: {})", log.display());
        }
        let mut cmd = cargo_fuzz(root, "build", background);
        if background {
            // Its own process group, so that dropping it ends the build.
            cmd.process_group(0);
        }
        let child = cmd
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context(SPAWN)?;
        Ok(Build {
            child,
            started: Instant::now(),
            log,
            background,
        })
    }

    /// Waits for the build to end; its log's end if it failed.
    pub fn wait(mut self) -> Result<()> {
        let status = self.child.wait()?;
        if !status.success() {
            print_tail(&fs::read_to_string(&self.log).unwrap_or_default());
            bail!(
                "building the fuzz targets failed ({status}); log: {}",
                self.log.display()
            );
        }
        println!("fuzz targets built in {:.0?}", self.started.elapsed());
        Ok(())
    }
}

/// A build still going when its caller gives up (a step before failed)
/// is ended, not left to run on.
impl Drop for Build {
    fn drop(&mut self) {
        if self.background && matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) of the process group this process created.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Runs each of `targets`, built already, for `seconds`.
pub fn run_built(root: &Path, seconds: u64, targets: &[&str]) -> Result<()> {
    let logs = root.join("target/fuzz/logs");
    fs::create_dir_all(&logs)?;
    let mut failed = Vec::new();
    for target in targets {
        let started = Instant::now();
        let scratch = root.join("target/fuzz/corpus").join(target);
        fs::create_dir_all(&scratch)?;
        let seeds = root.join("fuzz/corpus").join(target);
        let log_path = logs.join(format!("{target}.log"));
        let log = fs::File::create(&log_path)?;
        let artifacts = root.join("fuzz/artifacts").join(target);
        fs::create_dir_all(&artifacts)?;
        // The fuzzer itself, not `cargo fuzz run`: the build is done, and
        // a fuzzer that hangs is this child, to kill.
        let mut child = Command::new(binary(root, target))
            .arg(&scratch)
            .arg(&seeds)
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg("-print_final_stats=1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("running the {target} fuzzer"))?;
        let deadline = started + Duration::from_secs(seconds) + GRACE;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let runs = stat(&text, "stat::number_of_executed_units").unwrap_or(0);
        let ok = status.is_some_and(|s| s.success());
        let outcome = match status {
            Some(_) if ok => "ok",
            Some(_) => "FAILED",
            None => "FAILED (hung past its time: a slow input, see ALARM in the log)",
        };
        println!(
            "fuzz {target:14} {outcome}: {runs} inputs in {:.0?}, {} in its corpus (log: {})",
            started.elapsed(),
            fs::read_dir(&scratch).map(|d| d.count()).unwrap_or(0),
            log_path.display()
        );
        if !ok {
            print_tail(&text);
            failed.push(*target);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {}; the inputs are in fuzz/artifacts/, replay one with `{} FILE` (a hang left none: `cargo +nightly fuzz run -O TARGET`, with AddressSanitizer, saves it)",
            failed.join(", "),
            binary(root, "TARGET").display()
        );
    }
    Ok(())
}

const SPAWN: &str = "running `cargo +nightly fuzz`; `cargo xtask bootstrap` installs cargo-fuzz";

/// The last lines of a log, indented.
fn print_tail(log: &str) {
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    for line in tail.into_iter().rev() {
        println!("    {line}");
    }
}

/// `cargo +nightly fuzz <command>` for fuzz/, with this module's build
/// settings, away from the outer (stable) cargo's; at the lowest CPU
/// priority if `nice`.
fn cargo_fuzz(root: &Path, command: &str, nice: bool) -> Command {
    let mut cmd = if nice {
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "19", "rustup"]);
        cmd
    } else {
        Command::new("rustup")
    };
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
        // `-O`: debug assertions come from fuzz/Cargo.toml's profile.
        .args(["--fuzz-dir", "fuzz", "--sanitizer", "none", "-O"])
        .arg("--target-dir")
        .arg(target_dir(root))
        .current_dir(root)
        .stdin(Stdio::null());
    cmd
}

fn target_dir(root: &Path) -> PathBuf {
    root.join("target/fuzz")
}

/// Where cargo-fuzz puts a target's fuzzer.
fn binary(root: &Path, target: &str) -> PathBuf {
    target_dir(root)
        .join("x86_64-unknown-linux-gnu/release")
        .join(target)
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
