//! Ends of flows as users name them, and connectivity between many ends at once.
//!
//! Connectivity is computed by the reference evaluator, once per class of equivalent pods: pods of
//! one namespace with the same labels, the same container ports and the same membership in every
//! ipBlock of the policies get the same verdicts as source and as destination, so a cluster of
//! 50,000 pods made by a few thousand workloads costs a few thousand evaluations per peer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::IPBlock;

use crate::evaluator::{self, Evaluator, Flow, Peer, Protocol};
use crate::model::{Cluster, Labels, ObjectKey, PodInfo};

/// One end of a flow as the user named it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Pod(ObjectKey),
    Node(String),
    Address(IpAddr),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Pod(k) => write!(f, "{k}"),
            Target::Node(n) => write!(f, "node/{n}"),
            Target::Address(a) => write!(f, "{a}"),
        }
    }
}

/// Reads `NS/POD`, `node/NAME` or an address (a pod's address names that pod).
pub fn parse_target(cluster: &Cluster, text: &str) -> Result<Target, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(cluster
            .pods
            .iter()
            .find(|(_, p)| !p.host_network && p.ips.contains(&ip))
            .map_or(Target::Address(ip), |(k, _)| Target::Pod(k.clone())));
    }
    match text.split_once('/') {
        Some(("node", name)) if cluster.nodes.contains_key(name) => Ok(Target::Node(name.into())),
        Some(("node", name)) => Err(format!("node {name:?} is not in the state")),
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
            let key = ObjectKey::new(ns, name);
            if cluster.pods.contains_key(&key) {
                Ok(Target::Pod(key))
            } else {
                Err(format!("pod {key} is not in the state"))
            }
        }
        _ => Err(format!(
            "{text:?}: expected NAMESPACE/POD, node/NAME or an IP address"
        )),
    }
}

/// The evaluator's view of a target. Pods use their first address of `family` when they have one
/// (else their first address, else none); nodes their first address of the family.
pub fn peer(cluster: &Cluster, target: &Target, family: Option<IpFamily>) -> Result<Peer, String> {
    let pick = |ips: &[IpAddr]| {
        ips.iter()
            .find(|ip| family.is_none_or(|f| f.of(ip)))
            .or(ips.first())
            .copied()
    };
    match target {
        Target::Pod(key) => {
            let pod = &cluster.pods[key];
            Ok(match pick(&pod.ips) {
                Some(ip) => Peer::Pod {
                    pod: key.clone(),
                    ip,
                },
                None => Peer::PodWithoutAddress(key.clone()),
            })
        }
        Target::Node(name) => {
            let (ips, _) = crate::model::node_addresses(&cluster.nodes[name]);
            pick(&ips)
                .map(Peer::Address)
                .ok_or_else(|| format!("node {name} has no address in its status"))
        }
        Target::Address(ip) => Ok(Peer::Address(*ip)),
    }
}

/// An IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (IpFamily::V4, IpAddr::V4(_)) | (IpFamily::V6, IpAddr::V6(_))
        )
    }

    pub fn from_ip(ip: &IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }
}

/// The family a flow between two targets uses: that of the end that has only one.
pub fn family(cluster: &Cluster, a: &Target, b: &Target) -> Option<IpFamily> {
    let of = |t: &Target| match t {
        Target::Address(ip) => Some(IpFamily::from_ip(ip)),
        Target::Pod(k) => cluster.pods[k].ips.first().map(IpFamily::from_ip),
        Target::Node(_) => None,
    };
    of(a).or_else(|| of(b))
}

/// Every container port a pod declares (number and protocol), sorted, deduplicated.
pub fn declared_ports(pod: &PodInfo) -> Vec<(u16, Protocol)> {
    let set: BTreeSet<(u16, Protocol)> = pod
        .ports
        .iter()
        .filter(|p| p.port != 0)
        .map(|p| (p.port, p.protocol))
        .collect();
    set.into_iter().collect()
}

/// The verdict for a new connection between two targets.
pub fn verdict(
    ev: &Evaluator<'_>,
    from: &Target,
    to: &Target,
    port: u16,
    protocol: Protocol,
) -> Result<evaluator::Verdict, String> {
    let cluster = ev.cluster();
    let fam = family(cluster, from, to);
    let flow = Flow {
        src: peer(cluster, from, fam)?,
        dst: peer(cluster, to, fam)?,
        protocol,
        port,
    };
    Ok(ev.evaluate(&flow))
}

/// Every ipBlock of every policy.
pub fn ip_blocks(cluster: &Cluster) -> Vec<&IPBlock> {
    let mut out = Vec::new();
    for np in cluster.policies.values() {
        let Some(spec) = &np.spec else { continue };
        let peers = spec
            .ingress
            .iter()
            .flatten()
            .flat_map(|r| r.from.iter().flatten())
            .chain(
                spec.egress
                    .iter()
                    .flatten()
                    .flat_map(|r| r.to.iter().flatten()),
            );
        out.extend(peers.filter_map(|p| p.ip_block.as_ref()));
    }
    out.sort_by(|a, b| (&a.cidr, &a.except).cmp(&(&b.cidr, &b.except)));
    out.dedup();
    out
}

/// The pods that take part in flows (not hostNetwork, not terminated), by class.
pub struct Classes<'c> {
    /// Class index → its pods, the first being the representative.
    pub members: Vec<Vec<&'c ObjectKey>>,
    pub of: BTreeMap<&'c ObjectKey, usize>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct ClassKey<'c> {
    namespace: &'c str,
    labels: &'c Labels,
    ports: Vec<(&'c str, Protocol, u16)>,
    blocks: Vec<bool>,
    has_address: bool,
}

impl<'c> Classes<'c> {
    /// Classes of the given pods, with ipBlock membership over `blocks` (pass the blocks of every
    /// state being compared, so classes are the same in each).
    pub fn new(
        cluster: &'c Cluster,
        pods: impl IntoIterator<Item = &'c ObjectKey>,
        blocks: &[&IPBlock],
    ) -> Self {
        let ev = Evaluator::new(cluster);
        let mut index: BTreeMap<ClassKey<'c>, usize> = BTreeMap::new();
        let mut members: Vec<Vec<&'c ObjectKey>> = Vec::new();
        let mut of = BTreeMap::new();
        for key in pods {
            let pod = &cluster.pods[key];
            if pod.host_network || pod.terminated {
                continue;
            }
            let ip = pod.ips.first();
            let class = ClassKey {
                namespace: &key.namespace,
                labels: &pod.labels,
                ports: pod
                    .ports
                    .iter()
                    .map(|p| (&*p.name, p.protocol, p.port))
                    .collect(),
                blocks: blocks
                    .iter()
                    .map(|b| ip.is_some_and(|ip| ev.block_contains(b, *ip)))
                    .collect(),
                has_address: ip.is_some(),
            };
            let next = members.len();
            let i = *index.entry(class).or_insert(next);
            if i == next {
                members.push(Vec::new());
            }
            members[i].push(key);
            of.insert(key, i);
        }
        Classes { members, of }
    }
}

/// One cell of a connectivity matrix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    pub allowed: bool,
}

/// Verdicts between class representatives, per destination port: `(src class, dst class, port,
/// protocol) → allowed`, for the class pairs `wanted` accepts. A class never reaches itself
/// unless it has a second pod (a pod's traffic to itself is always allowed and not a flow).
pub fn class_verdicts(
    ev: &Evaluator<'_>,
    classes: &Classes<'_>,
    wanted: impl Fn(usize, usize) -> bool,
) -> BTreeMap<(usize, usize, u16, Protocol), bool> {
    let cluster = ev.cluster();
    let mut out = BTreeMap::new();
    for (s, src) in classes.members.iter().enumerate() {
        for (d, dst) in classes.members.iter().enumerate() {
            if !wanted(s, d) {
                continue;
            }
            let Some(&dst_key) = (if s == d { dst.get(1) } else { dst.first() }) else {
                continue;
            };
            let (from, to) = (Target::Pod(src[0].clone()), Target::Pod(dst_key.clone()));
            for (port, protocol) in declared_ports(&cluster.pods[dst_key]) {
                let allowed = verdict(ev, &from, &to, port, protocol)
                    .map(|v| v.allowed)
                    .unwrap_or(false);
                out.insert((s, d, port, protocol), allowed);
            }
        }
    }
    out
}
