//! POLICY entries of one local endpoint.
//!
//! Entries are grouped by {endpoint id, peer identity, direction, protocol} (the POLICY map's
//! `policy_common::PolicyGroupKey`, probed by `policy-ebpf/src/policy.rs` for the peer's identity,
//! then its CIDR identity, then ANY); each entry is an inclusive destination port range
//! ([`PolicyEntryKey`]) with the rule reference that allows it. A port list entry becomes one
//! range (a port, an `endPort` range as written, or 0-65535 for all ports); the ranges of a group
//! are then merged (`ports::merge`). Policies are visited in namespace/name order and rules in
//! index order, and that order breaks ties in the merge, so a range shared by several rules
//! carries the smallest [`RuleRef`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use policy_common::{
    Direction, POLICY_MAX_RANGES, PolicyValue, endpoint_flags, identity, map_names,
};

use super::alloc::Interner;
use super::cidr::IpBlock;
use super::identities::PodIdentityKey;
use super::ipcache::ExactTargets;
use super::policy::{NormPeer, NormPolicy, NormRule, PortSpec};
use super::ports::{self, RuledRange};
use super::resolve::{IdentityUniverse, SelectorCache};
use super::{CompileError, EndpointEntry, PodView, PolicyEntryKey, RuleRef};
use crate::model::Protocol;

/// Everything entry emission needs, computed once per compilation.
pub(super) struct Resolution<'c> {
    pub(super) universe: IdentityUniverse<'c>,
    /// ipBlock → CIDR identities whose set contains it.
    pub(super) block_cidrs: HashMap<Arc<IpBlock>, Vec<u32>>,
    pub(super) exact: ExactTargets,
    /// (port name, protocol) → (pod identity, port) for every live identity.
    pub(super) named_index: HashMap<(&'c str, Protocol), Vec<(u32, u16)>>,
}

/// One endpoint's port ranges per (peer identity, direction, protocol), in emission order.
type Groups = BTreeMap<(u32, Direction, Protocol), Vec<RuledRange>>;

/// Emits the POLICY entries of local endpoints.
pub(super) struct Emitter<'a, 'c> {
    pub(super) selectors: &'a mut SelectorCache,
    pub(super) rule_ids: &'a mut Interner<RuleRef>,
    pub(super) pod_ids: &'a Interner<Arc<PodIdentityKey>>,
    pub(super) resolution: &'a Resolution<'c>,
}

impl Emitter<'_, '_> {
    /// The endpoint entry of `pod` (id `id`) and its POLICY entries, added to `out`. When a
    /// group does not fit the POLICY map the endpoint gets no entries and `NOT_PROGRAMMED`
    /// (fail closed), and the error names the pod and the map.
    pub(super) fn endpoint(
        &mut self,
        id: u32,
        pod: &PodView<'_>,
        ns_policies: &[Arc<NormPolicy>],
        out: &mut BTreeMap<PolicyEntryKey, PolicyValue>,
        errors: &mut Vec<CompileError>,
    ) -> EndpointEntry {
        let labels = &pod.pod.labels;
        let selecting: Vec<&NormPolicy> = ns_policies
            .iter()
            .filter(|p| p.subject.matches(labels))
            .map(|p| &**p)
            .collect();
        let mut flags = 0;
        let mut groups = Groups::new();
        for (direction, flag) in [
            (Direction::Ingress, endpoint_flags::INGRESS_ISOLATED),
            (Direction::Egress, endpoint_flags::EGRESS_ISOLATED),
        ] {
            if !selecting.iter().any(|p| p.isolates(direction)) {
                continue;
            }
            flags |= flag;
            for p in &selecting {
                for rule in p.rules(direction) {
                    self.rule(pod, p, direction, rule, &mut groups);
                }
            }
        }
        let merged: Vec<_> = groups
            .into_iter()
            .map(|(group, ranges)| (group, ports::merge(&ranges)))
            .collect();
        let over: Vec<_> = merged
            .iter()
            .filter(|(_, ranges)| ranges.len() > POLICY_MAX_RANGES)
            .collect();
        if over.is_empty() {
            for ((peer, direction, protocol), ranges) in &merged {
                for range in ranges {
                    let key = PolicyEntryKey {
                        endpoint: id,
                        identity: *peer,
                        direction: *direction,
                        protocol: protocol.number(),
                        first: range.first,
                        last: range.last,
                    };
                    out.insert(
                        key,
                        PolicyValue {
                            rule: range.rule,
                            flags: 0,
                        },
                    );
                }
            }
        } else {
            flags |= endpoint_flags::NOT_PROGRAMMED;
            errors.extend(over.iter().map(|((peer, direction, protocol), ranges)| {
                CompileError::MapCapacity {
                    namespace: pod.key.namespace.clone(),
                    name: pod.key.name.clone(),
                    map: map_names::POLICY,
                    identity: *peer,
                    direction: match direction {
                        Direction::Ingress => "ingress",
                        Direction::Egress => "egress",
                    },
                    protocol: protocol.as_str(),
                    ranges: ranges.len(),
                    limit: POLICY_MAX_RANGES,
                }
            }));
        }
        EndpointEntry {
            id,
            flags,
            identity: pod.identity,
            addresses: pod.ips.to_vec(),
        }
    }

    fn rule(
        &mut self,
        pod: &PodView<'_>,
        policy: &NormPolicy,
        direction: Direction,
        rule: &NormRule,
        groups: &mut Groups,
    ) {
        let Some(rule_id) = self.rule_ids.intern(&RuleRef {
            policy: policy.key.clone(),
            direction,
            rule_index: rule.index,
        }) else {
            return;
        };
        let mut put = |peer: u32, protocol: Protocol, (first, last): (u16, u16)| {
            groups
                .entry((peer, direction, protocol))
                .or_default()
                .push(RuledRange::new(first, last, rule_id));
        };
        let exact = |port: u16| (port, port);
        let any = [];
        let peers: &[NormPeer] = rule.peers.as_deref().unwrap_or(&any);
        for port in &rule.ports {
            let protocol = port.protocol;
            let numeric: Vec<(u16, u16)> = match &port.port {
                PortSpec::All => vec![(0, u16::MAX)],
                PortSpec::Range(lo, hi) => vec![(*lo, *hi)],
                // Ingress: the destination is the endpoint itself.
                PortSpec::Named(name) if direction == Direction::Ingress => {
                    pod.ident.ports_named(name, protocol).map(exact).collect()
                }
                // Egress: resolved per destination below.
                PortSpec::Named(_) => Vec::new(),
            };
            let egress_name = match &port.port {
                PortSpec::Named(name) if direction == Direction::Egress => Some(name.as_str()),
                _ => None,
            };
            if rule.peers.is_none() {
                match egress_name {
                    None => numeric
                        .iter()
                        .for_each(|p| put(identity::ANY, protocol, *p)),
                    Some(name) => {
                        for &(id, number) in self
                            .resolution
                            .named_index
                            .get(&(name, protocol))
                            .map_or(&[][..], Vec::as_slice)
                        {
                            put(id, protocol, exact(number));
                        }
                    }
                }
            }
            for peer in peers {
                match peer {
                    NormPeer::Pods(sel) => {
                        let ids = self.selectors.resolve(sel, &self.resolution.universe);
                        for &id in ids {
                            match egress_name {
                                None => numeric.iter().for_each(|p| put(id, protocol, *p)),
                                Some(name) => {
                                    if let Some(key) = self.pod_ids.key(id) {
                                        for number in key.ports_named(name, protocol) {
                                            put(id, protocol, exact(number));
                                        }
                                    }
                                }
                            }
                        }
                    }
                    NormPeer::Block(block) => match egress_name {
                        None => {
                            for &id in self
                                .resolution
                                .block_cidrs
                                .get(block)
                                .map_or(&[][..], Vec::as_slice)
                            {
                                numeric.iter().for_each(|p| put(id, protocol, *p));
                            }
                        }
                        Some(name) => {
                            let slot = (block.clone(), name.to_owned(), protocol);
                            for (ip, numbers) in self
                                .resolution
                                .exact
                                .by_rule_port
                                .get(&slot)
                                .into_iter()
                                .flatten()
                            {
                                let id = self.resolution.exact.cidr_of[ip];
                                for &n in numbers {
                                    put(id, protocol, exact(n));
                                }
                            }
                        }
                    },
                }
            }
        }
    }
}
