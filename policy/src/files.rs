//! Protected file sets: named lists of absolute paths (a directory protects
//! everything below it, a file itself), the policy entities
//! `Trustbind::FileSet::"<name>"`.
//!
//! The administrator defines them through the admin API (`trustbind
//! fileset`); the store keeps them (`file_sets`, `file_set_paths`); the
//! engine makes every `File` resource a member of each set with a path equal
//! to the file's or a directory above it on a component boundary
//! ([`FileSets::sets_of`]); the agent API pushes them to every agent
//! (`Push.file_sets`), whose module asks only about files inside them.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Most paths over all file sets together. The module resolves each path
/// to a (device, inode) identity and takes at most 500 of them; 256 leaves
/// room for the bind-mount aliases the agent may add for a path.
pub const MAX_FILE_SET_PATHS: usize = 256;
/// Most file sets.
pub const MAX_FILE_SETS: usize = 64;
/// Longest protected path, in bytes (the kernel's `PATH_MAX` less its NUL).
pub const MAX_PATH_LEN: usize = 4095;

/// One named file set, as stored and pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSet {
    /// The entity id (`Trustbind::FileSet::"<name>"`).
    pub name: String,
    /// Absolute, normalised paths, sorted.
    pub paths: Vec<String>,
}

/// Why a path cannot be protected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path `{path}` {why}")]
pub struct BadPath {
    /// The offending path (escaped for display).
    pub path: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Checks that `path` is absolute and normalised: starts with `/`, no
/// empty (`//`), `.` or `..` component, no trailing `/` (except `/`
/// itself), no NUL or control character, at most [`MAX_PATH_LEN`] bytes.
pub fn check_path(path: &str) -> Result<(), BadPath> {
    let bad = |why| {
        Err(BadPath {
            path: path.escape_debug().to_string(),
            why,
        })
    };
    if !path.starts_with('/') {
        return bad("is not absolute (it must start with `/`)");
    }
    if path.len() > MAX_PATH_LEN {
        return bad("is longer than 4095 bytes");
    }
    if path.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return bad("ends with `/` (write a directory without the trailing slash)");
    }
    for c in path[1..].split('/') {
        match c {
            "" => return bad("contains `//` (an empty component)"),
            "." => return bad("contains a `.` component (write it normalised)"),
            ".." => return bad("contains a `..` component (write it normalised)"),
            _ => {}
        }
    }
    Ok(())
}

/// The ancestors of a normalised absolute path, itself first, `/` last:
/// `/srv/data/x` → `/srv/data/x`, `/srv/data`, `/srv`, `/`.
fn self_and_ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(path);
    std::iter::from_fn(move || {
        let cur = next?;
        next = match cur.rfind('/') {
            _ if cur == "/" => None,
            Some(0) => Some("/"),
            Some(i) => Some(&cur[..i]),
            None => None,
        };
        Some(cur)
    })
}

/// The file sets of one engine snapshot, indexed by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSets {
    /// Protected path → names of the sets listing it, sorted.
    by_path: BTreeMap<String, Vec<String>>,
}

impl FileSets {
    /// Indexes `sets`.
    pub fn new(sets: &[FileSet]) -> Self {
        let mut by_path: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in sets {
            for p in &s.paths {
                by_path.entry(p.clone()).or_default().insert(s.name.clone());
            }
        }
        Self {
            by_path: by_path
                .into_iter()
                .map(|(p, n)| (p, n.into_iter().collect()))
                .collect(),
        }
    }

    /// Names of the sets protecting `path`: every set with a path equal to
    /// it or a directory above it on a component boundary (`/srv/data`
    /// covers `/srv/data` and `/srv/data/x`, not `/srv/database`). Sorted,
    /// without repeats. A path that is not absolute is in no set.
    pub fn sets_of(&self, path: &str) -> Vec<String> {
        if self.by_path.is_empty() || !path.starts_with('/') {
            return Vec::new();
        }
        let mut out: BTreeSet<&str> = BTreeSet::new();
        for p in self_and_ancestors(path) {
            if let Some(names) = self.by_path.get(p) {
                out.extend(names.iter().map(String::as_str));
            }
        }
        out.into_iter().map(str::to_owned).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_normalised() {
        for ok in ["/", "/srv", "/srv/data", "/var/log/audit/audit.log", "/a b"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("srv/data", "not absolute"),
            ("", "not absolute"),
            ("/srv/data/", "ends with `/`"),
            ("/srv//data", "`//`"),
            ("/srv/./data", "`.` component"),
            ("/srv/..", "`..` component"),
            ("/srv/../etc", "`..` component"),
            ("/srv/\ndata", "control character"),
        ] {
            let e = check_path(bad).unwrap_err();
            assert!(e.why.contains(why), "{bad}: {e}");
            assert!(
                e.to_string().contains(&bad.escape_debug().to_string()),
                "{e}"
            );
        }
        assert!(check_path(&format!("/{}", "a".repeat(MAX_PATH_LEN))).is_err());
    }

    #[test]
    fn ancestors_end_at_the_root() {
        let v: Vec<_> = self_and_ancestors("/srv/data/x").collect();
        assert_eq!(v, ["/srv/data/x", "/srv/data", "/srv", "/"]);
        assert_eq!(self_and_ancestors("/").collect::<Vec<_>>(), ["/"]);
    }

    #[test]
    fn membership_is_on_component_boundaries() {
        let sets = FileSets::new(&[
            FileSet {
                name: "pgdata".into(),
                paths: vec!["/srv/data".into()],
            },
            FileSet {
                name: "audit-logs".into(),
                paths: vec!["/var/log/audit".into(), "/srv/data/audit.log".into()],
            },
            FileSet {
                name: "everything".into(),
                paths: vec!["/".into()],
            },
        ]);
        assert_eq!(sets.sets_of("/srv/data"), ["everything", "pgdata"]);
        assert_eq!(sets.sets_of("/srv/data/base/1"), ["everything", "pgdata"]);
        assert_eq!(
            sets.sets_of("/srv/data/audit.log"),
            ["audit-logs", "everything", "pgdata"]
        );
        assert_eq!(sets.sets_of("/srv/database"), ["everything"]);
        assert_eq!(sets.sets_of("/srv"), ["everything"]);
        assert_eq!(sets.sets_of("relative/srv/data"), Vec::<String>::new());
        assert!(FileSets::default().sets_of("/srv/data").is_empty());
    }
}
