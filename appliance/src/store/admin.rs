//! Store methods used by the admin API: listings with keyset pagination,
//! batch changes and removals. Kept apart from `mod.rs` so that the admin
//! API's needs do not tangle with the decision path. Every change is
//! audited in its own transaction through `Store::write`, and every change
//! that can alter a verdict moves the verdict generation in it.

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    bump_data, bump_generation, check_hex, hex, now_ms, AuditEvent, HostState, Mode, PolicyState,
    Publish, Signature, Store, StoreError,
};

/// A policy version without its text, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// Row id.
    pub id: i64,
    /// SHA-256 of the text (the ruleset identity).
    pub sha256: String,
    /// Lifecycle state.
    pub state: PolicyState,
    /// Upload time, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// Comment given at upload.
    pub comment: String,
}

/// Counts of a batch signature upload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureBatch {
    /// New signatures stored.
    pub inserted: u64,
    /// Known signatures whose fields changed.
    pub updated: u64,
    /// Known signatures sent again unchanged.
    pub unchanged: u64,
    /// Signatures newly put into the requested group.
    pub added_to_group: u64,
}

/// A reference group with its member count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Number of member signatures.
    pub members: u64,
}

/// A host group with its mode and host count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostGroupInfo {
    /// Group name.
    pub name: String,
    /// Mode of the group.
    pub mode: Mode,
    /// Number of hosts in it (any state).
    pub hosts: u64,
}

/// A user with its roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// User name as the agent reports it.
    pub name: String,
    /// Roles, sorted.
    pub roles: Vec<String>,
}

/// A role with the number of users holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleInfo {
    /// Role name.
    pub name: String,
    /// Number of users with the role.
    pub users: u64,
}

/// A host as listed by the admin API (never its token hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host name (certificate CN).
    pub name: String,
    /// Host group.
    pub host_group: String,
    /// Enrolment state.
    pub state: HostState,
    /// Serial of the certificate issued at enrolment.
    pub cert_serial: Option<String>,
    /// Last state change, milliseconds since the Unix epoch.
    pub changed_ms: i64,
    /// Addresses an administrator assigned to it (channel binding: what
    /// it may name as its own end besides the address it connects from).
    #[serde(default)]
    pub addresses: Vec<String>,
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// What a license applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LicenseKey {
    /// Every call qualified for one host.
    Host {
        /// Host name.
        host: String,
    },
    /// Every connection from one program to another (lower-case hex SHA-256s).
    Pair {
        /// Program on the connecting side.
        client: String,
        /// Program on the accepting side.
        server: String,
    },
}

impl LicenseKey {
    /// Unique text form: `host:<name>` or `pair:<client>:<server>`.
    pub fn subject_id(&self) -> String {
        match self {
            Self::Host { host } => format!("host:{host}"),
            Self::Pair { client, server } => format!("pair:{client}:{server}"),
        }
    }
}

impl std::fmt::Display for LicenseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Host { host } => write!(f, "host `{host}`"),
            Self::Pair { client, server } => write!(
                f,
                "program pair {}.. -> {}..",
                client.get(..12).unwrap_or(client),
                server.get(..12).unwrap_or(server)
            ),
        }
    }
}

/// The limits of a license; absent fields do not limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseTerms {
    /// Calls allowed in total; the next one exceeds the license.
    #[serde(default)]
    pub max_calls: Option<u64>,
    /// No call is allowed before this time (ms since the epoch); not an excess.
    #[serde(default)]
    pub not_before_ms: Option<i64>,
    /// A call at or after this time (ms since the epoch) exceeds the license.
    #[serde(default)]
    pub not_after_ms: Option<i64>,
    /// Calls allowed in any 60-second window.
    #[serde(default)]
    pub max_per_minute: Option<u32>,
}

/// A stored license.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenseRow {
    /// Row id.
    pub id: i64,
    /// What it applies to.
    pub subject: LicenseKey,
    /// Its limits.
    pub terms: LicenseTerms,
    /// Calls reserved so far (at least the calls made).
    pub calls_reserved: u64,
    /// Why it was exceeded; `None` while active.
    pub exceeded: Option<String>,
    /// Last change, ms since the epoch.
    pub changed_ms: i64,
}

const LICENSE_COLS: &str = "id, kind, host, client_sha256, server_sha256, max_calls, not_before_ms, not_after_ms, max_per_minute, calls, state, reason, changed_ms";

fn license_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<LicenseRow, StoreError>> {
    let kind: String = r.get(1)?;
    let subject = match kind.as_str() {
        "host" => LicenseKey::Host {
            host: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
        },
        "pair" => LicenseKey::Pair {
            client: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
            server: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
        },
        _ => {
            return Ok(Err(StoreError::Unreachable(
                "unknown license kind in database",
            )))
        }
    };
    let state: String = r.get(10)?;
    let reason: Option<String> = r.get(11)?;
    Ok(Ok(LicenseRow {
        id: r.get(0)?,
        subject,
        terms: LicenseTerms {
            max_calls: r.get::<_, Option<i64>>(5)?.map(to_u64),
            not_before_ms: r.get(6)?,
            not_after_ms: r.get(7)?,
            max_per_minute: r
                .get::<_, Option<i64>>(8)?
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        },
        calls_reserved: to_u64(r.get(9)?),
        exceeded: (state == "exceeded").then(|| reason.unwrap_or_default()),
        changed_ms: r.get(12)?,
    }))
}

pub(super) fn sig_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Signature> {
    let size: i64 = r.get(2)?;
    Ok(Signature {
        sha256: r.get(0)?,
        sha1: r.get(1)?,
        size: to_u64(size),
        name: r.get(3)?,
        source: r.get(4)?,
    })
}

fn host_state(s: &str) -> Result<HostState, StoreError> {
    match s {
        "pending" => Ok(HostState::Pending),
        "enrolled" => Ok(HostState::Enrolled),
        "revoked" => Ok(HostState::Revoked),
        _ => Err(StoreError::Unreachable("unknown host state in database")),
    }
}

fn mode(s: &str) -> Result<Mode, StoreError> {
    match s {
        "enforce" => Ok(Mode::Enforce),
        "permissive" => Ok(Mode::Permissive),
        "disabled" => Ok(Mode::Disabled),
        _ => Err(StoreError::Unreachable("unknown mode in database")),
    }
}

/// SHA-256 over the sorted, newline-joined hashes: names a batch in the
/// audit log without listing thousands of hashes there.
pub(super) fn batch_digest<'a>(hashes: impl Iterator<Item = &'a str>) -> String {
    let mut v: Vec<&str> = hashes.collect();
    v.sort_unstable();
    let mut h = Sha256::new();
    for s in v {
        h.update(s.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

pub(super) fn group_exists(tx: &rusqlite::Transaction<'_>, group: &str) -> Result<(), StoreError> {
    let g: Option<String> = tx
        .query_row(
            "SELECT name FROM ref_groups WHERE name = ?1",
            [group],
            |r| r.get(0),
        )
        .optional()?;
    if g.is_none() {
        return Err(StoreError::NotFound {
            what: "group",
            key: group.into(),
        });
    }
    Ok(())
}

/// The first audit row at or after a time (`audit_cursor_since`).
pub const AUDIT_SINCE: &str = "SELECT min(seq) FROM audit INDEXED BY audit_at_ms WHERE at_ms >= ?1";

impl Store {
    // ---- policies ----

    /// Every policy version, newest first, without texts.
    pub fn list_policies(&self) -> Result<Vec<PolicyInfo>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare(
            "SELECT id, sha256, state, created_ms, comment FROM policy_versions ORDER BY id DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, sha256, state, created_ms, comment) = row?;
            out.push(PolicyInfo {
                id,
                sha256,
                state: super::parse_state(&state)?,
                created_ms,
                comment,
            });
        }
        Ok(out)
    }

    /// One policy version's metadata.
    pub fn policy_info(&self, id: i64) -> Result<Option<PolicyInfo>, StoreError> {
        Ok(self.list_policies()?.into_iter().find(|p| p.id == id))
    }

    // ---- signatures ----

    /// Stores a batch of signatures idempotently in one transaction, and
    /// puts them into `group` when given. Every entry is checked before
    /// anything is written; the batch is audited as one row carrying the
    /// count and a digest of the hashes. The generation moves only if a
    /// program put into the group has been answered under it.
    pub fn put_signatures(
        &self,
        sigs: &[Signature],
        group: Option<&str>,
        actor: &str,
    ) -> Result<SignatureBatch, StoreError> {
        self.put_signatures_with(sigs, group, actor, Publish::Now)
    }

    /// [`Store::put_signatures`], publishing the membership change to hosts
    /// as `publish` says (`Deferred` for a bulk import).
    pub fn put_signatures_with(
        &self,
        sigs: &[Signature],
        group: Option<&str>,
        actor: &str,
        publish: Publish,
    ) -> Result<SignatureBatch, StoreError> {
        for s in sigs {
            check_hex("sha256", &s.sha256, 64)?;
            if let Some(s1) = &s.sha1 {
                check_hex("sha1", s1, 40)?;
            }
            i64::try_from(s.size).map_err(|_| StoreError::Invalid {
                what: "size",
                why: "too large".into(),
            })?;
        }
        self.write(|tx| {
            let (out, pending) = self.put_signatures_in(tx, sigs, group, publish)?;
            let ev = AuditEvent::new(
                "signature.batch",
                actor,
                serde_json::json!({
                    "count": sigs.len(),
                    "digest": batch_digest(sigs.iter().map(|s| s.sha256.as_str())),
                    "inserted": out.inserted,
                    "updated": out.updated,
                    "group": group,
                    "added_to_group": out.added_to_group,
                }),
            );
            Ok(((out, pending), Some(ev)))
        })
        .map(|(out, _)| out)
    }

    /// The writing half of [`Store::put_signatures_with`] inside `tx`
    /// (checked entries): also what approving observed programs
    /// (`Store::approve_observed`) puts into a group, so both move the
    /// generation alike. The returned guard must live until `tx` has
    /// committed or failed.
    pub(super) fn put_signatures_in(
        &self,
        tx: &rusqlite::Transaction<'_>,
        sigs: &[Signature],
        group: Option<&str>,
        publish: Publish,
    ) -> Result<(SignatureBatch, super::PendingChange<'_>), StoreError> {
        if let Some(g) = group {
            group_exists(tx, g)?;
        }
        let mut out = SignatureBatch::default();
        // New signatures (the bulk of an import) cost one insert; only
        // a known one is read back and compared.
        let mut add = tx.prepare_cached(
            "INSERT INTO signatures (sha256, sha1, size, name, source, added_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (sha256) DO NOTHING",
        )?;
        let mut get = tx.prepare_cached(
            "SELECT sha256, sha1, size, name, source FROM signatures WHERE sha256 = ?1",
        )?;
        let mut put = tx.prepare_cached(
            "UPDATE signatures SET sha1 = ?2, size = ?3, name = ?4, source = ?5 WHERE sha256 = ?1",
        )?;
        let mut member = tx.prepare_cached(
            "INSERT INTO ref_group_members (group_name, sha256) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?;
        let now = now_ms();
        let mut touched = Vec::new();
        for s in sigs {
            let size = i64::try_from(s.size).unwrap_or(i64::MAX);
            if add.execute(params![s.sha256, s.sha1, size, s.name, s.source, now])? == 1 {
                out.inserted += 1;
            } else if get.query_row([&s.sha256], sig_from)? == *s {
                out.unchanged += 1;
            } else {
                put.execute(params![s.sha256, s.sha1, size, s.name, s.source])?;
                out.updated += 1;
            }
            if let Some(g) = group {
                if member.execute(params![g, s.sha256])? > 0 {
                    out.added_to_group += 1;
                    touched.push(s.sha256.clone());
                }
            }
        }
        let pending = self.members_changed(tx, touched, publish)?;
        Ok((out, pending))
    }

    /// Signatures ordered by SHA-256, after the cursor `after` (exclusive),
    /// at most `limit`; only members of `group` when given.
    pub fn list_signatures(
        &self,
        group: Option<&str>,
        after: &str,
        limit: u32,
    ) -> Result<Vec<Signature>, StoreError> {
        let conn = self.read()?;
        let rows = match group {
            None => {
                let mut stmt = conn.prepare_cached(
                    "SELECT sha256, sha1, size, name, source FROM signatures
                     WHERE sha256 > ?1 ORDER BY sha256 LIMIT ?2",
                )?;
                let v = stmt
                    .query_map(params![after, limit], sig_from)?
                    .collect::<Result<Vec<_>, _>>()?;
                v
            }
            Some(g) => {
                let mut stmt = conn.prepare_cached(
                    "SELECT s.sha256, s.sha1, s.size, s.name, s.source
                     FROM ref_group_members m JOIN signatures s ON s.sha256 = m.sha256
                     WHERE m.group_name = ?1 AND m.sha256 > ?2 ORDER BY m.sha256 LIMIT ?3",
                )?;
                let v = stmt
                    .query_map(params![g, after, limit], sig_from)?
                    .collect::<Result<Vec<_>, _>>()?;
                v
            }
        };
        Ok(rows)
    }

    /// Removes signatures (and their group memberships). Returns the hashes
    /// that were not known; the others are gone when this returns.
    pub fn remove_signatures(
        &self,
        hashes: &[String],
        actor: &str,
    ) -> Result<Vec<String>, StoreError> {
        for h in hashes {
            check_hex("sha256", h, 64)?;
        }
        self.write(|tx| {
            let mut missing = Vec::new();
            let mut gone = Vec::new();
            let mut del = tx.prepare_cached("DELETE FROM signatures WHERE sha256 = ?1")?;
            for h in hashes {
                if del.execute([h])? == 0 {
                    missing.push(h.clone());
                } else {
                    gone.push(h.clone());
                }
            }
            let removed = gone.len();
            let pending = self.members_changed(tx, gone, Publish::Now)?;
            let ev = (removed > 0).then(|| {
                let detail = if removed == 1 {
                    let gone = hashes.iter().find(|h| !missing.contains(h));
                    serde_json::json!({ "count": 1, "sha256": gone })
                } else {
                    serde_json::json!({
                        "count": removed,
                        "digest": batch_digest(
                            hashes.iter().filter(|h| !missing.contains(h)).map(String::as_str)
                        ),
                    })
                };
                AuditEvent::new("signature.remove", actor, detail)
            });
            Ok(((missing, pending), ev))
        })
        .map(|(missing, _)| missing)
    }

    // ---- reference groups ----

    /// Every reference group with its member count, by name.
    pub fn list_groups(&self) -> Result<Vec<GroupInfo>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare(
            "SELECT g.name, g.description, (SELECT count(*) FROM ref_group_members m WHERE m.group_name = g.name)
             FROM ref_groups g ORDER BY g.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(GroupInfo {
                name: r.get(0)?,
                description: r.get(1)?,
                members: to_u64(r.get(2)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// One reference group.
    pub fn group(&self, name: &str) -> Result<Option<GroupInfo>, StoreError> {
        let conn = self.read()?;
        Ok(conn
            .query_row(
                "SELECT g.name, g.description, (SELECT count(*) FROM ref_group_members m WHERE m.group_name = g.name)
                 FROM ref_groups g WHERE g.name = ?1",
                [name],
                |r| {
                    Ok(GroupInfo {
                        name: r.get(0)?,
                        description: r.get(1)?,
                        members: to_u64(r.get(2)?),
                    })
                },
            )
            .optional()?)
    }

    /// Puts known signatures into a group, all or nothing; returns how many
    /// were not members before. An unknown hash fails the whole batch.
    pub fn add_members(
        &self,
        group: &str,
        hashes: &[String],
        actor: &str,
    ) -> Result<u64, StoreError> {
        for h in hashes {
            check_hex("sha256", h, 64)?;
        }
        self.write(|tx| {
            group_exists(tx, group)?;
            let mut known =
                tx.prepare_cached("SELECT 1 FROM signatures WHERE sha256 = ?1")?;
            let mut ins = tx.prepare_cached(
                "INSERT INTO ref_group_members (group_name, sha256) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )?;
            let mut touched = Vec::new();
            for h in hashes {
                if !known.exists([h])? {
                    return Err(StoreError::NotFound {
                        what: "signature",
                        key: h.clone(),
                    });
                }
                if ins.execute(params![group, h])? > 0 {
                    touched.push(h.clone());
                }
            }
            let added = u64::try_from(touched.len()).unwrap_or(u64::MAX);
            let pending = self.members_changed(tx, touched, Publish::Now)?;
            let ev = (added > 0).then(|| {
                AuditEvent::new(
                    "group.add",
                    actor,
                    serde_json::json!({
                        "group": group,
                        "count": added,
                        "digest": batch_digest(hashes.iter().map(String::as_str)),
                    }),
                )
            });
            Ok(((added, pending), ev))
        })
        .map(|(added, _)| added)
    }

    /// Takes signatures out of a group; returns how many were members.
    pub fn remove_members(
        &self,
        group: &str,
        hashes: &[String],
        actor: &str,
    ) -> Result<u64, StoreError> {
        for h in hashes {
            check_hex("sha256", h, 64)?;
        }
        self.write(|tx| {
            group_exists(tx, group)?;
            let mut del = tx.prepare_cached(
                "DELETE FROM ref_group_members WHERE group_name = ?1 AND sha256 = ?2",
            )?;
            let mut touched = Vec::new();
            for h in hashes {
                if del.execute(params![group, h])? > 0 {
                    touched.push(h.clone());
                }
            }
            let removed = u64::try_from(touched.len()).unwrap_or(u64::MAX);
            let pending = self.members_changed(tx, touched, Publish::Now)?;
            let ev = (removed > 0).then(|| {
                AuditEvent::new(
                    "group.remove",
                    actor,
                    serde_json::json!({
                        "group": group,
                        "count": removed,
                        "digest": batch_digest(hashes.iter().map(String::as_str)),
                    }),
                )
            });
            Ok(((removed, pending), ev))
        })
        .map(|(removed, _)| removed)
    }

    /// Deletes a reference group and its memberships (not the signatures);
    /// returns how many memberships went with it.
    pub fn delete_group(&self, name: &str, actor: &str) -> Result<u64, StoreError> {
        self.write(|tx| {
            group_exists(tx, name)?;
            let members = tx.execute(
                "DELETE FROM ref_group_members WHERE group_name = ?1",
                [name],
            )?;
            tx.execute("DELETE FROM ref_groups WHERE name = ?1", [name])?;
            // Rare and possibly huge: move the generation without asking
            // which members were answered.
            bump_generation(tx)?;
            tx.execute(
                "UPDATE governing SET members_version = members_version + 1 WHERE id = 1",
                [],
            )?;
            let ev = AuditEvent::new(
                "group.delete",
                actor,
                serde_json::json!({ "group": name, "members": members }),
            );
            Ok((u64::try_from(members).unwrap_or(0), Some(ev)))
        })
    }

    // ---- host groups and hosts ----

    /// Every host group with its host count, by name.
    pub fn list_host_groups(&self) -> Result<Vec<HostGroupInfo>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare(
            "SELECT g.name, g.mode, (SELECT count(*) FROM hosts h WHERE h.host_group = g.name)
             FROM host_groups g ORDER BY g.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, m, hosts) = row?;
            out.push(HostGroupInfo {
                name,
                mode: mode(&m)?,
                hosts: to_u64(hosts),
            });
        }
        Ok(out)
    }

    /// Deletes an empty host group.
    pub fn delete_host_group(&self, name: &str, actor: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            let hosts: i64 = tx.query_row(
                "SELECT count(*) FROM hosts WHERE host_group = ?1",
                [name],
                |r| r.get(0),
            )?;
            if hosts > 0 {
                return Err(StoreError::Conflict(format!(
                    "host group `{name}` still has {hosts} host(s)"
                )));
            }
            if tx.execute("DELETE FROM host_groups WHERE name = ?1", [name])? == 0 {
                return Err(StoreError::NotFound {
                    what: "host group",
                    key: name.into(),
                });
            }
            let ev = AuditEvent::new(
                "hostgroup.delete",
                actor,
                serde_json::json!({ "group": name }),
            );
            Ok(((), Some(ev)))
        })
    }

    /// Hosts ordered by name after the cursor `after` (exclusive), at most `limit`.
    pub fn list_hosts(&self, after: &str, limit: u32) -> Result<Vec<HostInfo>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare_cached(
            "SELECT name, host_group, state, cert_serial, changed_ms FROM hosts
             WHERE name > ?1 ORDER BY name LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, host_group, state, cert_serial, changed_ms) = row?;
            out.push(HostInfo {
                addresses: super::addresses::addresses_in(&conn, &name)?,
                name,
                host_group,
                state: host_state(&state)?,
                cert_serial,
                changed_ms,
            });
        }
        Ok(out)
    }

    /// One host.
    pub fn host_info(&self, name: &str) -> Result<Option<HostInfo>, StoreError> {
        let hosts = {
            let conn = self.read()?;
            let mut stmt = conn.prepare_cached(
                "SELECT name, host_group, state, cert_serial, changed_ms FROM hosts WHERE name = ?1",
            )?;
            stmt.query_row([name], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .optional()?
        };
        let addresses = self.host_addresses(name)?;
        hosts
            .map(|(name, host_group, state, cert_serial, changed_ms)| {
                Ok(HostInfo {
                    addresses,
                    name,
                    host_group,
                    state: host_state(&state)?,
                    cert_serial,
                    changed_ms,
                })
            })
            .transpose()
    }

    // ---- users and roles ----

    /// Users ordered by name after the cursor `after` (exclusive), at most
    /// `limit`, with their roles.
    pub fn list_users(&self, after: &str, limit: u32) -> Result<Vec<UserInfo>, StoreError> {
        let conn = self.read()?;
        let mut stmt =
            conn.prepare_cached("SELECT name FROM users WHERE name > ?1 ORDER BY name LIMIT ?2")?;
        let names = stmt
            .query_map(params![after, limit], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut roles =
            conn.prepare_cached("SELECT role FROM user_roles WHERE user_name = ?1 ORDER BY role")?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let r = roles
                .query_map([&name], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            out.push(UserInfo { name, roles: r });
        }
        Ok(out)
    }

    /// One user with its roles, if it is known.
    pub fn user(&self, name: &str) -> Result<Option<UserInfo>, StoreError> {
        let known = {
            let conn = self.read()?;
            let mut stmt = conn.prepare_cached("SELECT 1 FROM users WHERE name = ?1")?;
            stmt.exists([name])?
        };
        if !known {
            return Ok(None);
        }
        Ok(Some(UserInfo {
            name: name.to_owned(),
            roles: self.user_roles(name)?,
        }))
    }

    /// Forgets a user and its roles. Moves the verdict generation.
    pub fn delete_user(&self, name: &str, actor: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM user_roles WHERE user_name = ?1", [name])?;
            if tx.execute("DELETE FROM users WHERE name = ?1", [name])? == 0 {
                return Err(StoreError::NotFound {
                    what: "user",
                    key: name.into(),
                });
            }
            bump_data(tx)?;
            let ev = AuditEvent::new("user.delete", actor, serde_json::json!({ "user": name }));
            Ok(((), Some(ev)))
        })
    }

    /// Every role held by at least one user, with its user count.
    pub fn list_roles(&self) -> Result<Vec<RoleInfo>, StoreError> {
        let conn = self.read()?;
        let mut stmt =
            conn.prepare("SELECT role, count(*) FROM user_roles GROUP BY role ORDER BY role")?;
        let rows = stmt.query_map([], |r| {
            Ok(RoleInfo {
                name: r.get(0)?,
                users: to_u64(r.get(1)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    // ---- licenses (limits) ----

    /// Every license, by id.
    pub fn licenses(&self) -> Result<Vec<LicenseRow>, StoreError> {
        let conn = self.read()?;
        let mut stmt = conn.prepare(&format!("SELECT {LICENSE_COLS} FROM licenses ORDER BY id"))?;
        let rows = stmt.query_map([], license_from)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    /// Creates or replaces the terms of the license for `subject`. Keeps
    /// its call count and state unless `reset`, which zeroes the count and
    /// makes an exceeded license active again. Audited as `limit.set`.
    pub fn put_license(
        &self,
        subject: &LicenseKey,
        terms: &LicenseTerms,
        reset: bool,
        actor: &str,
    ) -> Result<LicenseRow, StoreError> {
        let (kind, host, client, server) = match subject {
            LicenseKey::Host { host } => ("host", Some(host.as_str()), None, None),
            LicenseKey::Pair { client, server } => {
                check_hex("client sha256", client, 64)?;
                check_hex("server sha256", server, 64)?;
                ("pair", None, Some(client.as_str()), Some(server.as_str()))
            }
        };
        let max_calls = terms
            .max_calls
            .map(|n| {
                i64::try_from(n).map_err(|_| StoreError::Invalid {
                    what: "max_calls",
                    why: "too large".into(),
                })
            })
            .transpose()?;
        let sid = subject.subject_id();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO licenses (subject, kind, host, client_sha256, server_sha256, max_calls,
                   not_before_ms, not_after_ms, max_per_minute, changed_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (subject) DO UPDATE SET max_calls = excluded.max_calls,
                   not_before_ms = excluded.not_before_ms, not_after_ms = excluded.not_after_ms,
                   max_per_minute = excluded.max_per_minute, changed_ms = excluded.changed_ms",
                params![
                    sid,
                    kind,
                    host,
                    client,
                    server,
                    max_calls,
                    terms.not_before_ms,
                    terms.not_after_ms,
                    terms.max_per_minute,
                    now_ms()
                ],
            )?;
            if reset {
                tx.execute(
                    "UPDATE licenses SET calls = 0, state = 'active', reason = NULL WHERE subject = ?1",
                    [&sid],
                )?;
            }
            let row = tx
                .query_row(
                    &format!("SELECT {LICENSE_COLS} FROM licenses WHERE subject = ?1"),
                    [&sid],
                    license_from,
                )??;
            let ev = AuditEvent::new(
                "limit.set",
                actor,
                serde_json::json!({ "id": row.id, "subject": subject, "terms": terms, "reset": reset }),
            );
            Ok((row, Some(ev)))
        })
    }

    /// Removes a license; audited as `limit.remove`.
    pub fn remove_license(&self, id: i64, actor: &str) -> Result<LicenseRow, StoreError> {
        self.write(|tx| {
            let row = tx
                .query_row(
                    &format!("SELECT {LICENSE_COLS} FROM licenses WHERE id = ?1"),
                    [id],
                    license_from,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound {
                    what: "license",
                    key: id.to_string(),
                })??;
            tx.execute("DELETE FROM licenses WHERE id = ?1", [id])?;
            let ev = AuditEvent::new(
                "limit.remove",
                actor,
                serde_json::json!({ "id": id, "subject": row.subject }),
            );
            Ok((row, Some(ev)))
        })
    }

    /// Raises the reserved call count of license `id` to `calls` (never
    /// lowers it). Not audited: a counter, not a change.
    pub fn reserve_license_calls(&self, id: i64, calls: u64) -> Result<(), StoreError> {
        let calls = i64::try_from(calls).unwrap_or(i64::MAX);
        self.write(|tx| {
            tx.execute(
                "UPDATE licenses SET calls = ?2 WHERE id = ?1 AND calls < ?2",
                params![id, calls],
            )?;
            Ok(((), None))
        })
    }

    /// Marks license `id` exceeded for `reason`, audited as `limit.exceeded`
    /// by `appliance`. Returns false if it was exceeded already.
    pub fn license_exceeded(&self, id: i64, reason: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE licenses SET state = 'exceeded', reason = ?2, changed_ms = ?3
                 WHERE id = ?1 AND state = 'active'",
                params![id, reason, now_ms()],
            )?;
            if n == 0 {
                return Ok((false, None));
            }
            let subject: String =
                tx.query_row("SELECT subject FROM licenses WHERE id = ?1", [id], |r| {
                    r.get(0)
                })?;
            bump_generation(tx)?;
            let ev = AuditEvent::new(
                "limit.exceeded",
                "appliance",
                serde_json::json!({ "id": id, "subject": subject, "reason": reason }),
            );
            Ok((true, Some(ev)))
        })
    }

    // ---- audit ----

    /// The `after` cursor that starts at the first row written at or after
    /// `at_ms` (so `audit_rows(cursor, ..)` returns that row first).
    pub fn audit_cursor_since(&self, at_ms: i64) -> Result<i64, StoreError> {
        let conn = self.read()?;
        // Through the time index: the work is the rows since `at_ms`
        // (what the caller reads next), not the rows before it.
        let first: Option<i64> = conn.query_row(AUDIT_SINCE, [at_ms], |r| r.get(0))?;
        match first {
            Some(seq) => Ok(seq.saturating_sub(1)),
            None => self.audit_head_locked(&conn),
        }
    }

    /// Sequence number of the newest audit row (0 when empty).
    pub fn audit_head(&self) -> Result<i64, StoreError> {
        let conn = self.read()?;
        self.audit_head_locked(&conn)
    }

    fn audit_head_locked(&self, conn: &rusqlite::Connection) -> Result<i64, StoreError> {
        let head: Option<i64> = conn
            .query_row("SELECT seq FROM audit_head WHERE id = 1", [], |r| r.get(0))
            .optional()?;
        Ok(head.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_digest_ignores_order() {
        assert_eq!(
            batch_digest(["b", "a"].into_iter()),
            batch_digest(["a", "b"].into_iter())
        );
        assert_ne!(
            batch_digest(["a"].into_iter()),
            batch_digest(["a", "b"].into_iter())
        );
    }
}
