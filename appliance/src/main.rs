//! `trustbind-appliance`: the appliance daemon.
//!
//! ```text
//! trustbind-appliance [--data-dir DIR] serve [--agent-listen ADDR] [--enrol-listen ADDR]
//!                                            [--admin-listen ADDR] [--server-name NAME]...
//!                                            [--ca-signer SOCKET]
//! trustbind-appliance [--data-dir DIR] ca-signer (--stdin | --listen SOCKET --allow-uid UID)
//!                                          the CA signer (`serve` starts one itself)
//! trustbind-appliance [--data-dir DIR] ca-fingerprint      print the CA's SHA-256
//! trustbind-appliance [--data-dir DIR] authority           print the authority key (hex)
//! trustbind-appliance [--data-dir DIR] admin-cert --name N --out DIR [--role admin|read-only]
//! trustbind-appliance [--data-dir DIR] admin-token [--name N] [--role R] [--if-unenrolled] [--ttl-min N]
//!                                          print a one-time admin enrolment token
//! trustbind-appliance [--data-dir DIR] rotate-server-cert  new server cert (SIGHUP a running serve)
//! trustbind-appliance ntp --server HOST... [--interval S] [--once]   keep the clock (SNTP)
//! trustbind-appliance grow-data --disk DEV [--partition 3] [--name trustbind-data]
//!                                          grow the data partition to the disk's end
//! trustbind-appliance grow-data --fs DIR   grow the ext4 mounted at DIR to its partition
//! trustbind-appliance [--data-dir DIR] farm-secret export --out FILE
//! trustbind-appliance [--data-dir DIR] farm-secret import --from FILE [--replace]
//!                                          move channel keys v2's farm secret
//! trustbind-appliance [--data-dir DIR] init                create or migrate the database
//! trustbind-appliance [--data-dir DIR] audit verify        check the audit hash chain
//! trustbind-appliance [--data-dir DIR] audit export        write the audit log as JSON lines
//! ```
//!
//! Arguments are parsed by clap (`--help` on every command); `--data-dir`
//! may stand before or after the command. Every flag has an environment
//! variable: `TRUSTBIND_DATA_DIR`, `TRUSTBIND_AGENT_LISTEN`,
//! `TRUSTBIND_ENROL_LISTEN`, `TRUSTBIND_ADMIN_LISTEN`,
//! `TRUSTBIND_SERVER_NAMES` (comma-separated), `TRUSTBIND_TIME_ZONE`,
//! `TRUSTBIND_CA_SIGNER`,
//! `TRUSTBIND_ADMIN_NAME`,
//! `TRUSTBIND_ADMIN_OUT`, `TRUSTBIND_ADMIN_TOKEN_TTL_MIN`; an empty one
//! counts as unset. Flags win; a flag given twice, the last one.
//!
//! Exit codes: 0 success, 1 failure, 2 the audit chain is broken, 64 usage.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use clap::{Args, CommandFactory, Parser, Subcommand};

use trustbind_appliance::admin;
use trustbind_appliance::agent_api::{self, AgentApi, Hub};
use trustbind_appliance::alerts;
use trustbind_appliance::audit_seal;
use trustbind_appliance::channels;
use trustbind_appliance::gate::Gate;
use trustbind_appliance::limits::Limits;
use trustbind_appliance::pki::{self, Pki};
use trustbind_appliance::policy::audit_seal::{SealReport, VerifyKey};
use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::policy::SCHEMA;
use trustbind_appliance::retention;
use trustbind_appliance::store::{now_ms, AdminRole, Store};

/// Default data directory.
const DEFAULT_DATA_DIR: &str = "/var/lib/trustbind";
/// Database file name inside the data directory.
const DB_FILE: &str = "appliance.db";
/// Default agent port (mutual TLS).
const DEFAULT_AGENT_LISTEN: &str = "0.0.0.0:7443";
/// Default enrolment port (server TLS).
const DEFAULT_ENROL_LISTEN: &str = "0.0.0.0:7444";
/// Default admin port (mutual TLS, admin certificates).
const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:7445";

const EXIT_FAILED: u8 = 1;
const EXIT_CHAIN_BROKEN: u8 = 2;
const EXIT_USAGE: u8 = 64;

/// Default admin name of `admin-token`.
const DEFAULT_ADMIN_NAME: &str = "admin";
/// Default lifetime of an admin token, in minutes (24 h).
const DEFAULT_TOKEN_TTL_MIN: i64 = 24 * 60;
/// Longest lifetime of an admin token, in minutes (366 days).
const MAX_TOKEN_TTL_MIN: i64 = 366 * 24 * 60;

/// The appliance daemon: policy, signatures, channel keys and audit for
/// enrolled hosts.
#[derive(Debug, Parser)]
#[command(
    name = "trustbind-appliance",
    version,
    args_override_self = true,
    after_help = "Exit codes: 0 success, 1 failure, 2 the audit chain is broken, 64 usage."
)]
struct Cli {
    /// The appliance's state: database, CA, server certificate.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "TRUSTBIND_DATA_DIR",
        default_value = DEFAULT_DATA_DIR
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

// Parsed once at start: the size of `Serve` (its many flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serves the agent, enrol and admin ports until SIGTERM or SIGINT;
    /// SIGHUP reloads the server certificate.
    Serve {
        /// The agent port (mutual TLS, host certificates).
        #[arg(long, value_name = "ADDR", env = "TRUSTBIND_AGENT_LISTEN", default_value = DEFAULT_AGENT_LISTEN)]
        agent_listen: SocketAddr,
        /// The enrol port (TLS, one-time tokens).
        #[arg(long, value_name = "ADDR", env = "TRUSTBIND_ENROL_LISTEN", default_value = DEFAULT_ENROL_LISTEN)]
        enrol_listen: SocketAddr,
        /// The admin port (mutual TLS, admin certificates).
        #[arg(long, value_name = "ADDR", env = "TRUSTBIND_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
        admin_listen: SocketAddr,
        #[command(flatten)]
        names: ServerNames,
        /// The time zone of the `hour` and `weekday` policies read: `UTC`,
        /// `system` (this host's) or an IANA name such as `Europe/Berlin`.
        #[arg(
            long,
            value_name = "ZONE",
            env = "TRUSTBIND_TIME_ZONE",
            default_value = "UTC"
        )]
        time_zone: String,
        /// TLS handshakes in progress at once from one address (IPv4, or
        /// IPv6 /64) on each port.
        #[arg(long, value_name = "N", env = "TRUSTBIND_HANDSHAKES_PER_ADDRESS", default_value_t = 16,
              value_parser = clap::value_parser!(u32).range(1..=65_536))]
        handshakes_per_address: u32,
        /// New connections per second from one address (bursts of four
        /// times as many) on each port.
        #[arg(long, value_name = "N", env = "TRUSTBIND_CONNECTIONS_PER_ADDRESS", default_value_t = 16,
              value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        connections_per_address: u32,
        /// The CA signer's socket (`ca-signer --listen`, started apart, as
        /// the CA key's owner). Without it `serve` starts its own signer as
        /// a child (`ca-signer --stdin`). Either way `serve` never reads
        /// the CA key.
        #[arg(long, value_name = "SOCKET", env = "TRUSTBIND_CA_SIGNER")]
        ca_signer: Option<PathBuf>,
        #[command(flatten)]
        alerts: AlertArgs,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// The CA signer: the one process that reads the CA key (`ca.key`) and
    /// signs with it, for `serve` (threat model T-76). It checks every
    /// request itself, rate-limits, and logs each signature to stderr and
    /// `ca-signatures.jsonl`.
    #[command(group(clap::ArgGroup::new("how").required(true).args(["stdin", "listen"])))]
    CaSigner {
        /// Serve the UNIX socket on standard input, whose peer must be the
        /// parent process (how `serve` starts it).
        #[arg(long)]
        stdin: bool,
        /// Listen on this UNIX socket (made anew) for `serve --ca-signer`.
        #[arg(long, value_name = "SOCKET", requires = "allow_uid")]
        listen: Option<PathBuf>,
        /// The only uid whose connections are served (`SO_PEERCRED`).
        #[arg(long, value_name = "UID")]
        allow_uid: Option<u32>,
    },
    /// Prints the CA's SHA-256 fingerprint.
    CaFingerprint,
    /// Prints the authority key of sealed records (P-256 x || y, 128 hex
    /// digits: the kernel module's `authority=`).
    Authority,
    /// Issues an admin certificate and key into a directory.
    AdminCert {
        /// The administrator's name.
        #[arg(long, env = "TRUSTBIND_ADMIN_NAME")]
        name: String,
        /// Where admin.pem, admin.key (0600) and ca.pem are written.
        #[arg(long, value_name = "DIR", env = "TRUSTBIND_ADMIN_OUT")]
        out: PathBuf,
        /// What the certificate may do: `admin` (everything) or `read-only`.
        #[arg(long, default_value = "admin", value_parser = parse_role)]
        role: AdminRole,
    },
    /// Prints a one-time admin enrolment token (for `trustbind admin enrol`).
    AdminToken {
        /// The administrator's name the token enrols.
        #[arg(long, env = "TRUSTBIND_ADMIN_NAME", default_value = DEFAULT_ADMIN_NAME, allow_hyphen_values = true)]
        name: String,
        /// What the certificate may do: `admin` (everything) or `read-only`.
        #[arg(long, default_value = "admin", value_parser = parse_role)]
        role: AdminRole,
        /// Prints nothing (and succeeds) once any admin has enrolled with a token.
        #[arg(long)]
        if_unenrolled: bool,
        /// The token's lifetime in minutes.
        #[arg(
            long,
            value_name = "MINUTES",
            env = "TRUSTBIND_ADMIN_TOKEN_TTL_MIN",
            default_value_t = DEFAULT_TOKEN_TTL_MIN,
            value_parser = clap::value_parser!(i64).range(1..=MAX_TOKEN_TTL_MIN)
        )]
        ttl_min: i64,
    },
    /// Keeps the system clock by SNTP (the appliance image starts it when
    /// NTP servers are configured); steps the clock when it is off by more
    /// than 0.5 s. Needs the right to set the clock (root).
    Ntp {
        /// An NTP server, `host`, `IP` or `host:port` (port 123 by default);
        /// tried in order.
        #[arg(long = "server", value_name = "HOST", required = true)]
        servers: Vec<String>,
        /// Seconds between rounds.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(16..=86_400))]
        interval: u64,
        /// One round, then exit (status 1 if no server answered).
        #[arg(long)]
        once: bool,
    },
    /// Grows the data partition to fill a larger disk (the appliance image
    /// runs it at boot): with `--disk`, before mounting, its GPT entry (the
    /// last partition) and the kernel's view of it; with `--fs`, the ext4
    /// mounted there, online. Does nothing when there is nothing to grow;
    /// refuses, changing nothing, any disk not laid out as the image.
    GrowData {
        /// The whole disk holding the partition (a block device or a disk
        /// image file).
        #[arg(
            long,
            value_name = "DEV",
            required_unless_present = "fs",
            conflicts_with = "fs"
        )]
        disk: Option<PathBuf>,
        /// The partition's number in the GPT (it must be the last partition).
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=128))]
        partition: u32,
        /// The partition's GPT name (anything else is refused).
        #[arg(long, value_name = "NAME", default_value = trustbind_appliance::grow::DATA_PARTITION_NAME)]
        name: String,
        /// The mount point of the ext4 file system to grow to its partition.
        #[arg(long, value_name = "DIR")]
        fs: Option<PathBuf>,
    },
    /// Makes a new server certificate (send SIGHUP to a running `serve`).
    RotateServerCert {
        #[command(flatten)]
        names: ServerNames,
    },
    /// Creates or migrates the database.
    Init,
    /// The farm secret of channel keys v2 (`farm.key` in the data
    /// directory, 0600): every appliance of a farm holds the same one, so
    /// any of them can serve either end of a channel.
    FarmSecret {
        #[command(subcommand)]
        cmd: FarmCmd,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
}

#[derive(Debug, Subcommand)]
enum FarmCmd {
    /// Writes this appliance's farm secret (made now if there is none) to
    /// a new file (0600), for `farm-secret import` on another appliance.
    /// Move it only over a channel you trust, then delete it.
    Export {
        /// The file to create (it must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Makes the farm secret in FILE (another appliance's export) this
    /// appliance's; restart `serve` to use it.
    Import {
        /// The exported secret.
        #[arg(long = "from", value_name = "FILE")]
        from: PathBuf,
        /// Replace a different secret already here (tickets sealed under
        /// it stop opening).
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Checks the audit hash chain from the newest retention checkpoint
    /// to the head, and every checkpoint's signature (exit 2 if broken);
    /// with `--seal-key`, also the forward-secure seals of the rows kept.
    Verify {
        /// The seal verification key `audit seal-setup` handed out (kept
        /// offline): every seal is checked, and the rows after the last
        /// seal are reported as not sealed (exit 2 if a seal is bad).
        #[arg(long, value_name = "FILE")]
        seal_key: Option<PathBuf>,
    },
    /// Writes the audit log as JSON lines.
    Export,
    /// Checks retention export files (`<data>/export/audit-*.jsonl`, given
    /// in order): the rows chain and every checkpoint in them is signed by
    /// the appliance (certificate issued by `--ca`) and names its rows
    /// (exit 2 if not).
    VerifyExport {
        /// The CA certificate (PEM); default: the data directory's.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// The seal verification key: also checks the seals in the files.
        #[arg(long, value_name = "FILE")]
        seal_key: Option<PathBuf>,
        /// The export files, oldest first.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Sets up forward-secure sealing of the audit log (threat model
    /// T-83, `docs/RETENTION.md`): writes the verification key, once, to
    /// `--out` (or stdout) and keeps only the evolved key. Store the
    /// verification key offline, off the appliance: it is not kept here
    /// and cannot be shown again. `--out` must not be in the data
    /// directory (use a tmpfs such as /run).
    SealSetup {
        /// Where the verification key is written (created, mode 0600);
        /// `-`: stdout.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Seconds between seals (`serve` seals every interval, at start
        /// and at shutdown).
        #[arg(long, value_name = "SECS", default_value_t = audit_seal::DEFAULT_INTERVAL_SECS,
              value_parser = clap::value_parser!(u64).range(1..=86_400))]
        interval_secs: u64,
    },
    /// Seals the audit log now (as `serve` does every interval); works
    /// beside a running `serve`.
    Seal,
}

/// Retention of the audit log, channels and agent report ids, the export
/// files and the disk alarm (`docs/RETENTION.md`).
#[derive(Debug, Args)]
struct RetentionArgs {
    /// Audit rows older than this are exported and pruned (0: no age limit).
    #[arg(
        long,
        value_name = "DAYS",
        env = "TRUSTBIND_AUDIT_MAX_AGE_DAYS",
        default_value_t = 400
    )]
    audit_max_age_days: u32,
    /// Closed channels older than this are exported and pruned (0: no age limit).
    #[arg(
        long,
        value_name = "DAYS",
        env = "TRUSTBIND_CHANNEL_MAX_AGE_DAYS",
        default_value_t = 90
    )]
    channel_max_age_days: u32,
    /// Agent report ids (kept to store a re-sent record once) older than
    /// this are exported and pruned (0: no age limit).
    #[arg(
        long,
        value_name = "DAYS",
        env = "TRUSTBIND_REPORT_MAX_AGE_DAYS",
        default_value_t = 30
    )]
    report_max_age_days: u32,
    /// Most audit rows kept (0: no row limit; the store budget still holds).
    #[arg(
        long,
        value_name = "N",
        env = "TRUSTBIND_AUDIT_MAX_ROWS",
        default_value_t = 0
    )]
    audit_max_rows: u64,
    /// Most channels kept (closed ones are pruned; 0: no row limit).
    #[arg(
        long,
        value_name = "N",
        env = "TRUSTBIND_CHANNEL_MAX_ROWS",
        default_value_t = 0
    )]
    channel_max_rows: u64,
    /// Most agent report ids kept (0: no row limit).
    #[arg(
        long,
        value_name = "N",
        env = "TRUSTBIND_REPORT_MAX_ROWS",
        default_value_t = 0
    )]
    report_max_rows: u64,
    /// The audit and channel rows (their bytes estimated; signatures do not
    /// count) are kept under this share of the data partition: beyond, the
    /// oldest audit rows and closed channels are exported and pruned.
    #[arg(long, value_name = "PERCENT", env = "TRUSTBIND_STORE_MAX_PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(1..=90))]
    store_max_percent: u8,
    /// The export files (`<data>/export/`) are kept under this share of the
    /// data partition: beyond, the oldest file is removed.
    #[arg(long, value_name = "PERCENT", env = "TRUSTBIND_EXPORT_MAX_PERCENT", default_value_t = 30,
          value_parser = clap::value_parser!(u8).range(1..=90))]
    export_max_percent: u8,
    /// An export file is closed and the next begun at this size.
    #[arg(long, value_name = "MIB", env = "TRUSTBIND_EXPORT_FILE_MIB", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    export_file_mib: u64,
    /// The disk alarm (/metrics `trustbind_disk_alarm`, the console) rises
    /// when the data partition's free space falls under this share; retention
    /// then prunes early.
    #[arg(long, value_name = "PERCENT", env = "TRUSTBIND_DISK_ALARM_PERCENT", default_value_t = 10,
          value_parser = clap::value_parser!(u8).range(1..=50))]
    disk_alarm_percent: u8,
    /// Space held in `<data>/retention.reserve` and released when the disk
    /// is full, so that retention can still export and prune (0: none).
    #[arg(long, value_name = "MIB", env = "TRUSTBIND_DISK_RESERVE_MIB", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(0..=1024))]
    disk_reserve_mib: u64,
    /// Seconds between retention passes (every second while work remains).
    #[arg(long, value_name = "S", env = "TRUSTBIND_RETENTION_INTERVAL", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    retention_interval: u64,
    /// Forward each exported audit row to the `--alert-syslog` receiver too
    /// (RFC 5424 over TLS; best effort, counted in /metrics).
    #[arg(long, env = "TRUSTBIND_EXPORT_SYSLOG")]
    export_syslog: bool,
}

impl RetentionArgs {
    fn config(&self) -> retention::Config {
        let days = |d: u32| (d > 0).then(|| std::time::Duration::from_secs(u64::from(d) * 86_400));
        let rows = |n: u64| (n > 0).then_some(n);
        retention::Config {
            audit_max_age: days(self.audit_max_age_days),
            channel_max_age: days(self.channel_max_age_days),
            report_max_age: days(self.report_max_age_days),
            audit_max_rows: rows(self.audit_max_rows),
            channel_max_rows: rows(self.channel_max_rows),
            report_max_rows: rows(self.report_max_rows),
            store_max_percent: self.store_max_percent,
            export_max_percent: self.export_max_percent,
            export_file_bytes: self.export_file_mib << 20,
            alarm_percent: self.disk_alarm_percent,
            reserve_bytes: self.disk_reserve_mib << 20,
            interval: std::time::Duration::from_secs(self.retention_interval),
            ..retention::Config::default()
        }
    }
}

/// Where `@alert`s go (`appliance/README.md`, "Alerts").
#[derive(Debug, Args)]
struct AlertArgs {
    /// POST a JSON body for each alert to this https:// URL (retried with
    /// jittered exponential backoff).
    #[arg(long, value_name = "URL", env = "TRUSTBIND_ALERT_WEBHOOK")]
    alert_webhook: Option<String>,
    /// The CA certificates (PEM) the webhook server's certificate chains to.
    #[arg(long, value_name = "FILE", env = "TRUSTBIND_ALERT_WEBHOOK_CA")]
    alert_webhook_ca: Option<PathBuf>,
    /// Send each alert to this syslog receiver over TLS (RFC 5424 messages,
    /// RFC 5425 framing), HOST[:PORT], port 6514 by default.
    #[arg(long, value_name = "HOST[:PORT]", env = "TRUSTBIND_ALERT_SYSLOG")]
    alert_syslog: Option<String>,
    /// The CA certificates (PEM) the syslog receiver's certificate chains to.
    #[arg(long, value_name = "FILE", env = "TRUSTBIND_ALERT_SYSLOG_CA")]
    alert_syslog_ca: Option<PathBuf>,
    /// Alerts waiting per sink; beyond, new ones are dropped (counted in
    /// /metrics and logged).
    #[arg(
        long,
        value_name = "N",
        env = "TRUSTBIND_ALERT_QUEUE",
        default_value_t = alerts::DEFAULT_QUEUE,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    alert_queue: u32,
}

impl AlertArgs {
    /// The configured sinks (none: alerts are not delivered).
    fn sinks(&self) -> Result<Vec<alerts::Sink>, Fail> {
        let usage = |e: alerts::AlertConfigError| Fail(EXIT_USAGE, e.to_string());
        let mut sinks = Vec::new();
        if let Some(url) = &self.alert_webhook {
            sinks
                .push(alerts::Sink::webhook(url, self.alert_webhook_ca.as_deref()).map_err(usage)?);
        }
        if let Some(addr) = &self.alert_syslog {
            let host = hostname().unwrap_or_default();
            sinks.push(
                alerts::Sink::syslog(addr, self.alert_syslog_ca.as_deref(), &host)
                    .map_err(usage)?,
            );
        }
        for (ca, flag, needs) in [
            (
                &self.alert_webhook_ca,
                "--alert-webhook-ca",
                self.alert_webhook.is_none(),
            ),
            (
                &self.alert_syslog_ca,
                "--alert-syslog-ca",
                self.alert_syslog.is_none(),
            ),
        ] {
            if ca.is_some() && needs {
                return Err(Fail(
                    EXIT_USAGE,
                    format!("{flag} is given without the sink it is for"),
                ));
            }
        }
        Ok(sinks)
    }
}

/// The names on the server certificate.
#[derive(Debug, Args)]
struct ServerNames {
    /// A name on the server certificate (repeatable; default: the host
    /// name, localhost, 127.0.0.1 and the listen addresses).
    #[arg(
        long = "server-name",
        value_name = "NAME",
        env = "TRUSTBIND_SERVER_NAMES",
        value_delimiter = ','
    )]
    server_names: Vec<String>,
}

/// A failure with its exit code.
struct Fail(u8, String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(EXIT_FAILED, e.to_string())
    }
}

fn usage(msg: impl Into<String>) -> Fail {
    Fail(EXIT_USAGE, format!("{} (try --help)", msg.into()))
}

/// The environment variables of the flags: an empty one counts as unset.
const FLAG_ENV: &[&str] = &[
    "TRUSTBIND_DATA_DIR",
    "TRUSTBIND_AGENT_LISTEN",
    "TRUSTBIND_ENROL_LISTEN",
    "TRUSTBIND_ADMIN_LISTEN",
    "TRUSTBIND_SERVER_NAMES",
    "TRUSTBIND_TIME_ZONE",
    "TRUSTBIND_ADMIN_NAME",
    "TRUSTBIND_ADMIN_OUT",
    "TRUSTBIND_ADMIN_TOKEN_TTL_MIN",
    "TRUSTBIND_AUDIT_MAX_AGE_DAYS",
    "TRUSTBIND_CHANNEL_MAX_AGE_DAYS",
    "TRUSTBIND_REPORT_MAX_AGE_DAYS",
    "TRUSTBIND_AUDIT_MAX_ROWS",
    "TRUSTBIND_CHANNEL_MAX_ROWS",
    "TRUSTBIND_REPORT_MAX_ROWS",
    "TRUSTBIND_STORE_MAX_PERCENT",
    "TRUSTBIND_EXPORT_MAX_PERCENT",
    "TRUSTBIND_EXPORT_FILE_MIB",
    "TRUSTBIND_DISK_ALARM_PERCENT",
    "TRUSTBIND_DISK_RESERVE_MIB",
    "TRUSTBIND_RETENTION_INTERVAL",
    "TRUSTBIND_EXPORT_SYSLOG",
    "TRUSTBIND_CA_SIGNER",
];

fn main() -> ExitCode {
    for v in FLAG_ENV {
        if std::env::var_os(v).is_some_and(|s| s.is_empty()) {
            // Single-threaded still: nothing else reads the environment.
            std::env::remove_var(v);
        }
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version go to stdout and succeed; usage errors
            // exit 64 (2 means a broken audit chain).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("trustbind-appliance: {msg}");
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Fail> {
    let data_dir = cli.data_dir;
    let Some(cmd) = cli.cmd else {
        // No command: the help, as `--help` (exit 0).
        let _ = Cli::command().print_help();
        return Ok(());
    };
    match cmd {
        Cmd::Serve {
            agent_listen,
            enrol_listen,
            admin_listen,
            names,
            time_zone,
            handshakes_per_address,
            connections_per_address,
            ca_signer,
            alerts,
            retention,
        } => {
            let tz = trustbind_appliance::clock::zone_named(&time_zone)
                .map_err(|e| usage(format!("--time-zone: {e}")))?;
            trustbind_appliance::clock::set_zone(tz);
            // Checked before anything starts.
            let sinks = alerts.sinks()?;
            if retention.export_syslog && alerts.alert_syslog.is_none() {
                return Err(usage("--export-syslog needs --alert-syslog"));
            }
            let per_sec = f64::from(connections_per_address);
            let limits = Arc::new(agent_api::tls::PortLimits::new(
                agent_api::tls::MAX_CONNECTIONS,
                agent_api::tls::MAX_HANDSHAKES,
                handshakes_per_address as usize,
                trustbind_appliance::ratelimit::Rate {
                    burst: 4.0 * per_sec,
                    per_sec,
                },
            ));
            serve(
                &data_dir,
                [agent_listen, enrol_listen, admin_listen],
                (names, ca_signer),
                limits,
                (sinks, alerts.alert_queue as usize),
                (retention.config(), retention.export_syslog),
            )
        }
        Cmd::CaSigner {
            stdin,
            listen,
            allow_uid,
        } => {
            init_log();
            match (stdin, listen, allow_uid) {
                (true, _, _) => trustbind_appliance::casign::serve_stdin(&data_dir)?,
                (false, Some(socket), Some(uid)) => {
                    trustbind_appliance::casign::serve_listener(&data_dir, &socket, uid)?;
                }
                _ => return Err(usage("give --stdin, or --listen with --allow-uid")),
            }
            Ok(())
        }
        // Neither reads the CA key (T-76): the certificate, the authority
        // key.
        Cmd::CaFingerprint => {
            existing_pki_dir(&data_dir)?;
            println!("{}", pki::ca_fingerprint(&data_dir)?);
            Ok(())
        }
        Cmd::Authority => {
            existing_pki_dir(&data_dir)?;
            let a = trustbind_appliance::seal::Authority::open_or_create(&data_dir)?;
            println!("{}", a.public_hex());
            Ok(())
        }
        Cmd::FarmSecret { cmd } => farm_secret(&data_dir, cmd),
        Cmd::RotateServerCert { names } => {
            let pki = Pki::open_or_create(&data_dir, &names.or_default(&[]))?;
            let serial = pki.rotate_server_cert()?;
            println!(
                "new server certificate {serial} in {}; send SIGHUP to a running `serve` to use it",
                data_dir.display()
            );
            Ok(())
        }
        Cmd::AdminCert { name, out, role } => {
            let store = open_store(&data_dir)?;
            let pki = Pki::open_or_create(&data_dir, &default_names(&[]))?;
            let (cert, key) = pki.issue_admin(&name)?;
            admin::register_admin_cert(&store, &cert, role, "appliance:admin-cert")?;
            std::fs::create_dir_all(&out)
                .map_err(|e| Fail(EXIT_FAILED, format!("{}: {e}", out.display())))?;
            pki::write_atomic(&out.join("admin.key"), key.as_bytes(), true)?;
            pki::write_atomic(&out.join("admin.pem"), cert.as_bytes(), false)?;
            pki::write_atomic(&out.join("ca.pem"), pki.ca_pem().as_bytes(), false)?;
            println!(
                "admin certificate for `{name}` written to {} (admin.pem, admin.key, ca.pem)",
                out.display()
            );
            Ok(())
        }
        Cmd::AdminToken {
            name,
            role,
            if_unenrolled,
            ttl_min,
        } => admin_token(&data_dir, &name, role, if_unenrolled, ttl_min),
        Cmd::Ntp {
            servers,
            interval,
            once,
        } => {
            init_log();
            if once {
                return trustbind_appliance::ntp::sync_once(&servers)
                    .map(|off| println!("offset {off} ms"))
                    .map_err(|errs| {
                        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
                        Fail(
                            EXIT_FAILED,
                            format!("no NTP server answered: {}", text.join("; ")),
                        )
                    });
            }
            trustbind_appliance::ntp::run(&servers, std::time::Duration::from_secs(interval))
        }
        Cmd::GrowData {
            disk,
            partition,
            name,
            fs,
        } => {
            init_log();
            use trustbind_appliance::grow;
            if let Some(dir) = fs {
                let g = grow::grow_ext4(&dir)?;
                tracing::info!("grow-data: {}: {g}", dir.display());
            } else if let Some(disk) = disk {
                let g = grow::grow_partition(&disk, partition, &name)?;
                tracing::info!("grow-data: {} {name}: {g}", disk.display());
            }
            Ok(())
        }
        Cmd::Init => offline(&data_dir, None),
        Cmd::Audit { cmd } => offline(&data_dir, Some(cmd)),
    }
}

/// `admin-token`: records a new one-time admin enrolment token (superseding
/// earlier unused ones) and prints it alone on stdout; with
/// `--if-unenrolled`, prints nothing if an admin ever enrolled with one.
/// Creates the database and the CA if missing, so an image's first boot can
/// run it before `serve`; safe while `serve` runs (SQLite WAL).
fn admin_token(
    data_dir: &Path,
    name: &str,
    role: AdminRole,
    only_if_unenrolled: bool,
    ttl_min: i64,
) -> Result<(), Fail> {
    use trustbind_appliance::agent_api::enrol::{admin_token_sha256, new_admin_token};
    pki::check_name(name).map_err(|e| usage(format!("--name: {e}")))?;
    let store = open_store(data_dir)?;
    // The CA must exist before anyone can enrol with the token.
    Pki::open_or_create(data_dir, &default_names(&[]))?;
    let token = new_admin_token()?;
    let made = store.create_admin_token_as(
        name,
        role,
        &admin_token_sha256(&token),
        ttl_min.saturating_mul(60_000),
        only_if_unenrolled,
        "appliance:admin-token",
    )?;
    if made.is_some() {
        println!("{token}");
    }
    Ok(())
}

/// `--role`: `admin` or `read-only`.
fn parse_role(s: &str) -> Result<AdminRole, String> {
    AdminRole::parse(s).ok_or_else(|| format!("`{s}` is no role: use admin or read-only"))
}

fn open_store(data_dir: &Path) -> Result<Store, Fail> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Fail(EXIT_FAILED, format!("{}: {e}", data_dir.display())))?;
    Ok(Store::open(&data_dir.join(DB_FILE))?)
}

/// `init` (`audit` `None`) and the audit commands, on the database alone.
fn offline(data_dir: &Path, audit: Option<AuditCmd>) -> Result<(), Fail> {
    if let Some(AuditCmd::VerifyExport {
        ca,
        seal_key,
        files,
    }) = audit
    {
        return verify_export(data_dir, ca.as_deref(), seal_key.as_deref(), &files);
    }
    let store = open_store(data_dir)?;
    match audit {
        Some(AuditCmd::SealSetup { out, interval_secs }) => {
            seal_setup(&store, data_dir, &out, interval_secs)
        }
        Some(AuditCmd::Seal) => {
            let s = audit_seal::seal(&store, data_dir, now_ms(), "admin")
                .map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
            println!(
                "sealed: epoch {}, rows up to seq {}",
                s.seal.epoch, s.seal.seq
            );
            Ok(())
        }
        Some(AuditCmd::Verify { seal_key }) => match store.verify_audit_from_checkpoint()? {
            Ok(r) => {
                if let Some(cp) = &r.checkpoint {
                    let ca = read_ca(&data_dir.join(pki::CA_CERT_FILE))?;
                    retention::verify_checkpoints(&r.all, &ca)
                        .map_err(|e| Fail(EXIT_CHAIN_BROKEN, e))?;
                    println!(
                        "pruned: rows 1..={} ({} rows, {} checkpoints; the newest, {}, signed by the appliance, rows {}..={} in export/{})",
                        cp.upto_seq, cp.total_rows, r.checkpoints, cp.id, cp.from_seq, cp.upto_seq, cp.export_file
                    );
                }
                println!("audit chain ok: {} rows", r.rows);
                match seal_key {
                    Some(k) => verify_seals(&store, &k),
                    None => Ok(()),
                }
            }
            Err(broken) => Err(Fail(EXIT_CHAIN_BROKEN, broken.to_string())),
        },
        Some(AuditCmd::Export) => {
            store.export_audit(0, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Some(AuditCmd::VerifyExport { .. }) => Ok(()),
        None => {
            let v = store.schema_version()?;
            println!("database ready, schema version {v}");
            Ok(())
        }
    }
}

/// Reads a CA certificate (PEM).
fn read_ca(path: &Path) -> Result<rustls::pki_types::CertificateDer<'static>, Fail> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path).map_err(|e| {
        Fail(
            EXIT_FAILED,
            format!("{}: not a PEM certificate ({e})", path.display()),
        )
    })
}

/// Reads a seal verification key file.
fn read_seal_key(path: &Path) -> Result<VerifyKey, Fail> {
    VerifyKey::read(path).map_err(|e| Fail(EXIT_FAILED, e))
}

/// Prints a seal report (and a stale last seal); the first bad seal fails.
fn print_seals(r: Result<SealReport, String>, vk: &VerifyKey, live: bool) -> Result<(), Fail> {
    let rep = r.map_err(|e| Fail(EXIT_CHAIN_BROKEN, format!("audit seals BROKEN: {e}")))?;
    println!("{}", rep.summary());
    if live {
        if let Some(age) = rep.stale(now_ms(), vk.interval_ms) {
            return Err(Fail(
                EXIT_CHAIN_BROKEN,
                format!(
                    "the last seal is {} s old, and seals are made every {} s: the log was cut after row {}, or sealing stopped",
                    age / 1000,
                    vk.interval_ms / 1000,
                    rep.sealed_upto_seq
                ),
            ));
        }
    }
    Ok(())
}

/// `audit verify --seal-key`.
fn verify_seals(store: &Store, key: &Path) -> Result<(), Fail> {
    let vk = read_seal_key(key)?;
    print_seals(audit_seal::verify_store(store, &vk)?, &vk, true)
}

/// `audit seal-setup`.
fn seal_setup(store: &Store, data_dir: &Path, out: &Path, interval_secs: u64) -> Result<(), Fail> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let interval_ms = i64::try_from(interval_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    // The output is opened first: a setup whose key cannot be written
    // would leave a log sealed with a key nobody has.
    // Deleting a file leaves its blocks on the data partition: k0 must not
    // be written there.
    if out != Path::new("-") {
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let (Ok(d), Ok(data)) = (dir.canonicalize(), data_dir.canonicalize()) {
            if d.starts_with(&data) {
                return Err(Fail(
                    EXIT_FAILED,
                    format!(
                        "{}: the verification key must not be written in the data directory (its blocks would stay on the disk): use a tmpfs such as /run, or `-`",
                        out.display()
                    ),
                ));
            }
        }
    }
    let mut file: Box<dyn std::io::Write> = if out == Path::new("-") {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .map_err(|e| Fail(EXIT_FAILED, format!("{}: {e}", out.display())))?,
        )
    };
    let vk = audit_seal::setup(store, data_dir, now_ms(), interval_ms)
        .map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
    let text = zeroize::Zeroizing::new(
        serde_json::to_string_pretty(&vk).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?,
    );
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.flush())
        .map_err(|e| Fail(EXIT_FAILED, format!("{}: {e}", out.display())))?;
    eprintln!(
        "audit sealing set up (key id {}, a seal every {interval_secs} s). Store the verification key OFFLINE, off the appliance: it is not kept here and cannot be shown again.",
        vk.key_id
    );
    Ok(())
}

/// `audit verify-export`.
fn verify_export(
    data_dir: &Path,
    ca: Option<&Path>,
    seal_key: Option<&Path>,
    files: &[PathBuf],
) -> Result<(), Fail> {
    let ca_path = ca.map_or_else(|| data_dir.join(pki::CA_CERT_FILE), Path::to_owned);
    let ca = read_ca(&ca_path)?;
    let lines = retention::read_export_files(files)
        .map_err(|(f, e)| Fail(EXIT_FAILED, format!("{}: {e}", f.display())))?;
    match retention::verify_export(lines.clone(), Some(&ca)) {
        Ok(r) => {
            println!(
                "export ok: rows {}..={} ({} rows), {} signed checkpoints, the last up to row {}",
                r.first_seq, r.last_seq, r.rows, r.checkpoints, r.checkpointed_upto
            );
        }
        Err(e) => return Err(Fail(EXIT_CHAIN_BROKEN, e)),
    }
    match seal_key {
        Some(k) => {
            let vk = read_seal_key(k)?;
            print_seals(
                trustbind_appliance::policy::audit_seal::verify_export_seals(lines, &vk),
                &vk,
                false,
            )
        }
        None => Ok(()),
    }
}

/// This machine's host name, if known.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Fails unless `data_dir` holds a CA certificate (made by the first
/// `serve` or `admin-cert`), for the commands that only read it.
fn existing_pki_dir(data_dir: &std::path::Path) -> Result<(), Fail> {
    if !data_dir.join(pki::CA_CERT_FILE).exists() {
        return Err(Fail(
            EXIT_FAILED,
            format!(
                "no CA in {} (it is created by the first `serve` or `admin-cert`)",
                data_dir.display()
            ),
        ));
    }
    Ok(())
}

/// Host name, `localhost`, and the given listen IPs (unspecified ones skipped).
fn default_names(listen: &[SocketAddr]) -> Vec<String> {
    let mut names: Vec<String> = hostname().into_iter().collect();
    names.push("localhost".into());
    names.push("127.0.0.1".into());
    for a in listen {
        if !a.ip().is_unspecified() {
            names.push(a.ip().to_string());
        }
    }
    names.dedup();
    names
}

impl ServerNames {
    /// The names given, else the defaults for these listen addresses.
    fn or_default(self, listen: &[SocketAddr]) -> Vec<String> {
        let names: Vec<String> = self
            .server_names
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if names.is_empty() {
            default_names(listen)
        } else {
            names
        }
    }
}

/// The daemon's log: `tracing` events as text lines on stderr (the image's
/// `tb-supervise` copies them to the console and a bounded log on /data;
/// systemd's journal takes stderr as it is), filtered by `TRUSTBIND_LOG`
/// (`EnvFilter` syntax, default `info`).
fn init_log() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRUSTBIND_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// `farm-secret export | import`. The secret itself is never printed.
fn farm_secret(data_dir: &Path, cmd: FarmCmd) -> Result<(), Fail> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use trustbind_appliance::tickets::Farm;
    let failed = |e: trustbind_appliance::tickets::FarmFileError| Fail(EXIT_FAILED, e.to_string());
    match cmd {
        FarmCmd::Export { out } => {
            let farm = Farm::open_or_create(data_dir).map_err(failed)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .map_err(|e| Fail(EXIT_FAILED, format!("{}: {e}", out.display())))?;
            f.write_all(farm.export().as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| Fail(EXIT_FAILED, format!("{}: {e}", out.display())))?;
            eprintln!(
                "farm secret written to {}: import it on the farm's other appliances, then delete it",
                out.display()
            );
        }
        FarmCmd::Import { from, replace } => {
            let changed = Farm::import(data_dir, &from, replace).map_err(failed)?;
            eprintln!(
                "{}",
                if changed {
                    "farm secret imported; restart `serve` to use it"
                } else {
                    "this appliance already holds that farm secret"
                }
            );
        }
    }
    Ok(())
}

fn serve(
    data_dir: &Path,
    listen: [SocketAddr; 3],
    (names, ca_signer): (ServerNames, Option<PathBuf>),
    ports: Arc<agent_api::tls::PortLimits>,
    (sinks, queue): (Vec<alerts::Sink>, usize),
    (keep, export_syslog): (retention::Config, bool),
) -> Result<(), Fail> {
    init_log();
    // One connection per agent: the usual soft limit of 1,024 would cap the
    // fleet near 1,000 hosts.
    match trustbind_appliance::sys::raise_open_file_limit() {
        Ok((before, after)) => tracing::info!("open-file limit {before} -> {after}"),
        Err(e) => tracing::warn!("open-file limit not raised: {e}"),
    }
    let [agent_addr, enrol_addr, admin_addr] = listen;
    // Opening the database needs space (the WAL and its index): on a full
    // partition the reserve goes first.
    retention::release_reserve_at_start(data_dir, keep.reserve_bytes.max(1 << 20));
    let store = Arc::new(open_store(data_dir)?);
    let names = names.or_default(&listen);
    // The CA key stays with the signer (T-76): this process never reads it.
    let (signer_exit, signer) = match &ca_signer {
        Some(socket) => {
            let client = trustbind_appliance::casign::Client::connect(socket)?;
            tracing::info!("CA signer: {}", socket.display());
            (None::<tokio::sync::oneshot::Receiver<String>>, client)
        }
        None => {
            let exe = std::env::current_exe()?;
            let (child, client) = trustbind_appliance::casign::spawn_child(&exe, data_dir)?;
            tracing::info!("CA signer: child process {}", child.id());
            (Some(watch_signer(child)), client)
        }
    };
    let pki = Arc::new(Pki::open_with_signer(data_dir, &names, signer)?);
    let engine = Arc::new(Engine::new(Arc::clone(&store), SCHEMA)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The API starts its audit writer task: build it inside the runtime.
    let _in_runtime = rt.enter();
    let hub = Arc::new(Hub::new());
    // The hook needs the API, the API needs the gate, the gate the limits,
    // the limits the hook: the API is filled in once built.
    let api_slot: Arc<OnceLock<Arc<AgentApi>>> = Arc::new(OnceLock::new());
    let slot = Arc::clone(&api_slot);
    let hook: admin::ChangeHook = Arc::new(move |c: &admin::Change| {
        if let (admin::Change::HostRevoked { host }, Some(api)) = (c, slot.get()) {
            api.disconnect_host(host);
        }
        // Generation changes reach agents through the agent port's
        // generation watch; the engine refreshes on its next decision.
    });
    let limits = Arc::new(Limits::new(Arc::clone(&store))?.with_hook(Arc::clone(&hook)));
    let gate = Arc::new(Gate::new(
        Arc::clone(&engine),
        Arc::clone(&store),
        Arc::clone(&hub),
        Some(Arc::clone(&limits)),
        channels::DEFAULT_PAIR_TIMEOUT,
        channels::DEFAULT_MAX_PENDING,
    ));
    let api = AgentApi::with_hub(
        Arc::clone(&store),
        Arc::clone(&pki),
        hub,
        Arc::clone(&gate) as Arc<dyn agent_api::Decider>,
    )?;
    let _ = api_slot.set(Arc::clone(&api));
    // Channel keys v2: the farm secret of this data directory (made on
    // first start; shared by a farm through `farm-secret export | import`).
    let farm = trustbind_appliance::tickets::Farm::open_or_create(data_dir)
        .map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
    api.set_grants(Arc::new(trustbind_appliance::grants::Grants::new(
        farm,
        Arc::clone(&engine),
        Arc::clone(&store),
        Arc::clone(&api.hub),
        Some(Arc::clone(&limits)),
    )));
    for s in &sinks {
        tracing::info!("alerts go to {s}");
    }
    let forward: Option<retention::Forward> = sinks
        .iter()
        .filter(|_| export_syslog)
        .find_map(|s| alerts::AuditForward::start(s, 65_536, alerts::Retry::default()))
        .map(|f| Arc::new(move |r: &trustbind_appliance::store::AuditRow| f.send(r)) as _);
    let keeper = retention::Retention::new(
        Arc::clone(&store),
        keep,
        data_dir,
        retention::server_key_signer(Arc::clone(&pki)),
        forward,
    )?;
    tracing::info!("retention: {:?}", keeper.config());
    let retention_task = retention::spawn(keeper);
    let sealer = audit_seal::spawn(Arc::clone(&store), data_dir.to_owned());
    api.set_alerts(alerts::Alerts::start(
        sinks,
        queue,
        alerts::Retry::default(),
    ));
    rt.block_on(async move {
        let agent_l = bind(agent_addr, "agent").await?;
        let enrol_l = bind(enrol_addr, "enrol").await?;
        let admin_l = bind(admin_addr, "admin").await?;
        println!(
            "agent port  (mutual TLS, host certificates): {}",
            agent_l.local_addr()?
        );
        println!(
            "enrol port  (TLS, one-time tokens):          {}",
            enrol_l.local_addr()?
        );
        println!(
            "admin port  (mutual TLS, admin certificates): {}",
            admin_l.local_addr()?
        );
        println!("CA fingerprint (SHA-256): {}", pki.fingerprint());
        println!(
            "authority key (sealed records): {}",
            pki.authority().public_hex()
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // The agent and enrol ports each admit within these limits (their
        // own counts, the same figures); the admin port has smaller totals
        // and the same per-address figures.
        let enrol_limits = Arc::new(ports.same_figures());
        let admin_limits = Arc::new(agent_api::tls::PortLimits::admin_with(
            ports.per_address(),
            ports.new_connections(),
        ));
        let agent = tokio::spawn(agent_api::serve_agent_limited(
            Arc::clone(&api),
            agent_l,
            stopped(stop_rx.clone()),
            ports,
        ));
        let enrol = tokio::spawn(agent_api::serve_enrol_limited(
            Arc::clone(&api),
            enrol_l,
            stopped(stop_rx.clone()),
            enrol_limits,
        ));
        let admin_cfg = pki.admin_server_config(admin::AdminCerts::new(Arc::clone(&store)))?;
        let expiry = tokio::spawn(Arc::clone(&gate).run_expiry());
        let router = admin::router(
            admin::AdminState::new(Arc::clone(&store))
                .with_hook(hook)
                .with_limits(limits)
                .with_engine(engine)
                .with_ca_fingerprint(pki.fingerprint().into())
                .with_pki(Arc::clone(&pki))
                .with_seal_dir(data_dir.to_owned()),
        );
        let admin = tokio::spawn(admin::serve_limited(
            admin_l,
            admin_cfg,
            router,
            admin_limits,
        ));
        wait_for_signals(&pki, signer_exit).await?;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        // Open calls get a bounded time to finish.
        let grace = std::time::Duration::from_secs(15);
        let agent = tokio::time::timeout(grace, agent).await;
        let enrol = tokio::time::timeout(grace, enrol).await;
        for (name, r) in [("agent", agent), ("enrol", enrol)] {
            let Ok(r) = r else {
                tracing::warn!("{name} port: calls still open after {grace:?}, leaving");
                continue;
            };
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("{name} port: {e}"),
                Err(e) => tracing::error!("{name} port task: {e}"),
            }
        }
        admin.abort();
        expiry.abort();
        retention_task.abort();
        if let Some(sealer) = sealer {
            sealer.abort();
            // The rows of the last moments sealed too (T-83).
            audit_seal::seal_logged(store, data_dir.to_owned(), "shutdown").await;
        }
        Ok::<(), Fail>(())
    })
}

/// Waits for the CA signer child in a thread of its own; the receiver gets
/// how it ended. (It ends by itself when `serve` exits: its socket closes.)
fn watch_signer(mut child: std::process::Child) -> tokio::sync::oneshot::Receiver<String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let how = child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        let _ = tx.send(how);
    });
    rx
}

async fn bind(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener, Fail> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Fail(
            EXIT_FAILED,
            format!("cannot listen on {addr} ({what} port): {e}"),
        )
    })
}

/// Returns on SIGTERM or SIGINT; reloads the server certificate on SIGHUP.
/// Fails when the CA signer child ends (`signer_exit`): without it nothing
/// can be signed, and the supervisor restarts both.
async fn wait_for_signals(
    pki: &Pki,
    signer_exit: Option<tokio::sync::oneshot::Receiver<String>>,
) -> Result<(), Fail> {
    let signer_gone = async move {
        match signer_exit {
            Some(rx) => rx.await.unwrap_or_else(|_| "unknown".into()),
            None => std::future::pending().await,
        }
    };
    tokio::pin!(signer_gone);
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            how = &mut signer_gone => {
                return Err(Fail(EXIT_FAILED, format!("the CA signer exited ({how}): stopping")));
            }
            _ = hup.recv() => match pki.reload_server_cert() {
                Ok(serial) => tracing::info!("server certificate {serial} loaded"),
                Err(e) => tracing::error!("server certificate not reloaded: {e}"),
            },
        }
    }
}
