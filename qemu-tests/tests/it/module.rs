//! `trustbind.ko` in one VM: load, self-test, device node, unload; and the
//! device protocol checked from user space by `tb-devcheck`.

use anyhow::{ensure, Context, Result};
use trustbind_qemu_tests::{Artifacts, Network, Vm};

use crate::kernel_lines;

const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const SHA1_ABC: &str = "a9993e364706816aba3e25717850c26c9cd0d89d";

/// Loads the module and checks its init lines (in a freshly cleared kernel
/// log, so an earlier load cannot satisfy the checks).
fn load(vm: &mut Vm) -> Result<()> {
    vm.run_ok("dmesg -C && insmod /tb/trustbind.ko")?;
    let dmesg = vm.run_ok("dmesg")?.stdout;
    let lines = kernel_lines(&dmesg);
    let has = |want: &str| lines.iter().any(|l| l.trim_end() == want);
    let drivers = lines
        .iter()
        .find_map(|l| l.strip_prefix("trustbind: sha256 driver: "))
        .context("no `trustbind: sha256 driver: <name>, sha1 driver: <name>` line in dmesg")?;
    let (s256, s1) = drivers
        .split_once(", sha1 driver: ")
        .with_context(|| format!("malformed driver line: {drivers:?}"))?;
    ensure!(
        s256.starts_with("sha256") && s1.trim_end().starts_with("sha1"),
        "implausible driver names {s256:?} / {s1:?}"
    );
    for want in [
        format!("trustbind: self-test sha256(\"abc\") = {SHA256_ABC} ok"),
        format!("trustbind: self-test sha1(\"abc\") = {SHA1_ABC} ok"),
        // The crypto API reproduces the appliance's channel ticket
        // (`proto::ticket_kat`): HKDF-SHA256 and AES-256-GCM agree.
        "trustbind: channel tickets: known answer passed (HKDF-SHA256, AES-256-GCM via the crypto API)"
            .to_string(),
        format!(
            "trustbind: /dev/trustbind ready (protocol v{})",
            trustbind_proto::VERSION
        ),
    ] {
        ensure!(has(&want), "dmesg lacks `{want}`; dmesg:\n{dmesg}");
    }
    ensure!(
        crate::exec::counter(vm, "ticket_self_test")? == 1,
        "debugfs ticket_self_test is not 1 (passed)"
    );
    let kind = vm.run_ok("stat -c %F /dev/trustbind")?.stdout;
    ensure!(
        kind.trim() == "character special file",
        "/dev/trustbind is a {:?}, not a character device",
        kind.trim()
    );
    Ok(())
}

/// Unloads the module and checks it left nothing behind.
fn unload(vm: &mut Vm) -> Result<()> {
    vm.run_ok("dmesg -C && rmmod trustbind")?;
    let dmesg = vm.run_ok("dmesg")?.stdout;
    ensure!(
        kernel_lines(&dmesg)
            .iter()
            .any(|l| l.trim_end() == "trustbind: unloaded"),
        "dmesg lacks `trustbind: unloaded` after rmmod"
    );
    let gone = vm.run("test -e /dev/trustbind")?;
    ensure!(gone.status != 0, "/dev/trustbind still exists after rmmod");
    let lsmod = vm.run_ok("cat /proc/modules")?.stdout;
    ensure!(
        !lsmod.lines().any(|l| l.starts_with("trustbind ")),
        "trustbind still in /proc/modules:\n{lsmod}"
    );
    Ok(())
}

#[test]
fn module_lifecycle() -> Result<()> {
    let art = Artifacts::from_env()?;
    let net = Network::new()?;
    let mut vm = net.vm("a").boot(&art)?;
    load(&mut vm)?;
    vm.check_health()?;
    unload(&mut vm)?;
    // Load twice: init after a clean exit must work again.
    load(&mut vm)?;
    unload(&mut vm)?;
    vm.shutdown()?;
    Ok(())
}

/// `tb-devcheck` (src/bin/tb-devcheck.rs) drives /dev/trustbind from user
/// space: open rules, record framing, errors, poll, blocking reads.
#[test]
fn device_protocol() -> Result<()> {
    let art = Artifacts::from_env()?;
    let net = Network::new()?;
    let mut vm = net
        .vm("a")
        .file("tb-devcheck", env!("CARGO_BIN_EXE_tb-devcheck"), 0o755)
        .boot(&art)?;
    load(&mut vm)?;
    let out = vm.run("/tb/tb-devcheck")?;
    ensure!(
        out.status == 0 && out.stdout.lines().any(|l| l == "devcheck: ok"),
        "tb-devcheck failed (status {}):\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    unload(&mut vm)?;
    vm.shutdown()?;
    Ok(())
}
