//! Zero-downtime restarts: a new ztunnel takes the listening sockets over
//! from the running one through a local Unix socket (`SCM_RIGHTS`), so the
//! kernel keeps assigning captured flows to the very same sockets and their
//! accept queues carry over; the old process stops accepting and serves its
//! established connections until they end or its drain deadline passes.
//!
//! The wire exchange is one line each way: the new process sends
//! `ztunnel-takeover v1\n`; the old one answers `ztunnel-listeners v1
//! <name>,<name>,...\n` with the file descriptors attached, in that order.

use std::{
    io::{IoSlice, IoSliceMut, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tracing::{info, warn};

const REQUEST: &[u8] = b"ztunnel-takeover v1\n";
const REPLY_PREFIX: &str = "ztunnel-listeners v1 ";
/// How long a new process waits for the running one to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// More listeners than this in one reply is a protocol error.
const MAX_FDS: usize = 16;

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
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "default".into());
    PathBuf::from("/run/ztunnel").join(format!("{name}.handover.sock"))
}

/// Asks a running ztunnel for its listeners. `Ok(None)` when there is none
/// (no socket, or nobody listening on it).
pub fn take_over(path: &Path) -> Result<Option<Vec<(String, OwnedFd)>>, HandoverError> {
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
    let mut buf = vec![0u8; 1024];
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
    let n = msg.bytes;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let names = text
        .trim_end()
        .strip_prefix(REPLY_PREFIX)
        .ok_or_else(|| proto(format!("unexpected reply {text:?}")))?;
    let names: Vec<String> = names.split(',').map(str::to_string).collect();
    if names.len() != fds.len() {
        return Err(proto(format!(
            "{} names but {} descriptors",
            names.len(),
            fds.len()
        )));
    }
    Ok(Some(names.into_iter().zip(fds).collect()))
}

/// Waits for a new ztunnel to ask for the listeners, hands them over, and
/// returns. Runs on its own thread.
pub fn serve(listener: UnixListener, fds: Vec<(String, RawFd)>) -> Result<(), HandoverError> {
    loop {
        let (mut stream, _) = listener
            .accept()
            .map_err(|e| HandoverError::Protocol(e.to_string()))?;
        let _ = stream.set_read_timeout(Some(TIMEOUT));
        let mut request = [0u8; REQUEST.len()];
        if stream.read_exact(&mut request).is_err() || request != REQUEST {
            warn!("ignored a malformed handover request");
            continue;
        }
        let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
        let line = format!("{REPLY_PREFIX}{}\n", names.join(","));
        let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| *fd).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(line.as_bytes())],
            &cmsg,
            MsgFlags::empty(),
            None,
        ) {
            Ok(_) => {
                info!(listeners = %names.join(","), "listeners handed over to a new ztunnel");
                return Ok(());
            }
            Err(e) => warn!(error = %e, "handing the listeners over failed; still serving"),
        }
    }
}

/// Binds the handover socket at `path`, replacing a previous instance's.
pub fn bind(path: &Path) -> Result<UnixListener, HandoverError> {
    let err = |message: String| HandoverError::Socket {
        path: path.to_path_buf(),
        message,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    // The old instance's socket (if any) already answered or is gone; its
    // accepted connection does not need the name.
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| err(e.to_string()))
}

/// A descriptor's raw number, for handing over.
pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}
