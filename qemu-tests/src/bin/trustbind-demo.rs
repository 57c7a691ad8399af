//! `trustbind-demo`: the product, end to end, as an administrator runs it.
//! Run by `cargo xtask demo [--shell]`, which builds everything and sets the
//! artifact variables.
//!
//! Boots the appliance image and two protected Debian hosts on a private
//! bridge, sets everything up with the `trustbind` CLI (admin enrolment,
//! reference groups, a policy, host tokens, the agents), then shows, step
//! by step: an approved program runs and an unknown one is refused (with
//! its audit row and `trustbind explain`); curl on one host fetches from
//! nginx on the other over a channel the appliance keyed, while a capture
//! on the bridge holds TLS records and no plaintext; an unapproved client
//! is refused at connect; a protected file set refuses `cat`; a policy
//! change takes effect at once; `trustbind audit tail`. `--shell` then
//! gives a prompt: `trustbind ...` runs the administrator's CLI, `a: CMD`
//! and `b: CMD` run a command on a host.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use trustbind_qemu_tests::steps::{self, enrol_host, provision, SYSTEM_PROGRAMS};
use trustbind_qemu_tests::{Admin, ApplianceImage, Artifacts, Boot, Network, Vm};

/// The channel port.
const PORT: u16 = 7200;
/// A line of the served file: on the wire only inside TLS records.
const CANARY: &str = "TRUSTBIND-DEMO-PLAINTEXT";

/// The demo's policy besides [`SYSTEM_PROGRAMS`]: channel clients connect
/// to port 7200 and channel servers accept there, only from such a client,
/// over an appliance-keyed channel.
const CHANNELS: &str = r#"
@id("channel-clients-connect")
@encrypt("required")
permit (principal, action == Trustbind::Action::"connect", resource)
when { resource.port == 7200 && context.program in Trustbind::ProgramGroup::"channel-clients" };

@id("channel-servers-accept-clients")
@encrypt("required")
permit (principal, action == Trustbind::Action::"accept", resource)
when {
    resource.port == 7200 &&
    context.program in Trustbind::ProgramGroup::"channel-servers" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"channel-clients"
};
"#;

/// Added by the policy change: approved programs may read the `secrets`
/// file set.
const READ_SECRETS: &str = r#"
@id("system-programs-read-secrets")
permit (principal, action == Trustbind::Action::"open_read", resource in Trustbind::FileSet::"secrets")
when { context.program in Trustbind::ProgramGroup::"system" };
"#;

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn caption(text: &str) {
    println!("\x1b[36m   {text}\x1b[0m");
}

/// Runs `cmd` on host `vm` and prints it with its output; returns the exit
/// status.
fn show(vm: &mut Vm, cmd: &str) -> Result<i32> {
    println!("\x1b[2m{}# {cmd}\x1b[0m", vm.name());
    let out = vm.run(cmd)?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    if out.status != 0 {
        println!("\x1b[2m(exit status {})\x1b[0m", out.status);
    }
    Ok(out.status)
}

/// Runs the administrator's `trustbind ARGS` and prints it with its output
/// (at most `lines` lines of it).
fn admin_show(admin: &Admin, args: &[&str], lines: usize) -> Result<String> {
    println!("\x1b[2madmin$ trustbind {}\x1b[0m", args.join(" "));
    let out = admin.run(args)?;
    let all: Vec<&str> = out.lines().collect();
    for l in all.iter().take(lines) {
        println!("{l}");
    }
    if all.len() > lines {
        println!("\x1b[2m({} more lines)\x1b[0m", all.len() - lines);
    }
    Ok(out)
}

/// The sequence number of the newest audit row whose line contains all of
/// `needles`.
fn audit_seq(admin: &Admin, needles: &[&str]) -> Result<String> {
    let audit = admin.run(&["audit", "export"])?;
    audit
        .lines()
        .rev()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .and_then(|l| {
            let rest = &l[l.find("\"seq\":")? + 6..];
            let n: String = rest
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            (!n.is_empty()).then_some(n)
        })
        .with_context(|| format!("no audit row with {needles:?}"))
}

/// Writes `text` into `dir/name` and returns its path as a string.
fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p.display().to_string())
}

fn demo(shell: bool) -> Result<()> {
    let started = Instant::now();
    let art = Artifacts::from_env()?;
    let img = ApplianceImage::from_env()?;
    let net = Network::new()?;
    let work = tempfile::tempdir()?;

    step("Booting the appliance and two protected Debian hosts (QEMU, private bridge)");
    let mut appl = net.appliance("appliance", &img, Boot::Disk)?;
    let a = steps::host_vm(net.vm("a"))?.memory_mib(1024).start(&art)?;
    let b = steps::host_vm(net.vm("b"))?.memory_mib(1024).start(&art)?;
    appl.wait_serving()?;
    let ip = appl.ip().to_string();
    let fp = appl.ca_fingerprint()?;
    caption(&format!(
        "the appliance serves at {ip}; its console printed the CA fingerprint {}… and a one-time admin token",
        &fp[..16.min(fp.len())]
    ));

    step("The administrator enrols, approves the hosts' programs and writes a policy");
    let admin = appl.admin(&work.path().join("admin"))?;
    caption(
        "`trustbind admin enrol` made an admin certificate; the CLI talks mutual TLS from here on",
    );
    let policy = format!("{SYSTEM_PROGRAMS}{CHANNELS}");
    println!("\x1b[2m{}\x1b[0m", policy.trim());
    let dirs = provision(&admin, &art, work.path(), &policy)?;
    caption("every program of the guest image's /usr/bin and /usr/sbin went into reference group `system` (`trustbind sig add`), the policy is active, host group `hosts` enforces");
    let (bin, sbin) = (dirs[0].clone(), dirs[1].clone());
    let p = |x: &Path| x.display().to_string();
    admin_show(
        &admin,
        &["sig", "add", "-g", "channel-clients", &p(&bin.join("curl"))],
        3,
    )?;
    admin_show(
        &admin,
        &[
            "sig",
            "add",
            "-g",
            "channel-servers",
            &p(&sbin.join("nginx")),
        ],
        3,
    )?;
    // A one-byte-longer curl: may run (group `system`), may not connect.
    let mut rogue = std::fs::read(bin.join("curl"))?;
    rogue.push(b'x');
    let rogue_path = write(work.path(), "rogue-curl", "")?;
    std::fs::write(&rogue_path, rogue)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&rogue_path, std::fs::Permissions::from_mode(0o755))?;
    }
    admin_show(&admin, &["sig", "add", "-g", "system", &rogue_path], 3)?;
    admin_show(&admin, &["policy", "ls"], 5)?;

    step("Each host enrols with a one-time token, loads the PEM and starts its agent");
    let mut a = a.wait_ready()?;
    let mut b = b.wait_ready()?;
    for vm in [&mut a, &mut b] {
        vm.run_ok(&format!(
            "mkdir -p /tmp/x/www && for i in $(seq 1 200); do echo \"{CANARY} line $i\"; done \
             >/tmp/x/www/file.txt && cp /usr/bin/true /tmp/x/unknown && printf x >>/tmp/x/unknown \
             && cp /usr/bin/curl /tmp/x/rogue-curl && printf x >>/tmp/x/rogue-curl \
             && chmod 755 /tmp/x/unknown /tmp/x/rogue-curl"
        ))?;
    }
    enrol_host(&admin, &mut a, &ip, &fp, "a", "enforce")?;
    enrol_host(&admin, &mut b, &ip, &fp, "b", "enforce")?;
    admin_show(&admin, &["host", "ls"], 6)?;

    step("Exec control: an approved program runs, an unknown one is refused");
    show(&mut a, "curl --version | head -1")?;
    show(&mut a, "/tmp/x/unknown")?;
    caption("/tmp/x/unknown is /usr/bin/true plus one byte: its SHA-256 is in no reference group");
    let seq = audit_seq(&admin, &["/tmp/x/unknown", "deny"])?;
    admin_show(&admin, &["explain", &seq], 12)?;

    step("An encrypted channel the appliance keyed: curl on a -> nginx on b");
    b.run_ok(&format!(
        "printf 'worker_processes 1; pid /tmp/x/ngx.pid; error_log /tmp/x/ngx-err.log;\n\
         events {{}}\nhttp {{ access_log off; server {{ listen {PORT}; root /tmp/x/www; }} }}\n' \
         >/tmp/x/nginx.conf && nginx -c /tmp/x/nginx.conf"
    ))?;
    let cap = net.start_capture("demo-channel")?;
    let b_ip = b.ip().to_string();
    show(
        &mut a,
        &format!("curl -sS --max-time 60 http://{b_ip}:{PORT}/file.txt | tail -2"),
    )?;
    let data = cap.stop()?;
    let records = data
        .raw()
        .windows(3)
        .filter(|w| *w == [0x17, 0x03, 0x03])
        .count();
    caption(&format!(
        "bridge capture ({}): {records} TLS application-data record headers; plaintext \"{CANARY}\" on the wire: {}",
        data.pcap().display(),
        if data.contains(CANARY.as_bytes()) {
            "YES"
        } else {
            "no"
        }
    ));
    caption("neither curl nor nginx knows: both kernels installed one key the appliance issued for this pair (kTLS)");
    admin_show(&admin, &["channel", "ls"], 6)?;

    step("An unapproved client is refused at connect()");
    show(
        &mut a,
        &format!("/tmp/x/rogue-curl -sS --max-time 20 http://{b_ip}:{PORT}/file.txt"),
    )?;
    caption("rogue-curl may run (it is in `system`) but is no channel client: connect() fails with EACCES before a packet leaves");

    step("File access: a protected file set");
    b.run_ok("mkdir -p /srv/secret && echo 'db password: hunter2' >/srv/secret/db.conf")?;
    admin_show(&admin, &["fileset", "add", "secrets", "/srv/secret"], 3)?;
    steps::wait_for(
        &mut b,
        "the file set to reach b's module",
        "grep -q '\"protected_files\": [1-9]' /var/lib/trustbind-agent/status.json",
        120,
    )?;
    show(&mut b, "cat /srv/secret/db.conf")?;
    caption("no policy permits reading `secrets`: refused in the kernel, audited");

    step("A policy change takes effect at once");
    let file = write(
        work.path(),
        "policy-v2.cedar",
        &format!("{policy}{READ_SECRETS}"),
    )?;
    println!("\x1b[2m{}\x1b[0m", READ_SECRETS.trim());
    admin_show(
        &admin,
        &[
            "policy",
            "upload",
            &file,
            "-m",
            "approved programs read secrets",
            "--activate",
        ],
        3,
    )?;
    steps::wait_for(
        &mut b,
        "cat to be allowed",
        "cat /srv/secret/db.conf >/dev/null",
        120,
    )?;
    show(&mut b, "cat /srv/secret/db.conf")?;

    step("The tamper-evident audit log");
    admin_show(&admin, &["audit", "tail", "-n", "12"], 12)?;
    admin_show(&admin, &["audit", "verify"], 4)?;
    println!("\n\x1b[1mDemo done in {:.0?}.\x1b[0m", started.elapsed());

    if shell {
        step("Shell: `trustbind ARGS` (the admin CLI), `a: CMD` or `b: CMD` (a host); `exit` or EOF leaves");
        let stdin = std::io::stdin();
        loop {
            print!("demo> ");
            std::io::stdout().flush()?;
            let mut line = String::new();
            if stdin.lock().read_line(&mut line)? == 0 || line.trim() == "exit" {
                break;
            }
            let line = line.trim();
            let r = if let Some(args) = line.strip_prefix("trustbind ") {
                let args: Vec<&str> = args.split_whitespace().collect();
                admin_show(&admin, &args, usize::MAX).map(|_| ())
            } else if let Some(cmd) = line.strip_prefix("a:") {
                show(&mut a, cmd.trim()).map(|_| ())
            } else if let Some(cmd) = line.strip_prefix("b:") {
                show(&mut b, cmd.trim()).map(|_| ())
            } else if line.is_empty() {
                Ok(())
            } else {
                println!("`trustbind ARGS`, `a: CMD` or `b: CMD`");
                Ok(())
            };
            if let Err(e) = r {
                println!("error: {e:#}");
            }
        }
    }

    step("Shutting down");
    for vm in [a, b] {
        vm.shutdown()?;
    }
    appl.powerdown()?;
    println!("All VMs shut down cleanly: no kernel warning, no unexpected taint.");
    Ok(())
}

fn main() -> ExitCode {
    let shell = std::env::args().any(|a| a == "--shell");
    match demo(shell) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
