//! Endpoint discovery: which host-side interface in this network namespace carries each local pod.
//!
//! Two CNI shapes are recognised, both through netlink in the agent's own network namespace:
//!
//! - **Point-to-point** (kindnet's ptp plugin, Calico): the CNI installs a host route
//!   `podIP/32 dev vethX` (or `/128`). The route's output veth is the pod's host side.
//! - **Bridge** (flannel's `cni0` on k3s, the bridge plugin): no per-pod route. The pod's network
//!   namespace is found among `/run/netns/*` (where containerd and CRI-O bind them) and, failing
//!   that, `/proc/*/ns/net`; in it, the interface holding the pod IP (`eth0`) names its veth peer
//!   (ifindex + the peer namespace's id). The peer is ours only if that namespace id is the id the
//!   pod namespace gives to *our* namespace, and our interface of that index points back.
//!
//! Results of the bridge search are cached per pod and re-validated cheaply each time.

pub mod netlink;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs::{self, File},
    io,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use tracing::debug;

use self::netlink::{Address, Link, Netlink, Route};
use crate::model::{self, ObjectKey};

/// How a pod's interface was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    PointToPoint,
    Bridge,
}

/// A pod's host-side interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInterface {
    pub ifindex: u32,
    pub name: String,
    pub shape: Shape,
}

/// Links, addresses and routes of this namespace, read once per sync.
#[derive(Clone, Debug, Default)]
pub struct HostView {
    pub links: Vec<Link>,
    pub addresses: Vec<Address>,
    pub routes: Vec<Route>,
}

impl HostView {
    pub fn read(nl: &mut Netlink) -> io::Result<Self> {
        Ok(Self {
            links: nl.links()?,
            addresses: nl.addresses()?,
            routes: nl.routes()?,
        })
    }

    pub fn link(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.index == index)
    }

    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    /// The veth carrying a host route to exactly `addr` (/32 or /128), if any.
    pub fn point_to_point(&self, addr: IpAddr) -> Option<HostInterface> {
        let full = if addr.is_ipv4() { 32 } else { 128 };
        self.routes
            .iter()
            .filter(|r| r.destination == Some((addr, full)))
            .flat_map(|r| r.oifs.iter())
            .filter_map(|oif| self.link(*oif))
            .find(|l| l.kind.as_deref() == Some("veth"))
            .map(|l| HostInterface {
                ifindex: l.index,
                name: l.name.clone(),
                shape: Shape::PointToPoint,
            })
    }

    /// This namespace's own addresses that are node addresses ([`model::node_address`]): the
    /// unicast addresses of both families (IPv4, IPv6 global and unique-local), without loopback
    /// and IPv6 link-local addresses: the sources of node-originated traffic to pods.
    /// Addresses on `kube-ipvs0` (kube-proxy's IPVS mode binds every ClusterIP there) are not
    /// node addresses either.
    pub fn node_addresses(&self) -> BTreeSet<IpAddr> {
        self.addresses
            .iter()
            .filter(|a| self.link(a.index).is_none_or(|l| l.name != "kube-ipvs0"))
            .filter_map(|a| model::node_address(a.addr).ok())
            .collect()
    }

    /// Where traffic to other nodes and off-cluster leaves: devices of the default routes and of
    /// routes through a gateway (other nodes' pod ranges on kind and in the lab), plus the
    /// [`TUNNEL_DEVICES`] present. Every family.
    pub fn uplinks(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .routes
            .iter()
            .filter(|r| r.via_gateway || r.destination.is_none_or(|(_, len)| len == 0))
            .flat_map(|r| r.oifs.iter())
            .filter_map(|i| self.link(*i))
            .map(|l| l.name.clone())
            .collect();
        out.extend(
            TUNNEL_DEVICES
                .iter()
                .filter(|t| self.link_by_name(t).is_some())
                .map(|t| t.to_string()),
        );
        out.sort();
        out.dedup();
        out
    }
}

/// Tunnel devices that are uplinks whenever they exist: flannel's VXLAN devices (IPv4, IPv6) and
/// its WireGuard backend's, whose routes to other nodes' pod ranges have no gateway.
pub const TUNNEL_DEVICES: [&str; 4] = ["flannel.1", "flannel-v6.1", "flannel-wg", "flannel-wg-v6"];

/// Finds pods' host-side interfaces.
pub struct Discovery {
    own_ns: File,
    own_ns_ino: (u64, u64),
    netns_dirs: Vec<PathBuf>,
    scan_proc: bool,
    /// Bridge-shape results: pod → (its namespace file, pod-side ifindex, host interface).
    bridge_cache: BTreeMap<ObjectKey, CachedBridge>,
}

struct CachedBridge {
    addresses: Vec<IpAddr>,
    pod_ifindex: u32,
    host: HostInterface,
}

impl Discovery {
    /// Discovery in the calling thread's network namespace, searching `/run/netns`,
    /// `/var/run/netns` and `/proc/*/ns/net` for bridge-attached pods.
    pub fn new() -> io::Result<Self> {
        Self::with_search(vec!["/run/netns".into(), "/var/run/netns".into()], true)
    }

    /// Discovery searching only the given directories of namespace files (and `/proc` when
    /// `scan_proc`).
    pub fn with_search(netns_dirs: Vec<PathBuf>, scan_proc: bool) -> io::Result<Self> {
        let own_ns = File::open("/proc/thread-self/ns/net")?;
        let m = own_ns.metadata()?;
        Ok(Self {
            own_ns,
            own_ns_ino: (m.dev(), m.ino()),
            netns_dirs,
            scan_proc,
            bridge_cache: BTreeMap::new(),
        })
    }

    /// The host interface of each pod in `pods` (pod → its addresses) that can be found. Pods
    /// missing from the result have no interface here (yet).
    pub fn find(
        &mut self,
        view: &HostView,
        pods: &BTreeMap<ObjectKey, Vec<IpAddr>>,
    ) -> BTreeMap<ObjectKey, HostInterface> {
        let mut found = BTreeMap::new();
        let mut missing: BTreeMap<IpAddr, ObjectKey> = BTreeMap::new();
        self.bridge_cache.retain(|k, _| pods.contains_key(k));
        for (pod, addresses) in pods {
            if let Some(host) = addresses.iter().find_map(|a| view.point_to_point(*a)) {
                found.insert(pod.clone(), host);
                continue;
            }
            if let Some(cached) = self.bridge_cache.get(pod)
                && cached.addresses == *addresses
                && view.link(cached.host.ifindex).is_some_and(|l| {
                    l.name == cached.host.name && l.peer_index == Some(cached.pod_ifindex)
                })
            {
                found.insert(pod.clone(), cached.host.clone());
                continue;
            }
            self.bridge_cache.remove(pod);
            for a in addresses {
                missing.insert(*a, pod.clone());
            }
        }
        if missing.is_empty() {
            return found;
        }
        for ns_path in self.candidate_namespaces() {
            if missing.is_empty() {
                break;
            }
            match self.search_namespace(&ns_path, view, &missing) {
                Ok(hits) => {
                    for (pod, pod_ifindex, host) in hits {
                        missing.retain(|_, p| *p != pod);
                        self.bridge_cache.insert(
                            pod.clone(),
                            CachedBridge {
                                addresses: pods[&pod].clone(),
                                pod_ifindex,
                                host: host.clone(),
                            },
                        );
                        found.insert(pod, host);
                    }
                }
                Err(e) => debug!(ns = %ns_path.display(), error = %e, "skipping namespace"),
            }
        }
        found
    }

    /// Namespace files to search, each namespace once, ours excluded.
    fn candidate_namespaces(&self) -> Vec<PathBuf> {
        let mut seen: HashSet<(u64, u64)> = HashSet::from([self.own_ns_ino]);
        let mut out = Vec::new();
        let mut consider = |path: PathBuf| {
            if let Ok(m) = fs::metadata(&path)
                && seen.insert((m.dev(), m.ino()))
            {
                out.push(path);
            }
        };
        for dir in &self.netns_dirs {
            for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
                consider(entry.path());
            }
        }
        if self.scan_proc {
            for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                {
                    consider(entry.path().join("ns/net"));
                }
            }
        }
        out
    }

    /// Pods of `missing` whose address is in namespace `ns_path` and whose veth peer is in ours.
    fn search_namespace(
        &self,
        ns_path: &Path,
        view: &HostView,
        missing: &BTreeMap<IpAddr, ObjectKey>,
    ) -> io::Result<Vec<(ObjectKey, u32, HostInterface)>> {
        let ns = File::open(ns_path)?;
        let mut nl = Netlink::in_namespace(&ns)?;
        let hits: Vec<(&ObjectKey, u32)> = nl
            .addresses()?
            .into_iter()
            .filter_map(|a| missing.get(&a.addr).map(|pod| (pod, a.index)))
            .collect();
        if hits.is_empty() {
            return Ok(vec![]);
        }
        let our_id = nl.nsid_of(&self.own_ns)?;
        let links = nl.links()?;
        let mut out = Vec::new();
        for (pod, pod_ifindex) in hits {
            let Some(pod_link) = links.iter().find(|l| l.index == pod_ifindex) else {
                continue;
            };
            let (Some(peer), Some(peer_ns)) = (pod_link.peer_index, pod_link.link_netnsid) else {
                continue;
            };
            if our_id != Some(peer_ns) {
                continue; // its peer lives in another namespace (another node, in the lab)
            }
            let Some(host) = view.link(peer) else {
                continue;
            };
            if host.peer_index != Some(pod_ifindex) {
                continue;
            }
            out.push((
                pod.clone(),
                pod_ifindex,
                HostInterface {
                    ifindex: host.index,
                    name: host.name.clone(),
                    shape: Shape::Bridge,
                },
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: &str) -> Link {
        Link {
            index,
            name: name.into(),
            kind: Some(kind.into()),
            peer_index: None,
            link_netnsid: None,
            controller: None,
        }
    }

    fn view() -> HostView {
        HostView {
            links: vec![
                link(1, "lo", "loopback"),
                link(2, "eth0", "veth"),
                link(5, "vethA", "veth"),
                link(6, "cni0", "bridge"),
                link(7, "flannel.1", "vxlan"),
                link(8, "underlay", "veth"),
                link(9, "flannel-wg", "wireguard"),
                link(10, "nodelocaldns", "dummy"),
                link(11, "kube-ipvs0", "dummy"),
            ],
            addresses: vec![
                Address {
                    index: 1,
                    addr: "127.0.0.1".parse().unwrap(),
                    prefix_len: 8,
                },
                Address {
                    index: 2,
                    addr: "172.18.0.2".parse().unwrap(),
                    prefix_len: 16,
                },
                Address {
                    index: 2,
                    addr: "fe80::1".parse().unwrap(),
                    prefix_len: 64,
                },
                Address {
                    index: 2,
                    addr: "fc00::2".parse().unwrap(),
                    prefix_len: 64,
                },
                Address {
                    index: 2,
                    addr: "2001:db8::2".parse().unwrap(),
                    prefix_len: 64,
                },
                Address {
                    index: 6,
                    addr: "fe80::1".parse().unwrap(),
                    prefix_len: 64,
                },
                Address {
                    index: 1,
                    addr: "::1".parse().unwrap(),
                    prefix_len: 128,
                },
                Address {
                    index: 10,
                    addr: "169.254.20.10".parse().unwrap(),
                    prefix_len: 32,
                },
                Address {
                    index: 11,
                    addr: "10.96.0.10".parse().unwrap(),
                    prefix_len: 32,
                },
            ],
            routes: vec![
                Route {
                    destination: None,
                    oifs: vec![2],
                    via_gateway: true,
                },
                Route {
                    destination: Some(("10.244.7.0".parse().unwrap(), 24)),
                    oifs: vec![8],
                    via_gateway: true,
                },
                Route {
                    destination: Some(("10.244.1.5".parse().unwrap(), 32)),
                    oifs: vec![5],
                    via_gateway: false,
                },
                Route {
                    destination: Some(("10.244.1.0".parse().unwrap(), 24)),
                    oifs: vec![6],
                    via_gateway: false,
                },
            ],
        }
    }

    #[test]
    fn ptp_route_names_the_veth() {
        let v = view();
        let host = v.point_to_point("10.244.1.5".parse().unwrap()).unwrap();
        assert_eq!((host.ifindex, host.name.as_str()), (5, "vethA"));
        // A subnet route through a bridge is not a point-to-point endpoint.
        assert!(v.point_to_point("10.244.1.0".parse().unwrap()).is_none());
        assert!(v.point_to_point("10.244.1.6".parse().unwrap()).is_none());
    }

    #[test]
    fn node_addresses_are_both_families_without_loopback_and_ipv6_link_local() {
        let got: Vec<String> = view()
            .node_addresses()
            .iter()
            .map(|a| a.to_string())
            .collect();
        // IPv4 link-local (NodeLocal DNSCache) counts; fe80::/10 on any link, loopback and
        // kube-ipvs0's ClusterIPs do not.
        assert_eq!(
            got,
            ["169.254.20.10", "172.18.0.2", "2001:db8::2", "fc00::2"]
        );
    }

    #[test]
    fn uplinks_are_default_route_devices_and_flannel() {
        // flannel-wg's routes carry no gateway: it is an uplink by name, as flannel.1 is.
        assert_eq!(
            view().uplinks(),
            ["eth0", "flannel-wg", "flannel.1", "underlay"]
        );
    }
}
