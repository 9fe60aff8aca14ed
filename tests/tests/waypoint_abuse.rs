//! Hostile clients against the waypoint: malformed HTTP, huge headers, slow
//! clients, HTTP/2 floods (rapid reset, more streams than allowed), stalled
//! HBONE handshakes. Each must cost bounded memory and time, and the next
//! honest client must still be served.
//!
//! The raw bytes go from the client pod to the `echo` VIP: ztunnel tunnels
//! them to the waypoint unchanged, so the waypoint's HTTP server sees
//! exactly what the client wrote.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ztunnel_tests::{
    lab::Lab,
    setup::Setup,
    waypoint::{self, Backend, Client, BACKEND_PORT, ECHO_VIP, WAYPOINT},
    ztunnel::Ztunnel,
};

struct Mesh {
    s: Setup,
    l7: std::path::PathBuf,
    _zt: (Ztunnel, Ztunnel),
    wp: Ztunnel,
    server: Backend,
}

impl Mesh {
    fn up(flags: &[&str]) -> Result<Self> {
        let mut s = Setup::new(&waypoint::config(true, false, ""))?;
        s.lab.add_extra_pod(WAYPOINT)?;
        let l7 = std::env::temp_dir().join(format!("{}-l7.yaml", s.lab.prefix));
        std::fs::write(&l7, "")?;
        let zt = (s.ztunnel("node1", &[])?, s.ztunnel("node2", &[])?);
        let wp = waypoint::start(&s.lab, &s.config, &l7, flags)?;
        let pod = s.lab.pod("server");
        let server = Backend::start(&pod.ns, "server", pod.addr(BACKEND_PORT))?;
        Ok(Mesh {
            s,
            l7,
            _zt: zt,
            wp,
            server,
        })
    }

    fn lab(&self) -> &Lab {
        &self.s.lab
    }

    /// A raw TCP connection from the client pod to `echo`.
    fn raw(&self) -> Result<TcpStream> {
        let addr = SocketAddr::from((ECHO_VIP, 80));
        let stream = self
            .lab()
            .pod("client")
            .ns
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(stream)
    }

    /// An honest request still gets through.
    fn honest(&self) -> Result<()> {
        let mut c = Client::connect(
            &self.lab().pod("client").ns,
            SocketAddr::from((ECHO_VIP, 80)),
            false,
        )?;
        let reply = c.get("/honest")?;
        anyhow::ensure!(reply.status == 200, "an honest client got {}", reply.status);
        Ok(())
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.l7);
    }
}

/// Reads until the peer closes (or `limit` passes); what arrived.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while Instant::now() < deadline {
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        match stream.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

#[test]
fn malformed_and_oversized_http1_is_refused_and_the_next_client_served() -> Result<()> {
    let m = Mesh::up(&[])?;
    let mut garbage = m.raw()?;
    garbage.write_all(b"GARBAGE \x01\x02 NOT HTTP\r\n\r\n")?;
    let (reply, closed) = read_until_closed(&mut garbage, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "malformed request got {text:?}"
    );
    assert!(
        closed,
        "the connection stays open after a malformed request"
    );

    let mut huge = m.raw()?;
    let header = "a".repeat(200 * 1024);
    let _ = huge
        .write_all(format!("GET / HTTP/1.1\r\nHost: echo\r\nx-big: {header}\r\n\r\n").as_bytes());
    let (reply, closed) = read_until_closed(&mut huge, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "200 KiB of headers got {:?}",
        &text[..text.len().min(80)]
    );
    assert!(closed);
    assert_eq!(
        m.server.requests(),
        0,
        "nothing malformed reached the backend"
    );
    m.honest()
}

#[test]
fn a_slow_client_is_cut_off_at_the_header_deadline() -> Result<()> {
    let m = Mesh::up(&["--header-read-timeout", "1s"])?;
    let mut slow = m.raw()?;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\n")?;
    let started = Instant::now();
    // One header byte every 200 ms: never a complete request.
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(6) {
        if slow.write_all(b"x").is_err() {
            closed = true;
            break;
        }
        let _ = slow.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 512];
        match slow.read(&mut buf) {
            Ok(_) | Err(_)
                if started.elapsed() > Duration::from_millis(900) && peer_closed(&slow) =>
            {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    assert!(closed, "a client trickling its headers was never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut off only after {:?}",
        started.elapsed()
    );
    m.honest()
}

/// Whether the peer has closed `stream` (a zero-byte read or a reset).
fn peer_closed(stream: &TcpStream) -> bool {
    let _ = stream.set_nonblocking(true);
    let mut buf = [0u8; 1];
    let closed = match (&*stream).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

// ---- HTTP/2, by hand: the frames a misbehaving client writes. ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HEADERS for `GET path` (HPACK: indexed :method GET and :scheme http,
/// literal :path and :authority without indexing).
fn get_headers(stream: u32, path: &str, end_stream: bool) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    let authority = b"198.18.100.10";
    block.extend_from_slice(&[0x01, authority.len() as u8]);
    block.extend_from_slice(authority);
    // END_HEADERS, plus END_STREAM for a request without a body.
    frame(0x1, 0x4 | if end_stream { 0x1 } else { 0 }, stream, &block)
}

fn rst_stream(stream: u32) -> Vec<u8> {
    // CANCEL.
    frame(0x3, 0, stream, &8u32.to_be_bytes())
}

/// Frames received: (type, stream, error code for RST_STREAM and GOAWAY).
fn frames(bytes: &[u8]) -> Vec<(u8, u32, Option<u32>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len =
            ((bytes[at] as usize) << 16) | ((bytes[at + 1] as usize) << 8) | bytes[at + 2] as usize;
        let kind = bytes[at + 3];
        let stream =
            u32::from_be_bytes([bytes[at + 5], bytes[at + 6], bytes[at + 7], bytes[at + 8]])
                & 0x7fff_ffff;
        let payload = &bytes[(at + 9).min(bytes.len())..(at + 9 + len).min(bytes.len())];
        let code = match kind {
            0x3 if payload.len() >= 4 => Some(u32::from_be_bytes([
                payload[0], payload[1], payload[2], payload[3],
            ])),
            0x7 if payload.len() >= 8 => Some(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ])),
            _ => None,
        };
        out.push((kind, stream, code));
        at += 9 + len;
    }
    out
}

#[test]
fn an_http2_rapid_reset_flood_ends_the_connection() -> Result<()> {
    let m = Mesh::up(&[])?;
    let rss_before = m.wp.rss_bytes()?;
    let mut flood = m.raw()?;
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        bytes.extend(get_headers(id, "/delay/1000", true));
        bytes.extend(rst_stream(id));
    }
    let _ = flood.write_all(&bytes);
    let (reply, closed) = read_until_closed(&mut flood, Duration::from_secs(10));
    let got = frames(&reply);
    assert!(
        got.iter()
            .any(|(kind, _, code)| *kind == 0x7 && *code == Some(0xb)),
        "no GOAWAY(ENHANCE_YOUR_CALM) after 2000 HEADERS+RST_STREAM: {:?}",
        &got[..got.len().min(20)]
    );
    assert!(closed, "the flooding connection stayed open");
    assert!(
        m.server.requests() < 200,
        "{} flood requests reached the backend",
        m.server.requests()
    );
    let grown = m.wp.rss_bytes()?.saturating_sub(rss_before);
    assert!(
        grown < 32 << 20,
        "the flood grew the waypoint by {} MiB",
        grown >> 20
    );
    m.honest()
}

#[test]
fn streams_beyond_the_limit_are_refused() -> Result<()> {
    let m = Mesh::up(&["--max-streams", "10"])?;
    let mut greedy = m.raw()?;
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    // 40 slow requests at once, ignoring the advertised limit of 10.
    for i in 0..40u32 {
        bytes.extend(get_headers(2 * i + 1, "/delay/2000", true));
    }
    greedy.write_all(&bytes)?;
    let (reply, _) = read_until_closed(&mut greedy, Duration::from_secs(1));
    let got = frames(&reply);
    let settings_limit = reply.len() >= 9;
    let refused = got
        .iter()
        .filter(|(kind, _, code)| *kind == 0x3 && *code == Some(0x7))
        .count();
    assert!(settings_limit, "no frames from the waypoint");
    assert!(
        refused >= 30,
        "only {refused} of 30 streams over the limit were refused: {got:?}"
    );
    // At most the limit reached the backend.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        m.server.requests() <= 10,
        "{} concurrent requests reached the backend",
        m.server.requests()
    );
    m.honest()
}

#[test]
fn stalled_hbone_handshakes_do_not_lock_out_real_clients() -> Result<()> {
    let m = Mesh::up(&["--handshake-timeout", "1s", "--max-handshakes", "8"])?;
    // 64 connections to the waypoint's 15008 that never say anything.
    let wp = SocketAddr::from((WAYPOINT.ip, 15008));
    let plain = &m.lab().pod("plain").ns;
    let mut stalled = Vec::new();
    for _ in 0..64 {
        stalled.push(plain.run(move || TcpStream::connect_timeout(&wp, Duration::from_secs(5)))??);
    }
    let started = Instant::now();
    m.honest()
        .context("a real client behind 64 stalled handshakes")?;
    assert!(started.elapsed() < Duration::from_secs(8));
    // The stalled ones were closed at the deadline.
    std::thread::sleep(Duration::from_millis(1500));
    let closed = stalled.iter().filter(|s| peer_closed(s)).count();
    assert!(
        closed >= 60,
        "only {closed} of 64 stalled handshakes were closed"
    );
    Ok(())
}

/// A DENY on a host name, for the authority tests.
const DENY_ADMIN_HOST: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin-host}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: DENY\n  rules: [{to: [{operation: {hosts: [\"admin.svc\", \"admin.svc:*\"]}}]}]\n";

fn status_line(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_request_has_one_authority_and_one_path() -> Result<()> {
    let mut m = Mesh::up(&[])?;
    std::fs::write(&m.l7, DENY_ADMIN_HOST)?;
    m.wp.wait_for_log("L7 configuration applied", Duration::from_secs(10))?;
    let send = |request: &str| -> Result<String> {
        let mut s = m.raw()?;
        s.write_all(request.as_bytes())?;
        Ok(status_line(
            &read_until_closed(&mut s, Duration::from_secs(5)).0,
        ))
    };
    // Names the policy must see as admin.svc.
    for host in ["admin.svc", "ADMIN.svc", "admin.svc.", "admin.svc:80"] {
        let line = send(&format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ))?;
        assert!(line.starts_with("HTTP/1.1 403"), "Host {host}: {line}");
    }
    // Two names for one request.
    let line =
        send("GET / HTTP/1.1\r\nHost: public.svc\r\nHost: admin.svc\r\nConnection: close\r\n\r\n")?;
    assert!(line.starts_with("HTTP/1.1 400"), "two Host headers: {line}");
    let line =
        send("GET http://admin.svc/ HTTP/1.1\r\nHost: public.svc\r\nConnection: close\r\n\r\n")?;
    assert!(
        line.starts_with("HTTP/1.1 403"),
        "an absolute-form target is the authority: {line}"
    );
    // `Connection: host` must not strip the Host the policy checked.
    let line = send("GET / HTTP/1.1\r\nHost: public.svc\r\nConnection: close, host\r\n\r\n")?;
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    assert_eq!(
        m.server.last().and_then(|s| s.headers.get("host").cloned()),
        Some("public.svc".into())
    );
    // Paths that a backend would read otherwise than the policy.
    for path in [
        "/public/..;/admin",
        "/public\\..\\admin",
        "/public%5C..%5Cadmin",
        "/a%zz",
    ] {
        let line = send(&format!(
            "GET {path} HTTP/1.1\r\nHost: public.svc\r\nConnection: close\r\n\r\n"
        ))?;
        assert!(line.starts_with("HTTP/1.1 400"), "{path}: {line}");
    }

    // HTTP/2 whose `host` header disagrees with `:authority`.
    let mut h2 = m.raw()?;
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 9];
    block.extend_from_slice(b"admin.svc");
    block.extend_from_slice(&[0x00, 4]);
    block.extend_from_slice(b"host");
    block.push(10);
    block.extend_from_slice(b"public.svc");
    bytes.extend(frame(0x1, 0x5, 1, &block));
    h2.write_all(&bytes)?;
    let (reply, _) = read_until_closed(&mut h2, Duration::from_secs(2));
    // The response HEADERS begins with :status 400 (HPACK static index 12).
    let status_400 = frames(&reply)
        .iter()
        .any(|(kind, stream, _)| *kind == 0x1 && *stream == 1)
        && reply.windows(10).any(|w| w[3] == 0x1 && w[9] == 0x8c);
    assert!(
        status_400,
        "a disagreeing host and :authority were not refused: {:?}",
        frames(&reply)
    );
    Ok(())
}
