//! Starting, running and stopping one ztunnel: the order of these steps is
//! what keeps capture failing closed and never leaking a flow.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    authz,
    config::{local::LocalConfig, Args},
    identity::{CertManager, LocalCa},
    proxy::{
        hbone::{pool::Pool, server::Limits},
        tracker::Tracker,
        Listeners, Proxy,
    },
    redirect::{self, routing, Capture, CaptureStatus},
    state::Snapshot,
    tls::TlsContext,
};

/// How often the local file is checked for changes.
const CONFIG_POLL: Duration = Duration::from_secs(1);
/// How often capture is re-synced even without a config change: a pod's veth
/// may appear after its workload was configured, or be recreated.
const RESYNC: Duration = Duration::from_secs(2);

/// Runs ztunnel until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // Everything that can be refused is checked before the kernel is touched.
    let config_text = read_config(&args.config)?;
    let config = LocalConfig::parse(&config_text, &args.config)?;
    let snapshot = Arc::new(Snapshot::new(&args.node_name, &args.trust_domain, &config));
    let pin_dir = args.pin_dir();
    let certs = Arc::new(CertManager::new(load_ca(&args)?, args.workload_cert_ttl));
    certs.refresh(&snapshot.local_identities())?;
    let tls = Arc::new(TlsContext::new(certs.clone(), &args.trust_domain)?);

    let mut capture = tokio::task::block_in_place(|| Capture::open(&pin_dir))?;
    tokio::task::block_in_place(routing::install_capture_route)?;
    // Listeners before attaching: the first captured SYN finds a socket.
    let listeners = Listeners::bind()?;
    sync_policy(&mut capture, &snapshot);
    let status = sync(&mut capture, &snapshot, &args.uplinks)?;
    log_status(&status, &snapshot);
    info!(
        node = %args.node_name,
        pin_dir = %pin_dir.display(),
        workloads = snapshot.workloads.len(),
        local = snapshot.local_workloads().count(),
        "ready"
    );

    let (state_tx, state_rx) = watch::channel(snapshot);
    let proxy = Arc::new(Proxy {
        pool: Pool::new(tls.clone()),
        tls,
        limits: Limits {
            handshake_timeout: args.handshake_timeout,
            ..Limits::default()
        },
        tracker: Arc::new(Tracker::default()),
    });
    let tracker = proxy.tracker.clone();
    let proxy = tokio::spawn(listeners.serve(state_rx, proxy));

    let mut last_text = config_text;
    let mut config_tick = tokio::time::interval(CONFIG_POLL);
    let mut resync_tick = tokio::time::interval(RESYNC);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = config_tick.tick() => {
                // Certificates due for rotation are replaced here, ahead of use.
                if let Err(e) = certs.refresh(&state_tx.borrow().local_identities()) {
                    error!(error = %e, "certificate refresh failed; retrying");
                }
                let Some(text) = changed_config(&args.config, &last_text) else { continue };
                last_text = text;
                match LocalConfig::parse(&last_text, &args.config) {
                    Ok(config) => {
                        let snapshot = Arc::new(Snapshot::new(&args.node_name, &args.trust_domain, &config));
                        info!(workloads = snapshot.workloads.len(), local = snapshot.local_workloads().count(), "configuration reloaded");
                        // New connections see the new snapshot before capture changes,
                        // so a newly enrolled pod's first flow already finds its workload.
                        state_tx.send_replace(snapshot.clone());
                        // Then the kernel's share of policy: userspace already
                        // denies what it newly denies, so nothing slips through.
                        sync_policy(&mut capture, &snapshot);
                        let closed = tracker.recheck(&snapshot);
                        if closed > 0 {
                            info!(closed, "live connections closed by the policy update");
                        }
                        match sync(&mut capture, &snapshot, &args.uplinks) {
                            Ok(status) => log_status(&status, &snapshot),
                            Err(e) => error!(error = %e, "capture sync failed"),
                        }
                    }
                    // The previous configuration stays in force.
                    Err(e) => error!(error = %e, "configuration rejected; keeping the previous one"),
                }
            }
            _ = resync_tick.tick() => {
                let snapshot = state_tx.borrow().clone();
                if let Err(e) = sync(&mut capture, &snapshot, &args.uplinks) {
                    warn!(error = %e, "capture resync failed");
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }

    info!("shutting down; capture stays attached and fails closed until ztunnel returns");
    proxy.abort();
    if let Err(e) = tokio::task::block_in_place(routing::remove_capture_route) {
        warn!(error = %e, "removing the capture route");
    }
    Ok(())
}

/// The CA: the one in --ca-dir, or the development root in the state directory.
fn load_ca(args: &Args) -> anyhow::Result<LocalCa> {
    if let Some(dir) = &args.ca_dir {
        return Ok(LocalCa::load(dir)?);
    }
    let (ca, dir) = LocalCa::load_or_generate_dev(&args.state_dir)?;
    info!(ca_dir = %dir.display(), "using the development CA (pass --ca-dir for a real one; point other nodes at this directory to share its root)");
    Ok(ca)
}

/// Removes everything this instance installed in the kernel.
pub fn uninstall(args: &Args) -> anyhow::Result<()> {
    let pin_dir = args.pin_dir();
    redirect::remove_pins(&pin_dir)?;
    routing::remove_capture_route()?;
    info!(pin_dir = %pin_dir.display(), "capture removed");
    Ok(())
}

fn read_config(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|source| {
        crate::config::local::ConfigError::Read {
            path: path.clone(),
            source,
        }
        .into()
    })
}

/// The file's text if it differs from `last`. A file that cannot be read
/// (mid-replace by an editor or a ConfigMap update) is tried again later.
fn changed_config(path: &PathBuf, last: &str) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if text != last => Some(text),
        Ok(_) => None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read configuration; keeping the previous one");
            None
        }
    }
}

fn sync(capture: &mut Capture, snapshot: &Snapshot, uplinks: &[String]) -> anyhow::Result<CaptureStatus> {
    let plan = snapshot.capture_plan(uplinks);
    Ok(tokio::task::block_in_place(|| capture.sync(&plan))?)
}

/// Compiles the identity-free part of authorization into the kernel tables.
/// On failure the kernel keeps its previous tables; userspace enforces the
/// new policy regardless, so the only cost is work the kernel does not save.
fn sync_policy(capture: &mut Capture, snapshot: &Snapshot) {
    let started = std::time::Instant::now();
    let entries = authz::kernel::compile(snapshot);
    match tokio::task::block_in_place(|| capture.set_policy(&entries)) {
        Ok(n) => info!(entries = n, policies = snapshot.policies.len(), took_ms = started.elapsed().as_millis() as u64, "kernel policy tables updated"),
        Err(e) => error!(error = %e, "updating the kernel policy tables failed; userspace still enforces the policy"),
    }
}

fn log_status(status: &CaptureStatus, snapshot: &Snapshot) {
    for pod in &status.pods {
        if pod.enrolled && !pod.captured {
            warn!(pod = %pod.ip, "enrolled workload has no veth yet; its traffic is not captured");
        }
    }
    for ip in snapshot.uncaptured_ipv6() {
        warn!(%ip, "IPv6 capture is not supported yet; this address is not captured");
    }
    info!(
        captured = status.pods.iter().filter(|p| p.captured).count(),
        attached = status.pods.iter().filter(|p| p.attached).count(),
        uplinks = ?status.uplinks,
        "capture in sync"
    );
}
