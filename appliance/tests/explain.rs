//! Explanations: which policies decided, the entity data, and for a
//! default deny what each permit lacked, both from `Engine::explain` and
//! in the diagnosis a deny's audit row carries.

use std::sync::Arc;

use trustbind_appliance::policy::engine::{decision_event, Engine};
use trustbind_appliance::policy::Verdict;
use trustbind_appliance::request::{Action, Program, QualifyRequest, Subject, Target};
use trustbind_appliance::store::{Mode, Signature, Store};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");
const BASELINE: &str = include_str!("../../policies/baseline.cedar");

fn sha(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

const LS: char = '1';
const SHUTDOWN: char = '2';
const UNKNOWN: char = '9';

/// web1 in host group web (enforce), lab1 in lab (permissive); `ls` in
/// `system`, `shutdown` in `system` and `root-tools`; alice is an admin,
/// bob has no role.
fn store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("a.db")).unwrap());
    store.set_host_group("web", Mode::Enforce, "t").unwrap();
    store.set_host_group("lab", Mode::Permissive, "t").unwrap();
    store
        .add_pending_host("web1", "web", &sha('a'), "t")
        .unwrap();
    store
        .add_pending_host("lab1", "lab", &sha('b'), "t")
        .unwrap();
    store.create_group("system", "", "t").unwrap();
    store.create_group("root-tools", "", "t").unwrap();
    for (c, name, groups) in [
        (LS, "ls", &["system"][..]),
        (SHUTDOWN, "shutdown", &["system", "root-tools"][..]),
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
                "t",
            )
            .unwrap();
        for g in groups {
            store.add_member(g, &sha(c), "t").unwrap();
        }
    }
    store.set_user_roles("alice", &["admin"], "t").unwrap();
    store.set_user_roles("bob", &[], "t").unwrap();
    (dir, store)
}

fn activate(store: &Store, text: &str) {
    let id = store.create_policy_draft(text, "", "t").unwrap();
    store.activate_policy(id, "t").unwrap();
}

fn request(host: &str, user: &str, action: Action, prog: char, target: Target) -> QualifyRequest {
    QualifyRequest {
        host: host.into(),
        action,
        subject: Subject {
            user: user.into(),
            uid: 1000,
            euid: 1000,
            gid: 1000,
            loginuid: 1000,
            session: 3,
            pid: 77,
            ancestry: vec![],
        },
        program: Program {
            sha256: sha(prog),
            sha1: std::iter::repeat_n(prog, 40).collect(),
            size: 1,
            path: format!("/usr/bin/p{prog}"),
        },
        target,
        at_ms: 1_704_101_400_000,
        peer: None,
    }
}

fn exec(host: &str, user: &str, prog: char) -> QualifyRequest {
    request(
        host,
        user,
        Action::Exec,
        prog,
        Target::Exec {
            loader_direct: false,
        },
    )
}

fn engine(text: Option<&str>) -> (tempfile::TempDir, Arc<Store>, Engine) {
    let (dir, store) = store();
    if let Some(t) = text {
        activate(&store, t);
    }
    let e = Engine::new(Arc::clone(&store), SCHEMA).unwrap();
    (dir, store, e)
}

#[test]
fn default_deny_says_what_each_permit_lacked() {
    let (_d, store, e) = engine(Some(BASELINE));
    let r = exec("web1", "bob", UNKNOWN);
    let d = e.decide(&r).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    assert!(d.outcome.reasons.is_empty());
    let diag = d
        .outcome
        .explain
        .as_deref()
        .expect("a deny carries a diagnosis");
    assert_eq!(diag.host_group, "web");
    assert!(diag.roles.is_empty());
    assert!(diag.groups.is_empty());
    assert_eq!(
        diag.missing,
        vec![
            "the program is in no reference group".to_owned(),
            "permit `exec-approved-system-programs`: needs the program in group `system` (it is in: none)".to_owned(),
            "permit `exec-root-tools-as-admin`: needs the user in Role \"admin\" (user `bob` has roles: none)".to_owned(),
        ]
    );

    // The audit row carries it, and the chain still verifies.
    let row = store.append_audit(&decision_event(&r, &d)).unwrap();
    let detail: serde_json::Value = serde_json::from_str(&row.detail).unwrap();
    assert_eq!(
        detail["outcome"]["explain"]["missing"][1],
        "permit `exec-approved-system-programs`: needs the program in group `system` (it is in: none)"
    );
    assert_eq!(store.verify_audit().unwrap().unwrap(), row.seq);

    // The same from explain, which names no determining policy.
    let x = e.explain(&r).unwrap();
    assert_eq!(x.decision, "deny");
    assert!(x.determining.is_empty());
    assert_eq!(x.missing, diag.missing);

    // An admin's unknown program lacks the group only: alice has the role,
    // so the admin permit's principal holds and its resource scope does not.
    let x = e.explain(&exec("web1", "alice", UNKNOWN)).unwrap();
    assert_eq!(
        x.missing[2],
        "permit `exec-root-tools-as-admin`: needs the program in group `root-tools` (it is in: none)"
    );
    assert_eq!(x.roles, vec!["admin".to_owned()]);
}

#[test]
fn a_forbid_is_named_with_its_alert_and_nothing_is_missing() {
    let (_d, _s, e) = engine(Some(BASELINE));
    let r = exec("web1", "bob", SHUTDOWN);
    let d = e.decide(&r).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    assert_eq!(d.outcome.reasons, vec!["root-tools-only-for-admins"]);
    assert_eq!(d.outcome.alerts, vec!["soc"]);
    let diag = d.outcome.explain.as_deref().unwrap();
    assert!(diag.missing.is_empty(), "{:?}", diag.missing);
    assert_eq!(
        diag.groups,
        vec!["root-tools".to_owned(), "system".to_owned()]
    );

    let x = e.explain(&r).unwrap();
    assert_eq!(x.decision, "deny");
    assert_eq!(x.determining.len(), 1);
    assert_eq!(x.determining[0].name, "root-tools-only-for-admins");
    assert_eq!(x.determining[0].effect, "forbid");
    assert_eq!(x.alerts, vec!["soc"]);

    // The admin is allowed by both permits; the admin one alerts.
    let r = exec("web1", "alice", SHUTDOWN);
    let d = e.decide(&r).unwrap();
    assert_ne!(d.outcome.verdict, Verdict::Deny);
    assert!(d.outcome.explain.is_none());
    assert_eq!(d.outcome.alerts, vec!["soc"]);
    let x = e.explain(&r).unwrap();
    let names: Vec<(&str, &str)> = x
        .determining
        .iter()
        .map(|p| (p.name.as_str(), p.effect))
        .collect();
    assert_eq!(
        names,
        vec![
            ("exec-approved-system-programs", "permit"),
            ("exec-root-tools-as-admin", "permit")
        ]
    );
    assert!(x.missing.is_empty());

    // An allowed program without @alert raises none.
    let d = e.decide(&exec("web1", "bob", LS)).unwrap();
    assert!(d.outcome.alerts.is_empty());
}

#[test]
fn permissive_would_deny_carries_the_diagnosis() {
    let (_d, _s, e) = engine(Some(BASELINE));
    let d = e.decide(&exec("lab1", "bob", UNKNOWN)).unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Allow);
    assert!(d.outcome.would_deny);
    let diag = d.outcome.explain.as_deref().unwrap();
    assert_eq!(diag.host_group, "lab");
    assert_eq!(diag.missing[0], "the program is in no reference group");
}

#[test]
fn no_policy_and_no_permit_for_the_action() {
    let (_d, _s, e) = engine(None);
    let x = e.explain(&exec("web1", "bob", LS)).unwrap();
    assert_eq!(x.policy_version, None);
    assert_eq!(
        x.missing,
        vec!["no policy is active: everything is denied by default".to_owned()]
    );

    let only_exec =
        "@id(\"run\")\npermit (principal, action == Trustbind::Action::\"exec\", resource);\n";
    let (_d, _s, e) = engine(Some(only_exec));
    let r = request(
        "web1",
        "bob",
        Action::OpenWrite,
        LS,
        Target::file("/etc/passwd", None),
    );
    let d = e.decide(&r).unwrap();
    assert_eq!(
        d.outcome.explain.as_deref().unwrap().missing,
        vec!["no permit policy covers action `open_write`".to_owned()]
    );
}

#[test]
fn host_group_program_conjuncts_and_other_conditions() {
    let text = r#"
@id("db-hosts-only")
permit (principal, action == Trustbind::Action::"exec", resource)
when { context.host in Trustbind::HostGroup::"db" };

@id("files-by-system-programs")
permit (principal, action == Trustbind::Action::"open_read", resource)
when { context.program in Trustbind::ProgramGroup::"system" };

@id("office-hours")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"system")
when { context.hour >= 22 && context.weekday < 5 };
"#;
    let (_d, _s, e) = engine(Some(text));
    let x = e.explain(&exec("web1", "bob", LS)).unwrap();
    assert_eq!(x.decision, "deny");
    assert_eq!(
        x.missing,
        vec![
            "permit `db-hosts-only`: needs context.host in HostGroup \"db\" (host `web1` is in host group `web`)".to_owned(),
            "permit `office-hours`: its scope matched but its conditions were false (they use context.hour, context.weekday)".to_owned(),
        ]
    );
    let r = request(
        "web1",
        "bob",
        Action::OpenRead,
        UNKNOWN,
        Target::file("/etc/hosts", None),
    );
    let x = e.explain(&r).unwrap();
    assert_eq!(
        x.missing,
        vec![
            "the program is in no reference group".to_owned(),
            "permit `files-by-system-programs`: needs context.program in ProgramGroup \"system\" (it is in: none)".to_owned(),
        ]
    );
}

#[test]
fn explain_of_an_unknown_host_names_it() {
    let (_d, _s, e) = engine(Some(BASELINE));
    let err = e.explain(&exec("nosuch", "bob", LS)).unwrap_err();
    assert!(err.to_string().contains("`nosuch`"), "{err}");
}

#[test]
fn many_permits_are_listed_up_to_eight_then_counted() {
    let text: String = (0..11)
        .map(|i| {
            format!(
                "@id(\"p{i:02}\")\npermit (principal, action == Trustbind::Action::\"exec\", resource in Trustbind::ProgramGroup::\"g{i:02}\");\n"
            )
        })
        .collect();
    let (_d, _s, e) = engine(Some(&text));
    let x = e.explain(&exec("web1", "bob", UNKNOWN)).unwrap();
    assert_eq!(x.missing.len(), 1 + 8 + 1, "{:?}", x.missing);
    assert_eq!(
        x.missing[1],
        "permit `p00`: needs the program in group `g00` (it is in: none)"
    );
    assert!(x.missing[8].starts_with("permit `p07`:"), "{:?}", x.missing);
    assert_eq!(
        x.missing[9],
        "… and 3 more permits of `exec` (listed by name) did not apply"
    );
}
