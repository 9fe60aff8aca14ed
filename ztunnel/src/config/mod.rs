//! How ztunnel is configured: command-line flags with environment fallbacks
//! (Istio's ztunnel's variable names where it has one), and the local file.

pub mod local;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// Flags and their environment fallbacks. Other tools script against these:
/// change them only compatibly.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "Node proxy of an ambient service mesh"
)]
pub struct Args {
    /// Local configuration (workloads, services, policies) in the schema
    /// Istio's ztunnel reads from LOCAL_XDS_PATH. Watched: edits apply
    /// without a restart.
    #[arg(long = "config", env = "LOCAL_XDS_PATH", value_name = "FILE")]
    pub config: PathBuf,

    /// This node's name: workloads whose `node` equals it are local.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: String,

    /// Interface where traffic from other nodes enters (repeatable). Default:
    /// every interface the main routing table uses, except loopback and the
    /// veths of local workloads.
    #[arg(
        long = "uplink",
        env = "ZTUNNEL_UPLINKS",
        value_delimiter = ',',
        value_name = "IFACE"
    )]
    pub uplinks: Vec<String>,

    /// Where programs, links and maps are pinned. Default:
    /// /sys/fs/bpf/ztunnel/<node-name>, so two instances never collide.
    #[arg(long, env = "ZTUNNEL_BPF_PIN_DIR", value_name = "DIR")]
    pub bpf_pin_dir: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "ZTUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Trust domain of workloads that do not name one.
    #[arg(long, env = "TRUST_DOMAIN", default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// A CA in Istio's plug-in layout (ca-cert.pem, ca-key.pem,
    /// root-cert.pem, cert-chain.pem) that issues workload certificates.
    /// Without it, a development root is generated once in --state-dir.
    #[arg(long, env = "ZTUNNEL_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,

    /// Where ztunnel keeps what must survive restarts (the development CA).
    #[arg(
        long,
        env = "ZTUNNEL_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/ztunnel"
    )]
    pub state_dir: PathBuf,

    /// Lifetime of workload certificates (e.g. 24h, 30m, 90s); they are
    /// replaced half way through.
    #[arg(long, env = "SECRET_TTL", value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,

    /// How long an inbound HBONE peer may take to finish its TLS and HTTP/2
    /// handshakes.
    #[arg(long, env = "ZTUNNEL_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// On SIGTERM or /quitquitquit (or after handing over to a new
    /// ztunnel), how long in-flight connections may run before they are
    /// closed.
    #[arg(long, env = "ZTUNNEL_DRAIN_DEADLINE", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_deadline: Duration,

    /// Unix socket through which a new ztunnel takes the listeners over from
    /// this one. Default: /run/ztunnel/<pin-dir name>.handover.sock.
    #[arg(long, env = "ZTUNNEL_HANDOVER_SOCKET", value_name = "PATH")]
    pub handover_socket: Option<PathBuf>,

    /// Worker threads of the async runtime (0: one per CPU core).
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Remove this instance's capture (links, maps, routing rule) and exit.
    /// A normal stop leaves capture attached, failing closed.
    #[arg(long)]
    pub uninstall: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Args {
    /// The handover socket in effect.
    pub fn handover_path(&self) -> PathBuf {
        self.handover_socket
            .clone()
            .unwrap_or_else(|| crate::handover::default_path(&self.pin_dir()))
    }

    /// The pin directory in effect.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpf_pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/ztunnel").join(&self.node_name))
    }
}

/// Parses `90s`, `30m`, `24h`, `2d`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 90s, 30m or 24h"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use s, m, h or d)"
            ))
        }
    };
    if seconds == 0 {
        return Err(format!("`{text}` must be longer than zero"));
    }
    Ok(Duration::from_secs(seconds))
}
