//! Exec control end to end: a VM running `trustbind-appliance serve`, a
//! protected host VM running `trustbind.ko` and `trustbind-agent`, set up
//! the way an administrator would (admin API over HTTPS with an admin
//! certificate, enrolment with a one-time token and the CA fingerprint).
//!
//! Proves, on real Debian programs: an approved program runs; an unknown
//! one gets `EACCES` and an audit row with its hash; an approved then
//! modified binary is denied; root (role admin) may run a tool nobody may
//! not; switching the host group to permissive reaches the module and
//! allows with a "would deny" audit; with the appliance gone a cached
//! verdict still works and an uncached exec is denied (enforce), the agent
//! spools that decision and delivers it once the appliance is back; with the
//! agent killed the kernel keeps enforcing and a restarted agent resumes;
//! `rmmod` is refused in enforce mode; no kernel warning anywhere.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use trustbind_qemu_tests::{Artifacts, Network, Vm};

const DATA: &str = "/var/lib/tb";
const ADMIN: &str = "/root/admin";
const STATE: &str = "/var/lib/trustbind-agent";

const POLICY: &str = r#"
@id("system-programs")
permit (
    principal,
    action == Trustbind::Action::"exec",
    resource in Trustbind::ProgramGroup::"system"
);

@id("admin-tools-for-admins")
permit (
    principal in Trustbind::Role::"admin",
    action == Trustbind::Action::"exec",
    resource in Trustbind::ProgramGroup::"admin-tools"
);
"#;

/// A binary of this workspace (built by `cargo xtask test` before the VM tests).
fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test binary has no target dir")?;
    let p = dir.join(name);
    ensure!(
        p.is_file(),
        "{} is missing: build the workspace first (`cargo xtask test` does)",
        p.display()
    );
    Ok(p)
}

fn json_string(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// `curl` against the admin API from inside the appliance VM.
fn admin(vm: &mut Vm, ip: &str, method: &str, path: &str, body: Option<&str>) -> Result<String> {
    let data = match body {
        Some(b) if b.starts_with('@') => {
            format!("-H 'content-type: application/json' --data-binary {b}")
        }
        Some(b) => format!("-H 'content-type: application/json' --data-binary '{b}'"),
        None => String::new(),
    };
    let out = vm.run(&format!(
        "curl -sS -X {method} --cacert {ADMIN}/ca.pem --cert {ADMIN}/admin.pem \
         --key {ADMIN}/admin.key -w '\\n%{{http_code}}' {data} https://{ip}:7445{path}"
    ))?;
    let (body, code) = out.stdout.trim_end().rsplit_once('\n').unwrap_or(("", ""));
    ensure!(
        out.status == 0 && code.starts_with('2'),
        "{method} {path}: status {code}: {body} {}",
        out.stderr
    );
    Ok(body.to_owned())
}

/// A JSON string field's value (the first occurrence), without a JSON parser.
fn json_field(json: &str, name: &str) -> Option<String> {
    let key = format!("\"{name}\":\"");
    let start = json.find(&key)? + key.len();
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_owned())
}

fn wait_for(vm: &mut Vm, what: &str, cmd: &str, tries: usize) -> Result<()> {
    for _ in 0..tries {
        if vm.run(cmd)?.status == 0 {
            return Ok(());
        }
        // Wait on the harness side: an exec in the guest would itself be
        // qualified, and may be refused while the agent is (re)connecting.
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let status = vm.run(&format!("cat {STATE}/status.json; cat /run/agent.log"))?;
    bail!("timed out waiting for {what}:\n{}", status.stdout)
}

/// Sets the host group's mode through the admin API and waits until the
/// agent has put the module in it.
fn switch_mode(appl: &mut Vm, host: &mut Vm, ip: &str, mode: &str) -> Result<()> {
    admin(
        appl,
        ip,
        "PUT",
        "/v1/host-groups/hosts",
        Some(&format!(r#"{{"mode":"{mode}"}}"#)),
    )?;
    wait_for(
        host,
        &format!("{mode} mode"),
        &format!("grep -q '\"mode\": \"{mode}\"' {STATE}/status.json"),
        60,
    )
}

/// The appliance's audit log as JSON lines.
fn export_audit(appl: &mut Vm) -> Result<String> {
    Ok(appl
        .run_ok(&format!(
            "/tb/trustbind-appliance --data-dir {DATA} audit export"
        ))?
        .stdout)
}

fn start_appliance(vm: &mut Vm, ip: &str) -> Result<()> {
    vm.spawn_bg(&format!(
        "exec /tb/trustbind-appliance --data-dir {DATA} serve --server-name {ip} >>/run/appliance.log 2>&1"
    ))?;
    for _ in 0..120 {
        if vm
            .run("grep -q 'CA fingerprint' /run/appliance.log")?
            .status
            == 0
        {
            return Ok(());
        }
        vm.run_ok("sleep 0.5")?;
    }
    let log = vm.run("cat /run/appliance.log")?.stdout;
    bail!("the appliance did not start:\n{log}")
}

/// Whether an exported audit line says `name` is true (the detail is a JSON
/// string inside the line, so its quotes are escaped).
fn says_true(line: &str, name: &str) -> bool {
    line.split(name).skip(1).any(|rest| {
        rest.trim_start_matches(['\\', '"', ':'])
            .starts_with("true")
    })
}

fn denied(out: &trustbind_qemu_tests::Output) -> bool {
    out.status == 126 && out.stderr.contains("Permission denied")
}

#[test]
fn exec_control_end_to_end() -> Result<()> {
    let art = Artifacts::from_env()?;
    let net = Network::new()?;
    let policy = format!("{{\"text\":{},\"comment\":\"e2e\"}}", json_string(POLICY));
    let vms = net.boot_all(
        vec![
            net.vm("appl")
                .file(
                    "trustbind-appliance",
                    workspace_bin("trustbind-appliance")?,
                    0o755,
                )
                .bytes("policy.json", policy, 0o644),
            net.vm("host")
                .file("trustbind-agent", workspace_bin("trustbind-agent")?, 0o755),
        ],
        &art,
    )?;
    let [mut appl, mut host]: [Vm; 2] = vms
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected two VMs"))?;
    let ip = appl.ip().to_string();

    // The appliance, and an admin certificate for the API.
    appl.run_ok(&format!("mkdir -p {DATA}"))?;
    start_appliance(&mut appl, &ip)?;
    appl.run_ok(&format!(
        "/tb/trustbind-appliance --data-dir {DATA} admin-cert --name e2e --out {ADMIN}"
    ))?;
    let fp = appl
        .run_ok(&format!(
            "/tb/trustbind-appliance --data-dir {DATA} ca-fingerprint"
        ))?
        .stdout
        .trim()
        .to_owned();

    // Signatures: every program of the host's /usr/bin and /usr/sbin, as
    // the host has them, into reference group `system`; a unique tool into
    // `admin-tools`.
    host.run_ok(
        "cp /usr/bin/true /root/tool && printf y >>/root/tool \
         && cp /usr/bin/true /root/evil && printf x >>/root/evil \
         && cp /usr/bin/true /root/ok && chmod 755 /root/tool /root/evil /root/ok",
    )?;
    let sums = host
        .run_ok("sha256sum /usr/bin/* /usr/sbin/* /lib64/ld-linux-x86-64.so.2 2>/dev/null | sort -u -k1,1")?
        .stdout;
    let mut sigs = Vec::new();
    for l in sums.lines() {
        let mut f = l.split_whitespace();
        let (Some(h), Some(p)) = (f.next(), f.next()) else {
            continue;
        };
        sigs.push(format!(
            "{{\"sha256\":\"{h}\",\"size\":0,\"name\":{}}}",
            json_string(p)
        ));
    }
    ensure!(sigs.len() > 100, "only {} programs hashed", sigs.len());
    let tool = host.run_ok("sha256sum /root/tool")?.stdout;
    let tool = tool
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let evil = host.run_ok("sha256sum /root/evil")?.stdout;
    let evil = evil
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let batch = format!(
        "{{\"group\":\"system\",\"source\":\"e2e\",\"signatures\":[{}]}}",
        sigs.join(",")
    );
    appl.run_ok(&format!("cat >/root/sigs.json <<'EOF'\n{batch}\nEOF"))?;
    admin(
        &mut appl,
        &ip,
        "POST",
        "/v1/groups",
        Some(r#"{"name":"system"}"#),
    )?;
    admin(
        &mut appl,
        &ip,
        "POST",
        "/v1/groups",
        Some(r#"{"name":"admin-tools"}"#),
    )?;
    admin(
        &mut appl,
        &ip,
        "POST",
        "/v1/signatures",
        Some("@/root/sigs.json"),
    )?;
    admin(
        &mut appl,
        &ip,
        "POST",
        "/v1/signatures",
        Some(&format!(
            r#"{{"group":"admin-tools","signatures":[{{"sha256":"{tool}","size":0,"name":"tool"}}]}}"#
        )),
    )?;
    admin(
        &mut appl,
        &ip,
        "PUT",
        "/v1/users/root",
        Some(r#"{"roles":["admin"]}"#),
    )?;
    let draft = admin(
        &mut appl,
        &ip,
        "POST",
        "/v1/policies",
        Some("@/tb/policy.json"),
    )?;
    let id = draft
        .split("\"id\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .context("no policy id")?
        .to_owned();
    admin(
        &mut appl,
        &ip,
        "POST",
        &format!("/v1/policies/{id}/activate"),
        Some("{}"),
    )?;
    admin(
        &mut appl,
        &ip,
        "PUT",
        "/v1/host-groups/hosts",
        Some(r#"{"mode":"enforce"}"#),
    )?;
    let created = admin(
        &mut appl,
        &ip,
        "POST",
        "/v1/hosts",
        Some(r#"{"name":"host1","host_group":"hosts"}"#),
    )?;
    let token = json_field(&created, "token").context("no token")?;

    // Enrol and start the agent, then load the module.
    host.run_ok(&format!(
        "/tb/trustbind-agent --state {STATE} enrol --appliance {ip} --name host1 \
         --token {token} --ca-fingerprint {fp}"
    ))?;
    host.run_ok("insmod /tb/trustbind.ko")?;
    host.spawn_bg(&format!(
        "exec /tb/trustbind-agent --state {STATE} run --verdict-timeout-ms 30000 --call-timeout-ms 25000 >>/run/agent.log 2>&1"
    ))?;
    wait_for(
        &mut host,
        "the agent to connect in enforce mode",
        &format!("grep -q '\"mode\": \"enforce\"' {STATE}/status.json && grep -q '\"connected\": true' {STATE}/status.json"),
        120,
    )?;

    // `sleep` (used by the waits below) gets a verdict while the appliance
    // answers, so it is in the agent's signed offline bundle later (the
    // agent has a new pair re-decided and signed within seconds).
    host.run_ok("sleep 0.1")?;

    // Approved, unknown, modified.
    host.run_ok("/usr/bin/true")?;
    host.run_ok("/root/ok")?;
    let out = host.run("/root/evil")?;
    ensure!(denied(&out), "unknown program not refused: {out:?}");
    host.run_ok("printf z >>/root/ok")?;
    let out = host.run("/root/ok")?;
    ensure!(denied(&out), "modified binary not refused: {out:?}");
    let audit = export_audit(&mut appl)?;
    ensure!(
        audit
            .lines()
            .any(|l| l.contains("\"decision\"") && l.contains(&evil)),
        "no decision row with the unknown program's hash {evil}"
    );

    // Users: root (role admin) may run the tool, nobody may not.
    host.run_ok("/root/tool")?;
    let out = host.run("setpriv --reuid=65534 --regid=65534 --clear-groups /root/tool")?;
    ensure!(denied(&out), "nobody ran the admin tool: {out:?}");

    // Permissive reaches the module: the unknown program runs, audited.
    switch_mode(&mut appl, &mut host, &ip, "permissive")?;
    let out = host.run("/root/evil")?;
    ensure!(out.status == 0, "permissive mode refused: {out:?}");
    let audit = export_audit(&mut appl)?;
    ensure!(
        audit
            .lines()
            .any(|l| l.contains(&evil) && says_true(l, "would_deny")),
        "no would-deny audit row for {evil}"
    );
    switch_mode(&mut appl, &mut host, &ip, "enforce")?;
    let out = host.run("rmmod trustbind")?;
    ensure!(out.status != 0, "rmmod succeeded in enforce mode");
    host.run_ok("/usr/bin/true")?; // into the kernel's cache again

    // The appliance goes away.
    appl.run_ok("kill -KILL $(pidof trustbind-appliance) && sleep 1")?;
    host.run_ok("/usr/bin/true")?; // cached in the kernel
    let out = host.run("/usr/bin/expr 1 + 1")?; // approved, never seen: no answer
    ensure!(
        denied(&out),
        "uncached exec allowed with the appliance away: {out:?}"
    );
    wait_for(
        &mut host,
        "an offline answer",
        &format!("grep -q '\"answered_offline\": [1-9]' {STATE}/status.json"),
        30,
    )?;

    // Back: the spooled offline decision arrives.
    start_appliance(&mut appl, &ip)?;
    wait_for(
        &mut host,
        "the spool to drain",
        &format!("grep -q '\"connected\": true' {STATE}/status.json && grep -q '\"spool_backlog\": 0' {STATE}/status.json"),
        120,
    )?;
    let audit = export_audit(&mut appl)?;
    ensure!(
        audit
            .lines()
            .any(|l| l.contains("agent.exec.offline") && l.contains("/usr/bin/expr")),
        "the offline decision was not delivered:\n{}",
        audit
            .lines()
            .filter(|l| l.contains("agent."))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let out = appl.run_ok(&format!(
        "/tb/trustbind-appliance --data-dir {DATA} audit verify"
    ))?;
    ensure!(out.stdout.contains("ok"), "audit chain: {out:?}");

    // The agent dies: the kernel keeps enforcing (cached verdicts run,
    // anything it would have to ask is refused), and a restarted agent
    // picks up where it left.
    // What the harness itself runs next must be in the kernel's cache.
    host.run_ok(
        "/usr/bin/true; echo eA== | base64 -d >/dev/null; setsid true; pidof init >/dev/null || :",
    )?;
    host.run_ok("kill -KILL $(pidof trustbind-agent)")?;
    host.run_ok("/usr/bin/true")?;
    let out = host.run("/usr/bin/nproc")?;
    ensure!(
        denied(&out),
        "uncached exec allowed without an agent: {out:?}"
    );
    host.spawn_bg(&format!(
        "exec /tb/trustbind-agent --state {STATE} run --verdict-timeout-ms 30000 --call-timeout-ms 25000 >>/run/agent.log 2>&1"
    ))?;
    wait_for(
        &mut host,
        "the restarted agent",
        // status.json still holds the dead agent's last state until the new
        // one writes: wait for the new pid, connected.
        &format!("p=$(pidof trustbind-agent) && grep -q \"pid.: $p,\" {STATE}/status.json && grep -q '\"connected\": true' {STATE}/status.json"),
        120,
    )?;
    host.run_ok("/usr/bin/nproc")?;

    host.check_health()?;
    appl.check_health()?;
    host.shutdown()?;
    appl.shutdown()?;
    Ok(())
}
