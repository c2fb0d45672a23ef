//! Fragments. Only the first fragment of a datagram carries the ports, so it is judged like any
//! packet and its verdict, if it passed, is recorded in FRAGMENTS (LRU) under {src, dst, IP id,
//! protocol, endpoint, direction}. Later fragments at the same hook follow it; a later fragment
//! with no recorded first fragment (reordered ahead of it, or whose first fragment was dropped) is
//! dropped as [`Reason::DroppedFragment`]. The sender retransmits; nothing leaks.

use policy_common::{Direction, FragKey, FragValue, Reason};

use crate::decide::Verdict;
use crate::maps::FRAGMENTS;
use crate::parse::{FRAG_FIRST, Packet};

#[inline(always)]
fn key(endpoint: u32, direction: Direction, pkt: &Packet) -> FragKey {
    FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id: pkt.frag_id,
        endpoint,
        protocol: pkt.protocol,
        direction: direction as u8,
        _pad: 0,
    }
}

/// The verdict of a later fragment.
#[inline(always)]
pub fn follow(endpoint: u32, direction: Direction, pkt: &Packet) -> Verdict {
    let allowed = match FRAGMENTS.get_ptr(&key(endpoint, direction, pkt)) {
        // SAFETY: map value pointer from the lookup; plain data.
        Some(v) => unsafe { (*v).allowed == 1 },
        None => false,
    };
    let reason = if allowed {
        Reason::AllowedFragment
    } else {
        Reason::DroppedFragment
    };
    Verdict::new(reason, endpoint, direction)
}

/// Records the verdict of a first fragment that passed; returns the verdict to apply (a failed
/// record drops the first fragment too, since its followers would be dropped anyway).
#[inline(always)]
pub fn record_first(
    endpoint: u32,
    direction: Direction,
    pkt: &Packet,
    verdict: Verdict,
) -> Verdict {
    if pkt.frag != FRAG_FIRST || verdict.reason.is_drop() {
        return verdict;
    }
    let value = FragValue {
        allowed: 1,
        _pad: 0,
    };
    match FRAGMENTS.insert(&key(endpoint, direction, pkt), &value, 0) {
        Ok(()) => verdict,
        Err(_) => Verdict {
            reason: Reason::DroppedInternal,
            ..verdict
        },
    }
}
