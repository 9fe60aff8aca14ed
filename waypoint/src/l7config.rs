//! The waypoint's L7 configuration: Istio `AuthorizationPolicy` and Gateway
//! API `HTTPRoute` resources, in their Kubernetes YAML, from files or
//! directories. Watched: an edit applies within a second; a file that does
//! not load is refused as a whole, named with the resource and field at
//! fault, and the previous configuration stays in force.

use std::{path::PathBuf, sync::Arc, time::Duration};

use serde::Deserialize;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    policy::{self, AuthorizationPolicy, Policies},
    resource::FieldError,
    route::{self, HttpRoute, Routes},
};

/// How often the files are checked for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// Why the L7 configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: document {index}: not YAML: {message}", path.display())]
    Yaml {
        path: PathBuf,
        index: usize,
        message: String,
    },
    /// `resource` is `<kind> <namespace>/<name>`.
    #[error("{}: document {index} ({resource}): {source}", path.display())]
    Resource {
        path: PathBuf,
        index: usize,
        resource: String,
        source: FieldError,
    },
}

/// The configuration in force: what the request path reads.
pub struct L7Config {
    pub policies: Policies,
    pub routes: Routes,
}

/// Whose policies apply: the waypoint's `Gateway` name and namespace.
#[derive(Debug, Clone)]
pub struct WaypointRef {
    pub namespace: String,
    pub name: String,
}

/// Every file that `paths` names: files as given, and the `.yaml`/`.yml`
/// files of directories, sorted (load order is route precedence's tie-break).
fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, L7Error> {
    let mut out = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| L7Error::Read {
            path: path.clone(),
            source,
        })?;
        if !meta.is_dir() {
            out.push(path.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| L7Error::Read {
                path: path.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// The files' contents, for change detection and parsing.
fn read_all(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, L7Error> {
    files(paths)?
        .into_iter()
        .map(|path| match std::fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            Err(source) => Err(L7Error::Read { path, source }),
        })
        .collect()
}

/// Parses every resource of every file.
fn parse(
    texts: &[(PathBuf, String)],
    waypoint: &WaypointRef,
) -> Result<(Vec<AuthorizationPolicy>, Vec<HttpRoute>), L7Error> {
    let mut policies = Vec::new();
    let mut routes = Vec::new();
    for (path, text) in texts {
        for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let index = i + 1;
            let value = serde_yaml::Value::deserialize(document).map_err(|e| L7Error::Yaml {
                path: path.clone(),
                index,
                message: e.to_string(),
            })?;
            if value.is_null() {
                continue;
            }
            // A resource without a namespace is the waypoint's namespace's,
            // as `kubectl apply -n` would make it: not `default`.
            let mut value = value;
            if let Some(metadata) = value.get_mut("metadata").and_then(|m| m.as_mapping_mut()) {
                let key = serde_yaml::Value::from("namespace");
                if !metadata.contains_key(&key) {
                    metadata.insert(key, serde_yaml::Value::from(waypoint.namespace.as_str()));
                }
            }
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("")
                .to_string();
            let name = format!(
                "{}/{}",
                value
                    .get("metadata")
                    .and_then(|m| m.get("namespace"))
                    .and_then(|n| n.as_str())
                    .unwrap_or("default"),
                value
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(|n| n.as_str())
                    .unwrap_or("?")
            );
            let api_version = value
                .get("apiVersion")
                .and_then(|k| k.as_str())
                .unwrap_or("")
                .to_string();
            let refuse = |source: FieldError| L7Error::Resource {
                path: path.clone(),
                index,
                resource: format!("{kind} {name}"),
                source,
            };
            match kind.as_str() {
                policy::KIND => {
                    if !["security.istio.io/v1", "security.istio.io/v1beta1"]
                        .contains(&api_version.as_str())
                    {
                        return Err(refuse(FieldError::new(
                            "apiVersion",
                            format!("`{api_version}` is not security.istio.io/v1 (or v1beta1)"),
                        )));
                    }
                    policies.push(policy::parse(value).map_err(refuse)?);
                }
                route::KIND => {
                    if ![
                        "gateway.networking.k8s.io/v1",
                        "gateway.networking.k8s.io/v1beta1",
                    ]
                    .contains(&api_version.as_str())
                    {
                        return Err(refuse(FieldError::new(
                            "apiVersion",
                            format!(
                                "`{api_version}` is not gateway.networking.k8s.io/v1 (or v1beta1)"
                            ),
                        )));
                    }
                    routes.push(route::parse(value).map_err(refuse)?);
                }
                "" => {
                    return Err(refuse(FieldError::new(
                        "kind",
                        "missing: every resource needs apiVersion and kind",
                    )))
                }
                // Other resources (the waypoint's Gateway, ServiceAccounts)
                // may share the directory; they change nothing here.
                other => {
                    warn!(file = %path.display(), document = index, kind = other, "resource ignored: the waypoint reads AuthorizationPolicy and HTTPRoute")
                }
            }
        }
    }
    Ok((policies, routes))
}

/// Loads the configuration for `waypoint` from `paths`.
pub fn load(paths: &[PathBuf], waypoint: &WaypointRef) -> Result<(L7Config, String), L7Error> {
    let texts = read_all(paths)?;
    let fingerprint = fingerprint(&texts);
    let config = build(&texts, waypoint)?;
    Ok((config, fingerprint))
}

fn build(texts: &[(PathBuf, String)], waypoint: &WaypointRef) -> Result<L7Config, L7Error> {
    let (policies, routes) = parse(texts, waypoint)?;
    let (policies, ignored) = Policies::new(policies, &waypoint.namespace, &waypoint.name);
    for reason in ignored {
        info!(policy = %reason, "AuthorizationPolicy not applied by this waypoint");
    }
    Ok(L7Config {
        policies,
        routes: Routes::new(routes),
    })
}

fn fingerprint(texts: &[(PathBuf, String)]) -> String {
    texts
        .iter()
        .map(|(p, t)| format!("{}\u{0}{t}\u{0}", p.display()))
        .collect()
}

/// Reloads `paths` every [`POLL`] and publishes each configuration that
/// loads; one that does not is logged and the previous one stays.
pub async fn watch(
    paths: Vec<PathBuf>,
    waypoint: WaypointRef,
    mut last: String,
    tx: watch::Sender<Arc<L7Config>>,
) {
    let mut tick = tokio::time::interval(POLL);
    let mut last_error = String::new();
    loop {
        tick.tick().await;
        let texts = match read_all(&paths) {
            Ok(texts) => texts,
            Err(e) => {
                report(&mut last_error, &e);
                continue;
            }
        };
        let now = fingerprint(&texts);
        if now == last {
            continue;
        }
        match build(&texts, &waypoint) {
            Ok(config) => {
                info!(
                    policies = config.policies.len(),
                    routes = config.routes.len(),
                    "L7 configuration applied"
                );
                last = now;
                last_error.clear();
                if tx.send(Arc::new(config)).is_err() {
                    return;
                }
            }
            Err(e) => report(&mut last_error, &e),
        }
    }
}

/// Logs a refusal once per distinct error (the poll would repeat it).
fn report(last: &mut String, e: &L7Error) {
    let text = e.to_string();
    if *last != text {
        error!(error = %text, "L7 configuration refused; the previous one stays in force");
        *last = text;
    }
}

/// The display name of a path list, for logs.
pub fn describe(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(",")
}
