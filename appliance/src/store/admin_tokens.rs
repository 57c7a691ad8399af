//! One-time admin enrolment tokens (`trustbind-appliance admin-token`,
//! `Enrolment.EnrolAdmin`). Only the SHA-256 of a token is stored; at most
//! one token is pending at a time (a new one supersedes the earlier unused
//! ones) and a token is used at most once.

use rusqlite::{params, OptionalExtension};

use super::identity::{insert_admin_cert, AdminRole};
use super::{check_hex, now_ms, AuditEvent, Store, StoreError};

/// A pending admin enrolment token (its hash, never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// Row id.
    pub id: i64,
    /// The admin name the certificate will carry (CN).
    pub name: String,
    /// SHA-256 of the token, lower-case hex.
    pub token_sha256: String,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_ms: i64,
    /// The role the certificate will have.
    pub role: AdminRole,
}

impl Store {
    /// Records a new pending admin token for `name` valid for `ttl_ms`,
    /// superseding every earlier unused one, audited as `actor`. With
    /// `only_if_unenrolled`, does nothing and returns `None` if an admin has
    /// ever enrolled with a token (checked in the same transaction).
    pub fn create_admin_token(
        &self,
        name: &str,
        token_sha256: &str,
        ttl_ms: i64,
        only_if_unenrolled: bool,
        actor: &str,
    ) -> Result<Option<AdminToken>, StoreError> {
        self.create_admin_token_as(
            name,
            AdminRole::Admin,
            token_sha256,
            ttl_ms,
            only_if_unenrolled,
            actor,
        )
    }

    /// [`Store::create_admin_token`] for a certificate with `role`.
    pub fn create_admin_token_as(
        &self,
        name: &str,
        role: AdminRole,
        token_sha256: &str,
        ttl_ms: i64,
        only_if_unenrolled: bool,
        actor: &str,
    ) -> Result<Option<AdminToken>, StoreError> {
        check_hex("token hash", token_sha256, 64)?;
        if ttl_ms <= 0 {
            return Err(StoreError::Invalid {
                what: "token lifetime",
                why: "must be positive".into(),
            });
        }
        self.write(|tx| {
            if only_if_unenrolled && enrolled(tx)? {
                return Ok((None, None));
            }
            let superseded = tx.execute(
                "UPDATE admin_tokens SET state = 'superseded' WHERE state = 'pending'",
                [],
            )?;
            let now = now_ms();
            let expires_ms = now.saturating_add(ttl_ms);
            tx.execute(
                "INSERT INTO admin_tokens (name, token_sha256, created_ms, expires_ms, state, role)
                 VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
                params![name, token_sha256, now, expires_ms, role.as_str()],
            )?;
            let t = AdminToken {
                id: tx.last_insert_rowid(),
                name: name.to_owned(),
                token_sha256: token_sha256.to_owned(),
                expires_ms,
                role,
            };
            let ev = AuditEvent::new(
                "admin.token.create",
                actor,
                serde_json::json!({ "name": name, "role": role, "expires_ms": expires_ms, "superseded": superseded }),
            );
            Ok((Some(t), Some(ev)))
        })
    }

    /// Whether an admin has ever enrolled with a token.
    pub fn admin_ever_enrolled(&self) -> Result<bool, StoreError> {
        let conn = self.read()?;
        enrolled(&conn)
    }

    /// State (`pending`, `used`, `superseded`) of the newest admin token
    /// with this hash, if any: to tell a reused token from a wrong one.
    pub fn admin_token_state(&self, token_sha256: &str) -> Result<Option<String>, StoreError> {
        let conn = self.read()?;
        Ok(conn
            .query_row(
                "SELECT state FROM admin_tokens WHERE token_sha256 = ?1 ORDER BY id DESC LIMIT 1",
                [token_sha256],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The pending admin token, if any (it may have expired).
    pub fn pending_admin_token(&self) -> Result<Option<AdminToken>, StoreError> {
        let conn = self.read()?;
        conn.query_row(
            "SELECT id, name, token_sha256, expires_ms, role FROM admin_tokens
                 WHERE state = 'pending' ORDER BY id DESC LIMIT 1",
            [],
            |r| {
                Ok((
                    AdminToken {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        token_sha256: r.get(2)?,
                        expires_ms: r.get(3)?,
                        role: AdminRole::Admin,
                    },
                    r.get::<_, String>(4)?,
                ))
            },
        )
        .optional()?
        .map(|(mut t, role)| {
            t.role = AdminRole::parse(&role)
                .ok_or(StoreError::Unreachable("unknown admin role in database"))?;
            Ok::<_, StoreError>(t)
        })
        .transpose()
    }

    /// Marks the pending token `id` used by the certificate `cert_serial`
    /// (valid until `cert_expires_ms`) issued to `name` from `remote`, and
    /// records the certificate with the token's role, with its audit row. Fails with
    /// [`StoreError::Conflict`] if the token is no longer pending (used or
    /// superseded meanwhile): a token buys one certificate at most.
    pub fn use_admin_token(
        &self,
        id: i64,
        name: &str,
        cert_serial: &str,
        cert_expires_ms: i64,
        remote: &str,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let role: Option<String> = tx
                .query_row(
                    "SELECT role FROM admin_tokens WHERE id = ?1 AND state = 'pending'",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            let n = tx.execute(
                "UPDATE admin_tokens SET state = 'used', used_ms = ?2, cert_serial = ?3
                 WHERE id = ?1 AND state = 'pending'",
                params![id, now_ms(), cert_serial],
            )?;
            let role = role.as_deref().and_then(AdminRole::parse);
            let (1, Some(role)) = (n, role) else {
                return Err(StoreError::Conflict(
                    "the admin enrolment token was already used or replaced".into(),
                ));
            };
            insert_admin_cert(tx, name, cert_serial, role, cert_expires_ms)?;
            let ev = AuditEvent::new(
                "admin.enrol",
                &format!("enrol:{remote}"),
                serde_json::json!({ "name": name, "role": role, "cert_serial": cert_serial, "remote": remote }),
            );
            Ok(((), Some(ev)))
        })
    }
}

fn enrolled(conn: &rusqlite::Connection) -> Result<bool, StoreError> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM admin_tokens WHERE state = 'used')",
        [],
        |r| r.get(0),
    )?)
}
