//! The `Enrolment` service (enrol port): one-time token + CSR -> host
//! certificate (`Enrol`), or admin certificate (`EnrolAdmin`).
//!
//! Both calls refuse in the same style (a status naming the field or the
//! reason, an audit row `host.enrol.refused` / `admin.enrol.refused` with
//! the remote address) and share one limit on refusals per remote address
//! ([`MAX_REFUSALS`] per [`REFUSAL_WINDOW`]); past it, calls from that
//! address are refused with RESOURCE_EXHAUSTED before any token is looked
//! at, so tokens cannot be guessed at line rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::pb::enrolment_server::Enrolment;
use super::pb::{EnrolAdminReply, EnrolAdminRequest, EnrolReply, EnrolRequest};
use super::tls::ConnInfo;
use super::AgentApi;
use crate::store::{hex, AuditEvent, HostState, StoreError};

/// Longest CSR accepted, in bytes.
const MAX_CSR: usize = 16 * 1024;
/// Longest token accepted, in bytes.
const MAX_TOKEN: usize = 256;
/// Refused enrolments (host or admin) accepted from one remote address per
/// [`REFUSAL_WINDOW`]; further calls are refused unexamined until it ends.
pub const MAX_REFUSALS: u32 = 20;
/// The window of [`MAX_REFUSALS`].
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered by the refusal limit (oldest windows dropped first).
const MAX_TRACKED: usize = 4096;

/// Refusals per remote address in the current window.
#[derive(Debug, Default)]
struct Refusals {
    by_ip: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Refusals {
    /// Whether `ip` is past its refusals for now.
    fn blocked(&self, ip: Option<IpAddr>) -> bool {
        let (Some(ip), Ok(map)) = (ip, self.by_ip.lock()) else {
            return false;
        };
        map.get(&ip)
            .is_some_and(|(start, n)| *n >= MAX_REFUSALS && start.elapsed() < REFUSAL_WINDOW)
    }

    fn count(&self, ip: Option<IpAddr>) {
        let (Some(ip), Ok(mut map)) = (ip, self.by_ip.lock()) else {
            return;
        };
        let now = Instant::now();
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, (start, _)| now.duration_since(*start) < REFUSAL_WINDOW);
        }
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            return;
        }
        let e = map.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= REFUSAL_WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

/// Implementation of the `Enrolment` gRPC service.
#[derive(Debug, Clone)]
pub struct EnrolService {
    api: Arc<AgentApi>,
    refusals: Arc<Refusals>,
}

/// Where a call came from.
#[derive(Debug, Clone)]
struct Remote {
    text: String,
    ip: Option<IpAddr>,
}

fn remote_of<T>(req: &Request<T>) -> Remote {
    let addr = req.extensions().get::<ConnInfo>().map(|c| c.remote);
    Remote {
        text: addr.map_or_else(|| "unknown".into(), |a| a.to_string()),
        ip: addr.map(|a| a.ip()),
    }
}

impl EnrolService {
    /// The service over `api`.
    pub fn new(api: Arc<AgentApi>) -> Self {
        Self {
            api,
            refusals: Arc::default(),
        }
    }

    /// Audits a refused enrolment (`what`: `host` or `admin`) in its own
    /// write (so the refusal is kept even though nothing else changed),
    /// counts it against the remote address and returns `status`.
    fn refused(&self, what: &str, name: &str, remote: &Remote, status: Status) -> Status {
        crate::metrics::metrics().record_enrolment(false);
        self.refusals.count(remote.ip);
        let name: String = name.chars().take(253).collect();
        let ev = AuditEvent::new(
            &format!("{what}.enrol.refused"),
            &format!("enrol:{}", remote.text),
            serde_json::json!({ what: name, "remote": remote.text, "reason": status.message() }),
        );
        if let Err(e) = self.api.store.append_audit(&ev) {
            return Status::unavailable(format!("cannot write the audit log: {e}"));
        }
        status
    }

    fn refuse(&self, host: &str, remote: &Remote, status: Status) -> Status {
        self.refused("host", host, remote, status)
    }

    /// Refuses unexamined if `remote` is past its refusals.
    fn check_rate(&self, remote: &Remote) -> Result<(), Status> {
        if self.refusals.blocked(remote.ip) {
            crate::metrics::metrics().record_enrolment(false);
            return Err(Status::resource_exhausted(format!(
                "too many refused enrolments from {}; try again in a minute",
                remote.ip.map_or_else(|| "here".into(), |i| i.to_string())
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Enrolment for EnrolService {
    async fn enrol(&self, req: Request<EnrolRequest>) -> Result<Response<EnrolReply>, Status> {
        let remote = remote_of(&req);
        self.check_rate(&remote)?;
        let r = req.into_inner();
        let api = Arc::clone(&self.api);
        let this = self.clone();
        // SQLite and signing are blocking work.
        tokio::task::spawn_blocking(move || this.enrol_blocking(&api, &remote, r))
            .await
            .map_err(|e| Status::internal(format!("enrolment task failed: {e}")))?
    }

    async fn enrol_admin(
        &self,
        req: Request<EnrolAdminRequest>,
    ) -> Result<Response<EnrolAdminReply>, Status> {
        let remote = remote_of(&req);
        self.check_rate(&remote)?;
        let r = req.into_inner();
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.enrol_admin_blocking(&remote, r))
            .await
            .map_err(|e| Status::internal(format!("enrolment task failed: {e}")))?
    }
}

/// Random bits in an admin token (32 base32 characters).
pub const ADMIN_TOKEN_BITS: usize = 160;

/// A fresh admin token: 160 bits from the OS CSPRNG as 32 base32
/// characters (RFC 4648: no 0/1/8, so no O/I/B look-alikes to mistype) in
/// groups of four, e.g. `K7QD-M2XA-...`.
pub fn new_admin_token() -> Result<String, getrandom::Error> {
    let mut b = [0_u8; ADMIN_TOKEN_BITS / 8];
    getrandom::fill(&mut b)?;
    let text = data_encoding::BASE32_NOPAD.encode(&b);
    let groups: Vec<&str> = text
        .as_bytes()
        .chunks(4)
        .filter_map(|g| std::str::from_utf8(g).ok())
        .collect();
    Ok(groups.join("-"))
}

/// SHA-256 (hex) of an admin token as typed: case, spaces and dashes are
/// ignored, so `k7qd m2xa` and `K7QD-M2XA` are the same token.
pub fn admin_token_sha256(token: &str) -> String {
    let norm: String = token
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    hex(&Sha256::digest(norm.as_bytes()))
}

/// A time for an error message: RFC 3339 UTC, or the milliseconds.
fn time_text(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| format!("{ms} ms"), |t| t.to_string())
}

/// Compares two byte strings in time independent of where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

impl EnrolService {
    fn enrol_admin_blocking(
        &self,
        remote: &Remote,
        r: EnrolAdminRequest,
    ) -> Result<Response<EnrolAdminReply>, Status> {
        let api = &self.api;
        let refuse = |name: &str, s: Status| self.refused("admin", name, remote, s);
        if r.token.is_empty() || r.token.len() > MAX_TOKEN {
            return Err(refuse(
                &r.name,
                Status::invalid_argument(format!("field `token` must be 1 to {MAX_TOKEN} bytes")),
            ));
        }
        if r.csr_pem.is_empty() || r.csr_pem.len() > MAX_CSR {
            return Err(refuse(
                &r.name,
                Status::invalid_argument(format!("field `csr_pem` must be 1 to {MAX_CSR} bytes")),
            ));
        }
        let pending = api
            .store
            .pending_admin_token()
            .map_err(|e| Status::unavailable(format!("store: {e}")))?;
        let presented = admin_token_sha256(&r.token);
        // Compare against the pending token's hash, or against a dummy so a
        // missing token takes the same path.
        let stored = pending
            .as_ref()
            .map_or_else(|| "0".repeat(64), |t| t.token_sha256.clone());
        let matches = ct_eq(presented.as_bytes(), stored.as_bytes());
        let Some(token) = pending.filter(|_| matches) else {
            // A hash reveals nothing about other tokens: look it up plainly
            // to say why.
            let why = match api.store.admin_token_state(&presented) {
                Ok(Some(s)) if s == "used" => "this admin enrolment token was already used",
                Ok(Some(s)) if s == "superseded" => {
                    "this admin enrolment token was replaced by a newer one"
                }
                _ => "wrong admin enrolment token",
            };
            return Err(refuse(
                &r.name,
                Status::permission_denied(format!(
                    "{why} (make a new one on the appliance: `trustbind-appliance admin-token`)"
                )),
            ));
        };
        if token.expires_ms <= super::service::now_ms() {
            return Err(refuse(
                &r.name,
                Status::permission_denied(
                    "the admin enrolment token has expired (make a new one on the appliance: `trustbind-appliance admin-token`)",
                ),
            ));
        }
        let name = if r.name.is_empty() {
            token.name.clone()
        } else {
            r.name.clone()
        };
        if name != token.name {
            return Err(refuse(
                &name,
                Status::permission_denied(format!(
                    "this admin enrolment token is for admin `{}`, not `{name}`",
                    token.name
                )),
            ));
        }
        let issued = api.pki.issue_admin_csr(&name, &r.csr_pem).map_err(|e| {
            refuse(
                &name,
                Status::invalid_argument(format!("field `csr_pem`: {e}")),
            )
        })?;
        match api.store.use_admin_token(
            token.id,
            &name,
            &issued.serial,
            issued.expires_ms,
            &remote.text,
        ) {
            Ok(()) => {}
            Err(StoreError::Conflict(m)) => {
                return Err(refuse(&name, Status::permission_denied(m)));
            }
            Err(e) => return Err(Status::unavailable(format!("store: {e}"))),
        }
        crate::metrics::metrics().record_enrolment(true);
        Ok(Response::new(EnrolAdminReply {
            cert_pem: issued.cert_pem,
            ca_pem: api.pki.ca_pem().to_owned(),
        }))
    }
}

impl EnrolService {
    fn enrol_blocking(
        &self,
        api: &AgentApi,
        remote: &Remote,
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
        // The token is checked before anything is signed, so a caller
        // without it costs no signature.
        let token_sha = hex(&Sha256::digest(r.token.as_bytes()));
        let pending = api
            .store
            .pending_token(host)
            .map_err(|e| Status::unavailable(format!("store: {e}")))?;
        let stored = pending
            .as_ref()
            .map_or_else(|| "0".repeat(64), |(sha, _)| sha.clone());
        if !ct_eq(token_sha.as_bytes(), stored.as_bytes()) {
            return Err(self.refuse(
                host,
                remote,
                Status::permission_denied(format!("wrong enrolment token for host `{host}`")),
            ));
        }
        if let Some(exp) = pending
            .and_then(|(_, exp)| exp)
            .filter(|exp| *exp <= super::service::now_ms())
        {
            return Err(self.refuse(
                host,
                remote,
                Status::permission_denied(format!(
                    "field `token`: the enrolment token of host `{host}` expired at {} (make a new one: `trustbind host token {host}`)",
                    time_text(exp)
                )),
            ));
        }
        let issued = api.pki.issue_host(host, &r.csr_pem).map_err(|e| {
            self.refuse(
                host,
                remote,
                Status::invalid_argument(format!("field `csr_pem`: {e}")),
            )
        })?;
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
