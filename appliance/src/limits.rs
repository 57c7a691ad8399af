//! License limits (issue 3 item 8, from seed 000): a license is a host, or
//! a program pair (client program SHA-256 -> server program SHA-256), with
//! optional limits on total calls, a validity window and calls per minute.
//!
//! [`Limits::check`] is called once per qualified call of a licensed
//! subject (a subject without a license is not limited). Exceeding a limit
//! revokes: the license is marked exceeded (audited as `limit.exceeded`);
//! a host license also revokes the host (`Store::revoke_host`, audited as
//! `host.revoke`), a pair license denies the pair from then on. Calling
//! before `not_before_ms` is refused without revoking.
//!
//! Counters live in memory. The total-call count is persisted by reserving
//! calls ahead in the store (1 % of `max_calls`, at least 1, at most 1000),
//! so a restart never grants more than `max_calls` in all; a crash can at
//! most forfeit one unused reservation. The per-minute window restarts
//! empty after a restart.
//!
//! Clock jumps (issue 16 item 6): the appliance may start with a wrong
//! clock and have NTP step it, or an operator may set it. A call's time is
//! a [`LicenseTime`]: the wall clock, and a steady clock that is the wall
//! clock at start advanced by the monotonic clock. The per-minute window is
//! measured on the steady clock, so a backward jump does not pile calls
//! into one minute; an expiry by the wall clock revokes only if the steady
//! clock agrees (within [`CLOCK_TOLERANCE_MS`]), otherwise the call is
//! refused ([`LimitExceeded::ClockJump`]) and nothing is revoked, so a
//! forward jump cannot revoke hosts for good. `not_before` refuses without
//! revoking, as before.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::admin::{Change, ChangeHook};
use crate::store::{HostState, LicenseRow, LicenseTerms, Store, StoreError};

pub use crate::store::LicenseKey;

/// Width of the rate window.
const MINUTE_MS: i64 = 60_000;
/// Most calls reserved in the store at once.
const MAX_RESERVATION: u64 = 1000;
/// Actor of the revocations done here.
const ACTOR: &str = "appliance:limits";
/// How far the wall clock may run ahead of the steady clock for an expiry
/// to revoke.
pub const CLOCK_TOLERANCE_MS: i64 = 5 * 60_000;

/// When a call happened, on two clocks (milliseconds since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LicenseTime {
    /// The wall clock (may jump).
    pub wall_ms: i64,
    /// The wall clock at the appliance's start advanced by the monotonic
    /// clock since: never jumps.
    pub steady_ms: i64,
}

impl LicenseTime {
    /// Both clocks at `ms` (a clock that has not jumped; tests, replays).
    pub fn at(ms: i64) -> Self {
        Self {
            wall_ms: ms,
            steady_ms: ms,
        }
    }

    /// Now, on both clocks.
    pub fn now() -> Self {
        use std::sync::OnceLock;
        use std::time::{Instant, SystemTime, UNIX_EPOCH};
        fn wall() -> i64 {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        }
        static START: OnceLock<(Instant, i64)> = OnceLock::new();
        let (mono0, wall0) = *START.get_or_init(|| (Instant::now(), wall()));
        let elapsed = i64::try_from(mono0.elapsed().as_millis()).unwrap_or(i64::MAX);
        Self {
            wall_ms: wall(),
            steady_ms: wall0.saturating_add(elapsed),
        }
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitExceeded {
    /// The license is not valid yet; refused, not revoked.
    #[error("license {id} for {subject} is not valid before {not_before_ms} ms")]
    NotYetValid {
        /// License id.
        id: i64,
        /// Its subject.
        subject: String,
        /// Start of validity.
        not_before_ms: i64,
    },
    /// The license expired; this call revoked it.
    #[error("license {id} for {subject} expired at {not_after_ms} ms")]
    Expired {
        /// License id.
        id: i64,
        /// Its subject.
        subject: String,
        /// End of validity.
        not_after_ms: i64,
    },
    /// All calls were used; this call revoked it.
    #[error("license {id} for {subject} allows {max_calls} calls in all; all were used")]
    MaxCalls {
        /// License id.
        id: i64,
        /// Its subject.
        subject: String,
        /// The limit.
        max_calls: u64,
    },
    /// Too many calls within a minute; this call revoked it.
    #[error("license {id} for {subject} allows {max_per_minute} calls per minute; exceeded")]
    Rate {
        /// License id.
        id: i64,
        /// Its subject.
        subject: String,
        /// The limit.
        max_per_minute: u32,
    },
    /// The license was exceeded earlier.
    #[error("license {id} for {subject} was revoked: {reason}")]
    Revoked {
        /// License id.
        id: i64,
        /// Its subject.
        subject: String,
        /// The excess that revoked it.
        reason: String,
    },
    /// The wall clock says the license expired but the steady clock does
    /// not (the wall clock jumped ahead): refused, not revoked.
    #[error("license {id} for {subject} expires at {not_after_ms} ms; the wall clock is past it but ran {ahead_ms} ms ahead of the monotonic clock, so the call is refused and the license not revoked")]
    ClockJump {
        /// License id.
        id: i64,
        /// Its subject.
        subject: String,
        /// End of validity.
        not_after_ms: i64,
        /// How far the wall clock is ahead of the steady clock.
        ahead_ms: i64,
    },
    /// The call count could not be persisted; refused (fail closed).
    #[error("license {id} for {subject}: call count not persisted: {why}")]
    Unavailable {
        /// License id.
        id: i64,
        /// Its subject.
        subject: String,
        /// The store error.
        why: String,
    },
}

/// Judges one more call under `t` (license `id`, subject `name`) with
/// `calls` counted and `recent` the steady times of the last minute's
/// calls (pruned here): `Err` refuses without revoking (not yet valid, a
/// clock jump), `Ok(Some)` is an excess that revokes, `Ok(None)` allows.
fn judge(
    t: &LicenseTerms,
    id: i64,
    name: &str,
    calls: u64,
    recent: &mut VecDeque<i64>,
    at: LicenseTime,
) -> Result<Option<LimitExceeded>, LimitExceeded> {
    let (now_ms, steady_ms) = (at.wall_ms, at.steady_ms);
    let name = name.to_owned();
    if let Some(nb) = t.not_before_ms.filter(|nb| now_ms < *nb) {
        return Err(LimitExceeded::NotYetValid {
            id,
            subject: name,
            not_before_ms: nb,
        });
    }
    while recent
        .front()
        .is_some_and(|f| *f <= steady_ms.saturating_sub(MINUTE_MS))
    {
        recent.pop_front();
    }
    if let Some(na) = t.not_after_ms.filter(|na| now_ms >= *na) {
        if steady_ms.saturating_add(CLOCK_TOLERANCE_MS) < na {
            return Err(LimitExceeded::ClockJump {
                id,
                subject: name,
                not_after_ms: na,
                ahead_ms: now_ms.saturating_sub(steady_ms),
            });
        }
    }
    Ok(
        if let Some(na) = t.not_after_ms.filter(|na| now_ms >= *na) {
            Some(LimitExceeded::Expired {
                id,
                subject: name,
                not_after_ms: na,
            })
        } else if let Some(m) = t.max_calls.filter(|m| calls >= *m) {
            Some(LimitExceeded::MaxCalls {
                id,
                subject: name,
                max_calls: m,
            })
        } else {
            t.max_per_minute
                .filter(|m| recent.len() >= usize::try_from(*m).unwrap_or(usize::MAX))
                .map(|m| LimitExceeded::Rate {
                    id,
                    subject: name,
                    max_per_minute: m,
                })
        },
    )
}

/// A license with its live call count, as listed by the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LicenseView {
    /// The stored license.
    #[serde(flatten)]
    pub license: LicenseRow,
    /// Calls counted so far (since the last reset).
    pub calls: u64,
    /// Calls within the last minute, as of the last call.
    pub calls_last_minute: u64,
}

#[derive(Debug)]
struct Entry {
    row: LicenseRow,
    calls: u64,
    reserved: u64,
    recent: VecDeque<i64>,
}

impl Entry {
    fn new(row: LicenseRow) -> Self {
        Self {
            calls: row.calls_reserved,
            reserved: row.calls_reserved,
            recent: VecDeque::new(),
            row,
        }
    }

    fn view(&self) -> LicenseView {
        LicenseView {
            license: self.row.clone(),
            calls: self.calls,
            calls_last_minute: u64::try_from(self.recent.len()).unwrap_or(u64::MAX),
        }
    }
}

/// One holder's share of a license (channel keys v2: a client host's
/// share of a pair license), in memory.
#[derive(Debug, Default)]
struct Share {
    calls: u64,
    recent: VecDeque<i64>,
    exceeded: Option<String>,
}

/// The in-memory license table in front of the store.
pub struct Limits {
    store: Arc<Store>,
    on_change: Option<ChangeHook>,
    entries: Mutex<HashMap<String, Entry>>,
    /// (subject id, holder) -> that holder's share.
    shares: Mutex<HashMap<(String, String), Share>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").finish_non_exhaustive()
    }
}

impl Limits {
    /// Loads every license from `store`. A host whose license is exceeded
    /// but which is not revoked (a crash between the two writes) is revoked now.
    pub fn new(store: Arc<Store>) -> Result<Self, StoreError> {
        let mut entries = HashMap::new();
        for row in store.licenses()? {
            if let (Some(_), LicenseKey::Host { host }) = (&row.exceeded, &row.subject) {
                if matches!(store.host(host)?, Some((s, _)) if s != HostState::Revoked) {
                    store.revoke_host(host, ACTOR)?;
                }
            }
            entries.insert(row.subject.subject_id(), Entry::new(row));
        }
        Ok(Self {
            store,
            on_change: None,
            entries: Mutex::new(entries),
            shares: Mutex::new(HashMap::new()),
        })
    }

    /// Calls `hook` with `HostRevoked` or `Limits` when a limit revokes.
    pub fn with_hook(mut self, hook: ChangeHook) -> Self {
        self.on_change = Some(hook);
        self
    }

    fn lock(&self) -> Result<MutexGuard<'_, HashMap<String, Entry>>, StoreError> {
        self.entries.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Counts one call of `subject` at `now_ms`, or refuses it. Unlicensed
    /// subjects are always allowed. May write to the store (a reservation
    /// every 1 % of `max_calls`, or a revocation), so call it where a short
    /// blocking write is acceptable.
    pub fn check(&self, subject: &LicenseKey, now_ms: i64) -> Result<(), LimitExceeded> {
        self.check_at(subject, LicenseTime::at(now_ms))
    }

    /// Whether any license is set: without one a check neither writes to
    /// the store nor refuses anything.
    pub fn any(&self) -> bool {
        self.lock().map_or(true, |m| !m.is_empty())
    }

    /// [`Limits::check`] at `at`: the window and calls per minute on
    /// `at.steady_ms`, validity on `at.wall_ms`, an expiry revoking only when
    /// both clocks agree (see the module documentation).
    pub fn check_at(&self, subject: &LicenseKey, at: LicenseTime) -> Result<(), LimitExceeded> {
        let steady_ms = at.steady_ms;
        let sid = subject.subject_id();
        let mut map = match self.lock() {
            Ok(m) => m,
            Err(e) => {
                return Err(LimitExceeded::Unavailable {
                    id: 0,
                    subject: subject.to_string(),
                    why: e.to_string(),
                });
            }
        };
        let Some(e) = map.get_mut(&sid) else {
            return Ok(());
        };
        let id = e.row.id;
        let name = subject.to_string();
        if let Some(reason) = &e.row.exceeded {
            return Err(LimitExceeded::Revoked {
                id,
                subject: name,
                reason: reason.clone(),
            });
        }
        let t = e.row.terms;
        if let Some(x) = judge(&t, id, &name, e.calls, &mut e.recent, at)? {
            let reason = x.to_string();
            e.row.exceeded = Some(reason.clone());
            drop(map);
            self.revoke(id, subject, &reason);
            return Err(x);
        }
        let calls = e.calls.saturating_add(1);
        if calls > e.reserved {
            let chunk = t
                .max_calls
                .map_or(MAX_RESERVATION, |m| (m / 100).clamp(1, MAX_RESERVATION));
            let mut upto = calls.saturating_add(chunk).saturating_sub(1);
            if let Some(m) = t.max_calls {
                upto = upto.min(m).max(calls);
            }
            if let Err(err) = self.store.reserve_license_calls(id, upto) {
                return Err(LimitExceeded::Unavailable {
                    id,
                    subject: name,
                    why: err.to_string(),
                });
            }
            e.reserved = upto;
        }
        e.calls = calls;
        if t.max_per_minute.is_some() {
            e.recent.push_back(steady_ms);
        }
        Ok(())
    }

    /// Counts one call of `subject` by `holder` against `holder`'s own
    /// share, or refuses it (channel keys v2 grants, T-70): the license's
    /// terms apply to each holder's calls apart, so a holder that exhausts
    /// its share is refused from then on while the license, and every
    /// other holder's share, stay good. A license exceeded as a whole
    /// refuses every holder. Shares live in memory (a restart starts them
    /// anew, as the per-minute window) and are reset with the license.
    pub fn check_share_at(
        &self,
        subject: &LicenseKey,
        holder: &str,
        at: LicenseTime,
    ) -> Result<(), LimitExceeded> {
        let sid = subject.subject_id();
        let unavailable = |why: String| LimitExceeded::Unavailable {
            id: 0,
            subject: subject.to_string(),
            why,
        };
        let (id, terms) = {
            let map = self.lock().map_err(|e| unavailable(e.to_string()))?;
            let Some(e) = map.get(&sid) else {
                return Ok(());
            };
            if let Some(reason) = &e.row.exceeded {
                return Err(LimitExceeded::Revoked {
                    id: e.row.id,
                    subject: subject.to_string(),
                    reason: reason.clone(),
                });
            }
            (e.row.id, e.row.terms)
        };
        let name = format!("{subject}, client host `{holder}`'s share");
        let mut shares = self
            .shares
            .lock()
            .map_err(|_| unavailable(StoreError::Poisoned.to_string()))?;
        let sh = shares.entry((sid, holder.to_owned())).or_default();
        if let Some(reason) = &sh.exceeded {
            return Err(LimitExceeded::Revoked {
                id,
                subject: name,
                reason: reason.clone(),
            });
        }
        if let Some(x) = judge(&terms, id, &name, sh.calls, &mut sh.recent, at)? {
            sh.exceeded = Some(x.to_string());
            crate::metrics::metrics().record_limit_exceeded();
            return Err(x);
        }
        sh.calls = sh.calls.saturating_add(1);
        if terms.max_per_minute.is_some() {
            sh.recent.push_back(at.steady_ms);
        }
        Ok(())
    }

    fn forget_shares(&self, sid: &str) {
        if let Ok(mut m) = self.shares.lock() {
            m.retain(|(s, _), _| s != sid);
        }
    }

    /// Persists an excess and revokes. Failures leave the in-memory mark,
    /// so the subject stays refused until restart.
    fn revoke(&self, id: i64, subject: &LicenseKey, reason: &str) {
        crate::metrics::metrics().record_limit_exceeded();
        let _ = self.store.license_exceeded(id, reason);
        let change = match subject {
            LicenseKey::Host { host } => {
                // A license may name a host that is not (yet) registered.
                let _ = self.store.revoke_host(host, ACTOR);
                Change::HostRevoked { host: host.clone() }
            }
            LicenseKey::Pair { .. } => Change::Limits,
        };
        if let Some(h) = &self.on_change {
            h(&change);
        }
    }

    /// Creates or changes the license of `subject` (see [`Store::put_license`]).
    pub fn set(
        &self,
        subject: &LicenseKey,
        terms: &LicenseTerms,
        reset: bool,
        actor: &str,
    ) -> Result<LicenseView, StoreError> {
        let mut map = self.lock()?;
        let row = self.store.put_license(subject, terms, reset, actor)?;
        let sid = subject.subject_id();
        if reset {
            self.forget_shares(&sid);
        }
        let view = match map.get_mut(&sid) {
            Some(e) if !reset => {
                e.row = row;
                // Keep an excess found in memory but not yet persisted.
                e.view()
            }
            _ => {
                let e = Entry::new(row);
                let v = e.view();
                map.insert(sid, e);
                v
            }
        };
        Ok(view)
    }

    /// Removes license `id`; its subject is unlimited from then on.
    pub fn remove(&self, id: i64, actor: &str) -> Result<LicenseView, StoreError> {
        let mut map = self.lock()?;
        let row = self.store.remove_license(id, actor)?;
        self.forget_shares(&row.subject.subject_id());
        let view = map
            .remove(&row.subject.subject_id())
            .map_or_else(|| Entry::new(row).view(), |e| e.view());
        Ok(view)
    }

    /// Every license with its live counters, by id.
    pub fn list(&self) -> Result<Vec<LicenseView>, StoreError> {
        let map = self.lock()?;
        let mut v: Vec<LicenseView> = map.values().map(Entry::view).collect();
        v.sort_by_key(|l| l.license.id);
        Ok(v)
    }

    /// One license by id.
    pub fn get(&self, id: i64) -> Result<Option<LicenseView>, StoreError> {
        let map = self.lock()?;
        Ok(map.values().find(|e| e.row.id == id).map(Entry::view))
    }
}
