//! Channel keys v2 (`docs/CHANNEL-KEYS-V2.md`): the farm secret, the host
//! keys derived from it, and grants with their tickets. `serve` loads the
//! farm secret from its data directory ([`Farm::open_or_create`]; an
//! administrator moves it between the appliances of a farm with
//! `trustbind-appliance farm-secret export | import`) and issues grants
//! with it (`crate::grants`); no module opens tickets yet. [`open`] and
//! [`connection_keys`] do what the server's and the client's kernels will
//! do: the reference the kernel's half will be tested against.
//!
//! Formats and checks are `trustbind_proto::ticket`'s; here, AES-256-GCM
//! (`ring`) and HKDF-SHA256 (`hkdf`) over them.

use std::io::Write as _;
use std::path::Path;

use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::{Digest as _, Sha256};
use trustbind_proto::ticket::{
    self, Addr, Direction, Ticket, TicketError, CLIENT_NONCE_LEN, CONN_MATERIAL_LEN, GCM_NONCE_LEN,
    GCM_TAG_LEN, HOST_ID_LEN, MESSAGE_LEN, PLAIN_LEN,
};
use zeroize::{Zeroize, Zeroizing};

/// Bytes of the farm secret and of a host key.
pub const KEY_LEN: usize = 32;
/// The farm secret's file in the data directory (64 hex digits, mode 0600).
pub const FARM_SECRET_FILE: &str = "farm.key";
/// Seconds of one host-key epoch: keys rotate daily.
pub const EPOCH_SECS: u64 = 86_400;

/// The host-key epoch of wall-clock second `now_s`.
pub fn epoch_of(now_s: u64) -> u32 {
    u32::try_from(now_s / EPOCH_SECS).unwrap_or(u32::MAX)
}

/// A host's id in tickets and host keys: the first 16 bytes of SHA-256
/// over a label and its name (its certificate's CN, kept across
/// renewals), so every appliance of a farm names a host alike.
pub fn host_id(name: &str) -> [u8; HOST_ID_LEN] {
    let d = Sha256::new()
        .chain_update(b"trustbind host id v2\0")
        .chain_update(name.as_bytes())
        .finalize();
    let (id, _) = d
        .split_first_chunk::<HOST_ID_LEN>()
        .unwrap_or((&[0; HOST_ID_LEN], &[]));
    *id
}

/// Why the farm secret's file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FarmFileError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a farm secret (64 hex digits)")]
    Bad(std::path::PathBuf),
    #[error("the system's random source failed")]
    Random,
    #[error("{0} holds another farm secret; give --replace to replace it (tickets sealed under the old one stop opening)")]
    Differs(std::path::PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FarmFileError + '_ {
    move |source| FarmFileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The secret a farm-secret file holds.
fn read_secret(path: &Path) -> Result<Zeroizing<[u8; KEY_LEN]>, FarmFileError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io_err(path))?);
    let mut secret = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(text.trim(), &mut secret[..])
        .map_err(|_| FarmFileError::Bad(path.to_owned()))?;
    Ok(secret)
}

/// Writes `secret` to `path` (mode 0600, synced) through a temporary file
/// in the same directory: renamed over `path` when `replace`, otherwise
/// linked only if `path` does not exist yet (`Ok(false)` when it does).
fn write_secret(path: &Path, secret: &[u8; KEY_LEN], replace: bool) -> Result<bool, FarmFileError> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut f = tempfile::Builder::new()
        .prefix(".tmp-farm-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    let tmp = f.path().to_owned();
    f.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(&tmp))?;
    let mut text = Zeroizing::new(hex::encode(secret));
    text.push('\n');
    f.write_all(text.as_bytes())
        .and_then(|()| f.as_file().sync_all())
        .map_err(io_err(&tmp))?;
    let done = if replace {
        f.persist(path).map(|_| true).map_err(|e| e.error)
    } else {
        match f.persist_noclobber(path) {
            Ok(_) => Ok(true),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e.error),
        }
    }
    .map_err(io_err(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(done)
}

/// The secret every appliance of a farm shares; every host key derives
/// from it, so appliances holding it issue tickets any of them can key,
/// with no state in common.
pub struct Farm {
    secret: Zeroizing<[u8; KEY_LEN]>,
}

/// A host's key of one epoch (sent to its module, sealed).
pub struct HostKey {
    pub host: [u8; HOST_ID_LEN],
    pub epoch: u32,
    key: Zeroizing<[u8; KEY_LEN]>,
}

/// What a client's module gets for a first connect: the pair secret, kept
/// until the grant expires, and the ticket message's sealed part, sent
/// in-band (with a fresh client nonce) on every connection.
pub struct Grant {
    pub pair_secret: Zeroizing<[u8; ticket::PAIR_SECRET_LEN]>,
    pub ticket_id: [u8; ticket::TICKET_ID_LEN],
    pub epoch: u32,
    pub expires_s: u64,
    /// GCM nonce ‖ ciphertext ‖ tag, as the message carries them.
    pub sealed: Vec<u8>,
}

/// Why a ticket could not be sealed or opened.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the system's random source failed")]
    Random,
    #[error("the ticket does not open under this host's key (wrong host, wrong epoch, or changed on the way)")]
    Open,
    #[error("the ticket is not acceptable: {0:?}")]
    Ticket(TicketError),
}

fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|_| Error::Random)?;
    Ok(b)
}

impl Farm {
    /// The farm of `secret`.
    pub fn new(secret: [u8; KEY_LEN]) -> Self {
        Farm {
            secret: Zeroizing::new(secret),
        }
    }

    /// A new farm secret from the OS.
    pub fn generate() -> Result<Self, Error> {
        Ok(Farm::new(random()?))
    }

    /// The farm secret of the data directory `dir` ([`FARM_SECRET_FILE`]),
    /// drawn and written (0600, never over an existing file: two
    /// processes starting at once end up with the one that was written
    /// first) when there is none.
    pub fn open_or_create(dir: &Path) -> Result<Self, FarmFileError> {
        let path = dir.join(FARM_SECRET_FILE);
        if !path.exists() {
            let fresh: Zeroizing<[u8; KEY_LEN]> =
                Zeroizing::new(random().map_err(|_| FarmFileError::Random)?);
            write_secret(&path, &fresh, false)?;
        }
        Ok(Farm {
            secret: read_secret(&path)?,
        })
    }

    /// Makes the farm secret in the file `from` (an export of another
    /// appliance of the farm) this data directory's. Refused when another
    /// secret is there, unless `replace`. Returns whether it changed.
    pub fn import(dir: &Path, from: &Path, replace: bool) -> Result<bool, FarmFileError> {
        let secret = read_secret(from)?;
        let path = dir.join(FARM_SECRET_FILE);
        if path.exists() {
            let have = read_secret(&path)?;
            if bool::from(subtle::ConstantTimeEq::ct_eq(&have[..], &secret[..])) {
                return Ok(false);
            }
            if !replace {
                return Err(FarmFileError::Differs(path));
            }
        }
        if !write_secret(&path, &secret, replace)? {
            return Err(FarmFileError::Differs(path));
        }
        Ok(true)
    }

    /// The farm secret as its file holds it (64 hex digits and a newline),
    /// for `farm-secret export`.
    pub fn export(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(hex::encode(&self.secret[..]));
        text.push('\n');
        text
    }

    /// Host `host`'s key of `epoch`: HKDF-SHA256 of the farm secret.
    pub fn host_key(&self, host: &[u8; HOST_ID_LEN], epoch: u32) -> HostKey {
        let hk = Hkdf::<Sha256>::new(Some(ticket::HOST_KEY_SALT), &self.secret[..]);
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        // A 32-byte output is always within HKDF-SHA256's limit.
        let _ = hk.expand(&ticket::host_key_info(host, epoch), &mut key[..]);
        HostKey {
            host: *host,
            epoch,
            key,
        }
    }

    /// Seals `t` (its id and pair secret drawn here, replacing whatever
    /// `t` held) to the server host's key of `epoch`.
    pub fn grant(&self, mut t: Ticket, epoch: u32) -> Result<Grant, Error> {
        t.pair_secret = random()?;
        t.id = random()?;
        let key = self.host_key(&t.server_host, epoch);
        let gcm_nonce: [u8; GCM_NONCE_LEN] = random()?;
        let mut buf = Zeroizing::new(t.encode().to_vec());
        // Random GCM nonces under one host key of one epoch: far fewer
        // than the 2^32 seals that bound their collision risk.
        let tag = sealing_key(&key)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(gcm_nonce),
                Aad::from(ticket::sealing_aad(epoch)),
                &mut buf[..],
            )
            .map_err(|_| Error::Random)?;
        let mut sealed = Vec::with_capacity(GCM_NONCE_LEN + PLAIN_LEN + GCM_TAG_LEN);
        sealed.extend_from_slice(&gcm_nonce);
        sealed.extend_from_slice(&buf);
        sealed.extend_from_slice(tag.as_ref());
        let pair_secret = Zeroizing::new(t.pair_secret);
        t.pair_secret.zeroize();
        Ok(Grant {
            pair_secret,
            ticket_id: t.id,
            epoch,
            expires_s: t.expires_s,
            sealed,
        })
    }

    /// Host `host`'s keys of `epoch` and the epoch before, as the record
    /// (`ticket::HostKeys`) its module is given.
    pub fn host_keys(
        &self,
        host: &[u8; HOST_ID_LEN],
        epoch: u32,
    ) -> Zeroizing<[u8; ticket::HOST_KEYS_LEN]> {
        let prev_epoch = epoch.saturating_sub(1);
        let mut k = ticket::HostKeys {
            host: *host,
            epoch,
            key: *self.host_key(host, epoch).key,
            prev_epoch,
            prev_key: *self.host_key(host, prev_epoch).key,
        };
        let record = Zeroizing::new(k.encode());
        k.wipe();
        record
    }
}

fn sealing_key(k: &HostKey) -> LessSafeKey {
    // AES-256 takes any 32 bytes.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k.key[..]).unwrap_or_else(|_| unreachable!()))
}

impl std::fmt::Debug for Grant {
    /// Never the pair secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("ticket_id", &hex::encode(self.ticket_id))
            .field("epoch", &self.epoch)
            .field("expires_s", &self.expires_s)
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// The in-band message for one connection with `client_nonce`.
    pub fn message(&self, client_nonce: &[u8; CLIENT_NONCE_LEN]) -> Option<[u8; MESSAGE_LEN]> {
        let (nonce, rest) = self.sealed.split_first_chunk::<GCM_NONCE_LEN>()?;
        let (ct, tag) = rest.split_first_chunk::<PLAIN_LEN>()?;
        let tag: &[u8; GCM_TAG_LEN] = tag.try_into().ok()?;
        Some(ticket::assemble(client_nonce, self.epoch, nonce, ct, tag))
    }
}

impl HostKey {
    /// The key of `epoch` from a host's keys record, as its module holds
    /// them.
    pub fn from_record(k: &ticket::HostKeys, epoch: u32) -> Option<HostKey> {
        Some(HostKey {
            host: k.host,
            epoch,
            key: Zeroizing::new(*k.of_epoch(epoch)?),
        })
    }

    /// Opens a message's ticket, as the server's module will: the bytes
    /// must open under this key.
    pub fn open(&self, m: &ticket::Message<'_>) -> Result<Ticket, Error> {
        if m.epoch != self.epoch {
            return Err(Error::Open);
        }
        let mut buf = Zeroizing::new([0u8; PLAIN_LEN + GCM_TAG_LEN]);
        let (ct, tag) = buf.split_at_mut(PLAIN_LEN);
        ct.copy_from_slice(m.ciphertext);
        tag.copy_from_slice(m.tag);
        let plain = sealing_key(self)
            .open_in_place(
                Nonce::assume_unique_for_key(*m.gcm_nonce),
                Aad::from(ticket::sealing_aad(m.epoch)),
                &mut buf[..],
            )
            .map_err(|_| Error::Open)?;
        let plain: &[u8; PLAIN_LEN] = (&*plain).try_into().map_err(|_| Error::Open)?;
        Ticket::decode(plain).map_err(Error::Ticket)
    }
}

/// Opens and checks the message at the start of `stream` as the server's
/// module will (the reference for the kernel's tests): the ticket and the
/// client's nonce, if every check of `trustbind_proto::ticket::check`
/// passes.
pub fn open(
    key: &HostKey,
    stream: &[u8],
    accepting: &ticket::Accepting<'_>,
    revoked: impl Fn(&[u8; HOST_ID_LEN], &[u8; ticket::TICKET_ID_LEN]) -> bool,
) -> Result<(Ticket, [u8; CLIENT_NONCE_LEN]), Error> {
    let m = ticket::message(stream)
        .map_err(Error::Ticket)?
        .ok_or(Error::Ticket(TicketError::NotATicket))?;
    let t = key.open(&m)?;
    ticket::check(&t, accepting, revoked).map_err(Error::Ticket)?;
    Ok((t, *m.client_nonce))
}

/// Both directions' kTLS material of one connection, as both modules
/// derive it: HKDF-SHA256 of the pair secret with the client's nonce and
/// both initial sequence numbers as salt, the ticket id and the ends as
/// info.
pub fn connection_keys(
    pair_secret: &[u8; ticket::PAIR_SECRET_LEN],
    ticket_id: &[u8; ticket::TICKET_ID_LEN],
    client_nonce: &[u8; CLIENT_NONCE_LEN],
    isn: (u32, u32),
    client: (Addr, u16),
    server: (Addr, u16),
) -> (Direction, Direction) {
    let salt = ticket::conn_salt(client_nonce, isn.0, isn.1);
    let hk = Hkdf::<Sha256>::new(Some(&salt), pair_secret);
    let mut okm = Zeroizing::new([0u8; CONN_MATERIAL_LEN]);
    // 88 bytes are within HKDF-SHA256's limit.
    let _ = hk.expand(&ticket::conn_info(ticket_id, client, server), &mut okm[..]);
    ticket::directions(&okm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trustbind_proto::ticket::Accepting;

    fn v4(a: [u8; 4]) -> Addr {
        Addr::v4(a)
    }

    const CLIENT: [u8; 16] = [3; 16];
    const SERVER: [u8; 16] = [5; 16];
    const PSQL: [u8; 32] = [7; 32];

    /// What `serve` would ask for: the client, its address, the
    /// registered server program, the terms (the id and pair secret are
    /// the grant's to draw).
    fn request() -> Ticket {
        let mut t = Ticket {
            client_host: CLIENT,
            client_program: [4; 32],
            client_uid: 1000,
            client_loginuid: 1000,
            n_client_addrs: 1,
            server_host: SERVER,
            port: 5432,
            n_server_programs: 1,
            generation: 9,
            expires_s: 2_000_000_000,
            idle_s: 600,
            ..Ticket::default()
        };
        t.client_addrs[0] = v4([10, 0, 0, 1]);
        t.server_programs[0] = PSQL;
        t
    }

    fn accepting() -> Accepting<'static> {
        Accepting {
            host: &SERVER,
            port: 5432,
            program: &PSQL,
            peer: v4([10, 0, 0, 1]),
            now_s: 1_900_000_000,
            min_generation: 9,
        }
    }

    const NEVER: fn(&[u8; 16], &[u8; 16]) -> bool = |_, _| false;

    /// Issue 15 item 4: two appliances that share only the farm secret
    /// serve the two ends of one channel: A grants the client, B gives the
    /// server its host key, and both ends derive the same keys.
    #[test]
    fn two_appliances_with_one_farm_secret_serve_the_two_ends_of_a_channel() {
        let secret = [42u8; KEY_LEN];
        let (a, b) = (Farm::new(secret), Farm::new(secret));
        let grant = a.grant(request(), 7).unwrap();
        let server_key = b.host_key(&SERVER, 7);
        let nonce = [9u8; CLIENT_NONCE_LEN];
        let mut stream = grant.message(&nonce).unwrap().to_vec();
        stream.extend_from_slice(b"\x17\x03\x03...");
        let (t, got_nonce) = open(&server_key, &stream, &accepting(), NEVER).unwrap();
        assert_eq!(got_nonce, nonce);
        assert_eq!(t.client_host, CLIENT);
        assert_eq!(t.id, grant.ticket_id);
        let ends = ((v4([10, 0, 0, 1]), 40000), (v4([10, 0, 0, 2]), 5432));
        let client = connection_keys(
            &grant.pair_secret,
            &grant.ticket_id,
            &nonce,
            (11, 22),
            ends.0,
            ends.1,
        );
        let server = connection_keys(&t.pair_secret, &t.id, &got_nonce, (11, 22), ends.0, ends.1);
        assert_eq!(client, server);
        assert_ne!(client.0.key, client.1.key, "the two directions share a key");
    }

    #[test]
    fn another_farm_another_host_or_another_epoch_cannot_open_a_ticket() {
        let grant = Farm::new([42; KEY_LEN]).grant(request(), 7).unwrap();
        let stream = grant.message(&[9; CLIENT_NONCE_LEN]).unwrap();
        let other_farm = Farm::new([43; KEY_LEN]).host_key(&SERVER, 7);
        let other_host = Farm::new([42; KEY_LEN]).host_key(&CLIENT, 7);
        let other_epoch = Farm::new([42; KEY_LEN]).host_key(&SERVER, 8);
        for k in [other_farm, other_host, other_epoch] {
            assert_eq!(
                open(&k, &stream, &accepting(), NEVER).err(),
                Some(Error::Open)
            );
        }
    }

    /// The epoch, the GCM nonce, the ciphertext and the tag are all
    /// covered: a flipped bit in any of them is refused. (The client
    /// nonce is covered by the connection key instead: see
    /// `every_connection_of_a_grant_has_its_own_keys`.)
    #[test]
    fn a_changed_byte_of_the_sealed_part_or_the_epoch_is_refused() {
        let farm = Farm::new([42; KEY_LEN]);
        let key = farm.host_key(&SERVER, 7);
        let grant = farm.grant(request(), 7).unwrap();
        let good = grant.message(&[9; CLIENT_NONCE_LEN]).unwrap();
        assert!(open(&key, &good, &accepting(), NEVER).is_ok());
        for i in 8 + CLIENT_NONCE_LEN..MESSAGE_LEN {
            let mut m = good;
            m[i] ^= 0x20;
            assert!(
                open(&key, &m, &accepting(), NEVER).is_err(),
                "byte {i} changed and accepted"
            );
        }
    }

    /// A replayed ticket (another connection, or another client nonce)
    /// gives the server a key the replayer cannot compute: it lacks the
    /// pair secret, and a new ISN or nonce changes the key.
    #[test]
    fn every_connection_of_a_grant_has_its_own_keys() {
        let farm = Farm::new([42; KEY_LEN]);
        let g = farm.grant(request(), 7).unwrap();
        let ends = ((v4([10, 0, 0, 1]), 40000), (v4([10, 0, 0, 2]), 5432));
        let k = |nonce: [u8; 16], isn: (u32, u32), c: (Addr, u16)| {
            connection_keys(&g.pair_secret, &g.ticket_id, &nonce, isn, c, ends.1)
        };
        let base = k([1; 16], (1, 2), ends.0);
        assert_ne!(base, k([2; 16], (1, 2), ends.0));
        assert_ne!(base, k([1; 16], (1, 3), ends.0));
        assert_ne!(base, k([1; 16], (4, 2), ends.0));
        assert_ne!(base, k([1; 16], (1, 2), (ends.0 .0, 40001)));
        let other = farm.grant(request(), 7).unwrap();
        assert_ne!(other.ticket_id, g.ticket_id);
        assert_ne!(&other.pair_secret[..], &g.pair_secret[..]);
    }

    #[test]
    fn the_server_checks_come_after_the_ticket_opens() {
        let farm = Farm::new([42; KEY_LEN]);
        let key = farm.host_key(&SERVER, 7);
        let stream = farm.grant(request(), 7).unwrap().message(&[9; 16]).unwrap();
        let a = accepting();
        let other = [8u8; 32];
        assert_eq!(
            open(
                &key,
                &stream,
                &Accepting {
                    program: &other,
                    ..a
                },
                NEVER
            )
            .err(),
            Some(Error::Ticket(TicketError::WrongProgram))
        );
        assert_eq!(
            open(
                &key,
                &stream,
                &Accepting {
                    peer: v4([10, 0, 0, 66]),
                    ..a
                },
                NEVER
            )
            .err(),
            Some(Error::Ticket(TicketError::WrongPeer))
        );
        assert_eq!(
            open(&key, &stream, &a, |h, _| *h == CLIENT).err(),
            Some(Error::Ticket(TicketError::Revoked))
        );
        assert_eq!(
            open(&key, b"GET / HTTP/1.1\r\n", &a, NEVER).err(),
            Some(Error::Ticket(TicketError::NotATicket))
        );
    }

    /// The farm secret is made once per data directory, 0600, and read
    /// back the same; another appliance takes it by import, which refuses
    /// to replace a different one unless told to.
    #[test]
    fn the_farm_secret_file_is_made_once_and_moves_by_export_and_import() {
        use std::os::unix::fs::PermissionsExt as _;
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let fa = Farm::open_or_create(a.path()).unwrap();
        let path = a.path().join(FARM_SECRET_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Farm::open_or_create(a.path()).unwrap();
        assert_eq!(fa.export(), again.export());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(a.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        let fb = Farm::open_or_create(b.path()).unwrap();
        assert_ne!(fa.export(), fb.export(), "two data directories, two farms");
        let out = a.path().join("export");
        std::fs::write(&out, fa.export().as_bytes()).unwrap();
        assert!(matches!(
            Farm::import(b.path(), &out, false),
            Err(FarmFileError::Differs(_))
        ));
        assert!(Farm::import(b.path(), &out, true).unwrap());
        assert!(
            !Farm::import(b.path(), &out, false).unwrap(),
            "the same one"
        );
        let fb = Farm::open_or_create(b.path()).unwrap();
        assert_eq!(fa.export(), fb.export());
        // Both derive the same host keys; a record holds two epochs.
        let rec = fb.host_keys(&SERVER, 7);
        let keys = ticket::HostKeys::decode(&rec[..]).unwrap();
        let grant = fa.grant(request(), 6).unwrap();
        let stream = grant.message(&[1; 16]).unwrap();
        let prev = HostKey::from_record(&keys, 6).unwrap();
        assert!(open(&prev, &stream, &accepting(), NEVER).is_ok());
        assert!(HostKey::from_record(&keys, 8).is_none());
        std::fs::write(&out, "not hex\n").unwrap();
        assert!(matches!(
            Farm::import(b.path(), &out, true),
            Err(FarmFileError::Bad(_))
        ));
    }

    #[test]
    fn host_ids_differ_by_name_and_epochs_by_day() {
        assert_ne!(host_id("a"), host_id("b"));
        assert_eq!(host_id("a"), host_id("a"));
        assert_eq!(epoch_of(0), 0);
        assert_eq!(epoch_of(EPOCH_SECS - 1), 0);
        assert_eq!(epoch_of(EPOCH_SECS), 1);
    }
}
