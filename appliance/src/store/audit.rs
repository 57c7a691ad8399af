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

/// The chain's newest row, `(seq, hash)`, as `audit_head` holds it (0
/// and the genesis for an empty chain).
fn head(tx: &Transaction<'_>) -> Result<(i64, String), StoreError> {
    // Cached statements: a decision's row is appended thousands of times a
    // second, and preparing the statements cost more than running them.
    Ok(tx
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or((0, GENESIS.to_owned())))
}

/// Writes `audit_head` (the newest row's `seq` and `hash`).
fn set_head(tx: &Transaction<'_>, seq: i64, hash: &str) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    )?
    .execute(params![seq, hash])?;
    Ok(())
}

/// The row insert ([`append_all`] binds it).
const INSERT: &str = "INSERT INTO audit (seq, at_ms, kind, actor, detail, prev_hash, hash) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

/// Appends `ev` inside `tx` (the caller commits), returning the new row.
pub(super) fn append(
    tx: &Transaction<'_>,
    at_ms: i64,
    ev: &AuditEvent,
) -> Result<AuditRow, StoreError> {
    append_all(tx, at_ms, std::slice::from_ref(ev))?
        .rows([ev.clone()])
        .pop()
        .ok_or(StoreError::Unreachable("one event, no row"))
}

/// Appends `events` in order inside `tx` (the caller commits), all at
/// `at_ms`: the head is read once before the first and written once
/// after the last (one transaction, so a commit holds the rows and the
/// head that names the last of them, or neither), and the insert is
/// looked up once. What was chained, for [`Chained::rows`].
pub(super) fn append_all(
    tx: &Transaction<'_>,
    at_ms: i64,
    events: &[AuditEvent],
) -> Result<Chained, StoreError> {
    let (before_seq, before_hash) = head(tx)?;
    let mut stmt = tx.prepare_cached(INSERT)?;
    let mut hashes: Vec<String> = Vec::with_capacity(events.len());
    let mut seq = before_seq;
    for ev in events {
        seq = seq
            .checked_add(1)
            .ok_or(StoreError::Unreachable("audit sequence overflow"))?;
        let prev_hash = hashes.last().unwrap_or(&before_hash);
        let hash = row_hash(prev_hash, seq, at_ms, &ev.kind, &ev.actor, &ev.detail);
        stmt.execute(params![
            seq, at_ms, ev.kind, ev.actor, ev.detail, prev_hash, hash
        ])?;
        hashes.push(hash);
    }
    drop(stmt);
    if let Some(last) = hashes.last() {
        set_head(tx, seq, last)?;
    }
    Ok(Chained {
        first_seq: before_seq.saturating_add(1),
        at_ms,
        prev_hash: before_hash,
        hashes,
    })
}

/// Rows [`append_all`] chained: their sequence numbers, time and hashes.
/// The rows themselves are made from the events afterwards
/// ([`Chained::rows`]), by moving their text where the caller owns them.
#[derive(Debug)]
pub(super) struct Chained {
    first_seq: i64,
    at_ms: i64,
    /// The hash the first row chained from.
    prev_hash: String,
    hashes: Vec<String>,
}

impl Chained {
    /// The stored rows, given the events in the order appended (their
    /// text moves into the rows).
    pub(super) fn rows(self, events: impl IntoIterator<Item = AuditEvent>) -> Vec<AuditRow> {
        let mut prev_hash = self.prev_hash;
        let mut seq = self.first_seq;
        events
            .into_iter()
            .zip(self.hashes)
            .map(|(ev, hash)| {
                let row = AuditRow {
                    seq,
                    at_ms: self.at_ms,
                    kind: ev.kind,
                    actor: ev.actor,
                    detail: ev.detail,
                    prev_hash: std::mem::replace(&mut prev_hash, hash.clone()),
                    hash,
                };
                seq = seq.saturating_add(1);
                row
            })
            .collect()
    }
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
        head(self.tx)
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
