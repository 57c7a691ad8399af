//! A known answer for channel keys v2 (`docs/CHANNEL-KEYS-V2.md`): a farm
//! secret, the server host's key derived from it, one ticket sealed to
//! that key, and the connection keys both ends derive from it. The sealed
//! message and the keys were made once with the appliance's reference
//! (`ring`'s AES-256-GCM and the `hkdf` crate:
//! `appliance/tests/ticket_kat.rs` prints them and checks that the
//! reference still agrees); the kernel module checks its own HKDF and
//! GCM (the crypto API's) against them when it loads
//! (`kmod/tickets.rs`), so the two implementations are held to the same
//! bytes.

use super::ticket::{Addr, Ticket, CLIENT_NONCE_LEN, MESSAGE_LEN};

/// The farm secret.
pub const FARM: [u8; 32] =
    unhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
/// The server host's id.
pub const SERVER_HOST: [u8; 16] = [0x5e; 16];
/// The client host's id.
pub const CLIENT_HOST: [u8; 16] = [0xc1; 16];
/// The host key's epoch.
pub const EPOCH: u32 = 20_429;
/// `SERVER_HOST`'s key of `EPOCH`: HKDF-SHA256 of [`FARM`].
pub const HOST_KEY: [u8; 32] = unhex(HOST_KEY_HEX);
/// The client's nonce of the connection.
pub const CLIENT_NONCE: [u8; CLIENT_NONCE_LEN] = [0xcc; CLIENT_NONCE_LEN];
/// The GCM nonce the ticket was sealed with.
pub const GCM_NONCE: [u8; 12] = [0x9a; 12];
/// Both initial sequence numbers (client's, server's).
pub const ISN: (u32, u32) = (0x1122_3344, 0x5566_7788);
/// The connection's client end.
pub const CLIENT_END: ([u8; 4], u16) = ([10, 0, 0, 1], 40_000);
/// The connection's server end.
pub const SERVER_END: ([u8; 4], u16) = ([10, 0, 0, 2], 5432);
/// The in-band message: the ticket sealed under [`HOST_KEY`].
pub const MESSAGE: [u8; MESSAGE_LEN] = unhex(MESSAGE_HEX);
/// The client-to-server direction's kTLS material (key, salt, IV).
pub const TO_SERVER: [u8; 44] = unhex(TO_SERVER_HEX);
/// The server-to-client direction's.
pub const TO_CLIENT: [u8; 44] = unhex(TO_CLIENT_HEX);

/// The ticket [`MESSAGE`] carries.
pub fn ticket() -> Ticket {
    let mut t = Ticket {
        client_host: CLIENT_HOST,
        client_program: [0xaa; 32],
        client_uid: 1000,
        client_loginuid: 1000,
        n_client_addrs: 1,
        server_host: SERVER_HOST,
        port: SERVER_END.1,
        n_server_programs: 1,
        generation: 42,
        expires_s: 1_900_000_000,
        terms: 0,
        idle_s: 600,
        ..Ticket::default()
    };
    for (i, b) in t.id.iter_mut().enumerate() {
        // CAST: i < 16.
        *b = (i as u8).wrapping_mul(3);
    }
    for (i, b) in t.pair_secret.iter_mut().enumerate() {
        // CAST: i < 32.
        *b = (i as u8).wrapping_mul(7).wrapping_add(1);
    }
    t.client_addrs[0] = Addr::v4(CLIENT_END.0);
    t.server_programs[0] = [0xbb; 32];
    t
}

const HOST_KEY_HEX: &str = "62bb5f330ffac854bef28f1a3733ad2810fe53e241da2ac4b5efa6d09b41297b";
const MESSAGE_HEX: &str = concat!(
    "544254320100c901cccccccccccccccccccccccccccccccccd4f00009a9a9a9a",
    "9a9a9a9a9a9a9a9ac111aba2c3ae5cc1a826f82f61d4d90fb90fae3cbc2d4046",
    "7cc0ca01440d7931e467b2ed490a62f961f904d8cc04b7f94e90f440972c9dcc",
    "e27790982c5f4b482cf955f01bffb9a4d64b1e8f9b813dce5127722b358a7076",
    "523558b2f211746d9186bd4972aa36878d8ec1fc6383690c7bc2089404f5b4b2",
    "e070c773f79cbb71cebf8872ce2d1f9b4865760575e5bee4342a32824f6dfd76",
    "cfdbac1032abd7e88726a958dd3f85f40e16d5c84a3966692f33e2ad7595ceb5",
    "16cd1f46d4ae11ed3838ae613b1b90e90f7284fd8fef15f06436c4a9a5a06933",
    "ffa9e828009497f7a50be28f25b1964429673f00dbe312009b0c14cdf71a001b",
    "8e38904299bb1ef22d5ab57a7b2aa650c2987830ae004d744a4f3cbf056d7e2c",
    "f060270974024366cd415960f408d3e199e59ecc1ed8d4941ae588ee6b9a0c4d",
    "0fab414ac05c56b88133f1fb6fa8a18cd08cd0d25ddd44d99e8d9cd30309b72d",
    "cc198f7ee6be5614f7f586b20a2f73f9430640173f341474221c1c5885f5f6fd",
    "7f1df19177e1503c0d671dc295f8d91504adbbc85dd797ea0f94db5c90e426cd",
    "6b0515d1c671d32f8f16f9a10ccad90116",
);
const TO_SERVER_HEX: &str =
    "40d7d30511bf3c7a068f2efba7a83efa4d9cea24a4cdddfd02b3c3328f2a3f530650e34eda617353f4310578";
const TO_CLIENT_HEX: &str =
    "16b10ccdef4660ebb1019b1c0d9c00312635b719a21e7d6e1cb49792becd3e5458da0c79a8495fe91037145a";

/// `s`'s bytes (two hex digits each); a wrong length or digit fails the
/// build, since every use is a constant (no code of it runs at run time,
/// so its panics and indexing are compile-time checks).
#[allow(clippy::panic, clippy::indexing_slicing)]
const fn unhex<const N: usize>(s: &str) -> [u8; N] {
    const fn digit(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a lower-case hex digit"),
        }
    }
    let s = s.as_bytes();
    assert!(s.len() == 2 * N, "wrong number of hex digits");
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = digit(s[2 * i]) << 4 | digit(s[2 * i + 1]);
        i += 1;
    }
    out
}
