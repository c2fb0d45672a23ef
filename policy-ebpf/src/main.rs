//! tc programs enforcing NetworkPolicy on the host side of each pod's veth.
//!
//! `from_pod` runs on tc ingress of the host veth (the pod's egress), `to_pod` on tc egress (the
//! pod's ingress). Both call [`decide`], which returns one [`Reason`]; [`finish`] is the single exit
//! that counts the reason and turns it into a tc action.
#![no_std]
#![no_main]

mod maps;
mod parse;
mod policy;

use aya_ebpf::{
    bindings::TC_ACT_OK, bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext,
};
use policy_common::{Direction, Reason, endpoint_flags, identity};

use crate::parse::Packet;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    finish(decide(&ctx, Direction::Egress))
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    finish(decide(&ctx, Direction::Ingress))
}

/// The one exit: count the reason, drop iff it is a drop reason.
#[inline(always)]
fn finish(reason: Reason) -> i32 {
    maps::count(reason);
    if reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

#[inline(always)]
fn decide(ctx: &TcContext, direction: Direction) -> Reason {
    // SAFETY: the kernel hands a valid __sk_buff to tc programs.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(ep) = maps::endpoint(ifindex) else {
        return Reason::AllowedNotPoliced;
    };
    let pkt = match parse::parse(ctx) {
        Ok(Some(pkt)) => pkt,
        Ok(None) => return Reason::AllowedNotPoliced,
        Err(reason) => return reason,
    };
    if ep.flags & endpoint_flags::NOT_PROGRAMMED != 0 {
        return Reason::DroppedEndpointNotProgrammed;
    }
    let isolated = match direction {
        Direction::Ingress => endpoint_flags::INGRESS_ISOLATED,
        Direction::Egress => endpoint_flags::EGRESS_ISOLATED,
    };
    if ep.flags & isolated == 0 {
        return Reason::AllowedNotIsolated;
    }
    let Packet {
        src,
        dst,
        protocol,
        dport,
        ..
    } = pkt;
    let peer_addr = match direction {
        Direction::Ingress => src,
        Direction::Egress => dst,
    };
    let peer = maps::identities_v4(peer_addr);
    if peer.identity == identity::HOST {
        return Reason::AllowedHost;
    }
    if policy::allows(ep.id, direction, peer, protocol, dport).is_some() {
        Reason::AllowedByPolicy
    } else {
        Reason::DroppedPolicy
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
