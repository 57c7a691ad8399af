//! Audit endpoints (tail, streamed JSON-lines export, verify), `/v1/status`
//! and the Prometheus `/metrics`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{page_limit, Actor, AdminState, ApiError, ApiJson, ApiQuery, PAGE_MAX};
use crate::store::AuditRow;

pub(super) async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        crate::metrics::metrics().render(),
    )
        .into_response()
}

pub(super) async fn status(
    State(st): State<AdminState>,
    actor: Actor,
) -> Result<Json<Value>, ApiError> {
    // The authority key modules are loaded with (sealed records), hex.
    let authority = st.pki.as_ref().map(|p| p.authority().public_hex());
    st.run(move |s| {
        Ok(Json(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "schema_version": s.schema_version()?,
            "governing": s.governing()?,
            "audit_head": s.audit_head()?,
            "time_zone": crate::clock::zone_name(crate::clock::zone()),
            "you": actor.0,
            "authority": authority,
        })))
    })
    .await
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TailQuery {
    /// Rows with a greater sequence number; absent: the newest `limit` rows.
    after: Option<i64>,
    limit: Option<u32>,
    /// With `after`: wait up to this long (ms, at most 30 000) for a row
    /// newer than `after` before answering an empty page (long poll).
    wait_ms: Option<u32>,
}

/// Longest long poll.
const MAX_WAIT_MS: u32 = 30_000;
/// Polling interval of a long poll.
const POLL_MS: u64 = 100;

pub(super) async fn tail(
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<TailQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit)?;
    if q.after.is_some_and(|a| a < 0) {
        return Err(ApiError::invalid("after", "`after` must not be negative"));
    }
    let wait = match q.wait_ms {
        Some(w) if w > MAX_WAIT_MS => {
            return Err(ApiError::invalid(
                "wait_ms",
                format!("`wait_ms` {w} is over the maximum of {MAX_WAIT_MS}"),
            ));
        }
        Some(_) if q.after.is_none() => {
            return Err(ApiError::invalid("wait_ms", "`wait_ms` needs `after`"));
        }
        w => w.unwrap_or(0),
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(u64::from(wait));
    loop {
        let head = st.run(|s| Ok(s.audit_head()?)).await?;
        let waiting = q.after.is_some_and(|a| head <= a);
        if !waiting || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(POLL_MS)).await;
    }
    st.run(move |s| {
        let head = s.audit_head()?;
        let after = q
            .after
            .unwrap_or_else(|| head.saturating_sub(i64::from(limit)).max(0));
        let rows = s.audit_rows(after, limit)?;
        let next = rows.last().map_or(after, |r| r.seq);
        Ok(Json(json!({ "rows": rows, "next": next, "head": head })))
    })
    .await
}

/// Query of `GET /v1/audit/export`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportQuery {
    /// Rows written at or after this time (ms since the Unix epoch).
    since_ms: Option<i64>,
    /// Rows with a greater sequence number (combined with `since_ms`: both hold).
    after: Option<i64>,
    /// Only rows of this kind, or of kinds under it (`decision` matches `decision.exec`).
    kind: Option<String>,
}

fn kind_matches(filter: Option<&str>, row: &AuditRow) -> bool {
    match filter {
        None => true,
        Some(k) => {
            row.kind == k
                || row
                    .kind
                    .strip_prefix(k)
                    .is_some_and(|rest| rest.starts_with('.'))
        }
    }
}

/// Streams JSON lines, one audit row per line, up to the head as it was
/// when the request arrived. Read in pages so the store lock is never held
/// for the whole export.
pub(super) async fn export(
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    if q.after.is_some_and(|a| a < 0) {
        return Err(ApiError::invalid("after", "`after` must not be negative"));
    }
    let since = q.since_ms;
    let (start, head) = st
        .run(move |s| {
            let from_time = match since {
                Some(t) => s.audit_cursor_since(t)?,
                None => 0,
            };
            Ok((from_time, s.audit_head()?))
        })
        .await?;
    let mut cursor = start.max(q.after.unwrap_or(0));
    let kind = q.kind;
    let store = std::sync::Arc::clone(&st.store);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        while cursor < head {
            let rows = match store.audit_rows(cursor, PAGE_MAX) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            };
            let Some(last) = rows.last() else { return };
            cursor = last.seq;
            let mut buf = Vec::with_capacity(rows.len().saturating_mul(256));
            for r in rows.iter().filter(|r| r.seq <= head) {
                if !kind_matches(kind.as_deref(), r) {
                    continue;
                }
                if serde_json::to_writer(&mut buf, r).is_err() {
                    return;
                }
                buf.push(b'\n');
            }
            // The client went away: stop reading.
            if !buf.is_empty() && tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        body,
    )
        .into_response())
}

/// `GET /v1/audit/verify`: the chain from the newest retention checkpoint
/// to the head; every checkpoint's signature is checked against the CA
/// (they are few: retention consolidates the oldest). The
/// answer names what was pruned (`pruned`: rows `1..=upto_seq`, by how
/// many checkpoints) and carries the newest checkpoint as stored, so a
/// client can check it against its own copy of the CA and the export file.
pub(super) async fn verify(State(st): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let pki = st.pki.clone();
    st.run(move |s| {
        let r = match s.verify_audit_from_checkpoint()? {
            Ok(r) => r,
            Err(broken) => return Ok(Json(json!({ "ok": false, "error": broken.to_string() }))),
        };
        let signed = match (&r.checkpoint, &pki) {
            (Some(_), Some(pki)) => {
                Some(crate::retention::verify_checkpoints(&r.all, pki.ca_der()))
            }
            _ => None,
        };
        if let Some(Err(e)) = &signed {
            return Ok(Json(
                json!({ "ok": false, "error": e, "checkpoint": r.checkpoint }),
            ));
        }
        let pruned = r.checkpoint.as_ref().map(|c| {
            json!({
                "upto_seq": c.upto_seq,
                "rows": c.total_rows,
                "checkpoints": r.checkpoints,
                "last_export_file": c.export_file,
                "signature_checked": signed.is_some(),
            })
        });
        Ok(Json(json!({
            "ok": true,
            "rows": r.rows,
            "head": r.head,
            "pruned": pruned,
            "checkpoint": r.checkpoint,
            "audit_gap": s.audit_gap(),
        })))
    })
    .await
}

fn seal_dir(st: &AdminState) -> Result<std::path::PathBuf, ApiError> {
    st.seal_dir.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this appliance serves the admin API without its data directory",
        )
    })
}

fn seal_error(e: crate::audit_seal::FssError) -> ApiError {
    use crate::audit_seal::FssError;
    match e {
        FssError::NotSetUp(_) => ApiError::new(StatusCode::CONFLICT, "not_set_up", e.to_string()),
        FssError::Refused(_) => ApiError::new(StatusCode::CONFLICT, "refused", e.to_string()),
        FssError::Store(s) => s.into(),
        FssError::File { .. } => ApiError::internal(e.to_string()),
    }
}

/// `POST /v1/audit/seal`: seals the audit log now (T-83), as `serve`
/// does every interval; the reason recorded is `admin:<cn>`.
pub(super) async fn seal(
    State(st): State<AdminState>,
    actor: Actor,
) -> Result<Json<Value>, ApiError> {
    let dir = seal_dir(&st)?;
    st.run(move |s| {
        let sealed = crate::audit_seal::seal(s, &dir, crate::store::now_ms(), &actor.0)
            .map_err(seal_error)?;
        Ok(Json(json!({
            "seal": sealed.seal,
            "recovered": sealed.recovered,
        })))
    })
    .await
}

/// Body of `POST /v1/audit/seal/setup`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SealSetupIn {
    /// Seconds between seals (default 900).
    interval_secs: Option<u32>,
}

/// `POST /v1/audit/seal/setup`: sets sealing up once and answers the
/// verification key, which the appliance does not keep (409 if set up
/// already). The caller must store it offline.
pub(super) async fn seal_setup(
    State(st): State<AdminState>,
    ApiJson(body): ApiJson<SealSetupIn>,
) -> Result<Json<Value>, ApiError> {
    let dir = seal_dir(&st)?;
    let secs = body
        .interval_secs
        .map_or(crate::audit_seal::DEFAULT_INTERVAL_SECS, u64::from);
    if !(1..=86_400).contains(&secs) {
        return Err(ApiError::invalid(
            "interval_secs",
            "`interval_secs` must be 1 to 86400",
        ));
    }
    st.run(move |s| {
        let interval_ms = i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let vk = crate::audit_seal::setup(s, &dir, crate::store::now_ms(), interval_ms)
            .map_err(seal_error)?;
        Ok(Json(json!({ "verify_key": vk })))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str) -> AuditRow {
        AuditRow {
            seq: 1,
            at_ms: 0,
            kind: kind.into(),
            actor: "a".into(),
            detail: "{}".into(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn kind_filter_matches_subkinds_only_at_dots() {
        assert!(kind_matches(None, &row("x")));
        assert!(kind_matches(Some("policy"), &row("policy")));
        assert!(kind_matches(Some("policy"), &row("policy.activate")));
        assert!(!kind_matches(Some("policy"), &row("policyx")));
        assert!(!kind_matches(Some("host"), &row("hostgroup.set")));
    }
}
