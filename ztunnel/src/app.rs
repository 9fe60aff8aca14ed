//! Starting, running and stopping one ztunnel: the order of these steps is
//! what keeps capture failing closed and never leaking a flow.

use std::{
    net::SocketAddr,
    os::fd::{OwnedFd, RawFd},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{oneshot, watch, Notify},
};
use tracing::{error, info, warn};
use ztunnel_common::ports;

use crate::{
    admin::{self, LogControl, Status},
    authz,
    config::{local::LocalConfig, Args},
    handover,
    identity::{CertManager, LocalCa},
    metrics::{kernel::KernelCounters, Metrics},
    proxy::{
        hbone::{pool::Pool, server::Limits},
        tracker::Tracker,
        Drain, Listeners, Proxy,
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

/// Every socket ztunnel listens on, as one unit: bound fresh, or taken over
/// from a running ztunnel.
struct Sockets {
    proxy: Listeners,
    admin: TcpListener,
    metrics: TcpListener,
    readiness: TcpListener,
}

impl Sockets {
    fn bind() -> anyhow::Result<Self> {
        let plain = |addr: SocketAddr| -> anyhow::Result<TcpListener> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket
                .bind(&addr.into())
                .map_err(|e| anyhow::anyhow!("binding {addr}: {e} (is another ztunnel running here without a handover socket?)"))?;
            socket.listen(1024)?;
            Ok(TcpListener::from_std(socket.into())?)
        };
        Ok(Sockets {
            proxy: Listeners::bind().map_err(|e| {
                anyhow::anyhow!("{e} (is another ztunnel running here without a handover socket?)")
            })?,
            admin: plain(SocketAddr::from(([127, 0, 0, 1], ports::ADMIN)))?,
            metrics: plain(SocketAddr::from(([0, 0, 0, 0], ports::METRICS)))?,
            readiness: plain(SocketAddr::from(([0, 0, 0, 0], ports::READINESS)))?,
        })
    }

    fn from_handover(fds: Vec<(String, OwnedFd)>) -> anyhow::Result<Self> {
        let mut by_name: std::collections::HashMap<String, OwnedFd> = fds.into_iter().collect();
        let mut take = |name: &str| -> anyhow::Result<TcpListener> {
            let fd = by_name
                .remove(name)
                .ok_or_else(|| anyhow::anyhow!("the running ztunnel did not hand over `{name}`"))?;
            let std = std::net::TcpListener::from(fd);
            std.set_nonblocking(true)?;
            Ok(TcpListener::from_std(std)?)
        };
        Ok(Sockets {
            proxy: Listeners {
                outbound: take("outbound")?,
                inbound_plaintext: take("inbound_plaintext")?,
                inbound_hbone: take("inbound_hbone")?,
            },
            admin: take("admin")?,
            metrics: take("metrics")?,
            readiness: take("readiness")?,
        })
    }

    fn raw_fds(&self) -> Vec<(String, RawFd)> {
        vec![
            ("outbound".into(), handover::raw(&self.proxy.outbound)),
            (
                "inbound_plaintext".into(),
                handover::raw(&self.proxy.inbound_plaintext),
            ),
            (
                "inbound_hbone".into(),
                handover::raw(&self.proxy.inbound_hbone),
            ),
            ("admin".into(), handover::raw(&self.admin)),
            ("metrics".into(), handover::raw(&self.metrics)),
            ("readiness".into(), handover::raw(&self.readiness)),
        ]
    }
}

/// Why the main loop ended.
enum Stop {
    Signal,
    Quit,
    HandedOver,
}

/// Runs ztunnel until SIGTERM, SIGINT, `/quitquitquit`, or a new ztunnel
/// taking over; then drains.
pub async fn run(args: Args, log_control: LogControl) -> anyhow::Result<()> {
    // Everything that can be refused is checked before the kernel is touched.
    let config_text = read_config(&args.config)?;
    let config = LocalConfig::parse(&config_text, &args.config)?;
    let snapshot = Arc::new(Snapshot::new(&args.node_name, &args.trust_domain, &config));
    let pin_dir = args.pin_dir();
    let certs = Arc::new(CertManager::new(load_ca(&args)?, args.workload_cert_ttl));
    let handover_path = args.handover_path();

    // The listening sockets: the running ztunnel's if there is one (the
    // kernel keeps assigning to them throughout), else fresh ones.
    let sockets = match tokio::task::block_in_place(|| handover::take_over(&handover_path))? {
        Some(fds) => {
            info!(socket = %handover_path.display(), "took the listeners over from the running ztunnel");
            Sockets::from_handover(fds)?
        }
        None => Sockets::bind()?,
    };
    let raw_fds = sockets.raw_fds();

    let (state_tx, state_rx) = watch::channel(snapshot.clone());
    let (drain_tx, drain_rx) = watch::channel(false);
    let drain = Drain {
        signal: drain_rx,
        tasks: tokio_util::task::TaskTracker::new(),
    };
    let metrics = Arc::new(Metrics::default());
    let shutdown = Arc::new(Notify::new());

    let mut capture = tokio::task::block_in_place(|| Capture::open(&pin_dir))?;
    let status = Arc::new(Status {
        state: state_rx.clone(),
        certs: certs.clone(),
        capture: RwLock::new(CaptureStatus::default()),
        readiness: RwLock::new(Err("starting".into())),
        metrics: metrics.clone(),
        kernel: KernelCounters::open(&pin_dir)
            .map_err(|e| warn!(error = %e, "kernel counters unavailable to metrics"))
            .ok(),
        log_control,
        shutdown: shutdown.clone(),
    });
    // Readiness answers (503) from here on.
    let http_tasks = [
        tokio::spawn(admin::http::serve(
            "readiness",
            sockets.readiness,
            admin::readiness_handler(status.clone()),
        )),
        tokio::spawn(admin::http::serve(
            "metrics",
            sockets.metrics,
            admin::metrics_handler(status.clone()),
        )),
        tokio::spawn(admin::http::serve(
            "admin",
            sockets.admin,
            admin::admin_handler(status.clone()),
        )),
    ];

    if let Err(e) = certs.refresh(&snapshot.local_identities()) {
        error!(error = %e, "issuing certificates failed; retrying");
    }
    let tls = Arc::new(TlsContext::new(certs.clone(), &args.trust_domain)?);
    {
        use ztunnel_common::listener_index as slot;
        let fd = |name: &str| raw_fds.iter().find(|(n, _)| n == name).map(|(_, fd)| *fd);
        let listeners: Vec<(u32, RawFd)> = [
            (slot::OUTBOUND, fd("outbound")),
            (slot::INBOUND_PLAINTEXT, fd("inbound_plaintext")),
            (slot::INBOUND_HBONE, fd("inbound_hbone")),
        ]
        .into_iter()
        .filter_map(|(i, fd)| fd.map(|fd| (i, fd)))
        .collect();
        tokio::task::block_in_place(|| capture.serve_listeners(&listeners))?;
    }
    tokio::task::block_in_place(routing::install_capture_route)?;
    sync_policy(&mut capture, &snapshot);
    let capture_status = sync(&mut capture, &snapshot, &args.uplinks)?;
    log_status(&capture_status, &snapshot);
    publish(&status, capture_status);

    let proxy = Arc::new(Proxy {
        pool: Pool::new(tls.clone()),
        tls,
        limits: Limits {
            handshake_timeout: args.handshake_timeout,
            ..Limits::default()
        },
        tracker: Arc::new(Tracker::default()),
        metrics,
        drain: drain.clone(),
    });
    let tracker = proxy.tracker.clone();
    let proxy_task = tokio::spawn(sockets.proxy.serve(state_rx, proxy));

    // The next ztunnel asks here for our listeners.
    let (handed_over_tx, handed_over_rx) = oneshot::channel::<()>();
    start_handover_server(&handover_path, raw_fds, handed_over_tx)?;

    info!(
        node = %args.node_name,
        pin_dir = %pin_dir.display(),
        workloads = snapshot.workloads.len(),
        local = snapshot.local_workloads().count(),
        ready = status.readiness.read().map(|r| r.is_ok()).unwrap_or(false),
        "ready"
    );

    let mut last_text = config_text;
    let mut config_tick = tokio::time::interval(CONFIG_POLL);
    let mut resync_tick = tokio::time::interval(RESYNC);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut handed_over_rx = handed_over_rx;
    let stop = loop {
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
                        if let Err(e) = certs.refresh(&snapshot.local_identities()) {
                            error!(error = %e, "issuing certificates failed; retrying");
                        }
                        match sync(&mut capture, &snapshot, &args.uplinks) {
                            Ok(capture_status) => {
                                log_status(&capture_status, &snapshot);
                                publish(&status, capture_status);
                            }
                            Err(e) => error!(error = %e, "capture sync failed"),
                        }
                    }
                    // The previous configuration stays in force.
                    Err(e) => error!(error = %e, "configuration rejected; keeping the previous one"),
                }
            }
            _ = resync_tick.tick() => {
                let snapshot = state_tx.borrow().clone();
                match sync(&mut capture, &snapshot, &args.uplinks) {
                    Ok(capture_status) => publish(&status, capture_status),
                    Err(e) => warn!(error = %e, "capture resync failed"),
                }
            }
            _ = tokio::signal::ctrl_c() => break Stop::Signal,
            _ = sigterm.recv() => break Stop::Signal,
            _ = shutdown.notified() => break Stop::Quit,
            Ok(()) = &mut handed_over_rx => break Stop::HandedOver,
        }
    };

    // Drain: stop accepting, GOAWAY on HBONE, let connections finish.
    let why = match stop {
        Stop::Signal => "signal",
        Stop::Quit => "quitquitquit",
        Stop::HandedOver => "handed over to a new ztunnel",
    };
    info!(reason = why, deadline = ?args.drain_deadline, "draining");
    if let Ok(mut readiness) = status.readiness.write() {
        *readiness = Err("draining".into());
    }
    drain_tx.send_replace(true);
    for task in http_tasks {
        task.abort();
    }
    drain.tasks.close();
    match tokio::time::timeout(args.drain_deadline, drain.tasks.wait()).await {
        Ok(()) => info!("drained: every connection finished"),
        Err(_) => warn!(
            remaining = drain.tasks.len(),
            "drain deadline passed; closing the remaining connections"
        ),
    }
    proxy_task.abort();
    if matches!(stop, Stop::HandedOver) {
        // The new ztunnel owns capture now, routing rule included.
        info!("exiting; the new ztunnel serves capture");
    } else {
        info!("exiting; capture stays attached and fails closed until ztunnel returns");
        if let Err(e) = tokio::task::block_in_place(routing::remove_capture_route) {
            warn!(error = %e, "removing the capture route");
        }
        let _ = std::fs::remove_file(&handover_path);
    }
    Ok(())
}

fn start_handover_server(
    path: &PathBuf,
    fds: Vec<(String, RawFd)>,
    done: oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let listener = handover::bind(path)?;
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || match handover::serve(listener, fds) {
            Ok(()) => {
                let _ = done.send(());
            }
            Err(e) => error!(error = %e, "handover server stopped"),
        })?;
    Ok(())
}

fn publish(status: &Status, capture: CaptureStatus) {
    if let Ok(mut c) = status.capture.write() {
        *c = capture;
    }
    status.update_readiness();
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

fn sync(
    capture: &mut Capture,
    snapshot: &Snapshot,
    uplinks: &[String],
) -> anyhow::Result<CaptureStatus> {
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
        Ok(n) => info!(
            entries = n,
            policies = snapshot.policies.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "kernel policy tables updated"
        ),
        Err(e) => {
            error!(error = %e, "updating the kernel policy tables failed; userspace still enforces the policy")
        }
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
