//! The audit spool: what the agent decided or saw while the appliance was
//! unreachable, kept on disk until the appliance has stored it.
//!
//! Layout: a directory of segment files `<16 hex digits>.jsonl`, numbered
//! in order; one [`SpoolRecord`] per line. Appends go to the newest segment
//! and are made durable (`fdatasync`) before [`Spool::append`] returns; a
//! segment is closed once it passes [`SEGMENT_BYTES`]. Delivery reads the
//! oldest segment ([`Spool::oldest`]) and deletes it only after the
//! appliance acknowledged every record in it ([`Spool::ack`]). The
//! appliance stores by record id and ignores repeats, so a crash between
//! delivery and deletion re-sends a segment harmlessly: nothing is lost and
//! nothing is stored twice.
//!
//! A crash in the middle of an append leaves a torn last line (no newline).
//! Opening the spool cuts it off; a line that is complete but not a valid
//! record (disk corruption) is kept out of delivery and counted in
//! [`Segment::skipped`], never silently dropped from the file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A segment is closed for appends once it is this large.
pub const SEGMENT_BYTES: u64 = 1 << 20;

/// One audit record as the agent spools and reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolRecord {
    /// Unique per host: `<random instance id>-<counter>`.
    pub id: String,
    /// Host clock, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// What happened (`[a-z0-9_.]+`), e.g. `exec.offline`.
    pub what: String,
    /// Event fields.
    pub detail: serde_json::Value,
}

/// Spool failures, each naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// A record could not be encoded.
    #[error("cannot encode spool record: {0}")]
    Encode(#[from] serde_json::Error),
    /// The OS random source failed.
    #[error("no randomness for the spool instance id: {0}")]
    Random(getrandom::Error),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A closed or open segment's contents, for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Its number (pass to [`Spool::ack`]).
    pub number: u64,
    /// Its valid records, in order.
    pub records: Vec<SpoolRecord>,
    /// Complete lines that were not valid records (kept in the file).
    pub skipped: usize,
}

/// The spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    instance: String,
    counter: u64,
    current: Option<(u64, File, u64)>,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, cutting off a torn
    /// last line left by a crash.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id).map_err(SpoolError::Random)?;
        let instance = hex::encode(id);
        let mut spool = Self {
            dir: dir.to_owned(),
            instance,
            counter: 0,
            current: None,
        };
        if let Some(&newest) = spool.segments()?.last() {
            let path = spool.path(newest);
            let mut f = OpenOptions::new()
                .read(true)
                .append(true)
                .open(&path)
                .map_err(io_at(&path))?;
            let keep = complete_len(&mut f).map_err(io_at(&path))?;
            f.set_len(keep).map_err(io_at(&path))?;
            f.sync_data().map_err(io_at(&path))?;
            spool.current = Some((newest, f, keep));
        }
        Ok(spool)
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{n:016x}.jsonl"))
    }

    /// Segment numbers present, oldest first.
    pub fn segments(&self) -> Result<Vec<u64>, SpoolError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_at(&self.dir))? {
            let e = e.map_err(io_at(&self.dir))?;
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".jsonl")) else {
                continue;
            };
            if stem.len() == 16 {
                if let Ok(n) = u64::from_str_radix(stem, 16) {
                    out.push(n);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// A new record id, unique for this host.
    pub fn next_id(&mut self) -> String {
        self.counter += 1;
        format!("{}-{}", self.instance, self.counter)
    }

    /// Appends `records` durably (one `fdatasync`) and returns when they are
    /// on disk.
    pub fn append(&mut self, records: &[SpoolRecord]) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let full = matches!(&self.current, Some((_, _, len)) if *len >= SEGMENT_BYTES);
        if self.current.is_none() || full {
            let next = self.segments()?.last().map_or(1, |n| n.saturating_add(1));
            let path = self.path(next);
            let f = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(io_at(&path))?;
            // Make the new name durable too.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_at(&self.dir))?;
            self.current = Some((next, f, 0));
        }
        let dir = self.dir.clone();
        let Some((n, f, len)) = self.current.as_mut() else {
            return Ok(());
        };
        let path = dir.join(format!("{n:016x}.jsonl"));
        f.write_all(&buf).map_err(io_at(&path))?;
        f.sync_data().map_err(io_at(&path))?;
        *len += buf.len() as u64;
        Ok(())
    }

    /// The oldest segment's records, if any segment exists. Appends go to a
    /// new segment from now on, so the one returned no longer grows.
    pub fn oldest(&mut self) -> Result<Option<Segment>, SpoolError> {
        let Some(&number) = self.segments()?.first() else {
            return Ok(None);
        };
        if matches!(&self.current, Some((n, _, _)) if *n == number) {
            self.current = None;
        }
        let path = self.path(number);
        let f = File::open(&path).map_err(io_at(&path))?;
        let mut records = Vec::new();
        let mut skipped = 0;
        for line in BufReader::new(f).split(b'\n') {
            let line = line.map_err(io_at(&path))?;
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice(&line) {
                Ok(r) => records.push(r),
                Err(_) => skipped += 1,
            }
        }
        Ok(Some(Segment {
            number,
            records,
            skipped,
        }))
    }

    /// Deletes segment `number` once the appliance stored all of it.
    pub fn ack(&mut self, number: u64) -> Result<(), SpoolError> {
        if matches!(&self.current, Some((n, _, _)) if *n == number) {
            self.current = None;
        }
        let path = self.path(number);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_at(&path)(e)),
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(&self.dir))
    }

    /// Records waiting for delivery (reads every segment).
    pub fn backlog(&self) -> Result<usize, SpoolError> {
        let mut n = 0;
        for s in self.segments()? {
            let path = self.path(s);
            let f = File::open(&path).map_err(io_at(&path))?;
            for line in BufReader::new(f).split(b'\n') {
                if !line.map_err(io_at(&path))?.is_empty() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// Length of `f` up to and including its last newline.
fn complete_len(f: &mut File) -> io::Result<u64> {
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    let mut keep = 0u64;
    let mut pos = 0u64;
    for chunk in BufReader::new(&mut *f).split(b'\n') {
        let chunk = chunk?;
        pos += chunk.len() as u64;
        if pos < len {
            // A newline followed this chunk.
            pos += 1;
            keep = pos;
        }
    }
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(s: &mut Spool, what: &str) -> SpoolRecord {
        SpoolRecord {
            id: s.next_id(),
            at_ms: 1,
            what: what.into(),
            detail: serde_json::json!({ "path": "/usr/bin/true" }),
        }
    }

    #[test]
    fn append_deliver_ack_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path()).unwrap();
        assert_eq!(s.oldest().unwrap(), None);
        let a = rec(&mut s, "exec.offline");
        let b = rec(&mut s, "exec.offline");
        assert_ne!(a.id, b.id);
        s.append(std::slice::from_ref(&a)).unwrap();
        s.append(std::slice::from_ref(&b)).unwrap();
        assert_eq!(s.backlog().unwrap(), 2);
        let seg = s.oldest().unwrap().unwrap();
        assert_eq!(seg.records, vec![a, b]);
        // Appends after a delivery read go to a new segment.
        let c = rec(&mut s, "exec.offline");
        s.append(std::slice::from_ref(&c)).unwrap();
        s.ack(seg.number).unwrap();
        let seg2 = s.oldest().unwrap().unwrap();
        assert_eq!(seg2.records, vec![c]);
        s.ack(seg2.number).unwrap();
        assert_eq!(s.oldest().unwrap(), None);
        assert_eq!(s.backlog().unwrap(), 0);
    }

    #[test]
    fn survives_a_restart_and_cuts_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path()).unwrap();
        let a = rec(&mut s, "x");
        s.append(std::slice::from_ref(&a)).unwrap();
        let n = s.segments().unwrap()[0];
        drop(s);
        // A crash mid-append: half a line at the end.
        let path = dir.path().join(format!("{n:016x}.jsonl"));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"torn").unwrap();
        drop(f);
        let mut s = Spool::open(dir.path()).unwrap();
        let b = rec(&mut s, "y");
        assert_ne!(a.id, b.id, "a new instance id after restart");
        s.append(std::slice::from_ref(&b)).unwrap();
        let seg = s.oldest().unwrap().unwrap();
        assert_eq!(seg.records, vec![a, b]);
        assert_eq!(seg.skipped, 0);
    }

    #[test]
    fn corrupt_lines_are_counted_not_delivered_nor_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path()).unwrap();
        let a = rec(&mut s, "x");
        s.append(std::slice::from_ref(&a)).unwrap();
        let n = s.segments().unwrap()[0];
        let path = dir.path().join(format!("{n:016x}.jsonl"));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n").unwrap();
        drop(f);
        let seg = s.oldest().unwrap().unwrap();
        assert_eq!((seg.records.len(), seg.skipped), (1, 1));
        assert!(fs::read_to_string(&path).unwrap().contains("not json"));
    }

    #[test]
    fn segments_roll_over_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path()).unwrap();
        let big = "x".repeat(64 * 1024);
        for _ in 0..20 {
            let mut r = rec(&mut s, "big");
            r.detail = serde_json::json!({ "pad": big });
            s.append(&[r]).unwrap();
        }
        assert!(s.segments().unwrap().len() >= 2);
        assert_eq!(s.backlog().unwrap(), 20);
        let mut seen = 0;
        while let Some(seg) = s.oldest().unwrap() {
            seen += seg.records.len();
            s.ack(seg.number).unwrap();
        }
        assert_eq!(seen, 20);
    }
}
