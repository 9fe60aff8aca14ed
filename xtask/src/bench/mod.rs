//! `cargo xtask bench`: what the mesh costs, measured the way mesh engineers
//! do, side by side in one run on this machine.
//!
//! Phases, for cross-node throughput, memory and CPU: no mesh (no ztunnel,
//! no programs attached), mesh (a ztunnel per node), then no mesh again
//! (ztunnels uninstalled), so slow drift of a shared machine lands on both
//! sides. The no-mesh phases also measure cross-node throughput through two
//! plain userspace TCP relays, one per node (no TLS, no HTTP/2, no
//! capture): what two proxy hops cost on their own, the floor for any
//! design with a proxy on both nodes; and, alternating with them, through
//! two relays that also encrypt between the nodes with ztunnel's TLS stack
//! (the TLS floor, see [`relays`]). Each repetition also moves one stream
//! with a CPU per node, as on two machines ([`placement`]), direct, through
//! both floors and through the mesh. Each figure is the median of its
//! repetitions.
//!
//! Rounds, for the figures a drifting machine moves most: `pairs` times,
//! the request/response figures (latency, connection rate) with no mesh,
//! through the relays, then through both ztunnels (started for the round,
//! then uninstalled); and the same-node figures with no mesh, then with
//! node1's ztunnel (the latency with both ends pinned, see `PinnedEcho`). A round's parts are seconds apart, where the phases'
//! medians can put a whole slow stretch of tens of seconds on one side.
//! Their ratios are the medians of the rounds' ratios (see the README's
//! Performance). A control row repeats the 4-stream same-node pairs with
//! no mesh in either half: how far it lies from 1 is what one run can
//! resolve.
//!
//! The waypoint's figures ([`waypoint`]) compare HTTP through it with the
//! ztunnel-only path (their "no mesh" column is that path). Results: a
//! table on stdout, `target/bench/results.json`, and
//! `target/bench/ratios.svg`.

mod awake;
pub use awake::hold as hold_cpus_awake;
pub mod chart;
mod iperf;
mod placement;
mod relays;
mod waypoint;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use placement::NodeCpus;
use relays::{RelayTls, Relays};
use serde::Serialize;
use ztunnel_tests::{
    lab::Lab,
    load::{self, LoadServer, Mode},
    netns::Netns,
    ztunnel::Ztunnel,
};

/// How much to measure.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Params {
    pub repetitions: usize,
    pub iperf_seconds: u32,
    pub latency_round_trips: usize,
    pub rate_seconds: f64,
    pub rate_threads: usize,
    pub idle_connections: usize,
    /// Alternating rounds (no mesh, mesh; and the relays for the
    /// request/response figures) for the paired figures.
    #[serde(default)]
    pub pairs: usize,
}

impl Params {
    pub fn full() -> Self {
        Params {
            repetitions: 3,
            iperf_seconds: 4,
            latency_round_trips: 4000,
            rate_seconds: 2.0,
            rate_threads: 4,
            idle_connections: 10_000,
            pairs: 6,
        }
    }

    /// Proves the suite runs; measures nothing worth reading.
    pub fn smoke() -> Self {
        Params {
            // Two, so both no-mesh phases (before and after) run.
            repetitions: 2,
            iperf_seconds: 1,
            latency_round_trips: 300,
            rate_seconds: 0.5,
            rate_threads: 2,
            idle_connections: 300,
            pairs: 1,
        }
    }
}

/// One measured figure: no mesh, mesh, and their ratio.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub unit: String,
    pub no_mesh: Option<f64>,
    pub mesh: f64,
    /// mesh / no mesh.
    pub ratio: Option<f64>,
    /// The same measure through two plain TCP relays (the floor), and its
    /// ratio to no mesh.
    pub relays: Option<f64>,
    pub relays_ratio: Option<f64>,
    /// mesh / two TCP relays: what ztunnel costs beyond any proxy on each
    /// node (a bound on this is a target "of relays").
    #[serde(default)]
    pub floor_ratio: Option<f64>,
    /// The target, as a ratio bound (of no mesh, or "of relays") or an
    /// absolute bound, and whether it is met.
    pub target: Option<String>,
    pub met: Option<bool>,
    /// For figures taken in alternating rounds: each round's values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pairs: Vec<Round>,
}

/// One round of a paired figure, its halves seconds apart.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Round {
    pub no_mesh: f64,
    pub mesh: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relays: Option<f64>,
}

/// Cross-node throughput through the two floors, beside the mesh's.
#[derive(Debug, Clone, Serialize)]
pub struct TlsFloor {
    pub name: String,
    pub unit: String,
    pub tcp_relays: f64,
    pub tls_relays: f64,
    /// TLS relays / TCP relays: what encrypting between the nodes in user
    /// space with rustls, and nothing else, leaves of the TCP floor here.
    pub tls_of_tcp: f64,
    pub mesh: f64,
    /// mesh / TLS relays: what ztunnel costs beyond its TLS.
    pub mesh_of_tls: f64,
    /// Each repetition's TCP and TLS relays, taken seconds apart.
    pub runs: Vec<FloorRun>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct FloorRun {
    pub tcp_relays: f64,
    pub tls_relays: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    commit: String,
    kernel: String,
    cpu: String,
    cores: usize,
    /// Whether the CPUs were kept out of idle states (see `awake`).
    cpus_held_awake: bool,
    params: Params,
    rows: Vec<Row>,
    tls_floor: Vec<TlsFloor>,
    command: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

fn sh(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

/// CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / (unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// Measurements of one phase.
#[derive(Default)]
struct Samples {
    cross_1: Vec<f64>,
    cross_4: Vec<f64>,
    /// One stream cross-node with a CPU per node (see [`placement`]).
    cross_1_pinned: Vec<f64>,
    same_1: Vec<f64>,
    same_4: Vec<f64>,
    /// Same-node request/response latency p50, client and echo server on
    /// one CPU and on two, and the same-node connection rate.
    same_p50_one_cpu: Vec<f64>,
    same_p50_two_cpus: Vec<f64>,
    same_rate: Vec<f64>,
    p50: Vec<f64>,
    p90: Vec<f64>,
    p99: Vec<f64>,
    rate: Vec<f64>,
}

struct Bench<'a> {
    lab: &'a Lab,
    params: Params,
    cross: SocketAddr,
    same: SocketAddr,
    echo: SocketAddr,
    same_echo: SocketAddr,
    /// The release-built `tcp-relay` the floors run.
    relay: &'a Path,
    /// What the TLS floor's relays present and trust.
    relay_tls: &'a RelayTls,
    /// The nodes' CPUs for the pinned cross-node row (none with one CPU).
    node_cpus: Option<NodeCpus>,
    /// The pods' iperf3 servers: where each listens, and its process.
    iperf_servers: &'a [(SocketAddr, u32)],
}

/// Echo servers in the neighbor pod for the same-node latency, with the
/// client kept on the first CPU this process may use: one whose threads
/// run on that CPU too, and one on the second (none with a single CPU).
/// Unpinned, the scheduler put the two ends on one CPU in some rounds (a
/// round trip of about 5 us here) and on two in others (about 12 us, each
/// wakeup an interrupt to the other CPU), so a round's ratio said which
/// placement it drew (0.48-2.44 in one run), not what the mesh costs.
/// Pinned, each placement is measured in every round, no mesh and mesh
/// alike.
struct PinnedEcho {
    client_cpu: usize,
    one_cpu: SocketAddr,
    two_cpus: Option<SocketAddr>,
    _servers: Vec<LoadServer>,
}

impl PinnedEcho {
    /// On ports 50 and 60 above `near`'s, in its pod.
    fn start(lab: &Lab, near: SocketAddr) -> Result<Self> {
        let ns = &lab.pod("neighbor").ns;
        let at = |offset: u16| SocketAddr::new(near.ip(), near.port() + offset);
        let cpus = load::allowed_cpus().context("reading this process's CPU affinity")?;
        let &client_cpu = cpus.first().context("no CPU in this process's affinity")?;
        let mut servers = vec![LoadServer::start(ns, at(50), Mode::EchoOnCpu(client_cpu))?];
        let two_cpus = match cpus.get(1) {
            Some(&other) => {
                servers.push(LoadServer::start(ns, at(60), Mode::EchoOnCpu(other))?);
                Some(at(60))
            }
            None => None,
        };
        Ok(PinnedEcho {
            client_cpu,
            one_cpu: at(50),
            two_cpus,
            _servers: servers,
        })
    }
}

impl Bench<'_> {
    /// The cross-node throughput through the floors: two plain TCP relays
    /// into `tcp`, and two TLS relays into `tls`, alternating.
    fn relayed_phase(&self, tcp: &mut Samples, tls: &mut Samples, reps: usize) -> Result<()> {
        let client = &self.lab.pod("client").ns;
        let tcp_relays = Relays::start(self.lab, self.relay, &[self.cross], None)?;
        let tls_relays = Relays::start(self.lab, self.relay, &[self.cross], Some(self.relay_tls))?;
        let secs = self.params.iperf_seconds;
        for _ in 0..reps {
            for streams in [1, 4] {
                for (relays, out, what) in [
                    (&tcp_relays, &mut *tcp, "TCP"),
                    (&tls_relays, &mut *tls, "TLS"),
                ] {
                    let r = iperf::run(client, relays.front(self.cross), streams, secs)
                        .with_context(|| format!("iperf3 through the {what} relays"))?;
                    match streams {
                        1 => out.cross_1.push(r.gbits),
                        _ => out.cross_4.push(r.gbits),
                    }
                }
            }
            for (relays, out) in [(&tcp_relays, &mut *tcp), (&tls_relays, &mut *tls)] {
                let (node1, node2) = relays.pids();
                if let Some(r) = self.cross_pinned(relays.front(self.cross), &node1, &node2)? {
                    out.cross_1_pinned.push(r.gbits);
                }
            }
        }
        Ok(())
    }

    /// Latency percentiles and connection rate against the echo server at `echo`.
    fn request_response(&self, out: &mut Samples, echo: SocketAddr) -> Result<()> {
        let client = &self.lab.pod("client").ns;
        let l = load::latency(client, echo, 64, self.params.latency_round_trips, None)
            .context("latency")?;
        out.p50.push(l.p50_us);
        out.p90.push(l.p90_us);
        out.p99.push(l.p99_us);
        out.rate.push(
            load::connection_rate(
                client,
                echo,
                Duration::from_secs_f64(self.params.rate_seconds),
                self.params.rate_threads,
            )
            .context("connection rate")?,
        );
        Ok(())
    }

    /// The same measurements against servers on other ports. After the mesh
    /// phase the node namespaces hold ztunnel's TIME_WAIT sockets for a
    /// minute; the kernel drops forwarded packets whose 4-tuple matches one
    /// (early demux), so the second no-mesh phase must not reuse the tuples.
    fn on_fresh_ports(&self, offset: u16) -> Self {
        let bump = |a: SocketAddr| SocketAddr::new(a.ip(), a.port() + offset);
        Bench {
            lab: self.lab,
            params: self.params,
            cross: bump(self.cross),
            same: bump(self.same),
            echo: bump(self.echo),
            same_echo: bump(self.same_echo),
            relay: self.relay,
            relay_tls: self.relay_tls,
            node_cpus: self.node_cpus,
            iperf_servers: self.iperf_servers,
        }
    }

    /// One stream to `dst` (the cross-node server, directly or through
    /// relays) with a CPU per node: the client and the `node1` processes on
    /// the first, the `node2` processes and the server on the second.
    /// `None` when this machine has one CPU.
    fn cross_pinned(
        &self,
        dst: SocketAddr,
        node1: &[u32],
        node2: &[u32],
    ) -> Result<Option<iperf::Run>> {
        let Some(cpus) = &self.node_cpus else {
            return Ok(None);
        };
        let server = self
            .iperf_servers
            .iter()
            .find(|(addr, _)| *addr == self.cross)
            .map(|(_, pid)| *pid)
            .with_context(|| format!("no iperf3 server at {}", self.cross))?;
        let node2: Vec<u32> = node2.iter().copied().chain([server]).collect();
        let _pinned = cpus
            .pin(node1, &node2)
            .context("pinning the nodes' processes")?;
        let client = &self.lab.pod("client").ns;
        iperf::run_on(client, dst, 1, self.params.iperf_seconds, Some(cpus))
            .context("iperf3 cross-node, a CPU per node")
            .map(Some)
    }
}

impl Bench<'_> {
    /// `reps` times: cross-node throughput (1 and 4 streams, then 1 with a
    /// CPU per node, `proxies` being node1's and node2's ztunnels if any)
    /// and the same-node connection rate.
    fn phase(
        &self,
        out: &mut Samples,
        reps: usize,
        proxies: (&[u32], &[u32]),
        mut on_cross: impl FnMut(f64),
    ) -> Result<()> {
        let client = &self.lab.pod("client").ns;
        let secs = self.params.iperf_seconds;
        for _ in 0..reps {
            for (streams, cross) in [(1, &mut out.cross_1), (4, &mut out.cross_4)] {
                let r =
                    iperf::run(client, self.cross, streams, secs).context("iperf3 cross-node")?;
                on_cross(r.bytes);
                cross.push(r.gbits);
            }
            if let Some(r) = self.cross_pinned(self.cross, proxies.0, proxies.1)? {
                on_cross(r.bytes);
                out.cross_1_pinned.push(r.gbits);
            }
            out.same_rate.push(
                load::connection_rate(
                    client,
                    self.same_echo,
                    Duration::from_secs_f64(self.params.rate_seconds),
                    self.params.rate_threads,
                )
                .context("same-node connection rate")?,
            );
        }
        Ok(())
    }

    /// Same-node throughput and latency, one measurement each, the latency
    /// against the echo servers of [`PinnedEcho`].
    fn same_node(&self, out: &mut Samples, echo: &PinnedEcho) -> Result<()> {
        let client = &self.lab.pod("client").ns;
        let secs = self.params.iperf_seconds;
        for (streams, into) in [(1, &mut out.same_1), (4, &mut out.same_4)] {
            let r = iperf::run(client, self.same, streams, secs).context("iperf3 same-node")?;
            into.push(r.gbits);
        }
        let rounds = self.params.latency_round_trips;
        let l = load::latency(client, echo.one_cpu, 64, rounds, Some(echo.client_cpu))
            .context("same-node latency, one CPU")?;
        out.same_p50_one_cpu.push(l.p50_us);
        if let Some(two_cpus) = echo.two_cpus {
            let l = load::latency(client, two_cpus, 64, rounds, Some(echo.client_cpu))
                .context("same-node latency, two CPUs")?;
            out.same_p50_two_cpus.push(l.p50_us);
        }
        Ok(())
    }

    /// `pairs` times: the same-node figures with no mesh, then with node1's
    /// ztunnel (which alone decides same-node traffic on node1), which is
    /// then uninstalled again.
    fn same_node_pairs(
        &self,
        config: &Path,
        base: &mut Samples,
        mesh: &mut Samples,
        pairs: usize,
    ) -> Result<()> {
        let node1 = self.lab.node("node1");
        let echo = PinnedEcho::start(self.lab, self.same_echo)?;
        for pair in 1..=pairs {
            self.same_node(base, &echo)?;
            let zt1 = Ztunnel::start(node1, config, &self.lab.ca_dir)?;
            self.same_node(mesh, &echo)?;
            drop(zt1);
            uninstall(self.lab, "node1", config)?;
            eprintln!(
                "[bench]   pair {pair}: 1 stream {:.2} / {:.2} Gbit/s, 4 streams {:.2} / {:.2} Gbit/s, p50 one CPU {:.1} / {:.1} us, two CPUs {:.1} / {:.1} us (no mesh / mesh)",
                last(&base.same_1),
                last(&mesh.same_1),
                last(&base.same_4),
                last(&mesh.same_4),
                last(&base.same_p50_one_cpu),
                last(&mesh.same_p50_one_cpu),
                last(&base.same_p50_two_cpus),
                last(&mesh.same_p50_two_cpus),
            );
        }
        Ok(())
    }

    /// The control for the pairs: the same 4-stream pairs with no mesh on
    /// either side. Their spread is the machine's, and bounds what one
    /// run's pairs can tell apart.
    fn same_node_control(
        &self,
        first: &mut Vec<f64>,
        second: &mut Vec<f64>,
        pairs: usize,
    ) -> Result<()> {
        let client = &self.lab.pod("client").ns;
        let secs = self.params.iperf_seconds;
        for _ in 0..pairs {
            for into in [&mut *first, &mut *second] {
                let r = iperf::run(client, self.same, 4, secs).context("iperf3 same-node")?;
                into.push(r.gbits);
            }
        }
        Ok(())
    }

    /// The request/response figures three ways, seconds apart, once per
    /// port in `fresh`: no mesh and the two relays against that port's echo
    /// server, then both ztunnels (started, later uninstalled) against
    /// `self.echo`. A port of its own per round keeps the unmeshed halves'
    /// 4-tuples off the TIME_WAIT sockets earlier rounds left on the nodes
    /// (the kernel would drop such forwarded packets).
    fn request_response_rounds(
        &self,
        config: &Path,
        base: &mut Samples,
        relayed: &mut Samples,
        mesh: &mut Samples,
        fresh: &[SocketAddr],
    ) -> Result<()> {
        let lab = self.lab;
        for (round, &echo) in fresh.iter().enumerate() {
            self.request_response(base, echo).context("no mesh")?;
            let relays = Relays::start(lab, self.relay, &[echo], None)?;
            self.request_response(relayed, relays.front(echo))
                .context("through the relays")?;
            drop(relays);
            let zt1 = Ztunnel::start(lab.node("node1"), config, &lab.ca_dir)?;
            let zt2 = Ztunnel::start(lab.node("node2"), config, &lab.ca_dir)?;
            self.request_response(mesh, self.echo)
                .context("through the mesh")?;
            drop((zt1, zt2));
            for node in ["node1", "node2"] {
                uninstall(lab, node, config)?;
            }
            eprintln!(
                "[bench]   round {}: p50 {:.1} / {:.1} / {:.1} us, {:.0} / {:.0} / {:.0} conn/s (no mesh / relays / mesh)",
                round + 1,
                last(&base.p50),
                last(&relayed.p50),
                last(&mesh.p50),
                last(&base.rate),
                last(&relayed.rate),
                last(&mesh.rate),
            );
        }
        Ok(())
    }
}

/// Removes everything `node`'s ztunnel left in the kernel: back to no mesh.
fn uninstall(lab: &Lab, node: &str, config: &Path) -> Result<()> {
    let status =
        ztunnel_tests::ztunnel::run_to_exit(lab.node(node), config, &lab.ca_dir, &["--uninstall"])?;
    anyhow::ensure!(status.status.success(), "uninstall on {node} failed");
    Ok(())
}

/// The latest sample of a figure, for the progress lines.
fn last(v: &[f64]) -> f64 {
    v.last().copied().unwrap_or(0.0)
}

/// The median of the pairwise ratios `mesh[i] / base[i]`.
fn paired_ratio(base: &[f64], mesh: &[f64]) -> f64 {
    median(base.iter().zip(mesh).map(|(b, m)| m / b).collect())
}

/// What a ratio target is measured against.
#[derive(Debug, Clone, Copy)]
enum Against {
    /// mesh / no mesh.
    NoMesh,
    /// mesh / two TCP relays: ztunnel against the floor for any proxy.
    Relays,
}

/// A bound on a ratio.
#[derive(Debug, Clone, Copy)]
struct Target {
    bound: f64,
    higher_is_better: bool,
    against: Against,
}

impl Target {
    fn at_least(bound: f64, against: Against) -> Self {
        Target {
            bound,
            higher_is_better: true,
            against,
        }
    }

    fn at_most(bound: f64, against: Against) -> Self {
        Target {
            bound,
            higher_is_better: false,
            against,
        }
    }

    fn is_met(&self, ratio: f64) -> bool {
        if self.higher_is_better {
            ratio >= self.bound
        } else {
            ratio <= self.bound
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.higher_is_better { ">=" } else { "<=" };
        match self.against {
            Against::NoMesh => write!(f, "{sign} {}", self.bound),
            Against::Relays => write!(f, "{sign} {} of relays", self.bound),
        }
    }
}

/// Runs the suite. `bin` is the ztunnel binary to measure.
pub fn run(bin: &Path, config: &Path, params: Params, out_dir: &Path) -> Result<()> {
    let started = Instant::now();
    let fd_limit = load::raise_fd_limit(262_144);
    // The client end of every idle connection lives in this process.
    let mut params = params;
    params.idle_connections = params
        .idle_connections
        .min((fd_limit as usize).saturating_sub(2000));
    std::env::set_var("ZTUNNEL_BIN", bin);
    // Built beside ztunnel, with the same profile (see build_bins).
    let relay = bin.with_file_name("tcp-relay");
    anyhow::ensure!(
        relay.is_file(),
        "the floor's relay {} is not built (cargo build --release -p tcp-relay)",
        relay.display()
    );
    let awake = awake::hold();
    let lab = Lab::up()?;
    lab.reuse_time_wait()?;
    let server = lab.pod("server");
    let neighbor = lab.pod("neighbor");
    let iperf = [
        (&server, 5201),
        (&neighbor, 5201),
        (&server, 5301),
        (&neighbor, 5301),
    ]
    .into_iter()
    .map(|(pod, port)| Ok((pod.addr(port), iperf::Server::start(&pod.ns, port)?)))
    .collect::<Result<Vec<_>>>()?;
    let iperf_servers: Vec<(SocketAddr, u32)> =
        iperf.iter().map(|(addr, s)| (*addr, s.pid())).collect();
    let node_cpus = NodeCpus::detect().context("reading this process's CPU affinity")?;
    let _echo = LoadServer::start(&server.ns, server.addr(7000), Mode::Echo)?;
    let _same_echo = LoadServer::start(&neighbor.ns, neighbor.addr(7000), Mode::Echo)?;
    let _same_echo_after = LoadServer::start(&neighbor.ns, neighbor.addr(7100), Mode::Echo)?;
    let hold = HoldServer::start(&server.ns, server.addr(7001))?;
    let relay_tls = RelayTls::issue(&lab)?;
    // The unmeshed halves of the request/response rounds: a port each.
    let round_ports: Vec<SocketAddr> = (0..params.pairs as u16)
        .map(|i| server.addr(7200 + i))
        .collect();
    let _round_echo = round_ports
        .iter()
        .map(|&addr| LoadServer::start(&server.ns, addr, Mode::Echo))
        .collect::<Result<Vec<_>>>()?;
    let bench = Bench {
        lab: &lab,
        params,
        cross: server.addr(5201),
        same: neighbor.addr(5201),
        echo: server.addr(7000),
        same_echo: neighbor.addr(7000),
        relay: &relay,
        relay_tls: &relay_tls,
        node_cpus,
        iperf_servers: &iperf_servers,
    };
    // First repetitions without a mesh, the rest after it.
    let before = params.repetitions.div_ceil(2);
    let after = params.repetitions - before;
    let mut base = Samples::default();
    let mut mesh = Samples::default();
    let mut relayed = Samples::default();
    let mut tls_relayed = Samples::default();
    eprintln!(
        "[bench] no mesh ({before} repetitions), direct and through two TCP relays and two TLS relays"
    );
    bench.phase(&mut base, before, (&[], &[]), |_| {})?;
    bench.relayed_phase(&mut relayed, &mut tls_relayed, before)?;

    eprintln!("[bench] mesh ({} repetitions)", params.repetitions);
    let zt1 = Ztunnel::start(lab.node("node1"), config, &lab.ca_dir)?;
    let zt2 = Ztunnel::start(lab.node("node2"), config, &lab.ca_dir)?;
    std::thread::sleep(Duration::from_secs(1));
    let idle = [zt1.rss_bytes()?, zt2.rss_bytes()?];
    let pids = [zt1.pid().context("zt1")?, zt2.pid().context("zt2")?];
    let mut cpu = 0.0;
    let mut bytes = 0.0;
    for _ in 0..params.repetitions {
        let cpu_before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
        let mut moved = 0.0;
        bench.phase(&mut mesh, 1, (&pids[..1], &pids[1..]), |b| moved += b)?;
        // Only the cross-node iperf bytes go in, but all CPU of the phase
        // does: an upper bound on CPU per byte.
        cpu += pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu_before;
        bytes += moved;
    }
    // Idle connections held through both ztunnels.
    let before_idle = [zt1.rss_bytes()?, zt2.rss_bytes()?];
    let conns = load::open_idle(&lab.pod("client").ns, hold.addr, params.idle_connections)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while hold.held(&server.ns) < params.idle_connections && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let with_idle = [zt1.rss_bytes()?, zt2.rss_bytes()?];
    drop(conns);
    let per_conn: Vec<f64> = (0..2)
        .map(|i| {
            with_idle[i].saturating_sub(before_idle[i]) as f64 / params.idle_connections as f64
        })
        .collect();
    drop((zt1, zt2));
    for node in ["node1", "node2"] {
        uninstall(&lab, node, config)?;
    }
    let again = bench.on_fresh_ports(100);
    if after > 0 {
        eprintln!(
            "[bench] no mesh again ({after} repetitions), direct and through two TCP relays and two TLS relays"
        );
        again.phase(&mut base, after, (&[], &[]), |_| {})?;
        again.relayed_phase(&mut relayed, &mut tls_relayed, after)?;
    }
    eprintln!(
        "[bench] request/response, {} rounds of no mesh, two TCP relays and mesh",
        params.pairs
    );
    let (mut rr_base, mut rr_relayed, mut rr_mesh) =
        (Samples::default(), Samples::default(), Samples::default());
    bench.request_response_rounds(
        config,
        &mut rr_base,
        &mut rr_relayed,
        &mut rr_mesh,
        &round_ports,
    )?;
    eprintln!(
        "[bench] same-node, {} alternating pairs of no mesh and mesh",
        params.pairs
    );
    let (mut same_base, mut same_mesh) = (Samples::default(), Samples::default());
    again.same_node_pairs(config, &mut same_base, &mut same_mesh, params.pairs)?;
    eprintln!(
        "[bench] same-node control: {} pairs of 4 streams, no mesh on both sides",
        params.pairs
    );
    let (mut control_first, mut control_second) = (Vec::new(), Vec::new());
    again.same_node_control(&mut control_first, &mut control_second, params.pairs)?;

    let mut rows = Vec::new();
    // `paired`: b and m were taken in alternating pairs, and the ratio is
    // the median of the pairs' ratios rather than the ratio of the medians.
    let mut ratio_row = |name: &str,
                         unit: &str,
                         b: &[f64],
                         m: &[f64],
                         r: &[f64],
                         paired: bool,
                         target: Option<Target>| {
        let (nb, nm) = (median(b.to_vec()), median(m.to_vec()));
        let ratio = if paired { paired_ratio(b, m) } else { nm / nb };
        let relays = (!r.is_empty()).then(|| median(r.to_vec()));
        let (floor_ratio, relays_ratio) = match relays {
            Some(_) if paired => (Some(paired_ratio(r, m)), Some(paired_ratio(b, r))),
            Some(nr) => (Some(nm / nr), Some(nr / nb)),
            None => (None, None),
        };
        let (target, met) = match target {
            Some(t) => {
                let judged = match t.against {
                    Against::NoMesh => Some(ratio),
                    Against::Relays => floor_ratio,
                };
                (Some(t.to_string()), judged.map(|v| t.is_met(v)))
            }
            None => (None, None),
        };
        rows.push(Row {
            name: name.into(),
            unit: unit.into(),
            no_mesh: Some(nb),
            mesh: nm,
            ratio: Some(ratio),
            relays,
            relays_ratio,
            floor_ratio,
            target,
            met,
            pairs: if paired {
                b.iter()
                    .zip(m)
                    .enumerate()
                    .map(|(i, (&no_mesh, &mesh))| Round {
                        no_mesh,
                        mesh,
                        relays: r.get(i).copied(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        });
    };
    ratio_row(
        "throughput cross-node, 1 stream",
        "Gbit/s",
        &base.cross_1,
        &mesh.cross_1,
        &relayed.cross_1,
        false,
        Some(Target::at_least(0.85, Against::Relays)),
    );
    // The same target with a CPU per node, as on two machines (see
    // `placement`): above, both nodes share both CPUs.
    if !mesh.cross_1_pinned.is_empty() {
        ratio_row(
            "throughput cross-node, 1 stream, a CPU per node",
            "Gbit/s",
            &base.cross_1_pinned,
            &mesh.cross_1_pinned,
            &relayed.cross_1_pinned,
            false,
            Some(Target::at_least(0.85, Against::Relays)),
        );
    }
    ratio_row(
        "throughput cross-node, 4 streams",
        "Gbit/s",
        &base.cross_4,
        &mesh.cross_4,
        &relayed.cross_4,
        false,
        Some(Target::at_least(0.40, Against::NoMesh)),
    );
    // Same-node connections pass in the kernel with no proxy: the targets
    // are close to no mesh at all.
    ratio_row(
        "throughput same-node, 1 stream",
        "Gbit/s",
        &same_base.same_1,
        &same_mesh.same_1,
        &[],
        true,
        Some(Target::at_least(0.9, Against::NoMesh)),
    );
    ratio_row(
        "throughput same-node, 4 streams",
        "Gbit/s",
        &same_base.same_4,
        &same_mesh.same_4,
        &[],
        true,
        Some(Target::at_least(0.9, Against::NoMesh)),
    );
    ratio_row(
        "control: same-node, 4 streams, no mesh in both halves",
        "Gbit/s",
        &control_first,
        &control_second,
        &[],
        true,
        None,
    );
    ratio_row(
        "latency same-node p50, one CPU",
        "us",
        &same_base.same_p50_one_cpu,
        &same_mesh.same_p50_one_cpu,
        &[],
        true,
        Some(Target::at_most(1.1, Against::NoMesh)),
    );
    if !same_mesh.same_p50_two_cpus.is_empty() {
        ratio_row(
            "latency same-node p50, two CPUs",
            "us",
            &same_base.same_p50_two_cpus,
            &same_mesh.same_p50_two_cpus,
            &[],
            true,
            Some(Target::at_most(1.1, Against::NoMesh)),
        );
    }
    ratio_row(
        "new connections same-node",
        "conn/s",
        &base.same_rate,
        &mesh.same_rate,
        &[],
        false,
        None,
    );
    ratio_row(
        "latency p50",
        "us",
        &rr_base.p50,
        &rr_mesh.p50,
        &rr_relayed.p50,
        true,
        Some(Target::at_most(1.0, Against::Relays)),
    );
    ratio_row(
        "latency p90",
        "us",
        &rr_base.p90,
        &rr_mesh.p90,
        &rr_relayed.p90,
        true,
        None,
    );
    ratio_row(
        "latency p99",
        "us",
        &rr_base.p99,
        &rr_mesh.p99,
        &rr_relayed.p99,
        true,
        Some(Target::at_most(2.5, Against::NoMesh)),
    );
    ratio_row(
        "new connections",
        "conn/s",
        &rr_base.rate,
        &rr_mesh.rate,
        &rr_relayed.rate,
        true,
        Some(Target::at_least(1.5, Against::Relays)),
    );
    let tls_floor = [
        (
            "throughput cross-node, 1 stream",
            &relayed.cross_1,
            &tls_relayed.cross_1,
            &mesh.cross_1,
        ),
        (
            "throughput cross-node, 1 stream, a CPU per node",
            &relayed.cross_1_pinned,
            &tls_relayed.cross_1_pinned,
            &mesh.cross_1_pinned,
        ),
        (
            "throughput cross-node, 4 streams",
            &relayed.cross_4,
            &tls_relayed.cross_4,
            &mesh.cross_4,
        ),
    ]
    .into_iter()
    .filter(|(_, tcp, _, _)| !tcp.is_empty())
    .map(|(name, tcp_runs, tls_runs, m)| {
        let runs = tcp_runs
            .iter()
            .zip(tls_runs)
            .map(|(&tcp_relays, &tls_relays)| FloorRun {
                tcp_relays,
                tls_relays,
            })
            .collect();
        let (tcp, tls, m) = (
            median(tcp_runs.clone()),
            median(tls_runs.clone()),
            median(m.clone()),
        );
        TlsFloor {
            name: name.into(),
            unit: "Gbit/s".into(),
            tcp_relays: tcp,
            tls_relays: tls,
            tls_of_tcp: tls / tcp,
            mesh: m,
            mesh_of_tls: m / tls,
            runs,
        }
    })
    .collect();
    let abs = |name: &str, unit: &str, value: f64, bound: Option<f64>| Row {
        name: name.into(),
        unit: unit.into(),
        no_mesh: None,
        mesh: value,
        ratio: None,
        relays: None,
        relays_ratio: None,
        floor_ratio: None,
        target: bound.map(|b| format!("<= {b}")),
        met: bound.map(|b| value <= b),
        pairs: Vec::new(),
    };
    let idle_mib = idle.iter().copied().max().unwrap_or(0) as f64 / (1024.0 * 1024.0);
    rows.push(abs(
        "ztunnel RSS idle (larger node)",
        "MiB",
        idle_mib,
        Some(16.0),
    ));
    for (i, node) in ["node1 (client side)", "node2 (server side)"]
        .iter()
        .enumerate()
    {
        rows.push(abs(
            &format!(
                "memory per idle proxied connection, {node}, {} held",
                params.idle_connections
            ),
            "KiB",
            per_conn[i] / 1024.0,
            Some(4.0),
        ));
    }
    rows.push(abs(
        "ztunnel CPU per GB moved (both nodes)",
        "s/GB",
        cpu / (bytes / 1e9),
        None,
    ));
    drop(lab);
    eprintln!(
        "[bench] waypoint: HTTP through it against ztunnel only ({} repetitions)",
        params.repetitions
    );
    rows.extend(waypoint::run(&params).context("the waypoint's figures")?);

    let report = Report {
        commit: sh(Command::new("git").args(["rev-parse", "--short", "HEAD"])),
        kernel: sh(Command::new("uname").arg("-r")),
        cpu: cpu_model(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpus_held_awake: awake.is_some(),
        params,
        rows,
        tls_floor,
        command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
    };
    print_table(&report);
    std::fs::create_dir_all(out_dir)?;
    let json = out_dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    let svg = out_dir.join("ratios.svg");
    std::fs::write(
        &svg,
        chart::svg(
            &report.rows,
            &format!(
                "ztunnel {} · kernel {} · {} cores",
                report.commit, report.kernel, report.cores
            ),
        ),
    )?;
    eprintln!(
        "[bench] wrote {} and {} in {:.0?}",
        json.display(),
        svg.display(),
        started.elapsed()
    );
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "commit {} · kernel {} · {} · {} cores · {}",
        r.commit,
        r.kernel,
        r.cpu,
        r.cores,
        if r.cpus_held_awake {
            "CPUs held out of idle states"
        } else {
            "CPU idle states allowed"
        }
    );
    println!(
        "| measure | unit | no mesh | mesh | mesh / no mesh | two TCP relays | relays / no mesh | mesh / relays | target |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in &r.rows {
        let fmt = |v: f64| {
            if v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            row.unit,
            row.no_mesh.map(fmt).unwrap_or_else(|| "-".into()),
            fmt(row.mesh),
            or_dash(row.ratio.map(|v| format!("{v:.2}"))),
            or_dash(row.relays.map(fmt)),
            or_dash(row.relays_ratio.map(|v| format!("{v:.2}"))),
            or_dash(row.floor_ratio.map(|v| format!("{v:.2}"))),
            match (&row.target, row.met) {
                (Some(t), Some(true)) => format!("{t} met"),
                (Some(t), Some(false)) => format!("{t} **missed**"),
                _ => "-".into(),
            },
        );
    }
    println!(
        "\nThe TLS floor: two relays that also encrypt between the nodes, with ztunnel's TLS \
         stack and settings but no HTTP/2. TLS / TCP relays is what encrypting in user space \
         with rustls, and nothing else, leaves of the TCP floor on this machine."
    );
    println!(
        "| measure | unit | two TCP relays | two TLS relays | TLS / TCP relays | mesh | mesh / TLS relays |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for f in &r.tls_floor {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            f.name, f.unit, f.tcp_relays, f.tls_relays, f.tls_of_tcp, f.mesh, f.mesh_of_tls
        );
    }
    for f in &r.tls_floor {
        let ratios: Vec<String> = f
            .runs
            .iter()
            .map(|run| format!("{:.2}", run.tls_relays / run.tcp_relays))
            .collect();
        println!(
            "- {}: TLS / TCP relays in each repetition, seconds apart: {}",
            f.name,
            ratios.join(", ")
        );
    }
    println!(
        "\nPaired rows (same-node; request/response): {} rounds, each taking the no-mesh, \
         relay and mesh figures seconds apart; their ratios are the medians of the rounds' \
         ratios, which spread:",
        r.params.pairs
    );
    let spread = |ratios: Vec<f64>| {
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.2} to {hi:.2}")
    };
    for row in r.rows.iter().filter(|row| !row.pairs.is_empty()) {
        let of_base = spread(row.pairs.iter().map(|p| p.mesh / p.no_mesh).collect());
        let of_relays: Vec<f64> = row
            .pairs
            .iter()
            .filter_map(|p| p.relays.map(|r| p.mesh / r))
            .collect();
        if of_relays.is_empty() {
            println!("- {}: mesh / no mesh {of_base}", row.name);
        } else {
            println!(
                "- {}: mesh / no mesh {of_base}, mesh / relays {}",
                row.name,
                spread(of_relays)
            );
        }
    }
}

/// The hold server: a child process (`cargo xtask hold-server`) inside a
/// pod, so the held ends have their own descriptor limit.
struct HoldServer {
    child: std::process::Child,
    addr: SocketAddr,
}

impl HoldServer {
    fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let child = ns
            .command(exe)
            .arg("hold-server")
            .arg(addr.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting the hold server")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(HoldServer { child, addr })
    }

    /// Established connections to the hold server, as the kernel counts them.
    fn held(&self, ns: &Netns) -> usize {
        let port = format!("( sport = :{} )", self.addr.port());
        ns.command("ss")
            .args(["-Htn", "state", "established", &port])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    }
}

impl Drop for HoldServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where results go.
pub fn out_dir(root: &Path) -> PathBuf {
    root.join("target/bench")
}

/// Checks the chart a run wrote to `out_dir`: well-formed SVG (a code host
/// shows a broken image otherwise) with a bar label for every ratio in
/// `results.json`.
pub fn check_chart(out_dir: &Path) -> Result<()> {
    let svg_path = out_dir.join("ratios.svg");
    let svg = std::fs::read_to_string(&svg_path)
        .with_context(|| format!("reading {}", svg_path.display()))?;
    let texts = chart::texts(&svg)
        .with_context(|| format!("{} is not well-formed XML", svg_path.display()))?;
    let json_path = out_dir.join("results.json");
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&json_path).with_context(|| format!("reading {}", json_path.display()))?,
    )
    .with_context(|| format!("parsing {}", json_path.display()))?;
    let rows = report["rows"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for row in rows.iter().filter(|r| r["ratio"].is_number()) {
        let name = row["name"].as_str().unwrap_or_default();
        anyhow::ensure!(
            texts.iter().any(|t| t == name),
            "{} has no bar labelled {name:?}",
            svg_path.display()
        );
    }
    Ok(())
}
