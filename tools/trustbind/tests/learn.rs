//! `trustbind learn` against a real admin API: the listing grouped by
//! package and directory, a dry run that changes nothing, a batch approval
//! (audited with the admin's name), clear errors, a read-only admin refused.

mod common;

use std::collections::BTreeSet;

use common::{sha, Appliance};
use trustbind_appliance::admin;
use trustbind_appliance::store::{AdminRole, Mode, Observation, Seen};

fn obs(host: &str, prog: char, path: &str, package: Option<&str>, seen: Seen) -> Observation {
    Observation {
        host: host.into(),
        sha256: sha(prog),
        sha1: Some(std::iter::repeat_n(prog, 40).collect()),
        size: 7,
        path: path.into(),
        package: package.map(str::to_owned),
        users: BTreeSet::from(["bob".to_owned()]),
        users_more: false,
        first_ms: 1_700_000_000_000,
        last_ms: 1_700_000_100_000,
        count: 3,
        verdict: seen,
        mode: if seen == Seen::Denied {
            Mode::Enforce
        } else {
            Mode::Permissive
        },
    }
}

/// The batch approval of the tests: everything pending below /opt/app.
const APPROVE_APP: [&str; 7] = [
    "learn",
    "--approve-all",
    "--group",
    "system",
    "--path-prefix",
    "/opt/app",
    "--dry-run",
];

/// [`APPROVE_APP`] for real (without `--dry-run`).
fn approve_app() -> &'static [&'static str] {
    &APPROVE_APP[..6]
}

fn seeded() -> Appliance {
    let app = Appliance::start();
    app.store.create_group("system", "", "admin:test").unwrap();
    app.store
        .record_observed(&[
            obs("stage1", 'a', "/opt/app/run", None, Seen::WouldDeny),
            obs("stage2", 'a', "/opt/app/run", None, Seen::WouldDeny),
            obs("stage1", 'b', "/opt/app/bin/tool", None, Seen::WouldDeny),
            obs(
                "stage1",
                'c',
                "/usr/bin/id",
                Some("coreutils"),
                Seen::WouldDeny,
            ),
            obs("prod1", 'd', "/srv/x", None, Seen::Denied),
            obs(
                "stage1",
                'e',
                "/usr/bin/ls",
                Some("coreutils"),
                Seen::Allowed,
            ),
        ])
        .unwrap();
    app
}

#[test]
fn lists_pending_programs_by_package_and_directory() {
    let app = seeded();
    let text = app.text(&["learn"]);
    // Grouped: the package first, then directories; allowed ones hidden.
    assert!(
        text.contains("package coreutils (1 program(s), 1 host(s))"),
        "{text}"
    );
    assert!(
        text.contains("/opt/app (1 program(s), 2 host(s))"),
        "{text}"
    );
    assert!(
        text.contains("/opt/app/bin (1 program(s), 1 host(s))"),
        "{text}"
    );
    assert!(text.contains("would-deny"), "{text}");
    assert!(text.contains("denied"), "{text}");
    assert!(!text.contains("/usr/bin/ls"), "{text}");
    let v = app.json(&["learn", "--state", "all", "--path-prefix", "/usr/bin"]);
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{v}");
    assert_eq!(groups[0]["kind"], "package");
    assert_eq!(groups[0]["name"], "coreutils");
    assert_eq!(groups[0]["programs"].as_array().unwrap().len(), 2);
    let v = app.json(&["learn", "--host", "stage2"]);
    let g = &v["groups"][0];
    assert_eq!(g["name"], "/opt/app");
    assert_eq!(g["programs"][0]["hosts"], serde_json::json!(["stage2"]));
    assert_eq!(g["programs"][0]["count"], 3);
}

#[test]
fn dry_run_then_approve_all_under_a_prefix_audited() {
    let app = seeded();
    let head = app.store.audit_head().unwrap();
    let out = app.text(&APPROVE_APP);
    assert!(
        out.contains("dry run: would approve 2 program(s) into system"),
        "{out}"
    );
    assert!(out.contains("/opt/app/run"), "{out}");
    assert_eq!(app.store.audit_head().unwrap(), head);
    assert!(app
        .store
        .list_signatures(Some("system"), "", 10)
        .unwrap()
        .is_empty());

    let v = app.json(approve_app());
    assert_eq!(v["added_to_group"], 2);
    assert_eq!(v["rows"], 3);
    let members: BTreeSet<String> = app
        .store
        .list_signatures(Some("system"), "", 10)
        .unwrap()
        .into_iter()
        .map(|s| s.sha256)
        .collect();
    assert_eq!(members, BTreeSet::from([sha('a'), sha('b')]));
    let rows = app.store.audit_rows(head, 10).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].kind, "learn.approve");
    assert_eq!(rows[0].actor, "admin:alice");
    // Approved programs leave the pending list and show as approved.
    let text = app.text(&["learn"]);
    assert!(!text.contains("/opt/app/run"), "{text}");
    let text = app.text(&["learn", "--state", "approved"]);
    assert!(text.contains("approved:system"), "{text}");
    // Nothing more under the prefix.
    let out = app.text(approve_app());
    assert!(out.contains("nothing to approve"), "{out}");
    // Forgetting the approved rows of a host.
    let v = app.json(&[
        "learn", "--forget", "--host", "stage2", "--state", "approved",
    ]);
    assert_eq!(v["rows"], 1);
}

#[test]
fn clear_errors() {
    let app = seeded();
    let err = app.fails(
        &[
            "learn",
            "--approve-all",
            "--group",
            "nosuch",
            "--path-prefix",
            "/opt/app",
        ],
        5,
    );
    assert!(err.contains("no reference group `nosuch`"), "{err}");
    assert!(err.contains("trustbind group create nosuch"), "{err}");
    let err = app.fails(&["learn", "--path-prefix", "opt/app"], 5);
    assert!(err.contains("path_prefix"), "{err}");
    let err = app.fails(&["learn", "--package", "Bad Name"], 5);
    assert!(err.contains("package"), "{err}");
    // Without --approve-all the approval asks, which needs a terminal.
    let err = app.fails(&["learn", "--group", "system"], 2);
    assert!(err.contains("needs a terminal"), "{err}");
    // --approve-all without a group is a usage error.
    app.fails(&["learn", "--approve-all"], 2);
}

#[test]
fn a_read_only_admin_lists_but_cannot_approve_or_forget() {
    let app = seeded();
    let (cert, key) = app.pki.issue_admin("rob").unwrap();
    admin::register_admin_cert(&app.store, &cert, AdminRole::ReadOnly, "test").unwrap();
    let dir = app.cli_dir();
    std::fs::write(dir.join("rob.pem"), cert).unwrap();
    std::fs::write(dir.join("rob.key"), key.as_bytes()).unwrap();
    let as_rob = |args: &[&str]| {
        let mut c = app.tb();
        c.args(["--cert", dir.join("rob.pem").to_str().unwrap()])
            .args(["--key", dir.join("rob.key").to_str().unwrap()])
            .args(args);
        c.assert()
    };
    let ok = as_rob(&["learn"]);
    let out = ok.get_output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("/opt/app/run"));
    let head = app.store.audit_head().unwrap();
    for args in [approve_app(), &APPROVE_APP[..], &["learn", "--forget"][..]] {
        let a = as_rob(args).code(5);
        let err = String::from_utf8_lossy(&a.get_output().stderr).to_string();
        assert!(err.contains("read-only"), "{args:?}: {err}");
    }
    assert_eq!(app.store.audit_head().unwrap(), head);
    assert!(app
        .store
        .list_signatures(Some("system"), "", 10)
        .unwrap()
        .is_empty());
}

#[test]
fn interactive_approval_asks_group_by_group_on_a_terminal() {
    let app = seeded();
    // A terminal for the CLI: util-linux `script` runs it on a pty and
    // types what it reads from its own standard input.
    let bin = assert_cmd::cargo::cargo_bin("trustbind");
    let out = std::process::Command::new("script")
        .args([
            "-qec",
            &format!("{} learn --group system", bin.display()),
            "/dev/null",
        ])
        .env_clear()
        .env("HOME", app.dir.path())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TRUSTBIND_CONFIG", &app.config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            // package coreutils: no; /opt/app: yes; /opt/app/bin: no; quit.
            c.stdin.take().unwrap().write_all(b"n\ny\nn\nq\n")?;
            c.wait_with_output()
        })
        .expect("run `script` (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("approve these 1 program(s) into system? [y/N/q]"),
        "{text}"
    );
    assert!(
        text.contains("1 program(s) approved into system, 2 skipped"),
        "{text}"
    );
    let members: Vec<String> = app
        .store
        .list_signatures(Some("system"), "", 10)
        .unwrap()
        .into_iter()
        .map(|s| s.sha256)
        .collect();
    assert_eq!(members, [sha('a')]);
    let rows = app.store.audit_rows(0, 100).unwrap();
    assert_eq!(rows.iter().filter(|r| r.kind == "learn.approve").count(), 1);
}
