//! The compiler's output: the exact contents of the dataplane maps for one node, and the diff
//! between two such outputs. The map writer (`dataplane`) applies a [`MapDiff`] entry by entry.
//!
//! Map layouts are defined in `policy-common`; this module only groups them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use policy_common::{Direction, IdentityPair, PolicyValue};

use crate::model::ObjectKey;

/// A POLICY entry: one inclusive destination port range `first..=last` of the group (endpoint,
/// peer identity, direction, protocol). The compiler emits the ranges of a group merged
/// (`compiler::ports::merge`: sorted, disjoint, at most [`policy_common::POLICY_MAX_RANGES`]); the
/// map writer stores each group's ranges in its POLICY value ([`policy_common::PolicyGroupKey`]).
/// Derived order: by group, then by range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntryKey {
    /// Endpoint id.
    pub endpoint: u32,
    /// Peer identity ([`policy_common::identity::ANY`] for any peer).
    pub identity: u32,
    pub direction: Direction,
    /// IP protocol number.
    pub protocol: u8,
    pub first: u16,
    pub last: u16,
}

/// One local endpoint (a pod on this node with a pod-network address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    /// Stable while the pod exists; never 0; fits the configured `skb->mark` bits (< 4096).
    pub id: u32,
    /// `policy_common::endpoint_flags` bits.
    pub flags: u32,
    /// The pod's own identity.
    pub identity: u32,
    /// Pod IPs (every family).
    pub addresses: Vec<IpAddr>,
}

/// Where an allow entry came from, for flow logs and `explain`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy: ObjectKey,
    pub direction: Direction,
    /// Index into `spec.ingress` / `spec.egress`.
    pub rule_index: u32,
}

impl RuleRef {
    /// The rule as a policy author names it: `ingress[i]` / `egress[i]`.
    pub fn rule_name(&self) -> String {
        let dir = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        format!("{dir}[{}]", self.rule_index)
    }
}

/// Everything the dataplane of one node holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeMaps {
    /// Local endpoints by pod.
    pub endpoints: BTreeMap<ObjectKey, EndpointEntry>,
    pub ipcache_v4: BTreeMap<Ipv4Network, IdentityPair>,
    pub ipcache_v6: BTreeMap<Ipv6Network, IdentityPair>,
    pub policy: BTreeMap<PolicyEntryKey, PolicyValue>,
    /// Service frontend addresses (ClusterIPs, every family).
    pub services: BTreeSet<IpAddr>,
    /// `PolicyValue::rule` → its origin. Rule reference 0 is never used.
    pub rules: BTreeMap<u32, RuleRef>,
}

/// Upserts and removals per map, turning one [`NodeMaps`] into another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDiff {
    pub endpoints_upsert: BTreeMap<ObjectKey, EndpointEntry>,
    pub endpoints_remove: BTreeSet<ObjectKey>,
    pub ipcache_v4_upsert: BTreeMap<Ipv4Network, IdentityPair>,
    pub ipcache_v4_remove: BTreeSet<Ipv4Network>,
    pub ipcache_v6_upsert: BTreeMap<Ipv6Network, IdentityPair>,
    pub ipcache_v6_remove: BTreeSet<Ipv6Network>,
    pub policy_upsert: BTreeMap<PolicyEntryKey, PolicyValue>,
    pub policy_remove: BTreeSet<PolicyEntryKey>,
    pub services_add: BTreeSet<IpAddr>,
    pub services_remove: BTreeSet<IpAddr>,
    /// Rule references (userspace only: flow logs and metrics resolve `PolicyValue::rule` here).
    pub rules_upsert: BTreeMap<u32, RuleRef>,
    pub rules_remove: BTreeSet<u32>,
}

/// Upserts (new or changed values) and removals turning `old` into `new`, by one merge pass over
/// both sorted maps.
fn diff_map<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    upsert: &mut BTreeMap<K, V>,
    remove: &mut BTreeSet<K>,
) {
    let mut o = old.iter().peekable();
    let mut n = new.iter().peekable();
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some((ok, _)), None) => {
                remove.insert((*ok).clone());
                o.next();
            }
            (None, Some((nk, nv))) => {
                upsert.insert((*nk).clone(), (*nv).clone());
                n.next();
            }
            (Some((ok, ov)), Some((nk, nv))) => match ok.cmp(nk) {
                std::cmp::Ordering::Less => {
                    remove.insert((*ok).clone());
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    upsert.insert((*nk).clone(), (*nv).clone());
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if ov != nv {
                        upsert.insert((*nk).clone(), (*nv).clone());
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
}

fn apply_map<K: Ord + Clone, V: Clone>(
    map: &mut BTreeMap<K, V>,
    upsert: &BTreeMap<K, V>,
    remove: &BTreeSet<K>,
) {
    for k in remove {
        map.remove(k);
    }
    for (k, v) in upsert {
        map.insert(k.clone(), v.clone());
    }
}

impl NodeMaps {
    /// What changes turn `self` into `new`: only entries that differ.
    pub fn diff(&self, new: &NodeMaps) -> MapDiff {
        let mut d = MapDiff::default();
        diff_map(
            &self.endpoints,
            &new.endpoints,
            &mut d.endpoints_upsert,
            &mut d.endpoints_remove,
        );
        diff_map(
            &self.ipcache_v4,
            &new.ipcache_v4,
            &mut d.ipcache_v4_upsert,
            &mut d.ipcache_v4_remove,
        );
        diff_map(
            &self.ipcache_v6,
            &new.ipcache_v6,
            &mut d.ipcache_v6_upsert,
            &mut d.ipcache_v6_remove,
        );
        diff_map(
            &self.policy,
            &new.policy,
            &mut d.policy_upsert,
            &mut d.policy_remove,
        );
        diff_map(
            &self.rules,
            &new.rules,
            &mut d.rules_upsert,
            &mut d.rules_remove,
        );
        d.services_add = new.services.difference(&self.services).copied().collect();
        d.services_remove = self.services.difference(&new.services).copied().collect();
        d
    }

    /// Applies a diff made by [`NodeMaps::diff`]: removals first, then upserts.
    pub fn apply(&mut self, diff: &MapDiff) {
        apply_map(
            &mut self.endpoints,
            &diff.endpoints_upsert,
            &diff.endpoints_remove,
        );
        apply_map(
            &mut self.ipcache_v4,
            &diff.ipcache_v4_upsert,
            &diff.ipcache_v4_remove,
        );
        apply_map(
            &mut self.ipcache_v6,
            &diff.ipcache_v6_upsert,
            &diff.ipcache_v6_remove,
        );
        apply_map(&mut self.policy, &diff.policy_upsert, &diff.policy_remove);
        apply_map(&mut self.rules, &diff.rules_upsert, &diff.rules_remove);
        for ip in &diff.services_remove {
            self.services.remove(ip);
        }
        self.services.extend(diff.services_add.iter().copied());
    }
}

impl MapDiff {
    /// True when applying the diff changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == MapDiff::default()
    }

    /// Number of map operations (upserts and removals) in the diff.
    pub fn len(&self) -> usize {
        self.endpoints_upsert.len()
            + self.endpoints_remove.len()
            + self.ipcache_v4_upsert.len()
            + self.ipcache_v4_remove.len()
            + self.ipcache_v6_upsert.len()
            + self.ipcache_v6_remove.len()
            + self.policy_upsert.len()
            + self.policy_remove.len()
            + self.services_add.len()
            + self.services_remove.len()
            + self.rules_upsert.len()
            + self.rules_remove.len()
    }
}
