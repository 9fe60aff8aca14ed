//! Opening HBONE streams: the outbound half of the tunnel.

use std::{net::SocketAddr, sync::Arc};

use http::{Method, Request};

use super::{
    first_flight::FirstFlight,
    headers,
    pool::{Pool, PoolKey},
    status,
    stream::H2Stream,
};
use crate::{identity::Identity, tls::TlsError};

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS with {0}: {1}")]
    Tls(SocketAddr, String),
    #[error("HTTP/2 with {0}: {1}")]
    Http2(SocketAddr, String),
    #[error("{0} did not answer in time")]
    Timeout(SocketAddr),
    #[error("{peer} answered {status} to CONNECT {authority}")]
    Status {
        peer: SocketAddr,
        authority: SocketAddr,
        status: http::StatusCode,
    },
    #[error(transparent)]
    TlsConfig(#[from] TlsError),
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// Where a tunnel goes.
pub struct Target {
    /// The source workload's identity (its certificate is presented).
    pub src_id: Identity,
    /// The address the tunnel is opened from: the client pod's (ztunnel
    /// spoofs it), or the sender's own (a waypoint).
    pub src: SocketAddr,
    /// The client's address as it connected (the `forwarded` header): `src`,
    /// unless a waypoint forwards another client's request.
    pub forwarded_for: SocketAddr,
    /// Identities the destination may prove.
    pub dst_id: Vec<Identity>,
    /// The CONNECT authority: the destination pod and target port, or,
    /// through a waypoint, the address the client dialled (a service VIP).
    pub authority: SocketAddr,
    /// Where the tunnel's connection goes: the destination pod's HBONE
    /// port, or the waypoint's.
    pub peer: SocketAddr,
    /// `baggage` describing the source workload.
    pub baggage: String,
    /// The service hostname the client addressed, if it used a VIP.
    pub service_host: Option<String>,
}

/// Opens a CONNECT stream to `target` over a pooled connection, sending the
/// client's `first` bytes with it (see [`FirstFlight`]). A pooled
/// connection that refuses the stream before any answer (its peer is
/// draining and sent GOAWAY, or it just broke) is retired and the stream
/// retried once on a fresh connection, with the same first bytes: the
/// request never reached a server.
pub async fn open(
    pool: &Arc<Pool>,
    target: &Target,
    first: &mut FirstFlight<'_>,
) -> Result<H2Stream, HboneError> {
    let key = PoolKey {
        src_id: target.src_id.clone(),
        src: target.src.ip(),
        dst_id: target.dst_id.clone(),
        dst: target.peer,
    };
    match try_open(pool, &key, target, first).await {
        Err(Attempt::Refused(slot, e)) => {
            slot.retire_connection();
            drop(slot);
            tracing::debug!(dst = %key.dst, error = %e, "pooled connection refused a stream; retrying on a new one");
            try_open(pool, &key, target, first)
                .await
                .map_err(Attempt::into_error)
        }
        other => other.map_err(Attempt::into_error),
    }
}

/// Why one attempt failed.
enum Attempt {
    /// The connection refused the stream before the request was processed.
    Refused(super::pool::StreamSlot, HboneError),
    Failed(HboneError),
}

impl Attempt {
    fn into_error(self) -> HboneError {
        match self {
            Attempt::Refused(_, e) | Attempt::Failed(e) => e,
        }
    }
}

impl From<HboneError> for Attempt {
    fn from(e: HboneError) -> Self {
        Attempt::Failed(e)
    }
}

/// Whether `e` means the stream was never processed by the peer.
fn unprocessed(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_io()
}

async fn try_open(
    pool: &Arc<Pool>,
    key: &PoolKey,
    target: &Target,
    first: &mut FirstFlight<'_>,
) -> Result<H2Stream, Attempt> {
    let (send, slot) = pool.checkout(key).await?;
    let mut send = match send.ready().await {
        Ok(send) => send,
        Err(e) => {
            return Err(Attempt::Refused(
                slot,
                HboneError::Http2(key.dst, e.to_string()),
            ))
        }
    };
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.authority.to_string())
        .header(headers::FORWARDED, forwarded(target))
        .header(headers::BAGGAGE, target.baggage.as_str())
        .header(headers::TRACEPARENT, traceparent())
        .body(())
        .map_err(|_| HboneError::Internal("building the CONNECT request"))?;
    let (response, mut send_stream) = match send.send_request(request, false) {
        Ok(sent) => sent,
        Err(e) => {
            return Err(Attempt::Refused(
                slot,
                HboneError::Http2(key.dst, e.to_string()),
            ))
        }
    };
    if !first.bytes().is_empty() {
        // Queued behind the HEADERS before the connection task runs, so both
        // leave in one TLS write. Not reserved against the window: h2 holds
        // what the window does not yet allow, and this is one bounded read.
        // A failure here is the stream's, and the answer says which.
        let _ = send_stream.send_data(first.bytes().clone(), false);
    }
    let response = match first.until(response, &mut send_stream).await {
        Ok(response) => response,
        Err(e) if unprocessed(&e) => {
            return Err(Attempt::Refused(
                slot,
                HboneError::Http2(key.dst, e.to_string()),
            ))
        }
        Err(e) => return Err(Attempt::Failed(HboneError::Http2(key.dst, e.to_string()))),
    };
    if response.status() != status::OK {
        return Err(Attempt::Failed(HboneError::Status {
            peer: key.dst,
            authority: target.authority,
            status: response.status(),
        }));
    }
    Ok(H2Stream::new(send_stream, response.into_body())
        .with_guard(slot)
        .with_sent_early(first.bytes().len()))
}

/// `for="<client ip:port>"`, plus `;host=<service>` when a VIP was used.
fn forwarded(target: &Target) -> String {
    match &target.service_host {
        Some(host) => format!("for=\"{}\";host={host}", target.forwarded_for),
        None => format!("for=\"{}\"", target.forwarded_for),
    }
}

/// A W3C trace context header with fresh random ids, unsampled:
/// `00-<32 hex trace id>-<16 hex parent id>-00`. Written into one buffer:
/// this runs for every connection.
fn traceparent() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // The provider's generator is a static; building the provider to reach
    // it would allocate its suite lists on every call.
    static RANDOM: std::sync::LazyLock<&'static dyn rustls::crypto::SecureRandom> =
        std::sync::LazyLock::new(|| rustls::crypto::aws_lc_rs::default_provider().secure_random);
    let mut bytes = [0u8; 24];
    let _ = RANDOM.fill(&mut bytes);
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    for (i, b) in bytes.iter().enumerate() {
        if i == 16 {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out.push_str("-00");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(forwarded_for: &str, service_host: Option<&str>) -> Target {
        let id = Identity::new("cluster.local", "default", "a");
        Target {
            src_id: id.clone(),
            src: "10.0.0.1:40000".parse().unwrap(),
            forwarded_for: forwarded_for.parse().unwrap(),
            dst_id: vec![id],
            authority: "10.0.0.2:8080".parse().unwrap(),
            peer: "10.0.0.2:15008".parse().unwrap(),
            baggage: String::new(),
            service_host: service_host.map(str::to_string),
        }
    }

    #[test]
    fn forwarded_quotes_the_client_address() {
        assert_eq!(
            forwarded(&target("10.0.0.1:40000", None)),
            "for=\"10.0.0.1:40000\""
        );
    }

    #[test]
    fn forwarded_quotes_an_ipv6_client_in_brackets() {
        // RFC 7239: an IPv6 address with a port must be a quoted string.
        assert_eq!(
            forwarded(&target("[fd00::1]:40000", None)),
            "for=\"[fd00::1]:40000\""
        );
    }

    #[test]
    fn forwarded_names_the_service_host_when_a_vip_was_dialled() {
        assert_eq!(
            forwarded(&target(
                "10.0.0.1:40000",
                Some("echo.default.svc.cluster.local")
            )),
            "for=\"10.0.0.1:40000\";host=echo.default.svc.cluster.local"
        );
    }

    #[test]
    fn traceparent_is_a_fresh_unsampled_w3c_trace_context() {
        let a = traceparent();
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.len(), 4, "{a}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "00");
        for id in &parts[1..3] {
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(
                id.bytes().any(|b| b != b'0'),
                "an all-zero id is invalid: {a}"
            );
        }
        assert_ne!(traceparent(), a, "ids must be fresh each time");
    }
}
