//! Keeps the kernel's numbers (endpoint ids, pod and CIDR identities) stable across agent
//! restarts.
//!
//! The compiler numbers endpoints and identities in the order it meets them, so a restarted
//! agent's fresh compiler may number the same cluster differently from the one that wrote the
//! pinned maps. Swapping numbers in place is not safe: conntrack entries are keyed by endpoint
//! id (established connections would lose their state), and while old and new entries coexist
//! an identity number meaning "frontend" in one and "backend" in the other could admit a denied
//! flow. So the agent translates the compiler's numbers into the kernel's:
//!
//! - at the first sync after a start, every number the compiler gives to something the adopted
//!   maps already know (the endpoint behind a host veth; the identity of a pod address or an
//!   ipBlock prefix in IPCACHE) is mapped to the number the kernel already uses for it;
//! - every other number gets a kernel number that the adopted maps do not use (until those stale
//!   entries are gone), preferring the compiler's own;
//! - the mapping lives as long as the compiler number is in use.
//!
//! Reserved identities (below [`identity::POD_MIN`]) and rule references pass through unchanged.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnetwork::{Ipv4Network, Ipv6Network};
use policy_common::{EndpointInfo, IdentityPair, capacity, identity};

use crate::{
    compiler::output::{EndpointEntry, NodeMaps, PolicyEntryKey},
    model::ObjectKey,
};

/// One number space: compiler number → kernel number.
#[derive(Debug)]
struct Space {
    min: u32,
    max: u32,
    to_kernel: HashMap<u32, u32>,
    to_compiler: HashMap<u32, u32>,
    /// Kernel numbers present in adopted maps and not (yet) claimed by a mapping.
    reserved: BTreeSet<u32>,
    next: u32,
}

impl Space {
    fn new(min: u32, max: u32) -> Self {
        Self {
            min,
            max,
            to_kernel: HashMap::new(),
            to_compiler: HashMap::new(),
            reserved: BTreeSet::new(),
            next: min,
        }
    }

    fn contains(&self, n: u32) -> bool {
        (self.min..=self.max).contains(&n)
    }

    fn free(&self, k: u32) -> bool {
        !self.to_compiler.contains_key(&k) && !self.reserved.contains(&k)
    }

    /// Adopts `compiler → kernel` unless either side is already mapped.
    fn seed(&mut self, compiler: u32, kernel: u32) {
        if !self.contains(compiler)
            || !self.contains(kernel)
            || self.to_kernel.contains_key(&compiler)
            || self.to_compiler.contains_key(&kernel)
        {
            return;
        }
        self.reserved.remove(&kernel);
        self.to_kernel.insert(compiler, kernel);
        self.to_compiler.insert(kernel, compiler);
    }

    /// The kernel number of compiler number `c`, allocating one if needed.
    fn map(&mut self, c: u32) -> u32 {
        if !self.contains(c) {
            return c;
        }
        if let Some(k) = self.to_kernel.get(&c) {
            return *k;
        }
        let k = if self.free(c) {
            c
        } else {
            let span = u64::from(self.max - self.min) + 1;
            let mut k = self.next;
            let mut tries = 0u64;
            while !self.free(k) && tries < span {
                k = if k >= self.max { self.min } else { k + 1 };
                tries += 1;
            }
            // Every number taken: the compiler cannot have handed out more numbers than exist,
            // so this only happens with reserved numbers still around; reuse `c`.
            if tries == span { c } else { k }
        };
        self.next = if k >= self.max { self.min } else { k + 1 };
        self.to_kernel.insert(c, k);
        self.to_compiler.insert(k, c);
        k
    }

    /// Forgets mappings of compiler numbers not in `used`.
    fn retain(&mut self, used: &BTreeSet<u32>) {
        let to_compiler = &mut self.to_compiler;
        self.to_kernel.retain(|c, k| {
            let keep = used.contains(c);
            if !keep {
                to_compiler.remove(k);
            }
            keep
        });
    }
}

/// What the pinned maps held when the agent started (read back by the dataplane).
#[derive(Debug, Default)]
pub struct Adopted {
    /// Host veth ifindex → endpoint, from ENDPOINTS.
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ipcache_v4: BTreeMap<Ipv4Network, IdentityPair>,
    pub ipcache_v6: BTreeMap<Ipv6Network, IdentityPair>,
    /// Identities used in POLICY keys.
    pub policy_identities: BTreeSet<u32>,
}

/// Compiler numbers → kernel numbers; see the module documentation.
#[derive(Debug)]
pub struct Numbering {
    endpoints: Space,
    pods: Space,
    cidrs: Space,
}

impl Default for Numbering {
    fn default() -> Self {
        Self::new()
    }
}

impl Numbering {
    pub fn new() -> Self {
        Self {
            endpoints: Space::new(1, capacity::ENDPOINTS - 1),
            pods: Space::new(identity::POD_MIN, identity::CIDR_MIN - 1),
            cidrs: Space::new(identity::CIDR_MIN, u32::MAX),
        }
    }

    fn space(&mut self, id: u32) -> Option<&mut Space> {
        if self.pods.contains(id) {
            Some(&mut self.pods)
        } else if self.cidrs.contains(id) {
            Some(&mut self.cidrs)
        } else {
            None
        }
    }

    fn identity(&mut self, id: u32) -> u32 {
        match self.space(id) {
            Some(space) => space.map(id),
            None => id,
        }
    }

    fn seed_identity(&mut self, compiler: u32, kernel: u32) {
        // Only within one class: a pod identity never maps onto a CIDR identity.
        if self.pods.contains(compiler) && self.pods.contains(kernel) {
            self.pods.seed(compiler, kernel);
        } else if self.cidrs.contains(compiler) && self.cidrs.contains(kernel) {
            self.cidrs.seed(compiler, kernel);
        }
    }

    /// Seeds the mapping from the maps a previous agent left, given the first compilation and
    /// the host interface (ifindex) of each local pod. Call once, before the first
    /// [`Numbering::translate`].
    pub fn adopt(
        &mut self,
        adopted: &Adopted,
        maps: &NodeMaps,
        ifindex_of: &BTreeMap<ObjectKey, u32>,
    ) {
        for info in adopted.endpoints.values() {
            self.endpoints.reserved.insert(info.id);
            self.reserve_identity(info.identity);
        }
        for pair in adopted
            .ipcache_v4
            .values()
            .chain(adopted.ipcache_v6.values())
        {
            self.reserve_identity(pair.identity);
            self.reserve_identity(pair.cidr_identity);
        }
        for id in &adopted.policy_identities {
            self.reserve_identity(*id);
        }
        for (pod, entry) in &maps.endpoints {
            if let Some(old) = ifindex_of.get(pod).and_then(|i| adopted.endpoints.get(i)) {
                self.endpoints.seed(entry.id, old.id);
                self.seed_identity(entry.identity, old.identity);
            }
        }
        let pairs = maps
            .ipcache_v4
            .iter()
            .filter_map(|(net, pair)| adopted.ipcache_v4.get(net).map(|old| (pair, old)))
            .chain(
                maps.ipcache_v6
                    .iter()
                    .filter_map(|(net, pair)| adopted.ipcache_v6.get(net).map(|old| (pair, old))),
            );
        for (new, old) in pairs {
            self.seed_identity(new.identity, old.identity);
            self.seed_identity(new.cidr_identity, old.cidr_identity);
        }
    }

    fn reserve_identity(&mut self, id: u32) {
        if let Some(space) = self.space(id) {
            space.reserved.insert(id);
        }
    }

    /// Once the stale entries of the adopted maps are gone, their numbers are free again.
    pub fn release_reserved(&mut self) {
        self.endpoints.reserved.clear();
        self.pods.reserved.clear();
        self.cidrs.reserved.clear();
    }

    /// The compiler's maps in kernel numbers.
    pub fn translate(&mut self, maps: &NodeMaps) -> NodeMaps {
        let mut used_endpoints = BTreeSet::new();
        let mut used_identities = BTreeSet::new();
        let mut out = NodeMaps {
            services: maps.services.clone(),
            rules: maps.rules.clone(),
            ..Default::default()
        };
        for (pod, e) in &maps.endpoints {
            used_endpoints.insert(e.id);
            used_identities.insert(e.identity);
            out.endpoints.insert(
                pod.clone(),
                EndpointEntry {
                    id: self.endpoints.map(e.id),
                    identity: self.identity(e.identity),
                    ..e.clone()
                },
            );
        }
        let mut pair = |p: &IdentityPair, used: &mut BTreeSet<u32>| {
            used.insert(p.identity);
            used.insert(p.cidr_identity);
            IdentityPair {
                identity: self.identity(p.identity),
                cidr_identity: self.identity(p.cidr_identity),
            }
        };
        for (net, p) in &maps.ipcache_v4 {
            out.ipcache_v4.insert(*net, pair(p, &mut used_identities));
        }
        for (net, p) in &maps.ipcache_v6 {
            out.ipcache_v6.insert(*net, pair(p, &mut used_identities));
        }
        for (k, v) in &maps.policy {
            used_endpoints.insert(k.endpoint);
            used_identities.insert(k.identity);
            let key = PolicyEntryKey {
                endpoint: self.endpoints.map(k.endpoint),
                identity: self.identity(k.identity),
                ..*k
            };
            out.policy.insert(key, *v);
        }
        self.endpoints.retain(&used_endpoints);
        self.pods.retain(&used_identities);
        self.cidrs.retain(&used_identities);
        out
    }

    /// The compiler's number for kernel endpoint id `k` (for naming flows).
    pub fn compiler_endpoint(&self, k: u32) -> u32 {
        self.endpoints.to_compiler.get(&k).copied().unwrap_or(k)
    }

    /// The compiler's number for kernel identity `k` (for naming flows).
    pub fn compiler_identity(&self, k: u32) -> u32 {
        [&self.pods, &self.cidrs]
            .iter()
            .find_map(|s| s.to_compiler.get(&k).copied())
            .unwrap_or(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_common::{Direction, PolicyValue, proto};

    fn endpoint(id: u32, identity: u32, ip: &str) -> EndpointEntry {
        EndpointEntry {
            id,
            flags: 1,
            identity,
            addresses: vec![ip.parse().unwrap()],
        }
    }

    fn maps(eps: &[(&str, u32, u32, &str)], peers: &[(&str, u32)]) -> NodeMaps {
        let mut m = NodeMaps::default();
        for (name, id, identity, ip) in eps {
            m.endpoints
                .insert(ObjectKey::new("ns", *name), endpoint(*id, *identity, ip));
            m.ipcache_v4.insert(
                format!("{ip}/32").parse().unwrap(),
                IdentityPair {
                    identity: *identity,
                    cidr_identity: 0,
                },
            );
        }
        for (ip, identity) in peers {
            m.ipcache_v4.insert(
                format!("{ip}/32").parse().unwrap(),
                IdentityPair {
                    identity: *identity,
                    cidr_identity: 0,
                },
            );
        }
        for (_, id, _, _) in eps {
            for (_, peer) in peers {
                m.policy.insert(
                    PolicyEntryKey {
                        endpoint: *id,
                        identity: *peer,
                        direction: Direction::Ingress,
                        protocol: proto::TCP,
                        first: 80,
                        last: 80,
                    },
                    PolicyValue { rule: 1, flags: 0 },
                );
            }
        }
        m
    }

    #[test]
    fn fresh_start_keeps_compiler_numbers() {
        let mut n = Numbering::new();
        let m = maps(&[("a", 1, 256, "10.0.0.1")], &[("10.0.0.2", 257)]);
        assert_eq!(n.translate(&m), m);
    }

    #[test]
    fn restart_adopts_kernel_numbers() {
        // The previous agent numbered endpoint a as 7 with identity 300, peer b as 301.
        let old = maps(&[("a", 7, 300, "10.0.0.1")], &[("10.0.0.2", 301)]);
        let adopted = Adopted {
            endpoints: BTreeMap::from([(
                42,
                EndpointInfo {
                    id: 7,
                    flags: 1,
                    generation: 9,
                    identity: 300,
                },
            )]),
            ipcache_v4: old.ipcache_v4.clone(),
            ipcache_v6: BTreeMap::new(),
            policy_identities: BTreeSet::from([301]),
        };
        // The fresh compiler numbers them 1 / 256 / 257, and has a new pod c with 258 and a new
        // peer identity 300 that must not take the kernel's 300 (still meaning a's identity).
        let fresh = maps(
            &[("a", 1, 256, "10.0.0.1"), ("c", 2, 258, "10.0.0.3")],
            &[("10.0.0.2", 257), ("10.0.0.4", 300)],
        );
        let mut n = Numbering::new();
        n.adopt(
            &adopted,
            &fresh,
            &BTreeMap::from([(ObjectKey::new("ns", "a"), 42)]),
        );
        let t = n.translate(&fresh);
        let a = &t.endpoints[&ObjectKey::new("ns", "a")];
        assert_eq!((a.id, a.identity), (7, 300));
        let ip = |s: &str| -> Ipv4Network { format!("{s}/32").parse().unwrap() };
        assert_eq!(t.ipcache_v4[&ip("10.0.0.2")].identity, 301);
        let c = &t.endpoints[&ObjectKey::new("ns", "c")];
        assert_eq!(c.id, 2, "a free compiler number is kept");
        let new_peer = t.ipcache_v4[&ip("10.0.0.4")].identity;
        assert!(
            ![300, 301].contains(&new_peer) && new_peer >= identity::POD_MIN,
            "a new identity avoids numbers the adopted maps use: {new_peer}"
        );
        // Policy keys follow.
        assert!(
            t.policy
                .keys()
                .any(|k| (k.endpoint, k.identity, k.first) == (7, 301, 80))
        );
        // Stable on the next translation too.
        assert_eq!(n.translate(&fresh), t);
        assert_eq!(n.compiler_endpoint(7), 1);
        assert_eq!(n.compiler_identity(301), 257);
    }

    #[test]
    fn unused_mappings_are_forgotten() {
        let mut n = Numbering::new();
        n.endpoints.reserved.insert(1);
        let m = maps(&[("a", 1, 256, "10.0.0.1")], &[]);
        let t = n.translate(&m);
        let k = t.endpoints[&ObjectKey::new("ns", "a")].id;
        assert_ne!(k, 1);
        n.translate(&NodeMaps::default());
        n.release_reserved();
        assert_eq!(n.translate(&m).endpoints[&ObjectKey::new("ns", "a")].id, 1);
    }
}
