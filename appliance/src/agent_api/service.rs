//! The `Agent` service (agent port): Qualify, Subscribe, Report.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb::agent_server::Agent;
use super::pb::{self, push, AuditBatch, Hello, Push, QualifyBatch, QualifyReply, ReportReply};
use super::tls::ConnInfo;
use super::AgentApi;
use crate::pki::CertKind;
use crate::policy::Outcome;
use crate::request::QualifyRequest;

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
        Ok(peer.name.clone())
    }
}

type PushStream = Pin<Box<dyn Stream<Item = Result<Push, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn qualify(&self, req: Request<QualifyBatch>) -> Result<Response<QualifyReply>, Status> {
        let _host = self.host(&req)?;
        Err(Status::unimplemented("Qualify is not built yet"))
    }

    type SubscribeStream = PushStream;

    async fn subscribe(
        &self,
        req: Request<Hello>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let host = self.host(&req)?;
        let hello = req.into_inner();
        let generation = self
            .api
            .store
            .governing()
            .map_err(|e| Status::unavailable(format!("store: {e}")))?
            .generation;
        // First push: the current generation, so the agent knows where it
        // stands even if it missed a change while disconnected.
        let first = push::Kind::Generation(pb::PolicyGeneration { generation });
        let (weak, rx) = self.api.hub.subscribe(&host, first);
        let _ = hello;
        // Keepalive pings while the stream is open; stops when the hub drops
        // the stream (revocation) or the agent goes away.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(tx) = weak.upgrade() else { break };
                let ping = Push {
                    kind: Some(push::Kind::Ping(pb::Ping { at_ms: now_ms() })),
                };
                if tx.send(Ok(ping)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report(&self, req: Request<AuditBatch>) -> Result<Response<ReportReply>, Status> {
        let _host = self.host(&req)?;
        Err(Status::unimplemented("Report is not built yet"))
    }
}

/// Appliance clock, milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
