//! Exec qualification by the PEM in a VM, answered by `tb-fakeagent`
//! (src/bin/tb-fakeagent.rs), which allows the SHA-256 of every system
//! program and of one script, and denies everything else.
//!
//! Proves: an approved program runs; an unapproved one gets `EACCES` in
//! enforce mode and runs with a "would be denied" report in permissive
//! mode; a `#!` script and its interpreter are qualified separately; the
//! in-kernel SHA-256 and SHA-1 equal `sha256sum`/`sha1sum` of the file; the
//! request carries the caller's uid, the euid a set-uid program runs with
//! (T-10), and the ancestry (the hash of the shell that ran the program
//! first); disabled mode asks nothing; the module
//! cannot be unloaded in enforce mode; the debugfs counters add up.
//!
//! `exec_verdict_cache` proves the in-kernel verdict cache: a repeated exec
//! is decided without the agent; a modified binary is re-hashed and denied;
//! another user is asked again; a policy generation change empties the
//! cache; the nice obligation applies to fresh and cached verdicts alike.

use anyhow::{bail, ensure, Context, Result};
use trustbind_qemu_tests::{Artifacts, Network, Vm};

use crate::kernel_lines;

pub(crate) const AGENT_LOG: &str = "/run/fakeagent.log";
/// The ELF loader every dynamically linked program of the guest names.
const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

/// Starts the fake agent in `mode` and waits until it configured the module.
/// Its verdicts are not cacheable, so every exec is asked.
fn start_agent(vm: &mut Vm, mode: &str) -> Result<()> {
    start_agent_with(vm, mode, "--no-cache --allow /tmp/x/ok.sh")
}

/// Same, with `extra` arguments for tb-fakeagent.
pub(crate) fn start_agent_with(vm: &mut Vm, mode: &str, extra: &str) -> Result<()> {
    start_agent_in(vm, "{}", mode, extra)
}

/// Same, the agent's command line put in the shell command `wrap` in place
/// of its `{}`.
pub(crate) fn start_agent_in(vm: &mut Vm, wrap: &str, mode: &str, extra: &str) -> Result<()> {
    vm.run_ok(&format!("rm -f {AGENT_LOG}"))?;
    vm.spawn_bg(&wrap.replace(
        "{}",
        &format!(
            "exec /tb/tb-fakeagent --mode {mode} --timeout-ms 10000 \
         --allow-dir /usr/bin --allow-dir /usr/sbin --allow-dir /tb --allow {LOADER} \
         {extra} --log {AGENT_LOG}"
        ),
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
pub(crate) fn stop_agent(vm: &mut Vm) -> Result<()> {
    vm.run_ok("pkill -TERM -x tb-fakeagent")?;
    for _ in 0..60 {
        if vm.run(&format!("grep -q '^stopped' {AGENT_LOG}"))?.status == 0 {
            return Ok(());
        }
        vm.run_ok("sleep 0.5")?;
    }
    bail!("tb-fakeagent did not stop")
}

/// How many requests about `path` the agent saw.
fn requests_for(vm: &mut Vm, path: &str) -> Result<usize> {
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    Ok(log
        .lines()
        .filter(|l| l.starts_with(&format!("exec {path} ")))
        .count())
}

/// A debugfs counter of the exec path.
fn stat(vm: &mut Vm, name: &str) -> Result<u64> {
    counter(vm, &format!("exec_{name}"))
}

/// The module's debugfs counter `name` (`/sys/kernel/debug/trustbind/`).
pub(crate) fn counter(vm: &mut Vm, name: &str) -> Result<u64> {
    vm.run_ok("mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug")?;
    let out = vm.run_ok(&format!("cat /sys/kernel/debug/trustbind/{name}"))?;
    out.stdout
        .trim()
        .parse()
        .with_context(|| format!("{name}: {:?}", out.stdout))
}

/// The agent's log line for the request about `path`, if any.
fn request_for(vm: &mut Vm, path: &str) -> Result<Option<String>> {
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    Ok(log
        .lines()
        .find(|l| l.starts_with(&format!("exec {path} ")))
        .map(str::to_owned))
}

/// The value of `name=` in a log line.
pub(crate) fn field<'a>(line: &'a str, name: &str) -> Result<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .with_context(|| format!("no {name}= in {line:?}"))
}

/// A host VM with `tb-fakeagent` in its payload and the module loaded.
pub(crate) fn host_with_module() -> Result<Vm> {
    let art = Artifacts::from_env()?;
    let net = Network::new()?;
    let mut vm = net
        .vm("a")
        .file("tb-fakeagent", env!("CARGO_BIN_EXE_tb-fakeagent"), 0o755)
        .boot(&art)?;
    vm.run_ok("insmod /tb/trustbind.ko")?;
    Ok(vm)
}

#[test]
fn exec_qualification() -> Result<()> {
    let mut vm = host_with_module()?;
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
    // script, by the loader gate when the exec opens it (so under the name
    // of the file it opened: /bin/sh is a link to dash).
    let pid = field(&script, "pid")?.to_owned();
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    let after_script = log
        .lines()
        .skip_while(|l| !l.starts_with("exec /tmp/x/ok.sh "));
    let interp = after_script
        .filter(|l| l.starts_with("exec /usr/bin/dash "))
        .find(|l| field(l, "pid").is_ok_and(|p| p == pid))
        .with_context(|| format!("interpreter /bin/sh not qualified for pid {pid}:\n{log}"))?;
    ensure!(interp.ends_with("-> allow"), "{interp}");
    let id = request_for(&mut vm, "/usr/bin/id")?.context("no request for id")?;
    ensure!(field(&id, "uid")? == "65534", "uid not carried: {id}");
    ensure!(field(&id, "euid")? == "65534", "euid: {id}");
    // A set-uid program is asked with the euid it will run with (its
    // owner's), which the kernel applies only after the module asked
    // (T-10).
    vm.run_ok(
        "mkdir -p /usr/local/bin && cp /usr/bin/id /usr/local/bin/suid-id \
         && chmod 4755 /usr/local/bin/suid-id",
    )?;
    let out =
        vm.run("setpriv --reuid=65534 --regid=65534 --clear-groups /usr/local/bin/suid-id -u")?;
    ensure!(
        out.status == 0 && out.stdout.trim() == "0",
        "set-uid id did not run as root: {out:?}"
    );
    let suid = request_for(&mut vm, "/usr/local/bin/suid-id")?.context("no request for suid-id")?;
    ensure!(
        field(&suid, "uid")? == "65534" && field(&suid, "euid")? == "0",
        "set-uid exec asked with the caller's euid: {suid}"
    );

    // Ancestry: a program run by a shell names the shell's hash first (the
    // trailing `:` makes the shell fork instead of exec'ing in place).
    vm.run_ok("/bin/sh -c '/usr/bin/expr 1 >/dev/null; :'")?;
    let expr = request_for(&mut vm, "/usr/bin/expr")?.context("no request for expr")?;
    let sh = vm.run_ok("sha256sum /usr/bin/dash")?.stdout;
    let sh = sh.split_whitespace().next().unwrap_or_default();
    let anc: Vec<&str> = field(&expr, "anc")?.split(',').collect();
    ensure!(
        anc.first() == Some(&sh),
        "ancestry does not start with /bin/sh ({sh}): {expr}"
    );
    ensure!(
        anc.len() >= 2 && anc.len() <= 8,
        "ancestry depth {}: {expr}",
        anc.len()
    );

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
    // unanswered, every exec either asked or answered from the cache.
    let (asked, hits) = (stat(&mut vm, "asked")?, stat(&mut vm, "cache_hits")?);
    let allowed = stat(&mut vm, "allowed")?;
    let (denied, would_deny) = (stat(&mut vm, "denied")?, stat(&mut vm, "would_deny")?);
    ensure!(
        denied == 1 && would_deny == 1,
        "denied {denied}, would_deny {would_deny}"
    );
    ensure!(allowed >= 4, "only {allowed} allowed execs counted");
    ensure!(
        asked + hits == allowed + denied + would_deny,
        "asked {asked} + cache hits {hits} != allowed {allowed} + denied {denied} + would_deny {would_deny}"
    );
    for zero in ["no_agent", "timeouts", "unreadable"] {
        let n = stat(&mut vm, zero)?;
        ensure!(n == 0, "exec_{zero} is {n}");
    }

    vm.run_ok("rmmod trustbind")?;
    vm.shutdown()?;
    Ok(())
}

/// Replaces the one occurrence of `from` in `bin` by `to` (same length).
pub(crate) fn patch_once(bin: &mut [u8], from: &[u8], to: &[u8]) -> Result<()> {
    ensure!(from.len() == to.len(), "patch changes the length");
    let hits: Vec<usize> = bin
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from)
        .map(|(i, _)| i)
        .collect();
    ensure!(hits.len() == 1, "{} occurrences of the pattern", hits.len());
    bin[hits[0]..hits[0] + to.len()].copy_from_slice(to);
    Ok(())
}

/// The loader gate: what an exec opens itself once under way is qualified
/// like a program. An approved program whose `PT_INTERP` names an
/// unapproved loader is refused; a binfmt_misc interpreter is qualified
/// (approved: runs, and the handler's next round does not ask again;
/// unapproved: `EACCES`); the loader run as the program (`ld.so ./prog`)
/// is flagged, and refused by an agent that refuses such execs.
#[test]
fn exec_loader_gate() -> Result<()> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut vm = host_with_module()?;

    // A copy of `true` whose PT_INTERP names a modified (unapproved) copy
    // of the loader at a path of the same length.
    let orig = vm.run_ok("base64 -w0 /usr/bin/true")?.stdout;
    let mut bin = b64.decode(orig.trim()).context("base64 of /usr/bin/true")?;
    patch_once(
        &mut bin,
        b"/lib64/ld-linux-x86-64.so.2\0",
        b"/tmp/x/ld-linux-x86-64.so.2\0",
    )?;
    vm.run_ok(&format!(
        "mkdir -p /tmp/x && echo {} | base64 -d >/tmp/x/true-l && chmod 755 /tmp/x/true-l \
         && cp {LOADER} /tmp/x/ld-linux-x86-64.so.2 && printf x >>/tmp/x/ld-linux-x86-64.so.2",
        b64.encode(&bin)
    ))?;
    // binfmt_misc: files ending in .tbok run through an approved copy of
    // cat, files ending in .tbbad through a modified one.
    vm.run_ok(
        "mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc none /proc/sys/fs/binfmt_misc; \
         cp /usr/bin/cat /tmp/x/cat-ok && cp /usr/bin/cat /tmp/x/cat-bad && printf x >>/tmp/x/cat-bad \
         && echo ':tbok:E::tbok::/tmp/x/cat-ok:' >/proc/sys/fs/binfmt_misc/register \
         && echo ':tbbad:E::tbbad::/tmp/x/cat-bad:' >/proc/sys/fs/binfmt_misc/register \
         && printf 'misc-ran\n' >/tmp/x/f.tbok && cp /tmp/x/f.tbok /tmp/x/f.tbbad \
         && chmod 755 /tmp/x/f.tbok /tmp/x/f.tbbad",
    )?;
    start_agent_with(
        &mut vm,
        "enforce",
        "--no-cache --allow /tmp/x/true-l --allow /tmp/x/f.tbok",
    )?;

    // The program is approved, its loader is not.
    let out = vm.run("/tmp/x/true-l")?;
    ensure!(
        out.status == 126 && out.stderr.contains("Permission denied"),
        "program with an unapproved loader was not refused: {out:?}"
    );
    let req = request_for(&mut vm, "/tmp/x/true-l")?.context("program not qualified")?;
    ensure!(req.ends_with("-> allow"), "{req}");
    let ld =
        request_for(&mut vm, "/tmp/x/ld-linux-x86-64.so.2")?.context("loader not qualified")?;
    ensure!(ld.ends_with("-> deny"), "{ld}");
    let sum = vm.run_ok("sha256sum /tmp/x/ld-linux-x86-64.so.2")?.stdout;
    ensure!(
        field(&ld, "sha256")? == sum.split_whitespace().next().unwrap_or_default(),
        "in-kernel SHA-256 of the loader differs from sha256sum: {ld}"
    );
    // The approved loader lets approved programs run.
    vm.run_ok("/usr/bin/true")?;

    // binfmt_misc interpreters.
    let dedup = stat(&mut vm, "loader_dedup")?;
    let out = vm.run_ok("/tmp/x/f.tbok")?;
    ensure!(
        out.stdout.trim() == "misc-ran",
        "binfmt_misc output {out:?}"
    );
    let ok = request_for(&mut vm, "/tmp/x/cat-ok")?.context("interpreter not qualified")?;
    ensure!(ok.ends_with("-> allow"), "{ok}");
    ensure!(
        requests_for(&mut vm, "/tmp/x/cat-ok")? == 1,
        "the interpreter was asked twice in one exec"
    );
    ensure!(
        stat(&mut vm, "loader_dedup")? > dedup,
        "the handler's interpreter round was not recognised"
    );
    let out = vm.run("/tmp/x/f.tbbad")?;
    ensure!(
        out.status == 126 && out.stderr.contains("Permission denied"),
        "unapproved binfmt_misc interpreter was not refused: {out:?}"
    );
    let dmesg = vm.run_ok("dmesg")?.stdout;
    for want in [
        "trustbind: exec (loader) denied: /tmp/x/ld-linux-x86-64.so.2 (denied by policy)",
        "trustbind: exec (loader) denied: /tmp/x/cat-bad (denied by policy)",
    ] {
        ensure!(
            kernel_lines(&dmesg).iter().any(|l| l.trim_end() == want),
            "no line {want:?} in dmesg:\n{dmesg}"
        );
    }
    ensure!(
        stat(&mut vm, "loader_opens")? >= 4,
        "loader opens not counted"
    );

    // `ld.so ./prog`: the loader run as the program (the kernel learned it
    // as a PT_INTERP loader above) is asked with the flag, never from the
    // cache, and a policy can refuse it while the loader as every
    // program's loader stays allowed.
    vm.run_ok(&format!("{LOADER} /usr/bin/true"))?;
    let direct = request_for(&mut vm, LOADER)?.context("direct loader exec not asked")?;
    ensure!(
        direct.contains(" direct=1 ") && direct.ends_with("-> allow"),
        "{direct}"
    );
    stop_agent(&mut vm)?;
    start_agent_with(&mut vm, "enforce", "--deny-loader-direct")?;
    vm.run_ok("/usr/bin/true")?;
    for round in 0..2 {
        let out = vm.run(&format!("{LOADER} /usr/bin/true"))?;
        ensure!(
            out.status == 126 && out.stderr.contains("Permission denied"),
            "round {round}: the loader run directly was not refused: {out:?}"
        );
    }
    ensure!(
        stat(&mut vm, "loader_direct")? >= 3,
        "direct loader execs not counted"
    );

    stop_agent(&mut vm)?;
    vm.run_ok("echo -1 >/proc/sys/fs/binfmt_misc/tbok; echo -1 >/proc/sys/fs/binfmt_misc/tbbad")?;
    vm.run_ok("rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}

#[test]
fn exec_verdict_cache() -> Result<()> {
    let mut vm = host_with_module()?;
    // On the ext4 root, which has change cookies: copies of approved
    // programs (same hash, so allowed) under new paths.
    vm.run_ok(
        "mkdir -p /root/c && cp /usr/bin/true /root/c/prog && cp /usr/bin/true /root/c/prog2 \
         && cp /usr/bin/nice /root/c/niced",
    )?;
    start_agent_with(&mut vm, "enforce", "--nice-path /root/c/niced:10")?;

    // Asked once, then answered from the cache.
    vm.run_ok("/root/c/prog")?;
    vm.run_ok("/root/c/prog")?;
    vm.run_ok("/root/c/prog")?;
    ensure!(
        requests_for(&mut vm, "/root/c/prog")? == 1,
        "repeated exec was asked again"
    );
    ensure!(stat(&mut vm, "cache_hits")? >= 2, "no cache hits counted");

    // Modified after approval: re-hashed, re-decided, denied (and the denial
    // is cached in turn).
    vm.run_ok("printf x >>/root/c/prog")?;
    for _ in 0..2 {
        let out = vm.run("/root/c/prog")?;
        ensure!(
            out.status == 126 && out.stderr.contains("Permission denied"),
            "modified binary not refused: {out:?}"
        );
    }
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    let prog: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("exec /root/c/prog "))
        .collect();
    ensure!(
        prog.len() == 2,
        "modified binary asked {} times:\n{log}",
        prog.len()
    );
    ensure!(
        prog[1].ends_with("-> deny") && field(prog[0], "sha256")? != field(prog[1], "sha256")?,
        "the modified binary was not re-hashed: {prog:?}"
    );

    // Another user is another context class: asked again.
    vm.run_ok("/root/c/prog2")?;
    vm.run_ok("setpriv --reuid=65534 --regid=65534 --clear-groups /root/c/prog2")?;
    vm.run_ok("/root/c/prog2")?;
    ensure!(
        requests_for(&mut vm, "/root/c/prog2")? == 2,
        "user change did not miss"
    );

    // A policy generation change empties the cache.
    let flushes = stat(&mut vm, "cache_flushes")?;
    vm.run_ok("pkill -USR1 -x tb-fakeagent")?;
    let mut moved = false;
    for _ in 0..60 {
        if vm
            .run(&format!("grep -q '^generation 2' {AGENT_LOG}"))?
            .status
            == 0
        {
            moved = true;
            break;
        }
        vm.run_ok("sleep 0.5")?;
    }
    ensure!(moved, "tb-fakeagent did not move the generation");
    vm.run_ok("/root/c/prog2")?;
    ensure!(
        requests_for(&mut vm, "/root/c/prog2")? == 3,
        "no re-ask after a generation change"
    );
    ensure!(
        stat(&mut vm, "cache_flushes")? > flushes,
        "flush not counted"
    );

    // The nice obligation holds for the fresh verdict and the cached one.
    for round in 0..2 {
        let out = vm.run_ok("/root/c/niced")?;
        ensure!(out.stdout.trim() == "10", "round {round}: niceness {out:?}");
    }
    ensure!(
        requests_for(&mut vm, "/root/c/niced")? == 1,
        "nice verdict not cached"
    );

    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    vm.shutdown()?;
    Ok(())
}
