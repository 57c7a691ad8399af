//! The Debian packages of a protected host (`cargo xtask package`,
//! docs/PACKAGING.md), installed on the Debian guest the way an
//! administrator installs them, against the appliance image.
//!
//! The guest boots the kernel of the `linux-image-<release>` package (QEMU
//! `-kernel` with the package's `/boot/vmlinuz-<release>`, extracted on the
//! host: the guest image has no boot loader), so the package that `apt`
//! installs is the running kernel: its vmlinuz is compared with the booted
//! one and `trustbind-modules-<release>`'s module is the one `modprobe`
//! loads into it.
//!
//! Proves: `apt install ./…deb` of the kernel and the CLI and `dpkg -i` of
//! the module and the agent on a host that is not enrolled load and start
//! nothing; after enrolment `dpkg-reconfigure trustbind-agent` loads the
//! module in permissive mode and starts the agent through its init script;
//! the appliance's enforce mode reaches the module
//! (`/sys/module/trustbind/parameters/current_mode`); an approved program
//! runs and an unknown one is refused and audited; `dpkg -r` of the agent
//! and of the module is refused in enforce mode by their prerm (the scripts
//! themselves approved, as an administrator approves a package's files
//! before installing it on an enforcing host); in permissive mode
//! `dpkg -r` stops the agent, unloads the module and leaves none of the
//! packages' files, and `dpkg -P` removes the configuration and the
//! enrolment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use trustbind_qemu_tests::{ApplianceImage, Artifacts, Boot, Network, Vm};

use crate::common::{self, denied, export_audit, json_field, wait_for, STATE};

/// Where the packages are on the guest (the payload disk).
const DEBS: &str = "/tb/debs";
/// The module's mode, as the packages' scripts read it.
const CURRENT_MODE: &str = "/sys/module/trustbind/parameters/current_mode";

/// The one `.deb` in `dir` whose name starts with `prefix`.
fn find_deb(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "want one {prefix}*.deb in {}, found {found:?}",
            dir.display()
        ),
    }
}

/// `dpkg-deb -x` and `-e` of `deb` into `dir` (files and `DEBIAN/`).
fn extract(deb: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (flag, into) in [("-x", dir.to_owned()), ("-e", dir.join("DEBIAN"))] {
        let st = Command::new("dpkg-deb")
            .arg(flag)
            .arg(deb)
            .arg(&into)
            .status()?;
        ensure!(st.success(), "dpkg-deb {flag} {}", deb.display());
    }
    Ok(())
}

fn file_name(p: &Path) -> Result<String> {
    Ok(p.file_name()
        .and_then(|n| n.to_str())
        .context("no file name")?
        .to_owned())
}

/// The module's mode on the guest (`none` when it is not loaded).
fn current_mode(host: &mut Vm) -> Result<String> {
    let out = host.run(&format!("cat {CURRENT_MODE}"))?;
    Ok(match out.status {
        0 => out.stdout.trim().to_owned(),
        _ => "none".to_owned(),
    })
}

/// Waits until the agent reports `mode` and the module is in it.
fn wait_mode(host: &mut Vm, mode: &str) -> Result<()> {
    wait_for(
        host,
        &format!("{mode} mode"),
        &format!(
            "grep -q '\"mode\": \"{mode}\"' {STATE}/status.json \
             && grep -q '\"connected\": true' {STATE}/status.json \
             && grep -qx {mode} {CURRENT_MODE}"
        ),
        120,
    )
}

#[test]
fn debian_packages_install_enrol_remove() -> Result<()> {
    let art = Artifacts::from_env()?;
    let img = ApplianceImage::from_env()?;
    let debs = std::env::var_os("TRUSTBIND_DEBS")
        .map(PathBuf::from)
        .context("`TRUSTBIND_DEBS` (the Debian packages) is not set: run `cargo xtask test`")?;
    let work = tempfile::tempdir()?;
    let kernel_deb = find_deb(&debs, "linux-image-")?;
    let modules_deb = find_deb(&debs, "trustbind-modules-")?;
    let agent_deb = find_deb(&debs, "trustbind-agent_")?;
    let cli_deb = find_deb(&debs, "trustbind-cli_")?;
    let release = file_name(&kernel_deb)?
        .strip_prefix("linux-image-")
        .and_then(|r| r.split('_').next())
        .context("kernel package name")?
        .to_owned();
    ensure!(
        file_name(&modules_deb)?.starts_with(&format!("trustbind-modules-{release}_")),
        "the module package is not for kernel {release}"
    );
    let x = work.path().join("x");
    for deb in [&kernel_deb, &modules_deb, &agent_deb, &cli_deb] {
        extract(deb, &x.join(file_name(deb)?))?;
    }
    let vmlinuz = x
        .join(file_name(&kernel_deb)?)
        .join(format!("boot/vmlinuz-{release}"));
    let vmlinuz_sha = common::sha256_file(&vmlinuz)?;

    let net = Network::new()?;
    let mut appl = net.appliance("appl", &img, Boot::Disk)?;
    let mut b = net.vm("host");
    for deb in [&kernel_deb, &modules_deb, &agent_deb, &cli_deb] {
        b = b.file(format!("debs/{}", file_name(deb)?), deb, 0o644);
    }
    let host = b.start(&art.with_kernel(&vmlinuz))?;
    appl.wait_serving()?;
    let ip = appl.ip().to_string();
    let fp = appl.ca_fingerprint()?;
    let admin = appl.admin(&work.path().join("admin"))?;
    // The guest's programs, and every file of the packages (binaries and
    // maintainer scripts) as an administrator approves them before
    // installing on an enforcing host.
    let bins = common::provision(&admin, &art, work.path(), common::SYSTEM_PROGRAMS)?;
    admin.run(&["sig", "add", "-g", "system", &x.display().to_string()])?;
    let evil = common::modified_true(&bins, work.path(), "evil", "x")?;
    let evil = common::sha256_file(&evil)?;

    let mut host = host.wait_ready()?;
    let long = Duration::from_secs(300);
    let uname = host.run_ok("uname -r")?.stdout.trim().to_owned();
    ensure!(
        uname == release,
        "the guest runs {uname}, not the packaged {release}"
    );
    host.run_ok("cp /usr/bin/true /root/evil && printf x >>/root/evil && chmod 755 /root/evil")?;

    // Install: apt for the kernel and the CLI (local files; the guest has
    // no package lists), dpkg for the module and the agent.
    host.run_ok("mkdir -p /var/cache/apt/archives/partial /var/lib/apt/lists/partial")?;
    let out = host.run_timeout(
        &format!(
            "apt-get install -y --no-install-recommends {DEBS}/{} {DEBS}/{}",
            file_name(&kernel_deb)?,
            file_name(&cli_deb)?
        ),
        long,
    )?;
    ensure!(out.status == 0, "apt install: {out:?}");
    let out = host.run_timeout(
        &format!(
            "dpkg -i {DEBS}/{} {DEBS}/{}",
            file_name(&modules_deb)?,
            file_name(&agent_deb)?
        ),
        long,
    )?;
    ensure!(out.status == 0, "dpkg -i: {out:?}");
    ensure!(
        out.stdout.contains("not enrolled"),
        "postinst did not say the host is not enrolled: {out:?}"
    );
    ensure!(
        current_mode(&mut host)? == "none" && host.run("pidof trustbind-agent")?.status != 0,
        "an unenrolled host got the module loaded or the agent started"
    );

    // The kernel package is the running kernel; the module is for it.
    let sha = host.run_ok(&format!("sha256sum /boot/vmlinuz-{release}"))?;
    ensure!(
        sha.stdout.starts_with(&vmlinuz_sha),
        "installed vmlinuz differs from the booted one: {sha:?}"
    );
    host.run_ok(&format!(
        "test -f /boot/config-{release} && test -d /lib/modules/{release}/kernel"
    ))?;
    let vermagic = host.run_ok(&format!(
        "modinfo -F vermagic /lib/modules/{release}/updates/trustbind.ko"
    ))?;
    ensure!(
        vermagic.stdout.starts_with(&format!("{release} ")),
        "the module package's trustbind.ko is not for {release}: {vermagic:?}"
    );
    host.run_ok("modprobe --dry-run --first-time trustbind")?;
    host.run_ok(
        "trustbind --help >/dev/null && test -s /usr/share/bash-completion/completions/trustbind",
    )?;
    for f in [
        "/usr/sbin/trustbind-agent",
        "/etc/init.d/trustbind-agent",
        "/lib/systemd/system/trustbind-agent.service",
        "/etc/default/trustbind-agent",
        "/etc/modprobe.d/trustbind.conf",
        "/etc/modules-load.d/trustbind.conf",
    ] {
        host.run_ok(&format!("test -f {f}"))?;
    }

    // Enrol with the installed agent, then let the package finish: the
    // postinst loads the module (permissive) and the init script starts
    // the agent; the host group's enforce mode arrives from the appliance.
    let created = admin.run(&["-o", "json", "host", "enrol-token", "host1", "-g", "hosts"])?;
    let token = json_field(&created, "token").with_context(|| format!("no token in {created}"))?;
    host.run_ok(&format!(
        "TRUSTBIND_TOKEN={token} trustbind-agent enrol --appliance {ip} --name host1 --ca-fingerprint {fp}"
    ))?;
    // The TCG-sized deadlines, in the package's settings file.
    host.run_ok(
        "echo 'TRUSTBIND_AGENT_ARGS=\"--verdict-timeout-ms 30000 --call-timeout-ms 25000\"' \
         >>/etc/default/trustbind-agent",
    )?;
    // The administrator asked for enforce at boot: the postinst still
    // loads the module permissive (the agent has never connected).
    host.run_ok(
        "sed -i 's/^options trustbind mode=permissive/options trustbind mode=enforce/' \
         /etc/modprobe.d/trustbind.conf && grep -q '^options trustbind mode=enforce' \
         /etc/modprobe.d/trustbind.conf",
    )?;
    let out = host.run_timeout("dpkg-reconfigure trustbind-agent", long)?;
    ensure!(
        out.status == 0 && out.stdout.contains("in permissive mode"),
        "dpkg-reconfigure: {out:?}"
    );
    ensure!(
        common::dmesg_lines(&mut host)?
            .iter()
            .any(|l| l.contains("trustbind: mode Permissive at load")),
        "the postinst did not load the module in permissive mode"
    );
    wait_mode(&mut host, "enforce")?;
    host.run_ok("/etc/init.d/trustbind-agent status")?;

    // A decision each way.
    host.run_ok("/usr/bin/true")?;
    let out = host.run("/root/evil")?;
    ensure!(denied(&out), "unknown program not refused: {out:?}");
    common::ensure_decision(&export_audit(&admin)?, &evil)?;

    // Enforce: the prerms refuse.
    let out = host.run_timeout("dpkg -r trustbind-agent", long)?;
    ensure!(
        out.status != 0 && out.stderr.contains("refusing removal"),
        "dpkg -r trustbind-agent in enforce mode: {out:?}"
    );
    let out = host.run_timeout(
        &format!("dpkg -r --force-depends trustbind-modules-{release}"),
        long,
    )?;
    ensure!(
        out.status != 0 && out.stderr.contains("refusing removal"),
        "dpkg -r of the module in enforce mode: {out:?}"
    );
    // Still installed (the selection is `deinstall` after a failed -r).
    host.run_ok(&format!(
        "dpkg -s trustbind-agent trustbind-modules-{release} | grep -c '^Status: .* ok installed$' | grep -qx 2"
    ))?;
    wait_mode(&mut host, "enforce")?;
    let out = host.run("/root/evil")?;
    ensure!(
        denied(&out),
        "no longer enforcing after the refused removal: {out:?}"
    );

    // Permissive: removed cleanly.
    admin.run(&["host", "group", "set", "hosts", "--mode", "permissive"])?;
    wait_mode(&mut host, "permissive")?;
    let out = host.run_timeout(
        &format!("dpkg -r trustbind-agent trustbind-modules-{release} trustbind-cli"),
        long,
    )?;
    ensure!(out.status == 0, "dpkg -r in permissive mode: {out:?}");
    ensure!(
        host.run("pidof trustbind-agent")?.status != 0,
        "the agent still runs after dpkg -r"
    );
    ensure!(
        current_mode(&mut host)? == "none",
        "the module is still loaded after dpkg -r"
    );
    for f in [
        "/usr/sbin/trustbind-agent",
        "/usr/bin/trustbind",
        "/lib/systemd/system/trustbind-agent.service",
        "/usr/share/bash-completion/completions/trustbind",
    ] {
        host.run_ok(&format!("! test -e {f}"))?;
    }
    host.run_ok(&format!(
        "! test -e /lib/modules/{release}/updates/trustbind.ko"
    ))?;
    // `remove` keeps configuration and enrolment; `purge` removes them.
    host.run_ok(&format!("test -f {STATE}/cert.pem"))?;
    // (The module package has no conffiles, but its postrm keeps it in
    // `rc` state until purged, as dpkg does for every package with one.)
    let out = host.run_timeout(
        &format!("dpkg -P trustbind-agent trustbind-modules-{release}"),
        long,
    )?;
    ensure!(out.status == 0, "dpkg -P: {out:?}");
    for f in [
        STATE,
        "/etc/default/trustbind-agent",
        "/etc/init.d/trustbind-agent",
        "/etc/modprobe.d/trustbind.conf",
        "/etc/modules-load.d/trustbind.conf",
    ] {
        host.run_ok(&format!("! test -e {f}"))?;
    }
    // Status abbreviations: the second letter `n` is "not installed".
    let left = host.run_ok(
        "dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n' 'trustbind*' 2>/dev/null || true",
    )?;
    ensure!(
        left.stdout.lines().all(|l| l
            .split_whitespace()
            .nth(1)
            .is_some_and(|s| s.chars().nth(1) == Some('n'))),
        "trustbind packages left: {}",
        left.stdout
    );
    // Nothing enforces any more.
    host.run_ok("/root/evil")?;

    host.check_health()?;
    appl.check_health()?;
    host.shutdown()?;
    Ok(())
}
