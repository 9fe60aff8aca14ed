//! Runs the CNI plugin (`ztunnel-cni`) the way a container runtime does:
//! `CNI_*` variables, the network configuration with the previous plugin's
//! result on stdin, the result or error read from stdout.

use std::{
    io::Write,
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::lab::{Pod, PodSpec};

/// One call of the plugin.
pub struct Call<'a> {
    pub command: &'a str,
    pub namespace: &'a str,
    pub pod: &'a PodSpec,
    /// The pod's network namespace (any path for pods the lab did not make).
    pub netns: String,
    pub socket: &'a str,
    pub timeout_seconds: u64,
    pub exclude_namespaces: &'a [&'a str],
    /// Run as this uid instead of root.
    pub uid: Option<u32>,
    /// The bridge, for a pod the previous plugin wired to one (the bridge
    /// plugin lists it before the pod's veth).
    pub bridge: Option<&'a str>,
}

/// What the plugin did.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: Value,
    pub took: Duration,
}

impl<'a> Call<'a> {
    pub fn add(namespace: &'a str, pod: &'a PodSpec, socket: &'a str) -> Self {
        Call {
            command: "ADD",
            namespace,
            pod,
            netns: format!("/run/netns/none-{}", pod.name),
            socket,
            timeout_seconds: 10,
            exclude_namespaces: &[],
            uid: None,
            bridge: None,
        }
    }

    /// For a pod the lab created: its namespace as `CNI_NETNS`.
    pub fn for_lab_pod(mut self, pod: &Pod) -> Self {
        self.netns = pod.ns.path().display().to_string();
        self
    }

    /// What a routed CNI (ptp, Calico) reports: the host-side veth, the
    /// pod's `eth0`, and its /32; the bridge plugin lists its bridge first.
    pub fn prev_result(&self) -> Value {
        let mut interfaces = Vec::new();
        if let Some(bridge) = self.bridge {
            interfaces.push(json!({"name": bridge, "mac": "02:00:00:00:00:00"}));
        }
        interfaces
            .push(json!({"name": format!("vz{}", self.pod.name), "mac": "02:00:00:00:00:01"}));
        interfaces.push(json!({"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": self.netns}));
        let pod_interface = interfaces.len() - 1;
        json!({
            "cniVersion": "1.0.0",
            "interfaces": interfaces,
            "ips": [{"address": format!("{}/32", self.pod.ip), "interface": pod_interface}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        })
    }

    pub fn config(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "ztunnel-cni",
            "socket": self.socket,
            "timeoutSeconds": self.timeout_seconds,
            "excludeNamespaces": self.exclude_namespaces,
            "prevResult": self.prev_result(),
        })
    }

    /// Runs the plugin binary with `stdin` (the configuration unless given).
    pub fn run_with(&self, stdin: &[u8]) -> Result<Outcome> {
        let binary = crate::ztunnel::built_binary("ztunnel-cni", "ZTUNNEL_CNI_BIN")?;
        let mut cmd = Command::new(&binary);
        cmd.env_clear()
            .env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", format!("sandbox-{}", self.pod.name))
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=sandbox-{}",
                    self.namespace, self.pod.name, self.pod.name
                ),
            )
            .env("CNI_PATH", binary.parent().unwrap_or(&binary))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(uid) = self.uid {
            cmd.uid(uid).gid(uid);
        }
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", binary.display()))?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin)?;
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let stdout = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .with_context(|| format!("plugin output is not JSON: {text}"))?
        };
        Ok(Outcome {
            success: out.status.success(),
            stdout,
            took: start.elapsed(),
        })
    }

    pub fn run(&self) -> Result<Outcome> {
        self.run_with(self.config().to_string().as_bytes())
    }
}
