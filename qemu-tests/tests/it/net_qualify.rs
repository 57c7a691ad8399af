//! Connect/accept qualification by the PEM in one VM over loopback,
//! answered by `tb-fakeagent` (src/bin/tb-fakeagent.rs), which allows TCP
//! connects and accepts of `/usr/bin/socat` only (`--net-allow`).
//!
//! Proves, with unmodified `socat` on both ends: an allowed client program
//! connects to an allowed server and a line gets through; a copy of socat
//! one byte longer (another program, allowed to *exec*) gets `EACCES` on
//! connect and nothing reaches the server; a server running such a copy
//! has its accept refused and the client sees the connection reset; the
//! requests carry the program's in-kernel SHA-256 (equal to `sha256sum`)
//! and the 4-tuple; permissive mode lets the copy connect and reports
//! "would be denied"; an allowed plaintext accept carries no ULP (T-39);
//! IPv6 (`::1`) is qualified the same way; the `net_*`
//! counters add up with the agent's log; with the agent gone (disabled
//! mode) `rmmod` is refused while a server waits in `accept()`, and
//! succeeds while a connection is open, which keeps working, with no
//! warning.

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use trustbind_qemu_tests::Vm;

use crate::exec::{counter, field, host_with_module, start_agent_with, stop_agent, AGENT_LOG};
use crate::kernel_lines;

/// Exec'able (by hash) but not allowed on the network: a client and a
/// server program, each a one-byte-longer copy of socat.
const ROGUE_CLIENT: &str = "/tmp/x/socat-c";
const ROGUE_SERVER: &str = "/tmp/x/socat-s";

/// The fake agent's arguments: socat may use the network, the copies may
/// only run.
fn agent_args() -> String {
    format!("--no-cache --net-allow /usr/bin/socat --allow {ROGUE_CLIENT} --allow {ROGUE_SERVER}")
}

/// Starts `prog` as a one-connection TCP server on `port` writing what it
/// receives to `out`, and waits until it listens.
pub(crate) fn serve(vm: &mut Vm, prog: &str, port: u16, out: &str) -> Result<()> {
    serve_on(vm, prog, "TCP4", port, out)
}

/// Same, over `proto` (`TCP4` or `TCP6`).
pub(crate) fn serve_on(vm: &mut Vm, prog: &str, proto: &str, port: u16, out: &str) -> Result<()> {
    vm.spawn_bg(&format!(
        "exec {prog} -u {proto}-LISTEN:{port},reuseaddr OPEN:{out},creat,trunc"
    ))?;
    wait_listening(vm, port)
}

/// Waits until something listens on `port` (state 0A in /proc/net/tcp or
/// tcp6).
pub(crate) fn wait_listening(vm: &mut Vm, port: u16) -> Result<()> {
    let pattern = format!(":{port:04X} 0*:0000 0A ");
    for _ in 0..100 {
        if vm
            .run(&format!("grep -q '{pattern}' /proc/net/tcp /proc/net/tcp6"))?
            .status
            == 0
        {
            return Ok(());
        }
        vm.run_ok("sleep 0.2")?;
    }
    let bg = vm.run("cat /run/tb-bg-*.log")?.stdout;
    bail!("nothing listens on port {port}; background logs:\n{bg}")
}

/// Waits until the file a server writes holds `want` (trimmed).
pub(crate) fn wait_received(vm: &mut Vm, file: &str, want: &str) -> Result<()> {
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
    bail!("{file} holds {got:?}, not {want:?}")
}

/// The agent's net lines.
pub(crate) fn net_lines(vm: &mut Vm) -> Result<Vec<String>> {
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    Ok(log
        .lines()
        .filter(|l| l.starts_with("net "))
        .map(str::to_owned)
        .collect())
}

/// The agent's net line for a `kind` (connect|accept) to 127.0.0.1:`port`.
fn net_line(vm: &mut Vm, kind: &str, port: u16) -> Result<String> {
    let want = format!("-> 127.0.0.1:{port} ");
    net_lines(vm)?
        .into_iter()
        .find(|l| l.starts_with(&format!("net {kind} ")) && l.contains(&want))
        .with_context(|| format!("no {kind} request to port {port} in the agent's log"))
}

pub(crate) fn sha256_of(vm: &mut Vm, path: &str) -> Result<String> {
    let out = vm.run_ok(&format!("sha256sum {path}"))?.stdout;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

/// A kernel log line of the module, present?
pub(crate) fn dmesg_has(vm: &mut Vm, pred: impl Fn(&str) -> bool) -> Result<bool> {
    let dmesg = vm.run_ok("dmesg")?.stdout;
    Ok(kernel_lines(&dmesg).iter().any(|l| pred(l.trim_end())))
}

#[test]
fn net_qualify() -> Result<()> {
    let mut vm = host_with_module()?;
    vm.run_ok(&format!(
        "mkdir -p /tmp/x && cp /usr/bin/socat {ROGUE_CLIENT} && printf x >>{ROGUE_CLIENT} \
         && cp /usr/bin/socat {ROGUE_SERVER} && printf y >>{ROGUE_SERVER} \
         && chmod 755 {ROGUE_CLIENT} {ROGUE_SERVER}"
    ))?;
    let socat = sha256_of(&mut vm, "/usr/bin/socat")?;
    let rogue_client = sha256_of(&mut vm, ROGUE_CLIENT)?;
    let rogue_server = sha256_of(&mut vm, ROGUE_SERVER)?;

    // Disabled (the state at load): nothing is asked, the copy connects.
    serve(&mut vm, "/usr/bin/socat", 7000, "/tmp/x/got0")?;
    vm.run_ok(&format!(
        "echo before | {ROGUE_CLIENT} -u - TCP4:127.0.0.1:7000"
    ))?;

    start_agent_with(&mut vm, "enforce", &agent_args())?;

    // Allowed pair: the line gets through.
    serve(&mut vm, "/usr/bin/socat", 7001, "/tmp/x/got1")?;
    vm.run_ok("echo hello-allowed | socat -u - TCP4:127.0.0.1:7001")?;
    wait_received(&mut vm, "/tmp/x/got1", "hello-allowed")?;
    let connect = net_line(&mut vm, "connect", 7001)?;
    ensure!(connect.ends_with("-> allow"), "{connect}");
    ensure!(
        field(&connect, "sha256")? == socat,
        "connect request does not carry socat's sha256 {socat}: {connect}"
    );
    let accept = net_line(&mut vm, "accept", 7001)?;
    ensure!(accept.ends_with("-> allow"), "{accept}");
    ensure!(field(&accept, "sha256")? == socat, "{accept}");
    // The accept names the client's real port (kernel-chosen at connect).
    ensure!(
        accept.starts_with("net accept 127.0.0.1:")
            && !accept.starts_with("net accept 127.0.0.1:0 "),
        "accept request without the client end: {accept}"
    );

    // Unapproved client program: EACCES on connect, nothing reaches the
    // (allowed) server.
    serve(&mut vm, "/usr/bin/socat", 7002, "/tmp/x/got2")?;
    let out = vm.run(&format!(
        "echo rogue | {ROGUE_CLIENT} -u - TCP4:127.0.0.1:7002"
    ))?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "unapproved client was not refused with EACCES: {out:?}"
    );
    let connect = net_line(&mut vm, "connect", 7002)?;
    ensure!(connect.ends_with("-> deny"), "{connect}");
    ensure!(field(&connect, "sha256")? == rogue_client, "{connect}");
    ensure!(
        net_lines(&mut vm)?
            .iter()
            .all(|l| !(l.starts_with("net accept ") && l.contains("-> 127.0.0.1:7002 "))),
        "a refused connect reached the server"
    );
    ensure!(
        dmesg_has(&mut vm, |l| l
            .starts_with("trustbind: connect denied: pid ")
            && l.ends_with("-> 127.0.0.1:7002 (denied by policy)"))?,
        "no connect denial in dmesg"
    );
    vm.run_ok("pkill -f '[T]CP4-LISTEN:7002' || true")?;

    // Unapproved server program: its accept fails, the client (allowed)
    // sees the connection reset, the server never gets the data.
    serve(&mut vm, ROGUE_SERVER, 7003, "/tmp/x/got3")?;
    // (socat reports a reset while reading as a notice, `-d -d`, and ends
    // as on end of file.)
    let out = vm.run("timeout 20 socat -d -d -u TCP4:127.0.0.1:7003 -")?;
    if !out.stderr.contains("Connection reset by peer") {
        let log = vm.run_ok(&format!(
            "cat {AGENT_LOG}; dmesg | tail -20; cat /run/tb-bg-*.log"
        ))?;
        bail!(
            "client of an unapproved server did not see a reset: {out:?}\n{}",
            log.stdout
        );
    }
    let accept = net_line(&mut vm, "accept", 7003)?;
    ensure!(accept.ends_with("-> deny"), "{accept}");
    ensure!(field(&accept, "sha256")? == rogue_server, "{accept}");
    ensure!(
        dmesg_has(&mut vm, |l| l.starts_with("trustbind: accept denied: pid ")
            && l.contains(" -> 127.0.0.1:7003 (denied by policy)"))?,
        "no accept denial in dmesg"
    );
    vm.run_ok("pkill -f '[T]CP4-LISTEN:7003' || true")?;

    // A plaintext accept carries no ULP (T-39: one cannot be removed, and
    // with "tls" the program's own kTLS fails with EEXIST and zero-copy
    // sends stop). net_channel.rs shows `ss` reporting the ULP of bound
    // sockets.
    serve(&mut vm, "/usr/bin/socat", 7010, "/tmp/x/got10")?;
    vm.spawn_bg("exec sh -c '(echo held; exec sleep 600) | socat -u - TCP4:127.0.0.1:7010'")?;
    wait_received(&mut vm, "/tmp/x/got10", "held")?;
    ensure!(
        net_line(&mut vm, "accept", 7010)?.ends_with("-> allow"),
        "the held connection's accept was not allowed"
    );
    let ss = vm
        .run_ok("ss -tnie state established '( sport = :7010 )'")?
        .stdout;
    ensure!(
        ss.contains(":7010") && !ss.contains("tcp-ulp"),
        "a plaintext accept carries a ULP:\n{ss}"
    );

    // IPv6 takes the same path: allowed, then refused.
    serve_on(&mut vm, "/usr/bin/socat", "TCP6", 7007, "/tmp/x/got7")?;
    vm.run_ok("echo hello-v6 | socat -u - TCP6:[::1]:7007")?;
    wait_received(&mut vm, "/tmp/x/got7", "hello-v6")?;
    let accept = net_lines(&mut vm)?
        .into_iter()
        .find(|l| l.starts_with("net accept [::1]:") && l.contains("-> [::1]:7007 "))
        .context("no IPv6 accept request")?;
    ensure!(accept.ends_with("-> allow"), "{accept}");
    serve_on(&mut vm, "/usr/bin/socat", "TCP6", 7008, "/tmp/x/got8")?;
    let out = vm.run(&format!("echo rogue | {ROGUE_CLIENT} -u - TCP6:[::1]:7008"))?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "unapproved IPv6 client was not refused with EACCES: {out:?}"
    );
    ensure!(
        net_lines(&mut vm)?
            .iter()
            .any(|l| l.starts_with("net connect ")
                && l.contains("-> [::1]:7008 ")
                && l.ends_with("-> deny")),
        "no denied IPv6 connect request"
    );
    vm.run_ok("pkill -f '[T]CP6-LISTEN:7008' || true")?;

    // Counters add up with what the agent saw.
    let lines = net_lines(&mut vm)?;
    let count = |f: &dyn Fn(&String) -> bool| lines.iter().filter(|l| f(l)).count() as u64;
    let connects = count(&|l| l.starts_with("net connect "));
    let accepts = count(&|l| l.starts_with("net accept "));
    let allows = count(&|l| l.ends_with("-> allow"));
    let denies = count(&|l| l.ends_with("-> deny"));
    ensure!(
        counter(&mut vm, "net_connect_asked")? == connects
            && counter(&mut vm, "net_accept_asked")? == accepts,
        "asked counters differ from the agent's log:\n{}",
        lines.join("\n")
    );
    ensure!(
        counter(&mut vm, "net_allowed")? == allows && counter(&mut vm, "net_denied")? == denies,
        "allowed/denied counters differ from the agent's log:\n{}",
        lines.join("\n")
    );
    ensure!(denies == 3, "expected three denials:\n{}", lines.join("\n"));
    for zero in [
        "net_would_deny",
        "net_no_agent",
        "net_timeouts",
        "net_unreadable",
    ] {
        let n = counter(&mut vm, zero)?;
        ensure!(n == 0, "{zero} is {n}");
    }

    // Permissive: the copy connects, reported as "would be denied".
    stop_agent(&mut vm)?;
    start_agent_with(&mut vm, "permissive", &agent_args())?;
    serve(&mut vm, "/usr/bin/socat", 7004, "/tmp/x/got4")?;
    vm.run_ok(&format!(
        "echo permissive | {ROGUE_CLIENT} -u - TCP4:127.0.0.1:7004"
    ))?;
    wait_received(&mut vm, "/tmp/x/got4", "permissive")?;
    ensure!(
        net_line(&mut vm, "connect", 7004)?.ends_with("-> deny"),
        "permissive connect not asked"
    );
    ensure!(
        dmesg_has(&mut vm, |l| l
            .starts_with("trustbind: connect would be denied: pid ")
            && l.ends_with("-> 127.0.0.1:7004 (denied by policy)"))?,
        "no would-deny line in dmesg"
    );
    ensure!(counter(&mut vm, "net_would_deny")? == 1, "net_would_deny");

    // An open connection, then the agent leaves (disabled mode) and the
    // module is unloaded under it; the connection keeps working.
    vm.run_ok("mkfifo /tmp/x/feed")?;
    serve(&mut vm, "/usr/bin/socat", 7005, "/tmp/x/got5")?;
    vm.spawn_bg("exec socat -u OPEN:/tmp/x/feed TCP4:127.0.0.1:7005")?;
    vm.spawn_bg("exec 3>/tmp/x/feed; echo first >&3; exec sleep 600")?;
    wait_received(&mut vm, "/tmp/x/got5", "first")?;
    stop_agent(&mut vm)?;
    // A task blocked in accept() is inside the wrapper and holds the
    // module: rmmod is refused (at once, not hung) until it leaves. (socat
    // polls before it accepts, so a plain blocking accept from perl.)
    vm.spawn_bg(
        "exec perl -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 0) or die; \
         setsockopt(S, SOL_SOCKET, SO_REUSEADDR, 1); \
         bind(S, pack_sockaddr_in(7009, INADDR_ANY)) or die; listen(S, 5) or die; \
         accept(C, S); sleep 600'",
    )?;
    wait_listening(&mut vm, 7009)?;
    vm.run_ok("sleep 0.5")?;
    let out = vm.run("rmmod trustbind")?;
    ensure!(
        out.status != 0 && out.stderr.contains("in use"),
        "rmmod with a task in accept() did not fail as in use: {out:?}"
    );
    vm.run_ok("pkill -x perl && sleep 0.5")?;
    let established = vm
        .run_ok("grep -c ':1B5D 0100007F:[0-9A-F]* 01 ' /proc/net/tcp || true")?
        .stdout;
    ensure!(
        established.trim() != "0",
        "no established connection to port 7005 before rmmod"
    );
    vm.run_ok("rmmod trustbind")?;
    ensure!(
        dmesg_has(&mut vm, |l| l == "trustbind: unloaded")?,
        "module did not unload"
    );
    // A second writer on the fifo: the open connection still carries data,
    // and new connections work without the module.
    vm.run_ok("echo after-rmmod >/tmp/x/feed")?;
    wait_received(&mut vm, "/tmp/x/got5", "first\nafter-rmmod")?;
    serve(&mut vm, "/usr/bin/socat", 7006, "/tmp/x/got6")?;
    vm.run_ok("echo again | socat -u - TCP4:127.0.0.1:7006")?;
    wait_received(&mut vm, "/tmp/x/got6", "again")?;
    vm.shutdown()?;
    Ok(())
}

/// An event loop's non-blocking listener (perl, `select`), for
/// [`nonblocking_accept`]: waits until a connection is queued, tries one
/// `accept()` and prints what it got (`first=conn`, or `first=none
/// errno=N`), then serves its loop (`select` with a 0.1 s timeout, each
/// timeout a tick) until `select` reports the listener readable and an
/// accept succeeds, or `SECS` pass. Arguments: port, seconds.
const NONBLOCKING_SERVER: &str = r#"use Socket; use Fcntl;
$| = 1;
my ($port, $secs) = @ARGV;
socket(S, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
setsockopt(S, SOL_SOCKET, SO_REUSEADDR, 1);
bind(S, pack_sockaddr_in($port, INADDR_ANY)) or die "bind: $!";
listen(S, 5) or die "listen: $!";
fcntl(S, F_SETFL, fcntl(S, F_GETFL, 0) | O_NONBLOCK) or die "fcntl: $!";
my $rin = ''; vec($rin, fileno(S), 1) = 1;
select(my $r = $rin, undef, undef, 60) or die "no connection";
my $ok = accept(C, S);
printf "first=%s errno=%d
", ($ok ? "conn" : "none"), $ok ? 0 : $!+0;
my ($ticks, $t0) = (0, time);
while (!$ok && time - $t0 <= $secs) {
    if (select(my $r2 = $rin, undef, undef, 0.1) > 0) { $ok = accept(C, S); }
    else { $ticks++; }
}
if ($ok) { my $l = <C>; print "accepted ticks=$ticks line=$l"; }
else { print "none ticks=$ticks\n"; }
"#;

/// A non-blocking `accept()` never waits for its verdict (T-37): the
/// connection is set aside and the call fails with `EAGAIN` at once, so
/// the event loop goes on (it ticks while the verdict takes 4 s); when
/// the verdict allows it, `select()` reports the listener readable and
/// the next accept hands it out, data intact. One the verdict refuses is
/// reset and never handed out. (On the
/// module before, the first `accept()` waited the 4 s and returned the
/// connection: `first=conn`.)
fn nonblocking_accept(vm: &mut Vm) -> Result<()> {
    vm.run_ok(&format!(
        "echo {} | base64 -d >/tmp/x/nb.pl",
        base64::engine::general_purpose::STANDARD.encode(NONBLOCKING_SERVER)
    ))?;
    let run = |vm: &mut Vm, perl: &str, port: u16, secs: u32, out: &str| -> Result<String> {
        vm.spawn_bg(&format!(
            "exec {perl} /tmp/x/nb.pl {port} {secs} >{out} 2>&1"
        ))?;
        wait_listening(vm, port)?;
        let client = vm.run(&format!(
            "echo kept | timeout 30 socat -d -d -u - TCP4:127.0.0.1:{port} 2>&1"
        ))?;
        let mut got = String::new();
        for _ in 0..300 {
            got = vm.run_ok(&format!("cat {out}"))?.stdout;
            if got.contains("accepted ") || got.contains("none ticks=") {
                break;
            }
            vm.run_ok("sleep 0.2")?;
        }
        Ok(format!("{got}client: {}", client.stdout))
    };
    let out = run(vm, "perl", 7021, 30, "/tmp/x/nb-ok.out")?;
    ensure!(
        out.contains("first=none errno=11\n"),
        "a non-blocking accept waited for its verdict instead of EAGAIN: {out:?}"
    );
    ensure!(
        out.contains("accepted ") && out.contains(" line=kept"),
        "the connection set aside was not handed out intact: {out:?}"
    );
    let ticks: u32 = out
        .split("ticks=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    ensure!(
        ticks > 0,
        "the event loop did not run while the verdict was pending: {out:?}"
    );
    // A server program the policy refuses: set aside, refused, reset.
    let out = run(vm, "/tmp/x/perl-rogue", 7022, 12, "/tmp/x/nb-rogue.out")?;
    ensure!(
        out.contains("first=none errno=11\n") && out.contains("none ticks="),
        "a refused connection set aside was handed out: {out:?}"
    );
    let n = [
        counter(vm, "net_accept_deferred")?,
        counter(vm, "net_accept_handed")?,
        counter(vm, "net_accept_waited")?,
    ];
    ensure!(
        n == [2, 1, 0],
        "set aside / handed out / waited: {n:?}, expected [2, 1, 0]"
    );
    Ok(())
}

/// Signals (handled, `SA_RESTART`) that arrive while an accepted
/// connection waits for its verdict no longer abort it: the connection is
/// already off the accept queue and cannot be put back, so only a fatal
/// signal ends that wait (T-38, accept half; before, `accept()` failed
/// with `EINTR` and the client was reset). The accept's verdict takes 4 s;
/// a child signals the server every 0.5 s meanwhile (signals while it
/// waits for a connection restart that wait, as always). Then, on the
/// same VM, [`nonblocking_accept`].
#[test]
fn net_accept_signal_keeps_connection() -> Result<()> {
    let mut vm = host_with_module()?;
    // A copy of perl that may run but not use the network, for
    // `nonblocking_accept`.
    vm.run_ok(
        "mkdir -p /tmp/x && cp /usr/bin/perl /tmp/x/perl-rogue && printf x >>/tmp/x/perl-rogue \
         && chmod 755 /tmp/x/perl-rogue",
    )?;
    start_agent_with(
        &mut vm,
        "enforce",
        "--no-cache --net-allow /usr/bin/socat --net-allow /usr/bin/perl --net-accept-delay-ms 4000 \
         --allow /tmp/x/perl-rogue",
    )?;
    let script = r#"use Socket; use POSIX ();
$| = 1;
my $got = 0;
POSIX::sigaction(POSIX::SIGUSR1, POSIX::SigAction->new(sub { $got++ }, POSIX::SigSet->new, POSIX::SA_RESTART)) or die "sigaction: $!";
socket(S, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
setsockopt(S, SOL_SOCKET, SO_REUSEADDR, 1);
bind(S, pack_sockaddr_in(7020, INADDR_ANY)) or die "bind: $!";
listen(S, 5) or die "listen: $!";
my $parent = $$;
my $child = fork();
if ($child == 0) { for (1..60) { select(undef, undef, undef, 0.5); kill('USR1', $parent) or last; } exit 0; }
if (accept(C, S)) { my $l = <C>; print "accept=ok signals=$got line=$l"; }
else { print "accept=err errno=" . ($!+0) . " signals=$got\n"; }
kill 'TERM', $child; wait;
"#;
    vm.run_ok(&format!(
        "echo {} | base64 -d >/tmp/x/sig-accept.pl",
        base64::engine::general_purpose::STANDARD.encode(script)
    ))?;
    vm.spawn_bg("exec perl /tmp/x/sig-accept.pl >/tmp/x/sig-accept.out 2>&1")?;
    wait_listening(&mut vm, 7020)?;
    // The client's connect is answered at once; the server's accept waits.
    vm.run_ok("echo kept | socat -u - TCP4:127.0.0.1:7020")?;
    let mut out = String::new();
    for _ in 0..100 {
        out = vm.run_ok("cat /tmp/x/sig-accept.out")?.stdout;
        if out.contains("accept=") {
            break;
        }
        vm.run_ok("sleep 0.2")?;
    }
    ensure!(
        out.contains("accept=ok ") && out.contains(" line=kept"),
        "a handled signal aborted the accepted connection: {out:?}"
    );
    nonblocking_accept(&mut vm)?;
    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}
