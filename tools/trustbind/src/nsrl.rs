//! `trustbind sig import-nsrl`: streams a NIST NSRL RDSv3 SQLite database
//! into a reference group, in batches, resumably and idempotently.
//!
//! NIST publishes two RDSv3 layouts, both read here:
//!
//! - the *minimal* sets (`RDS_<v>_modern_minimal.db`): a `FILE` table
//!   (`sha256, sha1, md5, crc32, file_name, file_size, package_id`) whose
//!   primary key starts with `sha256`, and `PKG`, `OS`, `MFG` tables;
//! - the *full* sets (`RDS_<v>_modern.db`): files in `METADATA`
//!   (`file_name, extension, bytes, crc32, md5, sha1, sha256, object_id`,
//!   …) joined to packages through `PACKAGE_OBJECT(package_id, object_id)`;
//!   `FILE`, `PKG`, `OS` and `MFG` are views there.
//!
//! Rows are read in SHA-256 order (`WHERE sha256 > cursor ORDER BY
//! sha256`), so the rows of one file — one per package that ships it, six
//! on average in the modern sets — arrive together and the file is sent
//! once, whichever batch its rows fall in. The cursor (the last SHA-256 the
//! appliance acknowledged, every row of it included) is kept in a state
//! file, so an interrupted import continues after it; the appliance's
//! batch insert is idempotent, so a batch sent twice changes nothing.
//! SHA-256 values are uniform, so the cursor's position in the hash space
//! is the import's progress.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::Client;
use crate::error::{io_err, CliError, Exit, Result};
use crate::out::Out;

/// Options of an import.
#[derive(Debug, Default)]
pub struct Options {
    /// The RDSv3 database.
    pub db: PathBuf,
    /// Target group.
    pub group: String,
    /// `KEY=VALUE` file filters.
    pub filters: Vec<String>,
    /// Package filters (`--product`, `--os`, `--manufacturer`, `--app-type`).
    pub packages: PackageFilters,
    /// Signatures per request.
    pub batch: usize,
    /// Ignore saved progress.
    pub restart: bool,
    /// Stop after this many source rows.
    pub max_rows: Option<u64>,
    /// State file.
    pub state: Option<PathBuf>,
}

/// Package filters through `PKG`, `OS` and `MFG`: each a list of
/// case-insensitive globs; a package passes when it matches one value of
/// every flag given.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackageFilters {
    /// `--product`: `PKG.name`.
    pub products: Vec<String>,
    /// `--os`: `OS.name` or `OS.name || ' ' || OS.version`.
    pub oses: Vec<String>,
    /// `--manufacturer`: `MFG.name` of the package's manufacturer.
    pub manufacturers: Vec<String>,
    /// `--app-type`: `PKG.application_type`.
    pub app_types: Vec<String>,
}

impl PackageFilters {
    fn is_empty(&self) -> bool {
        self.products.is_empty()
            && self.oses.is_empty()
            && self.manufacturers.is_empty()
            && self.app_types.is_empty()
    }

    /// `(flag, values)` in a fixed order.
    fn flags(&self) -> [(&'static str, &[String]); 4] {
        [
            ("--product", &self.products),
            ("--os", &self.oses),
            ("--manufacturer", &self.manufacturers),
            ("--app-type", &self.app_types),
        ]
    }
}

/// The filters as the command line gave them (`--os Linux --filter name=*.so`).
fn describe(filters: &[String], packages: &PackageFilters) -> String {
    let mut words: Vec<String> = packages
        .flags()
        .iter()
        .flat_map(|(flag, vs)| vs.iter().map(move |v| format!("{flag} {v}")))
        .collect();
    words.extend(filters.iter().map(|f| format!("--filter {f}")));
    if words.is_empty() {
        "no filters".to_owned()
    } else {
        words.join(" ")
    }
}

/// Saved progress of an import.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// The database file (as given, canonicalised).
    pub db: String,
    /// Target group.
    pub group: String,
    /// File filters, as given.
    pub filters: Vec<String>,
    /// Package filters, as given.
    pub packages: PackageFilters,
    /// The last SHA-256 (as stored in the database) whose rows the
    /// appliance acknowledged; the next run reads after it.
    pub after: String,
    /// Source rows read so far (all runs).
    pub rows: u64,
    /// Rows skipped for malformed hashes or sizes.
    pub invalid: u64,
    /// Signatures sent: one per distinct SHA-256.
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

/// How one layout exposes the `FILE` relation's columns.
#[derive(Debug)]
struct Source {
    /// `minimal` or `full`.
    layout: &'static str,
    /// The table the hashes come from.
    table: &'static str,
    from: &'static str,
    sha256: &'static str,
    sha1: &'static str,
    name: &'static str,
    size: &'static str,
    package: &'static str,
}

/// Minimal sets: the `FILE` table (its primary key starts with `sha256`,
/// so the SHA-256 order is an index scan).
const MINIMAL: Source = Source {
    layout: "minimal",
    table: "FILE",
    from: "FILE",
    sha256: "sha256",
    sha1: "sha1",
    name: "file_name",
    size: "file_size",
    package: "package_id",
};

/// Full sets: what their `FILE` view computes, from the tables.
const FULL: Source = Source {
    layout: "full",
    table: "METADATA",
    from: "METADATA AS md JOIN PACKAGE_OBJECT AS po ON po.object_id = md.object_id",
    sha256: "md.sha256",
    sha1: "md.sha1",
    name:
        "CASE md.extension WHEN '' THEN md.file_name ELSE md.file_name || '.' || md.extension END",
    size: "md.bytes",
    package: "po.package_id",
};

const FILE_KEYS: &str = "name, package, min-size, max-size";

/// The SQL condition and parameters of the `--filter KEY=VALUE` filters.
fn filter_sql(src: &Source, filters: &[String]) -> Result<(String, Vec<SqlValue>)> {
    let mut conds = Vec::new();
    let mut params = Vec::new();
    let mut packages = Vec::new();
    for f in filters {
        let Some((k, v)) = f.split_once('=') else {
            return Err(CliError::new(
                Exit::Usage,
                format!("--filter `{f}` is not KEY=VALUE (keys: {FILE_KEYS})"),
            ));
        };
        let num = |what: &str| -> Result<i64> {
            v.trim().parse().map_err(|_| {
                CliError::new(
                    Exit::Usage,
                    format!("--filter `{f}`: {what} `{v}` is not a whole number"),
                )
            })
        };
        match k.trim() {
            "name" => {
                conds.push(format!("{} GLOB ?", src.name));
                params.push(SqlValue::Text(v.to_owned()));
            }
            "package" => packages.push(num("package id")?),
            "min-size" => {
                conds.push(format!("{} >= ?", src.size));
                params.push(SqlValue::Integer(num("size")?));
            }
            "max-size" => {
                conds.push(format!("{} <= ?", src.size));
                params.push(SqlValue::Integer(num("size")?));
            }
            other => {
                return Err(CliError::new(
                    Exit::Usage,
                    format!("--filter `{f}`: unknown key `{other}` (keys: {FILE_KEYS})"),
                ))
            }
        }
    }
    if !packages.is_empty() {
        let marks = vec!["?"; packages.len()].join(", ");
        conds.push(format!("{} IN ({marks})", src.package));
        params.extend(packages.into_iter().map(SqlValue::Integer));
    }
    Ok((conds.iter().map(|c| format!(" AND {c}")).collect(), params))
}

/// Type (`table`, `view`) and lower-case column names of a relation.
fn relation(db: &Connection, name: &str) -> rusqlite::Result<Option<(String, HashSet<String>)>> {
    let ty: Option<String> = db
        .query_row(
            "SELECT type FROM sqlite_master WHERE name = ?1 COLLATE NOCASE AND type IN ('table', 'view')",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    let Some(ty) = ty else { return Ok(None) };
    let mut st = db.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let cols = st
        .query_map([name], |r| r.get::<_, String>(0))?
        .map(|c| c.map(|c| c.to_ascii_lowercase()))
        .collect::<rusqlite::Result<_>>()?;
    Ok(Some((ty, cols)))
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> CliError + '_ {
    move |e| CliError::io(format!("reading {}: {e}", path.display()))
}

/// The first of `want` missing from `cols`.
fn missing<'a>(cols: &HashSet<String>, want: &[&'a str]) -> Option<&'a str> {
    want.iter().copied().find(|c| !cols.contains(*c))
}

/// Recognises the layout, naming the table and column that do not fit.
fn source(db: &Connection, path: &Path) -> Result<&'static Source> {
    let rel = |name: &str| {
        relation(db, name).map_err(|e| {
            CliError::io(format!(
                "{} is not a readable SQLite database: {e}",
                path.display()
            ))
        })
    };
    let no_col = |table: &str, col: &str, want: &[&str], layout: &str| {
        CliError::io(format!(
            "{}: {table} has no column {col} (the {layout} RDSv3 {table} has {}); is this an NSRL RDSv3 database?",
            path.display(),
            want.join(", ")
        ))
    };
    if let Some((ty, cols)) = rel("FILE")? {
        if ty == "table" {
            let want = ["sha256", "sha1", "file_name", "file_size", "package_id"];
            if let Some(c) = missing(&cols, &want) {
                return Err(no_col("FILE", c, &want, "minimal"));
            }
            return Ok(&MINIMAL);
        }
    }
    if let Some((ty, cols)) = rel("METADATA")? {
        if ty == "table" {
            let want = [
                "sha256",
                "sha1",
                "file_name",
                "extension",
                "bytes",
                "object_id",
            ];
            if let Some(c) = missing(&cols, &want) {
                return Err(no_col("METADATA", c, &want, "full"));
            }
            let want = ["package_id", "object_id"];
            return match rel("PACKAGE_OBJECT")? {
                Some((_, cols)) => match missing(&cols, &want) {
                    Some(c) => Err(no_col("PACKAGE_OBJECT", c, &want, "full")),
                    None => Ok(&FULL),
                },
                None => Err(CliError::io(format!(
                    "{}: METADATA is there but no PACKAGE_OBJECT table joins its files to packages; is this a complete full RDSv3 database?",
                    path.display()
                ))),
            };
        }
    }
    Err(CliError::io(format!(
        "{} has neither a FILE table (minimal RDSv3) nor METADATA and PACKAGE_OBJECT tables (full RDSv3); is this an NSRL RDSv3 database?",
        path.display()
    )))
}

/// One package filter flag: the table, what its values name, and the
/// expression a value's glob is matched against.
struct PkgFlag {
    table: &'static str,
    what: &'static str,
    columns: &'static [&'static str],
    /// Matched against `lower(glob)`; `{}` is the table alias.
    expr: &'static [&'static str],
    /// Examples shown when a value matches nothing.
    example: &'static str,
}

const PKG_COLS: &[&str] = &[
    "package_id",
    "name",
    "operating_system_id",
    "manufacturer_id",
    "application_type",
];

fn pkg_flag(flag: &str) -> PkgFlag {
    match flag {
        "--product" => PkgFlag {
            table: "PKG",
            what: "product",
            columns: PKG_COLS,
            expr: &["name"],
            example: "name",
        },
        "--os" => PkgFlag {
            table: "OS",
            what: "operating system",
            columns: &["operating_system_id", "name", "version"],
            expr: &["name", "name || ' ' || version"],
            example: "name || ' ' || version",
        },
        "--manufacturer" => PkgFlag {
            table: "MFG",
            what: "manufacturer",
            columns: &["manufacturer_id", "name"],
            expr: &["name"],
            example: "name",
        },
        _ => PkgFlag {
            table: "PKG",
            what: "application type",
            columns: PKG_COLS,
            expr: &["application_type"],
            example: "application_type",
        },
    }
}

/// `(lower(e1) GLOB lower(?) OR …)` for every value and expression.
fn any_glob(exprs: &[&str], values: &[String], params: &mut Vec<SqlValue>) -> String {
    let mut alts = Vec::new();
    for v in values {
        for e in exprs {
            alts.push(format!("lower({e}) GLOB lower(?)"));
            params.push(SqlValue::Text(v.clone()));
        }
    }
    format!("({})", alts.join(" OR "))
}

/// The condition on the package column for `--product`, `--os`,
/// `--manufacturer` and `--app-type`; every value must match something in
/// its table and the flags together at least one package.
fn package_sql(
    db: &Connection,
    path: &Path,
    src: &Source,
    f: &PackageFilters,
) -> Result<(String, Vec<SqlValue>)> {
    if f.is_empty() {
        return Ok((String::new(), Vec::new()));
    }
    let sqlerr = sql_err(path);
    let mut conds = Vec::new();
    let mut params = Vec::new();
    for (flag, values) in f.flags() {
        if values.is_empty() {
            continue;
        }
        let k = pkg_flag(flag);
        for v in values {
            if v.trim().is_empty() {
                return Err(CliError::new(
                    Exit::Usage,
                    format!("{flag} must not be empty"),
                ));
            }
            if v.chars().any(char::is_control) {
                return Err(CliError::new(
                    Exit::Usage,
                    format!("{flag} `{}` has control characters", v.escape_debug()),
                ));
            }
        }
        // The tables the flag needs.
        for (table, cols) in [(k.table, k.columns), ("PKG", PKG_COLS)] {
            match relation(db, table).map_err(&sqlerr)? {
                None => {
                    return Err(CliError::io(format!(
                        "{flag} needs the {table} table (or view) of RDSv3; {} has none",
                        path.display()
                    )))
                }
                Some((_, have)) => {
                    if let Some(c) = missing(&have, cols) {
                        return Err(CliError::io(format!(
                            "{flag} needs {table}.{c}; {table} in {} has no such column",
                            path.display()
                        )));
                    }
                }
            }
        }
        // Each value on its own.
        for v in values {
            let mut p = Vec::new();
            let cond = any_glob(k.expr, std::slice::from_ref(v), &mut p);
            let hit: bool = db
                .query_row(
                    &format!("SELECT EXISTS (SELECT 1 FROM {} WHERE {cond})", k.table),
                    params_from_iter(p),
                    |r| r.get(0),
                )
                .map_err(&sqlerr)?;
            if !hit {
                let mut st = db
                    .prepare(&format!(
                        "SELECT DISTINCT {e} FROM {t} ORDER BY {e} LIMIT 6",
                        e = k.example,
                        t = k.table
                    ))
                    .map_err(&sqlerr)?;
                let some: Vec<String> = st
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(&sqlerr)?
                    .collect::<rusqlite::Result<_>>()
                    .map_err(&sqlerr)?;
                return Err(CliError::new(
                    Exit::Usage,
                    format!(
                        "{flag} `{v}` matches no {} in {} of {} (case-insensitive glob on {}; e.g. {})",
                        k.what,
                        k.table,
                        path.display(),
                        k.expr.join(" or "),
                        some.join(", ")
                    ),
                ));
            }
        }
        conds.push(match flag {
            "--os" => format!(
                "p.operating_system_id IN (SELECT operating_system_id FROM OS WHERE {})",
                any_glob(k.expr, values, &mut params)
            ),
            "--manufacturer" => format!(
                "p.manufacturer_id IN (SELECT manufacturer_id FROM MFG WHERE {})",
                any_glob(k.expr, values, &mut params)
            ),
            _ => {
                let exprs: Vec<String> = k.expr.iter().map(|e| format!("p.{e}")).collect();
                let exprs: Vec<&str> = exprs.iter().map(String::as_str).collect();
                any_glob(&exprs, values, &mut params)
            }
        });
    }
    let packages = format!(
        "SELECT p.package_id FROM PKG AS p WHERE {}",
        conds.join(" AND ")
    );
    let hit: bool = db
        .query_row(
            &format!("SELECT EXISTS ({packages})"),
            params_from_iter(params.iter()),
            |r| r.get(0),
        )
        .map_err(&sqlerr)?;
    if !hit {
        return Err(CliError::new(
            Exit::Usage,
            format!(
                "no package in PKG matches {} together (each matches something on its own)",
                describe(&[], f)
            ),
        ));
    }
    Ok((format!(" AND {} IN ({packages})", src.package), params))
}

fn is_hex(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn load_state(path: &Path) -> Result<Option<State>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            let old = serde_json::from_slice::<Value>(&b)
                .ok()
                .is_some_and(|v| v.get("last_rowid").is_some());
            CliError::io(if old {
                format!(
                    "the import state file {} was written by an older trustbind that read rows in rowid order; pass --restart (a repeated import changes nothing)",
                    path.display()
                )
            } else {
                format!(
                    "the import state file {} is damaged ({e}); remove it or pass --restart",
                    path.display()
                )
            })
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path, &e)),
    }
}

/// Writes the state durably: a power cut leaves the old or the new file.
fn save_state(path: &Path, s: &State) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let body = serde_json::to_vec_pretty(s).unwrap_or_default();
    let mut f = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))
        .map_err(|e| io_err("write", path, &e))?;
    f.write_all(&body)
        .and_then(|()| f.as_file().sync_all())
        .map_err(|e| io_err("write", f.path(), &e))?;
    f.persist(path)
        .map(drop)
        .map_err(|e| io_err("write", path, &e.error))
}

/// One signature as `POST /v1/signatures` takes it.
#[derive(Debug, Serialize)]
struct Sig {
    sha256: String,
    sha1: Option<String>,
    size: i64,
    name: String,
}

/// `POST /v1/signatures` body.
#[derive(Serialize)]
struct Body<'a> {
    signatures: &'a [Sig],
    group: &'a str,
    source: &'a str,
    /// A bulk import: hosts' caches are flushed once when it goes quiet,
    /// not per batch.
    bulk: bool,
}

/// The signature of one row (`sha256, sha1, name, size`), or `None` when
/// its SHA-256 or size is malformed.
fn parse_row(r: &rusqlite::Row<'_>) -> Option<Sig> {
    let text = |i: usize| match r.get_ref(i) {
        Ok(ValueRef::Text(t)) => std::str::from_utf8(t).ok(),
        _ => None,
    };
    let sha256 = text(0)?.to_ascii_lowercase();
    let size: i64 = r.get(3).ok()?;
    if !is_hex(&sha256, 64) || size < 0 {
        return None;
    }
    let sha1 = text(1)
        .map(str::to_ascii_lowercase)
        .filter(|s| is_hex(s, 40));
    let mut name: String = text(2)
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    if name.len() > 4096 {
        let mut cut = 4096;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    Some(Sig {
        sha256,
        sha1,
        size,
        name,
    })
}

/// Where a SHA-256 (hex, any case) lies in the hash space, 0..1.
fn hash_fraction(h: &str) -> f64 {
    h.get(..8)
        .and_then(|p| u32::from_str_radix(p, 16).ok())
        .map_or(0.0, |x| f64::from(x) / 4_294_967_296.0)
}

/// Rows read since the last acknowledged batch.
#[derive(Default)]
struct Pending {
    sigs: Vec<Sig>,
    rows: u64,
    invalid: u64,
    /// The last SHA-256 whose rows are all in this batch.
    last: Option<String>,
    /// An upper bound of the request body's size.
    bytes: usize,
}

/// A batch is sent before its body could pass this (the appliance refuses
/// bodies over `MAX_BODY`; long names could get there before `--batch`).
const BODY_BUDGET: usize = trustbind_policy::wire::MAX_BODY / 2;

/// Reads the rows of `stmt` in SHA-256 order and hands batches of complete
/// files to `send` (which answers false when nothing more is wanted).
/// Returns the rows read and whether `--max-rows` stopped it.
fn read_batches(
    stmt: &mut rusqlite::Statement<'_>,
    params: Vec<SqlValue>,
    o: &Options,
    sqlerr: &impl Fn(rusqlite::Error) -> CliError,
    mut send: impl FnMut(Pending) -> bool,
) -> Result<(u64, bool)> {
    let mut rows = stmt.query(params_from_iter(params)).map_err(sqlerr)?;
    let mut pending = Pending::default();
    let mut rows_this_run = 0_u64;
    // The file whose rows are being read: its SHA-256 as stored, rows,
    // rejected rows, and its signature (from its first good row).
    let mut key: Vec<u8> = Vec::new();
    let mut group = (0_u64, 0_u64, None::<Sig>);
    loop {
        let next = match rows.next().map_err(sqlerr)? {
            Some(r) => match r.get_ref(0).map_err(sqlerr)? {
                ValueRef::Text(t) => Some((r, t)),
                // The query reads text hashes only.
                _ => return Err(CliError::io("the RDS query returned a non-text SHA-256")),
            },
            None => None,
        };
        let same = next.as_ref().is_some_and(|(_, t)| *t == key.as_slice());
        if !same && group.0 > 0 {
            // The previous file's rows are complete.
            let (n, bad, sig) = std::mem::take(&mut group);
            pending.rows += n;
            pending.invalid += bad;
            if let Some(sig) = sig {
                // JSON: keys, hex, size, and the name (control characters
                // are gone, so escaping at most doubles it).
                pending.bytes += 200 + 2 * sig.name.len();
                pending.sigs.push(sig);
            }
            pending.last = Some(String::from_utf8_lossy(&key).into_owned());
            rows_this_run += n;
            let cap = o.max_rows.is_some_and(|m| rows_this_run >= m);
            let full = pending.sigs.len() >= o.batch || pending.bytes >= BODY_BUDGET;
            if (full || cap || next.is_none()) && !send(std::mem::take(&mut pending)) {
                // The sender stopped; its error is the one to report.
                return Ok((rows_this_run, true));
            }
            if cap && next.is_some() {
                return Ok((rows_this_run, true));
            }
        }
        let Some((r, t)) = next else {
            return Ok((rows_this_run, false));
        };
        if !same {
            key.clear();
            key.extend_from_slice(t);
        }
        group.0 += 1;
        if group.2.is_none() {
            match parse_row(r) {
                Some(s) => group.2 = Some(s),
                None => group.1 += 1,
            }
        }
    }
}

/// Runs an import.
#[allow(clippy::too_many_lines)]
pub fn import(c: &Client, o: &Options, out: &Out) -> Result<u8> {
    let max = trustbind_policy::wire::MAX_BATCH;
    if o.batch == 0 || o.batch > max {
        return Err(CliError::new(
            Exit::Usage,
            format!("--batch {} is out of range 1..={max}", o.batch),
        ));
    }
    let db = Connection::open_with_flags(
        &o.db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| CliError::io(format!("cannot open {} as SQLite: {e}", o.db.display())))?;
    let src = source(&db, &o.db)?;
    let (filter, mut params) = filter_sql(src, &o.filters)?;
    let (pfilter, pparams) = package_sql(&db, &o.db, src, &o.packages)?;
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
        packages: o.packages.clone(),
        ..State::default()
    };
    // --restart does not read the old file (which may be damaged or from
    // an older trustbind); the first acknowledged batch replaces it.
    let saved = if o.restart {
        None
    } else {
        load_state(&state_path)?
    };
    let mut st = match saved {
        Some(s) => {
            if s.db != canon
                || s.group != o.group
                || s.filters != o.filters
                || s.packages != o.packages
            {
                return Err(CliError::new(
                    Exit::Usage,
                    format!(
                        "the state file {} belongs to an import of {} into group `{}` with {}; pass --restart to start over or --state to use another file",
                        state_path.display(),
                        s.db,
                        s.group,
                        describe(&s.filters, &s.packages)
                    ),
                ));
            }
            s
        }
        None => fresh,
    };
    if !st.after.is_empty() {
        out.note(&format!(
            "resuming after SHA-256 {} ({} rows done; state in {})",
            st.after,
            st.rows,
            state_path.display()
        ));
    }
    c.post(
        "/v1/groups",
        &json!({ "name": o.group, "description": "NSRL RDS import" }),
    )?;
    let sqlerr = sql_err(&o.db);
    let sql = format!(
        "SELECT {sha256}, {sha1}, {name}, {size} FROM {from} \
         WHERE {sha256} > ?1 AND typeof({sha256}) = 'text'{filter}{pfilter} ORDER BY {sha256}",
        sha256 = src.sha256,
        sha1 = src.sha1,
        name = src.name,
        size = src.size,
        from = src.from,
    );
    let mut stmt = db.prepare(&sql).map_err(&sqlerr)?;
    params.insert(0, SqlValue::Text(st.after.clone()));
    params.extend(pparams);
    // Without an index on the hash, SQLite sorts the rows before the
    // first one comes out; say so rather than look stuck.
    let sorts = db
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .and_then(|mut p| {
            p.query_map(params_from_iter(params.iter()), |r| r.get::<_, String>(3))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(&sqlerr)?
        .iter()
        .any(|d| d.contains("TEMP B-TREE"));
    if sorts {
        out.note(&format!(
            "{} has no index on {}.sha256: SQLite first sorts the rows to read (temporary files in $SQLITE_TMPDIR, about the size of those rows); see `trustbind sig import-nsrl --help`",
            o.db.display(),
            src.table
        ));
    }

    let pb = if out.is_json() {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::with_draw_target(Some(10_000), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {percent}% {msg}",
        ) {
            pb.set_style(style);
        }
        pb
    };
    let text_progress = !out.is_json() && pb.is_hidden();
    let started = Instant::now();
    let start_frac = hash_fraction(&st.after);
    let start_rows = st.rows;
    let mut last_line = Instant::now();
    let mut show = |st: &State| {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let frac = hash_fraction(&st.after);
        let eta = if frac > start_frac {
            let left = secs / (frac - start_frac) * (1.0 - frac);
            HumanDuration(Duration::from_secs_f64(left.min(1e9))).to_string()
        } else {
            "?".to_owned()
        };
        let msg = format!(
            "{} rows ({:.0} rows/s), {} files sent, ETA {eta}",
            st.rows,
            (st.rows - start_rows) as f64 / secs,
            st.sent
        );
        pb.set_position((frac * 10_000.0) as u64);
        pb.set_message(msg.clone());
        if text_progress && last_line.elapsed() >= Duration::from_secs(30) {
            last_line = Instant::now();
            out.note(&format!("{:.1}%: {msg}", frac * 100.0));
        }
    };
    let source_label = "nsrl";
    // Sends `p` and records its acknowledgement.
    let flush = |st: &mut State, p: Pending| -> Result<()> {
        if !p.sigs.is_empty() {
            let v = c.post(
                "/v1/signatures",
                &Body {
                    signatures: &p.sigs,
                    group: &o.group,
                    source: source_label,
                    bulk: true,
                },
            )?;
            let g = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            st.inserted += g("inserted");
            st.updated += g("updated");
            st.unchanged += g("unchanged");
            st.added_to_group += g("added_to_group");
            st.sent += p.sigs.len() as u64;
        }
        st.rows += p.rows;
        st.invalid += p.invalid;
        if let Some(last) = p.last {
            st.after = last;
        }
        save_state(&state_path, st)
    };

    // The next batch is read while the appliance stores the previous one:
    // a sender thread posts the batches in order and saves the state after
    // each acknowledgement; the channel holds at most one batch.
    let (to_sender, batches) = std::sync::mpsc::sync_channel::<Pending>(1);
    let (read, sent) = std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> Result<State> {
            for p in batches {
                flush(&mut st, p)?;
                show(&st);
            }
            Ok(st)
        });
        let read = read_batches(&mut stmt, params, o, &sqlerr, |p| to_sender.send(p).is_ok());
        drop(to_sender);
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(CliError::io("the import's sender thread panicked")));
        (read, sent)
    });
    // A refused or failed request is the first cause; a read error otherwise.
    let mut st = sent?;
    let (rows_this_run, capped) = read?;
    if !capped {
        st.complete = true;
        save_state(&state_path, &st)?;
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
        "layout": src.layout,
        "source": src.table,
        "group": o.group,
        "state_file": state_path.display().to_string(),
        "complete": st.complete,
        "after": st.after,
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
            "{} {} rows of {} ({} layout) into group {} ({} this run, {:.0} rows/s)\n\
             {} files sent: {} new, {} updated, {} unchanged signatures; {} added to the group; {} malformed rows skipped\n{}",
            if st.complete { "imported" } else { "imported so far" },
            st.rows,
            o.db.display(),
            src.layout,
            o.group,
            rows_this_run,
            rate,
            st.sent,
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
    fn file_filters() {
        let (sql, p) = filter_sql(
            &MINIMAL,
            &[
                "name=*.so".into(),
                "package=3".into(),
                "package=4".into(),
                "min-size=10".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            sql,
            " AND file_name GLOB ? AND file_size >= ? AND package_id IN (?, ?)"
        );
        assert_eq!(p.len(), 4);
        let (sql, _) = filter_sql(&FULL, &["max-size=3".into()]).unwrap();
        assert_eq!(sql, " AND md.bytes <= ?");
        assert!(filter_sql(&MINIMAL, &["size=3".into()]).is_err());
        assert!(filter_sql(&MINIMAL, &["package=x".into()]).is_err());
        assert!(filter_sql(&MINIMAL, &["name".into()]).is_err());
    }

    #[test]
    fn progress_is_the_position_in_the_hash_space() {
        assert!(hash_fraction("").abs() < f64::EPSILON);
        assert!((hash_fraction("80000000AB") - 0.5).abs() < 1e-9);
        assert!((hash_fraction("c0000000") - 0.75).abs() < 1e-9);
        assert!(hash_fraction("not-a-hash").abs() < f64::EPSILON);
    }
}
