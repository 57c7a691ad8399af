//! Channels as the admin API lists them: opened by the gate (key id, hosts,
//! tuple), closed per end by the agents' `channel.close` reports
//! (`agent.rs`).

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// One end's close, as that end's host reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelEnd {
    /// When the report reached the appliance, ms since the Unix epoch.
    pub closed_ms: i64,
    /// TCP payload bytes this end sent (TLS records included).
    pub bytes_sent: i64,
    /// TCP payload bytes it received.
    pub bytes_received: i64,
    /// From key installation to close on that host, ms.
    pub duration_ms: i64,
    /// `closed` (the program closed its socket, or exited) or `idle` (the
    /// module ended the channel after its idle timeout).
    pub reason: String,
}

/// A channel (never its key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    /// Row id.
    pub id: i64,
    /// Random key id (hex).
    pub key_id: String,
    /// The connecting host.
    pub src_host: String,
    /// The accepting host.
    pub dst_host: String,
    /// `client -> server` as the gate saw it.
    pub tuple: String,
    /// When the key was issued, ms since the Unix epoch.
    pub opened_ms: i64,
    /// When the first end reported its close (`None`: open).
    pub closed_ms: Option<i64>,
    /// The connect end's close.
    pub connect: Option<ChannelEnd>,
    /// The accept end's close.
    pub accept: Option<ChannelEnd>,
}

fn end(
    closed: Option<i64>,
    sent: Option<i64>,
    received: Option<i64>,
    duration: Option<i64>,
    reason: Option<String>,
) -> Option<ChannelEnd> {
    Some(ChannelEnd {
        closed_ms: closed?,
        bytes_sent: sent.unwrap_or(0),
        bytes_received: received.unwrap_or(0),
        duration_ms: duration.unwrap_or(0),
        reason: reason.unwrap_or_else(|| "closed".into()),
    })
}

impl Store {
    /// Channels with an id above `after`, oldest first, at most `limit`;
    /// only those no end reported closed if `open_only`.
    pub fn list_channels(
        &self,
        open_only: bool,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ChannelInfo>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare_cached(
            "SELECT id, key_id, src_host, dst_host, tuple, opened_ms, closed_ms,
                    connect_closed_ms, connect_bytes_sent, connect_bytes_received,
                    connect_duration_ms, connect_reason, accept_closed_ms, accept_bytes_sent,
                    accept_bytes_received, accept_duration_ms, accept_reason
             FROM channels WHERE id > ?1 AND (?2 = 0 OR closed_ms IS NULL)
             ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after, i64::from(open_only), limit], |r| {
            Ok(ChannelInfo {
                id: r.get(0)?,
                key_id: r.get(1)?,
                src_host: r.get(2)?,
                dst_host: r.get(3)?,
                tuple: r.get(4)?,
                opened_ms: r.get(5)?,
                closed_ms: r.get(6)?,
                connect: end(r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?),
                accept: end(r.get(12)?, r.get(13)?, r.get(14)?, r.get(15)?, r.get(16)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}
