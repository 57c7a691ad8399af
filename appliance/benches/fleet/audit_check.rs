//! Nothing acknowledged is lost (issue 16 item 2): what the simulated
//! agents sent and what they got an answer for, checked after the run
//! against the appliance's audit log in its data directory.
//!
//! A `Qualify` result echoes its request's `id` (nothing in the reply
//! names the audit row), and the appliance audits each decision as a
//! `decision` row whose actor is the host and whose detail holds that
//! `id`. The generator makes request ids unique across the fleet (the
//! agent's index in the high bits, [`request_id`]), so a decision row is
//! matched by (host, request id). A `Report` record is matched by its
//! record id (`fleet-<agent>-<n>`, the row's `report_id`) and host.
//!
//! The chain is verified by the appliance's own command
//! (`trustbind-appliance audit verify`); the rows are read with its store
//! code (`Store::audit_rows`) once the appliance has stopped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};

use trustbind_appliance::policy::audit::{read_export_files, ExportLine};
use trustbind_appliance::retention;
use trustbind_appliance::store::{AuditRow, Store};

/// The database file in the data directory (as `trustbind-appliance`).
const DB_FILE: &str = "appliance.db";
/// Audit rows read per page.
const PAGE: u32 = 10_000;
/// The `what` of a fleet `Report` record (audited as `agent.` + `what`).
pub const REPORT_WHAT: &str = "fleet.load";

/// What an acknowledgement is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A `Qualify` request (exec, connect, accept).
    Decision,
    /// A `Report` record.
    Report,
}

/// One request or record: its kind, the host (agent index) it was sent
/// as, and its number (request id, or the `n` of a record id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    pub host: u32,
    pub id: u64,
}

/// A request id unique across the fleet: agent `i`'s `n`-th.
pub fn request_id(i: usize, n: u64) -> u64 {
    ((i as u64 + 1) << 32) | (n & 0xffff_ffff)
}

/// What was sent and what was answered, per host.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub sent: Vec<Key>,
    pub acked: Vec<Key>,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        self.sent.extend(other.sent);
        self.acked.extend(other.acked);
    }
}

/// What the check found.
#[derive(Debug, Clone, Default)]
pub struct AuditCheck {
    /// `trustbind-appliance audit verify`: exit status and output.
    pub verify_ok: bool,
    pub verify_output: String,
    /// `PRAGMA integrity_check`.
    pub integrity: String,
    /// Rows read (from the export files and the store; first, last seq).
    pub rows: u64,
    /// Of which from the export files (pruned from the store).
    pub exported: u64,
    pub first_seq: i64,
    pub head_seq: i64,
    /// Requests and records sent, by kind.
    pub sent: BTreeMap<&'static str, u64>,
    /// Acknowledged (the agent got the answer).
    pub acked: BTreeMap<&'static str, u64>,
    /// Acknowledged and found in the audit.
    pub found: BTreeMap<&'static str, u64>,
    /// Acknowledged and not in the audit: must be none.
    pub missing: Vec<Key>,
    /// Rows of requests sent but never answered (committed, the reply
    /// lost to the kill or the call's end): allowed.
    pub unacked_rows: BTreeMap<&'static str, u64>,
    /// Sent, no answer, no row (never decided, or refused): allowed.
    pub unacked_absent: BTreeMap<&'static str, u64>,
    /// Rows that match no request sent, or one more than once: must be
    /// none (the matching would be unsound).
    pub strays: u64,
    pub duplicates: u64,
}

fn name(k: Kind) -> &'static str {
    match k {
        Kind::Decision => "decisions",
        Kind::Report => "report records",
    }
}

impl AuditCheck {
    /// Why the check failed, if it did.
    pub fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        if !self.verify_ok {
            why.push(format!(
                "the audit chain does not verify: {}",
                self.verify_output
            ));
        }
        if self.integrity != "ok" {
            why.push(format!("integrity_check: {}", self.integrity));
        }
        if self.first_seq != 1 || i64::try_from(self.rows).ok() != Some(self.head_seq) {
            why.push(format!(
                "the rows read ({}, seq {}..={}) are not the whole chain",
                self.rows, self.first_seq, self.head_seq
            ));
        }
        if !self.missing.is_empty() {
            let first: Vec<String> = self
                .missing
                .iter()
                .take(5)
                .map(|k| format!("{k:?}"))
                .collect();
            why.push(format!(
                "{} acknowledged without an audit row (first: {})",
                self.missing.len(),
                first.join(", ")
            ));
        }
        if self.strays > 0 || self.duplicates > 0 {
            why.push(format!(
                "{} rows match no request sent and {} match one twice",
                self.strays, self.duplicates
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// Runs `trustbind-appliance --data-dir DATA ARGS`: whether it passed,
/// and its output.
fn appliance_says(bin: &Path, data: &Path, args: &[&OsStr]) -> Result<(bool, String), String> {
    let out = super::appliance_command(bin, data)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text.trim().replace('\n', " / ")))
}

/// The audit rows the retention task exported before pruning them
/// (`<data>/export/audit-NNNNNNNN.jsonl`), oldest file first; none if it
/// exported nothing.
fn export_files(data: &Path) -> Result<Vec<PathBuf>, String> {
    match retention::export_files(&data.join("export"), "audit") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        r => r.map_err(|e| format!("export files: {e}")),
    }
}

/// The rows of the fleet's requests, counted by key.
struct Rows<'a> {
    index: HashMap<&'a str, u32>,
    sent: HashSet<Key>,
    found: HashMap<Key, u32>,
    /// Sequence numbers read (the export files may repeat rows still in
    /// the store: a crash between export and prune).
    seqs: HashSet<i64>,
}

impl Rows<'_> {
    fn take(&mut self, c: &mut AuditCheck, r: &AuditRow) -> Result<(), String> {
        if !self.seqs.insert(r.seq) {
            return Ok(());
        }
        let kind = match r.kind.as_str() {
            "decision" => Kind::Decision,
            k if k.strip_prefix("agent.") == Some(REPORT_WHAT) => Kind::Report,
            _ => return Ok(()),
        };
        let Some(&host) = self.index.get(r.actor.as_str()) else {
            c.strays += 1;
            return Ok(());
        };
        let detail: serde_json::Value = serde_json::from_str(&r.detail)
            .map_err(|e| format!("audit row {}: detail: {e}", r.seq))?;
        let id = match kind {
            Kind::Decision => detail["id"].as_u64(),
            Kind::Report => detail["report_id"]
                .as_str()
                .and_then(|s| s.rsplit_once('-'))
                .and_then(|(_, n)| n.parse().ok()),
        };
        let key = id.map(|id| Key { kind, host, id });
        match key.filter(|k| self.sent.contains(k)) {
            None => c.strays += 1,
            Some(k) => {
                let n = self.found.entry(k).or_insert(0);
                *n += 1;
                if *n > 1 {
                    c.duplicates += 1;
                }
            }
        }
        Ok(())
    }
}

/// Checks the data directory `data` of a stopped appliance (binary `bin`)
/// against `ledger`; `hosts` are the agents' names by index. Rows the
/// appliance's retention pruned during the run (a disk under its alarm
/// threshold) are read from its export files, which
/// `trustbind-appliance audit verify-export` must pass as well.
pub fn check(
    bin: &Path,
    data: &Path,
    hosts: &[String],
    ledger: &Ledger,
) -> Result<AuditCheck, String> {
    let mut c = AuditCheck::default();
    (c.verify_ok, c.verify_output) =
        appliance_says(bin, data, &["audit".as_ref(), "verify".as_ref()])?;
    let exports = export_files(data)?;
    let mut rows = Rows {
        index: hosts
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u32))
            .collect(),
        sent: ledger.sent.iter().copied().collect(),
        found: HashMap::new(),
        seqs: HashSet::new(),
    };
    if !exports.is_empty() {
        let mut args: Vec<&OsStr> = vec!["audit".as_ref(), "verify-export".as_ref()];
        args.extend(exports.iter().map(|p| p.as_os_str()));
        let (ok, out) = appliance_says(bin, data, &args)?;
        c.verify_ok &= ok;
        c.verify_output = format!("{} / {out}", c.verify_output);
        let lines =
            read_export_files(&exports).map_err(|(f, e)| format!("{}: {e}", f.display()))?;
        for l in lines.iter().filter(|l| !l.trim().is_empty()) {
            let line: ExportLine =
                serde_json::from_str(l).map_err(|e| format!("export line: {e}"))?;
            if let ExportLine::Row(r) = line {
                rows.take(&mut c, &r)?;
                c.exported += 1;
            }
        }
    }

    let store = Store::open(&data.join(DB_FILE)).map_err(|e| format!("store: {e}"))?;
    c.integrity = store.integrity_check().map_err(|e| format!("store: {e}"))?;
    let mut after = 0;
    loop {
        let page = store
            .audit_rows(after, PAGE)
            .map_err(|e| format!("store: {e}"))?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        c.head_seq = last.seq;
        for r in &page {
            rows.take(&mut c, r)?;
        }
    }
    c.rows = rows.seqs.len() as u64;
    c.first_seq = rows.seqs.iter().copied().min().unwrap_or(0);
    let (sent, rows) = (rows.sent, rows.found);
    let acked: HashSet<Key> = ledger.acked.iter().copied().collect();
    for k in &sent {
        *c.sent.entry(name(k.kind)).or_insert(0) += 1;
        if acked.contains(k) {
            *c.acked.entry(name(k.kind)).or_insert(0) += 1;
            if rows.contains_key(k) {
                *c.found.entry(name(k.kind)).or_insert(0) += 1;
            } else {
                c.missing.push(*k);
            }
        } else if rows.contains_key(k) {
            *c.unacked_rows.entry(name(k.kind)).or_insert(0) += 1;
        } else {
            *c.unacked_absent.entry(name(k.kind)).or_insert(0) += 1;
        }
    }
    // An answer for something never sent would be a generator bug.
    c.strays += acked.difference(&sent).count() as u64;
    c.missing.sort();
    Ok(c)
}

impl fmt::Display for AuditCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let get = |m: &BTreeMap<&'static str, u64>, k: Kind| m.get(name(k)).copied().unwrap_or(0);
        writeln!(
            f,
            "audit check: chain {} ({}); integrity {}; {} rows, seq {}..={} ({} from export files)",
            if self.verify_ok { "verifies" } else { "BROKEN" },
            self.verify_output,
            self.integrity,
            self.rows,
            self.first_seq,
            self.head_seq,
            self.exported
        )?;
        for k in [Kind::Decision, Kind::Report] {
            let missing = self.missing.iter().filter(|m| m.kind == k).count();
            writeln!(
                f,
                "  {:<15} sent {}, acknowledged {}, found {}, MISSING {}; unacknowledged: {} with a row (reply lost), {} without",
                name(k),
                get(&self.sent, k),
                get(&self.acked, k),
                get(&self.found, k),
                missing,
                get(&self.unacked_rows, k),
                get(&self.unacked_absent, k)
            )?;
        }
        write!(
            f,
            "  rows matching no request sent {}, duplicates {}; {}",
            self.strays,
            self.duplicates,
            match self.failure() {
                None => "nothing acknowledged was lost".to_owned(),
                Some(why) => format!("FAILED: {why}"),
            }
        )
    }
}
