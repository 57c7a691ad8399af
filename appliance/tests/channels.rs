//! Channel binding over the real agent API (mutual TLS on loopback, SQLite
//! in a temp dir): host `a`'s connect is asked before the SYN (client port
//! 0: an expectation, no channel) and again once established (real 5-tuple:
//! the connect half, with a channel id); host `b`'s accept pairs with it by
//! 5-tuple, the pair is decided as one, and both agents get the same key
//! (each with its own direction); an accept that comes before the
//! established half waits for it; a denied pair gets no key and the client
//! gets `ChannelDenied`; a lone connect half expires; two concurrent
//! channels of the same pair get different key ids; an accept that requires
//! `encrypt` from an unprotected client is denied without waiting; keys
//! never reach the audit log.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{sha256_hex, start_with, Appliance};
use tokio_stream::StreamExt;
use tonic::Streaming;
use trustbind_appliance::agent_api::pb::{self, push, Hello, Push};
use trustbind_appliance::channels::HostShare;
use trustbind_appliance::gate::Gate;
use trustbind_appliance::limits::{LicenseKey, Limits};
use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::store::LicenseTerms;
use trustbind_appliance::store::{Mode, Store};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");

const POLICY: &str = concat!(
    connect_5432_policy!(),
    r#"
@id("servers-accept-clients")
@encrypt("required")
permit (principal, action == Trustbind::Action::"accept", resource)
when {
    context.program in Trustbind::ProgramGroup::"servers" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"clients"
};
"#
);

fn sig(store: &Store, name: &str, group: &str) -> String {
    common::named_sig(store, name, group)
}

async fn appliance(pair_timeout: Duration) -> (Appliance, Arc<Gate>) {
    appliance_with(pair_timeout, POLICY).await
}

async fn appliance_with(pair_timeout: Duration, policy: &str) -> (Appliance, Arc<Gate>) {
    let (a, g, _) = appliance_gate(pair_timeout, policy, false, None).await;
    (a, g)
}

/// An appliance whose gate enforces license limits (when `limits`) and
/// gives each host `share` (when given) of its 64-entry correlator.
async fn appliance_gate(
    pair_timeout: Duration,
    policy: &str,
    limits: bool,
    share: Option<HostShare>,
) -> (Appliance, Arc<Gate>, Option<Arc<Limits>>) {
    let mut gate = None;
    let mut lim = None;
    let a = start_with(|store, hub| {
        let engine = Arc::new(Engine::new(Arc::clone(&store), SCHEMA).unwrap());
        let l = limits.then(|| Arc::new(Limits::new(Arc::clone(&store)).unwrap()));
        lim.clone_from(&l);
        let mut g = Gate::new(engine, store, hub, l, pair_timeout, 64);
        if let Some(share) = share {
            g = g.with_host_share(share);
        }
        let g = Arc::new(g);
        gate = Some(Arc::clone(&g));
        g
    })
    .await;
    let gate = gate.unwrap();
    tokio::spawn(Arc::clone(&gate).run_expiry());
    let store = &a.api.store;
    sig(store, "psql", "clients");
    sig(store, "postgres", "servers");
    sig(store, "nc", "netcat");
    let id = store.create_policy_draft(policy, "", "admin:t").unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    (a, gate, lim)
}

/// The addresses of `a` (10.99.0.11, the client) and `b` (10.99.0.12, the
/// server), as an administrator assigns them: test agents connect from
/// 127.0.0.1, not from the addresses their halves name.
fn assign_ab(app: &Appliance) {
    app.assign("a", &["10.99.0.11"]);
    app.assign("b", &["10.99.0.12"]);
}

fn request(id: u64, action: pb::Action, program: &str, src_port: u32) -> pb::Request {
    net_request(id, action, program, src_port, action == pb::Action::Connect)
}

/// A connect before its SYN: the kernel does not know the client port.
fn pre_syn(id: u64, program: &str) -> pb::Request {
    net_request(id, pb::Action::Connect, program, 0, false)
}

fn net_request(
    id: u64,
    action: pb::Action,
    program: &str,
    src_port: u32,
    established: bool,
) -> pb::Request {
    let sha = hex_bytes(&sha256_hex(program));
    pb::Request {
        id,
        action: action as i32,
        subject: Some(pb::Subject {
            user: "postgres".into(),
            uid: 100,
            euid: 100,
            gid: 100,
            loginuid: u32::MAX,
            session: u32::MAX,
            pid: 42,
            ancestry: vec![],
        }),
        program: Some(pb::Program {
            sha256: sha,
            sha1: vec![0; 20],
            size: 1,
            path: format!("/usr/bin/{program}"),
            package: String::new(),
        }),
        target: Some(pb::request::Target::Net(pb::NetTarget {
            proto: pb::Proto::Tcp as i32,
            src_addr: "10.99.0.11".into(),
            src_port,
            dst_addr: "10.99.0.12".into(),
            dst_port: 5432,
            established,
        })),
        peer: None,
        module_request: Vec::new(),
    }
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

async fn next_channel_push(s: &mut Streaming<Push>) -> push::Kind {
    loop {
        let p = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("no push within 10 s")
            .expect("stream ended")
            .expect("stream error");
        match p.kind.unwrap() {
            k @ (push::Kind::ChannelKey(_) | push::Kind::ChannelDenied(_)) => return k,
            _ => continue,
        }
    }
}

async fn qualify(
    c: &mut pb::agent_client::AgentClient<tonic::transport::Channel>,
    r: pb::Request,
) -> pb::Result {
    let mut out = c
        .qualify(pb::QualifyBatch {
            requests: vec![r],
            module_session: Vec::new(),
            module_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(out.len(), 1);
    out.remove(0)
}

#[tokio::test]
async fn channels_pair_key_deny_and_expire() {
    let (app, gate) = appliance(Duration::from_millis(1500)).await;
    let ca = app.enrolled_in("a", "web", Mode::Enforce).await;
    let cb = app.enrolled_in("b", "db", Mode::Enforce).await;
    assign_ab(&app);
    let mut a = app.agent_client(ca).await.unwrap();
    let mut b = app.agent_client(cb).await.unwrap();
    let hello = || Hello {
        agent_version: "t".into(),
        generation: 0,
        module_session: Vec::new(),
        qualify_net: false,
        verdict_timeout_ms: 0,
    };
    let mut sa = a.subscribe(hello()).await.unwrap().into_inner();
    let mut sb = b.subscribe(hello()).await.unwrap().into_inner();

    // 1. An allowed pair: the pre-SYN connect gets no channel but
    // announces its established half; that one gets the channel id; both
    // sides get the same key, mirrored directions.
    let rp = qualify(&mut a, pre_syn(1, "psql")).await;
    assert_ne!(rp.verdict, pb::Verdict::Deny as i32, "{rp:?}");
    assert_eq!(rp.channel_id, 0);
    assert_eq!(
        rp.obligations.get("encrypt").map(String::as_str),
        Some("required")
    );
    assert_eq!((gate.pending(), gate.expectations()), (0, 1));
    let rc = qualify(&mut a, request(1, pb::Action::Connect, "psql", 40000)).await;
    assert_ne!(rc.verdict, pb::Verdict::Deny as i32, "{rc:?}");
    assert_ne!(rc.channel_id, 0);
    assert_eq!((gate.pending(), gate.expectations()), (1, 0));
    let ra = qualify(&mut b, request(2, pb::Action::Accept, "postgres", 40000)).await;
    assert_ne!(ra.verdict, pb::Verdict::Deny as i32, "{ra:?}");
    assert_eq!(
        ra.obligations.get("encrypt").map(String::as_str),
        Some("required")
    );
    assert_eq!(ra.channel_id, rc.channel_id);
    let push::Kind::ChannelKey(ka) = next_channel_push(&mut sa).await else {
        panic!("client got no key")
    };
    let push::Kind::ChannelKey(kb) = next_channel_push(&mut sb).await else {
        panic!("server got no key")
    };
    assert_eq!(ka.channel_id, rc.channel_id);
    assert_eq!(ka.key_id, kb.key_id);
    assert_eq!(ka.role, pb::ChannelRole::Connect as i32);
    assert_eq!(kb.role, pb::ChannelRole::Accept as i32);
    assert_eq!((ka.key.len(), ka.tx_iv.len(), ka.tx_salt.len()), (32, 8, 4));
    assert_eq!(ka.key, kb.key);
    assert_eq!(ka.tx_iv, kb.rx_iv);
    assert_eq!(ka.tx_salt, kb.rx_salt);
    assert_eq!(ka.rx_iv, kb.tx_iv);
    assert_eq!(ka.rx_salt, kb.tx_salt);
    assert_ne!(
        ka.tx_salt, ka.rx_salt,
        "directions must not share a nonce space"
    );

    // 2. Two concurrent connects of the same pair: two expectations, two
    // channels, two keys; the accepts come first and wait for their halves.
    qualify(&mut a, pre_syn(3, "psql")).await;
    qualify(&mut a, pre_syn(4, "psql")).await;
    assert_eq!(gate.expectations(), 2);
    let mut b2 = b.clone();
    let acc1 = tokio::spawn(async move {
        qualify(&mut b2, request(5, pb::Action::Accept, "postgres", 40001)).await
    });
    let mut b3 = b.clone();
    let acc2 = tokio::spawn(async move {
        qualify(&mut b3, request(6, pb::Action::Accept, "postgres", 40002)).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !acc1.is_finished() && !acc2.is_finished(),
        "accepts must wait"
    );
    let c1 = qualify(&mut a, request(7, pb::Action::Connect, "psql", 40001)).await;
    let c2 = qualify(&mut a, request(8, pb::Action::Connect, "psql", 40002)).await;
    let (a1, a2) = (acc1.await.unwrap(), acc2.await.unwrap());
    assert_ne!(c1.channel_id, c2.channel_id);
    assert_eq!(
        (a1.channel_id, a2.channel_id),
        (c1.channel_id, c2.channel_id)
    );
    let mut keys = Vec::new();
    for _ in 0..2 {
        let push::Kind::ChannelKey(k) = next_channel_push(&mut sa).await else {
            panic!("no key")
        };
        let _ = next_channel_push(&mut sb).await;
        keys.push(k);
    }
    assert_ne!(keys[0].key_id, keys[1].key_id);
    assert_ne!(keys[0].key, keys[1].key);
    let (ka2, ka3) = (keys.remove(0), keys.remove(0));
    assert_eq!(gate.expectations(), 0);

    // 3. A pair the policy denies: an unapproved server program accepts.
    qualify(&mut a, pre_syn(9, "psql")).await;
    let rc = qualify(&mut a, request(10, pb::Action::Connect, "psql", 40003)).await;
    let ra = qualify(&mut b, request(11, pb::Action::Accept, "nc", 40003)).await;
    assert_eq!(ra.verdict, pb::Verdict::Deny as i32, "{ra:?}");
    let push::Kind::ChannelDenied(d) = next_channel_push(&mut sa).await else {
        panic!("client got a key for a denied pair")
    };
    assert_eq!(d.channel_id, rc.channel_id);
    assert!(d.reason.contains("denied"), "{}", d.reason);

    // 4. An unapproved client program is refused at connect: no channel,
    // no expectation.
    let r = qualify(&mut a, pre_syn(12, "nc")).await;
    assert_eq!((r.verdict, r.channel_id), (pb::Verdict::Deny as i32, 0));
    assert_eq!(gate.expectations(), 0);

    // 5. An accept with no protected client (no expectation) is decided
    // alone at once: this policy requires a qualified peer, so it is denied.
    let t = std::time::Instant::now();
    let r = qualify(&mut b, request(13, pb::Action::Accept, "postgres", 40004)).await;
    assert_eq!((r.verdict, r.channel_id), (pb::Verdict::Deny as i32, 0));
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "it must not wait"
    );

    // 6. A lone established half expires: denied to the client, audited.
    qualify(&mut a, pre_syn(14, "psql")).await;
    let rc = qualify(&mut a, request(15, pb::Action::Connect, "psql", 40005)).await;
    let push::Kind::ChannelDenied(d) = next_channel_push(&mut sa).await else {
        panic!("a lone half got a key")
    };
    assert_eq!(d.channel_id, rc.channel_id);
    assert_eq!(gate.pending(), 0);

    // 7. An expectation whose established half never comes expires
    // silently; an accept waiting on it then is decided alone.
    qualify(&mut a, pre_syn(16, "psql")).await;
    assert_eq!(gate.expectations(), 1);
    let t = std::time::Instant::now();
    let r = qualify(&mut b, request(17, pb::Action::Accept, "postgres", 40006)).await;
    assert_eq!((r.verdict, r.channel_id), (pb::Verdict::Deny as i32, 0));
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "it must have waited"
    );
    assert_eq!(gate.expectations(), 0);

    // The store has the three channels by key id; no key bytes anywhere in
    // the audit log.
    let rows = app.api.store.audit_rows(0, u32::MAX).unwrap();
    let text: String = rows
        .iter()
        .map(|r| format!("{} {}\n", r.kind, r.detail))
        .collect();
    assert_eq!(text.matches("channel.open").count(), 3, "{text}");
    for k in [&ka, &ka2, &ka3] {
        assert!(text.contains(&k.key_id));
    }
    assert!(text.contains("channel.unpaired"));
    assert!(text.contains("decision.pair"));
    for k in [&ka.key, &ka2.key, &ka3.key] {
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&hex), "key bytes in the audit log");
    }
}

/// The service must only be reached over a channel (`@encrypt` on the
/// accept, no peer required): a client that is not a protected host (no
/// pre-SYN ask, so no expectation) is denied at once, with a clear reason,
/// in the audit log. Connects are allowed without `encrypt`: neither ask
/// of a connect registers or waits for anything.
const SERVER_ONLY: &str = r#"
@id("clients-connect-in-plaintext")
permit (principal, action == Trustbind::Action::"connect", resource)
when { context.program in Trustbind::ProgramGroup::"clients" };

@id("servers-accept-over-channels")
@encrypt("required")
permit (principal, action == Trustbind::Action::"accept", resource)
when { context.program in Trustbind::ProgramGroup::"servers" };
"#;

#[tokio::test]
async fn encrypt_required_accept_from_an_unprotected_client_is_denied() {
    let (app, gate) = appliance_with(Duration::from_secs(5), SERVER_ONLY).await;
    let cb = app.enrolled_in("b", "db", Mode::Enforce).await;
    let mut b = app.agent_client(cb).await.unwrap();
    let t = std::time::Instant::now();
    let r = qualify(&mut b, request(1, pb::Action::Accept, "postgres", 40000)).await;
    assert!(t.elapsed() < Duration::from_secs(1), "it must not wait");
    assert_eq!((r.verdict, r.channel_id), (pb::Verdict::Deny as i32, 0));
    let why = r.reasons.join(" ");
    assert!(
        why.contains("`encrypt` required but the client 10.99.0.11:40000 is not a protected host"),
        "{why}"
    );
    assert_eq!(gate.pending(), 0);

    let ca = app.enrolled_in("a", "web", Mode::Enforce).await;
    let mut a = app.agent_client(ca).await.unwrap();
    let r = qualify(&mut a, pre_syn(2, "psql")).await;
    assert_eq!((r.verdict, r.channel_id), (pb::Verdict::Allow as i32, 0));
    assert!(!r.obligations.contains_key("encrypt"));
    assert_eq!(gate.expectations(), 0);
    let r = qualify(&mut a, request(3, pb::Action::Connect, "psql", 40001)).await;
    assert_eq!((r.verdict, r.channel_id), (pb::Verdict::Allow as i32, 0));
    assert_eq!(gate.pending(), 0);

    let rows = app.api.store.audit_rows(0, u32::MAX).unwrap();
    assert!(
        rows.iter()
            .any(|r| r.kind == "decision" && r.detail.to_string().contains("not a protected host")),
        "the denial is audited"
    );
}

/// `@encrypt("offload")` asks for TLS 1.2 records (NIC offload) and
/// `@channel_idle_s` for an idle timeout: both reach both keys.
#[tokio::test]
async fn offload_and_idle_timeout_reach_both_keys() {
    let policy = POLICY
        .replace(
            "@id(\"clients-may-connect-to-5432\")\n@encrypt(\"required\")",
            "@id(\"clients-may-connect-to-5432\")\n@encrypt(\"offload\")\n@channel_idle_s(\"30\")",
        )
        .replace(
            "@id(\"servers-accept-clients\")\n@encrypt(\"required\")",
            "@id(\"servers-accept-clients\")\n@encrypt(\"offload\")",
        );
    assert_ne!(policy, POLICY);
    let (app, _gate) = appliance_with(Duration::from_secs(5), &policy).await;
    let ca = app.enrolled_in("a", "web", Mode::Enforce).await;
    let cb = app.enrolled_in("b", "db", Mode::Enforce).await;
    assign_ab(&app);
    let mut a = app.agent_client(ca).await.unwrap();
    let mut b = app.agent_client(cb).await.unwrap();
    let hello = || Hello {
        agent_version: "t".into(),
        generation: 0,
        module_session: Vec::new(),
        qualify_net: false,
        verdict_timeout_ms: 0,
    };
    let mut sa = a.subscribe(hello()).await.unwrap().into_inner();
    let mut sb = b.subscribe(hello()).await.unwrap().into_inner();
    let rp = qualify(&mut a, pre_syn(1, "psql")).await;
    assert_eq!(
        rp.obligations.get("encrypt").map(String::as_str),
        Some("offload")
    );
    qualify(&mut a, request(2, pb::Action::Connect, "psql", 40000)).await;
    let ra = qualify(&mut b, request(3, pb::Action::Accept, "postgres", 40000)).await;
    assert_ne!(ra.channel_id, 0, "{ra:?}");
    for s in [&mut sa, &mut sb] {
        let push::Kind::ChannelKey(k) = next_channel_push(s).await else {
            panic!("no key")
        };
        assert!(k.tls12, "{k:?}");
        assert_eq!(k.idle_timeout_s, 30);
    }
}

#[test]
fn channel_obligation_values_are_checked_at_load() {
    use trustbind_appliance::policy::validate;
    let schema = cedar_policy::Schema::from_cedarschema_str(SCHEMA)
        .unwrap()
        .0;
    assert!(validate(&schema, POLICY).is_ok());
    let bad = POLICY
        .replacen("@encrypt(\"required\")", "@encrypt(\"yes please\")", 1)
        .replacen(
            "@encrypt(\"required\")",
            "@encrypt(\"required\")\n@channel_idle_s(\"-5\")",
            1,
        );
    let err = validate(&schema, &bad).unwrap_err().to_string();
    assert!(
        err.contains("policy `clients-may-connect-to-5432`: @encrypt(\"yes please\"): expected \"required\" or \"offload\""),
        "{err}"
    );
    assert!(
        err.contains(
            "policy `servers-accept-clients`: @channel_idle_s(\"-5\"): expected whole seconds"
        ),
        "{err}"
    );
}

// ---- a rogue enrolled host (T-68 to T-71) ----
//
// `rogue` holds a legitimately enrolled host certificate and speaks the
// agent protocol as it likes (a modified agent). Its own address is
// 10.99.0.66; `a` (10.99.0.11) connects to `b` (10.99.0.12) port 5432.

const ROGUE_ADDR: &str = "10.99.0.66";

fn hello() -> Hello {
    Hello {
        agent_version: "t".into(),
        generation: 0,
        module_session: Vec::new(),
        qualify_net: false,
        verdict_timeout_ms: 0,
    }
}

type Client = pb::agent_client::AgentClient<tonic::transport::Channel>;

/// Enrols `a`, `b` and `rogue` and subscribes all three: their clients
/// and push streams.
async fn enrol_three(app: &Appliance) -> [(Client, Streaming<Push>); 3] {
    let mut out = Vec::new();
    for (host, group) in [("a", "web"), ("b", "db"), ("rogue", "web")] {
        let cfg = app.enrolled_in(host, group, Mode::Enforce).await;
        let mut c = app.agent_client(cfg).await.unwrap();
        let s = c.subscribe(hello()).await.unwrap().into_inner();
        out.push((c, s));
    }
    out.try_into().ok().unwrap()
}

/// [`enrol_three`], with their addresses assigned.
async fn three_hosts(app: &Appliance) -> [(Client, Streaming<Push>); 3] {
    let out = enrol_three(app).await;
    assign_ab(app);
    app.assign("rogue", &[ROGUE_ADDR]);
    out
}

/// A half of `a`'s connection from source port `port` as someone else
/// claims it.
fn forged(id: u64, action: pb::Action, program: &str, port: u32) -> pb::Request {
    request(id, action, program, port)
}

/// No key and no denial reaches `s` within `wait`.
async fn no_channel_push(s: &mut Streaming<Push>, wait: Duration) {
    let got = tokio::time::timeout(wait, async {
        loop {
            match s.next().await {
                Some(Ok(Push {
                    kind: Some(k @ (push::Kind::ChannelKey(_) | push::Kind::ChannelDenied(_))),
                })) => return k,
                Some(_) => continue,
                None => std::future::pending().await,
            }
        }
    })
    .await;
    assert!(got.is_err(), "unexpected channel push: {got:?}");
}

/// `a` connects (pre-SYN, then established from `port`), `b` accepts:
/// both get the same key.
async fn real_pair(
    a: &mut Client,
    sa: &mut Streaming<Push>,
    b: &mut Client,
    sb: &mut Streaming<Push>,
    port: u32,
) -> pb::ChannelKey {
    let rp = qualify(a, pre_syn(1000 + u64::from(port), "psql")).await;
    assert_ne!(rp.verdict, pb::Verdict::Deny as i32, "{rp:?}");
    let rc = qualify(a, request(2000, pb::Action::Connect, "psql", port)).await;
    assert_ne!(rc.verdict, pb::Verdict::Deny as i32, "{rc:?}");
    assert_ne!(rc.channel_id, 0);
    let ra = qualify(b, request(3000, pb::Action::Accept, "postgres", port)).await;
    assert_ne!(ra.verdict, pb::Verdict::Deny as i32, "{ra:?}");
    assert_eq!(ra.channel_id, rc.channel_id);
    let push::Kind::ChannelKey(ka) = next_channel_push(sa).await else {
        panic!("the client got no key")
    };
    let push::Kind::ChannelKey(kb) = next_channel_push(sb).await else {
        panic!("the server got no key")
    };
    assert_eq!(
        (ka.key_id.as_str(), ka.channel_id),
        (kb.key_id.as_str(), rc.channel_id)
    );
    assert_eq!(ka.key, kb.key);
    ka
}

/// `r` is the refusal of a half `host` named with an address it does not
/// own, the reason containing `because`.
fn refused_not_owned(r: &pb::Result, host: &str, because: &str) {
    assert_eq!(
        (r.verdict, r.channel_id),
        (pb::Verdict::Deny as i32, 0),
        "{r:?}"
    );
    let why = r.reasons.join(" ");
    assert!(
        why.contains(&format!("host `{host}` does not own its end of tcp "))
            && why.contains(because)
            && why.contains("trustbind host addresses"),
        "{why}"
    );
}

/// The rogue's half for a's connection (from 10.99.0.11), refused.
fn denied_for_address(r: &pb::Result) {
    refused_not_owned(r, "rogue", "own its end of tcp 10.99.0.11:");
}

/// T-68: the rogue claims the accept half of a's connection to b (dst is
/// b's address, not its own): refused, audited, counted; it gets no key,
/// a's half still waits, and b's real accept pairs with it.
#[tokio::test]
async fn a_rogue_host_cannot_take_the_accept_half_of_another_pair() {
    let (app, gate) = appliance(Duration::from_secs(5)).await;
    let [(mut a, mut sa), (mut b, mut sb), (mut rogue, mut sr)] = three_hosts(&app).await;
    let before = trustbind_appliance::metrics::metrics().refused("channel_address");
    qualify(&mut a, pre_syn(1, "psql")).await;
    let rc = qualify(&mut a, request(2, pb::Action::Connect, "psql", 41000)).await;
    assert_ne!(rc.channel_id, 0, "{rc:?}");
    // The rogue's accept for a's tuple (it even claims the right program).
    let r = qualify(&mut rogue, forged(3, pb::Action::Accept, "postgres", 41000)).await;
    denied_for_address(&r);
    assert_eq!(gate.pending(), 1, "a's half must still wait");
    no_channel_push(&mut sr, Duration::from_millis(300)).await;
    // b's real accept pairs with a's half: both get the key, the rogue none.
    let ra = qualify(&mut b, request(4, pb::Action::Accept, "postgres", 41000)).await;
    assert_eq!(ra.channel_id, rc.channel_id, "{ra:?}");
    let push::Kind::ChannelKey(ka) = next_channel_push(&mut sa).await else {
        panic!("no key for a")
    };
    let push::Kind::ChannelKey(kb) = next_channel_push(&mut sb).await else {
        panic!("no key for b")
    };
    assert_eq!(ka.key, kb.key);
    no_channel_push(&mut sr, Duration::from_millis(300)).await;
    assert!(trustbind_appliance::metrics::metrics().refused("channel_address") > before);
    let rows = app.api.store.audit_rows(0, u32::MAX).unwrap();
    assert!(
        rows.iter().any(|r| r.kind == "decision"
            && r.actor == "rogue"
            && r.detail.to_string().contains("does not own its end")),
        "the refusal is audited"
    );
}

/// T-69: the rogue floods fake halves for a's tuple before and after a's
/// real half (connects from a's address, pre-SYN connects from a's
/// address, accepts to b's address, both with and without the right
/// programs): all refused, and the real pair still pairs.
#[tokio::test]
async fn fake_halves_do_not_knock_out_real_ones() {
    let (app, gate) = appliance(Duration::from_secs(5)).await;
    let [(mut a, mut sa), (mut b, mut sb), (mut rogue, mut sr)] = three_hosts(&app).await;
    let port = 42000;
    let flood = |base: u64| {
        let mut v = Vec::new();
        for i in 0..20u64 {
            let mut pre = pre_syn(base + 3 * i, "psql");
            if let Some(pb::request::Target::Net(n)) = &mut pre.target {
                // Pre-SYN with a's address (not unspecified, not its own).
                n.src_port = port;
            }
            v.push(pre);
            v.push(forged(base + 3 * i + 1, pb::Action::Connect, "psql", port));
            v.push(forged(
                base + 3 * i + 2,
                pb::Action::Accept,
                "postgres",
                port,
            ));
        }
        v
    };
    let before = common::qualify_all(&mut rogue, flood(100)).await;
    assert_eq!(before.len(), 60);
    for (i, r) in before.iter().enumerate() {
        if i % 3 == 2 {
            // An accept that meets nothing is decided alone: this policy
            // needs a peer, so it is denied, with no channel either way.
            assert_eq!(
                (r.verdict, r.channel_id),
                (pb::Verdict::Deny as i32, 0),
                "{r:?}"
            );
        } else {
            denied_for_address(r);
        }
    }
    assert_eq!((gate.pending(), gate.expectations()), (0, 0));
    // a's real connect is not a duplicate of anything; the rogue floods
    // again while it waits; b's accept still pairs with it.
    qualify(&mut a, pre_syn(1, "psql")).await;
    let rc = qualify(&mut a, request(2, pb::Action::Connect, "psql", port)).await;
    assert_ne!(rc.channel_id, 0, "{rc:?}");
    for r in common::qualify_all(&mut rogue, flood(200)).await {
        denied_for_address(&r);
    }
    assert_eq!(gate.pending(), 1);
    let ra = qualify(&mut b, request(3, pb::Action::Accept, "postgres", port)).await;
    assert_eq!(ra.channel_id, rc.channel_id, "{ra:?}");
    let (ka, kb) = (
        next_channel_push(&mut sa).await,
        next_channel_push(&mut sb).await,
    );
    let (push::Kind::ChannelKey(ka), push::Kind::ChannelKey(kb)) = (ka, kb) else {
        panic!("the real pair got no keys")
    };
    assert_eq!(ka.key, kb.key);
    no_channel_push(&mut sr, Duration::from_millis(300)).await;
    // Loopback tuples are the rogue's own, and never meet another host's.
    let lo = |id, action, program: &str, port| {
        let mut r = request(id, action, program, port);
        if let Some(pb::request::Target::Net(n)) = &mut r.target {
            n.src_addr = "127.0.0.1".into();
            n.dst_addr = "127.0.0.1".into();
        }
        r
    };
    qualify(&mut a, lo(10, pb::Action::Connect, "psql", 43000)).await;
    assert_eq!(gate.pending(), 1);
    let r = qualify(&mut rogue, lo(11, pb::Action::Accept, "postgres", 43000)).await;
    assert_eq!(r.channel_id, 0, "{r:?}");
    assert_eq!(gate.pending(), 1, "a's loopback half is untouched");
    no_channel_push(&mut sr, Duration::from_millis(300)).await;
}

/// T-70: a program-pair license of 3 calls; the rogue fabricates pairs of
/// a's and b's programs between their addresses (it is an end of none):
/// every half refused, the license not charged; the real pair is charged
/// once and gets its key.
#[tokio::test]
async fn fabricated_pairs_do_not_use_up_a_pair_license() {
    let (app, _gate, limits) = appliance_gate(Duration::from_secs(5), POLICY, true, None).await;
    let limits = limits.unwrap();
    let pair = LicenseKey::Pair {
        client: sha256_hex("psql"),
        server: sha256_hex("postgres"),
    };
    let terms = LicenseTerms {
        max_calls: Some(3),
        ..LicenseTerms::default()
    };
    limits.set(&pair, &terms, false, "admin:t").unwrap();
    let [(mut a, mut sa), (mut b, mut sb), (mut rogue, mut sr)] = three_hosts(&app).await;
    for port in 44000..44010 {
        let c = qualify(&mut rogue, forged(1, pb::Action::Connect, "psql", port)).await;
        denied_for_address(&c);
        let acc = qualify(&mut rogue, forged(2, pb::Action::Accept, "postgres", port)).await;
        assert_eq!(acc.channel_id, 0, "{acc:?}");
    }
    no_channel_push(&mut sr, Duration::from_millis(300)).await;
    let calls = |l: &Limits| {
        l.list()
            .unwrap()
            .into_iter()
            .find(|v| v.license.subject == pair)
            .map(|v| (v.calls, v.license.exceeded.is_some()))
    };
    assert_eq!(calls(&limits), Some((0, false)), "the license was charged");
    real_pair(&mut a, &mut sa, &mut b, &mut sb, 44100).await;
    assert_eq!(calls(&limits), Some((1, false)));
}

/// T-71: the rogue fills its share of the correlator with expectations
/// and waiting halves of its own (its own address: they are valid); past
/// its share it is refused (counted), and a and b still pair.
#[tokio::test]
async fn one_host_cannot_fill_the_waiting_table_for_the_others() {
    let share = HostShare {
        per_host: 16,
        reserve: 4,
    };
    let (app, gate, _) = appliance_gate(Duration::from_secs(5), POLICY, false, Some(share)).await;
    let [(mut a, mut sa), (mut b, mut sb), (mut rogue, _sr)] = three_hosts(&app).await;
    let before = trustbind_appliance::metrics::metrics().refused("channel_share");
    let own = |id: u64, port: u32, established: bool| {
        let mut r = net_request(id, pb::Action::Connect, "psql", port, established);
        if let Some(pb::request::Target::Net(n)) = &mut r.target {
            n.src_addr = ROGUE_ADDR.into();
        }
        r
    };
    // 64 expectations, then 64 established halves (each consumes one of
    // its expectations first): the whole table, twice over.
    for requests in [
        (0..64).map(|i| own(i, 0, false)).collect::<Vec<_>>(),
        (0..64)
            .map(|i| own(100 + i, 45000 + i as u32, true))
            .collect(),
    ] {
        let results = common::qualify_all(&mut rogue, requests).await;
        let refused: Vec<_> = results
            .iter()
            .filter(|r| r.verdict == pb::Verdict::Deny as i32)
            .collect();
        assert_eq!(refused.len(), 64 - 16, "the rogue holds its share, no more");
        for r in refused {
            let why = r.reasons.join(" ");
            assert!(
                why.contains("host `rogue`") && why.contains("its share"),
                "{why}"
            );
        }
        assert_eq!(gate.pending() + gate.expectations(), 16);
    }
    assert!(trustbind_appliance::metrics::metrics().refused("channel_share") > before);
    // The others pair as usual.
    real_pair(&mut a, &mut sa, &mut b, &mut sb, 45500).await;
    real_pair(&mut a, &mut sa, &mut b, &mut sb, 45501).await;
}

/// The address a host's agent connects from is its own (here noted as the
/// agent port would note it: the test agents really connect from
/// 127.0.0.1, which is not recorded) unless another host connects from it
/// too (a NAT): then neither owns it until an administrator assigns it,
/// and then only the assignee does.
#[tokio::test]
async fn the_address_an_agent_connects_from_is_its_own_unless_shared() {
    let (app, gate) = appliance(Duration::from_secs(5)).await;
    let [(mut a, mut sa), (mut b, mut sb), (mut rogue, mut sr)] = enrol_three(&app).await;
    let seen = |host: &str, addr: &str| {
        app.api
            .hub
            .addrs()
            .observe(host, addr.parse().unwrap(), std::time::Instant::now());
    };
    seen("a", "10.99.0.11");
    seen("b", "10.99.0.12");
    real_pair(&mut a, &mut sa, &mut b, &mut sb, 46000).await;
    // The rogue connects from b's address too: b's address is shared.
    seen("rogue", "10.99.0.12");
    qualify(&mut a, pre_syn(1, "psql")).await;
    let rc = qualify(&mut a, request(2, pb::Action::Connect, "psql", 46001)).await;
    assert_ne!(rc.channel_id, 0, "{rc:?}");
    for (c, who) in [(&mut rogue, "rogue"), (&mut b, "b")] {
        let r = qualify(c, request(3, pb::Action::Accept, "postgres", 46001)).await;
        refused_not_owned(&r, who, "10.99.0.12 is shared");
    }
    assert_eq!(gate.pending(), 1, "a's half is undisturbed");
    // Assigned to b, it is b's alone.
    app.assign("b", &["10.99.0.12"]);
    let r = qualify(
        &mut rogue,
        request(4, pb::Action::Accept, "postgres", 46001),
    )
    .await;
    assert!(
        r.reasons
            .join(" ")
            .contains("10.99.0.12 is assigned to another host"),
        "{r:?}"
    );
    let ra = qualify(&mut b, request(5, pb::Action::Accept, "postgres", 46001)).await;
    assert_eq!(ra.channel_id, rc.channel_id, "{ra:?}");
    let (push::Kind::ChannelKey(ka), push::Kind::ChannelKey(kb)) = (
        next_channel_push(&mut sa).await,
        next_channel_push(&mut sb).await,
    ) else {
        panic!("the real pair got no keys")
    };
    assert_eq!(ka.key, kb.key);
    no_channel_push(&mut sr, Duration::from_millis(300)).await;
    // IPv4-mapped forms are the same address.
    let mut mapped = request(6, pb::Action::Connect, "psql", 46002);
    if let Some(pb::request::Target::Net(n)) = &mut mapped.target {
        n.src_addr = "::ffff:10.99.0.12".into();
    }
    let r = qualify(&mut rogue, mapped).await;
    assert!(
        r.reasons
            .join(" ")
            .contains("10.99.0.12 is assigned to another host"),
        "{r:?}"
    );
}
