//! Keeping the CPUs out of idle states while the bench measures.
//!
//! On virtual machines a halted vCPU takes long to wake: on a 2-vCPU KVM
//! guest (haltpoll cpuidle driver) the mesh's p50 round trip was 160 µs
//! with idle states allowed and 60 µs without, and the no-mesh figure 75
//! against 32 µs. Worse, which of the two a run got changed from run to
//! run, so latency rows were decided by the hypervisor. Holding a PM QoS
//! request of 0 µs on `/dev/cpu_dma_latency` keeps every CPU in its polling
//! state, as tuned's `latency-performance` profile does. The request lasts
//! as long as the file is open, and goes when the bench exits.

use std::{fs::File, io::Write};

/// The open request; dropping it lets the CPUs idle again.
pub struct CpusAwake {
    _request: File,
}

/// Asks the kernel to keep CPUs out of idle states. `None`, with the
/// reason printed, when it cannot (no such device, not root): the bench
/// then runs with idle states, as the results file records.
pub fn hold() -> Option<CpusAwake> {
    let path = "/dev/cpu_dma_latency";
    let request = File::options()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|()| f));
    match request {
        Ok(file) => Some(CpusAwake { _request: file }),
        Err(e) => {
            eprintln!("[bench] could not hold {path} at 0 µs ({e}): CPUs may idle between packets, and latency figures vary with how fast they wake");
            None
        }
    }
}
