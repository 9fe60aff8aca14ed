//! The waypoint's upstream side: an endpoint of the chosen service, from the
//! same workload state ztunnel uses, reached over HBONE with the waypoint's
//! own identity (the destination's ztunnel then applies its L4 policy to
//! the waypoint, as Istio's does). HTTP connections inside those tunnels
//! are pooled per endpoint: HTTP/1.1 ones are reused once a response is
//! read to the end, an HTTP/2 one carries every request to its endpoint.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;
use ztunnel::{
    identity::Identity,
    proxy::hbone::{
        client::{self, Target},
        first_flight::FirstFlight,
        pool::Pool,
        stream::H2Io,
    },
    state::{Snapshot, Upstream},
};

/// Request and response bodies inside the waypoint.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP/1.1 connections kept idle per endpoint, and for how long.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
const IDLE_FOR: Duration = Duration::from_secs(60);

/// Why a request could not be sent, with Envoy's response flag for it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `UH`: the service has no healthy endpoint.
    #[error("no healthy upstream: {0}")]
    NoHealthy(String),
    /// `UF`: the tunnel or the HTTP connection could not be made.
    #[error("upstream connect error: {0}")]
    Connect(String),
    /// `UC`: the connection failed before a response came.
    #[error("upstream reset before headers: {0}")]
    Reset(String),
}

impl UpstreamError {
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::NoHealthy(_) => "UH",
            UpstreamError::Connect(_) => "UF",
            UpstreamError::Reset(_) => "UC",
        }
    }
}

/// What an upstream HTTP connection runs over: an HBONE stream or TCP.
pub trait ByteStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> ByteStream for T {}
type Io = TokioIo<Box<dyn ByteStream>>;

/// An idle HTTP/1.1 connection and since when it is idle.
type IdleH1 = (http1::SendRequest<Body>, Instant);

/// The endpoint pools.
pub struct Upstreams {
    pool: Arc<Pool>,
    /// The waypoint's identity: every tunnel it opens presents it.
    identity: Identity,
    /// The waypoint's own address, the tunnels' source.
    own_ip: IpAddr,
    baggage: String,
    h1: Mutex<HashMap<SocketAddr, Vec<IdleH1>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

impl Upstreams {
    pub fn new(pool: Arc<Pool>, identity: Identity, own_ip: IpAddr, baggage: String) -> Arc<Self> {
        let upstreams = Arc::new(Upstreams {
            pool,
            identity,
            own_ip,
            baggage,
            h1: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&upstreams);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_FOR / 4);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(upstreams) => upstreams.reap(),
                    None => return,
                }
            }
        });
        upstreams
    }

    /// An endpoint of the service `namespace/name` on service port `port`
    /// (round robin over its healthy endpoints, port mapping applied).
    pub fn pick(
        state: &Snapshot,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Result<Upstream, UpstreamError> {
        let service = state
            .services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
            .ok_or_else(|| UpstreamError::NoHealthy(format!("no service {namespace}/{name}")))?;
        let vip = service
            .vips
            .iter()
            .find(|v| v.address.is_ipv4())
            .or(service.vips.first())
            .ok_or_else(|| {
                UpstreamError::NoHealthy(format!("service {namespace}/{name} has no address"))
            })?;
        state
            .resolve(SocketAddr::new(vip.address, port))
            .ok_or_else(|| {
                UpstreamError::NoHealthy(format!(
                    "service {namespace}/{name} has no healthy endpoint for port {port}"
                ))
            })
    }

    /// Sends `request` to `upstream` over HTTP/2 when `h2`, else HTTP/1.1.
    pub async fn send(
        self: &Arc<Self>,
        state: &Snapshot,
        upstream: &Upstream,
        request: Request<Body>,
        h2: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // A kept connection can be closed by the backend (its keep-alive
        // ran out, a GOAWAY) just as it is reused: a request it never
        // wrote goes once more on a fresh connection. Whether it was
        // written, hyper says by handing it back.
        let mut request = request;
        let mut fresh = false;
        loop {
            let sent = if h2 {
                let mut sender = self.h2_sender(state, upstream, fresh).await?;
                sender.try_send_request(request).await
            } else {
                let mut sender = match self.idle_h1(upstream.addr).filter(|_| !fresh) {
                    Some(sender) => sender,
                    None => self.connect_h1(state, upstream).await?,
                };
                let sent = sender.try_send_request(request).await;
                if sent.is_ok() {
                    // Back to the pool once the response is read to its end.
                    let pools = self.clone();
                    let addr = upstream.addr;
                    tokio::spawn(async move {
                        if sender.ready().await.is_ok() {
                            pools.put_h1(addr, sender);
                        }
                    });
                }
                sent
            };
            match sent {
                Ok(response) => return Ok(response),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        debug!(upstream = %upstream.addr, error = %e.into_error(), "a kept connection was gone; sending on a fresh one");
                        request = unsent;
                        fresh = true;
                    }
                    _ => return Err(UpstreamError::Reset(e.into_error().to_string())),
                },
            }
        }
    }

    /// Closes what idled too long and forgets closed connections, so the
    /// pools follow the endpoints that are in use.
    fn reap(&self) {
        if let Ok(mut pools) = self.h1.lock() {
            pools.retain(|_, idle| {
                idle.retain(|(s, since)| !s.is_closed() && since.elapsed() < IDLE_FOR);
                !idle.is_empty()
            });
        }
        if let Ok(mut pools) = self.h2.lock() {
            pools.retain(|_, sender| !sender.is_closed());
        }
    }

    fn idle_h1(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut pools = self.h1.lock().ok()?;
        let idle = pools.get_mut(&addr)?;
        while let Some((sender, since)) = idle.pop() {
            if sender.is_ready() && since.elapsed() < IDLE_FOR {
                return Some(sender);
            }
        }
        None
    }

    fn put_h1(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        if let Ok(mut pools) = self.h1.lock() {
            let idle = pools.entry(addr).or_default();
            idle.retain(|(s, since)| !s.is_closed() && since.elapsed() < IDLE_FOR);
            if idle.len() < MAX_IDLE_PER_ENDPOINT {
                idle.push((sender, Instant::now()));
            }
        }
    }

    /// The endpoint's HTTP/2 connection; a new one when `fresh`.
    async fn h2_sender(
        &self,
        state: &Snapshot,
        upstream: &Upstream,
        fresh: bool,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let cached = self
            .h2
            .lock()
            .ok()
            .and_then(|m| m.get(&upstream.addr).cloned())
            .filter(|s| !fresh && s.is_ready());
        if let Some(sender) = cached {
            return Ok(sender);
        }
        let io = self.tunnel(state, upstream).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(format!("HTTP/2 to {}: {e}", upstream.addr)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        if let Ok(mut m) = self.h2.lock() {
            m.insert(upstream.addr, sender.clone());
        }
        Ok(sender)
    }

    async fn connect_h1(
        &self,
        state: &Snapshot,
        upstream: &Upstream,
    ) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let io = self.tunnel(state, upstream).await?;
        let (sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(format!("HTTP/1.1 to {}: {e}", upstream.addr)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    /// A byte stream to the endpoint: an HBONE tunnel from the waypoint's
    /// identity to a mesh workload; plain TCP to one outside the mesh (it
    /// has no 15008 to answer), as Istio's waypoint sends it.
    async fn tunnel(&self, state: &Snapshot, upstream: &Upstream) -> Result<Io, UpstreamError> {
        Ok(TokioIo::new(self.stream(state, upstream).await?))
    }

    /// The byte stream itself (see [`Self::tunnel`]), for TCP relayed as is.
    pub async fn stream(
        &self,
        state: &Snapshot,
        upstream: &Upstream,
    ) -> Result<Box<dyn ByteStream>, UpstreamError> {
        if !upstream.workload.hbone {
            let tcp = tokio::time::timeout(
                ztunnel::proxy::CONNECT_TIMEOUT,
                tokio::net::TcpStream::connect(upstream.addr),
            )
            .await
            .map_err(|_| {
                UpstreamError::Connect(format!("{} did not answer in time", upstream.addr))
            })?
            .map_err(|e| UpstreamError::Connect(format!("{}: {e}", upstream.addr)))?;
            let _ = tcp.set_nodelay(true);
            return Ok(Box::new(tcp));
        }
        let mut dst_id = upstream.service_sans.clone();
        dst_id.push(state.identity_of(&upstream.workload));
        let own = SocketAddr::new(self.own_ip, 0);
        let target = Target {
            src_id: self.identity.clone(),
            src: own,
            // The connection carries many clients' requests: the tunnel
            // names the waypoint; each request names its client in its
            // own headers.
            forwarded_for: own,
            dst_id,
            authority: upstream.addr,
            peer: SocketAddr::new(upstream.addr.ip(), ztunnel_common::ports::INBOUND_HBONE),
            baggage: self.baggage.clone(),
            service_host: None,
        };
        let stream = Box::pin(client::open(&self.pool, &target, &mut FirstFlight::none()))
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        Ok(Box::new(H2Io::new(stream)))
    }
}
