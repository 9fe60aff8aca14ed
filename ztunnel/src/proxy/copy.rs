//! Copying bytes both ways between a captured connection and its upstream,
//! counting them into metrics as they move.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

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

/// A stream that adds every byte read from it to some counters.
struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    sinks: &'a [Arc<crate::metrics::TcpCounters>],
    field: fn(&crate::metrics::TcpCounters) -> &AtomicU64,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            for sink in this.sinks {
                (this.field)(sink).fetch_add(n, Ordering::Relaxed);
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
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
/// direction keeps flowing until it ends too. Bytes are added to `sinks`
/// as they are read, so long transfers show up in metrics while they run.
pub async fn relay<A, B>(
    downstream: &mut A,
    upstream: &mut B,
    sinks: &[Arc<crate::metrics::TcpCounters>],
) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (down_read, down_write) = tokio::io::split(Counted {
        inner: downstream,
        sinks,
        field: |c| &c.sent,
    });
    let (up_read, up_write) = tokio::io::split(Counted {
        inner: upstream,
        sinks,
        field: |c| &c.received,
    });
    let (sent, received) = tokio::try_join!(one_way(down_read, up_write), one_way(up_read, down_write))?;
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

/// Closes a connection with an RST rather than a FIN, so the client sees a
/// refusal and not an empty reply.
pub fn reset(stream: TcpStream) {
    // Zero linger makes close() send RST at once (it never blocks).
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
