//! Policy endpoints: list, show, validate, upload a draft, diff, activate,
//! roll back. Texts are validated against `policies/trustbind.cedarschema`
//! in strict mode; problems come back as diagnostics with line and column.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
pub use trustbind_policy::check::PolicyDiagnostic;

use super::{check_text, Actor, AdminState, ApiError, ApiJson, ApiPath, ApiQuery, Change};
use crate::store::{hex, PolicyState};

/// [`trustbind_policy::check::check_policy`], its failure (the built-in
/// schema does not parse) an internal error.
pub fn check_policy(text: &str) -> Result<Result<usize, Vec<PolicyDiagnostic>>, ApiError> {
    trustbind_policy::check::check_policy(text).map_err(|e| ApiError::internal(e.to_string()))
}

fn invalid_policy(diags: Vec<PolicyDiagnostic>) -> ApiError {
    let first = diags
        .first()
        .map_or_else(String::new, |d| match (d.line, d.column) {
            (Some(l), Some(c)) => format!("{l}:{c}: {}", d.message),
            _ => d.message.clone(),
        });
    let n = diags.len();
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_policy",
        format!("policy text has {n} problem(s); first at {first}"),
    )
    .with_field("text")
    .with_details(serde_json::to_value(diags).unwrap_or(Value::Null))
}

/// Body of `POST /v1/policies` and `POST /v1/policies/validate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyIn {
    text: String,
    #[serde(default)]
    comment: String,
}

pub(super) async fn list(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    st.run(|s| {
        let policies = s.list_policies()?;
        let governing = s.governing()?;
        Ok(Json(
            json!({ "policies": policies, "governing": governing }),
        ))
    })
    .await
}

fn show_json(s: &crate::store::Store, id: i64) -> Result<Json<Value>, ApiError> {
    let Some(p) = s.policy(id)? else {
        return Err(ApiError::not_found(format!("no policy version {id}")));
    };
    let info = s.policy_info(id)?;
    Ok(Json(json!({
        "id": p.id,
        "sha256": p.sha256,
        "state": p.state,
        "created_ms": info.as_ref().map(|i| i.created_ms),
        "comment": info.map(|i| i.comment),
        "text": p.text,
    })))
}

pub(super) async fn show(
    State(st): State<AdminState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    st.run(move |s| show_json(s, id)).await
}

pub(super) async fn active(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    st.run(|s| match s.governing()?.active {
        Some(id) => show_json(s, id),
        None => Err(ApiError::not_found(
            "no policy is active (every request is denied by default)",
        )),
    })
    .await
}

pub(super) async fn validate(ApiJson(body): ApiJson<PolicyIn>) -> Result<Json<Value>, ApiError> {
    match check_policy(&body.text)? {
        Ok(n) => Ok(Json(json!({
            "ok": true,
            "policies": n,
            "sha256": hex(&Sha256::digest(body.text.as_bytes())),
        }))),
        Err(diags) => Err(invalid_policy(diags)),
    }
}

pub(super) async fn upload(
    State(st): State<AdminState>,
    actor: Actor,
    ApiJson(body): ApiJson<PolicyIn>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_text("comment", &body.comment)?;
    let n = match check_policy(&body.text)? {
        Ok(n) => n,
        Err(diags) => return Err(invalid_policy(diags)),
    };
    let sha = hex(&Sha256::digest(body.text.as_bytes()));
    let id = st
        .run(move |s| Ok(s.create_policy_draft(&body.text, &body.comment, &actor.0)?))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "sha256": sha, "state": PolicyState::Draft, "policies": n })),
    ))
}

/// Query of `GET /v1/policies/{id}/diff`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiffQuery {
    /// Version to compare with; the active one when absent.
    against: Option<i64>,
}

pub(super) async fn diff(
    State(st): State<AdminState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<DiffQuery>,
) -> Result<Json<Value>, ApiError> {
    st.run(move |s| {
        let Some(to) = s.policy(id)? else {
            return Err(ApiError::not_found(format!("no policy version {id}")));
        };
        let from_id = match q.against {
            Some(a) => Some(a),
            None => s.governing()?.active,
        };
        let from = match from_id {
            Some(f) => Some(s.policy(f)?.ok_or_else(|| {
                ApiError::not_found(format!("no policy version {f}")).with_field("against")
            })?),
            None => None,
        };
        let old_text = from.as_ref().map_or("", |p| p.text.as_str());
        let old_name = from
            .as_ref()
            .map_or_else(|| "none".to_owned(), |p| format!("v{} ({:?})", p.id, p.state));
        let new_name = format!("v{} ({:?})", to.id, to.state);
        let d = similar::TextDiff::from_lines(old_text, to.text.as_str());
        let unified = d
            .unified_diff()
            .context_radius(3)
            .header(&old_name.to_lowercase(), &new_name.to_lowercase())
            .to_string();
        Ok(Json(json!({
            "from": from.as_ref().map(|p| json!({ "id": p.id, "sha256": p.sha256, "state": p.state })),
            "to": { "id": to.id, "sha256": to.sha256, "state": to.state },
            "changed": from.as_ref().map(|p| &p.sha256) != Some(&to.sha256),
            "diff": unified,
        })))
    })
    .await
}

pub(super) async fn activate(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let g = st
        .run(move |s| {
            let Some(p) = s.policy(id)? else {
                return Err(ApiError::not_found(format!("no policy version {id}")));
            };
            // The schema may have changed since the upload: check again.
            if let Err(diags) = check_policy(&p.text)? {
                return Err(invalid_policy(diags));
            }
            Ok(s.activate_policy(id, &actor.0)?)
        })
        .await?;
    st.changed(Change::Policy {
        generation: g.generation,
    });
    Ok(Json(json!({ "governing": g })))
}

pub(super) async fn rollback(
    State(st): State<AdminState>,
    actor: Actor,
) -> Result<Json<Value>, ApiError> {
    let g = st.run(move |s| Ok(s.rollback_policy(&actor.0)?)).await?;
    st.changed(Change::Policy {
        generation: g.generation,
    });
    Ok(Json(json!({ "governing": g })))
}
