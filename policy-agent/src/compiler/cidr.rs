//! ipBlock arithmetic: CIDR parsing with Go `net.ParseCIDR` semantics (host bits masked), and the
//! carving of the address space into CIDR identities.
//!
//! Every `cidr` and `except` prefix of every ipBlock becomes an IPCACHE entry. The prefixes of one
//! family are nested or disjoint, so for an address whose longest matching prefix is `p`, the
//! ipBlocks containing the address are exactly those `B` with `p ⊆ B.cidr` and `p ⊄ e` for every
//! except `e` of `B`. That set, interned, is the CIDR identity of `p`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnetwork::{Ipv4Network, Ipv6Network};

/// An address prefix with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prefix {
    V4 { addr: u32, len: u8 },
    V6 { addr: u128, len: u8 },
}

fn mask_v4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask_v6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

/// `::ffff:0:0/96`, the IPv4-mapped IPv6 range.
const V4_MAPPED: u128 = 0xffff_u128 << 32;

impl Prefix {
    pub fn v4(addr: Ipv4Addr, len: u8) -> Self {
        let len = len.min(32);
        Prefix::V4 {
            addr: mask_v4(addr.to_bits(), len),
            len,
        }
    }

    pub fn v6(addr: Ipv6Addr, len: u8) -> Self {
        let len = len.min(128);
        Prefix::V6 {
            addr: mask_v6(addr.to_bits(), len),
            len,
        }
    }

    /// The single-address prefix of `ip` (/32 or /128).
    pub fn host(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Prefix::v4(a, 32),
            IpAddr::V6(a) => Prefix::v6(a, 128),
        }
    }

    /// The prefix of length `len` containing `ip` (clamped to the family's width).
    pub fn of(ip: IpAddr, len: u8) -> Self {
        match ip {
            IpAddr::V4(a) => Prefix::v4(a, len),
            IpAddr::V6(a) => Prefix::v6(a, len),
        }
    }

    pub fn prefix_len(&self) -> u8 {
        match *self {
            Prefix::V4 { len, .. } | Prefix::V6 { len, .. } => len,
        }
    }

    pub fn is_v4(&self) -> bool {
        matches!(self, Prefix::V4 { .. })
    }

    /// Parses `addr/len` like Go's `net.ParseCIDR`: the length is decimal, at most the family's
    /// width, host bits are cleared. An IPv4-mapped IPv6 prefix of length ≥ 96 (`::ffff:a.b.c.d/n`)
    /// is the IPv4 prefix `a.b.c.d/(n-96)`, because Go's `IPNet.Contains` treats it so.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (no /prefix-length)"))?;
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR ({addr:?} is not an IP address)"))?;
        let width: u32 = if ip.is_ipv4() { 32 } else { 128 };
        let len: u32 =
            (!len.is_empty() && len.len() <= 4 && len.bytes().all(|b| b.is_ascii_digit()))
                .then(|| len.parse().ok())
                .flatten()
                .filter(|l| *l <= width)
                .ok_or_else(|| format!("{s:?} is not a CIDR (bad prefix length {len:?})"))?;
        let len = len as u8;
        Ok(match ip {
            IpAddr::V4(a) => Prefix::v4(a, len),
            IpAddr::V6(a) => {
                let p = Prefix::v6(a, len);
                match p {
                    Prefix::V6 { addr, len } if len >= 96 && addr >> 32 == V4_MAPPED >> 32 => {
                        Prefix::v4(Ipv4Addr::from_bits(addr as u32), len - 96)
                    }
                    p => p,
                }
            }
        })
    }

    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        match (*self, ip) {
            (Prefix::V4 { addr, len }, IpAddr::V4(a)) => mask_v4(a.to_bits(), len) == addr,
            (Prefix::V6 { addr, len }, IpAddr::V6(a)) => mask_v6(a.to_bits(), len) == addr,
            _ => false,
        }
    }

    /// `other ⊆ self`.
    pub fn covers(&self, other: &Prefix) -> bool {
        match (*self, *other) {
            (Prefix::V4 { addr, len }, Prefix::V4 { addr: o, len: ol }) => {
                ol >= len && mask_v4(o, len) == addr
            }
            (Prefix::V6 { addr, len }, Prefix::V6 { addr: o, len: ol }) => {
                ol >= len && mask_v6(o, len) == addr
            }
            _ => false,
        }
    }

    pub fn to_v4_network(&self) -> Option<Ipv4Network> {
        match *self {
            Prefix::V4 { addr, len } => Ipv4Network::new(Ipv4Addr::from_bits(addr), len).ok(),
            Prefix::V6 { .. } => None,
        }
    }

    pub fn to_v6_network(&self) -> Option<Ipv6Network> {
        match *self {
            Prefix::V6 { addr, len } => Ipv6Network::new(Ipv6Addr::from_bits(addr), len).ok(),
            Prefix::V4 { .. } => None,
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Prefix::V4 { addr, len } => write!(f, "{}/{len}", Ipv4Addr::from_bits(addr)),
            Prefix::V6 { addr, len } => write!(f, "{}/{len}", Ipv6Addr::from_bits(addr)),
        }
    }
}

/// A validated ipBlock: `cidr` minus every `except`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpBlock {
    pub cidr: Prefix,
    /// Sorted, without duplicates; each a strict subset of `cidr`.
    pub except: Vec<Prefix>,
}

impl IpBlock {
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        self.cidr.contains_ip(ip) && !self.except.iter().any(|e| e.contains_ip(ip))
    }

    /// Whether every address of `p` is in the block, given that `p` is one of the carving's
    /// prefixes (so it is nested in or disjoint from each of the block's prefixes).
    fn contains_carved(&self, p: &Prefix) -> bool {
        self.cidr.covers(p) && !self.except.iter().any(|e| e.covers(p))
    }
}

impl std::fmt::Display for IpBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.cidr)?;
        for e in &self.except {
            write!(f, " except {e}")?;
        }
        Ok(())
    }
}

/// The address space cut along every ipBlock prefix.
#[derive(Debug, Default)]
pub struct Carving {
    /// Every `cidr` and `except` prefix, with the indices (into the block list the carving was
    /// made from, ascending) of the blocks containing it.
    pub prefixes: Vec<(Prefix, Vec<u32>)>,
    index: HashMap<Prefix, usize>,
    /// Prefix lengths present, longest first, per family.
    lens_v4: Vec<u8>,
    lens_v6: Vec<u8>,
}

impl Carving {
    pub fn new(blocks: &[Arc<IpBlock>]) -> Self {
        let mut all: Vec<Prefix> = blocks
            .iter()
            .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
            .collect();
        all.sort();
        all.dedup();
        let prefixes: Vec<(Prefix, Vec<u32>)> = all
            .into_iter()
            .map(|p| {
                let members = (0..blocks.len() as u32)
                    .filter(|&i| blocks[i as usize].contains_carved(&p))
                    .collect();
                (p, members)
            })
            .collect();
        let index = prefixes
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (*p, i))
            .collect();
        let lens = |v4: bool| {
            let mut l: Vec<u8> = prefixes
                .iter()
                .filter(|(p, _)| p.is_v4() == v4)
                .map(|(p, _)| p.prefix_len())
                .collect();
            l.sort_unstable_by(|a, b| b.cmp(a));
            l.dedup();
            l
        };
        Carving {
            lens_v4: lens(true),
            lens_v6: lens(false),
            prefixes,
            index,
        }
    }

    /// Index (into `prefixes`) of the longest prefix containing `ip`.
    pub fn longest_match(&self, ip: IpAddr) -> Option<usize> {
        let lens = if ip.is_ipv4() {
            &self.lens_v4
        } else {
            &self.lens_v6
        };
        lens.iter()
            .find_map(|&len| self.index.get(&Prefix::of(ip, len)).copied())
    }

    /// Indices of the blocks containing `ip`.
    pub fn blocks_containing(&self, ip: IpAddr) -> &[u32] {
        self.longest_match(ip)
            .map_or(&[], |i| self.prefixes[i].1.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        Prefix::parse(s).unwrap()
    }

    fn block(cidr: &str, except: &[&str]) -> Arc<IpBlock> {
        Arc::new(IpBlock {
            cidr: p(cidr),
            except: except.iter().map(|e| p(e)).collect(),
        })
    }

    #[test]
    fn parse_masks_host_bits_like_go() {
        assert_eq!(p("10.1.2.3/8"), p("10.0.0.0/8"));
        assert_eq!(p("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(p("10.244.1.7/4").to_string(), "0.0.0.0/4");
        assert_eq!(p("10.1.2.3/32").to_string(), "10.1.2.3/32");
        assert_eq!(p("0.0.0.0/0").prefix_len(), 0);
        assert_eq!(p("fd00::1:2/64").to_string(), "fd00::/64");
        assert_eq!(p("::/0").prefix_len(), 0);
        assert_eq!(p("10.0.0.0/08"), p("10.0.0.0/8"));
    }

    #[test]
    fn parse_v4_mapped_v6_as_v4() {
        assert_eq!(p("::ffff:10.1.2.3/104"), p("10.0.0.0/8"));
        assert_eq!(p("::ffff:10.1.2.3/128"), p("10.1.2.3/32"));
        // Below /96 the mapping prefix is masked away: a plain IPv6 prefix.
        assert_eq!(p("::ffff:10.1.2.3/80").to_string(), "::/80");
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "/8",
            "x/8",
            "10.0.0.0/8/8",
            "fe80::1%eth0/64",
            "10.0.0.0 /8",
            "010.0.0.0/8",
        ] {
            assert!(Prefix::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn contains_and_covers_are_family_exact() {
        let net = p("10.0.0.0/8");
        assert!(net.contains_ip("10.255.0.1".parse().unwrap()));
        assert!(!net.contains_ip("11.0.0.1".parse().unwrap()));
        assert!(!net.contains_ip("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!p("::/0").contains_ip("10.0.0.1".parse().unwrap()));
        assert!(p("0.0.0.0/0").contains_ip("10.0.0.1".parse().unwrap()));
        assert!(net.covers(&p("10.1.0.0/16")));
        assert!(net.covers(&net));
        assert!(!p("10.1.0.0/16").covers(&net));
        assert!(!p("0.0.0.0/0").covers(&p("::/0")));
    }

    #[test]
    fn carving_assigns_block_sets_per_longest_prefix() {
        // B0 = 10/8 except 10.1/16, B1 = 10.1.0.0/16 except 10.1.2.0/24, B2 = 0/0.
        let blocks = vec![
            block("10.0.0.0/8", &["10.1.0.0/16"]),
            block("10.1.0.0/16", &["10.1.2.0/24"]),
            block("0.0.0.0/0", &[]),
            block("fd00::/8", &["fd00::/16"]),
        ];
        let c = Carving::new(&blocks);
        let at = |ip: &str| c.blocks_containing(ip.parse().unwrap()).to_vec();
        assert_eq!(at("10.9.9.9"), vec![0, 2]);
        assert_eq!(at("10.1.9.9"), vec![1, 2]);
        assert_eq!(at("10.1.2.9"), vec![2]);
        assert_eq!(at("192.168.0.1"), vec![2]);
        assert_eq!(at("fd01::1"), vec![3]);
        assert!(at("fd00::1").is_empty());
        assert!(at("2001:db8::1").is_empty());
        // Every (address, block) pair agrees with direct containment.
        for ip in [
            "10.9.9.9", "10.1.9.9", "10.1.2.9", "8.8.8.8", "fd01::1", "fd00::1", "::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let direct: Vec<u32> = (0..blocks.len() as u32)
                .filter(|&i| blocks[i as usize].contains_ip(ip))
                .collect();
            assert_eq!(c.blocks_containing(ip), direct.as_slice(), "{ip}");
        }
        // Five v4 prefixes (10/8, 10.1/16, 10.1.2/24, 0/0), two v6.
        assert_eq!(c.prefixes.len(), 6);
    }
}
