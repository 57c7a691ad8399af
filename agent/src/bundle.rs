//! The agent's memory of (program, user) pairs: the last verdict the
//! appliance gave for each on this host, kept so the appliance can be asked
//! to re-decide and sign them (`Agent.SignBundle`, [`crate::signed`]).
//!
//! It is never used to answer: offline verdicts come only from the signed
//! bundle, whose integrity does not rest on this file. Only verdicts the
//! appliance marked cacheable (not time-dependent) enter it. It is bounded
//! ([`MAX_ENTRIES`], oldest dropped first) and saved atomically to
//! `bundle.json` (0600) in the agent's state directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::link::{write_atomic, LinkError};

/// Entries kept at most.
pub const MAX_ENTRIES: usize = 65_536;

/// One remembered verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// 1 allow, 2 allow with conditions, 3 deny (`trustbind_proto::Decision`).
    pub decision: u8,
    /// Nice obligation.
    pub nice: Option<i8>,
    /// CPU-time obligation in seconds.
    pub cpu_limit_s: Option<u32>,
    /// Log level obligation.
    pub log_level: u8,
    /// Policy generation it was decided under.
    pub generation: i64,
    /// When the agent received it (ms since the epoch).
    pub at_ms: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    entries: Vec<(String, String, Remembered)>,
}

/// The bundle in memory.
#[derive(Debug)]
pub struct Bundle {
    path: PathBuf,
    map: HashMap<(String, String), Remembered>,
    dirty: bool,
}

impl Bundle {
    /// Loads `dir/bundle.json` (an unreadable or corrupt file starts empty
    /// and is reported through `warn`).
    pub fn load(dir: &Path, warn: impl FnOnce(String)) -> Self {
        let path = dir.join("bundle.json");
        let map = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice::<File>(&b) {
                Ok(f) => f.entries.into_iter().map(|(p, u, r)| ((p, u), r)).collect(),
                Err(e) => {
                    warn(format!(
                        "{}: {e}; starting with an empty bundle",
                        path.display()
                    ));
                    HashMap::new()
                }
            },
            Err(_) => HashMap::new(),
        };
        Self {
            path,
            map,
            dirty: false,
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The remembered verdict for `sha256` (hex) run by `user`.
    pub fn get(&self, sha256: &str, user: &str) -> Option<Remembered> {
        self.map.get(&(sha256.to_owned(), user.to_owned())).copied()
    }

    /// The `limit` most recently seen pairs, (SHA-256 hex, user), newest first.
    pub fn recent(&self, limit: usize) -> Vec<(String, String)> {
        let mut all: Vec<(&(String, String), i64)> =
            self.map.iter().map(|(k, r)| (k, r.at_ms)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        all.into_iter()
            .take(limit)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Remembers a verdict; `true` if the pair is new.
    pub fn put(&mut self, sha256: &str, user: &str, r: Remembered) -> bool {
        let new = self
            .map
            .insert((sha256.to_owned(), user.to_owned()), r)
            .is_none();
        if self.map.len() > MAX_ENTRIES {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, r)| r.at_ms)
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
        self.dirty = true;
        new
    }

    /// Writes the file if anything changed since the last save.
    pub fn save(&mut self) -> Result<(), LinkError> {
        if !self.dirty {
            return Ok(());
        }
        let f = File {
            entries: self
                .map
                .iter()
                .map(|((p, u), r)| (p.clone(), u.clone(), *r))
                .collect(),
        };
        let json = serde_json::to_vec(&f).map_err(|e| LinkError::Config(e.to_string()))?;
        write_atomic(&self.path, &json, 0o600)?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(decision: u8, at_ms: i64) -> Remembered {
        Remembered {
            decision,
            nice: None,
            cpu_limit_s: None,
            log_level: 0,
            generation: 1,
            at_ms,
        }
    }

    #[test]
    fn remembers_across_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Bundle::load(d.path(), |w| panic!("{w}"));
        b.put("aa", "alice", r(1, 1));
        b.put("aa", "bob", r(3, 2));
        b.save().unwrap();
        let b = Bundle::load(d.path(), |w| panic!("{w}"));
        assert_eq!(b.get("aa", "alice").map(|x| x.decision), Some(1));
        assert_eq!(b.get("aa", "bob").map(|x| x.decision), Some(3));
        assert_eq!(b.get("bb", "alice"), None);
    }

    #[test]
    fn recent_pairs_come_newest_first_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Bundle::load(d.path(), |w| panic!("{w}"));
        b.put("aa", "alice", r(1, 1));
        b.put("bb", "alice", r(1, 3));
        b.put("cc", "bob", r(3, 2));
        assert_eq!(
            b.recent(2),
            vec![("bb".into(), "alice".into()), ("cc".into(), "bob".into())]
        );
        assert_eq!(b.recent(10).len(), 3);
    }

    #[test]
    fn a_corrupt_file_is_reported_and_ignored() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("bundle.json"), b"{nope").unwrap();
        let mut warned = None;
        let b = Bundle::load(d.path(), |w| warned = Some(w));
        assert!(b.is_empty());
        assert!(warned.unwrap().contains("bundle.json"));
    }
}
