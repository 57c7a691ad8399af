//! Signature and reference-group endpoints: batch add (idempotent), get,
//! remove, list with cursor pagination; groups with batch membership.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    check_name, check_text, page_limit, sha256_arg, Actor, AdminState, ApiError, ApiJson, ApiPath,
    ApiQuery, Change, MAX_BATCH,
};
use crate::store::{Publish, Signature};

/// One signature in a batch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SigIn {
    sha256: String,
    #[serde(default)]
    sha1: Option<String>,
    size: u64,
    name: String,
    #[serde(default)]
    source: Option<String>,
}

/// Body of `POST /v1/signatures`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchIn {
    signatures: Vec<SigIn>,
    /// Reference group to put every signature of the batch into.
    #[serde(default)]
    group: Option<String>,
    /// Default `source` for entries without one (else `admin`).
    #[serde(default)]
    source: Option<String>,
    /// Part of a bulk import: programs hosts were only ever denied are
    /// approved on hosts' caches once the import goes quiet, not per
    /// batch (`Publish::Deferred`).
    #[serde(default)]
    bulk: bool,
}

fn check_batch_len(field: &str, n: usize) -> Result<(), ApiError> {
    if n > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("`{field}` has {n} entries; at most {MAX_BATCH} are accepted per request"),
        )
        .with_field(field));
    }
    Ok(())
}

fn check_len(field: &str, s: &str, max: usize) -> Result<(), ApiError> {
    check_text(field, s)?;
    if s.len() > max {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` is longer than {max} bytes"),
        ));
    }
    Ok(())
}

pub(super) async fn add_batch(
    State(st): State<AdminState>,
    actor: Actor,
    ApiJson(body): ApiJson<BatchIn>,
) -> Result<Json<Value>, ApiError> {
    check_batch_len("signatures", body.signatures.len())?;
    if let Some(g) = &body.group {
        check_name("group", g)?;
    }
    let default_source = body.source.unwrap_or_else(|| "admin".to_owned());
    check_len("source", &default_source, 256)?;
    let mut sigs = Vec::with_capacity(body.signatures.len());
    for (i, s) in body.signatures.into_iter().enumerate() {
        let f = |n: &str| format!("signatures[{i}].{n}");
        let sha1 = match s.sha1 {
            Some(h) => {
                let l = h.to_ascii_lowercase();
                if l.len() != 40 || !l.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ApiError::invalid(
                        f("sha1"),
                        format!("`{}` is not a SHA-1 (40 hex digits)", f("sha1")),
                    ));
                }
                Some(l)
            }
            None => None,
        };
        let source = s.source.unwrap_or_else(|| default_source.clone());
        check_len(&f("name"), &s.name, 4096)?;
        check_len(&f("source"), &source, 256)?;
        if i64::try_from(s.size).is_err() {
            return Err(ApiError::invalid(
                f("size"),
                format!("`{}` is too large", f("size")),
            ));
        }
        sigs.push(Signature {
            sha256: sha256_arg(&f("sha256"), &s.sha256)?,
            sha1,
            size: s.size,
            name: s.name,
            source,
        });
    }
    let received = sigs.len();
    let group = body.group;
    let publish = if body.bulk {
        Publish::Deferred
    } else {
        Publish::Now
    };
    let res = st
        .run(move |s| Ok(s.put_signatures_with(&sigs, group.as_deref(), &actor.0, publish)?))
        .await?;
    if res.added_to_group > 0 || res.updated > 0 {
        st.changed(Change::Signatures);
    }
    Ok(Json(json!({
        "received": received,
        "inserted": res.inserted,
        "updated": res.updated,
        "unchanged": res.unchanged,
        "added_to_group": res.added_to_group,
    })))
}

pub(super) async fn show(
    State(st): State<AdminState>,
    ApiPath(sha): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let sha = sha256_arg("sha256", &sha)?;
    st.run(move |s| {
        let Some(sig) = s.signature(&sha)? else {
            return Err(ApiError::not_found(format!("no signature {sha}")));
        };
        let groups = s.groups_of(&sha)?;
        let mut v = serde_json::to_value(sig).map_err(|e| ApiError::internal(e.to_string()))?;
        if let Some(o) = v.as_object_mut() {
            o.insert("groups".into(), json!(groups));
        }
        Ok(Json(v))
    })
    .await
}

/// Removes `hashes`; returns how many were removed and the unknown ones.
async fn remove(
    st: &AdminState,
    actor: Actor,
    hashes: Vec<String>,
) -> Result<(usize, Vec<String>), ApiError> {
    let n = hashes.len();
    let missing = st
        .run(move |s| Ok(s.remove_signatures(&hashes, &actor.0)?))
        .await?;
    let removed = n.saturating_sub(missing.len());
    if removed > 0 {
        st.changed(Change::Signatures);
    }
    Ok((removed, missing))
}

pub(super) async fn remove_one(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(sha): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let sha = sha256_arg("sha256", &sha)?;
    let (removed, _) = remove(&st, actor, vec![sha.clone()]).await?;
    if removed == 0 {
        return Err(ApiError::not_found(format!("no signature {sha}")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Body of the batch hash endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HashesIn {
    sha256: Vec<String>,
}

fn hashes(body: HashesIn) -> Result<Vec<String>, ApiError> {
    check_batch_len("sha256", body.sha256.len())?;
    body.sha256
        .iter()
        .enumerate()
        .map(|(i, h)| sha256_arg(&format!("sha256[{i}]"), h))
        .collect()
}

pub(super) async fn remove_batch(
    State(st): State<AdminState>,
    actor: Actor,
    ApiJson(body): ApiJson<HashesIn>,
) -> Result<Json<Value>, ApiError> {
    let h = hashes(body)?;
    let (removed, missing) = remove(&st, actor, h).await?;
    Ok(Json(json!({ "removed": removed, "missing": missing })))
}

/// Query of `GET /v1/signatures`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    group: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn list(
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit)?;
    let after = match q.after {
        Some(a) => sha256_arg("after", &a)?,
        None => String::new(),
    };
    st.run(move |s| {
        if let Some(g) = &q.group {
            if s.group(g)?.is_none() {
                return Err(ApiError::not_found(format!("no group `{g}`")).with_field("group"));
            }
        }
        let sigs = s.list_signatures(q.group.as_deref(), &after, limit)?;
        let full = u32::try_from(sigs.len()).unwrap_or(u32::MAX) == limit;
        let next = sigs.last().filter(|_| full).map(|s| s.sha256.clone());
        Ok(Json(json!({ "signatures": sigs, "next": next })))
    })
    .await
}

/// Body of `POST /v1/groups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GroupIn {
    name: String,
    #[serde(default)]
    description: String,
}

pub(super) async fn create_group(
    State(st): State<AdminState>,
    actor: Actor,
    ApiJson(body): ApiJson<GroupIn>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_name("name", &body.name)?;
    check_len("description", &body.description, 4096)?;
    let (created, info) = st
        .run(move |s| {
            let before = s.group(&body.name)?;
            if before.is_none() {
                s.create_group(&body.name, &body.description, &actor.0)?;
            }
            let info = s
                .group(&body.name)?
                .ok_or_else(|| ApiError::internal("group vanished after creation"))?;
            Ok((before.is_none(), info))
        })
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "group": info, "created": created }))))
}

pub(super) async fn list_groups(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    st.run(|s| Ok(Json(json!({ "groups": s.list_groups()? }))))
        .await
}

pub(super) async fn show_group(
    State(st): State<AdminState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    st.run(move |s| match s.group(&name)? {
        Some(g) => Ok(Json(json!({ "group": g }))),
        None => Err(ApiError::not_found(format!("no group `{name}`"))),
    })
    .await
}

pub(super) async fn delete_group(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let members = st
        .run(move |s| Ok(s.delete_group(&name, &actor.0)?))
        .await?;
    st.changed(Change::Signatures);
    Ok(Json(json!({ "deleted": true, "members_removed": members })))
}

pub(super) async fn add_members(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<HashesIn>,
) -> Result<Json<Value>, ApiError> {
    let h = hashes(body)?;
    let n = h.len();
    let added = st
        .run(move |s| Ok(s.add_members(&name, &h, &actor.0)?))
        .await?;
    if added > 0 {
        st.changed(Change::Signatures);
    }
    Ok(Json(json!({
        "added": added,
        "already_members": u64::try_from(n).unwrap_or(0).saturating_sub(added),
    })))
}

pub(super) async fn remove_members(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<HashesIn>,
) -> Result<Json<Value>, ApiError> {
    let h = hashes(body)?;
    let n = h.len();
    let removed = st
        .run(move |s| Ok(s.remove_members(&name, &h, &actor.0)?))
        .await?;
    if removed > 0 {
        st.changed(Change::Signatures);
    }
    Ok(Json(json!({
        "removed": removed,
        "not_members": u64::try_from(n).unwrap_or(0).saturating_sub(removed),
    })))
}
