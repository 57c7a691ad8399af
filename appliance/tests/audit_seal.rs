//! Forward-secure seals of the audit chain (threat model T-83): a full-disk
//! attacker who rewrites sealed rows and recomputes the whole hash chain
//! and head, with the key material left on the appliance, is found by
//! `verify --seal-key`; an untouched log verifies; rows after the last
//! seal are reported unsealed; a crash between the new key and the seal's
//! commit loses neither the seal nor leaves the old key.

use std::path::Path;
use std::sync::Arc;

use trustbind_appliance::audit_seal::{self, Crash, FssError};
use trustbind_appliance::pki::Pki;
use trustbind_appliance::policy::audit::row_hash;
use trustbind_appliance::policy::audit_seal::{
    key_at, seal_tag, verify_export_seals, verify_seals_with, SealDetail, SealVerifier, VerifyKey,
    SEAL_KIND,
};
use trustbind_appliance::retention::{self, Config, Retention};
use trustbind_appliance::store::{AuditEvent, Store};

/// A tiny epoch: the injected clock moves by this between seals.
const EPOCH_MS: i64 = 1_000;
const T0: i64 = 1_700_000_000_000;

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<Store>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("appliance.db")).unwrap());
    Fixture { dir, store }
}

impl Fixture {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn append(&self, n: usize, tag: &str) {
        let evs: Vec<AuditEvent> = (0..n)
            .map(|i| AuditEvent::new("test", "t", serde_json::json!({ "i": i, "tag": tag })))
            .collect();
        self.store.append_audit_batch(&evs).unwrap();
    }

    /// Setup, then `epochs` epochs of 10 rows each, each sealed at its end.
    fn sealed_log(&self, epochs: i64) -> VerifyKey {
        self.append(5, "before setup");
        let vk = audit_seal::setup(&self.store, self.path(), T0, EPOCH_MS).unwrap();
        for e in 1..=epochs {
            self.append(10, &format!("epoch {e}"));
            let s =
                audit_seal::seal(&self.store, self.path(), T0 + e * EPOCH_MS, "interval").unwrap();
            assert_eq!(s.seal.epoch, e as u64);
        }
        vk
    }

    /// The key and epoch in the state file: what the attacker finds.
    fn state_key(&self) -> (u64, [u8; 32]) {
        let b = std::fs::read(self.path().join(audit_seal::STATE_FILE)).unwrap();
        (
            u64::from_le_bytes(b[8..16].try_into().unwrap()),
            b[16..48].try_into().unwrap(),
        )
    }

    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.path().join("appliance.db")).unwrap()
    }
}

#[derive(Debug, Clone)]
struct Row {
    seq: i64,
    at_ms: i64,
    kind: String,
    actor: String,
    detail: String,
}

/// The attacker: edits the rows with `edit`, then recomputes every hash,
/// `prev_hash`, the named hash and tag of every seal after the edit (with
/// the only key they have, the state file's, for the epoch the seal
/// claims) and the head, so that the chain verifies.
fn rewrite(f: &Fixture, edit: impl FnOnce(&mut Vec<Row>)) {
    let (_, k_now) = f.state_key();
    let db = f.db();
    let mut rows: Vec<Row> = {
        let mut st = db
            .prepare("SELECT seq, at_ms, kind, actor, detail FROM audit ORDER BY seq")
            .unwrap();
        st.query_map([], |r| {
            Ok(Row {
                seq: r.get(0)?,
                at_ms: r.get(1)?,
                kind: r.get(2)?,
                actor: r.get(3)?,
                detail: r.get(4)?,
            })
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    let first: i64 = rows[0].seq;
    let mut prev: String = db
        .query_row("SELECT prev_hash FROM audit WHERE seq = ?1", [first], |r| {
            r.get(0)
        })
        .unwrap();
    edit(&mut rows);
    db.execute("DELETE FROM audit", []).unwrap();
    let mut hashes = std::collections::HashMap::new();
    for (i, r) in rows.iter_mut().enumerate() {
        r.seq = first + i as i64;
        if r.kind == SEAL_KIND {
            let mut d: SealDetail = serde_json::from_str(&r.detail).unwrap();
            // Seals before the edit are kept as they are.
            if (d.seq, d.hash.as_str()) != (r.seq - 1, prev.as_str()) {
                d.seq = r.seq - 1;
                d.hash = prev.clone();
                d.tag = seal_tag(&k_now, d.epoch, d.seq, &d.hash, d.sealed_ms);
                r.detail = serde_json::to_string(&d).unwrap();
            }
        }
        let h = row_hash(&prev, r.seq, r.at_ms, &r.kind, &r.actor, &r.detail);
        db.execute(
            "INSERT INTO audit (seq, at_ms, kind, actor, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            rusqlite::params![r.seq, r.at_ms, r.kind, r.actor, r.detail, prev, h],
        )
        .unwrap();
        hashes.insert(r.seq, h.clone());
        prev = h;
    }
    let last = first + rows.len() as i64 - 1;
    db.execute(
        "UPDATE audit_head SET seq = ?1, hash = ?2 WHERE id = 1",
        rusqlite::params![last, prev],
    )
    .unwrap();
}

fn seal_rows(f: &Fixture) -> Vec<(i64, SealDetail)> {
    f.store
        .audit_rows(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == SEAL_KIND)
        .map(|r| (r.seq, serde_json::from_str(&r.detail).unwrap()))
        .collect()
}

#[test]
fn the_state_file_holds_k_i_of_k0_and_no_earlier_key() {
    let f = fixture();
    let vk = f.sealed_log(0);
    let k0 = vk.k0().unwrap();
    let file = f.path().join(audit_seal::STATE_FILE);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len(), 512);
    assert!(!bytes.windows(32).any(|w| w == k0.as_slice()), "k0 on disk");
    assert_eq!(f.state_key(), (1, *key_at(&k0, 1)));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for e in 1..=5_u64 {
        f.append(3, "x");
        audit_seal::seal(&f.store, f.path(), T0 + e as i64 * EPOCH_MS, "interval").unwrap();
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(f.state_key(), (e + 1, *key_at(&k0, e + 1)));
        for old in 0..=e {
            let k = key_at(&k0, old);
            assert!(
                !bytes.windows(32).any(|w| w == k.as_slice()),
                "key of epoch {old} still in the file after epoch {e}'s seal"
            );
        }
    }
    // The seals' epochs follow one another from 0, each tagged with its key.
    let seals = seal_rows(&f);
    assert_eq!(
        seals.iter().map(|(_, d)| d.epoch).collect::<Vec<_>>(),
        (0..=5).collect::<Vec<_>>()
    );
    for (_, d) in &seals {
        let k = key_at(&k0, d.epoch);
        assert_eq!(d.tag, seal_tag(&k, d.epoch, d.seq, &d.hash, d.sealed_ms));
    }
    // A second setup is refused: the verification key is handed out once.
    assert!(matches!(
        audit_seal::setup(&f.store, f.path(), T0, EPOCH_MS),
        Err(FssError::Refused(_))
    ));
}

#[test]
fn an_untouched_log_verifies_and_rows_after_the_last_seal_are_reported_unsealed() {
    let f = fixture();
    let vk = f.sealed_log(4);
    let rep = audit_seal::verify_store(&f.store, &vk).unwrap().unwrap();
    let seals = seal_rows(&f);
    let (last_seal_seq, last) = seals.last().unwrap().clone();
    assert_eq!((rep.seals, rep.first_epoch, rep.last_epoch), (5, 0, 4));
    assert_eq!(rep.sealed_upto_seq, last.seq);
    assert_eq!(rep.sealed_ms, T0 + 4 * EPOCH_MS);
    // Only the last seal row itself is after its head.
    assert_eq!(rep.unsealed_rows, 1);
    assert_eq!(rep.last_seq, last_seal_seq);

    // Rows written after the last seal: verified as a chain, reported as
    // not sealed.
    f.append(7, "after the last seal");
    let rep = audit_seal::verify_store(&f.store, &vk).unwrap().unwrap();
    assert_eq!(rep.sealed_upto_seq, last.seq);
    assert_eq!(rep.unsealed_rows, 8);
    assert!(rep.summary().contains("NOT sealed"), "{}", rep.summary());
    // Much later, with no seal since: stale.
    assert!(rep.stale(T0 + 4 * EPOCH_MS + 100, EPOCH_MS).is_none());
    assert!(rep.stale(T0 + 100 * EPOCH_MS + 60_000, EPOCH_MS).is_some());

    // Another key verifies nothing.
    let other = VerifyKey::new(&[9; 32], T0, EPOCH_MS);
    let e = audit_seal::verify_store(&f.store, &other)
        .unwrap()
        .unwrap_err();
    assert!(e.contains("set up again with key id"), "{e}");
}

#[test]
fn a_full_disk_attacker_cannot_rewrite_a_sealed_row() {
    let f = fixture();
    let vk = f.sealed_log(4);
    let seals = seal_rows(&f);
    // A row of epoch 2, sealed by the seal of epoch 2.
    let victim = seals[2].0 - 3;
    rewrite(&f, |rows| {
        let r = rows.iter_mut().find(|r| r.seq == victim).unwrap();
        r.detail = r.detail.replace("epoch 2", "nothing happened");
    });
    // The chain alone is consistent again: this is what T-83 was about.
    assert!(f.store.verify_audit().unwrap().is_ok());
    let e = audit_seal::verify_store(&f.store, &vk)
        .unwrap()
        .unwrap_err();
    assert!(
        e.contains("seal of epoch 2") && e.contains(&format!("row {}", seals[2].0)),
        "{e}"
    );
}

#[test]
fn a_full_disk_attacker_cannot_drop_the_seals_and_reseal_with_the_current_key() {
    let f = fixture();
    let vk = f.sealed_log(4);
    let seals = seal_rows(&f);
    let victim = seals[2].0 - 3;
    let (k_epoch, _) = f.state_key();
    assert_eq!(k_epoch, 5);
    rewrite(&f, |rows| {
        let r = rows.iter_mut().find(|r| r.seq == victim).unwrap();
        r.detail = r.detail.replace("epoch 2", "nothing happened");
        // Every seal after the victim removed; one made with the key in
        // the state file (epoch 5) at the end.
        let template = rows.iter().find(|r| r.kind == SEAL_KIND).unwrap().clone();
        rows.retain(|r| r.kind != SEAL_KIND || r.seq < victim);
        let mut d: SealDetail = serde_json::from_str(&template.detail).unwrap();
        d.epoch = k_epoch;
        d.sealed_ms = T0 + 5 * EPOCH_MS;
        rows.push(Row {
            detail: serde_json::to_string(&d).unwrap(),
            ..template
        });
    });
    assert!(f.store.verify_audit().unwrap().is_ok());
    let e = audit_seal::verify_store(&f.store, &vk)
        .unwrap()
        .unwrap_err();
    assert!(
        e.contains("seal of epoch 5") && e.contains("epoch 2 expected"),
        "{e}"
    );

    // Cutting the log back to before the victim (no seal after it) is all
    // that verifies: the report then says the rows are not sealed, and the
    // last seal is stale.
    rewrite(&f, |rows| {
        rows.retain(|r| r.kind != SEAL_KIND || r.seq < victim)
    });
    let rep = audit_seal::verify_store(&f.store, &vk).unwrap().unwrap();
    assert!(rep.sealed_upto_seq < victim);
    assert!(rep.unsealed_rows > 0);
    assert_eq!(rep.last_epoch, 1);
}

#[test]
fn a_crash_between_the_new_key_and_the_seals_commit_keeps_the_seal_and_not_the_old_key() {
    let f = fixture();
    let vk = f.sealed_log(2);
    let k0 = vk.k0().unwrap();
    f.append(4, "epoch 3");
    let e = audit_seal::seal_with(
        &f.store,
        f.path(),
        T0 + 3 * EPOCH_MS,
        "interval",
        Crash::BeforeCommit,
    )
    .unwrap_err();
    assert!(e.to_string().contains("simulated crash"), "{e}");
    // The seal of epoch 3 is not in the log; the file has k4 and not k3.
    assert_eq!(seal_rows(&f).last().unwrap().1.epoch, 2);
    assert_eq!(f.state_key(), (4, *key_at(&k0, 4)));
    let bytes = std::fs::read(f.path().join(audit_seal::STATE_FILE)).unwrap();
    let k3 = key_at(&k0, 3);
    assert!(!bytes.windows(32).any(|w| w == k3.as_slice()));
    // Rows keep arriving; the next seal appends the lost one first.
    f.append(2, "after the crash");
    let s = audit_seal::seal(&f.store, f.path(), T0 + 4 * EPOCH_MS, "start").unwrap();
    assert_eq!((s.recovered, s.seal.epoch), (Some(3), 4));
    let rep = audit_seal::verify_store(&f.store, &vk).unwrap().unwrap();
    assert_eq!((rep.seals, rep.last_epoch), (5, 4));
    assert_eq!(rep.unsealed_rows, 1);
}

#[test]
fn a_replaced_state_file_is_refused_rather_than_sealing_an_epoch_twice() {
    let f = fixture();
    let _vk = f.sealed_log(1);
    let file = f.path().join(audit_seal::STATE_FILE);
    let old = std::fs::read(&file).unwrap();
    audit_seal::seal(&f.store, f.path(), T0 + 2 * EPOCH_MS, "interval").unwrap();
    std::fs::write(&file, &old).unwrap();
    let e = audit_seal::seal(&f.store, f.path(), T0 + 3 * EPOCH_MS, "interval").unwrap_err();
    assert!(e.to_string().contains("epoch 2 is not after"), "{e}");
    // A damaged file is refused, naming it.
    let mut bad = old.clone();
    bad[20] ^= 1;
    std::fs::write(&file, &bad).unwrap();
    let e = audit_seal::seal(&f.store, f.path(), T0 + 3 * EPOCH_MS, "interval").unwrap_err();
    assert!(
        e.to_string().contains("audit-seal.state") && e.to_string().contains("checksum"),
        "{e}"
    );
}

/// Prunes the audit log down to `max_rows` rows (exported first).
fn prune(f: &Fixture, max_rows: u64) {
    let pki = Arc::new(Pki::open_or_create(f.path(), &["localhost".into()]).unwrap());
    let mut r = Retention::new(
        Arc::clone(&f.store),
        Config {
            audit_max_age: None,
            channel_max_age: None,
            report_max_age: None,
            audit_max_rows: Some(max_rows),
            store_max_percent: 90,
            export_max_percent: 90,
            alarm_percent: 1,
            reserve_bytes: 0,
            batch: 20,
            ..Config::default()
        },
        f.path(),
        retention::server_key_signer(pki),
        None,
    )
    .unwrap();
    while r.pass().unwrap().more {}
}

/// A seal that committed and was then pruned with every seal after it is
/// not appended again as "recovered" (which would seal an epoch twice).
#[test]
fn a_committed_seal_pruned_away_is_not_recovered_again() {
    let f = fixture();
    let vk = f.sealed_log(2);
    f.append(50, "many rows after the last seal");
    prune(&f, 5);
    assert!(seal_rows(&f).is_empty());
    let s = audit_seal::seal(&f.store, f.path(), T0 + 3 * EPOCH_MS, "interval").unwrap();
    assert_eq!((s.recovered, s.seal.epoch), (None, 3));
    let rep = audit_seal::verify_store(&f.store, &vk).unwrap().unwrap();
    assert_eq!((rep.seals, rep.first_epoch), (1, 3));
}

/// A seal left uncommitted by a crash whose row was pruned before the
/// next seal recovered it (a full disk: the seal's commit failed and
/// retention pruned early): the rows kept still verify.
#[test]
fn a_recovered_seal_naming_a_pruned_row_still_verifies() {
    let f = fixture();
    let vk = f.sealed_log(1);
    f.append(3, "epoch 2");
    audit_seal::seal_with(
        &f.store,
        f.path(),
        T0 + 2 * EPOCH_MS,
        "interval",
        Crash::BeforeCommit,
    )
    .unwrap_err();
    f.append(60, "after the crash");
    prune(&f, 20);
    let s = audit_seal::seal(&f.store, f.path(), T0 + 3 * EPOCH_MS, "start").unwrap();
    assert_eq!((s.recovered, s.seal.epoch), (Some(2), 3));
    let rep = audit_seal::verify_store(&f.store, &vk).unwrap().unwrap();
    assert_eq!((rep.first_epoch, rep.last_epoch), (2, 3));
    assert_eq!(rep.sealed_upto_seq, s.seal.seq);
    // And the export files with the rows kept, read as one log.
    let files = retention::export_files(&f.path().join(retention::EXPORT_DIR), "audit").unwrap();
    let mut lines = trustbind_appliance::policy::audit::read_export_files(&files).unwrap();
    lines.extend(
        f.store
            .audit_rows(0, 10_000)
            .unwrap()
            .iter()
            .map(|r| serde_json::to_string(r).unwrap()),
    );
    let all = verify_export_seals(lines, &vk).unwrap();
    assert_eq!((all.first_epoch, all.last_epoch), (0, 3));
}

#[test]
fn seals_survive_pruning_in_the_export_files_and_the_rows_kept() {
    let f = fixture();
    let vk = f.sealed_log(6);
    prune(&f, 30);
    f.append(3, "after pruning");
    audit_seal::seal(&f.store, f.path(), T0 + 7 * EPOCH_MS, "interval").unwrap();
    // The rows kept start mid-chain: their seals verify from there.
    let kept = audit_seal::verify_store(&f.store, &vk).unwrap().unwrap();
    assert!(kept.first_seq > 1);
    assert_eq!(kept.last_epoch, 7);
    // The export files carry the pruned rows' seals.
    let files = retention::export_files(&f.path().join(retention::EXPORT_DIR), "audit").unwrap();
    let lines = trustbind_appliance::policy::audit::read_export_files(&files).unwrap();
    let rep = verify_export_seals(lines.clone(), &vk).unwrap();
    assert_eq!(rep.first_epoch, 0);
    assert_eq!(rep.last_epoch + 1, kept.first_epoch);
    // Rows kept whose first seal is later than the files' last plus one:
    // seals in between are missing (sealed rows deleted as if pruned).
    let kept_lines: Vec<String> = f
        .store
        .audit_rows(0, 10_000)
        .unwrap()
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    let v = SealVerifier::new(&vk)
        .unwrap()
        .max_first_epoch(kept.first_epoch - 1);
    let e = verify_seals_with(kept_lines.clone(), v).unwrap_err();
    assert!(e.contains("at the latest"), "{e}");
    let v = SealVerifier::new(&vk)
        .unwrap()
        .max_first_epoch(rep.last_epoch + 1);
    verify_seals_with(kept_lines, v).unwrap();
    // A pruned row rewritten in the export file (and its chain with it)
    // is found by the seal after it.
    let victim = lines.iter().position(|l| l.contains("epoch 1")).unwrap();
    let mut edited = lines.clone();
    edited[victim] = edited[victim].replace("epoch 1", "epoch 0");
    let mut prev = String::new();
    for l in edited.iter_mut() {
        if let Ok(mut row) = serde_json::from_str::<trustbind_appliance::store::AuditRow>(l) {
            if !prev.is_empty() {
                row.prev_hash = prev.clone();
            }
            row.hash = row.computed_hash();
            prev = row.hash.clone();
            *l = serde_json::to_string(&row).unwrap();
        }
    }
    let e = verify_export_seals(edited, &vk).unwrap_err();
    assert!(e.contains("seal of epoch 1"), "{e}");
}

/// `trustbind-appliance audit seal-setup | seal | verify --seal-key`: the
/// key is written once (a second setup refused), a changed sealed row
/// fails `verify --seal-key` with exit 2 naming the seal.
#[test]
fn the_appliance_commands_set_up_seal_and_verify() {
    let f = fixture();
    let dir = f.path().to_owned();
    let d = dir.to_str().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_trustbind-appliance"))
            .env_remove("TRUSTBIND_DATA_DIR")
            .arg("--data-dir")
            .arg(d)
            .args(args)
            .output()
            .unwrap()
    };
    // Not in the data directory: a deleted file's blocks stay on the disk.
    let inside = dir.join("seal.key");
    let out = run(&["audit", "seal-setup", "--out", inside.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must not be written in the data directory")
    );
    assert!(!inside.exists() && !audit_seal::is_set_up(&dir));
    let offline = tempfile::tempdir().unwrap();
    let key = offline.path().join("seal.key");
    let k = key.to_str().unwrap();
    let out = run(&["audit", "seal-setup", "--out", k, "--interval-secs", "60"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("OFFLINE"));
    let vk = VerifyKey::parse(&std::fs::read_to_string(&key).unwrap()).unwrap();
    assert_eq!(vk.interval_ms, 60_000);
    let again = run(&["audit", "seal-setup", "--out", "-"]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(again.stdout.is_empty(), "{again:?}");
    f.store
        .append_audit(&AuditEvent::new("test", "t", serde_json::json!({"x": 1})))
        .unwrap();
    let out = run(&["audit", "seal"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("sealed: epoch 1"));
    let out = run(&["audit", "verify", "--seal-key", k]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("rows up to seq 3"));
    // The sealed row changed and its hash recomputed: the chain alone
    // would pass, the seal does not.
    rewrite(&f, |rows| rows[2].detail = r#"{"x":2}"#.into());
    let out = run(&["audit", "verify", "--seal-key", k]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seal of epoch 1 (row 4)"), "{err}");
}

/// `serve`'s seals are counted on `/metrics`: `ok` with the epoch, and
/// `failed` (a damaged state file) rather than silently skipped.
#[tokio::test]
async fn serves_seals_are_counted_and_a_failure_is_not_silent() {
    let f = fixture();
    let _vk = f.sealed_log(1);
    let m = trustbind_appliance::metrics::metrics();
    let (ok, failed) = (m.seals("ok"), m.seals("failed"));
    audit_seal::seal_logged(Arc::clone(&f.store), f.path().to_owned(), "interval").await;
    assert_eq!((m.seals("ok"), m.seals("failed")), (ok + 1, failed));
    assert!(m.render().contains("trustbind_audit_seal_epoch 2"));
    let file = f.path().join(audit_seal::STATE_FILE);
    let mut b = std::fs::read(&file).unwrap();
    b[20] ^= 1;
    std::fs::write(&file, &b).unwrap();
    audit_seal::seal_logged(Arc::clone(&f.store), f.path().to_owned(), "interval").await;
    assert_eq!((m.seals("ok"), m.seals("failed")), (ok + 1, failed + 1));
}
