//! The daemon's log: `tracing` events, to the systemd journal when stderr
//! is the journal stream systemd gave it (`JOURNAL_STREAM` names stderr's
//! device and inode, as `sd_journal_stream_fd` peers check; each event
//! with its priority and fields), else to stderr as text lines
//! (`agent/dist/trustbind-agent.init` appends them to a log file).
//!
//! `TRUSTBIND_LOG` filters (`tracing_subscriber::EnvFilter` syntax, e.g.
//! `debug` or `warn,trustbind_agent::run=debug`); the default is `info`.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The environment variable with the filter.
pub const FILTER_ENV: &str = "TRUSTBIND_LOG";

/// Installs the log for this process (once; later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = stderr_is_journal()
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|l| l.with_syslog_identifier("trustbind-agent".to_owned()));
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_target(false)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init();
}

/// Whether stderr is the stream `JOURNAL_STREAM` names.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| {
        names_stream(
            std::env::var("JOURNAL_STREAM").ok().as_deref(),
            m.dev(),
            m.ino(),
        )
    })
}

/// Whether `JOURNAL_STREAM` (`DEVICE:INODE`) names the file `dev`, `ino`.
fn names_stream(var: Option<&str>, dev: u64, ino: u64) -> bool {
    var.and_then(|v| v.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_only_for_the_stream_systemd_named() {
        assert!(names_stream(Some("8:12345"), 8, 12345));
        // A child whose stderr went elsewhere inherits the variable.
        assert!(!names_stream(Some("8:12345"), 8, 999));
        assert!(!names_stream(None, 8, 12345));
        assert!(!names_stream(Some("garbage"), 8, 12345));
        assert!(!names_stream(Some("8:"), 8, 0));
    }
}
