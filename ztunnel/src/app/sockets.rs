//! Every socket ztunnel listens on, as one unit: bound fresh, or taken over
//! from a running ztunnel.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

use anyhow::Context;
use tokio::net::TcpListener;
use ztunnel_common::{listener_index, ports};

use crate::{
    handover,
    proxy::{ListenerSet, Listeners},
};

pub struct Sockets {
    pub proxy: Listeners,
    pub admin: TcpListener,
    pub metrics: TcpListener,
    pub readiness: TcpListener,
}

impl Sockets {
    /// Binds every socket, with `workers` sets of capture listeners.
    pub fn bind(workers: usize) -> anyhow::Result<Self> {
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
            proxy: Listeners::bind(workers).context(
                "binding the capture listeners (is another ztunnel running here without a handover socket?)",
            )?,
            admin: plain(SocketAddr::from(([127, 0, 0, 1], ports::ADMIN)), false)?,
            metrics: plain(SocketAddr::from(([0, 0, 0, 0], ports::METRICS)), true)?,
            readiness: plain(SocketAddr::from(([0, 0, 0, 0], ports::READINESS)), true)?,
        })
    }

    /// The sockets a running ztunnel handed over: every set of capture
    /// listeners it had (`outbound`, `outbound.1`, ...), then more sets,
    /// joining their groups, up to `workers`.
    pub fn from_handover(fds: Vec<(String, OwnedFd)>, workers: usize) -> anyhow::Result<Self> {
        let mut by_name: std::collections::HashMap<String, OwnedFd> = fds.into_iter().collect();
        fn take_std(
            by_name: &mut std::collections::HashMap<String, OwnedFd>,
            name: &str,
        ) -> anyhow::Result<std::net::TcpListener> {
            let fd = by_name
                .remove(name)
                .ok_or_else(|| anyhow::anyhow!("the running ztunnel did not hand over `{name}`"))?;
            Ok(std::net::TcpListener::from(fd))
        }
        let mut sets = Vec::new();
        loop {
            let suffix = set_suffix(sets.len());
            let outbound = format!("outbound{suffix}");
            if !sets.is_empty() && !by_name.contains_key(&outbound) {
                break;
            }
            sets.push(ListenerSet {
                outbound: take_std(&mut by_name, &outbound)?,
                inbound_plaintext: take_std(&mut by_name, &format!("inbound_plaintext{suffix}"))?,
                inbound_hbone: take_std(&mut by_name, &format!("inbound_hbone{suffix}"))?,
            });
        }
        let mut proxy = Listeners { sets };
        let handed = proxy.sets.len();
        if let Err(e) = proxy.grow_to(workers) {
            tracing::warn!(
                handed_over = handed,
                workers,
                error = %e,
                "could not add capture listeners to those handed over (was the running ztunnel's not SO_REUSEPORT?): fewer workers serve until a restart without a handover"
            );
        }
        let mut take = |name: &str| -> anyhow::Result<TcpListener> {
            let std = take_std(&mut by_name, name)?;
            std.set_nonblocking(true)?;
            Ok(TcpListener::from_std(std)?)
        };
        Ok(Sockets {
            proxy,
            admin: take("admin")?,
            metrics: take("metrics")?,
            readiness: take("readiness")?,
        })
    }

    /// Copies of every listener, named, for the handover server to own.
    pub fn handover_copies(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        let mut copies = Vec::new();
        for (i, set) in self.proxy.sets.iter().enumerate() {
            let suffix = set_suffix(i);
            for (name, listener) in [
                ("outbound", &set.outbound),
                ("inbound_plaintext", &set.inbound_plaintext),
                ("inbound_hbone", &set.inbound_hbone),
            ] {
                copies.push((format!("{name}{suffix}"), handover::dup(listener)?));
            }
        }
        for (name, listener) in [
            ("admin", &self.admin),
            ("metrics", &self.metrics),
            ("readiness", &self.readiness),
        ] {
            copies.push((name.to_string(), handover::dup(listener)?));
        }
        Ok(copies)
    }

    /// The capture listeners by `listener_index` slot, for the kernel: the
    /// first set's, whose groups take the rest along.
    pub fn capture_slots(&self) -> Vec<(u32, RawFd)> {
        let first = &self.proxy.sets[0];
        vec![
            (listener_index::OUTBOUND, first.outbound.as_raw_fd()),
            (
                listener_index::INBOUND_PLAINTEXT,
                first.inbound_plaintext.as_raw_fd(),
            ),
            (
                listener_index::INBOUND_HBONE,
                first.inbound_hbone.as_raw_fd(),
            ),
        ]
    }
}

/// How the handover names the listeners of set `i`: `outbound` for the
/// first (as ztunnels with one set named theirs), `outbound.1` after.
fn set_suffix(i: usize) -> String {
    if i == 0 {
        String::new()
    } else {
        format!(".{i}")
    }
}
