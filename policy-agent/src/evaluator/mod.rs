//! Reference evaluator: the NetworkPolicy v1 verdict for one flow, computed straight from the
//! Kubernetes objects and the specification (`semantics.md`), sharing nothing with the compiler but
//! the reading of object fields in [`crate::model`]. It is the oracle the compiler is tested
//! against.
//!
//! Rules, per direction (egress: subject = source, peer = destination; ingress: the reverse):
//!
//! 1. A subject that is not a pod (a node, the world, a hostNetwork or terminated pod) is not
//!    policed.
//! 2. A pod reaching itself, and traffic between a pod and its own node's addresses (kubelet
//!    probes; hostNetwork pods on that node), is always allowed.
//! 3. The subject is isolated iff some policy of its namespace selects it with the direction in its
//!    (defaulted) `policyTypes`; a non-isolated direction allows everything.
//! 4. Isolated: allowed iff some rule of some selecting policy matches the peer and the port.
//!
//! Policies the API server would reject (see [`policy_is_valid`]) still isolate — in the
//! directions they declare, every direction when `policyTypes` itself is invalid, every pod of the
//! namespace when `podSelector` is invalid — and allow nothing.
//!
//! ipBlocks follow Go's `net.ParseCIDR` / `IPNet.Contains` (host bits masked; an IPv4-mapped IPv6
//! CIDR of length ≥ 96 is an IPv4 CIDR); peer addresses are taken literally (an IPv6 address is
//! never in an IPv4 block).

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use policy_common::Direction;

use crate::compiler::RuleRef;
pub use crate::model::Protocol;
use crate::model::{self, Cluster, Labels, ObjectKey, PodInfo};

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A pod, using one of its addresses.
    Pod { pod: ObjectKey, ip: IpAddr },
    /// Any address that is not a pod's: a node, a hostNetwork pod, the world.
    Address(IpAddr),
}

impl Peer {
    pub fn ip(&self) -> IpAddr {
        match self {
            Peer::Pod { ip, .. } | Peer::Address(ip) => *ip,
        }
    }
}

/// A new connection as the destination sees it: after Service translation (the backend pod and its
/// target port).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: Peer,
    pub dst: Peer,
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
}

/// How one direction was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The subject is not a policed pod.
    NotPolicied,
    /// The subject pod reaches itself.
    SelfTraffic,
    /// The peer is the subject's own node.
    Host,
    /// No policy isolates the subject in this direction.
    NotIsolated,
    AllowedByPolicy,
    Denied,
}

impl Outcome {
    pub fn allowed(self) -> bool {
        self != Outcome::Denied
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionVerdict {
    pub outcome: Outcome,
    /// Every policy isolating the subject in this direction (rejected ones included).
    pub isolating: Vec<ObjectKey>,
    /// Every rule allowing the flow (only when the outcome is `AllowedByPolicy`).
    pub allowing: Vec<RuleRef>,
}

impl DirectionVerdict {
    fn plain(outcome: Outcome) -> Self {
        Self {
            outcome,
            isolating: Vec::new(),
            allowing: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Egress of the source AND ingress of the destination.
    pub allowed: bool,
    pub egress: DirectionVerdict,
    pub ingress: DirectionVerdict,
}

/// A rule's peers (`from` / `to`) and ports.
type RuleParts<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// One end of a flow, resolved against the cluster.
enum Party<'c> {
    Pod {
        key: &'c ObjectKey,
        pod: &'c PodInfo,
        ip: IpAddr,
    },
    Address(IpAddr),
}

impl Party<'_> {
    fn ip(&self) -> IpAddr {
        match self {
            Party::Pod { ip, .. } | Party::Address(ip) => *ip,
        }
    }

    fn pod(&self) -> Option<&PodInfo> {
        match self {
            Party::Pod { pod, .. } => Some(pod),
            Party::Address(_) => None,
        }
    }
}

fn party<'c>(cluster: &'c Cluster, peer: &Peer) -> Party<'c> {
    match peer {
        Peer::Pod { pod, ip } => match cluster.pods.get_key_value(pod) {
            // hostNetwork pods are node traffic; terminated pods have no traffic of their own.
            Some((key, p)) if !p.host_network && !p.terminated => Party::Pod {
                key,
                pod: p,
                ip: *ip,
            },
            _ => Party::Address(*ip),
        },
        Peer::Address(ip) => Party::Address(*ip),
    }
}

/// The verdict for a new connection.
pub fn evaluate(cluster: &Cluster, flow: &Flow) -> Verdict {
    let src = party(cluster, &flow.src);
    let dst = party(cluster, &flow.dst);
    let egress = judge(cluster, &src, &dst, Direction::Egress, flow);
    let ingress = judge(cluster, &dst, &src, Direction::Ingress, flow);
    Verdict {
        allowed: egress.outcome.allowed() && ingress.outcome.allowed(),
        egress,
        ingress,
    }
}

fn judge(
    cluster: &Cluster,
    subject: &Party<'_>,
    peer: &Party<'_>,
    direction: Direction,
    flow: &Flow,
) -> DirectionVerdict {
    let Party::Pod {
        key: subject_key,
        pod: subject_pod,
        ..
    } = *subject
    else {
        return DirectionVerdict::plain(Outcome::NotPolicied);
    };
    if let Party::Pod { key, .. } = peer
        && *key == subject_key
    {
        return DirectionVerdict::plain(Outcome::SelfTraffic);
    }
    if let Party::Address(ip) = peer
        && let Some(node) = subject_pod.node_name.as_deref()
        && model::node_owned_addresses(cluster, node).contains(ip)
    {
        return DirectionVerdict::plain(Outcome::Host);
    }
    // The destination pod, whose container ports named ports refer to.
    let destination = match direction {
        Direction::Ingress => Some(subject_pod),
        Direction::Egress => peer.pod(),
    };
    let subject_labels = &subject_pod.labels;
    let mut verdict = DirectionVerdict::plain(Outcome::NotIsolated);
    let in_namespace = cluster
        .policies
        .iter()
        .filter(|(k, _)| k.namespace == subject_key.namespace);
    for (key, np) in in_namespace {
        let default_spec = NetworkPolicySpec::default();
        let spec = np.spec.as_ref().unwrap_or(&default_spec);
        let selects = match &spec.pod_selector {
            None => true,
            Some(sel) if selector_is_valid(sel) => selector_matches(sel, subject_labels),
            Some(_) => true,
        };
        if !selects || !declared_types(spec).contains(&direction) {
            continue;
        }
        verdict.isolating.push(key.clone());
        if !policy_is_valid(np) {
            continue;
        }
        let rules: Vec<RuleParts<'_>> = match direction {
            Direction::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Direction::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        for (index, (peers, ports)) in rules.into_iter().enumerate() {
            let ports_ok = ports.is_none_or(|ports| {
                ports.is_empty() || ports.iter().any(|p| port_matches(p, flow, destination))
            });
            let peers_ok = peers.is_none_or(|peers| {
                peers.is_empty()
                    || peers
                        .iter()
                        .any(|p| peer_matches(cluster, &key.namespace, p, peer))
            });
            if ports_ok && peers_ok {
                verdict.allowing.push(RuleRef {
                    policy: key.clone(),
                    direction,
                    rule_index: index as u32,
                });
            }
        }
    }
    verdict.outcome = if verdict.isolating.is_empty() {
        Outcome::NotIsolated
    } else if verdict.allowing.is_empty() {
        Outcome::Denied
    } else {
        Outcome::AllowedByPolicy
    };
    verdict
}

/// `policyTypes`, defaulted: absent or empty ⇒ Ingress, plus Egress iff `spec.egress` is
/// non-empty. An unknown type makes the declaration unusable: both directions (fail closed).
fn declared_types(spec: &NetworkPolicySpec) -> Vec<Direction> {
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            if types.iter().all(|t| t == "Ingress" || t == "Egress") {
                let mut out = Vec::new();
                if types.iter().any(|t| t == "Ingress") {
                    out.push(Direction::Ingress);
                }
                if types.iter().any(|t| t == "Egress") {
                    out.push(Direction::Egress);
                }
                out
            } else {
                vec![Direction::Ingress, Direction::Egress]
            }
        }
        _ => {
            let mut out = vec![Direction::Ingress];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                out.push(Direction::Egress);
            }
            out
        }
    }
}

fn port_matches(p: &NetworkPolicyPort, flow: &Flow, destination: Option<&PodInfo>) -> bool {
    if p.protocol.as_deref().unwrap_or("TCP") != flow.protocol.as_str() {
        return false;
    }
    let port = i32::from(flow.port);
    match (&p.port, p.end_port) {
        (None, _) => true,
        (Some(IntOrString::Int(n)), None) => port == *n,
        (Some(IntOrString::Int(n)), Some(end)) => *n <= port && port <= end,
        // A named port: the destination pod must declare that name, with this number and this
        // protocol. Never matches a destination that is not a pod.
        (Some(IntOrString::String(name)), _) => destination.is_some_and(|pod| {
            pod.ports.iter().any(|cp| {
                &*cp.name == name.as_str() && cp.port == flow.port && cp.protocol == flow.protocol
            })
        }),
    }
}

fn peer_matches(
    cluster: &Cluster,
    policy_namespace: &str,
    rule_peer: &NetworkPolicyPeer,
    peer: &Party<'_>,
) -> bool {
    if let Some(block) = &rule_peer.ip_block {
        return block_contains(block, peer.ip());
    }
    // Pod peers only ever match pods.
    let Party::Pod { key, pod, .. } = peer else {
        return false;
    };
    let namespace_ok = match &rule_peer.namespace_selector {
        None => key.namespace == policy_namespace,
        Some(sel) => selector_matches(sel, &model::namespace_labels(cluster, &key.namespace)),
    };
    let pod_ok = rule_peer
        .pod_selector
        .as_ref()
        .is_none_or(|sel| selector_matches(sel, &pod.labels));
    namespace_ok && pod_ok
}

fn selector_matches(sel: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && sel.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => !value.is_some_and(|v| values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

fn selector_is_valid(sel: &LabelSelector) -> bool {
    sel.match_expressions.iter().flatten().all(|e| {
        let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
        !e.key.is_empty()
            && match e.operator.as_str() {
                "In" | "NotIn" => has_values,
                "Exists" | "DoesNotExist" => !has_values,
                _ => false,
            }
    })
}

/// A parsed CIDR as Go's `net.IPNet`: network bytes (4 or 16) and prefix length, IPv4-mapped
/// networks turned into IPv4 as `IPNet.Contains` treats them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cidr {
    network: Vec<u8>,
    len: u32,
}

fn parse_cidr(s: &str) -> Option<Cidr> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || len.len() > 4 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u32 = len.parse().ok()?;
    let ip: IpAddr = addr.parse().ok()?;
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    if len as usize > bytes.len() * 8 {
        return None;
    }
    let network: Vec<u8> = bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let bits = (len as usize).saturating_sub(i * 8).min(8);
            if bits == 0 {
                0
            } else {
                b & (0xffu8 << (8 - bits))
            }
        })
        .collect();
    let v4_mapped = network.len() == 16
        && network[..10].iter().all(|b| *b == 0)
        && network[10] == 0xff
        && network[11] == 0xff;
    Some(if v4_mapped {
        Cidr {
            network: network[12..].to_vec(),
            len: len - 96,
        }
    } else {
        Cidr { network, len }
    })
}

fn cidr_contains(c: &Cidr, ip: IpAddr) -> bool {
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    bytes.len() == c.network.len()
        && (0..c.len as usize).all(|bit| {
            let mask = 0x80u8 >> (bit % 8);
            bytes[bit / 8] & mask == c.network[bit / 8] & mask
        })
}

fn block_contains(block: &IPBlock, ip: IpAddr) -> bool {
    parse_cidr(&block.cidr).is_some_and(|c| cidr_contains(&c, ip))
        && !block
            .except
            .iter()
            .flatten()
            .any(|e| parse_cidr(e).is_some_and(|e| cidr_contains(&e, ip)))
}

fn port_name_is_valid(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !b.windows(2).any(|w| w == b"--")
}

fn port_is_valid(p: &NetworkPolicyPort) -> bool {
    let in_range = |n: i32| (1..=65535).contains(&n);
    let protocol_ok = matches!(p.protocol.as_deref(), None | Some("TCP" | "UDP" | "SCTP"));
    let port_ok = match (&p.port, p.end_port) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some(IntOrString::Int(n)), None) => in_range(*n),
        (Some(IntOrString::Int(n)), Some(e)) => in_range(*n) && in_range(e) && e >= *n,
        (Some(IntOrString::String(name)), None) => port_name_is_valid(name),
        (Some(IntOrString::String(_)), Some(_)) => false,
    };
    protocol_ok && port_ok
}

fn block_is_valid(block: &IPBlock) -> bool {
    let Some(cidr) = parse_cidr(&block.cidr) else {
        return false;
    };
    block.except.iter().flatten().all(|e| {
        parse_cidr(e).is_some_and(|e| {
            e.network.len() == cidr.network.len() && e.len > cidr.len && {
                let first = match e.network.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(e.network.as_slice()).unwrap()),
                    _ => IpAddr::from(<[u8; 16]>::try_from(e.network.as_slice()).unwrap()),
                };
                cidr_contains(&cidr, first)
            }
        })
    })
}

fn rule_peer_is_valid(p: &NetworkPolicyPeer) -> bool {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (None, None, None) => false,
        (Some(b), None, None) => block_is_valid(b),
        (Some(_), _, _) => false,
        (None, ns, pods) => ns.iter().chain(pods.iter()).all(selector_is_valid),
    }
}

/// Whether the API server would accept the policy.
pub fn policy_is_valid(np: &NetworkPolicy) -> bool {
    let Some(spec) = np.spec.as_ref() else {
        return true;
    };
    let types_ok = spec
        .policy_types
        .iter()
        .flatten()
        .all(|t| t == "Ingress" || t == "Egress");
    let selector_ok = spec.pod_selector.as_ref().is_none_or(selector_is_valid);
    let ingress_ok = spec.ingress.iter().flatten().all(|r| {
        r.ports.iter().flatten().all(port_is_valid)
            && r.from.iter().flatten().all(rule_peer_is_valid)
    });
    let egress_ok = spec.egress.iter().flatten().all(|r| {
        r.ports.iter().flatten().all(port_is_valid) && r.to.iter().flatten().all(rule_peer_is_valid)
    });
    types_ok && selector_ok && ingress_ok && egress_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_follows_go() {
        let c = parse_cidr("10.244.1.7/4").unwrap();
        assert_eq!(
            c,
            Cidr {
                network: vec![0, 0, 0, 0],
                len: 4
            }
        );
        assert!(cidr_contains(&c, "10.244.2.3".parse().unwrap()));
        assert!(!cidr_contains(&c, "16.0.0.1".parse().unwrap()));
        assert!(!cidr_contains(&c, "::1".parse().unwrap()));
        let m = parse_cidr("::ffff:10.0.0.0/104").unwrap();
        assert!(cidr_contains(&m, "10.1.2.3".parse().unwrap()));
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("10.0.0.0").is_none());
    }

    #[test]
    fn not_in_matches_absent_keys() {
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]
        }))
        .unwrap();
        assert!(selector_matches(&sel, &Labels::new()));
        assert!(!selector_matches(
            &sel,
            &[("pod".into(), "a".into())].into()
        ));
        assert!(selector_matches(&sel, &[("pod".into(), "b".into())].into()));
    }
}
