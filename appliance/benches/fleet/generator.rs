//! The fleet load generator (issue 16): a real `trustbind-appliance serve`
//! on loopback (127.0.0.1 or ::1 only) in a temporary data directory, an
//! administrator certificate made by `trustbind-appliance admin-cert`, and
//! N simulated agents, each enrolled through the real enrol port with its
//! own one-time host token (tokens from `POST /v1/hosts` on the admin API,
//! enrolments through `trustbind_agent::link`, both run concurrently with
//! progress), each holding its own mutual-TLS connection and `Subscribe`
//! stream, as `trustbind-agent` does.
//!
//! The run: every agent picks operations from a weighted mix — exec
//! `Qualify` batches (a share of them with never-seen program hashes,
//! "cold"; the rest from the agent's own working set of (program, user)
//! pairs, which the appliance's decision cache can answer), plain TCP
//! connects, channel pairs (a connect before and after the handshake from
//! one agent and the matching accept from another; the keys are pushed to
//! both on their streams), `Report` batches, `SignBundle` over the working
//! set, and reconnects (a new TLS connection and stream). Paced to a fleet
//! rate of decisions per second, or unpaced (closed loop).
//!
//! It prints connected agents, decisions/s, latency per operation (p50,
//! p99, max, HDR histograms), the appliance's RSS and open descriptors
//! (`/proc/PID/status`, `/proc/PID/fd`), audit bytes per decision (growth
//! of the data directory, and of the audit head), and the appliance's CPU
//! seconds (utime + stime of `/proc/PID/stat`) per 1,000 decisions.
//! Everything is bounded: the setup phases by `--setup-timeout`, the run by
//! `--seconds`, every call by [`CALL_TIMEOUT`]. Failures of the appliance
//! (refused connections, errors, an exit) are findings in the report, not
//! a crash of the generator.
//!
//! With `--kill-at T [--kills K]` the appliance is killed (SIGKILL) T
//! seconds into the run, and every T seconds after, and started again on
//! the same data directory and ports (fixed, below the ephemeral range);
//! the agents find their push streams gone and reconnect with their own
//! certificates, with backoff. After the run (and with `--check-audit`
//! alone) the appliance is stopped and its audit log checked against what
//! the agents sent and were answered ([`audit_check`]); the report gives,
//! per kill, the time until the restarted appliance listened and until the
//! agents were answered again.
//!
//! The appliance keeps the open-file limit the generator was started with;
//! the generator raises its own soft limit (it holds one connection per
//! agent) up to the hard limit.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{
    AtomicI64, AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fastrand::Rng;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use trustbind_agent::link::{self, Enrolment};
use trustbind_api::pb::{self, agent_client::AgentClient};

#[path = "audit_check.rs"]
pub mod audit_check;
use audit_check::{request_id, AuditCheck, Kind, Ledger};

/// Longest any one gRPC or admin call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Name the appliance's server certificate is checked against.
const SERVER_NAME: &str = "localhost";
/// Host group and program group of the fleet.
const GROUP: &str = "fleet";
/// Known (registered, allowed) programs.
const KNOWN_PROGRAMS: usize = 1000;
/// Users the simulated processes run as.
const USERS: usize = 20;
/// Records per `Report`.
const REPORT_RECORDS: usize = 4;
/// Service ports of the policy: plain connects, encrypted channels.
const PLAIN_PORT: u32 = 443;
const CHANNEL_PORT: u32 = 5432;

/// The policy the fleet runs under: known programs may run, connect to
/// 443 in the clear, and open encrypted channels on 5432.
const POLICY: &str = r#"
@id("fleet-exec-known")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"fleet");

@id("fleet-plain-connect")
permit (principal, action == Trustbind::Action::"connect", resource)
when { resource.port == 443 && context.program in Trustbind::ProgramGroup::"fleet" };

@id("fleet-channel-connect")
@encrypt("required")
permit (principal, action == Trustbind::Action::"connect", resource)
when { resource.port == 5432 && context.program in Trustbind::ProgramGroup::"fleet" };

@id("fleet-channel-accept")
@encrypt("required")
permit (principal, action == Trustbind::Action::"accept", resource)
when { resource.port == 5432 && context.program in Trustbind::ProgramGroup::"fleet" };
"#;

pub const USAGE: &str = "\
fleet load generator: a real `trustbind-appliance serve` on loopback and N
enrolled agents speaking the agent protocol over mutual TLS.

options:
  --agents N          simulated agents, each with its own certificate (100)
  --seconds S         length of the measured run (10)
  --rate R            fleet decisions per second to offer; 0 = unpaced,
                      every agent sends its next call when the last is
                      answered (0)
  --batch B           exec requests per Qualify call, 1..=256 (1)
  --cold PCT          share of exec requests with a never-seen program hash (10)
  --mix SPEC          operation weights (exec=85,connect=8,pair=3,report=2,sign=1,reconnect=1)
  --working-set W     (program, user) pairs per agent for cached execs (16)
  --listen IP         127.0.0.1 or ::1 (127.0.0.1); never another address
  --concurrency C     parallel enrolments and connects during setup (64)
  --setup-timeout S   bound on each setup phase (900)
  --interval S        seconds between progress lines (5)
  --appliance-nofile N
                      set the appliance's open-file limit (soft and hard) to
                      N; default: the limit the generator was started with
  --kill-at T         SIGKILL the appliance T seconds into the run (and
                      every T seconds after, --kills times), restarting it
                      each time on the same data directory and ports; the
                      agents reconnect with their certificates. Implies
                      --check-audit; the report gives the time from each
                      kill to the agents being answered again
  --kills K           how many kills (1)
  --check-audit       after the run, stop the appliance and check its audit
                      log: the chain verifies (`trustbind-appliance audit
                      verify`) and every decision and report record an agent
                      got an answer for has its row; exits 1 if not
";

/// Operation weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix(pub [u32; OPS]);

/// What an agent does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A Qualify batch of exec requests.
    Exec,
    /// A plain TCP connect (one Qualify, no channel).
    Connect,
    /// A channel pair: connect before and after the handshake, the peer's accept.
    Pair,
    /// A Report batch.
    Report,
    /// A SignBundle over the working set.
    Sign,
    /// A new TLS connection and Subscribe stream.
    Reconnect,
}

const OPS: usize = 6;
const ALL_OPS: [Op; OPS] = [
    Op::Exec,
    Op::Connect,
    Op::Pair,
    Op::Report,
    Op::Sign,
    Op::Reconnect,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Exec => "exec",
            Op::Connect => "connect",
            Op::Pair => "pair",
            Op::Report => "report",
            Op::Sign => "sign",
            Op::Reconnect => "reconnect",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl Mix {
    fn parse(spec: &str) -> Result<Self, String> {
        let mut w = [0_u32; OPS];
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("--mix: `{part}` is not NAME=WEIGHT"))?;
            let op = ALL_OPS
                .iter()
                .find(|o| o.name() == k)
                .ok_or_else(|| format!("--mix: unknown operation `{k}`"))?;
            w[op.index()] = v
                .parse()
                .map_err(|_| format!("--mix: weight `{v}` of {k} is not a whole number"))?;
        }
        if w.iter().all(|x| *x == 0) {
            return Err("--mix: every weight is 0".into());
        }
        Ok(Mix(w))
    }

    fn pick(&self, rng: &mut Rng) -> Op {
        let total: u64 = self.0.iter().map(|w| u64::from(*w)).sum();
        let mut x = rng.u64(..total);
        for op in ALL_OPS {
            let w = u64::from(self.0[op.index()]);
            if x < w {
                return op;
            }
            x -= w;
        }
        Op::Exec
    }

    /// Mean decisions per operation (for pacing).
    fn decisions_per_op(&self, batch: usize) -> f64 {
        let total: f64 = self.0.iter().map(|w| f64::from(*w)).sum();
        let per = |op: Op| match op {
            Op::Exec => batch as f64,
            Op::Connect => 1.0,
            Op::Pair => 3.0,
            _ => 0.0,
        };
        ALL_OPS
            .iter()
            .map(|o| f64::from(self.0[o.index()]) * per(*o))
            .sum::<f64>()
            / total
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = ALL_OPS
            .iter()
            .map(|o| format!("{}={}", o.name(), self.0[o.index()]))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// The generator's settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub agents: usize,
    pub seconds: u64,
    pub rate: u64,
    pub batch: usize,
    pub cold_pct: u64,
    pub mix: Mix,
    pub working_set: usize,
    pub listen: IpAddr,
    pub concurrency: usize,
    pub setup_timeout: Duration,
    pub interval: Duration,
    pub appliance_nofile: Option<u64>,
    /// Kill the appliance this far into the run, and every as much again.
    pub kill_at: Option<Duration>,
    pub kills: u32,
    /// Check the audit log against the acknowledgements after the run.
    pub check_audit: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            agents: 100,
            seconds: 10,
            rate: 0,
            batch: 1,
            cold_pct: 10,
            mix: Mix([85, 8, 3, 2, 1, 1]),
            working_set: 16,
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            concurrency: 64,
            setup_timeout: Duration::from_secs(900),
            interval: Duration::from_secs(5),
            appliance_nofile: None,
            kill_at: None,
            kills: 1,
            check_audit: false,
        }
    }
}

fn number<T: std::str::FromStr>(flag: &str, v: &str, ok: impl Fn(&T) -> bool) -> Result<T, String> {
    v.parse::<T>()
        .ok()
        .filter(|n| ok(n))
        .ok_or_else(|| format!("--{flag}: `{v}` is out of range"))
}

impl Options {
    /// Parses the command line; `None` for `--help`.
    pub fn parse(args: &[String]) -> Result<Option<Self>, String> {
        let mut o = Options::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--help" || a == "-h" {
                return Ok(None);
            }
            let flag = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument `{a}`"))?;
            if flag == "check-audit" {
                o.check_audit = true;
                continue;
            }
            let v = it.next().ok_or_else(|| format!("--{flag} needs a value"))?;
            match flag {
                "agents" => o.agents = number(flag, v, |n| (1..=1_000_000).contains(n))?,
                "seconds" => o.seconds = number(flag, v, |n| (1..=86_400).contains(n))?,
                "rate" => o.rate = number(flag, v, |n| *n <= 100_000_000)?,
                "batch" => o.batch = number(flag, v, |n| (1..=256).contains(n))?,
                "cold" => o.cold_pct = number(flag, v, |n| *n <= 100)?,
                "mix" => o.mix = Mix::parse(v)?,
                "working-set" => {
                    o.working_set = number(flag, v, |n| (1..=4096).contains(n))?;
                }
                "listen" => {
                    let ip: IpAddr = v
                        .parse()
                        .map_err(|_| format!("--listen: `{v}` is not an IP address"))?;
                    if ip != IpAddr::V4(Ipv4Addr::LOCALHOST)
                        && ip != IpAddr::V6(Ipv6Addr::LOCALHOST)
                    {
                        return Err(format!(
                            "--listen: {ip} is not loopback; the generator runs the appliance on 127.0.0.1 or ::1 only"
                        ));
                    }
                    o.listen = ip;
                }
                "concurrency" => o.concurrency = number(flag, v, |n| (1..=4096).contains(n))?,
                "setup-timeout" => {
                    o.setup_timeout = Duration::from_secs(number(flag, v, |n| *n >= 1)?);
                }
                "interval" => o.interval = Duration::from_secs(number(flag, v, |n| *n >= 1)?),
                "appliance-nofile" => {
                    o.appliance_nofile = Some(number(flag, v, |n| (64..=1 << 20).contains(n))?);
                }
                "kill-at" => {
                    let t: f64 = number(flag, v, |t: &f64| *t >= 0.1 && *t <= 86_400.0)?;
                    o.kill_at = Some(Duration::from_secs_f64(t));
                }
                "kills" => o.kills = number(flag, v, |n| (1..=1000).contains(n))?,
                _ => return Err(format!("unknown option --{flag}")),
            }
        }
        if let Some(t) = o.kill_at {
            if t * o.kills >= Duration::from_secs(o.seconds) {
                return Err(format!(
                    "--kill-at {} with --kills {}: the last kill must come before the run's end ({} s)",
                    t.as_secs_f64(),
                    o.kills,
                    o.seconds
                ));
            }
            o.check_audit = true;
        }
        Ok(Some(o))
    }
}

// ---------------------------------------------------------------------------
// The appliance process

/// `/proc` figures of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Peak resident set, KiB.
    pub hwm_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// utime + stime, seconds.
    pub cpu_s: f64,
}

/// Reads `/proc/PID/{status,stat,fd}`.
pub fn proc_stats(pid: u32) -> Result<ProcStats, String> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).map_err(|e| format!("{}: {e}", dir.join(f).display()))
    };
    let status = read("status")?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = read("stat")?;
    // Fields after the command name (which may hold spaces and parentheses).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("/proc/{pid}/stat: no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at 3.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let fds = std::fs::read_dir(dir.join("fd"))
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))?
        .count() as u64;
    Ok(ProcStats {
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        fds,
        cpu_s: (ticks(11) + ticks(12)) as f64 / hz,
    })
}

/// The soft open-file limit of `pid` (`/proc/PID/limits`).
fn nofile_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into())
}

/// Bytes of the regular files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A running `trustbind-appliance serve`, killed on drop.
struct Appliance {
    child: Child,
    pid: u32,
    root: tempfile::TempDir,
    agent: SocketAddr,
    enrol: SocketAddr,
    admin: SocketAddr,
    bin: PathBuf,
    nofile: Option<u64>,
}

/// Environment variables of `trustbind-appliance` the generator sets by flags.
const APPLIANCE_ENV: [&str; 5] = [
    "TRUSTBIND_DATA_DIR",
    "TRUSTBIND_AGENT_LISTEN",
    "TRUSTBIND_ENROL_LISTEN",
    "TRUSTBIND_ADMIN_LISTEN",
    "TRUSTBIND_SERVER_NAMES",
];

/// `trustbind-appliance --data-dir DATA`, with none of its settings from
/// the environment.
fn appliance_command(bin: &Path, data: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for v in APPLIANCE_ENV {
        cmd.env_remove(v);
    }
    cmd.arg("--data-dir").arg(data);
    cmd
}

/// Three free ports on `ip` below the kernel's ephemeral range, so that
/// while a killed appliance is down no agent's reconnect can take one as
/// its source port (as it could take a port of the ephemeral range).
fn fixed_ports(ip: IpAddr) -> Result<[SocketAddr; 3], String> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low <= 11_000 {
        return Err(format!(
            "the ephemeral port range starts at {low}: no room below it for the appliance's ports"
        ));
    }
    let mut rng = Rng::new();
    let mut found = Vec::new();
    for _ in 0..1000 {
        let addr = SocketAddr::new(ip, rng.u16(10_000..low));
        if found.contains(&addr) {
            continue;
        }
        if std::net::TcpListener::bind(addr).is_ok() {
            found.push(addr);
            if let Ok(ports) = <[SocketAddr; 3]>::try_from(found.as_slice()) {
                return Ok(ports);
            }
        }
    }
    Err(format!("no three free ports on {ip} below {low}"))
}

impl Appliance {
    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.root.path().join("appliance.log")
    }

    fn admin_dir(&self) -> PathBuf {
        self.root.path().join("admin")
    }

    /// The last lines of the appliance's stderr.
    fn log_tail(&self) -> String {
        tail(&self.log())
    }

    /// `Some(status)` once the process has exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Makes the data directory and the admin certificate, then starts
    /// `serve` on `ip`: on ephemeral ports, or with `fixed` on ports it
    /// keeps across restarts ([`fixed_ports`]).
    fn start(bin: &Path, ip: IpAddr, nofile: Option<u64>, fixed: bool) -> Result<Self, String> {
        let root = tempfile::Builder::new()
            .prefix("trustbind-fleet-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let data = root.path().join("data");
        let admin = root.path().join("admin");
        let out = appliance_command(bin, &data)
            .args(["admin-cert", "--name", "fleet", "--out"])
            .arg(&admin)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "`trustbind-appliance admin-cert` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let listen = if fixed {
            fixed_ports(ip)?
        } else {
            [SocketAddr::new(ip, 0); 3]
        };
        let (child, [agent, enrol, admin]) = launch(bin, root.path(), listen, nofile)?;
        Ok(Appliance {
            pid: child.id(),
            child,
            root,
            agent,
            enrol,
            admin,
            bin: bin.to_owned(),
            nofile,
        })
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts `serve` again on the same data directory and ports (a few
    /// tries: a port may still be held for a moment).
    fn restart(&mut self) -> Result<(), String> {
        let listen = [self.agent, self.enrol, self.admin];
        let mut last = String::new();
        for _ in 0..10 {
            match launch(&self.bin, self.root.path(), listen, self.nofile) {
                Ok((child, _)) => {
                    self.pid = child.id();
                    self.child = child;
                    return Ok(());
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!("the appliance did not restart: {last}"))
    }
}

/// The last lines of the file at `path`.
fn tail(path: &Path) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Starts `serve` with the data directory under `root` on `listen` and
/// reads the ports it serves on off its stdout; its stderr is appended to
/// `root/appliance.log`.
fn launch(
    bin: &Path,
    root: &Path,
    listen: [SocketAddr; 3],
    nofile: Option<u64>,
) -> Result<(Child, [SocketAddr; 3]), String> {
    let log_path = root.join("appliance.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cmd = appliance_command(bin, &root.join("data"));
    cmd.arg("serve");
    for (flag, addr) in ["--agent-listen", "--enrol-listen", "--admin-listen"]
        .into_iter()
        .zip(listen)
    {
        cmd.args([flag, &addr.to_string()]);
    }
    // The whole simulated fleet shares one loopback address: lift the
    // per-address admission limits a real fleet spreads over its hosts.
    cmd.args(["--handshakes-per-address", "256"]);
    cmd.args(["--connections-per-address", "100000"]);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let pid = child.id();
    let fail = |child: &mut Child, why: String| {
        let _ = child.kill();
        let _ = child.wait();
        format!("{why}; its log:\n{}", tail(&log_path))
    };
    if let Some(n) = nofile {
        let limit = rustix::process::Rlimit {
            current: Some(n),
            maximum: Some(n),
        };
        let set = rustix::process::Pid::from_raw(pid as i32)
            .ok_or_else(|| "the appliance has no pid".to_owned())
            .and_then(|p| {
                rustix::process::prlimit(Some(p), rustix::process::Resource::Nofile, limit)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = set {
            return Err(fail(
                &mut child,
                format!("cannot set the appliance's open-file limit to {n}: {e}"),
            ));
        }
    }
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        // Forward lines, then keep draining so serve never blocks on stdout.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut ports = listen;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while seen < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(l) => l,
            Err(_) => {
                if let Ok(Some(s)) = child.try_wait() {
                    return Err(fail(
                        &mut child,
                        format!("the appliance exited before serving ({s})"),
                    ));
                }
                if left.is_zero() {
                    return Err(fail(
                        &mut child,
                        "the appliance printed no ports within 60 s".into(),
                    ));
                }
                continue;
            }
        };
        let Some((what, addr)) = line.rsplit_once(": ") else {
            continue;
        };
        let Ok(addr) = addr.trim().parse::<SocketAddr>() else {
            continue;
        };
        if !addr.ip().is_loopback() {
            return Err(fail(
                &mut child,
                format!("the appliance listens on {addr}, not loopback; stopped"),
            ));
        }
        let slot = if what.starts_with("agent port") {
            &mut ports[0]
        } else if what.starts_with("enrol port") {
            &mut ports[1]
        } else if what.starts_with("admin port") {
            &mut ports[2]
        } else {
            continue;
        };
        *slot = addr;
        seen += 1;
    }
    Ok((child, ports))
}

impl Appliance {
    /// SIGTERM, a bounded wait, then SIGKILL.
    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The admin API

/// The admin API over HTTPS with the admin certificate.
struct Admin {
    http: reqwest::Client,
    base: String,
}

impl Admin {
    fn new(a: &Appliance) -> Result<Self, String> {
        let dir = a.admin_dir();
        let read = |f: &str| {
            std::fs::read(dir.join(f)).map_err(|e| format!("{}: {e}", dir.join(f).display()))
        };
        let (ca, cert, key) = (read("ca.pem")?, read("admin.pem")?, read("admin.key")?);
        let mut tls = link::client_tls(
            link::Pem("the appliance CA", &ca),
            link::Pem("the admin certificate", &cert),
            link::Pem("the admin key", &key),
        )
        .map_err(|e| e.to_string())?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .resolve(SERVER_NAME, a.admin)
            .timeout(CALL_TIMEOUT * 6)
            .build()
            .map_err(|e| format!("admin HTTP client: {e}"))?;
        Ok(Self {
            http,
            base: format!("https://{SERVER_NAME}:{}", a.admin.port()),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("admin {method} {path}: {}", link::source_chain(&e)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("admin {method} {path}: {e}"))?;
        if !status.is_success() {
            return Err(format!("admin {method} {path}: {status}: {text}"));
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| format!("admin {method} {path}: {e}: {text}"))
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn metrics(&self) -> Result<String, String> {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .map_err(|e| format!("admin GET /metrics: {e}"))?
            .text()
            .await
            .map_err(|e| format!("admin GET /metrics: {e}"))
    }

    /// The appliance's own `trustbind_agents_connected` gauge.
    async fn agents_connected(&self) -> Option<u64> {
        let m = self.metrics().await.ok()?;
        m.lines()
            .find_map(|l| l.strip_prefix("trustbind_agents_connected "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    }

    /// The audit head (id of the newest audit row).
    async fn audit_head(&self) -> Option<u64> {
        self.get("/v1/status").await.ok()?["audit_head"].as_u64()
    }

    /// Host group, program group and its signatures, the fleet policy.
    async fn prepare(&self) -> Result<(), String> {
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/host-groups/{GROUP}"),
            Some(json!({"mode": "enforce"})),
        )
        .await?;
        self.post(
            "/v1/groups",
            json!({"name": GROUP, "description": "fleet load generator"}),
        )
        .await?;
        let sigs: Vec<Value> = (0..KNOWN_PROGRAMS)
            .map(|k| {
                json!({"sha256": hex(&known_program(k)), "size": 4096, "name": format!("fleet-prog-{k}")})
            })
            .collect();
        self.post(
            "/v1/signatures",
            json!({"signatures": sigs, "group": GROUP}),
        )
        .await?;
        let id = self
            .post("/v1/policies", json!({"text": POLICY, "comment": "fleet"}))
            .await?["id"]
            .clone();
        let id = id
            .as_i64()
            .ok_or("admin POST /v1/policies: no id in the answer")?;
        self.post(&format!("/v1/policies/{id}/activate"), json!({}))
            .await?;
        Ok(())
    }

    /// Registers `name` in the fleet group with `addr` assigned (the
    /// address its channel halves name: simulated agents all connect from
    /// loopback); its one-time token and the CA fingerprint.
    async fn host_token(&self, name: &str, addr: &str) -> Result<(String, String), String> {
        let v = self
            .post("/v1/hosts", json!({"name": name, "host_group": GROUP}))
            .await?;
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/hosts/{name}/addresses"),
            Some(json!({ "addresses": [addr] })),
        )
        .await?;
        match (v["token"].as_str(), v["ca_fingerprint"].as_str()) {
            (Some(t), Some(f)) => Ok((t.to_owned(), f.to_owned())),
            _ => Err(format!(
                "admin POST /v1/hosts: no token or fingerprint in {v}"
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Requests

/// `N` random bytes (a never-seen hash).
fn random<const N: usize>(rng: &mut Rng) -> [u8; N] {
    let mut b = [0_u8; N];
    rng.fill(&mut b);
    b
}

fn hex(b: &[u8]) -> String {
    trustbind_appliance::store::hex(b)
}

/// SHA-256 of known program `k` (registered in the fleet group).
fn known_program(k: usize) -> [u8; 32] {
    Sha256::digest(format!("fleet-known-program-{k}")).into()
}

fn user(u: usize) -> String {
    format!("fleet-user-{u}")
}

fn subject(user: String, pid: u32) -> pb::Subject {
    pb::Subject {
        user,
        uid: 1000,
        euid: 1000,
        gid: 1000,
        loginuid: 1000,
        session: 1,
        pid,
        ancestry: vec![known_program(0).to_vec()],
    }
}

fn exec_request(id: u64, user: String, sha256: [u8; 32], sha1: [u8; 20]) -> pb::Request {
    pb::Request {
        id,
        action: pb::Action::Exec as i32,
        subject: Some(subject(user, 4242)),
        program: Some(pb::Program {
            sha256: sha256.to_vec(),
            sha1: sha1.to_vec(),
            size: 4096,
            path: "/usr/bin/fleet".into(),
            package: String::new(),
        }),
        target: Some(pb::request::Target::Exec(pb::ExecTarget {
            loader_direct: false,
        })),
        peer: None,
        module_request: Vec::new(),
    }
}

/// A TCP connect or accept by known program `prog`.
fn net_request(
    id: u64,
    action: pb::Action,
    prog: usize,
    src: (String, u32),
    dst: (String, u32),
    established: bool,
) -> pb::Request {
    pb::Request {
        id,
        action: action as i32,
        subject: Some(subject(user(0), 4243)),
        program: Some(pb::Program {
            sha256: known_program(prog).to_vec(),
            sha1: Vec::new(),
            size: 0,
            path: String::new(),
            package: String::new(),
        }),
        target: Some(pb::request::Target::Net(pb::NetTarget {
            proto: pb::Proto::Tcp as i32,
            src_addr: src.0,
            src_port: src.1,
            dst_addr: dst.0,
            dst_port: dst.1,
            established,
        })),
        peer: None,
        module_request: Vec::new(),
    }
}

/// Qualifies one request as host `host` (the agent `c` is connected
/// as); its result (counted).
async fn qualify_one(
    sh: &Shared,
    host: usize,
    c: &mut AgentClient<Channel>,
    req: pb::Request,
) -> Result<pb::Result, tonic::Status> {
    sh.note(host, Kind::Decision, [req.id], false);
    let r = c
        .qualify(timed(pb::QualifyBatch {
            requests: vec![req],
            module_session: Vec::new(),
            module_version: 0,
        }))
        .await?
        .into_inner();
    sh.note(host, Kind::Decision, r.results.iter().map(|r| r.id), true);
    sh.verdicts(&r.results);
    r.results
        .into_iter()
        .next()
        .ok_or_else(|| tonic::Status::data_loss("no result for the one request"))
}

fn timed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

// ---------------------------------------------------------------------------
// The fleet

/// One enrolled simulated host.
struct Ident {
    name: String,
    tls: rustls::ClientConfig,
    /// Its (made-up) address in the 5-tuples it reports.
    addr: String,
}

/// Counters and histograms every agent writes into.
struct Shared {
    opts: Options,
    agent_addr: String,
    idents: Vec<Ident>,
    /// The current client of each agent (for the accepting side of pairs).
    clients: Vec<Mutex<Option<AgentClient<Channel>>>>,
    hist: Vec<Mutex<Histogram<u64>>>,
    decisions: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
    pairs: AtomicU64,
    keys: AtomicU64,
    connected: AtomicI64,
    /// Agents between dropping their connection for a deliberate
    /// reconnect (the mix's `reconnect`) and having the new one.
    reconnecting: AtomicI64,
    refused: AtomicU64,
    errors: Mutex<BTreeMap<String, (u64, String)>>,
    /// What each host (by agent index) was asked and answered.
    ledgers: Vec<Mutex<Ledger>>,
    /// The time every `*_us` figure counts from.
    t0: Instant,
    /// Kills so far, and when each killed appliance was gone (µs).
    epoch: AtomicUsize,
    gone_us: Vec<AtomicU64>,
    /// Per kill: when each agent got its first answer from the restarted
    /// appliance (µs).
    served: Vec<Mutex<Vec<u64>>>,
}

/// Microseconds, 1 µs .. 10 min, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant, valid histogram bounds")
}

impl Shared {
    fn error(&self, what: String, msg: String) {
        let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let slot = e.entry(what).or_insert((0, msg));
        slot.0 += 1;
    }

    fn record(&self, op: Op, t: Duration) {
        let us = u64::try_from(t.as_micros()).unwrap_or(u64::MAX).max(1);
        self.hist[op.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(us);
    }

    fn verdicts(&self, results: &[pb::Result]) {
        self.decisions.fetch_add(results.len() as u64, Relaxed);
        for r in results {
            if r.verdict == pb::Verdict::Deny as i32 {
                self.denied.fetch_add(1, Relaxed);
            } else {
                self.allowed.fetch_add(1, Relaxed);
            }
        }
    }

    /// Notes requests (or report records) `ids` of host `host` as sent,
    /// or as answered (`acked`).
    fn note(&self, host: usize, kind: Kind, ids: impl IntoIterator<Item = u64>, acked: bool) {
        let Some(l) = self.ledgers.get(host) else {
            return;
        };
        let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
        let list = if acked { &mut l.acked } else { &mut l.sent };
        list.extend(ids.into_iter().map(|id| audit_check::Key {
            kind,
            host: host as u32,
            id,
        }));
    }

    /// Microseconds from `t0` to `t`.
    fn us(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.t0).as_micros()).unwrap_or(u64::MAX)
    }

    /// An agent's call that started at `start` was answered: if it is the
    /// first one the appliance restarted after the last kill answered
    /// (`seen`: the kills the agent has been answered after), notes when.
    fn answered(&self, seen: &mut usize, start: Instant) {
        let e = self.epoch.load(Acquire);
        if e == 0 || e <= *seen {
            return;
        }
        let Some(gone) = self.gone_us.get(e - 1) else {
            return;
        };
        if self.us(start) < gone.load(Relaxed) {
            return;
        }
        *seen = e;
        if let Some(s) = self.served.get(e - 1) {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.us(Instant::now()));
        }
    }

    fn client(&self, i: usize) -> Option<AgentClient<Channel>> {
        self.clients[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_client(&self, i: usize, c: Option<AgentClient<Channel>>) {
        *self.clients[i].lock().unwrap_or_else(|e| e.into_inner()) = c;
    }
}

/// Decrements the connected gauge when a stream reader ends (or is aborted).
struct Connected(Arc<Shared>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Relaxed);
    }
}

/// A live connection of agent `i`: its client and stream reader.
struct Conn {
    client: AgentClient<Channel>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Ends the stream, and with it the HTTP/2 connection.
        self.reader.abort();
    }
}

/// Connects agent `i` over mutual TLS and subscribes; returns once the
/// first push (the host mode) arrived.
async fn connect(sh: &Arc<Shared>, i: usize) -> Result<Conn, String> {
    let id = &sh.idents[i];
    let ch = link::channel(&sh.agent_addr, SERVER_NAME, id.tls.clone())
        .await
        .map_err(|e| {
            sh.refused.fetch_add(1, Relaxed);
            format!("connect: {e}")
        })?;
    let mut client = AgentClient::new(ch);
    let mut stream = client
        .subscribe(tonic::Request::new(pb::Hello {
            agent_version: "fleet".into(),
            generation: 0,
            module_session: Vec::new(),
            qualify_net: false,
            verdict_timeout_ms: 0,
        }))
        .await
        .map_err(|s| format!("subscribe: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    match tokio::time::timeout(CALL_TIMEOUT, stream.message()).await {
        Ok(Ok(Some(_))) => {}
        Ok(Ok(None)) => return Err("subscribe: the stream ended before its first push".into()),
        Ok(Err(s)) => return Err(format!("subscribe: {:?}: {}", s.code(), s.message())),
        Err(_) => return Err("subscribe: no first push within 5 s".into()),
    }
    sh.connected.fetch_add(1, Relaxed);
    let guard = Connected(Arc::clone(sh));
    let reader = tokio::spawn(async move {
        let _guard = guard;
        while let Ok(Some(p)) = stream.message().await {
            match p.kind {
                Some(pb::push::Kind::ChannelKey(_)) => {
                    _guard.0.keys.fetch_add(1, Relaxed);
                }
                Some(pb::push::Kind::Revoked(_)) => break,
                _ => {}
            }
        }
    });
    sh.set_client(i, Some(client.clone()));
    Ok(Conn { client, reader })
}

/// Per-agent state of the run.
struct Agent {
    i: usize,
    rng: Rng,
    next_id: u64,
    /// (known program, user) pairs this host runs again and again.
    work: Vec<(usize, usize)>,
    /// When this agent last asked for a signed bundle: like the real agent
    /// it asks at most once per the appliance's per-host allowance.
    last_sign: Option<std::time::Instant>,
    /// Kills after which this agent has been answered (see
    /// [`Shared::answered`]).
    seen_kills: usize,
}

impl Agent {
    fn new(i: usize, working_set: usize) -> Self {
        let mut rng = Rng::with_seed(i as u64 + 1);
        let work = (0..working_set)
            .map(|_| {
                (
                    rng.u64(..KNOWN_PROGRAMS as u64) as usize,
                    rng.u64(..USERS as u64) as usize,
                )
            })
            .collect();
        Self {
            i,
            rng,
            next_id: 1,
            work,
            last_sign: None,
            seen_kills: 0,
        }
    }

    /// A request (or record) id no other agent uses.
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        request_id(self.i, self.next_id)
    }

    /// Runs one operation: whether it was done (a pair needs a connected
    /// peer), or the gRPC status on failure.
    async fn op(
        &mut self,
        sh: &Arc<Shared>,
        c: &mut AgentClient<Channel>,
        op: Op,
    ) -> Result<bool, tonic::Status> {
        match op {
            Op::Exec => {
                let reqs: Vec<pb::Request> = (0..sh.opts.batch)
                    .map(|_| {
                        let id = self.id();
                        if self.rng.u64(..100) < sh.opts.cold_pct {
                            exec_request(id, user(0), random(&mut self.rng), random(&mut self.rng))
                        } else {
                            let (p, u) = self.work[self.rng.u64(..self.work.len() as u64) as usize];
                            exec_request(id, user(u), known_program(p), [7; 20])
                        }
                    })
                    .collect();
                let n = reqs.len();
                sh.note(self.i, Kind::Decision, reqs.iter().map(|r| r.id), false);
                let r = c
                    .qualify(timed(pb::QualifyBatch {
                        requests: reqs,
                        module_session: Vec::new(),
                        module_version: 0,
                    }))
                    .await?
                    .into_inner();
                if r.results.len() != n {
                    return Err(tonic::Status::data_loss(format!(
                        "{} results for {n} requests",
                        r.results.len()
                    )));
                }
                sh.note(self.i, Kind::Decision, r.results.iter().map(|r| r.id), true);
                sh.verdicts(&r.results);
            }
            Op::Connect => {
                let me = sh.idents[self.i].addr.clone();
                let req = net_request(
                    self.id(),
                    pb::Action::Connect,
                    1,
                    (me, 0),
                    ("10.255.0.1".into(), PLAIN_PORT),
                    false,
                );
                qualify_one(sh, self.i, c, req).await?;
            }
            Op::Pair => return self.pair(sh, c).await,
            Op::Report => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                let ids: Vec<u64> = (0..REPORT_RECORDS).map(|_| self.id()).collect();
                let records = ids
                    .iter()
                    .map(|n| pb::AuditRecord {
                        id: format!("fleet-{}-{n}", self.i),
                        at_ms: now,
                        what: audit_check::REPORT_WHAT.into(),
                        detail_json: format!("{{\"n\":{n}}}"),
                    })
                    .collect();
                sh.note(self.i, Kind::Report, ids.iter().copied(), false);
                let r = c
                    .report(timed(pb::AuditBatch { records }))
                    .await?
                    .into_inner();
                if r.stored as usize + r.duplicates as usize != REPORT_RECORDS {
                    return Err(tonic::Status::data_loss(format!(
                        "report: {} stored + {} duplicates of {REPORT_RECORDS}",
                        r.stored, r.duplicates
                    )));
                }
                sh.note(self.i, Kind::Report, ids, true);
            }
            Op::Sign => {
                let entries = self
                    .work
                    .iter()
                    .map(|(p, u)| pb::BundleEntry {
                        sha256: known_program(*p).to_vec(),
                        user: user(*u),
                    })
                    .collect();
                let r = c
                    .sign_bundle(timed(pb::BundleRequest { entries }))
                    .await?
                    .into_inner();
                if r.payload.is_empty() || r.signature.is_empty() {
                    return Err(tonic::Status::data_loss("sign: an empty bundle"));
                }
            }
            // Done by the caller (it owns the connection).
            Op::Reconnect => return Ok(false),
        }
        Ok(true)
    }

    /// A channel: this agent connects (before and after the handshake), a
    /// random other connected agent accepts; the appliance pairs the halves
    /// and pushes the key to both.
    async fn pair(
        &mut self,
        sh: &Arc<Shared>,
        c: &mut AgentClient<Channel>,
    ) -> Result<bool, tonic::Status> {
        let n = sh.idents.len();
        if n < 2 {
            return Ok(false);
        }
        let j = (self.i + 1 + self.rng.u64(..n as u64 - 1) as usize) % n;
        let Some(mut peer) = sh.client(j) else {
            return Ok(false);
        };
        let me = (
            sh.idents[self.i].addr.clone(),
            1024 + (self.id() % 60_000) as u32,
        );
        let server = (sh.idents[j].addr.clone(), CHANNEL_PORT);
        let first = net_request(
            self.id(),
            pb::Action::Connect,
            2,
            (me.0.clone(), 0),
            server.clone(),
            false,
        );
        qualify_one(sh, self.i, c, first).await?;
        let established = net_request(
            self.id(),
            pb::Action::Connect,
            2,
            me.clone(),
            server.clone(),
            true,
        );
        let r = qualify_one(sh, self.i, c, established).await?;
        let channel = r.channel_id;
        if channel == 0 {
            return Err(tonic::Status::failed_precondition(
                "pair: the established connect got no channel id",
            ));
        }
        let accept = net_request(self.id(), pb::Action::Accept, 3, me, server, false);
        let a = qualify_one(sh, j, &mut peer, accept).await?;
        match a {
            a if a.channel_id == channel && a.verdict != pb::Verdict::Deny as i32 => {
                sh.pairs.fetch_add(1, Relaxed);
                Ok(true)
            }
            a => Err(tonic::Status::failed_precondition(format!(
                "pair: the accept did not pair with channel {channel}: {a:?}"
            ))),
        }
    }
}

/// Jittered backoff before reconnect attempt `n` (0.25 s · 2^n, at most 4 s, ±50 %).
fn backoff(rng: &mut Rng, n: u32) -> Duration {
    let base = 250_u64 << n.min(4);
    Duration::from_millis(base / 2 + rng.u64(..base))
}

/// One agent's measured run, until `end`.
async fn run_agent(
    sh: Arc<Shared>,
    i: usize,
    mut conn: Option<Conn>,
    start: Instant,
    end: Instant,
) -> Option<Conn> {
    let mut a = Agent::new(i, sh.opts.working_set);
    let per_op = sh.opts.mix.decisions_per_op(sh.opts.batch).max(0.01);
    let interval = (sh.opts.rate > 0)
        .then(|| Duration::from_secs_f64(sh.idents.len() as f64 * per_op / sh.opts.rate as f64));
    let mut next = start
        + interval.map_or(Duration::ZERO, |iv| {
            iv.mul_f64(a.rng.u64(..1000) as f64 / 1000.0)
        });
    let mut failures = 0_u32;
    while Instant::now() < end {
        if let Some(iv) = interval {
            tokio::time::sleep_until(next.into()).await;
            next += iv;
            let now = Instant::now();
            if next < now {
                next = now;
            }
            if now >= end {
                break;
            }
        }
        // The push stream ended (the appliance went away): reconnect, as
        // the agent does when its `Subscribe` stream ends.
        if conn.as_ref().is_some_and(|c| c.reader.is_finished()) {
            sh.set_client(i, None);
            conn = None;
            failures += 1;
        }
        let Some(cur) = conn.as_mut() else {
            tokio::time::sleep(backoff(&mut a.rng, failures)).await;
            if Instant::now() >= end {
                break;
            }
            let t = Instant::now();
            match connect(&sh, i).await {
                Ok(c) => {
                    sh.record(Op::Reconnect, t.elapsed());
                    conn = Some(c);
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    sh.error("reconnect".into(), e);
                }
            }
            continue;
        };
        let mut op = sh.opts.mix.pick(&mut a.rng);
        // SignBundle at most once per the appliance's per-host allowance,
        // as the real agent (`agent/src/run.rs`, BUNDLE_MIN_GAP); an exec
        // instead.
        if op == Op::Sign {
            if a.last_sign
                .is_some_and(|t| t.elapsed() < trustbind_appliance::agent_api::BUNDLE_EVERY)
            {
                op = Op::Exec;
            } else {
                a.last_sign = Some(std::time::Instant::now());
            }
        }
        let t = Instant::now();
        if op == Op::Reconnect {
            sh.reconnecting.fetch_add(1, Relaxed);
            sh.set_client(i, None);
            conn = None;
            let r = connect(&sh, i).await;
            sh.reconnecting.fetch_sub(1, Relaxed);
            match r {
                Ok(c) => {
                    sh.record(op, t.elapsed());
                    conn = Some(c);
                }
                Err(e) => {
                    failures += 1;
                    sh.error("reconnect".into(), e);
                }
            }
            continue;
        }
        let mut client = cur.client.clone();
        match a.op(&sh, &mut client, op).await {
            Ok(true) => {
                sh.record(op, t.elapsed());
                sh.answered(&mut a.seen_kills, t);
            }
            Ok(false) => {}
            Err(s) => {
                sh.error(
                    format!("{}: {:?}", op.name(), s.code()),
                    s.message().to_owned(),
                );
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
                    // The connection is gone: reconnect (with backoff).
                    sh.set_client(i, None);
                    conn = None;
                    failures += 1;
                }
            }
        }
    }
    sh.set_client(i, None);
    // Handed back, not dropped: the run reads the connected count at the
    // end of the window, and an agent done first must still count.
    conn
}

// ---------------------------------------------------------------------------
// The report

/// Latency figures of one operation, milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub calls: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn latency(h: &Histogram<u64>) -> Latency {
    Latency {
        calls: h.len(),
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: h.max() as f64 / 1000.0,
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub options: Option<Options>,
    pub enrolled: usize,
    pub enrol_s: f64,
    pub connected_at_start: usize,
    pub connect_s: f64,
    pub handshake: Latency,
    pub connected_min: i64,
    pub connected_end: i64,
    /// Agents in a deliberate reconnect when `connected_end` was read.
    pub reconnecting_end: i64,
    pub appliance_gauge: Option<u64>,
    pub seconds: f64,
    pub decisions: u64,
    /// Decisions including the calls that ended after the window (what
    /// the audit growth is divided by).
    pub decisions_all: u64,
    pub allowed: u64,
    pub denied: u64,
    pub pairs: u64,
    pub keys: u64,
    pub ops: Vec<(&'static str, Latency)>,
    pub decision_latency: Latency,
    pub start: ProcStats,
    pub end: ProcStats,
    pub fds_peak: u64,
    pub nofile: String,
    pub data_growth: u64,
    pub audit_rows: Option<u64>,
    pub generator_cpu_s: f64,
    pub refused: u64,
    pub errors: BTreeMap<String, (u64, String)>,
    pub exited: Option<String>,
    /// The kills (`--kill-at`), in order.
    pub kills: Vec<Kill>,
    /// The agents' names, by index; what they were asked and answered.
    pub hosts: Vec<String>,
    pub ledger: Ledger,
    /// The audit check (`--check-audit`), once the appliance stopped.
    pub audit: Option<AuditCheck>,
}

/// One kill of the appliance and the fleet's return.
#[derive(Debug, Clone, Default)]
pub struct Kill {
    /// Seconds into the run.
    pub at_s: f64,
    /// The kill, µs from the generator's clock origin.
    pub kill_us: u64,
    /// From the kill to the restarted appliance listening.
    pub restart_s: f64,
    /// Agents in the run.
    pub agents: usize,
    /// For each agent answered again before the next kill or the run's
    /// end: seconds from the kill to its first answer from the restarted
    /// appliance, sorted.
    pub served_s: Vec<f64>,
}

impl Kill {
    /// Seconds from the kill until a share `q` (0..=1) of all agents had been
    /// answered again; `None` if fewer were.
    pub fn served_by(&self, q: f64) -> Option<f64> {
        let need = ((self.agents as f64 * q).ceil() as usize).max(1);
        self.served_s.get(need - 1).copied()
    }
}

impl Report {
    /// Decisions per second over the measured run.
    pub fn rate(&self) -> f64 {
        self.decisions as f64 / self.seconds.max(1e-9)
    }

    /// Why the run failed its checks: a kill the appliance did not come
    /// back from, or the audit check (anything acknowledged lost, the
    /// chain broken).
    pub fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        if let Some(e) = self.exited.as_ref().filter(|_| !self.kills.is_empty()) {
            why.push(e.clone());
        }
        if let Some(f) = self.audit.as_ref().and_then(AuditCheck::failure) {
            why.push(f);
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.options {
            writeln!(
                f,
                "fleet: {} agents, {} s, rate {}, batch {}, cold {} %, working set {}, mix {}",
                o.agents,
                o.seconds,
                if o.rate == 0 {
                    "unpaced".to_owned()
                } else {
                    format!("{}/s", o.rate)
                },
                o.batch,
                o.cold_pct,
                o.working_set,
                o.mix
            )?;
        }
        writeln!(
            f,
            "setup: {} enrolled in {:.1} s ({:.0}/s); {} connected in {:.1} s; handshake+subscribe p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.enrolled,
            self.enrol_s,
            self.enrolled as f64 / self.enrol_s.max(1e-9),
            self.connected_at_start,
            self.connect_s,
            self.handshake.p50_ms,
            self.handshake.p99_ms,
            self.handshake.max_ms
        )?;
        writeln!(
            f,
            "agents connected: {} at the end ({} in a deliberate reconnect; appliance gauge {}), lowest {} during the run",
            self.connected_end,
            self.reconnecting_end,
            self.appliance_gauge.map_or("?".into(), |g| g.to_string()),
            self.connected_min
        )?;
        writeln!(
            f,
            "decisions: {} in {:.1} s = {:.0}/s (allow {}, deny {}); latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.decisions,
            self.seconds,
            self.rate(),
            self.allowed,
            self.denied,
            self.decision_latency.p50_ms,
            self.decision_latency.p99_ms,
            self.decision_latency.max_ms
        )?;
        writeln!(
            f,
            "  {:<10} {:>9} {:>9} {:>9} {:>9}",
            "call", "count", "p50 ms", "p99 ms", "max ms"
        )?;
        for (name, l) in &self.ops {
            writeln!(
                f,
                "  {:<10} {:>9} {:>9.2} {:>9.2} {:>9.2}",
                name, l.calls, l.p50_ms, l.p99_ms, l.max_ms
            )?;
        }
        writeln!(
            f,
            "channels: {} paired, {} keys received on the streams (2 per pair)",
            self.pairs, self.keys
        )?;
        writeln!(
            f,
            "appliance: RSS {:.1} MiB (peak {:.1} MiB), {} open fds (peak {}), open-file limit {}",
            mib(self.end.rss_kib),
            mib(self.end.hwm_kib),
            self.end.fds,
            self.fds_peak,
            self.nofile
        )?;
        let cpu = self.end.cpu_s - self.start.cpu_s;
        if self.kills.is_empty() {
            writeln!(
                f,
                "appliance CPU: {:.2} s = {:.3} s per 1,000 decisions; generator CPU {:.2} s (same machine)",
                cpu,
                cpu * 1000.0 / (self.decisions.max(1) as f64),
                self.generator_cpu_s
            )?;
        } else {
            writeln!(
                f,
                "appliance CPU: not measured across restarts; generator CPU {:.2} s",
                self.generator_cpu_s
            )?;
        }
        writeln!(
            f,
            "audit: data dir +{:.2} MiB = {:.0} bytes per decision; audit rows +{}",
            self.data_growth as f64 / 1048576.0,
            self.data_growth as f64 / (self.decisions_all.max(1) as f64),
            self.audit_rows.map_or("?".into(), |r| r.to_string())
        )?;
        for (i, k) in self.kills.iter().enumerate() {
            let s = |q: f64| k.served_by(q).map_or("-".into(), |s| format!("{s:.2}"));
            writeln!(
                f,
                "kill {} at {:.1} s: listening again after {:.2} s; agents answered again after (s from the kill): first {}, 50 % {}, 99 % {}, all {} ({} of {})",
                i + 1,
                k.at_s,
                k.restart_s,
                k.served_s.first().map_or("-".into(), |s| format!("{s:.2}")),
                s(0.5),
                s(0.99),
                s(1.0),
                k.served_s.len(),
                k.agents
            )?;
        }
        if let Some(a) = &self.audit {
            writeln!(f, "{a}")?;
        }
        if let Some(s) = &self.exited {
            writeln!(f, "FINDING: the appliance exited during the run: {s}")?;
        }
        if self.refused > 0 {
            writeln!(
                f,
                "FINDING: the appliance refused {} connection attempts (see errors)",
                self.refused
            )?;
        }
        if self.errors.is_empty() {
            write!(f, "errors: none")
        } else {
            writeln!(f, "errors:")?;
            let mut first = true;
            for (k, (n, msg)) in &self.errors {
                if !first {
                    writeln!(f)?;
                }
                first = false;
                let msg: String = msg.chars().take(200).collect();
                write!(f, "  {k}: {n} (first: {msg})")?;
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------
// The run

/// Raises this process's soft open-file limit to what `need` descriptors
/// take (at most the hard limit); warns if that is not enough.
fn raise_nofile(need: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    let cur = l.current.unwrap_or(u64::MAX);
    if cur >= need {
        return;
    }
    let max = l.maximum.unwrap_or(u64::MAX);
    l.current = Some(need.min(max));
    if let Err(e) = setrlimit(Resource::Nofile, l) {
        eprintln!("fleet: cannot raise the open-file limit from {cur}: {e}");
    } else if need > max {
        eprintln!(
            "fleet: the open-file limit is {max} (hard), below the {need} this run needs: expect failed connects on the generator's side"
        );
    }
}

/// Setup bounded by `limit`: runs `f(i)` for `0..n`, `concurrency` at a
/// time, printing progress; returns each result (None: not finished).
async fn phase<T, F, Fut>(
    what: &str,
    n: usize,
    concurrency: usize,
    limit: Duration,
    f: F,
) -> Vec<Option<Result<T, String>>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    for i in 0..n {
        let fut = f(i);
        let sem = Arc::clone(&sem);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, fut.await)
        });
    }
    let mut out: Vec<Option<Result<T, String>>> = (0..n).map(|_| None).collect();
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = Instant::now();
    let mut done = 0;
    let mut failed = 0;
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok((i, r)))) => {
                done += 1;
                failed += usize::from(r.is_err());
                out[i] = Some(r);
            }
            Ok(Some(Err(e))) => {
                done += 1;
                failed += 1;
                eprintln!("fleet: {what}: a task failed: {e}");
            }
            Ok(None) => break,
            Err(_) => {
                eprintln!(
                    "fleet: {what}: {done}/{n} after the setup timeout of {limit:?}; going on with those"
                );
                set.abort_all();
                break;
            }
        }
        if last.elapsed() >= Duration::from_secs(2) || done == n {
            last = Instant::now();
            eprintln!(
                "fleet: {what}: {done}/{n} ({failed} failed) in {:.1} s, {:.0}/s",
                start.elapsed().as_secs_f64(),
                done as f64 / start.elapsed().as_secs_f64().max(1e-9)
            );
        }
    }
    out
}

/// Runs the generator against the `trustbind-appliance` binary `bin`.
pub fn run(opts: Options, bin: &Path) -> Result<Report, String> {
    // Started before the limit is raised: it keeps the machine's limit.
    let mut app = Appliance::start(
        bin,
        opts.listen,
        opts.appliance_nofile,
        opts.kill_at.is_some(),
    )?;
    eprintln!(
        "fleet: appliance pid {} serving on {} (agent), {} (enrol), {} (admin); data {}",
        app.pid,
        app.agent,
        app.enrol,
        app.admin,
        app.data().display()
    );
    // One connection per agent (a reconnect drops the old one first), the
    // setup's parallel enrolments and admin calls, and slack.
    raise_nofile(opts.agents as u64 + 2 * opts.concurrency as u64 + 1024);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let check = opts.check_audit;
    let result = rt.block_on(drive(&mut app, opts));
    app.stop();
    let mut report = result?;
    if check {
        eprintln!("fleet: checking the audit log against what the agents got");
        let ledger = std::mem::take(&mut report.ledger);
        report.audit = Some(audit_check::check(
            bin,
            &app.data(),
            &report.hosts,
            &ledger,
        )?);
    }
    Ok(report)
}

async fn drive(app: &mut Appliance, opts: Options) -> Result<Report, String> {
    let admin = Arc::new(Admin::new(app)?);
    admin.prepare().await?;
    let mut report = Report {
        options: Some(opts.clone()),
        ..Report::default()
    };

    // Enrolment: a token from the admin API, then the agent's enrolment.
    let t = Instant::now();
    let enrol_addr = app.enrol.to_string();
    let agent_addr = app.agent.to_string();
    let enrolled = phase(
        "enrol",
        opts.agents,
        opts.concurrency,
        opts.setup_timeout,
        |i| {
            let admin = Arc::clone(&admin);
            let (enrol_addr, agent_addr) = (enrol_addr.clone(), agent_addr.clone());
            async move {
                let name = format!("fleet-{i:06}");
                let addr = format!("10.{}.{}.{}", 1 + (i >> 16) % 250, (i >> 8) & 255, i & 255);
                let (token, ca_fingerprint) = admin.host_token(&name, &addr).await?;
                let e = Enrolment {
                    enrol_addr,
                    agent_addr: Some(agent_addr),
                    server_name: Some(SERVER_NAME.into()),
                    name: name.clone(),
                    token,
                    ca_fingerprint,
                };
                let creds = link::request_certificate(&e)
                    .await
                    .map_err(|e| format!("enrol {name}: {e}"))?;
                let tls = creds.tls().map_err(|e| e.to_string())?;
                Ok(Ident { name, tls, addr })
            }
        },
    )
    .await;
    report.enrol_s = t.elapsed().as_secs_f64();
    let mut errors = BTreeMap::new();
    let mut idents = Vec::new();
    for r in enrolled {
        match r {
            Some(Ok(id)) => idents.push(id),
            Some(Err(e)) => {
                let slot = errors.entry("enrol".to_owned()).or_insert((0, e));
                slot.0 += 1;
            }
            None => {
                let slot = errors
                    .entry("enrol: not done in time".to_owned())
                    .or_insert((0, String::new()));
                slot.0 += 1;
            }
        }
    }
    report.enrolled = idents.len();
    if idents.is_empty() {
        return Err(format!(
            "no agent enrolled: {errors:?}; the appliance's log:\n{}",
            app.log_tail()
        ));
    }
    let n = idents.len();
    let kills = if opts.kill_at.is_some() {
        opts.kills as usize
    } else {
        0
    };
    let sh = Arc::new(Shared {
        opts: opts.clone(),
        agent_addr,
        clients: (0..n).map(|_| Mutex::new(None)).collect(),
        idents,
        hist: (0..OPS).map(|_| Mutex::new(histogram())).collect(),
        decisions: AtomicU64::new(0),
        allowed: AtomicU64::new(0),
        denied: AtomicU64::new(0),
        pairs: AtomicU64::new(0),
        keys: AtomicU64::new(0),
        connected: AtomicI64::new(0),
        reconnecting: AtomicI64::new(0),
        refused: AtomicU64::new(0),
        errors: Mutex::new(errors),
        ledgers: (0..n).map(|_| Mutex::new(Ledger::default())).collect(),
        t0: Instant::now(),
        epoch: AtomicUsize::new(0),
        gone_us: (0..kills).map(|_| AtomicU64::new(u64::MAX)).collect(),
        served: (0..kills).map(|_| Mutex::new(Vec::new())).collect(),
    });

    // Connect every agent (TLS handshake + Subscribe).
    let t = Instant::now();
    let handshakes = Arc::new(Mutex::new(histogram()));
    let conns = phase("connect", n, opts.concurrency, opts.setup_timeout, |i| {
        let sh = Arc::clone(&sh);
        let hs = Arc::clone(&handshakes);
        async move {
            let t = Instant::now();
            let c = connect(&sh, i)
                .await
                .map_err(|e| format!("{}: {e}", sh.idents[i].name))?;
            let us = u64::try_from(t.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            hs.lock()
                .unwrap_or_else(|e| e.into_inner())
                .saturating_record(us);
            Ok(c)
        }
    })
    .await;
    report.connect_s = t.elapsed().as_secs_f64();
    report.handshake = latency(&handshakes.lock().unwrap_or_else(|e| e.into_inner()));
    let conns: Vec<Option<Conn>> = conns
        .into_iter()
        .map(|r| match r {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                sh.error("connect".into(), e);
                None
            }
            None => None,
        })
        .collect();
    report.connected_at_start = usize::try_from(sh.connected.load(Relaxed)).unwrap_or(0);
    if report.connected_at_start < n {
        eprintln!(
            "fleet: FINDING: only {} of {n} agents connected",
            report.connected_at_start
        );
    }

    // The measured run.
    let audit_start = admin.audit_head().await;
    let metrics_start = admin.metrics().await.ok();
    let data_start = dir_bytes(&app.data());
    report.start = proc_stats(app.pid)?;
    let gen_start = proc_stats(std::process::id())?.cpu_s;
    let start = Instant::now();
    let end = start + Duration::from_secs(opts.seconds);
    let mut agents = JoinSet::new();
    for (i, c) in conns.into_iter().enumerate() {
        agents.spawn(run_agent(Arc::clone(&sh), i, c, start, end));
    }
    let mut min = sh.connected.load(Relaxed);
    let mut fds_peak = report.start.fds;
    let mut last_dec = 0;
    let mut last_t = start;
    let mut tick = tokio::time::interval_at((start + opts.interval).into(), opts.interval);
    let kill_at = |k: usize| {
        opts.kill_at
            .filter(|_| k < kills)
            .map(|t| start + t * (k as u32 + 1))
    };
    while Instant::now() < end {
        let next_kill = kill_at(report.kills.len());
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(end.into()) => break,
            _ = tokio::time::sleep_until(next_kill.unwrap_or(end).into()), if next_kill.is_some() => {
                match kill_and_restart(app, &sh, start) {
                    Ok(k) => report.kills.push(k),
                    Err(e) => {
                        report.exited = Some(e);
                        break;
                    }
                }
                continue;
            }
        }
        if let Some(s) = app.exited() {
            report.exited = Some(s);
            break;
        }
        let c = sh.connected.load(Relaxed);
        min = min.min(c);
        let d = sh.decisions.load(Relaxed);
        let ps = proc_stats(app.pid).unwrap_or_default();
        fds_peak = fds_peak.max(ps.fds);
        eprintln!(
            "fleet: {:>5.0} s  connected {c}  decisions/s {:.0}  appliance RSS {:.1} MiB  fds {}  errors {}",
            start.elapsed().as_secs_f64(),
            (d - last_dec) as f64 / last_t.elapsed().as_secs_f64().max(1e-9),
            mib(ps.rss_kib),
            ps.fds,
            sh.errors.lock().map(|e| e.values().map(|v| v.0).sum::<u64>()).unwrap_or(0)
        );
        last_dec = d;
        last_t = Instant::now();
    }
    // Figures at the end of the window, before the agents hang up.
    report.seconds = start.elapsed().as_secs_f64();
    report.decisions = sh.decisions.load(Relaxed);
    report.reconnecting_end = sh.reconnecting.load(Relaxed);
    report.connected_end = sh.connected.load(Relaxed);
    report.connected_min = min.min(report.connected_end);
    if report.exited.is_none() {
        report.end = proc_stats(app.pid)?;
        report.fds_peak = fds_peak.max(report.end.fds);
        report.nofile = nofile_limit(app.pid);
        report.appliance_gauge = admin.agents_connected().await;
        if let (Some(a), Ok(b)) = (&metrics_start, admin.metrics().await) {
            for line in stage_lines(a, &b) {
                eprintln!("fleet: appliance {line}");
            }
        }
    }
    report.generator_cpu_s = proc_stats(std::process::id())?.cpu_s - gen_start;
    // Calls in flight end within their timeout.
    let bound = tokio::time::Instant::now() + CALL_TIMEOUT * 3;
    while let Ok(Some(_)) = tokio::time::timeout_at(bound, agents.join_next()).await {}
    agents.abort_all();
    report.decisions_all = sh.decisions.load(Relaxed);
    if report.exited.is_none() {
        report.data_growth = dir_bytes(&app.data()).saturating_sub(data_start);
        report.audit_rows = match (audit_start, admin.audit_head().await) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
    }
    report.allowed = sh.allowed.load(Relaxed);
    report.denied = sh.denied.load(Relaxed);
    report.pairs = sh.pairs.load(Relaxed);
    report.keys = sh.keys.load(Relaxed);
    report.refused = sh.refused.load(Relaxed);
    let mut decision_hist = histogram();
    for op in ALL_OPS {
        let h = sh.hist[op.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if matches!(op, Op::Exec | Op::Connect) {
            let _ = decision_hist.add(&*h);
        }
        report.ops.push((op.name(), latency(&h)));
    }
    report.decision_latency = latency(&decision_hist);
    report.errors = std::mem::take(&mut *sh.errors.lock().unwrap_or_else(|e| e.into_inner()));
    for (k, served) in report.kills.iter_mut().zip(&sh.served) {
        let mut s = std::mem::take(&mut *served.lock().unwrap_or_else(|e| e.into_inner()));
        s.sort_unstable();
        k.agents = n;
        k.served_s = s
            .iter()
            .map(|us| us.saturating_sub(k.kill_us) as f64 / 1e6)
            .collect();
    }
    for l in &sh.ledgers {
        report.ledger.merge(std::mem::take(
            &mut *l.lock().unwrap_or_else(|e| e.into_inner()),
        ));
    }
    report.hosts = sh.idents.iter().map(|id| id.name.clone()).collect();
    Ok(report)
}

/// The appliance's own histograms of where a `Qualify` spends its time
/// (absent from builds that have none), over the run: what grew between
/// two scrapes of `/metrics`, as count, mean and the bucket bounds that
/// hold the median and the 99th percentile.
const STAGES: [(&str, &str); 5] = [
    (
        "trustbind_qualify_seconds",
        "Qualify handler, call to reply",
    ),
    (
        "trustbind_qualify_decide_seconds",
        "  deciding (blocking-pool wait included)",
    ),
    (
        "trustbind_audit_wait_seconds",
        "  waiting for the audit commit",
    ),
    (
        "trustbind_audit_commit_seconds",
        "audit writer: one commit (insert, fsync)",
    ),
    (
        "trustbind_audit_batch_rows",
        "audit writer: rows per commit",
    ),
];

/// One line per stage of [`STAGES`] found in both scrapes.
fn stage_lines(before: &str, after: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (name, what) in STAGES {
        let (Some(a), Some(b)) = (histogram_of(before, name), histogram_of(after, name)) else {
            continue;
        };
        let count = b.count.saturating_sub(a.count);
        if count == 0 {
            continue;
        }
        let sum = b.sum - a.sum;
        let buckets: Vec<(f64, u64)> = b
            .buckets
            .iter()
            .zip(&a.buckets)
            .map(|(&(le, nb), &(_, na))| (le, nb.saturating_sub(na)))
            .collect();
        let at = |q: f64| {
            let rank = (q * count as f64).ceil() as u64;
            buckets
                .iter()
                .find(|(_, n)| *n >= rank)
                .map_or(f64::INFINITY, |(le, _)| *le)
        };
        let unit = |v: f64| {
            if name.ends_with("_rows") {
                format!("{v:.0}")
            } else {
                format!("{:.2} ms", v * 1e3)
            }
        };
        out.push(format!(
            "{what}: {count}, mean {}, p50 <= {}, p99 <= {}",
            unit(sum / count as f64),
            unit(at(0.5)),
            unit(at(0.99))
        ));
    }
    out
}

/// A histogram of an OpenMetrics text: cumulative buckets `(le, count)`.
struct Hist {
    count: u64,
    sum: f64,
    buckets: Vec<(f64, u64)>,
}

fn histogram_of(text: &str, name: &str) -> Option<Hist> {
    let mut h = Hist {
        count: 0,
        sum: 0.0,
        buckets: Vec::new(),
    };
    let mut found = false;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (key, value) = rest.rsplit_once(' ')?;
        if key == "_count" {
            h.count = value.parse::<f64>().ok()? as u64;
            found = true;
        } else if key == "_sum" {
            h.sum = value.parse().ok()?;
        } else if let Some(le) = key
            .strip_prefix("_bucket{le=\"")
            .and_then(|k| k.strip_suffix("\"}"))
        {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            h.buckets.push((le, value.parse::<f64>().ok()? as u64));
        }
    }
    found.then_some(h)
}

/// SIGKILLs the appliance, waits until it is gone, marks the kill for the
/// agents ([`Shared::answered`]) and starts it again on the same data
/// directory and ports.
fn kill_and_restart(app: &mut Appliance, sh: &Shared, start: Instant) -> Result<Kill, String> {
    let k = sh.epoch.load(Relaxed);
    let killed = Instant::now();
    app.kill();
    if let Some(g) = sh.gone_us.get(k) {
        g.store(sh.us(Instant::now()), Relaxed);
    }
    sh.epoch.store(k + 1, Release);
    eprintln!(
        "fleet: {:>5.1} s  killed the appliance (SIGKILL, kill {}); restarting it",
        killed.duration_since(start).as_secs_f64(),
        k + 1
    );
    app.restart()?;
    let restart_s = killed.elapsed().as_secs_f64();
    eprintln!(
        "fleet: {:>5.1} s  the appliance serves again (pid {}, {restart_s:.2} s after the kill)",
        start.elapsed().as_secs_f64(),
        app.pid
    );
    Ok(Kill {
        at_s: killed.duration_since(start).as_secs_f64(),
        kill_us: sh.us(killed),
        restart_s,
        ..Kill::default()
    })
}
