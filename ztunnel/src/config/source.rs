//! Where the mesh's configuration comes from: the local file, watched, or
//! the control plane, over xDS. Both end in the same channel of complete
//! configurations in the local file's shape, which the rest of ztunnel
//! turns into one snapshot whatever its source.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{local::LocalConfig, Args};
use crate::xds::XdsClient;

/// How often the local file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(1);
/// How often a start still waiting for the control plane says so.
const WAITING_LOG: Duration = Duration::from_secs(10);

/// A source, started.
pub struct Feed {
    /// The configuration to start with.
    pub initial: Arc<LocalConfig>,
    /// Every later complete configuration.
    pub updates: watch::Receiver<Option<Arc<LocalConfig>>>,
    /// The xDS client, when the control plane is the source.
    pub xds: Option<Arc<XdsClient>>,
}

/// Starts the source `args` name. A local file that cannot be used refuses
/// the start; with a control plane, the start waits for its first complete
/// push (of workloads and of policies).
pub async fn start(args: &Args) -> anyhow::Result<Feed> {
    match (&args.config, args.xds_endpoint()) {
        (Some(_), Some(_)) => bail!(
            "--config (LOCAL_XDS_PATH) and --xds-address (XDS_ADDRESS) are alternatives: give one"
        ),
        (None, None) => bail!(
            "no configuration: give --config FILE (LOCAL_XDS_PATH) or --xds-address URL (XDS_ADDRESS)"
        ),
        (Some(path), None) => file(path.clone()),
        (None, Some(endpoint)) => {
            for (what, path) in [("XDS_ROOT_CA", &endpoint.root_cert), ("AUTH_TOKEN", &args.auth_token)] {
                std::fs::metadata(path)
                    .with_context(|| format!("{what} {}", path.display()))?;
            }
            let (client, mut updates) = XdsClient::new(endpoint.clone(), args.node_identity());
            tokio::spawn(client.clone().run());
            info!(address = %endpoint.address, "waiting for the control plane's first complete push");
            let initial = loop {
                match tokio::time::timeout(WAITING_LOG, updates.wait_for(Option::is_some)).await {
                    Ok(Ok(config)) => break config.clone(),
                    Ok(Err(_)) => bail!("the xDS client stopped"),
                    Err(_) => {
                        let status = client.status();
                        warn!(
                            address = %endpoint.address,
                            connected = status.connected,
                            error = ?status.last_error,
                            "still waiting for the control plane's first complete push"
                        )
                    }
                }
            };
            let initial = initial.ok_or_else(|| anyhow::anyhow!("no configuration"))?;
            Ok(Feed {
                initial,
                updates,
                xds: Some(client),
            })
        }
    }
}

fn file(path: PathBuf) -> anyhow::Result<Feed> {
    let (initial, text) = LocalConfig::load_with_text(&path)?;
    let initial = Arc::new(initial);
    let (tx, updates) = watch::channel(Some(initial.clone()));
    tokio::spawn(watch_file(path, text, FILE_POLL, move |config| {
        tx.send(Some(Arc::new(config))).is_ok()
    }));
    Ok(Feed {
        initial,
        updates,
        xds: None,
    })
}

/// Hands `apply` the file's configuration each time its text differs from
/// `last` (checked every `poll`), until `apply` returns false. A file that
/// cannot be read (mid-replace by an editor or a ConfigMap update) is tried
/// again; one that does not parse is refused and the previous one stays.
pub async fn watch_file(
    path: PathBuf,
    mut last: String,
    poll: Duration,
    mut apply: impl FnMut(LocalConfig) -> bool,
) {
    let mut tick = tokio::time::interval(poll);
    loop {
        tick.tick().await;
        let text = match std::fs::read_to_string(&path) {
            Ok(text) if text != last => text,
            Ok(_) => continue,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read configuration; keeping the previous one");
                continue;
            }
        };
        match LocalConfig::parse(&text, &path) {
            Ok(config) => {
                info!(path = %path.display(), "configuration changed");
                if !apply(config) {
                    return;
                }
            }
            Err(e) => error!(error = %e, "configuration rejected; keeping the previous one"),
        }
        last = text;
    }
}
