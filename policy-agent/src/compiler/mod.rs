//! NetworkPolicy → dataplane maps, as a pure function of the cluster state.
//!
//! [`Compiler::compile`] takes the whole [`Cluster`] and returns the exact contents of one node's
//! maps ([`NodeMaps`]). The compiler keeps allocators and caches between calls: identities,
//! endpoint ids and rule references stay the same while what they stand for exists, so two
//! successive outputs differ only where the cluster changed ([`NodeMaps::diff`]).
//!
//! # How the maps express NetworkPolicy
//!
//! - **Identities.** Every live, non-hostNetwork pod with an address gets the pod identity of its
//!   (namespace labels, pod labels, named container ports) — pods of one workload share it, and
//!   including the named ports makes named-port resolution exact per identity. Every ipBlock
//!   `cidr` / `except` prefix, and every address, gets a CIDR identity: the interned set of
//!   ipBlocks that contain it (see [`cidr`]). Reserved: [`identity::HOST`] for this node's
//!   addresses, [`identity::REMOTE_NODE`] for other nodes', [`identity::WORLD`] otherwise.
//! - **IPCACHE** maps each prefix to (identity, CIDR identity): pod /32 (/128) →
//!   (pod identity, CIDR identity of the address), node addresses → (HOST or REMOTE_NODE, CIDR
//!   identity), ipBlock prefixes → (WORLD, CIDR identity). An address that is both a node's and a
//!   pod's is the node's. hostNetwork pods are node traffic: their addresses are node addresses.
//! - **ENDPOINTS**: local pods (scheduled here, not hostNetwork, not terminated, with an address),
//!   with a stable id in 1..=4095 and the isolation flags from the policies selecting them.
//! - **POLICY**: for each local endpoint, direction it is isolated in, selecting policy, rule, peer
//!   and port: one entry (endpoint, peer identity, direction, protocol, port prefix) → rule
//!   reference. Peers: pod selectors → the pod identities they match; ipBlocks → every CIDR
//!   identity whose set contains the block; no peers → [`identity::ANY`]. Ports: none → every port
//!   of TCP, UDP and SCTP; `endPort` → the minimal prefix cover ([`ports`]).
//! - **Named ports** resolve against the destination pod. Ingress: against the endpoint itself, so
//!   they become numbers. Egress: per destination — pod peers emit one entry per matched pod
//!   identity that defines the name for the protocol; no-peer rules emit the same for every pod
//!   identity; ipBlock peers give every matching pod inside the block a CIDR identity of its own
//!   (its /32 is added to the set as an exact member) and key the entry on that identity. A
//!   named port therefore never matches a node or the world.
//! - Two rules producing the same key keep the smallest [`RuleRef`], so the output is a function
//!   of the cluster (up to identity numbering).
//!
//! # Invalid input
//!
//! A policy the API server would reject is reported ([`CompileError`]) and rejected fail-closed:
//! see [`policy`]. Bad addresses on pods, nodes and services are reported and skipped. Nothing
//! stops the compilation of everything else.

pub mod alloc;
pub mod cidr;
pub mod error;
pub mod output;
pub mod policy;
pub mod ports;
pub mod selector;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use policy_common::{
    Direction, IdentityPair, POLICY_FIXED_PREFIX_BITS, PolicyKey, PolicyValue, endpoint_flags,
    identity,
};

pub use self::error::CompileError;
pub use self::output::{EndpointEntry, MapDiff, NodeMaps, PolicyEntryKey, RuleRef};

use self::alloc::Interner;
use self::cidr::{Carving, IpBlock, Prefix};
use self::policy::{NormPeer, NormPolicy, NormRule, NsScope, PeerSelector, PortSpec};
use self::ports::PortPrefix;
use crate::model::{self, Cluster, Labels, NAMESPACE_NAME_LABEL, NamedPort, ObjectKey, Protocol};

/// The node a compilation is for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// `spec.nodeName` of the pods that are local endpoints.
    pub node_name: String,
    /// This node's own addresses: [`identity::HOST`], always allowed to and from local pods.
    /// The Node object's addresses and the host addresses local pods report are added to them.
    pub node_ips: Vec<IpAddr>,
}

/// One node's maps and every problem found in the input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compilation {
    pub maps: NodeMaps,
    pub errors: Vec<CompileError>,
}

/// What a pod identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodIdentityKey {
    /// Including `kubernetes.io/metadata.name`.
    pub namespace_labels: Arc<Labels>,
    pub labels: Labels,
    /// Sorted.
    pub named_ports: Vec<NamedPort>,
}

impl PodIdentityKey {
    pub fn namespace(&self) -> &str {
        self.namespace_labels
            .get(NAMESPACE_NAME_LABEL)
            .map_or("", String::as_str)
    }

    fn ports_named<'a>(
        &'a self,
        name: &'a str,
        protocol: Protocol,
    ) -> impl Iterator<Item = u16> + 'a {
        self.named_ports
            .iter()
            .filter(move |p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// What a CIDR identity stands for: the ipBlocks containing its addresses, and for the CIDR
/// identity of one pod address targeted by an egress ipBlock rule with a named port, that address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrIdentityKey {
    /// Sorted.
    pub blocks: Vec<Arc<IpBlock>>,
    pub exact: Option<IpAddr>,
}

/// What an identity number means, for flow logs and `explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityInfo<'a> {
    Reserved(&'static str),
    Pod(&'a PodIdentityKey),
    Cidr(&'a CidrIdentityKey),
}

impl std::fmt::Display for IdentityInfo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityInfo::Reserved(name) => f.write_str(name),
            IdentityInfo::Pod(k) => {
                write!(f, "pod ns{:?} labels{:?}", k.namespace_labels, k.labels)?;
                for p in &k.named_ports {
                    write!(f, " {}={}/{}", p.name, p.port, p.protocol)?;
                }
                Ok(())
            }
            IdentityInfo::Cidr(k) => {
                f.write_str("cidr [")?;
                for (i, b) in k.blocks.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{b}")?;
                }
                f.write_str("]")?;
                if let Some(ip) = k.exact {
                    write!(f, " pod {ip}")?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug)]
struct CachedPolicy {
    spec: Option<NetworkPolicySpec>,
    norm: Arc<NormPolicy>,
    errors: Vec<CompileError>,
}

/// Pod identities matched by each peer selector in use, kept current as identities come and go.
#[derive(Debug, Default)]
struct SelectorCache {
    entries: HashMap<Arc<PeerSelector>, SelectorEntry>,
}

#[derive(Debug)]
struct SelectorEntry {
    /// Sorted.
    ids: Vec<u32>,
    used: bool,
}

fn selector_matches(sel: &PeerSelector, key: &PodIdentityKey) -> bool {
    let ns_ok = match &sel.namespaces {
        NsScope::Own(ns) => key.namespace() == ns,
        NsScope::Matching(s) => s.matches(&key.namespace_labels),
    };
    ns_ok && sel.pods.matches(&key.labels)
}

/// The live pod identities of one namespace, with the namespace's labels.
type NamespaceIdentities<'a> = (&'a Labels, Vec<(u32, &'a PodIdentityKey)>);

/// Live pod identities grouped by namespace.
struct IdentityUniverse<'a> {
    by_namespace: HashMap<&'a str, NamespaceIdentities<'a>>,
}

impl SelectorCache {
    fn begin(&mut self) {
        for e in self.entries.values_mut() {
            e.used = false;
        }
    }

    /// Applies identity churn to every cached result.
    fn update(&mut self, removed: &[u32], added: &[(u32, &PodIdentityKey)]) {
        if removed.is_empty() && added.is_empty() {
            return;
        }
        for (sel, e) in &mut self.entries {
            if !removed.is_empty() {
                e.ids.retain(|id| removed.binary_search(id).is_err());
            }
            let before = e.ids.len();
            e.ids.extend(
                added
                    .iter()
                    .filter(|(_, k)| selector_matches(sel, k))
                    .map(|(id, _)| *id),
            );
            if e.ids.len() != before {
                e.ids.sort_unstable();
            }
        }
    }

    fn resolve(&mut self, sel: &Arc<PeerSelector>, universe: &IdentityUniverse<'_>) -> &[u32] {
        let entry = self.entries.entry(sel.clone()).or_insert_with(|| {
            let mut ids = Vec::new();
            let mut scan = |idents: &[(u32, &PodIdentityKey)]| {
                ids.extend(
                    idents
                        .iter()
                        .filter(|(_, k)| sel.pods.matches(&k.labels))
                        .map(|(id, _)| *id),
                );
            };
            match &sel.namespaces {
                NsScope::Own(ns) => {
                    if let Some((_, idents)) = universe.by_namespace.get(ns.as_str()) {
                        scan(idents);
                    }
                }
                NsScope::Matching(nsel) => {
                    for (labels, idents) in universe.by_namespace.values() {
                        if nsel.matches(labels) {
                            scan(idents);
                        }
                    }
                }
            }
            ids.sort_unstable();
            SelectorEntry { ids, used: false }
        });
        entry.used = true;
        &entry.ids
    }

    fn evict_unused(&mut self) {
        self.entries.retain(|_, e| e.used);
    }
}

/// Compiles cluster state into one node's maps; see the module documentation.
#[derive(Debug)]
pub struct Compiler {
    pod_ids: Interner<Arc<PodIdentityKey>>,
    cidr_ids: Interner<Arc<CidrIdentityKey>>,
    endpoint_ids: Interner<ObjectKey>,
    rule_ids: Interner<RuleRef>,
    namespaces: HashMap<String, Arc<Labels>>,
    /// Each pod's identity key as of the last compilation, to skip rebuilding unchanged ones.
    pods: HashMap<ObjectKey, CachedPod>,
    policies: HashMap<ObjectKey, CachedPolicy>,
    selectors: SelectorCache,
    epoch: u64,
}

#[derive(Debug)]
struct CachedPod {
    ident: Arc<PodIdentityKey>,
    identity: u32,
    epoch: u64,
}

/// Addresses of this node (HOST) and of the others (REMOTE_NODE).
#[derive(Default)]
struct NodeAddresses {
    host: HashSet<IpAddr>,
    remote: HashSet<IpAddr>,
}

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

/// A live pod with a pod-network address.
struct PodView<'c> {
    key: &'c ObjectKey,
    pod: &'c Pod,
    ips: Vec<IpAddr>,
    identity: u32,
    ident: Arc<PodIdentityKey>,
}

/// An egress ipBlock peer with a named port: (block, port name, protocol).
type ExactSlot = (Arc<IpBlock>, String, Protocol);

/// Pods targeted by egress ipBlock rules with named ports get a CIDR identity of their own.
#[derive(Default)]
struct ExactTargets {
    /// (block, port name, protocol) → (address, port numbers).
    by_rule_port: HashMap<ExactSlot, Vec<(IpAddr, Vec<u16>)>>,
    /// address → its own CIDR identity.
    cidr_of: HashMap<IpAddr, u32>,
}

/// Everything entry emission needs, computed once per compilation.
struct Resolution<'c> {
    universe: IdentityUniverse<'c>,
    /// ipBlock → CIDR identities whose set contains it.
    block_cidrs: HashMap<Arc<IpBlock>, Vec<u32>>,
    exact: ExactTargets,
    /// (port name, protocol) → (pod identity, port) for every live identity.
    named_index: HashMap<(&'c str, Protocol), Vec<(u32, u16)>>,
}

impl Compiler {
    pub fn new() -> Self {
        Self {
            pod_ids: Interner::new(identity::POD_MIN, identity::CIDR_MIN - 1),
            cidr_ids: Interner::new(identity::CIDR_MIN, u32::MAX),
            endpoint_ids: Interner::new(1, policy_common::capacity::ENDPOINTS - 1),
            rule_ids: Interner::new(1, u32::MAX),
            namespaces: HashMap::new(),
            pods: HashMap::new(),
            policies: HashMap::new(),
            selectors: SelectorCache::default(),
            epoch: 0,
        }
    }

    /// What identity `id` stands for (as of the last compilation).
    pub fn identity_info(&self, id: u32) -> Option<IdentityInfo<'_>> {
        match id {
            identity::ANY => Some(IdentityInfo::Reserved("any")),
            identity::HOST => Some(IdentityInfo::Reserved("host")),
            identity::WORLD => Some(IdentityInfo::Reserved("world")),
            identity::REMOTE_NODE => Some(IdentityInfo::Reserved("remote-node")),
            id if id >= identity::CIDR_MIN => self.cidr_ids.key(id).map(|k| IdentityInfo::Cidr(k)),
            id => self.pod_ids.key(id).map(|k| IdentityInfo::Pod(k)),
        }
    }

    /// Full state in, maps for this node out. Identities and endpoint ids stay stable across
    /// calls while their label set / pod exists.
    pub fn compile(&mut self, cluster: &Cluster, node: &NodeContext) -> Compilation {
        let mut errors = Vec::new();
        self.pod_ids.begin();
        self.cidr_ids.begin();
        self.endpoint_ids.begin();
        self.rule_ids.begin();
        self.selectors.begin();

        self.epoch += 1;
        let mut addresses = self.node_objects(cluster, node, &mut errors);
        let pods = self.pods(cluster, node, &mut addresses, &mut errors);
        let NodeAddresses { host, mut remote } = addresses;
        remote.retain(|ip| !host.contains(ip));
        let removed = self.pod_ids.sweep();
        let added: Vec<(u32, &PodIdentityKey)> = self
            .pod_ids
            .added()
            .iter()
            .filter_map(|id| self.pod_ids.key(*id).map(|k| (*id, &**k)))
            .collect();
        self.selectors.update(&removed, &added);
        let policies = self.normalise_policies(cluster, &mut errors);

        let mut maps = NodeMaps::default();
        let (block_cidrs, exact) = ipcache(
            &mut self.cidr_ids,
            &pods,
            &policies,
            &host,
            &remote,
            &mut maps,
        );
        let resolution = Resolution {
            universe: universe(&self.pod_ids),
            block_cidrs,
            exact,
            named_index: named_index(&self.pod_ids),
        };
        let mut emitter = Emitter {
            selectors: &mut self.selectors,
            rule_ids: &mut self.rule_ids,
            pod_ids: &self.pod_ids,
            resolution: &resolution,
        };
        for pod in pods
            .iter()
            .filter(|p| model::pod_node(p.pod) == Some(&node.node_name))
        {
            let Some(id) = self.endpoint_ids.intern(pod.key) else {
                errors.push(CompileError::pod(
                    pod.key,
                    "spec.nodeName",
                    format!(
                        "no free endpoint id on node {} (at most {} endpoints)",
                        node.node_name,
                        policy_common::capacity::ENDPOINTS - 1
                    ),
                ));
                continue;
            };
            let ns_policies = policies.get(pod.key.namespace.as_str());
            let entry = emitter.endpoint(
                id,
                pod,
                ns_policies.map_or(&[], Vec::as_slice),
                &mut maps.policy,
            );
            maps.endpoints.insert(pod.key.clone(), entry);
        }
        services(cluster, &mut maps, &mut errors);

        for v in maps.policy.values() {
            if let std::collections::btree_map::Entry::Vacant(e) = maps.rules.entry(v.rule)
                && let Some(r) = self.rule_ids.key(v.rule)
            {
                e.insert(r.clone());
            }
        }
        self.cidr_ids.sweep();
        self.endpoint_ids.sweep();
        self.rule_ids.sweep();
        self.selectors.evict_unused();
        Compilation { maps, errors }
    }

    /// Namespace labels (with the name label), sharing one `Arc` per unchanged label set across
    /// compilations so unchanged pods are recognised by pointer.
    fn namespace_labels(&mut self, cluster: &Cluster, ns: &str) -> Arc<Labels> {
        if let Some(arc) = self.namespaces.get(ns) {
            return arc.clone();
        }
        let labels = model::namespace_labels(cluster, ns);
        let arc = Arc::new(labels);
        self.namespaces.insert(ns.to_owned(), arc.clone());
        arc
    }

    /// Addresses of Node objects; refreshes the namespace label cache.
    fn node_objects(
        &mut self,
        cluster: &Cluster,
        node: &NodeContext,
        errors: &mut Vec<CompileError>,
    ) -> NodeAddresses {
        // Keep an Arc only while the namespace object and its labels are unchanged.
        self.namespaces
            .retain(|ns, arc| **arc == model::namespace_labels(cluster, ns));
        let mut out = NodeAddresses {
            host: node.node_ips.iter().copied().collect(),
            remote: HashSet::new(),
        };
        for (name, n) in &cluster.nodes {
            let (ips, bad) = model::node_addresses(n);
            errors.extend(bad.into_iter().map(|b| {
                CompileError::node(name, b.field, format!("{:?} is not an IP address", b.value))
            }));
            let set = if *name == node.node_name {
                &mut out.host
            } else {
                &mut out.remote
            };
            set.extend(ips);
        }
        out
    }

    /// Live pods with a pod-network address, with their identities; collects the node
    /// addresses pods report (host IPs, hostNetwork pods).
    fn pods<'c>(
        &mut self,
        cluster: &'c Cluster,
        node: &NodeContext,
        addresses: &mut NodeAddresses,
        errors: &mut Vec<CompileError>,
    ) -> Vec<PodView<'c>> {
        let mut out = Vec::with_capacity(cluster.pods.len());
        for (key, pod) in &cluster.pods {
            if model::is_terminated(pod) {
                continue;
            }
            let bad_address = |b: model::BadAddress| {
                CompileError::pod(key, b.field, format!("{:?} is not an IP address", b.value))
            };
            let (host_ips, bad) = model::pod_host_ips(pod);
            errors.extend(bad.into_iter().map(bad_address));
            let (ips, bad) = model::pod_ips(pod);
            errors.extend(bad.into_iter().map(bad_address));
            let set = if model::pod_node(pod) == Some(&node.node_name) {
                &mut addresses.host
            } else {
                &mut addresses.remote
            };
            set.extend(host_ips);
            if model::is_host_network(pod) {
                set.extend(ips);
                continue;
            }
            if ips.is_empty() {
                continue;
            }
            let ns_labels = self.namespace_labels(cluster, &key.namespace);
            let labels = model::pod_labels(pod);
            let cached = self.pods.get_mut(key).filter(|c| {
                Arc::ptr_eq(&c.ident.namespace_labels, &ns_labels)
                    && c.ident.labels == *labels
                    && model::pod_named_ports_equal(pod, &c.ident.named_ports)
            });
            let (identity, ident) = match cached {
                Some(c) if self.pod_ids.mark_id(c.identity) => {
                    c.epoch = self.epoch;
                    (c.identity, c.ident.clone())
                }
                _ => {
                    let fresh = Arc::new(PodIdentityKey {
                        namespace_labels: ns_labels,
                        labels: labels.clone(),
                        named_ports: model::pod_named_ports(pod),
                    });
                    let Some(identity) = self.pod_ids.intern(&fresh) else {
                        errors.push(CompileError::pod(
                            key,
                            "metadata.labels",
                            "no free pod identity",
                        ));
                        continue;
                    };
                    // Share the interned key.
                    let ident = self.pod_ids.key(identity).cloned().unwrap_or(fresh);
                    self.pods.insert(
                        key.clone(),
                        CachedPod {
                            ident: ident.clone(),
                            identity,
                            epoch: self.epoch,
                        },
                    );
                    (identity, ident)
                }
            };
            out.push(PodView {
                key,
                pod,
                ips,
                identity,
                ident,
            });
        }
        let epoch = self.epoch;
        self.pods.retain(|_, c| c.epoch == epoch);
        out
    }

    /// Normalised policies by namespace, in key order; reports every invalid policy.
    fn normalise_policies(
        &mut self,
        cluster: &Cluster,
        errors: &mut Vec<CompileError>,
    ) -> HashMap<String, Vec<Arc<NormPolicy>>> {
        self.policies
            .retain(|k, _| cluster.policies.contains_key(k));
        let mut by_ns: HashMap<String, Vec<Arc<NormPolicy>>> = HashMap::new();
        for (key, np) in &cluster.policies {
            let cached = match self.policies.get(key) {
                Some(c) if c.spec == np.spec => c,
                _ => {
                    let (norm, errs) = policy::normalise(key, np);
                    self.policies.insert(
                        key.clone(),
                        CachedPolicy {
                            spec: np.spec.clone(),
                            norm: Arc::new(norm),
                            errors: errs,
                        },
                    );
                    &self.policies[key]
                }
            };
            errors.extend(cached.errors.iter().cloned());
            by_ns
                .entry(key.namespace.clone())
                .or_default()
                .push(cached.norm.clone());
        }
        by_ns
    }
}

fn universe(pod_ids: &Interner<Arc<PodIdentityKey>>) -> IdentityUniverse<'_> {
    let mut by_namespace: HashMap<&str, NamespaceIdentities<'_>> = HashMap::new();
    for (id, key) in pod_ids.iter() {
        by_namespace
            .entry(key.namespace())
            .or_insert_with(|| (&key.namespace_labels, Vec::new()))
            .1
            .push((id, key));
    }
    IdentityUniverse { by_namespace }
}

fn named_index(
    pod_ids: &Interner<Arc<PodIdentityKey>>,
) -> HashMap<(&str, Protocol), Vec<(u32, u16)>> {
    let mut out: HashMap<(&str, Protocol), Vec<(u32, u16)>> = HashMap::new();
    for (id, key) in pod_ids.iter() {
        for p in &key.named_ports {
            out.entry((p.name.as_str(), p.protocol))
                .or_default()
                .push((id, p.port));
        }
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

/// Sets an IPCACHE entry; with `replace == false` an existing entry for the prefix wins.
fn insert_ipcache(maps: &mut NodeMaps, prefix: Prefix, pair: IdentityPair, replace: bool) {
    fn put<K: Ord>(map: &mut BTreeMap<K, IdentityPair>, k: K, v: IdentityPair, replace: bool) {
        if replace {
            map.insert(k, v);
        } else {
            map.entry(k).or_insert(v);
        }
    }
    if let Some(n) = prefix.to_v4_network() {
        put(&mut maps.ipcache_v4, n, pair, replace);
    } else if let Some(n) = prefix.to_v6_network() {
        put(&mut maps.ipcache_v6, n, pair, replace);
    }
}

/// Carves the ipBlocks of every valid policy, interns the CIDR identities and fills IPCACHE.
/// Returns, per ipBlock, the CIDR identities contained in it, and the exact per-pod identities.
fn ipcache(
    cidr_ids: &mut Interner<Arc<CidrIdentityKey>>,
    pods: &[PodView<'_>],
    policies: &HashMap<String, Vec<Arc<NormPolicy>>>,
    host: &HashSet<IpAddr>,
    remote: &HashSet<IpAddr>,
    maps: &mut NodeMaps,
) -> (HashMap<Arc<IpBlock>, Vec<u32>>, ExactTargets) {
    let mut blocks: Vec<Arc<IpBlock>> = policies
        .values()
        .flatten()
        .flat_map(|p| p.blocks())
        .cloned()
        .collect();
    blocks.sort();
    blocks.dedup();
    let carving = Carving::new(&blocks);

    let mut intern = |members: &[u32], exact: Option<IpAddr>| -> u32 {
        if members.is_empty() && exact.is_none() {
            return identity::ANY;
        }
        let key = Arc::new(CidrIdentityKey {
            blocks: members
                .iter()
                .map(|&i| blocks[i as usize].clone())
                .collect(),
            exact,
        });
        cidr_ids.intern(&key).unwrap_or(identity::ANY)
    };
    let mut block_cidrs: HashMap<Arc<IpBlock>, Vec<u32>> = HashMap::new();
    let mut note = |members: &[u32], id: u32| {
        for &i in members {
            block_cidrs
                .entry(blocks[i as usize].clone())
                .or_default()
                .push(id);
        }
    };

    // CIDR identities of the prefixes (their entries are added last: addresses win).
    let mut prefix_cidr = Vec::with_capacity(carving.prefixes.len());
    for (_, members) in &carving.prefixes {
        let id = intern(members, None);
        note(members, id);
        prefix_cidr.push(id);
    }
    let cidr_of = |ip: IpAddr| {
        carving
            .longest_match(ip)
            .map_or(identity::ANY, |i| prefix_cidr[i])
    };

    // Pods targeted by egress ipBlock rules with named ports.
    let mut exact = ExactTargets::default();
    let mut sorted_ips: Vec<(IpAddr, usize)> = Vec::new();
    for (rule, block) in policies
        .values()
        .flatten()
        .flat_map(|p| p.rules(Direction::Egress))
        .flat_map(|r| r.peers.iter().flatten().map(move |peer| (r, peer)))
        .filter_map(|(r, peer)| match peer {
            NormPeer::Block(b) => Some((r, b)),
            NormPeer::Pods(_) => None,
        })
    {
        for port in &rule.ports {
            let PortSpec::Named(name) = &port.port else {
                continue;
            };
            let slot = (block.clone(), name.clone(), port.protocol);
            if exact.by_rule_port.contains_key(&slot) {
                continue;
            }
            if sorted_ips.is_empty() {
                sorted_ips = pods
                    .iter()
                    .enumerate()
                    .flat_map(|(i, p)| p.ips.iter().map(move |ip| (*ip, i)))
                    .collect();
                sorted_ips.sort_unstable();
                // An address claimed twice belongs to the first pod (as in IPCACHE).
                sorted_ips.dedup_by_key(|(ip, _)| *ip);
            }
            let start = sorted_ips.partition_point(|(ip, _)| *ip < first_ip(&block.cidr));
            let mut targets = Vec::new();
            for &(ip, i) in sorted_ips[start..]
                .iter()
                .take_while(|(ip, _)| block.cidr.contains_ip(*ip))
            {
                if host.contains(&ip) || remote.contains(&ip) || !block.contains_ip(ip) {
                    continue;
                }
                let ports: Vec<u16> = pods[i].ident.ports_named(name, port.protocol).collect();
                if !ports.is_empty() {
                    targets.push((ip, ports));
                }
            }
            for (ip, _) in &targets {
                exact.cidr_of.entry(*ip).or_insert(identity::ANY);
            }
            exact.by_rule_port.insert(slot, targets);
        }
    }
    let exact_ips: Vec<IpAddr> = exact.cidr_of.keys().copied().collect();
    for ip in exact_ips {
        let members = carving.blocks_containing(ip);
        let id = intern(members, Some(ip));
        note(members, id);
        exact.cidr_of.insert(ip, id);
    }
    for v in block_cidrs.values_mut() {
        v.sort_unstable();
        v.dedup();
    }

    // Address entries. Two live pods claiming one address: the first by namespace/name keeps
    // it. A node's address is never a pod peer: nodes replace pods.
    for pod in pods {
        for &ip in &pod.ips {
            let cidr_identity = exact
                .cidr_of
                .get(&ip)
                .copied()
                .unwrap_or_else(|| cidr_of(ip));
            let pair = IdentityPair {
                identity: pod.identity,
                cidr_identity,
            };
            insert_ipcache(maps, Prefix::host(ip), pair, false);
        }
    }
    for (set, id) in [(host, identity::HOST), (remote, identity::REMOTE_NODE)] {
        for &ip in set {
            let pair = IdentityPair {
                identity: id,
                cidr_identity: cidr_of(ip),
            };
            insert_ipcache(maps, Prefix::host(ip), pair, true);
        }
    }
    for ((prefix, _), &id) in carving.prefixes.iter().zip(&prefix_cidr) {
        let pair = IdentityPair {
            identity: identity::WORLD,
            cidr_identity: id,
        };
        insert_ipcache(maps, *prefix, pair, false);
    }
    (block_cidrs, exact)
}

/// The lowest address of a prefix.
fn first_ip(p: &Prefix) -> IpAddr {
    match *p {
        Prefix::V4 { addr, .. } => IpAddr::V4(std::net::Ipv4Addr::from_bits(addr)),
        Prefix::V6 { addr, .. } => IpAddr::V6(std::net::Ipv6Addr::from_bits(addr)),
    }
}

/// Emits the POLICY entries of local endpoints.
struct Emitter<'a, 'c> {
    selectors: &'a mut SelectorCache,
    rule_ids: &'a mut Interner<RuleRef>,
    pod_ids: &'a Interner<Arc<PodIdentityKey>>,
    resolution: &'a Resolution<'c>,
}

impl Emitter<'_, '_> {
    fn endpoint(
        &mut self,
        id: u32,
        pod: &PodView<'_>,
        ns_policies: &[Arc<NormPolicy>],
        out: &mut BTreeMap<PolicyEntryKey, PolicyValue>,
    ) -> EndpointEntry {
        let labels = model::pod_labels(pod.pod);
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
            addresses: pod.ips.clone(),
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

/// Every ClusterIP (`spec.clusterIPs`, else `spec.clusterIP`; `None` and empty skipped).
fn services(cluster: &Cluster, maps: &mut NodeMaps, errors: &mut Vec<CompileError>) {
    for (key, svc) in &cluster.services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let listed: Vec<(String, &str)> = match spec.cluster_ips.as_deref() {
            Some(ips) if !ips.is_empty() => ips
                .iter()
                .enumerate()
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
                .collect(),
            _ => spec
                .cluster_ip
                .iter()
                .map(|ip| ("spec.clusterIP".to_owned(), ip.as_str()))
                .collect(),
        };
        for (field, value) in listed {
            if value.is_empty() || value == "None" {
                continue;
            }
            match value.parse::<IpAddr>() {
                Ok(ip) => {
                    maps.services.insert(ip);
                }
                Err(_) => errors.push(CompileError::service(
                    key,
                    field,
                    format!("{value:?} is not an IP address"),
                )),
            }
        }
    }
}
