//! Store tests on real SQLite files in temporary directories.

use std::path::PathBuf;

use rusqlite::Connection;
use trustbind_appliance::store::{
    migrate, AgentRecord, AuditEvent, AuditRow, ChainError, HostState, Mode, PolicyState,
    Signature, Store, StoreError,
};

fn fresh() -> (tempfile::TempDir, PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("appliance.db");
    let store = Store::open(&path).unwrap();
    (dir, path, store)
}

fn ev(i: u32) -> AuditEvent {
    AuditEvent {
        kind: "decision".into(),
        actor: format!("host{i}"),
        detail: serde_json::json!({ "n": i }).to_string(),
    }
}

fn sha(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

fn audit_count(store: &Store) -> usize {
    store.audit_rows(0, 1_000_000).unwrap().len()
}

#[test]
fn open_sets_wal_and_latest_schema_and_reopens() {
    let (_d, path, store) = fresh();
    assert_eq!(store.journal_mode().unwrap(), "wal");
    assert_eq!(store.schema_version().unwrap(), migrate::latest());
    store.append_audit(&ev(1)).unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), migrate::latest());
    assert_eq!(store.verify_audit().unwrap(), Ok(1));
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

/// A new store's file has `PAGE_SIZE` pages; a file made before with
/// SQLite's 4 KiB default keeps them (and its rows) when opened.
#[test]
fn a_new_store_has_large_pages_and_an_old_one_keeps_its_own() {
    let page_size = |path: &std::path::Path| -> u32 {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    };
    let (_d, path, store) = fresh();
    store.append_audit(&ev(1)).unwrap();
    drop(store);
    assert_eq!(page_size(&path), trustbind_appliance::store::PAGE_SIZE);

    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.db");
    {
        let c = Connection::open(&old).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
    }
    assert_eq!(page_size(&old), 4096);
    let store = Store::open(&old).unwrap();
    store.append_audit(&ev(2)).unwrap();
    assert!(store.verify_audit().unwrap().is_ok());
    drop(store);
    assert_eq!(page_size(&old), 4096);
}

#[test]
fn newer_schema_is_refused() {
    let (_d, path, store) = fresh();
    drop(store);
    let c = Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", migrate::latest() + 1)
        .unwrap();
    drop(c);
    match Store::open(&path) {
        Err(StoreError::TooNew { found, supported }) => {
            assert_eq!(found, migrate::latest() + 1);
            assert_eq!(supported, migrate::latest());
        }
        other => panic!("expected TooNew, got {other:?}"),
    }
}

#[test]
fn audit_chain_links_and_verifies() {
    let (_d, _p, store) = fresh();
    assert_eq!(store.verify_audit().unwrap(), Ok(0));
    let rows: Vec<AuditRow> = (1..=5)
        .map(|i| store.append_audit(&ev(i)).unwrap())
        .collect();
    assert_eq!(rows[0].prev_hash, trustbind_appliance::store::GENESIS);
    for w in rows.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
        assert_eq!(w[1].seq, w[0].seq + 1);
    }
    assert_eq!(store.verify_audit().unwrap(), Ok(5));
}

fn tamper(path: &PathBuf, sql: &str) {
    let c = Connection::open(path).unwrap();
    c.execute_batch(sql).unwrap();
}

#[test]
fn verify_detects_edited_row() {
    let (_d, path, store) = fresh();
    for i in 1..=4 {
        store.append_audit(&ev(i)).unwrap();
    }
    tamper(
        &path,
        r#"UPDATE audit SET detail = '{"n":99}' WHERE seq = 2"#,
    );
    assert_eq!(
        store.verify_audit().unwrap(),
        Err(ChainError::HashMismatch { seq: 2 })
    );
}

#[test]
fn verify_detects_edited_actor() {
    let (_d, path, store) = fresh();
    for i in 1..=3 {
        store.append_audit(&ev(i)).unwrap();
    }
    tamper(
        &path,
        "UPDATE audit SET actor = 'someone-else' WHERE seq = 3",
    );
    assert_eq!(
        store.verify_audit().unwrap(),
        Err(ChainError::HashMismatch { seq: 3 })
    );
}

#[test]
fn verify_detects_removed_row() {
    let (_d, path, store) = fresh();
    for i in 1..=4 {
        store.append_audit(&ev(i)).unwrap();
    }
    tamper(&path, "DELETE FROM audit WHERE seq = 2");
    assert_eq!(
        store.verify_audit().unwrap(),
        Err(ChainError::Gap {
            seq: 3,
            expected: 2
        })
    );
}

#[test]
fn verify_detects_removed_tail() {
    let (_d, path, store) = fresh();
    for i in 1..=4 {
        store.append_audit(&ev(i)).unwrap();
    }
    tamper(&path, "DELETE FROM audit WHERE seq = 4");
    assert_eq!(
        store.verify_audit().unwrap(),
        Err(ChainError::Head {
            head_seq: 4,
            last_seq: 3
        })
    );
}

#[test]
fn verify_detects_reordered_rows() {
    let (_d, path, store) = fresh();
    for i in 1..=4 {
        store.append_audit(&ev(i)).unwrap();
    }
    // Swap the contents of rows 2 and 3 (keeping the sequence numbers in place).
    tamper(
        &path,
        "CREATE TEMP TABLE t AS SELECT * FROM audit WHERE seq IN (2, 3);
         UPDATE audit SET at_ms = (SELECT at_ms FROM t WHERE seq = 3), kind = (SELECT kind FROM t WHERE seq = 3),
             actor = (SELECT actor FROM t WHERE seq = 3), detail = (SELECT detail FROM t WHERE seq = 3),
             prev_hash = (SELECT prev_hash FROM t WHERE seq = 3), hash = (SELECT hash FROM t WHERE seq = 3)
           WHERE seq = 2;
         UPDATE audit SET at_ms = (SELECT at_ms FROM t WHERE seq = 2), kind = (SELECT kind FROM t WHERE seq = 2),
             actor = (SELECT actor FROM t WHERE seq = 2), detail = (SELECT detail FROM t WHERE seq = 2),
             prev_hash = (SELECT prev_hash FROM t WHERE seq = 2), hash = (SELECT hash FROM t WHERE seq = 2)
           WHERE seq = 3;",
    );
    assert_eq!(
        store.verify_audit().unwrap(),
        Err(ChainError::BrokenLink { seq: 2 })
    );
}

#[test]
fn export_writes_json_lines_that_round_trip() {
    let (_d, _p, store) = fresh();
    for i in 1..=3 {
        store.append_audit(&ev(i)).unwrap();
    }
    let mut out = Vec::new();
    assert_eq!(store.export_audit(0, &mut out).unwrap(), 3);
    let text = String::from_utf8(out).unwrap();
    let rows: Vec<AuditRow> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows, store.audit_rows(0, 100).unwrap());
    let mut tail = Vec::new();
    assert_eq!(store.export_audit(2, &mut tail).unwrap(), 1);
    // Recompute each hash from the exported fields alone.
    let mut prev = trustbind_appliance::store::GENESIS.to_owned();
    for r in &rows {
        assert_eq!(r.prev_hash, prev);
        let h = trustbind_appliance::store::row_hash(
            &r.prev_hash,
            r.seq,
            r.at_ms,
            &r.kind,
            &r.actor,
            &r.detail,
        );
        assert_eq!(h, r.hash);
        prev = h;
    }
}

#[test]
fn signatures_and_groups() {
    let (_d, _p, store) = fresh();
    let sig = Signature {
        sha256: sha('a'),
        sha1: Some("b".repeat(40)),
        size: 4096,
        name: "ls".into(),
        source: "admin".into(),
    };
    store.put_signature(&sig, "admin:test").unwrap();
    assert_eq!(store.signature(&sig.sha256).unwrap(), Some(sig.clone()));
    store.create_group("coreutils", "", "admin:test").unwrap();
    store.create_group("shells", "", "admin:test").unwrap();
    store
        .add_member("shells", &sig.sha256, "admin:test")
        .unwrap();
    store
        .add_member("coreutils", &sig.sha256, "admin:test")
        .unwrap();
    assert_eq!(
        store.groups_of(&sig.sha256).unwrap(),
        vec!["coreutils".to_owned(), "shells".to_owned()]
    );
    assert!(store.groups_of(&sha('c')).unwrap().is_empty());
    // Unknown group or signature: refused.
    assert!(matches!(
        store.add_member("nope", &sig.sha256, "a"),
        Err(StoreError::NotFound { what: "group", .. })
    ));
    assert!(matches!(
        store.add_member("shells", &sha('d'), "a"),
        Err(StoreError::NotFound {
            what: "signature",
            ..
        })
    ));
    assert_eq!(store.verify_audit().unwrap(), Ok(5));
}

#[test]
fn malformed_signature_is_refused_and_changes_nothing() {
    let (_d, _p, store) = fresh();
    let before = audit_count(&store);
    for bad in ["", "xyz", &"A".repeat(64), &"a".repeat(63)] {
        let sig = Signature {
            sha256: bad.into(),
            sha1: None,
            size: 1,
            name: "x".into(),
            source: "t".into(),
        };
        assert!(matches!(
            store.put_signature(&sig, "a"),
            Err(StoreError::Invalid { what: "sha256", .. })
        ));
    }
    let sig = Signature {
        sha256: sha('a'),
        sha1: Some("zz".into()),
        size: 1,
        name: "x".into(),
        source: "t".into(),
    };
    assert!(matches!(
        store.put_signature(&sig, "a"),
        Err(StoreError::Invalid { what: "sha1", .. })
    ));
    assert_eq!(store.signature(&sha('a')).unwrap(), None);
    assert_eq!(audit_count(&store), before);
}

#[test]
fn policy_switch_and_rollback_are_atomic() {
    let (_d, _p, store) = fresh();
    assert_eq!(store.governing_policy().unwrap(), None);
    let v1 = store
        .create_policy_draft("permit(principal, action, resource);", "v1", "admin:t")
        .unwrap();
    let v2 = store
        .create_policy_draft("forbid(principal, action, resource);", "v2", "admin:t")
        .unwrap();
    assert_eq!(store.policy(v1).unwrap().unwrap().state, PolicyState::Draft);

    let g = store.activate_policy(v1, "admin:t").unwrap();
    assert_eq!((g.active, g.previous, g.generation), (Some(v1), None, 1));
    let g = store.activate_policy(v2, "admin:t").unwrap();
    assert_eq!(
        (g.active, g.previous, g.generation),
        (Some(v2), Some(v1), 2)
    );
    assert_eq!(
        store.policy(v1).unwrap().unwrap().state,
        PolicyState::Retired
    );
    assert_eq!(store.governing_policy().unwrap().unwrap().id, v2);

    // Failed switches change nothing, audit included.
    let before = (store.governing().unwrap(), audit_count(&store));
    assert!(matches!(
        store.activate_policy(9999, "admin:t"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.activate_policy(v2, "admin:t"),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!((store.governing().unwrap(), audit_count(&store)), before);

    let g = store.rollback_policy("admin:t").unwrap();
    assert_eq!(
        (g.active, g.previous, g.generation),
        (Some(v1), Some(v2), 3)
    );
    assert_eq!(
        store.policy(v1).unwrap().unwrap().state,
        PolicyState::Active
    );
    assert_eq!(
        store.policy(v2).unwrap().unwrap().state,
        PolicyState::Retired
    );
    let kinds: Vec<String> = store
        .audit_rows(0, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "policy.draft",
            "policy.draft",
            "policy.activate",
            "policy.activate",
            "policy.rollback"
        ]
    );
    assert_eq!(store.verify_audit().unwrap(), Ok(5));
}

#[test]
fn one_active_policy_is_enforced_by_the_schema() {
    let (_d, path, store) = fresh();
    let v1 = store.create_policy_draft("a", "", "t").unwrap();
    let v2 = store.create_policy_draft("b", "", "t").unwrap();
    store.activate_policy(v1, "t").unwrap();
    let c = Connection::open(&path).unwrap();
    assert!(c
        .execute(
            "UPDATE policy_versions SET state = 'active' WHERE id = ?1",
            [v2]
        )
        .is_err());
}

#[test]
fn rollback_without_previous_is_a_conflict() {
    let (_d, _p, store) = fresh();
    assert!(matches!(
        store.rollback_policy("t"),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(audit_count(&store), 0);
}

#[test]
fn host_enrolment_is_one_time_and_revocable() {
    let (_d, _p, store) = fresh();
    store
        .set_host_group("web", Mode::Permissive, "admin:t")
        .unwrap();
    assert_eq!(
        store.host_group_mode("web").unwrap(),
        Some(Mode::Permissive)
    );
    store
        .set_host_group("web", Mode::Enforce, "admin:t")
        .unwrap();
    assert_eq!(store.host_group_mode("web").unwrap(), Some(Mode::Enforce));
    assert!(store
        .add_pending_host("h1", "nogroup", &sha('1'), "admin:t")
        .is_err());
    store
        .add_pending_host("h1", "web", &sha('1'), "admin:t")
        .unwrap();
    assert!(matches!(
        store.add_pending_host("h1", "web", &sha('1'), "admin:t"),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.host("h1").unwrap(),
        Some((HostState::Pending, "web".into()))
    );
    assert!(store.enrol_host("h1", &sha('2'), "01").is_err());
    store.enrol_host("h1", &sha('1'), "01").unwrap();
    assert!(
        store.enrol_host("h1", &sha('1'), "02").is_err(),
        "token is one-time"
    );
    assert_eq!(
        store.host("h1").unwrap(),
        Some((HostState::Enrolled, "web".into()))
    );
    store.revoke_host("h1", "admin:t").unwrap();
    assert_eq!(
        store.host("h1").unwrap(),
        Some((HostState::Revoked, "web".into()))
    );
    assert!(matches!(
        store.revoke_host("h2", "admin:t"),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.verify_audit().unwrap(), Ok(5));
}

#[test]
fn channels_are_recorded_by_key_id_only() {
    let (_d, _p, store) = fresh();
    store
        .open_channel("k-0001", "a", "b", "tcp 10.0.0.1:4000 -> 10.0.0.2:443")
        .unwrap();
    assert!(store.open_channel("k-0001", "a", "b", "dup").is_err());
    let rows = store.audit_rows(0, 10).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].detail.contains("k-0001"));
}

fn close(id: &str, key: &str, role: &str, sent: u64, received: u64) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        host_at_ms: 5,
        what: "channel.close".into(),
        detail: serde_json::json!({
            "channel_id": 9, "key_id": key, "role": role,
            "bytes_sent": sent, "bytes_received": received, "duration_ms": 40,
        }),
    }
}

#[test]
fn both_ends_close_one_channel_record() {
    let (_d, _p, store) = fresh();
    let id = store.open_channel("k-1", "a", "b", "t").unwrap();
    store.open_channel("k-2", "a", "b", "t2").unwrap();
    let open = store.list_channels(true, 0, 10).unwrap();
    assert_eq!(open.len(), 2);
    assert!(open[0].closed_ms.is_none() && open[0].connect.is_none());

    // The connect end (host a) reports first: the channel is closed.
    let r = store
        .record_agent_reports("a", &[close("a-1", "k-1", "connect", 1000, 3)])
        .unwrap();
    assert_eq!(r, (1, 0));
    let all = store.list_channels(false, 0, 10).unwrap();
    let ch = all.iter().find(|c| c.id == id).unwrap();
    let first = ch.closed_ms.expect("closed with its first end");
    let c = ch.connect.as_ref().unwrap();
    assert_eq!(
        (c.bytes_sent, c.bytes_received, c.duration_ms),
        (1000, 3, 40)
    );
    assert!(ch.accept.is_none());
    assert_eq!(store.list_channels(true, 0, 10).unwrap().len(), 1);

    // A repeat (same report id) is a duplicate; another host cannot close
    // a's end or b's; b's accept end completes the record.
    assert_eq!(
        store
            .record_agent_reports("a", &[close("a-1", "k-1", "connect", 1, 1)])
            .unwrap(),
        (0, 1)
    );
    store
        .record_agent_reports("c", &[close("c-1", "k-1", "accept", 7, 7)])
        .unwrap();
    let mut idle = close("b-1", "k-1", "accept", 3, 1001);
    idle.detail["reason"] = serde_json::json!("idle");
    store.record_agent_reports("b", &[idle]).unwrap();
    let all = store.list_channels(false, 0, 10).unwrap();
    let ch = all.iter().find(|c| c.id == id).unwrap();
    assert_eq!(ch.closed_ms, Some(first));
    assert_eq!(ch.connect.as_ref().unwrap().bytes_sent, 1000);
    let a = ch.accept.as_ref().unwrap();
    assert_eq!((a.bytes_sent, a.bytes_received), (3, 1001));
    // An agent without reasons reads as `closed`; the idle end as `idle`.
    assert_eq!(ch.connect.as_ref().unwrap().reason, "closed");
    assert_eq!(a.reason, "idle");

    // Audited: channel.close per report, the stranger's unmatched.
    let rows = store.audit_rows(0, 100).unwrap();
    let closes: Vec<_> = rows.iter().filter(|r| r.kind == "channel.close").collect();
    assert_eq!(closes.len(), 3);
    assert_eq!(closes[0].actor, "a");
    assert!(closes[0].detail.contains("\"matched\":true"));
    assert!(closes[0].detail.contains("\"role\":\"connect\""));
    assert!(closes[1].detail.contains("\"matched\":false"));
    assert!(closes[2].detail.contains("\"bytes_received\":1001"));
    assert!(closes[2].detail.contains("\"reason\":\"idle\""));
    // A malformed close record is kept as a plain agent record.
    let mut bad = close("a-2", "k-2", "sideways", 0, 0);
    bad.detail["role"] = serde_json::json!("sideways");
    store.record_agent_reports("a", &[bad]).unwrap();
    let rows = store.audit_rows(0, 100).unwrap();
    assert_eq!(rows.last().unwrap().kind, "agent.channel.close");
    assert_eq!(store.verify_audit().unwrap(), Ok(rows.len() as i64));
}

#[test]
fn concurrent_appends_keep_one_chain() {
    let (_d, _p, store) = fresh();
    let store = std::sync::Arc::new(store);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let s = store.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    s.append_audit(&ev(t * 100 + i)).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(store.verify_audit().unwrap(), Ok(100));
}

#[test]
fn schema_7_keeps_memberships_in_a_without_rowid_table() {
    // A store at schema 6 with a signature in two groups.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("appliance.db");
    {
        let c = Connection::open(&path).unwrap();
        for sql in &migrate::MIGRATIONS[..6] {
            c.execute_batch(sql).unwrap();
        }
        c.execute_batch(&format!(
            "INSERT INTO signatures VALUES ('{a}', NULL, 1, 'ls', 'admin', 0);
             INSERT INTO ref_groups (name) VALUES ('g1'), ('g2');
             INSERT INTO ref_group_members VALUES ('g1', '{a}'), ('g2', '{a}');
             PRAGMA user_version = 6;",
            a = sha('a')
        ))
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), migrate::latest());
    assert_eq!(
        store.groups_of(&sha('a')).unwrap(),
        vec!["g1".to_owned(), "g2".to_owned()]
    );
    assert_eq!(store.integrity_check().unwrap(), "ok");
    drop(store);
    let ddl: String = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'ref_group_members'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(ddl.contains("WITHOUT ROWID"), "{ddl}");

    // Batches: new, unchanged, changed; the memberships still cascade.
    let store = Store::open(&path).unwrap();
    let sig = |c: char, name: &str| Signature {
        sha256: sha(c),
        sha1: None,
        size: 1,
        name: name.into(),
        source: "admin".into(),
    };
    let b = store
        .put_signatures(&[sig('b', "cat"), sig('a', "ls")], Some("g1"), "t")
        .unwrap();
    assert_eq!(
        (b.inserted, b.unchanged, b.updated, b.added_to_group),
        (1, 1, 0, 1)
    );
    let b = store
        .put_signatures(&[sig('b', "dog"), sig('b', "dog")], Some("g2"), "t")
        .unwrap();
    assert_eq!(
        (b.inserted, b.unchanged, b.updated, b.added_to_group),
        (0, 1, 1, 1)
    );
    assert_eq!(store.signature(&sha('b')).unwrap().unwrap().name, "dog");
    store.remove_signatures(&[sha('b')], "t").unwrap();
    assert!(store.groups_of(&sha('b')).unwrap().is_empty());
    assert_eq!(store.groups_of(&sha('a')).unwrap().len(), 2);
}

#[test]
fn schema_10_carries_token_admins_over_and_gives_pending_tokens_an_expiry() {
    use trustbind_appliance::store::{now_ms, AdminRole};
    // A store at schema 9: an admin enrolled with a token, a pending host
    // whose token never expired.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("appliance.db");
    {
        let c = Connection::open(&path).unwrap();
        for sql in &migrate::MIGRATIONS[..9] {
            c.execute_batch(sql).unwrap();
        }
        c.execute_batch(&format!(
            "INSERT INTO admin_tokens (name, token_sha256, created_ms, expires_ms, state, used_ms, cert_serial)
                 VALUES ('root', '{t}', 1000, 2000, 'used', 1500, '4abc');
             INSERT INTO host_groups VALUES ('web', 'enforce');
             INSERT INTO hosts (name, host_group, state, token_sha256, changed_ms)
                 VALUES ('web1', 'web', 'pending', '{t}', 0);
             PRAGMA user_version = 9;",
            t = sha('t')
        ))
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), migrate::latest());
    let c = store.admin_cert("4abc").unwrap().unwrap();
    assert_eq!((c.name.as_str(), c.role), ("root", AdminRole::Admin));
    assert_eq!(c.expires_ms, 1500 + 732 * 86_400_000);
    let (_, exp) = store.pending_token("web1").unwrap().unwrap();
    let left = exp.unwrap() - now_ms();
    assert!((86_000_000..=86_400_000).contains(&left), "{left}");
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

#[test]
fn file_sets_are_validated_bounded_audited_and_move_the_generation_once() {
    use trustbind_appliance::files::MAX_FILE_SET_PATHS;
    use trustbind_appliance::store::{FileSetEdit, StoreError};
    let (_d, _p, store) = fresh();
    let g = || store.governing().unwrap().generation;
    let rows = audit_count(&store);
    let g0 = g();
    let c = store
        .edit_file_set(
            "pgdata",
            FileSetEdit::Add,
            &["/srv/pgdata".into(), "/etc/pg".into()],
            "admin:a",
        )
        .unwrap();
    assert!(c.created);
    assert_eq!(c.set.paths, ["/etc/pg", "/srv/pgdata"]);
    assert_eq!((g(), audit_count(&store)), (g0 + 1, rows + 1));
    // Nothing new: nothing written.
    let c = store
        .edit_file_set("pgdata", FileSetEdit::Add, &["/etc/pg".into()], "admin:a")
        .unwrap();
    assert!(c.added.is_empty() && !c.created);
    assert_eq!((g(), audit_count(&store)), (g0 + 1, rows + 1));
    // A bad path names itself and changes nothing.
    match store.edit_file_set(
        "pgdata",
        FileSetEdit::Add,
        &["/srv/x/../y".into()],
        "admin:a",
    ) {
        Err(StoreError::Invalid { why, .. }) => {
            assert!(why.contains("`/srv/x/../y`") && why.contains(".."), "{why}")
        }
        other => panic!("{other:?}"),
    }
    // Replace, then remove.
    let c = store
        .edit_file_set(
            "pgdata",
            FileSetEdit::Replace,
            &["/srv/pgdata".into()],
            "admin:a",
        )
        .unwrap();
    assert_eq!(c.removed, ["/etc/pg"]);
    store
        .edit_file_set(
            "pgdata",
            FileSetEdit::Remove,
            &["/srv/pgdata".into()],
            "admin:a",
        )
        .unwrap();
    assert_eq!(
        store.file_set("pgdata").unwrap().unwrap().paths,
        Vec::<String>::new()
    );
    assert_eq!(g(), g0 + 3);
    assert!(matches!(
        store.edit_file_set("nope", FileSetEdit::Remove, &["/a".into()], "admin:a"),
        Err(StoreError::NotFound { .. })
    ));
    // The total is bounded over all sets.
    let many: Vec<String> = (0..MAX_FILE_SET_PATHS).map(|i| format!("/d/{i}")).collect();
    store
        .edit_file_set("big", FileSetEdit::Add, &many, "admin:a")
        .unwrap();
    match store.edit_file_set("other", FileSetEdit::Add, &["/x".into()], "admin:a") {
        Err(StoreError::Conflict(m)) => assert!(m.contains("at most 256"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(store.file_set("other").unwrap().is_none());
    // Deleting removes the set and its paths, once.
    assert_eq!(
        store.delete_file_set("big", "admin:a").unwrap().len(),
        MAX_FILE_SET_PATHS
    );
    assert!(matches!(
        store.delete_file_set("big", "admin:a"),
        Err(StoreError::NotFound { .. })
    ));
    let names: Vec<_> = store
        .file_sets()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["pgdata"]);
    let kinds: Vec<String> = store
        .audit_rows(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .filter(|k| k.starts_with("fileset."))
        .collect();
    assert_eq!(
        kinds,
        [
            "fileset.add",
            "fileset.set",
            "fileset.remove",
            "fileset.add",
            "fileset.delete"
        ]
    );
}

#[test]
fn a_schema_11_store_migrates_to_13_keeping_its_audit_chain() {
    use std::collections::BTreeSet;
    use trustbind_appliance::store::{Observation, ObservedFilter, ObservedState, Seen};
    // A store as the last release before retention and learning mode left
    // it (schema 11): this build's store with their objects removed, so
    // its audit chain is a real one.
    let (_d, path, store) = fresh();
    for i in 0..50 {
        store.append_audit(&ev(i)).unwrap();
    }
    drop(store);
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "DROP TABLE audit_checkpoints;
             DROP INDEX agent_reports_received;
             DROP TABLE observed;
             DROP TABLE observed_hosts;
             DROP TABLE host_addresses;
             PRAGMA user_version = 11;",
        )
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    // 13, then 14 (host addresses) since.
    assert_eq!(store.schema_version().unwrap(), 14);
    assert_eq!(store.verify_audit().unwrap(), Ok(50));
    let r = store.verify_audit_from_checkpoint().unwrap().unwrap();
    assert_eq!((r.rows, r.checkpoints), (50, 0));
    let obs = Observation {
        host: "web1".into(),
        sha256: sha('a'),
        sha1: None,
        size: 1,
        path: "/opt/x".into(),
        package: None,
        users: BTreeSet::from(["bob".to_owned()]),
        users_more: false,
        first_ms: 1,
        last_ms: 1,
        count: 1,
        verdict: Seen::WouldDeny,
        mode: Mode::Permissive,
    };
    assert_eq!(store.record_observed(&[obs]).unwrap().inserted, 1);
    let all = ObservedFilter {
        state: ObservedState::All,
        ..ObservedFilter::default()
    };
    assert_eq!(store.observed(&all, 0, 10).unwrap().len(), 1);
    assert_eq!(store.integrity_check().unwrap(), "ok");
}
