//! Copying bytes both ways between a captured connection and its upstream,
//! counting them into metrics as they move.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use tokio::{
    io::AsyncWriteExt,
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpStream,
    },
};

use super::hbone::stream::H2Stream;

/// A direction's reads start this small, so a connection that moves a few
/// bytes now and then takes little memory while it does...
const INITIAL_BUFFER: usize = 256;
/// ...and grow to this when they fill their buffer, so bulk transfers take
/// few syscalls per byte. Either copy holds a buffer only while bytes are
/// there to read.
const MAX_BUFFER: usize = 256 * 1024;
/// Reads from TCP into HBONE grow further, to half the stream's window:
/// every read costs a hand-off between this task and the HTTP/2
/// connection's (h2 cuts it into frames of up to 1 MiB), so fewer, larger
/// reads are cheaper, until a read no longer fits in what the window
/// reopens at a time (h2 sends WINDOW_UPDATE once half of it is consumed)
/// and waits for it. One stream cross-node, five alternating rounds on one
/// lab, 5 s each: 1 MiB reads 7.95-8.34 Gbit/s, 2 MiB 8.20-8.50, 3 MiB
/// 7.03-7.63 (256 KiB had read 6.68-7.25 against 7.78-8.01 for 1 MiB). A
/// larger window with larger reads was slower still (8 MiB window, 2 or
/// 4 MiB reads: 7.7-7.9). The buffer goes to h2 whole; a quiet connection
/// holds none.
const MAX_H2_READ: usize = super::hbone::settings::STREAM_WINDOW as usize / 2;

/// Bytes moved by one relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    /// From the connection's initiator to its destination.
    pub sent: u64,
    /// From the destination back to the initiator.
    pub received: u64,
}

/// Where one connection's bytes are counted as they move: its own totals
/// (the access log's, and the idle check's) and each report's series.
#[derive(Default)]
pub struct Tally {
    request: AtomicU64,
    response: AtomicU64,
    request_counters: Vec<prometheus_client::metrics::counter::Counter>,
    response_counters: Vec<prometheus_client::metrics::counter::Counter>,
}

impl Tally {
    pub fn new(metrics: &[crate::metrics::ConnectionMetrics]) -> Self {
        Tally {
            request: AtomicU64::new(0),
            response: AtomicU64::new(0),
            request_counters: metrics.iter().map(|m| m.request_bytes.clone()).collect(),
            response_counters: metrics.iter().map(|m| m.response_bytes.clone()).collect(),
        }
    }

    /// Counts `n` bytes from the initiator (`request`) or back to it.
    fn add(&self, request: bool, n: u64) {
        let (own, counters) = if request {
            (&self.request, &self.request_counters)
        } else {
            (&self.response, &self.response_counters)
        };
        own.fetch_add(n, Ordering::Relaxed);
        for counter in counters {
            counter.inc_by(n);
        }
    }

    /// Bytes moved so far.
    pub fn transferred(&self) -> Transferred {
        Transferred {
            sent: self.request.load(Ordering::Relaxed),
            received: self.response.load(Ordering::Relaxed),
        }
    }
}

/// Copies between two TCP connections until both directions are finished.
/// When one side half-closes (sends FIN), the other side's write half is
/// shut down and the opposite direction keeps flowing until it ends too.
/// Bytes are added to `tally` as they are read, so long transfers show up
/// in metrics while they run. `downstream` is the connection's initiator.
pub async fn relay(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    tally: &Tally,
) -> io::Result<Transferred> {
    let (down_read, mut down_write) = downstream.split();
    let (up_read, mut up_write) = upstream.split();
    let (sent, received) = tokio::try_join!(
        one_way(&down_read, &mut up_write, tally, true),
        one_way(&up_read, &mut down_write, tally, false),
    )?;
    Ok(Transferred { sent, received })
}

/// Copies `from` into `to` until `from` ends, then shuts `to`'s write side
/// (passing the half-close on). `request`: `from` is the initiator's side.
///
/// A buffer exists only while `from` has bytes: it is taken when the socket
/// turns readable and dropped once a read finds it drained, so a quiet
/// connection holds none, also after a bulk transfer. Its size starts small
/// and grows while reads fill it; the size, not the buffer, is kept.
async fn one_way(
    from: &ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    tally: &Tally,
    request: bool,
) -> io::Result<u64> {
    let mut size = INITIAL_BUFFER;
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let mut buf = Vec::with_capacity(size);
        loop {
            buf.clear();
            let n = match from.try_read_buf(&mut buf) {
                Ok(n) => n,
                // Drained (or a spurious wakeup): give the buffer back.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            if n == 0 {
                to.shutdown().await?;
                return Ok(total);
            }
            tally.add(request, n as u64);
            total += n as u64;
            to.write_all(&buf).await?;
            if n == buf.capacity() && size < MAX_BUFFER {
                size = (size * 4).min(MAX_BUFFER);
                buf = Vec::with_capacity(size);
            }
        }
    }
}

/// Copies between a TCP connection and an HBONE stream without an
/// intermediate buffer on either side: bytes read from TCP go to HTTP/2 as
/// they are (`Bytes`, no copy), and DATA frames are written to TCP straight
/// from h2's buffers. `tcp_initiates` says which side opened the connection,
/// for the sent/received counters.
pub async fn relay_h2(
    tcp: &mut TcpStream,
    h2: &mut H2Stream,
    tally: &Tally,
    tcp_initiates: bool,
) -> io::Result<Transferred> {
    use bytes::BytesMut;

    let count = |from_tcp: bool, n: usize| tally.add(from_tcp == tcp_initiates, n as u64);
    let early = h2.sent_early();
    if early > 0 {
        count(true, early);
    }
    let (tcp_read, mut tcp_write) = tcp.split();
    let (send, recv) = h2.halves();
    let to_h2 = async {
        let mut total = early as u64;
        let mut size = INITIAL_BUFFER;
        loop {
            // A buffer only once there is something to read, and none kept
            // between reads (each read's bytes go to h2 whole): a quiet
            // connection holds none, whether it is new or has just moved
            // bulk (which grew its reads to MAX_H2_READ).
            tcp_read.readable().await?;
            let mut buf = BytesMut::with_capacity(size);
            let room = buf.capacity();
            let n = match tcp_read.try_read_buf(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                // END_STREAM is the tunnel's half-close.
                return match send.send_data(Bytes::new(), true) {
                    Ok(()) => Ok(total),
                    Err(e) if e.is_reset() || e.is_go_away() => Ok(total),
                    Err(e) => Err(super::hbone::stream::h2_to_io(e)),
                };
            }
            count(true, n);
            total += n as u64;
            if n == room && size < MAX_H2_READ {
                size = (size * 4).min(MAX_H2_READ);
            }
            let mut data = buf.freeze();
            while !data.is_empty() {
                send.reserve_capacity(data.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx)).await;
                let granted = match granted {
                    Some(Ok(n)) => n,
                    Some(Err(e)) => return Err(super::hbone::stream::h2_to_io(e)),
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "HBONE stream closed",
                        ))
                    }
                };
                if granted == 0 {
                    continue;
                }
                let chunk = data.split_to(granted.min(data.len()));
                send.send_data(chunk, false)
                    .map_err(super::hbone::stream::h2_to_io)?;
            }
        }
    };
    let from_h2 = async {
        let mut total = 0u64;
        while let Some(data) = recv.data().await {
            let data = data.map_err(super::hbone::stream::h2_to_io)?;
            let _ = recv.flow_control().release_capacity(data.len());
            count(false, data.len());
            total += data.len() as u64;
            tcp_write.write_all(&data).await?;
        }
        tcp_write.shutdown().await?;
        Ok::<_, io::Error>(total)
    };
    let (from_tcp, to_tcp) = tokio::try_join!(to_h2, from_h2)?;
    Ok(if tcp_initiates {
        Transferred {
            sent: from_tcp,
            received: to_tcp,
        }
    } else {
        Transferred {
            sent: to_tcp,
            received: from_tcp,
        }
    })
}

/// Closes a connection with an RST rather than a FIN, so the client sees a
/// refusal and not an empty reply.
pub fn reset(stream: TcpStream) {
    // Zero linger makes close() send RST at once (it never blocks).
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
