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

/// Reads `NS/POD`, `node/NAME` or an address. Any of a pod's addresses (`status.podIPs`, either
/// family) names that pod, as [`crate::model::pods_by_address`] resolves it.
pub fn parse_target(cluster: &Cluster, text: &str) -> Result<Target, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(cluster
            .pods
            .iter()
            .find(|(_, p)| p.owns_addresses() && p.ips.contains(&ip))
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
/// (else their first address, else none); nodes their first address of the family (else their
/// first).
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

/// The families of a target's addresses, in the order of its first address of each: an
/// address's own, a pod's (`status.podIPs`) or a node's. Empty for a pod without address.
fn families(cluster: &Cluster, t: &Target) -> Vec<IpFamily> {
    let mut out: Vec<IpFamily> = Vec::with_capacity(2);
    let mut add = |ips: &[IpAddr]| {
        for f in ips.iter().map(IpFamily::from_ip) {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    };
    match t {
        Target::Address(ip) => add(&[*ip]),
        Target::Pod(k) => add(&cluster.pods[k].ips),
        Target::Node(n) => add(&crate::model::node_addresses(&cluster.nodes[n]).0),
    }
    out
}

/// The family a flow between two targets uses: the first family of `a` that `b` has too (a pod
/// without address goes with any), else `a`'s first, else `b`'s. A dual-stack pod reaching an
/// IPv6 address therefore uses its IPv6 address, and two dual-stack pods the first family of
/// the source.
pub fn family(cluster: &Cluster, a: &Target, b: &Target) -> Option<IpFamily> {
    let (fa, fb) = (families(cluster, a), families(cluster, b));
    fa.iter()
        .find(|f| fb.is_empty() || fb.contains(f))
        .or(fa.first())
        .or(fb.first())
        .copied()
}

/// The evaluator's view of both ends of a flow between two targets, in the [`family`] they
/// share.
pub fn ends(cluster: &Cluster, from: &Target, to: &Target) -> Result<(Peer, Peer), String> {
    let fam = family(cluster, from, to);
    Ok((peer(cluster, from, fam)?, peer(cluster, to, fam)?))
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
    let (src, dst) = ends(ev.cluster(), from, to)?;
    Ok(ev.evaluate(&Flow {
        src,
        dst,
        protocol,
        port,
    }))
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
    /// Per family the pod has an address of, in [`families`] order: the membership of its first
    /// address of that family (the one [`peer`] uses) in each block. Empty: no address.
    blocks: Vec<(IpFamily, Vec<bool>)>,
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
            let mut by_family: Vec<(IpFamily, Vec<bool>)> = Vec::with_capacity(2);
            for ip in pod.ips.iter() {
                let family = IpFamily::from_ip(ip);
                if by_family.iter().all(|(f, _)| *f != family) {
                    let member = blocks.iter().map(|b| ev.block_contains(b, *ip)).collect();
                    by_family.push((family, member));
                }
            }
            let class = ClassKey {
                namespace: &key.namespace,
                labels: &pod.labels,
                ports: pod
                    .ports
                    .iter()
                    .map(|p| (&*p.name, p.protocol, p.port))
                    .collect(),
                blocks: by_family,
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::fixtures::{add_pod, ip, node, pod, policy};

    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        let dual = pod(
            "n1",
            json!({"app": "a"}),
            &["10.244.1.5", "fd00:10:244:1::5"],
        );
        add_pod(&mut c, "x", "dual", dual);
        add_pod(
            &mut c,
            "x",
            "v6",
            pod("n1", json!({}), &["fd00:10:244:1::6"]),
        );
        let mut gone = pod("n1", json!({}), &["fd00:10:244:1::7"]);
        gone.terminated = true;
        add_pod(&mut c, "a", "gone", gone);
        add_pod(
            &mut c,
            "x",
            "now",
            pod("n1", json!({}), &["fd00:10:244:1::7"]),
        );
        let addresses = [("InternalIP", "172.18.0.2"), ("InternalIP", "fc00::2")];
        c.nodes.insert("n1".into(), node("n1", &addresses));
        c
    }

    #[test]
    fn every_address_of_a_pod_names_it() {
        let c = cluster();
        let dual = Target::Pod(ObjectKey::new("x", "dual"));
        for text in ["10.244.1.5", "fd00:10:244:1::5", "x/dual"] {
            assert_eq!(parse_target(&c, text), Ok(dual.clone()), "{text}");
        }
        // The live pod holding an address, not a terminated one that held it.
        assert_eq!(
            parse_target(&c, "fd00:10:244:1::7"),
            Ok(Target::Pod(ObjectKey::new("x", "now")))
        );
        assert_eq!(
            parse_target(&c, "fd00:10:244:1::8"),
            Ok(Target::Address(ip("fd00:10:244:1::8")))
        );
    }

    #[test]
    fn both_ends_of_a_flow_use_one_family() {
        let c = cluster();
        let dual = Target::Pod(ObjectKey::new("x", "dual"));
        let v6 = Target::Pod(ObjectKey::new("x", "v6"));
        let node = Target::Node("n1".into());
        let ips = |a: &Target, b: &Target| {
            let (s, d) = ends(&c, a, b).unwrap();
            (s.ip().unwrap().to_string(), d.ip().unwrap().to_string())
        };
        let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        let world6 = Target::Address(ip("2001:db8::1"));
        assert_eq!(ips(&dual, &world6), pair("fd00:10:244:1::5", "2001:db8::1"));
        assert_eq!(ips(&world6, &dual), pair("2001:db8::1", "fd00:10:244:1::5"));
        assert_eq!(
            ips(&dual, &v6),
            pair("fd00:10:244:1::5", "fd00:10:244:1::6")
        );
        assert_eq!(
            ips(&v6, &dual),
            pair("fd00:10:244:1::6", "fd00:10:244:1::5")
        );
        // Both dual-stack: the source's first family.
        assert_eq!(ips(&node, &dual), pair("172.18.0.2", "10.244.1.5"));
        assert_eq!(ips(&node, &v6), pair("fc00::2", "fd00:10:244:1::6"));
        assert_eq!(family(&c, &dual, &node), Some(IpFamily::V4));
    }

    #[test]
    fn classes_tell_apart_pods_that_differ_in_their_ipv6_address_only() {
        let mut c = Cluster::default();
        let labels = json!({"app": "a"});
        let inside = &["10.244.1.5", "fd00:10:244:1::5"];
        let outside = &["10.244.1.6", "fd00:99::6"];
        let p = add_pod(&mut c, "x", "p", pod("n1", labels.clone(), inside));
        let q = add_pod(&mut c, "x", "q", pod("n1", labels.clone(), outside));
        let r = add_pod(&mut c, "x", "r", pod("n1", labels, inside));
        let spec = json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00:10:244::/48"}}]}]});
        c.policies
            .insert(ObjectKey::new("x", "np"), policy("x", "np", spec));
        let blocks = ip_blocks(&c);
        let classes = Classes::new(&c, c.pods.keys(), &blocks);
        assert_eq!(classes.members, [vec![&p, &r], vec![&q]]);
    }
}
