//! The `Enrolment` service (enrol port): one-time token + CSR -> host
//! certificate (`Enrol`), or admin certificate (`EnrolAdmin`).
//!
//! Both calls refuse in the same style (a status naming the field or the
//! reason, an audit row `host.enrol.refused` / `admin.enrol.refused` with
//! the remote address) and share one limit on refusals per remote address
//! ([`MAX_REFUSALS`] per [`REFUSAL_WINDOW`]); past it, calls from that
//! address are refused with RESOURCE_EXHAUSTED before any token is looked
//! at, so tokens cannot be guessed at line rate.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::pb::enrolment_server::Enrolment;
use super::pb::{EnrolAdminReply, EnrolAdminRequest, EnrolReply, EnrolRequest};
use super::tls::ConnInfo;
use super::AgentApi;
use crate::ratelimit::{AddrKey, KeyedLimiter, Rate};
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
/// Addresses (IPv4, IPv6 /64) tracked one by one by the refusal limit.
const MAX_TRACKED: usize = 4096;
/// Refused enrolments from all addresses together per [`REFUSAL_WINDOW`].
pub const MAX_REFUSALS_TOTAL: u32 = 600;
/// Characters of an invalid host or admin name kept in messages and the
/// audit log.
const SHOWN_NAME: usize = 64;

/// Refusals per remote address (IPv4, or IPv6 /64: [`AddrKey`]) and in
/// all: token buckets of [`MAX_REFUSALS`] per [`REFUSAL_WINDOW`] per
/// address, [`MAX_TRACKED`] addresses (busy newcomers beyond share one
/// bucket), and [`MAX_REFUSALS_TOTAL`] per window for every address
/// together, which bounds the refusal rows written to the audit log.
#[derive(Debug)]
struct Refusals {
    by_addr: KeyedLimiter<AddrKey>,
    total: KeyedLimiter<()>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            by_addr: KeyedLimiter::new(
                Rate::per(MAX_REFUSALS, REFUSAL_WINDOW),
                MAX_TRACKED,
                Rate::per(MAX_REFUSALS * 5, REFUSAL_WINDOW),
            ),
            total: KeyedLimiter::new(
                Rate::per(MAX_REFUSALS_TOTAL, REFUSAL_WINDOW),
                1,
                Rate::per(MAX_REFUSALS_TOTAL, REFUSAL_WINDOW),
            ),
        }
    }
}

impl Refusals {
    /// Whether `ip` (or everyone) is past its refusals for now.
    fn blocked(&self, ip: Option<IpAddr>) -> bool {
        let addr_ok = ip.is_none_or(|ip| self.by_addr.would_allow(&AddrKey::of(ip), 1.0));
        !(addr_ok && self.total.would_allow(&(), 1.0))
    }

    fn count(&self, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            let _ = self.by_addr.check(&AddrKey::of(ip), 1.0);
        }
        let _ = self.total.check(&(), 1.0);
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
        let name = shown_name(name);
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
            crate::metrics::metrics().record_refused("enrol_rate");
            return Err(Status::resource_exhausted(format!(
                "too many refused enrolments from {} (or from everywhere); try again in a minute",
                remote
                    .ip
                    .map_or_else(|| "here".into(), |i| AddrKey::of(i).to_string())
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

/// A name as kept in a refusal: a valid one whole, anything else cut to
/// [`SHOWN_NAME`] characters with `...`.
fn shown_name(name: &str) -> String {
    if crate::pki::check_name(name).is_ok() {
        return name.to_owned();
    }
    let mut s: String = name.chars().take(SHOWN_NAME).collect();
    if s.len() < name.len() {
        s.push_str("...");
    }
    s.escape_debug().to_string()
}

/// Refuses a host or admin name that no certificate could carry, naming
/// the field and showing at most [`SHOWN_NAME`] characters of it.
fn check_name_field(field: &str, name: &str) -> Result<(), Status> {
    crate::pki::check_name(name).map_err(|e| {
        let why = match e {
            crate::pki::PkiError::Name { why, .. } => why,
            e => e.to_string(),
        };
        Status::invalid_argument(format!(
            "field `{field}` `{}` ({} bytes) is not a name: {why}",
            shown_name(name),
            name.len()
        ))
    })
}

/// Random bits in an admin token (32 base32 characters).
pub const ADMIN_TOKEN_BITS: usize = 160;

/// A fresh admin token: 160 bits from the OS CSPRNG as 32 base32
/// characters (RFC 4648: no 0/1/8, so no O/I/B look-alikes to mistype) in
/// groups of four, e.g. `K7QD-M2XA-...`.
pub fn new_admin_token() -> Result<String, getrandom::Error> {
    let mut b = [0_u8; ADMIN_TOKEN_BITS / 8];
    getrandom::getrandom(&mut b)?;
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
        if !r.name.is_empty() {
            if let Err(st) = check_name_field("name", &r.name) {
                return Err(refuse(&r.name, st));
            }
        }
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
        let auth = crate::casign::Authorisation::AdminToken {
            token_sha256: token.token_sha256.clone(),
        };
        let issued = api
            .pki
            .issue_admin_csr(&name, &r.csr_pem, auth)
            .map_err(|e| refuse(&name, super::not_issued(&e)))?;
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
        if let Err(st) = check_name_field("host", host) {
            return Err(self.refuse(host, remote, st));
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
        let issued = api
            .pki
            .issue_host(host, &r.csr_pem)
            .map_err(|e| self.refuse(host, remote, super::not_issued(&e)))?;
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
            authority: api.pki.authority().public().to_vec(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ipv6_64_is_one_address_for_the_refusal_limit() {
        let r = Refusals::default();
        for i in 0..MAX_REFUSALS {
            let ip: IpAddr = format!("2001:db8:7:7::{:x}", i + 1).parse().unwrap();
            assert!(!r.blocked(Some(ip)));
            r.count(Some(ip));
        }
        // Any other address of that /64 is refused now; another /64 is not.
        assert!(r.blocked(Some("2001:db8:7:7:abcd::1".parse().unwrap())));
        assert!(!r.blocked(Some("2001:db8:7:8::1".parse().unwrap())));
    }

    #[test]
    fn spraying_addresses_is_still_limited_past_the_table() {
        let r = Refusals::default();
        let mut admitted = 0_u32;
        for i in 0..20_000_u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if !r.blocked(Some(ip)) {
                r.count(Some(ip));
                admitted += 1;
            }
        }
        // The old limiter stopped counting after 4,096 addresses and let
        // all 20,000 through.
        assert!(admitted <= MAX_REFUSALS_TOTAL, "{admitted}");
        assert!(r.blocked(Some("192.0.2.1".parse().unwrap())));
    }

    #[test]
    fn invalid_names_are_cut_in_messages() {
        let long = "x".repeat(100_000);
        let st = check_name_field("host", &long).unwrap_err();
        assert!(st.message().len() < 300, "{}", st.message().len());
        assert!(st.message().contains("field `host`"));
        assert!(st.message().contains("100000 bytes"));
        assert_eq!(shown_name("web1.example"), "web1.example");
        assert!(shown_name("a\nb").contains("\\n"));
    }
}
