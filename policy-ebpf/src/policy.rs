//! The two lookups that decide a new flow: the peer's identities (IPCACHE) and the allow entry
//! (POLICY). Each sits behind one function so the structures can change without touching the
//! callers.

use aya_ebpf::maps::lpm_trie::Key;
use policy_common::{
    Addr, Direction, IdentityPair, POLICY_FULL_PREFIX_BITS, PolicyKey, PolicyValue, addr_octets,
    identity,
};

use crate::maps::{IPCACHE_EXACT, IPCACHE_V4, IPCACHE_V6, POLICY};
use crate::parse::is_mapped_v4;

/// Identities of a peer address (IPv4-mapped for IPv4).
///
/// Two structures, longest match first:
/// 1. IPCACHE_EXACT, a hash keyed by the full address: every /32 and /128 entry (pods, nodes).
///    Most peers are pods, and a hash lookup stays flat however many CIDR prefixes exist;
/// 2. IPCACHE_V4 / IPCACHE_V6, LPM tries keyed by `[u8; 4]` / `[u8; 16]` in network order with
///    every shorter prefix (ipBlocks, node and pod ranges), probed with the full address.
///
/// An exact entry is by definition the longest match, so nothing shorter can override it. The
/// value carries both the peer's own identity (pod, host, remote node, world) and the CIDR
/// identity of the most specific ipBlock prefix containing the address, so that ipBlock rules
/// match pod addresses too (the compiler fills both for every entry). A miss is the world with
/// no CIDR identity.
#[inline(always)]
pub fn identities(addr: &Addr) -> IdentityPair {
    // SAFETY: NO_PREALLOC map (RCU-freed elements); the value is copied out at once.
    if let Some(pair) = unsafe { IPCACHE_EXACT.get(addr) } {
        return *pair;
    }
    let found = if is_mapped_v4(addr) {
        IPCACHE_V4
            .get(&Key::new(32, addr[3].to_ne_bytes()))
            .copied()
    } else {
        IPCACHE_V6.get(&Key::new(128, addr_octets(*addr))).copied()
    };
    found.unwrap_or(IdentityPair {
        identity: identity::WORLD,
        cidr_identity: identity::ANY,
    })
}

/// One POLICY probe.
///
/// POLICY is an LPM trie keyed by [`PolicyKey`] = {endpoint, peer identity, direction,
/// protocol, dport}, all big-endian, so the trie compares them bit by bit in that order. An entry's
/// prefix covers the fixed 80 bits plus a prefix of the port: one port is /96, an `endPort` range
/// is the handful of port prefixes that tile it, all ports of a protocol is /80. We probe with
/// the full /96 key, so the trie answers with the most specific entry covering the port.
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

/// The entry that allows a new flow, if any.
///
/// Precedence (NetworkPolicy is a pure union, so the first hit allows; the order only decides
/// which rule a flow is attributed to):
///   1. the peer's own identity (pod, host, remote node or world),
///   2. the peer's CIDR identity, when it has one (ipBlock rules; pods carry one too),
///   3. `identity::ANY` (rules with no peers, or whose peers match everything).
#[inline(always)]
pub fn allows(
    endpoint: u32,
    direction: Direction,
    peer: IdentityPair,
    protocol: u8,
    dport: u16,
) -> Option<PolicyValue> {
    if let Some(v) = probe(endpoint, peer.identity, direction, protocol, dport) {
        return Some(v);
    }
    if peer.cidr_identity != identity::ANY {
        if let Some(v) = probe(endpoint, peer.cidr_identity, direction, protocol, dport) {
            return Some(v);
        }
    }
    probe(endpoint, identity::ANY, direction, protocol, dport)
}
