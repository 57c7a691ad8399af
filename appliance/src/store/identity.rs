//! Admin certificates (which the admin port accepts, with their role and
//! revocation), host enrolment token lifetimes, re-issued host tokens and
//! renewed host certificates (issue 16 item 6; schema version 10).

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{check_hex, now_ms, touch_data, AuditEvent, Store, StoreError};

/// Default lifetime of an enrolment token (host or admin): 24 h.
pub const DEFAULT_TOKEN_TTL_MS: i64 = 24 * 3600 * 1000;
/// Longest lifetime of an enrolment token: 366 days.
pub const MAX_TOKEN_TTL_MS: i64 = 366 * 24 * 3600 * 1000;

/// What an admin certificate allows on the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminRole {
    /// Everything.
    Admin,
    /// Reads and `/metrics` only (and renewing its own certificate).
    ReadOnly,
}

impl AdminRole {
    /// The stored and wire spelling: `admin` or `read-only`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::ReadOnly => "read-only",
        }
    }

    /// Parses [`AdminRole::as_str`]'s spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Self::Admin),
            "read-only" => Some(Self::ReadOnly),
            _ => None,
        }
    }
}

impl std::fmt::Display for AdminRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An admin certificate the appliance issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminCert {
    /// Serial, lower-case hex.
    pub serial: String,
    /// The admin's name (certificate CN).
    pub name: String,
    /// What it may do.
    pub role: AdminRole,
    /// When it was issued, ms since the Unix epoch.
    pub issued_ms: i64,
    /// Its `notAfter`, ms since the Unix epoch.
    pub expires_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<i64>,
    /// Who revoked it (`admin:<cn>`, or `renewed:<serial>` when replaced by
    /// a renewal).
    pub revoked_by: Option<String>,
}

impl AdminCert {
    /// Whether the admin port accepts it at `now_ms` for an admin called `name`.
    pub fn valid_for(&self, name: &str, now_ms: i64) -> bool {
        self.name == name && self.revoked_ms.is_none() && now_ms < self.expires_ms
    }
}

fn role_of(s: &str) -> Result<AdminRole, StoreError> {
    AdminRole::parse(s).ok_or(StoreError::Unreachable("unknown admin role in database"))
}

const ADMIN_CERT_COLS: &str =
    "serial, name, role, issued_ms, expires_ms, revoked_ms, revoked_by FROM admin_certs";

fn admin_cert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(AdminCert, String)> {
    Ok((
        AdminCert {
            serial: r.get(0)?,
            name: r.get(1)?,
            role: AdminRole::Admin,
            issued_ms: r.get(3)?,
            expires_ms: r.get(4)?,
            revoked_ms: r.get(5)?,
            revoked_by: r.get(6)?,
        },
        r.get(2)?,
    ))
}

fn finish((mut c, role): (AdminCert, String)) -> Result<AdminCert, StoreError> {
    c.role = role_of(&role)?;
    Ok(c)
}

/// Inserts an admin certificate row (in the caller's transaction).
pub(super) fn insert_admin_cert(
    tx: &rusqlite::Transaction<'_>,
    name: &str,
    serial: &str,
    role: AdminRole,
    expires_ms: i64,
) -> Result<(), StoreError> {
    let n = tx.execute(
        "INSERT INTO admin_certs (serial, name, role, issued_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (serial) DO NOTHING",
        params![serial, name, role.as_str(), now_ms(), expires_ms],
    )?;
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "an admin certificate with serial {serial} exists"
        )));
    }
    Ok(())
}

fn admin_cert_in(
    conn: &rusqlite::Connection,
    serial: &str,
) -> Result<Option<AdminCert>, StoreError> {
    conn.query_row(
        &format!("SELECT {ADMIN_CERT_COLS} WHERE serial = ?1"),
        [serial],
        admin_cert_row,
    )
    .optional()?
    .map(finish)
    .transpose()
}

/// Checks a token's hash and lifetime: 1 ms ..= [`MAX_TOKEN_TTL_MS`].
fn check_token(token_sha256: &str, ttl_ms: i64) -> Result<(), StoreError> {
    check_hex("token hash", token_sha256, 64)?;
    if (1..=MAX_TOKEN_TTL_MS).contains(&ttl_ms) {
        Ok(())
    } else {
        Err(StoreError::Invalid {
            what: "token lifetime",
            why: format!("must be positive and at most {MAX_TOKEN_TTL_MS} ms (366 days)"),
        })
    }
}

impl Store {
    /// Records an admin certificate issued outside a token (`admin-cert`),
    /// audited `admin.cert.issue` as `actor`.
    pub fn add_admin_cert(
        &self,
        name: &str,
        serial: &str,
        role: AdminRole,
        expires_ms: i64,
        actor: &str,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            insert_admin_cert(tx, name, serial, role, expires_ms)?;
            let ev = AuditEvent::new(
                "admin.cert.issue",
                actor,
                serde_json::json!({ "name": name, "serial": serial, "role": role, "expires_ms": expires_ms }),
            );
            Ok(((), Some(ev)))
        })
    }

    /// The admin certificate with this serial, if the appliance issued it.
    pub fn admin_cert(&self, serial: &str) -> Result<Option<AdminCert>, StoreError> {
        let conn = self.read()?;
        admin_cert_in(&conn, serial)
    }

    /// Every admin certificate, oldest first.
    pub fn admin_certs(&self) -> Result<Vec<AdminCert>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {ADMIN_CERT_COLS} ORDER BY issued_ms, serial"
        ))?;
        let rows = stmt.query_map([], admin_cert_row)?;
        rows.map(|r| finish(r?)).collect()
    }

    /// Revokes the admin certificate `serial` (audited `admin.cert.revoke`).
    /// Refuses (conflict) to revoke the last valid certificate with the
    /// `admin` role, which would leave no one able to administer the
    /// appliance. Revoking a revoked certificate changes nothing.
    pub fn revoke_admin_cert(&self, serial: &str, actor: &str) -> Result<AdminCert, StoreError> {
        self.write(|tx| {
            let Some(c) = admin_cert_in(tx, serial)? else {
                return Err(StoreError::NotFound { what: "admin certificate", key: serial.into() });
            };
            if c.revoked_ms.is_some() {
                return Ok((c, None));
            }
            let now = now_ms();
            if c.role == AdminRole::Admin && now < c.expires_ms {
                let others: i64 = tx.query_row(
                    "SELECT count(*) FROM admin_certs WHERE role = 'admin' AND revoked_ms IS NULL
                     AND expires_ms > ?1 AND serial != ?2",
                    params![now, serial],
                    |r| r.get(0),
                )?;
                if others == 0 {
                    return Err(StoreError::Conflict(format!(
                        "admin certificate {serial} is the last valid one with role admin; enrol another admin first"
                    )));
                }
            }
            tx.execute(
                "UPDATE admin_certs SET revoked_ms = ?2, revoked_by = ?3 WHERE serial = ?1",
                params![serial, now, actor],
            )?;
            let c = admin_cert_in(tx, serial)?.ok_or(StoreError::Unreachable("admin cert vanished"))?;
            let ev = AuditEvent::new(
                "admin.cert.revoke",
                actor,
                serde_json::json!({ "name": c.name, "serial": serial, "role": c.role }),
            );
            Ok((c, Some(ev)))
        })
    }

    /// Replaces the valid admin certificate `old` by `new` (same name and
    /// role, `new_expires_ms`): `new` is recorded, `old` revoked by
    /// `renewed:<new>`, audited `admin.cert.renew` as `actor`.
    pub fn renew_admin_cert(
        &self,
        old: &str,
        new: &str,
        new_expires_ms: i64,
        actor: &str,
    ) -> Result<AdminCert, StoreError> {
        self.write(|tx| {
            let Some(c) = admin_cert_in(tx, old)?.filter(|c| c.revoked_ms.is_none()) else {
                return Err(StoreError::Conflict(format!(
                    "admin certificate {old} is unknown or revoked"
                )));
            };
            insert_admin_cert(tx, &c.name, new, c.role, new_expires_ms)?;
            tx.execute(
                "UPDATE admin_certs SET revoked_ms = ?2, revoked_by = ?3 WHERE serial = ?1",
                params![old, now_ms(), format!("renewed:{new}")],
            )?;
            let n = admin_cert_in(tx, new)?.ok_or(StoreError::Unreachable("admin cert vanished"))?;
            let ev = AuditEvent::new(
                "admin.cert.renew",
                actor,
                serde_json::json!({ "name": c.name, "serial": new, "previous": old, "role": c.role, "expires_ms": new_expires_ms }),
            );
            Ok((n, Some(ev)))
        })
    }

    // ---- hosts ----

    /// Registers `host` in `group` as pending with the SHA-256 of its
    /// one-time enrolment token, valid for `ttl_ms` (1 ms ..= 366 days).
    /// Returns the token's expiry (ms since the Unix epoch).
    pub fn add_pending_host_ttl(
        &self,
        host: &str,
        group: &str,
        token_sha256: &str,
        ttl_ms: i64,
        actor: &str,
    ) -> Result<i64, StoreError> {
        check_token(token_sha256, ttl_ms)?;
        self.write(|tx| {
            let now = now_ms();
            let expires = now.saturating_add(ttl_ms);
            let n = tx.execute(
                "INSERT INTO hosts (name, host_group, state, token_sha256, token_expires_ms, changed_ms)
                 VALUES (?1, ?2, 'pending', ?3, ?4, ?5) ON CONFLICT (name) DO NOTHING",
                params![host, group, token_sha256, expires, now],
            )?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("host `{host}` already exists")));
            }
            // The engine learns the host; no verdict changes (the host has
            // none yet), so hosts keep their caches.
            touch_data(tx)?;
            let ev = AuditEvent::new(
                "host.add",
                actor,
                serde_json::json!({ "host": host, "group": group, "token_expires_ms": expires }),
            );
            Ok((expires, Some(ev)))
        })
    }

    /// Gives a pending or revoked host a new one-time enrolment token valid
    /// for `ttl_ms` (the host is pending afterwards; its old certificates
    /// stay refused). An enrolled host is a conflict: revoke it first.
    /// Returns the token's expiry.
    pub fn retoken_host(
        &self,
        host: &str,
        token_sha256: &str,
        ttl_ms: i64,
        actor: &str,
    ) -> Result<i64, StoreError> {
        check_token(token_sha256, ttl_ms)?;
        self.write(|tx| {
            let state: Option<String> = tx
                .query_row("SELECT state FROM hosts WHERE name = ?1", [host], |r| {
                    r.get(0)
                })
                .optional()?;
            match state.as_deref() {
                None => {
                    return Err(StoreError::NotFound {
                        what: "host",
                        key: host.into(),
                    })
                }
                Some("enrolled") => {
                    return Err(StoreError::Conflict(format!(
                        "host `{host}` is enrolled; revoke it before giving it a new token"
                    )))
                }
                Some(_) => {}
            }
            let now = now_ms();
            let expires = now.saturating_add(ttl_ms);
            tx.execute(
                "UPDATE hosts SET state = 'pending', token_sha256 = ?2, token_expires_ms = ?3,
                 cert_serial = NULL, prev_serial = NULL, changed_ms = ?4 WHERE name = ?1",
                params![host, token_sha256, expires, now],
            )?;
            touch_data(tx)?;
            let ev = AuditEvent::new(
                "host.token",
                actor,
                serde_json::json!({ "host": host, "token_expires_ms": expires }),
            );
            Ok((expires, Some(ev)))
        })
    }

    /// The pending enrolment of `host`: its token hash and expiry (`None`:
    /// no expiry, a row from before schema 10 that the migration missed).
    pub fn pending_token(&self, host: &str) -> Result<Option<(String, Option<i64>)>, StoreError> {
        let conn = self.read()?;
        Ok(conn
            .query_row(
                "SELECT token_sha256, token_expires_ms FROM hosts
                 WHERE name = ?1 AND state = 'pending' AND token_sha256 IS NOT NULL",
                [host],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Records the renewal of `host`'s certificate `old` (its current or
    /// previous one) by `new`; the current one becomes the previous one,
    /// which stays valid until the next renewal or a revocation, so an agent
    /// that lost the reply can still connect. Audited `host.renew`.
    /// Returns the serials the host may use from now on.
    pub fn renew_host_cert(
        &self,
        host: &str,
        old: &str,
        new: &str,
    ) -> Result<Vec<String>, StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE hosts SET prev_serial = CASE WHEN cert_serial = ?2 THEN cert_serial ELSE prev_serial END,
                 cert_serial = ?3, changed_ms = ?4
                 WHERE name = ?1 AND state = 'enrolled' AND (cert_serial = ?2 OR prev_serial = ?2)",
                params![host, old, new, now_ms()],
            )?;
            if n == 0 {
                return Err(StoreError::Conflict(format!(
                    "host `{host}` is not enrolled with certificate {old}"
                )));
            }
            let ev = AuditEvent::new(
                "host.renew",
                host,
                serde_json::json!({ "host": host, "cert_serial": new, "previous": old }),
            );
            Ok((vec![new.to_owned(), old.to_owned()], Some(ev)))
        })
    }
}
