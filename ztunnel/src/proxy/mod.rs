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

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};

use crate::{metrics::Metrics, state::Snapshot, tls::TlsContext};

/// How long a relay waits for its upstream to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection handler shares.
pub struct Proxy {
    pub tls: Arc<TlsContext>,
    pub pool: Arc<hbone::pool::Pool>,
    pub limits: hbone::server::Limits,
    /// Allowed inbound connections, re-checked when policies change.
    pub tracker: Arc<tracker::Tracker>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
}

/// Graceful shutdown: once `signal` turns true, listeners stop accepting
/// and HBONE connections send GOAWAY; `tasks` holds every connection so
/// the shutdown can wait for them, up to a deadline.
#[derive(Clone)]
pub struct Drain {
    pub signal: watch::Receiver<bool>,
    pub tasks: tokio_util::task::TaskTracker,
}

/// The listeners of one ztunnel, bound before capture is attached so the
/// first captured SYN already finds a socket.
pub struct Listeners {
    pub outbound: TcpListener,
    pub inbound_plaintext: TcpListener,
    pub inbound_hbone: TcpListener,
}

impl Listeners {
    /// Binds the transparent listeners on all addresses.
    pub fn bind() -> std::io::Result<Self> {
        use ztunnel_common::ports;
        Ok(Listeners {
            outbound: socket::transparent_listener(ports::OUTBOUND_CAPTURE)?,
            inbound_plaintext: socket::transparent_listener(ports::INBOUND_PLAINTEXT)?,
            inbound_hbone: socket::transparent_listener(ports::INBOUND_HBONE)?,
        })
    }

    /// Serves every listener until the task is dropped.
    pub async fn serve(self, state: watch::Receiver<Arc<Snapshot>>, proxy: Arc<Proxy>) {
        let outbound = tokio::spawn(outbound::serve(self.outbound, state.clone(), proxy.clone()));
        let inbound = tokio::spawn(inbound::serve(
            self.inbound_plaintext,
            state.clone(),
            proxy.clone(),
        ));
        let hbone = tokio::spawn(hbone::server::serve(self.inbound_hbone, state, proxy));
        let _ = tokio::join!(outbound, inbound, hbone);
    }
}

/// Whether `port` is one of ztunnel's capture listeners.
pub fn is_capture_port(port: u16) -> bool {
    use ztunnel_common::ports;
    [
        ports::OUTBOUND_CAPTURE,
        ports::INBOUND_PLAINTEXT,
        ports::INBOUND_HBONE,
    ]
    .contains(&port)
}

/// Whether `addr` is one of ztunnel's own sockets on this node: a captured
/// connection to it would loop through ztunnel forever, so it is refused.
pub fn is_own_listener(addr: SocketAddr) -> bool {
    use ztunnel_common::ports;
    (is_capture_port(addr.port())
        || [ports::ADMIN, ports::METRICS, ports::READINESS].contains(&addr.port()))
        && socket::is_local_address(addr.ip())
}
