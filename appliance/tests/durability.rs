//! `kill -9` of a process appending audit rows loses no acknowledged row,
//! and the database passes `PRAGMA integrity_check` afterwards.
//!
//! The test binary re-runs itself as the writer child (selected by an
//! environment variable), prints `acked <seq>` after each committed append,
//! and is killed with SIGKILL while writing from two threads.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use trustbind_appliance::store::{AuditEvent, Store};

const CHILD_ENV: &str = "TRUSTBIND_DURABILITY_CHILD_DB";
const TEST_NAME: &str = "kill_9_loses_no_acknowledged_audit_row";

fn child(db: &str) {
    let store = Arc::new(Store::open(std::path::Path::new(db)).unwrap());
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || loop {
                let ev = AuditEvent {
                    kind: "decision".into(),
                    actor: format!("w{t}"),
                    detail: serde_json::json!({ "t": t }).to_string(),
                };
                let row = store.append_audit(&ev).unwrap();
                println!("acked {}", row.seq);
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

#[test]
fn kill_9_loses_no_acknowledged_audit_row() {
    if let Ok(db) = std::env::var(CHILD_ENV) {
        child(&db);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("appliance.db");
    drop(Store::open(&path).unwrap());

    let mut proc = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acked = BTreeSet::new();
    let lines = BufReader::new(proc.stdout.take().unwrap()).lines();
    for line in lines {
        let line = line.unwrap();
        if let Some(seq) = line.strip_prefix("acked ") {
            acked.insert(seq.parse::<i64>().unwrap());
            if acked.len() >= 300 {
                break;
            }
        }
    }
    proc.kill().unwrap(); // SIGKILL
    proc.wait().unwrap();
    assert!(acked.len() >= 300, "child stopped early");

    let store = Store::open(&path).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    let n = store.verify_audit().unwrap().unwrap();
    let stored: BTreeSet<i64> = store
        .audit_rows(0, u32::MAX)
        .unwrap()
        .into_iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(stored.len() as i64, n);
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged rows lost: {lost:?}");
}
