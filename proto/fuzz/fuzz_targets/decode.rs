//! Feeds arbitrary bytes to the record decoder: it must never panic, and
//! whatever it accepts must re-encode to a record that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trustbind_proto::decode;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, record)) = decode(data) {
        let mut out = vec![0u8; record.encoded_len()];
        let n = record
            .encode(header.request_id, &mut out)
            .expect("accepted records re-encode");
        assert_eq!(n, out.len());
        assert_eq!(
            decode(&out).expect("re-encoded record decodes"),
            (header, record)
        );
    }
});
