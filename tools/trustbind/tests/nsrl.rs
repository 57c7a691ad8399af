//! `trustbind sig import-nsrl` against a real admin API, with SQLite files
//! generated here in NIST's two published RDSv3 layouts (no NIST data is
//! shipped). The same rows go into both layouts, so one set of
//! expectations covers both.

mod common;

use std::collections::HashSet;
use std::path::Path;

use common::Appliance;
use predicates::prelude::*;
use rusqlite::{params, Connection};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The *minimal* RDSv3 sets (`RDS_<version>_modern_minimal.db`): the
/// tables of NIST's `RDS_<version>_modern_minimal.schema.sql`, shipped in
/// every minimal zip beside the database (seen in 2025.03.1 through
/// 2026.09.1). Same tables, columns, types and keys; the `DISTINCT_HASH`
/// view is left out (nothing reads it).
const MINIMAL_DDL: &str = "
CREATE TABLE FILE (
    sha256 VARCHAR NOT NULL, sha1 VARCHAR NOT NULL, md5 VARCHAR NOT NULL, crc32 VARCHAR NOT NULL,
    file_name VARCHAR NOT NULL, file_size INTEGER NOT NULL, package_id INTEGER NOT NULL,
    CONSTRAINT PK_FILE__FILE PRIMARY KEY (sha256, sha1, md5, crc32, file_name, file_size, package_id));
CREATE TABLE MFG (
    manufacturer_id INTEGER NOT NULL, name VARCHAR NOT NULL,
    CONSTRAINT PK_MFG__MFG_ID PRIMARY KEY (manufacturer_id));
CREATE TABLE OS (
    operating_system_id INTEGER NOT NULL, name VARCHAR NOT NULL, version VARCHAR NOT NULL,
    manufacturer_id INTEGER NOT NULL,
    CONSTRAINT PK_OS__OS_ID PRIMARY KEY (operating_system_id, manufacturer_id));
CREATE TABLE PKG (
    package_id INTEGER NOT NULL, name VARCHAR NOT NULL, version VARCHAR NOT NULL,
    operating_system_id INTEGER NOT NULL, manufacturer_id INTEGER NOT NULL,
    language VARCHAR NOT NULL, application_type VARCHAR NOT NULL,
    CONSTRAINT PK_PGK__PKG_ID PRIMARY KEY (package_id, operating_system_id, manufacturer_id, language, application_type));
CREATE TABLE VERSION (
    version VARCHAR UNIQUE NOT NULL, build_set VARCHAR NOT NULL,
    build_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL, release_date TIMESTAMP NOT NULL,
    description VARCHAR NOT NULL,
    CONSTRAINT PK_VERSION__VERSION PRIMARY KEY (version));
";

/// The *full* RDSv3 sets (e.g. `RDS_2024.12.1_modern.db`): NIST's full
/// schema (RDSv3 documentation, <https://s3.amazonaws.com/rds.nsrl.nist.gov/RDS/RDSv3_Docs/RDSv3.pdf>),
/// as dumped from a published set in `docs/RDS_2021.12.2_curated.schema.sql`
/// of <https://github.com/hashlookup/hashlookup-nsrl>. Same tables, columns,
/// types, keys and views (`FILE`, `MFG`, `OS`, `PKG` are views over the
/// normalised tables).
const FULL_DDL: &str = "
CREATE TABLE PACKAGE_OBJECT (
    package_object_id INTEGER UNIQUE NOT NULL, package_id INTEGER NOT NULL,
    object_id INTEGER UNIQUE NOT NULL,
    CONSTRAINT PK_PACKAGE_OBJECT__PACKAGE_OBJECT_ID PRIMARY KEY (package_object_id));
CREATE TABLE APPLICATION (
    application_id INTEGER UNIQUE NOT NULL, package_id INTEGER NOT NULL,
    name VARCHAR DEFAULT '' NOT NULL, name_b64 VARCHAR NOT NULL, name_coding VARCHAR NOT NULL,
    version VARCHAR DEFAULT '', poe VARCHAR DEFAULT 'purchased' NOT NULL, build VARCHAR DEFAULT '',
    latest_copyright VARCHAR DEFAULT '', other VARCHAR DEFAULT '',
    creation_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,
    update_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,
    CONSTRAINT PK_APPPLICATION__APPLICATION_ID PRIMARY KEY (application_id),
    CONSTRAINT FK_APPLICATION__PACKAGE_ID FOREIGN KEY (package_id) REFERENCES PACKAGE_OBJECT (package_id));
CREATE TABLE APPLICATION_TYPE (
    application_type_id INTEGER UNIQUE NOT NULL, description VARCHAR NOT NULL,
    creation_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,
    update_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,
    CONSTRAINT PK_APPLICATION_TYPE__APPLICATION_TYPE_ID PRIMARY KEY (application_type_id));
CREATE TABLE APPLICATION_APPLICATION_TYPE (
    application_application_type_id INTEGER UNIQUE NOT NULL, application_id INTEGER NOT NULL,
    application_type_id INTEGER NOT NULL,
    CONSTRAINT PK_APP_APP_TYPE__APPLICATION_APPLICATION_TYPE_ID PRIMARY KEY (application_application_type_id),
    CONSTRAINT FK_APPLICATION_APPLICATION_TYPE__APPLICATION_ID FOREIGN KEY (application_id) REFERENCES APPLICATION (application_id),
    CONSTRAINT FK_APPLICATION_APPLICATION_TYPE__APPLICATION_TYPE_ID FOREIGN KEY (application_type_id) REFERENCES APPLICATION_TYPE (application_type_id));
CREATE TABLE LANGUAGE (
    language_id INTEGER UNIQUE NOT NULL, name VARCHAR DEFAULT '' NOT NULL,
    creation_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,
    update_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL, language_tag VARCHAR,
    CONSTRAINT PK_LANGUAGE_LANGUAGE_ID PRIMARY KEY (language_id));
CREATE TABLE APPLICATION_LANGUAGE (
    application_language_id INTEGER UNIQUE NOT NULL, language_id INTEGER NOT NULL,
    application_id INTEGER NOT NULL,
    CONSTRAINT PK_APPLICATION_LANGUAGE__APPLICATION_LANGUAGE_ID PRIMARY KEY (application_language_id),
    CONSTRAINT FK_APPLICATIONI_LANGUAGE__APPLICATION_ID FOREIGN KEY (application_id) REFERENCES APPLICATION (application_id),
    CONSTRAINT FK_APPLICATION_LANGUAGE__LANGUAGE_ID FOREIGN KEY (language_id) REFERENCES LANGUAGE (language_id));
CREATE TABLE OPERATING_SYSTEM (
    operating_system_id INTEGER UNIQUE NOT NULL, name VARCHAR DEFAULT '' NOT NULL,
    name_b64 VARCHAR, name_coding VARCHAR, version VARCHAR DEFAULT '' NOT NULL,
    architecture VARCHAR DEFAULT '' NOT NULL,
    creation_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,
    update_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,
    CONSTRAINT PK_OPERATING_SYSTEM__OPERATING_SYSTEM_ID PRIMARY KEY (operating_system_id));
CREATE TABLE OPERATING_SYSTEM_APPLICATION (
    operating_system_application_id INTEGER UNIQUE NOT NULL, operating_system_id INTEGER NOT NULL,
    application_id INTEGER NOT NULL,
    CONSTRAINT PK_OPERATING_SYSTEM_APP__OPERATING_SYSTEM_APP_ID PRIMARY KEY (operating_system_application_id),
    CONSTRAINT FK_OPERATING_SYSTEM_APPLICATION__OS_APPLICATION_ID FOREIGN KEY (operating_system_id) REFERENCES OPERATING_SYSTEM (operating_system_id),
    CONSTRAINT FK_PLATFORM_APPLICATION__APPLICATION_ID FOREIGN KEY (application_id) REFERENCES APPLICATION (application_id));
CREATE TABLE MANUFACTURER (
    manufacturer_id INTEGER UNIQUE NOT NULL, name VARCHAR DEFAULT '' NOT NULL,
    name_b64 VARCHAR, name_coding VARCHAR,
    address1 VARCHAR DEFAULT '' NOT NULL, address1_b64 VARCHAR, address1_coding VARCHAR,
    address2 VARCHAR DEFAULT '' NOT NULL, address2_b64 VARCHAR, address2_coding VARCHAR,
    city VARCHAR DEFAULT '' NOT NULL, city_b64 VARCHAR, city_coding VARCHAR,
    stateprov VARCHAR DEFAULT '' NOT NULL, postal_code VARCHAR DEFAULT '' NOT NULL,
    country VARCHAR DEFAULT '' NOT NULL, telephone VARCHAR DEFAULT '' NOT NULL,
    fax VARCHAR DEFAULT '' NOT NULL, url VARCHAR DEFAULT '' NOT NULL, url_b64 VARCHAR,
    url_coding VARCHAR, email VARCHAR DEFAULT '' NOT NULL,
    creation_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,
    update_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,
    CONSTRAINT PK_MANUFACTURER_MANUFACTURER_ID PRIMARY KEY (manufacturer_id));
CREATE TABLE MANUFACTURER_APPLICATION (
    manufacturer_application_id INTEGER UNIQUE NOT NULL, manufacturer_id INTEGER NOT NULL,
    application_id INTEGER NOT NULL,
    CONSTRAINT PK_MANUFACTURER_APPLICATION__MANUFACTURER_APPLICATION_ID PRIMARY KEY (manufacturer_application_id),
    CONSTRAINT FK_MANUFACTURER_APPLICATION__APPLICATION_ID FOREIGN KEY (application_id) REFERENCES APPLICATION (application_id),
    CONSTRAINT FK_MANUFACTURER_APPLICATION__MANUFACTURER_ID FOREIGN KEY (manufacturer_id) REFERENCES MANUFACTURER (manufacturer_id));
CREATE TABLE MANUFACTURER_OPERATING_SYSTEM (
    manufacturer_operating_system_id INTEGER UNIQUE NOT NULL, operating_system_id INTEGER NOT NULL,
    manufacturer_id INTEGER NOT NULL,
    CONSTRAINT PK_MANUFACTURER_OPERATING_SYSTEM__MANUFACTURER_OS_ID PRIMARY KEY (manufacturer_operating_system_id),
    CONSTRAINT FK_MANUFACTURER_OPERATING_SYSTEM__MANUFACTURER_ID FOREIGN KEY (manufacturer_id) REFERENCES MANUFACTURER (manufacturer_id),
    CONSTRAINT FK_MANUFACTURER_OPERATING_SYSTEM__OPERATING_SYSTEM_ID FOREIGN KEY (operating_system_id) REFERENCES OPERATING_SYSTEM (operating_system_id));
CREATE TABLE METADATA (
    metadata_id NUMERIC UNIQUE NOT NULL, object_id INTEGER, key_hash VARCHAR NOT NULL,
    image_hash VARCHAR, path VARCHAR NOT NULL, path_b64 VARCHAR, path_coding VARCHAR,
    file_name VARCHAR NOT NULL, file_name_b64 VARCHAR, file_name_coding VARCHAR,
    extension VARCHAR DEFAULT '' NOT NULL, extension_b64 VARCHAR, extension_coding VARCHAR,
    bytes INTEGER NOT NULL, mtime TIMESTAMP, used_in_rds TIMESTAMP,
    update_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL, recursion_level INTEGER,
    extractee_id INTEGER DEFAULT 0,
    crc32 VARCHAR NOT NULL, md5 VARCHAR NOT NULL, sha1 VARCHAR NOT NULL, sha256 VARCHAR NOT NULL,
    CONSTRAINT PK_METADATA__METADATA_ID PRIMARY KEY (metadata_id),
    CONSTRAINT FK_METADATA__EXTRACTEE_ID FOREIGN KEY (extractee_id) REFERENCES METADATA (metadata_id),
    CONSTRAINT FK_METADATA__OBJECT_ID FOREIGN KEY (object_id) REFERENCES PACKAGE_OBJECT (object_id));
CREATE TABLE VERSION (
    version VARCHAR UNIQUE NOT NULL, build_set VARCHAR NOT NULL,
    build_date TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL, release_date TIMESTAMP NOT NULL,
    description VARCHAR NOT NULL,
    CONSTRAINT PK_VERSION__VERSION PRIMARY KEY (version));
CREATE VIEW FILE AS
    SELECT UPPER(md.sha256) AS sha256, UPPER(md.sha1) AS sha1, UPPER(md.md5) AS md5,
        CASE md.extension WHEN '' THEN md.file_name ELSE md.file_name||'.'||md.extension END AS file_name,
        md.bytes AS file_size, po.package_id
    FROM METADATA AS md, PACKAGE_OBJECT AS po
    WHERE md.object_id = po.object_id;
CREATE VIEW MFG AS SELECT manufacturer_id, name FROM MANUFACTURER;
CREATE VIEW OS AS
    SELECT os.operating_system_id, os.name, os.version, mos.manufacturer_id
    FROM OPERATING_SYSTEM AS os, MANUFACTURER_OPERATING_SYSTEM AS mos
    WHERE os.operating_system_id = mos.operating_system_id;
CREATE VIEW PKG AS
    SELECT a.package_id, a.name, a.version, osa.operating_system_id, ma.manufacturer_id,
        l.name AS language, at.description AS application_type
    FROM APPLICATION AS a, OPERATING_SYSTEM_APPLICATION AS osa, MANUFACTURER_APPLICATION AS ma,
        APPLICATION_LANGUAGE AS al, LANGUAGE AS l, APPLICATION_APPLICATION_TYPE AS aat,
        APPLICATION_TYPE AS at
    WHERE a.application_id = osa.application_id AND a.application_id = ma.application_id
        AND a.application_id = al.application_id AND al.language_id = l.language_id
        AND a.application_id = aat.application_id AND aat.application_type_id = at.application_type_id;
";

/// Manufacturers (`MFG`).
const MFGS: [(i64, &str); 3] = [
    (1, "Debian"),
    (2, "Microsoft Corporation"),
    (3, "Igor Pavlov"),
];
/// Operating systems (`OS`): id, name, version, manufacturer.
const OSES: [(i64, &str, &str, i64); 2] = [(10, "Linux", "12", 1), (20, "Windows", "11", 2)];
const APP_TYPES: [(i64, &str); 2] = [(1, "Operating System"), (2, "Utility")];
const PACKAGES: i64 = 100;

/// Package `p`: product name, OS id, manufacturer id, application type.
fn package(p: i64) -> (&'static str, i64, i64, &'static str) {
    let name = ["coreutils", "openssl", "Office", "7-Zip"][(p % 4) as usize];
    let os = OSES[(p % 2) as usize].0;
    let mfg = MFGS[(p % 3) as usize].0;
    let ty = APP_TYPES[usize::from(p % 5 != 0)].1;
    (name, os, mfg, ty)
}

/// One file row of the RDS.
struct Row {
    /// Upper-case hex, as published (or garbage, see [`row`]).
    sha256: String,
    sha1: String,
    md5: String,
    crc32: String,
    stem: String,
    ext: &'static str,
    size: i64,
    package: i64,
}

impl Row {
    /// `FILE.file_name`: stem and extension, as the full layout's view joins them.
    fn file_name(&self) -> String {
        if self.ext.is_empty() {
            self.stem.clone()
        } else {
            format!("{}.{}", self.stem, self.ext)
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Row `i` of a set with `distinct` distinct files: the same file appears
/// in several packages, as in the RDS (row `i` and `i + distinct` are one
/// file in two packages). Every 10 000th row has a malformed SHA-256.
fn row(i: u32, distinct: u32) -> Row {
    let key = i % distinct;
    let copy = i64::from(i / distinct);
    let d = Sha256::digest(format!("file{key}").as_bytes());
    let sha256 = if i % 10_000 == 9_999 {
        "not-a-hash".to_owned()
    } else {
        hex(&d)
    };
    let (stem, ext) = if key.is_multiple_of(2) {
        (format!("lib{key}"), "so")
    } else if key.is_multiple_of(7) {
        (format!("tool{key}"), "")
    } else {
        (format!("tool{key}"), "exe")
    };
    Row {
        sha256,
        sha1: hex(&d[..20]),
        md5: hex(&d[..16]),
        crc32: hex(&d[..4]),
        stem,
        ext,
        size: i64::from(key) * 10,
        // Distinct packages for the copies of one file (37 is prime to 100).
        package: (copy * 37 + i64::from(key / 1000)) % PACKAGES,
    }
}

#[derive(Clone, Copy, Debug)]
enum Layout {
    Minimal,
    Full,
}

/// Writes an RDSv3 database of `rows` rows in `layout`.
fn make_rds(path: &Path, layout: Layout, rows: u32, distinct: u32) {
    let mut db = Connection::open(path).unwrap();
    // NIST's full schema declares APPLICATION.package_id a foreign key to
    // PACKAGE_OBJECT.package_id, which is not unique there: with foreign
    // keys enforced (this SQLite's default) no insert would pass. The sqlite3
    // shell NIST builds with does not enforce them.
    db.pragma_update(None, "foreign_keys", false).unwrap();
    let tx = db.transaction().unwrap();
    match layout {
        Layout::Minimal => {
            tx.execute_batch(MINIMAL_DDL).unwrap();
            for (id, name) in MFGS {
                tx.execute("INSERT INTO MFG VALUES (?1, ?2)", params![id, name])
                    .unwrap();
            }
            for (id, name, version, mfg) in OSES {
                tx.execute(
                    "INSERT INTO OS VALUES (?1, ?2, ?3, ?4)",
                    params![id, name, version, mfg],
                )
                .unwrap();
            }
            for p in 0..PACKAGES {
                let (name, os, mfg, ty) = package(p);
                tx.execute(
                    "INSERT INTO PKG VALUES (?1, ?2, '1.0', ?3, ?4, 'English', ?5)",
                    params![p, name, os, mfg, ty],
                )
                .unwrap();
            }
            let mut f = tx
                .prepare("INSERT INTO FILE VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
                .unwrap();
            for i in 0..rows {
                let r = row(i, distinct);
                f.execute(params![
                    r.sha256,
                    r.sha1,
                    r.md5,
                    r.crc32,
                    r.file_name(),
                    r.size,
                    r.package
                ])
                .unwrap();
            }
        }
        Layout::Full => {
            tx.execute_batch(FULL_DDL).unwrap();
            tx.execute_batch("INSERT INTO LANGUAGE (language_id, name) VALUES (1, 'English');")
                .unwrap();
            for (id, name) in MFGS {
                tx.execute(
                    "INSERT INTO MANUFACTURER (manufacturer_id, name) VALUES (?1, ?2)",
                    params![id, name],
                )
                .unwrap();
            }
            for (id, name, version, mfg) in OSES {
                tx.execute(
                    "INSERT INTO OPERATING_SYSTEM (operating_system_id, name, version) VALUES (?1, ?2, ?3)",
                    params![id, name, version],
                )
                .unwrap();
                tx.execute(
                    "INSERT INTO MANUFACTURER_OPERATING_SYSTEM VALUES (?1, ?1, ?2)",
                    params![id, mfg],
                )
                .unwrap();
            }
            for (id, d) in APP_TYPES {
                tx.execute(
                    "INSERT INTO APPLICATION_TYPE (application_type_id, description) VALUES (?1, ?2)",
                    params![id, d],
                )
                .unwrap();
            }
            for p in 0..PACKAGES {
                let (name, os, mfg, ty) = package(p);
                let ty = APP_TYPES.iter().find(|t| t.1 == ty).unwrap().0;
                tx.execute(
                    "INSERT INTO APPLICATION (application_id, package_id, name, name_b64, name_coding, version)
                     VALUES (?1, ?1, ?2, '', 'UTF-8', '1.0')",
                    params![p, name],
                )
                .unwrap();
                for (table, v) in [
                    ("OPERATING_SYSTEM_APPLICATION", os),
                    ("MANUFACTURER_APPLICATION", mfg),
                    ("APPLICATION_LANGUAGE", 1),
                ] {
                    tx.execute(
                        &format!("INSERT INTO {table} VALUES (?1, ?2, ?1)"),
                        params![p, v],
                    )
                    .unwrap();
                }
                tx.execute(
                    "INSERT INTO APPLICATION_APPLICATION_TYPE VALUES (?1, ?1, ?2)",
                    params![p, ty],
                )
                .unwrap();
            }
            let mut po = tx
                .prepare("INSERT INTO PACKAGE_OBJECT VALUES (?1, ?2, ?1)")
                .unwrap();
            let mut md = tx
                .prepare(
                    "INSERT INTO METADATA (metadata_id, object_id, key_hash, path, file_name, extension,
                         bytes, crc32, md5, sha1, sha256)
                     VALUES (?1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .unwrap();
            for i in 0..rows {
                let r = row(i, distinct);
                po.execute(params![i, r.package]).unwrap();
                // METADATA's hashes need not be upper-case (the FILE view
                // upper-cases them): lower-case here.
                md.execute(params![
                    i,
                    r.sha1,
                    format!("/pkg{}/{}", r.package, r.file_name()),
                    r.stem,
                    r.ext,
                    r.size,
                    r.crc32.to_lowercase(),
                    r.md5.to_lowercase(),
                    r.sha1.to_lowercase(),
                    r.sha256.to_lowercase(),
                ])
                .unwrap();
            }
        }
    }
    tx.commit().unwrap();
}

const ROWS: u32 = 100_000;
/// Distinct files in the test sets.
const DISTINCT: u32 = 80_000;

/// The SHA-256 values an import of the rows that `pred` keeps must leave in
/// the group.
fn expected(pred: impl Fn(&Row) -> bool) -> HashSet<String> {
    (0..ROWS)
        .map(|i| row(i, DISTINCT))
        .filter(|r| r.sha256 != "not-a-hash" && pred(r))
        .map(|r| r.sha256.to_lowercase())
        .collect()
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

fn import(a: &Appliance, db: &Path, group: &str, extra: &[&str]) -> Value {
    let mut args = vec!["sig", "import-nsrl", db.to_str().unwrap(), "--group", group];
    args.extend_from_slice(extra);
    a.json(&args)
}

#[test]
fn minimal_layout_import_reimport_and_resume() {
    let a = Appliance::start();
    let db = a.dir.path().join("RDS_test_modern_minimal.db");
    make_rds(&db, Layout::Minimal, ROWS, DISTINCT);
    let want = expected(|_| true);
    assert_eq!(want.len(), 79_992);

    // Interrupted by a row cap after 30 000 rows (at the end of a file's
    // rows, so at most one more), then the rest.
    let v = import(&a, &db, "nsrl", &["--max-rows", "30000"]);
    assert_eq!(v["complete"], false);
    assert_eq!(v["layout"], "minimal");
    assert_eq!(v["source"], "FILE");
    let first = v["rows"].as_u64().unwrap();
    assert!((30_000..30_002).contains(&first), "{v}");
    let part = members(&a, "nsrl");
    assert_eq!(part.len() as u64, v["inserted"].as_u64().unwrap());
    // Hashes go in SHA-256 order: the first part is a prefix of the whole.
    let mut sorted: Vec<_> = want.iter().cloned().collect();
    sorted.sort();
    assert_eq!(
        part,
        sorted[..part.len()].iter().cloned().collect::<HashSet<_>>()
    );
    let v = import(&a, &db, "nsrl", &[]);
    assert_eq!(v["complete"], true);
    assert_eq!(v["rows"], u64::from(ROWS));
    assert_eq!(v["rows_this_run"], u64::from(ROWS) - first);
    assert_eq!(v["invalid"], 10);
    assert_eq!(v["inserted"], want.len() as u64);
    // Each file is sent once, however many packages hold it.
    assert_eq!(v["sent"], want.len() as u64);
    assert_eq!(members(&a, "nsrl"), want);
    // The SHA-1 and the name come along.
    let some = want.iter().next().unwrap();
    let sig = a.store.signature(some).unwrap().unwrap();
    assert_eq!(sig.sha1.unwrap().len(), 40);
    assert!(sig.name.starts_with("lib") || sig.name.starts_with("tool"));
    assert_eq!(sig.source, "nsrl");

    // Running again continues from the end: nothing to do.
    let v = import(&a, &db, "nsrl", &[]);
    assert_eq!(v["rows_this_run"], 0);
    assert_eq!(v["complete"], true);
    // Re-importing from scratch changes nothing and duplicates nothing.
    let v = import(&a, &db, "nsrl", &["--restart"]);
    assert_eq!(v["rows"], u64::from(ROWS));
    assert_eq!(v["inserted"], 0);
    assert_eq!(v["updated"], 0);
    assert_eq!(v["added_to_group"], 0);
    assert_eq!(members(&a, "nsrl"), want);

    // Another group must not reuse this state file.
    a.tb()
        .args(["sig", "import-nsrl"])
        .arg(&db)
        .args(["--group", "other"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("pass --restart"));
}

/// The import is sent as `bulk`: 80 batches approving three programs a
/// host was denied move the policy generation (what hosts cache verdicts
/// under) not once per batch but once, when the import has gone quiet.
#[test]
fn an_import_moves_the_policy_generation_once() {
    let a = Appliance::start();
    let db = a.dir.path().join("RDS_test_modern_minimal.db");
    make_rds(&db, Layout::Minimal, ROWS, DISTINCT);
    let want = expected(|_| true);
    // After a start the store cannot know what hosts cached; any move
    // makes it exact.
    a.store.set_user_roles("u", &["r"], "admin:t").unwrap();
    let v0 = a.store.versions().unwrap();
    for h in want.iter().take(3) {
        assert!(a
            .store
            .note_answer(v0.generation, v0.members, &[h.as_str()], false));
    }
    let v = import(&a, &db, "nsrl", &["--batch", "1000"]);
    assert_eq!(v["complete"], true);
    assert_eq!(v["inserted"], want.len() as u64);
    assert_eq!(a.store.versions().unwrap().generation, v0.generation);
    assert!(a.store.deferred_move());
    let quiet = i64::MAX / 2;
    assert_eq!(
        a.store.settle_deferred(quiet, 2_000, 600_000).unwrap(),
        Some(v0.generation + 1)
    );
}

#[test]
fn full_layout_imports_the_same_files() {
    let a = Appliance::start();
    let db = a.dir.path().join("RDS_test_modern.db");
    make_rds(&db, Layout::Full, ROWS, DISTINCT);
    let want = expected(|_| true);
    let v = import(&a, &db, "full", &["--max-rows", "50000", "--batch", "700"]);
    assert_eq!(v["layout"], "full");
    assert_eq!(v["source"], "METADATA");
    assert_eq!(v["complete"], false);
    let v = import(&a, &db, "full", &["--batch", "10000"]);
    assert_eq!(v["complete"], true);
    assert_eq!(v["rows"], u64::from(ROWS));
    assert_eq!(v["invalid"], 10);
    assert_eq!(v["sent"], want.len() as u64);
    assert_eq!(v["inserted"], want.len() as u64);
    assert_eq!(members(&a, "full"), want);
    // Names are the FILE view's: stem and extension joined, stem alone
    // without an extension; hashes lower-case whatever the source's case.
    for (i, name) in [(2_u32, "lib2.so"), (7, "tool7"), (9, "tool9.exe")] {
        let r = row(i, DISTINCT);
        let sig = a
            .store
            .signature(&r.sha256.to_lowercase())
            .unwrap()
            .unwrap();
        assert_eq!(sig.name, name);
        assert_eq!(sig.size, u64::try_from(r.size).unwrap());
        assert_eq!(sig.sha1.unwrap(), r.sha1.to_lowercase());
    }
}

#[test]
fn killed_import_resumes_without_loss_or_duplicates() {
    for (layout, file) in [(Layout::Minimal, "min.db"), (Layout::Full, "full.db")] {
        let a = Appliance::start();
        let db = a.dir.path().join(file);
        make_rds(&db, layout, ROWS, DISTINCT);
        let state = a.dir.path().join(format!("{file}.trustbind-import.json"));
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
        assert!(
            saved["sent"].as_u64().unwrap() >= 500,
            "{layout:?}: {saved}"
        );
        assert!(saved["rows"].as_u64().unwrap() < u64::from(ROWS), "{saved}");
        let v = import(&a, &db, "nsrl", &["--batch", "5000"]);
        assert_eq!(v["complete"], true, "{layout:?}");
        // Every row counted and every file sent exactly once over both runs.
        assert_eq!(v["rows"], u64::from(ROWS), "{layout:?}");
        assert_eq!(v["sent"], expected(|_| true).len() as u64, "{layout:?}");
        assert_eq!(members(&a, "nsrl"), expected(|_| true), "{layout:?}");
    }
}

#[test]
fn filters_by_product_os_manufacturer_and_type_in_both_layouts() {
    let a = Appliance::start();
    for (layout, file) in [(Layout::Minimal, "min.db"), (Layout::Full, "full.db")] {
        let db = a.dir.path().join(file);
        make_rds(&db, layout, ROWS, DISTINCT);
        let g = |n: &str| format!("{file}-{n}");

        // Linux packages from Debian: p even and p % 3 == 0. Case and globs
        // as a user types them.
        let v = import(
            &a,
            &db,
            &g("deb"),
            &["--os", "linux", "--manufacturer", "Deb*"],
        );
        assert_eq!(v["complete"], true);
        let want = expected(|r| {
            let (_, os, mfg, _) = package(r.package);
            os == 10 && mfg == 1
        });
        assert!(!want.is_empty());
        assert_eq!(members(&a, &g("deb")), want, "{layout:?}");

        // Two products (either), of one application type, OS by name and
        // version, plus the file filters.
        let v = import(
            &a,
            &db,
            &g("tools"),
            &[
                "--product",
                "coreutils",
                "--product",
                "7-zip",
                "--app-type",
                "utility",
                "--os",
                "Windows 11",
                "--filter",
                "name=tool*",
                "--restart",
            ],
        );
        assert_eq!(v["complete"], true);
        let want = expected(|r| {
            let (name, os, _, ty) = package(r.package);
            (name == "coreutils" || name == "7-Zip")
                && ty == "Utility"
                && os == 20
                && r.stem.starts_with("tool")
        });
        assert!(!want.is_empty());
        assert_eq!(members(&a, &g("tools")), want, "{layout:?}");

        // Values that match nothing name the flag and the table.
        let run = |args: &[&str]| {
            let mut c = a.tb();
            c.args(["sig", "import-nsrl"])
                .arg(&db)
                .args(["--group", "x"])
                .args(args);
            c.assert()
        };
        run(&["--os", "Plan 9"]).code(2).stderr(
            predicate::str::contains("--os `Plan 9` matches no operating system in OS")
                .and(predicate::str::contains("Linux 12")),
        );
        run(&["--manufacturer", "Nobody"])
            .code(2)
            .stderr(predicate::str::contains(
                "--manufacturer `Nobody` matches no manufacturer in MFG",
            ));
        run(&["--product", "emacs"])
            .code(2)
            .stderr(predicate::str::contains(
                "--product `emacs` matches no product in PKG",
            ));
        run(&["--app-type", "Game"])
            .code(2)
            .stderr(predicate::str::contains(
                "--app-type `Game` matches no application type in PKG",
            ));
        run(&["--product", ""])
            .code(2)
            .stderr(predicate::str::contains("--product must not be empty"));
        // Each matches something, together nothing (Office is p % 4 == 2:
        // even, so never on Windows).
        run(&["--product", "Office", "--os", "Windows"])
            .code(2)
            .stderr(predicate::str::contains(
                "no package in PKG matches --product Office --os Windows",
            ));
    }
    // Nothing was imported by the refused runs.
    assert!(members(&a, "x").is_empty());
}

#[test]
fn long_names_are_sent_in_requests_the_appliance_accepts() {
    // 2 100 files with 4 000-byte names: one request of 10 000 would be
    // over the appliance's 8 MiB body limit.
    let a = Appliance::start();
    let db = a.dir.path().join("long.db");
    let mut c = Connection::open(&db).unwrap();
    let tx = c.transaction().unwrap();
    tx.execute_batch(MINIMAL_DDL).unwrap();
    let mut want = HashSet::new();
    for i in 0..2_100_u32 {
        let d = Sha256::digest(i.to_le_bytes());
        let name = format!("{i:04}{}", "n".repeat(3_996));
        tx.execute(
            "INSERT INTO FILE VALUES (?1, ?2, '', '', ?3, 1, 1)",
            params![hex(&d), hex(&d[..20]), name],
        )
        .unwrap();
        want.insert(hex(&d).to_lowercase());
    }
    tx.commit().unwrap();
    let v = import(&a, &db, "long", &["--batch", "10000"]);
    assert_eq!(v["complete"], true);
    assert_eq!(v["sent"], 2_100);
    assert_eq!(members(&a, "long"), want);
}

#[test]
fn state_files_of_the_rowid_importer_are_not_resumed() {
    // The importer before SHA-256 order kept a rowid; resuming from it
    // would skip or repeat files, so it is refused with what to do.
    let a = Appliance::start();
    let db = a.dir.path().join("old.db");
    make_rds(&db, Layout::Minimal, 1_000, 800);
    let state = a.dir.path().join("old.db.trustbind-import.json");
    let old = serde_json::json!({
        "db": std::fs::canonicalize(&db).unwrap().display().to_string(),
        "group": "g", "filters": [], "last_rowid": 500, "rows": 500, "invalid": 0,
        "sent": 500, "inserted": 500, "updated": 0, "unchanged": 0,
        "added_to_group": 500, "complete": false
    });
    std::fs::write(&state, old.to_string()).unwrap();
    a.tb()
        .args(["sig", "import-nsrl"])
        .arg(&db)
        .args(["--group", "g"])
        .assert()
        .code(7)
        .stderr(predicate::str::contains(
            "was written by an older trustbind that read rows in rowid order; pass --restart",
        ));
    let v = import(&a, &db, "g", &["--restart"]);
    assert_eq!(v["complete"], true);
    assert_eq!(v["rows"], 1_000);
}

#[test]
fn refuses_what_is_not_an_rdsv3_database() {
    let a = Appliance::start();
    let run = |db: &Path, extra: &[&str]| {
        let mut c = a.tb();
        c.args(["sig", "import-nsrl"])
            .arg(db)
            .args(["--group", "g"])
            .args(extra);
        c.assert()
    };
    let sql = |name: &str, ddl: &str| {
        let p = a.dir.path().join(name);
        Connection::open(&p).unwrap().execute_batch(ddl).unwrap();
        p
    };
    let other = sql("other.db", "CREATE TABLE t (x INTEGER);");
    run(&other, &[]).code(7).stderr(predicate::str::contains(
        "has neither a FILE table (minimal RDSv3) nor METADATA and PACKAGE_OBJECT tables (full RDSv3)",
    ));
    // A full set without its PACKAGE_OBJECT table.
    let no_po = sql(
        "nopo.db",
        "CREATE TABLE METADATA (sha256 TEXT, sha1 TEXT, file_name TEXT, extension TEXT, bytes INTEGER, object_id INTEGER);",
    );
    run(&no_po, &[])
        .code(7)
        .stderr(predicate::str::contains("no PACKAGE_OBJECT table"));
    // A column missing: named with its table.
    let no_bytes = sql(
        "nobytes.db",
        "CREATE TABLE METADATA (sha256 TEXT, sha1 TEXT, file_name TEXT, extension TEXT, object_id INTEGER);
         CREATE TABLE PACKAGE_OBJECT (package_id INTEGER, object_id INTEGER);",
    );
    run(&no_bytes, &[])
        .code(7)
        .stderr(predicate::str::contains("METADATA has no column bytes"));
    let min_no_sha1 = sql(
        "nosha1.db",
        "CREATE TABLE FILE (sha256 TEXT, file_name TEXT, file_size INTEGER, package_id INTEGER);",
    );
    run(&min_no_sha1, &[])
        .code(7)
        .stderr(predicate::str::contains("FILE has no column sha1"));
    // Product filters need the PKG table.
    let no_pkg = sql(
        "nopkg.db",
        "CREATE TABLE FILE (sha256 TEXT, sha1 TEXT, file_name TEXT, file_size INTEGER, package_id INTEGER);",
    );
    run(&no_pkg, &["--product", "x"])
        .code(7)
        .stderr(predicate::str::contains("--product needs the PKG table"));
    run(&no_pkg, &["--filter", "colour=red"])
        .code(2)
        .stderr(predicate::str::contains("unknown key `colour`"));
    run(Path::new("/nonexistent/rds.db"), &[])
        .code(7)
        .stderr(predicate::str::contains("/nonexistent/rds.db"));
}

/// Throughput: `cargo test --release -p trustbind-cli --test nsrl -- --ignored --nocapture bench`
/// (`TB_NSRL_BENCH_ROWS`, default 2 000 000 rows, six per distinct file as
/// in the 2026.09 modern minimal set; `TB_NSRL_BENCH_LAYOUT=full` for the
/// full layout). Prints rows/s and the appliance database's bytes per
/// signature; fails below `TB_NSRL_BENCH_MIN` rows/s when that is set.
#[test]
#[ignore = "benchmark: run in release with --ignored"]
fn bench_import() {
    let rows: u32 = std::env::var("TB_NSRL_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let layout = match std::env::var("TB_NSRL_BENCH_LAYOUT").as_deref() {
        Ok("full") => Layout::Full,
        _ => Layout::Minimal,
    };
    let distinct = rows / 6;
    let a = Appliance::start();
    let db = a.dir.path().join("bench.db");
    let t = std::time::Instant::now();
    make_rds(&db, layout, rows, distinct);
    eprintln!("generated {rows} rows ({layout:?}) in {:?}", t.elapsed());
    let v = import(&a, &db, "nsrl", &["--batch", "10000"]);
    assert_eq!(v["complete"], true);
    assert_eq!(v["rows"], u64::from(rows));
    let want: HashSet<String> = (0..rows)
        .map(|i| row(i, distinct))
        .filter(|r| r.sha256 != "not-a-hash")
        .map(|r| r.sha256.to_lowercase())
        .collect();
    assert_eq!(v["inserted"], want.len() as u64);
    let rate = v["rows_per_second"].as_f64().unwrap();
    eprintln!(
        "NSRL import ({}, {layout:?}): {rows} rows, {} signatures in {:.1} s: {rate} rows/s",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        want.len(),
        v["seconds"].as_f64().unwrap(),
    );
    // The appliance's storage per signature (checkpointed, so the WAL is
    // in the main file).
    let store = Connection::open(a.dir.path().join("appliance.db")).unwrap();
    store
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let bytes: i64 = store
        .query_row(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
            [],
            |r| r.get(0),
        )
        .unwrap();
    eprintln!(
        "appliance.db: {bytes} bytes, {:.0} bytes per signature (with its group membership)",
        bytes as f64 / want.len() as f64
    );
    if let Ok(mut st) =
        store.prepare("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC LIMIT 8")
    {
        let parts = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .unwrap();
        for p in parts {
            let (name, size) = p.unwrap();
            eprintln!(
                "  {name}: {:.1} bytes per signature",
                size as f64 / want.len() as f64
            );
        }
    }
    if let Some(min) = std::env::var("TB_NSRL_BENCH_MIN")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        assert!(rate >= min, "{rate} rows/s is below {min}");
    }
}
