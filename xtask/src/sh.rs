//! Running external commands as named steps with useful failures.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Renders a command line for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; fails naming the step and the command.
pub fn run(step: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{step}: cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("{step}: `{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` with stdout and stderr appended to `log`; on failure prints
/// the last lines of the log and names it.
pub fn run_logged(step: &str, cmd: &mut Command, log: &Path, hint: &str) -> Result<()> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("{step}: cannot open log {}", log.display()))?;
    let err = out.try_clone()?;
    let started = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("{step}: cannot start `{}`", show(cmd)))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        eprintln!("==== last lines of {} ====", log.display());
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
        eprintln!("==== end of log ====");
        bail!(
            "{step}: `{}` failed ({status}) after {:.0?}; full log: {}; {hint}",
            show(cmd),
            started.elapsed(),
            log.display()
        );
    }
    Ok(())
}

/// Runs `cmd` and returns its trimmed stdout.
pub fn output(step: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("{step}: cannot start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{step}: `{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// File in the build directory naming the process that builds it.
pub const OWNER: &str = "owner.pid";

/// The pid recorded in `tmp`'s owner file, if that process still runs.
pub fn live_owner(tmp: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(tmp.join(OWNER))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// Takes `tmp` as this process's build directory: refuses one a live build
/// owns, removes an unfinished one with `remove`, creates it and records
/// this process as its owner.
pub fn claim_build_dir(step: &str, tmp: &Path, remove: impl Fn(&Path) -> Result<()>) -> Result<()> {
    if tmp.exists() {
        if let Some(pid) = live_owner(tmp) {
            bail!(
                "{step}: another build (pid {pid}) is writing {}; wait for it to finish, or kill it and run again",
                tmp.display()
            );
        }
        println!(
            "{step}: removing the unfinished build {} left by an earlier run",
            tmp.display()
        );
        remove(tmp)?;
    }
    std::fs::create_dir_all(tmp)
        .with_context(|| format!("{step}: cannot create {}", tmp.display()))?;
    std::fs::write(tmp.join(OWNER), std::process::id().to_string())
        .with_context(|| format!("{step}: cannot write {}", tmp.join(OWNER).display()))
}
