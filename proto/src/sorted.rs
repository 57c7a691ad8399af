// SPDX-License-Identifier: GPL-2.0
//! The netfilter backstop's address sets: the protected services
//! (network namespace, address, port) and the protected hosts (the
//! agent's `Peers` record). Both are read on every packet that touches
//! the backstop, in softirq context, without a lock; both change rarely
//! (a service is added when a verdict first binds a connection to it, the
//! hosts when the appliance's list moves).
//!
//! So they are immutable sorted slices, searched by binary search; a
//! change builds a new slice ([`SortedSet::with`]) and the kernel publishes
//! it under RCU (`kmod/sys/mod.rs`, `RcuBox`), freeing the old one after a
//! grace period. Storage is the caller's (a `KVec` in the kernel).

use core::ops::Deref;

/// One end of a connection: `family` 4 or 6; for IPv4 only the first four
/// bytes of `addr` count and the rest are zero ([`NetEnd::new`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetEnd {
    /// The network namespace's cookie (0 for a protected host, which is
    /// matched in every namespace).
    pub net: u64,
    /// 4 or 6.
    pub family: u8,
    /// The address, zero-padded for IPv4.
    pub addr: [u8; 16],
    /// The port (0 for a protected host).
    pub port: u16,
}

impl NetEnd {
    /// A service: `addr`'s bytes past the family's length are ignored
    /// (zeroed), so an IPv4 end compares equal however it was filled.
    pub fn new(net: u64, family: u8, addr: &[u8; 16], port: u16) -> NetEnd {
        let family = if family == 6 { 6 } else { 4 };
        let mut a = [0u8; 16];
        let n = if family == 6 { 16 } else { 4 };
        if let (Some(dst), Some(src)) = (a.get_mut(..n), addr.get(..n)) {
            dst.copy_from_slice(src);
        }
        NetEnd {
            net,
            family,
            addr: a,
            port,
        }
    }

    /// A protected host: an address in any namespace, any port.
    pub fn host(family: u8, addr: &[u8; 16]) -> NetEnd {
        NetEnd::new(0, family, addr, 0)
    }
}

/// A set as a strictly ascending slice.
pub struct SortedSet<S>(S);

impl<T: Ord, S: Deref<Target = [T]>> SortedSet<S> {
    /// `None` unless `s` is strictly ascending (sorted, no duplicates).
    pub fn new(s: S) -> Option<Self> {
        if s.windows(2).all(|w| matches!(w, [a, b] if a < b)) {
            Some(SortedSet(s))
        } else {
            None
        }
    }

    /// Whether `x` is in the set.
    pub fn contains(&self, x: &T) -> bool {
        self.0.binary_search(x).is_ok()
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The elements, ascending.
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }

    /// Where `x` goes: `None` if it is in the set already, else the index
    /// a copy with `x` must put it at (see [`SortedSet::with`]).
    pub fn insertion(&self, x: &T) -> Option<usize> {
        self.0.binary_search(x).err()
    }
}

impl<T: Ord + Clone, S: Deref<Target = [T]>> SortedSet<S> {
    /// This set with `x` added, into `out` (cleared storage with room for
    /// `len() + 1`, filled by `push`, which fails only without room);
    /// `None` if `x` is in the set already or `push` failed.
    pub fn with<O, E>(
        &self,
        x: &T,
        mut out: O,
        mut push: impl FnMut(&mut O, T) -> Result<(), E>,
    ) -> Option<SortedSet<O>>
    where
        O: Deref<Target = [T]>,
    {
        let at = self.insertion(x)?;
        let (lo, hi) = self.0.split_at(at);
        for e in lo.iter().chain(core::iter::once(x)).chain(hi) {
            push(&mut out, e.clone()).ok()?;
        }
        SortedSet::new(out)
    }
}

/// Sorts `v` and removes duplicates in place (insertion sort: the peers
/// list is at most a few thousand entries, sorted once per record);
/// returns the length kept.
pub fn sort_unique<T: Ord + Copy>(v: &mut [T]) -> usize {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 {
            match (v.get(j - 1), v.get(j)) {
                (Some(a), Some(b)) if a > b => v.swap(j - 1, j),
                _ => break,
            }
            j -= 1;
        }
    }
    let mut kept: usize = 0;
    for i in 0..v.len() {
        let keep = match (kept.checked_sub(1).and_then(|k| v.get(k)), v.get(i)) {
            (Some(last), Some(x)) => last != x,
            _ => true,
        };
        if keep {
            v.swap(kept, i);
            kept += 1;
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn net_end() -> impl Strategy<Value = NetEnd> {
        (
            0u64..3,
            prop_oneof![Just(4u8), Just(6u8)],
            any::<[u8; 16]>(),
            0u16..4,
        )
            .prop_map(|(net, family, mut addr, port)| {
                // Few distinct values, so that inserts meet duplicates.
                for b in addr.iter_mut().skip(1) {
                    *b = 0;
                }
                addr[0] %= 4;
                NetEnd::new(net, family, &addr, port)
            })
    }

    proptest! {
        /// Built up by `with` from empty, the set answers `contains` like a
        /// `BTreeSet`, stays strictly ascending, and refuses duplicates.
        #[test]
        fn model(xs in proptest::collection::vec(net_end(), 0..200), probes in proptest::collection::vec(net_end(), 0..50)) {
            let mut set = SortedSet::new(Vec::new()).unwrap();
            let mut model = BTreeSet::new();
            for x in &xs {
                let next = set.with(x, Vec::with_capacity(set.len() + 1), |v: &mut Vec<NetEnd>, e| {
                    v.push(e);
                    Ok::<(), ()>(())
                });
                prop_assert_eq!(next.is_some(), model.insert(*x));
                if let Some(n) = next {
                    set = n;
                }
                prop_assert_eq!(set.as_slice(), &model.iter().copied().collect::<Vec<_>>()[..]);
            }
            for p in xs.iter().chain(&probes) {
                prop_assert_eq!(set.contains(p), model.contains(p));
            }
        }

        /// `sort_unique` keeps exactly the distinct values, ascending.
        #[test]
        fn sort_unique_model(mut v in proptest::collection::vec(0u8..20, 0..100)) {
            let want: Vec<u8> = v.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
            let n = sort_unique(&mut v);
            prop_assert_eq!(&v[..n], &want[..]);
            prop_assert!(SortedSet::new(&v[..n]).is_some());
        }
    }

    #[test]
    fn unsorted_or_duplicate_is_refused() {
        assert!(SortedSet::new(&[1, 2, 2][..]).is_none());
        assert!(SortedSet::new(&[2, 1][..]).is_none());
        assert!(SortedSet::new(&[1, 2, 3][..]).is_some());
    }

    #[test]
    fn ipv4_padding_is_ignored() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut b = a;
        b[10] = 0xff;
        assert_eq!(NetEnd::new(1, 4, &a, 80), NetEnd::new(1, 4, &b, 80));
        assert_ne!(NetEnd::new(1, 6, &a, 80), NetEnd::new(1, 6, &b, 80));
    }

    #[test]
    fn push_failure_gives_none() {
        let set = SortedSet::new(vec![1, 3]).unwrap();
        assert!(set
            .with(&2, Vec::new(), |_v: &mut Vec<i32>, _| Err::<(), ()>(()))
            .is_none());
    }
}
