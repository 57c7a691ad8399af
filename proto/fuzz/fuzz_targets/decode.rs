//! Feeds arbitrary bytes to the record decoder: it must never panic, and
//! whatever it accepts must re-encode to a record that decodes the same.
//! Every kind is reached (the header's kind is two of the fuzzed bytes);
//! for the variable-length ones (`ExecRequest`, `NetRequest`, `IpcRequest`,
//! `Peers`) the limits
//! the decoder promises are checked too, and a `ChannelKey`'s `wipe()`
//! leaves no key material but keeps its TLS version and idle timeout; a
//! `ChannelClosed` re-encodes with its reserved bytes zero.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trustbind_proto::{
    decode, Family, Record, HEADER_LEN, MAX_ANCESTRY, MAX_PATH_LEN, MAX_FILE_SET_PATHS, MAX_PEERS,
};

fuzz_target!(|data: &[u8]| {
    if let Ok((header, record)) = decode(data) {
        match &record {
            Record::ExecRequest(r) => {
                assert!(r.ancestry.len() <= MAX_ANCESTRY);
                assert!(r.path.len() <= MAX_PATH_LEN && !r.path.contains(&0));
            }
            Record::NetRequest(r) => {
                assert!(r.ancestry.len() <= MAX_ANCESTRY);
                if r.family == Family::Ipv4 {
                    assert!(r.src_addr[4..].iter().all(|&b| b == 0));
                    assert!(r.dst_addr[4..].iter().all(|&b| b == 0));
                }
            }
            Record::IpcRequest(r) => {
                assert!(r.ancestry.len() <= MAX_ANCESTRY);
                assert!(r.path.len() <= MAX_PATH_LEN && !r.path.contains(&0));
            }
            Record::ChannelKey(k) => {
                let mut w = *k;
                w.wipe();
                assert!(w.key.iter().chain(&w.tx_iv).chain(&w.rx_iv).all(|&b| b == 0));
                assert_eq!((w.channel_id, w.key_id), (k.channel_id, k.key_id));
                assert_eq!((w.tls, w.idle_timeout_s), (k.tls, k.idle_timeout_s));
            }
            Record::Peers(p) => {
                assert!(p.len() <= MAX_PEERS);
                assert_eq!(p.iter().count(), p.len());
            }
            Record::FileSetPaths(f) => {
                assert!(f.len() <= MAX_FILE_SET_PATHS);
                assert_eq!(f.iter().count(), f.len());
                assert_eq!(f.iter_c().count(), f.len());
                for p in f.iter() {
                    assert!(p.first() == Some(&b'/') && p.len() <= MAX_PATH_LEN && !p.contains(&0));
                }
            }
            Record::ChannelClosed(_) => {
                let mut out = vec![0u8; record.encoded_len()];
                record.encode(0, &mut out).expect("encodes");
                assert!(out[HEADER_LEN + 26..HEADER_LEN + 32].iter().all(|&b| b == 0));
            }
            _ => {}
        }
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
