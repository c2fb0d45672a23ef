//! `lint`: findings about NetworkPolicies against the known state, each with a stable code.
//!
//! Validity comes from the compiler's normalisation (what the agent itself rejects, with the field
//! path), verdicts from the reference evaluator; the checks here only decide which questions to
//! ask them.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use policy_common::Direction;
use serde::Serialize;

use super::flows::{self, Classes, Target};
use crate::compiler::cidr::Prefix;
use crate::evaluator::{self, Evaluator, Protocol};
use crate::model::{self, Cluster, Labels, NAMESPACE_NAME_LABEL, ObjectKey, PodInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

/// One finding. JSON: `{"code", "severity", "object", "field", "message", "fix"}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub severity: Severity,
    /// `Kind namespace/name`.
    pub object: String,
    /// Field path within the object (`spec.ingress[0].from[1]`), or the direction for a pod.
    pub field: String,
    pub message: String,
    /// One line: what to change.
    pub fix: String,
}

/// Every code `lint` reports, with its severity.
pub const CODES: &[(&str, Severity)] = &[
    ("invalid", Severity::Error),
    ("selects-nothing", Severity::Warning),
    ("peer-matches-nothing", Severity::Warning),
    ("shadowed", Severity::Warning),
    ("missing-dns", Severity::Error),
    ("ignored-rules", Severity::Warning),
    ("named-port-unresolved", Severity::Warning),
    ("ipblock-matches-pods", Severity::Info),
    ("isolates-without-allow", Severity::Warning),
    ("one-sided", Severity::Warning),
];

fn severity(code: &str) -> Severity {
    CODES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or(Severity::Warning, |(_, s)| *s)
}

fn finding(
    code: &'static str,
    object: String,
    field: String,
    message: String,
    fix: String,
) -> Finding {
    Finding {
        code,
        severity: severity(code),
        object,
        field,
        message,
        fix,
    }
}

/// Pods that take part in flows, by namespace.
struct Index<'c> {
    cluster: &'c Cluster,
    ev: Evaluator<'c>,
    /// Classes of equivalent pods (namespace, labels, ports) over every pod of `by_namespace`.
    classes: Classes<'c>,
    /// Namespace → its classes.
    class_namespaces: BTreeMap<&'c str, Vec<usize>>,
    /// Every address of those pods, sorted.
    addresses: Vec<(std::net::IpAddr, &'c ObjectKey)>,
    by_namespace: BTreeMap<&'c str, Vec<(&'c ObjectKey, &'c PodInfo)>>,
    namespaces: BTreeMap<String, Labels>,
}

impl<'c> Index<'c> {
    fn new(cluster: &'c Cluster) -> Self {
        let mut by_namespace: BTreeMap<&str, Vec<_>> = BTreeMap::new();
        for (k, p) in &cluster.pods {
            if !p.host_network && !p.terminated {
                by_namespace
                    .entry(k.namespace.as_str())
                    .or_default()
                    .push((k, p));
            }
        }
        let mut names: BTreeSet<String> = cluster.namespaces.keys().cloned().collect();
        names.extend(cluster.pods.keys().map(|k| k.namespace.clone()));
        names.extend(cluster.policies.keys().map(|k| k.namespace.clone()));
        let namespaces = names
            .into_iter()
            .map(|n| {
                let labels = model::namespace_labels(cluster, &n);
                (n, labels)
            })
            .collect();
        let classes = Classes::new(
            cluster,
            by_namespace.values().flatten().map(|(k, _)| *k),
            &[],
        );
        let mut class_namespaces: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, members) in classes.members.iter().enumerate() {
            class_namespaces
                .entry(members[0].namespace.as_str())
                .or_default()
                .push(i);
        }
        let mut addresses: Vec<_> = by_namespace
            .values()
            .flatten()
            .flat_map(|(k, p)| p.ips.iter().map(move |ip| (*ip, *k)))
            .collect();
        addresses.sort();
        Index {
            cluster,
            ev: Evaluator::new(cluster),
            classes,
            class_namespaces,
            addresses,
            by_namespace,
            namespaces,
        }
    }

    fn pods_in(&self, ns: &str) -> &[(&'c ObjectKey, &'c PodInfo)] {
        self.by_namespace.get(ns).map_or(&[], Vec::as_slice)
    }

    /// Classes a selector peer matches (`None`: the peer is an ipBlock).
    fn peer_classes(&self, policy_ns: &str, peer: &NetworkPolicyPeer) -> Option<Vec<usize>> {
        if peer.ip_block.is_some() {
            return None;
        }
        let namespaces: Vec<&str> = match &peer.namespace_selector {
            None => vec![policy_ns],
            Some(sel) => self
                .namespaces
                .iter()
                .filter(|(_, l)| evaluator::selector_matches(sel, l))
                .map(|(n, _)| n.as_str())
                .collect(),
        };
        Some(
            namespaces
                .into_iter()
                .flat_map(|n| self.class_namespaces.get(n).into_iter().flatten().copied())
                .filter(|&c| {
                    let rep = &self.cluster.pods[self.classes.members[c][0]];
                    peer.pod_selector
                        .as_ref()
                        .is_none_or(|s| evaluator::selector_matches(s, &rep.labels))
                })
                .collect(),
        )
    }

    /// Pods a selector peer matches (`None`: the peer is an ipBlock).
    fn peer_pods(&self, policy_ns: &str, peer: &NetworkPolicyPeer) -> Option<Vec<&'c ObjectKey>> {
        let classes = self.peer_classes(policy_ns, peer)?;
        Some(
            classes
                .into_iter()
                .flat_map(|c| self.classes.members[c].iter().copied())
                .collect(),
        )
    }

    /// Pods with an address in the ipBlock, in key order: the candidates between the bounds of
    /// its CIDR, each checked by the evaluator.
    fn block_pods(&self, block: &k8s_openapi::api::networking::v1::IPBlock) -> Vec<&'c ObjectKey> {
        let Some((first, last)) = evaluator::cidr_bounds(&block.cidr) else {
            return Vec::new();
        };
        let start = self.addresses.partition_point(|(ip, _)| *ip < first);
        let pods: BTreeSet<&ObjectKey> = self.addresses[start..]
            .iter()
            .take_while(|(ip, _)| *ip <= last)
            .filter(|(ip, _)| self.ev.block_contains(block, *ip))
            .map(|(_, k)| *k)
            .collect();
        pods.into_iter().collect()
    }

    fn selected(&self, key: &ObjectKey, spec: &NetworkPolicySpec) -> Vec<&'c ObjectKey> {
        self.pods_in(&key.namespace)
            .iter()
            .filter(|(_, p)| {
                spec.pod_selector
                    .as_ref()
                    .is_none_or(|s| evaluator::selector_matches(s, &p.labels))
            })
            .map(|(k, _)| *k)
            .collect()
    }
}

/// The requirements of `sel` that no label set of `candidates` satisfies, in words.
fn unmet<'a>(
    sel: &LabelSelector,
    candidates: impl Iterator<Item = &'a Labels> + Clone,
) -> Vec<String> {
    let mut met: BTreeMap<String, bool> = BTreeMap::new();
    for labels in candidates {
        let misses: Vec<_> = evaluator::selector_misses(sel, labels).collect();
        for m in sel_requirements(sel) {
            let missed = misses.iter().any(|x| x.key == m.0 && x.operator == m.1);
            *met.entry(m.2.clone()).or_insert(false) |= !missed;
        }
    }
    if met.is_empty() {
        return sel_requirements(sel).into_iter().map(|r| r.2).collect();
    }
    met.into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(t, _)| t)
        .collect()
}

/// (key, operator, text) of every requirement of a selector.
fn sel_requirements(sel: &LabelSelector) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), "In".into(), format!("{k}={v}")))
        .collect();
    out.extend(sel.match_expressions.iter().flatten().map(|e| {
        let values = e.values.clone().unwrap_or_default().join(",");
        (
            e.key.clone(),
            e.operator.clone(),
            format!("{} {} ({values})", e.key, e.operator),
        )
    }));
    out
}

fn selector_text(sel: &LabelSelector) -> String {
    let r = sel_requirements(sel);
    if r.is_empty() {
        "{}".into()
    } else {
        r.into_iter().map(|r| r.2).collect::<Vec<_>>().join(", ")
    }
}

/// Runs every check.
pub fn lint(cluster: &Cluster) -> Vec<Finding> {
    let index = Index::new(cluster);
    let mut out = Vec::new();
    for (key, np) in &cluster.policies {
        lint_policy(&index, key, np, &mut out);
    }
    missing_dns(&index, &mut out);
    isolates_without_allow(&index, &mut out);
    out.sort();
    out.dedup();
    out
}

fn object(key: &ObjectKey) -> String {
    format!("NetworkPolicy {key}")
}

/// The rules of one direction: (field of the rule, peers field name, peers, ports).
type Rule<'a> = (
    String,
    &'static str,
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

fn rules(spec: &NetworkPolicySpec, d: Direction) -> Vec<Rule<'_>> {
    let (list, side) = match d {
        Direction::Ingress => ("ingress", "from"),
        Direction::Egress => ("egress", "to"),
    };
    evaluator::rule_parts(spec, d)
        .into_iter()
        .enumerate()
        .map(|(i, (peers, ports))| (format!("spec.{list}[{i}]"), side, peers, ports))
        .collect()
}

fn lint_policy(index: &Index<'_>, key: &ObjectKey, np: &NetworkPolicy, out: &mut Vec<Finding>) {
    let (_, errors) = crate::compiler::policy::normalise(key, np);
    for e in &errors {
        out.push(finding(
            "invalid",
            object(key),
            e.field().to_owned(),
            match e {
                crate::compiler::CompileError::Policy { reason, .. } => {
                    format!("{}: {reason}", e.field())
                }
                other => other.to_string(),
            },
            "fix the field: the API server rejects this policy (the agent enforces it fail-closed)"
                .into(),
        ));
    }
    let default = NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default);
    let valid = errors.is_empty();
    let selected = index.selected(key, spec);
    if valid && selected.is_empty() {
        let sel = spec.pod_selector.clone().unwrap_or_default();
        let missing = unmet(
            &sel,
            index.pods_in(&key.namespace).iter().map(|(_, p)| &p.labels),
        );
        out.push(finding(
            "selects-nothing",
            object(key),
            "spec.podSelector".into(),
            format!(
                "podSelector {} matches no pod of namespace {}{}",
                selector_text(&sel),
                key.namespace,
                if missing.is_empty() {
                    String::new()
                } else {
                    format!(" (no pod has {})", missing.join(" and "))
                }
            ),
            "use the labels the pods carry (`kubectl get pods --show-labels`; `kubectl run` sets run=NAME, not app=NAME)".into(),
        ));
    }
    ignored_rules(key, spec, out);
    for d in [Direction::Ingress, Direction::Egress] {
        let rs = rules(spec, d);
        for (field, side, peers, ports) in &rs {
            for (j, peer) in peers.iter().flat_map(|p| p.iter()).enumerate() {
                let pfield = format!("{field}.{side}[{j}]");
                if valid {
                    peer_matches_nothing(index, key, peer, &pfield, out);
                }
                if let Some(block) = &peer.ip_block {
                    ipblock_matches_pods(index, key, block, &pfield, out);
                }
            }
            if valid {
                named_ports(index, key, d, &selected, *peers, *ports, field, out);
            }
        }
        if valid {
            shadowed(key, &rs, out);
            one_sided(index, key, d, &selected, &rs, out);
        }
    }
}

fn ignored_rules(key: &ObjectKey, spec: &NetworkPolicySpec, out: &mut Vec<Finding>) {
    let Some(types) = spec.policy_types.as_ref().filter(|t| !t.is_empty()) else {
        return;
    };
    for (name, field, present) in [
        (
            "Ingress",
            "spec.ingress",
            spec.ingress.as_ref().is_some_and(|r| !r.is_empty()),
        ),
        (
            "Egress",
            "spec.egress",
            spec.egress.as_ref().is_some_and(|r| !r.is_empty()),
        ),
    ] {
        if present && !types.iter().any(|t| t == name) {
            out.push(finding(
                "ignored-rules",
                object(key),
                field.into(),
                format!(
                    "{field} has rules but policyTypes is [{}]: they are ignored",
                    types.join(", ")
                ),
                format!("add {name} to spec.policyTypes, or remove {field}"),
            ));
        }
    }
}

fn peer_matches_nothing(
    index: &Index<'_>,
    key: &ObjectKey,
    peer: &NetworkPolicyPeer,
    field: &str,
    out: &mut Vec<Finding>,
) {
    let Some(classes) = index.peer_classes(&key.namespace, peer) else {
        return;
    };
    if !classes.is_empty() || selects_assumed_dns(index.cluster, key, peer) {
        return;
    }
    if let Some(sel) = &peer.namespace_selector {
        let namespaces: Vec<&Labels> = index
            .namespaces
            .values()
            .filter(|l| evaluator::selector_matches(sel, l))
            .collect();
        if namespaces.is_empty() {
            let missing = unmet(sel, index.namespaces.values());
            let uses_name = sel_requirements(sel).iter().any(|r| r.0 == "name")
                && !index.namespaces.values().any(|l| l.contains_key("name"));
            out.push(finding(
                "peer-matches-nothing",
                object(key),
                format!("{field}.namespaceSelector"),
                format!(
                    "namespaceSelector {} matches no namespace (none has {})",
                    selector_text(sel),
                    missing.join(" and ")
                ),
                if uses_name {
                    format!("no namespace has a `name` label: select by {NAMESPACE_NAME_LABEL}, which every namespace carries")
                } else {
                    "label the namespace, or select it by kubernetes.io/metadata.name".into()
                },
            ));
            return;
        }
    }
    let sel = peer.pod_selector.clone().unwrap_or_default();
    let scope = match &peer.namespace_selector {
        None => format!("namespace {}", key.namespace),
        Some(s) => format!("the namespaces matching {}", selector_text(s)),
    };
    let candidates: Vec<&Labels> = match &peer.namespace_selector {
        None => index
            .pods_in(&key.namespace)
            .iter()
            .map(|(_, p)| &p.labels)
            .collect(),
        Some(s) => index
            .namespaces
            .iter()
            .filter(|(_, l)| evaluator::selector_matches(s, l))
            .flat_map(|(n, _)| index.pods_in(n))
            .map(|(_, p)| &p.labels)
            .collect(),
    };
    let missing = unmet(&sel, candidates.iter().copied());
    out.push(finding(
        "peer-matches-nothing",
        object(key),
        format!("{field}.podSelector"),
        format!(
            "podSelector {} matches no pod in {scope}{}",
            selector_text(&sel),
            if missing.is_empty() {
                String::new()
            } else {
                format!(" (no pod there has {})", missing.join(" and "))
            }
        ),
        if peer.namespace_selector.is_none() {
            "without namespaceSelector a peer selects pods of the policy's own namespace; add a namespaceSelector for pods elsewhere, or fix the labels".into()
        } else {
            "use labels the peer pods carry".into()
        },
    ));
}

fn ipblock_matches_pods(
    index: &Index<'_>,
    key: &ObjectKey,
    block: &k8s_openapi::api::networking::v1::IPBlock,
    field: &str,
    out: &mut Vec<Finding>,
) {
    let pods = index.block_pods(block);
    if pods.is_empty() {
        return;
    }
    let names: Vec<String> = pods.iter().take(3).map(ToString::to_string).collect();
    out.push(finding(
        "ipblock-matches-pods",
        object(key),
        format!("{field}.ipBlock"),
        format!(
            "ipBlock {} contains the addresses of {} pod(s) ({}{}): it allows them as well",
            block.cidr,
            pods.len(),
            names.join(", "),
            if pods.len() > 3 { ", …" } else { "" }
        ),
        "if only off-cluster addresses are meant, add the pod range to except; select pods with podSelector".into(),
    ));
}

#[allow(clippy::too_many_arguments)]
fn named_ports(
    index: &Index<'_>,
    key: &ObjectKey,
    d: Direction,
    selected: &[&ObjectKey],
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
    field: &str,
    out: &mut Vec<Finding>,
) {
    let cluster = index.cluster;
    let named = |p: &NetworkPolicyPort| matches!(p.port, Some(IntOrString::String(_)));
    if !ports.is_some_and(|ports| ports.iter().any(named)) {
        return;
    }
    let destinations: Vec<&ObjectKey> = match d {
        Direction::Ingress => selected.to_vec(),
        Direction::Egress => match peers.filter(|p| !p.is_empty()) {
            None => index
                .by_namespace
                .values()
                .flatten()
                .map(|(k, _)| *k)
                .collect(),
            Some(peers) => {
                let mut all = BTreeSet::new();
                for p in peers {
                    match index.peer_pods(&key.namespace, p) {
                        Some(pods) => all.extend(pods),
                        None => all.extend(index.block_pods(p.ip_block.as_ref().unwrap())),
                    }
                }
                all.into_iter().collect()
            }
        },
    };
    for (j, port) in ports.iter().flat_map(|p| p.iter()).enumerate() {
        let Some(IntOrString::String(name)) = &port.port else {
            continue;
        };
        let protocol = Protocol::parse_defaulted(port.protocol.as_deref()).unwrap_or(Protocol::Tcp);
        let declared = destinations.iter().any(|k| {
            cluster.pods[*k]
                .named_port_fields()
                .any(|(n, p, _)| n == name && p == protocol)
        });
        if !declared {
            let whom = match d {
                Direction::Ingress => "no pod the policy selects",
                Direction::Egress => "no destination pod of this rule",
            };
            out.push(finding(
                "named-port-unresolved",
                object(key),
                format!("{field}.ports[{j}]"),
                format!("named port {name}/{protocol}: {whom} declares it, so this entry matches nothing"),
                "use the containerPort name the pods declare (names are per pod and per protocol), or the number".into(),
            ));
        }
    }
}

/// Normalised requirements: (key, operator, sorted values).
fn reqs(sel: Option<&LabelSelector>) -> BTreeSet<(String, String, Vec<String>)> {
    let Some(sel) = sel else {
        return BTreeSet::new();
    };
    let mut out: BTreeSet<_> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), "In".to_string(), vec![v.clone()]))
        .collect();
    out.extend(sel.match_expressions.iter().flatten().map(|e| {
        let mut v = e.values.clone().unwrap_or_default();
        v.sort();
        v.dedup();
        (e.key.clone(), e.operator.clone(), v)
    }));
    out
}

/// Every object `narrow` selects, `broad` selects too (judged on the requirements alone: each
/// requirement of `broad` is one of `narrow`'s, or an `In` over a superset of its values).
fn selector_covers(broad: Option<&LabelSelector>, narrow: Option<&LabelSelector>) -> bool {
    let n = reqs(narrow);
    reqs(broad).iter().all(|(k, op, v)| {
        n.contains(&(k.clone(), op.clone(), v.clone()))
            || (op == "In"
                && n.iter().any(|(nk, nop, nv)| {
                    nk == k && nop == "In" && nv.iter().all(|x| v.contains(x))
                }))
    })
}

fn peer_covers(broad: &NetworkPolicyPeer, narrow: &NetworkPolicyPeer) -> bool {
    match (&broad.ip_block, &narrow.ip_block) {
        (Some(b), Some(n)) => {
            b.except.as_ref().is_none_or(Vec::is_empty)
                && matches!((Prefix::parse(&b.cidr), Prefix::parse(&n.cidr)), (Ok(b), Ok(n)) if b.covers(&n))
        }
        (None, None) => {
            let namespaces = match (&broad.namespace_selector, &narrow.namespace_selector) {
                (None, None) => true,
                (Some(b), None) => reqs(Some(b)).is_empty(),
                (None, Some(_)) => false,
                (Some(b), Some(n)) => selector_covers(Some(b), Some(n)),
            };
            namespaces && selector_covers(broad.pod_selector.as_ref(), narrow.pod_selector.as_ref())
        }
        _ => false,
    }
}

fn port_covers(broad: &NetworkPolicyPort, narrow: &NetworkPolicyPort) -> bool {
    if broad.protocol.as_deref().unwrap_or("TCP") != narrow.protocol.as_deref().unwrap_or("TCP") {
        return false;
    }
    match (&broad.port, &narrow.port) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(IntOrString::String(a)), Some(IntOrString::String(b))) => a == b,
        (Some(IntOrString::Int(a)), Some(IntOrString::Int(b))) => {
            let (alo, ahi) = (*a, broad.end_port.unwrap_or(*a));
            let (blo, bhi) = (*b, narrow.end_port.unwrap_or(*b));
            alo <= blo && bhi <= ahi
        }
        _ => false,
    }
}

fn all_or<T>(v: Option<&Vec<T>>) -> Option<&Vec<T>> {
    v.filter(|v| !v.is_empty())
}

fn shadowed(key: &ObjectKey, rs: &[Rule<'_>], out: &mut Vec<Finding>) {
    // Peers within one rule.
    for (field, side, peers, _) in rs {
        let Some(peers) = all_or(*peers) else {
            continue;
        };
        for (j, narrow) in peers.iter().enumerate() {
            let by = peers.iter().enumerate().find(|(k, broad)| {
                *k != j && peer_covers(broad, narrow) && (!peer_covers(narrow, broad) || *k < j)
            });
            if let Some((k, _)) = by {
                out.push(finding(
                    "shadowed",
                    object(key),
                    format!("{field}.{side}[{j}]"),
                    format!("{side}[{j}] is redundant: {side}[{k}] of the same rule already matches every peer it matches"),
                    format!("remove {side}[{j}], or narrow {side}[{k}] if it is broader than meant"),
                ));
            }
        }
    }
    // Whole rules.
    let covers = |b: &Rule<'_>, n: &Rule<'_>| {
        let peers = match (all_or(b.2), all_or(n.2)) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(bp), Some(np)) => np.iter().all(|q| bp.iter().any(|p| peer_covers(p, q))),
        };
        let ports = match (all_or(b.3), all_or(n.3)) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(bp), Some(np)) => np.iter().all(|q| bp.iter().any(|p| port_covers(p, q))),
        };
        peers && ports
    };
    for (j, narrow) in rs.iter().enumerate() {
        let by = rs.iter().enumerate().find(|(k, broad)| {
            *k != j && covers(broad, narrow) && (!covers(narrow, broad) || *k < j)
        });
        if let Some((_, broad)) = by {
            out.push(finding(
                "shadowed",
                object(key),
                narrow.0.clone(),
                format!(
                    "{} is redundant: {} allows everything it allows",
                    narrow.0, broad.0
                ),
                format!(
                    "remove {}, or narrow {} if it is broader than meant",
                    narrow.0, broad.0
                ),
            ));
        }
    }
}

/// Concrete (port, protocol) pairs a rule's port entries name on a destination pod.
fn rule_ports(ports: Option<&Vec<NetworkPolicyPort>>, dst: &PodInfo) -> Vec<(u16, Protocol)> {
    let declared = flows::declared_ports(dst);
    let Some(ports) = all_or(ports) else {
        return declared;
    };
    let mut out = BTreeSet::new();
    for p in ports {
        let Some(protocol) = Protocol::parse_defaulted(p.protocol.as_deref()) else {
            continue;
        };
        match &p.port {
            None => out.extend(declared.iter().filter(|(_, pr)| *pr == protocol)),
            Some(IntOrString::Int(n)) => {
                if let Ok(n) = u16::try_from(*n) {
                    out.insert((n, protocol));
                }
            }
            Some(IntOrString::String(name)) => out.extend(
                dst.named_port_fields()
                    .filter(|(nm, pr, _)| nm == name && *pr == protocol)
                    .map(|(_, pr, n)| (n, pr)),
            ),
        }
    }
    out.into_iter().collect()
}

fn one_sided(
    index: &Index<'_>,
    key: &ObjectKey,
    d: Direction,
    selected: &[&ObjectKey],
    rs: &[Rule<'_>],
    out: &mut Vec<Finding>,
) {
    let cluster = index.cluster;
    if selected.is_empty() {
        return;
    }
    // Representatives of the classes the pods fall in.
    let reps = |pods: &mut dyn Iterator<Item = &ObjectKey>| -> BTreeSet<usize> {
        pods.filter_map(|k| index.classes.of.get(k).copied())
            .collect()
    };
    let subjects = reps(&mut selected.iter().copied());
    for (field, side, peers, ports) in rs {
        let Some(peers) = all_or(*peers) else {
            continue;
        };
        let mut others = BTreeSet::new();
        let mut judged = true;
        for p in peers {
            match index.peer_classes(&key.namespace, p) {
                Some(classes) => others.extend(classes),
                None => judged = false,
            }
        }
        if !judged || others.is_empty() {
            continue;
        }
        let other_pods: usize = others.iter().map(|&c| index.classes.members[c].len()).sum();
        let rep = |c: usize| index.classes.members[c][0];
        let mut any_flow = false;
        let admitted = subjects.iter().any(|&s| {
            others.iter().any(|&o| {
                let (src, dst) = match d {
                    Direction::Egress => (rep(s), rep(o)),
                    Direction::Ingress => (rep(o), rep(s)),
                };
                if src == dst {
                    return true;
                }
                rule_ports(*ports, &cluster.pods[dst])
                    .into_iter()
                    .any(|(port, protocol)| {
                        any_flow = true;
                        flows::verdict(
                            &index.ev,
                            &Target::Pod(src.clone()),
                            &Target::Pod(dst.clone()),
                            port,
                            protocol,
                        )
                        .is_ok_and(|v| v.allowed)
                    })
            })
        });
        if any_flow && !admitted {
            let (other_side, other_dir) = match d {
                Direction::Egress => ("destinations", "ingress"),
                Direction::Ingress => ("sources", "egress"),
            };
            out.push(finding(
                "one-sided",
                object(key),
                field.clone(),
                format!(
                    "{field} allows {side} {} pod(s), but every one of those {other_side} refuses the flow in its own {other_dir}: the allow is dead",
                    other_pods
                ),
                format!("add the matching {other_dir} rule on the {other_side}' side (a connection needs both)"),
            ));
        }
    }
}

/// The cluster DNS pods: the backends of Service kube-system/kube-dns, else kube-system pods
/// labelled k8s-app=kube-dns. `None` when the state has none (then a CoreDNS pod as kind and k3s
/// deploy it is assumed).
fn dns_pods(cluster: &Cluster) -> Vec<ObjectKey> {
    let by_service = cluster
        .services
        .get(&ObjectKey::new("kube-system", "kube-dns"))
        .and_then(|s| s.spec.as_ref()?.selector.clone());
    let selector =
        by_service.unwrap_or_else(|| [("k8s-app".to_string(), "kube-dns".to_string())].into());
    cluster
        .pods
        .iter()
        .filter(|(k, p)| {
            k.namespace == "kube-system"
                && !p.host_network
                && selector.iter().all(|(a, b)| p.labels.get(a) == Some(b))
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// Whether `peer` selects the cluster DNS that `missing-dns` assumes when the state has none
/// (kube-system pods labelled k8s-app=kube-dns): the allow that finding asks for is no
/// `peer-matches-nothing`.
fn selects_assumed_dns(cluster: &Cluster, policy: &ObjectKey, peer: &NetworkPolicyPeer) -> bool {
    let pod: Labels = [("k8s-app".to_string(), "kube-dns".to_string())].into();
    let namespace: Labels = [(NAMESPACE_NAME_LABEL.to_string(), "kube-system".to_string())].into();
    let in_namespace = match &peer.namespace_selector {
        None => policy.namespace == "kube-system",
        Some(s) => evaluator::selector_matches(s, &namespace),
    };
    peer.ip_block.is_none()
        && in_namespace
        && evaluator::selector_matches(&peer.pod_selector.clone().unwrap_or_default(), &pod)
        && dns_pods(cluster).is_empty()
}

fn missing_dns(index: &Index<'_>, out: &mut Vec<Finding>) {
    let mut cluster = index.cluster;
    let mut assumed = None;
    let mut dns = dns_pods(cluster);
    if dns.is_empty() {
        let mut c = cluster.clone();
        let key = ObjectKey::new("kube-system", "coredns (assumed)");
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": key.name, "namespace": key.namespace, "labels": {"k8s-app": "kube-dns"}},
            "spec": {"containers": [{"name": "coredns", "ports": [
                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}]}]}
        }))
        .expect("a valid pod");
        c.pods.insert(key.clone(), (&pod).into());
        dns = vec![key];
        assumed = Some(c);
    }
    if let Some(c) = &assumed {
        cluster = c;
    }
    let pods = index.by_namespace.values().flatten().map(|(k, _)| *k);
    let classes = Classes::new(cluster, pods, &[]);
    let assumed_ev = assumed.as_ref().map(Evaluator::new);
    let ev = assumed_ev.as_ref().unwrap_or(&index.ev);
    for members in &classes.members {
        let rep = members[0];
        if dns.contains(rep) {
            continue;
        }
        let from = Target::Pod(rep.clone());
        let reach = |protocol| {
            dns.iter().any(|d| {
                flows::verdict(ev, &from, &Target::Pod(d.clone()), 53, protocol)
                    .is_ok_and(|v| v.egress.outcome.allowed())
            })
        };
        let isolated = flows::verdict(ev, &from, &Target::Pod(dns[0].clone()), 53, Protocol::Udp)
            .is_ok_and(|v| !v.egress.isolating.is_empty());
        if !isolated {
            continue;
        }
        let (udp, tcp) = (reach(Protocol::Udp), reach(Protocol::Tcp));
        if udp && tcp {
            continue;
        }
        let others = if members.len() > 1 {
            format!(
                " (and {} other pod(s) with the same labels)",
                members.len() - 1
            )
        } else {
            String::new()
        };
        let target = if assumed.is_some() {
            "the cluster DNS (assumed: kube-system pods labelled k8s-app=kube-dns; none is in the state)"
        } else {
            "the cluster DNS pods"
        };
        let mut f = finding(
            "missing-dns",
            format!("Pod {rep}"),
            "egress".into(),
            format!(
                "{rep}{others} is isolated for egress and cannot reach {target} on {}",
                if udp { "TCP 53" } else if tcp { "UDP 53" } else { "UDP 53 or TCP 53" }
            ),
            "allow egress to namespaceSelector kubernetes.io/metadata.name=kube-system, podSelector k8s-app=kube-dns, on UDP and TCP 53".into(),
        );
        if udp {
            f.severity = Severity::Warning;
        }
        out.push(f);
    }
}

fn isolates_without_allow(index: &Index<'_>, out: &mut Vec<Finding>) {
    let cluster = index.cluster;
    for (ns, pods) in &index.by_namespace {
        let start = ObjectKey::new(*ns, "");
        let policies: Vec<(&ObjectKey, &NetworkPolicy)> = cluster
            .policies
            .range(start..)
            .take_while(|(k, _)| k.namespace == *ns)
            .collect();
        if policies.is_empty() {
            continue;
        }
        let mut seen: BTreeSet<(&Labels, Direction)> = BTreeSet::new();
        for (key, pod) in pods {
            for d in [Direction::Ingress, Direction::Egress] {
                if !seen.insert((&pod.labels, d)) {
                    continue;
                }
                let mut isolating = Vec::new();
                let mut any_rule = false;
                for (pk, np) in &policies {
                    let Some(spec) = &np.spec else { continue };
                    let selects = spec.pod_selector.as_ref().is_none_or(|s| {
                        !evaluator::selector_is_valid(s)
                            || evaluator::selector_matches(s, &pod.labels)
                    });
                    if selects && evaluator::declared_types(spec).contains(&d) {
                        isolating.push(pk.to_string());
                        any_rule |= !rules(spec, d).is_empty() && evaluator::policy_is_valid(np);
                    }
                }
                if isolating.is_empty() || any_rule {
                    continue;
                }
                let dir = match d {
                    Direction::Ingress => "ingress",
                    Direction::Egress => "egress",
                };
                let same = pods.iter().filter(|(_, p)| p.labels == pod.labels).count();
                out.push(finding(
                    "isolates-without-allow",
                    format!("Pod {key}"),
                    dir.into(),
                    format!(
                        "{key}{} is isolated for {dir} by {} and no policy selecting it has an {dir} rule: all its {dir} is denied",
                        if same > 1 { format!(" (and {} other pod(s) with the same labels)", same - 1) } else { String::new() },
                        isolating.join(", ")
                    ),
                    format!("apply the {dir} allows before (or with) the default deny, or exempt the pod from its podSelector"),
                ));
            }
        }
    }
}
