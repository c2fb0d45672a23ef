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
//!
//! An IPv6 flow with an IPv4-mapped address (`::ffff:a.b.c.d`) at either end is judged by
//! isolation alone, before rules 2–4: an isolated direction denies it
//! ([`Outcome::DeniedV4Mapped`]), whatever the rules say, and a direction that is not isolated
//! allows it. No IPv4 rule matches an IPv6 flow, no IPv6 host has such an address (RFC 4291
//! 2.5.5.2; Linux drops received IPv6 packets from one), and the dataplane, which stores IPv4
//! addresses in that form, never looks one up (`policy_common::Reason::DroppedV4Mapped`).

use std::collections::BTreeMap;
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
    /// A pod the state gives no address yet (not scheduled, or a workload's pod template): it
    /// matches pod selectors like any pod, and no ipBlock.
    PodWithoutAddress(ObjectKey),
    /// Any address that is not a pod's: a node, a hostNetwork pod, the world.
    Address(IpAddr),
}

impl Peer {
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Peer::Pod { ip, .. } | Peer::Address(ip) => Some(*ip),
            Peer::PodWithoutAddress(_) => None,
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
    /// An isolated direction of an IPv6 flow with an IPv4-mapped address at either end: no rule
    /// can allow it (see the module documentation).
    DeniedV4Mapped,
}

impl Outcome {
    pub fn allowed(self) -> bool {
        !matches!(self, Outcome::Denied | Outcome::DeniedV4Mapped)
    }
}

/// Whether an address is an IPv6 address in the IPv4-mapped range `::ffff:0:0/96`.
pub fn is_v4_mapped(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if a.to_ipv4_mapped().is_some())
}

impl Flow {
    /// Whether either end is at an IPv4-mapped IPv6 address ([`Outcome::DeniedV4Mapped`]).
    pub fn has_v4_mapped_address(&self) -> bool {
        [&self.src, &self.dst]
            .iter()
            .any(|p| p.ip().is_some_and(|ip| is_v4_mapped(&ip)))
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
pub type RuleParts<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// One end of a flow, resolved against the cluster.
enum Party<'c> {
    Pod {
        key: &'c ObjectKey,
        pod: &'c PodInfo,
        ip: Option<IpAddr>,
    },
    /// Not a policed pod; `None` only for a pod without address that is not one (hostNetwork,
    /// terminated or unknown): it matches nothing.
    Address(Option<IpAddr>),
}

impl Party<'_> {
    fn ip(&self) -> Option<IpAddr> {
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
    let (pod, ip) = match peer {
        Peer::Pod { pod, ip } => (pod, Some(*ip)),
        Peer::PodWithoutAddress(pod) => (pod, None),
        Peer::Address(ip) => return Party::Address(Some(*ip)),
    };
    match cluster.pods.get_key_value(pod) {
        // hostNetwork pods are node traffic; terminated pods have no traffic of their own.
        Some((key, p)) if p.owns_addresses() => Party::Pod { key, pod: p, ip },
        _ => Party::Address(ip),
    }
}

/// The verdict for a new connection.
pub fn evaluate(cluster: &Cluster, flow: &Flow) -> Verdict {
    Evaluator::new(cluster).evaluate(flow)
}

/// The evaluator over one cluster state, for callers that judge many flows of the same state:
/// what the rules read of the whole state (the addresses each node owns, every namespace's
/// labels) is derived once, on first use, instead of once per flow. Same semantics as
/// [`evaluate`] and [`trace`], which build one per call.
pub struct Evaluator<'c> {
    cluster: &'c Cluster,
    /// Node name → the addresses it owns ([`model::node_owned_addresses`]).
    hosts: std::sync::OnceLock<BTreeMap<String, Vec<IpAddr>>>,
    /// Namespace name → its labels ([`model::namespace_labels`]), for the namespaces of the
    /// state's pods.
    namespaces: std::sync::OnceLock<BTreeMap<String, Labels>>,
    /// Every CIDR the policies' ipBlocks write (`cidr` and `except`), parsed.
    cidrs: std::sync::OnceLock<std::collections::HashMap<String, Option<Cidr>>>,
}

impl<'c> Evaluator<'c> {
    pub fn new(cluster: &'c Cluster) -> Self {
        Evaluator {
            cluster,
            hosts: std::sync::OnceLock::new(),
            namespaces: std::sync::OnceLock::new(),
            cidrs: std::sync::OnceLock::new(),
        }
    }

    pub fn cluster(&self) -> &'c Cluster {
        self.cluster
    }

    /// The verdict for a new connection.
    pub fn evaluate(&self, flow: &Flow) -> Verdict {
        let src = party(self.cluster, &flow.src);
        let dst = party(self.cluster, &flow.dst);
        let egress = judge(self, &src, &dst, Direction::Egress, flow);
        let ingress = judge(self, &dst, &src, Direction::Ingress, flow);
        Verdict {
            allowed: egress.outcome.allowed() && ingress.outcome.allowed(),
            egress,
            ingress,
        }
    }

    /// One direction of [`Evaluator::evaluate`]: the source's egress or the destination's
    /// ingress, the other one not computed.
    pub fn evaluate_direction(&self, flow: &Flow, direction: Direction) -> DirectionVerdict {
        let src = party(self.cluster, &flow.src);
        let dst = party(self.cluster, &flow.dst);
        match direction {
            Direction::Egress => judge(self, &src, &dst, Direction::Egress, flow),
            Direction::Ingress => judge(self, &dst, &src, Direction::Ingress, flow),
        }
    }

    fn node_owns(&self, node: &str, ip: &IpAddr) -> bool {
        let hosts = self
            .hosts
            .get_or_init(|| model::nodes_owned_addresses(self.cluster));
        hosts.get(node).is_some_and(|a| a.contains(ip))
    }

    /// The labels of the namespace of a pod of this state.
    fn pod_namespace_labels(&self, namespace: &str) -> &Labels {
        let known = self.namespaces.get_or_init(|| {
            let names: std::collections::BTreeSet<&str> = self
                .cluster
                .pods
                .keys()
                .map(|k| k.namespace.as_str())
                .collect();
            names
                .into_iter()
                .map(|n| (n.to_owned(), model::namespace_labels(self.cluster, n)))
                .collect()
        });
        &known[namespace]
    }

    /// [`block_contains`], with the CIDRs of this state's policies parsed once.
    pub fn block_contains(&self, block: &IPBlock, ip: IpAddr) -> bool {
        block_miss(block, Some(ip), &|c: &str, ip| self.cidr_contains(c, ip)).is_none()
    }

    fn cidr_contains(&self, cidr: &str, ip: IpAddr) -> bool {
        let parsed = self.cidrs.get_or_init(|| {
            let mut all = std::collections::HashMap::new();
            for np in self.cluster.policies.values() {
                let Some(spec) = &np.spec else { continue };
                let peers = spec
                    .ingress
                    .iter()
                    .flatten()
                    .flat_map(|r| r.from.iter().flatten());
                let peers = peers.chain(
                    spec.egress
                        .iter()
                        .flatten()
                        .flat_map(|r| r.to.iter().flatten()),
                );
                for block in peers.filter_map(|p| p.ip_block.as_ref()) {
                    for c in std::iter::once(&block.cidr).chain(block.except.iter().flatten()) {
                        all.entry(c.clone()).or_insert_with(|| parse_cidr(c));
                    }
                }
            }
            all
        });
        match parsed.get(cidr) {
            Some(c) => c.as_ref().is_some_and(|c| cidr_contains(c, ip)),
            None => written_cidr_contains(cidr, ip),
        }
    }
}

fn judge(
    ev: &Evaluator<'_>,
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
    let namespace = subject_key.namespace.as_str();
    if flow.has_v4_mapped_address() {
        let mut verdict = DirectionVerdict::plain(Outcome::NotIsolated);
        verdict.isolating = selecting(ev.cluster, namespace, &subject_pod.labels, direction)
            .map(|(key, _)| key.clone())
            .collect();
        if !verdict.isolating.is_empty() {
            verdict.outcome = Outcome::DeniedV4Mapped;
        }
        return verdict;
    }
    if let Party::Pod { key, .. } = peer
        && *key == subject_key
    {
        return DirectionVerdict::plain(Outcome::SelfTraffic);
    }
    if let Party::Address(Some(ip)) = peer
        && let Some(node) = subject_pod.node_name.as_deref()
        && ev.node_owns(node, ip)
    {
        return DirectionVerdict::plain(Outcome::Host);
    }
    // The destination pod, whose container ports named ports refer to.
    let destination = match direction {
        Direction::Ingress => Some(subject_pod),
        Direction::Egress => peer.pod(),
    };
    let mut verdict = DirectionVerdict::plain(Outcome::NotIsolated);
    for (key, rules) in selecting(ev.cluster, namespace, &subject_pod.labels, direction) {
        verdict.isolating.push(key.clone());
        let Some(rules) = rules else { continue };
        for (index, (peers, ports)) in rules.into_iter().enumerate() {
            let ports_ok = ports.is_none_or(|ports| {
                ports.is_empty()
                    || ports
                        .iter()
                        .any(|p| port_miss(p, flow, destination).is_none())
            });
            let peers_ok = ports_ok
                && peers.is_none_or(|peers| {
                    peers.is_empty()
                        || peers
                            .iter()
                            .any(|p| peer_misses(ev, &key.namespace, p, peer).next().is_none())
                });
            if peers_ok {
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

/// The policies of the subject's namespace that select it with `direction` in their
/// (defaulted) `policyTypes`, in key order, each with its rules for that direction — `None` for a
/// policy the API server would reject (it isolates and allows nothing).
fn selecting<'c>(
    cluster: &'c Cluster,
    namespace: &'c str,
    labels: &'c Labels,
    direction: Direction,
) -> impl Iterator<Item = (&'c ObjectKey, Option<Vec<RuleParts<'c>>>)> {
    let start = ObjectKey::new(namespace, String::new());
    cluster
        .policies
        .range(start..)
        .take_while(move |(k, _)| k.namespace == namespace)
        .filter_map(move |(key, np)| {
            static DEFAULT_SPEC: std::sync::LazyLock<NetworkPolicySpec> =
                std::sync::LazyLock::new(NetworkPolicySpec::default);
            let spec = np.spec.as_ref().unwrap_or(&DEFAULT_SPEC);
            let selects = match &spec.pod_selector {
                None => true,
                Some(sel) if selector_is_valid(sel) => selector_matches(sel, labels),
                Some(_) => true,
            };
            if !selects || !declared_types(spec).contains(&direction) {
                return None;
            }
            if !policy_is_valid(np) {
                return Some((key, None));
            }
            Some((key, Some(rule_parts(spec, direction))))
        })
}

/// The rules of one direction: each rule's peers (`from` / `to`) and ports, in order.
pub fn rule_parts(spec: &NetworkPolicySpec, direction: Direction) -> Vec<RuleParts<'_>> {
    match direction {
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
    }
}

/// One rule of a valid policy isolating a flow's subject, matched against the flow: what
/// `explain` shows, computed by the same functions as [`evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleTrace {
    pub rule: RuleRef,
    /// Per `from` / `to` peer, why it does not match (empty: it matches). `None`: the rule has no
    /// peers, so every peer matches.
    pub peers: Option<Vec<Vec<PeerMiss>>>,
    /// Per `ports[]` entry, why it does not match (`None`: it matches). `None` for the whole: the
    /// rule has no ports, so every port matches.
    pub ports: Option<Vec<Option<PortMiss>>>,
}

impl RuleTrace {
    pub fn peers_match(&self) -> bool {
        self.peers
            .as_ref()
            .is_none_or(|p| p.is_empty() || p.iter().any(Vec::is_empty))
    }

    pub fn ports_match(&self) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|p| p.is_empty() || p.iter().any(Option::is_none))
    }

    /// The rule allows the flow.
    pub fn matches(&self) -> bool {
        self.peers_match() && self.ports_match()
    }

    /// How far the rule is from allowing the flow: the misses of its closest peer, plus one if no
    /// port entry matches.
    pub fn distance(&self) -> usize {
        let peers = self
            .peers
            .as_ref()
            .filter(|p| !p.is_empty())
            .map_or(0, |p| p.iter().map(Vec::len).min().unwrap_or(0));
        peers + usize::from(!self.ports_match())
    }
}

/// Every rule of every valid policy isolating the subject of `direction` (the source for egress,
/// the destination for ingress), traced against the flow, in policy and rule order. Empty when
/// the subject is not isolated in that direction or the flow is not judged by policy (self, host
/// and non-pod traffic).
pub fn trace(cluster: &Cluster, flow: &Flow, direction: Direction) -> Vec<RuleTrace> {
    Evaluator::new(cluster).trace(flow, direction)
}

impl Evaluator<'_> {
    /// [`trace`] over this evaluator's state.
    pub fn trace(&self, flow: &Flow, direction: Direction) -> Vec<RuleTrace> {
        trace_with(self, flow, direction)
    }
}

fn trace_with(ev: &Evaluator<'_>, flow: &Flow, direction: Direction) -> Vec<RuleTrace> {
    let cluster = ev.cluster;
    let (subject, peer) = match direction {
        Direction::Egress => (party(cluster, &flow.src), party(cluster, &flow.dst)),
        Direction::Ingress => (party(cluster, &flow.dst), party(cluster, &flow.src)),
    };
    let Party::Pod {
        key: subject_key,
        pod: subject_pod,
        ..
    } = subject
    else {
        return Vec::new();
    };
    let outcome = judge(ev, &subject, &peer, direction, flow).outcome;
    if !matches!(outcome, Outcome::Denied | Outcome::AllowedByPolicy) {
        return Vec::new();
    }
    let destination = match direction {
        Direction::Ingress => Some(subject_pod),
        Direction::Egress => peer.pod(),
    };
    let mut out = Vec::new();
    for (key, rules) in selecting(
        cluster,
        &subject_key.namespace,
        &subject_pod.labels,
        direction,
    ) {
        for (index, (peers, ports)) in rules.into_iter().flatten().enumerate() {
            out.push(RuleTrace {
                rule: RuleRef {
                    policy: key.clone(),
                    direction,
                    rule_index: index as u32,
                },
                peers: peers.map(|peers| {
                    peers
                        .iter()
                        .map(|p| peer_misses(ev, &key.namespace, p, &peer).collect())
                        .collect()
                }),
                ports: ports.map(|ports| {
                    ports
                        .iter()
                        .map(|p| port_miss(p, flow, destination))
                        .collect()
                }),
            });
        }
    }
    out
}

/// `policyTypes`, defaulted: absent or empty ⇒ Ingress, plus Egress iff `spec.egress` is
/// non-empty. An unknown type makes the declaration unusable: both directions (fail closed).
pub fn declared_types(spec: &NetworkPolicySpec) -> Vec<Direction> {
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

/// Why one `ports[]` entry of a rule does not match a flow (reported by [`trace`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PortMiss {
    /// The entry is for another protocol.
    Protocol { rule: String, flow: Protocol },
    /// The flow's port is outside `port ..= endPort`.
    Number {
        port: i32,
        end_port: Option<i32>,
        flow: u16,
    },
    /// The destination does not declare this port name with the flow's number and protocol.
    NamedPort {
        name: String,
        destination_declares: Option<u16>,
    },
}

/// Why one `from` / `to` peer of a rule does not match a flow's other end (reported by [`trace`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PeerMiss {
    /// An ipBlock whose `cidr` does not contain the address (or the peer has no address).
    NotInCidr { cidr: String },
    /// An ipBlock whose `except` entry contains the address.
    InExcept { cidr: String, except: String },
    /// A pod or namespace selector, and the other end is not a pod.
    NotAPod,
    /// A peer without `namespaceSelector` selects pods of the policy's own namespace only.
    OtherNamespace {
        policy_namespace: String,
        peer_namespace: String,
    },
    /// A `namespaceSelector` requirement the peer's namespace fails.
    NamespaceLabel(LabelMiss),
    /// A `podSelector` requirement the peer pod fails.
    PodLabel(LabelMiss),
}

/// One selector requirement that labels fail: `key` `operator` `values`, and the label's value.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LabelMiss {
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist` (a `matchLabels` entry is `In` one value).
    pub operator: String,
    pub values: Vec<String>,
    /// The label's value on the object (`None`: the label is absent).
    pub actual: Option<String>,
}

/// `None` when the port entry matches the flow, else why not.
fn port_miss(
    p: &NetworkPolicyPort,
    flow: &Flow,
    destination: Option<&PodInfo>,
) -> Option<PortMiss> {
    let rule_protocol = p.protocol.as_deref().unwrap_or("TCP");
    if rule_protocol != flow.protocol.as_str() {
        return Some(PortMiss::Protocol {
            rule: rule_protocol.to_owned(),
            flow: flow.protocol,
        });
    }
    let port = i32::from(flow.port);
    let number = |n: i32, end: Option<i32>| {
        let ok = match end {
            None => port == n,
            Some(end) => n <= port && port <= end,
        };
        (!ok).then_some(PortMiss::Number {
            port: n,
            end_port: end,
            flow: flow.port,
        })
    };
    match (&p.port, p.end_port) {
        (None, _) => None,
        (Some(IntOrString::Int(n)), end) => number(*n, end),
        // A named port: the destination pod must declare that name, with this number and this
        // protocol. Never matches a destination that is not a pod.
        (Some(IntOrString::String(name)), _) => {
            let declared = destination.and_then(|pod| {
                pod.ports
                    .iter()
                    .find(|cp| &*cp.name == name.as_str() && cp.protocol == flow.protocol)
                    .map(|cp| cp.port)
            });
            let matches = destination.is_some_and(|pod| {
                pod.ports.iter().any(|cp| {
                    &*cp.name == name.as_str()
                        && cp.port == flow.port
                        && cp.protocol == flow.protocol
                })
            });
            (!matches).then(|| PortMiss::NamedPort {
                name: name.clone(),
                destination_declares: declared,
            })
        }
    }
}

/// Every reason the rule peer does not match the other end of the flow (none: it matches),
/// produced lazily, so that asking whether there is one builds at most one.
fn peer_misses<'a>(
    ev: &'a Evaluator<'_>,
    policy_namespace: &'a str,
    rule_peer: &'a NetworkPolicyPeer,
    peer: &'a Party<'a>,
) -> impl Iterator<Item = PeerMiss> + 'a {
    let block = rule_peer
        .ip_block
        .as_ref()
        .map(|b| block_miss(b, peer.ip(), &|c: &str, ip| ev.cidr_contains(c, ip)));
    // Pod peers only ever match pods.
    let pod = match (&block, peer) {
        (None, Party::Pod { key, pod, .. }) => Some((*key, *pod)),
        _ => None,
    };
    let not_a_pod = (block.is_none() && pod.is_none()).then_some(PeerMiss::NotAPod);
    let other_namespace = pod
        .filter(|(k, _)| rule_peer.namespace_selector.is_none() && k.namespace != policy_namespace)
        .into_iter()
        .map(move |(k, _)| PeerMiss::OtherNamespace {
            policy_namespace: policy_namespace.to_owned(),
            peer_namespace: k.namespace.clone(),
        });
    let namespace_labels = pod
        .and_then(|(k, _)| Some((rule_peer.namespace_selector.as_ref()?, k)))
        .into_iter()
        .flat_map(move |(sel, k)| {
            selector_misses(sel, ev.pod_namespace_labels(&k.namespace))
                .map(PeerMiss::NamespaceLabel)
        });
    let pod_labels = pod
        .and_then(|(_, p)| Some((rule_peer.pod_selector.as_ref()?, &p.labels)))
        .into_iter()
        .flat_map(|(sel, labels)| selector_misses(sel, labels).map(PeerMiss::PodLabel));
    block
        .flatten()
        .into_iter()
        .chain(not_a_pod)
        .chain(other_namespace)
        .chain(namespace_labels)
        .chain(pod_labels)
}

/// The requirements of `sel` (matchLabels entries first, as `In` one value) that `labels` fail.
pub fn selector_misses<'a>(
    sel: &'a LabelSelector,
    labels: &'a Labels,
) -> impl Iterator<Item = LabelMiss> + 'a {
    let from_labels = sel.match_labels.iter().flatten().filter_map(|(k, v)| {
        let actual = labels.get(k);
        (actual != Some(v)).then(|| LabelMiss {
            key: k.clone(),
            operator: "In".into(),
            values: vec![v.clone()],
            actual: actual.cloned(),
        })
    });
    let from_expressions = sel.match_expressions.iter().flatten().filter_map(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        (!expression_holds(&e.operator, values, value)).then(|| LabelMiss {
            key: e.key.clone(),
            operator: e.operator.clone(),
            values: values.to_vec(),
            actual: value.cloned(),
        })
    });
    from_labels.chain(from_expressions)
}

/// Whether a label's value (`None`: absent) satisfies one matchExpressions requirement; an
/// unknown operator is satisfied by nothing.
fn expression_holds(operator: &str, values: &[String], value: Option<&String>) -> bool {
    match operator {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => !value.is_some_and(|v| values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

/// Whether `labels` satisfy every requirement of `sel`: [`selector_misses`] yields nothing
/// (without building the misses).
pub fn selector_matches(sel: &LabelSelector, labels: &Labels) -> bool {
    sel.match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().flatten().all(|e| {
            expression_holds(
                &e.operator,
                e.values.as_deref().unwrap_or_default(),
                labels.get(&e.key),
            )
        })
}

/// Whether the API server would accept the selector: label syntax ([`model::meta`]), known
/// operators, values exactly for `In` and `NotIn`.
pub fn selector_is_valid(sel: &LabelSelector) -> bool {
    model::meta::label_selector(sel).is_ok()
        && sel.match_expressions.iter().flatten().all(|e| {
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
    let (v4, v6);
    let bytes: &[u8] = match ip {
        IpAddr::V4(a) => {
            v4 = a.octets();
            &v4
        }
        IpAddr::V6(a) => {
            v6 = a.octets();
            &v6
        }
    };
    // The first `len` bits agree: whole bytes, then the leading bits of the next one.
    let (whole, bits) = ((c.len / 8) as usize, c.len % 8);
    bytes.len() == c.network.len()
        && bytes[..whole] == c.network[..whole]
        && (bits == 0 || (bytes[whole] ^ c.network[whole]) & (0xffu8 << (8 - bits)) == 0)
}

/// `None` when the block contains the address, else why not; `contains` says whether a CIDR
/// (as written) contains an address.
fn block_miss(
    block: &IPBlock,
    ip: Option<IpAddr>,
    contains: &dyn Fn(&str, IpAddr) -> bool,
) -> Option<PeerMiss> {
    let not_in = || {
        Some(PeerMiss::NotInCidr {
            cidr: block.cidr.clone(),
        })
    };
    let Some(ip) = ip else { return not_in() };
    if !contains(&block.cidr, ip) {
        return not_in();
    }
    let except = block.except.iter().flatten().find(|e| contains(e, ip))?;
    Some(PeerMiss::InExcept {
        cidr: block.cidr.clone(),
        except: except.clone(),
    })
}

/// Whether the ipBlock (`cidr` minus `except`) contains the address.
pub fn block_contains(block: &IPBlock, ip: IpAddr) -> bool {
    block_miss(block, Some(ip), &written_cidr_contains).is_none()
}

/// The first and last address of a CIDR as written, as [`block_contains`] reads it (`None`: an
/// invalid CIDR, which contains nothing): every address the CIDR contains lies between them, in
/// its family.
pub fn cidr_bounds(cidr: &str) -> Option<(IpAddr, IpAddr)> {
    let c = parse_cidr(cidr)?;
    let mut last = c.network.clone();
    for bit in c.len as usize..last.len() * 8 {
        last[bit / 8] |= 0x80 >> (bit % 8);
    }
    let ip = |b: &[u8]| -> Option<IpAddr> {
        Some(match b.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(b).ok()?),
            _ => IpAddr::from(<[u8; 16]>::try_from(b).ok()?),
        })
    };
    Some((ip(&c.network)?, ip(&last)?))
}

/// Whether the CIDR as written (an invalid one contains nothing) contains the address.
fn written_cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    parse_cidr(cidr).is_some_and(|c| cidr_contains(&c, ip))
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

    /// Bit by bit, as the definition reads.
    fn bitwise_contains(c: &Cidr, ip: IpAddr) -> bool {
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

    #[test]
    fn cidr_contains_is_the_bitwise_definition() {
        let ips: Vec<IpAddr> = [
            "10.244.1.7",
            "10.244.1.8",
            "10.245.0.0",
            "0.0.0.0",
            "255.255.255.255",
            "11.0.0.1",
            "fd00::1",
            "fd00:0:0:1::",
            "::1",
            "ffff::",
            "10.244.1.255",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut checked = 0;
        for base in ["10.244.1.7", "fd00::1", "255.255.255.255", "0.0.0.0"] {
            let max = if base.contains(':') { 128 } else { 32 };
            for len in 0..=max {
                let c = parse_cidr(&format!("{base}/{len}")).unwrap();
                let (first, last) = cidr_bounds(&format!("{base}/{len}")).unwrap();
                for ip in &ips {
                    assert_eq!(
                        cidr_contains(&c, *ip),
                        bitwise_contains(&c, *ip),
                        "{base}/{len} vs {ip}"
                    );
                    if cidr_contains(&c, *ip) {
                        assert!(first <= *ip && *ip <= last, "{base}/{len}: {ip} in bounds");
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked == 228 * 11);
    }

    #[test]
    fn cidr_bounds_are_first_and_last_address() {
        let b = |s: &str| cidr_bounds(s).map(|(a, z)| (a.to_string(), z.to_string()));
        let pair = |a: &str, z: &str| Some((a.to_string(), z.to_string()));
        assert_eq!(b("10.244.1.7/24"), pair("10.244.1.0", "10.244.1.255"));
        assert_eq!(b("0.0.0.0/0"), pair("0.0.0.0", "255.255.255.255"));
        assert_eq!(b("10.1.2.3/32"), pair("10.1.2.3", "10.1.2.3"));
        assert_eq!(b("::ffff:10.0.0.0/104"), pair("10.0.0.0", "10.255.255.255"));
        assert_eq!(b("fd00::/120"), pair("fd00::", "fd00::ff"));
        assert_eq!(b("10.0.0.0/33"), None);
    }

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

    /// `x/web` (on n1, dual-stack) admits ipBlock `cidr` only; `x/client` is dual-stack too.
    fn web_admitting(cidr: &str) -> Cluster {
        use crate::model::fixtures::{add_pod, node, pod, policy};
        use serde_json::json;
        let mut c = Cluster::default();
        let web = pod(
            "n1",
            json!({"app": "web"}),
            &["10.244.1.5", "fd00:10:244:1::5"],
        );
        add_pod(&mut c, "x", "web", web);
        let client = pod("n2", json!({}), &["10.244.2.7", "fd00:10:244:2::7"]);
        add_pod(&mut c, "x", "client", client);
        let addresses = [("InternalIP", "172.18.0.2"), ("InternalIP", "fc00::2")];
        c.nodes.insert("n1".into(), node("n1", &addresses));
        let spec = json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}],
        });
        c.policies
            .insert(ObjectKey::new("x", "web"), policy("x", "web", spec));
        c
    }

    /// Whether `x/web` admits TCP/80 from `src` (an address of `x/client`, else a plain address),
    /// at its IPv4 or IPv6 address as `src`'s family is.
    fn admits(c: &Cluster, src: &str) -> bool {
        let src: IpAddr = src.parse().unwrap();
        let client = ObjectKey::new("x", "client");
        let src = if c.pods[&client].ips.contains(&src) {
            Peer::Pod {
                pod: client,
                ip: src,
            }
        } else {
            Peer::Address(src)
        };
        let dst = if src.ip().is_some_and(|ip| ip.is_ipv4()) {
            "10.244.1.5"
        } else {
            "fd00:10:244:1::5"
        };
        let flow = Flow {
            src,
            dst: Peer::Pod {
                pod: ObjectKey::new("x", "web"),
                ip: dst.parse().unwrap(),
            },
            protocol: Protocol::Tcp,
            port: 80,
        };
        evaluate(c, &flow).allowed
    }

    #[test]
    fn ip_blocks_never_admit_the_other_family() {
        let v4_all = web_admitting("0.0.0.0/0");
        assert!(admits(&v4_all, "192.0.2.1"));
        assert!(admits(&v4_all, "10.244.2.7"));
        assert!(!admits(&v4_all, "2001:db8::1"));
        assert!(!admits(&v4_all, "fd00:10:244:2::7"));
        // An IPv6 address spelling an IPv4 one is still IPv6.
        assert!(!admits(&v4_all, "::ffff:192.0.2.1"));
        let v6_all = web_admitting("::/0");
        assert!(admits(&v6_all, "2001:db8::1"));
        assert!(admits(&v6_all, "fd00:10:244:2::7"));
        assert!(!admits(&v6_all, "192.0.2.1"));
        assert!(!admits(&v6_all, "10.244.2.7"));
        // An IPv4-mapped IPv6 CIDR is the IPv4 CIDR it maps.
        let mapped = web_admitting("::ffff:10.244.0.0/112");
        assert!(admits(&mapped, "10.244.2.7"));
        assert!(!admits(&mapped, "10.245.0.1"));
        assert!(!admits(&mapped, "fd00:10:244:2::7"));
        assert!(!admits(&mapped, "::ffff:10.244.2.7"));
    }

    #[test]
    fn v4_mapped_addresses_are_denied_wherever_isolated() {
        use crate::model::fixtures::policy;
        let web = ObjectKey::new("x", "web");
        let client = ObjectKey::new("x", "client");
        let flow = |src: Peer, dst: Peer| Flow {
            src,
            dst,
            protocol: Protocol::Tcp,
            port: 80,
        };
        let at = |pod: &ObjectKey, ip: &str| Peer::Pod {
            pod: pod.clone(),
            ip: ip.parse().unwrap(),
        };
        let address = |ip: &str| Peer::Address(ip.parse().unwrap());
        // The client's IPv4 address, its IPv6 spelling, and the node's.
        let mut c = web_admitting("10.244.2.7/32");
        let v4 = flow(at(&client, "10.244.2.7"), at(&web, "10.244.1.5"));
        assert!(evaluate(&c, &v4).allowed);
        let mapped = flow(address("::ffff:10.244.2.7"), at(&web, "fd00:10:244:1::5"));
        assert!(mapped.has_v4_mapped_address());
        let v = evaluate(&c, &mapped);
        assert!(!v.allowed);
        assert_eq!(v.ingress.outcome, Outcome::DeniedV4Mapped);
        assert_eq!(v.ingress.isolating, std::slice::from_ref(&web));
        assert!(v.ingress.allowing.is_empty());
        assert_eq!(v.egress.outcome, Outcome::NotPolicied);
        assert!(trace(&c, &mapped, Direction::Ingress).is_empty());
        let node = flow(address("::ffff:172.18.0.2"), at(&web, "fd00:10:244:1::5"));
        assert_eq!(evaluate(&c, &node).ingress.outcome, Outcome::DeniedV4Mapped);
        // Whatever the rules admit: every peer, every IPv4 or IPv6 address.
        for rules in [
            serde_json::json!([{}]),
            serde_json::json!([{"from": [{"podSelector": {}}]}]),
            serde_json::json!([{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]),
            serde_json::json!([{"from": [{"ipBlock": {"cidr": "::/0"}}]}]),
            serde_json::json!([{"from": [{"ipBlock": {"cidr": "::ffff:0.0.0.0/96"}}]}]),
        ] {
            let spec = serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": rules,
            });
            c.policies.insert(web.clone(), policy("x", "web", spec));
            let v = evaluate(&c, &mapped);
            assert_eq!(v.ingress.outcome, Outcome::DeniedV4Mapped, "{rules}");
            assert!(!v.allowed, "{rules}");
            // The mapped destination of an isolated egress: denied too.
            let spec = serde_json::json!({
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": rules,
            });
            let mut e = c.clone();
            e.policies
                .insert(ObjectKey::new("x", "egress"), policy("x", "egress", spec));
            let out = flow(
                at(&client, "fd00:10:244:2::7"),
                address("::ffff:10.244.1.5"),
            );
            let v = evaluate(&e, &out);
            assert_eq!(v.egress.outcome, Outcome::DeniedV4Mapped, "{rules}");
            assert_eq!(
                v.egress.isolating,
                [ObjectKey::new("x", "egress")],
                "{rules}"
            );
        }
        // Not isolated: allowed, as any flow there.
        let out = flow(
            at(&client, "fd00:10:244:2::7"),
            address("::ffff:10.244.1.5"),
        );
        let v = evaluate(&c, &out);
        assert_eq!(v.egress.outcome, Outcome::NotIsolated);
        assert!(v.allowed);
        // Other IPv6 addresses embedding an IPv4 one are plain IPv6.
        for ip in ["::10.244.2.7", "64:ff9b::10.244.2.7", "fd00:10:244:2::7"] {
            assert!(!is_v4_mapped(&ip.parse().unwrap()), "{ip}");
        }
        assert!(!is_v4_mapped(&"10.244.2.7".parse().unwrap()));
    }

    #[test]
    fn a_dual_stack_pod_is_the_same_peer_at_either_address() {
        use crate::model::fixtures::add_pod;
        // Admitting the client's IPv6 range: the client is admitted at its IPv6 address only.
        let mut c = web_admitting("fd00:10:244:2::/64");
        assert!(admits(&c, "fd00:10:244:2::7"));
        assert!(!admits(&c, "10.244.2.7"));
        // Admitting it by labels: at both.
        let spec = serde_json::json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {}}]}],
        });
        c.policies.insert(
            ObjectKey::new("x", "web"),
            crate::model::fixtures::policy("x", "web", spec),
        );
        assert!(admits(&c, "fd00:10:244:2::7"));
        assert!(admits(&c, "10.244.2.7"));
        assert!(!admits(&c, "2001:db8::1"));
        // Its node's addresses of both families are the host, always admitted.
        assert!(admits(&c, "172.18.0.2"));
        assert!(admits(&c, "fc00::2"));
        // A pod on the node reporting an IPv6 link-local host address does not make it the
        // node's.
        let mut other = crate::model::fixtures::pod("n1", serde_json::json!({}), &["10.244.1.6"]);
        other.host_ips = ["fe80::1".parse().unwrap()].into();
        add_pod(&mut c, "x", "other", other);
        assert!(!admits(&c, "fe80::1"));
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
