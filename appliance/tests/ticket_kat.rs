//! The known answer of channel keys v2 (`trustbind_proto::ticket_kat`),
//! which the kernel module checks its crypto API against when it loads:
//! the appliance's reference (`ring`, `hkdf`) must make exactly those
//! bytes, so the two implementations agree with each other and not only
//! with themselves.

use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::Sha256;
use trustbind_appliance::tickets::{self, Farm};
use trustbind_proto::ticket::{self, Addr, Direction, PLAIN_LEN};
use trustbind_proto::ticket_kat as kat;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn bytes(d: &Direction) -> Vec<u8> {
    [&d.key[..], &d.salt[..], &d.iv[..]].concat()
}

/// What the reference makes of the known answer's inputs.
fn reference() -> ([u8; 32], [u8; ticket::MESSAGE_LEN], Direction, Direction) {
    let mut host_key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(ticket::HOST_KEY_SALT), &kat::FARM)
        .expand(
            &ticket::host_key_info(&kat::SERVER_HOST, kat::EPOCH),
            &mut host_key,
        )
        .unwrap();
    let t = kat::ticket();
    let mut buf = t.encode().to_vec();
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &host_key).unwrap());
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(kat::GCM_NONCE),
            Aad::from(ticket::sealing_aad(kat::EPOCH)),
            &mut buf,
        )
        .unwrap();
    let ct: &[u8; PLAIN_LEN] = buf.as_slice().try_into().unwrap();
    let message = ticket::assemble(
        &kat::CLIENT_NONCE,
        kat::EPOCH,
        &kat::GCM_NONCE,
        ct,
        tag.as_ref().try_into().unwrap(),
    );
    let (to_server, to_client) = tickets::connection_keys(
        &t.pair_secret,
        &t.id,
        &kat::CLIENT_NONCE,
        kat::ISN,
        (Addr::v4(kat::CLIENT_END.0), kat::CLIENT_END.1),
        (Addr::v4(kat::SERVER_END.0), kat::SERVER_END.1),
    );
    (host_key, message, to_server, to_client)
}

#[test]
fn the_reference_makes_the_known_answer() {
    let (host_key, message, to_server, to_client) = reference();
    let shown = format!(
        "HOST_KEY_HEX = {}\nMESSAGE_HEX = {}\nTO_SERVER_HEX = {}\nTO_CLIENT_HEX = {}",
        hex(&host_key),
        hex(&message),
        hex(&bytes(&to_server)),
        hex(&bytes(&to_client))
    );
    assert_eq!(host_key, kat::HOST_KEY, "{shown}");
    assert_eq!(message, kat::MESSAGE, "{shown}");
    assert_eq!(bytes(&to_server), kat::TO_SERVER, "{shown}");
    assert_eq!(bytes(&to_client), kat::TO_CLIENT, "{shown}");
}

#[test]
fn the_farms_host_key_opens_the_known_ticket_and_a_changed_byte_does_not() {
    let key = Farm::new(kat::FARM).host_key(&kat::SERVER_HOST, kat::EPOCH);
    let m = ticket::message(&kat::MESSAGE).unwrap().unwrap();
    assert_eq!(key.open(&m).unwrap(), kat::ticket());
    // Every byte the seal covers (all but the client's nonce, which the
    // connection key's salt binds instead).
    for i in (0..kat::MESSAGE.len()).filter(|i| !(8..24).contains(i)) {
        let mut bad = kat::MESSAGE;
        bad[i] ^= 0x01;
        let opened = ticket::message(&bad).ok().flatten().map(|m| key.open(&m));
        assert!(
            !matches!(opened, Some(Ok(_))),
            "byte {i} changed and the ticket still opens"
        );
    }
    // Another epoch's key of the same host opens nothing.
    let other = Farm::new(kat::FARM).host_key(&kat::SERVER_HOST, kat::EPOCH + 1);
    assert!(other.open(&m).is_err());
}
