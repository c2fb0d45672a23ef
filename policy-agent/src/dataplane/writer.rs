//! The map writer: turns the compiler's output into map writes, in an order that never lets a
//! denied flow through mid-update, and keeps endpoint generations (revocation) current.
//!
//! Write order within [`Dataplane::apply`]:
//! 1. Service addresses added (new flows to them are deferred to the post-DNAT hook from now on);
//! 2. IPCACHE upserts, then POLICY upserts (allow entries exist before anything refers to them);
//! 3. POLICY removals, then IPCACHE removals, then Service removals;
//!
//! POLICY entries are written per group (`policy_groups`): a change rewrites the whole group
//! value, which the kernel swaps in atomically.
//! 4. generation bumps of every endpoint whose established flows might have lost their allow
//!    entry (POLICY removals of that endpoint; any changed or removed IPCACHE or Service entry
//!    bumps all), so their next packet is re-checked.
//!
//! Endpoints are written separately by the agent ([`Dataplane::upsert_endpoint`], since the
//! ENDPOINTS key is the host veth's ifindex, which only the agent knows). The agent should apply
//! a diff before upserting endpoints whose isolation it turns on (allow entries before isolation:
//! the endpoint is never isolated without its allow entries), and remove endpoints after
//! detaching them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use aya::{
    Ebpf, Pod,
    maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use ipnetwork::{Ipv4Network, Ipv6Network};
use policy_common::{
    Addr, CtKey, CtValue, EndpointInfo, FragKey, FragValue, IdentityPair, POLICY_MAX_RANGES,
    PolicyGroupKey, PolicyValue, PortRange, PortRanges, ServiceKey, addr_from_octets, addr_octets,
    capacity, map_names,
};

use super::error::DataplaneError;
use super::loader::{Dataplane, typed_map, typed_map_mut};
use super::policy_groups::{chunk_key, chunks, describe_group, entry_of, group_of, range_of};
use crate::compiler::output::{MapDiff, NodeMaps, PolicyEntryKey};

/// What the writer knows is in the maps (read back from them at open, so a restarted agent
/// diffs against reality).
#[derive(Debug, Default)]
pub(crate) struct Shadow {
    pub(crate) endpoints: BTreeMap<u32, EndpointInfo>,
    pub(crate) ipcache_v4: BTreeMap<Ipv4Network, IdentityPair>,
    pub(crate) ipcache_v6: BTreeMap<Ipv6Network, IdentityPair>,
    /// The compiler's POLICY entries...
    pub(crate) policy: BTreeMap<PolicyEntryKey, PolicyValue>,
    /// ...indexed by their POLICY group (chunk 0)...
    pub(crate) policy_groups: BTreeMap<PolicyGroupKey, BTreeSet<PolicyEntryKey>>,
    /// ...and the number of chunks each group has in the map.
    pub(crate) group_chunks: BTreeMap<PolicyGroupKey, u8>,
    /// Groups whose map content may lag the shadow (a write failed): rewritten by the next
    /// `apply`.
    pub(crate) dirty_groups: BTreeSet<PolicyGroupKey>,
    pub(crate) services: BTreeSet<IpAddr>,
}

/// What one [`Dataplane::apply`] or [`Dataplane::sync`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Entries written (new or changed).
    pub upserted: usize,
    /// Entries removed.
    pub removed: usize,
    /// Entries in the diff that were already in place.
    pub unchanged: usize,
    /// Endpoints whose generation moved on (their established flows are re-checked).
    pub endpoints_bumped: usize,
}

/// Entries in one map as counted in the kernel, and the map's `max_entries` (pressure metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u32,
}

/// The key form of an address: IPv4-mapped for IPv4, as [`Addr`] words.
pub fn addr_of(ip: IpAddr) -> Addr {
    addr_from_octets(match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    })
}

/// The address of a key [`Addr`].
pub fn ip_of(addr: Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(addr_octets(addr));
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn service_key(addr: IpAddr) -> ServiceKey {
    ServiceKey {
        addr: addr_of(addr),
    }
}

/// A map write error, with E2BIG (hash full) and ENOSPC (LPM trie full) turned into
/// [`DataplaneError::MapFull`].
fn update_error(map: &'static str, key: String, capacity: u32, source: MapError) -> DataplaneError {
    if let MapError::SyscallError(e) = &source
        && matches!(
            e.io_error.raw_os_error(),
            Some(libc::E2BIG) | Some(libc::ENOSPC)
        )
    {
        return DataplaneError::MapFull { map, key, capacity };
    }
    DataplaneError::MapUpdate {
        map,
        key,
        source: Box::new(source),
    }
}

/// Removing what is already gone is not an error.
fn remove_result(
    map: &'static str,
    key: String,
    result: Result<(), MapError>,
) -> Result<(), DataplaneError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(DataplaneError::MapRemove {
            map,
            key,
            source: Box::new(source),
        }),
    }
}

impl Shadow {
    fn insert_policy(&mut self, key: PolicyEntryKey, value: PolicyValue) {
        self.policy.insert(key, value);
        self.policy_groups
            .entry(group_of(&key))
            .or_default()
            .insert(key);
    }

    fn remove_policy(&mut self, key: &PolicyEntryKey) -> bool {
        if self.policy.remove(key).is_none() {
            return false;
        }
        let group = group_of(key);
        if let Some(keys) = self.policy_groups.get_mut(&group) {
            keys.remove(key);
            if keys.is_empty() {
                self.policy_groups.remove(&group);
            }
        }
        true
    }

    /// The sorted ranges of a group's entries.
    fn group_ranges(&self, group: &PolicyGroupKey) -> Vec<PortRange> {
        let mut ranges: Vec<PortRange> = self
            .policy_groups
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|key| Some(range_of(key, self.policy.get(key)?)))
            .collect();
        ranges.sort();
        ranges
    }

    pub(crate) fn read(ebpf: &Ebpf) -> Result<Shadow, DataplaneError> {
        let mut shadow = Shadow::default();
        let read_err = |map: &'static str| {
            move |source| DataplaneError::Map {
                map,
                source: Box::new(source),
            }
        };

        let endpoints: HashMap<&MapData, u32, EndpointInfo> =
            typed_map(ebpf, map_names::ENDPOINTS)?;
        for item in endpoints.iter() {
            let (ifindex, info) = item.map_err(read_err(map_names::ENDPOINTS))?;
            shadow.endpoints.insert(ifindex, info);
        }
        let exact: HashMap<&MapData, Addr, IdentityPair> =
            typed_map(ebpf, map_names::IPCACHE_EXACT)?;
        for item in exact.iter() {
            let (addr, value) = item.map_err(read_err(map_names::IPCACHE_EXACT))?;
            match ip_of(addr) {
                IpAddr::V4(v4) => shadow.ipcache_v4.insert(Ipv4Network::from(v4), value),
                IpAddr::V6(v6) => shadow.ipcache_v6.insert(Ipv6Network::from(v6), value),
            };
        }
        let v4: LpmTrie<&MapData, [u8; 4], IdentityPair> = typed_map(ebpf, map_names::IPCACHE_V4)?;
        for item in v4.iter() {
            let (key, value) = item.map_err(read_err(map_names::IPCACHE_V4))?;
            if let Ok(net) = Ipv4Network::new(key.data().into(), key.prefix_len() as u8) {
                shadow.ipcache_v4.insert(net, value);
            }
        }
        let v6: LpmTrie<&MapData, [u8; 16], IdentityPair> = typed_map(ebpf, map_names::IPCACHE_V6)?;
        for item in v6.iter() {
            let (key, value) = item.map_err(read_err(map_names::IPCACHE_V6))?;
            if let Ok(net) = Ipv6Network::new(key.data().into(), key.prefix_len() as u8) {
                shadow.ipcache_v6.insert(net, value);
            }
        }
        let policy: HashMap<&MapData, PolicyGroupKey, PortRanges> =
            typed_map(ebpf, map_names::POLICY)?;
        for item in policy.iter() {
            let (key, value) = item.map_err(read_err(map_names::POLICY))?;
            let group = chunk_key(&key, 0);
            let chunks = shadow.group_chunks.entry(group).or_default();
            *chunks = (*chunks).max(key.chunk.saturating_add(1));
            let count = (value.count as usize).min(value.ranges.len());
            for range in &value.ranges[..count] {
                match entry_of(&group, range) {
                    Some((entry, value)) => shadow.insert_policy(entry, value),
                    // Not written by this writer: rewrite the group from the desired state.
                    None => {
                        shadow.dirty_groups.insert(group);
                    }
                }
            }
        }
        let services: HashMap<&MapData, ServiceKey, u32> = typed_map(ebpf, map_names::SERVICES)?;
        for item in services.keys() {
            let key = item.map_err(read_err(map_names::SERVICES))?;
            shadow.services.insert(ip_of(key.addr));
        }
        Ok(shadow)
    }
}

impl Dataplane {
    /// Writes (or rewrites) the endpoint behind host veth `ifindex`: ENDPOINTS_BY_ID first, then
    /// ENDPOINTS, then its ENDPOINT_SLOTS slot, so no hook ever finds an id it cannot resolve. The generation is managed here:
    /// it moves on whenever the flags, identity or id change (established flows are re-checked).
    pub fn upsert_endpoint(
        &mut self,
        ifindex: u32,
        info: EndpointInfo,
    ) -> Result<(), DataplaneError> {
        if info.id == 0 || info.id >= capacity::ENDPOINTS {
            return Err(DataplaneError::InvalidEndpoint {
                ifindex,
                reason: format!("id {} outside 1..{}", info.id, capacity::ENDPOINTS),
            });
        }
        let previous = self.shadow.endpoints.get(&ifindex).copied();
        let mut info = info;
        info.generation = match previous {
            Some(p) if p.id == info.id && p.flags == info.flags && p.identity == info.identity => {
                p.generation
            }
            Some(p) => p.generation.wrapping_add(1),
            // A fresh endpoint: CT entries left by an earlier endpoint with the same id (before a
            // restart, or a recycled id) carry small generations; start far from them.
            None => self.fresh_generation(),
        };
        if previous == Some(info) {
            return Ok(());
        }
        // A new holder of an id starts with no flows: whatever CONNTRACK or FRAGMENTS still hold
        // under it (an endpoint removed without its flows, an agent stopped half-way) is not its
        // own. Purged before the entry exists, while the programs cannot make new ones for it.
        if previous.is_none_or(|p| p.id != info.id) && !self.id_in_use(info.id, ifindex) {
            self.forget_flows(info.id)?;
        }
        self.write_endpoint(ifindex, info)?;
        if let Some(p) = previous
            && p.id != info.id
            && !self.id_in_use(p.id, ifindex)
        {
            self.remove_by_id(p.id)?;
            self.forget_flows(p.id)?;
        }
        Ok(())
    }

    /// Removes the endpoint behind host veth `ifindex` (detach its veth first). When no other
    /// interface carries its id, the id's ENDPOINTS_BY_ID entry goes, and with it every
    /// CONNTRACK and FRAGMENTS entry made under the id ([`Dataplane::forget_flows`]): a later
    /// endpoint with the same id or address inherits no established flow.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        // Before ENDPOINTS: the programs read the slot first.
        self.slots.clear(ifindex);
        let map = map_names::ENDPOINTS;
        let mut endpoints: HashMap<&mut MapData, u32, EndpointInfo> =
            typed_map_mut(&mut self.ebpf, map)?;
        remove_result(
            map,
            format!("ifindex {ifindex}"),
            endpoints.remove(&ifindex),
        )?;
        if let Some(previous) = self.shadow.endpoints.remove(&ifindex)
            && !self.id_in_use(previous.id, ifindex)
        {
            self.remove_by_id(previous.id)?;
            self.forget_flows(previous.id)?;
        }
        Ok(())
    }

    /// Deletes the CONNTRACK and FRAGMENTS entries of endpoint `id` (both keyed by it, see
    /// [`CtKey::endpoint`] and [`FragKey::endpoint`]); returns how many went. A walk of both
    /// maps: one syscall per entry. Call it once the id has no ENDPOINTS / ENDPOINTS_BY_ID entry
    /// (or before it gets one), so the programs cannot add entries for it meanwhile.
    pub fn forget_flows(&mut self, id: u32) -> Result<usize, DataplaneError> {
        let flows =
            self.remove_where::<CtKey, CtValue>(map_names::CONNTRACK, |k| k.endpoint == id)?;
        let fragments =
            self.remove_where::<FragKey, FragValue>(map_names::FRAGMENTS, |k| k.endpoint == id)?;
        Ok(flows + fragments)
    }

    /// Removes the keys of hash map `map` that match `doomed` (collected first: deleting under
    /// a key walk would restart it).
    fn remove_where<K: Pod + std::fmt::Debug, V: Pod>(
        &mut self,
        map: &'static str,
        doomed: impl Fn(&K) -> bool,
    ) -> Result<usize, DataplaneError> {
        let mut entries: HashMap<&mut MapData, K, V> = typed_map_mut(&mut self.ebpf, map)?;
        let keys = entries
            .keys()
            .collect::<Result<Vec<K>, MapError>>()
            .map_err(|source| DataplaneError::Map {
                map,
                source: Box::new(source),
            })?;
        let keys: Vec<K> = keys.into_iter().filter(|k| doomed(k)).collect();
        for key in &keys {
            remove_result(map, format!("{key:?}"), entries.remove(key))?;
        }
        Ok(keys.len())
    }

    fn fresh_generation(&self) -> u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(1);
        nanos | 1
    }

    fn id_in_use(&self, id: u32, except_ifindex: u32) -> bool {
        self.shadow
            .endpoints
            .iter()
            .any(|(ifindex, info)| *ifindex != except_ifindex && info.id == id)
    }

    fn write_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), DataplaneError> {
        let by_id = map_names::ENDPOINTS_BY_ID;
        let mut ids: HashMap<&mut MapData, u32, EndpointInfo> =
            typed_map_mut(&mut self.ebpf, by_id)?;
        ids.insert(info.id, info, 0).map_err(|source| {
            update_error(
                by_id,
                format!("id {}", info.id),
                capacity::ENDPOINTS,
                source,
            )
        })?;
        let map = map_names::ENDPOINTS;
        let mut endpoints: HashMap<&mut MapData, u32, EndpointInfo> =
            typed_map_mut(&mut self.ebpf, map)?;
        endpoints.insert(ifindex, info, 0).map_err(|source| {
            update_error(
                map,
                format!("ifindex {ifindex}"),
                capacity::ENDPOINTS,
                source,
            )
        })?;
        // After ENDPOINTS: the slot never holds what ENDPOINTS does not.
        self.slots.store(ifindex, &info);
        self.shadow.endpoints.insert(ifindex, info);
        Ok(())
    }

    fn remove_by_id(&mut self, id: u32) -> Result<(), DataplaneError> {
        let map = map_names::ENDPOINTS_BY_ID;
        let mut ids: HashMap<&mut MapData, u32, EndpointInfo> = typed_map_mut(&mut self.ebpf, map)?;
        remove_result(map, format!("id {id}"), ids.remove(&id))
    }

    /// Moves the generation of the given endpoint ids on (all endpoints when `ids` is `None`).
    fn bump_generations(&mut self, ids: Option<&BTreeSet<u32>>) -> Result<usize, DataplaneError> {
        let targets: Vec<(u32, EndpointInfo)> = self
            .shadow
            .endpoints
            .iter()
            .filter(|(_, info)| ids.is_none_or(|ids| ids.contains(&info.id)))
            .map(|(ifindex, info)| (*ifindex, *info))
            .collect();
        for (ifindex, mut info) in targets.iter().copied() {
            info.generation = info.generation.wrapping_add(1);
            self.write_endpoint(ifindex, info)?;
        }
        Ok(targets.len())
    }

    /// Applies a compiler diff to IPCACHE, POLICY and SERVICES (see the module documentation for
    /// the order). Endpoint entries in the diff are ignored: the agent writes those with
    /// [`Dataplane::upsert_endpoint`]. On error the maps hold a prefix of the writes (every
    /// write already done is safe on its own); the agent should mark the affected endpoints
    /// NOT_PROGRAMMED and retry.
    pub fn apply(&mut self, diff: &MapDiff) -> Result<ApplyReport, DataplaneError> {
        let mut report = ApplyReport::default();
        let mut bump_all = false;
        let mut bump: BTreeSet<u32> = BTreeSet::new();

        for addr in &diff.services_add {
            if self.shadow.services.contains(addr) {
                report.unchanged += 1;
                continue;
            }
            self.write_service(*addr)?;
            report.upserted += 1;
            bump_all = true;
        }
        for (net, pair) in &diff.ipcache_v4_upsert {
            match self.shadow.ipcache_v4.get(net) {
                Some(old) if old == pair => report.unchanged += 1,
                old => {
                    bump_all |= old.is_some();
                    self.write_ipcache_v4(*net, *pair)?;
                    report.upserted += 1;
                }
            }
        }
        for (net, pair) in &diff.ipcache_v6_upsert {
            match self.shadow.ipcache_v6.get(net) {
                Some(old) if old == pair => report.unchanged += 1,
                old => {
                    bump_all |= old.is_some();
                    self.write_ipcache_v6(*net, *pair)?;
                    report.upserted += 1;
                }
            }
        }
        // Allow entries are added (whole groups rewritten) before any is taken away.
        let mut touched: BTreeSet<PolicyGroupKey> = self.shadow.dirty_groups.clone();
        for (key, value) in &diff.policy_upsert {
            if self.shadow.policy.get(key) == Some(value) {
                report.unchanged += 1;
                continue;
            }
            self.shadow.insert_policy(*key, *value);
            touched.insert(group_of(key));
            report.upserted += 1;
        }
        self.write_groups(touched)?;
        let mut touched = BTreeSet::new();
        for key in &diff.policy_remove {
            if self.shadow.remove_policy(key) {
                touched.insert(group_of(key));
                bump.insert(key.endpoint);
                report.removed += 1;
            }
        }
        self.write_groups(touched)?;
        for net in &diff.ipcache_v4_remove {
            if self.shadow.ipcache_v4.contains_key(net) {
                self.remove_ipcache_v4(net)?;
                bump_all = true;
                report.removed += 1;
            }
        }
        for net in &diff.ipcache_v6_remove {
            if self.shadow.ipcache_v6.contains_key(net) {
                self.remove_ipcache_v6(net)?;
                bump_all = true;
                report.removed += 1;
            }
        }
        for addr in &diff.services_remove {
            if self.shadow.services.contains(addr) {
                self.remove_service(*addr)?;
                bump_all = true;
                report.removed += 1;
            }
        }
        report.endpoints_bumped = if bump_all {
            self.bump_generations(None)?
        } else if !bump.is_empty() {
            self.bump_generations(Some(&bump))?
        } else {
            0
        };
        Ok(report)
    }

    /// IPCACHE, POLICY and SERVICES as the writer knows them: what it wrote, or after a restart
    /// what it read back from the pinned maps. `endpoints` and `rules` are left empty (the maps
    /// do not hold pod names or rule origins).
    pub fn current(&self) -> NodeMaps {
        NodeMaps {
            ipcache_v4: self.shadow.ipcache_v4.clone(),
            ipcache_v6: self.shadow.ipcache_v6.clone(),
            policy: self.shadow.policy.clone(),
            services: self.shadow.services.clone(),
            ..NodeMaps::default()
        }
    }

    /// Makes IPCACHE, POLICY and SERVICES equal to `desired` (what a restarted agent calls
    /// once, since the pinned maps hold whatever the previous agent left). Only differences are
    /// written, in [`Dataplane::apply`]'s order.
    pub fn sync(&mut self, desired: &NodeMaps) -> Result<ApplyReport, DataplaneError> {
        let diff = MapDiff {
            endpoints_upsert: BTreeMap::new(),
            endpoints_remove: BTreeSet::new(),
            ipcache_v4_upsert: desired.ipcache_v4.clone(),
            ipcache_v4_remove: removed_keys(&self.shadow.ipcache_v4, &desired.ipcache_v4),
            ipcache_v6_upsert: desired.ipcache_v6.clone(),
            ipcache_v6_remove: removed_keys(&self.shadow.ipcache_v6, &desired.ipcache_v6),
            policy_upsert: desired.policy.clone(),
            policy_remove: removed_keys(&self.shadow.policy, &desired.policy),
            services_add: desired.services.clone(),
            services_remove: self
                .shadow
                .services
                .difference(&desired.services)
                .copied()
                .collect(),
            ..MapDiff::default()
        };
        self.apply(&diff)
    }

    fn write_service(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        let map = map_names::SERVICES;
        let mut services: HashMap<&mut MapData, ServiceKey, u32> =
            typed_map_mut(&mut self.ebpf, map)?;
        services
            .insert(service_key(addr), 0, 0)
            .map_err(|source| update_error(map, addr.to_string(), capacity::SERVICES, source))?;
        self.shadow.services.insert(addr);
        Ok(())
    }

    fn remove_service(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        let map = map_names::SERVICES;
        let mut services: HashMap<&mut MapData, ServiceKey, u32> =
            typed_map_mut(&mut self.ebpf, map)?;
        remove_result(map, addr.to_string(), services.remove(&service_key(addr)))?;
        self.shadow.services.remove(&addr);
        Ok(())
    }

    fn write_ipcache_v4(
        &mut self,
        net: Ipv4Network,
        pair: IdentityPair,
    ) -> Result<(), DataplaneError> {
        if net.prefix() == 32 {
            self.write_ipcache_exact(IpAddr::V4(net.ip()), pair)?;
        } else {
            let map = map_names::IPCACHE_V4;
            let mut trie: LpmTrie<&mut MapData, [u8; 4], IdentityPair> =
                typed_map_mut(&mut self.ebpf, map)?;
            let key = Key::new(net.prefix() as u32, net.network().octets());
            trie.insert(&key, pair, 0).map_err(|source| {
                update_error(map, net.to_string(), capacity::IPCACHE_V4, source)
            })?;
        }
        self.shadow.ipcache_v4.insert(net, pair);
        Ok(())
    }

    fn remove_ipcache_v4(&mut self, net: &Ipv4Network) -> Result<(), DataplaneError> {
        if net.prefix() == 32 {
            self.remove_ipcache_exact(IpAddr::V4(net.ip()))?;
        } else {
            let map = map_names::IPCACHE_V4;
            let mut trie: LpmTrie<&mut MapData, [u8; 4], IdentityPair> =
                typed_map_mut(&mut self.ebpf, map)?;
            let key = Key::new(net.prefix() as u32, net.network().octets());
            remove_result(map, net.to_string(), trie.remove(&key))?;
        }
        self.shadow.ipcache_v4.remove(net);
        Ok(())
    }

    fn write_ipcache_v6(
        &mut self,
        net: Ipv6Network,
        pair: IdentityPair,
    ) -> Result<(), DataplaneError> {
        if net.prefix() == 128 {
            self.write_ipcache_exact(IpAddr::V6(net.ip()), pair)?;
        } else {
            let map = map_names::IPCACHE_V6;
            let mut trie: LpmTrie<&mut MapData, [u8; 16], IdentityPair> =
                typed_map_mut(&mut self.ebpf, map)?;
            let key = Key::new(net.prefix() as u32, net.network().octets());
            trie.insert(&key, pair, 0).map_err(|source| {
                update_error(map, net.to_string(), capacity::IPCACHE_V6, source)
            })?;
        }
        self.shadow.ipcache_v6.insert(net, pair);
        Ok(())
    }

    fn remove_ipcache_v6(&mut self, net: &Ipv6Network) -> Result<(), DataplaneError> {
        if net.prefix() == 128 {
            self.remove_ipcache_exact(IpAddr::V6(net.ip()))?;
        } else {
            let map = map_names::IPCACHE_V6;
            let mut trie: LpmTrie<&mut MapData, [u8; 16], IdentityPair> =
                typed_map_mut(&mut self.ebpf, map)?;
            let key = Key::new(net.prefix() as u32, net.network().octets());
            remove_result(map, net.to_string(), trie.remove(&key))?;
        }
        self.shadow.ipcache_v6.remove(net);
        Ok(())
    }

    /// /32 and /128 entries live in IPCACHE_EXACT (see `policy-ebpf/src/policy.rs`).
    fn write_ipcache_exact(
        &mut self,
        ip: IpAddr,
        pair: IdentityPair,
    ) -> Result<(), DataplaneError> {
        let map = map_names::IPCACHE_EXACT;
        let mut exact: HashMap<&mut MapData, Addr, IdentityPair> =
            typed_map_mut(&mut self.ebpf, map)?;
        exact
            .insert(addr_of(ip), pair, 0)
            .map_err(|source| update_error(map, ip.to_string(), capacity::IPCACHE_EXACT, source))
    }

    fn remove_ipcache_exact(&mut self, ip: IpAddr) -> Result<(), DataplaneError> {
        let map = map_names::IPCACHE_EXACT;
        let mut exact: HashMap<&mut MapData, Addr, IdentityPair> =
            typed_map_mut(&mut self.ebpf, map)?;
        remove_result(map, ip.to_string(), exact.remove(&addr_of(ip)))
    }

    /// Rewrites POLICY groups from the shadow. A group that cannot be written stays dirty and
    /// is retried by the next `apply`.
    fn write_groups(&mut self, groups: BTreeSet<PolicyGroupKey>) -> Result<(), DataplaneError> {
        self.shadow.dirty_groups.extend(groups.iter().copied());
        for group in groups {
            self.write_group(&group)?;
            self.shadow.dirty_groups.remove(&group);
        }
        Ok(())
    }

    /// Writes one group's chunks so that readers never follow `more` to a missing chunk: new
    /// chunks last-to-first, then surplus chunks deleted after the chunk before them says
    /// `more = 0`.
    fn write_group(&mut self, group: &PolicyGroupKey) -> Result<(), DataplaneError> {
        let map = map_names::POLICY;
        let ranges = self.shadow.group_ranges(group);
        let values = chunks(&ranges).ok_or_else(|| DataplaneError::MapFull {
            map,
            key: format!(
                "{} ({} port ranges, at most {})",
                describe_group(group),
                ranges.len(),
                POLICY_MAX_RANGES
            ),
            capacity: capacity::POLICY,
        })?;
        let old = self.shadow.group_chunks.get(group).copied().unwrap_or(0);
        let mut policy: HashMap<&mut MapData, PolicyGroupKey, PortRanges> =
            typed_map_mut(&mut self.ebpf, map)?;
        for (chunk, value) in values.iter().enumerate().rev() {
            let key = chunk_key(group, chunk as u8);
            policy.insert(key, value, 0).map_err(|source| {
                update_error(map, describe_group(&key), capacity::POLICY, source)
            })?;
        }
        for chunk in values.len() as u8..old {
            let key = chunk_key(group, chunk);
            remove_result(map, describe_group(&key), policy.remove(&key))?;
        }
        if values.is_empty() {
            self.shadow.group_chunks.remove(group);
        } else {
            self.shadow.group_chunks.insert(*group, values.len() as u8);
        }
        Ok(())
    }
}

fn removed_keys<K: Ord + Clone, V>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> BTreeSet<K> {
    current
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect()
}
