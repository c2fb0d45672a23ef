//! tc programs enforcing NetworkPolicy on the host side of each pod's veth ("generic veth
//! chaining": the CNI owns the veth, we attach beside it).
//!
//! - `from_pod`: tc ingress of a pod's host veth, i.e. what the pod sends (its egress).
//! - `to_pod`: tc egress of a pod's host veth, i.e. what the pod receives (its ingress).
//! - `to_network`: tc egress of the node's uplink and tunnel devices, where Service traffic to
//!   backends on other nodes gets its post-DNAT egress verdict.
//! - `noop`: returns what an allowed packet gets and does nothing else; the floor of the
//!   per-packet benchmark. `ref_*` (`reference`): the benchmark's references of unavoidable work.
//!
//! Each entry is thin: `decide` (parse → conntrack → identity and policy lookups) produces a
//! [`Verdict`], and [`finish`] is the one exit that counts it per CPU, reports it on the EVENTS
//! ring buffer when warranted and turns it into a tc action:
//! - a drop is `TC_ACT_SHOT`: the packet is freed, nothing after us sees it;
//! - anything else is `TC_ACT_UNSPEC` (-1), which is `TCX_NEXT` in TCX mode: "no verdict, go on".
//!   The next program on the same hook runs (a CNI's own tc programs attached after ours on the
//!   veth or the uplink: TCX links later in the chain, cls_bpf filters at a later priority, or
//!   the clsact qdisc's filters behind the TCX chain); with none left the kernel delivers the
//!   packet as with `TC_ACT_OK`. `TC_ACT_OK` would end the chain and skip them.
// std exists only on the host, where this crate is merely checked (`cargo clippy --workspace`):
// there it brings its own panic handler, which would clash with ours whenever feature
// unification gives policy-common its `std` feature.
#![cfg_attr(target_arch = "bpf", no_std)]
#![no_main]
// Map keys and values are handed to the helpers by reference, as the stack slot the helper
// reads: a by-value argument would be one more copy for the optimiser to remove.
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod decide;
mod events;
mod fragments;
mod maps;
mod parse;
mod policy;
mod reference;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
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
    match decide::to_network(&ctx, &mut pkt) {
        Some(verdict) => finish(&ctx, &pkt, None, &verdict),
        // No deferred decision: the node's own traffic, not ours to count.
        None => TC_ACT_UNSPEC,
    }
}

/// The benchmark's floor returns exactly what [`finish`] returns for an allowed packet, so that
/// floor and scenarios end alike. The action is one immediate move whatever its value and
/// BPF_PROG_TEST_RUN does nothing with it but report it, so the floor costs what it did when it
/// returned `TC_ACT_OK`: figures stay comparable.
#[classifier]
pub fn noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// The one exit. `first` is a decision made earlier for the same packet (the deferred egress
/// verdict of Service traffic at `to_pod`), counted and reported too; the packet's fate is
/// `verdict`'s: `TC_ACT_SHOT` for a drop, else `TC_ACT_UNSPEC` so that programs after ours on
/// the hook still run (see the module documentation).
#[inline(always)]
fn finish(ctx: &TcContext, pkt: &Packet, first: Option<Verdict>, verdict: &Verdict) -> i32 {
    if let Some(first) = first {
        report(ctx, pkt, &first);
    }
    report(ctx, pkt, verdict);
    if verdict.reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
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

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
