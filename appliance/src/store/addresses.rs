//! The addresses an administrator assigned to hosts (issue 15 item 1,
//! T-68): with the address a host's agent connects from, what a host may
//! name as its own end of a channel (`crate::hostaddr`). An address belongs
//! to one host at most; assigning it to a second host is a conflict.

use std::net::IpAddr;

use rusqlite::{params, Connection, OptionalExtension};

use super::{now_ms, AuditEvent, Store, StoreError};
use crate::hostaddr::{assignable, MAX_ASSIGNED};

/// The addresses assigned to `host`, sorted, in `conn`.
pub(super) fn addresses_in(conn: &Connection, host: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT addr FROM host_addresses WHERE host = ?1 ORDER BY addr")?;
    let rows = stmt.query_map([host], |r| r.get(0))?;
    Ok(rows.collect::<Result<Vec<String>, _>>()?)
}

impl Store {
    /// Replaces the addresses assigned to `host` with `addrs` (canonical:
    /// IPv4-mapped IPv6 as IPv4), audited as `host.addresses` by `actor`;
    /// the addresses now assigned. Refused: an unknown host, more than
    /// [`MAX_ASSIGNED`] addresses, a loopback or non-unicast address, an
    /// address assigned to another host (a conflict naming it).
    pub fn set_host_addresses(
        &self,
        host: &str,
        addrs: &[IpAddr],
        actor: &str,
    ) -> Result<Vec<String>, StoreError> {
        if addrs.len() > MAX_ASSIGNED {
            return Err(StoreError::Invalid {
                what: "addresses",
                why: format!("{} addresses, at most {MAX_ASSIGNED} per host", addrs.len()),
            });
        }
        let mut canon = addrs
            .iter()
            .map(|a| assignable(*a).map(|a| a.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|why| StoreError::Invalid {
                what: "addresses",
                why,
            })?;
        canon.sort();
        canon.dedup();
        self.write(|tx| {
            let known: Option<String> = tx
                .query_row("SELECT name FROM hosts WHERE name = ?1", [host], |r| r.get(0))
                .optional()?;
            if known.is_none() {
                return Err(StoreError::NotFound {
                    what: "host",
                    key: host.into(),
                });
            }
            let before = addresses_in(tx, host)?;
            for a in &canon {
                let owner: Option<String> = tx
                    .query_row("SELECT host FROM host_addresses WHERE addr = ?1", [a], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if let Some(o) = owner.filter(|o| o != host) {
                    return Err(StoreError::Conflict(format!(
                        "address {a} is assigned to host `{o}`; remove it there first"
                    )));
                }
            }
            tx.execute("DELETE FROM host_addresses WHERE host = ?1", [host])?;
            let now = now_ms();
            for a in &canon {
                tx.execute(
                    "INSERT INTO host_addresses (addr, host, added_ms, added_by) VALUES (?1, ?2, ?3, ?4)",
                    params![a, host, now, actor],
                )?;
            }
            let ev = AuditEvent::new(
                "host.addresses",
                actor,
                serde_json::json!({ "host": host, "addresses": canon, "before": before }),
            );
            Ok((canon.clone(), Some(ev)))
        })
    }

    /// The addresses assigned to `host`, sorted.
    pub fn host_addresses(&self, host: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.read()?;
        addresses_in(&conn, host)
    }

    /// The host `addr` is assigned to, if any (`addr` canonical).
    pub fn address_owner(&self, addr: IpAddr) -> Result<Option<String>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare_cached("SELECT host FROM host_addresses WHERE addr = ?1")?;
        Ok(stmt
            .query_row([addr.to_canonical().to_string()], |r| r.get(0))
            .optional()?)
    }
}
