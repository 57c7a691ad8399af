//! `trustbind-agent`: the host daemon beside `trustbind.ko`.
//!
//! ```text
//! TRUSTBIND_TOKEN=TOKEN trustbind-agent enrol --appliance HOST[:7444] --name NAME --ca-fingerprint HEX
//!     (or --token-file FILE|-; --token TOKEN works but local users can read it)
//! trustbind-agent run [--mode enforce|permissive] [--no-net] ...
//! trustbind-agent status [--json]
//! ```
//!
//! Exit codes: 0 success; 1 failure (one sentence on stderr); 2 `status`
//! found no running agent; 64 usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use trustbind_agent::link::{self, Enrolment};
use trustbind_agent::run::{self, RunOptions, Status};

#[derive(Parser)]
#[command(name = "trustbind-agent", version, about = "Trustbind host agent")]
struct Cli {
    /// State directory: credentials, spool, offline bundle, status.
    #[arg(
        long,
        env = "TRUSTBIND_AGENT_STATE",
        default_value = "/var/lib/trustbind-agent",
        global = true
    )]
    state: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enrol this host with the appliance (once).
    ///
    /// Example: TRUSTBIND_TOKEN=3f9c... trustbind-agent enrol --appliance 10.99.0.10
    ///   --name web1 --ca-fingerprint 8a1d...
    #[command(alias = "enroll")]
    Enrol {
        /// Appliance enrol address, HOST[:PORT] (port 7444).
        #[arg(long, env = "TRUSTBIND_APPLIANCE")]
        appliance: String,
        /// Appliance agent address if not the same host (port 7443).
        #[arg(long)]
        agent_address: Option<String>,
        /// Name on the appliance's server certificate (default: the host part).
        #[arg(long)]
        server_name: Option<String>,
        /// This host's name as registered on the appliance.
        #[arg(long)]
        name: String,
        /// The one-time enrolment token. On the command line it is readable
        /// by every local user (/proc/PID/cmdline) while enrolment runs:
        /// prefer the TRUSTBIND_TOKEN environment variable (readable by
        /// root and this user only) or --token-file.
        #[arg(
            long,
            env = "TRUSTBIND_TOKEN",
            hide_env_values = true,
            required_unless_present = "token_file",
            conflicts_with = "token_file"
        )]
        token: Option<String>,
        /// A file holding the one-time enrolment token (`-`: standard input).
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// The CA fingerprint shown on the appliance console.
        #[arg(long)]
        ca_fingerprint: String,
    },
    /// Run the daemon.
    Run {
        /// The module's device.
        #[arg(long, default_value = "/dev/trustbind")]
        device: PathBuf,
        /// No longer used: user names come from NSS (getpwuid). Accepted
        /// so that existing command lines keep working.
        #[arg(long, hide = true)]
        passwd: Option<PathBuf>,
        /// Mode until the appliance sends the host's mode (and none was saved).
        #[arg(long, default_value = "permissive", value_parser = ["enforce", "permissive", "disabled"])]
        mode: String,
        /// How long the kernel waits for a verdict, in ms.
        #[arg(long, default_value_t = 3000)]
        verdict_timeout_ms: u32,
        /// Deadline of one appliance call, in ms.
        #[arg(long, default_value_t = 1500)]
        call_timeout_ms: u64,
        /// Do not have the module ask about TCP connects and accepts (no
        /// connection qualification, no encrypted channels). By default the
        /// agent answers them: each is its own appliance call, and a channel's
        /// key is handed to the module.
        #[arg(long)]
        no_net: bool,
        /// Channel keys v2 (docs/CHANNEL-KEYS-V2.md): the module registers
        /// this host's channel services when they listen, keys repeat
        /// connects of a program pair from a cached grant with no appliance
        /// round trip, and opens its clients' tickets itself. Off by
        /// default until every host of a fleet runs it (a v1 peer still
        /// works: unregistered services keep v1's channels).
        #[arg(long)]
        channels_v2: bool,
        /// Renew the host certificate over the agent connection when fewer
        /// than this many days of validity remain.
        #[arg(long, value_name = "DAYS", default_value_t = trustbind_agent::link::RENEW_BEFORE_DAYS)]
        renew_days: u32,
        /// dpkg's file lists: the Debian package owning each program run is
        /// sent with it (learning mode groups by it); re-read when dpkg
        /// changes them. Absent on a host without dpkg: nothing is sent.
        #[arg(long, value_name = "DIR", default_value = trustbind_agent::packages::DPKG_INFO)]
        dpkg_info: PathBuf,
    },
    /// Print this host's package inventory: every program its Debian
    /// packages installed, with package and version, one JSON object a
    /// line (for `trustbind sig add --inventory`).
    ///
    /// Example (on a reference host with the CLI configured):
    ///   trustbind-agent inventory | trustbind sig add --inventory - --group debian-web
    Inventory {
        /// dpkg's file lists.
        #[arg(long, value_name = "DIR", default_value = trustbind_agent::packages::DPKG_INFO)]
        dpkg_info: PathBuf,
        /// dpkg's status database (installed versions).
        #[arg(long, value_name = "FILE", default_value = trustbind_agent::packages::DPKG_STATUS)]
        dpkg_status: PathBuf,
    },
    /// Show the running agent's status.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trustbind-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.cmd {
        Cmd::Enrol {
            appliance,
            agent_address,
            server_name,
            name,
            token,
            token_file,
            ca_fingerprint,
        } => {
            let token = match read_token(token, token_file.as_deref()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("trustbind-agent: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let e = Enrolment {
                enrol_addr: appliance,
                agent_addr: agent_address,
                server_name,
                name,
                token,
                ca_fingerprint,
            };
            match rt.block_on(link::enrol(&e, &cli.state)) {
                Ok(cfg) => {
                    println!(
                        "enrolled as `{}`; credentials in {}; agent port {}",
                        cfg.name,
                        cli.state.display(),
                        cfg.agent_addr
                    );
                    let authority = cli.state.join(link::AUTHORITY_FILE);
                    if authority.exists() {
                        println!(
                            "load the module with the appliance's authority key, so it believes \
                             only what the appliance sealed:\n  modprobe trustbind authority=$(cat {})",
                            authority.display()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("trustbind-agent: enrolment failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run {
            device,
            passwd,
            mode,
            verdict_timeout_ms,
            call_timeout_ms,
            no_net,
            channels_v2,
            renew_days,
            dpkg_info,
        } => {
            trustbind_agent::logging::init();
            if let Some(p) = passwd {
                tracing::warn!(
                    "--passwd {} is ignored: user names come from NSS (getpwuid)",
                    p.display()
                );
            }
            let opts = RunOptions {
                state: cli.state,
                device,
                mode: run::parse_mode(&mode).unwrap_or(trustbind_proto::Mode::Permissive),
                verdict_timeout_ms,
                batch_max: 64,
                batch_wait: Duration::from_millis(2),
                call_timeout: Duration::from_millis(call_timeout_ms),
                qualify_net: !no_net,
                channels_v2,
                renew_days,
                dpkg_info,
            };
            match rt.block_on(run::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Status { json } => status(&cli.state, json),
        Cmd::Inventory {
            dpkg_info,
            dpkg_status,
        } => inventory(&dpkg_info, &dpkg_status),
    }
}

/// `trustbind-agent inventory`: the programs on standard output, a count
/// on standard error. A host without dpkg's database is an error (an empty
/// inventory would seed nothing without saying why).
fn inventory(info: &std::path::Path, status: &std::path::Path) -> ExitCode {
    use std::io::Write as _;
    let index = trustbind_agent::packages::Packages::load(info);
    if index.lists() == 0 {
        eprintln!(
            "trustbind-agent: no dpkg file lists in {} (not a Debian host, or --dpkg-info is wrong)",
            info.display()
        );
        return ExitCode::FAILURE;
    }
    let versions = match std::fs::read_to_string(status) {
        Ok(text) => trustbind_agent::packages::installed_versions(&text),
        Err(e) => {
            eprintln!(
                "trustbind-agent: cannot read {}: {e}; versions left empty",
                status.display()
            );
            Default::default()
        }
    };
    let programs = trustbind_agent::packages::inventory(&index, &versions);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for p in &programs {
        let line = match serde_json::to_string(p) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("trustbind-agent: {}: {e}", p.path);
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = writeln!(out, "{line}") {
            eprintln!("trustbind-agent: writing the inventory: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Err(e) = out.flush() {
        eprintln!("trustbind-agent: writing the inventory: {e}");
        return ExitCode::FAILURE;
    }
    let packages: std::collections::HashSet<&str> =
        programs.iter().map(|p| p.package.as_str()).collect();
    eprintln!(
        "trustbind-agent: {} program(s) from {} package(s) ({} file lists read)",
        programs.len(),
        packages.len(),
        index.lists()
    );
    ExitCode::SUCCESS
}

/// The enrolment token from `--token`/`TRUSTBIND_TOKEN` or from
/// `--token-file` (`-`: standard input), trimmed; warns when it was given
/// on the command line, where local users can read it.
fn read_token(token: Option<String>, file: Option<&std::path::Path>) -> Result<String, String> {
    let on_cmdline = std::env::args().any(|a| a == "--token" || a.starts_with("--token="));
    let t = match (token, file) {
        (Some(t), _) => {
            if on_cmdline {
                eprintln!(
                    "trustbind-agent: warning: the token on the command line is readable by local users \
                     while this runs; use TRUSTBIND_TOKEN or --token-file"
                );
            }
            t
        }
        (None, Some(p)) if p.as_os_str() == "-" => {
            use std::io::Read as _;
            let mut t = String::new();
            std::io::stdin()
                .take(4096)
                .read_to_string(&mut t)
                .map_err(|e| format!("standard input: {e}"))?;
            t
        }
        (None, Some(p)) => {
            std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?
        }
        (None, None) => {
            return Err("no enrolment token: give TRUSTBIND_TOKEN or --token-file".into())
        }
    };
    let t = t.trim().to_owned();
    if t.is_empty() {
        return Err("the enrolment token is empty".into());
    }
    Ok(t)
}

fn status(state: &std::path::Path, json: bool) -> ExitCode {
    let p = state.join("status.json");
    let Ok(text) = std::fs::read(&p) else {
        eprintln!(
            "trustbind-agent: no status at {} (is the agent running?)",
            p.display()
        );
        return ExitCode::from(2);
    };
    let Ok(s) = serde_json::from_slice::<Status>(&text) else {
        eprintln!("trustbind-agent: {} is not a status file", p.display());
        return ExitCode::FAILURE;
    };
    let alive = std::path::Path::new(&format!("/proc/{}", s.pid)).exists();
    if json {
        println!("{}", String::from_utf8_lossy(&text));
    } else {
        println!("host:        {}", s.host);
        println!(
            "appliance:   {} ({})",
            s.appliance,
            if s.connected {
                "connected"
            } else {
                "NOT connected"
            }
        );
        println!(
            "mode:        {} ({})",
            s.mode,
            if s.sealed {
                "sealed: only the appliance can change it"
            } else {
                "NOT sealed: the module was loaded without the appliance's authority key"
            }
        );
        println!("generation:  {}", s.generation);
        println!(
            "requests:    {} exec, {} connect/accept, {} file (appliance {}, offline {}, denied {}, late {})",
            s.requests,
            s.net_requests,
            s.file_requests,
            s.answered_online,
            s.answered_offline,
            s.denied,
            s.late
        );
        println!("channels:    {} keys handed to the module", s.channel_keys);
        println!(
            "files:       {} protected identities; {} requests, {} denied",
            s.protected_files, s.file_requests, s.file_denied
        );
        println!(
            "spool:       {} waiting, {} delivered",
            s.spool_backlog, s.spool_delivered
        );
        println!(
            "bundle:      {} pairs remembered, {} signed verdicts{}",
            s.bundle_entries,
            s.signed_entries,
            if s.signed_expires_ms > 0 {
                format!(" (valid until {} ms since the epoch)", s.signed_expires_ms)
            } else {
                String::new()
            }
        );
        if !s.last_error.is_empty() {
            println!("last error:  {}", s.last_error);
        }
        if !alive {
            println!("agent:       NOT running (pid {} is gone)", s.pid);
        }
    }
    if alive {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}
