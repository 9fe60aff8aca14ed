//! `cargo xtask check-deploy`: validates `deploy/kubernetes` offline against
//! Kubernetes' schema (strict: an unknown field fails), each file and the
//! kustomization as `kubectl apply -k` would render it, and proves the
//! validator rejects a manifest with a misspelled field.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// The Kubernetes versions the manifests are checked against: the oldest
/// the DaemonSet is written for (its surge update is GA from 1.25) and the
/// newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

fn validator() -> Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?;
    let bin = cache.join("ztunnel/venv/bin/kubernetes-validate");
    if !bin.exists() {
        bail!("{} is missing: run `cargo xtask bootstrap`", bin.display());
    }
    Ok(bin)
}

/// Whether `files` validate, with the validator's words.
fn validate(bin: &Path, version: &str, files: &[PathBuf]) -> Result<(bool, String)> {
    let out = Command::new(bin)
        .args(["--strict", "--no-warn", "-k", version])
        .args(files)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// The kustomizations under `deploy/`, each validated file by file and as
/// `kubectl apply -k` renders it.
const KUSTOMIZATIONS: [&str; 3] = ["deploy/kubernetes", "deploy/uninstall", "deploy/waypoint"];

pub fn check(root: &Path) -> Result<()> {
    let plugin = build_cni(root)?;
    println!("{}: statically linked", plugin.display());
    let bin = validator()?;
    let out_dir = root.join("target/deploy");
    std::fs::create_dir_all(&out_dir)?;
    for kustomization in KUSTOMIZATIONS {
        check_kustomization(&bin, root, kustomization, &out_dir)?;
    }
    let dir = root.join("deploy/kubernetes");
    // The validator must be able to say no: a misspelled field fails.
    let daemonset = std::fs::read_to_string(dir.join("daemonset.yaml"))?;
    let broken = daemonset.replacen(
        "imagePullPolicy: IfNotPresent",
        "imagePullPolicy: IfNotPresent\n          imagePulPolicy: Always",
        1,
    );
    if broken == daemonset {
        bail!("daemonset.yaml has no imagePullPolicy to misspell for the validator's own check");
    }
    let broken_path = out_dir.join("broken-daemonset.yaml");
    std::fs::write(&broken_path, broken)?;
    let (ok, text) = validate(
        &bin,
        KUBERNETES_VERSIONS[1],
        std::slice::from_ref(&broken_path),
    )?;
    if ok || !text.contains("imagePulPolicy") {
        bail!("the validator accepted a misspelled field; it checks nothing:\n{text}");
    }
    println!(
        "{}: valid against Kubernetes {}; a misspelled field is rejected",
        KUSTOMIZATIONS.join(" and "),
        KUBERNETES_VERSIONS.join(" and ")
    );
    Ok(())
}

fn check_kustomization(bin: &Path, root: &Path, name: &str, out_dir: &Path) -> Result<()> {
    let dir = root.join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    // The kustomization as `kubectl apply -k` renders it.
    let rendered = out_dir.join(format!("{}.rendered.yaml", name.replace('/', "-")));
    let kustomized = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .context("running `kubectl kustomize` (kubectl must be installed)")?;
    if !kustomized.status.success() {
        bail!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&kustomized.stderr)
        );
    }
    std::fs::write(&rendered, &kustomized.stdout)?;
    files.push(rendered);
    for version in KUBERNETES_VERSIONS {
        let (ok, text) = validate(bin, version, &files)?;
        print!("{text}");
        if !ok {
            bail!("{name} does not validate against Kubernetes {version}");
        }
    }
    Ok(())
}

/// Builds `ztunnel-cni` statically linked (glibc's static archive, as Rust
/// links it with `+crt-static`), copies it to `target/cni/`, and checks
/// that it asks for no dynamic loader. Returns its path.
pub fn build_cni(root: &Path) -> Result<PathBuf> {
    let host = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")?;
    // An explicit target keeps the flag off build scripts and proc macros.
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--locked",
            "--package",
            "ztunnel-cni",
            "--bin",
            "ztunnel-cni",
            "--target",
            &host,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(root)
        .status()
        .context("building ztunnel-cni")?;
    if !status.success() {
        bail!("building ztunnel-cni statically failed ({status})");
    }
    let built = root.join("target").join(&host).join("release/ztunnel-cni");
    let out_dir = root.join("target/cni");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("ztunnel-cni");
    std::fs::copy(&built, &out).with_context(|| format!("copying {}", built.display()))?;
    let elf = std::fs::read(&out)?;
    if has_interpreter(&elf).context("reading the plugin's ELF header")? {
        bail!(
            "{} is dynamically linked: it would not run on hosts with another C library",
            out.display()
        );
    }
    Ok(out)
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program header
/// (it needs a dynamic loader).
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let phoff = u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?) as usize;
    let (size, count) = (u16_at(0x36)? as usize, u16_at(0x38)? as usize);
    (0..count).try_fold(false, |found, i| {
        let at = phoff + i * size;
        let kind = u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?);
        Some(found || kind == PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_dynamically_linked_binary_has_an_interpreter() {
        // This test binary is linked dynamically, as Rust links by default.
        let me = std::fs::read("/proc/self/exe").unwrap();
        assert_eq!(super::has_interpreter(&me), Some(true));
        assert_eq!(super::has_interpreter(b"not an ELF file"), None);
    }
}
