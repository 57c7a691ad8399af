//! The appliance's decider: the policy engine, plus license limits and
//! channel binding, behind the agent API's [`Decider`] trait.
//!
//! - Every request first counts against its host's license
//!   ([`LicenseKey::Host`]); an exceeded license denies (and revokes the
//!   host, see `limits`).
//! - exec and file requests go to the engine.
//! - **connect before the SYN** (`established` false; the client port is
//!   not known yet): the engine decides the client side alone. If it allows
//!   and its obligations hold `encrypt = required`, the client's kernel
//!   will ask again once the handshake is done: an *expectation* for the
//!   server end (dst address, dst port) is registered in the
//!   [`Correlator`] for the pairing timeout. No channel id in the answer.
//! - **established connect** (the same connect with its real 5-tuple):
//!   decided again; denied → deny; no `encrypt` obligation → allow, no
//!   channel. Otherwise one expectation for its server end is consumed and
//!   the half waits in the correlator under a channel id, which the answer
//!   carries; waiting accepts are woken. The key comes later, pushed.
//! - **accept** (the server side, after the handshake): if an established
//!   connect half with the same 5-tuple waits, the pair is decided as one
//!   ([`Engine::decide_pair`], plus the program-pair license). Allowed: a
//!   fresh [`ChannelKey`] is pushed to both hosts (each with its own
//!   direction), the channel is recorded by key id, and the key is zeroed.
//!   Denied: the client host gets `ChannelDenied`. If none waits but an
//!   expectation for the accept's server end is unexpired (a protected
//!   client is between its two asks; its first ask always reaches the
//!   appliance before the server can accept), the accept waits (a condition
//!   variable, at most the pairing timeout) and looks again, until no
//!   expectation for that server end remains. Then it is decided alone,
//!   with no peer in its context; if that decision requires `encrypt`, it
//!   is denied: the client is not a protected host.
//! - An established half with no accept within the pairing timeout expires
//!   ([`Gate::expire`], run by [`Gate::run_expiry`]): audited
//!   `channel.unpaired` and the client host gets `ChannelDenied`.
//!   Expectations expire silently (waking the accepts that wait on them).
//! - **Hosts speak only for their own end** (issue 15 item 1, T-68 to
//!   T-71): a connect that would enter pairing (allowed, `encrypt`
//!   required) must name as `src` an address its host owns (before the SYN
//!   also the unspecified address), an accept as `dst`
//!   ([`crate::hostaddr`]: loopback, assigned by an administrator, or the
//!   address its agent connects from and no other host's). A connect that
//!   does not is denied, audited with the reason and counted
//!   (`refused{reason="channel_address"}`) before it touches the
//!   correlator; so is an accept that does not while a connect half or an
//!   expectation waits for its server end (one that finds nothing is
//!   decided alone as before: it gets no key either way). An established
//!   half consumes only its own host's expectations, each host holds at
//!   most its share of the correlator ([`crate::channels::HostShare`],
//!   `refused{reason="channel_share"}`), and a pair's license is charged
//!   only once both halves passed these checks.
//! - A half asked by a module that believes only sealed records
//!   ([`ModuleAsk`], from [`Decider::decide_sealed`]) waits with it: the
//!   key pushed to its host then also carries the key sealed as the answer
//!   to that module request (`ChannelKey.module_answer`).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::agent_api::convert::channel_key_push;
use crate::agent_api::pb::{self, push};
use crate::agent_api::{Answer, DecideError, Decider, Hub};
use crate::channels::{
    describe, ChannelKey, ChannelTerms, Correlator, Endpoint, HostShare, Offer, OfferError, Role,
};
use crate::hostaddr::{self, NotOwned, Standing};
use crate::limits::{LicenseKey, LicenseTime, Limits};
use crate::metrics;
use crate::policy::engine::{pair_event, Decision, Engine};
use crate::policy::{Outcome, Verdict, ENCRYPT_VALUES};
use crate::request::{Action, QualifyRequest, Target};
use crate::seal::ModuleAsk;
use crate::store::{AuditEvent, Store, StoreError};

/// The decider `serve` uses.
pub struct Gate {
    engine: Arc<Engine>,
    store: Arc<Store>,
    hub: Arc<Hub>,
    limits: Option<Arc<Limits>>,
    pairs: Mutex<Correlator>,
    /// Signalled when a connect half starts waiting or expectations expire:
    /// accepts waiting for a protected client look again.
    wake: Condvar,
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
        mode: Some(d.mode),
    }
}

fn denied(reason: String, generation: i64) -> Answer {
    Answer {
        outcome: Outcome {
            reasons: vec![reason],
            ..Outcome::bare(Verdict::Deny)
        },
        generation,
        cacheable: false,
        channel_id: None,
        cache_hit: false,
        mode: None,
    }
}

fn allows(d: &Decision) -> bool {
    !matches!(d.outcome.verdict, Verdict::Deny)
}

/// Whether an allowing decision requires the connection to be a channel
/// (obligation `encrypt = required` or `offload`).
fn requires_encrypt(d: &Decision) -> bool {
    requires_channel(&d.outcome.verdict)
}

/// Whether verdict `v` requires the connection to be a channel (an allow
/// with obligation `encrypt = required` or `offload`).
pub fn requires_channel(v: &Verdict) -> bool {
    matches!(v, Verdict::AllowWithConditions { obligations }
        if obligations.get("encrypt").is_some_and(|v| ENCRYPT_VALUES.contains(&v.as_str())))
}

/// How the pair decision `d` wants its channel keyed.
fn terms(d: &Decision) -> ChannelTerms {
    match &d.outcome.verdict {
        Verdict::AllowWithConditions { obligations } => ChannelTerms::of(obligations),
        _ => ChannelTerms::default(),
    }
}

fn server_end(r: &QualifyRequest) -> Option<Endpoint> {
    match &r.target {
        Target::Net(t) => Some((t.dst_addr.clone(), t.dst_port)),
        _ => None,
    }
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
            wake: Condvar::new(),
        }
    }

    /// This gate with each host holding `share` of its correlator (the
    /// default: [`HostShare::of`] its size).
    pub fn with_host_share(self, share: HostShare) -> Self {
        let (timeout, max_pending) = {
            let g = self.pairs();
            (g.timeout(), g.max_pending())
        };
        Self {
            pairs: Mutex::new(Correlator::with_share(timeout, max_pending, share)),
            ..self
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

    /// Whether `r`'s host owns the local end of its tuple: `src` for a
    /// connect (before the SYN the unspecified address too), `dst` for an
    /// accept. `Ok(Err(_))`: it does not, and why.
    fn owns_local(&self, r: &QualifyRequest) -> Result<Result<(), NotOwned>, DecideError> {
        let (Some(role), Target::Net(t)) = (Role::of(r), &r.target) else {
            return Ok(Ok(()));
        };
        let local = match role {
            Role::Connect => &t.src_addr,
            Role::Accept => &t.dst_addr,
        };
        if role == Role::Connect
            && !t.established
            && hostaddr::parse(local).is_some_and(|a| a.is_unspecified())
        {
            return Ok(Ok(()));
        }
        let now = Instant::now();
        let mut failed = None;
        let owned = hostaddr::owns(local, |a| {
            hostaddr::standing(&self.store, self.hub.addrs(), &r.host, a, now).unwrap_or_else(|e| {
                failed = Some(e);
                Standing::default()
            })
        });
        if let Some(e) = failed {
            return Err(DecideError(format!("store: {e}")));
        }
        Ok(owned.map(|_| ()))
    }

    /// The refusal of a half whose host does not own its local end.
    fn foreign(&self, r: &QualifyRequest, why: &NotOwned, generation: i64) -> Answer {
        metrics::metrics().record_refused("channel_address");
        let tuple = match &r.target {
            Target::Net(t) => describe(t),
            _ => String::new(),
        };
        let from: Vec<String> = self
            .hub
            .addrs()
            .of(&r.host, Instant::now())
            .iter()
            .map(ToString::to_string)
            .collect();
        let from = if from.is_empty() {
            "no address but loopback".to_owned()
        } else {
            from.join(", ")
        };
        denied(
            format!(
                "channel: host `{}` does not own its end of {tuple}: {why} (its agent connects from {from}; `trustbind host addresses` assigns addresses to a host)",
                r.host
            ),
            generation,
        )
    }

    /// The refusal of a half the correlator did not take.
    fn not_taken(e: &OfferError, generation: i64) -> Answer {
        if matches!(e, OfferError::HostFull(..)) {
            metrics::metrics().record_refused("channel_share");
        }
        denied(format!("channel: {e}"), generation)
    }

    fn connect(
        &self,
        r: &QualifyRequest,
        ask: Option<&Arc<ModuleAsk>>,
    ) -> Result<Answer, DecideError> {
        let d = self.engine(r)?;
        if !allows(&d) || !requires_encrypt(&d) {
            return Ok(answer(d, None));
        }
        let (Some(server), Target::Net(t)) = (server_end(r), &r.target) else {
            return Ok(answer(d, None));
        };
        if let Err(why) = self.owns_local(r)? {
            return Ok(self.foreign(r, &why, d.generation));
        }
        let now = Instant::now();
        if !t.established {
            // Before the SYN: announce the established half to come.
            let expected = self.pairs().expect(server, &r.host, now);
            return match expected {
                Ok(()) => Ok(answer(d, None)),
                Err(e) => Ok(Self::not_taken(&e, d.generation)),
            };
        }
        let offered = {
            let mut g = self.pairs();
            g.consume_expectation(&server, &r.host, now);
            g.offer_sealed(r.clone(), ask.cloned(), now)
        };
        match offered {
            Ok(Offer::Waiting { channel_id }) => {
                self.wake.notify_all();
                Ok(answer(d, Some(channel_id)))
            }
            // Not reachable (accepts never wait), but decide it properly
            // if it ever is.
            Ok(Offer::Paired(p)) => self.pair(&p),
            Err(e) => Ok(Self::not_taken(&e, d.generation)),
        }
    }

    fn accept(
        &self,
        r: &QualifyRequest,
        ask: Option<&Arc<ModuleAsk>>,
    ) -> Result<Answer, DecideError> {
        // Report halves that timed out before looking for a partner.
        self.expire();
        let Some(server) = server_end(r) else {
            return self.engine(r).map(|d| answer(d, None));
        };
        if let Err(why) = self.owns_local(r)? {
            // Not its end: it never pairs nor waits. Refused when a real
            // half or expectation is there for it to meet; otherwise
            // decided alone (no key either way).
            let meets = {
                let g = self.pairs();
                g.has_partner(r) || g.expecting(&server, &r.host, Instant::now()).is_some()
            };
            let d = self.engine(r)?;
            if meets {
                return Ok(self.foreign(r, &why, d.generation));
            }
            return Ok(self.lone_accept(r, d));
        }
        let mut g = self.pairs();
        let give_up = Instant::now() + g.timeout();
        let mut waited = false;
        loop {
            match g.pair_with_sealed(r.clone(), ask.cloned()) {
                Ok(Some(p)) => {
                    drop(g);
                    return self.pair(&p);
                }
                Ok(None) => {}
                Err(e) => {
                    drop(g);
                    return Ok(denied(format!("channel: {e}"), self.engine.generation()));
                }
            }
            // A protected client between its pre-SYN ask and its
            // established ask: wait for its half (bounded).
            let now = Instant::now();
            let Some(until) = g.expecting(&server, &r.host, now) else {
                break;
            };
            let until = until.min(give_up);
            if until <= now {
                break;
            }
            waited = true;
            g = self
                .wake
                .wait_timeout(g, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(g);
        if waited {
            // What this accept waited for ran out: report it now.
            self.expire();
        }
        // No protected client: decide the accept alone.
        let d = self.engine(r)?;
        Ok(self.lone_accept(r, d))
    }

    /// An accept decided alone, with no peer: denied if it requires
    /// `encrypt` (the client is not a protected host).
    fn lone_accept(&self, r: &QualifyRequest, d: Decision) -> Answer {
        if allows(&d) && requires_encrypt(&d) {
            let client = match &r.target {
                Target::Net(t) => format!("{}:{}", t.src_addr, t.src_port),
                _ => String::new(),
            };
            return denied(
                format!("`encrypt` required but the client {client} is not a protected host"),
                d.generation,
            );
        }
        answer(d, None)
    }

    /// Decides a pair and delivers its key or its denial.
    fn pair(&self, p: &crate::channels::Pair) -> Result<Answer, DecideError> {
        let (channel_id, connect, accept) = (p.channel_id, &p.connect, &p.accept);
        let d = self
            .engine
            .decide_pair(connect, accept)
            .map_err(|e| DecideError(e.to_string()))?;
        let ev = pair_event(connect, accept, &d);
        match self.store.append_audit(&ev) {
            // Counted in the audit gap: the pair is answered anyway.
            Ok(_) | Err(StoreError::DiskFull) => {}
            Err(e) => return Err(DecideError(format!("cannot audit the pair decision: {e}"))),
        }
        let licensed = match &self.limits {
            Some(l) => l.check_at(
                &LicenseKey::Pair {
                    client: connect.program.sha256.clone(),
                    server: accept.program.sha256.clone(),
                },
                LicenseTime::now(),
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
        match self
            .store
            .open_channel(&key.key_id, &connect.host, &accept.host, &tuple)
        {
            Ok(_) => {}
            // The disk is full: the channel goes unrecorded (counted in the
            // audit gap) rather than the pair refused.
            Err(e) if crate::store::is_disk_full(&e) => {
                self.store.note_audit_gap("channel.open", 1);
            }
            Err(e) => return Err(DecideError(format!("cannot record the channel: {e}"))),
        }
        // The pushed messages carry copies of the key bytes (and, for a
        // module that believes only sealed records, the key sealed as the
        // answer to its request); the hub wipes ours once queued, the gRPC
        // stack frees its own once sent (see the module note in channels.rs).
        for (host, role, ask) in [
            (&connect.host, Role::Connect, &p.connect_ask),
            (&accept.host, Role::Accept, &p.accept_ask),
        ] {
            let mut msg = channel_key_push(channel_id, &key, role, terms(&d));
            if let (Some(ask), push::Kind::ChannelKey(k)) = (ask, &mut msg) {
                if let Err(e) = ask.seal_channel_key(k) {
                    // Unsealed, the module refuses the connection.
                    tracing::error!("cannot seal the key of channel {channel_id}: {e}");
                }
            }
            self.hub.push(host, msg);
        }
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
                tracing::error!("cannot audit an unpaired channel: {err}");
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

    /// Expires waiting halves and expectations now, waking the accepts
    /// that wait.
    pub fn expire(&self) {
        let gone = {
            let mut g = self.pairs();
            let before = g.expectations();
            let gone = g.expire(Instant::now());
            if g.expectations() != before {
                self.wake.notify_all();
            }
            gone
        };
        self.expired(gone);
    }

    /// Halves waiting for a partner.
    pub fn pending(&self) -> usize {
        self.pairs().pending()
    }

    /// Established connect halves announced and not yet arrived.
    pub fn expectations(&self) -> usize {
        self.pairs().expectations()
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
        self.decide_sealed(r, None)
    }

    fn decide_sealed(
        &self,
        r: &QualifyRequest,
        ask: Option<&Arc<ModuleAsk>>,
    ) -> Result<Answer, DecideError> {
        if let Some(l) = &self.limits {
            let host = LicenseKey::Host {
                host: r.host.clone(),
            };
            if let Err(e) = l.check_at(&host, LicenseTime::now()) {
                return Ok(denied(format!("license: {e}"), self.engine.generation()));
            }
        }
        match r.action {
            Action::Connect => self.connect(r, ask),
            Action::Accept => self.accept(r, ask),
            _ => self.engine(r).map(|d| answer(d, None)),
        }
    }

    fn generation(&self) -> i64 {
        self.engine.generation()
    }

    /// Not a connect or an accept (they pair, wait for their partner and
    /// write channel rows), no license that a check could write to the
    /// store, and the engine's snapshot current.
    fn decides_at_once(&self, r: &QualifyRequest) -> bool {
        !matches!(r.action, Action::Connect | Action::Accept)
            && !self.limits.as_ref().is_some_and(|l| l.any())
            && self.engine.is_current()
    }

    /// The policy's verdict alone: licenses are not charged (a bundle is no
    /// call) and connect/accept are not offered for pairing.
    fn redecide(&self, r: &QualifyRequest) -> Result<Answer, DecideError> {
        self.engine(r).map(|d| answer(d, None))
    }
}
