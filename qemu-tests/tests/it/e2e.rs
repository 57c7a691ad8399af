//! Exec control end to end: the appliance OS image (booted from its disk
//! image, issue 5) and a protected host VM running `trustbind.ko` and
//! `trustbind-agent`, set up the way an administrator would: admin
//! enrolment with the console banner's one-time token, then the `trustbind`
//! CLI over the network for signatures, users, policy, host groups, hosts
//! and the audit; the agent enrols with a one-time token and the CA
//! fingerprint.
//!
//! Proves, on real Debian programs: an approved program runs; an unknown
//! one gets `EACCES` and an audit row with its hash; an approved then
//! modified binary is denied; root (role admin) may run a tool nobody may
//! not; switching the host group to permissive reaches the module and
//! allows with a "would deny" audit; with the appliance powered off a
//! cached verdict still works and an uncached exec is denied (enforce), the
//! agent spools that decision and delivers it once the appliance has booted
//! again from the same disk; with the agent killed the kernel keeps
//! enforcing and a restarted agent resumes; the agent's init script starts
//! it, restarts it when killed and stops it without switching protection
//! off; a time-window rule allows a tool in the current hour and refuses one
//! allowed only twelve hours away; with the appliance powered off in
//! permissive mode an uncached program runs; `rmmod` is refused in enforce
//! mode; root without the appliance's consent (the agent killed, its own
//! program on `/dev/trustbind`) can neither switch enforcement off nor
//! answer "allow" for an unapproved program, because the module was
//! loaded with the appliance's authority key and believes only what the
//! appliance sealed (THREAT-MODEL.md T-44, T-101); no kernel warning
//! anywhere.

use anyhow::{ensure, Result};

use crate::common::{
    self, denied, enrol_host, export_audit, says_true, start_agent, start_rogue_agent, stop_agent,
    stop_rogue_agent, switch_mode, wait_for, wait_new_agent, STATE,
};

/// Policy besides [`common::SYSTEM_PROGRAMS`]: role admin may run the
/// admin tools.
const ADMIN_TOOLS: &str = r#"
@id("admin-tools-for-admins")
permit (
    principal in Trustbind::Role::"admin",
    action == Trustbind::Action::"exec",
    resource in Trustbind::ProgramGroup::"admin-tools"
);
"#;

/// Policy: tools allowed only at certain hours of the appliance's clock
/// (UTC): group `window-now` this hour and the next (so the test cannot
/// straddle the change), group `window-later` only twelve hours away.
fn time_windows(hour: u64) -> String {
    format!(
        r#"
@id("window-now")
permit (
    principal,
    action == Trustbind::Action::"exec",
    resource in Trustbind::ProgramGroup::"window-now"
)
when {{ context.hour == {} || context.hour == {} }};

@id("window-later")
permit (
    principal,
    action == Trustbind::Action::"exec",
    resource in Trustbind::ProgramGroup::"window-later"
)
when {{ context.hour == {} }};
"#,
        hour,
        (hour + 1) % 24,
        (hour + 12) % 24
    )
}

/// `sh` runs the init script (the script itself is not an approved program;
/// its interpreter is), with the TCG-sized agent deadlines.
const INIT: &str = "TRUSTBIND_AGENT_BIN=/tb/trustbind-agent \
    TRUSTBIND_AGENT_ARGS='--verdict-timeout-ms 30000 --call-timeout-ms 25000' \
    sh /tb/trustbind-agent.init";

#[test]
fn exec_control_end_to_end() -> Result<()> {
    let mut b = common::appliance_and_host()?;
    let (admin, appl, art, work) = (&b.admin, &mut b.appl, &b.art, &b.work);
    let (ip, fp) = (b.ip.clone(), b.fp.clone());

    // Signatures: every program of the guest image's /usr/bin and
    // /usr/sbin into reference group `system`; a unique tool into
    // `admin-tools`; `evil` stays unknown.
    // The appliance's clock is the host's (RTC, UTC).
    let hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        / 3600
        % 24;
    let bins = common::provision(
        admin,
        art,
        work.path(),
        &format!(
            "{}{ADMIN_TOOLS}{}",
            common::SYSTEM_PROGRAMS,
            time_windows(hour)
        ),
    )?;
    // tb-fakeagent plays root's own program on /dev/trustbind below: an
    // approved program, as python would be.
    let rogue_tool = trustbind_qemu_tests::workspace_bin("tb-fakeagent")?;
    admin.run(&[
        "sig",
        "add",
        "-g",
        "system",
        &rogue_tool.display().to_string(),
    ])?;
    let sigs = admin.run(&["sig", "ls", "-g", "system", "-n", "0"])?;
    ensure!(
        sigs.lines().count() > 100,
        "only {} programs added",
        sigs.lines().count()
    );
    let tool = common::modified_true(&bins, work.path(), "tool", "y")?;
    let evil = common::modified_true(&bins, work.path(), "evil", "x")?;
    let evil = common::sha256_file(&evil)?;
    admin.run(&[
        "sig",
        "add",
        "-g",
        "admin-tools",
        &tool.display().to_string(),
    ])?;
    for (name, suffix, group) in [("wnow", "n", "window-now"), ("wlater", "l", "window-later")] {
        let p = common::modified_true(&bins, work.path(), name, suffix)?;
        admin.run(&["sig", "add", "-g", group, &p.display().to_string()])?;
    }
    admin.run(&["user", "set", "root", "-r", "admin"])?;

    // Enrol and start the agent, then load the module.
    let mut host = b.host.wait_ready()?;
    host.run_ok(
        "cp /usr/bin/true /root/tool && printf y >>/root/tool \
         && cp /usr/bin/true /root/evil && printf x >>/root/evil \
         && cp /usr/bin/true /root/ok && cp /usr/bin/true /root/wnow && printf n >>/root/wnow \
         && cp /usr/bin/true /root/wlater && printf l >>/root/wlater \
         && chmod 755 /root/tool /root/evil /root/ok /root/wnow /root/wlater",
    )?;
    enrol_host(admin, &mut host, &ip, &fp, "host1", "enforce")?;
    // Loaded with the appliance's authority key: the agent says so.
    let out = host.run_ok(&format!("/tb/trustbind-agent --state {STATE} status"))?;
    ensure!(
        out.stdout
            .contains("sealed: only the appliance can change it"),
        "the module is not sealed: {out:?}"
    );

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
    common::ensure_decision(&export_audit(admin)?, &evil)?;

    // Users: root (role admin) may run the tool, nobody may not.
    host.run_ok("/root/tool")?;
    let out = host.run("setpriv --reuid=65534 --regid=65534 --clear-groups /root/tool")?;
    ensure!(denied(&out), "nobody ran the admin tool: {out:?}");

    // Time windows (clock verdicts are never cached: asked each time).
    host.run_ok("/root/wnow")?;
    let out = host.run("/root/wlater")?;
    ensure!(
        denied(&out),
        "tool outside its time window ran (hour {hour}): {out:?}"
    );

    // Permissive reaches the module: the unknown program runs, audited.
    switch_mode(admin, &mut host, "permissive")?;
    let out = host.run("/root/evil")?;
    ensure!(out.status == 0, "permissive mode refused: {out:?}");
    let audit = export_audit(admin)?;
    ensure!(
        audit
            .lines()
            .any(|l| l.contains(&evil) && says_true(l, "would_deny")),
        "no would-deny audit row for {evil}"
    );
    switch_mode(admin, &mut host, "enforce")?;
    let out = host.run("rmmod trustbind")?;
    ensure!(out.status != 0, "rmmod succeeded in enforce mode");
    host.run_ok("/usr/bin/true")?; // into the kernel's cache again

    // The appliance goes away: the power button, a clean shutdown.
    appl.powerdown()?;
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

    // Back from the same disk: the spooled offline decision arrives.
    appl.boot()?;
    appl.wait_serving()?;
    ensure!(
        appl.ca_fingerprint()? == fp,
        "the CA changed across the reboot"
    );
    wait_for(
        &mut host,
        "the spool to drain",
        &format!("grep -q '\"connected\": true' {STATE}/status.json && grep -q '\"spool_backlog\": 0' {STATE}/status.json"),
        240,
    )?;
    let audit = export_audit(admin)?;
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
    let out = admin.run(&["audit", "verify"])?;
    ensure!(out.contains("intact"), "audit chain: {out:?}");

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
    start_agent(&mut host)?;
    wait_for(
        &mut host,
        "the restarted agent",
        // status.json still holds the dead agent's last state until the new
        // one writes: wait for the new pid, connected.
        &format!("p=$(pidof trustbind-agent) && grep -q \"pid.: $p,\" {STATE}/status.json && grep -q '\"connected\": true' {STATE}/status.json"),
        120,
    )?;
    host.run_ok("/usr/bin/nproc")?;

    // Root without the appliance's consent (T-44, T-101). Root's tool is
    // an approved program (tb-fakeagent; python would do as well): run it
    // once now so its exec is in the kernel's cache, then stop the agent.
    let _ = host.run("/tb/tb-fakeagent")?; // no arguments: exits at once
    host.run_ok(
        "cp /usr/bin/true /root/rogue && printf r >>/root/rogue && chmod 755 /root/rogue \
         && grep -qx enforce /sys/module/trustbind/parameters/current_mode \
         && { rmmod trustbind 2>/dev/null || :; }",
    )?;
    let pid = stop_agent(&mut host, "KILL")?;
    // 1. An order to switch enforcement off is refused, and so is one to
    //    go permissive: the module stays in enforce mode and pinned.
    for mode in ["disabled", "permissive"] {
        let out = host.run(&format!(
            "/tb/tb-fakeagent --mode {mode} --log /run/rogue.log"
        ))?;
        ensure!(
            out.status != 0 && out.stderr.contains("Operation not permitted"),
            "root's Config{{{mode}}} was not refused: {out:?}"
        );
        host.run_ok("grep -qx enforce /sys/module/trustbind/parameters/current_mode")?;
    }
    let out = host.run("rmmod trustbind")?;
    ensure!(
        out.status != 0 && out.stderr.contains("in use"),
        "rmmod was not refused as in use after root's orders: {out:?}"
    );
    // 2. Root's program answers "allow" to everything it is asked (it
    //    keeps connects qualified: turning that off is refused too): the
    //    module takes an unsealed allow as a refusal.
    start_rogue_agent(
        &mut host,
        "--mode enforce --net --timeout-ms 10000 --allow-dir /root --allow-dir /usr/bin",
    )?;
    let out = host.run("/root/rogue")?;
    ensure!(
        denied(&out),
        "root's agent got an unapproved program run: {out:?}"
    );
    host.run_ok("grep -q 'rogue.*-> allow' /run/rogue.log")?;
    host.run_ok("grep -qv '^0$' /sys/kernel/debug/trustbind/unsealed_refused")?;
    stop_rogue_agent(&mut host)?;
    host.run_ok("grep -qx enforce /sys/module/trustbind/parameters/current_mode")?;
    // The real agent, restarted (the pinned binary), is the appliance's
    // courier again.
    start_agent(&mut host)?;
    wait_new_agent(&mut host, Some(&pid))?;
    host.run_ok("/usr/bin/nproc")?;

    // The init script (agent/dist/) takes over: it starts the pinned agent
    // binary, restarts it when it is killed, and `stop` leaves the module
    // enforcing.
    let pid = stop_agent(&mut host, "TERM")?;
    host.run_ok(&format!("{INIT} start"))?;
    let first = wait_new_agent(&mut host, Some(&pid))?;
    host.run_ok(&format!("kill -KILL {first}"))?;
    let second = wait_new_agent(&mut host, Some(&first))?;
    let out = host.run_ok(&format!("{INIT} status"))?;
    ensure!(
        out.stdout.contains("(connected)"),
        "init script status: {out:?}"
    );
    // (rmmod is run once with the agent up, so its exec is in the cache.)
    host.run("rmmod trustbind")?;
    host.run_ok(&format!("{INIT} stop"))?;
    ensure!(
        host.run(&format!("kill -0 {second}"))?.status != 0,
        "the agent survived `stop`"
    );
    let out = host.run("rmmod trustbind")?;
    ensure!(
        out.status != 0 && out.stderr.contains("in use"),
        "after the init script stopped the agent, rmmod was not refused as in use (enforce lost?): {out:?}"
    );
    host.run_ok(&format!("{INIT} start"))?;
    wait_new_agent(&mut host, Some(&second))?;

    // Permissive with the appliance away: an uncached program runs.
    switch_mode(admin, &mut host, "permissive")?;
    appl.powerdown()?;
    let out = host.run("/usr/bin/factor 7")?; // approved, never seen
    ensure!(
        out.status == 0 && out.stdout.contains("7: 7"),
        "permissive mode refused an uncached exec with the appliance away: {out:?}"
    );

    host.run_ok(&format!("{INIT} stop"))?;
    host.check_health()?;
    appl.check_health()?;
    host.shutdown()?;
    Ok(())
}
