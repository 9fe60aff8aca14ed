//! ztunnel's kernel programs: TC classifiers that hand pod TCP flows to the
//! userspace proxy, a guard that drops what got past them, and the
//! listener lookup that delivers captured SYNs.
//!
//! The entry points stay thin: parsing lives in [`packet`], socket lookups in
//! [`socket`], the shared maps in [`maps`], the capture rules in [`capture`]
//! (split in two for bridged pods in [`bridge`]), same-node connections that
//! pass with no proxy in [`direct`],
//! the egress guard in [`guard`] and listener selection in [`lookup`].
#![no_std]
#![no_main]

mod bridge;
mod capture;
mod direct;
mod drops;
mod guard;
mod lookup;
mod maps;
mod packet;
mod socket;

use aya_ebpf::{
    macros::{classifier, sk_lookup},
    programs::{SkLookupContext, TcContext},
};
use packet::{ETH_HLEN, L3_HLEN};

/// Attached at the TC ingress of a pod's host-side veth: sees every packet the
/// pod sends (outbound capture), and every packet a local pod sends to another
/// local pod (inbound capture for the enrolled destination).
#[classifier]
pub fn zt_pod_ingress(ctx: TcContext) -> i32 {
    capture::from_pod(&ctx)
}

/// Attached at the TC ingress of every port of a bridge enrolled pods sit
/// behind: source checks, and pod-to-pod TCP sent up to the bridge.
#[classifier]
pub fn zt_port_ingress(ctx: TcContext) -> i32 {
    bridge::port_ingress(&ctx)
}

/// Attached at the TC ingress of such a bridge device: capture for the
/// pods behind it.
#[classifier]
pub fn zt_bridge_ingress(ctx: TcContext) -> i32 {
    bridge::bridge_ingress(&ctx)
}

/// Attached at the TC ingress of an Ethernet uplink: sees what other nodes
/// send to this node's pods (inbound capture, and the return path of
/// ztunnel's own connections opened from an enrolled pod's address).
#[classifier]
pub fn zt_uplink_ingress(ctx: TcContext) -> i32 {
    capture::from_uplink::<ETH_HLEN>(&ctx)
}

/// [`zt_uplink_ingress`] for L3 devices (IPIP, WireGuard, TUN).
#[classifier]
pub fn zt_uplink_ingress_l3(ctx: TcContext) -> i32 {
    capture::from_uplink::<L3_HLEN>(&ctx)
}

/// Attached at the TC egress of every pod veth and Ethernet uplink: drops
/// forwarded SYNs to or from enrolled pods, which capture missed.
#[classifier]
pub fn zt_guard_egress(ctx: TcContext) -> i32 {
    guard::egress::<ETH_HLEN>(&ctx)
}

/// [`zt_guard_egress`] for L3 devices.
#[classifier]
pub fn zt_guard_egress_l3(ctx: TcContext) -> i32 {
    guard::egress::<L3_HLEN>(&ctx)
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
