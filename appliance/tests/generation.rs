//! When the verdict generation moves (and when it must not), compiling
//! policy sets off the decision path, and decisions beside long reads.
//! Real SQLite stores in temporary directories.

use std::io::Write;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::policy::Verdict;
use trustbind_appliance::request::{Action, Program, QualifyRequest, Subject, Target};
use trustbind_appliance::store::{AuditEvent, Mode, Publish, Signature, Store, AUDIT_SINCE};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");

const POLICY: &str = r#"
@id("system") permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"system");
@id("nsrl") permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"nsrl");
@id("blocked") forbid (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"blocked");
"#;

/// Batches of an import and signatures per batch.
const BATCHES: usize = 1000;
const PER_BATCH: usize = 20;

fn hash(i: usize) -> String {
    format!("{i:064x}")
}

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
    store
        .set_host_group("web", Mode::Enforce, "admin:t")
        .unwrap();
    store
        .add_pending_host("web1", "web", &"a".repeat(64), "admin:t")
        .unwrap();
    for g in ["system", "nsrl", "blocked"] {
        store.create_group(g, "", "admin:t").unwrap();
    }
    store
        .put_signature(&sig(&"5".repeat(64)), "admin:t")
        .unwrap();
    store
        .add_member("system", &"5".repeat(64), "admin:t")
        .unwrap();
    let id = store.create_policy_draft(POLICY, "", "admin:t").unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    let engine = Engine::new(store.clone(), SCHEMA).unwrap();
    Fixture {
        _dir: dir,
        store,
        engine,
    }
}

fn generation(store: &Store) -> i64 {
    store.governing().unwrap().generation
}

/// Imports `BATCHES` batches into `nsrl` as `publish` says; returns how
/// many batches moved the generation.
fn import(store: &Store, publish: Publish) -> usize {
    let mut moves = 0;
    for b in 0..BATCHES {
        let sigs: Vec<Signature> = (0..PER_BATCH)
            .map(|i| sig(&hash(b * PER_BATCH + i)))
            .collect();
        let before = generation(store);
        let r = store
            .put_signatures_with(&sigs, Some("nsrl"), "admin:t", publish)
            .unwrap();
        assert_eq!(r.added_to_group, PER_BATCH as u64);
        if generation(store) != before {
            moves += 1;
        }
    }
    moves
}

/// Programs of the import some host was denied before it, spread over it.
fn denied_before(f: &Fixture) -> Vec<String> {
    let picks: Vec<String> = [10, 5_000, 9_999, 15_000, BATCHES * PER_BATCH - 1]
        .iter()
        .map(|i| hash(*i))
        .collect();
    for h in &picks {
        let d = f.engine.decide(&exec("web1", h)).unwrap();
        assert_eq!(d.outcome.verdict, Verdict::Deny);
        assert!(d.cacheable);
    }
    // And one allowed program outside the import.
    let d = f.engine.decide(&exec("web1", &"5".repeat(64))).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Allow);
    picks
}

#[test]
fn an_import_no_host_asked_about_never_moves_the_generation() {
    let f = fixture();
    let _ = f.engine.decide(&exec("web1", &"5".repeat(64))).unwrap();
    let g0 = generation(&f.store);
    assert_eq!(import(&f.store, Publish::Now), 0);
    assert_eq!(generation(&f.store), g0);
    // The engine sees the new members at once, under the same generation.
    let d = f.engine.decide(&exec("web1", &hash(77))).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Allow);
    assert_eq!(d.generation, g0);
    assert!(d.cacheable);
}

#[test]
fn a_bulk_import_of_denied_programs_moves_the_generation_once_when_quiet() {
    let f = fixture();
    let picks = denied_before(&f);
    let g0 = generation(&f.store);
    assert_eq!(import(&f.store, Publish::Deferred), 0);
    assert_eq!(generation(&f.store), g0);
    assert!(f.store.deferred_move());
    // Not while the import is going on...
    assert_eq!(
        f.store.settle_deferred(now_ms(), 60_000, 600_000).unwrap(),
        None
    );
    // ...but once it has been quiet: one move for the whole import.
    let later = now_ms() + 61_000;
    assert_eq!(
        f.store.settle_deferred(later, 60_000, 600_000).unwrap(),
        Some(g0 + 1)
    );
    assert!(!f.store.deferred_move());
    assert_eq!(
        f.store.settle_deferred(later, 60_000, 600_000).unwrap(),
        None
    );
    assert_eq!(generation(&f.store), g0 + 1);
    for h in &picks {
        let d = f.engine.decide(&exec("web1", h)).unwrap();
        assert_eq!(d.outcome.verdict, Verdict::Allow);
        assert_eq!(d.generation, g0 + 1);
    }
    let rows = f.store.audit_rows(0, 1_000_000).unwrap();
    assert_eq!(
        rows.iter().filter(|r| r.kind == "generation.move").count(),
        1
    );
}

#[test]
fn an_import_touching_denied_programs_moves_the_generation_once_at_most() {
    let f = fixture();
    denied_before(&f);
    let g0 = generation(&f.store);
    // The first batch holding a denied program moves it (hosts drop the
    // deny at once); after that no host has asked about anything else.
    assert_eq!(import(&f.store, Publish::Now), 1);
    assert_eq!(generation(&f.store), g0 + 1);
    assert!(!f.store.deferred_move());
}

#[test]
fn taking_an_allowed_program_away_moves_the_generation_at_once_even_in_bulk() {
    let f = fixture();
    let s = "5".repeat(64);
    assert!(f.engine.decide(&exec("web1", &s)).unwrap().cacheable);
    let g0 = generation(&f.store);
    // Into a group a forbid names: a revocation, never deferred.
    f.store
        .put_signatures_with(&[sig(&s)], Some("blocked"), "admin:t", Publish::Deferred)
        .unwrap();
    assert_eq!(generation(&f.store), g0 + 1);
    let d = f.engine.decide(&exec("web1", &s)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    assert_eq!(d.generation, g0 + 1);
    f.store.remove_member("blocked", &s, "admin:t").unwrap();
    assert_eq!(generation(&f.store), g0 + 2);
    assert_eq!(
        f.engine.decide(&exec("web1", &s)).unwrap().outcome.verdict,
        Verdict::Allow
    );
    // Out of the group that allowed it.
    f.store.remove_member("system", &s, "admin:t").unwrap();
    assert_eq!(generation(&f.store), g0 + 3);
    // Removing the signature of a program allowed under this generation.
    f.store.add_member("system", &s, "admin:t").unwrap();
    assert!(f.engine.decide(&exec("web1", &s)).unwrap().cacheable);
    let g = generation(&f.store);
    f.store.remove_signature(&s, "admin:t").unwrap();
    assert_eq!(generation(&f.store), g + 1);
}

#[test]
fn registering_hosts_does_not_move_the_generation() {
    let f = fixture();
    let g0 = generation(&f.store);
    for i in 0..50 {
        f.store
            .add_pending_host(&format!("new{i}"), "web", &"b".repeat(64), "admin:t")
            .unwrap();
    }
    assert_eq!(generation(&f.store), g0);
    // The engine knows the new hosts at once.
    let d = f.engine.decide(&exec("new49", &"5".repeat(64))).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Allow);
    assert_eq!(d.generation, g0);
    // A mode change still moves it.
    f.store
        .set_host_group("web", Mode::Permissive, "admin:t")
        .unwrap();
    assert_eq!(generation(&f.store), g0 + 1);
}

#[test]
fn the_first_membership_change_after_a_restart_moves_the_generation() {
    let f = fixture();
    let path = f._dir.path().join("appliance.db");
    // Hosts may hold verdicts from before the restart: unknown which.
    let store = Arc::new(Store::open(&path).unwrap());
    let g0 = generation(&store);
    store.put_signature(&sig(&hash(1)), "admin:t").unwrap();
    store.add_member("nsrl", &hash(1), "admin:t").unwrap();
    assert_eq!(generation(&store), g0 + 1);
    store.put_signature(&sig(&hash(2)), "admin:t").unwrap();
    store.add_member("nsrl", &hash(2), "admin:t").unwrap();
    assert_eq!(generation(&store), g0 + 1);
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A policy set slow to compile: `n` permits, each its own group.
fn big_policy(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "@id(\"p{i}\") permit (principal, action == Trustbind::Action::\"exec\", resource in Trustbind::ProgramGroup::\"g{i}\") when {{ context.session != {i} }};\n"
        ));
    }
    s.push_str(POLICY);
    s
}

#[test]
fn decisions_during_a_slow_compile_are_answered_by_the_old_policy_without_waiting() {
    let f = fixture();
    let s = "5".repeat(64);
    let big = big_policy(2500);
    let id = f.store.create_policy_draft(&big, "", "admin:t").unwrap();
    // How long compiling it takes here.
    let t = Instant::now();
    trustbind_appliance::policy::validate(
        &cedar_policy::Schema::from_cedarschema_str(SCHEMA)
            .unwrap()
            .0,
        &big,
    )
    .unwrap();
    let compile = t.elapsed();
    assert!(compile > Duration::from_millis(200), "{compile:?}");

    let g0 = generation(&f.store);
    let store = f.store.clone();
    let activation = std::thread::spawn(move || store.activate_policy(id, "admin:t").unwrap());
    let mut slowest = Duration::ZERO;
    let mut old = 0;
    let mut after = 0;
    // Decide while the activation runs, and a few times after it returned.
    while after < 20 {
        let done = activation.is_finished();
        let t = Instant::now();
        let d = f.engine.decide(&exec("web1", &s)).unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(d.outcome.verdict, Verdict::Allow);
        if d.generation == g0 {
            old += 1;
        } else if done {
            after += 1;
        }
    }
    let g = activation.join().unwrap();
    println!(
        "compiling {compile:?}; slowest decision {slowest:?}; {old} decisions by the old policy"
    );
    assert_eq!(g.generation, g0 + 1);
    assert!(old > 0, "no decision was made while compiling");
    assert!(
        slowest < compile / 2,
        "a decision waited {slowest:?} (compiling takes {compile:?})"
    );
    assert_eq!(f.engine.generation(), g0 + 1);
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
    assert!(plan.iter().any(|p| p.contains("audit_at_ms")), "{plan:?}");
}

/// Deciders race membership changes of one program: all the cacheable
/// answers given under one generation agree (a host caching any of them
/// holds what the generation says), whether the change moved it or not.
#[test]
fn cacheable_answers_under_one_generation_agree_while_memberships_change() {
    let f = fixture();
    let x = hash(424_242);
    f.store.put_signature(&sig(&x), "admin:t").unwrap();
    let engine = Arc::new(f.engine);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deciders: Vec<_> = (0..3)
        .map(|_| {
            let (e, stop, x) = (engine.clone(), stop.clone(), x.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let d = e.decide(&exec("web1", &x)).unwrap();
                    if d.cacheable {
                        seen.push((d.generation, d.outcome.verdict == Verdict::Allow));
                    }
                }
                seen
            })
        })
        .collect();
    for i in 0..200 {
        if i % 2 == 0 {
            f.store.add_member("system", &x, "admin:t").unwrap();
        } else {
            f.store.remove_member("system", &x, "admin:t").unwrap();
        }
    }
    // Quiet at the end: cacheable answers for certain.
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut by_gen = std::collections::HashMap::new();
    let mut n = 0;
    for h in deciders {
        for (g, allow) in h.join().unwrap() {
            n += 1;
            let first = *by_gen.entry(g).or_insert(allow);
            assert_eq!(first, allow, "answers disagree under generation {g}");
        }
    }
    assert!(n > 0);
}
