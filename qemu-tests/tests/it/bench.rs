//! Exec overhead of the PEM, measured in one VM run (a benchmark, not a
//! test: it asserts nothing about speed). Run by `cargo xtask bench`
//! (`--ignored`); prints a table.
//!
//! A small static binary (`busybox true`) is exec'd N times by a shell loop:
//! with the module absent, with the module and a warm verdict cache, and
//! cold (every exec a different copy: hashed in the kernel and asked of
//! the agent), [`ROUNDS`] rounds alternating absent / loaded in one VM
//! (medians and the rounds' spread printed). In-kernel hashing
//! throughput: a 64 MiB executable exec'd cold, minus a cold exec of the
//! small one, beside `sha256sum` then `sha1sum` of the same file in the
//! same round. A dynamically linked `/usr/bin/true` is measured absent and
//! warm too: its exec also opens the ELF loader, which the loader gate
//! qualifies (a second cache lookup). `cargo xtask bench` runs it in icount
//! mode (the guest clock counts instructions: rounds agree whatever the
//! host's load) and in wall-clock TCG; each run prints its mode. Absolute
//! times are emulation times; the ratios within a run are what counts.

use anyhow::{Context, Result};
use trustbind_qemu_tests::{bench_size, Artifacts, Network, Vm};

const N: usize = 400;
/// Distinct copies exec'd cold (on tmpfs: the guest's root is small).
const COLD: usize = 100;
/// Of each, in a smoke run (`trustbind_qemu_tests::bench_smoke`).
const N_SMOKE: usize = 10;
const COLD_SMOKE: usize = 5;

/// Seconds taken by `cmd` in the guest (`date +%s%N` around it).
fn timed(vm: &mut Vm, cmd: &str) -> Result<f64> {
    let out = vm.run_ok(&format!(
        "s=$(date +%s%N); {cmd}; e=$(date +%s%N); echo $((e - s))"
    ))?;
    let ns: f64 = out
        .stdout
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .parse()
        .with_context(|| format!("no timing in {:?}", out.stdout))?;
    Ok(ns / 1e9)
}

#[test]
#[ignore = "benchmark: run by `cargo xtask bench`"]
fn bench_exec_overhead() -> Result<()> {
    let (n, cold_n) = (bench_size(N, N_SMOKE), bench_size(COLD, COLD_SMOKE));
    let rounds = bench_size(ROUNDS, ROUNDS_SMOKE);
    let art = Artifacts::from_env()?;
    let mode = trustbind_qemu_tests::accel(art.kernel())?.name();
    let net = Network::new()?;
    let mut vm = net
        .vm("bench")
        .file("tb-fakeagent", env!("CARGO_BIN_EXE_tb-fakeagent"), 0o755)
        .memory_mib(1024)
        .boot(&art)?;
    let loop_true = format!("i=0; while [ $i -lt {n} ]; do /root/b/busybox true; i=$((i+1)); done");
    let loop_dyn = format!("i=0; while [ $i -lt {n} ]; do /usr/bin/true; i=$((i+1)); done");
    let loop_cold =
        format!("i=0; while [ $i -lt {cold_n} ]; do /tmp/c/$i/busybox true; i=$((i+1)); done");
    vm.run_ok(&format!(
        "mkdir -p /root/b /tmp/c && cp /bin/busybox /root/b/busybox && \
         i=0; while [ $i -lt {cold_n} ]; do mkdir -p /tmp/c/$i && cp /bin/busybox /tmp/c/$i/busybox && printf $i >>/tmp/c/$i/busybox; i=$((i+1)); done; \
         mkdir -p /tmp/big && cp /bin/busybox /tmp/big/busybox && head -c 67108864 /dev/zero >>/tmp/big/busybox && chmod 755 /tmp/big/busybox /tmp/c/*/busybox"
    ))?;
    let size = vm
        .run_ok("stat -c %s /root/b/busybox")?
        .stdout
        .trim()
        .to_owned();
    let big_mib = vm
        .run_ok("stat -c %s /tmp/big/busybox")?
        .stdout
        .trim()
        .parse::<f64>()
        .context("size of /tmp/big/busybox")?
        / (1024.0 * 1024.0);
    // Warm the page cache.
    vm.run_ok("cat /root/b/busybox /tmp/c/*/busybox /tmp/big/busybox >/dev/null")?;
    let allow = format!(
        "--allow-dir /bin --allow-dir /root/b --allow /tmp/big/busybox \
         $(i=0; while [ $i -lt {cold_n} ]; do printf -- '--allow /tmp/c/%s/busybox ' $i; i=$((i+1)); done)"
    );
    // User space's digests of the same file, one after the other, for
    // the in-kernel hashing rate to be compared with.
    let user_hash = "sha256sum /tmp/big/busybox >/dev/null && sha1sum /tmp/big/busybox >/dev/null";

    // Warm-up: QEMU translates the paths once; not measured.
    timed(&mut vm, &loop_true)?;
    timed(&mut vm, &loop_dyn)?;
    timed(&mut vm, user_hash)?;
    let [mut absent, mut dyn_absent, mut warm, mut dyn_warm, mut cold, mut big, mut user] =
        std::array::from_fn::<Vec<f64>, 7, _>(|_| Vec::new());
    let (mut hits, mut drivers) = (String::new(), String::new());
    for _ in 0..rounds {
        absent.push(timed(&mut vm, &loop_true)?);
        dyn_absent.push(timed(&mut vm, &loop_dyn)?);
        user.push(timed(&mut vm, user_hash)?);
        // Loaded afresh each round: an empty verdict cache, so the
        // copies are cold again.
        vm.run_ok("dmesg -C && insmod /tb/trustbind.ko")?;
        drivers = vm
            .run_ok("dmesg | grep -o 'sha256 driver: .*' || true")?
            .stdout;
        crate::exec::start_agent_with(&mut vm, "enforce", &allow)?;
        vm.run_ok("/root/b/busybox true && /usr/bin/true")?; // first sight: into the cache
        warm.push(timed(&mut vm, &loop_true)?);
        dyn_warm.push(timed(&mut vm, &loop_dyn)?);
        cold.push(timed(&mut vm, &loop_cold)?);
        big.push(timed(&mut vm, "/tmp/big/busybox true")?);
        hits = crate::exec::counter(&mut vm, "exec_cache_hits")?.to_string();
        crate::exec::stop_agent(&mut vm)?;
        vm.run_ok("rmmod trustbind")?;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |v: &[f64]| (v[v.len() - 1] / v[0] - 1.0) * 100.0;
    let per = |t: f64| t / n as f64 * 1e6;
    let (a, da) = (median(&mut absent), median(&mut dyn_absent));
    let (w, dw) = (median(&mut warm), median(&mut dyn_warm));
    let small_cold = median(&mut cold) / cold_n as f64;
    // The big file's hashing: its cold exec less a small one's.
    let kernel_mib_s = big_mib / (median(&mut big) - small_cold).max(1e-9);
    let user_mib_s = big_mib / median(&mut user).max(1e-9);
    println!(
        "exec of a static binary ({size} bytes, busybox true), {n} execs warm/absent, {cold_n} distinct copies cold, \
         {rounds} rounds alternating absent / loaded, guest clock ({mode}):"
    );
    println!(
        "  module absent:            {:>9.1} µs/exec  (median; rounds spread {:.1} %)",
        per(a),
        spread(&absent)
    );
    println!(
        "  module, warm cache:       {:>9.1} µs/exec  (median; rounds spread {:.1} %; {:+.2} % vs absent)",
        per(w),
        spread(&warm),
        (w / a - 1.0) * 100.0
    );
    println!(
        "  module, cold (hash+ask):  {:>9.1} µs/exec  ({:.2}x absent; rounds spread {:.1} %)",
        small_cold * 1e6,
        small_cold / (a / n as f64),
        spread(&cold)
    );
    println!(
        "  dynamic /usr/bin/true:    {:>9.1} µs/exec absent, {:.1} warm ({:+.2} %; rounds spread {:.1} % / {:.1} %)",
        per(da),
        per(dw),
        (dw / da - 1.0) * 100.0,
        spread(&dyn_absent),
        spread(&dyn_warm)
    );
    println!(
        "  hashing {big_mib:.0} MiB: in the kernel (SHA-256 + SHA-1, one pass, a cold exec) {kernel_mib_s:.1} MiB/s; \
         sha256sum then sha1sum {user_mib_s:.1} MiB/s; kernel / user space {:.2}x",
        kernel_mib_s / user_mib_s
    );
    println!("  the module's {}", drivers.trim());
    println!("  cache hits counted (last round): {hits}");
    vm.shutdown()?;
    Ok(())
}

/// Forks (a subshell, no exec) per round.
const FORKS: usize = 2000;
/// Rounds per configuration, alternating absent / loaded in one VM.
const ROUNDS: usize = 3;
/// A smoke run's forks, opens and rounds.
const FORKS_SMOKE: usize = 50;
const OPENS_SMOKE: usize = 200;
const ROUNDS_SMOKE: usize = 1;

/// What following every process costs: with the module loaded every fork
/// copies the parent's lineage entry (an rbtree node, under one spinlock)
/// and every exit removes it (`proto/src/lineage.rs`, T-07). A shell loop
/// forks `FORKS` subshells that exit at once, with the module absent and
/// loaded (no agent: the tracepoints run in every mode), `ROUNDS` rounds
/// alternating, timed by the guest clock. Run with `TRUSTBIND_ACCEL=icount`
/// (as `cargo xtask bench` does) the guest clock counts instructions and
/// the rounds agree closely whatever the host's load; the mode is printed.
#[test]
#[ignore = "benchmark: run by `cargo xtask bench`"]
fn bench_fork_lineage() -> Result<()> {
    let (forks_n, rounds) = (
        bench_size(FORKS, FORKS_SMOKE),
        bench_size(ROUNDS, ROUNDS_SMOKE),
    );
    let art = Artifacts::from_env()?;
    let mode = trustbind_qemu_tests::accel(art.kernel())?.name();
    let net = Network::new()?;
    let mut vm = net.vm("bench").boot(&art)?;
    let forks = format!("i=0; while [ $i -lt {forks_n} ]; do ( : ); i=$((i+1)); done");
    // Warm-up: QEMU translates the paths once; not measured.
    timed(&mut vm, &forks)?;
    let (mut absent, mut loaded) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        absent.push(timed(&mut vm, &forks)?);
        vm.run_ok("insmod /tb/trustbind.ko")?;
        loaded.push(timed(&mut vm, &forks)?);
        vm.run_ok("rmmod trustbind")?;
    }
    let per = |t: f64| t / forks_n as f64 * 1e6;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |v: &[f64]| (v[v.len() - 1] / v[0] - 1.0) * 100.0;
    let (a, l) = (median(&mut absent), median(&mut loaded));
    println!(
        "fork + exit of a subshell, {forks_n} per round, {rounds} rounds alternating, guest clock ({mode}):"
    );
    println!(
        "  module absent: {:>8.1} µs/fork (median; rounds spread {:.1} %)",
        per(a),
        spread(&absent)
    );
    println!(
        "  module loaded: {:>8.1} µs/fork (median; rounds spread {:.1} %; {:+.2} % vs absent)",
        per(l),
        spread(&loaded),
        (l / a - 1.0) * 100.0
    );
    vm.shutdown()?;
    Ok(())
}

/// Opens per round of [`bench_file_open`].
const OPENS: usize = 20_000;

/// What the file gate costs (issue 17): `open()` + `close()` of one file,
/// [`OPENS`] times in a freestanding loop (`progs/open_loop.c`), timed by
/// the guest clock, [`ROUNDS`] rounds alternating: the module absent; the
/// module loaded in enforce mode with `/srv/data` protected (the fake
/// agent) and the file `/srv/pub/x` unprotected on the same file system
/// (the gate's walk up the directories, never a question); and the
/// protected `/srv/data/db`, its verdict cached (asked once before the
/// round). A control row times [`OPENS`] `getppid()` calls (`open_loop N
/// -`), a system call none of the module's hooks sees.
/// Run with `TRUSTBIND_ACCEL=icount` (`cargo xtask bench`).
///
/// The test kernel is `tinyconfig`'s, whose allocator (`SLUB_TINY`) keeps
/// no empty slab and no per-CPU slab: when no other object of the path
/// name cache (`names_cache`, 4 KiB, merged with the other caches of its
/// size) is live in a slab with room, every `open()` allocates a slab of
/// pages for its name and frees it again before it returns, about 0.9 µs
/// more per call in icount mode. Whether one was depended on what ran
/// before (the module's load, the agent, a tracer), which made a loaded
/// module look 0.8 µs dearer than it is (or a module absent as dear). So
/// the VM boots with `slab_nomerge` (the name cache holds only names) and
/// a process blocked in `open()` of a FIFO holds one name for the whole
/// run: every configuration runs with a slab that has room, as a kernel
/// with per-CPU slabs (any distribution's) always does.
#[test]
#[ignore = "benchmark: run by `cargo xtask bench`"]
fn bench_file_open() -> Result<()> {
    let (opens_n, rounds) = (
        bench_size(OPENS, OPENS_SMOKE),
        bench_size(ROUNDS, ROUNDS_SMOKE),
    );
    use base64::Engine as _;
    let art = Artifacts::from_env()?;
    let mode = trustbind_qemu_tests::accel(art.kernel())?.name();
    let net = Network::new()?;
    let mut vm = net
        .vm("bench")
        .file("tb-fakeagent", env!("CARGO_BIN_EXE_tb-fakeagent"), 0o755)
        .memory_mib(1024)
        .cmdline("slab_nomerge")
        .boot(&art)?;
    vm.run_ok("mkdir -p /tmp/x /srv/data /srv/pub && echo x >/srv/data/db && echo x >/srv/pub/x")?;
    let bin = crate::common::freestanding("open_loop")?;
    vm.run_ok(&format!(
        "echo {} | base64 -d >/tmp/x/open_loop && chmod 755 /tmp/x/open_loop",
        base64::engine::general_purpose::STANDARD.encode(&bin)
    ))?;
    // Holds a path name buffer for the whole run (see above): blocked in
    // open() of a FIFO nobody writes, until killed at the end.
    vm.run_ok(
        "mkfifo /tmp/x/hold && setsid sh -c 'exec cat /tmp/x/hold' </dev/null >/dev/null 2>&1 &",
    )?;
    vm.run_ok("sleep 0.2; pidof cat")?;
    // What `timed` also counts (two `date`s, the loop program's fork and
    // exec, which a loaded module hashes and records) is taken out: the
    // same command with no opens, timed right after in the same state.
    let opens = |vm: &mut Vm, path: &str| -> Result<f64> {
        let t = timed(vm, &format!("/tmp/x/open_loop {opens_n} {path}"))?;
        let empty = timed(vm, &format!("/tmp/x/open_loop 0 {path}"))?;
        Ok(t - empty)
    };
    // The control: `open_loop N -` makes N getppid() calls.
    let calls = |vm: &mut Vm| opens(vm, "-");
    opens(&mut vm, "/srv/pub/x")?;
    calls(&mut vm)?;
    let (mut absent, mut unprotected, mut cached) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ctl_absent, mut ctl_loaded) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        absent.push(opens(&mut vm, "/srv/pub/x")?);
        ctl_absent.push(calls(&mut vm)?);
        vm.run_ok("insmod /tb/trustbind.ko")?;
        crate::exec::start_agent_with(
            &mut vm,
            "enforce",
            "--allow /tmp/x/open_loop --file-protect /srv/data --file-deny /srv/data \
             --file-allow-prog /tmp/x/open_loop",
        )?;
        vm.run_ok("/tmp/x/open_loop 1 /srv/data/db")?;
        unprotected.push(opens(&mut vm, "/srv/pub/x")?);
        cached.push(opens(&mut vm, "/srv/data/db")?);
        ctl_loaded.push(calls(&mut vm)?);
        crate::exec::stop_agent(&mut vm)?;
        vm.run_ok("rmmod trustbind")?;
    }
    let per = |t: f64| t / opens_n as f64 * 1e6;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |v: &[f64]| (v[v.len() - 1] / v[0] - 1.0) * 100.0;
    let a = median(&mut absent);
    println!(
        "open() + close() of one file, {opens_n} per round, {rounds} rounds alternating, guest clock ({mode}):"
    );
    println!(
        "  module absent:              {:>7.2} µs (median; rounds spread {:.1} %)",
        per(a),
        spread(&absent)
    );
    for (what, v) in [
        ("loaded, unprotected file:", &mut unprotected),
        ("loaded, cached protected:", &mut cached),
    ] {
        let m = median(v);
        println!(
            "  {what:<27} {:>7.2} µs (median; rounds spread {:.1} %; {:+.2} % vs absent)",
            per(m),
            spread(v),
            (m / a - 1.0) * 100.0
        );
    }
    let (ca, cl) = (median(&mut ctl_absent), median(&mut ctl_loaded));
    println!("control: getppid(), no hook of the module on its path, {opens_n} per round:");
    println!(
        "  module absent:              {:>7.3} µs (median; rounds spread {:.1} %)",
        per(ca),
        spread(&ctl_absent)
    );
    println!(
        "  loaded, agent running:      {:>7.3} µs (median; rounds spread {:.1} %; {:+.2} % vs absent)",
        per(cl),
        spread(&ctl_loaded),
        (cl / ca - 1.0) * 100.0
    );
    vm.run_ok("pkill -x cat; true")?;
    vm.shutdown()?;
    Ok(())
}
