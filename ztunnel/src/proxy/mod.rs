//! The userspace data path: transparent listeners for captured connections,
//! HBONE tunnels between nodes, and the byte copying in between.
//!
//! - [`outbound`] (15001): connections leaving an enrolled pod: tunnelled to
//!   mesh destinations, relayed directly to others;
//! - [`inbound`] (15006): plaintext connections entering an enrolled pod;
//! - [`hbone`] (15008 and the client side): mTLS HTTP/2 CONNECT tunnels;
//! - [`relay`]: connecting and copying, shared by the listeners;
//! - [`socket`]: transparent listeners and spoofed-source connects;
//! - [`copy`]: the bidirectional copy, half-close included;
//! - [`workers`]: the threads that serve them, one per core, each with its
//!   own runtime, listeners and HBONE pool;
//! - [`direct`]: same-node connections the kernel passed with no proxy,
//!   reported and re-checked here.

pub mod copy;
pub mod direct;
pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod relay;
pub mod socket;
pub mod tracker;
pub mod workers;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::watch;
use ztunnel_common::ports::{INBOUND_HBONE, INBOUND_PLAINTEXT, OUTBOUND_CAPTURE};

use crate::{metrics::Metrics, tls::TlsContext};

/// How long a relay waits for its upstream to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler of one worker shares. Each worker has
/// its own (its own HBONE pool, whose connections live on its runtime);
/// the rest is the node's, shared through `Arc`s.
pub struct Proxy {
    pub tls: Arc<TlsContext>,
    pub pool: Arc<hbone::pool::Pool>,
    pub limits: hbone::server::Limits,
    /// Allowed inbound connections, re-checked when policies change.
    pub tracker: Arc<tracker::Tracker>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    /// Bounds on HBONE peers, shared by every worker's 15008 listener.
    pub admission: Arc<hbone::server::Admission>,
}

/// Graceful shutdown: once `signal` turns true, listeners stop accepting
/// and HBONE connections send GOAWAY; `tasks` holds every connection so
/// the shutdown can wait for them, up to a deadline.
#[derive(Clone)]
pub struct Drain {
    pub signal: watch::Receiver<bool>,
    pub tasks: tokio_util::task::TaskTracker,
}

/// One worker's share of the capture listeners: a socket per capture port,
/// each a member of that port's `SO_REUSEPORT` group (see
/// [`socket::transparent_listener`]). Plain std sockets until a worker
/// serves them: a tokio socket belongs to the runtime that registers it.
pub struct ListenerSet {
    pub outbound: std::net::TcpListener,
    pub inbound_plaintext: std::net::TcpListener,
    pub inbound_hbone: std::net::TcpListener,
}

impl ListenerSet {
    /// Binds one more member of each port's group.
    pub fn bind() -> std::io::Result<Self> {
        Ok(ListenerSet {
            outbound: socket::transparent_listener(OUTBOUND_CAPTURE)?,
            inbound_plaintext: socket::transparent_listener(INBOUND_PLAINTEXT)?,
            inbound_hbone: socket::transparent_listener(INBOUND_HBONE)?,
        })
    }
}

/// The capture listeners of one ztunnel, bound before capture is attached
/// so the first captured SYN already finds a socket: one set per worker.
pub struct Listeners {
    /// Never empty. The first set's sockets are the ones published to the
    /// kernel's listener map.
    pub sets: Vec<ListenerSet>,
}

impl Listeners {
    /// Binds `count` sets on all addresses; fails with `AddrInUse` while
    /// another process (a draining ztunnel) still listens on a capture port.
    pub fn bind(count: usize) -> std::io::Result<Self> {
        for port in CAPTURE_PORTS {
            socket::ensure_port_free(port)?;
        }
        let sets = (0..count.max(1))
            .map(|_| ListenerSet::bind())
            .collect::<std::io::Result<_>>()?;
        Ok(Listeners { sets })
    }

    /// Adds sets, joining the groups of the sets already here, until there
    /// are `count`. Listeners handed over by a ztunnel that did not set
    /// `SO_REUSEPORT` have no group to join: then the sets stay as they are.
    pub fn grow_to(&mut self, count: usize) -> std::io::Result<()> {
        while self.sets.len() < count {
            self.sets.push(ListenerSet::bind()?);
        }
        Ok(())
    }
}

const CAPTURE_PORTS: [u16; 3] = [OUTBOUND_CAPTURE, INBOUND_PLAINTEXT, INBOUND_HBONE];

/// Whether `port` is one of ztunnel's capture listeners.
pub fn is_capture_port(port: u16) -> bool {
    CAPTURE_PORTS.contains(&port)
}

/// Whether `addr` is one of ztunnel's own sockets on this node: a captured
/// connection to it would loop through ztunnel forever, so it is refused.
pub fn is_own_listener(addr: SocketAddr) -> bool {
    use ztunnel_common::ports;
    (is_capture_port(addr.port())
        || [ports::ADMIN, ports::METRICS, ports::READINESS].contains(&addr.port()))
        && socket::is_local_address(addr.ip())
}
