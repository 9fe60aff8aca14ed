//! Same-node connections the kernel passed with no proxy in the path (see
//! `ztunnel-ebpf/src/direct.rs`): what Istio users see of them must not
//! change, so their opens and closes, reported by the kernel on a ring
//! buffer, become the same `istio_tcp_*` series (reported as source and as
//! destination, as the userspace same-node path does) and the same access
//! log line, with `path=kernel`.
//!
//! A policy change re-checks them like the connections the tracker holds:
//! one no longer allowed is revoked in the kernel (its next packet either
//! way is answered with a reset), counted with Istio's `DENY` flag, and
//! logged with the policy that ended it. Both ends are then nudged into
//! sending that packet at once ([`nudge`]), so an idle connection ends too.

mod nudge;

use std::{
    borrow::Cow,
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::watch,
};
use tracing::{info, warn};
use ztunnel_common::{direct_event, direct_state, DirectEvent, DirectFlow, FlowKey};

use super::relay::OrDash;
use crate::{
    authz::{evaluate, Connection, Denial},
    identity::Identity,
    metrics::{ConnectionLabels, ConnectionMetrics, Metrics, Reporter, ResponseFlags},
    redirect::Capture,
    state::Snapshot,
};

/// A direct connection userspace has seen open.
struct Open {
    src_workload: String,
    dst_workload: String,
    src_identity: Option<Identity>,
    dst_identity: Option<Identity>,
    /// As source and as destination; empty if a workload was unknown.
    metrics: Vec<ConnectionMetrics>,
}

/// The direct connections open now, shared by the event reader and the
/// policy re-check.
pub struct DirectFlows {
    metrics: Arc<Metrics>,
    open: Mutex<HashMap<FlowKey, Open>>,
    /// `None` if the raw socket could not be made: revoked connections
    /// then end at their next packet.
    nudger: Option<nudge::Nudger>,
}

/// Why a direct connection ended.
enum Ending {
    /// Both FINs, or a reset, seen by the kernel.
    Closed,
    /// A policy change denies it now.
    Revoked(Denial),
    /// One of its pods is no longer a local mesh workload: no longer
    /// reported, but not cut.
    Gone,
    /// The kernel no longer holds it (its flow table reused the entry, or
    /// the close event was lost): its bytes are unknown.
    Lost,
}

impl DirectFlows {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        let nudger = nudge::Nudger::new()
            .map_err(|e| warn!(error = %e, "no raw socket: a revoked same-node kernel connection ends at its next packet, not at once"))
            .ok();
        Arc::new(DirectFlows {
            metrics,
            open: Mutex::new(HashMap::new()),
            nudger,
        })
    }

    /// Reads the kernel's events until the ring buffer fails.
    pub async fn report(
        self: Arc<Self>,
        ring: RingBuf<MapData>,
        state: watch::Receiver<Arc<Snapshot>>,
    ) {
        // SAFETY: the ring buffer owns its descriptor, which stays open for
        // as long as the AsyncFd (holding it) lives.
        let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
        let mut ring = match registered {
            Ok(ring) => ring,
            Err(e) => {
                warn!(error = %e, "same-node kernel connections cannot be reported (metrics, access log)");
                return;
            }
        };
        loop {
            let mut ready = match ring.readable_mut().await {
                Ok(ready) => ready,
                Err(e) => {
                    warn!(error = %e, "reading the kernel's same-node connection events failed");
                    return;
                }
            };
            let snapshot = state.borrow().clone();
            while let Some(item) = ready.get_inner_mut().next() {
                if item.len() < std::mem::size_of::<DirectEvent>() {
                    continue;
                }
                // SAFETY: the kernel wrote a whole `DirectEvent` (plain
                // integers, any bit pattern valid); read unaligned.
                let event =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DirectEvent>()) };
                self.handle(&snapshot, &event);
            }
            ready.clear_ready();
        }
    }

    fn handle(&self, snapshot: &Snapshot, event: &DirectEvent) {
        let key = FlowKey {
            saddr: event.saddr,
            daddr: event.daddr,
            sport: event.sport,
            dport: event.dport,
        };
        match event.kind {
            direct_event::OPENED => {
                let open = self.opened(snapshot, &key);
                if let Ok(mut flows) = self.open.lock() {
                    flows.insert(key, open);
                }
            }
            direct_event::CLOSED => self.closed(&key, &event.flow, Ending::Closed),
            _ => {}
        }
    }

    fn opened(&self, snapshot: &Snapshot, key: &FlowKey) -> Open {
        let (src, dst) = endpoints(key);
        let src_w = snapshot.local_workload_by_ip(src.ip());
        let dst_w = snapshot.local_workload_by_ip(dst.ip());
        let src_identity = src_w.map(|w| snapshot.identity_of(w));
        let dst_identity = dst_w.map(|w| snapshot.identity_of(w));
        let metrics = match (src_w, dst_w) {
            (Some(s), Some(d)) => [Reporter::Source, Reporter::Destination]
                .into_iter()
                .map(|reporter| {
                    self.metrics.open(ConnectionLabels::new(
                        snapshot,
                        reporter,
                        Some(s),
                        src_identity.as_ref(),
                        Some(d),
                        None,
                        true,
                    ))
                })
                .collect(),
            _ => Vec::new(),
        };
        let name = |w: Option<&Arc<crate::state::Workload>>| {
            w.map(|w| w.name.clone()).unwrap_or_else(|| "-".into())
        };
        Open {
            src_workload: name(src_w),
            dst_workload: name(dst_w),
            src_identity,
            dst_identity,
            metrics,
        }
    }

    /// Counts a direct connection's bytes and close, and writes its access
    /// log line.
    fn closed(&self, key: &FlowKey, flow: &DirectFlow, ending: Ending) {
        let open = self.open.lock().ok().and_then(|mut f| f.remove(key));
        let (src, dst) = endpoints(key);
        let Some(mut open) = open else {
            // Opened before this ztunnel started, or its open event was
            // lost: logged, not counted (its open was not).
            info!(target: "access", direction = "outbound", %src, %dst, path = "kernel", bytes_sent = flow.response_bytes, bytes_received = flow.request_bytes, "connection complete");
            return;
        };
        for m in &mut open.metrics {
            m.request_bytes.inc_by(flow.request_bytes);
            m.response_bytes.inc_by(flow.response_bytes);
        }
        let outcome: Cow<'static, str> = match &ending {
            Ending::Closed => "ok".into(),
            Ending::Revoked(denial) => {
                for m in &mut open.metrics {
                    m.fail(ResponseFlags::AuthorizationPolicyDenied);
                }
                format!("closed by policy {}: {denial}", denial.policy()).into()
            }
            Ending::Gone => "no longer reported: a workload left the mesh".into(),
            Ending::Lost => "ended unseen: the kernel's flow table no longer holds it".into(),
        };
        let duration = Duration::from_nanos(now_ns().saturating_sub(flow.opened_ns));
        info!(
            target: "access",
            direction = "outbound",
            src = %src,
            dst = %dst,
            src_workload = open.src_workload,
            dst_workload = open.dst_workload,
            src_identity = %OrDash(open.src_identity.as_ref()),
            dst_identity = %OrDash(open.dst_identity.as_ref()),
            path = "kernel",
            bytes_sent = flow.response_bytes,
            bytes_received = flow.request_bytes,
            duration_ms = duration.as_millis() as u64,
            outcome = %outcome,
            "connection complete"
        );
    }

    /// Re-checks every direct connection the kernel holds open against
    /// `snapshot`: one no longer allowed is revoked in the kernel and
    /// reported closed. One whose pod left the mesh is reported closed and
    /// left to run, as a proxied connection would be. One userspace saw
    /// open that the kernel no longer holds is reported too, so the record
    /// of open connections cannot grow without end. Returns how many were
    /// revoked or reported.
    pub fn recheck(&self, snapshot: &Snapshot, capture: &mut Capture) -> usize {
        let mut ended = 0;
        // What userspace saw open, before the kernel's map is read: a flow
        // opened in between is then in the map, not wrongly lost.
        let seen: Vec<FlowKey> = self
            .open
            .lock()
            .map(|open| open.keys().copied().collect())
            .unwrap_or_default();
        let in_kernel = capture.direct_flows();
        let held: std::collections::HashSet<FlowKey> = in_kernel.iter().map(|(k, _)| *k).collect();
        for key in seen.into_iter().filter(|k| !held.contains(k)) {
            self.closed(&key, &DirectFlow::default(), Ending::Lost);
            ended += 1;
        }
        for (key, flow) in in_kernel {
            if flow.state & (direct_state::CLOSED | direct_state::REVOKED) != 0 {
                continue;
            }
            let Err(ending) = still_allowed(snapshot, &key) else {
                continue;
            };
            let (src, dst) = endpoints(&key);
            let revoke = matches!(ending, Ending::Revoked(_));
            match capture.end_direct(&key, revoke) {
                Ok(Some(flow)) => {
                    if let Ending::Revoked(denial) = &ending {
                        info!(%src, %dst, policy = %denial.policy(), reason = %denial, path = "kernel", "connection closed: no longer allowed after a policy update");
                        self.nudge(src, dst);
                    }
                    self.closed(&key, &flow, ending);
                    ended += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(%src, %dst, error = %e, "revoking a same-node kernel connection failed")
                }
            }
        }
        ended
    }
}

impl DirectFlows {
    /// Makes both ends of a revoked connection send, to be reset now.
    fn nudge(&self, src: SocketAddr, dst: SocketAddr) {
        let (Some(nudger), SocketAddr::V4(src), SocketAddr::V4(dst)) = (&self.nudger, src, dst)
        else {
            return;
        };
        if let Err(e) = nudger.nudge(src, dst) {
            warn!(%src, %dst, error = %e, "nudging a revoked same-node connection failed; it ends at its next packet");
        }
    }
}

/// Whether a direct connection may go on under `snapshot`.
fn still_allowed(snapshot: &Snapshot, key: &FlowKey) -> Result<(), Ending> {
    let (src, dst) = endpoints(key);
    let local = |ip: IpAddr| {
        snapshot
            .local_workload_by_ip(ip)
            .filter(|w| snapshot.captures(w))
    };
    let (Some(src_w), Some(dst_w)) = (local(src.ip()), local(dst.ip())) else {
        return Err(Ending::Gone);
    };
    let conn = Connection {
        src,
        dst,
        src_identity: Some(snapshot.identity_of(src_w)),
    };
    evaluate(&snapshot.policy_store, dst_w, &conn).map_err(Ending::Revoked)
}

/// The connection's initiator and destination.
fn endpoints(key: &FlowKey) -> (SocketAddr, SocketAddr) {
    let addr = |ip: u32, port: u16| {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(ip.to_ne_bytes())),
            u16::from_be(port),
        )
    };
    (addr(key.saddr, key.sport), addr(key.daddr, key.dport))
}

/// `CLOCK_MONOTONIC`, the kernel's `bpf_ktime_get_ns`.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
