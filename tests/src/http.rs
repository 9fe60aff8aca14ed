//! A minimal HTTP/1.1 client for ztunnel's admin, metrics and readiness
//! ports, run from inside a lab namespace.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends `request` (raw bytes, e.g. a whole HTTP request) to `addr` from
/// inside `ns` and reads the response until the server closes.
pub fn raw(ns: &Netns, addr: SocketAddr, request: Vec<u8>) -> Result<Response> {
    let mut stream =
        ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&request)?;
    let mut bytes = Vec::new();
    // The server may close without reading everything we sent (431): a
    // reset after the response still leaves the response readable.
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(Response { status, body })
}

/// `method path` with `Connection: close`.
pub fn request(ns: &Netns, addr: SocketAddr, method: &str, path: &str) -> Result<Response> {
    raw(
        ns,
        addr,
        format!("{method} {path} HTTP/1.1\r\nHost: ztunnel\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").into_bytes(),
    )
}

/// `GET path`.
pub fn get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<Response> {
    request(ns, addr, "GET", path)
}

/// The value of the Prometheus sample whose name is `name` and whose labels
/// include every `(key, value)` in `labels`; summed if several match.
pub fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !rest.starts_with('{') && !rest.starts_with(' ') {
            continue;
        }
        if !labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
        found = Some(found.unwrap_or(0.0) + value);
    }
    found
}
