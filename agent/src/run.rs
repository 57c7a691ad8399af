//! `trustbind-agent run`: the daemon.
//!
//! ```text
//!  /dev/trustbind ──read thread──▶ batcher ──Qualify (mTLS gRPC)──▶ appliance
//!        ▲     │ (net requests)       │  (offline: bundle, else the mode's default; spooled)
//!        │     └──▶ one task each ──Qualify (one request)──▶ appliance
//!        └──── Verdict / ChannelKey ◀─┘
//!  appliance ──Subscribe stream──▶ generation → module cache flush, host mode → module mode,
//!                                  channel keys / refusals → held by channel id (keys.rs)
//!  spool ──Report──▶ appliance (when connected)
//!  FileSets push / saved file_sets.json ──resolve (stat, mountinfo; every 30 s)──▶ FileSets record
//! ```
//!
//! Operations on protected files (`FileRequest`) are batched with execs
//! (`ACTION_OPEN_READ`, `ACTION_OPEN_WRITE`, `ACTION_DELETE`,
//! `ACTION_RENAME` with a `FileTarget`) and answered by a `Verdict` that
//! the module may cache when the appliance says so; offline they get the
//! mode's default (the signed bundle holds exec verdicts only), never
//! cached, spooled as `file.offline`.
//!
//! TCP connects and accepts (`NetRequest`, unless `--no-net`) are never
//! batched with execs nor wait behind them: each is its own `Qualify` call.
//! A pre-SYN connect is answered by a `Verdict` (with `encrypt` when the
//! policy requires a channel). An established connect or an accept whose
//! result names a channel waits for that channel's pushed key (which may
//! have come first) or refusal, within the kernel's verdict timeout less a
//! margin, and is answered by a `ChannelKey` record; every copy of the key
//! is then wiped. Without a key: an accept gets the result's verdict (no
//! channel: plaintext or refused), an established connect a deny (the
//! kernel resets it). Offline, net requests get the mode's default, never a
//! key.
//!
//! The module's mode follows the appliance's host mode (pushed on every
//! subscription); until the first push the last known mode (saved in the
//! state directory) or `--mode` applies. Stopping the agent leaves the mode
//! as it is: in enforce mode the kernel keeps refusing what it cannot ask
//! about, so killing the agent does not switch protection off.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify, RwLock};
use tonic::transport::Channel;
use trustbind_api::module::{self as tbm, deny};
use trustbind_api::pb::{self, agent_client::AgentClient, push};
use trustbind_proto::{
    ChannelClosed, ChannelRole, CloseReason, Decision, FileAccess, Mode, NetKind, Obligations,
    Verdict,
};

use crate::bundle::{Bundle, Remembered};
use crate::device::{Device, DeviceWriter, Event, ExecEvent, FileEvent, NetEvent, Process};
use crate::files::{self, Tracker};
use crate::keys::{self, Keys, Pushed};
use crate::link::{self, write_atomic, AgentConfig};
use crate::packages::Packages;
use crate::refusal;
use crate::signed::{self, Verified};
use crate::spool::{Spool, SpoolRecord};
use crate::users::Users;

/// Agent version string sent to the appliance.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Options of `run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// State directory (credentials, spool, bundle, status).
    pub state: PathBuf,
    /// The module's device.
    pub device: PathBuf,
    /// Mode before the appliance says otherwise (when none was saved).
    pub mode: Mode,
    /// How long the kernel waits for a verdict.
    pub verdict_timeout_ms: u32,
    /// Requests per Qualify call at most.
    pub batch_max: usize,
    /// How long the first request of a batch waits for company.
    pub batch_wait: Duration,
    /// Deadline of one Qualify call.
    pub call_timeout: Duration,
    /// Whether the module asks about TCP connects and accepts (`Config`'s
    /// `qualify_net`; `--no-net` turns it off).
    pub qualify_net: bool,
    /// Whether this agent announces channel keys v2 to its module
    /// (`--channels-v2`): the module then asks `Listen`.
    pub channels_v2: bool,
    /// Renew the host certificate when fewer than this many days remain.
    pub renew_days: u32,
    /// dpkg's file lists (`/var/lib/dpkg/info`): the package owning each
    /// exec'd path is sent with it, for learning mode.
    pub dpkg_info: PathBuf,
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Credentials or configuration.
    #[error(transparent)]
    Link(#[from] link::LinkError),
    /// The device.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// The spool.
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
}

/// Counters and state shown by `trustbind-agent status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Status {
    /// Daemon pid.
    pub pid: u32,
    /// Enrolled host name.
    pub host: String,
    /// Appliance agent address.
    pub appliance: String,
    /// Whether the gRPC session is up.
    pub connected: bool,
    /// Current module mode.
    pub mode: String,
    /// Whether the module was loaded with the appliance's authority key
    /// and so believes only records the appliance sealed (root on this
    /// host cannot switch it off or answer for the appliance).
    #[serde(default)]
    pub sealed: bool,
    /// Last policy generation seen.
    pub generation: i64,
    /// Exec requests from the module.
    pub requests: u64,
    /// Connect / accept requests from the module.
    #[serde(default)]
    pub net_requests: u64,
    /// Channel keys handed to the module.
    #[serde(default)]
    pub channel_keys: u64,
    /// Channel ends the module reported closed (spooled as
    /// `channel.close`).
    #[serde(default)]
    pub channels_closed: u64,
    /// Operations on protected files the module asked about.
    #[serde(default)]
    pub file_requests: u64,
    /// Of those, denied.
    #[serde(default)]
    pub file_denied: u64,
    /// Protected files, directories and mounts (identities) the module
    /// was last given.
    #[serde(default)]
    pub protected_files: usize,
    /// Answered by the appliance (exec, net and file).
    pub answered_online: u64,
    /// Answered from the bundle or the mode's default (appliance away;
    /// exec, net and file).
    pub answered_offline: u64,
    /// Denials sent to the module.
    pub denied: u64,
    /// Answers the module no longer waited for.
    pub late: u64,
    /// Records waiting in the spool.
    pub spool_backlog: usize,
    /// Spooled records delivered since start.
    pub spool_delivered: u64,
    /// (program, user) pairs remembered for the signed bundle.
    pub bundle_entries: usize,
    /// Verdicts in the signed offline bundle in use (0: none).
    #[serde(default)]
    pub signed_entries: usize,
    /// When that bundle expires (ms since the epoch; 0: none).
    #[serde(default)]
    pub signed_expires_ms: i64,
    /// Last error, if any.
    pub last_error: String,
    /// When the status was written (ms since the epoch).
    pub updated_ms: i64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Enforce => "enforce",
        Mode::Permissive => "permissive",
        Mode::Disabled => "disabled",
    }
}

/// The mode the module is in (`/sys/module/trustbind/parameters/current_mode`).
fn module_mode() -> Option<Mode> {
    std::fs::read_to_string("/sys/module/trustbind/parameters/current_mode")
        .ok()
        .and_then(|m| parse_mode(m.trim()))
}

/// Parses a mode name.
pub fn parse_mode(s: &str) -> Option<Mode> {
    match s {
        "enforce" => Some(Mode::Enforce),
        "permissive" => Some(Mode::Permissive),
        "disabled" => Some(Mode::Disabled),
        _ => None,
    }
}

/// How often the signed bundle is renewed while connected (also on every
/// connection and policy generation change).
pub const BUNDLE_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Deadline of one `SignBundle` call (up to 4096 decisions and a signature).
const BUNDLE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two renewals (new pairs ask for one too).
const BUNDLE_MIN_GAP: Duration = Duration::from_secs(10);

struct Inner {
    writer: DeviceWriter,
    bundle: Bundle,
    /// The verified signed bundle, the only source of offline verdicts.
    signed: Option<Verified>,
    /// Why offline answers last fell back to the mode's default (logged once).
    offline_why: Option<String>,
    spool: Spool,
    users: Users,
    mode: Mode,
    status: Status,
}

struct Shared {
    opts: RunOptions,
    inner: Mutex<Inner>,
    client: RwLock<Option<AgentClient<Channel>>>,
    connected: AtomicBool,
    generation: AtomicU64,
    /// The pinned CA (`ca.pem`): signed bundles must chain to it.
    ca: CertificateDer<'static>,
    /// This host's enrolled name: signed bundles must be for it.
    host: String,
    /// Set to have the signed bundle renewed now.
    bundle_due: Notify,
    /// A renewal is in flight (or waiting for [`BUNDLE_MIN_GAP`]).
    bundle_busy: AtomicBool,
    /// Another renewal was asked for while one was busy.
    bundle_again: AtomicBool,
    /// When the last renewal started.
    bundle_last: Mutex<Option<tokio::time::Instant>>,
    /// Channel keys and refusals pushed by the appliance, by channel id.
    keys: Keys,
    /// The protected paths last pushed (or saved from an earlier run):
    /// resolved by [`file_sets`] into the module's identities.
    file_paths: watch::Sender<Option<FilePaths>>,
    /// Program path -> owning Debian package ([`packages_index`]).
    packages: std::sync::RwLock<Arc<Packages>>,
    /// The module's session public key when it has an authority key: the
    /// appliance then seals what the module is to believe, and this agent
    /// only carries it (`trustbind_proto::seal`).
    session: Option<[u8; trustbind_proto::seal::SESSION_PUB_LEN]>,
    /// The module's `HelloAck.module_version`: told to the appliance with
    /// every batch; from [`trustbind_proto::MODULE_VERSION_TICKETS`] the
    /// module takes channel keys v2 records.
    module_version: u32,
}

impl Shared {
    /// The current package index.
    fn packages_now(&self) -> Arc<Packages> {
        self.packages
            .read()
            .map(|p| Arc::clone(&p))
            .unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock poisons it; the data is still
        // consistent enough to keep answering the kernel.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, msg: String) {
        tracing::error!("{msg}");
        self.lock().status.last_error = msg;
    }

    /// Gives the module a channel keys v2 order: the appliance's sealed
    /// one (`sealed`) as it is, or for a module without a session the bare
    /// record `bare` writes; nothing to a module older than v2 (it knows
    /// no such record), nor a bare one to a module with a session (it
    /// takes only sealed ones).
    fn v2_order(
        &self,
        sealed: &[u8],
        what: &'static str,
        bare: impl FnOnce(&mut DeviceWriter) -> Result<(), crate::device::DeviceError>,
    ) {
        if self.module_version < trustbind_proto::MODULE_VERSION_TICKETS {
            return;
        }
        let mut g = self.lock();
        let written = if !sealed.is_empty() {
            g.writer.sealed(sealed, what).map(drop)
        } else if self.session.is_none() {
            bare(&mut g.writer)
        } else {
            Ok(())
        };
        if let Err(e) = written {
            g.status.last_error = e.to_string();
            drop(g);
            tracing::error!("{what}: {e}");
        }
    }

    /// Puts the module in `mode`: the appliance's sealed order (`sealed`,
    /// written as it is) when the module has a session, else our own
    /// `Config`.
    fn set_mode(&self, mode: Mode, sealed: &[u8]) {
        let mut g = self.lock();
        // A sealed order is always written: the module may be in another
        // mode than we think (it refused our unsealed one at start).
        if g.mode == mode && sealed.is_empty() {
            return;
        }
        let timeout = self.opts.verdict_timeout_ms;
        let written = if sealed.is_empty() {
            g.writer.config(mode, timeout, self.opts.qualify_net)
        } else {
            g.writer.sealed(sealed, "write sealed Config").map(|_| ())
        };
        match written {
            Ok(()) => {
                g.mode = mode;
                g.status.mode = mode_name(mode).into();
                drop(g);
                tracing::info!("mode {}", mode_name(mode));
                let _ = write_atomic(
                    &self.opts.state.join("mode"),
                    mode_name(mode).as_bytes(),
                    0o644,
                );
            }
            Err(e) => {
                drop(g);
                self.error(format!("cannot set mode: {e}"));
            }
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT or a fatal error.
pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    let cfg = link::load_config(&opts.state)?;
    let tls = link::agent_tls(&opts.state)?;
    let mut spool = Spool::open(&opts.state.join("spool"))?;
    let bundle = Bundle::load(&opts.state, |w| tracing::warn!("{w}"));
    let ca_path = opts.state.join("ca.pem");
    let ca = CertificateDer::from_pem_file(&ca_path)
        .map_err(|e| link::LinkError::Config(format!("{}: {e}", ca_path.display())))?;
    let signed = signed::load(&opts.state, &ca, &cfg.name, now_ms()).unwrap_or_else(|e| {
        tracing::warn!("signed offline bundle not used: {e}");
        None
    });
    let mode = std::fs::read_to_string(opts.state.join("mode"))
        .ok()
        .and_then(|m| parse_mode(m.trim()))
        .unwrap_or(opts.mode);
    let mut device = Device::open(&opts.device, opts.channels_v2)?;
    let mut writer = device.writer()?;
    let mut mode = mode;
    match writer.config(mode, opts.verdict_timeout_ms, opts.qualify_net) {
        Err(crate::device::DeviceError::Io { source, .. })
            if device.session().is_some()
                && source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            // A module with a session takes a weaker mode only from the
            // appliance: it keeps its own until the sealed order comes.
            mode = module_mode().unwrap_or(Mode::Enforce);
            tracing::warn!(
                "the module stays in {} mode until the appliance orders otherwise",
                mode_name(mode)
            );
            writer.config(mode, opts.verdict_timeout_ms, opts.qualify_net)?;
        }
        other => other?,
    }
    tracing::info!(
        "{}: module v{:#x}, mode {}, {}, connects/accepts {}, appliance {} as `{}`",
        opts.device.display(),
        device.ack.module_version,
        mode_name(mode),
        if device.session().is_some() {
            "sealed records only"
        } else {
            "no authority key (the module believes this agent)"
        },
        if opts.qualify_net {
            "qualified"
        } else {
            "not asked (--no-net)"
        },
        cfg.agent_addr,
        cfg.name
    );
    let start = SpoolRecord {
        id: spool.next_id(),
        at_ms: now_ms(),
        what: "agent.start".into(),
        detail: serde_json::json!({ "version": VERSION, "mode": mode_name(mode) }),
    };
    spool.append(&[start])?;
    let status = Status {
        pid: std::process::id(),
        host: cfg.name.clone(),
        appliance: cfg.agent_addr.clone(),
        mode: mode_name(mode).into(),
        sealed: device.session().is_some(),
        ..Status::default()
    };
    let opts_state = opts.state.clone();
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            writer,
            bundle,
            signed,
            offline_why: None,
            spool,
            users: Users::new(),
            mode,
            status,
        }),
        opts,
        client: RwLock::new(None),
        connected: AtomicBool::new(false),
        generation: AtomicU64::new(0),
        ca,
        host: cfg.name.clone(),
        bundle_due: Notify::new(),
        bundle_busy: AtomicBool::new(false),
        bundle_again: AtomicBool::new(false),
        bundle_last: Mutex::new(None),
        keys: Keys::new(),
        file_paths: watch::Sender::new(load_file_paths(&opts_state).map(|paths| FilePaths {
            paths,
            order: Vec::new(),
        })),
        packages: std::sync::RwLock::new(Arc::new(Packages::default())),
        session: device.session(),
        module_version: device.ack.module_version,
    });

    let (tx, rx) = mpsc::channel::<Asked>(4096);
    let (net_tx, net_rx) = mpsc::channel::<NetEvent>(4096);
    let (closed_tx, closed_rx) = mpsc::channel::<ChannelClosed>(4096);
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<String>(1);
    std::thread::Builder::new()
        .name("device".into())
        .spawn(move || loop {
            let sent = match device.next_event() {
                Ok(Event::Exec(ev)) => tx.blocking_send(Asked::Exec(ev)).is_ok(),
                Ok(Event::File(mut ev)) => {
                    // Unless the module named the file by the appliance's
                    // path, it names it from its file system's root;
                    // policy and file sets use host paths.
                    if !ev.named {
                        ev.path = crate::files::absolute_here(ev.dev, &ev.path);
                    }
                    if let Some(to) = ev.to.as_mut().filter(|_| !ev.to_named) {
                        *to = crate::files::absolute_here(ev.dev, to);
                    }
                    tx.blocking_send(Asked::File(ev)).is_ok()
                }
                Ok(Event::Net(ev)) => net_tx.blocking_send(ev).is_ok(),
                Ok(Event::Closed(c)) => closed_tx.blocking_send(c).is_ok(),
                Err(e) => {
                    let _ = fatal_tx.blocking_send(e.to_string());
                    return;
                }
            };
            if !sent {
                return;
            }
        })
        .map_err(|e| {
            RunError::Link(link::LinkError::Config(format!(
                "cannot start the device thread: {e}"
            )))
        })?;

    tokio::spawn(batcher(Arc::clone(&shared), rx));
    tokio::spawn(net_dispatcher(Arc::clone(&shared), net_rx));
    tokio::spawn(closer(Arc::clone(&shared), closed_rx));
    tokio::spawn(connection(Arc::clone(&shared), cfg, tls));
    tokio::spawn(housekeeping(Arc::clone(&shared)));
    tokio::spawn(file_sets(Arc::clone(&shared)));
    tokio::spawn(packages_index(Arc::clone(&shared)));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| link::LinkError::Config(format!("SIGTERM handler: {e}")))?;
    let reason = tokio::select! {
        _ = term.recv() => "SIGTERM".to_owned(),
        _ = tokio::signal::ctrl_c() => "SIGINT".to_owned(),
        m = fatal_rx.recv() => format!("device: {}", m.unwrap_or_default()),
    };
    tracing::info!("stopping ({reason})");
    let mut g = shared.lock();
    if let Err(e) = g.bundle.save() {
        tracing::error!("cannot save the bundle: {e}");
    }
    g.status.connected = false;
    g.status.last_error = format!("stopped: {reason}");
    write_status(&shared.opts, &mut g);
    Ok(())
}

fn write_status(opts: &RunOptions, g: &mut Inner) {
    g.status.updated_ms = now_ms();
    g.status.bundle_entries = g.bundle.len();
    g.status.signed_entries = g.signed.as_ref().map_or(0, Verified::len);
    g.status.signed_expires_ms = g.signed.as_ref().map_or(0, |s| s.expires_at_ms);
    g.status.spool_backlog = g.spool.backlog().unwrap_or(0);
    if let Ok(json) = serde_json::to_vec_pretty(&g.status) {
        let _ = write_atomic(&opts.state.join("status.json"), &json, 0o644);
    }
}

async fn housekeeping(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        shared.keys.expire(Instant::now());
        let mut g = shared.lock();
        g.status.connected = shared.connected.load(Ordering::Relaxed);
        g.status.generation = i64::try_from(shared.generation.load(Ordering::Relaxed)).unwrap_or(0);
        if n.is_multiple_of(5) {
            if let Err(e) = g.bundle.save() {
                g.status.last_error = format!("cannot save the bundle: {e}");
            }
            g.users.refresh();
        }
        write_status(&shared.opts, &mut g);
    }
}

/// How often dpkg's file lists are checked for a change.
const PACKAGES_EVERY: Duration = Duration::from_secs(30);

/// Keeps [`Shared::packages`] current: reads dpkg's file lists at start
/// and again whenever their directory changed (checked every
/// [`PACKAGES_EVERY`]), on a blocking thread.
async fn packages_index(shared: Arc<Shared>) {
    let dir = shared.opts.dpkg_info.clone();
    let mut tick = tokio::time::interval(PACKAGES_EVERY);
    loop {
        tick.tick().await;
        let current = shared.packages_now();
        if current.lists() > 0 && !current.stale(&dir) {
            continue;
        }
        let d = dir.clone();
        let Ok(fresh) = tokio::task::spawn_blocking(move || Packages::load(&d)).await else {
            continue;
        };
        if fresh.lists() != current.lists() || fresh.len() != current.len() || current.stale(&dir) {
            tracing::info!(
                "{}: {} programs of {} packages",
                dir.display(),
                fresh.len(),
                fresh.lists()
            );
        }
        if let Ok(mut p) = shared.packages.write() {
            *p = Arc::new(fresh);
        }
    }
}

/// A request answered in batches: an exec, or an operation on a protected
/// file (both decided once per request by the appliance, both cacheable
/// by the module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// An exec.
    Exec(ExecEvent),
    /// An open, delete or rename of a protected file.
    File(FileEvent),
}

impl Asked {
    fn request_id(&self) -> u64 {
        match self {
            Asked::Exec(ev) => ev.request_id,
            Asked::File(ev) => ev.request_id,
        }
    }

    fn process(&self) -> &Process {
        match self {
            Asked::Exec(ev) => &ev.process,
            Asked::File(ev) => &ev.process,
        }
    }

    fn sha256(&self) -> &[u8; 32] {
        match self {
            Asked::Exec(ev) => &ev.sha256,
            Asked::File(ev) => &ev.sha256,
        }
    }

    /// The appliance request.
    pub fn request(&self, user: String) -> pb::Request {
        match self {
            Asked::Exec(ev) => request_of(ev, user),
            Asked::File(ev) => file_request_of(ev, user),
        }
    }

    /// The verdict for the module from the appliance's result: a file
    /// verdict carries no exec or net obligation (`nice`, CPU limit,
    /// `encrypt` mean nothing for an open), only the log level.
    pub fn verdict(&self, r: &pb::Result) -> Verdict {
        let asked = match self {
            Asked::Exec(_) => tbm::Asked::Exec,
            Asked::File(_) => tbm::Asked::File,
        };
        match tbm::answer(asked, r) {
            tbm::Answer::Verdict(v) => v,
            // Never for an exec or a file request.
            tbm::Answer::Channel { generation, .. } => deny(generation),
        }
    }

    /// The spool record's `what` and detail of an offline answer.
    fn offline_record(
        &self,
        user: &str,
        decision: Decision,
        source: &str,
        mode: Mode,
    ) -> (&'static str, serde_json::Value) {
        let p = self.process();
        let mut detail = serde_json::json!({
            "sha256": hex::encode(self.sha256()), "user": user, "uid": p.uid, "pid": p.pid,
            "decision": format!("{decision:?}").to_lowercase(),
            "source": source, "mode": mode_name(mode),
        });
        let (what, extra) = match self {
            Asked::Exec(ev) => (
                "exec.offline",
                serde_json::json!({ "path": ev.path, "loader_direct": ev.loader_direct }),
            ),
            Asked::File(ev) => (
                "file.offline",
                serde_json::json!({
                    "access": access_name(ev.access), "path": ev.path, "to": ev.to,
                    "create": ev.create, "truncate": ev.truncate, "link": ev.link,
                }),
            ),
        };
        if let (Some(d), serde_json::Value::Object(x)) = (detail.as_object_mut(), extra) {
            d.extend(x);
        }
        (what, detail)
    }

    /// Logs the refusal of this request (enforce mode).
    fn log_refusal(&self, user: &str, why: &str) {
        let p = self.process();
        let program = hex::encode(self.sha256());
        let file = match self {
            Asked::Exec(_) => String::new(),
            Asked::File(ev) => file_of(ev),
        };
        refusal::Refusal {
            action: match self {
                Asked::Exec(_) => "exec",
                Asked::File(ev) => action_name(ev),
            },
            program: &program,
            path: match self {
                Asked::Exec(ev) => &ev.path,
                Asked::File(_) => "",
            },
            user,
            uid: p.uid,
            pid: p.pid,
            dest: "",
            file: &file,
            reason: why,
        }
        .log();
    }
}

/// The protected paths the appliance pushed last.
#[derive(Debug, Clone)]
struct FilePaths {
    /// Every path of the sets, in order, without repeats.
    paths: Vec<String>,
    /// With a module session: the appliance's sealed `FileSetPaths` order
    /// for the module (empty without). Not saved: it is sealed to this
    /// module session, and the appliance sends it again on `Subscribe`.
    order: Vec<u8>,
}

/// The last pushed protected paths, in the state directory.
const FILE_SETS_FILE: &str = "file_sets.json";

/// The protected paths saved by an earlier run (`None`: none saved).
fn load_file_paths(state: &std::path::Path) -> Option<Vec<String>> {
    let bytes = std::fs::read(state.join(FILE_SETS_FILE)).ok()?;
    serde_json::from_slice(&bytes)
        .map_err(|e| tracing::warn!("{FILE_SETS_FILE}: {e}: waiting for the appliance's sets"))
        .ok()
}

/// Resolves the protected paths into identities (on each push and every
/// [`files::RESOLVE_EVERY`]) and gives the module the result whenever it
/// changed. The module starts empty when it is loaded again, and the
/// agent with it (a closed device stops the agent; its restart sends the
/// saved sets at once). With a module session it also writes the
/// appliance's sealed order of the paths each time: the module resolves
/// them itself (the identities root cannot take away, T-102), and the
/// agent's identities only add the roots of mounts below them.
async fn file_sets(shared: Arc<Shared>) {
    let mut paths_rx = shared.file_paths.subscribe();
    let mut tick = tokio::time::interval(files::RESOLVE_EVERY);
    let mut tracker = Tracker::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = paths_rx.changed() => if changed.is_err() { return },
        }
        let Some(FilePaths { paths, order }) = paths_rx.borrow_and_update().clone() else {
            continue;
        };
        if !order.is_empty() {
            sealed_paths(&shared, order).await;
        }
        // stat may block (a hung network file system): off the runtime.
        let Ok(res) = tokio::task::spawn_blocking(move || files::resolve_here(&paths)).await else {
            continue;
        };
        let plan = tracker.plan(res);
        for m in &plan.newly_missing {
            tracing::warn!(
                "protected path {}: {}: not protected until it resolves (tried again every {} s)",
                m.path,
                m.why,
                files::RESOLVE_EVERY.as_secs()
            );
        }
        for p in &plan.found {
            tracing::info!("protected path {p} resolved");
        }
        if let Some(e) = plan.error {
            shared.error(e);
        }
        let Some(ids) = plan.send else { continue };
        let mut g = shared.lock();
        match g.writer.file_sets(&ids) {
            Ok(()) => {
                g.status.protected_files = ids.len();
                drop(g);
                tracing::info!("module given {} protected identities", ids.len());
                tracker.sent(ids);
            }
            Err(e) => {
                drop(g);
                if let Some(e) =
                    tracker.send_failed(format!("protected file sets not given to the module: {e}"))
                {
                    shared.error(e);
                }
            }
        }
    }
}

/// Writes the appliance's sealed `FileSetPaths` order to the module, on a
/// descriptor of its own off the runtime: the module walks the paths
/// during the write, which a hung network file system can stall, and
/// verdicts must not wait behind it.
async fn sealed_paths(shared: &Arc<Shared>, order: Vec<u8>) {
    let writer = shared.lock().writer.try_clone();
    let sent = match writer {
        Ok(mut w) => {
            tokio::task::spawn_blocking(move || w.sealed(&order, "write sealed FileSetPaths"))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
        }
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = sent {
        shared.error(format!(
            "the appliance's protected paths not given to the module: {e}"
        ));
    }
}

/// Collects requests into batches and answers them.
async fn batcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Asked>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + shared.opts.batch_wait;
        while batch.len() < shared.opts.batch_max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) => batch.push(ev),
                Ok(None) | Err(_) => break,
            }
        }
        answer(&shared, batch).await;
    }
}

/// Who asks, for the appliance (the same for every action).
fn subject_of(p: &Process, user: String) -> pb::Subject {
    pb::Subject {
        user,
        uid: p.uid,
        euid: p.euid,
        gid: p.gid,
        loginuid: p.loginuid,
        session: p.sessionid,
        pid: p.pid,
        ancestry: p.ancestry.iter().map(|h| h.to_vec()).collect(),
    }
}

/// A program the module names by its SHA-256 only (net, IPC and file
/// requests: no SHA-1, size or path).
fn program_by_hash(sha256: &[u8; 32]) -> pb::Program {
    pb::Program {
        sha256: sha256.to_vec(),
        sha1: Vec::new(),
        size: 0,
        path: String::new(),
        package: String::new(),
    }
}

fn request_of(ev: &ExecEvent, user: String) -> pb::Request {
    pb::Request {
        id: ev.request_id,
        action: pb::Action::Exec as i32,
        subject: Some(subject_of(&ev.process, user)),
        program: Some(pb::Program {
            sha256: ev.sha256.to_vec(),
            sha1: ev.sha1.to_vec(),
            size: ev.size,
            path: ev.path.clone(),
            package: String::new(),
        }),
        target: Some(pb::request::Target::Exec(pb::ExecTarget {
            loader_direct: ev.loader_direct,
        })),
        peer: None,
        module_request: ev.module_request.clone(),
    }
}

/// `read`, `write`, `delete` or `rename` (spool records).
fn access_name(a: FileAccess) -> &'static str {
    match a {
        FileAccess::Read => "read",
        FileAccess::Write => "write",
        FileAccess::Delete => "delete",
        FileAccess::Rename => "rename",
    }
}

/// The refusal line's action: the policy's name (`open_read`,
/// `open_write`, `delete`, `rename`), `link` for a new hard link.
fn action_name(ev: &FileEvent) -> &'static str {
    if ev.link {
        return "link";
    }
    match ev.access {
        FileAccess::Read => "open_read",
        FileAccess::Write => "open_write",
        FileAccess::Delete => "delete",
        FileAccess::Rename => "rename",
    }
}

/// The file (and the new name of a rename or link) for logs.
fn file_of(ev: &FileEvent) -> String {
    match &ev.to {
        Some(to) => format!("{} -> {to}", ev.path),
        None => ev.path.clone(),
    }
}

/// The appliance request for an operation on a protected file: the
/// program by hash only (as for net requests), the paths absolute on this
/// host (mapped from the module's paths by `files::absolute_here`).
pub fn file_request_of(ev: &FileEvent, user: String) -> pb::Request {
    pb::Request {
        id: ev.request_id,
        action: tbm::file_action(ev.access) as i32,
        subject: Some(subject_of(&ev.process, user)),
        program: Some(program_by_hash(&ev.sha256)),
        target: Some(pb::request::Target::File(pb::FileTarget {
            path: ev.path.clone(),
            to: ev.to.clone(),
            create: ev.create,
            truncate: ev.truncate,
            link: ev.link,
        })),
        peer: None,
        module_request: ev.module_request.clone(),
    }
}

fn remembered_of(v: &Verdict) -> Remembered {
    Remembered {
        decision: v.decision as u8,
        nice: v.obligations.nice,
        cpu_limit_s: v.obligations.cpu_limit_s,
        log_level: v.obligations.log_level,
        generation: i64::try_from(v.policy_generation).unwrap_or(0),
        at_ms: now_ms(),
    }
}

/// The signed bundle's verdict for `sha256` run by `user`, if a usable
/// bundle has one. Why no bundle is usable is logged once per reason.
fn signed_verdict(g: &mut Inner, sha256: &str, user: &str) -> Option<Verdict> {
    let usable = match &g.signed {
        None => Err("no signed offline bundle from the appliance yet".to_owned()),
        Some(b) => b
            .check_fresh(now_ms())
            .map(|()| b)
            .map_err(|e| format!("the signed offline bundle {e}")),
    };
    match usable {
        Ok(b) => {
            let v = b.get(sha256, user).map(|decision| Verdict {
                decision,
                policy_generation: u64::try_from(b.generation).unwrap_or(0),
                // Offline answers never enter the kernel cache.
                cacheable: false,
                obligations: Obligations::default(),
            });
            g.offline_why = None;
            v
        }
        Err(why) => {
            if g.offline_why.as_deref() != Some(why.as_str()) {
                tracing::warn!("offline answers use the mode's default: {why}");
                g.offline_why = Some(why);
            }
            None
        }
    }
}

/// Arms `RLIMIT_CPU` on `pid` before its exec is let go.
fn apply_cpu_limit(pid: u32, seconds: u32) -> Result<(), String> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| format!("bad pid {pid}"))?;
    let lim = rustix::process::Rlimit {
        current: Some(u64::from(seconds)),
        maximum: Some(u64::from(seconds) + 1),
    };
    rustix::process::prlimit(Some(pid), rustix::process::Resource::Cpu, lim)
        .map(drop)
        .map_err(|e| format!("prlimit(RLIMIT_CPU) on pid {pid:?}: {e}"))
}

/// Makes the call `call` (named `what`) on the appliance, within
/// `timeout`. `Err(None)`: no session at the moment of asking.
async fn ask<T, F, Fut>(
    shared: &Shared,
    timeout: Duration,
    what: &str,
    call: F,
) -> Result<T, Option<String>>
where
    F: FnOnce(AgentClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let client = shared.client.read().await.clone();
    let Some(client) = client else {
        return Err(None);
    };
    match tokio::time::timeout(timeout, call(client)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(Some(format!("{what}: {}: {}", s.code(), s.message()))),
        Err(_) => Err(Some(format!("{what}: deadline exceeded"))),
    }
}

/// The module's session public key, for the appliance to seal for.
fn module_session(shared: &Shared) -> Vec<u8> {
    shared.session.map(|s| s.to_vec()).unwrap_or_default()
}

/// Asks the appliance, within `timeout`. `Err(None)`: no session at the
/// moment of asking.
async fn qualify(
    shared: &Shared,
    requests: Vec<pb::Request>,
    timeout: Duration,
) -> Result<Vec<pb::Result>, Option<String>> {
    let mut req = tonic::Request::new(pb::QualifyBatch {
        requests,
        module_session: module_session(shared),
        module_version: shared.module_version,
    });
    req.set_timeout(timeout);
    ask(shared, timeout, "Qualify", |mut c| async move {
        c.qualify(req).await
    })
    .await
    .map(|b| b.results)
}

/// The `Listen` call for a channel keys v2 listen `ev`: the module's
/// record with the fields made of it.
pub fn listen_request_of(ev: &NetEvent, user: String, session: Vec<u8>) -> pb::ListenRequest {
    let sealed = !ev.module_request.is_empty();
    pb::ListenRequest {
        subject: Some(subject_of(&ev.process, user)),
        program: Some(program_by_hash(&ev.sha256)),
        port: u32::from(ev.dst_port),
        module_request: ev.module_request.clone(),
        module_session: if sealed { session } else { Vec::new() },
    }
}

/// Registers the listen `ev` with the appliance (`Agent.Listen`), within
/// `timeout`: the verdict, why, and the sealed answer (empty for a module
/// without a session). `Err(None)`: no session at the moment of asking.
async fn listen(
    shared: &Shared,
    ev: &NetEvent,
    user: String,
    timeout: Duration,
) -> Result<(Verdict, String, Vec<u8>), Option<String>> {
    let mut req = tonic::Request::new(listen_request_of(ev, user, module_session(shared)));
    req.set_timeout(timeout);
    let r = ask(shared, timeout, "Listen", |mut c| async move {
        c.listen(req).await
    })
    .await?;
    Ok((
        tbm::listen_verdict(r.allowed, r.channel, r.generation),
        refusal::online_reason(&r.reasons),
        r.module_answer,
    ))
}

async fn answer(shared: &Shared, batch: Vec<Asked>) {
    let users: Vec<String> = {
        let mut g = shared.lock();
        batch
            .iter()
            .map(|a| g.users.name(a.process().uid))
            .collect()
    };
    let packages = shared.packages_now();
    let requests: Vec<pb::Request> = batch
        .iter()
        .zip(&users)
        .map(|(a, u)| {
            let mut r = a.request(u.clone());
            if let (Asked::Exec(ev), Some(p)) = (a, r.program.as_mut()) {
                if let Some(owner) = packages.owner(&ev.path) {
                    owner.clone_into(&mut p.package);
                }
            }
            r
        })
        .collect();
    let timeout = shared.opts.call_timeout;
    let mut asked = qualify(shared, requests.clone(), timeout).await;
    if matches!(asked, Err(None)) && shared.client.read().await.is_some() {
        // The session came up (and may have changed the mode) while this
        // batch was being prepared: ask it rather than answer offline.
        asked = qualify(shared, requests, timeout).await;
    }
    let mut online = match asked.map_err(|e| e.unwrap_or_else(|| "not connected".into())) {
        Ok(results) => {
            if !shared.connected.swap(true, Ordering::Relaxed) {
                tracing::info!("appliance answering again");
            }
            Some(
                results
                    .into_iter()
                    .map(|r| (r.id, r))
                    .collect::<HashMap<u64, pb::Result>>(),
            )
        }
        Err(e) => {
            if shared.connected.swap(false, Ordering::Relaxed) {
                shared.error(format!("appliance unreachable, answering offline: {e}"));
            }
            None
        }
    };
    let mut g = shared.lock();
    let mut offline_records = Vec::new();
    let mut new_pairs = false;
    let mut answers = Vec::with_capacity(batch.len());
    for (a, user) in batch.iter().zip(users) {
        let sha = hex::encode(a.sha256());
        // Each result is taken once: its sealed answer moves, not copied.
        let mut from_appliance = online.as_mut().and_then(|m| m.remove(&a.request_id()));
        let sealed = from_appliance
            .as_mut()
            .map(|r| std::mem::take(&mut r.module_answer))
            .unwrap_or_default();
        let (v, why) = match from_appliance.as_ref() {
            Some(r) => {
                let v = a.verdict(r);
                // The bundle holds (program, user) verdicts for execs only.
                if matches!(a, Asked::Exec(_))
                    && r.cacheable
                    && g.bundle.put(&sha, &user, remembered_of(&v))
                {
                    new_pairs = true;
                }
                g.status.answered_online += 1;
                (v, refusal::online_reason(&r.reasons))
            }
            None => {
                // The signed bundle holds exec verdicts for programs (and
                // the loader as every program's loader), never for the
                // loader run directly, nor for files: those follow the mode.
                let bundled = match a {
                    Asked::Exec(ev) if !ev.loader_direct => signed_verdict(&mut g, &sha, &user),
                    Asked::Exec(_) | Asked::File(_) => None,
                };
                let (v, source) = match bundled {
                    Some(v) => (v, "bundle"),
                    None => (offline_default(g.mode), "default"),
                };
                g.status.answered_offline += 1;
                let (what, detail) = a.offline_record(&user, v.decision, source, g.mode);
                let id = g.spool.next_id();
                offline_records.push(SpoolRecord {
                    id,
                    at_ms: now_ms(),
                    what: what.into(),
                    detail,
                });
                let why = if source == "bundle" {
                    refusal::OFFLINE_BUNDLE
                } else {
                    refusal::OFFLINE_DEFAULT
                };
                (v, why.to_owned())
            }
        };
        let denied = v.decision == Decision::Deny;
        match a {
            Asked::Exec(_) => g.status.requests += 1,
            Asked::File(_) => {
                g.status.file_requests += 1;
                g.status.file_denied += u64::from(denied);
            }
        }
        if denied {
            g.status.denied += 1;
            if g.mode == Mode::Enforce {
                a.log_refusal(&user, &why);
            }
        }
        let cpu_limit = match a {
            Asked::Exec(_) => v.obligations.cpu_limit_s,
            Asked::File(_) => None,
        };
        answers.push((a.request_id(), a.process().pid, cpu_limit, v, sealed));
    }
    if new_pairs {
        // Into the signed bundle soon, so they can be answered offline.
        shared.bundle_due.notify_one();
    }
    // The appliance learns of offline decisions only through the spool:
    // make them durable before the kernel acts on them.
    if let Err(e) = g.spool.append(&offline_records) {
        g.status.last_error = format!("spool: {e}");
        tracing::error!("{}", g.status.last_error);
    }
    for (id, pid, cpu_limit, v, sealed) in answers {
        if let (Decision::Allow | Decision::AllowWithConditions, Some(s)) = (v.decision, cpu_limit)
        {
            if let Err(e) = apply_cpu_limit(pid, s) {
                g.status.last_error = e;
            }
        }
        // The module believes the appliance's sealed answer, not ours.
        let sent = if sealed.is_empty() {
            g.writer.verdict(id, v)
        } else {
            g.writer.sealed(&sealed, "write sealed Verdict")
        };
        note_sent(&mut g, sent);
    }
}

/// The offline answer when nothing better is known: deny in enforce mode,
/// allow otherwise; never cached by the module (it would outlive the
/// appliance's return).
fn offline_default(mode: Mode) -> Verdict {
    Verdict {
        decision: if mode == Mode::Enforce {
            Decision::Deny
        } else {
            Decision::Allow
        },
        policy_generation: 0,
        cacheable: false,
        obligations: Obligations::default(),
    }
}

/// Time kept from the kernel's verdict timeout for a net answer to reach
/// the module before it gives up.
pub fn net_margin(verdict_timeout: Duration) -> Duration {
    (verdict_timeout / 10).clamp(Duration::from_millis(50), Duration::from_millis(500))
}

/// The appliance request for a connect or accept: the program is known
/// only by its SHA-256 (no SHA-1, size or path from the kernel). A UNIX
/// connect is `ACTION_IPC_CONNECT` to `NetTarget { proto: UNIX, dst_addr:
/// <path or @name> }` with the listener's program as `peer`.
pub fn net_request_of(ev: &NetEvent, user: String) -> pb::Request {
    let program = program_by_hash;
    let subject = subject_of(&ev.process, user);
    if let Some(ipc) = &ev.ipc {
        return pb::Request {
            id: ev.request_id,
            action: pb::Action::IpcConnect as i32,
            subject: Some(subject),
            program: Some(program(&ev.sha256)),
            target: Some(pb::request::Target::Net(pb::NetTarget {
                proto: pb::Proto::Unix as i32,
                src_addr: String::new(),
                src_port: 0,
                dst_addr: ipc.path.clone(),
                dst_port: 0,
                established: false,
            })),
            peer: Some(program(&ipc.sha256)),
            module_request: ev.module_request.clone(),
        };
    }
    let action = tbm::net_action(ev.kind);
    pb::Request {
        id: ev.request_id,
        action: action as i32,
        subject: Some(subject),
        program: Some(program(&ev.sha256)),
        target: Some(pb::request::Target::Net(pb::NetTarget {
            proto: pb::Proto::Tcp as i32,
            src_addr: ev.src_addr.to_string(),
            src_port: u32::from(ev.src_port),
            dst_addr: ev.dst_addr.to_string(),
            dst_port: u32::from(ev.dst_port),
            established: ev.kind == NetKind::Established,
        })),
        peer: None,
        module_request: ev.module_request.clone(),
    }
}

fn kind_name(k: NetKind) -> &'static str {
    match k {
        NetKind::Connect => "connect",
        NetKind::Established => "established",
        NetKind::Accept => "accept",
        NetKind::Listen => "listen",
    }
}

/// `connect`, `established`, `accept` or `ipc_connect` (UNIX).
fn event_name(ev: &NetEvent) -> &'static str {
    if ev.ipc.is_some() {
        "ipc_connect"
    } else {
        kind_name(ev.kind)
    }
}

/// The client end for logs (the process id for a UNIX connect).
fn src_of(ev: &NetEvent) -> String {
    match &ev.ipc {
        Some(_) => format!("pid {}", ev.process.pid),
        None => format!("{}:{}", ev.src_addr, ev.src_port),
    }
}

/// The server end for logs (the socket's name and the listener's program
/// for a UNIX connect).
fn dst_of(ev: &NetEvent) -> String {
    match &ev.ipc {
        Some(p) => format!(
            "{} (pid {}, sha256 {})",
            p.path,
            p.pid,
            hex::encode(p.sha256)
        ),
        None => format!("{}:{}", ev.dst_addr, ev.dst_port),
    }
}

/// Answers each net request on its own task, beside the exec batches.
async fn net_dispatcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<NetEvent>) {
    while let Some(ev) = rx.recv().await {
        let received = tokio::time::Instant::now();
        tokio::spawn(answer_net(Arc::clone(&shared), ev, received));
    }
}

async fn answer_net(shared: Arc<Shared>, ev: NetEvent, received: tokio::time::Instant) {
    let timeout = Duration::from_millis(u64::from(shared.opts.verdict_timeout_ms));
    let deadline = received + timeout.saturating_sub(net_margin(timeout));
    let user = shared.lock().users.name(ev.process.uid);
    let req = net_request_of(&ev, user.clone());
    let budget = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_millis(1));
    let asked = if ev.kind == NetKind::Listen && ev.ipc.is_none() {
        // Channel keys v2: registered, not qualified.
        listen(&shared, &ev, user.clone(), budget)
            .await
            .map(|(v, why, sealed)| Some((tbm::Answer::Verdict(v), why, sealed, None)))
    } else {
        qualify(&shared, vec![req], budget).await.map(|results| {
            results
                .into_iter()
                .find(|r| r.id == ev.request_id)
                .map(|r| net_plan(&ev, r))
        })
    };
    let plan = match asked {
        Ok(plan) => plan,
        Err(e) => {
            if let Some(e) = e {
                tracing::warn!(
                    "{} {} -> {}: answering offline: {e}",
                    event_name(&ev),
                    src_of(&ev),
                    dst_of(&ev)
                );
            }
            None
        }
    };
    let (answer, why, mut sealed, mut grant) = match plan {
        Some((tbm::Answer::Verdict(v), why, sealed, grant)) => (Ok(v), why, sealed, grant),
        Some((
            tbm::Answer::Channel {
                channel_id,
                generation,
            },
            _,
            _,
            _,
        )) => match shared.keys.wait(channel_id, deadline).await {
            Some(Pushed::Key(h)) => (Err(h), String::new(), Vec::new(), None),
            Some(Pushed::Denied(why)) => {
                tracing::info!("channel {channel_id} refused: {why}");
                (
                    Ok(deny(generation)),
                    format!("channel {channel_id} refused by the appliance: {why}"),
                    Vec::new(),
                    None,
                )
            }
            None => {
                tracing::warn!("channel {channel_id}: no key in time");
                (
                    Ok(deny(generation)),
                    format!("channel {channel_id}: no key from the appliance in time"),
                    Vec::new(),
                    None,
                )
            }
        },
        None => {
            // Offline (or no result): the mode's default, never a key.
            let mut g = shared.lock();
            let v = offline_default(g.mode);
            let decision = v.decision;
            let id = g.spool.next_id();
            let rec = SpoolRecord {
                id,
                at_ms: now_ms(),
                what: "net.offline".into(),
                detail: serde_json::json!({
                    "kind": event_name(&ev),
                    "src": src_of(&ev),
                    "dst": dst_of(&ev),
                    "sha256": hex::encode(ev.sha256), "user": user, "uid": ev.process.uid,
                    "pid": ev.process.pid,
                    "decision": format!("{decision:?}").to_lowercase(),
                    "source": "default", "mode": mode_name(g.mode),
                }),
            };
            if let Err(e) = g.spool.append(&[rec]) {
                g.status.last_error = format!("spool: {e}");
            }
            g.status.answered_offline += 1;
            g.status.net_requests += 1;
            if decision == Decision::Deny {
                g.status.denied += 1;
                net_refusal(&ev, &user, refusal::OFFLINE_DEFAULT);
            }
            let sent = g.writer.verdict(ev.request_id, v);
            note_sent(&mut g, sent);
            return;
        }
    };
    let mut g = shared.lock();
    g.status.answered_online += 1;
    g.status.net_requests += 1;
    let sent = match answer {
        Ok(v) => {
            if v.decision == Decision::Deny {
                g.status.denied += 1;
                if g.mode == Mode::Enforce {
                    net_refusal(&ev, &user, &why);
                }
            }
            // A sealed answer is a verdict or (channel keys v2) a grant;
            // an unsealed grant is written bare.
            if let Some(grant) = grant.as_mut() {
                g.status.channel_keys += 1;
                g.writer.grant(ev.request_id, grant)
            } else if sealed.is_empty() {
                g.writer.verdict(ev.request_id, v)
            } else {
                g.writer.sealed(&sealed, "write sealed answer")
            }
        }
        Err(mut h) => {
            g.status.channel_keys += 1;
            // The writer wipes the key it is given and its encoding; `h`
            // wipes itself (and its sealed copy) when dropped.
            if h.sealed().is_empty() {
                g.writer.channel_key(ev.request_id, h.key_mut())
            } else {
                g.writer.sealed(h.sealed(), "write sealed ChannelKey")
            }
        }
    };
    note_sent(&mut g, sent);
    drop(g);
    // A sealed grant holds the pair secret.
    zeroize::Zeroize::zeroize(&mut sealed);
    if let Some(grant) = grant.as_mut() {
        grant.wipe();
    }
}

/// What the appliance's result `r` to the net request `ev` makes the
/// module's answer: the answer, why, the sealed answer (a verdict, or a
/// channel keys v2 grant: written as it is) and an unsealed grant (for a
/// module without a session, written bare). The result's copies of the
/// pair secret are wiped; a grant that does not make a record is a deny.
fn net_plan(ev: &NetEvent, mut r: pb::Result) -> NetPlan {
    let asked = if ev.ipc.is_some() {
        tbm::Asked::Ipc
    } else {
        tbm::Asked::Net(ev.kind)
    };
    let sealed = std::mem::take(&mut r.module_answer);
    let why = refusal::online_reason(&r.reasons);
    let answer = tbm::answer(asked, &r);
    let Some(mut reply) = r.grant.take() else {
        return (answer, why, sealed, None);
    };
    let grant = tbm::grant_of(&reply);
    zeroize::Zeroize::zeroize(&mut reply.pair_secret);
    match grant {
        Ok(g) => (answer, why, sealed, Some(g)),
        Err(e) => {
            let generation = u64::try_from(r.generation).unwrap_or(0);
            (
                tbm::Answer::Verdict(deny(generation)),
                format!("the appliance's grant is not usable: {e}"),
                Vec::new(),
                None,
            )
        }
    }
}

/// See [`net_plan`].
type NetPlan = (tbm::Answer, String, Vec<u8>, Option<trustbind_proto::Grant>);

/// Logs a refused network request (the module gives its program by hash only).
fn net_refusal(ev: &NetEvent, user: &str, why: &str) {
    refusal::Refusal {
        action: event_name(ev),
        program: &hex::encode(ev.sha256),
        path: "",
        user,
        uid: ev.process.uid,
        pid: ev.process.pid,
        dest: &dst_of(ev),
        file: "",
        reason: why,
    }
    .log();
}

fn note_sent(g: &mut Inner, sent: Result<bool, crate::device::DeviceError>) {
    match sent {
        Ok(true) => {}
        Ok(false) => g.status.late += 1,
        Err(e) => g.status.last_error = e.to_string(),
    }
}

/// The spool record of one channel end's close: the appliance takes a
/// reported `channel.close` as that end's close record (channels table,
/// `channel.close` audit row); the spool makes it durable and delivers it
/// whenever the appliance is reachable (`Report`, idempotent by id).
pub fn close_record(id: String, at_ms: i64, c: &ChannelClosed) -> SpoolRecord {
    SpoolRecord {
        id,
        at_ms,
        what: "channel.close".into(),
        detail: serde_json::json!({
            "channel_id": c.channel_id,
            "key_id": hex::encode(c.key_id),
            "role": match c.role {
                ChannelRole::Connect => "connect",
                ChannelRole::Accept => "accept",
            },
            "bytes_sent": c.bytes_sent,
            "bytes_received": c.bytes_received,
            "duration_ms": c.duration_ms,
            "reason": match c.reason {
                CloseReason::Closed => "closed",
                CloseReason::Idle => "idle",
            },
        }),
    }
}

/// Spools the module's channel close records, as many as are waiting in
/// one append (one `fdatasync`).
async fn closer(shared: Arc<Shared>, mut rx: mpsc::Receiver<ChannelClosed>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let shared = Arc::clone(&shared);
        let _ = tokio::task::spawn_blocking(move || {
            let mut g = shared.lock();
            let at = now_ms();
            let records: Vec<SpoolRecord> = batch
                .iter()
                .map(|c| {
                    let id = g.spool.next_id();
                    close_record(id, at, c)
                })
                .collect();
            for c in &batch {
                tracing::info!(
                    "channel {} closed ({:?} end): sent {} received {} bytes in {} ms",
                    c.channel_id,
                    c.role,
                    c.bytes_sent,
                    c.bytes_received,
                    c.duration_ms
                );
            }
            match g.spool.append(&records) {
                Ok(()) => g.status.channels_closed += records.len() as u64,
                Err(e) => g.status.last_error = format!("spool: {e}"),
            }
        })
        .await;
    }
}

/// First wait before reconnecting.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
/// Longest wait before reconnecting.
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// A session that lasted this long starts the waits over.
const RECONNECT_STABLE: Duration = Duration::from_secs(30);

/// The waits between reconnects: doubling from [`RECONNECT_MIN`], each
/// with up to as much again of random jitter (so a fleet that lost the
/// appliance at once does not come back at once), never above
/// [`RECONNECT_MAX`]; endless.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(RECONNECT_MIN)
        .with_max_delay(RECONNECT_MAX / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .map(|d| d.min(RECONNECT_MAX))
}

/// Keeps the session up: connect, subscribe, deliver the spool, follow
/// pushes; on any failure back off (with jitter) and start again.
async fn connection(shared: Arc<Shared>, cfg: AgentConfig, mut tls: rustls::ClientConfig) {
    let mut backoff = reconnect_backoff();
    loop {
        // A renewal replaced the credentials: connect with the new ones.
        match link::agent_tls(&shared.opts.state) {
            Ok(t) => tls = t,
            Err(e) => shared.error(format!(
                "credentials not reloaded, keeping the old ones: {e}"
            )),
        }
        let started = Instant::now();
        match session(&shared, &cfg, tls.clone()).await {
            Ok(()) => {}
            Err(e) => {
                shared.error(e);
            }
        }
        *shared.client.write().await = None;
        shared.connected.store(false, Ordering::Relaxed);
        if started.elapsed() > RECONNECT_STABLE {
            backoff = reconnect_backoff();
        }
        tokio::time::sleep(backoff.next().unwrap_or(RECONNECT_MAX)).await;
    }
}

async fn session(
    shared: &Arc<Shared>,
    cfg: &AgentConfig,
    tls: rustls::ClientConfig,
) -> Result<(), String> {
    let ch = link::channel(&cfg.agent_addr, &cfg.server_name, tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = AgentClient::new(ch);
    let hello = pb::Hello {
        agent_version: VERSION.into(),
        generation: i64::try_from(shared.generation.load(Ordering::Relaxed)).unwrap_or(0),
        module_session: shared.session.map(|s| s.to_vec()).unwrap_or_default(),
        verdict_timeout_ms: shared.opts.verdict_timeout_ms,
        qualify_net: shared.opts.qualify_net,
    };
    let mut stream = client
        .subscribe(hello)
        .await
        .map_err(|s| format!("Subscribe: {}: {}", s.code(), s.message()))?
        .into_inner();
    *shared.client.write().await = Some(client.clone());
    shared.connected.store(true, Ordering::Relaxed);
    tracing::info!("connected to {}", cfg.agent_addr);
    let mut deliver = tokio::time::interval(Duration::from_secs(2));
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + BUNDLE_REFRESH, BUNDLE_REFRESH);
    // The certificate's expiry: checked now and twice a day.
    let mut cert_check = tokio::time::interval(CERT_CHECK);
    // A fresh signed bundle on every connection.
    shared.bundle_due.notify_one();
    loop {
        tokio::select! {
            _ = cert_check.tick() => {
                if renew_certificate(shared, cfg, &mut client).await? {
                    return Err("host certificate renewed; reconnecting with it".into());
                }
            }
            _ = renew.tick() => renew_bundle(shared, &client),
            () = shared.bundle_due.notified() => renew_bundle(shared, &client),
            m = stream.message() => {
                let Some(p) = m.map_err(|s| format!("push stream: {}: {}", s.code(), s.message()))? else {
                    return Err("push stream ended".into());
                };
                if let Some(kind) = p.kind {
                    on_push(shared, kind)?;
                }
            }
            _ = deliver.tick() => deliver_spool(shared, &mut client).await?,
        }
    }
}

/// How often a connected agent checks its certificate's expiry.
const CERT_CHECK: Duration = Duration::from_secs(12 * 3600);

/// Renews the host certificate over this session if fewer than
/// `--renew-days` remain; `Ok(true)` once renewed (the caller reconnects
/// with the new credentials). A refused or failed renewal is logged and
/// tried again at the next check or connection.
async fn renew_certificate(
    shared: &Shared,
    cfg: &AgentConfig,
    client: &mut AgentClient<Channel>,
) -> Result<bool, String> {
    let state = &shared.opts.state;
    let not_after = link::cert_not_after_ms(state).map_err(|e| e.to_string())?;
    if !link::renewal_due(not_after, now_ms(), shared.opts.renew_days) {
        return Ok(false);
    }
    match link::renew(
        client,
        state,
        &cfg.name,
        shared.opts.call_timeout.max(Duration::from_secs(10)),
    )
    .await
    {
        Ok(new) => {
            tracing::info!("host certificate renewed, valid until {new} ms");
            Ok(true)
        }
        Err(e) => {
            shared.error(format!(
                "host certificate expires at {not_after} ms and was not renewed: {e}"
            ));
            Ok(false)
        }
    }
}

fn on_push(shared: &Shared, kind: push::Kind) -> Result<(), String> {
    match kind {
        push::Kind::Generation(g) => {
            let gen = u64::try_from(g.generation).unwrap_or(0);
            let old = shared.generation.swap(gen, Ordering::Relaxed);
            if old != gen {
                // Verdicts may have changed: have the bundle re-decided,
                // without waiting for the gap between renewals.
                *shared.bundle_last.lock().unwrap_or_else(|e| e.into_inner()) = None;
                shared.bundle_due.notify_one();
                let mut w = shared.lock();
                if let Err(e) = w.writer.generation(gen) {
                    w.status.last_error = e.to_string();
                }
                drop(w);
                tracing::info!("policy generation {gen}");
            }
        }
        push::Kind::HostMode(m) => match parse_mode(&m.mode) {
            Some(mode) => shared.set_mode(mode, &m.module_order),
            None => shared.error(format!("appliance sent unknown mode `{}`", m.mode)),
        },
        push::Kind::Revoked(_) => {
            return Err("this host's certificate was revoked by the appliance".into())
        }
        push::Kind::ChannelKey(mut k) => {
            // Held for the request naming this channel; never logged.
            let pushed = match keys::from_push(&mut k) {
                Ok(h) => Pushed::Key(h),
                Err(e) => {
                    shared.error(format!("channel {}: bad key message: {e}", k.channel_id));
                    Pushed::Denied(format!("bad key message: {e}"))
                }
            };
            shared.keys.put(k.channel_id, pushed, Instant::now());
        }
        push::Kind::ChannelDenied(d) => {
            tracing::info!("channel {} denied: {}", d.channel_id, d.reason);
            shared
                .keys
                .put(d.channel_id, Pushed::Denied(d.reason), Instant::now());
        }
        push::Kind::Peers(p) => {
            let (addrs, bad) = tbm::parse_peers(&p.addrs);
            for a in bad {
                shared.error(format!("appliance sent a bad peer address `{a}`"));
            }
            let mut w = shared.lock();
            let sent = if p.module_order.is_empty() {
                w.writer.peers(&addrs)
            } else {
                w.writer
                    .sealed(&p.module_order, "write sealed Peers")
                    .map(|_| ())
            };
            if let Err(e) = sent {
                w.status.last_error = e.to_string();
            }
            drop(w);
            tracing::info!("protected hosts: {}", addrs.len());
        }
        push::Kind::FileSets(f) => {
            let paths = tbm::paths_of(&f);
            tracing::info!(
                "protected file sets: {} ({} paths)",
                f.sets.len(),
                paths.len()
            );
            // Kept for the next start, so the module is given the sets
            // before the appliance is reachable again.
            let json = serde_json::to_vec(&paths).unwrap_or_default();
            if let Err(e) = write_atomic(&shared.opts.state.join(FILE_SETS_FILE), &json, 0o600) {
                shared.error(format!("cannot save the protected file sets: {e}"));
            }
            shared.file_paths.send_replace(Some(FilePaths {
                paths,
                order: f.module_order,
            }));
        }
        push::Kind::Ping(_) => {}
        // Channel keys v2 (docs/CHANNEL-KEYS-V2.md): to the module as the
        // appliance sealed them, or bare for a module without a session;
        // the host keys' bytes are wiped once written. Never logged.
        push::Kind::HostKeys(mut k) => {
            shared.v2_order(&k.module_order, "write sealed HostKeys", |w| {
                w.host_keys(&k.record)
            });
            zeroize::Zeroize::zeroize(&mut k.record);
            zeroize::Zeroize::zeroize(&mut k.module_order);
        }
        push::Kind::Revocations(r) => {
            shared.v2_order(&r.module_order, "write sealed Revocations", |w| {
                w.revocations(&r.record)
            });
        }
    }
    Ok(())
}

async fn deliver_spool(shared: &Shared, client: &mut AgentClient<Channel>) -> Result<(), String> {
    loop {
        let seg = {
            let mut g = shared.lock();
            g.spool.oldest().map_err(|e| format!("spool: {e}"))?
        };
        let Some(seg) = seg else { return Ok(()) };
        for chunk in seg.records.chunks(256) {
            let records = chunk
                .iter()
                .map(|r| pb::AuditRecord {
                    id: r.id.clone(),
                    at_ms: r.at_ms,
                    what: r.what.clone(),
                    detail_json: r.detail.to_string(),
                })
                .collect();
            let mut req = tonic::Request::new(pb::AuditBatch { records });
            req.set_timeout(shared.opts.call_timeout);
            match client.report(req).await {
                Ok(_) => {}
                // Over the host's report quota: keep the spool, try at the
                // next delivery tick, keep the session.
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    tracing::info!("Report: {}", s.message());
                    return Ok(());
                }
                Err(s) => return Err(format!("Report: {}: {}", s.code(), s.message())),
            }
        }
        let mut g = shared.lock();
        g.spool.ack(seg.number).map_err(|e| format!("spool: {e}"))?;
        g.status.spool_delivered += seg.records.len() as u64;
    }
}

/// Starts a renewal of the signed bundle unless one is in flight: the
/// remembered pairs (newest first, at most [`signed::MAX_ASK`]) go to
/// `SignBundle`; the reply is kept only if it verifies. It runs beside the
/// session so pushes are not held up while the appliance decides, at most
/// once per [`BUNDLE_MIN_GAP`] (a request meanwhile waits for the gap).
fn renew_bundle(shared: &Arc<Shared>, client: &AgentClient<Channel>) {
    if shared.bundle_busy.swap(true, Ordering::AcqRel) {
        shared.bundle_again.store(true, Ordering::Release);
        return;
    }
    let shared = Arc::clone(shared);
    let mut client = client.clone();
    tokio::spawn(async move {
        loop {
            let last = *shared.bundle_last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(last) = last {
                tokio::time::sleep_until(last + BUNDLE_MIN_GAP).await;
            }
            *shared.bundle_last.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(tokio::time::Instant::now());
            shared.bundle_again.store(false, Ordering::Release);
            if let Err(e) = renew_bundle_now(&shared, &mut client).await {
                shared.error(format!("signed offline bundle not renewed: {e}"));
            }
            if !shared.bundle_again.load(Ordering::Acquire) {
                break;
            }
        }
        shared.bundle_busy.store(false, Ordering::Release);
    });
}

async fn renew_bundle_now(
    shared: &Shared,
    client: &mut AgentClient<Channel>,
) -> Result<(), String> {
    let pairs = shared.lock().bundle.recent(signed::MAX_ASK);
    let entries = pairs
        .into_iter()
        .filter_map(|(sha, user)| {
            Some(pb::BundleEntry {
                sha256: hex::decode(&sha).ok()?,
                user,
            })
        })
        .collect();
    let mut req = tonic::Request::new(pb::BundleRequest { entries });
    req.set_timeout(BUNDLE_CALL_TIMEOUT);
    let reply = tokio::time::timeout(BUNDLE_CALL_TIMEOUT, client.sign_bundle(req))
        .await
        .map_err(|_| "SignBundle: deadline exceeded".to_owned())?
        .map_err(|s| format!("SignBundle: {}: {}", s.code(), s.message()))?
        .into_inner();
    let v = Verified::verify(&reply, &shared.ca, &shared.host, now_ms())
        .map_err(|e| format!("the appliance's bundle was refused: {e}"))?;
    signed::store(&shared.opts.state, &reply).map_err(|e| e.to_string())?;
    let mut g = shared.lock();
    g.signed = Some(v);
    g.offline_why = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_double_with_jitter_and_a_cap() {
        let first: Vec<Duration> = reconnect_backoff().take(40).collect();
        // Doubling from 250 ms, each wait in [d, 2d): jitter adds up to d.
        let mut d = RECONNECT_MIN;
        for w in &first[..5] {
            assert!(*w >= d && *w < d * 2, "{w:?} outside [{d:?}, {:?})", d * 2);
            d *= 2;
        }
        // Capped: from 5 s on in [5 s, 10 s], never longer, still spread.
        let late = &first[10..];
        assert!(late
            .iter()
            .all(|w| *w >= RECONNECT_MAX / 2 && *w <= RECONNECT_MAX));
        assert!(
            late.iter().any(|w| *w != late[0]),
            "no jitter at the cap: {late:?}"
        );
        // Two agents starting over at once wait differently.
        let other: Vec<Duration> = reconnect_backoff().take(40).collect();
        assert_ne!(first, other);
        // Endless.
        assert_eq!(reconnect_backoff().take(10_000).count(), 10_000);
    }
    use std::net::IpAddr;

    fn process() -> Process {
        Process {
            uid: 1000,
            euid: 1000,
            gid: 100,
            loginuid: 1000,
            sessionid: 3,
            pid: 4242,
            ppid: 1,
            ancestry: vec![[0xcd; 32]],
        }
    }

    fn ev(kind: NetKind, src: &str, src_port: u16) -> NetEvent {
        NetEvent {
            module_request: Vec::new(),
            request_id: 77,
            kind,
            src_addr: src.parse::<IpAddr>().unwrap(),
            src_port,
            dst_addr: "10.99.0.12".parse().unwrap(),
            dst_port: 5432,
            sha256: [0xab; 32],
            process: process(),
            ipc: None,
        }
    }

    fn result(verdict: pb::Verdict, encrypt: bool, channel_id: u64) -> pb::Result {
        let mut obligations = HashMap::new();
        if encrypt {
            obligations.insert("encrypt".to_owned(), "required".to_owned());
        }
        pb::Result {
            module_answer: Vec::new(),
            id: 77,
            verdict: verdict as i32,
            obligations,
            reasons: vec![],
            generation: 5,
            cacheable: true,
            would_deny: false,
            channel_id,
            grant: None,
        }
    }

    #[test]
    fn net_requests_are_spelled_for_the_appliance() {
        let r = net_request_of(&ev(NetKind::Connect, "10.99.0.11", 0), "alice".into());
        assert_eq!(r.id, 77);
        assert_eq!(r.action, pb::Action::Connect as i32);
        let p = r.program.unwrap();
        assert_eq!((p.sha256.len(), p.sha1.len(), p.size), (32, 0, 0));
        assert!(p.path.is_empty());
        let s = r.subject.unwrap();
        assert_eq!(
            (s.user.as_str(), s.uid, s.session, s.pid),
            ("alice", 1000, 3, 4242)
        );
        assert_eq!(s.ancestry, vec![vec![0xcd; 32]]);
        let Some(pb::request::Target::Net(n)) = r.target else {
            panic!("no net target")
        };
        assert_eq!(n.proto, pb::Proto::Tcp as i32);
        assert_eq!((n.src_addr.as_str(), n.src_port), ("10.99.0.11", 0));
        assert_eq!((n.dst_addr.as_str(), n.dst_port), ("10.99.0.12", 5432));
        assert!(!n.established);

        let r = net_request_of(
            &ev(NetKind::Established, "::ffff:10.99.0.11", 40000),
            "u".into(),
        );
        assert_eq!(r.action, pb::Action::Connect as i32);
        let Some(pb::request::Target::Net(n)) = r.target else {
            panic!()
        };
        assert!(n.established);
        assert_eq!(n.src_addr, "::ffff:10.99.0.11");

        let r = net_request_of(&ev(NetKind::Accept, "10.99.0.11", 40000), "u".into());
        assert_eq!(r.action, pb::Action::Accept as i32);
        let Some(pb::request::Target::Net(n)) = r.target else {
            panic!()
        };
        assert!(!n.established);
    }

    #[test]
    fn ipc_connects_are_spelled_for_the_appliance() {
        let mut e = ev(NetKind::Connect, "0.0.0.0", 0);
        e.ipc = Some(crate::device::IpcPeer {
            path: "/run/app.sock".into(),
            sha256: [0x5e; 32],
            pid: 300,
            uid: 0,
            gid: 0,
        });
        let r = net_request_of(&e, "alice".into());
        assert_eq!(r.id, 77);
        assert_eq!(r.action, pb::Action::IpcConnect as i32);
        assert_eq!(r.program.unwrap().sha256, vec![0xab; 32]);
        let peer = r.peer.expect("peer program");
        assert_eq!((peer.sha256, peer.sha1.len()), (vec![0x5e; 32], 0));
        assert_eq!(r.subject.unwrap().pid, 4242);
        let Some(pb::request::Target::Net(n)) = r.target else {
            panic!("no net target")
        };
        assert_eq!(n.proto, pb::Proto::Unix as i32);
        assert_eq!((n.dst_addr.as_str(), n.dst_port), ("/run/app.sock", 0));
        assert_eq!((n.src_addr.as_str(), n.src_port), ("", 0));
        // A TCP request names no peer.
        assert!(
            net_request_of(&ev(NetKind::Connect, "10.99.0.11", 0), "a".into())
                .peer
                .is_none()
        );
        assert_eq!(dst_of(&e).split_whitespace().next(), Some("/run/app.sock"));
        assert_eq!(event_name(&e), "ipc_connect");
    }

    #[test]
    fn close_records_are_spelled_for_the_appliance() {
        let c = ChannelClosed {
            channel_id: 7,
            key_id: [0xab; 16],
            role: ChannelRole::Accept,
            reason: CloseReason::Idle,
            bytes_sent: 10,
            bytes_received: 20,
            duration_ms: 30,
        };
        let r = close_record("x-1".into(), 5, &c);
        assert_eq!(r.what, "channel.close");
        assert_eq!(
            r.detail,
            serde_json::json!({
                "channel_id": 7, "key_id": "ab".repeat(16), "role": "accept",
                "bytes_sent": 10, "bytes_received": 20, "duration_ms": 30,
                "reason": "idle",
            })
        );
    }

    fn file_ev(access: FileAccess, to: Option<&str>) -> FileEvent {
        FileEvent {
            module_request: Vec::new(),
            request_id: 78,
            access,
            create: false,
            truncate: false,
            link: false,
            sha256: [0xab; 32],
            process: process(),
            dev: 0x803,
            ino: 42,
            path: "/srv/db/data".into(),
            to: to.map(str::to_owned),
            named: false,
            to_named: false,
        }
    }

    #[test]
    fn file_requests_are_spelled_for_the_appliance() {
        for (access, action) in [
            (FileAccess::Read, pb::Action::OpenRead),
            (FileAccess::Write, pb::Action::OpenWrite),
            (FileAccess::Delete, pb::Action::Delete),
        ] {
            let r = file_request_of(&file_ev(access, None), "alice".into());
            assert_eq!((r.id, r.action), (78, action as i32));
            let p = r.program.unwrap();
            assert_eq!((p.sha256, p.sha1.len(), p.size), (vec![0xab; 32], 0, 0));
            assert!(p.path.is_empty());
            let s = r.subject.unwrap();
            assert_eq!((s.user.as_str(), s.uid, s.pid), ("alice", 1000, 4242));
            assert_eq!(s.ancestry, vec![vec![0xcd; 32]]);
            assert!(r.peer.is_none());
            let Some(pb::request::Target::File(f)) = r.target else {
                panic!("no file target")
            };
            assert_eq!(f.path, "/srv/db/data");
            assert_eq!(f.to, None);
            assert!(!f.create && !f.truncate && !f.link);
        }
        let r = file_request_of(&file_ev(FileAccess::Rename, Some("/tmp/x")), "alice".into());
        assert_eq!(r.action, pb::Action::Rename as i32);
        let Some(pb::request::Target::File(f)) = r.target else {
            panic!()
        };
        assert_eq!(f.to.as_deref(), Some("/tmp/x"));

        let mut ev = file_ev(FileAccess::Write, Some("/tmp/l"));
        (ev.create, ev.truncate, ev.link) = (true, true, true);
        let r = file_request_of(&ev, "u".into());
        assert_eq!(r.action, pb::Action::OpenWrite as i32);
        let Some(pb::request::Target::File(f)) = r.target else {
            panic!()
        };
        assert!(f.create && f.truncate && f.link);
        assert_eq!(f.to.as_deref(), Some("/tmp/l"));
        assert_eq!(action_name(&ev), "link");
        assert_eq!(file_of(&ev), "/srv/db/data -> /tmp/l");
    }

    #[test]
    fn file_verdicts_keep_caching_but_no_exec_or_net_obligation() {
        let mut r = result(pb::Verdict::AllowWithConditions, true, 0);
        r.obligations.insert("nice".into(), "5".into());
        r.obligations.insert("cpu_limit_s".into(), "9".into());
        r.obligations.insert("log_level".into(), "3".into());
        let file = Asked::File(file_ev(FileAccess::Read, None));
        let v = file.verdict(&r);
        assert_eq!(v.decision, Decision::AllowWithConditions);
        assert!(v.cacheable);
        assert_eq!(v.policy_generation, 5);
        assert_eq!(
            v.obligations,
            Obligations {
                log_level: 3,
                ..Obligations::default()
            }
        );
        r.cacheable = false;
        assert!(!file.verdict(&r).cacheable);
        // An exec keeps its obligations.
        let exec = Asked::Exec(ExecEvent {
            module_request: Vec::new(),
            request_id: 1,
            sha256: [1; 32],
            sha1: [2; 20],
            size: 3,
            process: process(),
            path: "/bin/x".into(),
            loader_direct: false,
        });
        let v = exec.verdict(&r);
        assert_eq!(
            (v.obligations.nice, v.obligations.cpu_limit_s),
            (Some(5), Some(9))
        );
    }

    #[test]
    fn offline_answers_follow_the_mode_and_are_never_cached() {
        let v = offline_default(Mode::Enforce);
        assert_eq!((v.decision, v.cacheable), (Decision::Deny, false));
        for m in [Mode::Permissive, Mode::Disabled] {
            let v = offline_default(m);
            assert_eq!((v.decision, v.cacheable), (Decision::Allow, false));
        }
        let a = Asked::File(file_ev(FileAccess::Rename, Some("/tmp/x")));
        let (what, d) = a.offline_record("alice", Decision::Deny, "default", Mode::Enforce);
        assert_eq!(what, "file.offline");
        assert_eq!(
            d,
            serde_json::json!({
                "sha256": "ab".repeat(32), "user": "alice", "uid": 1000, "pid": 4242,
                "decision": "deny", "source": "default", "mode": "enforce",
                "access": "rename", "path": "/srv/db/data", "to": "/tmp/x",
                "create": false, "truncate": false, "link": false,
            })
        );
    }

    /// A listen is asked of `Agent.Listen` with the module's record and
    /// the session only when there is a record.
    #[test]
    fn listens_are_spelled_for_the_appliance() {
        let mut e = ev(NetKind::Listen, "0.0.0.0", 0);
        let r = listen_request_of(&e, "postgres".into(), vec![4; 64]);
        assert_eq!(r.port, 5432);
        assert_eq!(r.program.unwrap().sha256, vec![0xab; 32]);
        assert_eq!(r.subject.unwrap().user, "postgres");
        assert!(r.module_request.is_empty() && r.module_session.is_empty());
        e.module_request = vec![1, 2, 3];
        let r = listen_request_of(&e, "postgres".into(), vec![4; 64]);
        assert_eq!(
            (r.module_request, r.module_session),
            (vec![1, 2, 3], vec![4; 64])
        );
    }

    /// A result with a grant (a module without a session) is written as a
    /// bare grant; a sealed answer is kept as it is; a grant that makes no
    /// record is a deny.
    #[test]
    fn grants_in_results_become_the_modules_grant_or_a_deny() {
        use trustbind_proto::ticket::{GCM_NONCE_LEN, GCM_TAG_LEN, PLAIN_LEN};
        let reply = pb::GrantReply {
            granted: true,
            ticket: vec![1; GCM_NONCE_LEN + PLAIN_LEN + GCM_TAG_LEN],
            epoch: 3,
            pair_secret: vec![9; 32],
            expires_s: 100,
            generation: 5,
            ticket_id: vec![2; 16],
            valid_s: 60,
            ..pb::GrantReply::default()
        };
        let e = ev(NetKind::Connect, "0.0.0.0", 0);
        let mut r = result(pb::Verdict::AllowWithConditions, true, 0);
        r.grant = Some(reply.clone());
        let (answer, _, sealed, grant) = net_plan(&e, r);
        let Some(g) = grant else { panic!("no grant") };
        assert_eq!((g.pair_secret, g.epoch, g.valid_s), ([9; 32], 3, 60));
        assert!(sealed.is_empty());
        assert!(matches!(answer, tbm::Answer::Verdict(v) if v.decision != Decision::Deny));
        // Sealed: the answer as it came, no grant of the agent's making.
        let mut r = result(pb::Verdict::AllowWithConditions, true, 0);
        r.module_answer = vec![7; 40];
        let (_, _, sealed, grant) = net_plan(&e, r);
        assert_eq!((sealed, grant), (vec![7; 40], None));
        // A ticket cut short: refused.
        let mut r = result(pb::Verdict::AllowWithConditions, true, 0);
        r.grant = Some(pb::GrantReply {
            ticket: vec![1; 5],
            ..reply
        });
        let (answer, why, _, grant) = net_plan(&e, r);
        assert!(grant.is_none() && why.contains("not usable"), "{why}");
        assert!(matches!(answer, tbm::Answer::Verdict(v) if v.decision == Decision::Deny));
    }

    #[test]
    fn the_net_margin_is_bounded() {
        assert_eq!(
            net_margin(Duration::from_millis(3000)),
            Duration::from_millis(300)
        );
        assert_eq!(
            net_margin(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
        assert_eq!(
            net_margin(Duration::from_secs(30)),
            Duration::from_millis(500)
        );
    }
}
