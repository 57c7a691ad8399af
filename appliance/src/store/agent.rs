//! Audit records agents deliver after being offline (idempotent by their id).

use rusqlite::{params, Transaction, TransactionBehavior};
use serde::Deserialize;

use super::{audit, now_ms, AuditEvent, Store, StoreError};

/// One audit record an agent spooled while offline.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    /// Unique per host, chosen by the agent.
    pub id: String,
    /// Host clock when it happened, ms since the Unix epoch.
    pub host_at_ms: i64,
    /// What happened (`[a-z0-9_.]+`); stored as kind `agent.<what>`.
    pub what: String,
    /// Event fields (a JSON object).
    pub detail: serde_json::Value,
}

impl Store {
    /// Stores the records `host` delivered, in one transaction: each new
    /// `(host, id)` becomes an audit row of kind `agent.<what>` (actor =
    /// host, detail = the record's fields plus `report_id` and
    /// `host_at_ms`); ids already stored are skipped. A `channel.close`
    /// record is one end's close of a channel instead (see
    /// [`close_channel_end`]). Returns (stored, duplicates).
    pub fn record_agent_reports(
        &self,
        host: &str,
        records: &[AgentRecord],
    ) -> Result<(u32, u32), StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let at = now_ms();
        let (mut stored, mut dup) = (0_u32, 0_u32);
        for r in records {
            let n = tx.execute(
                "INSERT INTO agent_reports (host, report_id, host_at_ms, received_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (host, report_id) DO NOTHING",
                params![host, r.id, r.host_at_ms, at],
            )?;
            if n == 0 {
                dup = dup.saturating_add(1);
                continue;
            }
            if r.what == "channel.close" {
                if let Ok(c) = serde_json::from_value::<CloseReport>(r.detail.clone()) {
                    close_channel_end(&tx, at, host, &r.id, r.host_at_ms, &c)?;
                    stored = stored.saturating_add(1);
                    continue;
                }
            }
            let detail = serde_json::json!({
                "report_id": r.id,
                "host_at_ms": r.host_at_ms,
                "detail": r.detail,
            });
            let ev = AuditEvent::new(&format!("agent.{}", r.what), host, detail);
            audit::append(&tx, at, &ev)?;
            stored = stored.saturating_add(1);
        }
        tx.commit()?;
        Ok((stored, dup))
    }
}

/// The detail of a `channel.close` report (as the agent spools it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CloseReport {
    /// The appliance's channel id as pushed with the key.
    #[serde(default)]
    pub channel_id: u64,
    /// The channel's key id (hex).
    pub key_id: String,
    /// `connect` or `accept`.
    pub role: CloseRole,
    /// TCP payload bytes the end sent (TLS records included).
    pub bytes_sent: u64,
    /// TCP payload bytes it received.
    pub bytes_received: u64,
    /// From key installation to close, ms.
    pub duration_ms: u64,
    /// Why the end closed (agents before idle timeouts send none).
    #[serde(default)]
    pub reason: CloseReason,
}

/// Why an end closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseReason {
    /// Its program closed the socket (or exited).
    #[default]
    Closed,
    /// The module ended the channel after its idle timeout.
    Idle,
}

impl CloseReason {
    fn name(self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::Idle => "idle",
        }
    }
}

/// Which end closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseRole {
    /// The client end.
    Connect,
    /// The server end.
    Accept,
}

impl CloseRole {
    fn name(self) -> &'static str {
        match self {
            CloseRole::Connect => "connect",
            CloseRole::Accept => "accept",
        }
    }
}

fn sql_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Records one end's close: the channel with that key id whose end of
/// that role is `host` (its connect end is `src_host`, its accept end
/// `dst_host`) gets the end's close time (appliance clock), bytes and
/// duration, and `closed_ms` if it had none (the channel ends with its
/// first end); a repeat of an end already recorded changes nothing. Always
/// audited `channel.close` (actor = host) with key id, host, role and
/// bytes; `matched: false` when no such channel end exists (unknown key id,
/// or another host's end: nothing is changed then).
fn close_channel_end(
    tx: &Transaction<'_>,
    at: i64,
    host: &str,
    report_id: &str,
    host_at_ms: i64,
    c: &CloseReport,
) -> Result<(), StoreError> {
    let (sql, role) = match c.role {
        CloseRole::Connect => (
            "UPDATE channels SET connect_closed_ms = ?1, connect_bytes_sent = ?2,
                 connect_bytes_received = ?3, connect_duration_ms = ?4, connect_reason = ?7,
                 closed_ms = COALESCE(closed_ms, ?1)
             WHERE key_id = ?5 AND src_host = ?6 AND connect_closed_ms IS NULL",
            c.role.name(),
        ),
        CloseRole::Accept => (
            "UPDATE channels SET accept_closed_ms = ?1, accept_bytes_sent = ?2,
                 accept_bytes_received = ?3, accept_duration_ms = ?4, accept_reason = ?7,
                 closed_ms = COALESCE(closed_ms, ?1)
             WHERE key_id = ?5 AND dst_host = ?6 AND accept_closed_ms IS NULL",
            c.role.name(),
        ),
    };
    let n = tx.execute(
        sql,
        params![
            at,
            sql_i64(c.bytes_sent),
            sql_i64(c.bytes_received),
            sql_i64(c.duration_ms),
            c.key_id,
            host,
            c.reason.name()
        ],
    )?;
    let ev = AuditEvent::new(
        "channel.close",
        host,
        serde_json::json!({
            "key_id": c.key_id,
            "channel_id": c.channel_id,
            "host": host,
            "role": role,
            "bytes_sent": c.bytes_sent,
            "bytes_received": c.bytes_received,
            "duration_ms": c.duration_ms,
            "reason": c.reason.name(),
            "matched": n == 1,
            "report_id": report_id,
            "host_at_ms": host_at_ms,
        }),
    );
    audit::append(tx, at, &ev)?;
    Ok(())
}
