//! `trustbind sig import-nsrl` against a real admin API, with RDSv3-shaped
//! SQLite files generated here (no NIST data is shipped).

mod common;

use std::collections::HashSet;
use std::path::Path;

use common::Appliance;
use predicates::prelude::*;
use rusqlite::{params, Connection};
use serde_json::Value;
use sha2::{Digest, Sha256};

const ROWS: u32 = 100_000;
/// Distinct files: the same file appears in several packages, as in the RDS.
const DISTINCT: u32 = 80_000;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Row `i`: (sha256, sha1, md5, file_name, file_size, package_id). Every
/// 10 000th row has a malformed SHA-256.
fn row(i: u32) -> (String, String, String, String, i64, i64) {
    let key = i % DISTINCT;
    let d = Sha256::digest(format!("file{key}").as_bytes());
    let sha256 = if i % 10_000 == 9_999 {
        "not-a-hash".to_owned()
    } else {
        hex(&d).to_uppercase() // the RDS publishes upper-case hex
    };
    let sha1 = hex(&d[..20]).to_uppercase();
    let md5 = hex(&d[..16]).to_uppercase();
    let name = if key.is_multiple_of(2) {
        format!("lib{key}.so")
    } else {
        format!("tool{key}.exe")
    };
    (
        sha256,
        sha1,
        md5,
        name,
        i64::from(key) * 10,
        i64::from(i / 1000),
    )
}

/// The SHA-256 values an import of every row must leave in the group.
fn expected(pred: impl Fn(&str) -> bool) -> HashSet<String> {
    (0..ROWS)
        .map(row)
        .filter(|r| r.0 != "not-a-hash" && pred(&r.3))
        .map(|r| r.0.to_lowercase())
        .collect()
}

/// The reduced RDSv3 layout: FILE, PKG, OS and MFG as tables.
fn make_rds(path: &Path) {
    let mut db = Connection::open(path).unwrap();
    db.execute_batch(
        "CREATE TABLE FILE (
             sha256 VARCHAR NOT NULL, sha1 VARCHAR NOT NULL, md5 VARCHAR NOT NULL,
             file_name VARCHAR NOT NULL, file_size INTEGER NOT NULL, package_id INTEGER NOT NULL,
             CONSTRAINT PK_FILE__FILE PRIMARY KEY (sha256, sha1, md5, file_name, file_size, package_id));
         CREATE TABLE MFG (manufacturer_id INTEGER NOT NULL, name VARCHAR NOT NULL,
             CONSTRAINT PK_MFG__MFG_ID PRIMARY KEY (manufacturer_id));
         CREATE TABLE OS (operating_system_id INTEGER, name VARCHAR NOT NULL, version VARCHAR NOT NULL,
             manufacturer_id INTEGER NOT NULL,
             CONSTRAINT PK_OS__OS_ID PRIMARY KEY (operating_system_id, manufacturer_id));
         CREATE TABLE PKG (package_id INTEGER NOT NULL, name VARCHAR NOT NULL, version VARCHAR NOT NULL,
             operating_system_id INTEGER NOT NULL, manufacturer_id INTEGER NOT NULL,
             language VARCHAR NOT NULL, application_type VARCHAR NOT NULL);
         INSERT INTO MFG VALUES (1, 'Example Corp');
         INSERT INTO OS VALUES (1, 'Linux', '6', 1);",
    )
    .unwrap();
    let tx = db.transaction().unwrap();
    {
        let mut p = tx
            .prepare("INSERT INTO PKG VALUES (?1, ?2, '1.0', 1, 1, 'English', 'Utility')")
            .unwrap();
        for id in 0..100 {
            p.execute(params![id, format!("package {id}")]).unwrap();
        }
        let mut f = tx
            .prepare("INSERT INTO FILE VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .unwrap();
        for i in 0..ROWS {
            let r = row(i);
            f.execute(params![r.0, r.1, r.2, r.3, r.4, r.5]).unwrap();
        }
    }
    tx.commit().unwrap();
}

fn members(a: &Appliance, group: &str) -> HashSet<String> {
    let mut all = HashSet::new();
    let mut after = String::new();
    loop {
        let page = a.store.list_signatures(Some(group), &after, 1000).unwrap();
        let Some(last) = page.last() else { break };
        after = last.sha256.clone();
        all.extend(page.into_iter().map(|s| s.sha256));
    }
    all
}

fn import(a: &Appliance, db: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "sig",
        "import-nsrl",
        db.to_str().unwrap(),
        "--group",
        "nsrl",
    ];
    args.extend_from_slice(extra);
    a.json(&args)
}

#[test]
fn import_reimport_and_resume() {
    let a = Appliance::start();
    let db = a.dir.path().join("RDS_test_modern.db");
    make_rds(&db);
    let want = expected(|_| true);
    assert_eq!(want.len(), 79_992);

    // Interrupted by a row cap: 30 000 rows, then the rest.
    let v = import(&a, &db, &["--max-rows", "30000"]);
    assert_eq!(v["complete"], false);
    assert_eq!(v["rows"], 30_000);
    assert_eq!(v["source"], "FILE");
    let part = members(&a, "nsrl");
    assert_eq!(part.len() as u64, v["inserted"].as_u64().unwrap());
    let v = import(&a, &db, &[]);
    assert_eq!(v["complete"], true);
    assert_eq!(v["rows"], u64::from(ROWS));
    assert_eq!(v["rows_this_run"], u64::from(ROWS) - 30_000);
    assert_eq!(v["invalid"], 10);
    assert_eq!(v["inserted"], want.len() as u64);
    assert_eq!(members(&a, "nsrl"), want);
    eprintln!(
        "NSRL import ({} build, appliance in-process, batch 5000): {} rows/s",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        v["rows_per_second"]
    );
    // The SHA-1 and the name come along.
    let some = want.iter().next().unwrap();
    let sig = a.store.signature(some).unwrap().unwrap();
    assert_eq!(sig.sha1.unwrap().len(), 40);
    assert!(sig.name.starts_with("lib") || sig.name.starts_with("tool"));
    assert_eq!(sig.source, "nsrl");

    // Running again continues from the end: nothing to do.
    let v = import(&a, &db, &[]);
    assert_eq!(v["rows_this_run"], 0);
    assert_eq!(v["complete"], true);
    // Re-importing from scratch changes nothing and duplicates nothing.
    let v = import(&a, &db, &["--restart"]);
    assert_eq!(v["rows"], u64::from(ROWS));
    assert_eq!(v["inserted"], 0);
    assert_eq!(v["updated"], 0);
    assert_eq!(v["added_to_group"], 0);
    assert_eq!(members(&a, "nsrl"), want);

    // Another group with different filters must not reuse this state file.
    a.tb()
        .args(["sig", "import-nsrl"])
        .arg(&db)
        .args(["--group", "other"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("pass --restart"));
}

#[test]
fn killed_import_resumes_without_loss_or_duplicates() {
    let a = Appliance::start();
    let db = a.dir.path().join("rds.db");
    make_rds(&db);
    let state = a.dir.path().join("rds.db.trustbind-import.json");
    let bin = assert_cmd::cargo::cargo_bin("trustbind");
    let mut child = std::process::Command::new(bin)
        .env("TRUSTBIND_CONFIG", &a.config)
        .args(["-o", "json", "sig", "import-nsrl"])
        .arg(&db)
        .args(["--group", "nsrl", "--batch", "500"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until at least one batch was acknowledged, then kill it hard.
    loop {
        if state.exists() || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    let saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert!(saved["rows"].as_u64().unwrap() >= 500);
    let v = import(&a, &db, &["--batch", "5000"]);
    assert_eq!(v["complete"], true);
    // Every row counted exactly once over both runs.
    assert_eq!(v["rows"], u64::from(ROWS));
    assert_eq!(members(&a, "nsrl"), expected(|_| true));
}

#[test]
fn filters_full_rdsv3_layout_and_errors() {
    let a = Appliance::start();
    // The full layout: METADATA table, FILE a view over it.
    let db = a.dir.path().join("full.db");
    {
        let c = Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE METADATA (sha256 TEXT, sha1 TEXT, md5 TEXT, crc32 TEXT, file_name TEXT,
                 file_size INTEGER, package_id INTEGER, extension TEXT);
             CREATE VIEW FILE AS SELECT sha256, sha1, md5, file_name, file_size, package_id FROM METADATA;",
        )
        .unwrap();
        for i in 0..1000_u32 {
            let r = row(i);
            c.execute(
                "INSERT INTO METADATA VALUES (?1, ?2, ?3, '', ?4, ?5, ?6, '')",
                params![r.0, r.1, r.2, r.3, r.4, r.5],
            )
            .unwrap();
        }
    }
    let v = a.json(&[
        "sig",
        "import-nsrl",
        db.to_str().unwrap(),
        "--group",
        "libs",
        "--filter",
        "name=lib*.so",
        "--filter",
        "max-size=5000",
    ]);
    assert_eq!(v["source"], "METADATA");
    // Keys 0..=500 that are even: lib0 .. lib500.
    let want: HashSet<String> = (0..1000)
        .map(row)
        .filter(|r| r.3.starts_with("lib") && r.4 <= 5000)
        .map(|r| r.0.to_lowercase())
        .collect();
    assert_eq!(want.len(), 251);
    assert_eq!(members(&a, "libs"), want);

    // Not an RDS database.
    let other = a.dir.path().join("other.db");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x INTEGER);")
        .unwrap();
    a.tb()
        .args(["sig", "import-nsrl"])
        .arg(&other)
        .args(["--group", "g"])
        .assert()
        .code(7)
        .stderr(predicate::str::contains("has no FILE or METADATA table"));
    a.tb()
        .args(["sig", "import-nsrl"])
        .arg(&db)
        .args(["--group", "g", "--filter", "colour=red"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown key `colour`"));
    a.tb()
        .args(["sig", "import-nsrl", "/nonexistent/rds.db", "--group", "g"])
        .assert()
        .code(7)
        .stderr(predicate::str::contains("/nonexistent/rds.db"));
}
