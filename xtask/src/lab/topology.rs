//! Names and addresses of everything the lab creates. The shape follows a kind cluster:
//!
//! ```text
//!                     <p>-ext  eth0 203.0.113.10/24 (off-cluster host; default via 203.0.113.1)
//!                        │
//!   <p>-ul (underlay router)   <p>x 203.0.113.1/24, bridge <p>br 172.18.0.1/24,
//!                        │     routes 10.244.N.0/24 via node N
//!        ┌───────────────┴───────────────┐
//!   <p>-node-1  eth0 172.18.0.2/24   <p>-node-2  eth0 172.18.0.3/24    (default via 172.18.0.1,
//!   pods 10.244.1.0/24                pods 10.244.2.0/24                 routes to other pod ranges,
//!        │ <p>v<id>  (host side, route podIP/32 dev <p>v<id>)            nftables service DNAT)
//!   <p>-pod-<id>  eth0 10.244.1.K/32, default via 169.254.1.1 (the host veth, static neighbour)
//! ```
//!
//! Every namespace, bridge, underlay link and host-side veth carries the prefix; the pod side of a
//! veth is `eth0` (as every CNI names it) and the node's uplink is `eth0` (as on a kind node).

use std::net::Ipv4Addr;

use anyhow::{Result, bail};

/// The kube-proxy masquerade bit (`KUBE-MARK-MASQ`).
pub const MASQ_MARK: u32 = 0x4000;

/// All pods of the cluster (kind's default pod subnet).
pub const POD_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);
/// Service ClusterIPs (kind's default service subnet).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
/// The node network (kind's docker network is 172.18.0.0/16; the lab uses a /24 of it).
pub const NODE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 18, 0, 0), 24);
pub const NODE_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
/// The off-cluster host `ext` (TEST-NET-3, never a pod, node or service address).
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const EXT_GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const EXT_PREFIX_LEN: u8 = 24;
/// Ports `ext` answers on, TCP and UDP.
pub const EXT_PORTS: [u16; 5] = [53, 80, 81, 443, 8080];
/// Pods' default gateway: a link-local address the host-side veth answers for (static neighbour
/// entry in the pod), as Calico does; the host side carries no address of its own.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The agents' HTTP port is this plus the node number (each agent its own metrics port).
pub const AGENT_HTTP_PORT_BASE: u16 = 9960;
pub const MAX_NODES: u32 = 50;

/// A valid lab prefix: a lowercase letter then up to 7 letters or digits (no `-`, so the names of
/// one lab never match the patterns of another, and `<prefix>v<id>` fits IFNAMSIZ).
pub fn check_prefix(prefix: &str) -> Result<()> {
    let ok = (1..=8).contains(&prefix.len())
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !ok {
        bail!(
            "invalid lab prefix {prefix:?}: use 1-8 lowercase letters or digits, starting with a letter"
        );
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    pub fn underlay_ns(&self) -> String {
        format!("{}-ul", self.prefix)
    }
    pub fn ext_ns(&self) -> String {
        format!("{}-ext", self.prefix)
    }
    /// The control plane of the real-API mode (etcd, kube-apiserver, kube-controller-manager).
    pub fn control_plane_ns(&self) -> String {
        format!("{}-cp", self.prefix)
    }
    /// Underlay side of the control plane's link.
    pub fn control_plane_link(&self) -> String {
        format!("{}c", self.prefix)
    }
    pub fn node_ns(&self, n: u32) -> String {
        format!("{}-node-{n}", self.prefix)
    }
    pub fn pod_ns(&self, id: u32) -> String {
        format!("{}-pod-{id}", self.prefix)
    }
    pub fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }
    /// Underlay side of node N's uplink.
    pub fn node_link(&self, n: u32) -> String {
        format!("{}n{n}", self.prefix)
    }
    /// Underlay side of ext's link.
    pub fn ext_link(&self) -> String {
        format!("{}x", self.prefix)
    }
    /// Host side of a pod's veth.
    pub fn pod_veth(&self, id: u32) -> String {
        format!("{}v{id}", self.prefix)
    }
    pub fn bpffs_dir(&self, n: u32) -> String {
        format!("/sys/fs/bpf/{}-node-{n}", self.prefix)
    }

    /// Whether a network namespace name belongs to this lab.
    pub fn owns_netns(&self, name: &str) -> bool {
        let Some(rest) = name
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        rest == "ul"
            || rest == "ext"
            || rest == "cp"
            || numbered(rest, "node-").is_some()
            || numbered(rest, "pod-").is_some()
    }

    /// Whether a bpffs entry name (under /sys/fs/bpf) belongs to this lab.
    pub fn owns_pin(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| numbered(r, "node-"))
            .is_some()
    }
}

fn numbered(s: &str, head: &str) -> Option<u32> {
    let digits = s.strip_prefix(head)?;
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn node_name(n: u32) -> String {
    format!("node-{n}")
}

pub fn node_number(name: &str) -> Option<u32> {
    numbered(name, "node-")
}

pub fn node_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, 1 + n as u8)
}

/// Node N's pod range 10.244.N.0/24.
pub fn node_pod_cidr(n: u32) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(10, 244, n as u8, 0), 24)
}

pub fn cidr(c: (Ipv4Addr, u8)) -> String {
    format!("{}/{}", c.0, c.1)
}

pub fn in_cidr(ip: Ipv4Addr, c: (Ipv4Addr, u8)) -> bool {
    let mask = if c.1 == 0 { 0 } else { u32::MAX << (32 - c.1) };
    u32::from(ip) & mask == u32::from(c.0) & mask
}

/// A locally administered MAC derived from a pod id (host side of its veth).
pub fn host_veth_mac(id: u32) -> String {
    let b = id.to_be_bytes();
    format!("ee:ee:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_never_claim_each_others_names() {
        let a = Names::new("pal");
        let b = Names::new("palt1");
        assert!(a.owns_netns("pal-node-1"));
        assert!(a.owns_netns("pal-pod-17"));
        assert!(a.owns_netns("pal-ul"));
        assert!(!a.owns_netns(&b.node_ns(1)));
        assert!(!a.owns_netns(&b.underlay_ns()));
        assert!(!a.owns_netns("pal-node-x"));
        assert!(!a.owns_netns("pal-pod-"));
        assert!(a.owns_pin("pal-node-2"));
        assert!(!a.owns_pin("palt1-node-2"));
        assert!(!a.owns_pin("pal-node-2x"));
    }

    #[test]
    fn prefix_rules() {
        assert!(check_prefix("pal").is_ok());
        assert!(check_prefix("lab12345").is_ok());
        assert!(check_prefix("lab123456").is_err());
        assert!(check_prefix("pal-x").is_err());
        assert!(check_prefix("1pal").is_err());
        assert!(check_prefix("").is_err());
        // host veth name fits IFNAMSIZ (15) for the longest prefix and a 6-digit id
        assert!(Names::new("lab12345").pod_veth(999_999).len() <= 15);
    }

    #[test]
    fn addressing() {
        assert_eq!(node_ip(1), Ipv4Addr::new(172, 18, 0, 2));
        assert_eq!(cidr(node_pod_cidr(2)), "10.244.2.0/24");
        assert!(in_cidr(Ipv4Addr::new(10, 244, 7, 9), POD_CIDR));
        assert!(!in_cidr(EXT_IP, POD_CIDR));
        assert!(!in_cidr(EXT_IP, SERVICE_CIDR));
        assert!(!in_cidr(EXT_IP, NODE_CIDR));
        assert_eq!(host_veth_mac(258), "ee:ee:00:00:01:02");
    }
}
