//! Giving back, once ready, the memory that starting needed and running
//! does not. Idle RSS is what a node pays for ztunnel before any traffic.

use tracing::debug;

/// Returns the heap's free pages to the kernel, and drops this process's
/// mapping of the embedded eBPF object.
///
/// - Loading the eBPF object (parsing its ELF and BTF) and the first
///   configuration frees about 2 MiB of heap that glibc would otherwise
///   keep mapped for reuse: `malloc_trim` hands those pages back.
/// - The object itself (about 650 KiB, in the binary's read-only data) is
///   read once per load. Its pages stay counted in RSS for as long as they
///   are mapped; dropping them costs only a refault, from the page cache,
///   if a later repair loads the object again.
pub fn release_startup_memory() {
    let before = rss_kib();
    // SAFETY: malloc_trim only releases free memory glibc holds; it is
    // safe to call at any time from any thread.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
    drop_pages(crate::redirect::embedded_object());
    debug!(
        rss_before_kib = before,
        rss_after_kib = rss_kib(),
        "startup memory released"
    );
}

/// Drops the process's page mappings of the whole pages inside `bytes`,
/// which must be read-only data that is never written (so every page is
/// still the file's: a later read faults in the same contents).
fn drop_pages(bytes: &'static [u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => return,
    };
    let start = (bytes.as_ptr() as usize).div_ceil(page) * page;
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if start >= end {
        return;
    }
    // SAFETY: [start, end) lies inside `bytes`, a static in the binary's
    // read-only segment holding no relocations, so its pages were never
    // written: MADV_DONTNEED only unmaps them, and the next read (if any)
    // maps the identical file contents again. No reference is invalidated.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    if rc != 0 {
        debug!(error = %std::io::Error::last_os_error(), "could not drop the eBPF object's pages");
    }
}

/// This process's resident set, in KiB (0 if unreadable).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    static DATA: [u8; 3 * 4096 + 100] = [7; 3 * 4096 + 100];

    #[test]
    fn dropped_pages_read_back_unchanged() {
        let bytes: &'static [u8] = &DATA;
        let sum_before: u64 = bytes.iter().map(|&b| u64::from(b)).sum();
        drop_pages(bytes);
        let sum_after: u64 = bytes.iter().map(|&b| u64::from(b)).sum();
        assert_eq!(sum_before, sum_after);
        assert!(rss_kib() > 0);
    }
}
