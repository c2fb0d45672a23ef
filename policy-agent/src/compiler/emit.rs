//! POLICY entries of one local endpoint.
//!
//! Key: {endpoint id, peer identity, direction, protocol, destination port} with prefix length
//! 80 + the port prefix bits (`policy_common::PolicyKey`, probed by `policy-ebpf/src/policy.rs`
//! with the full key for the peer's identity, then its CIDR identity, then ANY). Value: the rule
//! reference. Policies are visited in namespace/name order and rules in index order, and the
//! first entry for a key is kept, so a key shared by several rules carries the smallest
//! [`RuleRef`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use policy_common::{
    Direction, POLICY_FIXED_PREFIX_BITS, PolicyKey, PolicyValue, endpoint_flags, identity,
};

use super::alloc::Interner;
use super::cidr::IpBlock;
use super::identities::PodIdentityKey;
use super::ipcache::ExactTargets;
use super::policy::{NormPeer, NormPolicy, NormRule, PortSpec};
use super::ports::{self, PortPrefix};
use super::resolve::{IdentityUniverse, SelectorCache};
use super::{EndpointEntry, PodView, PolicyEntryKey, RuleRef};
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

/// Emits the POLICY entries of local endpoints.
pub(super) struct Emitter<'a, 'c> {
    pub(super) selectors: &'a mut SelectorCache,
    pub(super) rule_ids: &'a mut Interner<RuleRef>,
    pub(super) pod_ids: &'a Interner<Arc<PodIdentityKey>>,
    pub(super) resolution: &'a Resolution<'c>,
}

impl Emitter<'_, '_> {
    pub(super) fn endpoint(
        &mut self,
        id: u32,
        pod: &PodView<'_>,
        ns_policies: &[Arc<NormPolicy>],
        out: &mut BTreeMap<PolicyEntryKey, PolicyValue>,
    ) -> EndpointEntry {
        let labels = &pod.pod.labels;
        let selecting: Vec<&NormPolicy> = ns_policies
            .iter()
            .filter(|p| p.subject.matches(labels))
            .map(|p| &**p)
            .collect();
        let mut flags = 0;
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
                    self.rule(id, pod, p, direction, rule, out);
                }
            }
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
        endpoint: u32,
        pod: &PodView<'_>,
        policy: &NormPolicy,
        direction: Direction,
        rule: &NormRule,
        out: &mut BTreeMap<PolicyEntryKey, PolicyValue>,
    ) {
        let Some(rule_id) = self.rule_ids.intern(&RuleRef {
            policy: policy.key.clone(),
            direction,
            rule_index: rule.index,
        }) else {
            return;
        };
        let mut put = |peer: u32, protocol: Protocol, port: PortPrefix| {
            let key = PolicyEntryKey {
                prefix_len: POLICY_FIXED_PREFIX_BITS + u32::from(port.bits),
                key: PolicyKey::new(endpoint, peer, direction, protocol.number(), port.port),
            };
            out.entry(key).or_insert(PolicyValue {
                rule: rule_id,
                flags: 0,
            });
        };
        let any = [];
        let peers: &[NormPeer] = rule.peers.as_deref().unwrap_or(&any);
        for port in &rule.ports {
            let protocol = port.protocol;
            let numeric: Vec<PortPrefix> = match &port.port {
                PortSpec::All => vec![PortPrefix::ALL],
                PortSpec::Range(lo, hi) => ports::range_cover(*lo, *hi),
                // Ingress: the destination is the endpoint itself.
                PortSpec::Named(name) if direction == Direction::Ingress => pod
                    .ident
                    .ports_named(name, protocol)
                    .map(PortPrefix::exact)
                    .collect(),
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
                            put(id, protocol, PortPrefix::exact(number));
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
                                            put(id, protocol, PortPrefix::exact(number));
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
                                    put(id, protocol, PortPrefix::exact(n));
                                }
                            }
                        }
                    },
                }
            }
        }
    }
}
