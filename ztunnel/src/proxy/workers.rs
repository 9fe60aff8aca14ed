//! The data path's threads: one per core, each running its own
//! single-threaded runtime over its own set of capture listeners, with its
//! own HBONE pool.
//!
//! A connection lives its whole life on the worker whose listener the
//! kernel picked for its SYN (by the flow's hash, in the port's
//! `SO_REUSEPORT` group): the accept, the tunnel's stream, the HTTP/2
//! connection that carries it and the copy all run on one thread. With one
//! shared multi-threaded runtime, each of those steps could wake a task
//! queued on the other thread, and a connection paid several cross-thread
//! wakeups (a futex or an eventfd write, then an `epoll_wait`) on each node;
//! measured A/B, the CPU per connection was about a fifth higher. What the
//! workers share (certificates, the configuration, policy rechecks,
//! metrics, the drain, the bounds on HBONE peers) is shared through `Arc`s
//! and locks, as before. This is Envoy's model: a worker per core, each
//! owning its listeners and its upstream connections.

use std::{sync::Arc, thread::JoinHandle};

use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{hbone, inbound, outbound, ListenerSet, Listeners, Proxy};
use crate::state::Snapshot;

/// More worker threads than this are not started (the handover passes every
/// listener in one message, and `SCM_RIGHTS` carries at most 253).
pub const MAX_WORKERS: usize = 64;

/// How many workers to run when asked for `requested` (0: one per core).
pub fn count(requested: usize) -> usize {
    let n = match requested {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    n.clamp(1, MAX_WORKERS)
}

/// The running workers; [`Workers::stop`] ends them.
pub struct Workers {
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts a worker per listener set (or fewer, each then serving
    /// several sets, when `count` is smaller). `proxy` makes a worker's
    /// [`Proxy`]; it is called on the worker's runtime, where the HBONE
    /// pool's housekeeping must run.
    pub fn start(
        listeners: Listeners,
        count: usize,
        state: watch::Receiver<Arc<Snapshot>>,
        proxy: impl Fn() -> Arc<Proxy> + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let count = count.clamp(1, listeners.sets.len());
        let mut shares: Vec<Vec<ListenerSet>> = (0..count).map(|_| Vec::new()).collect();
        for (i, set) in listeners.sets.into_iter().enumerate() {
            shares[i % count].push(set);
        }
        let stop = CancellationToken::new();
        let proxy = Arc::new(proxy);
        let mut threads = Vec::with_capacity(count);
        for (i, sets) in shares.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let stop = stop.clone();
            let state = state.clone();
            let proxy = proxy.clone();
            let thread = std::thread::Builder::new()
                .name(format!("zt-worker-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            // The accept loops end at the drain; the
                            // connections on this runtime still run until
                            // the stop.
                            _ = serve(sets, state, proxy()) => stop.cancelled().await,
                        }
                    });
                    // Dropping the runtime drops what is still running on it:
                    // by now the drain has let every connection finish, or
                    // its deadline has passed.
                })?;
            threads.push(thread);
        }
        Ok(Workers { stop, threads })
    }

    /// Stops every worker, closing its listeners and whatever connections
    /// it still holds, and waits for the threads to end.
    pub fn stop(self) {
        self.stop.cancel();
        for thread in self.threads {
            if thread.join().is_err() {
                error!("a proxy worker had panicked");
            }
        }
    }
}

/// Serves `sets` on the current (the worker's) runtime until they all stop
/// accepting, at the drain.
async fn serve(sets: Vec<ListenerSet>, state: watch::Receiver<Arc<Snapshot>>, proxy: Arc<Proxy>) {
    let mut loops = tokio::task::JoinSet::new();
    for set in sets {
        let (state, proxy) = (&state, &proxy);
        if let Some(l) = on_this_runtime(set.outbound, "outbound") {
            loops.spawn(outbound::serve(l, state.clone(), proxy.clone()));
        }
        if let Some(l) = on_this_runtime(set.inbound_plaintext, "inbound") {
            loops.spawn(inbound::serve(l, state.clone(), proxy.clone()));
        }
        if let Some(l) = on_this_runtime(set.inbound_hbone, "hbone") {
            loops.spawn(hbone::server::serve(l, state.clone(), proxy.clone()));
        }
    }
    while let Some(done) = loops.join_next().await {
        if let Err(e) = done {
            warn!(error = %e, "an accept loop ended abnormally");
        }
    }
}

/// `listener`, registered with the current runtime; `None` (logged) if it
/// cannot be: its accept queue then fills and its flows time out, while the
/// other members of its group still serve theirs.
fn on_this_runtime(listener: std::net::TcpListener, name: &str) -> Option<TcpListener> {
    listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map_err(|e| error!(listener = name, error = %e, "a capture listener cannot be served"))
        .ok()
}
