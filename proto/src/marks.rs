// SPDX-License-Identifier: GPL-2.0
//! The netfilter backstop's marks: which TCP sockets a wrapper qualified,
//! and how ([`Mark`]), until their connection ends.
//!
//! A connect or accept wrapper marks its socket when it lets it go on
//! ([`MarkMap::mark`]: plaintext allowed, a channel required, a channel
//! key installed; a later mark of the same socket replaces the kind). The
//! backstop's hooks look the sending socket up on every segment to or from
//! a protected service ([`MarkMap::find`], softirq), and the `getsockopt`
//! wrapper refuses to read a kTLS key back from a socket marked bound. When
//! the program closes the socket (`tcp_close()` begins) the connection
//! goes on until `TCP_CLOSE` (queued data, FIN, retransmissions): its mark
//! turns *closing* ([`MarkMap::set_closing`]) and takes over a reference
//! on the socket the caller took, so the address cannot be reused while
//! the mark is there; a sweep ([`MarkMap::sweep`], once a second while any
//! mark is closing) removes the closing marks whose connection reached
//! `TCP_CLOSE`, and only then puts their references.
//!
//! # Layout
//!
//! Lock-free and allocation-free, `const`-constructible (a `static`): a
//! fixed array of `BUCKETS` groups of `WAYS` atomic words. A socket
//! (its identity, the `struct sock` address: never 0, at least 8-byte
//! aligned) lives in one word of its group, `sk | kind << 1 | closing`,
//! kind 1..=3 in bits 1-2 and the closing flag in bit 0; 0 is a free
//! word. A socket whose group is full cannot be marked ([`Unmarked::Full`]:
//! the kernel counts it and fails closed), so the map holds up to
//! `BUCKETS * WAYS` marks, fewer when the groups fill unevenly.
//!
//! # Concurrency
//!
//! Readers ([`find`](MarkMap::find)) load the words of one group and
//! compare them with the socket they hold. Writers change a word only by
//! compare-and-swap, so a reader sees each word either before or after a
//! change, never torn. A new mark first *reserves* a free word (the bare
//! address, kind 0, which readers ignore), then looks at the rest of the
//! group: if another word holds the same socket (a concurrent mark of it,
//! reserved or published), it gives its word back and starts over (it then
//! updates the published one, or waits for the reservation to resolve);
//! only otherwise does it publish its kind. With sequentially consistent
//! orderings, of two concurrent reservations of one socket at least one
//! sees the other, so at most one word of a group is ever published for a
//! socket (two marks of one socket that keep seeing each other both start
//! over: safe; a writer waits only for another writer *of the same
//! socket*, for the length of two stores). Counters are changed before the
//! word is published and after it is removed (undone when a publication
//! fails), so [`len`](MarkMap::len) never counts a mark a reader cannot
//! find once quiet.
//!
//! No RCU is needed, although a reader in softirq may load a word that a
//! sweep clears at that very moment, and the socket it named is freed and
//! its address reused by a new socket: a reader never dereferences what it
//! loads, it compares it with a socket it holds itself (the skb's, alive
//! while the hook runs; the `getsockopt` caller's). A word equal to that
//! address was therefore written for that very socket: a mark is removed
//! from the map *before* the reference that keeps its address from reuse
//! is put ([`sweep`](MarkMap::sweep) and [`drain`](MarkMap::drain) call
//! `put` only after the word is 0). This requires every marked socket to
//! reach [`set_closing`](MarkMap::set_closing) before it is freed (the
//! kernel marks TCP sockets only, whose close always runs `tcp_close()`),
//! and no mark of a socket to start after its close began (its wrappers
//! hold it open).

use super::backstop::Mark;
use core::hint::spin_loop;
use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};

/// The closing flag of a word.
const CLOSING: usize = 1;
/// The kind bits of a word (0 in a reservation).
const KIND: usize = 0b110;
/// The socket bits of a word.
const SK: usize = !0b111;

/// Why a socket was not marked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmarked {
    /// Its group of the map is full.
    Full,
    /// Not a socket identity: 0, or not 8-byte aligned.
    Invalid,
}

fn kind_bits(m: Mark) -> usize {
    match m {
        Mark::Plain => 1 << 1,
        Mark::Channel => 2 << 1,
        Mark::Bound => 3 << 1,
    }
}

/// The mark a published word carries; `None` for a free or reserved one.
fn kind_of(w: usize) -> Option<Mark> {
    match (w & KIND) >> 1 {
        1 => Some(Mark::Plain),
        2 => Some(Mark::Channel),
        3 => Some(Mark::Bound),
        _ => None,
    }
}

fn valid(sk: usize) -> bool {
    sk != 0 && sk & !SK == 0
}

/// The marked sockets: `BUCKETS` (a power of two) groups of `WAYS` words.
pub struct MarkMap<const BUCKETS: usize, const WAYS: usize> {
    groups: [[AtomicUsize; WAYS]; BUCKETS],
    /// Published marks.
    n: AtomicUsize,
    /// Of those, closing ones.
    closing: AtomicUsize,
}

impl<const BUCKETS: usize, const WAYS: usize> Default for MarkMap<BUCKETS, WAYS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const BUCKETS: usize, const WAYS: usize> MarkMap<BUCKETS, WAYS> {
    /// Marks at most.
    pub const CAPACITY: usize = BUCKETS * WAYS;

    /// An empty map.
    pub const fn new() -> Self {
        const { assert!(BUCKETS.is_power_of_two() && WAYS > 0) };
        MarkMap {
            groups: [const { [const { AtomicUsize::new(0) }; WAYS] }; BUCKETS],
            n: AtomicUsize::new(0),
            closing: AtomicUsize::new(0),
        }
    }

    /// `sk`'s group.
    fn group(&self, sk: usize) -> &[AtomicUsize] {
        // Socket addresses come from slabs, cache-line aligned: mix the
        // bits above the alignment.
        let h = (sk >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as usize);
        let g = (h >> 16) & (BUCKETS - 1);
        self.groups.get(g).map_or(&[], |g| g.as_slice())
    }

    /// Marks `sk` with `mark`, or changes the mark it has (a closing mark
    /// stays closing). Not for a socket whose close began.
    pub fn mark(&self, sk: usize, mark: Mark) -> Result<(), Unmarked> {
        if !valid(sk) {
            return Err(Unmarked::Invalid);
        }
        let group = self.group(sk);
        let bits = kind_bits(mark);
        'retry: loop {
            let mut reserved = false;
            let mut free = None;
            for (i, w) in group.iter().enumerate() {
                let cur = w.load(SeqCst);
                if cur & SK != sk {
                    if cur == 0 && free.is_none() {
                        free = Some(i);
                    }
                    continue;
                }
                if cur & KIND == 0 {
                    // Another mark of sk between its reservation and its
                    // publication (or giving it back).
                    reserved = true;
                    continue;
                }
                if w.compare_exchange(cur, (cur & !KIND) | bits, SeqCst, SeqCst)
                    .is_err()
                {
                    continue 'retry; // closing meanwhile, or swept
                }
                return Ok(());
            }
            if reserved {
                spin_loop();
                continue;
            }
            let Some((i, w)) = free.and_then(|i| Some((i, group.get(i)?))) else {
                return Err(Unmarked::Full);
            };
            #[cfg(test)]
            tests::between_scan_and_reserve(sk);
            if w.compare_exchange(0, sk, SeqCst, SeqCst).is_err() {
                continue; // taken meanwhile
            }
            // Reserved: a concurrent mark of sk that reserved or published
            // first is seen here (see the module's comment).
            let other = group
                .iter()
                .enumerate()
                .any(|(j, o)| j != i && o.load(SeqCst) & SK == sk);
            if other {
                w.store(0, SeqCst);
                spin_loop();
                continue;
            }
            self.n.fetch_add(1, SeqCst);
            if w.compare_exchange(sk, sk | bits, SeqCst, SeqCst).is_ok() {
                return Ok(());
            }
            // Taken by a drain meanwhile: mark again.
            self.n.fetch_sub(1, SeqCst);
        }
    }

    /// `sk`'s mark, and whether it is closing. Any context; never
    /// dereferences anything it reads (see the module's comment).
    pub fn find(&self, sk: usize) -> Option<(Mark, bool)> {
        if !valid(sk) {
            return None;
        }
        self.group(sk).iter().find_map(|w| {
            let cur = w.load(SeqCst);
            if cur & SK != sk {
                return None;
            }
            Some((kind_of(cur)?, cur & CLOSING != 0))
        })
    }

    /// `sk`'s close began: its mark turns closing. `true` exactly when it
    /// was marked and not closing yet: the caller's reference on `sk` then
    /// belongs to the mark, put by the [`sweep`](Self::sweep) or
    /// [`drain`](Self::drain) that removes it.
    pub fn set_closing(&self, sk: usize) -> bool {
        if !valid(sk) || self.n.load(SeqCst) == 0 {
            return false;
        }
        for w in self.group(sk) {
            loop {
                let cur = w.load(SeqCst);
                if cur & SK != sk || cur & KIND == 0 {
                    break;
                }
                if cur & CLOSING != 0 {
                    return false;
                }
                // Counted first: a sweep that removes it at once must
                // not take the count below zero.
                self.closing.fetch_add(1, SeqCst);
                if w.compare_exchange(cur, cur | CLOSING, SeqCst, SeqCst)
                    .is_ok()
                {
                    return true;
                }
                self.closing.fetch_sub(1, SeqCst); // its kind changed: again
            }
        }
        false
    }

    /// Removes each closing mark whose connection is over (`closed` of its
    /// socket), then calls `put` with the socket. Whether closing marks
    /// remain (sweep again later).
    pub fn sweep(&self, closed: impl Fn(usize) -> bool, mut put: impl FnMut(usize)) -> bool {
        if self.closing.load(SeqCst) == 0 {
            return false;
        }
        for w in self.groups.iter().flatten() {
            let cur = w.load(SeqCst);
            if cur & CLOSING == 0 || !closed(cur & SK) {
                continue;
            }
            // Lost only to a kind change: the next sweep.
            if w.compare_exchange(cur, 0, SeqCst, SeqCst).is_ok() {
                self.closing.fetch_sub(1, SeqCst);
                self.n.fetch_sub(1, SeqCst);
                put(cur & SK);
            }
        }
        self.closing.load(SeqCst) != 0
    }

    /// Removes every mark (unload: no mark, close or sweep runs any
    /// more), calling `put` with the socket of each closing one once it
    /// is removed.
    pub fn drain(&self, mut put: impl FnMut(usize)) {
        for w in self.groups.iter().flatten() {
            let cur = w.swap(0, SeqCst);
            if kind_of(cur).is_none() {
                continue; // free, or a reservation (its mark starts over)
            }
            self.n.fetch_sub(1, SeqCst);
            if cur & CLOSING != 0 {
                self.closing.fetch_sub(1, SeqCst);
                put(cur & SK);
            }
        }
    }

    /// Marks now.
    pub fn len(&self) -> usize {
        self.n.load(SeqCst)
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closing marks now (each holding a socket reference).
    pub fn closing_len(&self) -> usize {
        self.closing.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// What runs in `mark` between its scan and its reservation.
    type Hook = Box<dyn FnOnce(usize)>;

    std::thread_local! {
        /// Runs (once) in `mark` between its scan and its reservation: what
        /// another thread does in that window.
        static BETWEEN: std::cell::Cell<Option<Hook>> =
            const { std::cell::Cell::new(None) };
    }

    pub(super) fn between_scan_and_reserve(sk: usize) {
        if let Some(f) = BETWEEN.take() {
            f(sk);
        }
    }

    /// The interleaving the reservation guards against, made to happen:
    /// between a mark's scan (the socket absent, word 2 the first free)
    /// and its reservation, a sweep frees word 0 and another mark of the
    /// same socket publishes it there. The first mark must see it and
    /// update it, not publish a second copy.
    #[test]
    fn a_concurrent_first_mark_is_seen() {
        let map: &'static MarkMap<1, 4> = Box::leak(Box::default());
        let (a, b, x) = (0x40, 0x80, 0xc0);
        map.mark(a, Mark::Plain).unwrap();
        map.mark(b, Mark::Plain).unwrap();
        assert!(map.set_closing(a));
        BETWEEN.set(Some(Box::new(move |sk| {
            assert_eq!(sk, x);
            assert!(!map.sweep(|s| s == a, |_| {}));
            map.mark(x, Mark::Channel).unwrap();
        })));
        map.mark(x, Mark::Bound).unwrap();
        assert_eq!(copies(map, x), 1);
        assert_eq!(map.find(x), Some((Mark::Bound, false)));
        assert_eq!(map.len(), 2);
    }

    /// A word another mark reserved (the bare address) is no mark yet:
    /// not found, not closed, not counted, and a drain frees it.
    #[test]
    fn reservations_are_not_marks() {
        let map: MarkMap<1, 4> = MarkMap::new();
        let x = 0x40;
        map.groups[0][2].store(x, SeqCst);
        assert_eq!(map.find(x), None);
        map.mark(0x80, Mark::Plain).unwrap();
        assert!(!map.set_closing(x));
        assert!(!map.sweep(|_| true, |_| panic!("put")));
        map.drain(|_| panic!("put"));
        assert_eq!((map.len(), map.closing_len()), (0, 0));
        assert_eq!(map.groups[0][2].load(SeqCst), 0);
    }

    /// Small, so groups fill and sockets share groups.
    type Small = MarkMap<4, 4>;

    /// Published words holding `sk`, over the whole map.
    fn copies<const B: usize, const W: usize>(m: &MarkMap<B, W>, sk: usize) -> usize {
        m.groups
            .iter()
            .flatten()
            .filter(|w| {
                let cur = w.load(SeqCst);
                cur & SK == sk && kind_of(cur).is_some()
            })
            .count()
    }

    fn group_index<const B: usize, const W: usize>(
        m: &MarkMap<B, W>,
        sk: usize,
    ) -> *const AtomicUsize {
        m.group(sk).as_ptr()
    }

    #[derive(Debug, Clone)]
    enum Op {
        Mark(usize, Mark),
        Closing(usize),
        /// Connections over: those whose socket's bit is set.
        Sweep(u64),
        Drain,
    }

    /// Socket identities: 8-byte aligned, few (so they come back and
    /// share groups).
    fn sk() -> impl Strategy<Value = usize> {
        (1usize..64).prop_map(|i| i << 3)
    }

    fn mark() -> impl Strategy<Value = Mark> {
        prop_oneof![Just(Mark::Plain), Just(Mark::Channel), Just(Mark::Bound)]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (sk(), mark()).prop_map(|(s, m)| Op::Mark(s, m)),
            3 => sk().prop_map(Op::Closing),
            2 => any::<u64>().prop_map(Op::Sweep),
            1 => Just(Op::Drain),
        ]
    }

    fn is_closed(bits: u64, sk: usize) -> bool {
        bits >> ((sk >> 3) % 64) & 1 != 0
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Against a map: marks, kinds and closing flags; `mark` refuses
        /// exactly when the socket is new and its group holds `WAYS`
        /// marks; `set_closing` hands the reference over once; a sweep
        /// removes exactly the closing marks of closed connections and
        /// puts each once, after it is gone; counts are exact.
        #[test]
        fn model(ops in proptest::collection::vec(op(), 1..400)) {
            let map = Small::new();
            let mut model: HashMap<usize, (Mark, bool)> = HashMap::new();
            for op in ops {
                match op {
                    Op::Mark(sk, m) => {
                        let in_group = model
                            .keys()
                            .filter(|&&o| group_index(&map, o) == group_index(&map, sk))
                            .count();
                        match map.mark(sk, m) {
                            Ok(()) => {
                                prop_assert!(model.contains_key(&sk) || in_group < 4);
                                model.entry(sk).or_insert((m, false)).0 = m;
                            }
                            Err(e) => {
                                prop_assert_eq!(e, Unmarked::Full);
                                prop_assert!(!model.contains_key(&sk) && in_group == 4);
                            }
                        }
                    }
                    Op::Closing(sk) => {
                        let want = match model.get_mut(&sk) {
                            Some((_, c)) if !*c => {
                                *c = true;
                                true
                            }
                            _ => false,
                        };
                        prop_assert_eq!(map.set_closing(sk), want);
                    }
                    Op::Sweep(bits) => {
                        let mut put = Vec::new();
                        let more = map.sweep(
                            |sk| is_closed(bits, sk),
                            |sk| {
                                // Removed before its reference goes.
                                assert_eq!(map.find(sk), None);
                                put.push(sk);
                            },
                        );
                        let mut want: Vec<usize> = model
                            .iter()
                            .filter(|(&sk, &(_, c))| c && is_closed(bits, sk))
                            .map(|(&sk, _)| sk)
                            .collect();
                        for sk in &want {
                            model.remove(sk);
                        }
                        put.sort_unstable();
                        want.sort_unstable();
                        prop_assert_eq!(put, want);
                        prop_assert_eq!(more, model.values().any(|&(_, c)| c));
                    }
                    Op::Drain => {
                        let mut put = Vec::new();
                        map.drain(|sk| {
                            assert_eq!(map.find(sk), None);
                            put.push(sk);
                        });
                        let mut want: Vec<usize> = model
                            .iter()
                            .filter(|(_, &(_, c))| c)
                            .map(|(&sk, _)| sk)
                            .collect();
                        model.clear();
                        put.sort_unstable();
                        want.sort_unstable();
                        prop_assert_eq!(put, want);
                    }
                }
                prop_assert_eq!(map.len(), model.len());
                prop_assert_eq!(map.closing_len(), model.values().filter(|v| v.1).count());
                for sk in (1usize..64).map(|i| i << 3) {
                    prop_assert_eq!(map.find(sk), model.get(&sk).copied(), "sk {:#x}", sk);
                    prop_assert!(copies(&map, sk) <= 1);
                }
            }
        }
    }

    #[test]
    fn not_a_socket() {
        let map = Small::new();
        for sk in [0, 1, 4, 0x1001, 0x1006] {
            assert_eq!(map.mark(sk, Mark::Plain), Err(Unmarked::Invalid));
            assert_eq!(map.find(sk), None);
            assert!(!map.set_closing(sk));
        }
        assert!(map.is_empty());
        // A valid neighbour is not found through an unaligned address.
        assert_eq!(map.mark(0x1000, Mark::Bound), Ok(()));
        assert_eq!(map.find(0x1001), None);
        assert_eq!(map.find(0x1000), Some((Mark::Bound, false)));
    }

    #[test]
    fn the_kernel_size() {
        let map: Box<MarkMap<4096, 16>> = Box::default();
        assert_eq!(MarkMap::<4096, 16>::CAPACITY, 65536);
        // Slab-like addresses (2 KiB apart) spread over the groups: a
        // few thousand sockets all fit.
        for i in 1..=8192usize {
            assert_eq!(
                map.mark(0xffff_8880_0000_0000 + i * 2048, Mark::Plain),
                Ok(())
            );
        }
        assert_eq!(map.len(), 8192);
    }

    /// Threads marking one new socket at the same moment, in a single
    /// group whose words other marks take and a sweeper frees meanwhile
    /// (so the threads find different free words): the socket is in the
    /// map once, and counted once.
    #[test]
    fn concurrent_first_marks() {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Barrier};

        const THREADS: usize = 4;
        const ROUNDS: usize = 4000;
        struct World {
            map: MarkMap<1, 16>,
            closed: Vec<AtomicBool>,
            stop: AtomicBool,
            barrier: Barrier,
        }
        // Socket i: 8 * (i + 1); 0..THREADS are the threads' own, then
        // one shared socket per round.
        let sk = |i: usize| (i + 1) * 8;
        let world = Arc::new(World {
            map: MarkMap::new(),
            closed: (0..THREADS + ROUNDS)
                .map(|_| AtomicBool::new(false))
                .collect(),
            stop: AtomicBool::new(false),
            barrier: Barrier::new(THREADS),
        });
        let sweeper = {
            let w = Arc::clone(&world);
            std::thread::spawn(move || {
                while !w.stop.load(SeqCst) {
                    w.map.sweep(|s| w.closed[s / 8 - 1].load(SeqCst), |_| {});
                }
            })
        };
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let w = Arc::clone(&world);
                std::thread::spawn(move || {
                    let own = sk(t);
                    for r in 0..ROUNDS {
                        // Its own socket: marked, then closed and left to
                        // the sweeper, which frees its word at some point
                        // of the marks below.
                        while w.map.find(own).is_some() {
                            std::thread::yield_now();
                        }
                        w.closed[t].store(false, SeqCst);
                        w.map.mark(own, Mark::Plain).unwrap();
                        assert!(w.map.set_closing(own));
                        w.closed[t].store(true, SeqCst);
                        w.barrier.wait();
                        let shared = sk(THREADS + r);
                        w.map.mark(shared, Mark::Channel).unwrap();
                        w.map.mark(shared, Mark::Bound).unwrap();
                        w.barrier.wait();
                        if t == 0 {
                            assert_eq!(copies(&w.map, shared), 1, "round {r}");
                            assert_eq!(w.map.find(shared), Some((Mark::Bound, false)));
                            assert!(w.map.set_closing(shared));
                            w.closed[THREADS + r].store(true, SeqCst);
                        }
                    }
                })
            })
            .collect();
        for h in workers {
            h.join().unwrap();
        }
        while world.map.closing_len() != 0 {
            std::thread::yield_now();
        }
        world.stop.store(true, SeqCst);
        sweeper.join().unwrap();
        assert_eq!((world.map.len(), world.map.closing_len()), (0, 0));
    }

    /// Threads marking, closing and sweeping at once, each on its own
    /// sockets and all on shared ones (re-marked with other kinds, so the
    /// same socket is inserted concurrently): nothing an owner marked is
    /// lost while it is open, nothing is found that is not marked, a
    /// shared socket is in the map once, each closing reference is put
    /// exactly once, and the counts end exact.
    #[test]
    fn concurrent() {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::Arc;

        const THREADS: usize = 4;
        const ROUNDS: usize = 3000;
        const SHARED: usize = 8;
        // Sockets: shared ones first, then each thread's own, 8 bytes
        // apart, so they crowd a few groups.
        const OWN: usize = 8;
        const SOCKETS: usize = SHARED + THREADS * OWN;
        let sk = |i: usize| 0x10_0000 + i * 8;

        struct World {
            map: MarkMap<64, 16>,
            closed: Vec<AtomicBool>,
            puts: Vec<AtomicUsize>,
            closings: Vec<AtomicUsize>,
            stop: AtomicBool,
        }
        let world = Arc::new(World {
            map: MarkMap::new(),
            closed: (0..SOCKETS).map(|_| AtomicBool::new(false)).collect(),
            puts: (0..SOCKETS).map(|_| AtomicUsize::new(0)).collect(),
            closings: (0..SOCKETS).map(|_| AtomicUsize::new(0)).collect(),
            stop: AtomicBool::new(false),
        });
        let index = move |s: usize| (s - 0x10_0000) / 8;
        let sweeper = {
            let w = Arc::clone(&world);
            std::thread::spawn(move || {
                while !w.stop.load(SeqCst) {
                    w.map.sweep(
                        |s| w.closed[index(s)].load(SeqCst),
                        |s| {
                            w.puts[index(s)].fetch_add(1, SeqCst);
                        },
                    );
                }
            })
        };
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let w = Arc::clone(&world);
                std::thread::spawn(move || {
                    let kinds = [Mark::Plain, Mark::Channel, Mark::Bound];
                    for r in 0..ROUNDS {
                        // A shared socket, marked by every thread.
                        let s = sk(r % SHARED);
                        w.map.mark(s, kinds[(r + t) % 3]).unwrap();
                        assert!(w.map.find(s).is_some(), "shared {s:#x} lost");
                        // One of its own: marked, re-marked, found,
                        // closed; or never marked (must not be found).
                        let i = SHARED + t * OWN + r % OWN;
                        let s = sk(i);
                        if (r / OWN).is_multiple_of(2) {
                            w.map.mark(s, Mark::Channel).unwrap();
                            w.map.mark(s, Mark::Bound).unwrap();
                            assert_eq!(w.map.find(s), Some((Mark::Bound, false)), "own {s:#x}");
                            assert!(w.map.set_closing(s));
                            assert!(!w.map.set_closing(s));
                            w.closings[i].fetch_add(1, SeqCst);
                            // The connection ends; the sweeper removes it.
                            w.closed[i].store(true, SeqCst);
                            while w.map.find(s).is_some() {
                                std::thread::yield_now();
                            }
                            w.closed[i].store(false, SeqCst);
                        } else {
                            assert_eq!(w.map.find(s), None, "phantom {s:#x}");
                            assert!(!w.map.set_closing(s));
                        }
                    }
                })
            })
            .collect();
        for h in workers {
            h.join().unwrap();
        }
        world.stop.store(true, SeqCst);
        sweeper.join().unwrap();
        let map = &world.map;
        // Each shared socket once; no own socket left.
        for i in 0..SOCKETS {
            let want = usize::from(i < SHARED);
            assert_eq!(copies(map, sk(i)), want, "socket {i}");
            assert_eq!(map.find(sk(i)).is_some(), i < SHARED, "socket {i}");
        }
        assert_eq!(map.len(), SHARED);
        assert_eq!(map.closing_len(), 0);
        for i in 0..SOCKETS {
            let (puts, closings) = (&world.puts[i], &world.closings[i]);
            assert_eq!(puts.load(SeqCst), closings.load(SeqCst), "socket {i}");
        }
        assert!(world.closings[SHARED..].iter().all(|c| c.load(SeqCst) > 0));
        // Unload: the shared ones go, none was closing.
        for i in 0..SHARED {
            assert!(map.set_closing(sk(i)));
        }
        let mut put = 0;
        map.drain(|_| put += 1);
        assert_eq!((put, map.len(), map.closing_len()), (SHARED, 0, 0));
    }
}
