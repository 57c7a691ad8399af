//! A channel's terms in one VM over loopback, keyed by
//! `tb-fakeagent --net-bind --net-tls12 --net-idle-s 6` (what the appliance
//! sends for `@encrypt("offload") @channel_idle_s("6")`).
//!
//! Proves: both ends carry TLS 1.2 AES-256-GCM kTLS state (`ss` shows the
//! ULP's version and cipher) and data arrives intact, encrypted on `lo`;
//! traffic keeps the channel open past its idle timeout; once idle for the
//! whole timeout the module resets the connection (`net_idle_ended` 2, one
//! per end), reports both ends closed with reason `idle`, and the server
//! sees the end of its connection; no kernel warning.

use anyhow::{ensure, Result};

use crate::exec::{counter, host_with_module, start_agent_with, stop_agent, AGENT_LOG};
use crate::net_channel::{capture, captured, CANARY};
use crate::net_qualify::{dmesg_has, serve, wait_received};

const PORT: u16 = 7120;

#[test]
fn net_channel_terms() -> Result<()> {
    let mut vm = host_with_module()?;
    start_agent_with(
        &mut vm,
        "enforce",
        "--no-cache --net-bind --net-tls12 --net-idle-s 6 --net-allow /usr/bin/socat",
    )?;
    vm.run_ok("mkdir -p /tmp/x && mkfifo /tmp/x/feed")?;
    capture(&mut vm, PORT, "/tmp/x/terms.pcap")?;
    serve(&mut vm, "/usr/bin/socat", PORT, "/tmp/x/recv")?;
    vm.spawn_bg(&format!(
        "exec socat -u OPEN:/tmp/x/feed TCP4:127.0.0.1:{PORT}"
    ))?;
    vm.spawn_bg(&format!(
        "exec 3>/tmp/x/feed; echo one-{CANARY} >&3; exec sleep 600"
    ))?;
    wait_received(&mut vm, "/tmp/x/recv", &format!("one-{CANARY}"))?;

    // TLS 1.2 records on both sockets (client and server end).
    let ss = vm
        .run_ok(&format!(
            "ss -tni state established '( sport = :{PORT} or dport = :{PORT} )'"
        ))?
        .stdout;
    let tls12 = ss
        .matches("tcp-ulp-tls version: 1.2 cipher: aes-gcm-256")
        .count();
    ensure!(
        tls12 == 2,
        "expected two TLS 1.2 AES-256-GCM sockets:\n{ss}"
    );

    // Traffic within the timeout keeps the channel.
    // (The server only receives: its end is kept by what it gets.)
    for i in 0..3 {
        vm.run_ok(&format!(
            "sleep 3; timeout 10 sh -c 'echo more-{i} >/tmp/x/feed'"
        ))?;
    }
    wait_received(
        &mut vm,
        "/tmp/x/recv",
        &format!("one-{CANARY}\nmore-0\nmore-1\nmore-2"),
    )?;
    ensure!(
        counter(&mut vm, "net_idle_ended")? == 0,
        "a channel with traffic every 3 s ended (idle timeout 6 s)"
    );

    // Then silence: both ends end idle, the connection is reset.
    let mut ended = 0;
    for _ in 0..60 {
        ended = counter(&mut vm, "net_idle_ended")?;
        if ended >= 2 {
            break;
        }
        vm.run_ok("sleep 0.5")?;
    }
    ensure!(ended == 2, "net_idle_ended {ended} after 30 s of silence");
    ensure!(
        dmesg_has(&mut vm, |l| l.starts_with("trustbind: channel ")
            && l.contains(" ended idle (connection reset): accept end"))?,
        "no idle line in dmesg"
    );
    let mut idle = 0;
    for _ in 0..50 {
        let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
        idle = log
            .lines()
            .filter(|l| l.starts_with("closed ") && l.ends_with(" idle"))
            .count();
        if idle == 2 {
            break;
        }
        vm.run_ok("sleep 0.2")?;
    }
    ensure!(idle == 2, "{idle} closed ... idle lines in the agent's log");
    let ss = vm
        .run_ok(&format!(
            "ss -tn state established '( sport = :{PORT} or dport = :{PORT} )' | tail -n +2"
        ))?
        .stdout;
    ensure!(
        ss.trim().is_empty(),
        "still established after the idle end:\n{ss}"
    );
    let (canaries, records) = captured(&mut vm, "/tmp/x/terms.pcap")?;
    ensure!(
        canaries == 0 && records >= 4,
        "capture: {canaries} plaintext canaries, {records} TLS records"
    );

    stop_agent(&mut vm)?;
    vm.run_ok("pkill -x sleep; pkill -x socat; sleep 0.5; rmmod trustbind")?;
    let dmesg = vm.run_ok("dmesg")?.stdout;
    ensure!(
        !dmesg.contains("WARNING:") && !dmesg.contains("BUG:") && !dmesg.contains("Oops"),
        "kernel warnings:\n{dmesg}"
    );
    vm.shutdown()?;
    Ok(())
}
