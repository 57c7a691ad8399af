//! Learning mode's recorder: which programs hosts run, from the exec
//! decisions the agent API makes, kept off the decision's path.
//!
//! [`Recorder::note`] is called with each decided `Qualify` batch (after
//! its audit rows are durable): it merges the batch's exec decisions into
//! an in-memory map keyed by (host, program SHA-256, path), one lock per
//! batch and no I/O. A task ([`Recorder::spawn`]) writes the map to the
//! store every [`FLUSH_EVERY`] in one transaction
//! (`Store::record_observed`), so a program a host runs a thousand times
//! costs one row update per second, and the decision never waits for it.
//!
//! Which decisions: every exec decision of a host in **permissive** mode
//! (allowed or would-deny), and the **refusals** of a host in **enforce**
//! mode (so an administrator sees what enforcement stops, marked
//! `denied`). Disabled hosts are not evaluated; answers that did not come
//! from the policy engine (a license refusal) are not programs to learn.
//!
//! Bounds: at most [`PENDING_MAX`] distinct keys wait for a flush; a new
//! key past that is dropped and counted (`trustbind_refused_total{reason=
//! "learn_pending"}`); the store caps rows per host and in all
//! (`store::observed`). Observations of the last second are lost if the
//! appliance stops before the flush: the audit log has every decision.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::agent_api::Answer;
use crate::metrics;
use crate::policy::Verdict;
use crate::request::{Action, QualifyRequest};
use crate::store::{Mode, Observation, ObservedWrite, Seen, Store, StoreError};

/// How often the pending observations are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Distinct (host, program, path) waiting for a flush at most.
pub const PENDING_MAX: usize = 8192;

type Key = (String, String, String);

/// One decision to record: the request, the package the agent named for
/// its path, the verdict as learning mode lists it, the host's mode.
pub type Noted<'a> = (&'a QualifyRequest, Option<&'a str>, Seen, Mode);

/// The in-memory side of learning mode (see the module docs).
#[derive(Debug)]
pub struct Recorder {
    store: Arc<Store>,
    pending: Mutex<HashMap<Key, Observation>>,
}

/// Whether a decision is one learning mode records, and as what.
pub fn seen(req: &QualifyRequest, a: &Answer) -> Option<(Seen, Mode)> {
    if req.action != Action::Exec {
        return None;
    }
    let deny = matches!(a.outcome.verdict, Verdict::Deny);
    match a.mode? {
        Mode::Permissive if a.outcome.would_deny || deny => {
            Some((Seen::WouldDeny, Mode::Permissive))
        }
        Mode::Permissive => Some((Seen::Allowed, Mode::Permissive)),
        Mode::Enforce if deny => Some((Seen::Denied, Mode::Enforce)),
        Mode::Enforce | Mode::Disabled => None,
    }
}

impl Recorder {
    /// A recorder writing to `store` (nothing is written until
    /// [`Recorder::flush`] or [`Recorder::spawn`]).
    pub fn new(store: Arc<Store>) -> Arc<Self> {
        Arc::new(Self {
            store,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Starts the task that flushes every [`FLUSH_EVERY`] (within a tokio
    /// runtime); it ends once the recorder is dropped (what was still
    /// pending then is not written: the audit log has those decisions).
    pub fn spawn(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { break };
                if me.is_idle() {
                    continue;
                }
                let r = tokio::task::spawn_blocking(move || me.flush()).await;
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!("learning mode: cannot record observations: {e}"),
                    Err(e) => tracing::warn!("learning mode: flush task failed: {e}"),
                }
            }
        });
    }

    fn is_idle(&self) -> bool {
        self.pending.lock().map(|p| p.is_empty()).unwrap_or(true)
    }

    /// Merges the recorded decisions of one batch of `host`: each
    /// request, the package its agent named for the program's path, and
    /// what [`seen`] made of the answer.
    pub fn note(&self, host: &str, batch: &[Noted<'_>], at_ms: i64) {
        let mut dropped = 0_u64;
        {
            let Ok(mut pending) = self.pending.lock() else {
                return;
            };
            for &(req, package, verdict, mode) in batch {
                let key = (
                    host.to_owned(),
                    req.program.sha256.clone(),
                    req.program.path.clone(),
                );
                let len = pending.len();
                let entry = match pending.get_mut(&key) {
                    Some(e) => e,
                    None if len >= PENDING_MAX => {
                        dropped += 1;
                        continue;
                    }
                    None => pending.entry(key).or_insert_with(|| Observation {
                        host: host.to_owned(),
                        sha256: req.program.sha256.clone(),
                        sha1: (!req.program.sha1.is_empty()).then(|| req.program.sha1.clone()),
                        size: req.program.size,
                        path: req.program.path.clone(),
                        package: None,
                        users: BTreeSet::new(),
                        users_more: false,
                        first_ms: at_ms,
                        last_ms: at_ms,
                        count: 0,
                        verdict,
                        mode,
                    }),
                };
                entry.count = entry.count.saturating_add(1);
                entry.last_ms = entry.last_ms.max(at_ms);
                entry.verdict = verdict;
                entry.mode = mode;
                if let Some(p) = package {
                    entry.package = Some(p.to_owned());
                }
                let user = &req.subject.user;
                if entry.users.len() < crate::store::observed::USERS_MAX {
                    entry.users.insert(user.clone());
                } else if !entry.users.contains(user) {
                    entry.users_more = true;
                }
            }
        }
        for _ in 0..dropped {
            metrics::metrics().record_refused("learn_pending");
        }
    }

    /// Writes what is pending (blocking; the spawned task calls it every
    /// [`FLUSH_EVERY`]). On a store failure the batch is lost (the audit
    /// log keeps the decisions) and the error returned.
    pub fn flush(&self) -> Result<ObservedWrite, StoreError> {
        let batch: Vec<Observation> = {
            let mut pending = self.pending.lock().map_err(|_| StoreError::Poisoned)?;
            std::mem::take(&mut *pending).into_values().collect()
        };
        if batch.is_empty() {
            return Ok(ObservedWrite::default());
        }
        let out = self.store.record_observed(&batch)?;
        for _ in 0..out.left_out {
            metrics::metrics().record_refused("learn_cap");
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Outcome;
    use crate::store::{ObservedFilter, ObservedState};

    fn req(n: u32, user: &str) -> QualifyRequest {
        QualifyRequest::exec("h", user, format!("{n:064x}"), &format!("/opt/p{n}"))
    }

    fn answer(verdict: Verdict, would_deny: bool, mode: Option<Mode>) -> Answer {
        Answer {
            outcome: Outcome {
                would_deny,
                ..Outcome::bare(verdict)
            },
            generation: 1,
            cacheable: true,
            channel_id: None,
            cache_hit: false,
            mode,
        }
    }

    #[test]
    fn which_decisions_are_recorded() {
        let r = req(1, "bob");
        let p = Some(Mode::Permissive);
        let e = Some(Mode::Enforce);
        assert_eq!(
            seen(&r, &answer(Verdict::Allow, true, p)),
            Some((Seen::WouldDeny, Mode::Permissive))
        );
        assert_eq!(
            seen(&r, &answer(Verdict::Allow, false, p)),
            Some((Seen::Allowed, Mode::Permissive))
        );
        assert_eq!(
            seen(&r, &answer(Verdict::Deny, false, e)),
            Some((Seen::Denied, Mode::Enforce))
        );
        assert_eq!(seen(&r, &answer(Verdict::Allow, false, e)), None);
        assert_eq!(
            seen(&r, &answer(Verdict::Allow, false, Some(Mode::Disabled))),
            None
        );
        // A license refusal is no policy decision.
        assert_eq!(seen(&r, &answer(Verdict::Deny, false, None)), None);
        let mut open = req(1, "bob");
        open.action = Action::OpenRead;
        assert_eq!(seen(&open, &answer(Verdict::Deny, false, e)), None);
    }

    #[test]
    fn notes_wait_in_memory_until_the_flush_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("a.db")).unwrap());
        let rec = Recorder::new(Arc::clone(&store));
        let all = ObservedFilter {
            state: ObservedState::All,
            ..ObservedFilter::default()
        };
        let a = req(1, "bob");
        let b = req(1, "alice");
        rec.note(
            "h",
            &[
                (&a, Some("coreutils"), Seen::WouldDeny, Mode::Permissive),
                (&b, None, Seen::WouldDeny, Mode::Permissive),
            ],
            10,
        );
        // Nothing written yet: the decision did no I/O for it.
        assert!(store.observed(&all, 0, 10).unwrap().is_empty());
        let w = rec.flush().unwrap();
        assert_eq!(w.inserted, 1);
        let rows = store.observed(&all, 0, 10).unwrap();
        assert_eq!(rows[0].seen.count, 2);
        assert_eq!(
            rows[0].seen.users.iter().collect::<Vec<_>>(),
            ["alice", "bob"]
        );
        assert_eq!(rows[0].seen.package.as_deref(), Some("coreutils"));
        // The pending map is bounded; past it, new keys are dropped.
        let reqs: Vec<_> = (0..u32::try_from(PENDING_MAX).unwrap() + 5)
            .map(|n| req(n + 10, "bob"))
            .collect();
        let noted: Vec<Noted<'_>> = reqs
            .iter()
            .map(|r| (r, None, Seen::WouldDeny, Mode::Permissive))
            .collect();
        let before = metrics::metrics().refused("learn_pending");
        rec.note("h2", &noted, 20);
        assert!(metrics::metrics().refused("learn_pending") >= before + 5);
        let w = rec.flush().unwrap();
        assert_eq!(w.inserted + w.left_out, PENDING_MAX as u64);
        assert_eq!(rec.flush().unwrap(), ObservedWrite::default());
    }
}
