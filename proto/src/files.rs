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

/// The entries of two ascending, unique lists, ascending and unique:
/// the module protects the identities of the appliance's sealed paths and
/// the agent's additions together.
pub fn union<'a>(
    a: &'a [(u64, u64)],
    b: &'a [(u64, u64)],
) -> impl Iterator<Item = (u64, u64)> + 'a {
    let (mut a, mut b) = (a.iter().copied().peekable(), b.iter().copied().peekable());
    core::iter::from_fn(move || match (a.peek().copied(), b.peek().copied()) {
        (Some(x), Some(y)) if x < y => a.next(),
        (Some(x), Some(y)) if y < x => b.next(),
        (Some(_), Some(_)) => {
            b.next();
            a.next()
        }
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

/// The path the appliance names a file by, as the module builds it: `base`
/// (the appliance's path of the protected directory or file the walk
/// matched, `below` levels above the file) then the last `below`
/// components of `fs_path` (the file's path from its file system's root),
/// into `out`. Its length, or `None` when `fs_path` has fewer components
/// or the result does not fit `out`.
pub fn named_path(base: &[u8], fs_path: &[u8], below: usize, out: &mut [u8]) -> Option<usize> {
    // The start of the last `below` components of `fs_path`.
    let mut start = fs_path.len();
    for _ in 0..below {
        while start > 0 && fs_path.get(start - 1) == Some(&b'/') {
            start -= 1;
        }
        if start == 0 {
            return None;
        }
        while start > 0 && fs_path.get(start - 1) != Some(&b'/') {
            start -= 1;
        }
    }
    let tail = fs_path.get(start..)?;
    let base = match base {
        b"/" => &b""[..],
        b => b,
    };
    let mut len = 0;
    let mut put = |part: &[u8]| -> Option<()> {
        out.get_mut(len..len + part.len())?.copy_from_slice(part);
        len += part.len();
        Some(())
    };
    put(base)?;
    if below > 0 {
        put(b"/")?;
        put(tail)?;
    } else if base.is_empty() {
        put(b"/")?;
    }
    Some(len)
}

/// Undoes the kernel's octal escapes in a `/proc/<pid>/mountinfo` field
/// (`\040` space, `\011` tab, `\012` newline, `\134` backslash; anything
/// else stays) into `out`; the length, or `None` if `out` is too short.
/// The agent and the module read mount points with it.
pub fn unescape_mountinfo(field: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut i = 0;
    let mut n = 0;
    while let Some(&c) = field.get(i) {
        let octal = field.get(i + 1..i + 4).filter(|d| {
            c == b'\\' && d.iter().all(|x| (b'0'..=b'7').contains(x)) && d.first() <= Some(&b'3')
        });
        let (byte, used) = match octal {
            Some(d) => (d.iter().fold(0u8, |v, x| v * 8 + (x - b'0')), 4),
            None => (c, 1),
        };
        *out.get_mut(n)? = byte;
        n += 1;
        i += used;
    }
    Some(n)
}

/// The mount point field (the fifth, escaped) of each line of
/// `/proc/<pid>/mountinfo` text.
pub fn mount_point_fields(mountinfo: &[u8]) -> impl Iterator<Item = &[u8]> {
    mountinfo
        .split(|&b| b == b'\n')
        .filter_map(|l| l.split(|&b| b == b' ').nth(4))
}

/// Whether absolute path `p` is `dir` or lies below it, component-wise
/// (`/srv/data` covers `/srv/data/x`, not `/srv/database`; `/` covers
/// everything).
pub fn at_or_below(p: &[u8], dir: &[u8]) -> bool {
    let dir = match dir {
        b"/" => &b""[..],
        d => d,
    };
    p.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.first() == Some(&b'/'))
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

/// Where a file sits, as the file gate's walk saw it: the file (or, for a
/// new name, its directory) and the directory above it, each by inode
/// number and generation, on device `dev`, with the dentry tree's version
/// (the kernel's `rename_lock` sequence, which every move of a dentry
/// changes) and the module's epoch (which every change of the protected
/// set and every removed directory changes). Two equal places have the
/// same ancestors: a directory has one parent, and its parent's own
/// ancestors cannot change without the tree's version changing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub dev: u64,
    pub ino: u64,
    pub parent_ino: u64,
    /// The two inodes' generations, the file's in the high half.
    pub gens: u64,
    pub tree: u32,
    pub epoch: u64,
}

/// One remembered [`Place`] and what its walk found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    place: Place,
    protected: bool,
    used: bool,
}

impl Seen {
    /// An unused slot.
    pub const EMPTY: Seen = Seen {
        place: Place {
            dev: 0,
            ino: 0,
            parent_ino: 0,
            gens: 0,
            tree: 0,
            epoch: 0,
        },
        protected: false,
        used: false,
    };
}

/// What the walk up from a place found, direct-mapped by place: an open of
/// a file opened before costs one lookup here, not a walk up its
/// directories. Only the exact place answers (every field compared), so a
/// stale or colliding slot can only cost a walk, never call a protected
/// file unprotected; a newer place takes the slot.
pub struct SeenPlaces<S> {
    slots: S,
}

impl<S: core::ops::DerefMut<Target = [Seen]>> SeenPlaces<S> {
    /// Wraps the storage (any non-zero length).
    pub fn new(slots: S) -> Option<Self> {
        if slots.is_empty() {
            None
        } else {
            Some(Self { slots })
        }
    }

    fn index(&self, p: &Place) -> Option<usize> {
        let h = (p.ino ^ p.parent_ino.rotate_left(29) ^ u64::from(p.tree).rotate_left(47))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // CAST: the top 32 bits of the mix fit `usize`.
        ((h >> 32) as usize).checked_rem(self.slots.len())
    }

    /// Whether the walk from `p` met a protected file or directory, if
    /// remembered.
    pub fn get(&self, p: &Place) -> Option<bool> {
        self.index(p)
            .and_then(|i| self.slots.get(i))
            .filter(|s| s.used && s.place == *p)
            .map(|s| s.protected)
    }

    /// Remembers what the walk from `p` found.
    pub fn put(&mut self, p: &Place, protected: bool) {
        if let Some(s) = self.index(p).and_then(|i| self.slots.get_mut(i)) {
            *s = Seen {
                place: *p,
                protected,
                used: true,
            };
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

    fn named(base: &str, fs_path: &str, below: usize) -> Option<String> {
        let mut out = [0u8; 64];
        let n = named_path(base.as_bytes(), fs_path.as_bytes(), below, &mut out)?;
        Some(String::from_utf8(out[..n].to_vec()).unwrap())
    }

    #[test]
    fn mountinfo_fields_are_read_and_unescaped() {
        let mi = b"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                   30 22 0:40 / /srv/a\\040b rw - tmpfs none rw\n\
                   31 22 0:41 / /x\\134y\\012z rw - tmpfs none rw\n\
                   short line\n";
        let got: Vec<Vec<u8>> = mount_point_fields(mi)
            .map(|f| {
                let mut out = [0u8; 64];
                let n = unescape_mountinfo(f, &mut out).unwrap();
                out[..n].to_vec()
            })
            .collect();
        assert_eq!(
            got,
            vec![b"/".to_vec(), b"/srv/a b".to_vec(), b"/x\\y\nz".to_vec()]
        );
        // Not an escape: kept as it is.
        let mut out = [0u8; 8];
        let n = unescape_mountinfo(b"\\9x\\4", &mut out).unwrap();
        assert_eq!(&out[..n], b"\\9x\\4");
        assert_eq!(unescape_mountinfo(b"/long", &mut [0u8; 3]), None);
    }

    #[test]
    fn below_is_by_whole_components() {
        assert!(at_or_below(b"/srv/data", b"/srv/data"));
        assert!(at_or_below(b"/srv/data/x/y", b"/srv/data"));
        assert!(!at_or_below(b"/srv/database", b"/srv/data"));
        assert!(!at_or_below(b"/srv", b"/srv/data"));
        assert!(at_or_below(b"/anything", b"/"));
        assert!(at_or_below(b"/", b"/"));
    }

    #[test]
    fn named_paths_join_the_appliances_path_and_the_components_below() {
        // /srv/www on its own file system, matched at the file's parent.
        assert_eq!(
            named("/srv/www", "/sub/f", 2).as_deref(),
            Some("/srv/www/sub/f")
        );
        assert_eq!(
            named("/srv/www", "/sub/f", 1).as_deref(),
            Some("/srv/www/f")
        );
        // The protected file itself.
        assert_eq!(
            named("/etc/app.key", "/etc/app.key", 0).as_deref(),
            Some("/etc/app.key")
        );
        // The root of everything.
        assert_eq!(named("/", "/a/b", 2).as_deref(), Some("/a/b"));
        assert_eq!(named("/", "/", 0).as_deref(), Some("/"));
        // Fewer components than the walk went up: inconsistent, none.
        assert_eq!(named("/srv", "/f", 2), None);
        assert_eq!(named("/srv", "/", 1), None);
        // Too long for the buffer.
        assert_eq!(named(&"/x".repeat(40), "/f", 1), None);
    }

    fn place(ino: u64) -> Place {
        Place {
            dev: 8,
            ino,
            parent_ino: 2,
            gens: 7 << 32 | 9,
            tree: 4,
            epoch: 1,
        }
    }

    #[test]
    fn a_seen_place_answers_only_when_every_field_agrees() {
        let mut c = SeenPlaces::new(vec![Seen::EMPTY; 64]).unwrap();
        let p = place(12);
        assert_eq!(c.get(&p), None);
        c.put(&p, false);
        assert_eq!(c.get(&p), Some(false));
        c.put(&p, true);
        assert_eq!(c.get(&p), Some(true));
        let changed = [
            Place { dev: 9, ..p },
            Place { ino: 13, ..p },
            Place { parent_ino: 3, ..p },
            Place {
                gens: 7 << 32 | 10,
                ..p
            },
            Place {
                gens: 8 << 32 | 9,
                ..p
            },
            Place { tree: 6, ..p },
            Place { epoch: 2, ..p },
        ];
        for q in changed {
            assert_eq!(c.get(&q), None, "{q:?} answered for {p:?}");
        }
        assert!(SeenPlaces::new(Vec::<Seen>::new()).is_none());
    }

    #[test]
    fn an_empty_slot_never_answers_even_for_a_zero_place() {
        let c = SeenPlaces::new(vec![Seen::EMPTY; 4]).unwrap();
        assert_eq!(c.get(&Seen::EMPTY.place), None);
    }

    proptest! {
        /// Whatever was remembered, a place answers only what was last
        /// remembered for it (a slot holds one exact place), and the last
        /// place remembered always answers.
        #[test]
        fn a_place_answers_only_what_was_remembered_for_it(
            put in proptest::collection::vec((0u64..6, 0u64..6, 0u32..3, 0u64..2, any::<bool>()), 1..60),
            asked in proptest::collection::vec((0u64..6, 0u64..6, 0u32..3, 0u64..2), 0..60),
        ) {
            let mk = |(ino, parent_ino, tree, epoch): (u64, u64, u32, u64)| Place {
                dev: 1, ino, parent_ino, gens: 0, tree, epoch,
            };
            let mut c = SeenPlaces::new(vec![Seen::EMPTY; 8]).unwrap();
            for &(i, pi, t, e, prot) in &put {
                c.put(&mk((i, pi, t, e)), prot);
            }
            let &(i, pi, t, e, prot) = put.last().unwrap();
            prop_assert_eq!(c.get(&mk((i, pi, t, e))), Some(prot));
            for &a in &asked {
                if let Some(got) = c.get(&mk(a)) {
                    let last = put.iter().rev().find(|p| (p.0, p.1, p.2, p.3) == a);
                    prop_assert_eq!(last.map(|p| p.4), Some(got));
                }
            }
        }

        /// A named path is the base, then exactly the last `below`
        /// components of the file system path.
        #[test]
        fn named_path_model(
            base in proptest::collection::vec("[a-z]{1,3}", 0..4),
            comps in proptest::collection::vec("[a-z.]{1,3}", 0..6),
            below in 0usize..8,
        ) {
            let base = format!("/{}", base.join("/"));
            let fs_path = format!("/{}", comps.join("/"));
            let mut out = [0u8; 256];
            let got = named_path(base.as_bytes(), fs_path.as_bytes(), below, &mut out)
                .map(|n| String::from_utf8(out[..n].to_vec()).unwrap());
            if below > comps.len() {
                prop_assert_eq!(got, None);
            } else {
                let tail = comps[comps.len() - below..].join("/");
                let want = match (base.as_str(), below) {
                    (b, 0) => b.to_owned(),
                    ("/", _) => format!("/{tail}"),
                    (b, _) => format!("{b}/{tail}"),
                };
                prop_assert_eq!(got, Some(want));
            }
        }

        /// The union of two sorted sets is their set union, sorted, and a
        /// valid protected set.
        #[test]
        fn union_is_the_set_union(
            a in proptest::collection::btree_set((0u64..4, 0u64..32), 0..40),
            b in proptest::collection::btree_set((0u64..4, 0u64..32), 0..40),
        ) {
            let (va, vb): (Vec<_>, Vec<_>) = (a.iter().copied().collect(), b.iter().copied().collect());
            let got: Vec<_> = union(&va, &vb).collect();
            let want: Vec<_> = a.union(&b).copied().collect();
            prop_assert_eq!(&got, &want);
            prop_assert!(ProtectedSet::new(got).is_some());
        }

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
