// SPDX-License-Identifier: GPL-2.0
//! Channel keys v2, the module's cryptography (`docs/CHANNEL-KEYS-V2.md`):
//! opening a ticket with this host's key (AES-256-GCM) and deriving a
//! connection's kTLS material from a pair secret (HKDF-SHA256), both
//! through the kernel crypto API (`sys::gcm_open`, `sys::Hmac`), over the
//! layouts and the HKDF construction `proto::ticket` and `proto::hkdf`
//! define once for the module and the appliance.
//!
//! [`V2`] keeps what the paths in `net.rs` need between connections:
//! this host's keys and the appliance's revocations (sealed orders), the
//! client's grants and the registered services (`proto::grants`).
//!
//! [`self_test`] runs at load: the crypto API must reproduce the known
//! answer the appliance's reference made (`proto::ticket_kat`), or no
//! ticket is ever opened (`ticket_self_test` in debugfs: 1 passed, 2
//! failed) and accepts ask the appliance as v1's do.

use core::sync::atomic::{AtomicU64, Ordering};
use kernel::new_spinlock;
use kernel::prelude::*;
use kernel::sync::SpinLock;

use crate::proto::grants::{Entry, GrantKey, Grants, Revoked, Services};
use crate::proto::ticket::{HostKeys, Revocations};
use crate::proto::Grant;

use crate::proto::hkdf::{self, HkdfError};
use crate::proto::ticket::{self, Addr, Direction, Message, Ticket, CLIENT_NONCE_LEN, CONN_MATERIAL_LEN};
use crate::proto::ticket_kat as kat;
use crate::sys::{self, Hmac};

/// The known answer's result: 0 not run, 1 passed, 2 failed.
pub(crate) static SELF_TEST: AtomicU64 = AtomicU64::new(0);

impl hkdf::Mac for Hmac {
    type Error = Error;
    fn mac(&self, parts: &[&[u8]]) -> Result<[u8; hkdf::HASH_LEN]> {
        Hmac::mac(self, parts)
    }
}

/// HKDF-SHA256 of `ikm` with `salt` and `info` into `out`, with the
/// crypto API's `hmac(sha256)`: one transform keyed with the salt, one
/// with the pseudorandom key for every block. Process context (allocates).
pub(crate) fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> Result {
    hkdf::derive(Hmac::keyed, salt, ikm, info, out).map_err(|e| match e {
        HkdfError::TooLong => EINVAL,
        HkdfError::Mac(e) => e,
    })
}

/// The ticket of message `m`, opened with this host's `key` of the
/// message's epoch: `EBADMSG` unless it opens (wrong host, wrong epoch,
/// or changed on the way) and decodes. Process context.
pub(crate) fn open(key: &[u8; 32], m: &Message<'_>) -> Result<Ticket> {
    let mut plain = [0u8; ticket::PLAIN_LEN];
    let opened = sys::gcm_open(
        key,
        m.gcm_nonce,
        &ticket::sealing_aad(m.epoch),
        m.ciphertext,
        m.tag,
        &mut plain,
    );
    let t = opened.and_then(|()| Ticket::decode(&plain).map_err(|_| sys::ebadmsg()));
    sys::wipe(&mut plain);
    t
}

/// Both directions' kTLS material of one connection (client to server,
/// server to client), as both ends derive it. Process context.
pub(crate) fn connection_keys(
    pair_secret: &[u8; ticket::PAIR_SECRET_LEN],
    ticket_id: &[u8; ticket::TICKET_ID_LEN],
    client_nonce: &[u8; CLIENT_NONCE_LEN],
    isn: (u32, u32),
    client: (Addr, u16),
    server: (Addr, u16),
) -> Result<(Direction, Direction)> {
    let mut okm = [0u8; CONN_MATERIAL_LEN];
    let r = hkdf(
        &ticket::conn_salt(client_nonce, isn.0, isn.1),
        pair_secret,
        &ticket::conn_info(ticket_id, client, server),
        &mut okm,
    );
    let d = r.map(|()| ticket::directions(&okm));
    sys::wipe(&mut okm);
    d
}

fn direction_is(d: &Direction, want: &[u8; 44]) -> bool {
    let mut b = [0u8; 44];
    b[..32].copy_from_slice(&d.key);
    b[32..36].copy_from_slice(&d.salt);
    b[36..].copy_from_slice(&d.iv);
    b == *want
}

/// The known answer: the host key from the farm secret (HKDF), the
/// ticket opened with it (GCM), the connection's keys (HKDF), and the
/// message with a changed byte of its ciphertext, of its tag or of its
/// epoch refused. Process context.
fn known_answer() -> Result {
    let mut host_key = [0u8; 32];
    hkdf(
        ticket::HOST_KEY_SALT,
        &kat::FARM,
        &ticket::host_key_info(&kat::SERVER_HOST, kat::EPOCH),
        &mut host_key,
    )?;
    if host_key != kat::HOST_KEY {
        return Err(sys::ebadmsg());
    }
    let m = ticket::message(&kat::MESSAGE).ok().flatten().ok_or_else(sys::ebadmsg)?;
    let t = open(&kat::HOST_KEY, &m)?;
    if t != kat::ticket() {
        return Err(sys::ebadmsg());
    }
    let (to_server, to_client) = connection_keys(
        &t.pair_secret,
        &t.id,
        m.client_nonce,
        kat::ISN,
        (Addr::v4(kat::CLIENT_END.0), kat::CLIENT_END.1),
        (Addr::v4(kat::SERVER_END.0), kat::SERVER_END.1),
    )?;
    if !direction_is(&to_server, &kat::TO_SERVER) || !direction_is(&to_client, &kat::TO_CLIENT) {
        return Err(sys::ebadmsg());
    }
    // Changed bytes: the last of the tag, one of the ciphertext, the
    // epoch's low byte (bound by the seal's additional data).
    for i in [ticket::MESSAGE_LEN - 1, ticket::MESSAGE_LEN - 100, 24] {
        let mut bad = kat::MESSAGE;
        bad[i] ^= 0x01;
        if let Ok(Some(m)) = ticket::message(&bad) {
            if open(&kat::HOST_KEY, &m).is_ok() {
                return Err(sys::ebadmsg());
            }
        }
    }
    Ok(())
}

/// Runs the known answer once, at load (process context), and records
/// the result; a failure is logged and leaves tickets unusable.
pub(crate) fn self_test() {
    let r = known_answer();
    SELF_TEST.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release);
    match r {
        Ok(()) => pr_info!("channel tickets: known answer passed (HKDF-SHA256, AES-256-GCM via the crypto API)\n"),
        Err(e) => pr_err!("channel tickets: known answer FAILED ({e:?}): no ticket will be opened\n"),
    }
}

/// Grants a client keeps at most (about 600 bytes each).
const GRANTS: usize = 64;
/// Registered services at most.
const SERVICES: usize = 64;

/// Channel keys v2's state between connections.
#[pin_data]
pub(crate) struct V2 {
    /// This host's keys (current and previous epoch), from the sealed
    /// order; `None` before the first.
    #[pin]
    keys: SpinLock<Option<HostKeys>>,
    #[pin]
    revoked: SpinLock<Revoked<KVec<u8>>>,
    #[pin]
    grants: SpinLock<Grants<KVec<Option<Entry>>>>,
    #[pin]
    services: SpinLock<Services<SERVICES>>,
}

/// What v2 did since load (debugfs `v2_*`).
pub(crate) struct Stats {
    /// Grants received from the appliance.
    pub(crate) grants_received: AtomicU64,
    /// Connects keyed from a cached grant (no appliance round trip).
    pub(crate) grant_hits: AtomicU64,
    /// Tickets sent (client).
    pub(crate) tickets_sent: AtomicU64,
    /// Tickets accepted and keyed (server).
    pub(crate) tickets_accepted: AtomicU64,
    /// Tickets refused (server): the connection was reset.
    pub(crate) tickets_refused: AtomicU64,
    /// Accepts on a registered service whose client sent no ticket
    /// (asked as v1).
    pub(crate) tickets_absent: AtomicU64,
    /// Listens registered with the appliance.
    pub(crate) listens_registered: AtomicU64,
    /// Grants dropped by a generation or a revocation.
    pub(crate) grants_dropped: AtomicU64,
}

pub(crate) static STATS: Stats = Stats {
    grants_received: AtomicU64::new(0),
    grant_hits: AtomicU64::new(0),
    tickets_sent: AtomicU64::new(0),
    tickets_accepted: AtomicU64::new(0),
    tickets_refused: AtomicU64::new(0),
    tickets_absent: AtomicU64::new(0),
    listens_registered: AtomicU64::new(0),
    grants_dropped: AtomicU64::new(0),
};

fn count(c: &AtomicU64, n: usize) {
    // CAST: a count of grants, at most GRANTS.
    c.fetch_add(n as u64, Ordering::Relaxed);
}

impl V2 {
    /// Nothing yet; the grants' and revocations' storage allocated here
    /// (about 46 KiB), never on a connection's path.
    pub(crate) fn new() -> Result<impl PinInit<Self, Error>> {
        let mut slots = KVec::with_capacity(GRANTS, GFP_KERNEL)?;
        for _ in 0..GRANTS {
            slots.push(None, GFP_KERNEL)?;
        }
        let mut buf = KVec::new();
        buf.extend_with(ticket::MAX_REVOCATIONS_LEN, 0u8, GFP_KERNEL)?;
        let revoked = Revoked::new(buf).ok_or(EINVAL)?;
        Ok(try_pin_init!(Self {
            keys <- new_spinlock!(None, "trustbind_v2_keys"),
            revoked <- new_spinlock!(revoked, "trustbind_v2_revoked"),
            grants <- new_spinlock!(Grants::new(slots), "trustbind_v2_grants"),
            services <- new_spinlock!(Services::new(), "trustbind_v2_services"),
        }? Error))
    }

    /// Whether tickets can be opened here: the known answer passed and
    /// the appliance gave this host its keys.
    pub(crate) fn serving(&self) -> bool {
        SELF_TEST.load(Ordering::Acquire) == 1 && self.keys.lock().is_some()
    }

    /// Replaces this host's keys (the old ones wiped).
    pub(crate) fn set_keys(&self, mut k: HostKeys) {
        let mut g = self.keys.lock();
        if let Some(old) = g.as_mut() {
            old.wipe();
        }
        *g = Some(k);
        drop(g);
        k.wipe();
    }

    /// A copy of this host's keys (the caller wipes it).
    pub(crate) fn keys(&self) -> Option<HostKeys> {
        *self.keys.lock()
    }

    /// Takes the appliance's revocations: kept for the server's checks,
    /// and the client's grants they name dropped.
    pub(crate) fn set_revocations(&self, r: &Revocations<'_>) {
        let own = self.keys.lock().map(|k| k.host);
        self.revoked.lock().set(r);
        count(&STATS.grants_dropped, self.grants.lock().revoke(r, own.as_ref()));
    }

    /// The policy generation moved: grants decided before are dropped.
    pub(crate) fn set_generation(&self, generation: u64) {
        count(&STATS.grants_dropped, self.grants.lock().drop_below(generation));
    }

    /// The agent left or the mode changed: grants are dropped (a new
    /// session asks again).
    pub(crate) fn forget_grants(&self) {
        count(&STATS.grants_dropped, self.grants.lock().clear());
    }

    /// The lowest valid generation and whether a ticket is revoked.
    pub(crate) fn min_generation(&self) -> u64 {
        self.revoked.lock().min_generation()
    }

    pub(crate) fn revoked(&self, host: &[u8; ticket::HOST_ID_LEN], id: &[u8; ticket::TICKET_ID_LEN]) -> bool {
        self.revoked.lock().revoked(host, id)
    }

    /// A copy of the grant for `key`, if one is held and valid now.
    pub(crate) fn grant(&self, key: &GrantKey) -> Option<Grant> {
        let now = sys::now_ms();
        self.grants.lock().find(key, now)
    }

    /// Keeps a grant the appliance just gave (unless its generation is
    /// already revoked).
    pub(crate) fn keep(&self, key: GrantKey, g: Grant) {
        count(&STATS.grants_received, 1);
        if g.generation < self.min_generation() {
            return;
        }
        let now = sys::now_ms();
        self.grants.lock().insert(key, g, now);
    }

    /// Registers a port a listen of this host may serve channels on.
    pub(crate) fn register(&self, port: u16) {
        count(&STATS.listens_registered, 1);
        self.services.lock().register(port);
    }

    /// Whether accepts on `port` look for a ticket.
    pub(crate) fn serves(&self, port: u16) -> bool {
        self.services.lock().serves(port)
    }
}
