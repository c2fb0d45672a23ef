//! A two-node cluster of network namespaces shaped like kind with kindnet's ptp plugin: node
//! namespaces joined by an underlay veth, pods on veth pairs with their /32 on `eth0`, a default
//! route via the node's gateway address and a `podIP/32 dev vethX` route on the node.

use std::{net::Ipv4Addr, process::Child};

use anyhow::Result;

use crate::netns::{NetNs, unique_name, veth};

/// Underlay addresses: node N is 192.168.250.N.
pub fn node_ip(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 250, node)
}

/// Gateway address every pod of node N routes through (on each host-side veth): 10.244.N.1.
pub fn gateway_ip(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, 1)
}

pub struct Node {
    pub index: u8,
    pub netns: NetNs,
    /// Underlay device name in this node's namespace.
    pub uplink: String,
}

pub struct Pod {
    pub name: String,
    pub node: u8,
    pub ip: Ipv4Addr,
    pub netns: NetNs,
    /// Host-side veth name in the node's namespace.
    pub host_if: String,
}

pub struct Cluster {
    pub prefix: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Processes started inside the cluster (servers, agents), killed on drop before the
    /// namespaces go.
    pub children: Vec<Child>,
}

impl Cluster {
    /// Two nodes joined by a veth underlay, each routing the other's 10.244.N.0/24.
    pub fn two_nodes(tag: &str) -> Result<Self> {
        let prefix = unique_name(tag);
        let mut nodes = Vec::new();
        for index in 1..=2u8 {
            let netns = NetNs::named(format!("{prefix}-node-{index}"))?;
            netns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            nodes.push(Node {
                index,
                netns,
                uplink: format!("ul{index}"),
            });
        }
        veth(&nodes[0].netns, "ul1", &nodes[1].netns, "ul2")?;
        for (me, other) in [(0usize, 1usize), (1, 0)] {
            let n = &nodes[me];
            n.netns.ip(&[
                "addr",
                "add",
                &format!("{}/24", node_ip(n.index)),
                "dev",
                &n.uplink,
            ])?;
            let peer = nodes[other].index;
            n.netns.ip(&[
                "route",
                "add",
                &format!("10.244.{peer}.0/24"),
                "via",
                &node_ip(peer).to_string(),
            ])?;
        }
        Ok(Self {
            prefix,
            nodes,
            pods: Vec::new(),
            children: Vec::new(),
        })
    }

    /// Adds pod `name` on node `node` (1-based) with address 10.244.node.host.
    pub fn add_pod(&mut self, name: &str, node: u8, host: u8) -> Result<&Pod> {
        let ip = Ipv4Addr::new(10, 244, node, host);
        let netns = NetNs::named(format!("{}-pod-{name}", self.prefix))?;
        let host_if = format!("veth{name}");
        let node_ns = &self.nodes[usize::from(node) - 1].netns;
        veth(node_ns, &host_if, &netns, "eth0")?;
        let gw = gateway_ip(node).to_string();
        node_ns.ip(&["addr", "add", &format!("{gw}/32"), "dev", &host_if])?;
        node_ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if])?;
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        netns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
        netns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        self.pods.push(Pod {
            name: name.to_owned(),
            node,
            ip,
            netns,
            host_if,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("pod exists")
    }

    pub fn node(&self, index: u8) -> &Node {
        &self.nodes[usize::from(index) - 1]
    }

    /// Starts `program args` inside `ns` (`ip netns exec`) and keeps it until the cluster drops.
    pub fn spawn_in(&mut self, ns: &str, program: &str, args: &[&str]) -> Result<()> {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        self.children.push(child);
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Pods and nodes drop (and delete their namespaces) after this.
    }
}
