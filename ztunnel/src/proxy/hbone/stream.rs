//! One HBONE stream: the two halves of a CONNECT, plus whatever must live as
//! long as it does (the stream's place in the connection pool). The relay
//! (`proxy::copy::relay_h2`) moves bytes between it and TCP without an
//! intermediate buffer.

use std::io;

use bytes::Bytes;
use h2::{RecvStream, SendStream};

/// One HBONE stream's two halves.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Bytes of the TCP side sent with the CONNECT, before the relay began
    /// (the client's first flight); the relay counts them as its own.
    sent_early: usize,
    /// A guard that lives as long as the stream (pool accounting).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            sent_early: 0,
            _guard: None,
        }
    }

    /// Records that `n` bytes from the TCP side went with the CONNECT.
    pub fn with_sent_early(mut self, n: usize) -> Self {
        self.sent_early = n;
        self
    }

    /// Bytes from the TCP side sent before the relay began.
    pub fn sent_early(&self) -> usize {
        self.sent_early
    }

    /// The two halves, for copying.
    pub fn halves(&mut self) -> (&mut SendStream<Bytes>, &mut RecvStream) {
        (&mut self.send, &mut self.recv)
    }

    /// Keeps `guard` alive until the stream is dropped.
    pub fn with_guard(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }
}

/// An h2 error as an I/O error for the relay.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => io::Error::other("h2 I/O error"),
        }
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

/// An HBONE stream as a byte stream (`AsyncRead` + `AsyncWrite`), for code
/// that speaks a protocol inside the tunnel (the waypoint's HTTP) rather
/// than copying it. Shutting down writes END_STREAM, the tunnel's half-close.
pub struct H2Io {
    stream: H2Stream,
    /// Received bytes not yet read.
    pending: Bytes,
}

impl H2Io {
    pub fn new(stream: H2Stream) -> Self {
        H2Io {
            stream,
            pending: Bytes::new(),
        }
    }
}

impl tokio::io::AsyncRead for H2Io {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(self.stream.recv.poll_data(cx)) {
                // END_STREAM: the peer's half-close.
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    // The window reopens as bytes arrive here; what the
                    // reader has not taken yet is bounded by one frame.
                    let _ = self.stream.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }
}

impl tokio::io::AsyncWrite for H2Io {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.stream.send;
        loop {
            send.reserve_capacity(buf.len());
            match std::task::ready!(send.poll_capacity(cx)) {
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed",
                    )))
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(granted)) => {
                    let n = granted.min(buf.len());
                    send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        // h2 sends what it was given; its connection task does the writing.
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.stream.send.send_data(Bytes::new(), true) {
            // A stream already ended or reset has nothing left to close.
            Err(e) if e.is_io() => std::task::Poll::Ready(Err(h2_to_io(e))),
            _ => std::task::Poll::Ready(Ok(())),
        }
    }
}
