//! Forward-secure seals of the audit chain (threat model T-83), shared by
//! the appliance (which seals) and the CLI (which verifies).
//!
//! At setup the appliance draws a random 32-byte key `k0`, hands it to the
//! administrator once as the [`VerifyKey`] (kept offline, never on the
//! appliance) and keeps only the evolved keys. Every seal of epoch `i`
//! appends an [`SEAL_KIND`] row whose [`SealDetail::tag`] is
//! `HMAC-SHA256(k_i, context ‖ i ‖ seq ‖ hash ‖ sealed_ms)` over the chain's
//! head at the seal (`seq`, `hash`), and then replaces `k_i` by
//! `k_{i+1} = HKDF-SHA256(k_i, "evolve")` ([`evolve`]). Whoever takes the
//! appliance while it holds `k_n` cannot make a seal of an epoch before
//! `n`; the hash chain carries each seal over every row before it, so no
//! row up to the last seal made before the compromise can be rewritten
//! without [`SealVerifier`] failing (epochs must follow one another
//! without a gap). Rows after the last seal are not authenticated.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::audit::{AuditRow, ExportLine, GENESIS};

/// Kind of a seal row.
pub const SEAL_KIND: &str = "audit.seal";
/// Kind of the row that records the setup of sealing (before seal 0).
pub const SETUP_KIND: &str = "audit.seal_setup";
/// `format` of a [`VerifyKey`] file.
pub const VERIFY_KEY_FORMAT: &str = "trustbind-audit-seal-key-v1";
/// Domain separation of a seal's tag.
const TAG_CONTEXT: &[u8] = b"trustbind audit seal v1\0";
/// Salt and info of the key evolution (HKDF-SHA256).
const EVOLVE_SALT: &[u8] = b"trustbind audit seal key v1";
const EVOLVE_INFO: &[u8] = b"evolve";
/// Info of the key id (HMAC of `k0`; names a key, reveals nothing of it).
const KEY_ID_INFO: &[u8] = b"trustbind audit seal key id v1";
/// Most evolution steps a verifier takes to reach a seal's epoch (about
/// 285 years of 15-minute epochs): a forged epoch number cannot make it
/// loop for ever.
pub const MAX_EPOCH: u64 = 10_000_000;

type HmacSha256 = Hmac<Sha256>;

/// A sealing key. Wiped when dropped.
pub type Key = Zeroizing<[u8; 32]>;

/// `k_{i+1}` from `k_i`: HKDF-SHA256 (extract with a fixed salt, expand
/// with info `evolve`). One-way: `k_i` cannot be found from `k_{i+1}`.
pub fn evolve(k: &[u8; 32]) -> Key {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(EVOLVE_SALT), k);
    let mut out = Zeroizing::new([0_u8; 32]);
    // 32 bytes is far under HKDF's limit (255 × 32): cannot fail.
    if hk.expand(EVOLVE_INFO, out.as_mut()).is_err() {
        out.zeroize();
    }
    out
}

/// `k_epoch` from `k0` (`epoch` evolutions).
pub fn key_at(k0: &[u8; 32], epoch: u64) -> Key {
    let mut k = Zeroizing::new(*k0);
    for _ in 0..epoch {
        k = evolve(&k);
    }
    k
}

/// HMAC takes a key of any length: `None` never happens. Were it to, the
/// tag is empty and never verifies: the safe way to be wrong.
fn mac(k: &[u8; 32]) -> Option<HmacSha256> {
    <HmacSha256 as Mac>::new_from_slice(k).ok()
}

fn tag_mac(k: &[u8; 32], epoch: u64, seq: i64, hash: &str, sealed_ms: i64) -> Option<HmacSha256> {
    let mut m = mac(k)?;
    m.update(TAG_CONTEXT);
    for field in [
        &epoch.to_le_bytes()[..],
        &seq.to_le_bytes()[..],
        hash.as_bytes(),
        &sealed_ms.to_le_bytes()[..],
    ] {
        m.update(&(field.len() as u64).to_le_bytes());
        m.update(field);
    }
    Some(m)
}

/// The tag of the seal of `epoch` over the chain's head `seq` (hash
/// `hash`, hex as stored) at `sealed_ms`, with that epoch's key; hex.
pub fn seal_tag(k: &[u8; 32], epoch: u64, seq: i64, hash: &str, sealed_ms: i64) -> String {
    tag_mac(k, epoch, seq, hash, sealed_ms)
        .map(|m| hex::encode(m.finalize().into_bytes()))
        .unwrap_or_default()
}

/// Whether `tag` (hex) is the tag of that seal (compared in constant time).
pub fn seal_tag_ok(
    k: &[u8; 32],
    epoch: u64,
    seq: i64,
    hash: &str,
    sealed_ms: i64,
    tag: &str,
) -> bool {
    let Ok(bytes) = hex::decode(tag) else {
        return false;
    };
    tag_mac(k, epoch, seq, hash, sealed_ms).is_some_and(|m| m.verify_slice(&bytes).is_ok())
}

/// The id of a sealing setup: 16 hex digits of an HMAC of `k0`.
pub fn key_id(k0: &[u8; 32]) -> String {
    let Some(mut m) = mac(k0) else {
        return String::new();
    };
    m.update(KEY_ID_INFO);
    let full = m.finalize().into_bytes();
    hex::encode(full.get(..8).unwrap_or_default())
}

/// The `detail` of a seal row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealDetail {
    /// The epoch, from 0 (the seal made at setup); each seal is the next.
    pub epoch: u64,
    /// The chain's head when sealed: its last row...
    pub seq: i64,
    /// ...and that row's hash.
    pub hash: String,
    /// When it was sealed (ms since the Unix epoch).
    pub sealed_ms: i64,
    /// [`seal_tag`] with the epoch's key, hex.
    pub tag: String,
    /// Why: `setup`, `interval`, `start`, `shutdown`, `admin`, `recovered`.
    pub reason: String,
}

/// The `detail` of the setup row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupDetail {
    /// [`key_id`] of the new `k0`.
    pub key_id: String,
    /// When sealing began (ms since the Unix epoch).
    pub start_ms: i64,
    /// The sealing interval (ms).
    pub interval_ms: i64,
}

/// What the administrator keeps offline: `k0` and the parameters. Wiped
/// when dropped; its `Debug` shows no key.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyKey {
    /// [`VERIFY_KEY_FORMAT`].
    pub format: String,
    /// `k0`, hex.
    pub key: String,
    /// [`key_id`] of `k0`.
    pub key_id: String,
    /// When sealing began.
    pub start_ms: i64,
    /// The sealing interval (ms): the appliance seals at least this often.
    pub interval_ms: i64,
}

impl Drop for VerifyKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("key_id", &self.key_id)
            .field("start_ms", &self.start_ms)
            .field("interval_ms", &self.interval_ms)
            .finish_non_exhaustive()
    }
}

impl VerifyKey {
    /// The key of `k0` made at `start_ms`.
    pub fn new(k0: &[u8; 32], start_ms: i64, interval_ms: i64) -> VerifyKey {
        VerifyKey {
            format: VERIFY_KEY_FORMAT.to_owned(),
            key: hex::encode(k0),
            key_id: key_id(k0),
            start_ms,
            interval_ms,
        }
    }

    /// Reads a verification key file's text (JSON); checks it.
    pub fn parse(text: &str) -> Result<VerifyKey, String> {
        let vk: VerifyKey =
            serde_json::from_str(text).map_err(|e| format!("not a seal verification key ({e})"))?;
        if vk.format != VERIFY_KEY_FORMAT {
            return Err(format!(
                "format {:?}, expected {VERIFY_KEY_FORMAT:?}",
                vk.format
            ));
        }
        let k0 = vk.k0()?;
        if key_id(&k0) != vk.key_id {
            return Err("key_id does not match the key (the file was changed)".into());
        }
        Ok(vk)
    }

    /// Reads a verification key file (the text wiped after parsing); the
    /// error names the file.
    pub fn read(path: &std::path::Path) -> Result<VerifyKey, String> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        VerifyKey::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// `k0`.
    pub fn k0(&self) -> Result<Key, String> {
        let mut k = Zeroizing::new([0_u8; 32]);
        hex::decode_to_slice(&self.key, k.as_mut())
            .map_err(|_| "key is not 64 hex digits".to_owned())?;
        Ok(k)
    }
}

/// Why the seals do not verify; names the row and epoch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The rows themselves do not chain.
    #[error("row {seq}: {why}")]
    Chain {
        /// The row.
        seq: i64,
        /// What is wrong.
        why: String,
    },
    /// A seal row is wrong.
    #[error("seal of epoch {epoch} (row {seq}): {why}")]
    BadSeal {
        /// The seal row.
        seq: i64,
        /// Its epoch (as it claims).
        epoch: u64,
        /// What is wrong.
        why: String,
    },
    /// A setup row of another key.
    #[error("row {seq}: sealing was set up again with key id {found} (this key: {expected}): rows from here on are not sealed with this key")]
    OtherKey {
        /// The setup row.
        seq: i64,
        /// Its key id.
        found: String,
        /// The verification key's.
        expected: String,
    },
    /// No seal at all.
    #[error(
        "no seal in rows {first_seq}..={last_seq}: nothing there is authenticated by the seal key"
    )]
    NoSeal {
        /// First row read.
        first_seq: i64,
        /// Last row read.
        last_seq: i64,
    },
}

/// What [`SealVerifier`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SealReport {
    /// Rows read.
    pub rows: u64,
    /// First and last row read.
    pub first_seq: i64,
    /// Last row read.
    pub last_seq: i64,
    /// Seals checked.
    pub seals: u64,
    /// Epoch of the first seal read.
    pub first_epoch: u64,
    /// Epoch of the last seal.
    pub last_epoch: u64,
    /// Rows up to this one are authentic (the last seal's head).
    pub sealed_upto_seq: i64,
    /// When the last seal was made.
    pub sealed_ms: i64,
    /// Rows after `sealed_upto_seq` (not authenticated).
    pub unsealed_rows: u64,
}

impl SealReport {
    /// How old the last seal is at `now_ms` if that is more than two
    /// intervals and a minute (the appliance seals every interval, at its
    /// start and at shutdown): the log was cut after it, or the appliance
    /// stopped sealing.
    pub fn stale(&self, now_ms: i64, interval_ms: i64) -> Option<i64> {
        let age = now_ms.saturating_sub(self.sealed_ms);
        (age > interval_ms.saturating_mul(2).saturating_add(60_000)).then_some(age)
    }

    /// The one-line summary.
    pub fn summary(&self) -> String {
        let unsealed = if self.unsealed_rows == 0 {
            "no row after it".to_owned()
        } else {
            format!(
                "rows {}..={} ({} rows) are NOT sealed",
                self.sealed_upto_seq.saturating_add(1),
                self.last_seq,
                self.unsealed_rows
            )
        };
        format!(
            "seals verified: {} (epochs {}..={}); rows up to seq {}, sealed at {} ms, are authentic; {unsealed}",
            self.seals, self.first_epoch, self.last_epoch, self.sealed_upto_seq, self.sealed_ms
        )
    }
}

/// Checks the seals of audit rows given oldest first (from row 1 or from
/// any row, e.g. the first one kept after pruning): the rows chain, every
/// seal's tag verifies with its epoch's key derived from `k0`, the first
/// seal after row 1 is epoch 0 and each seal is the epoch after the one
/// before (a missing epoch is a removed seal), and each seal names a row
/// read since the previous seal with that row's hash.
pub struct SealVerifier {
    key_id: String,
    key: Key,
    key_epoch: u64,
    prev: Option<(i64, String)>,
    from_genesis: bool,
    next_epoch: Option<u64>,
    max_first_epoch: Option<u64>,
    /// Rows since the last seal's head (a seal names one of them).
    since_seal: Vec<(i64, String)>,
    report: SealReport,
}

impl std::fmt::Debug for SealVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealVerifier")
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl SealVerifier {
    /// A verifier for `vk`.
    pub fn new(vk: &VerifyKey) -> Result<SealVerifier, String> {
        let k0 = vk.k0()?;
        Ok(SealVerifier {
            key: k0,
            key_id: vk.key_id.clone(),
            key_epoch: 0,
            prev: None,
            from_genesis: false,
            next_epoch: None,
            max_first_epoch: None,
            since_seal: Vec::new(),
            report: SealReport::default(),
        })
    }

    /// For rows that continue export files whose last seal was of epoch
    /// `e - 1`: the first seal read must be of epoch `e` or earlier (a
    /// later one means the seals in between, and the rows they sealed,
    /// were removed).
    pub fn max_first_epoch(mut self, e: u64) -> SealVerifier {
        self.max_first_epoch = Some(e);
        self
    }

    /// Reads the next row.
    pub fn feed(&mut self, row: &AuditRow) -> Result<(), SealError> {
        let chain = |why: String| SealError::Chain { seq: row.seq, why };
        match &self.prev {
            Some((pseq, phash)) => {
                if row.seq != pseq.saturating_add(1) {
                    return Err(chain(format!("follows row {pseq} (rows missing)")));
                }
                if row.prev_hash != *phash {
                    return Err(chain(format!("does not chain from row {pseq}")));
                }
            }
            None => {
                self.report.first_seq = row.seq;
                self.from_genesis = row.seq == 1;
                if self.from_genesis && row.prev_hash != GENESIS {
                    return Err(chain("row 1 does not start from the genesis".into()));
                }
            }
        }
        if row.computed_hash() != row.hash {
            return Err(chain("changed (hash mismatch)".into()));
        }
        if row.kind == SETUP_KIND {
            let d: SetupDetail = serde_json::from_str(&row.detail)
                .map_err(|e| chain(format!("setup row unreadable ({e})")))?;
            if d.key_id != self.key_id {
                return Err(SealError::OtherKey {
                    seq: row.seq,
                    found: d.key_id,
                    expected: self.key_id.clone(),
                });
            }
        }
        if row.kind == SEAL_KIND {
            self.seal(row)?;
        }
        self.since_seal.push((row.seq, row.hash.clone()));
        self.prev = Some((row.seq, row.hash.clone()));
        self.report.rows = self.report.rows.saturating_add(1);
        self.report.last_seq = row.seq;
        Ok(())
    }

    fn seal(&mut self, row: &AuditRow) -> Result<(), SealError> {
        let d: SealDetail = serde_json::from_str(&row.detail).map_err(|e| SealError::Chain {
            seq: row.seq,
            why: format!("seal row unreadable ({e})"),
        })?;
        let bad = |why: String| SealError::BadSeal {
            seq: row.seq,
            epoch: d.epoch,
            why,
        };
        let expected = match self.next_epoch {
            Some(e) => Some(e),
            None if self.from_genesis => Some(0),
            None => None,
        };
        if let (None, Some(m)) = (expected, self.max_first_epoch) {
            if d.epoch > m {
                return Err(bad(format!(
                    "the first seal after the export files must be of epoch {m} at the latest: seals (and the rows they sealed) are missing in between"
                )));
            }
        }
        if let Some(e) = expected {
            if d.epoch != e {
                return Err(bad(format!(
                    "epoch {e} expected here (a seal is missing, or this one was made with a later key)"
                )));
            }
        }
        if d.epoch < self.key_epoch || d.epoch > MAX_EPOCH {
            return Err(bad("epoch out of range".into()));
        }
        // A seal a crash left uncommitted is appended by the next seal; if
        // retention pruned the row it names meanwhile, that row is before
        // the first one read: its tag is checked, it seals nothing read.
        let before_walk = self.next_epoch.is_none() && d.seq < self.report.first_seq;
        let named = self.since_seal.iter().find(|(s, _)| *s == d.seq);
        match named {
            _ if before_walk => {}
            Some((_, h)) if *h == d.hash => {}
            Some(_) => {
                return Err(bad(format!(
                    "names row {} with a hash that row does not have",
                    d.seq
                )))
            }
            None => {
                return Err(bad(format!(
                    "names row {}, not a row since the previous seal",
                    d.seq
                )))
            }
        }
        while self.key_epoch < d.epoch {
            self.key = evolve(&self.key);
            self.key_epoch = self.key_epoch.saturating_add(1);
        }
        if !seal_tag_ok(&self.key, d.epoch, d.seq, &d.hash, d.sealed_ms, &d.tag) {
            return Err(bad(format!(
                "tag does not verify with this key's epoch {} (rows up to {} were changed, or sealed with another key)",
                d.epoch, d.seq
            )));
        }
        if self.report.seals == 0 {
            self.report.first_epoch = d.epoch;
        }
        self.report.seals = self.report.seals.saturating_add(1);
        self.report.last_epoch = d.epoch;
        self.next_epoch = Some(d.epoch.saturating_add(1));
        if !before_walk {
            self.report.sealed_upto_seq = d.seq;
            self.report.sealed_ms = d.sealed_ms;
            self.since_seal.retain(|(s, _)| *s > d.seq);
        }
        Ok(())
    }

    /// The result: at least one seal must have been read.
    pub fn finish(self) -> Result<SealReport, SealError> {
        let mut rep = self.report.clone();
        if rep.seals == 0 {
            return Err(SealError::NoSeal {
                first_seq: rep.first_seq,
                last_seq: rep.last_seq,
            });
        }
        rep.unsealed_rows =
            u64::try_from(rep.last_seq.saturating_sub(rep.sealed_upto_seq)).unwrap_or(0);
        Ok(rep)
    }
}

/// Checks the seals in audit export lines (files concatenated oldest
/// first, as [`crate::audit::verify_export`] reads them; run that too: it
/// checks the checkpoints). Rows written twice (a crash between export
/// and prune) are read once.
pub fn verify_export_seals(
    lines: impl IntoIterator<Item = String>,
    vk: &VerifyKey,
) -> Result<SealReport, String> {
    verify_seals_with(lines, SealVerifier::new(vk)?)
}

/// [`verify_export_seals`] with a verifier set up by the caller (e.g.
/// [`SealVerifier::max_first_epoch`]).
pub fn verify_seals_with(
    lines: impl IntoIterator<Item = String>,
    mut v: SealVerifier,
) -> Result<SealReport, String> {
    let mut last = None;
    for (i, line) in lines.into_iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(&line)
            .map_err(|e| format!("line {}: not an export line ({e})", i.saturating_add(1)))?;
        if let ExportLine::Row(r) = parsed {
            if last.is_some_and(|l| r.seq <= l) {
                continue;
            }
            last = Some(r.seq);
            v.feed(&r)
                .map_err(|e| format!("line {}: {e}", i.saturating_add(1)))?;
        }
    }
    v.finish().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evolution_is_deterministic_one_way_and_keys_differ() {
        let k0 = [7_u8; 32];
        let k1 = evolve(&k0);
        let k2 = evolve(&k1);
        assert_eq!(*key_at(&k0, 2), *k2);
        assert_eq!(*key_at(&k0, 0), k0);
        assert_ne!(*k1, k0);
        assert_ne!(*k2, *k1);
        // A tag of one epoch does not verify with another epoch's key.
        let t = seal_tag(&k1, 1, 5, "ab", 10);
        assert!(seal_tag_ok(&k1, 1, 5, "ab", 10, &t));
        assert!(!seal_tag_ok(&k2, 1, 5, "ab", 10, &t));
        assert!(!seal_tag_ok(&k1, 1, 5, "ac", 10, &t));
        assert!(!seal_tag_ok(&k1, 1, 6, "ab", 10, &t));
        assert!(!seal_tag_ok(&k1, 2, 5, "ab", 10, &t));
        assert!(!seal_tag_ok(&k1, 1, 5, "ab", 11, &t));
    }

    #[test]
    fn a_verify_key_round_trips_and_an_edited_one_is_refused() {
        let vk = VerifyKey::new(&[1_u8; 32], 1000, 900_000);
        let text = serde_json::to_string(&vk).unwrap();
        let back = VerifyKey::parse(&text).unwrap();
        assert_eq!(*back.k0().unwrap(), [1_u8; 32]);
        assert!(!format!("{back:?}").contains(&vk.key));
        let edited = text.replace(&vk.key, &hex::encode([2_u8; 32]));
        assert!(VerifyKey::parse(&edited).unwrap_err().contains("key_id"));
    }
}
