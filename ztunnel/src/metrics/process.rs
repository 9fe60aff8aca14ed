//! Process figures from /proc, in the standard `process_*` names.

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

/// CPU seconds, resident bytes, open descriptors and their limit.
pub fn encode(encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    if let Some(seconds) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| cpu_seconds(&stat, clock_ticks()))
    {
        ConstCounter::new(seconds).encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
    }
    if let Some(bytes) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| resident_bytes(&status))
    {
        gauge(
            encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            bytes,
        )?;
    }
    if let Some(fds) = open_fds() {
        gauge(
            encoder,
            "process_open_fds",
            "Number of open file descriptors",
            fds,
        )?;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        gauge(
            encoder,
            "process_max_fds",
            "Maximum number of open file descriptors",
            limit.rlim_cur,
        )?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Gauge,
    )?)
}

/// User plus system CPU seconds from the text of `/proc/self/stat`.
fn cpu_seconds(stat: &str, ticks_per_second: f64) -> Option<f64> {
    // Fields after the command name (which may contain spaces and parens).
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat: 11 and 12 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// `VmRSS` in bytes from the text of `/proc/self/status`.
fn resident_bytes(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Descriptors open in this process, not counting the one that reading the
/// directory opens for itself.
fn open_fds() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    let listed = dir.count() as u64;
    Some(listed.saturating_sub(1))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_skip_a_command_name_with_spaces_and_parens() {
        // pid (comm) state, then fields 4..; utime=250, stime=50 at fields 14, 15.
        let stat = "42 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(cpu_seconds(stat, 100.0), Some(3.0));
        assert_eq!(cpu_seconds("42 (x) S 1 2", 100.0), None);
    }

    #[test]
    fn resident_bytes_are_read_from_vmrss() {
        let status = "Name:\tztunnel\nVmRSS:\t   17408 kB\nThreads:\t4\n";
        assert_eq!(resident_bytes(status), Some(17408 * 1024));
        assert_eq!(resident_bytes("Name:\tx\n"), None);
    }
}
