// SPDX-License-Identifier: GPL-2.0
//! The sockets the PEM bound to a channel, so their close can be reported
//! (a [`ChannelClosed`](super::ChannelClosed) record) and an idle channel
//! ended ([`BoundTable::sweep_idle`]).
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
    /// End the channel after this long without a byte either way (ms);
    /// 0: never.
    pub idle_ms: u64,
    /// Bytes the socket had moved (both ways) when last looked at.
    pub activity: u64,
    /// When `activity` last changed (or the key was installed).
    pub active_ms: u64,
}

impl BoundSocket {
    /// A placeholder (no channel), e.g. to fill an output buffer.
    pub const NONE: BoundSocket = BoundSocket {
        channel_id: 0,
        key_id: [0; CHANNEL_KEY_ID_LEN],
        role: ChannelRole::Connect,
        opened_ms: 0,
        idle_ms: 0,
        activity: 0,
        active_ms: 0,
    };

    /// Looks at the socket's `activity` (bytes moved either way so far) at
    /// `now_ms`: a change restarts the idle clock. Whether the channel has
    /// now been idle for its whole timeout.
    pub fn idle(&mut self, now_ms: u64, activity: u64) -> bool {
        if activity != self.activity {
            self.activity = activity;
            self.active_ms = now_ms;
            return false;
        }
        self.idle_ms != 0 && now_ms.saturating_sub(self.active_ms) >= self.idle_ms
    }
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
        entry: BoundSocket::NONE,
    };
}

/// What a closing channel end reports as sent: the TCP payload bytes sent
/// so far plus those queued but not yet sent (`write_seq - snd_nxt`, mod
/// 2^32: a sender that closes right after its last write, the FIN counting
/// one): all the program handed over, not a race with the send queue.
pub fn handed_over(bytes_sent: u64, write_seq: u32, snd_nxt: u32) -> u64 {
    bytes_sent.wrapping_add(u64::from(write_seq.wrapping_sub(snd_nxt)))
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

    /// Whether `sk` is remembered.
    pub fn contains(&self, sk: usize) -> bool {
        sk != 0 && self.position(sk).is_some()
    }

    /// Takes out the sockets idle for their whole timeout at `now_ms`, at
    /// most `out.len()` of them, into `out`: every entry with a timeout
    /// reads its socket's activity (`activity(sk)`, bytes moved either way
    /// so far; see [`BoundSocket::idle`]). Returns how many were taken and
    /// whether entries with a timeout remain (keep sweeping).
    pub fn sweep_idle(
        &mut self,
        now_ms: u64,
        mut activity: impl FnMut(usize) -> u64,
        out: &mut [(usize, BoundSocket)],
    ) -> (usize, bool) {
        let (mut n, mut timed) = (0, false);
        for s in self.slots.iter_mut() {
            if s.sk == 0 || s.entry.idle_ms == 0 {
                continue;
            }
            if n < out.len() && s.entry.idle(now_ms, activity(s.sk)) {
                if let Some(o) = out.get_mut(n) {
                    *o = (s.sk, s.entry);
                    n += 1;
                    *s = Slot::EMPTY;
                    self.len -= 1;
                    continue;
                }
            }
            timed = true;
        }
        (n, timed)
    }

    /// Forgets every socket, handing each identity to `f`.
    pub fn drain(&mut self, mut f: impl FnMut(usize)) {
        for s in self.slots.iter_mut() {
            if s.sk != 0 {
                f(s.sk);
                *s = Slot::EMPTY;
            }
        }
        self.len = 0;
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
            idle_ms: 0,
            activity: 0,
            active_ms: 0,
        }
    }

    fn timed(idle_ms: u64, at: u64) -> BoundSocket {
        BoundSocket {
            idle_ms,
            active_ms: at,
            ..entry(1)
        }
    }

    #[test]
    fn handed_over_counts_the_unsent_queue() {
        // Nothing queued: what was sent.
        assert_eq!(handed_over(1000, 5000, 5000), 1000);
        // 17 bytes (the FIN one of them) queued but not yet sent.
        assert_eq!(handed_over(1000, 5017, 5000), 1017);
        // Across the sequence-number wrap.
        assert_eq!(handed_over(1000, 6, u32::MAX - 9), 1016);
    }

    #[test]
    fn the_idle_clock_restarts_on_traffic() {
        let mut e = timed(1000, 0);
        assert!(!e.idle(999, 0));
        assert!(e.idle(1000, 0), "a whole timeout without a byte");
        let mut e = timed(1000, 0);
        assert!(!e.idle(900, 5), "traffic restarts the clock");
        assert!(!e.idle(1899, 5));
        assert!(e.idle(1900, 5));
        let mut never = timed(0, 0);
        assert!(!never.idle(u64::MAX, 0), "0: no timeout");
        // A clock that went backwards never makes a channel idle.
        let mut e = timed(1000, 5000);
        assert!(!e.idle(10, 0));
    }

    #[test]
    fn sweeping_takes_only_idle_timed_channels() {
        let mut t = BoundTable::new(vec![Slot::EMPTY; 64]).unwrap();
        assert!(t.insert(64, timed(1000, 0)));
        assert!(t.insert(128, timed(5000, 0)));
        assert!(t.insert(192, entry(3)));
        assert!(t.contains(64) && !t.contains(256) && !t.contains(0));
        let mut out = [(0, entry(0)); 4];
        // Socket 128 moved a byte; nothing idle yet.
        let act = |sk: usize| if sk == 128 { 1 } else { 0 };
        assert_eq!(t.sweep_idle(500, act, &mut out), (0, true));
        let (n, more) = t.sweep_idle(1000, act, &mut out);
        assert_eq!((n, more), (1, true));
        assert_eq!(out[0].0, 64);
        assert_eq!(t.len(), 2);
        assert_eq!(t.sweep_idle(5499, act, &mut out), (0, true));
        assert_eq!(t.sweep_idle(5500, act, &mut out).0, 1);
        assert_eq!(out[0].0, 128);
        assert_eq!(
            t.sweep_idle(9999, act, &mut out),
            (0, false),
            "only untimed left"
        );
        assert!(t.contains(192));
        // A full `out` leaves the rest for the next sweep.
        assert!(t.insert(64, timed(1, 0)));
        assert!(t.insert(128, timed(1, 0)));
        let mut one = [(0, entry(0)); 1];
        assert_eq!(t.sweep_idle(10, |_| 0, &mut one), (1, true));
        assert_eq!(t.sweep_idle(10, |_| 0, &mut one), (1, false));
        let mut seen = Vec::new();
        t.drain(|sk| seen.push(sk));
        assert_eq!((seen, t.len()), (vec![192], 0));
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
