// SPDX-License-Identifier: GPL-2.0
//! The sockets the PEM bound to a channel, so their close can be reported
//! (a [`ChannelClosed`](super::ChannelClosed) record).
//!
//! Keyed by an opaque socket identity (the `struct sock` address, which
//! the kernel does not reuse while the socket lives: the entry is removed
//! when it closes). Bounded, no allocation (storage supplied by the
//! caller, as for the verdict cache): a socket hashes to a group of
//! [`PROBE`] consecutive slots and takes the first free one; when all are
//! taken the socket is not remembered (the caller counts it) and its close
//! goes unreported. Lookups only ever look at that one group.

use core::ops::DerefMut;

use super::{ChannelRole, CHANNEL_KEY_ID_LEN};

/// Slots a socket may occupy: its hash's group.
pub const PROBE: usize = 8;

/// One bound socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundSocket {
    /// The appliance's channel id.
    pub channel_id: u64,
    /// The channel's key id.
    pub key_id: [u8; CHANNEL_KEY_ID_LEN],
    /// This host's end.
    pub role: ChannelRole,
    /// When the key was installed (the caller's clock, ms).
    pub opened_ms: u64,
}

/// A slot: a socket identity (0: free) and what it was bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    sk: usize,
    entry: BoundSocket,
}

impl Slot {
    /// A free slot.
    pub const EMPTY: Slot = Slot {
        sk: 0,
        entry: BoundSocket {
            channel_id: 0,
            key_id: [0; CHANNEL_KEY_ID_LEN],
            role: ChannelRole::Connect,
            opened_ms: 0,
        },
    };
}

/// The table over caller-supplied slots.
pub struct BoundTable<S> {
    slots: S,
    len: usize,
}

impl<S: DerefMut<Target = [Slot]>> BoundTable<S> {
    /// A table over `slots` (all made free); `None` if there are fewer
    /// than [`PROBE`].
    pub fn new(mut slots: S) -> Option<Self> {
        if slots.len() < PROBE {
            return None;
        }
        slots.fill(Slot::EMPTY);
        Some(BoundTable { slots, len: 0 })
    }

    /// Sockets remembered now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Index of the first slot of `sk`'s group.
    fn group(&self, sk: usize) -> usize {
        // Socket addresses are cache-line aligned and come from slabs:
        // mix the bits above the alignment.
        let h = (sk >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as usize);
        // `checked_rem`: no division-by-zero path in the kernel build.
        (h >> 16).checked_rem(self.slots.len()).unwrap_or(0)
    }

    /// The `i`th slot of the group starting at `g`.
    fn at(&self, g: usize, i: usize) -> usize {
        (g + i).checked_rem(self.slots.len()).unwrap_or(0)
    }

    fn position(&self, sk: usize) -> Option<usize> {
        let g = self.group(sk);
        (0..PROBE)
            .map(|i| self.at(g, i))
            .find(|&i| self.slots.get(i).is_some_and(|s| s.sk == sk))
    }

    /// Remembers `sk` (not 0); an entry it already had is replaced.
    /// `false` when its group is full (it is then not remembered).
    pub fn insert(&mut self, sk: usize, entry: BoundSocket) -> bool {
        if sk == 0 {
            return false;
        }
        if let Some(i) = self.position(sk) {
            if let Some(s) = self.slots.get_mut(i) {
                s.entry = entry;
                return true;
            }
        }
        let g = self.group(sk);
        for i in 0..PROBE {
            let at = self.at(g, i);
            if let Some(s) = self.slots.get_mut(at) {
                if s.sk == 0 {
                    *s = Slot { sk, entry };
                    self.len += 1;
                    return true;
                }
            }
        }
        false
    }

    /// Forgets `sk`, returning what it was bound to.
    pub fn take(&mut self, sk: usize) -> Option<BoundSocket> {
        if sk == 0 {
            return None;
        }
        let i = self.position(sk)?;
        let s = self.slots.get_mut(i)?;
        let entry = s.entry;
        *s = Slot::EMPTY;
        self.len -= 1;
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn entry(c: u64) -> BoundSocket {
        BoundSocket {
            channel_id: c,
            key_id: [c as u8; CHANNEL_KEY_ID_LEN],
            role: if c.is_multiple_of(2) {
                ChannelRole::Connect
            } else {
                ChannelRole::Accept
            },
            opened_ms: c.wrapping_mul(10),
        }
    }

    #[test]
    fn insert_take_and_full_groups() {
        assert!(BoundTable::new(vec![Slot::EMPTY; PROBE - 1]).is_none());
        let mut t = BoundTable::new(vec![Slot::EMPTY; PROBE]).unwrap();
        assert!(!t.insert(0, entry(1)), "0 is no socket");
        for i in 1..=PROBE {
            assert!(t.insert(i * 64, entry(i as u64)));
        }
        assert_eq!(t.len(), PROBE);
        assert!(!t.insert(4096 * 64, entry(99)), "full: not remembered");
        assert!(t.insert(64, entry(7)), "a known socket is replaced");
        assert_eq!(t.len(), PROBE);
        assert_eq!(t.take(64), Some(entry(7)));
        assert_eq!(t.take(64), None);
        assert!(t.insert(4096 * 64, entry(99)));
        assert_eq!(t.take(4096 * 64), Some(entry(99)));
        assert_eq!(t.take(0), None);
    }

    proptest! {
        /// Against a map: what is taken is what was inserted last, nothing
        /// is found that was not inserted, and only full groups refuse.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((any::<bool>(), 1usize..200, any::<u64>()), 0..400)) {
            let mut t = BoundTable::new(vec![Slot::EMPTY; 64]).unwrap();
            let mut m: HashMap<usize, BoundSocket> = HashMap::new();
            for (ins, sk, c) in ops {
                let sk = sk * 64;
                if ins {
                    if t.insert(sk, entry(c)) {
                        m.insert(sk, entry(c));
                    } else {
                        prop_assert!(!m.contains_key(&sk));
                    }
                } else {
                    prop_assert_eq!(t.take(sk), m.remove(&sk));
                }
                prop_assert_eq!(t.len(), m.len());
            }
        }
    }
}
