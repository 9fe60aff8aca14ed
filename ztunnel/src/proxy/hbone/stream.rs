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
    /// A guard that lives as long as the stream (pool accounting).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            _guard: None,
        }
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
