//! Host-group and host endpoints: modes, enrolment tokens, listing, revocation.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{
    check_name, page_limit, shown, Actor, AdminState, ApiError, ApiJson, ApiPath, ApiQuery, Change,
};
use crate::store::{hex, HostState, Mode};

/// Bytes of randomness in an enrolment token (rendered as 64 hex digits).
const TOKEN_BYTES: usize = 32;

/// The value stored for an enrolment token: lower-case hex SHA-256 of the
/// token's text as given to the agent. The enrolment side must hash the
/// presented token the same way.
pub fn token_sha256(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// A fresh one-time enrolment token from the OS CSPRNG.
fn new_token() -> Result<Zeroizing<String>, ApiError> {
    let mut raw = Zeroizing::new([0_u8; TOKEN_BYTES]);
    getrandom::getrandom(raw.as_mut_slice())
        .map_err(|e| ApiError::internal(format!("OS random number generator failed: {e}")))?;
    Ok(Zeroizing::new(hex(raw.as_slice())))
}

/// A host name: 1..=253 characters of `A-Z a-z 0-9 . - _`.
pub(super) fn check_host_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!(
                "`{field}` {} is not a host name (1 to 253 of A-Z a-z 0-9 . - _)",
                shown(name)
            ),
        ))
    }
}

pub(super) async fn list_groups(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    st.run(|s| Ok(Json(json!({ "host_groups": s.list_host_groups()? }))))
        .await
}

/// Body of `PUT /v1/host-groups/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HostGroupIn {
    mode: Mode,
}

pub(super) async fn set_group(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<HostGroupIn>,
) -> Result<Json<Value>, ApiError> {
    check_name("name", &name)?;
    let n = name.clone();
    st.run(move |s| Ok(s.set_host_group(&n, body.mode, &actor.0)?))
        .await?;
    st.changed(Change::HostGroups);
    Ok(Json(
        json!({ "host_group": { "name": name, "mode": body.mode } }),
    ))
}

pub(super) async fn delete_group(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.run(move |s| Ok(s.delete_host_group(&name, &actor.0)?))
        .await?;
    st.changed(Change::HostGroups);
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /v1/hosts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HostIn {
    name: String,
    host_group: String,
    /// Lifetime of the enrolment token in seconds (default 24 h).
    token_ttl_s: Option<i64>,
}

pub(super) async fn create(
    State(st): State<AdminState>,
    actor: Actor,
    ApiJson(body): ApiJson<HostIn>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_host_name("name", &body.name)?;
    check_name("host_group", &body.host_group)?;
    let ttl = super::admins::ttl_ms("token_ttl_s", body.token_ttl_s)?;
    let token = new_token()?;
    let hash = token_sha256(&token);
    let (name, group) = (body.name.clone(), body.host_group.clone());
    let expires = st
        .run(move |s| {
            if s.host_group_mode(&group)?.is_none() {
                return Err(ApiError::not_found(format!(
                    "no host group `{group}`; create it first with PUT /v1/host-groups/{group}"
                ))
                .with_field("host_group"));
            }
            Ok(s.add_pending_host_ttl(&name, &group, &hash, ttl, &actor.0)?)
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "host": {
                "name": body.name,
                "host_group": body.host_group,
                "state": HostState::Pending,
            },
            "token": token.as_str(),
            "token_expires_ms": expires,
            "ca_fingerprint": st.ca_fingerprint,
        })),
    ))
}

/// Body of `POST /v1/hosts/{name}/token`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetokenIn {
    token_ttl_s: Option<i64>,
}

/// A new one-time enrolment token for a pending host (its token expired or
/// was lost) or a revoked one (to enrol it again).
pub(super) async fn retoken(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<RetokenIn>,
) -> Result<Json<Value>, ApiError> {
    let ttl = super::admins::ttl_ms("token_ttl_s", body.token_ttl_s)?;
    let token = new_token()?;
    let hash = token_sha256(&token);
    let n = name.clone();
    let (expires, host) = st
        .run(move |s| {
            let expires = s.retoken_host(&n, &hash, ttl, &actor.0)?;
            let host = s
                .host_info(&n)?
                .ok_or_else(|| ApiError::internal("host vanished"))?;
            Ok((expires, host))
        })
        .await?;
    Ok(Json(json!({
        "host": host,
        "token": token.as_str(),
        "token_expires_ms": expires,
        "ca_fingerprint": st.ca_fingerprint,
    })))
}

/// Query of `GET /v1/hosts`.
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
        let hosts = s.list_hosts(&after, limit)?;
        let full = u32::try_from(hosts.len()).unwrap_or(u32::MAX) == limit;
        let next = hosts.last().filter(|_| full).map(|h| h.name.clone());
        Ok(Json(json!({ "hosts": hosts, "next": next })))
    })
    .await
}

pub(super) async fn show(
    State(st): State<AdminState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    st.run(move |s| match s.host_info(&name)? {
        Some(h) => Ok(Json(json!({ "host": h }))),
        None => Err(ApiError::not_found(format!("no host `{name}`"))),
    })
    .await
}

/// Body of `PUT /v1/hosts/{name}/addresses`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddressesIn {
    addresses: Vec<String>,
}

/// Replaces the addresses assigned to a host (channel binding: what it may
/// name as its own end of a channel besides the address its agent
/// connects from; `crate::hostaddr`).
pub(super) async fn set_addresses(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<AddressesIn>,
) -> Result<Json<Value>, ApiError> {
    let addrs = body
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse::<std::net::IpAddr>().map_err(|_| {
                ApiError::invalid(
                    format!("addresses[{i}]"),
                    format!("`{}` is not an IP address", shown(a)),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    st.run(move |s| {
        s.set_host_addresses(&name, &addrs, &actor.0)?;
        s.host_info(&name)?
            .map(|h| Json(json!({ "host": h })))
            .ok_or_else(|| ApiError::internal("host vanished after assigning addresses"))
    })
    .await
}

pub(super) async fn revoke(
    State(st): State<AdminState>,
    actor: Actor,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let n = name.clone();
    let host = st
        .run(move |s| {
            s.revoke_host(&n, &actor.0)?;
            s.host_info(&n)?
                .ok_or_else(|| ApiError::internal("host vanished after revocation"))
        })
        .await?;
    st.changed(Change::HostRevoked { host: name });
    Ok(Json(json!({ "host": host })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_hash_as_documented() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(*a, *b);
        assert_eq!(
            token_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn host_names() {
        assert!(check_host_name("name", "web-1.example_x").is_ok());
        assert!(check_host_name("name", "").is_err());
        assert!(check_host_name("name", "a b").is_err());
        assert!(check_host_name("name", &"a".repeat(254)).is_err());
    }
}
