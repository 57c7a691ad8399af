// SPDX-License-Identifier: GPL-2.0
//! Exec qualification: the policy half of the binfmt handler.
//!
//! Every exec reaches [`check`] before any real binary handler (ELF,
//! script, ...). It hashes the file being executed in the kernel, asks the
//! agent through the channel, and enforces the answer according to the
//! mode. A `#!` script comes through twice: first as the script, then as
//! its interpreter (the kernel re-runs the handlers with `bprm->file` set
//! to the interpreter), so both are qualified.
//!
//! What each outcome means, by mode (the one place this is decided):
//!
//! | outcome                     | enforce  | permissive         |
//! |-----------------------------|----------|--------------------|
//! | allow (with conditions)     | run      | run                |
//! | deny                        | `EACCES` | run, "would deny"  |
//! | no agent / no answer in time| `EACCES` | run, "would deny"  |
//! | file cannot be read/hashed  | `EACCES` | run, "would deny"  |
//! | signal while waiting        | restart the exec                |
//!
//! In disabled mode nothing is hashed or asked. The agent's own execs are
//! exempt (it must be able to run while nothing answers). Counters of all
//! this are in `/sys/kernel/debug/trustbind/exec_*`.

use core::sync::atomic::{AtomicU64, Ordering};
use kernel::prelude::*;

use crate::device::Answer;
use crate::proto::{Ancestry, Decision, ExecRequest, Mode, Record, MAX_PATH_LEN};
use crate::sys::Bprm;
use crate::Shared;

/// What the exec path did since load (shown in debugfs, see `pem.rs`).
pub(crate) struct Stats {
    /// Execs hashed and asked about (not disabled mode, not the agent).
    pub(crate) asked: AtomicU64,
    /// Allowed by a verdict.
    pub(crate) allowed: AtomicU64,
    /// Refused with `EACCES` (enforce mode).
    pub(crate) denied: AtomicU64,
    /// Would have been refused (permissive mode).
    pub(crate) would_deny: AtomicU64,
    /// Of the refusals: no agent connected.
    pub(crate) no_agent: AtomicU64,
    /// Of the refusals: no verdict in time.
    pub(crate) timeouts: AtomicU64,
    /// Of the refusals: the file could not be hashed.
    pub(crate) unreadable: AtomicU64,
}

/// The exec path's counters.
pub(crate) static STATS: Stats = Stats {
    asked: AtomicU64::new(0),
    allowed: AtomicU64::new(0),
    denied: AtomicU64::new(0),
    would_deny: AtomicU64::new(0),
    no_agent: AtomicU64::new(0),
    timeouts: AtomicU64::new(0),
    unreadable: AtomicU64::new(0),
};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why an exec was refused (or would have been).
enum Refusal {
    Denied,
    NoAgent,
    TimedOut,
    Unreadable(Error),
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Refusal::Denied => f.write_str("denied by policy"),
            Refusal::NoAgent => f.write_str("no agent"),
            Refusal::TimedOut => f.write_str("no verdict in time"),
            Refusal::Unreadable(e) => write!(f, "cannot hash the file: errno {}", e.to_errno()),
        }
    }
}

/// Decides one exec: `Ok` lets it go on to the real binary handlers.
pub(crate) fn check(s: &Shared, bprm: &Bprm<'_>) -> Result {
    let mode = s.channel.mode();
    if mode == Mode::Disabled {
        return Ok(());
    }
    let path = bprm.path().as_bytes();
    let outcome = qualify(s, bprm, path);
    let refusal = match outcome {
        Ok(()) => return Ok(()),
        Err(Err(e)) => return Err(e),
        Err(Ok(r)) => r,
    };
    match refusal {
        Refusal::Denied => {}
        Refusal::NoAgent => bump(&STATS.no_agent),
        Refusal::TimedOut => bump(&STATS.timeouts),
        Refusal::Unreadable(_) => bump(&STATS.unreadable),
    }
    let shown = &path[..path.len().min(256)];
    let shown = core::str::from_utf8(shown).unwrap_or("<non-utf8 path>");
    match mode {
        Mode::Enforce => {
            bump(&STATS.denied);
            pr_info!("exec denied: {} ({})\n", shown, refusal);
            Err(EACCES)
        }
        _ => {
            bump(&STATS.would_deny);
            pr_info!("exec would be denied: {} ({})\n", shown, refusal);
            Ok(())
        }
    }
}

/// `Ok` to run; `Err(Ok(refusal))` for a refusal the mode decides on;
/// `Err(Err(e))` to fail the exec with `e` whatever the mode.
fn qualify(s: &Shared, bprm: &Bprm<'_>, path: &[u8]) -> Result<(), Result<Refusal>> {
    let info = bprm.info().map_err(|e| Ok(Refusal::Unreadable(e)))?;
    if s.channel.is_agent(info.tgid) {
        return Ok(());
    }
    bump(&STATS.asked);
    let (sha256, sha1) = s
        .hashers
        .hash_file(bprm)
        .map_err(|e| Ok(Refusal::Unreadable(e)))?;
    let rec = Record::ExecRequest(ExecRequest {
        sha256,
        sha1,
        size: info.size,
        uid: info.uid,
        euid: info.euid,
        gid: info.gid,
        loginuid: info.loginuid,
        sessionid: info.sessionid,
        pid: info.tgid,
        ppid: info.ptgid,
        ancestry: Ancestry::EMPTY,
        path: &path[..path.len().min(MAX_PATH_LEN)],
    });
    match s.channel.ask(&rec).map_err(Err)? {
        Answer::Verdict(v) => match v.decision {
            Decision::Allow | Decision::AllowWithConditions => {
                bump(&STATS.allowed);
                Ok(())
            }
            Decision::Deny => Err(Ok(Refusal::Denied)),
        },
        Answer::NoAgent => Err(Ok(Refusal::NoAgent)),
        Answer::TimedOut => Err(Ok(Refusal::TimedOut)),
        Answer::Interrupted => Err(Err(ERESTARTNOINTR)),
    }
}
