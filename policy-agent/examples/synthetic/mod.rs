//! The synthetic cluster of the control-plane benchmarks: `policies / 10` namespaces (team and
//! env labels), pods spread evenly over them in workloads of 10 replicas (app, tier, version
//! labels; named container ports), 110 pods per node, one Service per workload. Per namespace ten
//! policies: a default deny, seven app-to-app ingress rules (same namespace by label, monitoring
//! namespaces by label, named and numeric ports), an egress rule to databases and DNS, and an
//! egress ipBlock rule (world minus private ranges, a per-namespace /24, an endPort range).

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_agent::model::{Cluster, ObjectKey};
use serde_json::json;

pub const PODS_PER_NODE: usize = 110;
const REPLICAS: usize = 10;
const POLICIES_PER_NAMESPACE: usize = 10;
const TIERS: [(&str, &str, u16); 3] = [
    ("web", "http", 8080),
    ("api", "grpc", 9090),
    ("db", "db", 5432),
];

pub fn node_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, (n / 256) as u8, (n % 256) as u8)
}

pub fn pod_ip(node: usize, slot: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        128 + (node / 256) as u8,
        (node % 256) as u8,
        1 + slot as u8,
    )
}

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

/// The cluster of `pods` pods and `policies` policies.
pub fn build(pods: usize, policies: usize) -> Cluster {
    let o = Options { pods, policies };
    let namespaces = (o.policies / POLICIES_PER_NAMESPACE).max(1);
    let mut c = Cluster::default();
    for i in 0..namespaces {
        let name = format!("ns-{i}");
        let ns: Namespace = obj(json!({"metadata": {"name": name, "labels": {
            "team": format!("team-{}", i % 50),
            "env": if i.is_multiple_of(3) { "prod" } else { "dev" },
            "monitoring": if i.is_multiple_of(25) { "true" } else { "false" },
        }}}));
        c.namespaces.insert(name, ns);
    }
    c.namespaces.insert(
        "kube-system".into(),
        obj(json!({"metadata": {"name": "kube-system"}})),
    );
    let nodes = o.pods.div_ceil(PODS_PER_NODE);
    for n in 0..nodes {
        let node: Node = obj(
            json!({"metadata": {"name": format!("node-{n}")}, "status": {"addresses": [
                {"type": "InternalIP", "address": node_ip(n).to_string()},
                {"type": "Hostname", "address": format!("node-{n}")},
            ]}}),
        );
        c.nodes.insert(format!("node-{n}"), node);
    }
    let per_ns = o.pods.div_ceil(namespaces);
    for p in 0..o.pods {
        // Spread each namespace's pods over nodes like a scheduler would (round robin).
        let ns = p % namespaces;
        let index = p / namespaces;
        let app = index / REPLICAS;
        let (tier, port_name, port) = TIERS[app % TIERS.len()];
        let node = p % nodes;
        let slot = p / nodes;
        let name = format!("app-{app}-{index}");
        let pod: Pod = obj(json!({
            "metadata": {"name": name, "namespace": format!("ns-{ns}"), "labels": {
                "app": format!("app-{app}"), "tier": tier, "version": if index.is_multiple_of(2) { "v1" } else { "v2" },
                "pod-template-hash": format!("h{app}"),
            }},
            "spec": {"nodeName": format!("node-{node}"), "containers": [{"name": "main", "ports": [
                {"name": port_name, "containerPort": port, "protocol": "TCP"},
                {"name": "metrics", "containerPort": 9100, "protocol": "TCP"},
            ]}]},
            "status": {"phase": "Running", "podIP": pod_ip(node, slot).to_string(),
                       "podIPs": [{"ip": pod_ip(node, slot).to_string()}], "hostIP": node_ip(node).to_string()},
        }));
        c.pods
            .insert(ObjectKey::new(format!("ns-{ns}"), name), pod.into());
    }
    let apps = per_ns.div_ceil(REPLICAS).max(1);
    let mut svc_ip = 0u32;
    for ns in 0..namespaces {
        for app in 0..apps {
            svc_ip += 1;
            let ip = Ipv4Addr::from_bits(0x0a60_0000 + svc_ip);
            let svc: Service = obj(
                json!({"metadata": {"name": format!("app-{app}"), "namespace": format!("ns-{ns}")},
                "spec": {"clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()]}}),
            );
            c.services.insert(
                ObjectKey::new(format!("ns-{ns}"), format!("app-{app}")),
                svc,
            );
        }
    }
    let mut made = 0;
    'outer: for ns in 0..namespaces {
        let namespace = format!("ns-{ns}");
        for k in 0..POLICIES_PER_NAMESPACE {
            if made == o.policies {
                break 'outer;
            }
            made += 1;
            let app = k % apps;
            let (spec, name) = match k {
                0 => (
                    json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
                    "default-deny".to_owned(),
                ),
                1..=7 => (
                    json!({
                        "podSelector": {"matchLabels": {"app": format!("app-{app}")}},
                        "policyTypes": ["Ingress"],
                        "ingress": [
                            {"from": [{"podSelector": {"matchExpressions": [
                                {"key": "app", "operator": "In", "values": [format!("app-{}", (app + 1) % apps), format!("app-{}", (app + 2) % apps)]}]}}],
                             "ports": [{"port": TIERS[app % 3].1}]},
                            {"from": [{"namespaceSelector": {"matchLabels": {"monitoring": "true"}}}],
                             "ports": [{"port": "metrics"}]},
                            {"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", ns % 50)}},
                                       "podSelector": {"matchLabels": {"tier": "web"}}}],
                             "ports": [{"port": TIERS[app % 3].2, "protocol": "TCP"}]},
                        ]
                    }),
                    format!("allow-app-{app}"),
                ),
                8 => (
                    json!({
                        "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["api", "web"]}]},
                        "policyTypes": ["Egress"],
                        "egress": [
                            {"to": [{"podSelector": {"matchLabels": {"tier": "db"}}}], "ports": [{"port": "db"}]},
                            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
                             "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
                            {"to": [{"podSelector": {}}]},
                        ]
                    }),
                    "egress-internal".to_owned(),
                ),
                _ => (
                    json!({
                        "podSelector": {"matchLabels": {"tier": "web"}},
                        "policyTypes": ["Egress"],
                        "egress": [
                            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}],
                             "ports": [{"port": 443}, {"port": 30000, "endPort": 32767}]},
                            {"to": [{"ipBlock": {"cidr": format!("10.{}.{}.0/24", 1 + ns / 256, ns % 256)}}]},
                        ]
                    }),
                    "egress-world".to_owned(),
                ),
            };
            let np: NetworkPolicy =
                obj(json!({"metadata": {"name": name, "namespace": namespace}, "spec": spec}));
            c.policies
                .insert(ObjectKey::new(namespace.clone(), name), np);
        }
    }
    c
}

struct Options {
    pods: usize,
    policies: usize,
}
