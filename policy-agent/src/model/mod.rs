//! The cluster state the compiler reads, keyed by namespace and name: k8s-openapi objects, except
//! pods, of which only the projection [`PodInfo`] is kept (they are by far the most numerous
//! objects, and a k8s-openapi `Pod` takes kilobytes even when nearly empty).
//!
//! Both sources (the Kubernetes API and a manifest directory) fill the same [`Cluster`], so what the
//! lab proves is what a cluster runs.

#[cfg(test)]
pub(crate) mod fixtures;
pub mod meta;
mod pod;

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    networking::v1::NetworkPolicy,
};

pub use self::pod::{PodInfo, PodPort};

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
    /// What the agent reads of each Pod ([`PodInfo::from`] a k8s-openapi `Pod`).
    pub pods: BTreeMap<ObjectKey, PodInfo>,
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

impl serde::Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
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

/// Every address of every pod that owns its addresses ([`PodInfo::owns_addresses`]) → that pod:
/// each of its `status.podIPs`, of every family, so a dual-stack pod is found by either. An
/// address two such pods claim is the first's by namespace/name, as in the compiler's IPCACHE.
pub fn pods_by_address(cluster: &Cluster) -> HashMap<std::net::IpAddr, &ObjectKey> {
    let mut out = HashMap::new();
    for (key, pod) in cluster.pods.iter().filter(|(_, p)| p.owns_addresses()) {
        for ip in pod.ips.iter() {
            out.entry(*ip).or_insert(key);
        }
    }
    out
}

/// Every Service ClusterIP of the state (`spec.clusterIPs`, then `spec.clusterIP`), parsed;
/// `None`, headless and unparsable values are skipped.
pub fn service_cluster_ips(cluster: &Cluster) -> impl Iterator<Item = std::net::IpAddr> + '_ {
    cluster
        .services
        .values()
        .filter_map(|s| s.spec.as_ref())
        .flat_map(|spec| {
            spec.cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .filter_map(|ip| ip.parse().ok())
        })
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

/// Why an address is never a node address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotNodeAddress {
    #[error("a loopback address")]
    Loopback,
    #[error("the unspecified address")]
    Unspecified,
    #[error("a multicast address")]
    Multicast,
    /// `fe80::/10`: every IPv6 interface has one, often the same on many interfaces and nodes, so
    /// it names no node. What a host sends from one to its pods is neighbour discovery and other
    /// ICMPv6, which the datapath never polices.
    #[error("an IPv6 link-local address (fe80::/10), which names no node")]
    LinkLocal,
}

/// Whether `ip` can be a node address: the source of a node's traffic to pods and a
/// destination pods reach the node at. Every unicast address of either family is, IPv4
/// link-local ones included (NodeLocal DNSCache serves pods on `169.254.20.10`), except IPv6
/// link-local addresses ([`NotNodeAddress::LinkLocal`]).
///
/// The one rule for every source of node addresses: the interfaces of the agent's namespace,
/// `--node-ip`, Node objects, the host addresses pods report and hostNetwork pods' addresses.
pub fn node_address(ip: std::net::IpAddr) -> Result<std::net::IpAddr, NotNodeAddress> {
    if ip.is_loopback() {
        Err(NotNodeAddress::Loopback)
    } else if ip.is_unspecified() {
        Err(NotNodeAddress::Unspecified)
    } else if ip.is_multicast() {
        Err(NotNodeAddress::Multicast)
    } else if matches!(ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local()) {
        Err(NotNodeAddress::LinkLocal)
    } else {
        Ok(ip)
    }
}

/// A Node's `InternalIP` and `ExternalIP` addresses (other address types are names), of every
/// family, without those that are never node addresses ([`node_address`]).
pub fn node_addresses(node: &Node) -> (Vec<std::net::IpAddr>, Vec<BadAddress>) {
    let listed = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .enumerate()
        .filter(|(_, a)| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"));
    let (mut ips, bad) = parse_addresses(listed.map(|(i, a)| {
        (
            ("status.addresses", Some(i), ".address"),
            a.address.as_str(),
        )
    }));
    ips.retain(|ip| node_address(*ip).is_ok());
    (ips, bad)
}

/// Every address that belongs to node `name`: its Node object's addresses, the host addresses its
/// pods report and the addresses of its hostNetwork pods ([`PodInfo::node_ips`]). Terminated pods
/// are ignored.
pub fn node_owned_addresses(cluster: &Cluster, name: &str) -> Vec<std::net::IpAddr> {
    owned_addresses(cluster, |n| n == name)
        .remove(name)
        .unwrap_or_default()
}

/// [`node_owned_addresses`] of every node, in one pass over the pods.
pub fn nodes_owned_addresses(cluster: &Cluster) -> BTreeMap<String, Vec<std::net::IpAddr>> {
    owned_addresses(cluster, |_| true)
}

fn owned_addresses(
    cluster: &Cluster,
    wanted: impl Fn(&str) -> bool,
) -> BTreeMap<String, Vec<std::net::IpAddr>> {
    let mut out: BTreeMap<String, Vec<std::net::IpAddr>> = cluster
        .nodes
        .iter()
        .filter(|(name, _)| wanted(name))
        .map(|(name, n)| (name.clone(), node_addresses(n).0))
        .collect();
    for pod in cluster.pods.values() {
        let Some(name) = pod.node_name.as_deref() else {
            continue;
        };
        if pod.terminated || !wanted(name) {
            continue;
        }
        if !out.contains_key(name) {
            out.insert(name.to_owned(), Vec::new());
        }
        let owned = out.get_mut(name).expect("inserted above");
        owned.extend(pod.node_ips());
    }
    for owned in out.values_mut() {
        owned.sort();
        owned.dedup();
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::fixtures::{add_pod, ip, node, pod};
    use super::*;

    #[test]
    fn node_addresses_are_unicast_of_both_families_without_ipv6_link_local() {
        for ok in ["10.0.0.1", "169.254.20.10", "fd00::1", "2001:db8::1"] {
            assert_eq!(node_address(ip(ok)), Ok(ip(ok)), "{ok}");
        }
        for (bad, why) in [
            ("127.0.0.1", NotNodeAddress::Loopback),
            ("::1", NotNodeAddress::Loopback),
            ("0.0.0.0", NotNodeAddress::Unspecified),
            ("::", NotNodeAddress::Unspecified),
            ("224.0.0.1", NotNodeAddress::Multicast),
            ("ff02::1", NotNodeAddress::Multicast),
            ("fe80::1", NotNodeAddress::LinkLocal),
            ("febf::1", NotNodeAddress::LinkLocal),
        ] {
            assert_eq!(node_address(ip(bad)), Err(why), "{bad}");
        }
        let n = node(
            "n1",
            &[
                ("Hostname", "n1"),
                ("InternalIP", "172.18.0.2"),
                ("InternalIP", "fc00:f853:ccd:e793::2"),
                ("InternalIP", "fe80::42:acff:fe12:2"),
                ("ExternalIP", "2001:db8::2"),
            ],
        );
        let (ips, bad) = node_addresses(&n);
        assert_eq!(
            ips,
            [
                ip("172.18.0.2"),
                ip("fc00:f853:ccd:e793::2"),
                ip("2001:db8::2")
            ]
        );
        assert!(bad.is_empty());
    }

    #[test]
    fn nodes_own_the_addresses_of_both_families_their_pods_report() {
        let mut c = Cluster::default();
        let mut host = pod("n1", json!({}), &["172.18.0.2", "fc00::2", "fe80::1"]);
        host.host_network = true;
        host.host_ips = [ip("172.18.0.2"), ip("fc00::2")].into();
        add_pod(&mut c, "kube-system", "proxy", host);
        let mut web = pod("n1", json!({}), &["10.244.1.5", "fd00:10:244:1::5"]);
        web.host_ips = [ip("172.18.0.2"), ip("fc00::2"), ip("fe80::2")].into();
        add_pod(&mut c, "x", "web", web);
        assert_eq!(
            node_owned_addresses(&c, "n1"),
            [ip("172.18.0.2"), ip("fc00::2")]
        );
    }

    #[test]
    fn pods_are_found_by_every_address_of_theirs() {
        let mut c = Cluster::default();
        let web = add_pod(
            &mut c,
            "x",
            "web",
            pod("n1", json!({}), &["10.244.1.5", "fd00:10:244:1::5"]),
        );
        // A later pod claiming one of its addresses does not take it; a terminated one holding
        // an address a live pod has now, and a hostNetwork pod, own none.
        add_pod(
            &mut c,
            "y",
            "late",
            pod("n1", json!({}), &["fd00:10:244:1::5"]),
        );
        let mut gone = pod("n1", json!({}), &["10.244.1.9", "fd00:10:244:1::9"]);
        gone.terminated = true;
        add_pod(&mut c, "a", "gone", gone);
        let now = add_pod(
            &mut c,
            "z",
            "now",
            pod("n1", json!({}), &["10.244.1.9", "fd00:10:244:1::9"]),
        );
        let mut host = pod("n1", json!({}), &["172.18.0.2", "fc00::2"]);
        host.host_network = true;
        add_pod(&mut c, "kube-system", "proxy", host);
        let by = pods_by_address(&c);
        assert_eq!(by.get(&ip("10.244.1.5")), Some(&&web));
        assert_eq!(by.get(&ip("fd00:10:244:1::5")), Some(&&web));
        assert_eq!(by.get(&ip("10.244.1.9")), Some(&&now));
        assert_eq!(by.get(&ip("fd00:10:244:1::9")), Some(&&now));
        assert_eq!(by.get(&ip("fc00::2")), None);
        assert_eq!(by.len(), 4);
    }
}
