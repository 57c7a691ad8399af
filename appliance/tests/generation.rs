//! Decisions beside long reads of the store. Real SQLite stores in
//! temporary directories.

use std::io::Write;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::policy::Verdict;
use trustbind_appliance::request::{Action, Program, QualifyRequest, Subject, Target};
use trustbind_appliance::store::{AuditEvent, Mode, Signature, Store, AUDIT_SINCE};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");

const POLICY: &str = r#"
@id("system") permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"system");
@id("nsrl") permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"nsrl");
@id("blocked") forbid (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"blocked");
"#;

fn sig(sha256: &str) -> Signature {
    Signature {
        sha256: sha256.to_owned(),
        sha1: None,
        size: 1,
        name: "f".into(),
        source: "nsrl:test".into(),
    }
}

fn exec(host: &str, sha256: &str) -> QualifyRequest {
    QualifyRequest {
        host: host.into(),
        action: Action::Exec,
        subject: Subject {
            user: "bob".into(),
            uid: 1000,
            euid: 1000,
            gid: 1000,
            loginuid: 1000,
            session: 1,
            pid: 1,
            ancestry: Vec::new(),
        },
        program: Program {
            sha256: sha256.to_owned(),
            sha1: "0".repeat(40),
            size: 1,
            path: "/usr/bin/x".into(),
        },
        target: Target::Exec {
            loader_direct: false,
        },
        at_ms: 1_704_101_400_000,
        peer: None,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    engine: Engine,
}

/// Host web1 (enforce); `system` holds one program (`s`), `nsrl` and
/// `blocked` are empty; the policy above governs.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("appliance.db")).unwrap());
    store.set_host_group("web", Mode::Enforce, "admin:t").unwrap();
    store.add_pending_host("web1", "web", &"a".repeat(64), "admin:t").unwrap();
    for g in ["system", "nsrl", "blocked"] {
        store.create_group(g, "", "admin:t").unwrap();
    }
    store.put_signature(&sig(&"5".repeat(64)), "admin:t").unwrap();
    store.add_member("system", &"5".repeat(64), "admin:t").unwrap();
    let id = store.create_policy_draft(POLICY, "", "admin:t").unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    let engine = Engine::new(store.clone(), SCHEMA).unwrap();
    Fixture {
        _dir: dir,
        store,
        engine,
    }
}

/// Holds a read of the audit log open (an export stopped in its first
/// write) while decisions and audit appends go on.
#[test]
fn a_long_audit_read_does_not_block_decisions_or_writes() {
    let f = fixture();
    for i in 0..100 {
        f.store
            .append_audit(&AuditEvent::new("x", "t", serde_json::json!({ "i": i })))
            .unwrap();
    }
    struct Stall {
        started: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
        first: bool,
    }
    impl Write for Stall {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.first {
                self.first = false;
                let _ = self.started.send(());
                let _ = self.release.recv_timeout(Duration::from_secs(30));
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (started, started_rx) = mpsc::channel();
    let (release_tx, release) = mpsc::channel();
    let store = f.store.clone();
    let export = std::thread::spawn(move || {
        let mut out = Stall {
            started,
            release,
            first: true,
        };
        store.export_audit(0, &mut out).unwrap()
    });
    started_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    // Meanwhile: a decision that must read memberships, and a write.
    let (done_tx, done) = mpsc::channel();
    let (store, engine) = (f.store.clone(), Arc::new(f.engine));
    let e = engine.clone();
    std::thread::spawn(move || {
        let d = e.decide(&exec("web1", &"5".repeat(64))).unwrap();
        store
            .append_audit(&AuditEvent::new("y", "t", serde_json::json!({})))
            .unwrap();
        let _ = done_tx.send(d);
    });
    let got = done.recv_timeout(Duration::from_secs(10));
    let _ = release_tx.send(());
    let d = got.expect("a decision waited behind an audit export");
    assert_eq!(d.outcome.verdict, Verdict::Allow);
    assert!(export.join().unwrap() >= 100);
}

#[test]
fn the_audit_cursor_by_time_uses_an_index() {
    let f = fixture();
    let conn = rusqlite::Connection::open(f._dir.path().join("appliance.db")).unwrap();
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {AUDIT_SINCE}"))
        .unwrap()
        .query_map([0], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter().any(|p| p.contains("audit_at_ms")),
        "{plan:?}"
    );
}
