//! Types shared by the eBPF programs (`policy-ebpf`) and the agent (`policy-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a `const` size assertion, so
//! both sides agree byte for byte. Multi-byte fields that take part in an LPM prefix are stored in
//! network byte order (the LPM trie compares bits from the first byte); everything else is in host
//! byte order. The `user` feature adds `aya::Pod` impls for the agent.
#![no_std]

#[cfg(any(feature = "std", test))]
extern crate std;

#[cfg(any(feature = "std", test))]
pub mod truth_table;

#[cfg(feature = "std")]
pub mod status;

/// Names of the maps, as declared in `policy-ebpf` and pinned under the agent's bpffs directory.
pub mod map_names {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const ENDPOINTS_BY_ID: &str = "ENDPOINTS_BY_ID";
    pub const ENDPOINT_SLOTS: &str = "ENDPOINT_SLOTS";
    pub const IPCACHE_EXACT: &str = "IPCACHE_EXACT";
    pub const IPCACHE_V4: &str = "IPCACHE_V4";
    pub const IPCACHE_V6: &str = "IPCACHE_V6";
    pub const POLICY: &str = "POLICY";
    pub const SERVICES: &str = "SERVICES";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const CONFIG: &str = "CONFIG";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU state of the event rate limiter (internal to the programs).
    pub const EVENT_RATE: &str = "EVENT_RATE";

    /// Every map of the object, in the order the loader pins them.
    pub const ALL: [&str; 14] = [
        ENDPOINTS,
        ENDPOINTS_BY_ID,
        ENDPOINT_SLOTS,
        IPCACHE_EXACT,
        IPCACHE_V4,
        IPCACHE_V6,
        POLICY,
        SERVICES,
        CONNTRACK,
        FRAGMENTS,
        CONFIG,
        COUNTERS,
        EVENTS,
        EVENT_RATE,
    ];

    /// The maps that fill up (hashes, LRU hashes and LPM tries), whose entries the agent counts
    /// in the kernel for `policy_agent_map_entries` / `policy_agent_map_pressure_ratio`. The
    /// others have no entry count: CONFIG, COUNTERS and EVENT_RATE are arrays (always full),
    /// EVENTS is a ring buffer, and ENDPOINT_SLOTS is an array that mirrors ENDPOINTS (its
    /// entries are ENDPOINTS' below [`super::capacity::ENDPOINT_SLOTS`]).
    pub const COUNTED: [&str; 9] = [
        ENDPOINTS,
        ENDPOINTS_BY_ID,
        IPCACHE_EXACT,
        IPCACHE_V4,
        IPCACHE_V6,
        POLICY,
        SERVICES,
        CONNTRACK,
        FRAGMENTS,
    ];
}

/// Names of the tc programs in the eBPF object.
pub mod program_names {
    /// tc ingress of a pod's host-side veth: packets the pod sends (pod egress).
    pub const FROM_POD: &str = "from_pod";
    /// tc egress of a pod's host-side veth: packets delivered to the pod (pod ingress).
    pub const TO_POD: &str = "to_pod";
    /// tc egress of the node's uplink / tunnel devices: post-DNAT egress decisions for Service
    /// traffic whose backend lives on another node.
    pub const TO_NETWORK: &str = "to_network";
    /// Returns what an allowed packet gets (`TC_ACT_UNSPEC`) and does nothing else: the floor of
    /// the per-packet benchmark.
    pub const NOOP: &str = "noop";
    /// Reference programs of the per-packet benchmark (never loaded by the agent): the work a
    /// verdict cannot avoid, on the same maps. Each parses the packet as the real programs do,
    /// then: one CONNTRACK lookup;
    pub const REF_CT_LOOKUP: &str = "ref_ct_lookup";
    /// one CONNTRACK insert (LRU);
    pub const REF_LRU_INSERT: &str = "ref_lru_insert";
    /// one IPCACHE_V4 longest-prefix lookup of the destination;
    pub const REF_LPM_LOOKUP: &str = "ref_lpm_lookup";
    /// the sequence a new allowed flow cannot avoid: CONNTRACK miss, the peer's identities, one
    /// POLICY probe (with the identity the allowing rule names), CONNTRACK insert.
    pub const REF_NEW_FLOW: &str = "ref_new_flow";
    /// The endpoint the reference programs key CONNTRACK and POLICY with (they look up no
    /// endpoint): the benchmark's measured endpoint.
    pub const REF_ENDPOINT: u32 = 7;
}

/// Capacities of the maps. The agent reports pressure against these.
pub mod capacity {
    /// Also the bound on endpoint ids (`1..ENDPOINTS`), which travel in 12 bits of `skb->mark`.
    pub const ENDPOINTS: u32 = 4096;
    /// ENDPOINT_SLOTS covers host veth ifindexes `0..ENDPOINT_SLOTS` (512 KiB); endpoints on
    /// higher ifindexes are found through ENDPOINTS' hash instead.
    pub const ENDPOINT_SLOTS: u32 = 65_536;
    /// /32 and /128 entries.
    pub const IPCACHE_EXACT: u32 = 262_144;
    /// Shorter prefixes.
    pub const IPCACHE_V4: u32 = 262_144;
    pub const IPCACHE_V6: u32 = 262_144;
    /// Chunks of port ranges (one to eight per (endpoint, peer identity, direction, protocol);
    /// see [`super::PolicyGroupKey`] for what that holds).
    pub const POLICY: u32 = 262_144;
    pub const SERVICES: u32 = 65_536;
    pub const CONNTRACK: u32 = 262_144;
    pub const FRAGMENTS: u32 = 8192;
    pub const EVENTS_BYTES: u32 = 1 << 20;
}

/// Traffic direction, seen from the endpoint (the pod).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

/// IP protocol numbers the dataplane enforces.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// A 128-bit address in the programs' keys: the 16 bytes of the IPv6 address (IPv4-mapped,
/// `::ffff:a.b.c.d`, for IPv4) in network order, held as four native-endian words so that the
/// programs copy and compare it word by word. [`addr_from_octets`] / [`addr_octets`] convert.
pub type Addr = [u32; 4];

/// The [`Addr`] of 16 network-order bytes.
pub const fn addr_from_octets(b: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The third word of an IPv4-mapped [`Addr`]: bytes `00 00 ff ff`.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Whether an [`Addr`] is IPv4-mapped (`::ffff:0:0/96`): how the programs store an IPv4
/// address, and so, in an IPv6 header, an address that must not be looked up as one
/// ([`Reason::DroppedV4Mapped`]).
#[inline(always)]
pub const fn addr_is_v4_mapped(a: &Addr) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD
}

/// The 16 network-order bytes of an [`Addr`].
pub const fn addr_octets(a: Addr) -> [u8; 16] {
    let (w0, w1, w2, w3) = (
        a[0].to_ne_bytes(),
        a[1].to_ne_bytes(),
        a[2].to_ne_bytes(),
        a[3].to_ne_bytes(),
    );
    [
        w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0],
        w3[1], w3[2], w3[3],
    ]
}

/// Reserved identities. Pod identities (one per distinct namespace-labels + pod-labels set) start
/// at [`identity::POD_MIN`]; CIDR identities (one per distinct set of ipBlocks an address range
/// falls in) start at [`identity::CIDR_MIN`].
pub mod identity {
    /// In a POLICY key: any peer. In an IPCACHE value's `cidr_identity`: no ipBlock contains the
    /// address.
    pub const ANY: u32 = 0;
    /// This node's own addresses (kubelet probes). Always allowed to reach local pods.
    pub const HOST: u32 = 1;
    /// Anything outside the cluster not covered by a more specific entry.
    pub const WORLD: u32 = 2;
    /// Other nodes' addresses.
    pub const REMOTE_NODE: u32 = 6;
    pub const POD_MIN: u32 = 256;
    pub const CIDR_MIN: u32 = 1 << 24;
}

/// `EndpointInfo::flags` bits.
pub mod endpoint_flags {
    /// Some policy selects the endpoint with `Ingress` in its policyTypes.
    pub const INGRESS_ISOLATED: u32 = 1 << 0;
    /// Some policy selects the endpoint with `Egress` in its policyTypes.
    pub const EGRESS_ISOLATED: u32 = 1 << 1;
    /// The agent could not program this endpoint's allow entries: drop everything new in both
    /// directions (fail closed) and count it as [`super::Reason::DroppedEndpointNotProgrammed`].
    pub const NOT_PROGRAMMED: u32 = 1 << 2;
}

/// ENDPOINTS: host-side veth ifindex (`u32`) → endpoint; ENDPOINTS_BY_ID: endpoint id (`u32`) →
/// the same value (used by the post-DNAT hooks, which know the source endpoint only by the id
/// carried in `skb->mark`).
///
/// A packet crossing an attached veth with no ENDPOINTS entry is dropped
/// ([`Reason::DroppedEndpointNotProgrammed`]): the agent writes the entry before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Endpoint id used in POLICY and CONNTRACK keys and carried in `skb->mark`; never 0, below
    /// [`capacity::ENDPOINTS`].
    pub id: u32,
    /// [`endpoint_flags`] bits.
    pub flags: u32,
    /// Changes whenever something that can revoke an allowed flow of this endpoint changes (its
    /// allow entries, its flags, peer identities). Conntrack entries made under another generation
    /// are re-checked against policy on their next packet (revocation, see
    /// `policy-ebpf/src/conntrack.rs`). The map writer in `policy-agent` owns this field: the
    /// value passed to `Dataplane::upsert_endpoint` is replaced.
    pub generation: u32,
    /// The endpoint's own pod identity.
    pub identity: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 16);

/// ENDPOINT_SLOTS value: the ENDPOINTS entry of one host veth ifindex, packed into one `u64` so
/// that it is read and written whole. ENDPOINT_SLOTS is an mmapable array indexed by ifindex
/// (`0..`[`capacity::ENDPOINT_SLOTS`]): the agent stores each slot with a single atomic 8-byte
/// store through its own mapping of the array, never with `bpf_map_update_elem` (whose copy
/// may tear), and the veth hooks read it with one 8-byte load, which the verifier turns into
/// an address computation with no helper call or hash. A packet therefore sees an endpoint's
/// id, flags and generation all from one write: never a new generation with old isolation
/// flags, which would record a flow that is never re-checked.
///
/// Layout: bits 0–31 generation, 32–47 id, 48–62 flags ([`endpoint_flags`]), bit 63 set in
/// every written slot. 0 is an empty slot; the programs then look the ifindex up in ENDPOINTS
/// (an ifindex past the array, or a slot not written yet by an agent that has just created the
/// array). The endpoint's own pod identity is not carried: the programs never read it.
///
/// The agent keeps every slot equal to its ifindex's ENDPOINTS entry: it stores the slot after
/// writing ENDPOINTS and clears it before removing the ENDPOINTS entry, and rewrites the whole
/// array from ENDPOINTS when it starts.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointSlot(pub u64);

impl EndpointSlot {
    pub const EMPTY: EndpointSlot = EndpointSlot(0);
    const WRITTEN: u64 = 1 << 63;
    const ID_SHIFT: u32 = 32;
    const FLAGS_SHIFT: u32 = 48;
    const FLAGS_MASK: u32 = (1 << 15) - 1;

    /// The slot of `info`; `None` when its id or flags do not fit the layout (ids are below
    /// [`capacity::ENDPOINTS`] and flags are three bits, so the agent never writes such a value).
    pub const fn pack(info: &EndpointInfo) -> Option<EndpointSlot> {
        if info.id > u16::MAX as u32 || info.flags > Self::FLAGS_MASK {
            return None;
        }
        Some(EndpointSlot(
            Self::WRITTEN
                | (info.flags as u64) << Self::FLAGS_SHIFT
                | (info.id as u64) << Self::ID_SHIFT
                | info.generation as u64,
        ))
    }

    /// The endpoint of a written slot (`identity` 0: not carried), `None` for an empty one.
    #[inline(always)]
    pub const fn unpack(self) -> Option<EndpointInfo> {
        if self.0 & Self::WRITTEN == 0 {
            return None;
        }
        Some(EndpointInfo {
            id: (self.0 >> Self::ID_SHIFT) as u32 & 0xffff,
            flags: (self.0 >> Self::FLAGS_SHIFT) as u32 & Self::FLAGS_MASK,
            generation: self.0 as u32,
            identity: 0,
        })
    }
}

/// IPCACHE value. The compiler's IPCACHE entries are split by the map writer: full-length
/// prefixes (/32, /128: pods, nodes) go to IPCACHE_EXACT, a hash keyed by [`Addr`], probed first;
/// shorter prefixes go to the LPM tries IPCACHE_V4 / IPCACHE_V6 (keyed by `[u8; 4]` / `[u8; 16]`
/// in network order). See `policy-ebpf/src/policy.rs`.
///
/// Both identities of an address are carried so that ipBlock rules match pod addresses too: a pod's
/// /32 entry holds the pod identity *and* the CIDR identity of the most specific ipBlock prefix that
/// contains it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityPair {
    /// Pod, host, remote-node or world identity.
    pub identity: u32,
    /// CIDR identity, or [`identity::ANY`] when no ipBlock prefix contains the address.
    pub cidr_identity: u32,
}
const _: () = assert!(core::mem::size_of::<IdentityPair>() == 8);

/// POLICY (hash) key: one group of allowed destination port ranges per (endpoint, peer identity,
/// direction, protocol), split in chunks of [`PORT_RANGES_PER_CHUNK`] (chunk 0 first). The
/// compiler emits each group's ranges merged (sorted, disjoint; `endPort` ranges as they are, so
/// ports 1-65535 are one range); the value is [`PortRanges`]. A lookup is one hash probe per
/// candidate identity, flat in the number of policies; precedence (see
/// `policy-ebpf/src/policy.rs`): exact peer identity, then the peer's CIDR identity, then
/// [`identity::ANY`]. Any hit allows (NetworkPolicy is a pure union).
///
/// Capacity: a group holds at most [`POLICY_MAX_RANGES`] (120) ranges after merging; an endpoint
/// holds any number of groups (one per peer identity, direction and protocol its rules name)
/// while the map has room, each taking ⌈ranges / 15⌉ of the [`capacity::POLICY`] (262,144)
/// entries shared by all endpoints of the node: for one endpoint alone, 262,144 peers × 15
/// ranges, or 32,768 peers × 120 ranges. An endpoint with a group over 120 ranges is not
/// programmed (fail closed, reported by the compiler naming the pod and the map); a full map fails
/// closed the endpoints being written.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyGroupKey {
    pub endpoint: u32,
    pub identity: u32,
    /// [`Direction`] as u8.
    pub direction: u8,
    pub protocol: u8,
    pub chunk: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PolicyGroupKey>() == 12);

/// An inclusive destination port range with the rule that allows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
    /// [`PolicyValue::rule`] of the entry.
    pub rule: u32,
}
const _: () = assert!(core::mem::size_of::<PortRange>() == 8);

/// Port ranges in one POLICY chunk.
pub const PORT_RANGES_PER_CHUNK: usize = 15;
/// Chunks per group.
pub const POLICY_MAX_CHUNKS: u8 = 8;
/// Port ranges per group (endpoint, peer identity, direction, protocol): 15 × 8 = 120.
pub const POLICY_MAX_RANGES: usize = PORT_RANGES_PER_CHUNK * POLICY_MAX_CHUNKS as usize;

/// POLICY (hash) value: the first `count` ranges are in use, the others (only in the last chunk)
/// hold port 65535 with rule 0, which reads as "no rule"; `more` = 1 when the next chunk exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRanges {
    pub count: u32,
    pub more: u32,
    pub ranges: [PortRange; PORT_RANGES_PER_CHUNK],
}
const _: () = assert!(core::mem::size_of::<PortRanges>() == 128);

/// POLICY entry value (compiler side).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Rule reference: the agent maps it back to (namespace, policy, direction, rule index) for
    /// flow logs and metrics.
    pub rule: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

/// SERVICES: Service frontend address (IPv4 as `::ffff:a.b.c.d`) → flags. A pod dialling one of
/// these is judged after DNAT, at the first hook that sees the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 16);

/// CONNTRACK key: one entry per (endpoint, 5-tuple), the tuple in a canonical order (the
/// lower (port, address) end first) so that one lookup finds a flow from either side. The value
/// records the direction the flow was first seen in and which end sent its first packet; see
/// `policy-ebpf/src/conntrack.rs`. Addresses IPv4-mapped for IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// The lower end.
    pub a: Addr,
    pub b: Addr,
    /// Ports in host order (0 for port-less protocols).
    pub a_port: u16,
    pub b_port: u16,
    pub endpoint: u32,
    pub protocol: u8,
    /// Scalar padding (a byte array would be zeroed with a `memset` call in the programs).
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 44);

/// `CtValue::flags` bits.
pub mod ct_flags {
    /// Made at the source veth for a packet to a Service frontend (pre-DNAT tuple), so that the
    /// un-DNATed reply finds it; the egress verdict itself is made post-DNAT.
    pub const SERVICE: u32 = 1 << 0;
    /// A TCP FIN or RST was seen: the entry uses the closing timeout.
    pub const CLOSING: u32 = 1 << 1;
    /// A reply was seen.
    pub const REPLIED: u32 = 1 << 2;
    /// The flow's first packet went from `a` to `b` (else from `b` to `a`).
    pub const A_TO_B: u32 = 1 << 3;
    /// The flow was first seen as the endpoint's egress (else ingress).
    pub const EGRESS: u32 = 1 << 4;
}

/// CONNTRACK value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// When the flow was last seen, in kernel ticks (`jiffies`; [`Config::kernel_hz`] per
    /// second).
    pub last_seen: u64,
    pub rule: u32,
    /// [`ct_flags`] bits.
    pub flags: u32,
    /// Endpoint generation the entry was allowed under.
    pub generation: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 24);

impl CtValue {
    /// The direction the flow was first seen in.
    pub const fn direction(&self) -> Direction {
        if self.flags & ct_flags::EGRESS != 0 {
            Direction::Egress
        } else {
            Direction::Ingress
        }
    }
}

impl CtKey {
    /// The flow's original (source, source port, destination, destination port).
    pub const fn original(&self, value: &CtValue) -> (Addr, u16, Addr, u16) {
        if value.flags & ct_flags::A_TO_B != 0 {
            (self.a, self.a_port, self.b, self.b_port)
        } else {
            (self.b, self.b_port, self.a, self.a_port)
        }
    }
}

/// FRAGMENTS key: non-first fragments follow the verdict of the first fragment of the same
/// datagram (which carries the ports) at the same hook: the endpoint and direction are part of
/// the key, so a first fragment allowed out of one pod does not open the way into another.
/// Addresses IPv4-mapped for IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    pub endpoint: u32,
    pub protocol: u8,
    /// [`Direction`] as u8.
    pub direction: u8,
    /// Scalar padding (see [`CtKey`]).
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 44);

/// FRAGMENTS value: the first fragment's verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// 1 = allowed.
    pub allowed: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 8);

/// CONFIG (array, index 0). Written by the agent when it opens the dataplane.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Bits of `skb->mark` that carry the source endpoint id of Service traffic between the
    /// source veth and the post-DNAT hook. Must not overlap kube-proxy's 0x4000 / 0x8000, must be
    /// contiguous and hold every endpoint id (12 bits). 0 disables the post-DNAT decision: Service
    /// traffic from egress-isolated endpoints is then dropped ([`Reason::DroppedInternal`]).
    pub mark_mask: u32,
    /// Shift of the endpoint id inside `mark_mask` (its lowest set bit).
    pub mark_shift: u32,
    /// Conntrack idle timeouts in seconds. 0 expires an entry at once (every packet is a new
    /// flow), which the per-packet benchmark uses to time the new-flow path.
    pub ct_tcp_timeout_s: u32,
    /// After a FIN or RST.
    pub ct_tcp_closing_timeout_s: u32,
    pub ct_udp_timeout_s: u32,
    pub ct_sctp_timeout_s: u32,
    /// 1 = send verdict events for allowed new flows too (drops are always sent).
    pub events_allowed: u32,
    /// Maximum events per CPU per second (rate limit); 0 = no events.
    pub events_per_sec: u32,
    /// Kernel ticks per second (`CONFIG_HZ`): the unit of conntrack's clock, `jiffies`, which
    /// the programs read without a helper call (the verifier inlines `bpf_jiffies64`). The
    /// loader writes the running kernel's value whatever the caller passes; 0 makes every
    /// timeout 0.
    pub kernel_hz: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 36);

pub const DEFAULT_MARK_MASK: u32 = 0x0fff_0000;
pub const DEFAULT_MARK_SHIFT: u32 = 16;

impl Config {
    /// Defaults: mark bits 0x0fff0000; TCP 6 h idle (10 s after FIN/RST), UDP 60 s, SCTP 6 h;
    /// drop events only, 1000 per CPU per second.
    pub const DEFAULT: Config = Config {
        mark_mask: DEFAULT_MARK_MASK,
        mark_shift: DEFAULT_MARK_SHIFT,
        ct_tcp_timeout_s: 6 * 3600,
        ct_tcp_closing_timeout_s: 10,
        ct_udp_timeout_s: 60,
        ct_sctp_timeout_s: 6 * 3600,
        events_allowed: 0,
        events_per_sec: 1000,
        kernel_hz: 0,
    };

    /// The defaults with another mark mask (`mark_shift` derived from it).
    pub const fn with_mark_mask(mark_mask: u32) -> Config {
        let mut config = Config::DEFAULT;
        config.mark_mask = mark_mask;
        config.mark_shift = if mark_mask == 0 {
            0
        } else {
            mark_mask.trailing_zeros()
        };
        config
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}

/// Why a packet passed or was dropped. COUNTERS (per-CPU array) is indexed by this value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// A policy rule allowed a new flow.
    AllowedByPolicy = 0,
    /// A later packet of an allowed flow, in the direction it was first seen (conntrack hit).
    AllowedEstablished = 1,
    /// The direction is not isolated.
    AllowedNotIsolated = 2,
    /// From (or to) this node's own addresses.
    AllowedHost = 3,
    /// A pod reaching itself.
    AllowedSelf = 4,
    /// Not policed: ARP and IP protocols no rule can name (ICMP, ICMPv6 and so ND, GRE, ESP, …)
    /// whatever the isolation; frames that are not IP in a direction the endpoint is not
    /// isolated in; unmarked traffic on an uplink.
    AllowedNotPoliced = 5,
    /// Sent on to the post-DNAT hook with the source endpoint in `skb->mark`.
    DeferredService = 6,
    /// Non-first fragment following an allowed first fragment.
    AllowedFragment = 7,
    /// A reply of an allowed flow (conntrack hit on the reversed tuple), whatever the reverse
    /// direction's policy says.
    AllowedReply = 8,

    /// No rule allows the new flow.
    DroppedPolicy = 16,
    /// Header shorter than it claims or than the packet.
    DroppedTruncated = 17,
    /// Header values that cannot be valid (IHL < 5, bad extension header chain, …).
    DroppedMalformed = 18,
    /// A non-first fragment with no recorded first-fragment verdict.
    DroppedFragment = 19,
    /// The endpoint is selected but its maps could not be programmed, or an attached veth (or the
    /// source endpoint carried in `skb->mark`) has no ENDPOINTS entry (fail closed).
    DroppedEndpointNotProgrammed = 20,
    /// An internal error (map update failure, …) on a path that must not fail open.
    DroppedInternal = 21,
    /// An established flow whose rule was revoked.
    DroppedRevoked = 22,
    /// Neither IPv4, IPv6 nor ARP (a VLAN tag, MPLS, PPPoE, any other ethertype) in a direction
    /// the endpoint is isolated in: no NetworkPolicy rule can allow it.
    DroppedNotIp = 23,
    /// An IPv6 packet whose source or destination is IPv4-mapped (`::ffff:0:0/96`), in a
    /// direction the endpoint is isolated in. Such an address names no IPv6 host (RFC 4291
    /// 2.5.5.2; Linux drops received IPv6 packets from one) and is how the programs store IPv4
    /// addresses, so it is never looked up: no IPv4 rule, identity or flow applies to an IPv6
    /// packet, and no IPv6 rule can name it.
    DroppedV4Mapped = 24,
}

impl Reason {
    pub const COUNT: u32 = 32;
    pub const ALL: [Reason; 18] = [
        Reason::AllowedByPolicy,
        Reason::AllowedEstablished,
        Reason::AllowedNotIsolated,
        Reason::AllowedHost,
        Reason::AllowedSelf,
        Reason::AllowedNotPoliced,
        Reason::DeferredService,
        Reason::AllowedFragment,
        Reason::AllowedReply,
        Reason::DroppedPolicy,
        Reason::DroppedTruncated,
        Reason::DroppedMalformed,
        Reason::DroppedFragment,
        Reason::DroppedEndpointNotProgrammed,
        Reason::DroppedInternal,
        Reason::DroppedRevoked,
        Reason::DroppedNotIp,
        Reason::DroppedV4Mapped,
    ];

    pub const fn is_drop(self) -> bool {
        self as u32 >= 16
    }

    /// Stable snake_case name, used as a metric label and in flow logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::AllowedByPolicy => "allowed_by_policy",
            Reason::AllowedEstablished => "allowed_established",
            Reason::AllowedNotIsolated => "allowed_not_isolated",
            Reason::AllowedHost => "allowed_host",
            Reason::AllowedSelf => "allowed_self",
            Reason::AllowedNotPoliced => "allowed_not_policed",
            Reason::DeferredService => "deferred_service",
            Reason::AllowedFragment => "allowed_fragment",
            Reason::AllowedReply => "allowed_reply",
            Reason::DroppedPolicy => "dropped_policy",
            Reason::DroppedTruncated => "dropped_truncated",
            Reason::DroppedMalformed => "dropped_malformed",
            Reason::DroppedFragment => "dropped_fragment",
            Reason::DroppedEndpointNotProgrammed => "dropped_endpoint_not_programmed",
            Reason::DroppedInternal => "dropped_internal",
            Reason::DroppedRevoked => "dropped_revoked",
            Reason::DroppedNotIp => "dropped_not_ip",
            Reason::DroppedV4Mapped => "dropped_v4_mapped",
        }
    }

    pub fn from_u32(v: u32) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| *r as u32 == v)
    }
}

#[cfg(test)]
mod addr_tests {
    use super::{addr_from_octets, addr_is_v4_mapped, addr_octets};
    use std::net::Ipv6Addr;

    #[test]
    fn v4_mapped_is_exactly_the_ffff_0_0_96_range() {
        for (text, mapped) in [
            ("::ffff:10.244.1.5", true),
            ("::ffff:0.0.0.0", true),
            ("::ffff:255.255.255.255", true),
            // IPv4-compatible (deprecated), NAT64 and other neighbours of the range are IPv6.
            ("::10.244.1.5", false),
            ("64:ff9b::10.244.1.5", false),
            ("::fffe:10.244.1.5", false),
            ("::1:ffff:10.244.1.5", false),
            ("ffff::a0f4:105", false),
            ("::", false),
            ("::1", false),
            ("fd00:10:244:1::5", false),
        ] {
            let ip: Ipv6Addr = text.parse().unwrap();
            let addr = addr_from_octets(ip.octets());
            assert_eq!(addr_is_v4_mapped(&addr), mapped, "{text}");
            assert_eq!(ip.to_ipv4_mapped().is_some(), mapped, "{text}");
            assert_eq!(addr_octets(addr), ip.octets());
        }
    }
}

#[cfg(test)]
mod endpoint_slot_tests {
    use super::{EndpointInfo, EndpointSlot, capacity, endpoint_flags};

    #[test]
    fn a_slot_carries_id_flags_and_generation_and_is_never_empty() {
        let all = endpoint_flags::INGRESS_ISOLATED
            | endpoint_flags::EGRESS_ISOLATED
            | endpoint_flags::NOT_PROGRAMMED;
        for (id, flags, generation) in [
            (1, 0, 0),
            (capacity::ENDPOINTS - 1, all, u32::MAX),
            (7, endpoint_flags::EGRESS_ISOLATED, 0x8000_0001),
            (u16::MAX as u32, 0x7fff, 1),
        ] {
            let info = EndpointInfo {
                id,
                flags,
                generation,
                identity: 4242,
            };
            let slot = EndpointSlot::pack(&info).unwrap();
            assert_ne!(slot, EndpointSlot::EMPTY, "{info:?}");
            let back = slot.unpack().unwrap();
            assert_eq!(
                (back.id, back.flags, back.generation),
                (id, flags, generation)
            );
            assert_eq!(back.identity, 0, "the identity is not carried");
        }
        assert_eq!(EndpointSlot::EMPTY.unpack(), None);
    }

    #[test]
    fn values_the_layout_cannot_hold_are_refused() {
        let info = |id, flags| EndpointInfo {
            id,
            flags,
            generation: 3,
            identity: 1,
        };
        assert_eq!(EndpointSlot::pack(&info(1 << 16, 0)), None);
        assert_eq!(EndpointSlot::pack(&info(1, 1 << 15)), None);
    }
}

#[cfg(test)]
mod reason_tests {
    use super::Reason;
    use std::collections::BTreeSet;

    #[test]
    fn every_reason_is_listed_once_with_its_own_name() {
        let values: BTreeSet<u32> = Reason::ALL.iter().map(|r| *r as u32).collect();
        let names: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(values.len(), Reason::ALL.len());
        assert_eq!(names.len(), Reason::ALL.len());
        for reason in Reason::ALL {
            assert!((reason as u32) < Reason::COUNT, "{reason:?} fits COUNTERS");
            assert_eq!(Reason::from_u32(reason as u32), Some(reason));
            let dropped = reason.as_str().starts_with("dropped_");
            assert_eq!(reason.is_drop(), dropped, "{reason:?}");
        }
    }

    #[test]
    fn non_ip_frames_have_a_drop_reason_of_their_own() {
        assert_eq!(Reason::DroppedNotIp as u32, 23);
        assert!(Reason::DroppedNotIp.is_drop());
        assert_eq!(Reason::DroppedNotIp.as_str(), "dropped_not_ip");
        assert!(!Reason::AllowedNotPoliced.is_drop());
    }

    #[test]
    fn v4_mapped_ipv6_packets_have_a_drop_reason_of_their_own() {
        assert_eq!(Reason::DroppedV4Mapped as u32, 24);
        assert!(Reason::DroppedV4Mapped.is_drop());
        assert_eq!(Reason::DroppedV4Mapped.as_str(), "dropped_v4_mapped");
        assert_eq!(Reason::from_u32(24), Some(Reason::DroppedV4Mapped));
    }
}

/// EVENTS (ring buffer) record: one verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    pub ts_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    pub endpoint: u32,
    /// [`Reason`] as u32.
    pub reason: u32,
    /// Rule reference of the deciding POLICY entry (0 when none).
    pub rule: u32,
    pub peer_identity: u32,
    pub protocol: u8,
    pub direction: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<VerdictEvent>() == 72);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, have no implicit padding (checked by the size
    // assertions above) and are valid for any bit pattern.
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for EndpointSlot {}
    unsafe impl aya::Pod for IdentityPair {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PolicyGroupKey {}
    unsafe impl aya::Pod for PortRanges {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for VerdictEvent {}
}

/// A digest of a set of API objects, order-independent: the wrapping sum of one FNV-1a 64 term
/// per object over `kind/namespace/name@resourceVersion` (namespace empty for cluster-scoped
/// kinds). The agent reports the digest of the objects behind its enforced state in `/status`;
/// a client that knows which objects the API server holds computes the same sum and so knows
/// when exactly that state is enforced, even for objects it did not write.
pub mod digest {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    const fn feed(mut h: u64, bytes: &[u8]) -> u64 {
        let mut i = 0;
        while i < bytes.len() {
            h ^= bytes[i] as u64;
            h = h.wrapping_mul(PRIME);
            i += 1;
        }
        h
    }

    /// The term of one object.
    pub const fn object_term(
        kind: &str,
        namespace: &str,
        name: &str,
        resource_version: &str,
    ) -> u64 {
        let mut h = feed(OFFSET, kind.as_bytes());
        h = feed(h, b"/");
        h = feed(h, namespace.as_bytes());
        h = feed(h, b"/");
        h = feed(h, name.as_bytes());
        h = feed(h, b"@");
        feed(h, resource_version.as_bytes())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn terms_differ_by_every_part() {
            let base = object_term("Pod", "x", "a", "7");
            assert_ne!(base, object_term("Pod", "x", "a", "8"));
            assert_ne!(base, object_term("Pod", "y", "a", "7"));
            assert_ne!(base, object_term("Pod", "x", "b", "7"));
            assert_ne!(base, object_term("Service", "x", "a", "7"));
            // The separators keep parts from sliding into each other.
            assert_ne!(
                object_term("Pod", "xa", "", "7"),
                object_term("Pod", "x", "a", "7")
            );
        }
    }
}
