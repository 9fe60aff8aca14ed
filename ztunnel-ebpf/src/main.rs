//! ztunnel's kernel programs: TC classifiers that hand pod TCP flows to the
//! userspace proxy with `bpf_sk_assign`.
//!
//! The entry points stay thin: parsing lives in [`packet`], socket lookups in
//! [`socket`], the shared maps in [`maps`] and the capture rules in [`capture`].
#![no_std]
#![no_main]

mod capture;
mod lookup;
mod maps;
mod packet;
mod socket;

use aya_ebpf::{
    macros::{classifier, sk_lookup},
    programs::{SkLookupContext, TcContext},
};

/// Attached at the TC ingress of a pod's host-side veth: sees every packet the
/// pod sends (outbound capture), and every packet a local pod sends to another
/// local pod (inbound capture for the enrolled destination).
#[classifier]
pub fn zt_pod_ingress(ctx: TcContext) -> i32 {
    capture::from_pod(&ctx)
}

/// Attached at the TC ingress of an uplink: sees what other nodes send to this
/// node's pods (inbound capture, and the return path of ztunnel's own
/// connections opened from an enrolled pod's address).
#[classifier]
pub fn zt_uplink_ingress(ctx: TcContext) -> i32 {
    capture::from_uplink(&ctx)
}

/// Attached to ztunnel's network namespace: when the kernel looks for a
/// listener for a SYN the TC programs marked for local delivery, this
/// picks ztunnel's.
#[sk_lookup]
pub fn zt_listener_lookup(ctx: SkLookupContext) -> u32 {
    lookup::steer(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
