//! Channel key issuance and pairing, without I/O: how many channels per
//! second the correlator plus key generation can set up on one core.
//!
//! `cargo bench -p trustbind-appliance --bench keys`

use std::time::{Duration, Instant};

use trustbind_appliance::channels::{ChannelKey, Correlator, Offer};
use trustbind_appliance::request::{
    Action, FiveTuple, Program, Proto, QualifyRequest, Subject, Target,
};

fn half(action: Action, host: &str, port: u16) -> QualifyRequest {
    QualifyRequest {
        host: host.into(),
        action,
        subject: Subject {
            user: "u".into(),
            uid: 1,
            euid: 1,
            gid: 1,
            loginuid: 1,
            session: 1,
            pid: 1,
            ancestry: vec![],
        },
        program: Program {
            sha256: "ab".repeat(32),
            sha1: "cd".repeat(20),
            size: 1,
            path: "/usr/bin/psql".into(),
        },
        target: Target::Net(FiveTuple {
            proto: Proto::Tcp,
            src_addr: "10.0.0.1".into(),
            src_port: port,
            dst_addr: "10.0.0.2".into(),
            dst_port: 5432,
            established: false,
        }),
        at_ms: 0,
        peer: None,
    }
}

fn main() {
    let n = 200_000u32;
    let t = Instant::now();
    let mut sink = 0u8;
    for _ in 0..n {
        let k = ChannelKey::generate().expect("CSPRNG");
        sink ^= k.key[0];
    }
    let keys = t.elapsed();
    let mut c = Correlator::new(Duration::from_secs(5), 1 << 20);
    let t = Instant::now();
    for i in 0..n {
        let port = (i % 60_000) as u16 + 1;
        let now = Instant::now();
        assert!(matches!(
            c.offer(half(Action::Connect, "a", port), now),
            Ok(Offer::Waiting { .. })
        ));
        let p = c.pair_with(half(Action::Accept, "b", port)).expect("pair");
        assert!(p.is_some());
        let k = ChannelKey::generate().expect("CSPRNG");
        sink ^= k.key[1];
    }
    let pairs = t.elapsed();
    let rate = |d: Duration| f64::from(n) / d.as_secs_f64();
    println!(
        "key generation:          {:>10.0} keys/s ({:.2} µs each)",
        rate(keys),
        keys.as_secs_f64() * 1e6 / f64::from(n)
    );
    println!(
        "pair + key (no I/O):     {:>10.0} channels/s ({:.2} µs each)",
        rate(pairs),
        pairs.as_secs_f64() * 1e6 / f64::from(n)
    );
    println!("(checksum {sink})");
}
