//! Learning mode endpoints: the programs hosts ran (`store/observed.rs`),
//! approving them into a reference group, forgetting rows.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    check_name, check_text, hosts::check_host_name, page_limit, sha256_arg, Actor, AdminState,
    ApiError, ApiJson, ApiQuery, Change,
};
use crate::store::observed::{PATH_MAX, PER_HOST, TOTAL};
use crate::store::{ObservedFilter, ObservedState, StoreError};

/// The filter fields every learn endpoint takes (query or body).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilterIn {
    host: Option<String>,
    path_prefix: Option<String>,
    package: Option<String>,
    sha256: Option<String>,
    state: Option<String>,
}

/// Query of `GET /v1/learn`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    host: Option<String>,
    path_prefix: Option<String>,
    package: Option<String>,
    sha256: Option<String>,
    state: Option<String>,
    after: Option<i64>,
    limit: Option<u32>,
}

/// Body of `POST /v1/learn/approve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApproveIn {
    group: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    package: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    /// Only these programs of the selection (SHA-256s).
    #[serde(default)]
    programs: Vec<String>,
    #[serde(default)]
    dry_run: bool,
}

/// Checks the filter fields; `state` defaults to `default_state`.
fn filter(f: FilterIn, default_state: ObservedState) -> Result<ObservedFilter, ApiError> {
    if let Some(h) = &f.host {
        check_host_name("host", h)?;
    }
    if let Some(p) = &f.path_prefix {
        check_text("path_prefix", p)?;
        if !p.starts_with('/') || p.len() > PATH_MAX {
            return Err(ApiError::invalid(
                "path_prefix",
                format!("`path_prefix` must be an absolute path of at most {PATH_MAX} bytes"),
            ));
        }
    }
    if let Some(p) = &f.package {
        let ok = !p.is_empty()
            && p.len() <= crate::agent_api::convert::MAX_PACKAGE
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b));
        if !ok {
            return Err(ApiError::invalid(
                "package",
                format!(
                    "`package` {} is not a Debian package name (a-z 0-9 + . -)",
                    super::shown(p)
                ),
            ));
        }
    }
    let sha256 = f
        .sha256
        .as_deref()
        .map(|s| sha256_arg("sha256", s))
        .transpose()?;
    let state = match f.state.as_deref() {
        None => default_state,
        Some("pending") => ObservedState::Pending,
        Some("approved") => ObservedState::Approved,
        Some("all") => ObservedState::All,
        Some(other) => {
            return Err(ApiError::invalid(
                "state",
                format!(
                    "`state` {} is not one of pending, approved, all",
                    super::shown(other)
                ),
            ))
        }
    };
    Ok(ObservedFilter {
        host: f.host,
        path_prefix: f.path_prefix,
        package: f.package,
        sha256,
        state,
    })
}

pub(super) async fn list(
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit)?;
    let after = q.after.unwrap_or(0);
    let f = filter(
        FilterIn {
            host: q.host,
            path_prefix: q.path_prefix,
            package: q.package,
            sha256: q.sha256,
            state: q.state,
        },
        ObservedState::Pending,
    )?;
    st.run(move |s| {
        let rows = s.observed(&f, after, limit)?;
        let full = u32::try_from(rows.len()).unwrap_or(u32::MAX) == limit;
        let next = rows.last().filter(|_| full).map(|r| r.id);
        let hosts = s.observed_hosts()?;
        Ok(Json(json!({
            "rows": rows,
            "next": next,
            "hosts": hosts,
            "caps": { "per_host": PER_HOST, "total": TOTAL },
        })))
    })
    .await
}

fn unknown_group(e: StoreError, group: &str) -> ApiError {
    match e {
        StoreError::NotFound { what: "group", .. } => ApiError::not_found(format!(
            "no reference group `{group}`: create it first (`trustbind group create {group}`) and make sure a policy permits it"
        ))
        .with_field("group"),
        StoreError::Invalid { what: "filter", why } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("the filter {why}"),
        ),
        e => e.into(),
    }
}

pub(super) async fn approve(
    State(st): State<AdminState>,
    actor: Actor,
    ApiJson(body): ApiJson<ApproveIn>,
) -> Result<Json<Value>, ApiError> {
    check_name("group", &body.group)?;
    if body.programs.len() > crate::store::observed::APPROVE_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "`programs` has {} entries; at most {} are accepted per request",
                body.programs.len(),
                crate::store::observed::APPROVE_MAX
            ),
        )
        .with_field("programs"));
    }
    let only = body
        .programs
        .iter()
        .enumerate()
        .map(|(i, s)| sha256_arg(&format!("programs[{i}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    let f = filter(
        FilterIn {
            host: body.host,
            path_prefix: body.path_prefix,
            package: body.package,
            sha256: body.sha256,
            state: None,
        },
        ObservedState::Pending,
    )?;
    let group = body.group;
    let dry_run = body.dry_run;
    let res = st
        .run(move |s| {
            s.approve_observed(&f, &only, &group, &actor.0, dry_run)
                .map_err(|e| unknown_group(e, &group))
        })
        .await?;
    if !res.dry_run && res.added_to_group > 0 {
        st.changed(Change::Signatures);
    }
    Ok(Json(json!(res)))
}

pub(super) async fn forget(
    State(st): State<AdminState>,
    actor: Actor,
    ApiJson(body): ApiJson<FilterIn>,
) -> Result<Json<Value>, ApiError> {
    let f = filter(body, ObservedState::All)?;
    let rows = st
        .run(move |s| Ok(s.forget_observed(&f, &actor.0)?))
        .await?;
    Ok(Json(json!({ "rows": rows })))
}
