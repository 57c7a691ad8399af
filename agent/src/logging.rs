//! The daemon's log: `tracing` events, to the systemd journal when systemd
//! started the agent (`JOURNAL_STREAM` set and the journal's socket there:
//! each event with its priority and fields), else to stderr as text lines
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
    let journald = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
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
