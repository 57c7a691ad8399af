//! Accepts decided while the connection waits aside (threat T-37).
//!
//! A non-blocking `accept()` must not wait for a verdict: the program's
//! event loop would stall for the appliance's round trip. The module
//! takes such a connection off the accept queue, sets it aside (a kernel
//! socket of its own, as `kernel_accept` makes), returns `EAGAIN`, and
//! asks on a worker. When the verdict allows it, the connection is
//! *ready*: the listener is woken, `poll()` reports it readable, and the
//! next `accept()` on that listener hands it out; a refused one is reset.
//!
//! [`Deferred`] is the book of those connections: which listener each
//! belongs to, whether it is still being asked about or ready, in arrival
//! order. It owns what the caller stores for a ready one (the kernel's
//! socket handle, whose `Drop` resets and frees it) and never drops one
//! itself: every value leaves through [`Deferred::settle`]'s error,
//! [`Deferred::take`] or [`Deferred::forget_one`], so the caller can drop
//! it outside its lock. Capacity is fixed: `N` connections at once, at
//! most [`Deferred::per_listener`] of one listener, so one busy listener
//! cannot hold every place; past that an accept waits for its verdict as
//! a blocking one does.

/// Where one connection stands.
#[derive(Debug)]
enum Entry<T> {
    Free,
    /// Being asked about; `orphan` once its listener closed.
    Asking {
        listener: usize,
        orphan: bool,
    },
    /// Allowed; handed out by the next accept on `listener`, oldest
    /// (`seq`) first.
    Ready {
        listener: usize,
        seq: u64,
        value: T,
    },
}

/// A place reserved by [`Deferred::reserve`], to be settled or cancelled
/// exactly once (not `Clone`).
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket(usize);

/// The connections set aside; see the module documentation.
pub struct Deferred<T, const N: usize> {
    slots: [Entry<T>; N],
    per_listener: usize,
    ready: usize,
    next_seq: u64,
}

impl<T, const N: usize> Deferred<T, N> {
    /// An empty book: `N` places, at most `per_listener` of one listener.
    pub fn new(per_listener: usize) -> Self {
        Deferred {
            slots: core::array::from_fn(|_| Entry::Free),
            per_listener,
            ready: 0,
            next_seq: 0,
        }
    }

    /// At most this many places of one listener.
    pub fn per_listener(&self) -> usize {
        self.per_listener
    }

    /// Places of `listener` in use (asking or ready, orphans not counted).
    pub fn of(&self, listener: usize) -> usize {
        self.slots
            .iter()
            .filter(|e| match e {
                Entry::Asking {
                    listener: l,
                    orphan: false,
                } => *l == listener,
                Entry::Ready { listener: l, .. } => *l == listener,
                _ => false,
            })
            .count()
    }

    /// A place for a connection of `listener` about to be asked about;
    /// `None` when the book or the listener's share is full.
    pub fn reserve(&mut self, listener: usize) -> Option<Ticket> {
        if self.of(listener) >= self.per_listener {
            return None;
        }
        let (i, slot) = self
            .slots
            .iter_mut()
            .enumerate()
            .find(|(_, e)| matches!(e, Entry::Free))?;
        *slot = Entry::Asking {
            listener,
            orphan: false,
        };
        Some(Ticket(i))
    }

    /// The verdict allowed the connection: it becomes ready (the caller
    /// wakes the listener). `Err(value)` when its listener closed
    /// meanwhile: the caller drops (resets) it.
    pub fn settle(&mut self, t: Ticket, value: T) -> Result<(), T> {
        let Some(slot) = self.slots.get_mut(t.0) else {
            return Err(value);
        };
        match *slot {
            Entry::Asking {
                listener,
                orphan: false,
            } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                *slot = Entry::Ready {
                    listener,
                    seq,
                    value,
                };
                self.ready += 1;
                Ok(())
            }
            Entry::Asking { orphan: true, .. } => {
                *slot = Entry::Free;
                Err(value)
            }
            // A ticket is settled once; not reached.
            _ => Err(value),
        }
    }

    /// The verdict refused the connection (or asking failed): its place
    /// is free again.
    pub fn cancel(&mut self, t: Ticket) {
        if let Some(slot @ Entry::Asking { .. }) = self.slots.get_mut(t.0) {
            *slot = Entry::Free;
        }
    }

    /// The oldest ready connection of `listener`, taken out.
    pub fn take(&mut self, listener: usize) -> Option<T> {
        let i = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Entry::Ready {
                    listener: l, seq, ..
                } if *l == listener => Some((*seq, i)),
                _ => None,
            })
            .min()?
            .1;
        match core::mem::replace(self.slots.get_mut(i)?, Entry::Free) {
            Entry::Ready { value, .. } => {
                self.ready -= 1;
                Some(value)
            }
            // Just matched as ready; not reached.
            _ => None,
        }
    }

    /// Whether `listener` has a ready connection (its `poll()` reports it
    /// readable).
    pub fn has_ready(&self, listener: usize) -> bool {
        self.ready > 0
            && self
                .slots
                .iter()
                .any(|e| matches!(e, Entry::Ready { listener: l, .. } if *l == listener))
    }

    /// Ready connections of all listeners (0: `poll()` needs no look).
    pub fn ready(&self) -> usize {
        self.ready
    }

    /// Places in use: asking (orphans too) or ready.
    pub fn used(&self) -> usize {
        self.slots
            .iter()
            .filter(|e| !matches!(e, Entry::Free))
            .count()
    }

    /// `listener` closed: marks its connections still being asked about
    /// as orphans (their [`settle`](Self::settle) gives them back) and
    /// takes out one ready connection, if any; call until `None`.
    pub fn forget_one(&mut self, listener: usize) -> Option<T> {
        for e in self.slots.iter_mut() {
            if let Entry::Asking {
                listener: l,
                orphan,
            } = e
            {
                if *l == listener {
                    *orphan = true;
                }
            }
        }
        self.take(listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(usize),
        Settle(usize),
        Cancel(usize),
        Take(usize),
        Forget(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let l = 1usize..4;
        let t = 0usize..16;
        prop_oneof![
            3 => l.clone().prop_map(Op::Reserve),
            3 => t.clone().prop_map(Op::Settle),
            1 => t.prop_map(Op::Cancel),
            3 => l.clone().prop_map(Op::Take),
            1 => l.prop_map(Op::Forget),
        ]
    }

    /// The model's view of one reserved place.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum M {
        Asking { listener: usize, orphan: bool },
        Ready { listener: usize, value: u32 },
    }

    proptest! {
        /// Against a model: capacity and the per-listener share hold;
        /// `take` hands out the listener's ready values in settle order;
        /// a value settled for a closed listener comes back; every value
        /// put in leaves exactly once (none lost, none handed twice).
        #[test]
        fn model(ops in proptest::collection::vec(op(), 1..400)) {
            const N: usize = 6;
            const PER: usize = 4;
            let mut d: Deferred<u32, N> = Deferred::new(PER);
            // Live tickets in reservation order, with the model's state.
            let mut tickets: Vec<(Ticket, usize)> = Vec::new();
            let mut model: BTreeMap<usize, M> = BTreeMap::new();
            let mut order: Vec<u32> = Vec::new(); // settle order of ready values
            let mut next_value = 0u32;
            let mut out = 0u32; // values that left
            for op in ops {
                match op {
                    Op::Reserve(l) => {
                        let used = model.len();
                        let of_l = model.values().filter(|m| matches!(m,
                            M::Asking { listener, orphan: false } | M::Ready { listener, .. }
                            if *listener == l)).count();
                        prop_assert_eq!(d.of(l), of_l);
                        match d.reserve(l) {
                            Some(t) => {
                                prop_assert!(used < N && of_l < PER);
                                prop_assert!(!model.contains_key(&t.0));
                                model.insert(t.0, M::Asking { listener: l, orphan: false });
                                let i = t.0;
                                tickets.push((t, i));
                            }
                            None => prop_assert!(used == N || of_l == PER),
                        }
                    }
                    Op::Settle(k) | Op::Cancel(k) if k < tickets.len() => {
                        let (t, i) = tickets.remove(k);
                        let M::Asking { listener, orphan } = model[&i] else {
                            unreachable!("a live ticket is asking")
                        };
                        if let Op::Cancel(_) = op {
                            d.cancel(t);
                            model.remove(&i);
                            continue;
                        }
                        let v = next_value;
                        next_value += 1;
                        match d.settle(t, v) {
                            Ok(()) => {
                                prop_assert!(!orphan);
                                model.insert(i, M::Ready { listener, value: v });
                                order.push(v);
                            }
                            Err(back) => {
                                prop_assert!(orphan);
                                prop_assert_eq!(back, v);
                                model.remove(&i);
                                out += 1;
                            }
                        }
                    }
                    Op::Settle(_) | Op::Cancel(_) => {}
                    Op::Take(l) | Op::Forget(l) => {
                        if let Op::Forget(_) = op {
                            for m in model.values_mut() {
                                if let M::Asking { listener, orphan } = m {
                                    if *listener == l {
                                        *orphan = true;
                                    }
                                }
                            }
                        }
                        let want = order.iter().copied().find(|v| model.values()
                            .any(|m| *m == M::Ready { listener: l, value: *v }));
                        prop_assert_eq!(d.has_ready(l), want.is_some());
                        let got = match op {
                            Op::Forget(_) => d.forget_one(l),
                            _ => d.take(l),
                        };
                        prop_assert_eq!(got, want);
                        if let Some(v) = got {
                            model.retain(|_, m| *m != M::Ready { listener: l, value: v });
                            order.retain(|&o| o != v);
                            out += 1;
                        }
                    }
                }
                prop_assert_eq!(d.ready(), order.len());
                prop_assert_eq!(d.used(), model.len());
            }
            // Drain: every value still in comes out once.
            for l in 1..4 {
                while d.forget_one(l).is_some() {
                    out += 1;
                }
            }
            for (t, _) in tickets {
                if d.settle(t, next_value).is_err() {
                    out += 1;
                }
                next_value += 1;
            }
            prop_assert_eq!(out, next_value);
        }
    }
}
