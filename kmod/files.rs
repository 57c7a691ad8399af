// SPDX-License-Identifier: GPL-2.0
//! File access control: the policy half of the file gate.
//!
//! The gate's hooks (`sys/helpers.c`: ftrace callbacks at the entry of
//! `security_file_open`, `security_path_mknod`, `security_inode_create`,
//! `_mkdir`, `_mknod`, `_symlink`, `_unlink`, `_rmdir`, `_rename`, `_link`
//! and `_setattr` for a truncate) call [`gate`] for every open, create,
//! delete, rename, link and truncate by a user task. Only operations on
//! protected files are decided: the file, or any directory above it on its
//! file system, is listed (`proto/src/files.rs`). Everything else costs
//! one lookup. The list is the union of the identities of the appliance's
//! sealed paths, which the module resolves itself from init's root
//! with the roots of the mounts below them from init's mount table
//! ([`resolve`], [`Files::set_sealed`]: root cannot empty them, T-102),
//! and the agent's `FileSets` ([`Files::set_agent_sets`], which only add;
//! all a module without a session has).
//!
//! The hooks run under VFS locks or with preemption disabled, so [`gate`]
//! never sleeps: it answers from the verdict cache or from the answer the
//! thread's last question got; otherwise it returns [`Gate::Ask`], the
//! hook queues a task work and fails the call with `ERESTARTNOINTR`, and
//! [`ask`] asks the agent from that task work as the thread returns to user
//! space (no lock held). The restarted call finds the answer.
//!
//! What each outcome means, by mode, is the exec path's table
//! ([`crate::exec::Refusals::apply`]): enforce refuses with `EACCES`,
//! permissive lets it happen and counts it "would deny". One addition: a
//! new hard link to a protected file from outside every protected set is a
//! way out of the set, not a decision of policy; it is always refused
//! (counted as `file_link_refused`). Counters are in
//! `/sys/kernel/debug/trustbind/file_*`.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use kernel::alloc::{KVVec, KVec};
use kernel::prelude::*;
use kernel::sync::{Mutex, SpinLock};
use kernel::{new_mutex, new_spinlock};

use crate::device::{Answer as Reply, Wait};
use crate::exec::{Refusal, Refusals};
use crate::proto::cache::{ContextClass, ExecKey, Slot as CacheSlot, VerdictCache};
use crate::proto::files::{self, Answer, Answers, Outcome, ProtectedSet, Seen, SeenPlaces, MAX_DEPTH};
use crate::proto::lineage::ProcId;
use crate::proto::{
    Decision, FileAccess, FileRequest, FileSetPaths, FileSets, Mode, Record, Verdict, FILE_CREATE, FILE_LINK,
    FILE_PATH_NAMED, FILE_TO_NAMED,
    FILE_TRUNCATE, MAX_PATH_LEN,
};
use crate::sys::{self, Dentry, FileIdent, FileOp, TaskIds};
use crate::Shared;

/// Cached file verdicts at most (a power of two; ~100 bytes each).
const CACHE_ENTRIES: usize = 4096;
/// A cached verdict is asked again after this long.
const CACHE_TTL_MS: u64 = 10 * 60 * 1000;
/// Threads whose last answer is remembered (direct-mapped by thread id).
const ANSWER_SLOTS: usize = 256;

/// [`Files::dev_hint`] when the entries are on several devices (or none).
const MANY_DEVS: u64 = u64::MAX;

/// The walk's first try looks at this many dentries; deeper files take a
/// second walk with room for [`MAX_DEPTH`].
const SHALLOW: usize = 16;

/// Places remembered with what their walk found (about 48 bytes each).
const SEEN_PLACES: usize = 4096;

/// The program of a process whose executable could not be hashed.
const NO_PROGRAM: [u8; 32] = [0; 32];

/// The gate's answer to a hook.
pub(crate) enum Gate {
    /// Let the operation go on.
    Pass,
    /// Ask from a task work and restart the call.
    Ask,
}

/// Where the protected identities come from.
struct Sources {
    /// The appliance's sealed paths, as the module resolved them.
    sealed: Resolved,
    /// The agent's `FileSets` (with a session: only additions, such as the
    /// roots of mounts below a protected directory).
    agent: KVec<(u64, u64)>,
}

/// One resolved path: its identity, and where its text is in
/// [`Resolved::text`] (offset, length).
type Named = ((u64, u64), usize, usize);

/// The appliance's sealed paths resolved from init's root.
pub(crate) struct Resolved {
    /// Their identities, ascending and unique.
    ids: KVec<(u64, u64)>,
    /// The same identities with the first path that resolved to each.
    names: KVec<Named>,
    /// The paths as the record holds them (each with its NUL).
    text: KVec<u8>,
    /// Paths not found.
    missing: usize,
}

impl Resolved {
    /// Nothing resolved.
    fn empty() -> Resolved {
        Resolved {
            ids: KVec::new(),
            names: KVec::new(),
            text: KVec::new(),
            missing: 0,
        }
    }

    /// The appliance's path of identity `id`, if it is one of its paths.
    fn name_of(&self, id: (u64, u64)) -> Option<&[u8]> {
        let i = self.names.binary_search_by(|n| n.0.cmp(&id)).ok()?;
        let &(_, off, len) = self.names.get(i)?;
        self.text.get(off..off + len)
    }
}

/// Most mounts below the appliance's directories one resolution takes.
const MAX_MOUNTS: usize = 256;
/// Largest mount table read (`/proc/1/mountinfo`).
const MOUNTINFO_MAX: usize = 1 << 20;

/// Resolves the sealed `paths` from init's root ([`sys::init_path_ident`]),
/// and for each directory among them the root of every mount at or below
/// it in init's mount table (the walk up from a file stops at its file
/// system's root, so a file system mounted below a protected directory
/// is listed by its root), named by its mount point. A path not found now
/// is found at a later resolution (the agent sends the order again every
/// 30 s), and so is a mount made since. Sleeps: call with no lock held.
pub(crate) fn resolve(paths: &FileSetPaths<'_>) -> Result<Resolved> {
    let mut found: KVec<Named> = KVec::with_capacity(paths.len(), GFP_KERNEL)?;
    let mut text = KVec::with_capacity(paths.as_bytes().len(), GFP_KERNEL)?;
    text.extend_from_slice(paths.as_bytes(), GFP_KERNEL)?;
    let mut dirs: KVec<(usize, usize)> = KVec::new();
    let mut missing = 0;
    let mut off = 0;
    for p in paths.iter_c() {
        let len = p.len().saturating_sub(1);
        match sys::init_path_ident(p) {
            // The offset orders paths of one identity: the first wins.
            Ok((id, dir)) => {
                found.push((id, off, len), GFP_KERNEL)?;
                if dir {
                    dirs.push((off, len), GFP_KERNEL)?;
                }
            }
            Err(_) => missing += 1,
        }
        off += p.len();
    }
    if !dirs.is_empty() {
        mounts_below(&dirs, &mut text, &mut found)?;
    }
    let n = crate::proto::sorted::sort_unique(&mut found);
    let mut ids = KVec::with_capacity(n, GFP_KERNEL)?;
    let mut names = KVec::with_capacity(n, GFP_KERNEL)?;
    for &e in found.iter().take(n) {
        if ids.last() != Some(&e.0) {
            ids.push(e.0, GFP_KERNEL)?;
            names.push(e, GFP_KERNEL)?;
        }
    }
    Ok(Resolved {
        ids,
        names,
        text,
        missing,
    })
}

/// Adds to `found` the root of every mount in init's mount table whose
/// mount point is at or below one of `dirs` (offset and length of a
/// directory's path in `text`), named by its mount point (appended to
/// `text`); at most [`MAX_MOUNTS`]. A table that cannot be read adds
/// nothing (said once in a while): the next resolution tries again.
fn mounts_below(dirs: &[(usize, usize)], text: &mut KVec<u8>, found: &mut KVec<Named>) -> Result {
    let mut table = KVVec::from_elem(0u8, MOUNTINFO_MAX, GFP_KERNEL)?;
    let n = match sys::init_mountinfo(&mut table) {
        Ok(n) => n,
        Err(e) => {
            if sys::log_ratelimit() {
                pr_warn!("init's mount table not read (errno {}): mounts below protected directories not added\n", e.to_errno());
            }
            return Ok(());
        }
    };
    let mut point = KVec::from_elem(0u8, MAX_PATH_LEN + 1, GFP_KERNEL)?;
    let mut added = 0;
    for field in files::mount_point_fields(table.get(..n).unwrap_or(&[])) {
        let Some(len) = point
            .get_mut(..MAX_PATH_LEN)
            .and_then(|p| files::unescape_mountinfo(field, p))
        else {
            continue;
        };
        let below = point.get(..len).is_some_and(|pt| {
            !pt.contains(&0)
                && dirs
                    .iter()
                    .any(|&(o, l)| text.get(o..o + l).is_some_and(|d| files::at_or_below(pt, d)))
        });
        if !below {
            continue;
        }
        if added == MAX_MOUNTS {
            break;
        }
        if let Some(nul) = point.get_mut(len) {
            *nul = 0;
        }
        if let Ok((id, _)) = sys::init_path_ident(point.get(..=len).unwrap_or(&[])) {
            let off = text.len();
            text.extend_from_slice(point.get(..=len).unwrap_or(&[]), GFP_KERNEL)?;
            found.push((id, off, len), GFP_KERNEL)?;
            added += 1;
        }
    }
    Ok(())
}

/// The protected set, the file verdict cache and the answers.
#[pin_data]
pub(crate) struct Files {
    #[pin]
    sources: Mutex<Sources>,
    #[pin]
    set: SpinLock<ProtectedSet<KVec<(u64, u64)>>>,
    /// Entries in the set: 0 turns the gate off without a lock.
    armed: AtomicUsize,
    /// The one device every entry is on, or [`MANY_DEVS`]: a file on any
    /// other device is unprotected without taking the lock.
    dev_hint: AtomicU64,
    #[pin]
    cache: SpinLock<VerdictCache<KVVec<CacheSlot>>>,
    #[pin]
    answers: SpinLock<Answers<KVVec<Answer>>>,
    /// What the walk from a place found (see [`Place`]).
    #[pin]
    seen: SpinLock<SeenPlaces<KVVec<Seen>>>,
    /// Moves whenever a remembered place may no longer be unprotected
    /// without the dentry tree's version moving: the protected set
    /// changed, or a directory was removed (its inode number may come
    /// back inside a protected set).
    epoch: AtomicU64,
}

impl Files {
    /// Nothing protected.
    pub(crate) fn new() -> Result<impl PinInit<Self, Error>> {
        let set = ProtectedSet::new(KVec::new()).ok_or(EINVAL)?;
        let mut slots = KVVec::new();
        slots.extend_with(CACHE_ENTRIES, CacheSlot::EMPTY, GFP_KERNEL)?;
        let cache = VerdictCache::new(slots, CACHE_TTL_MS).map_err(|_| EINVAL)?;
        let mut a = KVVec::new();
        a.extend_with(ANSWER_SLOTS, Answer::EMPTY, GFP_KERNEL)?;
        let answers = Answers::new(a).ok_or(EINVAL)?;
        let mut places = KVVec::new();
        places.extend_with(SEEN_PLACES, Seen::EMPTY, GFP_KERNEL)?;
        let seen = SeenPlaces::new(places).ok_or(EINVAL)?;
        let sources = Sources {
            sealed: Resolved::empty(),
            agent: KVec::new(),
        };
        Ok(try_pin_init!(Self {
            sources <- new_mutex!(sources, "trustbind_file_sources"),
            set <- new_spinlock!(set, "trustbind_file_set"),
            armed: AtomicUsize::new(0),
            dev_hint: AtomicU64::new(MANY_DEVS),
            cache <- new_spinlock!(cache, "trustbind_file_cache"),
            answers <- new_spinlock!(answers, "trustbind_file_answers"),
            seen <- new_spinlock!(seen, "trustbind_file_seen"),
            epoch: AtomicU64::new(0),
        }? Error))
    }

    /// The agent's `FileSets`: these identities are protected from now
    /// on, with the sealed paths'.
    pub(crate) fn set_agent_sets(&self, sets: &FileSets<'_>) -> Result {
        let mut agent = KVec::with_capacity(sets.len(), GFP_KERNEL)?;
        for e in sets.iter() {
            agent.push(e, GFP_KERNEL)?;
        }
        let mut src = self.sources.lock();
        self.publish(&src.sealed.ids, &agent)?;
        src.agent = agent;
        Ok(())
    }

    /// The appliance's sealed paths, resolved: these identities are
    /// protected from now on, with the agent's. Returns their count if it
    /// differs from the last resolution's identities.
    pub(crate) fn set_sealed(&self, r: Resolved) -> Result<Option<usize>> {
        let mut src = self.sources.lock();
        let n = r.ids.len();
        let changed = src.sealed.ids.as_slice() != r.ids.as_slice();
        if changed {
            self.publish(&r.ids, &src.agent)?;
        }
        let missing = r.missing;
        src.sealed = r;
        // CAST: at most MAX_FILE_SET_PATHS each.
        STATS.paths_resolved.store(n as u64, Ordering::Relaxed);
        STATS.paths_missing.store(missing as u64, Ordering::Relaxed);
        Ok(changed.then_some(n))
    }

    /// Protects the union of `sealed` and `agent` (each ascending and
    /// unique) from now on.
    fn publish(&self, sealed: &[(u64, u64)], agent: &[(u64, u64)]) -> Result {
        let mut v = KVec::with_capacity(sealed.len() + agent.len(), GFP_KERNEL)?;
        for e in files::union(sealed, agent) {
            v.push(e, GFP_KERNEL)?;
        }
        // Ascending and unique by construction; checked again, cheaply.
        let new = ProtectedSet::new(v).ok_or(EINVAL)?;
        let n = new.len();
        let hint = match new.one_dev() {
            Some(d) => d,
            None => MANY_DEVS,
        };
        let mut guard = self.set.lock();
        let old = core::mem::replace(&mut *guard, new);
        self.dev_hint.store(hint, Ordering::Relaxed);
        self.armed.store(n, Ordering::Release);
        // After the new set is in place: a walk of the old set that
        // finishes later remembers its place under the old epoch, which no
        // lookup asks for again.
        self.epoch.fetch_add(1, Ordering::AcqRel);
        drop(guard);
        // CAST: at most MAX_FILE_SET_ENTRIES + MAX_FILE_SET_PATHS.
        STATS.protected.store(n as u64, Ordering::Relaxed);
        drop(old);
        Ok(())
    }

    /// The appliance's generation is now `g`: older verdicts and answers
    /// are dropped.
    pub(crate) fn set_generation(&self, g: u64) {
        if self.cache.lock().set_generation(g) {
            bump(&STATS.cache_flushes);
            self.answers.lock().clear();
        }
    }

    /// A directory is being removed.
    pub(crate) fn dir_removed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    fn protection(&self, d: Dentry<'_>, from_parent: bool) -> bool {
        let Some(dev) = d.dev() else {
            return self.protection_varied(d, from_parent);
        };
        let hint = self.dev_hint.load(Ordering::Relaxed);
        if hint != MANY_DEVS && hint != dev {
            return false;
        }
        // A file opened before: one lookup, no walk.
        let place = d.place(from_parent, dev, self.epoch.load(Ordering::Acquire));
        if let Some(p) = &place {
            if let Some(asks) = self.seen.lock().get(p) {
                bump(&STATS.places_seen);
                return asks;
            }
        }
        // Most files are a few directories deep: a short array first (an
        // array is zeroed on every call).
        let mut inos = [0u64; SHALLOW];
        let mut tree = 0;
        let asks = match d.ancestors(from_parent, &mut inos, None, Some(&mut tree)) {
            Some(n) => self.classify(dev, inos.iter().take(n).copied()),
            None => return self.protection_deep(d, from_parent, dev),
        };
        // Remembered only if the walk saw the tree the place was read in.
        if let Some(p) = place.filter(|p| p.tree == tree) {
            self.seen.lock().put(&p, asks);
        }
        asks
    }

    fn classify(&self, dev: u64, inos: impl Iterator<Item = u64>) -> bool {
        self.set.lock().classify(dev, inos).asks()
    }

    /// [`Self::protection`] for a file deeper than [`SHALLOW`] (or
    /// disconnected).
    #[inline(never)]
    fn protection_deep(&self, d: Dentry<'_>, from_parent: bool, dev: u64) -> bool {
        let mut inos = [0u64; MAX_DEPTH];
        match d.ancestors(from_parent, &mut inos, None, None) {
            Some(n) => self.classify(dev, inos.iter().take(n).copied()),
            // Deeper than the walk goes, or disconnected: fail closed.
            None => true,
        }
    }

    /// [`Self::protection`] on a file system whose inodes report devices
    /// of their own (btrfs subvolumes, T-98): every dentry of the walk
    /// with its own device. Kept out of line so the common walk's frame
    /// holds one short array.
    #[inline(never)]
    fn protection_varied(&self, d: Dentry<'_>, from_parent: bool) -> bool {
        let (mut inos, mut devs) = ([0u64; MAX_DEPTH], [0u64; MAX_DEPTH]);
        match d.ancestors(from_parent, &mut inos, Some(&mut devs), None) {
            Some(n) => self
                .set
                .lock()
                .classify_ids(devs.iter().copied().zip(inos.iter().copied()).take(n))
                .asks(),
            None => true,
        }
    }

    /// The path of `d` (with `from_parent`, a new name in its directory)
    /// as the appliance names it, into `out`: the appliance's path of the
    /// nearest of its protected files and directories the walk up from
    /// `d` meets, then the components of `fs_path` (`d`'s path from its
    /// file system's root) below it. `None` when the walk meets none (the
    /// file is protected through the agent's identities only), goes
    /// deeper than it looks, or the parts do not agree (a rename raced).
    /// Sleeps (the sources' mutex): from the task work only.
    #[inline(never)]
    fn named(&self, d: Dentry<'_>, from_parent: bool, fs_path: &[u8], out: &mut [u8]) -> Option<usize> {
        let mut inos = [0u64; MAX_DEPTH];
        let mut devs = [0u64; MAX_DEPTH];
        let n = d.ancestors(from_parent, &mut inos, Some(&mut devs), None)?;
        let src = self.sources.lock();
        let (k, base) = devs
            .iter()
            .zip(inos.iter())
            .take(n)
            .enumerate()
            .find_map(|(k, (&dev, &ino))| Some((k, src.sealed.name_of((dev, ino))?)))?;
        files::named_path(base, fs_path, k + usize::from(from_parent), out)
    }

    /// What `op` is about, if it touches a protected file.
    fn plan(&self, op: &FileOp) -> Plan {
        let d = op.object();
        let (access, flags, from_parent) = match op.op {
            sys::FOP_OPEN if op.write != 0 => (
                FileAccess::Write,
                if op.trunc != 0 { FILE_TRUNCATE } else { 0 },
                false,
            ),
            sys::FOP_OPEN => (FileAccess::Read, 0, false),
            sys::FOP_NEW => (FileAccess::Write, FILE_CREATE, true),
            sys::FOP_DELETE => (FileAccess::Delete, 0, false),
            sys::FOP_TRUNCATE => (FileAccess::Write, FILE_TRUNCATE, false),
            sys::FOP_RENAME => (FileAccess::Rename, 0, false),
            sys::FOP_LINK => (FileAccess::Write, FILE_LINK | FILE_CREATE, false),
            _ => return Plan::Pass,
        };
        let here = self.protection(d, from_parent);
        let there = match op.new_name() {
            Some(n) if matches!(op.op, sys::FOP_RENAME | sys::FOP_LINK) => {
                self.protection(n, true)
            }
            _ => false,
        };
        if op.op == sys::FOP_LINK && here && !there {
            return Plan::LinkOut;
        }
        if !here && !there {
            return Plan::Pass;
        }
        match d.ident(from_parent) {
            Some(id) => Plan::Decide(Target {
                id,
                access,
                flags,
                from_parent,
            }),
            // A negative dentry where a file was expected: nothing to
            // decide (the VFS fails the operation itself).
            None => Plan::Pass,
        }
    }
}

/// The object and access of a decided operation.
#[derive(Clone, Copy)]
struct Target {
    /// The file, or the directory of a new name.
    id: FileIdent,
    access: FileAccess,
    flags: u8,
    /// The object is a new name: the walk starts at its directory.
    from_parent: bool,
}

enum Plan {
    Pass,
    LinkOut,
    Decide(Target),
}

/// Counters in debugfs (`file_*`).
pub(crate) struct Stats {
    /// Protected identities (gauge).
    pub(crate) protected: AtomicU64,
    /// Identities the module resolved from the appliance's paths (gauge).
    pub(crate) paths_resolved: AtomicU64,
    /// The appliance's paths not found at their last resolution (gauge).
    pub(crate) paths_missing: AtomicU64,
    /// Walks answered by a remembered place.
    pub(crate) places_seen: AtomicU64,
    /// Operations on protected files decided.
    pub(crate) checked: AtomicU64,
    /// Of these, answered by the cache.
    pub(crate) cache_hits: AtomicU64,
    /// Of these, answered by the thread's last question.
    pub(crate) answers_used: AtomicU64,
    /// Questions queued (the call restarted).
    pub(crate) restarts: AtomicU64,
    /// Misses in a call that cannot be restarted: decided by mode.
    pub(crate) unrestartable: AtomicU64,
    /// Questions sent to the agent.
    pub(crate) asked: AtomicU64,
    /// Of these, allowed.
    pub(crate) allowed: AtomicU64,
    /// New hard links out of every protected set.
    pub(crate) link_refused: AtomicU64,
    /// Verdicts stored in the cache.
    pub(crate) cache_stored: AtomicU64,
    /// Cache flushes (the generation moved).
    pub(crate) cache_flushes: AtomicU64,
    /// Refusals, by mode and cause.
    pub(crate) refusals: Refusals,
}

pub(crate) static STATS: Stats = Stats {
    protected: AtomicU64::new(0),
    paths_resolved: AtomicU64::new(0),
    paths_missing: AtomicU64::new(0),
    places_seen: AtomicU64::new(0),
    checked: AtomicU64::new(0),
    cache_hits: AtomicU64::new(0),
    answers_used: AtomicU64::new(0),
    restarts: AtomicU64::new(0),
    unrestartable: AtomicU64::new(0),
    asked: AtomicU64::new(0),
    allowed: AtomicU64::new(0),
    link_refused: AtomicU64::new(0),
    cache_stored: AtomicU64::new(0),
    cache_flushes: AtomicU64::new(0),
    refusals: Refusals::new(),
};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// How a refusal names the operation in the log.
struct Shown<'a>(&'a Target, &'a TaskIds);

impl core::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let t = self.0;
        let what = match (t.access, t.flags) {
            (FileAccess::Read, _) => "read",
            (FileAccess::Write, fl) if fl & FILE_LINK != 0 => "link",
            (FileAccess::Write, fl) if fl & FILE_CREATE != 0 => "create in",
            (FileAccess::Write, fl) if fl & FILE_TRUNCATE != 0 => "truncate",
            (FileAccess::Write, _) => "write",
            (FileAccess::Delete, _) => "delete",
            (FileAccess::Rename, _) => "rename",
        };
        let (major, minor) = files::dev_numbers(t.id.dev);
        write!(
            f,
            "{} inode {} on {}:{} by pid {} uid {}",
            what,
            t.id.ino,
            major,
            minor,
            self.1.tgid,
            self.1.uid
        )
    }
}

fn class_of(ids: &TaskIds) -> ContextClass {
    ContextClass {
        uid: ids.uid,
        euid: ids.euid,
        gid: ids.gid,
        loginuid: ids.loginuid,
    }
}

fn proc_of(ids: &TaskIds) -> ProcId {
    ProcId {
        tgid: ids.tgid,
        start_ns: ids.start_ns,
    }
}

fn key_of(t: &Target, program: &[u8; 32], ids: &TaskIds) -> ExecKey {
    files::file_key(
        t.id.dev,
        t.id.ino,
        t.id.generation,
        t.access,
        t.flags,
        program,
        class_of(ids),
    )
}

fn refusal_of(o: Outcome) -> Option<Refusal> {
    match o {
        Outcome::Allowed => None,
        Outcome::Denied => Some(Refusal::Denied),
        Outcome::NoAgent => Some(Refusal::NoAgent),
        Outcome::TimedOut => Some(Refusal::TimedOut),
        Outcome::Busy => Some(Refusal::Busy),
        Outcome::Unreadable => Some(Refusal::Unreadable(EIO)),
    }
}

/// Whether the gate is on for this task at all.
fn gated(s: &Shared, ids: &TaskIds) -> Option<Mode> {
    if s.files.armed.load(Ordering::Acquire) == 0 {
        return None;
    }
    let mode = s.channel.mode();
    if mode == Mode::Disabled || s.channel.is_agent(ids.tgid) {
        return None;
    }
    Some(mode)
}

/// Decides `op` from what the module knows, without sleeping.
pub(crate) fn gate(s: &Shared, op: &FileOp) -> Result<Gate> {
    if s.files.armed.load(Ordering::Acquire) == 0 {
        return Ok(Gate::Pass);
    }
    let mode = s.channel.mode();
    if mode == Mode::Disabled {
        return Ok(Gate::Pass);
    }
    // Whether the file is protected first: most are not, and that needs
    // nothing of the task.
    let plan = s.files.plan(op);
    if let Plan::Pass = plan {
        return Ok(Gate::Pass);
    }
    let ids = sys::current_ids();
    if s.channel.is_agent(ids.tgid) {
        return Ok(Gate::Pass);
    }
    let t = match plan {
        Plan::Pass => return Ok(Gate::Pass),
        Plan::LinkOut => {
            bump(&STATS.link_refused);
            let t = Target {
                id: op.object().ident(false).unwrap_or(FileIdent {
                    dev: 0,
                    fs_dev: 0,
                    ino: 0,
                    generation: 0,
                }),
                access: FileAccess::Write,
                flags: FILE_LINK,
                from_parent: false,
            };
            return STATS
                .refusals
                .apply(mode, &Refusal::Denied, "file (hard link out of its set)", Shown(&t, &ids))
                .map(|()| Gate::Pass);
        }
        Plan::Decide(t) => t,
    };
    bump(&STATS.checked);
    let now = sys::now_ms();
    // A program the lineage table does not know is hashed by the
    // question, which then records it (or, if it cannot be hashed,
    // leaves that answer under no program).
    let Some(program) = s.lineage.program(proc_of(&ids)) else {
        let key = key_of(&t, &NO_PROGRAM, &ids);
        return match s.files.answers.lock().get(ids.pid, &key, &NO_PROGRAM, now) {
            Some(o) => apply(mode, o, &t, &ids),
            None => Ok(restart()),
        };
    };
    let key = key_of(&t, &program, &ids);
    let cached = s.files.cache.lock().lookup(&key, now);
    let outcome = match cached {
        Some((v, sha)) if sha == program => {
            bump(&STATS.cache_hits);
            decided(&v)
        }
        _ => match s.files.answers.lock().get(ids.pid, &key, &program, now) {
            Some(o) => {
                bump(&STATS.answers_used);
                o
            }
            None => return Ok(Gate::Ask),
        },
    };
    apply(mode, outcome, &t, &ids)
}

/// The question is queued and the call restarted (counted here: the hook
/// decides by mode if it cannot queue it).
fn restart() -> Gate {
    bump(&STATS.restarts);
    Gate::Ask
}

fn decided(v: &Verdict) -> Outcome {
    match v.decision {
        Decision::Allow | Decision::AllowWithConditions => Outcome::Allowed,
        Decision::Deny => Outcome::Denied,
    }
}

fn apply(mode: Mode, o: Outcome, t: &Target, ids: &TaskIds) -> Result<Gate> {
    match refusal_of(o) {
        None => Ok(Gate::Pass),
        Some(r) => STATS
            .refusals
            .apply(mode, &r, "file", Shown(t, ids))
            .map(|()| Gate::Pass),
    }
}

/// A question [`gate`] wanted could not be queued (the call cannot be
/// restarted, or no memory): decided by mode, like a full queue.
pub(crate) fn unasked(s: &Shared, op: &FileOp) -> Result {
    let ids = sys::current_ids();
    let Some(mode) = gated(s, &ids) else {
        return Ok(());
    };
    let Plan::Decide(t) = s.files.plan(op) else {
        return Ok(());
    };
    bump(&STATS.unrestartable);
    apply(mode, Outcome::Busy, &t, &ids).map(|_| ())
}

/// Asks the agent about `op`, from the task work (may sleep), and leaves
/// the answer where the restarted call finds it.
pub(crate) fn ask(s: &Shared, op: &FileOp) -> Result {
    let ids = sys::current_ids();
    if gated(s, &ids).is_none() {
        return Ok(());
    }
    let Plan::Decide(t) = s.files.plan(op) else {
        return Ok(());
    };
    let (program, chain, source) = match crate::net::program_of(s, proc_of(&ids), &crate::net::UNIX_STATS.exe_hashed, || {
        s.hashers.hash_current_exe().map(|(h, _, _)| h)
    }) {
        Ok(p) => p,
        Err(_) => {
            // Not asked: the restarted call finds this answer.
            let key = key_of(&t, &NO_PROGRAM, &ids);
            s.files.answers.lock().put(
                ids.pid,
                &key,
                &NO_PROGRAM,
                Outcome::Unreadable,
                sys::now_ms(),
            );
            return Ok(());
        }
    };
    let key = key_of(&t, &program, &ids);
    let mut path = KVec::from_elem(0u8, MAX_PATH_LEN + 1, GFP_KERNEL)?;
    let mut to = KVec::from_elem(0u8, MAX_PATH_LEN + 1, GFP_KERNEL)?;
    let mut path_named = KVec::from_elem(0u8, MAX_PATH_LEN, GFP_KERNEL)?;
    let mut to_named = KVec::new();
    let mut flags = t.flags;
    // The paths as the appliance named its protected sets, where the walk
    // meets one of its paths (T-102); otherwise from the file system's
    // root, for the agent to map.
    let fs_path = op.object().path(&mut path)?;
    let path = match s.files.named(op.object(), t.from_parent, fs_path, &mut path_named) {
        Some(n) => {
            flags |= FILE_PATH_NAMED;
            path_named.get(..n).unwrap_or(&[])
        }
        None => fs_path,
    };
    let to: &[u8] = match op.new_name() {
        Some(n) if matches!(op.op, sys::FOP_RENAME | sys::FOP_LINK) => {
            let fs_to = n.path(&mut to)?;
            to_named.extend_with(MAX_PATH_LEN, 0u8, GFP_KERNEL)?;
            match s.files.named(n, true, fs_to, &mut to_named) {
                Some(len) => {
                    flags |= FILE_TO_NAMED;
                    to_named.get(..len).unwrap_or(&[])
                }
                None => fs_to,
            }
        }
        _ => &[],
    };
    let rec = Record::FileRequest(FileRequest {
        access: t.access,
        flags,
        sha256: program,
        program_source: source,
        uid: ids.uid,
        euid: ids.euid,
        gid: ids.gid,
        loginuid: ids.loginuid,
        sessionid: ids.sessionid,
        pid: ids.tgid,
        ppid: ids.ptgid,
        dev: t.id.fs_dev,
        ino: t.id.ino,
        ancestry: crate::net::ancestry(&chain),
        path,
        to,
    });
    bump(&STATS.asked);
    let outcome = match s.channel.ask(&rec, ids.uid, Wait::Interruptible) {
        Reply::Verdict(v) => {
            store(s, &key, &v, &program);
            decided(&v)
        }
        // Not an answer to a file request.
        Reply::Key(mut k) => {
            k.wipe();
            Outcome::Denied
        }
        Reply::Grant(mut g) => {
            g.wipe();
            Outcome::Denied
        }
        Reply::NoAgent => Outcome::NoAgent,
        Reply::TimedOut => Outcome::TimedOut,
        Reply::Busy => Outcome::Busy,
        // The signal is delivered, the call restarts and asks again.
        Reply::Interrupted => return Ok(()),
    };
    if outcome == Outcome::Allowed {
        bump(&STATS.allowed);
    }
    s.files
        .answers
        .lock()
        .put(ids.pid, &key, &program, outcome, sys::now_ms());
    Ok(())
}

/// Stores `v` if it may be cached; a newer generation flushes first.
fn store(s: &Shared, key: &ExecKey, v: &Verdict, program: &[u8; 32]) {
    let mut c = s.files.cache.lock();
    if v.policy_generation > c.generation() {
        c.set_generation(v.policy_generation);
        bump(&STATS.cache_flushes);
    }
    if c.insert(key, v, program, sys::now_ms()) {
        bump(&STATS.cache_stored);
    }
}
