//! The kernel toolchain, the cached kernel build and `trustbind.ko`.
//!
//! Recipe (DESIGN.md §7): Debian's `linux-source-6.12`, `make LLVM=1
//! tinyconfig` plus `kernel/trustbind.config`, built with clang-22 and
//! Debian's `rustc-web` (`/usr/bin/rustc`, LLVM 22) and a pinned
//! `bindgen-cli`. The build tree lives under
//! `~/.cache/trustbind/kernel/<key>/`, where `key` hashes every input, so a
//! second run with the same inputs does no kernel work.

use crate::sh;
use crate::Ctx;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Debian packages the kernel build, the module build and the QEMU tests
/// need on the build machine.
pub const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "rust-web-src",
    "clang-22",
    "lld-22",
    "llvm-22",
    "libclang-22-dev",
    "make",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "cpio",
    "xz-utils",
    "zstd",
    "busybox-static",
    "qemu-system-x86",
    "iproute2",
    "tcpdump",
    "debootstrap",
    "e2fsprogs",
    // The appliance OS image (xtask/src/image.rs).
    "squashfs-tools",
    "fdisk",
    // `sgdisk -v` checks the GPT `grow-data` writes (appliance/src/grow.rs tests).
    "gdisk",
    "grub-pc-bin",
    "file",
    // `make bindeb-pkg` (the kernel's Debian package, xtask/src/package.rs).
    "dpkg-dev",
    "debhelper",
    "rsync",
    "kmod",
];

/// `bindgen-cli` version, pinned: the kernel's Rust bindings depend on it.
pub const BINDGEN_VERSION: &str = "0.73.2";
/// The Debian source package of the kernel.
const KERNEL_SOURCE_PKG: &str = "linux-source-6.12";
/// Bump when the steps below change in a way that changes the output.
const RECIPE_VERSION: u32 = 1;
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const LIBCLANG: &str = "/usr/lib/llvm-22/lib";
const RUSTC: &str = "/usr/bin/rustc";
const RUSTDOC: &str = "/usr/bin/rustdoc";

/// Installs the Debian packages that are missing; says what it installs.
pub fn ensure_packages() -> Result<()> {
    let mut missing = Vec::new();
    for p in APT_PACKAGES {
        let st = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", p])
            .output()
            .context("packages: cannot run dpkg-query (is this Debian?)")?;
        if !String::from_utf8_lossy(&st.stdout).contains("install ok installed") {
            missing.push(*p);
        }
    }
    if missing.is_empty() {
        println!("packages: all {} present", APT_PACKAGES.len());
        return Ok(());
    }
    println!("packages: installing {}", missing.join(" "));
    if !is_root() {
        bail!(
            "packages: missing {}; run as root, or install them with `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    sh::run(
        "packages: apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    sh::run(
        "packages: apt-get install",
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
    .context("check the Debian package lists (apt-get update) and disk space")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Path of the pinned bindgen, installed under the cache if missing.
pub fn ensure_bindgen(ctx: &Ctx) -> Result<PathBuf> {
    let root = ctx.cache.join(format!("tools/bindgen-{BINDGEN_VERSION}"));
    let bin = root.join("bin/bindgen");
    if let Ok(v) = sh::output("bindgen", Command::new(&bin).arg("--version")) {
        if v.contains(BINDGEN_VERSION) {
            println!("bindgen: {v} (cached)");
            return Ok(bin);
        }
    }
    println!("bindgen: installing bindgen-cli {BINDGEN_VERSION} (about 2 min)");
    sh::run(
        "bindgen: cargo install",
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "--locked",
                "bindgen-cli",
                "--version",
                BINDGEN_VERSION,
            ])
            .arg("--root")
            .arg(&root),
    )
    .context("bindgen-cli is fetched from the crate registry: check that it is reachable")?;
    Ok(bin)
}

/// Which kernel: the one shipped (appliance image, benchmarks, demo) or
/// the one the QEMU tests boot for protected hosts, with the kernel's own
/// checkers on (`kernel/debug.config`, issue 14).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Flavor {
    Production,
    Debug,
}

impl Flavor {
    /// The config fragments, in the order they are merged.
    fn fragments(self) -> &'static [&'static str] {
        match self {
            Flavor::Production => &["kernel/trustbind.config"],
            Flavor::Debug => &["kernel/trustbind.config", "kernel/debug.config"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavor::Production => "production",
            Flavor::Debug => "debug",
        }
    }
}

/// A configured and built kernel tree.
pub struct Kernel {
    pub flavor: Flavor,
    /// The build tree (source and objects), for `make -C` of modules.
    pub tree: PathBuf,
    /// `arch/x86/boot/bzImage`.
    pub bzimage: PathBuf,
    /// The cache directory `kernel/<key>/` holding the tree.
    dir: PathBuf,
    bindgen: PathBuf,
}

/// The newest `.deb` in `dir` whose file name starts with `prefix`.
pub fn newest_deb(dir: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    Ok(debs.pop())
}

/// The `.deb` of the kernel source: the one in the cache, else downloaded.
fn source_deb(ctx: &Ctx) -> Result<PathBuf> {
    let dir = ctx.cache.join("src");
    fs::create_dir_all(&dir)?;
    let find = || newest_deb(&dir, KERNEL_SOURCE_PKG);
    if let Some(deb) = find()? {
        return Ok(deb);
    }
    println!("kernel: downloading {KERNEL_SOURCE_PKG} (about 150 MB)");
    sh::run(
        "kernel: apt-get download",
        Command::new("apt-get")
            // The cache may sit in a home that apt's `_apt` user cannot
            // enter; download as the caller instead of warning about it.
            .args([
                "-o",
                "APT::Sandbox::User=root",
                "download",
                KERNEL_SOURCE_PKG,
            ])
            .current_dir(&dir),
    )
    .context("run `apt-get update` and check that Debian's package lists are reachable")?;
    find()?.context("kernel: apt-get download left no .deb")
}

fn tool_version(bin: &str, arg: &str) -> Result<String> {
    sh::output("toolchain", Command::new(bin).arg(arg))
        .map(|s| s.lines().next().unwrap_or_default().to_owned())
}

fn make(tree: &Path, bindgen: &Path) -> Command {
    let mut c = Command::new("make");
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    c.current_dir(tree)
        .env("PATH", path)
        .env("LIBCLANG_PATH", LIBCLANG)
        .arg("LLVM=1")
        .arg(format!("RUSTC={RUSTC}"))
        .arg(format!("HOSTRUSTC={RUSTC}"))
        .arg(format!("RUSTDOC={RUSTDOC}"))
        .arg(format!("BINDGEN={}", bindgen.display()));
    c
}

/// Returns the cached kernel of `flavor` for the current inputs, building
/// it if needed.
pub fn ensure_kernel(ctx: &Ctx, bindgen: &Path, flavor: Flavor) -> Result<Kernel> {
    let mut fragments = Vec::new();
    for rel in flavor.fragments() {
        let path = ctx.root.join(rel);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("kernel: cannot read {}", path.display()))?;
        fragments.push((path, text));
    }
    let deb = source_deb(ctx)?;
    let mut h = Sha256::new();
    h.update(format!("recipe {RECIPE_VERSION}\n"));
    // The production key hashes exactly what it hashed before flavours
    // existed, so its cached build stays valid.
    for (_, text) in &fragments {
        h.update(text.as_bytes());
    }
    h.update(
        deb.file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default(),
    );
    for (bin, arg) in [(RUSTC, "--version"), ("clang-22", "--version")] {
        h.update(tool_version(bin, arg)?);
    }
    h.update(tool_version(&bindgen.to_string_lossy(), "--version")?);
    let key = hex(&h.finalize()[..8]);
    let dir = ctx.cache.join("kernel").join(&key);
    let tree = dir.join("linux");
    let kernel = Kernel {
        flavor,
        bzimage: tree.join("arch/x86/boot/bzImage"),
        tree: tree.clone(),
        dir: dir.clone(),
        bindgen: bindgen.to_owned(),
    };
    let done = dir.join("done");
    if done.exists() {
        println!(
            "kernel: cached {} build {key} ({})",
            flavor.name(),
            kernel.tree.display()
        );
        return Ok(kernel);
    }
    fs::create_dir_all(&dir)?;
    let log = dir.join("build.log");
    let started = Instant::now();

    if !dir.join("unpacked").exists() {
        println!(
            "kernel: unpacking {} into {}",
            display_name(&deb),
            dir.display()
        );
        let _ = fs::remove_dir_all(&tree);
        let tmp = dir.join("unpack.tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        sh::run_logged(
            "kernel: extract .deb",
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp),
            &log,
            "the cached .deb may be damaged: delete ~/.cache/trustbind/src and retry",
        )?;
        let tarball = fs::read_dir(tmp.join("usr/src"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.to_string_lossy().ends_with(".tar.xz"))
            .context("kernel: no .tar.xz in the linux-source package")?;
        fs::create_dir_all(&tree)?;
        sh::run_logged(
            "kernel: unpack source",
            Command::new("tar")
                .arg("-xf")
                .arg(&tarball)
                .arg("--strip-components=1")
                .arg("-C")
                .arg(&tree),
            &log,
            "check free disk space (the tree needs about 2 GB)",
        )?;
        fs::remove_dir_all(&tmp)?;
        fs::write(dir.join("unpacked"), "")?;
    }

    if !dir.join("configured").exists() {
        let names = flavor.fragments().join(" + ");
        println!(
            "kernel: configuring the {} kernel (tinyconfig + {names})",
            flavor.name()
        );
        let hint = format!("see the log; the fragments are {names}");
        sh::run_logged(
            "kernel: tinyconfig",
            make(&tree, bindgen).arg("tinyconfig"),
            &log,
            &hint,
        )?;
        sh::run_logged(
            "kernel: merge fragments",
            Command::new(tree.join("scripts/kconfig/merge_config.sh"))
                .current_dir(&tree)
                .arg("-m")
                .arg(".config")
                .args(fragments.iter().map(|(p, _)| p)),
            &log,
            &hint,
        )?;
        sh::run_logged(
            "kernel: olddefconfig",
            make(&tree, bindgen).arg("olddefconfig"),
            &log,
            &hint,
        )?;
        let merged: String = fragments.iter().map(|(_, t)| t.as_str()).collect();
        check_config(&tree.join(".config"), &merged)?;
        sh::run_logged(
            "kernel: rustavailable",
            make(&tree, bindgen).arg("rustavailable"),
            &log,
            "the Rust toolchain (rustc-web, rust-web-src, bindgen) is not usable by Kbuild",
        )?;
        fs::write(dir.join("configured"), "")?;
    }

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "kernel: building the {} bzImage and modules with -j{jobs} (about 10 min on 2 cores); log: {}",
        flavor.name(),
        log.display()
    );
    sh::run_logged(
        "kernel: build",
        make(&tree, bindgen)
            .arg(format!("-j{jobs}"))
            .args(["bzImage", "modules"]),
        &log,
        "fix the cause and rerun: make resumes where it stopped",
    )?;
    fs::write(&done, format!("built in {:.0?}\n", started.elapsed()))?;
    println!(
        "kernel: {} built in {:.0?}",
        flavor.name(),
        started.elapsed()
    );
    Ok(kernel)
}

/// Fails naming every fragment line that did not survive olddefconfig.
fn check_config(config: &Path, fragment: &str) -> Result<()> {
    let have = fs::read_to_string(config)?;
    let mut lost = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if !line.starts_with("CONFIG_") {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        let ok = if v == "n" {
            !have.lines().any(|l| l.starts_with(&format!("{k}=")))
        } else {
            have.lines().any(|l| l == line)
        };
        if !ok {
            lost.push(line.to_owned());
        }
    }
    if !lost.is_empty() {
        bail!(
            "kernel: these lines of kernel/trustbind.config did not stick (a dependency is missing): {}",
            lost.join(", ")
        );
    }
    Ok(())
}

fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The Debian package of `kernel` (`linux-image-<release>`), built by the
/// kernel's own `make bindeb-pkg` from the cached, built tree and cached
/// beside it in `kernel/<key>/deb/`.
///
/// The tree is shared (other builds read its bzImage and build modules
/// against it) and `bindeb-pkg` writes into it (`debian/`, and a relink of
/// vmlinux with the package revision as build number), so the packaging
/// runs in a private mount namespace with an overlay on the tree's own
/// path: the same paths, so Kbuild sees everything up to date and only
/// relinks (about 2 min), while the cached tree stays as it was.
pub fn ensure_deb(kernel: &Kernel) -> Result<PathBuf> {
    let out = kernel.dir.join(format!("deb-{DEB_RECIPE_VERSION}"));
    if let Some(deb) = newest_deb(&out, "linux-image-").ok().flatten() {
        println!("kernel: cached package {}", deb.display());
        return Ok(deb);
    }
    let release = kernel_release(kernel)?;
    let tmp = kernel.dir.join("deb.tmp");
    sh::claim_build_dir("kernel package", &tmp, |t| Ok(fs::remove_dir_all(t)?))?;
    // dpkg-buildpackage writes its results beside the tree; clear them.
    let stray = |dir: &Path| -> Result<()> {
        for e in fs::read_dir(dir)? {
            let p = e?.path();
            let n = display_name(&p);
            if n.starts_with("linux-image-")
                || n.starts_with("linux-libc-dev_")
                || n.starts_with("linux-upstream_")
            {
                fs::remove_file(&p)?;
            }
        }
        Ok(())
    };
    stray(&kernel.dir)?;
    let (upper, work) = (tmp.join("upper"), tmp.join("work"));
    fs::create_dir_all(&upper)?;
    fs::create_dir_all(&work)?;
    let log = tmp.join("build.log");
    let started = Instant::now();
    println!(
        "kernel: make bindeb-pkg of the {} kernel {release} (relink only, about 2 min); log: {}",
        kernel.flavor.name(),
        log.display()
    );
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut m = make(&kernel.tree, &kernel.bindgen);
    m.arg(format!("-j{jobs}"))
        // Build dependencies are checked by `ensure_packages` (clang, not
        // the gcc the generated control file names).
        .arg("DPKG_FLAGS=-d")
        .arg("bindeb-pkg")
        .env(
            "KDEB_PKGVERSION",
            format!("{release}-{KERNEL_DEB_REVISION}"),
        )
        .env("KDEB_CHANGELOG_DIST", "trustbind")
        .env("DEBFULLNAME", crate::package::MAINTAINER_NAME)
        .env("DEBEMAIL", crate::package::MAINTAINER_EMAIL)
        // No linux-headers package: a Rust module cannot be built from it.
        .env("DEB_BUILD_PROFILES", "pkg.linux-upstream.nokernelheaders");
    let script = format!(
        // `cd` after the mount: a working directory entered before it
        // would still be the tree below the overlay.
        r#"set -e; mount -t overlay overlay -o lowerdir={tree},upperdir={upper},workdir={work} {tree}; cd {tree}; exec "$@""#,
        tree = kernel.tree.display(),
        upper = upper.display(),
        work = work.display()
    );
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .arg(m.get_program())
    .args(m.get_args())
    .current_dir(&kernel.dir);
    for (k, v) in m.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    sh::run_logged(
        "kernel: make bindeb-pkg",
        &mut c,
        &log,
        "needs root (a mount namespace and an overlay), debhelper and rsync (`cargo xtask setup` installs them)",
    )?;
    if kernel.tree.join("debian").exists() {
        bail!(
            "kernel: bindeb-pkg wrote into the cached tree {} (the overlay was not used): \
             delete {} to rebuild that kernel",
            kernel.tree.display(),
            kernel.dir.display()
        );
    }
    let deb = newest_deb(&kernel.dir, &format!("linux-image-{release}_"))?
        .context("kernel: bindeb-pkg left no linux-image package")?;
    let name = deb.file_name().context("no file name")?.to_owned();
    fs::rename(&deb, tmp.join(&name))?;
    stray(&kernel.dir)?;
    fs::remove_dir_all(&upper)?;
    fs::remove_dir_all(&work)?;
    let _ = fs::remove_file(tmp.join(sh::OWNER));
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    fs::rename(&tmp, &out)?;
    println!("kernel: packaged in {:.0?}", started.elapsed());
    Ok(out.join(name))
}

/// Bump when the packaging steps above change their output.
const DEB_RECIPE_VERSION: u32 = 1;

/// The Debian revision of the kernel package (also the kernel's build
/// number, `#1` in `uname -v`).
const KERNEL_DEB_REVISION: &str = "1";

/// `include/config/kernel.release` of a built tree (`uname -r` of it).
pub fn kernel_release(kernel: &Kernel) -> Result<String> {
    let p = kernel.tree.join("include/config/kernel.release");
    Ok(fs::read_to_string(&p)
        .with_context(|| format!("kernel: cannot read {}", p.display()))?
        .trim()
        .to_owned())
}

/// Builds `trustbind.ko` out of tree against `kernel`; returns its path.
///
/// Kbuild writes objects next to the sources, so `kmod/` and the `proto/`
/// sources it includes are copied under `target/` first, one copy per
/// kernel flavour (a module only loads into the kernel it was built for).
pub fn build_kmod(ctx: &Ctx, kernel: &Kernel) -> Result<PathBuf> {
    let build = ctx.target.join(match kernel.flavor {
        Flavor::Production => "kmod-build",
        Flavor::Debug => "kmod-build-debug",
    });
    let kmod = build.join("kmod");
    sync_dir(&ctx.root.join("kmod"), &kmod)?;
    sync_dir(&ctx.root.join("proto/src"), &build.join("proto/src"))?;
    let log = build.join("build.log");
    let _ = fs::remove_file(&log);
    println!(
        "kmod: building trustbind.ko for the {} kernel",
        kernel.flavor.name()
    );
    sh::run_logged(
        "kmod: build",
        make(&kernel.tree, &kernel.bindgen)
            .arg(format!("M={}", kmod.display()))
            .arg("modules"),
        &log,
        "the compiler errors above are in kmod/ or proto/src/",
    )?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("warning")).collect();
    if !warnings.is_empty() {
        bail!(
            "kmod: the build printed warnings (the module must build clean):\n{}",
            warnings.join("\n")
        );
    }
    let ko = kmod.join("trustbind.ko");
    if !ko.exists() {
        bail!("kmod: build succeeded but {} is missing", ko.display());
    }
    println!("kmod: {}", ko.display());
    Ok(ko)
}

/// Copies the regular files of `src` into `dst` (recursively), replacing
/// changed ones and keeping Kbuild's outputs, so rebuilds stay incremental.
fn sync_dir(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst)?;
    for e in fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        if e.file_type()?.is_dir() {
            sync_dir(&from, &to)?;
        } else if fs::read(&to).ok() != Some(fs::read(&from)?) {
            fs::copy(&from, &to)?;
        }
    }
    Ok(())
}
