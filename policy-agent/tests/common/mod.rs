//! Shared by the integration tests: cluster builders, a userspace model of the eBPF lookups over
//! [`NodeMaps`], and the check that it agrees with the reference evaluator.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_agent::compiler::{
    Compiler, EndpointEntry, NodeContext, NodeMaps, PolicyEntryKey, RuleRef,
};
use policy_agent::evaluator::{self, Flow, Outcome, Peer, Protocol};
use policy_agent::model::{self, Cluster, ObjectKey, PodInfo};
use policy_common::{
    Direction, IdentityPair, POLICY_MAX_RANGES, PolicyValue, endpoint_flags, identity,
};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Builders

pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels_json(labels)}
    }))
    .unwrap()
}

fn labels_json(labels: &[(&str, &str)]) -> serde_json::Value {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// A container port: (name, number, protocol).
pub type Port<'a> = (&'a str, u16, &'a str);

#[derive(Clone, Debug, Default)]
pub struct PodSpec<'a> {
    pub labels: Vec<(&'a str, &'a str)>,
    pub node: &'a str,
    pub ips: Vec<IpAddr>,
    pub host_ip: Option<IpAddr>,
    pub ports: Vec<Port<'a>>,
    pub host_network: bool,
    pub phase: Option<&'a str>,
}

/// The stored form of [`pod_object`].
pub fn pod(ns: &str, name: &str, spec: &PodSpec<'_>) -> PodInfo {
    pod_object(ns, name, spec).into()
}

pub fn pod_object(ns: &str, name: &str, spec: &PodSpec<'_>) -> Pod {
    let containers: Vec<serde_json::Value> = spec
        .ports
        .iter()
        .enumerate()
        .map(|(i, (pname, number, proto))| {
            json!({"name": format!("c{i}"), "ports": [{"name": pname, "containerPort": number, "protocol": proto}]})
        })
        .collect();
    let containers = if containers.is_empty() {
        vec![json!({"name": "main"})]
    } else {
        containers
    };
    let ips: Vec<serde_json::Value> = spec
        .ips
        .iter()
        .map(|ip| json!({"ip": ip.to_string()}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels_json(&spec.labels)},
        "spec": {"nodeName": spec.node, "hostNetwork": spec.host_network, "containers": containers},
        "status": {
            "phase": spec.phase.unwrap_or("Running"),
            "podIP": spec.ips.first().map(|ip| ip.to_string()),
            "podIPs": ips,
            "hostIP": spec.host_ip.map(|ip| ip.to_string()),
        }
    }))
    .unwrap()
}

pub fn node(name: &str, addresses: &[IpAddr]) -> Node {
    let addrs: Vec<serde_json::Value> = addresses
        .iter()
        .map(|a| json!({"type": "InternalIP", "address": a.to_string()}))
        .chain(std::iter::once(
            json!({"type": "Hostname", "address": name}),
        ))
        .collect();
    serde_json::from_value(json!({"metadata": {"name": name}, "status": {"addresses": addrs}}))
        .unwrap()
}

pub fn policy(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
        .unwrap()
}

pub fn service(ns: &str, name: &str, cluster_ips: &[&str]) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": cluster_ips.first(), "clusterIPs": cluster_ips}
    }))
    .unwrap()
}

pub fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

/// The NodeContext a node's agent would use: its Node object's addresses.
pub fn node_context(cluster: &Cluster, name: &str) -> NodeContext {
    NodeContext {
        node_name: name.to_owned(),
        node_ips: cluster
            .nodes
            .get(name)
            .map(|n| model::node_addresses(n).0)
            .unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------------
// The dataplane, in userspace

/// IPCACHE lookup as `policy-ebpf` does it: longest prefix, a miss is the world with no CIDR
/// identity.
pub fn ipcache_lookup(maps: &NodeMaps, ip: IpAddr) -> IdentityPair {
    let miss = IdentityPair {
        identity: identity::WORLD,
        cidr_identity: identity::ANY,
    };
    match ip {
        IpAddr::V4(a) => (0..=32u8)
            .rev()
            .find_map(|len| {
                let net = Ipv4Network::new(a, len).unwrap();
                maps.ipcache_v4
                    .get(&Ipv4Network::new(net.network(), len).unwrap())
                    .copied()
            })
            .unwrap_or(miss),
        IpAddr::V6(a) => (0..=128u8)
            .rev()
            .find_map(|len| {
                let net = Ipv6Network::new(a, len).unwrap();
                maps.ipcache_v6
                    .get(&Ipv6Network::new(net.network(), len).unwrap())
                    .copied()
            })
            .unwrap_or(miss),
    }
}

/// One POLICY probe: the range of the group (endpoint, peer, direction, protocol) that contains
/// `port`, as `policy_probe` in `policy-ebpf/src/policy.rs` scans it.
pub fn policy_probe(
    maps: &NodeMaps,
    endpoint: u32,
    peer: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
) -> Option<PolicyValue> {
    let group = |first| PolicyEntryKey {
        endpoint,
        identity: peer,
        direction,
        protocol,
        first,
        last: first,
    };
    maps.policy
        .range(group(0)..=group(u16::MAX))
        .find(|(k, _)| (k.first..=k.last).contains(&port))
        .map(|(_, v)| *v)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimOutcome {
    NotIsolated,
    Host,
    SelfTraffic,
    Allowed(u32),
    Denied,
    /// An IPv6 packet with an IPv4-mapped address in an isolated direction.
    DeniedV4Mapped,
}

impl SimOutcome {
    pub fn allowed(self) -> bool {
        !matches!(self, SimOutcome::Denied | SimOutcome::DeniedV4Mapped)
    }
}

/// The verdict `policy-ebpf` reaches at parse time for an IPv6 packet with an IPv4-mapped
/// address (`parse_at_endpoint` in `policy-ebpf/src/decide.rs`): by isolation alone.
pub fn simulate_v4_mapped(ep: &EndpointEntry, direction: Direction) -> SimOutcome {
    let bit = match direction {
        Direction::Ingress => endpoint_flags::INGRESS_ISOLATED,
        Direction::Egress => endpoint_flags::EGRESS_ISOLATED,
    };
    if ep.flags & bit == 0 {
        SimOutcome::NotIsolated
    } else {
        SimOutcome::DeniedV4Mapped
    }
}

/// The verdict `policy-ebpf` reaches for a new flow of endpoint `ep` in `direction` with a peer
/// at `peer_ip` (`judge_new` in `policy-ebpf/src/decide.rs`, `allows` in `policy.rs`):
/// NOT_PROGRAMMED, isolation flag, HOST, self (the peer is one of the endpoint's own addresses),
/// then the POLICY probes: peer identity, CIDR identity (when not ANY), ANY.
pub fn simulate(
    maps: &NodeMaps,
    ep: &EndpointEntry,
    direction: Direction,
    peer_ip: IpAddr,
    protocol: Protocol,
    port: u16,
) -> SimOutcome {
    if ep.flags & endpoint_flags::NOT_PROGRAMMED != 0 {
        return SimOutcome::Denied;
    }
    let bit = match direction {
        Direction::Ingress => endpoint_flags::INGRESS_ISOLATED,
        Direction::Egress => endpoint_flags::EGRESS_ISOLATED,
    };
    if ep.flags & bit == 0 {
        return SimOutcome::NotIsolated;
    }
    let peer = ipcache_lookup(maps, peer_ip);
    if peer.identity == identity::HOST {
        return SimOutcome::Host;
    }
    if ep.addresses.contains(&peer_ip) {
        return SimOutcome::SelfTraffic;
    }
    let probe = |id| policy_probe(maps, ep.id, id, direction, protocol.number(), port);
    probe(peer.identity)
        .or_else(|| {
            (peer.cidr_identity != identity::ANY)
                .then(|| probe(peer.cidr_identity))
                .flatten()
        })
        .or_else(|| probe(identity::ANY))
        .map_or(SimOutcome::Denied, |v| SimOutcome::Allowed(v.rule))
}

/// Structural invariants of a compiled map set: canonical (masked) keys, non-zero rule
/// references that resolve, endpoint ids in range and unique, identities of the right kinds.
pub fn check_invariants(maps: &NodeMaps) {
    for net in maps.ipcache_v4.keys() {
        assert_eq!(net.ip(), net.network(), "unmasked IPCACHE_V4 key {net}");
    }
    for net in maps.ipcache_v6.keys() {
        assert_eq!(net.ip(), net.network(), "unmasked IPCACHE_V6 key {net}");
    }
    for (k, v) in maps.policy.iter() {
        assert!(k.first <= k.last, "empty POLICY range {k:?}");
        assert_ne!(v.rule, 0);
        assert!(
            maps.rules.contains_key(&v.rule),
            "rule {} not registered",
            v.rule
        );
        let ep = k.endpoint;
        assert!(
            maps.endpoints.values().any(|e| e.id == ep),
            "entry for unknown endpoint {ep}"
        );
        let peer = k.identity;
        assert!(
            peer == identity::ANY || peer >= identity::POD_MIN,
            "entry keyed on reserved identity {peer}"
        );
    }
    // Merged groups: disjoint ranges, same-rule neighbours fused, within a group's capacity.
    let mut group_sizes: BTreeMap<(u32, u32, Direction, u8), usize> = BTreeMap::new();
    let entries: Vec<_> = maps.policy.iter().collect();
    for pair in entries.windows(2) {
        let ((a, av), (b, bv)) = (pair[0], pair[1]);
        if (a.endpoint, a.identity, a.direction, a.protocol)
            == (b.endpoint, b.identity, b.direction, b.protocol)
        {
            assert!(a.last < b.first, "overlapping POLICY ranges {a:?} {b:?}");
            assert!(
                av.rule != bv.rule || a.last + 1 < b.first,
                "unmerged POLICY ranges {a:?} {b:?}"
            );
        }
    }
    for k in maps.policy.keys() {
        *group_sizes
            .entry((k.endpoint, k.identity, k.direction, k.protocol))
            .or_default() += 1;
    }
    for (group, n) in group_sizes {
        assert!(n <= POLICY_MAX_RANGES, "group {group:?} has {n} ranges");
    }
    let used: std::collections::BTreeSet<u32> = maps.policy.values().map(|v| v.rule).collect();
    assert_eq!(
        used,
        maps.rules.keys().copied().collect(),
        "stale rule references"
    );
    let mut ids: Vec<u32> = maps.endpoints.values().map(|e| e.id).collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate endpoint ids");
    assert!(ids.iter().all(|id| (1..4096).contains(id)));
    for e in maps.endpoints.values() {
        assert!((identity::POD_MIN..identity::CIDR_MIN).contains(&e.identity));
    }
    for v in maps.ipcache_v4.values().chain(maps.ipcache_v6.values()) {
        assert!(v.cidr_identity == identity::ANY || v.cidr_identity >= identity::CIDR_MIN);
        assert!(v.identity != identity::ANY);
    }
}

/// Every node's compiled maps.
pub struct Compiled {
    pub nodes: BTreeMap<String, NodeMaps>,
}

impl Compiled {
    pub fn new(cluster: &Cluster, nodes: &[&str]) -> Self {
        let nodes = nodes
            .iter()
            .map(|n| {
                let out = Compiler::new().compile(cluster, &node_context(cluster, n));
                check_invariants(&out.maps);
                ((*n).to_owned(), out.maps)
            })
            .collect();
        Compiled { nodes }
    }

    /// The maps and endpoint holding pod `key`, if it is an endpoint anywhere.
    pub fn endpoint(&self, key: &ObjectKey) -> Option<(&NodeMaps, &EndpointEntry)> {
        self.nodes
            .values()
            .find_map(|m| m.endpoints.get(key).map(|e| (m, e)))
    }

    fn direction(
        &self,
        subject: &Peer,
        peer: &Peer,
        direction: Direction,
        flow: &Flow,
    ) -> Option<SimOutcome> {
        let Peer::Pod { pod, .. } = subject else {
            return None;
        };
        let (maps, ep) = self.endpoint(pod)?;
        if flow.has_v4_mapped_address() {
            return Some(simulate_v4_mapped(ep, direction));
        }
        Some(simulate(
            maps,
            ep,
            direction,
            peer.ip().expect("simulated flows are between addresses"),
            flow.protocol,
            flow.port,
        ))
    }

    /// The dataplane's verdict per direction (`None`: the subject is not an endpoint anywhere).
    pub fn verdict(&self, flow: &Flow) -> (Option<SimOutcome>, Option<SimOutcome>) {
        (
            self.direction(&flow.src, &flow.dst, Direction::Egress, flow),
            self.direction(&flow.dst, &flow.src, Direction::Ingress, flow),
        )
    }

    pub fn allowed(&self, flow: &Flow) -> bool {
        let (e, i) = self.verdict(flow);
        e.is_none_or(SimOutcome::allowed) && i.is_none_or(SimOutcome::allowed)
    }
}

/// Asserts that the dataplane outcome of one direction agrees with the evaluator's, including the
/// deciding rule when a POLICY entry allowed the flow.
fn agree(
    sim: Option<SimOutcome>,
    ev: &evaluator::DirectionVerdict,
    rules: impl Fn(u32) -> Option<RuleRef>,
    what: &str,
) -> Result<(), String> {
    let ok = match (sim, ev.outcome) {
        (None, Outcome::NotPolicied) => true,
        (Some(SimOutcome::NotIsolated), Outcome::NotIsolated) => true,
        (Some(SimOutcome::Host), Outcome::Host) => true,
        (Some(SimOutcome::SelfTraffic), Outcome::SelfTraffic) => true,
        // The dataplane checks isolation first: exemptions of non-isolated pods look the same.
        (Some(SimOutcome::NotIsolated), Outcome::Host | Outcome::SelfTraffic) => true,
        (Some(SimOutcome::Allowed(rule)), Outcome::AllowedByPolicy) => {
            let r = rules(rule);
            r.as_ref().is_some_and(|r| ev.allowing.contains(r))
        }
        (Some(SimOutcome::Denied), Outcome::Denied) => true,
        (Some(SimOutcome::DeniedV4Mapped), Outcome::DeniedV4Mapped) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: dataplane {sim:?}, evaluator {ev:?}"))
    }
}

/// Checks dataplane ≡ evaluator on one flow, per direction.
pub fn check_flow(cluster: &Cluster, compiled: &Compiled, flow: &Flow) -> Result<(), String> {
    let verdict = evaluator::evaluate(cluster, flow);
    let (egress, ingress) = compiled.verdict(flow);
    let rules_of = |subject: &Peer| {
        let maps = match subject {
            Peer::Pod { pod, .. } => compiled.endpoint(pod).map(|(m, _)| m),
            Peer::Address(_) | Peer::PodWithoutAddress(_) => None,
        };
        move |id: u32| maps.and_then(|m| m.rules.get(&id).cloned())
    };
    agree(egress, &verdict.egress, rules_of(&flow.src), "egress")
        .and_then(|_| agree(ingress, &verdict.ingress, rules_of(&flow.dst), "ingress"))
        .map_err(|e| format!("{flow:?}: {e}"))?;
    let sim_allowed =
        egress.is_none_or(SimOutcome::allowed) && ingress.is_none_or(SimOutcome::allowed);
    if sim_allowed != verdict.allowed {
        return Err(format!(
            "{flow:?}: dataplane allowed={sim_allowed}, evaluator {verdict:?}"
        ));
    }
    Ok(())
}
