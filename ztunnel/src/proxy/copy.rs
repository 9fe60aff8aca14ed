//! Copying bytes both ways between a captured connection and its upstream,
//! counting them into metrics as they move.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use super::hbone::stream::H2Stream;

/// A direction's buffer starts this small, so the many connections that sit
/// idle cost little memory...
const INITIAL_BUFFER: usize = 256;
/// ...and grows to this when reads fill it, so bulk transfers take few
/// syscalls per byte.
const MAX_BUFFER: usize = 256 * 1024;

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

/// A stream that adds every byte read from it to a tally.
struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    tally: &'a Tally,
    /// Whether what is read here goes from the initiator to the destination.
    request: bool,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.tally.add(this.request, n);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Copies until both directions are finished. When one side half-closes
/// (sends FIN), the other side's write half is shut down and the opposite
/// direction keeps flowing until it ends too. Bytes are added to `tally`
/// as they are read, so long transfers show up in metrics while they run.
pub async fn relay<A, B>(
    downstream: &mut A,
    upstream: &mut B,
    tally: &Tally,
) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (down_read, down_write) = tokio::io::split(Counted {
        inner: downstream,
        tally,
        request: true,
    });
    let (up_read, up_write) = tokio::io::split(Counted {
        inner: upstream,
        tally,
        request: false,
    });
    let (sent, received) =
        tokio::try_join!(one_way(down_read, up_write), one_way(up_read, down_write))?;
    Ok(Transferred { sent, received })
}

/// Copies `from` into `to` until `from` ends, then shuts `to`'s write side
/// (passing the half-close on). The buffer grows only while reads fill it.
async fn one_way<R, W>(mut from: R, mut to: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; INITIAL_BUFFER];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
        if n == buf.len() && buf.len() < MAX_BUFFER {
            buf.resize((buf.len() * 4).min(MAX_BUFFER), 0);
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
            // bulk (which grew its reads to 256 KiB).
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
            if n == room && size < MAX_BUFFER {
                size = (size * 4).min(MAX_BUFFER);
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
