//! Versioned schema migrations, tracked in `PRAGMA user_version`.
//!
//! Each entry of [`MIGRATIONS`] moves the schema from version `i` to `i + 1`
//! and runs in its own transaction; a migration is never edited once
//! released, only new ones are appended.

use rusqlite::Connection;

use super::StoreError;

/// The migrations, in order. Index `i` upgrades from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    r#"
CREATE TABLE signatures (
    sha256   TEXT PRIMARY KEY CHECK (length(sha256) = 64),
    sha1     TEXT CHECK (sha1 IS NULL OR length(sha1) = 40),
    size     INTEGER NOT NULL CHECK (size >= 0),
    name     TEXT NOT NULL,
    source   TEXT NOT NULL,
    added_ms INTEGER NOT NULL
);
CREATE INDEX signatures_sha1 ON signatures (sha1);
CREATE TABLE ref_groups (
    name        TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE ref_group_members (
    group_name TEXT NOT NULL REFERENCES ref_groups (name) ON DELETE CASCADE,
    sha256     TEXT NOT NULL REFERENCES signatures (sha256) ON DELETE CASCADE,
    PRIMARY KEY (group_name, sha256)
);
CREATE INDEX ref_group_members_sha ON ref_group_members (sha256);
CREATE TABLE policy_versions (
    id         INTEGER PRIMARY KEY,
    text       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('draft', 'active', 'retired')),
    created_ms INTEGER NOT NULL,
    comment    TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX policy_one_active ON policy_versions (state) WHERE state = 'active';
CREATE TABLE governing (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    active     INTEGER REFERENCES policy_versions (id),
    previous   INTEGER REFERENCES policy_versions (id),
    generation INTEGER NOT NULL
);
INSERT INTO governing (id, active, previous, generation) VALUES (1, NULL, NULL, 0);
CREATE TABLE host_groups (
    name TEXT PRIMARY KEY,
    mode TEXT NOT NULL CHECK (mode IN ('enforce', 'permissive', 'disabled'))
);
CREATE TABLE hosts (
    name         TEXT PRIMARY KEY,
    host_group   TEXT NOT NULL REFERENCES host_groups (name),
    state        TEXT NOT NULL CHECK (state IN ('pending', 'enrolled', 'revoked')),
    token_sha256 TEXT,
    cert_serial  TEXT,
    changed_ms   INTEGER NOT NULL
);
CREATE TABLE channels (
    id        INTEGER PRIMARY KEY,
    key_id    TEXT NOT NULL UNIQUE,
    src_host  TEXT NOT NULL,
    dst_host  TEXT NOT NULL,
    tuple     TEXT NOT NULL,
    opened_ms INTEGER NOT NULL,
    closed_ms INTEGER
);
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"#,
    // 2: users and their roles (Cedar `User in [Role]`)
    r#"
CREATE TABLE users (
    name       TEXT PRIMARY KEY,
    changed_ms INTEGER NOT NULL
);
CREATE TABLE user_roles (
    user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    role      TEXT NOT NULL,
    PRIMARY KEY (user_name, role)
);
"#,
    // 3: audit records delivered by agents, for idempotent Report
    r#"
CREATE TABLE agent_reports (
    host        TEXT NOT NULL,
    report_id   TEXT NOT NULL,
    host_at_ms  INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (host, report_id)
);
"#,
    // 4: licenses (per-host or per-program-pair limits; `calls` is reserved
    // ahead of use so a restart never hands out calls twice)
    r#"
CREATE TABLE licenses (
    id             INTEGER PRIMARY KEY,
    subject        TEXT NOT NULL UNIQUE,
    kind           TEXT NOT NULL CHECK (kind IN ('host', 'pair')),
    host           TEXT,
    client_sha256  TEXT,
    server_sha256  TEXT,
    max_calls      INTEGER CHECK (max_calls IS NULL OR max_calls >= 0),
    not_before_ms  INTEGER,
    not_after_ms   INTEGER,
    max_per_minute INTEGER CHECK (max_per_minute IS NULL OR max_per_minute >= 0),
    calls          INTEGER NOT NULL DEFAULT 0 CHECK (calls >= 0),
    state          TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'exceeded')),
    reason         TEXT,
    changed_ms     INTEGER NOT NULL
);
"#,
    // 5: one-time admin enrolment tokens (`trustbind-appliance admin-token`;
    // only the SHA-256 of the token is stored)
    r#"
CREATE TABLE admin_tokens (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    token_sha256 TEXT NOT NULL CHECK (length(token_sha256) = 64),
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'used', 'superseded')),
    used_ms      INTEGER,
    cert_serial  TEXT
);
CREATE INDEX admin_tokens_state ON admin_tokens (state);
"#,
    // 6: channel close records, per end (`closed_ms` is the first end's)
    r#"
ALTER TABLE channels ADD COLUMN connect_closed_ms INTEGER;
ALTER TABLE channels ADD COLUMN connect_bytes_sent INTEGER;
ALTER TABLE channels ADD COLUMN connect_bytes_received INTEGER;
ALTER TABLE channels ADD COLUMN connect_duration_ms INTEGER;
ALTER TABLE channels ADD COLUMN connect_reason TEXT;
ALTER TABLE channels ADD COLUMN accept_closed_ms INTEGER;
ALTER TABLE channels ADD COLUMN accept_bytes_sent INTEGER;
ALTER TABLE channels ADD COLUMN accept_bytes_received INTEGER;
ALTER TABLE channels ADD COLUMN accept_duration_ms INTEGER;
ALTER TABLE channels ADD COLUMN accept_reason TEXT;
CREATE INDEX channels_open ON channels (closed_ms);
"#,
    // 7: group memberships as a WITHOUT ROWID table: the primary key is
    // the table, one B-tree less per member (an NSRL import puts tens of
    // millions of signatures in one group; docs/BENCHMARKS.md)
    r#"
CREATE TABLE ref_group_members_v7 (
    group_name TEXT NOT NULL REFERENCES ref_groups (name) ON DELETE CASCADE,
    sha256     TEXT NOT NULL REFERENCES signatures (sha256) ON DELETE CASCADE,
    PRIMARY KEY (group_name, sha256)
) WITHOUT ROWID;
INSERT INTO ref_group_members_v7 (group_name, sha256)
    SELECT group_name, sha256 FROM ref_group_members;
DROP TABLE ref_group_members;
ALTER TABLE ref_group_members_v7 RENAME TO ref_group_members;
CREATE INDEX ref_group_members_sha ON ref_group_members (sha256);
"#,
    // 8: the index behind the audit cursor by time (`audit tail`,
    // `audit export --since`)
    r#"
CREATE INDEX audit_at_ms ON audit (at_ms);
"#,
    // 9: what the engine's snapshot is read at besides the verdict
    // generation (`data_version`: policy, hosts, host groups, users;
    // `members_version`: reference-group memberships), so that a change no
    // host's cached verdict depends on refreshes the engine without moving
    // the generation
    r#"
ALTER TABLE governing ADD COLUMN data_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE governing ADD COLUMN members_version INTEGER NOT NULL DEFAULT 0;
"#,
    // 10: admin and host identity (issue 16 item 6): every admin
    // certificate the appliance accepts, with its role and revocation
    // (admins enrolled with a token before this version are carried over as
    // `admin`; certificates made by `admin-cert` before it are not known and
    // are refused: make new ones); the role an admin token grants; host
    // enrolment tokens expire (pending ones get 24 h from the upgrade); a
    // renewed host certificate keeps its predecessor valid until the next
    // renewal or revocation
    r#"
CREATE TABLE admin_certs (
    serial     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('admin', 'read-only')),
    issued_ms  INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    revoked_by TEXT
);
CREATE INDEX admin_certs_name ON admin_certs (name);
INSERT OR IGNORE INTO admin_certs (serial, name, role, issued_ms, expires_ms)
    SELECT cert_serial, name, 'admin', COALESCE(used_ms, created_ms),
           COALESCE(used_ms, created_ms) + 63244800000
    FROM admin_tokens WHERE state = 'used' AND cert_serial IS NOT NULL;
ALTER TABLE admin_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin'
    CHECK (role IN ('admin', 'read-only'));
ALTER TABLE hosts ADD COLUMN token_expires_ms INTEGER;
ALTER TABLE hosts ADD COLUMN prev_serial TEXT;
UPDATE hosts SET token_expires_ms = CAST(strftime('%s', 'now') AS INTEGER) * 1000 + 86400000
    WHERE state = 'pending';
"#,
    // 11: protected file sets (issue 17): named lists of absolute paths,
    // the policy entities `FileSet::"<name>"` (`crate::files`); a change
    // moves the data version and the generation like a host group's mode
    r#"
CREATE TABLE file_sets (
    name       TEXT PRIMARY KEY,
    changed_ms INTEGER NOT NULL
);
CREATE TABLE file_set_paths (
    set_name TEXT NOT NULL REFERENCES file_sets (name) ON DELETE CASCADE,
    path     TEXT NOT NULL,
    PRIMARY KEY (set_name, path)
);
"#,
    // 12: retention (issue 16 item 4): a signed checkpoint for each pruned
    // prefix of the audit chain (rows `from_seq..=upto_seq`, chaining from
    // `from_prev_hash` to `upto_hash`, exported to `export_file` before
    // they were deleted); the indexes retention reads agent reports and
    // channels by
    r#"
CREATE TABLE audit_checkpoints (
    id             INTEGER PRIMARY KEY,
    from_seq       INTEGER NOT NULL,
    from_prev_hash TEXT NOT NULL,
    upto_seq       INTEGER NOT NULL,
    upto_hash      TEXT NOT NULL,
    rows           INTEGER NOT NULL,
    total_rows     INTEGER NOT NULL,
    first_at_ms    INTEGER NOT NULL,
    last_at_ms     INTEGER NOT NULL,
    made_ms        INTEGER NOT NULL,
    export_file    TEXT NOT NULL,
    signature      TEXT NOT NULL,
    signer_pem     TEXT NOT NULL
);
CREATE INDEX agent_reports_received ON agent_reports (received_ms);
"#,
    // 13: learning mode (issue 18): the programs hosts ran, from exec
    // decisions (every one of a permissive host, the refusals of an
    // enforcing one), per host, program and path; bounded per host and in
    // all (`store/observed.rs`), what was left out counted per host
    r#"
CREATE TABLE observed (
    id             INTEGER PRIMARY KEY,
    host           TEXT NOT NULL,
    sha256         TEXT NOT NULL CHECK (length(sha256) = 64),
    path           TEXT NOT NULL,
    sha1           TEXT,
    size           INTEGER NOT NULL,
    package        TEXT,
    users          TEXT NOT NULL,
    users_more     INTEGER NOT NULL DEFAULT 0,
    first_ms       INTEGER NOT NULL,
    last_ms        INTEGER NOT NULL,
    count          INTEGER NOT NULL,
    verdict        TEXT NOT NULL CHECK (verdict IN ('allowed', 'would_deny', 'denied')),
    mode           TEXT NOT NULL CHECK (mode IN ('enforce', 'permissive')),
    approved_group TEXT,
    approved_ms    INTEGER,
    approved_by    TEXT,
    UNIQUE (host, sha256, path)
);
CREATE INDEX observed_sha256 ON observed (sha256);
CREATE TABLE observed_hosts (
    host        TEXT PRIMARY KEY,
    programs    INTEGER NOT NULL DEFAULT 0,
    left_out    INTEGER NOT NULL DEFAULT 0,
    left_out_ms INTEGER
);
"#,
    // 14: channel binding (issue 15 item 1, T-68): the addresses an
    // administrator assigned to a host; an address belongs to one host at
    // most (`store/addresses.rs`, `crate::hostaddr`)
    r#"
CREATE TABLE host_addresses (
    addr       TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    added_ms   INTEGER NOT NULL,
    added_by   TEXT NOT NULL
);
CREATE INDEX host_addresses_host ON host_addresses (host);
"#,
];

/// Newest schema version this build understands.
pub fn latest() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// Brings `conn` to [`latest`], one transaction per step.
pub fn migrate(conn: &mut Connection) -> Result<u32, StoreError> {
    let found: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let supported = latest();
    if found > supported {
        return Err(StoreError::TooNew { found, supported });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let next = u32::try_from(i + 1).map_err(|_| StoreError::Unreachable("migration count"))?;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", next)?;
        tx.commit()?;
    }
    Ok(supported)
}
