//! `Agent.SignBundle`: the agent's offline bundle, re-decided under the
//! current policy and signed by the appliance.
//!
//! The agent sends the (program SHA-256, user) pairs it remembers; each is
//! decided again as an exec by that user on that host now (the decider's
//! [`super::Decider::redecide`]: no license is charged, nothing is audited
//! per pair), and only pairs whose verdict is kernel-cacheable (it depends
//! on nothing but host, program and user) and ALLOW or DENY outright enter
//! the payload, with the policy's verdict whatever the host's mode (a
//! permissive would-deny is DENY; a disabled host gets an empty bundle). The payload is a `BundlePayload` (agent.proto, the one
//! definition) encoded by prost: fields in number order, entries sorted
//! and de-duplicated, so one content has one encoding. It is signed with
//! the server key (ECDSA P-256, SHA-256): that key already is the
//! appliance's CA-issued identity the agent checks on every connection,
//! rotates with `rotate-server-cert`, and needs nothing new stored or
//! backed up; a payload starts with byte 0x08, never with the 64 spaces
//! every TLS 1.3 signature covers, so the two uses cannot be confused.

use std::time::Duration;

use prost::Message as _;
use tonic::Status;

use super::pb::{self, BundlePayload, BundleRequest, BundleVerdict, SignedBundle};
use super::AgentApi;
use crate::policy::Verdict;
use crate::request::{Action, Program, QualifyRequest, Subject, Target};
use crate::store::{hex, AuditEvent, Mode};

/// Most entries in one `SignBundle` request.
pub const MAX_BUNDLE_ENTRIES: usize = 4096;
/// Longest user name accepted in an entry, in bytes.
const MAX_USER: usize = 256;
/// How long a signed bundle may be used.
pub const BUNDLE_TTL: Duration = Duration::from_secs(24 * 3600);
/// `BundlePayload.version` of this build.
pub const BUNDLE_VERSION: u32 = 1;

/// "Unset" for the subject's numeric ids (as the kernel sends it).
const UNSET: u32 = u32::MAX;

/// Checks the request's shape: INVALID_ARGUMENT naming the field.
pub fn check(req: &BundleRequest) -> Result<(), Status> {
    let n = req.entries.len();
    if n > MAX_BUNDLE_ENTRIES {
        return Err(Status::invalid_argument(format!(
            "entries: {n} in one request, at most {MAX_BUNDLE_ENTRIES}"
        )));
    }
    for (i, e) in req.entries.iter().enumerate() {
        if e.sha256.len() != 32 {
            return Err(Status::invalid_argument(format!(
                "entries[{i}].sha256: expected 32 bytes, got {}",
                e.sha256.len()
            )));
        }
        if e.user.is_empty() || e.user.len() > MAX_USER {
            return Err(Status::invalid_argument(format!(
                "entries[{i}].user: must be 1 to {MAX_USER} bytes"
            )));
        }
    }
    Ok(())
}

/// The exec request a bundle entry stands for.
fn exec_request(host: &str, sha256: &[u8], user: &str, at_ms: i64) -> QualifyRequest {
    QualifyRequest {
        host: host.to_owned(),
        action: Action::Exec,
        subject: Subject {
            user: user.to_owned(),
            uid: UNSET,
            euid: UNSET,
            gid: UNSET,
            loginuid: UNSET,
            session: UNSET,
            pid: 0,
            ancestry: Vec::new(),
        },
        program: Program {
            sha256: hex(sha256),
            sha1: String::new(),
            size: 0,
            path: String::new(),
        },
        target: Target::Exec {
            loader_direct: false,
        },
        at_ms,
        peer: None,
    }
}

/// Re-decides `req`'s entries for `host` and signs the result; returns the
/// bundle and its audit event. Blocking (decisions, signing).
pub fn sign(
    api: &AgentApi,
    host: &str,
    req: &BundleRequest,
    now_ms: i64,
    deadline: std::time::Instant,
    gone: &super::service::Gone,
) -> Result<(SignedBundle, AuditEvent), Status> {
    let mut entries: Vec<(Vec<u8>, String)> = req
        .entries
        .iter()
        .map(|e| (e.sha256.clone(), e.user.clone()))
        .collect();
    entries.sort();
    entries.dedup();
    let mut generation = api.store.generation_hint();
    let mut out = Vec::with_capacity(entries.len());
    // A disabled host's answers say nothing about the policy: sign an empty
    // bundle (moving the host to another mode moves the generation, and the
    // agent asks again).
    let disabled = api
        .host_mode(host)
        .map_err(|e| Status::unavailable(format!("store: {e}")))?
        == Mode::Disabled;
    if disabled {
        entries.clear();
    }
    for (i, (sha, user)) in entries.iter().enumerate() {
        // Work whose caller has gone (or whose deadline passed) stops.
        super::service::stop(gone, deadline, i, entries.len())?;
        let a = api
            .decider
            .redecide(&exec_request(host, sha, user, now_ms))
            .map_err(|e| Status::unavailable(format!("no decision for entry {i}: {e}")))?;
        generation = a.generation;
        // The policy's verdict, whatever the mode: a permissive host's
        // would-deny is a DENY in the bundle (its kernel lets it run in
        // permissive mode; it must not run if the host is enforcing later).
        let verdict = match a.outcome.verdict {
            _ if a.outcome.would_deny => pb::Verdict::Deny,
            Verdict::Allow => pb::Verdict::Allow,
            Verdict::Deny => pb::Verdict::Deny,
            Verdict::AllowWithConditions { .. } => continue,
        };
        if !a.cacheable {
            continue;
        }
        out.push(BundleVerdict {
            sha256: sha.clone(),
            user: user.clone(),
            verdict: verdict as i32,
        });
    }
    let ttl = i64::try_from(BUNDLE_TTL.as_millis()).unwrap_or(i64::MAX);
    let payload = BundlePayload {
        version: BUNDLE_VERSION,
        host: host.to_owned(),
        generation,
        issued_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(ttl),
        entries: out,
    };
    let bytes = payload.encode_to_vec();
    let (signature, signer_cert_pem) = api
        .pki
        .sign_with_server_key(&bytes)
        .map_err(|e| Status::internal(format!("cannot sign the bundle: {e}")))?;
    let ev = AuditEvent::new(
        "bundle.sign",
        host,
        serde_json::json!({
            "asked": req.entries.len(),
            "signed": payload.entries.len(),
            "generation": generation,
            "expires_at_ms": payload.expires_at_ms,
        }),
    );
    Ok((
        SignedBundle {
            payload: bytes,
            signature,
            signer_cert_pem,
        },
        ev,
    ))
}
