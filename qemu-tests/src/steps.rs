//! What the tests with an appliance and the demo share: the
//! administrator's steps with the `trustbind` CLI, and the protected
//! host's agent.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{
    workspace_bin, Admin, Appliance, ApplianceImage, Artifacts, Boot, Network, Output, Starting,
    Vm, VmBuilder,
};
use anyhow::{bail, ensure, Context, Result};

/// Policy: every program of reference group `system` may run.
pub const SYSTEM_PROGRAMS: &str = r#"
@id("system-programs")
permit (
    principal,
    action == Trustbind::Action::"exec",
    resource in Trustbind::ProgramGroup::"system"
);
"#;

/// The agent's state directory on a host VM.
pub const STATE: &str = "/var/lib/trustbind-agent";

/// A host VM with `trustbind-agent` at `/tb/trustbind-agent`, its init
/// script (`agent/dist/`) at `/tb/trustbind-agent.init`, and
/// `tb-fakeagent` at `/tb/tb-fakeagent` (what root without the
/// appliance's consent would run on `/dev/trustbind`).
pub fn host_vm(b: VmBuilder) -> Result<VmBuilder> {
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/dist/trustbind-agent.init");
    Ok(
        b.file("trustbind-agent", workspace_bin("trustbind-agent")?, 0o755)
            .file("trustbind-agent.init", init, 0o755)
            .file("tb-fakeagent", workspace_bin("tb-fakeagent")?, 0o755),
    )
}

/// What an end-to-end test starts with: the appliance image booted from
/// its disk and serving, the first admin enrolled with its console's
/// one-time token, and a protected host VM booting beside it. Fields drop
/// in order: the VMs before the network.
pub struct Bench {
    /// The appliance VM.
    pub appl: Appliance,
    /// The host VM, still booting (`wait_ready`).
    pub host: Starting,
    /// The `trustbind` CLI with the admin's credentials.
    pub admin: Admin,
    /// The appliance's address.
    pub ip: String,
    /// Its CA fingerprint.
    pub fp: String,
    /// The kernel, module and guest image.
    pub art: Artifacts,
    /// Scratch files (the admin's credentials among them).
    pub work: tempfile::TempDir,
    /// The virtual network, held until the VMs are gone.
    pub net: Network,
}

/// Boots a [`Bench`].
pub fn appliance_and_host() -> Result<Bench> {
    let art = Artifacts::from_env()?;
    let img = ApplianceImage::from_env()?;
    let net = Network::new()?;
    let work = tempfile::tempdir()?;
    let mut appl = net.appliance("appl", &img, Boot::Disk)?;
    let host = host_vm(net.vm("host"))?.start(&art)?;
    appl.wait_serving()?;
    let ip = appl.ip().to_string();
    let fp = appl.ca_fingerprint()?;
    let admin = appl.admin(&work.path().join("admin"))?;
    Ok(Bench {
        appl,
        host,
        admin,
        ip,
        fp,
        art,
        work,
        net,
    })
}

/// The ELF loader every dynamically linked guest program names
/// (`PT_INTERP`); the PEM's loader gate qualifies it like a program.
pub const GUEST_LOADER: &str = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";

/// Runs one `debugfs -R` request against the guest image (read-only).
fn debugfs(art: &Artifacts, request: &str) -> Result<()> {
    let st = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(art.rootfs())
        .output()
        .context("run debugfs (e2fsprogs)")?;
    ensure!(
        st.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    Ok(())
}

/// Copies the regular files of the Debian guest image's `/usr/bin` and
/// `/usr/sbin` into `dir/usr-bin`, `dir/usr-sbin`, and its ELF loader into
/// `dir/loader` (`debugfs rdump`/`dump`, the image is only read): the
/// programs the host VMs run, byte for byte, for `trustbind sig add`.
pub fn guest_programs(art: &Artifacts, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (src, name) in [("/usr/bin", "usr-bin"), ("/usr/sbin", "usr-sbin")] {
        let dst = dir.join(name);
        std::fs::create_dir_all(&dst)?;
        debugfs(art, &format!("rdump {src} {}", dst.display()))?;
        // rdump puts the directory itself below dst.
        let p = dst.join(Path::new(src).file_name().context("no file name")?);
        ensure!(
            std::fs::read_dir(&p)?.next().is_some(),
            "nothing in {} after rdump",
            p.display()
        );
        out.push(p);
    }
    let dst = dir.join("loader");
    std::fs::create_dir_all(&dst)?;
    let file = dst.join("ld-linux-x86-64.so.2");
    debugfs(art, &format!("dump -p {GUEST_LOADER} {}", file.display()))?;
    ensure!(
        file.metadata().is_ok_and(|m| m.len() > 0),
        "nothing in {} after dump",
        file.display()
    );
    out.push(dst);
    Ok(out)
}

/// `/usr/bin/true` of the guest with `suffix` appended, as an executable
/// file `dir/name`: the same bytes a host VM gets from
/// `cp /usr/bin/true X && printf SUFFIX >>X`.
pub fn modified_true(bins: &[PathBuf], dir: &Path, name: &str, suffix: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut b = std::fs::read(bins[0].join("true"))?;
    b.extend_from_slice(suffix.as_bytes());
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    let p = d.join(name);
    std::fs::write(&p, b)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

/// SHA-256 (hex) of a host file.
pub fn sha256_file(p: &Path) -> Result<String> {
    use sha2::Digest;
    Ok(hex(&sha2::Sha256::digest(std::fs::read(p)?)))
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A JSON string field's value (the first occurrence), without a JSON parser.
pub fn json_field(json: &str, name: &str) -> Option<String> {
    let key = format!("\"{name}\":");
    let start = json.find(&key)? + key.len();
    let rest = json[start..].trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].to_owned())
}

/// Whether an exported audit line says `name` is true (the detail may be a
/// JSON string inside the line, its quotes escaped).
pub fn says_true(line: &str, name: &str) -> bool {
    line.split(name).skip(1).any(|rest| {
        rest.trim_start_matches(['\\', '"', ':', ' '])
            .starts_with("true")
    })
}

/// Whether a guest command was refused by the PEM.
pub fn denied(out: &Output) -> bool {
    out.status == 126 && out.stderr.contains("Permission denied")
}

/// Runs `cmd` in `vm` until it succeeds (`tries` × 0.5 s, the waiting on
/// the harness side: an exec in the guest would itself be qualified).
pub fn wait_for(vm: &mut Vm, what: &str, cmd: &str, tries: usize) -> Result<()> {
    for _ in 0..tries {
        if vm.run(cmd)?.status == 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let status = vm.run(&format!("cat {STATE}/status.json; cat /run/agent.log"))?;
    // stderr too: in enforce mode `cat` itself may be refused.
    bail!(
        "timed out waiting for {what}:\n{}{}",
        status.stdout,
        status.stderr
    )
}

/// Registers host `name` in host group `hosts`, enrols the VM's agent with
/// the token, loads the module and starts the agent; returns once it is
/// connected in `mode`.
pub fn enrol_host(
    admin: &Admin,
    host: &mut Vm,
    appliance: &str,
    fp: &str,
    name: &str,
    mode: &str,
) -> Result<()> {
    let created = admin.run(&["-o", "json", "host", "enrol-token", name, "-g", "hosts"])?;
    let token = json_field(&created, "token").with_context(|| format!("no token in {created}"))?;
    host.run_ok(&format!(
        "/tb/trustbind-agent --state {STATE} enrol --appliance {appliance} --name {name} \
         --token {token} --ca-fingerprint {fp}"
    ))?;
    // With the appliance's authority key (written by `enrol`), as a host
    // is set up: the module believes only what the appliance sealed.
    host.run_ok(&format!(
        "a=; [ -f {STATE}/authority ] && a=\"authority=$(cat {STATE}/authority)\"; insmod /tb/trustbind.ko $a"
    ))?;
    start_agent(host)?;
    wait_for(
        host,
        "the agent to connect",
        &format!(
            "grep -q '\"mode\": \"{mode}\"' {STATE}/status.json && grep -q '\"connected\": true' {STATE}/status.json"
        ),
        120,
    )
}

/// Sets the host group's mode with the CLI and waits until the agent has
/// put the module in it.
pub fn switch_mode(admin: &Admin, host: &mut Vm, mode: &str) -> Result<()> {
    admin.run(&["host", "group", "set", "hosts", "--mode", mode])?;
    wait_for(
        host,
        &format!("{mode} mode"),
        &format!("grep -q '\"mode\": \"{mode}\"' {STATE}/status.json"),
        60,
    )
}

/// Starts the agent in the background (TCG-sized deadlines).
pub fn start_agent(host: &mut Vm) -> Result<()> {
    host.spawn_bg(&format!(
        "exec /tb/trustbind-agent --state {STATE} run --verdict-timeout-ms 30000 --call-timeout-ms 25000 >>/run/agent.log 2>&1"
    ))?;
    Ok(())
}

/// Root's own program on `/dev/trustbind` (the attacks on a sealed module,
/// T-44, T-101, T-102): starts `/tb/tb-fakeagent` with `args` in the
/// background, logging to `/run/rogue.log`, and waits until it is ready
/// (its log on failure). Run it once while the real agent runs, so its
/// exec is cached, and stop the real agent first.
pub fn start_rogue_agent(host: &mut Vm, args: &str) -> Result<()> {
    host.spawn_bg(&format!(
        "exec /tb/tb-fakeagent {args} --log /run/rogue.log"
    ))?;
    if let Err(e) = wait_for(host, "root's agent", "grep -q ready /run/rogue.log", 60) {
        let log = host.run("cat /run/rogue.log /run/tb-bg-*.log")?;
        bail!("{e}\nroot's agent's logs: {log:?}");
    }
    Ok(())
}

/// Stops root's program ([`start_rogue_agent`]) and waits until it exited.
pub fn stop_rogue_agent(host: &mut Vm) -> Result<()> {
    host.run_ok("kill -TERM $(pidof tb-fakeagent)")?;
    wait_for(host, "root's agent to exit", "! pidof tb-fakeagent", 60)
}

/// The admin CLI's audit export (JSON lines).
pub fn export_audit(admin: &Admin) -> Result<String> {
    Ok(admin.run(&["audit", "export"])?)
}

/// The administrator's setup both appliance tests share: the guest
/// image's programs into reference group `system` (`trustbind sig add`),
/// `policy` uploaded and activated, host group `hosts` in enforce mode.
/// Returns the extracted program directories.
pub fn provision(
    admin: &Admin,
    art: &Artifacts,
    work: &Path,
    policy: &str,
) -> Result<Vec<PathBuf>> {
    let bins = guest_programs(art, work)?;
    let mut add = vec!["sig", "add", "-g", "system"];
    // The agent binary too, as an administrator approves it: besides the
    // pinned restart the kernel allows without an agent, it is an ordinary
    // program (`trustbind-agent status`).
    let mut paths: Vec<String> = bins.iter().map(|p| p.display().to_string()).collect();
    paths.push(workspace_bin("trustbind-agent")?.display().to_string());
    add.extend(paths.iter().map(String::as_str));
    admin.run(&add)?;
    let file = work.join("policy.cedar");
    std::fs::write(&file, policy)?;
    admin.run(&[
        "policy",
        "upload",
        &file.display().to_string(),
        "-m",
        "qemu test",
        "--activate",
    ])?;
    admin.run(&["host", "group", "set", "hosts", "--mode", "enforce"])?;
    Ok(bins)
}

/// Fails unless the audit export holds a `decision` row mentioning
/// `needle` (a program's hash or path).
pub fn ensure_decision(audit: &str, needle: &str) -> Result<()> {
    ensure!(
        audit
            .lines()
            .any(|l| l.contains("\"decision\"") && l.contains(needle)),
        "no decision row with {needle}"
    );
    Ok(())
}

/// Sends the running agent `signal` (`KILL`, `TERM`) and waits until it
/// has exited; returns its pid.
pub fn stop_agent(host: &mut Vm, signal: &str) -> Result<String> {
    let pid = host
        .run_ok("pidof trustbind-agent")?
        .stdout
        .trim()
        .to_owned();
    host.run_ok(&format!("kill -{signal} {pid}"))?;
    wait_for(
        host,
        "the agent to exit",
        &format!("! kill -0 {pid} 2>/dev/null"),
        60,
    )?;
    Ok(pid)
}

/// Waits until an agent other than `old_pid` (if any) is connected;
/// returns its pid.
pub fn wait_new_agent(host: &mut Vm, old_pid: Option<&str>) -> Result<String> {
    let not_old = old_pid.map_or(String::new(), |p| format!("[ \"$p\" != {p} ] && "));
    wait_for(
        host,
        "a new agent to connect",
        &format!(
            "p=$(pidof trustbind-agent) && {not_old}grep -q \"pid.: $p,\" {STATE}/status.json \
             && grep -q '\"connected\": true' {STATE}/status.json"
        ),
        120,
    )?;
    Ok(host
        .run_ok("pidof trustbind-agent")?
        .stdout
        .trim()
        .to_owned())
}
