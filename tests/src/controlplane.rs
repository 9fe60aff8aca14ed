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

/// Where the control plane of a lab keeps its tokens and log.
fn state_dir(lab: &Lab) -> PathBuf {
    std::env::temp_dir().join(format!("{}-controlplane", lab.prefix))
}

/// The token file of `node`.
fn token_file(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.token"))
}

/// Writes a fresh random token per node.
fn write_tokens(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for node in NODES {
        let token: String = (0..32)
            .map(|_| format!("{:x}", fastrand_u8() & 0x0f))
            .collect();
        std::fs::write(token_file(dir, node), token)?;
    }
    Ok(())
}

fn fastrand_u8() -> u8 {
    let mut b = [0u8; 1];
    let _ = rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b);
    b[0]
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
    config: PathBuf,
    lab_prefix: String,
    node_ns: PathBuf,
    ca_dir: PathBuf,
    dir: PathBuf,
    extra: Vec<String>,
}

impl ControlPlane {
    /// Starts it serving `config`, and waits until it listens.
    pub fn start(lab: &Lab, config: &Path, extra: &[&str]) -> Result<Self> {
        let dir = state_dir(lab);
        write_tokens(&dir)?;
        let mut cp = ControlPlane {
            child: None,
            address: SocketAddr::from((lab.node("node1").underlay_ip, PORT)),
            log: dir.join("controlplane.log"),
            config: config.to_path_buf(),
            lab_prefix: lab.prefix.clone(),
            node_ns: lab.node("node1").ns.path(),
            ca_dir: lab.ca_dir.clone(),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        cp.spawn()?;
        Ok(cp)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = built_binary("ztunnel-controlplane", "ZTUNNEL_CONTROLPLANE_BIN")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
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
        // It logs before it binds; wait until the port takes connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        let ns = crate::netns::Netns::existing(&format!("{}-node1", self.lab_prefix));
        let address = self.address;
        let reachable = ns.run(move || {
            while Instant::now() < deadline {
                if std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200))
                    .is_ok()
                {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        });
        std::mem::forget(ns);
        if !reachable? {
            bail!(
                "the control plane does not listen on {}:\n{}",
                self.address,
                self.log_text()
            );
        }
        Ok(())
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The control plane inside the test process (node1's namespace), for tests
/// that push what the real one never would. Stops on drop.
pub struct InProcess {
    pub control_plane: Arc<ztunnel_controlplane::ControlPlane>,
    pub address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<Result<()>>>>,
    dir: PathBuf,
}

impl InProcess {
    pub fn start(lab: &Lab, config: &Path) -> Result<Self> {
        let dir = state_dir(lab);
        write_tokens(&dir)?;
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let config = ztunnel::config::local::LocalConfig::load(config)?;
        let control_plane = ztunnel_controlplane::ControlPlane::new(config);
        let address = SocketAddr::from((lab.node("node1").underlay_ip, PORT));
        let mut tokens = Vec::new();
        for node in NODES {
            let token = std::fs::read_to_string(token_file(&dir, node))?;
            tokens.push((node.to_string(), token.trim().to_string()));
        }
        let settings = ztunnel_controlplane::Settings {
            listen: address,
            ca: ztunnel::identity::LocalCa::load(&lab.ca_dir)?,
            server_names: vec![SERVER_NAME.into()],
            nodes: ztunnel_controlplane::Nodes::new(tokens),
            trust_domain: ztunnel::identity::DEFAULT_TRUST_DOMAIN.into(),
            max_cert_ttl: Duration::from_secs(24 * 3600),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = control_plane.clone();
        // Its sockets must belong to node1's namespace: a single-threaded
        // runtime on a thread that entered it.
        let thread = lab.node("node1").ns.spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                tokio::select! {
                    result = served.serve(settings) => result,
                    _ = stopped => Ok(()),
                }
            })
        })?;
        // Until it listens.
        let deadline = Instant::now() + Duration::from_secs(10);
        let ns = &lab.node("node1").ns;
        loop {
            let up = ns.run(move || {
                std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                break;
            }
            if Instant::now() > deadline {
                bail!("the in-process control plane does not listen on {address}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(InProcess {
            control_plane,
            address,
            stop: Some(stop),
            thread: Some(thread),
            dir,
        })
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
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
