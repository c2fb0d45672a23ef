//! The compiler's output: the exact contents of the dataplane maps for one node, and the diff
//! between two such outputs. The map writer (`dataplane`) applies a [`MapDiff`] entry by entry.
//!
//! Map layouts are defined in `policy-common`; this module only groups them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use policy_common::{Direction, IdentityPair, PolicyKey, PolicyValue};

use crate::model::ObjectKey;

/// A POLICY trie entry key: the key data plus its prefix length in bits
/// (`POLICY_FIXED_PREFIX_BITS ..= POLICY_FULL_PREFIX_BITS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntryKey {
    pub prefix_len: u32,
    pub key: PolicyKey,
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
}
