//! The appliance's decider: the policy engine, plus license limits and
//! channel binding, behind the agent API's [`Decider`] trait.
//!
//! - Every request first counts against its host's license
//!   ([`LicenseKey::Host`]); an exceeded license denies (and revokes the
//!   host, see `limits`).
//! - exec and file requests go to the engine.
//! - **connect** (the client side, before its SYN): the engine decides the
//!   client side alone; if it allows, the half waits in the [`Correlator`]
//!   and the answer carries its channel id. The key comes later, pushed.
//! - **accept** (the server side, after the handshake): if a connect half
//!   with the same 5-tuple waits, the pair is decided as one
//!   ([`Engine::decide_pair`], plus the program-pair license). Allowed: a
//!   fresh [`ChannelKey`] is pushed to both hosts (each with its own
//!   direction), the channel is recorded by key id, and the key is zeroed.
//!   Denied: the client host gets `ChannelDenied`. If no connect half waits,
//!   the client is not a protected host: the accept is decided alone, with
//!   no peer in its context (a policy that requires a qualified peer
//!   denies it).
//! - A connect half with no accept within the pairing timeout expires
//!   ([`Gate::expire`], run by [`Gate::run_expiry`]): audited
//!   `channel.unpaired` and the client host gets `ChannelDenied`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::agent_api::convert::channel_key_push;
use crate::agent_api::pb::{self, push};
use crate::agent_api::{Answer, DecideError, Decider, Hub};
use crate::channels::{describe, ChannelKey, Correlator, Offer, Role};
use crate::limits::{LicenseKey, Limits};
use crate::metrics;
use crate::policy::engine::{pair_event, Decision, Engine};
use crate::policy::{Outcome, Verdict};
use crate::request::{Action, QualifyRequest, Target};
use crate::store::{AuditEvent, Store};

/// The decider `serve` uses.
pub struct Gate {
    engine: Arc<Engine>,
    store: Arc<Store>,
    hub: Arc<Hub>,
    limits: Option<Arc<Limits>>,
    pairs: Mutex<Correlator>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

fn answer(d: Decision, channel_id: Option<u64>) -> Answer {
    Answer {
        outcome: d.outcome,
        generation: d.generation,
        cacheable: d.cacheable,
        channel_id,
        cache_hit: d.cache_hit,
    }
}

fn denied(reason: String, generation: i64) -> Answer {
    Answer {
        outcome: Outcome {
            verdict: Verdict::Deny,
            reasons: vec![reason],
            would_deny: false,
            errors: 0,
        },
        generation,
        cacheable: false,
        channel_id: None,
        cache_hit: false,
    }
}

fn allows(d: &Decision) -> bool {
    !matches!(d.outcome.verdict, Verdict::Deny)
}

impl Gate {
    /// A gate over `engine` pushing through `hub`; halves wait at most
    /// `pair_timeout`, at most `max_pending` at once.
    pub fn new(
        engine: Arc<Engine>,
        store: Arc<Store>,
        hub: Arc<Hub>,
        limits: Option<Arc<Limits>>,
        pair_timeout: Duration,
        max_pending: usize,
    ) -> Self {
        Self {
            engine,
            store,
            hub,
            limits,
            pairs: Mutex::new(Correlator::new(pair_timeout, max_pending)),
        }
    }

    fn pairs(&self) -> MutexGuard<'_, Correlator> {
        // The correlator's state stays consistent between calls; a panic
        // elsewhere while holding the lock does not corrupt it.
        self.pairs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn engine(&self, r: &QualifyRequest) -> Result<Decision, DecideError> {
        self.engine
            .decide(r)
            .map_err(|e| DecideError(e.to_string()))
    }

    fn connect(&self, r: &QualifyRequest) -> Result<Answer, DecideError> {
        let d = self.engine(r)?;
        if !allows(&d) {
            return Ok(answer(d, None));
        }
        let offered = self.pairs().offer(r.clone(), Instant::now());
        match offered {
            Ok(Offer::Waiting { channel_id }) => Ok(answer(d, Some(channel_id))),
            // Not reachable for a connect (accepts never wait), but decide
            // it properly if it ever is.
            Ok(Offer::Paired(p)) => self.pair(p.channel_id, &p.connect, &p.accept),
            Err(e) => Ok(denied(format!("channel: {e}"), d.generation)),
        }
    }

    fn accept(&self, r: &QualifyRequest) -> Result<Answer, DecideError> {
        // Report halves that timed out before looking for a partner.
        self.expire();
        let found = self.pairs().pair_with(r.clone());
        match found {
            Ok(Some(p)) => self.pair(p.channel_id, &p.connect, &p.accept),
            // No protected client waits: decide the accept alone.
            Ok(None) => self.engine(r).map(|d| answer(d, None)),
            Err(e) => Ok(denied(format!("channel: {e}"), self.engine.generation())),
        }
    }

    /// Decides a pair and delivers its key or its denial.
    fn pair(
        &self,
        channel_id: u64,
        connect: &QualifyRequest,
        accept: &QualifyRequest,
    ) -> Result<Answer, DecideError> {
        let d = self
            .engine
            .decide_pair(connect, accept)
            .map_err(|e| DecideError(e.to_string()))?;
        let ev = pair_event(connect, accept, &d);
        if let Err(e) = self.store.append_audit(&ev) {
            return Err(DecideError(format!("cannot audit the pair decision: {e}")));
        }
        let licensed = match &self.limits {
            Some(l) => l.check(
                &LicenseKey::Pair {
                    client: connect.program.sha256.clone(),
                    server: accept.program.sha256.clone(),
                },
                accept.at_ms,
            ),
            None => Ok(()),
        };
        let refusal = match (&d.outcome.verdict, licensed) {
            (Verdict::Deny, _) => Some(format!(
                "pair denied by policy ({})",
                d.outcome.reasons.join(", ")
            )),
            (_, Err(e)) => Some(format!("license: {e}")),
            _ => None,
        };
        if let Some(reason) = refusal {
            self.hub.push(
                &connect.host,
                push::Kind::ChannelDenied(pb::ChannelDenied {
                    channel_id,
                    reason: reason.clone(),
                }),
            );
            let mut a = denied(reason, d.generation);
            a.channel_id = Some(channel_id);
            return Ok(a);
        }
        let key = ChannelKey::generate()
            .map_err(|e| DecideError(format!("no randomness for a channel key: {e}")))?;
        let tuple = match &connect.target {
            Target::Net(t) => describe(t),
            _ => String::new(),
        };
        self.store
            .open_channel(&key.key_id, &connect.host, &accept.host, &tuple)
            .map_err(|e| DecideError(format!("cannot record the channel: {e}")))?;
        // The pushed messages carry copies of the key bytes; the gRPC stack
        // frees them once sent (see the module note in channels.rs).
        self.hub.push(
            &connect.host,
            channel_key_push(channel_id, &key, Role::Connect),
        );
        self.hub.push(
            &accept.host,
            channel_key_push(channel_id, &key, Role::Accept),
        );
        metrics::metrics().record_key_issued();
        drop(key);
        Ok(answer(d, Some(channel_id)))
    }

    /// Denies and audits halves that found no partner.
    fn expired(&self, gone: Vec<crate::channels::Expired>) {
        for e in gone {
            let tuple = match &e.request.target {
                Target::Net(t) => describe(t),
                _ => String::new(),
            };
            let ev = AuditEvent::new(
                "channel.unpaired",
                &e.request.host,
                serde_json::json!({
                    "channel_id": e.channel_id,
                    "role": format!("{:?}", e.role).to_lowercase(),
                    "tuple": tuple,
                    "request": e.request,
                }),
            );
            if let Err(err) = self.store.append_audit(&ev) {
                eprintln!("trustbind-appliance: cannot audit an unpaired channel: {err}");
            }
            self.hub.push(
                &e.request.host,
                push::Kind::ChannelDenied(pb::ChannelDenied {
                    channel_id: e.channel_id,
                    reason: format!("no accepting side for {tuple} in time"),
                }),
            );
        }
    }

    /// Expires waiting halves now.
    pub fn expire(&self) {
        let gone = self.pairs().expire(Instant::now());
        self.expired(gone);
    }

    /// Halves waiting for a partner.
    pub fn pending(&self) -> usize {
        self.pairs().pending()
    }

    /// Expires halves as their deadlines pass, until the task is dropped.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let this = Arc::clone(&self);
            // SQLite writes: off the async threads.
            let _ = tokio::task::spawn_blocking(move || this.expire()).await;
        }
    }
}

impl Decider for Gate {
    fn decide(&self, r: &QualifyRequest) -> Result<Answer, DecideError> {
        if let Some(l) = &self.limits {
            let host = LicenseKey::Host {
                host: r.host.clone(),
            };
            if let Err(e) = l.check(&host, r.at_ms) {
                return Ok(denied(format!("license: {e}"), self.engine.generation()));
            }
        }
        match r.action {
            Action::Connect => self.connect(r),
            Action::Accept => self.accept(r),
            _ => self.engine(r).map(|d| answer(d, None)),
        }
    }

    /// The policy's verdict alone: licenses are not charged (a bundle is no
    /// call) and connect/accept are not offered for pairing.
    fn redecide(&self, r: &QualifyRequest) -> Result<Answer, DecideError> {
        self.engine(r).map(|d| answer(d, None))
    }
}
