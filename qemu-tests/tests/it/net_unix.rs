//! UNIX-domain connect qualification by program pair, in one VM, answered
//! by `tb-fakeagent` (src/bin/tb-fakeagent.rs), which allows the pair
//! (`/usr/bin/socat` client, `/usr/bin/socat` server) only
//! (`--unix-allow`).
//!
//! Proves, with unmodified `socat` on both ends: an allowed pair transfers
//! a line over a file-system socket and over an abstract one; a copy of
//! socat one byte longer (another program, allowed to *exec*) as the
//! client gets `EACCES` on connect and the server receives nothing; the
//! same copy as the server makes the allowed client's connect fail with
//! `EACCES`; the requests carry both programs' in-kernel SHA-256 (equal to
//! `sha256sum`), the listener's pid and the socket's name (absolute path,
//! `@name` for abstract); a server started before the agent is hashed from
//! its executable; the `unix_*` counters add up with the agent's log; with
//! the agent gone `rmmod` succeeds while a UNIX connection is open, which
//! keeps working, with no warning. `net_unix_signal_restarts_connect`: a
//! handled signal during a pending verdict restarts the connect (T-38).
//! `net_unix_activation`: with socket activation the acceptor, not the
//! manager that listened, is the server the pair is decided for (T-21).
//! `net_unix_listener_swapped_during_verdict`: an allow is for the
//! listener asked about, not the name; a rogue listener swapped in while
//! the verdict is pending is asked about in turn and refused (T-20).

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use trustbind_qemu_tests::Vm;

use crate::exec::{counter, field, host_with_module, start_agent_with, stop_agent, AGENT_LOG};
use crate::net_qualify::{dmesg_has, sha256_of, wait_received};

const ROGUE_CLIENT: &str = "/tmp/x/socat-c";
const ROGUE_SERVER: &str = "/tmp/x/socat-s";

fn agent_args() -> String {
    format!(
        "--no-cache --allow {ROGUE_CLIENT} --allow {ROGUE_SERVER} \
         --unix-allow /usr/bin/socat:/usr/bin/socat"
    )
}

/// Starts `prog` as a one-connection server on the UNIX socket `addr`
/// (`UNIX-LISTEN:/path` or `ABSTRACT-LISTEN:name`) writing what it
/// receives to `out`, and waits until it listens (`name` in
/// /proc/net/unix).
fn serve(vm: &mut Vm, prog: &str, addr: &str, name: &str, out: &str) -> Result<()> {
    vm.spawn_bg(&format!("exec {prog} -u {addr} OPEN:{out},creat,trunc"))?;
    for _ in 0..100 {
        if vm
            .run(&format!("grep -q ' {name}$' /proc/net/unix"))?
            .status
            == 0
        {
            return Ok(());
        }
        vm.run_ok("sleep 0.2")?;
    }
    let bg = vm.run("cat /run/tb-bg-*.log")?.stdout;
    bail!("nothing listens on {name}; background logs:\n{bg}")
}

/// The agent's unix lines.
fn unix_lines(vm: &mut Vm) -> Result<Vec<String>> {
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    Ok(log
        .lines()
        .filter(|l| l.starts_with("unix "))
        .map(str::to_owned)
        .collect())
}

/// The agent's (last) unix line for the socket `name`.
fn unix_line(vm: &mut Vm, name: &str) -> Result<String> {
    let want = format!("unix path={name} ");
    unix_lines(vm)?
        .into_iter()
        .rev()
        .find(|l| l.starts_with(&want))
        .with_context(|| format!("no unix request for {name} in the agent's log"))
}

/// The pid of the (first) process whose command line contains `pat`.
fn pid_of(vm: &mut Vm, pat: &str) -> Result<String> {
    let out = vm.run_ok(&format!("pgrep -o -f '{pat}'"))?.stdout;
    Ok(out.trim().to_owned())
}

#[test]
fn net_unix() -> Result<()> {
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
    // This server runs from before the agent: its program is not in the
    // lineage table.
    serve(
        &mut vm,
        "/usr/bin/socat",
        "UNIX-LISTEN:/tmp/x/s0",
        "/tmp/x/s0",
        "/tmp/x/got0",
    )?;
    start_agent_with(&mut vm, "enforce", &agent_args())?;

    // A server from before: hashed from its executable, allowed.
    let s0_pid = pid_of(&mut vm, "[U]NIX-LISTEN:/tmp/x/s0")?;
    vm.run_ok("echo hello-s0 | socat -u - UNIX-CONNECT:/tmp/x/s0")?;
    wait_received(&mut vm, "/tmp/x/got0", "hello-s0")?;
    let l = unix_line(&mut vm, "/tmp/x/s0")?;
    ensure!(l.ends_with("-> allow"), "{l}");
    ensure!(field(&l, "peer_from")? == "exe", "{l}");
    ensure!(field(&l, "peer_sha256")? == socat, "{l}");
    ensure!(field(&l, "peer_pid")? == s0_pid, "{l}");

    // Allowed pair over a file-system socket, both hashes in-kernel.
    serve(
        &mut vm,
        "/usr/bin/socat",
        "UNIX-LISTEN:/tmp/x/s1",
        "/tmp/x/s1",
        "/tmp/x/got1",
    )?;
    let s1_pid = pid_of(&mut vm, "[U]NIX-LISTEN:/tmp/x/s1")?;
    // A relative name: the request names the socket by its absolute path.
    vm.run_ok("cd /tmp/x && echo hello-allowed | socat -u - UNIX-CONNECT:s1")?;
    wait_received(&mut vm, "/tmp/x/got1", "hello-allowed")?;
    let l = unix_line(&mut vm, "/tmp/x/s1")?;
    ensure!(l.ends_with("-> allow"), "{l}");
    ensure!(field(&l, "sha256")? == socat, "client hash: {l}");
    ensure!(field(&l, "peer_sha256")? == socat, "server hash: {l}");
    ensure!(field(&l, "peer_from")? == "lineage", "{l}");
    ensure!(field(&l, "peer_pid")? == s1_pid, "{l}");
    ensure!(field(&l, "peer_uid")? == "0", "{l}");

    // Unapproved client program: EACCES, the server receives nothing.
    serve(
        &mut vm,
        "/usr/bin/socat",
        "UNIX-LISTEN:/tmp/x/s2",
        "/tmp/x/s2",
        "/tmp/x/got2",
    )?;
    let out = vm.run(&format!(
        "echo rogue | {ROGUE_CLIENT} -u - UNIX-CONNECT:/tmp/x/s2"
    ))?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "unapproved client was not refused with EACCES: {out:?}"
    );
    let l = unix_line(&mut vm, "/tmp/x/s2")?;
    ensure!(l.ends_with("-> deny"), "{l}");
    ensure!(field(&l, "sha256")? == rogue_client, "{l}");
    ensure!(field(&l, "peer_sha256")? == socat, "{l}");
    ensure!(
        dmesg_has(&mut vm, |l| l
            .starts_with("trustbind: unix connect denied: pid ")
            && l.contains(" -> /tmp/x/s2 (server pid ")
            && l.ends_with("(denied by policy)"))?,
        "no unix connect denial in dmesg"
    );
    // The server saw at most a connection already at end of file.
    vm.run_ok("sleep 1")?;
    let got = vm.run_ok("cat /tmp/x/got2 2>/dev/null || true")?.stdout;
    ensure!(
        got.is_empty(),
        "the server of a refused connect got {got:?}"
    );
    vm.run_ok("pkill -f '[U]NIX-LISTEN:/tmp/x/s2' || true")?;

    // Unapproved server program: the (approved) client's connect fails.
    serve(
        &mut vm,
        ROGUE_SERVER,
        "UNIX-LISTEN:/tmp/x/s3",
        "/tmp/x/s3",
        "/tmp/x/got3",
    )?;
    let out = vm.run("echo to-rogue | socat -u - UNIX-CONNECT:/tmp/x/s3")?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "connect to an unapproved server was not refused with EACCES: {out:?}"
    );
    let l = unix_line(&mut vm, "/tmp/x/s3")?;
    ensure!(l.ends_with("-> deny"), "{l}");
    ensure!(field(&l, "sha256")? == socat, "{l}");
    ensure!(field(&l, "peer_sha256")? == rogue_server, "{l}");
    vm.run_ok("sleep 1")?;
    let got = vm.run_ok("cat /tmp/x/got3 2>/dev/null || true")?.stdout;
    ensure!(got.is_empty(), "the unapproved server got {got:?}");
    vm.run_ok("pkill -f '[U]NIX-LISTEN:/tmp/x/s3' || true")?;

    // Abstract sockets: named `@name`, allowed pair, then a rogue client.
    serve(
        &mut vm,
        "/usr/bin/socat",
        "ABSTRACT-LISTEN:tb-abs",
        "@tb-abs",
        "/tmp/x/got4",
    )?;
    vm.run_ok("echo hello-abstract | socat -u - ABSTRACT-CONNECT:tb-abs")?;
    wait_received(&mut vm, "/tmp/x/got4", "hello-abstract")?;
    let l = unix_line(&mut vm, "@tb-abs")?;
    ensure!(l.ends_with("-> allow"), "{l}");
    ensure!(field(&l, "peer_sha256")? == socat, "{l}");
    serve(
        &mut vm,
        "/usr/bin/socat",
        "ABSTRACT-LISTEN:tb-abs2",
        "@tb-abs2",
        "/tmp/x/got5",
    )?;
    let out = vm.run(&format!(
        "echo rogue | {ROGUE_CLIENT} -u - ABSTRACT-CONNECT:tb-abs2"
    ))?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "unapproved abstract client was not refused with EACCES: {out:?}"
    );
    ensure!(unix_line(&mut vm, "@tb-abs2")?.ends_with("-> deny"));
    vm.run_ok("pkill -f '[A]BSTRACT-LISTEN:tb-abs2' || true")?;

    // Counters add up with the agent's log.
    let lines = unix_lines(&mut vm)?;
    let count = |suffix: &str| lines.iter().filter(|l| l.ends_with(suffix)).count() as u64;
    ensure!(
        counter(&mut vm, "unix_asked")? == lines.len() as u64
            && counter(&mut vm, "unix_allowed")? == count("-> allow")
            && counter(&mut vm, "unix_denied")? == count("-> deny"),
        "unix counters differ from the agent's log:\n{}",
        lines.join("\n")
    );
    ensure!(
        count("-> deny") == 3,
        "expected three denials:\n{}",
        lines.join("\n")
    );
    for zero in [
        "unix_would_deny",
        "unix_no_agent",
        "unix_timeouts",
        "unix_unreadable",
    ] {
        let n = counter(&mut vm, zero)?;
        ensure!(n == 0, "{zero} is {n}");
    }

    // An open connection; the agent leaves and the module is unloaded
    // under it; the connection keeps working.
    vm.run_ok("mkfifo /tmp/x/feed")?;
    serve(
        &mut vm,
        "/usr/bin/socat",
        "UNIX-LISTEN:/tmp/x/s6",
        "/tmp/x/s6",
        "/tmp/x/got6",
    )?;
    vm.spawn_bg("exec socat -u OPEN:/tmp/x/feed UNIX-CONNECT:/tmp/x/s6")?;
    vm.spawn_bg("exec 3>/tmp/x/feed; echo first >&3; exec sleep 600")?;
    wait_received(&mut vm, "/tmp/x/got6", "first")?;
    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    ensure!(
        dmesg_has(&mut vm, |l| l == "trustbind: unloaded")?,
        "module did not unload"
    );
    vm.run_ok("echo after-rmmod >/tmp/x/feed")?;
    wait_received(&mut vm, "/tmp/x/got6", "first\nafter-rmmod")?;
    vm.shutdown()?;
    Ok(())
}

/// A signal (handled with `SA_RESTART`) that arrives while a UNIX
/// connect waits for its verdict restarts the connect instead of failing
/// it with `EINTR` (nothing is connected before the verdict, so there is
/// nothing to sever: T-38, UNIX half). The client (perl) is allowed with
/// the socat listener; its verdict takes 3 s; a child signals it after 1 s.
#[test]
fn net_unix_signal_restarts_connect() -> Result<()> {
    let mut vm = host_with_module()?;
    let sock = "/tmp/x/sig.sock";
    vm.run_ok("mkdir -p /tmp/x")?;
    start_agent_with(
        &mut vm,
        "enforce",
        &format!("--no-cache --unix-allow /usr/bin/perl:/usr/bin/socat --delay-path {sock}:3000"),
    )?;
    serve(
        &mut vm,
        "/usr/bin/socat",
        &format!("UNIX-LISTEN:{sock}"),
        sock,
        "/tmp/x/sig.got",
    )?;
    let script = format!(
        r#"use Socket; use POSIX ();
my $got = 0;
POSIX::sigaction(POSIX::SIGUSR1, POSIX::SigAction->new(sub {{ $got++ }}, POSIX::SigSet->new, POSIX::SA_RESTART)) or die "sigaction: $!";
my $parent = $$;
if (fork() == 0) {{ select(undef, undef, undef, 1.0); kill 'USR1', $parent; exit 0; }}
socket(S, PF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
if (connect(S, pack_sockaddr_un("{sock}"))) {{ print "connect=ok signals=$got\n"; print S "after-signal\n"; close S; }}
else {{ print "connect=err errno=" . ($!+0) . " signals=$got\n"; }}
wait;
"#
    );
    vm.run_ok(&format!(
        "echo {} | base64 -d >/tmp/x/sig.pl",
        base64::engine::general_purpose::STANDARD.encode(script)
    ))?;
    let out = vm.run_ok("perl /tmp/x/sig.pl")?;
    ensure!(
        out.stdout.contains("connect=ok signals=1"),
        "a handled signal failed the pending UNIX connect: {out:?}"
    );
    wait_received(&mut vm, "/tmp/x/sig.got", "after-signal")?;
    let asked = unix_lines(&mut vm)?
        .iter()
        .filter(|l| l.starts_with(&format!("unix path={sock} ")))
        .count();
    ensure!(
        asked >= 2,
        "the restarted connect was not asked again ({asked} requests)"
    );
    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}

/// Socket activation (T-21): a manager listens and another program
/// accepts (systemd with `Accept=no`). The connect is decided against the
/// listener's owner (the manager, allowed); the accept is decided again
/// with the acceptor as the server, before it reads a byte: a copy of perl
/// one byte longer as the service gets `ECONNABORTED` and reads nothing
/// (before, it read what the allowed client sent), while perl itself, in
/// a process of its own, accepts and reads.
#[test]
fn net_unix_activation() -> Result<()> {
    let mut vm = host_with_module()?;
    let rogue = "/tmp/x/perl-r";
    vm.run_ok(&format!(
        "mkdir -p /tmp/x && cp /usr/bin/perl {rogue} && printf x >>{rogue} && chmod 755 {rogue}"
    ))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    // The service: accepts on the socket it was handed as fd 3.
    let acceptor = r#"open(my $l, "+<&=", 3) or die "fd 3: $!";
open(my $o, ">", $ARGV[0]) or die "$ARGV[0]: $!";
if (accept(my $c, $l)) { my $line = <$c>; print $o "accepted: $line"; }
else { print $o "accept: $!\n"; }
close $o;
"#;
    vm.run_ok(&format!(
        "echo {} | base64 -d >/tmp/x/acceptor.pl",
        b64.encode(acceptor)
    ))?;
    start_agent_with(
        &mut vm,
        "enforce",
        &format!("--no-cache --allow {rogue} --unix-allow /usr/bin/socat:/usr/bin/perl"),
    )?;
    let rogue_sha = sha256_of(&mut vm, rogue)?;
    for (i, (service, want)) in [(rogue, None), ("/usr/bin/perl", Some("accepted: secret-1"))]
        .into_iter()
        .enumerate()
    {
        let sock = format!("/tmp/x/act{i}.sock");
        let out = format!("/tmp/x/act{i}.out");
        // The manager (perl) listens, hands the socket to the service it
        // starts (fd 3, kept across exec) and waits.
        let manager = format!(
            r#"use Socket; $^F = 10;
socket(L, PF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
bind(L, pack_sockaddr_un("{sock}")) or die "bind: $!";
listen(L, 5) or die "listen: $!";
die "listening socket is fd " . fileno(L) unless fileno(L) == 3;
if (fork() == 0) {{ exec "{service}", "/tmp/x/acceptor.pl", "{out}" or die "exec: $!"; }}
wait;
"#
        );
        vm.run_ok(&format!(
            "echo {} | base64 -d >/tmp/x/manager{i}.pl",
            b64.encode(manager)
        ))?;
        vm.spawn_bg(&format!("exec perl /tmp/x/manager{i}.pl"))?;
        let mut listening = false;
        for _ in 0..100 {
            if vm
                .run(&format!("grep -q ' {sock}$' /proc/net/unix"))?
                .status
                == 0
            {
                listening = true;
                break;
            }
            vm.run_ok("sleep 0.2")?;
        }
        ensure!(listening, "the manager never listened on {sock}");
        // The client stays alive until the service decided.
        vm.run(&format!(
            "(echo secret-{i}; sleep 2) | socat -u - UNIX-CONNECT:{sock}"
        ))?;
        let mut got = String::new();
        for _ in 0..100 {
            got = vm.run_ok(&format!("cat {out} 2>/dev/null || true"))?.stdout;
            if !got.is_empty() {
                break;
            }
            vm.run_ok("sleep 0.2")?;
        }
        match want {
            Some(w) => ensure!(got.trim() == w, "the allowed service read {got:?}"),
            None => ensure!(
                got.starts_with("accept: ") && !got.contains("secret"),
                "the rogue service accepted the connection: {got:?}"
            ),
        }
    }
    let denied = unix_lines(&mut vm)?
        .into_iter()
        .any(|l| l.contains(&format!("peer_sha256={rogue_sha} ")) && l.ends_with("-> deny"));
    ensure!(denied, "no denied request naming the rogue acceptor");
    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}

/// The listener is swapped while its connect waits for the verdict (T-20,
/// the rounds of `proto/src/unixconnect.rs`): an allowed client connects
/// to an allowed server; while its ask waits (the agent paused), the
/// socket file is replaced by one a rogue server (a copy of socat one byte
/// longer) listens on. The allow was for the first listener, not for the
/// name, so the connect's next round reaches the rogue one, asks about it,
/// and fails with `EACCES`: the rogue server receives nothing. Were the
/// approval kept by name, or the second round not checked, the secret
/// would reach the rogue server.
#[test]
fn net_unix_listener_swapped_during_verdict() -> Result<()> {
    let mut vm = host_with_module()?;
    let sock = "/tmp/x/swap.sock";
    let pause = "/tmp/x/pause";
    vm.run_ok(&format!(
        "mkdir -p /tmp/x && cp /usr/bin/socat {ROGUE_SERVER} && printf y >>{ROGUE_SERVER} \
         && chmod 755 {ROGUE_SERVER}"
    ))?;
    let socat = sha256_of(&mut vm, "/usr/bin/socat")?;
    let rogue = sha256_of(&mut vm, ROGUE_SERVER)?;
    start_agent_with(
        &mut vm,
        "enforce",
        &format!(
            "--allow {ROGUE_SERVER} --unix-allow /usr/bin/socat:/usr/bin/socat \
             --pause-file {pause} --timeout-ms 60000"
        ),
    )?;
    serve(
        &mut vm,
        "/usr/bin/socat",
        &format!("UNIX-LISTEN:{sock}"),
        sock,
        "/tmp/x/swap.first",
    )?;
    serve(
        &mut vm,
        "/usr/bin/socat",
        "UNIX-LISTEN:/tmp/x/warm.sock",
        "/tmp/x/warm.sock",
        "/tmp/x/warm.got",
    )?;
    // The agent reads nothing while the pause file exists: the ask waits
    // (up to the 60 s verdict timeout). Every exec then waits too, but
    // for those of programs whose verdict the module cached: each one the
    // swap runs is run once first (UNIX verdicts are never cached). An
    // agent already waiting in read() takes one more request: the connect
    // to warm.sock.
    vm.run_ok(&format!(
        "pkill -f '[n]one-such'; pgrep -f '[n]one-such'; sleep 0; rm -f /tmp/x/none; \
         test -e /tmp/x/none; cat /dev/null; grep -q x /dev/null; mountpoint -q /; \
         {ROGUE_SERVER} -V >/dev/null; touch {pause}; \
         echo warm | socat -u - UNIX-CONNECT:/tmp/x/warm.sock; true"
    ))?;
    vm.spawn_bg(&format!(
        "echo secret | socat -u - UNIX-CONNECT:{sock} 2>/tmp/x/swap.err; echo $? >/tmp/x/swap.rc"
    ))?;
    let mut asked = false;
    for _ in 0..100 {
        // The warm connect's ask, then this one's.
        if counter(&mut vm, "unix_asked")? >= 2 {
            asked = true;
            break;
        }
        vm.run_ok("sleep 0.1")?;
    }
    ensure!(asked, "the connect was never asked about");
    // socat removes its socket file as it exits: gone before the rogue
    // one binds the name.
    vm.run_ok(&format!(
        "pkill -f '[U]NIX-LISTEN:{sock}'; \
         while pgrep -f '[U]NIX-LISTEN:{sock}' >/dev/null; do sleep 0.05; done; rm -f {sock}"
    ))?;
    serve(
        &mut vm,
        ROGUE_SERVER,
        &format!("UNIX-LISTEN:{sock}"),
        sock,
        "/tmp/x/swap.rogue",
    )?;
    let early = vm.run("cat /tmp/x/swap.rc /tmp/x/swap.err")?;
    ensure!(
        early.status != 0,
        "the connect ended before its verdict: {}",
        early.stdout
    );
    vm.run_ok(&format!("rm {pause}"))?;
    let mut rc = String::new();
    for _ in 0..300 {
        rc = vm.run_ok("cat /tmp/x/swap.rc 2>/dev/null || true")?.stdout;
        if !rc.trim().is_empty() {
            break;
        }
        vm.run_ok("sleep 0.1")?;
    }
    let err = vm.run_ok("cat /tmp/x/swap.err 2>/dev/null || true")?.stdout;
    if !(rc.trim() != "0" && !rc.trim().is_empty() && err.contains("Permission denied")) {
        let seen = vm
            .run(&format!(
                "ls -la /tmp/x; cat /run/tb-bg-*.log; grep '^unix' {AGENT_LOG}; dmesg | tail -20"
            ))?
            .stdout;
        bail!(
            "the connect approved for the first listener went on to the swapped one: \
             rc {rc:?}, {err:?}\n{seen}"
        );
    }
    vm.run_ok("sleep 1")?;
    let got = vm
        .run_ok("cat /tmp/x/swap.rogue 2>/dev/null || true")?
        .stdout;
    ensure!(got.is_empty(), "the rogue server received {got:?}");
    // Two asks for the name: the first listener allowed, the rogue denied.
    let lines: Vec<String> = unix_lines(&mut vm)?
        .into_iter()
        .filter(|l| l.starts_with(&format!("unix path={sock} ")))
        .collect();
    ensure!(lines.len() == 2, "expected two asks:\n{}", lines.join("\n"));
    ensure!(
        field(&lines[0], "peer_sha256")? == socat && lines[0].ends_with("-> allow"),
        "{}",
        lines[0]
    );
    ensure!(
        field(&lines[1], "peer_sha256")? == rogue && lines[1].ends_with("-> deny"),
        "{}",
        lines[1]
    );
    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}
