//! Telling a client connection's protocol from its first bytes: HTTP is
//! served as HTTP, anything else relayed as bytes.

use std::time::Duration;

use ztunnel::proxy::hbone::stream::H2Io;

/// What a client connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tcp,
}

/// Reads the first bytes of a client connection to tell HTTP (a method
/// token and a space; HTTP/2's preface starts `PRI `) from anything else.
/// A client that says nothing within `timeout` (a server-first protocol)
/// is TCP. What was read is handed back, to be read again.
pub async fn sniff(
    io: &mut H2Io,
    timeout: Duration,
) -> std::io::Result<(Protocol, bytes::BytesMut)> {
    use tokio::io::AsyncReadExt;
    let mut seen = bytes::BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(protocol) = classify(&seen) {
            return Ok((protocol, seen));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut seen)).await {
            // A partial method that stalls is a slow HTTP client, which
            // the header deadline deals with.
            Err(_) if !seen.is_empty() => return Ok((Protocol::Http, seen)),
            Err(_) | Ok(Ok(0)) => return Ok((Protocol::Tcp, seen)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// The longest method token taken for HTTP.
const MAX_METHOD: usize = 20;

fn classify(seen: &[u8]) -> Option<Protocol> {
    if seen.is_empty() {
        return None;
    }
    match seen.iter().position(|b| *b == b' ') {
        Some(n)
            if (1..=MAX_METHOD).contains(&n) && seen[..n].iter().all(u8::is_ascii_uppercase) =>
        {
            Some(Protocol::Http)
        }
        Some(_) => Some(Protocol::Tcp),
        None if seen.len() > MAX_METHOD || !seen.iter().all(u8::is_ascii_uppercase) => {
            Some(Protocol::Tcp)
        }
        None => None,
    }
}

/// A byte stream whose first bytes were already read: they are read again
/// first.
pub struct Prefixed<I> {
    prefix: bytes::BytesMut,
    inner: I,
}

impl<I> Prefixed<I> {
    pub fn new(prefix: bytes::BytesMut, inner: I) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How much of a client's unread upload is read and dropped after its
/// connection is done with (see [`Lingering`]), and for how long at most.
const LINGER_BYTES: usize = 1 << 20;
const LINGER_FOR: Duration = Duration::from_secs(2);

/// A tunnel that, when dropped before the client finished sending (a 431
/// or a 400 answered mid-upload), keeps reading and dropping what the
/// client still sends for a bounded while. Dropped at once, the unread
/// bytes would reset the stream, and the client's ztunnel would reset the
/// client's connection, maybe before the answer reached it: the lingering
/// close every HTTP server does.
pub struct Lingering(Option<H2Io>);

impl Lingering {
    pub fn new(io: H2Io) -> Self {
        Lingering(Some(io))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut io) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 16 * 1024];
            let mut left = LINGER_BYTES;
            let drain = async {
                while left > 0 {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => left = left.saturating_sub(n),
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER_FOR, drain).await;
        });
    }
}

impl tokio::io::AsyncRead for Lingering {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(io) => std::pin::Pin::new(io).poll_read(cx, buf),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

impl tokio::io::AsyncWrite for Lingering {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.0.as_mut() {
            Some(io) => std::pin::Pin::new(io).poll_write(cx, buf),
            None => std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(io) => std::pin::Pin::new(io).poll_flush(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(io) => std::pin::Pin::new(io).poll_shutdown(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, Protocol};

    #[test]
    fn http_is_told_from_other_protocols_by_its_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"GE"), None, "a method still arriving");
        assert_eq!(
            classify(b"\x16\x03\x01"),
            Some(Protocol::Tcp),
            "a TLS ClientHello"
        );
        assert_eq!(
            classify(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Some(Protocol::Tcp),
            "Postgres"
        );
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Tcp));
    }
}
