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
        target: Target::Exec {
            loader_direct: false,
        },
        at_ms,
        peer: None,
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
            established: false,
        }),
        at_ms: MON_0930,
        peer: None,
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
        r#"permit (principal in Trustbind::Role::"ops", action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"coreutils");
           permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"coreutils");"#,
    );
    let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
    let d = e.decide(&exec("web1", "bob", LS, MON_0930)).unwrap();
    assert!(allowed(&d));
    assert!(d.cacheable);
}

/// `ld.so ./prog`: the loader run as the program is `context.loader_direct`;
/// a policy can forbid it (here: unless the user is in role `ops`) while
/// the same file stays allowed as every program's loader, and such a
/// verdict is never cacheable (neither by the kernel nor in the bundle).
#[test]
fn loader_run_directly_is_its_own_context() {
    let f = fixture();
    activate(
        &f.store,
        r#"permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"coreutils");
           forbid (principal, action == Trustbind::Action::"exec", resource)
             when { context.loader_direct } unless { principal in Trustbind::Role::"ops" };"#,
    );
    let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
    let as_loader = e.decide(&exec("web1", "bob", LS, MON_0930)).unwrap();
    assert!(allowed(&as_loader));
    assert!(as_loader.cacheable);
    let mut direct = exec("web1", "bob", LS, MON_0930);
    direct.target = Target::Exec {
        loader_direct: true,
    };
    let d = e.decide(&direct).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    assert!(!d.cacheable);
    // The engine's own decision cache keeps the two apart, both ways.
    assert!(allowed(
        &e.decide(&exec("web1", "bob", LS, MON_0930)).unwrap()
    ));
    assert_eq!(e.decide(&direct).unwrap().outcome.verdict, Verdict::Deny);
}

/// The kernel's cache key has no session or ancestry: a verdict that reads
/// either must be asked every time.
#[test]
fn session_or_ancestry_policies_are_not_kernel_cacheable() {
    for cond in ["context.session == 7", "context.ancestry.isEmpty()"] {
        let f = fixture();
        activate(
            &f.store,
            &format!(
                r#"permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"coreutils")
                   when {{ {cond} }};"#
            ),
        );
        let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
        let d = e.decide(&exec("web1", "bob", LS, MON_0930)).unwrap();
        assert!(!d.cacheable, "{cond}");
    }
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

/// A UNIX-domain connect on `host` to `path` by `client`, the listener
/// running `server`.
fn ipc(host: &str, client: char, server: char, path: &str) -> QualifyRequest {
    QualifyRequest {
        host: host.into(),
        action: Action::IpcConnect,
        subject: subject("svc"),
        program: program(client),
        target: Target::Net(FiveTuple {
            proto: Proto::Unix,
            src_addr: String::new(),
            src_port: 0,
            dst_addr: path.into(),
            dst_port: 0,
            established: false,
        }),
        at_ms: MON_0930,
        peer: Some(program(server)),
    }
}

/// nginx may talk to postgres over its UNIX socket on any host of the web
/// group; nothing else is permitted.
const IPC_WEB_TO_DB: &str = r#"
@id("ipc-web-to-db")
permit (
    principal,
    action == Trustbind::Action::"ipc_connect",
    resource
) when {
    context.program in Trustbind::ProgramGroup::"web-servers" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"db-servers" &&
    context has peer_host && context.peer_host == context.host &&
    resource.proto == "unix" &&
    resource.host like "/run/postgresql/*"
};
"#;

#[test]
fn ipc_connect_is_decided_by_program_pair() {
    let f = fixture();
    activate(&f.store, IPC_WEB_TO_DB);
    let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
    let sock = "/run/postgresql/.s.PGSQL.5432";
    // The allowed pair.
    let d = e.decide(&ipc("web1", NGINX, POSTGRES, sock)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Allow, "{:?}", d.outcome);
    assert_eq!(d.outcome.reasons, vec!["ipc-web-to-db".to_owned()]);
    // Another client program, or another listener program: denied.
    let d = e.decide(&ipc("web1", NC, POSTGRES, sock)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    let d = e.decide(&ipc("web1", NGINX, NC, sock)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    // An unknown listener program (in no group): denied.
    let d = e.decide(&ipc("web1", NGINX, UNKNOWN, sock)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    // The socket's path is the resource.
    let d = e
        .decide(&ipc("web1", NGINX, POSTGRES, "@abstract"))
        .unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    // Without the listener's program the policy cannot match.
    let mut alone = ipc("web1", NGINX, POSTGRES, sock);
    alone.peer = None;
    assert_eq!(e.decide(&alone).unwrap().outcome.verdict, Verdict::Deny);
    // Decisions of different listeners are cached apart.
    let again = e.decide(&ipc("web1", NGINX, NC, sock)).unwrap();
    assert_eq!(again.outcome.verdict, Verdict::Deny);
    let again = e.decide(&ipc("web1", NGINX, POSTGRES, sock)).unwrap();
    assert_eq!(again.outcome.verdict, Verdict::Allow);
    // The peer round-trips through the audit's JSON form.
    let r = ipc("web1", NGINX, POSTGRES, sock);
    let back: QualifyRequest = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
    // Requests without a peer keep their old JSON form.
    let plain = serde_json::to_string(&net("web1", Action::Connect, NGINX, 5432)).unwrap();
    assert!(!plain.contains("peer"), "{plain}");
}

#[test]
fn unknown_host_and_mismatched_target_are_errors_naming_the_host() {
    let (_f, e) = engine_with_example();
    match e.decide(&exec("ghost", "bob", LS, MON_0930)) {
        Err(err @ PolicyError::UnknownHost(_)) => assert!(err.to_string().contains("ghost")),
        other => panic!("expected UnknownHost, got {other:?}"),
    }
    let mut r = exec("web1", "bob", LS, MON_0930);
    r.target = Target::file("/etc/passwd", None);
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
    r.target = Target::file("/etc/hosts", None);
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

// ---- slicing and the decision cache ----

use trustbind_appliance::policy::engine::EngineOptions;

const UNSLICED: EngineOptions = EngineOptions {
    slicing: false,
    cache_capacity: 0,
    class_cache: true,
    // The reference: every request decided by Cedar.
    compiled: false,
};

#[test]
fn a_policy_in_another_slice_is_not_evaluated() {
    let f = fixture();
    // Cedar itself skips a policy whose scope does not match, so the
    // erroring policy has an open scope and is filed by its conjunct
    // `context.program in ProgramGroup::"netcat"`; its first conjunct
    // overflows (an evaluation error) whenever it is evaluated.
    let boom = r#"@id("boom") permit (principal, action == Trustbind::Action::"open_read", resource)
                  when { context.time * 1000000000000 > 0 && context.program in Trustbind::ProgramGroup::"netcat" };
                  @id("etc") permit (principal, action == Trustbind::Action::"open_read", resource)
                  when { resource.path like "/etc/*" };"#;
    activate(&f.store, &format!("{EXAMPLE}\n{boom}"));
    let sliced = Engine::new(f.store.clone(), SCHEMA).unwrap();
    let whole = Engine::with_options(f.store.clone(), SCHEMA, UNSLICED).unwrap();
    assert!(sliced.slices() > 1);
    assert_eq!(whole.slices(), 0);

    let open = |prog: char| {
        let mut q = exec("web1", "bob", prog, MON_0930);
        q.action = Action::OpenRead;
        q.target = Target::file("/etc/hosts", None);
        q
    };
    let (s, w) = (
        sliced.decide(&open(LS)).unwrap(),
        whole.decide(&open(LS)).unwrap(),
    );
    assert_eq!(s.outcome.verdict, Verdict::Allow);
    assert_eq!(s.outcome.verdict, w.outcome.verdict);
    assert_eq!(s.outcome.reasons, w.outcome.reasons);
    assert_eq!(w.outcome.errors, 1, "unsliced evaluates the netcat policy");
    assert_eq!(s.outcome.errors, 0, "sliced does not");
    // Where it can apply, it is evaluated (and errors) either way.
    assert_eq!(sliced.decide(&open(NC)).unwrap().outcome.errors, 1);
    assert_eq!(whole.decide(&open(NC)).unwrap().outcome.errors, 1);
}

/// xorshift64*: deterministic and good enough to generate test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

const PROGS: [char; 8] = ['0', '1', '2', '3', '4', '5', '6', '7'];

fn random_policy(r: &mut Rng, i: usize) -> String {
    let g = |r: &mut Rng| format!("Trustbind::ProgramGroup::\"G{}\"", r.below(6));
    let effect = if r.chance(25) { "forbid" } else { "permit" };
    let principal = match r.below(4) {
        0 => format!("principal in Trustbind::Role::\"R{}\"", r.below(4)),
        1 => format!("principal == Trustbind::User::\"u{}\"", r.below(6)),
        _ => "principal".to_owned(),
    };
    let mut conds: Vec<String> = Vec::new();
    let (action, resource) = match r.below(4) {
        0 | 1 => {
            let res = match r.below(4) {
                0 => "resource".to_owned(),
                1 => format!(
                    "resource == Trustbind::Program::\"{}\"",
                    sha(*r.pick(&PROGS))
                ),
                _ => format!("resource in {}", g(r)),
            };
            (r#"action == Trustbind::Action::"exec""#.to_owned(), res)
        }
        2 => {
            if r.chance(70) {
                conds.push(format!("context.program in {}", g(r)));
            }
            if r.chance(50) {
                conds.push(r#"resource.path like "/etc/*""#.to_owned());
            }
            let a = if r.chance(50) {
                r#"action == Trustbind::Action::"open_read""#
            } else {
                r#"action in [Trustbind::Action::"open_read", Trustbind::Action::"open_write"]"#
            };
            (a.to_owned(), "resource".to_owned())
        }
        _ => {
            if r.chance(70) {
                conds.push(format!("context.program in {}", g(r)));
            }
            if r.chance(50) {
                conds.push(format!(
                    "context has peer_program && context.peer_program in {}",
                    g(r)
                ));
            }
            if r.chance(40) {
                conds.push("resource.port == 5432".to_owned());
            }
            let a = *r.pick(&[
                r#"action == Trustbind::Action::"connect""#,
                r#"action == Trustbind::Action::"accept""#,
                r#"action in [Trustbind::Action::"connect", Trustbind::Action::"accept"]"#,
            ]);
            (a.to_owned(), "resource".to_owned())
        }
    };
    if r.chance(30) {
        conds.push(format!("context.hour >= {}", r.below(24)));
    }
    if r.chance(20) {
        conds.push(r#"context.host in Trustbind::HostGroup::"web""#.to_owned());
    }
    if r.chance(15) {
        conds.push("context.session == 7".to_owned());
    }
    let when = if conds.is_empty() {
        String::new()
    } else {
        format!(" when {{ {} }}", conds.join(" && "))
    };
    let nice = if effect == "permit" && r.chance(30) {
        format!("@nice(\"{}\")\n", r.below(3))
    } else {
        String::new()
    };
    format!("@id(\"p{i}\")\n{nice}{effect} ({principal}, {action}, {resource}){when};\n")
}

fn random_request(r: &mut Rng) -> (QualifyRequest, Option<QualifyRequest>) {
    let user = format!("u{}", r.below(7));
    let host = *r.pick(&["web1", "db1", "lab1"]);
    let prog = *r.pick(&['0', '1', '2', '3', '4', '5', '6', '7', '9']);
    let at = MON_0930 + (r.below(7 * 24) as i64) * 3_600_000;
    let mut q = exec(host, &user, prog, at);
    q.subject.session = 7 + r.below(2) as u32;
    match r.below(4) {
        0 | 1 => (q, None),
        2 => {
            q.action = *r.pick(&[Action::OpenRead, Action::OpenWrite]);
            q.target = Target::file(r.pick(&["/etc/passwd", "/srv/data"]).to_string(), None);
            (q, None)
        }
        _ => {
            let port = *r.pick(&[5432, 80]);
            let mut c = net(host, Action::Connect, prog, port);
            c.subject.user = user;
            c.at_ms = at;
            let acc = ["web1", "db1"][r.below(2) as usize];
            let a = net(acc, Action::Accept, *r.pick(&PROGS), port);
            if r.chance(50) {
                (c, Some(a))
            } else {
                (c, None)
            }
        }
    }
}

#[test]
fn sliced_and_cached_decisions_equal_unsliced_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("appliance.db")).unwrap());
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for (g, m) in [
        ("web", Mode::Enforce),
        ("db", Mode::Enforce),
        ("lab", Mode::Permissive),
    ] {
        store.set_host_group(g, m, "admin:t").unwrap();
    }
    for (h, g) in [("web1", "web"), ("db1", "db"), ("lab1", "lab")] {
        store.add_pending_host(h, g, &sha('a'), "admin:t").unwrap();
    }
    for g in 0..6 {
        store.create_group(&format!("G{g}"), "", "admin:t").unwrap();
    }
    for c in PROGS {
        store
            .put_signature(
                &Signature {
                    sha256: sha(c),
                    sha1: None,
                    size: 1,
                    name: c.to_string(),
                    source: "admin".into(),
                },
                "admin:t",
            )
            .unwrap();
        for _ in 0..r.below(3) {
            store
                .add_member(&format!("G{}", r.below(6)), &sha(c), "admin:t")
                .unwrap();
        }
    }
    for u in 0..6 {
        let roles: Vec<String> = (0..r.below(3))
            .map(|_| format!("R{}", r.below(4)))
            .collect();
        let roles: Vec<&str> = roles.iter().map(String::as_str).collect();
        store
            .set_user_roles(&format!("u{u}"), &roles, "admin:t")
            .unwrap();
    }
    let text: String = (0..80).map(|i| random_policy(&mut r, i)).collect();
    activate(&store, &text);

    let sliced = Engine::new(store.clone(), SCHEMA).unwrap();
    let whole = Engine::with_options(store.clone(), SCHEMA, UNSLICED).unwrap();
    assert!(sliced.slices() > 10, "only {} slices", sliced.slices());
    let (mut allows, mut denies) = (0, 0);
    for _ in 0..1500 {
        let (q, peer) = random_request(&mut r);
        let run = |e: &Engine| match &peer {
            None => e.decide(&q).unwrap(),
            Some(a) => e.decide_pair(&q, a).unwrap(),
        };
        let w = run(&whole);
        for s in [run(&sliced), run(&sliced)] {
            assert_eq!(
                (&s.outcome.verdict, &s.outcome.reasons, s.outcome.would_deny),
                (&w.outcome.verdict, &w.outcome.reasons, w.outcome.would_deny),
                "request {q:?} peer {peer:?}\npolicies:\n{text}"
            );
            assert_eq!(s.groups, w.groups);
            // Slicing is finer, never coarser, about the clock.
            assert!(s.cacheable || !w.cacheable);
        }
        if allowed(&w) {
            allows += 1;
        } else {
            denies += 1;
        }
    }
    assert!(
        allows > 100 && denies > 100,
        "{allows} allows, {denies} denies"
    );
    let st = sliced.cache_stats();
    assert!(st.hits > 500, "{st:?}");
    assert_eq!(whole.cache_stats().hits, 0);
}

#[test]
fn cache_hits_repeat_requests_and_flushes_on_generation_move() {
    let (f, e) = engine_with_example();
    let ls = exec("web1", "bob", LS, MON_0930);
    let d1 = e.decide(&ls).unwrap();
    assert!(!d1.cache_hit);
    // Only exec-coreutils can apply to ls, and it does not read the clock.
    assert!(d1.cacheable);
    let d2 = e.decide(&ls).unwrap();
    assert!(d2.cache_hit);
    assert_eq!(d2.outcome, d1.outcome);
    assert_eq!(e.cache_stats().hits, 1);
    assert_eq!(e.cache_stats().misses, 1);
    // Its slice is decided without Cedar: kept under the request only.
    assert_eq!(e.cache_stats().entries, 1);

    // Keyed by hour and weekday where a candidate policy reads them.
    let t = exec("web1", "alice", TCPDUMP, MON_0930);
    assert!(allowed(&e.decide(&t).unwrap()));
    let mut t2 = t.clone();
    t2.at_ms += 60_000; // same hour
    let d = e.decide(&t2).unwrap();
    assert!(d.cache_hit && allowed(&d));
    let d = e.decide(&exec("web1", "alice", TCPDUMP, MON_2000)).unwrap();
    assert!(!d.cache_hit);
    assert_eq!(d.outcome.verdict, Verdict::Deny);

    // A change that moves the generation empties the cache.
    f.store
        .remove_member("coreutils", &sha(LS), "admin:t")
        .unwrap();
    let d = e.decide(&ls).unwrap();
    assert!(!d.cache_hit);
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    assert!(e.decide(&ls).unwrap().cache_hit);
}

#[test]
fn clock_reading_decisions_are_never_cached() {
    let f = fixture();
    activate(
        &f.store,
        r#"@id("t") permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"coreutils")
           when { context.time > 0 };"#,
    );
    let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
    let ls = exec("web1", "bob", LS, MON_0930);
    for _ in 0..3 {
        let d = e.decide(&ls).unwrap();
        assert!(allowed(&d) && !d.cache_hit && !d.cacheable);
    }
    assert_eq!(e.cache_stats().hits, 0);
    // Without a cache nothing is ever a hit either.
    let off = Engine::with_options(
        f.store.clone(),
        SCHEMA,
        EngineOptions {
            slicing: true,
            cache_capacity: 0,
            class_cache: true,
            compiled: true,
        },
    )
    .unwrap();
    let nc = exec("web1", "bob", NC, MON_0930);
    for _ in 0..3 {
        assert!(!off.decide(&nc).unwrap().cache_hit);
    }
}

// ---- group-commit audit writer ----

use trustbind_appliance::policy::engine::decision_event;
use trustbind_appliance::store::AuditWriter;

async fn concurrent_decisions_audited(n: i64) -> (Fixture, AuditWriter) {
    let (f, e) = engine_with_example();
    let e = Arc::new(e);
    let before = f.store.verify_audit().unwrap().unwrap();
    let w = AuditWriter::spawn(f.store.clone());
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (w, e) = (w.clone(), e.clone());
        set.spawn(async move {
            let q = exec("web1", &format!("u{i}"), LS, MON_0930 + i);
            let d = e.decide(&q).unwrap();
            let row = w.append(decision_event(&q, &d)).await.unwrap();
            (q, d, row)
        });
    }
    let mut seqs = Vec::new();
    let mut acked = Vec::new();
    while let Some(r) = set.join_next().await {
        let (q, d, row) = r.unwrap();
        assert_eq!(row.kind, "decision");
        assert_eq!(row.actor, "web1");
        seqs.push(row.seq);
        acked.push((q, d, row));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, ((before + 1)..=(before + n)).collect::<Vec<_>>());
    assert_eq!(f.store.verify_audit().unwrap(), Ok(before + n));

    // Acknowledged means stored: a fresh handle on the file reads every
    // acknowledged row back, and the request round-trips for replay.
    let other = Store::open(&f._dir.path().join("appliance.db")).unwrap();
    let stored = other.audit_rows(before, u32::MAX).unwrap();
    assert_eq!(stored.len() as i64, n);
    for (q, d, row) in acked {
        let s = stored.iter().find(|s| s.seq == row.seq).unwrap();
        assert_eq!(s, &row);
        let detail: serde_json::Value = serde_json::from_str(&s.detail).unwrap();
        let back: QualifyRequest = serde_json::from_value(detail["request"].clone()).unwrap();
        assert_eq!(back, q);
        assert_eq!(detail["outcome"], serde_json::to_value(&d.outcome).unwrap());
        assert_eq!(d.outcome.verdict, Verdict::Allow);
        assert_eq!(detail["generation"], d.generation);
    }
    assert_eq!(w.stats().appended, n as u64);
    (f, w)
}

#[tokio::test]
async fn writer_batches_concurrent_appends_into_one_chain() {
    let (_f, w) = concurrent_decisions_audited(200).await;
    // All 200 tasks queue before the writer task runs again on this
    // single-threaded runtime, so they share commits.
    let st = w.stats();
    assert!(st.batches < st.appended, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_keeps_one_chain_on_two_workers() {
    let (f, w) = concurrent_decisions_audited(300).await;
    // Direct appends interleave with the writer's batches on one chain.
    f.store
        .append_audit(&trustbind_appliance::store::AuditEvent::new(
            "test",
            "appliance",
            serde_json::json!({}),
        ))
        .unwrap();
    let row = w
        .append(trustbind_appliance::store::AuditEvent::new(
            "test",
            "appliance",
            serde_json::json!({ "n": 2 }),
        ))
        .await
        .unwrap();
    assert_eq!(f.store.verify_audit().unwrap(), Ok(row.seq));
}
