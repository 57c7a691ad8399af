//! Which programs have been answered under the current verdict generation:
//! what decides whether a membership change must move the generation.
//!
//! Hosts cache verdicts under the generation they were decided in (the
//! PEM's cache, the agent's signed offline bundle). A change of reference-
//! group memberships changes only decisions about the programs whose
//! memberships changed (as the acting program or as a pair's peer): no
//! other input of a decision moves. So if none of those programs has been
//! answered since the generation last moved, no host holds a verdict the
//! change makes stale, and the generation need not move: the next request
//! for such a program misses every cache and is decided with the new
//! memberships. If one has been answered, the generation moves in the
//! change's transaction, except in a bulk import (`Publish::Deferred`) when
//! every answer given for the touched programs was a deny: then the move is
//! deferred until the import has been quiet for a while (see
//! [`super::Store::settle_deferred`]); until then a host may keep a cached
//! deny for a newly approved program (fail closed), never a stale allow.
//!
//! The ledger is in memory. After the appliance starts it does not know
//! what hosts cached before, so the first membership change that touches
//! anything moves the generation, and from then on the ledger is exact.
//! When it grows past [`CAP`] programs it forgets them and behaves as after
//! a start.

use std::collections::HashMap;

/// Programs remembered per generation before the ledger gives up and
/// treats every program as answered.
pub const CAP: usize = 1 << 20;

/// A deferred generation move waits until no deferred change came for
/// this long...
pub const DEFER_QUIET_MS: i64 = 2_000;

/// ...or at most this long after the first deferred change.
pub const DEFER_MAX_MS: i64 = 600_000;

/// How a membership change is published to hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Publish {
    /// Move the generation now if any touched program was answered.
    #[default]
    Now,
    /// Bulk import: if the touched programs were only ever denied, move
    /// the generation once the import has gone quiet instead of now.
    Deferred,
}

/// What a membership change does to the generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    /// No host can hold a verdict about a touched program.
    None,
    /// Some host may hold a deny only: move later (bulk import).
    Defer,
    /// Move it in the change's transaction.
    Move,
}

#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    allow: bool,
    deny: bool,
}

/// A deferred generation move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Deferred {
    /// When the first deferred change was made (ms since the epoch).
    pub since_ms: i64,
    /// When the last one was made.
    pub last_ms: i64,
}

#[derive(Debug)]
pub(super) struct Ledger {
    /// Generation the answers belong to.
    generation: i64,
    /// Membership version the answers' data was read at.
    members: i64,
    /// False until the generation first moves in this process (or after
    /// overflow): any program may be cached somewhere.
    exact: bool,
    answered: HashMap<String, Seen>,
    /// Programs of membership changes between their classification and
    /// the end of their commit, with how many such changes touch each.
    pending: HashMap<String, u32>,
    deferred: Option<Deferred>,
}

impl Ledger {
    pub(super) fn new(generation: i64, members: i64) -> Self {
        Ledger {
            generation,
            members,
            exact: false,
            answered: HashMap::new(),
            pending: HashMap::new(),
            deferred: None,
        }
    }

    /// Follows the store after a commit: a moved generation empties it
    /// (every host drops what it cached) and makes it exact.
    pub(super) fn sync(&mut self, generation: i64, members: i64) {
        if generation != self.generation {
            self.generation = generation;
            self.answered.clear();
            self.exact = true;
            self.deferred = None;
        }
        self.members = members;
    }

    /// Records that `programs` were answered (`allow` or not) from data at
    /// `generation` and membership version `members`. False when the
    /// answer must not be cached by the host: its data is older than the
    /// ledger, or a membership change touching one of the programs is
    /// committing right now.
    pub(super) fn note(
        &mut self,
        generation: i64,
        members: i64,
        programs: &[&str],
        allow: bool,
    ) -> bool {
        if generation != self.generation
            || members != self.members
            || programs.iter().any(|p| self.pending.contains_key(*p))
        {
            return false;
        }
        if !self.exact {
            // Everything counts as answered already.
            return true;
        }
        for p in programs {
            if !self.answered.contains_key(*p) && self.answered.len() >= CAP {
                self.answered.clear();
                self.exact = false;
                return true;
            }
            let s = self.answered.entry((*p).to_owned()).or_default();
            if allow {
                s.allow = true;
            } else {
                s.deny = true;
            }
        }
        true
    }

    /// Classifies a membership change touching `programs` and marks them
    /// pending until [`Ledger::done`].
    pub(super) fn classify(
        &mut self,
        programs: &[String],
        publish: Publish,
        now_ms: i64,
    ) -> Effect {
        for p in programs {
            *self.pending.entry(p.clone()).or_default() += 1;
        }
        if programs.is_empty() {
            return Effect::None;
        }
        if !self.exact {
            return Effect::Move;
        }
        let (mut allow, mut deny) = (false, false);
        for p in programs {
            if let Some(s) = self.answered.get(p) {
                allow |= s.allow;
                deny |= s.deny;
            }
        }
        match (allow, deny, publish) {
            (true, _, _) | (false, true, Publish::Now) => Effect::Move,
            (false, true, Publish::Deferred) => {
                let d = self.deferred.get_or_insert(Deferred {
                    since_ms: now_ms,
                    last_ms: now_ms,
                });
                d.last_ms = now_ms;
                Effect::Defer
            }
            (false, false, _) => Effect::None,
        }
    }

    /// The change touching `programs` has committed (or failed).
    pub(super) fn done(&mut self, programs: &[String]) {
        for p in programs {
            if let Some(n) = self.pending.get_mut(p) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.pending.remove(p);
                }
            }
        }
    }

    /// The deferred move, if one is waiting.
    pub(super) fn deferred(&self) -> Option<Deferred> {
        self.deferred
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn unknown_until_the_first_move_then_exact() {
        let mut l = Ledger::new(1, 0);
        assert_eq!(l.classify(&v(&["a"]), Publish::Now, 0), Effect::Move);
        l.done(&v(&["a"]));
        l.sync(2, 1);
        assert_eq!(l.classify(&v(&["a"]), Publish::Now, 0), Effect::None);
        l.done(&v(&["a"]));
        assert!(l.note(2, 1, &["a"], false));
        assert_eq!(l.classify(&v(&["b"]), Publish::Deferred, 5), Effect::None);
        assert_eq!(l.classify(&v(&["a"]), Publish::Deferred, 5), Effect::Defer);
        assert_eq!(l.classify(&v(&["a"]), Publish::Now, 6), Effect::Move);
        assert_eq!(
            l.deferred(),
            Some(Deferred {
                since_ms: 5,
                last_ms: 5
            })
        );
        assert!(l.note(2, 1, &["c"], true));
        assert_eq!(l.classify(&v(&["c"]), Publish::Deferred, 7), Effect::Move);
    }

    #[test]
    fn answers_racing_a_change_are_not_cacheable() {
        let mut l = Ledger::new(1, 0);
        l.sync(2, 0);
        assert_eq!(l.classify(&v(&["a"]), Publish::Now, 0), Effect::None);
        // Committing: an answer about `a` may use either membership.
        assert!(!l.note(2, 0, &["a"], true));
        assert!(l.note(2, 0, &["b"], true));
        l.done(&v(&["a"]));
        l.sync(2, 1);
        // Data read before the change is older than the ledger now.
        assert!(!l.note(2, 0, &["a"], true));
        assert!(l.note(2, 1, &["a"], true));
    }
}
