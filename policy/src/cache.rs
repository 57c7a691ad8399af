//! A bounded, sharded CLOCK cache (second-chance approximation of LRU).
//!
//! Each shard is a fixed ring of slots behind its own mutex; a hit sets the
//! slot's reference bit, an insert into a full shard sweeps the hand past
//! referenced slots (clearing their bits) and replaces the first
//! unreferenced one. Capacity 0 disables the cache.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;

/// Shards; a power of two comfortably above the worker count.
const SHARDS: usize = 32;

#[derive(Debug)]
struct Slot<K, V> {
    key: K,
    value: V,
    referenced: bool,
}

#[derive(Debug)]
struct Shard<K, V> {
    map: HashMap<K, usize>,
    slots: Vec<Slot<K, V>>,
    hand: usize,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> Shard<K, V> {
    fn get(&mut self, k: &K) -> Option<V> {
        let i = *self.map.get(k)?;
        let slot = self.slots.get_mut(i)?;
        slot.referenced = true;
        Some(slot.value.clone())
    }

    fn insert(&mut self, k: K, v: V) {
        if let Some(&i) = self.map.get(&k) {
            if let Some(slot) = self.slots.get_mut(i) {
                slot.value = v;
                slot.referenced = true;
            }
            return;
        }
        if self.slots.len() < self.cap {
            self.map.insert(k.clone(), self.slots.len());
            self.slots.push(Slot {
                key: k,
                value: v,
                referenced: false,
            });
            return;
        }
        // Sweep: at most two turns (the first clears every bit).
        let n = self.slots.len();
        for _ in 0..n.saturating_mul(2) {
            let i = self.hand % n.max(1);
            self.hand = (i + 1) % n.max(1);
            let Some(slot) = self.slots.get_mut(i) else {
                return;
            };
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            self.map.remove(&slot.key);
            slot.key = k.clone();
            slot.value = v;
            self.map.insert(k, i);
            return;
        }
    }
}

/// The cache. `Send + Sync` when `K` and `V` are `Send`.
#[derive(Debug)]
pub struct ClockCache<K, V> {
    hasher: RandomState,
    shards: Vec<Mutex<Shard<K, V>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> ClockCache<K, V> {
    /// A cache holding at most about `capacity` entries (0: disabled).
    pub fn new(capacity: usize) -> Self {
        let per = if capacity == 0 {
            0
        } else {
            capacity.div_ceil(SHARDS)
        };
        ClockCache {
            hasher: RandomState::new(),
            shards: (0..if per == 0 { 0 } else { SHARDS })
                .map(|_| {
                    Mutex::new(Shard {
                        // Grown on use: a snapshot replaced after a few
                        // decisions (memberships moving during an
                        // import) costs no large allocation.
                        map: HashMap::new(),
                        slots: Vec::new(),
                        hand: 0,
                        cap: per,
                    })
                })
                .collect(),
        }
    }

    /// Whether the cache holds anything at all.
    pub fn enabled(&self) -> bool {
        !self.shards.is_empty()
    }

    fn shard(&self, k: &K) -> Option<&Mutex<Shard<K, V>>> {
        if self.shards.is_empty() {
            return None;
        }
        let i = usize::try_from(self.hasher.hash_one(k) % self.shards.len() as u64).unwrap_or(0);
        self.shards.get(i)
    }

    /// The value for `k`, marking it recently used.
    pub fn get(&self, k: &K) -> Option<V> {
        self.shard(k)?.lock().ok()?.get(k)
    }

    /// Stores `v` for `k`, evicting an entry not used since the hand last passed.
    pub fn insert(&self, k: K, v: V) {
        if let Some(s) = self.shard(&k) {
            if let Ok(mut s) = s.lock() {
                s.insert(k, v);
            }
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.slots.len()).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::ClockCache;

    #[test]
    fn bounded_and_keeps_recently_used() {
        let c: ClockCache<u32, u32> = ClockCache::new(64);
        for i in 0..10_000 {
            c.insert(i, i * 2);
            // Keep key 7 hot.
            if i >= 7 {
                assert_eq!(c.get(&7), Some(14), "after insert {i}");
            }
        }
        assert!(c.len() <= 64 + super::SHARDS);
        assert_eq!(c.get(&9_999), Some(19_998));
    }

    #[test]
    fn zero_capacity_is_disabled() {
        let c: ClockCache<u32, u32> = ClockCache::new(0);
        c.insert(1, 1);
        assert_eq!(c.get(&1), None);
        assert!(!c.enabled());
    }
}
