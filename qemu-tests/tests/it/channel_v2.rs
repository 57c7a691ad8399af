//! Channel keys v2 end to end (`docs/CHANNEL-KEYS-V2.md`): the appliance
//! image and the two protected hosts of `channel_e2e` (same policy), with
//! both agents speaking v2 (`--channels-v2`). The server's `listen()`
//! registers `socat` as the server program of port 7200; the client's
//! first connect gets a grant (one appliance round trip, the ticket sealed
//! to b's host key); its kernel sends the ticket in-band after the
//! handshake and both kernels derive the connection's keys themselves.
//!
//! Proves: a file sent from `a` to `b` arrives intact while the bridge
//! holds TLS application-data records and not one plaintext canary; the
//! second and third connects of the pair ask the appliance nothing (one
//! `channel.grant` audit row for three channels; `a`'s module counts two
//! grant hits, `b`'s three tickets accepted and none refused); an
//! unapproved client program is still refused at connect; no kernel
//! warning. (What a rogue host, a replayed or a changed ticket gets is
//! proven at the appliance, `appliance/tests/grants.rs`, and by the
//! module's known answer at load, `module_lifecycle`.)

use anyhow::{ensure, Result};

use crate::channel_e2e::{setup, Setup, CHANNELS, PORT};
use crate::common::{self, wait_for};
use crate::exec::counter;

/// Plaintext marker: in the file sent, never on the wire.
const CANARY: &str = "TRUSTBIND-CHANNEL-CANARY";

/// Restarts `vm`'s agent speaking channel keys v2 and waits until it is
/// connected again.
fn agent_v2(vm: &mut trustbind_qemu_tests::Vm) -> Result<()> {
    // As channel_e2e restarts a killed agent: its binary is pinned, and
    // the status file is emptied with a shell redirection (no agent
    // answers for other programs meanwhile).
    vm.run_ok("pkill -9 -x trustbind-agent || true")?;
    vm.run_ok(&format!(": >{}/status.json", common::STATE))?;
    let bg = vm.spawn_bg(&format!(
        "exec /tb/trustbind-agent --state {} run --channels-v2 --verdict-timeout-ms 30000 \
         --call-timeout-ms 25000 >>/run/agent-v2.log 2>&1",
        common::STATE
    ))?;
    if let Err(e) = wait_for(
        vm,
        "the v2 agent to connect",
        &format!(
            "grep -q '\"connected\": true' {}/status.json",
            common::STATE
        ),
        120,
    ) {
        let logs = vm.run(&format!(
            "cat /run/agent-v2.log {}; dmesg | tail -30",
            bg.log
        ))?;
        anyhow::bail!("{e}\nthe v2 agent's logs: {logs:?}");
    }
    // Its module has this host's keys (the sealed HostKeys order).
    wait_for(
        vm,
        "the host keys",
        "dmesg | grep -q 'channel host keys: epoch'",
        60,
    )
}

/// Starts a one-connection socat server on `b` writing to `out`.
fn serve(vm: &mut trustbind_qemu_tests::Vm, out: &str) -> Result<()> {
    vm.run_ok(&format!("rm -f {out}"))?;
    vm.spawn_bg(&format!(
        "exec socat -u TCP4-LISTEN:{PORT},reuseaddr OPEN:{out},creat,trunc"
    ))?;
    wait_for(
        vm,
        "the server to listen",
        &format!("grep -q ':{PORT:04X} 00000000:0000 0A ' /proc/net/tcp"),
        120,
    )
}

fn grants(admin: &trustbind_qemu_tests::Admin) -> Result<usize> {
    let audit = common::export_audit(admin)?;
    Ok(audit
        .lines()
        .filter(|l| l.contains("\"channel.grant\""))
        .count())
}

#[test]
#[ignore = "not passing yet: the restarted --channels-v2 agent is not seen connected in time (issue 15, session 19 note); run with --ignored"]
fn channel_v2_end_to_end() -> Result<()> {
    let Setup {
        net,
        admin,
        mut a,
        mut b,
        c,
        sent,
        appl: _appl,
        work: _work,
        ..
    } = setup(CHANNELS)?;
    let b_ip = b.ip().to_string();
    agent_v2(&mut b)?;
    agent_v2(&mut a)?;

    // The first channel: one grant, the ticket in-band, the file intact,
    // only TLS on the wire.
    let cap = net.start_capture("channel-v2")?;
    serve(&mut b, "/tmp/x/recv1")?;
    wait_for(
        &mut b,
        "the listen's registration",
        "dmesg | grep -q 'listen registered for channels'",
        60,
    )?;
    a.run_ok(&format!("socat -u OPEN:/tmp/x/send TCP4:{b_ip}:{PORT}"))?;
    wait_for(
        &mut b,
        "the file",
        &format!("[ \"$(sha256sum </tmp/x/recv1)\" = \"{}\" ]", sent.trim()),
        120,
    )?;
    let data = cap.stop()?;
    ensure!(
        !data.contains(CANARY.as_bytes()),
        "plaintext canary on the bridge: {}",
        data.pcap().display()
    );
    ensure!(
        data.contains(b"TBT2") && data.contains(&[0x17, 0x03, 0x03]),
        "no ticket message or no TLS application-data record on the bridge: {}",
        data.pcap().display()
    );
    ensure!(grants(&admin)? == 1, "channel.grant rows after one channel");

    // Two more channels of the pair: no appliance round trip on either
    // side (no new grant row), each keyed from the cached grant.
    for n in 2..=3 {
        let out = format!("/tmp/x/recv{n}");
        serve(&mut b, &out)?;
        a.run_ok(&format!("echo channel-{n} | socat -u - TCP4:{b_ip}:{PORT}"))?;
        wait_for(
            &mut b,
            "the data",
            &format!("grep -qx channel-{n} {out}"),
            120,
        )?;
    }
    ensure!(
        grants(&admin)? == 1,
        "repeat connects asked the appliance for grants"
    );
    let hits = counter(&mut a, "v2_grant_hits")?;
    let sent_tickets = counter(&mut a, "v2_tickets_sent")?;
    let accepted = counter(&mut b, "v2_tickets_accepted")?;
    let refused = counter(&mut b, "v2_tickets_refused")?;
    ensure!(
        hits == 2 && sent_tickets == 3 && accepted == 3 && refused == 0,
        "grant hits {hits}, tickets sent {sent_tickets}, accepted {accepted}, refused {refused}"
    );

    // An unapproved client program: refused at connect, as with v1.
    serve(&mut b, "/tmp/x/recv4")?;
    let out = a.run(&format!(
        "echo rogue | /tmp/x/rogue-socat -u - TCP4:{b_ip}:{PORT}"
    ))?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "unapproved client was not refused: {out:?}"
    );
    b.run_ok(&format!("pkill -f '[T]CP4-LISTEN:{PORT}' || true"))?;

    for vm in [&mut a, &mut b] {
        let dmesg = vm.run_ok("dmesg")?.stdout;
        ensure!(
            !dmesg.contains("WARNING:") && !dmesg.contains("BUG:"),
            "kernel warning on {}:\n{dmesg}",
            vm.name()
        );
    }
    for vm in [a, b, c] {
        vm.shutdown()?;
    }
    Ok(())
}
