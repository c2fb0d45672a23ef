//! `kubectl netpol advise`: least-privilege NetworkPolicies from observed flows.
//!
//! - Workloads: the pods of one namespace with the same *stable* labels — their labels without
//!   those a controller stamps per revision or per pod ([`VOLATILE_LABELS`]). Each workload that
//!   took part in an observed flow gets one policy, `advised-<name>`, isolating it for ingress and
//!   egress. A pod without stable labels cannot be selected on its own: it is reported, not
//!   advised.
//! - A workload's selector is its stable labels, plus `DoesNotExist` for a label of every other
//!   workload of the namespace whose labels include all of them (so it selects no other
//!   workload's pods).
//! - Rules: one per peer, with the numeric ports and protocols observed. A peer pod is named by
//!   its workload's selector (and, in another namespace, `kubernetes.io/metadata.name`), never
//!   by address; any other address (off-cluster, another node) is an `ipBlock` of that one
//!   address. Flows from the subject's own node and a pod's traffic to itself are always
//!   allowed and give no rule. The source's half of a flow through a Service names the
//!   ClusterIP: it is paired with the backend's ingress half of the same source address and port
//!   (DNAT keeps both), or, when no agent recorded that half, stands for every backend of the
//!   Service.
//! - Egress to the cluster DNS (`kube-system` pods `k8s-app=kube-dns`, UDP and TCP 53) is always
//!   included: lookups are cached and easily missed while flows are watched (an observed rule it
//!   covers is left out). Workloads of `kube-system` are advised only with `--namespace
//!   kube-system`: its policies would decide the whole cluster's DNS.
//! - The observed flows are the allowed ones (a flow the kernel dropped did not happen); with
//!   audited policies, flows they would drop were allowed and count.
//! - Every observed flow is checked against the advised state with the evaluator; one it would
//!   deny (a bug, or a flow of a pod that cannot be advised) is listed in [`Advice::denied`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::evaluator::{self, Evaluator, Peer, Protocol};
use crate::flowstore::FlowRecord;
use crate::model::{Cluster, Labels, NAMESPACE_NAME_LABEL, ObjectKey, PodInfo};

/// Labels that differ between pods of one workload, or between its revisions.
pub const VOLATILE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index",
    "controller-uid",
];

/// The cluster's own namespace: its workloads (the DNS among them) are advised only when asked
/// for by name.
const SYSTEM_NAMESPACE: &str = "kube-system";

/// Labels whose value names a workload, in order of preference.
const NAME_LABELS: &[&str] = &["app.kubernetes.io/name", "app", "k8s-app", "name"];

#[derive(Clone, Debug, Default)]
pub struct AdviseOptions {
    /// Only advise workloads of this namespace (peers anywhere).
    pub namespace: Option<String>,
    /// Annotate every policy `policy-agent/audit: "true"`.
    pub audit: bool,
}

/// What `advise` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Advice {
    #[serde(skip)]
    pub policies: Vec<NetworkPolicy>,
    /// Observed flows that gave a rule (or were already allowed by construction).
    pub flows_used: usize,
    /// Records skipped, with why (a reason once per kind of record).
    pub skipped: BTreeMap<String, usize>,
    /// Pods that cannot be advised, with why.
    pub unadvised: Vec<String>,
    /// Observed flows the advised state would deny: `src -> dst PROTO/PORT`.
    pub denied: Vec<String>,
}

/// One workload: its namespace, name and stable labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Workload {
    namespace: String,
    name: String,
    labels: Labels,
}

/// The other end of an advised rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum RulePeer {
    Workload(usize),
    Address(IpAddr),
}

type PortSet = BTreeSet<(Protocol, u16)>;

#[derive(Default)]
struct Rules {
    ingress: BTreeMap<RulePeer, PortSet>,
    egress: BTreeMap<RulePeer, PortSet>,
    flows: usize,
}

fn stable_labels(pod: &PodInfo) -> Labels {
    pod.labels
        .iter()
        .filter(|(k, _)| !VOLATILE_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A DNS-1123 label made of `text` (lowercase alphanumerics and `-`).
fn dns_label(text: &str) -> String {
    let mut s: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches('-').to_string();
    s.truncate(50);
    s.trim_end_matches('-').to_string()
}

struct Index {
    workloads: Vec<Workload>,
    /// Pod → its workload.
    of_pod: BTreeMap<ObjectKey, usize>,
    /// Pod address → pod.
    by_ip: BTreeMap<IpAddr, ObjectKey>,
    /// Every Service ClusterIP.
    service_ips: BTreeSet<IpAddr>,
    unadvised: Vec<String>,
}

impl Index {
    fn new(cluster: &Cluster) -> Index {
        let mut groups: BTreeMap<(String, Labels), Vec<ObjectKey>> = BTreeMap::new();
        let mut unadvised = Vec::new();
        let by_ip = crate::model::pods_by_address(cluster)
            .into_iter()
            .map(|(ip, key)| (ip, key.clone()))
            .collect();
        for (key, pod) in &cluster.pods {
            if !pod.owns_addresses() {
                continue;
            }
            let labels = stable_labels(pod);
            if labels.is_empty() {
                unadvised.push(format!(
                    "{key}: no labels but per-revision ones, so no selector picks it alone; label it"
                ));
                continue;
            }
            groups
                .entry((key.namespace.clone(), labels))
                .or_default()
                .push(key.clone());
        }
        let mut workloads = Vec::new();
        let mut of_pod = BTreeMap::new();
        let mut names: BTreeSet<(String, String)> = BTreeSet::new();
        for ((namespace, labels), pods) in groups {
            let base = NAME_LABELS
                .iter()
                .find_map(|l| labels.get(*l))
                .map(|v| dns_label(v))
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| dns_label(&pods[0].name));
            let mut name = base.clone();
            let mut n = 2;
            while !names.insert((namespace.clone(), name.clone())) {
                name = format!("{base}-{n}");
                n += 1;
            }
            for pod in pods {
                of_pod.insert(pod, workloads.len());
            }
            workloads.push(Workload {
                namespace,
                name,
                labels,
            });
        }
        let service_ips = crate::model::service_cluster_ips(cluster).collect();
        Index {
            workloads,
            of_pod,
            by_ip,
            service_ips,
            unadvised,
        }
    }

    /// The selector of workload `w`: its labels, and `DoesNotExist` for a label of each other
    /// workload of its namespace whose labels include all of them.
    fn selector(&self, w: usize) -> LabelSelector {
        let me = &self.workloads[w];
        let mut absent = BTreeSet::new();
        for (i, other) in self.workloads.iter().enumerate() {
            if i == w || other.namespace != me.namespace {
                continue;
            }
            if me
                .labels
                .iter()
                .all(|(k, v)| other.labels.get(k) == Some(v))
                && let Some(extra) = other.labels.keys().find(|k| !me.labels.contains_key(*k))
            {
                absent.insert(extra.clone());
            }
        }
        LabelSelector {
            match_labels: Some(me.labels.clone()),
            match_expressions: (!absent.is_empty()).then(|| {
                absent
                    .into_iter()
                    .map(|key| LabelSelectorRequirement {
                        key,
                        operator: "DoesNotExist".into(),
                        values: None,
                    })
                    .collect()
            }),
        }
    }

    fn peer(&self, subject: usize, peer: &RulePeer) -> NetworkPolicyPeer {
        match peer {
            RulePeer::Workload(w) => NetworkPolicyPeer {
                pod_selector: Some(self.selector(*w)),
                namespace_selector: (self.workloads[*w].namespace
                    != self.workloads[subject].namespace)
                    .then(|| namespace_selector(&self.workloads[*w].namespace)),
                ip_block: None,
            },
            RulePeer::Address(ip) => NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: match ip {
                        IpAddr::V4(_) => format!("{ip}/32"),
                        IpAddr::V6(_) => format!("{ip}/128"),
                    },
                    except: None,
                }),
                ..Default::default()
            },
        }
    }
}

fn namespace_selector(namespace: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some([(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string())].into()),
        match_expressions: None,
    }
}

fn ports(set: &PortSet) -> Vec<NetworkPolicyPort> {
    set.iter()
        .map(|(protocol, port)| NetworkPolicyPort {
            port: Some(IntOrString::Int(i32::from(*port))),
            protocol: Some(protocol.as_str().into()),
            end_port: None,
        })
        .collect()
}

/// The cluster DNS peer: kube-system pods labelled `k8s-app=kube-dns`, UDP and TCP 53.
fn dns_ports() -> PortSet {
    [(Protocol::Udp, 53), (Protocol::Tcp, 53)].into()
}

fn dns_rule() -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(namespace_selector(SYSTEM_NAMESPACE)),
            pod_selector: Some(LabelSelector {
                match_labels: Some([("k8s-app".to_string(), "kube-dns".to_string())].into()),
                match_expressions: None,
            }),
            ip_block: None,
        }]),
        ports: Some(ports(&dns_ports())),
    }
}

/// The address owned by the node `node` (as the evaluator reads it).
fn owned_by_node(cluster: &Cluster, node: Option<&str>, ip: IpAddr) -> bool {
    node.is_some_and(|n| {
        crate::model::nodes_owned_addresses(cluster)
            .get(n)
            .is_some_and(|a| a.contains(&ip))
    })
}

/// Advises policies for `cluster` from `records`.
pub fn advise(cluster: &Cluster, records: &[FlowRecord], options: &AdviseOptions) -> Advice {
    let index = Index::new(cluster);
    let mut learner = Learner {
        cluster,
        index: &index,
        options,
        rules: BTreeMap::new(),
        observed: BTreeSet::new(),
        advice: Advice {
            unadvised: index.unadvised.clone(),
            ..Default::default()
        },
    };
    // The other half of a connection through a Service: the backend's ingress record of the
    // same source address and port (DNAT keeps the source).
    let backend_half: BTreeMap<(IpAddr, u16, &str), (IpAddr, u16)> = records
        .iter()
        .map(|r| &r.flow)
        .filter(|f| f.verdict == "allowed" && f.direction == "ingress")
        .filter(|f| index.by_ip.contains_key(&f.dst))
        .map(|f| ((f.src, f.sport, f.protocol.as_str()), (f.dst, f.dport)))
        .collect();
    for r in records {
        let f = &r.flow;
        if f.verdict != "allowed" {
            learner.skip("not allowed by the kernel (did not happen)");
            continue;
        }
        let Some(protocol) = Protocol::parse(&f.protocol) else {
            learner.skip("not TCP, UDP or SCTP");
            continue;
        };
        // (destination, port) pairs: a Service ClusterIP stands for the backend it reached.
        let destinations = if index.service_ips.contains(&f.dst) {
            match backend_half.get(&(f.src, f.sport, f.protocol.as_str())) {
                Some(&half) => vec![half],
                None => service_backends(cluster, f.dst, f.dport, protocol),
            }
        } else {
            vec![(f.dst, f.dport)]
        };
        if destinations.is_empty() {
            learner.skip("to a Service ClusterIP that selects no pod");
        }
        for (dst, port) in destinations {
            learner.learn(f.direction == "ingress", f.src, dst, protocol, port);
        }
    }
    let Learner {
        rules,
        observed,
        mut advice,
        ..
    } = learner;
    for (w, r) in &rules {
        advice.policies.push(policy(&index, *w, r, options));
    }
    advice
        .denied
        .extend(check(cluster, &advice.policies, &observed));
    advice.denied.sort();
    advice.denied.dedup();
    advice
}

/// The backends `(pod address, target port)` a connection to a Service's `cluster_ip:port`
/// can reach: the pods its selector picks, with the target port resolved on each (a name by the
/// pod's container ports).
fn service_backends(
    cluster: &Cluster,
    cluster_ip: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Vec<(IpAddr, u16)> {
    let ip = cluster_ip.to_string();
    let mut out = Vec::new();
    for (key, service) in &cluster.services {
        let Some(spec) = &service.spec else { continue };
        let has_ip = spec.cluster_ip.as_deref() == Some(ip.as_str())
            || spec.cluster_ips.iter().flatten().any(|c| *c == ip);
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty() && has_ip) else {
            continue;
        };
        for sp in spec.ports.iter().flatten() {
            let sp_protocol = Protocol::parse_defaulted(sp.protocol.as_deref());
            if sp.port != i32::from(port) || sp_protocol != Some(protocol) {
                continue;
            }
            for (pk, pod) in &cluster.pods {
                if pk.namespace != key.namespace
                    || pod.host_network
                    || pod.terminated
                    || !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
                {
                    continue;
                }
                let target = match &sp.target_port {
                    None => Some(port),
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                    Some(IntOrString::String(name)) => pod
                        .named_port_fields()
                        .find(|(n, p, _)| n == name && *p == protocol)
                        .map(|(_, _, n)| n),
                };
                if let Some(target) = target {
                    out.extend(
                        pod.ips
                            .iter()
                            .filter(|a| a.is_ipv4() == cluster_ip.is_ipv4())
                            .map(|a| (*a, target)),
                    );
                }
            }
        }
    }
    out
}

/// Accumulates the rules of each workload from observed halves of flows.
struct Learner<'a> {
    cluster: &'a Cluster,
    index: &'a Index,
    options: &'a AdviseOptions,
    rules: BTreeMap<usize, Rules>,
    /// Every observed flow `(src, dst, protocol, port)`, for the check.
    observed: BTreeSet<(IpAddr, IpAddr, Protocol, u16)>,
    advice: Advice,
}

impl Learner<'_> {
    fn skip(&mut self, why: &str) {
        *self.advice.skipped.entry(why.into()).or_default() += 1;
    }

    /// One observed half of a flow into the rules of its local workload: the destination's
    /// for `ingress`, the source's otherwise.
    fn learn(&mut self, ingress: bool, src: IpAddr, dst: IpAddr, protocol: Protocol, port: u16) {
        let index = self.index;
        let (subject_ip, peer_ip) = if ingress { (dst, src) } else { (src, dst) };
        let Some(subject) = index.by_ip.get(&subject_ip) else {
            self.skip("the local end is no pod of the state");
            return;
        };
        match self.options.namespace.as_deref() {
            Some(ns) if ns != subject.namespace => {
                self.skip("outside --namespace");
                return;
            }
            None if subject.namespace == SYSTEM_NAMESPACE => {
                self.skip("in kube-system (advised only with --namespace kube-system)");
                return;
            }
            _ => {}
        }
        let Some(&w) = index.of_pod.get(subject) else {
            self.skip("the local pod cannot be advised");
            return;
        };
        self.observed.insert((src, dst, protocol, port));
        self.advice.flows_used += 1;
        self.rules.entry(w).or_default().flows += 1;
        let peer = match index.by_ip.get(&peer_ip) {
            Some(p) if p == subject => return,
            Some(p) => match index.of_pod.get(p) {
                Some(&pw) => RulePeer::Workload(pw),
                None => {
                    self.advice
                        .denied
                        .push(format!("{p}: a peer without stable labels gets no rule"));
                    return;
                }
            },
            None => {
                let node = self.cluster.pods[subject].node_name.as_deref();
                if owned_by_node(self.cluster, node, peer_ip) {
                    return;
                }
                RulePeer::Address(peer_ip)
            }
        };
        let entry = self.rules.entry(w).or_default();
        let side = if ingress {
            &mut entry.ingress
        } else {
            &mut entry.egress
        };
        side.entry(peer).or_default().insert((protocol, port));
    }
}

fn policy(index: &Index, w: usize, rules: &Rules, options: &AdviseOptions) -> NetworkPolicy {
    let workload = &index.workloads[w];
    let ingress = rules
        .ingress
        .iter()
        .map(|(peer, set)| NetworkPolicyIngressRule {
            from: Some(vec![index.peer(w, peer)]),
            ports: Some(ports(set)),
        })
        .collect();
    let dns_ports = dns_ports();
    let covered_by_dns = |peer: &RulePeer, set: &PortSet| match peer {
        RulePeer::Workload(p) => {
            let p = &index.workloads[*p];
            p.namespace == SYSTEM_NAMESPACE
                && p.labels.get("k8s-app").is_some_and(|v| v == "kube-dns")
                && set.is_subset(&dns_ports)
        }
        RulePeer::Address(_) => false,
    };
    let egress = std::iter::once(dns_rule())
        .chain(
            rules
                .egress
                .iter()
                .filter(|(peer, set)| !covered_by_dns(peer, set))
                .map(|(peer, set)| NetworkPolicyEgressRule {
                    to: Some(vec![index.peer(w, peer)]),
                    ports: Some(ports(set)),
                }),
        )
        .collect();
    let mut annotations = BTreeMap::from([(
        "policy-agent/advised-from".to_string(),
        format!("{} observed flow(s)", rules.flows),
    )]);
    if options.audit {
        annotations.insert(crate::audit::ANNOTATION.into(), "true".into());
    }
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(format!("advised-{}", workload.name)),
            namespace: Some(workload.namespace.clone()),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(index.selector(w)),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    }
}

/// The observed flows that `cluster` with `policies` added would deny, enforced (audit
/// annotations ignored, so audit-mode advice is checked as it will be enforced).
fn check(
    cluster: &Cluster,
    policies: &[NetworkPolicy],
    observed: &BTreeSet<(IpAddr, IpAddr, Protocol, u16)>,
) -> Vec<String> {
    let mut after = cluster.clone();
    for np in policies {
        let mut np = np.clone();
        if let Some(a) = np.metadata.annotations.as_mut() {
            a.remove(crate::audit::ANNOTATION);
        }
        let key = ObjectKey::new(
            np.metadata.namespace.as_deref().unwrap_or_default(),
            np.metadata.name.as_deref().unwrap_or_default(),
        );
        after.policies.insert(key, np);
    }
    let ev = Evaluator::new(&after);
    let by_ip = crate::model::pods_by_address(&after);
    let peer = |ip: &IpAddr| match by_ip.get(ip) {
        Some(pod) => Peer::Pod {
            pod: (*pod).clone(),
            ip: *ip,
        },
        None => Peer::Address(*ip),
    };
    let name = |ip: &IpAddr| by_ip.get(ip).map_or(ip.to_string(), |k| k.to_string());
    observed
        .iter()
        .filter(|(src, dst, protocol, port)| {
            !ev.evaluate(&evaluator::Flow {
                src: peer(src),
                dst: peer(dst),
                protocol: *protocol,
                port: *port,
            })
            .allowed
        })
        .map(|(src, dst, protocol, port)| {
            format!("{} -> {} {protocol}/{port}", name(src), name(dst))
        })
        .collect()
}

/// The policies as YAML documents separated by `---`.
pub fn yaml(policies: &[NetworkPolicy]) -> String {
    policies
        .iter()
        .map(|p| serde_yaml::to_string(p).expect("a policy serializes"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowlog::Flow;

    fn pod(ns: &str, name: &str, ip: &str, node: &str, labels: serde_json::Value) -> PodInfo {
        let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
                {"containerPort": 80}, {"containerPort": 81}, {"containerPort": 5432}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "hostIP": "172.18.0.2"},
        }))
        .unwrap();
        (&p).into()
    }

    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        for ns in ["shop", "db"] {
            c.namespaces.insert(
                ns.into(),
                serde_json::from_value(serde_json::json!({"metadata": {"name": ns,
                    "labels": {NAMESPACE_NAME_LABEL: ns}}}))
                .unwrap(),
            );
        }
        let add = |c: &mut Cluster, ns, name, ip, labels| {
            c.pods
                .insert(ObjectKey::new(ns, name), pod(ns, name, ip, "n1", labels));
        };
        add(
            &mut c,
            "shop",
            "web-7d9-a",
            "10.244.1.2",
            serde_json::json!({"app": "web", "pod-template-hash": "7d9"}),
        );
        add(
            &mut c,
            "shop",
            "web-7d9-b",
            "10.244.1.3",
            serde_json::json!({"app": "web", "pod-template-hash": "7d9"}),
        );
        add(
            &mut c,
            "shop",
            "web-canary",
            "10.244.1.4",
            serde_json::json!({"app": "web", "track": "canary"}),
        );
        add(
            &mut c,
            "shop",
            "api",
            "10.244.1.5",
            serde_json::json!({"app": "api"}),
        );
        add(
            &mut c,
            "db",
            "pg-0",
            "10.244.1.6",
            serde_json::json!({"app": "pg", "statefulset.kubernetes.io/pod-name": "pg-0"}),
        );
        add(&mut c, "shop", "bare", "10.244.1.7", serde_json::json!({}));
        c
    }

    fn record(direction: &str, src: &str, dst: &str, dport: u16, verdict: &str) -> FlowRecord {
        FlowRecord {
            time_ms: 0,
            node: "n1".into(),
            audit: None,
            flow: Flow {
                verdict: verdict.into(),
                reason: "not-isolated".into(),
                direction: direction.into(),
                protocol: "TCP".into(),
                src: src.parse().unwrap(),
                sport: 40000,
                dst: dst.parse().unwrap(),
                dport,
                endpoint: String::new(),
                peer: String::new(),
                service: None,
                policy: None,
                rule: None,
            },
        }
    }

    /// Both halves of a flow, as the agents of both ends record it.
    fn both(src: &str, dst: &str, dport: u16) -> [FlowRecord; 2] {
        [
            record("egress", src, dst, dport, "allowed"),
            record("ingress", src, dst, dport, "allowed"),
        ]
    }

    fn allowed(c: &Cluster, src: &str, dst: &str, port: u16) -> bool {
        let peer = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            match c.pods.iter().find(|(_, p)| p.ips.contains(&ip)) {
                Some((k, _)) => Peer::Pod { pod: k.clone(), ip },
                None => Peer::Address(ip),
            }
        };
        evaluator::evaluate(
            c,
            &evaluator::Flow {
                src: peer(src),
                dst: peer(dst),
                protocol: Protocol::Tcp,
                port,
            },
        )
        .allowed
    }

    #[test]
    fn observed_flows_stay_allowed_and_nothing_else_is() {
        let c = cluster();
        let mut records: Vec<FlowRecord> = [
            both("10.244.1.2", "10.244.1.5", 80),   // web -> api :80
            both("10.244.1.3", "10.244.1.5", 80),   // the other web pod, same workload
            both("10.244.1.5", "10.244.1.6", 5432), // api -> db/pg :5432
        ]
        .into_iter()
        .flatten()
        .collect();
        // Off-cluster egress of api, and a flow the kernel dropped (not observed).
        records.push(record("egress", "10.244.1.5", "192.0.2.10", 443, "allowed"));
        records.push(record("ingress", "10.244.1.4", "10.244.1.5", 81, "dropped"));
        let advice = advise(&c, &records, &AdviseOptions::default());
        assert!(advice.denied.is_empty(), "{:?}", advice.denied);
        assert_eq!(advice.flows_used, 7);
        let names: Vec<String> = advice
            .policies
            .iter()
            .map(|p| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap(),
                    p.metadata.name.as_deref().unwrap()
                )
            })
            .collect();
        assert_eq!(
            names,
            ["db/advised-pg", "shop/advised-api", "shop/advised-web"]
        );
        assert!(
            advice.unadvised.iter().any(|u| u.starts_with("shop/bare")),
            "{:?}",
            advice.unadvised
        );

        let mut after = c.clone();
        for np in &advice.policies {
            after.policies.insert(
                ObjectKey::new(
                    np.metadata.namespace.as_deref().unwrap(),
                    np.metadata.name.as_deref().unwrap(),
                ),
                np.clone(),
            );
        }
        // Observed: allowed.
        assert!(allowed(&after, "10.244.1.2", "10.244.1.5", 80));
        assert!(allowed(&after, "10.244.1.3", "10.244.1.5", 80));
        assert!(allowed(&after, "10.244.1.5", "10.244.1.6", 5432));
        assert!(allowed(&after, "10.244.1.5", "192.0.2.10", 443));
        // Unobserved between the same pods: denied.
        assert!(
            !allowed(&after, "10.244.1.2", "10.244.1.5", 81),
            "other port"
        );
        assert!(!allowed(&after, "10.244.1.5", "10.244.1.2", 80), "reverse");
        assert!(
            !allowed(&after, "10.244.1.2", "10.244.1.6", 5432),
            "skips a tier"
        );
        assert!(
            !allowed(&after, "10.244.1.5", "192.0.2.11", 443),
            "other address"
        );
        // The canary has labels beyond web's: web's selector leaves it out, so it is not
        // granted web's egress (and has no policy: it took part in no flow).
        assert!(
            !allowed(&after, "10.244.1.4", "10.244.1.5", 80),
            "canary -> api was never observed"
        );
        let web = &advice.policies[2];
        let sel = web.spec.as_ref().unwrap().pod_selector.as_ref().unwrap();
        assert_eq!(
            sel.match_labels,
            Some([("app".to_string(), "web".to_string())].into())
        );
        assert_eq!(
            sel.match_expressions.as_ref().unwrap()[0].key,
            "track",
            "excludes web-canary"
        );
        // pg in another namespace: api's egress names its namespace; pod-name label dropped.
        let yaml = yaml(&advice.policies);
        assert!(yaml.contains("kubernetes.io/metadata.name: db"), "{yaml}");
        assert!(
            !yaml.contains("statefulset.kubernetes.io/pod-name"),
            "{yaml}"
        );
        assert!(!yaml.contains("pod-template-hash"), "{yaml}");
        assert!(yaml.contains("cidr: 192.0.2.10/32"), "{yaml}");
        assert!(yaml.contains("k8s-app: kube-dns"), "DNS egress: {yaml}");
        assert_eq!(yaml.matches("kind: NetworkPolicy").count(), 3);
        // The advice lints clean.
        let findings: Vec<_> = crate::netpol::lint::lint(&after)
            .into_iter()
            .filter(|f| f.object.contains("advised-"))
            .collect();
        assert!(findings.is_empty(), "{findings:#?}");
    }

    #[test]
    fn a_flow_through_a_service_names_its_backend() {
        let mut c = cluster();
        c.services.insert(
            ObjectKey::new("shop", "api"),
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "api", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "api"},
                         "ports": [{"port": 8080, "targetPort": 80}]},
            }))
            .unwrap(),
        );
        let mut to_service = record("egress", "10.244.1.2", "10.96.0.20", 8080, "allowed");
        // Only the source's half: the Service's backends stand in for the one it reached.
        let advice = advise(&c, &[to_service.clone()], &AdviseOptions::default());
        let yaml = yaml(&advice.policies);
        assert!(yaml.contains("port: 80\n"), "{yaml}");
        assert!(!yaml.contains("8080") && !yaml.contains("10.96."), "{yaml}");
        // With the backend's half (same source port) the pair is exact.
        to_service.flow.sport = 41000;
        let mut backend = record("ingress", "10.244.1.2", "10.244.1.5", 80, "allowed");
        backend.flow.sport = 41000;
        let advice = advise(&c, &[to_service, backend], &AdviseOptions::default());
        assert!(advice.denied.is_empty(), "{:?}", advice.denied);
        assert_eq!(advice.flows_used, 2);
        assert_eq!(advice.policies.len(), 2, "web's egress and api's ingress");
    }

    #[test]
    fn audit_mode_and_namespace_filter() {
        let c = cluster();
        let records: Vec<FlowRecord> = both("10.244.1.5", "10.244.1.6", 5432).into();
        let advice = advise(
            &c,
            &records,
            &AdviseOptions {
                namespace: Some("db".into()),
                audit: true,
            },
        );
        assert_eq!(advice.policies.len(), 1);
        let np = &advice.policies[0];
        assert_eq!(np.metadata.namespace.as_deref(), Some("db"));
        assert_eq!(
            np.metadata.annotations.as_ref().unwrap()[crate::audit::ANNOTATION],
            "true"
        );
        assert_eq!(advice.skipped["outside --namespace"], 1);
    }
}
