// SPDX-License-Identifier: GPL-2.0
//! Channel tickets (channel keys v2, `docs/CHANNEL-KEYS-V2.md`): the
//! formats and checks the kernel module and the appliance share. The
//! appliance seals tickets and hands out host keys and revocations in
//! these layouts (`appliance/src/grants.rs`); the module does not use them
//! yet.
//!
//! No cryptography is done here. The caller seals and opens tickets with
//! AES-256-GCM (the kernel crypto API in the module, a RustCrypto crate on
//! the appliance) over the layouts below, and derives keys with
//! HKDF-SHA256 from the salts and infos built here, so both sides agree on
//! every byte without sharing code beyond this file.
//!
//! # The in-band message
//!
//! The client's kernel sends it in plaintext right after the handshake,
//! before the first TLS record (all integers little-endian):
//!
//! ```text
//! 0       4         5       6        8               24      28       40           40+PLAIN_LEN
//! | "TBT2" | version | flags | length | client nonce | epoch | GCM nonce | ciphertext | tag (16) |
//! ```
//!
//! `length` counts every byte after itself. The appliance seals the ticket
//! once per grant, before any connection, so the GCM additional data
//! ([`sealing_aad`]) is the head and the epoch, not the client nonce,
//! which the client's module draws per connection: the nonce enters the
//! connection key's salt instead, so a nonce changed on the way leaves the
//! two ends with different keys and the first record fails.

use super::{DecodeError, SHA256_LEN};

/// The channel id a ticket's connections are reported under (both ends
/// alike): its id's first eight bytes, little-endian.
pub fn channel_id(id: &[u8; TICKET_ID_LEN]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(id.iter()) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

/// The message's first four bytes.
pub const MAGIC: [u8; 4] = *b"TBT2";
/// The message version this code speaks.
pub const VERSION: u8 = 1;
/// Bytes of the client's nonce.
pub const CLIENT_NONCE_LEN: usize = 16;
/// Bytes of a GCM nonce.
pub const GCM_NONCE_LEN: usize = 12;
/// Bytes of a GCM tag.
pub const GCM_TAG_LEN: usize = 16;
/// Bytes of a host's id (its certificate's identifier, hashed).
pub const HOST_ID_LEN: usize = 16;
/// Bytes of a ticket's id.
pub const TICKET_ID_LEN: usize = 16;
/// Bytes of a pair secret.
pub const PAIR_SECRET_LEN: usize = 32;
/// Most addresses of the client host a ticket lists.
pub const MAX_CLIENT_ADDRS: usize = 8;
/// Most server programs a ticket allows.
pub const MAX_SERVER_PROGRAMS: usize = 4;

/// An address as the module reports ends (`proto::addr`): family 4 or 6,
/// IPv4 in the first four bytes, IPv4-mapped IPv6 reported as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Addr {
    pub family: u8,
    pub bytes: [u8; 16],
}

impl Addr {
    /// An IPv4 address.
    pub fn v4(a: [u8; 4]) -> Addr {
        let [w, x, y, z] = a;
        Addr {
            family: 4,
            bytes: [w, x, y, z, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }
}

/// A ticket's plaintext (the default: all zero, nothing listed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ticket {
    pub id: [u8; TICKET_ID_LEN],
    pub pair_secret: [u8; PAIR_SECRET_LEN],
    pub client_host: [u8; HOST_ID_LEN],
    pub client_program: [u8; SHA256_LEN],
    pub client_uid: u32,
    pub client_loginuid: u32,
    /// The first `n_client_addrs` count.
    pub client_addrs: [Addr; MAX_CLIENT_ADDRS],
    pub n_client_addrs: u8,
    pub server_host: [u8; HOST_ID_LEN],
    pub port: u16,
    /// The first `n_server_programs` count.
    pub server_programs: [[u8; SHA256_LEN]; MAX_SERVER_PROGRAMS],
    pub n_server_programs: u8,
    pub generation: u64,
    /// Wall-clock seconds (Unix time) after which it is refused.
    pub expires_s: u64,
    /// Channel terms: [`TERM_TLS12`], [`TERM_OFFLOAD`].
    pub terms: u8,
    /// Seconds a channel may stay idle, 0 for no limit.
    pub idle_s: u32,
}

/// TLS 1.2 records (for NIC offload) instead of TLS 1.3.
pub const TERM_TLS12: u8 = 1;
/// The channel asks for NIC offload.
pub const TERM_OFFLOAD: u8 = 2;

/// Bytes of a ticket's plaintext.
pub const PLAIN_LEN: usize = TICKET_ID_LEN
    + PAIR_SECRET_LEN
    + HOST_ID_LEN
    + SHA256_LEN
    + 4
    + 4
    + MAX_CLIENT_ADDRS * 17
    + 1
    + HOST_ID_LEN
    + 2
    + MAX_SERVER_PROGRAMS * SHA256_LEN
    + 1
    + 8
    + 8
    + 1
    + 4;
/// Bytes before the client nonce.
const HEAD_LEN: usize = 8;
/// Bytes before the GCM nonce: the head, the client nonce and the epoch.
const CLEAR_LEN: usize = HEAD_LEN + CLIENT_NONCE_LEN + 4;
/// Bytes of the GCM additional data: the head and the epoch.
pub const AAD_LEN: usize = HEAD_LEN + 4;
/// Bytes of a whole message.
pub const MESSAGE_LEN: usize = CLEAR_LEN + GCM_NONCE_LEN + PLAIN_LEN + GCM_TAG_LEN;

/// Why bytes are not a ticket, or a ticket is not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketError {
    /// The stream does not start with a ticket message (a plain client).
    NotATicket,
    /// A version this code does not speak.
    Version(u8),
    /// The length field is not this version's.
    Length(u16),
    /// Flags this version does not define.
    Flags(u8),
    /// A count above its maximum.
    Count,
    /// The ticket names another host.
    WrongHost,
    /// The ticket is for another port.
    WrongPort,
    /// The accepting program is none the ticket allows.
    WrongProgram,
    /// The connection comes from none of the client's addresses.
    WrongPeer,
    /// Past its expiry.
    Expired,
    /// Issued under a generation below the lowest still valid.
    OldGeneration,
    /// The client host or the ticket was revoked.
    Revoked,
}

impl TicketError {
    /// A short reason for log lines and audit.
    pub fn reason(&self) -> &'static str {
        match self {
            TicketError::NotATicket => "not a ticket",
            TicketError::Version(_) => "unknown version",
            TicketError::Length(_) => "wrong length",
            TicketError::Flags(_) => "unknown flags",
            TicketError::Count => "a count over its maximum",
            TicketError::WrongHost => "names another host",
            TicketError::WrongPort => "for another port",
            TicketError::WrongProgram => "the accepting program is not one it allows",
            TicketError::WrongPeer => "the peer is none of the client's addresses",
            TicketError::Expired => "expired",
            TicketError::OldGeneration => "issued under a generation no longer valid",
            TicketError::Revoked => "revoked",
        }
    }
}

/// A whole message, split (borrowed from the stream's bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub client_nonce: &'a [u8; CLIENT_NONCE_LEN],
    /// The host key's epoch the ticket is sealed under.
    pub epoch: u32,
    pub gcm_nonce: &'a [u8; GCM_NONCE_LEN],
    /// The ciphertext ([`PLAIN_LEN`] bytes) and its tag.
    pub ciphertext: &'a [u8; PLAIN_LEN],
    pub tag: &'a [u8; GCM_TAG_LEN],
}

/// The message at the start of `buf` (a stream's first bytes, as many as
/// have arrived): `Ok(None)` while more must arrive, an error as soon as
/// the bytes cannot be a message (so a plain client is told apart at its
/// first byte). Never reads past [`MESSAGE_LEN`]: what follows is the
/// first TLS record.
pub fn message(buf: &[u8]) -> Result<Option<Message<'_>>, TicketError> {
    let seen = buf.len().min(MAGIC.len());
    if buf.get(..seen) != MAGIC.get(..seen) {
        return Err(TicketError::NotATicket);
    }
    let Some(head) = buf.get(..HEAD_LEN) else {
        return Ok(None);
    };
    let [_, _, _, _, version, flags, l0, l1] = *head else {
        return Err(TicketError::NotATicket);
    };
    if version != VERSION {
        return Err(TicketError::Version(version));
    }
    if flags != 0 {
        return Err(TicketError::Flags(flags));
    }
    let len = u16::from_le_bytes([l0, l1]);
    if usize::from(len) != MESSAGE_LEN - HEAD_LEN {
        return Err(TicketError::Length(len));
    }
    let Some(all) = buf.get(..MESSAGE_LEN) else {
        return Ok(None);
    };
    let (clear, rest) = all.split_at(CLEAR_LEN);
    let (gcm_nonce, rest) = rest.split_at(GCM_NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(PLAIN_LEN);
    let (client_nonce, epoch) = (
        clear.get(HEAD_LEN..HEAD_LEN + CLIENT_NONCE_LEN),
        clear.get(HEAD_LEN + CLIENT_NONCE_LEN..),
    );
    let bad = TicketError::NotATicket;
    Ok(Some(Message {
        client_nonce: client_nonce.and_then(|s| s.try_into().ok()).ok_or(bad)?,
        epoch: u32::from_le_bytes(epoch.and_then(|s| s.try_into().ok()).ok_or(bad)?),
        gcm_nonce: gcm_nonce.try_into().map_err(|_| bad)?,
        ciphertext: ciphertext.try_into().map_err(|_| bad)?,
        tag: tag.try_into().map_err(|_| bad)?,
    }))
}

/// The message's head.
fn head() -> [u8; HEAD_LEN] {
    // CAST: MESSAGE_LEN is a few hundred bytes (a const assertion below).
    let [l0, l1] = ((MESSAGE_LEN - HEAD_LEN) as u16).to_le_bytes();
    let [m0, m1, m2, m3] = MAGIC;
    [m0, m1, m2, m3, VERSION, 0, l0, l1]
}

/// The GCM additional data of a ticket sealed under `epoch`: the
/// message's head and the epoch.
pub fn sealing_aad(epoch: u32) -> [u8; AAD_LEN] {
    let mut a = [0u8; AAD_LEN];
    let mut w = super::Writer::new(&mut a);
    w.bytes(&head());
    w.u32(epoch);
    a
}

/// Assembles a message from its parts (the client's kernel, with a fresh
/// nonce per connection; the appliance's tests).
pub fn assemble(
    client_nonce: &[u8; CLIENT_NONCE_LEN],
    epoch: u32,
    gcm_nonce: &[u8; GCM_NONCE_LEN],
    ciphertext: &[u8; PLAIN_LEN],
    tag: &[u8; GCM_TAG_LEN],
) -> [u8; MESSAGE_LEN] {
    let mut m = [0u8; MESSAGE_LEN];
    let mut w = super::Writer::new(&mut m);
    w.bytes(&head());
    w.bytes(client_nonce);
    w.u32(epoch);
    w.bytes(gcm_nonce);
    w.bytes(ciphertext);
    w.bytes(tag);
    m
}

const _: () = assert!(MESSAGE_LEN <= u16::MAX as usize);

impl Ticket {
    /// The plaintext's bytes.
    pub fn encode(&self) -> [u8; PLAIN_LEN] {
        let mut p = [0u8; PLAIN_LEN];
        let mut w = super::Writer::new(&mut p);
        w.bytes(&self.id);
        w.bytes(&self.pair_secret);
        w.bytes(&self.client_host);
        w.bytes(&self.client_program);
        w.u32(self.client_uid);
        w.u32(self.client_loginuid);
        for a in &self.client_addrs {
            w.u8(a.family);
            w.bytes(&a.bytes);
        }
        w.u8(self.n_client_addrs);
        w.bytes(&self.server_host);
        w.u16(self.port);
        for p in &self.server_programs {
            w.bytes(p);
        }
        w.u8(self.n_server_programs);
        w.u64(self.generation);
        w.u64(self.expires_s);
        w.u8(self.terms);
        w.u32(self.idle_s);
        p
    }

    /// A plaintext's ticket (after the GCM open succeeded: the bytes are
    /// the appliance's, but the counts are still checked).
    pub fn decode(p: &[u8; PLAIN_LEN]) -> Result<Ticket, TicketError> {
        // A plaintext of PLAIN_LEN bytes holds every field exactly (the
        // round-trip tests read it to its end), so the reader cannot fail.
        let t = Ticket::fields(p).map_err(|_| TicketError::NotATicket)?;
        if usize::from(t.n_client_addrs) > MAX_CLIENT_ADDRS
            || usize::from(t.n_server_programs) > MAX_SERVER_PROGRAMS
            || t.terms & !(TERM_TLS12 | TERM_OFFLOAD) != 0
        {
            return Err(TicketError::Count);
        }
        Ok(t)
    }

    fn fields(p: &[u8]) -> Result<Ticket, DecodeError> {
        let mut r = super::Reader::new(p);
        let mut t = Ticket {
            id: r.array()?,
            pair_secret: r.array()?,
            client_host: r.array()?,
            client_program: r.array()?,
            client_uid: r.u32()?,
            client_loginuid: r.u32()?,
            ..Ticket::default()
        };
        for a in &mut t.client_addrs {
            a.family = r.u8()?;
            a.bytes = r.array()?;
        }
        t.n_client_addrs = r.u8()?;
        t.server_host = r.array()?;
        t.port = r.u16()?;
        for p in &mut t.server_programs {
            *p = r.array()?;
        }
        t.n_server_programs = r.u8()?;
        t.generation = r.u64()?;
        t.expires_s = r.u64()?;
        t.terms = r.u8()?;
        t.idle_s = r.u32()?;
        r.finish()?;
        Ok(t)
    }

    fn addrs(&self) -> &[Addr] {
        self.client_addrs
            .get(..usize::from(self.n_client_addrs))
            .unwrap_or(&[])
    }

    fn programs(&self) -> &[[u8; SHA256_LEN]] {
        self.server_programs
            .get(..usize::from(self.n_server_programs))
            .unwrap_or(&[])
    }
}

/// What the server's kernel knows about a connection it accepted.
#[derive(Clone, Copy, Debug)]
pub struct Accepting<'a> {
    /// This host's id.
    pub host: &'a [u8; HOST_ID_LEN],
    /// The listener's port.
    pub port: u16,
    /// The accepting listener's program.
    pub program: &'a [u8; SHA256_LEN],
    /// The connection's peer address.
    pub peer: Addr,
    /// Wall-clock seconds now.
    pub now_s: u64,
    /// The lowest generation the appliance declared valid.
    pub min_generation: u64,
}

/// Whether the server's kernel may key a connection with `t`: every
/// check of `docs/CHANNEL-KEYS-V2.md` "What the ticket holds", in order;
/// `revoked(client_host, ticket_id)` answers from the pushed revocations.
pub fn check(
    t: &Ticket,
    a: &Accepting<'_>,
    revoked: impl Fn(&[u8; HOST_ID_LEN], &[u8; TICKET_ID_LEN]) -> bool,
) -> Result<(), TicketError> {
    if t.server_host != *a.host {
        return Err(TicketError::WrongHost);
    }
    if t.port != a.port {
        return Err(TicketError::WrongPort);
    }
    if !t.programs().contains(a.program) {
        return Err(TicketError::WrongProgram);
    }
    if !t.addrs().contains(&a.peer) {
        return Err(TicketError::WrongPeer);
    }
    if a.now_s > t.expires_s {
        return Err(TicketError::Expired);
    }
    if t.generation < a.min_generation {
        return Err(TicketError::OldGeneration);
    }
    if revoked(&t.client_host, &t.id) {
        return Err(TicketError::Revoked);
    }
    Ok(())
}

/// HKDF salt of the host keys (the farm secret is the input key).
pub const HOST_KEY_SALT: &[u8] = b"trustbind host key v2";
/// HKDF info of the connection keys' expansion, before its fields.
pub const CONN_KEY_LABEL: &[u8] = b"trustbind conn v2";

/// HKDF info of host `host`'s key of `epoch`.
pub fn host_key_info(host: &[u8; HOST_ID_LEN], epoch: u32) -> [u8; HOST_ID_LEN + 4] {
    let mut i = [0u8; HOST_ID_LEN + 4];
    let mut w = super::Writer::new(&mut i);
    w.bytes(host);
    w.u32(epoch);
    i
}

/// HKDF salt of a connection's key: the client's nonce and both initial
/// sequence numbers, so every connection's key is fresh even when a
/// 5-tuple comes back.
pub fn conn_salt(
    client_nonce: &[u8; CLIENT_NONCE_LEN],
    isn_client: u32,
    isn_server: u32,
) -> [u8; CLIENT_NONCE_LEN + 8] {
    let mut s = [0u8; CLIENT_NONCE_LEN + 8];
    let mut w = super::Writer::new(&mut s);
    w.bytes(client_nonce);
    w.u32(isn_client);
    w.u32(isn_server);
    s
}

/// Bytes of [`conn_info`].
pub const CONN_INFO_LEN: usize = CONN_KEY_LABEL.len() + TICKET_ID_LEN + 2 * (1 + 16 + 2);

/// HKDF info of a connection's key: the label, the ticket's id and the
/// connection's ends (`client` is the connecting side), each with its
/// family, so no two different pairs of ends give the same bytes.
pub fn conn_info(
    ticket_id: &[u8; TICKET_ID_LEN],
    client: (Addr, u16),
    server: (Addr, u16),
) -> [u8; CONN_INFO_LEN] {
    let mut i = [0u8; CONN_INFO_LEN];
    let mut w = super::Writer::new(&mut i);
    w.bytes(CONN_KEY_LABEL);
    w.bytes(ticket_id);
    w.u8(client.0.family);
    w.bytes(&client.0.bytes);
    w.u16(client.1);
    w.u8(server.0.family);
    w.bytes(&server.0.bytes);
    w.u16(server.1);
    i
}

/// One direction's kTLS material (AES-256-GCM: key, salt, IV).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Direction {
    pub key: [u8; 32],
    pub salt: [u8; 4],
    pub iv: [u8; 8],
}

/// Bytes of HKDF output a connection needs: both directions.
pub const CONN_MATERIAL_LEN: usize = 2 * (32 + 4 + 8);

/// Splits a connection's HKDF output into the client-to-server and the
/// server-to-client directions (separate keys: the nonce spaces cannot
/// meet).
pub fn directions(okm: &[u8; CONN_MATERIAL_LEN]) -> (Direction, Direction) {
    let mut r = super::Reader::new(okm);
    let mut one = || -> Result<Direction, DecodeError> {
        Ok(Direction {
            key: r.array()?,
            salt: r.array()?,
            iv: r.array()?,
        })
    };
    // CONN_MATERIAL_LEN holds exactly the two.
    let to_server = one().unwrap_or_default();
    let to_client = one().unwrap_or_default();
    (to_server, to_client)
}

/// Bytes of a host key.
pub const HOST_KEY_LEN: usize = 32;
/// Bytes of a [`HostKeys`] record.
pub const HOST_KEYS_LEN: usize = HOST_ID_LEN + 2 * (4 + HOST_KEY_LEN);

/// A host's own keys, as the appliance hands them to that host only (over
/// its mutual-TLS session): the current epoch's and the previous one's, so
/// tickets sealed just before a rotation still open.
///
/// ```text
/// 0      16      20     52           56           88
/// | host | epoch | key | prev epoch | prev key |
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct HostKeys {
    pub host: [u8; HOST_ID_LEN],
    pub epoch: u32,
    pub key: [u8; HOST_KEY_LEN],
    pub prev_epoch: u32,
    pub prev_key: [u8; HOST_KEY_LEN],
}

impl core::fmt::Debug for HostKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never the keys.
        f.debug_struct("HostKeys")
            .field("host", &self.host)
            .field("epoch", &self.epoch)
            .field("prev_epoch", &self.prev_epoch)
            .finish_non_exhaustive()
    }
}

impl HostKeys {
    /// The record's bytes.
    pub fn encode(&self) -> [u8; HOST_KEYS_LEN] {
        let mut b = [0u8; HOST_KEYS_LEN];
        let mut w = super::Writer::new(&mut b);
        w.bytes(&self.host);
        w.u32(self.epoch);
        w.bytes(&self.key);
        w.u32(self.prev_epoch);
        w.bytes(&self.prev_key);
        b
    }

    /// A record's keys; the previous epoch must be the one before.
    pub fn decode(b: &[u8]) -> Result<HostKeys, DecodeError> {
        let mut r = super::Reader::new(b);
        let k = HostKeys {
            host: r.array()?,
            epoch: r.u32()?,
            key: r.array()?,
            prev_epoch: r.u32()?,
            prev_key: r.array()?,
        };
        r.finish()?;
        if k.epoch.checked_sub(1) != Some(k.prev_epoch) {
            return Err(DecodeError::InvalidField("prev_epoch"));
        }
        Ok(k)
    }

    /// Overwrites both keys with zeros (the fence keeps the stores from
    /// being dropped as dead).
    pub fn wipe(&mut self) {
        self.key = [0; HOST_KEY_LEN];
        self.prev_key = [0; HOST_KEY_LEN];
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    }

    /// The key of `epoch`, if it is one of the two.
    pub fn of_epoch(&self, epoch: u32) -> Option<&[u8; HOST_KEY_LEN]> {
        if epoch == self.epoch {
            Some(&self.key)
        } else if epoch == self.prev_epoch {
            Some(&self.prev_key)
        } else {
            None
        }
    }
}

/// Most revoked hosts, and most revoked tickets, one [`Revocations`]
/// record lists (the record stays within `MAX_RECORD_LEN`).
pub const MAX_REVOKED: usize = 240;
/// Bytes of a [`Revocations`] record's fixed part.
pub const REVOCATIONS_HEAD_LEN: usize = 8 + 2 + 2;
/// Largest [`Revocations`] record.
pub const MAX_REVOCATIONS_LEN: usize =
    REVOCATIONS_HEAD_LEN + MAX_REVOKED * (HOST_ID_LEN + TICKET_ID_LEN);

/// What the appliance declared no longer valid, pushed to every connected
/// host on a policy change, a host revocation or an exhausted licence: a
/// whole record replaces the last one.
///
/// ```text
/// 0                8         10          12
/// | min generation | n hosts | n tickets | hosts (16 each) | ticket ids (16 each) |
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revocations<'a> {
    /// Tickets issued under a lower generation are refused.
    pub min_generation: u64,
    hosts: &'a [u8],
    tickets: &'a [u8],
}

impl<'a> Revocations<'a> {
    /// Reads a record (the counts checked before any list is read).
    pub fn decode(b: &'a [u8]) -> Result<Revocations<'a>, DecodeError> {
        let mut r = super::Reader::new(b);
        let min_generation = r.u64()?;
        let n_hosts = usize::from(r.u16()?);
        let n_tickets = usize::from(r.u16()?);
        if n_hosts > MAX_REVOKED {
            return Err(DecodeError::InvalidField("n_hosts"));
        }
        if n_tickets > MAX_REVOKED {
            return Err(DecodeError::InvalidField("n_tickets"));
        }
        let hosts = r.bytes(n_hosts * HOST_ID_LEN)?;
        let tickets = r.bytes(n_tickets * TICKET_ID_LEN)?;
        r.finish()?;
        Ok(Revocations {
            min_generation,
            hosts,
            tickets,
        })
    }

    /// Writes a record listing `hosts` and `tickets` into `out`; its
    /// length, or `None` when a list is over [`MAX_REVOKED`] or `out` too
    /// short.
    pub fn encode(
        min_generation: u64,
        hosts: &[[u8; HOST_ID_LEN]],
        tickets: &[[u8; TICKET_ID_LEN]],
        out: &mut [u8],
    ) -> Option<usize> {
        if hosts.len() > MAX_REVOKED || tickets.len() > MAX_REVOKED {
            return None;
        }
        let len = REVOCATIONS_HEAD_LEN + hosts.len() * HOST_ID_LEN + tickets.len() * TICKET_ID_LEN;
        let out = out.get_mut(..len)?;
        let mut w = super::Writer::new(out);
        w.u64(min_generation);
        // CAST: both at most MAX_REVOKED, checked above.
        w.u16(hosts.len() as u16);
        w.u16(tickets.len() as u16);
        for h in hosts {
            w.bytes(h);
        }
        for t in tickets {
            w.bytes(t);
        }
        Some(len)
    }

    /// Bytes of this record.
    pub fn encoded_len(&self) -> usize {
        REVOCATIONS_HEAD_LEN + self.hosts.len() + self.tickets.len()
    }

    /// Writes this record (as read) again, e.g. into a device record.
    pub(super) fn write(&self, w: &mut super::Writer<'_>) {
        w.u64(self.min_generation);
        // CAST: both at most MAX_REVOKED entries, checked by `decode`.
        w.u16((self.hosts.len() / HOST_ID_LEN) as u16);
        w.u16((self.tickets.len() / TICKET_ID_LEN) as u16);
        w.bytes(self.hosts);
        w.bytes(self.tickets);
    }

    /// The revoked hosts' ids.
    pub fn hosts(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.hosts.chunks_exact(HOST_ID_LEN)
    }

    /// The revoked tickets' ids.
    pub fn tickets(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.tickets.chunks_exact(TICKET_ID_LEN)
    }

    /// Whether a ticket of `client_host` with id `ticket_id` is revoked:
    /// the `revoked` argument of [`check`].
    pub fn revoked(
        &self,
        client_host: &[u8; HOST_ID_LEN],
        ticket_id: &[u8; TICKET_ID_LEN],
    ) -> bool {
        self.hosts().any(|h| h == client_host) || self.tickets().any(|t| t == ticket_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(a: [u8; 4]) -> Addr {
        Addr::v4(a)
    }

    fn ticket() -> Ticket {
        let mut t = Ticket {
            id: [1; 16],
            pair_secret: [2; 32],
            client_host: [3; 16],
            client_program: [4; 32],
            client_uid: 1000,
            client_loginuid: 1000,
            n_client_addrs: 2,
            server_host: [5; 16],
            port: 5432,
            n_server_programs: 1,
            generation: 9,
            expires_s: 2_000_000_000,
            idle_s: 600,
            ..Ticket::default()
        };
        t.client_addrs[0] = v4([10, 0, 0, 1]);
        t.client_addrs[1] = v4([10, 0, 0, 2]);
        t.server_programs[0] = [7; 32];
        t
    }

    fn accepting<'a>(host: &'a [u8; 16], program: &'a [u8; 32]) -> Accepting<'a> {
        Accepting {
            host,
            port: 5432,
            program,
            peer: v4([10, 0, 0, 2]),
            now_s: 1_900_000_000,
            min_generation: 9,
        }
    }

    #[test]
    fn a_ticket_survives_its_encoding() {
        let t = ticket();
        assert_eq!(Ticket::decode(&t.encode()), Ok(t));
    }

    #[test]
    fn counts_past_their_maximum_are_refused() {
        let mut t = ticket();
        t.n_client_addrs = MAX_CLIENT_ADDRS as u8 + 1;
        assert_eq!(Ticket::decode(&t.encode()), Err(TicketError::Count));
        let mut t = ticket();
        t.n_server_programs = MAX_SERVER_PROGRAMS as u8 + 1;
        assert_eq!(Ticket::decode(&t.encode()), Err(TicketError::Count));
        let mut t = ticket();
        t.terms = 4;
        assert_eq!(Ticket::decode(&t.encode()), Err(TicketError::Count));
    }

    fn whole() -> [u8; MESSAGE_LEN] {
        assemble(
            &[6; CLIENT_NONCE_LEN],
            3,
            &[8; 12],
            &ticket().encode(),
            &[9; 16],
        )
    }

    #[test]
    fn a_message_is_found_only_once_whole_and_split_as_assembled() {
        let m = whole();
        for n in 0..MESSAGE_LEN {
            assert_eq!(message(&m[..n]), Ok(None), "{n} bytes");
        }
        let mut stream = m.to_vec();
        stream.extend_from_slice(b"\x17\x03\x03 the first TLS record");
        let got = message(&stream).unwrap().unwrap();
        assert_eq!(got.client_nonce, &[6; CLIENT_NONCE_LEN]);
        assert_eq!(got.epoch, 3);
        assert_eq!(&m[..HEAD_LEN], &sealing_aad(3)[..HEAD_LEN]);
        assert_eq!(&sealing_aad(3)[HEAD_LEN..], &3u32.to_le_bytes());
        assert_ne!(sealing_aad(3), sealing_aad(4));
        assert_eq!(got.gcm_nonce, &[8; 12]);
        assert_eq!(got.ciphertext, &ticket().encode());
        assert_eq!(got.tag, &[9; 16]);
    }

    #[test]
    fn a_plain_client_is_told_apart_at_its_first_byte() {
        assert_eq!(message(b"G"), Err(TicketError::NotATicket));
        assert_eq!(message(b"TBX"), Err(TicketError::NotATicket));
        assert_eq!(message(b"\x16\x03\x01"), Err(TicketError::NotATicket));
        let mut m = whole();
        m[4] = 2;
        assert_eq!(message(&m), Err(TicketError::Version(2)));
        let mut m = whole();
        m[5] = 1;
        assert_eq!(message(&m), Err(TicketError::Flags(1)));
        let mut m = whole();
        m[6] ^= 1;
        assert!(matches!(message(&m), Err(TicketError::Length(_))));
    }

    #[test]
    fn each_check_refuses_what_it_is_for() {
        let (host, prog) = ([5u8; 16], [7u8; 32]);
        let ok = accepting(&host, &prog);
        let t = ticket();
        let never = |_: &[u8; 16], _: &[u8; 16]| false;
        assert_eq!(check(&t, &ok, never), Ok(()));
        let other_host = [6u8; 16];
        assert_eq!(
            check(
                &t,
                &Accepting {
                    host: &other_host,
                    ..ok
                },
                never
            ),
            Err(TicketError::WrongHost)
        );
        assert_eq!(
            check(&t, &Accepting { port: 5433, ..ok }, never),
            Err(TicketError::WrongPort)
        );
        let other_prog = [8u8; 32];
        assert_eq!(
            check(
                &t,
                &Accepting {
                    program: &other_prog,
                    ..ok
                },
                never
            ),
            Err(TicketError::WrongProgram)
        );
        // An address in a slot past the count is not the client's.
        let mut hidden = t;
        hidden.client_addrs[2] = v4([10, 0, 0, 9]);
        assert_eq!(
            check(
                &hidden,
                &Accepting {
                    peer: v4([10, 0, 0, 9]),
                    ..ok
                },
                never
            ),
            Err(TicketError::WrongPeer)
        );
        // The same bytes as IPv6 are another address.
        let mut v6 = v4([10, 0, 0, 2]);
        v6.family = 6;
        assert_eq!(
            check(&t, &Accepting { peer: v6, ..ok }, never),
            Err(TicketError::WrongPeer)
        );
        assert_eq!(
            check(
                &t,
                &Accepting {
                    now_s: t.expires_s + 1,
                    ..ok
                },
                never
            ),
            Err(TicketError::Expired)
        );
        assert_eq!(
            check(
                &t,
                &Accepting {
                    now_s: t.expires_s,
                    ..ok
                },
                never
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &t,
                &Accepting {
                    min_generation: 10,
                    ..ok
                },
                never
            ),
            Err(TicketError::OldGeneration)
        );
        assert_eq!(
            check(&t, &ok, |h, _| *h == [3; 16]),
            Err(TicketError::Revoked)
        );
        assert_eq!(
            check(&t, &ok, |_, id| *id == [1; 16]),
            Err(TicketError::Revoked)
        );
        // A program in a slot past the count is not allowed.
        let mut t2 = t;
        t2.server_programs[1] = [8; 32];
        assert_eq!(
            check(
                &t2,
                &Accepting {
                    program: &other_prog,
                    ..ok
                },
                never
            ),
            Err(TicketError::WrongProgram)
        );
    }

    #[test]
    fn key_derivation_inputs_differ_whenever_a_part_does() {
        let n = [1u8; CLIENT_NONCE_LEN];
        let s = conn_salt(&n, 10, 20);
        assert_ne!(s, conn_salt(&n, 11, 20));
        assert_ne!(s, conn_salt(&n, 10, 21));
        assert_ne!(s, conn_salt(&[2; CLIENT_NONCE_LEN], 10, 20));
        let (c, sv) = ((v4([10, 0, 0, 1]), 40000), (v4([10, 0, 0, 2]), 5432));
        let i = conn_info(&[1; 16], c, sv);
        assert!(i.starts_with(CONN_KEY_LABEL));
        assert_ne!(i, conn_info(&[2; 16], c, sv));
        assert_ne!(i, conn_info(&[1; 16], sv, c));
        assert_ne!(i, conn_info(&[1; 16], (c.0, 40001), sv));
        // The same bytes as another family, at either end.
        let as_v6 = |a: Addr| Addr { family: 6, ..a };
        assert_ne!(i, conn_info(&[1; 16], c, (as_v6(sv.0), sv.1)));
        assert_ne!(i, conn_info(&[1; 16], (as_v6(c.0), c.1), sv));
        assert_ne!(host_key_info(&[1; 16], 1), host_key_info(&[1; 16], 2));
        assert_ne!(host_key_info(&[1; 16], 1), host_key_info(&[2; 16], 1));
    }

    #[test]
    fn the_directions_take_disjoint_parts_of_the_material() {
        let mut okm = [0u8; CONN_MATERIAL_LEN];
        for (i, b) in okm.iter_mut().enumerate() {
            *b = i as u8;
        }
        let (up, down) = directions(&okm);
        assert_eq!(up.key[0], 0);
        assert_eq!(up.salt[0], 32);
        assert_eq!(up.iv[0], 36);
        assert_eq!(down.key[0], 44);
        assert_eq!(down.iv[7], 87);
    }

    proptest! {
        /// Whatever arrives, the parser neither panics nor reads past the
        /// message; anything it accepts is exactly the first
        /// [`MESSAGE_LEN`] bytes.
        #[test]
        fn the_parser_takes_only_whole_messages(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            keep_head in any::<bool>(),
        ) {
            let mut b = bytes;
            if keep_head && b.len() >= HEAD_LEN {
                b[..HEAD_LEN].copy_from_slice(&whole()[..HEAD_LEN]);
            }
            if let Ok(Some(m)) = message(&b) {
                prop_assert!(b.len() >= MESSAGE_LEN);
                prop_assert_eq!(&m.client_nonce[..], &b[HEAD_LEN..HEAD_LEN + CLIENT_NONCE_LEN]);
                prop_assert_eq!(&m.tag[..], &b[MESSAGE_LEN - GCM_TAG_LEN..MESSAGE_LEN]);
            }
        }

        /// Every ticket whose counts are within bounds survives its
        /// encoding.
        #[test]
        fn tickets_round_trip(
            secret in any::<[u8; 32]>(),
            n_addrs in 0u8..=MAX_CLIENT_ADDRS as u8,
            n_progs in 0u8..=MAX_SERVER_PROGRAMS as u8,
            port in any::<u16>(),
            generation in any::<u64>(),
            expires in any::<u64>(),
            terms in 0u8..4,
        ) {
            let t = Ticket {
                pair_secret: secret,
                n_client_addrs: n_addrs,
                n_server_programs: n_progs,
                port,
                generation,
                expires_s: expires,
                terms,
                ..ticket()
            };
            prop_assert_eq!(Ticket::decode(&t.encode()), Ok(t));
        }
    }

    #[test]
    fn host_keys_survive_their_encoding_and_answer_by_epoch() {
        let k = HostKeys {
            host: [1; 16],
            epoch: 20_000,
            key: [2; 32],
            prev_epoch: 19_999,
            prev_key: [3; 32],
        };
        let b = k.encode();
        assert_eq!(HostKeys::decode(&b), Ok(k));
        assert_eq!(k.of_epoch(20_000), Some(&[2; 32]));
        assert_eq!(k.of_epoch(19_999), Some(&[3; 32]));
        assert_eq!(k.of_epoch(20_001), None);
        assert_eq!(k.of_epoch(19_998), None);
        // Not the epoch before: refused.
        let odd = HostKeys { prev_epoch: 5, ..k };
        assert_eq!(
            HostKeys::decode(&odd.encode()),
            Err(DecodeError::InvalidField("prev_epoch"))
        );
        assert!(HostKeys::decode(&b[..HOST_KEYS_LEN - 1]).is_err());
        let mut long = b.to_vec();
        long.push(0);
        assert_eq!(HostKeys::decode(&long), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn revocations_list_what_they_revoke_and_nothing_else() {
        let mut buf = [0u8; MAX_REVOCATIONS_LEN];
        let n = Revocations::encode(9, &[[3; 16]], &[[1; 16], [4; 16]], &mut buf).unwrap();
        let r = Revocations::decode(&buf[..n]).unwrap();
        assert_eq!(r.min_generation, 9);
        assert!(r.revoked(&[3; 16], &[0; 16]));
        assert!(r.revoked(&[0; 16], &[4; 16]));
        assert!(!r.revoked(&[1; 16], &[3; 16]));
        // The record answers `check` directly.
        let (host, prog) = ([5u8; 16], [7u8; 32]);
        assert_eq!(
            check(&ticket(), &accepting(&host, &prog), |h, id| r
                .revoked(h, id)),
            Err(TicketError::Revoked)
        );
        let too_many = [[0u8; 16]; MAX_REVOKED + 1];
        assert_eq!(Revocations::encode(0, &too_many, &[], &mut buf), None);
        assert_eq!(
            Revocations::encode(0, &[[0; 16]], &[], &mut [0u8; 20]),
            None
        );
        // A count past the maximum is refused before the lists are read.
        let mut bad = buf;
        bad[8..10].copy_from_slice(&(MAX_REVOKED as u16 + 1).to_le_bytes());
        assert_eq!(
            Revocations::decode(&bad[..n]),
            Err(DecodeError::InvalidField("n_hosts"))
        );
        assert!(Revocations::decode(&buf[..n - 1]).is_err());
    }

    proptest! {
        /// Whatever arrives, the revocation reader neither panics nor
        /// accepts a record of another length than its counts say.
        #[test]
        fn revocations_read_only_whole_records(
            bytes in proptest::collection::vec(any::<u8>(), 0..700),
        ) {
            if let Ok(r) = Revocations::decode(&bytes) {
                let len = REVOCATIONS_HEAD_LEN
                    + r.hosts().count() * HOST_ID_LEN
                    + r.tickets().count() * TICKET_ID_LEN;
                prop_assert_eq!(len, bytes.len());
            }
        }

        /// Every record within bounds survives its encoding.
        #[test]
        fn revocations_round_trip(
            min in any::<u64>(),
            hosts in proptest::collection::vec(any::<[u8; 16]>(), 0..20),
            tickets in proptest::collection::vec(any::<[u8; 16]>(), 0..20),
        ) {
            let mut buf = [0u8; MAX_REVOCATIONS_LEN];
            let n = Revocations::encode(min, &hosts, &tickets, &mut buf).unwrap();
            let r = Revocations::decode(&buf[..n]).unwrap();
            prop_assert_eq!(r.min_generation, min);
            let got_h: Vec<&[u8]> = r.hosts().collect();
            let want_h: Vec<&[u8]> = hosts.iter().map(|h| &h[..]).collect();
            prop_assert_eq!(got_h, want_h);
            let got_t: Vec<&[u8]> = r.tickets().collect();
            let want_t: Vec<&[u8]> = tickets.iter().map(|t| &t[..]).collect();
            prop_assert_eq!(got_t, want_t);
        }
    }
}
