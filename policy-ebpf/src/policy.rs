//! The two lookups that decide a new flow: the peer's identities (IPCACHE) and the allow entry
//! (POLICY). Each sits behind one function so the structures can change without touching the
//! callers.

use aya_ebpf::maps::lpm_trie::Key;
use policy_common::{
    Addr, Direction, IdentityPair, POLICY_MAX_CHUNKS, PolicyGroupKey, addr_octets, identity,
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
    match exact_identities(addr) {
        Some(pair) => pair,
        None => prefix_identities(addr),
    }
}

/// The IPCACHE_EXACT half of [`identities`]: the entry of a full-length address, if any.
#[inline(always)]
pub fn exact_identities(addr: &Addr) -> Option<IdentityPair> {
    // SAFETY: NO_PREALLOC map (RCU-freed elements); the value is copied out at once.
    unsafe { IPCACHE_EXACT.get(addr) }.copied()
}

/// The LPM half of [`identities`], for an address with no IPCACHE_EXACT entry.
#[inline(always)]
pub fn prefix_identities(addr: &Addr) -> IdentityPair {
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

/// Whether an address with these IPCACHE_EXACT identities can be a Service frontend. ClusterIPs
/// come from the Service range, never from the pod or node addresses, so a pod, host or remote
/// node entry settles it without a SERVICES lookup; an exact entry with the world identity (an
/// ipBlock /32 or /128) might name a ClusterIP and does not.
#[inline(always)]
pub const fn may_be_service(exact: &Option<IdentityPair>) -> bool {
    match exact {
        Some(pair) => pair.identity == identity::WORLD,
        None => true,
    }
}

/// One POLICY probe: the rule of a range of `endpoint`'s group for `peer` that contains
/// `dport`, or 0 (rule references start at 1).
///
/// POLICY is a hash keyed by [`PolicyGroupKey`] = {endpoint, peer identity, direction,
/// protocol, chunk}; each value holds up to 15 inclusive port ranges (an exact port, an `endPort`
/// range, or 0-65535 for "all ports", merged by the compiler), and says whether another chunk
/// follows (at most `POLICY_MAX_CHUNKS`, so 120 ranges per group). Groups
/// are small (one per peer a rule names), so a probe is one hash lookup and a short scan, however
/// many policies exist. A global BPF function (exported by `build.rs`), so the verifier checks the
/// scan once instead of at every call site.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn policy_probe(
    endpoint: u32,
    peer: u32,
    direction: u8,
    protocol: u8,
    dport: u16,
) -> u32 {
    let mut key = PolicyGroupKey {
        endpoint,
        identity: peer,
        direction,
        protocol,
        chunk: 0,
        _pad: 0,
    };
    for chunk in 0..POLICY_MAX_CHUNKS {
        key.chunk = chunk;
        let Some(value) = POLICY.get_ptr(&key) else {
            return 0;
        };
        // SAFETY: NO_PREALLOC map (RCU-freed elements): the value stays valid for this run.
        let value = unsafe { &*value };
        // Every slot is scanned (unused ones, at the end of the last chunk, say rule 0 = none):
        // a fixed-length loop is cheaper to verify than one bounded by `count`. The test is
        // done on derived values (offset into the range ≤ its span) so that the verifier does
        // not narrow `dport` at each slot and explore every combination of outcomes.
        for range in &value.ranges {
            let offset = u32::from(dport).wrapping_sub(u32::from(range.first));
            let span = u32::from(range.last).wrapping_sub(u32::from(range.first));
            if offset <= span {
                return range.rule;
            }
        }
        if value.more == 0 {
            return 0;
        }
    }
    0
}

/// The rule that allows a new flow, if any.
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
) -> Option<u32> {
    let direction = direction as u8;
    let mut rule = policy_probe(endpoint, peer.identity, direction, protocol, dport);
    if rule == 0 && peer.cidr_identity != identity::ANY {
        rule = policy_probe(endpoint, peer.cidr_identity, direction, protocol, dport);
    }
    if rule == 0 {
        rule = policy_probe(endpoint, identity::ANY, direction, protocol, dport);
    }
    (rule != 0).then_some(rule)
}
