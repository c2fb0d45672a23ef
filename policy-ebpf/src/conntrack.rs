//! Connection tracking: the memory that lets replies of allowed flows through whatever the
//! reverse direction's policy says, and lets later packets skip the policy lookup.
//!
//! CONNTRACK is an LRU hash keyed by [`CtKey`] = {endpoint, direction, 5-tuple as first seen at
//! that endpoint in that direction}:
//! - a flow first seen as pod egress of endpoint E (at `from_pod`, or at the post-DNAT hook for
//!   Service traffic) is `{E, Egress, tuple}`; its replies arrive at E's `to_pod` and are found by
//!   reversing the packet's tuple and looking up `{E, Egress, reversed}`;
//! - a flow first seen as pod ingress of E (at `to_pod`) is `{E, Ingress, tuple}`; its replies
//!   leave through E's `from_pod` and match `{E, Ingress, reversed}`.
//!
//! Entries are made for every new flow that is allowed, even in directions that are not
//! isolated, because the reverse direction may be. Idle timeouts come from CONFIG per protocol
//! (TCP switches to the closing timeout once a FIN or RST is seen); an expired entry is a miss and
//! is overwritten by the next allowed packet. `last_seen_ns` is refreshed on every hit.
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
use crate::parse::{Packet, TCP_FIN, TCP_RST};

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

#[inline(always)]
fn key(endpoint: u32, direction: Direction, pkt: &Packet) -> CtKey {
    CtKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport.to_be(),
        dport: pkt.dport.to_be(),
        endpoint,
        protocol: pkt.protocol,
        direction: direction as u8,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn reversed(endpoint: u32, direction: Direction, pkt: &Packet) -> CtKey {
    CtKey {
        src: pkt.dst,
        dst: pkt.src,
        sport: pkt.dport.to_be(),
        dport: pkt.sport.to_be(),
        endpoint,
        protocol: pkt.protocol,
        direction: direction as u8,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn timeout_ns(config: &Config, protocol: u8, flags: u32) -> u64 {
    let seconds = match protocol {
        proto::TCP if flags & ct_flags::CLOSING != 0 => config.ct_tcp_closing_timeout_s,
        proto::TCP => config.ct_tcp_timeout_s,
        proto::UDP => config.ct_udp_timeout_s,
        _ => config.ct_sctp_timeout_s,
    };
    seconds as u64 * 1_000_000_000
}

#[inline(always)]
fn live(key: &CtKey, now: u64, config: &Config) -> Option<*mut CtValue> {
    let value = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a pointer into the map returned by the lookup helper; plain data.
    let v = unsafe { *value };
    // Another CPU may have stamped the entry after we read the clock.
    let idle = now.saturating_sub(v.last_seen_ns);
    if v.last_seen_ns >= now || idle < timeout_ns(config, key.protocol, v.flags) {
        Some(value)
    } else {
        None
    }
}

/// The flow `pkt` belongs to at `endpoint`, seen in `direction`: first as a later packet of a
/// flow first seen in this direction, then as a reply of a flow first seen in the opposite one.
#[inline(always)]
pub fn lookup(
    endpoint: u32,
    direction: Direction,
    pkt: &Packet,
    config: &Config,
    now: u64,
) -> Option<CtHit> {
    if let Some(hit) = lookup_forward(endpoint, direction, pkt, config, now) {
        return Some(hit);
    }
    let key = reversed(endpoint, opposite(direction), pkt);
    let value = live(&key, now, config)?;
    Some(CtHit {
        value,
        key,
        reply: true,
    })
}

/// Only the forward lookup (post-DNAT hooks only ever see the forward packets of a flow).
#[inline(always)]
pub fn lookup_forward(
    endpoint: u32,
    direction: Direction,
    pkt: &Packet,
    config: &Config,
    now: u64,
) -> Option<CtHit> {
    let key = key(endpoint, direction, pkt);
    let value = live(&key, now, config)?;
    Some(CtHit {
        value,
        key,
        reply: false,
    })
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
    // values (timestamps, flag bits), a lost update costs nothing.
    unsafe {
        (*hit.value).last_seen_ns = now;
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
    let value = CtValue {
        last_seen_ns: now,
        rule,
        flags: flags | closing(pkt),
        generation,
        _pad: 0,
    };
    CONNTRACK
        .insert(&key(endpoint, direction, pkt), &value, 0)
        .map_err(|_| Reason::DroppedInternal)
}

#[inline(always)]
pub fn remove(key: &CtKey) {
    // Already gone (LRU eviction, another CPU) is fine.
    let _ = CONNTRACK.remove(key);
}
