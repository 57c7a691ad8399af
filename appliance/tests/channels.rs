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
use trustbind_appliance::gate::Gate;
use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::store::{Mode, Store};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");

const POLICY: &str = r#"
@id("clients-may-connect-to-5432")
@encrypt("required")
permit (principal, action == Trustbind::Action::"connect", resource)
when {
    context.program in Trustbind::ProgramGroup::"clients" &&
    resource.port == 5432 &&
    (if context has peer_program
        then context.peer_program in Trustbind::ProgramGroup::"servers"
        else true)
};

@id("servers-accept-clients")
@encrypt("required")
permit (principal, action == Trustbind::Action::"accept", resource)
when {
    context.program in Trustbind::ProgramGroup::"servers" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"clients"
};
"#;

fn sig(store: &Store, name: &str, group: &str) -> String {
    common::named_sig(store, name, group)
}

async fn appliance(pair_timeout: Duration) -> (Appliance, Arc<Gate>) {
    appliance_with(pair_timeout, POLICY).await
}

async fn appliance_with(pair_timeout: Duration, policy: &str) -> (Appliance, Arc<Gate>) {
    let mut gate = None;
    let a = start_with(|store, hub| {
        let engine = Arc::new(Engine::new(Arc::clone(&store), SCHEMA).unwrap());
        let g = Arc::new(Gate::new(engine, store, hub, None, pair_timeout, 64));
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
    (a, gate)
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
