//! `trustbind` end to end against a real admin API on loopback.

mod common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;

use common::{policies, Appliance};
use predicates::prelude::*;
use serde_json::Value;

#[test]
fn policy_lifecycle() {
    let a = Appliance::start();
    let st = a.json(&["status"]);
    assert_eq!(st["you"], "admin:alice");

    // An invalid upload is refused with the offending line shown.
    let bad = a.dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "permit(principal, action == Trustbind::Action::\"exec\", resource)\nwhen { context.nope == 1 };\n",
    )
    .unwrap();
    let out = a
        .tb()
        .args(["policy", "upload"])
        .arg(&bad)
        .assert()
        .code(5)
        .get_output()
        .stderr
        .clone();
    let err = String::from_utf8(out).unwrap();
    assert!(
        err.contains(&format!("error: {}:2:", bad.display())),
        "{err}"
    );
    assert!(err.contains("2 | when { context.nope == 1 };"), "{err}");
    assert!(err.contains("the appliance refused"), "{err}");

    // Upload baseline as a draft; diff against nothing active; activate.
    let baseline = policies().join("baseline.cedar");
    let up = a.json(&["policy", "upload", baseline.to_str().unwrap(), "-m", "base"]);
    let v1 = up["upload"]["id"].as_i64().unwrap();
    assert_eq!(up["upload"]["state"], "draft");
    let d = a.text(&["policy", "diff", &v1.to_string()]);
    assert!(d.contains("+@id(\"exec-approved-system-programs\")"), "{d}");
    a.text(&["policy", "activate", &v1.to_string()]);
    let shown = a.text(&["policy", "show", "--text"]);
    assert_eq!(shown, std::fs::read_to_string(&baseline).unwrap());

    // A local file diffs against the active version, without uploading.
    let office = policies().join("office-hours.cedar");
    let d = a.json(&["policy", "diff", office.to_str().unwrap()]);
    assert_eq!(d["changed"], true);
    assert!(d["diff"]
        .as_str()
        .unwrap()
        .contains("+@id(\"maintenance-tools-in-office-hours\")"));
    let same = a.text(&["policy", "diff", baseline.to_str().unwrap()]);
    assert_eq!(same, "no changes\n");

    // Upload and activate in one go, then roll back.
    let up2 = a.json(&["policy", "upload", office.to_str().unwrap(), "--activate"]);
    let v2 = up2["upload"]["id"].as_i64().unwrap();
    assert_eq!(up2["activate"]["governing"]["active"], v2);
    let list = a.json(&["policy", "list"]);
    assert_eq!(list["governing"]["active"], v2);
    assert_eq!(list["policies"].as_array().unwrap().len(), 2);
    let text = a.text(&["policy", "list"]);
    assert!(text.contains(&format!("*{v2}")), "{text}");
    let rb = a.json(&["policy", "rollback"]);
    assert_eq!(rb["governing"]["active"], v1);
    let show = a.json(&["policy", "show", &v2.to_string()]);
    assert_eq!(show["id"], v2);

    // Errors: unknown version, not a number.
    a.tb()
        .args(["policy", "activate", "999"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("no policy version 999"));
    a.tb()
        .args(["policy", "show", "latest"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "`latest` is not a policy version id",
        ));
}

#[test]
fn signatures_and_groups() {
    let a = Appliance::start();
    let root = a.dir.path().join("tree");
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    let mk = |p: &str, body: &[u8], mode: u32| {
        let f = root.join(p);
        std::fs::write(&f, body).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mk("tool", b"abc", 0o755);
    mk("sub/other", b"other tool", 0o700);
    mk("sub/deeper/third", b"third", 0o555);
    mk("README", b"text", 0o644);
    mk("sub/data.json", b"{}", 0o600);
    std::os::unix::fs::symlink(root.join("tool"), root.join("link")).unwrap();

    let v = a.json(&["sig", "add", root.to_str().unwrap(), "--group", "system"]);
    assert_eq!(v["hashed"], 3);
    assert_eq!(v["skipped_non_executable"], 2);
    assert_eq!(v["skipped_other"], 1);
    assert_eq!(v["inserted"], 3);
    assert_eq!(v["added_to_group"], 3);
    let text = a.text(&["sig", "add", root.to_str().unwrap(), "-g", "system"]);
    assert!(text.contains("hashed 3 executable(s); skipped 2 non-executable file(s) and 1 link(s)/special file(s)"), "{text}");
    assert!(
        text.contains("0 new, 0 updated, 3 unchanged; 0 added to group system"),
        "{text}"
    );

    // The SHA-256 and SHA-1 of "abc".
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let s = a.json(&["sig", "show", abc]);
    assert_eq!(s["sha1"], "a9993e364706816aba3e25717850c26c9cd0d89d");
    assert_eq!(s["groups"], serde_json::json!(["system"]));
    assert_eq!(s["size"], 3);

    // Listing, with paging through the API (limit 2 per page inside is not
    // configurable, so check totals and the group filter).
    let all = a.json(&["sig", "ls", "--group", "system", "--limit", "0"]);
    assert_eq!(all["signatures"].as_array().unwrap().len(), 3);
    let two = a.json(&["sig", "ls", "-n", "2"]);
    assert_eq!(two["signatures"].as_array().unwrap().len(), 2);

    // Groups.
    a.text(&["group", "create", "admin-tools", "-d", "only for admins"]);
    let again = a.text(&["group", "create", "admin-tools"]);
    assert_eq!(again, "group admin-tools already exists\n");
    let add = a.json(&["group", "add", "admin-tools", abc]);
    assert_eq!(add["added"], 1);
    let g = a.json(&["group", "show", "admin-tools"]);
    assert_eq!(g["group"]["members"], 1);
    assert_eq!(g["group"]["description"], "only for admins");
    let ls = a.json(&["group", "ls"]);
    let names: Vec<&str> = ls["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin-tools", "system"]);
    let rm = a.json(&["group", "remove", "admin-tools", abc]);
    assert_eq!(rm["removed"], 1);
    a.text(&["group", "rm", "admin-tools"]);
    a.tb()
        .args(["group", "show", "admin-tools"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("no group `admin-tools`"));

    // Removing: one known, one unknown.
    let unknown = "0".repeat(64);
    let out = a
        .tb()
        .args(["sig", "rm", abc, &unknown])
        .assert()
        .code(5)
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("removed 1 signature(s)"), "{out}");
    assert!(out.contains(&format!("not found: {unknown}")), "{out}");
    a.tb()
        .args(["sig", "show", "xyz"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("is not a SHA-256"));
    // A path that does not exist: a local error naming it.
    a.tb()
        .args(["sig", "add", "/nonexistent/bin", "--group", "system"])
        .assert()
        .code(7)
        .stderr(predicate::str::contains("cannot inspect /nonexistent/bin"));
}

#[test]
fn a_package_inventory_seeds_a_group() {
    let a = Appliance::start();
    let root = a.dir.path().join("usr/bin");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("ls"), b"abc").unwrap();
    std::fs::write(root.join("nginx"), b"nginx").unwrap();
    let line = |path: &std::path::Path, pkg: &str, version: &str| {
        serde_json::json!({ "path": path.to_str().unwrap(), "package": pkg, "version": version })
            .to_string()
    };
    let inv = a.dir.path().join("inventory.jsonl");
    std::fs::write(
        &inv,
        [
            line(&root.join("ls"), "coreutils", "9.1-1"),
            line(&root.join("nginx"), "nginx-light", ""),
            line(&root.join("gone"), "coreutils", "9.1-1"),
        ]
        .join("\n"),
    )
    .unwrap();
    let from_file = [
        "sig",
        "add",
        "--inventory",
        inv.to_str().unwrap(),
        "-g",
        "debian",
    ];
    let v = a.json(&from_file);
    assert_eq!(v["programs"], 3);
    assert_eq!(v["packages"], 2);
    assert_eq!(v["hashed"], 2);
    assert_eq!(v["inserted"], 2);
    assert_eq!(v["added_to_group"], 2);
    assert_eq!(v["skipped"][0]["package"], "coreutils", "{v}");
    // The SHA-256 of "abc": stored with its package and version.
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let s = a.json(&["sig", "show", abc]);
    assert_eq!(s["groups"], serde_json::json!(["debian"]));
    assert_eq!(s["source"], "dpkg:coreutils=9.1-1", "{s}");
    // From standard input, as `trustbind-agent inventory | ...` gives it.
    let out = a
        .tb()
        .args(["sig", "add", "--inventory", "-", "-g", "debian"])
        .write_stdin(std::fs::read(&inv).unwrap())
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("hashed 2 of 3 program(s) from 2 package(s)"),
        "{out}"
    );
    assert!(
        out.contains("0 new, 0 updated, 2 unchanged; 0 added to group debian"),
        "{out}"
    );
    assert!(
        out.contains("skipped ") && out.contains("gone (coreutils)"),
        "{out}"
    );
    // A bad line is named by file and line; nothing is sent.
    std::fs::write(&inv, "{\"path\":\"/usr/bin/x\"}\n").unwrap();
    a.tb()
        .args(from_file)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "inventory.jsonl:1: not an inventory line",
        ));
    // Paths and an inventory do not mix.
    a.tb()
        .args(["sig", "add", "/usr/bin", "--inventory", "-", "-g", "debian"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("cannot be used with"));
}

#[test]
fn hosts() {
    let a = Appliance::start();
    a.tb()
        .args(["host", "enrol-token", "web1", "--host-group", "web"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("no host group `web`"));
    a.text(&["host", "group", "set", "web", "--mode", "enforce"]);
    let t = a.json(&["host", "enrol-token", "web1", "--host-group", "web"]);
    let token = t["token"].as_str().unwrap();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    // The American spelling stays a hidden alias, for scripts written before.
    let text = a.text(&["host", "enroll-token", "web2", "-g", "web"]);
    assert!(text.contains("shown once"), "{text}");
    let l = a.json(&["host", "list"]);
    assert_eq!(l["hosts"].as_array().unwrap().len(), 2);
    assert_eq!(l["hosts"][0]["state"], "pending");
    let hg = a.json(&["host", "group", "ls"]);
    assert_eq!(hg["host_groups"][0]["mode"], "enforce");
    a.text(&["host", "group", "set", "web", "--mode", "permissive"]);
    let hg = a.json(&["host", "group", "ls"]);
    assert_eq!(hg["host_groups"][0]["mode"], "permissive");
    a.text(&["host", "revoke", "web1"]);
    let h = a.json(&["host", "show", "web1"]);
    assert_eq!(h["host"]["state"], "revoked");
    let listing = a.text(&["host", "list"]);
    assert!(
        listing.contains("web1") && listing.contains("revoked"),
        "{listing}"
    );
    a.tb().args(["host", "revoke", "nope"]).assert().code(5);
}

/// `trustbind host addresses`: shown, set, added to, removed from; an
/// address of another host is refused naming it.
#[test]
fn host_addresses() {
    let a = Appliance::start();
    a.text(&["host", "group", "set", "db", "--mode", "enforce"]);
    a.json(&["host", "enrol-token", "db1", "--host-group", "db"]);
    a.json(&["host", "enrol-token", "db2", "--host-group", "db"]);
    let text = a.text(&["host", "addresses", "db1"]);
    assert!(text.contains("none assigned"), "{text}");
    let v = a.json(&[
        "host",
        "addresses",
        "db1",
        "--set",
        "10.0.0.5",
        "2001:db8::5",
    ]);
    assert_eq!(
        v["host"]["addresses"],
        serde_json::json!(["10.0.0.5", "2001:db8::5"])
    );
    a.text(&["host", "addresses", "db1", "--add", "10.0.1.5"]);
    let text = a.text(&["host", "addresses", "db1", "--remove", "2001:db8::5"]);
    assert!(text.contains("10.0.0.5, 10.0.1.5"), "{text}");
    let text = a.text(&["host", "show", "db1"]);
    assert!(text.contains("addresses    10.0.0.5, 10.0.1.5"), "{text}");
    a.tb()
        .args(["host", "addresses", "db2", "--add", "10.0.0.5"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("assigned to host `db1`"));
    let v = a.json(&["host", "addresses", "db1", "--set"]);
    assert_eq!(v["host"]["addresses"], serde_json::json!([]));
}

#[test]
fn users_and_roles() {
    let a = Appliance::start();
    let v = a.json(&["user", "set", "alice", "--role", "admin", "-r", "dba"]);
    assert_eq!(v["user"]["roles"], serde_json::json!(["admin", "dba"]));
    a.text(&["user", "set", "bob"]);
    let l = a.json(&["user", "ls"]);
    assert_eq!(l["users"].as_array().unwrap().len(), 2);
    let t = a.text(&["user", "show", "alice"]);
    assert!(t.contains("roles  admin, dba"), "{t}");
    a.text(&["user", "rm", "bob"]);
    a.tb()
        .args(["user", "show", "bob"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("no user `bob`"));
}

#[test]
fn file_sets() {
    let a = Appliance::start();
    let v = a.json(&["fileset", "add", "pgdata", "/var/lib/postgresql", "/etc/pg"]);
    assert_eq!(v["created"], true);
    assert_eq!(
        v["file_set"]["paths"],
        serde_json::json!(["/etc/pg", "/var/lib/postgresql"])
    );
    // A bad path is refused here, naming it, before anything is sent.
    a.tb()
        .args(["fileset", "add", "pgdata", "/srv/data/"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("`/srv/data/`").and(predicate::str::contains("trailing")));
    let t = a.text(&["fileset", "remove", "pgdata", "/etc/pg"]);
    assert!(t.contains("0 added, 1 removed"), "{t}");
    a.text(&["fileset", "set", "logs", "/var/log/audit"]);
    let t = a.text(&["fileset", "ls"]);
    assert_eq!(
        t,
        "logs\n  /var/log/audit\npgdata\n  /var/lib/postgresql\n(2 of at most 256 paths)\n"
    );
    a.text(&["fileset", "rm", "logs"]);
    let v = a.json(&["fileset", "show", "pgdata"]);
    assert_eq!(v["file_set"]["name"], "pgdata");
    a.tb().args(["fileset", "show", "logs"]).assert().failure();
}

/// `trustbind audit verify` after retention pruned many batches and
/// consolidated the oldest checkpoints (docs/RETENTION.md, "Bounding the
/// checkpoints"): the whole pruned prefix from row 1, every checkpoint's
/// signature checked, the newest checked again with the CLI's CA; and
/// `trustbind audit verify-export` of the export files, which hold every
/// batch's own checkpoint.
#[test]
fn audit_verify_after_checkpoints_were_consolidated() {
    use trustbind_appliance::retention;
    let a = Appliance::start();
    let evs: Vec<_> = (0..600)
        .map(|i| {
            trustbind_appliance::store::AuditEvent::new("test", "t", serde_json::json!({ "i": i }))
        })
        .collect();
    a.store.append_audit_batch(&evs).unwrap();
    let data = a.dir.path().join("data");
    a.prune_audit(50, 10, 6);
    let cps = a.store.checkpoints().unwrap();
    assert!(cps.len() <= 6, "{} checkpoints", cps.len());
    let newest = cps.last().unwrap().clone();
    assert!(newest.id > 50, "{} batches", newest.id);
    assert!(cps[0].rows > 10, "nothing consolidated: {:?}", cps[0]);

    let v = a.json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["pruned"]["upto_seq"], newest.upto_seq);
    assert_eq!(v["pruned"]["rows"], newest.total_rows);
    assert_eq!(v["pruned"]["checkpoints"], cps.len());
    assert_eq!(v["pruned"]["signature_checked"], true);
    let text = a.text(&["audit", "verify"]);
    assert!(
        text.contains(&format!(
            "pruned: rows 1..={} ({} rows, {} checkpoints;",
            newest.upto_seq,
            newest.total_rows,
            cps.len()
        )),
        "{text}"
    );

    let files = retention::export_files(&data.join(retention::EXPORT_DIR), "audit").unwrap();
    let out = a
        .tb()
        .args(["audit", "verify-export"])
        .args(&files)
        .assert()
        .success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(
        text.contains(&format!(
            "rows 1..={} ({} rows), {} signed checkpoints, the last up to row {}",
            newest.upto_seq, newest.upto_seq, newest.id, newest.upto_seq
        )),
        "{text}"
    );
}

/// `trustbind audit verify --seal-key` and `verify-export --seal-key`
/// (T-83): the seals of the rows kept and of the export files checked with
/// the offline key; rows after the last seal reported as not sealed; a
/// last seal older than two intervals fails (the log was cut or sealing
/// stopped); another key fails, naming the setup row.
#[test]
fn audit_verify_with_the_seal_key() {
    use trustbind_appliance::audit_seal;
    use trustbind_appliance::retention;
    use trustbind_appliance::store::{now_ms, AuditEvent};
    let a = Appliance::start();
    let data = a.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let append = |n: usize| {
        let evs: Vec<_> = (0..n)
            .map(|i| AuditEvent::new("test", "t", serde_json::json!({ "i": i })))
            .collect();
        a.store.append_audit_batch(&evs).unwrap();
    };
    append(40);
    let vk = audit_seal::setup(&a.store, &data, now_ms(), 600_000).unwrap();
    let key = a.dir.path().join("seal.key");
    std::fs::write(&key, serde_json::to_string(&vk).unwrap()).unwrap();
    append(40);
    audit_seal::seal(&a.store, &data, now_ms(), "interval").unwrap();
    a.prune_audit(30, 20, retention::MAX_CHECKPOINTS);
    append(5);
    // Sealed "200 s ago": within two intervals of 600 s.
    audit_seal::seal(&a.store, &data, now_ms() - 200_000, "interval").unwrap();
    append(3);
    let k = key.to_str().unwrap();

    let v = a.json(&["audit", "verify", "--seal-key", k]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["seals"]["last_epoch"], 2, "{v}");
    assert_eq!(v["seals"]["unsealed_rows"], 4, "{v}");
    let text = a.text(&["audit", "verify", "--seal-key", k]);
    assert!(
        text.contains("are authentic") && text.contains("(4 rows) are NOT sealed"),
        "{text}"
    );

    let files = retention::export_files(&data.join(retention::EXPORT_DIR), "audit").unwrap();
    let out = a
        .tb()
        .args(["audit", "verify-export", "--seal-key", k])
        .args(&files)
        .assert()
        .success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(text.contains("seals verified: "), "{text}");

    // With the export files: the rows kept continue them.
    let mut args = vec!["audit", "verify", "--seal-key", k, "--exported"];
    let names: Vec<String> = files
        .iter()
        .map(|f| f.to_str().unwrap().to_owned())
        .collect();
    args.extend(names.iter().map(String::as_str));
    let v = a.json(&args);
    assert_eq!(v["ok"], true, "{v}");
    // Export files missing their last batches (the rows an attacker
    // deleted from the appliance as if pruned): refused.
    let all = std::fs::read_to_string(&files[files.len() - 1]).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    let cut = a.dir.path().join("cut.jsonl");
    // Cut after the row following seal 0 (the files still verify alone).
    let seal0 = lines
        .iter()
        .position(|l| l.contains("audit.seal\""))
        .unwrap();
    std::fs::write(&cut, lines[..seal0 + 2].join("\n") + "\n").unwrap();
    let mut args = vec![
        "-o",
        "json",
        "audit",
        "verify",
        "--seal-key",
        k,
        "--exported",
    ];
    args.extend(names[..names.len() - 1].iter().map(String::as_str));
    args.push(cut.to_str().unwrap());
    let out = a.tb().args(&args).assert().code(1);
    let v: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("neither in the export files"),
        "{v}"
    );

    // Another key: both fail, naming the setup row.
    let other = trustbind_appliance::policy::audit_seal::VerifyKey::new(&[5; 32], 0, 600_000);
    let other_key = a.dir.path().join("other.key");
    std::fs::write(&other_key, serde_json::to_string(&other).unwrap()).unwrap();
    let o = other_key.to_str().unwrap();
    let out = a
        .tb()
        .args(["audit", "verify-export", "--seal-key", o])
        .args(&files)
        .assert()
        .code(1);
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(text.contains("set up again with key id"), "{text}");

    // No seal for far longer than the interval: stale.
    let stale =
        trustbind_appliance::policy::audit_seal::VerifyKey::new(&vk.k0().unwrap(), vk.start_ms, 1);
    std::fs::write(&key, serde_json::to_string(&stale).unwrap()).unwrap();
    let out = a
        .tb()
        .args(["-o", "json", "audit", "verify", "--seal-key", k])
        .assert()
        .code(1);
    let v: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("s old"), "{v}");
}

/// `trustbind audit seal-setup` and `audit seal` over the admin API: the
/// verification key written once (0600), a second setup refused (409),
/// a forced seal recorded with the admin's name, and the log verifying
/// with the key.
#[test]
fn audit_seal_setup_and_seal_over_the_admin_api() {
    let a = Appliance::start();
    let key = a.dir.path().join("seal.key");
    let k = key.to_str().unwrap();
    let t = a.text(&["audit", "seal-setup", "--out", k, "--interval-secs", "60"]);
    assert!(t.contains("OFFLINE"), "{t}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let vk = trustbind_appliance::policy::audit_seal::VerifyKey::read(&key).unwrap();
    assert_eq!(vk.interval_ms, 60_000);
    let again = a.dir.path().join("again.key");
    let err = a.fails(
        &["audit", "seal-setup", "--out", again.to_str().unwrap()],
        5,
    );
    assert!(err.contains("set up already"), "{err}");
    assert!(!again.exists());
    a.text(&["group", "create", "g1"]);
    let v = a.json(&["audit", "seal"]);
    assert_eq!(v["seal"]["epoch"], 1, "{v}");
    assert_eq!(v["seal"]["reason"], "admin:alice", "{v}");
    let v = a.json(&["audit", "verify", "--seal-key", k]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        (
            v["seals"]["seals"].as_u64(),
            v["seals"]["unsealed_rows"].as_u64()
        ),
        (Some(2), Some(1)),
        "{v}"
    );
}

#[test]
fn audit_tail_export_verify_and_follow() {
    let a = Appliance::start();
    a.text(&["group", "create", "g1"]);
    a.text(&["group", "create", "g2"]);
    let tail = a.json(&["audit", "tail", "-n", "5"]);
    let rows = tail["rows"].as_array().unwrap();
    // Row 1 records alice's certificate (the harness's setup); then hers.
    assert_eq!(rows.len(), 3, "{tail}");
    assert_eq!(rows[0]["kind"], "admin.cert.issue");
    assert!(rows[1..].iter().all(|r| r["actor"] == "admin:alice"));
    let text = a.text(&["audit", "tail"]);
    assert!(text.contains("admin:alice"), "{text}");

    // Export to a file: JSON lines, every row since an hour ago.
    let file = a.dir.path().join("audit.jsonl");
    a.tb()
        .args(["audit", "export", "--since", "1h", "-O"])
        .arg(&file)
        .assert()
        .success()
        .stderr(predicate::str::contains("exported"));
    let body = std::fs::read_to_string(&file).unwrap();
    let head = a.store.audit_head().unwrap();
    assert_eq!(body.lines().count() as i64, head);
    for l in body.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert!(v["seq"].as_i64().unwrap() >= 1);
    }
    // Nothing in the future.
    let none = a.text(&["audit", "export", "--since", "2999-01-01"]);
    assert_eq!(none, "");
    a.tb()
        .args(["audit", "export", "--since", "yesterday"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("`yesterday` is not a time"));

    let v = a.json(&["audit", "verify"]);
    assert_eq!(v["ok"], true);
    assert_eq!(v["rows"], head);

    // --follow prints rows written after it started.
    let bin = assert_cmd::cargo::cargo_bin("trustbind");
    let mut child = std::process::Command::new(bin)
        .env("TRUSTBIND_CONFIG", &a.config)
        .args([
            "-o",
            "json",
            "audit",
            "tail",
            "-n",
            "1",
            "--follow",
            "--interval-ms",
            "50",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["seq"], head);
    a.text(&["group", "create", "followed"]);
    let next: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(next["seq"], head + 1);
    assert!(next["detail"].as_str().unwrap().contains("followed"));
}

#[test]
fn credential_and_connection_errors() {
    let a = Appliance::start();
    let cli = a.cli_dir();
    // An admin certificate from another CA: the appliance refuses it.
    let other = tempfile::tempdir().unwrap();
    let pki2 =
        trustbind_appliance::pki::Pki::open_or_create(other.path(), &["127.0.0.1".to_owned()])
            .unwrap();
    let (c2, k2) = pki2.issue_admin("mallory").unwrap();
    std::fs::write(other.path().join("m.pem"), c2).unwrap();
    std::fs::write(other.path().join("m.key"), k2.as_bytes()).unwrap();
    std::fs::write(other.path().join("ca2.pem"), pki2.ca_pem()).unwrap();
    let a1 = a
        .tb()
        .arg("status")
        .arg("--cert")
        .arg(other.path().join("m.pem"))
        .arg("--key")
        .arg(other.path().join("m.key"))
        .assert()
        .code(4);
    let err = String::from_utf8(a1.get_output().stderr.clone()).unwrap();
    assert!(err.contains("rejected the admin certificate"), "{err}");
    assert!(err.contains("m.pem"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("PRIVATE KEY"), "{err}");

    // The wrong CA: the server certificate is not trusted.
    a.tb()
        .arg("status")
        .env("TRUSTBIND_CA", other.path().join("ca2.pem"))
        .assert()
        .code(4)
        .stderr(predicate::str::contains(
            "presented a certificate that the CA in",
        ));

    // A key that does not fit the certificate.
    a.tb()
        .arg("status")
        .arg("--key")
        .arg(other.path().join("m.key"))
        .assert()
        .code(3)
        .stderr(predicate::str::contains("does not fit the certificate"));

    // A key file that is not a key; the message names the file only.
    std::fs::write(cli.join("junk.key"), "-----BEGIN NOTHING-----\n").unwrap();
    a.tb()
        .arg("status")
        .arg("--key")
        .arg(cli.join("junk.key"))
        .assert()
        .code(3)
        .stderr(predicate::str::contains("holds no PEM private key"));

    // Nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    a.tb()
        .arg("status")
        .env("TRUSTBIND_URL", format!("https://127.0.0.1:{port}"))
        .assert()
        .code(4)
        .stderr(predicate::str::contains("connection refused"));
}

#[test]
fn admin_certificates_list_token_renew_and_revoke() {
    let a = Appliance::start();
    let cli = a.cli_dir();
    let v = a.json(&["admin", "ls"]);
    let admins = v["admins"].as_array().unwrap();
    assert_eq!(admins.len(), 1, "{v}");
    assert_eq!(admins[0]["name"], "alice");
    assert_eq!(admins[0]["role"], "admin");
    let old_serial = admins[0]["serial"].as_str().unwrap().to_owned();
    // A read-only admin's token, 2 h.
    let v = a.json(&[
        "admin",
        "token",
        "auditor",
        "--role",
        "read-only",
        "--ttl",
        "2h",
    ]);
    assert_eq!(v["role"], "read-only");
    assert!(!v["token"].as_str().unwrap().is_empty());
    let left = v["expires_ms"].as_i64().unwrap() - trustbind_appliance::store::now_ms();
    assert!((7_100_000..=7_200_000).contains(&left), "{left}");
    a.tb()
        .args(["admin", "token", "x", "--ttl", "soon"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no lifetime"));
    // Renewal writes a new cert and key; the old pair is refused.
    std::fs::copy(cli.join("admin.pem"), cli.join("old.pem")).unwrap();
    std::fs::copy(cli.join("admin.key"), cli.join("old.key")).unwrap();
    let v = a.json(&["admin", "renew"]);
    let new_serial = v["admin"]["serial"].as_str().unwrap().to_owned();
    assert_ne!(new_serial, old_serial);
    assert_eq!(a.json(&["status"])["you"], "admin:alice");
    a.tb()
        .arg("status")
        .arg("--cert")
        .arg(cli.join("old.pem"))
        .arg("--key")
        .arg(cli.join("old.key"))
        .assert()
        .code(4);
    // The only admin certificate cannot be revoked; an unknown one is 404.
    a.tb()
        .args(["admin", "revoke", &new_serial])
        .assert()
        .failure()
        .stderr(predicate::str::contains("last valid one"));
    a.tb().args(["admin", "revoke", "0abc"]).assert().failure();
}

#[test]
fn host_tokens_have_a_lifetime_and_can_be_reissued() {
    let a = Appliance::start();
    a.json(&["host", "group", "set", "web", "--mode", "enforce"]);
    let v = a.json(&["host", "enrol-token", "web1", "-g", "web", "--ttl", "10m"]);
    let left = v["token_expires_ms"].as_i64().unwrap() - trustbind_appliance::store::now_ms();
    assert!((590_000..=600_000).contains(&left), "{left}");
    let v = a.json(&["host", "token", "web1"]);
    assert_eq!(v["host"]["state"], "pending");
    assert_ne!(v["token"], serde_json::Value::Null);
}
