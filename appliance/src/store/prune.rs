//! Retention on the store's side: reading the oldest rows for export,
//! deleting them with a signed checkpoint of the pruned audit prefix, and
//! the audit gap (events that could not be stored because the disk was
//! full), written into the chain once space returns.
//!
//! The chain stays verifiable across pruning: each prune of audit rows
//! `from_seq..=upto_seq` stores a checkpoint (`audit_checkpoints`) naming
//! the hash the first pruned row chained from (`from_prev_hash`) and the
//! hash of the last (`upto_hash`), and appends an `audit.prune` row to the
//! chain in the same transaction. [`Store::verify_audit_from_checkpoint`]
//! starts at the newest checkpoint instead of the genesis; the pruned
//! rows are in the export file the checkpoint names, where
//! `trustbind_policy::audit::verify_export` checks them against it.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};

pub use trustbind_policy::audit::{Checkpoint, CHECKPOINT_CONTEXT};

/// Bytes a checkpoint takes beyond its text fields (numbers, the cell and
/// page overhead), as [`ROW_OVERHEAD`] is for a row.
pub const CHECKPOINT_OVERHEAD: i64 = 120;

use super::{audit, now_ms, AuditEvent, AuditRow, ChainError, Store, StoreError, GENESIS};

/// Bytes an audit row takes beyond its text fields: two hex hashes (128),
/// numbers, the cell and page overhead (measured: docs/BENCHMARKS.md).
pub const ROW_OVERHEAD: f64 = 235.0;

/// Events that could not be audited (the disk was full), by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// Events lost.
    pub events: u64,
    /// By kind.
    pub kinds: BTreeMap<String, u64>,
    /// Time of the first (ms since the epoch).
    pub first_ms: i64,
    /// Time of the last.
    pub last_ms: i64,
}

impl Gap {
    pub(super) fn add(&mut self, kind: &str, n: u64, at_ms: i64) {
        if self.events == 0 {
            self.first_ms = at_ms;
        }
        self.events = self.events.saturating_add(n);
        let k = self.kinds.entry(kind.to_owned()).or_default();
        *k = k.saturating_add(n);
        self.last_ms = at_ms;
    }

    fn merge(&mut self, other: Gap) {
        if other.events == 0 {
            return;
        }
        if self.events == 0 {
            *self = other;
            return;
        }
        self.events = self.events.saturating_add(other.events);
        self.first_ms = self.first_ms.min(other.first_ms);
        self.last_ms = self.last_ms.max(other.last_ms);
        for (k, n) in other.kinds {
            let e = self.kinds.entry(k).or_default();
            *e = e.saturating_add(n);
        }
    }
}

/// One agent report id kept for idempotent `Report`, as exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportKey {
    /// The reporting host.
    pub host: String,
    /// The agent's id of the record.
    pub report_id: String,
    /// Host clock of the record.
    pub host_at_ms: i64,
    /// When it reached the appliance.
    pub received_ms: i64,
}

/// What [`Store::verify_audit_from_checkpoint`] found sound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// Rows present and verified.
    pub rows: i64,
    /// The newest row (the head).
    pub head: i64,
    /// The newest checkpoint, where verification started (none: from the
    /// genesis).
    pub checkpoint: Option<Checkpoint>,
    /// Checkpoints stored (each links to the one before).
    pub checkpoints: i64,
    /// Those checkpoints, oldest first (their signatures are checked by
    /// the caller, which has the CA: `crate::retention::verify_checkpoints`).
    #[serde(skip)]
    pub all: Vec<Checkpoint>,
}

/// What [`Store::consolidate_checkpoints`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consolidation {
    /// No more checkpoints than the bound: nothing to do.
    Kept {
        /// Checkpoints stored.
        checkpoints: usize,
    },
    /// The oldest checkpoints were replaced by one.
    Merged {
        /// How many were replaced.
        replaced: usize,
        /// The one that replaced them.
        checkpoint: Checkpoint,
        /// Checkpoints stored now.
        checkpoints: usize,
    },
    /// The checkpoints did not verify: kept as they are, nothing signed.
    Refused {
        /// What did not verify.
        why: String,
        /// Checkpoints stored.
        checkpoints: usize,
    },
}

/// Whether `e` is SQLite's "database or disk is full" (`SQLITE_FULL`).
pub fn is_disk_full(e: &StoreError) -> bool {
    match e {
        StoreError::DiskFull => true,
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
            f.code == rusqlite::ErrorCode::DiskFull
        }
        _ => false,
    }
}

fn checkpoint_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
    Ok(Checkpoint {
        id: r.get(0)?,
        from_seq: r.get(1)?,
        from_prev_hash: r.get(2)?,
        upto_seq: r.get(3)?,
        upto_hash: r.get(4)?,
        rows: r.get(5)?,
        total_rows: r.get(6)?,
        first_at_ms: r.get(7)?,
        last_at_ms: r.get(8)?,
        made_ms: r.get(9)?,
        export_file: r.get(10)?,
        signature: r.get(11)?,
        signer_pem: r.get(12)?,
    })
}

const CHECKPOINT_COLUMNS: &str = "id, from_seq, from_prev_hash, upto_seq, upto_hash, rows, total_rows, first_at_ms, last_at_ms, made_ms, export_file, signature, signer_pem";

fn newest_checkpoint(conn: &rusqlite::Connection) -> Result<Option<Checkpoint>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY id DESC LIMIT 1"),
            [],
            checkpoint_from,
        )
        .optional()?)
}

/// Stores `cp` (with its id; 0: a new one). Returns the id.
fn insert_checkpoint(conn: &rusqlite::Connection, cp: &Checkpoint) -> Result<i64, StoreError> {
    conn.execute(
        &format!("INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
        params![
            (cp.id != 0).then_some(cp.id),
            cp.from_seq,
            cp.from_prev_hash,
            cp.upto_seq,
            cp.upto_hash,
            cp.rows,
            cp.total_rows,
            cp.first_at_ms,
            cp.last_at_ms,
            cp.made_ms,
            cp.export_file,
            cp.signature,
            cp.signer_pem
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

fn checkpoints(conn: &rusqlite::Connection) -> Result<Vec<Checkpoint>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY id"
    ))?;
    let rows = stmt.query_map([], checkpoint_from)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// The id of the first checkpoint of `cps` (oldest first) that does not
/// continue the one before it (the first: the genesis), if any.
fn discontinuity(cps: &[Checkpoint]) -> Option<i64> {
    let mut before = None;
    for c in cps {
        if !c.continues(before) {
            return Some(c.id);
        }
        before = Some(c);
    }
    None
}

impl Store {
    // ---- the audit gap ----

    /// Counts `n` events of `kind` that could not be audited (disk full);
    /// the count is written into the chain as an `audit.gap` row by the
    /// next append that succeeds.
    pub fn note_audit_gap(&self, kind: &str, n: u64) {
        if let Ok(mut g) = self.gap.lock() {
            g.add(kind, n, now_ms());
        }
        crate::metrics::metrics().record_audit_gap(n);
    }

    /// Events waiting to be recorded as an `audit.gap` row.
    pub fn audit_gap(&self) -> Gap {
        self.gap.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Inside a write transaction: appends the pending gap, if any, as an
    /// `audit.gap` row. The returned gap must be given back with
    /// [`Store::restore_gap`] if the transaction does not commit.
    pub(super) fn append_gap(&self, tx: &Transaction<'_>) -> Result<Option<Gap>, StoreError> {
        let g = match self.gap.lock() {
            Ok(mut g) if g.events > 0 => std::mem::take(&mut *g),
            _ => return Ok(None),
        };
        let ev = AuditEvent::new(
            "audit.gap",
            "appliance",
            serde_json::json!({
                "events": g.events,
                "kinds": g.kinds,
                "first_ms": g.first_ms,
                "last_ms": g.last_ms,
                "why": "the data partition was full: these events were answered but not stored",
            }),
        );
        if let Err(e) = audit::append(tx, now_ms(), &ev) {
            self.restore_gap(Some(g));
            return Err(e);
        }
        Ok(Some(g))
    }

    /// Gives back a gap taken by [`Store::append_gap`] whose transaction
    /// did not commit.
    pub(super) fn restore_gap(&self, g: Option<Gap>) {
        if let (Some(g), Ok(mut cur)) = (g, self.gap.lock()) {
            cur.merge(g);
        }
    }

    /// Test hook: makes the database "full" at `pages` pages (SQLite's
    /// `max_page_count`, on the writer connection), as a full disk would.
    /// Returns the limit in force (never below the current size).
    pub fn set_max_pages(&self, pages: u64) -> Result<u64, StoreError> {
        let conn = self.lock()?;
        let n: u64 = conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
            r.get(0)
        })?;
        Ok(n)
    }

    // ---- sizes ----

    /// Bytes of the database in use by rows (pages not on the free list)
    /// and bytes on the free list (reused before the file grows).
    pub fn db_bytes(&self) -> Result<(u64, u64), StoreError> {
        let conn = self.read()?;
        let size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages: u64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: u64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        Ok((
            pages.saturating_sub(free).saturating_mul(size),
            free.saturating_mul(size),
        ))
    }

    /// An estimate of the bytes the audit and channel rows take in the
    /// database: rows times the average size of the newest 1,000 (their
    /// text plus [`ROW_OVERHEAD`] for the hashes, numbers and B-tree cells),
    /// plus the audit checkpoints' (their text, the server certificate
    /// most of it, plus [`CHECKPOINT_OVERHEAD`]; few, as they are
    /// consolidated, so measured one by one).
    pub fn retained_bytes(&self) -> Result<u64, StoreError> {
        let conn = self.read()?;
        let avg = |sql: &str| -> Result<f64, StoreError> {
            Ok(conn
                .query_row(sql, [], |r| r.get::<_, Option<f64>>(0))?
                .unwrap_or(0.0))
        };
        let audit_avg = avg(
            "SELECT avg(length(detail) + length(kind) + length(actor)) FROM
             (SELECT detail, kind, actor FROM audit ORDER BY seq DESC LIMIT 1000)",
        )?;
        let channel_avg = avg(
            "SELECT avg(length(key_id) + length(src_host) + length(dst_host) + length(tuple)) FROM
             (SELECT key_id, src_host, dst_host, tuple FROM channels ORDER BY id DESC LIMIT 1000)",
        )?;
        let (audit, channels): (i64, i64) = conn.query_row(
            "SELECT (SELECT count(*) FROM audit), (SELECT count(*) FROM channels)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let checkpoints: i64 = conn.query_row(
            "SELECT coalesce(sum(length(from_prev_hash) + length(upto_hash) + length(export_file)
                 + length(signature) + length(signer_pem) + ?1), 0) FROM audit_checkpoints",
            [CHECKPOINT_OVERHEAD],
            |r| r.get(0),
        )?;
        let bytes = audit as f64 * (audit_avg + ROW_OVERHEAD)
            + channels as f64 * (channel_avg + 2.0 * ROW_OVERHEAD)
            + checkpoints as f64;
        Ok(bytes as u64)
    }

    /// Rows of the audit log, channels and agent report ids.
    pub fn retained_rows(&self) -> Result<(i64, i64, i64), StoreError> {
        let conn = self.read()?;
        let count = |t: &str| -> Result<i64, StoreError> {
            Ok(conn.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))?)
        };
        Ok((count("audit")?, count("channels")?, count("agent_reports")?))
    }

    // ---- audit ----

    /// The oldest audit rows, at most `limit`; only rows written before
    /// `before_ms` if given.
    pub fn oldest_audit(
        &self,
        before_ms: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare_cached(
            "SELECT seq, at_ms, kind, actor, detail, prev_hash, hash FROM audit
             ORDER BY seq LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit], super::row_from)?;
        let mut out = Vec::new();
        for r in rows {
            let r = r?;
            // Rows are in time order up to clock steps; stop at the first
            // young one so the pruned set stays a prefix.
            if before_ms.is_some_and(|b| r.at_ms >= b) {
                break;
            }
            out.push(r);
        }
        Ok(out)
    }

    /// Deletes the audit prefix `rows` (oldest first, as read by
    /// [`Store::oldest_audit`], already exported to `export_file`) and
    /// stores its checkpoint, signed by `sign` (over
    /// [`Checkpoint::message`]; returns the signature, hex, and the
    /// signer's certificate PEM), in one transaction that also appends an
    /// `audit.prune` row.
    pub fn prune_audit(
        &self,
        rows: &[AuditRow],
        export_file: &str,
        sign: impl FnOnce(&[u8]) -> Result<(String, String), String>,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(None);
        };
        let mut conn = self.lock()?;
        let prev = newest_checkpoint(&conn)?;
        let expected_from = prev.as_ref().map_or(1, |c| c.upto_seq.saturating_add(1));
        let expected_prev = prev
            .as_ref()
            .map_or_else(|| GENESIS.to_owned(), |c| c.upto_hash.clone());
        if first.seq != expected_from || first.prev_hash != expected_prev {
            return Err(StoreError::Conflict(format!(
                "audit rows {}..={} are not the oldest unpruned rows (expected row {expected_from})",
                first.seq, last.seq
            )));
        }
        let mut cp = Checkpoint {
            id: 0,
            from_seq: first.seq,
            from_prev_hash: first.prev_hash.clone(),
            upto_seq: last.seq,
            upto_hash: last.hash.clone(),
            rows: i64::try_from(rows.len()).unwrap_or(i64::MAX),
            total_rows: prev
                .as_ref()
                .map_or(0, |c| c.total_rows)
                .saturating_add(i64::try_from(rows.len()).unwrap_or(i64::MAX)),
            first_at_ms: first.at_ms,
            last_at_ms: last.at_ms,
            made_ms: now_ms(),
            export_file: export_file.to_owned(),
            signature: String::new(),
            signer_pem: String::new(),
        };
        let (sig, pem) = sign(&cp.message()).map_err(StoreError::Conflict)?;
        cp.signature = sig;
        cp.signer_pem = pem;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut gap = None;
        let r = (|| {
            // The rows must be exactly what was exported.
            let (n, hash): (i64, Option<String>) = tx.query_row(
                "SELECT count(*), (SELECT hash FROM audit WHERE seq = ?2) FROM audit WHERE seq BETWEEN ?1 AND ?2",
                params![cp.from_seq, cp.upto_seq],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if n != cp.rows || hash.as_deref() != Some(cp.upto_hash.as_str()) {
                return Err(StoreError::Conflict(format!(
                    "audit rows {}..={} changed since they were exported",
                    cp.from_seq, cp.upto_seq
                )));
            }
            // The delete first: on a full disk, what follows is written
            // into the pages it frees.
            tx.execute("DELETE FROM audit WHERE seq <= ?1", params![cp.upto_seq])?;
            gap = self.append_gap(&tx)?;
            cp.id = insert_checkpoint(&tx, &cp)?;
            let ev = AuditEvent::new(
                "audit.prune",
                "appliance",
                serde_json::json!({
                    "checkpoint": cp.id,
                    "from_seq": cp.from_seq,
                    "upto_seq": cp.upto_seq,
                    "upto_hash": cp.upto_hash,
                    "rows": cp.rows,
                    "total_rows": cp.total_rows,
                    "export_file": cp.export_file,
                }),
            );
            audit::append(&tx, now_ms(), &ev)?;
            Ok(())
        })();
        match r.and_then(|()| Ok(tx.commit()?)) {
            Ok(()) => Ok(Some(cp)),
            Err(e) => {
                self.restore_gap(gap);
                Err(e)
            }
        }
    }

    /// The newest checkpoint, if any prefix was pruned.
    pub fn newest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let conn = self.read()?;
        newest_checkpoint(&conn)
    }

    /// Every checkpoint, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let conn = self.read()?;
        checkpoints(&conn)
    }

    /// Bounds the checkpoints: when more than `max` are stored (at least
    /// 2), the oldest of them, all but the newest `max / 2`, are replaced
    /// by one checkpoint that says what they said together
    /// ([`Checkpoint::consolidate`]), signed by `sign` like a prune's, in
    /// one transaction that deletes them and appends an
    /// `audit.checkpoints` row naming them. Only if every stored
    /// checkpoint continues the one before it (from the genesis) and
    /// `verify` (the signature against the CA) accepts each one replaced;
    /// if not, nothing is signed or changed and the reason is returned
    /// ([`Consolidation::Refused`]): a broken or forged checkpoint is
    /// never signed over, and stays for `audit verify` to report.
    ///
    /// The newest checkpoint is never replaced: it is what `audit verify`
    /// shows and what the newest export file's last checkpoint line must
    /// equal. The replaced ones stay, as they were signed, in the export
    /// files (each after its rows), and the chain's `audit.prune` rows name
    /// each of them.
    pub fn consolidate_checkpoints(
        &self,
        max: usize,
        sign: impl FnOnce(&[u8]) -> Result<(String, String), String>,
        verify: impl Fn(&Checkpoint) -> Result<(), String>,
    ) -> Result<Consolidation, StoreError> {
        let max = max.max(2);
        // Read, checked and signed without the writer lock (decisions
        // append meanwhile); the transaction below makes sure the run is
        // still what was checked.
        let cps = self.checkpoints()?;
        if cps.len() <= max {
            return Ok(Consolidation::Kept {
                checkpoints: cps.len(),
            });
        }
        let keep = max / 2;
        let run = cps.get(..cps.len() - keep).unwrap_or_default();
        let refused = |why: String| {
            Ok(Consolidation::Refused {
                why,
                checkpoints: cps.len(),
            })
        };
        if let Some(id) = discontinuity(&cps) {
            return refused(format!(
                "audit checkpoint {id} does not continue the checkpoint before it"
            ));
        }
        for c in run {
            if let Err(e) = verify(c) {
                return refused(format!("audit checkpoint {}: {e}", c.id));
            }
        }
        let (Some(first), Some(mut merged)) = (run.first(), Checkpoint::consolidate(run, now_ms()))
        else {
            return refused("no checkpoints to consolidate".into());
        };
        let (sig, pem) = sign(&merged.message()).map_err(StoreError::Conflict)?;
        merged.signature = sig;
        merged.signer_pem = pem;
        let first_id = first.id;
        self.write(|tx| {
            let now = checkpoints(tx)?;
            if now.get(..run.len()) != Some(run) {
                return Err(StoreError::Conflict(
                    "the audit checkpoints changed while they were consolidated".into(),
                ));
            }
            let n = tx.execute(
                "DELETE FROM audit_checkpoints WHERE id BETWEEN ?1 AND ?2",
                params![first_id, merged.id],
            )?;
            if n != run.len() {
                return Err(StoreError::Conflict(format!(
                    "{n} audit checkpoints between {first_id} and {} (expected {})",
                    merged.id,
                    run.len()
                )));
            }
            insert_checkpoint(tx, &merged)?;
            let ev = AuditEvent::new(
                "audit.checkpoints",
                "appliance",
                serde_json::json!({
                    "consolidated": run.len(),
                    "first": first_id,
                    "checkpoint": merged.id,
                    "from_seq": merged.from_seq,
                    "upto_seq": merged.upto_seq,
                    "upto_hash": merged.upto_hash,
                    "total_rows": merged.total_rows,
                }),
            );
            Ok(((), Some(ev)))
        })?;
        Ok(Consolidation::Merged {
            replaced: run.len(),
            checkpoints: cps.len() - run.len() + 1,
            checkpoint: merged,
        })
    }

    /// Walks the checkpoints (each must continue the one before) and the
    /// chain from the newest checkpoint to the head. Signatures are not
    /// checked here (the store has no CA): see
    /// `crate::retention::verify_checkpoint`.
    pub fn verify_audit_from_checkpoint(
        &self,
    ) -> Result<Result<ChainReport, ChainError>, StoreError> {
        self.verify_chain(&mut || {})
    }

    /// [`Store::verify_audit_from_checkpoint`], calling `between` after
    /// the checkpoints and after the rows are read (tests commit there).
    ///
    /// The checkpoints, the rows and the recorded head are read in one
    /// read transaction on one connection, so they are of one commit: an
    /// append or a prune committing while the chain is walked (decisions,
    /// retention) must not be taken for a break. Read in separate
    /// snapshots, a row appended after the walk made the head run ahead
    /// of the rows (`Head`), and a prune committed after the checkpoints
    /// were read made the rows start past the newest checkpoint read
    /// (`Gap`).
    fn verify_chain(
        &self,
        between: &mut dyn FnMut(),
    ) -> Result<Result<ChainReport, ChainError>, StoreError> {
        let conn = self.read()?;
        // Deferred: the snapshot is taken at the first read, and held
        // until the transaction ends (a reader never writes).
        let tx = conn.unchecked_transaction()?;
        let cps = checkpoints(&tx)?;
        between();
        let (mut expected, mut prev) = (1_i64, GENESIS.to_owned());
        if let Some(id) = discontinuity(&cps) {
            return Ok(Err(ChainError::Checkpoint { id }));
        }
        if let Some(c) = cps.last() {
            expected = c.upto_seq.saturating_add(1);
            prev.clone_from(&c.upto_hash);
        }
        let mut stmt = tx.prepare(
            "SELECT seq, at_ms, kind, actor, detail, prev_hash, hash FROM audit ORDER BY rowid",
        )?;
        let mut q = stmt.query([])?;
        let mut rows = 0_i64;
        while let Some(r) = q.next()? {
            let row = super::row_from(r)?;
            if let Err(e) = audit::check_row(&row, expected, &prev) {
                return Ok(Err(e));
            }
            prev = row.hash;
            expected = expected.saturating_add(1);
            rows = rows.saturating_add(1);
        }
        drop(q);
        drop(stmt);
        between();
        let last_seq = expected.saturating_sub(1);
        let head: Option<(i64, String)> = tx
            .query_row("SELECT seq, hash FROM audit_head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        tx.commit()?;
        let (head_seq, head_hash) = head.unwrap_or((0, GENESIS.to_owned()));
        if head_seq != last_seq || head_hash != prev {
            return Ok(Err(ChainError::Head { head_seq, last_seq }));
        }
        Ok(Ok(ChainReport {
            rows,
            head: head_seq,
            checkpoints: i64::try_from(cps.len()).unwrap_or(i64::MAX),
            checkpoint: cps.last().cloned(),
            all: cps,
        }))
    }

    // ---- channels and agent reports ----

    /// Closed channels, oldest close first, closed before `before_ms`
    /// (any closed one if `None`), at most `limit`.
    pub fn closed_channels(
        &self,
        before_ms: Option<i64>,
        limit: u32,
    ) -> Result<Vec<super::ChannelInfo>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare_cached(
            "SELECT id FROM channels WHERE closed_ms IS NOT NULL AND closed_ms < ?1
             ORDER BY closed_ms LIMIT ?2",
        )?;
        let ids = stmt
            .query_map(params![before_ms.unwrap_or(i64::MAX), limit], |r| {
                r.get::<_, i64>(0)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(conn);
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(c) = self
                .list_channels(false, id.saturating_sub(1), 1)?
                .into_iter()
                .next()
            {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Deletes channels by id (exported already), auditing the count.
    pub fn delete_channels(&self, ids: &[i64]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.write(|tx| {
            let mut n = 0_u64;
            for id in ids {
                n = n
                    .saturating_add(tx.execute("DELETE FROM channels WHERE id = ?1", [id])? as u64);
            }
            let ev = AuditEvent::new(
                "retention.prune",
                "appliance",
                serde_json::json!({ "table": "channels", "rows": n, "max_id": ids.iter().max() }),
            );
            Ok((n, Some(ev)))
        })
    }

    /// Agent report ids received before `before_ms` (any if `None`),
    /// oldest first, at most `limit`.
    pub fn old_reports(
        &self,
        before_ms: Option<i64>,
        limit: u32,
    ) -> Result<Vec<ReportKey>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare_cached(
            "SELECT host, report_id, host_at_ms, received_ms FROM agent_reports
             WHERE received_ms < ?1 ORDER BY received_ms LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![before_ms.unwrap_or(i64::MAX), limit], |r| {
            Ok(ReportKey {
                host: r.get(0)?,
                report_id: r.get(1)?,
                host_at_ms: r.get(2)?,
                received_ms: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Deletes agent report ids (exported already), auditing the count.
    /// A record delivered again after this is stored again (the agent
    /// deletes what was acknowledged, so only a replay does that).
    pub fn delete_reports(&self, keys: &[ReportKey]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        self.write(|tx| {
            let mut n = 0_u64;
            for k in keys {
                n = n.saturating_add(tx.execute(
                    "DELETE FROM agent_reports WHERE host = ?1 AND report_id = ?2",
                    params![k.host, k.report_id],
                )? as u64);
            }
            let newest = keys.iter().map(|k| k.received_ms).max();
            let ev = AuditEvent::new(
                "retention.prune",
                "appliance",
                serde_json::json!({ "table": "agent_reports", "rows": n, "received_before_ms": newest }),
            );
            Ok((n, Some(ev)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(rows: usize) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("appliance.db")).unwrap();
        let evs: Vec<AuditEvent> = (0..rows)
            .map(|i| AuditEvent::new("test", "t", serde_json::json!({ "i": i })))
            .collect();
        s.append_audit_batch(&evs).unwrap();
        (dir, s)
    }

    fn prune(s: &Store, n: u32) -> Checkpoint {
        let rows = s.oldest_audit(None, n).unwrap();
        s.prune_audit(&rows, "audit-00000001.jsonl", |_| {
            Ok((String::new(), String::new()))
        })
        .unwrap()
        .unwrap()
    }

    fn no_key(_: &[u8]) -> Result<(String, String), String> {
        Ok(("5167".into(), "signer".into()))
    }

    fn count(s: &Store) -> usize {
        s.checkpoints().unwrap().len()
    }

    /// Many prunes: the checkpoints stay at most `max` (`max + 1` between a
    /// prune and its consolidation), the newest is never replaced, and
    /// the chain still verifies from the genesis through all of them.
    #[test]
    fn consolidation_bounds_the_checkpoints_and_the_chain_still_verifies() {
        let (_dir, s) = store(400);
        let max = 6;
        let mut merged = 0;
        for i in 0..30 {
            let newest = prune(&s, 10);
            assert!(count(&s) <= max + 1);
            match s.consolidate_checkpoints(max, no_key, |_| Ok(())).unwrap() {
                Consolidation::Kept { checkpoints } => assert!(checkpoints <= max, "{i}"),
                Consolidation::Merged {
                    replaced,
                    checkpoint,
                    checkpoints,
                } => {
                    merged += 1;
                    assert_eq!((replaced, checkpoints), (max + 1 - max / 2, max / 2 + 1));
                    assert_eq!(
                        (checkpoint.from_seq, checkpoint.from_prev_hash.as_str()),
                        (1, GENESIS)
                    );
                    assert_eq!(checkpoint.signature, "5167");
                }
                Consolidation::Refused { why, .. } => panic!("{why}"),
            }
            assert!(count(&s) <= max);
            // The newest is the prune's, as it was made.
            assert_eq!(s.newest_checkpoint().unwrap().unwrap(), newest);
            let r = s.verify_audit_from_checkpoint().unwrap().unwrap();
            assert_eq!(r.checkpoint.as_ref(), Some(&newest));
            assert_eq!(r.all.len(), count(&s));
        }
        assert!(merged >= 8, "{merged}");
        let cps = s.checkpoints().unwrap();
        // The oldest covers the pruned prefix from row 1 up to where the
        // next begins; ids stay in order.
        assert_eq!(cps[0].from_seq, 1);
        assert!(cps
            .windows(2)
            .all(|w| w[1].continues(Some(&w[0])) && w[0].id < w[1].id));
        let newest = cps.last().unwrap();
        assert_eq!(newest.total_rows, newest.upto_seq);
        // Every consolidation is in the chain.
        let rows = s.audit_rows(0, 10_000).unwrap();
        assert_eq!(
            rows.iter()
                .filter(|r| r.kind == "audit.checkpoints")
                .count(),
            merged
        );
    }

    /// A checkpoint that does not verify (its signature, or the one
    /// before it) is never signed over: nothing changes, and the reason
    /// is returned.
    #[test]
    fn checkpoints_that_do_not_verify_are_not_consolidated() {
        let (_dir, s) = store(200);
        for _ in 0..5 {
            prune(&s, 10);
        }
        let before = s.checkpoints().unwrap();
        let r = s
            .consolidate_checkpoints(4, no_key, |c| {
                if c.id == 2 {
                    Err("forged".into())
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert_eq!(
            r,
            Consolidation::Refused {
                why: "audit checkpoint 2: forged".into(),
                checkpoints: 5
            }
        );
        assert_eq!(s.checkpoints().unwrap(), before);

        // A stored checkpoint edited: the walk says so, and so does
        // consolidation, which leaves it.
        let conn = s.lock().unwrap();
        conn.execute(
            "UPDATE audit_checkpoints SET upto_hash = ?1 WHERE id = 3",
            ["f".repeat(64)],
        )
        .unwrap();
        drop(conn);
        let r = s
            .consolidate_checkpoints(4, |_| panic!("signed"), |_| Ok(()))
            .unwrap();
        assert!(
            matches!(r, Consolidation::Refused { ref why, checkpoints: 5 } if why.contains("checkpoint 4")),
            "{r:?}"
        );
        assert!(matches!(
            s.verify_audit_from_checkpoint().unwrap(),
            Err(ChainError::Checkpoint { id: 4 })
        ));
        assert_eq!(count(&s), 5);
    }

    /// The checkpoints count in the store budget: their certificates are
    /// most of them.
    #[test]
    fn retained_bytes_count_the_checkpoints() {
        let (_d1, a) = store(100);
        let (_d2, b) = store(100);
        let rows = a.oldest_audit(None, 10).unwrap();
        a.prune_audit(&rows, "f", |_| Ok((String::new(), String::new())))
            .unwrap();
        let rows = b.oldest_audit(None, 10).unwrap();
        b.prune_audit(&rows, "f", |_| Ok((String::new(), "c".repeat(10_000))))
            .unwrap();
        let (ra, rb) = (a.retained_bytes().unwrap(), b.retained_bytes().unwrap());
        assert!(rb >= ra + 10_000, "{ra} {rb}");
    }

    fn decision() -> AuditEvent {
        AuditEvent::new("decision", "host1", serde_json::json!({ "allow": true }))
    }

    /// Verifies the chain, running `commit` at the `at`-th pause of the
    /// walk (1: after the checkpoints are read, 2: after the rows).
    fn verify_committing_at(
        s: &Store,
        at: u32,
        commit: impl Fn(),
    ) -> Result<ChainReport, ChainError> {
        let mut calls = 0;
        s.verify_chain(&mut || {
            calls += 1;
            if calls == at {
                commit();
            }
        })
        .unwrap()
    }

    /// A decision's row committed after the rows were walked, before the
    /// recorded head is read: the head is of the same snapshot as the rows.
    #[test]
    fn an_append_during_verification_is_not_a_head_mismatch() {
        let (_dir, s) = store(20);
        prune(&s, 10);
        let r = verify_committing_at(&s, 2, || {
            s.append_audit(&decision()).unwrap();
        })
        .expect("an append during verification broke the chain");
        // What was committed when verification began: 10 rows left and the
        // `audit.prune` row.
        assert_eq!((r.rows, r.head), (11, 21));
        assert_eq!(s.verify_audit_from_checkpoint().unwrap().unwrap().head, 22);
    }

    /// Retention's prune committed after the checkpoints were read, before
    /// the rows: the rows are of the same snapshot as the checkpoints.
    #[test]
    fn a_prune_during_verification_is_not_a_gap() {
        let (_dir, s) = store(30);
        prune(&s, 10);
        let r = verify_committing_at(&s, 1, || {
            prune(&s, 10);
            s.append_audit(&decision()).unwrap();
        })
        .expect("a prune during verification broke the chain");
        assert_eq!((r.checkpoints, r.rows, r.head), (1, 21, 31));
        let after = s.verify_audit_from_checkpoint().unwrap().unwrap();
        assert_eq!((after.checkpoints, after.rows, after.head), (2, 13, 33));
    }
}
