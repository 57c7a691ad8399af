// SPDX-License-Identifier: GPL-2.0
//! The send hold: the sockets between their handshake and their channel
//! key.
//!
//! A connect whose verdict requires a bound channel connects and then asks
//! for its key; until the key is installed (or the connection reset),
//! another thread or process sharing the socket could send, and TCP would
//! send that in plaintext. The PEM enters the socket here before the SYN
//! and leaves after the key is installed; every TCP send that starts while
//! any socket is held looks its socket up ([`HoldSet::held`]) and waits,
//! and a send that had already started and waited for the handshake is
//! sent back to restart (see `kmod/net.rs`).
//!
//! Lock-free, so the lookup on the send path takes no lock (T-40): a fixed
//! array of atomic words in [`BUCKETS`] groups of [`WAYS`]; a socket
//! (its opaque identity, the `struct sock` address, never 0) takes a free
//! word of its group by compare-and-swap and gives it back by storing 0.
//! A lookup reads the [`WAYS`] words of one group. When its group is full
//! a connect cannot enter and waits for a word ([`HoldSet::enter`] says
//! so): it never connects unheld.

use core::sync::atomic::{AtomicUsize, Ordering};

/// Groups of the set (a power of two).
pub const BUCKETS: usize = 64;
/// Words per group: sockets of one group held at once.
pub const WAYS: usize = 4;

/// Sockets held at once at most: [`BUCKETS`] × [`WAYS`].
pub const CAPACITY: usize = BUCKETS * WAYS;

/// The held sockets. `const`-constructible, so it can be a `static`.
pub struct HoldSet {
    words: [AtomicUsize; CAPACITY],
    /// Sockets held now: 0 lets every send through on one load.
    n: AtomicUsize,
}

impl Default for HoldSet {
    fn default() -> Self {
        Self::new()
    }
}

impl HoldSet {
    /// An empty set.
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const ZERO: AtomicUsize = AtomicUsize::new(0);
        HoldSet {
            words: [ZERO; CAPACITY],
            n: AtomicUsize::new(0),
        }
    }

    /// The first word of `sk`'s group.
    fn group(sk: usize) -> usize {
        // Socket addresses are cache-line aligned and come from slabs:
        // mix the bits above the alignment.
        let h = (sk >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as usize);
        ((h >> 16) & (BUCKETS - 1)) * WAYS
    }

    /// Holds the sends of `sk` (not 0). `false` when its group is full
    /// (or `sk` is 0): the caller waits for a [`leave`](Self::leave) and
    /// tries again. A socket is entered at most once at a time (by its
    /// connect, which leaves before it returns).
    pub fn enter(&self, sk: usize) -> bool {
        if sk == 0 {
            return false;
        }
        // Counted first: a send that sees 0 here cannot race the word
        // below (the ordering is the kernel side's; see `any`).
        self.n.fetch_add(1, Ordering::SeqCst);
        let g = Self::group(sk);
        let won = self.words.get(g..g + WAYS).is_some_and(|ws| {
            ws.iter().any(|w| {
                w.compare_exchange(0, sk, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
            })
        });
        if !won {
            self.n.fetch_sub(1, Ordering::SeqCst);
        }
        won
    }

    /// Ends the hold of `sk` (bound, or reset). Whether it was held.
    pub fn leave(&self, sk: usize) -> bool {
        if sk == 0 {
            return false;
        }
        let g = Self::group(sk);
        let found = self.words.get(g..g + WAYS).is_some_and(|ws| {
            ws.iter().any(|w| {
                w.compare_exchange(sk, 0, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
            })
        });
        if found {
            self.n.fetch_sub(1, Ordering::SeqCst);
        }
        found
    }

    /// Whether any socket is held: the send path's first test.
    pub fn any(&self) -> bool {
        self.n.load(Ordering::SeqCst) != 0
    }

    /// Whether the sends of `sk` are held now.
    pub fn held(&self, sk: usize) -> bool {
        if sk == 0 || !self.any() {
            return false;
        }
        let g = Self::group(sk);
        self.words
            .get(g..g + WAYS)
            .is_some_and(|ws| ws.iter().any(|w| w.load(Ordering::SeqCst) == sk))
    }

    /// Sockets held now.
    pub fn len(&self) -> usize {
        self.n.load(Ordering::Relaxed)
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[derive(Debug, Clone)]
    enum Op {
        Enter(usize),
        Leave(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct sockets (so groups fill and the same socket comes
        // back), cache-line aligned like slab objects.
        let sk = (1usize..400).prop_map(|i| i << 6);
        prop_oneof![sk.clone().prop_map(Op::Enter), sk.prop_map(Op::Leave)]
    }

    proptest! {
        /// Against a map: a socket is held exactly between an `enter` that
        /// succeeded and its `leave`; `enter` fails only when the
        /// socket's group holds `WAYS` sockets; the count is exact.
        #[test]
        fn model(ops in proptest::collection::vec(op(), 1..600)) {
            let set = HoldSet::new();
            let mut model: HashSet<usize> = HashSet::new();
            for op in ops {
                match op {
                    Op::Enter(sk) => {
                        if model.contains(&sk) {
                            continue; // a socket's connect enters once
                        }
                        let in_group = model
                            .iter()
                            .filter(|&&o| HoldSet::group(o) == HoldSet::group(sk))
                            .count();
                        if set.enter(sk) {
                            prop_assert!(in_group < WAYS);
                            model.insert(sk);
                        } else {
                            prop_assert_eq!(in_group, WAYS);
                        }
                    }
                    Op::Leave(sk) => {
                        prop_assert_eq!(set.leave(sk), model.remove(&sk));
                    }
                }
                prop_assert_eq!(set.len(), model.len());
                prop_assert_eq!(set.any(), !model.is_empty());
                for sk in (1usize..400).map(|i| i << 6) {
                    prop_assert_eq!(set.held(sk), model.contains(&sk), "sk {:#x}", sk);
                }
            }
        }
    }

    #[test]
    fn zero_is_never_held() {
        let set = HoldSet::new();
        assert!(!set.enter(0));
        assert!(!set.leave(0));
        assert!(!set.held(0));
        assert!(set.is_empty());
    }

    /// Threads entering and leaving at once: a socket is seen held by
    /// every lookup between its enter and its leave (checked by the owner
    /// itself), and the set is empty afterwards.
    #[test]
    fn concurrent() {
        use std::sync::Arc;
        let set = Arc::new(HoldSet::new());
        let threads: Vec<_> = (0..8usize)
            .map(|t| {
                let set = Arc::clone(&set);
                std::thread::spawn(move || {
                    for i in 0..2000usize {
                        let sk = ((t * 100_000) + i + 1) << 6;
                        if set.enter(sk) {
                            assert!(set.held(sk));
                            assert!(set.any());
                            assert!(set.leave(sk));
                        }
                        assert!(!set.held(sk));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(set.is_empty());
    }
}
