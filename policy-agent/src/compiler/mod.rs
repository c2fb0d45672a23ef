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
//!   pod's is the node's; one claimed by two live pods is the first's by namespace/name.
//!   hostNetwork pods are node traffic, not peers: their addresses are node addresses, and no
//!   selector ever matches them. Terminated pods (`Succeeded`, `Failed`) are ignored: their
//!   addresses may already belong to new pods.
//! - **Node addresses**: [`NodeContext::node_ips`], the Node object named
//!   [`NodeContext::node_name`] and the host addresses of pods scheduled here are this node
//!   (HOST); every other Node object's addresses and other pods' host addresses are REMOTE_NODE.
//!   Every family: a dual-stack node's IPv4 and IPv6 `InternalIP`s are both its own. IPv6
//!   link-local addresses are never node addresses ([`model::node_address`]).
//! - **ENDPOINTS**: local pods (scheduled here, not hostNetwork, not terminated, with an address),
//!   with a stable id in 1..=4095 and the isolation flags from the policies selecting them.
//! - **POLICY**: for each local endpoint, direction it is isolated in, selecting policy, rule, peer
//!   and port: one port range `first..=last` of the group (endpoint, peer identity, direction,
//!   protocol) → rule reference. Peers: pod selectors → the pod identities they match; ipBlocks →
//!   every CIDR identity whose set contains the block; no peers → [`identity::ANY`]. Ports: none
//!   → 0-65535 of TCP, UDP and SCTP; `endPort` → that range. A group's ranges are merged
//!   ([`ports::merge`]); an endpoint with a group over `policy_common::POLICY_MAX_RANGES` gets no
//!   entries, `NOT_PROGRAMMED` and a [`CompileError::MapCapacity`].
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
mod emit;
pub mod error;
mod identities;
mod ipcache;
pub mod output;
pub mod policy;
pub mod ports;
mod resolve;
pub mod selector;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use policy_common::identity;

pub use self::error::CompileError;
pub use self::identities::{CidrIdentityKey, IdentityInfo, PodIdentityKey};
pub use self::output::{EndpointEntry, MapDiff, NodeMaps, PolicyEntryKey, RuleRef};

use self::alloc::Interner;
use self::emit::{Emitter, Resolution};
use self::policy::NormPolicy;
use self::resolve::{SelectorCache, named_index, universe};
use crate::model::{self, Cluster, Labels, ObjectKey, PodInfo};

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

/// A policy's normal form, reused while its spec is unchanged.
#[derive(Debug)]
struct CachedPolicy {
    spec: Option<NetworkPolicySpec>,
    norm: Arc<NormPolicy>,
    errors: Vec<CompileError>,
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

/// A pod identity and its key.
type Interned = (u32, Arc<PodIdentityKey>);

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
    pod: &'c PodInfo,
    ips: &'c [IpAddr],
    identity: u32,
    ident: Arc<PodIdentityKey>,
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
        let (block_cidrs, exact) = ipcache::build(
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
            .filter(|p| p.pod.node_name.as_deref() == Some(&node.node_name))
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
                &mut errors,
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
        // Identities interned in this pass, by (namespace labels, pod labels).
        let mut seen: HashMap<(usize, &Labels), Vec<Interned>> = HashMap::new();
        for (key, pod) in &cluster.pods {
            if pod.terminated {
                continue;
            }
            errors.extend(pod.bad_addresses.iter().map(|b| {
                CompileError::pod(key, &b.field, format!("{:?} is not an IP address", b.value))
            }));
            let set = if pod.node_name.as_deref() == Some(&node.node_name) {
                &mut addresses.host
            } else {
                &mut addresses.remote
            };
            set.extend(pod.node_ips());
            if pod.host_network {
                continue;
            }
            let ips = &*pod.ips;
            if ips.is_empty() {
                continue;
            }
            let ns_labels = self.namespace_labels(cluster, &key.namespace);
            let labels = &pod.labels;
            let cached = self.pods.get_mut(key).filter(|c| {
                Arc::ptr_eq(&c.ident.namespace_labels, &ns_labels)
                    && c.ident.labels == *labels
                    && pod.named_ports_equal(&c.ident.named_ports)
            });
            let (identity, ident) = match cached {
                Some(c) if self.pod_ids.mark_id(c.identity) => {
                    c.epoch = self.epoch;
                    (c.identity, c.ident.clone())
                }
                _ => {
                    // A label set met earlier in this pass shares its key without building one.
                    let slot = (Arc::as_ptr(&ns_labels) as usize, labels);
                    let same = seen.get(&slot).and_then(|v| {
                        v.iter()
                            .find(|(_, k)| pod.named_ports_equal(&k.named_ports))
                    });
                    let (identity, ident) = match same {
                        Some((id, k)) => (*id, k.clone()),
                        None => {
                            let fresh = Arc::new(PodIdentityKey {
                                namespace_labels: ns_labels,
                                labels: labels.clone(),
                                named_ports: pod.named_ports(),
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
                            seen.entry(slot)
                                .or_default()
                                .push((identity, ident.clone()));
                            (identity, ident)
                        }
                    };
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ipnetwork::{Ipv4Network, Ipv6Network};
    use policy_common::{Direction, IdentityPair};
    use serde_json::json;

    use super::*;
    use crate::model::fixtures::{add_pod, ip, node, pod, policy};

    /// The IPCACHE entry of exactly `addr` (/32 or /128).
    fn entry(maps: &NodeMaps, addr: &str) -> Option<IdentityPair> {
        match ip(addr) {
            IpAddr::V4(a) => maps.ipcache_v4.get(&Ipv4Network::from(a)).copied(),
            IpAddr::V6(a) => maps.ipcache_v6.get(&Ipv6Network::from(a)).copied(),
        }
    }

    fn compile(c: &Cluster, node_ips: &[&str]) -> Compilation {
        let node = NodeContext {
            node_name: "n1".into(),
            node_ips: node_ips.iter().map(|s| ip(s)).collect(),
        };
        let out = Compiler::new().compile(c, &node);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        out
    }

    /// Ingress peer identities of endpoint `pod`.
    fn ingress_peers(out: &Compilation, pod: &ObjectKey) -> BTreeSet<u32> {
        let id = out.maps.endpoints[pod].id;
        out.maps
            .policy
            .keys()
            .filter(|k| k.endpoint == id && k.direction == Direction::Ingress)
            .map(|k| k.identity)
            .collect()
    }

    /// `web` (local) and `client` (on n2), both dual-stack; `web` admits `client` and ipBlock
    /// `cidr`.
    fn dual_stack(cidr: &str) -> (Cluster, ObjectKey) {
        let mut c = Cluster::default();
        let web = add_pod(
            &mut c,
            "x",
            "web",
            pod(
                "n1",
                json!({"app": "web"}),
                &["10.244.1.5", "fd00:10:244:1::5"],
            ),
        );
        add_pod(
            &mut c,
            "x",
            "client",
            pod(
                "n2",
                json!({"app": "client"}),
                &["10.244.2.7", "fd00:10:244:2::7"],
            ),
        );
        let spec = json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [
                {"podSelector": {"matchLabels": {"app": "client"}}},
                {"ipBlock": {"cidr": cidr}},
            ]}],
        });
        c.policies
            .insert(ObjectKey::new("x", "web"), policy("x", "web", spec));
        (c, web)
    }

    #[test]
    fn a_dual_stack_pod_has_one_identity_for_both_addresses() {
        let (c, web) = dual_stack("0.0.0.0/0");
        let out = compile(&c, &[]);
        let (w4, w6) = (
            entry(&out.maps, "10.244.1.5").unwrap(),
            entry(&out.maps, "fd00:10:244:1::5").unwrap(),
        );
        let (c4, c6) = (
            entry(&out.maps, "10.244.2.7").unwrap(),
            entry(&out.maps, "fd00:10:244:2::7").unwrap(),
        );
        assert_eq!(w4.identity, w6.identity);
        assert_eq!(c4.identity, c6.identity);
        assert_ne!(w4.identity, c4.identity);
        let endpoint = &out.maps.endpoints[&web];
        assert_eq!(endpoint.identity, w4.identity);
        assert_eq!(
            endpoint.addresses,
            [ip("10.244.1.5"), ip("fd00:10:244:1::5")]
        );
        // The client's identity is allowed whichever family it uses.
        assert!(ingress_peers(&out, &web).contains(&c4.identity));
    }

    #[test]
    fn an_ip_block_gives_cidr_identities_in_its_own_family_only() {
        // (cidr, an address inside, one outside, its prefixes in IPCACHE_V4 and IPCACHE_V6).
        for (cidr, inside, outside, prefixes) in [
            ("0.0.0.0/0", "10.244.2.7", "fd00:10:244:2::7", (1, 0)),
            ("::/0", "fd00:10:244:2::7", "10.244.2.7", (0, 1)),
            // An IPv4-mapped IPv6 CIDR is the IPv4 CIDR it maps.
            (
                "::ffff:0.0.0.0/96",
                "10.244.2.7",
                "fd00:10:244:2::7",
                (1, 0),
            ),
        ] {
            let (c, web) = dual_stack(cidr);
            let out = compile(&c, &[]);
            let peers = ingress_peers(&out, &web);
            let inside = entry(&out.maps, inside).unwrap();
            let outside = entry(&out.maps, outside).unwrap();
            assert_ne!(inside.cidr_identity, identity::ANY, "{cidr}");
            assert!(peers.contains(&inside.cidr_identity), "{cidr}");
            assert_eq!(outside.cidr_identity, identity::ANY, "{cidr}");
            // The world of the other family has no entry: (WORLD, ANY), which no key admits.
            assert!(!peers.contains(&identity::ANY), "{cidr}");
            assert!(!peers.contains(&identity::WORLD), "{cidr}");
            let v4 = out.maps.ipcache_v4.keys().filter(|n| n.prefix() < 32);
            let v6 = out.maps.ipcache_v6.keys().filter(|n| n.prefix() < 128);
            assert_eq!((v4.count(), v6.count()), prefixes, "{cidr}");
        }
    }

    #[test]
    fn node_addresses_of_both_families_are_host_and_remote_node() {
        let (mut c, _) = dual_stack("10.0.0.0/8");
        for (name, v4, v6) in [
            ("n1", "172.18.0.2", "fc00:f853:ccd:e793::2"),
            ("n2", "172.18.0.3", "fc00:f853:ccd:e793::3"),
        ] {
            let addresses = [
                ("InternalIP", v4),
                ("InternalIP", v6),
                ("InternalIP", "fe80::42:acff:fe12:2"),
            ];
            c.nodes.insert(name.into(), node(name, &addresses));
        }
        // The given address (IPv6 only) and the Node object's (both families) are this node.
        let out = compile(&c, &["2001:db8::2"]);
        let id = |a: &str| entry(&out.maps, a).map(|p| p.identity);
        for host in ["172.18.0.2", "fc00:f853:ccd:e793::2", "2001:db8::2"] {
            assert_eq!(id(host), Some(identity::HOST), "{host}");
        }
        for remote in ["172.18.0.3", "fc00:f853:ccd:e793::3"] {
            assert_eq!(id(remote), Some(identity::REMOTE_NODE), "{remote}");
        }
        // A link-local address names no node: no entry.
        assert_eq!(id("fe80::42:acff:fe12:2"), None);
    }
}
