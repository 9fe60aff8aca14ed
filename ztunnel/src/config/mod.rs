//! How ztunnel is configured: command-line flags with environment fallbacks
//! (Istio's ztunnel's variable names where it has one), and the local file.

pub mod local;
pub mod source;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

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
    /// without a restart. Not with --xds-address.
    #[arg(long = "config", env = "LOCAL_XDS_PATH", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The control plane's xDS service (istiod: https://istiod.istio-system.svc:15012).
    /// Workloads, services and policies come from it instead of a file.
    #[arg(long, env = "XDS_ADDRESS", value_name = "URL")]
    pub xds_address: Option<String>,

    /// The control plane's CA service (default: the xDS address). With
    /// either set, certificates come from it and no CA key is read.
    #[arg(long, env = "CA_ADDRESS", value_name = "URL")]
    pub ca_address: Option<String>,

    /// Root certificate(s) the xDS server's certificate must chain to.
    #[arg(
        long,
        env = "XDS_ROOT_CA",
        value_name = "FILE",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub xds_root_ca: PathBuf,

    /// Root certificate(s) the CA server's certificate must chain to.
    #[arg(
        long,
        env = "CA_ROOT_CA",
        value_name = "FILE",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub ca_root_ca: PathBuf,

    /// File holding the token sent to the control plane as a bearer token
    /// (re-read at each request: projected tokens rotate).
    #[arg(
        long,
        env = "AUTH_TOKEN",
        value_name = "FILE",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    pub auth_token: PathBuf,

    /// Name to check the xDS server's certificate against, instead of the
    /// address's host.
    #[arg(long, env = "ALT_XDS_HOSTNAME", value_name = "NAME")]
    pub alt_xds_hostname: Option<String>,

    /// Name to check the CA server's certificate against.
    #[arg(long, env = "ALT_CA_HOSTNAME", value_name = "NAME")]
    pub alt_ca_hostname: Option<String>,

    /// This cluster's id, sent to the control plane.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

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

    /// Inbound HBONE handshakes in progress at once. Past it, the source
    /// holding the most loses its oldest.
    #[arg(
        long,
        env = "ZTUNNEL_MAX_HANDSHAKES",
        value_name = "N",
        default_value_t = 1024
    )]
    pub max_handshakes: usize,

    /// Inbound HBONE handshakes in progress from one address. Past it, that
    /// address loses its oldest.
    #[arg(
        long,
        env = "ZTUNNEL_MAX_HANDSHAKES_PER_SOURCE",
        value_name = "N",
        default_value_t = 64
    )]
    pub max_handshakes_per_source: usize,

    /// Established inbound HBONE connections from one identity. Past it, new
    /// ones are refused (GOAWAY).
    #[arg(
        long,
        env = "ZTUNNEL_MAX_CONNECTIONS_PER_PEER",
        value_name = "N",
        default_value_t = 2048
    )]
    pub max_connections_per_peer: usize,

    /// An inbound HBONE connection with no stream open for this long is
    /// closed (GOAWAY); `0s` never.
    #[arg(long, env = "ZTUNNEL_HBONE_IDLE_TIMEOUT", value_name = "DURATION", default_value = "5m", value_parser = parse_timeout_or_never)]
    pub hbone_idle_timeout: Duration,

    /// A relayed connection on which no byte has moved either way for this
    /// long is closed; `0s` never.
    #[arg(long, env = "ZTUNNEL_IDLE_TIMEOUT", value_name = "DURATION", default_value = "1h", value_parser = parse_timeout_or_never)]
    pub idle_timeout: Duration,

    /// On SIGTERM or /quitquitquit (or after handing over to a new
    /// ztunnel), how long in-flight connections may run before they are
    /// closed.
    #[arg(long, env = "ZTUNNEL_DRAIN_DEADLINE", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_deadline: Duration,

    /// Unix socket through which a new ztunnel takes the listeners over from
    /// this one. Default: /run/ztunnel/<pin-dir name>.handover.sock.
    #[arg(long, env = "ZTUNNEL_HANDOVER_SOCKET", value_name = "PATH")]
    pub handover_socket: Option<PathBuf>,

    /// Root-only Unix socket for what changes ztunnel's state
    /// (`POST /logging?level=`, `POST /quitquitquit`); 127.0.0.1:15000 only
    /// reads. Default: /run/ztunnel/<pin-dir name>.admin.sock.
    #[arg(long, env = "ZTUNNEL_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,

    /// Proxy worker threads (0: one per CPU core, at most 64). Each has its
    /// own runtime, its own member of each capture port's `SO_REUSEPORT`
    /// group and its own HBONE pool, so a connection stays on one thread.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Enroll pods from the Kubernetes API, as istio-cni's node agent does:
    /// the pods of this node in namespaces labelled
    /// `istio.io/dataplane-mode=ambient` (or labelled so themselves, and not
    /// `none`) are captured, then annotated
    /// `ambient.istio.io/redirection: enabled`, which istiod waits for. The
    /// API is found as kubectl finds it: `KUBECONFIG`, or in-cluster.
    #[arg(long, env = "ZTUNNEL_ENROLL_PODS")]
    pub enroll_pods: bool,

    /// With `--enroll-pods`: where the CNI plugin (`ztunnel-cni`) asks
    /// whether a new pod is captured yet. Root-only. Off when unset.
    #[arg(
        long,
        env = "ZTUNNEL_CNI_SOCKET",
        value_name = "PATH",
        requires = "enroll_pods"
    )]
    pub cni_socket: Option<PathBuf>,

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

    /// The admin socket in effect.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| crate::handover::run_dir_path(&self.pin_dir(), "admin.sock"))
    }

    /// The xDS endpoint, when there is a control plane.
    pub fn xds_endpoint(&self) -> Option<crate::grpc::ControlPlaneEndpoint> {
        let address = self.xds_address.clone()?;
        Some(self.endpoint(
            address,
            &self.xds_root_ca,
            &self.alt_xds_hostname,
            "XDS_HEADER_",
        ))
    }

    /// The CA endpoint, when certificates come from the control plane.
    pub fn ca_endpoint(&self) -> Option<crate::grpc::ControlPlaneEndpoint> {
        let address = self
            .ca_address
            .clone()
            .or_else(|| self.xds_address.clone())?;
        Some(self.endpoint(
            address,
            &self.ca_root_ca,
            &self.alt_ca_hostname,
            "CA_HEADER_",
        ))
    }

    fn endpoint(
        &self,
        address: String,
        root: &std::path::Path,
        alt: &Option<String>,
        header_prefix: &str,
    ) -> crate::grpc::ControlPlaneEndpoint {
        crate::grpc::ControlPlaneEndpoint {
            address,
            root_cert: root.to_path_buf(),
            alt_hostname: alt.clone(),
            token: Some(self.auth_token.clone()),
            cluster_id: self.cluster_id.clone(),
            headers: prefixed_env(header_prefix).into_iter().collect(),
        }
    }

    /// How this ztunnel names itself to istiod: Istio's ztunnel's node id
    /// and metadata, from the downward API's variables.
    pub fn node_identity(&self) -> crate::xds::NodeIdentity {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        let ip = std::env::var("INSTANCE_IP").unwrap_or_else(|_| "1.1.1.1".into());
        let (pod, namespace) = (var("POD_NAME"), var("POD_NAMESPACE"));
        let mut metadata = BTreeMap::from([
            ("NAME".to_string(), pod.clone()),
            ("NAMESPACE".to_string(), namespace.clone()),
            ("INSTANCE_IPS".to_string(), ip.clone()),
            ("NODE_NAME".to_string(), self.node_name.clone()),
            ("CLUSTER_ID".to_string(), self.cluster_id.clone()),
        ]);
        metadata.extend(prefixed_env("ISTIO_META_"));
        crate::xds::NodeIdentity {
            id: format!("ztunnel~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"),
            metadata,
        }
    }

    /// The pin directory in effect.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpf_pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/ztunnel").join(&self.node_name))
    }
}

/// Environment variables starting with `prefix`, without it (`XDS_HEADER_`,
/// `CA_HEADER_`, `ISTIO_META_`), as Istio reads them.
fn prefixed_env(prefix: &str) -> BTreeMap<String, String> {
    std::env::vars()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v)))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// Parses a duration: Go's format as Istio writes it (`300ms`, `1.5h`,
/// `24h0m0s`: numbers each followed by `ns`, `us`, `ms`, `s`, `m` or `h`),
/// days (`2d`), or plain seconds (`90`). It must be longer than zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad =
        |why: &str| format!("`{text}` is not a duration like 90s, 300ms, 30m or 24h0m0s: {why}");
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let seconds: u64 = text.parse().map_err(|_| bad("too large"))?;
        return positive(text, Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad("empty"));
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("a number without a unit"))?;
        let (number, tail) = rest.split_at(number_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let value: f64 = number.parse().map_err(|_| bad("a unit without a number"))?;
        let unit_seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => {
                return Err(bad(&format!(
                    "unknown unit `{unit}` (use ms, s, m, h or d)"
                )))
            }
        };
        let part =
            Duration::try_from_secs_f64(value * unit_seconds).map_err(|_| bad("too large"))?;
        total = total.checked_add(part).ok_or_else(|| bad("too large"))?;
        rest = tail;
    }
    positive(text, total)
}

/// A duration as [`parse_duration`] reads it, where zero (`0s`, `0`) is
/// allowed and means "never" to the option.
pub fn parse_timeout_or_never(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let zero = !trimmed.is_empty()
        && trimmed
            .trim_end_matches(char::is_alphabetic)
            .bytes()
            .all(|b| b == b'0' || b == b'.')
        && trimmed.starts_with('0');
    if zero {
        // Still a duration: the unit must be one parse_duration knows.
        parse_duration(&format!("1{}", trimmed.trim_start_matches(['0', '.'])))?;
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

fn positive(text: &str, d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        return Err(format!("`{text}` must be longer than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_may_be_zero_for_never_but_must_still_be_a_duration() {
        assert_eq!(parse_timeout_or_never("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_timeout_or_never("0"), Ok(Duration::ZERO));
        assert_eq!(parse_timeout_or_never("0.0m"), Ok(Duration::ZERO));
        assert_eq!(parse_timeout_or_never("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_timeout_or_never("0x").is_err());
        assert!(parse_timeout_or_never("").is_err());
        assert!(
            parse_duration("0s").is_err(),
            "other durations stay positive"
        );
    }

    #[test]
    fn durations_in_go_and_plain_forms() {
        let ok = |t: &str, d: Duration| assert_eq!(parse_duration(t), Ok(d), "{t}");
        ok("90", Duration::from_secs(90));
        ok("90s", Duration::from_secs(90));
        ok("300ms", Duration::from_millis(300));
        ok("30m", Duration::from_secs(1800));
        ok("24h0m0s", Duration::from_secs(86400));
        ok("1h30m", Duration::from_secs(5400));
        ok("1.5h", Duration::from_secs(5400));
        ok("2d", Duration::from_secs(172800));
        for bad in [
            "",
            "0",
            "0s",
            "10x",
            "h",
            "5 s",
            "-1s",
            "1e3s",
            "10000000000000000000s10000000000000000000s",
            "99999999999999999999",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }
}
