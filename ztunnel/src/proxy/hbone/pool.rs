//! Pooled HBONE connections. Keyed as Istio's ztunnel keys them: source
//! identity and address, destination identities and address. A connection
//! carries up to [`settings::CLIENT_MAX_STREAMS`] streams; a full one is
//! left for a new one to the same key; an idle one is closed.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::{client::HboneError, settings};
use crate::{identity::Identity, proxy::socket, tls::TlsContext};

/// Connections unused for this long are closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on TCP connect + TLS + HTTP/2 handshakes of a new connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which connections may carry a stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_id: Identity,
    /// The pod's address the connection is opened from.
    pub src: IpAddr,
    /// Identities the destination may prove.
    pub dst_id: Vec<Identity>,
    /// `<destination pod ip>:15008`.
    pub dst: SocketAddr,
}

struct PooledConn {
    send: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    last_used: Mutex<Instant>,
    /// When the first of the two certificates it was opened with (ours and
    /// the peer's) expires. TLS checks them only at the handshake; from
    /// then on new streams go on a connection opened with current ones,
    /// while the streams already on it finish.
    valid_until: SystemTime,
}

impl PooledConn {
    fn expired(&self) -> bool {
        SystemTime::now() >= self.valid_until
    }

    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && !self.expired()
            && self.active.load(Ordering::Acquire) < settings::CLIENT_MAX_STREAMS
    }
}

/// Holds a stream's place on its connection; released on drop.
pub struct StreamSlot {
    active: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

impl StreamSlot {
    /// Takes the connection out of the pool: it refused a new stream (the
    /// peer is draining and sent GOAWAY, or it broke).
    pub fn retire_connection(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pool.
pub struct Pool {
    tls: Arc<TlsContext>,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    /// Serialises connection creation per key, so a burst of streams to one
    /// destination makes one connection, not one each.
    creating: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    opened: AtomicU64,
    /// Whether connections leave from the key's source address (a pod's,
    /// with `IP_TRANSPARENT`): ztunnel's; or from the sender's own: the
    /// waypoint's. Said explicitly: guessing from the address would go
    /// wrong on nodes with `ip_nonlocal_bind`.
    spoof_source: bool,
}

impl Pool {
    /// ztunnel's pool: connections leave from the client pod's address.
    pub fn new(tls: Arc<TlsContext>) -> Arc<Self> {
        Self::with_source(tls, true)
    }

    /// A pool whose connections leave from this host's own address (a
    /// waypoint's: it needs no `IP_TRANSPARENT`).
    pub fn from_own_address(tls: Arc<TlsContext>) -> Arc<Self> {
        Self::with_source(tls, false)
    }

    fn with_source(tls: Arc<TlsContext>, spoof_source: bool) -> Arc<Self> {
        let pool = Arc::new(Pool {
            tls,
            conns: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashMap::new()),
            opened: AtomicU64::new(0),
            spoof_source,
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(pool) => pool.evict_idle(),
                    None => return,
                }
            }
        });
        pool
    }

    /// A connection with room for one more stream, and the slot reserved on it.
    pub async fn checkout(
        &self,
        key: &PoolKey,
    ) -> Result<(SendRequest<Bytes>, StreamSlot), HboneError> {
        if let Some(found) = self.take_slot(key) {
            return Ok(found);
        }
        let gate = {
            let mut creating = self
                .creating
                .lock()
                .map_err(|_| HboneError::Internal("pool lock"))?;
            creating.entry(key.clone()).or_default().clone()
        };
        let _creating = gate.lock().await;
        // Someone else may have made one while we waited.
        if let Some(found) = self.take_slot(key) {
            return Ok(found);
        }
        // Boxed: dialing (certificate, TCP, TLS and HTTP/2 handshakes) is a
        // large future, and most streams find a pooled connection. Inline, it
        // would size every stream's open for the rare dial; the allocation
        // is short-lived, but at thousands of opens its size shows in RSS.
        let conn = Box::pin(self.connect(key)).await?;
        conn.active.fetch_add(1, Ordering::AcqRel);
        let found = (
            conn.send.clone(),
            StreamSlot {
                active: conn.active.clone(),
                closed: conn.closed.clone(),
            },
        );
        self.conns
            .lock()
            .map_err(|_| HboneError::Internal("pool lock"))?
            .entry(key.clone())
            .or_default()
            .push(conn);
        Ok(found)
    }

    fn take_slot(&self, key: &PoolKey) -> Option<(SendRequest<Bytes>, StreamSlot)> {
        let mut conns = self.conns.lock().ok()?;
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed.load(Ordering::Acquire) && !c.expired());
        let conn = list.iter().find(|c| c.usable())?;
        conn.active.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut t) = conn.last_used.lock() {
            *t = Instant::now();
        }
        Some((
            conn.send.clone(),
            StreamSlot {
                active: conn.active.clone(),
                closed: conn.closed.clone(),
            },
        ))
    }

    async fn connect(&self, key: &PoolKey) -> Result<Arc<PooledConn>, HboneError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(key))
            .await
            .map_err(|_| HboneError::Timeout(key.dst))?
    }

    async fn connect_inner(&self, key: &PoolKey) -> Result<Arc<PooledConn>, HboneError> {
        let (config, cert) = self
            .tls
            .client_config(&key.src_id, key.dst_id.clone())
            .await?;
        // From the source pod's address, so the destination sees the real
        // client (ztunnel spoofs it); a waypoint sends from its own.
        let spoofed = self.spoof_source.then_some(key.src);
        let tcp = socket::connect(spoofed, key.dst)
            .await
            .map_err(|e| HboneError::Connect(key.dst, e))?;
        let _ = socket::set_keepalive(&tcp);
        // No SNI, as Istio's ztunnel: identities, not names, are checked.
        let mut config = (*config).clone();
        config.enable_sni = false;
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(key.dst.ip().into()), tcp)
            .await
            .map_err(|e| HboneError::Tls(key.dst, e.to_string()))?;
        tls.get_mut()
            .1
            .set_buffer_limit(Some(settings::TLS_SEND_BUFFER));
        let peer_not_after = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(crate::tls::not_after);
        let valid_until = peer_not_after.map_or(cert.not_after, |p| p.min(cert.not_after));
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(settings::STREAM_WINDOW)
            .initial_connection_window_size(settings::CONNECTION_WINDOW)
            .max_frame_size(settings::MAX_FRAME_SIZE)
            .initial_max_send_streams(settings::CLIENT_MAX_STREAMS)
            .max_header_list_size(settings::CLIENT_MAX_HEADER_LIST)
            .max_send_buffer_size(settings::STREAM_WINDOW as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| HboneError::Http2(key.dst, e.to_string()))?;
        let closed = Arc::new(AtomicBool::new(false));
        let n = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        info!(src = %key.src, src_identity = %key.src_id, dst = %key.dst, cert_serial = %cert.serial, connections_opened = n, "HBONE connection established");
        {
            let closed = closed.clone();
            let dst = key.dst;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    debug!(%dst, error = %e, "HBONE connection ended");
                }
                closed.store(true, Ordering::Release);
            });
        }
        Ok(Arc::new(PooledConn {
            send,
            active: Arc::new(AtomicUsize::new(0)),
            closed,
            last_used: Mutex::new(Instant::now()),
            valid_until,
        }))
    }

    /// Drops connections that carry no stream and have not for a while; the
    /// HTTP/2 connection closes once its last handle is gone.
    fn evict_idle(&self) {
        let Ok(mut conns) = self.conns.lock() else {
            return;
        };
        for list in conns.values_mut() {
            list.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && c.last_used
                        .lock()
                        .map(|t| t.elapsed() > IDLE_TIMEOUT)
                        .unwrap_or(true);
                !idle && !c.closed.load(Ordering::Acquire)
            });
        }
        conns.retain(|_, list| !list.is_empty());
        if let Ok(mut creating) = self.creating.lock() {
            creating.retain(|k, _| conns.contains_key(k));
        }
    }
}
