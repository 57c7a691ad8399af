// SPDX-License-Identifier: GPL-2.0
//! The PEM's exec verdict cache (DESIGN.md §4 "Verdict cache", §6).
//!
//! A hit lets an exec proceed without hashing the file or asking the agent,
//! so the key must name exactly what the verdict depends on:
//!
//! - the file: `(dev, ino, i_generation)` plus the change cookie read
//!   *before* hashing (`STATX_CHANGE_COOKIE`, as IMA does). A write moves the
//!   cookie, so a modified binary misses and is re-hashed and re-decided. A
//!   file system without a cookie is never cached (the caller checks);
//! - the context class: real/effective uid and gid and the audit login uid.
//!   Verdicts that depend on anything finer (time, session, ancestry) come
//!   back from the appliance with `cacheable = false` and are not inserted;
//! - the policy generation: an entry is valid only under the generation it
//!   was decided in. Moving the generation ([`VerdictCache::set_generation`])
//!   empties the cache in O(1);
//! - age: an entry older than the TTL misses, bounding how long any verdict
//!   lives without the appliance seeing the exec again.
//!
//! Verdicts with a CPU-time obligation are never cached: the limit is armed
//! by the agent (`prlimit(2)`) while the exec waits for its verdict, which a
//! cache hit would skip.
//!
//! Layout: set-associative, [`WAYS`] entries per set, least recently used
//! replaced within a set. Lookup and insert touch one set: O([`WAYS`]), no
//! allocation. The storage is any `DerefMut<Target = [Slot]>` (a `Vec` in
//! tests, a `KVVec` in the kernel) so the same code runs in both.

use core::ops::DerefMut;

use super::{Decision, Verdict};

/// Entries per set.
pub const WAYS: usize = 8;

/// Who is exec'ing, as far as a cached verdict may depend on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContextClass {
    /// Real uid.
    pub uid: u32,
    /// Effective uid (after set-uid bits).
    pub euid: u32,
    /// Real gid.
    pub gid: u32,
    /// Audit login uid.
    pub loginuid: u32,
}

/// What a cached verdict is keyed by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecKey {
    /// Device of the file's super block.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Inode generation.
    pub generation: u32,
    /// Change cookie read before hashing.
    pub change_cookie: u64,
    /// Context class.
    pub class: ContextClass,
    /// The file is opened by an ELF exec as its `PT_INTERP` loader. A
    /// verdict for that use never answers the same file run as the program
    /// (`ld.so ./prog`), and the other way round.
    pub as_loader: bool,
}

impl ExecKey {
    fn hash(&self) -> u64 {
        // FNV-1a over the fields, then a final avalanche (splitmix64) so
        // consecutive inode numbers spread over the sets.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for w in [
            self.dev,
            self.ino,
            u64::from(self.generation) | (u64::from(self.as_loader) << 32),
            self.change_cookie,
            u64::from(self.class.uid) | (u64::from(self.class.euid) << 32),
            u64::from(self.class.gid) | (u64::from(self.class.loginuid) << 32),
        ] {
            h ^= w;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= h >> 30;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 27;
        h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }
}

/// One cache entry. [`Slot::EMPTY`] is the all-unused value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    key: ExecKey,
    verdict: Verdict,
    sha256: [u8; 32],
    epoch: u64,
    inserted: u64,
    used: u64,
    valid: bool,
}

impl ExecKey {
    /// The all-zero key of unused slots.
    pub const EMPTY: ExecKey = ExecKey {
        dev: 0,
        ino: 0,
        generation: 0,
        change_cookie: 0,
        class: ContextClass {
            uid: 0,
            euid: 0,
            gid: 0,
            loginuid: 0,
        },
        as_loader: false,
    };
}

impl Slot {
    /// An unused slot.
    pub const EMPTY: Slot = Slot {
        key: ExecKey::EMPTY,
        verdict: Verdict {
            decision: Decision::Deny,
            policy_generation: 0,
            cacheable: false,
            obligations: super::Obligations {
                nice: None,
                cpu_limit_s: None,
                log_level: 0,
                encrypt: false,
            },
        },
        sha256: [0; 32],
        epoch: 0,
        inserted: 0,
        used: 0,
        valid: false,
    };
}

/// Counters, for debugfs and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that found nothing usable.
    pub misses: u64,
    /// Entries stored.
    pub inserts: u64,
    /// Valid entries replaced to make room.
    pub evictions: u64,
    /// Generation changes (each empties the cache).
    pub flushes: u64,
}

/// Why [`VerdictCache::new`] refused the storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheError {
    /// The slot count must be a non-zero power of two multiple of [`WAYS`].
    BadCapacity,
}

/// The cache over its storage `S`.
#[derive(Debug)]
pub struct VerdictCache<S> {
    slots: S,
    set_mask: usize,
    generation: u64,
    /// Moves with every flush; entries of an older epoch are dead, so a
    /// generation that comes back (1 → 2 → 1) does not revive them.
    epoch: u64,
    ttl: u64,
    stats: CacheStats,
}

impl<S: DerefMut<Target = [Slot]>> VerdictCache<S> {
    /// A cache over `slots` (all [`Slot::EMPTY`]; their number a power of two
    /// and at least [`WAYS`]) whose entries live `ttl` time units (the
    /// caller's clock, e.g. milliseconds).
    pub fn new(slots: S, ttl: u64) -> Result<Self, CacheError> {
        let n = slots.len();
        if n < WAYS || !n.is_power_of_two() {
            return Err(CacheError::BadCapacity);
        }
        Ok(Self {
            set_mask: n / WAYS - 1,
            slots,
            generation: 0,
            epoch: 1,
            ttl,
            stats: CacheStats::default(),
        })
    }

    /// Number of entries it can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The policy generation entries must have been decided in.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Counters so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Moves to policy generation `g`; if it differs, every entry becomes
    /// invalid (lazily: entries carry the epoch they were stored in). Returns whether it moved.
    pub fn set_generation(&mut self, g: u64) -> bool {
        if g == self.generation {
            return false;
        }
        self.generation = g;
        self.epoch = self.epoch.wrapping_add(1);
        self.stats.flushes = self.stats.flushes.wrapping_add(1);
        true
    }

    /// Drops every entry (e.g. when the agent goes away). O(1).
    pub fn clear(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.stats.flushes = self.stats.flushes.wrapping_add(1);
    }

    fn set(&mut self, key: &ExecKey) -> &mut [Slot] {
        // Truncation is the point: the low bits pick the set.
        #[allow(clippy::cast_possible_truncation)]
        let set = (key.hash() as usize) & self.set_mask;
        let start = set * WAYS;
        self.slots.get_mut(start..start + WAYS).unwrap_or(&mut [])
    }

    /// The cached verdict for `key` at time `now`, with the file's SHA-256
    /// (for the process lineage), if any.
    pub fn lookup(&mut self, key: &ExecKey, now: u64) -> Option<(Verdict, [u8; 32])> {
        let epoch = self.epoch;
        let ttl = self.ttl;
        let mut found = None;
        for s in self.set(key) {
            if s.key == *key && live(s, epoch, ttl, now) {
                s.used = now;
                found = Some((s.verdict, s.sha256));
                break;
            }
        }
        if found.is_some() {
            self.stats.hits = self.stats.hits.wrapping_add(1);
        } else {
            self.stats.misses = self.stats.misses.wrapping_add(1);
        }
        found
    }

    /// Whether `v` may be cached at all: the appliance said so, it belongs to
    /// the current generation, and it carries no CPU-time obligation.
    pub fn admissible(&self, v: &Verdict) -> bool {
        v.cacheable && v.policy_generation == self.generation && v.obligations.cpu_limit_s.is_none()
    }

    /// Stores `v` (for a file hashing to `sha256`) for `key` at `now` if [`VerdictCache::admissible`];
    /// replaces the same key, else a free or expired slot, else the least
    /// recently used one in the set. Returns whether it was stored.
    pub fn insert(&mut self, key: &ExecKey, v: &Verdict, sha256: &[u8; 32], now: u64) -> bool {
        if !self.admissible(v) {
            return false;
        }
        let epoch = self.epoch;
        let ttl = self.ttl;
        let set = self.set(key);
        // Preference: the same key, then a dead slot, then the least
        // recently used live one (an eviction).
        let mut same = None;
        let mut dead = None;
        let mut lru: Option<(usize, u64)> = None;
        for (i, s) in set.iter().enumerate() {
            if s.valid && s.key == *key {
                same = Some(i);
                break;
            }
            if !live(s, epoch, ttl, now) {
                dead = dead.or(Some(i));
            } else if lru.is_none_or(|(_, used)| s.used < used) {
                lru = Some((i, s.used));
            }
        }
        let (index, evicting) = match (same, dead, lru) {
            (Some(i), _, _) | (None, Some(i), _) => (i, false),
            (None, None, Some((i, _))) => (i, true),
            (None, None, None) => return false,
        };
        let Some(slot) = set.get_mut(index) else {
            return false;
        };
        *slot = Slot {
            key: *key,
            verdict: *v,
            sha256: *sha256,
            epoch,
            inserted: now,
            used: now,
            valid: true,
        };
        if evicting {
            self.stats.evictions = self.stats.evictions.wrapping_add(1);
        }
        self.stats.inserts = self.stats.inserts.wrapping_add(1);
        true
    }

    /// Number of entries usable at `now` (for statistics; O(capacity)).
    pub fn live(&self, now: u64) -> usize {
        self.slots
            .iter()
            .filter(|s| live(s, self.epoch, self.ttl, now))
            .count()
    }
}

/// Whether `s` holds an entry of `epoch` younger than `ttl` at `now`.
fn live(s: &Slot, epoch: u64, ttl: u64, now: u64) -> bool {
    s.valid && s.epoch == epoch && now.wrapping_sub(s.inserted) < ttl
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Obligations;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn key(ino: u64) -> ExecKey {
        ExecKey {
            dev: 0x800001,
            ino,
            generation: 7,
            change_cookie: 100,
            class: ContextClass {
                uid: 1000,
                euid: 1000,
                gid: 1000,
                loginuid: 1000,
            },
            as_loader: false,
        }
    }

    fn verdict(decision: Decision, generation: u64) -> Verdict {
        Verdict {
            decision,
            policy_generation: generation,
            cacheable: true,
            obligations: Obligations::default(),
        }
    }

    const H: [u8; 32] = [0x5a; 32];

    trait Get {
        fn get(&mut self, key: &ExecKey, now: u64) -> Option<Verdict>;
    }

    impl Get for VerdictCache<Vec<Slot>> {
        fn get(&mut self, key: &ExecKey, now: u64) -> Option<Verdict> {
            self.lookup(key, now).map(|(v, h)| {
                assert_eq!(h, H);
                v
            })
        }
    }

    fn cache(n: usize, ttl: u64) -> VerdictCache<Vec<Slot>> {
        VerdictCache::new(vec![Slot::EMPTY; n], ttl).unwrap()
    }

    #[test]
    fn capacity_must_be_a_power_of_two_of_at_least_one_set() {
        for n in [0, 1, 7, 12, 24] {
            assert_eq!(
                VerdictCache::new(vec![Slot::EMPTY; n], 1).err(),
                Some(CacheError::BadCapacity),
                "{n}"
            );
        }
        assert_eq!(cache(8, 1).capacity(), 8);
        assert_eq!(cache(4096, 1).capacity(), 4096);
    }

    #[test]
    fn miss_insert_hit() {
        let mut c = cache(64, 1000);
        let v = verdict(Decision::Allow, 0);
        assert_eq!(c.get(&key(1), 0), None);
        assert!(c.insert(&key(1), &v, &H, 0));
        assert_eq!(c.get(&key(1), 1), Some(v));
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.inserts), (1, 1, 1));
        assert_eq!(c.live(1), 1);
    }

    #[test]
    fn another_user_or_a_modified_file_misses() {
        let mut c = cache(64, 1000);
        let v = verdict(Decision::Allow, 0);
        c.insert(&key(1), &v, &H, 0);
        let mut other_user = key(1);
        other_user.class.euid = 0;
        assert_eq!(c.get(&other_user, 1), None);
        let mut modified = key(1);
        modified.change_cookie += 1;
        assert_eq!(c.get(&modified, 1), None);
        let mut reused_inode = key(1);
        reused_inode.generation += 1;
        assert_eq!(c.get(&reused_inode, 1), None);
        // The loader's verdict as a PT_INTERP loader never answers it run
        // as the program (`ld.so ./prog`).
        let mut as_loader = key(1);
        as_loader.as_loader = true;
        assert_eq!(c.get(&as_loader, 1), None);
        assert_eq!(c.get(&key(1), 1), Some(v));
    }

    #[test]
    fn only_admissible_verdicts_are_stored() {
        let mut c = cache(64, 1000);
        let mut not_cacheable = verdict(Decision::Allow, 0);
        not_cacheable.cacheable = false;
        assert!(!c.insert(&key(1), &not_cacheable, &H, 0));
        let mut cpu_limited = verdict(Decision::AllowWithConditions, 0);
        cpu_limited.obligations.cpu_limit_s = Some(60);
        assert!(!c.insert(&key(2), &cpu_limited, &H, 0));
        let mut niced = verdict(Decision::AllowWithConditions, 0);
        niced.obligations.nice = Some(10);
        assert!(c.insert(&key(3), &niced, &H, 0));
        assert!(
            !c.insert(&key(4), &verdict(Decision::Deny, 5), &H, 0),
            "other generation"
        );
        assert!(
            c.insert(&key(5), &verdict(Decision::Deny, 0), &H, 0),
            "denials are cached too"
        );
        assert_eq!(c.get(&key(1), 0), None);
        assert_eq!(c.get(&key(2), 0), None);
        assert_eq!(c.get(&key(3), 0), Some(niced));
    }

    #[test]
    fn a_new_generation_flushes_everything() {
        let mut c = cache(64, 1000);
        for i in 0..20 {
            c.insert(&key(i), &verdict(Decision::Allow, 0), &H, 0);
        }
        assert_eq!(c.live(0), 20);
        assert!(!c.set_generation(0));
        assert!(c.set_generation(3));
        assert_eq!(c.live(0), 0);
        assert_eq!(c.get(&key(1), 0), None);
        assert!(c.insert(&key(1), &verdict(Decision::Deny, 3), &H, 0));
        assert_eq!(c.get(&key(1), 0), Some(verdict(Decision::Deny, 3)));
        assert_eq!(c.stats().flushes, 1);
        c.clear();
        assert_eq!(c.get(&key(1), 0), None);
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let mut c = cache(64, 100);
        c.insert(&key(1), &verdict(Decision::Allow, 0), &H, 1000);
        assert!(c.get(&key(1), 1099).is_some());
        assert!(c.get(&key(1), 1100).is_none());
    }

    #[test]
    fn the_least_recently_used_entry_is_evicted() {
        // One set: every key shares it.
        let mut c = cache(WAYS, 1_000_000);
        for i in 0..WAYS as u64 {
            assert!(c.insert(&key(i), &verdict(Decision::Allow, 0), &H, i));
        }
        // Touch key 0: key 1 is now the least recently used.
        assert!(c.get(&key(0), 100).is_some());
        assert!(c.insert(&key(99), &verdict(Decision::Allow, 0), &H, 101));
        assert_eq!(c.stats().evictions, 1);
        assert!(c.get(&key(1), 102).is_none());
        for i in [0, 2, 3, 99] {
            assert!(c.get(&key(i), 102).is_some(), "{i}");
        }
        // Replacing the same key is not an eviction.
        assert!(c.insert(&key(99), &verdict(Decision::Deny, 0), &H, 103));
        assert_eq!(c.stats().evictions, 1);
        assert_eq!(c.get(&key(99), 104), Some(verdict(Decision::Deny, 0)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, bool, u8),
        Lookup(u64),
        Generation(u64),
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..40, any::<bool>(), 1u8..4).prop_map(|(k, c, d)| Op::Insert(k, c, d)),
            4 => (0u64..40).prop_map(Op::Lookup),
            1 => (0u64..3).prop_map(Op::Generation),
            1 => (0u64..60).prop_map(Op::Tick),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// A hit is always exactly the last verdict stored for that key, in
        /// the current generation, within the TTL: never stale, never another
        /// key's. (Misses are allowed: entries may be evicted.)
        #[test]
        fn hits_are_never_stale(ops in proptest::collection::vec(op(), 1..300)) {
            let ttl = 100;
            let mut c = cache(16, ttl);
            let mut model: HashMap<u64, (Verdict, u64)> = HashMap::new();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Insert(k, cacheable, d) => {
                        let mut v = verdict(Decision::from_wire(d).unwrap(), c.generation());
                        v.cacheable = cacheable;
                        if c.insert(&key(k), &v, &H, now) {
                            model.insert(k, (v, now));
                        }
                    }
                    Op::Lookup(k) => {
                        if let Some(got) = c.get(&key(k), now) {
                            let (want, at) = model.get(&k).copied().expect("hit without insert");
                            prop_assert_eq!(got, want);
                            prop_assert_eq!(got.policy_generation, c.generation());
                            prop_assert!(now - at < ttl);
                        }
                    }
                    Op::Generation(g) => {
                        if c.set_generation(g) {
                            model.clear();
                        }
                    }
                    Op::Tick(t) => now += t,
                }
            }
        }
    }
}
