//! The kernel programs' drop reasons, through aya-log: each drop (spoofed
//! source, fragment, policy, no listener, ...) described with its addresses,
//! logged at debug level under the target [`TARGET`].
//!
//! Off by default, and then nearly free: the programs' log level is a
//! load-time constant (`AYA_LOG_LEVEL`, in read-only data frozen at load),
//! so a drop checks one constant and skips the logging; the ring buffer the
//! records would go to shrinks to one page. It is on when the log filter at start enables debug for
//! [`TARGET`] (`RUST_LOG=info,ztunnel::drops=debug`).

use aya::{Ebpf, EbpfLoader};
use tokio::io::{unix::AsyncFd, Interest};
use tracing::warn;

/// The target the programs' records carry: the module that logs them.
pub const TARGET: &str = "ztunnel::drops";

/// aya-log's levels: 0 is off, 4 is debug.
static LEVEL_OFF: u8 = 0;
static LEVEL_DEBUG: u8 = 4;
const RING_BYTES_ON: u32 = 128 * 1024;
const RING_BYTES_OFF: u32 = 4096;

/// Whether the log filter in force asks for the kernel's drop reasons.
pub fn wanted() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
}

/// Sets the programs' log level (and their ring buffer's size) before load.
pub fn configure(loader: &mut EbpfLoader<'_>, on: bool) {
    loader
        .override_global(
            "AYA_LOG_LEVEL",
            if on { &LEVEL_DEBUG } else { &LEVEL_OFF },
            true,
        )
        .map_max_entries("AYA_LOGS", if on { RING_BYTES_ON } else { RING_BYTES_OFF });
}

/// When on, reads the records of `ebpf`'s programs into the log for as
/// long as the process runs. Needs a Tokio runtime.
pub fn follow(ebpf: &mut Ebpf, on: bool) {
    if !on {
        return;
    }
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            warn!(error = %e, "the kernel's drop reasons cannot be read");
            return;
        }
    };
    // SAFETY: the logger owns the ring buffer's descriptor, which stays
    // open for as long as the AsyncFd (holding the logger) lives.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(e) => {
            warn!(error = %e, "the kernel's drop reasons cannot be read");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
