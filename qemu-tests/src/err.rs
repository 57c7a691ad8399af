//! The harness's error type: every variant names the VM, the step and the
//! log to read.

use std::path::PathBuf;
use std::time::Duration;

use crate::Output;

/// Result with the harness's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, with enough context to start debugging from the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A build artifact's environment variable is unset or names no file.
    #[error("`{var}` {problem}: it must name the {what}; run `cargo xtask test`, which builds the artifacts and sets it")]
    MissingArtifact {
        /// The environment variable.
        var: &'static str,
        /// What the variable should point at.
        what: &'static str,
        /// "is not set" or "names a missing file `...`".
        problem: String,
    },
    /// An I/O operation of the host side failed.
    #[error("{step}: {source}")]
    Io {
        /// What the harness was doing.
        step: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A host command (ip, mke2fs, tcpdump, …) failed.
    #[error("{step}: `{command}` failed ({status}): {stderr}")]
    HostCommand {
        /// What the harness was doing.
        step: String,
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// The guest did not announce readiness in time.
    #[error(
        "vm `{vm}`: not ready after {waited:.0?} (no `TB-READY` on ttyS1); console log: {console}"
    )]
    BootTimeout {
        /// The VM's name.
        vm: String,
        /// How long the harness waited.
        waited: Duration,
        /// The console log (ttyS0).
        console: PathBuf,
    },
    /// QEMU exited while the harness still needed the VM.
    #[error("vm `{vm}`: QEMU exited ({status}) while {step}; console log: {console}; QEMU stderr: {stderr}")]
    QemuExited {
        /// The VM's name.
        vm: String,
        /// What the harness was doing.
        step: String,
        /// QEMU's exit status.
        status: String,
        /// QEMU's stderr, trimmed.
        stderr: String,
        /// The console log (ttyS0).
        console: PathBuf,
    },
    /// A guest command did not answer in time.
    #[error("vm `{vm}`: command `{command}` did not finish within {timeout:.0?}; console log: {console}")]
    CommandTimeout {
        /// The VM's name.
        vm: String,
        /// The shell command.
        command: String,
        /// The timeout (already scaled).
        timeout: Duration,
        /// The console log (ttyS0).
        console: PathBuf,
    },
    /// A guest command exited non-zero where success was required.
    #[error("vm `{vm}`: command `{command}` exited with status {}\n---- stdout ----\n{}\n---- stderr ----\n{}", output.status, output.stdout.trim_end(), output.stderr.trim_end())]
    CommandFailed {
        /// The VM's name.
        vm: String,
        /// The shell command.
        command: String,
        /// What it printed and returned.
        output: Output,
    },
    /// The command channel broke or carried something unparsable.
    #[error("vm `{vm}`: command channel: {detail}; console log: {console}")]
    Channel {
        /// The VM's name.
        vm: String,
        /// What was wrong.
        detail: String,
        /// The console log (ttyS0).
        console: PathBuf,
    },
    /// The guest kernel logged a bug or is tainted.
    #[error("vm `{vm}`: kernel health check failed:\n  {}\nconsole log: {console}", problems.join("\n  "))]
    Unhealthy {
        /// The VM's name.
        vm: String,
        /// One line per finding.
        problems: Vec<String>,
        /// The console log (ttyS0).
        console: PathBuf,
    },
    /// The console never showed the awaited text.
    #[error("vm `{vm}`: {text:?} not on the console after {waited:.0?}; console log: {console}; its last lines:\n{tail}")]
    ConsoleTimeout {
        /// The VM's name.
        vm: String,
        /// The text waited for.
        text: String,
        /// How long the harness waited (scaled).
        waited: Duration,
        /// The console's last lines.
        tail: String,
        /// The console log.
        console: PathBuf,
    },
    /// A caller asked for something the harness cannot do.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// Wraps an I/O error with the step that failed.
    pub(crate) fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let step = step.into();
        move |source| Error::Io { step, source }
    }
}
