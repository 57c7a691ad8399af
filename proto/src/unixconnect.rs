// SPDX-License-Identifier: GPL-2.0
//! The rounds of one UNIX-domain connect (T-20).
//!
//! The listener a UNIX connect reaches is only known inside the kernel's
//! `unix_stream_connect()`, under both sockets' state locks, where nothing
//! may wait for the agent. So the PEM decides the pair before the
//! connection exists, in rounds:
//!
//! 1. the connect runs with its socket registered; when it reaches a
//!    listener, the security hook ([`Connect::reached`]) lets it through
//!    only if that listener is the one the module approved, and otherwise
//!    holds a reference on it and stops the connect before anything is
//!    queued;
//! 2. with no lock held, the PEM takes the held listener
//!    ([`Connect::after_round`]) and asks about it; an allow makes it the approved one
//!    ([`Connect::approve`]) and the connect runs again; a refusal ends the
//!    connect with nothing ever queued on the listener: no byte and no
//!    `SCM_RIGHTS` reach it.
//!
//! If the name resolves to another listener in a later round (the socket
//! file was replaced meanwhile), that one is asked about in turn, at most
//! [`ROUNDS`] times; then the connect is refused ([`Next::GiveUp`]).
//!
//! `R` is a reference on a listener (in the kernel a socket reference that
//! puts itself when dropped); a listener is compared by its identity (its
//! address, which a held reference keeps from being reused). References
//! are dropped by whoever takes them out of a [`Connect`], and with it
//! when it is dropped, so none leaks: the model test below counts them.

use super::lineage::ProcId;

/// Asks per connect at most: a name that keeps naming new listeners is
/// refused after this many.
pub const ROUNDS: u8 = 4;

/// One UNIX connect between its rounds.
pub struct Connect<R> {
    /// The listener the last round reached and stopped at, to ask about.
    asked: Option<R>,
    /// The listener the module allowed: the one that may be reached.
    approved: Option<R>,
    /// Asks so far.
    asks: u8,
}

/// What the connect does after a round of the kernel's connect.
pub enum Next<R> {
    /// No listener was held: the round's own result stands (connected, or
    /// the kernel's error).
    Done,
    /// Ask about this listener; [`Connect::approve`] it on an allow.
    Ask(R),
    /// [`ROUNDS`] asks were not enough: refuse the connect (the held
    /// listener is handed back to be dropped).
    GiveUp(R),
}

impl<R> Default for Connect<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> Connect<R> {
    /// A connect before its first round.
    pub const fn new() -> Self {
        Connect {
            asked: None,
            approved: None,
            asks: 0,
        }
    }

    /// The security hook: the round reached the listener `other` (its
    /// identity; `id` gives a reference's). `true` lets it through (it is
    /// the approved one); `false` stops the round before anything is
    /// queued. The first listener stopped at in a round is held (`hold`
    /// makes the reference) for [`after_round`](Self::after_round); a
    /// round reaches one listener, so a second is only stopped.
    pub fn reached(
        &mut self,
        other: usize,
        id: impl Fn(&R) -> usize,
        hold: impl FnOnce() -> R,
    ) -> bool {
        if self.approved.as_ref().is_some_and(|a| id(a) == other) {
            return true;
        }
        if self.asked.is_none() {
            self.asked = Some(hold());
        }
        false
    }

    /// After a round of the kernel's connect: what to do next.
    pub fn after_round(&mut self) -> Next<R> {
        let Some(asked) = self.asked.take() else {
            return Next::Done;
        };
        if self.asks >= ROUNDS {
            return Next::GiveUp(asked);
        }
        self.asks += 1;
        Next::Ask(asked)
    }

    /// The ask allowed `listener`: the next round may reach it. The
    /// listener approved before, if any, is handed back to be dropped.
    pub fn approve(&mut self, listener: R) -> Option<R> {
        self.approved.replace(listener)
    }
}

/// Whether a UNIX connection accepted by `acceptor` must be asked about
/// again (T-21).
///
/// A connect is decided against the listener's owner, the process that
/// called `listen()` (its `SO_PEERCRED`, `owner`; `None` once that process
/// is gone). When the owner accepts, the pair was decided at connect and
/// nothing is asked. When another process accepts (socket activation: a
/// service manager listens, the service accepts), or the owner is gone,
/// the acceptor is the server and the pair is asked about again before it
/// reads a byte.
pub fn accept_asks(owner: Option<ProcId>, acceptor: ProcId) -> bool {
    owner != Some(acceptor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A counted reference on listener `.0`.
    struct Ref(usize, Rc<Cell<i64>>);

    impl Ref {
        fn new(l: usize, live: &Rc<Cell<i64>>) -> Ref {
            live.set(live.get() + 1);
            Ref(l, live.clone())
        }
    }

    impl Drop for Ref {
        fn drop(&mut self) {
            self.1.set(self.1.get() - 1);
        }
    }

    /// The outcome of one whole connect.
    #[derive(Debug, PartialEq)]
    enum End {
        /// Connected to this listener.
        Connected(usize),
        /// The ask about this listener refused it.
        Refused(usize),
        /// Too many listeners in a row.
        GaveUp,
        /// The name named no listener in the last round.
        NoListener,
    }

    /// Drives a connect as the kernel module does: round `i` reaches
    /// `names[i]` (the last repeats; `None`: nothing listens); the policy
    /// allows the listeners in `allowed`. Returns the outcome, the
    /// listeners each ask was about, and the rounds run.
    fn drive(
        names: &[Option<usize>],
        allowed: &[usize],
        live: &Rc<Cell<i64>>,
    ) -> (End, Vec<usize>, usize) {
        let mut c: Connect<Ref> = Connect::new();
        let mut asked = Vec::new();
        let mut rounds = 0;
        loop {
            let name = names[rounds.min(names.len() - 1)];
            rounds += 1;
            // The kernel's connect: the security hook sees the listener.
            let connected = name.filter(|&l| c.reached(l, |r| r.0, || Ref::new(l, live)));
            match c.after_round() {
                Next::Done => {
                    let end = match connected {
                        Some(l) => End::Connected(l),
                        None => End::NoListener,
                    };
                    drop(c);
                    return (end, asked, rounds);
                }
                Next::GiveUp(r) => {
                    drop(r);
                    drop(c);
                    return (End::GaveUp, asked, rounds);
                }
                Next::Ask(r) => {
                    asked.push(r.0);
                    if allowed.contains(&r.0) {
                        drop(c.approve(r));
                    } else {
                        let l = r.0;
                        drop(r);
                        drop(c);
                        return (End::Refused(l), asked, rounds);
                    }
                }
            }
        }
    }

    #[test]
    fn only_the_owner_itself_accepts_unasked() {
        let owner = ProcId {
            tgid: 10,
            start_ns: 5,
        };
        assert!(!accept_asks(Some(owner), owner));
        // Another process, or the owner's pid reused by a later one.
        assert!(accept_asks(Some(owner), ProcId { tgid: 11, ..owner }));
        assert!(accept_asks(
            Some(owner),
            ProcId {
                start_ns: 6,
                ..owner
            }
        ));
        // The owner is gone: whoever accepts is asked about.
        assert!(accept_asks(None, owner));
    }

    #[test]
    fn an_allowed_listener_takes_two_rounds() {
        let live = Rc::new(Cell::new(0));
        assert_eq!(
            drive(&[Some(7)], &[7], &live),
            (End::Connected(7), vec![7], 2)
        );
        assert_eq!(live.get(), 0);
    }

    #[test]
    fn a_refused_listener_is_never_connected() {
        let live = Rc::new(Cell::new(0));
        assert_eq!(drive(&[Some(7)], &[], &live), (End::Refused(7), vec![7], 1));
        assert_eq!(live.get(), 0);
    }

    #[test]
    fn a_replaced_listener_is_asked_about_in_turn() {
        let live = Rc::new(Cell::new(0));
        // Allowed 1, then the name resolves to 2, which is refused.
        assert_eq!(
            drive(&[Some(1), Some(2)], &[1], &live),
            (End::Refused(2), vec![1, 2], 2)
        );
        assert_eq!(live.get(), 0);
    }

    #[test]
    fn a_name_that_keeps_changing_is_given_up() {
        let live = Rc::new(Cell::new(0));
        let names: Vec<_> = (1..=10).map(Some).collect();
        let allowed: Vec<_> = (1..=10).collect();
        let (end, asked, _) = drive(&names, &allowed, &live);
        assert_eq!(end, End::GaveUp);
        assert_eq!(asked.len(), usize::from(ROUNDS));
        assert_eq!(live.get(), 0);
    }

    proptest! {
        /// Whatever the name resolves to round by round and whatever the
        /// policy allows: a connect ends connected only to a listener the
        /// policy allowed, having asked about it; every listener reached
        /// was asked about before any connection to it; it runs at most
        /// ROUNDS + 1 rounds; and every reference taken is dropped.
        #[test]
        fn only_approved_listeners_are_connected(
            names in proptest::collection::vec(proptest::option::of(0usize..6), 1..12),
            allowed in proptest::collection::vec(0usize..6, 0..6),
        ) {
            let live = Rc::new(Cell::new(0));
            let (end, asked, rounds) = drive(&names, &allowed, &live);
            prop_assert_eq!(live.get(), 0);
            prop_assert!(rounds <= usize::from(ROUNDS) + 1);
            prop_assert!(asked.len() <= usize::from(ROUNDS));
            match end {
                End::Connected(l) => {
                    prop_assert!(allowed.contains(&l));
                    prop_assert_eq!(asked.last(), Some(&l));
                }
                End::Refused(l) => prop_assert!(!allowed.contains(&l)),
                End::GaveUp => prop_assert_eq!(asked.len(), usize::from(ROUNDS)),
                End::NoListener => {}
            }
        }
    }
}
