//! A full data partition (issue 16 item 4, T-67), seen from outside: the
//! appliance image booted from its disk, an administrator and a protected
//! host VM set up as in `e2e.rs`, the host refused 1,200 scripts (more
//! audit rows than retention keeps under the disk alarm); the appliance
//! powered off and its data partition filled to the last block from the
//! outside (a file written into the ext4 file system with `debugfs`);
//! booted again.
//!
//! Proves: the daemon comes up on the full partition, raises the disk
//! alarm on the console, releases its reserve so retention can export and
//! prune; the host keeps getting decisions for programs it never ran
//! (allowed and refused, so nothing comes from a cache); those decisions
//! are in the audit log, the chain verifies from the retention checkpoint,
//! and `audit verify-export` accepts the export files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use trustbind_qemu_tests::gpt_partition;

use crate::common::{self, denied, enrol_host, export_audit, wait_for, STATE};

/// Audit rows retention keeps under the disk alarm whatever the headroom
/// (`trustbind_appliance::retention::PRESSURE_FLOOR`).
const FLOOR: usize = 1_000;
/// Scripts the host runs (each refused, one audit row) before the disk is
/// filled: with the setup's rows, more than [`FLOOR`].
const SCRIPTS: usize = 1_200;

/// Copies the disk's `trustbind-data` partition (an ext4 file system) to
/// `work/data.ext4`; returns the copy, the disk's bytes and where in them
/// the partition lies.
fn data_partition(disk: &Path, work: &Path) -> Result<(PathBuf, Vec<u8>, (u64, u64))> {
    let (start, len) = gpt_partition(disk, "trustbind-data")?;
    let part = work.join("data.ext4");
    let bytes = std::fs::read(disk)?;
    let slice = bytes
        .get(start as usize..(start + len) as usize)
        .context("partition beyond the disk")?;
    std::fs::write(&part, slice)?;
    Ok((part, bytes, (start, len)))
}

/// Fills the ext4 file system of the disk's `trustbind-data` partition
/// to its last free block with a file `filler` (the appliance is off).
fn fill_data_partition(disk: &Path, work: &Path) -> Result<u64> {
    let (part, bytes, (start, len)) = data_partition(disk, work)?;
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

/// The appliance's retention export files of the audit log, oldest
/// first, copied out of the (powered-off) disk's data partition.
fn audit_export_files(disk: &Path, work: &Path) -> Result<Vec<PathBuf>> {
    let (part, _, _) = data_partition(disk, work)?;
    let dir = work.join("exported");
    std::fs::create_dir_all(&dir)?;
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump trustbind/export {}", dir.display()))
        .arg(&part)
        .output()?;
    ensure!(out.status.success(), "debugfs rdump: {out:?}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("export"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
    });
    files.sort();
    Ok(files)
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
    // More audit rows than the newest ones retention keeps under the disk
    // alarm (`retention::PRESSURE_FLOOR`), so that on the full disk it has
    // something to export and prune: refusals of scripts the host never
    // ran, one decision each.
    host.run_ok(&format!(
        "mkdir /root/s && for i in $(seq {SCRIPTS}); do printf '#!/bin/sh\\n# %d\\n' $i >/root/s/$i; done \
         && chmod 755 /root/s/*"
    ))?;
    // Four at a time (each waits for the appliance's answer).
    host.run_timeout(
        &format!("seq {SCRIPTS} | xargs -P 4 -n 1 sh -c '/root/s/$0 2>/dev/null; exit 0'"),
        Duration::from_secs(600),
    )?;
    let rows = export_audit(admin)?.lines().count();
    ensure!(
        rows > FLOOR + 100,
        "{rows} audit rows before the disk is filled, not more than {FLOOR} + 100"
    );

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
    ensure!(
        verify.contains("audit chain intact") && verify.contains("pruned: rows 1..="),
        "audit chain not verified from a retention checkpoint: {verify}"
    );
    eprintln!("{verify}");
    host.shutdown()?;
    appl.powerdown()?;
    let files = audit_export_files(&disk, work)?;
    ensure!(
        !files.is_empty(),
        "no audit export file on the data partition"
    );
    let mut args = vec!["audit".to_owned(), "verify-export".to_owned()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let checked = admin.run(&args)?;
    ensure!(checked.contains("export intact"), "export files: {checked}");
    eprintln!("{checked}");
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
