//! The `Enrolment` service (enrol port): one-time token + CSR -> host
//! certificate.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::pb::enrolment_server::Enrolment;
use super::pb::{EnrolReply, EnrolRequest};
use super::tls::ConnInfo;
use super::AgentApi;
use crate::store::{hex, AuditEvent, HostState, StoreError};

/// Longest CSR accepted, in bytes.
const MAX_CSR: usize = 16 * 1024;
/// Longest token accepted, in bytes.
const MAX_TOKEN: usize = 256;

/// Implementation of the `Enrolment` gRPC service.
#[derive(Debug, Clone)]
pub struct EnrolService {
    api: Arc<AgentApi>,
}

impl EnrolService {
    /// The service over `api`.
    pub fn new(api: Arc<AgentApi>) -> Self {
        Self { api }
    }

    /// Audits a refused enrolment in its own write (so the refusal is kept
    /// even though nothing else changed) and returns `status`.
    fn refuse(&self, host: &str, remote: &str, status: Status) -> Status {
        crate::metrics::metrics().record_enrolment(false);
        let host: String = host.chars().take(253).collect();
        let ev = AuditEvent::new(
            "host.enrol.refused",
            &format!("enrol:{remote}"),
            serde_json::json!({ "host": host, "remote": remote, "reason": status.message() }),
        );
        if let Err(e) = self.api.store.append_audit(&ev) {
            return Status::unavailable(format!("cannot write the audit log: {e}"));
        }
        status
    }
}

#[tonic::async_trait]
impl Enrolment for EnrolService {
    async fn enrol(&self, req: Request<EnrolRequest>) -> Result<Response<EnrolReply>, Status> {
        let remote = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.remote.to_string())
            .unwrap_or_else(|| "unknown".into());
        let r = req.into_inner();
        let api = Arc::clone(&self.api);
        let this = self.clone();
        // SQLite and signing are blocking work.
        tokio::task::spawn_blocking(move || this.enrol_blocking(&api, &remote, r))
            .await
            .map_err(|e| Status::internal(format!("enrolment task failed: {e}")))?
    }
}

impl EnrolService {
    fn enrol_blocking(
        &self,
        api: &AgentApi,
        remote: &str,
        r: EnrolRequest,
    ) -> Result<Response<EnrolReply>, Status> {
        let host = r.host.as_str();
        if host.is_empty() {
            return Err(self.refuse(
                host,
                remote,
                Status::invalid_argument("field `host` is empty"),
            ));
        }
        if r.token.is_empty() || r.token.len() > MAX_TOKEN {
            return Err(self.refuse(
                host,
                remote,
                Status::invalid_argument(format!("field `token` must be 1 to {MAX_TOKEN} bytes")),
            ));
        }
        if r.csr_pem.is_empty() || r.csr_pem.len() > MAX_CSR {
            return Err(self.refuse(
                host,
                remote,
                Status::invalid_argument(format!("field `csr_pem` must be 1 to {MAX_CSR} bytes")),
            ));
        }
        let state = api
            .store
            .host(host)
            .map_err(|e| Status::unavailable(format!("store: {e}")))?;
        match state {
            None => {
                return Err(self.refuse(
                    host,
                    remote,
                    Status::not_found(format!("host `{host}` is not registered for enrolment")),
                ))
            }
            Some((HostState::Revoked, _)) => {
                return Err(self.refuse(
                    host,
                    remote,
                    Status::permission_denied(format!("host `{host}` is revoked")),
                ))
            }
            Some((HostState::Enrolled, _)) => {
                return Err(self.refuse(
                    host,
                    remote,
                    Status::permission_denied(format!(
                        "host `{host}` is already enrolled (its one-time token was used)"
                    )),
                ))
            }
            Some((HostState::Pending, _)) => {}
        }
        let issued = api.pki.issue_host(host, &r.csr_pem).map_err(|e| {
            self.refuse(
                host,
                remote,
                Status::invalid_argument(format!("field `csr_pem`: {e}")),
            )
        })?;
        let token_sha = hex(&Sha256::digest(r.token.as_bytes()));
        match api.store.enrol_host(host, &token_sha, &issued.serial) {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(self.refuse(
                    host,
                    remote,
                    Status::permission_denied(format!("wrong enrolment token for host `{host}`")),
                ))
            }
            Err(e) => return Err(Status::unavailable(format!("store: {e}"))),
        }
        api.hosts.allow(host, &issued.serial);
        crate::metrics::metrics().record_enrolment(true);
        Ok(Response::new(EnrolReply {
            cert_pem: issued.cert_pem,
            ca_pem: api.pki.ca_pem().to_owned(),
            serial: issued.serial,
        }))
    }
}
