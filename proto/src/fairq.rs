// SPDX-License-Identifier: GPL-2.0
//! Who gets a place in the queue to the agent, and who is read next.
//!
//! Every hooked exec, connect or accept that needs a verdict takes one
//! place from admission until its answer (or timeout, or interruption);
//! fire-and-forget notifications take one until the agent reads them. The
//! places are shared by every user of the host, so without rules one user
//! who starts a few hundred execs at once (or a program that hangs in a
//! verdict wait) fills the queue and everybody else's execs are refused in
//! enforce mode. The rules:
//!
//! - **admission**: one user (real uid in the initial user namespace, which
//!   an unprivileged user cannot change) holds at most `per_user` places;
//!   the whole queue holds `slots.len()`;
//! - **service**: the agent reads queued records round-robin over users
//!   (in uid order, wrapping), oldest first within a user, so a user with a
//!   thousand queued requests delays another user's request by at most one
//!   read of each other user with something queued.
//!
//! A place is `Queued` (waiting to be read), then `Sent` (read; a request
//! waits for its answer) until released. Storage is caller-supplied (a
//! `Vec` in tests, a `KVVec` in the kernel); every operation is O(places),
//! allocates nothing and never panics.

use core::ops::DerefMut;

/// One place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    state: State,
    uid: u32,
    seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Queued,
    Sent,
}

impl Place {
    /// An unused place.
    pub const FREE: Place = Place {
        state: State::Free,
        uid: 0,
        seq: 0,
    };
}

/// Why a place was not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// Every place is taken.
    Queue,
    /// This user holds its share already.
    User,
}

/// The places and the round-robin position.
pub struct FairQueue<S> {
    places: S,
    per_user: usize,
    next_seq: u64,
    /// The user read last (round-robin position).
    last_uid: Option<u32>,
    queued: usize,
}

impl<S: DerefMut<Target = [Place]>> FairQueue<S> {
    /// A queue over `places`, each user holding at most `per_user` of them
    /// (at least 1). `None` if there are no places.
    pub fn new(places: S, per_user: usize) -> Option<Self> {
        if places.is_empty() {
            return None;
        }
        Some(FairQueue {
            places,
            per_user: per_user.max(1),
            next_seq: 0,
            last_uid: None,
            queued: 0,
        })
    }

    /// Places held by `uid` (queued or sent).
    pub fn held_by(&self, uid: u32) -> usize {
        self.places
            .iter()
            .filter(|p| p.state != State::Free && p.uid == uid)
            .count()
    }

    /// Places queued and not yet read.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Takes a place for a record of `uid`, queued to be read: its index.
    pub fn admit(&mut self, uid: u32) -> Result<usize, Full> {
        if self.held_by(uid) >= self.per_user {
            return Err(Full::User);
        }
        let i = self
            .places
            .iter()
            .position(|p| p.state == State::Free)
            .ok_or(Full::Queue)?;
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        if let Some(p) = self.places.get_mut(i) {
            *p = Place {
                state: State::Queued,
                uid,
                seq,
            };
            self.queued += 1;
        }
        Ok(i)
    }

    /// The queued place to read next: the oldest of the first user after
    /// the last one read (in uid order, wrapping) that has one queued.
    pub fn next(&self) -> Option<usize> {
        // Best candidate after `last_uid`, and best overall (for the wrap):
        // (uid, seq, index), smallest uid first, then oldest.
        let mut after: Option<(u32, u64, usize)> = None;
        let mut first: Option<(u32, u64, usize)> = None;
        for (i, p) in self.places.iter().enumerate() {
            if p.state != State::Queued {
                continue;
            }
            let c = (p.uid, p.seq, i);
            if first.is_none_or(|f| (c.0, c.1) < (f.0, f.1)) {
                first = Some(c);
            }
            let is_after = self.last_uid.is_none_or(|l| p.uid > l);
            if is_after && after.is_none_or(|a| (c.0, c.1) < (a.0, a.1)) {
                after = Some(c);
            }
        }
        after.or(first).map(|c| c.2)
    }

    /// The record at `i` was read: a request's place stays held (sent)
    /// until [`FairQueue::release`], a notification's is freed.
    pub fn read(&mut self, i: usize, keep: bool) {
        if let Some(p) = self.places.get_mut(i) {
            if p.state == State::Queued {
                self.last_uid = Some(p.uid);
                self.queued -= 1;
                p.state = if keep { State::Sent } else { State::Free };
            }
        }
    }

    /// Frees place `i` (answered, timed out, interrupted, unread).
    pub fn release(&mut self, i: usize) {
        if let Some(p) = self.places.get_mut(i) {
            if p.state == State::Queued {
                self.queued -= 1;
            }
            *p = Place::FREE;
        }
    }

    /// The agent left: nothing queued is read any more. Queued records
    /// that keep their place (`keep(i)`: requests, whose waiters release
    /// them) become sent; the others are freed. Returns the freed places'
    /// indices through `freed`.
    pub fn drain(&mut self, keep: impl Fn(usize) -> bool, mut freed: impl FnMut(usize)) {
        for (i, p) in self.places.iter_mut().enumerate() {
            if p.state == State::Queued {
                if keep(i) {
                    p.state = State::Sent;
                } else {
                    *p = Place::FREE;
                    freed(i);
                }
            }
        }
        self.queued = 0;
        self.last_uid = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, VecDeque};

    fn q(n: usize, per_user: usize) -> FairQueue<Vec<Place>> {
        FairQueue::new(vec![Place::FREE; n], per_user).unwrap()
    }

    #[test]
    fn one_user_cannot_take_every_place() {
        let mut f = q(16, 4);
        for _ in 0..4 {
            f.admit(1000).unwrap();
        }
        assert_eq!(f.admit(1000), Err(Full::User));
        // Another user still gets in, and is read next.
        let other = f.admit(1001).unwrap();
        let first = f.next().unwrap();
        f.read(first, true);
        assert_eq!(f.next(), Some(other));
    }

    #[test]
    fn round_robin_over_users_oldest_first() {
        let mut f = q(32, 32);
        let a: Vec<usize> = (0..5).map(|_| f.admit(7).unwrap()).collect();
        let b: Vec<usize> = (0..2).map(|_| f.admit(3).unwrap()).collect();
        let mut order = vec![];
        while let Some(i) = f.next() {
            order.push(i);
            f.read(i, false);
        }
        assert_eq!(order, vec![b[0], a[0], b[1], a[1], a[2], a[3], a[4]]);
        assert_eq!(f.queued(), 0);
        assert_eq!(f.held_by(7), 0);
    }

    #[test]
    fn drain_keeps_requests_frees_notifications() {
        let mut f = q(8, 8);
        let r = f.admit(1).unwrap();
        let n = f.admit(1).unwrap();
        let mut freed = vec![];
        f.drain(|i| i == r, |i| freed.push(i));
        assert_eq!(freed, vec![n]);
        assert_eq!(f.next(), None);
        assert_eq!(f.held_by(1), 1);
        f.release(r);
        assert_eq!(f.held_by(1), 0);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Admit(u32),
        Read(bool),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..4).prop_map(Op::Admit),
            any::<bool>().prop_map(Op::Read),
            (0usize..16).prop_map(Op::Release),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// Against a model: admission limits hold, and while two users both
        /// have records queued, neither is read twice in a row.
        #[test]
        fn fair_and_bounded(ops in proptest::collection::vec(op(), 1..400)) {
            let per_user = 5;
            let mut f = q(16, per_user);
            // Model: per user, queued indices in order; held places.
            let mut queued: BTreeMap<u32, VecDeque<usize>> = BTreeMap::new();
            let mut held: BTreeMap<usize, u32> = BTreeMap::new();
            let mut last: Option<u32> = None;
            for o in ops {
                match o {
                    Op::Admit(uid) => {
                        let mine = held.values().filter(|&&u| u == uid).count();
                        match f.admit(uid) {
                            Ok(i) => {
                                prop_assert!(mine < per_user);
                                prop_assert!(!held.contains_key(&i));
                                held.insert(i, uid);
                                queued.entry(uid).or_default().push_back(i);
                            }
                            Err(Full::User) => prop_assert!(mine >= per_user),
                            Err(Full::Queue) => prop_assert_eq!(held.len(), 16),
                        }
                    }
                    Op::Read(keep) => {
                        let users: Vec<u32> = queued.iter().filter(|(_, v)| !v.is_empty()).map(|(u, _)| *u).collect();
                        match f.next() {
                            None => prop_assert!(users.is_empty()),
                            Some(i) => {
                                let uid = held[&i];
                                // Round robin: the first user after `last`.
                                let want = users.iter().copied().find(|&u| last.is_none_or(|l| u > l)).or(users.first().copied());
                                prop_assert_eq!(Some(uid), want);
                                if users.len() > 1 {
                                    prop_assert_ne!(Some(uid), last);
                                }
                                // Oldest first within the user.
                                let q = queued.get_mut(&uid).unwrap();
                                prop_assert_eq!(q.pop_front(), Some(i));
                                f.read(i, keep);
                                last = Some(uid);
                                if !keep {
                                    held.remove(&i);
                                }
                            }
                        }
                    }
                    Op::Release(i) => {
                        f.release(i);
                        if let Some(uid) = held.remove(&i) {
                            if let Some(q) = queued.get_mut(&uid) {
                                q.retain(|&x| x != i);
                            }
                        }
                    }
                }
                prop_assert_eq!(f.queued(), queued.values().map(|v| v.len()).sum::<usize>());
                for uid in 0..4 {
                    prop_assert_eq!(f.held_by(uid), held.values().filter(|&&u| u == uid).count());
                }
            }
        }
    }
}
