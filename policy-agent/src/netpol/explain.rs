//! `explain`: whether one flow is allowed, and why, per direction — computed by the reference
//! evaluator ([`evaluator::evaluate`] for the verdict, [`evaluator::trace`] for the rules).
//!
//! Policies in audit ([`crate::audit`]) are not enforced, so the verdict is that of the cluster
//! without them; what enforcing them would change is said apart ([`Explanation::audit`]).

use policy_common::Direction;
use serde::Serialize;

use super::flows::{self, Target};
use crate::audit;
use crate::evaluator::{
    self, Evaluator, Flow, LabelMiss, Outcome, PeerMiss, PortMiss, Protocol, RuleTrace,
};
use crate::model::{Cluster, NAMESPACE_NAME_LABEL, ObjectKey};

/// The JSON of `explain -o json` (one per port when the port is not given).
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    pub allowed: bool,
    pub egress: Side,
    pub ingress: Side,
    /// How the dataplane treats this flow beyond its first packet and what is not policy.
    pub notes: Vec<String>,
    /// Present when a policy in audit isolates the source's egress or the destination's
    /// ingress: what enforcing the audited policies would change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditExplanation>,
}

/// What enforcing the policies in audit would do to the flow.
#[derive(Clone, Debug, Serialize)]
pub struct AuditExplanation {
    /// The verdict were the audited policies enforced.
    pub allowed: bool,
    /// Per direction whose verdict they would change (empty: they change nothing here).
    pub changes: Vec<AuditChange>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AuditChange {
    /// `egress` (of the source) or `ingress` (of the destination).
    pub direction: &'static str,
    /// `would-drop` or `would-allow`.
    pub verdict: &'static str,
    /// would-drop: the audited policies that would isolate with no rule allowing the flow;
    /// would-allow: the audited policy whose rule would allow it.
    pub policies: Vec<String>,
    /// would-allow: that rule (`ingress[N]` / `egress[N]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// One direction: the source's egress or the destination's ingress.
#[derive(Clone, Debug, Serialize)]
pub struct Side {
    /// The subject is a pod isolated in this direction.
    pub isolated: bool,
    pub allowed: bool,
    /// `not-policed` (not a pod), `self`, `host` (the pod's own node), `not-isolated`,
    /// `allowed-by-policy`, `denied`, `denied-v4-mapped` (an IPv6 flow with an IPv4-mapped
    /// address, which no rule can allow).
    pub outcome: &'static str,
    /// The policies isolating the subject in this direction (enforced ones: not those in audit).
    pub policies: Vec<String>,
    /// The policies in audit that would isolate the subject in this direction.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audited: Vec<String>,
    pub allowed_by: Vec<RuleName>,
    /// When denied: the rule closest to allowing the flow, and what it lacks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nearest_miss: Option<NearestMiss>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RuleName {
    pub policy: String,
    /// `ingress[N]` or `egress[N]`.
    pub rule: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct NearestMiss {
    pub policy: String,
    pub rule: String,
    /// What differs, one sentence each.
    pub reasons: Vec<String>,
}

pub fn rule_name(r: &crate::compiler::RuleRef) -> RuleName {
    RuleName {
        policy: r.policy.to_string(),
        rule: r.rule_name(),
    }
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::NotPolicied => "not-policed",
        Outcome::SelfTraffic => "self",
        Outcome::Host => "host",
        Outcome::NotIsolated => "not-isolated",
        Outcome::AllowedByPolicy => "allowed-by-policy",
        Outcome::Denied => "denied",
        Outcome::DeniedV4Mapped => "denied-v4-mapped",
    }
}

/// Explains a flow on one port.
pub fn explain(
    cluster: &Cluster,
    from: &Target,
    to: &Target,
    port: u16,
    protocol: Protocol,
) -> Result<Explanation, String> {
    let (src, dst) = flows::ends(cluster, from, to)?;
    let flow = Flow {
        src,
        dst,
        protocol,
        port,
    };
    let audited = audit::audited(cluster);
    let full = Evaluator::new(cluster);
    let enforced = audit::enforced_view(cluster);
    let cluster: &Cluster = &enforced;
    let verdict = evaluator::evaluate(cluster, &flow);
    let in_audit = |d: Direction| -> Vec<String> {
        if audited.is_empty() {
            return Vec::new();
        }
        full.evaluate_direction(&flow, d)
            .isolating
            .iter()
            .filter(|k| audited.contains(k))
            .map(ToString::to_string)
            .collect()
    };
    let side = |d: Direction| {
        let v = match d {
            Direction::Egress => &verdict.egress,
            Direction::Ingress => &verdict.ingress,
        };
        let traces = evaluator::trace(cluster, &flow, d);
        Side {
            isolated: !v.isolating.is_empty(),
            allowed: v.outcome.allowed(),
            outcome: outcome_name(v.outcome),
            policies: v.isolating.iter().map(ToString::to_string).collect(),
            audited: in_audit(d),
            allowed_by: v.allowing.iter().map(rule_name).collect(),
            nearest_miss: (v.outcome == Outcome::Denied)
                .then(|| nearest_miss(&traces, &flow))
                .flatten(),
        }
    };
    let egress = side(Direction::Egress);
    let ingress = side(Direction::Ingress);
    let mut notes = Vec::new();
    if verdict.allowed {
        notes.push(
            "replies of this connection pass in both directions while it lasts (conntrack); \
             they are not judged by policy"
                .into(),
        );
    }
    for (who, s) in [(from, &egress), (to, &ingress)] {
        match s.outcome {
            "not-policed" => notes.push(format!(
                "{who} is not a policed pod (a node, a hostNetwork pod or an address outside the \
                 pod network): NetworkPolicy does not apply to its side"
            )),
            "host" => notes.push(format!(
                "the other end is the node {who} runs on: traffic between a pod and its own node \
                 (kubelet probes) is always allowed"
            )),
            "self" => notes.push("a pod always reaches itself".into()),
            _ => {}
        }
    }
    if let Some(ip) = [&flow.src, &flow.dst]
        .iter()
        .filter_map(|p| p.ip())
        .find(evaluator::is_v4_mapped)
    {
        notes.push(format!(
            "{ip} is an IPv4-mapped IPv6 address: the flow is IPv6, which neither the IPv4 \
             address it spells nor any rule can admit; it is dropped in every isolated direction \
             ({}) and passes unpoliced in the others",
            policy_common::Reason::DroppedV4Mapped.as_str()
        ));
    }
    // Said only where it can matter: the other side's isolating policies name an ipBlock.
    let unaddressed = |t: &Target| matches!(t, Target::Pod(k) if cluster.pods[k].ips.is_empty());
    let names_block = |policies: &[ObjectKey], d: Direction| {
        policies.iter().any(|k| {
            cluster.policies.get(k).is_some_and(|np| {
                np.spec.as_ref().is_some_and(|spec| {
                    evaluator::rule_parts(spec, d).iter().any(|(peers, _)| {
                        peers.is_some_and(|v| v.iter().any(|p| p.ip_block.is_some()))
                    })
                })
            })
        })
    };
    if (unaddressed(to) && names_block(&verdict.egress.isolating, Direction::Egress))
        || (unaddressed(from) && names_block(&verdict.ingress.isolating, Direction::Ingress))
    {
        notes.push(
            "a pod without an address (a workload's template, or not scheduled yet) matches pod \
             selectors but no ipBlock"
                .into(),
        );
    }
    let audit = (!egress.audited.is_empty() || !ingress.audited.is_empty()).then(|| {
        let mut changes = Vec::new();
        for (d, s) in [(Direction::Egress, &egress), (Direction::Ingress, &ingress)] {
            if let Some(f) = audit::judge(&full, &audited, &flow, d, s.allowed) {
                let (policies, rule) = match &f {
                    audit::Finding::WouldDrop { policies } => {
                        (policies.iter().map(ToString::to_string).collect(), None)
                    }
                    audit::Finding::WouldAllow { rule } => {
                        let name = rule_name(rule);
                        (vec![name.policy], Some(name.rule))
                    }
                };
                changes.push(AuditChange {
                    direction: direction_name(d),
                    verdict: f.verdict(),
                    policies,
                    rule,
                });
            }
        }
        AuditExplanation {
            allowed: full.evaluate(&flow).allowed,
            changes,
        }
    });
    Ok(Explanation {
        from: from.to_string(),
        to: to.to_string(),
        port,
        protocol,
        allowed: verdict.allowed,
        egress,
        ingress,
        notes,
        audit,
    })
}

/// The rule closest to allowing the flow, with its misses in words.
fn nearest_miss(traces: &[RuleTrace], flow: &Flow) -> Option<NearestMiss> {
    let best = traces.iter().min_by_key(|t| t.distance())?;
    let mut reasons = Vec::new();
    if let Some(peers) = best.peers.as_ref().filter(|p| !p.is_empty()) {
        let (index, misses) = peers.iter().enumerate().min_by_key(|(_, m)| m.len())?;
        let side = match best.rule.direction {
            Direction::Egress => "to",
            Direction::Ingress => "from",
        };
        for m in misses {
            reasons.push(format!(
                "{side}[{index}]: {}",
                peer_miss_text(m, flow, best.rule.direction)
            ));
        }
    }
    if !best.ports_match()
        && let Some(ports) = &best.ports
    {
        let texts: Vec<String> = ports
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                m.as_ref()
                    .map(|m| format!("ports[{i}]: {}", port_miss_text(m)))
            })
            .collect();
        reasons.extend(texts);
    }
    let name = rule_name(&best.rule);
    Some(NearestMiss {
        policy: name.policy,
        rule: name.rule,
        reasons,
    })
}

fn label_text(m: &LabelMiss, whose: &str) -> String {
    let have = match &m.actual {
        Some(v) => format!("{whose} has {}={v}", m.key),
        None => format!("{whose} has no label {}", m.key),
    };
    let want = match m.operator.as_str() {
        "In" if m.values.len() == 1 => format!("{}={}", m.key, m.values[0]),
        "In" => format!("{} in ({})", m.key, m.values.join(", ")),
        "NotIn" => format!("{} not in ({})", m.key, m.values.join(", ")),
        "Exists" => format!("label {} present", m.key),
        "DoesNotExist" => format!("label {} absent", m.key),
        other => format!("{} {other} {:?}", m.key, m.values),
    };
    format!("wants {want}, {have}")
}

fn peer_miss_text(m: &PeerMiss, flow: &Flow, direction: Direction) -> String {
    let other = match direction {
        Direction::Egress => "the destination",
        Direction::Ingress => "the source",
    };
    let other_peer = match direction {
        Direction::Egress => &flow.dst,
        Direction::Ingress => &flow.src,
    };
    match m {
        PeerMiss::NotInCidr { cidr } => match other_peer.ip() {
            Some(ip) => format!("ipBlock {cidr} does not contain {ip}"),
            None => format!("ipBlock {cidr}: {other} has no address"),
        },
        PeerMiss::InExcept { cidr, except } => {
            format!("ipBlock {cidr} excepts {except}, which contains {other}")
        }
        PeerMiss::NotAPod => format!("selects pods, and {other} is not a pod"),
        PeerMiss::OtherNamespace {
            policy_namespace,
            peer_namespace,
        } => format!(
            "without namespaceSelector it selects pods of {policy_namespace} only; {other} is in \
             {peer_namespace}"
        ),
        PeerMiss::NamespaceLabel(l) => {
            let mut text = format!("namespaceSelector {}", label_text(l, "its namespace"));
            if l.key == "name"
                && l.actual.is_none()
                && let evaluator::Peer::Pod { pod, .. } | evaluator::Peer::PodWithoutAddress(pod) =
                    other_peer
            {
                text.push_str(&format!(
                    " (namespaces carry {NAMESPACE_NAME_LABEL}={} automatically; a `name` label \
                     only if someone set it)",
                    pod.namespace
                ));
            }
            text
        }
        PeerMiss::PodLabel(l) => format!("podSelector {}", label_text(l, other)),
    }
}

fn port_miss_text(m: &PortMiss) -> String {
    match m {
        PortMiss::Protocol { rule, flow } => format!("protocol {rule}, the flow is {flow}"),
        PortMiss::Number {
            port,
            end_port: None,
            flow,
        } => format!("port {port}, the flow is to {flow}"),
        PortMiss::Number {
            port,
            end_port: Some(end),
            flow,
        } => format!("ports {port}-{end}, the flow is to {flow}"),
        PortMiss::NamedPort {
            name,
            destination_declares: Some(n),
        } => format!("named port {name} is {n} on the destination"),
        PortMiss::NamedPort {
            name,
            destination_declares: None,
        } => format!("named port {name}: the destination declares no such port"),
    }
}

/// The text form of an explanation.
pub fn render(e: &Explanation) -> String {
    let mut out = format!(
        "{} -> {} {}/{}: {}\n",
        e.from,
        e.to,
        e.protocol,
        e.port,
        if e.allowed { "ALLOWED" } else { "DENIED" }
    );
    for (title, s) in [
        ("egress of the source", &e.egress),
        ("ingress of the destination", &e.ingress),
    ] {
        out.push_str(&format!("  {title}: {}", s.outcome));
        if s.isolated {
            out.push_str(&format!(" (isolated by {})", s.policies.join(", ")));
        }
        if !s.audited.is_empty() {
            out.push_str(&format!(" (in audit: {})", s.audited.join(", ")));
        }
        out.push('\n');
        for r in &s.allowed_by {
            out.push_str(&format!("    allowed by {} {}\n", r.policy, r.rule));
        }
        if let Some(m) = &s.nearest_miss {
            out.push_str(&format!(
                "    no rule allows it; nearest: {} {}\n",
                m.policy, m.rule
            ));
            for r in &m.reasons {
                out.push_str(&format!("      - {r}\n"));
            }
        } else if s.outcome == "denied" {
            out.push_str(
                "    no rule allows it: the isolating policies have no rule for this direction\n",
            );
        } else if s.outcome == "denied-v4-mapped" {
            out.push_str("    no rule can allow an IPv6 flow with an IPv4-mapped address\n");
        }
    }
    if let Some(a) = &e.audit {
        if a.changes.is_empty() {
            out.push_str("  audit: enforcing the policies in audit would not change this flow\n");
        }
        for c in &a.changes {
            let side = match c.direction {
                "egress" => "egress of the source",
                _ => "ingress of the destination",
            };
            match &c.rule {
                None => out.push_str(&format!(
                    "  audit: would-drop at {side}: {} would isolate it and no rule allows it\n",
                    c.policies.join(", ")
                )),
                Some(rule) => out.push_str(&format!(
                    "  audit: would-allow at {side}: {} {rule} would allow it\n",
                    c.policies.join(", ")
                )),
            }
        }
        if !a.changes.is_empty() {
            out.push_str(&format!(
                "  audit: enforced, the flow would be {}\n",
                if a.allowed { "ALLOWED" } else { "DENIED" }
            ));
        }
    }
    for n in &e.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{add_pod, ip, pod, policy};

    #[test]
    fn a_v4_mapped_source_is_denied_with_its_own_outcome() {
        let mut c = Cluster::default();
        let web = add_pod(
            &mut c,
            "x",
            "web",
            pod(
                "n1",
                serde_json::json!({"app": "web"}),
                &["10.244.1.5", "fd00::5"],
            ),
        );
        let spec = serde_json::json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.2.7/32"}}]}],
        });
        c.policies
            .insert(ObjectKey::new("x", "web"), policy("x", "web", spec));
        let to = Target::Pod(web);
        let v4 = explain(
            &c,
            &Target::Address(ip("10.244.2.7")),
            &to,
            80,
            Protocol::Tcp,
        )
        .unwrap();
        assert!(v4.allowed);
        let from = Target::Address(ip("::ffff:10.244.2.7"));
        let e = explain(&c, &from, &to, 80, Protocol::Tcp).unwrap();
        assert!(!e.allowed);
        assert_eq!(e.ingress.outcome, "denied-v4-mapped");
        assert!(e.ingress.isolated && !e.ingress.allowed);
        assert!(e.ingress.nearest_miss.is_none());
        assert!(
            e.notes.iter().any(|n| n.contains("dropped_v4_mapped")),
            "{:?}",
            e.notes
        );
        let text = render(&e);
        assert!(
            text.contains("ingress of the destination: denied-v4-mapped"),
            "{text}"
        );
        assert!(text.contains("no rule can allow"), "{text}");
    }
}
