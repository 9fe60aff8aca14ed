//! The handover protocol over real Unix sockets, both ends in this process
//! (no root needed): what a new ztunnel makes of each answer the running
//! one may give, and how the running one treats each request.

use std::{
    net::{SocketAddr, TcpListener},
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::mpsc,
    thread::JoinHandle,
};

use super::*;

/// A private directory for one test's socket, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        Dir(std::env::temp_dir().join(format!(
            "ztunnel-handover-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        )))
    }

    fn socket(&self) -> PathBuf {
        self.0.join("handover.sock")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A listening TCP socket (something to hand over) and its address.
fn listener() -> (OwnedFd, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (OwnedFd::from(l), addr)
}

fn addr_of(fd: OwnedFd) -> SocketAddr {
    TcpListener::from(fd).local_addr().unwrap()
}

/// A running ztunnel that answers one request at `path` with `reply` and
/// `fds` (nothing at all when `reply` is empty), and returns the request.
fn old_answering(path: &Path, reply: Vec<u8>, fds: Vec<OwnedFd>) -> JoinHandle<Vec<u8>> {
    let listener = bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = vec![0u8; REQUEST.len()];
        stream.read_exact(&mut request).unwrap();
        if !reply.is_empty() {
            let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
            let cmsg = [ControlMessage::ScmRights(&raw)];
            let cmsg: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(&reply)],
                cmsg,
                MsgFlags::empty(),
                None,
            )
            .unwrap();
        }
        request
    })
}

fn protocol_error(result: Result<Option<Takeover>, HandoverError>) -> String {
    match result {
        Err(HandoverError::Protocol(why)) => why,
        Err(e) => panic!("not a protocol error: {e}"),
        Ok(Some(t)) => panic!("accepted: {:?}", t.listeners),
        Ok(None) => panic!("taken as no running ztunnel"),
    }
}

#[test]
fn no_socket_means_no_running_ztunnel() {
    let dir = Dir::new();
    assert!(take_over(&dir.socket()).unwrap().is_none());
}

#[test]
fn a_stale_socket_nobody_listens_on_means_no_running_ztunnel() {
    let dir = Dir::new();
    drop(bind(&dir.socket()).unwrap());
    assert!(dir.socket().exists());
    assert!(take_over(&dir.socket()).unwrap().is_none());
}

#[test]
fn the_new_ztunnel_sends_the_request_and_reads_names_with_descriptors() {
    let dir = Dir::new();
    let ((a, a_addr), (b, b_addr)) = (listener(), listener());
    let old = old_answering(
        &dir.socket(),
        b"ztunnel-listeners v1 outbound,inbound\n".to_vec(),
        vec![a, b],
    );
    let takeover = take_over(&dir.socket()).unwrap().expect("listeners");
    assert_eq!(old.join().unwrap(), REQUEST);
    let got: Vec<(String, SocketAddr)> = takeover
        .listeners
        .into_iter()
        .map(|(name, fd)| (name, addr_of(fd)))
        .collect();
    assert_eq!(
        got,
        [
            ("outbound".to_string(), a_addr),
            ("inbound".to_string(), b_addr)
        ]
    );
}

#[test]
fn a_draining_answer_means_bind_fresh_listeners() {
    let dir = Dir::new();
    let old = old_answering(&dir.socket(), b"ztunnel-draining v1\n".to_vec(), vec![]);
    assert!(take_over(&dir.socket()).unwrap().is_none());
    old.join().unwrap();
}

#[test]
fn an_old_ztunnel_that_hangs_up_without_answering_is_an_error() {
    let dir = Dir::new();
    let old = old_answering(&dir.socket(), vec![], vec![]);
    let why = protocol_error(take_over(&dir.socket()));
    assert!(why.contains("hung up"), "{why}");
    old.join().unwrap();
}

#[test]
fn more_names_than_descriptors_is_an_error() {
    let dir = Dir::new();
    let old = old_answering(
        &dir.socket(),
        b"ztunnel-listeners v1 a,b\n".to_vec(),
        vec![listener().0],
    );
    let why = protocol_error(take_over(&dir.socket()));
    assert!(why.contains("2 names but 1 descriptors"), "{why}");
    old.join().unwrap();
}

#[test]
fn more_descriptors_than_a_reply_may_carry_is_an_error() {
    let dir = Dir::new();
    let n = MAX_FDS + 1;
    let names: Vec<String> = (0..n).map(|i| format!("l{i}")).collect();
    let fds = (0..n).map(|_| listener().0).collect();
    let reply = format!("ztunnel-listeners v1 {}\n", names.join(","));
    let old = old_answering(&dir.socket(), reply.into_bytes(), fds);
    // The descriptors past what a reply may carry do not fit: the kernel
    // truncates them, and that is refused rather than read as fewer.
    protocol_error(take_over(&dir.socket()));
    old.join().unwrap();
}

#[test]
fn an_answer_in_another_protocol_is_an_error() {
    for reply in [
        &b"ztunnel-listeners v2 a\n"[..],
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"\xff\xfe\x00",
    ] {
        let dir = Dir::new();
        let old = old_answering(&dir.socket(), reply.to_vec(), vec![listener().0]);
        let why = protocol_error(take_over(&dir.socket()));
        assert!(
            why.contains("unexpected reply") || why.contains("cut short"),
            "{why}"
        );
        old.join().unwrap();
    }
}

/// A handover server offering two listeners; its `on_handover` signals `rx`.
struct Old {
    server: HandoverServer,
    handed_over: mpsc::Receiver<()>,
    addrs: [SocketAddr; 2],
}

fn old_server(dir: &Dir) -> Old {
    let ((a, a_addr), (b, b_addr)) = (listener(), listener());
    let (tx, rx) = mpsc::channel();
    let server = HandoverServer::start(
        &dir.socket(),
        vec![("outbound".into(), a), ("inbound".into(), b)],
        move || {
            let _ = tx.send(());
        },
    )
    .unwrap();
    Old {
        server,
        handed_over: rx,
        addrs: [a_addr, b_addr],
    }
}

/// Takes the listeners over and checks they are the offered ones.
fn take(dir: &Dir, old: &Old) -> Takeover {
    let mut takeover = take_over(&dir.socket()).unwrap().expect("listeners");
    let listeners = std::mem::take(&mut takeover.listeners);
    let names: Vec<&str> = listeners.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["outbound", "inbound"]);
    for ((_, fd), addr) in listeners.into_iter().zip(old.addrs) {
        assert_eq!(addr_of(fd), addr);
    }
    takeover
}

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn a_confirmed_takeover_hands_the_listeners_over() {
    let dir = Dir::new();
    let old = old_server(&dir);
    take(&dir, &old).confirm().unwrap();
    old.handed_over.recv_timeout(WAIT).expect("on_handover ran");
    // Capture is the new ztunnel's now: closing must not withdraw it.
    assert!(old.server.close());
}

#[test]
fn an_unconfirmed_takeover_leaves_the_old_ztunnel_in_charge() {
    let dir = Dir::new();
    let old = old_server(&dir);
    // The new ztunnel dies before it serves.
    drop(take(&dir, &old));
    // A truncated confirmation, then a wrong one.
    let mut t = take(&dir, &old);
    t.stream.write_all(&READY[..5]).unwrap();
    drop(t);
    let mut t = take(&dir, &old);
    t.stream.write_all(b"ztunnel-ready v2\n").unwrap();
    drop(t);
    assert!(
        old.handed_over.try_recv().is_err(),
        "handed over unconfirmed"
    );
    // The listeners are still offered, and still go over when confirmed.
    take(&dir, &old).confirm().unwrap();
    old.handed_over.recv_timeout(WAIT).expect("on_handover ran");
    assert!(old.server.close());
}

/// Sends `request` raw and returns what came back before the server hung up.
fn raw_request(dir: &Dir, request: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(dir.socket()).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(request).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        // Hung up with part of the request unread.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => {
            other.unwrap();
        }
    }
    answer
}

#[test]
fn malformed_or_truncated_requests_are_ignored_and_the_offer_stands() {
    let dir = Dir::new();
    let old = old_server(&dir);
    for request in [
        &b"ztunnel-takeover v2\n"[..],
        b"ztunnel-take",
        b"",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let answer = raw_request(&dir, request);
        assert!(answer.is_empty(), "{request:?} got {answer:?}");
    }
    take(&dir, &old).confirm().unwrap();
    old.handed_over.recv_timeout(WAIT).expect("on_handover ran");
    assert!(old.server.close());
}

#[test]
fn closing_before_any_takeover_withdraws_the_offer() {
    let dir = Dir::new();
    let old = old_server(&dir);
    assert!(!old.server.close(), "nothing was handed over");
    assert!(!dir.socket().exists(), "the socket is removed");
    assert!(take_over(&dir.socket()).unwrap().is_none());
    assert!(old.handed_over.recv_timeout(WAIT).is_err());
}

#[test]
fn the_socket_is_private_to_this_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Dir::new();
    let _listener = bind(&dir.socket()).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.socket()), 0o600);
    assert_eq!(mode(&dir.0), 0o700);
}

#[test]
fn default_paths_are_named_after_the_pin_directory() {
    assert_eq!(
        default_path(Path::new("/sys/fs/bpf/ztunnel/node-a")),
        Path::new("/run/ztunnel/node-a.handover.sock")
    );
    assert_eq!(
        run_dir_path(Path::new("/"), "x"),
        Path::new("/run/ztunnel/default.x")
    );
}

#[test]
fn a_reply_without_its_newline_is_cut_short_and_refused() {
    assert!(parse_reply(b"ztunnel-listeners v1 outbound,inbo", 2).is_err());
    assert!(parse_reply(b"ztunnel-draining v1", 0).is_err());
    assert_eq!(
        parse_reply(b"ztunnel-listeners v1 outbound,inbound\n", 2),
        Ok(Reply::Listeners(vec!["outbound".into(), "inbound".into()]))
    );
}

#[test]
fn a_reply_longer_than_the_read_buffer_is_refused_not_read_cut() {
    // The second name runs past what one read takes: read as is, it would
    // be a different, cut name for the second descriptor.
    let dir = Dir::new();
    let long = "l".repeat(REPLY_BUFFER);
    let reply = format!("ztunnel-listeners v1 outbound,{long}\n");
    let old = old_answering(
        &dir.socket(),
        reply.into_bytes(),
        vec![listener().0, listener().0],
    );
    let why = protocol_error(take_over(&dir.socket()));
    assert!(why.contains("cut short"), "{why}");
    old.join().unwrap();
}
