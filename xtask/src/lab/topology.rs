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
//!
//! With `--ip-family ipv6` every address above has an IPv6 counterpart in its place, the ranges
//! kind uses for IPv6 clusters; `dual` gives every pod, node, Service and `ext` both, IPv4 first:
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | pods | 10.244.0.0/16, node N 10.244.N.0/24 | fd00:10:244::/56, node N fd00:10:244:N::/64 |
//! | Services | 10.96.0.0/16 | fd00:10:96::/112 |
//! | nodes | 172.18.0.0/24, node N .N+1, gateway .1 | fc00:f853:ccd:e793::/64, node N ::N+1, gateway ::1 |
//! | ext | 203.0.113.10/24 via .1 | 2001:db8:113::10/64 via ::1 |
//! | pods' gateway | 169.254.1.1 | fe80::1 |
//!
//! A pod's host number is the same in both families (10.244.1.7 and fd00:10:244:1::7), and so is a
//! Service's offset in its range.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// The address families of a lab (`lab up --ip-family`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    #[default]
    Ipv4,
    Ipv6,
    Dual,
}

/// One address family (`lab probe --family 4|6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    /// `4` or `6`.
    pub fn number(self) -> u8 {
        match self {
            Family::V4 => 4,
            Family::V6 => 6,
        }
    }
    pub fn parse(s: &str) -> Result<Family> {
        match s {
            "4" => Ok(Family::V4),
            "6" => Ok(Family::V6),
            _ => bail!("--family {s}: expected 4 or 6"),
        }
    }
    /// The Kubernetes name (`ipFamilies`, EndpointSlice `addressType`).
    pub fn kube_name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
    /// The nftables family of a table and of an address match.
    pub fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    /// Full length of an address.
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IPv{}", self.number())
    }
}

impl IpFamily {
    /// The lab's families, IPv4 first.
    pub fn families(self) -> &'static [Family] {
        match self {
            IpFamily::Ipv4 => &[Family::V4],
            IpFamily::Ipv6 => &[Family::V6],
            IpFamily::Dual => &[Family::V4, Family::V6],
        }
    }
    /// The family of `status.podIP`, a Service's `clusterIP` and a probe without `--family`.
    pub fn primary(self) -> Family {
        self.families()[0]
    }
    pub fn has(self, f: Family) -> bool {
        self.families().contains(&f)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
            IpFamily::Dual => "dual",
        }
    }
}

/// An address range of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub const fn v4(a: Ipv4Addr, len: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(a),
            len,
        }
    }
    pub const fn v6(a: Ipv6Addr, len: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V6(a),
            len,
        }
    }
    pub fn family(self) -> Family {
        Family::of(self.addr)
    }
    pub fn contains(self, ip: IpAddr) -> bool {
        let bits = self.family().bits();
        Family::of(ip) == self.family()
            && masked(to_bits(ip), self.len, bits) == masked(to_bits(self.addr), self.len, bits)
    }
    /// The address `offset` into the range.
    pub fn nth(self, offset: u128) -> IpAddr {
        from_bits(self.family(), to_bits(self.addr) + offset)
    }

    /// How far `ip` is into the range (None outside it).
    pub fn offset_of(self, ip: IpAddr) -> Option<u128> {
        self.contains(ip)
            .then(|| to_bits(ip) - to_bits(network_of(self.addr, self.len).addr))
    }

    /// The number of addresses in the range (saturating for IPv6 ranges beyond 2^127).
    pub fn size(self) -> u128 {
        let host = self.family().bits() - self.len;
        if host >= 127 {
            u128::MAX
        } else {
            1u128 << host
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn to_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_bits()),
        IpAddr::V6(a) => a.to_bits(),
    }
}

fn from_bits(f: Family, b: u128) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::from_bits(b as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from_bits(b)),
    }
}

fn masked(b: u128, len: u8, bits: u8) -> u128 {
    if len == 0 {
        0
    } else {
        b >> (bits - len) << (bits - len)
    }
}

/// `ip` masked to its `/len` network, as `N/len`.
pub fn network_of(ip: IpAddr, len: u8) -> Cidr {
    let f = Family::of(ip);
    let len = len.min(f.bits());
    Cidr {
        addr: from_bits(f, masked(to_bits(ip), len, f.bits())),
        len,
    }
}

/// The kube-proxy masquerade bit (`KUBE-MARK-MASQ`).
pub const MASQ_MARK: u32 = 0x4000;

/// All pods of the cluster (kind's default pod subnet).
pub const POD_CIDR: Cidr = Cidr::v4(Ipv4Addr::new(10, 244, 0, 0), 16);
/// Service ClusterIPs (kind's default service subnet).
pub const SERVICE_CIDR: Cidr = Cidr::v4(Ipv4Addr::new(10, 96, 0, 0), 16);
/// The node network (kind's docker network is 172.18.0.0/16; the lab uses a /24 of it).
pub const NODE_CIDR: Cidr = Cidr::v4(Ipv4Addr::new(172, 18, 0, 0), 24);
/// The off-cluster host `ext` (TEST-NET-3, never a pod, node or service address), on a /24
/// behind its gateway .1.
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const EXT_NET: Cidr = Cidr::v4(Ipv4Addr::new(203, 0, 113, 0), 24);
/// Ports `ext` answers on, TCP and UDP.
pub const EXT_PORTS: [u16; 5] = [53, 80, 81, 443, 8080];
/// Pods' default gateway: a link-local address the host-side veth answers for (static neighbour
/// entry in the pod), as Calico does; the host side carries no address of its own.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The agents' HTTP port is this plus the node number (each agent its own metrics port).
pub const AGENT_HTTP_PORT_BASE: u16 = 9960;
pub const MAX_NODES: u32 = 50;

/// The IPv6 counterparts (kind's IPv6 ranges; the node network is the one docker gives kind;
/// ext in the documentation prefix).
pub const POD_CIDR6: Cidr = Cidr::v6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0), 56);
pub const SERVICE_CIDR6: Cidr = Cidr::v6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0), 112);
pub const NODE_CIDR6: Cidr = Cidr::v6(Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 0), 64);
pub const EXT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x10);
pub const EXT_NET6: Cidr = Cidr::v6(Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0), 64);
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// All pods of the cluster, in family `f`.
pub fn pod_cidr(f: Family) -> Cidr {
    match f {
        Family::V4 => POD_CIDR,
        Family::V6 => POD_CIDR6,
    }
}

pub fn service_cidr(f: Family) -> Cidr {
    match f {
        Family::V4 => SERVICE_CIDR,
        Family::V6 => SERVICE_CIDR6,
    }
}

pub fn node_cidr(f: Family) -> Cidr {
    match f {
        Family::V4 => NODE_CIDR,
        Family::V6 => NODE_CIDR6,
    }
}

/// The underlay router's address on the node network.
pub fn node_gateway(f: Family) -> IpAddr {
    node_cidr(f).nth(1)
}

/// Node N's address in family `f`.
pub fn node_addr(n: u32, f: Family) -> IpAddr {
    node_cidr(f).nth(1 + u128::from(n))
}

/// Node N's pod range in family `f`: the Nth /24 (IPv4) or /64 (IPv6) of the pod range.
pub fn node_pods(n: u32, f: Family) -> Cidr {
    let len = match f {
        Family::V4 => 24,
        Family::V6 => 64,
    };
    Cidr {
        addr: pod_cidr(f).nth(u128::from(n) << (f.bits() - len)),
        len,
    }
}

/// `ext`'s address, its prefix length and its gateway (the first address of its network) in
/// family `f`.
pub fn ext_addr(f: Family) -> (IpAddr, u8, IpAddr) {
    let (ip, net): (IpAddr, Cidr) = match f {
        Family::V4 => (EXT_IP.into(), EXT_NET),
        Family::V6 => (EXT_IP6.into(), EXT_NET6),
    };
    (ip, net.len, net.nth(1))
}

/// The pods' default gateway in family `f`.
pub fn pod_gateway(f: Family) -> IpAddr {
    match f {
        Family::V4 => POD_GATEWAY.into(),
        Family::V6 => POD_GATEWAY6.into(),
    }
}

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
        assert!(pod_cidr(Family::V4).contains(Ipv4Addr::new(10, 244, 7, 9).into()));
        assert!(!pod_cidr(Family::V4).contains(EXT_IP.into()));
        assert!(!service_cidr(Family::V4).contains(EXT_IP.into()));
        assert!(!node_cidr(Family::V4).contains(EXT_IP.into()));
        assert_eq!(host_veth_mac(258), "ee:ee:00:00:01:02");
    }

    #[test]
    fn addressing_of_both_families() {
        assert_eq!(node_addr(1, Family::V4).to_string(), "172.18.0.2");
        assert_eq!(
            node_addr(1, Family::V6).to_string(),
            "fc00:f853:ccd:e793::2"
        );
        assert_eq!(
            node_gateway(Family::V6).to_string(),
            "fc00:f853:ccd:e793::1"
        );
        assert_eq!(node_pods(2, Family::V6).to_string(), "fd00:10:244:2::/64");
        assert_eq!(node_pods(2, Family::V4).to_string(), "10.244.2.0/24");
        assert!(pod_cidr(Family::V6).contains(node_pods(7, Family::V6).nth(9)));
        assert!(!pod_cidr(Family::V4).contains(node_pods(7, Family::V6).nth(9)));
        assert!(!pod_cidr(Family::V6).contains(ext_addr(Family::V6).0));
        assert!(!service_cidr(Family::V6).contains(ext_addr(Family::V6).0));
        assert!(!node_cidr(Family::V6).contains(ext_addr(Family::V6).0));
        assert_eq!(
            service_cidr(Family::V6).nth(100).to_string(),
            "fd00:10:96::64"
        );
        assert_eq!(service_cidr(Family::V6).size(), 65536);
        let kube_dns: IpAddr = "10.96.0.10".parse().unwrap();
        assert_eq!(service_cidr(Family::V4).offset_of(kube_dns), Some(10));
        assert_eq!(service_cidr(Family::V6).offset_of(kube_dns), None);
        assert_eq!(
            service_cidr(Family::V6).nth(10).to_string(),
            "fd00:10:96::a"
        );
        assert_eq!(
            network_of("fd00:10:244:1::7".parse().unwrap(), 4).to_string(),
            "f000::/4"
        );
        assert_eq!(
            network_of("10.244.1.7".parse().unwrap(), 4).to_string(),
            "0.0.0.0/4"
        );
        assert_eq!(IpFamily::Dual.primary(), Family::V4);
        assert_eq!(IpFamily::Ipv6.primary(), Family::V6);
    }
}
