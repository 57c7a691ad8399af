//! Unit and property tests for the wire records.

use super::*;
use proptest::prelude::*;

fn enc(rec: &Record<'_>, id: u64) -> Vec<u8> {
    let mut buf = vec![0u8; rec.encoded_len()];
    let n = rec.encode(id, &mut buf).expect("encode");
    assert_eq!(n, buf.len());
    buf
}

fn sample_exec<'a>(path: &'a [u8], anc: &'a [u8]) -> Record<'a> {
    Record::ExecRequest(ExecRequest {
        sha256: [0xab; 32],
        sha1: [0xcd; 20],
        size: 123_456,
        uid: 1000,
        euid: 0,
        gid: 100,
        loginuid: 1000,
        sessionid: 7,
        pid: 4242,
        ppid: 1,
        ancestry: Ancestry::from_bytes(anc).expect("ancestry"),
        path,
        flags: EXEC_LOADER_DIRECT,
    })
}

fn sample_net(anc: &[u8]) -> Record<'_> {
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[127, 0, 0, 1]);
    let mut dst = [0u8; 16];
    dst[..4].copy_from_slice(&[10, 0, 2, 15]);
    Record::NetRequest(NetRequest {
        kind: NetKind::Connect,
        family: Family::Ipv4,
        src_addr: src,
        src_port: 0,
        dst_addr: dst,
        dst_port: 443,
        sha256: [0x5a; 32],
        program_source: ProgramSource::Lineage,
        uid: 1000,
        euid: 1000,
        gid: 1000,
        loginuid: u32::MAX,
        sessionid: u32::MAX,
        pid: 77,
        ppid: 1,
        ancestry: Ancestry::from_bytes(anc).expect("ancestry"),
    })
}

fn sample_ipc<'a>(path: &'a [u8], anc: &'a [u8]) -> Record<'a> {
    Record::IpcRequest(IpcRequest {
        sha256: [0x11; 32],
        program_source: ProgramSource::Lineage,
        uid: 1000,
        euid: 1000,
        gid: 100,
        loginuid: 1000,
        sessionid: 3,
        pid: 500,
        ppid: 499,
        ancestry: Ancestry::from_bytes(anc).expect("ancestry"),
        peer_sha256: [0x22; 32],
        peer_program_source: ProgramSource::ExeFile,
        peer_pid: 300,
        peer_uid: 0,
        peer_gid: 0,
        path,
    })
}

fn sample_verdict() -> Record<'static> {
    Record::Verdict(Verdict {
        decision: Decision::AllowWithConditions,
        policy_generation: 9,
        cacheable: true,
        obligations: Obligations {
            nice: Some(10),
            cpu_limit_s: Some(60),
            log_level: 2,
            encrypt: true,
        },
    })
}

fn sample_closed() -> Record<'static> {
    Record::ChannelClosed(ChannelClosed {
        channel_id: 0x0102_0304_0506_0708,
        key_id: [0x33; CHANNEL_KEY_ID_LEN],
        role: ChannelRole::Accept,
        reason: CloseReason::Idle,
        bytes_sent: 1 << 40,
        bytes_received: 12345,
        duration_ms: 999,
    })
}

fn sample_key() -> ChannelKey {
    ChannelKey {
        channel_id: 0x0102_0304_0506_0708,
        key_id: [0x11; CHANNEL_KEY_ID_LEN],
        key: [0x22; CHANNEL_KEY_LEN],
        tx_salt: [1, 2, 3, 4],
        tx_iv: [5; CHANNEL_IV_LEN],
        rx_salt: [0x81, 2, 3, 4],
        rx_iv: [6; CHANNEL_IV_LEN],
        tls: ChannelTls::Tls12,
        idle_timeout_s: 600,
    }
}

fn sample_host_keys() -> ticket::HostKeys {
    ticket::HostKeys {
        host: [0x31; ticket::HOST_ID_LEN],
        epoch: 20_000,
        key: [0x32; ticket::HOST_KEY_LEN],
        prev_epoch: 19_999,
        prev_key: [0x33; ticket::HOST_KEY_LEN],
    }
}

fn sample_grant() -> Grant {
    Grant {
        ticket_id: [0x41; ticket::TICKET_ID_LEN],
        pair_secret: [0x42; ticket::PAIR_SECRET_LEN],
        expires_s: 1_800_000_000,
        valid_s: 600,
        generation: 77,
        epoch: 20_000,
        tls: ChannelTls::Tls13,
        idle_timeout_s: 30,
        gcm_nonce: [0x43; ticket::GCM_NONCE_LEN],
        ciphertext: [0x44; ticket::PLAIN_LEN],
        tag: [0x45; ticket::GCM_TAG_LEN],
    }
}

#[test]
fn v2_records_are_checked() {
    // A host-keys record whose previous epoch is not the one before.
    let mut b = enc(&Record::HostKeys(sample_host_keys()), 1);
    let at = HEADER_LEN + ticket::HOST_ID_LEN + 4 + ticket::HOST_KEY_LEN;
    b[at] ^= 1;
    assert_eq!(
        decode(&b).unwrap_err(),
        DecodeError::InvalidField("prev_epoch")
    );
    // A grant with an unknown TLS version or a reserved byte set.
    let g = enc(&Record::Grant(sample_grant()), 1);
    let tls_at = HEADER_LEN + ticket::TICKET_ID_LEN + ticket::PAIR_SECRET_LEN + 8 + 8 + 4 + 4;
    let mut b = g.clone();
    b[tls_at] = 7;
    assert_eq!(decode(&b).unwrap_err(), DecodeError::InvalidField("tls"));
    let mut b = g.clone();
    b[tls_at + 1] = 1;
    assert_eq!(
        decode(&b).unwrap_err(),
        DecodeError::InvalidField("reserved")
    );
    // Never the secrets in a debug print.
    let text = format!("{:?} {:?}", sample_grant(), sample_host_keys());
    assert!(!text.contains("66") && !text.contains("50, 50"), "{text}");
    // The channel id is the ticket id's head.
    assert_eq!(sample_grant().channel_id(), 0x4141_4141_4141_4141);
    // Sealable; host keys and revocations are orders with their own slot.
    for k in [Kind::HostKeys, Kind::Revocations, Kind::Grant] {
        assert!(seal::sealable(k));
    }
    assert_eq!(seal::order_slot(Kind::HostKeys), Some(3));
    assert_eq!(seal::order_slot(Kind::Revocations), Some(4));
    assert_eq!(seal::order_slot(Kind::Grant), None);
    assert_eq!(seal::bare_rule(Kind::Grant), seal::BareRule::RefuseAnswer);
    assert_eq!(seal::bare_rule(Kind::HostKeys), seal::BareRule::Refuse);
    assert_eq!(seal::bare_rule(Kind::Revocations), seal::BareRule::Refuse);
}

#[test]
fn header_layout_is_as_documented() {
    let buf = enc(
        &Record::Hello(Hello {
            agent_pid: 5,
            agent_version: 0x0001_0203,
        }),
        0x1122,
    );
    assert_eq!(&buf[0..4], b"TBND");
    assert_eq!(u16::from_le_bytes([buf[4], buf[5]]), VERSION);
    assert_eq!(u16::from_le_bytes([buf[6], buf[7]]), Kind::Hello as u16);
    assert_eq!(
        u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize,
        buf.len()
    );
    assert_eq!(u64::from_le_bytes(buf[16..24].try_into().unwrap()), 0x1122);
    assert_eq!(buf.len(), HEADER_LEN + 8);
}

#[test]
fn every_kind_round_trips() {
    let peer_bytes = Peers::entry(
        Family::Ipv4,
        &[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    let anc = [7u8; 64];
    let mut revocations_bytes = [0u8; ticket::MAX_REVOCATIONS_LEN];
    let n = ticket::Revocations::encode(9, &[[1; 16], [2; 16]], &[[3; 16]], &mut revocations_bytes)
        .unwrap();
    let revocations_bytes = &revocations_bytes[..n];
    let mut no_revocations = [0u8; 64];
    let n = ticket::Revocations::encode(0, &[], &[], &mut no_revocations).unwrap();
    let no_revocations = &no_revocations[..n];
    let ack = Record::HelloAck(HelloAck {
        module_version: 1,
        max_record_len: MAX_RECORD_LEN as u32,
        sha256_driver: driver_name_field(b"sha256-avx2"),
        sha1_driver: driver_name_field(b"sha1-generic"),
        session: [5; seal::SESSION_PUB_LEN],
    });
    let records = [
        Record::Hello(Hello {
            agent_pid: 1,
            agent_version: 2,
        }),
        ack,
        sample_exec(b"/usr/bin/curl", &anc),
        sample_exec(b"", &[]),
        sample_verdict(),
        Record::Verdict(Verdict {
            decision: Decision::Deny,
            policy_generation: u64::MAX,
            cacheable: false,
            obligations: Obligations::default(),
        }),
        Record::Config(Config {
            mode: Mode::Enforce,
            verdict_timeout_ms: 2500,
            qualify_net: true,
        }),
        Record::Generation(Generation {
            policy_generation: 42,
        }),
        sample_net(&anc),
        Record::NetRequest(NetRequest {
            kind: NetKind::Accept,
            family: Family::Ipv6,
            src_addr: [0xfe; 16],
            src_port: 40000,
            dst_addr: [1; 16],
            dst_port: 22,
            program_source: ProgramSource::ExeFile,
            ancestry: Ancestry::EMPTY,
            ..match sample_net(&[]) {
                Record::NetRequest(r) => r,
                _ => unreachable!(),
            }
        }),
        Record::NetRequest(NetRequest {
            kind: NetKind::Established,
            src_port: 40001,
            ..match sample_net(&[]) {
                Record::NetRequest(r) => r,
                _ => unreachable!(),
            }
        }),
        Record::ChannelKey(sample_key()),
        sample_closed(),
        Record::ChannelClosed(ChannelClosed {
            role: ChannelRole::Connect,
            bytes_sent: 0,
            bytes_received: u64::MAX,
            duration_ms: 0,
            ..match sample_closed() {
                Record::ChannelClosed(c) => c,
                _ => unreachable!(),
            }
        }),
        sample_ipc(b"/run/app.sock", &anc),
        sample_ipc(b"@abstract@name", &[]),
        Record::Peers(Peers::new(&peer_bytes).unwrap()),
        Record::FileSetPaths(FileSetPaths::new(b"/srv/www\0/etc/app/secret.key\0").unwrap()),
        Record::FileSetPaths(FileSetPaths::new(b"").unwrap()),
        Record::NetRequest(NetRequest {
            kind: NetKind::Listen,
            src_addr: [0; 16],
            src_port: 0,
            dst_port: 443,
            ..match sample_net(&[]) {
                Record::NetRequest(r) => r,
                _ => unreachable!(),
            }
        }),
        Record::HostKeys(sample_host_keys()),
        Record::Revocations(ticket::Revocations::decode(revocations_bytes).unwrap()),
        Record::Revocations(ticket::Revocations::decode(no_revocations).unwrap()),
        Record::Grant(sample_grant()),
        Record::Grant(Grant {
            tls: ChannelTls::Tls12,
            idle_timeout_s: 0,
            ..sample_grant()
        }),
    ];
    for (i, rec) in records.iter().enumerate() {
        let buf = enc(rec, i as u64 + 100);
        let (h, back) = decode(&buf).expect("decode");
        assert_eq!(h.request_id, i as u64 + 100);
        assert_eq!(h.kind, rec.kind());
        assert_eq!(&back, rec);
    }
}

#[test]
fn driver_names_are_trimmed_at_nul() {
    let a = HelloAck {
        module_version: 0,
        max_record_len: 0,
        sha256_driver: driver_name_field(b"sha256-ni"),
        sha1_driver: driver_name_field(&[b'x'; 300]),
        session: [0; seal::SESSION_PUB_LEN],
    };
    assert_eq!(a.sha256_driver_name(), b"sha256-ni");
    assert_eq!(a.sha1_driver_name().len(), DRIVER_NAME_LEN);
}

#[test]
fn short_buffers_are_rejected() {
    let buf = enc(&sample_verdict(), 1);
    for cut in 0..buf.len() {
        let err = decode(&buf[..cut]).unwrap_err();
        if cut < HEADER_LEN {
            assert_eq!(
                err,
                DecodeError::Short {
                    need: HEADER_LEN,
                    have: cut
                }
            );
        } else {
            // The header still declares the full length.
            assert!(matches!(err, DecodeError::LengthMismatch { .. }), "{err:?}");
        }
    }
}

#[test]
fn body_shorter_than_kind_needs_is_short() {
    // A well-formed header whose declared length is honest but too small
    // for the kind's body.
    let mut buf = enc(
        &Record::Hello(Hello {
            agent_pid: 1,
            agent_version: 1,
        }),
        1,
    );
    buf.truncate(HEADER_LEN + 3);
    let len = buf.len() as u32;
    buf[8..12].copy_from_slice(&len.to_le_bytes());
    assert_eq!(
        decode(&buf).unwrap_err(),
        DecodeError::Short {
            need: HEADER_LEN + 4,
            have: HEADER_LEN + 3
        }
    );
}

#[test]
fn wrong_magic_version_kind_and_flags_are_rejected() {
    let good = enc(&sample_verdict(), 1);

    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(decode(&b), Err(DecodeError::BadMagic(_))));

    let mut b = good.clone();
    b[4..6].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(decode(&b).unwrap_err(), DecodeError::UnsupportedVersion(1));

    let mut b = good.clone();
    b[6..8].copy_from_slice(&99u16.to_le_bytes());
    assert_eq!(decode(&b).unwrap_err(), DecodeError::UnknownKind(99));

    let mut b = good.clone();
    b[12] = 1;
    assert_eq!(decode(&b).unwrap_err(), DecodeError::InvalidField("flags"));
}

#[test]
fn oversized_and_trailing_are_rejected() {
    let big = vec![0u8; MAX_RECORD_LEN + 1];
    assert_eq!(
        decode(&big).unwrap_err(),
        DecodeError::Oversized(MAX_RECORD_LEN + 1)
    );

    let mut b = enc(&sample_verdict(), 1);
    b.push(0);
    let len = b.len() as u32;
    b[8..12].copy_from_slice(&len.to_le_bytes());
    assert_eq!(decode(&b).unwrap_err(), DecodeError::TrailingBytes(1));
}

#[test]
fn bad_verdict_fields_are_named() {
    let good = enc(&sample_verdict(), 1);
    let cases: [(usize, u8, &str); 5] = [
        (HEADER_LEN, 0, "decision"),
        (HEADER_LEN, 4, "decision"),
        (HEADER_LEN + 1, 2, "cacheable"),
        (HEADER_LEN + 2, 0x80, "obligations"),
        (HEADER_LEN + 3, 4, "log_level"),
    ];
    for (off, val, field) in cases {
        let mut b = good.clone();
        b[off] = val;
        assert_eq!(
            decode(&b).unwrap_err(),
            DecodeError::InvalidField(field),
            "{field}"
        );
    }
    let mut b = good.clone();
    b[HEADER_LEN + 12] = 20u8; // nice 20 is out of range
    assert_eq!(decode(&b).unwrap_err(), DecodeError::InvalidField("nice"));
}

#[test]
fn bad_config_fields_are_named() {
    let good = enc(
        &Record::Config(Config {
            mode: Mode::Permissive,
            verdict_timeout_ms: 100,
            qualify_net: false,
        }),
        1,
    );
    let mut b = good.clone();
    b[HEADER_LEN] = 3;
    assert_eq!(decode(&b).unwrap_err(), DecodeError::InvalidField("mode"));
    for bad in [0u32, MAX_VERDICT_TIMEOUT_MS + 1] {
        let mut b = good.clone();
        b[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&bad.to_le_bytes());
        assert_eq!(
            decode(&b).unwrap_err(),
            DecodeError::InvalidField("verdict_timeout_ms")
        );
    }
}

#[test]
fn bad_exec_fields_are_named() {
    let anc = [1u8; 32];
    let good = enc(&sample_exec(b"/bin/true", &anc), 3);
    let counts = HEADER_LEN + EXEC_FIXED_LEN - 4;

    let mut b = good.clone();
    b[counts] = (MAX_ANCESTRY + 1) as u8;
    assert_eq!(
        decode(&b).unwrap_err(),
        DecodeError::InvalidField("ancestry_count")
    );

    let mut b = good.clone();
    b[counts + 1] = 0x80;
    assert_eq!(decode(&b).unwrap_err(), DecodeError::InvalidField("flags"));

    let mut b = good.clone();
    b[counts + 2..counts + 4].copy_from_slice(&((MAX_PATH_LEN + 1) as u16).to_le_bytes());
    assert_eq!(
        decode(&b).unwrap_err(),
        DecodeError::InvalidField("path_len")
    );

    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] = 0;
    assert_eq!(decode(&b).unwrap_err(), DecodeError::InvalidField("path"));
}

#[test]
fn bad_net_fields_are_named() {
    let anc = [2u8; 32];
    let good = enc(&sample_net(&anc), 5);
    let body = HEADER_LEN;
    let cases: [(usize, u8, &str); 6] = [
        (body, 5, "net_kind"),
        (body + 1, 5, "family"),
        (body + 2, 1, "reserved"),
        (body + 8 + 4, 1, "address"), // byte 4 of an IPv4 source
        (
            body + NET_FIXED_LEN - 4,
            (MAX_ANCESTRY + 1) as u8,
            "ancestry_count",
        ),
        (body + NET_FIXED_LEN - 3, 9, "program_source"),
    ];
    for (at, val, name) in cases {
        let mut b = good.clone();
        b[at] = val;
        assert_eq!(decode(&b).unwrap_err(), DecodeError::InvalidField(name));
    }
    let mut b = good.clone();
    b[body + NET_FIXED_LEN - 1] = 1;
    assert_eq!(
        decode(&b).unwrap_err(),
        DecodeError::InvalidField("reserved")
    );
    // The ancestry the count promises must be there.
    let short = &good[..good.len() - 1];
    let mut short = short.to_vec();
    let n = short.len() as u32;
    short[8..12].copy_from_slice(&n.to_le_bytes());
    assert!(matches!(
        decode(&short).unwrap_err(),
        DecodeError::Short { .. }
    ));
}

#[test]
fn config_flags_are_checked() {
    let rec = Record::Config(Config {
        mode: Mode::Enforce,
        verdict_timeout_ms: 100,
        qualify_net: true,
    });
    let good = enc(&rec, 1);
    assert_eq!(good[HEADER_LEN + 1], 1);
    let mut b = good.clone();
    b[HEADER_LEN + 1] = 2;
    assert_eq!(
        decode(&b).unwrap_err(),
        DecodeError::InvalidField("config_flags")
    );
}

#[test]
fn largest_net_request_fits_the_record_limit() {
    let anc = vec![0u8; 32 * MAX_ANCESTRY];
    let rec = sample_net(&anc);
    assert_eq!(rec.encoded_len(), HEADER_LEN + NET_FIXED_LEN + anc.len());
    assert!(rec.encoded_len() <= MAX_RECORD_LEN);
}

#[test]
fn encoder_refuses_what_decoder_would_refuse() {
    let path = vec![b'a'; MAX_PATH_LEN + 1];
    let rec = sample_exec(&path, &[]);
    let mut buf = vec![0u8; MAX_RECORD_LEN];
    assert_eq!(
        rec.encode(1, &mut buf).unwrap_err(),
        EncodeError::TooLong("path")
    );

    let rec = sample_verdict();
    let mut small = [0u8; 10];
    assert_eq!(
        rec.encode(1, &mut small).unwrap_err(),
        EncodeError::BufferTooSmall {
            need: rec.encoded_len(),
            have: 10
        }
    );
    assert!(Ancestry::from_bytes(&[0u8; 33]).is_none());
    assert!(Ancestry::from_bytes(&[0u8; 32 * (MAX_ANCESTRY + 1)]).is_none());
}

#[test]
fn largest_exec_request_fits_the_record_limit() {
    let path = vec![b'p'; MAX_PATH_LEN];
    let anc = vec![0u8; 32 * MAX_ANCESTRY];
    let rec = sample_exec(&path, &anc);
    assert!(rec.encoded_len() <= MAX_RECORD_LEN);
    let buf = enc(&rec, 1);
    assert_eq!(decode(&buf).unwrap().1, rec);
}

#[test]
fn errors_display_as_sentences_without_period() {
    let msgs = [
        DecodeError::Short { need: 24, have: 3 }.to_string(),
        DecodeError::UnsupportedVersion(9).to_string(),
        DecodeError::InvalidField("nice").to_string(),
        EncodeError::TooLong("path").to_string(),
    ];
    assert_eq!(msgs[0], "record too short: need 24 bytes, have 3");
    assert_eq!(msgs[2], "invalid field `nice`");
    for m in msgs {
        assert!(!m.ends_with('.'), "{m}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// The decoder never panics, and anything it accepts re-encodes to the
    /// same bytes (so there is one encoding per record).
    #[test]
    fn decode_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok((h, rec)) = decode(&bytes) {
            let mut out = vec![0u8; rec.encoded_len()];
            rec.encode(h.request_id, &mut out).unwrap();
            // Padding bytes in a verdict are ignored on decode, so compare
            // by decoding again rather than bytewise.
            prop_assert_eq!(decode(&out).unwrap(), (h, rec));
        }
    }

    /// Mutating one byte of a valid record never panics the decoder.
    #[test]
    fn decode_mutated_records(
        which in 0usize..7,
        pos in any::<prop::sample::Index>(),
        val in any::<u8>(),
        path in proptest::collection::vec(1u8..=255, 0..64),
        anc_n in 0usize..=MAX_ANCESTRY,
    ) {
        let anc = vec![9u8; anc_n * 32];
        let rec = match which {
            0 => sample_exec(&path, &anc),
            1 => sample_verdict(),
            2 => Record::Config(Config { mode: Mode::Enforce, verdict_timeout_ms: 10, qualify_net: true }),
            3 => Record::Generation(Generation { policy_generation: 9 }),
            4 => sample_net(&anc),
            5 => sample_closed(),
            _ => Record::Hello(Hello { agent_pid: 3, agent_version: 4 }),
        };
        let mut buf = enc(&rec, 77);
        let i = pos.index(buf.len());
        buf[i] = val;
        let _ = decode(&buf);
    }

    /// Valid exec requests round-trip.
    #[test]
    fn exec_round_trip(
        path in proptest::collection::vec(1u8..=255, 0..MAX_PATH_LEN),
        anc_n in 0usize..=MAX_ANCESTRY,
        id in any::<u64>(),
        uid in any::<u32>(),
    ) {
        let anc = vec![3u8; anc_n * 32];
        let mut rec = sample_exec(&path, &anc);
        if let Record::ExecRequest(ref mut r) = rec { r.uid = uid; }
        let buf = enc(&rec, id);
        let (h, back) = decode(&buf).unwrap();
        prop_assert_eq!(h.request_id, id);
        prop_assert_eq!(back, rec);
    }

    /// Valid channel close records round-trip.
    #[test]
    fn closed_round_trip(
        channel_id in any::<u64>(),
        key_id in any::<[u8; 16]>(),
        accept in any::<bool>(),
        idle in any::<bool>(),
        counts in any::<(u64, u64, u64)>(),
    ) {
        let rec = Record::ChannelClosed(ChannelClosed {
            channel_id,
            key_id,
            role: if accept { ChannelRole::Accept } else { ChannelRole::Connect },
            reason: if idle { CloseReason::Idle } else { CloseReason::Closed },
            bytes_sent: counts.0,
            bytes_received: counts.1,
            duration_ms: counts.2,
        });
        let buf = enc(&rec, 0);
        prop_assert_eq!(decode(&buf).unwrap(), (decode_header(&buf).unwrap(), rec));
    }

    /// Valid net requests round-trip.
    #[test]
    fn net_round_trip(
        accept in any::<bool>(),
        v6 in any::<bool>(),
        ports in any::<(u16, u16)>(),
        addrs in any::<([u8; 16], [u8; 16])>(),
        sha in any::<[u8; 32]>(),
        exe in any::<bool>(),
        ids in any::<[u32; 7]>(),
        anc_n in 0usize..=MAX_ANCESTRY,
        id in any::<u64>(),
    ) {
        let anc = vec![4u8; anc_n * 32];
        let (mut src, mut dst) = addrs;
        if !v6 {
            src[4..].fill(0);
            dst[4..].fill(0);
        }
        let rec = Record::NetRequest(NetRequest {
            kind: if accept { NetKind::Accept } else { NetKind::Connect },
            family: if v6 { Family::Ipv6 } else { Family::Ipv4 },
            src_addr: src,
            src_port: ports.0,
            dst_addr: dst,
            dst_port: ports.1,
            sha256: sha,
            program_source: if exe { ProgramSource::ExeFile } else { ProgramSource::Lineage },
            uid: ids[0],
            euid: ids[1],
            gid: ids[2],
            loginuid: ids[3],
            sessionid: ids[4],
            pid: ids[5],
            ppid: ids[6],
            ancestry: Ancestry::from_bytes(&anc).unwrap(),
        });
        let buf = enc(&rec, id);
        let (h, back) = decode(&buf).unwrap();
        prop_assert_eq!(h.request_id, id);
        prop_assert_eq!(back, rec);
    }
}

#[test]
fn channel_key_layout_and_wipe() {
    let buf = enc(&Record::ChannelKey(sample_key()), 9);
    assert_eq!(buf.len(), HEADER_LEN + 8 + 16 + 32 + 4 + 8 + 4 + 8 + 8);
    // channel id, then key id, then the key; TLS version and idle timeout
    // last.
    assert_eq!(
        &buf[HEADER_LEN..HEADER_LEN + 8],
        &0x0102_0304_0506_0708u64.to_le_bytes()
    );
    assert_eq!(&buf[HEADER_LEN + 8..HEADER_LEN + 24], &[0x11; 16]);
    assert_eq!(&buf[HEADER_LEN + 24..HEADER_LEN + 56], &[0x22; 32]);
    let tail = HEADER_LEN + 80;
    assert_eq!(buf[tail], ChannelTls::Tls12 as u8);
    assert_eq!(&buf[tail + 4..tail + 8], &600u32.to_le_bytes());
    for (off, field) in [(0, "tls"), (1, "reserved"), (2, "reserved")] {
        let mut bad = buf.clone();
        bad[tail + off] = 7;
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::InvalidField(field));
    }
    let Ok((_, Record::ChannelKey(mut k))) = decode(&buf) else {
        panic!("a channel key decodes")
    };
    let shown = format!("{k:?}");
    assert!(!shown.contains("34"), "Debug shows no key bytes: {shown}");
    k.wipe();
    assert_eq!(k.key, [0; CHANNEL_KEY_LEN]);
    assert_eq!((k.tx_salt, k.rx_salt), ([0; 4], [0; 4]));
    assert_eq!((k.tx_iv, k.rx_iv), ([0; 8], [0; 8]));
    assert_eq!(k.key_id, [0x11; 16], "the key id is no secret");
    // A truncated key is short, not garbage.
    assert!(matches!(
        decode_body_truncated(&buf, 1),
        Err(DecodeError::LengthMismatch { .. }) | Err(DecodeError::Short { .. })
    ));
}

fn decode_body_truncated(buf: &[u8], cut: usize) -> Result<(Header, Record<'_>), DecodeError> {
    decode(&buf[..buf.len() - cut])
}

#[test]
fn encrypt_obligation_round_trips_and_unknown_bits_are_refused() {
    let mut buf = enc(&sample_verdict(), 1);
    let Ok((_, Record::Verdict(v))) = decode(&buf) else {
        panic!("verdict")
    };
    assert!(v.obligations.encrypt);
    // present mask is the third body byte.
    buf[HEADER_LEN + 2] |= 0x08;
    assert_eq!(
        decode(&buf).map(|_| ()),
        Err(DecodeError::InvalidField("obligations"))
    );
}

#[test]
fn channel_closed_layout_and_checks() {
    let buf = enc(&sample_closed(), 0);
    assert_eq!(buf.len(), HEADER_LEN + 8 + 16 + 8 + 3 * 8);
    assert_eq!(u16::from_le_bytes([buf[6], buf[7]]), 9);
    assert_eq!(&buf[HEADER_LEN + 8..HEADER_LEN + 24], &[0x33; 16]);
    assert_eq!(buf[HEADER_LEN + 24], ChannelRole::Accept as u8);
    assert_eq!(buf[HEADER_LEN + 25], CloseReason::Idle as u8);
    assert_eq!(
        &buf[HEADER_LEN + 32..HEADER_LEN + 40],
        &(1u64 << 40).to_le_bytes()
    );
    for (off, field) in [
        (24, "role"),
        (25, "reason"),
        (27, "reserved"),
        (31, "reserved"),
    ] {
        let mut bad = buf.clone();
        bad[HEADER_LEN + off] = if off <= 25 { 3 } else { 1 };
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::InvalidField(field));
    }
    assert_eq!(Kind::from_wire(9), Some(Kind::ChannelClosed));
    assert_eq!(Kind::from_wire(19), None);
}

#[test]
fn peers_round_trip_and_are_checked() {
    let mut v6 = [0u8; 16];
    v6[0] = 0xfd;
    v6[15] = 1;
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&Peers::entry(
        Family::Ipv4,
        &[10, 99, 0, 11, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
    ));
    bytes.extend_from_slice(&Peers::entry(Family::Ipv6, &v6));
    let p = Peers::new(&bytes).unwrap();
    let got: Vec<_> = p.iter().collect();
    let mut v4 = [0u8; 16];
    v4[..4].copy_from_slice(&[10, 99, 0, 11]);
    assert_eq!(got, vec![(Family::Ipv4, v4), (Family::Ipv6, v6)]);
    let buf = enc(&Record::Peers(p), 0);
    assert_eq!(buf.len(), HEADER_LEN + 8 + 2 * PEER_LEN);
    assert_eq!(&buf[6..8], &11u16.to_le_bytes());
    assert_eq!(&buf[HEADER_LEN..HEADER_LEN + 2], &2u16.to_le_bytes());
    let (_, back) = decode(&buf).unwrap();
    assert_eq!(back, Record::Peers(p));
    // An empty set is valid (no peers known).
    let empty = enc(&Record::Peers(Peers::new(&[]).unwrap()), 0);
    assert!(matches!(decode(&empty), Ok((_, Record::Peers(p))) if p.is_empty()));
    // A bad family, a pad, IPv4 garbage, a count too high: refused.
    for (off, field) in [(0, "peer"), (1, "peer"), (12, "peer")] {
        let mut bad = buf.clone();
        bad[HEADER_LEN + 8 + off] = 7;
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::InvalidField(field));
    }
    let mut bad = buf.clone();
    bad[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&(MAX_PEERS as u16 + 1).to_le_bytes());
    assert_eq!(
        decode(&bad).unwrap_err(),
        DecodeError::InvalidField("peer_count")
    );
    assert!(Peers::new(&[0u8; PEER_LEN * (MAX_PEERS + 1)]).is_err());
    assert!(Peers::new(&[4u8; 3]).is_err());
    for n in 0..buf.len() {
        assert!(decode(&buf[..n]).is_err());
    }
}

#[test]
fn ipc_request_layout_and_limits() {
    let anc = [0x33u8; 64];
    let buf = enc(&sample_ipc(b"/s", &anc), 5);
    // Header, fixed part, two ancestors, the path.
    assert_eq!(buf.len(), HEADER_LEN + 2 * 32 + 10 * 4 + 8 + 64 + 2);
    assert_eq!(&buf[6..8], &10u16.to_le_bytes());
    assert_eq!(&buf[HEADER_LEN..HEADER_LEN + 32], &[0x11; 32]);
    assert_eq!(&buf[HEADER_LEN + 32..HEADER_LEN + 64], &[0x22; 32]);
    // A NUL in the path, a bad source or a reserved byte are refused.
    let mut bad = buf.clone();
    let last = bad.len() - 1;
    bad[last] = 0;
    assert_eq!(decode(&bad), Err(DecodeError::InvalidField("path")));
    let fixed = HEADER_LEN + 64 + 40;
    let mut bad = buf.clone();
    bad[fixed + 2] = 9;
    assert_eq!(
        decode(&bad),
        Err(DecodeError::InvalidField("peer_program_source"))
    );
    let mut bad = buf.clone();
    bad[fixed + 3] = 1;
    assert_eq!(decode(&bad), Err(DecodeError::InvalidField("reserved")));
    // Truncated: short, never a panic.
    for n in 0..buf.len() {
        assert!(decode(&buf[..n]).is_err());
    }
    // Too long a path is refused at encode.
    let long = vec![b'a'; MAX_PATH_LEN + 1];
    let rec = sample_ipc(&long, &[]);
    let mut out = vec![0u8; rec.encoded_len()];
    assert_eq!(rec.encode(1, &mut out), Err(EncodeError::TooLong("path")));
}

proptest! {
    #[test]
    fn ipc_request_round_trips(
        path in proptest::collection::vec(1u8..=255, 0..300),
        n_anc in 0usize..=MAX_ANCESTRY,
        ids in proptest::array::uniform10(any::<u32>()),
        lineage in any::<bool>(),
    ) {
        let anc = vec![7u8; n_anc * 32];
        let rec = Record::IpcRequest(IpcRequest {
            sha256: [1; 32],
            program_source: if lineage { ProgramSource::Lineage } else { ProgramSource::ExeFile },
            uid: ids[0],
            euid: ids[1],
            gid: ids[2],
            loginuid: ids[3],
            sessionid: ids[4],
            pid: ids[5],
            ppid: ids[6],
            ancestry: Ancestry::from_bytes(&anc).expect("ancestry"),
            peer_sha256: [2; 32],
            peer_program_source: ProgramSource::Lineage,
            peer_pid: ids[7],
            peer_uid: ids[8],
            peer_gid: ids[9],
            path: &path,
        });
        let buf = enc(&rec, 3);
        let (_, back) = decode(&buf).expect("decode");
        prop_assert_eq!(back, rec);
    }
}

fn sample_file<'a>(access: FileAccess, path: &'a [u8], to: &'a [u8], anc: &'a [u8]) -> Record<'a> {
    Record::FileRequest(FileRequest {
        access,
        flags: if access == FileAccess::Write {
            FILE_CREATE
        } else {
            0
        },
        sha256: [0x44; 32],
        program_source: ProgramSource::Lineage,
        uid: 1000,
        euid: 1000,
        gid: 100,
        loginuid: 1000,
        sessionid: 3,
        pid: 77,
        ppid: 1,
        dev: 0x0803,
        ino: 4242,
        ancestry: Ancestry::from_bytes(anc).unwrap(),
        path,
        to,
    })
}

#[test]
fn file_request_layout_and_checks() {
    let anc = [0x33u8; 32];
    let buf = enc(
        &sample_file(FileAccess::Rename, b"/srv/a", b"/tmp/b", &anc),
        9,
    );
    assert_eq!(buf.len(), HEADER_LEN + 84 + 32 + 6 + 6);
    assert_eq!(&buf[6..8], &12u16.to_le_bytes());
    assert_eq!(buf[HEADER_LEN], 4);
    assert_eq!(&buf[HEADER_LEN + 4..HEADER_LEN + 6], &6u16.to_le_bytes());
    assert_eq!(&buf[HEADER_LEN + 8..HEADER_LEN + 40], &[0x44; 32]);
    let (h, back) = decode(&buf).unwrap();
    assert_eq!(h.request_id, 9);
    assert_eq!(
        back,
        sample_file(FileAccess::Rename, b"/srv/a", b"/tmp/b", &anc)
    );
    // A rename without its new path, a read with one, an unknown access or
    // flag, a NUL in either path: refused, by name.
    for (access, path, to) in [
        (FileAccess::Rename, &b"/srv/a"[..], &b""[..]),
        (FileAccess::Read, b"/srv/a", b"/x"),
    ] {
        let rec = sample_file(access, path, to, &[]);
        let mut out = vec![0u8; rec.encoded_len()];
        rec.encode(1, &mut out).unwrap();
        assert_eq!(decode(&out), Err(DecodeError::InvalidField("to")));
    }
    let mut bad = buf.clone();
    bad[HEADER_LEN] = 5;
    assert_eq!(decode(&bad), Err(DecodeError::InvalidField("access")));
    // The named-path flags are known; the next bit is not.
    for known in [FILE_PATH_NAMED, FILE_TO_NAMED] {
        let mut ok = buf.clone();
        ok[HEADER_LEN + 1] = known;
        assert!(decode(&ok).is_ok());
    }
    let mut bad = buf.clone();
    bad[HEADER_LEN + 1] = 32;
    assert_eq!(decode(&bad), Err(DecodeError::InvalidField("flags")));
    let mut bad = buf.clone();
    let last = bad.len() - 1;
    bad[last] = 0;
    assert_eq!(decode(&bad), Err(DecodeError::InvalidField("to")));
    let mut bad = buf.clone();
    bad[last - 6] = 0;
    assert_eq!(decode(&bad), Err(DecodeError::InvalidField("path")));
    for n in 0..buf.len() {
        assert!(decode(&buf[..n]).is_err());
    }
    // The longest pair of paths with the deepest ancestry fits a record;
    // one byte more is refused at encode and at decode.
    let full = [0x55u8; MAX_ANCESTRY * 32];
    let a = vec![b'a'; MAX_PATH_LEN];
    let b = vec![b'b'; MAX_FILE_PATHS_LEN - MAX_PATH_LEN];
    let rec = sample_file(FileAccess::Rename, &a, &b, &full);
    assert_eq!(rec.encoded_len(), MAX_RECORD_LEN);
    let buf = enc(&rec, 1);
    assert!(decode(&buf).is_ok());
    let b2 = vec![b'b'; MAX_FILE_PATHS_LEN - MAX_PATH_LEN + 1];
    let rec = sample_file(FileAccess::Rename, &a, &b2, &[]);
    let mut out = vec![0u8; rec.encoded_len()];
    assert_eq!(rec.encode(1, &mut out), Err(EncodeError::TooLong("path")));
}

#[test]
fn file_sets_round_trip_and_are_checked() {
    let mut bytes = Vec::new();
    for (d, i) in [(1u64, 2u64), (1, 9), (0x0803, 2)] {
        bytes.extend_from_slice(&FileSets::entry(d, i));
    }
    let f = FileSets::new(&bytes).unwrap();
    assert_eq!(
        f.iter().collect::<Vec<_>>(),
        vec![(1, 2), (1, 9), (0x0803, 2)]
    );
    let buf = enc(&Record::FileSets(f), 0);
    assert_eq!(buf.len(), HEADER_LEN + 8 + 3 * FILE_SET_ENTRY_LEN);
    assert_eq!(&buf[6..8], &13u16.to_le_bytes());
    assert_eq!(decode(&buf).unwrap().1, Record::FileSets(f));
    // Out of order or duplicated entries, a count too high: refused.
    let mut unsorted = FileSets::entry(2, 1).to_vec();
    unsorted.extend_from_slice(&FileSets::entry(1, 5));
    assert_eq!(
        FileSets::new(&unsorted),
        Err(DecodeError::InvalidField("file_set_order"))
    );
    let mut dup = FileSets::entry(2, 1).to_vec();
    dup.extend_from_slice(&FileSets::entry(2, 1));
    assert!(FileSets::new(&dup).is_err());
    let mut bad = buf.clone();
    bad[HEADER_LEN..HEADER_LEN + 2]
        .copy_from_slice(&(MAX_FILE_SET_ENTRIES as u16 + 1).to_le_bytes());
    assert_eq!(
        decode(&bad),
        Err(DecodeError::InvalidField("file_set_count"))
    );
    // The largest set fits a record.
    let many: Vec<u8> = (0..MAX_FILE_SET_ENTRIES as u64)
        .flat_map(|i| FileSets::entry(7, i))
        .collect();
    let rec = Record::FileSets(FileSets::new(&many).unwrap());
    assert!(rec.encoded_len() <= MAX_RECORD_LEN);
    assert!(decode(&enc(&rec, 0)).is_ok());
    for n in 0..buf.len() {
        assert!(decode(&buf[..n]).is_err());
    }
}

proptest! {
    #[test]
    fn file_request_round_trips(
        path in proptest::collection::vec(1u8..=255, 0..300),
        to in proptest::collection::vec(1u8..=255, 1..300),
        n_anc in 0usize..=MAX_ANCESTRY,
        access in 1u8..=4,
    ) {
        let anc = vec![0x5a; n_anc * 32];
        let access = FileAccess::from_wire(access).unwrap();
        let to: &[u8] = if access == FileAccess::Rename { &to } else { &[] };
        let rec = sample_file(access, &path, to, &anc);
        let buf = enc(&rec, 3);
        prop_assert_eq!(decode(&buf).unwrap().1, rec);
    }
}

#[test]
fn sealed_round_trips_and_checks_its_inner_header() {
    let inner = enc(&sample_verdict(), 77);
    let mac = [0xab; seal::MAC_LEN];
    let s = Sealed::new(0, mac, &inner).unwrap();
    let buf = enc(&Record::Sealed(s), 77);
    assert_eq!(buf.len(), HEADER_LEN + 8 + seal::MAC_LEN + inner.len());
    assert_eq!(&buf[6..8], &14u16.to_le_bytes());
    let (h, back) = decode(&buf).unwrap();
    assert_eq!(h.request_id, 77);
    let Record::Sealed(back) = back else {
        panic!("not sealed")
    };
    assert_eq!((back.seq, back.mac, back.inner()), (0, mac, &inner[..]));
    assert_eq!(decode(back.inner()).unwrap().1, sample_verdict());

    // Only sealable kinds, and a whole record: no Hello, no nesting, no
    // truncated inner record.
    let hello = enc(
        &Record::Hello(Hello {
            agent_pid: 1,
            agent_version: 1,
        }),
        0,
    );
    assert_eq!(
        Sealed::new(1, mac, &hello),
        Err(DecodeError::InvalidField("sealed_kind"))
    );
    let nested = enc(&Record::Sealed(s), 0);
    assert_eq!(
        Sealed::new(1, mac, &nested),
        Err(DecodeError::InvalidField("sealed_kind"))
    );
    assert!(Sealed::new(0, mac, &inner[..inner.len() - 1]).is_err());
    let mut cut = buf.clone();
    cut.truncate(HEADER_LEN + 8 + seal::MAC_LEN + HEADER_LEN - 1);
    let n = cut.len() as u32;
    cut[8..12].copy_from_slice(&n.to_le_bytes());
    assert!(decode(&cut).is_err());
}

#[test]
fn set_uid_programs_run_with_their_owners_euid() {
    // rwsr-xr-x root: alice (1000) runs it as root.
    assert_eq!(exec_euid(1000, 0o104755, 0, true), 0);
    // Not honoured (nosuid mount, no_new_privs, unmapped owner): as alice.
    assert_eq!(exec_euid(1000, 0o104755, 0, false), 1000);
    // No set-uid bit (set-gid alone does not change the euid).
    assert_eq!(exec_euid(1000, 0o102755, 0, true), 1000);
    assert_eq!(exec_euid(1000, 0o100755, 0, true), 1000);
}

#[test]
fn file_set_paths_are_absolute_nul_terminated_and_counted() {
    let f = FileSetPaths::new(b"/srv/www\0/\0/etc/a b\0").unwrap();
    assert_eq!(f.len(), 3);
    let got: Vec<&[u8]> = f.iter().collect();
    assert_eq!(got, vec![&b"/srv/www"[..], b"/", b"/etc/a b"]);
    let c: Vec<&[u8]> = f.iter_c().collect();
    assert_eq!(c, vec![&b"/srv/www\0"[..], b"/\0", b"/etc/a b\0"]);
    assert!(FileSetPaths::new(b"").unwrap().is_empty());
    for bad in [
        &b"srv/www\0"[..], // relative
        b"/srv/www",       // no NUL
        b"/srv\0\0",       // an empty path
        b"/srv\0tail",     // garbage after the last NUL
    ] {
        assert_eq!(
            FileSetPaths::new(bad).unwrap_err(),
            DecodeError::InvalidField("file_set_path"),
            "{bad:?}"
        );
    }
    let mut long = vec![b'/'; MAX_PATH_LEN + 1];
    long.push(0);
    assert!(FileSetPaths::new(&long).is_err());
    let mut big: Vec<u8> = (0..2)
        .flat_map(|_| {
            let mut p = vec![b'/'; MAX_PATH_LEN - 1];
            p.push(0);
            p
        })
        .collect();
    big.extend_from_slice(b"/x\0");
    assert_eq!(
        FileSetPaths::new(&big).unwrap_err(),
        DecodeError::InvalidField("file_set_path_bytes")
    );
    // The largest record sealed still fits.
    let mut fits = vec![b'/'; MAX_PATH_LEN];
    fits.push(0);
    fits.resize(MAX_FILE_SET_PATH_BYTES - 1, b'/');
    fits.push(0);
    let inner = enc(&Record::FileSetPaths(FileSetPaths::new(&fits).unwrap()), 0);
    let sealed = Record::Sealed(Sealed::new(1, [0; seal::MAC_LEN], &inner).unwrap());
    assert_eq!(sealed.encoded_len(), MAX_RECORD_LEN);
    let many: Vec<u8> = (0..=MAX_FILE_SET_PATHS).flat_map(|_| *b"/a\0").collect();
    assert_eq!(
        FileSetPaths::new(&many).unwrap_err(),
        DecodeError::InvalidField("file_set_path_count")
    );
    // The count in the body must match the paths.
    let buf = enc(&Record::FileSetPaths(f), 0);
    assert_eq!(&buf[6..8], &15u16.to_le_bytes());
    let mut bad = buf.clone();
    bad[HEADER_LEN] = 2;
    assert_eq!(
        decode(&bad).unwrap_err(),
        DecodeError::InvalidField("file_set_path_count")
    );
    // Sealable: an order.
    assert!(seal::sealable(Kind::FileSetPaths));
}
