//! The parts of the CNI specification (1.0, and the 0.3/0.4 results that
//! share its shape) the plugin reads and writes.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The versions this plugin speaks (`VERSION`).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes of the specification this plugin uses.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: the runtime retries the pod's setup.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// ztunnel answered and refused: the pod is not captured.
    pub const NOT_CAPTURED: u32 = 100;
}

/// The network configuration on stdin: the spec's keys plus this plugin's.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The previous plugin's result; required: this plugin only chains.
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// ztunnel's CNI socket.
    #[serde(default)]
    pub socket: Option<String>,
    /// How long a new pod waits for its capture (default 30).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// Namespaces whose pods are passed through without asking ztunnel
    /// (never in ambient mode), so they start while ztunnel is down.
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
}

/// A failure as the spec wants it on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{msg}: {details}")]
pub struct CniError {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(version: &str, code: u32, msg: &str, details: impl Into<String>) -> Self {
        CniError {
            cni_version: version.to_string(),
            code,
            msg: msg.to_string(),
            details: details.into(),
        }
    }
}

/// `CNI_ARGS`: `K=V;K=V`.
pub fn parse_args(args: &str) -> BTreeMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// What the previous plugin set up, read from its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub ips: Vec<Ipv4Addr>,
    /// The interface on the host side (no `sandbox`), if one was reported.
    pub host_interface: Option<String>,
}

/// Reads the IPv4 addresses (`ips[].address`, CIDR notation) and the host
/// interface (`interfaces[]` without a sandbox) from a 0.3+ result.
pub fn pod_network(prev: &Value) -> Result<PodNetwork, String> {
    let ips = prev
        .get("ips")
        .and_then(Value::as_array)
        .ok_or("prevResult has no `ips` list")?;
    let mut out = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let address = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("prevResult.ips[{i}] has no `address`"))?;
        let host = address.split('/').next().unwrap_or(address);
        if host.contains(':') {
            continue;
        }
        let parsed: Ipv4Addr = host
            .parse()
            .map_err(|e| format!("prevResult.ips[{i}].address `{address}`: {e}"))?;
        out.push(parsed);
    }
    // The last one: the bridge plugin lists its bridge first, then the
    // pod's veth; routed plugins list only the veth.
    let host_interface = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .rfind(|i| {
            i.get("sandbox")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        })
        .and_then(|i| i.get("name").and_then(Value::as_str))
        .map(str::to_string);
    Ok(PodNetwork {
        ips: out,
        host_interface,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_addresses_and_the_host_side_interface() {
        let prev = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0"},
                {"name": "veth1234"},
                {"name": "eth0", "sandbox": "/var/run/netns/x"}
            ],
            "ips": [
                {"address": "10.1.2.3/32", "interface": 0},
                {"address": "fd00::3/128", "interface": 0}
            ]
        });
        let net = pod_network(&prev).unwrap();
        assert_eq!(net.ips, vec![Ipv4Addr::new(10, 1, 2, 3)]);
        assert_eq!(
            net.host_interface.as_deref(),
            Some("veth1234"),
            "not the bridge"
        );
    }

    #[test]
    fn a_bad_address_is_named() {
        let prev = serde_json::json!({"ips": [{"address": "10.1.2/24"}]});
        let e = pod_network(&prev).unwrap_err();
        assert!(e.contains("prevResult.ips[0].address `10.1.2/24`"), "{e}");
        assert!(pod_network(&serde_json::json!({})).is_err());
    }

    #[test]
    fn cni_args_split() {
        let a = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0");
        assert_eq!(a["K8S_POD_NAMESPACE"], "default");
        assert_eq!(a["K8S_POD_NAME"], "web-0");
    }
}
