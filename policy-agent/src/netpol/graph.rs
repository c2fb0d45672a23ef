//! `graph`: who can talk to whom, as Graphviz DOT — namespaces as clusters, one node per class of
//! equivalent pods (a workload's replicas share one), allowed flows as edges labelled with their
//! ports, isolated pods marked; off-cluster addresses the ipBlocks name, and one address outside
//! every ipBlock (`world`), as nodes outside the clusters.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use policy_common::Direction;

use super::flows::{self, Classes, Target};
use crate::evaluator::{self, Evaluator, Flow, Protocol};
use crate::model::{Cluster, ObjectKey};

/// An address in no ipBlock of the examples or of typical clusters (TEST-NET-1), standing for
/// "anywhere else".
pub const WORLD: &str = "192.0.2.1";

/// A node of the graph.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GraphNode {
    pub id: String,
    pub label: String,
    /// Namespace cluster (`None`: off-cluster).
    pub namespace: Option<String>,
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
}

/// An edge: allowed ports from one node to another; `open` when neither side is isolated.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GraphEdge {
    pub from: String,
    pub to: String,
    pub ports: Vec<(u16, Protocol)>,
    pub open: bool,
}

/// JSON of `graph -o json`: `{"nodes": [{"id", "label", "namespace", "isolated_ingress",
/// "isolated_egress"}], "edges": [{"from", "to", "ports": [[8080, "TCP"]], "open"}]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Graph {
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
}

fn isolated(ev: &Evaluator<'_>, key: &ObjectKey, d: Direction) -> bool {
    let me = evaluator::Peer::PodWithoutAddress(key.clone());
    let other = evaluator::Peer::Address(WORLD.parse().unwrap());
    let (src, dst) = match d {
        Direction::Egress => (me, other),
        Direction::Ingress => (other, me),
    };
    let v = ev.evaluate(&Flow {
        src,
        dst,
        protocol: Protocol::Tcp,
        port: 1,
    });
    match d {
        Direction::Egress => !v.egress.isolating.is_empty(),
        Direction::Ingress => !v.ingress.isolating.is_empty(),
    }
}

/// Ports of an edge being built, and whether it is open.
type EdgeAcc = (BTreeSet<(u16, Protocol)>, bool);

/// The graph of the state, limited to pods of `namespace` and their peers when given.
pub fn build(cluster: &Cluster, namespace: Option<&str>) -> Graph {
    let ev = Evaluator::new(cluster);
    let blocks = flows::ip_blocks(cluster);
    let classes = Classes::new(cluster, cluster.pods.keys(), &blocks);
    let mut g = Graph::default();
    let id = |i: usize| format!("c{i}");
    for (i, members) in classes.members.iter().enumerate() {
        let rep = members[0];
        let label = if members.len() == 1 {
            rep.name.clone()
        } else {
            let labels: Vec<String> = cluster.pods[rep]
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("{} ({} pods)", labels.join(","), members.len())
        };
        g.nodes.push(GraphNode {
            id: id(i),
            label,
            namespace: Some(rep.namespace.clone()),
            isolated_ingress: isolated(&ev, rep, Direction::Ingress),
            isolated_egress: isolated(&ev, rep, Direction::Egress),
        });
    }
    let mut addresses: Vec<IpAddr> = super::whatif::block_addresses(&[cluster]);
    addresses.push(WORLD.parse().unwrap());
    for ip in &addresses {
        g.nodes.push(GraphNode {
            id: format!("a{ip}"),
            label: if ip.to_string() == WORLD {
                "world".into()
            } else {
                ip.to_string()
            },
            namespace: None,
            isolated_ingress: false,
            isolated_egress: false,
        });
    }
    let in_scope = |i: usize| namespace.is_none_or(|n| classes.members[i][0].namespace == n);
    let verdicts = flows::class_verdicts(&ev, &classes, |s, d| in_scope(s) || in_scope(d));
    let mut edges: BTreeMap<(String, String), EdgeAcc> = BTreeMap::new();
    for ((s, d, port, protocol), allowed) in verdicts {
        if allowed {
            let open = !g.nodes[s].isolated_egress && !g.nodes[d].isolated_ingress;
            let e = edges
                .entry((id(s), id(d)))
                .or_insert((BTreeSet::new(), open));
            e.0.insert((port, protocol));
        }
    }
    let mut address_ports = super::whatif::egress_ports(&[cluster]);
    if address_ports.is_empty() {
        address_ports.push((80, Protocol::Tcp));
    }
    for (i, members) in classes.members.iter().enumerate() {
        if !in_scope(i) {
            continue;
        }
        let pod = Target::Pod(members[0].clone());
        for ip in &addresses {
            let addr = Target::Address(*ip);
            let aid = format!("a{ip}");
            for &(port, protocol) in &address_ports {
                if let Ok(v) = flows::verdict(&ev, &pod, &addr, port, protocol)
                    && v.allowed
                {
                    let open = !g.nodes[i].isolated_egress;
                    edges
                        .entry((id(i), aid.clone()))
                        .or_insert((BTreeSet::new(), open))
                        .0
                        .insert((port, protocol));
                }
            }
            for (port, protocol) in flows::declared_ports(&cluster.pods[members[0]]) {
                if let Ok(v) = flows::verdict(&ev, &addr, &pod, port, protocol)
                    && v.allowed
                {
                    let open = !g.nodes[i].isolated_ingress;
                    edges
                        .entry((aid.clone(), id(i)))
                        .or_insert((BTreeSet::new(), open))
                        .0
                        .insert((port, protocol));
                }
            }
        }
    }
    g.edges = edges
        .into_iter()
        .map(|((from, to), (ports, open))| GraphEdge {
            from,
            to,
            ports: ports.into_iter().collect(),
            open,
        })
        .collect();
    if let Some(n) = namespace {
        let used: BTreeSet<&str> = g
            .edges
            .iter()
            .flat_map(|e| [e.from.as_str(), e.to.as_str()])
            .collect();
        let keep: Vec<bool> = g
            .nodes
            .iter()
            .map(|x| x.namespace.as_deref() == Some(n) || used.contains(x.id.as_str()))
            .collect();
        let mut k = keep.iter();
        g.nodes.retain(|_| *k.next().unwrap());
    }
    g
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The graph as DOT.
pub fn dot(g: &Graph) -> String {
    let mut out = String::from(
        "digraph netpol {\n  rankdir=LR;\n  graph [fontname=\"DejaVu Sans\"];\n  node [shape=box, style=\"rounded,filled\", fillcolor=white, fontname=\"DejaVu Sans\"];\n  edge [fontname=\"DejaVu Sans\", fontsize=10];\n",
    );
    let mut by_ns: BTreeMap<Option<&str>, Vec<&GraphNode>> = BTreeMap::new();
    for n in &g.nodes {
        by_ns.entry(n.namespace.as_deref()).or_default().push(n);
    }
    for (i, (ns, nodes)) in by_ns.iter().enumerate() {
        let indent = if ns.is_some() { "    " } else { "  " };
        if let Some(ns) = ns {
            out.push_str(&format!(
                "  subgraph cluster_{i} {{\n    label={};\n    style=dashed;\n",
                quote(&format!("namespace {ns}"))
            ));
        }
        for n in nodes {
            let iso: Vec<&str> = [
                (n.isolated_ingress, "ingress"),
                (n.isolated_egress, "egress"),
            ]
            .iter()
            .filter(|(b, _)| *b)
            .map(|(_, s)| *s)
            .collect();
            let (label, attrs) = if n.namespace.is_none() {
                (n.label.clone(), ", shape=ellipse, fillcolor=\"#eeeeee\"")
            } else if iso.is_empty() {
                (n.label.clone(), "")
            } else {
                (
                    format!("{}\\nisolated: {}", n.label, iso.join(", ")),
                    ", fillcolor=\"#fde2e2\", color=\"#b00020\", penwidth=2",
                )
            };
            out.push_str(&format!(
                "{indent}{} [label={}{attrs}];\n",
                quote(&n.id),
                quote(&label).replace("\\\\n", "\\n")
            ));
        }
        if ns.is_some() {
            out.push_str("  }\n");
        }
    }
    for e in &g.edges {
        let ports: Vec<String> = e.ports.iter().map(|(p, pr)| format!("{pr}/{p}")).collect();
        let style = if e.open {
            ", style=dashed, color=\"#999999\""
        } else {
            ", color=\"#1b5e20\""
        };
        out.push_str(&format!(
            "  {} -> {} [label={}{style}];\n",
            quote(&e.from),
            quote(&e.to),
            quote(&ports.join(", "))
        ));
    }
    out.push_str("}\n");
    out
}
