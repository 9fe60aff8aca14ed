//! The operator's view: admin on 127.0.0.1:15000 (read-only: `/config_dump`,
//! `/logging`), the same plus what changes state (`/logging?level=`,
//! `/quitquitquit`) on a root-only Unix socket, Prometheus metrics on :15020
//! (`/metrics`, `/stats/prometheus`), readiness on :15021 (`/healthz/ready`).
//!
//! ztunnel runs in the node's network namespace, so 127.0.0.1:15000 is open
//! to every node process and hostNetwork pod; nothing there may change
//! ztunnel's state.

pub mod http;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::SystemTime,
};

use ::http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::sync::{watch, Notify};

use self::http::{json, refuse, text, Handler, Reply};
use crate::{identity::CertManager, metrics::Metrics, redirect::CaptureStatus, state::Snapshot};

/// Installs a log filter directive, or says why it cannot.
type ApplyFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// Changes the log filter at run time (an `EnvFilter` directive) and
/// remembers the one in force.
pub struct LogControl {
    apply: Box<ApplyFilter>,
    current: Mutex<String>,
}

impl LogControl {
    pub fn new(
        initial: String,
        apply: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(LogControl {
            apply: Box::new(apply),
            current: Mutex::new(initial),
        })
    }

    /// Applies `directive`; the filter in force stays on error.
    pub fn set(&self, directive: &str) -> Result<(), String> {
        (self.apply)(directive)?;
        if let Ok(mut current) = self.current.lock() {
            *current = directive.to_string();
        }
        Ok(())
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// What an admin endpoint may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// 127.0.0.1:15000, open to every process in the node's namespace:
    /// reads only.
    ReadOnly,
    /// The root-only admin socket: reads and changes.
    Full,
}

/// Everything the operator endpoints read.
pub struct Status {
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub certs: Arc<CertManager>,
    pub capture: RwLock<CaptureStatus>,
    /// `Ok` once ready; the reason otherwise.
    pub readiness: RwLock<Result<(), String>>,
    pub metrics: Arc<Metrics>,
    pub log_control: Arc<LogControl>,
    /// Notified by `/quitquitquit`.
    pub shutdown: Arc<Notify>,
    /// Where changes are accepted (named in refusals on the TCP port).
    pub admin_socket: PathBuf,
    /// The xDS client, when the configuration comes from a control plane.
    pub xds: Option<Arc<crate::xds::XdsClient>>,
    /// The pod addresses capture is attached for now (the pod watcher
    /// annotates a pod only once its addresses are here).
    pub captured: watch::Sender<crate::k8s::Captured>,
}

impl Status {
    /// Works out readiness: configuration loaded (we are running), a
    /// certificate for every local identity, capture on for every local
    /// enrolled workload.
    pub fn update_readiness(&self) {
        let snapshot = self.state.borrow().clone();
        let mut reasons = Vec::new();
        let issued: Vec<_> = self
            .certs
            .snapshot()
            .iter()
            .map(|c| c.identity.clone())
            .collect();
        for id in snapshot.local_identities() {
            if !issued.contains(&id) {
                reasons.push(format!("no certificate for {id}"));
            }
        }
        if let Ok(capture) = self.capture.read() {
            for pod in capture.pods.iter().filter(|p| p.enrolled && !p.captured) {
                reasons.push(format!("capture not attached for {}", pod.ip));
            }
        }
        if let Ok(mut readiness) = self.readiness.write() {
            let next = if reasons.is_empty() {
                Ok(())
            } else {
                Err(reasons.join("; "))
            };
            // Transitions only: the probe's state is in the log when it
            // changes, not every tick.
            match (&*readiness, &next) {
                (Err(_), Ok(())) => tracing::info!("readiness probe passes"),
                (Ok(()), Err(why)) => tracing::warn!(reason = %why, "readiness probe fails"),
                _ => {}
            }
            *readiness = next;
        }
    }
}

fn path_and_query(req: &Request<Incoming>) -> (String, String) {
    (
        req.uri().path().to_string(),
        req.uri().query().unwrap_or("").to_string(),
    )
}

/// The `level` of a `/logging` query, decoded as a form (every `%XX`
/// escape, `+` as a space; a malformed escape such as `%zz` stays literal,
/// invalid UTF-8 becomes U+FFFD). The first `level` wins.
pub fn log_level(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "level")
        .map(|(_, v)| v.into_owned())
}

/// The log filter a directive names (`RUST_LOG`, `/logging?level=`), read
/// as `EnvFilter` reads it but for two things the `admin_query` fuzz target
/// found:
/// - field values match as plain strings, not regular expressions:
///   building the automaton of a pattern of ~100 bytes can take minutes
///   and gigabytes, and a filter only ever needs to name a value;
/// - each comma-separated directive is trimmed first: tracing-subscriber
///   (0.3.23) scans a directive trimmed but slices it untrimmed, so a space
///   before one shifts its slices, into a multi-byte character (a panic)
///   or off its target (which is why `info, ztunnel=debug` did not work).
pub fn log_filter(directive: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let directives: Vec<&str> = directive.split(',').map(str::trim).collect();
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(directives.join(","))
        .map_err(|e| e.to_string())
}

/// The readiness endpoint.
pub fn readiness_handler(status: Arc<Status>) -> Handler {
    Arc::new(move |req| {
        let status = status.clone();
        Box::pin(async move {
            let (path, _) = path_and_query(&req);
            if path != "/healthz/ready" {
                return refuse(req.method(), &path, &[]);
            }
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return refuse(req.method(), &path, &[Method::GET, Method::HEAD]);
            }
            match status.readiness.read().map(|r| r.clone()) {
                Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
                Ok(Err(reason)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
                Err(_) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: status unavailable\n",
                ),
            }
        })
    })
}

/// The metrics endpoint.
pub fn metrics_handler(status: Arc<Status>) -> Handler {
    Arc::new(move |req| {
        let status = status.clone();
        Box::pin(async move {
            let (path, _) = path_and_query(&req);
            if path != "/metrics" && path != "/stats/prometheus" {
                return refuse(req.method(), &path, &[]);
            }
            if req.method() != Method::GET {
                return refuse(req.method(), &path, &[Method::GET]);
            }
            let mut reply = text(StatusCode::OK, status.metrics.encode());
            reply.headers_mut().insert(
                ::http::header::CONTENT_TYPE,
                ::http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            reply
        })
    })
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Source {
    LocalFile,
    Xds(crate::xds::XdsStatus),
}

#[derive(Serialize)]
struct CertDump {
    identity: String,
    serial: String,
    not_before: u64,
    not_after: u64,
    expires_in_seconds: i64,
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    node: &'a str,
    trust_domain: &'a str,
    /// `local file`, or the xDS stream's state.
    source: Source,
    workloads: Vec<&'a crate::state::Workload>,
    services: &'a [crate::config::local::Service],
    policies: &'a [crate::config::local::Authorization],
    certificates: Vec<CertDump>,
    capture: CaptureStatus,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The admin endpoint: read-only on 127.0.0.1:15000, full on the admin
/// socket.
pub fn admin_handler(status: Arc<Status>, access: Access) -> Handler {
    Arc::new(move |req| {
        let status = status.clone();
        Box::pin(async move { admin(&status, access, req) })
    })
}

/// The answer to a request that would change state, on the read-only port.
fn needs_socket(status: &Status, what: &str) -> Reply {
    text(
        StatusCode::FORBIDDEN,
        format!(
            "{what} changes ztunnel's state: send it to the admin socket {} (root only), e.g. curl --unix-socket {} -X POST http://localhost/quitquitquit\n",
            status.admin_socket.display(),
            status.admin_socket.display()
        ),
    )
}

fn admin(status: &Status, access: Access, req: Request<Incoming>) -> Reply {
    let (path, query) = path_and_query(&req);
    let method = req.method().clone();
    match path.as_str() {
        "/" => match method {
            Method::GET => text(
                StatusCode::OK,
                match access {
                    Access::ReadOnly => "/config_dump\n/logging (the filter in force)\nchanges (/logging?level=, /quitquitquit) only on the admin socket\n",
                    Access::Full => "/config_dump\n/logging?level=<filter> (POST)\n/quitquitquit (POST)\n",
                },
            ),
            _ => refuse(&method, &path, &[Method::GET]),
        },
        "/config_dump" => match method {
            Method::GET => {
                let snapshot = status.state.borrow().clone();
                let now = SystemTime::now();
                let certificates = status
                    .certs
                    .snapshot()
                    .iter()
                    .map(|c| CertDump {
                        identity: c.identity.to_string(),
                        serial: c.serial.clone(),
                        not_before: unix(c.not_before),
                        not_after: unix(c.not_after),
                        expires_in_seconds: unix(c.not_after) as i64 - unix(now) as i64,
                    })
                    .collect();
                let capture = status.capture.read().map(|c| c.clone()).unwrap_or_default();
                let dump = ConfigDump {
                    node: &snapshot.node,
                    trust_domain: &snapshot.trust_domain,
                    source: match &status.xds {
                        Some(xds) => Source::Xds(xds.status()),
                        None => Source::LocalFile,
                    },
                    workloads: snapshot.workloads.iter().map(|w| w.as_ref()).collect(),
                    services: &snapshot.services,
                    policies: &snapshot.policies,
                    certificates,
                    capture,
                };
                match serde_json::to_string_pretty(&dump) {
                    Ok(body) => json(body),
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("encoding config: {e}\n"),
                    ),
                }
            }
            _ => refuse(&method, &path, &[Method::GET]),
        },
        "/logging" => match method {
            Method::GET | Method::POST => {
                let Some(level) = log_level(&query) else {
                    if method == Method::GET {
                        return text(StatusCode::OK, format!("{}\n", status.log_control.current()));
                    }
                    return text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=<filter>, e.g. level=debug or level=ztunnel::proxy=trace\n");
                };
                if access == Access::ReadOnly {
                    return needs_socket(status, "changing the log filter");
                }
                if method != Method::POST {
                    return refuse(&method, &path, &[Method::POST]);
                }
                match status.log_control.set(&level) {
                    Ok(()) => {
                        tracing::info!(filter = %level, "log filter changed");
                        text(StatusCode::OK, format!("log filter set to {level}\n"))
                    }
                    Err(e) => text(
                        StatusCode::BAD_REQUEST,
                        format!("bad filter {level}: {e}\n"),
                    ),
                }
            }
            _ => refuse(&method, &path, &[Method::GET, Method::POST]),
        },
        "/quitquitquit" => match method {
            Method::POST if access == Access::ReadOnly => needs_socket(status, "/quitquitquit"),
            Method::POST => {
                status.shutdown.notify_one();
                text(StatusCode::OK, "draining\n")
            }
            _ => refuse(&method, &path, &[Method::POST]),
        },
        _ => refuse(&method, &path, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::{log_filter, log_level};

    #[test]
    fn the_logging_query_decodes_every_escape() {
        let level = |q: &str| log_level(q);
        assert_eq!(level("level=%41").as_deref(), Some("A"));
        assert_eq!(
            level("level=ztunnel%3A%3Aproxy%3Dtrace%2Cwarn").as_deref(),
            Some("ztunnel::proxy=trace,warn")
        );
        assert_eq!(level("level=a+b").as_deref(), Some("a b"));
        assert_eq!(level("level=a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(level("level=%7e%7E").as_deref(), Some("~~"));
        // Malformed escapes stay as written, never a panic.
        assert_eq!(level("level=%zz").as_deref(), Some("%zz"));
        assert_eq!(level("level=%").as_deref(), Some("%"));
        assert_eq!(level("level=%4").as_deref(), Some("%4"));
        // Bytes that are not UTF-8 become U+FFFD.
        assert_eq!(level("level=%FF").as_deref(), Some("\u{FFFD}"));
        // The key is decoded too; the first `level` wins; others are ignored.
        assert_eq!(
            level("x=1&%6Cevel=debug&level=info").as_deref(),
            Some("debug")
        );
        assert_eq!(level("levels=debug"), None);
        assert_eq!(level(""), None);
        assert_eq!(level("level").as_deref(), Some(""));
    }

    /// Found by the `admin_query` fuzz target (a timeout): compiled as a
    /// regular expression, a field value like this one, whose automaton
    /// doubles with each `(a|b)`, took 10 s and 230 MB at 18 steps and
    /// 53 s and 860 MB at 20 (a 126-byte query); 40 would never finish.
    #[test]
    fn a_field_value_in_a_log_filter_is_not_compiled_as_a_pattern() {
        let pattern = format!("(a|b)*a{}", "(a|b)".repeat(40));
        let started = std::time::Instant::now();
        assert!(log_filter(&format!("ztunnel[{{peer={pattern}}}]=debug")).is_ok());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(log_filter("info,ztunnel::proxy[conn{peer=10.0.0.1:80}]=trace").is_ok());
        assert!(log_filter("ztunnel=loud").is_err());
    }

    /// Found by the `admin_query` fuzz target (a panic): `level=+a%C3%BB=info`
    /// decodes to ` aû=info`, which tracing-subscriber sliced at byte 3,
    /// inside the `û`.
    #[test]
    fn a_space_before_a_directive_is_no_panic() {
        let filter = log_filter(" a\u{fb}=info").expect("a target and a level");
        assert_eq!(filter.to_string(), "a\u{fb}=info");
        let filter = log_filter("warn, ztunnel::proxy=debug ,h2=off").unwrap();
        assert_eq!(filter.to_string(), "ztunnel::proxy=debug,h2=off,warn");
    }
}
