//! The module's records from the appliance's messages: what a
//! [`pb::Result`], a [`pb::ChannelKey`] or a list of peer addresses becomes
//! on `/dev/trustbind`. One place, because both ends build them: the agent
//! writes them (offline, or for a module without an authority key), and
//! the appliance seals them for a module that believes only sealed records
//! (`trustbind_proto::seal`), so the two must agree byte for byte.

use std::net::IpAddr;

use trustbind_proto::{
    self as proto, ChannelKey, ChannelTls, Decision, Family, FileAccess, NetKind, Obligations,
    Record, Verdict, CHANNEL_IV_LEN, CHANNEL_KEY_ID_LEN, CHANNEL_KEY_LEN, CHANNEL_SALT_LEN,
};

use crate::pb;

/// Which kind of module request an answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// An exec (program, loader or interpreter).
    Exec,
    /// An open, delete or rename of a protected file.
    File,
    /// A TCP connect, established connect or accept.
    Net(NetKind),
    /// A UNIX-domain stream connect.
    Ipc,
}

impl Asked {
    /// The kind of a decoded module request, `None` for a record that is
    /// not a request.
    pub fn of(rec: &Record<'_>) -> Option<Self> {
        match rec {
            Record::ExecRequest(_) => Some(Asked::Exec),
            Record::FileRequest(_) => Some(Asked::File),
            Record::NetRequest(r) => Some(Asked::Net(r.kind)),
            Record::IpcRequest(_) => Some(Asked::Ipc),
            _ => None,
        }
    }
}

/// The policy's action for a file access (a hard link's new name is an
/// `open_write`, as the module asks it).
pub fn file_action(a: FileAccess) -> pb::Action {
    match a {
        FileAccess::Read => pb::Action::OpenRead,
        FileAccess::Write => pb::Action::OpenWrite,
        FileAccess::Delete => pb::Action::Delete,
        FileAccess::Rename => pb::Action::Rename,
    }
}

/// The policy's action for a TCP request (an established connect is the
/// connect asked again).
pub fn net_action(k: NetKind) -> pb::Action {
    match k {
        // A listen is decided as the accept half alone (`Agent.Listen`).
        NetKind::Accept | NetKind::Listen => pb::Action::Accept,
        NetKind::Connect | NetKind::Established => pb::Action::Connect,
    }
}

/// The policy's action a module request is asked as, `None` for a record
/// that is not a request.
pub fn action(rec: &Record<'_>) -> Option<pb::Action> {
    match rec {
        Record::ExecRequest(_) => Some(pb::Action::Exec),
        Record::FileRequest(f) => Some(file_action(f.access)),
        Record::NetRequest(n) => Some(net_action(n.kind)),
        Record::IpcRequest(_) => Some(pb::Action::IpcConnect),
        _ => None,
    }
}

/// An address field of a module `NetRequest`: IPv4 in the first 4 bytes;
/// IPv6 as is (an IPv4 peer of an IPv6 socket stays `::ffff:a.b.c.d`), as
/// the agent spells it for the appliance.
pub fn ip_of(family: Family, a: [u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => {
            let [a0, a1, a2, a3, ..] = a;
            IpAddr::from([a0, a1, a2, a3])
        }
        Family::Ipv6 => IpAddr::from(a),
    }
}

/// How the module is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// With this verdict, now.
    Verdict(Verdict),
    /// With the key of this channel when it is pushed; without it, a deny
    /// under this generation.
    Channel {
        /// The appliance's channel id.
        channel_id: u64,
        /// The policy generation of the decision.
        generation: u64,
    },
}

/// A deny under `policy_generation`, never cached.
pub fn deny(policy_generation: u64) -> Verdict {
    Verdict::deny(policy_generation)
}

/// The verdict a result states, obligations parsed (out-of-range values
/// clamped or dropped).
pub fn verdict_of(r: &pb::Result) -> Verdict {
    let decision = match pb::Verdict::try_from(r.verdict) {
        Ok(pb::Verdict::Allow) => Decision::Allow,
        Ok(pb::Verdict::AllowWithConditions) => Decision::AllowWithConditions,
        _ => Decision::Deny,
    };
    let nice = r
        .obligations
        .get("nice")
        .and_then(|n| n.parse::<i8>().ok())
        .map(|n| n.clamp(-20, 19));
    let cpu_limit_s = r
        .obligations
        .get("cpu_limit_s")
        .and_then(|n| n.parse::<u32>().ok());
    let log_level = r
        .obligations
        .get("log_level")
        .map_or(0, |l| l.parse::<u8>().unwrap_or(2).min(3));
    Verdict {
        decision,
        policy_generation: u64::try_from(r.generation).unwrap_or(0),
        cacheable: r.cacheable,
        obligations: Obligations {
            nice,
            cpu_limit_s,
            log_level,
            encrypt: r
                .obligations
                .get("encrypt")
                .is_some_and(|v| v == "required" || v == "offload"),
        },
    }
}

/// The module's answer to a request of kind `asked` given the appliance's
/// result `r`:
/// - an exec gets the verdict as stated;
/// - a file verdict carries no exec or net obligation (`nice`, CPU limit,
///   `encrypt` mean nothing for an open), only the log level;
/// - net verdicts are never cached by the kernel: a pre-SYN connect gets
///   its verdict (with `encrypt` if required); an allowed established
///   connect or accept that names a channel waits for its key; an accept
///   without a channel gets its verdict (never `encrypt`, which is for
///   connects); an established connect without a channel is denied (the
///   kernel resets it);
/// - a UNIX connect is never encrypted (one host) nor cached.
pub fn answer(asked: Asked, r: &pb::Result) -> Answer {
    let mut v = verdict_of(r);
    match asked {
        Asked::Exec => Answer::Verdict(v),
        Asked::File => {
            v.obligations = Obligations {
                log_level: v.obligations.log_level,
                ..Obligations::default()
            };
            Answer::Verdict(v)
        }
        Asked::Ipc => {
            v.cacheable = false;
            v.obligations.encrypt = false;
            Answer::Verdict(v)
        }
        Asked::Net(kind) => {
            v.cacheable = false;
            let allowed = v.decision != Decision::Deny;
            match kind {
                NetKind::Connect | NetKind::Listen => Answer::Verdict(v),
                NetKind::Established | NetKind::Accept if allowed && r.channel_id != 0 => {
                    Answer::Channel {
                        channel_id: r.channel_id,
                        generation: v.policy_generation,
                    }
                }
                NetKind::Established => Answer::Verdict(deny(v.policy_generation)),
                NetKind::Accept => {
                    v.obligations.encrypt = false;
                    Answer::Verdict(v)
                }
            }
        }
    }
}

fn fixed<const N: usize>(field: &str, v: &[u8]) -> Result<[u8; N], String> {
    <[u8; N]>::try_from(v).map_err(|_| format!("{field}: {} bytes, expected {N}", v.len()))
}

fn unhex_id(s: &str) -> Result<[u8; CHANNEL_KEY_ID_LEN], String> {
    let mut out = [0u8; CHANNEL_KEY_ID_LEN];
    hex::decode_to_slice(s, &mut out)
        .map_err(|e| format!("key_id: `{s}` is not hex of {CHANNEL_KEY_ID_LEN} bytes ({e})"))?;
    Ok(out)
}

/// The module's record of a pushed key (the caller wipes both copies).
pub fn channel_key_of(k: &pb::ChannelKey) -> Result<ChannelKey, String> {
    Ok(ChannelKey {
        channel_id: k.channel_id,
        key_id: unhex_id(&k.key_id)?,
        key: fixed::<CHANNEL_KEY_LEN>("key", &k.key)?,
        tx_salt: fixed::<CHANNEL_SALT_LEN>("tx_salt", &k.tx_salt)?,
        tx_iv: fixed::<CHANNEL_IV_LEN>("tx_iv", &k.tx_iv)?,
        rx_salt: fixed::<CHANNEL_SALT_LEN>("rx_salt", &k.rx_salt)?,
        rx_iv: fixed::<CHANNEL_IV_LEN>("rx_iv", &k.rx_iv)?,
        tls: if k.tls12 {
            ChannelTls::Tls12
        } else {
            ChannelTls::Tls13
        },
        idle_timeout_s: k.idle_timeout_s,
    })
}

/// The module's encoding of `addrs` (IPv4-mapped IPv6 as IPv4, as the
/// module names connection ends), at most [`proto::MAX_PEERS`], in order.
pub fn peer_entries(addrs: &[IpAddr]) -> Vec<u8> {
    let mut out = Vec::new();
    for a in addrs.iter().take(proto::MAX_PEERS) {
        let (family, bytes) = match a {
            IpAddr::V4(v4) => (Family::Ipv4, v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => (Family::Ipv4, v4.octets()),
                None => {
                    out.extend_from_slice(&proto::Peers::entry(Family::Ipv6, &v6.octets()));
                    continue;
                }
            },
        };
        let mut a16 = [0u8; 16];
        a16[..4].copy_from_slice(&bytes);
        out.extend_from_slice(&proto::Peers::entry(family, &a16));
    }
    out
}

/// The peer addresses as the appliance sends them (strings): parsed,
/// duplicates dropped, in order; and the ones that do not parse.
pub fn parse_peers(addrs: &[String]) -> (Vec<IpAddr>, Vec<String>) {
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for a in addrs {
        match a.parse::<IpAddr>() {
            Ok(ip) if !ok.contains(&ip) => ok.push(ip),
            Ok(_) => {}
            Err(_) => bad.push(a.clone()),
        }
    }
    (ok, bad)
}

/// Every path of the pushed file sets, in order, without repeats: what
/// the agent resolves and what the appliance seals for the module.
pub fn paths_of(sets: &pb::FileSets) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    sets.sets
        .iter()
        .flat_map(|s| s.paths.iter())
        .filter(|p| seen.insert(p.as_str()))
        .cloned()
        .collect()
}

/// The body of a [`proto::FileSetPaths`] record for `paths`: each path
/// followed by a NUL. Refused whole (a cut list would protect an arbitrary
/// part): a path that is not absolute, holds a NUL or is longer than
/// [`proto::MAX_PATH_LEN`], or more than [`proto::MAX_FILE_SET_PATHS`].
pub fn file_set_paths(paths: &[String]) -> Result<Vec<u8>, String> {
    if paths.len() > proto::MAX_FILE_SET_PATHS {
        return Err(format!(
            "{} protected paths, more than the module's {}: name fewer, higher directories",
            paths.len(),
            proto::MAX_FILE_SET_PATHS
        ));
    }
    let mut out = Vec::new();
    for p in paths {
        if !p.starts_with('/') || p.contains('\0') || p.len() > proto::MAX_PATH_LEN {
            return Err(format!(
                "protected path `{}`: not an absolute path of at most {} bytes",
                p.escape_debug(),
                proto::MAX_PATH_LEN
            ));
        }
        out.extend_from_slice(p.as_bytes());
        out.push(0);
    }
    if out.len() > proto::MAX_FILE_SET_PATH_BYTES {
        return Err(format!(
            "the protected paths take {} bytes, more than the module's {}: name fewer, higher directories",
            out.len(),
            proto::MAX_FILE_SET_PATH_BYTES
        ));
    }
    proto::FileSetPaths::new(&out).map_err(|e| format!("protected paths: {e}"))?;
    Ok(out)
}

/// The answer to a channel keys v2 listen (`NetKind::Listen`): allow when
/// the program is registered, else a deny; never cached (the module keeps
/// its registration per listener itself); the `encrypt` obligation when
/// the policy binds the service's accepts to channels (`channel`: the
/// module then looks for tickets on them).
pub fn listen_verdict(registered: bool, channel: bool, generation: i64) -> Verdict {
    let g = u64::try_from(generation).unwrap_or(0);
    if registered {
        Verdict {
            decision: if channel {
                Decision::AllowWithConditions
            } else {
                Decision::Allow
            },
            policy_generation: g,
            cacheable: false,
            obligations: Obligations {
                encrypt: channel,
                ..Obligations::default()
            },
        }
    } else {
        deny(g)
    }
}

/// The module's [`proto::Grant`] of a granted [`pb::GrantReply`] (the
/// sealed ticket split into its GCM nonce, ciphertext and tag). It holds
/// the pair secret: the caller wipes it ([`proto::Grant::wipe`]) and the
/// reply.
pub fn grant_of(g: &pb::GrantReply) -> Result<proto::Grant, String> {
    use proto::ticket::{GCM_NONCE_LEN, GCM_TAG_LEN, PLAIN_LEN};
    if !g.granted {
        return Err(format!("not granted: {}", g.reason));
    }
    let want = GCM_NONCE_LEN + PLAIN_LEN + GCM_TAG_LEN;
    if g.ticket.len() != want {
        return Err(format!("ticket: {} bytes, expected {want}", g.ticket.len()));
    }
    let (gcm_nonce, rest) = g.ticket.split_at(GCM_NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(PLAIN_LEN);
    Ok(proto::Grant {
        ticket_id: fixed("ticket_id", &g.ticket_id)?,
        pair_secret: fixed("pair_secret", &g.pair_secret)?,
        expires_s: g.expires_s,
        valid_s: g.valid_s,
        generation: u64::try_from(g.generation).unwrap_or(0),
        epoch: g.epoch,
        tls: if g.tls12 {
            ChannelTls::Tls12
        } else {
            ChannelTls::Tls13
        },
        idle_timeout_s: g.idle_timeout_s,
        gcm_nonce: fixed("ticket", gcm_nonce)?,
        ciphertext: fixed("ticket", ciphertext)?,
        tag: fixed("ticket", tag)?,
    })
}

/// A whole record, encoded with `request_id`.
pub fn encode(rec: &Record<'_>, request_id: u64) -> Result<Vec<u8>, proto::EncodeError> {
    let mut buf = vec![0u8; rec.encoded_len()];
    let n = rec.encode(request_id, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn strings(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn pushed_sets_give_their_paths_once() {
        let sets = pb::FileSets {
            sets: vec![
                pb::FileSet {
                    name: "db".into(),
                    paths: strings(&["/srv/data", "/etc/db.conf"]),
                },
                pb::FileSet {
                    name: "logs".into(),
                    paths: strings(&["/var/log/audit", "/srv/data"]),
                },
            ],
            module_order: Vec::new(),
        };
        assert_eq!(
            paths_of(&sets),
            strings(&["/srv/data", "/etc/db.conf", "/var/log/audit"])
        );
    }

    #[test]
    fn file_set_paths_are_the_modules_record_or_refused_whole() {
        let body = file_set_paths(&strings(&["/srv/www", "/etc/a b"])).unwrap();
        assert_eq!(body, b"/srv/www\0/etc/a b\0");
        let f = proto::FileSetPaths::new(&body).unwrap();
        assert_eq!(f.len(), 2);
        assert!(file_set_paths(&[]).unwrap().is_empty());
        for bad in [
            strings(&["/ok", "relative"]),
            strings(&["/a\0b"]),
            vec![format!("/{}", "x".repeat(proto::MAX_PATH_LEN))],
            vec!["/a".to_owned(); proto::MAX_FILE_SET_PATHS + 1],
            vec![format!("/{}", "y".repeat(4000)); 3],
        ] {
            assert!(file_set_paths(&bad).is_err(), "{bad:?}");
        }
    }

    fn result(verdict: pb::Verdict, encrypt: bool, channel_id: u64) -> pb::Result {
        let mut obligations = HashMap::new();
        if encrypt {
            obligations.insert("encrypt".to_owned(), "required".to_owned());
        }
        obligations.insert("nice".to_owned(), "5".to_owned());
        pb::Result {
            id: 77,
            verdict: verdict as i32,
            obligations,
            generation: 5,
            cacheable: true,
            channel_id,
            ..Default::default()
        }
    }

    #[test]
    fn a_pre_syn_connect_gets_its_verdict_with_encrypt() {
        let Answer::Verdict(v) = answer(
            Asked::Net(NetKind::Connect),
            &result(pb::Verdict::AllowWithConditions, true, 0),
        ) else {
            panic!()
        };
        assert_eq!(v.decision, Decision::AllowWithConditions);
        assert!(v.obligations.encrypt && !v.cacheable);
        assert_eq!(v.policy_generation, 5);
        let Answer::Verdict(v) = answer(
            Asked::Net(NetKind::Connect),
            &result(pb::Verdict::Deny, false, 0),
        ) else {
            panic!()
        };
        assert_eq!(v.decision, Decision::Deny);
    }

    #[test]
    fn established_connects_need_a_channel() {
        assert_eq!(
            answer(
                Asked::Net(NetKind::Established),
                &result(pb::Verdict::AllowWithConditions, true, 9)
            ),
            Answer::Channel {
                channel_id: 9,
                generation: 5
            }
        );
        for r in [
            result(pb::Verdict::Allow, false, 0),
            result(pb::Verdict::Deny, true, 9),
        ] {
            let Answer::Verdict(v) = answer(Asked::Net(NetKind::Established), &r) else {
                panic!("{r:?}")
            };
            assert_eq!(v.decision, Decision::Deny);
        }
    }

    #[test]
    fn accepts_get_a_channel_or_their_verdict_without_encrypt() {
        assert_eq!(
            answer(
                Asked::Net(NetKind::Accept),
                &result(pb::Verdict::AllowWithConditions, true, 4)
            ),
            Answer::Channel {
                channel_id: 4,
                generation: 5
            }
        );
        let Answer::Verdict(v) = answer(
            Asked::Net(NetKind::Accept),
            &result(pb::Verdict::Allow, false, 0),
        ) else {
            panic!()
        };
        assert_eq!(v.decision, Decision::Allow);
        let Answer::Verdict(v) = answer(
            Asked::Net(NetKind::Accept),
            &result(pb::Verdict::AllowWithConditions, true, 0),
        ) else {
            panic!()
        };
        assert!(!v.obligations.encrypt);
        let Answer::Verdict(v) = answer(
            Asked::Net(NetKind::Accept),
            &result(pb::Verdict::Deny, false, 4),
        ) else {
            panic!()
        };
        assert_eq!(v.decision, Decision::Deny);
    }

    #[test]
    fn execs_keep_obligations_files_and_unix_connects_lose_them() {
        let r = result(pb::Verdict::AllowWithConditions, true, 0);
        let Answer::Verdict(v) = answer(Asked::Exec, &r) else {
            panic!()
        };
        assert_eq!((v.obligations.nice, v.cacheable), (Some(5), true));
        let Answer::Verdict(v) = answer(Asked::File, &r) else {
            panic!()
        };
        assert_eq!(
            (v.obligations.nice, v.obligations.encrypt, v.cacheable),
            (None, false, true)
        );
        let Answer::Verdict(v) = answer(Asked::Ipc, &r) else {
            panic!()
        };
        assert!(!v.obligations.encrypt && !v.cacheable);
    }

    /// A granted reply becomes the module's record field for field, the
    /// ticket split as the in-band message carries it; anything else is
    /// refused.
    #[test]
    fn a_grant_reply_is_the_modules_grant() {
        use proto::ticket::{GCM_NONCE_LEN, GCM_TAG_LEN, PLAIN_LEN};
        let mut ticket = vec![1u8; GCM_NONCE_LEN];
        ticket.extend(std::iter::repeat_n(2u8, PLAIN_LEN));
        ticket.extend(std::iter::repeat_n(3u8, GCM_TAG_LEN));
        let reply = pb::GrantReply {
            granted: true,
            reason: String::new(),
            ticket,
            epoch: 7,
            pair_secret: vec![9; 32],
            expires_s: 1000,
            generation: 4,
            ticket_id: vec![5; 16],
            tls12: true,
            idle_timeout_s: 30,
            valid_s: 600,
        };
        let mut g = grant_of(&reply).unwrap();
        assert_eq!((g.ticket_id, g.pair_secret), ([5; 16], [9; 32]));
        assert_eq!(
            (g.expires_s, g.valid_s, g.generation, g.epoch),
            (1000, 600, 4, 7)
        );
        assert_eq!((g.tls, g.idle_timeout_s), (ChannelTls::Tls12, 30));
        assert!(g.gcm_nonce.iter().all(|&b| b == 1) && g.tag.iter().all(|&b| b == 3));
        assert!(g.ciphertext.iter().all(|&b| b == 2));
        let bytes = encode(&Record::Grant(g.clone()), 8).unwrap();
        let (h, Record::Grant(back)) = proto::decode(&bytes).unwrap() else {
            panic!("not a grant")
        };
        assert_eq!((h.request_id, &back), (8, &g));
        g.wipe();
        assert_eq!(g.pair_secret, [0; 32]);
        let short = pb::GrantReply {
            ticket: vec![0; 10],
            ..reply.clone()
        };
        assert!(grant_of(&short).unwrap_err().starts_with("ticket"));
        let refused = pb::GrantReply {
            granted: false,
            ..reply
        };
        assert!(grant_of(&refused).is_err());
        assert_eq!(listen_verdict(true, false, 3).decision, Decision::Allow);
        let channel = listen_verdict(true, true, 3);
        assert!(channel.obligations.encrypt && channel.decision == Decision::AllowWithConditions);
        assert_eq!(listen_verdict(false, false, 3), deny(3));
        assert_eq!(listen_verdict(false, true, 3), deny(3));
    }

    #[test]
    fn peers_are_deduplicated_in_order_and_bad_ones_named() {
        let (ok, bad) = parse_peers(&[
            "10.0.0.2".into(),
            "x".into(),
            "::ffff:10.0.0.3".into(),
            "10.0.0.2".into(),
        ]);
        assert_eq!(
            ok,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "::ffff:10.0.0.3".parse().unwrap()
            ]
        );
        assert_eq!(bad, vec!["x".to_owned()]);
        let e = peer_entries(&ok);
        assert_eq!(e.len(), 2 * proto::PEER_LEN);
        assert_eq!(&e[proto::PEER_LEN + 4..proto::PEER_LEN + 8], &[10, 0, 0, 3]);
    }
}
