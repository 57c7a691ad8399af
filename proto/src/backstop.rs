// SPDX-License-Identifier: GPL-2.0
//! The netfilter backstop's decisions: what happens to one TCP segment a
//! local socket sends (`LOCAL_OUT`) or one SYN that arrives (`LOCAL_IN`).
//!
//! The hooks in `kmod/sys/helpers.c` parse the packet and answer the
//! lookups ([`Facts`]: is this end a protected service, which socket sends
//! it, is the source a protected host); what to do with it is decided
//! here, once, for both kernel and tests. The lookups are made lazily, in
//! the order below, so a segment that touches no protected service costs
//! one lookup (two with payload) and never a socket lookup.
//!
//! Outgoing, with the backstop on:
//! - a segment without SYN or payload (a bare ACK, FIN, RST) passes;
//! - one that neither goes to a protected service nor (with payload)
//!   comes from one of this host passes;
//! - otherwise its socket decides: a kernel socket (NFS, iSCSI ..., but
//!   not an MPTCP subflow, which carries a user socket's data) passes; a
//!   segment without a full TCP socket (raw socket, request socket) is
//!   refused; a SYN passes from a socket a wrapper qualified (any mark);
//!   payload passes from a socket with kTLS transmit state, a socket
//!   allowed plaintext, or a bound socket being closed (its queue holds
//!   only TLS records, while kTLS's state is already gone).
//!
//! Incoming, with the backstop on: a SYN to a protected service of this
//! host, not over loopback, from an address that is no protected host is
//! refused, once the first list of protected hosts came (before it,
//! nothing inbound is).
//!
//! A refusal drops the packet in [`Mode::Drop`] (enforce) and is only
//! counted in [`Mode::Count`] (permissive).

/// What the backstop does (`TB_BACKSTOP_*` in `kmod/sys/helpers.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing: disabled mode, or connections are not qualified.
    Off,
    /// Count what it would drop (permissive mode).
    Count,
    /// Drop (enforce mode).
    Drop,
}

/// How a qualified socket was marked by its wrapper (`TB_MARK_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// Its verdict allows plaintext.
    Plain,
    /// Its verdict requires a channel; no key yet.
    Channel,
    /// Its channel key is installed.
    Bound,
}

/// The socket that sends an outgoing segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// No full TCP stream socket: a raw socket, a request socket.
    Unqualifiable,
    /// A kernel socket that is not an MPTCP subflow.
    Kernel,
    /// A user TCP socket (or an MPTCP subflow).
    Tcp {
        /// Its wrapper's mark, if any.
        mark: Option<Mark>,
        /// Its program closed it (`tcp_close()` began).
        closing: bool,
        /// It carries kTLS transmit state.
        tls_tx: bool,
    },
}

/// Which end of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The source address and port.
    Src,
    /// The destination address and port.
    Dst,
}

/// The lookups a decision may need, answered by the hook.
pub trait Facts {
    /// Whether that end of the segment is a protected service.
    fn protected(&self, end: End) -> bool;
    /// The sending socket (outgoing only).
    fn sender(&self) -> Sender;
    /// Whether the source address is a protected host; `None` while no
    /// list of protected hosts came (incoming only).
    fn source_is_peer(&self) -> Option<bool>;
}

/// What happens to the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It goes on.
    Pass,
    /// Refused, but only counted (permissive mode); it goes on.
    WouldDrop,
    /// Dropped.
    Drop,
}

impl Outcome {
    fn refused(mode: Mode) -> Outcome {
        match mode {
            Mode::Drop => Outcome::Drop,
            _ => Outcome::WouldDrop,
        }
    }
}

/// An outgoing segment (`syn`: SYN without ACK; `payload`: carries data).
pub fn outgoing(mode: Mode, syn: bool, payload: bool, f: &impl Facts) -> Outcome {
    if mode == Mode::Off || (!syn && !payload) {
        return Outcome::Pass;
    }
    if !(f.protected(End::Dst) || (payload && f.protected(End::Src))) {
        return Outcome::Pass;
    }
    let ok = match f.sender() {
        Sender::Kernel => true,
        Sender::Unqualifiable => false,
        Sender::Tcp { mark, .. } if syn => mark.is_some(),
        Sender::Tcp {
            mark,
            closing,
            tls_tx,
        } => tls_tx || mark == Some(Mark::Plain) || (mark == Some(Mark::Bound) && closing),
    };
    if ok {
        Outcome::Pass
    } else {
        Outcome::refused(mode)
    }
}

/// An incoming segment (`syn`: SYN without ACK; `loopback`: it came in
/// over a loopback device).
pub fn incoming(mode: Mode, syn: bool, loopback: bool, f: &impl Facts) -> Outcome {
    if mode == Mode::Off || !syn || loopback || !f.protected(End::Dst) {
        return Outcome::Pass;
    }
    match f.source_is_peer() {
        None | Some(true) => Outcome::Pass,
        Some(false) => Outcome::refused(mode),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;
    use proptest::prelude::*;

    /// Facts from fixed answers, counting the lookups made.
    struct Fixed {
        dst: bool,
        src: bool,
        sender: Sender,
        peer: Option<bool>,
        sender_asked: Cell<bool>,
    }

    impl Facts for Fixed {
        fn protected(&self, end: End) -> bool {
            match end {
                End::Dst => self.dst,
                End::Src => self.src,
            }
        }
        fn sender(&self) -> Sender {
            self.sender_asked.set(true);
            self.sender
        }
        fn source_is_peer(&self) -> Option<bool> {
            self.peer
        }
    }

    fn mode() -> impl Strategy<Value = Mode> {
        prop_oneof![Just(Mode::Off), Just(Mode::Count), Just(Mode::Drop)]
    }

    fn sender() -> impl Strategy<Value = Sender> {
        let mark = prop_oneof![
            Just(None),
            Just(Some(Mark::Plain)),
            Just(Some(Mark::Channel)),
            Just(Some(Mark::Bound))
        ];
        prop_oneof![
            Just(Sender::Unqualifiable),
            Just(Sender::Kernel),
            (mark, any::<bool>(), any::<bool>()).prop_map(|(mark, closing, tls_tx)| Sender::Tcp {
                mark,
                closing,
                tls_tx
            }),
        ]
    }

    fn fixed(dst: bool, src: bool, sender: Sender, peer: Option<bool>) -> Fixed {
        Fixed {
            dst,
            src,
            sender,
            peer,
            sender_asked: Cell::new(false),
        }
    }

    proptest! {
        /// The promises the backstop makes, against every combination.
        #[test]
        fn outgoing_promises(m in mode(), syn: bool, payload: bool, dst: bool, src: bool,
                             s in sender()) {
            let f = fixed(dst, src, s, None);
            let o = outgoing(m, syn, payload, &f);
            let touches = (syn || payload) && (dst || (payload && src));
            // Off passes everything; permissive never drops.
            if m == Mode::Off { prop_assert_eq!(o, Outcome::Pass); }
            if m == Mode::Count { prop_assert_ne!(o, Outcome::Drop); }
            // Refusals are drops exactly in enforce mode.
            if o != Outcome::Pass {
                prop_assert_eq!(o, if m == Mode::Drop { Outcome::Drop } else { Outcome::WouldDrop });
            }
            // Nothing that touches no protected service is refused, and
            // its socket is never looked up.
            if !touches {
                prop_assert_eq!(o, Outcome::Pass);
                prop_assert!(!f.sender_asked.get());
            }
            if touches && m != Mode::Off {
                let refused = o != Outcome::Pass;
                match s {
                    // Raw and request sockets never get through.
                    Sender::Unqualifiable => prop_assert!(refused),
                    // The kernel's own sockets always do.
                    Sender::Kernel => prop_assert!(!refused),
                    Sender::Tcp { mark, closing, tls_tx } => {
                        if syn {
                            // A SYN only from a socket a wrapper qualified.
                            prop_assert_eq!(refused, mark.is_none());
                        } else {
                            // Plaintext only from a socket allowed it; TLS
                            // records from a keyed or closing bound one.
                            let allowed = tls_tx || mark == Some(Mark::Plain)
                                || (mark == Some(Mark::Bound) && closing);
                            prop_assert_eq!(refused, !allowed);
                        }
                    }
                }
            }
        }

        #[test]
        fn incoming_promises(m in mode(), syn: bool, loopback: bool, dst: bool,
                             peer in prop_oneof![Just(None), Just(Some(true)), Just(Some(false))]) {
            let f = fixed(dst, false, Sender::Kernel, peer);
            let o = incoming(m, syn, loopback, &f);
            let refused = m != Mode::Off && syn && !loopback && dst && peer == Some(false);
            prop_assert_eq!(o, if !refused {
                Outcome::Pass
            } else if m == Mode::Drop {
                Outcome::Drop
            } else {
                Outcome::WouldDrop
            });
        }
    }

    #[test]
    fn plaintext_from_an_unmarked_socket_to_a_protected_service_is_dropped() {
        let s = Sender::Tcp {
            mark: None,
            closing: false,
            tls_tx: false,
        };
        assert_eq!(
            outgoing(Mode::Drop, false, true, &fixed(true, false, s, None)),
            Outcome::Drop
        );
        // From a protected service of this host, too.
        assert_eq!(
            outgoing(Mode::Drop, false, true, &fixed(false, true, s, None)),
            Outcome::Drop
        );
        // A bare ACK is not payload.
        assert_eq!(
            outgoing(Mode::Drop, false, false, &fixed(true, true, s, None)),
            Outcome::Pass
        );
    }
}
