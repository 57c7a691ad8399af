//! The `Agent` service (agent port): Qualify, Subscribe, Report,
//! SignBundle, Renew, and channel keys v2's Listen and Grant.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb::agent_server::Agent;
use super::pb::{
    self, push, AuditBatch, BundleRequest, GrantReply, GrantRequest, Hello, ListenReply,
    ListenRequest, Push, QualifyBatch, QualifyReply, RenewReply, RenewRequest, ReportReply,
    SignedBundle,
};
use super::tls::ConnInfo;
use super::{convert, AgentApi};
use crate::alerts::Alert;
use crate::metrics;
use crate::pki::CertKind;
use crate::policy::engine::Engine;
use crate::policy::Outcome;
use crate::request::QualifyRequest;
use crate::seal::{self, ModuleAsk};
use crate::store::{AuditEvent, AuditRow, StoreError};

/// Most requests in one `Qualify` batch.
pub const MAX_BATCH: usize = 256;
/// Largest `Qualify` batch, encoded, in bytes (larger ones up to
/// [`super::MAX_MESSAGE`] get INVALID_ARGUMENT, beyond that tonic refuses).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Most requests of a `Qualify` batch decided on the calling task (see
/// [`Decider::decides_at_once`]); a larger batch goes to a blocking thread,
/// so that no call holds an async worker for long (a cold decision takes
/// up to ≈ 60 µs, a cached one ≈ 5 µs).
pub const AT_ONCE: usize = 16;
/// Most records in one `Report` batch.
pub const MAX_REPORT: usize = 1024;

/// Interval of `Ping` pushes on an idle stream.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

/// A decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Verdict, reasons, would-deny.
    pub outcome: Outcome,
    /// Policy generation the decision was made under.
    pub generation: i64,
    /// Whether the PEM may cache the verdict until the generation moves.
    pub cacheable: bool,
    /// For connect / accept: the channel this half belongs to.
    pub channel_id: Option<u64>,
    /// Whether the answer came from a decision cache (for metrics).
    pub cache_hit: bool,
    /// The host's mode the policy engine applied; `None` when the answer
    /// did not come from the engine (a license or channel refusal).
    pub mode: Option<crate::store::Mode>,
}

impl Answer {
    /// A deny for `reason` under `generation` that no policy made (a
    /// request refused before deciding), never cached.
    pub fn refused(reason: String, generation: i64) -> Self {
        Self {
            outcome: Outcome {
                reasons: vec![reason],
                ..Outcome::bare(crate::policy::Verdict::Deny)
            },
            generation,
            cacheable: false,
            channel_id: None,
            cache_hit: false,
            mode: None,
        }
    }
}

/// Why no decision could be made (the whole batch fails with UNAVAILABLE).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecideError(pub String);

/// Where verdicts come from: the policy engine (and, for connect/accept,
/// the channel correlator behind it).
pub trait Decider: Send + Sync + 'static {
    /// Decides one request. Called on a blocking thread.
    fn decide(&self, r: &QualifyRequest) -> Result<Answer, DecideError>;

    /// Decides `r` again for the offline bundle (`SignBundle`): the same
    /// verdict as [`Decider::decide`] without side effects meant for a real
    /// operation (license calls charged, channel halves offered). Called on a
    /// blocking thread.
    fn redecide(&self, r: &QualifyRequest) -> Result<Answer, DecideError> {
        self.decide(r)
    }

    /// Decides `r`, a module request answered sealed (`ask`): as
    /// [`Decider::decide`], and a decider that pushes the answer later (a
    /// channel key) seals it with `ask`. Called on a blocking thread.
    fn decide_sealed(
        &self,
        r: &QualifyRequest,
        ask: Option<&Arc<ModuleAsk>>,
    ) -> Result<Answer, DecideError> {
        let _ = ask;
        self.decide(r)
    }

    /// The policy generation in force, for answers no policy made (a
    /// request refused before deciding).
    fn generation(&self) -> i64 {
        0
    }

    /// Whether deciding `r` now takes only CPU time and short locks: no
    /// store write, no wait for another request, no policy compile. A
    /// small batch of such requests is decided on the calling task rather
    /// than handed to a blocking thread and back (two thread hand-offs a
    /// call). `false` unless the decider knows better.
    fn decides_at_once(&self, r: &QualifyRequest) -> bool {
        let _ = r;
        false
    }
}

impl Decider for Engine {
    fn decide(&self, r: &QualifyRequest) -> Result<Answer, DecideError> {
        let d = Engine::decide(self, r).map_err(|e| DecideError(e.to_string()))?;
        Ok(Answer {
            outcome: d.outcome,
            generation: d.generation,
            cacheable: d.cacheable,
            channel_id: None,
            cache_hit: d.cache_hit,
            mode: Some(d.mode),
        })
    }

    fn generation(&self) -> i64 {
        Engine::generation(self)
    }

    fn decides_at_once(&self, _: &QualifyRequest) -> bool {
        self.is_current()
    }
}

/// Implementation of the `Agent` gRPC service.
#[derive(Debug, Clone)]
pub struct AgentService {
    api: Arc<AgentApi>,
}

impl AgentService {
    /// The service over `api`.
    pub fn new(api: Arc<AgentApi>) -> Self {
        Self { api }
    }

    /// The enrolled host behind this call, from the verified certificate,
    /// re-checked against the enrolled set (a host revoked while connected
    /// is refused here).
    fn host<T>(&self, req: &Request<T>) -> Result<String, Status> {
        self.peer(req).map(|p| p.name)
    }

    /// The verified, still enrolled host certificate behind this call.
    fn peer<T>(&self, req: &Request<T>) -> Result<crate::pki::PeerCert, Status> {
        let peer = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.peer.as_ref())
            .filter(|p| p.kind == CertKind::Host)
            .ok_or_else(|| Status::unauthenticated("no host certificate on this connection"))?;
        if !self.api.hosts.is_allowed(&peer.name, &peer.serial) {
            return Err(Status::permission_denied(format!(
                "host `{}` is revoked or no longer enrolled",
                peer.name
            )));
        }
        Ok(peer.clone())
    }
}

type PushStream = Pin<Box<dyn Stream<Item = Result<Push, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn qualify(&self, req: Request<QualifyBatch>) -> Result<Response<QualifyReply>, Status> {
        let started = Instant::now();
        let host = self.host(&req)?;
        let deadline = started + call_budget(&req);
        // The address this host calls from: what it may name as its own
        // end of a channel (`crate::hostaddr`).
        if let Some(c) = req.extensions().get::<ConnInfo>() {
            self.api
                .hub
                .addrs()
                .observe(&host, c.remote.ip(), Instant::now());
        }
        let batch = req.into_inner();
        let n = batch.requests.len();
        if n > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "requests: {n} in one batch, at most {MAX_BATCH}"
            )));
        }
        let size = batch.encoded_len();
        if size > MAX_BATCH_BYTES {
            return Err(Status::invalid_argument(format!(
                "QualifyBatch is {size} bytes, at most {MAX_BATCH_BYTES}"
            )));
        }
        let at_ms = now_ms();
        // Validate the whole batch before deciding anything.
        let reqs = batch
            .requests
            .iter()
            .enumerate()
            .map(|(i, r)| convert::request(i, r, &host, at_ms))
            .collect::<Result<Vec<_>, _>>()?;
        let packages = batch
            .requests
            .iter()
            .enumerate()
            .map(|(i, r)| convert::package(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        let gone = Gone::default();
        let _on_drop = GoneOnDrop(gone.clone());
        let deciding = Instant::now();
        let at_once = n <= AT_ONCE
            && batch.requests.iter().all(|r| r.module_request.is_empty())
            && reqs
                .iter()
                .all(|(_, r)| self.api.decider.decides_at_once(r));
        let (results, events, alerting, reqs, learned) = if at_once {
            // No module bytes: no sealing, no session to derive.
            let (r, e, a, l) =
                decide_batch(&self.api, &host, &reqs, (&[], false), deadline, &gone)?;
            (r, e, a, reqs, l)
        } else {
            let api = Arc::clone(&self.api);
            let asker = host.clone();
            tokio::task::spawn_blocking(move || {
                // The module's requests: checked against the gRPC ones and
                // bound to their session (ECDH once per module session).
                let asks = module_asks(&api, &batch);
                let v2 = batch.module_version >= trustbind_proto::MODULE_VERSION_TICKETS;
                decide_batch(&api, &asker, &reqs, (&asks, v2), deadline, &gone)
                    .map(|(r, e, a, l)| (r, e, a, reqs, l))
            })
            .await
            .map_err(|e| Status::internal(format!("decision task failed: {e}")))??
        };
        let auditing = Instant::now();
        let rows = record(&self.api, events).await?;
        let audited = Instant::now();
        // Learning mode, once audited: merged in memory, written later.
        if !learned.is_empty() {
            let noted: Vec<crate::learn::Noted<'_>> = learned
                .iter()
                .filter_map(|&(i, seen, mode)| {
                    let (_, r) = reqs.get(i)?;
                    Some((r, packages.get(i)?.as_deref(), seen, mode))
                })
                .collect();
            self.api.learn.note(&host, &noted, at_ms);
        }
        // Only once audited: an alert names its audit row.
        if let Some(sinks) = self.api.alerts() {
            for (i, req, outcome, generation) in alerting {
                if let Some(row) = rows.get(i) {
                    // 0: not audited (disk full, counted in the audit gap).
                    let seq = row.as_ref().map_or(0, |r| r.seq);
                    for a in Alert::of(&req, &outcome, generation, seq) {
                        sinks.send(a);
                    }
                }
            }
        }
        metrics::metrics().record_qualify(
            started.elapsed(),
            auditing - deciding,
            audited - auditing,
        );
        Ok(Response::new(QualifyReply { results }))
    }

    type SubscribeStream = PushStream;

    async fn subscribe(
        &self,
        req: Request<Hello>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let host = self.host(&req)?;
        // A module session: this stream's orders are sealed for it. One
        // that is not a P-256 point is refused (nothing could be sealed).
        let hello = req.get_ref();
        let seal = if hello.module_session.is_empty() {
            None
        } else {
            let key = self
                .api
                .pki
                .authority()
                .session(&hello.module_session)
                .map_err(|e| Status::invalid_argument(format!("module_session: {e}")))?;
            Some(Arc::new(seal::OrderSeal::new(
                key,
                hello.verdict_timeout_ms,
                hello.qualify_net,
            )))
        };
        let addr = req.extensions().get::<ConnInfo>().map(|c| c.remote.ip());
        if let Some(a) = addr {
            self.api.hub.addrs().observe(&host, a, Instant::now());
        }
        let new_peer = addr.is_some_and(|a| self.api.hub.note_peer(a));
        let generation = self
            .api
            .store
            .governing()
            .map_err(|e| Status::unavailable(format!("store: {e}")))?
            .generation;
        // First pushes: the host's mode, the current generation, the peers
        // and the protected file sets, so the agent knows where it stands
        // even if it missed changes while away.
        let mode = self
            .api
            .host_mode(&host)
            .map_err(|e| Status::unavailable(format!("store: {e}")))?;
        let file_sets = self
            .api
            .file_sets()
            .map_err(|e| Status::unavailable(format!("store: {e}")))?;
        let mut first = vec![
            push::Kind::HostMode(pb::HostMode {
                mode: mode.as_str().to_owned(),
                module_order: Vec::new(),
            }),
            push::Kind::Generation(pb::PolicyGeneration { generation }),
            self.api.hub.peers(),
            file_sets,
        ];
        // Channel keys v2: this host's own keys (named by its certificate,
        // never by the Hello) and the revocations in force.
        if let Some(g) = self.api.grants() {
            first.push(g.host_keys(&host));
            first.push(g.revocations());
        }
        let (weak, rx) = self.api.hub.subscribe(&host, first, seal);
        if new_peer {
            // Every host's module learns the new protected address.
            self.api.hub.broadcast(self.api.hub.peers());
        }
        // Keepalive pings while the stream is open; stops when the hub drops
        // the stream (revocation) or the agent goes away.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(tx) = weak.upgrade() else { break };
                if tx.is_closed() {
                    break;
                }
                // Never the slot the hub keeps for ending a slow stream; a
                // stream that far behind gets no ping.
                if tx.capacity() > 1 {
                    let ping = Push {
                        kind: Some(push::Kind::Ping(pb::Ping { at_ms: now_ms() })),
                    };
                    let _ = tx.try_send(Ok(ping));
                }
            }
        });
        Ok(Response::new(Box::pin(rx)))
    }

    async fn report(&self, req: Request<AuditBatch>) -> Result<Response<ReportReply>, Status> {
        let host = self.host(&req)?;
        let batch = req.into_inner();
        let size = batch.encoded_len();
        if let Err(l) = self.api.quotas.reports.check(&host, size as f64) {
            metrics::metrics().record_refused("report_quota");
            return Err(Status::resource_exhausted(format!(
                "report quota of host `{host}`: this batch of {size} bytes is over the allowance ({} bytes at once, {} bytes/s); retry in {} s",
                super::REPORT_BURST_BYTES,
                super::REPORT_BYTES_PER_SEC,
                l.retry_after.as_secs() + 1
            )));
        }
        let n = batch.records.len();
        if n > MAX_REPORT {
            return Err(Status::invalid_argument(format!(
                "records: {n} in one batch, at most {MAX_REPORT}"
            )));
        }
        let records = batch
            .records
            .iter()
            .enumerate()
            .map(|(i, r)| convert::record(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        let store = Arc::clone(&self.api.store);
        let (stored, duplicates) =
            tokio::task::spawn_blocking(move || store.record_agent_reports(&host, &records))
                .await
                .map_err(|e| Status::internal(format!("report task failed: {e}")))?
                .map_err(|e| Status::unavailable(format!("cannot write the audit log: {e}")))?;
        Ok(Response::new(ReportReply { stored, duplicates }))
    }

    async fn sign_bundle(
        &self,
        req: Request<BundleRequest>,
    ) -> Result<Response<SignedBundle>, Status> {
        let host = self.host(&req)?;
        if let Err(l) = self.api.quotas.bundles.check(&host, 1.0) {
            metrics::metrics().record_refused("bundle_quota");
            return Err(Status::resource_exhausted(format!(
                "SignBundle quota of host `{host}`: at most {} at once, then one per {} s; retry in {} s",
                super::BUNDLE_BURST,
                super::BUNDLE_EVERY.as_secs(),
                l.retry_after.as_secs() + 1
            )));
        }
        let deadline = Instant::now() + call_budget(&req);
        let batch = req.into_inner();
        super::bundle::check(&batch)?;
        let api = Arc::clone(&self.api);
        let gone = Gone::default();
        let _on_drop = GoneOnDrop(gone.clone());
        let (signed, event) = tokio::task::spawn_blocking(move || {
            super::bundle::sign(&api, &host, &batch, now_ms(), deadline, &gone)
        })
        .await
        .map_err(|e| Status::internal(format!("bundle task failed: {e}")))??;
        record(&self.api, vec![event]).await?;
        Ok(Response::new(signed))
    }

    async fn listen(&self, req: Request<ListenRequest>) -> Result<Response<ListenReply>, Status> {
        self.do_listen(req).await.map(Response::new)
    }

    async fn grant(&self, req: Request<GrantRequest>) -> Result<Response<GrantReply>, Status> {
        self.do_grant(req).await.map(Response::new)
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewReply>, Status> {
        let peer = self.peer(&req)?;
        let csr = req.into_inner().csr_pem;
        if csr.is_empty() || csr.len() > MAX_CSR {
            return Err(Status::invalid_argument(format!(
                "field `csr_pem` must be 1 to {MAX_CSR} bytes"
            )));
        }
        let api = Arc::clone(&self.api);
        tokio::task::spawn_blocking(move || {
            let issued = api
                .pki
                .issue_host(&peer.name, &csr)
                .map_err(|e| super::not_issued(&e))?;
            let allowed = api
                .store
                .renew_host_cert(&peer.name, &peer.serial, &issued.serial)
                .map_err(|e| match e {
                    crate::store::StoreError::Conflict(m) => Status::permission_denied(m),
                    e => Status::unavailable(format!("store: {e}")),
                })?;
            api.hosts.allow_only(&peer.name, &allowed);
            Ok(Response::new(RenewReply {
                cert_pem: issued.cert_pem,
                serial: issued.serial,
                not_after_ms: issued.expires_ms,
            }))
        })
        .await
        .map_err(|e| Status::internal(format!("renewal task failed: {e}")))?
    }
}

impl AgentService {
    /// Channel keys v2, or UNIMPLEMENTED.
    fn grants(&self) -> Result<Arc<crate::grants::Grants>, Status> {
        self.api
            .grants()
            .cloned()
            .ok_or_else(|| Status::unimplemented("channel keys v2 are not served here"))
    }

    /// `Listen`, from `Agent::listen`.
    async fn do_listen(&self, req: Request<ListenRequest>) -> Result<ListenReply, Status> {
        let host = self.host(&req)?;
        let grants = self.grants()?;
        let listen = convert::listen(req.get_ref(), &host, now_ms())?;
        // The module's own listen record: the fields must say what it
        // says, and the answer is sealed to it.
        let ask = seal::listen_ask(self.api.pki.authority(), req.get_ref())
            .transpose()
            .map_err(Status::invalid_argument)?;
        let l = audited(&self.api, "listen", move || {
            let l = grants.listen(&listen)?;
            let ev = crate::grants::listen_event(&listen, &l);
            Ok((l, ev))
        })
        .await?;
        let module_answer = match &ask {
            Some(ask) => ask
                .seal_verdict(trustbind_api::module::listen_verdict(
                    l.allowed,
                    l.channel,
                    l.generation,
                ))
                .map_err(|e| Status::internal(format!("cannot seal the listen's answer: {e}")))?,
            None => Vec::new(),
        };
        Ok(ListenReply {
            allowed: l.allowed,
            channel: l.channel,
            reasons: l.reasons,
            generation: l.generation,
            module_answer,
        })
    }

    /// `Grant`, from `Agent::grant`.
    async fn do_grant(&self, req: Request<GrantRequest>) -> Result<GrantReply, Status> {
        let host = self.host(&req)?;
        let grants = self.grants()?;
        // The address this host calls from: one it owns (`hostaddr`).
        if let Some(c) = req.extensions().get::<ConnInfo>() {
            self.api
                .hub
                .addrs()
                .observe(&host, c.remote.ip(), Instant::now());
        }
        let connect = convert::grant(req.get_ref(), &host, now_ms())?;
        // Audited before the secret leaves.
        let g = audited(&self.api, "grant", move || {
            let g = grants.grant(&connect)?;
            let ev = crate::grants::grant_event(&connect, &g);
            Ok((g, ev))
        })
        .await?;
        // The pair secret is wiped by the codec once encoded.
        Ok(crate::grants::reply(g))
    }
}

/// Runs `work` (a decision and its audit event) on a blocking thread and
/// appends the event through the group-commit writer, as decisions are,
/// before the caller replies; `what` names the call in errors.
async fn audited<T: Send + 'static>(
    api: &AgentApi,
    what: &str,
    work: impl FnOnce() -> Result<(T, AuditEvent), String> + Send + 'static,
) -> Result<T, Status> {
    let (t, ev) = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Status::internal(format!("{what} task failed: {e}")))?
        .map_err(|e| Status::unavailable(format!("no decision for the {what}: {e}")))?;
    record(api, vec![ev]).await?;
    Ok(t)
}

/// Longest CSR `Renew` accepts, in bytes.
const MAX_CSR: usize = 16 * 1024;

/// Set once a call's future is dropped (the client hung up, or the
/// server's call timeout fired): the call's blocking work checks it and
/// stops, so work whose caller has gone is not done.
#[derive(Debug, Default, Clone)]
pub struct Gone(Arc<AtomicBool>);

impl Gone {
    /// Whether the caller has gone.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Marks the caller gone.
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Sets its [`Gone`] when dropped: held by the call's future.
struct GoneOnDrop(Gone);

impl Drop for GoneOnDrop {
    fn drop(&mut self) {
        self.0.set();
    }
}

/// Whether the work of a call should stop before item `i` of `n`: the
/// caller has gone (CANCELLED) or the deadline passed (DEADLINE_EXCEEDED).
pub(crate) fn stop(gone: &Gone, deadline: Instant, i: usize, n: usize) -> Result<(), Status> {
    if gone.is_set() {
        return Err(Status::cancelled(format!(
            "the caller has gone; stopped before item {i} of {n}, nothing was recorded"
        )));
    }
    if Instant::now() >= deadline {
        return Err(Status::deadline_exceeded(format!(
            "the call's deadline passed before item {i} of {n}; nothing was recorded"
        )));
    }
    Ok(())
}

/// A decision with `@alert`s: its event's index, request, outcome and
/// generation.
type Alerting = (usize, QualifyRequest, Outcome, i64);

/// A decision learning mode records: its index in the batch, the verdict
/// as listed, the host's mode.
type Learned = (usize, crate::store::Seen, crate::store::Mode);

/// A decided batch: the results, their audit events, the alerting
/// decisions, the decisions learning mode records.
type Decided = (
    Vec<pb::Result>,
    Vec<AuditEvent>,
    Vec<Alerting>,
    Vec<Learned>,
);

/// What the module's requests of `batch` are (in order): see
/// [`seal::ask_of`]. The session is derived (or found in the cache) only
/// when some request carries module bytes.
pub(crate) type Asks = Vec<Ask>;

/// One request's [`seal::ask_of`].
pub(crate) type Ask = Option<Result<Arc<ModuleAsk>, String>>;

fn module_asks(api: &AgentApi, batch: &QualifyBatch) -> Asks {
    let session = (!batch.module_session.is_empty()
        && batch.requests.iter().any(|r| !r.module_request.is_empty()))
    .then(|| api.pki.authority().session(&batch.module_session));
    batch
        .requests
        .iter()
        .map(|r| seal::ask_of(r, session.as_ref()))
        .collect()
}

/// Decides `reqs` for `host`: the results, their audit events and the
/// decisions that raise alerts (when alert sinks are set). A request whose
/// module bytes (`asks`, in the order of `reqs`; missing entries are
/// `None`) are refused is denied for that reason, without asking the
/// decider; a sealed one gets its answer sealed (`Result.module_answer`).
/// When the batch's module speaks channel keys v2 (`v2`), a connect that
/// must be a channel to a registered service gets a grant instead
/// ([`channel_grant`]). Stops (nothing
/// decided further, nothing audited) as soon as the caller has gone or
/// `deadline` passes; if the deadline passed by the end, fails with
/// DEADLINE_EXCEEDED so that nothing is audited (the agent would not see
/// the answer).
fn decide_batch(
    api: &AgentApi,
    host: &str,
    reqs: &[(u64, QualifyRequest)],
    (asks, v2): (&[Ask], bool),
    deadline: Instant,
    gone: &Gone,
) -> Result<Decided, Status> {
    let m = metrics::metrics();
    let mut results = Vec::with_capacity(reqs.len());
    let mut events = Vec::with_capacity(reqs.len());
    let mut alerting = Vec::new();
    let mut learned = Vec::new();
    let alerts = api.alerts().is_some();
    for (i, (id, r)) in reqs.iter().enumerate() {
        stop(gone, deadline, i, reqs.len())?;
        let t = Instant::now();
        let ask = asks.get(i).and_then(Option::as_ref);
        let a = match ask {
            Some(Err(reason)) => Ok(Answer::refused(reason.clone(), api.decider.generation())),
            Some(Ok(ask)) => api.decider.decide_sealed(r, Some(ask)),
            None => api.decider.decide(r),
        }
        .map_err(|e| Status::unavailable(format!("no decision for request {id}: {e}")))?;
        m.record_decision(
            r.action.as_str(),
            convert::verdict_name(&a.outcome.verdict),
            a.outcome.would_deny,
            t.elapsed(),
        );
        m.record_cache(a.cache_hit);
        if alerts && !a.outcome.alerts.is_empty() {
            alerting.push((events.len(), r.clone(), a.outcome.clone(), a.generation));
        }
        if let Some((seen, mode)) = crate::learn::seen(r, &a) {
            learned.push((i, seen, mode));
        }
        events.push(decision_event(host, *id, r, &a));
        let mut result = convert::result(*id, &a);
        let sealed =
            |e: String| Status::internal(format!("cannot seal the answer to request {id}: {e}"));
        let granted = if v2 { channel_grant(api, r, &a)? } else { None };
        let ask = ask.and_then(|a| a.as_ref().ok());
        match (granted, ask) {
            (Some(g), ask) => {
                events.push(crate::grants::grant_event(r, &g));
                let mut reply = crate::grants::reply(g);
                if !reply.granted {
                    // Refused: a deny with the grant's reason.
                    let why = std::mem::take(&mut reply.reason);
                    result = convert::result(*id, &Answer::refused(why, a.generation));
                    if let Some(ask) = ask {
                        result.module_answer = ask.seal_result(&result).map_err(sealed)?;
                    }
                } else if let Some(ask) = ask {
                    let answer = ask.seal_grant(&reply);
                    zeroize::Zeroize::zeroize(&mut reply.pair_secret);
                    result.module_answer = answer.map_err(sealed)?;
                } else {
                    // Wiped by the codec once encoded.
                    result.grant = Some(reply);
                }
            }
            (None, Some(ask)) => {
                result.module_answer = ask.seal_result(&result).map_err(sealed)?;
            }
            (None, None) => {}
        }
        results.push(result);
    }
    if Instant::now() >= deadline {
        return Err(Status::deadline_exceeded(format!(
            "deciding {} requests took longer than the call's deadline; nothing was recorded",
            reqs.len()
        )));
    }
    Ok((results, events, alerting, learned))
}

/// Channel keys v2: the grant for `r` when it is a connect (before the
/// SYN) that policy allows only as a channel (`a`) to a service a program
/// registered with `Listen` (`Grants::grant_registered`); `None` when it is
/// not (answered as before: a v1 server takes today's channel path).
fn channel_grant(
    api: &AgentApi,
    r: &QualifyRequest,
    a: &Answer,
) -> Result<Option<crate::grants::Granted>, Status> {
    let Some(grants) = api.grants() else {
        return Ok(None);
    };
    let connect = matches!(&r.target, crate::request::Target::Net(t)
        if t.proto == crate::request::Proto::Tcp && !t.established);
    if r.action != crate::request::Action::Connect
        || !connect
        || !crate::gate::requires_channel(&a.outcome.verdict)
    {
        return Ok(None);
    }
    grants
        .grant_registered(r)
        .map_err(|e| Status::unavailable(format!("no grant for the connect: {e}")))
}

/// The audit event of the answer `a` to request `id`, `r`, of `host`:
/// kind `decision`, detail `{ "id", "request", "outcome", "generation",
/// "cacheable", "channel_id" }`, serialised straight to text.
fn decision_event(host: &str, id: u64, r: &QualifyRequest, a: &Answer) -> AuditEvent {
    /// The detail, borrowed, in this order.
    #[derive(serde::Serialize)]
    struct Detail<'a> {
        id: u64,
        request: &'a QualifyRequest,
        outcome: &'a Outcome,
        generation: i64,
        cacheable: bool,
        channel_id: Option<u64>,
    }
    AuditEvent::serialized(
        "decision",
        host,
        &Detail {
            id,
            request: r,
            outcome: &a.outcome,
            generation: a.generation,
            cacheable: a.cacheable,
            channel_id: a.channel_id,
        },
    )
}

/// Appends `events` through the group-commit audit writer (concurrent calls
/// share one commit) and returns once every one is durable. The reply is
/// sent only after this. The stored rows, in the order of `events`.
///
/// A full disk does not stop the answer: the events the store could not
/// hold are counted in its audit gap (an `audit.gap` row once space
/// returns; retention is reclaiming it meanwhile) and stand here as `None`.
/// Any other failure to audit refuses the call (UNAVAILABLE).
async fn record(api: &AgentApi, events: Vec<AuditEvent>) -> Result<Vec<Option<AuditRow>>, Status> {
    let rows =
        futures_util::future::join_all(events.into_iter().map(|e| api.audit.append(e))).await;
    rows.into_iter()
        .map(|r| match r {
            Ok(row) => Ok(Some(row)),
            Err(StoreError::DiskFull) => Ok(None),
            Err(e) => Err(Status::unavailable(format!(
                "cannot write the audit log: {e}"
            ))),
        })
        .collect()
}

/// Time this call may take: the client's `grpc-timeout` if given and
/// shorter than [`super::MAX_CALL_TIME`], else that cap.
fn call_budget<T>(req: &Request<T>) -> Duration {
    req.metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(super::MAX_CALL_TIME, |d| d.min(super::MAX_CALL_TIME))
}

/// Parses a `grpc-timeout` header value: 1 to 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let unit = v.chars().last()?;
    let digits = v.get(..v.len().checked_sub(unit.len_utf8())?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n.checked_mul(3600)?),
        'M' => Duration::from_secs(n.checked_mul(60)?),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Appliance clock, milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec_request() -> QualifyRequest {
        QualifyRequest::exec("web1", "bob", "1".repeat(64), "/bin/x")
    }

    /// The decision event is serialised straight to text; its bytes are
    /// what the code before wrote from a `json!` object (the chain hashes
    /// them, so rows old and new read and hash alike).
    #[test]
    fn decision_event_keeps_the_bytes_it_had() {
        let mut deny = crate::policy::Outcome::bare(crate::policy::Verdict::Deny);
        deny.reasons = vec!["no \"exec\"\n".into()];
        deny.alerts = vec!["é".into()];
        deny.explain = Some(Arc::new(crate::policy::Diagnosis {
            host_group: "hg".into(),
            roles: vec!["ops".into()],
            groups: vec![],
            missing: vec!["a permit for g1".into()],
            errors: vec!["p: boom".into()],
        }));
        let mut conditions = Answer::refused("r".into(), 3);
        conditions.outcome.verdict = crate::policy::Verdict::AllowWithConditions {
            obligations: [("encrypt".to_owned(), "required".to_owned())].into(),
        };
        let answers = [
            Answer::refused("no licence".into(), 9),
            Answer {
                outcome: deny,
                generation: -1,
                cacheable: true,
                channel_id: Some(u64::MAX),
                cache_hit: true,
                mode: Some(crate::store::Mode::Permissive),
            },
            conditions,
        ];
        let mut file = exec_request();
        file.target = crate::request::Target::File {
            path: "/etc/\"x\"".into(),
            to: Some("/tmp/\u{1}".into()),
            create: true,
            truncate: false,
            link: true,
        };
        let requests = [exec_request(), file];
        for (r, a) in requests
            .iter()
            .flat_map(|r| answers.iter().map(move |a| (r, a)))
        {
            for id in [0, 7, u64::MAX] {
                let before = AuditEvent::new(
                    "decision",
                    "web1",
                    serde_json::json!({
                        "id": id,
                        "request": r,
                        "outcome": a.outcome,
                        "generation": a.generation,
                        "cacheable": a.cacheable,
                        "channel_id": a.channel_id,
                    }),
                );
                assert_eq!(decision_event("web1", id, r, a), before);
            }
        }
    }

    #[tokio::test]
    async fn past_deadline_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::Store::open(&dir.path().join("a.db")).unwrap());
        let pki = Arc::new(crate::pki::Pki::open_or_create(dir.path(), &[]).unwrap());
        store
            .set_host_group("web", crate::store::Mode::Enforce, "t")
            .unwrap();
        store
            .add_pending_host("web1", "web", &"0".repeat(64), "t")
            .unwrap();
        let engine = Arc::new(
            Engine::new(
                Arc::clone(&store),
                include_str!("../../../policies/trustbind.cedarschema"),
            )
            .unwrap(),
        );
        let api = AgentApi::new(Arc::clone(&store), pki, engine).unwrap();
        let before = store.audit_rows(0, 1000).unwrap().len();
        let reqs = vec![(1, exec_request())];
        let err = decide_batch(
            &api,
            "web1",
            &reqs,
            (&[], false),
            Instant::now(),
            &Gone::default(),
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(store.audit_rows(0, 1000).unwrap().len(), before);
        // With time left the same batch is decided (default deny) and audited.
        let far = Instant::now() + Duration::from_secs(3600);
        // The caller has gone: nothing is decided.
        let gone = Gone::default();
        gone.set();
        let err = decide_batch(&api, "web1", &reqs, (&[], false), far, &gone).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Cancelled);
        assert!(
            err.message().contains("before item 0 of 1"),
            "{}",
            err.message()
        );
        let (results, events, _, _) =
            decide_batch(&api, "web1", &reqs, (&[], false), far, &Gone::default()).unwrap();
        assert_eq!(results[0].verdict(), pb::Verdict::Deny);
        assert_eq!(store.audit_rows(0, 1000).unwrap().len(), before);
        record(&api, events).await.unwrap();
        assert_eq!(store.audit_rows(0, 1000).unwrap().len(), before + 1);
    }

    #[tokio::test]
    async fn a_dropped_call_marks_its_work_gone() {
        let gone = Gone::default();
        let g = gone.clone();
        let (started, running) = tokio::sync::oneshot::channel();
        let call = tokio::spawn(async move {
            let _on_drop = GoneOnDrop(g);
            let _ = started.send(());
            std::future::pending::<()>().await;
        });
        running.await.unwrap();
        assert!(!gone.is_set());
        // The client hangs up: tonic drops the call's future.
        call.abort();
        let _ = call.await;
        assert!(gone.is_set());
    }

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("-1S"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
