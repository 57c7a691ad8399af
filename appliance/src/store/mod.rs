//! Persistent state: signatures, reference groups, policy versions, hosts,
//! channels and the audit chain, in one SQLite file in WAL mode.
//!
//! Every write goes through one connection behind a mutex, so there is
//! exactly one writer; every admin change is written in the same
//! transaction as its audit row, so the two cannot diverge. Reads run on
//! separate read connections (`read.rs`), so no lookup waits behind a
//! commit, an audit verification or an export. The file is opened with
//! `synchronous = FULL`: a call that returned `Ok` survives a crash (power
//! loss included).

mod addresses;
mod admin;
mod admin_tokens;
mod agent;
mod audit;
mod channels;
mod err;
mod files;
mod identity;
mod ledger;
pub mod migrate;
pub mod observed;
mod prune;
mod read;
mod writer;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trustbind_policy::source::SourceError;

pub use admin::{
    GroupInfo, HostGroupInfo, HostInfo, LicenseKey, LicenseRow, LicenseTerms, PolicyInfo, RoleInfo,
    SignatureBatch, UserInfo, AUDIT_SINCE,
};
pub use admin_tokens::AdminToken;
pub use agent::{AgentRecord, CloseReport, CloseRole};
pub use audit::{row_hash, AuditEvent, AuditRow, AuditTx, GENESIS};
pub use channels::{ChannelEnd, ChannelInfo};
pub use err::{ChainError, StoreError};
pub use files::{FileSetChange, FileSetEdit};
pub use identity::{AdminCert, AdminRole, DEFAULT_TOKEN_TTL_MS, MAX_TOKEN_TTL_MS};
pub use ledger::{Publish, DEFER_MAX_MS, DEFER_QUIET_MS};
pub use observed::{
    Approval, ApprovedProgram, Observation, ObservedFilter, ObservedHost, ObservedRow,
    ObservedState, ObservedWrite, Seen,
};
pub use prune::{
    is_disk_full, ChainReport, Checkpoint, Consolidation, Gap, ReportKey, CHECKPOINT_CONTEXT,
};
pub use trustbind_policy::source::{
    EngineData, Mode, PolicyPrep, PolicyState, PolicyVersion, Versions,
};
pub use writer::{AuditWriter, WriterStats, MAX_BATCH};

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

fn check_hex(what: &'static str, s: &str, len: usize) -> Result<(), StoreError> {
    if s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(StoreError::Invalid {
            what,
            why: format!("expected {len} lower-case hex digits"),
        })
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A known program file. SHA-256 is its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// SHA-256 of the file, lower-case hex (the identity).
    pub sha256: String,
    /// SHA-1 of the file, lower-case hex, when known (NSRL).
    pub sha1: Option<String>,
    /// File size in bytes.
    pub size: u64,
    /// File name as imported.
    pub name: String,
    /// Where it came from, e.g. `nsrl:2024.12.1` or `admin`.
    pub source: String,
}

/// The governing policy and the verdict generation.
///
/// The generation moves, in the same transaction as the change, on
/// everything that can change a verdict some host may have cached: policy
/// activation and rollback, user roles, host-group modes, an exceeded
/// license, and a membership change (group membership, signature removal)
/// that touches a program answered since the generation last moved (see
/// `ledger.rs`; a bulk import may defer that move until it is quiet).
/// Registering a host, or adding programs no host has asked about, does
/// not move it. Agents are pushed the new value and drop their cached
/// verdicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Governing {
    /// Active version, if any (none means default deny).
    pub active: Option<i64>,
    /// The version that was active before, the target of a rollback.
    pub previous: Option<i64>,
    /// Incremented by every change that can change a verdict.
    pub generation: i64,
}

/// Enrolment state of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Token issued, not yet used.
    Pending,
    /// Holds a certificate.
    Enrolled,
    /// Refused from now on.
    Revoked,
}

/// Handle on the store; cheap to share behind an `Arc`.
pub struct Store {
    conn: Mutex<Connection>,
    readers: read::Readers,
    /// Last committed verdict generation, readable without the lock.
    generation: AtomicI64,
    /// Last committed data and membership versions.
    data_version: AtomicI64,
    members_version: AtomicI64,
    ledger: Mutex<ledger::Ledger>,
    preps: Mutex<Vec<Weak<dyn PolicyPrep>>>,
    /// Events answered but not audited (disk full), for the next append.
    gap: Mutex<prune::Gap>,
}

/// Page size of a new store's file. The audit chain is most of what is
/// written (≈ 1 KiB a decision row, appended in batches of up to
/// [`writer::MAX_BATCH`]); 16 KiB pages take a quarter of the WAL frames,
/// `pwrite`s and checkpoint copies of SQLite's 4 KiB default for the same
/// rows (docs/BENCHMARKS.md, "Audit rows on the cold path", 2026-12-07
/// later). Stores made before keep 4 KiB: SQLite changes a WAL file's
/// page size only by a rebuild.
pub const PAGE_SIZE: u32 = 16_384;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("versions", &self.versions_hint())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`, sets WAL mode and
    /// runs pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        // Takes effect only for a new file (before WAL mode writes its
        // header); an existing store keeps its page size.
        conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate::migrate(&mut conn)?;
        let v = read_versions(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            readers: read::Readers::open(path)?,
            generation: AtomicI64::new(v.generation),
            data_version: AtomicI64::new(v.data),
            members_version: AtomicI64::new(v.members),
            ledger: Mutex::new(ledger::Ledger::new(v.generation, v.members)),
            preps: Mutex::new(Vec::new()),
            gap: Mutex::new(prune::Gap::default()),
        })
    }

    /// The last committed versions, without touching SQLite (each moves
    /// only after the change that moved it has committed).
    pub fn versions_hint(&self) -> Versions {
        Versions {
            generation: self.generation.load(Ordering::Acquire),
            data: self.data_version.load(Ordering::Acquire),
            members: self.members_version.load(Ordering::Acquire),
        }
    }

    /// The committed versions, read from the database.
    pub fn versions(&self) -> Result<Versions, StoreError> {
        let conn = self.read()?;
        read_versions(&conn)
    }

    /// A read connection (never the writer's).
    fn read(&self) -> Result<read::Reader<'_>, StoreError> {
        self.readers.get()
    }

    /// Registers `prep`, called with each policy version about to become
    /// governing (activation, rollback) before the switch is written.
    pub fn add_policy_prep(&self, prep: Weak<dyn PolicyPrep>) {
        if let Ok(mut v) = self.preps.lock() {
            v.retain(|w| w.strong_count() > 0);
            v.push(prep);
        }
    }

    fn prepare_policy(&self, id: i64) -> Result<(), StoreError> {
        let Some(pv) = self.policy(id)? else {
            return Ok(());
        };
        let preps: Vec<_> = match self.preps.lock() {
            Ok(v) => v.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => return Err(StoreError::Poisoned),
        };
        for p in preps {
            p.prepare(&pv);
        }
        Ok(())
    }

    /// Records that a decision about `programs` (the acting program, and a
    /// pair's or UNIX connect's peer) was answered, allowing or not, from
    /// data at `generation` and membership version `members`. Returns
    /// false when the host must not cache the answer (a membership change
    /// touching one of them raced it); see `ledger.rs`.
    pub fn note_answer(
        &self,
        generation: i64,
        members: i64,
        programs: &[&str],
        allow: bool,
    ) -> bool {
        match self.ledger.lock() {
            Ok(mut l) => l.note(generation, members, programs, allow),
            Err(_) => false,
        }
    }

    /// Moves the generation for deferred approvals (a bulk import that
    /// touched programs hosts were denied) once no deferred change came
    /// for `quiet_ms`, or `max_ms` after the first. Returns the new
    /// generation when it moved. The appliance calls this periodically.
    pub fn settle_deferred(
        &self,
        now_ms: i64,
        quiet_ms: i64,
        max_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        let due = match self.ledger.lock() {
            Ok(l) => l.deferred().filter(|d| {
                now_ms.saturating_sub(d.last_ms) >= quiet_ms
                    || now_ms.saturating_sub(d.since_ms) >= max_ms
            }),
            Err(_) => return Err(StoreError::Poisoned),
        };
        let Some(d) = due else { return Ok(None) };
        self.write(|tx| {
            bump_generation(tx)?;
            let g = read_generation(tx)?;
            let ev = AuditEvent::new(
                "generation.move",
                "appliance",
                serde_json::json!({ "generation": g, "reason": "deferred approvals", "since_ms": d.since_ms }),
            );
            Ok((Some(g), Some(ev)))
        })
    }

    /// Whether a deferred generation move is waiting.
    pub fn deferred_move(&self) -> bool {
        self.ledger
            .lock()
            .map(|l| l.deferred().is_some())
            .unwrap_or(false)
    }

    /// Inside a membership change's transaction: classifies the change of
    /// `programs`' memberships, moves the generation if it must, and moves
    /// the membership version. The returned guard must live until the
    /// transaction has committed or failed.
    fn members_changed(
        &self,
        tx: &rusqlite::Transaction<'_>,
        programs: Vec<String>,
        publish: Publish,
    ) -> Result<PendingChange<'_>, StoreError> {
        let effect = self
            .ledger
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .classify(&programs, publish, now_ms());
        let guard = PendingChange {
            store: self,
            programs,
        };
        if guard.programs.is_empty() {
            return Ok(guard);
        }
        if effect == ledger::Effect::Move {
            bump_generation(tx)?;
        }
        tx.execute(
            "UPDATE governing SET members_version = members_version + 1 WHERE id = 1",
            [],
        )?;
        Ok(guard)
    }

    /// The last committed verdict generation, without touching SQLite.
    /// Cheap enough for every decision; moves only after the change that
    /// moved it has committed.
    pub fn generation_hint(&self) -> i64 {
        self.generation.load(Ordering::Acquire)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Runs `f` in an immediate transaction, appending `ev` (if given) in the
    /// same transaction, and commits.
    fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<(T, Option<AuditEvent>), StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let gap = self.append_gap(&tx)?;
        let r = (|| {
            let (out, ev) = f(&tx)?;
            if let Some(ev) = ev {
                audit::append(&tx, now_ms(), &ev)?;
            }
            tx.commit()?;
            Ok(out)
        })();
        let out = match r {
            Ok(out) => out,
            Err(e) => {
                self.restore_gap(gap);
                return Err(e);
            }
        };
        // Still under the lock: the hints never run ahead of the database.
        let v = read_versions(&conn)?;
        self.generation.store(v.generation, Ordering::Release);
        self.data_version.store(v.data, Ordering::Release);
        self.members_version.store(v.members, Ordering::Release);
        if let Ok(mut l) = self.ledger.lock() {
            l.sync(v.generation, v.members);
        }
        Ok(out)
    }

    /// Current schema version.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(self
            .lock()?
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Journal mode in force (`wal` once opened).
    pub fn journal_mode(&self) -> Result<String, StoreError> {
        Ok(self
            .lock()?
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))?)
    }

    /// Result of `PRAGMA integrity_check` (`ok` when sound).
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        Ok(self
            .lock()?
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }

    // ---- audit ----

    /// Appends one audit event; durable when this returns `Ok`.
    ///
    /// When the disk is full (`SQLITE_FULL`) the event is counted in the
    /// audit gap (written as an `audit.gap` row by the next append that
    /// succeeds) and [`StoreError::DiskFull`] is returned: a caller
    /// answering a decision answers it anyway.
    pub fn append_audit(&self, ev: &AuditEvent) -> Result<AuditRow, StoreError> {
        self.append_audit_batch(std::slice::from_ref(ev))?
            .pop()
            .ok_or(StoreError::Unreachable("one event, no row"))
    }

    /// Appends `events` in order in one transaction (one commit); all or
    /// nothing, durable when this returns `Ok`. A full disk counts every
    /// event in the audit gap, as for [`Store::append_audit`].
    pub fn append_audit_batch(&self, events: &[AuditEvent]) -> Result<Vec<AuditRow>, StoreError> {
        self.append_audit_owned(events.to_vec())
    }

    /// [`Store::append_audit_batch`], the rows made of the events' own
    /// text rather than copies. Used by [`AuditWriter`].
    pub fn append_audit_owned(&self, events: Vec<AuditEvent>) -> Result<Vec<AuditRow>, StoreError> {
        let mut conn = self.lock()?;
        let r = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let gap = self.append_gap(&tx)?;
            let at = now_ms();
            let chained =
                audit::append_all(&tx, at, &events).and_then(|c| Ok(tx.commit().map(|()| c)?));
            if chained.is_err() {
                self.restore_gap(gap);
            }
            chained
        })();
        match r {
            Ok(chained) => Ok(chained.rows(events)),
            Err(e) if prune::is_disk_full(&e) => {
                for ev in &events {
                    self.note_audit_gap(&ev.kind, 1);
                }
                Err(StoreError::DiskFull)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs `f` on the audit chain in one immediate transaction and
    /// commits if it succeeds (a pending audit gap row first, as for any
    /// append): the forward-secure seals (`crate::audit_seal`) read the
    /// head and append their row with nothing in between.
    pub fn audit_transaction<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&audit::AuditTx<'_, '_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.lock()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let gap = self.append_gap(&tx)?;
        let r = f(&audit::AuditTx { tx: &tx })
            .and_then(|out| Ok(tx.commit().map(|()| out).map_err(StoreError::from)?));
        if r.is_err() {
            self.restore_gap(gap);
        }
        r
    }

    /// Walks the whole chain. `Ok(Ok(n))`: `n` rows, all sound;
    /// `Ok(Err(e))`: the first break found.
    pub fn verify_audit(&self) -> Result<Result<i64, ChainError>, StoreError> {
        Ok(self.verify_audit_from_checkpoint()?.map(|r| r.rows))
    }

    /// Writes rows with `seq > after` as JSON lines to `out`; returns how many.
    pub fn export_audit(&self, after: i64, out: &mut impl Write) -> Result<u64, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, kind, actor, detail, prev_hash, hash FROM audit WHERE seq > ?1 ORDER BY seq",
        )?;
        let mut rows = stmt.query([after])?;
        let mut n = 0_u64;
        while let Some(r) = rows.next()? {
            serde_json::to_writer(&mut *out, &row_from(r)?)?;
            out.write_all(b"\n")?;
            n = n.saturating_add(1);
        }
        Ok(n)
    }

    /// Rows with `seq > after`, oldest first, at most `limit`.
    pub fn audit_rows(&self, after: i64, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, kind, actor, detail, prev_hash, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit], row_from)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    // ---- signatures and reference groups ----

    /// Inserts or replaces a signature, audited as `actor`.
    pub fn put_signature(&self, sig: &Signature, actor: &str) -> Result<(), StoreError> {
        check_hex("sha256", &sig.sha256, 64)?;
        if let Some(s1) = &sig.sha1 {
            check_hex("sha1", s1, 40)?;
        }
        let size = i64::try_from(sig.size).map_err(|_| StoreError::Invalid {
            what: "size",
            why: "too large".into(),
        })?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO signatures (sha256, sha1, size, name, source, added_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (sha256) DO UPDATE SET sha1 = excluded.sha1, size = excluded.size,
                   name = excluded.name, source = excluded.source",
                params![sig.sha256, sig.sha1, size, sig.name, sig.source, now_ms()],
            )?;
            let ev = AuditEvent::new("signature.put", actor, serde_json::json!({ "sha256": sig.sha256, "name": sig.name, "source": sig.source }));
            Ok(((), Some(ev)))
        })
    }

    /// Looks up a signature by SHA-256.
    pub fn signature(&self, sha256: &str) -> Result<Option<Signature>, StoreError> {
        let conn = self.read()?;
        Ok(conn
            .query_row(
                "SELECT sha256, sha1, size, name, source FROM signatures WHERE sha256 = ?1",
                [sha256],
                |r| {
                    let size: i64 = r.get(2)?;
                    Ok(Signature {
                        sha256: r.get(0)?,
                        sha1: r.get(1)?,
                        size: u64::try_from(size).unwrap_or(0),
                        name: r.get(3)?,
                        source: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Creates a reference group (no-op if it exists).
    pub fn create_group(
        &self,
        name: &str,
        description: &str,
        actor: &str,
    ) -> Result<(), StoreError> {
        if name.is_empty() {
            return Err(StoreError::Invalid {
                what: "group name",
                why: "empty".into(),
            });
        }
        self.write(|tx| {
            let n = tx.execute(
                "INSERT INTO ref_groups (name, description) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                params![name, description],
            )?;
            let ev = (n > 0)
                .then(|| AuditEvent::new("group.create", actor, serde_json::json!({ "group": name })));
            Ok(((), ev))
        })
    }

    /// Puts a known signature into a reference group.
    pub fn add_member(&self, group: &str, sha256: &str, actor: &str) -> Result<(), StoreError> {
        check_hex("sha256", sha256, 64)?;
        self.write(|tx| {
            let g: Option<String> =
                tx.query_row("SELECT name FROM ref_groups WHERE name = ?1", [group], |r| r.get(0)).optional()?;
            if g.is_none() {
                return Err(StoreError::NotFound { what: "group", key: group.into() });
            }
            let s: Option<String> =
                tx.query_row("SELECT sha256 FROM signatures WHERE sha256 = ?1", [sha256], |r| r.get(0)).optional()?;
            if s.is_none() {
                return Err(StoreError::NotFound { what: "signature", key: sha256.into() });
            }
            let n = tx.execute(
                "INSERT INTO ref_group_members (group_name, sha256) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![group, sha256],
            )?;
            let touched = if n > 0 { vec![sha256.to_owned()] } else { Vec::new() };
            let pending = self.members_changed(tx, touched, Publish::Now)?;
            let ev = AuditEvent::new("group.add", actor, serde_json::json!({ "group": group, "sha256": sha256 }));
            Ok((pending, Some(ev)))
        })
        .map(drop)
    }

    /// Takes a signature out of a reference group (no-op if it was not in it).
    pub fn remove_member(&self, group: &str, sha256: &str, actor: &str) -> Result<(), StoreError> {
        check_hex("sha256", sha256, 64)?;
        self.write(|tx| {
            let n = tx.execute(
                "DELETE FROM ref_group_members WHERE group_name = ?1 AND sha256 = ?2",
                params![group, sha256],
            )?;
            if n == 0 {
                return Ok((None, None));
            }
            let pending = self.members_changed(tx, vec![sha256.to_owned()], Publish::Now)?;
            let ev = AuditEvent::new(
                "group.remove",
                actor,
                serde_json::json!({ "group": group, "sha256": sha256 }),
            );
            Ok((Some(pending), Some(ev)))
        })
        .map(drop)
    }

    /// Removes a signature and its group memberships.
    pub fn remove_signature(&self, sha256: &str, actor: &str) -> Result<(), StoreError> {
        check_hex("sha256", sha256, 64)?;
        self.write(|tx| {
            let n = tx.execute("DELETE FROM signatures WHERE sha256 = ?1", [sha256])?;
            if n == 0 {
                return Err(StoreError::NotFound {
                    what: "signature",
                    key: sha256.into(),
                });
            }
            let pending = self.members_changed(tx, vec![sha256.to_owned()], Publish::Now)?;
            let ev = AuditEvent::new(
                "signature.remove",
                actor,
                serde_json::json!({ "sha256": sha256 }),
            );
            Ok((pending, Some(ev)))
        })
        .map(drop)
    }

    /// Reference groups of a program together with the membership version
    /// they belong to, read in one consistent view (a read connection).
    pub fn groups_of_at(&self, sha256: &str) -> Result<(Vec<String>, i64), StoreError> {
        let conn = self.read()?;
        let tx = conn.unchecked_transaction()?;
        let groups = {
            let mut stmt = tx.prepare_cached(
                "SELECT group_name FROM ref_group_members WHERE sha256 = ?1 ORDER BY group_name",
            )?;
            let rows = stmt.query_map([sha256], |r| r.get(0))?;
            rows.collect::<Result<Vec<String>, _>>()?
        };
        let members: i64 = tx.query_row(
            "SELECT members_version FROM governing WHERE id = 1",
            [],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok((groups, members))
    }

    // ---- users and roles ----

    /// Sets the roles of `user` (replacing the old ones; creates the user),
    /// audited as `actor`. Moves the verdict generation.
    pub fn set_user_roles(
        &self,
        user: &str,
        roles: &[&str],
        actor: &str,
    ) -> Result<(), StoreError> {
        if user.is_empty() {
            return Err(StoreError::Invalid {
                what: "user name",
                why: "empty".into(),
            });
        }
        if roles.iter().any(|r| r.is_empty()) {
            return Err(StoreError::Invalid {
                what: "role name",
                why: format!("empty role for user `{user}`"),
            });
        }
        let mut sorted: Vec<&str> = roles.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO users (name, changed_ms) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET changed_ms = excluded.changed_ms",
                params![user, now_ms()],
            )?;
            tx.execute("DELETE FROM user_roles WHERE user_name = ?1", [user])?;
            for role in &sorted {
                tx.execute(
                    "INSERT INTO user_roles (user_name, role) VALUES (?1, ?2)",
                    params![user, role],
                )?;
            }
            bump_data(tx)?;
            let ev = AuditEvent::new(
                "user.roles",
                actor,
                serde_json::json!({ "user": user, "roles": sorted }),
            );
            Ok(((), Some(ev)))
        })
    }

    /// Roles of `user`, sorted (empty for unknown users).
    pub fn user_roles(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.read()?;
        let mut stmt =
            conn.prepare_cached("SELECT role FROM user_roles WHERE user_name = ?1 ORDER BY role")?;
        let rows = stmt.query_map([user], |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<String>, _>>()?)
    }

    /// The governing policy, hosts with their groups' modes and users with
    /// their roles, all as of one generation (one read under the lock).
    pub fn engine_data(&self) -> Result<EngineData, StoreError> {
        let conn = self.read()?;
        let tx = conn.unchecked_transaction()?;
        let versions = read_versions(&tx)?;
        let generation = versions.generation;
        let active: Option<i64> =
            tx.query_row("SELECT active FROM governing WHERE id = 1", [], |r| {
                r.get(0)
            })?;
        let policy = match active {
            Some(id) => {
                let row: Option<(i64, String, String, String)> = tx
                    .query_row(
                        "SELECT id, text, sha256, state FROM policy_versions WHERE id = ?1",
                        [id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .optional()?;
                row.map(|(id, text, sha256, state)| {
                    Ok::<_, StoreError>(PolicyVersion {
                        id,
                        text,
                        sha256,
                        state: parse_state(&state)?,
                    })
                })
                .transpose()?
            }
            None => None,
        };
        let mut hosts = HashMap::new();
        {
            let mut stmt = tx.prepare(
                "SELECT h.name, h.host_group, g.mode FROM hosts h JOIN host_groups g ON g.name = h.host_group",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let mode: String = r.get(2)?;
                hosts.insert(r.get(0)?, (r.get(1)?, parse_mode(&mode)?));
            }
        }
        let mut users: HashMap<String, Vec<String>> = HashMap::new();
        {
            let mut stmt = tx.prepare("SELECT name FROM users")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                users.insert(r.get(0)?, Vec::new());
            }
            let mut stmt =
                tx.prepare("SELECT user_name, role FROM user_roles ORDER BY user_name, role")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let u: String = r.get(0)?;
                users.entry(u).or_default().push(r.get(1)?);
            }
        }
        let file_sets = files::read_file_sets(&tx)?;
        tx.commit()?;
        Ok(EngineData {
            versions,
            generation,
            policy,
            hosts,
            users,
            file_sets,
        })
    }

    /// Reference groups a program belongs to, sorted (empty for unknown programs).
    pub fn groups_of(&self, sha256: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare_cached(
            "SELECT group_name FROM ref_group_members WHERE sha256 = ?1 ORDER BY group_name",
        )?;
        let rows = stmt.query_map([sha256], |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<String>, _>>()?)
    }

    // ---- policy versions ----

    /// Stores `text` as a new draft; returns its id.
    pub fn create_policy_draft(
        &self,
        text: &str,
        comment: &str,
        actor: &str,
    ) -> Result<i64, StoreError> {
        let sha = hex(&Sha256::digest(text.as_bytes()));
        self.write(|tx| {
            tx.execute(
                "INSERT INTO policy_versions (text, sha256, state, created_ms, comment) VALUES (?1, ?2, 'draft', ?3, ?4)",
                params![text, sha, now_ms(), comment],
            )?;
            let id = tx.last_insert_rowid();
            let ev = AuditEvent::new("policy.draft", actor, serde_json::json!({ "id": id, "sha256": sha }));
            Ok((id, Some(ev)))
        })
    }

    /// One policy version.
    pub fn policy(&self, id: i64) -> Result<Option<PolicyVersion>, StoreError> {
        let conn = self.read()?;
        let row: Option<(i64, String, String, String)> = conn
            .query_row(
                "SELECT id, text, sha256, state FROM policy_versions WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        row.map(|(id, text, sha256, state)| {
            Ok(PolicyVersion {
                id,
                text,
                sha256,
                state: parse_state(&state)?,
            })
        })
        .transpose()
    }

    /// The governing-policy pointer.
    pub fn governing(&self) -> Result<Governing, StoreError> {
        let conn = self.read()?;
        Ok(conn.query_row(
            "SELECT active, previous, generation FROM governing WHERE id = 1",
            [],
            |r| {
                Ok(Governing {
                    active: r.get(0)?,
                    previous: r.get(1)?,
                    generation: r.get(2)?,
                })
            },
        )?)
    }

    /// The governing policy version, if any.
    pub fn governing_policy(&self) -> Result<Option<PolicyVersion>, StoreError> {
        match self.governing()?.active {
            Some(id) => self.policy(id),
            None => Ok(None),
        }
    }

    /// Makes version `id` the governing policy, atomically: the old one is
    /// retired, the new one activated, the generation moved and the change
    /// audited in one transaction. Returns the new pointer.
    pub fn activate_policy(&self, id: i64, actor: &str) -> Result<Governing, StoreError> {
        self.prepare_policy(id)?;
        self.write(|tx| {
            let g = switch(tx, id)?;
            let ev = AuditEvent::new(
                "policy.activate",
                actor,
                serde_json::json!({ "id": id, "previous": g.previous, "generation": g.generation }),
            );
            Ok((g, Some(ev)))
        })
    }

    /// Switches back to the previously governing version, atomically.
    pub fn rollback_policy(&self, actor: &str) -> Result<Governing, StoreError> {
        if let Some(prev) = self.governing()?.previous {
            self.prepare_policy(prev)?;
        }
        self.write(|tx| {
            let prev: Option<i64> = tx.query_row("SELECT previous FROM governing WHERE id = 1", [], |r| r.get(0))?;
            let Some(prev) = prev else {
                return Err(StoreError::Conflict("no previous policy version to roll back to".into()));
            };
            let g = switch(tx, prev)?;
            let ev = AuditEvent::new("policy.rollback", actor, serde_json::json!({ "id": prev, "previous": g.previous, "generation": g.generation }));
            Ok((g, Some(ev)))
        })
    }

    // ---- host groups and hosts ----

    /// Creates or changes a host group's mode.
    pub fn set_host_group(&self, name: &str, mode: Mode, actor: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO host_groups (name, mode) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET mode = excluded.mode",
                params![name, mode.as_str()],
            )?;
            bump_data(tx)?;
            let ev = AuditEvent::new("hostgroup.set", actor, serde_json::json!({ "group": name, "mode": mode }));
            Ok(((), Some(ev)))
        })
    }

    /// Mode of a host group, if it exists.
    pub fn host_group_mode(&self, name: &str) -> Result<Option<Mode>, StoreError> {
        let conn = self.read()?;
        let m: Option<String> = conn
            .query_row(
                "SELECT mode FROM host_groups WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        m.map(|m| parse_mode(&m)).transpose()
    }

    /// Registers `host` in `group` as pending with the SHA-256 of its
    /// one-time enrolment token (the token itself is never stored), valid
    /// for [`DEFAULT_TOKEN_TTL_MS`] (see [`Store::add_pending_host_ttl`]).
    pub fn add_pending_host(
        &self,
        host: &str,
        group: &str,
        token_sha256: &str,
        actor: &str,
    ) -> Result<(), StoreError> {
        self.add_pending_host_ttl(host, group, token_sha256, DEFAULT_TOKEN_TTL_MS, actor)
            .map(|_| ())
    }

    /// Consumes the one-time token of a pending host and records the serial
    /// of the certificate issued to it. Fails unless the host is pending and
    /// the token hash matches.
    pub fn enrol_host(
        &self,
        host: &str,
        token_sha256: &str,
        cert_serial: &str,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE hosts SET state = 'enrolled', token_sha256 = NULL, token_expires_ms = NULL,
                 cert_serial = ?3, prev_serial = NULL, changed_ms = ?4
                 WHERE name = ?1 AND state = 'pending' AND token_sha256 = ?2
                 AND (token_expires_ms IS NULL OR token_expires_ms > ?4)",
                params![host, token_sha256, cert_serial, now_ms()],
            )?;
            if n == 0 {
                return Err(StoreError::Conflict(format!(
                    "no pending enrolment for `{host}` with this token (or it expired)"
                )));
            }
            let ev = AuditEvent::new(
                "host.enrol",
                host,
                serde_json::json!({ "host": host, "cert_serial": cert_serial }),
            );
            Ok(((), Some(ev)))
        })
    }

    /// Revokes a host; it is refused from then on.
    pub fn revoke_host(&self, host: &str, actor: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE hosts SET state = 'revoked', token_sha256 = NULL, token_expires_ms = NULL, prev_serial = NULL, changed_ms = ?2 WHERE name = ?1",
                params![host, now_ms()],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound { what: "host", key: host.into() });
            }
            let ev = AuditEvent::new("host.revoke", actor, serde_json::json!({ "host": host }));
            Ok(((), Some(ev)))
        })
    }

    /// State and group of a host.
    pub fn host(&self, host: &str) -> Result<Option<(HostState, String)>, StoreError> {
        let conn = self.read()?;
        let row: Option<(String, String)> = conn
            .query_row(
                "SELECT state, host_group FROM hosts WHERE name = ?1",
                [host],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(s, g)| {
            let s = match s.as_str() {
                "pending" => HostState::Pending,
                "enrolled" => HostState::Enrolled,
                "revoked" => HostState::Revoked,
                _ => return Err(StoreError::Unreachable("unknown host state in database")),
            };
            Ok((s, g))
        })
        .transpose()
    }

    /// `(host, certificate serial)` of every enrolled host: the certificates
    /// the agent port accepts (a renewed host's previous one too).
    pub fn enrolled_certs(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare(
            "SELECT name, cert_serial FROM hosts WHERE state = 'enrolled' AND cert_serial IS NOT NULL
             UNION ALL
             SELECT name, prev_serial FROM hosts WHERE state = 'enrolled' AND prev_serial IS NOT NULL
             ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    // ---- channels ----

    /// Records an opened channel by key id (never the key).
    pub fn open_channel(
        &self,
        key_id: &str,
        src_host: &str,
        dst_host: &str,
        tuple: &str,
    ) -> Result<i64, StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO channels (key_id, src_host, dst_host, tuple, opened_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key_id, src_host, dst_host, tuple, now_ms()],
            )?;
            let id = tx.last_insert_rowid();
            let ev = AuditEvent::new("channel.open", "appliance", serde_json::json!({ "key_id": key_id, "src": src_host, "dst": dst_host, "tuple": tuple }));
            Ok((id, Some(ev)))
        })
    }
}

/// The engine reads the store through its own methods of the same names.
impl trustbind_policy::source::Source for Store {
    fn versions_hint(&self) -> Versions {
        Store::versions_hint(self)
    }

    fn versions(&self) -> Result<Versions, SourceError> {
        Store::versions(self).map_err(SourceError::new)
    }

    fn engine_data(&self) -> Result<EngineData, SourceError> {
        Store::engine_data(self).map_err(SourceError::new)
    }

    fn groups_of_at(&self, sha256: &str) -> Result<(Vec<String>, i64), SourceError> {
        Store::groups_of_at(self, sha256).map_err(SourceError::new)
    }

    fn note_answer(&self, generation: i64, members: i64, programs: &[&str], allow: bool) -> bool {
        Store::note_answer(self, generation, members, programs, allow)
    }

    fn add_policy_prep(&self, prep: Weak<dyn PolicyPrep>) {
        Store::add_policy_prep(self, prep);
    }
}

fn parse_state(s: &str) -> Result<PolicyState, StoreError> {
    PolicyState::parse(s).ok_or(StoreError::Unreachable("unknown policy state in database"))
}

fn parse_mode(m: &str) -> Result<Mode, StoreError> {
    match m {
        "enforce" => Ok(Mode::Enforce),
        "permissive" => Ok(Mode::Permissive),
        "disabled" => Ok(Mode::Disabled),
        _ => Err(StoreError::Unreachable("unknown mode in database")),
    }
}

/// Ends a membership change's pending mark in the ledger (commit or not).
struct PendingChange<'a> {
    store: &'a Store,
    programs: Vec<String>,
}

impl Drop for PendingChange<'_> {
    fn drop(&mut self) {
        if let Ok(mut l) = self.store.ledger.lock() {
            l.done(&self.programs);
        }
    }
}

fn read_versions(conn: &Connection) -> Result<Versions, StoreError> {
    Ok(conn.query_row(
        "SELECT generation, data_version, members_version FROM governing WHERE id = 1",
        [],
        |r| {
            Ok(Versions {
                generation: r.get(0)?,
                data: r.get(1)?,
                members: r.get(2)?,
            })
        },
    )?)
}

/// Moves the data version inside `tx`: the policy, a host, a host group, a
/// user or a file set changed (the engine re-reads them; hosts are not told).
fn touch_data(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE governing SET data_version = data_version + 1 WHERE id = 1",
        [],
    )?;
    Ok(())
}

fn read_generation(conn: &Connection) -> Result<i64, StoreError> {
    Ok(
        conn.query_row("SELECT generation FROM governing WHERE id = 1", [], |r| {
            r.get(0)
        })?,
    )
}

/// Moves the verdict generation inside `tx` (the caller commits).
fn bump_generation(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE governing SET generation = generation + 1 WHERE id = 1",
        [],
    )?;
    Ok(())
}

/// Moves the verdict generation and the data version inside `tx`: a
/// change to the policy, a host group's mode or a user's roles.
fn bump_data(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    bump_generation(tx)?;
    touch_data(tx)
}

/// Retires the active version and activates `id` (inside `tx`).
fn switch(tx: &rusqlite::Transaction<'_>, id: i64) -> Result<Governing, StoreError> {
    let state: Option<String> = tx
        .query_row(
            "SELECT state FROM policy_versions WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    match state.as_deref() {
        None => {
            return Err(StoreError::NotFound {
                what: "policy version",
                key: id.to_string(),
            })
        }
        Some("active") => {
            return Err(StoreError::Conflict(format!(
                "policy version {id} is already active"
            )))
        }
        Some(_) => {}
    }
    let old: Option<i64> = tx.query_row("SELECT active FROM governing WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    tx.execute(
        "UPDATE policy_versions SET state = 'retired' WHERE state = 'active'",
        [],
    )?;
    tx.execute(
        "UPDATE policy_versions SET state = 'active' WHERE id = ?1",
        [id],
    )?;
    tx.execute(
        "UPDATE governing SET active = ?1, previous = ?2, generation = generation + 1,
           data_version = data_version + 1 WHERE id = 1",
        params![id, old],
    )?;
    Ok(tx.query_row(
        "SELECT active, previous, generation FROM governing WHERE id = 1",
        [],
        |r| {
            Ok(Governing {
                active: r.get(0)?,
                previous: r.get(1)?,
                generation: r.get(2)?,
            })
        },
    )?)
}

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        seq: r.get(0)?,
        at_ms: r.get(1)?,
        kind: r.get(2)?,
        actor: r.get(3)?,
        detail: r.get(4)?,
        prev_hash: r.get(5)?,
        hash: r.get(6)?,
    })
}
