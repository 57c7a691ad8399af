//! The appliance OS image (`cargo xtask image`, issue 5).
//!
//! Offline, without root: a static `trustbind-appliance` (glibc,
//! `+crt-static`), Debian's `busybox-static` and `e2fsck-static` (fetched
//! with `apt-get download`, unpacked with `dpkg-deb -x`), the overlay
//! `image/rootfs/` and our kernel become
//!
//! - `bzImage` + `initramfs.cpio.gz` (newc, written here) for
//!   `-kernel/-initrd` boots (`rdinit=/sbin/init`);
//! - `system.squashfs` (gzip: GRUB 2.06 reads no zstd, our kernel no xz)
//!   of the same tree plus `/boot` (the kernel;
//!   `grub.cfg` comes with the overlay);
//! - `disk.img`: GPT with a 1 MiB BIOS-boot partition holding GRUB's
//!   `core.img`, the system partition (`trustbind-system`, the squashfs,
//!   fixed PARTUUID) and the 64 MiB ext4 data partition (`trustbind-data`).
//!   GRUB is installed the way `grub-bios-setup` does it, on the file.
//!
//! Cache: `<cache>/image/<key>/`, `key` = SHA-256 over every input; built
//! in `<key>.tmp/` and renamed when complete.

use crate::kernel::hex;
use crate::sh;
use crate::Ctx;
use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Bump when the steps below change in a way that changes the outputs.
const RECIPE_VERSION: u32 = 3;
/// Debian packages unpacked into the image.
const DEBS: &[&str] = &["busybox-static", "e2fsck-static"];
/// The Rust target of the static appliance build.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Sector size of the disk image.
const SECTOR: u64 = 512;
/// First LBA of the BIOS-boot partition (1 MiB alignment).
const BIOS_LBA: u64 = 2048;
/// Size of the BIOS-boot partition in sectors (1 MiB).
const BIOS_SECTORS: u64 = 2048;
/// Size of the data partition in sectors (64 MiB; fixed).
pub const DATA_SECTORS: u64 = 64 << 11;
/// GPT type GUID of a BIOS-boot partition.
const BIOS_BOOT_TYPE: &str = "21686148-6449-6E6F-744E-656564454649";
/// GPT type GUID of a Linux file system.
const LINUX_FS_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// The disk's GPT GUID (fixed: the image is reproducible).
const DISK_GUID: &str = "7B1D5E2C-4A3F-4E8B-9C6D-2F1A0B3C4D5E";
/// PARTUUID of the system partition; the kernel mounts it as the root.
pub const SYSTEM_PARTUUID: &str = "5B1C7A3E-2F0D-4C8E-9A61-7D2E4B8F0A01";
/// PARTUUID of the BIOS-boot partition.
const BIOS_PARTUUID: &str = "2E6A9C4B-7D1F-4B3A-8E5C-0A9B8C7D6E03";
/// PARTUUID of the data partition.
const DATA_PARTUUID: &str = "9E4D2B1A-6C5F-4A7E-8B3D-1F0E2D4C6A02";
/// File system UUID of the data partition's ext4.
const DATA_FS_UUID: &str = "3c8e5f1a-9b2d-4e6f-a1c3-5d7e9f0b2a04";
/// GRUB modules built into `core.img` (nothing is loaded from disk).
const GRUB_MODULES: &[&str] = &[
    "biosdisk",
    "part_gpt",
    "squash4",
    "normal",
    "linux",
    "configfile",
    "search",
    "echo",
    "serial",
    "terminal",
    "smbios",
    "regexp",
    "test",
    "sleep",
    "reboot",
];
/// GRUB's prefix: `/boot/grub` of the system partition (the second one).
const GRUB_PREFIX: &str = "(hd0,gpt2)/boot/grub";
const GRUB_BOOT_IMG: &str = "/usr/lib/grub/i386-pc/boot.img";

/// GRUB's configuration, in the overlay (buildroot's tree uses it too);
/// its `root=PARTUUID=` must be [`SYSTEM_PARTUUID`].
const GRUB_CFG: &str = "boot/grub/grub.cfg";

/// Host tools the builder runs, with the Debian package providing each.
const TOOLS: &[(&str, &str)] = &[
    ("mksquashfs", "squashfs-tools"),
    ("sfdisk", "fdisk"),
    ("grub-mkimage", "grub-pc-bin"),
    ("mke2fs", "e2fsprogs"),
    ("dpkg-deb", "dpkg"),
    ("gzip", "gzip"),
    ("file", "file"),
];

/// The built image.
pub struct Image {
    /// The kernel (`bzImage`).
    pub kernel: PathBuf,
    /// `initramfs.cpio.gz`.
    pub initramfs: PathBuf,
    /// `disk.img` (GPT, bootable with GRUB for BIOS).
    pub disk: PathBuf,
}

impl Image {
    /// Sets the environment the QEMU tests read.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("TRUSTBIND_APPLIANCE_KERNEL", &self.kernel)
            .env("TRUSTBIND_APPLIANCE_INITRAMFS", &self.initramfs)
            .env("TRUSTBIND_APPLIANCE_DISK", &self.disk);
    }

    fn at(dir: &Path) -> Image {
        Image {
            kernel: dir.join("bzImage"),
            initramfs: dir.join("initramfs.cpio.gz"),
            disk: dir.join("disk.img"),
        }
    }
}

fn check_tools() -> Result<()> {
    let mut missing = Vec::new();
    for (tool, pkg) in TOOLS {
        let found = Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool} || test -x /sbin/{tool}"),
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            missing.push(format!("`{tool}` (package {pkg})"));
        }
    }
    if !Path::new(GRUB_BOOT_IMG).is_file() {
        missing.push(format!("{GRUB_BOOT_IMG} (package grub-pc-bin)"));
    }
    if !missing.is_empty() {
        bail!(
            "image: missing {}; run `cargo xtask setup` (as root) to install them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Builds (or reuses) the image for `bzimage`.
pub fn ensure(ctx: &Ctx, bzimage: &Path) -> Result<Image> {
    check_tools()?;
    let started = Instant::now();
    let appliance = build_static_appliance(ctx)?;
    let debs = fetch_debs(ctx)?;
    let overlay = ctx.root.join("image/rootfs");
    let key = cache_key(bzimage, &appliance, &debs, &overlay)?;
    let base = ctx.cache.join("image");
    let done = base.join(&key);
    let image = Image::at(&done);
    if image.disk.is_file() && image.initramfs.is_file() && image.kernel.is_file() {
        println!("image: up to date ({}, key {key})", done.display());
        return Ok(image);
    }
    let tmp = base.join(format!("{key}.tmp"));
    sh::claim_build_dir("image", &tmp, |t| Ok(fs::remove_dir_all(t)?))?;
    let log = tmp.join("build.log");
    println!("image: building, key {key}, in {}", tmp.display());

    let tree = tmp.join("tree");
    println!("image: root tree (busybox, e2fsck, trustbind-appliance, image/rootfs)");
    make_tree(&tree, &appliance, &debs, &overlay, &tmp.join("debs"), &log)?;

    println!("image: initramfs.cpio.gz");
    let cpio = tmp.join("initramfs.cpio");
    write_cpio(&tree, &cpio, &[Path::new("boot")])?;
    sh::run_logged(
        "image: gzip",
        Command::new("gzip").args(["-9", "-n", "-f"]).arg(&cpio),
        &log,
        "is gzip installed?",
    )?;

    println!("image: system.squashfs (gzip)");
    fs::copy(bzimage, tree.join("boot/bzImage"))?;
    let sqfs = tmp.join("system.squashfs");
    sh::run_logged(
        "image: mksquashfs",
        Command::new("mksquashfs")
            .arg(&tree)
            .arg(&sqfs)
            // gzip: the one compressor both GRUB 2.06's squash4 (gzip, xz,
            // lzo) and our kernel (zlib, zstd) read.
            .args(["-noappend", "-comp", "gzip", "-Xcompression-level", "9"])
            .args([
                "-all-root",
                "-no-progress",
                "-mkfs-time",
                "0",
                "-all-time",
                "0",
            ]),
        &log,
        "see the log",
    )?;

    println!("image: disk.img (GPT, GRUB for BIOS, system + 64 MiB ext4 data)");
    make_disk(&tmp, &sqfs, &log)?;
    fs::copy(bzimage, tmp.join("bzImage"))?;
    fs::remove_dir_all(&tree)?;
    fs::remove_dir_all(tmp.join("debs"))?;
    for f in ["data.ext4", "core.img", sh::OWNER] {
        let _ = fs::remove_file(tmp.join(f));
    }
    if done.exists() {
        fs::remove_dir_all(&done)?;
    }
    fs::rename(&tmp, &done).with_context(|| {
        format!(
            "image: cannot rename {} to {}",
            tmp.display(),
            done.display()
        )
    })?;
    let image = Image::at(&done);
    for (what, p) in [
        ("kernel", image.kernel.clone()),
        ("initramfs", image.initramfs.clone()),
        ("squashfs", done.join("system.squashfs")),
        ("disk.img", image.disk.clone()),
    ] {
        let m = fs::metadata(&p)?;
        println!(
            "image: {what:9} {:>6.1} MiB apparent, {:>6.1} MiB allocated: {}",
            m.len() as f64 / 1048576.0,
            (m.blocks() * 512) as f64 / 1048576.0,
            p.display()
        );
    }
    println!("image: built in {:.0?}", started.elapsed());
    Ok(image)
}

/// `cargo build --release` of `trustbind-appliance`, statically linked,
/// in its own target directory; returns the binary.
fn build_static_appliance(ctx: &Ctx) -> Result<PathBuf> {
    let target_dir = ctx.target.join("image-build");
    println!("image: static trustbind-appliance (cargo build --release, +crt-static)");
    sh::run(
        "image: cargo build trustbind-appliance (static)",
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&ctx.root)
            // The explicit --target keeps RUSTFLAGS off build scripts and
            // proc macros, which must stay dynamic host programs.
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args([
                "build",
                "--release",
                "-p",
                "trustbind-appliance",
                "--target",
                TARGET,
            ])
            .arg("--target-dir")
            .arg(&target_dir),
    )?;
    let bin = target_dir.join(TARGET).join("release/trustbind-appliance");
    let what = sh::output("image: file", Command::new("file").arg("-b").arg(&bin))?;
    ensure!(
        what.contains("statically linked") || what.contains("static-pie linked"),
        "image: {} is not statically linked: {what}",
        bin.display()
    );
    Ok(bin)
}

/// The `.deb`s of [`DEBS`], from the cache or `apt-get download`.
fn fetch_debs(ctx: &Ctx) -> Result<Vec<PathBuf>> {
    let dir = ctx.cache.join("image/debs");
    fs::create_dir_all(&dir)?;
    let mut out = Vec::new();
    for pkg in DEBS {
        let prefix = format!("{pkg}_");
        let find = || crate::kernel::newest_deb(&dir, &prefix);
        let deb = match find()? {
            Some(d) => d,
            None => {
                println!("image: apt-get download {pkg}");
                sh::run(
                    "image: apt-get download",
                    Command::new("apt-get")
                        .args(["-o", "APT::Sandbox::User=root", "-q", "download", pkg])
                        .current_dir(&dir),
                )
                .context(
                    "run `apt-get update` and check that Debian's package lists are reachable",
                )?;
                find()?.with_context(|| format!("image: apt-get download left no {pkg} .deb"))?
            }
        };
        out.push(deb);
    }
    Ok(out)
}

/// Every file below `dir` (sorted, relative), for hashing and copying.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    fn rec(base: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut es: Vec<_> = fs::read_dir(base.join(rel))
            .with_context(|| format!("cannot read {}", base.join(rel).display()))?
            .collect::<std::io::Result<_>>()?;
        es.sort_by_key(|e| e.file_name());
        for e in es {
            let r = rel.join(e.file_name());
            out.push(r.clone());
            if e.file_type()?.is_dir() {
                rec(base, &r, out)?;
            }
        }
        Ok(())
    }
    rec(dir, Path::new(""), &mut out)?;
    Ok(out)
}

fn cache_key(bzimage: &Path, appliance: &Path, debs: &[PathBuf], overlay: &Path) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!(
        "recipe {RECIPE_VERSION}\nversion {}\n",
        env!("CARGO_PKG_VERSION")
    ));
    h.update(format!("{GRUB_MODULES:?} {GRUB_PREFIX} {DATA_SECTORS}\n"));
    for f in [bzimage, appliance, Path::new(GRUB_BOOT_IMG)] {
        h.update(fs::read(f).with_context(|| format!("image: cannot read {}", f.display()))?);
    }
    for d in debs {
        h.update(
            d.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
    }
    for (bin, arg) in [
        ("mksquashfs", "-version"),
        ("grub-mkimage", "--version"),
        ("mke2fs", "-V"),
    ] {
        let out = Command::new(bin).arg(arg).output()?;
        h.update(&out.stdout);
        h.update(&out.stderr);
    }
    for rel in walk(overlay)? {
        let p = overlay.join(&rel);
        let m = fs::symlink_metadata(&p)?;
        h.update(format!("{} {:o}\n", rel.display(), m.permissions().mode()));
        if m.is_file() {
            h.update(fs::read(&p)?);
        }
    }
    Ok(hex(&h.finalize()[..8]))
}

/// The root tree: busybox and its applet links, e2fsck, the appliance,
/// the overlay, the directories init mounts on.
fn make_tree(
    tree: &Path,
    appliance: &Path,
    debs: &[PathBuf],
    overlay: &Path,
    unpack: &Path,
    log: &Path,
) -> Result<()> {
    for d in debs {
        sh::run_logged(
            "image: dpkg-deb -x",
            Command::new("dpkg-deb").arg("-x").arg(d).arg(unpack),
            log,
            "the cached .deb may be damaged: delete ~/.cache/trustbind/image/debs",
        )?;
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp", "data",
        "root", "boot",
    ] {
        fs::create_dir_all(tree.join(d))?;
    }
    fs::set_permissions(tree.join("root"), fs::Permissions::from_mode(0o700))?;
    fs::set_permissions(tree.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    let busybox = tree.join("bin/busybox");
    fs::copy(unpack.join("bin/busybox"), &busybox)?;
    let list = sh::output(
        "image: busybox --list-full",
        Command::new(&busybox).arg("--list-full"),
    )?;
    let mut links = 0;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let dst = tree.join(applet);
        if dst.exists() || applet == "bin/busybox" {
            continue;
        }
        let depth = Path::new(applet).components().count() - 1;
        let target = format!("{}bin/busybox", "../".repeat(depth));
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p)?;
        }
        std::os::unix::fs::symlink(target, &dst)?;
        links += 1;
    }
    fs::copy(unpack.join("sbin/e2fsck.static"), tree.join("sbin/e2fsck"))?;
    let dst = tree.join("usr/bin/trustbind-appliance");
    fs::copy(appliance, &dst)?;
    sh::run_logged(
        "image: strip",
        Command::new("strip").arg(&dst),
        log,
        "is binutils installed?",
    )?;
    copy_overlay(overlay, tree)?;
    let cfg = fs::read_to_string(tree.join(GRUB_CFG))?;
    ensure!(
        cfg.contains(&format!("root=PARTUUID={SYSTEM_PARTUUID} ")),
        "image: image/rootfs/{GRUB_CFG} must boot root=PARTUUID={SYSTEM_PARTUUID}"
    );
    fs::set_permissions(tree.join("etc/shadow"), fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::symlink("/proc/self/mounts", tree.join("etc/mtab"))?;
    fs::write(
        tree.join("etc/trustbind-release"),
        format!("{}\n", env!("CARGO_PKG_VERSION")),
    )?;
    println!("image: busybox with {links} applet links");
    Ok(())
}

fn copy_overlay(src: &Path, dst: &Path) -> Result<()> {
    for rel in walk(src)? {
        let (from, to) = (src.join(&rel), dst.join(&rel));
        let m = fs::symlink_metadata(&from)?;
        if m.is_dir() {
            fs::create_dir_all(&to)?;
        } else if m.file_type().is_symlink() {
            let _ = fs::remove_file(&to);
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else {
            let _ = fs::remove_file(&to);
            fs::copy(&from, &to)?;
            // Git keeps only the executable bit.
            let mode = if m.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// Writes `tree` as a newc cpio archive (owner root, mtime 0), leaving out
/// the top-level entries in `skip`, plus `/dev/console` and `/dev/null`.
fn write_cpio(tree: &Path, out: &Path, skip: &[&Path]) -> Result<()> {
    let mut w = std::io::BufWriter::new(File::create(out)?);
    let mut ino = 1u32;
    let mut entry = |w: &mut dyn Write,
                     name: &str,
                     mode: u32,
                     rdev: (u32, u32),
                     data: &[u8]|
     -> Result<()> {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let hdr = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0,
            0,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        ino += 1;
        w.write_all(hdr.as_bytes())?;
        w.write_all(name.as_bytes())?;
        w.write_all(&[0])?;
        let pad = |n: usize| (4 - n % 4) % 4;
        w.write_all(&[0; 3][..pad(hdr.len() + name.len() + 1)])?;
        w.write_all(data)?;
        w.write_all(&[0; 3][..pad(data.len())])?;
        Ok(())
    };
    for rel in walk(tree)? {
        if skip.iter().any(|s| rel.starts_with(s)) {
            continue;
        }
        let p = tree.join(&rel);
        let m = fs::symlink_metadata(&p)?;
        let name = rel.to_str().context("non-UTF-8 path in the image tree")?;
        let perm = m.permissions().mode() & 0o7777;
        if m.is_dir() {
            entry(&mut w, name, 0o040000 | perm, (0, 0), &[])?;
        } else if m.file_type().is_symlink() {
            let t = fs::read_link(&p)?;
            entry(
                &mut w,
                name,
                0o120777,
                (0, 0),
                t.as_os_str().as_encoded_bytes(),
            )?;
        } else {
            entry(&mut w, name, 0o100000 | perm, (0, 0), &fs::read(&p)?)?;
        }
    }
    entry(&mut w, "dev/console", 0o020600, (5, 1), &[])?;
    entry(&mut w, "dev/null", 0o020666, (1, 3), &[])?;
    entry(&mut w, "TRAILER!!!", 0, (0, 0), &[])?;
    w.flush()?;
    Ok(())
}

/// Partitions `disk.img`, writes the squashfs, a fresh ext4 and GRUB.
fn make_disk(tmp: &Path, sqfs: &Path, log: &Path) -> Result<()> {
    let sq_len = fs::metadata(sqfs)?.len();
    let sys_lba = BIOS_LBA + BIOS_SECTORS;
    // Whole MiB, at least one MiB of room.
    let sys_sectors = (sq_len.div_ceil(1 << 20) + 1) * 2048;
    let data_lba = sys_lba + sys_sectors;
    let total = data_lba + DATA_SECTORS + 2048;
    let disk = tmp.join("disk.img");
    File::create(&disk)?.set_len(total * SECTOR)?;
    let script = format!(
        "label: gpt\nlabel-id: {DISK_GUID}\nunit: sectors\nfirst-lba: 2048\n\
         start={BIOS_LBA}, size={BIOS_SECTORS}, type={BIOS_BOOT_TYPE}, uuid={BIOS_PARTUUID}, name=\"bios-boot\"\n\
         start={sys_lba}, size={sys_sectors}, type={LINUX_FS_TYPE}, uuid={SYSTEM_PARTUUID}, name=\"trustbind-system\"\n\
         start={data_lba}, size={DATA_SECTORS}, type={LINUX_FS_TYPE}, uuid={DATA_PARTUUID}, name=\"trustbind-data\"\n"
    );
    fs::write(tmp.join("sfdisk.script"), &script)?;
    // run_logged gives the command /dev/null as stdin: the script goes
    // through a shell redirection.
    sh::run_logged(
        "image: sfdisk",
        Command::new("sh")
            .arg("-c")
            .arg("sfdisk --no-reread --no-tell-kernel -q \"$1\" <\"$2\"")
            .arg("sh")
            .arg(&disk)
            .arg(tmp.join("sfdisk.script")),
        log,
        "see the log",
    )?;
    let table = sh::output(
        "image: sfdisk --dump",
        Command::new("sfdisk").arg("--dump").arg(&disk),
    )?;
    ensure!(
        table.contains("trustbind-data") && table.contains("trustbind-system"),
        "image: sfdisk did not write the partition table:\n{table}"
    );
    copy_into(&disk, sys_lba * SECTOR, sqfs)?;

    let data = tmp.join("data.ext4");
    File::create(&data)?.set_len(DATA_SECTORS * SECTOR)?;
    sh::run_logged(
        "image: mke2fs (data partition)",
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "trustbind-data", "-m", "0"])
            // Reproducible: fixed UUID, hash seed and time.
            .env("E2FSPROGS_FAKE_TIME", "1")
            .args(["-U", DATA_FS_UUID, "-E"])
            .arg(format!(
                "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,hash_seed={DATA_FS_UUID}"
            ))
            .arg(&data),
        log,
        "see the log",
    )?;
    copy_into(&disk, data_lba * SECTOR, &data)?;

    let core = tmp.join("core.img");
    sh::run_logged(
        "image: grub-mkimage",
        Command::new("grub-mkimage")
            .args(["-O", "i386-pc", "-o"])
            .arg(&core)
            .args(["-p", GRUB_PREFIX])
            .args(GRUB_MODULES),
        log,
        "see the log",
    )?;
    install_grub(&disk, &fs::read(GRUB_BOOT_IMG)?, &fs::read(&core)?)
}

/// What `grub-bios-setup` does, on a file: boot.img's code into sector 0
/// (keeping the protective MBR's table), pointing at the BIOS-boot
/// partition, and core.img in that partition with its blocklist set.
pub fn install_grub(disk: &Path, boot: &[u8], core: &[u8]) -> Result<()> {
    ensure!(
        boot.len() == 512,
        "boot.img is {} bytes, not 512",
        boot.len()
    );
    ensure!(core.len() >= 512, "core.img is too small");
    let core_sectors = (core.len() as u64).div_ceil(SECTOR);
    ensure!(
        core_sectors <= BIOS_SECTORS,
        "core.img ({} bytes) does not fit the 1 MiB BIOS-boot partition",
        core.len()
    );
    let mut f = File::options().read(true).write(true).open(disk)?;
    let mut mbr = [0u8; 512];
    f.read_exact(&mut mbr)?;
    ensure!(
        mbr[510..] == [0x55, 0xAA],
        "sector 0 holds no protective MBR"
    );
    mbr[..440].copy_from_slice(&boot[..440]);
    // GRUB_BOOT_MACHINE_KERNEL_SECTOR: where boot.img loads diskboot from.
    mbr[0x5c..0x64].copy_from_slice(&BIOS_LBA.to_le_bytes());
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&mbr)?;
    let mut core = core.to_vec();
    core.resize((core_sectors * SECTOR) as usize, 0);
    // diskboot's blocklist at the end of core.img's first sector: the rest
    // of core.img, loaded at segment 0x820.
    let bl = 0x200 - 12;
    core[bl..bl + 8].copy_from_slice(&(BIOS_LBA + 1).to_le_bytes());
    core[bl + 8..bl + 10].copy_from_slice(&u16::try_from(core_sectors - 1)?.to_le_bytes());
    core[bl + 10..bl + 12].copy_from_slice(&0x820u16.to_le_bytes());
    f.seek(SeekFrom::Start(BIOS_LBA * SECTOR))?;
    f.write_all(&core)?;
    f.sync_all()?;
    Ok(())
}

/// Copies `src` into `disk` at `offset`, skipping all-zero blocks so the
/// image stays sparse.
fn copy_into(disk: &Path, offset: u64, src: &Path) -> Result<()> {
    let mut f = File::options().write(true).open(disk)?;
    let mut s = File::open(src)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = offset;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = s.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            f.seek(SeekFrom::Start(pos))?;
            f.write_all(&buf[..n])?;
        }
        pos += n as u64;
        if n < buf.len() {
            break;
        }
    }
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_lists_with_gnu_cpio() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("t");
        fs::create_dir_all(tree.join("sbin")).unwrap();
        fs::create_dir_all(tree.join("boot")).unwrap();
        fs::write(tree.join("sbin/x"), b"hello").unwrap();
        fs::write(tree.join("boot/skip"), b"no").unwrap();
        std::os::unix::fs::symlink("x", tree.join("sbin/init")).unwrap();
        let out = d.path().join("a.cpio");
        write_cpio(&tree, &out, &[Path::new("boot")]).unwrap();
        let list = Command::new("cpio")
            .args(["-itv", "--quiet", "-F"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(list.status.success(), "{list:?}");
        let text = String::from_utf8_lossy(&list.stdout);
        for want in [
            "sbin/x",
            "sbin/init -> x",
            "dev/console",
            "dev/null",
            "root",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        assert!(!text.contains("boot"), "skipped tree listed:\n{text}");
    }

    #[test]
    fn grub_install_patches_mbr_and_blocklist() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk");
        let mut img = vec![0u8; 4 << 20];
        img[446] = 0xee; // protective MBR entry
        img[510] = 0x55;
        img[511] = 0xaa;
        fs::write(&disk, &img).unwrap();
        let boot = vec![0x11u8; 512];
        let core = vec![0x22u8; 512 * 3 + 100];
        install_grub(&disk, &boot, &core).unwrap();
        let out = fs::read(&disk).unwrap();
        assert_eq!(out[0], 0x11);
        assert_eq!(out[446], 0xee, "the partition table was overwritten");
        assert_eq!(&out[510..512], &[0x55, 0xaa]);
        assert_eq!(
            u64::from_le_bytes(out[0x5c..0x64].try_into().unwrap()),
            BIOS_LBA
        );
        let c = (BIOS_LBA * SECTOR) as usize;
        let bl = c + 0x200 - 12;
        assert_eq!(
            u64::from_le_bytes(out[bl..bl + 8].try_into().unwrap()),
            BIOS_LBA + 1
        );
        assert_eq!(
            u16::from_le_bytes(out[bl + 8..bl + 10].try_into().unwrap()),
            3
        );
        assert_eq!(
            u16::from_le_bytes(out[bl + 10..bl + 12].try_into().unwrap()),
            0x820
        );
        assert_eq!(out[c + 512 * 3], 0x22);
    }
}
