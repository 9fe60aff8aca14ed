//! Every socket ztunnel listens on, as one unit: bound fresh, or taken over
//! from a running ztunnel.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

use anyhow::Context;
use tokio::net::TcpListener;
use ztunnel_common::{listener_index, ports};

use crate::{handover, proxy::Listeners};

pub struct Sockets {
    pub proxy: Listeners,
    pub admin: TcpListener,
    pub metrics: TcpListener,
    pub readiness: TcpListener,
}

impl Sockets {
    pub fn bind() -> anyhow::Result<Self> {
        // `shared`: a ztunnel that drains without a handover still answers
        // probes and scrapes on these ports (readiness says 503), and one
        // started meanwhile must not wait for it to exit, so both bind with
        // SO_REUSEPORT (the kernel allows it only to the same user).
        let plain = |addr: SocketAddr, shared: bool| -> anyhow::Result<TcpListener> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(shared)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into()).with_context(|| {
                format!(
                    "binding {addr} (is another ztunnel running here without a handover socket?)"
                )
            })?;
            socket.listen(1024)?;
            Ok(TcpListener::from_std(socket.into())?)
        };
        Ok(Sockets {
            proxy: Listeners::bind().context(
                "binding the capture listeners (is another ztunnel running here without a handover socket?)",
            )?,
            admin: plain(SocketAddr::from(([127, 0, 0, 1], ports::ADMIN)), false)?,
            metrics: plain(SocketAddr::from(([0, 0, 0, 0], ports::METRICS)), true)?,
            readiness: plain(SocketAddr::from(([0, 0, 0, 0], ports::READINESS)), true)?,
        })
    }

    pub fn from_handover(fds: Vec<(String, OwnedFd)>) -> anyhow::Result<Self> {
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

    /// Copies of every listener, named, for the handover server to own.
    pub fn handover_copies(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        [
            ("outbound", &self.proxy.outbound),
            ("inbound_plaintext", &self.proxy.inbound_plaintext),
            ("inbound_hbone", &self.proxy.inbound_hbone),
            ("admin", &self.admin),
            ("metrics", &self.metrics),
            ("readiness", &self.readiness),
        ]
        .into_iter()
        .map(|(name, listener)| Ok((name.to_string(), handover::dup(listener)?)))
        .collect()
    }

    /// The capture listeners by `listener_index` slot, for the kernel.
    pub fn capture_slots(&self) -> Vec<(u32, RawFd)> {
        vec![
            (listener_index::OUTBOUND, self.proxy.outbound.as_raw_fd()),
            (
                listener_index::INBOUND_PLAINTEXT,
                self.proxy.inbound_plaintext.as_raw_fd(),
            ),
            (
                listener_index::INBOUND_HBONE,
                self.proxy.inbound_hbone.as_raw_fd(),
            ),
        ]
    }
}
