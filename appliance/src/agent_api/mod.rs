//! The agent API: gRPC (tonic) over rustls.
//!
//! Two listeners:
//! - the **enrol port** (server-authenticated TLS) serves only
//!   `Enrolment.Enrol`: a pending host's one-time token and CSR buy a host
//!   certificate ([`enrol`]);
//! - the **agent port** (mutual TLS) serves `Agent.Qualify`,
//!   `Agent.Subscribe` and `Agent.Report` ([`service`]). Its verifier
//!   refuses, at the handshake, any certificate that is not a host
//!   certificate of this CA whose serial belongs to an enrolled host; every
//!   call re-checks, so a host revoked while connected is refused on its
//!   next call and its push stream ends.
//!
//! The host name is always the CN of the verified client certificate.

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
use crate::store::{Store, StoreError};

/// Largest gRPC message accepted on either port, in bytes.
pub const MAX_MESSAGE: usize = 1024 * 1024;
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
    /// Loads the enrolled hosts' certificate serials from `store`.
    pub fn new(
        store: Arc<Store>,
        pki: Arc<Pki>,
        decider: Arc<dyn Decider>,
    ) -> Result<Arc<Self>, ApiError> {
        let hosts = Arc::new(EnrolledHosts::new(store.enrolled_certs()?));
        Ok(Arc::new(Self {
            store,
            pki,
            hosts,
            hub: Arc::new(Hub::new()),
            decider,
        }))
    }

    /// Revokes `host` (audited as `actor`): the store marks it revoked, its
    /// certificate fails every new handshake and every further call, and its
    /// push streams get `Revoked` and end. The admin API calls this, not
    /// `Store::revoke_host`.
    pub fn revoke_host(&self, host: &str, actor: &str) -> Result<(), StoreError> {
        self.store.revoke_host(host, actor)?;
        self.hosts.revoke(host);
        self.hub.revoke(host);
        Ok(())
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
    let config = api.pki.agent_server_config(Arc::clone(&api.hosts))?;
    let svc = pb::agent_server::AgentServer::new(service::AgentService::new(api))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    tonic::transport::Server::builder()
        .timeout(MAX_CALL_TIME)
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .add_service(svc)
        .serve_with_incoming_shutdown(tls::incoming(listener, config), shutdown)
        .await?;
    Ok(())
}

/// Serves the enrol port on `listener` (server-authenticated TLS) until
/// `shutdown` completes.
pub async fn serve_enrol(
    api: Arc<AgentApi>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    let config = api.pki.enrol_server_config()?;
    let svc = pb::enrolment_server::EnrolmentServer::new(enrol::EnrolService::new(api))
        .max_decoding_message_size(64 * 1024);
    tonic::transport::Server::builder()
        .timeout(MAX_CALL_TIME)
        .add_service(svc)
        .serve_with_incoming_shutdown(tls::incoming(listener, config), shutdown)
        .await?;
    Ok(())
}
