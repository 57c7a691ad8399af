//! The agent API: gRPC (tonic) over rustls.
//!
//! Two listeners:
//! - the **enrol port** (server-authenticated TLS) serves only
//!   `Enrolment.Enrol`: a pending host's one-time token and CSR buy a host
//!   certificate ([`enrol`]);
//! - the **agent port** (mutual TLS) serves `Agent.Qualify`,
//!   `Agent.Subscribe`, `Agent.Report` and the channel keys v2 calls
//!   `Agent.Listen` and `Agent.Grant` ([`service`], `crate::grants`). Its verifier
//!   refuses, at the handshake, any certificate that is not a host
//!   certificate of this CA whose serial belongs to an enrolled host; every
//!   call re-checks, so a host revoked while connected is refused on its
//!   next call and its push stream ends.
//!
//! The host name is always the CN of the verified client certificate.

pub mod bundle;
pub mod convert;
pub mod enrol;
pub mod hub;
pub mod service;
pub mod tls;

/// Code generated from `api/proto/trustbind/agent/v1/agent.proto`.
pub use trustbind_api::pb;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use hub::Hub;
pub use service::{Answer, DecideError, Decider};

use crate::pki::{EnrolledHosts, Pki, PkiError};
use crate::ratelimit::{KeyedLimiter, Rate};
use crate::store::{AuditWriter, Mode, Store, StoreError};

/// The status of a certificate not issued from a request's `csr_pem`: the
/// CA signer out of reach is `unavailable` (try again later); anything else
/// is the request's (its CSR, name, or a refusal by the signer).
pub(crate) fn not_issued(e: &PkiError) -> tonic::Status {
    match e {
        PkiError::SignerUnavailable(_) => tonic::Status::unavailable(e.to_string()),
        _ => tonic::Status::invalid_argument(format!("field `csr_pem`: {e}")),
    }
}

/// Largest gRPC message tonic decodes on the agent port, in bytes (a hard
/// stop; `Qualify` refuses more than [`service::MAX_BATCH_BYTES`] with a
/// clear INVALID_ARGUMENT).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// Longest any unary call may run; a shorter `grpc-timeout` from the client
/// is honoured.
pub const MAX_CALL_TIME: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive ping interval on the agent port.
pub const KEEPALIVE: Duration = Duration::from_secs(20);

/// Why a listener could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The PKI failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Everything the agent API needs, shared by both listeners.
pub struct AgentApi {
    /// The store.
    pub store: Arc<Store>,
    /// The CA.
    pub pki: Arc<Pki>,
    /// Certificates allowed on the agent port.
    pub hosts: Arc<EnrolledHosts>,
    /// Push streams.
    pub hub: Arc<Hub>,
    /// Where verdicts come from.
    pub decider: Arc<dyn Decider>,
    /// Group-commit writer for decision audit rows.
    pub audit: AuditWriter,
    /// Learning mode's recorder of exec decisions (flushed every second).
    pub learn: Arc<crate::learn::Recorder>,
    /// Per-host limits on reports and bundle signatures.
    pub quotas: HostQuotas,
    /// Where `@alert`s of audited decisions go (none until set).
    alerts: std::sync::OnceLock<crate::alerts::Alerts>,
    /// Channel keys v2: registrations, grants, host keys, revocations
    /// (`Listen` and `Grant` are refused until set).
    grants: std::sync::OnceLock<Arc<crate::grants::Grants>>,
}

/// Bytes of `Report` a host may send at once ...
pub const REPORT_BURST_BYTES: u32 = 4 * 1024 * 1024;
/// ... and then per second (about 5.4 GB a day: a backlog drains, a flood
/// is slowed; retention keeps the disk).
pub const REPORT_BYTES_PER_SEC: u32 = 64 * 1024;
/// `SignBundle` calls a host may make at once ...
pub const BUNDLE_BURST: u32 = 3;
/// ... and then one per this long (the agent asks at most every 10 s).
pub const BUNDLE_EVERY: Duration = Duration::from_secs(10);
/// Hosts tracked one by one by the quotas (all enrolled hosts of a large
/// fleet; beyond, hosts share an overflow bucket).
const QUOTA_HOSTS: usize = 65_536;

/// What one enrolled host may ask for, per host (`ratelimit.rs`): `Report`
/// bytes and `SignBundle` calls. Past them, calls get RESOURCE_EXHAUSTED
/// saying when to retry; the agent keeps its spool and tries later.
#[derive(Debug)]
pub struct HostQuotas {
    /// `Report` bytes (the encoded batch) per host.
    pub reports: KeyedLimiter<String>,
    /// `SignBundle` calls per host.
    pub bundles: KeyedLimiter<String>,
}

impl Default for HostQuotas {
    fn default() -> Self {
        let reports = Rate {
            burst: f64::from(REPORT_BURST_BYTES),
            per_sec: f64::from(REPORT_BYTES_PER_SEC),
        };
        let bundles = Rate::per(BUNDLE_BURST, BUNDLE_EVERY * BUNDLE_BURST);
        Self {
            reports: KeyedLimiter::new(reports, QUOTA_HOSTS, reports),
            bundles: KeyedLimiter::new(bundles, QUOTA_HOSTS, bundles),
        }
    }
}

impl std::fmt::Debug for AgentApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentApi")
            .field("pki", &self.pki)
            .field("hosts", &self.hosts.len())
            .finish_non_exhaustive()
    }
}

impl AgentApi {
    /// Loads the enrolled hosts' certificate serials from `store` and starts
    /// an audit writer (call from within a tokio runtime).
    pub fn new(
        store: Arc<Store>,
        pki: Arc<Pki>,
        decider: Arc<dyn Decider>,
    ) -> Result<Arc<Self>, ApiError> {
        Self::with_hub(store, pki, Arc::new(Hub::new()), decider)
    }

    /// Like [`AgentApi::new`] with a hub made beforehand, for deciders that
    /// push (the channel code pushes keys to both hosts of a pair).
    pub fn with_hub(
        store: Arc<Store>,
        pki: Arc<Pki>,
        hub: Arc<Hub>,
        decider: Arc<dyn Decider>,
    ) -> Result<Arc<Self>, ApiError> {
        let hosts = Arc::new(EnrolledHosts::new(store.enrolled_certs()?));
        let audit = AuditWriter::spawn(Arc::clone(&store));
        let learn = crate::learn::Recorder::new(Arc::clone(&store));
        learn.spawn();
        Ok(Arc::new(Self {
            store,
            pki,
            hosts,
            hub,
            decider,
            audit,
            learn,
            quotas: HostQuotas::default(),
            alerts: std::sync::OnceLock::new(),
            grants: std::sync::OnceLock::new(),
        }))
    }

    /// Sends the `@alert`s of audited decisions to `alerts`' sinks from now
    /// on (once; a second call is ignored and returns false).
    pub fn set_alerts(&self, alerts: crate::alerts::Alerts) -> bool {
        self.alerts.set(alerts).is_ok()
    }

    /// Serves channel keys v2 with `grants` from now on (once; a second
    /// call is ignored and returns false).
    pub fn set_grants(&self, grants: Arc<crate::grants::Grants>) -> bool {
        self.grants.set(grants).is_ok()
    }

    /// Channel keys v2, if set.
    pub fn grants(&self) -> Option<&Arc<crate::grants::Grants>> {
        self.grants.get()
    }

    /// The alert sinks, if set.
    pub fn alerts(&self) -> Option<&crate::alerts::Alerts> {
        self.alerts.get().filter(|a| !a.is_empty())
    }

    /// Revokes `host` (audited as `actor`): the store marks it revoked, its
    /// certificate fails every new handshake and every further call, and its
    /// push streams get `Revoked` and end. The admin API calls this, not
    /// `Store::revoke_host`.
    pub fn revoke_host(&self, host: &str, actor: &str) -> Result<(), StoreError> {
        self.store.revoke_host(host, actor)?;
        self.disconnect_host(host);
        Ok(())
    }

    /// For a host the store already marks revoked (e.g. by the admin API):
    /// refuses its certificate from now on and ends its push streams.
    pub fn disconnect_host(&self, host: &str) {
        self.hosts.revoke(host);
        self.hub.revoke(host);
        // Its tickets are refused by every connected host from now on.
        if let Some(g) = self.grants() {
            g.revoke_host(host);
        }
    }

    /// The mode of `host`'s host group (`enforce` when the group has none
    /// recorded: fail safe).
    pub fn host_mode(&self, host: &str) -> Result<Mode, StoreError> {
        let Some((_, group)) = self.store.host(host)? else {
            return Ok(Mode::Enforce);
        };
        Ok(self.store.host_group_mode(&group)?.unwrap_or(Mode::Enforce))
    }

    /// Pushes `host`'s mode (its host group's) to its agent; `false` if the
    /// host is not connected.
    pub fn push_mode(&self, host: &str) -> bool {
        self.host_mode(host).is_ok_and(|m| {
            self.hub.push(
                host,
                pb::push::Kind::HostMode(pb::HostMode {
                    mode: m.as_str().into(),
                    module_order: Vec::new(),
                }),
            )
        })
    }

    /// The protected file sets, as the `FileSets` push.
    pub fn file_sets(&self) -> Result<pb::push::Kind, StoreError> {
        Ok(convert::file_sets(&self.store.file_sets()?))
    }

    /// Tells every connected agent the policy generation moved (call after
    /// an activation or rollback).
    pub fn announce_generation(&self, generation: i64) -> usize {
        self.hub
            .broadcast(pb::push::Kind::Generation(pb::PolicyGeneration {
                generation,
            }))
    }
}

/// Serves the agent port on `listener` (mutual TLS) until `shutdown`
/// completes, then waits for open calls to finish.
pub async fn serve_agent(
    api: Arc<AgentApi>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    serve_agent_limited(api, listener, shutdown, Arc::new(tls::PortLimits::agent())).await
}

/// [`serve_agent`] admitting connections within `limits`.
pub async fn serve_agent_limited(
    api: Arc<AgentApi>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    limits: Arc<tls::PortLimits>,
) -> Result<(), ApiError> {
    let config = api.pki.agent_server_config(Arc::clone(&api.hosts))?;
    let watch = tokio::spawn(watch_generation(Arc::clone(&api)));
    // Push streams never end on their own: end them so the graceful
    // shutdown does not wait for agents to hang up.
    let hub = Arc::clone(&api.hub);
    let shutdown = async move {
        shutdown.await;
        hub.close_all();
    };
    let svc = pb::agent_server::AgentServer::new(service::AgentService::new(api))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let served = tonic::transport::Server::builder()
        .timeout(MAX_CALL_TIME)
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .add_service(svc)
        .serve_with_incoming_shutdown(tls::incoming_limited(listener, config, limits), shutdown)
        .await;
    watch.abort();
    served?;
    Ok(())
}

/// How often the store's verdict generation is checked for changes.
pub const GENERATION_POLL: Duration = Duration::from_millis(200);

/// Broadcasts `PolicyGeneration` whenever the store's verdict generation
/// moves (policy switch, membership, roles, modes, file sets...), whoever
/// moved it, after making a deferred move that is due
/// (`Store::settle_deferred`), preceded by `HostMode` to each connected
/// host (a mode change moves the generation too; agents take a repeated
/// mode as a no-op) and, when the protected file sets differ from the
/// last ones sent, by `FileSets` to all. Also keeps the connected-agents gauge current.
async fn watch_generation(api: Arc<AgentApi>) {
    let mut seen = api.store.generation_hint();
    let mut sets = api.file_sets().ok();
    let mut epoch = crate::tickets::epoch_of(crate::grants::now_s());
    let mut tick = tokio::time::interval(GENERATION_POLL);
    loop {
        tick.tick().await;
        if api.store.deferred_move() {
            let s = Arc::clone(&api.store);
            let now = service::now_ms();
            let settled = tokio::task::spawn_blocking(move || {
                s.settle_deferred(
                    now,
                    crate::store::DEFER_QUIET_MS,
                    crate::store::DEFER_MAX_MS,
                )
            })
            .await;
            if let Ok(Err(e)) = settled {
                eprintln!("deferred generation move failed: {e}");
            }
        }
        let g = api.store.generation_hint();
        if g != seen {
            seen = g;
            let a = Arc::clone(&api);
            let hosts = api.hub.connected_hosts();
            let (now, now_sets) = tokio::task::spawn_blocking(move || {
                let modes = hosts
                    .into_iter()
                    .filter_map(|h| a.host_mode(&h).ok().map(|m| (h, m)))
                    .collect::<Vec<_>>();
                (modes, a.file_sets().ok())
            })
            .await
            .unwrap_or_default();
            if now_sets.is_some() && now_sets != sets {
                sets = now_sets;
                if let Some(s) = &sets {
                    api.hub.broadcast(s.clone());
                }
            }
            for (host, mode) in now {
                api.hub.push(
                    &host,
                    pb::push::Kind::HostMode(pb::HostMode {
                        mode: mode.as_str().to_owned(),
                        module_order: Vec::new(),
                    }),
                );
            }
            api.announce_generation(g);
            // Tickets of earlier generations are refused from now on.
            if let Some(grants) = api.grants() {
                grants.generation_moved(g);
            }
        }
        // A new host-key epoch: each connected host gets its new keys.
        if let Some(grants) = api.grants() {
            epoch = grants.rotate(epoch);
        }
        let n = api.hub.connected_hosts().len();
        crate::metrics::metrics().set_agents_connected(u64::try_from(n).unwrap_or(u64::MAX));
        let u = api.hub.unsealed_hosts().len();
        crate::metrics::metrics().set_agents_unsealed(u64::try_from(u).unwrap_or(u64::MAX));
    }
}

/// Serves the enrol port on `listener` (server-authenticated TLS) until
/// `shutdown` completes.
pub async fn serve_enrol(
    api: Arc<AgentApi>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    serve_enrol_limited(api, listener, shutdown, Arc::new(tls::PortLimits::agent())).await
}

/// [`serve_enrol`] admitting connections within `limits`.
pub async fn serve_enrol_limited(
    api: Arc<AgentApi>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    limits: Arc<tls::PortLimits>,
) -> Result<(), ApiError> {
    let config = api.pki.enrol_server_config()?;
    let svc = pb::enrolment_server::EnrolmentServer::new(enrol::EnrolService::new(api))
        .max_decoding_message_size(64 * 1024);
    tonic::transport::Server::builder()
        .timeout(MAX_CALL_TIME)
        .add_service(svc)
        .serve_with_incoming_shutdown(tls::incoming_limited(listener, config, limits), shutdown)
        .await?;
    Ok(())
}
