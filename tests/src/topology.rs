//! A Kubernetes-shaped node made of network namespaces, wired the way kindnet's ptp plugin does
//! it: each pod has its /32 on `eth0` of a veth whose host side sits in the node namespace with
//! a `podIP/32` route; the pod's default route goes through a link-local gateway address held by
//! every host-side veth (as the ptp plugin gives the host side the gateway address). Nodes are joined by an underlay veth ("uplink"), Services are nftables DNAT
//! rules in the node namespace, as kube-proxy programs them.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::netns::NetNs;

/// The gateway address pods route through (on every host-side veth).
const POD_GATEWAY: &str = "169.254.1.1";

/// One node namespace.
pub struct Node {
    pub ns: NetNs,
    /// The node's own address (on its loopback), the source of node-originated traffic.
    pub ip: Ipv4Addr,
    pods: u32,
}

/// One pod namespace attached to a node.
pub struct Pod {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    /// The host-side veth in the node namespace.
    pub host_if: String,
    /// Its ifindex in the node namespace (the ENDPOINTS key).
    pub ifindex: u32,
}

impl Node {
    pub fn new(tag: &str, ip: Ipv4Addr) -> Result<Node> {
        let ns = NetNs::new(tag)?;
        ns.sh(&format!(
            "sysctl -qw net.ipv4.ip_forward=1
             ip addr add {ip}/32 dev lo"
        ))?;
        Ok(Node { ns, ip, pods: 0 })
    }

    /// A pod with address `ip` on this node.
    pub fn add_pod(&mut self, tag: &str, ip: Ipv4Addr) -> Result<Pod> {
        self.pods += 1;
        let host_if = format!("veth{}", self.pods);
        let ns = NetNs::new(tag)?;
        self.ns.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        ns.sh(&format!(
            "ip addr add {ip}/32 dev eth0
             ip link set eth0 up
             ip route add {POD_GATEWAY} dev eth0 scope link
             ip route add default via {POD_GATEWAY} dev eth0"
        ))?;
        self.ns.sh(&format!(
            "ip addr add {POD_GATEWAY}/32 dev {host_if}
             ip link set {host_if} up
             ip route add {ip}/32 dev {host_if} src {node}",
            node = self.ip
        ))?;
        let ifindex = self.ns.ifindex(&host_if)?;
        Ok(Pod {
            ns,
            ip,
            host_if,
            ifindex,
        })
    }

    /// Joins two nodes with an underlay veth (`up0` on both sides, 192.168.<subnet>.1 and .2)
    /// and routes each node's pod range to the other.
    pub fn link(&self, other: &Node, subnet: u8, self_pods: &str, other_pods: &str) -> Result<()> {
        self.ns.ip(&[
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "netns",
            other.ns.name(),
        ])?;
        let (a, b) = (format!("192.168.{subnet}.1"), format!("192.168.{subnet}.2"));
        self.ns.sh(&format!(
            "ip addr add {a}/24 dev up0
             ip link set up0 up
             ip route add {other_pods} via {b} dev up0"
        ))?;
        other.ns.sh(&format!(
            "ip addr add {b}/24 dev up0
             ip link set up0 up
             ip route add {self_pods} via {a} dev up0"
        ))?;
        Ok(())
    }

    /// Installs kube-proxy-style DNAT rules: `(frontend, port, backend, target port)` (TCP).
    pub fn services(&self, rules: &[(Ipv4Addr, u16, Ipv4Addr, u16)]) -> Result<()> {
        let mut script = String::from(
            "table ip policy_test_svc {\n chain prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n",
        );
        for (vip, port, backend, target) in rules {
            script.push_str(&format!(
                "  ip daddr {vip} tcp dport {port} dnat to {backend}:{target}\n"
            ));
        }
        script.push_str(" }\n}\n");
        let path = std::env::temp_dir().join(format!("{}.nft", self.ns.name()));
        std::fs::write(&path, script)?;
        let result = self
            .ns
            .sh(&format!("nft -f {}", path.display()))
            .context("nftables DNAT rules");
        let _ = std::fs::remove_file(&path);
        result.map(|_| ())
    }
}
