//! Forward-secure sealing of the audit chain (threat model T-83;
//! `docs/RETENTION.md`, "Forward-secure seals"): the appliance's side.
//!
//! [`setup`] draws `k0`, returns it once as the administrator's
//! [`VerifyKey`] and keeps only `k1` in the state file
//! (`<data>/audit-seal.state`). [`seal`] appends a seal row tagged with
//! the current epoch's key and replaces the key by the next one. The tags,
//! the evolution and the verification are `trustbind_policy::audit_seal`.
//!
//! The state file is one 512-byte record (a checksum at its end)
//! overwritten **in place** at offset 0 and fdatasynced: on ext4
//! (`data=ordered`, the image's) an overwrite goes to the same blocks, so
//! the previous key is not left in a freed block as a new file renamed
//! over it would leave it; one sector-sized write is the unit a disk
//! writes whole. The record holds the next epoch's key and the seal just
//! made (`pending`, cleared once it committed), and is written inside the
//! database transaction that appends that seal, before its commit. So a crash at any point leaves
//! either the old state and no seal (nothing happened), or the new key
//! and a seal the next [`seal`] appends from the record if the
//! transaction did not commit ("recovered"): the old key is never on disk
//! after the seal, and no epoch is lost. Concurrent sealers (`serve`'s
//! timer, `trustbind-appliance audit seal`) take an exclusive `flock` on
//! the file.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use trustbind_policy::audit_seal::{
    evolve, seal_tag, Key, SealDetail, SetupDetail, VerifyKey, SEAL_KIND, SETUP_KIND,
};
use zeroize::Zeroizing;

use crate::store::{now_ms, AuditEvent, AuditTx, Store, StoreError};

pub use trustbind_policy::audit_seal::{SealReport, SealVerifier};

/// The state file's name in the data directory.
pub const STATE_FILE: &str = "audit-seal.state";
/// Default sealing interval (`serve --audit-seal-interval`), seconds.
pub const DEFAULT_INTERVAL_SECS: u64 = 900;

const STATE_LEN: usize = 512;
const BODY_LEN: usize = STATE_LEN - 32;
const MAGIC: &[u8; 8] = b"TBASEAL1";

/// Why sealing failed; names the file.
#[derive(Debug, thiserror::Error)]
pub enum FssError {
    /// The state file.
    #[error("{}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// Sealing is not set up (no state file).
    #[error("audit sealing is not set up ({} does not exist): run `trustbind-appliance audit seal-setup`", .0.display())]
    NotSetUp(PathBuf),
    /// Refused, changing nothing.
    #[error("{0}")]
    Refused(String),
    /// The database.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> FssError {
    FssError::File {
        path: path.to_owned(),
        why: e.to_string(),
    }
}

/// The state file of `data_dir`.
pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATE_FILE)
}

/// Whether sealing is set up in `data_dir`.
pub fn is_set_up(data_dir: &Path) -> bool {
    state_path(data_dir).exists()
}

/// The seal made and not yet known to be committed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    epoch: u64,
    seq: i64,
    sealed_ms: i64,
    hash: String,
    tag: String,
}

/// The state file's record.
struct State {
    /// The epoch `key` seals.
    epoch: u64,
    key: Key,
    start_ms: i64,
    interval_ms: i64,
    pending: Option<Pending>,
}

fn put_hex64(out: &mut Vec<u8>, s: &str) {
    let mut b = [0_u8; 64];
    for (d, c) in b.iter_mut().zip(s.bytes()) {
        *d = c;
    }
    out.extend_from_slice(&b);
}

impl State {
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(STATE_LEN));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(self.key.as_ref());
        out.extend_from_slice(&self.start_ms.to_le_bytes());
        out.extend_from_slice(&self.interval_ms.to_le_bytes());
        match &self.pending {
            None => out.push(0),
            Some(p) => {
                out.push(1);
                out.extend_from_slice(&p.epoch.to_le_bytes());
                out.extend_from_slice(&p.seq.to_le_bytes());
                out.extend_from_slice(&p.sealed_ms.to_le_bytes());
                put_hex64(&mut out, &p.hash);
                put_hex64(&mut out, &p.tag);
            }
        }
        out.resize(BODY_LEN, 0);
        let sum = Sha256::digest(out.as_slice());
        out.extend_from_slice(&sum);
        out
    }

    fn decode(path: &Path, b: &[u8]) -> Result<State, FssError> {
        let bad = |why: &str| file_err(path, format!("not a sealing state ({why})"));
        let (body, sum) = (
            b.get(..BODY_LEN).ok_or_else(|| bad("short"))?,
            b.get(BODY_LEN..STATE_LEN).ok_or_else(|| bad("short"))?,
        );
        if Sha256::digest(body).as_slice() != sum {
            return Err(bad("checksum mismatch: damaged"));
        }
        let mut r = Reader(body);
        if r.take::<8>()? != *MAGIC {
            return Err(bad("wrong magic"));
        }
        let epoch = u64::from_le_bytes(r.take()?);
        let key = Zeroizing::new(r.take::<32>()?);
        let start_ms = i64::from_le_bytes(r.take()?);
        let interval_ms = i64::from_le_bytes(r.take()?);
        let pending = match r.take::<1>()? {
            [0] => None,
            _ => Some(Pending {
                epoch: u64::from_le_bytes(r.take()?),
                seq: i64::from_le_bytes(r.take()?),
                sealed_ms: i64::from_le_bytes(r.take()?),
                hash: String::from_utf8_lossy(&r.take::<64>()?).into_owned(),
                tag: String::from_utf8_lossy(&r.take::<64>()?).into_owned(),
            }),
        };
        Ok(State {
            epoch,
            key,
            start_ms,
            interval_ms,
            pending,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], FssError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| FssError::Refused("sealing state truncated".into()))?;
        self.0 = rest;
        Ok(*head)
    }
}

/// The open, locked state file.
struct Locked {
    path: PathBuf,
    file: File,
}

impl Locked {
    fn open(data_dir: &Path) -> Result<Locked, FssError> {
        let path = state_path(data_dir);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FssError::NotSetUp(path))
            }
            Err(e) => return Err(file_err(&path, e)),
        };
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| file_err(&path, format!("lock: {e}")))?;
        Ok(Locked { path, file })
    }

    fn read(&self) -> Result<State, FssError> {
        let mut b = Zeroizing::new([0_u8; STATE_LEN]);
        self.file
            .read_exact_at(b.as_mut(), 0)
            .map_err(|e| file_err(&self.path, e))?;
        State::decode(&self.path, b.as_ref())
    }

    /// Overwrites the record in place and syncs it: the previous key is
    /// gone from the file once this returns.
    fn write(&self, st: &State) -> Result<(), FssError> {
        let b = st.encode();
        self.file
            .write_all_at(&b, 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| file_err(&self.path, format!("write: {e}")))
    }
}

fn seal_event(p: &Pending, reason: &str) -> Result<AuditEvent, FssError> {
    let d = SealDetail {
        epoch: p.epoch,
        seq: p.seq,
        hash: p.hash.clone(),
        sealed_ms: p.sealed_ms,
        tag: p.tag.clone(),
        reason: reason.to_owned(),
    };
    let detail = serde_json::to_value(&d).map_err(StoreError::from)?;
    Ok(AuditEvent::new(SEAL_KIND, "appliance", detail))
}

/// Sets sealing up: draws `k0`, appends the setup row and seal 0 (over the
/// whole chain so far) and keeps `k1` in the state file. Returns the
/// verification key, which is kept nowhere on the appliance: the caller
/// hands it to the administrator. Refused if sealing is set up already.
pub fn setup(
    store: &Store,
    data_dir: &Path,
    now_ms: i64,
    interval_ms: i64,
) -> Result<VerifyKey, FssError> {
    let path = state_path(data_dir);
    if path.exists() {
        return Err(FssError::Refused(format!(
            "{}: audit sealing is set up already (its verification key was handed out then)",
            path.display()
        )));
    }
    if interval_ms <= 0 {
        return Err(FssError::Refused(
            "the sealing interval must be positive".into(),
        ));
    }
    let mut k0 = Zeroizing::new([0_u8; 32]);
    getrandom::getrandom(k0.as_mut())
        .map_err(|e| FssError::Refused(format!("no randomness: {e}")))?;
    let vk = VerifyKey::new(&k0, now_ms, interval_ms);
    let setup = SetupDetail {
        key_id: vk.key_id.clone(),
        start_ms: now_ms,
        interval_ms,
    };
    let tmp = data_dir.join(format!("{STATE_FILE}.tmp"));
    let r = store.audit_transaction(|t: &AuditTx<'_, '_>| {
        let detail = serde_json::to_value(&setup).map_err(StoreError::from)?;
        t.append(now_ms, &AuditEvent::new(SETUP_KIND, "appliance", detail))?;
        let (seq, hash) = t.head()?;
        let p = Pending {
            epoch: 0,
            seq,
            sealed_ms: now_ms,
            tag: seal_tag(&k0, 0, seq, &hash, now_ms),
            hash,
        };
        let st = State {
            epoch: 1,
            key: evolve(&k0),
            start_ms: now_ms,
            interval_ms,
            pending: Some(p.clone()),
        };
        create_state(&tmp, &path, &st)?;
        t.append(now_ms, &seal_event(&p, "setup")?)?;
        Ok::<_, FssError>(())
    });
    if let Err(e) = r {
        // Not committed: the state names a seal that is not there.
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    clear_pending(data_dir);
    Ok(vk)
}

fn create_state(tmp: &Path, path: &Path, st: &State) -> Result<(), FssError> {
    let _ = std::fs::remove_file(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| file_err(tmp, e))?;
    f.write_all(&st.encode())
        .and_then(|()| f.sync_all())
        .map_err(|e| file_err(tmp, e))?;
    // No earlier key exists to be left behind: a rename is safe here.
    std::fs::rename(tmp, path).map_err(|e| file_err(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| file_err(dir, e))
}

/// What [`seal`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The seal appended.
    pub seal: SealDetail,
    /// A seal made before a crash and appended now (its epoch).
    pub recovered: Option<u64>,
}

/// Test hook of [`seal_with`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// None.
    Never,
    /// After the new state is written, before the seal row is committed.
    BeforeCommit,
}

/// Seals the chain's head now with the current epoch's key, then evolves
/// the key (the old one overwritten). A seal left by a crash is appended
/// first. `reason`: `interval`, `start`, `shutdown`, `admin`.
pub fn seal(store: &Store, data_dir: &Path, now_ms: i64, reason: &str) -> Result<Sealed, FssError> {
    seal_with(store, data_dir, now_ms, reason, Crash::Never)
}

/// [`seal`], with a crash simulated for the tests.
#[doc(hidden)]
pub fn seal_with(
    store: &Store,
    data_dir: &Path,
    now_ms: i64,
    reason: &str,
    crash: Crash,
) -> Result<Sealed, FssError> {
    let file = Locked::open(data_dir)?;
    let st = file.read()?;
    let (sealed, next) = store.audit_transaction(|t: &AuditTx<'_, '_>| {
        let mut last = match t.last_of_kind(SEAL_KIND)? {
            Some(row) => Some(
                serde_json::from_str::<SealDetail>(&row.detail)
                    .map_err(|e| {
                        FssError::Refused(format!("audit row {}: seal unreadable ({e})", row.seq))
                    })?
                    .epoch,
            ),
            None => None,
        };
        let mut recovered = None;
        if let Some(p) = &st.pending {
            // Not committed: the last seal kept is older, or none is kept
            // (the record is cleared after each commit: a seal that
            // committed and was pruned since left no pending record,
            // but for a crash between that commit and the clearing).
            if last.is_none_or(|l| l < p.epoch) {
                t.append(now_ms, &seal_event(p, "recovered")?)?;
                recovered = Some(p.epoch);
                last = Some(p.epoch);
            }
        }
        if let Some(l) = last {
            if st.epoch <= l {
                return Err(FssError::Refused(format!(
                    "{}: its epoch {} is not after the audit log's last seal (epoch {l}): refusing to seal with an epoch twice (was the file replaced?)",
                    file.path.display(),
                    st.epoch
                )));
            }
        }
        let (seq, hash) = t.head()?;
        let p = Pending {
            epoch: st.epoch,
            seq,
            sealed_ms: now_ms,
            tag: seal_tag(&st.key, st.epoch, seq, &hash, now_ms),
            hash,
        };
        let next = State {
            epoch: st.epoch.saturating_add(1),
            key: evolve(&st.key),
            start_ms: st.start_ms,
            interval_ms: st.interval_ms,
            pending: Some(p.clone()),
        };
        file.write(&next)?;
        if crash == Crash::BeforeCommit {
            return Err(FssError::Refused("simulated crash before the commit".into()));
        }
        let ev = seal_event(&p, reason)?;
        t.append(now_ms, &ev)?;
        let sealed = Sealed {
            seal: serde_json::from_str(&ev.detail).map_err(StoreError::from)?,
            recovered,
        };
        Ok((sealed, next))
    })?;
    // Committed: the record no longer needs the seal. Failing to clear it
    // changes nothing (the next seal finds it in the log).
    let cleared = State {
        pending: None,
        ..next
    };
    if let Err(e) = file.write(&cleared) {
        tracing::warn!("audit sealed, its pending record not cleared: {e}");
    }
    Ok(sealed)
}

/// Clears the committed seal from the record (after setup).
fn clear_pending(data_dir: &Path) {
    let r = Locked::open(data_dir).and_then(|f| {
        let st = f.read()?;
        f.write(&State {
            pending: None,
            ..st
        })
    });
    if let Err(e) = r {
        tracing::warn!("audit sealing set up, its pending record not cleared: {e}");
    }
}

/// The sealing interval the state file was set up with (ms).
pub fn interval_ms(data_dir: &Path) -> Result<i64, FssError> {
    Ok(Locked::open(data_dir)?.read()?.interval_ms)
}

/// Checks the seals of the rows the store keeps (from the first one kept
/// after pruning) with the administrator's verification key.
pub fn verify_store(
    store: &Store,
    vk: &VerifyKey,
) -> Result<Result<SealReport, String>, StoreError> {
    let mut v = match SealVerifier::new(vk) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    let mut after = 0;
    loop {
        let rows = store.audit_rows(after, 2000)?;
        let Some(last) = rows.last() else { break };
        after = last.seq;
        for r in &rows {
            if let Err(e) = v.feed(r) {
                return Ok(Err(e.to_string()));
            }
        }
    }
    Ok(v.finish().map_err(|e| e.to_string()))
}

/// `serve`'s sealer: seals at start (`start`, which also appends a seal a
/// crash left pending) and then every interval the state file was set up
/// with (`interval`); `serve` seals once more at shutdown ([`seal`],
/// `shutdown`). `None`, with a warning, if sealing is not set up.
pub fn spawn(store: Arc<Store>, data_dir: PathBuf) -> Option<tokio::task::JoinHandle<()>> {
    let every = match interval_ms(&data_dir) {
        Ok(ms) => Duration::from_millis(u64::try_from(ms).unwrap_or(1).max(1)),
        Err(FssError::NotSetUp(p)) => {
            tracing::warn!(
                "audit sealing is not set up ({} missing): whoever can write the data partition can rewrite the audit log undetected (T-83); run `trustbind-appliance audit seal-setup`",
                p.display()
            );
            return None;
        }
        Err(e) => {
            tracing::error!("AUDIT SEALING FAILED: {e}");
            Duration::from_secs(DEFAULT_INTERVAL_SECS)
        }
    };
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reason = "start";
        loop {
            tick.tick().await;
            seal_logged(Arc::clone(&store), data_dir.clone(), reason).await;
            reason = "interval";
        }
    }))
}

/// [`seal`] off the runtime's threads; a failure is logged.
pub async fn seal_logged(store: Arc<Store>, data_dir: PathBuf, reason: &'static str) {
    let r = tokio::task::spawn_blocking(move || seal(&store, &data_dir, now_ms(), reason)).await;
    let m = crate::metrics::metrics();
    match r {
        Ok(Ok(s)) => {
            m.record_seal(Some(s.seal.epoch));
            tracing::info!(
                "audit sealed ({reason}): epoch {}, rows up to {}",
                s.seal.epoch,
                s.seal.seq
            );
        }
        Ok(Err(e)) => {
            m.record_seal(None);
            tracing::error!("AUDIT SEAL FAILED ({reason}): {e}");
        }
        Err(e) => {
            m.record_seal(None);
            tracing::error!("AUDIT SEAL FAILED ({reason}): {e}");
        }
    }
}
