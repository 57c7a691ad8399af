//! Exec qualification by the PEM in a VM, answered by `tb-fakeagent`
//! (src/bin/tb-fakeagent.rs), which allows the SHA-256 of every system
//! program and of one script, and denies everything else.
//!
//! Proves: an approved program runs; an unapproved one gets `EACCES` in
//! enforce mode and runs with a "would be denied" report in permissive
//! mode; a `#!` script and its interpreter are qualified separately; the
//! in-kernel SHA-256 and SHA-1 equal `sha256sum`/`sha1sum` of the file; the
//! request carries the caller's uid; disabled mode asks nothing; the module
//! cannot be unloaded in enforce mode; the debugfs counters add up.

use anyhow::{bail, ensure, Context, Result};
use trustbind_qemu_tests::{Artifacts, Network, Vm};

use crate::kernel_lines;

const AGENT_LOG: &str = "/run/fakeagent.log";

/// Starts the fake agent in `mode` and waits until it configured the module.
fn start_agent(vm: &mut Vm, mode: &str) -> Result<()> {
    vm.run_ok(&format!("rm -f {AGENT_LOG}"))?;
    vm.spawn_bg(&format!(
        "exec /tb/tb-fakeagent --mode {mode} --timeout-ms 10000 \
         --allow-dir /usr/bin --allow-dir /usr/sbin --allow-dir /tb \
         --allow /tmp/x/ok.sh --log {AGENT_LOG}"
    ))?;
    for _ in 0..120 {
        if vm.run(&format!("grep -q '^ready' {AGENT_LOG}"))?.status == 0 {
            return Ok(());
        }
        vm.run_ok("sleep 0.5")?;
    }
    let log = vm.run(&format!("cat {AGENT_LOG}"))?.stdout;
    bail!("tb-fakeagent never became ready; its log:\n{log}")
}

/// Stops the fake agent; it sets the module to disabled mode on the way.
fn stop_agent(vm: &mut Vm) -> Result<()> {
    vm.run_ok("pkill -TERM -x tb-fakeagent")?;
    for _ in 0..60 {
        if vm.run(&format!("grep -q '^stopped' {AGENT_LOG}"))?.status == 0 {
            return Ok(());
        }
        vm.run_ok("sleep 0.5")?;
    }
    bail!("tb-fakeagent did not stop")
}

/// The agent's log line for the request about `path`, if any.
fn request_for(vm: &mut Vm, path: &str) -> Result<Option<String>> {
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    Ok(log
        .lines()
        .find(|l| l.starts_with(&format!("exec {path} ")))
        .map(str::to_owned))
}

fn field<'a>(line: &'a str, name: &str) -> Result<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .with_context(|| format!("no {name}= in {line:?}"))
}

#[test]
fn exec_qualification() -> Result<()> {
    let art = Artifacts::from_env()?;
    let net = Network::new()?;
    let mut vm = net
        .vm("a")
        .file("tb-fakeagent", env!("CARGO_BIN_EXE_tb-fakeagent"), 0o755)
        .boot(&art)?;
    vm.run_ok("insmod /tb/trustbind.ko")?;
    // An unapproved program (a one-byte-longer copy of true) and a script.
    vm.run_ok(
        "mkdir -p /tmp/x && cp /usr/bin/true /tmp/x/evil && printf x >>/tmp/x/evil \
         && printf '#!/bin/sh\\necho script-ran\\n' >/tmp/x/ok.sh \
         && chmod 755 /tmp/x/evil /tmp/x/ok.sh",
    )?;

    // Disabled (the state at load): nothing is asked, everything runs.
    let out = vm.run("/tmp/x/evil")?;
    ensure!(out.status == 0, "disabled mode refused an exec: {out:?}");

    // Enforce.
    start_agent(&mut vm, "enforce")?;
    let out = vm.run("/tmp/x/evil")?;
    ensure!(
        out.status == 126 && out.stderr.contains("Permission denied"),
        "unapproved program was not refused with EACCES: {out:?}"
    );
    vm.run_ok("/usr/bin/true")?;
    let out = vm.run_ok("/tmp/x/ok.sh")?;
    ensure!(out.stdout.trim() == "script-ran", "script output {out:?}");
    let out = vm.run("setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/id -u")?;
    ensure!(
        out.status == 0 && out.stdout.trim() == "65534",
        "setpriv: {out:?}"
    );
    // Enforce mode pins the module: it cannot be unloaded behind policy.
    let out = vm.run("rmmod trustbind")?;
    ensure!(
        out.status != 0 && out.stderr.contains("in use"),
        "rmmod succeeded or failed oddly in enforce mode: {out:?}"
    );
    let dmesg = vm.run_ok("dmesg")?.stdout;
    ensure!(
        kernel_lines(&dmesg)
            .iter()
            .any(|l| l.trim_end() == "trustbind: exec denied: /tmp/x/evil (denied by policy)"),
        "no denial line in dmesg:\n{dmesg}"
    );

    // The requests as the agent saw them.
    let evil = request_for(&mut vm, "/tmp/x/evil")?.context("no request for /tmp/x/evil")?;
    ensure!(evil.ends_with("-> deny"), "{evil}");
    let sums = vm
        .run_ok("sha256sum /tmp/x/evil; sha1sum /tmp/x/evil")?
        .stdout;
    let mut sums = sums
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""));
    ensure!(
        field(&evil, "sha256")? == sums.next().unwrap_or_default(),
        "in-kernel SHA-256 differs from sha256sum: {evil}"
    );
    ensure!(
        field(&evil, "sha1")? == sums.next().unwrap_or_default(),
        "in-kernel SHA-1 differs from sha1sum: {evil}"
    );
    let size = vm.run_ok("stat -c %s /tmp/x/evil")?.stdout;
    ensure!(field(&evil, "size")? == size.trim(), "size: {evil}");
    let script = request_for(&mut vm, "/tmp/x/ok.sh")?.context("script not qualified")?;
    ensure!(script.ends_with("-> allow"), "{script}");
    // The interpreter is qualified in the same exec (same pid), after the
    // script.
    let pid = field(&script, "pid")?.to_owned();
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    let after_script = log
        .lines()
        .skip_while(|l| !l.starts_with("exec /tmp/x/ok.sh "));
    let interp = after_script
        .filter(|l| l.starts_with("exec /bin/sh "))
        .find(|l| field(l, "pid").is_ok_and(|p| p == pid))
        .with_context(|| format!("interpreter /bin/sh not qualified for pid {pid}:\n{log}"))?;
    ensure!(interp.ends_with("-> allow"), "{interp}");
    let id = request_for(&mut vm, "/usr/bin/id")?.context("no request for id")?;
    ensure!(field(&id, "uid")? == "65534", "uid not carried: {id}");

    stop_agent(&mut vm)?;
    let out = vm.run("/tmp/x/evil")?;
    ensure!(out.status == 0, "disabled again, yet refused: {out:?}");

    // Permissive: runs, reported.
    start_agent(&mut vm, "permissive")?;
    let out = vm.run("/tmp/x/evil")?;
    ensure!(out.status == 0, "permissive mode refused an exec: {out:?}");
    let dmesg = vm.run_ok("dmesg")?.stdout;
    ensure!(
        kernel_lines(&dmesg)
            .iter()
            .any(|l| l.trim_end()
                == "trustbind: exec would be denied: /tmp/x/evil (denied by policy)"),
        "no would-deny line in dmesg:\n{dmesg}"
    );
    stop_agent(&mut vm)?;

    // The counters in debugfs add up: one refusal in each mode, nothing
    // unanswered, every asked exec accounted for.
    vm.run_ok("mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug")?;
    let mut stat = |name: &str| -> Result<u64> {
        let out = vm.run_ok(&format!("cat /sys/kernel/debug/trustbind/exec_{name}"))?;
        out.stdout
            .trim()
            .parse()
            .with_context(|| format!("exec_{name}: {:?}", out.stdout))
    };
    let (asked, allowed) = (stat("asked")?, stat("allowed")?);
    let (denied, would_deny) = (stat("denied")?, stat("would_deny")?);
    ensure!(
        denied == 1 && would_deny == 1,
        "denied {denied}, would_deny {would_deny}"
    );
    ensure!(allowed >= 4, "only {allowed} allowed execs counted");
    ensure!(
        asked == allowed + denied + would_deny,
        "asked {asked} != allowed {allowed} + denied {denied} + would_deny {would_deny}"
    );
    for zero in ["no_agent", "timeouts", "unreadable"] {
        let n = stat(zero)?;
        ensure!(n == 0, "exec_{zero} is {n}");
    }

    vm.run_ok("rmmod trustbind")?;
    vm.shutdown()?;
    Ok(())
}
