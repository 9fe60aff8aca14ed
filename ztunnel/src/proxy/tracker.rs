//! Live inbound connections, remembered so a policy change can re-check
//! them: one no longer allowed is closed, and the close names the policy.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::oneshot;
use tracing::info;

use crate::{
    authz::{evaluate, Connection, Denial},
    state::{Snapshot, Workload},
};

struct Entry {
    conn: Connection,
    close: Option<oneshot::Sender<Denial>>,
}

/// The connections authorization allowed and that are still open.
#[derive(Default)]
pub struct Tracker {
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
}

/// An allowed connection's place in the tracker; dropping it forgets the
/// connection. `closed` fires when a policy change revokes it.
pub struct Registration {
    id: u64,
    tracker: Arc<Tracker>,
    pub closed: oneshot::Receiver<Denial>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut conns) = self.tracker.conns.lock() {
            conns.remove(&self.id);
        }
    }
}

impl Tracker {
    /// Decides `conn` to `workload`; when allowed, tracks it. The connection
    /// is registered before it is judged, so a policy change landing in
    /// between re-checks it too.
    pub fn authorize(
        self: &Arc<Self>,
        snapshot: &Snapshot,
        workload: &Workload,
        conn: Connection,
    ) -> Result<Registration, Denial> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(
                id,
                Entry {
                    conn: conn.clone(),
                    close: Some(tx),
                },
            );
        }
        let registration = Registration {
            id,
            tracker: self.clone(),
            closed: rx,
        };
        evaluate(&snapshot.policy_store, workload, &conn)?;
        Ok(registration)
    }

    /// Re-checks every tracked connection against `snapshot`; closes those no
    /// longer allowed. Returns how many were closed.
    pub fn recheck(&self, snapshot: &Snapshot) -> usize {
        let Ok(mut conns) = self.conns.lock() else {
            return 0;
        };
        let mut closed = 0;
        for entry in conns.values_mut() {
            let Some(workload) = snapshot.local_workload_by_ip(entry.conn.dst.ip()) else {
                continue;
            };
            if let Err(denial) = evaluate(&snapshot.policy_store, workload, &entry.conn) {
                if let Some(close) = entry.close.take() {
                    info!(
                        src = %entry.conn.src,
                        dst = %entry.conn.dst,
                        src_identity = %entry.conn.src_identity.as_ref().map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                        policy = %denial.policy(),
                        reason = %denial,
                        "connection closed: no longer allowed after a policy update"
                    );
                    let _ = close.send(denial);
                    closed += 1;
                }
            }
        }
        closed
    }
}
