//! Encrypted channels end to end: the appliance image, two protected host
//! VMs (`a` the client side, `b` the server side, each with `trustbind.ko`
//! and `trustbind-agent`) and one unprotected VM (`c`), administered with
//! the `trustbind` CLI. The policy lets `socat` and `curl` connect to port
//! 7200 and `socat` and `nginx` accept there, only from such a client, with
//! `@encrypt("required")`: the appliance pairs the two halves by their
//! 5-tuple, decides the program pair and pushes one fresh key to both
//! agents, and both kernels install it as kTLS before `connect()` and
//! `accept()` return.
//!
//! Proves, with unmodified Debian programs: a file sent from `a` to `b`
//! arrives intact while the bridge capture holds TLS application-data
//! records and not one plaintext canary; the appliance records the channel
//! (`channel.open` with its key id, `decision.pair` naming both programs);
//! closing ends the channel record (both ends' closes, with byte counts,
//! in `trustbind channel ls`); two concurrent channels of the same pair get different key ids; `curl`
//! (non-blocking connect) fetches from `nginx` over a channel; an
//! unapproved client program's connect fails with `EACCES` and an audit
//! row; a UNIX-socket connect is decided by program pair through the real
//! agent and appliance (socat → socat allowed, the rogue copy `EACCES` and
//! an `ipc_connect` denial row); an unapproved server program's accept fails (the client's connect
//! is reset); the unprotected VM cannot get plaintext from the protected
//! service (b's netfilter backstop drops its SYNs: it is no protected
//! host; the server receives nothing);
//! killing the client's agent mid-transfer leaks no plaintext (the key is
//! in the kernel); `rmmod` is refused while the hosts are in enforce mode;
//! no kernel warning anywhere.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use trustbind_qemu_tests::{Admin, ApplianceImage, Artifacts, Boot, Network, Vm};

use crate::common::{self, enrol_host, export_audit, wait_for};

/// The service port of the test.
pub(crate) const PORT: u16 = 7200;

/// Plaintext marker: in the file sent, never on the wire.
const CANARY: &str = "TRUSTBIND-CHANNEL-CANARY";

/// Policy besides [`common::SYSTEM_PROGRAMS`]: bound channels to port 7200
/// between the channel client and server groups.
pub(crate) const CHANNELS: &str = r#"
@id("channel-clients-connect")
@encrypt("required")
permit (
    principal,
    action == Trustbind::Action::"connect",
    resource
)
when {
    resource.port == 7200 &&
    context.program in Trustbind::ProgramGroup::"channel-clients"
};

@id("channel-servers-accept-clients")
@encrypt("required")
permit (
    principal,
    action == Trustbind::Action::"accept",
    resource
)
when {
    resource.port == 7200 &&
    context.program in Trustbind::ProgramGroup::"channel-servers" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"channel-clients"
};

@id("ipc-clients-to-servers")
permit (
    principal,
    action == Trustbind::Action::"ipc_connect",
    resource
)
when {
    context.program in Trustbind::ProgramGroup::"channel-clients" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"channel-servers"
};
"#;

/// Starts a one-connection socat server (`prog`) on `vm` writing what it
/// receives to `out`, and waits until it listens.
fn serve(vm: &mut Vm, prog: &str, out: &str) -> Result<()> {
    vm.run_ok(&format!("rm -f {out}"))?;
    vm.spawn_bg(&format!(
        "exec {prog} -u TCP4-LISTEN:{PORT},reuseaddr OPEN:{out},creat,trunc"
    ))?;
    wait_for(
        vm,
        "the server to listen",
        &format!("grep -q ':{PORT:04X} 00000000:0000 0A ' /proc/net/tcp"),
        120,
    )
}

/// Waits until `file` on `vm` has the SHA-256 `want` (`sha256sum` of
/// stdin output).
fn wait_sha(vm: &mut Vm, file: &str, want: &str) -> Result<()> {
    wait_for(
        vm,
        &format!("{file} to be complete"),
        &format!("test \"$(sha256sum <{file})\" = '{}'", want.trim()),
        120,
    )
}

/// How many audit rows of `kind` the appliance holds.
fn audit_rows(admin: &Admin, kind: &str) -> Result<Vec<String>> {
    let audit = export_audit(admin)?;
    Ok(audit
        .lines()
        .filter(|l| l.contains(&format!("\"{kind}\"")))
        .map(str::to_owned)
        .collect())
}

/// The key id (32 hex digits) of an exported `channel.open` row, whether
/// its detail is an object or an escaped JSON string.
fn key_id(line: &str) -> Option<String> {
    let rest = &line[line.find("key_id")? + "key_id".len()..];
    let rest = rest.trim_start_matches(|c: char| !c.is_ascii_hexdigit());
    let id: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    (id.len() == 32).then_some(id)
}

/// The channel with key id `key` from `trustbind channel ls` once both of
/// its ends reported their close (the agents deliver every 2 s).
fn closed_channel(admin: &Admin, key: &str, secs: u64) -> Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let out = admin.run(&["-o", "json", "channel", "ls"])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("channel ls output")?;
        let ch = v["channels"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["key_id"] == key).cloned());
        if let Some(c) = &ch {
            if c["closed_ms"].is_i64() && c["connect"].is_object() && c["accept"].is_object() {
                return Ok(c.clone());
            }
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "channel {key} not closed at both ends after {secs} s: {ch:?}"
        );
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// A one-byte-longer copy of a guest program, for a program the policy
/// lets run but not use the network.
fn rogue_copy(src: &Path, dir: &Path, name: &str) -> Result<std::path::PathBuf> {
    let dst = dir.join(name);
    let mut bytes = std::fs::read(src).with_context(|| format!("read {}", src.display()))?;
    bytes.push(b'x');
    std::fs::write(&dst, bytes)?;
    // `sig add` takes executables only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
    Ok(dst)
}

/// The appliance (booted from its disk image), hosts `a` and `b` enrolled
/// in enforce mode under [`common::SYSTEM_PROGRAMS`] plus `policy`, and
/// the unprotected VM `c`. Reference groups: `system` (every guest
/// program, and the rogue socat copy), `channel-clients` (socat, curl,
/// perl, iperf3), `channel-servers` (socat, nginx, perl, iperf3). Every VM
/// has `/tmp/x/send` (3000 canary lines) and `/tmp/x/rogue-socat`.
pub(crate) struct Setup {
    pub(crate) net: Network,
    pub(crate) admin: Admin,
    pub(crate) a: Vm,
    pub(crate) b: Vm,
    pub(crate) c: Vm,
    /// `sha256sum` output of `/tmp/x/send`.
    pub(crate) sent: String,
    /// The guest's `/usr/bin`, extracted.
    pub(crate) bin: std::path::PathBuf,
    /// The rogue socat copy, on the host side.
    pub(crate) rogue: std::path::PathBuf,
    /// The appliance VM (dropping it stops it) and the work directory:
    /// bind both for the test's duration.
    pub(crate) appl: trustbind_qemu_tests::Appliance,
    pub(crate) work: tempfile::TempDir,
}

pub(crate) fn setup(policy: &str) -> Result<Setup> {
    let art = Artifacts::from_env()?;
    let img = ApplianceImage::from_env()?;
    let net = Network::new()?;
    let work = tempfile::tempdir()?;
    let mut appl = net.appliance("appl", &img, Boot::Disk)?;
    let a = common::host_vm(net.vm("a"))?.memory_mib(1024).start(&art)?;
    let b = common::host_vm(net.vm("b"))?.memory_mib(1024).start(&art)?;
    let c = net.vm("c").start(&art)?;
    appl.wait_serving()?;
    let ip = appl.ip().to_string();
    let fp = appl.ca_fingerprint()?;
    let admin = appl.admin(&work.path().join("admin"))?;

    let policy = format!("{}{policy}", common::SYSTEM_PROGRAMS);
    let dirs = common::provision(&admin, &art, work.path(), &policy)?;
    let (bin, sbin) = (dirs[0].clone(), dirs[1].clone());
    let path = |p: &Path| p.display().to_string();
    let (socat, perl, iperf3) = (
        path(&bin.join("socat")),
        path(&bin.join("perl")),
        path(&bin.join("iperf3")),
    );
    admin.run(&[
        "sig",
        "add",
        "-g",
        "channel-clients",
        &socat,
        &path(&bin.join("curl")),
        &perl,
        &iperf3,
    ])?;
    admin.run(&[
        "sig",
        "add",
        "-g",
        "channel-servers",
        &socat,
        &path(&sbin.join("nginx")),
        &perl,
        &iperf3,
    ])?;
    // Rogue copies may run (group `system`), not talk.
    let rogue = rogue_copy(&bin.join("socat"), work.path(), "rogue-socat")?;
    admin.run(&["sig", "add", "-g", "system", &path(&rogue)])?;

    let mut a = a.wait_ready()?;
    let mut b = b.wait_ready()?;
    let mut c = c.wait_ready()?;
    for vm in [&mut a, &mut b, &mut c] {
        vm.run_ok(&format!(
            "mkdir -p /tmp/x/www && for i in $(seq 1 3000); do echo \"{CANARY} line $i\"; done \
             >/tmp/x/send && cp /tmp/x/send /tmp/x/www/file.txt \
             && cp /usr/bin/socat /tmp/x/rogue-socat && printf x >>/tmp/x/rogue-socat \
             && chmod 755 /tmp/x/rogue-socat"
        ))?;
    }
    let sent = a.run_ok("sha256sum </tmp/x/send")?.stdout;
    enrol_host(&admin, &mut a, &ip, &fp, "a", "enforce")?;
    enrol_host(&admin, &mut b, &ip, &fp, "b", "enforce")?;
    Ok(Setup {
        net,
        admin,
        a,
        b,
        c,
        sent,
        bin,
        rogue,
        appl,
        work,
    })
}

#[test]
fn channel_end_to_end() -> Result<()> {
    let Setup {
        net,
        admin,
        mut a,
        mut b,
        mut c,
        sent,
        bin,
        rogue,
        appl: _appl,
        work: _work,
    } = setup(CHANNELS)?;
    let b_ip = b.ip().to_string();

    // An approved pair: the file arrives intact, the wire shows only TLS.
    let cap = net.start_capture("channel")?;
    serve(&mut b, "socat", "/tmp/x/recv1")?;
    a.run_ok(&format!("socat -u OPEN:/tmp/x/send TCP4:{b_ip}:{PORT}"))?;
    wait_sha(&mut b, "/tmp/x/recv1", &sent)?;
    let data = cap.stop()?;
    ensure!(
        !data.contains(CANARY.as_bytes()),
        "plaintext canary on the bridge: {}",
        data.pcap().display()
    );
    ensure!(
        data.contains(&[0x17, 0x03, 0x03]),
        "no TLS application-data record on the bridge: {}",
        data.pcap().display()
    );
    let opened = audit_rows(&admin, "channel.open")?;
    ensure!(opened.len() == 1, "channel.open rows: {opened:?}");
    let pairs = audit_rows(&admin, "decision.pair")?;
    ensure!(
        pairs.len() == 1 && pairs[0].contains(&common::sha256_file(&bin.join("socat"))?),
        "decision.pair rows: {pairs:?}"
    );
    // Closing ends the channel record: each end's host reports its close
    // with byte counts (TLS records, so at least the file on both sides).
    let first = key_id(&opened[0]).context("channel.open without a key id")?;
    let file_len = a
        .run_ok("stat -c %s /tmp/x/send")?
        .stdout
        .trim()
        .parse::<u64>()?;
    let closed = closed_channel(&admin, &first, 120)?;
    for (end, field) in [("connect", "bytes_sent"), ("accept", "bytes_received")] {
        let n = closed[end][field].as_u64().unwrap_or(0);
        ensure!(
            n >= file_len && n < file_len * 2,
            "{end} end {field} {n} for a {file_len}-byte file: {closed}"
        );
    }

    // Two concurrent channels of the same pair: two key ids. The first
    // stays open until the test closes its fifo (not for a guest-timed
    // while: a TCG guest whose TSC was calibrated under load runs its
    // clock fast, and a `sleep 3` once ended before it was seen).
    serve(&mut b, "socat", "/tmp/x/recv2")?;
    a.run_ok("mkfifo /tmp/x/hold")?;
    a.spawn_bg(&format!(
        "exec socat -u OPEN:/tmp/x/hold TCP4:{b_ip}:{PORT}"
    ))?;
    let holder = a.spawn_bg("exec 3>/tmp/x/hold; exec sleep 600")?;
    wait_for(
        &mut b,
        "the first channel",
        &format!("grep -q ':{PORT:04X} [0-9A-F]*:[0-9A-F]* 01 ' /proc/net/tcp"),
        120,
    )?;
    serve(&mut b, "socat", "/tmp/x/recv3")?;
    a.run_ok(&format!("echo second | socat -u - TCP4:{b_ip}:{PORT}"))?;
    wait_for(
        &mut b,
        "the second channel's data",
        "grep -qx second /tmp/x/recv3",
        120,
    )?;
    let opened = audit_rows(&admin, "channel.open")?;
    let ids: Vec<String> = opened.iter().filter_map(|l| key_id(l)).collect();
    ensure!(
        ids.len() == 3 && ids[1] != ids[2] && ids[0] != ids[1],
        "three channels without three distinct key ids: {ids:?}"
    );
    a.run_ok(&format!("kill {}", holder.pid))?;

    // curl (a non-blocking connect) from nginx over a channel.
    b.run_ok(&format!(
        "printf 'worker_processes 1; pid /tmp/x/ngx.pid; error_log /tmp/x/ngx-err.log;\n\
         events {{}}\nhttp {{ access_log off; server {{ listen {PORT}; root /tmp/x/www; }} }}\n' \
         >/tmp/x/nginx.conf && nginx -c /tmp/x/nginx.conf"
    ))?;
    a.run_ok(&format!(
        "curl -sS --max-time 60 -o /tmp/x/got http://{b_ip}:{PORT}/file.txt"
    ))?;
    wait_sha(&mut a, "/tmp/x/got", &sent)?;
    b.run_ok("kill $(cat /tmp/x/ngx.pid)")?;

    // An unapproved client program: EACCES before any packet, audited.
    serve(&mut b, "socat", "/tmp/x/recv4")?;
    let out = a.run(&format!(
        "echo rogue | /tmp/x/rogue-socat -u - TCP4:{b_ip}:{PORT}"
    ))?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "unapproved client was not refused: {out:?}"
    );
    let rogue_sha = common::sha256_file(&rogue)?;
    let audit = export_audit(&admin)?;
    ensure!(
        audit
            .lines()
            .any(|l| l.contains("decision") && l.contains("connect") && l.contains(&rogue_sha)),
        "no connect decision row for the rogue client"
    );

    // UNIX sockets, decided by the appliance by program pair: socat to a
    // socat listener connects; the rogue copy gets EACCES, audited.
    a.spawn_bg("exec socat -u UNIX-LISTEN:/tmp/x/ipc.sock,fork OPEN:/tmp/x/ipc-recv,creat,append")?;
    wait_for(&mut a, "the UNIX listener", "test -S /tmp/x/ipc.sock", 60)?;
    a.run_ok("echo ipc-ok | socat -u - UNIX-CONNECT:/tmp/x/ipc.sock")?;
    wait_for(
        &mut a,
        "the UNIX data",
        "grep -qx ipc-ok /tmp/x/ipc-recv",
        60,
    )?;
    let out = a.run("echo ipc-rogue | /tmp/x/rogue-socat -u - UNIX-CONNECT:/tmp/x/ipc.sock")?;
    ensure!(
        out.status != 0 && out.stderr.contains("Permission denied"),
        "unapproved UNIX client was not refused: {out:?}"
    );
    a.run_ok("sleep 1")?;
    let got = a.run_ok("cat /tmp/x/ipc-recv")?.stdout;
    ensure!(got.trim() == "ipc-ok", "the UNIX listener received {got:?}");
    let audit = export_audit(&admin)?;
    ensure!(
        audit
            .lines()
            .any(|l| l.contains("ipc_connect") && l.contains(&rogue_sha) && l.contains("deny")),
        "no ipc_connect denial row for the rogue client"
    );
    a.run_ok("pkill -f '[U]NIX-LISTEN' || true")?;

    // The unprotected VM: b's backstop drops its SYNs (it is no protected
    // host, and the service is protected), so its connect never completes
    // and the server receives nothing.
    let dropped = crate::exec::counter(&mut b, "net_backstop_inbound_dropped")?;
    let out = c.run(&format!(
        "echo {CANARY}-unprotected | timeout 20 socat -d -d -u - TCP4:{b_ip}:{PORT}; \
         sleep 2; true"
    ))?;
    let got = b.run_ok("cat /tmp/x/recv4 2>/dev/null || true")?.stdout;
    ensure!(
        !got.contains("unprotected"),
        "the protected server received the unprotected client's data: {got:?} ({out:?})"
    );
    let now = crate::exec::counter(&mut b, "net_backstop_inbound_dropped")?;
    ensure!(
        now > dropped,
        "the unprotected VM's SYN was not dropped on b (inbound_dropped {dropped} -> {now}): {out:?}"
    );
    ensure!(
        common::dmesg_lines(&mut b)?
            .iter()
            .any(|l| l.starts_with(&format!(
                "trustbind: backstop dropped an inbound SYN {}:",
                c.ip()
            ))),
        "no inbound-SYN line in b's kernel log"
    );
    b.run_ok(&format!("pkill -f '[T]CP4-LISTEN:{PORT}' || true"))?;

    // An unapproved server program: its accept is refused, the client's
    // connection does not go through.
    serve(&mut b, "/tmp/x/rogue-socat", "/tmp/x/recv5")?;
    let out = a.run(&format!(
        "echo to-rogue | timeout 60 socat -u - TCP4:{b_ip}:{PORT}"
    ))?;
    ensure!(
        out.status != 0,
        "a client of an unapproved server succeeded: {out:?}"
    );
    let got = b.run_ok("cat /tmp/x/recv5 2>/dev/null || true")?.stdout;
    ensure!(
        !got.contains("to-rogue"),
        "the rogue server received {got:?}"
    );
    b.run_ok(&format!("pkill -f '[T]CP4-LISTEN:{PORT}' || true"))?;

    // The client's agent killed mid-transfer: the channel goes on
    // encrypted (its key is in the kernel), nothing leaks.
    a.run_ok("mkfifo /tmp/x/feed")?;
    serve(&mut b, "socat", "/tmp/x/recv6")?;
    let cap = net.start_capture("agent-killed")?;
    a.spawn_bg(&format!(
        "exec socat -u OPEN:/tmp/x/feed TCP4:{b_ip}:{PORT}"
    ))?;
    a.spawn_bg(&format!(
        "exec 3>/tmp/x/feed; echo first-{CANARY} >&3; exec sleep 600"
    ))?;
    wait_for(
        &mut b,
        "the first line",
        &format!("grep -q first-{CANARY} /tmp/x/recv6"),
        120,
    )?;
    a.run_ok("pkill -9 -x trustbind-agent")?;
    a.run_ok(&format!("echo after-kill-{CANARY} >/tmp/x/feed"))?;
    wait_for(
        &mut b,
        "the line after the kill",
        &format!("grep -q after-kill-{CANARY} /tmp/x/recv6"),
        120,
    )?;
    let data = cap.stop()?;
    ensure!(
        !data.contains(CANARY.as_bytes()) && data.contains(&[0x17, 0x03, 0x03]),
        "plaintext or no TLS after the agent was killed: {}",
        data.pcap().display()
    );

    // The killed agent restarts (its binary is pinned) and reconnects. (Its
    // status file still says connected: empty it first, with a shell
    // redirection, since no agent answers for `rm` now.)
    a.run_ok(&format!(": >{}/status.json", common::STATE))?;
    common::start_agent(&mut a)?;
    wait_for(
        &mut a,
        "the restarted agent",
        &format!(
            "grep -q '\"connected\": true' {}/status.json",
            common::STATE
        ),
        120,
    )?;

    // Enforce mode pins the module.
    let out = b.run("rmmod trustbind")?;
    ensure!(
        out.status != 0 && out.stderr.contains("in use"),
        "rmmod in enforce mode: {out:?}"
    );
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
