//! IPCACHE: addresses and ipBlock prefixes → (identity, CIDR identity).
//!
//! Precedence for one prefix: a node's address over a pod's, a pod's over an ipBlock prefix; an
//! address two live pods claim belongs to the first by namespace/name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use policy_common::{Direction, IdentityPair, identity};

use super::alloc::Interner;
use super::cidr::{Carving, IpBlock, Prefix};
use super::identities::CidrIdentityKey;
use super::policy::{NormPeer, NormPolicy, PortSpec};
use super::{NodeMaps, PodView};
use crate::model::Protocol;

/// An egress ipBlock peer with a named port: (block, port name, protocol).
pub(super) type ExactSlot = (Arc<IpBlock>, String, Protocol);

/// Pods targeted by egress ipBlock rules with named ports get a CIDR identity of their own.
#[derive(Default)]
pub(super) struct ExactTargets {
    /// (block, port name, protocol) → (address, port numbers).
    pub(super) by_rule_port: HashMap<ExactSlot, Vec<(IpAddr, Vec<u16>)>>,
    /// address → its own CIDR identity.
    pub(super) cidr_of: HashMap<IpAddr, u32>,
}

/// Sets an IPCACHE entry; with `replace == false` an existing entry for the prefix wins.
pub(super) fn insert_ipcache(
    maps: &mut NodeMaps,
    prefix: Prefix,
    pair: IdentityPair,
    replace: bool,
) {
    fn put<K: Ord>(map: &mut BTreeMap<K, IdentityPair>, k: K, v: IdentityPair, replace: bool) {
        if replace {
            map.insert(k, v);
        } else {
            map.entry(k).or_insert(v);
        }
    }
    if let Some(n) = prefix.to_v4_network() {
        put(&mut maps.ipcache_v4, n, pair, replace);
    } else if let Some(n) = prefix.to_v6_network() {
        put(&mut maps.ipcache_v6, n, pair, replace);
    }
}

/// Carves the ipBlocks of every valid policy, interns the CIDR identities and fills IPCACHE.
/// Returns, per ipBlock, the CIDR identities contained in it, and the exact per-pod identities.
pub(super) fn build(
    cidr_ids: &mut Interner<Arc<CidrIdentityKey>>,
    pods: &[PodView<'_>],
    policies: &HashMap<String, Vec<Arc<NormPolicy>>>,
    host: &HashSet<IpAddr>,
    remote: &HashSet<IpAddr>,
    maps: &mut NodeMaps,
) -> (HashMap<Arc<IpBlock>, Vec<u32>>, ExactTargets) {
    let mut blocks: Vec<Arc<IpBlock>> = policies
        .values()
        .flatten()
        .flat_map(|p| p.blocks())
        .cloned()
        .collect();
    blocks.sort();
    blocks.dedup();
    let carving = Carving::new(&blocks);

    let mut intern = |members: &[u32], exact: Option<IpAddr>| -> u32 {
        if members.is_empty() && exact.is_none() {
            return identity::ANY;
        }
        let key = Arc::new(CidrIdentityKey {
            blocks: members
                .iter()
                .map(|&i| blocks[i as usize].clone())
                .collect(),
            exact,
        });
        cidr_ids.intern(&key).unwrap_or(identity::ANY)
    };
    let mut block_cidrs: HashMap<Arc<IpBlock>, Vec<u32>> = HashMap::new();
    let mut note = |members: &[u32], id: u32| {
        for &i in members {
            block_cidrs
                .entry(blocks[i as usize].clone())
                .or_default()
                .push(id);
        }
    };

    // Pods targeted by egress ipBlock rules with named ports (addresses first, identities
    // after the prefixes').
    let mut exact = ExactTargets::default();
    let mut sorted_ips: Vec<(IpAddr, usize)> = Vec::new();
    for (rule, block) in policies
        .values()
        .flatten()
        .flat_map(|p| p.rules(Direction::Egress))
        .flat_map(|r| r.peers.iter().flatten().map(move |peer| (r, peer)))
        .filter_map(|(r, peer)| match peer {
            NormPeer::Block(b) => Some((r, b)),
            NormPeer::Pods(_) => None,
        })
    {
        for port in &rule.ports {
            let PortSpec::Named(name) = &port.port else {
                continue;
            };
            let slot = (block.clone(), name.clone(), port.protocol);
            if exact.by_rule_port.contains_key(&slot) {
                continue;
            }
            if sorted_ips.is_empty() {
                sorted_ips = pods
                    .iter()
                    .enumerate()
                    .flat_map(|(i, p)| p.ips.iter().map(move |ip| (*ip, i)))
                    .collect();
                sorted_ips.sort_unstable();
                // An address claimed twice belongs to the first pod (as in IPCACHE).
                sorted_ips.dedup_by_key(|(ip, _)| *ip);
            }
            let start = sorted_ips.partition_point(|(ip, _)| *ip < first_ip(&block.cidr));
            let mut targets = Vec::new();
            for &(ip, i) in sorted_ips[start..]
                .iter()
                .take_while(|(ip, _)| block.cidr.contains_ip(*ip))
            {
                if host.contains(&ip) || remote.contains(&ip) || !block.contains_ip(ip) {
                    continue;
                }
                let ports: Vec<u16> = pods[i].ident.ports_named(name, port.protocol).collect();
                if !ports.is_empty() {
                    targets.push((ip, ports));
                }
            }
            for (ip, _) in &targets {
                exact.cidr_of.entry(*ip).or_insert(identity::ANY);
            }
            exact.by_rule_port.insert(slot, targets);
        }
    }
    // CIDR identities of the prefixes (their entries are added last: addresses win). The host
    // prefix of an address with a CIDR identity of its own gets none: the pod's entry replaces
    // it, so no IPCACHE entry would carry it, yet every rule whose block contains the address
    // would key POLICY entries on it.
    let mut prefix_cidr = Vec::with_capacity(carving.prefixes.len());
    for (prefix, members) in &carving.prefixes {
        let shadowed = Prefix::host(first_ip(prefix)) == *prefix
            && exact.cidr_of.contains_key(&first_ip(prefix));
        if shadowed {
            prefix_cidr.push(None);
            continue;
        }
        let id = intern(members, None);
        note(members, id);
        prefix_cidr.push(Some(id));
    }
    let cidr_of = |ip: IpAddr| {
        carving
            .longest_match(ip)
            .and_then(|i| prefix_cidr[i])
            .unwrap_or(identity::ANY)
    };

    let mut exact_ips: Vec<IpAddr> = exact.cidr_of.keys().copied().collect();
    // In address order, so the numbering does not depend on hash order.
    exact_ips.sort_unstable();
    for ip in exact_ips {
        let members = carving.blocks_containing(ip);
        let id = intern(members, Some(ip));
        note(members, id);
        exact.cidr_of.insert(ip, id);
    }
    for v in block_cidrs.values_mut() {
        v.sort_unstable();
        v.dedup();
    }

    // Address entries. Two live pods claiming one address: the first by namespace/name keeps
    // it. A node's address is never a pod peer: nodes replace pods.
    for pod in pods {
        for &ip in pod.ips {
            let cidr_identity = exact
                .cidr_of
                .get(&ip)
                .copied()
                .unwrap_or_else(|| cidr_of(ip));
            let pair = IdentityPair {
                identity: pod.identity,
                cidr_identity,
            };
            insert_ipcache(maps, Prefix::host(ip), pair, false);
        }
    }
    for (set, id) in [(host, identity::HOST), (remote, identity::REMOTE_NODE)] {
        for &ip in set {
            let pair = IdentityPair {
                identity: id,
                cidr_identity: cidr_of(ip),
            };
            insert_ipcache(maps, Prefix::host(ip), pair, true);
        }
    }
    for ((prefix, _), id) in carving.prefixes.iter().zip(&prefix_cidr) {
        let Some(id) = *id else {
            continue;
        };
        let pair = IdentityPair {
            identity: identity::WORLD,
            cidr_identity: id,
        };
        insert_ipcache(maps, *prefix, pair, false);
    }
    (block_cidrs, exact)
}

/// The lowest address of a prefix.
pub(super) fn first_ip(p: &Prefix) -> IpAddr {
    match *p {
        Prefix::V4 { addr, .. } => IpAddr::V4(std::net::Ipv4Addr::from_bits(addr)),
        Prefix::V6 { addr, .. } => IpAddr::V6(std::net::Ipv6Addr::from_bits(addr)),
    }
}
