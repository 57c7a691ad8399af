//! One log line per refusal this host enforces, so that a local
//! administrator sees it in the journal (or on stderr) without the
//! appliance: what was refused (action, program, path, user, target) and
//! why. The line is a `tracing` event at `warn` with the same facts as
//! fields, which the journal keeps as `F_ACTION`, `F_PROGRAM`, `F_PATH`,
//! `F_USER`, `F_UID`, `F_PID`, `F_DEST`, `F_FILE`, `F_REASON` (tracing-journald's
//! `F_` prefix), under `SYSLOG_IDENTIFIER=trustbind-agent`.

/// What was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal<'a> {
    /// `exec`, `connect`, `established`, `accept`, `ipc_connect`,
    /// `open_read`, `open_write`, `delete`, `rename` or `link`.
    pub action: &'a str,
    /// The program's SHA-256 (hex).
    pub program: &'a str,
    /// The program's path (empty when the module did not give it).
    pub path: &'a str,
    /// The user name (`uid:<n>` when unknown).
    pub user: &'a str,
    /// The real uid.
    pub uid: u32,
    /// The process.
    pub pid: u32,
    /// For network actions, the other end (empty otherwise).
    pub dest: &'a str,
    /// For file actions, the file (`from -> to` for a rename or hard
    /// link; empty otherwise).
    pub file: &'a str,
    /// Why (see [`online_reason`] and the offline reasons in `run`).
    pub reason: &'a str,
}

impl Refusal<'_> {
    /// The human line: `refused exec of /tmp/x (sha256 …) for user bob
    /// (uid 1000, pid 42): no policy permits it (default deny)`.
    pub fn line(&self) -> String {
        let program = if self.path.is_empty() {
            format!("sha256 {}", self.program)
        } else {
            format!("{} (sha256 {})", self.path, self.program)
        };
        let what = if !self.file.is_empty() {
            format!("{} of {} by {program}", self.action, self.file)
        } else if self.dest.is_empty() {
            format!("{} of {program}", self.action)
        } else {
            format!("{} to {} by {program}", self.action, self.dest)
        };
        format!(
            "refused {what} for user {} (uid {}, pid {}): {}",
            self.user, self.uid, self.pid, self.reason
        )
    }

    /// Logs the refusal (warn, structured).
    pub fn log(&self) {
        tracing::warn!(
            action = self.action,
            program = self.program,
            path = self.path,
            user = self.user,
            uid = self.uid,
            pid = self.pid,
            dest = self.dest,
            file = self.file,
            reason = self.reason,
            "{}",
            self.line()
        );
    }
}

/// Why the appliance refused, from the determining policies it named: the
/// forbids, or none (nothing permitted it: the default deny).
pub fn online_reason(reasons: &[String]) -> String {
    if reasons.is_empty() {
        "no policy permits it (default deny; `trustbind explain` on the appliance says what was missing)".to_owned()
    } else {
        let names: Vec<String> = reasons.iter().map(|r| format!("`{r}`")).collect();
        format!("forbidden by policy {}", names.join(", "))
    }
}

/// Reason of a refusal answered from the signed offline bundle.
pub const OFFLINE_BUNDLE: &str = "appliance unreachable: the signed offline bundle refuses it";
/// Reason of a refusal by enforce mode's default while the appliance is away.
pub const OFFLINE_DEFAULT: &str =
    "appliance unreachable and not in the offline bundle: enforce mode refuses by default";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_and_connect_lines() {
        let r = Refusal {
            action: "exec",
            program: "9f86",
            path: "/tmp/x",
            user: "bob",
            uid: 1000,
            pid: 42,
            dest: "",
            file: "",
            reason: &online_reason(&[]),
        };
        assert_eq!(
            r.line(),
            "refused exec of /tmp/x (sha256 9f86) for user bob (uid 1000, pid 42): no policy permits it (default deny; `trustbind explain` on the appliance says what was missing)"
        );
        let why = online_reason(&["no-db".to_owned(), "quarantine".to_owned()]);
        let r = Refusal {
            action: "connect",
            path: "",
            dest: "10.0.0.5:5432",
            reason: &why,
            ..r
        };
        assert_eq!(
            r.line(),
            "refused connect to 10.0.0.5:5432 by sha256 9f86 for user bob (uid 1000, pid 42): forbidden by policy `no-db`, `quarantine`"
        );
        let r = Refusal {
            action: "rename",
            dest: "",
            file: "/var/log/audit/audit.log -> /tmp/a",
            reason: OFFLINE_DEFAULT,
            ..r
        };
        assert_eq!(
            r.line(),
            "refused rename of /var/log/audit/audit.log -> /tmp/a by sha256 9f86 for user bob (uid 1000, pid 42): appliance unreachable and not in the offline bundle: enforce mode refuses by default"
        );
    }
}
