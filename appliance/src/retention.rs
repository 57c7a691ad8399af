//! Retention: the audit log, channels and agent report ids are pruned by
//! age and size, oldest first, each batch exported before it is deleted;
//! the disk alarm; the space reserve.
//!
//! A background task ([`spawn`]) runs a [`Retention::pass`] every
//! interval (every second while work remains), off the decision path: it
//! reads a bounded batch of the oldest rows, appends them as JSON lines to
//! the export file of their table in `<data>/export/` and fsyncs it, and
//! only then deletes them, in one transaction with (for audit rows) a
//! checkpoint signed with the appliance's server key
//! ([`crate::store::Checkpoint`]). The export files are the record of
//! truth: nothing is pruned that is not in one, fsynced. When a syslog
//! receiver is configured, each exported audit row is also sent to it
//! over TLS (RFC 5424, RFC 5425 framing; the alert sink's code), best
//! effort behind a bounded queue: a receiver that is down never holds up
//! pruning (that would let it fill the disk and stop decisions, T-67);
//! rows it did not get are counted (`trustbind_retention_forwarded`) and
//! are in the export files.
//!
//! What is pruned in a pass:
//! - rows older than their table's age budget (`--audit-max-age-days`, …);
//! - rows beyond their table's row budget (`--audit-max-rows`, …);
//! - audit rows and closed channels while their bytes (estimated by
//!   [`Store::retained_bytes`]; signatures and the rest do not count) are
//!   over the store budget (`--store-max-percent` of the data partition);
//! - while the disk alarm is raised (free space under
//!   `--disk-alarm-percent`), audit rows until the database holds free
//!   pages for new rows ([`PRESSURE_HEADROOM`] of those bytes): SQLite
//!   reuses them, so the file stops growing.
//!
//! The export files are bounded too (`--export-max-percent` of the data
//! partition, files of [`Config::export_file_bytes`]): the oldest file is
//! removed when they grow past it (counted and logged). Forward them to a
//! SIEM to keep more.
//!
//! The space reserve: a file of [`Config::reserve_bytes`] zeros
//! (`<data>/retention.reserve`). When the disk is full, writing the export
//! would fail and nothing could be pruned: the reserve is deleted first,
//! so the export and the prune that frees pages inside the database go
//! through; it is made again once the alarm has fallen.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
pub use trustbind_policy::audit::{
    read_export_files, verify_checkpoint, verify_export, ExportLine, ExportReport,
};

use crate::metrics::metrics;
use crate::store::{now_ms, AuditRow, Checkpoint, Consolidation, Store, StoreError};

/// Name of the export directory inside the data directory.
pub const EXPORT_DIR: &str = "export";
/// Name of the reserve file inside the data directory.
pub const RESERVE_FILE: &str = "retention.reserve";
/// File name prefix of each table's export files (`<prefix>-NNNNNNNN.jsonl`).
pub const PREFIXES: [(&str, &str); 3] = [
    ("audit", "audit"),
    ("channels", "channels"),
    ("agent_reports", "reports"),
];
/// Free database pages kept while the disk alarm is raised, as a share of
/// the audit and channel rows' bytes (at least 1 MiB).
pub const PRESSURE_HEADROOM: f64 = 0.10;
/// Audit rows kept under the alarm whatever the headroom (the store
/// budget and the row and age budgets still apply).
pub const PRESSURE_FLOOR: i64 = 1_000;
/// Under the alarm, audit rows are pruned only once at least this many
/// are above [`PRESSURE_FLOOR`]: each prune writes a checkpoint and an
/// `audit.prune` row, so pruning down to the floor each pass would prune
/// that one row the pass before added, every second, and grow the
/// database and the export on the full disk by a checkpoint a second.
pub const PRESSURE_STEP: i64 = 100;
/// Least free-page headroom under pressure.
const MIN_HEADROOM: u64 = 1 << 20;
/// Most audit checkpoints kept: past it, the oldest (all but the newest
/// half) are consolidated into one signed checkpoint
/// ([`Store::consolidate_checkpoints`]). Each holds a server certificate
/// (about 1 KB), and one is made per audit batch pruned.
pub const MAX_CHECKPOINTS: usize = 64;

/// Retention settings (`serve --audit-max-age-days` and the rest).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Audit rows older than this are pruned (`None`: no age limit).
    pub audit_max_age: Option<Duration>,
    /// Closed channels older than this are pruned.
    pub channel_max_age: Option<Duration>,
    /// Agent report ids (kept so a re-sent record is not stored twice)
    /// older than this are pruned.
    pub report_max_age: Option<Duration>,
    /// Most audit rows kept (`None`: no row limit).
    pub audit_max_rows: Option<u64>,
    /// Most channels kept (closed ones are pruned first; open ones never).
    pub channel_max_rows: Option<u64>,
    /// Most agent report ids kept.
    pub report_max_rows: Option<u64>,
    /// The audit and channel rows' bytes are kept under this share of the
    /// data partition (percent).
    pub store_max_percent: u8,
    /// The export files are kept under this share of the data partition.
    pub export_max_percent: u8,
    /// Size at which an export file is closed and the next one begun.
    pub export_file_bytes: u64,
    /// The disk alarm rises when free space falls under this share.
    pub alarm_percent: u8,
    /// Bytes kept in the reserve file (0: no reserve).
    pub reserve_bytes: u64,
    /// Time between passes when there is nothing to do.
    pub interval: Duration,
    /// Rows per exported and pruned batch (one transaction each).
    pub batch: u32,
    /// Most batches in one pass.
    pub max_batches: u32,
    /// Most audit checkpoints kept ([`MAX_CHECKPOINTS`]; at least 2).
    pub max_checkpoints: usize,
}

const DAY: u64 = 86_400;

impl Default for Config {
    fn default() -> Self {
        Config {
            audit_max_age: Some(Duration::from_secs(400 * DAY)),
            channel_max_age: Some(Duration::from_secs(90 * DAY)),
            report_max_age: Some(Duration::from_secs(30 * DAY)),
            audit_max_rows: None,
            channel_max_rows: None,
            report_max_rows: None,
            store_max_percent: 50,
            export_max_percent: 30,
            export_file_bytes: 16 << 20,
            alarm_percent: 10,
            reserve_bytes: 4 << 20,
            interval: Duration::from_secs(60),
            batch: 2_000,
            max_batches: 50,
            max_checkpoints: MAX_CHECKPOINTS,
        }
    }
}

/// Size and free space of a file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct DiskSpace {
    /// Bytes in the file system.
    pub size: u64,
    /// Bytes an unprivileged writer may still use.
    pub free: u64,
}

/// The file system holding `path`.
pub fn disk_space(path: &Path) -> std::io::Result<DiskSpace> {
    let s = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(DiskSpace {
        size: s.f_blocks.saturating_mul(s.f_frsize),
        free: s.f_bavail.saturating_mul(s.f_frsize),
    })
}

/// Whether `e` is "no space left on device" (or over quota).
fn no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.raw_os_error() == Some(28)
        || e.raw_os_error() == Some(122)
}

/// One table's series of export files: `<dir>/<prefix>-NNNNNNNN.jsonl`,
/// appended to and fsynced, a new one begun past the size bound.
#[derive(Debug)]
pub struct ExportLog {
    dir: PathBuf,
    prefix: &'static str,
    file_bytes: u64,
    number: u64,
    file: Option<File>,
    size: u64,
}

/// The numbers of `prefix`'s export files in `dir`, ascending.
fn numbered(dir: &Path, prefix: &str) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix(prefix))
            .and_then(|s| s.strip_prefix('-'))
            .and_then(|s| s.strip_suffix(".jsonl"))
            .filter(|s| s.len() == 8)
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        out.push(n);
    }
    out.sort_unstable();
    Ok(out)
}

/// The export files of `prefix` (e.g. `"audit"`) in the export directory
/// `dir`, oldest first: what `trustbind audit verify-export` takes.
pub fn export_files(dir: &Path, prefix: &str) -> std::io::Result<Vec<PathBuf>> {
    Ok(numbered(dir, prefix)?
        .into_iter()
        .map(|n| dir.join(format!("{prefix}-{n:08}.jsonl")))
        .collect())
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl ExportLog {
    /// Opens the newest file of `prefix` in `dir` (creating `dir`); a
    /// partial last line (a crash while writing it) is cut off.
    pub fn open(dir: &Path, prefix: &'static str, file_bytes: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let number = numbered(dir, prefix)?.last().copied().unwrap_or(1);
        let mut log = ExportLog {
            dir: dir.to_owned(),
            prefix,
            file_bytes: file_bytes.max(4096),
            number,
            file: None,
            size: 0,
        };
        if log.path().exists() {
            let mut f = OpenOptions::new().read(true).write(true).open(log.path())?;
            let len = f.metadata()?.len();
            let keep = complete_len(&mut f, len)?;
            if keep != len {
                f.set_len(keep)?;
                f.sync_all()?;
            }
            f.seek(SeekFrom::End(0))?;
            log.size = keep;
            log.file = Some(f);
        }
        Ok(log)
    }

    /// Name of the current file.
    pub fn name(&self) -> String {
        format!("{}-{:08}.jsonl", self.prefix, self.number)
    }

    fn path(&self) -> PathBuf {
        self.dir.join(self.name())
    }

    /// Appends `lines` (whole JSON lines) and fsyncs; begins a new file
    /// first if this one would pass its bound. Returns the file's name.
    pub fn append(&mut self, lines: &[u8]) -> std::io::Result<String> {
        if self.file.is_some()
            && self.size > 0
            && self.size.saturating_add(lines.len() as u64) > self.file_bytes
        {
            self.file = None;
            self.number = self.number.saturating_add(1);
            self.size = 0;
        }
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path())?;
            fsync_dir(&self.dir)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        let Some(f) = self.file.as_mut() else {
            return Err(std::io::Error::other("export file not open"));
        };
        let r = f.write_all(lines).and_then(|()| f.sync_data());
        if let Err(e) = r {
            // Cut what was half written so the file stays whole lines.
            let _ = f.set_len(self.size);
            let _ = f.sync_all();
            return Err(e);
        }
        self.size = self.size.saturating_add(lines.len() as u64);
        Ok(self.name())
    }

    /// The last complete line of the newest file, if any.
    pub fn last_line(&self) -> std::io::Result<Option<String>> {
        if !self.path().exists() {
            return Ok(None);
        }
        let mut f = File::open(self.path())?;
        let len = f.metadata()?.len();
        let back = len.min(1 << 20);
        f.seek(SeekFrom::Start(len - back))?;
        let mut buf = Vec::with_capacity(back as usize);
        f.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        Ok(text
            .trim_end_matches('\n')
            .rsplit('\n')
            .next()
            .filter(|l| !l.is_empty())
            .map(str::to_owned))
    }
}

/// Length of `f` up to and including its last newline.
fn complete_len(f: &mut File, len: u64) -> std::io::Result<u64> {
    let mut pos = len;
    let mut buf = [0_u8; 4096];
    while pos > 0 {
        let n = pos.min(buf.len() as u64);
        f.seek(SeekFrom::Start(pos - n))?;
        let Some(chunk) = buf.get_mut(..n as usize) else {
            return Ok(0);
        };
        f.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            return Ok(pos - n + i as u64 + 1);
        }
        pos -= n;
    }
    Ok(0)
}

/// Signs checkpoint messages (the signature, hex, and the signer's
/// certificate, PEM) and checks checkpoints' signatures (before older
/// ones are consolidated: nothing is signed over that does not verify).
#[derive(Clone)]
pub struct Signer {
    sign: Arc<SignFn>,
    verify: Arc<VerifyFn>,
}

/// Signs a checkpoint message: the signature (hex) and the certificate.
type SignFn = dyn Fn(&[u8]) -> Result<(String, String), String> + Send + Sync;
/// Checks a checkpoint's signature.
type VerifyFn = dyn Fn(&Checkpoint) -> Result<(), String> + Send + Sync;

impl Signer {
    /// A signer from its two halves.
    pub fn new(
        sign: impl Fn(&[u8]) -> Result<(String, String), String> + Send + Sync + 'static,
        verify: impl Fn(&Checkpoint) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Signer {
            sign: Arc::new(sign),
            verify: Arc::new(verify),
        }
    }

    /// Signs `msg` ([`Checkpoint::message`]).
    pub fn sign(&self, msg: &[u8]) -> Result<(String, String), String> {
        (self.sign)(msg)
    }

    /// Checks `cp`'s signature.
    pub fn verify(&self, cp: &Checkpoint) -> Result<(), String> {
        (self.verify)(cp)
    }
}

/// A [`Signer`] with the appliance's server key, checking against its CA.
pub fn server_key_signer(pki: Arc<crate::pki::Pki>) -> Signer {
    let ca = Arc::clone(&pki);
    Signer::new(
        move |msg| {
            pki.sign_with_server_key(msg)
                .map(|(sig, pem)| (crate::store::hex(&sig), pem))
                .map_err(|e| format!("cannot sign the audit checkpoint: {e}"))
        },
        move |cp| verify_checkpoint(cp, ca.ca_der()),
    )
}

/// Checks the signature of every checkpoint of `cps` against `ca` (what
/// `audit verify` does: they are few, [`Config::max_checkpoints`]).
pub fn verify_checkpoints(
    cps: &[Checkpoint],
    ca: &rustls::pki_types::CertificateDer<'_>,
) -> Result<(), String> {
    cps.iter().try_for_each(|c| verify_checkpoint(c, ca))
}

/// Exported audit rows to forward (a syslog sink's queue).
pub type Forward = Arc<dyn Fn(&AuditRow) + Send + Sync>;

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PassReport {
    /// Audit rows exported and pruned.
    pub audit: u64,
    /// Channels exported and pruned.
    pub channels: u64,
    /// Agent report ids exported and pruned.
    pub reports: u64,
    /// Export bytes written.
    pub bytes: u64,
    /// Whether more is left to prune (the next pass comes soon).
    pub more: bool,
    /// Whether the disk alarm is raised.
    pub alarm: bool,
}

/// Retention of one store; [`Retention::pass`] does one round.
pub struct Retention {
    store: Arc<Store>,
    cfg: Config,
    data_dir: PathBuf,
    audit: ExportLog,
    channels: ExportLog,
    reports: ExportLog,
    /// Newest audit row already in an export file (a crash after the
    /// export and before the prune: not exported twice).
    audit_exported: i64,
    signer: Signer,
    forward: Option<Forward>,
    alarm: bool,
    reserve_released: bool,
    /// Why the checkpoints were last not consolidated (logged once).
    consolidation_refused: Option<String>,
}

impl std::fmt::Debug for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retention")
            .field("cfg", &self.cfg)
            .field("data_dir", &self.data_dir)
            .field("alarm", &self.alarm)
            .finish_non_exhaustive()
    }
}

/// Errors of a pass.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Writing an export file failed (nothing was pruned).
    #[error("export: {0}")]
    Io(#[from] std::io::Error),
    /// Encoding a row failed.
    #[error("export encoding: {0}")]
    Json(#[from] serde_json::Error),
}

impl Retention {
    /// Retention of `store`, exporting into `<data_dir>/export/`.
    pub fn new(
        store: Arc<Store>,
        cfg: Config,
        data_dir: &Path,
        signer: Signer,
        forward: Option<Forward>,
    ) -> Result<Self, RetentionError> {
        let dir = data_dir.join(EXPORT_DIR);
        let audit = ExportLog::open(&dir, "audit", cfg.export_file_bytes)?;
        let audit_exported = match audit.last_line()? {
            Some(l) => match serde_json::from_str::<ExportLine>(&l) {
                Ok(ExportLine::Row(r)) => r.seq,
                Ok(ExportLine::Checkpoint { checkpoint }) => checkpoint.upto_seq,
                Err(_) => 0,
            },
            None => 0,
        };
        Ok(Retention {
            channels: ExportLog::open(&dir, "channels", cfg.export_file_bytes)?,
            reports: ExportLog::open(&dir, "reports", cfg.export_file_bytes)?,
            audit,
            audit_exported,
            store,
            cfg,
            data_dir: data_dir.to_owned(),
            signer,
            forward,
            alarm: false,
            reserve_released: false,
            consolidation_refused: None,
        })
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn cutoff(age: Option<Duration>) -> Option<i64> {
        age.map(|a| now_ms().saturating_sub(i64::try_from(a.as_millis()).unwrap_or(i64::MAX)))
    }

    /// Writes `lines` to `log`, releasing the reserve and trying once more
    /// if the disk is full.
    fn write_export(
        log: &mut ExportLog,
        lines: &[u8],
        data_dir: &Path,
        released: &mut bool,
    ) -> Result<String, RetentionError> {
        match log.append(lines) {
            Ok(name) => Ok(name),
            Err(e) if no_space(&e) && !*released => {
                release_reserve(data_dir, released);
                Ok(log.append(lines)?)
            }
            Err(e) if no_space(&e) => {
                // The reserve is gone and the disk is still full: the
                // oldest export file (never the one written to) makes room,
                // so that the newest events are kept rather than lost.
                let dir = data_dir.join(EXPORT_DIR);
                if !trim_exports(&dir, export_bytes(&dir).saturating_sub(1), &[log.name()]) {
                    return Err(e.into());
                }
                Ok(log.append(lines)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Exports and prunes one batch of the oldest audit rows (older than
    /// `before_ms` if given, at most `limit`). Returns rows pruned.
    fn audit_batch(
        &mut self,
        before_ms: Option<i64>,
        limit: u32,
        rep: &mut PassReport,
    ) -> Result<u64, RetentionError> {
        let rows = self.store.oldest_audit(before_ms, limit.max(1))?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut buf = Vec::with_capacity(rows.len() * 400);
        for r in rows.iter().filter(|r| r.seq > self.audit_exported) {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let file = if buf.is_empty() {
            self.audit.name()
        } else {
            Self::write_export(
                &mut self.audit,
                &buf,
                &self.data_dir,
                &mut self.reserve_released,
            )?
        };
        let n = rows.len() as u64;
        metrics().record_exported("audit", n, buf.len() as u64);
        rep.bytes = rep.bytes.saturating_add(buf.len() as u64);
        if let Some(last) = rows.last() {
            self.audit_exported = self.audit_exported.max(last.seq);
        }
        if let Some(fwd) = &self.forward {
            for r in &rows {
                fwd(r);
            }
        }
        let signer = self.signer.clone();
        let cp = self.store.prune_audit(&rows, &file, |m| signer.sign(m))?;
        metrics().record_pruned("audit", n);
        rep.audit = rep.audit.saturating_add(n);
        if let Some(cp) = cp {
            // The checkpoint after its rows, so the file verifies alone.
            let mut line = serde_json::to_vec(&ExportLine::Checkpoint { checkpoint: cp })?;
            line.push(b'\n');
            if let Err(e) = Self::write_export(
                &mut self.audit,
                &line,
                &self.data_dir,
                &mut self.reserve_released,
            ) {
                // The checkpoint is in the database (`audit verify` shows it).
                tracing::warn!("audit checkpoint not written to the export file: {e}");
            }
            self.consolidate_checkpoints();
        }
        Ok(n)
    }

    /// Keeps the checkpoints under [`Config::max_checkpoints`] (each prune
    /// adds one), consolidating the oldest. Never fails the pass: rows are
    /// pruned whether or not the checkpoints are consolidated.
    fn consolidate_checkpoints(&mut self) {
        let signer = self.signer.clone();
        let r = self.store.consolidate_checkpoints(
            self.cfg.max_checkpoints,
            |m| signer.sign(m),
            |c| signer.verify(c),
        );
        match r {
            Ok(Consolidation::Kept { checkpoints }) => {
                metrics().set_audit_checkpoints(checkpoints as u64);
            }
            Ok(Consolidation::Merged {
                replaced,
                checkpoint,
                checkpoints,
            }) => {
                metrics().record_checkpoints_consolidated("merged");
                metrics().set_audit_checkpoints(checkpoints as u64);
                self.consolidation_refused = None;
                tracing::info!(
                    "retention: {replaced} audit checkpoints consolidated into checkpoint {} (rows {}..={})",
                    checkpoint.id,
                    checkpoint.from_seq,
                    checkpoint.upto_seq
                );
            }
            Ok(Consolidation::Refused { why, checkpoints }) => {
                metrics().record_checkpoints_consolidated("refused");
                metrics().set_audit_checkpoints(checkpoints as u64);
                if self.consolidation_refused.as_ref() != Some(&why) {
                    tracing::error!(
                        "AUDIT CHECKPOINTS NOT CONSOLIDATED: {why}; they are kept as they are (run `audit verify`)"
                    );
                    self.consolidation_refused = Some(why);
                }
            }
            Err(e) => tracing::warn!("retention: audit checkpoints not consolidated: {e}"),
        }
    }

    fn channel_batch(
        &mut self,
        before_ms: Option<i64>,
        limit: u32,
        rep: &mut PassReport,
    ) -> Result<u64, RetentionError> {
        let rows = self.store.closed_channels(before_ms, limit.max(1))?;
        let ids: Vec<i64> = rows.iter().map(|c| c.id).collect();
        let n = self.export_then_delete("channels", &rows, rep, |s| s.delete_channels(&ids))?;
        rep.channels = rep.channels.saturating_add(n);
        Ok(n)
    }

    fn report_batch(
        &mut self,
        before_ms: Option<i64>,
        limit: u32,
        rep: &mut PassReport,
    ) -> Result<u64, RetentionError> {
        let rows = self.store.old_reports(before_ms, limit.max(1))?;
        let n =
            self.export_then_delete("agent_reports", &rows, rep, |s| s.delete_reports(&rows))?;
        rep.reports = rep.reports.saturating_add(n);
        Ok(n)
    }

    /// Appends `rows` of `table` (`channels`, `agent_reports`) to its
    /// export file, fsynced, then runs `delete`. Returns rows deleted.
    fn export_then_delete<T: Serialize>(
        &mut self,
        table: &'static str,
        rows: &[T],
        rep: &mut PassReport,
        delete: impl FnOnce(&Store) -> Result<u64, StoreError>,
    ) -> Result<u64, RetentionError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut buf = Vec::new();
        for r in rows {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let log = if table == "channels" {
            &mut self.channels
        } else {
            &mut self.reports
        };
        Self::write_export(log, &buf, &self.data_dir, &mut self.reserve_released)?;
        metrics().record_exported(table, rows.len() as u64, buf.len() as u64);
        rep.bytes = rep.bytes.saturating_add(buf.len() as u64);
        let n = delete(&self.store)?;
        metrics().record_pruned(table, n);
        Ok(n)
    }

    /// Measures the disk, raises or lowers the alarm (logged loudly) and
    /// sets the gauges.
    fn check_disk(&mut self) -> Result<DiskSpace, RetentionError> {
        let space = disk_space(&self.data_dir)?;
        let (live, _) = self.store.db_bytes()?;
        let exports = export_bytes(&self.data_dir.join(EXPORT_DIR));
        metrics().set_disk(space.free, space.size, live, exports);
        let threshold = pct(space.size, self.cfg.alarm_percent);
        let alarm = space.free < threshold;
        if alarm && !self.alarm {
            tracing::error!(
                "DISK ALARM: the data partition has {} of {} bytes free (under {}%): pruning early; decisions go on",
                space.free,
                space.size,
                self.cfg.alarm_percent
            );
        } else if !alarm && self.alarm {
            tracing::warn!(
                "disk alarm cleared: the data partition has {} of {} bytes free",
                space.free,
                space.size
            );
        }
        self.alarm = alarm;
        if !alarm && self.reserve_released {
            // Space came back: hold the reserve again.
            self.reserve_released = false;
        }
        if !alarm && self.cfg.reserve_bytes > 0 {
            if let Err(e) = ensure_reserve(&self.data_dir, self.cfg.reserve_bytes) {
                tracing::warn!("space reserve not made: {e}");
            }
        }
        metrics().set_disk_alarm(alarm, self.reserve_released);
        Ok(space)
    }

    /// One round: everything due, in at most `max_batches` batches per
    /// table.
    pub fn pass(&mut self) -> Result<PassReport, RetentionError> {
        let mut rep = PassReport::default();
        let space = self.check_disk()?;
        rep.alarm = self.alarm;
        if self.alarm && !self.reserve_released && space.free < self.cfg.reserve_bytes {
            release_reserve(&self.data_dir, &mut self.reserve_released);
        }
        let batch = self.cfg.batch.max(1);
        let max = self.cfg.max_batches.max(1);
        let mut batches = 0_u32;
        // Age.
        let audit_before = Self::cutoff(self.cfg.audit_max_age);
        while audit_before.is_some() && batches < max {
            batches += 1;
            if self.audit_batch(audit_before, batch, &mut rep)? < u64::from(batch) {
                break;
            }
        }
        let (audit_rows, channel_rows, report_rows) = self.store.retained_rows()?;
        // Row budgets.
        let over = |rows: i64, max: Option<u64>| -> u64 {
            max.map_or(0, |m| u64::try_from(rows).unwrap_or(0).saturating_sub(m))
        };
        let mut excess = over(audit_rows, self.cfg.audit_max_rows);
        while excess > 0 && batches < max {
            batches += 1;
            let n = self.audit_batch(None, batch.min(excess as u32), &mut rep)?;
            if n == 0 {
                break;
            }
            excess = excess.saturating_sub(n);
        }
        // The store budget, and the headroom under the alarm.
        // Both count only what retention can prune (an estimate of the
        // audit and channel rows' bytes), never the signatures: a large
        // signature import must not empty the audit log.
        let budget = pct(space.size, self.cfg.store_max_percent);
        let mut audit_left = self.store.retained_rows()?.0;
        while batches < max {
            let (_, free) = self.store.db_bytes()?;
            let retained = self.store.retained_bytes()?;
            let over_budget = retained > budget;
            let headroom = ((retained as f64 * PRESSURE_HEADROOM) as u64).max(MIN_HEADROOM);
            // Under the alarm, never below the newest PRESSURE_FLOOR rows
            // (a small database must not be emptied every second), and
            // only PRESSURE_STEP rows or more at a time.
            let pressed =
                self.alarm && free < headroom && audit_left >= PRESSURE_FLOOR + PRESSURE_STEP;
            if !over_budget && !pressed {
                break;
            }
            batches += 1;
            let limit = if over_budget {
                batch
            } else {
                batch.min(u32::try_from(audit_left - PRESSURE_FLOOR).unwrap_or(batch))
            };
            let n = self.audit_batch(None, limit, &mut rep)?;
            audit_left = audit_left.saturating_sub(i64::try_from(n).unwrap_or(0));
            let c = self.channel_batch(None, batch, &mut rep)?;
            if n == 0 && c == 0 {
                break;
            }
        }
        rep.more |= batches >= max;
        // Channels and reports by age and rows.
        let mut b = 0_u32;
        let ch_before = Self::cutoff(self.cfg.channel_max_age);
        while ch_before.is_some() && b < max {
            b += 1;
            if self.channel_batch(ch_before, batch, &mut rep)? < u64::from(batch) {
                break;
            }
        }
        let mut excess = over(channel_rows, self.cfg.channel_max_rows);
        while excess > 0 && b < max {
            b += 1;
            let n = self.channel_batch(None, batch.min(excess as u32), &mut rep)?;
            if n == 0 {
                break;
            }
            excess = excess.saturating_sub(n);
        }
        rep.more |= b >= max;
        let mut b = 0_u32;
        let rp_before = Self::cutoff(self.cfg.report_max_age);
        while rp_before.is_some() && b < max {
            b += 1;
            if self.report_batch(rp_before, batch, &mut rep)? < u64::from(batch) {
                break;
            }
        }
        let mut excess = over(report_rows, self.cfg.report_max_rows);
        while excess > 0 && b < max {
            b += 1;
            let n = self.report_batch(None, batch.min(excess as u32), &mut rep)?;
            if n == 0 {
                break;
            }
            excess = excess.saturating_sub(n);
        }
        rep.more |= b >= max;
        let current = [self.audit.name(), self.channels.name(), self.reports.name()];
        let _ = trim_exports(
            &self.data_dir.join(EXPORT_DIR),
            pct(space.size, self.cfg.export_max_percent),
            &current,
        );
        self.check_disk()?;
        rep.alarm = self.alarm;
        Ok(rep)
    }
}

fn pct(size: u64, percent: u8) -> u64 {
    ((u128::from(size) * u128::from(percent)) / 100) as u64
}

/// Bytes of the export files in `dir`.
fn export_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Removes the oldest export files (never a current one) while the files
/// take more than `budget` bytes. Returns whether it removed any.
fn trim_exports(dir: &Path, budget: u64, current: &[String]) -> bool {
    let Ok(d) = fs::read_dir(dir) else {
        return false;
    };
    let mut removed = false;
    let mut files: Vec<(std::time::SystemTime, String, u64)> = d
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let name = e.file_name().into_string().ok()?;
            if !name.ends_with(".jsonl") {
                return None;
            }
            Some((m.modified().ok()?, name, m.len()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.2).sum();
    files.sort();
    for (_, name, len) in files {
        if total <= budget {
            break;
        }
        if current.contains(&name) {
            continue;
        }
        match fs::remove_file(dir.join(&name)) {
            Ok(()) => {
                total = total.saturating_sub(len);
                removed = true;
                metrics().record_export_file_removed();
                tracing::warn!(
                    "retention: export file {name} removed to keep the export files under {budget} bytes"
                );
            }
            Err(e) => tracing::warn!("retention: cannot remove export file {name}: {e}"),
        }
    }
    removed
}

/// Makes the reserve file `bytes` long (zeros written, so the blocks are
/// really held).
fn ensure_reserve(data_dir: &Path, bytes: u64) -> std::io::Result<()> {
    let path = data_dir.join(RESERVE_FILE);
    if fs::metadata(&path).is_ok_and(|m| m.len() >= bytes) {
        return Ok(());
    }
    let tmp = data_dir.join(format!("{RESERVE_FILE}.tmp"));
    let r = (|| {
        let mut f = File::create(&tmp)?;
        let zeros = vec![0_u8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(zeros.get(..n).unwrap_or_default())?;
            left -= n as u64;
        }
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fsync_dir(data_dir)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// At start, before the database is opened (which itself needs space:
/// the WAL and its index): releases the reserve if the data partition has
/// less than `min_free` bytes free. Returns whether it did.
pub fn release_reserve_at_start(data_dir: &Path, min_free: u64) -> bool {
    let Ok(space) = disk_space(data_dir) else {
        return false;
    };
    if space.free >= min_free || !data_dir.join(RESERVE_FILE).exists() {
        return false;
    }
    let mut released = false;
    release_reserve(data_dir, &mut released);
    released
}

fn release_reserve(data_dir: &Path, released: &mut bool) {
    match fs::remove_file(data_dir.join(RESERVE_FILE)) {
        Ok(()) => {
            tracing::error!(
                "DISK FULL: the space reserve ({}) is released so that retention can export and prune",
                data_dir.join(RESERVE_FILE).display()
            );
            *released = true;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => *released = true,
        Err(e) => tracing::error!("DISK FULL: cannot release the space reserve: {e}"),
    }
    metrics().set_disk_alarm(true, *released);
}

/// Runs retention passes until the process ends: every
/// [`Config::interval`], every second while work remains or the alarm is
/// raised. Each pass runs on a blocking thread, off the decision path.
pub fn spawn(mut r: Retention) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let t = Instant::now();
            let (back, res) = match tokio::task::spawn_blocking(move || {
                let res = r.pass();
                (r, res)
            })
            .await
            {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!("retention stopped: {e}");
                    return;
                }
            };
            r = back;
            let wait = match res {
                Ok(rep) => {
                    if rep.audit + rep.channels + rep.reports > 0 {
                        tracing::info!(
                            audit = rep.audit,
                            channels = rep.channels,
                            reports = rep.reports,
                            bytes = rep.bytes,
                            "retention: exported and pruned in {:?}",
                            t.elapsed()
                        );
                    }
                    if rep.more || rep.alarm {
                        Duration::from_secs(1)
                    } else {
                        r.cfg.interval
                    }
                }
                Err(e) => {
                    tracing::error!("retention pass failed (nothing unexported was pruned): {e}");
                    Duration::from_secs(5).min(r.cfg.interval)
                }
            };
            tokio::time::sleep(wait).await;
        }
    })
}
