//! The admin API: HTTPS + JSON for the `trustbind` CLI (and a later web
//! console), authenticated by an admin client certificate.
//!
//! [`router`] builds the axum router over an [`AdminState`]; [`serve`]
//! runs it on a TLS listener and hands each request the verified admin
//! identity (the client certificate's CN) as an [`AdminIdentity`]
//! extension. Every mutation is audited with actor `admin:<cn>` in the same
//! transaction as the change. Endpoints are documented in `appliance/API.md`.

mod admins;
mod audit;
mod channels;
mod error;
mod explain;
mod files;
mod hosts;
mod learn;
mod limits;
mod policies;
mod signatures;
mod tls;
mod users;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::Router;

pub use admins::{authorize, register_admin_cert, AdminCerts};
pub use error::{parse_json, ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
pub use hosts::token_sha256;
pub use policies::{check_policy, PolicyDiagnostic};
pub use tls::{peer_admin, peer_admin_name, serve, serve_limited};
pub use trustbind_policy::wire::{MAX_BATCH, MAX_BODY, PAGE_DEFAULT, PAGE_MAX};

use crate::store::{AdminRole, Store};

/// Something that may change verdicts happened; the owner of the engine and
/// the agent streams reacts (reload, push the new generation, drop a host).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// The governing policy switched (activate or rollback).
    Policy {
        /// The new generation.
        generation: i64,
    },
    /// Signatures or reference-group membership changed.
    Signatures,
    /// A host group was created, deleted or changed mode.
    HostGroups,
    /// A host was revoked and must be disconnected.
    HostRevoked {
        /// Its name.
        host: String,
    },
    /// A user's roles were set, or a user removed.
    Users,
    /// A license limit was set, changed or removed.
    Limits,
    /// A protected file set was created, changed or deleted.
    FileSets,
}

/// Callback run after a change has been committed. It runs on the request's
/// task, so it must not block (send on a channel, set a flag).
pub type ChangeHook = Arc<dyn Fn(&Change) + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The store.
    pub store: Arc<Store>,
    /// Called after each committed change that can affect verdicts.
    pub on_change: ChangeHook,
    /// License limits, when this appliance enforces them (the limit
    /// endpoints answer 503 without).
    pub limits: Option<Arc<crate::limits::Limits>>,
    /// SHA-256 of the CA certificate, returned with enrolment tokens so the
    /// agent can pin the CA on first contact.
    pub ca_fingerprint: Option<String>,
    /// The CA, for renewing admin certificates (`POST /v1/admins/renew`
    /// answers 503 without).
    pub pki: Option<Arc<crate::pki::Pki>>,
    /// The policy engine the decision path uses, for the explain endpoints
    /// (they answer 503 without).
    pub engine: Option<Arc<crate::policy::engine::Engine>>,
    /// The data directory holding the audit seal state
    /// (`crate::audit_seal`), for `POST /v1/audit/seal` and
    /// `/v1/audit/seal/setup` (they answer 503 without).
    pub seal_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// State over `store` with a change hook that does nothing.
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            on_change: Arc::new(|_| {}),
            limits: None,
            ca_fingerprint: None,
            pki: None,
            engine: None,
            seal_dir: None,
        }
    }

    /// Seals the audit log on request, with the state in `dir` (the data
    /// directory).
    pub fn with_seal_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.seal_dir = Some(dir);
        self
    }

    /// Issues renewed admin certificates with `pki`.
    pub fn with_pki(mut self, pki: Arc<crate::pki::Pki>) -> Self {
        self.pki = Some(pki);
        self
    }

    /// Serves the explain endpoints from `engine` (the decision path's).
    pub fn with_engine(mut self, engine: Arc<crate::policy::engine::Engine>) -> Self {
        self.engine = Some(engine);
        self
    }

    /// Replaces the change hook.
    pub fn with_hook(mut self, hook: ChangeHook) -> Self {
        self.on_change = hook;
        self
    }

    /// Serves the limit endpoints from `limits` (the same instance the
    /// decision path checks).
    pub fn with_limits(mut self, limits: Arc<crate::limits::Limits>) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Returns `fingerprint` (`Pki::fingerprint`) with each enrolment token.
    pub fn with_ca_fingerprint(mut self, fingerprint: String) -> Self {
        self.ca_fingerprint = Some(fingerprint);
        self
    }

    fn changed(&self, c: Change) {
        (self.on_change)(&c);
    }

    /// Runs blocking store work off the async workers.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| ApiError::internal(format!("store task failed: {e}")))?
    }
}

/// The verified identity of the admin on the other end of the connection,
/// inserted as a request extension by [`serve`] (or by any other TLS layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminIdentity {
    /// Common name of the admin client certificate.
    pub cn: String,
    /// Its serial (lower-case hex): checked against the store's admin
    /// certificates (not revoked, role) on every request.
    pub serial: String,
}

impl AdminIdentity {
    /// The identity in a request: an [`AdminIdentity`] extension (set by
    /// [`serve`]) or an admin peer in the agent API's `ConnInfo` (set by
    /// `agent_api::tls::serve_https`).
    fn of(parts: &axum::http::Extensions) -> Option<Self> {
        if let Some(id) = parts.get::<Self>() {
            return Some(id.clone());
        }
        let peer = parts
            .get::<crate::agent_api::tls::ConnInfo>()?
            .peer
            .as_ref()?;
        (peer.kind == crate::pki::CertKind::Admin).then(|| Self {
            cn: peer.name.clone(),
            serial: peer.serial.clone(),
        })
    }
}

/// The role of the admin making the request, a request extension set by
/// [`authorize`] once the certificate was found valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role(pub AdminRole);

/// Extractor: the audit actor, `admin:<cn>`, from an [`AdminIdentity`]
/// (set by [`serve`]) or an admin peer in the agent API's `ConnInfo` (set by
/// `agent_api::tls::serve_https`). Refuses (401) any other request.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        AdminIdentity::of(&parts.extensions)
            .map(|id| Actor(format!("admin:{}", id.cn)))
            .ok_or_else(unauthenticated)
    }
}

fn unauthenticated() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "no verified admin client certificate on this connection",
    )
}

/// Builds the admin router. All endpoints but `/metrics` are under `/v1`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(audit::metrics))
        .route("/v1/status", get(audit::status))
        .route("/v1/policies", get(policies::list).post(policies::upload))
        .route("/v1/policies/validate", post(policies::validate))
        .route("/v1/policies/active", get(policies::active))
        .route("/v1/policies/rollback", post(policies::rollback))
        .route("/v1/policies/{id}", get(policies::show))
        .route("/v1/policies/{id}/diff", get(policies::diff))
        .route("/v1/policies/{id}/activate", post(policies::activate))
        .route(
            "/v1/signatures",
            get(signatures::list).post(signatures::add_batch),
        )
        .route("/v1/signatures/remove", post(signatures::remove_batch))
        .route(
            "/v1/signatures/{sha256}",
            get(signatures::show).delete(signatures::remove_one),
        )
        .route(
            "/v1/groups",
            get(signatures::list_groups).post(signatures::create_group),
        )
        .route(
            "/v1/groups/{name}",
            get(signatures::show_group).delete(signatures::delete_group),
        )
        .route("/v1/groups/{name}/members", post(signatures::add_members))
        .route(
            "/v1/groups/{name}/members/remove",
            post(signatures::remove_members),
        )
        .route("/v1/host-groups", get(hosts::list_groups))
        .route(
            "/v1/host-groups/{name}",
            put(hosts::set_group).delete(hosts::delete_group),
        )
        .route("/v1/hosts", get(hosts::list).post(hosts::create))
        .route("/v1/hosts/{name}", get(hosts::show))
        .route("/v1/hosts/{name}/revoke", post(hosts::revoke))
        .route("/v1/hosts/{name}/addresses", put(hosts::set_addresses))
        .route("/v1/file-sets", get(files::list))
        .route(
            "/v1/file-sets/{name}",
            get(files::show).put(files::set).delete(files::delete),
        )
        .route("/v1/file-sets/{name}/paths", post(files::add))
        .route("/v1/file-sets/{name}/paths/remove", post(files::remove))
        .route("/v1/users", get(users::list))
        .route(
            "/v1/users/{name}",
            get(users::show).put(users::set_roles).delete(users::delete),
        )
        .route("/v1/roles", get(users::roles))
        .route("/v1/limits", get(limits::list).put(limits::set))
        .route("/v1/limits/{id}", get(limits::show).delete(limits::remove))
        .route("/v1/channels", get(channels::list))
        .route("/v1/learn", get(learn::list))
        .route("/v1/learn/approve", post(learn::approve))
        .route("/v1/learn/forget", post(learn::forget))
        .route("/v1/explain", post(explain::ask))
        .route("/v1/explain/{seq}", get(explain::recorded))
        .route("/v1/audit", get(audit::tail))
        .route("/v1/audit/export", get(audit::export))
        .route("/v1/audit/verify", get(audit::verify))
        .route("/v1/audit/seal", post(audit::seal))
        .route("/v1/audit/seal/setup", post(audit::seal_setup))
        .route("/v1/admins", get(admins::list))
        .route("/v1/admins/tokens", post(admins::create_token))
        .route("/v1/admins/renew", post(admins::renew))
        .route("/v1/admins/{serial}/revoke", post(admins::revoke))
        .route("/v1/hosts/{name}/token", post(hosts::retoken))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admins::authorize,
        ))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint `{}`", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("`{}` does not accept {method}", uri.path()),
    )
}

/// Page size from a query parameter: default [`PAGE_DEFAULT`], 1..=[`PAGE_MAX`].
fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(PAGE_DEFAULT),
        Some(n) if (1..=PAGE_MAX).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(
            "limit",
            format!("limit {n} is out of range 1..={PAGE_MAX}"),
        )),
    }
}

/// Checks a group or host-group name: 1..=128 characters, no control
/// characters, no surrounding white space.
fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    check_text(field, name)?;
    let n = name.chars().count();
    if n == 0 || n > 128 {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` must be 1 to 128 characters long"),
        ));
    }
    if name.trim() != name {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` {} has surrounding spaces", shown(name)),
        ));
    }
    Ok(())
}

/// Normalises a SHA-256 given by a client: lower-cases it and checks it is 64 hex digits.
fn sha256_arg(field: &str, s: &str) -> Result<String, ApiError> {
    let l = s.to_ascii_lowercase();
    if l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(l)
    } else {
        Err(ApiError::invalid(
            field,
            format!("`{field}` {} is not a SHA-256 (64 hex digits)", shown(s)),
        ))
    }
}

/// Refuses control characters in a client-given text.
fn check_text(field: &str, s: &str) -> Result<(), ApiError> {
    if s.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` {} contains control characters", shown(s)),
        ));
    }
    Ok(())
}

/// A client-given value quoted for an error message, cut to 80 characters.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    format!("`{}`", out.escape_debug())
}
