//! Copying bytes both ways between a captured connection and its upstream.

use tokio::{
    io::{copy_bidirectional_with_sizes, AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// Buffer per direction. Larger than tokio's 8 KiB default: fewer syscalls
/// per byte for bulk transfers.
const COPY_BUFFER: usize = 64 * 1024;

/// Bytes moved by one relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    /// From the connection's initiator to its destination.
    pub sent: u64,
    /// From the destination back to the initiator.
    pub received: u64,
}

/// Copies until both directions are finished. When one side half-closes
/// (sends FIN), the other side's write half is shut down and the opposite
/// direction keeps flowing until it ends too.
pub async fn relay<A, B>(downstream: &mut A, upstream: &mut B) -> std::io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (sent, received) = copy_bidirectional_with_sizes(downstream, upstream, COPY_BUFFER, COPY_BUFFER).await?;
    Ok(Transferred { sent, received })
}

/// Closes a connection with an RST rather than a FIN, so the client sees a
/// refusal and not an empty reply.
pub fn reset(stream: TcpStream) {
    // Zero linger makes close() send RST at once (it never blocks).
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
