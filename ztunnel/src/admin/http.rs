//! A small HTTP/1.1 server for the admin, metrics and readiness ports, with
//! the limits a port reachable from every pod needs: bounded header size
//! (431 past it), a header read timeout, and bounded concurrent connections
//! where a new connection evicts the oldest one instead of being refused,
//! so that idle connections held by one pod cannot starve the kubelet's
//! probe or Prometheus's scrape. Also the same server on a Unix socket, for
//! the root-only admin socket.

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::oneshot,
};
use tracing::{debug, warn};

/// Request headers larger than this get 431.
const MAX_HEADER_BYTES: usize = 16 * 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once per port; past this the oldest is closed.
const MAX_CONNECTIONS: usize = 256;

pub type Reply = Response<Full<Bytes>>;
pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// A plain-text reply.
pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A JSON reply.
pub fn json(body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// 404 or 405, as fits: `allowed` lists the methods the path takes (empty:
/// no such path).
pub fn refuse(method: &Method, path: &str, allowed: &[Method]) -> Reply {
    if allowed.is_empty() {
        return text(StatusCode::NOT_FOUND, format!("no such path: {path}\n"));
    }
    let mut reply = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {path}\n"),
    );
    let allow = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = http::HeaderValue::from_str(&allow) {
        reply.headers_mut().insert(http::header::ALLOW, v);
    }
    reply
}

/// The connections a server holds, oldest first, each with the means to
/// close it.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Connections {
    /// Registers a new connection, closing the oldest when full. Returns
    /// its id and the signal that closes it.
    fn admit(&mut self, name: &str) -> (u64, oneshot::Receiver<()>) {
        if self.open.len() >= MAX_CONNECTIONS {
            if let Some((_, close)) = self.open.pop_front() {
                let _ = close.send(());
                debug!(server = name, "closed the oldest connection to make room");
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let (close, closed) = oneshot::channel();
        self.open.push_back((id, close));
        (id, closed)
    }

    fn forget(&mut self, id: u64) {
        self.open.retain(|(i, _)| *i != id);
    }
}

/// Serves `handler` on one accepted connection until it ends or `closed`
/// fires.
async fn serve_connection<S>(
    name: &'static str,
    peer: String,
    stream: S,
    handler: Handler,
    closed: oneshot::Receiver<()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = connection => {
            if let Err(e) = result {
                debug!(server = name, %peer, error = %e, "HTTP connection ended with an error");
            }
        }
        _ = closed => debug!(server = name, %peer, "connection closed to make room"),
    }
}

/// Serves `handler` on a TCP listener until the task is dropped.
pub async fn serve(name: &'static str, listener: TcpListener, handler: Handler) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    crate::accept::accept_until_drained(name, &listener, None, |stream, peer| {
        spawn_connection(
            name,
            peer.to_string(),
            stream,
            handler.clone(),
            &connections,
        );
    })
    .await
}

/// Serves `handler` on a Unix socket until the task is dropped, to peers
/// running as this process's user only.
pub async fn serve_unix(name: &'static str, listener: UnixListener, handler: Handler) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    crate::accept::accept_until_drained(name, &listener, None, |stream, _| {
        let peer = match stream.peer_cred() {
            Ok(cred) if cred.uid() == ours => format!("pid {:?} uid {}", cred.pid(), cred.uid()),
            Ok(cred) => {
                warn!(server = name, uid = cred.uid(), pid = ?cred.pid(), "refused a peer that is not this process's user");
                return;
            }
            Err(e) => {
                warn!(server = name, error = %e, "refused a peer whose credentials cannot be read");
                return;
            }
        };
        spawn_connection(name, peer, stream, handler.clone(), &connections);
    })
    .await
}

fn spawn_connection<S>(
    name: &'static str,
    peer: String,
    stream: S,
    handler: Handler,
    connections: &Arc<Mutex<Connections>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok((id, closed)) = connections.lock().map(|mut c| c.admit(name)) else {
        return;
    };
    let connections = connections.clone();
    tokio::spawn(async move {
        serve_connection(name, peer, stream, handler, closed).await;
        if let Ok(mut c) = connections.lock() {
            c.forget(id);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_server_closes_its_oldest_connection() {
        let mut c = Connections::default();
        let mut signals: Vec<_> = (0..MAX_CONNECTIONS).map(|_| c.admit("t").1).collect();
        assert!(signals.iter_mut().all(|s| s.try_recv().is_err()));
        let (_, newest) = c.admit("t");
        assert!(signals[0].try_recv().is_ok(), "the oldest was not closed");
        assert!(signals[1].try_recv().is_err());
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        c.forget(1);
        assert_eq!(c.open.len(), MAX_CONNECTIONS - 1);
        drop(newest);
    }
}
