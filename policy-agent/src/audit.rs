//! Audit mode: NetworkPolicies that are reported on but not enforced.
//!
//! The annotation `policy-agent/audit: "true"` on a NetworkPolicy puts that policy in audit; on a
//! Namespace, every NetworkPolicy of that namespace. Only the exact value `"true"` does; any other
//! value is reported as an input error ([`annotation_errors`]) and the policy is enforced.
//!
//! An audited policy is not enforced: the agent compiles the [`enforced_view`], the cluster
//! without audited policies, so the kernel behaves exactly as if they did not exist. What
//! enforcing them would change is judged flow by flow ([`judge`]) from the verdict events the
//! kernel reports: `would-drop` for an allowed new flow that an audited policy would isolate with
//! no rule allowing it, `would-allow` for a dropped new flow that an audited policy's rule would
//! allow. Removing the annotation enforces the policy with the next sync.

use std::{borrow::Cow, collections::BTreeSet};

use k8s_openapi::{
    api::{core::v1::Namespace, networking::v1::NetworkPolicy},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use policy_common::Direction;

use crate::{
    compiler::RuleRef,
    evaluator::{Evaluator, Flow, Outcome},
    model::{Cluster, ObjectKey},
};

/// The annotation that puts a NetworkPolicy (or every NetworkPolicy of a Namespace) in audit.
pub const ANNOTATION: &str = "policy-agent/audit";
/// The one value of [`ANNOTATION`] that means audit.
pub const AUDIT_VALUE: &str = "true";

/// What an object's [`ANNOTATION`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark<'a> {
    /// No annotation.
    Absent,
    /// Exactly `"true"`.
    Audit,
    /// Any other value (not audit).
    Invalid(&'a str),
}

/// Reads [`ANNOTATION`] of one object.
pub fn mark(meta: &ObjectMeta) -> Mark<'_> {
    match meta.annotations.as_ref().and_then(|a| a.get(ANNOTATION)) {
        None => Mark::Absent,
        Some(v) if v == AUDIT_VALUE => Mark::Audit,
        Some(v) => Mark::Invalid(v),
    }
}

/// Whether a policy is in audit: its own annotation, or that of its namespace, is `"true"`.
pub fn is_audited(policy: &NetworkPolicy, namespace: Option<&Namespace>) -> bool {
    mark(&policy.metadata) == Mark::Audit
        || namespace.is_some_and(|ns| mark(&ns.metadata) == Mark::Audit)
}

/// Every policy of the cluster that is in audit.
pub fn audited(cluster: &Cluster) -> BTreeSet<ObjectKey> {
    cluster
        .policies
        .iter()
        .filter(|(key, np)| is_audited(np, cluster.namespaces.get(&key.namespace)))
        .map(|(key, _)| key.clone())
        .collect()
}

/// The cluster as the kernel enforces it: without the audited policies. Borrowed (no copy) when
/// no policy is in audit; otherwise a copy of the cluster less those policies.
pub fn enforced_view(cluster: &Cluster) -> Cow<'_, Cluster> {
    let audited = audited(cluster);
    if audited.is_empty() {
        return Cow::Borrowed(cluster);
    }
    let mut view = cluster.clone();
    view.policies.retain(|key, _| !audited.contains(key));
    Cow::Owned(view)
}

/// An [`ANNOTATION`] with a value other than `"true"`, one message per object naming it and the
/// annotation. Such an object is not in audit.
pub fn annotation_errors(cluster: &Cluster) -> Vec<String> {
    let field = format!("metadata.annotations[\"{ANNOTATION}\"]");
    let mut out = Vec::new();
    for (name, ns) in &cluster.namespaces {
        if let Mark::Invalid(v) = mark(&ns.metadata) {
            out.push(format!(
                "Namespace {name}: {field}: {v:?} is not \"true\", the only value that means \
                 audit; its NetworkPolicies are enforced"
            ));
        }
    }
    for (key, np) in &cluster.policies {
        if let Mark::Invalid(v) = mark(&np.metadata) {
            out.push(format!(
                "NetworkPolicy {key}: {field}: {v:?} is not \"true\", the only value that means \
                 audit; the policy is enforced"
            ));
        }
    }
    out
}

/// What enforcing the audited policies would change for one direction of one flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The flow is allowed today; the audited `policies` would isolate the subject in this
    /// direction and no rule would allow the flow.
    WouldDrop { policies: Vec<ObjectKey> },
    /// The flow is dropped today; this rule of an audited policy would allow it (the first such
    /// rule in policy and rule order, the one the dataplane would name).
    WouldAllow { rule: RuleRef },
}

impl Finding {
    /// `would-drop` or `would-allow`.
    pub fn verdict(&self) -> &'static str {
        match self {
            Finding::WouldDrop { .. } => "would-drop",
            Finding::WouldAllow { .. } => "would-allow",
        }
    }

    /// The audited policies the finding names.
    pub fn policies(&self) -> Vec<&ObjectKey> {
        match self {
            Finding::WouldDrop { policies } => policies.iter().collect(),
            Finding::WouldAllow { rule } => vec![&rule.policy],
        }
    }
}

/// Judges one direction of a new flow: `full` evaluates the whole cluster (audited policies
/// treated as enforced), `enforced_allowed` is today's verdict for that direction (the kernel's,
/// or the evaluator over the [`enforced_view`]). `None` when enforcing the audited policies
/// changes nothing, or when the difference is not theirs to make (a would-drop needs an audited
/// policy among those isolating; a would-allow an audited policy's rule).
pub fn judge(
    full: &Evaluator<'_>,
    audited: &BTreeSet<ObjectKey>,
    flow: &Flow,
    direction: Direction,
    enforced_allowed: bool,
) -> Option<Finding> {
    if audited.is_empty() {
        return None;
    }
    let verdict = full.evaluate_direction(flow, direction);
    match (enforced_allowed, verdict.outcome) {
        (true, Outcome::Denied | Outcome::DeniedV4Mapped) => {
            let policies: Vec<ObjectKey> = verdict
                .isolating
                .into_iter()
                .filter(|k| audited.contains(k))
                .collect();
            (!policies.is_empty()).then_some(Finding::WouldDrop { policies })
        }
        (false, Outcome::AllowedByPolicy) => verdict
            .allowing
            .into_iter()
            .find(|r| audited.contains(&r.policy))
            .map(|rule| Finding::WouldAllow { rule }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::evaluator::{Peer, Protocol};
    use crate::model::NAMESPACE_NAME_LABEL;

    fn namespace(name: &str, annotations: &[(&str, &str)]) -> Namespace {
        let a: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        serde_json::from_value(json!({"metadata": {
            "name": name,
            "labels": {NAMESPACE_NAME_LABEL: name},
            "annotations": a,
        }}))
        .unwrap()
    }

    fn policy(
        ns: &str,
        name: &str,
        annotations: &[(&str, &str)],
        spec: serde_json::Value,
    ) -> NetworkPolicy {
        let a: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "annotations": a},
            "spec": spec,
        }))
        .unwrap()
    }

    fn pod(ns: &str, name: &str, ip: &str) -> crate::model::PodInfo {
        let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .unwrap();
        p.into()
    }

    const DENY_INGRESS: fn() -> serde_json::Value =
        || json!({"podSelector": {}, "policyTypes": ["Ingress"]});

    /// Namespaces x (plain) and y (annotated `ns_mark`), pods x/a and y/b, and the policies given.
    fn cluster(ns_mark: &[(&str, &str)], policies: Vec<NetworkPolicy>) -> Cluster {
        let mut c = Cluster::default();
        c.namespaces.insert("x".into(), namespace("x", &[]));
        c.namespaces.insert("y".into(), namespace("y", ns_mark));
        c.pods
            .insert(ObjectKey::new("x", "a"), pod("x", "a", "10.0.0.1"));
        c.pods
            .insert(ObjectKey::new("y", "b"), pod("y", "b", "10.0.0.2"));
        for p in policies {
            let key = ObjectKey::new(
                p.metadata.namespace.clone().unwrap(),
                p.metadata.name.clone().unwrap(),
            );
            c.policies.insert(key, p);
        }
        c
    }

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey::new(ns, name)
    }

    fn flow(c: &Cluster, from: &str, to: &str, port: u16) -> Flow {
        let peer = |s: &str| {
            let (ns, name) = s.split_once('/').unwrap();
            let k = key(ns, name);
            Peer::Pod {
                ip: c.pods[&k].ips[0],
                pod: k,
            }
        };
        Flow {
            src: peer(from),
            dst: peer(to),
            protocol: Protocol::Tcp,
            port,
        }
    }

    #[test]
    fn only_true_on_the_policy_or_its_namespace_is_audit() {
        let ann = |v: &'static str| vec![(ANNOTATION, v)];
        let p = |ns: &str, name: &str, a: &[(&str, &str)]| policy(ns, name, a, DENY_INGRESS());
        for (policy_mark, ns_mark, want) in [
            (vec![], vec![], false),
            (ann("true"), vec![], true),
            (vec![], ann("true"), true),
            (ann("yes"), vec![], false),
            (ann("True"), vec![], false),
            (vec![], ann("1"), false),
            (ann("false"), ann("true"), true),
            (vec![("other/audit", "true")], vec![], false),
        ] {
            let ns = namespace("y", &ns_mark);
            assert_eq!(
                is_audited(&p("y", "deny", &policy_mark), Some(&ns)),
                want,
                "{policy_mark:?} {ns_mark:?}"
            );
        }
        assert!(is_audited(&p("y", "deny", &ann("true")), None));
        assert!(!is_audited(&p("y", "deny", &[]), None));

        // The namespace's annotation covers its own policies only.
        let c = cluster(
            &ann("true"),
            vec![
                p("x", "deny", &[]),
                p("y", "deny", &[]),
                p("x", "audited", &ann("true")),
            ],
        );
        assert_eq!(
            audited(&c),
            BTreeSet::from([key("x", "audited"), key("y", "deny")])
        );
    }

    #[test]
    fn invalid_values_are_input_errors_naming_object_and_annotation() {
        let c = cluster(
            &[(ANNOTATION, "yes")],
            vec![
                policy("x", "p", &[(ANNOTATION, "on")], DENY_INGRESS()),
                policy("x", "q", &[(ANNOTATION, "true")], DENY_INGRESS()),
            ],
        );
        let errors = annotation_errors(&c);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0]
                .starts_with("Namespace y: metadata.annotations[\"policy-agent/audit\"]: \"yes\""),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].starts_with(
                "NetworkPolicy x/p: metadata.annotations[\"policy-agent/audit\"]: \"on\""
            ),
            "{}",
            errors[1]
        );
        assert!(audited(&c).contains(&key("x", "q")));
        assert_eq!(audited(&c).len(), 1);
    }

    #[test]
    fn the_enforced_view_lacks_exactly_the_audited_policies() {
        let c = cluster(&[], vec![policy("x", "deny", &[], DENY_INGRESS())]);
        assert!(matches!(enforced_view(&c), Cow::Borrowed(_)));

        let c = cluster(
            &[(ANNOTATION, "true")],
            vec![
                policy("x", "deny", &[], DENY_INGRESS()),
                policy("x", "audited", &[(ANNOTATION, "true")], DENY_INGRESS()),
                policy("y", "deny", &[], DENY_INGRESS()),
            ],
        );
        let view = enforced_view(&c);
        assert_eq!(
            view.policies.keys().cloned().collect::<Vec<_>>(),
            vec![key("x", "deny")]
        );
        assert_eq!(c.policies.len(), 3, "the cluster itself is untouched");
        assert_eq!(view.pods, c.pods);
        assert_eq!(view.namespaces, c.namespaces);
    }

    #[test]
    fn judge_reports_would_drop_and_would_allow_only_for_audited_policies() {
        let audit = [(ANNOTATION, "true")];
        // y/deny (audited) isolates y/b's ingress; y/allow-a (audited) allows x/a on port 80.
        let c = cluster(
            &[],
            vec![
                policy("y", "deny", &audit, DENY_INGRESS()),
                policy(
                    "y",
                    "allow-a",
                    &audit,
                    json!({"podSelector": {}, "ingress": [
                        {"ports": [{"port": 8080}]},
                        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 80}]},
                    ]}),
                ),
            ],
        );
        let audited = audited(&c);
        let full = Evaluator::new(&c);
        let to_b = |port| flow(&c, "x/a", "y/b", port);
        // Allowed today (not isolated); enforcing denies port 443.
        assert_eq!(
            judge(&full, &audited, &to_b(443), Direction::Ingress, true),
            Some(Finding::WouldDrop {
                policies: vec![key("y", "allow-a"), key("y", "deny")]
            })
        );
        // Port 80 stays allowed: nothing to report.
        assert_eq!(
            judge(&full, &audited, &to_b(80), Direction::Ingress, true),
            None
        );
        // Dropped today (say by an enforced policy the evaluator also sees): port 80 would be
        // allowed by allow-a's second rule.
        let f = judge(&full, &audited, &to_b(80), Direction::Ingress, false).unwrap();
        assert_eq!(f.verdict(), "would-allow");
        assert_eq!(
            f,
            Finding::WouldAllow {
                rule: RuleRef {
                    policy: key("y", "allow-a"),
                    direction: Direction::Ingress,
                    rule_index: 1
                }
            }
        );
        // Dropped and still denied: nothing to report.
        assert_eq!(
            judge(&full, &audited, &to_b(443), Direction::Ingress, false),
            None
        );
        // Egress of x/a is not isolated by anything.
        assert_eq!(
            judge(&full, &audited, &to_b(443), Direction::Egress, true),
            None
        );

        // Enforced policies make no findings: the same cluster without annotations.
        let mut plain = c.clone();
        for np in plain.policies.values_mut() {
            np.metadata.annotations = None;
        }
        let none = BTreeSet::new();
        let full = Evaluator::new(&plain);
        assert_eq!(
            judge(&full, &none, &to_b(443), Direction::Ingress, true),
            None
        );
        // A denial by an enforced policy the kernel disagreed with is not audit's to report.
        let only_allow_a = BTreeSet::from([key("y", "allow-a")]);
        assert_eq!(
            judge(&full, &only_allow_a, &to_b(443), Direction::Ingress, true),
            Some(Finding::WouldDrop {
                policies: vec![key("y", "allow-a")]
            })
        );
        let only_deny = BTreeSet::from([key("y", "deny")]);
        assert_eq!(
            judge(&full, &only_deny, &to_b(80), Direction::Ingress, false),
            None,
            "the allowing rule is not audited"
        );
    }
}
