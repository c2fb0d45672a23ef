//! [`PodInfo`]: the part of a Pod the agent reads.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, PodStatus};

use super::{BadAddress, Labels, NamedPort, Protocol, parse_addresses};

/// What the compiler, the reference evaluator and the agent read of a Pod, projected once when the
/// object is stored in [`Cluster::pods`](super::Cluster::pods). A k8s-openapi `Pod` takes several
/// kilobytes even when nearly empty (its spec, container and status structs are large inline);
/// this takes a few hundred bytes besides its labels.
///
/// Every field is a plain reading of the object; what it means for policy is decided by its
/// readers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.labels` (empty when absent).
    pub labels: Labels,
    /// `spec.nodeName`: the node the pod is scheduled on.
    pub node_name: Option<Box<str>>,
    /// `spec.hostNetwork` (absent: false). hostNetwork pods share their node's addresses: they are
    /// node traffic, never policy subjects or pod peers (the common choice the NetworkPolicy
    /// documentation allows).
    pub host_network: bool,
    /// `status.phase` is `Succeeded` or `Failed`. Such a pod has no running containers and its
    /// address may already belong to another pod: it is neither an endpoint nor a peer.
    pub terminated: bool,
    /// `status.podIPs[].ip` then `status.podIP` (the kubelet keeps the latter equal to the first of
    /// the former), parsed, deduplicated, in that order. Empty strings mean "not assigned yet" and
    /// are skipped; values that do not parse are in [`Self::bad_addresses`].
    pub ips: Box<[IpAddr]>,
    /// The addresses of the node the pod runs on, as the pod reports them: `status.hostIPs[].ip`
    /// then `status.hostIP`, read like [`Self::ips`].
    pub host_ips: Box<[IpAddr]>,
    /// The entries of the address fields above that do not parse, with their field paths (e.g.
    /// `status.podIPs[1].ip`): those of the host addresses first, then those of the pod's own.
    pub bad_addresses: Box<[BadAddress]>,
    /// `spec.containers[].ports[]` entries, named or not, in declaration order, possibly
    /// repeated (init and ephemeral containers are not read). Entries whose `protocol` is not one
    /// NetworkPolicy knows or whose `containerPort` does not fit in 16 bits are left out: they can
    /// match no flow. See [`Self::named_port_fields`] for the ones that count as named ports.
    pub ports: Box<[PodPort]>,
}

/// A named container port exactly as the Pod declares it (see [`PodInfo::ports`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPort {
    /// `name` (possibly empty: not a named port).
    pub name: Box<str>,
    /// `protocol`, absent meaning TCP (API defaulting).
    pub protocol: Protocol,
    /// `containerPort` (possibly 0: not a named port).
    pub port: u16,
}

impl From<&Pod> for PodInfo {
    fn from(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let (host_ips, mut bad_addresses) = status.map(host_ips).unwrap_or_default();
        let (ips, bad) = status.map(pod_ips).unwrap_or_default();
        bad_addresses.extend(bad);
        let ports = spec
            .into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(PodPort {
                    name: p.name.as_deref().unwrap_or_default().into(),
                    protocol: Protocol::parse_defaulted(p.protocol.as_deref())?,
                    port: u16::try_from(p.container_port).ok()?,
                })
            });
        PodInfo {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            node_name: spec.and_then(|s| s.node_name.as_deref()).map(Box::from),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminated: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            ips: ips.into(),
            host_ips: host_ips.into(),
            bad_addresses: bad_addresses.into(),
            ports: ports.collect(),
        }
    }
}

impl From<Pod> for PodInfo {
    /// Like `From<&Pod>`, moving the labels instead of copying them.
    fn from(mut pod: Pod) -> Self {
        let labels = pod.metadata.labels.take().unwrap_or_default();
        PodInfo {
            labels,
            ..PodInfo::from(&pod)
        }
    }
}

impl PodInfo {
    /// Whether [`Self::ips`] are the pod's own: it is live (not terminated) and on the pod network
    /// (not hostNetwork). Only such pods are peers; a hostNetwork pod's addresses are its node's,
    /// a terminated pod's may already be another pod's.
    pub fn owns_addresses(&self) -> bool {
        !self.host_network && !self.terminated
    }

    /// The addresses of its node the pod reports: [`Self::host_ips`] and, for a hostNetwork pod,
    /// its own [`Self::ips`] (which are its node's), less those that are never node addresses
    /// ([`super::node_address`]).
    pub fn node_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let own: &[IpAddr] = if self.host_network { &self.ips } else { &[] };
        self.host_ips
            .iter()
            .chain(own)
            .copied()
            .filter(|ip| super::node_address(*ip).is_ok())
    }

    /// The named ports of the pod's containers: the [`Self::ports`] with a non-empty name and a
    /// number in 1..=65535 (a valid Pod has no others), in declaration order, possibly repeated.
    pub fn named_port_fields(&self) -> impl Iterator<Item = (&str, Protocol, u16)> {
        self.ports
            .iter()
            .filter(|p| !p.name.is_empty() && p.port != 0)
            .map(|p| (&*p.name, p.protocol, p.port))
    }

    /// [`Self::named_port_fields`], sorted and deduplicated.
    pub fn named_ports(&self) -> Vec<NamedPort> {
        let mut out: Vec<NamedPort> = self
            .named_port_fields()
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

    /// Whether the pod's named ports are exactly `ports` (as [`Self::named_ports`] would return
    /// them), without allocating.
    pub fn named_ports_equal(&self, ports: &[NamedPort]) -> bool {
        let same = |(name, protocol, port): (&str, Protocol, u16), p: &NamedPort| {
            p.name == name && p.protocol == protocol && p.port == port
        };
        self.named_port_fields()
            .all(|f| ports.iter().any(|p| same(f, p)))
            && ports
                .iter()
                .all(|p| self.named_port_fields().any(|f| same(f, p)))
    }
}

/// `status.podIPs` and `status.podIP`, with the entries that do not parse.
fn pod_ips(status: &PodStatus) -> (Vec<IpAddr>, Vec<BadAddress>) {
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

/// `status.hostIPs` and `status.hostIP`, with the entries that do not parse.
fn host_ips(status: &PodStatus) -> (Vec<IpAddr>, Vec<BadAddress>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn projects_the_fields_read() {
        let p = pod(json!({
            "metadata": {"name": "a", "namespace": "x", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "hostNetwork": false,
                "initContainers": [{"name": "init", "ports": [{"name": "init", "containerPort": 1}]}],
                "containers": [
                    {"name": "c0", "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"containerPort": 9000},
                        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                        {"name": "odd", "containerPort": 53, "protocol": "ICMP"},
                        {"name": "big", "containerPort": 70000},
                    ]},
                    {"name": "c1", "ports": [{"name": "http", "containerPort": 8080}]},
                ]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}, {"ip": "bogus"}],
                "hostIP": "192.0.2.1", "hostIPs": [{"ip": ""}, {"ip": "192.0.2.x"}]},
        }));
        let info = PodInfo::from(&p);
        assert_eq!(info, PodInfo::from(p));
        assert_eq!(info.labels, [("app".into(), "web".into())].into());
        assert_eq!(info.node_name.as_deref(), Some("n1"));
        assert!(!info.host_network && !info.terminated);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(&*info.ips, [ip("10.0.0.1"), ip("fd00::1")]);
        assert_eq!(&*info.host_ips, [ip("192.0.2.1")]);
        let bad: Vec<(&str, &str)> = info
            .bad_addresses
            .iter()
            .map(|b| (b.field.as_str(), b.value.as_str()))
            .collect();
        assert_eq!(
            bad,
            [
                ("status.hostIPs[1].ip", "192.0.2.x"),
                ("status.podIPs[2].ip", "bogus")
            ]
        );
        let ports: Vec<_> = info.named_port_fields().collect();
        assert_eq!(
            ports,
            [
                ("http", Protocol::Tcp, 8080),
                ("dns", Protocol::Udp, 53),
                ("http", Protocol::Tcp, 8080)
            ]
        );
        assert_eq!(info.named_ports().len(), 2);
        assert!(info.named_ports_equal(&info.named_ports()));
    }

    #[test]
    fn empty_and_finished_pods() {
        assert_eq!(PodInfo::from(&Pod::default()), PodInfo::default());
        for (phase, terminated) in [("Succeeded", true), ("Failed", true), ("Pending", false)] {
            let p = pod(
                json!({"status": {"phase": phase}, "spec": {"hostNetwork": true, "containers": []}}),
            );
            let info = PodInfo::from(p);
            assert_eq!(info.terminated, terminated);
            assert!(info.host_network);
        }
    }
}
