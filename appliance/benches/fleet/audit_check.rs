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
use std::fmt;
use std::path::Path;

use trustbind_appliance::store::Store;

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
    /// Rows in the store (first, last seq).
    pub rows: u64,
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
                self.verify_output.trim()
            ));
        }
        if self.integrity != "ok" {
            why.push(format!("integrity_check: {}", self.integrity));
        }
        if self.first_seq > 1 {
            why.push(format!(
                "rows before seq {} were pruned during the run: the check reads the store only",
                self.first_seq
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

/// Checks the data directory `data` of a stopped appliance (binary `bin`)
/// against `ledger`; `hosts` are the agents' names by index.
pub fn check(
    bin: &Path,
    data: &Path,
    hosts: &[String],
    ledger: &Ledger,
) -> Result<AuditCheck, String> {
    let mut c = AuditCheck::default();
    let out = super::appliance_command(bin, data)
        .args(["audit", "verify"])
        .output()
        .map_err(|e| format!("cannot run {} audit verify: {e}", bin.display()))?;
    c.verify_ok = out.status.success();
    c.verify_output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let store = Store::open(&data.join(DB_FILE)).map_err(|e| format!("store: {e}"))?;
    c.integrity = store.integrity_check().map_err(|e| format!("store: {e}"))?;
    let index: HashMap<&str, u32> = hosts
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let sent: HashSet<Key> = ledger.sent.iter().copied().collect();
    let mut rows: HashMap<Key, u32> = HashMap::new();
    let mut after = 0;
    loop {
        let page = store
            .audit_rows(after, PAGE)
            .map_err(|e| format!("store: {e}"))?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        if c.first_seq == 0 {
            c.first_seq = page.first().map_or(0, |r| r.seq);
        }
        c.head_seq = last.seq;
        c.rows += page.len() as u64;
        for r in &page {
            let kind = match r.kind.as_str() {
                "decision" => Kind::Decision,
                k if k.strip_prefix("agent.") == Some(REPORT_WHAT) => Kind::Report,
                _ => continue,
            };
            let Some(&host) = index.get(r.actor.as_str()) else {
                c.strays += 1;
                continue;
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
            let Some(id) = id else {
                c.strays += 1;
                continue;
            };
            let key = Key { kind, host, id };
            if !sent.contains(&key) {
                c.strays += 1;
                continue;
            }
            let n = rows.entry(key).or_insert(0);
            *n += 1;
            if *n > 1 {
                c.duplicates += 1;
            }
        }
    }
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
            "audit check: chain {} ({}); integrity {}; {} rows, seq {}..={}",
            if self.verify_ok { "verifies" } else { "BROKEN" },
            self.verify_output.trim().replace('\n', " / "),
            self.integrity,
            self.rows,
            self.first_seq,
            self.head_seq
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
