//! Admin identity: which admin certificates are valid and what each may do.
//!
//! Every admin certificate the appliance issues is recorded in the store
//! with a role (`admin` or `read-only`). The admin port's TLS verifier
//! accepts only recorded, unrevoked, unexpired certificates
//! ([`AdminCerts`]), and [`authorize`] checks again on every request, so a
//! revocation also ends what an open connection may do. A `read-only`
//! admin may read (GET, HEAD), validate a policy, ask `POST /v1/explain`
//! and renew its own certificate; anything else is refused with 403
//! `forbidden`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{unauthenticated, Actor, AdminIdentity, AdminState, ApiError, ApiJson, ApiPath, Role};
use crate::agent_api::enrol::{admin_token_sha256, new_admin_token};
use crate::pki::CertAllowlist;
use crate::store::{now_ms, AdminRole, Store, StoreError, DEFAULT_TOKEN_TTL_MS, MAX_TOKEN_TTL_MS};

/// Longest CSR accepted by `POST /v1/admins/renew`, in bytes.
const MAX_CSR: usize = 16 * 1024;

/// The admin port's allowlist: the store's admin certificates that are
/// neither revoked nor expired. Consulted at every handshake.
#[derive(Debug)]
pub struct AdminCerts {
    store: Arc<Store>,
}

impl AdminCerts {
    /// The allowlist over `store`.
    pub fn new(store: Arc<Store>) -> Arc<Self> {
        Arc::new(Self { store })
    }
}

impl CertAllowlist for AdminCerts {
    fn allowed(&self, name: &str, serial: &str) -> bool {
        // A store failure refuses (fail closed).
        matches!(self.store.admin_cert(serial), Ok(Some(c)) if c.valid_for(name, now_ms()))
    }
}

/// Records an admin certificate issued outside a token (`trustbind-appliance
/// admin-cert`, or `Pki::issue_admin` in tests) so the admin port accepts
/// it with `role`, audited `admin.cert.issue` as `actor`. Returns its serial.
pub fn register_admin_cert(
    store: &Store,
    cert_pem: &str,
    role: AdminRole,
    actor: &str,
) -> Result<String, StoreError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |why: &str| StoreError::Invalid {
        what: "admin certificate",
        why: why.into(),
    };
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|_| bad("not a PEM certificate"))?;
    let peer = crate::pki::peer_cert(der.as_ref())
        .filter(|p| p.kind == crate::pki::CertKind::Admin)
        .ok_or_else(|| bad("not a Trustbind admin certificate"))?;
    let expires = crate::pki::not_after_ms(der.as_ref()).ok_or_else(|| bad("no notAfter"))?;
    store.add_admin_cert(&peer.name, &peer.serial, role, expires, actor)?;
    Ok(peer.serial)
}

/// What a `read-only` admin may call: reads, policy validation, asking
/// what the policy would answer (`POST /v1/explain`), and the renewal of
/// its own certificate.
fn read_only_may(method: &Method, path: &str) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
        || (*method == Method::POST
            && matches!(
                path,
                "/v1/policies/validate" | "/v1/explain" | "/v1/admins/renew"
            ))
}

/// Middleware in front of every endpoint: the request's admin certificate
/// must be recorded, unrevoked and unexpired now (so a certificate revoked
/// while its connection is open is refused from the next request on), and
/// its role must allow the call. Sets the [`Role`] extension.
pub async fn authorize(State(st): State<AdminState>, mut req: Request, next: Next) -> Response {
    let Some(id) = AdminIdentity::of(req.extensions()) else {
        return unauthenticated().into_response();
    };
    let serial = id.serial.clone();
    let cert = match st.run(move |s| Ok(s.admin_cert(&serial)?)).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let now = now_ms();
    let refused = |why: String| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            format!("admin certificate {} of `{}` {why}", id.serial, id.cn),
        )
        .into_response()
    };
    let cert = match cert {
        None => return refused("is not known to this appliance".into()),
        Some(c) if c.name != id.cn => return refused(format!("was issued to `{}`", c.name)),
        Some(c) if c.revoked_ms.is_some() => {
            return refused(format!(
                "was revoked at {} ms by {}",
                c.revoked_ms.unwrap_or_default(),
                c.revoked_by.as_deref().unwrap_or("?")
            ))
        }
        Some(c) if now >= c.expires_ms => {
            return refused(format!("expired at {} ms", c.expires_ms))
        }
        Some(c) => c,
    };
    if cert.role == AdminRole::ReadOnly && !read_only_may(req.method(), req.uri().path()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "admin `{}` has role read-only; {} {} needs role admin",
                id.cn,
                req.method(),
                req.uri().path()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(Role(cert.role));
    next.run(req).await
}

/// A serial as given in a path: 1 to 40 hex digits, lower-cased.
fn serial_arg(s: &str) -> Result<String, ApiError> {
    let l = s.to_ascii_lowercase();
    if (1..=40).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(l)
    } else {
        Err(ApiError::invalid(
            "serial",
            format!(
                "`serial` {} is not a certificate serial (1 to 40 hex digits)",
                super::shown(s)
            ),
        ))
    }
}

pub(super) async fn list(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    st.run(|s| Ok(Json(json!({ "admins": s.admin_certs()? }))))
        .await
}

pub(super) async fn revoke(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(serial): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let serial = serial_arg(&serial)?;
    st.run(move |s| {
        Ok(Json(
            json!({ "admin": s.revoke_admin_cert(&serial, &actor.0)? }),
        ))
    })
    .await
}

/// Body of `POST /v1/admins/renew`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RenewIn {
    csr_pem: String,
}

/// Issues a new certificate for the calling admin (same name and role) from
/// its CSR and revokes the one the request came with.
pub(super) async fn renew(
    State(st): State<AdminState>,
    actor: Actor,
    req_parts: axum::http::Extensions,
    ApiJson(body): ApiJson<RenewIn>,
) -> Result<Json<Value>, ApiError> {
    let id = AdminIdentity::of(&req_parts).ok_or_else(unauthenticated)?;
    if body.csr_pem.is_empty() || body.csr_pem.len() > MAX_CSR {
        return Err(ApiError::invalid(
            "csr_pem",
            format!("`csr_pem` must be 1 to {MAX_CSR} bytes"),
        ));
    }
    let pki = st.pki.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this appliance serves the admin API without its CA",
        )
    })?;
    st.run(move |s| {
        let issued = pki
            .issue_admin_csr(
                &id.cn,
                &body.csr_pem,
                crate::casign::Authorisation::AdminRenewal {
                    old_serial: id.serial.clone(),
                },
            )
            .map_err(|e| match e {
                crate::pki::PkiError::SignerUnavailable(_) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                ),
                e => ApiError::invalid("csr_pem", format!("`csr_pem`: {e}")),
            })?;
        let cert = s.renew_admin_cert(&id.serial, &issued.serial, issued.expires_ms, &actor.0)?;
        Ok(Json(json!({
            "cert_pem": issued.cert_pem,
            "ca_pem": pki.ca_pem(),
            "admin": cert,
        })))
    })
    .await
}

/// Body of `POST /v1/admins/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenIn {
    name: String,
    role: Option<AdminRole>,
    ttl_s: Option<i64>,
}

/// Seconds → milliseconds for a token lifetime (`field`), default 24 h, at
/// most 366 days.
pub(super) fn ttl_ms(field: &str, ttl_s: Option<i64>) -> Result<i64, ApiError> {
    let Some(s) = ttl_s else {
        return Ok(DEFAULT_TOKEN_TTL_MS);
    };
    let max_s = MAX_TOKEN_TTL_MS / 1000;
    if (1..=max_s).contains(&s) {
        Ok(s * 1000)
    } else {
        Err(ApiError::invalid(
            field,
            format!("`{field}` {s} is out of range 1..={max_s} seconds (366 days)"),
        ))
    }
}

/// A one-time admin enrolment token for `name` with `role` (default
/// `admin`), superseding any pending one; for `trustbind admin enrol`.
pub(super) async fn create_token(
    State(st): State<AdminState>,
    actor: Actor,
    ApiJson(body): ApiJson<TokenIn>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    crate::pki::check_name(&body.name).map_err(|e| ApiError::invalid("name", e.to_string()))?;
    let ttl = ttl_ms("ttl_s", body.ttl_s)?;
    let role = body.role.unwrap_or(AdminRole::Admin);
    let token = new_admin_token()
        .map_err(|e| ApiError::internal(format!("OS random number generator failed: {e}")))?;
    let hash = admin_token_sha256(&token);
    let name = body.name.clone();
    let made = st
        .run(move |s| Ok(s.create_admin_token_as(&name, role, &hash, ttl, false, &actor.0)?))
        .await?
        .ok_or_else(|| ApiError::internal("admin token not created"))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": token,
            "name": made.name,
            "role": made.role,
            "expires_ms": made.expires_ms,
            "ca_fingerprint": st.ca_fingerprint,
        })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_may_read_validate_and_renew_only() {
        assert!(read_only_may(&Method::GET, "/v1/hosts"));
        assert!(read_only_may(&Method::GET, "/metrics"));
        assert!(read_only_may(&Method::POST, "/v1/policies/validate"));
        assert!(read_only_may(&Method::POST, "/v1/admins/renew"));
        assert!(read_only_may(&Method::POST, "/v1/explain"));
        assert!(!read_only_may(&Method::POST, "/v1/policies"));
        assert!(!read_only_may(&Method::PUT, "/v1/limits"));
        assert!(!read_only_may(&Method::DELETE, "/v1/signatures/00"));
        assert!(!read_only_may(&Method::POST, "/v1/admins/00/revoke"));
    }

    #[test]
    fn token_lifetimes() {
        assert_eq!(ttl_ms("ttl_s", None).unwrap(), DEFAULT_TOKEN_TTL_MS);
        assert_eq!(ttl_ms("ttl_s", Some(60)).unwrap(), 60_000);
        assert!(ttl_ms("ttl_s", Some(0)).is_err());
        assert!(ttl_ms("ttl_s", Some(400 * 86_400)).is_err());
    }
}
