//! Zero-downtime restarts: a new ztunnel takes the listening sockets over
//! from the running one through a local Unix socket (`SCM_RIGHTS`), so the
//! kernel keeps delivering captured flows to the very same sockets and their
//! accept queues carry over.
//!
//! Two phases, so that a new ztunnel that fails to start leaves the running
//! one in charge:
//! 1. the new process sends `ztunnel-takeover v1\n`; the old one answers
//!    `ztunnel-listeners v1 <name>,<name>,...\n` with the descriptors
//!    attached, in that order (or `ztunnel-draining v1\n` once a drain has
//!    begun: its listeners are being closed, the new one binds its own),
//!    and keeps serving;
//! 2. once the new process has everything in place and has published the
//!    listeners to the kernel, it sends `ztunnel-ready v1\n`; only then
//!    does the old one stop accepting and drain. If the new one dies or
//!    stays silent for a minute, the old one carries on.
//!
//! Only a peer with this process's user id (and, when its pid is visible,
//! in this network namespace) gets the listeners: they are the node's
//! captured traffic.

use std::{
    io::{IoSlice, IoSliceMut, Read, Write},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{
            fs::{MetadataExt, PermissionsExt},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt::PeerCredentials, ControlMessage, ControlMessageOwned,
    MsgFlags,
};
use tracing::{info, warn};

const REQUEST: &[u8] = b"ztunnel-takeover v1\n";
const REPLY_PREFIX: &str = "ztunnel-listeners v1 ";
const DRAINING: &str = "ztunnel-draining v1";
const READY: &[u8] = b"ztunnel-ready v1\n";
/// How long the old process waits for the new one to say it serves.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new process waits for the running one to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// More listeners than this in one reply is a protocol error: three per
/// proxy worker, and the admin, metrics and readiness ports.
const MAX_FDS: usize = 3 * crate::proxy::workers::MAX_WORKERS + 3;
/// The longest reply read: room for MAX_FDS names of up to 20 bytes (as
/// `inbound_plaintext.63`) and their commas.
const REPLY_BUFFER: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {}: {message}", path.display())]
    Socket { path: PathBuf, message: String },
    #[error("handover with the running ztunnel failed: {0}")]
    Protocol(String),
}

/// The default handover socket of an instance: named after its pin
/// directory, which is unique per instance on a kernel.
pub fn default_path(pin_dir: &Path) -> PathBuf {
    run_dir_path(pin_dir, "handover.sock")
}

/// `/run/ztunnel/<pin-dir name>.<suffix>`.
pub fn run_dir_path(pin_dir: &Path, suffix: &str) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "default".into());
    PathBuf::from("/run/ztunnel").join(format!("{name}.{suffix}"))
}

/// Listeners received from the running ztunnel, which keeps serving until
/// [`Takeover::confirm`].
pub struct Takeover {
    pub listeners: Vec<(String, OwnedFd)>,
    stream: UnixStream,
}

impl Takeover {
    /// Tells the old ztunnel this one serves now: it stops accepting and
    /// drains.
    pub fn confirm(mut self) -> Result<(), HandoverError> {
        self.stream
            .write_all(READY)
            .map_err(|e| HandoverError::Protocol(format!("confirming the takeover: {e}")))
    }
}

/// Asks a running ztunnel for its listeners. `Ok(None)` when there is none
/// (no socket, nobody listening on it, or it is draining).
pub fn take_over(path: &Path) -> Result<Option<Takeover>, HandoverError> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(HandoverError::Socket {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
        }
    };
    let proto = |m: String| HandoverError::Protocol(m);
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| proto(e.to_string()))?;
    stream
        .write_all(REQUEST)
        .map_err(|e| proto(format!("sending request: {e}")))?;
    let mut buf = vec![0u8; REPLY_BUFFER];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| proto(format!("receiving listeners: {e}")))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs().map_err(|e| proto(e.to_string()))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors for us.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    // Space for MAX_FDS is rounded up to a word: a descriptor or so more
    // may fit, but no more than MAX_FDS may come.
    if fds.len() > MAX_FDS || msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(proto(format!(
            "more listeners than the {MAX_FDS} a reply may carry"
        )));
    }
    let n = msg.bytes;
    let names = match parse_reply(&buf[..n], fds.len()).map_err(proto)? {
        Reply::Draining => {
            info!(socket = %path.display(), "the running ztunnel is draining; binding fresh listeners");
            return Ok(None);
        }
        Reply::Listeners(names) => names,
    };
    Ok(Some(Takeover {
        listeners: names.into_iter().zip(fds).collect(),
        stream,
    }))
}

/// The running ztunnel's answer to a takeover request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// It is draining: no listeners.
    Draining,
    /// The names of the descriptors that came with it, in their order.
    Listeners(Vec<String>),
}

/// Reads the running ztunnel's answer (the bytes of one message, which
/// came with `descriptors` descriptors): one line, ending in a newline.
/// Each name must be a distinct, non-empty word and name one descriptor.
pub fn parse_reply(bytes: &[u8], descriptors: usize) -> Result<Reply, String> {
    if bytes.is_empty() {
        return Err("no reply: the running ztunnel hung up".into());
    }
    let text = String::from_utf8_lossy(bytes);
    // Without its newline the reply was cut short (it did not fit the
    // buffer, or the sender died): its last name may be cut too.
    let line = text
        .strip_suffix('\n')
        .ok_or_else(|| format!("reply {text:?} cut short: no newline"))?;
    if line == DRAINING {
        return Ok(Reply::Draining);
    }
    let names = line.strip_prefix(REPLY_PREFIX).ok_or_else(|| {
        format!("unexpected reply {text:?} (is the running ztunnel another user's?)")
    })?;
    let names: Vec<String> = names.split(',').map(str::to_string).collect();
    if names.len() != descriptors {
        return Err(format!(
            "{} names but {descriptors} descriptors",
            names.len()
        ));
    }
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("listener name {name:?} is not a word"));
        }
        if names[..i].contains(name) {
            return Err(format!("listener `{name}` named twice"));
        }
    }
    Ok(Reply::Listeners(names))
}

/// The answer offering the listeners `names` (their descriptors ride along).
pub fn reply_line(names: &[&str]) -> String {
    format!("{REPLY_PREFIX}{}\n", names.join(","))
}

/// What the handover server still offers.
enum Offer {
    /// Its own copies of the listeners, ready to send.
    Listeners(Vec<(String, OwnedFd)>),
    /// Sent; waiting for the new ztunnel to say it serves. The copies are
    /// kept, to offer again if it does not.
    Pending(Vec<(String, OwnedFd)>),
    /// The new ztunnel serves with them.
    HandedOver,
    /// A drain began: nothing to offer.
    Closed,
}

/// The running side of the handover: a thread answering takeover requests
/// until one succeeds or [`HandoverServer::close`] is called.
pub struct HandoverServer {
    offer: Arc<Mutex<Offer>>,
    listener: Arc<UnixListener>,
    path: PathBuf,
}

impl HandoverServer {
    /// Binds `path` and offers `fds` there; `on_handover` runs once a new
    /// ztunnel has taken them.
    pub fn start(
        path: &Path,
        fds: Vec<(String, OwnedFd)>,
        on_handover: impl FnOnce() + Send + 'static,
    ) -> Result<Self, HandoverError> {
        let listener = Arc::new(bind(path)?);
        let offer = Arc::new(Mutex::new(Offer::Listeners(fds)));
        {
            let (listener, offer) = (listener.clone(), offer.clone());
            std::thread::Builder::new()
                .name("handover".into())
                .spawn(move || {
                    if serve(&listener, &offer) {
                        on_handover();
                    }
                })
                .map_err(|e| HandoverError::Socket {
                    path: path.to_path_buf(),
                    message: format!("starting the handover thread: {e}"),
                })?;
        }
        Ok(HandoverServer {
            offer,
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Stops offering the listeners (a drain is closing them). Returns
    /// whether a new ztunnel took them over before that, or is taking them
    /// over now: it owns them, and capture, then, and nothing may be
    /// withdrawn from the kernel.
    pub fn close(&self) -> bool {
        let handed_over = match self.offer.lock() {
            Ok(mut offer) => match *offer {
                Offer::HandedOver | Offer::Pending(_) => true,
                Offer::Listeners(_) | Offer::Closed => {
                    // Our copies of the listeners go with the offer.
                    *offer = Offer::Closed;
                    false
                }
            },
            Err(_) => false,
        };
        if !handed_over {
            let _ = std::fs::remove_file(&self.path);
        }
        // Wakes the thread from accept(2); it sees the offer closed.
        // SAFETY: shutdown(2) on a socket we own.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        handed_over
    }
}

/// Answers requests until the listeners are handed over (true) or the
/// offer is closed (false).
fn serve(listener: &UnixListener, offer: &Mutex<Offer>) -> bool {
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if offer
                    .lock()
                    .map(|o| matches!(*o, Offer::Closed))
                    .unwrap_or(true)
                {
                    return false;
                }
                warn!(error = %e, "handover accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if let Err(why) = check_peer(&stream) {
            warn!(reason = %why, "refused a handover");
            continue;
        }
        let _ = stream.set_read_timeout(Some(TIMEOUT));
        let mut request = [0u8; REQUEST.len()];
        if stream.read_exact(&mut request).is_err() || request != REQUEST {
            warn!("ignored a malformed handover request");
            continue;
        }
        match send(&mut stream, offer) {
            Sent::Draining => return false,
            Sent::Failed => continue,
            Sent::Listeners(names) => {
                info!(listeners = %names, "listeners sent to a new ztunnel; serving on until it confirms");
                let confirmed = confirmation(&mut stream);
                let Ok(mut offer) = offer.lock() else {
                    return false;
                };
                let pending = std::mem::replace(&mut *offer, Offer::HandedOver);
                match (confirmed, pending) {
                    (Ok(()), _) => {
                        info!("the new ztunnel serves: listeners handed over");
                        return true;
                    }
                    (Err(why), Offer::Pending(fds)) => {
                        warn!(reason = %why, "the new ztunnel did not confirm; this one keeps serving");
                        *offer = Offer::Listeners(fds);
                    }
                    // Closed meanwhile (a drain began): nothing to go back to.
                    (Err(_), _) => return false,
                }
            }
        }
    }
}

/// What sending the listeners did.
enum Sent {
    Listeners(String),
    Failed,
    Draining,
}

/// Sends the listeners (or says a drain has begun), leaving the offer
/// pending.
fn send(stream: &mut UnixStream, offer: &Mutex<Offer>) -> Sent {
    let Ok(mut offer) = offer.lock() else {
        return Sent::Draining;
    };
    let fds = match std::mem::replace(&mut *offer, Offer::Closed) {
        Offer::Listeners(fds) => fds,
        other => {
            *offer = other;
            let _ = stream.write_all(format!("{DRAINING}\n").as_bytes());
            info!("told a new ztunnel this one is draining: it binds its own listeners");
            return Sent::Draining;
        }
    };
    let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
    let line = reply_line(&names);
    let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let result = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(line.as_bytes())],
        &cmsg,
        MsgFlags::empty(),
        None,
    );
    let names = names.join(",");
    match result {
        Ok(_) => {
            *offer = Offer::Pending(fds);
            Sent::Listeners(names)
        }
        Err(e) => {
            warn!(error = %e, "handing the listeners over failed; still serving");
            *offer = Offer::Listeners(fds);
            Sent::Failed
        }
    }
}

/// Waits for the new ztunnel to say it serves.
fn confirmation(stream: &mut UnixStream) -> Result<(), String> {
    let _ = stream.set_read_timeout(Some(CONFIRM_TIMEOUT));
    let mut ready = [0u8; READY.len()];
    match stream.read_exact(&mut ready) {
        Ok(()) if ready == READY => Ok(()),
        Ok(()) => Err(format!("unexpected {:?}", String::from_utf8_lossy(&ready))),
        Err(e) => Err(format!("no confirmation within {CONFIRM_TIMEOUT:?}: {e}")),
    }
}

/// Only this user, in this network namespace, may take the listeners.
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let creds = getsockopt(&stream.as_fd(), PeerCredentials)
        .map_err(|e| format!("reading the peer's credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    if creds.uid() != ours {
        return Err(format!(
            "peer pid {} runs as uid {}, not {ours}",
            creds.pid(),
            creds.uid()
        ));
    }
    // A pid of 0 is a process outside our PID namespace: nothing to compare.
    if creds.pid() > 0 {
        let netns = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
        match (netns("self"), netns(&creds.pid().to_string())) {
            (Ok(a), Ok(b)) if a != b => {
                return Err(format!(
                    "peer pid {} is in another network namespace",
                    creds.pid()
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Binds the handover socket at `path`, replacing a previous instance's,
/// readable and writable by this user only.
pub fn bind(path: &Path) -> Result<UnixListener, HandoverError> {
    let err = |message: String| HandoverError::Socket {
        path: path.to_path_buf(),
        message,
    };
    private_dir(path).map_err(|e| err(e.to_string()))?;
    // The old instance's socket (if any) already answered or is gone; its
    // accepted connection does not need the name.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(e.to_string()))?;
    Ok(listener)
}

/// Creates the parent directory of a socket as this user's only, if missing.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Duplicates a listener's descriptor for the handover server to own.
pub fn dup(fd: &impl AsFd) -> std::io::Result<OwnedFd> {
    fd.as_fd().try_clone_to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_the_server_sends_is_read_back() {
        let names = ["outbound", "inbound_hbone", "admin"];
        assert_eq!(
            parse_reply(reply_line(&names).as_bytes(), 3),
            Ok(Reply::Listeners(names.map(String::from).to_vec()))
        );
        assert_eq!(
            parse_reply(b"ztunnel-draining v1\n", 0),
            Ok(Reply::Draining)
        );
    }

    #[test]
    fn a_reply_that_would_lose_or_mislabel_a_listener_is_refused() {
        for (bytes, fds) in [
            (&b"ztunnel-listeners v1 a,b\n"[..], 3),
            (b"ztunnel-listeners v1 a,a\n", 2),
            (b"ztunnel-listeners v1 \n", 1),
            (b"ztunnel-listeners v1 a,,b\n", 3),
            (b"ztunnel-listeners v1 a b\n", 1),
            (b"ztunnel-listeners v2 a\n", 1),
            (b"HTTP/1.1 400 Bad Request\r\n", 0),
            (b"\xff\xfe", 0),
            (b"", 0),
        ] {
            assert!(
                parse_reply(bytes, fds).is_err(),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}

#[cfg(test)]
mod socket_tests;
