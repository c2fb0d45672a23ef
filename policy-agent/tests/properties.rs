//! Property tests on random clusters and policies (proptest; 10,000 cases in the default run):
//!
//! - `dataplane_agrees_with_evaluator`: on every node, the userspace model of the eBPF lookups
//!   over the compiled maps gives the evaluator's verdict for every flow between pods, nodes and
//!   outside addresses, with the deciding rule among the evaluator's allowing rules.
//! - `diffs_equal_recompilation`: along random change sequences, applying each diff to the
//!   previous maps gives the new maps, and the long-lived compiler's output equals a fresh
//!   compiler's (up to identity, endpoint-id and rule numbering) — so deletes leave nothing stale.
//! - `changes_touch_only_affected_entries`: one pod relabel, namespace relabel, policy
//!   create/update/delete or pod address change yields a diff limited to the entries it affects.
//!
//! Every block runs from a fixed seed ([`FIXED_SEED`]), so a run is the same everywhere; the
//! cases of `proptest-regressions/properties.txt` (failures found with other seeds, written there
//! by proptest) run first. `POLICY_FUZZ_SEED` replaces the seed and `POLICY_FUZZ_SCALE`
//! multiplies the number of cases: `cargo xtask fuzz` runs the tests with fresh seeds.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use common::*;
use policy_agent::compiler::cidr::Prefix;
use policy_agent::compiler::{Compiler, MapDiff, NodeMaps, RuleRef};
use policy_agent::evaluator::{Flow, Peer, Protocol};
use policy_agent::model::{Cluster, NAMESPACE_NAME_LABEL, ObjectKey, PodInfo};
use policy_common::{Direction, identity};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{FileFailurePersistence, RngAlgorithm, RngSeed};
use serde_json::{Value, json};

/// The seed of every run without `POLICY_FUZZ_SEED`.
const FIXED_SEED: u64 = 0x706f_6c69_6379_0001;

/// Failures found with other seeds, replayed before the seeded cases.
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/properties.txt"
);

/// `name` parsed from the environment, if set.
fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// `cases` cases (times `POLICY_FUZZ_SCALE`) from the fixed seed or `POLICY_FUZZ_SEED`, with
/// the committed regressions replayed first.
fn config(cases: u32) -> ProptestConfig {
    let seed = env_number("POLICY_FUZZ_SEED").unwrap_or(FIXED_SEED);
    let scale = env_number("POLICY_FUZZ_SCALE").unwrap_or(1).max(1);
    let times = |n: u32| u32::try_from(u64::from(n) * scale).unwrap_or(u32::MAX);
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: times(cases),
        // Cases whose change does not apply to the drawn cluster are rejected: a budget in
        // proportion to the cases.
        max_global_rejects: times(default.max_global_rejects),
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..default
    }
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const LABEL_KEYS: [&str; 2] = ["app", "tier"];
const LABEL_VALUES: [&str; 3] = ["a", "b", "c"];
/// Named container ports: names reused with different numbers and protocols.
const PORTS: [(&str, u16, &str); 7] = [
    ("http", 80, "TCP"),
    ("http", 8080, "TCP"),
    ("dns", 53, "UDP"),
    ("sc", 80, "SCTP"),
    ("web", 81, "TCP"),
    ("http", 81, "UDP"),
    ("dns", 5353, "TCP"),
];
const PORT_NAMES: [&str; 5] = ["http", "dns", "sc", "web", "nope"];
const PORT_NUMBERS: [u16; 5] = [53, 80, 81, 8080, 5353];
const CIDRS: [&str; 12] = [
    "10.1.0.0/16",
    "10.1.0.0/28",
    "10.1.0.4/30",
    "10.1.0.5/32",
    "0.0.0.0/0",
    "172.18.0.0/16",
    "172.18.0.1/32",
    "192.168.1.0/24",
    "fd00::/64",
    "::/0",
    "10.1.0.7/29",
    "fd00::3/128",
];
const EXCEPTS: [&str; 8] = [
    "10.1.0.0/30",
    "10.1.0.8/29",
    "10.1.0.5/32",
    "172.18.0.2/32",
    "fd00::1/128",
    "192.168.1.128/25",
    "10.1.0.0/24",
    "fd00::/120",
];
/// Addresses that are nobody's.
const OUTSIDE: [&str; 6] = [
    "10.1.0.99",
    "192.168.1.5",
    "192.168.1.200",
    "8.8.8.8",
    "fd00::99",
    "2001:db8::1",
];
/// Destination ports probed per protocol: every number the generator's policies and pods use, and
/// protocol mismatches for each named port.
const FLOW_PORTS: [(Protocol, &[u16]); 3] = [
    (Protocol::Tcp, &[53, 80, 81, 8080, 5353]),
    (Protocol::Udp, &[53, 81, 5353]),
    (Protocol::Sctp, &[80, 81]),
];

fn node_ips(n: usize) -> Vec<IpAddr> {
    vec![
        format!("172.18.0.{}", n + 1).parse().unwrap(),
        format!("fc00::{}", n + 1).parse().unwrap(),
    ]
}

fn v4(i: usize) -> IpAddr {
    format!("10.1.0.{}", i + 1).parse().unwrap()
}

fn v6(i: usize) -> IpAddr {
    format!("fd00::{}", i + 1).parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Strategies (policies are generated as JSON, the way they arrive from YAML)

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        select(&LABEL_KEYS[..]).prop_map(str::to_owned),
        select(&LABEL_VALUES[..]).prop_map(str::to_owned),
        0..=2,
    )
}

fn expression(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = Value> {
    (
        select(keys),
        select(&["In", "NotIn", "Exists", "DoesNotExist"][..]),
        prop::collection::btree_set(select(values), 1..=2),
    )
        .prop_map(|(k, op, vals)| match op {
            "In" | "NotIn" => json!({"key": k, "operator": op, "values": vals}),
            _ => json!({"key": k, "operator": op}),
        })
}

fn selector(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => Just(json!({})),
        4 => prop::collection::btree_map(select(keys), select(values), 1..=2)
            .prop_map(|l| json!({"matchLabels": l})),
        4 => prop::collection::vec(expression(keys, values), 1..=2)
            .prop_map(|e| json!({"matchExpressions": e})),
        1 => prop_oneof![
            select(keys).prop_map(|k| json!({"matchExpressions": [{"key": k, "operator": "Near", "values": ["a"]}]})),
            select(keys).prop_map(|k| json!({"matchExpressions": [{"key": k, "operator": "In", "values": []}]})),
        ],
    ]
}

fn pod_selector() -> impl Strategy<Value = Value> {
    selector(&LABEL_KEYS, &LABEL_VALUES)
}

fn ns_selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => selector(&["team"], &["p", "q"]),
        1 => selector(&[NAMESPACE_NAME_LABEL], &NAMESPACES),
    ]
}

fn ip_block() -> impl Strategy<Value = Value> {
    (
        select(&CIDRS[..]),
        prop::collection::btree_set(select(&EXCEPTS[..]), 0..=2),
        prop::bool::weighted(0.04),
    )
        .prop_map(|(cidr, excepts, keep_invalid)| {
            let c = Prefix::parse(cidr).unwrap();
            let except: Vec<&str> = excepts
                .into_iter()
                .filter(|e| {
                    let e = Prefix::parse(e).unwrap();
                    keep_invalid || (c.covers(&e) && e.prefix_len() > c.prefix_len())
                })
                .collect();
            if except.is_empty() {
                json!({"cidr": cidr})
            } else {
                json!({"cidr": cidr, "except": except})
            }
        })
}

fn peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => pod_selector().prop_map(|s| json!({"podSelector": s})),
        3 => ns_selector().prop_map(|s| json!({"namespaceSelector": s})),
        3 => (pod_selector(), ns_selector()).prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        5 => ip_block().prop_map(|b| json!({"ipBlock": b})),
        1 => prop_oneof![
            (ip_block(), pod_selector()).prop_map(|(b, p)| json!({"ipBlock": b, "podSelector": p})),
            Just(json!({})),
        ],
    ]
}

fn port() -> impl Strategy<Value = Value> {
    let protocol = prop_oneof![
        12 => Just(None),
        6 => Just(Some("TCP")),
        6 => Just(Some("UDP")),
        5 => Just(Some("SCTP")),
        1 => Just(Some("ICMP")),
    ];
    let number = select(&PORT_NUMBERS[..]);
    let port = prop_oneof![
        5 => Just(json!({})),
        6 => number.clone().prop_map(|n| json!({"port": n})),
        8 => select(&PORT_NAMES[..]).prop_map(|n| json!({"port": n})),
        5 => (number.clone(), 0u16..40).prop_map(|(n, w)| json!({"port": n, "endPort": n + w})),
        1 => prop_oneof![
            number.clone().prop_map(|n| json!({"port": n, "endPort": n - 1})),
            Just(json!({"port": 0})),
            Just(json!({"port": "http", "endPort": 90})),
            Just(json!({"endPort": 90})),
            Just(json!({"port": "Bad_Name"})),
        ],
    ];
    (protocol, port).prop_map(|(proto, mut port)| {
        if let Some(p) = proto {
            port["protocol"] = json!(p);
        }
        port
    })
}

/// Absent, empty, or 1..=max items.
fn list<S: Strategy<Value = Value> + 'static>(
    s: S,
    max: usize,
) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(json!([]))),
        4 => prop::collection::vec(s, 1..=max).prop_map(|v| Some(Value::Array(v))),
    ]
}

fn rule(peers_name: &'static str) -> impl Strategy<Value = Value> {
    (list(port(), 2), list(peer(), 2)).prop_map(move |(ports, peers)| {
        let mut r = json!({});
        if let Some(p) = ports {
            r["ports"] = p;
        }
        if let Some(p) = peers {
            r[peers_name] = p;
        }
        r
    })
}

fn policy_spec() -> impl Strategy<Value = Value> {
    let types = prop_oneof![
        3 => Just(None),
        1 => Just(Some(json!([]))),
        2 => Just(Some(json!(["Ingress"]))),
        2 => Just(Some(json!(["Egress"]))),
        3 => Just(Some(json!(["Ingress", "Egress"]))),
        1 => Just(Some(json!(["Ingress", "Sideways"]))),
    ];
    (
        prop::option::weighted(0.9, pod_selector()),
        types,
        list(rule("from"), 2),
        list(rule("to"), 2),
    )
        .prop_map(|(sel, types, ingress, egress)| {
            let mut spec = json!({});
            if let Some(s) = sel {
                spec["podSelector"] = s;
            }
            if let Some(t) = types {
                spec["policyTypes"] = t;
            }
            if let Some(i) = ingress {
                spec["ingress"] = i;
            }
            if let Some(e) = egress {
                spec["egress"] = e;
            }
            spec
        })
}

#[derive(Clone, Debug)]
enum Kind {
    Normal,
    HostNetwork,
    Terminated,
    NoAddress,
}

#[derive(Clone, Debug)]
struct GenPod {
    ns: usize,
    labels: BTreeMap<String, String>,
    node: usize,
    dual_stack: bool,
    ports: Vec<usize>,
    kind: Kind,
}

fn gen_pod() -> impl Strategy<Value = GenPod> {
    (
        0..NAMESPACES.len(),
        labels(),
        0..2usize,
        prop::bool::weighted(0.3),
        prop::collection::btree_set(0..PORTS.len(), 0..=4),
        prop_oneof![
            20 => Just(Kind::Normal),
            2 => Just(Kind::HostNetwork),
            1 => Just(Kind::Terminated),
            1 => Just(Kind::NoAddress),
        ],
    )
        .prop_map(|(ns, labels, node, dual_stack, ports, kind)| {
            // Container port names are unique within a pod.
            let mut seen = BTreeSet::new();
            let ports = ports
                .into_iter()
                .filter(|i| seen.insert(PORTS[*i].0))
                .collect();
            GenPod {
                ns,
                labels,
                node,
                dual_stack,
                ports,
                kind,
            }
        })
}

#[derive(Clone, Debug)]
struct GenCluster {
    ns_labels: Vec<BTreeMap<String, String>>,
    pods: Vec<GenPod>,
    policies: Vec<(usize, Value)>,
}

fn ns_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        Just("team".to_owned()),
        select(&["p", "q"][..]).prop_map(str::to_owned),
        0..=1,
    )
}

fn gen_cluster() -> impl Strategy<Value = GenCluster> {
    (
        prop::collection::vec(ns_labels(), 3),
        prop::collection::vec(gen_pod(), 0..=6),
        prop::collection::vec((0..NAMESPACES.len(), policy_spec()), 0..=4),
    )
        .prop_map(|(ns_labels, pods, policies)| GenCluster {
            ns_labels,
            pods,
            policies,
        })
}

/// Pod names are `p<i>`; pod `i` owns addresses `10.1.0.<i+1>` (and `fd00::<i+1>`).
fn build(g: &GenCluster) -> Cluster {
    let mut c = Cluster::default();
    for (i, n) in NODES.iter().enumerate() {
        c.nodes.insert((*n).to_owned(), node(n, &node_ips(i)));
    }
    for (i, ns) in NAMESPACES.iter().enumerate() {
        let labels: Vec<(&str, &str)> = g.ns_labels[i]
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        c.namespaces
            .insert((*ns).to_owned(), namespace(ns, &labels));
    }
    for (i, p) in g.pods.iter().enumerate() {
        c.pods
            .insert(key(NAMESPACES[p.ns], &format!("p{i}")), build_pod(i, p, i));
    }
    for (i, (ns, spec)) in g.policies.iter().enumerate() {
        let name = format!("pol{i}");
        c.policies.insert(
            key(NAMESPACES[*ns], &name),
            policy(NAMESPACES[*ns], &name, spec.clone()),
        );
    }
    c
}

/// Pod `i` as stored, with address slot `slot`.
fn build_pod(i: usize, p: &GenPod, slot: usize) -> PodInfo {
    let node_addr = node_ips(p.node);
    let ips = match p.kind {
        Kind::NoAddress => vec![],
        Kind::HostNetwork => node_addr.clone(),
        _ if p.dual_stack => vec![v4(slot), v6(slot)],
        _ => vec![v4(slot)],
    };
    let spec = PodSpec {
        labels: p
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        node: NODES[p.node],
        ips,
        host_ip: Some(node_addr[0]),
        ports: p.ports.iter().map(|i| PORTS[*i]).collect(),
        host_network: matches!(p.kind, Kind::HostNetwork),
        phase: matches!(p.kind, Kind::Terminated).then_some("Succeeded"),
    };
    pod(NAMESPACES[p.ns], &format!("p{i}"), &spec)
}

/// Every flow with a pod on at least one side, between parties of the same family.
fn flows(c: &Cluster) -> Vec<Flow> {
    let mut parties: Vec<Peer> = Vec::new();
    for (k, p) in &c.pods {
        for &ip in &p.ips {
            parties.push(Peer::Pod { pod: k.clone(), ip });
        }
    }
    for n in 0..NODES.len() {
        parties.extend(node_ips(n).into_iter().map(Peer::Address));
    }
    parties.extend(OUTSIDE.iter().map(|a| Peer::Address(a.parse().unwrap())));
    let mut out = Vec::new();
    for src in &parties {
        for dst in &parties {
            let pod_side = matches!(src, Peer::Pod { .. }) || matches!(dst, Peer::Pod { .. });
            if src == dst
                || !pod_side
                || src.ip().map(|a| a.is_ipv4()) != dst.ip().map(|a| a.is_ipv4())
            {
                continue;
            }
            for (protocol, ports) in FLOW_PORTS {
                for &port in ports {
                    out.push(Flow {
                        src: src.clone(),
                        dst: dst.clone(),
                        protocol,
                        port,
                    });
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Canonical form: the maps with numbers replaced by what they stand for.

/// A POLICY key with names: (endpoint pod, peer identity, direction, protocol, prefix, port).
type CanonPolicyKey = (ObjectKey, String, u8, u8, u16, u16);

#[derive(Debug, PartialEq, Eq)]
struct Canon {
    endpoints: BTreeMap<ObjectKey, (u32, String, Vec<IpAddr>)>,
    ipcache: BTreeMap<String, (String, String)>,
    policy: BTreeMap<CanonPolicyKey, RuleRef>,
    services: BTreeSet<IpAddr>,
}

fn canon(c: &Compiler, m: &NodeMaps) -> Canon {
    let desc = |id: u32| {
        c.identity_info(id)
            .map_or_else(|| format!("unknown {id}"), |i| i.to_string())
    };
    let by_id: BTreeMap<u32, &ObjectKey> = m.endpoints.iter().map(|(k, e)| (e.id, k)).collect();
    Canon {
        endpoints: m
            .endpoints
            .iter()
            .map(|(k, e)| (k.clone(), (e.flags, desc(e.identity), e.addresses.clone())))
            .collect(),
        ipcache: m
            .ipcache_v4
            .iter()
            .map(|(n, v)| (n.to_string(), *v))
            .chain(m.ipcache_v6.iter().map(|(n, v)| (n.to_string(), *v)))
            .map(|(n, v)| (n, (desc(v.identity), desc(v.cidr_identity))))
            .collect(),
        policy: m
            .policy
            .iter()
            .map(|(k, v)| {
                let ep = by_id[&k.endpoint].clone();
                let peer = desc(k.identity);
                (
                    (ep, peer, k.direction as u8, k.protocol, k.first, k.last),
                    m.rules[&v.rule].clone(),
                )
            })
            .collect(),
        services: m.services.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations

#[derive(Clone, Debug)]
enum Change {
    RelabelPod(usize, BTreeMap<String, String>),
    RelabelNamespace(usize, BTreeMap<String, String>),
    /// Create or replace policy `pol<i>`.
    PutPolicy(usize, usize, Value),
    DeletePolicy(usize),
    /// Move pod `i` to address slot `6 + j` (unused by the initial pods).
    Readdress(usize, usize),
    DeletePod(usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (0..6usize, labels()).prop_map(|(i, l)| Change::RelabelPod(i, l)),
        2 => (0..3usize, ns_labels()).prop_map(|(i, l)| Change::RelabelNamespace(i, l)),
        3 => (0..5usize, 0..3usize, policy_spec()).prop_map(|(i, ns, s)| Change::PutPolicy(i, ns, s)),
        2 => (0..5usize).prop_map(Change::DeletePolicy),
        2 => (0..6usize, 0..6usize).prop_map(|(i, j)| Change::Readdress(i, j)),
        1 => (0..6usize).prop_map(Change::DeletePod),
    ]
}

/// The `i`-th existing policy (modulo their number).
fn policy_key(c: &Cluster, i: usize) -> Option<ObjectKey> {
    let n = c.policies.len();
    (n > 0)
        .then(|| c.policies.keys().nth(i % n).cloned())
        .flatten()
}

/// The `i`-th existing pod (modulo their number) for which `ok` holds, with its generator index.
fn pick_pod(
    c: &Cluster,
    g: &GenCluster,
    i: usize,
    ok: impl Fn(&GenPod) -> bool,
) -> Option<(ObjectKey, usize)> {
    let keys: Vec<(ObjectKey, usize)> = c
        .pods
        .keys()
        .map(|k| (k.clone(), k.name[1..].parse::<usize>().unwrap()))
        .filter(|(_, gi)| ok(&g.pods[*gi]))
        .collect();
    (!keys.is_empty()).then(|| keys[i % keys.len()].clone())
}

/// Applies a change; `false` when it does not apply to this cluster (no pod or policy to change).
fn apply_change(c: &mut Cluster, g: &GenCluster, ch: &Change) -> bool {
    match ch {
        Change::RelabelPod(i, l) => {
            let Some((k, _)) = pick_pod(c, g, *i, |_| true) else {
                return false;
            };
            c.pods.get_mut(&k).unwrap().labels = l.clone();
        }
        Change::RelabelNamespace(i, l) => {
            let mut labels = l.clone();
            labels.insert(NAMESPACE_NAME_LABEL.to_owned(), NAMESPACES[*i].to_owned());
            c.namespaces
                .get_mut(NAMESPACES[*i])
                .unwrap()
                .metadata
                .labels = Some(labels);
        }
        Change::PutPolicy(i, ns, spec) => {
            let name = format!("pol{i}");
            c.policies.retain(|k, _| k.name != name);
            c.policies.insert(
                key(NAMESPACES[*ns], &name),
                policy(NAMESPACES[*ns], &name, spec.clone()),
            );
        }
        Change::DeletePolicy(i) => {
            let Some(k) = policy_key(c, *i) else {
                return false;
            };
            c.policies.remove(&k);
        }
        Change::Readdress(i, j) => {
            let Some((k, gi)) = pick_pod(c, g, *i, |p| matches!(p.kind, Kind::Normal)) else {
                return false;
            };
            let slot = 6 + j;
            if c.pods.values().any(|q| q.ips.contains(&v4(slot))) {
                return false;
            }
            let mut new = build_pod(gi, &g.pods[gi], slot);
            new.labels = c.pods[&k].labels.clone();
            c.pods.insert(k, new);
        }
        Change::DeletePod(i) => {
            let Some((k, _)) = pick_pod(c, g, *i, |_| true) else {
                return false;
            };
            c.pods.remove(&k);
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Incremental locality

fn touched_policy_keys(d: &MapDiff) -> impl Iterator<Item = (u32, u32)> + '_ {
    d.policy_upsert
        .keys()
        .chain(d.policy_remove.iter())
        .map(|k| (k.endpoint, k.identity))
}

fn touched_ipcache(d: &MapDiff) -> Vec<Prefix> {
    d.ipcache_v4_upsert
        .keys()
        .chain(d.ipcache_v4_remove.iter())
        .map(|n| Prefix::v4(n.ip(), n.prefix()))
        .chain(
            d.ipcache_v6_upsert
                .keys()
                .chain(d.ipcache_v6_remove.iter())
                .map(|n| Prefix::v6(n.ip(), n.prefix())),
        )
        .collect()
}

fn touched_endpoints(d: &MapDiff) -> BTreeSet<ObjectKey> {
    d.endpoints_upsert
        .keys()
        .chain(d.endpoints_remove.iter())
        .cloned()
        .collect()
}

fn cidr_identities(m: &NodeMaps) -> BTreeSet<u32> {
    m.ipcache_v4
        .values()
        .chain(m.ipcache_v6.values())
        .map(|v| v.cidr_identity)
        .filter(|id| *id != identity::ANY)
        .collect()
}

/// CIDR identities POLICY entries are keyed on that no IPCACHE entry carries: entries that can
/// never match.
fn uncarried_cidr_identities(m: &NodeMaps) -> BTreeSet<u32> {
    let carried = cidr_identities(m);
    m.policy
        .keys()
        .map(|k| k.identity)
        .filter(|id| *id >= identity::CIDR_MIN && !carried.contains(id))
        .collect()
}

fn endpoint_ids(m: &NodeMaps, pods: &BTreeSet<ObjectKey>) -> BTreeSet<u32> {
    m.endpoints
        .iter()
        .filter(|(k, _)| pods.contains(k))
        .map(|(_, e)| e.id)
        .collect()
}

fn pod_identities(m: &NodeMaps, c: &Cluster, pods: &BTreeSet<ObjectKey>) -> BTreeSet<u32> {
    pods.iter()
        .filter_map(|k| c.pods.get(k))
        .flat_map(|p| p.ips.iter().copied())
        .map(|ip| ipcache_lookup(m, ip).identity)
        .filter(|id| (identity::POD_MIN..identity::CIDR_MIN).contains(id))
        .collect()
}

fn pod_hosts(c: &Cluster, pods: &BTreeSet<ObjectKey>) -> BTreeSet<Prefix> {
    pods.iter()
        .filter_map(|k| c.pods.get(k))
        .flat_map(|p| p.ips.iter().copied())
        .map(Prefix::host)
        .collect()
}

/// What one change may touch, and the check.
fn check_locality(
    ch: &Change,
    c0: &Cluster,
    c1: &Cluster,
    m0: &NodeMaps,
    m1: &NodeMaps,
    d: &MapDiff,
) -> Result<(), String> {
    let cidr_churn: BTreeSet<u32> = cidr_identities(m0)
        .symmetric_difference(&cidr_identities(m1))
        .copied()
        .collect();
    let fail = |what: &str| Err(format!("{ch:?}: {what} outside the affected set: {d:?}"));
    match ch {
        Change::RelabelPod(..) | Change::Readdress(..) => {
            // The one pod whose object differs.
            let pods: BTreeSet<ObjectKey> = c0
                .pods
                .iter()
                .filter(|(k, p)| c1.pods.get(*k) != Some(*p))
                .map(|(k, _)| k.clone())
                .collect();
            let eps: BTreeSet<u32> = endpoint_ids(m0, &pods)
                .union(&endpoint_ids(m1, &pods))
                .copied()
                .collect();
            let mut ids = pod_identities(m0, c0, &pods);
            ids.extend(pod_identities(m1, c1, &pods));
            let mut hosts = pod_hosts(c0, &pods);
            hosts.extend(pod_hosts(c1, &pods));
            if !touched_endpoints(d).is_subset(&pods) {
                return fail("endpoints");
            }
            if !touched_ipcache(d).iter().all(|p| hosts.contains(p)) {
                return fail("IPCACHE");
            }
            let relabel = matches!(ch, Change::RelabelPod(..));
            if !touched_policy_keys(d).all(|(ep, id)| {
                if relabel {
                    eps.contains(&ep) || ids.contains(&id)
                } else {
                    cidr_churn.contains(&id)
                }
            }) {
                return fail("POLICY");
            }
        }
        Change::RelabelNamespace(n, _) => {
            let pods: BTreeSet<ObjectKey> = c0
                .pods
                .keys()
                .filter(|k| k.namespace == NAMESPACES[*n])
                .cloned()
                .collect();
            let mut ids = pod_identities(m0, c0, &pods);
            ids.extend(pod_identities(m1, c1, &pods));
            let hosts = pod_hosts(c0, &pods);
            if !touched_endpoints(d).is_subset(&pods) {
                return fail("endpoints");
            }
            if !touched_ipcache(d).iter().all(|p| hosts.contains(p)) {
                return fail("IPCACHE");
            }
            if !touched_policy_keys(d).all(|(_, id)| ids.contains(&id)) {
                return fail("POLICY");
            }
        }
        Change::PutPolicy(..) | Change::DeletePolicy(..) => {
            // The policies whose object differs (one name, possibly moved between namespaces).
            let keys: Vec<ObjectKey> = c0
                .policies
                .keys()
                .chain(c1.policies.keys())
                .filter(|k| c0.policies.get(*k) != c1.policies.get(*k))
                .cloned()
                .collect();
            let pods: BTreeSet<ObjectKey> = c0
                .pods
                .keys()
                .filter(|k| keys.iter().any(|p| p.namespace == k.namespace))
                .cloned()
                .collect();
            let eps: BTreeSet<u32> = endpoint_ids(m0, &pods);
            let blocks: Vec<Prefix> = keys
                .iter()
                .flat_map(|k| [c0.policies.get(k), c1.policies.get(k)])
                .flatten()
                .flat_map(|p| {
                    serde_json::to_value(p).unwrap()["spec"]
                        .clone()
                        .as_object()
                        .cloned()
                })
                .flat_map(|spec| {
                    let mut cidrs = Vec::new();
                    collect_cidrs(&Value::Object(spec), &mut cidrs);
                    cidrs
                })
                .collect();
            if !touched_endpoints(d).is_subset(&pods) {
                return fail("endpoints");
            }
            if !touched_ipcache(d)
                .iter()
                .all(|p| blocks.iter().any(|b| b.covers(p)))
            {
                return fail("IPCACHE");
            }
            if !touched_policy_keys(d).all(|(ep, id)| eps.contains(&ep) || cidr_churn.contains(&id))
            {
                return fail("POLICY");
            }
        }
        Change::DeletePod(_) => {}
    }
    Ok(())
}

fn collect_cidrs(v: &Value, out: &mut Vec<Prefix>) {
    match v {
        Value::Object(o) => {
            if let Some(b) = o.get("ipBlock") {
                let cidr = b["cidr"].as_str().and_then(|c| Prefix::parse(c).ok());
                out.extend(cidr);
            }
            o.values().for_each(|x| collect_cidrs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_cidrs(x, out)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(4000))]

    #[test]
    fn dataplane_agrees_with_evaluator(g in gen_cluster()) {
        let cluster = build(&g);
        let compiled = Compiled::new(&cluster, &NODES);
        for flow in flows(&cluster) {
            if let Err(e) = check_flow(&cluster, &compiled, &flow) {
                prop_assert!(false, "{}", e);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn diffs_equal_recompilation(g in gen_cluster(), changes in prop::collection::vec(change(), 1..=5)) {
        let mut cluster = build(&g);
        let mut compilers: Vec<Compiler> = NODES.iter().map(|_| Compiler::new()).collect();
        let mut maps: Vec<NodeMaps> = NODES
            .iter()
            .zip(&mut compilers)
            .map(|(n, c)| c.compile(&cluster, &node_context(&cluster, n)).maps)
            .collect();
        // The last state deletes everything: nothing may remain but node addresses.
        let mut steps: Vec<Option<&Change>> = changes.iter().map(Some).collect();
        steps.push(None);
        for step in steps {
            match step {
                Some(ch) => { apply_change(&mut cluster, &g, ch); }
                None => { cluster.pods.clear(); cluster.policies.clear(); }
            }
            for (i, n) in NODES.iter().enumerate() {
                let ctx = node_context(&cluster, n);
                let new = compilers[i].compile(&cluster, &ctx).maps;
                check_invariants(&new);
                let uncarried = uncarried_cidr_identities(&new);
                prop_assert!(uncarried.is_empty(), "POLICY keyed on uncarried CIDR identities {:x?}",
                    uncarried);
                let d = maps[i].diff(&new);
                maps[i].apply(&d);
                prop_assert_eq!(&maps[i], &new);
                let mut fresh = Compiler::new();
                let scratch = fresh.compile(&cluster, &ctx).maps;
                prop_assert_eq!(canon(&compilers[i], &new), canon(&fresh, &scratch));
                // Compiling the same state again changes nothing.
                let again = compilers[i].compile(&cluster, &ctx).maps;
                prop_assert!(new.diff(&again).is_empty());
            }
        }
        for m in &maps {
            prop_assert!(m.endpoints.is_empty() && m.policy.is_empty() && m.rules.is_empty());
            prop_assert!(m.ipcache_v4.values().chain(m.ipcache_v6.values())
                .all(|v| v.identity == identity::HOST || v.identity == identity::REMOTE_NODE));
        }
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn changes_touch_only_affected_entries(g in gen_cluster(), ch in change()) {
        match change_is_local(&g, &ch) {
            Ok(applies) => prop_assume!(applies),
            Err(e) => prop_assert!(false, "{}", e),
        }
    }
}

/// Compiles `g` before and after `ch` with one compiler per node and checks that the diff is
/// limited to what the change affects; `Ok(false)` when the change does not apply to `g`.
fn change_is_local(g: &GenCluster, ch: &Change) -> Result<bool, String> {
    let c0 = build(g);
    let mut c1 = c0.clone();
    if !apply_change(&mut c1, g, ch) {
        return Ok(false);
    }
    for n in NODES {
        let mut compiler = Compiler::new();
        let m0 = compiler.compile(&c0, &node_context(&c0, n)).maps;
        let m1 = compiler.compile(&c1, &node_context(&c1, n)).maps;
        let d = m0.diff(&m1);
        check_locality(ch, &c0, &c1, &m0, &m1, &d).map_err(|e| format!("node {n}: {e}"))?;
    }
    Ok(true)
}

/// A policy in namespace y adds ipBlocks overlapping the 10.1.0.0/16 that x/pol0 allows egress
/// to, also with the named port `sc`. Pod x/p4 (10.1.0.5, `sc`/SCTP) is a named-port target with
/// a CIDR identity of its own, and the new except 10.1.0.5/32 carves a host prefix at its
/// address. That prefix's IPCACHE entry is the pod's, so an identity interned for the prefix is
/// carried by no entry; x/pol0's egress rule still keyed POLICY entries on it, on endpoints the
/// new policy does not select, for an identity outside the CIDR churn.
#[test]
fn new_except_at_a_named_port_target_keys_no_uncarried_identity() {
    let pods = (0..5)
        .map(|i| GenPod {
            ns: 0,
            labels: BTreeMap::new(),
            node: 0,
            dual_stack: false,
            // PORTS[3] is ("sc", 80, "SCTP").
            ports: if i == 4 { vec![3] } else { vec![] },
            kind: Kind::Normal,
        })
        .collect();
    let g = GenCluster {
        ns_labels: vec![BTreeMap::new(); 3],
        pods,
        policies: vec![(
            0,
            json!({
                "egress": [{
                    "to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}],
                    "ports": [{}, {"port": "sc", "protocol": "SCTP"}],
                }],
                "policyTypes": ["Egress"],
            }),
        )],
    };
    let ch = Change::PutPolicy(
        1,
        1,
        json!({
            "egress": [{"to": [{"ipBlock": {"cidr": "10.1.0.0/28"}}]}],
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.0.5/32"]}}]}],
        }),
    );
    assert_eq!(change_is_local(&g, &ch), Ok(true));
    let c0 = build(&g);
    let mut c1 = c0.clone();
    assert!(apply_change(&mut c1, &g, &ch));
    for n in NODES {
        let mut compiler = Compiler::new();
        for c in [&c0, &c1] {
            let m = compiler.compile(c, &node_context(c, n)).maps;
            assert_eq!(uncarried_cidr_identities(&m), BTreeSet::new(), "node {n}");
        }
    }
}

#[test]
fn flows_cover_every_kind_of_party() {
    // The generator's flows include pod↔pod, pod↔node and pod↔world pairs in both families.
    let g = GenCluster {
        ns_labels: vec![BTreeMap::new(); 3],
        pods: vec![
            GenPod {
                ns: 0,
                labels: BTreeMap::new(),
                node: 0,
                dual_stack: true,
                ports: vec![0],
                kind: Kind::Normal
            };
            2
        ],
        policies: vec![],
    };
    let f = flows(&build(&g));
    let has = |pred: &dyn Fn(&Flow) -> bool| f.iter().any(pred);
    assert!(has(&|f| matches!(
        (&f.src, &f.dst),
        (Peer::Pod { .. }, Peer::Pod { .. })
    ) && f.src.ip().is_some_and(|a| a.is_ipv6())));
    assert!(has(
        &|f| matches!(f.dst, Peer::Address(ip) if ip.to_string() == "172.18.0.1")
    ));
    assert!(has(
        &|f| matches!(f.src, Peer::Address(ip) if ip.to_string() == "8.8.8.8")
    ));
    let _ = Direction::Ingress;
}
