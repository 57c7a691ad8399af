//! User and role endpoints (Cedar `User in [Role]`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    check_name, page_limit, Actor, AdminState, ApiError, ApiJson, ApiPath, ApiQuery, Change,
};

/// Most roles one user may hold.
const MAX_ROLES: usize = 256;

/// Query of `GET /v1/users`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    after: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn list(
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit)?;
    let after = q.after.unwrap_or_default();
    st.run(move |s| {
        let users = s.list_users(&after, limit)?;
        let full = u32::try_from(users.len()).unwrap_or(u32::MAX) == limit;
        let next = users.last().filter(|_| full).map(|u| u.name.clone());
        Ok(Json(json!({ "users": users, "next": next })))
    })
    .await
}

pub(super) async fn show(
    State(st): State<AdminState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    st.run(move |s| match s.user(&name)? {
        Some(u) => Ok(Json(json!({ "user": u }))),
        None => Err(ApiError::not_found(format!("no user `{name}`"))),
    })
    .await
}

/// Body of `PUT /v1/users/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RolesIn {
    roles: Vec<String>,
}

pub(super) async fn set_roles(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<RolesIn>,
) -> Result<Json<Value>, ApiError> {
    check_name("name", &name)?;
    if body.roles.len() > MAX_ROLES {
        return Err(ApiError::invalid(
            "roles",
            format!("at most {MAX_ROLES} roles per user"),
        ));
    }
    for (i, r) in body.roles.iter().enumerate() {
        check_name(&format!("roles[{i}]"), r)?;
    }
    let user = st
        .run(move |s| {
            let roles: Vec<&str> = body.roles.iter().map(String::as_str).collect();
            s.set_user_roles(&name, &roles, &actor.0)?;
            s.user(&name)?
                .ok_or_else(|| ApiError::internal("user vanished after update"))
        })
        .await?;
    st.changed(Change::Users);
    Ok(Json(json!({ "user": user })))
}

pub(super) async fn delete(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.run(move |s| Ok(s.delete_user(&name, &actor.0)?)).await?;
    st.changed(Change::Users);
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn roles(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    st.run(|s| Ok(Json(json!({ "roles": s.list_roles()? }))))
        .await
}
