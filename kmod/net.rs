// SPDX-License-Identifier: GPL-2.0
//! Connect/accept qualification: the policy half of the ftrace wrappers on
//! `inet_stream_connect` and `inet_accept` (`sys/helpers.c`).
//!
//! Every TCP connect of a user-space socket (IPv4 or IPv6, loopback
//! included) reaches [`check`] before the SYN is sent, and every accepted
//! TCP connection once it is established and the peer known, before the
//! program sees it. The program is the one the process runs: its SHA-256
//! from the lineage table (what its exec, or its parent's before the fork,
//! was allowed to run), otherwise hashed now from `mm->exe_file` (a process
//! the table does not know: started before the module, or exec'd while it
//! was disabled; it is then recorded, so the next connect does not hash
//! again). A known process is never credited from `mm->exe_file`, which
//! `PR_SET_MM_EXE_FILE` can change (and which enforce mode forbids
//! changing: `exec::exe_replace_allowed`). The request goes to the agent through the channel, as an
//! exec's does, and is enforced by the same table:
//!
//! | outcome                       | enforce           | permissive         |
//! |-------------------------------|-------------------|--------------------|
//! | allow (with conditions)       | connect / accept  | connect / accept   |
//! | deny                          | refuse (below)    | go on, "would deny"|
//! | no agent / no answer in time  | refuse            | go on, "would deny"|
//! | program cannot be hashed      | refuse            | go on, "would deny"|
//! | signal while waiting (connect)| restart the call                       |
//!
//! Refusing a connect fails it with `EACCES` before any packet is sent;
//! refusing an accept fails the `accept()` with `ECONNABORTED` and resets
//! the connection (the client sees it reset).
//!
//! A non-blocking TCP accept never waits for its verdict (T-37): the
//! wrapper sets each connection that needs one aside ([`accept_defer`]:
//! a kernel socket of the module's holds it), asks on a worker
//! ([`accept_run`]) and returns `EAGAIN` once the queue is empty. An
//! allowed connection becomes ready in [`Deferred`]; the listener is woken
//! and `poll()` reports it readable until an accept takes it
//! ([`accept_take`]). A refused one is reset without ever reaching the
//! program (in permissive mode it is allowed, like any), and a listener's
//! close resets what it had aside. In disabled mode, and while
//! the connected agent has not asked for net requests (`Config`'s
//! `qualify_net`), nothing is asked. The agent's own sockets are exempt (it
//! talks to the appliance). Counters are in
//! `/sys/kernel/debug/trustbind/net_*`.
//!
//! # Bound channels
//!
//! A connect verdict with the `encrypt` obligation makes the connection a
//! channel the appliance keys. [`connect`] then waits for the
//! handshake (a non-blocking connect too: it returns 0) and asks again,
//! [`NetKind::Established`], now with the real client end, so the appliance
//! can pair it with the server's accept. The answer must be a
//! [`ChannelKey`]: it is installed as kTLS TLS 1.3 AES-256-GCM state on the
//! socket before `connect()` returns, so the program's first byte is
//! already a TLS record. On the server, an accept answered with a key is
//! bound the same way before `accept()` returns (client records already
//! queued are parsed once `TLS_RX` is set). kTLS attaches only to an
//! established connection, and a peer may close as soon as it is keyed,
//! so each end attaches the "tls" ULP (no keys: still plain TCP) before
//! the ask that may key its peer; an accept answered without a key keeps
//! that idle ULP (a program then cannot attach its own ULP to the
//! socket). Whatever else happens to a
//! connection that must be bound (a verdict instead of a key, no answer in
//! time, the agent leaving, an install failure) resets it: a bound socket
//! never carries plaintext. Install failures reset it in every mode; a
//! missing key is a refusal the mode decides on ("would deny" in
//! permissive mode, where the connection goes on unbound). Key bytes are
//! wiped once installed; they live on only in the kernel's kTLS state.
//!
//! TCP Fast Open: `sendto(MSG_FASTOPEN)` on an unconnected socket connects
//! without `inet_stream_connect`, so `tcp_sendmsg` is hooked too (only
//! sends with that flag are redirected) and such a connect is qualified
//! the same way; a bound one connects with a handshake first and sends
//! the data as its first TLS record.
//!
//! Another thread (or a process sharing the socket) may send while the
//! connect waits for its key, after the handshake: TCP would send that as
//! plaintext. While any socket binds, the `tcp_sendmsg` hook redirects
//! every send, and the sends of a binding socket wait until it is bound
//! (then go out through kTLS) or reset.
//!
//! # Channel close
//!
//! Each socket bound here is remembered ([`Bound`]: socket identity →
//! channel id, key id, role, install time; 4096 slots in groups of 8, a
//! spinlock, no allocation after load; a socket whose group is full is
//! not remembered, counted in `net_close_untracked`, and its close goes
//! unreported). `tcp_close` is hooked too: when a remembered socket closes
//! (any way: `close()`, exit, a refused accept's release), [`closed`]
//! forgets it and queues a [`ChannelClosed`] record for the agent,
//! fire-and-forget (no verdict wait), with the socket's `bytes_sent` (plus
//! what is still queued unsent at close, the FIN counting one) and
//! `bytes_received` (TCP payload bytes: TLS record headers and tags
//! included, retransmissions included in `sent`, the peer's FIN counted
//! as one received byte) and the time since the
//! key was installed. With no agent connected, an agent too old to read it
//! (`Hello` version below `AGENT_VERSION_CLOSE_RECORDS`) or a full outbox
//! the record is dropped and counted (`net_close_dropped`). Sockets still
//! open at unload are never reported.
//!
//! # UNIX-domain sockets
//!
//! A UNIX-domain stream or seqpacket `connect()` of a user-space socket is
//! qualified by the program *pair* before the connection exists:
//! [`unix_check`] runs with the listener the original `unix_stream_connect`
//! found (its credentials from `listen()` name the process that listens),
//! stopped by the module's wrapper on `security_unix_stream_connect`
//! ([`unix_reached`]) before anything was queued; [`unix_connect`] runs the
//! original in rounds, again once the listener is allowed
//! (`proto/src/unixconnect.rs`). The request carries the client's program (as above) and the
//! server's (lineage table, else hashed from its `mm->exe_file`), both
//! uids and the socket's name (the absolute path, or `@name` for an
//! abstract one), as an [`IpcRequest`]. The same mode table decides; a
//! refusal fails `connect()` with `EACCES`, and the listener never sees
//! the connection (no byte, no `SCM_RIGHTS`: T-20). When another process
//! than the listener's owner accepts (socket activation), or the owner is
//! gone, [`unix_accept`] has [`unix_check`] run again at `accept()` with
//! that process as the server (`at_accept`: T-21); a refusal fails the
//! accept with `ECONNABORTED`. Nothing is encrypted:
//! one host. Counters: `/sys/kernel/debug/trustbind/unix_*`. Same switches as
//! TCP: asked only while the agent set `qualify_net`, not in disabled
//! mode, the agent's own connects exempt.
//!
//! # Channel terms
//!
//! The key carries the channel's terms: TLS 1.2 records instead of 1.3
//! (policy `@encrypt("offload")`: NICs offload TLS 1.2; kTLS picks the
//! device itself) and an idle timeout (`@channel_idle_s`). Bound sockets
//! with a timeout are swept each second ([`sweep_idle`], a delayed work
//! in `helpers.c`): one without a byte either way for the whole timeout
//! is reset (`ETIMEDOUT` to the program, a reset to the peer) and
//! reported closed with reason `idle`. The table holds a socket reference
//! per entry, so the sweep only ever looks at live sockets.
//!
//! # Netfilter backstop
//!
//! `helpers.c` drops, without sleeping, what the wrappers would never
//! have let out: plaintext to or from a protected service (an end some
//! binding verdict named, recorded by [`protect`]) from a socket that is
//! neither bound nor allowed plaintext (marked by `sys::backstop_mark`),
//! SYNs to it from sockets no wrapper qualified, and inbound SYNs to it
//! from addresses that are no protected host (the agent's `Peers`). Same
//! switches as the rest; permissive only counts.
//!
//! (A process that exec'd while the module was disabled is not taken for
//! what it ran before: an exec that commits with no verdict staged makes
//! the process unknown, see `proto/src/lineage.rs`.)

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use kernel::new_spinlock;
use kernel::prelude::*;
use kernel::sync::SpinLock;
use kernel::rbtree::{RBTree, RBTreeNode};

use crate::device::{Answer, Wait};
use crate::exec::{Refusal, Refusals};
use crate::proto::backstop::Mark;
use crate::proto::bound::{handed_over, BoundSocket, Slot as BoundSlot};
use crate::proto::hold::HoldSet;
use crate::proto::sorted::{sort_unique, NetEnd, SortedSet};
use crate::proto::lineage::{Chain, ProcId};
use crate::proto::unixconnect::{accept_asks, Connect, Next};
use crate::proto::grants::GrantKey;
use crate::proto::ticket::{self, Addr};
use crate::proto::{
    Ancestry, ChannelClosed, ChannelKey, ChannelRole, ChannelTls, CloseReason, Decision, Family, Grant,
    IpcRequest, Mode, NetKind, NetRequest, Peers, ProgramSource, Record, CHANNEL_KEY_ID_LEN,
};
use crate::sys::{
    self, AcceptJob, HeldConn, KtlsKeys, NetInfo, RcuCell, SockRef, SockTable, TcpCounts, TicketRead, UnixInfo,
    NET_CONNECT, NET_ESTABLISHED, NET_LISTEN,
};
use crate::tickets::{self, STATS as V2_STATS};
use crate::Shared;

/// What the net path did since load (shown in debugfs, see `pem.rs`).
pub(crate) struct Stats {
    /// Connects asked about.
    pub(crate) connect_asked: AtomicU64,
    /// Accepts asked about.
    pub(crate) accept_asked: AtomicU64,
    /// Allowed by a verdict.
    pub(crate) allowed: AtomicU64,
    /// Refusals (enforce mode: connects with `EACCES`, accepts aborted)
    /// and why.
    pub(crate) refusals: Refusals,
    /// Programs hashed from `mm->exe_file` (not known from an exec).
    pub(crate) exe_hashed: AtomicU64,
    /// Connects whose verdict required a bound channel.
    pub(crate) bind_required: AtomicU64,
    /// Sockets bound to a channel (kTLS installed), both ends counted.
    pub(crate) bound: AtomicU64,
    /// Keys that could not be installed (the connection was reset).
    pub(crate) bind_failed: AtomicU64,
    /// Bound sockets not remembered (their group of the table was full):
    /// their close is not reported.
    pub(crate) close_untracked: AtomicU64,
    /// Bound sockets closed (both ends counted).
    pub(crate) closed: AtomicU64,
    /// Close records queued for the agent.
    pub(crate) close_sent: AtomicU64,
    /// Close records dropped: no agent, an agent too old, outbox full.
    pub(crate) close_dropped: AtomicU64,
    /// Channels ended by their idle timeout (connection reset).
    pub(crate) idle_ended: AtomicU64,
    /// Bound sockets open now (remembered ones).
    pub(crate) bound_open: AtomicU64,
    /// Services the backstop protects now.
    pub(crate) backstop_protected: AtomicU64,
    /// Services not protected because [`MAX_SERVICES`] were.
    pub(crate) backstop_protected_full: AtomicU64,
    /// Sockets a wrapper let go on but could not mark (their group of
    /// the map was full): the backstop drops what they send to a
    /// protected service (a bound socket is reset, never keyed).
    pub(crate) backstop_unmarked: AtomicU64,
    /// Sends on a held socket (between its handshake and its key), and
    /// plain TCP sends that reached a socket after its key was installed
    /// (they read its protocol before): sent back to restart through the
    /// socket's protocol of then, or `EAGAIN` (T-40, T-60).
    pub(crate) send_restarted: AtomicU64,
    /// Non-blocking accepts' connections set aside while asked about
    /// (T-37): the accept returned `EAGAIN` at once.
    pub(crate) accept_deferred: AtomicU64,
    /// Of those, allowed and handed out by a later accept.
    pub(crate) accept_handed: AtomicU64,
    /// Non-blocking accepts that waited for their verdict after all: no
    /// place to set the connection aside (see [`DEFERRED_PLACES`]).
    pub(crate) accept_waited: AtomicU64,
}

/// The net path's counters.
pub(crate) static STATS: Stats = Stats {
    connect_asked: AtomicU64::new(0),
    accept_asked: AtomicU64::new(0),
    allowed: AtomicU64::new(0),
    refusals: Refusals::new(),
    exe_hashed: AtomicU64::new(0),
    bind_required: AtomicU64::new(0),
    bound: AtomicU64::new(0),
    bind_failed: AtomicU64::new(0),
    close_untracked: AtomicU64::new(0),
    closed: AtomicU64::new(0),
    close_sent: AtomicU64::new(0),
    close_dropped: AtomicU64::new(0),
    idle_ended: AtomicU64::new(0),
    bound_open: AtomicU64::new(0),
    send_restarted: AtomicU64::new(0),
    accept_deferred: AtomicU64::new(0),
    accept_handed: AtomicU64::new(0),
    accept_waited: AtomicU64::new(0),
    backstop_protected: AtomicU64::new(0),
    backstop_protected_full: AtomicU64::new(0),
    backstop_unmarked: AtomicU64::new(0),
};

/// Protected services at most: past this a channel's service is not
/// protected by the backstop (counted); the wrappers still qualify it.
const MAX_SERVICES: usize = 1024;

/// An immutable sorted set of connection ends (`proto/src/sorted.rs`).
type EndSet = SortedSet<KVec<NetEnd>>;

/// The netfilter backstop's sets, read under RCU on every packet the
/// hooks look at: the protected services (the ends of connections some
/// verdict bound: the peer of a connect, this host's end of an accept,
/// in the socket's network namespace), and the protected hosts (the
/// agent's `Peers` record). Kept across policy generations (T-29);
/// forgotten when the backstop is switched off.
#[pin_data]
pub(crate) struct Backstop {
    #[pin]
    services: RcuCell<EndSet>,
    /// Services in `services`: 0 keeps the hooks from parsing packets.
    armed: AtomicUsize,
    #[pin]
    peers: RcuCell<EndSet>,
}

impl Backstop {
    /// Nothing protected; no list of protected hosts yet.
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            services <- RcuCell::new(),
            armed: AtomicUsize::new(0),
            peers <- RcuCell::new(),
        })
    }

    fn service(info: &NetInfo) -> NetEnd {
        // CAST: 4 or 6.
        NetEnd::new(info.net, info.family as u8, &info.dst_addr, info.dst_port)
    }

    /// Records `info`'s destination as a protected service: plaintext to
    /// or from it is dropped. `Ok(true)` if it was new; `ENOSPC` past
    /// [`MAX_SERVICES`]. Process context (sleeps: the old set is freed
    /// after a grace period).
    pub(crate) fn protect(&self, info: &NetInfo) -> Result<bool> {
        let e = Self::service(info);
        if self.is_protected(info) {
            return Ok(false);
        }
        let mut added = 0;
        self.services.update(|cur| {
            let empty = SortedSet::new(&[][..]).ok_or(EINVAL)?;
            let (len, at) = match cur {
                Some(set) => (set.len(), set.insertion(&e)),
                None => (0, empty.insertion(&e)),
            };
            if at.is_none() {
                return Ok(None);
            }
            if len >= MAX_SERVICES {
                bump(&STATS.backstop_protected_full);
                return Err(ENOSPC);
            }
            let out = KVec::with_capacity(len + 1, GFP_KERNEL)?;
            let push = |v: &mut KVec<NetEnd>, x| v.push(x, GFP_KERNEL);
            let next = match cur {
                Some(set) => set.with(&e, out, push),
                None => empty.with(&e, out, push),
            }
            .ok_or(ENOMEM)?;
            added = next.len();
            Ok(Some(KBox::new(next, GFP_KERNEL)?))
        })?;
        if added == 0 {
            return Ok(false);
        }
        self.armed.store(added, Ordering::Release);
        // CAST: at most MAX_SERVICES.
        STATS.backstop_protected.store(added as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Whether the server end of `info` is a protected service already.
    pub(crate) fn is_protected(&self, info: &NetInfo) -> bool {
        self.protected(&Self::service(info))
    }

    /// Whether `e` is a protected service. Any context.
    pub(crate) fn protected(&self, e: &NetEnd) -> bool {
        self.services.read(|set| set.is_some_and(|set| set.contains(e)))
    }

    /// Whether any service is protected. Any context.
    pub(crate) fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire) != 0
    }

    /// Forgets every protected service (the backstop was switched off).
    /// Sleeps.
    pub(crate) fn forget(&self) {
        self.armed.store(0, Ordering::Release);
        self.services.clear();
        STATS.backstop_protected.store(0, Ordering::Relaxed);
    }

    /// Replaces the protected hosts. Sleeps.
    pub(crate) fn set_peers(&self, peers: &Peers<'_>) -> Result {
        let mut v = KVec::with_capacity(peers.len(), GFP_KERNEL)?;
        for (family, addr) in peers.iter() {
            v.push(NetEnd::host(family as u8, &addr), GFP_KERNEL)?;
        }
        let n = sort_unique(&mut v);
        let mut kept = KVec::with_capacity(n, GFP_KERNEL)?;
        for e in v.iter().take(n) {
            kept.push(*e, GFP_KERNEL)?;
        }
        let set = SortedSet::new(kept).ok_or(EINVAL)?;
        self.peers.update(|_| Ok::<_, Error>(Some(KBox::new(set, GFP_KERNEL)?)))
    }

    /// Whether an inbound packet's source is a protected host; `None`
    /// until the first list came. Any context.
    pub(crate) fn from_peer(&self, family: u8, addr: &[u8; 16]) -> Option<bool> {
        let host = NetEnd::host(family, addr);
        self.peers.read(|set| set.map(|set| set.contains(&host)))
    }
}

/// The send hold (`proto/src/hold.rs`): the sockets between their
/// handshake and their channel key. Lock-free: every TCP send on the host
/// reads it while any socket is held.
static HOLD: HoldSet = HoldSet::new();

/// A bound connect ([`connect_bound`], through `tb_connect_hold`) holds
/// the sends of `sk` before it connects; `false`
/// when its group of the set is full (it waits for a leave and retries).
#[no_mangle]
extern "C" fn trustbind_hold_enter(sk: kernel::ffi::c_ulong) -> bool {
    // CAST: `unsigned long` and `usize` are both pointer-sized here.
    HOLD.enter(sk as usize)
}

/// `sk` is bound (or reset): its sends go on.
#[no_mangle]
extern "C" fn trustbind_hold_leave(sk: kernel::ffi::c_ulong) {
    // CAST: as above.
    HOLD.leave(sk as usize);
}

/// Whether any socket is held (the `tcp_sendmsg` and
/// `sk_stream_wait_connect` callbacks redirect only then). Any context.
#[no_mangle]
extern "C" fn trustbind_hold_any() -> bool {
    HOLD.any()
}

/// Whether the sends of `sk` are held now. Any context.
#[no_mangle]
extern "C" fn trustbind_send_held(sk: kernel::ffi::c_ulong) -> bool {
    // CAST: as above.
    HOLD.held(sk as usize)
}

/// A send on a held socket was sent back to restart (or failed with
/// `EAGAIN`): counted.
#[no_mangle]
extern "C" fn trustbind_send_restarted() {
    bump(&STATS.send_restarted);
}

/// Bound sockets remembered at once at most (a power of two; ~48 bytes
/// each).
const BOUND_SLOTS: usize = 4096;

/// The sockets bound to channels, by socket identity (logic in
/// `proto/src/bound.rs`; the table owns a reference on each socket in it,
/// see [`sys::SockTable`]).
#[pin_data]
pub(crate) struct Bound {
    #[pin]
    inner: SpinLock<SockTable>,
    /// Entries in the table, read without the lock on every TCP close.
    live: AtomicUsize,
}

impl Bound {
    /// An empty table of [`BOUND_SLOTS`] sockets.
    pub(crate) fn new() -> Result<impl PinInit<Self, Error>> {
        let mut slots = KVVec::new();
        slots.extend_with(BOUND_SLOTS, BoundSlot::EMPTY, GFP_KERNEL)?;
        let table = SockTable::new(slots).ok_or(EINVAL)?;
        Ok(try_pin_init!(Self {
            inner <- new_spinlock!(table, "trustbind_bound"),
            live: AtomicUsize::new(0),
        }? Error))
    }

    fn counted(&self, t: &SockTable) {
        self.live.store(t.len(), Ordering::Release);
        // CAST: at most BOUND_SLOTS.
        STATS.bound_open.store(t.len() as u64, Ordering::Relaxed);
    }

    /// Remembers the socket `info` names (the wrapper running this call
    /// holds it). `false` when its group is full.
    fn insert(&self, info: &NetInfo, entry: BoundSocket) -> bool {
        let sk = SockRef::hold(info);
        let mut t = self.inner.lock();
        let ok = t.insert(sk, entry);
        self.counted(&t);
        ok
    }

    /// Forgets `sk` (just closed); the table's reference is dropped.
    fn take(&self, sk: usize) -> Option<BoundSocket> {
        if self.live.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut t = self.inner.lock();
        let (sk, e) = t.take(sk)?;
        self.counted(&t);
        drop(t);
        drop(sk);
        Some(e)
    }

    /// Takes out the sockets idle too long (see `BoundTable::sweep_idle`),
    /// each with the table's reference.
    fn sweep<const N: usize>(&self, now_ms: u64) -> ([Option<(SockRef, BoundSocket)>; N], bool) {
        let mut t = self.inner.lock();
        let r = t.sweep_idle(now_ms);
        self.counted(&t);
        r
    }
}

/// A TCP socket closed (`tcp_close` returned): if it was bound, reports
/// the channel's end to the agent, fire-and-forget.
pub(crate) fn closed(s: &Shared, sk: usize, c: &TcpCounts) {
    accept_forget(s, sk);
    let Some(e) = s.bound.take(sk) else {
        return;
    };
    let sent = handed_over(c.bytes_sent, c.write_seq, c.snd_nxt);
    report_close(s, &e, CloseReason::Closed, sent, c.bytes_received);
}

/// Channels ended per idle sweep at most (the rest wait a second).
const IDLE_BATCH: usize = 16;

/// The idle sweep: resets the connections of channels without a byte
/// either way for their idle timeout and reports them closed (`idle`).
/// Whether a socket with a timeout is left. A workqueue: process context.
pub(crate) fn sweep_idle(s: &Shared) -> bool {
    let (out, more) = s.bound.sweep::<IDLE_BATCH>(sys::now_ms());
    let mut n = 0;
    for (sk, e) in out.into_iter().flatten() {
        let c = sk.counts();
        sk.idle_end();
        bump(&STATS.idle_ended);
        report_close(s, &e, CloseReason::Idle, c.bytes_sent, c.bytes_received);
        n += 1;
    }
    more || n == IDLE_BATCH
}

/// Queues the [`ChannelClosed`] record of one end for the agent.
fn report_close(
    s: &Shared,
    e: &BoundSocket,
    reason: CloseReason,
    bytes_sent: u64,
    bytes_received: u64,
) {
    bump(&STATS.closed);
    let duration_ms = sys::now_ms().saturating_sub(e.opened_ms);
    let rec = Record::ChannelClosed(ChannelClosed {
        channel_id: e.channel_id,
        key_id: e.key_id,
        role: e.role,
        reason,
        bytes_sent,
        bytes_received,
        duration_ms,
    });
    let queued = s.channel.notify(&rec);
    bump(if queued {
        &STATS.close_sent
    } else {
        &STATS.close_dropped
    });
    pr_info!(
        "channel {} {}: {} end, key {}, sent {} received {} bytes, {} ms{}\n",
        e.channel_id,
        match reason {
            CloseReason::Closed => "closed",
            CloseReason::Idle => "ended idle (connection reset)",
        },
        match e.role {
            ChannelRole::Connect => "connect",
            ChannelRole::Accept => "accept",
        },
        KeyId(&e.key_id),
        bytes_sent,
        bytes_received,
        duration_ms,
        if queued { "" } else { " (not reported)" }
    );
}

/// What the UNIX connect path did since load (debugfs `unix_*`).
pub(crate) struct UnixStats {
    /// Connects asked about.
    pub(crate) asked: AtomicU64,
    /// Allowed by a verdict.
    pub(crate) allowed: AtomicU64,
    /// Refusals (enforce mode: severed, `EACCES`) and why.
    pub(crate) refusals: Refusals,
    /// Programs (client or server) hashed from `mm->exe_file`.
    pub(crate) exe_hashed: AtomicU64,
}

/// The UNIX connect path's counters.
pub(crate) static UNIX_STATS: UnixStats = UnixStats {
    asked: AtomicU64::new(0),
    allowed: AtomicU64::new(0),
    refusals: Refusals::new(),
    exe_hashed: AtomicU64::new(0),
};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// An address and port for log lines.
#[derive(Clone, Copy)]
struct Endpoint(Family, [u8; 16], u16);

impl core::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let Endpoint(family, a, port) = self;
        match family {
            Family::Ipv4 => write!(f, "{}.{}.{}.{}:{}", a[0], a[1], a[2], a[3], port),
            Family::Ipv6 => {
                f.write_str("[")?;
                for (i, pair) in a.chunks_exact(2).enumerate() {
                    if i > 0 {
                        f.write_str(":")?;
                    }
                    write!(f, "{:x}", u16::from_be_bytes([pair[0], pair[1]]))?;
                }
                write!(f, "]:{}", port)
            }
        }
    }
}

/// A process's connection end for log lines: `pid N client -> server`.
#[derive(Clone, Copy)]
struct Connection {
    pid: u32,
    src: Endpoint,
    dst: Endpoint,
}

impl core::fmt::Display for Connection {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "pid {} {} -> {}", self.pid, self.src, self.dst)
    }
}

/// A key id for log lines: its first 8 bytes in hex.
struct KeyId<'a>(&'a [u8]);

impl core::fmt::Display for KeyId<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.0.iter().take(8) {
            write!(f, "{:02x}", b)?;
        }
        Ok(())
    }
}

/// What a verdict let through.
enum Granted {
    /// A plain connection; for a connect, whether it must become a bound
    /// channel (the `encrypt` obligation).
    Plain { encrypt: bool },
    /// A bound channel: install this key.
    Key(ChannelKey),
    /// Channel keys v2: a grant for this connect's program pair (the
    /// program it was asked for, to key the cache).
    Grant(Grant, [u8; 32]),
}

/// `NetInfo::bind` of a connect that must be bound with a v1 key (asked
/// again once established).
const BIND_V1: u32 = 1;
/// `NetInfo::bind` of a connect bound from a v2 grant (the grants cache
/// holds it).
const BIND_TICKET: u32 = 2;

/// Decides one connection end: `Ok` lets it go on. A connect may set
/// `info.bind`; an accept or an established connect answered with a key is
/// bound here.
pub(crate) fn check(s: &Shared, info: &mut NetInfo) -> Result {
    check_as(s, info, None)
}

/// How a qualified connect goes on.
pub(crate) enum Connected {
    /// As plain TCP (or not asked about): the wrapper runs the original.
    Plain,
    /// Connected here, a bound channel with its key installed.
    Bound,
}

/// A user-space connect of an IPv4/IPv6 stream socket: asked about; a
/// connection that must be a bound channel is connected and keyed here
/// ([`connect_bound`]).
pub(crate) fn connect(s: &Shared, c: &sys::Connecting) -> Result<Connected> {
    let Some(info) = c.info() else {
        return Ok(Connected::Plain);
    };
    let mut info = unmapped(info);
    // Channel keys v2: a grant for this program pair keys the connection
    // with no question to the appliance.
    let cached = cached_grant(s, &mut info);
    let grant = match cached {
        Some(g) => Some(g),
        None => {
            check(s, &mut info)?;
            match info.bind {
                0 => return Ok(Connected::Plain),
                BIND_TICKET => Some(grant_of(s, &info).ok_or(EACCES)?),
                _ => None,
            }
        }
    };
    let bound = match grant {
        Some(g) => connect_ticket(s, c, &mut info, g),
        None => connect_bound(s, c, &mut info),
    };
    bound.map(|()| Connected::Bound)
}

/// The cache key of a connect's grant: its program (from the lineage
/// table, else hashed now), its user, the server end.
fn grant_key(s: &Shared, info: &NetInfo) -> Option<GrantKey> {
    let (program, _, _) = program_of_current(s, info).ok()?;
    Some(GrantKey {
        program,
        uid: info.uid,
        // CAST: 4 or 6.
        family: info.family as u8,
        addr: info.dst_addr,
        port: info.dst_port,
    })
}

/// The grant the cache holds for this connect, if any.
fn grant_of(s: &Shared, info: &NetInfo) -> Option<Grant> {
    s.v2.grant(&grant_key(s, info)?)
}

/// A connect that a cached grant lets go on without asking: marked and
/// protected as an allowed channel connect is. `None` when it must ask.
fn cached_grant(s: &Shared, info: &mut NetInfo) -> Option<Grant> {
    if !asks(s, s.channel.mode(), info.tgid) || sys::is_mptcp(info) {
        return None;
    }
    let g = grant_of(s, info)?;
    let _ = sys::backstop_mark(info, Mark::Channel);
    bump(&STATS.bind_required);
    bump(&V2_STATS.grant_hits);
    info.bind = BIND_TICKET;
    protect(s, info);
    Some(g)
}

/// Connects a socket whose program pair holds a grant: the handshake
/// (waited for, the program's sends held, as [`connect_bound`]), then the
/// ticket in-band and the keys derived here ([`send_ticket`]); anything
/// else aborts the connection.
fn connect_ticket(s: &Shared, c: &sys::Connecting, info: &mut NetInfo, mut g: Grant) -> Result {
    let r = connect_held(c, info, |info| send_ticket(s, info, &g));
    g.wipe();
    r
}

/// `info`'s ends as the ticket's layouts name them: (client, server).
fn ends(info: &NetInfo) -> ((Addr, u16), (Addr, u16)) {
    // CAST: 4 or 6.
    let family = info.family as u8;
    (
        (
            Addr {
                family,
                bytes: info.src_addr,
            },
            info.src_port,
        ),
        (
            Addr {
                family,
                bytes: info.dst_addr,
            },
            info.dst_port,
        ),
    )
}

/// The client's half of a v2 channel, just established: sends the
/// ticket message (a fresh nonce), derives the connection's keys from the
/// pair secret, both initial sequence numbers and the nonce, and binds.
fn send_ticket(s: &Shared, info: &NetInfo, g: &Grant) -> Result {
    let subject = subject_of(info);
    let _ = sys::ktls_prepare(info);
    let (isn_c, isn_s) = sys::tcp_isns(info);
    let mut nonce = [0u8; ticket::CLIENT_NONCE_LEN];
    sys::random(&mut nonce);
    let message = ticket::assemble(&nonce, g.epoch, &g.gcm_nonce, &g.ciphertext, &g.tag);
    // The ticket is this connection's only plaintext: the socket is
    // allowed it for that one send (the program's own sends are held
    // until it is bound), then marked bound (in `bind`) before any key
    // is in. Sent first, right behind the handshake's last ACK, so the
    // server's accept finds it at once; the keys are derived meanwhile.
    sys::backstop_mark(info, Mark::Plain)?;
    sys::ticket_send(info, &message).inspect_err(|e| {
        pr_warn!("channel connect reset: {} (ticket not sent: errno {})\n", subject, e.to_errno())
    })?;
    bump(&V2_STATS.tickets_sent);
    let (client, server) = ends(info);
    let (to_server, to_client) =
        tickets::connection_keys(&g.pair_secret, &g.ticket_id, &nonce, (isn_c, isn_s), client, server)
            .inspect_err(|e| pr_warn!("channel connect reset: {} (key derivation: errno {})\n", subject, e.to_errno()))?;
    let keys = KtlsKeys {
        tx: to_server,
        rx: to_client,
        tls12: g.tls == ChannelTls::Tls12,
    };
    let material = Material {
        channel_id: g.channel_id(),
        key_id: g.ticket_id,
        keys,
        idle_timeout_s: g.idle_timeout_s,
    };
    bind(s, info, NetKind::Established, &material, &subject, "channel connect")
}

/// How long an accept on a registered service waits for its client's
/// ticket before asking the appliance as for a v1 client (which sends
/// nothing before its key).
const TICKET_WAIT_MS: u32 = 2000;

/// What an accept's ticket came to.
enum TicketOutcome {
    /// Keyed and bound.
    Bound,
    /// No ticket: asked as v1.
    Absent,
}

/// The server's half of a v2 channel, on an accept of a registered
/// service: reads the client's ticket message (waiting for it at most
/// [`TICKET_WAIT_MS`]), opens it with this host's key of its epoch,
/// checks it (this host, this port, the accepting program, the peer's
/// address, expiry, generation, revocations), derives the keys and
/// binds. No appliance round trip. `Err`: refused (reset, every mode: the
/// client holds a key, so plaintext could not follow).
fn accept_ticket(s: &Shared, info: &NetInfo, program: &Program) -> Result<TicketOutcome> {
    let subject = subject_of(info);
    let Some(mut hk) = s.v2.keys() else {
        return Ok(TicketOutcome::Absent);
    };
    let r = accept_ticket_with(s, info, program, &hk, &subject);
    hk.wipe();
    match &r {
        Ok(TicketOutcome::Bound) => bump(&V2_STATS.tickets_accepted),
        Ok(TicketOutcome::Absent) => bump(&V2_STATS.tickets_absent),
        Err(_) => bump(&V2_STATS.tickets_refused),
    }
    r
}

fn accept_ticket_with(
    s: &Shared,
    info: &NetInfo,
    program: &Program,
    hk: &ticket::HostKeys,
    subject: &Connection,
) -> Result<TicketOutcome> {
    let _ = sys::ktls_prepare(info);
    let (isn_s, isn_c) = sys::tcp_isns(info);
    let mut buf = [0u8; ticket::MESSAGE_LEN];
    match sys::ticket_read(info, &mut buf, TICKET_WAIT_MS) {
        Ok(TicketRead::Read) => {}
        Ok(TicketRead::Other) => return Ok(TicketOutcome::Absent),
        Err(e) if e.to_errno() == -(kernel::bindings::ETIMEDOUT as i32) => return Ok(TicketOutcome::Absent),
        Err(e) => {
            pr_warn!("accept reset: {} (reading its ticket: errno {})\n", subject, e.to_errno());
            return Err(e);
        }
    }
    let refuse = |why: &str| {
        pr_warn!("accept reset: {} (ticket refused: {})\n", subject, why);
        sys::econnreset()
    };
    let m = match ticket::message(&buf) {
        Ok(Some(m)) => m,
        _ => return Err(refuse("malformed")),
    };
    let key = hk.of_epoch(m.epoch).ok_or_else(|| refuse("sealed under an epoch this host has no key of"))?;
    let mut t = tickets::open(key, &m).map_err(|_| refuse("does not open under this host's key"))?;
    let (client, server) = ends(info);
    let accepting = ticket::Accepting {
        host: &hk.host,
        port: info.dst_port,
        program: &program.0,
        peer: client.0,
        now_s: sys::real_seconds(),
        min_generation: s.v2.min_generation(),
    };
    let checked = ticket::check(&t, &accepting, |h, id| s.v2.revoked(h, id));
    let r = match checked {
        Err(e) => Err(refuse(e.reason())),
        Ok(()) => tickets::connection_keys(&t.pair_secret, &t.id, m.client_nonce, (isn_c, isn_s), client, server)
            .and_then(|(to_server, to_client)| {
                let mut key_id = [0u8; CHANNEL_KEY_ID_LEN];
                key_id.copy_from_slice(&t.id);
                let material = Material {
                    channel_id: ticket::channel_id(&t.id),
                    key_id,
                    keys: KtlsKeys {
                        tx: to_client,
                        rx: to_server,
                        tls12: t.terms & ticket::TERM_TLS12 != 0,
                    },
                    idle_timeout_s: t.idle_s,
                };
                bind(s, info, NetKind::Accept, &material, subject, "accept")
            })
            .map(|()| TicketOutcome::Bound),
    };
    sys::wipe(&mut t.pair_secret);
    r
}

/// A `listen()` that succeeded: with channel keys v2, the program is
/// registered with the appliance as the server of its port, so clients
/// get grants for it; a registration whose verdict carries the `encrypt`
/// obligation makes this host's accepts on that port look for tickets. A
/// refusal changes nothing here (the listen stands; its accepts are asked
/// as before).
pub(crate) fn listen(s: &Shared, info: &mut NetInfo) {
    if !asks(s, s.channel.mode(), info.tgid)
        || tickets::SELF_TEST.load(Ordering::Acquire) != 1
        || !s.channel.agent_speaks_tickets()
    {
        return;
    }
    let family = if info.family == 6 {
        Family::Ipv6
    } else {
        Family::Ipv4
    };
    *info = unmapped(*info);
    let subject = subject_of(info);
    match qualify(s, info, NetKind::Listen, family, None) {
        // Only a service whose accepts the policy binds to channels
        // (`@encrypt` on the permit) looks for tickets: a plaintext one
        // never waits for a ticket that cannot come.
        Ok(Granted::Plain { encrypt: true }) => {
            s.v2.register(info.dst_port);
            pr_info!("listen registered for channels: {}\n", subject.dst);
        }
        Ok(Granted::Plain { encrypt: false }) => {}
        Ok(Granted::Key(mut k)) => k.wipe(),
        Ok(Granted::Grant(mut g, _)) => g.wipe(),
        Err(Ok(r)) => pr_info!("listen not registered: {} ({})\n", subject.dst, r),
        Err(Err(_)) => {}
    }
}

/// The key material and the identities of a channel being bound.
struct Material {
    channel_id: u64,
    key_id: [u8; CHANNEL_KEY_ID_LEN],
    keys: KtlsKeys,
    idle_timeout_s: u32,
}

/// The connection `info` names, for log lines.
fn subject_of(info: &NetInfo) -> Connection {
    let family = if info.family == 6 {
        Family::Ipv6
    } else {
        Family::Ipv4
    };
    Connection {
        pid: info.tgid,
        src: Endpoint(family, info.src_addr, info.src_port),
        dst: Endpoint(family, info.dst_addr, info.dst_port),
    }
}

/// Connects a socket whose connect was qualified with `info.bind`: waits
/// for the handshake even on a non-blocking socket (`connect()` then
/// returns 0, as POSIX allows) and without fast open (which would defer
/// the SYN to the first send), so the key is installed before the program
/// can send; then asks for the key (`NET_ESTABLISHED`, the real client end
/// known), which [`check`] installs. Anything else aborts the connection.
/// The socket's sends are held from before the SYN until the key is in
/// (T-40; the set has room for 256 sockets at once, past that connects
/// wait for a leave).
fn connect_bound(s: &Shared, c: &sys::Connecting, info: &mut NetInfo) -> Result {
    connect_held(c, info, |info| check(s, info))
}

/// The handshake of a connect that must be bound, the program's sends
/// held from before the SYN until `bind` (keying the established
/// connection) is done; a failure of `bind` resets the connection.
fn connect_held(c: &sys::Connecting, info: &mut NetInfo, bind: impl FnOnce(&mut NetInfo) -> Result) -> Result {
    c.hold()?;
    let r = match c.connect_blocking() {
        // Interrupted or timed out (`SO_SNDTIMEO`) while the handshake
        // goes on: abandoned, so it never completes unbound; a new
        // `connect()` is qualified from the start.
        Err(e) => {
            c.abandon();
            Err(e)
        }
        Ok(()) => {
            c.established(info);
            *info = unmapped(*info);
            bind(info).inspect_err(|_| c.reset())
        }
    };
    c.unhold();
    r
}

/// A program as the net path sends it: hash, ancestry, where the hash
/// comes from.
pub(crate) type Program = ([u8; 32], Chain, ProgramSource);

/// Whether a connection of process `tgid` is asked about in `mode` (not
/// in disabled mode, not while the agent does not qualify connections,
/// never the agent's own).
fn asks(s: &Shared, mode: Mode, tgid: u32) -> bool {
    mode != Mode::Disabled && s.channel.qualifies_net() && !s.channel.is_agent(tgid)
}

/// [`check`], the program resolved already (`Some`: an accept decided on a
/// worker, whose own task is not the accepting one).
fn check_as(s: &Shared, info: &mut NetInfo, program: Option<Program>) -> Result {
    let mode = s.channel.mode();
    let kind = match info.kind {
        NET_CONNECT => NetKind::Connect,
        NET_ESTABLISHED => NetKind::Established,
        NET_LISTEN => NetKind::Listen,
        _ => NetKind::Accept,
    };
    if !asks(s, mode, info.tgid) {
        // A connection that had to be bound stays bound-or-nothing even if
        // the mode changed meanwhile.
        return match kind {
            NetKind::Established if mode != Mode::Disabled => Err(sys::econnreset()),
            _ => Ok(()),
        };
    }
    let family = if info.family == 6 {
        Family::Ipv6
    } else {
        Family::Ipv4
    };
    let what = match kind {
        NetKind::Connect => "connect",
        NetKind::Accept => "accept",
        NetKind::Established => "channel connect",
        NetKind::Listen => "listen",
    };
    let subject = Connection {
        pid: info.tgid,
        src: Endpoint(family, info.src_addr, info.src_port),
        dst: Endpoint(family, info.dst_addr, info.dst_port),
    };
    if kind == NetKind::Established
        || (kind == NetKind::Accept && s.backstop.is_protected(info))
    {
        // kTLS attaches only while the connection is ESTABLISHED, and the
        // peer may send its FIN as soon as it has its key, which this ask
        // can release: attach the ULP first (plain TCP until keyed) to
        // sockets that will be channels: an established connect that must
        // be bound, an accept on a service of this host some verdict
        // already bound. Not to other accepts: a ULP cannot be removed,
        // and a plaintext connection carrying one loses zero-copy sends
        // and its program's own kTLS (T-39). The first channel to a
        // service this host has not bound yet attaches when its key
        // comes (`bind`); if the client closed first, it is reset. A
        // failure here (the peer already closed, another ULP) shows again
        // when a key comes.
        let _ = sys::ktls_prepare(info);
    }
    if kind == NetKind::Accept
        && s.v2.serves(info.dst_port)
        && s.v2.serving()
        && s.channel.agent_speaks_tickets()
    {
        // Channel keys v2: a registered service's client sends its ticket
        // first; only a connection without one is asked about.
        let p = match program {
            Some(p) => Some(p),
            None => program_of_current(s, info).ok(),
        };
        if let Some(p) = p {
            match accept_ticket(s, info, &p)? {
                TicketOutcome::Bound => return Ok(()),
                TicketOutcome::Absent => return check_asked(s, info, kind, family, Some(p), mode, &subject, what),
            }
        }
    }
    check_asked(s, info, kind, family, program, mode, &subject, what)
}

/// [`check_as`] once it is to ask the appliance.
#[allow(clippy::too_many_arguments)]
fn check_asked(
    s: &Shared,
    info: &mut NetInfo,
    kind: NetKind,
    family: Family,
    program: Option<Program>,
    mode: Mode,
    subject: &Connection,
    what: &str,
) -> Result {
    let refusal = match qualify(s, info, kind, family, program) {
        Ok(Granted::Plain { encrypt }) => match kind {
            NetKind::Connect if encrypt && sys::is_mptcp(info) => {
                // kTLS cannot sit on an MPTCP socket: a connection that
                // must be a channel is refused (its service protected, so
                // the backstop drops its subflows in any case); in
                // permissive mode it goes on as plain TCP, reported.
                protect(s, info);
                Refusal::Unqualifiable("an MPTCP socket cannot be a bound channel")
            }
            NetKind::Connect => {
                // Marked before the SYN, which the backstop lets out only
                // from a qualified socket when the service is protected.
                // Unmarked (its group of the map full) only matters for
                // protected services, whose backstop then drops it (fail
                // closed).
                let _ = sys::backstop_mark(
                    info,
                    if encrypt {
                        Mark::Channel
                    } else {
                        Mark::Plain
                    },
                );
                if encrypt {
                    bump(&STATS.bind_required);
                    info.bind = BIND_V1;
                    protect(s, info);
                }
                return Ok(());
            }
            NetKind::Accept if !encrypt => {
                // Unmarked (its group of the map full) only matters for
                // protected services, whose backstop then drops it (fail
                // closed).
                let _ = sys::backstop_mark(info, Mark::Plain);
                return Ok(());
            }
            // The policy requires a channel but no key came with it.
            _ => Refusal::Unbound,
        },
        Ok(Granted::Key(mut key)) => {
            let material = Material {
                channel_id: key.channel_id,
                key_id: key.key_id,
                keys: KtlsKeys::of_v1(&key),
                idle_timeout_s: key.idle_timeout_s,
            };
            key.wipe();
            return bind(s, info, kind, &material, subject, what);
        }
        Ok(Granted::Grant(g, program)) if kind == NetKind::Connect && !sys::is_mptcp(info) => {
            // Channel keys v2: kept for this program pair's connects, and
            // this one's after its handshake (`connect`).
            let key = GrantKey {
                program,
                uid: info.uid,
                // CAST: 4 or 6.
                family: info.family as u8,
                addr: info.dst_addr,
                port: info.dst_port,
            };
            s.v2.keep(key, g);
            let _ = sys::backstop_mark(info, Mark::Channel);
            bump(&STATS.bind_required);
            info.bind = BIND_TICKET;
            protect(s, info);
            return Ok(());
        }
        Ok(Granted::Grant(mut g, _)) => {
            g.wipe();
            Refusal::Unbound
        }
        Err(Err(e)) => return Err(e),
        Err(Ok(r)) => r,
    };
    STATS.refusals.apply(mode, &refusal, what, *subject)
}

/// Installs `key` on the socket and remembers it for its close; any
/// failure resets the connection.
fn bind(
    s: &Shared,
    info: &NetInfo,
    kind: NetKind,
    key: &Material,
    subject: &Connection,
    what: &str,
) -> Result {
    if kind == NetKind::Connect {
        // Nothing to bind yet: the agent answered out of turn.
        pr_warn!("{} {}: channel key before the handshake\n", what, subject);
        bump(&STATS.bind_failed);
        return Err(EACCES);
    }
    // Marked bound before any key is in the socket: from then on the
    // key cannot be read back (getsockopt TLS_TX/TLS_RX refused). A
    // socket that cannot be marked is not keyed (fail closed: reset).
    if let Err(e) = sys::backstop_mark(info, Mark::Bound) {
        pr_warn!("{} {}: cannot mark the socket bound: errno {}\n", what, subject, e.to_errno());
        bump(&STATS.bind_failed);
        return Err(EACCES);
    }
    match sys::ktls_install(info, &key.keys) {
        Ok(()) => {
            bump(&STATS.bound);
            protect(s, info);
            let now = sys::now_ms();
            let idle_ms = u64::from(key.idle_timeout_s) * 1000;
            let entry = BoundSocket {
                channel_id: key.channel_id,
                key_id: key.key_id,
                role: match kind {
                    NetKind::Accept => ChannelRole::Accept,
                    _ => ChannelRole::Connect,
                },
                opened_ms: now,
                idle_ms,
                activity: 0,
                active_ms: now,
            };
            if !s.bound.insert(info, entry) {
                bump(&STATS.close_untracked);
            } else if idle_ms != 0 {
                sys::idle_kick();
            }
            pr_info!(
                "{} bound: {} (channel {}, key {})\n",
                what,
                subject,
                key.channel_id,
                KeyId(&key.key_id)
            );
            Ok(())
        }
        Err(e) => {
            bump(&STATS.bind_failed);
            pr_warn!(
                "{} reset: {} (channel {}: kTLS install failed, errno {})\n",
                what,
                subject,
                key.channel_id,
                e.to_errno()
            );
            Err(sys::econnreset())
        }
    }
}

/// Records the service end of a connection the policy binds (the peer of
/// a connect, this host's end of an accept) for the netfilter backstop.
fn protect(s: &Shared, info: &NetInfo) {
    match s.backstop.protect(info) {
        Ok(true) => pr_info!(
            "protected service {} (plaintext to or from it is dropped)\n",
            Endpoint(
                if info.family == 6 {
                    Family::Ipv6
                } else {
                    Family::Ipv4
                },
                info.dst_addr,
                info.dst_port
            )
        ),
        Ok(false) => {}
        Err(e) => pr_warn!("protected service not recorded: errno {}\n", e.to_errno()),
    }
}

/// What the agent let through; `Err(Ok(refusal))` for a refusal the mode
/// decides on; `Err(Err(e))` to fail the call with `e` whatever the mode.
fn qualify(
    s: &Shared,
    info: &NetInfo,
    kind: NetKind,
    family: Family,
    program: Option<Program>,
) -> Result<Granted, Result<Refusal>> {
    let (sha256, chain, source) = match program {
        Some(p) => p,
        None => program_of_current(s, info).map_err(Ok)?,
    };
    bump(match kind {
        NetKind::Connect | NetKind::Established => &STATS.connect_asked,
        NetKind::Accept | NetKind::Listen => &STATS.accept_asked,
    });
    let rec = Record::NetRequest(NetRequest {
        kind,
        family,
        src_addr: info.src_addr,
        src_port: info.src_port,
        dst_addr: info.dst_addr,
        dst_port: info.dst_port,
        sha256,
        program_source: source,
        uid: info.uid,
        euid: info.euid,
        gid: info.gid,
        loginuid: info.loginuid,
        sessionid: info.sessionid,
        pid: info.tgid,
        ppid: info.ptgid,
        ancestry: ancestry(&chain),
    });
    // A connect restarts on any signal (nothing was sent yet); an
    // accepted or established connection cannot be put back, so only a
    // fatal signal ends its wait (T-38).
    let wait = if kind == NetKind::Connect {
        Wait::Interruptible
    } else {
        Wait::UntilFatal
    };
    match s.channel.ask(&rec, info.uid, wait) {
        Answer::Verdict(v) => match v.decision {
            Decision::Allow | Decision::AllowWithConditions => {
                bump(&STATS.allowed);
                Ok(Granted::Plain {
                    encrypt: v.obligations.encrypt,
                })
            }
            Decision::Deny => Err(Ok(Refusal::Denied)),
        },
        Answer::Key(k) => {
            bump(&STATS.allowed);
            Ok(Granted::Key(k))
        }
        Answer::Grant(g) => {
            bump(&STATS.allowed);
            Ok(Granted::Grant(g, sha256))
        }
        Answer::NoAgent => Err(Ok(Refusal::NoAgent)),
        Answer::TimedOut => Err(Ok(Refusal::TimedOut)),
        Answer::Busy => Err(Ok(Refusal::Busy)),
        // Nothing was sent yet on a connect: restart it. An established
        // or accepted connection cannot be put back: a fatal signal ended
        // the wait, and the wrapper resets it.
        Answer::Interrupted if kind == NetKind::Connect => Err(Err(ERESTARTSYS)),
        Answer::Interrupted => Err(Err(EINTR)),
    }
}

/// The program of the task running a connect or accept wrapper (the
/// process `info` names): from the lineage table, else hashed now.
fn program_of_current(s: &Shared, info: &NetInfo) -> core::result::Result<Program, Refusal> {
    let proc = ProcId {
        tgid: info.tgid,
        start_ns: info.start_ns,
    };
    program_of(s, proc, &STATS.exe_hashed, || {
        s.hashers.hash_current_exe().map(|(sha256, _, _)| sha256)
    })
}

/// Places for connections set aside by non-blocking accepts, in all.
pub(crate) const DEFERRED_PLACES: usize = 64;
/// Of those, at most this many of one listener.
const DEFERRED_PER_LISTENER: usize = 32;

/// The connections non-blocking accepts set aside (T-37; the book is
/// `proto/src/deferred.rs`, its values own the connections).
#[pin_data]
pub(crate) struct Deferred {
    #[pin]
    book: SpinLock<crate::proto::deferred::Deferred<HeldConn, DEFERRED_PLACES>>,
    /// Places in use (asking or ready), read without the lock on every
    /// TCP close.
    used: AtomicUsize,
}

/// Ready connections of all listeners, read without the lock by the
/// `tcp_poll` callback on every poll of a TCP socket.
static DEFERRED_READY: AtomicUsize = AtomicUsize::new(0);

impl Deferred {
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            book <- new_spinlock!(
                crate::proto::deferred::Deferred::new(DEFERRED_PER_LISTENER),
                "trustbind_deferred"
            ),
            used: AtomicUsize::new(0),
        })
    }

    /// Runs `f` on the book under its lock, then publishes its counts.
    fn with<R>(&self, f: impl FnOnce(&mut crate::proto::deferred::Deferred<HeldConn, DEFERRED_PLACES>) -> R) -> R {
        let mut b = self.book.lock();
        let r = f(&mut b);
        self.used.store(b.used(), Ordering::Release);
        DEFERRED_READY.store(b.ready(), Ordering::Release);
        r
    }
}

/// `info` with a dual-stack connection's ends as IPv4: both halves of a
/// channel name it the same way.
fn unmapped(mut info: NetInfo) -> NetInfo {
    crate::proto::addr::unmap_v4(&mut info.family, &mut info.src_addr, &mut info.dst_addr);
    info
}

/// A user-space TCP or MPTCP accept. A connection a non-blocking accept
/// set aside for this listener and now allowed is handed out first
/// (T-37). A blocking accept (or a kernel or MPTCP one) waits for its
/// verdict; a non-blocking TCP one sets each connection that needs a
/// verdict aside and takes the next from the queue until it is empty
/// (`EAGAIN`: the program's event loop goes on). A refused connection is
/// reset and fails the accept with `ECONNABORTED`.
pub(crate) fn accept(s: &Shared, a: &sys::Accepting) -> Result {
    if !a.mptcp && a.listening() {
        if let Some(held) = accept_take(s, a.listener()) {
            a.give(held);
            return Ok(());
        }
    }
    if a.mptcp || !a.nonblocking {
        a.call()?;
        let Some(info) = a.info() else {
            return Ok(());
        };
        return check(s, &mut unmapped(info)).map_err(|_| a.refuse());
    }
    loop {
        a.call()?;
        let Some(info) = a.info() else {
            return Ok(());
        };
        match accept_defer(s, &mut unmapped(info), a.listener_ref()) {
            // Set aside: the accept's socket is empty again.
            Ok(true) => continue,
            Ok(false) => return Ok(()),
            Err(_) => return Err(a.refuse()),
        }
    }
}

/// A non-blocking accept's connection (`info.sock`) that needs a verdict:
/// `Ok(true)` when it was set aside and is asked about on a worker (the
/// accept returns `EAGAIN`), `Ok(false)` when it goes to the program now,
/// `Err` when it is refused now. Without a place (or memory) to set it
/// aside, it is decided here, waiting, as a blocking accept's.
pub(crate) fn accept_defer(s: &Shared, info: &mut NetInfo, listener: SockRef) -> Result<bool> {
    if !asks(s, s.channel.mode(), info.tgid) {
        return check(s, info).map(|()| false);
    }
    match set_aside(s, info, listener) {
        Some(job) => {
            if let Err(job) = sys::defer_accept(job) {
                // Not queued (unloading): decided here instead, waiting.
                accept_run(s, job);
            }
            Ok(true)
        }
        None => check(s, info).map(|()| false),
    }
}

/// Takes the accept's connection aside into a job for the worker; `None`
/// when it stays where it is: no place or no memory (counted in
/// `net_accept_waited`), or a program that cannot be hashed (which
/// `check` then refuses).
fn set_aside(s: &Shared, info: &mut NetInfo, listener: SockRef) -> Option<KBox<AcceptJob>> {
    let Some(ticket) = s.deferred.with(|b| b.reserve(listener.id())) else {
        bump(&STATS.accept_waited);
        return None;
    };
    // The program now, in the accepting task (the worker is not it).
    // `Err(true)`: no memory, a wait to count.
    let parts = match program_of_current(s, info) {
        Err(_) => Err(false),
        Ok(program) => KBox::new_uninit(GFP_KERNEL)
            .map_err(|_| true)
            .and_then(|slot| Ok((program, slot, HeldConn::take_from(info).map_err(|_| true)?))),
    };
    let (program, slot, held) = match parts {
        Ok(p) => p,
        Err(waited) => {
            s.deferred.with(|b| b.cancel(ticket));
            if waited {
                bump(&STATS.accept_waited);
            }
            return None;
        }
    };
    bump(&STATS.accept_deferred);
    Some(KBox::write(
        slot,
        AcceptJob {
            info: *info,
            program,
            listener,
            held,
            ticket,
        },
    ))
}

/// The worker's half of a connection set aside: asks, then makes it ready
/// for its listener's next accept (and wakes the listener), or resets it
/// (refused, or its listener closed meanwhile).
pub(crate) fn accept_run(s: &Shared, job: KBox<AcceptJob>) {
    let AcceptJob {
        mut info,
        program,
        listener,
        held,
        ticket,
    } = KBox::into_inner(job);
    match check_as(s, &mut info, Some(program)) {
        Ok(()) => match s.deferred.with(|b| b.settle(ticket, held)) {
            Ok(()) => listener.wake(),
            // The listener closed: the connection is reset.
            Err(held) => drop(held),
        },
        Err(_) => {
            // Refused (counted and logged by `check_as`): reset.
            s.deferred.with(|b| b.cancel(ticket));
            drop(held);
        }
    }
}

/// The oldest connection set aside for `listener` that is ready, taken
/// out for an accept.
pub(crate) fn accept_take(s: &Shared, listener: usize) -> Option<HeldConn> {
    if DEFERRED_READY.load(Ordering::Acquire) == 0 {
        return None;
    }
    let held = s.deferred.with(|b| b.take(listener))?;
    bump(&STATS.accept_handed);
    Some(held)
}

/// Whether `listener` has a ready connection set aside.
pub(crate) fn accept_ready(s: &Shared, listener: usize) -> bool {
    DEFERRED_READY.load(Ordering::Acquire) != 0 && s.deferred.book.lock().has_ready(listener)
}

/// Whether any listener has a ready connection set aside.
pub(crate) fn accept_any() -> bool {
    DEFERRED_READY.load(Ordering::Acquire) != 0
}

/// A listener closed: the connections set aside for it are reset (those
/// still asked about when their verdict comes).
fn accept_forget(s: &Shared, listener: usize) {
    if s.deferred.used.load(Ordering::Acquire) == 0 {
        return;
    }
    while let Some(held) = s.deferred.with(|b| b.forget_one(listener)) {
        drop(held);
    }
}

/// A socket being created, for log lines.
struct NewSocket {
    pid: u32,
    family: i32,
    protocol: i32,
}

impl core::fmt::Display for NewSocket {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "pid {} family {} protocol {}",
            self.pid, self.family, self.protocol
        )
    }
}

/// Decides the creation of a user socket the PEM cannot qualify (`why`,
/// from `proto::unqualifiable::socket`: SMC; the `security_socket_create`
/// hook, any context, never sleeps): refused while connections are
/// qualified, by the mode's table. Nothing is asked.
pub(crate) fn socket_create(s: &Shared, why: &'static str, family: i32, protocol: i32) -> Result {
    let mode = s.channel.mode();
    if mode == Mode::Disabled || !s.channel.qualifies_net() {
        return Ok(());
    }
    let subject = NewSocket {
        pid: sys::current_pid(),
        family,
        protocol,
    };
    STATS
        .refusals
        .apply(mode, &Refusal::Unqualifiable(why), "socket", subject)
}

/// Whether a UNIX connect of process `tgid` is asked about at all.
pub(crate) fn unix_wanted(s: &Shared, tgid: u32) -> bool {
    s.channel.mode() != Mode::Disabled && s.channel.qualifies_net() && !s.channel.is_agent(tgid)
}

/// The UNIX connects in their rounds (`proto/src/unixconnect.rs`), by
/// connecting socket and task, each with the listener references it holds.
/// A node per connect, allocated by the connect itself (no fixed capacity
/// one user could fill: a connect can stay in its rounds for as long as
/// the listener's backlog is full).
#[pin_data]
pub(crate) struct UnixRounds {
    #[pin]
    set: SpinLock<RBTree<(usize, usize), Connect<SockRef>>>,
    /// Connects in the set, read without the lock by the security hook of
    /// every UNIX connect on the host (only a connect's own entry matters
    /// to it, entered by its own task before: program order).
    n: AtomicUsize,
}

impl UnixRounds {
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            set <- new_spinlock!(RBTree::new(), "trustbind_unix_rounds"),
            n: AtomicUsize::new(0),
        })
    }

    /// Runs `f` on the connect `key` under the lock; `None` if it is not
    /// in its rounds.
    fn with<R>(&self, key: (usize, usize), f: impl FnOnce(&mut Connect<SockRef>) -> R) -> Option<R> {
        self.set.lock().get_mut(&key).map(f)
    }
}

/// A user-space UNIX stream or seqpacket connect: runs the kernel's
/// connect in rounds, so it connects only to a listener the module
/// allowed (T-20). Its result, 0 or -errno.
pub(crate) fn unix_connect(s: &Shared, c: &sys::UnixConnect) -> i32 {
    if !unix_wanted(s, c.tgid) {
        return c.round();
    }
    let rounds = &s.unix_rounds;
    let Ok(node) = RBTreeNode::new(c.key, Connect::new(), GFP_KERNEL) else {
        return ENOMEM.to_errno();
    };
    {
        let mut set = rounds.set.lock();
        // A task runs one connect of a socket at once: the key is new.
        drop(set.insert(node));
        rounds.n.fetch_add(1, Ordering::Relaxed);
    }
    let mut err;
    loop {
        err = c.round();
        match rounds.with(c.key, |r| r.after_round()) {
            None | Some(Next::Done) => break,
            Some(Next::GiveUp(_listener)) => {
                // The name kept naming new listeners.
                err = sys::econnrefused().to_errno();
                break;
            }
            Some(Next::Ask(listener)) => {
                if let Err(e) = c.ask(&listener) {
                    err = e.to_errno();
                    break;
                }
                let before = rounds.with(c.key, |r| r.approve(listener));
                drop(before);
            }
        }
    }
    let left = {
        let mut set = rounds.set.lock();
        let left = set.remove(&c.key);
        rounds.n.fetch_sub(1, Ordering::Relaxed);
        left
    };
    // The references it held, put outside the lock.
    drop(left);
    err
}

/// The security hook of a UNIX connect (both sockets' state locks held):
/// whether the connect `key` may reach the listener `other`; a connect
/// not in its rounds (not asked about) may. `hold` references `other`.
pub(crate) fn unix_reached(s: &Shared, key: (usize, usize), other: usize, hold: impl FnOnce() -> SockRef) -> bool {
    if s.unix_rounds.n.load(Ordering::Relaxed) == 0 {
        return true;
    }
    s.unix_rounds
        .with(key, |r| r.reached(other, SockRef::id, hold))
        .unwrap_or(true)
}

/// A UNIX connect for log lines: `pid N -> PATH (server pid M)`.
struct UnixConnection<'a> {
    pid: u32,
    path: &'a [u8],
    peer_pid: u32,
}

impl core::fmt::Display for UnixConnection<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "pid {} -> ", self.pid)?;
        for &b in self.path.iter().take(256) {
            if b.is_ascii_graphic() {
                write!(f, "{}", b as char)?;
            } else {
                f.write_str("?")?;
            }
        }
        write!(f, " (server pid {})", self.peer_pid)
    }
}

/// The program of a process, its ancestry and where the hash comes from:
/// the lineage table, else `hash()` now (counted in `hashed`, then
/// recorded, with no ancestry, so the next connect does not hash again).
pub(crate) fn program_of(
    s: &Shared,
    proc: ProcId,
    hashed: &AtomicU64,
    hash: impl FnOnce() -> Result<[u8; 32]>,
) -> core::result::Result<Program, Refusal> {
    if let Some((sha256, chain)) = s.lineage.image(proc) {
        return Ok((sha256, chain, ProgramSource::Lineage));
    }
    let sha256 = hash().map_err(Refusal::Unreadable)?;
    bump(hashed);
    s.lineage.record_proc(proc, &sha256);
    Ok((sha256, Chain::EMPTY, ProgramSource::ExeFile))
}

/// One UNIX connection `unix_accept()` gave the current task: kept, or
/// (`ECONNABORTED`) refused before the acceptor reads a byte (T-21). It is
/// asked about again only when the acceptor is not the listener's owner
/// the connect was decided against
/// ([`accept_asks`](crate::proto::unixconnect::accept_asks)).
pub(crate) fn unix_accept(s: &Shared, a: &sys::UnixAccepted) -> Result {
    if !unix_wanted(s, a.acceptor.tgid) || !accept_asks(a.owner(), a.acceptor) {
        return Ok(());
    }
    // CAST: errno values are small positive integers.
    a.ask()
        .map_err(|_| Error::from_errno(-(kernel::bindings::ECONNABORTED as i32)))
}

/// Decides one UNIX connect before it is made (the listener is found, the
/// connection not yet queued): `Ok` lets it be made, an error fails
/// `connect()` with the listener never seeing it. Or, `at_accept`, one
/// accepted by another process than the listener's owner (socket
/// activation): an error fails `accept()` before the acceptor read a byte.
pub(crate) fn unix_check(s: &Shared, info: &UnixInfo) -> Result {
    let mode = s.channel.mode();
    let at_accept = info.at_accept != 0;
    if !unix_wanted(s, if at_accept { info.peer_tgid } else { info.tgid }) {
        return Ok(());
    }
    let path = sys::unix_path(info);
    let subject = UnixConnection {
        pid: info.tgid,
        path,
        peer_pid: info.peer_tgid,
    };
    let refusal = match unix_qualify(s, info, path) {
        Ok(()) => return Ok(()),
        Err(Err(e)) => return Err(e),
        Err(Ok(r)) => r,
    };
    let what = if at_accept {
        "unix accept"
    } else {
        "unix connect"
    };
    UNIX_STATS.refusals.apply(mode, &refusal, what, subject)
}

fn unix_qualify(s: &Shared, info: &UnixInfo, path: &[u8]) -> Result<(), Result<Refusal>> {
    let proc = |tgid, start_ns| ProcId { tgid, start_ns };
    // At connect the client is the calling task; at accept the server is.
    let at_accept = info.at_accept != 0;
    let hash_of = |current: bool, tgid, start_ns| {
        if current {
            s.hashers.hash_current_exe().map(|(h, _, _)| h)
        } else {
            s.hashers.hash_task_exe(tgid, start_ns).map(|(h, _)| h)
        }
    };
    if info.tgid == 0 || info.peer_tgid == 0 {
        // The client (at accept) or the listener's owner is gone: no
        // program to qualify.
        return Err(Ok(Refusal::Unreadable(ESRCH)));
    }
    let (sha256, chain, source) = program_of(s, proc(info.tgid, info.start_ns), &UNIX_STATS.exe_hashed, || {
        hash_of(!at_accept, info.tgid, info.start_ns)
    })
    .map_err(Ok)?;
    let (peer_sha256, _, peer_source) =
        program_of(s, proc(info.peer_tgid, info.peer_start_ns), &UNIX_STATS.exe_hashed, || {
            hash_of(at_accept, info.peer_tgid, info.peer_start_ns)
        })
        .map_err(Ok)?;
    bump(&UNIX_STATS.asked);
    let rec = Record::IpcRequest(IpcRequest {
        sha256,
        program_source: source,
        uid: info.uid,
        euid: info.euid,
        gid: info.gid,
        loginuid: info.loginuid,
        sessionid: info.sessionid,
        pid: info.tgid,
        ppid: info.ptgid,
        ancestry: ancestry(&chain),
        peer_sha256,
        peer_program_source: peer_source,
        peer_pid: info.peer_tgid,
        peer_uid: info.peer_uid,
        peer_gid: info.peer_gid,
        path,
    });
    // A connect restarts on a signal (nothing connected yet); an accepted
    // connection cannot be put back (T-38).
    let (asker, wait) = if at_accept {
        (info.peer_uid, Wait::UntilFatal)
    } else {
        (info.uid, Wait::Interruptible)
    };
    match s.channel.ask(&rec, asker, wait) {
        Answer::Verdict(v) => match v.decision {
            Decision::Allow | Decision::AllowWithConditions => {
                bump(&UNIX_STATS.allowed);
                Ok(())
            }
            Decision::Deny => Err(Ok(Refusal::Denied)),
        },
        // Not an answer to a UNIX connect.
        Answer::Key(mut k) => {
            k.wipe();
            Err(Ok(Refusal::Denied))
        }
        Answer::Grant(mut g) => {
            g.wipe();
            Err(Ok(Refusal::Denied))
        }
        Answer::NoAgent => Err(Ok(Refusal::NoAgent)),
        Answer::TimedOut => Err(Ok(Refusal::TimedOut)),
        Answer::Busy => Err(Ok(Refusal::Busy)),
        // Nothing is connected yet: the connect restarts (transparently
        // under SA_RESTART) and is asked about again.
        Answer::Interrupted if !at_accept => Err(Err(ERESTARTSYS)),
        // A fatal signal: the accept fails (and the task is dying).
        Answer::Interrupted => Err(Err(EINTR)),
    }
}

pub(crate) fn ancestry(chain: &Chain) -> Ancestry<'_> {
    Ancestry::from_bytes(chain.as_bytes()).unwrap_or(Ancestry::EMPTY)
}
