//! tc programs enforcing NetworkPolicy on the host side of each pod's veth ("generic veth
//! chaining": the CNI owns the veth, we attach beside it).
//!
//! - `from_pod`: tc ingress of a pod's host veth, i.e. what the pod sends (its egress).
//! - `to_pod`: tc egress of a pod's host veth, i.e. what the pod receives (its ingress).
//! - `to_network`: tc egress of the node's uplink and tunnel devices, where Service traffic to
//!   backends on other nodes gets its post-DNAT egress verdict.
//! - `noop`: returns "ok"; the floor of the per-packet benchmark.
//!
//! Each entry is thin: `decide` (parse → conntrack → identity and policy lookups) produces a
//! [`Verdict`], and [`finish`] is the one exit that counts it per CPU, reports it on the EVENTS
//! ring buffer when warranted and turns it into `TC_ACT_SHOT` or `TC_ACT_OK`.
#![no_std]
#![no_main]

mod conntrack;
mod decide;
mod events;
mod fragments;
mod maps;
mod parse;
mod policy;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};

use crate::decide::Verdict;
use crate::parse::Packet;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let mut pkt = Packet::empty();
    let verdict = decide::from_pod(&ctx, &mut pkt);
    finish(&ctx, &pkt, None, &verdict)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let mut pkt = Packet::empty();
    let mut egress = None;
    let verdict = decide::to_pod(&ctx, &mut pkt, &mut egress);
    finish(&ctx, &pkt, egress, &verdict)
}

#[classifier]
pub fn to_network(ctx: TcContext) -> i32 {
    let mut pkt = Packet::empty();
    let verdict = decide::to_network(&ctx, &mut pkt);
    finish(&ctx, &pkt, None, &verdict)
}

#[classifier]
pub fn noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// The one exit. `first` is a decision made earlier for the same packet (the deferred egress
/// verdict of Service traffic at `to_pod`), counted and reported too; the packet's fate is
/// `verdict`'s.
#[inline(always)]
fn finish(ctx: &TcContext, pkt: &Packet, first: Option<Verdict>, verdict: &Verdict) -> i32 {
    if let Some(first) = first {
        report(ctx, pkt, &first);
    }
    report(ctx, pkt, verdict);
    if verdict.reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// Counts a verdict and sends its event when warranted. CONFIG is only read for drops and new
/// flows: the packets of established flows need nothing but the counter.
#[inline(always)]
fn report(ctx: &TcContext, pkt: &Packet, verdict: &Verdict) {
    maps::count(verdict.reason);
    if !verdict.reason.is_drop() && !verdict.new_flow {
        return;
    }
    let config = maps::config();
    if verdict.reason.is_drop() || config.events_allowed != 0 {
        events::emit(decide::ifindex(ctx), pkt, verdict, &config);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
