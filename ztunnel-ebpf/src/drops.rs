//! Every drop is counted on its pod, and described through aya-log at debug
//! level when userspace asked for it at load. The level is a load-time
//! constant (`AYA_LOG_LEVEL`, read-only data frozen at load): with logging
//! off, the default, a drop costs its counter and one check of that
//! constant. Allowed traffic never reaches this code.

use aya_ebpf::programs::TcContext;
use aya_log_ebpf::debug;

use crate::{
    capture::TC_DROP,
    maps::{count, Counter},
    packet::TcpFlow,
};

/// Counts a drop of the flow `saddr -> daddr:dport` on `pod` for `reason`,
/// describes it when the kernel log level allows, and returns the verdict.
#[inline(always)]
pub fn drop(ctx: &TcContext, pod: u32, reason: Counter, saddr: u32, daddr: u32, dport: u16) -> i32 {
    count(pod, reason);
    debug!(
        ctx,
        "dropped reason={} src={:i} dst={:i}:{}",
        name(reason),
        u32::from_be(saddr),
        u32::from_be(daddr),
        u16::from_be(dport)
    );
    TC_DROP
}

/// [`drop`] of the TCP flow `flow`, counted on `pod`.
#[inline(always)]
pub fn drop_flow(ctx: &TcContext, pod: u32, reason: Counter, flow: &TcpFlow) -> i32 {
    drop(ctx, pod, reason, flow.saddr, flow.daddr, flow.dport)
}

/// [`drop`] of a flow whose source claims an enrolled pod's address it may
/// not use, counted on that pod.
#[inline(always)]
pub fn spoofed(ctx: &TcContext, flow: &TcpFlow) -> i32 {
    drop_flow(ctx, flow.saddr, Counter::DroppedSpoofed, flow)
}

/// The reason as the metrics label it (`ztunnel_kernel_*_dropped_total`).
#[inline(always)]
fn name(reason: Counter) -> &'static str {
    match reason {
        Counter::DroppedNoListener => "no_listener",
        Counter::PolicyDenied => "policy",
        Counter::DroppedFragment => "fragment",
        Counter::DroppedTruncated => "truncated",
        Counter::DroppedSpoofed => "spoofed",
        Counter::DroppedUncaptured => "uncaptured",
        Counter::OutboundCaptured
        | Counter::InboundCaptured
        | Counter::OutboundExcluded
        | Counter::OutboundDirect => "none",
    }
}
