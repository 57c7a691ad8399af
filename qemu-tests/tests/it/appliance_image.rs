//! The appliance OS image (issue 5 item 4), seen only from outside: its
//! console, the network (the `trustbind` CLI from the test namespace, a
//! protected host VM's agent) and QEMU's power button.
//!
//! `disk_image_persists_and_refuses_a_corrupt_data_partition`: GRUB boots
//! the disk image; an administrator enrols with the banner's token; a host
//! VM enrols and gets decisions (allowed, denied with an audit row); the
//! power button shuts the appliance down cleanly and the same disk boots
//! again with policy, signatures, host, audit (and its chain) and CA intact,
//! and the agent reconnects; a corrupted data partition is reported on the
//! console, the daemon's ports stay closed and the partition is not touched.
//!
//! `the_data_partition_grows_to_a_larger_disk`: the disk image enlarged
//! by 192 MiB while the appliance is off; at the next boot the data
//! partition (GPT) and its ext4 fill it (`grow-data`), the CA is the same,
//! and a third boot changes nothing.
//!
//! `direct_boot_serves`: `-kernel/-initrd` without a disk reaches serving,
//! says NOT PERSISTENT, and powers off cleanly; with the disk image
//! attached it uses its data partition.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sha2::Digest;
use trustbind_qemu_tests::{gpt_partition, Appliance, ApplianceImage, Artifacts, Boot, Network};

use crate::common::{self, denied, enrol_host, export_audit, wait_for, STATE};

/// Message rcK prints once the data partition is unmounted.
const CLEAN: &str = "data partition unmounted; clean shutdown";

fn partition_hash(appl: &Appliance) -> Result<String> {
    let disk = appl.disk().context("no disk")?;
    let (start, len) = gpt_partition(disk, "trustbind-data")?;
    let bytes = std::fs::read(disk)?;
    let part = bytes
        .get(start as usize..(start + len) as usize)
        .context("partition beyond the disk")?;
    Ok(common::hex(&sha2::Sha256::digest(part)))
}

#[test]
fn disk_image_persists_and_refuses_a_corrupt_data_partition() -> Result<()> {
    let art = Artifacts::from_env()?;
    let img = ApplianceImage::from_env()?;
    let net = Network::new()?;
    let work = tempfile::tempdir()?;
    let t0 = Instant::now();
    let mut appl = net.appliance("appl", &img, Boot::Disk)?;
    let host = common::host_vm(net.vm("host"))?.start(&art)?;
    let first = appl.wait_serving()?;
    let ip = appl.ip().to_string();
    let fp = appl.ca_fingerprint()?;
    let console = appl.console();
    ensure!(
        console.contains("first boot: creating the database"),
        "first boot not announced:\n{console}"
    );
    ensure!(
        !console.contains("NOT PERSISTENT"),
        "disk boot without its data partition"
    );

    // The administrator enrols with the banner's one-time token.
    let admin = appl.admin(&work.path().join("admin"))?;
    let status = admin.run(&["status"])?;
    eprintln!("appliance status:\n{status}");

    // Signatures: the guest image's programs; policy; host group.
    let bins = common::provision(&admin, &art, work.path(), common::SYSTEM_PROGRAMS)?;
    let evil = common::modified_true(&bins, work.path(), "evil", "x")?;
    let evil_hash = common::sha256_file(&evil)?;

    // A protected host enrols and gets decisions.
    let mut host = host.wait_ready()?;
    enrol_host(&admin, &mut host, &ip, &fp, "host1", "enforce")?;
    host.run_ok("/usr/bin/true")?;
    host.run_ok("cp /usr/bin/true /root/evil && printf x >>/root/evil && chmod 755 /root/evil")?;
    let out = host.run("/root/evil")?;
    ensure!(denied(&out), "unknown program not refused: {out:?}");
    let audit_before = export_audit(&admin)?;
    common::ensure_decision(&audit_before, &evil_hash)?;
    let policies = admin.run(&["policy", "list"])?;
    let sigs = admin.run(&["sig", "ls", "-n", "0"])?;
    let hosts = admin.run(&["host", "list"])?;

    // Power button: clean shutdown; the same disk boots again.
    appl.powerdown()?;
    ensure!(
        appl.console().contains(CLEAN),
        "no clean shutdown on the console:\n{}",
        appl.console()
    );
    appl.boot()?;
    let second = appl.wait_serving()?;
    ensure!(
        !appl.console().contains("first boot"),
        "the second boot created a new database:\n{}",
        appl.console()
    );
    ensure!(
        appl.ca_fingerprint()? == fp,
        "the CA changed across the reboot"
    );
    ensure!(
        appl.console().contains("an administrator has enrolled"),
        "the banner offers a new admin token after an admin enrolled:\n{}",
        appl.console()
    );
    ensure!(
        admin.run(&["policy", "list"])? == policies,
        "policies changed"
    );
    ensure!(
        admin.run(&["sig", "ls", "-n", "0"])? == sigs,
        "signatures changed"
    );
    ensure!(admin.run(&["host", "list"])? == hosts, "hosts changed");
    let audit_after = export_audit(&admin)?;
    for l in audit_before.lines() {
        ensure!(
            audit_after.contains(l),
            "audit row lost across the reboot: {l}"
        );
    }
    let verify = admin.run(&["audit", "verify"])?;
    ensure!(verify.contains("intact"), "audit chain: {verify}");

    // The agent reconnects and a new program gets a fresh decision.
    wait_for(
        &mut host,
        "the agent to reconnect",
        &format!("grep -q '\"connected\": true' {STATE}/status.json"),
        240,
    )?;
    host.run_ok("/usr/bin/expr 1 + 1")?;
    common::ensure_decision(&export_audit(&admin)?, "/usr/bin/expr")?;
    host.shutdown()?;

    // Corrupt the data partition's superblock while the appliance is off.
    appl.powerdown()?;
    let disk = appl.disk().context("no disk")?.to_owned();
    let (start, _) = gpt_partition(&disk, "trustbind-data")?;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::options().write(true).open(&disk)?;
        f.seek(SeekFrom::Start(start + 1024))?;
        f.write_all(&[0xa5; 1024])?;
        f.sync_all()?;
    }
    let before = partition_hash(&appl)?;
    appl.boot()?;
    appl.wait_console("DATA PARTITION ERROR", Duration::from_secs(180))?;
    appl.wait_console("trustbind: boot stopped", Duration::from_secs(30))?;
    // The machine answers on the network, but nothing listens.
    let ping = net
        .command("busybox")
        .args(["ping", "-c", "3", "-W", "5", &ip])
        .output()?;
    ensure!(ping.status.success(), "the appliance does not answer pings");
    std::thread::sleep(Duration::from_secs(5));
    let st = admin.command(&["status"]).output()?;
    ensure!(
        st.status.code() == Some(4),
        "the admin port answered with a broken data partition: {st:?}"
    );
    ensure!(
        !appl.console().contains(trustbind_qemu_tests::SERVING),
        "it served anyway"
    );
    appl.powerdown()?;
    ensure!(
        partition_hash(&appl)? == before,
        "the data partition was written"
    );
    eprintln!(
        "appliance image: first boot to serving {first:.1?}, second {second:.1?}, whole test {:.0?}",
        t0.elapsed()
    );
    Ok(())
}

/// Added to the disk image while the appliance is off.
const GROWN_BY: u64 = 192 << 20;

/// The sizes in MiB of the console's `file system grown from A MiB to B MiB`.
fn fs_grown(console: &str) -> Option<(f64, f64)> {
    let rest = console.split("file system grown from ").nth(1)?;
    let mut it = rest.split(" MiB");
    let old = it.next()?.trim().parse().ok()?;
    let new = it.next()?.trim().strip_prefix("to ")?.parse().ok()?;
    Some((old, new))
}

/// Waits until `appl` serves; its console must say `grow-data` found the
/// data partition (`size`) and its file system filling the disk.
fn serves_with_nothing_to_grow(appl: &mut Appliance, size: &str, boot: &str) -> Result<()> {
    appl.wait_serving()?;
    let console = appl.console();
    ensure!(
        console.contains(&format!(
            "partition 3 ({size}) already fills the disk: nothing changed"
        )) && console.contains("file system already fills its partition"),
        "{boot}: grow-data did not find the disk filled:\n{console}"
    );
    Ok(())
}

#[test]
fn the_data_partition_grows_to_a_larger_disk() -> Result<()> {
    let img = ApplianceImage::from_env()?;
    let net = Network::new()?;
    let mut appl = net.appliance("grow", &img, Boot::Disk)?;
    serves_with_nothing_to_grow(&mut appl, "64.0 MiB", "the image's own size")?;
    let fp = appl.ca_fingerprint()?;
    appl.powerdown()?;

    // A larger disk (sparse), as `qemu-img resize` makes it.
    let disk = appl.disk().context("no disk")?.to_owned();
    let (start, len) = gpt_partition(&disk, "trustbind-data")?;
    {
        let f = std::fs::File::options().write(true).open(&disk)?;
        f.set_len(f.metadata()?.len() + GROWN_BY)?;
    }
    appl.boot()?;
    appl.wait_serving()?;
    let console = appl.console();
    ensure!(
        console.contains("partition 3 grown from 64.0 MiB to 256.0 MiB"),
        "the data partition did not grow:\n{console}"
    );
    let (old, new) =
        fs_grown(&console).with_context(|| format!("the file system did not grow:\n{console}"))?;
    // 192 MiB more partition; ext4 keeps about 7 % of it for inode
    // tables, group descriptors and the journal (measured: 54.7 -> 233.9).
    ensure!(
        new > old + 170.0,
        "the file system grew from {old} to only {new} MiB"
    );
    ensure!(
        !console.contains("not grown"),
        "a grow step failed:\n{console}"
    );
    ensure!(
        appl.ca_fingerprint()? == fp,
        "the CA changed across the grow"
    );
    appl.powerdown()?;
    let (start2, len2) = gpt_partition(&disk, "trustbind-data")?;
    ensure!(
        start2 == start && len2 == len + GROWN_BY,
        "partition ({start2}, {len2}) after the grow, ({start}, {len}) before"
    );

    appl.boot()?;
    serves_with_nothing_to_grow(&mut appl, "256.0 MiB", "the third boot")?;
    appl.powerdown()?;
    Ok(())
}

#[test]
fn direct_boot_serves() -> Result<()> {
    let img = ApplianceImage::from_env()?;
    let net = Network::new()?;
    let mut appl = net.appliance("direct", &img, Boot::Direct { data: false })?;
    let t = appl.wait_serving()?;
    let console = appl.console();
    ensure!(
        console.contains("NOT PERSISTENT"),
        "no NOT PERSISTENT warning:\n{console}"
    );
    ensure!(!appl.ca_fingerprint()?.is_empty(), "no fingerprint");
    appl.powerdown()?;
    ensure!(
        appl.console().contains("trustbind: daemon stopped"),
        "no clean stop:\n{}",
        appl.console()
    );
    eprintln!("appliance direct boot: serving {t:.1?} after QEMU started");

    // With the disk attached, its data partition is used.
    let mut appl = net.appliance("direct-data", &img, Boot::Direct { data: true })?;
    appl.wait_serving()?;
    let console = appl.console();
    ensure!(
        console.contains("data partition /dev/vda3 mounted") && !console.contains("NOT PERSISTENT"),
        "the attached data partition was not used:\n{console}"
    );
    appl.powerdown()?;
    Ok(())
}
