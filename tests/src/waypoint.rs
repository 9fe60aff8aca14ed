//! The waypoint in the lab: its pod, its configuration, the process, and
//! the HTTP ends (a backend that reports what it received, and clients that
//! keep their connection) that the waypoint tests use.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::{
    lab::{Lab, PodSpec},
    netns::Netns,
    ztunnel::{built_binary, Ztunnel},
};

/// The waypoint's pod: on node2, not captured (it terminates HBONE itself).
pub const WAYPOINT: PodSpec = PodSpec {
    name: "waypoint",
    node: 1,
    ip: Ipv4Addr::new(198, 18, 2, 20),
    enrolled: false,
    service_account: "waypoint",
};

/// The `echo` service's address (port 80 -> the endpoint's 8080; 7000 for
/// TCP that is not HTTP).
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
/// (`echo-plain`, 198.18.100.12:80, is the `plain` pod, outside the mesh.)
/// `echo-v2`, a second service for weighted routes (it never names the
/// waypoint: the waypoint sends to it directly).
pub const ECHO_V2_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);
/// The port the backends listen on.
pub const BACKEND_PORT: u16 = 8080;

/// The waypoint's `GatewayAddress`, as a config snippet.
pub const WAYPOINT_REF: &str = "{destination: \"/198.18.2.20\", hboneMtlsPort: 15008}";

/// The lab's workloads plus the waypoint, `server` behind `echo` (which
/// names the waypoint when `echo_waypoint`), `neighbor` behind `echo-v2`;
/// `tail` appended (policies).
pub fn config(echo_waypoint: bool, server_waypoint: bool, tail: &str) -> String {
    let mut workloads = crate::lab::config_yaml_extra(
        &[],
        &[
            (
                "server",
                "\"default/echo.default.svc.cluster.local\": {80: 8080}",
            ),
            (
                "neighbor",
                "\"default/echo-v2.default.svc.cluster.local\": {80: 8080}",
            ),
            (
                "plain",
                "\"default/echo-plain.default.svc.cluster.local\": {80: 8080}",
            ),
        ],
        &[WAYPOINT],
        "",
    );
    if server_waypoint {
        workloads = workloads.replace(
            "  name: server\n",
            &format!("  name: server\n  waypoint: {WAYPOINT_REF}\n"),
        );
    }
    let waypoint = if echo_waypoint {
        format!("  waypoint: {WAYPOINT_REF}\n")
    } else {
        String::new()
    };
    format!(
        "{workloads}services:\n- name: echo\n  namespace: default\n  hostname: echo.default.svc.cluster.local\n  vips: [\"/{ECHO_VIP}\"]\n  ports: {{80: 8080, 7000: 7000}}\n{waypoint}- name: echo-v2\n  namespace: default\n  hostname: echo-v2.default.svc.cluster.local\n  vips: [\"/{ECHO_V2_VIP}\"]\n  ports: {{80: 8080}}\n- name: echo-plain\n  namespace: default\n  hostname: echo-plain.default.svc.cluster.local\n  vips: [\"/198.18.100.12\"]\n  ports: {{80: 8080}}\n{tail}"
    )
}

/// Starts the waypoint in its pod (which the lab must have: see
/// [`Lab::add_extra_pod`]) with the mesh `config`, the L7 files `l7`, and
/// `extra` flags; waits until it serves.
pub fn start(lab: &Lab, config: &Path, l7: &Path, extra: &[&str]) -> Result<Ztunnel> {
    let pod = lab.pod(WAYPOINT.name);
    let mut cmd = pod.ns.command(built_binary("waypoint", "WAYPOINT_BIN")?);
    cmd.arg("--config")
        .arg(config)
        .arg("--l7-config")
        .arg(l7)
        .arg("--ca-dir")
        .arg(&lab.ca_dir)
        .arg("--pod-ip")
        .arg(WAYPOINT.ip.to_string())
        .env("RUST_LOG", "info");
    Ztunnel::spawn_command(lab.node("node2"), cmd, extra, &[])?.ready()
}

/// Starts the waypoint with its workloads and certificate from the lab's
/// control plane at `control_plane` (as node2's pods get theirs).
pub fn start_from_control_plane(
    lab: &Lab,
    control_plane: SocketAddr,
    l7: &Path,
) -> Result<Ztunnel> {
    let pod = lab.pod(WAYPOINT.name);
    let mut cmd = pod.ns.command(built_binary("waypoint", "WAYPOINT_BIN")?);
    cmd.arg("--l7-config")
        .arg(l7)
        .arg("--pod-ip")
        .arg(WAYPOINT.ip.to_string())
        .env("NODE_NAME", "node2")
        .env("RUST_LOG", "info")
        .envs(crate::controlplane::environment(
            lab,
            control_plane,
            "node2",
        ));
    Ztunnel::spawn_command(lab.node("node2"), cmd, &[], &[])?.ready()
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub peer: SocketAddr,
    pub headers: HashMap<String, String>,
    pub version: http::Version,
}

/// An HTTP backend (HTTP/1.1 and cleartext HTTP/2) in a pod. It answers
/// `/status/<code>` with that code, `/delay/<ms>` after that long, and
/// anything else with 200 and `pod=<name>`; it records every request.
pub struct Backend {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub count: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Backend {
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let name = name.to_string();
        let (seen2, count2) = (seen.clone(), count.clone());
        ns.spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                let _ = ready_tx.send(());
                let accept = async {
                    loop {
                        let Ok((stream, peer)) = listener.accept().await else {
                            continue;
                        };
                        let (name, seen, count) = (name.clone(), seen2.clone(), count2.clone());
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(
                                move |req: http::Request<hyper::body::Incoming>| {
                                    let (name, seen, count) =
                                        (name.clone(), seen.clone(), count.clone());
                                    async move {
                                        Ok::<_, std::convert::Infallible>(
                                            answer(&name, peer, req, &seen, &count).await,
                                        )
                                    }
                                },
                            );
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
                anyhow::Ok(())
            })
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("backend did not start")?;
        Ok(Backend {
            seen,
            count,
            stop: Some(stop),
        })
    }

    pub fn requests(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().ok()?.last().cloned()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn answer(
    name: &str,
    peer: SocketAddr,
    req: http::Request<hyper::body::Incoming>,
    seen: &Mutex<Vec<Seen>>,
    count: &AtomicUsize,
) -> http::Response<Full<Bytes>> {
    count.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    if let Ok(mut seen) = seen.lock() {
        seen.push(Seen {
            path: path.clone(),
            peer,
            headers,
            version: req.version(),
        });
    }
    let _ = req.into_body().collect().await;
    let mut status = 200;
    if let Some(code) = path.strip_prefix("/status/") {
        status = code.parse().unwrap_or(400);
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    let mut response = http::Response::new(Full::new(Bytes::from(format!("pod={name}\n"))));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    response
}

/// One client connection (HTTP/1.1 keep-alive, or cleartext HTTP/2), from
/// inside a pod, sending requests one after another on it.
pub struct Client {
    rt: tokio::runtime::Runtime,
    send: Sender,
    host: String,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A response: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Client {
    pub fn connect(ns: &Netns, addr: SocketAddr, h2: bool) -> Result<Self> {
        let tcp =
            ns.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
        tcp.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let send = rt.block_on(async {
            let io = TokioIo::new(tokio::net::TcpStream::from_std(tcp)?);
            anyhow::Ok(if h2 {
                let (send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                Sender::H2(send)
            } else {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(conn);
                Sender::H1(send)
            })
        })?;
        Ok(Client {
            rt,
            send,
            host: addr.to_string(),
        })
    }

    /// `method path` with `headers`; the reply, read to its end.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Reply> {
        let uri = match self.send {
            Sender::H1(_) => path.to_string(),
            Sender::H2(_) => format!("http://{}{path}", self.host),
        };
        let mut builder = http::Request::builder().method(method).uri(uri);
        if let Sender::H1(_) = self.send {
            builder = builder.header(http::header::HOST, self.host.as_str());
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(Bytes::new()))?;
        let send = &mut self.send;
        self.rt.block_on(async {
            let response = tokio::time::timeout(Duration::from_secs(15), async {
                match send {
                    Sender::H1(s) => {
                        s.ready().await?;
                        s.send_request(request).await
                    }
                    Sender::H2(s) => {
                        s.ready().await?;
                        s.send_request(request).await
                    }
                }
            })
            .await
            .context("no response within 15s")??;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(Reply {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        })
    }

    pub fn get(&mut self, path: &str) -> Result<Reply> {
        self.request("GET", path, &[])
    }
}

/// Latency of `count` sequential `GET /` on one kept-alive HTTP/1.1
/// connection: (p50, p99) in microseconds.
pub fn http_latency(ns: &Netns, addr: SocketAddr, count: usize) -> Result<(f64, f64)> {
    let mut client = Client::connect(ns, addr, false)?;
    // Warm the path (pooled tunnels, upstream connections).
    for _ in 0..20 {
        client.get("/")?;
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = std::time::Instant::now();
        let reply = client.get("/")?;
        anyhow::ensure!(reply.status == 200, "GET / answered {}", reply.status);
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Ok((at(0.50), at(0.99)))
}

/// Requests per second: `threads` kept-alive HTTP/1.1 connections sending
/// `GET /` back to back for `secs`.
pub fn http_rate(ns: &Netns, addr: SocketAddr, threads: usize, secs: f64) -> Result<f64> {
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let mut handles = Vec::new();
    for _ in 0..threads {
        let mut client = Client::connect(ns, addr, false)?;
        handles.push(std::thread::spawn(move || -> Result<u64> {
            let mut done = 0;
            while std::time::Instant::now() < deadline {
                let reply = client.get("/")?;
                anyhow::ensure!(reply.status == 200, "GET / answered {}", reply.status);
                done += 1;
            }
            Ok(done)
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    }
    Ok(total as f64 / secs)
}

/// `count` cleartext HTTP/2 connections to `addr`, each past one request
/// and then idle, held until dropped.
pub struct IdleH2 {
    _senders: Vec<hyper::client::conn::http2::SendRequest<Full<Bytes>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl IdleH2 {
    pub fn open(ns: &Netns, addr: SocketAddr, count: usize) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut senders = Vec::with_capacity(count);
        for _ in 0..count {
            let tcp = ns.run(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            })??;
            tcp.set_nonblocking(true)?;
            let sender = rt.block_on(async {
                let io = TokioIo::new(tokio::net::TcpStream::from_std(tcp)?);
                let (mut send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                let request = http::Request::builder()
                    .uri(format!("http://{addr}/"))
                    .body(Full::new(Bytes::new()))?;
                let response = send.send_request(request).await?;
                anyhow::ensure!(
                    response.status() == 200,
                    "GET / answered {}",
                    response.status()
                );
                let _ = response.into_body().collect().await?;
                anyhow::Ok(send)
            })?;
            senders.push(sender);
        }
        Ok(IdleH2 {
            _senders: senders,
            rt: Some(rt),
        })
    }
}

impl Drop for IdleH2 {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
