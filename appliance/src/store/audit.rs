//! The hash-chained audit log in the store.
//!
//! Each row carries `prev_hash` (the `hash` of the row before it, or 64
//! zeros for the first) and `hash = SHA-256(prev_hash || encode(row))`, where
//! `encode` length-prefixes every field so no two rows encode alike (the
//! rows and their hashing: `trustbind_policy::audit`). The newest
//! `(seq, hash)` is also kept in `audit_head`, written in the same
//! transaction, so that removing the tail of the log is detected too.

use rusqlite::{params, OptionalExtension, Transaction};
pub use trustbind_policy::audit::{row_hash, AuditEvent, AuditRow, GENESIS};

use super::{ChainError, StoreError};

/// Appends `ev` inside `tx` (the caller commits), returning the new row.
pub(super) fn append(
    tx: &Transaction<'_>,
    at_ms: i64,
    ev: &AuditEvent,
) -> Result<AuditRow, StoreError> {
    // Cached statements: a decision's row is appended thousands of times a
    // second, and preparing the three statements cost more than running them.
    let head: Option<(i64, String)> = tx
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (prev_seq, prev_hash) = head.unwrap_or((0, GENESIS.to_owned()));
    let seq = prev_seq
        .checked_add(1)
        .ok_or(StoreError::Unreachable("audit sequence overflow"))?;
    let detail = serde_json::to_string(&ev.detail)?;
    let hash = row_hash(&prev_hash, seq, at_ms, &ev.kind, &ev.actor, &detail);
    tx.prepare_cached(
        "INSERT INTO audit (seq, at_ms, kind, actor, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![seq, at_ms, ev.kind, ev.actor, detail, prev_hash, hash])?;
    tx.prepare_cached(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    )?
    .execute(params![seq, hash])?;
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

/// The audit chain inside one immediate transaction, for the seals
/// (`crate::audit_seal`): the head is read and the seal row appended with
/// no other row in between.
pub struct AuditTx<'a, 'c> {
    pub(super) tx: &'a Transaction<'c>,
}

impl AuditTx<'_, '_> {
    /// The head: the last row's sequence number and hash (0 and the
    /// genesis for an empty chain).
    pub fn head(&self) -> Result<(i64, String), StoreError> {
        Ok(self
            .tx
            .query_row("SELECT seq, hash FROM audit_head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
            .unwrap_or((0, GENESIS.to_owned())))
    }

    /// Appends `ev` with the time `at_ms`.
    pub fn append(&self, at_ms: i64, ev: &AuditEvent) -> Result<AuditRow, StoreError> {
        append(self.tx, at_ms, ev)
    }

    /// The newest row of `kind`, if any is kept.
    pub fn last_of_kind(&self, kind: &str) -> Result<Option<AuditRow>, StoreError> {
        Ok(self
            .tx
            .query_row(
                "SELECT seq, at_ms, kind, actor, detail, prev_hash, hash FROM audit
                 WHERE kind = ?1 ORDER BY seq DESC LIMIT 1",
                [kind],
                super::row_from,
            )
            .optional()?)
    }
}
