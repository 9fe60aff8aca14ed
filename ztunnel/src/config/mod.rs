//! How ztunnel is configured: command-line flags with environment fallbacks
//! (Istio's ztunnel's variable names where it has one), and the local file.

pub mod local;

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Flags and their environment fallbacks. Other tools script against these:
/// change them only compatibly.
#[derive(Debug, Clone, Parser)]
#[command(name = "ztunnel", version, about = "Node proxy of an ambient service mesh")]
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
    #[arg(long = "uplink", env = "ZTUNNEL_UPLINKS", value_delimiter = ',', value_name = "IFACE")]
    pub uplinks: Vec<String>,

    /// Where programs, links and maps are pinned. Default:
    /// /sys/fs/bpf/ztunnel/<node-name>, so two instances never collide.
    #[arg(long, env = "ZTUNNEL_BPF_PIN_DIR", value_name = "DIR")]
    pub bpf_pin_dir: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "ZTUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

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
    /// The pin directory in effect.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpf_pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/ztunnel").join(&self.node_name))
    }
}
