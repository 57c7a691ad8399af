// SPDX-License-Identifier: GPL-2.0
//! `/dev/trustbind`: the record channel between the module and the agent.
//!
//! One agent at a time may hold the device open (a second `open()` gets
//! `EBUSY`). Every `write()` is exactly one record from the agent; every
//! `read()` returns exactly one record for the agent, oldest first, and
//! blocks (or fails with `EAGAIN` under `O_NONBLOCK`) while none is queued.
//! `poll()` reports readable while records are queued.
//!
//! The first record an agent writes must be a `Hello`; the module answers
//! with a `HelloAck` naming its version and hash drivers, which is the
//! first record the agent reads: requests are queued only once it has
//! read it. A `Config` sets the enforcement mode and how long a hooked task waits for a verdict.
//! The hooks queue requests (`ExecRequest`, `NetRequest`) on the queue
//! with a fresh request id and sleep until the agent writes the `Verdict`
//! with that id, the wait times out, or the agent goes away. `NetRequest`s
//! are only queued while the last `Config` set `qualify_net`.
//!
//! Errors the agent sees from `write()`: `E2BIG` for a record longer than
//! `MAX_RECORD_LEN`, `EINVAL` for a malformed record, a kind the agent may
//! not send, or anything before `Hello`, `ENOENT` for a verdict that
//! answers no pending request (it may have timed out), `ENOSPC` when the
//! queue is full. From `read()`: `EINVAL` when the buffer is shorter than
//! the next record (the record stays queued; read with `MAX_RECORD_LEN`
//! bytes).
//!
//! The queue is shared fairly (`proto::fairq`): one user (real uid) holds
//! at most [`PER_USER`] of its [`PLACES`] places, and the agent reads
//! queued records round-robin over users, so one user who starts hundreds
//! of execs at once neither takes everybody's places nor delays their
//! requests behind his. A request that finds no place is a refusal the
//! mode decides on (`Answer::Busy`): refused in enforce mode, let through
//! in permissive mode — never an error whatever the mode.
//!
//! The mode outlives the agent: if the agent dies in enforce mode, hooked
//! operations that need a verdict are refused until an agent returns. In
//! enforce mode the module also holds a reference on itself, so `rmmod`
//! fails with `EBUSY` until an agent sets another mode.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use kernel::alloc::KVVec;
use kernel::prelude::*;
use kernel::str::CStr;
use kernel::rbtree::RBTree;
use kernel::sync::{new_condvar, new_mutex, CondVar, CondVarTimeoutResult, Mutex};
use kernel::time::msecs_to_jiffies;
use kernel::uaccess::UserSlice;

use crate::proto::backstop;
use crate::proto::fairq::{FairQueue, Full, Place};
use crate::proto::seal::{self, BareRule};
use crate::proto::{self, ChannelKey, Decision, Grant, DecodeError, Header, HelloAck, Kind, Mode, Record, Verdict};
use crate::files;
use crate::sys::{self, ExecInfo, FileId, Hashers, ModulePin, Hmac};

/// Places in the queue to the agent: requests waiting for a verdict
/// (queued or read) and notifications not yet read.
const PLACES: usize = 1024;

/// Places one user may hold at once.
const PER_USER: usize = PLACES / 8;

/// The "user" the module's own records (`HelloAck`, channel close
/// records) are queued as.
const MODULE_UID: u32 = u32::MAX;

/// Verdict wait until an agent configures one.
const DEFAULT_VERDICT_TIMEOUT_MS: u32 = 5000;

/// The module version carried in `HelloAck` (`major << 16 | minor << 8 | patch`).
const MODULE_VERSION: u32 = proto::MODULE_VERSION_TICKETS;

/// The records queued for the agent, by place (see `proto::fairq`).
struct Outbox {
    q: FairQueue<KVVec<Place>>,
    /// The encoded record of each queued place.
    records: KVVec<Option<KVec<u8>>>,
    /// Whether the place is a request that waits for an answer (keeps its
    /// place once read).
    waits: KVVec<bool>,
}

impl Outbox {
    fn new() -> Result<Self> {
        let mut places = KVVec::new();
        places.extend_with(PLACES, Place::FREE, GFP_KERNEL)?;
        let mut records = KVVec::with_capacity(PLACES, GFP_KERNEL)?;
        for _ in 0..PLACES {
            records.push(None, GFP_KERNEL)?;
        }
        let mut waits = KVVec::new();
        waits.extend_with(PLACES, false, GFP_KERNEL)?;
        Ok(Outbox {
            q: FairQueue::new(places, PER_USER).ok_or(EINVAL)?,
            records,
            waits,
        })
    }

    /// Queues `rec` for `uid` in a new place: its index.
    fn push(&mut self, uid: u32, rec: KVec<u8>, waits: bool) -> core::result::Result<usize, Full> {
        let i = self.q.admit(uid)?;
        if let (Some(r), Some(w)) = (self.records.get_mut(i), self.waits.get_mut(i)) {
            *r = Some(rec);
            *w = waits;
        }
        Ok(i)
    }

    /// The record the agent reads next, and its place.
    fn front(&self) -> Option<(usize, &KVec<u8>)> {
        let i = self.q.next()?;
        self.records.get(i)?.as_ref().map(|r| (i, r))
    }

    /// The record at place `i` was read.
    fn pop(&mut self, i: usize) {
        let waits = self.waits.get(i).copied().unwrap_or(false);
        if let Some(r) = self.records.get_mut(i) {
            *r = None;
        }
        self.q.read(i, waits);
    }

    /// The request at place `i` is over (answered or given up).
    fn release(&mut self, i: usize) {
        if let Some(r) = self.records.get_mut(i) {
            *r = None;
        }
        self.q.release(i);
    }

    /// The record queued at place `i`, if any.
    fn record(&self, i: usize) -> Option<&[u8]> {
        self.records.get(i)?.as_deref()
    }

    /// The agent left: nothing queued will be read. Requests keep their
    /// places until their waiters give up.
    fn clear(&mut self) {
        let waits = &self.waits;
        self.q.drain(|i| waits.get(i).copied().unwrap_or(false), |_| {});
        for r in self.records.iter_mut() {
            *r = None;
        }
    }

    fn len(&self) -> usize {
        self.q.queued()
    }
}

/// Channel state behind the mutex.
struct State {
    /// Thread group id of the agent holding the device open.
    agent: Option<u32>,
    /// Whether that agent has said `Hello`.
    greeted: bool,
    /// Whether it has read our `HelloAck`: only then are requests and
    /// notifications queued for it (see `read`).
    acked: bool,
    /// The version its `Hello` announced.
    agent_version: u32,
    /// Bumped whenever an agent goes away, so waiters notice.
    epoch: u64,
    outbox: Outbox,
    /// Requests waiting for verdicts, by request id.
    pending: RBTree<u64, Pending>,
    /// Held while in enforce mode: the module may not be unloaded then,
    /// until an agent sets another mode.
    enforce_pin: Option<ModulePin>,
    /// Number of entries in `pending`.
    n_pending: usize,
    next_id: u64,
    /// The executable of the last agent that opened the device (kept after
    /// it leaves): exec'ing exactly that file is allowed while no agent is
    /// connected, so a dead agent can be restarted in enforce mode.
    pinned_agent: Option<FileId>,
    /// The session with the appliance when loaded with `authority=`:
    /// then only sealed records are believed (`proto::seal`).
    auth: Option<Auth>,
    /// The sequence of the last sealed order taken, per order kind.
    last_seq: [u64; seal::ORDER_SLOTS],
}

/// The session with the appliance (module parameter `authority`).
struct Auth {
    /// HMAC-SHA256 under the session key.
    mac: Hmac,
    /// The module's session public key, for `HelloAck`.
    session: [u8; seal::SESSION_PUB_LEN],
}

/// A request waiting for its answer.
struct Pending {
    /// `Some` once answered.
    reply: Option<Reply>,
    /// SHA-256 of the request record as queued (with a session only):
    /// a sealed answer must be sealed to it.
    digest: [u8; seal::DIGEST_LEN],
}

/// What the agent answered a request with.
enum Reply {
    Verdict(Verdict),
    Key(ChannelKey),
    Grant(Grant),
}

impl State {
    /// Removes request `id`, returning its answer if it has one.
    fn take_pending(&mut self, id: u64) -> Option<Reply> {
        let slot = self.pending.get_mut(&id)?;
        let v = slot.reply.take();
        if matches!(v, Some(Reply::Key(_)) | Some(Reply::Grant(_))) {
            // Key material must not survive in the freed node: overwrite
            // the node's value whole before it goes.
            slot.reply = Some(Reply::Key(ChannelKey::ZERO));
        }
        self.pending.remove(&id);
        self.n_pending -= 1;
        v
    }

    /// Removes request `id` unanswered (timed out, interrupted, agent
    /// gone): a key that arrived meanwhile is wiped.
    fn drop_pending(&mut self, id: u64) {
        match self.take_pending(id) {
            Some(Reply::Key(mut k)) => k.wipe(),
            Some(Reply::Grant(mut g)) => g.wipe(),
            _ => {}
        }
    }
}

/// Which signals end a wait for a verdict.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Any: the caller restarts the call (nothing happened yet).
    Interruptible,
    /// Only a fatal one (and a stop): the call cannot be restarted (a
    /// connection already taken off the accept queue, or established).
    /// Other signals wait until the verdict came.
    UntilFatal,
}

/// How a request ended.
pub(crate) enum Answer {
    /// The agent answered.
    Verdict(Verdict),
    /// The agent answered with a channel key (net requests only); the
    /// receiver installs it and wipes it.
    Key(ChannelKey),
    /// The appliance answered a connect with a channel keys v2 grant; the
    /// receiver keeps it and wipes its copy.
    Grant(Grant),
    /// No agent is connected (or it left before answering).
    NoAgent,
    /// The agent did not answer in time.
    TimedOut,
    /// The waiting task got a signal.
    Interrupted,
    /// No place in the queue (this user's share or the whole queue taken,
    /// or no memory): never sent.
    Busy,
}

/// The channel shared by the file operations.
#[pin_data]
pub(crate) struct Channel {
    #[pin]
    state: Mutex<State>,
    /// Waiters for verdicts, on `state`.
    #[pin]
    verdicts: CondVar,
    /// The current [`Mode`], readable without the mutex on every exec.
    mode: AtomicU8,
    verdict_timeout_ms: AtomicU32,
    /// Whether the agent answers net requests (`Config::qualify_net`);
    /// like the mode, it outlives the agent.
    qualify_net: AtomicBool,
    /// Thread group id of the connected agent, 0 when none, readable
    /// without the mutex (the agent's own execs are exempt).
    agent_tgid: AtomicU32,
    /// Whether the module has a session with the appliance (set once at
    /// load): then the agent's own execs are not exempt.
    sealed_only: AtomicBool,
    /// Mirror of the queued record count readable without the (sleeping) mutex, for the
    /// wait-queue condition and `poll()`.
    queued: AtomicUsize,
    sha256_driver: [u8; proto::DRIVER_NAME_LEN],
    sha1_driver: [u8; proto::DRIVER_NAME_LEN],
}

impl Channel {
    pub(crate) fn new(hashers: &Hashers) -> Result<impl PinInit<Self, Error> + use<>> {
        let outbox = Outbox::new()?;
        let sha256_driver = proto::driver_name_field(hashers.sha256_driver().as_bytes());
        let sha1_driver = proto::driver_name_field(hashers.sha1_driver().as_bytes());
        Ok(try_pin_init!(Channel {
            state <- new_mutex!(State {
                agent: None,
                greeted: false,
                acked: false,
                agent_version: 0,
                epoch: 0,
                outbox,
                pending: RBTree::new(),
                enforce_pin: None,
                n_pending: 0,
                next_id: 1,
                pinned_agent: None,
                auth: None,
                last_seq: [0; seal::ORDER_SLOTS],
            }),
            verdicts <- new_condvar!(),
            mode: AtomicU8::new(Mode::Disabled as u8),
            verdict_timeout_ms: AtomicU32::new(DEFAULT_VERDICT_TIMEOUT_MS),
            qualify_net: AtomicBool::new(false),
            agent_tgid: AtomicU32::new(0),
            sealed_only: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            sha256_driver,
            sha1_driver,
        }? Error))
    }

    /// Applies the load-time settings (module parameters `mode` and
    /// `agent`): the mode the module starts in, before any agent, and the
    /// agent binary allowed to start while none is connected. A bad value
    /// refuses the load.
    pub(crate) fn boot(&self, mode_param: &CStr, agent: &CStr, authority: &CStr) -> Result {
        let mode = match mode_param.as_bytes() {
            b"" | b"disabled" => Mode::Disabled,
            b"permissive" => Mode::Permissive,
            b"enforce" => Mode::Enforce,
            _ => {
                pr_err!("mode={}: want disabled, permissive or enforce\n", mode_param);
                return Err(EINVAL);
            }
        };
        let auth = if authority.is_empty() {
            None
        } else {
            let Some(key) = seal::parse_authority(authority.as_bytes()) else {
                pr_err!("authority=: want 128 hex digits (the appliance's P-256 key x||y)\n");
                return Err(EINVAL);
            };
            let (mac, session) = Hmac::agree(&key).inspect_err(|e| {
                pr_err!("authority=: no session with that key: errno {}\n", e.to_errno())
            })?;
            Some(Auth { mac, session })
        };
        let mut st = self.state.lock();
        self.sealed_only.store(auth.is_some(), Ordering::Release);
        st.auth = auth;
        if !agent.is_empty() {
            let id = sys::file_id_of(agent).inspect_err(|e| {
                pr_err!("agent={}: cannot use it: errno {}\n", agent, e.to_errno())
            })?;
            if id.has_change_cookie == 0 {
                pr_err!("agent={}: its file system has no change cookie\n", agent);
                return Err(EINVAL);
            }
            st.pinned_agent = Some(id);
        }
        if mode == Mode::Enforce {
            st.enforce_pin = Some(ModulePin::new().ok_or(ENODEV)?);
        }
        self.mode.store(mode as u8, Ordering::Release);
        sys::publish_mode(mode as u8);
        pr_info!(
            "mode {:?} at load{}{}\n",
            mode,
            if st.pinned_agent.is_some() {
                ", agent binary pinned"
            } else {
                ""
            },
            if st.auth.is_some() {
                ", sealed records only"
            } else {
                ""
            }
        );
        Ok(())
    }

    fn open(&self, tgid: u32) -> Result {
        let mut st = self.state.lock();
        if let Some(holder) = st.agent {
            pr_warn!(
                "refused open by pid {}: agent pid {} holds the device\n",
                tgid,
                holder
            );
            return Err(EBUSY);
        }
        st.agent = Some(tgid);
        // Only a file whose changes the kernel can see may be pinned. With
        // a session the first pin stays (`agent=` or the first opener):
        // root's own program on the device must not become the binary
        // that runs unasked while no agent is connected.
        if st.auth.is_none() || st.pinned_agent.is_none() {
            if let Some(id) = sys::current_exe_id().filter(|id| id.has_change_cookie != 0) {
                st.pinned_agent = Some(id);
            }
        }
        st.greeted = false;
        st.acked = false;
        st.outbox.clear();
        self.queued.store(0, Ordering::Release);
        self.agent_tgid.store(tgid, Ordering::Release);
        pr_info!("agent pid {} connected\n", tgid);
        Ok(())
    }

    fn release(&self) {
        let mut st = self.state.lock();
        if let Some(pid) = st.agent.take() {
            pr_info!("agent pid {} disconnected\n", pid);
        }
        st.greeted = false;
        st.acked = false;
        st.epoch += 1;
        st.outbox.clear();
        self.queued.store(0, Ordering::Release);
        self.agent_tgid.store(0, Ordering::Release);
        // Waiters see the new epoch and give up on their requests.
        self.verdicts.notify_all();
        // No revocation can reach this module now: grants go (a new
        // session asks again).
        crate::SHARED.with(|s| s.v2.forget_grants());
    }

    /// The current enforcement mode.
    pub(crate) fn mode(&self) -> Mode {
        Mode::from_wire(self.mode.load(Ordering::Acquire)).unwrap_or(Mode::Enforce)
    }

    /// Whether connects and accepts are qualified (the agent said it
    /// answers net requests).
    pub(crate) fn qualifies_net(&self) -> bool {
        self.qualify_net.load(Ordering::Acquire)
    }

    /// Whether the module believes only sealed records (loaded with
    /// `authority=`).
    pub(crate) fn sealed_only(&self) -> bool {
        self.sealed_only.load(Ordering::Acquire)
    }

    /// Whether `tgid` is the connected agent.
    pub(crate) fn is_agent(&self, tgid: u32) -> bool {
        tgid != 0 && self.agent_tgid.load(Ordering::Acquire) == tgid
    }

    /// Whether `info` is the pinned agent binary, unchanged since the agent
    /// opened the device.
    pub(crate) fn is_pinned_agent(&self, info: &ExecInfo) -> bool {
        self.state.lock().pinned_agent.is_some_and(|p| {
            info.has_change_cookie != 0
                && p.dev == info.dev
                && p.ino == info.ino
                && p.generation == info.generation
                && p.change_cookie == info.change_cookie
        })
    }

    /// Queues `rec` for the agent on behalf of user `uid` and sleeps until
    /// its verdict, a timeout, the agent's departure or a signal (any, or
    /// only a fatal one: `wait`). Never fails: what could not be asked is
    /// an [`Answer`] the mode decides on.
    pub(crate) fn ask(&self, rec: &Record<'_>, uid: u32, wait: Wait) -> Answer {
        let timeout = self.verdict_timeout_ms.load(Ordering::Acquire);
        let mut st = self.state.lock();
        if st.agent.is_none() || !st.acked {
            return Answer::NoAgent;
        }
        let id = st.next_id;
        st.next_id += 1;
        let Ok(out) = encode(rec, id) else {
            bump(&STATS.busy);
            return Answer::Busy;
        };
        let place = match st.outbox.push(uid, out, true) {
            Ok(i) => i,
            Err(full) => {
                bump(&STATS.busy);
                if sys::log_ratelimit() {
                    match full {
                        Full::User => pr_warn!("uid {} holds {} queue places: request not sent\n", uid, PER_USER),
                        Full::Queue => pr_warn!("queue to the agent full ({} places): request not sent\n", PLACES),
                    }
                }
                return Answer::Busy;
            }
        };
        let digest = match &st.auth {
            Some(_) => st.outbox.record(place).map_or([0; seal::DIGEST_LEN], sys::sha256),
            None => [0; seal::DIGEST_LEN],
        };
        let pending = Pending {
            reply: None,
            digest,
        };
        if st.pending.try_create_and_insert(id, pending, GFP_KERNEL).is_err() {
            st.outbox.release(place);
            bump(&STATS.busy);
            return Answer::Busy;
        }
        st.n_pending += 1;
        self.queued.store(st.outbox.len(), Ordering::Release);
        sys::wake_readers();
        let epoch = st.epoch;
        let mut left = msecs_to_jiffies(timeout);
        // Only for the wait itself: nothing is blocked when nothing waits.
        let blocked = (wait == Wait::UntilFatal).then(sys::SignalsBlocked::new);
        let answer = loop {
            if st.epoch != epoch {
                st.drop_pending(id);
                break Answer::NoAgent;
            }
            if st.pending.get(&id).is_some_and(|p| p.reply.is_some()) {
                match st.take_pending(id) {
                    Some(Reply::Verdict(v)) => break Answer::Verdict(v),
                    Some(Reply::Key(k)) => break Answer::Key(k),
                    Some(Reply::Grant(g)) => break Answer::Grant(g),
                    None => {}
                }
            }
            match self.verdicts.wait_interruptible_timeout(&mut st, left) {
                CondVarTimeoutResult::Woken { jiffies } => left = jiffies,
                CondVarTimeoutResult::Timeout => {
                    st.drop_pending(id);
                    break Answer::TimedOut;
                }
                CondVarTimeoutResult::Signal { .. } => {
                    st.drop_pending(id);
                    break Answer::Interrupted;
                }
            }
        };
        drop(blocked);
        st.outbox.release(place);
        self.queued.store(st.outbox.len(), Ordering::Release);
        answer
    }

    /// Queues `rec` for the agent without waiting for anything (request
    /// id 0). `false` when it was dropped: no agent, one whose `Hello`
    /// version predates such records, or a full queue.
    pub(crate) fn notify(&self, rec: &Record<'_>) -> bool {
        let mut st = self.state.lock();
        if st.agent.is_none()
            || !st.acked
            || st.agent_version < proto::AGENT_VERSION_CLOSE_RECORDS
        {
            return false;
        }
        self.enqueue(&mut st, rec, 0).is_ok()
    }

    /// Whether the connected agent speaks channel keys v2.
    pub(crate) fn agent_speaks_tickets(&self) -> bool {
        let st = self.state.lock();
        st.agent.is_some() && st.agent_version >= proto::AGENT_VERSION_TICKETS
    }

    fn readable(&self) -> bool {
        self.queued.load(Ordering::Acquire) > 0
    }

    fn read(&self, ubuf: usize, len: usize) -> Result<usize> {
        let mut st = self.state.lock();
        let (i, rec) = st.outbox.front().ok_or(EAGAIN)?;
        if len < rec.len() {
            return Err(EINVAL);
        }
        let n = rec.len();
        // The mutex may sleep, so holding it across the copy keeps records
        // in order for threads sharing the descriptor; a fault leaves the
        // record queued.
        UserSlice::new(ubuf, len).writer().write_slice(rec)?;
        // Requests are queued only once the agent has read the answer to
        // its `Hello`: one queued earlier could be read first (the outbox serves
        // users round-robin, and the module's records are one "user"
        // among them), and the agent expects `HelloAck` before anything.
        if rec.get(6..8) == Some(&(Kind::HelloAck as u16).to_le_bytes()[..]) {
            st.acked = true;
        }
        st.outbox.pop(i);
        self.queued.store(st.outbox.len(), Ordering::Release);
        Ok(n)
    }

    fn write(&self, ubuf: usize, len: usize) -> Result<usize> {
        if len > proto::MAX_RECORD_LEN {
            return Err(E2BIG);
        }
        let mut buf = KVec::with_capacity(len, GFP_KERNEL)?;
        // Read once into a kernel copy, then only look at the copy.
        UserSlice::new(ubuf, len).read_all(&mut buf, GFP_KERNEL)?;
        let r = self.take_record(&buf);
        let kind = buf.get(6..8);
        if [Kind::ChannelKey, Kind::Sealed, Kind::Grant, Kind::HostKeys]
            .iter()
            .any(|k| kind == Some(&(*k as u16).to_le_bytes()[..]))
        {
            // Key material: the only copy left is the pending slot's.
            buf.fill(0);
            core::sync::atomic::compiler_fence(Ordering::SeqCst);
        }
        r.map(|()| len)
    }

    /// Acts on one record the agent wrote.
    fn take_record(&self, buf: &[u8]) -> Result {
        let (header, record) = proto::decode(buf).map_err(|e| reject(&e))?;
        // A sealed record's inner record, decoded once; its seal is checked
        // under the lock.
        let (header, record, seal) = match record {
            Record::Sealed(x) => {
                let (h, r) = proto::decode(x.inner()).map_err(|e| reject(&e))?;
                (h, r, Some(x))
            }
            other => (header, other, None),
        };
        // Sealed paths are walked before the channel's lock is taken: a
        // path walk takes inode locks, which the file hooks hold while
        // they take the module's. A record refused below wasted a walk.
        let resolved = match &record {
            Record::FileSetPaths(f) => Some(files::resolve(f)?),
            _ => None,
        };
        let mut st = self.state.lock();
        match seal {
            Some(x) => {
                let inner_header = header;
                if !st.greeted {
                    return Err(EINVAL);
                }
                let Some(auth) = &st.auth else {
                    pr_warn!("sealed record, but no authority key was given at load\n");
                    return Err(EINVAL);
                };
                let slot = seal::order_slot(inner_header.kind);
                let digest = match slot {
                    Some(_) => [0; seal::DIGEST_LEN],
                    None => match st.pending.get(&inner_header.request_id) {
                        Some(p) => p.digest,
                        None => return Err(ENOENT),
                    },
                };
                let mac = auth.mac.mac(&[&seal::prefix(&digest, x.seq), x.inner()])?;
                if !sys::mac_eq(&mac, &x.mac) {
                    bump(&STATS.bad_seal);
                    if sys::log_ratelimit() {
                        pr_warn!("refused a {:?} whose seal does not verify\n", inner_header.kind);
                    }
                    return Err(EPERM);
                }
                if let Some(i) = slot {
                    let last = st.last_seq.get(i).copied().unwrap_or(u64::MAX);
                    if !seal::order_fresh(inner_header.kind, last, x.seq) {
                        bump(&STATS.bad_seal);
                        pr_warn!("refused a replayed {:?} order (seq {} after {})\n", inner_header.kind, x.seq, last);
                        return Err(EPERM);
                    }
                    if let Some(l) = st.last_seq.get_mut(i) {
                        *l = x.seq;
                    }
                }
                self.apply(&mut st, inner_header, record, true, resolved)
            }
            None => self.apply(&mut st, header, record, false, resolved),
        }
    }

    /// Acts on one record, `sealed` by the appliance or not; `resolved`
    /// holds a `FileSetPaths` record's paths, walked before.
    fn apply(
        &self,
        st: &mut State,
        header: Header,
        record: Record<'_>,
        sealed: bool,
        resolved: Option<files::Resolved>,
    ) -> Result {
        let rule = match (&st.auth, sealed) {
            (Some(_), false) => seal::bare_rule(record.kind()),
            _ => BareRule::Accept,
        };
        if rule == BareRule::Refuse {
            bump(&STATS.unsealed);
            pr_warn!("refused an unsealed {:?}: only the appliance may send it\n", record.kind());
            return Err(EPERM);
        }
        match record {
            Record::Hello(hello) => {
                st.greeted = true;
                st.agent_version = hello.agent_version;
                pr_info!(
                    "hello from agent pid {} version {:#08x}\n",
                    hello.agent_pid,
                    hello.agent_version
                );
                let ack = Record::HelloAck(HelloAck {
                    module_version: MODULE_VERSION,
                    // CAST: MAX_RECORD_LEN is 8192.
                    max_record_len: proto::MAX_RECORD_LEN as u32,
                    sha256_driver: self.sha256_driver,
                    sha1_driver: self.sha1_driver,
                    session: st.auth.as_ref().map_or([0; seal::SESSION_PUB_LEN], |a| a.session),
                });
                self.enqueue(st, &ack, header.request_id)?;
            }
            _ if !st.greeted => {
                pr_warn!("agent sent {:?} before hello\n", record.kind());
                return Err(EINVAL);
            }
            Record::Verdict(mut v) => {
                if rule == BareRule::AllowIsDeny && v.decision != Decision::Deny {
                    // Not the appliance's word: no allow, nothing cached.
                    bump(&STATS.unsealed);
                    v = Verdict::deny(v.policy_generation);
                }
                let Some(slot) = st.pending.get_mut(&header.request_id) else {
                    pr_warn!(
                        "verdict {:?} for unknown or expired request {}\n",
                        v.decision,
                        header.request_id
                    );
                    return Err(ENOENT);
                };
                slot.reply = Some(Reply::Verdict(v));
                self.verdicts.notify_all();
            }
            Record::ChannelKey(mut k) => {
                let Some(Pending { reply: slot @ None, .. }) = st.pending.get_mut(&header.request_id) else {
                    k.wipe();
                    pr_warn!(
                        "channel key for unknown, expired or answered request {}\n",
                        header.request_id
                    );
                    return Err(ENOENT);
                };
                if rule == BareRule::RefuseAnswer {
                    // A key the appliance did not seal: the connection
                    // is refused rather than keyed by whoever wrote it.
                    k.wipe();
                    bump(&STATS.unsealed);
                    pr_warn!("refused an unsealed channel key for request {}\n", header.request_id);
                    *slot = Some(Reply::Verdict(Verdict::deny(0)));
                    self.verdicts.notify_all();
                    return Ok(());
                }
                // The decoded copy on this stack is wiped; the node's is
                // wiped when taken (`take_pending`).
                *slot = Some(Reply::Key(k.clone()));
                k.wipe();
                self.verdicts.notify_all();
            }
            Record::Grant(mut g) => {
                let Some(Pending { reply: slot @ None, .. }) = st.pending.get_mut(&header.request_id) else {
                    g.wipe();
                    pr_warn!("grant for unknown, expired or answered request {}\n", header.request_id);
                    return Err(ENOENT);
                };
                if rule == BareRule::RefuseAnswer {
                    g.wipe();
                    bump(&STATS.unsealed);
                    pr_warn!("refused an unsealed grant for request {}\n", header.request_id);
                    *slot = Some(Reply::Verdict(Verdict::deny(0)));
                    self.verdicts.notify_all();
                    return Ok(());
                }
                *slot = Some(Reply::Grant(g.clone()));
                g.wipe();
                self.verdicts.notify_all();
            }
            Record::HostKeys(k) => {
                crate::SHARED.with(|s| s.v2.set_keys(k)).ok_or(ENODEV)?;
                pr_info!(
                    "channel host keys: epoch {}{}\n",
                    k.epoch,
                    if sealed { " (sealed)" } else { "" }
                );
            }
            Record::Revocations(r) => {
                crate::SHARED.with(|s| s.v2.set_revocations(&r)).ok_or(ENODEV)?;
                pr_info!(
                    "channel revocations: lowest generation {}, {} hosts, {} tickets\n",
                    r.min_generation,
                    r.hosts().count(),
                    r.tickets().count()
                );
            }
            Record::Config(c) => {
                if rule == BareRule::UnlessWeakening
                    && seal::config_weakens(self.mode(), self.qualifies_net(), c.mode, c.qualify_net)
                {
                    bump(&STATS.unsealed);
                    pr_warn!(
                        "refused an unsealed Config ({:?}, net {}): only the appliance may weaken enforcement\n",
                        c.mode,
                        c.qualify_net
                    );
                    return Err(EPERM);
                }
                if c.mode == Mode::Enforce {
                    if st.enforce_pin.is_none() {
                        st.enforce_pin = Some(ModulePin::new().ok_or(ENODEV)?);
                    }
                } else {
                    st.enforce_pin = None;
                }
                self.verdict_timeout_ms
                    .store(c.verdict_timeout_ms, Ordering::Release);
                self.qualify_net.store(c.qualify_net, Ordering::Release);
                self.mode.store(c.mode as u8, Ordering::Release);
                sys::publish_mode(c.mode as u8);
                let backstop = match c.mode {
                    _ if !c.qualify_net => backstop::Mode::Off,
                    Mode::Disabled => backstop::Mode::Off,
                    Mode::Permissive => backstop::Mode::Count,
                    Mode::Enforce => backstop::Mode::Drop,
                };
                if backstop == backstop::Mode::Off {
                    // Nothing is qualified any more: whatever qualifies
                    // next learns its protected services afresh.
                    crate::SHARED.with(|s| s.backstop.forget());
                }
                sys::backstop_set(backstop);
                pr_info!(
                    "mode {:?}, verdict timeout {} ms, net {}\n",
                    c.mode,
                    c.verdict_timeout_ms,
                    if c.qualify_net {
                        "qualified"
                    } else {
                        "not asked"
                    }
                );
            }
            Record::Peers(p) => match crate::SHARED
                .with(|s| s.backstop.set_peers(&p))
                .unwrap_or(Err(ENODEV))
            {
                Ok(()) => pr_info!("protected hosts: {}\n", p.len()),
                Err(e) => {
                    pr_warn!("protected hosts not updated: errno {}\n", e.to_errno());
                    return Err(e);
                }
            },
            Record::FileSets(f) => {
                crate::SHARED
                    .with(|s| s.files.set_agent_sets(&f))
                    .unwrap_or(Err(ENODEV))?;
                pr_info!("protected file identities from the agent: {}\n", f.len());
            }
            Record::FileSetPaths(f) => {
                let r = resolved.ok_or(EINVAL)?;
                let changed = crate::SHARED
                    .with(|s| s.files.set_sealed(r))
                    .unwrap_or(Err(ENODEV))?;
                if let Some(n) = changed {
                    pr_info!(
                        "protected paths{}: {}, resolved to {} identities\n",
                        if sealed { " (sealed)" } else { "" },
                        f.len(),
                        n
                    );
                }
            }
            Record::Generation(g) => {
                // Protected services are kept (T-29): a service that
                // stopped needing a channel only loses plaintext from
                // sockets no wrapper qualified (raw, exempt), which is
                // what the backstop is for; qualified plaintext sockets
                // are marked and pass.
                crate::SHARED.with(|s| {
                    s.exec_cache.set_generation(g.policy_generation);
                    s.files.set_generation(g.policy_generation);
                    s.v2.set_generation(g.policy_generation);
                });
                pr_info!("policy generation {}\n", g.policy_generation);
            }
            Record::Sealed(_) => {
                // `Sealed::new` refuses a sealed `Sealed`.
                return Err(EINVAL);
            }
            Record::HelloAck(_)
            | Record::ExecRequest(_)
            | Record::NetRequest(_)
            | Record::ChannelClosed(_)
            | Record::FileRequest(_)
            | Record::IpcRequest(_) => {
                pr_warn!("agent sent a module-only record kind {:?}\n", record.kind());
                return Err(EINVAL);
            }
        }
        Ok(())
    }

    /// Queues the module's own record `rec` (no answer awaited) and wakes
    /// the reader.
    fn enqueue(&self, st: &mut State, rec: &Record<'_>, request_id: u64) -> Result {
        let out = encode(rec, request_id)?;
        st.outbox
            .push(MODULE_UID, out, false)
            .map_err(|_| ENOSPC)?;
        self.queued.store(st.outbox.len(), Ordering::Release);
        sys::wake_readers();
        Ok(())
    }
}

/// `rec` encoded with `request_id`.
fn encode(rec: &Record<'_>, request_id: u64) -> Result<KVec<u8>> {
    let mut out = KVec::new();
    out.extend_with(rec.encoded_len(), 0u8, GFP_KERNEL)?;
    rec.encode(request_id, &mut out).map_err(|e| {
        pr_err!("cannot encode {:?}: {}\n", rec.kind(), e);
        EINVAL
    })?;
    Ok(out)
}

/// What the channel refused to queue (debugfs `queue_busy`).
pub(crate) struct Stats {
    /// Requests that found no place (a user's share, the queue, memory).
    pub(crate) busy: AtomicU64,
    /// With a session: unsealed records refused or taken as a refusal
    /// (an allow, a key, a weakening `Config`, peers).
    pub(crate) unsealed: AtomicU64,
    /// Sealed records whose MAC did not verify, or replayed orders.
    pub(crate) bad_seal: AtomicU64,
}

/// The channel's counters.
pub(crate) static STATS: Stats = Stats {
    busy: AtomicU64::new(0),
    unsealed: AtomicU64::new(0),
    bad_seal: AtomicU64::new(0),
};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn reject(e: &DecodeError) -> Error {
    pr_warn!("rejected record from agent: {}\n", e);
    EINVAL
}

/// Runs `f` on the channel, or fails with `ENODEV` outside registration.
fn with_channel<T>(f: impl FnOnce(&Channel) -> Result<T>) -> Result<T> {
    crate::SHARED.with(|s| f(&s.channel)).unwrap_or(Err(ENODEV))
}

fn to_ssize(r: Result<usize>) -> isize {
    match r {
        // CAST: record lengths are at most MAX_RECORD_LEN.
        Ok(n) => n as isize,
        Err(e) => e.to_errno() as isize,
    }
}

#[no_mangle]
pub(crate) extern "C" fn trustbind_dev_open(tgid: u32) -> kernel::ffi::c_int {
    match with_channel(|c| c.open(tgid)) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

#[no_mangle]
pub(crate) extern "C" fn trustbind_dev_release() {
    let _ = with_channel(|c| {
        c.release();
        Ok(())
    });
}

#[no_mangle]
pub(crate) extern "C" fn trustbind_dev_read(ubuf: usize, len: usize) -> isize {
    to_ssize(with_channel(|c| c.read(ubuf, len)))
}

#[no_mangle]
pub(crate) extern "C" fn trustbind_dev_write(ubuf: usize, len: usize) -> isize {
    to_ssize(with_channel(|c| c.write(ubuf, len)))
}

#[no_mangle]
pub(crate) extern "C" fn trustbind_dev_readable() -> bool {
    crate::SHARED
        .with(|s| s.channel.readable())
        .unwrap_or(false)
}
