//! Attacks on enforce mode by an unprivileged local user, each run for real
//! in a VM against the PEM (answered by `tb-fakeagent`). Every test here
//! failed on the module before the defence it names (the threat-model row
//! it closes, `docs/THREAT-MODEL.md`, is in each test's doc).
//!
//! - `attack_loader_copies`: a copy of the ELF loader run as the program
//!   (T-01..T-03), and a modified loader bind-mounted from a fresh tmpfs in
//!   a user + mount namespace over the loader path (T-04, T-05); refusal
//!   log lines are rate-limited while every refusal is counted (T-41).
//! - `attack_loader_gate_never_blocks_inotify`: a loader whose verdict
//!   takes long does not hold up inotify closes host-wide (T-32).
//! - `attack_failed_exec_keeps_lineage`: an allowed exec that then fails
//!   does not credit the process with the program (T-06).
//! - `attack_reparented_lineage`: a double-forked process reparented to
//!   init is credited with the program it runs, not init's (T-07).
//! - `attack_exe_file_swap`: a process that points its `mm->exe_file` at
//!   an approved program (`PR_SET_MM_EXE_FILE`) is refused in enforce mode,
//!   and its forked child is never credited with that program (T-43).
//! - `attack_queue_flood`: one user flooding the queue to the agent gets
//!   neither everybody's execs refused nor delayed, and permissive mode
//!   never refuses (T-33, T-34).
//! - `attack_channel_key_read`: the owner of a bound socket cannot read
//!   its channel key with getsockopt (T-35).
//! - `attack_mptcp`: MPTCP connects and accepts are qualified like TCP,
//!   and one that must be a channel is refused (T-18).
//! - `attack_boot_window`: loaded with `mode=enforce agent=PATH`, the
//!   module enforces before any agent connected (T-22, module half).
//! - `attack_unix_before_verdict`: a refused UNIX client cannot get bytes
//!   to the listener while its connect waits for the verdict (T-20).
//! - `attack_smc`: SMC sockets, whose TCP connection is a kernel socket,
//!   are refused while connections are qualified (T-19).
//! - `attack_fuse_exec`: a program on a FUSE mount is refused, though the
//!   same bytes are approved elsewhere (T-09).

use anyhow::{ensure, Context, Result};
use base64::Engine;
use trustbind_qemu_tests::Vm;

use crate::common::denied;
use crate::exec::{
    counter, field, host_with_module, patch_once, start_agent_with, stop_agent, AGENT_LOG,
};
use crate::kernel_lines;

/// The ELF loader every dynamically linked program of the guest names.
const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";
/// Stops the agent, unloads the module, checks the kernel's health and
/// shuts the VM down.
fn finish(mut vm: Vm) -> Result<()> {
    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}

/// Runs `cmd` as the unprivileged user 65534 (nobody).
fn as_nobody(cmd: &str) -> String {
    format!("setpriv --reuid=65534 --regid=65534 --clear-groups sh -c '{cmd}'")
}

/// The fake agent's log lines about exec'ing `path`.
fn exec_lines(vm: &mut Vm, path: &str) -> Result<Vec<String>> {
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    Ok(log
        .lines()
        .filter(|l| l.starts_with(&format!("exec {path} ")))
        .map(str::to_owned)
        .collect())
}

/// Writes a copy of `/usr/bin/true` to `dst` whose `PT_INTERP` names
/// `interp` (as long as the real loader's path).
fn true_with_interp(vm: &mut Vm, dst: &str, interp: &str) -> Result<()> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let orig = vm.run_ok("base64 -w0 /usr/bin/true")?.stdout;
    let mut bin = b64.decode(orig.trim()).context("base64 of /usr/bin/true")?;
    let mut to = interp.as_bytes().to_vec();
    to.push(0);
    patch_once(&mut bin, format!("{LOADER}\0").as_bytes(), &to)?;
    vm.run_ok(&format!(
        "mkdir -p /tmp/x && echo {} | base64 -d >{dst} && chmod 755 {dst}",
        b64.encode(&bin)
    ))?;
    Ok(())
}

/// The smallest i386 dynamic loader image `proto::elf` must recognise: an
/// ELF32 little-endian `ET_DYN` for `EM_386` with a `PT_LOAD`, a
/// `PT_DYNAMIC` naming a `DT_SONAME`, and no `PT_INTERP` (what
/// `/lib/ld-linux.so.2` looks like to the module).
fn elf32_loader() -> Vec<u8> {
    let mut f = vec![0u8; 0x800];
    let put16 =
        |f: &mut Vec<u8>, at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // ELFCLASS32
    f[5] = 1; // little-endian
    f[6] = 1; // EV_CURRENT
    put16(&mut f, 16, 3); // ET_DYN
    put16(&mut f, 18, 3); // EM_386
    put32(&mut f, 20, 1);
    put32(&mut f, 28, 0x100); // e_phoff
    put16(&mut f, 40, 52); // e_ehsize
    put16(&mut f, 42, 32); // e_phentsize
    put16(&mut f, 44, 2); // e_phnum
                          // PT_LOAD of the whole file, then PT_DYNAMIC at 0x400.
    for (i, (ty, off, size)) in [(1u32, 0u32, 0x800u32), (2, 0x400, 0x100)]
        .into_iter()
        .enumerate()
    {
        let at = 0x100 + i * 32;
        put32(&mut f, at, ty);
        put32(&mut f, at + 4, off);
        put32(&mut f, at + 16, size);
        put32(&mut f, at + 20, size);
    }
    // DT_STRTAB (5) at 0x600, DT_SONAME (14) "ld-linux.so.2", DT_NULL.
    for (i, (tag, val)) in [(5u32, 0x600u32), (14, 1), (0, 0)].into_iter().enumerate() {
        put32(&mut f, 0x400 + i * 8, tag);
        put32(&mut f, 0x404 + i * 8, val);
    }
    f[0x601..0x601 + 13].copy_from_slice(b"ld-linux.so.2");
    f
}

/// A copy of the loader, wherever it lives and whoever made it, is the
/// loader run as the program: asked with `direct=1`, never answered from
/// the cache, refused by a policy that refuses such execs; a 32-bit loader
/// too. A modified
/// loader bind-mounted from a fresh tmpfs inside a user + mount namespace
/// over the path every program names is still qualified (and refused).
#[test]
fn attack_loader_copies() -> Result<()> {
    let mut vm = host_with_module()?;
    vm.run_ok("mkdir -p /tmp/u /tmp/m && chmod 777 /tmp/u /tmp/m")?;
    start_agent_with(&mut vm, "enforce", "--deny-loader-direct")?;

    // T-01: the unprivileged user's copy (same bytes, approved hash).
    // T-02: after more copies than the old list of known loaders held.
    let out = vm.run(&as_nobody(&format!(
        "for i in 1 2 3 4 5 6 7 8 9 10; do cp {LOADER} /tmp/u/l$i; done; /tmp/u/l10 /usr/bin/id -u"
    )))?;
    ensure!(denied(&out), "the copied loader ran a program: {out:?}");
    for i in [10, 1] {
        let out = vm.run(&as_nobody(&format!("/tmp/u/l{i} /usr/bin/true")))?;
        ensure!(out.status == 126, "copy l{i} ran a program: {out:?}");
    }
    let lines = exec_lines(&mut vm, "/tmp/u/l10")?;
    ensure!(
        !lines.is_empty()
            && lines
                .iter()
                .all(|l| l.contains(" direct=1 ") && l.ends_with("-> deny")),
        "the copy was not asked as the loader run directly: {lines:?}"
    );
    // The loader as every program's PT_INTERP stays allowed.
    vm.run_ok(&as_nobody("/usr/bin/true"))?;

    // T-03: a 32-bit loader (i386, ELF32), which no list of this host's
    // loaders ever held, is recognised by its content too.
    {
        use base64::Engine as _;
        let ld32 = base64::engine::general_purpose::STANDARD.encode(elf32_loader());
        vm.run_ok(&format!(
            "echo {ld32} | base64 -d >/tmp/u/ld32 && chmod 755 /tmp/u/ld32"
        ))?;
    }
    let out = vm.run(&as_nobody("/tmp/u/ld32 /usr/bin/true"))?;
    ensure!(
        out.status == 126,
        "the 32-bit loader was not refused: {out:?}"
    );
    let lines = exec_lines(&mut vm, "/tmp/u/ld32")?;
    ensure!(
        !lines.is_empty()
            && lines
                .iter()
                .all(|l| l.contains(" direct=1 ") && l.ends_with("-> deny")),
        "the 32-bit loader was not asked as a loader run directly: {lines:?}"
    );

    // T-04/T-05: in a user + mount namespace of its own, the user mounts a
    // fresh tmpfs (a superblock nothing marked) and binds a modified loader
    // over the path /usr/bin/true names.
    let out = vm.run(&as_nobody(&format!(
        "unshare -Urm sh -c \"mount -t tmpfs t /tmp/m && cp {LOADER} /tmp/m/ld && \
         printf x >>/tmp/m/ld && mount --bind /tmp/m/ld {LOADER} && /usr/bin/true\""
    )))?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "a loader on a fresh tmpfs ran unqualified: {out:?}"
    );
    // The same bytes as the bind-mounted loader, to know its hash.
    let modified = vm
        .run_ok(&format!(
            "cp {LOADER} /tmp/u/mod && printf x >>/tmp/u/mod && sha256sum /tmp/u/mod"
        ))?
        .stdout;
    let modified = modified
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    ensure!(
        log.lines().any(|l| l.starts_with("exec ")
            && l.contains(&format!(" sha256={modified} "))
            && l.ends_with("-> deny")
            && l.contains(" direct=0 ")),
        "the bind-mounted loader was not asked about (or not refused): {out:?}\n{log}"
    );

    // T-41: a burst of refusals logs at most the kernel's burst (10 per
    // 5 s) while every one is counted.
    let before = counter(&mut vm, "exec_denied")?;
    vm.run(&as_nobody(
        "i=0; while [ $i -lt 40 ]; do /tmp/u/l1 /usr/bin/true; i=$((i+1)); done",
    ))?;
    // The kernel says how many it suppressed at the first line after the
    // 5 s interval.
    vm.run(&as_nobody("sleep 6; /tmp/u/l1 /usr/bin/true"))?;
    let denied = counter(&mut vm, "exec_denied")? - before;
    ensure!(denied >= 41, "only {denied} of 41 refusals counted");
    let dmesg = vm.run_ok("dmesg")?.stdout;
    let logged = kernel_lines(&dmesg)
        .iter()
        .filter(|l| l.starts_with("trustbind: exec denied: /tmp/u/l1 "))
        .count();
    ensure!(
        logged < 20 && dmesg.contains("callbacks suppressed"),
        "{logged} refusal lines logged for {denied} refusals (not rate-limited)"
    );

    finish(vm)
}

/// While a loader's verdict is pending (an agent or appliance that takes
/// its time, a FUSE loader that never answers), closing an inotify
/// instance anywhere on the host is not blocked: the gate waits in the
/// exec'ing task with no fsnotify (SRCU) read section held.
#[test]
fn attack_loader_gate_never_blocks_inotify() -> Result<()> {
    let mut vm = host_with_module()?;
    let slow = "/tmp/x/ld-linux-x86-64.so.2";
    true_with_interp(&mut vm, "/tmp/x/true-slow", slow)?;
    vm.run_ok(&format!("cp {LOADER} {slow}"))?;
    start_agent_with(
        &mut vm,
        "enforce",
        &format!("--allow /tmp/x/true-slow --allow {slow} --delay-path {slow}:8000"),
    )?;
    let bg = vm.spawn_bg("/tmp/x/true-slow; echo done=$? >/tmp/slow.out")?;
    // Wait until the loader's request is pending.
    poll(&mut vm, &format!("grep -q '^exec {slow} ' {AGENT_LOG}"), 50)?;
    ensure!(
        !exec_lines(&mut vm, slow)?.is_empty(),
        "the slow loader was never asked"
    );
    // inotify_init1 (294), inotify_add_watch (254) on /tmp for IN_OPEN,
    // close: destroying the mark waits for an SRCU grace period.
    let out = vm.run(
        "timeout 4 perl -e '$fd = syscall(294, 0); die \"init: $!\" if $fd < 0; \
         my $dir = \"/tmp\"; die \"watch: $!\" if syscall(254, $fd, $dir, 0x20) < 0; \
         open(F, \"<&=\", $fd) or die; close(F); print \"closed\\n\"'",
    )?;
    ensure!(
        out.status == 0 && out.stdout.contains("closed"),
        "an inotify close waited for the loader's verdict: {out:?}"
    );
    ensure!(
        vm.run("cat /tmp/slow.out")?.status != 0,
        "the exec did not wait for its loader's verdict"
    );
    // The exec completes once the verdict comes.
    poll(&mut vm, "grep -q done=0 /tmp/slow.out", 100)?;
    let out = vm.run_ok("cat /tmp/slow.out")?;
    ensure!(out.stdout.trim() == "done=0", "slow exec: {out:?}");
    drop(bg);
    finish(vm)
}

/// An allowed exec that fails afterwards (its PT_INTERP loader does not
/// exist) leaves the process running its old program: the next child's
/// ancestry names that old program, not the one whose exec failed.
#[test]
fn attack_failed_exec_keeps_lineage() -> Result<()> {
    let mut vm = host_with_module()?;
    // As long as the real loader's path (27 bytes), and absent.
    let missing = "/tmp/x/no-such-ld-x86.so.22";
    true_with_interp(&mut vm, "/tmp/x/true-noloader", missing)?;
    start_agent_with(
        &mut vm,
        "enforce",
        "--no-cache --allow /tmp/x/true-noloader",
    )?;
    let out = vm.run("bash -c 'shopt -s execfail; exec /tmp/x/true-noloader; /usr/bin/id -u'")?;
    ensure!(
        out.stdout.trim() == "0",
        "bash did not go on after the failed exec: {out:?}"
    );
    let failed = exec_lines(&mut vm, "/tmp/x/true-noloader")?;
    ensure!(
        failed.iter().any(|l| l.ends_with("-> allow")),
        "the program was not allowed before its exec failed: {failed:?}"
    );
    let failed_sha = field(&failed[0], "sha256")?.to_owned();
    let bash_sha = vm.run_ok("sha256sum /usr/bin/bash")?.stdout;
    let bash_sha = bash_sha.split_whitespace().next().unwrap_or_default();
    let id = exec_lines(&mut vm, "/usr/bin/id")?;
    let anc = field(id.last().context("id not asked")?, "anc")?;
    ensure!(
        anc.split(',').next() == Some(bash_sha) && !anc.contains(&failed_sha),
        "the child's ancestry credits the failed exec: anc={anc} (bash {bash_sha}, failed {failed_sha})"
    );
    ensure!(
        counter(&mut vm, "exec_committed")? > 0,
        "no exec counted as committed"
    );
    finish(vm)
}

/// T-07: lineage was direct-mapped by tgid and fell back to the parent's
/// entry for a process that had none of its own: a double-forked process,
/// reparented to init, was credited with init's program. Now a fork copies
/// the parent's entry, so the daemon is credited with what it runs (the
/// shell that forked it), whoever its parent is now.
#[test]
fn attack_reparented_lineage() -> Result<()> {
    let mut vm = host_with_module()?;
    start_agent_with(&mut vm, "enforce", "--no-cache")?;
    vm.run_ok(
        "rm -f /tmp/df.out; bash -c '( ( sleep 1; /usr/bin/id -u >/tmp/df.out ) \
         </dev/null >/dev/null 2>&1 & ); true'",
    )?;
    ensure!(
        poll(&mut vm, "test -s /tmp/df.out", 150)?,
        "the double-forked id never ran"
    );
    // Its parent is gone: reparented to init (or a subreaper), not bash.
    let bash_sha = vm.run_ok("sha256sum /usr/bin/bash")?.stdout;
    let bash_sha = bash_sha.split_whitespace().next().unwrap_or_default();
    let id = exec_lines(&mut vm, "/usr/bin/id")?;
    let anc = field(id.last().context("id not asked")?, "anc")?;
    ensure!(
        anc.split(',').next() == Some(bash_sha),
        "the reparented process is not credited with bash ({bash_sha}): anc={anc}"
    );
    ensure!(
        counter(&mut vm, "lineage_procs")? > 0,
        "the lineage table knows no process"
    );
    finish(vm)
}

/// T-43: `PR_SET_MM_EXE_FILE` points a process's `mm->exe_file` at any
/// executable (here the approved `curl`); a module that credits a process
/// it did not see exec from its `exe_file` (a forked child) takes it for
/// that program. `exe_swap` makes the change from code outside its own
/// image and forks a child that connects. In permissive mode the change
/// is let through and counted, and the child is credited with `exe_swap`,
/// what it runs (from the lineage table); in enforce mode the change is
/// refused (`EPERM`).
#[test]
fn attack_exe_file_swap() -> Result<()> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let bin = crate::common::freestanding("exe_swap")?;
    let mut vm = host_with_module()?;
    vm.run_ok(&format!(
        "mkdir -p /tmp/x && echo {} | base64 -d >/tmp/x/exe_swap && chmod 755 /tmp/x/exe_swap",
        b64.encode(&bin)
    ))?;
    let sha = |vm: &mut Vm, f: &str| -> Result<String> {
        let out = vm.run_ok(&format!("sha256sum {f}"))?.stdout;
        Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
    };
    let swap_sha = sha(&mut vm, "/tmp/x/exe_swap")?;
    let curl_sha = sha(&mut vm, "/usr/bin/curl")?;

    start_agent_with(
        &mut vm,
        "permissive",
        "--no-cache --net --allow /tmp/x/exe_swap",
    )?;
    let out = vm.run("/tmp/x/exe_swap /usr/bin/curl 9")?;
    // 50 + ECONNREFUSED: the change was made, the child connected
    // (nothing listens on port 9).
    ensure!(
        out.status == 50 + 111,
        "exe_swap in permissive mode: {out:?}"
    );
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    let line = log
        .lines()
        .find(|l| l.starts_with("net connect ") && l.contains("-> 127.0.0.1:9 "))
        .with_context(|| format!("the child's connect was not asked:\n{log}"))?;
    ensure!(
        field(line, "sha256")? == swap_sha && field(line, "from")? == "lineage",
        "the child is credited with {} (curl {curl_sha}, exe_swap {swap_sha}): {line}",
        field(line, "sha256")?
    );
    ensure!(
        counter(&mut vm, "exe_replace_would_deny")? >= 1,
        "the change in permissive mode was not counted"
    );
    stop_agent(&mut vm)?;

    start_agent_with(
        &mut vm,
        "enforce",
        "--no-cache --net --allow /tmp/x/exe_swap",
    )?;
    let out = vm.run("/tmp/x/exe_swap /usr/bin/curl 9")?;
    // 10 + EPERM.
    ensure!(
        out.status == 11,
        "the exe_file change was not refused: {out:?}"
    );
    ensure!(
        counter(&mut vm, "exe_replace_refused")? >= 1,
        "the refusal was not counted"
    );
    finish(vm)
}

/// The program the flood execs: a copy of `true` whose verdicts are never
/// cached (`--no-cache-path`), so every exec of it asks.
const FLOOD: &str = "/tmp/x/flood";

/// Starts `n` execs of [`FLOOD`] as uid 1000 in the background (each
/// failed one appends a line to `fails`) and waits until all were started.
fn flood(vm: &mut Vm, n: usize, fails: &str) -> Result<()> {
    vm.run_ok("rm -f /tmp/flood.spawned /tmp/flood.done")?;
    vm.spawn_bg(&format!(
        "setpriv --reuid=1000 --regid=1000 --clear-groups sh -c \
         'i=0; while [ $i -lt {n} ]; do ({FLOOD} || echo x >>{fails}) & i=$((i+1)); done; \
         : >/tmp/flood.spawned; wait'; echo flood-done >/tmp/flood.done"
    ))?;
    wait_file(vm, "/tmp/flood.spawned", 600)
}

/// The fake agent's arguments for the flood: everything the harness and
/// the test run is cached once asked, the flood's program never is.
fn flood_agent(vm: &mut Vm, mode: &str) -> Result<()> {
    start_agent_with(
        vm,
        mode,
        &format!("--allow {FLOOD} --no-cache-path {FLOOD} --pause-file /tmp/pause"),
    )?;
    // Warm the cache for what runs while the agent reads nothing: the
    // harness's loop, the test's commands, and the flood's shell as uid
    // 1000 (its loader too).
    vm.run_ok(
        "rm -f /tmp/w; : >/tmp/w; cat /tmp/w; sleep 0; setsid true; touch /tmp/w; \
         mountpoint -q /sys/kernel/debug || true; \
         setpriv --reuid=1000 --regid=1000 --clear-groups sh -c true",
    )?;
    Ok(())
}

/// Runs `cmd` until it succeeds, at most `tries` times 0.2 s apart;
/// whether it did (the caller's assertion says what that means).
fn poll(vm: &mut Vm, cmd: &str, tries: usize) -> Result<bool> {
    for _ in 0..tries {
        if vm.run(cmd)?.status == 0 {
            return Ok(true);
        }
        vm.run_ok("sleep 0.2")?;
    }
    Ok(false)
}

/// Waits until `file` exists (at most `tries` × 0.2 s).
fn wait_file(vm: &mut Vm, file: &str, tries: usize) -> Result<()> {
    ensure!(
        poll(vm, &format!("test -e {file}"), tries)?,
        "{file} never appeared"
    );
    Ok(())
}

/// One user starts 400 execs at once while the agent reads nothing (what
/// the harness runs meanwhile is answered from the cache): in
/// enforce mode another user's exec still gets its verdict (a place of its
/// own, read before the flood's backlog); in permissive mode not one exec
/// is refused, the flood's included.
#[test]
fn attack_queue_flood() -> Result<()> {
    let mut vm = host_with_module()?;
    vm.run_ok(&format!(
        "rm -f /tmp/pause /tmp/fails /tmp/victim.out; mkdir -p /tmp/x; cp /usr/bin/true {FLOOD}"
    ))?;
    flood_agent(&mut vm, "enforce")?;
    vm.run_ok("touch /tmp/pause")?;
    flood(&mut vm, 400, "/tmp/fails")?;
    vm.spawn_bg(
        "setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/id -u >/tmp/victim.out 2>&1; \
         echo rc=$? >>/tmp/victim.out",
    )?;
    vm.run_ok("sleep 1; rm -f /tmp/pause")?;
    wait_file(&mut vm, "/tmp/victim.out", 100)?;
    vm.run_ok("sleep 0.5")?;
    let victim = vm.run_ok("cat /tmp/victim.out")?.stdout;
    ensure!(
        victim.contains("65534") && victim.contains("rc=0"),
        "another user's exec was refused during the flood: {victim}"
    );
    ensure!(
        counter(&mut vm, "queue_busy")? > 0,
        "the flood never hit its share"
    );
    wait_file(&mut vm, "/tmp/flood.done", 600)?;
    stop_agent(&mut vm)?;

    // Permissive: the same flood, and nothing is refused.
    vm.run_ok("rm -f /tmp/fails")?;
    flood_agent(&mut vm, "permissive")?;
    let busy = counter(&mut vm, "queue_busy")?;
    vm.run_ok("touch /tmp/pause")?;
    flood(&mut vm, 400, "/tmp/fails")?;
    vm.run_ok("sleep 1; rm -f /tmp/pause")?;
    wait_file(&mut vm, "/tmp/flood.done", 600)?;
    ensure!(
        counter(&mut vm, "queue_busy")? > busy,
        "the permissive flood never hit its share"
    );
    let fails = vm.run("cat /tmp/fails")?;
    ensure!(
        fails.status != 0,
        "permissive mode refused {} execs",
        fails.stdout.lines().count()
    );
    finish(vm)
}

/// A perl client that connects to 127.0.0.1:`port`, then asks its own
/// socket for the kTLS key with the raw `getsockopt(2)` (55) and the exact
/// length kTLS wants for AES-256-GCM (56 bytes): `SOL_TLS` (282) `TLS_TX`
/// (1) and `TLS_RX` (2), printing what it got (or the errno), then a
/// control option.
fn key_reader(port: u16) -> String {
    format!(
        "perl -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 0) or die; \
         connect(S, pack_sockaddr_in({port}, inet_aton(\"127.0.0.1\"))) or die \"connect: $!\\n\"; \
         for my $o (1, 2) {{ my $buf = \"\\0\" x 56; my $len = pack(\"i\", 56); \
         my $r = syscall(55, fileno(S), 282, $o, $buf, $len); \
         print $r == 0 ? \"tls$o=\" . unpack(\"H*\", $buf) . \"\\n\" : \"tls$o=refused errno=\" . ($!+0) . \"\\n\"; }} \
         my $t = getsockopt(S, SOL_SOCKET, SO_TYPE); print \"so_type=\", unpack(\"i\", $t), \"\\n\"; \
         print S \"hello\\n\"; close S'"
    )
}

/// The owner of a bound socket cannot read its channel key back: on a
/// socket the module keyed, `getsockopt(SOL_TLS, TLS_TX/TLS_RX)` fails with
/// `EPERM` (T-35), while other options still answer and the channel still
/// carries data. Key copies in the module are wiped (no `Copy` key type,
/// pending-table nodes zeroed before they are freed: T-36, by review and
/// `proto` tests; a test cannot see freed memory).
#[test]
fn attack_channel_key_read() -> Result<()> {
    let mut vm = host_with_module()?;
    start_agent_with(
        &mut vm,
        "enforce",
        "--no-cache --net-bind --net-allow /usr/bin/socat --net-allow /usr/bin/perl",
    )?;
    vm.spawn_bg("exec socat -u TCP4-LISTEN:7300,reuseaddr OPEN:/tmp/key-recv,creat,trunc")?;
    crate::net_qualify::wait_listening(&mut vm, 7300)?;
    let out = vm.run_ok(&key_reader(7300))?.stdout;
    ensure!(
        out.contains("tls1=refused errno=1") && out.contains("tls2=refused errno=1"),
        "the channel key was readable from user space: {out}"
    );
    ensure!(out.contains("so_type=1"), "other options broken: {out}");
    ensure!(
        counter(&mut vm, "net_key_reads_refused")? >= 2,
        "refusals not counted"
    );
    poll(&mut vm, "grep -q hello /tmp/key-recv", 50)?;
    vm.run_ok("grep -q hello /tmp/key-recv")
        .context("the bound channel did not carry data")?;
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    ensure!(
        log.lines()
            .any(|l| l.starts_with("net established") && l.contains(" key ")),
        "the connection was not a bound channel:\n{log}"
    );
    finish(vm)
}

/// Multipath TCP (`IPPROTO_MPTCP`, 262) opens TCP connections through
/// sockets of its own and kernel subflow sockets. A program not allowed
/// on the network is refused on an MPTCP connect and on an MPTCP accept,
/// like on TCP (T-18).
#[test]
fn attack_mptcp() -> Result<()> {
    let mut vm = host_with_module()?;
    let rogue = "/tmp/x/perl-rogue";
    vm.run_ok(&format!(
        "mkdir -p /tmp/x && cp /usr/bin/perl {rogue} && printf x >>{rogue} && chmod 755 {rogue} \
         && sysctl -q net.mptcp.enabled"
    ))?;
    start_agent_with(
        &mut vm,
        "enforce",
        &format!("--no-cache --allow {rogue} --net-allow /usr/bin/socat --net-allow /usr/bin/perl"),
    )?;
    let marked = counter(&mut vm, "net_backstop_marked")?;
    // Connect: an MPTCP socket of a program not allowed on the network.
    vm.spawn_bg("exec socat -u TCP4-LISTEN:7400,reuseaddr OPEN:/tmp/mptcp-recv,creat,trunc")?;
    crate::net_qualify::wait_listening(&mut vm, 7400)?;
    let out = vm.run(&as_nobody(&format!(
        "{rogue} -MSocket -e \"socket(S, PF_INET, SOCK_STREAM, 262) or die qq(socket: \\$!\\n); \
         connect(S, pack_sockaddr_in(7400, inet_aton(qq(127.0.0.1)))) or die qq(connect: \\$!\\n); \
         print S qq(mptcp-canary\\n); close S; print qq(connected\\n)\""
    )))?;
    ensure!(
        !out.stdout.contains("connected") && out.stderr.contains("connect: Permission denied"),
        "an MPTCP connect of a program not allowed on the network went through: {out:?}"
    );
    vm.run_ok("sleep 0.5")?;
    ensure!(
        vm.run("grep -q mptcp-canary /tmp/mptcp-recv")?.status != 0,
        "the MPTCP connect's data reached the server"
    );
    // Accept: an MPTCP listener of a program not allowed on the network.
    vm.spawn_bg(&format!(
        "exec {rogue} -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 262) or die; \
         setsockopt(S, SOL_SOCKET, SO_REUSEADDR, 1); \
         bind(S, pack_sockaddr_in(7401, INADDR_ANY)) or die \"bind: $!\\n\"; listen(S, 5) or die; \
         if (accept(C, S)) {{ my $l = <C>; print \"accepted: $l\"; }} else {{ print \"accept: $!\\n\"; }}' \
         >/tmp/mptcp-listener.out 2>&1"
    ))?;
    crate::net_qualify::wait_listening(&mut vm, 7401)?;
    vm.run("echo mptcp-accept-canary | socat -u - TCP4:127.0.0.1:7401")?;
    poll(&mut vm, "grep -q accept /tmp/mptcp-listener.out", 50)?;
    let listener = vm.run_ok("cat /tmp/mptcp-listener.out")?.stdout;
    ensure!(
        !listener.contains("mptcp-accept-canary") && listener.contains("accept: "),
        "an MPTCP accept of a program not allowed on the network got the data: {listener}"
    );
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    ensure!(
        log.lines().any(|l| l.starts_with("net connect")
            && l.contains(":7400 ")
            && l.ends_with("-> deny"))
            && log.lines().any(|l| l.starts_with("net accept")
                && l.contains(":7401 ")
                && l.ends_with("-> deny")),
        "the MPTCP connect and accept were not asked about:\n{log}"
    );
    // An allowed MPTCP connection, both ends: once closed it leaves no
    // backstop mark behind (T-31: an MPTCP socket does not close through
    // tcp_close(), so a mark on it stayed for good, and a new socket at
    // its address would have found it).
    vm.spawn_bg(
        "exec perl -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 262) or die; \
         setsockopt(S, SOL_SOCKET, SO_REUSEADDR, 1); \
         bind(S, pack_sockaddr_in(7402, INADDR_ANY)) or die \"bind: $!\\n\"; listen(S, 5) or die; \
         accept(C, S) or die \"accept: $!\\n\"; my $l = <C>; close C; print \"accepted: $l\";' \
         >/tmp/mptcp-ok.out 2>&1",
    )?;
    crate::net_qualify::wait_listening(&mut vm, 7402)?;
    vm.run_ok(
        "perl -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 262) or die; \
         connect(S, pack_sockaddr_in(7402, inet_aton(q(127.0.0.1)))) or die \"connect: $!\\n\"; \
         print S qq(mptcp-ok\\n); close S;'",
    )?;
    ensure!(
        poll(
            &mut vm,
            "grep -q 'accepted: mptcp-ok' /tmp/mptcp-ok.out",
            50
        )?,
        "the allowed MPTCP connection did not carry its line: {}",
        vm.run_ok("cat /tmp/mptcp-ok.out")?.stdout
    );
    ensure!(
        poll(
            &mut vm,
            &format!("grep -qx {marked} /sys/kernel/debug/trustbind/net_backstop_marked"),
            50
        )?,
        "closed MPTCP sockets left backstop marks: {} now, {marked} before",
        counter(&mut vm, "net_backstop_marked")?
    );
    // An allowed program whose connection must be a channel: no kTLS can
    // sit on an MPTCP socket, so its MPTCP connect is refused in enforce
    // mode (decided in Rust, `net.rs` `check_as`), and nothing reaches the
    // server in plaintext.
    stop_agent(&mut vm)?;
    start_agent_with(
        &mut vm,
        "enforce",
        "--no-cache --net-bind --net-allow /usr/bin/socat --net-allow /usr/bin/perl",
    )?;
    vm.spawn_bg("exec socat -u TCP4-LISTEN:7403,reuseaddr OPEN:/tmp/mptcp-bind,creat,trunc")?;
    crate::net_qualify::wait_listening(&mut vm, 7403)?;
    let out = vm.run(
        "perl -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 262) or die; \
         connect(S, pack_sockaddr_in(7403, inet_aton(q(127.0.0.1)))) or die \"connect: $!\\n\"; \
         print S qq(mptcp-plain\\n); close S; print qq(connected\\n)'",
    )?;
    ensure!(
        !out.stdout.contains("connected") && out.stderr.contains("connect: Permission denied"),
        "an MPTCP connect that must be a channel went through: {out:?}"
    );
    vm.run_ok("sleep 0.5")?;
    ensure!(
        vm.run("grep -q mptcp-plain /tmp/mptcp-bind")?.status != 0,
        "an MPTCP connect that must be a channel sent plaintext"
    );
    ensure!(
        crate::net_qualify::dmesg_has(&mut vm, |l| l
            .contains("an MPTCP socket cannot be a bound channel"))?,
        "no kernel line says why the MPTCP connect was refused"
    );
    finish(vm)
}

/// The boot window (T-22, module half): loaded with `mode=enforce
/// agent=PATH` (as `/etc/modprobe.d` would), the module enforces before any
/// agent ever connected: an exec is refused, the named agent binary (and
/// only it) starts, and from then on its verdicts decide; `rmmod` is
/// refused from the start.
#[test]
fn attack_boot_window() -> Result<()> {
    let art = trustbind_qemu_tests::Artifacts::from_env()?;
    let net = trustbind_qemu_tests::Network::new()?;
    let mut vm = net
        .vm("a")
        .file("tb-fakeagent", env!("CARGO_BIN_EXE_tb-fakeagent"), 0o755)
        .boot(&art)?;
    // One command: once the module is in, every exec this shell makes is
    // refused until the agent is up, so only builtins wait for it.
    let out = vm.run(&format!(
        "insmod /tb/trustbind.ko mode=enforce agent=/tb/tb-fakeagent || exit 90; \
         cp /usr/bin/true /tmp/t 2>/dev/null; echo before=$?; \
         /tb/tb-fakeagent --mode enforce --timeout-ms 10000 --allow-dir /usr/bin \
           --allow-dir /usr/sbin --allow-dir /tb --allow {LOADER} --log {AGENT_LOG} \
           </dev/null >/dev/null 2>&1 & \
         i=0; while [ $i -lt 300000 ]; do \
           if [ -s {AGENT_LOG} ] && read -r l <{AGENT_LOG}; then case \"$l\" in ready*) break;; esac; fi; \
           i=$((i+1)); done; \
         /usr/bin/true; echo after=$?"
    ))?;
    ensure!(
        out.status != 90,
        "the module refused mode=enforce agent=...: {out:?}"
    );
    ensure!(
        out.stdout.contains("before=126"),
        "an exec ran before any agent connected: {out:?}"
    );
    ensure!(
        out.stdout.contains("after=0"),
        "the pinned agent did not take over: {out:?}"
    );
    let dmesg = vm.run_ok("dmesg")?.stdout;
    ensure!(
        kernel_lines(&dmesg)
            .iter()
            .any(|l| l.trim_end() == "trustbind: mode Enforce at load, agent binary pinned"),
        "no load-time mode line:\n{dmesg}"
    );
    let out = vm.run("rmmod trustbind")?;
    ensure!(out.status != 0, "rmmod succeeded in enforce mode: {out:?}");
    // A bad value refuses the load (nothing half-configured).
    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    let out = vm.run("insmod /tb/trustbind.ko mode=enforcing")?;
    ensure!(out.status != 0, "mode=enforcing was accepted: {out:?}");
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}

/// A refused program's UNIX connect must not reach the listener while its
/// verdict is pending. The client (perl, not an allowed pair with the
/// socat listener) forks with one socket: the child connects, waiting 3 s
/// for the verdict (`--delay-path`), while the parent sends on the same
/// socket. Before the fix the connection existed during the wait: the
/// send went through and socat accepted and wrote the line out. Now the
/// send fails with `ENOTCONN`, the connect with `EACCES`, and the listener
/// never accepts anything (T-20).
#[test]
fn attack_unix_before_verdict() -> Result<()> {
    let mut vm = host_with_module()?;
    let sock = "/tmp/t20.sock";
    start_agent_with(
        &mut vm,
        "enforce",
        &format!(
            "--no-cache --unix-allow /usr/bin/socat:/usr/bin/socat \
             --allow /usr/bin/perl --delay-path {sock}:3000"
        ),
    )?;
    vm.spawn_bg(&format!(
        "exec socat -u UNIX-LISTEN:{sock},mode=777 OPEN:/tmp/t20.got,creat,append"
    ))?;
    wait_file(&mut vm, sock, 50)?;
    let script = format!(
        r#"use Socket;
socket(S, PF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
my $pid = fork();
if ($pid == 0) {{
    print connect(S, pack_sockaddr_un("{sock}")) ? "connect=ok\n" : "connect=err errno=" . ($!+0) . "\n";
    exit 0;
}}
select(undef, undef, undef, 1.0);
my $r = send(S, "LEAKED\n", 0);
print defined $r ? "send=ok\n" : "send=err errno=" . ($!+0) . "\n";
waitpid($pid, 0);
"#
    );
    vm.run_ok(&format!(
        "echo {} | base64 -d >/tmp/t20.pl",
        base64::engine::general_purpose::STANDARD.encode(script)
    ))?;
    let out = vm.run(&as_nobody("perl /tmp/t20.pl"))?;
    let lines = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    ensure!(
        lines
            .lines()
            .any(|l| l.starts_with(&format!("unix path={sock} ")) && l.ends_with("-> deny")),
        "the connect was not asked about and refused: {out:?}\n{lines}"
    );
    ensure!(
        out.stdout.contains("send=err errno=107"),
        "a byte was sent on the connection before its verdict: {out:?}"
    );
    ensure!(
        out.stdout.contains("connect=err errno=13"),
        "the refused connect did not fail with EACCES: {out:?}"
    );
    ensure!(
        vm.run("test -e /tmp/t20.got")?.status != 0,
        "the listener accepted a connection the module refused: {:?}",
        vm.run("cat /tmp/t20.got")?
    );
    finish(vm)
}

/// A perl one-liner (no single quotes: it runs under [`as_nobody`]) that
/// opens an SMC socket (`family`, `protocol`), connects it to
/// 127.0.0.1:`port` and sends `line`; prints `sent`, or dies with the
/// failing call and its error.
fn smc_client(family: u32, protocol: u32, port: u16, line: &str) -> String {
    format!(
        "perl -MSocket -e \"socket(S, {family}, SOCK_STREAM, {protocol}) or die qq(socket: \\$!\\n); \
         connect(S, pack_sockaddr_in({port}, inet_aton(qq(127.0.0.1)))) or die qq(connect: \\$!\\n); \
         print S qq({line}\\n); close S; print qq(sent\\n)\""
    )
}

/// Starts an SMC (`IPPROTO_SMC`) listener on `port` that prints the first
/// line of its first connection to `/tmp/smc-PORT.out` (or the failing
/// call).
fn smc_listener(vm: &mut Vm, port: u16) -> Result<()> {
    vm.spawn_bg(&format!(
        "exec perl -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 256) or die \"socket: $!\\n\"; \
         setsockopt(S, SOL_SOCKET, SO_REUSEADDR, 1); \
         bind(S, pack_sockaddr_in({port}, INADDR_ANY)) or die \"bind: $!\\n\"; listen(S, 5) or die; \
         accept(C, S) or die \"accept: $!\\n\"; my $l = <C>; print \"accepted: $l\";' \
         >/tmp/smc-{port}.out 2>&1"
    ))?;
    crate::net_qualify::wait_listening(vm, port)
}

/// T-19: an SMC socket opens its TCP connection on a kernel socket, which
/// the connect and accept wrappers cannot attribute to a program (and its
/// data moves over shared memory, outside any TLS record). First a real SMC
/// connection is made with connections not qualified, so SMC works in this
/// kernel (loopback-ism); then, in enforce mode with connections qualified,
/// an unprivileged user's SMC socket is refused at `socket()` — both ways
/// of asking for one (`AF_SMC`, `IPPROTO_SMC`), even for a program allowed
/// on the network, and nothing reaches a listener; permissive mode only
/// counts it. On the module before this defence the enforce-mode socket
/// was made, connected and sent its line: the agent was never asked.
#[test]
fn attack_smc() -> Result<()> {
    let mut vm = host_with_module()?;
    // SMC works here: a connection made before the agent asks for
    // qualification carries its line.
    smc_listener(&mut vm, 7410)?;
    let out = vm.run(&as_nobody(&smc_client(2, 256, 7410, "smc-before")))?;
    ensure!(
        out.stdout.contains("sent"),
        "no SMC connection could be made in this kernel, so the test proves nothing: {out:?}"
    );
    ensure!(
        poll(
            &mut vm,
            "grep -q 'accepted: smc-before' /tmp/smc-7410.out",
            50
        )?,
        "the SMC connection did not carry its line: {}",
        vm.run_ok("cat /tmp/smc-7410.out")?.stdout
    );
    // A plain TCP listener for the enforce-mode attempts.
    vm.spawn_bg("exec socat -u TCP4-LISTEN:7411,reuseaddr OPEN:/tmp/smc-recv,creat,trunc")?;
    crate::net_qualify::wait_listening(&mut vm, 7411)?;
    start_agent_with(&mut vm, "enforce", "--no-cache --net-allow /usr/bin/perl")?;
    for (family, protocol, what) in [(2, 256, "IPPROTO_SMC"), (43, 0, "AF_SMC")] {
        let out = vm.run(&as_nobody(&smc_client(
            family,
            protocol,
            7411,
            "smc-canary",
        )))?;
        ensure!(
            !out.stdout.contains("sent") && out.stderr.contains("socket: Permission denied"),
            "an {what} socket was made in enforce mode: {out:?}"
        );
    }
    // Nor can an SMC listener be made.
    let out =
        vm.run("perl -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 256) or die \"socket: $!\\n\"'")?;
    ensure!(
        out.stderr.contains("socket: Permission denied"),
        "a root SMC socket was made in enforce mode: {out:?}"
    );
    vm.run_ok("sleep 0.5")?;
    ensure!(
        vm.run("grep -q smc-canary /tmp/smc-recv")?.status != 0,
        "an SMC connection's line reached the server in enforce mode"
    );
    ensure!(
        counter(&mut vm, "net_unqualifiable")? >= 3,
        "the refusals were not counted as unqualifiable"
    );
    // TCP itself is untouched: perl is allowed on the network.
    vm.run_ok(&as_nobody(
        "perl -MSocket -e \"socket(S, PF_INET, SOCK_STREAM, 6) or die; \
         connect(S, pack_sockaddr_in(7411, inet_aton(qq(127.0.0.1)))) or die qq(connect: \\$!\\n);\"",
    ))?;
    // Permissive mode counts and lets it be made.
    stop_agent(&mut vm)?;
    start_agent_with(
        &mut vm,
        "permissive",
        "--no-cache --net-allow /usr/bin/perl",
    )?;
    let would = counter(&mut vm, "net_would_deny")?;
    let out = vm.run(&as_nobody(
        "perl -MSocket -e \"socket(S, 43, SOCK_STREAM, 0) or die qq(socket: \\$!\\n); print qq(made\\n)\"",
    ))?;
    ensure!(
        out.stdout.contains("made"),
        "permissive mode refused an SMC socket: {out:?}"
    );
    ensure!(
        counter(&mut vm, "net_would_deny")? > would,
        "permissive mode did not count the SMC socket as would-deny"
    );
    finish(vm)
}

/// T-09: a FUSE daemon can answer the page faults of a running program
/// with other bytes than those the module hashed, so an exec from FUSE
/// cannot be qualified. An unprivileged user mounts a FUSE mirror of
/// `/usr/bin` (bindfs through the set-uid `fusermount3`): with the module
/// disabled `true` runs from it; in enforce mode it is refused without the
/// agent being asked, though the same bytes run from `/usr/bin`; permissive
/// mode runs it and counts it. On the module before this defence the
/// enforce-mode exec ran (the agent allowed the hash of `true`).
#[test]
fn attack_fuse_exec() -> Result<()> {
    let mut vm = host_with_module()?;
    // /dev/fuse is 0666 on a Debian host (udev's rule); the test VM has
    // no udev.
    vm.run_ok("chmod 666 /dev/fuse && mkdir -p /tmp/fuse && chown 65534:65534 /tmp/fuse")?;
    vm.run_ok(&as_nobody("bindfs --no-allow-other /usr/bin /tmp/fuse"))?;
    let fs = vm.run_ok(&as_nobody("stat -f -c %T /tmp/fuse"))?.stdout;
    ensure!(fs.contains("fuse"), "/tmp/fuse is not FUSE but {fs:?}");
    vm.run_ok(&as_nobody("/tmp/fuse/true"))?;
    start_agent_with(&mut vm, "enforce", "--no-cache")?;
    let out = vm.run(&as_nobody("/tmp/fuse/true"))?;
    ensure!(
        out.status != 0 && denied(&out),
        "a program ran from FUSE in enforce mode: {out:?}"
    );
    vm.run_ok(&as_nobody("/usr/bin/true"))?;
    ensure!(
        exec_lines(&mut vm, "/tmp/fuse/true")?.is_empty(),
        "the agent was asked about the FUSE exec"
    );
    ensure!(
        counter(&mut vm, "exec_unqualifiable")? >= 1,
        "the refusal was not counted as unqualifiable"
    );
    stop_agent(&mut vm)?;
    start_agent_with(&mut vm, "permissive", "--no-cache")?;
    let would = counter(&mut vm, "exec_would_deny")?;
    vm.run_ok(&as_nobody("/tmp/fuse/true"))?;
    ensure!(
        counter(&mut vm, "exec_would_deny")? > would,
        "permissive mode did not count the FUSE exec as would-deny"
    );
    vm.run_ok("umount /tmp/fuse")?;
    finish(vm)
}
