//! The one accept loop every listener runs (the capture listeners, HBONE on
//! 15008, the admin, metrics and readiness ports, the admin socket, and the
//! waypoint's 15008): accept until draining, hand each connection on, and
//! back off on accept errors instead of spinning.

use std::{io, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::watch,
};
use tracing::{info, warn};

/// After a failed accept (EMFILE and friends), wait this long: retrying at
/// once would spin on the same error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A listening socket.
pub trait Listener {
    type Stream;
    type Peer;
    fn accept(&self) -> impl std::future::Future<Output = io::Result<(Self::Stream, Self::Peer)>>;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    type Peer = std::net::SocketAddr;
    async fn accept(&self) -> io::Result<(TcpStream, std::net::SocketAddr)> {
        TcpListener::accept(self).await
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    async fn accept(&self) -> io::Result<(UnixStream, tokio::net::unix::SocketAddr)> {
        UnixListener::accept(self).await
    }
}

/// Accepts on `listener` until `draining` turns true (with `None`, until
/// the task is dropped), handing each connection to `on_accept`, which
/// spawns whatever serves it. `name` is for the logs.
pub async fn accept_until_drained<L: Listener>(
    name: &'static str,
    listener: &L,
    mut draining: Option<watch::Receiver<bool>>,
    mut on_accept: impl FnMut(L::Stream, L::Peer),
) {
    loop {
        let accepted = match draining.as_mut() {
            Some(draining) => tokio::select! {
                accepted = listener.accept() => accepted,
                _ = draining.wait_for(|d| *d) => {
                    info!(listener = name, "stopped accepting: draining");
                    return;
                }
            },
            None => listener.accept().await,
        };
        match accepted {
            Ok((stream, peer)) => on_accept(stream, peer),
            Err(e) => {
                warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_until_draining_then_returns() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (drain_tx, drain_rx) = watch::channel(false);
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let serving = tokio::spawn(async move {
            accept_until_drained("test", &listener, Some(drain_rx), move |_, peer| {
                let _ = seen_tx.send(peer);
            })
            .await;
        });
        let client = TcpStream::connect(addr).await.expect("connect");
        let peer = seen_rx.recv().await.expect("accepted");
        assert_eq!(peer, client.local_addr().expect("local"));
        drain_tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("the loop returned once draining")
            .expect("no panic");
    }
}
