//! License-limit endpoints: set, list, show, remove (see [`crate::limits`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{sha256_arg, Actor, AdminState, ApiError, ApiJson, ApiPath, Change};
use crate::limits::{LicenseKey, Limits};
use crate::store::LicenseTerms;

fn limits(st: &AdminState) -> Result<Arc<Limits>, ApiError> {
    st.limits.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "license limits are not enabled on this appliance",
        )
    })
}

/// Body of `PUT /v1/limits`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitIn {
    subject: LicenseKey,
    #[serde(default)]
    max_calls: Option<u64>,
    #[serde(default)]
    not_before_ms: Option<i64>,
    #[serde(default)]
    not_after_ms: Option<i64>,
    #[serde(default)]
    max_per_minute: Option<u32>,
    /// Zero the call count and re-activate an exceeded license.
    #[serde(default)]
    reset: bool,
}

pub(super) async fn set(
    State(st): State<AdminState>,
    actor: Actor,
    ApiJson(body): ApiJson<LimitIn>,
) -> Result<Json<Value>, ApiError> {
    let l = limits(&st)?;
    let subject = match body.subject {
        LicenseKey::Host { host } => {
            super::hosts::check_host_name("subject.host", &host)?;
            LicenseKey::Host { host }
        }
        LicenseKey::Pair { client, server } => LicenseKey::Pair {
            client: sha256_arg("subject.client", &client)?,
            server: sha256_arg("subject.server", &server)?,
        },
    };
    if body.max_calls == Some(0) {
        return Err(ApiError::invalid(
            "max_calls",
            "`max_calls` must be at least 1",
        ));
    }
    if body.max_per_minute == Some(0) {
        return Err(ApiError::invalid(
            "max_per_minute",
            "`max_per_minute` must be at least 1",
        ));
    }
    if let (Some(nb), Some(na)) = (body.not_before_ms, body.not_after_ms) {
        if nb >= na {
            return Err(ApiError::invalid(
                "not_after_ms",
                "`not_after_ms` must be later than `not_before_ms`",
            ));
        }
    }
    let terms = LicenseTerms {
        max_calls: body.max_calls,
        not_before_ms: body.not_before_ms,
        not_after_ms: body.not_after_ms,
        max_per_minute: body.max_per_minute,
    };
    let reset = body.reset;
    let view = tokio::task::spawn_blocking(move || l.set(&subject, &terms, reset, &actor.0))
        .await
        .map_err(|e| ApiError::internal(format!("limits task failed: {e}")))??;
    st.changed(Change::Limits);
    Ok(Json(json!({ "license": view })))
}

pub(super) async fn list(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let l = limits(&st)?;
    Ok(Json(json!({ "limits": l.list()? })))
}

pub(super) async fn show(
    State(st): State<AdminState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let l = limits(&st)?;
    match l.get(id)? {
        Some(v) => Ok(Json(json!({ "license": v }))),
        None => Err(ApiError::not_found(format!("no license {id}"))),
    }
}

pub(super) async fn remove(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let l = limits(&st)?;
    tokio::task::spawn_blocking(move || l.remove(id, &actor.0))
        .await
        .map_err(|e| ApiError::internal(format!("limits task failed: {e}")))??;
    st.changed(Change::Limits);
    Ok(StatusCode::NO_CONTENT)
}
