//! The repo's control plane in the lab, standing in for istiod: it runs in
//! node1's namespace on the underlay address (as istiod would as a
//! hostNetwork pod), serves the lab's configuration file, signs with the
//! lab's CA, and knows each node by a token. Its serving certificate names
//! `istiod.istio-system.svc`, which ztunnels check through
//! `ALT_XDS_HOSTNAME` while they connect to the address.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    lab::{Lab, NODES},
    ztunnel::built_binary,
};

/// The port istiod serves xDS and the CA on.
pub const PORT: u16 = 15012;
/// The name in the control plane's serving certificate.
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

/// Where the control plane of a lab keeps its tokens and log (removed with
/// the control plane, or by [`crate::lab::teardown`]).
pub fn state_dir(lab: &Lab) -> PathBuf {
    std::env::temp_dir().join(format!("{}-controlplane", lab.prefix))
}

/// The address the control plane of `lab` serves on: node1's underlay.
pub fn address(lab: &Lab) -> SocketAddr {
    SocketAddr::from((lab.node("node1").underlay_ip, PORT))
}

/// The command that runs the control plane of `lab` in node1's namespace,
/// serving `config` with the lab's CA on [`address`], `extra` flags
/// appended. Writes the nodes' tokens first if they do not exist.
pub fn command(lab: &Lab, config: &Path, extra: &[String]) -> Result<std::process::Command> {
    Launch::new(lab, config, extra).command()
}

/// What starting the control plane of a lab takes, kept to start it again.
struct Launch {
    node_ns: PathBuf,
    ca_dir: PathBuf,
    dir: PathBuf,
    address: SocketAddr,
    config: PathBuf,
    extra: Vec<String>,
}

impl Launch {
    fn new(lab: &Lab, config: &Path, extra: &[String]) -> Self {
        Launch {
            node_ns: lab.node("node1").ns.path(),
            ca_dir: lab.ca_dir.clone(),
            dir: state_dir(lab),
            address: address(lab),
            config: config.to_path_buf(),
            extra: extra.to_vec(),
        }
    }

    fn command(&self) -> Result<std::process::Command> {
        write_tokens(&self.dir)?;
        let bin = built_binary("ztunnel-controlplane", "ZTUNNEL_CONTROLPLANE_BIN")?;
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node_ns.display()))
            .arg("--")
            .arg(bin)
            .arg("--config")
            .arg(&self.config)
            .arg("--ca-dir")
            .arg(&self.ca_dir)
            .arg("--listen")
            .arg(self.address.to_string())
            .args(&self.extra)
            .env("RUST_LOG", "info");
        for node in NODES {
            cmd.arg("--token")
                .arg(format!("{node}={}", token_file(&self.dir, node).display()));
        }
        Ok(cmd)
    }
}

/// Waits until something listens on `address` in `ns`.
pub fn wait_listening(
    ns: &crate::netns::Netns,
    address: SocketAddr,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let up = ns.run(move || {
            std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
        })?;
        if up {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {address} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The token file of `node`.
fn token_file(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.token"))
}

/// Writes a fresh random token per node that has none yet (they are kept
/// across restarts of the control plane: the nodes hold them).
fn write_tokens(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    for node in NODES {
        if token_file(dir, node).exists() {
            continue;
        }
        let mut random = [0u8; 16];
        rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut random)
            .map_err(|e| anyhow::anyhow!("no random bytes for a token: {e:?}"))?;
        let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(token_file(dir, node))?;
        std::io::Write::write_all(&mut file, token.as_bytes())?;
    }
    Ok(())
}

/// What points a ztunnel on `node` at a control plane of `lab` listening at
/// `address`: Istio's variables.
pub fn environment(lab: &Lab, address: SocketAddr, node: &str) -> Vec<(String, String)> {
    let root = lab.ca_dir.join("root-cert.pem").display().to_string();
    let url = format!("https://{address}");
    vec![
        ("XDS_ADDRESS".into(), url.clone()),
        ("CA_ADDRESS".into(), url),
        ("XDS_ROOT_CA".into(), root.clone()),
        ("CA_ROOT_CA".into(), root),
        ("ALT_XDS_HOSTNAME".into(), SERVER_NAME.into()),
        ("ALT_CA_HOSTNAME".into(), SERVER_NAME.into()),
        (
            "AUTH_TOKEN".into(),
            token_file(&state_dir(lab), node).display().to_string(),
        ),
    ]
}

/// The control plane as a process (`ztunnel-controlplane`).
pub struct ControlPlane {
    child: Option<Child>,
    pub address: SocketAddr,
    pub log: PathBuf,
    launch: Launch,
    node1: crate::netns::Netns,
}

impl ControlPlane {
    /// Starts it serving `config`, and waits until it listens.
    pub fn start(lab: &Lab, config: &Path, extra: &[&str]) -> Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let launch = Launch::new(lab, config, &extra);
        let mut node1 = crate::netns::Netns::existing(lab.node("node1").ns.name());
        node1.keep();
        let mut cp = ControlPlane {
            child: None,
            address: launch.address,
            log: launch.dir.join("controlplane.log"),
            launch,
            node1,
        };
        cp.spawn()?;
        Ok(cp)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = self.launch.command()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let before = self.log_text().matches("serving xDS and the CA").count();
        self.child = Some(
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawning ztunnel-controlplane")?,
        );
        self.wait_for_log_count(
            "serving xDS and the CA",
            before + 1,
            Duration::from_secs(30),
        )?;
        // It logs before it binds.
        wait_listening(&self.node1, self.address, Duration::from_secs(10))
            .with_context(|| format!("the control plane does not listen:\n{}", self.log_text()))
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, as it was.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.log_text().matches(needle).count() < count {
            if Instant::now() > deadline {
                bail!(
                    "the control plane did not log {needle:?} within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The environment of a ztunnel on `node` using this control plane.
    pub fn environment(&self, lab: &Lab, node: &str) -> Vec<(String, String)> {
        environment(lab, self.address, node)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- control plane log ----\n{}", self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.launch.dir);
    }
}

/// The control plane inside the test process (node1's namespace), for tests
/// that push what the real one never would. Stops on drop.
pub struct InProcess {
    pub control_plane: Arc<ztunnel_controlplane::ControlPlane>,
    pub address: SocketAddr,
    _server: crate::served::Served,
}

impl InProcess {
    pub fn start(lab: &Lab, config: &Path) -> Result<Self> {
        let dir = state_dir(lab);
        write_tokens(&dir)?;
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let config = ztunnel::config::local::LocalConfig::load(config)?;
        let control_plane = ztunnel_controlplane::ControlPlane::new(config);
        let address = address(lab);
        let mut tokens = Vec::new();
        for node in NODES {
            let token = std::fs::read_to_string(token_file(&dir, node))?;
            tokens.push((node.to_string(), token.trim().to_string()));
        }
        let settings = ztunnel_controlplane::Settings {
            listen: address,
            ca: ztunnel::identity::LocalCa::load(&lab.ca_dir)?,
            server_names: vec![SERVER_NAME.into()],
            nodes: ztunnel_controlplane::Nodes::new(tokens).map_err(anyhow::Error::msg)?,
            trust_domain: ztunnel::identity::DEFAULT_TRUST_DOMAIN.into(),
            max_cert_ttl: Duration::from_secs(24 * 3600),
        };
        let served = control_plane.clone();
        let server = crate::served::Served::start(
            &lab.node("node1").ns,
            address,
            dir,
            "the in-process control plane",
            move || async move { served.serve(settings).await },
        )?;
        Ok(InProcess {
            control_plane,
            address,
            _server: server,
        })
    }
}

/// Starts a ztunnel on `node` that takes everything from the control plane
/// at `address`, with `extra` flags and environment, and waits until it is
/// ready.
pub fn ztunnel(
    lab: &Lab,
    address: SocketAddr,
    node: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<crate::ztunnel::Ztunnel> {
    let n = lab.node(node);
    spawn(lab, address, node, crate::ztunnel::base_command(n)?, env)?
        .args(extra)
        .ready()
}

/// Starts `cmd` (a ztunnel command line, run in the namespace of the node
/// it names) with the control plane's environment for `token_of` (whose
/// token it presents), `overrides` replacing or adding variables. Does not
/// wait.
pub fn spawn<'a>(
    lab: &'a Lab,
    address: SocketAddr,
    token_of: &str,
    cmd: std::process::Command,
    overrides: &[(&str, &str)],
) -> Result<Spawner<'a>> {
    let mut vars: Vec<(String, String)> = environment(lab, address, token_of)
        .into_iter()
        .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
        .collect();
    vars.extend(
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    Ok(Spawner {
        node: lab.node(token_of),
        cmd,
        vars,
        extra: Vec::new(),
    })
}

/// A ztunnel about to start: [`Spawner::start`] or [`Spawner::ready`].
pub struct Spawner<'a> {
    node: &'a crate::lab::Node,
    cmd: std::process::Command,
    vars: Vec<(String, String)>,
    extra: Vec<String>,
}

impl Spawner<'_> {
    pub fn args(mut self, extra: &[&str]) -> Self {
        self.extra.extend(extra.iter().map(|s| s.to_string()));
        self
    }

    /// Starts it.
    pub fn start(self) -> Result<crate::ztunnel::Ztunnel> {
        let vars: Vec<(&str, &str)> = self
            .vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        crate::ztunnel::Ztunnel::spawn_command(self.node, self.cmd, &extra, &vars)
    }

    /// Starts it and waits until it is ready.
    pub fn ready(self) -> Result<crate::ztunnel::Ztunnel> {
        self.start()?.ready()
    }
}
