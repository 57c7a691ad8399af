//! Feeds arbitrary bytes to the channel ticket parsers
//! (`trustbind_proto::ticket`, channel keys v2): the in-band message
//! parser must never panic and must take exactly a whole message; a
//! ticket plaintext, a host-keys record or a revocations record it
//! accepts must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trustbind_proto::ticket::{
    message, HostKeys, Revocations, Ticket, CLIENT_NONCE_LEN, HOST_ID_LEN, MAX_REVOCATIONS_LEN,
    MESSAGE_LEN, PLAIN_LEN, TICKET_ID_LEN,
};

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
    if let Ok(k) = HostKeys::decode(data) {
        assert_eq!(&k.encode()[..], data);
    }
    if let Ok(r) = Revocations::decode(data) {
        let hosts: Vec<[u8; HOST_ID_LEN]> =
            r.hosts().map(|h| h.try_into().unwrap()).collect();
        let ids: Vec<[u8; TICKET_ID_LEN]> = r.tickets().map(|t| t.try_into().unwrap()).collect();
        let mut out = [0u8; MAX_REVOCATIONS_LEN];
        let n = Revocations::encode(r.min_generation, &hosts, &ids, &mut out).unwrap();
        assert_eq!(&out[..n], data);
    }
});
