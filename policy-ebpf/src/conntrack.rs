//! Connection tracking: the memory that lets replies of allowed flows through whatever the
//! reverse direction's policy says, and lets later packets skip the policy lookup.
//!
//! CONNTRACK is an LRU hash keyed by [`CtKey`] = {endpoint, protocol, the two ends of the
//! flow in canonical order (lower (port, address) first)}. The value says in which direction the
//! flow was first seen at that endpoint (`EGRESS`) and which end sent its first packet (`A_TO_B`),
//! so ONE lookup classifies a packet:
//! - same direction, same orientation as the first packet: a later packet of the flow;
//! - opposite direction, opposite orientation: a reply (a flow first seen as E's egress is
//!   answered at E's `to_pod`, a flow first seen as E's ingress at E's `from_pod`);
//! - anything else (the same tuple in a contradictory role) is not this flow: it is judged as new
//!   and, if allowed, replaces the entry.
//!
//! That is one hash lookup per packet instead of a forward and a reversed probe, and none for a
//! TCP SYN without ACK: it opens a flow by definition, so it is judged as new without looking
//! (the lookup would miss but for a retransmitted SYN, which is judged again, or a SYN whose
//! tuple an older flow used in the reverse role, which must not pass as that flow's reply).
//!
//! Entries are made for every new flow that is allowed, even in directions that are not
//! isolated, because the reverse direction may be. Idle timeouts come from CONFIG per protocol
//! (TCP switches to the closing timeout once a FIN or RST is seen); an expired entry is a miss and
//! is overwritten by the next allowed packet. `last_seen` (kernel ticks, see `decide::now`) is
//! refreshed on every hit.
//!
//! Revocation (`decide::established`): every entry records the endpoint generation it was
//! allowed under. When the endpoint's generation has moved on (its allow entries, flags or peer
//! identities changed), the next packet of the flow re-runs the new-flow decision for the flow's
//! original direction; still allowed → the entry takes the new generation, otherwise the entry
//! is deleted and the packet dropped as [`policy_common::Reason::DroppedRevoked`]. So a revoked
//! rule cuts established connections on their next packet (as Cilium does), at the cost of one
//! policy lookup per flow per change.

use policy_common::{Config, CtKey, CtValue, Direction, Reason, ct_flags, proto};

use crate::maps::CONNTRACK;
use crate::parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// A live entry found for a packet.
pub struct CtHit {
    pub value: *mut CtValue,
    pub key: CtKey,
    /// The packet is a reply (it matched the reversed tuple).
    pub reply: bool,
}

#[inline(always)]
pub const fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

/// The canonical key of `pkt`'s flow at `endpoint`, and whether `pkt` goes from `a` to `b`.
#[inline(always)]
pub(crate) fn key(endpoint: u32, pkt: &Packet) -> (CtKey, bool) {
    let forward = if pkt.sport != pkt.dport {
        pkt.sport < pkt.dport
    } else {
        pkt.src <= pkt.dst
    };
    let (a, a_port, b, b_port) = if forward {
        (pkt.src, pkt.sport, pkt.dst, pkt.dport)
    } else {
        (pkt.dst, pkt.dport, pkt.src, pkt.sport)
    };
    let key = CtKey {
        a,
        b,
        a_port,
        b_port,
        endpoint,
        protocol: pkt.protocol,
        _pad: 0,
        _pad2: 0,
    };
    (key, forward)
}

#[inline(always)]
fn role_flags(direction: Direction, a_to_b: bool) -> u32 {
    let mut flags = 0;
    if a_to_b {
        flags |= ct_flags::A_TO_B;
    }
    if matches!(direction, Direction::Egress) {
        flags |= ct_flags::EGRESS;
    }
    flags
}

#[inline(always)]
fn timeout_ticks(config: &Config, protocol: u8, flags: u32) -> u64 {
    let seconds = match protocol {
        proto::TCP if flags & ct_flags::CLOSING != 0 => config.ct_tcp_closing_timeout_s,
        proto::TCP => config.ct_tcp_timeout_s,
        proto::UDP => config.ct_udp_timeout_s,
        _ => config.ct_sctp_timeout_s,
    };
    seconds as u64 * config.kernel_hz as u64
}

#[inline(always)]
fn live(key: &CtKey, now: u64, config: &Config) -> Option<*mut CtValue> {
    let value = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a pointer into the map returned by the lookup helper; plain data.
    let v = unsafe { *value };
    // Another CPU may have stamped the entry after we read the clock: idle 0.
    let idle = now.saturating_sub(v.last_seen);
    if idle < timeout_ticks(config, key.protocol, v.flags) {
        Some(value)
    } else {
        None
    }
}

/// The flow `pkt` belongs to at `endpoint`, seen in `direction`: a later packet of a flow
/// first seen in this direction, or a reply of one first seen in the opposite direction.
#[inline(always)]
pub fn lookup(
    endpoint: u32,
    direction: Direction,
    pkt: &Packet,
    config: &Config,
    now: u64,
) -> Option<CtHit> {
    if pkt.protocol == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return None;
    }
    let (key, a_to_b) = key(endpoint, pkt);
    let value = live(&key, now, config)?;
    // SAFETY: map value pointer from the lookup; plain data.
    let role = unsafe { (*value).flags } & (ct_flags::A_TO_B | ct_flags::EGRESS);
    let reply = if role == role_flags(direction, a_to_b) {
        false
    } else if role == role_flags(opposite(direction), !a_to_b) {
        true
    } else {
        return None;
    };
    Some(CtHit { value, key, reply })
}

/// Only later packets in `direction` (post-DNAT hooks only ever see the forward packets of a
/// flow).
#[inline(always)]
pub fn lookup_forward(
    endpoint: u32,
    direction: Direction,
    pkt: &Packet,
    config: &Config,
    now: u64,
) -> Option<CtHit> {
    lookup(endpoint, direction, pkt, config, now).filter(|hit| !hit.reply)
}

#[inline(always)]
fn closing(pkt: &Packet) -> u32 {
    if pkt.protocol == proto::TCP && pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        ct_flags::CLOSING
    } else {
        0
    }
}

/// Refreshes a hit: last seen, closing state, replied.
#[inline(always)]
pub fn touch(hit: &CtHit, pkt: &Packet, now: u64) {
    let mut flags = closing(pkt);
    if hit.reply {
        flags |= ct_flags::REPLIED;
    }
    // SAFETY: map value pointer from the lookup; racing writers only store the same kind of
    // values (timestamps, flag bits), a lost update costs nothing. Each field is stored only
    // when it changes: packets within one tick (a few ms) leave the entry's cache line clean,
    // which spares the other CPUs that carry the same flow (its two directions) a line bounce.
    unsafe {
        if (*hit.value).last_seen != now {
            (*hit.value).last_seen = now;
        }
        if (*hit.value).flags & flags != flags {
            (*hit.value).flags |= flags;
        }
    }
}

/// Records a new allowed flow. Failing to record it fails the packet (its replies could not
/// pass an isolated reverse direction).
#[inline(always)]
pub fn create(
    endpoint: u32,
    direction: Direction,
    pkt: &Packet,
    flags: u32,
    rule: u32,
    generation: u32,
    now: u64,
) -> Result<(), Reason> {
    let (key, a_to_b) = key(endpoint, pkt);
    let value = CtValue {
        last_seen: now,
        rule,
        flags: flags | closing(pkt) | role_flags(direction, a_to_b),
        generation,
        _pad: 0,
    };
    CONNTRACK
        .insert(&key, &value, 0)
        .map_err(|_| Reason::DroppedInternal)
}

#[inline(always)]
pub fn remove(key: &CtKey) {
    // Already gone (LRU eviction, another CPU) is fine.
    let _ = CONNTRACK.remove(key);
}
