//! `cargo xtask package`: the Debian packages of a protected host
//! (docs/PACKAGING.md).
//!
//! - `linux-image-<release>`: the Trustbind kernel (production flavour),
//!   built by the kernel's own `make bindeb-pkg` and cached with the
//!   kernel build ([`kernel::ensure_deb`]);
//! - `trustbind-modules-<release>`: `trustbind.ko` for exactly that kernel
//!   (`/lib/modules/<release>/updates/`), `Provides: trustbind-modules`;
//! - `trustbind-agent`: the agent, its systemd unit and init script, its
//!   settings (`/etc/default`), the module's mode at boot
//!   (`/etc/modprobe.d`) and the maintainer scripts of `packaging/`;
//! - `trustbind-cli`: the administrator's `trustbind` with bash completion.
//!
//! Each package is a staging tree plus a `DEBIAN/` control directory,
//! packed by `dpkg-deb --build --root-owner-group`; library dependencies
//! come from `dpkg-shlibdeps`.

use crate::kernel::{self, Kernel};
use crate::sh;
use crate::Ctx;
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `Maintainer` of every package.
pub const MAINTAINER_NAME: &str = "Trustbind developers";
/// Its e-mail address.
pub const MAINTAINER_EMAIL: &str = "devel@trustbind.invalid";
/// Where the packages are written, below the cargo target directory.
const OUT_DIR: &str = "deb";

/// Which cargo profile the binaries come from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Profile {
    /// `cargo build --release`: what `cargo xtask package` ships.
    Release,
    /// The `dev` binaries `cargo xtask build` already made (the QEMU test's
    /// packages: the same packaging, no second compile of the workspace).
    Debug,
}

/// The built packages.
pub struct Debs {
    /// The directory holding the four `.deb` files.
    pub dir: PathBuf,
}

/// Builds the four packages for `kernel` (whose `trustbind.ko` is `kmod`).
pub fn build(ctx: &Ctx, kernel: &Kernel, kmod: &Path, profile: Profile) -> Result<Debs> {
    check_tools()?;
    let release = kernel::kernel_release(kernel)?;
    let image = kernel::ensure_deb(kernel)?;
    let bins = match profile {
        Profile::Release => {
            sh::run(
                "package: cargo build --release",
                crate::cargo().args([
                    "build",
                    "--release",
                    "-p",
                    "trustbind-agent",
                    "-p",
                    "trustbind-cli",
                    "--bins",
                ]),
            )?;
            ctx.target.join("release")
        }
        Profile::Debug => ctx.target.join("debug"),
    };
    let version = workspace_version(ctx)?;
    let arch = sh::output(
        "package: dpkg --print-architecture",
        Command::new("dpkg").arg("--print-architecture"),
    )?;
    let out = ctx.target.join(OUT_DIR);
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    let stage = out.join("stage");
    fs::create_dir_all(&stage)?;
    let src = ctx.root.join("packaging");
    let dist = ctx.root.join("agent/dist");
    let doc = |pkg: &str| format!("usr/share/doc/{pkg}/copyright");
    let copyright = copyright(ctx)?;

    // trustbind-modules-<release>
    let name = format!("trustbind-modules-{release}");
    let mut p = Pkg::new(&stage, &name)?;
    p.strip(
        kmod,
        &format!("lib/modules/{release}/updates/trustbind.ko"),
        0o644,
    )?;
    p.text(&doc(&name), &copyright, 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        let text = read(&src.join("trustbind-modules").join(script))?;
        p.script(script, &text.replace("@KVER@", &release))?;
    }
    p.control(&Control {
        version: &version,
        arch: &arch,
        depends: format!("kmod, linux-image-{release}"),
        extra: "Provides: trustbind-modules\n",
        description: &format!(
            "Trustbind PEM kernel module for Linux {release}\n \
             trustbind.ko, the policy enforcement module, built for the Trustbind\n \
             kernel {release} (package linux-image-{release}). Loaded by\n \
             trustbind-agent's postinst on an enrolled host, at boot by modprobe."
        ),
    })?;
    let modules = p.build(&out)?;

    // trustbind-agent
    let mut p = Pkg::new(&stage, "trustbind-agent")?;
    let agent = p.strip(
        &bins.join("trustbind-agent"),
        "usr/sbin/trustbind-agent",
        0o755,
    )?;
    // (source, place in the package, mode); every file below etc/ is a
    // conffile.
    let files = [
        (
            dist.join("trustbind-agent.service"),
            "lib/systemd/system/trustbind-agent.service",
            0o644,
        ),
        (
            dist.join("trustbind-agent.init"),
            "etc/init.d/trustbind-agent",
            0o755,
        ),
        (
            src.join("trustbind-agent/default"),
            "etc/default/trustbind-agent",
            0o644,
        ),
        (
            src.join("trustbind-agent/modprobe.conf"),
            "etc/modprobe.d/trustbind.conf",
            0o644,
        ),
        (
            dist.join("trustbind.modules-load.conf"),
            "etc/modules-load.d/trustbind.conf",
            0o644,
        ),
    ];
    for (from, to, mode) in &files {
        p.copy(from, to, *mode)?;
    }
    p.text(&doc("trustbind-agent"), &copyright, 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        p.script(script, &read(&src.join("trustbind-agent").join(script))?)?;
    }
    p.conffiles()?;
    p.control(&Control {
        version: &version,
        arch: &arch,
        depends: format!("{}, trustbind-modules, kmod", shlibs(&out, &agent)?),
        extra: "",
        description: "Trustbind host agent\n \
             Links the trustbind kernel module (PEM) to the Trustbind appliance:\n \
             enrols the host, relays the module's questions, follows the host's\n \
             mode and keeps an appliance-signed offline bundle. The postinst\n \
             never loads the module in enforce mode; the prerm refuses a removal\n \
             while the module enforces.",
    })?;
    let agent_deb = p.build(&out)?;

    // trustbind-cli
    let mut p = Pkg::new(&stage, "trustbind-cli")?;
    let cli = p.strip(&bins.join("trustbind"), "usr/bin/trustbind", 0o755)?;
    let completion = sh::output(
        "package: trustbind completions bash",
        Command::new(&cli).args(["completions", "bash"]),
    )?;
    p.text(
        "usr/share/bash-completion/completions/trustbind",
        &format!("{completion}\n"),
        0o644,
    )?;
    p.text(&doc("trustbind-cli"), &copyright, 0o644)?;
    p.control(&Control {
        version: &version,
        arch: &arch,
        depends: shlibs(&out, &cli)?,
        extra: "",
        description: "Trustbind administrator's command line\n \
             trustbind: policies, signatures, groups, hosts and enrolment tokens,\n \
             users, file sets, channels, audit and explain, over the\n \
             appliance's HTTPS admin API.",
    })?;
    let cli_deb = p.build(&out)?;

    let image_copy = out.join(image.file_name().context("no file name")?);
    fs::copy(&image, &image_copy)?;
    fs::remove_dir_all(&stage)?;
    for deb in [&image_copy, &modules, &agent_deb, &cli_deb] {
        let size = fs::metadata(deb)?.len();
        println!(
            "package: {} ({:.1} MiB)",
            deb.display(),
            size as f64 / 1048576.0
        );
    }
    Ok(Debs { dir: out })
}

fn check_tools() -> Result<()> {
    for tool in ["dpkg-deb", "dpkg-shlibdeps", "strip", "unshare"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            bail!("package: `{tool}` is missing; run `cargo xtask setup` (as root)");
        }
    }
    Ok(())
}

fn read(p: &Path) -> Result<String> {
    fs::read_to_string(p).with_context(|| format!("package: cannot read {}", p.display()))
}

/// The workspace's `version` (`[workspace.package]` of `Cargo.toml`).
fn workspace_version(ctx: &Ctx) -> Result<String> {
    let toml = read(&ctx.root.join("Cargo.toml"))?;
    let mut in_pkg = false;
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_pkg = line == "[workspace.package]";
        } else if in_pkg {
            if let Some(v) = line.strip_prefix("version") {
                let v = v.trim_start().trim_start_matches('=').trim();
                return Ok(v.trim_matches('"').to_owned());
            }
        }
    }
    bail!("package: no version in [workspace.package] of Cargo.toml")
}

/// `debian/copyright` of the packages (machine-readable format).
fn copyright(ctx: &Ctx) -> Result<String> {
    let toml = read(&ctx.root.join("Cargo.toml"))?;
    let license = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("license"))
        .map(|v| {
            v.trim_start()
                .trim_start_matches('=')
                .trim()
                .trim_matches('"')
        })
        .unwrap_or("GPL-2.0-only")
        .to_owned();
    Ok(format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: Trustbind\n\n\
         Files: *\nCopyright: Trustbind developers\nLicense: {license}\n \
         On Debian systems the full text is in /usr/share/common-licenses/GPL-2.\n"
    ))
}

/// `shlibs:Depends` of `bin` from `dpkg-shlibdeps` (it wants a
/// `debian/control` in its working directory).
fn shlibs(out: &Path, bin: &Path) -> Result<String> {
    let dir = out.join("shlibdeps");
    fs::create_dir_all(dir.join("debian"))?;
    fs::write(
        dir.join("debian/control"),
        "Source: trustbind\n\nPackage: trustbind\nArchitecture: any\n",
    )?;
    let text = sh::output(
        "package: dpkg-shlibdeps",
        Command::new("dpkg-shlibdeps")
            .current_dir(&dir)
            .arg("-O")
            .arg(bin),
    )?;
    fs::remove_dir_all(&dir)?;
    text.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_owned)
        .with_context(|| format!("package: dpkg-shlibdeps printed no shlibs:Depends: {text}"))
}

struct Control<'a> {
    version: &'a str,
    arch: &'a str,
    depends: String,
    /// Further fields, each line ending in a newline.
    extra: &'a str,
    /// Synopsis, then the extended description's lines (` `-indented).
    description: &'a str,
}

/// One package being staged.
struct Pkg {
    name: String,
    root: PathBuf,
}

impl Pkg {
    fn new(stage: &Path, name: &str) -> Result<Pkg> {
        let root = stage.join(name);
        fs::create_dir_all(root.join("DEBIAN"))?;
        Ok(Pkg {
            name: name.to_owned(),
            root,
        })
    }

    fn place(&self, rel: &str) -> Result<PathBuf> {
        let dst = self.root.join(rel);
        fs::create_dir_all(dst.parent().context("no parent")?)?;
        Ok(dst)
    }

    fn chmod(p: &Path, mode: u32) -> Result<()> {
        Ok(fs::set_permissions(p, fs::Permissions::from_mode(mode))?)
    }

    fn copy(&mut self, src: &Path, rel: &str, mode: u32) -> Result<PathBuf> {
        let dst = self.place(rel)?;
        fs::copy(src, &dst).with_context(|| format!("package: cannot copy {}", src.display()))?;
        Self::chmod(&dst, mode)?;
        Ok(dst)
    }

    /// A copy of `src` without debug information.
    fn strip(&mut self, src: &Path, rel: &str, mode: u32) -> Result<PathBuf> {
        let dst = self.place(rel)?;
        sh::run(
            &format!("package: strip {}", src.display()),
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&dst)
                .arg(src),
        )?;
        Self::chmod(&dst, mode)?;
        Ok(dst)
    }

    fn text(&mut self, rel: &str, text: &str, mode: u32) -> Result<()> {
        let dst = self.place(rel)?;
        fs::write(&dst, text)?;
        Self::chmod(&dst, mode)
    }

    fn script(&mut self, name: &str, text: &str) -> Result<()> {
        self.text(&format!("DEBIAN/{name}"), text, 0o755)
    }

    /// Every file below `etc/` is a conffile.
    fn conffiles(&mut self) -> Result<()> {
        let mut files = Vec::new();
        let mut stack = vec![self.root.join("etc")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d)? {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(&self.root)?;
                    files.push(format!("/{}\n", rel.display()));
                }
            }
        }
        files.sort();
        self.text("DEBIAN/conffiles", &files.concat(), 0o644)
    }

    fn control(&mut self, c: &Control) -> Result<()> {
        let kib = du_kib(&self.root)?;
        let text = format!(
            "Package: {}\nVersion: {}\nArchitecture: {}\nMaintainer: {MAINTAINER_NAME} <{MAINTAINER_EMAIL}>\n\
             Installed-Size: {kib}\nDepends: {}\n{}Section: admin\nPriority: optional\n\
             Description: {}\n",
            self.name, c.version, c.arch, c.depends, c.extra, c.description
        );
        self.text("DEBIAN/control", &text, 0o644)
    }

    /// `dpkg-deb --build`; returns the `.deb`.
    fn build(self, out: &Path) -> Result<PathBuf> {
        let before: Vec<PathBuf> = fs::read_dir(out)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        sh::output(
            &format!("package: dpkg-deb --build {}", self.name),
            Command::new("dpkg-deb")
                .args(["--root-owner-group", "-Zxz", "--build"])
                .arg(&self.root)
                .arg(out),
        )?;
        fs::read_dir(out)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                !before.contains(p)
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{}_", self.name)))
            })
            .with_context(|| format!("package: dpkg-deb left no {} package", self.name))
    }
}

/// Size of a tree in KiB (`Installed-Size`), without `DEBIAN/`.
fn du_kib(root: &Path) -> Result<u64> {
    let mut bytes = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                if e.file_name() != "DEBIAN" {
                    stack.push(e.path());
                }
            } else {
                bytes += m.len().div_ceil(1024) * 1024;
            }
        }
    }
    Ok(bytes / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maintainer_scripts_are_posix_sh() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
        for pkg in ["trustbind-agent", "trustbind-modules"] {
            for script in ["postinst", "prerm", "postrm"] {
                let p = root.join(pkg).join(script);
                let st = Command::new("sh").arg("-n").arg(&p).status().unwrap();
                assert!(st.success(), "{} does not parse", p.display());
            }
        }
    }
}
