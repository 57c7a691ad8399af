//! Exec overhead of the PEM, measured in one VM run (a benchmark, not a
//! test: it asserts nothing about speed). Run by `cargo xtask bench`
//! (`--ignored`); prints a table.
//!
//! A small static binary (`busybox true`) is exec'd N times by a shell loop:
//! with the module absent, with the module and a warm verdict cache, and
//! cold (every exec a different copy: hashed in the kernel and asked of
//! the agent). In-kernel hashing throughput: a 64 MiB executable exec'd
//! cold, minus a cold exec of the small one. Under TCG absolute times are
//! emulation times; the ratios within the run are what counts.

use anyhow::{Context, Result};
use trustbind_qemu_tests::{Artifacts, Network, Vm};

const N: usize = 400;
const AGENT_LOG: &str = "/run/fakeagent.log";

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
    let art = Artifacts::from_env()?;
    let net = Network::new()?;
    let mut vm = net
        .vm("bench")
        .file("tb-fakeagent", env!("CARGO_BIN_EXE_tb-fakeagent"), 0o755)
        .memory_mib(1024)
        .boot(&art)?;
    let loop_true = format!("i=0; while [ $i -lt {N} ]; do /root/b/bb true; i=$((i+1)); done");
    let loop_cold = format!("i=0; while [ $i -lt {N} ]; do /root/c/bb$i true; i=$((i+1)); done");
    vm.run_ok(&format!(
        "mkdir -p /root/b /root/c && cp /bin/busybox /root/b/bb && \
         i=0; while [ $i -lt {N} ]; do cp /bin/busybox /root/c/bb$i && printf $i >>/root/c/bb$i; i=$((i+1)); done; \
         cp /bin/busybox /root/big && head -c 67108864 /dev/zero >>/root/big && chmod 755 /root/big /root/c/*"
    ))?;
    let size = vm.run_ok("stat -c %s /root/b/bb")?.stdout.trim().to_owned();
    // Warm the page cache.
    vm.run_ok("cat /root/b/bb /root/c/* /root/big >/dev/null")?;

    let absent = timed(&mut vm, &loop_true)?;
    vm.run_ok("insmod /tb/trustbind.ko")?;
    vm.spawn_bg(&format!(
        "exec /tb/tb-fakeagent --mode enforce --timeout-ms 30000 --allow-dir /usr/bin \
         --allow-dir /bin --allow-dir /usr/sbin --allow-dir /root/b --allow-dir /root/c \
         --allow /root/big --log {AGENT_LOG}"
    ))?;
    for _ in 0..600 {
        if vm.run(&format!("grep -q '^ready' {AGENT_LOG}"))?.status == 0 {
            break;
        }
        vm.run_ok("sleep 0.5")?;
    }
    vm.run_ok("/root/b/bb true")?; // first sight: into the cache
    let warm = timed(&mut vm, &loop_true)?;
    let cold = timed(&mut vm, &loop_cold)?;
    let small_cold = timed(&mut vm, "/root/c/bb0 true; /root/b/bb true")?;
    let big_cold = timed(&mut vm, "/root/big true")?;
    let hits = vm.run_ok("mount -t debugfs none /sys/kernel/debug 2>/dev/null; cat /sys/kernel/debug/trustbind/exec_cache_hits")?;
    vm.run_ok("pkill -TERM -x tb-fakeagent; sleep 1")?;
    let per = |t: f64| t / N as f64 * 1e6;
    let mib_s = 64.0 / (big_cold - small_cold / 2.0).max(1e-9);
    println!(
        "exec of a static binary ({size} bytes, busybox true), {N} execs each, one VM run (TCG):"
    );
    println!("  module absent:            {:>9.1} µs/exec", per(absent));
    println!(
        "  module, warm cache:       {:>9.1} µs/exec  ({:+.1} % vs absent)",
        per(warm),
        (warm / absent - 1.0) * 100.0
    );
    println!(
        "  module, cold (hash+ask):  {:>9.1} µs/exec  ({:.2}x absent)",
        per(cold),
        cold / absent
    );
    println!(
        "  in-kernel hashing (SHA-256+SHA-1, one pass): ~{mib_s:.0} MiB/s (64 MiB file, cold exec)"
    );
    println!("  cache hits counted: {}", hits.stdout.trim());
    vm.run_ok("rmmod trustbind")?;
    vm.shutdown()?;
    Ok(())
}
