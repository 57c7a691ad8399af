//! Bound channels in one VM over loopback: the PEM installs kTLS keys on
//! both ends of a connection, answered by `tb-fakeagent --net-bind`
//! (src/bin/tb-fakeagent.rs), which gives an allowed connect the `encrypt`
//! obligation and answers the established connect and the accept with the
//! same key (tx and rx crossed). The appliance's pairing is not involved
//! here (see the e2e channel test); this proves the kernel half.
//!
//! Proves, with unmodified programs: a file sent by `socat` arrives intact
//! while a capture on `lo` holds TLS application-data records and not one
//! plaintext canary (and the same capture, without the module, does hold
//! them: the check can fail); `curl` (a non-blocking connect) fetches a
//! file from `nginx` (a non-blocking, epoll-driven accept) intact and
//! encrypted; a TCP Fast Open `sendto(MSG_FASTOPEN)` (perl), which
//! connects without `connect()`, is qualified too: refused for a program
//! not allowed on the network, bound (data intact, encrypted) for one that
//! is; both kernel ends log the same channel and key id; an
//! established connect answered without a key fails with `EACCES`, is
//! reset, and the server receives nothing; a second process sending on the
//! socket while its connect waits for the key is held until the socket is
//! bound (no plaintext on the wire) and sent back to restart
//! (`net_send_restarted`); with the agent gone, `rmmod` succeeds while a
//! bound connection is open, and that connection still carries data,
//! still encrypted. Closing a bound connection yields one
//! `ChannelClosed` record per end (the fake agent logs `closed ...`) with
//! the channel's id and key id and byte counts at least the file's size
//! (TLS records included), and `net_bound_open` falls back.
//! `net_send_race`: sends racing the connect of their socket (T-40, see
//! there) all arrive, none in plaintext.

use anyhow::{ensure, Context, Result};
use base64::Engine as _;
use trustbind_qemu_tests::Vm;

use crate::exec::{counter, host_with_module, start_agent_with, stop_agent, AGENT_LOG};
use crate::kernel_lines;
use crate::net_qualify::{dmesg_has, serve, wait_listening, wait_received};

pub(crate) const CANARY: &str = "TRUSTBIND-PLAINTEXT-CANARY";

/// Exec'able (by hash) but not allowed on the network: a copy of perl one
/// byte longer.
const ROGUE_PERL: &str = "/tmp/x/perl-rogue";

/// A perl one-liner sending `data` to 127.0.0.1:`port` with
/// `sendto(MSG_FASTOPEN)` on a fresh, unconnected socket (no `connect()`).
fn fast_open(perl: &str, port: u16, data: &str) -> String {
    format!(
        "{perl} -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 0) or die \"socket: $!\\n\"; \
         defined(send(S, \"{data}\\n\", 0x20000000, \
         pack_sockaddr_in({port}, inet_aton(\"127.0.0.1\")))) or die \"sendto: $!\\n\"; \
         close S'"
    )
}

/// The fake agent's arguments: socat, curl and nginx may use the network,
/// over bound channels.
fn agent_args(extra: &str) -> String {
    format!(
        "--no-cache --net-bind --net-allow /usr/bin/socat --net-allow /usr/bin/curl \
         --net-allow /usr/sbin/nginx --net-allow /usr/bin/perl --allow {ROGUE_PERL} {extra}"
    )
}

/// Starts a capture of TCP port `port` on `lo` into `pcap`.
pub(crate) fn capture(vm: &mut Vm, port: u16, pcap: &str) -> Result<()> {
    vm.spawn_bg(&format!(
        "exec tcpdump -i lo --immediate-mode -U -n -w {pcap} tcp port {port} 2>{pcap}.log"
    ))?;
    for _ in 0..100 {
        if vm
            .run(&format!("grep -q 'listening on lo' {pcap}.log"))?
            .status
            == 0
        {
            return Ok(());
        }
        vm.run_ok("sleep 0.2")?;
    }
    anyhow::bail!("tcpdump did not start")
}

/// Stops every capture and counts, in `pcap`, plaintext canaries and TLS
/// application-data record headers (`17 03 03`).
pub(crate) fn captured(vm: &mut Vm, pcap: &str) -> Result<(u64, u64)> {
    vm.run_ok("sleep 1; pkill -INT -x tcpdump; sleep 1")?;
    let canaries = vm
        .run_ok(&format!("grep -a -o {CANARY} {pcap} | wc -l"))?
        .stdout;
    let records = vm
        .run_ok(&format!(
            "od -An -v -tx1 {pcap} | tr -d ' \\n' | grep -o 170303 | wc -l"
        ))?
        .stdout;
    Ok((
        canaries.trim().parse().context("canary count")?,
        records.trim().parse().context("record count")?,
    ))
}

/// The module's "bound" line for `what` to 127.0.0.1:`port`: (channel id,
/// key id prefix).
fn bound_line(vm: &mut Vm, what: &str, port: u16) -> Result<(String, String)> {
    let dmesg = vm.run_ok("dmesg")?.stdout;
    let want = format!("-> 127.0.0.1:{port} (channel ");
    let line = kernel_lines(&dmesg)
        .into_iter()
        .map(str::trim_end)
        .find(|l| l.starts_with(&format!("trustbind: {what} bound: pid ")) && l.contains(&want))
        .with_context(|| format!("no `{what} bound` line for port {port}:\n{dmesg}"))?
        .to_owned();
    let tail = line.split("(channel ").nth(1).unwrap_or_default();
    let channel = tail.split(',').next().unwrap_or_default().to_owned();
    let key = tail
        .split("key ")
        .nth(1)
        .unwrap_or_default()
        .trim_end_matches(')')
        .to_owned();
    Ok((channel, key))
}

#[test]
fn net_channel() -> Result<()> {
    let mut vm = host_with_module()?;
    vm.run_ok(&format!(
        "mkdir -p /tmp/x/www && for i in $(seq 1 3000); do echo \"{CANARY} line $i\"; done \
         >/tmp/x/send && cp /tmp/x/send /tmp/x/www/file.txt \
         && cp /usr/bin/perl {ROGUE_PERL} && printf x >>{ROGUE_PERL} && chmod 755 {ROGUE_PERL}"
    ))?;
    let sent = vm.run_ok("sha256sum </tmp/x/send")?.stdout;

    // Control, before any agent: the same transfer is plaintext on the wire.
    capture(&mut vm, 7100, "/tmp/x/plain.pcap")?;
    serve_file(&mut vm, 7100, "/tmp/x/recv0")?;
    vm.run_ok("socat -u OPEN:/tmp/x/send TCP4:127.0.0.1:7100")?;
    wait_same(&mut vm, "/tmp/x/recv0", &sent)?;
    let (canaries, _) = captured(&mut vm, "/tmp/x/plain.pcap")?;
    // (A line split between two segments does not show whole.)
    if canaries < 2900 {
        let diag = vm.run(
            "ls -l /tmp/x; cat /tmp/x/plain.pcap.log; tcpdump -n -r /tmp/x/plain.pcap | tail -5",
        )?;
        anyhow::bail!(
            "the plaintext control capture holds {canaries} of 3000 canaries:\n{}{}",
            diag.stdout,
            diag.stderr
        );
    }

    start_agent_with(&mut vm, "enforce", &agent_args(""))?;

    // socat → socat over a bound channel: intact, and only TLS records on
    // the wire.
    capture(&mut vm, 7101, "/tmp/x/bound.pcap")?;
    serve_file(&mut vm, 7101, "/tmp/x/recv1")?;
    vm.run_ok("socat -u OPEN:/tmp/x/send TCP4:127.0.0.1:7101")?;
    wait_same(&mut vm, "/tmp/x/recv1", &sent)?;
    let (canaries, records) = captured(&mut vm, "/tmp/x/bound.pcap")?;
    ensure!(
        canaries == 0 && records > 0,
        "bound channel capture: {canaries} plaintext canaries, {records} TLS records"
    );
    let (c_chan, c_key) = bound_line(&mut vm, "channel connect", 7101)?;
    let (a_chan, a_key) = bound_line(&mut vm, "accept", 7101)?;
    ensure!(
        c_chan == a_chan && c_key == a_key && c_key.len() == 16,
        "the two ends name different channels: connect {c_chan}/{c_key}, accept {a_chan}/{a_key}"
    );
    // Both ends closed (socat exits at EOF): one close record per end.
    let size: u64 = vm
        .run_ok("wc -c </tmp/x/send")?
        .stdout
        .trim()
        .parse()
        .context("file size")?;
    let ends = wait_closed(&mut vm, &c_chan)?;
    let end = |role: &str| {
        ends.iter()
            .find(|e| e.role == role)
            .with_context(|| format!("no `{role}` close record: {ends:?}"))
    };
    let (conn, acc) = (end("connect")?, end("accept")?);
    ensure!(
        ends.len() == 2 && conn.key == c_key && acc.key == c_key,
        "close records of channel {c_chan}: {ends:?} (key {c_key})"
    );
    // (`bytes_received` counts the peer's FIN as one: the kernel adds
    // `rcv_nxt` advances.)
    ensure!(
        conn.sent >= size && acc.received >= size && acc.received <= conn.sent + 1,
        "implausible byte counts for {size} bytes sent: {ends:?}"
    );
    ensure!(
        conn.received < 1024 && acc.sent < 1024,
        "a one-way transfer counted traffic back: {ends:?}"
    );
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    ensure!(
        log.lines()
            .any(|l| l.starts_with("net established 127.0.0.1:")
                && l.contains("-> 127.0.0.1:7101 ")
                && l.contains(&format!(" key {c_chan} {c_key}"))),
        "the agent's key for the established connect is not the one installed:\n{log}"
    );

    // curl (non-blocking connect) → nginx (epoll accept): intact, bound.
    vm.run_ok(
        "printf 'daemon off; master_process off; worker_processes 1; \
         error_log /tmp/x/ngx-err.log; pid /tmp/x/ngx.pid;\n\
         events {}\nhttp { access_log off; server { listen 127.0.0.1:7102; root /tmp/x/www; } }\n' \
         >/tmp/x/nginx.conf",
    )?;
    vm.spawn_bg("exec /usr/sbin/nginx -c /tmp/x/nginx.conf")?;
    wait_listening(&mut vm, 7102)?;
    capture(&mut vm, 7102, "/tmp/x/http.pcap")?;
    vm.run_ok("curl -sS -o /tmp/x/recv2 http://127.0.0.1:7102/file.txt")?;
    wait_same(&mut vm, "/tmp/x/recv2", &sent)?;
    let (canaries, records) = captured(&mut vm, "/tmp/x/http.pcap")?;
    ensure!(
        canaries == 0 && records > 0,
        "curl → nginx capture: {canaries} plaintext canaries, {records} TLS records"
    );
    bound_line(&mut vm, "channel connect", 7102)?;
    bound_line(&mut vm, "accept", 7102)?;
    vm.run_ok("pkill -x nginx || true")?;

    // Two connections of the same pair: two channels, two keys.
    serve(&mut vm, "/usr/bin/socat", 7103, "/tmp/x/recv3")?;
    vm.run_ok("echo one | socat -u - TCP4:127.0.0.1:7103")?;
    wait_received(&mut vm, "/tmp/x/recv3", "one")?;
    serve(&mut vm, "/usr/bin/socat", 7103, "/tmp/x/recv3b")?;
    vm.run_ok("echo two | socat -u - TCP4:127.0.0.1:7103")?;
    wait_received(&mut vm, "/tmp/x/recv3b", "two")?;
    let dmesg = vm.run_ok("dmesg")?.stdout;
    let keys: Vec<&str> = kernel_lines(&dmesg)
        .into_iter()
        .filter(|l| l.starts_with("trustbind: accept bound: ") && l.contains("-> 127.0.0.1:7103 "))
        .filter_map(|l| l.trim_end().split("key ").nth(1))
        .collect();
    ensure!(
        keys.len() == 2 && keys[0] != keys[1],
        "two connections did not get two keys: {keys:?}"
    );

    // TCP Fast Open: qualified although no connect() is made.
    serve(&mut vm, "/usr/bin/socat", 7106, "/tmp/x/recv6")?;
    let out = vm.run(&fast_open(ROGUE_PERL, 7106, &format!("rogue-{CANARY}")))?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "a fast open send of an unapproved program was not refused: {out:?}"
    );
    ensure!(
        dmesg_has(&mut vm, |l| l
            .starts_with("trustbind: connect denied: pid ")
            && l.ends_with("-> 127.0.0.1:7106 (denied by policy)"))?,
        "no connect denial for the fast open send"
    );
    capture(&mut vm, 7106, "/tmp/x/tfo.pcap")?;
    vm.run_ok(&fast_open("/usr/bin/perl", 7106, &format!("fast-{CANARY}")))?;
    wait_received(&mut vm, "/tmp/x/recv6", &format!("fast-{CANARY}"))?;
    let (canaries, records) = captured(&mut vm, "/tmp/x/tfo.pcap")?;
    ensure!(
        canaries == 0 && records > 0,
        "fast open capture: {canaries} plaintext canaries, {records} TLS records"
    );
    bound_line(&mut vm, "channel connect", 7106)?;

    let bound = counter(&mut vm, "net_bound")?;
    ensure!(
        bound == 10,
        "net_bound is {bound}, want 10 (five connections, two ends)"
    );
    ensure!(counter(&mut vm, "net_bind_failed")? == 0, "net_bind_failed");
    // Every end of the five connections closed and was reported.
    for _ in 0..50 {
        if counter(&mut vm, "net_close_sent")? == 10 {
            break;
        }
        vm.run_ok("sleep 0.2")?;
    }
    for (name, want) in [
        ("net_closed", 10),
        ("net_close_sent", 10),
        ("net_close_dropped", 0),
        ("net_close_untracked", 0),
        ("net_bound_open", 0),
    ] {
        let got = counter(&mut vm, name)?;
        ensure!(got == want, "{name} is {got}, want {want}");
    }

    // No key for the established connect: the connect fails, the
    // connection is reset, the server receives nothing.
    stop_agent(&mut vm)?;
    start_agent_with(&mut vm, "enforce", &agent_args("--net-no-key"))?;
    serve(&mut vm, "/usr/bin/socat", 7104, "/tmp/x/recv4")?;
    let out = vm.run("echo leaked | socat -u - TCP4:127.0.0.1:7104")?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "an established connect without a key was not refused: {out:?}"
    );
    ensure!(
        dmesg_has(&mut vm, |l| l
            .starts_with("trustbind: channel connect denied: pid ")
            && l.ends_with("-> 127.0.0.1:7104 (denied by policy)"))?,
        "no channel connect denial in dmesg"
    );
    vm.run_ok("sleep 1")?;
    let got = vm.run_ok("cat /tmp/x/recv4 2>/dev/null || true")?.stdout;
    ensure!(!got.contains("leaked"), "the server received {got:?}");
    vm.run_ok("pkill -f '[T]CP4-LISTEN:7104' || true")?;

    // A second thread (here: a forked process sharing the socket) sending
    // while the connect waits for its key: the send is held until the
    // socket is bound, so it leaves as a TLS record, never as plaintext.
    stop_agent(&mut vm)?;
    start_agent_with(&mut vm, "enforce", &agent_args("--net-key-delay-ms 3000"))?;
    capture(&mut vm, 7107, "/tmp/x/early.pcap")?;
    serve(&mut vm, "/usr/bin/socat", 7107, "/tmp/x/recv7")?;
    vm.run_ok(&format!(
        "perl -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 0) or die \"socket: $!\\n\"; \
         $a = pack_sockaddr_in(7107, inet_aton(\"127.0.0.1\")); \
         defined(my $pid = fork) or die \"fork: $!\\n\"; \
         if ($pid == 0) {{ connect(S, $a) or die \"connect: $!\\n\"; sleep 4; exit 0 }} \
         sleep 1; defined(send(S, \"early-{CANARY}\\n\", 0)) or die \"send: $!\\n\"; \
         waitpid($pid, 0); exit($? >> 8)'"
    ))?;
    wait_received(&mut vm, "/tmp/x/recv7", &format!("early-{CANARY}"))?;
    let (canaries, records) = captured(&mut vm, "/tmp/x/early.pcap")?;
    ensure!(
        canaries == 0 && records > 0,
        "a send during the key wait: {canaries} plaintext canaries, {records} TLS records"
    );
    let restarted = counter(&mut vm, "net_send_restarted")?;
    ensure!(
        restarted >= 1,
        "the held send was not sent back to restart (net_send_restarted {restarted})"
    );

    // A bound connection outlives the agent and the module: rmmod succeeds
    // while it is open, and it keeps carrying data, still encrypted (the
    // key lives in the kernel's kTLS state, not in the module).
    stop_agent(&mut vm)?;
    start_agent_with(&mut vm, "enforce", &agent_args(""))?;
    vm.run_ok("mkfifo /tmp/x/feed")?;
    capture(&mut vm, 7105, "/tmp/x/late.pcap")?;
    serve(&mut vm, "/usr/bin/socat", 7105, "/tmp/x/recv5")?;
    vm.spawn_bg("exec socat -u OPEN:/tmp/x/feed TCP4:127.0.0.1:7105")?;
    vm.spawn_bg(&format!(
        "exec 3>/tmp/x/feed; echo first-{CANARY} >&3; exec sleep 600"
    ))?;
    wait_received(&mut vm, "/tmp/x/recv5", &format!("first-{CANARY}"))?;
    bound_line(&mut vm, "accept", 7105)?;
    // Both ends carry kTLS as `ss` reports it (net_qualify.rs checks
    // that plaintext accepts carry none: T-39).
    let ss = vm
        .run_ok("ss -tnie state established '( sport = :7105 or dport = :7105 )'")?
        .stdout;
    ensure!(
        ss.matches("tcp-ulp-tls").count() == 2,
        "the bound ends do not both show kTLS:\n{ss}"
    );
    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    ensure!(
        dmesg_has(&mut vm, |l| l == "trustbind: unloaded")?,
        "module did not unload"
    );
    vm.run_ok(&format!("echo after-rmmod-{CANARY} >/tmp/x/feed"))?;
    wait_received(
        &mut vm,
        "/tmp/x/recv5",
        &format!("first-{CANARY}\nafter-rmmod-{CANARY}"),
    )?;
    let (canaries, records) = captured(&mut vm, "/tmp/x/late.pcap")?;
    ensure!(
        canaries == 0 && records >= 2,
        "after rmmod: {canaries} plaintext canaries, {records} TLS records"
    );
    let dmesg = vm.run_ok("dmesg")?.stdout;
    ensure!(
        !dmesg.contains("WARNING:") && !dmesg.contains("BUG:") && !dmesg.contains("Oops"),
        "kernel warnings:\n{dmesg}"
    );
    vm.shutdown()?;
    Ok(())
}

/// One `closed` line of the fake agent's log.
#[derive(Debug)]
struct ClosedEnd {
    key: String,
    role: String,
    sent: u64,
    received: u64,
}

/// Waits (≤ 30 s) until the fake agent logged both ends of channel `chan`
/// closed; returns every `closed` line of that channel.
fn wait_closed(vm: &mut Vm, chan: &str) -> Result<Vec<ClosedEnd>> {
    let prefix = format!("closed {chan} ");
    let mut log = String::new();
    for _ in 0..150 {
        log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
        let ends: Vec<ClosedEnd> = log
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| {
                let f: Vec<&str> = rest.split(' ').collect();
                let num = |i: usize, k: &str| f.get(i)?.strip_prefix(k)?.parse::<u64>().ok();
                Some(ClosedEnd {
                    key: f.first()?.chars().take(16).collect(),
                    role: (*f.get(1)?).to_owned(),
                    sent: num(2, "sent=")?,
                    received: num(3, "received=")?,
                })
            })
            .collect();
        if ends.len() >= 2 {
            return Ok(ends);
        }
        vm.run_ok("sleep 0.2")?;
    }
    anyhow::bail!("channel {chan}: not both ends reported closed:\n{log}")
}

/// A one-connection socat server on `port` writing what it receives to
/// `out`.
fn serve_file(vm: &mut Vm, port: u16, out: &str) -> Result<()> {
    serve(vm, "/usr/bin/socat", port, out)
}

/// Waits until `file`'s SHA-256 is `want` (`sha256sum` output of stdin).
fn wait_same(vm: &mut Vm, file: &str, want: &str) -> Result<()> {
    let mut got = String::new();
    for _ in 0..150 {
        got = vm
            .run_ok(&format!("sha256sum <{file} 2>/dev/null || true"))?
            .stdout;
        if got == want {
            return Ok(());
        }
        vm.run_ok("sleep 0.2")?;
    }
    let size = vm
        .run_ok(&format!("wc -c <{file} 2>/dev/null || true"))?
        .stdout;
    anyhow::bail!(
        "{file} is not what was sent ({} bytes, sha {got:?})",
        size.trim()
    )
}

/// A send racing the connect of its socket (T-40), 20 rounds of
/// `progs/send_race.c`: a process sends in a loop from before the connect
/// until a send succeeds, while a third keeps the socket lock busy
/// (`SO_ATTACH_FILTER`), so that sends that entered `tcp_sendmsg()` before
/// the socket was held, or read its protocol before the key went in, take
/// the lock after the SYN or after the key. Every line arrives, and none
/// in plaintext.
#[test]
fn net_send_race() -> Result<()> {
    let mut vm = host_with_module()?;
    vm.run_ok("mkdir -p /tmp/x")?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let race = crate::common::freestanding("send_race")?;
    vm.run_ok(&format!(
        "echo {} | base64 -d >/tmp/x/send_race && chmod 755 /tmp/x/send_race",
        b64.encode(&race)
    ))?;
    start_agent_with(
        &mut vm,
        "enforce",
        "--no-cache --net-bind --net-allow /usr/bin/socat --allow /tmp/x/send_race \
         --net-allow /tmp/x/send_race",
    )?;
    capture(&mut vm, 7108, "/tmp/x/race.pcap")?;
    vm.spawn_bg(
        "exec socat -d -u TCP4-LISTEN:7108,reuseaddr,fork OPEN:/tmp/x/recv8,creat,append \
         2>/tmp/x/socat8.log",
    )?;
    wait_listening(&mut vm, 7108)?;
    let before = counter(&mut vm, "net_send_restarted")?;
    let out = vm.run("/tmp/x/send_race 7108 20")?;
    ensure!(out.status == 0, "send_race: {out:?}");
    let want: Vec<String> = (1..=20).map(|i| format!("race-{i}-{CANARY}")).collect();
    let mut got = String::new();
    for _ in 0..150 {
        got = vm.run_ok("cat /tmp/x/recv8 2>/dev/null || true")?.stdout;
        if want.iter().all(|w| got.lines().any(|l| l == w)) {
            break;
        }
        vm.run_ok("sleep 0.2")?;
    }
    let missing: Vec<&String> = want
        .iter()
        .filter(|w| !got.lines().any(|l| l == *w))
        .collect();
    let dropped = counter(&mut vm, "net_backstop_payload_dropped")?;
    let (canaries, records) = captured(&mut vm, "/tmp/x/race.pcap")?;
    ensure!(
        missing.is_empty(),
        "racing sends that never arrived: {missing:?}; {canaries} plaintext canaries and \
         {records} TLS records in the capture, net_backstop_payload_dropped {dropped}; \
         the server wrote {got:?}; {}",
        vm.run_ok(
            "dmesg | grep trustbind | grep -v ' bound: \\| closed: ' | tail -30; \
             tail -30 /tmp/x/socat8.log"
        )?
        .stdout
    );
    ensure!(
        canaries == 0 && records >= 20,
        "racing sends: {canaries} plaintext canaries, {records} TLS records"
    );
    println!(
        "racing sends: 20 of 20 arrived encrypted; {} sends held and restarted",
        counter(&mut vm, "net_send_restarted")? - before
    );
    vm.run_ok("pkill -f '[T]CP4-LISTEN:7108' || true")?;
    Ok(())
}
