// SPDX-License-Identifier: GPL-2.0
//! Which program each process runs, so an exec can name its ancestry: the
//! SHA-256 of the program that is exec'ing (the image the process runs now)
//! and of the programs before it, nearest first, at most
//! [`MAX_ANCESTRY`](super::MAX_ANCESTRY) deep.
//!
//! The PEM records every exec it lets through: process (tgid and start
//! time), the new program's hash, and the ancestry that exec carried. For a
//! later exec in process P with parent PP:
//!
//! - if P exec'd before, its recorded image is what runs now;
//! - otherwise P was forked from PP and still runs PP's image.
//!
//! Entries are validated by start time, so a reused pid never inherits a
//! dead process's lineage. The table is direct-mapped by tgid (bounded, no
//! allocation; storage supplied by the caller, as for the verdict cache); a
//! collision overwrites, and a process whose entry was lost reports a
//! shorter ancestry — never a wrong one.

use core::ops::DerefMut;

use super::{MAX_ANCESTRY, SHA256_LEN};

/// A process, as far as pid reuse is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcId {
    /// Thread group id.
    pub tgid: u32,
    /// Start time of the thread group leader (boot-based, ns).
    pub start_ns: u64,
}

/// One process's current image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    proc: ProcId,
    sha256: [u8; SHA256_LEN],
    /// Ancestry of this image (its own hash not included), flat.
    ancestry: [u8; SHA256_LEN * MAX_ANCESTRY],
    n: u8,
    valid: bool,
}

impl Image {
    /// An unused slot.
    pub const EMPTY: Image = Image {
        proc: ProcId {
            tgid: 0,
            start_ns: 0,
        },
        sha256: [0; SHA256_LEN],
        ancestry: [0; SHA256_LEN * MAX_ANCESTRY],
        n: 0,
        valid: false,
    };
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
}

/// The table over its storage.
#[derive(Debug)]
pub struct Lineage<S> {
    slots: S,
}

impl<S: DerefMut<Target = [Image]>> Lineage<S> {
    /// A table over `slots` (all [`Image::EMPTY`], at least one).
    pub fn new(slots: S) -> Option<Self> {
        (!slots.is_empty()).then_some(Self { slots })
    }

    fn index(&self, p: ProcId) -> usize {
        // `checked_rem`: no division-by-zero path in the kernel build.
        (p.tgid as usize).checked_rem(self.slots.len()).unwrap_or(0)
    }

    fn slot(&self, p: ProcId) -> Option<&Image> {
        self.slots
            .get(self.index(p))
            .filter(|s| s.valid && s.proc == p)
    }

    /// The ancestry of an exec in `proc`, whose parent is `parent`.
    pub fn ancestry(&self, proc: ProcId, parent: ProcId) -> Chain {
        let Some(cur) = self.slot(proc).or_else(|| self.slot(parent)) else {
            return Chain::EMPTY;
        };
        let mut c = Chain::EMPTY;
        let take = usize::from(cur.n).min(MAX_ANCESTRY - 1);
        if let (Some(first), Some(from)) = (
            c.bytes.get_mut(..SHA256_LEN),
            cur.ancestry.get(..take * SHA256_LEN),
        ) {
            first.copy_from_slice(&cur.sha256);
            if let Some(to) = c.bytes.get_mut(SHA256_LEN..(take + 1) * SHA256_LEN) {
                to.copy_from_slice(from);
            }
            c.n = take + 1;
        }
        c
    }

    /// The program `proc` itself was recorded running, with the ancestry
    /// it was exec'd with; `None` if this very process was not recorded
    /// (no fallback to the parent: a process that exec'd while nothing
    /// recorded it runs something else than its parent).
    pub fn image(&self, proc: ProcId) -> Option<([u8; SHA256_LEN], Chain)> {
        let cur = self.slot(proc)?;
        let mut c = Chain::EMPTY;
        let n = usize::from(cur.n).min(MAX_ANCESTRY);
        if let (Some(to), Some(from)) = (
            c.bytes.get_mut(..n * SHA256_LEN),
            cur.ancestry.get(..n * SHA256_LEN),
        ) {
            to.copy_from_slice(from);
            c.n = n;
        }
        Some((cur.sha256, c))
    }

    /// Forgets every process: what they exec'd while nothing recorded
    /// (the module disabled) cannot be told apart from what was recorded.
    pub fn clear(&mut self) {
        for s in self.slots.iter_mut() {
            *s = Image::EMPTY;
        }
    }

    /// Records that `proc` now runs `sha256`, exec'd with `ancestry`.
    pub fn record(&mut self, proc: ProcId, sha256: &[u8; SHA256_LEN], ancestry: &Chain) {
        let i = self.index(proc);
        if let Some(s) = self.slots.get_mut(i) {
            let mut img = Image {
                proc,
                sha256: *sha256,
                ancestry: [0; SHA256_LEN * MAX_ANCESTRY],
                n: 0,
                valid: true,
            };
            let bytes = ancestry.as_bytes();
            if let Some(to) = img.ancestry.get_mut(..bytes.len()) {
                to.copy_from_slice(bytes);
                // CAST: at most MAX_ANCESTRY (8).
                img.n = ancestry.len() as u8;
            }
            *s = img;
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

    #[test]
    fn only_committed_execs_are_recorded() {
        let mut t = table(64);
        let mut staged = Pending::new(vec![Staged::EMPTY; 16]).unwrap();
        let init = p(1, 10);
        let sh = p(100, 20);
        t.record(init, &h(1), &Chain::EMPTY);
        t.record(sh, &h(2), &t.ancestry(sh, init));
        // The shell's exec of program 3 was allowed, then failed: nothing
        // is committed, and its children still see the shell.
        let c = t.ancestry(sh, init);
        staged.stage(100, sh, &h(3), &c);
        assert_eq!(hashes(&t.ancestry(p(200, 30), sh)), vec![2, 1]);
        // Its next exec (program 4) commits.
        staged.stage(100, sh, &h(4), &c);
        let (proc, sha, chain) = staged.take(100).unwrap();
        t.record(proc, &sha, &chain);
        assert_eq!(hashes(&t.ancestry(p(200, 30), sh)), vec![4, 2, 1]);
        // Consumed; another thread's commit takes nothing.
        assert_eq!(staged.take(100), None);
        staged.stage(116, sh, &h(5), &c);
        assert_eq!(staged.take(100), None);
        assert_eq!(staged.take(0), None);
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

    fn table(n: usize) -> Lineage<Vec<Image>> {
        Lineage::new(vec![Image::EMPTY; n]).unwrap()
    }

    #[test]
    fn a_forked_child_inherits_its_parents_image() {
        let mut t = table(64);
        let init = p(1, 10);
        let bash = p(100, 20);
        // init exec'd /sbin/init (no ancestry), then forked bash which
        // exec'd /bin/bash.
        t.record(init, &h(1), &Chain::EMPTY);
        let c = t.ancestry(bash, init);
        assert_eq!(hashes(&c), vec![1]);
        t.record(bash, &h(2), &c);
        // bash forks a child that execs ls: ancestry bash, init.
        let child = p(200, 30);
        assert_eq!(hashes(&t.ancestry(child, bash)), vec![2, 1]);
        // The child exec'd ls; its own later exec names ls first.
        let c = t.ancestry(child, bash);
        t.record(child, &h(3), &c);
        assert_eq!(hashes(&t.ancestry(child, bash)), vec![3, 2, 1]);
    }

    #[test]
    fn depth_is_bounded_nearest_first() {
        let mut t = table(64);
        let mut parent = p(1, 1);
        t.record(parent, &h(1), &Chain::EMPTY);
        for i in 2..20u8 {
            let me = p(u32::from(i), u64::from(i));
            let c = t.ancestry(me, parent);
            assert!(c.len() <= MAX_ANCESTRY);
            t.record(me, &h(i), &c);
            parent = me;
        }
        let c = t.ancestry(p(99, 99), parent);
        assert_eq!(c.len(), MAX_ANCESTRY);
        assert_eq!(hashes(&c), (12..=19).rev().collect::<Vec<u8>>());
    }

    #[test]
    fn a_reused_pid_does_not_inherit_a_dead_lineage() {
        let mut t = table(64);
        t.record(p(100, 20), &h(7), &Chain::EMPTY);
        // pid 100 died; a new process 100 (other start time) with an
        // unknown parent.
        assert!(t.ancestry(p(100, 999), p(5, 5)).is_empty());
        // A collision overwrites: shorter, never wrong.
        t.record(p(164, 1), &h(8), &Chain::EMPTY);
        assert!(t.ancestry(p(300, 1), p(100, 20)).is_empty());
        assert_eq!(hashes(&t.ancestry(p(300, 1), p(164, 1))), vec![8]);
    }

    #[test]
    fn image_is_only_the_process_own() {
        let mut t = table(64);
        let init = p(1, 10);
        t.record(init, &h(1), &Chain::EMPTY);
        let c = t.ancestry(p(100, 20), init);
        t.record(p(100, 20), &h(2), &c);
        let (sha, anc) = t.image(p(100, 20)).unwrap();
        assert_eq!(sha, h(2));
        assert_eq!(hashes(&anc), vec![1]);
        assert_eq!(t.image(init).unwrap().0, h(1));
        assert!(t.image(init).unwrap().1.is_empty());
        // A forked child is not its parent, and a reused pid is nobody.
        assert!(t.image(p(200, 30)).is_none());
        assert!(t.image(p(100, 21)).is_none());
    }

    #[test]
    fn clear_forgets_everyone() {
        let mut t = table(8);
        t.record(p(1, 1), &h(1), &Chain::EMPTY);
        t.record(p(2, 2), &h(2), &Chain::EMPTY);
        t.clear();
        assert!(t.image(p(1, 1)).is_none());
        assert!(t.ancestry(p(3, 3), p(2, 2)).is_empty());
    }

    #[test]
    fn empty_storage_is_refused() {
        assert!(Lineage::new(Vec::<Image>::new()).is_none());
    }
}
