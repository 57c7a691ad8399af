//! Sealed records: the appliance's side of `trustbind_proto::seal`.
//!
//! A module loaded with the appliance's **authority key** believes only
//! the records the appliance sealed for it (the agent, which root on the
//! host controls, carries them and can neither forge nor change them):
//!
//! - [`Authority`]: the appliance's own P-256 key pair (not the CA's),
//!   made at first start as `DIR/authority.key` (mode 0600) next to the
//!   CA, loaded on later starts. Its public key (`x || y`, 64 bytes) goes
//!   to every enrolling agent (`EnrolReply.authority`), which loads the
//!   module with it.
//! - [`SessionKey`]: `K = HMAC-SHA256(z, session_info(module_pub))`, `z`
//!   the ECDH x coordinate between the authority key and the module's
//!   session key. Derived once per module session (a bounded cache), wiped
//!   on drop.
//! - Answers ([`ModuleAsk`]): a verdict or a channel key for the module
//!   request whose bytes the agent forwarded (`Request.module_request`),
//!   sealed to their SHA-256 with sequence 0. [`check_request`] refuses a
//!   request whose gRPC fields say otherwise than those bytes.
//! - Orders ([`OrderSeal`]): `Config` (with `HostMode`), `Peers` and
//!   `FileSetPaths` (with `FileSets`: the module resolves them), digest
//!   zero, sequence [`next_seq`] (strictly increasing, also across
//!   restarts: microseconds since the epoch at least).
//!
//! The inner records are built with `trustbind_api::module`, the same code
//! the agent writes unsealed records with, so both agree byte for byte.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use trustbind_api::module::{self, Asked};
use trustbind_proto::seal::{self as spec, DIGEST_LEN, KEY_LEN, MAC_LEN, SESSION_PUB_LEN};
use trustbind_proto::{self as proto, ticket, NetKind, Record};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::agent_api::pb::{self, push};
use crate::pki::{write_atomic, PkiError};

/// The authority key's file in the data directory (mode 0600): the P-256
/// private scalar, 64 hex digits and a newline.
pub const AUTHORITY_KEY_FILE: &str = "authority.key";

/// Module sessions whose key is kept (the oldest is forgotten past this;
/// it is derived again when it comes back).
pub const SESSION_CACHE: usize = 4096;

/// Verdict wait ordered when the agent's `Hello` names none.
pub const DEFAULT_VERDICT_TIMEOUT_MS: u32 = 2500;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // HMAC takes a key of any length: `new_from_slice` never fails. Were
    // it to, an all-zero seal fails the module's check (refused, never
    // believed): the safe way to be wrong.
    let Ok(mut m) = <HmacSha256 as Mac>::new_from_slice(key) else {
        return [0; MAC_LEN];
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The SHA-256 of a module request's bytes, as the module computes it.
pub fn digest(bytes: &[u8]) -> [u8; DIGEST_LEN] {
    Sha256::digest(bytes).into()
}

/// The sequence of the next order: microseconds since the Unix epoch, or
/// one more than the last one given, whichever is larger. One counter for
/// the whole process, so orders of every kind to every session increase,
/// and the clock makes them increase across restarts too.
pub fn next_seq() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last.saturating_add(1));
        match LAST.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// A module session's key `K`. Wiped when dropped; `Debug` hides it.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SessionKey {
    k: [u8; KEY_LEN],
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// `K` from the ECDH shared secret `z` and the module's session public
    /// key.
    pub fn derive(z: &[u8; KEY_LEN], module_pub: &[u8; SESSION_PUB_LEN]) -> Self {
        Self {
            k: hmac(z, &[&spec::session_info(module_pub)]),
        }
    }

    /// The seal of `inner` (a whole encoded record) for `digest` and `seq`.
    pub fn mac(&self, digest: &[u8; DIGEST_LEN], seq: u64, inner: &[u8]) -> [u8; MAC_LEN] {
        hmac(&self.k, &[&spec::prefix(digest, seq), inner])
    }

    /// `rec` encoded with `request_id` and sealed for `digest` and `seq`:
    /// a whole `Sealed` record (request id `request_id`), written to the
    /// module as it is. The caller wipes it when it held key material.
    pub fn seal(
        &self,
        digest: &[u8; DIGEST_LEN],
        seq: u64,
        rec: &Record<'_>,
        request_id: u64,
    ) -> Result<Vec<u8>, String> {
        let inner = Zeroizing::new(
            module::encode(rec, request_id).map_err(|e| format!("cannot encode: {e}"))?,
        );
        let mac = self.mac(digest, seq, &inner);
        let sealed = proto::Sealed::new(seq, mac, &inner)
            .map_err(|e| format!("cannot seal a {:?} record: {e}", rec.kind()))?;
        module::encode(&Record::Sealed(sealed), request_id)
            .map_err(|e| format!("cannot encode the sealed record: {e}"))
    }
}

/// The session keys of recent module sessions, oldest first.
#[derive(Default)]
struct Sessions {
    keys: HashMap<[u8; SESSION_PUB_LEN], Arc<SessionKey>>,
    order: VecDeque<[u8; SESSION_PUB_LEN]>,
}

/// The appliance's authority key pair and the session keys derived with
/// it.
pub struct Authority {
    /// Wiped on drop (`elliptic_curve::SecretKey` zeroizes itself).
    secret: p256::SecretKey,
    public: [u8; SESSION_PUB_LEN],
    sessions: Mutex<Sessions>,
    capacity: usize,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("public", &self.public_hex())
            .finish_non_exhaustive()
    }
}

/// `x || y` of a P-256 public key.
pub fn public_bytes(key: &p256::PublicKey) -> [u8; SESSION_PUB_LEN] {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let point = key.to_encoded_point(false);
    let mut out = [0u8; SESSION_PUB_LEN];
    if let Some(xy) = point.as_bytes().get(1..=SESSION_PUB_LEN) {
        out.copy_from_slice(xy);
    }
    out
}

/// A P-256 public key from `x || y` (64 bytes): `None` unless it is a
/// point of the curve (not the identity).
pub fn public_key(xy: &[u8]) -> Option<p256::PublicKey> {
    if xy.len() != SESSION_PUB_LEN {
        return None;
    }
    let mut sec1 = [0u8; SESSION_PUB_LEN + 1];
    let (tag, rest) = sec1.split_at_mut(1);
    tag.copy_from_slice(&[4]);
    rest.copy_from_slice(xy);
    p256::PublicKey::from_sec1_bytes(&sec1).ok()
}

/// A fresh P-256 private key from the OS CSPRNG.
pub fn random_secret() -> Result<p256::SecretKey, String> {
    loop {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(bytes.as_mut()).map_err(|e| format!("no randomness: {e}"))?;
        // Zero or past the group order (probability about 2^-32): draw again.
        if let Ok(k) = p256::SecretKey::from_slice(bytes.as_ref()) {
            return Ok(k);
        }
    }
}

/// The ECDH shared secret `z` (x coordinate, big-endian) of `secret` and
/// `public`.
pub fn shared_secret(secret: &p256::SecretKey, public: &p256::PublicKey) -> Zeroizing<[u8; 32]> {
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), public.as_affine());
    let mut z = Zeroizing::new([0u8; 32]);
    z.copy_from_slice(shared.raw_secret_bytes());
    z
}

impl Authority {
    /// The authority key of `dir`: read from [`AUTHORITY_KEY_FILE`], or
    /// made and written there (mode 0600) when the file does not exist.
    pub fn open_or_create(dir: &Path) -> Result<Self, PkiError> {
        let path = dir.join(AUTHORITY_KEY_FILE);
        let bad = |why: String| PkiError::BadFile {
            path: path.clone(),
            why,
        };
        let secret = if path.exists() {
            let text = Zeroizing::new(fs::read_to_string(&path).map_err(|e| PkiError::Io {
                path: path.clone(),
                source: e,
            })?);
            let mut bytes = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(text.trim(), bytes.as_mut())
                .map_err(|e| bad(format!("not 64 hex digits ({e})")))?;
            p256::SecretKey::from_slice(bytes.as_ref())
                .map_err(|_| bad("not a P-256 private key".into()))?
        } else {
            let secret = random_secret().map_err(bad)?;
            let bytes = Zeroizing::new(secret.to_bytes());
            let mut text = Zeroizing::new(hex::encode(bytes.as_slice()));
            text.push('\n');
            write_atomic(&path, text.as_bytes(), true)?;
            secret
        };
        Ok(Self::new(secret))
    }

    /// The authority of `secret`, with an empty session cache.
    pub fn new(secret: p256::SecretKey) -> Self {
        Self::with_capacity(secret, SESSION_CACHE)
    }

    /// The authority of `secret` keeping at most `capacity` session keys.
    pub fn with_capacity(secret: p256::SecretKey, capacity: usize) -> Self {
        let public = public_bytes(&secret.public_key());
        Self {
            secret,
            public,
            sessions: Mutex::new(Sessions::default()),
            capacity: capacity.max(1),
        }
    }

    /// The public key, `x || y` (what `EnrolReply.authority` carries and
    /// the module's `authority=` parameter takes, in hex).
    pub fn public(&self) -> [u8; SESSION_PUB_LEN] {
        self.public
    }

    /// The public key in lower-case hex (128 digits).
    pub fn public_hex(&self) -> String {
        hex::encode(self.public)
    }

    /// The session key for the module session `module_pub` (`x || y`):
    /// from the cache, or derived (ECDH) and cached. An error says why the
    /// key is not a session key.
    pub fn session(&self, module_pub: &[u8]) -> Result<Arc<SessionKey>, String> {
        let xy: [u8; SESSION_PUB_LEN] = module_pub.try_into().map_err(|_| {
            format!(
                "{} bytes, expected {SESSION_PUB_LEN} (a P-256 public key x || y)",
                module_pub.len()
            )
        })?;
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = s.keys.get(&xy) {
            return Ok(Arc::clone(k));
        }
        let public = public_key(&xy).ok_or("not a point of P-256")?;
        let z = shared_secret(&self.secret, &public);
        let key = Arc::new(SessionKey::derive(&z, &xy));
        while s.keys.len() >= self.capacity {
            let Some(old) = s.order.pop_front() else {
                break;
            };
            s.keys.remove(&old);
        }
        s.keys.insert(xy, Arc::clone(&key));
        s.order.push_back(xy);
        Ok(key)
    }

    /// Module sessions whose key is cached.
    pub fn cached_sessions(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .len()
    }
}

/// A module request the appliance answers sealed: what the answer is bound
/// to.
pub struct ModuleAsk {
    /// The module's request id (its header's), the answer's.
    pub request_id: u64,
    /// SHA-256 of the request's bytes.
    pub digest: [u8; DIGEST_LEN],
    /// What kind of request it is.
    pub asked: Asked,
    /// The module session's key.
    pub key: Arc<SessionKey>,
}

impl fmt::Debug for ModuleAsk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModuleAsk")
            .field("request_id", &self.request_id)
            .field("digest", &hex::encode(self.digest))
            .field("asked", &self.asked)
            .finish_non_exhaustive()
    }
}

/// Two asks are the same when they answer the same request bytes.
impl PartialEq for ModuleAsk {
    fn eq(&self, other: &Self) -> bool {
        self.request_id == other.request_id && self.digest == other.digest
    }
}

impl Eq for ModuleAsk {}

impl ModuleAsk {
    /// `Result.module_answer` for `result`: the sealed verdict, or empty
    /// when the answer is a channel key to come (pushed with
    /// [`ModuleAsk::seal_channel_key`]).
    pub fn seal_result(&self, result: &pb::Result) -> Result<Vec<u8>, String> {
        match module::answer(self.asked, result) {
            module::Answer::Verdict(v) => self.seal_verdict(v),
            module::Answer::Channel { .. } => Ok(Vec::new()),
        }
    }

    /// The verdict `v` sealed as the answer to this request.
    pub fn seal_verdict(&self, v: proto::Verdict) -> Result<Vec<u8>, String> {
        self.key
            .seal(&self.digest, 0, &Record::Verdict(v), self.request_id)
    }

    /// The granted `g` as a sealed `Grant` record answering this request
    /// (channel keys v2). The record's copy of the pair secret is wiped;
    /// the sealed bytes hold it too: the caller wipes them once sent.
    pub fn seal_grant(&self, g: &pb::GrantReply) -> Result<Vec<u8>, String> {
        let mut rec = Record::Grant(module::grant_of(g)?);
        let sealed = self.key.seal(&self.digest, 0, &rec, self.request_id);
        if let Record::Grant(g) = &mut rec {
            g.wipe();
        }
        sealed
    }

    /// Sets `k.module_answer` to `k` as a sealed `ChannelKey` record
    /// answering this request. Every copy of the key made here is wiped.
    pub fn seal_channel_key(&self, k: &mut pb::ChannelKey) -> Result<(), String> {
        let mut rec = Record::ChannelKey(module::channel_key_of(k)?);
        let sealed = self.key.seal(&self.digest, 0, &rec, self.request_id);
        if let Record::ChannelKey(c) = &mut rec {
            c.key.zeroize();
            c.tx_salt.zeroize();
            c.tx_iv.zeroize();
            c.rx_salt.zeroize();
            c.rx_iv.zeroize();
        }
        k.module_answer = sealed?;
        Ok(())
    }
}

/// Wiping the key bytes of a pushed message: the codec's (T-84).
pub use trustbind_api::codec::{wipe_channel_key, wipe_push};

/// What a subscriber's orders are sealed with: its module session (from
/// `Hello.module_session`) and the parts of `Config` its agent names.
#[derive(Debug)]
pub struct OrderSeal {
    key: Arc<SessionKey>,
    verdict_timeout_ms: u32,
    qualify_net: bool,
}

impl OrderSeal {
    /// Orders for the session `key`, its `Config` with the agent's verdict
    /// wait (clamped to `1..=MAX_VERDICT_TIMEOUT_MS`, 2.5 s if 0) and net
    /// flag.
    pub fn new(key: Arc<SessionKey>, verdict_timeout_ms: u32, qualify_net: bool) -> Self {
        let verdict_timeout_ms = match verdict_timeout_ms {
            0 => DEFAULT_VERDICT_TIMEOUT_MS,
            t => t.clamp(1, proto::MAX_VERDICT_TIMEOUT_MS),
        };
        Self {
            key,
            verdict_timeout_ms,
            qualify_net,
        }
    }

    /// The verdict wait ordered.
    pub fn verdict_timeout_ms(&self) -> u32 {
        self.verdict_timeout_ms
    }

    /// `msg` with its sealed order set, for a `HostMode`, `Peers`,
    /// `FileSets`, `HostKeys` or `TicketRevocations` push;
    /// `None` for any other push (sent as it is). A mode this code does
    /// not know is not sealed (the module keeps its mode).
    pub fn seal_push(&self, msg: &push::Kind) -> Option<push::Kind> {
        let order = |rec: &Record<'_>| {
            self.key
                .seal(&[0; DIGEST_LEN], next_seq(), rec, 0)
                .map_err(|e| tracing::error!("cannot seal an order: {e}"))
                .ok()
        };
        match msg {
            push::Kind::HostMode(m) => {
                let mode = match m.mode.as_str() {
                    "enforce" => proto::Mode::Enforce,
                    "permissive" => proto::Mode::Permissive,
                    "disabled" => proto::Mode::Disabled,
                    _ => return None,
                };
                let config = proto::Config {
                    mode,
                    verdict_timeout_ms: self.verdict_timeout_ms,
                    qualify_net: self.qualify_net,
                };
                Some(push::Kind::HostMode(pb::HostMode {
                    mode: m.mode.clone(),
                    module_order: order(&Record::Config(config))?,
                }))
            }
            push::Kind::Peers(p) => {
                let addrs: Vec<IpAddr> = module::parse_peers(&p.addrs).0;
                let entries = module::peer_entries(&addrs);
                let peers = proto::Peers::new(&entries)
                    .map_err(|e| tracing::error!("cannot seal the peers: {e}"))
                    .ok()?;
                Some(push::Kind::Peers(pb::Peers {
                    addrs: p.addrs.clone(),
                    module_order: order(&Record::Peers(peers))?,
                }))
            }
            push::Kind::FileSets(f) => {
                // The module resolves the paths itself (T-102). Paths that
                // do not fit one record go unsealed: the agent's
                // identities are then all the module gets.
                let body = module::file_set_paths(&module::paths_of(f))
                    .map_err(|e| {
                        tracing::error!("the protected paths cannot be sealed for the module: {e}")
                    })
                    .ok()?;
                let paths = proto::FileSetPaths::new(&body).ok()?;
                Some(push::Kind::FileSets(pb::FileSets {
                    sets: f.sets.clone(),
                    module_order: order(&Record::FileSetPaths(paths))?,
                }))
            }
            push::Kind::HostKeys(k) => {
                let keys = ticket::HostKeys::decode(&k.record)
                    .map_err(|e| tracing::error!("cannot seal the host keys: {e}"))
                    .ok()?;
                let mut rec = Record::HostKeys(keys);
                let sealed = order(&rec);
                if let Record::HostKeys(k) = &mut rec {
                    k.key.zeroize();
                    k.prev_key.zeroize();
                }
                Some(push::Kind::HostKeys(pb::HostKeys {
                    record: k.record.clone(),
                    epoch: k.epoch,
                    module_order: sealed?,
                }))
            }
            push::Kind::Revocations(r) => {
                let rec = ticket::Revocations::decode(&r.record)
                    .map_err(|e| tracing::error!("cannot seal the revocations: {e}"))
                    .ok()?;
                Some(push::Kind::Revocations(pb::TicketRevocations {
                    record: r.record.clone(),
                    min_generation: r.min_generation,
                    module_order: order(&Record::Revocations(rec))?,
                }))
            }
            _ => None,
        }
    }
}

/// What a field of the gRPC request says against the module's bytes.
fn same<T: PartialEq + fmt::Debug>(field: &str, grpc: T, module: T) -> Result<(), String> {
    if grpc == module {
        Ok(())
    } else {
        Err(format!(
            "module_request: `{field}` says {grpc:?}, the module's request {module:?}"
        ))
    }
}

/// The subject fields the module states (the user name is resolved by the
/// agent from the uid and cannot be checked here).
#[allow(clippy::too_many_arguments)]
fn same_subject(
    s: Option<&pb::Subject>,
    uid: u32,
    euid: u32,
    gid: u32,
    loginuid: u32,
    session: u32,
    pid: u32,
    ancestry: proto::Ancestry<'_>,
) -> Result<(), String> {
    let s = s.ok_or("module_request: `subject` missing")?;
    same("subject.uid", s.uid, uid)?;
    same("subject.euid", s.euid, euid)?;
    same("subject.gid", s.gid, gid)?;
    same("subject.loginuid", s.loginuid, loginuid)?;
    same("subject.session", s.session, session)?;
    same("subject.pid", s.pid, pid)?;
    let anc: Vec<&[u8]> = ancestry.iter().collect();
    let ours: Vec<&[u8]> = s.ancestry.iter().map(Vec::as_slice).collect();
    if anc != ours {
        return Err("module_request: `subject.ancestry` differs from the module's request".into());
    }
    Ok(())
}

/// [`same_subject`] for a module's TCP request (a connect, an accept, a
/// listen).
fn same_net_subject(s: Option<&pb::Subject>, n: &proto::NetRequest<'_>) -> Result<(), String> {
    same_subject(
        s,
        n.uid,
        n.euid,
        n.gid,
        n.loginuid,
        n.sessionid,
        n.pid,
        n.ancestry,
    )
}

fn action_of(r: &pb::Request) -> pb::Action {
    pb::Action::try_from(r.action).unwrap_or(pb::Action::Unspecified)
}

fn program_of(r: &pb::Request) -> Result<&pb::Program, String> {
    r.program
        .as_ref()
        .ok_or_else(|| "module_request: `program` missing".to_owned())
}

fn net_of(r: &pb::Request) -> Result<&pb::NetTarget, String> {
    match &r.target {
        Some(pb::request::Target::Net(n)) => Ok(n),
        _ => Err("module_request: `target` is not `net`".into()),
    }
}

fn ip(field: &str, s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("module_request: `{field}` `{s}` is not an IP address"))
}

/// Checks that the gRPC request `r` says what the module's request `rec`
/// says on everything the decision rests on; the error names the first
/// field that differs. Fields the module does not state (the user name,
/// a package) are not compared, nor the agent's request id.
pub fn check_request(r: &pb::Request, rec: &Record<'_>) -> Result<(), String> {
    let action = action_of(r);
    if let Some(want) = module::action(rec) {
        same("action", action, want)?;
    }
    match rec {
        Record::ExecRequest(e) => {
            let p = program_of(r)?;
            same("program.sha256", p.sha256.as_slice(), &e.sha256[..])?;
            same("program.sha1", p.sha1.as_slice(), &e.sha1[..])?;
            same("program.size", p.size, e.size)?;
            same(
                "program.path",
                p.path.as_str(),
                &*String::from_utf8_lossy(e.path),
            )?;
            let loader = match &r.target {
                Some(pb::request::Target::Exec(t)) => t.loader_direct,
                _ => return Err("module_request: `target` is not `exec`".into()),
            };
            same(
                "exec.loader_direct",
                loader,
                e.flags & proto::EXEC_LOADER_DIRECT != 0,
            )?;
            same_subject(
                r.subject.as_ref(),
                e.uid,
                e.euid,
                e.gid,
                e.loginuid,
                e.sessionid,
                e.pid,
                e.ancestry,
            )
        }
        Record::NetRequest(n) => {
            let t = net_of(r)?;
            same("net.proto", t.proto, pb::Proto::Tcp as i32)?;
            same(
                "net.established",
                t.established,
                n.kind == proto::NetKind::Established,
            )?;
            same(
                "net.src_addr",
                ip("net.src_addr", &t.src_addr)?,
                module::ip_of(n.family, n.src_addr),
            )?;
            same("net.src_port", t.src_port, u32::from(n.src_port))?;
            same(
                "net.dst_addr",
                ip("net.dst_addr", &t.dst_addr)?,
                module::ip_of(n.family, n.dst_addr),
            )?;
            same("net.dst_port", t.dst_port, u32::from(n.dst_port))?;
            same(
                "program.sha256",
                program_of(r)?.sha256.as_slice(),
                &n.sha256[..],
            )?;
            same_net_subject(r.subject.as_ref(), n)
        }
        Record::IpcRequest(c) => {
            let t = net_of(r)?;
            same("net.proto", t.proto, pb::Proto::Unix as i32)?;
            same(
                "net.dst_addr",
                t.dst_addr.as_str(),
                &*String::from_utf8_lossy(c.path),
            )?;
            same(
                "program.sha256",
                program_of(r)?.sha256.as_slice(),
                &c.sha256[..],
            )?;
            let peer = r.peer.as_ref().ok_or("module_request: `peer` missing")?;
            same("peer.sha256", peer.sha256.as_slice(), &c.peer_sha256[..])?;
            same_subject(
                r.subject.as_ref(),
                c.uid,
                c.euid,
                c.gid,
                c.loginuid,
                c.sessionid,
                c.pid,
                c.ancestry,
            )
        }
        Record::FileRequest(f) => {
            // A path the module named by the appliance's own path of the
            // protected set it matched (`FILE_PATH_NAMED`) must arrive as
            // it is. Any other path is from the root of the file's file
            // system, and the agent maps it to an absolute path on the
            // host (bind mounts, namespaces), which only the host knows:
            // not compared (THREAT-MODEL.md T-102).
            let t = match &r.target {
                Some(pb::request::Target::File(t)) => t,
                _ => return Err("module_request: `target` is not `file`".into()),
            };
            let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            if f.flags & proto::FILE_PATH_NAMED != 0 {
                same("file.path", t.path.clone(), lossy(f.path))?;
            }
            if f.flags & proto::FILE_TO_NAMED != 0 {
                same("file.to", t.to.clone(), Some(lossy(f.to)))?;
            }
            let (create, truncate, link) = (t.create, t.truncate, t.link);
            same("file.create", create, f.flags & proto::FILE_CREATE != 0)?;
            same(
                "file.truncate",
                truncate,
                f.flags & proto::FILE_TRUNCATE != 0,
            )?;
            same("file.link", link, f.flags & proto::FILE_LINK != 0)?;
            same(
                "program.sha256",
                program_of(r)?.sha256.as_slice(),
                &f.sha256[..],
            )?;
            same_subject(
                r.subject.as_ref(),
                f.uid,
                f.euid,
                f.gid,
                f.loginuid,
                f.sessionid,
                f.pid,
                f.ancestry,
            )
        }
        other => Err(format!(
            "module_request: a {:?} record is not a request",
            other.kind()
        )),
    }
}

/// What to do with request `r` of a `Qualify` batch whose module session
/// is `session` (`None`: the batch names none): `None` when it carries no
/// module request (decided and answered as before); the sealing context
/// when its module request is well formed, agrees with it and the session
/// is usable; else the reason to refuse it (a deny, audited).
pub fn ask_of(
    r: &pb::Request,
    session: Option<&Result<Arc<SessionKey>, String>>,
) -> Option<Result<Arc<ModuleAsk>, String>> {
    if r.module_request.is_empty() {
        return None;
    }
    Some((|| {
        let key = session_of(session)?;
        let (header, rec) = module_record(&r.module_request)?;
        let asked = Asked::of(&rec).ok_or_else(|| {
            format!(
                "module_request: a {:?} record is not a request",
                header.kind
            )
        })?;
        check_request(r, &rec)?;
        Ok(Arc::new(ModuleAsk {
            request_id: header.request_id,
            digest: digest(&r.module_request),
            asked,
            key,
        }))
    })())
}

/// The session a module request is sealed for, or why there is none.
fn session_of(
    session: Option<&Result<Arc<SessionKey>, String>>,
) -> Result<Arc<SessionKey>, String> {
    match session {
        None => Err("module_session: missing (needed to answer a module_request sealed)".into()),
        Some(Err(e)) => Err(format!("module_session: {e}")),
        Some(Ok(k)) => Ok(Arc::clone(k)),
    }
}

fn module_record(bytes: &[u8]) -> Result<(proto::Header, Record<'_>), String> {
    proto::decode(bytes).map_err(|e| format!("module_request: not a module record ({e})"))
}

/// What to do with a `Listen` call (channel keys v2): `None` when it
/// carries no module request (registered and answered as before); the
/// sealing context when its module request is a `NetRequest` of kind
/// `Listen` that says what the call's fields say (port = its `dst_port`,
/// program = its SHA-256, the subject's ids = its ids) for a usable
/// session; else why the call is refused.
pub fn listen_ask(
    authority: &Authority,
    r: &pb::ListenRequest,
) -> Option<Result<ModuleAsk, String>> {
    if r.module_request.is_empty() {
        return None;
    }
    Some((|| {
        let session = (!r.module_session.is_empty()).then(|| authority.session(&r.module_session));
        let key = session_of(session.as_ref())?;
        let (header, rec) = module_record(&r.module_request)?;
        let n = match &rec {
            Record::NetRequest(n) if n.kind == NetKind::Listen => n,
            other => {
                return Err(format!(
                    "module_request: a {:?} record is not a listen",
                    other.kind()
                ))
            }
        };
        same("port", r.port, u32::from(n.dst_port))?;
        let program = r
            .program
            .as_ref()
            .ok_or("module_request: `program` missing")?;
        same("program.sha256", program.sha256.as_slice(), &n.sha256[..])?;
        same_net_subject(r.subject.as_ref(), n)?;
        Ok(ModuleAsk {
            request_id: header.request_id,
            digest: digest(&r.module_request),
            asked: Asked::Net(NetKind::Listen),
            key,
        })
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_derive_the_same_session_key() {
        let authority = Authority::new(random_secret().unwrap());
        let module = random_secret().unwrap();
        let module_pub = public_bytes(&module.public_key());
        let k = authority.session(&module_pub).unwrap();
        // The module's side: its private key and the authority's public key.
        let z = shared_secret(&module, &public_key(&authority.public()).unwrap());
        let theirs = SessionKey::derive(&z, &module_pub);
        assert_eq!(k.k, theirs.k);
        // Cached: the same key, no second derivation.
        assert!(Arc::ptr_eq(&k, &authority.session(&module_pub).unwrap()));
        assert_eq!(authority.cached_sessions(), 1);
    }

    #[test]
    fn invalid_sessions_are_refused() {
        let authority = Authority::new(random_secret().unwrap());
        assert!(authority
            .session(&[1; 63])
            .unwrap_err()
            .contains("63 bytes"));
        assert_eq!(
            authority.session(&[1; 64]).unwrap_err(),
            "not a point of P-256"
        );
        assert!(authority.session(&[0; 64]).is_err());
        assert_eq!(authority.cached_sessions(), 0);
    }

    #[test]
    fn the_session_cache_is_bounded_oldest_out() {
        let authority = Authority::with_capacity(random_secret().unwrap(), 3);
        let keys: Vec<[u8; 64]> = (0..4)
            .map(|_| public_bytes(&random_secret().unwrap().public_key()))
            .collect();
        let first = authority.session(&keys[0]).unwrap();
        for k in &keys[1..] {
            authority.session(k).unwrap();
        }
        assert_eq!(authority.cached_sessions(), 3);
        // The oldest was forgotten: derived again (same value, new Arc).
        let again = authority.session(&keys[0]).unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(first.k, again.k);
    }

    #[test]
    fn the_key_is_kept_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open_or_create(dir.path()).unwrap();
        let meta = fs::metadata(dir.path().join(AUTHORITY_KEY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let b = Authority::open_or_create(dir.path()).unwrap();
        assert_eq!(a.public(), b.public());
        assert_eq!(a.public_hex().len(), 128);
        assert!(format!("{a:?}").contains(&a.public_hex()));
        fs::write(dir.path().join(AUTHORITY_KEY_FILE), "zz\n").unwrap();
        assert!(Authority::open_or_create(dir.path()).is_err());
    }

    #[test]
    fn order_sequences_increase() {
        let mut last = next_seq();
        for _ in 0..1000 {
            let s = next_seq();
            assert!(s > last);
            last = s;
        }
    }

    #[test]
    fn verdict_waits_are_clamped() {
        let k = || Arc::new(SessionKey { k: [1; 32] });
        assert_eq!(OrderSeal::new(k(), 0, true).verdict_timeout_ms(), 2500);
        assert_eq!(OrderSeal::new(k(), 7, true).verdict_timeout_ms(), 7);
        assert_eq!(
            OrderSeal::new(k(), u32::MAX, true).verdict_timeout_ms(),
            proto::MAX_VERDICT_TIMEOUT_MS
        );
    }

    /// A file request record with `flags`, `path` and `to`, and the gRPC
    /// request an agent makes of it with `grpc_path` and `grpc_to`.
    fn file_pair(
        flags: u8,
        path: &'static [u8],
        to: &'static [u8],
        grpc_path: &str,
        grpc_to: Option<&str>,
    ) -> (pb::Request, Vec<u8>) {
        let rec = Record::FileRequest(proto::FileRequest {
            access: if to.is_empty() {
                proto::FileAccess::Read
            } else {
                proto::FileAccess::Rename
            },
            flags,
            sha256: [7; 32],
            program_source: proto::ProgramSource::Lineage,
            uid: 1000,
            euid: 1000,
            gid: 1000,
            loginuid: 1000,
            sessionid: 3,
            pid: 400,
            ppid: 1,
            dev: 0x803,
            ino: 12,
            ancestry: proto::Ancestry::from_bytes(&[]).unwrap(),
            path,
            to,
        });
        let action = module::action(&rec).unwrap() as i32;
        let req = pb::Request {
            id: 1,
            action,
            subject: Some(pb::Subject {
                user: "u".into(),
                uid: 1000,
                euid: 1000,
                gid: 1000,
                loginuid: 1000,
                session: 3,
                pid: 400,
                ancestry: Vec::new(),
            }),
            program: Some(pb::Program {
                sha256: vec![7; 32],
                ..pb::Program::default()
            }),
            target: Some(pb::request::Target::File(pb::FileTarget {
                path: grpc_path.into(),
                to: grpc_to.map(str::to_owned),
                create: false,
                truncate: false,
                link: false,
            })),
            ..pb::Request::default()
        };
        (req, module::encode(&rec, 1).unwrap())
    }

    fn checked(req: &pb::Request, bytes: &[u8]) -> Result<(), String> {
        check_request(req, &proto::decode(bytes).unwrap().1)
    }

    #[test]
    fn a_path_the_module_named_must_arrive_as_it_is() {
        use proto::{FILE_PATH_NAMED as P, FILE_TO_NAMED as T};
        // Named by the module: the agent may not restate it (T-102).
        let (ok, b) = file_pair(P, b"/srv/www/x", b"", "/srv/www/x", None);
        checked(&ok, &b).unwrap();
        let (bad, b) = file_pair(P, b"/srv/www/x", b"", "/tmp/x", None);
        assert!(checked(&bad, &b).unwrap_err().contains("file.path"));
        // Not named (from the file system's root): the agent maps it.
        let (mapped, b) = file_pair(0, b"/www/x", b"", "/srv/www/x", None);
        checked(&mapped, &b).unwrap();
        // A rename's new name, named or not.
        let (ok, b) = file_pair(P | T, b"/srv/a", b"/srv/b", "/srv/a", Some("/srv/b"));
        checked(&ok, &b).unwrap();
        let (bad, b) = file_pair(P | T, b"/srv/a", b"/srv/b", "/srv/a", Some("/tmp/b"));
        assert!(checked(&bad, &b).unwrap_err().contains("file.to"));
        let (mapped, b) = file_pair(P, b"/srv/a", b"/b", "/srv/a", Some("/mnt/b"));
        checked(&mapped, &b).unwrap();
    }
}
