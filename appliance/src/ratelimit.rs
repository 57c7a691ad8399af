//! Bounded, keyed rate limits for what the network can ask of the
//! appliance (issue 16 item 3): enrolment refusals per address, reports
//! and offline-bundle signatures per host, handshakes in flight per
//! address.
//!
//! [`KeyedLimiter`] is a token bucket per key in a table of at most
//! `capacity` keys. A bucket that has refilled to its burst is the same as
//! no bucket, so when the table is full such idle keys are dropped without
//! losing anything; if every key is busy, new keys share one overflow
//! bucket (fail closed: an attacker spraying keys exhausts the overflow,
//! not the appliance's memory, and is refused). The previous limiter
//! stopped counting new addresses once it held 4,096 (T-65).
//!
//! Why not `governor`: its keyed limiter keeps every key until
//! `retain_recent` is called and has no bound on the number of keys nor an
//! overflow policy, which is the property needed against address
//! spraying; licences (`limits.rs`) count calls and revoke, which GCRA
//! does not model either.
//!
//! Addresses are keyed by [`AddrKey`]: an IPv4 address alone (IPv4-mapped
//! IPv6 as IPv4), an IPv6 address by its /64 prefix, since one machine
//! usually holds a whole /64.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A remote address as a rate-limit key: IPv4 /32 or IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrKey {
    /// An IPv4 address.
    V4(u32),
    /// The /64 prefix of an IPv6 address.
    V6(u64),
}

impl AddrKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => Self::V4(u32::from(a)),
            IpAddr::V6(a) => Self::V6((u128::from(a) >> 64) as u64),
        }
    }
}

impl std::fmt::Display for AddrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V4(a) => write!(f, "{}", std::net::Ipv4Addr::from(*a)),
            Self::V6(p) => write!(f, "{}/64", std::net::Ipv6Addr::from(u128::from(*p) << 64)),
        }
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Limits: `burst` tokens at most, refilled at `per_sec` tokens a second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Bucket size.
    pub burst: f64,
    /// Refill per second.
    pub per_sec: f64,
}

impl Rate {
    /// `n` per `window`, all of them at once at most.
    pub fn per(n: u32, window: Duration) -> Self {
        Self {
            burst: f64::from(n),
            per_sec: f64::from(n) / window.as_secs_f64(),
        }
    }
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate.per_sec).min(rate.burst);
        self.at = now;
    }

    /// Takes `cost` tokens, or says how long until they are there.
    fn take(&mut self, rate: Rate, cost: f64, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= cost {
            self.tokens -= cost;
            Ok(())
        } else {
            let missing = (cost - self.tokens).min(rate.burst.max(cost));
            Err(
                Duration::from_secs_f64(missing / rate.per_sec.max(f64::MIN_POSITIVE))
                    .min(Duration::from_secs(86_400)),
            )
        }
    }
}

/// What a refused call is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// When to try again.
    pub retry_after: Duration,
    /// Whether the key shared the overflow bucket (the table was full of
    /// busy keys).
    pub overflow: bool,
}

#[derive(Debug)]
struct Table<K> {
    buckets: HashMap<K, Bucket>,
    overflow: Bucket,
}

/// Token buckets per key, at most `capacity` keys (see the module doc).
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: Rate,
    overflow_rate: Rate,
    capacity: usize,
    table: Mutex<Table<K>>,
}

impl<K: Eq + Hash + Clone> KeyedLimiter<K> {
    /// A limiter of `rate` per key, `capacity` keys, new keys beyond which
    /// share one bucket of `overflow_rate`.
    pub fn new(rate: Rate, capacity: usize, overflow_rate: Rate) -> Self {
        Self {
            rate,
            overflow_rate,
            capacity: capacity.max(1),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                overflow: Bucket::full(overflow_rate, Instant::now()),
            }),
        }
    }

    /// Takes `cost` tokens for `key` at `now`. A poisoned lock refuses.
    pub fn check_at(&self, key: &K, cost: f64, now: Instant) -> Result<(), Limited> {
        let Ok(mut t) = self.table.lock() else {
            return Err(Limited {
                retry_after: Duration::from_secs(1),
                overflow: true,
            });
        };
        if !t.buckets.contains_key(key) && t.buckets.len() >= self.capacity {
            // Refilled buckets are as good as none: forget them.
            let rate = self.rate;
            t.buckets.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < rate.burst
            });
        }
        if let Some(b) = t.buckets.get_mut(key) {
            return b.take(self.rate, cost, now).map_err(|retry_after| Limited {
                retry_after,
                overflow: false,
            });
        }
        if t.buckets.len() >= self.capacity {
            let rate = self.overflow_rate;
            return t
                .overflow
                .take(rate, cost, now)
                .map_err(|retry_after| Limited {
                    retry_after,
                    overflow: true,
                });
        }
        let mut b = Bucket::full(self.rate, now);
        let r = b.take(self.rate, cost, now);
        t.buckets.insert(key.clone(), b);
        r.map_err(|retry_after| Limited {
            retry_after,
            overflow: false,
        })
    }

    /// [`KeyedLimiter::check_at`] now.
    pub fn check(&self, key: &K, cost: f64) -> Result<(), Limited> {
        self.check_at(key, cost, Instant::now())
    }

    /// Whether `key` could take `cost` now, without taking it.
    pub fn would_allow(&self, key: &K, cost: f64) -> bool {
        let now = Instant::now();
        let Ok(t) = self.table.lock() else {
            return false;
        };
        let mut b = match t.buckets.get(key) {
            Some(b) => *b,
            None if t.buckets.len() >= self.capacity => {
                let mut o = t.overflow;
                return o.take(self.overflow_rate, cost, now).is_ok();
            }
            None => Bucket::full(self.rate, now),
        };
        b.take(self.rate, cost, now).is_ok()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.table.lock().map(|t| t.buckets.len()).unwrap_or(0)
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counts things in flight per key (handshakes per address), at most
/// `per_key` for one key; the count is given back when the returned guard
/// drops.
#[derive(Debug)]
pub struct InFlight<K: Eq + Hash> {
    per_key: usize,
    counts: std::sync::Arc<Mutex<HashMap<K, usize>>>,
}

/// One counted thing in flight; dropping it gives the count back.
#[derive(Debug)]
pub struct InFlightGuard<K: Eq + Hash> {
    key: K,
    counts: std::sync::Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash> Drop for InFlightGuard<K> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.counts.lock() {
            if let Some(n) = m.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

impl<K: Eq + Hash + Clone> InFlight<K> {
    /// At most `per_key` at once per key.
    pub fn new(per_key: usize) -> Self {
        Self {
            per_key,
            counts: std::sync::Arc::default(),
        }
    }

    /// One more for `key`, or `None` if it has `per_key` already. (The
    /// table holds only keys with something in flight, so it is bounded by
    /// whatever bounds the total.)
    pub fn try_acquire(&self, key: K) -> Option<InFlightGuard<K>> {
        let mut m = self.counts.lock().ok()?;
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= self.per_key {
            return None;
        }
        *n += 1;
        Some(InFlightGuard {
            key,
            counts: std::sync::Arc::clone(&self.counts),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_of_one_64_share_a_key() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(AddrKey::of(a), AddrKey::of(b));
        assert_ne!(AddrKey::of(a), AddrKey::of(c));
        let m: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(AddrKey::of(m), AddrKey::of("192.0.2.7".parse().unwrap()));
        assert_eq!(AddrKey::of(a).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn a_bucket_refills_at_its_rate() {
        let l = KeyedLimiter::new(
            Rate::per(2, Duration::from_secs(10)),
            10,
            Rate::per(1, Duration::from_secs(10)),
        );
        let t0 = Instant::now();
        l.check_at(&1, 1.0, t0).unwrap();
        l.check_at(&1, 1.0, t0).unwrap();
        let e = l.check_at(&1, 1.0, t0).unwrap_err();
        assert!(!e.overflow && e.retry_after <= Duration::from_secs(5));
        l.check_at(&2, 1.0, t0).unwrap();
        l.check_at(&1, 1.0, t0 + Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn a_full_table_drops_idle_keys_and_sends_busy_newcomers_to_the_overflow() {
        let rate = Rate::per(1, Duration::from_secs(60));
        let l = KeyedLimiter::new(rate, 4, Rate::per(2, Duration::from_secs(60)));
        let t0 = Instant::now();
        for k in 0..4 {
            l.check_at(&k, 1.0, t0).unwrap();
        }
        // Every key is busy: new keys share the overflow's two tokens.
        l.check_at(&10, 1.0, t0).unwrap();
        l.check_at(&11, 1.0, t0).unwrap();
        let e = l.check_at(&12, 1.0, t0).unwrap_err();
        assert!(e.overflow);
        assert_eq!(l.len(), 4);
        // A minute later the old keys are idle and make room.
        let t1 = t0 + Duration::from_secs(61);
        l.check_at(&12, 1.0, t1).unwrap();
        assert!(l.check_at(&12, 1.0, t1).is_err());
        assert!(l.len() <= 4);
    }

    #[test]
    fn in_flight_is_counted_per_key_and_given_back() {
        let f = InFlight::new(2);
        let a = f.try_acquire(1).unwrap();
        let _b = f.try_acquire(1).unwrap();
        assert!(f.try_acquire(1).is_none());
        let _c = f.try_acquire(2).unwrap();
        drop(a);
        assert!(f.try_acquire(1).is_some());
    }
}
