//! Stable numeric ids for interned keys (identities, endpoints, rule references).
//!
//! Each compilation marks the keys it uses; [`Interner::sweep`] then releases the others. An id
//! therefore stays the same for as long as its key is in use, and a released id goes to the back
//! of a FIFO free list, so it is reused as late as possible.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

#[derive(Debug)]
pub struct Interner<K> {
    ids: HashMap<K, u32>,
    slots: HashMap<u32, Slot<K>>,
    free: VecDeque<u32>,
    next: u64,
    max: u64,
    epoch: u64,
    added: Vec<u32>,
}

#[derive(Debug)]
struct Slot<K> {
    key: K,
    epoch: u64,
}

impl<K: Clone + Eq + Hash> Interner<K> {
    /// Ids are drawn from `min..=max`.
    pub fn new(min: u32, max: u32) -> Self {
        Self {
            ids: HashMap::new(),
            slots: HashMap::new(),
            free: VecDeque::new(),
            next: u64::from(min),
            max: u64::from(max),
            epoch: 1,
            added: Vec::new(),
        }
    }

    /// Starts a compilation: nothing is marked in use.
    pub fn begin(&mut self) {
        self.epoch += 1;
        self.added.clear();
    }

    /// The id of `key`, allocating one if needed, and marks it in use. `None` when every id is
    /// taken.
    pub fn intern(&mut self, key: &K) -> Option<u32> {
        if let Some(&id) = self.ids.get(key) {
            self.mark_id(id);
            return Some(id);
        }
        let id = if self.next <= self.max {
            self.next += 1;
            (self.next - 1) as u32
        } else {
            self.free.pop_front()?
        };
        self.ids.insert(key.clone(), id);
        self.slots.insert(
            id,
            Slot {
                key: key.clone(),
                epoch: self.epoch,
            },
        );
        self.added.push(id);
        Some(id)
    }

    /// Marks an allocated id in use; false if it is not allocated.
    pub fn mark_id(&mut self, id: u32) -> bool {
        match self.slots.get_mut(&id) {
            Some(slot) => {
                slot.epoch = self.epoch;
                true
            }
            None => false,
        }
    }

    pub fn get(&self, key: &K) -> Option<u32> {
        self.ids.get(key).copied()
    }

    pub fn key(&self, id: u32) -> Option<&K> {
        self.slots.get(&id).map(|s| &s.key)
    }

    /// Ids allocated since [`Interner::begin`].
    pub fn added(&self) -> &[u32] {
        &self.added
    }

    /// Releases every key not marked since [`Interner::begin`]; returns their ids.
    pub fn sweep(&mut self) -> Vec<u32> {
        let epoch = self.epoch;
        let mut removed = Vec::new();
        self.slots.retain(|id, slot| {
            let keep = slot.epoch == epoch;
            if !keep {
                removed.push((*id, slot.key.clone()));
            }
            keep
        });
        removed.sort_unstable_by_key(|(id, _)| *id);
        for (id, key) in &removed {
            self.ids.remove(key);
            self.free.push_back(*id);
        }
        removed.into_iter().map(|(id, _)| id).collect()
    }

    /// Every (id, key) in use.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &K)> {
        self.slots.iter().map(|(id, s)| (*id, &s.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_while_used_and_reused_fifo() {
        let mut i: Interner<&str> = Interner::new(1, 3);
        i.begin();
        assert_eq!(i.intern(&"a"), Some(1));
        assert_eq!(i.intern(&"b"), Some(2));
        assert_eq!(i.intern(&"c"), Some(3));
        assert_eq!(i.intern(&"d"), None, "range exhausted");
        assert_eq!(i.sweep(), Vec::<u32>::new());
        i.begin();
        assert_eq!(i.intern(&"c"), Some(3));
        assert_eq!(i.intern(&"a"), Some(1));
        assert_eq!(i.sweep(), vec![2]);
        i.begin();
        assert!(i.mark_id(1));
        assert_eq!(i.sweep(), vec![3]);
        i.begin();
        i.mark_id(1);
        assert!(!i.mark_id(3));
        // 2 was freed before 3.
        assert_eq!(i.intern(&"e"), Some(2));
        assert_eq!(i.intern(&"f"), Some(3));
        assert_eq!(i.added(), &[2, 3]);
        assert_eq!(i.key(2), Some(&"e"));
        assert_eq!(i.get(&"b"), None);
    }

    #[test]
    fn full_u32_range_does_not_wrap_to_zero() {
        let mut i: Interner<u32> = Interner::new(u32::MAX - 1, u32::MAX);
        i.begin();
        assert_eq!(i.intern(&1), Some(u32::MAX - 1));
        assert_eq!(i.intern(&2), Some(u32::MAX));
        assert_eq!(i.intern(&3), None);
    }
}
