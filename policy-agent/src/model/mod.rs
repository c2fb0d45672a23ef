//! The cluster state the compiler reads: plain k8s-openapi objects keyed by namespace and name.
//!
//! Both sources (the Kubernetes API and a manifest directory) fill the same [`Cluster`], so what the
//! lab proves is what a cluster runs.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    networking::v1::NetworkPolicy,
};

/// Namespace and name of a namespaced object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Every object the agent watches.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// By name.
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub policies: BTreeMap<ObjectKey, NetworkPolicy>,
    pub services: BTreeMap<ObjectKey, Service>,
    /// By name.
    pub nodes: BTreeMap<String, Node>,
}

/// The label the API server puts on every namespace, with the namespace's name as value. The only
/// way to select a namespace by name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Labels of one object.
pub type Labels = BTreeMap<String, String>;

/// L4 protocols NetworkPolicy defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// Parses a Kubernetes protocol name (`TCP`, `UDP`, `SCTP`; case-sensitive as the API is).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// A Kubernetes `protocol` field: absent means TCP (API defaulting).
    pub fn parse_defaulted(s: Option<&str>) -> Option<Protocol> {
        s.map_or(Some(Protocol::Tcp), Protocol::parse)
    }

    /// IP protocol number (`policy_common::proto`).
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => policy_common::proto::TCP,
            Protocol::Udp => policy_common::proto::UDP,
            Protocol::Sctp => policy_common::proto::SCTP,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named container port: what a NetworkPolicy port name resolves to on one pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// An address field of an object that does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadAddress {
    /// Field path, e.g. `status.podIPs[1].ip`.
    pub field: String,
    pub value: String,
}

/// Labels of namespace `ns` as selectors see them: the object's labels plus
/// [`NAMESPACE_NAME_LABEL`]` = ns`, which the API server guarantees (and which wins over any other
/// value). A namespace without an object (pods or policies referencing it before it is seen) has
/// that label only.
pub fn namespace_labels(cluster: &Cluster, ns: &str) -> Labels {
    let mut labels = cluster
        .namespaces
        .get(ns)
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), ns.to_owned());
    labels
}

/// Labels of a pod (empty when it has none).
pub fn pod_labels(pod: &Pod) -> &Labels {
    static EMPTY: Labels = BTreeMap::new();
    pod.metadata.labels.as_ref().unwrap_or(&EMPTY)
}

/// The node a pod is scheduled on.
pub fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// hostNetwork pods share their node's addresses: they are node traffic, never policy subjects or
/// pod peers (the common choice the NetworkPolicy documentation allows).
pub fn is_host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// A pod in phase `Succeeded` or `Failed` has no running containers and its address may already
/// belong to another pod: it is neither an endpoint nor a peer.
pub fn is_terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Where an address came from: `(list field, index, member)` for list entries
/// (`status.podIPs[1].ip`), `(field, None, "")` for scalars. Formatted only on error.
type AddressField = (&'static str, Option<usize>, &'static str);

fn parse_addresses<'a>(
    fields: impl Iterator<Item = (AddressField, &'a str)>,
) -> (Vec<std::net::IpAddr>, Vec<BadAddress>) {
    let mut ips = Vec::new();
    let mut bad = Vec::new();
    for ((field, index, member), value) in fields {
        if value.is_empty() {
            // Not assigned yet.
            continue;
        }
        match value.parse::<std::net::IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => bad.push(BadAddress {
                field: match index {
                    Some(i) => format!("{field}[{i}]{member}"),
                    None => field.to_owned(),
                },
                value: value.to_owned(),
            }),
        }
    }
    (ips, bad)
}

/// A pod's addresses from `status.podIPs` and `status.podIP` (the kubelet keeps the latter equal to
/// the first of the former), deduplicated, with the entries that do not parse. Empty strings mean
/// "not assigned yet" and are skipped.
pub fn pod_ips(pod: &Pod) -> (Vec<std::net::IpAddr>, Vec<BadAddress>) {
    let Some(status) = pod.status.as_ref() else {
        return (Vec::new(), Vec::new());
    };
    let listed = status.pod_ips.iter().flatten().enumerate();
    let fields = listed
        .map(|(i, p)| (("status.podIPs", Some(i), ".ip"), p.ip.as_str()))
        .chain(
            status
                .pod_ip
                .iter()
                .map(|s| (("status.podIP", None, ""), s.as_str())),
        );
    parse_addresses(fields)
}

/// The addresses of the node a pod runs on, as the pod reports them (`status.hostIPs`,
/// `status.hostIP`).
pub fn pod_host_ips(pod: &Pod) -> (Vec<std::net::IpAddr>, Vec<BadAddress>) {
    let Some(status) = pod.status.as_ref() else {
        return (Vec::new(), Vec::new());
    };
    let listed = status.host_ips.iter().flatten().enumerate();
    let fields = listed
        .map(|(i, p)| (("status.hostIPs", Some(i), ".ip"), p.ip.as_str()))
        .chain(
            status
                .host_ip
                .iter()
                .map(|s| (("status.hostIP", None, ""), s.as_str())),
        );
    parse_addresses(fields)
}

/// A Node's `InternalIP` and `ExternalIP` addresses (other address types are names).
pub fn node_addresses(node: &Node) -> (Vec<std::net::IpAddr>, Vec<BadAddress>) {
    let listed = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .enumerate()
        .filter(|(_, a)| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"));
    parse_addresses(listed.map(|(i, a)| {
        (
            ("status.addresses", Some(i), ".address"),
            a.address.as_str(),
        )
    }))
}

/// Every address that belongs to node `name`: its Node object's addresses, the host addresses its
/// pods report and the addresses of its hostNetwork pods. Terminated pods are ignored.
pub fn node_owned_addresses(cluster: &Cluster, name: &str) -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = cluster
        .nodes
        .get(name)
        .map(|n| node_addresses(n).0)
        .unwrap_or_default();
    for pod in cluster.pods.values() {
        if pod_node(pod) != Some(name) || is_terminated(pod) {
            continue;
        }
        out.extend(pod_host_ips(pod).0);
        if is_host_network(pod) {
            out.extend(pod_ips(pod).0);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The named ports of a pod's containers (`spec.containers[].ports[]` with a name; protocol
/// defaulting to TCP), in declaration order, possibly repeated. Entries with an unknown protocol or
/// a number outside 1..=65535 cannot exist in a valid Pod and are skipped.
pub fn pod_named_port_fields(pod: &Pod) -> impl Iterator<Item = (&str, Protocol, u16)> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.as_deref().filter(|n| !n.is_empty())?;
            let protocol = Protocol::parse_defaulted(p.protocol.as_deref())?;
            let port = u16::try_from(p.container_port).ok().filter(|p| *p != 0)?;
            Some((name, protocol, port))
        })
}

/// [`pod_named_port_fields`], sorted and deduplicated.
pub fn pod_named_ports(pod: &Pod) -> Vec<NamedPort> {
    let mut out: Vec<NamedPort> = pod_named_port_fields(pod)
        .map(|(name, protocol, port)| NamedPort {
            name: name.to_owned(),
            protocol,
            port,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether a pod's named ports are exactly `ports` (as [`pod_named_ports`] would return them),
/// without allocating.
pub fn pod_named_ports_equal(pod: &Pod, ports: &[NamedPort]) -> bool {
    let same = |(name, protocol, port): (&str, Protocol, u16), p: &NamedPort| {
        p.name == name && p.protocol == protocol && p.port == port
    };
    pod_named_port_fields(pod).all(|f| ports.iter().any(|p| same(f, p)))
        && ports
            .iter()
            .all(|p| pod_named_port_fields(pod).any(|f| same(f, p)))
}
