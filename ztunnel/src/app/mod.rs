//! Starting, running and stopping one ztunnel. The order of these steps is
//! what keeps capture failing closed: at no instant of a start, a clean
//! stop, a crash or a handover does a SYN to or from an enrolled pod leave
//! the node in clear or reach a socket that is not ztunnel's.
//!
//! Start:
//! 1. config, CA: everything that can be refused, before the kernel;
//! 2. programs loaded, maps filled from the config;
//! 3. an earlier ztunnel's pinned links switched to this process's
//!    programs, before this process binds anything;
//! 4. listeners bound (or taken over from the running ztunnel);
//! 5. the capture routing installed, the listener lookup attached;
//! 6. programs attached to every veth and uplink, the catch-all routes set;
//! 7. listeners published to the kernel: only now are captured SYNs
//!    delivered (before, and after a crash, the kernel drops them).
//!
//! Stop: the handover offer is withdrawn, the listeners unpublished (new
//! captured SYNs dropped), then connections drain. After a handover the
//! new ztunnel owns the listeners and nothing is unpublished.

mod hold;
mod memory;
mod sockets;

use std::{
    net::Ipv4Addr,
    path::Path,
    pin::Pin,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use tokio::{
    sync::{oneshot, watch, Notify},
    time::Instant,
};
use tracing::{error, info, warn};

use self::{hold::StartupHold, sockets::Sockets};
use crate::{
    admin::{self, Access, LogControl, Status},
    authz,
    config::{source, Args},
    handover::{self, HandoverServer},
    identity::{CaClient, CaSource, CertManager, LocalCa},
    metrics::{kernel::KernelCounters, scrape::Scrape, Metrics},
    proxy::{
        direct::DirectFlows,
        hbone::{
            pool::Pool,
            server::{Admission, Limits},
        },
        tracker::Tracker,
        workers::{self, Workers},
        Drain, Proxy,
    },
    redirect::{
        self,
        netlink::{self, Event, Netlink},
        Capture, CapturePlan, CaptureStatus, Topology,
    },
    state::Snapshot,
    tls::TlsContext,
};

/// How long a start waits for its first certificates before it says ready.
const FIRST_CERTIFICATES_WAIT: Duration = Duration::from_secs(10);
/// How often certificates are checked for renewal (and readiness redone).
const CERT_TICK: Duration = Duration::from_secs(1);
/// Capture follows the kernel's link and route events; this slower pass is
/// a safety net for an event lost to a full netlink buffer.
const RESYNC: Duration = Duration::from_secs(30);
/// How often capture checks it still runs first at each hook it holds (no
/// kernel event says another program was attached in front of it).
const ORDER_CHECK: Duration = Duration::from_secs(2);
/// Events come in bursts (a pod's veth, its state, its route): one sync per
/// burst, and at most one per [`EVENT_SYNC_INTERVAL`] under churn (a sync
/// reads every link and route). Until it runs, the egress guard and the
/// enrolled-pods map keep what capture has not seen from passing.
const EVENT_DEBOUNCE: Duration = Duration::from_millis(10);
const EVENT_SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// How long a start waits for a draining ztunnel to release the ports.
const BIND_PATIENCE: Duration = Duration::from_secs(10);

/// Why the main loop ended.
enum Stop {
    Signal,
    Quit,
    HandedOver,
}

/// The kernel side: capture, and the netlink view it is synced from.
struct Kernel {
    capture: Capture,
    netlink: Netlink,
    uplinks: Vec<String>,
    /// Errors of the last sync, so each is logged when it appears.
    last_errors: Vec<String>,
    /// Bridged pods' ports, as found so far (see `Topology::learned_ports`).
    learned_ports: std::collections::BTreeMap<Ipv4Addr, u32>,
    /// New pods' veths as the CNI plugin reported them; they override what
    /// was learned.
    host_veths: watch::Receiver<crate::k8s::HostVeths>,
}

impl Kernel {
    /// Reads the node's links and routes and brings capture in line with
    /// `snapshot`.
    async fn sync(&mut self, snapshot: &Snapshot) -> anyhow::Result<CaptureStatus> {
        let mut topology = self.netlink.topology().await?;
        for (ip, veth) in self.host_veths.borrow().iter() {
            if let Some(port) = topology
                .link_by_name(veth)
                .filter(|l| l.controller.is_some())
            {
                self.learned_ports.insert(*ip, port.interface.index);
            }
        }
        topology.learned_ports = self.learned_ports.clone();
        let plan = snapshot.capture_plan(&self.uplinks);
        topology.learn_ports(plan.pods.iter().map(|p| p.ip), &mut self.learned_ports);
        solicit_unknown_ports(&topology, &plan);
        let mut mark_errors = Vec::new();
        for pod in &plan.pods {
            // The device the pod's packets enter the node's routing on: its
            // veth, or the bridge it sits behind.
            let Some(link) = topology
                .pod_interface(pod.ip)
                .or_else(|| topology.bridged_pod(pod.ip).map(|b| b.bridge))
                .and_then(|i| topology.link_by_index(i.index))
            else {
                continue;
            };
            if !link.src_valid_mark {
                if let Err(e) = self
                    .netlink
                    .enable_src_valid_mark(link.interface.index)
                    .await
                {
                    // Capture works without it; flows that predate a pod's
                    // enrollment do not.
                    mark_errors.push(format!("pod {}: src_valid_mark: {e}", pod.ip));
                }
            }
        }
        let mut status = tokio::task::block_in_place(|| self.capture.sync(&plan, &topology));
        status.errors.extend(mark_errors);
        // After the maps, so a pod's address is delivered locally only
        // once the listener lookup knows it as enrolled.
        let enrolled = plan
            .pods
            .iter()
            .filter(|p| p.enrolled)
            .map(|p| p.ip)
            .collect();
        if let Err(e) = self.netlink.set_catchall(&enrolled).await {
            status.errors.push(format!("catch-all routes: {e}"));
        }
        for e in status
            .errors
            .iter()
            .filter(|e| !self.last_errors.contains(e))
        {
            warn!(error = %e, "capture: not everything could be attached; the rest is in sync");
        }
        self.last_errors = status.errors.clone();
        Ok(status)
    }

    /// Puts the capture rules and route back if something removed them.
    async fn ensure_route(&self) {
        match self.netlink.repair_capture_route().await {
            Ok(false) => {}
            Ok(true) => warn!("ztunnel's capture routing was removed; reinstalled it"),
            Err(e) => error!(error = %e, "checking or reinstalling the capture routing failed"),
        }
    }
}

/// Runs ztunnel until SIGTERM, SIGINT, `/quitquitquit`, or a new ztunnel
/// taking over; then drains.
pub async fn run(args: Args, log_control: Arc<LogControl>) -> anyhow::Result<()> {
    // Everything that can be refused is checked before the kernel is touched.
    // With a control plane, this waits for its first complete push.
    let ca = ca_source(&args)?;
    let (captured_tx, captured_rx) = watch::channel(crate::k8s::Captured::new());
    let (host_veths_tx, host_veths) = watch::channel(crate::k8s::HostVeths::new());
    let watcher = match args.enroll_pods {
        true => Some(
            crate::k8s::start(
                &args.node_name,
                captured_rx,
                args.cni_socket.clone(),
                host_veths_tx,
            )
            .await?,
        ),
        false => None,
    };
    let feed = source::start(&args).await?;
    let feed = match watcher {
        Some(watcher) => crate::k8s::enroll(&args.node_name, feed, watcher).await?,
        None => feed,
    };
    let mut config_updates = feed.updates;
    let snapshot = Arc::new(Snapshot::new(
        &args.node_name,
        &args.trust_domain,
        &feed.initial,
    ));
    report_waypoints(&snapshot);
    let pin_dir = args.pin_dir();
    let workers = workers::count(args.worker_threads);
    let certs = CertManager::new(ca, args.workload_cert_ttl);
    let handover_path = args.handover_path();
    let admin_socket = args.admin_socket_path();
    let hold = StartupHold::from_env();
    let netlink = Netlink::connect()?;
    let mut topology = netlink.topology().await?;
    for name in &args.uplinks {
        if topology.link_by_name(name).is_none() {
            anyhow::bail!("--uplink {name}: no such interface in this network namespace");
        }
    }

    // Programs loaded; maps filled before any program of ours reads them.
    let mut capture = tokio::task::block_in_place(|| Capture::open(&pin_dir))?;
    // The ports of bridged pods an earlier ztunnel found: the node may
    // have forgotten the neighbour entries that named them.
    let learned_ports = capture.bridged_ports();
    topology.learned_ports = learned_ports.clone();
    let plan = snapshot.capture_plan(&args.uplinks);
    tokio::task::block_in_place(|| capture.sync_pods(&plan, &topology))?;
    sync_policy(&mut capture, &snapshot);
    hold.stage("programs loaded, maps filled").await;
    // The running ztunnel's listeners, if there is one: the very sockets
    // the programs already deliver to, so they go into our listener map
    // (a new one, after a map layout change) before our programs take the
    // links over. The running ztunnel serves on until we confirm.
    let mut takeover = tokio::task::block_in_place(|| handover::take_over(&handover_path))?;
    let taken = match &mut takeover {
        Some(t) => {
            info!(socket = %handover_path.display(), "took the listeners over from the running ztunnel");
            let sockets = Sockets::from_handover(std::mem::take(&mut t.listeners), workers)?;
            tokio::task::block_in_place(|| capture.publish_listeners(&sockets.capture_slots()))?;
            Some(sockets)
        }
        None => None,
    };
    // An earlier ztunnel's programs are replaced before we bind anything,
    // so no program but ours ever judges fresh sockets of ours.
    for e in tokio::task::block_in_place(|| capture.readopt(&topology)) {
        warn!(error = %e, "re-adopting a pinned link");
    }
    hold.stage("pinned links re-adopted").await;
    let sockets = match taken {
        Some(sockets) => sockets,
        None => bind_patiently(workers).await?,
    };
    hold.stage("listeners bound").await;
    netlink.install_capture_route().await?;
    hold.stage("capture route installed").await;
    tokio::task::block_in_place(|| capture.attach_listener_lookup())?;
    hold.stage("listener lookup attached").await;
    let mut kernel = Kernel {
        capture,
        netlink,
        uplinks: args.uplinks.clone(),
        last_errors: Vec::new(),
        learned_ports,
        host_veths,
    };
    let capture_status = kernel.sync(&snapshot).await?;
    log_status(&capture_status, &snapshot);
    hold.stage("capture attached").await;

    let (state_tx, state_rx) = watch::channel(snapshot.clone());
    let (drain_tx, drain_rx) = watch::channel(false);
    let drain = Drain {
        signal: drain_rx,
        tasks: tokio_util::task::TaskTracker::new(),
    };
    let metrics = Arc::new(Metrics::new(Some(Box::new(Scrape {
        state: state_rx.clone(),
        kernel: KernelCounters::open(&pin_dir)
            .map_err(|e| warn!(error = %e, "kernel counters unavailable to metrics"))
            .ok(),
        certs: certs.clone(),
        xds: feed.xds.clone(),
    }))));
    let shutdown = Arc::new(Notify::new());
    let status = Arc::new(Status {
        state: state_rx.clone(),
        certs: certs.clone(),
        capture: RwLock::new(CaptureStatus::default()),
        readiness: RwLock::new(Err("starting".into())),
        metrics: metrics.clone(),
        log_control,
        shutdown: shutdown.clone(),
        admin_socket: admin_socket.clone(),
        xds: feed.xds.clone(),
        captured: captured_tx,
    });
    certs.maintain(&snapshot.local_identities());
    publish(&status, capture_status);
    let handover_copies = sockets.handover_copies()?;
    let capture_slots = sockets.capture_slots();
    // Probes and scrapes are answered through a drain (readiness says 503);
    // the admin ports stop with the drain's start.
    let probe_tasks = [
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
    ];
    let admin_tasks = [
        tokio::spawn(admin::http::serve(
            "admin",
            sockets.admin,
            admin::admin_handler(status.clone(), Access::ReadOnly),
        )),
        tokio::spawn(admin::http::serve_unix(
            "admin-socket",
            bind_admin_socket(&admin_socket)?,
            admin::admin_handler(status.clone(), Access::Full),
        )),
    ];

    let tls = Arc::new(TlsContext::new(certs.clone(), &args.trust_domain)?);
    let limits = Limits {
        handshake_timeout: args.handshake_timeout,
        max_handshakes: args.max_handshakes,
        max_handshakes_per_source: args.max_handshakes_per_source,
        max_connections_per_peer: args.max_connections_per_peer,
        hbone_idle_timeout: args.hbone_idle_timeout,
        idle_timeout: args.idle_timeout,
    };
    let tracker = Arc::new(Tracker::default());
    let admission = Arc::new(Admission::new(&limits));
    // Each worker's own: called on the worker's runtime.
    let worker_proxy = {
        let (tracker, metrics, drain) = (tracker.clone(), metrics.clone(), drain.clone());
        move || {
            Arc::new(Proxy {
                pool: Pool::new(tls.clone()),
                tls: tls.clone(),
                limits,
                tracker: tracker.clone(),
                metrics: metrics.clone(),
                drain: drain.clone(),
                admission: admission.clone(),
            })
        }
    };
    // Same-node connections the kernel passes: reported from its events,
    // and re-checked here (also those an earlier ztunnel saw open).
    let direct = DirectFlows::new(metrics.clone());
    if let Some(ring) = kernel.capture.take_direct_events() {
        tokio::spawn(direct.clone().report(ring, state_rx.clone()));
    }
    tokio::task::block_in_place(|| direct.recheck(&snapshot, &mut kernel.capture));
    // Ready to receive: from here on the kernel delivers captured SYNs (they
    // wait in the accept queues for the instant until the proxy accepts).
    // Published while this function still owns the sockets.
    tokio::task::block_in_place(|| kernel.capture.publish_listeners(&capture_slots))?;
    let proxy_workers = Workers::start(sockets.proxy, workers, state_rx, worker_proxy)?;
    hold.stage("listeners published").await;

    // The next ztunnel asks here for our listeners.
    let (handed_over_tx, handed_over_rx) = oneshot::channel::<()>();
    let handover_server = HandoverServer::start(&handover_path, handover_copies, move || {
        let _ = handed_over_tx.send(());
    })?;
    // Everything is in place: the ztunnel we took over from may stop.
    if let Some(takeover) = takeover {
        if let Err(e) = takeover.confirm() {
            warn!(error = %e, "could not confirm the takeover to the previous ztunnel (gone already?)");
        }
    }

    // The first certificates before the word "ready", so that a probe right
    // after it passes. Bounded: a CA that does not answer must not hold the
    // start (the readiness probe says what is missing).
    certs
        .prefetch(&snapshot.local_identities(), FIRST_CERTIFICATES_WAIT)
        .await;
    status.update_readiness();
    info!(
        node = %args.node_name,
        pin_dir = %pin_dir.display(),
        admin_socket = %admin_socket.display(),
        workloads = snapshot.workloads.len(),
        local = snapshot.local_workloads().count(),
        probe = %status.readiness.read().map(|r| match &*r {
            Ok(()) => "passes".to_string(),
            Err(why) => format!("not yet: {why}"),
        }).unwrap_or_default(),
        "ready"
    );
    memory::release_startup_memory();

    let mut events = kernel_events();
    let mut resync_due: Option<Instant> = None;
    let mut last_event_sync = Instant::now();
    let mut config_source_alive = true;
    let mut cert_tick = tokio::time::interval(CERT_TICK);
    let mut resync_tick = tokio::time::interval(RESYNC);
    let mut order_tick = tokio::time::interval(ORDER_CHECK);
    let mut order_errors: Vec<String> = Vec::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut handed_over_rx = handed_over_rx;
    let stop = loop {
        tokio::select! {
            _ = cert_tick.tick() => {
                // Certificates due for renewal are requested here, ahead of use.
                certs.maintain(&state_tx.borrow().local_identities());
                status.update_readiness();
            }
            changed = config_updates.changed(), if config_source_alive => {
                if changed.is_err() {
                    error!("the configuration source stopped; the last configuration stays in force");
                    config_source_alive = false;
                    continue;
                }
                let Some(config) = config_updates.borrow_and_update().clone() else { continue };
                let snapshot = Arc::new(Snapshot::new(&args.node_name, &args.trust_domain, &config));
                info!(workloads = snapshot.workloads.len(), local = snapshot.local_workloads().count(), "configuration reloaded");
                report_waypoints(&snapshot);
                // New connections see the new snapshot before capture changes,
                // so a newly enrolled pod's first flow already finds its workload.
                state_tx.send_replace(snapshot.clone());
                // Then the kernel's share of policy: userspace already
                // denies what it newly denies, so nothing slips through.
                sync_policy(&mut kernel.capture, &snapshot);
                let closed = tracker.recheck(&snapshot)
                    + tokio::task::block_in_place(|| direct.recheck(&snapshot, &mut kernel.capture));
                if closed > 0 {
                    info!(closed, "live connections closed by the policy update");
                }
                certs.maintain(&snapshot.local_identities());
                match kernel.sync(&snapshot).await {
                    Ok(capture_status) => {
                        log_status(&capture_status, &snapshot);
                        publish(&status, capture_status);
                    }
                    Err(e) => error!(error = %e, "capture sync failed"),
                }
            }
            event = events.next() => match event {
                Some(Event::TopologyChanged) => {
                    resync_due.get_or_insert_with(|| {
                        (Instant::now() + EVENT_DEBOUNCE).max(last_event_sync + EVENT_SYNC_INTERVAL)
                    });
                }
                Some(Event::RoutingRemoved) => {
                    kernel.ensure_route().await;
                    resync_due.get_or_insert_with(Instant::now);
                }
                Some(Event::Lost) => {
                    warn!("kernel events were lost; resyncing capture");
                    kernel.ensure_route().await;
                    resync_due.get_or_insert_with(Instant::now);
                }
                None => {
                    warn!(every = ?RESYNC, "kernel link and route events stopped; capture resyncs on a timer only");
                    events = Box::pin(futures_util::stream::pending());
                }
            },
            _ = sleep_until(resync_due), if resync_due.is_some() => {
                resync_due = None;
                resync(&mut kernel, &state_tx, &status).await;
                last_event_sync = Instant::now();
            }
            _ = resync_tick.tick() => {
                // Also forgets same-node kernel connections the kernel no
                // longer holds.
                let snapshot = state_tx.borrow().clone();
                tokio::task::block_in_place(|| direct.recheck(&snapshot, &mut kernel.capture));
                kernel.ensure_route().await;
                resync(&mut kernel, &state_tx, &status).await;
            }
            _ = order_tick.tick() => {
                let (_, errors) = tokio::task::block_in_place(|| kernel.capture.keep_first());
                for e in errors.iter().filter(|e| !order_errors.contains(e)) {
                    warn!(error = %e, "capture could not be put back in front of another program");
                }
                order_errors = errors;
            }
            _ = tokio::signal::ctrl_c() => break Stop::Signal,
            _ = sigterm.recv() => break Stop::Signal,
            _ = shutdown.notified() => break Stop::Quit,
            Ok(()) = &mut handed_over_rx => break Stop::HandedOver,
        }
    };

    // Drain: stop offering and receiving, GOAWAY on HBONE, let connections finish.
    let why = match stop {
        Stop::Signal => "signal",
        Stop::Quit => "quitquitquit",
        Stop::HandedOver => "handed over to a new ztunnel",
    };
    // A new ztunnel may have taken the listeners at the last moment: then
    // they, and capture, are its own.
    let handed_over = handover_server.close() || matches!(stop, Stop::HandedOver);
    if !handed_over {
        // Now, not at exit: a ztunnel started during the drain binds its own.
        let _ = std::fs::remove_file(&admin_socket);
        if let Some(cni_socket) = &args.cni_socket {
            // New pods now fail their setup (and are retried) until a
            // ztunnel is back.
            let _ = std::fs::remove_file(cni_socket);
        }
        // From here the kernel drops new captured SYNs, before the
        // listeners close under any of them.
        if let Err(e) = tokio::task::block_in_place(|| kernel.capture.unpublish_listeners()) {
            error!(error = %e, "withdrawing the listeners from the kernel failed; the kernel drops SYNs to them once they close");
        }
    }
    info!(reason = why, deadline = ?args.drain_deadline, "draining");
    if let Ok(mut readiness) = status.readiness.write() {
        *readiness = Err("draining".into());
    }
    drain_tx.send_replace(true);
    for task in admin_tasks {
        task.abort();
    }
    if handed_over {
        // The new ztunnel accepts on these very sockets: answering its probes
        // with our 503 would be wrong.
        for task in &probe_tasks {
            task.abort();
        }
    }
    drain.tasks.close();
    match tokio::time::timeout(args.drain_deadline, drain.tasks.wait()).await {
        Ok(()) => info!("drained: every connection finished"),
        Err(_) => warn!(
            remaining = drain.tasks.len(),
            "drain deadline passed; closing the remaining connections"
        ),
    }
    tokio::task::block_in_place(|| proxy_workers.stop());
    for task in probe_tasks {
        task.abort();
    }
    if handed_over {
        info!("exiting; the new ztunnel serves capture");
    } else {
        // The capture route stays: without published listeners it delivers
        // nothing, and the next ztunnel needs it.
        info!("exiting; capture stays attached and fails closed until ztunnel returns");
    }
    Ok(())
}

async fn resync(kernel: &mut Kernel, state: &watch::Sender<Arc<Snapshot>>, status: &Status) {
    let snapshot = state.borrow().clone();
    match kernel.sync(&snapshot).await {
        Ok(capture_status) => publish(status, capture_status),
        Err(e) => warn!(error = %e, "capture resync failed"),
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// The kernel's link, route and rule events, or nothing if they cannot be
/// followed (capture then resyncs on the timer only).
fn kernel_events() -> Pin<Box<dyn Stream<Item = Event> + Send>> {
    match netlink::events() {
        Ok(events) => Box::pin(events),
        Err(e) => {
            warn!(error = %e, every = ?RESYNC, "cannot follow kernel link and route events; capture resyncs on a timer only");
            Box::pin(futures_util::stream::pending())
        }
    }
}

/// Binds fresh listeners, waiting for a draining ztunnel to release the
/// ports it is closing.
async fn bind_patiently(workers: usize) -> anyhow::Result<Sockets> {
    let deadline = Instant::now() + BIND_PATIENCE;
    loop {
        match Sockets::bind(workers) {
            Ok(sockets) => return Ok(sockets),
            Err(e)
                if Instant::now() < deadline
                    && e.chain().any(|c| {
                        c.downcast_ref::<std::io::Error>()
                            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
                    }) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The root-only admin socket.
fn bind_admin_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let err = |e: std::io::Error| anyhow::anyhow!("admin socket {}: {e}", path.display());
    handover::private_dir(path).map_err(err)?;
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

fn publish(status: &Status, capture: CaptureStatus) {
    let captured: crate::k8s::Captured = capture
        .pods
        .iter()
        .filter(|p| p.enrolled && p.captured)
        .map(|p| (p.ip, p.interface.clone()))
        .collect();
    if let Ok(mut c) = status.capture.write() {
        *c = capture;
    }
    status.update_readiness();
    status.captured.send_if_modified(|c| {
        let differs = *c != captured;
        *c = captured;
        differs
    });
}

/// Where certificates come from: the control plane's CA when there is one
/// (no CA key is read then), else the local CA.
fn ca_source(args: &Args) -> anyhow::Result<CaSource> {
    match args.ca_endpoint() {
        Some(_) if args.ca_dir.is_some() => anyhow::bail!(
            "--ca-dir (ZTUNNEL_CA_DIR) and a control plane's CA (CA_ADDRESS or XDS_ADDRESS) are alternatives: a node that gets its certificates from the control plane must not hold a CA key"
        ),
        Some(endpoint) => {
            std::fs::metadata(&endpoint.root_cert)
                .map_err(|e| anyhow::anyhow!("CA_ROOT_CA {}: {e}", endpoint.root_cert.display()))?;
            info!(address = %endpoint.address, "certificates come from the control plane's CA");
            Ok(CaSource::Remote(CaClient::new(endpoint)))
        }
        None => Ok(CaSource::Local(load_ca(args)?)),
    }
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
pub async fn uninstall(args: &Args) -> anyhow::Result<()> {
    let pin_dir = args.pin_dir();
    // Routing first: with the listener lookup gone, a catch-all route would
    // hand connections to pods to node services instead.
    Netlink::connect()?.remove_capture_route().await?;
    redirect::remove_pins(&pin_dir)?;
    info!(pin_dir = %pin_dir.display(), "capture removed");
    Ok(())
}

/// Compiles the identity-free part of authorization into the kernel tables.
/// On failure the kernel gets an empty table instead (its previous entries
/// would keep denying what the new policies may allow); userspace enforces
/// the policy regardless, so the only cost is work the kernel does not save.
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
            error!(error = %e, "updating the kernel policy tables failed; the kernel now leaves every decision to userspace, which enforces the policy");
            if let Err(e) = tokio::task::block_in_place(|| capture.clear_policy()) {
                error!(error = %e, "clearing the kernel policy tables failed too");
            }
        }
    }
}

/// Names every waypoint the configuration cannot resolve: the traffic of
/// the services and workloads that name it is refused, not sent around it.
fn report_waypoints(snapshot: &Snapshot) {
    for problem in snapshot.waypoint_problems() {
        error!(error = %problem, "waypoint cannot be reached; connections that must pass it are refused");
    }
}

fn log_status(status: &CaptureStatus, snapshot: &Snapshot) {
    for pod in &status.pods {
        if pod.enrolled && !pod.captured {
            warn!(pod = %pod.ip, "enrolled workload has no veth yet; its traffic is dropped until capture attaches");
        }
    }
    for ip in snapshot.uncaptured_ipv6() {
        warn!(%ip, "IPv6 capture is not supported yet; this address is not captured");
    }
    info!(
        captured = status.pods.iter().filter(|p| p.captured).count(),
        attached = status.pods.iter().filter(|p| p.attached).count(),
        uplinks = ?status.uplinks,
        guarded = status.guarded.len(),
        "capture in sync"
    );
}

/// Makes the node resolve bridged pods whose port is not known (their
/// neighbour entry was flushed or collected): until it is, the pod's own
/// packets are refused as coming from nowhere. An empty UDP datagram to
/// the discard port makes the kernel ARP for the pod; its answer creates
/// the neighbour and forwarding entries, whose events bring a resync.
fn solicit_unknown_ports(topology: &Topology, plan: &CapturePlan) {
    let unknown: Vec<Ipv4Addr> = plan
        .pods
        .iter()
        .filter(|p| p.enrolled && topology.pod_interface(p.ip).is_none())
        .filter(|p| topology.bridged_pod(p.ip).is_some_and(|b| b.port.is_none()))
        .map(|p| p.ip)
        .collect();
    if unknown.is_empty() {
        return;
    }
    let Ok(socket) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return;
    };
    let _ = socket.set_nonblocking(true);
    for ip in unknown {
        let _ = socket.send_to(&[], (ip, 9));
    }
}
