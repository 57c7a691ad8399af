//! Which Debian package owns a program's path, for learning mode.
//!
//! The appliance groups the programs a permissive host runs by the
//! package that installed them (`trustbind learn`). The agent knows that
//! from dpkg's own file lists, `/var/lib/dpkg/info/<package>[:<arch>].list`
//! (one installed path a line), read into memory once and again whenever
//! dpkg changes something (the directory's modification time moves on
//! every install, upgrade and removal: dpkg writes each list beside the
//! old one and renames it), never per exec, and never by running
//! `dpkg -S`.
//!
//! Only what an exec can name is kept: regular files with an execute bit
//! (so a host's tens of thousands of listed paths become its few thousand
//! programs), under their canonical path (the kernel names a program by
//! its resolved path: `/usr/bin/ls` for dpkg's `/bin/ls` on a merged-/usr
//! system). A path two packages list (diversions, replaced files) goes to
//! the first list read, in name order. The answer is informational, like
//! the path: it never decides.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// dpkg's database of file lists.
pub const DPKG_INFO: &str = "/var/lib/dpkg/info";

/// Longest package name sent (the appliance refuses longer ones).
const MAX_NAME: usize = 128;

/// Program path -> owning package.
#[derive(Debug, Default)]
pub struct Packages {
    owners: HashMap<String, Arc<str>>,
    /// The info directory's modification time when read (`None`: absent).
    stamp: Option<SystemTime>,
    /// Lists read.
    lists: usize,
}

/// Whether `name` is a Debian package name as the appliance accepts it.
pub fn valid_name(name: &str) -> bool {
    name.len() <= MAX_NAME
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b))
}

fn stamp_of(dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(dir).and_then(|m| m.modified()).ok()
}

impl Packages {
    /// Reads every `*.list` in `dir` (an absent directory gives an empty
    /// index: not a Debian host).
    pub fn load(dir: &Path) -> Self {
        let stamp = stamp_of(dir);
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Self::default();
        };
        let mut lists: Vec<(String, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file = e.file_name().into_string().ok()?;
                let stem = file.strip_suffix(".list")?;
                // `libc6:amd64.list`: the package is `libc6`.
                let name = stem.split(':').next()?;
                valid_name(name).then(|| (name.to_owned(), e.path()))
            })
            .collect();
        lists.sort();
        let mut owners: HashMap<String, Arc<str>> = HashMap::new();
        // Canonical form of each directory met (few, against many files).
        let mut dirs: HashMap<PathBuf, Option<PathBuf>> = HashMap::new();
        for (name, list) in &lists {
            let Ok(text) = std::fs::read_to_string(list) else {
                continue;
            };
            let pkg: Arc<str> = Arc::from(name.as_str());
            for line in text.lines() {
                let p = Path::new(line);
                if !p.is_absolute() {
                    continue;
                }
                let Ok(md) = std::fs::symlink_metadata(p) else {
                    continue;
                };
                if !md.file_type().is_file() || md.permissions().mode() & 0o111 == 0 {
                    continue;
                }
                let (Some(parent), Some(file)) = (p.parent(), p.file_name()) else {
                    continue;
                };
                let canon = dirs
                    .entry(parent.to_path_buf())
                    .or_insert_with(|| std::fs::canonicalize(parent).ok());
                let Some(real) = canon
                    .as_ref()
                    .and_then(|d| d.join(file).into_os_string().into_string().ok())
                else {
                    continue;
                };
                owners.entry(real).or_insert_with(|| Arc::clone(&pkg));
            }
        }
        Self {
            owners,
            stamp,
            lists: lists.len(),
        }
    }

    /// The package owning the program at `path` (as the kernel names it).
    pub fn owner(&self, path: &str) -> Option<&str> {
        self.owners.get(path).map(|p| &**p)
    }

    /// Every program indexed with its package, by path.
    pub fn programs(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<(&str, &str)> = self
            .owners
            .iter()
            .map(|(path, pkg)| (path.as_str(), &**pkg))
            .collect();
        v.sort_unstable();
        v
    }

    /// Programs indexed.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// Lists read.
    pub fn lists(&self) -> usize {
        self.lists
    }

    /// Whether dpkg changed `dir` since this index was read.
    pub fn stale(&self, dir: &Path) -> bool {
        stamp_of(dir) != self.stamp
    }
}

/// dpkg's status database: which packages are installed, at which version.
pub const DPKG_STATUS: &str = "/var/lib/dpkg/status";

/// The installed version of each package in dpkg's status database `text`
/// (stanzas of `Field: value` lines separated by blank lines): only
/// packages whose `Status` ends in `installed`. A package installed for
/// several architectures (multi-arch `same`) has one version.
pub fn installed_versions(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for stanza in text.split("\n\n") {
        let (mut name, mut version, mut installed) = (None, None, false);
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("Package:") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version:") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Status:") {
                installed = v.trim().ends_with(" installed");
            }
        }
        if let (Some(n), Some(v), true) = (name, version, installed) {
            if valid_name(n) {
                out.insert(n.to_owned(), v.to_owned());
            }
        }
    }
    out
}

/// The inventory of this host's packages (`trustbind-agent inventory`):
/// every program of `index`, by path, with its package's installed
/// version from `versions` (empty when dpkg's status does not say).
pub fn inventory(
    index: &Packages,
    versions: &HashMap<String, String>,
) -> Vec<trustbind_api::inventory::Program> {
    index
        .programs()
        .into_iter()
        .map(|(path, pkg)| trustbind_api::inventory::Program {
            path: path.to_owned(),
            package: pkg.to_owned(),
            version: versions.get(pkg).cloned().unwrap_or_default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(p: &Path, text: &str, mode: u32) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn programs_are_found_by_their_canonical_path() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let info = root.join("info");
        // A merged /usr: `bin` is a link to `usr/bin`.
        write(&root.join("usr/bin/ls"), "elf", 0o755);
        write(&root.join("usr/share/doc/coreutils/README"), "doc", 0o644);
        write(&root.join("usr/lib/libc.so.6"), "so", 0o644);
        write(&root.join("usr/bin/ldd"), "sh", 0o755);
        symlink("usr/bin", root.join("bin")).unwrap();
        symlink("ls", root.join("usr/bin/dir")).unwrap();
        let r = |p: &str| root.join(p).display().to_string();
        write(
            &info.join("coreutils.list"),
            &format!(
                "/.\n{}\n{}\n{}\n{}\nrelative/x\n",
                r("bin"),
                r("bin/ls"),
                r("usr/share/doc/coreutils/README"),
                r("usr/bin/dir")
            ),
            0o644,
        );
        write(
            &info.join("libc6:amd64.list"),
            &format!("{}\n{}\n", r("usr/lib/libc.so.6"), r("usr/bin/ldd")),
            0o644,
        );
        write(&info.join("libc6:amd64.md5sums"), "x", 0o644);
        write(
            &info.join("Bad_Name.list"),
            &format!("{}\n", r("usr/bin/ldd")),
            0o644,
        );
        let p = Packages::load(&info);
        assert_eq!(p.lists(), 2);
        // dpkg's /bin/ls is the kernel's /usr/bin/ls.
        assert_eq!(p.owner(&r("usr/bin/ls")), Some("coreutils"));
        assert_eq!(p.owner(&r("bin/ls")), None);
        // The architecture is not part of the name.
        assert_eq!(p.owner(&r("usr/bin/ldd")), Some("libc6"));
        // Not programs: documentation, a library without an x bit, a link.
        assert_eq!(p.len(), 2, "{:?}", p.owners);
        assert!(!p.stale(&info));
    }

    #[test]
    fn installed_versions_come_from_dpkg_status() {
        let status = "Package: coreutils\nStatus: install ok installed\nVersion: 9.1-1\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n\n\
                      Package: libc6\nStatus: install ok installed\nArchitecture: amd64\n\
                      Multi-Arch: same\nVersion: 2.36-9+deb12u9\nDescription: x\n more\n\n\
                      Package: Bad_Name\nStatus: install ok installed\nVersion: 1\n";
        let v = installed_versions(status);
        assert_eq!(v.get("coreutils").map(String::as_str), Some("9.1-1"));
        assert_eq!(v.get("libc6").map(String::as_str), Some("2.36-9+deb12u9"));
        assert!(!v.contains_key("gone"), "not installed");
        assert_eq!(v.len(), 2, "{v:?}");
    }

    #[test]
    fn the_inventory_lists_programs_with_their_packages_and_versions() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let info = root.join("info");
        write(&root.join("usr/bin/ls"), "elf", 0o755);
        write(&root.join("usr/bin/cat"), "elf", 0o755);
        write(&root.join("usr/sbin/nginx"), "elf", 0o755);
        let r = |p: &str| root.join(p).display().to_string();
        write(
            &info.join("coreutils.list"),
            &format!("{}\n{}\n", r("usr/bin/ls"), r("usr/bin/cat")),
            0o644,
        );
        write(
            &info.join("nginx.list"),
            &format!("{}\n", r("usr/sbin/nginx")),
            0o644,
        );
        let versions = installed_versions(
            "Package: coreutils\nStatus: install ok installed\nVersion: 9.1-1\n",
        );
        let inv = inventory(&Packages::load(&info), &versions);
        let got: Vec<(String, String, String)> = inv
            .into_iter()
            .map(|p| (p.path, p.package, p.version))
            .collect();
        assert_eq!(
            got,
            vec![
                (r("usr/bin/cat"), "coreutils".into(), "9.1-1".into()),
                (r("usr/bin/ls"), "coreutils".into(), "9.1-1".into()),
                (r("usr/sbin/nginx"), "nginx".into(), String::new()),
            ]
        );
    }

    #[test]
    fn a_host_without_dpkg_has_no_packages() {
        let p = Packages::load(Path::new("/nonexistent/dpkg/info"));
        assert!(p.is_empty());
        assert!(!p.stale(Path::new("/nonexistent/dpkg/info")));
    }

    #[test]
    fn package_names() {
        assert!(valid_name("libstdc++6"));
        assert!(valid_name("python3.11-minimal"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("Upper"));
        assert!(!valid_name(&"a".repeat(129)));
    }
}
