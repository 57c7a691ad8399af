//! Protected file sets: from the appliance's paths to the module's
//! identities.
//!
//! The appliance pushes `FileSets` (named sets of absolute paths); the
//! module matches a file by identity, `(st_dev, st_ino)`, walking the
//! file's dentry parents on its own file system. [`resolve`] turns the
//! paths into that list: each path `stat`ed (its own symlinks followed),
//! and for each directory the root of every mount whose mount point lies at
//! or below it (from `/proc/self/mountinfo`), since a file system mounted
//! beneath a protected directory is not reached by the module's walk.
//! The result is sorted and unique; more than
//! [`trustbind_proto::MAX_FILE_SET_ENTRIES`] identities is an error and is
//! not sent at all (a cut list would protect an arbitrary part).
//! Paths that do not exist are reported as missing; the caller warns once
//! and resolves again later (every [`RESOLVE_EVERY`] and on each push).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use trustbind_proto::MAX_FILE_SET_ENTRIES;

/// How often the sets are resolved again (paths created, mounts changed).
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// What a lookup of one path found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// A directory (mounts below it are protected too).
    pub dir: bool,
    /// The path with every symlink resolved (compared with mount points).
    pub real: PathBuf,
}

/// One protected path that could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// The path as the appliance named it.
    pub path: String,
    /// Why (`No such file or directory`, `not absolute`, ...).
    pub why: String,
}

/// The identities of a set of protected paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Sorted, unique `(st_dev, st_ino)` pairs.
    pub ids: Vec<(u64, u64)>,
    /// Paths not resolved this time (retried at the next resolution).
    pub missing: Vec<Missing>,
}

/// Why a resolution cannot be handed to the module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// More identities than the module's record holds.
    #[error(
        "the protected file sets resolve to {0} files, directories and mounts, more than the \
         module's {max}: none of the new sets is sent (the module keeps the last sets that fit); \
         name fewer, higher directories",
        max = MAX_FILE_SET_ENTRIES
    )]
    TooMany(usize),
}

/// Undoes the kernel's octal escapes in a mountinfo field
/// ([`trustbind_proto::files::unescape_mountinfo`]).
fn unescape(field: &str) -> OsString {
    let mut out = vec![0u8; field.len()];
    // Unescaping never lengthens a field.
    let n = trustbind_proto::files::unescape_mountinfo(field.as_bytes(), &mut out).unwrap_or(0);
    out.truncate(n);
    OsString::from_vec(out)
}

/// The absolute path on this host of `path`, which the module gives from
/// the root of file system `dev` (its super block's device, `st_dev`
/// encoding: mountinfo's third field; on btrfs not the `st_dev` of its
/// files, which is their subvolume's): the path through the mount
/// of `dev` whose root (mountinfo's fourth field) holds it, the mount of
/// the whole file system (root `/`) first, then the first such mount in
/// mountinfo order (an original mount comes before its bind mounts). The
/// path unchanged if no mount of `dev` holds it (a file system mounted
/// only in another namespace): then it is in no file set, which fails
/// closed.
pub fn absolute_path(dev: u64, path: &str, mountinfo: &str) -> String {
    let (major, minor) = trustbind_proto::files::dev_numbers(dev);
    let id = format!("{major}:{minor}");
    let mut best: Option<(usize, String)> = None;
    for l in mountinfo.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let (Some(&devf), Some(&root), Some(&point)) = (f.get(2), f.get(3), f.get(4)) else {
            continue;
        };
        if devf != id {
            continue;
        }
        let root = unescape(root).to_string_lossy().into_owned();
        let point = unescape(point).to_string_lossy().into_owned();
        let rest = if root == "/" {
            Some(path)
        } else {
            path.strip_prefix(root.as_str())
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        let Some(rest) = rest else { continue };
        let rest = if rest == "/" { "" } else { rest };
        if best.as_ref().is_some_and(|(len, _)| *len <= root.len()) {
            continue;
        }
        let abs = match (point.as_str(), rest) {
            ("/", "") => "/".to_owned(),
            ("/", r) => r.to_owned(),
            (p, r) => format!("{p}{r}"),
        };
        best = Some((root.len(), abs));
    }
    best.map_or_else(|| path.to_owned(), |(_, p)| p)
}

/// [`absolute_path`] with this host's `/proc/self/mountinfo` (the path
/// unchanged if it cannot be read).
pub fn absolute_here(dev: u64, path: &str) -> String {
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(m) => absolute_path(dev, path, &m),
        Err(_) => path.to_owned(),
    }
}

/// The mount points (fifth field) of `/proc/<pid>/mountinfo` text.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|f| PathBuf::from(unescape(f)))
        .collect()
}

/// The identities of `paths`: each looked up with `lookup` (which follows
/// the path's symlinks), plus, for each directory, the root of every mount
/// in `mountinfo` at or below it (component-wise, by its real path).
pub fn resolve(
    paths: &[String],
    mountinfo: &str,
    mut lookup: impl FnMut(&Path) -> io::Result<Found>,
) -> Result<Resolution, ResolveError> {
    let mounts = mount_points(mountinfo);
    let mut ids = BTreeSet::new();
    let mut missing = Vec::new();
    let mut miss = |path: &str, why: String| {
        missing.push(Missing {
            path: path.to_owned(),
            why,
        })
    };
    for p in paths {
        let path = Path::new(p);
        if !path.is_absolute() {
            miss(p, "not an absolute path".into());
            continue;
        }
        let found = match lookup(path) {
            Ok(f) => f,
            Err(e) => {
                miss(p, e.to_string());
                continue;
            }
        };
        ids.insert((found.dev, found.ino));
        if !found.dir {
            continue;
        }
        for m in mounts.iter().filter(|m| m.starts_with(&found.real)) {
            // A mount point that vanished since mountinfo was read, or one
            // this process cannot reach, is found again next time.
            if let Ok(f) = lookup(m) {
                ids.insert((f.dev, f.ino));
            }
        }
    }
    if ids.len() > MAX_FILE_SET_ENTRIES {
        return Err(ResolveError::TooMany(ids.len()));
    }
    Ok(Resolution {
        ids: ids.into_iter().collect(),
        missing,
    })
}

/// [`resolve`] on this host: `stat(2)` and `realpath` in the agent's mount
/// namespace, mounts from `/proc/self/mountinfo`.
pub fn resolve_here(paths: &[String]) -> Result<Resolution, ResolveError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_else(|e| {
        tracing::warn!("/proc/self/mountinfo: {e}: mounts below protected directories not added");
        String::new()
    });
    resolve(paths, &mountinfo, |p| {
        let md = std::fs::metadata(p)?;
        Ok(Found {
            dev: md.dev(),
            ino: md.ino(),
            dir: md.is_dir(),
            real: std::fs::canonicalize(p)?,
        })
    })
}

/// What to do after a resolution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Send these identities to the module (they differ from the last sent).
    pub send: Option<Vec<(u64, u64)>>,
    /// Newly missing paths, to warn about (once each while missing).
    pub newly_missing: Vec<Missing>,
    /// Paths missing before and resolved now.
    pub found: Vec<String>,
    /// An error to log (once while it stays the same).
    pub error: Option<String>,
}

/// What the module was last given and what was already said, so that a
/// resolution every [`RESOLVE_EVERY`] sends and logs only changes.
#[derive(Debug, Default)]
pub struct Tracker {
    sent: Option<Vec<(u64, u64)>>,
    missing: BTreeSet<String>,
    error: Option<String>,
}

impl Tracker {
    /// The plan for resolution `res`.
    pub fn plan(&mut self, res: Result<Resolution, ResolveError>) -> Plan {
        let mut plan = Plan::default();
        let r = match res {
            Ok(r) => r,
            Err(e) => {
                plan.error = self.error_once(e.to_string());
                return plan;
            }
        };
        let now: BTreeSet<String> = r.missing.iter().map(|m| m.path.clone()).collect();
        plan.newly_missing = r
            .missing
            .into_iter()
            .filter(|m| !self.missing.contains(&m.path))
            .collect();
        plan.found = self.missing.difference(&now).cloned().collect();
        self.missing = now;
        if self.sent.as_ref() != Some(&r.ids) {
            plan.send = Some(r.ids);
        } else {
            self.error = None;
        }
        plan
    }

    /// The module took `ids`.
    pub fn sent(&mut self, ids: Vec<(u64, u64)>) {
        self.sent = Some(ids);
        self.error = None;
    }

    /// The module refused (or could not be written): `Some` the first time
    /// this error is seen; the next resolution tries again.
    pub fn send_failed(&mut self, e: String) -> Option<String> {
        self.error_once(e)
    }

    fn error_once(&mut self, e: String) -> Option<String> {
        if self.error.as_deref() == Some(e.as_str()) {
            return None;
        }
        self.error = Some(e.clone());
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:27 / /srv/data rw shared:5 - xfs /dev/sdb1 rw
31 30 0:28 / /srv/data/archive\\040old rw shared:6 - ext4 /dev/sdc1 rw
32 22 0:29 / /srv/database rw shared:7 - ext4 /dev/sdd1 rw
33 22 0:30 /exports /mnt/back\\134slash rw - nfs srv:/x rw
34 22 0:31 / /proc rw - proc proc rw
";

    /// A file system: path → identity; directories end in `/` in the map.
    fn fs(entries: &[(&str, u64, u64)]) -> HashMap<PathBuf, Found> {
        entries
            .iter()
            .map(|&(p, dev, ino)| {
                let dir = p.ends_with('/') && p.len() > 1;
                let real = PathBuf::from(if dir { &p[..p.len() - 1] } else { p });
                let found = Found {
                    dev,
                    ino,
                    dir: dir || p == "/",
                    real: real.clone(),
                };
                (real, found)
            })
            .collect()
    }

    fn lookup(fs: &HashMap<PathBuf, Found>) -> impl FnMut(&Path) -> io::Result<Found> + '_ {
        |p| {
            fs.get(p)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    fn paths(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn paths_from_a_file_systems_root_become_absolute() {
        // 8:1 is / and, bound, /mnt/b (its /srv subtree); 8:17 is /srv
        // (a file system of its own) and, bound, /data2 (its /data).
        let mi = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                  30 22 8:17 / /srv rw - ext4 /dev/sdb1 rw\n\
                  31 22 8:1 /srv /mnt/b rw - ext4 /dev/sda1 rw\n\
                  32 22 8:17 /data /data2 rw - ext4 /dev/sdb1 rw\n\
                  33 22 8:18 /sub /a\\040b rw - ext4 /dev/sdb2 rw\n";
        let sda1 = (8 << 8) | 1;
        let sdb1 = (8 << 8) | 17;
        let sdb2 = (8 << 8) | 18;
        assert_eq!(absolute_path(sda1, "/etc/passwd", mi), "/etc/passwd");
        assert_eq!(absolute_path(sda1, "/", mi), "/");
        assert_eq!(absolute_path(sdb1, "/data/db", mi), "/srv/data/db");
        assert_eq!(absolute_path(sdb1, "/", mi), "/srv");
        // Only a bind mount of a subtree holds it: through that mount.
        assert_eq!(absolute_path(sdb2, "/sub/x", mi), "/a b/x");
        assert_eq!(absolute_path(sdb2, "/subway", mi), "/subway");
        // A file system mounted nowhere here: unchanged (fails closed).
        assert_eq!(absolute_path((9 << 8) | 1, "/data/db", mi), "/data/db");
        // Large device numbers (major 259, minor 300) decode like stat's.
        let nvme = ((259u64 & 0xfff) << 8) | (300 & 0xff) | ((300u64 & !0xff) << 12);
        let mi2 = "40 1 259:300 / /nv rw - ext4 /dev/nvme0n1p300 rw\n";
        assert_eq!(absolute_path(nvme, "/x", mi2), "/nv/x");
    }

    #[test]
    fn btrfs_subvolume_mounts_map_from_the_file_systems_top() {
        // A Debian root on subvolume @ (mountinfo names the mount by the
        // super block's device and the subvolume's path as its root); the
        // module's path is from the top of the file system.
        let mi = "22 1 0:31 /@ / rw,relatime - btrfs /dev/vda2 rw,subvol=/@\n\
                  23 22 0:31 /@home /home rw,relatime - btrfs /dev/vda2 rw,subvol=/@home\n";
        let fs = 31;
        assert_eq!(absolute_path(fs, "/@/srv/data/db", mi), "/srv/data/db");
        assert_eq!(absolute_path(fs, "/@home/u/f", mi), "/home/u/f");
        // The top itself is mounted nowhere: unchanged (fails closed).
        assert_eq!(absolute_path(fs, "/snap/f", mi), "/snap/f");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        let m = mount_points(MOUNTINFO);
        assert_eq!(m.len(), 6);
        assert_eq!(m[2], PathBuf::from("/srv/data/archive old"));
        assert_eq!(m[4], PathBuf::from("/mnt/back\\slash"));
        assert_eq!(unescape("a\\011b\\012c"), OsString::from("a\tb\nc"));
        // Not an escape: kept as it is.
        assert_eq!(unescape("a\\9xy\\"), OsString::from("a\\9xy\\"));
        assert_eq!(unescape("\\777"), OsString::from("\\777"));
        assert!(mount_points("").is_empty());
        assert!(mount_points("garbage line\n").is_empty());
    }

    #[test]
    fn directories_bring_the_mounts_below_them() {
        let fs = fs(&[
            ("/srv/", 0x801, 100),
            ("/srv/data/", 27, 2),
            ("/srv/data/archive old/", 28, 2),
            ("/srv/database/", 29, 2),
            ("/etc/shadow", 0x801, 555),
        ]);
        let r = resolve(
            &paths(&["/srv/data", "/etc/shadow"]),
            MOUNTINFO,
            lookup(&fs),
        )
        .unwrap();
        // The nested mount below /srv/data is in, /srv/database (a sibling
        // whose name only starts the same) is not.
        assert_eq!(r.ids, vec![(27, 2), (28, 2), (0x801, 555)]);
        assert!(r.missing.is_empty());

        let r = resolve(&paths(&["/srv"]), MOUNTINFO, lookup(&fs)).unwrap();
        assert_eq!(r.ids, vec![(27, 2), (28, 2), (29, 2), (0x801, 100)]);

        // A file is not a directory: no mounts "below" it.
        let r = resolve(&paths(&["/etc/shadow"]), MOUNTINFO, lookup(&fs)).unwrap();
        assert_eq!(r.ids, vec![(0x801, 555)]);
    }

    #[test]
    fn symlinked_directories_are_matched_by_their_real_path() {
        let mut fs = fs(&[("/srv/data/", 27, 2), ("/srv/data/archive old/", 28, 2)]);
        // /data -> /srv/data
        let target = fs[Path::new("/srv/data")].clone();
        fs.insert(PathBuf::from("/data"), target);
        let r = resolve(&paths(&["/data"]), MOUNTINFO, lookup(&fs)).unwrap();
        assert_eq!(r.ids, vec![(27, 2), (28, 2)]);
    }

    #[test]
    fn missing_paths_are_reported_and_the_rest_resolved() {
        let fs = fs(&[("/etc/shadow", 0x801, 555)]);
        let r = resolve(
            &paths(&["/nope", "/etc/shadow", "relative/x", "/etc/shadow"]),
            "",
            lookup(&fs),
        )
        .unwrap();
        assert_eq!(r.ids, vec![(0x801, 555)]);
        let missing: Vec<&str> = r.missing.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(missing, vec!["/nope", "relative/x"]);
        assert_eq!(r.missing[1].why, "not an absolute path");
        assert!(resolve(&[], MOUNTINFO, lookup(&fs)).unwrap().ids.is_empty());
    }

    #[test]
    fn more_than_the_module_holds_is_refused_whole() {
        let make = |n: u64| -> HashMap<PathBuf, Found> {
            (0..n)
                .map(|i| {
                    let p = PathBuf::from(format!("/f{i}"));
                    let f = Found {
                        dev: 1,
                        ino: 1000 - i,
                        dir: false,
                        real: p.clone(),
                    };
                    (p, f)
                })
                .collect()
        };
        let names = |n: u64| (0..n).map(|i| format!("/f{i}")).collect::<Vec<_>>();
        let max = MAX_FILE_SET_ENTRIES as u64;
        let fs = make(max + 1);
        let r = resolve(&names(max), "", lookup(&fs)).unwrap();
        assert_eq!(r.ids.len(), MAX_FILE_SET_ENTRIES);
        assert!(r.ids.windows(2).all(|w| w[0] < w[1]), "not sorted");
        let e = resolve(&names(max + 1), "", lookup(&fs)).unwrap_err();
        assert_eq!(e, ResolveError::TooMany(MAX_FILE_SET_ENTRIES + 1));
        assert!(e.to_string().contains("501"), "{e}");
        // Repeats (hard links, the same directory twice) count once.
        let mut twice = names(max);
        twice.extend(names(10));
        assert_eq!(resolve(&twice, "", lookup(&fs)).unwrap().ids.len(), 500);
    }

    fn resolution(ids: &[(u64, u64)], missing: &[&str]) -> Result<Resolution, ResolveError> {
        Ok(Resolution {
            ids: ids.to_vec(),
            missing: missing
                .iter()
                .map(|p| Missing {
                    path: (*p).to_owned(),
                    why: "No such file or directory".into(),
                })
                .collect(),
        })
    }

    #[test]
    fn only_changes_are_sent_and_said() {
        let mut t = Tracker::default();
        // The first resolution is sent, even an empty one (it replaces what
        // an earlier agent left in the module).
        let p = t.plan(resolution(&[], &[]));
        assert_eq!(p.send, Some(vec![]));
        t.sent(vec![]);
        assert_eq!(t.plan(resolution(&[], &[])), Plan::default());

        let p = t.plan(resolution(&[(1, 2)], &["/a", "/b"]));
        assert_eq!(p.send, Some(vec![(1, 2)]));
        let warned: Vec<&str> = p.newly_missing.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(warned, vec!["/a", "/b"]);
        t.sent(vec![(1, 2)]);
        // Same again: nothing to send, nothing new to warn about.
        assert_eq!(
            t.plan(resolution(&[(1, 2)], &["/a", "/b"])),
            Plan::default()
        );
        // /a appeared.
        let p = t.plan(resolution(&[(1, 2), (1, 9)], &["/b"]));
        assert_eq!(p.send, Some(vec![(1, 2), (1, 9)]));
        assert_eq!(p.found, vec!["/a".to_owned()]);
        assert!(p.newly_missing.is_empty());
        // Not taken by the module: sent again next time, the error said once.
        assert!(t.send_failed("EINVAL".into()).is_some());
        let p = t.plan(resolution(&[(1, 2), (1, 9)], &["/b"]));
        assert_eq!(p.send, Some(vec![(1, 2), (1, 9)]));
        assert!(t.send_failed("EINVAL".into()).is_none());
        t.sent(vec![(1, 2), (1, 9)]);
        assert!(t.send_failed("EINVAL".into()).is_some());
    }

    #[test]
    fn an_overflow_sends_nothing_and_is_said_once() {
        let mut t = Tracker::default();
        t.plan(resolution(&[(1, 2)], &[]));
        t.sent(vec![(1, 2)]);
        let p = t.plan(Err(ResolveError::TooMany(501)));
        assert_eq!(p.send, None);
        assert!(p.error.as_deref().is_some_and(|e| e.contains("501")));
        assert_eq!(t.plan(Err(ResolveError::TooMany(501))), Plan::default());
        // Back under the limit: the previous set still stands, nothing sent.
        assert_eq!(t.plan(resolution(&[(1, 2)], &[])), Plan::default());
        assert!(t.plan(Err(ResolveError::TooMany(501))).error.is_some());
    }

    #[test]
    fn this_hosts_paths_resolve_with_stat() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a file");
        std::fs::write(&f, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let md = std::fs::metadata(&f).unwrap();
        let names = vec![
            f.display().to_string(),
            link.display().to_string(),
            dir.path().join("gone").display().to_string(),
        ];
        let r = resolve_here(&names).unwrap();
        // The symlink names the same file.
        assert!(r.ids.contains(&(md.dev(), md.ino())));
        assert_eq!(r.ids.len(), 1, "{:?}", r.ids);
        assert_eq!(r.missing.len(), 1);
    }
}
