//! Channel binding over the real agent API (mutual TLS on loopback, SQLite
//! in a temp dir): the connect half from host `a` and the accept half from
//! host `b` are paired by 5-tuple, decided as one, and both agents get the
//! same key (each with its own direction); a denied pair gets no key and the
//! client gets `ChannelDenied`; a lone connect half expires; two channels of
//! the same pair get different key ids; keys never reach the audit log.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{sha256_hex, start_with, Appliance};
use tokio_stream::StreamExt;
use tonic::Streaming;
use trustbind_appliance::agent_api::pb::{self, push, Hello, Push};
use trustbind_appliance::gate::Gate;
use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::store::{Mode, Signature, Store};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");

const POLICY: &str = r#"
@id("clients-may-connect-to-5432")
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
    let sha = sha256_hex(name);
    store
        .put_signature(
            &Signature {
                sha256: sha.clone(),
                sha1: None,
                size: 1,
                name: name.into(),
                source: "test".into(),
            },
            "admin:t",
        )
        .unwrap();
    let _ = store.create_group(group, "", "admin:t");
    store.add_member(group, &sha, "admin:t").unwrap();
    sha
}

async fn appliance(pair_timeout: Duration) -> (Appliance, Arc<Gate>) {
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
    let id = store.create_policy_draft(POLICY, "", "admin:t").unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    (a, gate)
}

fn request(id: u64, action: pb::Action, program: &str, src_port: u32) -> pb::Request {
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
        }),
        target: Some(pb::request::Target::Net(pb::NetTarget {
            proto: pb::Proto::Tcp as i32,
            src_addr: "10.99.0.11".into(),
            src_port,
            dst_addr: "10.99.0.12".into(),
            dst_port: 5432,
        })),
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
        .qualify(pb::QualifyBatch { requests: vec![r] })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(out.len(), 1);
    out.remove(0)
}

#[tokio::test]
async fn channels_pair_key_deny_and_expire() {
    let (app, gate) = appliance(Duration::from_millis(500)).await;
    let ca = app.enrolled_in("a", "web", Mode::Enforce).await;
    let cb = app.enrolled_in("b", "db", Mode::Enforce).await;
    let mut a = app.agent_client(ca).await.unwrap();
    let mut b = app.agent_client(cb).await.unwrap();
    let hello = || Hello {
        agent_version: "t".into(),
        generation: 0,
    };
    let mut sa = a.subscribe(hello()).await.unwrap().into_inner();
    let mut sb = b.subscribe(hello()).await.unwrap().into_inner();

    // 1. An allowed pair: both sides get the same key, mirrored directions.
    let rc = qualify(&mut a, request(1, pb::Action::Connect, "psql", 40000)).await;
    assert_eq!(rc.verdict, pb::Verdict::Allow as i32, "{rc:?}");
    assert_ne!(rc.channel_id, 0);
    assert_eq!(gate.pending(), 1);
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

    // 2. A second channel of the same pair gets another key.
    qualify(&mut a, request(3, pb::Action::Connect, "psql", 40001)).await;
    qualify(&mut b, request(4, pb::Action::Accept, "postgres", 40001)).await;
    let push::Kind::ChannelKey(ka2) = next_channel_push(&mut sa).await else {
        panic!("no second key")
    };
    let _ = next_channel_push(&mut sb).await;
    assert_ne!(ka2.key_id, ka.key_id);
    assert_ne!(ka2.key, ka.key);

    // 3. A pair the policy denies: an unapproved server program accepts.
    let rc = qualify(&mut a, request(5, pb::Action::Connect, "psql", 40002)).await;
    let ra = qualify(&mut b, request(6, pb::Action::Accept, "nc", 40002)).await;
    assert_eq!(ra.verdict, pb::Verdict::Deny as i32, "{ra:?}");
    let push::Kind::ChannelDenied(d) = next_channel_push(&mut sa).await else {
        panic!("client got a key for a denied pair")
    };
    assert_eq!(d.channel_id, rc.channel_id);
    assert!(d.reason.contains("denied"), "{}", d.reason);

    // 4. An unapproved client program is refused at connect: no channel.
    let r = qualify(&mut a, request(7, pb::Action::Connect, "nc", 40003)).await;
    assert_eq!((r.verdict, r.channel_id), (pb::Verdict::Deny as i32, 0));

    // 5. An accept with no protected client (no connect half) is decided
    // alone: this policy requires a qualified peer, so it is denied.
    let r = qualify(&mut b, request(8, pb::Action::Accept, "postgres", 40004)).await;
    assert_eq!((r.verdict, r.channel_id), (pb::Verdict::Deny as i32, 0));

    // 6. A lone connect half expires: denied to the client, audited.
    let rc = qualify(&mut a, request(9, pb::Action::Connect, "psql", 40005)).await;
    let push::Kind::ChannelDenied(d) = next_channel_push(&mut sa).await else {
        panic!("a lone half got a key")
    };
    assert_eq!(d.channel_id, rc.channel_id);
    assert_eq!(gate.pending(), 0);

    // The store has the two channels by key id; no key bytes anywhere in
    // the audit log.
    let rows = app.api.store.audit_rows(0, u32::MAX).unwrap();
    let text: String = rows
        .iter()
        .map(|r| format!("{} {}\n", r.kind, r.detail))
        .collect();
    assert_eq!(text.matches("channel.open").count(), 2, "{text}");
    assert!(text.contains(&ka.key_id) && text.contains(&ka2.key_id));
    assert!(text.contains("channel.unpaired"));
    assert!(text.contains("decision.pair"));
    for k in [&ka.key, &ka2.key] {
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&hex), "key bytes in the audit log");
    }
}
