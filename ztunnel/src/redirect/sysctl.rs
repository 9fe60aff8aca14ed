//! The one per-interface setting capture needs: `src_valid_mark` on pod
//! veths.
//!
//! The catch-all table makes every enrolled pod's address local for TCP.
//! When an enrolled pod's flow older than capture is forwarded, the
//! kernel's reverse-path check looks its source up and would find that
//! local route, and drop the packet as a martian. The TC program marks such
//! packets to skip the catch-all, and `src_valid_mark` lets the check see
//! the mark (as wg-quick sets it for WireGuard's own marked routing).

use std::io;

/// Sets `net.ipv4.conf.<ifname>.src_valid_mark` to 1 in this network
/// namespace, if it is not already.
pub fn enable_src_valid_mark(ifname: &str) -> io::Result<()> {
    if ifname.contains('/') || ifname.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an interface name: {ifname:?}"),
        ));
    }
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/src_valid_mark");
    if std::fs::read_to_string(&path)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(&path, "1").map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}
