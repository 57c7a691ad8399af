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
/// the `established` flag, which only the connect half carries.
fn identity(t: &FiveTuple) -> FiveTuple {
    FiveTuple {
        established: false,
        ..t.clone()
    }
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
    next_id: u64,
    waiting: HashMap<FiveTuple, Waiting>,
    deadlines: BTreeMap<(Instant, u64), FiveTuple>,
    /// Expectations per server end: (deadline, sequence), oldest first.
    expected: HashMap<Endpoint, BTreeMap<(Instant, u64), ()>>,
    /// Every expectation by deadline, for expiry.
    expected_deadlines: BTreeMap<(Instant, u64), Endpoint>,
    next_expectation: u64,
}

impl Correlator {
    /// An empty correlator.
    pub fn new(timeout: Duration, max_pending: usize) -> Self {
        Self {
            timeout,
            max_pending,
            next_id: 1,
            waiting: HashMap::new(),
            deadlines: BTreeMap::new(),
            expected: HashMap::new(),
            expected_deadlines: BTreeMap::new(),
            next_expectation: 0,
        }
    }

    /// The pairing timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Registers the expectation of one established connect half to
    /// `server` (address, port), until `now` + the pairing timeout.
    pub fn expect(&mut self, server: Endpoint, now: Instant) -> Result<(), OfferError> {
        if self.expected_deadlines.len() >= self.max_pending {
            return Err(OfferError::Full(self.max_pending));
        }
        let key = (now + self.timeout, self.next_expectation);
        self.next_expectation = self.next_expectation.wrapping_add(1);
        self.expected_deadlines.insert(key, server.clone());
        self.expected.entry(server).or_default().insert(key, ());
        Ok(())
    }

    /// Consumes the oldest expectation for `server` that is still valid at
    /// `now`; whether there was one.
    pub fn consume_expectation(&mut self, server: &Endpoint, now: Instant) -> bool {
        let Some(list) = self.expected.get_mut(server) else {
            return false;
        };
        let found = list.keys().find(|(d, _)| *d > now).copied();
        if let Some(key) = found {
            list.remove(&key);
            self.expected_deadlines.remove(&key);
        }
        if list.is_empty() {
            self.expected.remove(server);
        }
        found.is_some()
    }

    /// When the last expectation for `server` valid at `now` runs out, if
    /// any remains.
    pub fn expecting(&self, server: &Endpoint, now: Instant) -> Option<Instant> {
        self.expected
            .get(server)?
            .keys()
            .map(|(d, _)| *d)
            .filter(|d| *d > now)
            .max()
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
        let tuple = &identity(tuple);
        if let Some(w) = self.waiting.get(tuple) {
            if w.role == role {
                return Err(OfferError::Duplicate(role, describe(tuple)));
            }
            let tuple = tuple.clone();
            let Some(w) = self.waiting.remove(&tuple) else {
                return Err(OfferError::NotAChannelHalf);
            };
            self.deadlines.remove(&(w.deadline, w.channel_id));
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
        if self.waiting.len() >= self.max_pending {
            return Err(OfferError::Full(self.max_pending));
        }
        let channel_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let deadline = now + self.timeout;
        self.deadlines.insert((deadline, channel_id), tuple.clone());
        self.waiting.insert(
            tuple.clone(),
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
        let tuple = &identity(tuple);
        if !matches!(self.waiting.get(tuple), Some(w) if w.role == role.other()) {
            return Ok(None);
        }
        let Some(w) = self.waiting.remove(tuple) else {
            return Ok(None);
        };
        self.deadlines.remove(&(w.deadline, w.channel_id));
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
            if let Some(list) = self.expected.get_mut(&server) {
                list.remove(&key);
                if list.is_empty() {
                    self.expected.remove(&server);
                }
            }
        }
        let mut out = Vec::new();
        while let Some(entry) = self.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let tuple = entry.remove();
            if let Some(w) = self.waiting.remove(&tuple) {
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
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 2);
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
        c.expect(server(), t0).unwrap();
        c.expect(server(), t0).unwrap();
        assert_eq!(c.expectations(), 2);
        assert_eq!(c.expecting(&server(), t0), Some(t0 + DEFAULT_PAIR_TIMEOUT));
        let other: Endpoint = ("10.99.0.3".into(), 444);
        assert_eq!(c.expecting(&other, t0), None);
        assert!(!c.consume_expectation(&other, t0));
        assert!(c.consume_expectation(&server(), t0));
        assert!(c.consume_expectation(&server(), t0));
        assert!(!c.consume_expectation(&server(), t0));
        assert_eq!((c.expectations(), c.expecting(&server(), t0)), (0, None));
        // Expectations are not halves: nothing waits, nothing is reported.
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn expectations_expire_silently() {
        let timeout = Duration::from_secs(5);
        let mut c = Correlator::new(timeout, 16);
        let t0 = Instant::now();
        c.expect(server(), t0).unwrap();
        assert_eq!(c.next_deadline(), Some(t0 + timeout));
        // Past its deadline it no longer counts, even before expiry runs.
        assert_eq!(c.expecting(&server(), t0 + timeout), None);
        assert!(!c.consume_expectation(&server(), t0 + timeout));
        c.expect(server(), t0).unwrap();
        assert!(c.expire(t0 + timeout).is_empty());
        assert_eq!(c.expectations(), 0);
        assert_eq!(c.next_deadline(), None);
    }

    #[test]
    fn expectations_are_bounded() {
        let mut c = Correlator::new(DEFAULT_PAIR_TIMEOUT, 2);
        let t0 = Instant::now();
        c.expect(server(), t0).unwrap();
        c.expect(server(), t0).unwrap();
        assert_eq!(c.expect(server(), t0), Err(OfferError::Full(2)));
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
        c.expect(server(), t0).unwrap();
        c.expect(server(), t0).unwrap();
        let mut ids = Vec::new();
        for port in [40020, 40021] {
            assert!(c.consume_expectation(&server(), t0));
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
