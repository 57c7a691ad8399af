//! Feeds arbitrary bytes to the channel ticket parsers
//! (`trustbind_proto::ticket`, channel keys v2): the in-band message
//! parser must never panic and must take exactly a whole message, and a
//! ticket plaintext it accepts must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trustbind_proto::ticket::{message, Ticket, CLIENT_NONCE_LEN, MESSAGE_LEN, PLAIN_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(m)) = message(data) {
        assert!(data.len() >= MESSAGE_LEN);
        assert_eq!(&m.client_nonce[..], &data[8..8 + CLIENT_NONCE_LEN]);
    }
    if let Some(p) = data.first_chunk::<PLAIN_LEN>() {
        if let Ok(t) = Ticket::decode(p) {
            assert_eq!(&t.encode(), p);
        }
    }
});
