//! The userspace relay: transparent listeners for captured connections, and
//! the byte copying between a captured connection and its upstream.
//!
//! - [`outbound`] (15001): connections leaving an enrolled pod;
//! - [`inbound`] (15006): plaintext connections entering an enrolled pod;
//! - [`socket`]: transparent listeners and spoofed-source connects;
//! - [`relay`]: one relayed connection, shared by the listeners;
//! - [`copy`]: the bidirectional copy, half-close included.

pub mod copy;
pub mod inbound;
pub mod outbound;
pub mod relay;
pub mod socket;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};

use crate::state::Snapshot;

/// How long a relay waits for its upstream to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The listeners of one ztunnel, bound before capture is attached so the
/// first captured SYN already finds a socket.
pub struct Listeners {
    pub outbound: TcpListener,
    pub inbound_plaintext: TcpListener,
}

impl Listeners {
    /// Binds the transparent listeners on all addresses.
    pub fn bind() -> std::io::Result<Self> {
        use ztunnel_common::ports;
        Ok(Listeners {
            outbound: socket::transparent_listener(ports::OUTBOUND_CAPTURE)?,
            inbound_plaintext: socket::transparent_listener(ports::INBOUND_PLAINTEXT)?,
        })
    }

    /// Serves both listeners until the task is dropped.
    pub async fn serve(self, state: watch::Receiver<Arc<Snapshot>>) {
        let outbound = tokio::spawn(outbound::serve(self.outbound, state.clone()));
        let inbound = tokio::spawn(inbound::serve(self.inbound_plaintext, state));
        let _ = tokio::join!(outbound, inbound);
    }
}

/// Whether `addr` is one of ztunnel's own sockets on this node: a captured
/// connection to it would loop through ztunnel forever, so it is refused.
pub fn is_own_listener(addr: SocketAddr) -> bool {
    use ztunnel_common::ports;
    [
        ports::OUTBOUND_CAPTURE,
        ports::INBOUND_PLAINTEXT,
        ports::INBOUND_HBONE,
        ports::ADMIN,
        ports::METRICS,
        ports::READINESS,
    ]
    .contains(&addr.port())
        && socket::is_local_address(addr.ip())
}
