//! Policy lookup.
//!
//! POLICY is an LPM trie keyed by [`PolicyKey`] = {endpoint, peer identity, direction, protocol,
//! dport} (all big-endian). The prefix covers the fixed 80 bits plus a port prefix: a rule for one
//! port is /96, an `endPort` range is a set of shorter port prefixes, "all ports of a protocol" is
//! /80. We always probe with the full /96 key, so the trie returns the most specific entry that
//! covers the port.
//!
//! Precedence (NetworkPolicy is a pure union, so the first hit allows):
//!   1. the peer's own identity (pod, host, remote node or world),
//!   2. the peer's CIDR identity (ipBlock rules; pods carry one too),
//!   3. `identity::ANY` (rules with no peers).

use aya_ebpf::maps::lpm_trie::Key;
use policy_common::{
    Direction, IdentityPair, POLICY_FULL_PREFIX_BITS, PolicyKey, PolicyValue, identity,
};

use crate::maps::POLICY;

#[inline(always)]
fn probe(
    endpoint: u32,
    peer: u32,
    direction: Direction,
    protocol: u8,
    dport: u16,
) -> Option<PolicyValue> {
    let key = Key::new(
        POLICY_FULL_PREFIX_BITS,
        PolicyKey::new(endpoint, peer, direction, protocol, dport),
    );
    POLICY.get(&key).copied()
}

/// The allowing entry for a new flow, if any.
#[inline(always)]
pub fn allows(
    endpoint: u32,
    direction: Direction,
    peer: IdentityPair,
    protocol: u8,
    dport: u16,
) -> Option<PolicyValue> {
    probe(endpoint, peer.identity, direction, protocol, dport)
        .or_else(|| {
            if peer.cidr_identity != identity::ANY {
                probe(endpoint, peer.cidr_identity, direction, protocol, dport)
            } else {
                None
            }
        })
        .or_else(|| probe(endpoint, identity::ANY, direction, protocol, dport))
}
