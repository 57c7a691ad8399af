//! File access control end to end (issue 17): the appliance OS image and a
//! protected host running `trustbind.ko` and `trustbind-agent`, set up
//! with the `trustbind` CLI: file sets `webroot` (`/srv/www`) and
//! `app-logs` (`/srv/log`), reference groups `web-servers` (nginx) and
//! `editors` (a modified `tee`), role `webadmin` for root, and policy:
//!
//! - nginx reads the web root; nothing else does, except
//! - the approved editor, for role `webadmin` only, reads and writes it;
//! - anyone appends to the logs and reads them; nobody truncates, deletes
//!   or renames them (a logrotate-style rotation is refused).
//!
//! Proves, with real programs: nginx serves the web root, `cat` may not
//! read it; the editor writes for root and is refused for nobody; an
//! append to a log works, truncating and rotating it are refused and
//! audited with the file's path; the agent's protected identities reach
//! the module from the appliance's file sets; in permissive mode the read
//! is let through and audited "would deny"; no kernel warning.

use anyhow::{ensure, Result};
use trustbind_qemu_tests::Output;

use crate::common::{
    self, enrol_host, export_audit, says_true, start_agent, start_rogue_agent, stop_agent,
    stop_rogue_agent, wait_for, wait_new_agent, STATE,
};

const FILE_POLICY: &str = r#"
@id("editor-runs")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"editors");

@id("network")
permit (principal, action in [Trustbind::Action::"connect", Trustbind::Action::"accept"], resource);

@id("webroot-web-server-read")
permit (principal, action == Trustbind::Action::"open_read", resource in Trustbind::FileSet::"webroot")
when { context.program in Trustbind::ProgramGroup::"web-servers" };

@id("webroot-editor")
permit (
    principal in Trustbind::Role::"webadmin",
    action in [Trustbind::Action::"open_read", Trustbind::Action::"open_write"],
    resource in Trustbind::FileSet::"webroot"
)
when { context.program in Trustbind::ProgramGroup::"editors" };

@id("logs-read")
permit (principal, action == Trustbind::Action::"open_read", resource in Trustbind::FileSet::"app-logs");

@id("logs-append")
permit (principal, action == Trustbind::Action::"open_write", resource in Trustbind::FileSet::"app-logs")
when { !context.truncate };
"#;

fn refused(out: &Output) -> bool {
    out.status != 0 && out.stderr.contains("Permission denied")
}

#[test]
fn file_control_end_to_end() -> Result<()> {
    let mut b = common::appliance_and_host()?;
    let (admin, appl, art, work) = (&b.admin, &mut b.appl, &b.art, &b.work);
    let (ip, fp) = (b.ip.clone(), b.fp.clone());

    let bins = common::provision(
        admin,
        art,
        work.path(),
        &format!("{}{FILE_POLICY}", common::SYSTEM_PROGRAMS),
    )?;
    let path = |p: &std::path::Path| p.display().to_string();
    admin.run(&[
        "sig",
        "add",
        "-g",
        "web-servers",
        &path(&bins[1].join("nginx")),
    ])?;
    let mut editor = std::fs::read(bins[0].join("tee"))?;
    editor.push(b'e');
    let editor_file = work.path().join("editor");
    std::fs::write(&editor_file, editor)?;
    admin.run(&["sig", "add", "-g", "editors", &path(&editor_file)])?;
    // tb-fakeagent plays root's own program on /dev/trustbind below (an
    // approved program, as python would be).
    let rogue_tool = trustbind_qemu_tests::workspace_bin("tb-fakeagent")?;
    admin.run(&["sig", "add", "-g", "system", &path(&rogue_tool)])?;
    admin.run(&["user", "set", "root", "-r", "webadmin"])?;
    admin.run(&["fileset", "add", "webroot", "/srv/www"])?;
    admin.run(&["fileset", "add", "app-logs", "/srv/log"])?;

    let mut host = b.host.wait_ready()?;
    host.run_ok(
        "mkdir -p /srv/www /srv/log && chmod 1777 /srv/www \
         && echo welcome >/srv/www/index.html && chmod 666 /srv/www/index.html \
         && echo first >/srv/log/app.log \
         && cp /usr/bin/tee /root/editor && printf e >>/root/editor && chmod 755 /root/editor \
         && printf 'worker_processes 1; pid /run/ngx.pid; error_log /run/ngx-err.log;\\n\
         events {}\\nhttp { access_log off; server { listen 127.0.0.1:8080; root /srv/www; } }\\n' \
         >/run/nginx.conf",
    )?;
    enrol_host(admin, &mut host, &ip, &fp, "host1", "enforce")?;
    // The appliance's file sets reach the module through the agent.
    host.run_ok("mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug")?;
    wait_for(
        &mut host,
        "the protected identities",
        "[ $(cat /sys/kernel/debug/trustbind/file_protected) -ge 2 ]",
        120,
    )?;
    // The module resolved the appliance's sealed paths itself.
    wait_for(
        &mut host,
        "the sealed paths resolved",
        "[ $(cat /sys/kernel/debug/trustbind/file_paths_resolved) -eq 2 ]",
        120,
    )?;

    // nginx reads the web root; cat may not.
    host.run_ok("nginx -c /run/nginx.conf")?;
    let out = host.run_ok("curl -sS --max-time 60 http://127.0.0.1:8080/index.html")?;
    if out.stdout.trim() != "welcome" {
        let logs = host.run("cat /run/ngx-err.log; tail -20 /run/agent.log")?;
        let audit = export_audit(admin)?;
        let rows: Vec<&str> = audit.lines().filter(|l| l.contains("/srv/www")).collect();
        anyhow::bail!(
            "nginx did not serve: {out:?}\nnginx and agent logs:\n{}{}\naudit rows:\n{}",
            logs.stdout,
            logs.stderr,
            rows.join("\n")
        );
    }
    let out = host.run("cat /srv/www/index.html")?;
    ensure!(refused(&out), "cat read the web root: {out:?}");

    // The editor writes for role webadmin (root), not for nobody.
    let out = host.run("echo edited | /root/editor /srv/www/new.html >/dev/null")?;
    if out.status != 0 {
        let sum = host.run("sha256sum /root/editor; tail -5 /run/agent.log")?;
        let audit = export_audit(admin)?;
        let rows: Vec<&str> = audit.lines().rev().take(6).collect();
        anyhow::bail!(
            "the editor failed for root: {out:?}\n{}{}\nhost side {}\nlast audit rows:\n{}",
            sum.stdout,
            sum.stderr,
            common::sha256_file(&editor_file)?,
            rows.join("\n")
        );
    }
    let out = host.run_ok("curl -sS --max-time 60 http://127.0.0.1:8080/new.html")?;
    ensure!(
        out.stdout.trim() == "edited",
        "the edit is not served: {out:?}"
    );
    let out = host.run(
        "setpriv --reuid=65534 --regid=65534 --clear-groups \
         sh -c 'echo defaced | /root/editor /srv/www/index.html'",
    )?;
    ensure!(refused(&out), "nobody wrote with the editor: {out:?}");

    // Logs: appends work; truncating and rotating are refused.
    host.run_ok("echo second >>/srv/log/app.log")?;
    let out = host.run(": >/srv/log/app.log")?;
    ensure!(refused(&out), "a log was truncated: {out:?}");
    let out = host.run("mv /srv/log/app.log /srv/log/app.log.1")?;
    ensure!(refused(&out), "a log was rotated away: {out:?}");
    let out = host.run("rm /srv/log/app.log")?;
    ensure!(refused(&out), "a log was deleted: {out:?}");
    let out = host.run_ok("cat /srv/log/app.log")?;
    ensure!(
        out.stdout == "first\nsecond\n",
        "the log changed: {:?}",
        out.stdout
    );
    let audit = export_audit(admin)?;
    for (action, file) in [
        ("rename", "/srv/log/app.log"),
        ("open_read", "/srv/www/index.html"),
    ] {
        ensure!(
            audit
                .lines()
                .any(|l| l.contains("\"decision\"") && l.contains(action) && l.contains(file)),
            "no audited {action} decision about {file}"
        );
    }

    // Root without the appliance's consent (T-102): with the agent
    // stopped, root's program holds /dev/trustbind, takes the agent's
    // identities away (an empty FileSets, taken: the agent's only add)
    // and answers "allow" to every question. An unsealed FileSetPaths
    // naming nothing is refused; the sealed paths stay protected, and an
    // unsealed allow counts as a refusal.
    // What the harness runs meanwhile must be in the kernel's exec cache:
    // root's program answers "allow", which counts as a refusal.
    let _ = host.run("/tb/tb-fakeagent")?; // no arguments: exits at once
    host.run_ok(
        "grep -q x /dev/null || :; cat /dev/null; head -c 0 /dev/null; pidof init >/dev/null || :; \
         echo eA== | base64 -d >/dev/null; setsid true",
    )?;
    let pid = stop_agent(&mut host, "KILL")?;
    let out =
        host.run("/tb/tb-fakeagent --mode enforce --net --file-paths-clear --log /run/rogue.log")?;
    ensure!(
        out.status != 0
            && out
                .stderr
                .contains("write FileSetPaths: Operation not permitted"),
        "root's empty FileSetPaths was not refused: {out:?}"
    );
    start_rogue_agent(
        &mut host,
        "--mode enforce --net --timeout-ms 10000 --file-sets-clear",
    )?;
    host.run_ok("[ $(cat /sys/kernel/debug/trustbind/file_protected) -eq 2 ]")?;
    // (A read no verdict is cached for: root's program is asked.)
    let out = host.run("head -c 64 /srv/www/new.html")?;
    ensure!(
        refused(&out),
        "root's agent got head to read the web root: {out:?}"
    );
    host.run_ok("grep -q 'file read /srv/www/new.html.*-> allow' /run/rogue.log")?;
    stop_rogue_agent(&mut host)?;
    start_agent(&mut host)?;
    wait_new_agent(&mut host, Some(&pid))?;

    // Permissive: the read goes through and is audited as a would-deny.
    admin.run(&["host", "group", "set", "hosts", "--mode", "permissive"])?;
    wait_for(
        &mut host,
        "permissive mode",
        &format!("grep -q '\"mode\": \"permissive\"' {STATE}/status.json"),
        60,
    )?;
    let out = host.run_ok("cat /srv/www/new.html")?;
    ensure!(out.stdout.trim() == "edited", "permissive read: {out:?}");
    let audit = export_audit(admin)?;
    ensure!(
        audit
            .lines()
            .any(|l| l.contains("/srv/www/new.html") && says_true(l, "would_deny")),
        "no would-deny audit row for the permissive read"
    );

    host.run_ok("kill $(cat /run/ngx.pid)")?;
    host.check_health()?;
    host.shutdown()?;
    appl.powerdown()?;
    Ok(())
}
