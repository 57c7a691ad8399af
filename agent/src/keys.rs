//! Channel keys pushed by the appliance, waiting for the net request they
//! answer.
//!
//! The appliance pushes a channel's key (`ChannelKey`) or its refusal
//! (`ChannelDenied`) on the Subscribe stream, keyed by channel id; the
//! `Qualify` reply that names the channel id may come before or after it.
//! [`Keys`] holds what arrived, by channel id, for a few seconds
//! ([`KEY_TTL`]); [`Keys::wait`] takes it for the request that names the
//! channel. Key bytes are converted to the module's record at once (the
//! protobuf copies zeroized), wiped when dropped unclaimed or expired, and
//! never logged.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use trustbind_api::pb;
use trustbind_proto::ChannelKey;
use zeroize::Zeroize;

/// How long a pushed key or refusal waits for its request.
pub const KEY_TTL: Duration = Duration::from_secs(10);
/// Most channels held at once (older ones are dropped first).
pub const MAX_HELD: usize = 4096;

/// A key for the module, wiped on drop.
pub struct Held(ChannelKey, Vec<u8>);

impl Held {
    /// The key, to hand to the module (which wipes what it is given).
    pub fn key_mut(&mut self) -> &mut ChannelKey {
        &mut self.0
    }

    /// The key as the appliance sealed it for the module (empty when the
    /// module has no session): written as it is, instead of the key.
    pub fn sealed(&self) -> &[u8] {
        &self.1
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.wipe();
        self.1.zeroize();
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What the appliance said about a channel.
#[derive(Debug)]
pub enum Pushed {
    /// Its key, from this host's point of view.
    Key(Held),
    /// It was refused (pair denied, no partner in time, bad key message).
    Denied(String),
}

/// Converts a pushed key into the module's record and zeroizes the
/// message's key bytes, whatever the outcome.
pub fn from_push(k: &mut pb::ChannelKey) -> Result<Held, String> {
    let sealed = std::mem::take(&mut k.module_answer);
    let out = trustbind_api::module::channel_key_of(k).map(|key| Held(key, sealed));
    k.key.zeroize();
    k.tx_salt.zeroize();
    k.tx_iv.zeroize();
    k.rx_salt.zeroize();
    k.rx_iv.zeroize();
    out
}

/// Pushed keys and refusals by channel id, until taken or expired.
#[derive(Debug, Default)]
pub struct Keys {
    held: Mutex<HashMap<u64, (Instant, Pushed)>>,
    arrived: Notify,
}

impl Keys {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (Instant, Pushed)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps what arrived for `channel_id` at `now` and wakes the waiters.
    pub fn put(&self, channel_id: u64, p: Pushed, now: Instant) {
        let mut g = self.lock();
        Self::purge(&mut g, now);
        if g.len() >= MAX_HELD {
            if let Some(oldest) = g.iter().min_by_key(|(_, (t, _))| *t).map(|(id, _)| *id) {
                g.remove(&oldest);
            }
        }
        g.insert(channel_id, (now, p));
        drop(g);
        self.arrived.notify_waiters();
    }

    /// Takes what arrived for `channel_id`, if it did and has not expired
    /// at `now`.
    pub fn take(&self, channel_id: u64, now: Instant) -> Option<Pushed> {
        let mut g = self.lock();
        Self::purge(&mut g, now);
        g.remove(&channel_id).map(|(_, p)| p)
    }

    /// Drops (and wipes) what has waited longer than [`KEY_TTL`] at `now`.
    pub fn expire(&self, now: Instant) {
        Self::purge(&mut self.lock(), now);
    }

    fn purge(g: &mut HashMap<u64, (Instant, Pushed)>, now: Instant) {
        g.retain(|_, (t, _)| now.saturating_duration_since(*t) < KEY_TTL);
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the key or refusal for `channel_id` arrives, at most
    /// until `deadline`.
    pub async fn wait(&self, channel_id: u64, deadline: tokio::time::Instant) -> Option<Pushed> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(p) = self.take(channel_id, Instant::now()) {
                return Some(p);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.take(channel_id, Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(channel_id: u64) -> pb::ChannelKey {
        pb::ChannelKey {
            module_answer: Vec::new(),
            channel_id,
            key_id: "00112233445566778899aabbccddeeff".into(),
            key: vec![0x11; 32],
            tx_iv: vec![0x22; 8],
            tx_salt: vec![0x33; 4],
            rx_iv: vec![0x44; 8],
            rx_salt: vec![0x55; 4],
            role: pb::ChannelRole::Connect as i32,
            tls12: true,
            idle_timeout_s: 30,
        }
    }

    #[test]
    fn a_push_becomes_the_module_record_and_its_bytes_are_zeroized() {
        let mut p = push(7);
        let mut h = from_push(&mut p).unwrap();
        let k = h.key_mut();
        assert_eq!(k.channel_id, 7);
        assert_eq!(
            k.key_id,
            [
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        assert_eq!(
            (k.key, k.tx_iv, k.tx_salt, k.rx_iv, k.rx_salt),
            ([0x11; 32], [0x22; 8], [0x33; 4], [0x44; 8], [0x55; 4])
        );
        assert!(p.key.iter().all(|b| *b == 0) || p.key.is_empty());
        assert!(p.tx_iv.is_empty() && p.rx_salt.is_empty());
        // Debug never shows key bytes.
        let shown = format!("{h:?}");
        assert!(!shown.contains("17, 17"), "{shown}");
    }

    #[test]
    fn malformed_pushes_are_refused_and_still_zeroized() {
        let mut p = push(1);
        p.key.truncate(31);
        assert!(from_push(&mut p).unwrap_err().contains("key: 31 bytes"));
        assert!(p.key.is_empty());
        let mut p = push(1);
        p.key_id = "xyz".into();
        assert!(from_push(&mut p).unwrap_err().contains("key_id"));
        let mut p = push(1);
        p.key_id = "zz112233445566778899aabbccddeeff".into();
        assert!(from_push(&mut p).unwrap_err().contains("not hex"));
    }

    #[test]
    fn held_keys_are_taken_once_and_expire() {
        let keys = Keys::new();
        let t0 = Instant::now();
        keys.put(1, Pushed::Denied("no".into()), t0);
        keys.put(2, Pushed::Key(from_push(&mut push(2)).unwrap()), t0);
        assert_eq!(keys.len(), 2);
        assert!(matches!(keys.take(1, t0), Some(Pushed::Denied(r)) if r == "no"));
        assert!(keys.take(1, t0).is_none());
        assert!(keys.take(2, t0 + KEY_TTL).is_none(), "expired");
        assert!(keys.is_empty());
        keys.put(3, Pushed::Denied("x".into()), t0);
        keys.expire(t0 + KEY_TTL - Duration::from_millis(1));
        assert_eq!(keys.len(), 1);
        keys.expire(t0 + KEY_TTL);
        assert!(keys.is_empty());
    }

    #[test]
    fn held_keys_are_bounded() {
        let keys = Keys::new();
        let t0 = Instant::now();
        for i in 0..=MAX_HELD as u64 {
            keys.put(
                i,
                Pushed::Denied(String::new()),
                t0 + Duration::from_nanos(i),
            );
        }
        assert_eq!(keys.len(), MAX_HELD);
        assert!(
            keys.take(0, t0 + Duration::from_secs(1)).is_none(),
            "oldest dropped"
        );
    }

    #[tokio::test]
    async fn a_key_before_the_wait_and_a_key_during_it_are_both_found() {
        let keys = std::sync::Arc::new(Keys::new());
        keys.put(5, Pushed::Denied("early".into()), Instant::now());
        let soon = tokio::time::Instant::now() + Duration::from_secs(5);
        assert!(matches!(keys.wait(5, soon).await, Some(Pushed::Denied(r)) if r == "early"));
        let k2 = std::sync::Arc::clone(&keys);
        let waiter = tokio::spawn(async move {
            k2.wait(6, tokio::time::Instant::now() + Duration::from_secs(5))
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        keys.put(
            6,
            Pushed::Key(from_push(&mut push(6)).unwrap()),
            Instant::now(),
        );
        let got = waiter.await.unwrap();
        let Some(Pushed::Key(mut h)) = got else {
            panic!("no key")
        };
        assert_eq!(h.key_mut().channel_id, 6);
    }

    #[tokio::test]
    async fn a_wait_gives_up_at_its_deadline() {
        let keys = Keys::new();
        let t = tokio::time::Instant::now();
        let got = keys.wait(9, t + Duration::from_millis(50)).await;
        assert!(got.is_none());
        assert!(t.elapsed() >= Duration::from_millis(50));
    }
}
