// SPDX-License-Identifier: GPL-2.0
//! Channel keys v2, the module's cryptography (`docs/CHANNEL-KEYS-V2.md`):
//! opening a ticket with this host's key (AES-256-GCM) and deriving a
//! connection's kTLS material from a pair secret (HKDF-SHA256), both
//! through the kernel crypto API (`sys::gcm_open`, `sys::Hmac`), over the
//! layouts and the HKDF construction `proto::ticket` and `proto::hkdf`
//! define once for the module and the appliance.
//!
//! Not yet on any connection's path: the listen hook, the grants cache
//! and the in-band ticket are still to come. What runs today is
//! [`self_test`] at load: the crypto API must reproduce the known answer
//! the appliance's reference made (`proto::ticket_kat`), or no ticket is
//! ever opened (`ticket_self_test` in debugfs: 1 passed, 2 failed).

use core::sync::atomic::{AtomicU64, Ordering};
use kernel::prelude::*;

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
