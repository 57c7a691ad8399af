// SPDX-License-Identifier: GPL-2.0
//! Exec qualification: the policy half of the binfmt handler.
//!
//! Every exec reaches [`check`] before any real binary handler (ELF,
//! script, ...). It hashes the file being executed in the kernel, asks the
//! agent through the channel, and enforces the answer according to the
//! mode. A `#!` script comes through twice: first as the script, then as
//! its interpreter (the kernel re-runs the handlers with `bprm->file` set
//! to the interpreter), so both are qualified.
//!
//! What each outcome means, by mode (the one place this is decided):
//!
//! | outcome                     | enforce  | permissive         |
//! |-----------------------------|----------|--------------------|
//! | allow (with conditions)     | run      | run                |
//! | deny                        | `EACCES` | run, "would deny"  |
//! | no agent / no answer in time| `EACCES` | run, "would deny"  |
//! | file cannot be read/hashed  | `EACCES` | run, "would deny"  |
//! | signal while waiting        | restart the exec                |
//!
//! In disabled mode nothing is hashed or asked. The agent's own execs are
//! exempt (it must be able to run while nothing answers), and so is an exec
//! of the agent's own binary, unchanged, while no agent is connected (the
//! "pinned agent binary": a dead agent can be restarted in enforce mode). Counters of all
//! this are in `/sys/kernel/debug/trustbind/exec_*`.
//!
//! Verdicts are cached ([`Cache`], logic in `proto/src/cache.rs`) by file
//! identity and change cookie, context class and policy generation; a hit
//! skips hashing and the agent. Files on a file system without a change
//! cookie are never cached. Obligations: `nice` is applied here, to the
//! exec'ing task (also on a cache hit); a CPU-time limit is applied by the
//! agent with `prlimit(2)` while the exec waits for its verdict, so such
//! verdicts are never cached.
//!
//! The loader gate ([`check_loader`], an fsnotify `FS_OPEN_EXEC_PERM` mark
//! on every file system a program was exec'd from) qualifies what an exec
//! opens itself once under way: the ELF loader (`PT_INTERP`), a `#!`
//! interpreter and a binfmt_misc interpreter, with the same table of
//! outcomes. An interpreter the gate allowed is not asked again when the
//! binfmt handler sees it in the next round ([`LoaderState`]). `ld.so
//! ./prog` is not an exec to the kernel: the loader is qualified as the
//! program, and `./prog` is only read and mapped by it.

use core::sync::atomic::{AtomicU64, Ordering};
use kernel::alloc::{KVVec, KVec};
use kernel::new_spinlock;
use kernel::rbtree::{RBTree, RBTreeNode};
use kernel::prelude::*;
use kernel::sync::SpinLock;

use crate::device::{Answer, Wait};
use crate::proto::cache::{ContextClass, ExecKey, Slot as CacheSlot, VerdictCache};
use crate::proto::lineage::{
    Chain, Forked, Image, Lineage as LineageTable, Pending, ProcId, ProcTable, Staged,
};
use crate::proto::unqualifiable;
use crate::proto::{
    Ancestry, Decision, ExecRequest, Mode, Obligations, Record, Verdict, EXEC_LOADER_DIRECT,
    MAX_PATH_LEN,
};
use crate::sys::{self, Bprm, ElfKind, ExecInfo, ExecOpen};
use crate::Shared;

/// Cached verdicts at most (a power of two; ~100 bytes each).
const CACHE_ENTRIES: usize = 4096;
/// A cached verdict is asked again after this long.
const CACHE_TTL_MS: u64 = 10 * 60 * 1000;

/// The exec verdict cache, shared by all execs.
#[pin_data]
pub(crate) struct Cache {
    #[pin]
    inner: SpinLock<VerdictCache<KVVec<CacheSlot>>>,
}

impl Cache {
    /// An empty cache of [`CACHE_ENTRIES`] entries.
    pub(crate) fn new() -> Result<impl PinInit<Self, Error>> {
        let mut slots = KVVec::new();
        slots.extend_with(CACHE_ENTRIES, CacheSlot::EMPTY, GFP_KERNEL)?;
        let cache = VerdictCache::new(slots, CACHE_TTL_MS).map_err(|_| EINVAL)?;
        Ok(try_pin_init!(Self {
            inner <- new_spinlock!(cache, "trustbind_exec_cache"),
        }? Error))
    }

    fn lookup(&self, key: &ExecKey) -> Option<(Verdict, [u8; 32])> {
        self.inner.lock().lookup(key, sys::now_ms())
    }

    /// Stores `v` if it may be cached. A verdict of a newer generation
    /// moves the cache to it first (dropping older entries).
    fn store(&self, key: &ExecKey, v: &Verdict, sha256: &[u8; 32]) {
        let mut c = self.inner.lock();
        if v.policy_generation > c.generation() {
            c.set_generation(v.policy_generation);
            bump(&STATS.cache_flushes);
        }
        if c.insert(key, v, sha256, sys::now_ms()) {
            bump(&STATS.cache_stored);
        }
    }

    /// The appliance's generation is now `g` (pushed through the agent).
    /// Whether the generation moved (the cache was flushed).
    pub(crate) fn set_generation(&self, g: u64) -> bool {
        let moved = self.inner.lock().set_generation(g);
        if moved {
            bump(&STATS.cache_flushes);
        }
        moved
    }
}

/// Execs allowed and not yet committed (direct-mapped by thread id).
const STAGED_SLOTS: usize = 1024;

/// One entry per known process (see `proto/src/lineage.rs`): an rbtree
/// keyed by (tgid, start time), about 330 bytes an entry (a kmalloc-512
/// object). New entries are made in the fork tracepoint, which may not
/// sleep: `GFP_NOWAIT`, and a child that finds no memory is unknown
/// (counted as `lineage_lost`).
struct Procs {
    tree: RBTree<ProcId, Image>,
    /// Number of entries (the rbtree does not count).
    n: usize,
}

impl ProcTable for Procs {
    fn get(&self, p: &ProcId) -> Option<&Image> {
        self.tree.get(p)
    }

    fn put(&mut self, p: ProcId, img: Image) -> bool {
        if let Some(v) = self.tree.get_mut(&p) {
            *v = img;
            return true;
        }
        match RBTreeNode::new(p, img, GFP_NOWAIT | __GFP_NOWARN) {
            Ok(node) => {
                self.tree.insert(node);
                self.n += 1;
                self.gauge();
                true
            }
            Err(_) => false,
        }
    }

    fn remove(&mut self, p: &ProcId) {
        if self.tree.remove(p).is_some() {
            self.n -= 1;
            self.gauge();
        }
    }

    fn len(&self) -> usize {
        self.n
    }
}

impl Procs {
    /// Publishes the entry count (`lineage_procs`), under the table's lock
    /// like the count itself.
    fn gauge(&self) {
        // CAST: a count of processes.
        STATS.lineage_procs.store(self.n as u64, Ordering::Relaxed);
    }
}

struct LineageInner {
    table: LineageTable<Procs>,
    staged: Pending<KVVec<Staged>>,
}

/// Which program each process runs (logic in `proto/src/lineage.rs`). An
/// allowed program is staged and only recorded when its exec commits.
#[pin_data]
pub(crate) struct Lineage {
    #[pin]
    inner: SpinLock<LineageInner>,
}

impl Lineage {
    /// An empty table: processes that exist now are unknown.
    pub(crate) fn new() -> Result<impl PinInit<Self, Error>> {
        let table = LineageTable::new(Procs {
            tree: RBTree::new(),
            n: 0,
        });
        let mut slots = KVVec::new();
        slots.extend_with(STAGED_SLOTS, Staged::EMPTY, GFP_KERNEL)?;
        let staged = Pending::new(slots).ok_or(EINVAL)?;
        Ok(try_pin_init!(Self {
            inner <- new_spinlock!(LineageInner { table, staged }, "trustbind_lineage"),
        }? Error))
    }

    fn ancestry_of(&self, info: &ExecInfo) -> Chain {
        self.inner.lock().table.ancestry(proc_of(info))
    }

    /// The exec `info` describes was allowed to run `sha256`: recorded if
    /// and when it commits ([`Lineage::committed`]).
    fn stage(&self, info: &ExecInfo, sha256: &[u8; 32], chain: &Chain) {
        self.inner
            .lock()
            .staged
            .stage(info.pid, proc_of(info), sha256, chain)
    }

    /// Thread `pid` begins an exec: nothing an earlier, failed exec staged
    /// may be committed for it.
    fn unstage(&self, pid: u32) {
        self.inner.lock().staged.unstage(pid)
    }

    /// The exec of thread `pid` committed in `proc`: what it staged now
    /// runs, or, if nothing was, `proc` is unknown. Whether something
    /// staged was recorded.
    fn committed(&self, pid: u32, proc: ProcId) -> bool {
        let mut g = self.inner.lock();
        let staged = g.staged.take(pid).map(|(_, sha256, chain)| (sha256, chain));
        let had = staged.is_some();
        had && g.table.committed(proc, staged)
    }

    /// `child` was forked by `parent` (a new process).
    pub(crate) fn forked(&self, parent: ProcId, child: ProcId) -> Forked {
        self.inner.lock().table.forked(parent, child)
    }

    /// The whole thread group of `proc` exited.
    pub(crate) fn exited(&self, proc: ProcId) {
        self.inner.lock().table.exited(proc)
    }

    /// The program `proc` was recorded running and its ancestry, if this
    /// very process is known.
    pub(crate) fn image(&self, proc: ProcId) -> Option<([u8; 32], Chain)> {
        self.inner.lock().table.image(proc)
    }

    /// The program `proc` was recorded running, if this very process is
    /// known (the file gate's lookup: no ancestry copied).
    pub(crate) fn program(&self, proc: ProcId) -> Option<[u8; 32]> {
        self.inner.lock().table.program(proc)
    }

    /// Records that `proc` runs `sha256` (hashed from its `mm->exe_file`),
    /// with no ancestry (its own is unknown).
    pub(crate) fn record_proc(&self, proc: ProcId, sha256: &[u8; 32]) {
        let _ = self.inner.lock().table.record(proc, sha256, &Chain::EMPTY);
    }
}

fn proc_of(info: &ExecInfo) -> ProcId {
    ProcId {
        tgid: info.tgid,
        start_ns: info.start_ns,
    }
}

/// Remembered loader-gate approvals (direct-mapped by thread id).
const SEEN_SLOTS: usize = 256;

/// A file the loader gate allowed a thread to open during its exec.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    pid: u32,
    dev: u64,
    ino: u64,
    generation: u32,
    change_cookie: u64,
}

impl Seen {
    fn of(info: &ExecInfo) -> Seen {
        Seen {
            pid: info.pid,
            dev: info.dev,
            ino: info.ino,
            generation: info.generation,
            change_cookie: if info.has_change_cookie != 0 {
                info.change_cookie
            } else {
                // Without a cookie a rewrite in place cannot be told apart:
                // never match (the interpreter is asked again).
                u64::MAX
            },
        }
    }
}

struct LoaderInner {
    seen: KVVec<Seen>,
    /// The exec of the pinned agent binary allowed with no agent connected
    /// (thread id, group leader start): its loader is let through too.
    pinned: Option<(u32, u64)>,
    /// By thread (direct-mapped like `seen`): the thread's exec in progress
    /// is of a native ELF file, so the next file the gate sees it open is
    /// that program's `PT_INTERP` loader. 0 when not.
    elf_exec: KVVec<u32>,
}

/// State the loader gate shares with the binfmt handler.
#[pin_data]
pub(crate) struct LoaderState {
    #[pin]
    inner: SpinLock<LoaderInner>,
}

impl LoaderState {
    /// Empty.
    pub(crate) fn new() -> Result<impl PinInit<Self, Error>> {
        let mut seen = KVVec::new();
        seen.extend_with(SEEN_SLOTS, Seen::default(), GFP_KERNEL)?;
        let mut elf_exec = KVVec::new();
        elf_exec.extend_with(SEEN_SLOTS, 0u32, GFP_KERNEL)?;
        let inner = LoaderInner {
            seen,
            pinned: None,
            elf_exec,
        };
        Ok(try_pin_init!(Self {
            inner <- new_spinlock!(inner, "trustbind_loader"),
        }? Error))
    }

    /// A thread starts an exec of a file (the binfmt handler's first
    /// round): remembers whether it is a native ELF file.
    fn exec_started(&self, info: &ExecInfo, native_elf: bool) {
        if let Some(e) = self.inner.lock().elf_exec.get_mut(Self::slot(info.pid)) {
            *e = if native_elf { info.pid } else { 0 };
        }
    }

    /// The gate sees a thread open a file during its exec: whether it is
    /// the `PT_INTERP` loader of the native ELF program the thread execs
    /// (the first such open; consumed).
    fn exec_opened(&self, info: &ExecInfo) -> bool {
        match self.inner.lock().elf_exec.get_mut(Self::slot(info.pid)) {
            Some(e) if *e == info.pid && info.pid != 0 => {
                *e = 0;
                true
            }
            _ => false,
        }
    }

    fn slot(pid: u32) -> usize {
        pid as usize % SEEN_SLOTS
    }

    /// The gate allowed `info`'s file for its thread.
    fn allowed(&self, info: &ExecInfo) {
        let seen = Seen::of(info);
        if seen.change_cookie == u64::MAX {
            return;
        }
        if let Some(e) = self.inner.lock().seen.get_mut(Self::slot(info.pid)) {
            *e = seen;
        }
    }

    /// Whether the gate just allowed exactly this file for this thread
    /// (consumed: one approval covers one round).
    fn take(&self, info: &ExecInfo) -> bool {
        let want = Seen::of(info);
        let mut g = self.inner.lock();
        match g.seen.get_mut(Self::slot(info.pid)) {
            Some(e) if want.change_cookie != u64::MAX && *e == want => {
                *e = Seen::default();
                true
            }
            _ => false,
        }
    }

    fn set_pinned(&self, info: &ExecInfo) {
        self.inner.lock().pinned = Some((info.pid, info.start_ns));
    }

    fn is_pinned_exec(&self, info: &ExecInfo) -> bool {
        self.inner.lock().pinned == Some((info.pid, info.start_ns))
    }
}

/// What one check is about: the file the binfmt handler sees, or a file
/// the exec opens itself (loader gate).
trait Subject {
    /// The file's identity and the exec'ing task's context.
    fn info(&self) -> Result<ExecInfo>;
    /// SHA-256 and SHA-1 of the whole file.
    fn hash(&self, h: &sys::Hashers) -> Result<([u8; 32], [u8; 20])>;
    /// The path shown to the agent and in logs.
    fn path(&mut self) -> &[u8];
    /// Whether an allowed file becomes the process's program (recorded
    /// for ancestry). A loader or interpreter opened by the gate does not.
    fn is_program(&self) -> bool;
    /// Whether the file is an ELF file of this machine (only asked of
    /// programs).
    fn is_native_elf(&self) -> bool {
        false
    }
    /// Whether the file is an ELF program loader, from its content.
    fn elf_kind(&self) -> Result<ElfKind>;
}

struct ByHandler<'a, 'b>(&'a Bprm<'b>);

impl Subject for ByHandler<'_, '_> {
    fn info(&self) -> Result<ExecInfo> {
        let mut info = self.0.info()?;
        // A set-uid program runs with its owner's euid, applied only once
        // the exec commits: ask with that one (T-10). Only a native ELF
        // file's own bit counts (a script's is ignored by the kernel; its
        // interpreter's round asks again).
        if self.0.is_native_elf() {
            let (mode, owner, honoured) = self.0.setid();
            info.euid = crate::proto::exec_euid(info.euid, mode, owner, honoured);
        }
        Ok(info)
    }
    fn hash(&self, h: &sys::Hashers) -> Result<([u8; 32], [u8; 20])> {
        h.hash_file(self.0)
    }
    fn path(&mut self) -> &[u8] {
        self.0.path().as_bytes()
    }
    fn is_program(&self) -> bool {
        true
    }
    fn is_native_elf(&self) -> bool {
        self.0.is_native_elf()
    }
    fn elf_kind(&self) -> Result<ElfKind> {
        self.0.elf_kind()
    }
}

struct ByGate<'a, 'b> {
    open: &'a ExecOpen<'b>,
    /// The name, resolved on first use: (buffer, start, end).
    name: Option<(KVec<u8>, usize, usize)>,
}

const UNKNOWN_PATH: &[u8] = b"<path unavailable>";

impl Subject for ByGate<'_, '_> {
    fn info(&self) -> Result<ExecInfo> {
        self.open.info()
    }
    fn hash(&self, h: &sys::Hashers) -> Result<([u8; 32], [u8; 20])> {
        h.hash_open(self.open)
    }
    fn path(&mut self) -> &[u8] {
        if self.name.is_none() {
            let mut buf = KVec::new();
            if buf.extend_with(sys::PATH_BUF, 0u8, GFP_KERNEL).is_err() {
                return UNKNOWN_PATH;
            }
            let base = buf.as_ptr() as usize;
            let range = match self.open.name(&mut buf) {
                Ok(n) => {
                    let start = n.as_ptr() as usize - base;
                    (start, start + n.len())
                }
                Err(_) => return UNKNOWN_PATH,
            };
            self.name = Some((buf, range.0, range.1));
        }
        match &self.name {
            Some((buf, a, b)) => &buf[*a..*b],
            None => UNKNOWN_PATH,
        }
    }
    fn is_program(&self) -> bool {
        false
    }
    fn elf_kind(&self) -> Result<ElfKind> {
        self.open.elf_kind()
    }
}

/// The cache key of this exec, if its file system has a change cookie;
/// `as_loader` for a file opened as a native ELF program's `PT_INTERP`.
fn cache_key(info: &ExecInfo, as_loader: bool) -> Option<ExecKey> {
    (info.has_change_cookie != 0).then(|| ExecKey {
        dev: info.dev,
        ino: info.ino,
        generation: info.generation,
        change_cookie: info.change_cookie,
        class: ContextClass {
            uid: info.uid,
            euid: info.euid,
            gid: info.gid,
            loginuid: info.loginuid,
        },
        as_loader,
    })
}

/// What the exec path did since load (shown in debugfs, see `pem.rs`).
pub(crate) struct Stats {
    /// Execs hashed and asked about (not disabled mode, not the agent).
    pub(crate) asked: AtomicU64,
    /// Allowed by a verdict.
    pub(crate) allowed: AtomicU64,
    /// Refusals (`EACCES` in enforce mode) and why.
    pub(crate) refusals: Refusals,
    /// Execs decided from the cache (not hashed, not asked).
    pub(crate) cache_hits: AtomicU64,
    /// Execs that looked in the cache and found nothing.
    pub(crate) cache_misses: AtomicU64,
    /// Verdicts stored in the cache.
    pub(crate) cache_stored: AtomicU64,
    /// Times the policy generation moved and the cache was emptied.
    pub(crate) cache_flushes: AtomicU64,
    /// Execs of the pinned agent binary (and its loader) allowed with no
    /// agent connected.
    pub(crate) pinned_agent: AtomicU64,
    /// Exec-time opens (ELF loader, interpreters) seen by the loader gate.
    pub(crate) loader_opens: AtomicU64,
    /// Interpreter rounds the gate had already decided (not asked again).
    pub(crate) loader_dedup: AtomicU64,
    /// Execs of an ELF loader run as the program (`ld.so ./prog`).
    pub(crate) loader_direct: AtomicU64,
    /// Allowed execs that committed (their program now runs, recorded for
    /// ancestry).
    pub(crate) committed: AtomicU64,
    /// Execs whose wait for a verdict a signal ended (restarted).
    ///
    /// Every exec the module decides ends in exactly one of `allowed`,
    /// `refusals.denied`, `refusals.would_deny`, `pinned_agent` or this,
    /// and started as a cache hit or as `asked` (or, with no readable
    /// identity, as an `unreadable` refusal): the soak checks the sums.
    pub(crate) interrupted: AtomicU64,
    /// Processes the lineage table knows now (a gauge).
    pub(crate) lineage_procs: AtomicU64,
    /// Forked processes whose entry found no memory (they are unknown).
    pub(crate) lineage_lost: AtomicU64,
    /// `PR_SET_MM_EXE_FILE` / `PR_SET_MM_MAP` exe changes refused
    /// (enforce mode).
    pub(crate) exe_replace_refused: AtomicU64,
    /// ... and let through (permissive mode: recorded, not refused).
    pub(crate) exe_replace_would_deny: AtomicU64,
}

/// The exec path's counters.
pub(crate) static STATS: Stats = Stats {
    asked: AtomicU64::new(0),
    allowed: AtomicU64::new(0),
    refusals: Refusals::new(),
    cache_hits: AtomicU64::new(0),
    cache_misses: AtomicU64::new(0),
    cache_stored: AtomicU64::new(0),
    cache_flushes: AtomicU64::new(0),
    pinned_agent: AtomicU64::new(0),
    loader_opens: AtomicU64::new(0),
    loader_dedup: AtomicU64::new(0),
    loader_direct: AtomicU64::new(0),
    committed: AtomicU64::new(0),
    interrupted: AtomicU64::new(0),
    lineage_procs: AtomicU64::new(0),
    lineage_lost: AtomicU64::new(0),
    exe_replace_refused: AtomicU64::new(0),
    exe_replace_would_deny: AtomicU64::new(0),
};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why an exec or a connection end was refused (or would have been).
pub(crate) enum Refusal {
    Denied,
    NoAgent,
    TimedOut,
    Unreadable(Error),
    /// A connection that must be a bound channel got no key.
    Unbound,
    /// No place in the queue to the agent (this user's share, the whole
    /// queue, or memory): never asked.
    Busy,
    /// Something the PEM cannot qualify (`proto::unqualifiable`): never
    /// asked.
    Unqualifiable(&'static str),
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Refusal::Denied => f.write_str("denied by policy"),
            Refusal::NoAgent => f.write_str("no agent"),
            Refusal::TimedOut => f.write_str("no verdict in time"),
            Refusal::Unreadable(e) => write!(f, "cannot hash the file: errno {}", e.to_errno()),
            Refusal::Unbound => f.write_str("no channel key"),
            Refusal::Busy => f.write_str("queue to the agent full"),
            Refusal::Unqualifiable(why) => write!(f, "cannot be qualified: {}", why),
        }
    }
}

/// What one path (exec, net) refused or would have, and why; shown in
/// debugfs as `<path>_denied`, `_would_deny`, `_no_agent`, `_timeouts`,
/// `_unreadable`, `_busy`, `_unqualifiable`. Their log lines are rate-limited (the kernel's
/// default: 10 lines per 5 s, then "callbacks suppressed"); the counters
/// count every one.
pub(crate) struct Refusals {
    /// Refused (enforce mode).
    pub(crate) denied: AtomicU64,
    /// Would have been refused (permissive mode).
    pub(crate) would_deny: AtomicU64,
    /// Of these: no agent connected.
    pub(crate) no_agent: AtomicU64,
    /// Of these: no verdict in time.
    pub(crate) timeouts: AtomicU64,
    /// Of these: the program's file could not be hashed.
    pub(crate) unreadable: AtomicU64,
    /// Of these: no place in the queue to the agent.
    pub(crate) busy: AtomicU64,
    /// Of these: something the PEM cannot qualify.
    pub(crate) unqualifiable: AtomicU64,
}

impl Refusals {
    /// All zero.
    pub(crate) const fn new() -> Self {
        Refusals {
            denied: AtomicU64::new(0),
            would_deny: AtomicU64::new(0),
            no_agent: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            unreadable: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            unqualifiable: AtomicU64::new(0),
        }
    }

    /// The one table of what a refusal means per mode: counts it, logs
    /// "`what` denied: `subject` (why)" (or "would be denied"), and gives
    /// `EACCES` in enforce mode, `Ok` otherwise.
    pub(crate) fn apply(
        &self,
        mode: Mode,
        refusal: &Refusal,
        what: &str,
        subject: impl core::fmt::Display,
    ) -> Result {
        match refusal {
            Refusal::Denied | Refusal::Unbound => {}
            Refusal::Busy => bump(&self.busy),
            Refusal::NoAgent => bump(&self.no_agent),
            Refusal::TimedOut => bump(&self.timeouts),
            Refusal::Unreadable(_) => bump(&self.unreadable),
            Refusal::Unqualifiable(_) => bump(&self.unqualifiable),
        }
        match mode {
            Mode::Enforce => {
                bump(&self.denied);
                if sys::log_ratelimit() {
                    pr_info!("{} denied: {} ({})\n", what, subject, refusal);
                }
                Err(EACCES)
            }
            _ => {
                bump(&self.would_deny);
                if sys::log_ratelimit() {
                    pr_info!("{} would be denied: {} ({})\n", what, subject, refusal);
                }
                Ok(())
            }
        }
    }
}

/// Decides one exec: `Ok` lets it go on to the real binary handlers.
pub(crate) fn check(s: &Shared, bprm: &Bprm<'_>) -> Result {
    if !bprm.is_interp() {
        // A new exec: whatever this thread staged for an earlier exec that
        // failed must not be committed for this one.
        s.lineage.unstage(sys::current_pid());
    }
    let mode = s.channel.mode();
    if mode == Mode::Disabled {
        return Ok(());
    }
    decide(s, mode, &mut ByHandler(bprm), bprm.is_interp())
}

/// Decides one exec-time open seen by the loader gate: `Ok` lets it go on.
pub(crate) fn check_loader(s: &Shared, open: &ExecOpen<'_>) -> Result {
    let mode = s.channel.mode();
    if mode == Mode::Disabled {
        return Ok(());
    }
    bump(&STATS.loader_opens);
    decide(s, mode, &mut ByGate { open, name: None }, false)
}

/// Qualifies `subj` and applies the mode to a refusal.
fn decide(s: &Shared, mode: Mode, subj: &mut impl Subject, interp_round: bool) -> Result {
    let refusal = match qualify(s, subj, interp_round) {
        Ok(()) => return Ok(()),
        Err(Err(e)) => return Err(e),
        Err(Ok(r)) => r,
    };
    let what = if subj.is_program() {
        "exec"
    } else {
        "exec (loader)"
    };
    let path = subj.path();
    let shown = &path[..path.len().min(256)];
    let shown = core::str::from_utf8(shown).unwrap_or("<non-utf8 path>");
    STATS.refusals.apply(mode, &refusal, what, shown)
}

/// `Ok` to run; `Err(Ok(refusal))` for a refusal the mode decides on;
/// `Err(Err(e))` to fail the exec with `e` whatever the mode.
fn qualify(s: &Shared, subj: &mut impl Subject, interp_round: bool) -> Result<(), Result<Refusal>> {
    let info = subj.info().map_err(|e| Ok(Refusal::Unreadable(e)))?;
    // The agent's own execs are exempt, unless the module believes only
    // the appliance: whoever holds the device (root's own program too)
    // could otherwise exec anything unasked.
    if s.channel.is_agent(info.tgid) && !s.channel.sealed_only() {
        return Ok(());
    }
    if let Some(why) = unqualifiable::exec_fs(info.fs_magic) {
        return Err(Ok(Refusal::Unqualifiable(why)));
    }
    // Each round's file tells whether the next file the exec opens is a
    // native ELF program's PT_INTERP loader.
    if subj.is_program() {
        s.loader.exec_started(&info, subj.is_native_elf());
    }
    if interp_round && s.loader.take(&info) {
        // The gate allowed this very interpreter when the exec opened it.
        bump(&STATS.loader_dedup);
        return Ok(());
    }
    // A file opened as a native ELF program's PT_INTERP is that program's
    // loader; anything else may be a loader run as the program.
    let pt_interp = !subj.is_program() && s.loader.exec_opened(&info);
    // A verdict for a loader run as the program is never stored, so a hit
    // is never one (the file's identity and change cookie pin its
    // content, and so its kind).
    let mut key = cache_key(&info, pt_interp);
    if let Some(key) = &key {
        if let Some((v, sha256)) = s.exec_cache.lookup(key) {
            bump(&STATS.cache_hits);
            let chain = s.lineage.ancestry_of(&info);
            let r = enforce(&v, subj);
            if r.is_ok() {
                allowed(s, &*subj, &info, &sha256, &chain, 0);
            }
            return r;
        }
        bump(&STATS.cache_misses);
    }
    bump(&STATS.asked);
    let (sha256, sha1) = subj
        .hash(&s.hashers)
        .map_err(|e| Ok(Refusal::Unreadable(e)))?;
    let mut flags = 0;
    if !pt_interp {
        // `ld.so ./prog` (or a copy of ld.so anywhere): what runs is
        // `./prog`, which the kernel never sees as an exec. Recognised by
        // content (`proto::elf`); policy decides on it, never cached.
        match subj.elf_kind() {
            Ok(ElfKind::Loader) => {
                flags = EXEC_LOADER_DIRECT;
                key = None;
                bump(&STATS.loader_direct);
            }
            Ok(_) => {}
            Err(e) => return Err(Ok(Refusal::Unreadable(e))),
        }
    }
    let chain = s.lineage.ancestry_of(&info);
    let ancestry = Ancestry::from_bytes(chain.as_bytes()).unwrap_or(Ancestry::EMPTY);
    let program = subj.is_program();
    let path = subj.path();
    let rec = Record::ExecRequest(ExecRequest {
        sha256,
        sha1,
        size: info.size,
        uid: info.uid,
        euid: info.euid,
        gid: info.gid,
        loginuid: info.loginuid,
        sessionid: info.sessionid,
        pid: info.tgid,
        ppid: info.ptgid,
        ancestry,
        path: &path[..path.len().min(MAX_PATH_LEN)],
        flags,
    });
    match s.channel.ask(&rec, info.uid, Wait::Interruptible) {
        Answer::Verdict(v) => {
            if let Some(key) = &key {
                s.exec_cache.store(key, &v, &sha256);
            }
            let r = enforce(&v, subj);
            if r.is_ok() {
                allowed(s, &*subj, &info, &sha256, &chain, flags);
            }
            r
        }
        Answer::NoAgent if program && s.channel.is_pinned_agent(&info) => {
            // The agent itself must be able to start again in enforce mode.
            s.loader.set_pinned(&info);
            pinned_allowed(subj);
            Ok(())
        }
        Answer::NoAgent if !program && s.loader.is_pinned_exec(&info) => {
            // ... and so must its ELF loader.
            pinned_allowed(subj);
            Ok(())
        }
        Answer::Key(mut k) => {
            k.wipe();
            pr_warn!("agent answered an exec request with a channel key\n");
            Err(Ok(Refusal::Denied))
        }
        Answer::Grant(mut g) => {
            g.wipe();
            pr_warn!("agent answered an exec request with a grant\n");
            Err(Ok(Refusal::Denied))
        }
        Answer::NoAgent => Err(Ok(Refusal::NoAgent)),
        Answer::TimedOut => Err(Ok(Refusal::TimedOut)),
        Answer::Busy => Err(Ok(Refusal::Busy)),
        Answer::Interrupted => {
            bump(&STATS.interrupted);
            Err(Err(ERESTARTNOINTR))
        }
    }
}

fn pinned_allowed(subj: &mut impl Subject) {
    bump(&STATS.pinned_agent);
    let path = subj.path();
    pr_info!(
        "exec of the pinned agent binary allowed with no agent connected: {}\n",
        core::str::from_utf8(&path[..path.len().min(256)]).unwrap_or("<non-utf8 path>")
    );
}

/// Bookkeeping after an allow: a program is staged to become the
/// process's image (for ancestry) when the exec commits; a file the gate
/// allowed is remembered for the next round, unless it was a loader run
/// as an interpreter (`flags`), which that round must ask about again.
fn allowed(
    s: &Shared,
    subj: &impl Subject,
    info: &ExecInfo,
    sha256: &[u8; 32],
    chain: &Chain,
    flags: u8,
) {
    if subj.is_program() {
        s.lineage.stage(info, sha256, chain);
    } else if flags == 0 {
        s.loader.allowed(info);
    }
}

/// The exec of thread `pid` committed (called from the
/// `sched_process_exec` tracepoint: must not sleep).
pub(crate) fn committed(s: &Shared, pid: u32, proc: ProcId) {
    if s.lineage.committed(pid, proc) {
        bump(&STATS.committed);
    }
}

/// `child` was forked by `parent`, a new process (called from the
/// `sched_process_fork` tracepoint: must not sleep).
pub(crate) fn forked(s: &Shared, parent: ProcId, child: ProcId) {
    if s.lineage.forked(parent, child) == Forked::NoMemory {
        bump(&STATS.lineage_lost);
    }
}

/// The whole thread group of `proc` exited (called from the
/// `sched_process_exit` tracepoint: must not sleep).
pub(crate) fn exited(s: &Shared, proc: ProcId) {
    s.lineage.exited(proc);
}

/// A process asks to change its `mm->exe_file` (`PR_SET_MM_EXE_FILE`, or
/// `PR_SET_MM_MAP` with an exe fd; needs `CAP_SYS_RESOURCE`, or
/// `CAP_CHECKPOINT_RESTORE` in its user namespace). Whether to let it
/// (called from the ftrace callback on `replace_mm_exe_file()`: must not
/// sleep). A process the lineage table knows is credited by what it
/// exec'd, never by `exe_file`; one it does not know (started before the
/// module, or unknown since) would be credited with the new file, so in
/// enforce mode nobody may change it.
pub(crate) fn exe_replace_allowed(s: &Shared) -> bool {
    match s.channel.mode() {
        Mode::Enforce => {
            bump(&STATS.exe_replace_refused);
            false
        }
        Mode::Permissive => {
            bump(&STATS.exe_replace_would_deny);
            true
        }
        Mode::Disabled => true,
    }
}

/// Applies a verdict (fresh or cached) to the exec'ing task.
fn enforce(v: &Verdict, subj: &mut impl Subject) -> Result<(), Result<Refusal>> {
    match v.decision {
        Decision::Allow => {
            bump(&STATS.allowed);
            Ok(())
        }
        Decision::AllowWithConditions => {
            bump(&STATS.allowed);
            apply(&v.obligations, subj);
            Ok(())
        }
        Decision::Deny => Err(Ok(Refusal::Denied)),
    }
}

/// Applies the obligations the kernel carries out (see the module doc).
fn apply(o: &Obligations, subj: &mut impl Subject) {
    if let Some(nice) = o.nice {
        sys::set_nice_current(nice);
    }
    if o.log_level >= 2 {
        let path = subj.path();
        let shown = core::str::from_utf8(&path[..path.len().min(256)]).unwrap_or("<non-utf8 path>");
        pr_info!(
            "exec allowed with conditions: {} (nice {:?}, cpu limit {:?} s)\n",
            shown,
            o.nice,
            o.cpu_limit_s
        );
    }
}
