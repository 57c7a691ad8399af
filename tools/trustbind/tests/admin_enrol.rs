//! `trustbind admin enrol` against a real enrol port and admin API on
//! 127.0.0.1: the token buys credentials once, they work with the other
//! commands, a wrong or expired token is refused with a clear message, and
//! a wrong CA fingerprint fails the handshake before the token is sent.

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::Appliance;
use predicates::prelude::*;
use trustbind_appliance::agent_api::enrol::{admin_token_sha256, new_admin_token};

fn mint(a: &Appliance, ttl_ms: i64) -> String {
    let t = new_admin_token().unwrap();
    a.store
        .create_admin_token("root", &admin_token_sha256(&t), ttl_ms, false, "test")
        .unwrap()
        .unwrap();
    t
}

/// Starts the enrol port: (its address, the CA fingerprint).
fn enrol_port(a: &Appliance) -> (String, String) {
    (a.start_enrol().to_string(), a.pki.fingerprint().to_owned())
}

fn refusals(a: &Appliance) -> usize {
    a.store
        .audit_rows(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "admin.enrol.refused")
        .count()
}

#[test]
fn admin_enrol_writes_working_credentials_once() {
    let a = Appliance::start();
    let (enrol, fp) = enrol_port(&a);
    let token = mint(&a, 60_000);
    let out = a.dir.path().join("new-admin");

    // A wrong fingerprint: the handshake fails, nothing reaches the
    // appliance (no refusal audited) and the token stays usable.
    let wrong = "00".repeat(32);
    a.tb()
        .env_remove("TRUSTBIND_CONFIG")
        .args(["admin", "enrol", "--appliance", &enrol.to_string()])
        .args(["--ca-fingerprint", &wrong, "--token", &token, "--out"])
        .arg(&out)
        .assert()
        .code(4)
        .stderr(predicate::str::contains("not the pinned one"));
    assert_eq!(refusals(&a), 0);
    assert!(!out.exists());

    // The right one (typed with colons, upper case).
    let typed_fp = fp
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let o = a
        .tb()
        .env_remove("TRUSTBIND_CONFIG")
        .args(["admin", "enrol", "--appliance", &enrol.to_string()])
        .args(["--ca-fingerprint", &typed_fp, "--token", &token, "--out"])
        .arg(&out)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(o).unwrap();
    assert!(text.contains("admin certificate for `root`"), "{text}");
    assert!(text.contains("trustbind --config"), "{text}");
    for f in ["ca.pem", "admin.pem", "admin.key", "config.toml"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let mode = std::fs::metadata(out.join("admin.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(out.join("ca.pem")).unwrap(),
        a.pki.ca_pem()
    );

    // The config written points at the enrol host's admin port; point it at
    // this test's admin API and the new credentials work.
    let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(cfg.contains("url  = \"https://127.0.0.1:7445\""), "{cfg}");
    std::fs::write(
        out.join("config.toml"),
        cfg.replace("https://127.0.0.1:7445", &a.url),
    )
    .unwrap();
    let st = a
        .tb()
        .env("TRUSTBIND_CONFIG", out.join("config.toml"))
        .args(["-o", "json", "status"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let st: serde_json::Value = serde_json::from_slice(&st).unwrap();
    assert_eq!(st["you"], "admin:root");
    a.tb()
        .env("TRUSTBIND_CONFIG", out.join("config.toml"))
        .args(["host", "list"])
        .assert()
        .success();

    // Second use: refused, saying so, files untouched.
    let before = std::fs::read(out.join("admin.key")).unwrap();
    a.tb()
        .args(["admin", "enrol", "--appliance", &enrol.to_string()])
        .args(["--ca-fingerprint", &fp, "--token", &token, "--out"])
        .arg(&out)
        .assert()
        .code(5)
        .stderr(predicate::str::contains("already used"));
    assert_eq!(std::fs::read(out.join("admin.key")).unwrap(), before);
}

#[test]
fn wrong_and_expired_tokens_are_refused_clearly() {
    let a = Appliance::start();
    let (enrol, fp) = enrol_port(&a);
    let out = a.dir.path().join("x");
    a.tb()
        .args(["admin", "enrol", "--appliance", &enrol.to_string()])
        .args(["--ca-fingerprint", &fp, "--token", "AAAA-BBBB", "--out"])
        .arg(&out)
        .assert()
        .code(5)
        .stderr(predicate::str::contains("wrong admin enrolment token"));
    let t = mint(&a, 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    a.tb()
        .args(["admin", "enrol", "--appliance", &enrol.to_string()])
        .args(["--ca-fingerprint", &fp, "--token", &t, "--out"])
        .arg(&out)
        .assert()
        .code(5)
        .stderr(predicate::str::contains("expired"));
    assert!(!out.exists());
    assert_eq!(refusals(&a), 2);
}

#[test]
fn credentials_default_to_the_config_directory() {
    let a = Appliance::start();
    let (enrol, fp) = enrol_port(&a);
    let token = mint(&a, 60_000);
    let home = a.dir.path().join("home");
    let o = a
        .tb()
        .env_remove("TRUSTBIND_CONFIG")
        .env("HOME", &home)
        .args([
            "-o",
            "json",
            "admin",
            "enrol",
            "--appliance",
            &enrol.to_string(),
        ])
        .args(["--ca-fingerprint", &fp, "--token", &token])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&o).unwrap();
    let dir = home.join(".config/trustbind");
    assert_eq!(v["dir"], dir.to_str().unwrap());
    assert_eq!(v["config_written"], true);
    assert!(dir.join("admin.key").exists());
    assert!(dir.join("config.toml").exists());
}
