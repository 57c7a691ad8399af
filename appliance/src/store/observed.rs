//! Learning mode: the programs hosts ran, as the appliance decided them.
//!
//! One row per (host, program SHA-256, path): when it was first and last
//! asked about, how often, by which users, the host's dpkg package for the
//! path when its agent reported one, and the latest verdict (`allowed`,
//! `would_deny` on a permissive host, `denied` on an enforcing one). Rows
//! come from exec decisions only, aggregated in memory by
//! `crate::learn::Recorder` and written here in batches, never on a
//! decision's path. An administrator approves rows into a reference
//! group ([`Store::approve_observed`]): the programs are put into the group
//! the way `POST /v1/signatures` does, the rows are marked, and the
//! approval is audited, in one transaction.
//!
//! Bounds (issue 16: a hostile host must not grow the table without
//! limit): at most [`PER_HOST`] rows per host and [`TOTAL`] in all; a
//! program new to a host at either cap is left out (its counts are not
//! kept) and counted in `observed_hosts.left_out` for that host, shown by
//! `GET /v1/learn`; rows already kept go on being updated. Paths are kept
//! to [`PATH_MAX`] bytes, users to [`USERS_MAX`] names of at most
//! [`USER_MAX`] bytes per row. Forgetting
//! rows ([`Store::forget_observed`]) makes room again.

use std::collections::{BTreeSet, HashMap};

use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};

use super::admin::{batch_digest, group_exists, sig_from};
use super::{now_ms, AuditEvent, Mode, Publish, Signature, Store, StoreError};

/// Rows kept per host at most.
pub const PER_HOST: i64 = 1024;
/// Rows kept in all at most.
pub const TOTAL: i64 = 10_000;
/// Longest path kept, in bytes (longer ones are cut at a character
/// boundary; the audit's decision rows keep the whole path).
pub const PATH_MAX: usize = 256;
/// Distinct user names kept per row (`users_more` says more were seen).
pub const USERS_MAX: usize = 8;
/// Longest user name kept, in bytes (longer ones are cut).
pub const USER_MAX: usize = 64;
/// Programs approved in one call at most (as many as one signature batch).
pub const APPROVE_MAX: usize = 10_000;
/// Programs named one by one in an approval's audit row (the digest covers
/// them all).
const AUDIT_LISTED: usize = 256;

/// The latest verdict a row's program got on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seen {
    /// The policy allowed it.
    Allowed,
    /// Permissive host: the policy would have denied it (it ran).
    WouldDeny,
    /// Enforcing host: refused.
    Denied,
}

impl Seen {
    /// The database and API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::WouldDeny => "would_deny",
            Self::Denied => "denied",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "allowed" => Ok(Self::Allowed),
            "would_deny" => Ok(Self::WouldDeny),
            "denied" => Ok(Self::Denied),
            _ => Err(StoreError::Unreachable(
                "unknown observed verdict in database",
            )),
        }
    }
}

/// One (host, program, path) and what was seen of it: what the recorder
/// hands the store (everything since its last write), and what a stored
/// row holds ([`ObservedRow`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// The enrolled host (from its certificate).
    pub host: String,
    /// Program SHA-256, lower-case hex.
    pub sha256: String,
    /// Program SHA-1, lower-case hex.
    pub sha1: Option<String>,
    /// File size.
    pub size: u64,
    /// Path on the host.
    pub path: String,
    /// The dpkg package owning the path, as the host's agent reports it.
    pub package: Option<String>,
    /// Users who ran it (at most [`USERS_MAX`] kept).
    pub users: BTreeSet<String>,
    /// Whether more users than kept ran it.
    pub users_more: bool,
    /// First decision, appliance clock (ms).
    pub first_ms: i64,
    /// Last decision.
    pub last_ms: i64,
    /// Decisions.
    pub count: u64,
    /// The latest verdict.
    pub verdict: Seen,
    /// The host's mode at the latest decision.
    pub mode: Mode,
}

/// One stored row, as `GET /v1/learn` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedRow {
    /// Row id (the listing's cursor).
    pub id: i64,
    /// What was seen.
    #[serde(flatten)]
    pub seen: Observation,
    /// The reference group it was approved into, if it was.
    pub approved_group: Option<String>,
    /// When.
    pub approved_ms: Option<i64>,
    /// By whom (`admin:<cn>`).
    pub approved_by: Option<String>,
}

/// Which rows: all given conditions hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedFilter {
    /// Only this host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Only paths at or below this directory (or this exact path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Only paths the host reported as this package's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// Only this program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Which state.
    #[serde(default)]
    pub state: ObservedState,
}

/// Rows by approval state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    /// Not approved, and the policy did not allow it the last time: what
    /// an enforcing host would refuse.
    #[default]
    Pending,
    /// Approved into a group.
    Approved,
    /// Every row.
    All,
}

/// A host's share of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedHost {
    /// Host.
    pub host: String,
    /// Rows kept.
    pub programs: i64,
    /// Programs new to the host that were left out at a cap.
    pub left_out: i64,
    /// When the last one was.
    pub left_out_ms: Option<i64>,
}

/// What [`Store::record_observed`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObservedWrite {
    /// New rows.
    pub inserted: u64,
    /// Rows updated.
    pub updated: u64,
    /// Observations left out at a cap.
    pub left_out: u64,
}

/// One program an approval puts into the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovedProgram {
    /// SHA-256.
    pub sha256: String,
    /// A path it was seen at (the first by path order).
    pub path: String,
    /// Hosts it was seen on (matching the filter).
    pub hosts: u64,
    /// Whether the signature database knew it already (its name and
    /// source are then kept).
    pub known: bool,
}

/// What [`Store::approve_observed`] did, or would do (`dry_run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The group.
    pub group: String,
    /// Nothing was written.
    pub dry_run: bool,
    /// The programs, by SHA-256.
    pub programs: Vec<ApprovedProgram>,
    /// New signatures stored.
    pub inserted: u64,
    /// Programs newly in the group (a dry run counts those not yet in it).
    pub added_to_group: u64,
    /// Observed rows marked approved (every host's rows of these programs).
    pub rows: u64,
}

/// `s` cut to `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// `(path = p OR path starts with p + "/")`, as two parameters: `p` and
/// `p/` (`/` alone matches everything).
fn prefix_params(p: &str) -> (String, String) {
    let p = p.trim_end_matches('/');
    if p.is_empty() {
        (String::new(), "/".to_owned())
    } else {
        (p.to_owned(), format!("{p}/"))
    }
}

/// The WHERE clause of `f` over parameters ?1..?6 ([`filter_params`]).
const FILTER_SQL: &str = "(?1 IS NULL OR host = ?1)
     AND (?2 IS NULL OR path = ?2 OR substr(path, 1, length(?3)) = ?3)
     AND (?4 IS NULL OR package = ?4)
     AND (?5 IS NULL OR sha256 = ?5)
     AND (?6 = 'all'
          OR (?6 = 'approved' AND approved_group IS NOT NULL)
          OR (?6 = 'pending' AND approved_group IS NULL AND verdict <> 'allowed'))";

type FilterParams = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    &'static str,
);

fn filter_params(f: &ObservedFilter) -> FilterParams {
    let (p, slash) = match &f.path_prefix {
        Some(p) => {
            let (a, b) = prefix_params(p);
            (Some(a), Some(b))
        }
        None => (None, None),
    };
    let state = match f.state {
        ObservedState::Pending => "pending",
        ObservedState::Approved => "approved",
        ObservedState::All => "all",
    };
    (
        f.host.clone(),
        p,
        slash,
        f.package.clone(),
        f.sha256.clone(),
        state,
    )
}

const ROW_COLUMNS: &str = "id, host, sha256, sha1, size, path, package, users, users_more, first_ms, last_ms, count, verdict, mode, approved_group, approved_ms, approved_by";

fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<(ObservedRow, String, String)> {
    let users: String = r.get(7)?;
    let size: i64 = r.get(4)?;
    let count: i64 = r.get(11)?;
    Ok((
        ObservedRow {
            id: r.get(0)?,
            seen: Observation {
                host: r.get(1)?,
                sha256: r.get(2)?,
                sha1: r.get(3)?,
                size: u64::try_from(size).unwrap_or(0),
                path: r.get(5)?,
                package: r.get(6)?,
                users: serde_json::from_str(&users).unwrap_or_default(),
                users_more: r.get(8)?,
                first_ms: r.get(9)?,
                last_ms: r.get(10)?,
                count: u64::try_from(count).unwrap_or(0),
                verdict: Seen::Allowed,
                mode: Mode::Permissive,
            },
            approved_group: r.get(14)?,
            approved_ms: r.get(15)?,
            approved_by: r.get(16)?,
        },
        r.get(12)?,
        r.get(13)?,
    ))
}

fn finish_row(
    (mut row, verdict, mode): (ObservedRow, String, String),
) -> Result<ObservedRow, StoreError> {
    row.seen.verdict = Seen::parse(&verdict)?;
    row.seen.mode = super::parse_mode(&mode)?;
    Ok(row)
}

fn sql_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Writes a flush of observations in one transaction (no audit row:
    /// the decisions they come from are audited). A known (host, program,
    /// path) is updated: count added, last seen, latest verdict and mode,
    /// users merged up to [`USERS_MAX`], package if now reported; a new
    /// one is inserted unless its host holds [`PER_HOST`] rows or the
    /// table [`TOTAL`], when it is left out and counted for the host.
    pub fn record_observed(&self, obs: &[Observation]) -> Result<ObservedWrite, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = record_in(&tx, obs)?;
        tx.commit()?;
        Ok(out)
    }

    /// Rows matching `f` with `id > after`, by id, at most `limit`.
    pub fn observed(
        &self,
        f: &ObservedFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ObservedRow>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {ROW_COLUMNS} FROM observed WHERE {FILTER_SQL} AND id > ?7 ORDER BY id LIMIT ?8"
        ))?;
        let (a, b, c, d, e, s) = filter_params(f);
        let rows = stmt.query_map(params![a, b, c, d, e, s, after, limit], row_of)?;
        rows.map(|r| finish_row(r?)).collect()
    }

    /// Every host with rows or left-out programs, by name.
    pub fn observed_hosts(&self) -> Result<Vec<ObservedHost>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare_cached(
            "SELECT host, programs, left_out, left_out_ms FROM observed_hosts ORDER BY host",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ObservedHost {
                host: r.get(0)?,
                programs: r.get(1)?,
                left_out: r.get(2)?,
                left_out_ms: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Approves the programs of the pending rows matching `f` (the state
    /// in `f` is ignored: only pending rows are approved) into `group`,
    /// which must exist: each program becomes a signature (a known one
    /// keeps its name and source; a new one is named by its path, source
    /// `trustbind learn`) and a member of the group through the same code
    /// as `POST /v1/signatures` (the generation moves as it would there),
    /// every host's rows of those programs are marked approved, and one
    /// audit row `learn.approve` (actor, group, filter, count, digest, the
    /// first programs) is written, all in one transaction. `dry_run`
    /// reads the same selection and writes nothing. A non-empty `only`
    /// keeps just those programs of the selection (an interactive
    /// approval's one group). More than [`APPROVE_MAX`] programs are
    /// refused (narrow the filter).
    pub fn approve_observed(
        &self,
        f: &ObservedFilter,
        only: &[String],
        group: &str,
        actor: &str,
        dry_run: bool,
    ) -> Result<Approval, StoreError> {
        let f = ObservedFilter {
            state: ObservedState::Pending,
            ..f.clone()
        };
        if dry_run {
            let conn = self.read()?;
            let tx = conn.unchecked_transaction()?;
            group_exists(&tx, group)?;
            let (programs, sigs) = select_approval(&tx, &f, only)?;
            let mut in_group = tx.prepare_cached(
                "SELECT 1 FROM ref_group_members WHERE group_name = ?1 AND sha256 = ?2",
            )?;
            let mut added = 0_u64;
            for s in &sigs {
                if in_group
                    .query_row(params![group, s.sha256], |_| Ok(()))
                    .optional()?
                    .is_none()
                {
                    added += 1;
                }
            }
            let rows = count_rows(&tx, &sigs)?;
            return Ok(Approval {
                group: group.to_owned(),
                dry_run: true,
                inserted: programs.iter().filter(|p| !p.known).count() as u64,
                added_to_group: added,
                rows,
                programs,
            });
        }
        self.write(|tx| {
            group_exists(tx, group)?;
            let (programs, sigs) = select_approval(tx, &f, only)?;
            let (batch, pending) = self.put_signatures_in(tx, &sigs, Some(group), Publish::Now)?;
            let now = now_ms();
            let mut mark = tx.prepare_cached(
                "UPDATE observed SET approved_group = ?2, approved_ms = ?3, approved_by = ?4
                 WHERE sha256 = ?1 AND approved_group IS NULL",
            )?;
            let mut rows = 0_u64;
            for s in &sigs {
                rows += mark.execute(params![s.sha256, group, now, actor])? as u64;
            }
            let listed: Vec<_> = programs
                .iter()
                .take(AUDIT_LISTED)
                .map(|p| serde_json::json!([p.sha256, p.path]))
                .collect();
            let ev = (!sigs.is_empty()).then(|| {
                AuditEvent::new(
                    "learn.approve",
                    actor,
                    serde_json::json!({
                        "group": group,
                        "filter": f,
                        "count": sigs.len(),
                        "digest": batch_digest(sigs.iter().map(|s| s.sha256.as_str())),
                        "inserted": batch.inserted,
                        "added_to_group": batch.added_to_group,
                        "rows": rows,
                        "programs": listed,
                        "listed_all": programs.len() <= AUDIT_LISTED,
                    }),
                )
            });
            let out = Approval {
                group: group.to_owned(),
                dry_run: false,
                programs,
                inserted: batch.inserted,
                added_to_group: batch.added_to_group,
                rows,
            };
            Ok(((out, pending), ev))
        })
        .map(|(out, _)| out)
    }

    /// Deletes the rows matching `f` (audited `learn.forget` with the
    /// filter and the count when any went) and recounts their hosts'
    /// shares; a host's left-out count is reset when `f` names it or
    /// names no host. Returns how many rows went.
    pub fn forget_observed(&self, f: &ObservedFilter, actor: &str) -> Result<u64, StoreError> {
        self.write(|tx| {
            let (a, b, c, d, e, s) = filter_params(f);
            let n = tx.execute(
                &format!("DELETE FROM observed WHERE {FILTER_SQL}"),
                params![a, b, c, d, e, s],
            )? as u64;
            tx.execute(
                "UPDATE observed_hosts SET programs =
                   (SELECT count(*) FROM observed o WHERE o.host = observed_hosts.host)",
                [],
            )?;
            let whole_hosts = f.path_prefix.is_none()
                && f.package.is_none()
                && f.sha256.is_none()
                && f.state == ObservedState::All;
            if whole_hosts {
                tx.execute(
                    "UPDATE observed_hosts SET left_out = 0, left_out_ms = NULL
                     WHERE ?1 IS NULL OR host = ?1",
                    params![f.host],
                )?;
            }
            tx.execute(
                "DELETE FROM observed_hosts WHERE programs = 0 AND left_out = 0",
                [],
            )?;
            let ev = (n > 0).then(|| {
                AuditEvent::new(
                    "learn.forget",
                    actor,
                    serde_json::json!({ "filter": f, "rows": n }),
                )
            });
            Ok((n, ev))
        })
    }
}

/// The distinct programs of the rows matching `f` (pending), as
/// signatures to store: a known signature as it is, a new one from the
/// row with the smallest path.
fn select_approval(
    tx: &Transaction<'_>,
    f: &ObservedFilter,
    only: &[String],
) -> Result<(Vec<ApprovedProgram>, Vec<Signature>), StoreError> {
    let (a, b, c, d, e, s) = filter_params(f);
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT sha256, min(path), count(DISTINCT host),
                (SELECT sha1 FROM observed o2 WHERE o2.sha256 = observed.sha256 AND o2.sha1 IS NOT NULL LIMIT 1),
                max(size)
         FROM observed WHERE {FILTER_SQL} GROUP BY sha256 ORDER BY min(path), sha256"
    ))?;
    let found = stmt
        .query_map(params![a, b, c, d, e, s], |r| {
            let hosts: i64 = r.get(2)?;
            let size: i64 = r.get(4)?;
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                u64::try_from(hosts).unwrap_or(0),
                r.get::<_, Option<String>>(3)?,
                u64::try_from(size).unwrap_or(0),
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let only: BTreeSet<&str> = only.iter().map(String::as_str).collect();
    let found: Vec<_> = found
        .into_iter()
        .filter(|(sha, ..)| only.is_empty() || only.contains(sha.as_str()))
        .collect();
    if found.len() > APPROVE_MAX {
        return Err(StoreError::Invalid {
            what: "filter",
            why: format!(
                "it selects {} programs, at most {APPROVE_MAX} are approved at once: narrow it (--host, --path-prefix, --package)",
                found.len()
            ),
        });
    }
    let mut get = tx.prepare_cached(
        "SELECT sha256, sha1, size, name, source FROM signatures WHERE sha256 = ?1",
    )?;
    let mut programs = Vec::with_capacity(found.len());
    let mut sigs = Vec::with_capacity(found.len());
    for (sha256, path, hosts, sha1, size) in found {
        let known = get.query_row([&sha256], sig_from).optional()?;
        programs.push(ApprovedProgram {
            sha256: sha256.clone(),
            path: path.clone(),
            hosts,
            known: known.is_some(),
        });
        sigs.push(known.unwrap_or(Signature {
            sha256,
            sha1,
            size,
            name: path,
            source: "trustbind learn".to_owned(),
        }));
    }
    Ok((programs, sigs))
}

/// Unapproved rows of these programs (every host's).
fn count_rows(tx: &Transaction<'_>, sigs: &[Signature]) -> Result<u64, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT count(*) FROM observed WHERE sha256 = ?1 AND approved_group IS NULL",
    )?;
    let mut n = 0_u64;
    for s in sigs {
        let c: i64 = stmt.query_row([&s.sha256], |r| r.get(0))?;
        n += u64::try_from(c).unwrap_or(0);
    }
    Ok(n)
}

fn record_in(tx: &Transaction<'_>, obs: &[Observation]) -> Result<ObservedWrite, StoreError> {
    let mut out = ObservedWrite::default();
    let mut find = tx.prepare_cached(
        "SELECT id, users, users_more FROM observed WHERE host = ?1 AND sha256 = ?2 AND path = ?3",
    )?;
    let mut update = tx.prepare_cached(
        "UPDATE observed SET count = count + ?2, last_ms = max(last_ms, ?3),
           first_ms = min(first_ms, ?4), verdict = ?5, mode = ?6, users = ?7, users_more = ?8,
           package = coalesce(?9, package), sha1 = coalesce(sha1, ?10)
         WHERE id = ?1",
    )?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO observed (host, sha256, path, sha1, size, package, users, users_more,
           first_ms, last_ms, count, verdict, mode)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?;
    let mut host_count =
        tx.prepare_cached("SELECT programs FROM observed_hosts WHERE host = ?1")?;
    let mut total: i64 = tx.query_row(
        "SELECT coalesce(sum(programs), 0) FROM observed_hosts",
        [],
        |r| r.get(0),
    )?;
    // Rows per host as counted in this transaction.
    let mut hosts: HashMap<&str, (i64, i64, Option<i64>)> = HashMap::new();
    for o in obs {
        let path = cut(&o.path, PATH_MAX);
        let known: Option<(i64, String, bool)> = find
            .query_row(params![o.host, o.sha256, path], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let entry = match hosts.get_mut(o.host.as_str()) {
            Some(e) => e,
            None => {
                let n: i64 = host_count
                    .query_row([&o.host], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
                hosts.entry(o.host.as_str()).or_insert((n, 0, None))
            }
        };
        match known {
            Some((id, users, more)) => {
                let mut all: BTreeSet<String> = serde_json::from_str(&users).unwrap_or_default();
                let mut more = more || o.users_more;
                for u in o.users.iter().map(|u| cut(u, USER_MAX)) {
                    if all.len() < USERS_MAX {
                        all.insert(u.to_owned());
                    } else if !all.contains(u) {
                        more = true;
                    }
                }
                update.execute(params![
                    id,
                    sql_i64(o.count),
                    o.last_ms,
                    o.first_ms,
                    o.verdict.as_str(),
                    o.mode.as_str(),
                    serde_json::to_string(&all)?,
                    more,
                    o.package,
                    o.sha1,
                ])?;
                out.updated += 1;
            }
            None if entry.0 >= PER_HOST || total >= TOTAL => {
                entry.1 += 1;
                entry.2 = Some(o.last_ms);
                out.left_out += 1;
            }
            None => {
                let users: BTreeSet<&str> = o
                    .users
                    .iter()
                    .take(USERS_MAX)
                    .map(|u| cut(u, USER_MAX))
                    .collect();
                insert.execute(params![
                    o.host,
                    o.sha256,
                    path,
                    o.sha1,
                    sql_i64(o.size),
                    o.package,
                    serde_json::to_string(&users)?,
                    o.users_more || o.users.len() > USERS_MAX,
                    o.first_ms,
                    o.last_ms,
                    sql_i64(o.count),
                    o.verdict.as_str(),
                    o.mode.as_str(),
                ])?;
                entry.0 += 1;
                total += 1;
                out.inserted += 1;
            }
        }
    }
    let mut put = tx.prepare_cached(
        "INSERT INTO observed_hosts (host, programs, left_out, left_out_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (host) DO UPDATE SET programs = excluded.programs,
           left_out = left_out + excluded.left_out,
           left_out_ms = coalesce(excluded.left_out_ms, left_out_ms)",
    )?;
    for (host, (programs, left_out, left_out_ms)) in hosts {
        put.execute(params![host, programs, left_out, left_out_ms])?;
    }
    Ok(out)
}
