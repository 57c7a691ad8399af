//! The example policy sets in `policies/`: each validates (offline, as the
//! CLI does) and does what its README entry says, decided by the real
//! engine over a real SQLite store in a temporary directory.

use std::collections::BTreeMap;
use std::sync::Arc;

use assert_cmd::Command;
use trustbind_appliance::policy::engine::{Decision, Engine};
use trustbind_appliance::policy::Verdict;
use trustbind_appliance::request::{
    Action, FiveTuple, Program, Proto, QualifyRequest, Subject, Target,
};
use trustbind_appliance::store::{Mode, Signature, Store};

const SCHEMA: &str = include_str!("../../../policies/trustbind.cedarschema");

fn set(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../policies")
        .join(format!("{name}.cedar"));
    std::fs::read_to_string(p).unwrap()
}

/// Monday 2024-01-01 09:30 UTC.
const MON_0930: i64 = 1_704_101_400_000;
/// Monday 2024-01-01 20:00 UTC.
const MON_2000: i64 = 1_704_139_200_000;
/// Saturday 2024-01-06 09:30 UTC.
const SAT_0930: i64 = 1_704_533_400_000;
/// Monday 2024-01-01 07:59:59 UTC.
const MON_0759: i64 = 1_704_095_999_000;
/// Monday 2024-01-01 18:00 UTC.
const MON_1800: i64 = 1_704_132_000_000;

fn sha(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

const LS: char = '1';
const SHUTDOWN: char = '2';
const PGDUMP: char = '3';
const NGINX: char = '4';
const POSTGRES: char = '5';
const APP: char = '6';
const NC: char = '7';
const UNKNOWN: char = '9';

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
}

/// Host web1 (group web) and db1 (group db), both enforcing; programs in the
/// groups the example sets name; alice is an admin, bob is not.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("appliance.db")).unwrap());
    for g in ["web", "db"] {
        store.set_host_group(g, Mode::Enforce, "admin:t").unwrap();
    }
    store
        .add_pending_host("web1", "web", &sha('a'), "admin:t")
        .unwrap();
    store
        .add_pending_host("db1", "db", &sha('b'), "admin:t")
        .unwrap();
    let members: &[(char, &str, &[&str])] = &[
        (LS, "ls", &["system"]),
        (SHUTDOWN, "shutdown", &["system", "root-tools"]),
        (PGDUMP, "pg_dump", &["system", "maintenance-tools"]),
        (NGINX, "nginx", &["system", "web-servers"]),
        (POSTGRES, "postgres", &["system", "db-servers"]),
        (APP, "app", &["system", "app-clients"]),
        (NC, "nc", &["system"]),
    ];
    for g in [
        "system",
        "root-tools",
        "maintenance-tools",
        "web-servers",
        "db-servers",
        "app-clients",
    ] {
        store.create_group(g, "", "admin:t").unwrap();
    }
    for (c, name, groups) in members {
        store
            .put_signature(
                &Signature {
                    sha256: sha(*c),
                    sha1: None,
                    size: 1,
                    name: (*name).into(),
                    source: "test".into(),
                },
                "admin:t",
            )
            .unwrap();
        for g in *groups {
            store.add_member(g, &sha(*c), "admin:t").unwrap();
        }
    }
    store
        .set_user_roles("alice", &["admin"], "admin:t")
        .unwrap();
    store.set_user_roles("bob", &[], "admin:t").unwrap();
    Fixture { _dir: dir, store }
}

fn engine_with(name: &str) -> (Fixture, Engine) {
    let f = fixture();
    let id = f
        .store
        .create_policy_draft(&set(name), "", "admin:t")
        .unwrap();
    f.store.activate_policy(id, "admin:t").unwrap();
    let e = Engine::new(f.store.clone(), SCHEMA).unwrap();
    (f, e)
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
        ancestry: vec![],
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

fn exec(user: &str, prog: char, at_ms: i64) -> QualifyRequest {
    QualifyRequest {
        host: "web1".into(),
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

fn open(prog: char, action: Action) -> QualifyRequest {
    QualifyRequest {
        host: "web1".into(),
        action,
        subject: subject("bob"),
        program: program(prog),
        target: Target::file("/etc/hosts", None),
        at_ms: MON_0930,
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

fn obligations(d: &Decision) -> BTreeMap<String, String> {
    match &d.outcome.verdict {
        Verdict::AllowWithConditions { obligations } => obligations.clone(),
        _ => BTreeMap::new(),
    }
}

#[test]
fn every_set_validates_offline() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    for name in [
        "baseline",
        "web-tier",
        "rollout-permissive",
        "office-hours",
        "example",
    ] {
        Command::cargo_bin("trustbind")
            .unwrap()
            .args(["policy", "validate"])
            .arg(dir.join(format!("{name}.cedar")))
            .assert()
            .success();
    }
}

#[test]
fn baseline() {
    let (_f, e) = engine_with("baseline");
    // Approved programs run, for anyone.
    assert_eq!(
        e.decide(&exec("bob", LS, MON_0930))
            .unwrap()
            .outcome
            .verdict,
        Verdict::Allow
    );
    // Unknown programs are denied.
    let d = e.decide(&exec("alice", UNKNOWN, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    // Root-only tools: denied for bob although approved, allowed for the admin.
    let d = e.decide(&exec("bob", SHUTDOWN, MON_0930)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    assert_eq!(d.outcome.reasons, vec!["root-tools-only-for-admins"]);
    let d = e.decide(&exec("alice", SHUTDOWN, MON_0930)).unwrap();
    assert!(allowed(&d));
    assert_eq!(
        obligations(&d).get("alert").map(String::as_str),
        Some("soc")
    );
    // Files: approved programs yes, unknown no.
    assert!(allowed(&e.decide(&open(LS, Action::OpenRead)).unwrap()));
    assert!(allowed(&e.decide(&open(LS, Action::OpenWrite)).unwrap()));
    assert!(!allowed(
        &e.decide(&open(UNKNOWN, Action::OpenRead)).unwrap()
    ));
}

#[test]
fn web_tier() {
    let (_f, e) = engine_with("web-tier");
    let enc = BTreeMap::from([("encrypt".to_owned(), "required".to_owned())]);
    // The web server accepts on 80 and 443, encrypted.
    for port in [80, 443] {
        let d = e.decide(&net("web1", Action::Accept, NGINX, port)).unwrap();
        assert_eq!(obligations(&d), enc, "port {port}");
    }
    // Nothing else may accept there.
    for p in [NC, APP, POSTGRES, UNKNOWN] {
        let d = e.decide(&net("web1", Action::Accept, p, 443)).unwrap();
        assert!(!allowed(&d), "{p} accepted on 443");
    }
    // The web server may not accept on other ports either (no permit).
    assert!(!allowed(
        &e.decide(&net("web1", Action::Accept, NGINX, 8080)).unwrap()
    ));
    // Only the app client connects to the database port, encrypted.
    let d = e.decide(&net("web1", Action::Connect, APP, 5432)).unwrap();
    assert_eq!(obligations(&d), enc);
    for p in [NC, NGINX, UNKNOWN] {
        let d = e.decide(&net("web1", Action::Connect, p, 5432)).unwrap();
        assert!(!allowed(&d), "{p} connected to 5432");
        assert_eq!(
            d.outcome.reasons,
            vec!["only-app-clients-to-db-port"],
            "{p}"
        );
    }
    // The database accepts the app client (pair decision), not netcat.
    let d = e
        .decide_pair(
            &net("web1", Action::Connect, APP, 5432),
            &net("db1", Action::Accept, POSTGRES, 5432),
        )
        .unwrap();
    assert_eq!(obligations(&d), enc);
    let d = e
        .decide_pair(
            &net("web1", Action::Connect, NC, 5432),
            &net("db1", Action::Accept, POSTGRES, 5432),
        )
        .unwrap();
    assert!(!allowed(&d));
    // An uncorrelated accept on 5432 (no known peer) is refused.
    assert!(!allowed(
        &e.decide(&net("db1", Action::Accept, POSTGRES, 5432))
            .unwrap()
    ));
}

#[test]
fn rollout_permissive() {
    let (_f, e) = engine_with("rollout-permissive");
    let audit = BTreeMap::from([("log_level".to_owned(), "audit".to_owned())]);
    let reqs = [
        exec("bob", UNKNOWN, MON_2000),
        exec("bob", SHUTDOWN, SAT_0930),
        open(UNKNOWN, Action::OpenWrite),
        open(UNKNOWN, Action::Delete),
        net("web1", Action::Connect, NC, 5432),
        net("web1", Action::Accept, UNKNOWN, 443),
    ];
    for r in &reqs {
        let d = e.decide(r).unwrap();
        assert_eq!(obligations(&d), audit, "{r:?}");
        assert_eq!(d.outcome.reasons, vec!["allow-and-audit-everything"]);
    }
}

#[test]
fn office_hours() {
    let (_f, e) = engine_with("office-hours");
    // The maintenance tool: Monday 09:30 yes, with obligations.
    let d = e.decide(&exec("bob", PGDUMP, MON_0930)).unwrap();
    assert_eq!(
        obligations(&d),
        BTreeMap::from([
            ("alert".to_owned(), "ops".to_owned()),
            ("nice".to_owned(), "10".to_owned())
        ])
    );
    assert!(!d.cacheable, "a clock-dependent verdict must not be cached");
    // Edges of the window and the weekend: no, although it is also approved.
    for (t, what) in [
        (MON_0759, "07:59"),
        (MON_1800, "18:00"),
        (MON_2000, "20:00"),
        (SAT_0930, "Saturday"),
    ] {
        let d = e.decide(&exec("bob", PGDUMP, t)).unwrap();
        assert_eq!(d.outcome.verdict, Verdict::Deny, "{what}");
        assert_eq!(
            d.outcome.reasons,
            vec!["maintenance-tools-outside-office-hours"],
            "{what}"
        );
    }
    // Other approved programs at any time; unknown ones never.
    assert!(allowed(&e.decide(&exec("bob", LS, SAT_0930)).unwrap()));
    assert!(!allowed(
        &e.decide(&exec("bob", UNKNOWN, MON_0930)).unwrap()
    ));
}
