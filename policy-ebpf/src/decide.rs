//! The decision for one packet at each hook. Every path ends in a [`Verdict`]; the caller
//! (`main.rs`) counts it, reports it and turns it into a tc action. Nothing here returns "pass"
//! on an internal error: missing endpoints, failed map writes and unusable settings all drop.
//!
//! Hooks and what they decide:
//! - `from_pod` (tc ingress of the pod's host veth = the pod's egress): the pod's egress,
//!   except for Service traffic of egress-isolated pods, which is deferred to the first hook
//!   after kube-proxy's DNAT (see [`defer`]).
//! - `to_pod` (tc egress of the host veth = the pod's ingress): first the deferred egress
//!   decision of the source endpoint carried in `skb->mark` (local Service backend), then the
//!   pod's own ingress.
//! - `to_network` (tc egress of uplink / tunnel devices): the deferred egress decision of
//!   Service traffic whose backend lives on another node. Everything unmarked passes untouched
//!   and uncounted.
//!
//! Semantics:
//! - A direction that is not isolated passes without a policy lookup, but still records the
//!   flow, because replies may have to cross an isolated reverse direction.
//! - Replies of allowed flows pass whatever the reverse direction says (`conntrack.rs`).
//! - The node's own addresses (identity HOST) reach local pods, and a pod reaches its own
//!   node: kubelet probes and node-local services must work under any policy; the reply of a probe
//!   is covered by conntrack anyway. hostNetwork pods use the node's addresses and are node
//!   traffic here, not peers.
//! - A pod reaches itself: source and destination address equal, or a Service hairpin where the
//!   source endpoint carried in the mark is the destination endpoint.
//! - An endpoint flagged NOT_PROGRAMMED drops every new flow in both directions (fail closed).
//! - Frames that are neither IP nor ARP (VLAN-tagged, MPLS, PPPoE, …) drop in a direction the
//!   endpoint is isolated in ([`Reason::DroppedNotIp`]: no rule can allow them) and pass
//!   unpoliced in one it is not. ICMP, ICMPv6 and ARP pass whatever the isolation.
//! - IPv6 packets with an IPv4-mapped source or destination (`::ffff:a.b.c.d`, the form IPv4
//!   addresses take in the maps), whatever their protocol (ICMPv6 too), are judged the same way,
//!   with [`Reason::DroppedV4Mapped`]: never looked up, they cannot take the identity, ipBlocks
//!   or conntrack entries of the IPv4 address they spell, and where they pass they are not
//!   recorded in conntrack (an entry would be the IPv4 flow's).

use aya_ebpf::{helpers::bpf_jiffies64, programs::TcContext};
use policy_common::{
    Addr, Config, Direction, EndpointInfo, IdentityPair, Reason, ct_flags, endpoint_flags, identity,
};

use crate::conntrack::{self, CtHit};
use crate::fragments;
use crate::maps;
use crate::parse::{self, FRAG_LATER, Packet, Parsed};
use crate::policy;

/// The outcome of one decision.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub reason: Reason,
    /// Rule reference of the deciding POLICY entry (0 when none).
    pub rule: u32,
    /// The endpoint the decision was made for (0 when none was found).
    pub endpoint: u32,
    pub peer_identity: u32,
    pub direction: Direction,
    /// A new flow was allowed (reported as an event when CONFIG.events_allowed is set).
    pub new_flow: bool,
}

impl Verdict {
    #[inline(always)]
    pub const fn new(reason: Reason, endpoint: u32, direction: Direction) -> Self {
        Verdict {
            reason,
            rule: 0,
            endpoint,
            peer_identity: 0,
            direction,
            new_flow: false,
        }
    }

    #[inline(always)]
    const fn with(self, reason: Reason) -> Self {
        Verdict { reason, ..self }
    }
}

#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the kernel hands tc programs a valid __sk_buff.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: as in `ifindex`.
    unsafe { (*ctx.skb.skb).mark }
}

/// Conntrack time, in kernel ticks (`jiffies`, CONFIG.kernel_hz per second). Tick resolution
/// (a few ms) is ample for idle timeouts in seconds, and the verifier inlines `bpf_jiffies64` to
/// one load on 64-bit kernels: no helper call on the established path (`bpf_ktime_get_coarse_ns`
/// is one).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_jiffies64() }
}

#[inline(always)]
const fn isolated(ep: &EndpointInfo, direction: Direction) -> bool {
    let bit = match direction {
        Direction::Ingress => endpoint_flags::INGRESS_ISOLATED,
        Direction::Egress => endpoint_flags::EGRESS_ISOLATED,
    };
    ep.flags & bit != 0
}

/// The endpoint of the hook's veth (a veth without one fails closed).
#[inline(always)]
fn hook_endpoint(ctx: &TcContext, direction: Direction) -> Result<EndpointInfo, Verdict> {
    maps::endpoint(ifindex(ctx)).ok_or(Verdict::new(
        Reason::DroppedEndpointNotProgrammed,
        0,
        direction,
    ))
}

/// Parses the packet and finds the endpoint of the hook's veth. `Err` carries the final verdict.
/// What no rule can allow (a frame that is not IP nor ARP, an IPv6 packet with an IPv4-mapped
/// address) is judged here by isolation alone: dropped in a direction the endpoint is isolated
/// in, not policed otherwise (see `parse.rs`). `source` is the endpoint whose deferred egress
/// decision the packet carries (0: none); only egress-isolated endpoints defer, so such a packet
/// drops whatever the hook endpoint's isolation.
#[inline(always)]
fn parse_at_endpoint(
    ctx: &TcContext,
    pkt: &mut Packet,
    direction: Direction,
    source: u32,
) -> Result<EndpointInfo, Verdict> {
    let parsed = if parse::vlan_tagged(ctx) {
        Ok(Parsed::NotIp)
    } else {
        parse::parse(ctx, pkt)
    };
    let dropped = match parsed {
        Err(reason) => return Err(Verdict::new(reason, 0, direction)),
        Ok(Parsed::NotPoliced) => {
            return Err(Verdict::new(Reason::AllowedNotPoliced, 0, direction));
        }
        Ok(Parsed::NotIp) => Reason::DroppedNotIp,
        Ok(Parsed::V4Mapped) => Reason::DroppedV4Mapped,
        Ok(Parsed::Policed) => return hook_endpoint(ctx, direction),
    };
    if source != 0 {
        return Err(Verdict::new(dropped, source, Direction::Egress));
    }
    let ep = hook_endpoint(ctx, direction)?;
    let reason = if isolated(&ep, direction) {
        dropped
    } else {
        Reason::AllowedNotPoliced
    };
    Err(Verdict::new(reason, ep.id, direction))
}

/// The decision for a new flow of `ep` in `direction` with the remote address `peer`. Also
/// used to re-check established flows after a change (revocation).
#[inline(always)]
fn judge_new(
    ep: &EndpointInfo,
    direction: Direction,
    peer: &Addr,
    protocol: u8,
    dport: u16,
) -> Verdict {
    judge_new_with(ep, direction, peer, None, protocol, dport)
}

/// [`judge_new`] for a caller that already looked `peer` up in IPCACHE_EXACT (`exact` =
/// `Some(result)`), so that it is not looked up twice.
#[inline(always)]
fn judge_new_with(
    ep: &EndpointInfo,
    direction: Direction,
    peer: &Addr,
    exact: Option<Option<IdentityPair>>,
    protocol: u8,
    dport: u16,
) -> Verdict {
    let mut v = Verdict::new(Reason::DroppedPolicy, ep.id, direction);
    v.new_flow = true;
    if ep.flags & endpoint_flags::NOT_PROGRAMMED != 0 {
        return v.with(Reason::DroppedEndpointNotProgrammed);
    }
    if !isolated(ep, direction) {
        return v.with(Reason::AllowedNotIsolated);
    }
    let peer_ids = match exact {
        Some(Some(pair)) => pair,
        Some(None) => policy::prefix_identities(peer),
        None => policy::identities(peer),
    };
    v.peer_identity = peer_ids.identity;
    if peer_ids.identity == identity::HOST {
        return v.with(Reason::AllowedHost);
    }
    if let Some(rule) = policy::allows(ep.id, direction, peer_ids, protocol, dport) {
        v.rule = rule;
        return v.with(Reason::AllowedByPolicy);
    }
    v
}

/// Records an allowed new flow in conntrack (a failed record drops the packet).
#[inline(always)]
fn admit(
    endpoint: u32,
    direction: Direction,
    pkt: &Packet,
    v: Verdict,
    generation: u32,
    now: u64,
) -> Verdict {
    if v.reason.is_drop() {
        return v;
    }
    match conntrack::create(endpoint, direction, pkt, 0, v.rule, generation, now) {
        Ok(()) => v,
        Err(reason) => v.with(reason),
    }
}

/// A conntrack hit: established (or a reply), unless the endpoint's generation moved on and the
/// flow's original direction no longer allows it (revocation, see `conntrack.rs`).
#[inline(always)]
fn established(ep: &EndpointInfo, hit: &CtHit, reason: Reason, hook: Direction) -> Verdict {
    // SAFETY: map value pointer from the lookup.
    let value = unsafe { &mut *hit.value };
    let mut v = Verdict::new(reason, ep.id, hook);
    v.rule = value.rule;
    if value.flags & ct_flags::SERVICE != 0 || value.generation == ep.generation {
        return v;
    }
    let direction = value.direction();
    let (src, _, dst, dport) = hit.key.original(value);
    let recheck = if src == dst {
        Verdict::new(Reason::AllowedSelf, ep.id, direction)
    } else {
        let peer = match direction {
            Direction::Egress => &dst,
            Direction::Ingress => &src,
        };
        judge_new(ep, direction, peer, hit.key.protocol, dport)
    };
    if recheck.reason.is_drop() {
        conntrack::remove(&hit.key);
        v.peer_identity = recheck.peer_identity;
        return v.with(Reason::DroppedRevoked);
    }
    value.generation = ep.generation;
    value.rule = recheck.rule;
    v.rule = recheck.rule;
    v
}

/// Service traffic of an egress-isolated pod: the destination is a ClusterIP that kube-proxy
/// will DNAT after this hook, so the egress verdict must wait for the backend. The source
/// endpoint id goes into `skb->mark` (CONFIG.mark_mask / mark_shift, chosen not to clash with
/// kube-proxy's 0x4000 / 0x8000) and the first post-DNAT hook the packet crosses decides:
/// `to_pod` of a local backend or `to_network` on the uplink for a remote one. Both clear the
/// bits again. An id that does not fit the mask drops (no silent pass).
#[inline(always)]
fn defer(ctx: &TcContext, ep: &EndpointInfo, config: &Config) -> Verdict {
    let v = Verdict::new(Reason::DeferredService, ep.id, Direction::Egress);
    let shift = config.mark_shift & 31;
    let bits = ep.id << shift;
    if config.mark_mask == 0 || bits >> shift != ep.id || bits & !config.mark_mask != 0 {
        return v.with(Reason::DroppedInternal);
    }
    ctx.set_mark((mark(ctx) & !config.mark_mask) | bits);
    v
}

/// The source endpoint id carried in `skb->mark` (0 = none); clears the bits.
#[inline(always)]
fn take_mark(ctx: &TcContext, config: &Config) -> u32 {
    if config.mark_mask == 0 {
        return 0;
    }
    let mark = mark(ctx);
    let id = (mark & config.mark_mask) >> (config.mark_shift & 31);
    if id != 0 {
        ctx.set_mark(mark & !config.mark_mask);
    }
    id
}

/// `from_pod`: the pod's egress.
#[inline(always)]
pub fn from_pod(ctx: &TcContext, pkt: &mut Packet) -> Verdict {
    let direction = Direction::Egress;
    let ep = match parse_at_endpoint(ctx, pkt, direction, 0) {
        Ok(ep) => ep,
        Err(v) => return v,
    };
    if pkt.frag == FRAG_LATER {
        return fragments::follow(ep.id, direction, pkt);
    }
    let config = maps::config();
    let v = pod_egress(ctx, pkt, &ep, &config, now());
    fragments::record_first(ep.id, direction, pkt, v)
}

#[inline(always)]
fn pod_egress(
    ctx: &TcContext,
    pkt: &Packet,
    ep: &EndpointInfo,
    config: &Config,
    now: u64,
) -> Verdict {
    let direction = Direction::Egress;
    if pkt.src == pkt.dst {
        return Verdict::new(Reason::AllowedSelf, ep.id, direction);
    }
    let egress_isolated = isolated(ep, direction);
    if let Some(hit) = conntrack::lookup(ep.id, direction, pkt, config, now) {
        conntrack::touch(&hit, pkt, now);
        if hit.reply {
            return established(ep, &hit, Reason::AllowedReply, direction);
        }
        // SAFETY: map value pointer from the lookup.
        let value = unsafe { &mut *hit.value };
        // A flow to a Service recorded while egress was not isolated becomes a deferred one
        // when the endpoint changes (its pre-DNAT tuple says nothing about the backend).
        let service = value.flags & ct_flags::SERVICE != 0
            || (value.generation != ep.generation && maps::is_service(&pkt.dst));
        if !service {
            return established(ep, &hit, Reason::AllowedEstablished, direction);
        }
        value.flags |= ct_flags::SERVICE;
        value.generation = ep.generation;
        if egress_isolated {
            return defer(ctx, ep, config);
        }
        return Verdict::new(Reason::AllowedEstablished, ep.id, direction);
    }
    if ep.flags & endpoint_flags::NOT_PROGRAMMED != 0 {
        return Verdict::new(Reason::DroppedEndpointNotProgrammed, ep.id, direction);
    }
    if !egress_isolated {
        let v = judge_new(ep, direction, &pkt.dst, pkt.protocol, pkt.dport);
        return admit(ep.id, direction, pkt, v, ep.generation, now);
    }
    // The destination's exact IPCACHE entry first: a pod or node address is no Service
    // frontend, which spares the SERVICES lookup for most pod-to-pod flows.
    let exact = policy::exact_identities(&pkt.dst);
    if policy::may_be_service(&exact) && maps::is_service(&pkt.dst) {
        // Recorded so that the un-DNATed reply finds it at this pod's `to_pod`.
        if let Err(reason) = conntrack::create(
            ep.id,
            direction,
            pkt,
            ct_flags::SERVICE,
            0,
            ep.generation,
            now,
        ) {
            return Verdict::new(reason, ep.id, direction);
        }
        return defer(ctx, ep, config);
    }
    let v = judge_new_with(
        ep,
        direction,
        &pkt.dst,
        Some(exact),
        pkt.protocol,
        pkt.dport,
    );
    admit(ep.id, direction, pkt, v, ep.generation, now)
}

/// `to_pod`: the deferred egress decision of a marked packet's source endpoint (local Service
/// backend), then the pod's ingress. `egress` receives the first when it passed, so that both
/// are counted and reported.
#[inline(always)]
pub fn to_pod(ctx: &TcContext, pkt: &mut Packet, egress: &mut Option<Verdict>) -> Verdict {
    let direction = Direction::Ingress;
    let config = maps::config();
    let source = take_mark(ctx, &config);
    let ep = match parse_at_endpoint(ctx, pkt, direction, source) {
        Ok(ep) => ep,
        Err(v) => return v,
    };
    if pkt.frag == FRAG_LATER {
        return fragments::follow(ep.id, direction, pkt);
    }
    let now = now();
    if source != 0 {
        let e = post_dnat_egress(source, pkt, ep.id, &config, now);
        if e.reason.is_drop() {
            return e;
        }
        *egress = Some(e);
    }
    let v = pod_ingress(pkt, &ep, &config, now);
    fragments::record_first(ep.id, direction, pkt, v)
}

#[inline(always)]
fn pod_ingress(pkt: &Packet, ep: &EndpointInfo, config: &Config, now: u64) -> Verdict {
    let direction = Direction::Ingress;
    if pkt.src == pkt.dst {
        return Verdict::new(Reason::AllowedSelf, ep.id, direction);
    }
    if let Some(hit) = conntrack::lookup(ep.id, direction, pkt, config, now) {
        conntrack::touch(&hit, pkt, now);
        let reason = if hit.reply {
            Reason::AllowedReply
        } else {
            Reason::AllowedEstablished
        };
        return established(ep, &hit, reason, direction);
    }
    let v = judge_new(ep, direction, &pkt.src, pkt.protocol, pkt.dport);
    admit(ep.id, direction, pkt, v, ep.generation, now)
}

/// The deferred egress decision of endpoint `source` for a packet after DNAT: the destination
/// is now the backend address and port. `hook_endpoint` is the endpoint of the `to_pod` hook
/// (0 on the uplink): equal to `source` is a pod reaching itself through its own Service.
#[inline(always)]
fn post_dnat_egress(
    source: u32,
    pkt: &Packet,
    hook_endpoint: u32,
    config: &Config,
    now: u64,
) -> Verdict {
    let direction = Direction::Egress;
    let Some(sep) = maps::endpoint_by_id(source) else {
        return Verdict::new(Reason::DroppedEndpointNotProgrammed, source, direction);
    };
    if source == hook_endpoint || pkt.src == pkt.dst {
        return Verdict::new(Reason::AllowedSelf, source, direction);
    }
    if let Some(hit) = conntrack::lookup_forward(source, direction, pkt, config, now) {
        conntrack::touch(&hit, pkt, now);
        return established(&sep, &hit, Reason::AllowedEstablished, direction);
    }
    let v = judge_new(&sep, direction, &pkt.dst, pkt.protocol, pkt.dport);
    admit(source, direction, pkt, v, sep.generation, now)
}

/// `to_network`: deferred egress decisions for Service traffic leaving the node. `None` for a
/// packet that carries none (no endpoint id in the mark): not ours to judge, and not counted,
/// since the uplink carries all of the node's traffic and not only its pods'. A packet with no
/// mark bit set at all, nearly everything leaving a node, is told apart before CONFIG is read.
#[inline(always)]
pub fn to_network(ctx: &TcContext, pkt: &mut Packet) -> Option<Verdict> {
    if mark(ctx) == 0 {
        return None;
    }
    let config = maps::config();
    let source = take_mark(ctx, &config);
    if source == 0 {
        return None;
    }
    Some(judge_deferred(ctx, pkt, source, &config))
}

/// The deferred egress decision `to_network` makes for endpoint `source`.
#[inline(always)]
fn judge_deferred(ctx: &TcContext, pkt: &mut Packet, source: u32, config: &Config) -> Verdict {
    let direction = Direction::Egress;
    match parse::parse(ctx, pkt) {
        Err(reason) => return Verdict::new(reason, source, direction),
        Ok(Parsed::NotPoliced) => {
            return Verdict::new(Reason::AllowedNotPoliced, source, direction);
        }
        // Only egress-isolated endpoints defer (`defer`): the source is isolated.
        Ok(Parsed::NotIp) => return Verdict::new(Reason::DroppedNotIp, source, direction),
        Ok(Parsed::V4Mapped) => return Verdict::new(Reason::DroppedV4Mapped, source, direction),
        Ok(Parsed::Policed) => {}
    }
    if pkt.frag == FRAG_LATER {
        return fragments::follow(source, direction, pkt);
    }
    let v = post_dnat_egress(source, pkt, 0, config, now());
    fragments::record_first(source, direction, pkt, v)
}
