//! Map declarations and the small accessors every module shares. Key and value layouts are
//! defined and documented in `policy-common`; the lookups that give them meaning live next to
//! their users (`policy.rs`, `conntrack.rs`, `fragments.rs`).
//!
//! Maps the agent writes are hash maps created with `BPF_F_NO_PREALLOC`: their elements are
//! freed through RCU, so a value read here is never recycled under the program by a concurrent
//! update. CONNTRACK and FRAGMENTS are LRU maps written by the programs themselves.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use policy_common::{
    Addr, Config, CtKey, CtValue, EndpointInfo, EndpointSlot, FragKey, FragValue, IdentityPair,
    PolicyGroupKey, PortRanges, Reason, ServiceKey, capacity,
};

/// Host-side veth ifindex → endpoint.
#[map(name = "ENDPOINTS")]
static ENDPOINTS: HashMap<u32, EndpointInfo> =
    HashMap::with_max_entries(capacity::ENDPOINTS, BPF_F_NO_PREALLOC);

/// Host-side veth ifindex → the same endpoint as ENDPOINTS, packed ([`EndpointSlot`]): what the
/// veth hooks read first. An array, so the lookup is an address computation (the verifier
/// inlines it) instead of a hash and a helper call; mmapable, so that the agent stores each slot
/// whole with one atomic store.
#[map(name = "ENDPOINT_SLOTS")]
static ENDPOINT_SLOTS: Array<EndpointSlot> =
    Array::with_max_entries(capacity::ENDPOINT_SLOTS, BPF_F_MMAPABLE);

/// Endpoint id → endpoint (the post-DNAT hooks know the source endpoint only by its id).
#[map(name = "ENDPOINTS_BY_ID")]
static ENDPOINTS_BY_ID: HashMap<u32, EndpointInfo> =
    HashMap::with_max_entries(capacity::ENDPOINTS, BPF_F_NO_PREALLOC);

/// Full-length addresses (/32, /128) → identities. See `policy::identities`.
#[map(name = "IPCACHE_EXACT")]
pub static IPCACHE_EXACT: HashMap<Addr, IdentityPair> =
    HashMap::with_max_entries(capacity::IPCACHE_EXACT, BPF_F_NO_PREALLOC);

/// IPv4 address prefix (network order) → identities. See `policy::identities`.
#[map(name = "IPCACHE_V4")]
pub static IPCACHE_V4: LpmTrie<[u8; 4], IdentityPair> =
    LpmTrie::with_max_entries(capacity::IPCACHE_V4, 0);

/// IPv6 address prefix (network order) → identities. See `policy::identities`.
#[map(name = "IPCACHE_V6")]
pub static IPCACHE_V6: LpmTrie<[u8; 16], IdentityPair> =
    LpmTrie::with_max_entries(capacity::IPCACHE_V6, 0);

/// Allowed port ranges per (endpoint, peer identity, direction, protocol); see
/// `policy::allows` for the lookup.
#[map(name = "POLICY")]
pub static POLICY: HashMap<PolicyGroupKey, PortRanges> =
    HashMap::with_max_entries(capacity::POLICY, BPF_F_NO_PREALLOC);

/// Service frontend addresses (ClusterIPs) → flags (unused, 0).
#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, u32> =
    HashMap::with_max_entries(capacity::SERVICES, BPF_F_NO_PREALLOC);

/// Connection tracking. See `conntrack.rs`.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(capacity::CONNTRACK, 0);

/// First-fragment verdicts. See `fragments.rs`.
#[map(name = "FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS, 0);

/// Runtime settings, index 0.
#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Per-CPU packet counts indexed by [`Reason`].
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// Verdict events for the agent's flow log and metrics.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

/// Per-CPU event rate limiter: `[window start ns, events sent in the window]`.
#[map(name = "EVENT_RATE")]
pub static EVENT_RATE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The endpoint behind host veth `ifindex`: its ENDPOINT_SLOTS slot, read with one 8-byte load
/// (a concurrent store by the agent is seen whole or not at all), or, for an empty slot or an
/// ifindex past the array, its ENDPOINTS entry.
#[inline(always)]
pub fn endpoint(ifindex: u32) -> Option<EndpointInfo> {
    if let Some(slot) = ENDPOINT_SLOTS.get_ptr(ifindex) {
        // SAFETY: an aligned pointer into the array returned by the lookup; a volatile read is
        // one load, never split or repeated by the compiler.
        if let Some(info) = unsafe { core::ptr::read_volatile(slot) }.unpack() {
            return Some(info);
        }
    }
    // SAFETY: NO_PREALLOC map (RCU-freed elements); the value is copied out at once.
    unsafe { ENDPOINTS.get(&ifindex).copied() }
}

#[inline(always)]
pub fn endpoint_by_id(id: u32) -> Option<EndpointInfo> {
    // SAFETY: as in `endpoint`.
    unsafe { ENDPOINTS_BY_ID.get(&id).copied() }
}

/// Whether `addr` (IPv4-mapped for IPv4) is a Service frontend address.
#[inline(always)]
pub fn is_service(addr: &Addr) -> bool {
    SERVICES.get_ptr(&ServiceKey { addr: *addr }).is_some()
}

/// The runtime settings. The array always has its element; all zero until the agent writes it,
/// which means: no mark bits (Service traffic of egress-isolated pods drops), timeouts of 0
/// (every packet is a new flow, also for a `kernel_hz` of 0), no events. All of those fail closed.
#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(config) => *config,
        None => Config {
            mark_mask: 0,
            mark_shift: 0,
            ct_tcp_timeout_s: 0,
            ct_tcp_closing_timeout_s: 0,
            ct_udp_timeout_s: 0,
            ct_sctp_timeout_s: 0,
            events_allowed: 0,
            events_per_sec: 0,
            kernel_hz: 0,
        },
    }
}

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}
