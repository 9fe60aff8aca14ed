//! The server side of the CNI plugin (`ztunnel-cni`): a root-only Unix
//! socket where the plugin, run by the container runtime for each new pod,
//! waits until the pod's capture is attached. Until this answers, the pod's
//! sandbox is not set up and none of its containers run.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
    time::Instant,
};
use tracing::{info, warn};
use ztunnel_cni::protocol::{Command, Reply, Request, MAX_MESSAGE};

use super::enroller::Enrollment;

/// The longest a plugin may ask ztunnel to try.
const MAX_WAIT: Duration = Duration::from_secs(120);
/// Answer this much before the plugin's own deadline, so it hears why.
const MARGIN: Duration = Duration::from_millis(500);
/// How long a peer may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a handler looks again for a pod the API has not shown yet.
const POLL: Duration = Duration::from_millis(50);

/// Binds the socket: root only (mode 0600 in a private directory).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let err = |e: std::io::Error| anyhow::anyhow!("CNI socket {}: {e}", path.display());
    crate::handover::private_dir(path).map_err(err)?;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves the plugin until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    enrollment: Arc<Enrollment>,
    host_veths: watch::Sender<super::HostVeths>,
) {
    let host_veths = Arc::new(host_veths);
    info!(socket = %path.display(), "CNI plugin socket listening");
    crate::accept::accept_until_drained("cni", &listener, None, |stream, _| {
        // Only root may hold a pod's setup or announce addresses.
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 => {}
            Ok(cred) => {
                warn!(uid = cred.uid(), pid = ?cred.pid(), "CNI socket: refused a peer that is not root");
                return;
            }
            Err(e) => {
                warn!(error = %e, "CNI socket: refused a peer whose credentials cannot be read");
                return;
            }
        }
        tokio::spawn(connection(stream, enrollment.clone(), host_veths.clone()));
    })
    .await
}

async fn connection(
    stream: UnixStream,
    enrollment: Arc<Enrollment>,
    host_veths: Arc<watch::Sender<super::HostVeths>>,
) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_MESSAGE as u64));
    let reply =
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Err(_) => return, // A peer that says nothing is dropped.
            Ok(Err(e)) => Reply::Failed {
                message: format!("reading the request: {e}"),
            },
            Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
                Ok(request) => handle(&enrollment, &host_veths, request).await,
                Err(e) => Reply::Failed {
                    message: format!("not a request: {e}"),
                },
            },
        };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

async fn handle(
    enrollment: &Enrollment,
    host_veths: &watch::Sender<super::HostVeths>,
    request: Request,
) -> Reply {
    let who = format!("{}/{}", request.namespace, request.pod);
    let key = (request.namespace.clone(), request.pod.clone());
    match request.command {
        Command::Del => {
            enrollment.announce(key, &request.container_id, None);
            host_veths.send_if_modified(|v| {
                let before = v.len();
                v.retain(|ip, veth| {
                    !(request.ips.contains(ip)
                        && request.host_interface.as_ref().is_none_or(|h| h == veth))
                });
                v.len() != before
            });
            Reply::Released
        }
        Command::Add => {
            let wait = Duration::from_millis(request.timeout_ms).min(MAX_WAIT);
            let deadline = Instant::now() + wait.saturating_sub(MARGIN);
            let reply = add(enrollment, host_veths, &request, key, deadline).await;
            match &reply {
                Reply::Captured => {
                    info!(pod = %who, ips = ?request.ips, "CNI: new pod captured before it starts")
                }
                Reply::Failed { message } => {
                    warn!(pod = %who, ips = ?request.ips, error = %message, "CNI: new pod not captured; its setup fails")
                }
                _ => {}
            }
            reply
        }
    }
}

async fn add(
    enrollment: &Enrollment,
    host_veths: &watch::Sender<super::HostVeths>,
    request: &Request,
    key: (String, String),
    deadline: Instant,
) -> Reply {
    if request.ips.is_empty() {
        return Reply::Failed {
            message: "no IPv4 address given".into(),
        };
    }
    // The pod and its namespace were created before its sandbox, but the
    // watch may lag (or not have listed anything yet, just after a start):
    // an unknown namespace would read as "not ambient".
    let pod = loop {
        if enrollment.ready() {
            if let Some(pod) = enrollment.pod(&request.namespace, &request.pod) {
                if enrollment.namespace(&request.namespace).is_some() {
                    break pod;
                }
            }
        }
        if Instant::now() >= deadline {
            let why = match enrollment.ready() {
                false => "the Kubernetes API has not listed pods and namespaces yet",
                true => {
                    "the Kubernetes API has not shown this pod (and its namespace) on this node"
                }
            };
            return Reply::Failed {
                message: why.into(),
            };
        }
        tokio::time::sleep(POLL).await;
    };
    if !enrollment.wants_capture(&pod) {
        return Reply::NotAmbient;
    }
    let ips: BTreeSet<Ipv4Addr> = request.ips.iter().copied().collect();
    // Before the addresses: capture must know the veth when it first
    // enrolls them.
    if let Some(veth) = &request.host_interface {
        host_veths.send_modify(|v| {
            for ip in &ips {
                v.insert(*ip, veth.clone());
            }
        });
    }
    enrollment.announce(key, &request.container_id, Some(request.ips.clone()));
    let mut captured = enrollment.captured.clone();
    // On this sandbox's veth when the plugin named it: capture left at the
    // same address by an earlier pod does not count.
    let veth = request.host_interface.clone();
    let in_place = async {
        captured
            .wait_for(|c| {
                ips.iter().all(|ip| {
                    c.get(ip)
                        .is_some_and(|on| veth.as_ref().is_none_or(|v| on.as_ref() == Some(v)))
                })
            })
            .await
            .map(|_| ())
    };
    match tokio::time::timeout_at(deadline, in_place).await {
        Ok(Ok(())) => Reply::Captured,
        Ok(Err(_)) => Reply::Failed {
            message: "ztunnel is stopping".into(),
        },
        Err(_) => Reply::Failed {
            message: format!(
                "capture was not in place within {:.1}s",
                request.timeout_ms as f64 / 1000.0
            ),
        },
    }
}
