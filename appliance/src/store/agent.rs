//! Audit records agents deliver after being offline (idempotent by their id).

use rusqlite::{params, TransactionBehavior};

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
    /// `host_at_ms`); ids already stored are skipped. Returns (stored,
    /// duplicates).
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
