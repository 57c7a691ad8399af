//! Channel binding: pairing the connect and accept halves of one TCP
//! connection, and the keys the two kernels encrypt it with.
//!
//! The PEM on the client host qualifies the connect before the SYN leaves
//! (client port unknown: if it must be a channel, this registers an
//! *expectation* for the server end) and again once the handshake is done
//! (the *connect half*, [`FiveTuple::established`]); the PEM on the server
//! host qualifies the accept once the handshake is done (the *accept
//! half*). Both halves name the same [`FiveTuple`] (the connecting side is
//! always `src`), which is how the [`Correlator`] pairs them. The pair is then decided as one decision
//! (the engine's `decide_pair`), and if allowed a fresh [`ChannelKey`] is
//! pushed to both agents. A half that finds no partner within the pairing
//! timeout expires: it is denied and audited by the caller.
//!
//! Halves are bound to their hosts (issue 15 item 1): the gate takes a
//! half into pairing only when its local end is an address its host owns
//! (`crate::hostaddr`); a tuple with a loopback address pairs only halves
//! of one host (its identity here includes the host); an expectation is
//! consumed only by its own host's established half; and each host holds
//! at most a share of the waiting halves and expectations ([`HostShare`]),
//! so one host cannot fill the tables for the fleet (T-71).
//!
//! This module is pure state and key material: no I/O, no clock of its own
//! (the caller passes `now`), so every rule here is unit-tested. The agent
//! API orchestrates: decide, issue, record the key id, push, zeroize.
//!
//! Keys: one 256-bit AES-GCM key per channel from the OS CSPRNG, with
//! per-direction salt and IV in the kTLS TLS 1.3 layout
//! (`tls12_crypto_info_aes_gcm_256`: 4-byte salt, 8-byte IV, 8-byte record
//! sequence). The two directions' nonce spaces are disjoint by construction:
//! the top bit of the first salt byte is the direction. Key bytes are zeroed
//! when a [`ChannelKey`] is dropped; only the random [`ChannelKey::key_id`]
//! is ever stored or logged.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::request::{Action, FiveTuple, QualifyRequest, Target};
use crate::seal::ModuleAsk;
use crate::store::hex;

/// Default time a half waits for its partner.
pub const DEFAULT_PAIR_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on halves waiting at once.
pub const DEFAULT_MAX_PENDING: usize = 65_536;
/// Default reserve of every host (see [`HostShare`]).
pub const DEFAULT_RESERVE: usize = 64;

/// What one host may hold of the waiting halves and of the expectations
/// (counted together): at most `per_host`; and up to `reserve` of them
/// even when a table is full, so a host that fills its share (or several
/// that fill the tables) never starve the others. The tables can thus hold
/// up to `max_pending` plus `reserve` per host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostShare {
    /// Most entries one host holds.
    pub per_host: usize,
    /// Entries a host may hold even when a table is full.
    pub reserve: usize,
}

impl HostShare {
    /// The default share of tables of `max_pending`: a sixteenth each, but
    /// at least [`DEFAULT_RESERVE`] (small tables: all of it), and a
    /// reserve of [`DEFAULT_RESERVE`] (at most the share).
    pub fn of(max_pending: usize) -> Self {
        let per_host = (max_pending / 16)
            .max(DEFAULT_RESERVE.min(max_pending))
            .max(1);
        Self {
            per_host,
            reserve: DEFAULT_RESERVE.min(per_host),
        }
    }
}

/// Key, salt and IV lengths of TLS 1.3 AES-256-GCM in kTLS.
pub const KEY_LEN: usize = 32;
/// Salt length (the implicit part of the nonce).
pub const SALT_LEN: usize = 4;
/// IV length (the explicit part of the nonce).
pub const IV_LEN: usize = 8;

/// Which way the bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the connecting side to the accepting side.
    ClientToServer,
    /// From the accepting side to the connecting side.
    ServerToClient,
}

/// Nonce material for one direction (kTLS: `salt`, `iv`, `rec_seq` = 0).
#[derive(PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct DirectionMaterial {
    /// Implicit nonce part; its top bit encodes the direction.
    pub salt: [u8; SALT_LEN],
    /// Explicit nonce part.
    pub iv: [u8; IV_LEN],
}

impl fmt::Debug for DirectionMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DirectionMaterial(..)")
    }
}

/// How a channel is keyed, from its pair decision's obligations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelTerms {
    /// TLS 1.2 records (`@encrypt("offload")`: NICs offload TLS 1.2
    /// AES-GCM) instead of TLS 1.3.
    pub tls12: bool,
    /// End the channel after this many seconds without a byte either way
    /// (`@channel_idle_s`); 0: never.
    pub idle_timeout_s: u32,
}

impl ChannelTerms {
    /// Reads `encrypt` and `channel_idle_s` (values checked when the
    /// policy was loaded; anything else reads as the default).
    pub fn of(obligations: &std::collections::BTreeMap<String, String>) -> Self {
        Self {
            tls12: obligations.get("encrypt").is_some_and(|v| v == "offload"),
            idle_timeout_s: obligations
                .get("channel_idle_s")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }
}

/// The key material of one channel. Zeroed on drop; `Debug` hides it.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct ChannelKey {
    /// Random identifier (hex), the only thing stored or logged.
    #[zeroize(skip)]
    pub key_id: String,
    /// AES-256-GCM key, used in both directions.
    pub key: [u8; KEY_LEN],
    /// Client → server nonce material (client TX, server RX).
    pub client_to_server: DirectionMaterial,
    /// Server → client nonce material (server TX, client RX).
    pub server_to_client: DirectionMaterial,
}

impl fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl ChannelKey {
    /// Draws a fresh key, salts, IVs and key id from the OS CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id)?;
        let mut k = Self {
            key_id: hex(&id),
            key: [0; KEY_LEN],
            client_to_server: DirectionMaterial {
                salt: [0; SALT_LEN],
                iv: [0; IV_LEN],
            },
            server_to_client: DirectionMaterial {
                salt: [0; SALT_LEN],
                iv: [0; IV_LEN],
            },
        };
        getrandom::getrandom(&mut k.key)?;
        for (m, dir) in [
            (&mut k.client_to_server, Direction::ClientToServer),
            (&mut k.server_to_client, Direction::ServerToClient),
        ] {
            getrandom::getrandom(&mut m.salt)?;
            getrandom::getrandom(&mut m.iv)?;
            let [first, ..] = &mut m.salt;
            *first = match dir {
                Direction::ClientToServer => *first & 0x7f,
                Direction::ServerToClient => *first | 0x80,
            };
        }
        Ok(k)
    }

    /// Nonce material for `dir`.
    pub fn material(&self, dir: Direction) -> &DirectionMaterial {
        match dir {
            Direction::ClientToServer => &self.client_to_server,
            Direction::ServerToClient => &self.server_to_client,
        }
    }
}

/// Which half of a channel a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The connecting side (host A, before the SYN).
    Connect,
    /// The accepting side (host B, after the handshake).
    Accept,
}

impl Role {
    /// The role of a request, if it is a TCP channel half.
    pub fn of(req: &QualifyRequest) -> Option<Self> {
        match req.action {
            Action::Connect => Some(Self::Connect),
            Action::Accept => Some(Self::Accept),
            _ => None,
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Connect => Self::Accept,
            Self::Accept => Self::Connect,
        }
    }
}

/// Why a half was not accepted for pairing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// Not a connect/accept request with a network target.
    #[error("request is not a connect or accept with a 5-tuple")]
    NotAChannelHalf,
    /// The same half of this 5-tuple is already waiting.
    #[error("a {0:?} half for {1} is already waiting")]
    Duplicate(Role, String),
    /// Too many halves are waiting.
    #[error("too many channel halves waiting ({0}); try again")]
    Full(usize),
    /// This host holds its whole share of waiting halves and expectations.
    #[error("host `{0}` has {1} channel halves and expectations waiting, its share; try again")]
    HostFull(String, usize),
}

/// A half that was accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Waiting for its partner, under this channel id.
    Waiting {
        /// Id both halves will carry.
        channel_id: u64,
    },
    /// The partner was waiting: decide the pair.
    Paired(Box<Pair>),
}

/// Two halves of one channel.
#[derive(Debug, PartialEq, Eq)]
pub struct Pair {
    /// Id known to the half that waited.
    pub channel_id: u64,
    /// The connecting side's request.
    pub connect: QualifyRequest,
    /// The accepting side's request.
    pub accept: QualifyRequest,
    /// The connecting side's module request, when its key is to be sealed.
    pub connect_ask: Option<Arc<ModuleAsk>>,
    /// The accepting side's module request, likewise.
    pub accept_ask: Option<Arc<ModuleAsk>>,
}

/// A half whose partner did not come in time.
#[derive(Debug, PartialEq, Eq)]
pub struct Expired {
    /// Its channel id.
    pub channel_id: u64,
    /// Which half it was.
    pub role: Role,
    /// Its request (the host to tell, the tuple to audit).
    pub request: QualifyRequest,
}

#[derive(Debug)]
struct Waiting {
    channel_id: u64,
    role: Role,
    request: QualifyRequest,
    /// Its module request, which its key will answer sealed.
    ask: Option<Arc<ModuleAsk>>,
    deadline: Instant,
}

/// The server end a protected client announced before its SYN.
pub type Endpoint = (String, u16);

/// The identity of a connection (the correlator's key): the tuple without
/// the `established` flag, which only the connect half carries; a tuple
/// with a loopback address is scoped to the host that reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    tuple: FiveTuple,
    scope: Option<String>,
}

fn identity(t: &FiveTuple, host: &str) -> Key {
    Key {
        tuple: FiveTuple {
            established: false,
            ..t.clone()
        },
        scope: crate::hostaddr::is_loopback_tuple(t).then(|| host.to_owned()),
    }
}

/// An expectation's key: its server end, scoped to the host when that is
/// a loopback address.
type ExpectKey = (Endpoint, Option<String>);

fn expect_key(server: &Endpoint, host: &str) -> ExpectKey {
    let local = crate::hostaddr::parse(&server.0).is_some_and(|a| a.is_loopback());
    (server.clone(), local.then(|| host.to_owned()))
}

/// Pairs connect and accept halves by 5-tuple, bounded in time and size.
///
/// Besides the waiting halves it keeps *expectations*: a protected client
/// whose pre-SYN connect was allowed with `encrypt` required announces its
/// server end (address, port); its established half (with the real client
/// port) follows once the handshake is done. An accept on that server end
/// may wait for it while an unexpired expectation remains.
#[derive(Debug)]
pub struct Correlator {
    timeout: Duration,
    max_pending: usize,
    share: HostShare,
    next_id: u64,
    waiting: HashMap<Key, Waiting>,
    deadlines: BTreeMap<(Instant, u64), Key>,
    /// Expectations per server end: (deadline, sequence) -> the host that
    /// registered it, oldest first.
    expected: HashMap<ExpectKey, BTreeMap<(Instant, u64), String>>,
    /// Every expectation by deadline, for expiry.
    expected_deadlines: BTreeMap<(Instant, u64), ExpectKey>,
    next_expectation: u64,
    /// Waiting halves plus expectations, per host.
    usage: HashMap<String, usize>,
}

impl Correlator {
    /// An empty correlator, each host holding its default share
    /// ([`HostShare::of`]).
    pub fn new(timeout: Duration, max_pending: usize) -> Self {
        Self::with_share(timeout, max_pending, HostShare::of(max_pending))
    }

    /// An empty correlator whose hosts each hold `share`.
    pub fn with_share(timeout: Duration, max_pending: usize, share: HostShare) -> Self {
        Self {
            timeout,
            max_pending,
            share,
            next_id: 1,
            waiting: HashMap::new(),
            deadlines: BTreeMap::new(),
            expected: HashMap::new(),
            expected_deadlines: BTreeMap::new(),
            next_expectation: 0,
            usage: HashMap::new(),
        }
    }

    /// Whether `host` may add one entry to a table holding `len`.
    fn admit(&self, host: &str, len: usize) -> Result<(), OfferError> {
        let used = self.used(host);
        if used >= self.share.per_host {
            return Err(OfferError::HostFull(host.to_owned(), self.share.per_host));
        }
        if used >= self.share.reserve && len >= self.max_pending {
            return Err(OfferError::Full(self.max_pending));
        }
        Ok(())
    }

    /// Waiting halves plus expectations `host` holds.
    pub fn used(&self, host: &str) -> usize {
        self.usage.get(host).copied().unwrap_or(0)
    }

    fn take(&mut self, host: &str) {
        *self.usage.entry(host.to_owned()).or_default() += 1;
    }

    fn give_back(&mut self, host: &str) {
        if let Some(n) = self.usage.get_mut(host) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.usage.remove(host);
            }
        }
    }

    /// The pairing timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The bound on each table.
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// Registers `host`'s expectation of one established connect half to
    /// `server` (address, port), until `now` + the pairing timeout.
    pub fn expect(&mut self, server: Endpoint, host: &str, now: Instant) -> Result<(), OfferError> {
        self.admit(host, self.expected_deadlines.len())?;
        let key = (now + self.timeout, self.next_expectation);
        self.next_expectation = self.next_expectation.wrapping_add(1);
        let ek = expect_key(&server, host);
        self.expected_deadlines.insert(key, ek.clone());
        self.expected
            .entry(ek)
            .or_default()
            .insert(key, host.to_owned());
        self.take(host);
        Ok(())
    }

    /// Consumes the oldest of `host`'s expectations for `server` that is
    /// still valid at `now`; whether there was one. Another host's
    /// expectations are never consumed.
    pub fn consume_expectation(&mut self, server: &Endpoint, host: &str, now: Instant) -> bool {
        let ek = expect_key(server, host);
        let Some(list) = self.expected.get_mut(&ek) else {
            return false;
        };
        let found = list
            .iter()
            .find(|((d, _), h)| *d > now && h.as_str() == host)
            .map(|(k, _)| *k);
        if let Some(key) = found {
            list.remove(&key);
            self.expected_deadlines.remove(&key);
        }
        if list.is_empty() {
            self.expected.remove(&ek);
        }
        if found.is_some() {
            self.give_back(host);
        }
        found.is_some()
    }

    /// When the last expectation for `server` (as an accept on `host` sees
    /// it) valid at `now` runs out, if any remains.
    pub fn expecting(&self, server: &Endpoint, host: &str, now: Instant) -> Option<Instant> {
        self.expected
            .get(&expect_key(server, host))?
            .keys()
            .map(|(d, _)| *d)
            .filter(|d| *d > now)
            .max()
    }

    /// Whether a half of the other role waits for `request`'s connection.
    pub fn has_partner(&self, request: &QualifyRequest) -> bool {
        let (Some(role), Target::Net(tuple)) = (Role::of(request), &request.target) else {
            return false;
        };
        self.waiting
            .get(&identity(tuple, &request.host))
            .is_some_and(|w| w.role == role.other())
    }

    /// Expectations registered and not yet consumed or expired.
    pub fn expectations(&self) -> usize {
        self.expected_deadlines.len()
    }

    /// Halves waiting now.
    pub fn pending(&self) -> usize {
        self.waiting.len()
    }

    /// Offers one half at `now`. Expired halves are not matched: call
    /// [`Correlator::expire`] first so they are reported.
    pub fn offer(&mut self, request: QualifyRequest, now: Instant) -> Result<Offer, OfferError> {
        self.offer_sealed(request, None, now)
    }

    /// [`Correlator::offer`] of a half whose module request `ask` its key
    /// answers sealed (handed back in the [`Pair`]).
    pub fn offer_sealed(
        &mut self,
        request: QualifyRequest,
        ask: Option<Arc<ModuleAsk>>,
        now: Instant,
    ) -> Result<Offer, OfferError> {
        let role = Role::of(&request).ok_or(OfferError::NotAChannelHalf)?;
        let Target::Net(tuple) = &request.target else {
            return Err(OfferError::NotAChannelHalf);
        };
        let key = identity(tuple, &request.host);
        if let Some(w) = self.waiting.get(&key) {
            if w.role == role {
                return Err(OfferError::Duplicate(role, describe(&key.tuple)));
            }
            let Some(w) = self.waiting.remove(&key) else {
                return Err(OfferError::NotAChannelHalf);
            };
            self.deadlines.remove(&(w.deadline, w.channel_id));
            self.give_back(&w.request.host);
            debug_assert_eq!(w.role, role.other());
            let ((connect, connect_ask), (accept, accept_ask)) = match role {
                Role::Accept => ((w.request, w.ask), (request, ask)),
                Role::Connect => ((request, ask), (w.request, w.ask)),
            };
            return Ok(Offer::Paired(Box::new(Pair {
                channel_id: w.channel_id,
                connect,
                accept,
                connect_ask,
                accept_ask,
            })));
        }
        self.admit(&request.host, self.waiting.len())?;
        let channel_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let deadline = now + self.timeout;
        self.deadlines.insert((deadline, channel_id), key.clone());
        self.take(&request.host);
        self.waiting.insert(
            key,
            Waiting {
                channel_id,
                role,
                request,
                ask,
                deadline,
            },
        );
        Ok(Offer::Waiting { channel_id })
    }

    /// Pairs `request` with a waiting half of the other role, without ever
    /// making it wait itself: `Ok(None)` when no partner waits.
    pub fn pair_with(&mut self, request: QualifyRequest) -> Result<Option<Box<Pair>>, OfferError> {
        self.pair_with_sealed(request, None)
    }

    /// [`Correlator::pair_with`] of a half whose module request `ask` its
    /// key answers sealed.
    pub fn pair_with_sealed(
        &mut self,
        request: QualifyRequest,
        ask: Option<Arc<ModuleAsk>>,
    ) -> Result<Option<Box<Pair>>, OfferError> {
        let role = Role::of(&request).ok_or(OfferError::NotAChannelHalf)?;
        let Target::Net(tuple) = &request.target else {
            return Err(OfferError::NotAChannelHalf);
        };
        let key = identity(tuple, &request.host);
        if !matches!(self.waiting.get(&key), Some(w) if w.role == role.other()) {
            return Ok(None);
        }
        let Some(w) = self.waiting.remove(&key) else {
            return Ok(None);
        };
        self.deadlines.remove(&(w.deadline, w.channel_id));
        self.give_back(&w.request.host);
        let ((connect, connect_ask), (accept, accept_ask)) = match role {
            Role::Accept => ((w.request, w.ask), (request, ask)),
            Role::Connect => ((request, ask), (w.request, w.ask)),
        };
        Ok(Some(Box::new(Pair {
            channel_id: w.channel_id,
            connect,
            accept,
            connect_ask,
            accept_ask,
        })))
    }

    /// Removes and returns every half whose deadline is not after `now`,
    /// oldest first; expectations that ran out are dropped silently.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        while let Some(entry) = self.expected_deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = *entry.key();
            let server = entry.remove();
            let mut host = None;
            if let Some(list) = self.expected.get_mut(&server) {
                host = list.remove(&key);
                if list.is_empty() {
                    self.expected.remove(&server);
                }
            }
            if let Some(h) = host {
                self.give_back(&h);
            }
        }
        let mut out = Vec::new();
        while let Some(entry) = self.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            if let Some(w) = self.waiting.remove(&key) {
                self.give_back(&w.request.host);
                out.push(Expired {
                    channel_id: w.channel_id,
                    role: w.role,
                    request: w.request,
                });
            }
        }
        out
    }

    /// When the next half or expectation expires, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let half = self.deadlines.keys().next().map(|(d, _)| *d);
        let exp = self.expected_deadlines.keys().next().map(|(d, _)| *d);
        match (half, exp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// `tcp 10.0.0.1:40000 -> 10.0.0.2:443`, for messages and audit rows.
pub fn describe(t: &FiveTuple) -> String {
    format!(
        "{} {}:{} -> {}:{}",
        t.proto.as_str(),
        t.src_addr,
        t.src_port,
        t.dst_addr,
        t.dst_port
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Program, Proto, Subject};

    /// One host may take a whole table (the bound before host shares).
    const NO_SHARE: HostShare = HostShare {
        per_host: usize::MAX,
        reserve: 0,
    };

    fn half(action: Action, host: &str, src_port: u16) -> QualifyRequest {
        QualifyRequest {
            host: host.into(),
            action,
            subject: Subject {
                user: "www-data".into(),
                uid: 33,
                euid: 33,
                gid: 33,
                loginuid: u32::MAX,
                session: u32::MAX,
                pid: 100,
                ancestry: vec![],
            },
            program: Program {
                sha256: "ab".repeat(32),
                sha1: "cd".repeat(20),
                size: 1,
                path: "/usr/bin/curl".into(),
            },
            target: Target::Net(FiveTuple {
                proto: Proto::Tcp,
                src_addr: "10.99.0.2".into(),
                src_port,
                dst_addr: "10.99.0.3".into(),
                dst_port: 443,
                established: action == Action::Connect,
            }),
            at_ms: 0,
            peer: None,
        }
    }

    #[test]
    fn connect_then_accept_pairs_under_one_id() {
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 16);
        let t0 = Instant::now();
        let conn = half(Action::Connect, "a", 40000);
        let acc = half(Action::Accept, "b", 40000);
        let Ok(Offer::Waiting { channel_id }) = c.offer(conn.clone(), t0) else {
            panic!("first half must wait")
        };
        let Ok(Offer::Paired(p)) = c.offer(acc.clone(), t0) else {
            panic!("second half must pair")
        };
        assert_eq!(p.channel_id, channel_id);
        let p = *p;
        assert_eq!((p.connect, p.accept), (conn, acc));
        assert_eq!(c.pending(), 0);
        assert!(c.expire(t0 + DEFAULT_PAIR_TIMEOUT * 2).is_empty());
    }

    #[test]
    fn accept_first_pairs_in_the_right_roles() {
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 16);
        let t0 = Instant::now();
        let acc = half(Action::Accept, "b", 40001);
        let conn = half(Action::Connect, "a", 40001);
        assert!(matches!(
            c.offer(acc.clone(), t0),
            Ok(Offer::Waiting { .. })
        ));
        let Ok(Offer::Paired(p)) = c.offer(conn.clone(), t0) else {
            panic!("must pair")
        };
        let p = *p;
        assert_eq!((p.connect, p.accept), (conn, acc));
    }

    #[test]
    fn different_tuples_do_not_pair_and_ids_differ() {
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 16);
        let t0 = Instant::now();
        let Ok(Offer::Waiting { channel_id: a }) = c.offer(half(Action::Connect, "a", 1), t0)
        else {
            panic!()
        };
        let Ok(Offer::Waiting { channel_id: b }) = c.offer(half(Action::Accept, "b", 2), t0) else {
            panic!()
        };
        assert_ne!(a, b);
        assert_eq!(c.pending(), 2);
    }

    #[test]
    fn a_lone_half_expires_at_its_deadline_not_before() {
        let timeout = Duration::from_secs(5);
        let mut c = Correlator::new(timeout, 16);
        let t0 = Instant::now();
        let conn = half(Action::Connect, "a", 40002);
        c.offer(conn.clone(), t0).unwrap();
        c.offer(
            half(Action::Connect, "a", 40003),
            t0 + Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(c.next_deadline(), Some(t0 + timeout));
        assert!(c.expire(t0 + timeout - Duration::from_millis(1)).is_empty());
        let gone = c.expire(t0 + timeout);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].role, Role::Connect);
        assert_eq!(gone[0].request, conn);
        // Its partner arriving late starts a new wait instead of pairing.
        assert!(matches!(
            c.offer(half(Action::Accept, "b", 40002), t0 + timeout),
            Ok(Offer::Waiting { .. })
        ));
        assert_eq!(c.pending(), 2);
    }

    #[test]
    fn duplicates_full_and_non_channel_requests_are_refused() {
        let mut c = Correlator::with_share(DEFAULT_PAIR_TIMEOUT, 2, NO_SHARE);
        let t0 = Instant::now();
        c.offer(half(Action::Connect, "a", 1), t0).unwrap();
        assert!(matches!(
            c.offer(half(Action::Connect, "a", 1), t0),
            Err(OfferError::Duplicate(Role::Connect, _))
        ));
        c.offer(half(Action::Connect, "a", 2), t0).unwrap();
        assert_eq!(
            c.offer(half(Action::Connect, "a", 3), t0),
            Err(OfferError::Full(2))
        );
        let mut exec = half(Action::Exec, "a", 4);
        exec.target = Target::Exec {
            loader_direct: false,
        };
        assert_eq!(c.offer(exec, t0), Err(OfferError::NotAChannelHalf));
        let ipc = half(Action::IpcConnect, "a", 5);
        assert_eq!(c.offer(ipc, t0), Err(OfferError::NotAChannelHalf));
    }

    #[test]
    fn pair_with_never_waits() {
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 16);
        let t0 = Instant::now();
        assert_eq!(c.pair_with(half(Action::Accept, "b", 7)), Ok(None));
        assert_eq!(c.pending(), 0);
        c.offer(half(Action::Connect, "a", 7), t0).unwrap();
        let p = c.pair_with(half(Action::Accept, "b", 7)).unwrap().unwrap();
        assert_eq!(
            (p.connect.host.as_str(), p.accept.host.as_str()),
            ("a", "b")
        );
        assert_eq!(c.pending(), 0);
        assert!(c.expire(t0 + DEFAULT_PAIR_TIMEOUT).is_empty());
    }

    fn server() -> Endpoint {
        ("10.99.0.3".into(), 443)
    }

    #[test]
    fn expectations_are_consumed_one_each_and_ignore_other_servers() {
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 16);
        let t0 = Instant::now();
        c.expect(server(), "a", t0).unwrap();
        c.expect(server(), "a", t0).unwrap();
        assert_eq!(c.expectations(), 2);
        assert_eq!(
            c.expecting(&server(), "b", t0),
            Some(t0 + DEFAULT_PAIR_TIMEOUT)
        );
        let other: Endpoint = ("10.99.0.3".into(), 444);
        assert_eq!(c.expecting(&other, "b", t0), None);
        assert!(!c.consume_expectation(&other, "a", t0));
        assert!(c.consume_expectation(&server(), "a", t0));
        assert!(c.consume_expectation(&server(), "a", t0));
        assert!(!c.consume_expectation(&server(), "a", t0));
        assert_eq!(
            (c.expectations(), c.expecting(&server(), "b", t0)),
            (0, None)
        );
        // Expectations are not halves: nothing waits, nothing is reported.
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn expectations_expire_silently() {
        let timeout = Duration::from_secs(5);
        let mut c = Correlator::new(timeout, 16);
        let t0 = Instant::now();
        c.expect(server(), "a", t0).unwrap();
        assert_eq!(c.next_deadline(), Some(t0 + timeout));
        // Past its deadline it no longer counts, even before expiry runs.
        assert_eq!(c.expecting(&server(), "b", t0 + timeout), None);
        assert!(!c.consume_expectation(&server(), "a", t0 + timeout));
        c.expect(server(), "a", t0).unwrap();
        assert!(c.expire(t0 + timeout).is_empty());
        assert_eq!(c.expectations(), 0);
        assert_eq!(c.next_deadline(), None);
    }

    #[test]
    fn expectations_are_bounded() {
        let mut c = Correlator::with_share(DEFAULT_PAIR_TIMEOUT, 2, NO_SHARE);
        let t0 = Instant::now();
        c.expect(server(), "a", t0).unwrap();
        c.expect(server(), "a", t0).unwrap();
        assert_eq!(c.expect(server(), "a", t0), Err(OfferError::Full(2)));
    }

    #[test]
    fn the_established_flag_is_not_part_of_the_identity() {
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 16);
        let t0 = Instant::now();
        let conn = half(Action::Connect, "a", 40010);
        assert!(matches!(&conn.target, Target::Net(t) if t.established));
        c.offer(conn.clone(), t0).unwrap();
        let acc = half(Action::Accept, "b", 40010);
        let p = c.pair_with(acc.clone()).unwrap().unwrap();
        assert_eq!((p.connect, p.accept), (conn, acc));
    }

    #[test]
    fn concurrent_connects_of_one_pair_get_their_own_channels() {
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 16);
        let t0 = Instant::now();
        c.expect(server(), "a", t0).unwrap();
        c.expect(server(), "a", t0).unwrap();
        let mut ids = Vec::new();
        for port in [40020, 40021] {
            assert!(c.consume_expectation(&server(), "a", t0));
            let Ok(Offer::Waiting { channel_id }) = c.offer(half(Action::Connect, "a", port), t0)
            else {
                panic!("must wait")
            };
            ids.push(channel_id);
        }
        assert_ne!(ids[0], ids[1]);
        // Each accept pairs with its own half, whatever the order.
        let p = c
            .pair_with(half(Action::Accept, "b", 40021))
            .unwrap()
            .unwrap();
        assert_eq!(p.channel_id, ids[1]);
        let p = c
            .pair_with(half(Action::Accept, "b", 40020))
            .unwrap()
            .unwrap();
        assert_eq!(p.channel_id, ids[0]);
    }

    fn on_loopback(mut r: QualifyRequest) -> QualifyRequest {
        if let Target::Net(t) = &mut r.target {
            t.src_addr = "127.0.0.1".into();
            t.dst_addr = "127.0.0.1".into();
        }
        r
    }

    #[test]
    fn loopback_tuples_pair_only_within_one_host() {
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 64);
        let t0 = Instant::now();
        c.offer(on_loopback(half(Action::Connect, "a", 50000)), t0)
            .unwrap();
        // Another host's half for the same loopback tuple is another
        // connection: it neither pairs nor disturbs a's half.
        assert_eq!(
            c.pair_with(on_loopback(half(Action::Accept, "rogue", 50000))),
            Ok(None)
        );
        assert!(matches!(
            c.offer(on_loopback(half(Action::Connect, "rogue", 50000)), t0),
            Ok(Offer::Waiting { .. })
        ));
        let p = c
            .pair_with(on_loopback(half(Action::Accept, "a", 50000)))
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.connect.host.as_str(), p.accept.host.as_str()),
            ("a", "a")
        );
        // Loopback expectations are the host's own too.
        let lo: Endpoint = ("127.0.0.1".into(), 443);
        c.expect(lo.clone(), "a", t0).unwrap();
        assert_eq!(c.expecting(&lo, "rogue", t0), None);
        assert!(c.expecting(&lo, "a", t0).is_some());
    }

    #[test]
    fn expectations_are_consumed_only_by_their_own_host() {
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 64);
        let t0 = Instant::now();
        c.expect(server(), "a", t0).unwrap();
        // An accept on the server waits for it, whoever registered it.
        assert!(c.expecting(&server(), "b", t0).is_some());
        assert!(!c.consume_expectation(&server(), "rogue", t0));
        assert_eq!(c.expectations(), 1);
        assert!(c.consume_expectation(&server(), "a", t0));
        assert_eq!((c.expectations(), c.used("a")), (0, 0));
    }

    #[test]
    fn one_host_holds_at_most_its_share_and_others_keep_their_reserve() {
        let share = HostShare {
            per_host: 4,
            reserve: 2,
        };
        let mut c = Correlator::with_share(DEFAULT_PAIR_TIMEOUT, 8, share);
        let t0 = Instant::now();
        for p in 0..4 {
            c.offer(half(Action::Connect, "rogue", p), t0).unwrap();
        }
        assert_eq!(
            c.offer(half(Action::Connect, "rogue", 4), t0),
            Err(OfferError::HostFull("rogue".into(), 4))
        );
        assert_eq!(
            c.expect(server(), "rogue", t0),
            Err(OfferError::HostFull("rogue".into(), 4))
        );
        // Two hosts fill the table...
        for p in 10..14 {
            c.offer(half(Action::Connect, "rogue2", p), t0).unwrap();
        }
        assert_eq!(c.pending(), 8);
        // ...and a third still has its reserve, then no more.
        c.offer(half(Action::Connect, "a", 20), t0).unwrap();
        c.expect(server(), "a", t0).unwrap();
        assert_eq!(c.expect(server(), "a", t0), Ok(()));
        assert_eq!(
            c.offer(half(Action::Connect, "a", 21), t0),
            Err(OfferError::Full(8))
        );
        assert_eq!(c.used("a"), 3);
        // Pairing and expiry give the share back.
        c.pair_with(half(Action::Accept, "b", 20)).unwrap().unwrap();
        assert_eq!(c.used("a"), 2);
        c.expire(t0 + DEFAULT_PAIR_TIMEOUT);
        assert_eq!((c.used("a"), c.used("rogue"), c.pending()), (0, 0, 0));
    }

    #[test]
    fn keys_are_fresh_and_directions_disjoint() {
        let a = ChannelKey::generate().unwrap();
        let b = ChannelKey::generate().unwrap();
        assert_ne!(a.key_id, b.key_id);
        assert_ne!(a.key, b.key);
        assert_eq!(a.key_id.len(), 32);
        for k in [&a, &b] {
            assert_eq!(k.client_to_server.salt[0] & 0x80, 0);
            assert_eq!(k.server_to_client.salt[0] & 0x80, 0x80);
            assert_ne!(
                k.material(Direction::ClientToServer),
                k.material(Direction::ServerToClient)
            );
        }
        // Debug never shows key bytes.
        let shown = format!("{a:?} {:?}", a.client_to_server);
        assert!(shown.contains(&a.key_id));
        assert!(!shown.contains(&hex(&a.key)));
        assert!(!shown.contains(&format!("{:?}", a.key)));
    }

    #[test]
    fn zeroize_clears_the_key_bytes() {
        let mut k = ChannelKey::generate().unwrap();
        assert_ne!(k.key, [0; KEY_LEN]);
        k.zeroize();
        assert_eq!(k.key, [0; KEY_LEN]);
        assert_eq!(k.client_to_server.iv, [0; IV_LEN]);
        assert_eq!(k.server_to_client.salt, [0; SALT_LEN]);
    }
}
