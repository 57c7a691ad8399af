//! Retention (issue 16 item 4, T-67): the oldest rows are exported (JSON
//! lines, fsynced) before they are pruned; the audit chain verifies from a
//! signed checkpoint; a tampered export or checkpoint is found; a full
//! disk does not stop decisions (the loss is recorded as an `audit.gap`
//! row once space returns); export files survive a crash.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{exec, Appliance};
use trustbind_appliance::agent_api::pb::{QualifyBatch, Verdict};
use trustbind_appliance::pki::Pki;
use trustbind_appliance::retention::{
    self, verify_checkpoint, verify_export, Config, ExportLine, ExportLog, Retention,
};
use trustbind_appliance::store::{AgentRecord, AuditEvent, Store, StoreError};

const LS: [u8; 32] = [0x11; 32];

/// A config that prunes nothing unless told: no ages, no row limits,
/// a store budget no test reaches.
fn quiet() -> Config {
    Config {
        audit_max_age: None,
        channel_max_age: None,
        report_max_age: None,
        store_max_percent: 90,
        export_max_percent: 90,
        alarm_percent: 1,
        reserve_bytes: 0,
        batch: 700,
        ..Config::default()
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    pki: Arc<Pki>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("appliance.db")).unwrap());
    let pki = Arc::new(Pki::open_or_create(dir.path(), &["localhost".into()]).unwrap());
    Fixture { dir, store, pki }
}

impl Fixture {
    fn retention(&self, cfg: Config) -> Retention {
        Retention::new(
            Arc::clone(&self.store),
            cfg,
            self.dir.path(),
            retention::server_key_signer(Arc::clone(&self.pki)),
            None,
        )
        .unwrap()
    }

    fn append(&self, n: usize) {
        let evs: Vec<AuditEvent> = (0..n)
            .map(|i| {
                AuditEvent::new(
                    "test",
                    "t",
                    serde_json::json!({ "i": i, "pad": "x".repeat(200) }),
                )
            })
            .collect();
        for chunk in evs.chunks(1000) {
            self.store.append_audit_batch(chunk).unwrap();
        }
    }

    fn export_lines(&self, prefix: &str) -> Vec<String> {
        let dir = self.dir.path().join(retention::EXPORT_DIR);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(&format!("{prefix}-")))
            .collect();
        names.sort();
        names
            .iter()
            .flat_map(|n| {
                std::fs::read_to_string(dir.join(n))
                    .unwrap()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The sequence numbers of the audit rows among export `lines`.
fn row_seqs(lines: &[String]) -> Vec<i64> {
    lines
        .iter()
        .filter_map(|l| match serde_json::from_str::<ExportLine>(l).unwrap() {
            ExportLine::Row(r) => Some(r.seq),
            ExportLine::Checkpoint { .. } => None,
        })
        .collect()
}

#[test]
fn a_row_budget_exports_then_prunes_the_oldest_rows_and_the_chain_verifies_from_a_signed_checkpoint(
) {
    let f = fixture();
    f.append(5_000);
    let mut r = f.retention(Config {
        audit_max_rows: Some(1_000),
        ..quiet()
    });
    let rep = r.pass().unwrap();
    assert!(rep.audit >= 4_000, "{rep:?}");
    let (rows, _, _) = f.store.retained_rows().unwrap();
    // The budget, plus the `audit.prune` rows of each batch.
    assert!(rows <= 1_000 + 10, "{rows} rows kept");

    // Verified from the newest checkpoint, which the CA's server key signed.
    let report = f.store.verify_audit_from_checkpoint().unwrap().unwrap();
    let cp = report.checkpoint.clone().unwrap();
    assert_eq!(cp.total_rows, rep.audit as i64);
    assert_eq!(report.rows, rows);
    assert_eq!(report.head, cp.upto_seq + rows);
    verify_checkpoint(&cp, f.pki.ca_der()).unwrap();
    assert!(f.store.verify_audit().unwrap().is_ok());

    // Every pruned row is in the export file, in order, with each batch's
    // checkpoint after its rows; the file verifies alone.
    let lines = f.export_lines("audit");
    let exported = row_seqs(&lines);
    assert_eq!(exported, (1..=cp.upto_seq).collect::<Vec<_>>());
    let v = verify_export(lines, Some(f.pki.ca_der())).unwrap();
    assert_eq!(v.checkpointed_upto, cp.upto_seq);
    assert_eq!(v.rows, cp.upto_seq as u64);
    assert_eq!(v.checkpoints, report.checkpoints as u64);

    // The rows left start right after the checkpoint.
    let left = f.store.audit_rows(0, 10).unwrap();
    assert_eq!(left[0].seq, cp.upto_seq + 1);
    assert_eq!(left[0].prev_hash, cp.upto_hash);
}

#[test]
fn an_age_budget_prunes_rows_older_than_the_age() {
    let f = fixture();
    f.append(300);
    std::thread::sleep(Duration::from_millis(20));
    let mut r = f.retention(Config {
        audit_max_age: Some(Duration::from_millis(10)),
        ..quiet()
    });
    let rep = r.pass().unwrap();
    assert_eq!(rep.audit, 300);
    // Only the prune's own rows are left, younger than the age.
    let left = f.store.audit_rows(0, 100).unwrap();
    assert!(left.iter().all(|r| r.kind == "audit.prune"), "{left:?}");
    assert!(f.store.verify_audit().unwrap().is_ok());
}

#[test]
fn channels_and_agent_report_ids_are_exported_then_pruned() {
    let f = fixture();
    for i in 0..50 {
        f.store
            .open_channel(&format!("{i:032x}"), "web1", "db1", "a -> b")
            .unwrap();
    }
    // Close 30 of them (as the agents' reports would).
    let c = rusqlite::Connection::open(f.dir.path().join("appliance.db")).unwrap();
    c.execute("UPDATE channels SET closed_ms = 1 WHERE id <= 30", [])
        .unwrap();
    drop(c);
    let recs: Vec<AgentRecord> = (0..40)
        .map(|i| AgentRecord {
            id: format!("r{i}"),
            host_at_ms: 1,
            what: "offline.exec".into(),
            detail: serde_json::json!({}),
        })
        .collect();
    f.store.record_agent_reports("web1", &recs).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let mut r = f.retention(Config {
        channel_max_age: Some(Duration::from_millis(10)),
        report_max_age: Some(Duration::from_millis(10)),
        ..quiet()
    });
    let rep = r.pass().unwrap();
    assert_eq!((rep.channels, rep.reports), (30, 40));
    let (_, channels, reports) = f.store.retained_rows().unwrap();
    // Open channels are kept.
    assert_eq!((channels, reports), (20, 0));
    assert_eq!(f.export_lines("channels").len(), 30);
    assert_eq!(f.export_lines("reports").len(), 40);
    let first: serde_json::Value = serde_json::from_str(&f.export_lines("channels")[0]).unwrap();
    assert_eq!(first["src_host"], "web1");
    // The prunes are audited.
    let kinds: Vec<String> = f
        .store
        .audit_rows(0, 1000)
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "retention.prune").count(), 2);
}

#[test]
fn a_tampered_export_or_checkpoint_is_detected() {
    let f = fixture();
    f.append(2_000);
    let mut r = f.retention(Config {
        audit_max_rows: Some(100),
        ..quiet()
    });
    r.pass().unwrap();
    let lines = f.export_lines("audit");
    let ca = f.pki.ca_der();
    assert!(verify_export(lines.clone(), Some(ca)).is_ok());

    // A row's content changed.
    let mut t = lines.clone();
    t[5] = t[5].replace("\\\"i\\\":5", "\\\"i\\\":6");
    assert_ne!(t[5], lines[5]);
    let e = verify_export(t, Some(ca)).unwrap_err();
    assert!(e.contains("changed"), "{e}");

    // A row removed.
    let mut t = lines.clone();
    t.remove(10);
    let e = verify_export(t, Some(ca)).unwrap_err();
    assert!(e.contains("missing"), "{e}");

    // A checkpoint changed: its signature no longer verifies.
    let at = lines
        .iter()
        .position(|l| l.starts_with("{\"checkpoint\""))
        .unwrap();
    let mut t = lines.clone();
    let mut v: serde_json::Value = serde_json::from_str(&t[at]).unwrap();
    v["checkpoint"]["total_rows"] = serde_json::json!(1);
    t[at] = v.to_string();
    let e = verify_export(t, Some(ca)).unwrap_err();
    assert!(e.contains("signature"), "{e}");

    // Rows rewritten consistently (hashes recomputed) no longer match the
    // signed checkpoint.
    let mut t = lines.clone();
    let mut prev = trustbind_appliance::store::GENESIS.to_owned();
    for l in t.iter_mut().take(at) {
        let mut row: trustbind_appliance::store::AuditRow = serde_json::from_str(l).unwrap();
        row.actor = "someone-else".into();
        row.prev_hash = prev.clone();
        row.hash = row.computed_hash();
        prev = row.hash.clone();
        *l = serde_json::to_string(&row).unwrap();
    }
    let e = verify_export(t, Some(ca)).unwrap_err();
    assert!(e.contains("checkpoint"), "{e}");

    // A checkpoint signed by another CA's server key.
    let other = tempfile::tempdir().unwrap();
    let other = Pki::open_or_create(other.path(), &["localhost".into()]).unwrap();
    assert!(verify_export(lines.clone(), Some(other.ca_der())).is_err());

    // The stored checkpoint edited in the database.
    let c = rusqlite::Connection::open(f.dir.path().join("appliance.db")).unwrap();
    c.execute(
        "UPDATE audit_checkpoints SET rows = rows + 1 WHERE id = (SELECT max(id) FROM audit_checkpoints)",
        [],
    )
    .unwrap();
    let cp = f.store.newest_checkpoint().unwrap().unwrap();
    assert!(verify_checkpoint(&cp, ca).is_err());
    // Rows deleted behind the newest checkpoint break the chain.
    c.execute(
        "DELETE FROM audit WHERE seq = (SELECT min(seq) FROM audit)",
        [],
    )
    .unwrap();
    assert!(f.store.verify_audit().unwrap().is_err());
}

#[test]
fn an_export_file_keeps_whole_lines_across_a_crash_and_rows_are_not_exported_twice() {
    let f = fixture();
    f.append(500);
    let dir = f.dir.path().join(retention::EXPORT_DIR);
    // A crash after 200 rows were exported and fsynced, before the prune;
    // then half a line of the next write.
    let rows = f.store.audit_rows(0, 200).unwrap();
    let mut log = ExportLog::open(&dir, "audit", 16 << 20).unwrap();
    let mut buf = Vec::new();
    for r in &rows {
        serde_json::to_writer(&mut buf, r).unwrap();
        buf.push(b'\n');
    }
    let name = log.append(&buf).unwrap();
    drop(log);
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(&name))
        .unwrap()
        .write_all(b"{\"seq\":201,\"at_")
        .unwrap();

    // Restart: the partial line is cut; the pass prunes all 500, writing
    // rows 201.. only.
    let mut r = f.retention(Config {
        audit_max_rows: Some(1),
        ..quiet()
    });
    let rep = r.pass().unwrap();
    assert!(rep.audit >= 499, "{rep:?}");
    let lines = f.export_lines("audit");
    let v = verify_export(lines.clone(), Some(f.pki.ca_der())).unwrap();
    assert_eq!(v.first_seq, 1);
    assert_eq!(v.rows as i64, v.last_seq);
    let seqs = row_seqs(&lines);
    let mut dedup = seqs.clone();
    dedup.dedup();
    assert_eq!(seqs, dedup, "a row was exported twice");
}

#[test]
fn export_files_rotate_by_size_and_stay_whole_lines() {
    let f = fixture();
    f.append(3_000);
    let mut r = f.retention(Config {
        audit_max_rows: Some(1),
        export_file_bytes: 64 << 10,
        ..quiet()
    });
    r.pass().unwrap();
    let files = std::fs::read_dir(f.dir.path().join(retention::EXPORT_DIR))
        .unwrap()
        .count();
    assert!(files > 5, "{files} files");
    assert!(f
        .export_lines("audit")
        .iter()
        .all(|l| serde_json::from_str::<ExportLine>(l).is_ok()));
}

// ---- a full disk ----

/// Fills the database to its page limit so the next audit append fails
/// with SQLITE_FULL, as on a full disk.
fn fill(store: &Store, path: &Path) {
    let pages: u64 = {
        let c =
            rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap()
    };
    store.set_max_pages(pages + 4).unwrap();
    for i in 0..100_000 {
        let ev = AuditEvent::new(
            "fill",
            "t",
            serde_json::json!({ "i": i, "pad": "y".repeat(500) }),
        );
        match store.append_audit(&ev) {
            Ok(_) => {}
            Err(StoreError::DiskFull) => return,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("never full");
}

const POLICY: &str = r#"
@id("exec-coreutils")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"coreutils");
"#;

async fn appliance() -> Appliance {
    common::start_with_policy(POLICY, &[(LS, "coreutils")]).await
}

fn db(app: &Appliance) -> std::path::PathBuf {
    app.dir.path().join("appliance.db")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_go_on_when_the_disk_is_full_and_the_gap_is_audited_once_space_returns() {
    let app = appliance().await;
    let cfg = app
        .enrolled_in("web1", "web", trustbind_appliance::store::Mode::Enforce)
        .await;
    let mut client = app.agent_client(cfg).await.unwrap();
    let store = Arc::clone(&app.api.store);
    fill(&store, &db(&app));
    let gap_before = trustbind_appliance::metrics::metrics().audit_gap();

    // The disk is full: every decision is still answered.
    for i in 0..20 {
        let reply = client
            .qualify(QualifyBatch {
                requests: vec![exec(i, LS), exec(100 + i, [0x99; 32])],
                module_session: Vec::new(),
                module_version: 0,
            })
            .await
            .expect("decided with a full disk")
            .into_inner();
        assert_eq!(reply.results[0].verdict(), Verdict::Allow);
        assert_eq!(reply.results[1].verdict(), Verdict::Deny);
    }
    let gap = store.audit_gap();
    assert!(gap.events >= 40, "{gap:?}");
    assert!(gap.kinds.get("decision").copied().unwrap_or(0) >= 40);
    assert!(trustbind_appliance::metrics::metrics().audit_gap() >= gap_before + 40);

    // Retention reclaims space (exported first): the pruned rows' pages
    // are reused and the next decision is audited, after one `audit.gap`
    // row that says how many were not.
    let signer_pki = Arc::new(Pki::open_or_create(app.dir.path(), &["localhost".into()]).unwrap());
    let mut r = Retention::new(
        Arc::clone(&store),
        Config {
            audit_max_rows: Some(10),
            ..quiet()
        },
        app.dir.path(),
        retention::server_key_signer(Arc::clone(&signer_pki)),
        None,
    )
    .unwrap();
    let rep = r.pass().unwrap();
    assert!(rep.audit > 0, "{rep:?}");
    let head = store.audit_head().unwrap();
    let reply = client
        .qualify(QualifyBatch {
            requests: vec![exec(999, LS)],
            module_session: Vec::new(),
            module_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results[0].verdict(), Verdict::Allow);
    let rows = store.audit_rows(0, 100_000).unwrap();
    let gap_rows: Vec<_> = rows.iter().filter(|r| r.kind == "audit.gap").collect();
    assert_eq!(gap_rows.len(), 1, "one gap row");
    let d: serde_json::Value = serde_json::from_str(&gap_rows[0].detail).unwrap();
    assert!(d["events"].as_u64().unwrap() >= 40, "{d}");
    assert!(rows.iter().any(|r| r.seq > head && r.kind == "decision"));
    assert_eq!(store.audit_gap().events, 0);
    let report = store.verify_audit_from_checkpoint().unwrap().unwrap();
    verify_checkpoint(report.checkpoint.as_ref().unwrap(), signer_pki.ca_der()).unwrap();
}

#[test]
fn the_disk_alarm_rises_under_the_threshold_and_prunes_early() {
    // The alarm threshold above the real free share: the alarm rises, and
    // retention keeps free pages in the database for new rows.
    let f = fixture();
    f.append(4_000);
    let space = retention::disk_space(f.dir.path()).unwrap();
    let free_pct = (space.free as f64 / space.size as f64 * 100.0) as u8;
    if free_pct >= 49 {
        eprintln!("skipped: {free_pct}% free, the alarm cannot be raised by a setting");
        return;
    }
    let mut r = f.retention(Config {
        alarm_percent: free_pct.saturating_add(1).max(1),
        ..quiet()
    });
    let rep = r.pass().unwrap();
    assert!(rep.alarm);
    assert!(trustbind_appliance::metrics::metrics().disk_alarm());
    assert!(rep.audit > 0, "{rep:?}");
    let (_, free) = f.store.db_bytes().unwrap();
    assert!(free > 0);
}

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted on drop.
struct Tmpfs(Option<tempfile::TempDir>);

impl Tmpfs {
    /// `None` unless this runs as root and the mount works.
    fn mount(mib: u32) -> Option<Self> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .ok()?
            .success();
        ok.then_some(Tmpfs(Some(dir)))
    }

    fn path(&self) -> &Path {
        self.0.as_ref().map(|d| d.path()).unwrap()
    }

    fn take(&mut self) -> tempfile::TempDir {
        self.0.take().unwrap()
    }
}

/// Unmounts when dropped (lazily: a test that failed may hold files open).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system at `dir` with a file of zeros until ENOSPC.
fn fill_disk(dir: &Path) -> u64 {
    use std::io::Write as _;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0_u8; 64 << 10];
    let mut n = 0_u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(_) => break,
        }
    }
    let _ = f.sync_all();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_really_full_disk_decisions_go_on_and_the_reserve_lets_retention_reclaim_audit_space()
{
    // A real file system filled to the last byte (ENOSPC, not a page
    // limit): a 24 MiB tmpfs as the data directory. Needs root to mount;
    // skipped (said so) otherwise.
    let Some(mut fs) = Tmpfs::mount(24) else {
        eprintln!("skipped: needs root and a tmpfs mount");
        return;
    };
    let _unmount = Unmount(fs.path().to_owned());
    let data = fs.path().to_owned();
    let app = common::start_with_policy_in(fs.take(), POLICY, &[(LS, "coreutils")]).await;
    let cfg = app
        .enrolled_in("web1", "web", trustbind_appliance::store::Mode::Enforce)
        .await;
    let mut client = app.agent_client(cfg).await.unwrap();
    let store = Arc::clone(&app.api.store);
    let pki = Arc::clone(&app.api.pki);
    let mut r = Retention::new(
        Arc::clone(&store),
        Config {
            reserve_bytes: 2 << 20,
            alarm_percent: 10,
            ..quiet()
        },
        &data,
        retention::server_key_signer(pki),
        None,
    )
    .unwrap();
    // Some history, then the reserve is made by a first (quiet) pass.
    for i in 0..40 {
        let reqs = (0..50).map(|k| exec(i * 100 + k, LS)).collect();
        client
            .qualify(QualifyBatch {
                requests: reqs,
                module_session: Vec::new(),
                module_version: 0,
            })
            .await
            .unwrap();
    }
    assert!(!r.pass().unwrap().alarm);
    assert!(data.join(retention::RESERVE_FILE).exists());

    // Something else fills the partition.
    fill_disk(&data);
    assert!(retention::disk_space(&data).unwrap().free < 64 << 10);
    let mut answered = 0;
    for i in 0..200_u64 {
        let reply = client
            .qualify(QualifyBatch {
                requests: vec![exec(10_000 + i, LS)],
                module_session: Vec::new(),
                module_version: 0,
            })
            .await
            .expect("answered on a full disk");
        assert_eq!(reply.into_inner().results[0].verdict(), Verdict::Allow);
        answered += 1;
        if store.audit_gap().events > 0 {
            break;
        }
    }
    assert!(store.audit_gap().events > 0, "the database never filled");
    // Denied ones too, and more after the first gap.
    for i in 0..20_u64 {
        let reply = client
            .qualify(QualifyBatch {
                requests: vec![exec(20_000 + i, [0x99; 32])],
                module_session: Vec::new(),
                module_version: 0,
            })
            .await
            .expect("answered on a full disk");
        assert_eq!(reply.into_inner().results[0].verdict(), Verdict::Deny);
    }
    let gap = store.audit_gap().events;
    assert!(gap >= 20, "{gap} events in the gap after {answered}");

    // Retention: the alarm is up, the reserve goes, the oldest rows are
    // exported into its space and pruned; their pages take new rows.
    let rep = r.pass().unwrap();
    assert!(rep.alarm, "{rep:?}");
    assert!(!data.join(retention::RESERVE_FILE).exists());
    assert!(rep.audit > 0, "{rep:?}");
    let head = store.audit_head().unwrap();
    let reply = client
        .qualify(QualifyBatch {
            requests: vec![exec(30_000, LS)],
            module_session: Vec::new(),
            module_version: 0,
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().results[0].verdict(), Verdict::Allow);
    let rows = store.audit_rows(0, 1_000_000).unwrap();
    let gaps: Vec<_> = rows.iter().filter(|r| r.kind == "audit.gap").collect();
    assert_eq!(gaps.len(), 1);
    let d: serde_json::Value = serde_json::from_str(&gaps[0].detail).unwrap();
    assert_eq!(d["events"].as_u64(), Some(gap));
    assert!(rows.iter().any(|r| r.seq > head && r.kind == "decision"));
    assert!(store.verify_audit().unwrap().is_ok());
    // Down to the floor with the disk still full, the next passes leave
    // the audit alone: pruning the row or two the last prune and decision
    // added would write a checkpoint and an `audit.prune` row every
    // second, growing the database and the export on the full disk.
    let checkpoints = || {
        store
            .verify_audit_from_checkpoint()
            .unwrap()
            .unwrap()
            .checkpoints
    };
    let made = checkpoints();
    for _ in 0..3 {
        let rep = r.pass().unwrap();
        assert!(rep.alarm, "{rep:?}");
        assert_eq!(rep.audit, 0, "{rep:?}");
    }
    assert_eq!(checkpoints(), made);
    let lines: Vec<String> = retention::export_files(&data.join(retention::EXPORT_DIR), "audit")
        .unwrap()
        .into_iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(verify_export(lines, Some(app.api.pki.ca_der())).is_ok());
    drop(client);
    drop(app);
}

/// Throughput of export and prune, and bytes per audit row (docs/BENCHMARKS.md):
/// `cargo test --release -p trustbind-appliance --test retention measure -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn measure_export_and_prune() {
    const N: usize = 200_000;
    let f = fixture();
    // Rows shaped like decision rows (a request and an outcome).
    let detail = serde_json::json!({
        "id": 1,
        "request": { "host": "web1", "action": "exec", "at_ms": 1_765_000_000_000_i64,
            "subject": { "user": "bob", "uid": 1000, "euid": 1000, "gid": 1000, "loginuid": 1000,
                         "session": 7, "pid": 4242, "ancestry": ["ab".repeat(32)] },
            "program": { "sha256": "11".repeat(32), "sha1": "01".repeat(20), "size": 1234, "path": "/usr/bin/x" },
            "target": { "exec": {} } },
        "outcome": { "verdict": { "verdict": "allow" }, "reasons": ["exec-coreutils"], "would_deny": false, "alerts": [] },
        "generation": 3, "cacheable": true, "channel_id": null,
    });
    let evs: Vec<AuditEvent> = (0..1000)
        .map(|_| AuditEvent::new("decision", "web1", detail.clone()))
        .collect();
    let t = std::time::Instant::now();
    for _ in 0..N / 1000 {
        f.store.append_audit_batch(&evs).unwrap();
    }
    let append = t.elapsed();
    let (live, free) = f.store.db_bytes().unwrap();
    println!(
        "appended {N} rows in {append:?} ({:.0} rows/s); database {live} bytes live, {free} free: {:.0} bytes per row; retention's estimate {:.0}",
        N as f64 / append.as_secs_f64(),
        live as f64 / N as f64,
        f.store.retained_bytes().unwrap() as f64 / N as f64
    );
    let mut r = f.retention(Config {
        audit_max_rows: Some(1),
        batch: 2_000,
        max_batches: 1_000,
        ..quiet()
    });
    let t = std::time::Instant::now();
    let rep = r.pass().unwrap();
    let took = t.elapsed();
    let (live2, free2) = f.store.db_bytes().unwrap();
    println!(
        "exported and pruned {} rows in {took:?} ({:.0} rows/s, batches of 2,000); {} export bytes ({:.0} per row); database after: {live2} bytes live, {free2} free",
        rep.audit,
        rep.audit as f64 / took.as_secs_f64(),
        rep.bytes,
        rep.bytes as f64 / rep.audit as f64
    );
}

/// `audit verify` while decisions append rows and retention prunes (as in
/// the QEMU disk-full test, which once saw the chain reported broken):
/// verification reads the checkpoints, the rows and the recorded head from
/// one snapshot, so a commit between its reads is never taken for a break.
#[test]
fn verify_never_reports_a_break_while_rows_are_appended_and_pruned() {
    let f = fixture();
    f.append(1_200);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let appender = {
        let (store, stop) = (Arc::clone(&f.store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let ev = AuditEvent::new("decision", "host1", serde_json::json!({ "allow": true }));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store.append_audit(&ev).unwrap();
            }
        })
    };
    let pruner = {
        let mut r = f.retention(Config {
            audit_max_rows: Some(1_000),
            batch: 50,
            ..quiet()
        });
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut pruned = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                pruned += r.pass().unwrap().audit;
            }
            pruned
        })
    };
    let started = std::time::Instant::now();
    let mut verified = 0;
    let broken = loop {
        match f.store.verify_audit_from_checkpoint().unwrap() {
            Ok(_) => verified += 1,
            Err(e) => break Some(e),
        }
        if verified >= 100 || started.elapsed() > Duration::from_secs(5) {
            break None;
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    appender.join().unwrap();
    let pruned = pruner.join().unwrap();
    assert_eq!(broken, None, "after {verified} verifications");
    assert!(pruned > 0, "nothing pruned while verifying");
    assert!(f.store.verify_audit().unwrap().is_ok());
}

/// `trustbind-appliance --data-dir DIR audit ARGS...`: exit code and stdout,
/// stderr.
fn appliance_audit(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trustbind-appliance"))
        .env_remove("TRUSTBIND_DATA_DIR")
        .arg("--data-dir")
        .arg(dir)
        .arg("audit")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The audit export files, oldest first, as paths.
fn audit_files(f: &Fixture) -> Vec<std::path::PathBuf> {
    retention::export_files(&f.dir.path().join(retention::EXPORT_DIR), "audit").unwrap()
}

/// One checkpoint is stored per audit batch pruned; past
/// `max_checkpoints` the oldest are consolidated into one signed
/// checkpoint, so the table stays bounded however many batches are pruned,
/// while `audit verify` still names the whole pruned prefix and the export
/// files (which keep every batch's own checkpoint line) still verify,
/// those written before the consolidation too.
#[test]
fn many_prune_batches_keep_the_checkpoints_bounded_and_everything_verifies() {
    let f = fixture();
    f.append(3_000);
    let max = 8;
    let cfg = Config {
        audit_max_rows: Some(100),
        batch: 20,
        max_checkpoints: max,
        ..quiet()
    };
    // Fewer batches than the bound: nothing consolidated yet.
    let mut r = f.retention(Config {
        max_batches: max as u32,
        ..cfg.clone()
    });
    let mut pruned = r.pass().unwrap().audit;
    let early = f.store.checkpoints().unwrap();
    assert_eq!(early.len(), max);
    assert!(early.iter().all(|c| c.rows == 20), "{early:?}");
    let lines_before = f.export_lines("audit");
    let files_before: Vec<(std::path::PathBuf, String)> = audit_files(&f)
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();

    let merged_before = trustbind_appliance::metrics::metrics().checkpoints_consolidated("merged");
    let mut r = f.retention(cfg);
    loop {
        let rep = r.pass().unwrap();
        pruned += rep.audit;
        // At most max + 1 between a prune and its consolidation; after a
        // pass, at most max.
        let n = f.store.checkpoints().unwrap().len();
        assert!(n <= max, "{n} checkpoints after {pruned} rows pruned");
        if !rep.more {
            break;
        }
    }
    // Each prune's checkpoint takes the next id; consolidated ones keep
    // the id of the newest they replace.
    let batches = f.store.newest_checkpoint().unwrap().unwrap().id as usize;
    assert!(batches > 100, "{batches} batches");
    assert!(
        trustbind_appliance::metrics::metrics().checkpoints_consolidated("merged") > merged_before
    );

    // The oldest checkpoint is a consolidated one from row 1, signed by
    // the server key; each continues the one before; the newest is the
    // last batch's own and says the whole prefix was pruned.
    let cps = f.store.checkpoints().unwrap();
    let ca = f.pki.ca_der();
    assert_eq!(cps[0].from_seq, 1);
    assert!(cps[0].rows > 20, "{:?}", cps[0]);
    assert!(
        cps[0].export_file.starts_with("audit-00000001.jsonl"),
        "{:?}",
        cps[0]
    );
    retention::verify_checkpoints(&cps, ca).unwrap();
    let report = f.store.verify_audit_from_checkpoint().unwrap().unwrap();
    let newest = report.checkpoint.clone().unwrap();
    assert!(
        newest.rows <= 20 && newest.signature.len() > 10,
        "{newest:?}"
    );
    assert_eq!(newest.total_rows, pruned as i64);
    assert_eq!(newest.upto_seq, pruned as i64);
    assert_eq!(report.checkpoints as usize, cps.len());
    assert!(f.store.verify_audit().unwrap().is_ok());
    // Every consolidation is in the chain.
    let kinds: Vec<String> = f
        .store
        .audit_rows(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert!(kinds.iter().any(|k| k == "audit.checkpoints"));

    // `audit verify` on the appliance: the whole prefix, from row 1.
    let (code, out) = appliance_audit(f.dir.path(), &["verify"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "pruned: rows 1..={pruned} ({pruned} rows, {} checkpoints;",
            cps.len()
        )),
        "{out}"
    );

    // The export files: every batch's own checkpoint line, the last equal
    // to the newest stored; they verify, and so do those copied before
    // the checkpoints they name were consolidated.
    let lines = f.export_lines("audit");
    let v = verify_export(lines.clone(), Some(ca)).unwrap();
    assert_eq!(v.checkpoints as usize, batches);
    assert_eq!((v.rows, v.checkpointed_upto), (pruned, newest.upto_seq));
    let last_cp = lines
        .iter()
        .rev()
        .find_map(|l| match serde_json::from_str::<ExportLine>(l).unwrap() {
            ExportLine::Checkpoint { checkpoint } => Some(checkpoint),
            ExportLine::Row(_) => None,
        })
        .unwrap();
    assert_eq!(last_cp, newest);
    let old = verify_export(lines_before, Some(ca)).unwrap();
    assert_eq!(old.checkpoints as usize, max);
    let copies = tempfile::tempdir().unwrap();
    let mut copied = Vec::new();
    for (p, text) in &files_before {
        let to = copies.path().join(p.file_name().unwrap());
        std::fs::write(&to, text).unwrap();
        copied.push(to.to_str().unwrap().to_owned());
    }
    let mut args = vec!["verify-export"];
    args.extend(copied.iter().map(String::as_str));
    let (code, out) = appliance_audit(f.dir.path(), &args);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("{max} signed checkpoints")), "{out}");
    let files: Vec<String> = audit_files(&f)
        .iter()
        .map(|p| p.to_str().unwrap().to_owned())
        .collect();
    let mut args = vec!["verify-export"];
    args.extend(files.iter().map(String::as_str));
    let (code, out) = appliance_audit(f.dir.path(), &args);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("rows 1..={pruned}")), "{out}");
}

/// An old checkpoint edited in the database is never consolidated (that
/// would sign over it): the checkpoints are kept as they are, past the
/// bound, the refusal is counted, and `audit verify` reports the
/// checkpoint whose signature no longer verifies.
#[test]
fn a_tampered_old_checkpoint_is_not_consolidated_and_verify_reports_it() {
    let f = fixture();
    f.append(2_000);
    let max = 8;
    let cfg = Config {
        audit_max_rows: Some(100),
        batch: 20,
        max_checkpoints: max,
        max_batches: 6,
        ..quiet()
    };
    let mut r = f.retention(cfg.clone());
    r.pass().unwrap();
    assert_eq!(f.store.checkpoints().unwrap().len(), 6);
    // Continuity intact, the signature broken: only the signature check
    // finds it.
    let c = rusqlite::Connection::open(f.dir.path().join("appliance.db")).unwrap();
    c.execute(
        "UPDATE audit_checkpoints SET export_file = 'elsewhere.jsonl' WHERE id = 2",
        [],
    )
    .unwrap();
    let refused_before =
        trustbind_appliance::metrics::metrics().checkpoints_consolidated("refused");
    let mut r = f.retention(Config {
        max_batches: 12,
        ..cfg
    });
    r.pass().unwrap();
    let cps = f.store.checkpoints().unwrap();
    assert_eq!(cps.len(), 18, "consolidated over a tampered checkpoint");
    assert_eq!(cps[1].export_file, "elsewhere.jsonl");
    assert!(
        trustbind_appliance::metrics::metrics().checkpoints_consolidated("refused")
            > refused_before
    );
    let e = retention::verify_checkpoints(&cps, f.pki.ca_der()).unwrap_err();
    assert!(e.contains("checkpoint 2"), "{e}");
    let (code, out) = appliance_audit(f.dir.path(), &["verify"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("checkpoint 2 signature does not verify"),
        "{out}"
    );

    // Put back, the next prune consolidates them.
    let good = exported_file_of(&f, 2);
    c.execute(
        "UPDATE audit_checkpoints SET export_file = ?1 WHERE id = 2",
        [good],
    )
    .unwrap();
    let mut r = f.retention(Config {
        max_batches: 1,
        audit_max_rows: Some(100),
        batch: 20,
        max_checkpoints: max,
        ..quiet()
    });
    r.pass().unwrap();
    assert!(f.store.checkpoints().unwrap().len() <= max);
    let (code, out) = appliance_audit(f.dir.path(), &["verify"]);
    assert_eq!(code, Some(0), "{out}");
}

/// The export file checkpoint `id` named, from its line in the export.
fn exported_file_of(f: &Fixture, id: i64) -> String {
    f.export_lines("audit")
        .iter()
        .find_map(|l| match serde_json::from_str::<ExportLine>(l).unwrap() {
            ExportLine::Checkpoint { checkpoint } if checkpoint.id == id => {
                Some(checkpoint.export_file)
            }
            _ => None,
        })
        .unwrap()
}
