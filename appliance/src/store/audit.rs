//! The hash-chained audit log.
//!
//! Each row carries `prev_hash` (the `hash` of the row before it, or 64
//! zeros for the first) and `hash = SHA-256(prev_hash || encode(row))`, where
//! `encode` length-prefixes every field so no two rows encode alike. The
//! newest `(seq, hash)` is also kept in `audit_head`, written in the same
//! transaction, so that removing the tail of the log is detected too.

use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{hex, ChainError, StoreError};

/// `prev_hash` of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An event to append. `detail` is free-form JSON; it must never carry key material.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Category, e.g. `decision`, `enrol`, `policy.activate`.
    pub kind: String,
    /// Who caused it: a host name, `admin:<cn>` or `appliance`.
    pub actor: String,
    /// Event-specific fields.
    pub detail: serde_json::Value,
}

impl AuditEvent {
    /// An event of `kind` caused by `actor`.
    pub fn new(kind: &str, actor: &str, detail: serde_json::Value) -> Self {
        AuditEvent {
            kind: kind.to_owned(),
            actor: actor.to_owned(),
            detail,
        }
    }
}

/// A stored audit row, as exported (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Category.
    pub kind: String,
    /// Who caused it.
    pub actor: String,
    /// Event-specific fields, as stored (canonical JSON text).
    pub detail: String,
    /// Hash of the previous row.
    pub prev_hash: String,
    /// Hash of this row.
    pub hash: String,
}

impl AuditRow {
    /// The hash the row's content and `prev_hash` give (what `hash` must be).
    pub fn computed_hash(&self) -> String {
        row_hash(
            &self.prev_hash,
            self.seq,
            self.at_ms,
            &self.kind,
            &self.actor,
            &self.detail,
        )
    }
}

/// Hash of one row given its predecessor's hash.
pub fn row_hash(
    prev_hash: &str,
    seq: i64,
    at_ms: i64,
    kind: &str,
    actor: &str,
    detail: &str,
) -> String {
    let mut h = Sha256::new();
    for field in [
        prev_hash.as_bytes(),
        &seq.to_le_bytes(),
        &at_ms.to_le_bytes(),
        kind.as_bytes(),
        actor.as_bytes(),
        detail.as_bytes(),
    ] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field);
    }
    hex(&h.finalize())
}

/// Appends `ev` inside `tx` (the caller commits), returning the new row.
pub(super) fn append(
    tx: &Transaction<'_>,
    at_ms: i64,
    ev: &AuditEvent,
) -> Result<AuditRow, StoreError> {
    let head: Option<(i64, String)> = tx
        .query_row("SELECT seq, hash FROM audit_head WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let (prev_seq, prev_hash) = head.unwrap_or((0, GENESIS.to_owned()));
    let seq = prev_seq
        .checked_add(1)
        .ok_or(StoreError::Unreachable("audit sequence overflow"))?;
    let detail = serde_json::to_string(&ev.detail)?;
    let hash = row_hash(&prev_hash, seq, at_ms, &ev.kind, &ev.actor, &detail);
    tx.execute(
        "INSERT INTO audit (seq, at_ms, kind, actor, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![seq, at_ms, ev.kind, ev.actor, detail, prev_hash, hash],
    )?;
    tx.execute(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
        params![seq, hash],
    )?;
    Ok(AuditRow {
        seq,
        at_ms,
        kind: ev.kind.clone(),
        actor: ev.actor.clone(),
        detail,
        prev_hash,
        hash,
    })
}

/// Checks one row against the state carried from its predecessor.
pub(super) fn check_row(
    row: &AuditRow,
    expected_seq: i64,
    prev_hash: &str,
) -> Result<(), ChainError> {
    if row.seq != expected_seq {
        return Err(ChainError::Gap {
            seq: row.seq,
            expected: expected_seq,
        });
    }
    if row.prev_hash != prev_hash {
        return Err(ChainError::BrokenLink { seq: row.seq });
    }
    if row.computed_hash() != row.hash {
        return Err(ChainError::HashMismatch { seq: row.seq });
    }
    Ok(())
}
