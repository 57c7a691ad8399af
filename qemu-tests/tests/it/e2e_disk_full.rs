//! A full data partition (issue 16 item 4, T-67), seen from outside: the
//! appliance image booted from its disk, an administrator and a protected
//! host VM set up as in `e2e.rs`; the appliance powered off and its data
//! partition filled to the last block from the outside (a file written
//! into the ext4 file system with `debugfs`); booted again.
//!
//! Proves: the daemon comes up on the full partition, raises the disk
//! alarm on the console, releases its reserve so retention can export and
//! prune; the host keeps getting decisions for programs it never ran
//! (allowed and refused, so nothing comes from a cache); those decisions
//! are in the audit log, the chain verifies from the retention checkpoint,
//! and `audit verify-export` accepts the export files.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use trustbind_qemu_tests::gpt_partition;

use crate::common::{self, denied, enrol_host, export_audit, wait_for, STATE};

/// Fills the ext4 file system of the disk's `trustbind-data` partition
/// to its last free block with a file `filler` (the appliance is off).
fn fill_data_partition(disk: &Path, work: &Path) -> Result<u64> {
    let (start, len) = gpt_partition(disk, "trustbind-data")?;
    let part = work.join("data.ext4");
    let bytes = std::fs::read(disk)?;
    let slice = bytes
        .get(start as usize..(start + len) as usize)
        .context("partition beyond the disk")?;
    std::fs::write(&part, slice)?;
    let head = Command::new("dumpe2fs").arg("-h").arg(&part).output()?;
    let text = String::from_utf8_lossy(&head.stdout).into_owned();
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no `{name}` in dumpe2fs:\n{text}"))
    };
    let free = field("Free blocks:")?;
    let block = field("Block size:")?;
    // Every free block but 64 (its extent tree takes a few). Not zeros:
    // debugfs leaves a hole for a zero block.
    let size = free.saturating_sub(64) * block;
    let filler = work.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&filler)?);
        let chunk = vec![b'x'; 1 << 16];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(chunk.get(..n).context("chunk")?)?;
            left -= n as u64;
        }
        f.flush()?;
    }
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-R")
        .arg(format!("write {} trustbind/filler", filler.display()))
        .arg(&part)
        .output()?;
    ensure!(out.status.success(), "debugfs: {out:?}");
    let after = Command::new("dumpe2fs").arg("-h").arg(&part).output()?;
    let after = String::from_utf8_lossy(&after.stdout).into_owned();
    eprintln!(
        "data partition: {} free blocks of {block} bytes before, after: {}",
        free,
        after
            .lines()
            .find(|l| l.starts_with("Free blocks:"))
            .unwrap_or("?")
    );
    let mut all = bytes;
    let part_bytes = std::fs::read(&part)?;
    all.get_mut(start as usize..(start + len) as usize)
        .context("partition beyond the disk")?
        .copy_from_slice(&part_bytes);
    std::fs::write(disk, all)?;
    Ok(size)
}

#[test]
fn e2e_disk_full_hosts_keep_getting_decisions() -> Result<()> {
    let mut b = common::appliance_and_host()?;
    let (admin, appl, work) = (&b.admin, &mut b.appl, b.work.path());
    let bins = common::provision(admin, &b.art, work, common::SYSTEM_PROGRAMS)?;
    let evil = common::modified_true(&bins, work, "evil", "x")?;
    let evil_hash = common::sha256_file(&evil)?;
    let mut host = b.host.wait_ready()?;
    enrol_host(admin, &mut host, &b.ip, &b.fp, "host1", "enforce")?;
    host.run_ok("/usr/bin/true")?;

    // Off; the data partition filled to its last block; on again.
    appl.powerdown()?;
    let disk = appl.disk().context("no disk")?.to_owned();
    let filled = fill_data_partition(&disk, work)?;
    eprintln!("filled the data partition with {filled} bytes");
    appl.boot()?;
    appl.wait_serving()?;
    appl.wait_console("DISK ALARM", Duration::from_secs(180))?;
    wait_for(
        &mut host,
        "the agent to reconnect",
        &format!("grep -q '\"connected\": true' {STATE}/status.json"),
        240,
    )?;

    // Programs the host never ran: each one a fresh decision on the full
    // disk, allowed or refused as the policy says.
    for prog in [
        "/usr/bin/expr 1 + 1",
        "/usr/bin/seq 3",
        "/usr/bin/basename /a/b",
    ] {
        let out = host.run(prog)?;
        ensure!(
            out.status == 0,
            "{prog} not allowed on a full disk: {out:?}"
        );
    }
    host.run_ok("cp /usr/bin/true /root/evil && printf x >>/root/evil && chmod 755 /root/evil")?;
    let out = host.run("/root/evil")?;
    ensure!(
        denied(&out),
        "unknown program not refused on a full disk: {out:?}"
    );
    let console = appl.console();
    if !console.contains("DISK FULL: the space reserve") {
        bail!("the reserve was not released:\n{console}");
    }

    // Audited (after retention made room), the chain verifies from its
    // checkpoint, and the export files check out.
    let audit = export_audit(admin)?;
    common::ensure_decision(&audit, "/usr/bin/expr")?;
    common::ensure_decision(&audit, &evil_hash)?;
    let verify = admin.run(&["audit", "verify"])?;
    ensure!(verify.contains("intact"), "audit chain: {verify}");
    eprintln!("{verify}");
    host.shutdown()?;
    appl.powerdown()?;
    eprintln!(
        "console lines about the disk:\n{}",
        appl.console()
            .lines()
            .filter(|l| l.contains("DISK") || l.contains("retention") || l.contains("disk alarm"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}
