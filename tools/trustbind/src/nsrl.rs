//! `trustbind sig import-nsrl`: streams a NIST NSRL RDSv3 SQLite database
//! into a reference group, in batches, resumably and idempotently.
//!
//! RDSv3 publishes SQLite databases whose file hashes are reachable as the
//! `FILE` relation (`sha256, sha1, md5, file_name, file_size, package_id`,
//! a view over the `METADATA` table in the full publications, a table in
//! the reduced/"minimal" ones). We read, in rowid order, from `METADATA`
//! when it exists with those columns, else from a `FILE` table. The rowid
//! of the last row the appliance acknowledged is kept in a state file, so
//! an interrupted import continues where it stopped; the appliance's batch
//! insert is idempotent, so a batch sent twice changes nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rusqlite::{params_from_iter, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::Client;
use crate::error::{io_err, CliError, Exit, Result};
use crate::out::Out;

/// Options of an import.
#[derive(Debug)]
pub struct Options {
    /// The RDSv3 database.
    pub db: PathBuf,
    /// Target group.
    pub group: String,
    /// `KEY=VALUE` filters.
    pub filters: Vec<String>,
    /// Rows per request.
    pub batch: usize,
    /// Ignore saved progress.
    pub restart: bool,
    /// Stop after this many source rows.
    pub max_rows: Option<u64>,
    /// State file.
    pub state: Option<PathBuf>,
}

/// Saved progress of an import.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// The database file (as given, canonicalised).
    pub db: String,
    /// Target group.
    pub group: String,
    /// Filters, as given.
    pub filters: Vec<String>,
    /// Rowid of the last row acknowledged by the appliance.
    pub last_rowid: i64,
    /// Source rows read so far (all runs).
    pub rows: u64,
    /// Rows skipped for malformed hashes or sizes.
    pub invalid: u64,
    /// Signatures sent (unique within each batch).
    pub sent: u64,
    /// New signatures.
    pub inserted: u64,
    /// Signatures whose metadata changed.
    pub updated: u64,
    /// Signatures already present and equal.
    pub unchanged: u64,
    /// Signatures newly added to the group.
    pub added_to_group: u64,
    /// Whether the last run reached the end of the table.
    pub complete: bool,
}

/// The SQL condition and parameters of the filters.
fn filter_sql(filters: &[String]) -> Result<(String, Vec<rusqlite::types::Value>)> {
    use rusqlite::types::Value as V;
    let mut conds = Vec::new();
    let mut params = Vec::new();
    let mut packages = Vec::new();
    for f in filters {
        let Some((k, v)) = f.split_once('=') else {
            return Err(CliError::new(
                Exit::Usage,
                format!("filter `{f}` is not KEY=VALUE (keys: name, package, min-size, max-size)"),
            ));
        };
        let num = |what: &str| -> Result<i64> {
            v.trim().parse().map_err(|_| {
                CliError::new(
                    Exit::Usage,
                    format!("filter `{f}`: {what} `{v}` is not a whole number"),
                )
            })
        };
        match k.trim() {
            "name" => {
                conds.push("file_name GLOB ?".to_owned());
                params.push(V::Text(v.to_owned()));
            }
            "package" => packages.push(num("package id")?),
            "min-size" => {
                conds.push("file_size >= ?".to_owned());
                params.push(V::Integer(num("size")?));
            }
            "max-size" => {
                conds.push("file_size <= ?".to_owned());
                params.push(V::Integer(num("size")?));
            }
            other => {
                return Err(CliError::new(
                    Exit::Usage,
                    format!(
                    "filter `{f}`: unknown key `{other}` (keys: name, package, min-size, max-size)"
                ),
                ))
            }
        }
    }
    if !packages.is_empty() {
        let marks = vec!["?"; packages.len()].join(", ");
        conds.push(format!("package_id IN ({marks})"));
        params.extend(packages.into_iter().map(V::Integer));
    }
    let sql = if conds.is_empty() {
        String::new()
    } else {
        format!(" AND {}", conds.join(" AND "))
    };
    Ok((sql, params))
}

const COLUMNS: [&str; 5] = ["sha256", "sha1", "file_name", "file_size", "package_id"];

/// Whether `name` is a table (not a view) with every column we read.
fn usable_table(db: &Connection, name: &str) -> rusqlite::Result<Option<bool>> {
    let ty: Option<String> = db
        .query_row(
            "SELECT type FROM sqlite_master WHERE name = ?1 COLLATE NOCASE",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    let Some(ty) = ty else { return Ok(None) };
    let mut st = db.prepare(&format!("PRAGMA table_info(\"{name}\")"))?;
    let cols: HashSet<String> = st
        .query_map([], |r| r.get::<_, String>(1))?
        .collect::<rusqlite::Result<_>>()?;
    let has_all = COLUMNS
        .iter()
        .all(|c| cols.iter().any(|x| x.eq_ignore_ascii_case(c)));
    Ok(Some(ty == "table" && has_all))
}

/// Picks the relation to read.
fn source(db: &Connection, path: &Path) -> Result<&'static str> {
    let sql = |e: rusqlite::Error| {
        CliError::io(format!(
            "{} is not a readable SQLite database: {e}",
            path.display()
        ))
    };
    if usable_table(db, "METADATA").map_err(sql)? == Some(true) {
        return Ok("METADATA");
    }
    match usable_table(db, "FILE").map_err(sql)? {
        Some(true) => Ok("FILE"),
        Some(false) => Err(CliError::io(format!(
            "{}: FILE is a view or lacks columns {} and there is no METADATA table to read in rowid order; is this an NSRL RDSv3 database?",
            path.display(),
            COLUMNS.join(", ")
        ))),
        None => Err(CliError::io(format!(
            "{} has no FILE or METADATA table; is this an NSRL RDSv3 database?",
            path.display()
        ))),
    }
}

fn is_hex(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn load_state(path: &Path) -> Result<Option<State>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            CliError::io(format!(
                "the import state file {} is damaged ({e}); remove it or pass --restart",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path, &e)),
    }
}

fn save_state(path: &Path, s: &State) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(s).unwrap_or_default();
    std::fs::write(&tmp, body).map_err(|e| io_err("write", &tmp, &e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("write", path, &e))
}

/// Runs an import.
pub fn import(c: &Client, o: &Options, out: &Out) -> Result<u8> {
    let max = trustbind_appliance::admin::MAX_BATCH;
    if o.batch == 0 || o.batch > max {
        return Err(CliError::new(
            Exit::Usage,
            format!("--batch {} is out of range 1..={max}", o.batch),
        ));
    }
    let (filter, fparams) = filter_sql(&o.filters)?;
    let db = Connection::open_with_flags(
        &o.db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| CliError::io(format!("cannot open {} as SQLite: {e}", o.db.display())))?;
    let src = source(&db, &o.db)?;
    let canon = std::fs::canonicalize(&o.db)
        .map_err(|e| io_err("open", &o.db, &e))?
        .display()
        .to_string();
    let state_path = o.state.clone().unwrap_or_else(|| {
        let mut p = o.db.clone().into_os_string();
        p.push(".trustbind-import.json");
        PathBuf::from(p)
    });
    let fresh = State {
        db: canon.clone(),
        group: o.group.clone(),
        filters: o.filters.clone(),
        ..State::default()
    };
    let mut st = match load_state(&state_path)? {
        Some(s) if !o.restart => {
            if s.db != canon || s.group != o.group || s.filters != o.filters {
                return Err(CliError::new(
                    Exit::Usage,
                    format!(
                        "the state file {} belongs to an import of {} into group `{}` with filters {:?}; pass --restart to start over or --state to use another file",
                        state_path.display(),
                        s.db,
                        s.group,
                        s.filters
                    ),
                ));
            }
            s
        }
        _ => fresh,
    };
    let resumed_from = st.last_rowid;
    if resumed_from > 0 {
        out.note(&format!(
            "resuming after row {resumed_from} ({} rows done; state in {})",
            st.rows,
            state_path.display()
        ));
    }
    c.post(
        "/v1/groups",
        &json!({ "name": o.group, "description": "NSRL RDS import" }),
    )?;
    let sqlerr = |e: rusqlite::Error| CliError::io(format!("reading {}: {e}", o.db.display()));
    let max_rowid: i64 = db
        .query_row(
            &format!("SELECT coalesce(max(rowid), 0) FROM {src}"),
            [],
            |r| r.get(0),
        )
        .map_err(sqlerr)?;
    let pb = if out.is_json() {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::with_draw_target(
            Some(u64::try_from(max_rowid.saturating_sub(resumed_from)).unwrap_or(0)),
            ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {percent}% rows {msg} ({per_sec}, eta {eta})",
        ) {
            pb.set_style(style);
        }
        pb
    };
    let sql = format!(
        "SELECT rowid, sha256, sha1, file_name, file_size FROM {src} \
         WHERE rowid > ?{filter} ORDER BY rowid LIMIT ?"
    );
    let mut stmt = db.prepare(&sql).map_err(sqlerr)?;
    let started = Instant::now();
    let mut rows_this_run = 0_u64;
    let source_label = "nsrl";
    loop {
        let limit = match o.max_rows {
            Some(m) => {
                let left = m.saturating_sub(rows_this_run);
                if left == 0 {
                    break;
                }
                left.min(o.batch as u64)
            }
            None => o.batch as u64,
        };
        let mut params: Vec<rusqlite::types::Value> =
            vec![rusqlite::types::Value::Integer(st.last_rowid)];
        params.extend(fparams.iter().cloned());
        params.push(rusqlite::types::Value::Integer(
            i64::try_from(limit).unwrap_or(i64::MAX),
        ));
        let mut seen = HashSet::new();
        let mut sigs = Vec::new();
        let mut last = st.last_rowid;
        let mut n = 0_u64;
        let mut invalid = 0_u64;
        let mut q = stmt.query(params_from_iter(params)).map_err(sqlerr)?;
        while let Some(r) = q.next().map_err(sqlerr)? {
            n += 1;
            last = r.get(0).map_err(sqlerr)?;
            let sha256: Option<String> = r.get(1).ok();
            let sha1: Option<String> = r.get(2).ok();
            let name: String = r
                .get::<_, Option<String>>(3)
                .ok()
                .flatten()
                .unwrap_or_default();
            let size: Option<i64> = r.get(4).ok();
            let (Some(sha256), Some(size)) = (sha256.map(|s| s.to_ascii_lowercase()), size) else {
                invalid += 1;
                continue;
            };
            if !is_hex(&sha256, 64) || size < 0 {
                invalid += 1;
                continue;
            }
            if !seen.insert(sha256.clone()) {
                continue;
            }
            let sha1 = sha1
                .map(|s| s.to_ascii_lowercase())
                .filter(|s| is_hex(s, 40));
            let mut name: String = name.chars().filter(|c| !c.is_control()).collect();
            if name.len() > 4096 {
                let mut cut = 4096;
                while !name.is_char_boundary(cut) {
                    cut -= 1;
                }
                name.truncate(cut);
            }
            sigs.push(json!({ "sha256": sha256, "sha1": sha1, "size": size, "name": name }));
        }
        drop(q);
        if n == 0 {
            st.complete = true;
            break;
        }
        if !sigs.is_empty() {
            let v = c.post(
                "/v1/signatures",
                &json!({ "signatures": sigs, "group": o.group, "source": source_label }),
            )?;
            let g = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            st.inserted += g("inserted");
            st.updated += g("updated");
            st.unchanged += g("unchanged");
            st.added_to_group += g("added_to_group");
            st.sent += sigs.len() as u64;
        }
        st.rows += n;
        st.invalid += invalid;
        rows_this_run += n;
        st.last_rowid = last;
        save_state(&state_path, &st)?;
        pb.set_position(u64::try_from(last.saturating_sub(resumed_from)).unwrap_or(0));
        pb.set_message(format!("{}", st.rows));
        if n < limit {
            // A short page: the end of the table, unless a row cap stopped us.
            st.complete = true;
            save_state(&state_path, &st)?;
            break;
        }
    }
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 {
        rows_this_run as f64 / secs
    } else {
        0.0
    };
    let v = json!({
        "db": canon,
        "source": src,
        "group": o.group,
        "state_file": state_path.display().to_string(),
        "complete": st.complete,
        "last_rowid": st.last_rowid,
        "rows": st.rows,
        "rows_this_run": rows_this_run,
        "invalid": st.invalid,
        "sent": st.sent,
        "inserted": st.inserted,
        "updated": st.updated,
        "unchanged": st.unchanged,
        "added_to_group": st.added_to_group,
        "seconds": secs,
        "rows_per_second": rate.round(),
    });
    out.emit(&v, || {
        format!(
            "{} {} rows of {} into group {} ({} this run, {:.0} rows/s)\n\
             {} new, {} updated, {} unchanged signatures; {} added to the group; {} malformed rows skipped\n{}",
            if st.complete { "imported" } else { "imported so far" },
            st.rows,
            o.db.display(),
            o.group,
            rows_this_run,
            rate,
            st.inserted,
            st.updated,
            st.unchanged,
            st.added_to_group,
            st.invalid,
            if st.complete {
                String::new()
            } else {
                "not finished: run the same command again to continue\n".to_owned()
            }
        )
    });
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let (sql, p) = filter_sql(&[
            "name=*.so".into(),
            "package=3".into(),
            "package=4".into(),
            "min-size=10".into(),
        ])
        .unwrap();
        assert_eq!(
            sql,
            " AND file_name GLOB ? AND file_size >= ? AND package_id IN (?, ?)"
        );
        assert_eq!(p.len(), 4);
        assert!(filter_sql(&["size=3".into()]).is_err());
        assert!(filter_sql(&["package=x".into()]).is_err());
        assert!(filter_sql(&["name".into()]).is_err());
    }
}
