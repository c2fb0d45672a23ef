//! The 48 upstream e2e NetworkPolicy cases (`xtask/conformance/netpol_cases.json`, the catalogue
//! the lab's conformance suite also runs; see `netpol_cases.md` beside it) replayed step by step
//! on the e2e model (namespaces x, y, z; pods a, b, c; one container per served port × protocol;
//! two nodes), in both the 9-pod model and the newest reduced pod sets.
//!
//! Every probe's truth table is rebuilt from the case's expectation edits (`ExpectPeer`,
//! `ExpectAllIngress`, `ExpectAllEgress`, `Expect`) and must equal, for every non-loopback pair:
//! the reference evaluator's verdict, the case's precomputed list of denied pairs, and the verdict
//! of the compiled maps of the two nodes run through the userspace model of the eBPF lookups.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use common::*;
use policy_agent::evaluator::{self, Flow, Peer, Protocol};
use policy_agent::model::{Cluster, NAMESPACE_NAME_LABEL};
use serde_json::Value;

const NODES: [&str; 2] = ["node-1", "node-2"];

fn cases() -> Vec<Value> {
    let text = include_str!("../../xtask/conformance/netpol_cases.json");
    let doc: Value = serde_json::from_str(text).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(172, 18, 0, 2 + i as u8))
}

/// The e2e model: pods spread over two nodes, pod IPs 10.244.<node>.<n>.
struct Model {
    cluster: Cluster,
    pods: Vec<String>,
}

impl Model {
    fn new(pods: &[String], ports: &[u16], protocols: &[String]) -> Self {
        let mut cluster = Cluster::default();
        for (i, n) in NODES.iter().enumerate() {
            cluster
                .nodes
                .insert((*n).to_owned(), node(n, &[node_ip(i)]));
        }
        for ns in ["x", "y", "z"] {
            cluster.namespaces.insert(
                ns.to_owned(),
                namespace(ns, &[(NAMESPACE_NAME_LABEL, ns), ("ns", ns)]),
            );
        }
        let names: Vec<(String, u16, String)> = ports
            .iter()
            .flat_map(|p| {
                protocols.iter().map(move |proto| {
                    (
                        format!("serve-{p}-{}", proto.to_lowercase()),
                        *p,
                        proto.clone(),
                    )
                })
            })
            .collect();
        for (i, full) in pods.iter().enumerate() {
            let (ns, name) = full.split_once('/').unwrap();
            let node_index = i % 2;
            let ip = IpAddr::V4(Ipv4Addr::new(10, 244, 1 + node_index as u8, 10 + i as u8));
            let spec = PodSpec {
                labels: vec![("pod", name)],
                node: NODES[node_index],
                ips: vec![ip],
                host_ip: Some(node_ip(node_index)),
                ports: names
                    .iter()
                    .map(|(n, p, proto)| (n.as_str(), *p, proto.as_str()))
                    .collect(),
                ..Default::default()
            };
            cluster.pods.insert(key(ns, name), pod(ns, name, &spec));
            let svc = format!("s-{ns}-{name}");
            let cip = format!("10.96.0.{}", 10 + i);
            cluster
                .services
                .insert(key(ns, &svc), service(ns, &svc, &[&cip]));
        }
        Model {
            cluster,
            pods: pods.to_vec(),
        }
    }

    fn ip(&self, pod: &str) -> IpAddr {
        let (ns, name) = pod.split_once('/').unwrap();
        self.cluster.pods[&key(ns, name)].ips[0]
    }

    /// Replaces the run-time placeholders of ipBlock CIDRs.
    fn fill(&self, v: &Value) -> Value {
        match v {
            Value::String(s) if s.starts_with('<') => {
                let pod_of = |marker: &str| {
                    let rest = &s[s.find(marker).unwrap() + marker.len()..];
                    rest[..3].to_owned()
                };
                if s.starts_with("<podIP of ") {
                    Value::String(format!("{}/32", self.ip(&pod_of("<podIP of "))))
                } else if s.starts_with("<the /4 network containing ") {
                    let IpAddr::V4(ip) = self.ip(&pod_of("<the /4 network containing ")) else {
                        unreachable!()
                    };
                    let net = Ipv4Addr::from_bits(ip.to_bits() & 0xf000_0000);
                    Value::String(format!("{net}/4"))
                } else {
                    panic!("unknown placeholder {s}")
                }
            }
            Value::Array(a) => Value::Array(a.iter().map(|x| self.fill(x)).collect()),
            Value::Object(o) => {
                Value::Object(o.iter().map(|(k, x)| (k.clone(), self.fill(x))).collect())
            }
            other => other.clone(),
        }
    }

    fn act(&mut self, action: &Value) {
        let ns = action["namespace"].as_str();
        match action["op"].as_str().unwrap() {
            "create" | "update" => {
                let name = action["name"].as_str().unwrap();
                let spec = self.fill(&action["spec"]);
                self.cluster
                    .policies
                    .insert(key(ns.unwrap(), name), policy(ns.unwrap(), name, spec));
            }
            "delete_all_policies" => self.cluster.policies.clear(),
            "add_namespace_labels" => {
                let labels = self
                    .cluster
                    .namespaces
                    .get_mut(ns.unwrap())
                    .unwrap()
                    .metadata
                    .labels
                    .get_or_insert_default();
                for (k, v) in action["labels"].as_object().unwrap() {
                    labels.insert(k.clone(), v.as_str().unwrap().to_owned());
                }
            }
            "add_pod_labels" => {
                let (ns, name) = action["pod"].as_str().unwrap().split_once('/').unwrap();
                if let Some(p) = self.cluster.pods.get_mut(&key(ns, name)) {
                    for (k, v) in action["labels"].as_object().unwrap() {
                        p.labels.insert(k.clone(), v.as_str().unwrap().to_owned());
                    }
                }
            }
            op => panic!("unknown op {op}"),
        }
    }

    fn flow(&self, from: &str, to: &str, protocol: Protocol, port: u16) -> Flow {
        let peer = |p: &str| {
            let (ns, name) = p.split_once('/').unwrap();
            Peer::Pod {
                pod: key(ns, name),
                ip: self.ip(p),
            }
        };
        Flow {
            src: peer(from),
            dst: peer(to),
            protocol,
            port,
        }
    }
}

/// The e2e `Reachability` table after the expectation edits: (from, to) → allowed.
fn expected_table(pods: &[String], ops: &[Value]) -> BTreeMap<(String, String), bool> {
    let mut table: BTreeMap<(String, String), bool> = pods
        .iter()
        .flat_map(|f| pods.iter().map(move |t| ((f.clone(), t.clone()), true)))
        .collect();
    let peer_matches = |peer: &Value, pod: &str| {
        let (ns, name) = pod.split_once('/').unwrap();
        peer[0].as_str().is_none_or(|n| n == ns) && peer[1].as_str().is_none_or(|n| n == name)
    };
    for op in ops {
        let allowed = op.as_array().unwrap().last().unwrap().as_bool().unwrap();
        for ((from, to), cell) in table.iter_mut() {
            let hit = match op[0].as_str().unwrap() {
                "P" => peer_matches(&op[1], from) && peer_matches(&op[2], to),
                "AI" => op[1].as_str() == Some(to.as_str()),
                "AE" => op[1].as_str() == Some(from.as_str()),
                "E" => op[1].as_str() == Some(from.as_str()) && op[2].as_str() == Some(to.as_str()),
                other => panic!("unknown expectation op {other}"),
            };
            if hit {
                *cell = allowed;
            }
        }
    }
    table
}

fn all9() -> Vec<String> {
    ["x", "y", "z"]
        .iter()
        .flat_map(|ns| ["a", "b", "c"].iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// Runs one case on one pod set; returns the number of cells checked.
fn run_case(case: &Value, pods: &[String], denied_key: &str) -> usize {
    let id = case["id"].as_u64().unwrap();
    let ports: Vec<u16> = case["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u16)
        .collect();
    let protocols: Vec<String> = case["protocols"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    let mut model = Model::new(pods, &ports, &protocols);
    let precomputed = case["computed_denied_non_loopback"][denied_key]
        .as_array()
        .unwrap();
    let mut cells = 0;
    let mut probe_index = 0;
    for (s, step) in case["steps"].as_array().unwrap().iter().enumerate() {
        for action in step["actions"].as_array().unwrap() {
            model.act(action);
        }
        let compiled = Compiled::new(&model.cluster, &NODES);
        // Every ClusterIP is a Service frontend on every node.
        for maps in compiled.nodes.values() {
            assert_eq!(maps.services.len(), pods.len(), "case {id}: services");
        }
        for probe in step["probes"].as_array().unwrap() {
            let port = probe["port"].as_u64().unwrap() as u16;
            let protocol = Protocol::parse(probe["protocol"].as_str().unwrap()).unwrap();
            let expected = expected_table(&model.pods, probe["expect_ops"].as_array().unwrap());
            let pre = &precomputed[probe_index];
            probe_index += 1;
            assert_eq!(pre["step"].as_u64().unwrap() as usize, s + 1);
            assert_eq!(pre["port"].as_u64().unwrap() as u16, port);
            let pre_denied: BTreeSet<String> = pre["denied"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_str().unwrap().to_owned())
                .collect();
            let mut denied = BTreeSet::new();
            for ((from, to), allowed) in &expected {
                if from == to {
                    continue; // loopback is never judged
                }
                let flow = model.flow(from, to, protocol, port);
                let verdict = evaluator::evaluate(&model.cluster, &flow);
                assert_eq!(
                    verdict.allowed,
                    *allowed,
                    "case {id} ({}) step {} {protocol}/{port} {from} -> {to}: evaluator {verdict:?}",
                    case["name"],
                    s + 1
                );
                assert_eq!(
                    compiled.allowed(&flow),
                    *allowed,
                    "case {id} step {} {protocol}/{port} {from} -> {to}: dataplane {:?}",
                    s + 1,
                    compiled.verdict(&flow)
                );
                check_flow(&model.cluster, &compiled, &flow)
                    .unwrap_or_else(|e| panic!("case {id}: {e}"));
                if !allowed {
                    denied.insert(format!("{from}->{to}"));
                }
                cells += 1;
            }
            assert_eq!(
                denied,
                pre_denied,
                "case {id} step {} {protocol}/{port}: denied pairs",
                s + 1
            );
        }
    }
    assert_eq!(probe_index, precomputed.len(), "case {id}: probes");
    cells
}

#[test]
fn all_48_cases_in_the_nine_pod_model() {
    let cases = cases();
    assert_eq!(cases.len(), 48);
    let mut cells = 0;
    for case in &cases {
        cells += run_case(case, &all9(), "all9");
    }
    eprintln!("48 cases, {cells} cells checked");
    assert!(cells > 48 * 72);
}

#[test]
fn all_48_cases_in_the_reduced_pod_sets() {
    let cases = cases();
    assert_eq!(cases.len(), 48);
    for case in &cases {
        let pods: Vec<String> = case["pods_reduced"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect();
        run_case(case, &pods, "reduced");
    }
}
