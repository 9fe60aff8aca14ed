//! Putting the plugin in place on a node: the binary into the CNI bin
//! directory and an entry at the end of the cluster's network
//! configuration (the lexicographically first file in the conf directory,
//! the one the runtime uses). A single-plugin `.conf` becomes a
//! `.conflist` with the same plugins. Every write is a rename, so the
//! runtime never reads half a file.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

/// The plugin's `type`, and its binary's name.
pub const PLUGIN: &str = "ztunnel-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no CNI network configuration in {0} yet (the cluster's CNI writes one)")]
    NoConfig(PathBuf),
    #[error("{path}: not a CNI network configuration: {why}")]
    BadConfig { path: PathBuf, why: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the entry in the conflist says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub socket: String,
    pub timeout_seconds: u64,
    pub exclude_namespaces: Vec<String>,
}

impl Settings {
    fn entry(&self) -> Value {
        json!({
            "type": PLUGIN,
            "socket": self.socket,
            "timeoutSeconds": self.timeout_seconds,
            "excludeNamespaces": self.exclude_namespaces,
        })
    }
}

/// The configuration file the runtime uses: the first by name.
pub fn primary_config(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut files: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig(conf_dir.to_path_buf()))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|e| InstallError::BadConfig {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// Writes `contents` to `path` through a hidden temporary file and a rename.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(PLUGIN);
    let tmp = dir.join(format!(".{name}.ztunnel-tmp"));
    fs::write(&tmp, contents).map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Copies `binary` into `bin_dir` unless the same bytes are there already.
/// Returns whether it wrote.
pub fn install_binary(binary: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let target = bin_dir.join(PLUGIN);
    let ours = fs::read(binary).map_err(io(binary))?;
    if fs::read(&target).is_ok_and(|there| there == ours) {
        return Ok(false);
    }
    write_atomically(&target, &ours, 0o755)?;
    Ok(true)
}

/// Makes the runtime's configuration end with this plugin's entry. Returns
/// the file it leaves in use and whether it changed anything.
pub fn install_config(
    conf_dir: &Path,
    settings: &Settings,
) -> Result<(PathBuf, bool), InstallError> {
    let path = primary_config(conf_dir)?;
    let config = read_json(&path)?;
    let bad = |why: &str| InstallError::BadConfig {
        path: path.clone(),
        why: why.to_string(),
    };
    let object = config.as_object().ok_or_else(|| bad("not a JSON object"))?;
    let (target, mut list) = match object.get("plugins") {
        Some(plugins) => {
            plugins
                .as_array()
                .ok_or_else(|| bad("`plugins` is not a list"))?;
            (path.clone(), config.clone())
        }
        None => {
            // A single-plugin file: the same plugin as a one-entry list.
            let mut plugin = object.clone();
            let version = plugin.remove("cniVersion").unwrap_or(json!("1.0.0"));
            let name = plugin.remove("name").unwrap_or(json!("k8s-pod-network"));
            (
                path.with_extension("conflist"),
                json!({ "cniVersion": version, "name": name, "plugins": [plugin] }),
            )
        }
    };
    let entry = settings.entry();
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| bad("`plugins` is not a list"))?;
    let ours = |p: &Value| p.get("type").and_then(Value::as_str) == Some(PLUGIN);
    let already = target == path
        && plugins.last() == Some(&entry)
        && plugins.iter().filter(|p| ours(p)).count() == 1;
    if already {
        return Ok((path, false));
    }
    plugins.retain(|p| !ours(p));
    plugins.push(entry);
    let text = serde_json::to_vec_pretty(&list).map_err(|e| bad(&e.to_string()))?;
    write_atomically(&target, &text, 0o644)?;
    if target != path {
        fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok((target, true))
}

/// Takes this plugin's entry out of every configuration in `conf_dir` and
/// its binary out of `bin_dir`. Returns the files it changed.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for entry in fs::read_dir(conf_dir).map_err(io(conf_dir))? {
        let path = entry.map_err(io(conf_dir))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("conflist") {
            continue;
        }
        let Ok(mut config) = read_json(&path) else {
            continue;
        };
        let Some(plugins) = config.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN));
        if plugins.len() != before {
            let text = serde_json::to_vec_pretty(&config).map_err(|e| InstallError::BadConfig {
                path: path.clone(),
                why: e.to_string(),
            })?;
            write_atomically(&path, &text, 0o644)?;
            changed.push(path);
        }
    }
    let binary = bin_dir.join(PLUGIN);
    match fs::remove_file(&binary) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&binary)(e)),
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ztunnel-cni-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn settings() -> Settings {
        Settings {
            socket: "/run/ztunnel/cni.sock".into(),
            timeout_seconds: 30,
            exclude_namespaces: vec!["kube-system".into()],
        }
    }

    #[test]
    fn appends_once_to_the_first_conflist_and_leaves_the_rest() {
        let dir = scratch("conflist");
        let calico = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
            "plugins": [{"type": "calico", "ipam": {"type": "calico-ipam"}}, {"type": "portmap"}]});
        fs::write(dir.join("10-calico.conflist"), calico.to_string()).unwrap();
        fs::write(dir.join("99-other.conf"), "{\"type\": \"bridge\"}").unwrap();
        let (path, changed) = install_config(&dir, &settings()).unwrap();
        assert!(changed);
        assert_eq!(path, dir.join("10-calico.conflist"));
        let written: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let plugins = written["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[0], calico["plugins"][0]);
        assert_eq!(plugins[2]["type"], PLUGIN);
        // Again: nothing to do. Our entry stays last and single.
        assert!(!install_config(&dir, &settings()).unwrap().1);
        assert_eq!(
            fs::read_to_string(dir.join("99-other.conf")).unwrap(),
            "{\"type\": \"bridge\"}"
        );
        // The CNI rewrites its file without us: we come back, once.
        fs::write(dir.join("10-calico.conflist"), calico.to_string()).unwrap();
        assert!(install_config(&dir, &settings()).unwrap().1);
        let removed = uninstall(&dir, &dir).unwrap();
        assert_eq!(removed, vec![dir.join("10-calico.conflist")]);
        let back: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, calico);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist() {
        let dir = scratch("conf");
        fs::write(
            dir.join("10-flannel.conf"),
            json!({"cniVersion": "0.4.0", "name": "cbr0", "type": "flannel", "delegate": {"isDefaultGateway": true}}).to_string(),
        )
        .unwrap();
        let (path, changed) = install_config(&dir, &settings()).unwrap();
        assert!(changed);
        assert_eq!(path, dir.join("10-flannel.conflist"));
        assert!(!dir.join("10-flannel.conf").exists());
        let written: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(written["cniVersion"], "0.4.0");
        assert_eq!(written["name"], "cbr0");
        assert_eq!(written["plugins"][0]["type"], "flannel");
        assert_eq!(written["plugins"][0]["delegate"]["isDefaultGateway"], true);
        assert_eq!(written["plugins"][1]["type"], PLUGIN);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_or_bad_configuration_is_named() {
        let dir = scratch("none");
        assert!(matches!(
            install_config(&dir, &settings()),
            Err(InstallError::NoConfig(_))
        ));
        fs::write(dir.join("10-x.conflist"), "{not json").unwrap();
        let e = install_config(&dir, &settings()).unwrap_err().to_string();
        assert!(e.contains("10-x.conflist"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
