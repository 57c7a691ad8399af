//! The audit chain's records and their verification, as the appliance
//! writes them and `trustbind audit verify-export` reads them.
//!
//! Each row carries `prev_hash` (the `hash` of the row before it, or
//! [`GENESIS`]) and `hash = SHA-256(prev_hash || encode(row))`, where
//! `encode` length-prefixes every field so no two rows encode alike.
//! Retention prunes the oldest rows under a signed [`Checkpoint`] after
//! writing them to export files ([`ExportLine`]); [`verify_export`] checks
//! such files, [`verify_checkpoint`] a checkpoint's signature.

use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cert::{peer_cert, CertKind};

/// `prev_hash` of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An event to append: its detail already serialised, as it will be
/// stored and hashed (it must never carry key material).
///
/// The detail is written to text once, when the event is made: from a
/// `serde_json::Value` ([`AuditEvent::new`], for the rare events) or
/// straight from a borrowed `Serialize` struct ([`AuditEvent::serialized`],
/// for decisions: no `Value` tree to build, serialise and drop). Both give
/// the same bytes for the same fields in the same order (objects keep
/// their insertion order: `serde_json`'s `preserve_order`, which
/// `cedar-policy-core` turns on), as rows written before always had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Category, e.g. `decision`, `enrol`, `policy.activate`.
    pub kind: String,
    /// Who caused it: a host name, `admin:<cn>` or `appliance`.
    pub actor: String,
    /// Event-specific fields: the text of a JSON object, as stored.
    pub detail: String,
}

impl AuditEvent {
    /// An event of `kind` caused by `actor`, `detail` serialised.
    pub fn new(kind: &str, actor: &str, detail: serde_json::Value) -> Self {
        AuditEvent {
            kind: kind.to_owned(),
            actor: actor.to_owned(),
            // `Value`'s `Display` is its compact serialisation (what
            // `serde_json::to_string` gives), and cannot fail.
            detail: detail.to_string(),
        }
    }

    /// An event of `kind` caused by `actor`, its detail `detail`
    /// serialised straight to text (fields in declaration order).
    ///
    /// Serialising to text fails only for a map whose keys are not
    /// strings or a `Serialize` impl that fails; no audit detail has
    /// either. Should one ever, the row records the error rather than
    /// losing the event (and debug builds panic).
    pub fn serialized<T: Serialize + ?Sized>(kind: &str, actor: &str, detail: &T) -> Self {
        let mut text = Vec::with_capacity(DETAIL_CAPACITY);
        let detail = match serde_json::to_writer(&mut text, detail) {
            Ok(()) => String::from_utf8(text)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            Err(e) => {
                debug_assert!(false, "audit detail not serialisable: {e}");
                serde_json::json!({ "unserialisable": e.to_string() }).to_string()
            }
        };
        AuditEvent {
            kind: kind.to_owned(),
            actor: actor.to_owned(),
            detail,
        }
    }
}

/// Bytes reserved for a detail serialised by [`AuditEvent::serialized`]:
/// a decision's is ≈ 0.5–1.5 KiB, so most need no reallocation.
const DETAIL_CAPACITY: usize = 1024;

/// A stored audit row, as exported (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Category.
    pub kind: String,
    /// Who caused it.
    pub actor: String,
    /// Event-specific fields, as stored (canonical JSON text).
    pub detail: String,
    /// Hash of the previous row.
    pub prev_hash: String,
    /// Hash of this row.
    pub hash: String,
}

impl AuditRow {
    /// The hash the row's content and `prev_hash` give (what `hash` must be).
    pub fn computed_hash(&self) -> String {
        row_hash(
            &self.prev_hash,
            self.seq,
            self.at_ms,
            &self.kind,
            &self.actor,
            &self.detail,
        )
    }
}

/// Hash of one row given its predecessor's hash.
pub fn row_hash(
    prev_hash: &str,
    seq: i64,
    at_ms: i64,
    kind: &str,
    actor: &str,
    detail: &str,
) -> String {
    let mut h = Sha256::new();
    for field in [
        prev_hash.as_bytes(),
        &seq.to_le_bytes(),
        &at_ms.to_le_bytes(),
        kind.as_bytes(),
        actor.as_bytes(),
        detail.as_bytes(),
    ] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field);
    }
    // Lower-case hex, as `hex::encode` writes it, without its iterator of
    // `char`s (the writer hashes every row it stores).
    let digest = h.finalize();
    let mut text = [0_u8; 64];
    if hex::encode_to_slice(digest, &mut text).is_err() {
        return hex::encode(digest); // not reached: 32 bytes make 64 digits
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Domain separation of a checkpoint signature (unmistakable for a TLS 1.3
/// transcript, which starts with 64 spaces, and for the offline bundle's
/// protobuf payload).
pub const CHECKPOINT_CONTEXT: &[u8] = b"trustbind audit checkpoint v1\0";

/// A signed record of a pruned prefix of the audit chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Row id (0 before it is stored).
    pub id: i64,
    /// First audit row pruned by this checkpoint.
    pub from_seq: i64,
    /// The `prev_hash` of that row (the previous checkpoint's `upto_hash`,
    /// or the genesis).
    pub from_prev_hash: String,
    /// Last audit row pruned.
    pub upto_seq: i64,
    /// Its hash: the next row kept chains from this.
    pub upto_hash: String,
    /// Rows pruned by this checkpoint.
    pub rows: i64,
    /// Rows pruned by every checkpoint so far, this one included.
    pub total_rows: i64,
    /// Time of the first pruned row (ms since the epoch).
    pub first_at_ms: i64,
    /// Time of the last pruned row.
    pub last_at_ms: i64,
    /// When the checkpoint was made.
    pub made_ms: i64,
    /// The export file (name in the export directory) that holds the rows.
    pub export_file: String,
    /// ECDSA P-256 signature over [`Checkpoint::message`], ASN.1 DER, hex
    /// (empty: unsigned).
    pub signature: String,
    /// The certificate (PEM) of the key that signed it: the appliance's
    /// server certificate at the time, issued by its CA.
    pub signer_pem: String,
}

impl Checkpoint {
    /// The signed bytes: [`CHECKPOINT_CONTEXT`], then every field but the
    /// id, the signature and the certificate, length-prefixed as audit
    /// rows are hashed.
    pub fn message(&self) -> Vec<u8> {
        let mut out = CHECKPOINT_CONTEXT.to_vec();
        let nums = [
            self.from_seq,
            self.upto_seq,
            self.rows,
            self.total_rows,
            self.first_at_ms,
            self.last_at_ms,
            self.made_ms,
        ];
        let mut fields: Vec<Vec<u8>> = nums.iter().map(|n| n.to_le_bytes().to_vec()).collect();
        fields.push(self.from_prev_hash.as_bytes().to_vec());
        fields.push(self.upto_hash.as_bytes().to_vec());
        fields.push(self.export_file.as_bytes().to_vec());
        for f in fields {
            out.extend_from_slice(&(f.len() as u64).to_le_bytes());
            out.extend_from_slice(&f);
        }
        out
    }
}

impl Checkpoint {
    /// Whether this checkpoint continues `before` (the checkpoint stored
    /// before it; `None`: it is the first, which starts at row 1 from the
    /// genesis): it starts at the row after `before`'s last and from its
    /// hash, covers `rows` consecutive rows, and its `total_rows` adds
    /// them to `before`'s.
    pub fn continues(&self, before: Option<&Checkpoint>) -> bool {
        let (from, prev_hash, total) = before.map_or((1, GENESIS, 0), |b| {
            (
                b.upto_seq.saturating_add(1),
                b.upto_hash.as_str(),
                b.total_rows,
            )
        });
        self.from_seq == from
            && self.from_prev_hash == prev_hash
            && self.upto_seq >= self.from_seq
            && self.rows
                == self
                    .upto_seq
                    .saturating_sub(self.from_seq)
                    .saturating_add(1)
            && self.total_rows == total.saturating_add(self.rows)
    }

    /// The one checkpoint that says what the consecutive checkpoints
    /// `run` (oldest first, each continuing the one before) say together:
    /// rows `from_seq` of the first to `upto_seq` of the last, chaining
    /// from the first's `from_prev_hash` to the last's `upto_hash`, the
    /// rows summed, the last's `total_rows`, the times spanning them, and
    /// as export file the first's and the last's (`first..last`, one name
    /// if they are the same). It takes the last one's id, so the stored
    /// checkpoints stay in order, and is unsigned (`made_ms` is when it
    /// is made). `None` if `run` is empty or does not continue itself.
    pub fn consolidate(run: &[Checkpoint], made_ms: i64) -> Option<Checkpoint> {
        let (first, last) = (run.first()?, run.last()?);
        for pair in run.windows(2) {
            if let [a, b] = pair {
                if !b.continues(Some(a)) {
                    return None;
                }
            }
        }
        let start = first.export_file.split("..").next().unwrap_or_default();
        let end = last.export_file.rsplit("..").next().unwrap_or_default();
        Some(Checkpoint {
            id: last.id,
            from_seq: first.from_seq,
            from_prev_hash: first.from_prev_hash.clone(),
            upto_seq: last.upto_seq,
            upto_hash: last.upto_hash.clone(),
            rows: run.iter().fold(0_i64, |n, c| n.saturating_add(c.rows)),
            total_rows: last.total_rows,
            first_at_ms: run.iter().map(|c| c.first_at_ms).min().unwrap_or(0),
            last_at_ms: run.iter().map(|c| c.last_at_ms).max().unwrap_or(0),
            made_ms,
            export_file: if start == end {
                start.to_owned()
            } else {
                format!("{start}..{end}")
            },
            signature: String::new(),
            signer_pem: String::new(),
        })
    }
}

/// A line of an audit export file: an audit row (as `audit export` writes
/// them) or the checkpoint that pruned the rows before it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExportLine {
    /// The checkpoint of the rows above it.
    Checkpoint {
        /// The checkpoint.
        checkpoint: Checkpoint,
    },
    /// One row.
    Row(AuditRow),
}

/// Checks `cp`'s signature: the signer certificate chains to the CA `ca`
/// (was valid when the checkpoint was made), is the appliance's server
/// certificate, and its key signed [`Checkpoint::message`].
pub fn verify_checkpoint(cp: &Checkpoint, ca: &CertificateDer<'_>) -> Result<(), String> {
    if cp.signature.is_empty() {
        return Err(format!("checkpoint {} is not signed", cp.id));
    }
    let signer = CertificateDer::from_pem_slice(cp.signer_pem.as_bytes())
        .map_err(|e| format!("signer certificate unreadable ({e})"))?;
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| format!("CA unusable ({e})"))?;
    let ee = webpki::EndEntityCert::try_from(&signer)
        .map_err(|e| format!("signer certificate unreadable ({e})"))?;
    let secs = u64::try_from(cp.made_ms / 1000).unwrap_or(0);
    ee.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &[anchor],
        &[],
        UnixTime::since_unix_epoch(Duration::from_secs(secs)),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| format!("signer certificate not issued by the CA for a server ({e})"))?;
    if peer_cert(signer.as_ref()).map(|p| p.kind) != Some(CertKind::Server) {
        return Err("signer certificate is not the appliance's server certificate".into());
    }
    let sig = hex::decode(&cp.signature).map_err(|_| "signature is not hex".to_owned())?;
    ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, &cp.message(), &sig)
        .map_err(|e| format!("checkpoint {} signature does not verify ({e})", cp.id))
}

/// What [`verify_export`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportReport {
    /// Audit rows read and chained.
    pub rows: u64,
    /// First and last sequence numbers.
    pub first_seq: i64,
    /// Last row.
    pub last_seq: i64,
    /// Checkpoints found and checked (signature and rows).
    pub checkpoints: u64,
    /// Rows the last checkpoint found covers up to.
    pub checkpointed_upto: i64,
}

/// The lines of export files, in the order given, for [`verify_export`]
/// (`trustbind audit verify-export` and the appliance's own command); the
/// file that could not be read, with the error.
pub fn read_export_files(
    files: &[std::path::PathBuf],
) -> Result<Vec<String>, (std::path::PathBuf, std::io::Error)> {
    use std::io::BufRead as _;
    let mut lines = Vec::new();
    for f in files {
        let file = std::fs::File::open(f).map_err(|e| (f.clone(), e))?;
        for l in std::io::BufReader::new(file).lines() {
            lines.push(l.map_err(|e| (f.clone(), e))?);
        }
    }
    Ok(lines)
}

/// Verifies audit export lines (files concatenated in order): the rows
/// chain (each row's hash recomputed, each links to the one before, the
/// first to the genesis or to whatever it names), every checkpoint line's
/// signature against `ca` (if given), and that each checkpoint names the
/// rows before it (its `upto_hash` is the hash of row `upto_seq`, its
/// `from_prev_hash` what row `from_seq` chained from). Rows written twice
/// (a crash between export and prune) must be identical and are read once.
pub fn verify_export(
    lines: impl IntoIterator<Item = String>,
    ca: Option<&CertificateDer<'_>>,
) -> Result<ExportReport, String> {
    let mut rep = ExportReport::default();
    let mut prev: Option<(i64, String)> = None;
    let mut seen = std::collections::HashMap::<i64, (String, String)>::new();
    for (i, line) in lines.into_iter().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(&line)
            .map_err(|e| format!("line {n}: not an export line ({e})"))?;
        match parsed {
            ExportLine::Row(r) => {
                if let Some((pseq, phash)) = &prev {
                    if r.seq <= *pseq {
                        // Written again after a crash: must be the same row.
                        match seen.get(&r.seq) {
                            Some((h, _)) if *h == r.hash => continue,
                            _ => return Err(format!("line {n}: row {} out of order", r.seq)),
                        }
                    }
                    if r.seq != pseq + 1 {
                        return Err(format!(
                            "line {n}: row {} follows row {pseq} (rows missing)",
                            r.seq
                        ));
                    }
                    if r.prev_hash != *phash {
                        return Err(format!(
                            "line {n}: row {} does not chain from row {pseq}",
                            r.seq
                        ));
                    }
                } else {
                    rep.first_seq = r.seq;
                    if r.seq == 1 && r.prev_hash != GENESIS {
                        return Err(format!("line {n}: row 1 does not start from the genesis"));
                    }
                }
                if r.computed_hash() != r.hash {
                    return Err(format!("line {n}: row {} changed (hash mismatch)", r.seq));
                }
                seen.insert(r.seq, (r.hash.clone(), r.prev_hash.clone()));
                rep.rows += 1;
                rep.last_seq = r.seq;
                prev = Some((r.seq, r.hash));
            }
            ExportLine::Checkpoint { checkpoint: cp } => {
                if let Some(ca) = ca {
                    verify_checkpoint(&cp, ca).map_err(|e| format!("line {n}: {e}"))?;
                }
                let upto = seen.get(&cp.upto_seq);
                if upto.map(|u| &u.0) != Some(&cp.upto_hash) {
                    return Err(format!(
                        "line {n}: checkpoint {} names row {} with a hash the file does not have",
                        cp.id, cp.upto_seq
                    ));
                }
                if let Some(from) = seen.get(&cp.from_seq) {
                    if from.1 != cp.from_prev_hash {
                        return Err(format!(
                            "line {n}: checkpoint {} does not match row {}",
                            cp.id, cp.from_seq
                        ));
                    }
                }
                rep.checkpoints += 1;
                rep.checkpointed_upto = cp.upto_seq;
                // Rows before a checkpoint are done with.
                seen.retain(|seq, _| *seq > cp.upto_seq);
            }
        }
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(id: i64, from_seq: i64, upto_seq: i64, before: Option<&Checkpoint>) -> Checkpoint {
        let rows = upto_seq - from_seq + 1;
        Checkpoint {
            id,
            from_seq,
            from_prev_hash: before.map_or(GENESIS.to_owned(), |b| b.upto_hash.clone()),
            upto_seq,
            upto_hash: format!("{upto_seq:064x}"),
            rows,
            total_rows: before.map_or(0, |b| b.total_rows) + rows,
            first_at_ms: from_seq * 10,
            last_at_ms: upto_seq * 10,
            made_ms: upto_seq * 10 + 1,
            export_file: format!("audit-{:08}.jsonl", (id + 1) / 2),
            signature: "00".into(),
            signer_pem: "pem".into(),
        }
    }

    fn run(n: i64) -> Vec<Checkpoint> {
        let mut out: Vec<Checkpoint> = Vec::new();
        for i in 1..=n {
            let c = cp(i, (i - 1) * 100 + 1, i * 100, out.last());
            out.push(c);
        }
        out
    }

    #[test]
    fn a_consolidated_checkpoint_says_what_its_run_said_together() {
        let cps = run(5);
        let mut before = None;
        for c in &cps {
            assert!(c.continues(before), "{c:?}");
            before = Some(c);
        }
        let m = Checkpoint::consolidate(&cps[..3], 99).unwrap();
        assert_eq!((m.id, m.from_seq, m.upto_seq), (3, 1, 300));
        assert_eq!((m.rows, m.total_rows), (300, 300));
        assert_eq!(
            (m.from_prev_hash.as_str(), m.upto_hash.as_str()),
            (GENESIS, cps[2].upto_hash.as_str())
        );
        assert_eq!((m.first_at_ms, m.last_at_ms, m.made_ms), (10, 3000, 99));
        assert_eq!(m.export_file, "audit-00000001.jsonl..audit-00000002.jsonl");
        assert!(m.signature.is_empty() && m.signer_pem.is_empty());
        // It continues the genesis, and what came after the run continues it.
        assert!(m.continues(None));
        assert!(cps[3].continues(Some(&m)));
        // Consolidated again with the next ones: the file range widens.
        let mut again = vec![m];
        again.extend_from_slice(&cps[3..]);
        let m2 = Checkpoint::consolidate(&again, 100).unwrap();
        assert_eq!(
            (m2.from_seq, m2.upto_seq, m2.rows, m2.total_rows),
            (1, 500, 500, 500)
        );
        assert_eq!(m2.export_file, "audit-00000001.jsonl..audit-00000003.jsonl");
        let one = Checkpoint::consolidate(&cps[..2], 1).unwrap();
        assert_eq!(one.export_file, "audit-00000001.jsonl");
    }

    #[test]
    fn a_run_that_does_not_continue_itself_is_not_consolidated() {
        assert!(Checkpoint::consolidate(&[], 1).is_none());
        let mut cps = run(4);
        cps[2].upto_hash = "f".repeat(64);
        assert!(!cps[3].continues(Some(&cps[2])));
        assert!(Checkpoint::consolidate(&cps, 1).is_none());
        let mut cps = run(4);
        cps[1].total_rows += 1;
        assert!(!cps[1].continues(Some(&cps[0])));
        assert!(Checkpoint::consolidate(&cps, 1).is_none());
        let mut cps = run(4);
        cps.remove(1);
        assert!(Checkpoint::consolidate(&cps, 1).is_none());
    }
}
