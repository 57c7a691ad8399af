// SPDX-License-Identifier: GPL-2.0
//! Channel keys v2, what a module keeps between connections
//! (`docs/CHANNEL-KEYS-V2.md`): the client's grants, the services this
//! host registered, and the appliance's last revocations. Fixed-size,
//! no allocation, no locking: the module holds each under a spinlock.
//!
//! - [`Grants`]: a client's grants by (program, user, server end). A
//!   connect that finds one needs no appliance round trip. A grant leaves
//!   at its own deadline (the module's monotonic clock: `valid_s` from its
//!   arrival), when the policy generation moves past it, when a
//!   revocation names it or this host, or when a newer one takes its
//!   place (the fullest cache drops the one that expires first). Every
//!   grant that leaves has its pair secret wiped.
//! - [`Services`]: the ports a listen of this host registered (an allowed
//!   [`super::NetKind::Listen`]): only an accept on one of them looks for
//!   a ticket before asking the appliance.
//! - [`Revoked`]: a copy of the last [`Revocations`] record, which the
//!   server's ticket check consults.

use core::ops::DerefMut;

use super::ticket::{Revocations, HOST_ID_LEN, MAX_REVOCATIONS_LEN, TICKET_ID_LEN};
use super::{Grant, SHA256_LEN};

/// What a grant is for: the client program and its user, the server end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantKey {
    /// SHA-256 of the client program.
    pub program: [u8; SHA256_LEN],
    /// The connecting process's real user id.
    pub uid: u32,
    /// The server address's family (4 or 6) and bytes, as the module
    /// reports ends.
    pub family: u8,
    pub addr: [u8; 16],
    /// The server port.
    pub port: u16,
}

/// One grant held (opaque: the storage of [`Grants`] is the caller's).
pub struct Entry {
    key: GrantKey,
    grant: Grant,
    /// Monotonic milliseconds after which it is not used.
    until_ms: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.grant.wipe();
    }
}

/// A client's grants, as many as `slots` has places (the caller's
/// storage, e.g. a heap vector of `None`s: a grant is about 600 bytes).
pub struct Grants<S> {
    slots: S,
}

impl<S: DerefMut<Target = [Option<Entry>]>> Grants<S> {
    /// No grant: every slot is emptied.
    pub fn new(mut slots: S) -> Self {
        for s in slots.iter_mut() {
            *s = None;
        }
        Self { slots }
    }

    /// Grants held (expired ones included until they are replaced).
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the grant for `key`, unless it expired by `now_ms` (it is
    /// then dropped). The caller wipes the copy once used.
    pub fn find(&mut self, key: &GrantKey, now_ms: u64) -> Option<Grant> {
        let slot = self
            .slots
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|e| e.key == *key))?;
        match slot {
            Some(e) if now_ms < e.until_ms => Some(e.grant.clone()),
            _ => {
                *slot = None;
                None
            }
        }
    }

    /// Keeps `grant` for `key` from `now_ms` on, for its `valid_s`: in
    /// place of one for the same key, else in a free slot, else in place
    /// of the one that expires first.
    pub fn insert(&mut self, key: GrantKey, grant: Grant, now_ms: u64) {
        let until_ms = now_ms.saturating_add(u64::from(grant.valid_s).saturating_mul(1000));
        let entry = Entry {
            key,
            grant,
            until_ms,
        };
        let at = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|e| e.key == key))
            .or_else(|| self.slots.iter().position(Option::is_none))
            .or_else(|| {
                self.slots
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.as_ref().map_or(0, |e| e.until_ms))
                    .map(|(i, _)| i)
            });
        if let Some(slot) = at.and_then(|i| self.slots.get_mut(i)) {
            *slot = Some(entry);
        }
    }

    /// Drops the grants decided under a generation below `generation`
    /// (the policy moved: they may no longer be what it decides).
    pub fn drop_below(&mut self, generation: u64) -> usize {
        self.retain(|e| e.grant.generation >= generation)
    }

    /// Drops what `r` revokes: grants below its lowest valid generation,
    /// grants whose ticket it names, and all of them when it names this
    /// host (`own`, the client host the tickets name).
    pub fn revoke(&mut self, r: &Revocations<'_>, own: Option<&[u8; HOST_ID_LEN]>) -> usize {
        let host_revoked = own.is_some_and(|h| r.hosts().any(|x| x == h));
        self.retain(|e| {
            !host_revoked
                && e.grant.generation >= r.min_generation
                && !r.tickets().any(|t| t == e.grant.ticket_id)
        })
    }

    /// Drops every grant.
    pub fn clear(&mut self) -> usize {
        self.retain(|_| false)
    }

    fn retain(&mut self, keep: impl Fn(&Entry) -> bool) -> usize {
        let mut dropped = 0;
        for s in self.slots.iter_mut() {
            if s.as_ref().is_some_and(|e| !keep(e)) {
                *s = None;
                dropped += 1;
            }
        }
        dropped
    }
}

/// The ports this host's listens registered, at most `N` (past that, the
/// oldest is forgotten: its accepts ask the appliance as v1's do).
pub struct Services<const N: usize> {
    ports: [u16; N],
    next: usize,
}

impl<const N: usize> Default for Services<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Services<N> {
    /// None registered.
    pub const fn new() -> Self {
        Self {
            ports: [0; N],
            next: 0,
        }
    }

    /// Records `port` (port 0 is never registered).
    pub fn register(&mut self, port: u16) {
        if port == 0 || self.serves(port) {
            return;
        }
        if let Some(p) = self.ports.get_mut(self.next % N.max(1)) {
            *p = port;
        }
        self.next = (self.next + 1) % N.max(1);
    }

    /// Whether `port` was registered.
    pub fn serves(&self, port: u16) -> bool {
        port != 0 && self.ports.contains(&port)
    }
}

/// The last revocations the appliance pushed, as their record, in the
/// caller's storage of [`MAX_REVOCATIONS_LEN`] bytes.
pub struct Revoked<B> {
    buf: B,
    len: usize,
}

impl<B: DerefMut<Target = [u8]>> Revoked<B> {
    /// Nothing revoked yet; `None` when `buf` is shorter than
    /// [`MAX_REVOCATIONS_LEN`].
    pub fn new(buf: B) -> Option<Self> {
        (buf.len() >= MAX_REVOCATIONS_LEN).then_some(Self { buf, len: 0 })
    }

    /// Replaces the record with `r`.
    pub fn set(&mut self, r: &Revocations<'_>) {
        let mut w = super::Writer::new(&mut self.buf);
        r.write(&mut w);
        self.len = r.encoded_len();
    }

    /// The record, if one came.
    pub fn get(&self) -> Option<Revocations<'_>> {
        Revocations::decode(self.buf.get(..self.len)?).ok()
    }

    /// The lowest valid generation (0 before any record).
    pub fn min_generation(&self) -> u64 {
        self.get().map_or(0, |r| r.min_generation)
    }

    /// Whether a ticket of `client_host` with id `ticket_id` is revoked.
    pub fn revoked(
        &self,
        client_host: &[u8; HOST_ID_LEN],
        ticket_id: &[u8; TICKET_ID_LEN],
    ) -> bool {
        self.get()
            .is_some_and(|r| r.revoked(client_host, ticket_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::{GCM_NONCE_LEN, GCM_TAG_LEN, PAIR_SECRET_LEN, PLAIN_LEN};
    use crate::ChannelTls;
    use proptest::prelude::*;

    fn grant(id: u8, generation: u64, valid_s: u32) -> Grant {
        Grant {
            ticket_id: [id; TICKET_ID_LEN],
            pair_secret: [0x5a; PAIR_SECRET_LEN],
            expires_s: 0,
            valid_s,
            generation,
            epoch: 1,
            tls: ChannelTls::Tls13,
            idle_timeout_s: 0,
            gcm_nonce: [0; GCM_NONCE_LEN],
            ciphertext: [0; PLAIN_LEN],
            tag: [0; GCM_TAG_LEN],
        }
    }

    fn slots(n: usize) -> Vec<Option<Entry>> {
        (0..n).map(|_| None).collect()
    }

    fn key(port: u16) -> GrantKey {
        GrantKey {
            program: [1; 32],
            uid: 1000,
            family: 4,
            addr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port,
        }
    }

    #[test]
    fn a_grant_is_found_until_its_deadline_and_only_for_its_key() {
        let mut g = Grants::new(vec![None, None, None, None]);
        g.insert(key(443), grant(1, 5, 10), 1_000);
        assert_eq!(g.find(&key(443), 1_000).unwrap().ticket_id, [1; 16]);
        assert!(g.find(&key(444), 1_000).is_none());
        let other_user = GrantKey { uid: 0, ..key(443) };
        assert!(g.find(&other_user, 1_000).is_none());
        let other_program = GrantKey {
            program: [2; 32],
            ..key(443)
        };
        assert!(g.find(&other_program, 1_000).is_none());
        assert!(g.find(&key(443), 10_999).is_some());
        assert!(g.find(&key(443), 11_000).is_none());
        assert!(g.is_empty(), "an expired grant is dropped when looked up");
    }

    #[test]
    fn generation_and_revocations_drop_grants() {
        let mut g = Grants::new(slots(8));
        g.insert(key(1), grant(1, 5, 60), 0);
        g.insert(key(2), grant(2, 6, 60), 0);
        g.insert(key(3), grant(3, 7, 60), 0);
        assert_eq!(g.drop_below(6), 1);
        assert!(g.find(&key(1), 0).is_none());
        let mut buf = [0u8; 64];
        let n = Revocations::encode(0, &[], &[[3; 16]], &mut buf).unwrap();
        let r = Revocations::decode(&buf[..n]).unwrap();
        assert_eq!(g.revoke(&r, Some(&[9; 16])), 1);
        assert!(g.find(&key(2), 0).is_some() && g.find(&key(3), 0).is_none());
        // This host revoked: everything goes.
        let n = Revocations::encode(0, &[[9; 16]], &[], &mut buf).unwrap();
        let r = Revocations::decode(&buf[..n]).unwrap();
        assert_eq!(g.revoke(&r, Some(&[9; 16])), 1);
        assert!(g.is_empty());
        // A lowest valid generation above them.
        g.insert(key(4), grant(4, 8, 60), 0);
        let n = Revocations::encode(9, &[], &[], &mut buf).unwrap();
        let r = Revocations::decode(&buf[..n]).unwrap();
        assert_eq!(g.revoke(&r, None), 1);
    }

    #[test]
    fn a_full_cache_drops_the_grant_that_expires_first() {
        let mut g = Grants::new(slots(2));
        g.insert(key(1), grant(1, 1, 100), 0);
        g.insert(key(2), grant(2, 1, 50), 0);
        g.insert(key(3), grant(3, 1, 100), 0);
        assert!(g.find(&key(2), 0).is_none());
        assert!(g.find(&key(1), 0).is_some() && g.find(&key(3), 0).is_some());
        // The same key replaces its own grant.
        g.insert(key(1), grant(9, 1, 100), 0);
        assert_eq!(g.find(&key(1), 0).unwrap().ticket_id, [9; 16]);
        assert_eq!(g.len(), 2);
    }

    #[test]
    fn services_and_revoked() {
        let mut s = Services::<2>::new();
        assert!(!s.serves(0) && !s.serves(80));
        s.register(80);
        s.register(0);
        s.register(80);
        s.register(443);
        assert!(s.serves(80) && s.serves(443));
        s.register(8080);
        assert!(!s.serves(80) && s.serves(443) && s.serves(8080));

        assert!(Revoked::new(vec![0u8; 10]).is_none());
        let mut r = Revoked::new(vec![0u8; MAX_REVOCATIONS_LEN]).unwrap();
        assert_eq!(r.min_generation(), 0);
        assert!(!r.revoked(&[1; 16], &[2; 16]));
        let mut buf = [0u8; 128];
        let n = Revocations::encode(7, &[[1; 16]], &[[2; 16], [3; 16]], &mut buf).unwrap();
        r.set(&Revocations::decode(&buf[..n]).unwrap());
        assert_eq!(r.min_generation(), 7);
        assert!(r.revoked(&[1; 16], &[0; 16]));
        assert!(r.revoked(&[0; 16], &[3; 16]));
        assert!(!r.revoked(&[0; 16], &[4; 16]));
        let n = Revocations::encode(8, &[], &[], &mut buf).unwrap();
        r.set(&Revocations::decode(&buf[..n]).unwrap());
        assert!(!r.revoked(&[1; 16], &[3; 16]));
        assert_eq!(r.min_generation(), 8);
    }

    proptest! {
        /// Against a model: a found grant is the last one inserted for its
        /// key, unexpired, and the cache never holds more than N.
        #[test]
        fn grants_model(ops in proptest::collection::vec((0u8..6, 0u16..5, 0u64..200, 1u32..3), 1..200)) {
            let mut g = Grants::new(slots(3));
            let mut model: std::collections::HashMap<u16, (u8, u64)> = Default::default();
            for (i, (op, port, now, valid)) in ops.into_iter().enumerate() {
                let now = now * 1000;
                match op {
                    0..=2 => {
                        let id = i as u8;
                        g.insert(key(port), grant(id, 1, valid), now);
                        model.insert(port, (id, now + u64::from(valid) * 1000));
                    }
                    _ => {
                        if let Some(found) = g.find(&key(port), now) {
                            let (id, until) = model.get(&port).copied().expect("found a grant never inserted");
                            prop_assert_eq!(found.ticket_id, [id; 16]);
                            prop_assert!(now < until);
                        }
                    }
                }
                prop_assert!(g.len() <= 3);
            }
        }
    }
}
