// SPDX-License-Identifier: GPL-2.0
//! trustbind.ko, the Trustbind policy enforcement module (PEM).
//!
//! At load it allocates the SHA-256 and SHA-1 transforms it hashes programs
//! with, checks them against known vectors, and registers `/dev/trustbind`,
//! the channel to `trustbind-agent`, then the hooks: the loader gate and
//! the exec handler (`exec`), and the connect/accept wrappers (`net`).
//!
//! Layout: `sys` is the only module with `unsafe` (the flat C surface of
//! `sys/helpers.c` and small safe types over it); `device` is the agent
//! channel's logic; `proto` is the user-space `trustbind-proto` crate,
//! compiled in so that both sides share one definition of the wire records.

use kernel::prelude::*;

mod device;
mod exec;
mod files;
mod net;
mod sys;
mod tickets;

// The wire records, shared with user space. Items the module does not use
// yet (request kinds of later parts) are not dead in the agent.
#[allow(dead_code, unreachable_pub)]
#[path = "../proto/src/lib.rs"]
mod proto;

use device::Channel;
use kernel::c_str;
use sys::{
    DebugfsDir, ExecRegistration, FileHooks, Hashers, LoaderHooks, MiscRegistration, NetHooks, Slot, UnixHooks,
};

module! {
    type: Trustbind,
    name: "trustbind",
    author: "Trustbind developers",
    description: "Trustbind policy enforcement module",
    license: "GPL",
}

/// What the hooks and the device share, published in [`SHARED`] while
/// the module is loaded.
#[pin_data]
pub(crate) struct Shared {
    pub(crate) hashers: Hashers,
    #[pin]
    pub(crate) channel: Channel,
    #[pin]
    pub(crate) exec_cache: exec::Cache,
    #[pin]
    pub(crate) lineage: exec::Lineage,
    #[pin]
    pub(crate) loader: exec::LoaderState,
    #[pin]
    pub(crate) bound: net::Bound,
    #[pin]
    pub(crate) backstop: net::Backstop,
    #[pin]
    pub(crate) deferred: net::Deferred,
    #[pin]
    pub(crate) unix_rounds: net::UnixRounds,
    #[pin]
    pub(crate) files: files::Files,
    #[pin]
    pub(crate) v2: tickets::V2,
}

/// The state the C callbacks (file operations, binfmt handler) reach.
pub(crate) static SHARED: Slot<Shared> = Slot::new();

/// The module; fields drop in declaration order: the file gate's hooks
/// (waiting for calls in their stubs), the UNIX connect hook and
/// the connect/accept hooks are removed first (waiting for calls inside
/// their wrappers), then the exec handler is unregistered, then the loader gate stopped (waiting for its
/// handlers), then the statistics, then the device, then the shared state
/// is freed.
struct Trustbind {
    _files: FileHooks,
    _unix: UnixHooks,
    _net: NetHooks,
    _exec: ExecRegistration,
    _loader: LoaderHooks,
    _stats: DebugfsDir,
    _device: MiscRegistration<Shared>,
    _last: Unloaded,
}

/// Logs the unload once everything before it in [`Trustbind`] is gone.
struct Unloaded;

impl Drop for Unloaded {
    fn drop(&mut self) {
        pr_info!("unloaded\n");
    }
}

/// Known-answer vectors: SHA-256 and SHA-1 of `"abc"` (FIPS 180-2).
const KAT_INPUT: &[u8] = b"abc";
const KAT_SHA256: [u8; 32] = [
    0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
    0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
];
const KAT_SHA1: [u8; 20] = [
    0xa9, 0x99, 0x3e, 0x36, 0x47, 0x06, 0x81, 0x6a, 0xba, 0x3e, 0x25, 0x71, 0x78, 0x50, 0xc2, 0x6c,
    0x9c, 0xd0, 0xd8, 0x9d,
];

/// Lower-case hex of a byte string, for log lines.
struct Hex<'a>(&'a [u8]);

impl core::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.0 {
            write!(f, "{:02x}", b)?;
        }
        Ok(())
    }
}

/// Hashes the known-answer input and compares; a module whose hashing is
/// wrong must not load, since every verdict rests on it.
fn self_test(h: &Hashers) -> Result {
    let (sha256, sha1) = h.digest(KAT_INPUT)?;
    let ok256 = sha256 == KAT_SHA256;
    let ok1 = sha1 == KAT_SHA1;
    let verdict = |ok| if ok { "ok" } else { "MISMATCH" };
    pr_info!(
        "self-test sha256(\"abc\") = {} {}\n",
        Hex(&sha256),
        verdict(ok256)
    );
    pr_info!(
        "self-test sha1(\"abc\") = {} {}\n",
        Hex(&sha1),
        verdict(ok1)
    );
    if ok256 && ok1 {
        Ok(())
    } else {
        pr_err!("hash self-test failed, refusing to load\n");
        Err(EINVAL)
    }
}

impl kernel::Module for Trustbind {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let hashers = Hashers::new()?;
        pr_info!(
            "sha256 driver: {}, sha1 driver: {}\n",
            hashers.sha256_driver(),
            hashers.sha1_driver()
        );
        self_test(&hashers)?;
        tickets::self_test();
        let channel = Channel::new(&hashers)?;
        let exec_cache = exec::Cache::new()?;
        let lineage = exec::Lineage::new()?;
        let loader = exec::LoaderState::new()?;
        let bound = net::Bound::new()?;
        let file_state = files::Files::new()?;
        let v2 = tickets::V2::new()?;
        let shared = KBox::pin_init(
            try_pin_init!(Shared {
                hashers,
                channel <- channel,
                exec_cache <- exec_cache,
                lineage <- lineage,
                loader <- loader,
                bound <- bound,
                backstop <- net::Backstop::new(),
                deferred <- net::Deferred::new(),
                unix_rounds <- net::UnixRounds::new(),
                files <- file_state,
                v2 <- v2,
            }? Error),
            GFP_KERNEL,
        )?;
        shared
            .channel
            .boot(sys::param_mode(), sys::param_agent(), sys::param_authority())?;
        let device = MiscRegistration::new(&SHARED, shared)?;
        pr_info!("/dev/trustbind ready (protocol v{})\n", proto::VERSION);
        let st = &exec::STATS;
        let stats = DebugfsDir::new(&[
            (c_str!("exec_asked"), &st.asked),
            (c_str!("exec_allowed"), &st.allowed),
            (c_str!("exec_denied"), &st.refusals.denied),
            (c_str!("exec_would_deny"), &st.refusals.would_deny),
            (c_str!("exec_no_agent"), &st.refusals.no_agent),
            (c_str!("exec_timeouts"), &st.refusals.timeouts),
            (c_str!("exec_unreadable"), &st.refusals.unreadable),
            (c_str!("exec_busy"), &st.refusals.busy),
            (c_str!("exec_unqualifiable"), &st.refusals.unqualifiable),
            (c_str!("exec_cache_hits"), &st.cache_hits),
            (c_str!("exec_cache_misses"), &st.cache_misses),
            (c_str!("exec_cache_stored"), &st.cache_stored),
            (c_str!("exec_cache_flushes"), &st.cache_flushes),
            (c_str!("exec_pinned_agent"), &st.pinned_agent),
            (c_str!("exec_loader_opens"), &st.loader_opens),
            (c_str!("exec_loader_dedup"), &st.loader_dedup),
            (c_str!("exec_loader_direct"), &st.loader_direct),
            (c_str!("exec_committed"), &st.committed),
            (c_str!("exec_interrupted"), &st.interrupted),
            (c_str!("lineage_procs"), &st.lineage_procs),
            (c_str!("lineage_lost"), &st.lineage_lost),
            (c_str!("exe_replace_refused"), &st.exe_replace_refused),
            (c_str!("exe_replace_would_deny"), &st.exe_replace_would_deny),
            (c_str!("queue_busy"), &device::STATS.busy),
            (c_str!("unsealed_refused"), &device::STATS.unsealed),
            (c_str!("bad_seal"), &device::STATS.bad_seal),
            (c_str!("net_connect_asked"), &net::STATS.connect_asked),
            (c_str!("net_accept_asked"), &net::STATS.accept_asked),
            (c_str!("net_allowed"), &net::STATS.allowed),
            (c_str!("net_denied"), &net::STATS.refusals.denied),
            (c_str!("net_would_deny"), &net::STATS.refusals.would_deny),
            (c_str!("net_no_agent"), &net::STATS.refusals.no_agent),
            (c_str!("net_timeouts"), &net::STATS.refusals.timeouts),
            (c_str!("net_unreadable"), &net::STATS.refusals.unreadable),
            (c_str!("net_busy"), &net::STATS.refusals.busy),
            (c_str!("net_unqualifiable"), &net::STATS.refusals.unqualifiable),
            (c_str!("net_exe_hashed"), &net::STATS.exe_hashed),
            (c_str!("net_bind_required"), &net::STATS.bind_required),
            (c_str!("net_bound"), &net::STATS.bound),
            (c_str!("net_bind_failed"), &net::STATS.bind_failed),
            (c_str!("net_bound_open"), &net::STATS.bound_open),
            (c_str!("net_close_untracked"), &net::STATS.close_untracked),
            (c_str!("net_closed"), &net::STATS.closed),
            (c_str!("net_close_sent"), &net::STATS.close_sent),
            (c_str!("net_close_dropped"), &net::STATS.close_dropped),
            (c_str!("net_idle_ended"), &net::STATS.idle_ended),
            (c_str!("net_send_restarted"), &net::STATS.send_restarted),
            (c_str!("net_accept_deferred"), &net::STATS.accept_deferred),
            (c_str!("net_accept_handed"), &net::STATS.accept_handed),
            (c_str!("net_accept_waited"), &net::STATS.accept_waited),
            (c_str!("net_backstop_protected"), &net::STATS.backstop_protected),
            (
                c_str!("net_backstop_protected_full"),
                &net::STATS.backstop_protected_full,
            ),
            (c_str!("net_backstop_unmarked"), &net::STATS.backstop_unmarked),
            (c_str!("unix_asked"), &net::UNIX_STATS.asked),
            (c_str!("unix_allowed"), &net::UNIX_STATS.allowed),
            (c_str!("unix_denied"), &net::UNIX_STATS.refusals.denied),
            (c_str!("unix_would_deny"), &net::UNIX_STATS.refusals.would_deny),
            (c_str!("unix_no_agent"), &net::UNIX_STATS.refusals.no_agent),
            (c_str!("unix_timeouts"), &net::UNIX_STATS.refusals.timeouts),
            (c_str!("unix_unreadable"), &net::UNIX_STATS.refusals.unreadable),
            (c_str!("unix_busy"), &net::UNIX_STATS.refusals.busy),
            (c_str!("unix_exe_hashed"), &net::UNIX_STATS.exe_hashed),
            (c_str!("file_protected"), &files::STATS.protected),
            (c_str!("file_paths_resolved"), &files::STATS.paths_resolved),
            (c_str!("file_paths_missing"), &files::STATS.paths_missing),
            (c_str!("file_places_seen"), &files::STATS.places_seen),
            (c_str!("file_checked"), &files::STATS.checked),
            (c_str!("file_cache_hits"), &files::STATS.cache_hits),
            (c_str!("file_answers_used"), &files::STATS.answers_used),
            (c_str!("file_restarts"), &files::STATS.restarts),
            (c_str!("file_unrestartable"), &files::STATS.unrestartable),
            (c_str!("file_asked"), &files::STATS.asked),
            (c_str!("file_allowed"), &files::STATS.allowed),
            (c_str!("file_link_refused"), &files::STATS.link_refused),
            (c_str!("file_cache_stored"), &files::STATS.cache_stored),
            (c_str!("file_cache_flushes"), &files::STATS.cache_flushes),
            (c_str!("file_denied"), &files::STATS.refusals.denied),
            (c_str!("file_would_deny"), &files::STATS.refusals.would_deny),
            (c_str!("file_no_agent"), &files::STATS.refusals.no_agent),
            (c_str!("file_timeouts"), &files::STATS.refusals.timeouts),
            (c_str!("file_unreadable"), &files::STATS.refusals.unreadable),
            (c_str!("file_busy"), &files::STATS.refusals.busy),
            (c_str!("ticket_self_test"), &tickets::SELF_TEST),
            (c_str!("v2_grants_received"), &tickets::STATS.grants_received),
            (c_str!("v2_grant_hits"), &tickets::STATS.grant_hits),
            (c_str!("v2_tickets_sent"), &tickets::STATS.tickets_sent),
            (c_str!("v2_tickets_accepted"), &tickets::STATS.tickets_accepted),
            (c_str!("v2_tickets_refused"), &tickets::STATS.tickets_refused),
            (c_str!("v2_tickets_absent"), &tickets::STATS.tickets_absent),
            (c_str!("v2_listens_registered"), &tickets::STATS.listens_registered),
            (c_str!("v2_grants_dropped"), &tickets::STATS.grants_dropped),
        ]);
        let loader = LoaderHooks::new()?;
        let exec = ExecRegistration::new();
        pr_info!("exec handler registered (mode disabled until an agent configures it)\n");
        let net = NetHooks::new()?;
        pr_info!("connect/accept/close hooks registered\n");
        let unix = UnixHooks::new()?;
        let file_hooks = FileHooks::new()?;
        pr_info!("file gate hooks registered\n");
        Ok(Trustbind {
            _files: file_hooks,
            _unix: unix,
            _net: net,
            _exec: exec,
            _loader: loader,
            _stats: stats,
            _device: device,
            _last: Unloaded,
        })
    }
}
