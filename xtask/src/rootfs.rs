//! The guest root filesystem: a Debian 12 (bookworm) ext4 image, cached.
//!
//! Every VM the QEMU tests boot runs unmodified Debian programs (DESIGN.md
//! §4 "Real programs in tests"). This module builds them into one ext4
//! image with `debootstrap --variant=minbase`, installs the rest with
//! `apt-get` inside a chroot (a `policy-rc.d` keeps every service from
//! starting on the build host), strips documentation and locales, and packs
//! the tree with `mke2fs -d` (no loop mounts).
//!
//! The image boots with `init=/sbin/tb-init`, a stub that mounts the per-VM
//! payload disk (`/dev/vdb`) at `/tb` and runs `/tb/init`; everything the
//! harness does lives on the payload, so harness changes never rebuild
//! this image.
//!
//! Cache: `<cache_root>/rootfs/<key>/rootfs.ext4`, where `key` is the first
//! 16 hex digits of a SHA-256 over everything that determines the image.
//! The build happens in `<key>.tmp/` and is renamed when complete.
//!
//! Workplace rule: no package mirror host name is written here; the mirror
//! comes from the host's own apt configuration at run time.

use crate::sh;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Bump when the steps below change in a way that changes the image.
const RECIPE_VERSION: u32 = 2;
/// The Debian release of the guest.
const SUITE: &str = "bookworm";
/// Packages installed on top of minbase (their dependencies come along).
const PACKAGES: &[&str] = &[
    "bash",
    "busybox-static",
    "coreutils",
    "iproute2",
    "kmod",
    "procps",
    "curl",
    "socat",
    "iperf3",
    "nginx-light",
    "tcpdump",
    // `wg`, for the channel benchmark's WireGuard comparison.
    "wireguard-tools",
    // The soak's exec and socket load (qemu-tests/tests/it/soak.rs).
    "stress-ng",
    // A FUSE file system for the T-09 test (qemu-tests/tests/it/attacks.rs).
    "bindfs",
    "fuse3",
    // btrfs subvolumes for the file gate's T-98 test (tests/it/files.rs).
    "btrfs-progs",
];
/// Path of the init stub inside the image.
const STUB_PATH: &str = "sbin/tb-init";
/// The init stub. Keep it tiny and stable: changing it rebuilds the image.
const STUB: &str = r#"#!/bin/sh
# tb-init: Trustbind test-VM init stub (built into the root filesystem).
# Mounts the per-VM payload disk at /tb and hands over to /tb/init, so the
# harness can change without rebuilding the root filesystem.
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /tb
if ! mount -t ext4 -o ro /dev/vdb /tb; then
    echo "tb-init: cannot mount the payload disk /dev/vdb at /tb" >/dev/console
    exit 1
fi
exec /tb/init "$@"
echo "tb-init: cannot exec /tb/init" >/dev/console
exit 1
"#;
/// dpkg excludes: keep documentation, manuals and translations out.
const DPKG_NODOC: &str = "\
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/linda/*
";
/// Makes `invoke-rc.d` refuse every service start inside the chroot.
const POLICY_RC_D: &str = "#!/bin/sh\nexit 101\n";
/// Directories emptied after the install.
const STRIP_DIRS: &[&str] = &[
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "tmp",
];
/// Directories whose regular files are deleted (their directories stay:
/// daemons such as nginx expect `/var/log/nginx/` to exist).
const LOG_DIRS: &[&str] = &["var/log"];

/// Returns the path of the cached guest root filesystem image, building it
/// first when no image for the current inputs exists.
pub fn ensure(cache_root: &Path) -> Result<PathBuf> {
    let arch = sh::output(
        "rootfs: dpkg --print-architecture",
        Command::new("dpkg").arg("--print-architecture"),
    )?;
    let key = cache_key(&arch);
    let base = cache_root.join("rootfs");
    let done = base.join(&key);
    let image = done.join("rootfs.ext4");
    if image.is_file() {
        println!(
            "rootfs: up to date ({}, key {key}), nothing to do",
            image.display()
        );
        return Ok(image);
    }
    let tmp = base.join(format!("{key}.tmp"));
    sh::claim_build_dir("rootfs", &tmp, remove_tree)?;
    let started = Instant::now();
    println!("rootfs: building Debian {SUITE} ({arch}) image, key {key}");
    let log = tmp.join("build.log");
    let root = tmp.join("root");
    build_tree(&root, &arch, &log)?;
    let out = tmp.join("rootfs.ext4");
    make_image(&root, &out, &log)?;
    remove_tree(&root)?;
    let _ = fs::remove_file(tmp.join(sh::OWNER));
    if done.exists() {
        // A directory without an image: leftovers of a manual intervention.
        remove_tree(&done)?;
    }
    fs::rename(&tmp, &done).with_context(|| {
        format!(
            "rootfs: cannot rename {} to {}",
            tmp.display(),
            done.display()
        )
    })?;
    let size = fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
    println!(
        "rootfs: done in {:.0?}: {} ({} MiB)",
        started.elapsed(),
        image.display(),
        size >> 20
    );
    Ok(image)
}

/// First 16 hex digits of a SHA-256 over every input of the image.
fn cache_key(arch: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!("recipe {RECIPE_VERSION}\n"));
    h.update(format!("suite {SUITE}\narch {arch}\n"));
    for p in PACKAGES {
        h.update(format!("package {p}\n"));
    }
    h.update(format!("stub {STUB_PATH}\n{STUB}\n"));
    h.update(format!(
        "nodoc\n{DPKG_NODOC}\nstrip {STRIP_DIRS:?} {LOG_DIRS:?}\n"
    ));
    let digest = h.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

const HINT: &str = "check network access to the host's Debian mirror (the one in \
/etc/apt/sources.list*) and free disk space, then run `cargo xtask setup` again";

/// debootstrap, then apt-get inside the chroot, then the stub and the strip.
fn build_tree(root: &Path, arch: &str, log: &Path) -> Result<()> {
    let mirror = host_mirror()?;
    match &mirror {
        Some(m) => println!("rootfs: using the host's Debian mirror {m}"),
        None => {
            println!("rootfs: no Debian mirror in the host's apt sources; debootstrap's default")
        }
    }
    println!("rootfs: debootstrap --variant=minbase (takes 1–3 min)…");
    let mut cmd = Command::new("debootstrap");
    cmd.args(["--variant=minbase", &format!("--arch={arch}"), SUITE])
        .arg(root);
    if let Some(m) = &mirror {
        cmd.arg(m);
    }
    let r = sh::run_logged("rootfs: debootstrap", &mut cmd, log, HINT);
    // debootstrap mounts /proc and /sys in the target itself; make sure
    // nothing stays mounted whatever happened.
    unmount_below(root)?;
    r?;

    write(
        &root.join("etc/dpkg/dpkg.cfg.d/01-trustbind-nodoc"),
        DPKG_NODOC,
        0o644,
    )?;
    write(&root.join("usr/sbin/policy-rc.d"), POLICY_RC_D, 0o755)?;
    let resolv = root.join("etc/resolv.conf");
    let _ = fs::remove_file(&resolv);
    fs::copy("/etc/resolv.conf", &resolv)
        .context("rootfs: cannot copy /etc/resolv.conf into the chroot")?;

    println!(
        "rootfs: apt-get install {} (takes 1–2 min)…",
        PACKAGES.join(" ")
    );
    {
        let mounts = ChrootMounts::mount(root, log)?;
        let apt = |args: &[&str]| {
            let mut c = Command::new("chroot");
            c.arg(root)
                .args([
                    "env",
                    "DEBIAN_FRONTEND=noninteractive",
                    "LC_ALL=C",
                    "apt-get",
                ])
                // The host's apt may point at a dated snapshot mirror.
                .args(["-o", "Acquire::Check-Valid-Until=false", "-q", "-y"])
                .args(args);
            c
        };
        sh::run_logged("rootfs: apt-get update", &mut apt(&["update"]), log, HINT)?;
        let mut install = apt(&["install", "--no-install-recommends"]);
        install.args(PACKAGES);
        sh::run_logged("rootfs: apt-get install", &mut install, log, HINT)?;
        sh::run_logged("rootfs: apt-get clean", &mut apt(&["clean"]), log, HINT)?;
        mounts.unmount()?;
    }

    println!("rootfs: installing /{STUB_PATH} and stripping docs, manuals, locales");
    fs::remove_file(root.join("usr/sbin/policy-rc.d"))
        .context("rootfs: cannot remove policy-rc.d")?;
    write(&root.join(STUB_PATH), STUB, 0o755)?;
    write(&root.join("etc/resolv.conf"), "", 0o644)?;
    // Guests install nothing; leave no mirror address in the image.
    write(
        &root.join("etc/apt/sources.list"),
        "# emptied by `cargo xtask setup`: test guests install nothing\n",
        0o644,
    )?;
    write(&root.join("etc/hostname"), "tb-guest\n", 0o644)?;
    write(
        &root.join("etc/fstab"),
        "# the harness mounts everything\n",
        0o644,
    )?;
    for d in STRIP_DIRS {
        empty_dir(&root.join(d))?;
    }
    for d in LOG_DIRS {
        remove_files(&root.join(d))?;
    }
    strip_docs(&root.join("usr/share/doc"))?;
    Ok(())
}

/// Writes `data` to `path` (creating parents) with `mode`.
fn write(path: &Path, data: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .with_context(|| format!("rootfs: cannot create {}", dir.display()))?;
    }
    fs::write(path, data).with_context(|| format!("rootfs: cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("rootfs: cannot chmod {}", path.display()))
}

/// Removes everything inside `dir`, keeping `dir`.
fn empty_dir(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let p = e
            .with_context(|| format!("rootfs: cannot list {}", dir.display()))?
            .path();
        let r = if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.with_context(|| format!("rootfs: cannot remove {}", p.display()))?;
    }
    Ok(())
}

/// Deletes the regular files below `dir`, keeping every directory.
fn remove_files(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let e = e.with_context(|| format!("rootfs: cannot list {}", dir.display()))?;
        let t = e
            .file_type()
            .with_context(|| format!("rootfs: cannot stat {}", e.path().display()))?;
        if t.is_dir() {
            remove_files(&e.path())?;
        } else {
            fs::remove_file(e.path())
                .with_context(|| format!("rootfs: cannot remove {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Keeps only the copyright files (licence obligations) in `/usr/share/doc`.
fn strip_docs(doc: &Path) -> Result<()> {
    let Ok(pkgs) = fs::read_dir(doc) else {
        return Ok(());
    };
    for pkg in pkgs {
        let pkg = pkg.context("rootfs: cannot list /usr/share/doc")?.path();
        if !pkg.is_dir() || pkg.is_symlink() {
            continue;
        }
        for f in
            fs::read_dir(&pkg).with_context(|| format!("rootfs: cannot list {}", pkg.display()))?
        {
            let f = f
                .with_context(|| format!("rootfs: cannot list {}", pkg.display()))?
                .path();
            if f.file_name().is_some_and(|n| n == "copyright") {
                continue;
            }
            let r = if f.is_dir() && !f.is_symlink() {
                fs::remove_dir_all(&f)
            } else {
                fs::remove_file(&f)
            };
            r.with_context(|| format!("rootfs: cannot remove {}", f.display()))?;
        }
    }
    Ok(())
}

/// Packs `root` into an ext4 image at `out`, sized from the tree.
fn make_image(root: &Path, out: &Path, log: &Path) -> Result<()> {
    let (bytes, inodes) = tree_size(root)?;
    // Room for ext4 metadata and for guests that write (writes are
    // discarded by QEMU's snapshot mode, but the filesystem must fit them).
    let size_mib = (bytes + bytes / 4) / (1 << 20) + 128;
    let inodes = inodes + inodes / 2 + 4096;
    println!(
        "rootfs: mke2fs -d ({} MiB of files, {} inodes, image {size_mib} MiB)…",
        bytes >> 20,
        inodes
    );
    sh::run_logged(
        "rootfs: mke2fs",
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "tb-rootfs", "-N"])
            .arg(inodes.to_string())
            .arg("-d")
            .arg(root)
            .arg(out)
            .arg(format!("{size_mib}M")),
        log,
        "is e2fsprogs installed (`mke2fs -d` needs 1.43 or newer) and is there free disk space?",
    )
}

/// Total apparent size (rounded up to 4 KiB blocks) and entry count.
fn tree_size(root: &Path) -> Result<(u64, u64)> {
    let (mut bytes, mut count) = (0u64, 0u64);
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in
            fs::read_dir(&dir).with_context(|| format!("rootfs: cannot list {}", dir.display()))?
        {
            let e = e.with_context(|| format!("rootfs: cannot list {}", dir.display()))?;
            let m = e
                .metadata()
                .with_context(|| format!("rootfs: cannot stat {}", e.path().display()))?;
            count += 1;
            bytes += m.len().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, count))
}

/// The Debian mirror the host's apt uses for `SUITE`, if any: from
/// `/etc/apt/sources.list` (one-line format) and
/// `/etc/apt/sources.list.d/*.list|*.sources` (deb822).
fn host_mirror() -> Result<Option<String>> {
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push((false, t));
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let deb822 = match p.extension().and_then(|e| e.to_str()) {
                Some("sources") => true,
                Some("list") => false,
                _ => continue,
            };
            if let Ok(t) = fs::read_to_string(&p) {
                texts.push((deb822, t));
            }
        }
    }
    Ok(texts.iter().find_map(|(deb822, t)| {
        if *deb822 {
            mirror_from_deb822(t)
        } else {
            mirror_from_list(t)
        }
    }))
}

/// First `deb <uri> SUITE ... main` line of a one-line-format sources file.
fn mirror_from_list(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let mut words = line.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        // Skip `[arch=amd64 signed-by=...]` options.
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        let suite = words.next()?;
        let main = words.any(|w| w == "main");
        (suite == SUITE && main).then(|| uri.to_owned())
    })
}

/// First URI of a deb822 stanza with `Types: deb`, `Suites:` containing
/// `SUITE` and `Components:` containing `main` (and not `Enabled: no`).
fn mirror_from_deb822(text: &str) -> Option<String> {
    let mut stanzas = Vec::new();
    let mut cur = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                stanzas.push(std::mem::take(&mut cur));
            }
        } else if !line.trim_start().starts_with('#') {
            cur.push(line);
        }
    }
    stanzas.into_iter().find_map(|lines| {
        let field = |name: &str| {
            lines.iter().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let has = |name: &str, want: &str| {
            field(name).is_some_and(|v| v.split_whitespace().any(|w| w == want))
        };
        if field("Enabled").is_some_and(|v| v.eq_ignore_ascii_case("no"))
            || !has("Types", "deb")
            || !has("Suites", SUITE)
            || !has("Components", "main")
        {
            return None;
        }
        field("URIs")?.split_whitespace().next().map(str::to_owned)
    })
}

/// /proc, /sys and /dev mounted into the chroot for apt-get; unmounted in
/// reverse order by `unmount` or, on an error path, by `Drop`.
struct ChrootMounts {
    mounted: Vec<PathBuf>,
}

impl ChrootMounts {
    fn mount(root: &Path, log: &Path) -> Result<Self> {
        let mut m = ChrootMounts {
            mounted: Vec::new(),
        };
        let specs: [(&str, &[&str]); 4] = [
            ("proc", &["-t", "proc", "proc"]),
            ("sys", &["-t", "sysfs", "sysfs"]),
            ("dev", &["--bind", "/dev"]),
            ("dev/pts", &["--bind", "/dev/pts"]),
        ];
        for (dir, args) in specs {
            let target = root.join(dir);
            fs::create_dir_all(&target)
                .with_context(|| format!("rootfs: cannot create {}", target.display()))?;
            sh::run_logged(
                &format!("rootfs: mount {}", target.display()),
                Command::new("mount").args(args).arg(&target),
                log,
                "are we root?",
            )?;
            m.mounted.push(target);
        }
        Ok(m)
    }

    fn unmount(mut self) -> Result<()> {
        self.unmount_all()
    }

    fn unmount_all(&mut self) -> Result<()> {
        let mut failed = Vec::new();
        while let Some(t) = self.mounted.pop() {
            if !umount(&t) {
                failed.push(t.display().to_string());
            }
        }
        if !failed.is_empty() {
            bail!(
                "rootfs: cannot unmount {}; unmount by hand (`umount -l <path>`) before deleting the build directory",
                failed.join(", ")
            );
        }
        Ok(())
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            eprintln!("{e:#}");
        }
    }
}

/// `umount`, falling back to a lazy unmount; true on success.
fn umount(target: &Path) -> bool {
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    ok(Command::new("umount").arg(target)) || ok(Command::new("umount").arg("-l").arg(target))
}

/// Mount points at or below `dir`, deepest first, from /proc/self/mounts.
fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = match fs::canonicalize(dir) {
        Ok(d) => d,
        Err(_) => return Ok(Vec::new()),
    };
    let text =
        fs::read_to_string("/proc/self/mounts").context("rootfs: cannot read /proc/self/mounts")?;
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        // /proc/self/mounts escapes spaces as \040.
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(found)
}

/// Unmounts everything mounted at or below `dir`.
fn unmount_below(dir: &Path) -> Result<()> {
    for m in mounts_below(dir)? {
        if !umount(&m) {
            bail!("rootfs: cannot unmount {}; unmount it by hand", m.display());
        }
    }
    Ok(())
}

/// Deletes a build directory, but never through a live mount (a bind of
/// the host's /dev inside a half-built chroot must not be emptied).
fn remove_tree(dir: &Path) -> Result<()> {
    unmount_below(dir)?;
    if let Some(m) = mounts_below(dir)?.first() {
        bail!(
            "rootfs: {} is still mounted; refusing to delete {}",
            m.display(),
            dir.display()
        );
    }
    fs::remove_dir_all(dir).with_context(|| format!("rootfs: cannot remove {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_stable_and_depends_on_arch() {
        assert_eq!(cache_key("amd64"), cache_key("amd64"));
        assert_ne!(cache_key("amd64"), cache_key("arm64"));
        assert_eq!(cache_key("amd64").len(), 16);
    }

    #[test]
    fn mirror_from_deb822_picks_the_suite_stanza() {
        let t = "\
Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main

# a comment
Types: deb deb-src
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main contrib
";
        assert_eq!(
            mirror_from_deb822(t).as_deref(),
            Some("http://mirror.invalid/debian")
        );
        assert_eq!(
            mirror_from_deb822("Types: deb\nURIs: x\nSuites: trixie\nComponents: main\n"),
            None
        );
        let disabled = "Enabled: no\nTypes: deb\nURIs: x\nSuites: bookworm\nComponents: main\n";
        assert_eq!(mirror_from_deb822(disabled), None);
    }

    #[test]
    fn mirror_from_list_skips_options_and_other_suites() {
        let t = "\
# deb http://commented.invalid/debian bookworm main
deb http://mirror.invalid/debian-security bookworm-security main
deb [arch=amd64 signed-by=/k.gpg] http://mirror.invalid/debian bookworm main non-free
";
        assert_eq!(
            mirror_from_list(t).as_deref(),
            Some("http://mirror.invalid/debian")
        );
        assert_eq!(mirror_from_list("deb http://x/ bookworm contrib\n"), None);
    }
}
