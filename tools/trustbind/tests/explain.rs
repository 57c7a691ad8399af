//! `trustbind explain` against a real admin API: a recorded default deny
//! and a forbid, by audit sequence number and asked directly.

mod common;

use std::sync::Arc;

use common::{exec, policies, sha, Appliance};
use trustbind_appliance::policy::engine::{decision_event, Engine};
use trustbind_appliance::request::QualifyRequest;
use trustbind_appliance::store::{Mode, Signature};

const SCHEMA: &str = include_str!("../../../policies/trustbind.cedarschema");

/// web1 (web, enforce) under baseline; `shutdown` in system and root-tools.
fn appliance() -> Appliance {
    let a = Appliance::start();
    let s = &a.store;
    s.set_host_group("web", Mode::Enforce, "t").unwrap();
    s.add_pending_host("web1", "web", &sha('a'), "t").unwrap();
    for g in ["system", "root-tools"] {
        s.create_group(g, "", "t").unwrap();
    }
    s.put_signature(
        &Signature {
            sha256: sha('2'),
            sha1: None,
            size: 1,
            name: "shutdown".into(),
            source: "admin".into(),
        },
        "t",
    )
    .unwrap();
    s.add_member("system", &sha('2'), "t").unwrap();
    s.add_member("root-tools", &sha('2'), "t").unwrap();
    s.set_user_roles("bob", &[], "t").unwrap();
    let text = std::fs::read_to_string(policies().join("baseline.cedar")).unwrap();
    let id = s.create_policy_draft(&text, "", "t").unwrap();
    s.activate_policy(id, "t").unwrap();
    a
}

/// Decides `r` as the decision path would and audits it; its sequence number.
fn record(a: &Appliance, r: &QualifyRequest) -> i64 {
    let e = Engine::new(Arc::clone(&a.store), SCHEMA).unwrap();
    let d = e.decide(r).unwrap();
    a.store.append_audit(&decision_event(r, &d)).unwrap().seq
}

#[test]
fn explain_a_recorded_default_deny_and_a_forbid() {
    let a = appliance();
    let unknown = record(&a, &exec("bob", '9', "/tmp/evil"));
    let t = a.text(&["explain", &unknown.to_string()]);
    println!("$ trustbind explain {unknown}\n{t}");
    assert!(t.contains("host web1, user bob, exec 9999"), "{t}");
    assert!(
        t.contains("): deny\n  no policy forbade it and none permitted it: default deny\n"),
        "{t}"
    );
    assert!(
        t.contains("    - the program is in no reference group\n"),
        "{t}"
    );
    assert!(t.contains("    - permit `exec-approved-system-programs`: needs the program in group `system` (it is in: none)\n"), "{t}");
    assert!(
        t.contains("Cedar deny: no determining policy (default deny)"),
        "{t}"
    );

    let forbid = record(&a, &exec("bob", '2', "/usr/sbin/shutdown"));
    let t = a.text(&["explain", &forbid.to_string()]);
    println!("$ trustbind explain {forbid}\n{t}");
    assert!(
        t.contains("  forbidden by: root-tools-only-for-admins\n  alerts: soc\n"),
        "{t}"
    );
    assert!(
        t.contains("forbidden by `root-tools-only-for-admins`"),
        "{t}"
    );
    assert!(t.contains("program's groups: root-tools, system"), "{t}");

    let j = a.json(&["explain", &forbid.to_string()]);
    assert_eq!(j["recorded"]["reasons"][0], "root-tools-only-for-admins");
    assert_eq!(j["now"]["determining"][0]["effect"], "forbid");

    // The chain with the diagnoses in it verifies.
    let v = a.json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");

    // A row that is no decision is refused, naming it.
    let err = a.fails(&["explain", "1"], 5);
    assert!(err.contains("only `decision` rows are explained"), "{err}");
}

#[test]
fn explain_a_request_asked_directly() {
    let a = appliance();
    // A local file is hashed: unknown to the appliance.
    let f = a.dir.path().join("tool");
    std::fs::write(&f, b"#!/bin/sh\necho hi\n").unwrap();
    let path = f.to_str().unwrap();
    let t = a.text(&[
        "explain",
        "--host",
        "web1",
        "--user",
        "bob",
        "--program",
        path,
        "--action",
        "exec",
    ]);
    println!("$ trustbind explain --host web1 --user bob --program {path} --action exec\n{t}");
    assert!(t.starts_with("request: host web1, user bob, exec "), "{t}");
    assert!(t.contains("now (policy version 1, generation"), "{t}");
    assert!(t.contains("    - permit `exec-root-tools-as-admin`: needs the user in Role \"admin\" (user `bob` has roles: none)\n"), "{t}");

    let two = sha('2');
    let ask = |host: &'static str, action: &'static str| {
        [
            "explain",
            "--host",
            host,
            "--user",
            "bob",
            "--program",
            &two,
            "--action",
            action,
        ]
    };
    let t = a.text(&ask("web1", "exec"));
    assert!(
        t.contains("forbidden by `root-tools-only-for-admins`"),
        "{t}"
    );

    // Errors name the field.
    let err = a.fails(&ask("web1", "open_read"), 5);
    assert!(err.contains("needs a resource"), "{err}");
    let err = a.fails(&ask("nosuch", "exec"), 5);
    assert!(err.contains("`nosuch`"), "{err}");
}
