//! A client's first bytes, sent on its tunnel while the CONNECT is answered
//! rather than a round trip after.
//!
//! Waiting for the peer's 200 before relaying costs a whole round trip to
//! the peer on every connection, and a write on each side: the CONNECT and
//! the first DATA go out and are read separately. Most clients write as
//! soon as `connect()` returns, so their first bytes are usually waiting
//! when the accept is handled; they then leave in the same TLS write as the
//! CONNECT. If they arrive later, but before the answer, they are sent as
//! they arrive.
//!
//! Nothing reaches the destination early: the peer holds DATA in the
//! stream's window and delivers it only once its checks pass and it has
//! answered 200. One read of at most [`MAX`] bytes is taken early, and kept
//! until the answer, so that a stream the peer refuses unprocessed can be
//! retried on a new connection with the same bytes.

use std::io;

use bytes::Bytes;
use tokio::{io::Interest, net::TcpStream};

/// The most one first flight carries: one HTTP/2 frame's worth.
pub const MAX: usize = 16 * 1024;

/// The first bytes of one client connection, for its tunnel.
pub struct FirstFlight<'a> {
    /// The client's connection, while its first bytes may still come.
    client: Option<&'a TcpStream>,
    /// What was read (sent on the stream, and again on a retry).
    bytes: Bytes,
}

impl<'a> FirstFlight<'a> {
    /// No early bytes: the tunnel's data starts after the answer (a
    /// waypoint's requests, which it writes itself once the tunnel is up).
    pub fn none() -> Self {
        FirstFlight {
            client: None,
            bytes: Bytes::new(),
        }
    }

    /// What `client` has already sent, taken without waiting; if nothing
    /// yet, [`FirstFlight::until`] watches for it. An error (the client
    /// reset) is returned: the socket reports it only once, so the relay
    /// would not see it.
    pub fn from_client(client: &'a TcpStream) -> io::Result<Self> {
        // Read directly: tokio has not polled the new socket's readiness
        // yet, so its `try_read` would answer `WouldBlock` without looking.
        match recv_now(client) {
            Ok(bytes) => Ok(FirstFlight {
                // Empty is end of stream: nothing more will come early.
                client: None,
                bytes,
            }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(FirstFlight {
                client: Some(client),
                bytes: Bytes::new(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The bytes taken so far (to send on a new stream).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Waits for `answer` while sending the client's first bytes on `send`
    /// as soon as they arrive, if they have not yet. A read error ends the
    /// watching (the relay meets what follows it); so does a failed send,
    /// whose cause the answer tells.
    pub async fn until<F: std::future::Future>(
        &mut self,
        answer: F,
        send: &mut h2::SendStream<Bytes>,
    ) -> F::Output {
        tokio::pin!(answer);
        while let Some(client) = self.client {
            tokio::select! {
                biased;
                answered = &mut answer => return answered,
                readable = client.readable() => {
                    if readable.is_err() {
                        self.client = None;
                        continue;
                    }
                    match client.try_io(Interest::READABLE, || recv_now(client)) {
                        Ok(bytes) => {
                            self.client = None;
                            if !bytes.is_empty() {
                                // Kept first: a refused stream is retried
                                // with them.
                                self.bytes = bytes.clone();
                                let _ = send.send_data(bytes, false);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => self.client = None,
                    }
                }
            }
        }
        answer.await
    }
}

/// One non-blocking read of up to [`MAX`] bytes: empty at end of stream,
/// `WouldBlock` when nothing has arrived. Copied out of a stack buffer so
/// that the connection keeps exactly what it read.
fn recv_now(client: &TcpStream) -> io::Result<Bytes> {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); MAX];
    let n = socket2::SockRef::from(client).recv(&mut buf)?;
    // SAFETY: recv initialised the first `n` bytes.
    let read = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
    Ok(Bytes::copy_from_slice(read))
}
