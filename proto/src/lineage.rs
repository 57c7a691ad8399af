// SPDX-License-Identifier: GPL-2.0
//! Which program each process runs, so an exec can name its ancestry: the
//! SHA-256 of the program that is exec'ing (the image the process runs now)
//! and of the programs before it, nearest first, at most
//! [`MAX_ANCESTRY`](super::MAX_ANCESTRY) deep; and so a connect is credited
//! with the program the process really runs, whatever `mm->exe_file` says.
//!
//! The table is exact: one entry per process the PEM saw begin, kept from
//! the kernel's own process events rather than guessed from the parent at
//! lookup time:
//!
//! - **fork** (a new process, not a thread): the child runs its parent's
//!   image, so it gets a copy of the parent's entry ([`Lineage::forked`]);
//! - **exec commit**: the process now runs the program its exec was
//!   allowed to run ([`Lineage::committed`]); an exec that committed with
//!   nothing allowed (disabled mode, the agent's own exec, a refusal that
//!   permissive mode let run) leaves the process *unknown*: its entry is
//!   removed;
//! - **exit** of the whole thread group: the entry is removed.
//!
//! A process without an entry is unknown (it started before the module,
//! its fork found no memory for the copy, or it exec'd unrecorded): its
//! ancestry is empty and a connect hashes its `mm->exe_file` — shorter,
//! never wrong. There is no fallback to the parent: a double-forked
//! daemon reparented to init, or a child forked before its parent exec'd,
//! is never credited with the program its current parent runs.
//!
//! Entries are keyed by tgid *and* start time, so a reused pid never
//! inherits a dead process's entry. The storage is the caller's
//! ([`ProcTable`]): an rbtree in the kernel, whose inserts can fail (they
//! run in tracepoints and may not sleep), a `BTreeMap` in tests.

use core::ops::DerefMut;

use super::{MAX_ANCESTRY, SHA256_LEN};

/// A process, as far as pid reuse is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProcId {
    /// Thread group id.
    pub tgid: u32,
    /// Start time of the thread group leader (boot-based, ns).
    pub start_ns: u64,
}

/// One process's current image: its program and that program's ancestry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    sha256: [u8; SHA256_LEN],
    ancestry: Chain,
}

/// An ancestry to send: `len()` hashes, flat, nearest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chain {
    bytes: [u8; SHA256_LEN * MAX_ANCESTRY],
    n: usize,
}

impl Chain {
    /// No ancestry known.
    pub const EMPTY: Chain = Chain {
        bytes: [0; SHA256_LEN * MAX_ANCESTRY],
        n: 0,
    };

    /// Number of hashes.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether none is known.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The `len() * 32` bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.n * SHA256_LEN).unwrap_or(&[])
    }

    /// `first`, then this chain, cut to [`MAX_ANCESTRY`].
    fn pushed(&self, first: &[u8; SHA256_LEN]) -> Chain {
        let mut c = Chain::EMPTY;
        let take = self.n.min(MAX_ANCESTRY - 1);
        if let (Some(head), Some(from)) = (
            c.bytes.get_mut(..SHA256_LEN),
            self.bytes.get(..take * SHA256_LEN),
        ) {
            head.copy_from_slice(first);
            if let Some(to) = c.bytes.get_mut(SHA256_LEN..(take + 1) * SHA256_LEN) {
                to.copy_from_slice(from);
            }
            c.n = take + 1;
        }
        c
    }
}

/// Per-process storage under [`Lineage`].
pub trait ProcTable {
    /// The entry of `p`.
    fn get(&self, p: &ProcId) -> Option<&Image>;
    /// Sets the entry of `p` (replacing one in place needs no memory);
    /// `false` if a new entry found no memory (the table is unchanged).
    fn put(&mut self, p: ProcId, img: Image) -> bool;
    /// Removes the entry of `p`, if any.
    fn remove(&mut self, p: &ProcId);
    /// Number of entries.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a fork did to the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forked {
    /// The child got a copy of its parent's entry.
    Inherited,
    /// The parent is unknown, and so is the child.
    Unknown,
    /// No memory for the child's entry: it is unknown.
    NoMemory,
}

/// The table over its storage.
#[derive(Debug)]
pub struct Lineage<T> {
    procs: T,
}

impl<T: ProcTable> Lineage<T> {
    /// A table over `procs` (normally empty).
    pub fn new(procs: T) -> Self {
        Self { procs }
    }

    /// Number of processes known.
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// Whether no process is known.
    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// The ancestry of an exec in `proc`: what `proc` runs now, then that
    /// program's ancestry (empty if `proc` is unknown).
    pub fn ancestry(&self, proc: ProcId) -> Chain {
        match self.procs.get(&proc) {
            Some(img) => img.ancestry.pushed(&img.sha256),
            None => Chain::EMPTY,
        }
    }

    /// The program `proc` runs, with the ancestry it was exec'd with;
    /// `None` if `proc` is unknown.
    pub fn image(&self, proc: ProcId) -> Option<([u8; SHA256_LEN], Chain)> {
        self.procs.get(&proc).map(|img| (img.sha256, img.ancestry))
    }

    /// The program `proc` runs (without copying its ancestry); `None` if
    /// `proc` is unknown.
    pub fn program(&self, proc: ProcId) -> Option<[u8; SHA256_LEN]> {
        self.procs.get(&proc).map(|img| img.sha256)
    }

    /// `child`, a new process (not a thread), was forked by `parent`.
    pub fn forked(&mut self, parent: ProcId, child: ProcId) -> Forked {
        // (No entry can exist under the child's key: start times differ.)
        let Some(img) = self.procs.get(&parent).copied() else {
            return Forked::Unknown;
        };
        if self.procs.put(child, img) {
            Forked::Inherited
        } else {
            Forked::NoMemory
        }
    }

    /// An exec in `proc` committed; `staged` is what it was allowed to
    /// run (from [`Pending::take`]). Whether `proc` is known afterwards.
    pub fn committed(&mut self, proc: ProcId, staged: Option<([u8; SHA256_LEN], Chain)>) -> bool {
        match staged {
            Some((sha256, ancestry)) => self.record(proc, &sha256, &ancestry),
            None => {
                self.procs.remove(&proc);
                false
            }
        }
    }

    /// The whole thread group of `proc` exited.
    pub fn exited(&mut self, proc: ProcId) {
        self.procs.remove(&proc);
    }

    /// Records that `proc` now runs `sha256`, exec'd with `ancestry`;
    /// whether it could (otherwise `proc` is unknown).
    pub fn record(&mut self, proc: ProcId, sha256: &[u8; SHA256_LEN], ancestry: &Chain) -> bool {
        let img = Image {
            sha256: *sha256,
            ancestry: *ancestry,
        };
        if self.procs.put(proc, img) {
            true
        } else {
            // The old entry would name a program the process no longer runs.
            self.procs.remove(&proc);
            false
        }
    }
}

/// An exec allowed by a verdict but not yet committed: its thread, its
/// process, the program and the ancestry the request carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Staged {
    pid: u32,
    proc: ProcId,
    sha256: [u8; SHA256_LEN],
    ancestry: Chain,
}

impl Staged {
    /// An unused slot.
    pub const EMPTY: Staged = Staged {
        pid: 0,
        proc: ProcId {
            tgid: 0,
            start_ns: 0,
        },
        sha256: [0; SHA256_LEN],
        ancestry: Chain::EMPTY,
    };
}

/// Execs allowed but not yet committed, by thread id (direct-mapped,
/// bounded, no allocation; storage supplied by the caller).
///
/// An exec can still fail after its program was allowed (a missing
/// `PT_INTERP` loader, a refused loader, an out-of-memory while mapping):
/// the process then goes on running its old program, which must not be
/// credited with the new one. So an allowed program is only *staged* here
/// and recorded in [`Lineage`] when the exec commits (the kernel's
/// `sched_process_exec`, which names the exec'ing thread's id from before
/// the exec). A later round of the same exec (a script's interpreter)
/// replaces the staged program; a thread whose exec failed leaves a stale
/// entry that its next exec replaces and that no commit ever takes.
pub struct Pending<S> {
    slots: S,
}

impl<S: DerefMut<Target = [Staged]>> Pending<S> {
    /// A table over `slots`; `None` if there are none.
    pub fn new(slots: S) -> Option<Self> {
        if slots.is_empty() {
            return None;
        }
        Some(Pending { slots })
    }

    fn index(&self, pid: u32) -> usize {
        // CAST: u32 fits usize on every target the PEM builds for.
        // `checked_rem`: no division-by-zero path in the kernel build.
        (pid as usize).checked_rem(self.slots.len()).unwrap_or(0)
    }

    /// Thread `pid` of `proc` is exec'ing `sha256`, allowed, with
    /// `ancestry`.
    pub fn stage(&mut self, pid: u32, proc: ProcId, sha256: &[u8; SHA256_LEN], ancestry: &Chain) {
        let i = self.index(pid);
        if let Some(s) = self.slots.get_mut(i) {
            *s = Staged {
                pid,
                proc,
                sha256: *sha256,
                ancestry: *ancestry,
            };
        }
    }

    /// The exec of thread `pid` committed: what it staged, if anything
    /// (consumed).
    pub fn take(&mut self, pid: u32) -> Option<(ProcId, [u8; SHA256_LEN], Chain)> {
        let i = self.index(pid);
        let s = self.slots.get_mut(i)?;
        if pid == 0 || s.pid != pid {
            return None;
        }
        let out = (s.proc, s.sha256, s.ancestry);
        *s = Staged::EMPTY;
        Some(out)
    }

    /// Thread `pid` begins an exec: anything it staged before (an exec
    /// that failed after its verdict) is dropped, so only this exec's
    /// verdict can be committed.
    pub fn unstage(&mut self, pid: u32) {
        let i = self.index(pid);
        if let Some(s) = self.slots.get_mut(i) {
            if s.pid == pid {
                *s = Staged::EMPTY;
            }
        }
    }

    /// Forgets everything staged.
    pub fn clear(&mut self) {
        for s in self.slots.iter_mut() {
            *s = Staged::EMPTY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A `BTreeMap` whose next new entry can be made to find no memory.
    #[derive(Default)]
    struct Map {
        m: BTreeMap<ProcId, Image>,
        fail_next: bool,
    }

    impl ProcTable for Map {
        fn get(&self, p: &ProcId) -> Option<&Image> {
            self.m.get(p)
        }
        fn put(&mut self, p: ProcId, img: Image) -> bool {
            if !self.m.contains_key(&p) && std::mem::take(&mut self.fail_next) {
                return false;
            }
            self.m.insert(p, img);
            true
        }
        fn remove(&mut self, p: &ProcId) {
            self.m.remove(p);
        }
        fn len(&self) -> usize {
            self.m.len()
        }
    }

    fn p(tgid: u32, start_ns: u64) -> ProcId {
        ProcId { tgid, start_ns }
    }

    fn h(b: u8) -> [u8; 32] {
        [b; 32]
    }

    fn hashes(c: &Chain) -> Vec<u8> {
        c.as_bytes().chunks(32).map(|x| x[0]).collect()
    }

    fn table() -> Lineage<Map> {
        Lineage::new(Map::default())
    }

    /// `proc` execs program `b`, allowed.
    fn exec(t: &mut Lineage<Map>, proc: ProcId, b: u8) {
        let c = t.ancestry(proc);
        assert!(t.committed(proc, Some((h(b), c))));
    }

    #[test]
    fn only_committed_execs_are_recorded() {
        let mut t = table();
        let mut staged = Pending::new(vec![Staged::EMPTY; 16]).unwrap();
        let init = p(1, 10);
        let sh = p(100, 20);
        exec(&mut t, init, 1);
        t.forked(init, sh);
        exec(&mut t, sh, 2);
        // The shell's exec of program 3 was allowed, then failed: nothing
        // is committed, and its children still see the shell.
        let c = t.ancestry(sh);
        staged.stage(100, sh, &h(3), &c);
        t.forked(sh, p(200, 30));
        assert_eq!(hashes(&t.ancestry(p(200, 30))), vec![2, 1]);
        // Its next exec (program 4) commits.
        staged.stage(100, sh, &h(4), &c);
        let (proc, sha, chain) = staged.take(100).unwrap();
        t.committed(proc, Some((sha, chain)));
        assert_eq!(hashes(&t.ancestry(sh)), vec![4, 2, 1]);
        // The child forked before that exec still runs the shell.
        assert_eq!(hashes(&t.ancestry(p(200, 30))), vec![2, 1]);
        // Consumed; another thread's commit takes nothing.
        assert_eq!(staged.take(100), None);
        staged.stage(116, sh, &h(5), &c);
        assert_eq!(staged.take(100), None);
        assert_eq!(staged.take(0), None);
    }

    #[test]
    fn a_new_exec_drops_what_a_failed_one_staged() {
        let mut staged = Pending::new(vec![Staged::EMPTY; 16]).unwrap();
        staged.stage(100, p(100, 1), &h(3), &Chain::EMPTY);
        // Thread 100's exec failed after its verdict; its next exec asks
        // nothing (disabled mode): nothing may be committed for it.
        staged.unstage(100);
        assert_eq!(staged.take(100), None);
        // Another thread's staging in the same slot is left alone.
        staged.stage(116, p(116, 1), &h(4), &Chain::EMPTY);
        staged.unstage(100);
        assert!(staged.take(116).is_some());
    }

    #[test]
    fn an_unrecorded_exec_makes_the_process_unknown() {
        let mut t = table();
        exec(&mut t, p(1, 1), 1);
        t.forked(p(1, 1), p(50, 5));
        assert!(t.image(p(50, 5)).is_some());
        // Its exec committed with nothing allowed (disabled mode, or a
        // refusal permissive mode let run).
        assert!(!t.committed(p(50, 5), None));
        assert!(t.image(p(50, 5)).is_none());
        assert!(t.ancestry(p(50, 5)).is_empty());
    }

    #[test]
    fn a_reparented_child_keeps_its_own_lineage() {
        let mut t = table();
        let init = p(1, 10);
        exec(&mut t, init, 1);
        let bash = p(100, 20);
        t.forked(init, bash);
        exec(&mut t, bash, 2);
        // bash forks a subshell, which forks a daemon and exits: the
        // daemon is reparented to init. It still runs bash.
        let sub = p(101, 21);
        let daemon = p(102, 22);
        t.forked(bash, sub);
        t.forked(sub, daemon);
        t.exited(sub);
        assert_eq!(hashes(&t.ancestry(daemon)), vec![2, 1]);
        assert_eq!(t.image(daemon).unwrap().0, h(2));
    }

    #[test]
    fn depth_is_bounded_nearest_first() {
        let mut t = table();
        let mut parent = p(1, 1);
        exec(&mut t, parent, 1);
        for i in 2..20u8 {
            let me = p(u32::from(i), u64::from(i));
            t.forked(parent, me);
            exec(&mut t, me, i);
            assert!(t.image(me).unwrap().1.len() <= MAX_ANCESTRY);
            parent = me;
        }
        let c = t.ancestry(parent);
        assert_eq!(c.len(), MAX_ANCESTRY);
        assert_eq!(hashes(&c), (12..=19).rev().collect::<Vec<u8>>());
    }

    #[test]
    fn a_reused_pid_does_not_inherit_a_dead_lineage() {
        let mut t = table();
        exec(&mut t, p(100, 20), 7);
        // pid 100 died unseen; a new process 100 (other start time).
        assert!(t.ancestry(p(100, 999)).is_empty());
        assert!(t.image(p(100, 999)).is_none());
        t.exited(p(100, 20));
        assert!(t.is_empty());
    }

    #[test]
    fn a_fork_without_memory_leaves_the_child_unknown() {
        let mut t = table();
        exec(&mut t, p(1, 1), 1);
        t.procs.fail_next = true;
        assert_eq!(t.forked(p(1, 1), p(2, 2)), Forked::NoMemory);
        assert!(t.image(p(2, 2)).is_none());
        assert_eq!(t.forked(p(9, 9), p(3, 3)), Forked::Unknown);
        assert_eq!(t.forked(p(1, 1), p(4, 4)), Forked::Inherited);
        // An exec replacing a known entry needs no memory.
        t.procs.fail_next = true;
        exec(&mut t, p(4, 4), 5);
        assert_eq!(hashes(&t.ancestry(p(4, 4))), vec![5, 1]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Fork(usize, bool),
        Exec(usize, u8, bool, bool),
        Exit(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<usize>(), proptest::bool::weighted(0.1)).prop_map(|(i, f)| Op::Fork(i, f)),
            (
                any::<usize>(),
                1u8..50,
                proptest::bool::weighted(0.8),
                proptest::bool::weighted(0.1)
            )
                .prop_map(|(i, b, ok, f)| Op::Exec(i, b, ok, f)),
            any::<usize>().prop_map(Op::Exit),
        ]
    }

    proptest! {
        /// Against a model that knows every process's real program stack:
        /// the table's answer for a live process is exactly the model's
        /// (program, then up to MAX_ANCESTRY before it) or unknown where
        /// the model says so (no memory, unrecorded exec); never another
        /// process's. Dead processes leave nothing behind.
        #[test]
        fn lineage_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut t = table();
            let mut staged = Pending::new(vec![Staged::EMPTY; 8]).unwrap();
            // Live processes and their real program stacks (None: unknown).
            let mut live: Vec<(ProcId, Option<Vec<u8>>)> = vec![(p(1, 1), None)];
            let mut next = 2u32;
            for op in ops {
                match op {
                    Op::Fork(i, fail) => {
                        let (parent, stack) = live[i % live.len()].clone();
                        let child = p(next % 7 + 1, u64::from(next));
                        next += 1;
                        t.procs.fail_next = fail;
                        let r = t.forked(parent, child);
                        t.procs.fail_next = false;
                        let stack = if r == Forked::Inherited { stack } else { None };
                        live.push((child, stack));
                    }
                    Op::Exec(i, prog, allowed, fail) => {
                        let i = i % live.len();
                        let (proc, stack) = live[i].clone();
                        let pid = proc.tgid;
                        staged.unstage(pid);
                        if allowed {
                            staged.stage(pid, proc, &h(prog), &t.ancestry(proc));
                        }
                        let s = staged.take(pid).map(|(_, sha, c)| (sha, c));
                        t.procs.fail_next = fail;
                        let known = t.committed(proc, s);
                        t.procs.fail_next = false;
                        live[i].1 = if known {
                            let mut v = vec![prog];
                            v.extend(stack.unwrap_or_default().into_iter().take(MAX_ANCESTRY));
                            Some(v)
                        } else {
                            None
                        };
                    }
                    Op::Exit(i) => {
                        if live.len() > 1 {
                            let (proc, _) = live.swap_remove(i % live.len());
                            t.exited(proc);
                        }
                    }
                }
                for (proc, stack) in &live {
                    let want = stack.as_ref().map(|v| (v[0], v[1..].to_vec()));
                    let got = t.image(*proc).map(|(sha, c)| (sha[0], hashes(&c)));
                    prop_assert_eq!(&got, &want, "process {:?}", proc);
                    let anc = hashes(&t.ancestry(*proc));
                    let want_anc: Vec<u8> = stack.clone().unwrap_or_default().into_iter().take(MAX_ANCESTRY).collect();
                    prop_assert_eq!(anc, want_anc);
                }
                prop_assert_eq!(t.len(), live.iter().filter(|(_, s)| s.is_some()).count());
            }
        }
    }
}
