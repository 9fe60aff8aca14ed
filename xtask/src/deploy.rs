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
const KUSTOMIZATIONS: [&str; 2] = ["deploy/kubernetes", "deploy/uninstall"];

pub fn check(root: &Path) -> Result<()> {
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
