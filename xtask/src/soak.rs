//! `cargo xtask soak --minutes N`: mixed traffic through the lab while
//! faults are injected, with what must hold throughout.
//!
//! Both ztunnels take everything from the repo's control plane, with
//! certificates that live 20 s (so they rotate every ten seconds or so).
//! Traffic, from the client pod on node1 to the server pod on node2:
//! bulk transfers of a marked payload, request/response exchanges, and
//! many short connections. Every `interval`, one fault, in turn:
//! node2's ztunnel killed with SIGKILL and started again; node2's
//! ztunnel replaced by a new one through the handover; a policy change;
//! a pod's enrolment flipped; the control plane restarted. Node1's
//! ztunnel is never restarted: it is the witness for resources.
//!
//! Asserted: no payload byte in clear on the underlay (captures of node1's
//! eth0 while bulk traffic runs); every transfer bit-exact or cleanly
//! failed, never damaged or silently truncated (the server reports the
//! length and SHA-256 of what it got); the witness's RSS and open
//! descriptors flat (the slope is reported); every fault healed (a fresh
//! connection works) within `HEAL_BOUND`.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use ztunnel_tests::{
    controlplane::{self, ControlPlane},
    lab,
    netns::Netns,
    setup::Setup,
    sniff::Sniffer,
    traffic::{Connection, Server},
    ztunnel::{base_command, Ztunnel},
};

/// A fault must be healed (a fresh connection works) within this.
const HEAL_BOUND: Duration = Duration::from_secs(15);
/// The bulk payload's pattern: it must never be seen on the underlay.
const MARKER: &[u8] = b"ZTUNNEL-SOAK-MARKER-51c0ffee";
/// Per-connection logs would be most of a long soak's disk.
const LOG_FILTER: &str = "info,access=off";

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
enum Fault {
    Kill,
    Handover,
    PolicyChange,
    EnrolmentChange,
    ControlPlaneRestart,
}

const FAULTS: [Fault; 5] = [
    Fault::Kill,
    Fault::Handover,
    Fault::PolicyChange,
    Fault::EnrolmentChange,
    Fault::ControlPlaneRestart,
];

/// What one kind of traffic did.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// Refused, reset or closed without a report: the client knows.
    failed_cleanly: AtomicU64,
    /// The server got other bytes than were sent: never allowed.
    damaged: AtomicU64,
    first_damage: Mutex<Option<String>>,
}

#[derive(Serialize)]
struct TrafficReport {
    kind: &'static str,
    ok: u64,
    failed_cleanly: u64,
    damaged: u64,
}

#[derive(Serialize)]
struct Heal {
    fault: Fault,
    at_seconds: f64,
    healed_ms: u64,
}

#[derive(Serialize)]
struct Report {
    minutes: f64,
    traffic: Vec<TrafficReport>,
    heals: Vec<Heal>,
    captures: usize,
    /// Tunnel (15008) packets those captures saw: proof they saw traffic.
    tunnel_packets_captured: usize,
    witness_rss_kib_per_minute: f64,
    witness_fds_per_minute: f64,
    witness_rss_kib: (u64, u64),
    witness_fds: (u64, u64),
    certificates_rotated: usize,
}

fn base_config(neighbor_enrolled: bool, extra_policy: bool) -> String {
    let tail = if extra_policy {
        // Denies a port the soak does not use: a policy change that must
        // not disturb the traffic.
        "policies:\n- name: soak-churn\n  namespace: default\n  scope: Namespace\n  action: Deny\n  dryRun: false\n  rules: [[[{destinationPorts: [9999]}]]]\n"
    } else {
        ""
    };
    lab::config_yaml_with(&[("neighbor", neighbor_enrolled)], &[], tail)
}

/// Runs traffic of one kind until `stop`: connections of `len` bytes
/// (`bulk`: the marked payload) one after another.
fn traffic(
    ns: &Netns,
    dst: SocketAddr,
    len: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let name = ns.name().to_string();
    Ok(std::thread::spawn(move || {
        let mut ns = Netns::existing(&name);
        ns.keep();
        let payload: Vec<u8> = MARKER.iter().copied().cycle().take(len).collect();
        while !stop.load(Ordering::Relaxed) {
            let attempt = Connection::open(&ns, dst, Duration::from_secs(2))
                .and_then(|c| c.exchange_bytes(&payload));
            match attempt {
                Ok(_) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    if text.contains("payload damaged") {
                        tally.damaged.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut first) = tally.first_damage.lock() {
                            first.get_or_insert(text);
                        }
                    } else {
                        tally.failed_cleanly.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Ok(())
    }))
}

/// Open descriptors of `pid`.
fn open_fds(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// Least-squares slope of `(minute, value)` samples, per minute.
fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let (sx, sy) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = samples.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The mean of the first and of the last third of `samples`' values.
fn thirds(samples: &[(f64, f64)]) -> (f64, f64) {
    let third = (samples.len() / 3).max(1);
    let mean = |s: &[(f64, f64)]| s.iter().map(|(_, y)| y).sum::<f64>() / s.len().max(1) as f64;
    (
        mean(&samples[..third.min(samples.len())]),
        mean(&samples[samples.len().saturating_sub(third)..]),
    )
}

struct Soak {
    s: Setup,
    cp: ControlPlane,
    zt1: Ztunnel,
    zt2: Option<Ztunnel>,
    /// Old node2 ztunnels draining after a handover.
    draining: Vec<Ztunnel>,
    env: Vec<(&'static str, &'static str)>,
    neighbor_enrolled: bool,
    extra_policy: bool,
}

impl Soak {
    fn node2(&self) -> Result<Ztunnel> {
        controlplane::spawn(
            &self.s.lab,
            self.cp.address,
            "node2",
            base_command(self.s.lab.node("node2"))?,
            &self.env,
        )?
        .args(&["--drain-deadline", "5s"])
        .ready()
    }

    fn inject(&mut self, fault: Fault) -> Result<()> {
        match fault {
            Fault::Kill => {
                if let Some(mut zt2) = self.zt2.take() {
                    zt2.kill();
                }
                self.zt2 = Some(self.node2()?);
            }
            Fault::Handover => {
                let new = self.node2()?;
                if !new.log_text().contains("took the listeners over") {
                    bail!("the new ztunnel did not take over:\n{}", new.log_text());
                }
                if let Some(old) = self.zt2.replace(new) {
                    self.draining.push(old);
                }
            }
            Fault::PolicyChange => {
                self.extra_policy = !self.extra_policy;
                self.s
                    .write(&base_config(self.neighbor_enrolled, self.extra_policy))?;
            }
            Fault::EnrolmentChange => {
                self.neighbor_enrolled = !self.neighbor_enrolled;
                self.s
                    .write(&base_config(self.neighbor_enrolled, self.extra_policy))?;
            }
            Fault::ControlPlaneRestart => self.cp.restart()?,
        }
        // Reap the drained.
        let mut still = Vec::new();
        for mut old in self.draining.drain(..) {
            if old.wait_exit(Duration::from_millis(1)).is_err() {
                still.push(old);
            }
        }
        self.draining = still;
        Ok(())
    }
}

/// Waits until a fresh connection from `ns` to `dst` works.
fn heal(ns: &Netns, dst: SocketAddr) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let attempt =
            Connection::open(ns, dst, Duration::from_millis(500)).and_then(|c| c.exchange(1024));
        if attempt.is_ok() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > HEAL_BOUND {
            bail!(
                "not healed after {HEAL_BOUND:?}: {:#}",
                attempt.err().map(|e| e.to_string()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the soak for `minutes` (a fault every `interval`), writes
/// `out_dir/report.json`, and fails if anything above did not hold.
pub fn run(minutes: f64, interval: Duration, out_dir: &Path) -> Result<()> {
    let started = Instant::now();
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let s = Setup::new(&base_config(true, false))?;
    let cp = ControlPlane::start(&s.lab, &s.config, &[])?;
    let env = vec![("SECRET_TTL", "0h0m20s"), ("RUST_LOG", LOG_FILTER)];
    let zt1 = controlplane::ztunnel(&s.lab, cp.address, "node1", &[], &env)?;
    let mut soak = Soak {
        s,
        cp,
        zt1,
        zt2: None,
        draining: Vec::new(),
        env,
        neighbor_enrolled: true,
        extra_policy: false,
    };
    soak.zt2 = Some(soak.node2()?);
    let server_pod = soak.s.lab.pod("server");
    let server = Server::start(&server_pod.ns, server_pod.addr(8080))?;
    // Its own handle: the soak's faults need the lab mutably.
    let mut client_ns = Netns::existing(soak.s.lab.pod("client").ns.name());
    client_ns.keep();
    let client_ns = &client_ns;
    let witness = soak.zt1.pid().context("node1's ztunnel is not running")?;

    let stop = Arc::new(AtomicBool::new(false));
    let kinds: [(&'static str, usize, usize); 3] = [
        ("bulk", 4 << 20, 1),
        ("request/response", 16 << 10, 2),
        ("short connections", 64, 2),
    ];
    let mut tallies = Vec::new();
    let mut workers = Vec::new();
    for (kind, len, threads) in kinds {
        let tally = Arc::new(Tally::default());
        for _ in 0..threads {
            workers.push(traffic(
                client_ns,
                server.addr,
                len,
                stop.clone(),
                tally.clone(),
            )?);
        }
        tallies.push((kind, tally));
    }

    let mut heals = Vec::new();
    let mut samples: Vec<(f64, f64, f64)> = Vec::new();
    let mut captures = 0usize;
    let mut tunnel_packets_captured = 0usize;
    let mut next_fault = Instant::now() + interval;
    let mut next_capture = Instant::now() + Duration::from_secs(5);
    let mut faults = FAULTS.iter().cycle();
    let result = (|| -> Result<()> {
        while started.elapsed() < duration {
            let minute = started.elapsed().as_secs_f64() / 60.0;
            let rss_kib = std::fs::read_to_string(format!("/proc/{witness}/status"))?
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .context("the witness has no VmRSS: did it exit?")?;
            samples.push((minute, rss_kib, open_fds(witness)? as f64));
            if Instant::now() >= next_capture {
                // One second of node1's underlay while bulk traffic runs.
                let sniffer = Sniffer::start(soak.s.lab.node("node1"), "eth0")?;
                std::thread::sleep(Duration::from_secs(1));
                let pcap = sniffer.stop()?;
                captures += 1;
                tunnel_packets_captured += pcap.count("tcp port 15008")?;
                if pcap.contains(MARKER) {
                    bail!("the payload crossed node1's underlay in clear");
                }
                next_capture = Instant::now() + Duration::from_secs(60);
            }
            if Instant::now() >= next_fault {
                let fault = *faults.next().context("no faults")?;
                let at = started.elapsed().as_secs_f64();
                soak.inject(fault)
                    .with_context(|| format!("injecting {fault:?}"))?;
                let healed = heal(client_ns, server.addr)
                    .with_context(|| format!("after {fault:?} at {at:.0} s"))?;
                eprintln!("[soak] {at:>6.0} s  {fault:?}: healed in {healed:?}");
                heals.push(Heal {
                    fault,
                    at_seconds: at,
                    healed_ms: healed.as_millis() as u64,
                });
                next_fault = Instant::now() + interval;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    result?;

    let traffic: Vec<TrafficReport> = tallies
        .iter()
        .map(|(kind, t)| TrafficReport {
            kind,
            ok: t.ok.load(Ordering::Relaxed),
            failed_cleanly: t.failed_cleanly.load(Ordering::Relaxed),
            damaged: t.damaged.load(Ordering::Relaxed),
        })
        .collect();
    // The first 20 % is warm-up (pools, certificates, allocator arenas).
    let settled: Vec<&(f64, f64, f64)> = samples.iter().skip(samples.len() / 5).collect();
    let rss: Vec<(f64, f64)> = settled.iter().map(|(m, r, _)| (*m, *r)).collect();
    let fds: Vec<(f64, f64)> = settled.iter().map(|(m, _, f)| (*m, *f)).collect();
    let (rss_first, rss_last) = thirds(&rss);
    let (fds_first, fds_last) = thirds(&fds);
    let report = Report {
        minutes,
        traffic,
        heals,
        captures,
        tunnel_packets_captured,
        witness_rss_kib_per_minute: slope(&rss),
        witness_fds_per_minute: slope(&fds),
        witness_rss_kib: (rss_first as u64, rss_last as u64),
        witness_fds: (fds_first as u64, fds_last as u64),
        certificates_rotated: soak.zt1.log_text().matches("certificate rotated").count(),
    };
    std::fs::create_dir_all(out_dir)?;
    let json = out_dir.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    print_report(&report);
    eprintln!(
        "[soak] wrote {} in {:.0?}",
        json.display(),
        started.elapsed()
    );

    for (t, (_, tally)) in report.traffic.iter().zip(&tallies) {
        if t.damaged > 0 {
            let first = tally
                .first_damage
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default();
            bail!(
                "{} {} transfers were damaged or truncated; the first: {first}",
                t.damaged,
                t.kind
            );
        }
        if t.ok == 0 {
            bail!("no {} transfer succeeded", t.kind);
        }
    }
    if report.heals.is_empty() {
        bail!("no fault was injected: the soak was shorter than one interval");
    }
    if report.captures == 0 {
        bail!("the underlay was never captured");
    }
    if report.tunnel_packets_captured == 0 {
        bail!("the underlay captures saw no tunnel traffic, so they prove nothing");
    }
    // Flat: after warm-up, the last third is within a bound of the first.
    if rss_last > rss_first + 16.0 * 1024.0 {
        bail!("the witness's RSS grew from {rss_first:.0} KiB to {rss_last:.0} KiB");
    }
    if fds_last > fds_first + 32.0 {
        bail!("the witness's open descriptors grew from {fds_first:.0} to {fds_last:.0}");
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "soak: {:.1} minutes, a fault every interval in turn: {:?}",
        r.minutes, FAULTS
    );
    println!("| traffic | ok | failed cleanly | damaged or truncated |");
    println!("| --- | --- | --- | --- |");
    for t in &r.traffic {
        println!(
            "| {} | {} | {} | {} |",
            t.kind, t.ok, t.failed_cleanly, t.damaged
        );
    }
    for fault in FAULTS {
        let heals: Vec<u64> = r
            .heals
            .iter()
            .filter(|h| h.fault == fault)
            .map(|h| h.healed_ms)
            .collect();
        if let Some(max) = heals.iter().max() {
            println!(
                "{fault:?}: {} times, healed within {max} ms (bound {HEAL_BOUND:?})",
                heals.len()
            );
        }
    }
    println!(
        "witness (node1's ztunnel): RSS {} -> {} KiB ({:+.1} KiB/min), open fds {} -> {} ({:+.2}/min)",
        r.witness_rss_kib.0,
        r.witness_rss_kib.1,
        r.witness_rss_kib_per_minute,
        r.witness_fds.0,
        r.witness_fds.1,
        r.witness_fds_per_minute
    );
    println!(
        "underlay captures: {} ({} tunnel packets), none with the payload in clear; certificates rotated on node1: {}",
        r.captures, r.tunnel_packets_captured, r.certificates_rotated
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_of_a_line_is_its_gradient() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&line) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        let flat: Vec<(f64, f64)> = (0..6).map(|i| (i as f64, 42.0)).collect();
        assert_eq!(slope(&flat), 0.0);
        assert_eq!(thirds(&flat), (42.0, 42.0));
    }
}
