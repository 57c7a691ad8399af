//! Policy engine tests: real SQLite stores in temporary directories, the
//! schema and example policy set from `policies/`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use trustbind_appliance::policy::engine::{Decision, Engine};
use trustbind_appliance::policy::{PolicyError, Verdict};
use trustbind_appliance::request::{
    Action, FiveTuple, Program, Proto, QualifyRequest, Subject, Target,
};
use trustbind_appliance::store::{Mode, Signature, Store};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");
const EXAMPLE: &str = include_str!("../../policies/example.cedar");

/// Monday 2024-01-01 09:30 UTC.
const MON_0930: i64 = 1_704_101_400_000;
/// Monday 2024-01-01 20:00 UTC.
const MON_2000: i64 = 1_704_139_200_000;
/// Saturday 2024-01-06 09:30 UTC.
const SAT_0930: i64 = 1_704_533_400_000;

fn sha(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

const LS: char = '1';
const TCPDUMP: char = '2';
const NC: char = '3';
const NGINX: char = '4';
const POSTGRES: char = '5';
const UNKNOWN: char = '9';

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
}

/// Hosts web1 (web, enforce), db1 (db, enforce), lab1 (lab, permissive),
/// off1 (off, disabled); programs in the groups the example policy names;
/// alice is an admin, bob has no role.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("appliance.db")).unwrap());
    for (g, m) in [
        ("web", Mode::Enforce),
        ("db", Mode::Enforce),
        ("lab", Mode::Permissive),
        ("off", Mode::Disabled),
    ] {
        store.set_host_group(g, m, "admin:t").unwrap();
    }
    for (h, g) in [
        ("web1", "web"),
        ("db1", "db"),
        ("lab1", "lab"),
        ("off1", "off"),
    ] {
        store.add_pending_host(h, g, &sha('a'), "admin:t").unwrap();
    }
    for (c, name, group) in [
        (LS, "ls", "coreutils"),
        (TCPDUMP, "tcpdump", "admin-tools"),
        (NC, "nc", "netcat"),
        (NGINX, "nginx", "web-servers"),
        (POSTGRES, "postgres", "db-servers"),
    ] {
        store
            .put_signature(
                &Signature {
                    sha256: sha(c),
                    sha1: None,
                    size: 1,
                    name: name.into(),
                    source: "admin".into(),
                },
                "admin:t",
            )
            .unwrap();
        store.create_group(group, "", "admin:t").unwrap();
        store.add_member(group, &sha(c), "admin:t").unwrap();
    }
    store
        .set_user_roles("alice", &["admin"], "admin:t")
        .unwrap();
    store.set_user_roles("bob", &[], "admin:t").unwrap();
    Fixture { _dir: dir, store }
}

fn activate(store: &Store, text: &str) -> i64 {
    let id = store.create_policy_draft(text, "", "admin:t").unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    id
}

fn subject(user: &str) -> Subject {
    Subject {
        user: user.into(),
        uid: 1000,
        euid: 1000,
        gid: 1000,
        loginuid: 1000,
        session: 7,
        pid: 4242,
        ancestry: vec![sha('b')],
    }
}

fn program(c: char) -> Program {
    Program {
        sha256: sha(c),
        sha1: std::iter::repeat_n(c, 40).collect(),
        size: 1,
        path: format!("/usr/bin/{c}"),
    }
}

fn exec(host: &str, user: &str, prog: char, at_ms: i64) -> QualifyRequest {
    QualifyRequest {
        host: host.into(),
        action: Action::Exec,
        subject: subject(user),
        program: program(prog),
        target: Target::Exec,
        at_ms,
    }
}

fn net(host: &str, action: Action, prog: char, dst_port: u16) -> QualifyRequest {
    QualifyRequest {
        host: host.into(),
        action,
        subject: subject("svc"),
        program: program(prog),
        target: Target::Net(FiveTuple {
            proto: Proto::Tcp,
            src_addr: "10.0.0.1".into(),
            src_port: 40000,
            dst_addr: "10.0.0.2".into(),
            dst_port,
        }),
        at_ms: MON_0930,
    }
}

fn allowed(d: &Decision) -> bool {
    !matches!(d.outcome.verdict, Verdict::Deny)
}

fn engine_with_example() -> (Fixture, Engine) {
    let f = fixture();
    activate(&f.store, EXAMPLE);
    let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
    (f, e)
}

#[test]
fn engine_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Engine>();
}

#[test]
fn exec_by_program_group() {
    let (_f, e) = engine_with_example();
    let d = e.decide(&exec("web1", "bob", LS, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Allow);
    assert_eq!(d.outcome.reasons, vec!["exec-coreutils".to_owned()]);
    assert_eq!(d.groups, vec!["coreutils".to_owned()]);
    assert!(!d.cache_hit);

    let d = e.decide(&exec("web1", "bob", UNKNOWN, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    assert!(d.outcome.reasons.is_empty());
    assert!(d.groups.is_empty());
    assert!(!d.outcome.would_deny);
}

#[test]
fn exec_by_user_role_with_obligations() {
    let (f, e) = engine_with_example();
    let d = e.decide(&exec("web1", "alice", TCPDUMP, MON_0930)).unwrap();
    let want = BTreeMap::from([
        ("alert".to_owned(), "soc".to_owned()),
        ("nice".to_owned(), "10".to_owned()),
    ]);
    assert_eq!(
        d.outcome.verdict,
        Verdict::AllowWithConditions {
            obligations: want.clone()
        }
    );
    assert_eq!(
        d.outcome.reasons,
        vec!["exec-admin-tools-office-hours".to_owned()]
    );

    let d = e.decide(&exec("web1", "bob", TCPDUMP, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    // A user the store does not know has no roles either.
    let d = e
        .decide(&exec("web1", "mallory", TCPDUMP, MON_0930))
        .unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);

    // Giving bob the role moves the generation and the verdict.
    let before = e.generation();
    f.store
        .set_user_roles("bob", &["admin", "dba"], "admin:t")
        .unwrap();
    assert_eq!(
        f.store.user_roles("bob").unwrap(),
        vec!["admin".to_owned(), "dba".to_owned()]
    );
    let d = e.decide(&exec("web1", "bob", TCPDUMP, MON_0930)).unwrap();
    assert!(d.generation > before);
    assert_eq!(
        d.outcome.verdict,
        Verdict::AllowWithConditions { obligations: want }
    );
    let kinds: Vec<String> = f
        .store
        .audit_rows(0, 1000)
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert!(kinds.iter().filter(|k| *k == "user.roles").count() >= 3);
}

#[test]
fn exec_by_host_group() {
    let (_f, e) = engine_with_example();
    let d = e.decide(&exec("web1", "bob", NC, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Allow);
    assert_eq!(d.outcome.reasons, vec!["exec-netcat".to_owned()]);
    let d = e.decide(&exec("db1", "bob", NC, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    assert_eq!(d.outcome.reasons, vec!["no-netcat-on-db".to_owned()]);
}

#[test]
fn exec_by_time_window_in_utc() {
    let (_f, e) = engine_with_example();
    let d = e.decide(&exec("web1", "alice", TCPDUMP, MON_0930)).unwrap();
    assert!(allowed(&d));
    // The example set reads the hour: the kernel must not cache.
    assert!(!d.cacheable);
    let d = e.decide(&exec("web1", "alice", TCPDUMP, MON_2000)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    let d = e.decide(&exec("web1", "alice", TCPDUMP, SAT_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    // 07:59:59.999 is outside, 08:00:00 inside.
    let eight = MON_0930 - 90 * 60 * 1000;
    let d = e
        .decide(&exec("web1", "alice", TCPDUMP, eight - 1))
        .unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    let d = e.decide(&exec("web1", "alice", TCPDUMP, eight)).unwrap();
    assert!(allowed(&d));
}

#[test]
fn clock_free_policies_are_cacheable() {
    let f = fixture();
    activate(
        &f.store,
        r#"permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"coreutils")
           when { context.session == 7 };"#,
    );
    let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
    let d = e.decide(&exec("web1", "bob", LS, MON_0930)).unwrap();
    assert!(allowed(&d));
    assert!(d.cacheable);
}

#[test]
fn permissive_mode_allows_and_records_would_deny() {
    let (_f, e) = engine_with_example();
    let d = e.decide(&exec("lab1", "bob", UNKNOWN, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Allow);
    assert!(d.outcome.would_deny);
    let d = e.decide(&exec("lab1", "bob", LS, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Allow);
    assert!(!d.outcome.would_deny);
}

#[test]
fn disabled_mode_allows_everything_and_mode_changes_apply() {
    let (f, e) = engine_with_example();
    let d = e.decide(&exec("off1", "bob", UNKNOWN, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Allow);
    assert!(!d.outcome.would_deny);
    f.store
        .set_host_group("off", Mode::Enforce, "admin:t")
        .unwrap();
    let d = e.decide(&exec("off1", "bob", UNKNOWN, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
}

#[test]
fn no_governing_policy_denies_by_default() {
    let f = fixture();
    let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
    for p in [LS, UNKNOWN] {
        let d = e.decide(&exec("web1", "alice", p, MON_0930)).unwrap();
        assert_eq!(d.outcome.verdict, Verdict::Deny);
    }
    // Activation is picked up by the next decision.
    activate(&f.store, EXAMPLE);
    let d = e.decide(&exec("web1", "alice", LS, MON_0930)).unwrap();
    assert!(allowed(&d));
    assert_eq!(d.generation, f.store.governing().unwrap().generation);
}

#[test]
fn membership_changes_move_the_generation_and_the_verdict() {
    let (f, e) = engine_with_example();
    let unknown = sha(UNKNOWN);
    let d = e.decide(&exec("web1", "bob", UNKNOWN, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    let g0 = d.generation;
    f.store
        .put_signature(
            &Signature {
                sha256: unknown.clone(),
                sha1: None,
                size: 9,
                name: "new".into(),
                source: "admin".into(),
            },
            "admin:t",
        )
        .unwrap();
    f.store
        .add_member("coreutils", &unknown, "admin:t")
        .unwrap();
    let d = e.decide(&exec("web1", "bob", UNKNOWN, MON_0930)).unwrap();
    assert!(allowed(&d));
    assert!(d.generation > g0);
    f.store
        .remove_member("coreutils", &unknown, "admin:t")
        .unwrap();
    let d = e.decide(&exec("web1", "bob", UNKNOWN, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    // Removing a signature removes its memberships too.
    assert!(allowed(
        &e.decide(&exec("web1", "bob", LS, MON_0930)).unwrap()
    ));
    f.store.remove_signature(&sha(LS), "admin:t").unwrap();
    let d = e.decide(&exec("web1", "bob", LS, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    assert!(d.groups.is_empty());
}

#[test]
fn refresh_is_a_no_op_when_nothing_moved() {
    let (f, e) = engine_with_example();
    let g = e.refresh().unwrap();
    assert_eq!(g, e.generation());
    assert_eq!(g, f.store.governing().unwrap().generation);
    assert_eq!(e.refresh().unwrap(), g);
    f.store.set_user_roles("carol", &["x"], "admin:t").unwrap();
    assert_eq!(e.refresh().unwrap(), g + 1);
    assert_eq!(e.generation(), g + 1);
}

/// The example's `web-to-db` only speaks for the connecting side (its
/// program is the web server); the accepting side needs its own rule.
const ACCEPT_FROM_WEB: &str = r#"
@id("db-from-web")
@log_level("info")
permit (
    principal,
    action == Trustbind::Action::"accept",
    resource
)
when {
    context.program in Trustbind::ProgramGroup::"db-servers" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"web-servers" &&
    context has peer_host &&
    context.peer_host in Trustbind::HostGroup::"web"
};
"#;

#[test]
fn pair_decision_needs_both_sides() {
    let f = fixture();
    activate(&f.store, EXAMPLE);
    let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
    let c = net("web1", Action::Connect, NGINX, 5432);
    let a = net("db1", Action::Accept, POSTGRES, 5432);
    // The example alone: the accepting side has no permit.
    assert_eq!(
        e.decide_pair(&c, &a).unwrap().outcome.verdict,
        Verdict::Deny
    );
    activate(&f.store, &format!("{EXAMPLE}\n{ACCEPT_FROM_WEB}"));
    let d = e.decide_pair(&c, &a).unwrap();
    assert_eq!(
        d.outcome.verdict,
        Verdict::AllowWithConditions {
            obligations: BTreeMap::from([
                ("encrypt".to_owned(), "required".to_owned()),
                ("log_level".to_owned(), "info".to_owned()),
            ])
        }
    );
    assert_eq!(
        d.outcome.reasons,
        vec!["web-to-db".to_owned(), "db-from-web".to_owned()]
    );
    assert_eq!(
        d.groups,
        vec!["web-servers".to_owned(), "db-servers".to_owned()]
    );
    // Alone, neither half has a peer: the policy needs one.
    assert_eq!(e.decide(&c).unwrap().outcome.verdict, Verdict::Deny);
    // Wrong program on one side, or wrong port: denied.
    let d = e
        .decide_pair(&net("web1", Action::Connect, NC, 5432), &a)
        .unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    let d = e
        .decide_pair(
            &net("web1", Action::Connect, NGINX, 80),
            &net("db1", Action::Accept, POSTGRES, 80),
        )
        .unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    // The peer host counts too: a web server on a db host is not a web host.
    let d = e
        .decide_pair(&net("db1", Action::Connect, NGINX, 5432), &a)
        .unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    // The accepting side sees the connector as its peer: swapping the
    // programs breaks the pair.
    let d = e
        .decide_pair(
            &net("web1", Action::Connect, POSTGRES, 5432),
            &net("db1", Action::Accept, NGINX, 5432),
        )
        .unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
}

#[test]
fn unknown_host_and_mismatched_target_are_errors_naming_the_host() {
    let (_f, e) = engine_with_example();
    match e.decide(&exec("ghost", "bob", LS, MON_0930)) {
        Err(err @ PolicyError::UnknownHost(_)) => assert!(err.to_string().contains("ghost")),
        other => panic!("expected UnknownHost, got {other:?}"),
    }
    let mut r = exec("web1", "bob", LS, MON_0930);
    r.target = Target::File {
        path: "/etc/passwd".into(),
        to: None,
    };
    match e.decide(&r) {
        Err(err @ PolicyError::Request(_)) => assert!(err.to_string().contains("web1")),
        other => panic!("expected Request, got {other:?}"),
    }
    assert!(matches!(
        e.decide_pair(
            &exec("web1", "bob", LS, MON_0930),
            &exec("db1", "bob", LS, MON_0930)
        ),
        Err(PolicyError::Request(_))
    ));
}

#[test]
fn file_actions_are_decided() {
    let f = fixture();
    activate(
        &f.store,
        r#"@id("etc-read")
           permit (principal, action == Trustbind::Action::"open_read", resource)
           when { resource.path like "/etc/*" && context.program in Trustbind::ProgramGroup::"coreutils" };"#,
    );
    let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
    let mut r = exec("web1", "bob", LS, MON_0930);
    r.action = Action::OpenRead;
    r.target = Target::File {
        path: "/etc/hosts".into(),
        to: None,
    };
    let d = e.decide(&r).unwrap();
    assert_eq!(d.outcome.reasons, vec!["etc-read".to_owned()]);
    r.action = Action::OpenWrite;
    assert_eq!(e.decide(&r).unwrap().outcome.verdict, Verdict::Deny);
    r.action = Action::OpenRead;
    r.program = program(NC);
    assert_eq!(e.decide(&r).unwrap().outcome.verdict, Verdict::Deny);
}

/// Policy switches and rollbacks race with deciders on other threads.
/// Every decision must match the policy governing at its generation, and
/// a decision made after a switch returned sees that switch.
#[test]
fn policy_switch_and_rollback_are_atomic_for_decisions() {
    let f = fixture();
    let a = r#"@id("A") permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"coreutils");"#;
    let b = r#"@id("B") permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"netcat");"#;
    let va = f.store.create_policy_draft(a, "A", "admin:t").unwrap();
    let vb = f.store.create_policy_draft(b, "B", "admin:t").unwrap();
    let by_gen: Arc<Mutex<HashMap<i64, i64>>> = Arc::default();
    let g = f.store.activate_policy(va, "admin:t").unwrap();
    by_gen.lock().unwrap().insert(g.generation, va);
    let e = Arc::new(Engine::new(f.store.clone(), SCHEMA).unwrap());
    let g = f.store.activate_policy(vb, "admin:t").unwrap();
    by_gen.lock().unwrap().insert(g.generation, vb);

    let stop = Arc::new(AtomicBool::new(false));
    let deciders: Vec<_> = (0..3)
        .map(|_| {
            let (e, stop) = (e.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) || seen.len() < 50 {
                    for p in [LS, NC] {
                        let d = e.decide(&exec("web1", "bob", p, MON_0930)).unwrap();
                        seen.push((p, d));
                    }
                }
                seen
            })
        })
        .collect();
    for _ in 0..30 {
        let g = f.store.rollback_policy("admin:t").unwrap();
        by_gen
            .lock()
            .unwrap()
            .insert(g.generation, g.active.unwrap());
        // Read-your-writes: the very next decision sees this switch.
        let d = e.decide(&exec("web1", "bob", LS, MON_0930)).unwrap();
        assert!(d.generation >= g.generation);
        if d.generation == g.generation {
            assert_eq!(allowed(&d), g.active == Some(va));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let by_gen = by_gen.lock().unwrap();
    let mut checked = 0;
    for h in deciders {
        for (p, d) in h.join().unwrap() {
            let v = by_gen
                .get(&d.generation)
                .unwrap_or_else(|| panic!("decision at unknown generation {}", d.generation));
            let (want_allow, want_reason) = match (*v == va, p) {
                (true, LS) => (true, Some("A")),
                (false, NC) => (true, Some("B")),
                _ => (false, None),
            };
            assert_eq!(
                allowed(&d),
                want_allow,
                "{p} at generation {}",
                d.generation
            );
            assert_eq!(
                d.outcome.reasons.first().map(String::as_str),
                want_reason,
                "{p} at generation {}",
                d.generation
            );
            checked += 1;
        }
    }
    assert!(checked >= 150);
}
