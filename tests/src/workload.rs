//! A synthetic policy set, rendered two ways so both enforcers get the same policies: as
//! NetworkPolicy manifests for policy-agent, and as the nftables ruleset an nftables enforcer would
//! build (per-pod chains, one named set of peer addresses per rule, conntrack for replies).

use std::{fmt::Write as _, net::Ipv4Addr};

use serde_json::{Value, json};

/// Who a rule's peer is.
#[derive(Clone, Debug)]
pub enum Peer {
    /// Pods of the namespace with this label (`podSelector`).
    PodLabel(&'static str, String),
    /// An ipBlock /24.
    Cidr(Ipv4Addr, u8),
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub ingress: bool,
    /// Label (key, value) selecting the policy's subject pods.
    pub subject: (&'static str, &'static str),
    pub peer: Peer,
    /// Inclusive TCP port range.
    pub ports: (u16, u16),
}

/// A pod of the benchmark cluster: name, labels, address, node.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    pub ip: Ipv4Addr,
    pub node: u8,
}

pub const NAMESPACE: &str = "bench";

/// The benchmark pods: a client and a server on node 1, a server on node 2.
pub const PODS: &[PodSpec] = &[
    PodSpec {
        name: "a",
        labels: &[("app", "client")],
        ip: Ipv4Addr::new(10, 244, 1, 10),
        node: 1,
    },
    PodSpec {
        name: "b",
        labels: &[("app", "server")],
        ip: Ipv4Addr::new(10, 244, 1, 11),
        node: 1,
    },
    PodSpec {
        name: "c",
        labels: &[("app", "server")],
        ip: Ipv4Addr::new(10, 244, 2, 10),
        node: 2,
    },
];

/// `n` policies, one rule each, half ingress for `app=server`, half egress for `app=client`. The
/// two that let the client reach the servers on `allowed_ports` sit in the middle of the list (an
/// nftables chain evaluates rules in order; an LPM lookup does not care).
pub fn policies(n: usize, allowed_ports: (u16, u16)) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            let ingress = i % 2 == 0;
            let subject = if ingress {
                ("app", "server")
            } else {
                ("app", "client")
            };
            if i == n / 2 || i == n / 2 + 1 {
                let peer_app = if ingress { "client" } else { "server" };
                return Rule {
                    ingress,
                    subject,
                    peer: Peer::PodLabel("app", peer_app.into()),
                    ports: allowed_ports,
                };
            }
            let peer = if i % 3 == 0 {
                Peer::Cidr(
                    Ipv4Addr::new(10, 100 + (i / 256) as u8, (i % 256) as u8, 0),
                    24,
                )
            } else {
                Peer::PodLabel("role", format!("r-{i}"))
            };
            let base = 10_000 + (i as u16 % 40_000);
            let ports = if i % 5 == 0 {
                (base, base + 15)
            } else {
                (base, base)
            };
            Rule {
                ingress,
                subject,
                peer,
                ports,
            }
        })
        .collect()
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect(),
    )
}

/// Multi-document YAML: the namespace, the pods (with the status a kubelet writes) and the
/// policies.
pub fn manifests(pods: &[PodSpec], rules: &[Rule], host_ip: impl Fn(u8) -> Ipv4Addr) -> String {
    yaml_stream(&manifest_documents(pods, rules, host_ip))
}

/// The objects of [`manifests`], one JSON value each: the namespace, the pods, then policy `p-<i>`
/// for rule `i`.
pub fn manifest_documents(
    pods: &[PodSpec],
    rules: &[Rule],
    host_ip: impl Fn(u8) -> Ipv4Addr,
) -> Vec<serde_json::Value> {
    let mut docs = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"kubernetes.io/metadata.name": NAMESPACE}}
    })];
    for p in pods {
        docs.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": NAMESPACE, "labels": labels_json(p.labels)},
            "spec": {"nodeName": format!("node-{}", p.node), "containers": [{"name": "main", "image": "bench"}]},
            "status": {"phase": "Running", "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}],
                       "hostIP": host_ip(p.node).to_string()}
        }));
    }
    for (i, r) in rules.iter().enumerate() {
        let peer = match &r.peer {
            Peer::PodLabel(k, v) => json!({"podSelector": {"matchLabels": {*k: v}}}),
            Peer::Cidr(net, len) => json!({"ipBlock": {"cidr": format!("{net}/{len}")}}),
        };
        let mut port = json!({"protocol": "TCP", "port": r.ports.0});
        if r.ports.1 != r.ports.0 {
            port["endPort"] = json!(r.ports.1);
        }
        let (kind, peers_key) = if r.ingress {
            ("Ingress", "from")
        } else {
            ("Egress", "to")
        };
        docs.push(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("p-{i}"), "namespace": NAMESPACE},
            "spec": {
                "podSelector": {"matchLabels": {r.subject.0: r.subject.1}},
                "policyTypes": [kind],
                kind.to_lowercase(): [{peers_key: [peer], "ports": [port]}]
            }
        }));
    }
    docs
}

/// A multi-document YAML stream of `docs`.
pub fn yaml_stream(docs: &[serde_json::Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).expect("JSON values serialise to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn selects(pod: &PodSpec, (k, v): (&str, &str)) -> bool {
    pod.labels.iter().any(|(pk, pv)| *pk == k && *pv == v)
}

/// The nftables ruleset for one node: a forward-hook chain that accepts established traffic and
/// jumps to a chain per isolated local pod and direction; each rule matches a named set of peer
/// addresses (selectors resolved to pod IPs) and a port range; isolated chains end in drop.
pub fn nft_ruleset(
    table: &str,
    node: u8,
    pods: &[PodSpec],
    rules: &[Rule],
    host_if: impl Fn(&str) -> String,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "table inet {table} {{");
    let mut chains = String::new();
    let mut dispatch = String::new();
    for pod in pods.iter().filter(|p| p.node == node) {
        for ingress in [true, false] {
            let mine: Vec<(usize, &Rule)> = rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.ingress == ingress && selects(pod, r.subject))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let dir = if ingress { "in" } else { "out" };
            let chain = format!("{dir}_{}", pod.name);
            // Pod ingress leaves the node through the pod's veth; pod egress enters through it.
            let hook = if ingress { "oifname" } else { "iifname" };
            let _ = writeln!(
                dispatch,
                "    {hook} \"{}\" jump {chain}",
                host_if(pod.name)
            );
            let _ = writeln!(chains, "  chain {chain} {{");
            for (i, r) in mine {
                let set = format!("s{i}_{}", pod.name);
                let elems: Vec<String> = match &r.peer {
                    Peer::Cidr(net, len) => vec![format!("{net}/{len}")],
                    Peer::PodLabel(k, v) => pods
                        .iter()
                        .filter(|p| selects(p, (k, v)))
                        .map(|p| p.ip.to_string())
                        .collect(),
                };
                let _ = write!(out, "  set {set} {{ type ipv4_addr; flags interval; ");
                if !elems.is_empty() {
                    let _ = write!(out, "elements = {{ {} }} ", elems.join(", "));
                }
                let _ = writeln!(out, "}}");
                let addr = if ingress { "saddr" } else { "daddr" };
                let ports = if r.ports.0 == r.ports.1 {
                    r.ports.0.to_string()
                } else {
                    format!("{}-{}", r.ports.0, r.ports.1)
                };
                let _ = writeln!(chains, "    ip {addr} @{set} tcp dport {ports} accept");
            }
            let _ = writeln!(chains, "    drop\n  }}");
        }
    }
    out.push_str(&chains);
    let _ = writeln!(
        out,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    ct state established,related accept\n{dispatch}  }}\n}}"
    );
    out
}

/// The two-node benchmark cluster with [`PODS`] attached.
pub fn cluster(tag: &str) -> anyhow::Result<crate::cluster::Cluster> {
    let mut cluster = crate::cluster::Cluster::two_nodes(tag)?;
    for p in PODS {
        cluster.add_pod(p.name, p.node, p.ip.octets()[3])?;
    }
    Ok(cluster)
}
