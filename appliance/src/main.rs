//! `trustbind-appliance`: the appliance daemon.
//!
//! ```text
//! trustbind-appliance [--data-dir DIR] serve [--agent-listen ADDR] [--enrol-listen ADDR]
//!                                            [--admin-listen ADDR] [--server-name NAME]...
//! trustbind-appliance [--data-dir DIR] ca-fingerprint      print the CA's SHA-256
//! trustbind-appliance [--data-dir DIR] admin-cert --name N --out DIR
//! trustbind-appliance [--data-dir DIR] admin-token [--name N] [--if-unenrolled] [--ttl-min N]
//!                                          print a one-time admin enrolment token
//! trustbind-appliance [--data-dir DIR] rotate-server-cert  new server cert (SIGHUP a running serve)
//! trustbind-appliance [--data-dir DIR] init                create or migrate the database
//! trustbind-appliance [--data-dir DIR] audit verify        check the audit hash chain
//! trustbind-appliance [--data-dir DIR] audit export        write the audit log as JSON lines
//! ```
//!
//! Every flag has an environment variable: `TRUSTBIND_DATA_DIR`,
//! `TRUSTBIND_AGENT_LISTEN`, `TRUSTBIND_ENROL_LISTEN`, `TRUSTBIND_ADMIN_LISTEN`,
//! `TRUSTBIND_SERVER_NAMES` (comma-separated). Flags win.
//!
//! Exit codes: 0 success, 1 failure, 2 the audit chain is broken, 64 usage.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use trustbind_appliance::admin;
use trustbind_appliance::agent_api::{self, AgentApi, Hub};
use trustbind_appliance::channels;
use trustbind_appliance::gate::Gate;
use trustbind_appliance::limits::Limits;
use trustbind_appliance::pki::{self, Pki};
use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::store::Store;

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

/// Options that take no value.
const SWITCHES: &[&str] = &["if-unenrolled"];
/// Default admin name of `admin-token`.
const DEFAULT_ADMIN_NAME: &str = "admin";
/// Default lifetime of an admin token, in minutes (24 h).
const DEFAULT_TOKEN_TTL_MIN: i64 = 24 * 60;

const USAGE: &str = "usage: trustbind-appliance [--data-dir DIR] COMMAND
commands:
  serve [--agent-listen ADDR] [--enrol-listen ADDR] [--admin-listen ADDR] [--server-name NAME]...
  ca-fingerprint
  admin-cert --name NAME --out DIR
  admin-token [--name NAME] [--if-unenrolled] [--ttl-min MINUTES]
  rotate-server-cert
  init
  audit verify
  audit export";

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

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("trustbind-appliance: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Command-line words with `--flag value` options pulled out.
struct Args {
    words: Vec<String>,
    opts: Vec<(String, String)>,
}

impl Args {
    fn parse(raw: Vec<String>) -> Result<Self, Fail> {
        let mut words = Vec::new();
        let mut opts = Vec::new();
        let mut it = raw.into_iter();
        while let Some(a) = it.next() {
            if a == "--help" || a == "-h" {
                words.push(a);
            } else if let Some(flag) = a.strip_prefix("--").filter(|f| SWITCHES.contains(f)) {
                opts.push((flag.to_owned(), "true".to_owned()));
            } else if let Some(flag) = a.strip_prefix("--") {
                let (name, value) = match flag.split_once('=') {
                    Some((n, v)) => (n.to_owned(), v.to_owned()),
                    None => {
                        let v = it
                            .next()
                            .ok_or_else(|| usage(format!("--{flag} needs a value")))?;
                        (flag.to_owned(), v)
                    }
                };
                opts.push((name, value));
            } else {
                words.push(a);
            }
        }
        Ok(Self { words, opts })
    }

    /// Last value of `--name`, else `$env`, else `default`.
    fn one(&self, name: &str, env: &str, default: Option<&str>) -> Option<String> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
            .or_else(|| default.map(str::to_owned))
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.opts
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn check_known(&self, known: &[&str]) -> Result<(), Fail> {
        match self.opts.iter().find(|(n, _)| !known.contains(&n.as_str())) {
            Some((n, _)) => Err(usage(format!("unknown option --{n}"))),
            None => Ok(()),
        }
    }
}

fn run() -> Result<(), Fail> {
    let args = Args::parse(std::env::args().skip(1).collect())?;
    let data_dir = PathBuf::from(
        args.one("data-dir", "TRUSTBIND_DATA_DIR", Some(DEFAULT_DATA_DIR))
            .unwrap_or_default(),
    );
    let words: Vec<&str> = args.words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["--help"] | ["-h"] | [] => {
            println!("{USAGE}");
            Ok(())
        }
        ["serve"] => {
            args.check_known(&[
                "data-dir",
                "agent-listen",
                "enrol-listen",
                "admin-listen",
                "server-name",
            ])?;
            serve(&args, &data_dir)
        }
        ["ca-fingerprint"] => {
            args.check_known(&["data-dir"])?;
            if !data_dir.join(pki::CA_CERT_FILE).exists() {
                return Err(Fail(
                    EXIT_FAILED,
                    format!(
                        "no CA in {} (it is created by the first `serve` or `admin-cert`)",
                        data_dir.display()
                    ),
                ));
            }
            let pki = Pki::open_or_create(&data_dir, &default_names(&[]))?;
            println!("{}", pki.fingerprint());
            Ok(())
        }
        ["rotate-server-cert"] => {
            args.check_known(&["data-dir", "server-name"])?;
            let pki = Pki::open_or_create(&data_dir, &server_names(&args, &[]))?;
            let serial = pki.rotate_server_cert()?;
            println!(
                "new server certificate {serial} in {}; send SIGHUP to a running `serve` to use it",
                data_dir.display()
            );
            Ok(())
        }
        ["admin-cert"] => {
            args.check_known(&["data-dir", "name", "out"])?;
            let name = args
                .one("name", "TRUSTBIND_ADMIN_NAME", None)
                .ok_or_else(|| usage("admin-cert needs --name NAME"))?;
            let out = PathBuf::from(
                args.one("out", "TRUSTBIND_ADMIN_OUT", None)
                    .ok_or_else(|| usage("admin-cert needs --out DIR"))?,
            );
            let pki = Pki::open_or_create(&data_dir, &default_names(&[]))?;
            let (cert, key) = pki.issue_admin(&name)?;
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
        ["admin-token"] => {
            args.check_known(&["data-dir", "name", "if-unenrolled", "ttl-min"])?;
            admin_token(&args, &data_dir)
        }
        ["init"] | ["audit", "verify"] | ["audit", "export"] => {
            args.check_known(&["data-dir"])?;
            offline(&words, &data_dir)
        }
        _ => Err(usage(format!("unknown command `{}`", words.join(" ")))),
    }
}

/// `admin-token`: records a new one-time admin enrolment token (superseding
/// earlier unused ones) and prints it alone on stdout; with
/// `--if-unenrolled`, prints nothing if an admin ever enrolled with one.
/// Creates the database and the CA if missing, so an image's first boot can
/// run it before `serve`; safe while `serve` runs (SQLite WAL).
fn admin_token(args: &Args, data_dir: &Path) -> Result<(), Fail> {
    use trustbind_appliance::agent_api::enrol::{admin_token_sha256, new_admin_token};
    let name = args
        .one("name", "TRUSTBIND_ADMIN_NAME", Some(DEFAULT_ADMIN_NAME))
        .unwrap_or_default();
    pki::check_name(&name).map_err(|e| usage(format!("--name: {e}")))?;
    let ttl = args
        .one("ttl-min", "TRUSTBIND_ADMIN_TOKEN_TTL_MIN", None)
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|m| (1..=366 * 24 * 60).contains(m))
                .ok_or_else(|| {
                    usage(format!(
                        "--ttl-min: `{v}` is not a number of minutes from 1 to 527040"
                    ))
                })
        })
        .transpose()?
        .unwrap_or(DEFAULT_TOKEN_TTL_MIN);
    let only_if_unenrolled = args.one("if-unenrolled", "", None).is_some();
    let store = open_store(data_dir)?;
    // The CA must exist before anyone can enrol with the token.
    Pki::open_or_create(data_dir, &default_names(&[]))?;
    let token = new_admin_token()?;
    let made = store.create_admin_token(
        &name,
        &admin_token_sha256(&token),
        ttl.saturating_mul(60_000),
        only_if_unenrolled,
        "appliance:admin-token",
    )?;
    if made.is_some() {
        println!("{token}");
    }
    Ok(())
}

fn open_store(data_dir: &Path) -> Result<Store, Fail> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Fail(EXIT_FAILED, format!("{}: {e}", data_dir.display())))?;
    Ok(Store::open(&data_dir.join(DB_FILE))?)
}

fn offline(words: &[&str], data_dir: &Path) -> Result<(), Fail> {
    let store = open_store(data_dir)?;
    match words {
        ["audit", "verify"] => match store.verify_audit()? {
            Ok(n) => {
                println!("audit chain ok: {n} rows");
                Ok(())
            }
            Err(broken) => Err(Fail(EXIT_CHAIN_BROKEN, broken.to_string())),
        },
        ["audit", "export"] => {
            store.export_audit(0, &mut std::io::stdout().lock())?;
            Ok(())
        }
        _ => {
            let v = store.schema_version()?;
            println!("database ready, schema version {v}");
            Ok(())
        }
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

fn server_names(args: &Args, listen: &[SocketAddr]) -> Vec<String> {
    let mut names = args.all("server-name");
    if names.is_empty() {
        if let Ok(v) = std::env::var("TRUSTBIND_SERVER_NAMES") {
            names = v
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
    }
    if names.is_empty() {
        default_names(listen)
    } else {
        names
    }
}

fn listen_addr(args: &Args, flag: &str, env: &str, default: &str) -> Result<SocketAddr, Fail> {
    let v = args.one(flag, env, Some(default)).unwrap_or_default();
    v.parse().map_err(|_| {
        usage(format!(
            "--{flag}: `{v}` is not an address like 0.0.0.0:7443"
        ))
    })
}

/// The Cedar schema every policy set is validated against.
const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");

fn serve(args: &Args, data_dir: &Path) -> Result<(), Fail> {
    let agent_addr = listen_addr(
        args,
        "agent-listen",
        "TRUSTBIND_AGENT_LISTEN",
        DEFAULT_AGENT_LISTEN,
    )?;
    let enrol_addr = listen_addr(
        args,
        "enrol-listen",
        "TRUSTBIND_ENROL_LISTEN",
        DEFAULT_ENROL_LISTEN,
    )?;
    let admin_addr = listen_addr(
        args,
        "admin-listen",
        "TRUSTBIND_ADMIN_LISTEN",
        DEFAULT_ADMIN_LISTEN,
    )?;
    let store = Arc::new(open_store(data_dir)?);
    let names = server_names(args, &[agent_addr, enrol_addr, admin_addr]);
    let pki = Arc::new(Pki::open_or_create(data_dir, &names)?);
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
        engine,
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
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let agent = tokio::spawn(agent_api::serve_agent(
            Arc::clone(&api),
            agent_l,
            stopped(stop_rx.clone()),
        ));
        let enrol = tokio::spawn(agent_api::serve_enrol(
            Arc::clone(&api),
            enrol_l,
            stopped(stop_rx.clone()),
        ));
        let admin_cfg = pki.admin_server_config()?;
        let expiry = tokio::spawn(Arc::clone(&gate).run_expiry());
        let router = admin::router(
            admin::AdminState::new(Arc::clone(&store))
                .with_hook(hook)
                .with_limits(limits)
                .with_ca_fingerprint(pki.fingerprint().into()),
        );
        let admin = tokio::spawn(admin::serve(admin_l, admin_cfg, router));
        wait_for_signals(&pki).await?;
        eprintln!("trustbind-appliance: shutting down");
        let _ = stop_tx.send(true);
        // Open calls get a bounded time to finish.
        let grace = std::time::Duration::from_secs(15);
        let agent = tokio::time::timeout(grace, agent).await;
        let enrol = tokio::time::timeout(grace, enrol).await;
        for (name, r) in [("agent", agent), ("enrol", enrol)] {
            let Ok(r) = r else {
                eprintln!(
                    "trustbind-appliance: {name} port: calls still open after {grace:?}, leaving"
                );
                continue;
            };
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("trustbind-appliance: {name} port: {e}"),
                Err(e) => eprintln!("trustbind-appliance: {name} port task: {e}"),
            }
        }
        admin.abort();
        expiry.abort();
        Ok::<(), Fail>(())
    })
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
async fn wait_for_signals(pki: &Pki) -> Result<(), Fail> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => match pki.reload_server_cert() {
                Ok(serial) => eprintln!("trustbind-appliance: server certificate {serial} loaded"),
                Err(e) => eprintln!("trustbind-appliance: server certificate not reloaded: {e}"),
            },
        }
    }
}
