//! Map declarations. Layouts are defined and documented in `policy-common`.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use policy_common::{
    EndpointInfo, IdentityPair, PolicyKey, PolicyValue, Reason, capacity, identity,
};

/// Host veth ifindex → endpoint.
#[map(name = "ENDPOINTS")]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::with_max_entries(capacity::ENDPOINTS, 0);

/// IPv4 address prefix (network order) → identities.
#[map(name = "IPCACHE_V4")]
static IPCACHE_V4: LpmTrie<[u8; 4], IdentityPair> =
    LpmTrie::with_max_entries(capacity::IPCACHE_V4, 0);

/// See [`PolicyKey`] for the layout and prefix rules.
#[map(name = "POLICY")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::with_max_entries(capacity::POLICY, 0);

/// Per-CPU packet counts indexed by [`Reason`].
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[inline(always)]
pub fn endpoint(ifindex: u32) -> Option<EndpointInfo> {
    // SAFETY: the value is plain data copied out immediately.
    unsafe { ENDPOINTS.get(&ifindex).copied() }
}

/// Identities of an IPv4 address: the longest IPCACHE prefix, or the world with no CIDR identity.
#[inline(always)]
pub fn identities_v4(addr: [u8; 4]) -> IdentityPair {
    IPCACHE_V4
        .get(&Key::new(32, addr))
        .copied()
        .unwrap_or(IdentityPair {
            identity: identity::WORLD,
            cidr_identity: identity::ANY,
        })
}

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}
