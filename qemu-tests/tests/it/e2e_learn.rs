//! Learning mode end to end (issue 18 item 2): the appliance OS image and
//! a protected host in **permissive** mode. The guest's own programs are
//! approved into `system` (`trustbind sig add`), the policy permits
//! `system` (`common::SYSTEM_PROGRAMS`).
//!
//! Proves, with real programs: the host runs two programs of its own
//! under `/opt/app` (modified copies of `true`, in no group) and a third
//! elsewhere; the appliance lists them as would-deny with their host, user
//! and counts (and the guest's `/usr/bin/id` as allowed, with the Debian
//! package `coreutils` the agent found in dpkg's lists); `trustbind learn
//! --approve-all --group system --path-prefix /opt/app` (after a dry run
//! that changes nothing) approves exactly the two, audited with the
//! admin's name; in **enforce** mode the approved programs run, the
//! unapproved one and another unknown program are refused, and the
//! refusals appear in the list as denied; no kernel warning.

use anyhow::{ensure, Context, Result};
use trustbind_qemu_tests::Admin;

use crate::common::{self, denied, enrol_host, export_audit, switch_mode};

/// The batch approval, as a dry run (without the last word, for
/// real).
const APPROVE: [&str; 7] = [
    "learn",
    "--approve-all",
    "--group",
    "system",
    "--path-prefix",
    "/opt/app",
    "--dry-run",
];

/// Polls `trustbind -o json learn ARGS` until `check` accepts its output.
fn wait_listed(
    admin: &Admin,
    args: &[&str],
    what: &str,
    check: impl Fn(&str) -> bool,
) -> Result<String> {
    let mut cmd = vec!["-o", "json", "learn"];
    cmd.extend_from_slice(args);
    let mut last = String::new();
    for _ in 0..60 {
        last = admin.run(&cmd)?;
        if check(&last) {
            return Ok(last);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    anyhow::bail!("timed out waiting for {what}; last `trustbind learn {args:?}`:\n{last}")
}

#[test]
fn learning_mode_end_to_end() -> Result<()> {
    let mut b = common::appliance_and_host()?;
    let admin = &b.admin;
    common::provision(admin, &b.art, b.work.path(), common::SYSTEM_PROGRAMS)?;
    admin.run(&["host", "group", "set", "hosts", "--mode", "permissive"])?;

    let mut host = b.host.wait_ready()?;
    // The host's own programs: copies of `true` with bytes added, so no
    // group holds them.
    host.run_ok(
        "mkdir -p /opt/app/bin \
         && cp /usr/bin/true /opt/app/run && printf run >>/opt/app/run \
         && cp /usr/bin/true /opt/app/bin/tool && printf tool >>/opt/app/bin/tool \
         && cp /usr/bin/true /root/stranger && printf stranger >>/root/stranger \
         && cp /usr/bin/true /root/another && printf another >>/root/another \
         && chmod 755 /opt/app/run /opt/app/bin/tool /root/stranger /root/another",
    )?;
    enrol_host(admin, &mut host, &b.ip, &b.fp, "host1", "permissive")?;

    // Permissive: everything runs, and the appliance learns of it.
    for p in [
        "/opt/app/run",
        "/opt/app/bin/tool",
        "/opt/app/run",
        "/root/stranger",
    ] {
        host.run_ok(p)?;
    }
    host.run_ok("/usr/bin/id >/dev/null")?;
    // The recorder writes once a second: wait for every program run
    // above, not only the first ones, before reading the listing.
    wait_listed(
        admin,
        &[],
        "the /opt/app programs and /root/stranger",
        |v| {
            v.contains("/opt/app/run")
                && v.contains("/opt/app/bin/tool")
                && v.contains("/root/stranger")
        },
    )?;
    let text = admin.run(&["learn"])?;
    for needle in [
        "/opt/app (1 program(s), 1 host(s))",
        "/opt/app/bin",
        "/root",
        "would-deny",
        "root",
    ] {
        ensure!(
            text.contains(needle),
            "`trustbind learn` lacks {needle:?}:\n{text}"
        );
    }
    ensure!(
        !text.contains("/usr/bin/id"),
        "an allowed program is pending:\n{text}"
    );
    // Counted per decision: the second run may be the kernel's cached verdict.
    let run = admin.run(&["-o", "json", "learn", "--path-prefix", "/opt/app/run"])?;
    ensure!(
        run.contains("\"count\": 1") || run.contains("\"count\": 2"),
        "/opt/app/run's count:\n{run}"
    );
    // The agent names the Debian package of a packaged program.
    let id = wait_listed(
        admin,
        &["--state", "all", "--path-prefix", "/usr/bin/id"],
        "/usr/bin/id",
        |v| v.contains("/usr/bin/id"),
    )?;
    ensure!(
        id.contains("\"coreutils\"") && id.contains("\"allowed\""),
        "/usr/bin/id is not listed as coreutils' and allowed:\n{id}"
    );

    // A dry run changes nothing; the approval takes exactly /opt/app.
    let before = export_audit(admin)?.lines().count();
    let dry = admin.run(&APPROVE)?;
    ensure!(
        dry.contains("dry run: would approve 2 program(s) into system"),
        "dry run:\n{dry}"
    );
    ensure!(
        export_audit(admin)?.lines().count() == before,
        "the dry run wrote to the audit log"
    );
    let done = admin.run(&APPROVE[..6])?;
    ensure!(
        done.contains("approved 2 program(s) into system"),
        "approval:\n{done}"
    );
    let audit = export_audit(admin)?;
    let row = audit
        .lines()
        .find(|l| l.contains("\"learn.approve\""))
        .context("no learn.approve audit row")?;
    ensure!(
        row.contains("\"actor\":\"admin:") && row.contains("/opt/app/run"),
        "learn.approve row: {row}"
    );

    // Enforce: the approved programs run, the others are refused.
    switch_mode(admin, &mut host, "enforce")?;
    host.run_ok("/opt/app/run")?;
    host.run_ok("/opt/app/bin/tool")?;
    for p in ["/root/stranger", "/root/another"] {
        let out = host.run(p)?;
        ensure!(denied(&out), "{p} ran in enforce mode: {out:?}");
    }
    // Refusals of an enforcing host are listed too, marked denied.
    wait_listed(
        admin,
        &["--path-prefix", "/root/another"],
        "the enforce-mode refusal",
        |v| v.contains("/root/another") && v.contains("\"denied\""),
    )?;

    host.check_health()?;
    host.shutdown()?;
    b.appl.powerdown()?;
    Ok(())
}
