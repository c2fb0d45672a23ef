//! Hand-written scenarios for what random tests reach rarely: invalid input handled fail-closed,
//! per-pod named ports behind ipBlocks, hostNetwork pods, Services, identity and endpoint-id
//! stability, and the shape of the entries.

mod common;

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use common::*;
use policy_agent::compiler::{CompileError, Compiler, IdentityInfo, NodeMaps};
use policy_agent::evaluator::{self, Flow, Outcome, Peer, Protocol};
use policy_agent::model::{Cluster, NAMESPACE_NAME_LABEL};
use policy_common::{Direction, endpoint_flags, identity, proto};
use serde_json::json;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The pods of [`base`]: namespace, name (also the `app` label), node, address, container ports.
const BASE_PODS: [(&str, &str, &str, &str, &[Port<'static>]); 3] = [
    ("x", "a", "n1", "10.0.1.1", &[("http", 80, "TCP")]),
    (
        "x",
        "b",
        "n1",
        "10.0.1.2",
        &[("http", 8080, "TCP"), ("dns", 53, "UDP")],
    ),
    ("y", "c", "n2", "10.0.2.1", &[("http", 8080, "TCP")]),
];

/// Pod `ns/name` of [`base`], as the API server holds it.
fn base_pod(ns: &str, name: &str) -> Pod {
    let (_, _, node, addr, ports) = BASE_PODS
        .into_iter()
        .find(|p| (p.0, p.1) == (ns, name))
        .unwrap();
    let spec = PodSpec {
        labels: vec![("app", name)],
        node,
        ips: vec![ip(addr)],
        host_ip: Some(if node == "n1" {
            ip("172.18.0.1")
        } else {
            ip("172.18.0.2")
        }),
        ports: ports.to_vec(),
        ..Default::default()
    };
    pod_object(ns, name, &spec)
}

/// Two nodes; namespaces x and y; pods x/a, x/b on n1 and y/c on n2.
fn base() -> Cluster {
    let mut c = Cluster::default();
    c.nodes.insert("n1".into(), node("n1", &[ip("172.18.0.1")]));
    c.nodes.insert("n2".into(), node("n2", &[ip("172.18.0.2")]));
    for ns in ["x", "y"] {
        c.namespaces
            .insert(ns.into(), namespace(ns, &[(NAMESPACE_NAME_LABEL, ns)]));
    }
    for (ns, name, ..) in BASE_PODS {
        c.pods.insert(key(ns, name), base_pod(ns, name).into());
    }
    c
}

fn flow(c: &Cluster, from: &str, to: &str, protocol: Protocol, port: u16) -> Flow {
    let peer = |p: &str| match p.split_once('/') {
        Some((ns, name)) => Peer::Pod {
            pod: key(ns, name),
            ip: c.pods[&key(ns, name)].ips[0],
        },
        None => Peer::Address(ip(p)),
    };
    Flow {
        src: peer(from),
        dst: peer(to),
        protocol,
        port,
    }
}

/// Evaluator and dataplane agree on the flow; returns the verdict.
fn allowed(c: &Cluster, from: &str, to: &str, protocol: Protocol, port: u16) -> bool {
    let compiled = Compiled::new(c, &["n1", "n2"]);
    let f = flow(c, from, to, protocol, port);
    check_flow(c, &compiled, &f).unwrap();
    evaluator::evaluate(c, &f).allowed
}

fn compile(c: &Cluster, n: &str) -> (Compiler, NodeMaps, Vec<CompileError>) {
    let mut compiler = Compiler::new();
    let out = compiler.compile(c, &node_context(c, n));
    check_invariants(&out.maps);
    (compiler, out.maps, out.errors)
}

fn policy_error_fields(errors: &[CompileError]) -> Vec<(String, String, String)> {
    errors
        .iter()
        .filter_map(|e| match e {
            CompileError::Policy {
                namespace,
                name,
                field,
                ..
            } => Some((namespace.clone(), name.clone(), field.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn invalid_policies_are_named_and_rejected_fail_closed() {
    let allow_all_ingress = json!({"podSelector": {}, "ingress": [{}]});
    let bad: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "bad-cidr",
            json!({"ipBlock": {"cidr": "10.0.0.0/33"}}),
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "bad-except",
            json!({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/24", "10.1.0.0/24"]}}),
            "spec.ingress[0].from[0].ipBlock.except[1]",
        ),
        (
            "mixed-peer",
            json!({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}),
            "spec.ingress[0].from[0]",
        ),
        ("empty-peer", json!({}), "spec.ingress[0].from[0]"),
    ];
    let bad_ports: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "end-below",
            json!({"port": 80, "endPort": 79}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "end-named",
            json!({"port": "http", "endPort": 90}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "end-alone",
            json!({"endPort": 90}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "bad-proto",
            json!({"protocol": "ICMP", "port": 80}),
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            "bad-port",
            json!({"port": 70000}),
            "spec.ingress[0].ports[0].port",
        ),
    ];
    for (name, peer, field) in bad {
        let spec = json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [peer]}], "policyTypes": ["Ingress"]});
        check_rejected(name, spec, field, &allow_all_ingress);
    }
    for (name, port, field) in bad_ports {
        let spec = json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"ports": [port]}], "policyTypes": ["Ingress"]});
        check_rejected(name, spec, field, &allow_all_ingress);
    }
}

/// `spec` (selecting x/a, ingress) is invalid at `field`: x/a is isolated with nothing allowed,
/// x/b is untouched, and a valid policy elsewhere still compiles.
fn check_rejected(name: &str, spec: serde_json::Value, field: &str, other: &serde_json::Value) {
    let mut c = base();
    c.policies.insert(key("x", name), policy("x", name, spec));
    c.policies
        .insert(key("y", "open"), policy("y", "open", other.clone()));
    let (_, maps, errors) = compile(&c, "n1");
    let fields = policy_error_fields(&errors);
    assert_eq!(
        fields,
        vec![("x".into(), name.into(), field.into())],
        "{name}: {errors:?}"
    );
    // The message names all three.
    let msg = errors[0].to_string();
    assert!(
        msg.contains(&format!("x/{name}")) && msg.contains(field),
        "{msg}"
    );
    let a = &maps.endpoints[&key("x", "a")];
    assert_eq!(a.flags, endpoint_flags::INGRESS_ISOLATED, "{name}");
    assert_eq!(maps.endpoints[&key("x", "b")].flags, 0, "{name}");
    assert!(
        maps.policy.keys().all(|k| k.endpoint != a.id),
        "{name}: entries for x/a"
    );
    for port in [80, 53, 8080] {
        assert!(!allowed(&c, "x/b", "x/a", Protocol::Tcp, port), "{name}");
        assert!(
            !allowed(&c, "8.8.8.8", "x/a", Protocol::Tcp, port),
            "{name}"
        );
    }
    // y's valid allow-all policy still compiled: y/c (on n2) is isolated and open.
    let (_, maps2, _) = compile(&c, "n2");
    assert_eq!(
        maps2.endpoints[&key("y", "c")].flags,
        endpoint_flags::INGRESS_ISOLATED
    );
    assert!(allowed(&c, "x/a", "y/c", Protocol::Udp, 9));
}

#[test]
fn invalid_pod_selector_isolates_the_whole_namespace_in_declared_directions() {
    let mut c = base();
    c.policies.insert(
        key("x", "bad-selector"),
        policy("x", "bad-selector", json!({
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "Near", "values": ["a"]}]},
            "egress": [{}],
            "policyTypes": ["Egress"]
        })),
    );
    let (_, maps, errors) = compile(&c, "n1");
    assert_eq!(
        policy_error_fields(&errors),
        vec![(
            "x".into(),
            "bad-selector".into(),
            "spec.podSelector.matchExpressions[0].operator".into()
        )]
    );
    for p in ["a", "b"] {
        assert_eq!(
            maps.endpoints[&key("x", p)].flags,
            endpoint_flags::EGRESS_ISOLATED
        );
    }
    assert!(maps.policy.is_empty());
    assert!(!allowed(&c, "x/a", "y/c", Protocol::Tcp, 8080));
    assert!(
        allowed(&c, "y/c", "x/a", Protocol::Tcp, 80),
        "ingress is not declared"
    );
}

#[test]
fn invalid_policy_types_isolate_both_directions() {
    let mut c = base();
    c.policies.insert(
        key("x", "typo"),
        policy(
            "x",
            "typo",
            json!({"podSelector": {}, "ingress": [{}], "policyTypes": ["Ingres"]}),
        ),
    );
    let (_, maps, errors) = compile(&c, "n1");
    assert_eq!(
        policy_error_fields(&errors),
        vec![("x".into(), "typo".into(), "spec.policyTypes[0]".into())]
    );
    assert_eq!(
        maps.endpoints[&key("x", "a")].flags,
        endpoint_flags::INGRESS_ISOLATED | endpoint_flags::EGRESS_ISOLATED
    );
    assert!(maps.policy.is_empty());
}

#[test]
fn egress_named_port_through_ip_block_resolves_per_destination_pod() {
    // x/a "http" = 80, x/b "http" = 8080, y/c "http" = 8080.
    let mut c = base();
    c.policies.insert(
        key("x", "named"),
        policy("x", "named", json!({
            "podSelector": {"matchLabels": {"app": "a"}},
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.2.0/24"]}}], "ports": [{"port": "http"}]}],
            "policyTypes": ["Egress"]
        })),
    );
    assert!(allowed(&c, "x/a", "x/b", Protocol::Tcp, 8080));
    assert!(
        !allowed(&c, "x/a", "x/b", Protocol::Tcp, 80),
        "x/b's http is 8080"
    );
    assert!(
        !allowed(&c, "x/a", "x/b", Protocol::Udp, 8080),
        "protocol must match"
    );
    assert!(
        !allowed(&c, "x/a", "y/c", Protocol::Tcp, 8080),
        "y/c is excepted"
    );
    assert!(
        !allowed(&c, "x/a", "10.0.1.99", Protocol::Tcp, 8080),
        "a named port never matches a non-pod"
    );
    assert!(!allowed(&c, "x/a", "10.0.1.99", Protocol::Tcp, 80));
    // x/b's address has a CIDR identity of its own, keyed in the entry.
    let (compiler, maps, _) = compile(&c, "n1");
    let b = ipcache_lookup(&maps, ip("10.0.1.2"));
    match compiler.identity_info(b.cidr_identity) {
        Some(IdentityInfo::Cidr(k)) => assert_eq!(k.exact, Some(ip("10.0.1.2"))),
        other => panic!("{other:?}"),
    }
    let a = maps.endpoints[&key("x", "a")].id;
    let entries: Vec<_> = maps.policy.keys().filter(|k| k.endpoint == a).collect();
    // One per pod in the block defining "http": x/a itself (80) and x/b (8080).
    let a_cidr = ipcache_lookup(&maps, ip("10.0.1.1")).cidr_identity;
    let mut got: Vec<(u32, u16, u16)> = entries
        .iter()
        .map(|k| (k.identity, k.first, k.last))
        .collect();
    got.sort();
    let mut want = vec![(a_cidr, 80, 80), (b.cidr_identity, 8080, 8080)];
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn egress_named_port_without_peers_matches_every_pod_defining_it() {
    let mut c = base();
    c.policies.insert(
        key("x", "dns"),
        policy(
            "x",
            "dns",
            json!({
                "podSelector": {"matchLabels": {"app": "a"}},
                "egress": [{"ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}],
            }),
        ),
    );
    // Defaulted policyTypes: Ingress too (egress rules present) — x/a is isolated both ways.
    let (_, maps, _) = compile(&c, "n1");
    assert_eq!(
        maps.endpoints[&key("x", "a")].flags,
        endpoint_flags::INGRESS_ISOLATED | endpoint_flags::EGRESS_ISOLATED
    );
    assert!(allowed(&c, "x/a", "y/c", Protocol::Tcp, 8080));
    assert!(allowed(&c, "x/a", "x/b", Protocol::Udp, 53));
    assert!(!allowed(&c, "x/a", "y/c", Protocol::Tcp, 80));
    assert!(!allowed(&c, "x/a", "8.8.8.8", Protocol::Udp, 53));
    assert!(
        !allowed(&c, "x/b", "x/a", Protocol::Tcp, 80),
        "ingress isolated by defaulting"
    );
}

#[test]
fn ingress_named_port_resolves_on_the_endpoint() {
    let mut c = base();
    c.policies.insert(
        key("x", "web"),
        policy(
            "x",
            "web",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}),
        ),
    );
    assert!(allowed(&c, "y/c", "x/a", Protocol::Tcp, 80));
    assert!(!allowed(&c, "y/c", "x/a", Protocol::Tcp, 8080));
    assert!(
        allowed(&c, "8.8.8.8", "x/b", Protocol::Tcp, 8080),
        "ingress named ports allow any peer"
    );
    assert!(!allowed(&c, "y/c", "x/b", Protocol::Tcp, 80));
}

#[test]
fn ip_blocks_match_pod_addresses_and_end_port_becomes_one_range() {
    let mut c = base();
    c.policies.insert(
        key("x", "range"),
        policy("x", "range", json!({
            "podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.2.1/32"}}], "ports": [{"port": 53, "endPort": 80, "protocol": "SCTP"}]}],
            "policyTypes": ["Ingress"]
        })),
    );
    assert!(allowed(&c, "y/c", "x/a", Protocol::Sctp, 53));
    assert!(allowed(&c, "y/c", "x/a", Protocol::Sctp, 80));
    assert!(allowed(&c, "y/c", "x/a", Protocol::Sctp, 64));
    assert!(!allowed(&c, "y/c", "x/a", Protocol::Sctp, 81));
    assert!(!allowed(&c, "y/c", "x/a", Protocol::Sctp, 52));
    assert!(!allowed(&c, "y/c", "x/a", Protocol::Tcp, 60));
    assert!(!allowed(&c, "x/b", "x/a", Protocol::Sctp, 60));
    let (_, maps, _) = compile(&c, "n1");
    // 53..=80 is one range, keyed on y/c's address's CIDR identity.
    assert_eq!(maps.policy.len(), 1);
    assert!(maps.policy.keys().all(|k| k.protocol == proto::SCTP
        && k.direction == Direction::Ingress
        && (k.first, k.last) == (53, 80)));
    let cidr = ipcache_lookup(&maps, ip("10.0.2.1")).cidr_identity;
    assert!(cidr >= identity::CIDR_MIN);
    assert!(maps.policy.keys().all(|k| k.identity == cidr));
}

#[test]
fn ports_without_port_number_and_empty_ports() {
    let mut c = base();
    c.policies.insert(
        key("x", "tcp-only"),
        policy(
            "x",
            "tcp-only",
            json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"ports": [{}]}]}),
        ),
    );
    c.policies.insert(
        key("x", "all"),
        policy("x", "all", json!({"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [{"ports": [], "from": []}]})),
    );
    assert!(allowed(&c, "y/c", "x/a", Protocol::Tcp, 1));
    assert!(
        !allowed(&c, "y/c", "x/a", Protocol::Udp, 53),
        "ports: [{{}}] is all TCP ports only"
    );
    for p in Protocol::ALL {
        assert!(allowed(&c, "y/c", "x/b", p, 7));
    }
    let (_, maps, _) = compile(&c, "n1");
    let b = maps.endpoints[&key("x", "b")].id;
    let b_entries: Vec<_> = maps.policy.keys().filter(|k| k.endpoint == b).collect();
    assert_eq!(b_entries.len(), 3, "one all-ports ANY entry per protocol");
    assert!(
        b_entries
            .iter()
            .all(|k| (k.first, k.last) == (0, 65535) && k.identity == identity::ANY)
    );
}

#[test]
fn host_network_pods_are_node_traffic() {
    let mut c = base();
    let spec = PodSpec {
        labels: vec![("app", "agent")],
        node: "n1",
        ips: vec![ip("172.18.0.1")],
        host_ip: Some(ip("172.18.0.1")),
        host_network: true,
        ..Default::default()
    };
    c.pods.insert(key("x", "hn"), pod("x", "hn", &spec));
    let spec2 = PodSpec {
        node: "n2",
        ips: vec![ip("172.18.0.2")],
        host_ip: Some(ip("172.18.0.2")),
        ..spec
    };
    c.pods.insert(key("y", "hn2"), pod("y", "hn2", &spec2));
    c.policies.insert(
        key("x", "deny"),
        policy(
            "x",
            "deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    let (_, maps, _) = compile(&c, "n1");
    assert!(
        !maps.endpoints.contains_key(&key("x", "hn")),
        "hostNetwork pods are not endpoints"
    );
    assert_eq!(
        ipcache_lookup(&maps, ip("172.18.0.1")).identity,
        identity::HOST
    );
    assert_eq!(
        ipcache_lookup(&maps, ip("172.18.0.2")).identity,
        identity::REMOTE_NODE
    );
    // Own node: always allowed, both ways. Remote node's hostNetwork pod: denied like the world.
    assert!(allowed(&c, "x/hn", "x/a", Protocol::Tcp, 80));
    assert!(allowed(&c, "x/a", "x/hn", Protocol::Tcp, 10250));
    assert!(!allowed(&c, "y/hn2", "x/a", Protocol::Tcp, 80));
    let v = evaluator::evaluate(&c, &flow(&c, "x/hn", "x/a", Protocol::Tcp, 80));
    assert_eq!(
        (v.egress.outcome, v.ingress.outcome),
        (Outcome::NotPolicied, Outcome::Host)
    );
}

#[test]
fn pods_reaching_themselves_are_allowed() {
    let mut c = base();
    c.policies.insert(
        key("x", "deny"),
        policy(
            "x",
            "deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    assert!(allowed(&c, "x/a", "x/a", Protocol::Tcp, 80));
    assert!(!allowed(&c, "x/a", "x/b", Protocol::Tcp, 8080));
}

#[test]
fn services_and_bad_addresses() {
    let mut c = base();
    c.services.insert(
        key("x", "web"),
        service("x", "web", &["10.96.0.10", "fd00:96::10"]),
    );
    c.services
        .insert(key("x", "headless"), service("x", "headless", &["None"]));
    c.services
        .insert(key("x", "broken"), service("x", "broken", &["10.96.0.300"]));
    let mut bad = base_pod("x", "a");
    bad.status.as_mut().unwrap().pod_ips = Some(vec![
        serde_json::from_value(json!({"ip": "10.0.1.1"})).unwrap(),
        serde_json::from_value(json!({"ip": "not-an-ip"})).unwrap(),
    ]);
    c.pods.insert(key("x", "a"), bad.into());
    let (_, maps, errors) = compile(&c, "n1");
    assert_eq!(maps.services, [ip("10.96.0.10"), ip("fd00:96::10")].into());
    let named: Vec<(String, String, String)> = errors
        .iter()
        .map(|e| (e.namespace().into(), e.name().into(), e.field().into()))
        .collect();
    assert!(
        named.contains(&("x".into(), "broken".into(), "spec.clusterIPs[0]".into())),
        "{errors:?}"
    );
    assert!(
        named.contains(&("x".into(), "a".into(), "status.podIPs[1].ip".into())),
        "{errors:?}"
    );
    assert_eq!(
        maps.endpoints[&key("x", "a")].addresses,
        vec![ip("10.0.1.1")]
    );
}

#[test]
fn identities_follow_label_sets_and_stay_stable() {
    let mut c = base();
    // x/a2: same labels and named ports as x/a → same identity; x/a3: same labels, other ports.
    let twin = |addr: &str, ports: Vec<Port<'static>>| PodSpec {
        labels: vec![("app", "a")],
        node: "n1",
        ips: vec![ip(addr)],
        ports,
        ..Default::default()
    };
    c.pods.insert(
        key("x", "a2"),
        pod("x", "a2", &twin("10.0.1.3", vec![("http", 80, "TCP")])),
    );
    c.pods.insert(
        key("x", "a3"),
        pod("x", "a3", &twin("10.0.1.4", vec![("http", 81, "TCP")])),
    );
    let mut compiler = Compiler::new();
    let m1 = compiler.compile(&c, &node_context(&c, "n1")).maps;
    let id = |m: &NodeMaps, p: &str| m.endpoints[&key("x", p)].identity;
    assert_eq!(id(&m1, "a"), id(&m1, "a2"));
    assert_ne!(id(&m1, "a"), id(&m1, "a3"));
    assert_ne!(id(&m1, "a"), id(&m1, "b"));
    // Relabelling x/b changes nothing else; x/a's identity and every endpoint id stay.
    c.pods.get_mut(&key("x", "b")).unwrap().labels = [("app".into(), "z".into())].into();
    let m2 = compiler.compile(&c, &node_context(&c, "n1")).maps;
    assert_eq!(id(&m1, "a"), id(&m2, "a"));
    assert_ne!(id(&m1, "b"), id(&m2, "b"));
    for (k, e) in &m1.endpoints {
        assert_eq!(e.id, m2.endpoints[k].id);
    }
    let d = m1.diff(&m2);
    assert_eq!(
        d.endpoints_upsert.keys().collect::<Vec<_>>(),
        vec![&key("x", "b")]
    );
    assert_eq!(d.ipcache_v4_upsert.len(), 1);
    // Namespace relabel changes the identities of its pods, not their endpoint ids.
    c.namespaces
        .get_mut("x")
        .unwrap()
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("team".into(), "t".into());
    let m3 = compiler.compile(&c, &node_context(&c, "n1")).maps;
    assert_ne!(id(&m2, "a"), id(&m3, "a"));
    assert_eq!(
        m2.endpoints[&key("x", "a")].id,
        m3.endpoints[&key("x", "a")].id
    );
    assert!(id(&m3, "a") >= identity::POD_MIN && id(&m3, "a") < identity::CIDR_MIN);
}

#[test]
fn endpoints_are_local_live_pods_with_addresses() {
    let mut c = base();
    let mut done = base_pod("x", "b");
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    c.pods.insert(key("x", "done"), done.into());
    let pending = PodSpec {
        labels: vec![("app", "p")],
        node: "n1",
        ..Default::default()
    };
    c.pods
        .insert(key("x", "pending"), pod("x", "pending", &pending));
    let (_, maps, _) = compile(&c, "n1");
    let keys: Vec<_> = maps.endpoints.keys().cloned().collect();
    assert_eq!(keys, vec![key("x", "a"), key("x", "b")]);
    let (_, maps2, _) = compile(&c, "n2");
    assert_eq!(
        maps2.endpoints.keys().cloned().collect::<Vec<_>>(),
        vec![key("y", "c")]
    );
    // Every pod address is in every node's IPCACHE.
    for m in [&maps, &maps2] {
        for a in ["10.0.1.1", "10.0.1.2", "10.0.2.1"] {
            assert!(ipcache_lookup(m, ip(a)).identity >= identity::POD_MIN);
        }
    }
}

#[test]
fn deleting_everything_leaves_only_node_entries() {
    let mut c = base();
    c.policies.insert(
        key("x", "p"),
        policy("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.2.0/24"]}}, {"podSelector": {}}]}]})),
    );
    let mut compiler = Compiler::new();
    let mut maps = compiler.compile(&c, &node_context(&c, "n1")).maps;
    assert!(!maps.policy.is_empty() && !maps.rules.is_empty());
    c.policies.clear();
    c.pods.clear();
    let empty = compiler.compile(&c, &node_context(&c, "n1")).maps;
    maps.apply(&maps.diff(&empty));
    assert_eq!(maps, empty);
    assert!(maps.policy.is_empty() && maps.rules.is_empty() && maps.endpoints.is_empty());
    assert_eq!(
        maps.ipcache_v4.len(),
        2,
        "the two node addresses: {:?}",
        maps.ipcache_v4
    );
}

/// x/a admits x/b on `n` distinct ports (every other port from 1000: no two merge).
fn many_ports(n: u16) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    let ports: Vec<_> = (0..n).map(|i| json!({"port": 1000 + 2 * i})).collect();
    policy(
        "x",
        "many",
        json!({"podSelector": {"matchLabels": {"app": "a"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": ports}]}),
    )
}

#[test]
fn end_port_ranges_are_one_merged_range() {
    let mut c = base();
    c.policies.insert(
        key("x", "wide"),
        policy(
            "x",
            "wide",
            json!({"podSelector": {"matchLabels": {"app": "a"}},
                   "ingress": [{"ports": [{"port": 1, "endPort": 65535},
                                          {"port": 8000, "endPort": 8100},
                                          {"port": 443}]}]}),
        ),
    );
    c.policies.insert(
        key("x", "adjacent"),
        policy(
            "x",
            "adjacent",
            json!({"podSelector": {"matchLabels": {"app": "b"}},
                   "ingress": [{"ports": [{"port": 80}, {"port": 81}, {"port": 82, "endPort": 90},
                                          {"port": 85, "endPort": 100}]}]}),
        ),
    );
    for port in [1, 443, 8050, 65535] {
        assert!(allowed(&c, "y/c", "x/a", Protocol::Tcp, port));
    }
    assert!(allowed(&c, "y/c", "x/b", Protocol::Tcp, 100));
    assert!(!allowed(&c, "y/c", "x/b", Protocol::Tcp, 101));
    let (_, maps, errors) = compile(&c, "n1");
    assert!(errors.is_empty(), "{errors:?}");
    let ranges = |pod: &str| -> Vec<(u16, u16)> {
        let id = maps.endpoints[&key("x", pod)].id;
        maps.policy
            .keys()
            .filter(|k| k.endpoint == id)
            .map(|k| (k.first, k.last))
            .collect()
    };
    assert_eq!(ranges("a"), vec![(1, 65535)], "contained ranges disappear");
    assert_eq!(
        ranges("b"),
        vec![(80, 100)],
        "adjacent and overlapping merge"
    );
}

#[test]
fn a_group_over_capacity_fails_only_its_endpoint_closed() {
    let limit = policy_common::POLICY_MAX_RANGES as u16;
    for n in [limit, limit + 1] {
        let mut c = base();
        c.policies.insert(key("x", "many"), many_ports(n));
        c.policies.insert(
            key("x", "b-web"),
            policy(
                "x",
                "b-web",
                json!({"podSelector": {"matchLabels": {"app": "b"}},
                       "ingress": [{"ports": [{"port": 8080}]}]}),
            ),
        );
        let (_, maps, errors) = compile(&c, "n1");
        let a = &maps.endpoints[&key("x", "a")];
        let b = &maps.endpoints[&key("x", "b")];
        let entries_of = |id: u32| maps.policy.keys().filter(|k| k.endpoint == id).count();
        assert_eq!(b.flags, endpoint_flags::INGRESS_ISOLATED, "{n}");
        assert_eq!(entries_of(b.id), 1, "{n}: x/b keeps its entry");
        if n == limit {
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(a.flags, endpoint_flags::INGRESS_ISOLATED);
            assert_eq!(entries_of(a.id), usize::from(limit));
        } else {
            assert_eq!(
                a.flags,
                endpoint_flags::INGRESS_ISOLATED | endpoint_flags::NOT_PROGRAMMED
            );
            assert_eq!(entries_of(a.id), 0);
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                matches!(
                    &errors[0],
                    CompileError::MapCapacity { namespace, name, map: "POLICY", ranges, limit: l, direction: "ingress", protocol: "TCP", .. }
                        if (namespace.as_str(), name.as_str()) == ("x", "a")
                            && *ranges == usize::from(n)
                            && *l == usize::from(limit)
                ),
                "{errors:?}"
            );
            let msg = errors[0].to_string();
            assert!(
                msg.contains("Pod x/a") && msg.contains("map POLICY"),
                "{msg}"
            );
        }
    }
}

/// The agent compiles the enforced view of a cluster with policies in audit: the same maps (and
/// errors) as the cluster with those policies deleted, and not the same as with them enforced.
#[test]
fn the_enforced_view_compiles_as_if_audited_policies_were_deleted() {
    use policy_agent::audit;
    let mut c = base();
    let annotate = |np: &mut k8s_openapi::api::networking::v1::NetworkPolicy| {
        np.metadata.annotations = Some([(audit::ANNOTATION.to_owned(), "true".to_owned())].into());
    };
    let deny_all = json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]});
    let allow_http = json!({"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": "http"}]}]});
    let broken = json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 79}]}]});
    c.policies.insert(
        key("x", "allow-http"),
        policy("x", "allow-http", allow_http),
    );
    let mut audited_deny = policy("x", "deny-all", deny_all.clone());
    annotate(&mut audited_deny);
    c.policies.insert(key("x", "deny-all"), audited_deny);
    let mut audited_broken = policy("x", "broken", broken);
    annotate(&mut audited_broken);
    c.policies.insert(key("x", "broken"), audited_broken);
    // Every policy of namespace y is in audit through its Namespace.
    c.policies
        .insert(key("y", "deny-all"), policy("y", "deny-all", deny_all));
    let y = c.namespaces.get_mut("y").unwrap();
    y.metadata.annotations = Some([(audit::ANNOTATION.to_owned(), "true".to_owned())].into());

    let mut deleted = c.clone();
    for k in [
        key("x", "deny-all"),
        key("x", "broken"),
        key("y", "deny-all"),
    ] {
        deleted.policies.remove(&k);
    }
    assert_eq!(
        audit::audited(&c),
        [
            key("x", "broken"),
            key("x", "deny-all"),
            key("y", "deny-all")
        ]
        .into()
    );
    for n in ["n1", "n2"] {
        let view = audit::enforced_view(&c);
        let (_, maps, errors) = compile(&view, n);
        let (_, want_maps, want_errors) = compile(&deleted, n);
        assert_eq!(maps, want_maps, "{n}");
        assert_eq!(errors, want_errors, "{n}");
        assert!(
            errors.is_empty(),
            "the audited broken policy is not compiled: {errors:?}"
        );
        let (_, all_maps, all_errors) = compile(&c, n);
        assert_ne!(maps, all_maps, "{n}: audit changes what is enforced");
        assert!(!all_errors.is_empty());
    }
    // x/b is isolated for ingress by x/allow-http only; x/a not at all.
    let (_, maps, _) = compile(&audit::enforced_view(&c), "n1");
    assert_eq!(maps.endpoints[&key("x", "a")].flags, 0);
    assert_eq!(
        maps.endpoints[&key("x", "b")].flags,
        endpoint_flags::INGRESS_ISOLATED
    );
    // Removing the annotation enforces the policy again.
    let mut enforced = c.clone();
    enforced
        .policies
        .get_mut(&key("x", "deny-all"))
        .unwrap()
        .metadata
        .annotations = None;
    let (_, maps, _) = compile(&audit::enforced_view(&enforced), "n1");
    assert_eq!(
        maps.endpoints[&key("x", "a")].flags,
        endpoint_flags::INGRESS_ISOLATED | endpoint_flags::EGRESS_ISOLATED
    );
}
