//! The netfilter backstop in one VM over loopback, with
//! `tb-fakeagent --net-bind` keying allowed connections.
//!
//! Proves: a plaintext connection opened before the module qualified
//! connects (no agent yet) carries data at first; once a bound channel to
//! the same service makes it a protected service, that connection's next
//! payload never leaves the host (not on `lo`, not at the server; counted
//! in `net_backstop_payload_dropped`), while bound connections to the
//! service still carry data (TLS records on the wire); a raw socket's SYN
//! to the protected service is dropped (`net_backstop_syn_dropped`; the
//! send fails with `EPERM`) and one to an unprotected port is not; the
//! service stays protected when the policy generation moves (T-29), and
//! only in its own network namespace: the same address and port in
//! another one keeps its plaintext (T-30); with
//! the agent gone the module unloads
//! cleanly, no kernel warning.

use anyhow::{ensure, Result};

use crate::exec::{counter, host_with_module, start_agent_with, stop_agent, AGENT_LOG};
use crate::net_channel::{capture, captured, CANARY};
use crate::net_qualify::{dmesg_has, wait_listening};

const PORT: u16 = 7110;

/// A perl one-liner sending one TCP SYN to 127.0.0.1:`port` from a raw
/// socket (no connect, no TCP socket).
fn raw_syn(port: u16) -> String {
    format!(
        "perl -MSocket -e 'socket(R, PF_INET, SOCK_RAW, 6) or die \"socket: $!\\n\"; \
         my $h = pack(\"nnNNCCnnn\", 40000, {port}, 1, 0, 0x50, 0x02, 1024, 0, 0); \
         defined(send(R, $h, 0, pack_sockaddr_in(0, inet_aton(\"127.0.0.1\")))) \
         or die \"send: $!\\n\"'"
    )
}

/// Waits (≤ 20 s) until `cmd` succeeds.
fn wait_for(vm: &mut trustbind_qemu_tests::Vm, cmd: &str) -> Result<()> {
    for _ in 0..100 {
        if vm.run(cmd)?.status == 0 {
            return Ok(());
        }
        vm.run_ok("sleep 0.2")?;
    }
    anyhow::bail!("never true: {cmd}")
}

/// Waits (≤ 20 s) until `file` holds exactly `want` (lines).
fn wait_lines(vm: &mut trustbind_qemu_tests::Vm, file: &str, want: &str) -> Result<()> {
    let mut got = String::new();
    for _ in 0..100 {
        got = vm
            .run_ok(&format!("cat {file} 2>/dev/null || true"))?
            .stdout;
        if got.trim() == want {
            return Ok(());
        }
        vm.run_ok("sleep 0.2")?;
    }
    anyhow::bail!("{file} holds {got:?}, not {want:?}")
}

#[test]
fn net_backstop() -> Result<()> {
    let mut vm = host_with_module()?;
    vm.run_ok("mkdir -p /tmp/x && mkfifo /tmp/x/feed")?;
    // One appended line per connection.
    vm.spawn_bg(&format!(
        "exec socat -u TCP4-LISTEN:{PORT},reuseaddr,fork OPEN:/tmp/x/recv,creat,append"
    ))?;
    wait_listening(&mut vm, PORT)?;
    capture(&mut vm, PORT, "/tmp/x/bs.pcap")?;

    // No agent yet (disabled mode): a plaintext connection, left open.
    vm.spawn_bg(&format!(
        "exec socat -u OPEN:/tmp/x/feed TCP4:127.0.0.1:{PORT}"
    ))?;
    vm.spawn_bg("exec 3>/tmp/x/feed; echo before >&3; exec sleep 600")?;
    wait_lines(&mut vm, "/tmp/x/recv", "before")?;
    // The same address and port in another network namespace: another
    // service, with a plaintext connection of its own.
    vm.run_ok("ip netns add other && ip -n other link set lo up && mkfifo /tmp/x/feed-ns")?;
    vm.spawn_bg(&format!(
        "exec ip netns exec other socat -u TCP4-LISTEN:{PORT},reuseaddr,fork \
         OPEN:/tmp/x/recv-ns,creat,append"
    ))?;
    wait_for(
        &mut vm,
        &format!("ip netns exec other grep -q ':{PORT:04X} 00000000:0000 0A' /proc/net/tcp"),
    )?;
    vm.spawn_bg(&format!(
        "exec ip netns exec other socat -u OPEN:/tmp/x/feed-ns TCP4:127.0.0.1:{PORT}"
    ))?;
    vm.spawn_bg("exec 3>/tmp/x/feed-ns; echo ns-before >&3; exec sleep 600")?;
    wait_lines(&mut vm, "/tmp/x/recv-ns", "ns-before")?;

    // A bound channel to the same service makes it protected.
    start_agent_with(
        &mut vm,
        "enforce",
        "--no-cache --net-bind --net-allow /usr/bin/socat --net-allow /usr/bin/perl",
    )?;
    vm.run_ok(&format!(
        "echo bound-one | socat -u - TCP4:127.0.0.1:{PORT}"
    ))?;
    wait_lines(&mut vm, "/tmp/x/recv", "before\nbound-one")?;
    ensure!(
        dmesg_has(&mut vm, |l| l
            == format!(
                "trustbind: protected service 127.0.0.1:{PORT} (plaintext to or from it is dropped)"
            ))?,
        "no protected-service line in dmesg"
    );

    // The old connection's plaintext now stays on the host.
    let dropped = counter(&mut vm, "net_backstop_payload_dropped")?;
    vm.run_ok(&format!("echo late-{CANARY} >/tmp/x/feed; sleep 3"))?;
    let after = counter(&mut vm, "net_backstop_payload_dropped")?;
    ensure!(
        after > dropped,
        "payload_dropped {dropped} -> {after}: the plaintext segment was not dropped"
    );
    // The other namespace's service at the same address and port is not
    // protected: its plaintext still flows (T-30).
    vm.run_ok("echo ns-after >/tmp/x/feed-ns")?;
    wait_lines(&mut vm, "/tmp/x/recv-ns", "ns-before\nns-after")?;
    // Bound connections still pass (TLS, not plaintext).
    vm.run_ok(&format!(
        "echo bound-two | socat -u - TCP4:127.0.0.1:{PORT}"
    ))?;
    wait_lines(&mut vm, "/tmp/x/recv", "before\nbound-one\nbound-two")?;
    let (canaries, records) = captured(&mut vm, "/tmp/x/bs.pcap")?;
    ensure!(
        canaries == 0 && records >= 2,
        "capture: {canaries} plaintext canaries, {records} TLS records"
    );
    ensure!(
        dmesg_has(&mut vm, |l| l
            .starts_with("trustbind: backstop dropped a segment 127.0.0.1:")
            && l.ends_with(&format!(
                "-> 127.0.0.1:{PORT} (plaintext to a protected service)"
            )))?,
        "no backstop line in dmesg"
    );

    // A raw socket's SYN: dropped toward the protected service only.
    let syn = counter(&mut vm, "net_backstop_syn_dropped")?;
    vm.run_ok(&raw_syn(PORT + 1))?;
    let unprotected = counter(&mut vm, "net_backstop_syn_dropped")?;
    // (A packet netfilter drops fails the raw socket's send with EPERM.)
    let out = vm.run(&raw_syn(PORT))?;
    ensure!(
        out.status != 0 && out.stderr.contains("Operation not permitted"),
        "the raw SYN to the protected service went out: {out:?}"
    );
    let protected = counter(&mut vm, "net_backstop_syn_dropped")?;
    ensure!(
        unprotected == syn && protected == syn + 1,
        "raw SYNs: dropped {syn} -> {unprotected} (unprotected port) -> {protected}"
    );
    // The policy generation moves: the service stays protected (T-29; it
    // was forgotten until the next bound connection).
    vm.run_ok("pkill -USR1 -x tb-fakeagent")?;
    wait_for(&mut vm, &format!("grep -q '^generation 2' {AGENT_LOG}"))?;
    let out = vm.run(&raw_syn(PORT))?;
    ensure!(
        out.status != 0 && out.stderr.contains("Operation not permitted"),
        "after a generation move the raw SYN to the protected service went out: {out:?}"
    );

    stop_agent(&mut vm)?;
    vm.run_ok("pkill -x socat; pkill -x sleep; sleep 0.5; rmmod trustbind")?;
    ensure!(
        dmesg_has(&mut vm, |l| l == "trustbind: unloaded")?,
        "module did not unload"
    );
    let dmesg = vm.run_ok("dmesg")?.stdout;
    ensure!(
        !dmesg.contains("WARNING:") && !dmesg.contains("BUG:") && !dmesg.contains("Oops"),
        "kernel warnings:\n{dmesg}"
    );
    vm.shutdown()?;
    Ok(())
}
