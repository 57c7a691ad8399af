//! User names for uids, as the policy's principals are user names
//! (`Trustbind::User::"alice"`).
//!
//! Read from the host's `/etc/passwd` (local accounts; a host using NSS
//! modules such as LDAP should provide names through `passwd` files or an
//! `nscd`-backed copy). Re-read when the file changes. A uid without a name
//! becomes `uid:<n>`, so a policy can still name it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// uid → name, refreshed from a passwd file.
#[derive(Debug)]
pub struct Users {
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
    names: HashMap<u32, String>,
}

impl Users {
    /// Names from `path` (normally `/etc/passwd`); a missing file gives no
    /// names, not an error.
    pub fn new(path: &Path) -> Self {
        let mut u = Self {
            path: path.to_owned(),
            stamp: None,
            names: HashMap::new(),
        };
        u.refresh();
        u
    }

    /// Re-reads the file if its modification time or size changed.
    pub fn refresh(&mut self) {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp == self.stamp {
            return;
        }
        self.stamp = stamp;
        self.names = std::fs::read_to_string(&self.path)
            .map(|t| parse(&t))
            .unwrap_or_default();
    }

    /// The name of `uid`, or `uid:<n>`.
    pub fn name(&self, uid: u32) -> String {
        self.names
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| format!("uid:{uid}"))
    }
}

/// Parses passwd lines `name:x:uid:...`; the first name of a uid wins, as
/// for `getpwuid`.
fn parse(text: &str) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let mut f = line.split(':');
        let (Some(name), Some(_), Some(uid)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if name.is_empty() || name.starts_with('#') || name.starts_with('+') {
            continue;
        }
        if let Ok(uid) = uid.parse() {
            out.entry(uid).or_insert_with(|| name.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fallbacks_and_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("passwd");
        std::fs::write(
            &p,
            "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\nalice:x:1000:1000::/home/alice:/bin/sh\ntoor:x:0:0::/:/bin/sh\n",
        )
        .unwrap();
        let mut u = Users::new(&p);
        assert_eq!(u.name(0), "root");
        assert_eq!(u.name(1000), "alice");
        assert_eq!(u.name(1001), "uid:1001");
        std::fs::write(
            &p,
            "root:x:0:0:root:/root:/bin/bash\nbob:x:1001:1001::/:/bin/sh\n",
        )
        .unwrap();
        u.refresh();
        assert_eq!(u.name(1001), "bob");
        assert_eq!(u.name(1000), "uid:1000");
        assert_eq!(Users::new(&dir.path().join("missing")).name(0), "uid:0");
    }
}
