//! Soak with faults (issue 14): the appliance image and two protected
//! hosts (`a` runs the load, `b` serves channels) on the debug kernel, in
//! enforce mode, under a sustained mix for `TRUSTBIND_SOAK_SECONDS`
//! (default 60; `cargo xtask soak MINUTES` runs the long version):
//!
//! - `stress-ng --exec` as uids 1000 and 65534 (cached execs, fork+exec
//!   as fast as the VM goes);
//! - `stress-ng --sock` over loopback TCP as root and `stress-ng
//!   --sockfd` (file descriptors passed over a UNIX-domain connection) as
//!   uid 1000 (connect/accept and UNIX connect qualification);
//! - a loop of cold execs (a new copy of `true` each round: a hash nobody
//!   approved, one appliance decision each) and TCP connects to `b`'s
//!   channel port (each one a keyed channel: two halves, a key, kTLS).
//!
//! Meanwhile the test kills `a`'s agent and restarts it, powers the
//! appliance off and back on (the agents answer offline and spool),
//! moves the policy generation, and kills `b`'s agent.
//!
//! Afterwards: not one unapproved cold program ran; every cold refusal
//! an agent gave (online or offline) has its decision row in the audit
//! log, whose hash chain verifies; the exec counters add up (every
//! decision started as a cache hit or a question and ended exactly once);
//! every channel that was bound was reported closed or is still open, and
//! none is; the lineage table holds no more entries than there are live
//! processes; unreclaimable slab came back within [`SLAB_BOUND_KIB`] of
//! where it started (the caches that grew most are printed); and no kernel report of any kind (lockdep, sleeping
//! in atomic, KFENCE, kmemleak, warnings, taint) on either host. The
//! figures (operations per second, memory) are printed for
//! docs/BENCHMARKS.md.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use trustbind_qemu_tests::Vm;

use crate::channel_e2e::{setup, Setup, CHANNELS};
use crate::common::{export_audit, start_agent, wait_for, wait_new_agent, STATE};

/// Policy besides the channel test's: stress-ng may connect and accept on
/// loopback ports 22000–22099 in plaintext, and programs of `system` may
/// connect to each other over UNIX sockets.
const SOAK: &str = r#"
@id("soak-stress-ng-tcp")
permit (
    principal,
    action in [Trustbind::Action::"connect", Trustbind::Action::"accept"],
    resource
)
when {
    resource.port >= 22000 && resource.port < 22100 &&
    context.program in Trustbind::ProgramGroup::"system"
};

@id("soak-system-ipc")
permit (
    principal,
    action == Trustbind::Action::"ipc_connect",
    resource
)
when {
    context.program in Trustbind::ProgramGroup::"system" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"system"
};
"#;

/// Added to the policy halfway: it changes no decision of the soak.
const GENERATION_RULE: &str = r#"
@id("soak-generation")
permit (
    principal,
    action == Trustbind::Action::"exec",
    resource in Trustbind::ProgramGroup::"soak-nobody"
);
"#;

/// How much unreclaimable slab may grow over the soak (KiB): the caches
/// the kernel itself keeps warm after a load (dentries of `/tmp/soak`,
/// socket and task slabs) plus nothing of ours: the module allocates its
/// tables at load.
const SLAB_BOUND_KIB: i64 = 8192;

/// The load script, run on `a` in the background: `$1` seconds, `$2` the
/// channel server's address. Results go to `/tmp/soak/`.
const LOAD: &str = r#"
set -u
D=$1; B=$2; S=/sys/kernel/debug/trustbind
mkdir -p /tmp/soak && chmod 1777 /tmp/soak && cd /tmp/soak
# stress-ng runs niced: on the VM's one CPU it would otherwise starve the
# cold execs and channel connects below, which are the point.
as() { u=$1; shift; setpriv --reuid=$u --regid=$u --clear-groups nice -n 15 "$@"; }
as 1000 stress-ng --exec 1 --timeout ${D}s --metrics-brief >sng-exec-1000.log 2>&1 &
as 65534 stress-ng --exec 1 --timeout ${D}s --metrics-brief >sng-exec-65534.log 2>&1 &
as 0 stress-ng --sock 1 --sock-port 22000 --timeout ${D}s --metrics-brief >sng-sock-tcp.log 2>&1 &
as 1000 stress-ng --sockfd 1 --timeout ${D}s --metrics-brief >sng-sockfd-unix.log 2>&1 &
# The faults start only once every stressor runs: their first (cold) execs
# go to the appliance, and a niced launch can take seconds under TCG; a
# launch refused while an agent is away would leave a stressor out.
for u in 1000 65534 0; do
    until pgrep -u $u -x stress-ng >/dev/null; do sleep 0.2; done
done
echo started >started
end=$(( $(date +%s) + D ))
i=0
while [ "$(date +%s)" -lt "$end" ]; do
    i=$((i+1))
    f=/tmp/soak/cold-$i
    cp /usr/bin/true $f && printf '%08d' $i >>$f && chmod 755 $f
    sha=$(sha256sum <$f | cut -d' ' -f1)
    n0="$(cat $S/exec_no_agent $S/exec_timeouts $S/exec_busy $S/exec_interrupted)"
    if $f 2>/dev/null; then r=ran; else r=refused; fi
    n1="$(cat $S/exec_no_agent $S/exec_timeouts $S/exec_busy $S/exec_interrupted)"
    [ "$n0" = "$n1" ] && by=agent || by=module
    echo "cold $i $sha $r $by" >>cold.log
    if echo "soak $i" | timeout 10 socat -u - TCP4:$B:7200 2>>chan.err; then
        echo "chan $i ok" >>chan.log
    else
        echo "chan $i failed" >>chan.log
    fi
    sleep 0.2
done
wait
echo done >done
"#;

fn soak_seconds() -> Result<u64> {
    match std::env::var("TRUSTBIND_SOAK_SECONDS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("TRUSTBIND_SOAK_SECONDS={v:?}: want seconds")),
        Err(_) => Ok(60),
    }
}

/// The module's counters on `vm` (`/sys/kernel/debug/trustbind/*`), read
/// by one process: a program per file would move the exec counters
/// between reads.
fn counters(vm: &mut Vm) -> Result<std::collections::BTreeMap<String, i64>> {
    let out = vm.run_ok("grep -r . /sys/kernel/debug/trustbind")?.stdout;
    Ok(out
        .lines()
        .filter_map(|l| l.rsplit_once(':'))
        .filter_map(|(k, v)| {
            let name = k.rsplit('/').next()?;
            Some((name.to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

/// Unreclaimable slab (KiB) after dropping what the kernel can drop.
fn slab_kib(vm: &mut Vm) -> Result<i64> {
    let out = vm.run_ok("sync; echo 3 >/proc/sys/vm/drop_caches; grep SUnreclaim /proc/meminfo")?;
    out.stdout
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no SUnreclaim in {:?}", out.stdout))
}

/// Bytes of slab pages held per cache (`/proc/slabinfo`: slabs × pages
/// per slab × 4 KiB, what `SUnreclaim` counts, partly filled slabs
/// included); empty when the kernel shows no slabinfo (`CONFIG_SLUB_DEBUG`).
fn slab_caches(vm: &mut Vm) -> Result<std::collections::BTreeMap<String, i64>> {
    let out = vm.run_ok("cat /proc/slabinfo 2>/dev/null || true")?;
    Ok(out
        .stdout
        .lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let pages_per_slab: i64 = f.get(5)?.parse().ok()?;
            let slabs: i64 = f.get(14)?.parse().ok()?;
            Some(((*f.first()?).to_owned(), slabs * pages_per_slab * 4096))
        })
        .collect())
}

/// The `n` caches that grew most from `before` to `after`, for the figures.
fn slab_growth(
    before: &std::collections::BTreeMap<String, i64>,
    after: &std::collections::BTreeMap<String, i64>,
    n: usize,
) -> String {
    let mut grew: Vec<(i64, &str)> = after
        .iter()
        .map(|(k, v)| (v - before.get(k).copied().unwrap_or(0), k.as_str()))
        .filter(|(d, _)| *d > 0)
        .collect();
    grew.sort_by_key(|x| std::cmp::Reverse(x.0));
    grew.iter()
        .take(n)
        .map(|(d, k)| format!("{k} {:+} KiB", d / 1024))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Kills the agent on `vm` with SIGKILL and starts a new one.
fn restart_agent(vm: &mut Vm) -> Result<()> {
    // Online first (it may still be reconnecting after the appliance came
    // back: offline, it refuses what it never saw). What the harness runs
    // while no agent answers must then be in the kernel's cache (the
    // policy generation may have moved since).
    wait_for(
        vm,
        "the agent to be connected",
        &format!("grep -q '\"connected\": true' {STATE}/status.json"),
        300,
    )?;
    vm.run_ok("base64 -d </dev/null; setsid true; sleep 0; pidof init; grep -q x /dev/null || :")?;
    let pid = vm.run_ok("pidof trustbind-agent")?.stdout.trim().to_owned();
    vm.run_ok(&format!("kill -9 {pid}"))?;
    std::thread::sleep(Duration::from_secs(3));
    start_agent(vm)?;
    wait_new_agent(vm, Some(&pid))?;
    Ok(())
}

/// stress-ng's `--metrics-brief` bogo ops/s (real time) for `stressor`:
/// the `metrc:` line `[pid] stressor ops real usr sys ops/s(real) ...`.
fn bogo_ops_per_s(log: &str, stressor: &str) -> Option<f64> {
    log.lines().filter(|l| l.contains("metrc:")).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let at = f.iter().position(|w| *w == stressor)?;
        f.get(at + 5)?.parse().ok()
    })
}

#[test]
fn soak_with_faults() -> Result<()> {
    let secs = soak_seconds()?;
    let policy = format!("{CHANNELS}{SOAK}");
    let Setup {
        admin,
        mut a,
        mut b,
        c,
        mut appl,
        work,
        ..
    } = setup(&policy)?;
    c.shutdown()?;
    let b_ip = b.ip().to_string();
    b.spawn_bg("exec socat -u TCP4-LISTEN:7200,fork,reuseaddr OPEN:/dev/null")?;
    crate::net_qualify::wait_listening(&mut b, 7200)?;
    let slab_before = [slab_kib(&mut a)?, slab_kib(&mut b)?];
    let caches_before = slab_caches(&mut a)?;

    use base64::Engine;
    a.run_ok(&format!(
        "echo {} | base64 -d >/tmp/soak.sh",
        base64::engine::general_purpose::STANDARD.encode(LOAD)
    ))?;
    a.spawn_bg(&format!("exec bash /tmp/soak.sh {secs} {b_ip}"))?;
    wait_for(
        &mut a,
        "the stressors to start",
        "test -e /tmp/soak/started",
        300,
    )?;
    let started = Instant::now();
    let at = |f: f64| started + Duration::from_secs_f64(secs as f64 * f);
    let until = |t: Instant| std::thread::sleep(t.saturating_duration_since(Instant::now()));

    // The faults, in turn.
    until(at(0.15));
    eprintln!("soak: killing a's agent");
    restart_agent(&mut a)?;
    until(at(0.3));
    eprintln!("soak: powering the appliance off for 10 s");
    appl.powerdown()?;
    std::thread::sleep(Duration::from_secs(10));
    appl.boot()?;
    appl.wait_serving()?;
    until(at(0.6));
    eprintln!("soak: moving the policy generation");
    let file = work.path().join("soak-policy.cedar");
    // One more rule (for a group nobody is in): a new policy version.
    std::fs::write(
        &file,
        format!(
            "{}{policy}{GENERATION_RULE}",
            crate::common::SYSTEM_PROGRAMS
        ),
    )?;
    admin.run(&[
        "policy",
        "upload",
        &file.display().to_string(),
        "-m",
        "soak: one more rule, a new generation",
        "--activate",
    ])?;
    until(at(0.8));
    eprintln!("soak: killing b's agent");
    restart_agent(&mut b)?;

    wait_for(&mut a, "the load to finish", "test -e /tmp/soak/done", 600)?;
    let elapsed = started.elapsed().as_secs_f64();
    for vm in [&mut a, &mut b] {
        wait_for(
            vm,
            "the agent connected with its spool delivered",
            &format!(
                "grep -q '\"connected\": true' {STATE}/status.json && grep -q '\"spool_backlog\": 0' {STATE}/status.json"
            ),
            300,
        )?;
    }

    // Not one unapproved program ran; every agent verdict is audited.
    let cold = a.run_ok("cat /tmp/soak/cold.log")?.stdout;
    let cold: Vec<Vec<&str>> = cold.lines().map(|l| l.split(' ').collect()).collect();
    ensure!(cold.len() >= 5, "too few cold execs: {}", cold.len());
    let ran: Vec<_> = cold.iter().filter(|f| f.get(3) == Some(&"ran")).collect();
    ensure!(ran.is_empty(), "unapproved programs ran: {ran:?}");
    let audit = export_audit(&admin)?;
    let by_agent: Vec<&str> = cold
        .iter()
        .filter(|f| f.get(4) == Some(&"agent"))
        .filter_map(|f| f.get(2).copied())
        .collect();
    // An online refusal is a `decision` row, an offline one the agent's
    // spooled `agent.exec.offline` row: either names the program's hash.
    let missing: Vec<&&str> = by_agent
        .iter()
        .filter(|sha| !audit.lines().any(|l| l.contains(**sha)))
        .collect();
    ensure!(
        missing.is_empty(),
        "{} of {} agent refusals have no audit row: {missing:?}",
        missing.len(),
        by_agent.len()
    );
    let verify = admin.run(&["audit", "verify"])?;
    ensure!(verify.contains("intact"), "audit chain: {verify:?}");

    // Counters add up; no channel left open or unaccounted for.
    let mut figures = Vec::new();
    for (name, vm) in [("a", &mut a), ("b", &mut b)] {
        let k = counters(vm)?;
        let g = |n: &str| k.get(n).copied().unwrap_or(0);
        ensure!(g("exec_unreadable") == 0, "{name}: unreadable execs: {k:?}");
        let started_n = g("exec_cache_hits") + g("exec_asked");
        let ended = g("exec_allowed")
            + g("exec_denied")
            + g("exec_would_deny")
            + g("exec_pinned_agent")
            + g("exec_interrupted");
        ensure!(
            started_n == ended,
            "{name}: exec decisions started {started_n} (hits + asked) != ended {ended}: {k:?}"
        );
        ensure!(
            g("net_bound") == g("net_closed") + g("net_bound_open") + g("net_close_untracked")
                && g("net_closed") == g("net_close_sent") + g("net_close_dropped"),
            "{name}: channel counters do not add up: {k:?}"
        );
        // The lineage table holds live processes only: after the load it
        // is no larger than the process count (a missed exit would leak
        // an entry for every process the soak started).
        let live: i64 = vm
            .run_ok("ls -d /proc/[0-9]* | wc -l")?
            .stdout
            .trim()
            .parse()?;
        ensure!(
            g("lineage_procs") <= live,
            "{name}: the lineage table knows {} processes, {live} are alive",
            g("lineage_procs")
        );
        figures.push(format!(
            "{name}: execs decided {started_n} (cache hits {}), exec refusals {}, channels bound {}, \
             lineage entries {} for {live} live processes",
            g("exec_cache_hits"),
            g("exec_denied"),
            g("net_bound"),
            g("lineage_procs")
        ));
    }
    let chan = a.run_ok("cat /tmp/soak/chan.log")?.stdout;
    let chan_ok = chan.lines().filter(|l| l.ends_with(" ok")).count();
    ensure!(chan_ok > 0, "no channel connect succeeded: {chan}");
    for vm in [&mut a, &mut b] {
        wait_for(
            vm,
            "every channel closed",
            "grep -qx 0 /sys/kernel/debug/trustbind/net_bound_open",
            150,
        )?;
    }

    // Memory came back; no kernel report of any kind.
    let slab_after = [slab_kib(&mut a)?, slab_kib(&mut b)?];
    let caches_after = slab_caches(&mut a)?;
    figures.push(format!(
        "a: slab caches that grew most: {}",
        slab_growth(&caches_before, &caches_after, 6)
    ));
    for (i, name) in ["a", "b"].iter().enumerate() {
        let grew = slab_after[i] - slab_before[i];
        figures.push(format!(
            "{name}: unreclaimable slab {} KiB before, {} KiB after ({grew:+} KiB)",
            slab_before[i], slab_after[i]
        ));
        ensure!(
            grew < SLAB_BOUND_KIB,
            "{name}: unreclaimable slab grew by {grew} KiB (bound {SLAB_BOUND_KIB})"
        );
    }
    // The exec stressors must have run throughout; a socket stressor may
    // give up when a connect is refused (appliance off, no agent).
    for (log, stressor, required) in [
        ("sng-exec-1000.log", "exec", true),
        ("sng-exec-65534.log", "exec", true),
        ("sng-sock-tcp.log", "sock", false),
        ("sng-sockfd-unix.log", "sockfd", false),
    ] {
        let text = a.run_ok(&format!("cat /tmp/soak/{log}"))?.stdout;
        let rate = bogo_ops_per_s(&text, stressor);
        ensure!(
            !required || rate.is_some_and(|r| r > 0.0),
            "stress-ng {log}: no throughput figure:\n{text}"
        );
        figures.push(match rate {
            Some(r) => format!("{log}: {r:.1} bogo ops/s"),
            None => format!(
                "{log}: stopped early: {}",
                text.lines().last().unwrap_or("")
            ),
        });
    }
    figures.push(format!(
        "cold execs {} and channel connects {chan_ok} ok of {} in {elapsed:.0} s",
        cold.len(),
        chan.lines().count()
    ));
    eprintln!("soak: figures (debug kernel, TCG wall clock):");
    for f in &figures {
        eprintln!("soak:   {f}");
    }
    a.check_health()?;
    b.check_health()?;
    a.shutdown()?;
    b.shutdown()?;
    appl.powerdown()?;
    Ok(())
}
