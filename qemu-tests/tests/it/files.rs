//! File access control in the kernel (issue 17): a protected directory
//! that only an approved program may read or change, the ways around it
//! (a modified copy of the approved program, a bind mount, `..`, a symbolic
//! link, a hard link out of the set, a rename out of it) refused, what
//! permissive mode records, and what a host with no agent does.
//!
//! The fake agent protects `/srv/data` (by identity) and denies every file
//! request under it except the real `cat`'s; `/srv/pub` on the same file
//! system is not protected.

use anyhow::{ensure, Result};
use trustbind_qemu_tests::{Output, Vm};

use crate::exec::{
    counter, host_with_module, start_agent_in, start_agent_with, stop_agent, AGENT_LOG,
};

/// A modified copy of `cat` (one byte longer): runs, but is not approved
/// for the protected files.
const EVIL: &str = "/tmp/x/evilcat";

fn refused(out: &Output) -> bool {
    out.status != 0 && out.stderr.contains("Permission denied")
}

/// The fake agent's `file ...` lines.
fn file_lines(vm: &mut Vm) -> Result<Vec<String>> {
    let log = vm.run_ok(&format!("cat {AGENT_LOG}"))?.stdout;
    Ok(log
        .lines()
        .filter(|l| l.starts_with("file "))
        .map(str::to_owned)
        .collect())
}

fn agent(vm: &mut Vm, mode: &str) -> Result<()> {
    start_agent_with(
        vm,
        mode,
        &format!(
            "--allow {EVIL} --file-protect /srv/data --file-deny /srv/data \
             --file-allow-prog /usr/bin/cat --file-allow-prog /usr/bin/tail"
        ),
    )
}

fn setup(vm: &mut Vm) -> Result<()> {
    vm.run_ok(&format!(
        "mkdir -p /tmp/x /srv/data/sub /srv/pub /mnt/b && echo secret >/srv/data/db \
         && echo deep >/srv/data/sub/f && echo open >/srv/pub/x \
         && cp /usr/bin/cat {EVIL} && printf x >>{EVIL} && chmod 755 {EVIL}"
    ))?;
    Ok(())
}

#[test]
fn file_gate_enforce() -> Result<()> {
    let mut vm = host_with_module()?;
    setup(&mut vm)?;
    agent(&mut vm, "enforce")?;

    // The approved program reads; the second read is the cache's.
    let out = vm.run_ok("cat /srv/data/db")?;
    ensure!(out.stdout.trim() == "secret", "approved read: {out:?}");
    let asked = file_lines(&mut vm)?.len();
    ensure!(asked >= 1, "the approved read was never asked");
    vm.run_ok("cat /srv/data/db")?;
    ensure!(
        file_lines(&mut vm)?.len() == asked,
        "a cached verdict was asked again: {:?}",
        file_lines(&mut vm)?
    );
    ensure!(
        counter(&mut vm, "file_cache_hits")? >= 1,
        "no cache hit counted"
    );

    // An unapproved program is refused, however it names the file.
    for path in ["/srv/data/db", "/srv/data/sub/f", "/srv/pub/../data/db"] {
        let out = vm.run(&format!("{EVIL} {path}"))?;
        ensure!(refused(&out), "{EVIL} {path} was not refused: {out:?}");
    }
    vm.run_ok("ln -s /srv/data/db /srv/pub/sym && mount --bind /srv/data /mnt/b")?;
    for path in ["/srv/pub/sym", "/mnt/b/db", "/mnt/b/sub/f"] {
        let out = vm.run(&format!("{EVIL} {path}"))?;
        ensure!(refused(&out), "{EVIL} {path} was not refused: {out:?}");
    }
    // Another process's descriptor of the file, through /proc: the same
    // dentry, refused the same way (`tail -f`, approved, holds it open).
    let tail = vm.spawn_bg("exec tail -f /srv/data/db")?;
    vm.run_ok("sleep 1")?;
    let fd = vm.run_ok(&format!(
        "for f in /proc/{}/fd/*; do [ \"$(readlink $f)\" = /srv/data/db ] && echo $f; done; true",
        tail.pid
    ))?;
    let fd = fd.stdout.trim();
    ensure!(
        fd.starts_with("/proc/"),
        "tail holds no descriptor of the file"
    );
    let out = vm.run(&format!("{EVIL} {fd}"))?;
    ensure!(refused(&out), "{EVIL} read through /proc/PID/fd: {out:?}");
    vm.run_ok(&format!("kill {}", tail.pid))?;
    // The request names the file by its path on its file system, not by
    // the bind mount it was opened through.
    let lines = file_lines(&mut vm)?;
    ensure!(
        !lines.iter().any(|l| l.contains("/mnt/b")),
        "a bind mount path reached the agent: {lines:?}"
    );
    ensure!(
        lines
            .iter()
            .any(|l| l.starts_with("file read /srv/data/sub/f ") && l.ends_with("-> deny")),
        "no denied read of /srv/data/sub/f: {lines:?}"
    );
    // Unprotected files are never asked about.
    vm.run_ok(&format!("{EVIL} /srv/pub/x"))?;
    ensure!(
        !file_lines(&mut vm)?
            .iter()
            .any(|l| l.contains("/srv/pub/x")),
        "an unprotected file was asked about"
    );

    // Changes by unapproved programs: delete, rename out, create, truncate.
    for cmd in [
        "rm -f /srv/data/db",
        "mv /srv/data/db /srv/pub/stolen",
        "cp /etc/hostname /srv/data/new",
        "truncate -s 0 /srv/data/db",
        "rmdir /srv/data/sub",
    ] {
        let out = vm.run(cmd)?;
        ensure!(refused(&out), "`{cmd}` was not refused: {out:?}");
    }
    let out = vm.run_ok("cat /srv/data/db; ls /srv/data; ls /srv/pub")?;
    ensure!(
        out.stdout.contains("secret")
            && !out.stdout.contains("new")
            && !out.stdout.contains("stolen"),
        "a refused change happened anyway: {out:?}"
    );
    // Renaming into the protected set is asked too.
    let out = vm.run("mv /srv/pub/x /srv/data/x")?;
    ensure!(
        refused(&out),
        "a rename into the set was not refused: {out:?}"
    );

    // A hard link out of the set is refused by the module itself.
    let out = vm.run("ln /srv/data/db /srv/pub/link")?;
    ensure!(
        refused(&out),
        "a hard link out of the set was made: {out:?}"
    );
    ensure!(counter(&mut vm, "file_link_refused")? >= 1, "not counted");

    // The agent gone (killed: the module stays in enforce mode): the
    // cached verdict still holds, an uncached question is refused.
    // What the harness runs to start an agent again is asked (and
    // cached) now, while one answers.
    vm.run_ok(
        "sleep 0.1; rm -f /run/none; grep -q x /dev/null; echo | base64 -d; setsid true; true",
    )?;
    vm.run_ok("pkill -KILL -x tb-fakeagent")?;
    let out = vm.run_ok("cat /srv/data/db")?;
    ensure!(
        out.stdout.trim() == "secret",
        "cached read with no agent: {out:?}"
    );
    let out = vm.run("cat /srv/data/sub/f")?;
    ensure!(
        refused(&out),
        "an uncached read with no agent was let through: {out:?}"
    );
    ensure!(
        counter(&mut vm, "file_no_agent")? >= 1,
        "no-agent refusal not counted"
    );

    agent(&mut vm, "permissive")?;
    stop_agent(&mut vm)?;
    vm.run_ok("umount /mnt/b && rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}

#[test]
fn file_gate_permissive() -> Result<()> {
    let mut vm = host_with_module()?;
    setup(&mut vm)?;
    agent(&mut vm, "permissive")?;
    let out = vm.run_ok(&format!("{EVIL} /srv/data/db"))?;
    ensure!(out.stdout.trim() == "secret", "permissive read: {out:?}");
    vm.run_ok("rm /srv/data/sub/f")?;
    ensure!(
        counter(&mut vm, "file_would_deny")? >= 2,
        "would-deny not recorded"
    );
    let lines = file_lines(&mut vm)?;
    ensure!(
        lines
            .iter()
            .any(|l| l.starts_with("file delete /srv/data/sub/f ")),
        "the delete was not asked: {lines:?}"
    );
    ensure!(
        counter(&mut vm, "file_denied")? == 0,
        "permissive mode refused"
    );
    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}

/// btrfs subvolumes (T-98): each reports a device of its own in `stat`,
/// and inode numbers repeat across them. A directory protected on a
/// subvolume (named through a `subvol=` mount, as the agent's `stat`
/// sees it) is protected through every mount of it, and so are files on
/// a subvolume nested below it; the directory with the same inode number
/// on another subvolume is not. The request names the file by its path
/// from the file system's top and by the super block's device, the one
/// mountinfo shows (the agent maps it to the host path through the
/// `subvol=` mount's root).
#[test]
fn file_gate_btrfs_subvolumes() -> Result<()> {
    let mut vm = host_with_module()?;
    setup(&mut vm)?;
    vm.run_ok(
        "truncate -s 160M /root/bt.img && mkfs.btrfs -q /root/bt.img \
         && dev=$(losetup -f --show /root/bt.img) && mkdir -p /mnt/bt /srv/v \
         && mount $dev /mnt/bt \
         && btrfs subvolume create /mnt/bt/vol >/dev/null && btrfs subvolume create /mnt/bt/other >/dev/null \
         && mkdir /mnt/bt/vol/data /mnt/bt/other/pub \
         && echo secret >/mnt/bt/vol/data/db && echo open >/mnt/bt/other/pub/x \
         && btrfs subvolume create /mnt/bt/vol/data/inner >/dev/null && echo inner >/mnt/bt/vol/data/inner/f \
         && mount -o subvol=vol $dev /srv/v",
    )?;
    let ids = vm
        .run_ok("stat -c '%d %i' /srv/v/data /mnt/bt/other/pub /mnt/bt")?
        .stdout;
    let ids: Vec<&str> = ids.lines().collect();
    let (data, other, top) = match ids[..] {
        [a, b, c] => (a, b, c),
        _ => anyhow::bail!("stat: {ids:?}"),
    };
    let ino = |s: &str| s.split(' ').nth(1).map(str::to_owned);
    let dev = |s: &str| s.split(' ').next().map(str::to_owned);
    ensure!(
        ino(data) == ino(other) && dev(data) != dev(other) && dev(data) != dev(top),
        "the subvolumes do not show what this test is about \
         (same inode, devices of their own): {ids:?}"
    );
    start_agent_with(
        &mut vm,
        "enforce",
        &format!(
            "--allow {EVIL} --file-protect /srv/v/data --file-deny / \
             --file-allow-prog /usr/bin/cat"
        ),
    )?;

    let out = vm.run_ok("cat /srv/v/data/db")?;
    ensure!(out.stdout.trim() == "secret", "approved read: {out:?}");
    for path in [
        "/srv/v/data/db",
        "/mnt/bt/vol/data/db",
        "/srv/v/data/inner/f",
        "/mnt/bt/vol/data/inner/f",
    ] {
        let out = vm.run(&format!("{EVIL} {path}"))?;
        ensure!(refused(&out), "{EVIL} {path} was not refused: {out:?}");
    }
    let out = vm.run_ok(&format!("{EVIL} /mnt/bt/other/pub/x"))?;
    ensure!(out.stdout.trim() == "open", "the other subvolume: {out:?}");
    let lines = file_lines(&mut vm)?;
    ensure!(
        !lines.iter().any(|l| l.contains("/other/")),
        "a file on the other subvolume was asked about: {lines:?}"
    );
    // The request's device and path are the mount table's: mountinfo's
    // device of the subvol= mount, and the path below its root.
    let mi = vm.run_ok("grep ' /srv/v ' /proc/self/mountinfo")?.stdout;
    let f: Vec<&str> = mi.split(' ').collect();
    let (mdev, mroot) = (
        f.get(2).copied().unwrap_or(""),
        f.get(3).copied().unwrap_or(""),
    );
    ensure!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("file read {mroot}/data/db "))
                && l.contains(&format!(" dev={mdev} "))
                && l.ends_with("-> deny")),
        "no denied read of {mroot}/data/db on {mdev} (mountinfo: {mi}): {lines:?}"
    );
    stop_agent(&mut vm)?;
    vm.run_ok("umount /srv/v /mnt/bt && rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}

/// The module resolves protected paths itself (`FileSetPaths`, the order
/// the appliance seals, T-102): from init's root and mount namespace,
/// symlinks followed, whatever the agent's own mount namespace shows.
/// Root's agent runs in a mount namespace of its own with a tmpfs over
/// `/srv` (it cannot see `/srv/data` at all, so it could not have resolved
/// it) and names `/srv/data`, a symlink to it and a path that does not
/// exist yet: the module protects the real directory, once, and names
/// requests under it by the first of the two paths; the missing
/// path is counted, and protected once it exists and the paths come again
/// (as the agent sends them every 30 s). A protected directory on a file
/// system of its own (`/mnt/t/data`, a tmpfs) is asked about by the path
/// the appliance named (`FILE_PATH_NAMED`), not the one from the file
/// system's root (`/data/f`), which the fake agent's prefix would miss.
/// A file system mounted below a protected directory (`/srv/data/m`)
/// is protected too, found by the module in init's mount table (the fake
/// agent sends no identities at all), and named by its mount point.
#[test]
fn file_gate_paths_resolved_by_the_module() -> Result<()> {
    let mut vm = host_with_module()?;
    setup(&mut vm)?;
    vm.run_ok(
        "ln -s /srv/data /srv/link && mkdir -p /mnt/t && mount -t tmpfs none /mnt/t \
         && mkdir /mnt/t/data && echo m >/mnt/t/data/f \
         && mkdir /srv/data/m && mount -t tmpfs none /srv/data/m && echo mm >/srv/data/m/f",
    )?;
    start_agent_in(
        &mut vm,
        "exec unshare -m sh -c 'mount -t tmpfs none /srv && {}'",
        "enforce",
        &format!(
            "--allow {EVIL} --file-path /srv/data --file-path /srv/link --file-path /srv/later \
             --file-path /mnt/t/data --file-deny /srv/data --file-deny /srv/later \
             --file-deny /mnt/t/data --file-allow-prog /usr/bin/cat"
        ),
    )?;
    let out = vm.run("nsenter -t $(pidof tb-fakeagent) -m ls /srv/data")?;
    ensure!(
        out.status != 0,
        "the agent's mount namespace shows /srv/data: {out:?}"
    );
    let (resolved, missing, protected) = (
        counter(&mut vm, "file_paths_resolved")?,
        counter(&mut vm, "file_paths_missing")?,
        counter(&mut vm, "file_protected")?,
    );
    ensure!(
        (resolved, missing, protected) == (3, 1, 3),
        "resolved {resolved}, missing {missing}, protected {protected}: want 3, 1, 3"
    );
    let out = vm.run_ok("cat /srv/data/db")?;
    ensure!(out.stdout.trim() == "secret", "approved read: {out:?}");
    for path in ["/srv/data/db", "/srv/link/db", "/srv/data/sub/f"] {
        let out = vm.run(&format!("{EVIL} {path}"))?;
        ensure!(refused(&out), "{EVIL} {path} was not refused: {out:?}");
    }
    let out = vm.run_ok(&format!("{EVIL} /srv/pub/x"))?;
    ensure!(out.stdout.trim() == "open", "unprotected read: {out:?}");
    for path in ["/mnt/t/data/f", "/srv/data/m/f", "/srv/link/m/f"] {
        let out = vm.run(&format!("{EVIL} {path}"))?;
        ensure!(refused(&out), "{EVIL} {path} was not refused: {out:?}");
    }
    let out = vm.run("echo x >/mnt/t/data/new")?;
    ensure!(
        refused(&out),
        "a new file in /mnt/t/data was not refused: {out:?}"
    );
    let lines = file_lines(&mut vm)?;
    for want in [
        "file read /mnt/t/data/f flags=8 ",
        "file write /mnt/t/data/new flags=9 ",
        "file read /srv/data/m/f flags=8 ",
    ] {
        ensure!(
            lines
                .iter()
                .any(|l| l.starts_with(want) && l.ends_with("-> deny")),
            "no denied request `{want}...`: {lines:?}"
        );
    }

    // The missing path appears; once the paths come again it is protected.
    vm.run_ok("mkdir /srv/later && echo new >/srv/later/f")?;
    let out = vm.run_ok(&format!("{EVIL} /srv/later/f"))?;
    ensure!(out.stdout.trim() == "new", "not protected yet: {out:?}");
    vm.run_ok(&format!(
        "kill -USR2 $(pidof tb-fakeagent) && for i in $(seq 100); do grep -q '^paths sent' {AGENT_LOG} && break; sleep 0.2; done"
    ))?;
    let (resolved, missing) = (
        counter(&mut vm, "file_paths_resolved")?,
        counter(&mut vm, "file_paths_missing")?,
    );
    ensure!(
        (resolved, missing) == (4, 0),
        "after the re-send: resolved {resolved}, missing {missing}: want 4, 0"
    );
    let out = vm.run(&format!("{EVIL} /srv/later/f"))?;
    ensure!(
        refused(&out),
        "{EVIL} /srv/later/f was not refused: {out:?}"
    );
    stop_agent(&mut vm)?;
    vm.run_ok("umount /mnt/t /srv/data/m && rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}

/// The unapproved program reads `path` twice; the second read must be
/// answered by a remembered place.
fn read_twice_remembered(vm: &mut Vm, path: &str) -> Result<()> {
    let before = counter(vm, "file_places_seen")?;
    for _ in 0..2 {
        vm.run_ok(&format!("{EVIL} {path}"))?;
    }
    ensure!(
        counter(vm, "file_places_seen")? > before,
        "the second read of {path} was not answered by a remembered place"
    );
    Ok(())
}

/// The gate remembers what the walk up from a file found, so a file
/// opened before costs one lookup, and the answer is never used once it
/// may have changed: a directory moved into the protected set (the same
/// file, the same directory, now below `/srv/data`), or the set itself
/// changed. Without the dentry tree's version or the epoch in the
/// remembered place, the unapproved program would read both files below.
#[test]
fn file_gate_remembered_places_follow_renames_and_set_changes() -> Result<()> {
    let mut vm = host_with_module()?;
    setup(&mut vm)?;
    vm.run_ok("mkdir -p /srv/pub/d && echo moved >/srv/pub/d/f && echo later >/srv/pub/y")?;
    let protect = |dirs: &[&str]| {
        let sets: String = dirs
            .iter()
            .map(|d| format!(" --file-protect {d} --file-deny {d}"))
            .collect();
        format!("--allow {EVIL}{sets} --file-allow-prog /usr/bin/cat --file-allow-prog /usr/bin/mv")
    };
    start_agent_with(&mut vm, "enforce", &protect(&["/srv/data"]))?;
    read_twice_remembered(&mut vm, "/srv/pub/d/f")?;

    // Moved into the set by an approved program: protected from now on.
    vm.run_ok("mv /srv/pub/d /srv/data/d")?;
    let out = vm.run(&format!("{EVIL} /srv/data/d/f"))?;
    ensure!(
        refused(&out),
        "a file whose directory moved into the set was read: {out:?}"
    );
    let out = vm.run_ok("cat /srv/data/d/f")?;
    ensure!(out.stdout.trim() == "moved", "approved read: {out:?}");

    // The set grows to /srv/pub: a file read a moment ago (its place
    // remembered after the move above) is protected.
    read_twice_remembered(&mut vm, "/srv/pub/y")?;
    stop_agent(&mut vm)?;
    start_agent_with(&mut vm, "enforce", &protect(&["/srv/data", "/srv/pub"]))?;
    let out = vm.run(&format!("{EVIL} /srv/pub/y"))?;
    ensure!(
        refused(&out),
        "a file of a newly protected set was read: {out:?}"
    );

    stop_agent(&mut vm)?;
    vm.run_ok("rmmod trustbind")?;
    vm.check_health()?;
    vm.shutdown()?;
    Ok(())
}
