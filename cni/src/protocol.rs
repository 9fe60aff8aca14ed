//! What the plugin and ztunnel say over the socket: one JSON request line,
//! one JSON reply line.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Where ztunnel listens by default (the DaemonSet's setting).
pub const DEFAULT_SOCKET: &str = "/run/ztunnel/cni.sock";
/// Longest line either side accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// A pod's network is set up: capture it if it is in ambient mode.
    Add,
    /// A pod's network is being torn down.
    Del,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    pub command: Command,
    pub namespace: String,
    pub pod: String,
    pub container_id: String,
    /// The pod's network namespace, as the runtime gave it.
    pub netns: String,
    /// The interface inside the pod (`eth0`).
    pub interface: String,
    /// The pod's host-side veth, when the previous plugin reported it.
    #[serde(default)]
    pub host_interface: Option<String>,
    pub ips: Vec<Ipv4Addr>,
    /// How long ztunnel may take before the plugin gives up.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum Reply {
    /// Capture is attached for every address of the pod.
    Captured,
    /// The pod is not in ambient mode: nothing to wait for.
    NotAmbient,
    /// A DEL was taken.
    Released,
    /// ztunnel could not capture the pod; the message says why.
    Failed { message: String },
}
