//! Reference programs of the per-packet benchmark: the work a verdict cannot avoid, measured in
//! the same run and on the same maps as the real programs, so that each real program is reported
//! as a ratio to its reference (absolute nanoseconds differ between machines; ratios do not).
//!
//! Each parses the packet with the real parser (reading the headers is unavoidable) and then
//! does only the map operations named in [`policy_common::program_names`]. None looks up the
//! endpoint (its id is [`program_names::REF_ENDPOINT`]), counts, reports or reads the clock
//! beyond what the insert needs. Each returns `TC_ACT_UNSPEC` when the map operation found what
//! the benchmark's scenario put there and `TC_ACT_SHOT` otherwise, so the benchmark checks that
//! the reference did its work (a miss where a hit was due would measure less).
//!
//! The agent never loads them (`dataplane::loader::PROGRAMS`).

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use policy_common::{CtValue, Direction, identity, program_names::REF_ENDPOINT};

use crate::conntrack;
use crate::maps::{CONNTRACK, IPCACHE_V4};
use crate::parse::{Packet, Parsed, parse};
use crate::policy::{identities, policy_probe};

/// The parsed packet, or None for anything but a TCP/UDP/SCTP packet with ports.
#[inline(always)]
fn parsed(ctx: &TcContext) -> Option<Packet> {
    let mut pkt = Packet::empty();
    match parse(ctx, &mut pkt) {
        Ok(Parsed::Policed) => Some(pkt),
        _ => None,
    }
}

#[inline(always)]
const fn action(ok: bool) -> i32 {
    if ok { TC_ACT_UNSPEC } else { TC_ACT_SHOT }
}

/// One CONNTRACK lookup (a hit for the established scenario's flow).
#[classifier]
pub fn ref_ct_lookup(ctx: TcContext) -> i32 {
    let Some(pkt) = parsed(&ctx) else {
        return TC_ACT_SHOT;
    };
    let (key, _) = conntrack::key(REF_ENDPOINT, &pkt);
    action(CONNTRACK.get_ptr(&key).is_some())
}

#[inline(always)]
fn insert(pkt: &Packet) -> bool {
    let (key, _) = conntrack::key(REF_ENDPOINT, pkt);
    let value = CtValue {
        last_seen: 0,
        rule: 1,
        flags: 0,
        generation: 0,
        _pad: 0,
    };
    CONNTRACK.insert(&key, &value, 0).is_ok()
}

/// One CONNTRACK insert.
#[classifier]
pub fn ref_lru_insert(ctx: TcContext) -> i32 {
    let Some(pkt) = parsed(&ctx) else {
        return TC_ACT_SHOT;
    };
    action(insert(&pkt))
}

/// One IPCACHE_V4 longest-prefix lookup of the destination (found for the CIDR scenario's
/// world address).
#[classifier]
pub fn ref_lpm_lookup(ctx: TcContext) -> i32 {
    let Some(pkt) = parsed(&ctx) else {
        return TC_ACT_SHOT;
    };
    let found = IPCACHE_V4
        .get(&Key::new(32, pkt.dst[3].to_ne_bytes()))
        .is_some();
    action(found)
}

/// A CONNTRACK lookup, the peer's identities (exact, then longest prefix), one POLICY probe with
/// the identity a rule names (the CIDR identity of a world address, else the peer's own),
/// CONNTRACK insert.
#[classifier]
pub fn ref_new_flow(ctx: TcContext) -> i32 {
    let Some(pkt) = parsed(&ctx) else {
        return TC_ACT_SHOT;
    };
    // A new flow's lookup misses; the benchmark repeats one packet, so here it finds the entry
    // the previous run inserted (the real program then sees it expired, with timeouts of 0).
    // Either way it is one hash lookup, whose outcome the reference does not act on.
    let (key, _) = conntrack::key(REF_ENDPOINT, &pkt);
    core::hint::black_box(CONNTRACK.get_ptr(&key));
    let peer = identities(&pkt.dst);
    let named = if peer.identity == identity::WORLD && peer.cidr_identity != identity::ANY {
        peer.cidr_identity
    } else {
        peer.identity
    };
    let rule = policy_probe(
        REF_ENDPOINT,
        named,
        Direction::Egress as u8,
        pkt.protocol,
        pkt.dport,
    );
    action(rule != 0 && insert(&pkt))
}
