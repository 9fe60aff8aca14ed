//! Test traffic: a server that reports what it saw, and a client that checks it.
//!
//! The server reads each connection to its end (so the client's half-close is
//! exercised), then answers with the peer address it saw, the byte count and
//! the SHA-256 of what arrived, and closes.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::netns::Netns;

/// What the server reported about one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub peer: SocketAddr,
    pub bytes: u64,
    pub sha256: String,
}

impl Report {
    fn parse(line: &str) -> Result<Self> {
        let mut peer = None;
        let mut bytes = None;
        let mut sha256 = None;
        for field in line.split_whitespace() {
            match field.split_once('=') {
                Some(("peer", v)) => peer = Some(v.parse()?),
                Some(("bytes", v)) => bytes = Some(v.parse()?),
                Some(("sha256", v)) => sha256 = Some(v.to_string()),
                _ => {}
            }
        }
        Ok(Report {
            peer: peer.context("report without peer")?,
            bytes: bytes.context("report without bytes")?,
            sha256: sha256.context("report without sha256")?,
        })
    }
}

/// A server in a pod, recording every peer it accepted.
pub struct Server {
    pub addr: SocketAddr,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let accepted = accepted.clone();
            let stop = stop.clone();
            std::thread::spawn(move || accept_loop(listener, accepted, stop))
        };
        Ok(Server {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    /// Peers accepted so far.
    pub fn accepted(&self) -> Vec<SocketAddr> {
        self.accepted.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Ok(mut v) = accepted.lock() {
                    v.push(peer);
                }
                std::thread::spawn(move || {
                    let _ = serve_one(stream, peer);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve_one(mut stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    let digest = hex(&hasher.finalize());
    writeln!(stream, "peer={peer} bytes={bytes} sha256={digest}")?;
    stream.shutdown(Shutdown::Write)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A deterministic payload of `len` bytes, fed through `sink` in blocks.
/// Each block starts with its index, so reordered or repeated blocks change
/// the checksum.
fn payload(
    len: u64,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<String> {
    const BLOCK: usize = 1 << 20;
    let mut block = vec![0u8; BLOCK];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    let mut index = 0u64;
    while sent < len {
        block[..8].copy_from_slice(&index.to_le_bytes());
        let n = (len - sent).min(BLOCK as u64) as usize;
        hasher.update(&block[..n]);
        sink(&block[..n])?;
        sent += n as u64;
        index += 1;
    }
    Ok(hex(&hasher.finalize()))
}

/// A client connection opened from a pod, still open.
pub struct Connection {
    stream: TcpStream,
}

impl Connection {
    /// Connects from inside `ns`, giving up after `timeout`.
    pub fn open(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = ns
            .run(move || TcpStream::connect_timeout(&dst, timeout))?
            .with_context(|| format!("connecting to {dst} from {}", ns.name()))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Connection { stream })
    }

    /// Like [`Connection::open`], from source port `port` (reused at once,
    /// as a client that binds its port would).
    pub fn open_from_port(
        ns: &Netns,
        port: u16,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let stream = ns
            .run(move || -> std::io::Result<TcpStream> {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                let any: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, port).into();
                socket.bind(&any.into())?;
                socket.connect_timeout(&dst.into(), timeout)?;
                Ok(socket.into())
            })?
            .with_context(|| format!("connecting to {dst} from port {port} in {}", ns.name()))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Connection { stream })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// Sends `len` bytes, half-closes, reads the server's report and checks
    /// the server saw exactly what was sent.
    pub fn exchange(mut self, len: u64) -> Result<Report> {
        let sent_sha = payload(len, |b| self.stream.write_all(b)).context("sending payload")?;
        self.finish(len, sent_sha)
    }

    /// Sends `data` in `chunks` pieces, pausing `pause` between them, then
    /// half-closes and checks the server's report.
    pub fn exchange_slowly(
        mut self,
        data: &[u8],
        chunks: usize,
        pause: Duration,
    ) -> Result<Report> {
        let size = data.len().div_ceil(chunks.max(1)).max(1);
        for chunk in data.chunks(size) {
            self.stream.write_all(chunk).context("sending payload")?;
            std::thread::sleep(pause);
        }
        let sha = hex(&Sha256::digest(data));
        self.finish(data.len() as u64, sha)
    }

    /// Whether the peer (or something on the way) ends the connection within
    /// `timeout` while this end sends nothing: a reset or end of stream.
    pub fn ended_within(&mut self, timeout: Duration) -> Result<bool> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut byte = [0u8; 1];
        let ended = match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => bail!("the connection delivered data nobody sent"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(_) => true,
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(ended)
    }

    /// Writes raw bytes without finishing the exchange.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        self.stream.write_all(data)?;
        Ok(())
    }

    /// After `already` was written with [`Connection::write_all`], sends `len`
    /// more payload bytes, half-closes and checks the report covers both.
    pub fn exchange_rest(mut self, len: u64, already: &[u8]) -> Result<Report> {
        let mut hasher = Sha256::new();
        hasher.update(already);
        let stream = &mut self.stream;
        let mut rest = Vec::new();
        payload(len, |b| {
            rest.extend_from_slice(b);
            stream.write_all(b)
        })
        .context("sending payload")?;
        hasher.update(&rest);
        let sha = hex(&hasher.finalize());
        self.finish(already.len() as u64 + len, sha)
    }

    /// Sends exactly `data`, half-closes and checks the server's report.
    pub fn exchange_bytes(self, data: &[u8]) -> Result<Report> {
        self.exchange_slowly(data, 1, Duration::ZERO)
    }

    fn finish(self, len: u64, sent_sha: String) -> Result<Report> {
        self.stream.shutdown(Shutdown::Write)?;
        let mut line = String::new();
        BufReader::new(&self.stream)
            .read_line(&mut line)
            .context("reading the server's report")?;
        if line.is_empty() {
            bail!("the connection closed without a report");
        }
        let report = Report::parse(&line)?;
        if report.bytes != len || report.sha256 != sent_sha {
            bail!(
                "payload damaged: sent {len} bytes sha256={sent_sha}, server got {} bytes sha256={}",
                report.bytes,
                report.sha256
            );
        }
        Ok(report)
    }
}

/// Connects from `ns` to `dst`, sends `len` bytes and returns the server's report.
pub fn request(ns: &Netns, dst: SocketAddr, len: u64) -> Result<Report> {
    Connection::open(ns, dst, Duration::from_secs(5))?.exchange(len)
}

/// New connections from a pod, one after another, until stopped: each
/// sends `len` bytes and checks the server's report.
pub struct Stream {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<(Vec<Report>, Vec<String>)>>,
    thread: Option<JoinHandle<()>>,
}

impl Stream {
    pub fn start(ns: &Netns, dst: SocketAddr, len: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let name = ns.name().to_string();
        let thread = {
            let (stop, results) = (stop.clone(), results.clone());
            std::thread::spawn(move || {
                let mut ns = Netns::existing(&name);
                ns.keep();
                while !stop.load(Ordering::SeqCst) {
                    let attempt = Connection::open(&ns, dst, Duration::from_millis(300))
                        .and_then(|c| c.exchange(len));
                    let Ok(mut r) = results.lock() else { return };
                    match attempt {
                        Ok(report) => r.0.push(report),
                        Err(e) => {
                            r.1.push(format!("{e:#}"));
                            drop(r);
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
        };
        Stream {
            stop,
            results,
            thread: Some(thread),
        }
    }

    /// Stops, and returns the reports of the connections that worked and
    /// the errors of those that did not.
    pub fn finish(mut self) -> (Vec<Report>, Vec<String>) {
        self.stop_thread();
        self.results.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Stops, and fails unless every connection worked and there were more
    /// than `min` of them (fewer is too little traffic to judge `during`).
    /// Returns how many there were.
    pub fn finish_unbroken(self, during: &str, min: usize) -> Result<usize> {
        let (reports, failures) = self.finish();
        if !failures.is_empty() {
            anyhow::bail!(
                "{} of {} connections failed {during}; the first: {:?}",
                failures.len(),
                failures.len() + reports.len(),
                &failures[..failures.len().min(5)]
            );
        }
        if reports.len() <= min {
            anyhow::bail!(
                "only {} connections {during}: too little traffic to judge",
                reports.len()
            );
        }
        Ok(reports.len())
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop_thread();
    }
}
