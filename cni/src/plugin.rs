//! One invocation of the plugin, as the CNI spec's runtime makes it:
//! `CNI_*` variables, the network configuration on stdin, a result or an
//! error on stdout.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    time::Duration,
};

use serde_json::Value;

use crate::{
    protocol::{Command, Reply, Request, DEFAULT_SOCKET, MAX_MESSAGE},
    spec::{code, parse_args, pod_network, CniError, NetConf, SUPPORTED_VERSIONS},
};

/// How long a new pod waits for its capture unless the config says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a DEL waits for ztunnel: a DEL never fails on its account.
const DEL_TIMEOUT: Duration = Duration::from_secs(5);

/// What to print on stdout, and whether the invocation succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Outcome {
            stdout,
            success: true,
        }
    }

    fn failed(e: CniError) -> Self {
        Outcome {
            stdout: serde_json::to_string(&e).unwrap_or_else(|_| e.to_string()),
            success: false,
        }
    }
}

/// Runs one invocation: `env` reads the `CNI_*` variables.
pub fn run(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    match invoke(env, stdin) {
        Ok(stdout) => Outcome::ok(stdout),
        Err(e) => Outcome::failed(e),
    }
}

fn invoke(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<String, CniError> {
    let command = env("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        return Ok(serde_json::json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })
        .to_string());
    }
    if command == "DEL" {
        // A DEL never fails: a runtime that cannot tear a pod down is stuck.
        // Whatever ztunnel does not hear of, it forgets when the pod leaves
        // the API.
        if let Ok(conf) = serde_json::from_slice::<NetConf>(stdin) {
            del(env, &conf);
        }
        return Ok(String::new());
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            "1.0.0",
            code::DECODE,
            "the network configuration is not valid",
            e.to_string(),
        )
    })?;
    let version = conf.cni_version.clone();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(
            &version,
            code::INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
            format!(
                "{version}; this plugin speaks {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    match command.as_str() {
        "ADD" => add(env, &conf),
        // Nothing of ours to verify or collect beyond what ztunnel keeps in
        // sync itself.
        "CHECK" | "GC" | "STATUS" => Ok(String::new()),
        "" => Err(CniError::new(
            &version,
            code::INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set",
            "",
        )),
        other => Err(CniError::new(
            &version,
            code::INVALID_ENVIRONMENT,
            "unknown CNI_COMMAND",
            other.to_string(),
        )),
    }
}

/// The Kubernetes pod an invocation is for, when the runtime said.
fn pod_of(env: &dyn Fn(&str) -> Option<String>) -> Option<(String, String)> {
    let args = parse_args(&env("CNI_ARGS").unwrap_or_default());
    let namespace = args.get("K8S_POD_NAMESPACE")?.clone();
    let pod = args.get("K8S_POD_NAME")?.clone();
    Some((namespace, pod))
}

fn add(env: &dyn Fn(&str) -> Option<String>, conf: &NetConf) -> Result<String, CniError> {
    let version = conf.cni_version.as_str();
    let invalid =
        |msg: &str, details: String| CniError::new(version, code::INVALID_CONFIG, msg, details);
    let Some(prev) = conf.prev_result.as_ref() else {
        return Err(invalid(
            "no prevResult",
            "ztunnel-cni only chains: list it after the plugin that sets up the pod's network"
                .into(),
        ));
    };
    let passed = || pass_through(prev, version);
    let Some((namespace, pod)) = pod_of(env) else {
        return passed(); // Not a Kubernetes pod: nothing ambient about it.
    };
    if conf.exclude_namespaces.contains(&namespace) {
        return passed();
    }
    let network = pod_network(prev)
        .map_err(|e| CniError::new(version, code::DECODE, "cannot read prevResult", e))?;
    if network.ips.is_empty() {
        // Capture is IPv4 only: an IPv6-only pod has nothing to capture.
        return passed();
    }
    let required = |name: &str| {
        env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            CniError::new(
                version,
                code::INVALID_ENVIRONMENT,
                "missing variable",
                name.to_string(),
            )
        })
    };
    let timeout = conf
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let request = Request {
        command: Command::Add,
        namespace: namespace.clone(),
        pod: pod.clone(),
        container_id: required("CNI_CONTAINERID")?,
        netns: required("CNI_NETNS")?,
        interface: required("CNI_IFNAME")?,
        host_interface: network.host_interface,
        ips: network.ips.clone(),
        timeout_ms: timeout.as_millis() as u64,
    };
    let socket = conf.socket.as_deref().unwrap_or(DEFAULT_SOCKET);
    let who = format!("pod {namespace}/{pod} ({})", addresses(&network.ips));
    match ask(socket, &request, timeout) {
        Ok(Reply::Captured) | Ok(Reply::NotAmbient) => passed(),
        Ok(Reply::Failed { message }) => Err(CniError::new(
            version,
            code::NOT_CAPTURED,
            "ztunnel did not capture the pod",
            format!("{who}: {message}"),
        )),
        Ok(other) => Err(CniError::new(
            version,
            code::TRY_AGAIN_LATER,
            "unexpected answer from ztunnel",
            format!("{who}: {other:?}"),
        )),
        // ztunnel is not there (starting, restarting, after a reboot) or
        // too slow: the runtime retries the pod later.
        Err(e) => Err(CniError::new(
            version,
            code::TRY_AGAIN_LATER,
            "ztunnel did not confirm the pod's capture",
            format!("{who}: {e} (socket {socket})"),
        )),
    }
}

fn del(env: &dyn Fn(&str) -> Option<String>, conf: &NetConf) {
    let Some((namespace, pod)) = pod_of(env) else {
        return;
    };
    let ips = conf
        .prev_result
        .as_ref()
        .and_then(|p| pod_network(p).ok())
        .map(|n| n.ips)
        .unwrap_or_default();
    let request = Request {
        command: Command::Del,
        namespace,
        pod,
        container_id: env("CNI_CONTAINERID").unwrap_or_default(),
        netns: env("CNI_NETNS").unwrap_or_default(),
        interface: env("CNI_IFNAME").unwrap_or_default(),
        host_interface: None,
        ips,
        timeout_ms: DEL_TIMEOUT.as_millis() as u64,
    };
    let socket = conf.socket.as_deref().unwrap_or(DEFAULT_SOCKET);
    // A DEL must succeed even when ztunnel is away; it forgets the pod's
    // addresses on its own when the pod leaves the API.
    let _ = ask(socket, &request, DEL_TIMEOUT);
}

/// The previous result, unchanged but for the version the runtime asked for.
fn pass_through(prev: &Value, version: &str) -> Result<String, CniError> {
    let mut result = prev.clone();
    if let Some(object) = result.as_object_mut() {
        object.insert("cniVersion".into(), Value::String(version.to_string()));
    }
    Ok(result.to_string())
}

fn addresses(ips: &[Ipv4Addr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One request and its reply over ztunnel's socket, within `timeout`.
pub fn ask(socket: &str, request: &Request, timeout: Duration) -> Result<Reply, String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("cannot reach ztunnel: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("writing to ztunnel: {e}"))?;
    let mut reply = Vec::new();
    BufReader::new(stream.take(MAX_MESSAGE as u64))
        .read_until(b'\n', &mut reply)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("no answer within {}s", timeout.as_secs())
            }
            _ => format!("reading ztunnel's answer: {e}"),
        })?;
    if reply.is_empty() {
        return Err("ztunnel closed the connection without an answer".into());
    }
    serde_json::from_slice(&reply).map_err(|e| format!("ztunnel's answer is not valid: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn version_lists_what_it_speaks() {
        let out = run(&env(&[("CNI_COMMAND", "VERSION")]), b"");
        assert!(out.success);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"1.0.0".into()));
    }

    #[test]
    fn bad_input_gets_the_specs_error_codes() {
        let add = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"),
        ]);
        let code_of = |out: Outcome| -> u64 {
            assert!(!out.success);
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(code_of(run(&add, b"{not json")), 6);
        let del = env(&[("CNI_COMMAND", "DEL")]);
        assert!(run(&del, b"{not json").success, "a DEL never fails");
        assert!(run(&del, br#"{"cniVersion":"0.1.0","type":"ztunnel-cni"}"#).success);
        assert_eq!(
            code_of(run(&add, br#"{"cniVersion":"0.2.0","type":"ztunnel-cni"}"#)),
            1
        );
        // Not chained: no previous result to pass on.
        assert_eq!(
            code_of(run(&add, br#"{"cniVersion":"1.0.0","type":"ztunnel-cni"}"#)),
            7
        );
        let conf = br#"{"cniVersion":"1.0.0","type":"ztunnel-cni","prevResult":{"ips":[{"address":"10.0.0.1/32"}]}}"#;
        assert_eq!(code_of(run(&env(&[("CNI_COMMAND", "BOGUS")]), conf)), 4);
        // A container that is not a Kubernetes pod passes through untouched.
        let plain = run(&env(&[("CNI_COMMAND", "ADD")]), conf);
        assert!(plain.success);
        let v: Value = serde_json::from_str(&plain.stdout).unwrap();
        assert_eq!(v["ips"][0]["address"], "10.0.0.1/32");
        assert_eq!(v["cniVersion"], "1.0.0");
    }
}
