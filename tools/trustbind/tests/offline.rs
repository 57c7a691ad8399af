//! CLI tests that need no appliance: validation, configuration errors,
//! completions, help.

use assert_cmd::Command;
use predicates::prelude::*;

fn tb(home: &std::path::Path) -> Command {
    let mut c = Command::cargo_bin("trustbind").unwrap();
    c.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c
}

fn policies() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

#[test]
fn validate_accepts_the_example_and_points_at_errors() {
    let d = tempfile::tempdir().unwrap();
    tb(d.path())
        .args(["policy", "validate"])
        .arg(policies().join("example.cedar"))
        .assert()
        .success()
        .stdout(predicate::str::contains("ok:").and(predicate::str::contains("(5 policies)")));

    let bad = d.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "permit(principal, action == Trustbind::Action::\"exec\", resource)\n\
         when { context.hour >= 8 };\n\
         permit(principal, action == Trustbind::Action::\"exec\", resource)\n\
         when { context.nope == 1 };\n",
    )
    .unwrap();
    let a = tb(d.path())
        .args(["policy", "validate"])
        .arg(&bad)
        .assert()
        .code(1);
    let out = String::from_utf8(a.get_output().stdout.clone()).unwrap();
    let want = format!("error: {}:4:", bad.display());
    assert!(out.contains(&want), "{out}");
    assert!(out.contains("4 | when { context.nope == 1 };"), "{out}");
    let caret = out.lines().find(|l| l.contains('^')).unwrap();
    let src = out.lines().find(|l| l.starts_with("4 |")).unwrap();
    let at = caret.find('^').unwrap();
    assert!(src[at..].starts_with("context"), "{out}");

    // A syntax error, in JSON.
    let syn = d.path().join("syn.cedar");
    std::fs::write(&syn, "permit(principal, action, resource)\nwhen { 1 + };\n").unwrap();
    let a = tb(d.path())
        .args(["-o", "json", "policy", "validate"])
        .arg(&syn)
        .arg(policies().join("example.cedar"))
        .assert()
        .code(1);
    let v: serde_json::Value = serde_json::from_slice(&a.get_output().stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["files"][0]["problems"][0]["stage"], "parse");
    assert_eq!(v["files"][0]["problems"][0]["line"], 2);
    assert_eq!(v["files"][1]["ok"], true);

    // A file that does not exist: an I/O error naming it.
    tb(d.path())
        .args(["policy", "validate", "/nonexistent/x.cedar"])
        .assert()
        .code(7)
        .stderr(predicate::str::contains(
            "cannot read /nonexistent/x.cedar: No such file or directory",
        ));
}

#[test]
fn configuration_errors_are_one_sentence() {
    let d = tempfile::tempdir().unwrap();
    // Nothing configured.
    tb(d.path())
        .arg("status")
        .assert()
        .code(3)
        .stderr(predicate::str::contains(
            "no appliance URL is configured; set --url, TRUSTBIND_URL, or `url` in",
        ));
    // URL but no certificate.
    tb(d.path())
        .args(["status", "--url", "https://127.0.0.1:1"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains(
            "no admin certificate is configured",
        ));
    // Not https.
    tb(d.path())
        .env("TRUSTBIND_URL", "http://127.0.0.1:1")
        .arg("status")
        .assert()
        .code(3)
        .stderr(predicate::str::contains("must start with https://"));
    // A config file with paths that do not exist: relative to the file.
    let cfg_dir = d.path().join(".config/trustbind");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::write(
        cfg_dir.join("config.toml"),
        "url = \"https://127.0.0.1:1\"\ncert = \"admin.pem\"\nkey = \"admin.key\"\nca = \"ca.pem\"\n",
    )
    .unwrap();
    let a = tb(d.path()).arg("status").assert().code(3);
    let err = String::from_utf8(a.get_output().stderr.clone()).unwrap();
    assert!(
        err.contains(&format!(
            "cannot read the appliance CA certificate {}: No such file or directory",
            cfg_dir.join("ca.pem").display()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // A garbage CA file.
    std::fs::write(cfg_dir.join("ca.pem"), "not pem").unwrap();
    tb(d.path())
        .arg("status")
        .assert()
        .code(3)
        .stderr(predicate::str::contains("holds no PEM certificate"));
    // A config file with a typo.
    std::fs::write(
        cfg_dir.join("config.toml"),
        "url = \"https://x\"\ncerts = \"a\"\n",
    )
    .unwrap();
    tb(d.path())
        .arg("status")
        .assert()
        .code(3)
        .stderr(predicate::str::contains("config.toml line 2 is not valid"));
    // An explicit config file that does not exist.
    tb(d.path())
        .args(["status", "--config", "/nonexistent/trustbind.toml"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains(
            "cannot read the config file /nonexistent/trustbind.toml",
        ));
    // JSON errors for scripts.
    let a = tb(d.path())
        .args(["-o", "json", "status", "--config", "/nonexistent/t.toml"])
        .assert()
        .code(3);
    let v: serde_json::Value = serde_json::from_slice(&a.get_output().stderr).unwrap();
    assert_eq!(v["error"]["code"], "config");
    assert_eq!(v["error"]["exit"], 3);
}

#[test]
fn completions_and_help() {
    let d = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        tb(d.path())
            .args(["completions", shell])
            .assert()
            .success()
            .stdout(predicate::str::contains("import-nsrl"));
    }
    tb(d.path())
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("Exit codes:").and(predicate::str::contains("Examples:")));
    tb(d.path()).arg("bogus").assert().code(2);
}

#[test]
fn one_spelling_enrol_with_the_other_accepted_unlisted() {
    let d = tempfile::tempdir().unwrap();
    for (cmd, sub) in [("admin", "enrol"), ("host", "enrol-token")] {
        tb(d.path())
            .args([cmd, "--help"])
            .assert()
            .success()
            .stdout(predicate::str::contains(sub).and(predicate::str::contains("enroll").not()));
    }
    // Scripts written with "enroll" keep working.
    for args in [
        ["admin", "enroll", "--help"],
        ["host", "enroll-token", "--help"],
    ] {
        tb(d.path()).args(args).assert().success();
    }
}
