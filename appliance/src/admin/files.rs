//! Protected file set endpoints (`crate::files`): list, show, add or
//! remove paths, replace, delete. Every change moves the generation and
//! reaches the agents as a `FileSets` push.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_name, Actor, AdminState, ApiError, ApiJson, ApiPath, Change};
use crate::files::{check_path, MAX_FILE_SETS, MAX_FILE_SET_PATHS};
use crate::store::FileSetEdit;

pub(super) async fn list(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    st.run(|s| {
        let sets = s.file_sets()?;
        let paths: usize = sets.iter().map(|f| f.paths.len()).sum();
        Ok(Json(json!({
            "file_sets": sets,
            "paths": paths,
            "max_paths": MAX_FILE_SET_PATHS,
            "max_sets": MAX_FILE_SETS,
        })))
    })
    .await
}

pub(super) async fn show(
    State(st): State<AdminState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    st.run(move |s| match s.file_set(&name)? {
        Some(f) => Ok(Json(json!({ "file_set": f }))),
        None => Err(ApiError::not_found(format!("no file set `{name}`"))),
    })
    .await
}

/// Body of the path-changing endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PathsIn {
    paths: Vec<String>,
}

/// Checks the name and every path (the error names the first bad one).
fn checked(name: &str, body: &PathsIn) -> Result<(), ApiError> {
    check_name("name", name)?;
    if body.paths.len() > MAX_FILE_SET_PATHS {
        return Err(ApiError::invalid(
            "paths",
            format!(
                "{} paths, at most {MAX_FILE_SET_PATHS} in all file sets",
                body.paths.len()
            ),
        ));
    }
    for (i, p) in body.paths.iter().enumerate() {
        check_path(p).map_err(|e| ApiError::invalid(format!("paths[{i}]"), e.to_string()))?;
    }
    Ok(())
}

async fn edit(
    st: AdminState,
    actor: Actor,
    name: String,
    edit: FileSetEdit,
    body: PathsIn,
) -> Result<Json<Value>, ApiError> {
    checked(&name, &body)?;
    let c = st
        .run(move |s| Ok(s.edit_file_set(&name, edit, &body.paths, &actor.0)?))
        .await?;
    if c.created || !c.added.is_empty() || !c.removed.is_empty() {
        st.changed(Change::FileSets);
    }
    Ok(Json(json!({
        "file_set": c.set,
        "created": c.created,
        "added": c.added,
        "removed": c.removed,
    })))
}

pub(super) async fn add(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<PathsIn>,
) -> Result<Json<Value>, ApiError> {
    edit(st, actor, name, FileSetEdit::Add, body).await
}

pub(super) async fn remove(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<PathsIn>,
) -> Result<Json<Value>, ApiError> {
    edit(st, actor, name, FileSetEdit::Remove, body).await
}

pub(super) async fn set(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<PathsIn>,
) -> Result<Json<Value>, ApiError> {
    edit(st, actor, name, FileSetEdit::Replace, body).await
}

pub(super) async fn delete(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.run(move |s| Ok(s.delete_file_set(&name, &actor.0)?))
        .await?;
    st.changed(Change::FileSets);
    Ok(StatusCode::NO_CONTENT)
}
