//! Peer selectors → the pod identities they match, cached across compilations and kept current
//! as identities come and go.

use std::collections::HashMap;
use std::sync::Arc;

use super::alloc::Interner;
use super::identities::PodIdentityKey;
use super::policy::{NsScope, PeerSelector};
use crate::model::{Labels, Protocol};

/// Pod identities matched by each peer selector in use, kept current as identities come and go.
#[derive(Debug, Default)]
pub(super) struct SelectorCache {
    entries: HashMap<Arc<PeerSelector>, SelectorEntry>,
}

#[derive(Debug)]
struct SelectorEntry {
    /// Sorted.
    ids: Vec<u32>,
    used: bool,
}

pub(super) fn selector_matches(sel: &PeerSelector, key: &PodIdentityKey) -> bool {
    let ns_ok = match &sel.namespaces {
        NsScope::Own(ns) => key.namespace() == ns,
        NsScope::Matching(s) => s.matches(&key.namespace_labels),
    };
    ns_ok && sel.pods.matches(&key.labels)
}

/// The live pod identities of one namespace, with the namespace's labels.
pub(super) type NamespaceIdentities<'a> = (&'a Labels, Vec<(u32, &'a PodIdentityKey)>);

/// Live pod identities grouped by namespace.
pub(super) struct IdentityUniverse<'a> {
    pub(super) by_namespace: HashMap<&'a str, NamespaceIdentities<'a>>,
}

impl SelectorCache {
    pub(super) fn begin(&mut self) {
        for e in self.entries.values_mut() {
            e.used = false;
        }
    }

    /// Applies identity churn to every cached result.
    pub(super) fn update(&mut self, removed: &[u32], added: &[(u32, &PodIdentityKey)]) {
        if removed.is_empty() && added.is_empty() {
            return;
        }
        for (sel, e) in &mut self.entries {
            if !removed.is_empty() {
                e.ids.retain(|id| removed.binary_search(id).is_err());
            }
            let before = e.ids.len();
            e.ids.extend(
                added
                    .iter()
                    .filter(|(_, k)| selector_matches(sel, k))
                    .map(|(id, _)| *id),
            );
            if e.ids.len() != before {
                e.ids.sort_unstable();
            }
        }
    }

    pub(super) fn resolve(
        &mut self,
        sel: &Arc<PeerSelector>,
        universe: &IdentityUniverse<'_>,
    ) -> &[u32] {
        let entry = self.entries.entry(sel.clone()).or_insert_with(|| {
            let mut ids = Vec::new();
            let mut scan = |idents: &[(u32, &PodIdentityKey)]| {
                ids.extend(
                    idents
                        .iter()
                        .filter(|(_, k)| sel.pods.matches(&k.labels))
                        .map(|(id, _)| *id),
                );
            };
            match &sel.namespaces {
                NsScope::Own(ns) => {
                    if let Some((_, idents)) = universe.by_namespace.get(ns.as_str()) {
                        scan(idents);
                    }
                }
                NsScope::Matching(nsel) => {
                    for (labels, idents) in universe.by_namespace.values() {
                        if nsel.matches(labels) {
                            scan(idents);
                        }
                    }
                }
            }
            ids.sort_unstable();
            SelectorEntry { ids, used: false }
        });
        entry.used = true;
        &entry.ids
    }

    pub(super) fn evict_unused(&mut self) {
        self.entries.retain(|_, e| e.used);
    }
}

pub(super) fn universe(pod_ids: &Interner<Arc<PodIdentityKey>>) -> IdentityUniverse<'_> {
    let mut by_namespace: HashMap<&str, NamespaceIdentities<'_>> = HashMap::new();
    for (id, key) in pod_ids.iter() {
        by_namespace
            .entry(key.namespace())
            .or_insert_with(|| (&key.namespace_labels, Vec::new()))
            .1
            .push((id, key));
    }
    IdentityUniverse { by_namespace }
}

pub(super) fn named_index(
    pod_ids: &Interner<Arc<PodIdentityKey>>,
) -> HashMap<(&str, Protocol), Vec<(u32, u16)>> {
    let mut out: HashMap<(&str, Protocol), Vec<(u32, u16)>> = HashMap::new();
    for (id, key) in pod_ids.iter() {
        for p in &key.named_ports {
            out.entry((p.name.as_str(), p.protocol))
                .or_default()
                .push((id, p.port));
        }
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}
