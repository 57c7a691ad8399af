// SPDX-License-Identifier: GPL-2.0
//! The PEM's file gate: which files are protected, how a verdict about one
//! is cached, and the answers a restarted system call picks up.
//!
//! The module sees file operations in hooks that run under locks of the VFS
//! (a directory's `i_rwsem` for unlink, rename, create) or with preemption
//! disabled (its ftrace callbacks). It never waits there. It answers from
//! what it knows: [`ProtectedSet`] (is the file protected at all?), the
//! verdict cache (keyed by [`file_key`]) and the per-thread [`Answers`]. On a
//! miss it asks later, with nothing held: the system call fails with
//! `ERESTARTNOINTR`, the question is asked from a task work as the thread
//! returns to user space, the answer lands in the cache (if cacheable) and
//! in [`Answers`], and the restarted call finds it.
//!
//! A file is protected when it, or any directory above it on its file
//! system, is in the set: the walk follows the dentry tree of the file
//! system, not the mounts, so a bind mount, a mount namespace, `..`, a
//! symbolic link or `/proc/self/fd` cannot make a protected file look
//! unprotected; they all reach the same dentries.

use super::cache::{ContextClass, ExecKey};
use super::{FileAccess, FileSets};

/// Most dentries the walk looks at before it gives up and treats the file
/// as protected (fail closed): deeper trees are asked about.
pub const MAX_DEPTH: usize = 64;

/// The protected identities, sorted: `(dev, ino)` pairs.
pub struct ProtectedSet<S> {
    entries: S,
}

impl<S: core::ops::Deref<Target = [(u64, u64)]>> ProtectedSet<S> {
    /// Wraps sorted, unique entries (as a checked [`FileSets`] record has
    /// them); `None` if they are not.
    pub fn new(entries: S) -> Option<Self> {
        if entries.windows(2).all(|w| matches!(w, [a, b] if a < b)) {
            Some(Self { entries })
        } else {
            None
        }
    }

    /// Whether nothing is protected.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many identities.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether any protected object lives on file system `dev` (one binary
    /// search: the first thing the gate asks about a file).
    pub fn has_dev(&self, dev: u64) -> bool {
        let i = self.entries.partition_point(|&(d, _)| d < dev);
        self.entries.get(i).is_some_and(|&(d, _)| d == dev)
    }

    /// The device every entry is on, if there is exactly one.
    pub fn one_dev(&self) -> Option<u64> {
        let (first, last) = (self.entries.first()?, self.entries.last()?);
        (first.0 == last.0).then_some(first.0)
    }

    /// Whether `(dev, ino)` is listed.
    pub fn contains(&self, dev: u64, ino: u64) -> bool {
        self.entries.binary_search(&(dev, ino)).is_ok()
    }

    /// Classifies a file from the identities of its dentry and every
    /// dentry above it on its file system, nearest first (`ancestors`
    /// yields inode numbers; all are on `dev`).
    pub fn classify(&self, dev: u64, ancestors: impl IntoIterator<Item = u64>) -> Protection {
        if !self.has_dev(dev) {
            return Protection::Unprotected;
        }
        self.classify_ids(ancestors.into_iter().map(|ino| (dev, ino)))
    }

    /// Classifies a file from the `(dev, ino)` identities of its dentry
    /// and every dentry above it, nearest first, on a file system whose
    /// inodes do not all report one device (btrfs: each subvolume has its
    /// own, T-98).
    pub fn classify_ids(&self, ancestors: impl IntoIterator<Item = (u64, u64)>) -> Protection {
        for (depth, (dev, ino)) in ancestors.into_iter().enumerate() {
            if depth >= MAX_DEPTH {
                return Protection::TooDeep;
            }
            if self.contains(dev, ino) {
                return Protection::Protected;
            }
        }
        Protection::Unprotected
    }
}

/// The major and minor numbers of a device in `stat`'s `st_dev` encoding
/// (the kernel's `new_encode_dev`: major in bits 8..20 and 32.., minor in
/// bits 0..8 and 20..32), as `/proc/self/mountinfo` shows them.
pub fn dev_numbers(dev: u64) -> (u64, u64) {
    (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    )
}

/// Fills `out` with the entries of a [`FileSets`] record; the number
/// written (the record holds at most `out.len()` entries when the caller
/// sized `out` from [`FileSets::len`]).
pub fn entries_of(sets: &FileSets<'_>, out: &mut [(u64, u64)]) -> usize {
    let mut n = 0;
    for (slot, e) in out.iter_mut().zip(sets.iter()) {
        *slot = e;
        n += 1;
    }
    n
}

/// What the walk found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Neither the file nor any directory above it is listed.
    Unprotected,
    /// The file or a directory above it is listed.
    Protected,
    /// The tree is deeper than [`MAX_DEPTH`]: treated as protected.
    TooDeep,
}

impl Protection {
    /// Whether the operation must be decided (asked or answered).
    pub fn asks(self) -> bool {
        self != Protection::Unprotected
    }
}

/// Folds a program hash to the 64 bits the cache key holds. A collision
/// only costs a miss: a hit is accepted only if the full hash stored with
/// the verdict is the program's.
pub fn fold(sha256: &[u8; 32]) -> u64 {
    sha256.chunks_exact(8).fold(0u64, |acc, c| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        acc.rotate_left(17) ^ u64::from_le_bytes(w)
    })
}

/// The verdict cache key of one file operation. The exec cache's slots are
/// reused: `dev` carries the access and flags in its top 16 bits (device
/// numbers, `st_dev` encoded, fit in 32), `generation` the file's inode
/// generation, `change_cookie` the folded program hash, and the class the
/// user. So a verdict answers only the same program, user, access and
/// file.
pub fn file_key(
    dev: u64,
    ino: u64,
    i_generation: u32,
    access: FileAccess,
    flags: u8,
    program: &[u8; 32],
    class: ContextClass,
) -> ExecKey {
    ExecKey {
        dev: (dev & 0x0000_ffff_ffff_ffff)
            | (u64::from(access as u8) << 56)
            | (u64::from(flags) << 48),
        ino,
        generation: i_generation,
        change_cookie: fold(program),
        class,
        as_loader: false,
    }
}

/// How a question the thread asked from its task work ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed.
    Allowed,
    /// Denied by policy.
    Denied,
    /// No agent was connected.
    NoAgent,
    /// No verdict in time.
    TimedOut,
    /// No place in the queue to the agent.
    Busy,
    /// The program could not be hashed.
    Unreadable,
}

/// How long an answer waits for its restarted call, in milliseconds. The
/// restart follows at once; a second hook of the same call (`mknod(2)`
/// passes two) finds it too.
pub const ANSWER_TTL_MS: u64 = 1000;

/// One remembered answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    tid: u32,
    key: ExecKey,
    program: [u8; 32],
    outcome: Outcome,
    at_ms: u64,
}

impl Answer {
    /// An unused slot.
    pub const EMPTY: Answer = Answer {
        tid: 0,
        key: ExecKey::EMPTY,
        program: [0; 32],
        outcome: Outcome::Denied,
        at_ms: 0,
    };
}

/// The answers threads got from their task work, direct-mapped by thread
/// id: a thread has at most one question in flight (its system call waits
/// for it), and a newer answer of a thread whose slot another thread took
/// only costs that thread one more question.
pub struct Answers<S> {
    slots: S,
}

impl<S: core::ops::DerefMut<Target = [Answer]>> Answers<S> {
    /// Wraps the storage (any non-zero length).
    pub fn new(slots: S) -> Option<Self> {
        if slots.is_empty() {
            None
        } else {
            Some(Self { slots })
        }
    }

    fn slot(&mut self, tid: u32) -> Option<&mut Answer> {
        let n = self.slots.len();
        // CAST: a thread id fits `usize`.
        self.slots.get_mut((tid as usize).checked_rem(n)?)
    }

    /// Remembers `outcome` for thread `tid`'s question `key` by `program`.
    pub fn put(&mut self, tid: u32, key: &ExecKey, program: &[u8; 32], outcome: Outcome, now: u64) {
        if let Some(s) = self.slot(tid) {
            *s = Answer {
                tid,
                key: *key,
                program: *program,
                outcome,
                at_ms: now,
            };
        }
    }

    /// The answer thread `tid` got for `key` by `program`, if it is fresh.
    pub fn get(
        &mut self,
        tid: u32,
        key: &ExecKey,
        program: &[u8; 32],
        now: u64,
    ) -> Option<Outcome> {
        let s = self.slot(tid)?;
        let fresh = now.saturating_sub(s.at_ms) <= ANSWER_TTL_MS;
        (s.tid == tid && tid != 0 && s.key == *key && s.program == *program && fresh)
            .then_some(s.outcome)
    }

    /// Forgets every answer (the policy generation moved).
    pub fn clear(&mut self) {
        for s in self.slots.iter_mut() {
            *s = Answer::EMPTY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(v: &[(u64, u64)]) -> ProtectedSet<Vec<(u64, u64)>> {
        ProtectedSet::new(v.to_vec()).unwrap()
    }

    #[test]
    fn classify_walks_up_to_a_listed_directory() {
        let s = set(&[(8, 2000), (8, 3000), (9, 2)]);
        // The file itself, its directory, a directory far above.
        assert_eq!(s.classify(8, [2000, 12, 2]), Protection::Protected);
        assert_eq!(s.classify(8, [55, 2000, 2]), Protection::Protected);
        assert_eq!(s.classify(8, [55, 54, 53, 3000]), Protection::Protected);
        // Same inode number on another file system: not protected.
        assert_eq!(s.classify(7, [2000]), Protection::Unprotected);
        assert_eq!(s.classify(8, [55, 54, 2]), Protection::Unprotected);
        // A root listed protects the whole file system.
        assert_eq!(s.classify(9, [77, 66, 2]), Protection::Protected);
        assert_eq!(s.one_dev(), None);
        assert_eq!(set(&[(8, 1), (8, 9)]).one_dev(), Some(8));
        // Deeper than the walk goes: fail closed.
        let deep = (100..100 + MAX_DEPTH as u64 + 1).collect::<Vec<_>>();
        assert_eq!(s.classify(8, deep), Protection::TooDeep);
        assert!(Protection::TooDeep.asks() && !Protection::Unprotected.asks());
        // An empty set protects nothing, at no cost.
        let e = set(&[]);
        assert!(e.is_empty() && !e.has_dev(8) && e.one_dev().is_none());
        assert_eq!(e.classify(8, [1, 2]), Protection::Unprotected);
    }

    #[test]
    fn subvolumes_are_matched_by_their_own_device() {
        // btrfs: /srv (subvolume 30, inode 300) is protected; /srv/sub is
        // a subvolume of its own (31, its root 256) holding file 257.
        let s = set(&[(30, 300)]);
        assert_eq!(
            s.classify_ids([(31, 257), (31, 256), (30, 300), (30, 256)]),
            Protection::Protected
        );
        // Inode numbers repeat across subvolumes: 300 on subvolume 32 is
        // another directory.
        assert_eq!(
            s.classify_ids([(32, 301), (32, 300), (32, 256)]),
            Protection::Unprotected
        );
    }

    #[test]
    fn unsorted_sets_are_refused() {
        assert!(ProtectedSet::new(vec![(2u64, 1u64), (1, 1)]).is_none());
        assert!(ProtectedSet::new(vec![(1u64, 1u64), (1, 1)]).is_none());
    }

    #[test]
    fn entries_of_a_record() {
        let mut b = Vec::new();
        b.extend_from_slice(&FileSets::entry(1, 5));
        b.extend_from_slice(&FileSets::entry(3, 2));
        let f = FileSets::new(&b).unwrap();
        let mut out = vec![(0, 0); f.len()];
        assert_eq!(entries_of(&f, &mut out), 2);
        assert_eq!(out, vec![(1, 5), (3, 2)]);
    }

    #[test]
    fn keys_separate_access_program_and_user() {
        let p = [7u8; 32];
        let mut q = p;
        q[31] = 8;
        let c = ContextClass {
            uid: 1000,
            euid: 1000,
            gid: 100,
            loginuid: 1000,
        };
        let k = |a, f, prog: &[u8; 32], class| file_key(0x0803, 42, 1, a, f, prog, class);
        let base = k(FileAccess::Read, 0, &p, c);
        assert_ne!(base, k(FileAccess::Write, 0, &p, c));
        assert_ne!(base, k(FileAccess::Read, 1, &p, c));
        assert_ne!(base, k(FileAccess::Read, 0, &q, c));
        assert_ne!(
            base,
            k(FileAccess::Read, 0, &p, ContextClass { uid: 0, ..c })
        );
        assert_ne!(base, file_key(0x0803, 42, 2, FileAccess::Read, 0, &p, c));
        assert_eq!(base, k(FileAccess::Read, 0, &p, c));
    }

    #[test]
    fn answers_are_per_thread_question_and_fresh_only() {
        let mut a = Answers::new(vec![Answer::EMPTY; 8]).unwrap();
        let p = [1u8; 32];
        let c = ContextClass::default();
        let k1 = file_key(1, 2, 0, FileAccess::Read, 0, &p, c);
        let k2 = file_key(1, 3, 0, FileAccess::Read, 0, &p, c);
        a.put(100, &k1, &p, Outcome::Denied, 5000);
        assert_eq!(a.get(100, &k1, &p, 5000), Some(Outcome::Denied));
        assert_eq!(
            a.get(100, &k1, &p, 5000 + ANSWER_TTL_MS),
            Some(Outcome::Denied)
        );
        assert_eq!(a.get(100, &k1, &p, 5001 + ANSWER_TTL_MS), None);
        assert_eq!(a.get(100, &k2, &p, 5000), None);
        assert_eq!(a.get(108, &k1, &p, 5000), None, "another thread, same slot");
        assert_eq!(a.get(100, &k1, &[2u8; 32], 5000), None, "another program");
        a.put(108, &k2, &p, Outcome::Allowed, 5000);
        assert_eq!(a.get(100, &k1, &p, 5000), None, "slot taken over");
        assert_eq!(a.get(108, &k2, &p, 5000), Some(Outcome::Allowed));
        a.clear();
        assert_eq!(a.get(108, &k2, &p, 5000), None);
        // Thread 0 never matches (the empty slots' id).
        let k0 = Answer::EMPTY.key;
        assert_eq!(a.get(0, &k0, &[0; 32], 0), None);
        assert!(Answers::new(Vec::<Answer>::new()).is_none());
    }

    proptest! {
        /// The classification agrees with a plain search of the chain.
        #[test]
        fn classify_matches_a_linear_search(
            mut entries in proptest::collection::btree_set((0u64..4, 0u64..64), 0..40),
            dev in 0u64..5,
            chain in proptest::collection::vec(0u64..64, 0..20),
        ) {
            let v: Vec<_> = core::mem::take(&mut entries).into_iter().collect();
            let s = set(&v);
            let want = chain.iter().any(|&i| v.contains(&(dev, i)));
            prop_assert_eq!(s.classify(dev, chain.iter().copied()).asks(), want);
            prop_assert_eq!(s.has_dev(dev), v.iter().any(|&(d, _)| d == dev));
        }

        /// Per-entry devices: the same, device by device.
        #[test]
        fn classify_ids_matches_a_linear_search(
            mut entries in proptest::collection::btree_set((0u64..4, 0u64..64), 0..40),
            chain in proptest::collection::vec((0u64..5, 0u64..64), 0..20),
        ) {
            let v: Vec<_> = core::mem::take(&mut entries).into_iter().collect();
            let s = set(&v);
            let want = chain.iter().any(|id| v.contains(id));
            prop_assert_eq!(s.classify_ids(chain.iter().copied()).asks(), want);
        }
    }
}
