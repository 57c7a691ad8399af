//! `trustbind policy test DRAFT --replay-audit`: recorded decisions (made by
//! the real engine under the active policy and written to the audit log as
//! the agent API does) are re-decided against a draft; exactly the expected
//! changes are reported.

mod common;

use std::sync::Arc;

use common::{exec, policies, sha, Appliance};
use predicates::prelude::*;
use trustbind_appliance::policy::engine::{decision_event, Engine};
use trustbind_appliance::request::QualifyRequest;
use trustbind_appliance::store::{Mode, Signature, Store};

const SCHEMA: &str = include_str!("../../../policies/trustbind.cedarschema");

/// What was governing while the decisions were recorded: every exec allowed.
const ALLOW_ALL_EXEC: &str = "@id(\"allow-all-exec\")\npermit (principal, action == Trustbind::Action::\"exec\", resource);\n";

/// Decides `reqs` with the store's active policy and records them.
fn record(store: &Arc<Store>, reqs: &[QualifyRequest]) {
    let e = Engine::new(Arc::clone(store), SCHEMA).unwrap();
    let evs: Vec<_> = reqs
        .iter()
        .map(|r| decision_event(r, &e.decide(r).unwrap()))
        .collect();
    store.append_audit_batch(&evs).unwrap();
}

#[test]
fn replay_finds_exactly_the_changed_decisions() {
    let a = Appliance::start();
    let s = &a.store;
    s.set_host_group("web", Mode::Enforce, "admin:t").unwrap();
    s.add_pending_host("web1", "web", &sha('f'), "admin:t")
        .unwrap();
    for g in ["system", "root-tools"] {
        s.create_group(g, "", "admin:t").unwrap();
    }
    for (c, name, groups) in [
        ('1', "ls", &["system"][..]),
        ('2', "shutdown", &["system", "root-tools"][..]),
    ] {
        s.put_signature(
            &Signature {
                sha256: sha(c),
                sha1: None,
                size: 1,
                name: name.into(),
                source: "t".into(),
            },
            "admin:t",
        )
        .unwrap();
        for g in groups {
            s.add_member(g, &sha(c), "admin:t").unwrap();
        }
    }
    s.set_user_roles("alice", &["admin"], "admin:t").unwrap();
    s.set_user_roles("bob", &[], "admin:t").unwrap();
    let id = s
        .create_policy_draft(ALLOW_ALL_EXEC, "", "admin:t")
        .unwrap();
    s.activate_policy(id, "admin:t").unwrap();

    // Before the window: a decision that would change but must not be listed.
    record(s, &[exec("carol", '9', "/tmp/old-unknown")]);
    // Start the window at the next whole second.
    let start_s = trustbind_appliance::policy::engine::clock(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    )
    .0 + 1;
    while (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64)
        < start_s * 1000
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    record(
        s,
        &[
            exec("bob", '1', "/usr/bin/ls"),          // allow -> allow
            exec("bob", '2', "/usr/sbin/shutdown"),   // allow -> deny (root tool)
            exec("alice", '2', "/usr/sbin/shutdown"), // allow -> allow{alert=soc}
            exec("bob", '9', "/tmp/unknown"),         // allow -> deny (unknown)
            exec("bob", '9', "/tmp/unknown"),         // the same again
            exec("alice", '1', "/usr/bin/ls"),        // allow -> allow
        ],
    );
    // Non-decision rows in the window are ignored.
    a.text(&["group", "create", "noise"]);

    let since = format!("@{start_s}");
    let baseline = policies().join("baseline.cedar");
    let out = a
        .tb()
        .args(["-o", "json", "policy", "test"])
        .arg(&baseline)
        .args(["--replay-audit", "--since", &since])
        .assert()
        .code(1)
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["replayed"], 6, "{v:#}");
    assert_eq!(v["unchanged"], 2, "{v:#}");
    assert_eq!(v["changed"], 4, "{v:#}");
    let mut got: Vec<(String, String, String, String, u64)> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["user"].as_str().unwrap().to_owned(),
                c["program"].as_str().unwrap().to_owned(),
                c["old"].as_str().unwrap().to_owned(),
                c["new"].as_str().unwrap().to_owned(),
                c["count"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    let p2 = format!("/usr/sbin/shutdown ({})", &sha('2')[..12]);
    let p9 = format!("/tmp/unknown ({})", &sha('9')[..12]);
    assert_eq!(
        got,
        vec![
            (
                "alice".into(),
                p2.clone(),
                "allow".into(),
                "allow{alert=soc}".into(),
                1
            ),
            ("bob".into(), p9, "allow".into(), "deny".into(), 2),
            ("bob".into(), p2, "allow".into(), "deny".into(), 1),
        ]
    );
    let bob_shutdown = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["user"] == "bob" && c["new"] == "deny" && c["count"] == 1)
        .unwrap();
    assert_eq!(
        bob_shutdown["new_reasons"],
        serde_json::json!(["root-tools-only-for-admins"])
    );

    // The same draft uploaded and named by version; text output.
    let up = a.json(&["policy", "upload", baseline.to_str().unwrap()]);
    let vid = up["upload"]["id"].as_i64().unwrap().to_string();
    let text = a
        .tb()
        .args(["policy", "test", &vid, "--replay-audit", "--since", &since])
        .assert()
        .code(1)
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("4 decision(s) would change (3 distinct)"),
        "{text}"
    );
    assert!(text.contains("allow -> deny"), "{text}");
    assert!(text.contains("root-tools-only-for-admins"), "{text}");

    // A draft identical in effect: nothing changes, exit 0.
    let same = a.dir.path().join("same.cedar");
    std::fs::write(&same, ALLOW_ALL_EXEC).unwrap();
    a.tb()
        .args(["policy", "test"])
        .arg(&same)
        .args(["--replay-audit", "--since", &since])
        .assert()
        .success()
        .stdout(predicate::str::contains("no decision would change"));

    // An invalid draft is refused before anything is replayed.
    let bad = a.dir.path().join("bad.cedar");
    std::fs::write(&bad, "permit(principal, action, resource) when { 1 + };").unwrap();
    a.tb()
        .args(["policy", "test"])
        .arg(&bad)
        .args(["--replay-audit"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("does not validate"));
}

/// File decisions replay over the appliance's file sets (mirrored): the
/// database server's reads of its data directory stay allowed under
/// `file-protection.cedar` only because the file is in `FileSet::"pgdata"`.
#[test]
fn replay_covers_file_decisions_with_the_file_sets() {
    use trustbind_appliance::request::{Action, Target};
    use trustbind_appliance::store::FileSetEdit;
    let a = Appliance::start();
    let s = &a.store;
    s.set_host_group("web", Mode::Enforce, "admin:t").unwrap();
    s.add_pending_host("web1", "web", &sha('f'), "admin:t")
        .unwrap();
    s.create_group("db-servers", "", "admin:t").unwrap();
    let sig = Signature {
        sha256: sha('5'),
        sha1: None,
        size: 1,
        name: "postgres".into(),
        source: "t".into(),
    };
    s.put_signature(&sig, "admin:t").unwrap();
    s.add_member("db-servers", &sha('5'), "admin:t").unwrap();
    s.edit_file_set("pgdata", FileSetEdit::Add, &["/srv/pg".into()], "admin:t")
        .unwrap();
    let all_files = "@id(\"files\")\npermit (principal, action in [Trustbind::Action::\"open_read\", Trustbind::Action::\"delete\"], resource);\n";
    let id = s.create_policy_draft(all_files, "", "admin:t").unwrap();
    s.activate_policy(id, "admin:t").unwrap();
    let file = |prog: char, action: Action, path: &str| {
        let mut r = exec("bob", prog, "");
        r.action = action;
        r.target = Target::file(path, None);
        r
    };
    record(
        s,
        &[
            file('5', Action::OpenRead, "/srv/pg/base/1"), // allow -> allow (db server)
            file('9', Action::OpenRead, "/srv/pg/base/1"), // allow -> deny (not the db server)
            file('5', Action::Delete, "/srv/pg/base/1"),   // allow -> allow
        ],
    );
    let protection = policies().join("file-protection.cedar");
    let out = a
        .tb()
        .args(["-o", "json", "policy", "test"])
        .arg(&protection)
        .args(["--replay-audit", "--since", "@0"])
        .assert()
        .code(1)
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["replayed"], 3, "{v:#}");
    assert_eq!(v["unchanged"], 2, "{v:#}");
    assert_eq!(v["changed"], 1, "{v:#}");
    let c = &v["changes"][0];
    assert!(c.to_string().contains("/srv/pg/base/1"), "{c}");
    assert!(c.to_string().contains("open_read"), "{c}");
}
