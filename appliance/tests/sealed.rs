//! Sealed records over the real agent API (mutual TLS on loopback, SQLite
//! in a temp dir, the real engine). The test plays the module: its own
//! P-256 session key, the session key `K` derived from the authority key
//! the enrolment returned, every seal checked with its own HMAC code.
//!
//! - an exec asked with the module's bytes is answered with a sealed
//!   verdict bound to their digest and request id;
//! - a request whose gRPC fields disagree with the module's bytes (another
//!   program, another uid), a malformed module request, a missing or
//!   invalid session are refused (deny, audited, the reason naming the
//!   field);
//! - requests without module bytes are answered as before;
//! - `HostMode` and `Peers` pushes carry sealed orders for the
//!   subscriber's session, with increasing sequences; other subscribers'
//!   are unsealed;
//! - a channel key pushed for a module's established connect or accept
//!   carries the key sealed as the answer to that request.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::sealing::{digest, Module};
use common::{exec, start_with, start_with_policy, subject, Appliance};
use rustls::ClientConfig;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Streaming;
use trustbind_api::module::{self, Asked};
use trustbind_appliance::agent_api::pb::agent_client::AgentClient;
use trustbind_appliance::agent_api::pb::{self, push, Hello, Push, QualifyBatch, Verdict};
use trustbind_appliance::gate::Gate;
use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::store::{Mode, Store};
use trustbind_proto::{self as proto, Record};

const POLICY: &str = r#"
@id("exec-coreutils")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"coreutils");
"#;

const LS: [u8; 32] = [0x11; 32];
const UNKNOWN: [u8; 32] = [0x99; 32];

/// Enrols `host` (group `group` in `mode`): its client config and the
/// authority key the enrolment returned.
async fn enrolled(
    app: &Appliance,
    host: &str,
    group: &str,
    mode: Mode,
) -> (Arc<ClientConfig>, Vec<u8>) {
    let token = format!("token-of-{host}-0123456789abcdef");
    app.add_pending_mode(host, group, mode, &token);
    let (reply, key) = app.enrol_reply(host, &token).await.unwrap();
    (app.client_config(&reply.cert_pem, &key), reply.authority)
}

/// An appliance over `POLICY` (LS in coreutils) and web1's client with its
/// module.
async fn setup() -> (Appliance, AgentClient<Channel>, Module) {
    let app = start_with_policy(POLICY, &[(LS, "coreutils")]).await;
    let (cfg, authority) = enrolled(&app, "web1", "web", Mode::Enforce).await;
    let client = app.agent_client(cfg).await.unwrap();
    (app, client, Module::new(&authority))
}

/// The module's record of the exec `common::exec(_, sha)` describes.
fn exec_record(request_id: u64, sha: [u8; 32]) -> Vec<u8> {
    let ancestry = [0xab; 32];
    let rec = Record::ExecRequest(proto::ExecRequest {
        sha256: sha,
        sha1: [0x01; 20],
        size: 1234,
        uid: 1000,
        euid: 1000,
        gid: 1000,
        loginuid: 1000,
        sessionid: 7,
        pid: 4242,
        ppid: 1,
        ancestry: proto::Ancestry::from_bytes(&ancestry).unwrap(),
        path: b"/usr/bin/x",
        flags: 0,
    });
    module::encode(&rec, request_id).unwrap()
}

/// `common::exec(id, sha)` with the module's bytes of `module_sha`.
fn sealed_exec(id: u64, sha: [u8; 32], module_sha: [u8; 32]) -> pb::Request {
    let mut r = exec(id, sha);
    r.module_request = exec_record(1000 + id, module_sha);
    r
}

async fn qualify(
    c: &mut AgentClient<Channel>,
    session: &[u8],
    requests: Vec<pb::Request>,
) -> Vec<pb::Result> {
    c.qualify(QualifyBatch {
        requests,
        module_session: session.to_vec(),
        module_version: 0,
    })
    .await
    .unwrap()
    .into_inner()
    .results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_answers_are_sealed_to_the_module_request() {
    let (app, mut c, m) = setup().await;
    assert_eq!(app.api.pki.authority().public().to_vec().len(), 64);
    let (allow, deny) = (sealed_exec(1, LS, LS), sealed_exec(2, UNKNOWN, UNKNOWN));
    let (allow_bytes, deny_bytes) = (allow.module_request.clone(), deny.module_request.clone());
    let results = qualify(&mut c, &m.public, vec![allow, deny]).await;
    assert_eq!(results[0].verdict(), Verdict::Allow);
    assert_eq!(results[1].verdict(), Verdict::Deny);
    for (r, bytes, want) in [
        (&results[0], &allow_bytes, proto::Decision::Allow),
        (&results[1], &deny_bytes, proto::Decision::Deny),
    ] {
        let o = m.open(&r.module_answer, &digest(bytes)).unwrap();
        assert_eq!((o.request_id, o.seq), (1000 + r.id, 0));
        // The verdict the agent would have written, byte for byte.
        let module::Answer::Verdict(v) = module::answer(Asked::Exec, r) else {
            panic!("an exec is answered now")
        };
        assert_eq!(
            o.inner,
            module::encode(&Record::Verdict(v), 1000 + r.id).unwrap()
        );
        let (h, Record::Verdict(got)) = proto::decode(&o.inner).unwrap() else {
            panic!("not a verdict")
        };
        assert_eq!((h.request_id, got.decision), (1000 + r.id, want));
        // Bound to that request: another digest does not open it.
        assert_eq!(
            m.open(&r.module_answer, &digest(b"another request"))
                .unwrap_err(),
            "bad seal"
        );
    }
    // Another module session cannot open them.
    let other = Module::new(&app.api.pki.authority().public());
    assert!(other
        .open(&results[0].module_answer, &digest(&allow_bytes))
        .is_err());
}

/// The audited decisions' details.
fn decisions(app: &Appliance) -> Vec<String> {
    let rows = app.api.store.audit_rows(0, u32::MAX).unwrap();
    rows.into_iter()
        .filter(|r| r.kind == "decision")
        .map(|r| r.detail)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_disagree_with_the_module_are_refused_and_audited() {
    let (app, mut c, m) = setup().await;
    let before = decisions(&app).len();
    // The agent claims the allowed program; the module asked about another.
    let tampered = sealed_exec(1, LS, UNKNOWN);
    let mut other_uid = sealed_exec(2, LS, LS);
    other_uid.subject.as_mut().unwrap().uid = 0;
    let mut not_a_record = sealed_exec(3, LS, LS);
    not_a_record.module_request = b"TBND nonsense".to_vec();
    let mut loader = sealed_exec(4, LS, LS);
    loader.target = Some(pb::request::Target::Exec(pb::ExecTarget {
        loader_direct: true,
    }));
    let results = qualify(
        &mut c,
        &m.public,
        vec![tampered, other_uid, not_a_record, loader],
    )
    .await;
    let reasons: Vec<String> = results.iter().map(|r| r.reasons.join(",")).collect();
    for r in &results {
        assert_eq!(r.verdict(), Verdict::Deny, "{r:?}");
        assert!(!r.cacheable);
        assert!(r.module_answer.is_empty());
    }
    assert!(
        reasons[0].contains("module_request: `program.sha256`"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("module_request: `subject.uid`"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("module_request: not a module record"),
        "{reasons:?}"
    );
    assert!(reasons[3].contains("`exec.loader_direct`"), "{reasons:?}");
    // Audited like any decision, with the reason.
    let decisions = decisions(&app);
    assert_eq!(decisions.len(), before + 4);
    let last = decisions.last().unwrap();
    assert!(last.contains("exec.loader_direct"), "{last}");

    // Module bytes without a usable session: refused, naming the session.
    let no_session = qualify(&mut c, &[], vec![sealed_exec(5, LS, LS)]).await;
    assert_eq!(no_session[0].verdict(), Verdict::Deny);
    assert!(no_session[0].reasons[0].starts_with("module_session: missing"));
    let bad = qualify(&mut c, &[1; 64], vec![sealed_exec(6, LS, LS)]).await;
    assert_eq!(bad[0].verdict(), Verdict::Deny);
    assert_eq!(bad[0].reasons, vec!["module_session: not a point of P-256"]);
    let short = qualify(&mut c, &[1; 10], vec![sealed_exec(7, LS, LS)]).await;
    assert!(short[0].reasons[0].starts_with("module_session: 10 bytes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_module_bytes_are_answered_as_before() {
    let (app, mut c, m) = setup().await;
    // An old agent (no session), and a new one whose request carries no
    // module bytes: the same answers, nothing sealed.
    for session in [Vec::new(), m.public.to_vec(), vec![1; 64]] {
        let results = qualify(&mut c, &session, vec![exec(1, LS), exec(2, UNKNOWN)]).await;
        assert_eq!(results[0].verdict(), Verdict::Allow);
        assert_eq!(results[0].reasons, vec!["exec-coreutils"]);
        assert_eq!(results[1].verdict(), Verdict::Deny);
        assert!(results.iter().all(|r| r.module_answer.is_empty()));
    }
    // No session was derived for batches without module bytes.
    assert_eq!(app.api.pki.authority().cached_sessions(), 0);
    // A stream without a session gets unsealed orders.
    let mut s = c.subscribe(Hello::default()).await.unwrap().into_inner();
    let Some(push::Kind::HostMode(mode)) = s.next().await.unwrap().unwrap().kind else {
        panic!("host mode first")
    };
    assert_eq!(
        mode,
        pb::HostMode {
            mode: "enforce".into(),
            module_order: Vec::new()
        }
    );
}

/// The first push within 10 s that `pick` takes (`what` names it).
async fn next_push<T>(
    s: &mut Streaming<Push>,
    what: &str,
    pick: impl Fn(push::Kind) -> Option<T>,
) -> T {
    loop {
        let p = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} within 10 s"))
            .unwrap()
            .unwrap();
        if let Some(t) = pick(p.kind.unwrap()) {
            return t;
        }
    }
}

/// The next `HostMode` or `Peers` push.
async fn next_order(s: &mut Streaming<Push>) -> push::Kind {
    next_push(s, "order", |k| {
        matches!(k, push::Kind::HostMode(_) | push::Kind::Peers(_)).then_some(k)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_and_peers_orders_are_sealed_per_subscriber() {
    let (app, mut c, m) = setup().await;
    // An invalid session is refused.
    let st = c
        .subscribe(Hello {
            module_session: vec![2; 64],
            ..Hello::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("module_session"), "{st:?}");

    let mut sealed = c
        .subscribe(Hello {
            agent_version: "t".into(),
            generation: 0,
            module_session: m.public.to_vec(),
            verdict_timeout_ms: 0,
            qualify_net: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut plain = c.subscribe(Hello::default()).await.unwrap().into_inner();
    let zero = [0u8; 32];
    let mut last_seq = 0;
    let mut open_order = |k: &push::Kind| -> Record<'static> {
        let bytes = match k {
            push::Kind::HostMode(h) => &h.module_order,
            push::Kind::Peers(p) => &p.module_order,
            _ => unreachable!(),
        };
        let o = m.open(bytes, &zero).unwrap();
        assert_eq!(o.request_id, 0);
        assert!(o.seq > last_seq, "{} after {last_seq}", o.seq);
        last_seq = o.seq;
        let inner: &'static [u8] = Box::leak(o.inner.into_boxed_slice());
        proto::decode(inner).unwrap().1
    };

    // First: the mode, as a Config order with the agent's net flag and the
    // default verdict wait (the Hello named none).
    let k = next_order(&mut sealed).await;
    let push::Kind::HostMode(h) = &k else {
        panic!("{k:?}")
    };
    assert_eq!(h.mode, "enforce");
    assert_eq!(
        open_order(&k),
        Record::Config(proto::Config {
            mode: proto::Mode::Enforce,
            verdict_timeout_ms: 2500,
            qualify_net: true,
        })
    );
    // Then the peers: this host's address, as the module's entries.
    let k = next_order(&mut sealed).await;
    let push::Kind::Peers(p) = &k else {
        panic!("{k:?}")
    };
    assert_eq!(p.addrs, vec!["127.0.0.1".to_owned()]);
    let Record::Peers(peers) = open_order(&k) else {
        panic!("not peers")
    };
    let (addrs, _) = module::parse_peers(&p.addrs);
    assert_eq!(peers.as_bytes(), module::peer_entries(&addrs).as_slice());

    // A mode change: a new order, a larger sequence.
    app.api
        .store
        .set_host_group("web", Mode::Permissive, "admin:test")
        .unwrap();
    loop {
        let k = next_order(&mut sealed).await;
        let rec = open_order(&k);
        if let push::Kind::HostMode(h) = &k {
            if h.mode == "permissive" {
                assert_eq!(
                    rec,
                    Record::Config(proto::Config {
                        mode: proto::Mode::Permissive,
                        verdict_timeout_ms: 2500,
                        qualify_net: true,
                    })
                );
                break;
            }
        }
    }
    // The stream without a session got the same pushes, unsealed.
    let mut seen_permissive = false;
    while !seen_permissive {
        match next_order(&mut plain).await {
            push::Kind::HostMode(h) => {
                assert!(h.module_order.is_empty());
                seen_permissive = h.mode == "permissive";
            }
            push::Kind::Peers(p) => assert!(p.module_order.is_empty()),
            _ => unreachable!(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verdict_wait_ordered_is_the_agents_clamped() {
    let (_app, mut c, m) = setup().await;
    for (asked, ordered) in [(700, 700), (u32::MAX, proto::MAX_VERDICT_TIMEOUT_MS)] {
        let mut s = c
            .subscribe(Hello {
                module_session: m.public.to_vec(),
                verdict_timeout_ms: asked,
                ..Hello::default()
            })
            .await
            .unwrap()
            .into_inner();
        let push::Kind::HostMode(h) = next_order(&mut s).await else {
            panic!("host mode first")
        };
        let o = m.open(&h.module_order, &[0; 32]).unwrap();
        let (_, Record::Config(cfg)) = proto::decode(&o.inner).unwrap() else {
            panic!("not a config")
        };
        assert_eq!((cfg.verdict_timeout_ms, cfg.qualify_net), (ordered, false));
    }
}

// ---- channel keys ----

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");

const CHANNEL_POLICY: &str = r#"
@id("clients-may-connect-to-5432")
@encrypt("required")
permit (principal, action == Trustbind::Action::"connect", resource)
when { context.program in Trustbind::ProgramGroup::"clients" && resource.port == 5432 };

@id("servers-accept-clients")
@encrypt("required")
permit (principal, action == Trustbind::Action::"accept", resource)
when {
    context.program in Trustbind::ProgramGroup::"servers" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"clients"
};
"#;

fn sig(store: &Store, name: &str, group: &str) -> [u8; 32] {
    common::named_sig(store, name, group);
    digest(name.as_bytes())
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a);
    out
}

/// A TCP half 10.99.0.11:`src_port` -> 10.99.0.12:5432 of `sha`, as the
/// agent asks it and with the module's bytes (request id `module_id`).
fn net(id: u64, module_id: u64, kind: proto::NetKind, sha: [u8; 32], src_port: u16) -> pb::Request {
    let rec = Record::NetRequest(proto::NetRequest {
        kind,
        family: proto::Family::Ipv4,
        src_addr: v4([10, 99, 0, 11]),
        src_port,
        dst_addr: v4([10, 99, 0, 12]),
        dst_port: 5432,
        sha256: sha,
        program_source: proto::ProgramSource::Lineage,
        uid: 1000,
        euid: 1000,
        gid: 1000,
        loginuid: 1000,
        sessionid: 7,
        pid: 4242,
        ppid: 1,
        ancestry: proto::Ancestry::from_bytes(&[0xab; 32]).unwrap(),
    });
    let action = match kind {
        proto::NetKind::Accept => pb::Action::Accept,
        _ => pb::Action::Connect,
    };
    pb::Request {
        id,
        action: action as i32,
        subject: Some(subject("postgres")),
        program: Some(pb::Program {
            sha256: sha.to_vec(),
            ..Default::default()
        }),
        target: Some(pb::request::Target::Net(pb::NetTarget {
            proto: pb::Proto::Tcp as i32,
            src_addr: "10.99.0.11".into(),
            src_port: u32::from(src_port),
            dst_addr: "10.99.0.12".into(),
            dst_port: 5432,
            established: kind == proto::NetKind::Established,
        })),
        peer: None,
        module_request: module::encode(&rec, module_id).unwrap(),
    }
}

async fn next_key(s: &mut Streaming<Push>) -> pb::ChannelKey {
    next_push(s, "key", |k| match k {
        push::Kind::ChannelKey(k) => Some(k),
        push::Kind::ChannelDenied(d) => panic!("channel denied: {d:?}"),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_keys_are_sealed_to_the_halves_that_asked() {
    let app = start_with(|store, hub| {
        let engine = Arc::new(Engine::new(Arc::clone(&store), SCHEMA).unwrap());
        Arc::new(Gate::new(
            engine,
            store,
            hub,
            None,
            Duration::from_secs(5),
            64,
        ))
    })
    .await;
    let store = &app.api.store;
    let psql = sig(store, "psql", "clients");
    let postgres = sig(store, "postgres", "servers");
    let id = store
        .create_policy_draft(CHANNEL_POLICY, "", "admin:t")
        .unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    let (ca, auth_a) = enrolled(&app, "a", "web", Mode::Enforce).await;
    let (cb, auth_b) = enrolled(&app, "b", "db", Mode::Enforce).await;
    app.assign("a", &["10.99.0.11"]);
    app.assign("b", &["10.99.0.12"]);
    let (ma, mb) = (Module::new(&auth_a), Module::new(&auth_b));
    let mut a = app.agent_client(ca).await.unwrap();
    let mut b = app.agent_client(cb).await.unwrap();
    // The keys are answers: a stream sealed for any session (or none)
    // carries the key sealed for the module that asked.
    let mut sa = a.subscribe(Hello::default()).await.unwrap().into_inner();
    let mut sb = b
        .subscribe(Hello {
            module_session: mb.public.to_vec(),
            ..Hello::default()
        })
        .await
        .unwrap()
        .into_inner();

    // The connect before the SYN: a sealed verdict (net: never cached).
    let pre = net(1, 501, proto::NetKind::Connect, psql, 0);
    let pre_bytes = pre.module_request.clone();
    let r = qualify(&mut a, &ma.public, vec![pre]).await.remove(0);
    assert_ne!(r.verdict(), Verdict::Deny, "{r:?}");
    let o = ma.open(&r.module_answer, &digest(&pre_bytes)).unwrap();
    let (h, Record::Verdict(v)) = proto::decode(&o.inner).unwrap() else {
        panic!("not a verdict")
    };
    assert_eq!(h.request_id, 501);
    assert!(v.obligations.encrypt && !v.cacheable);

    // The established half waits for its key: nothing sealed now.
    let conn = net(2, 502, proto::NetKind::Established, psql, 40000);
    let conn_bytes = conn.module_request.clone();
    let rc = qualify(&mut a, &ma.public, vec![conn]).await.remove(0);
    assert_ne!(rc.verdict(), Verdict::Deny, "{rc:?}");
    assert_ne!(rc.channel_id, 0);
    assert!(rc.module_answer.is_empty());
    // The accept pairs with it: both keys pushed, each sealed to its half.
    let acc = net(3, 503, proto::NetKind::Accept, postgres, 40000);
    let acc_bytes = acc.module_request.clone();
    let ra = qualify(&mut b, &mb.public, vec![acc]).await.remove(0);
    assert_eq!(ra.channel_id, rc.channel_id, "{ra:?}");
    assert!(ra.module_answer.is_empty());

    for (k, m, bytes, module_id) in [
        (next_key(&mut sa).await, &ma, &conn_bytes, 502),
        (next_key(&mut sb).await, &mb, &acc_bytes, 503),
    ] {
        assert_eq!(k.channel_id, rc.channel_id);
        let o = m.open(&k.module_answer, &digest(bytes)).unwrap();
        assert_eq!((o.request_id, o.seq), (module_id, 0));
        // The very key pushed, as the agent would have written it.
        let want = module::channel_key_of(&k).unwrap();
        assert_eq!(
            o.inner,
            module::encode(&Record::ChannelKey(want), module_id).unwrap()
        );
        // Not for the other half's request.
        let other = if module_id == 502 {
            &acc_bytes
        } else {
            &conn_bytes
        };
        assert!(m.open(&k.module_answer, &digest(other)).is_err());
    }
    // A module that asked nothing sealed gets its key unsealed, as before.
    let conn = net(4, 504, proto::NetKind::Established, psql, 40001);
    let mut plain_conn = conn.clone();
    plain_conn.module_request.clear();
    let r = qualify(
        &mut a,
        &ma.public,
        vec![net(5, 505, proto::NetKind::Connect, psql, 0)],
    )
    .await;
    assert_ne!(r[0].verdict(), Verdict::Deny);
    let rc = qualify(&mut a, &[], vec![plain_conn]).await.remove(0);
    assert_ne!(rc.channel_id, 0, "{rc:?}");
    let mut acc = net(6, 506, proto::NetKind::Accept, postgres, 40001);
    acc.module_request.clear();
    let ra = qualify(&mut b, &[], vec![acc]).await.remove(0);
    assert_eq!(ra.channel_id, rc.channel_id);
    assert!(next_key(&mut sa).await.module_answer.is_empty());
    assert!(next_key(&mut sb).await.module_answer.is_empty());
}

/// The next `FileSets` push.
async fn next_file_sets(s: &mut Streaming<Push>) -> pb::FileSets {
    next_push(s, "file sets", |k| match k {
        push::Kind::FileSets(f) => Some(f),
        _ => None,
    })
    .await
}

/// The protected paths reach a module with a session as a sealed
/// `FileSetPaths` order (every path of the sets, in order, once), which
/// the module resolves itself (T-102); a stream without a session gets
/// the sets unsealed. Paths that would not fit one record are refused
/// when the admin names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_set_paths_are_sealed_orders() {
    use trustbind_appliance::store::FileSetEdit;
    let (app, mut c, m) = setup().await;
    let store = &app.api.store;
    let mut sealed = c
        .subscribe(Hello {
            agent_version: "t".into(),
            module_session: m.public.to_vec(),
            qualify_net: true,
            ..Hello::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut plain = c.subscribe(Hello::default()).await.unwrap().into_inner();
    // First, the empty sets: an empty order, sealed all the same.
    let f = next_file_sets(&mut sealed).await;
    let o = m.open(&f.module_order, &[0; 32]).unwrap();
    let Record::FileSetPaths(p) = proto::decode(&o.inner).unwrap().1 else {
        panic!("not FileSetPaths")
    };
    assert!(p.is_empty());
    let first_seq = o.seq;
    for (name, paths) in [
        (
            "pgdata",
            vec!["/srv/pgdata".to_owned(), "/etc/postgresql".to_owned()],
        ),
        (
            "logs",
            vec!["/var/log/app".to_owned(), "/srv/pgdata".to_owned()],
        ),
    ] {
        store
            .edit_file_set(name, FileSetEdit::Add, &paths, "admin:test")
            .unwrap();
    }
    let want: &[&[u8]] = &[b"/etc/postgresql", b"/srv/pgdata", b"/var/log/app"];
    let order = loop {
        let f = next_file_sets(&mut sealed).await;
        let o = m.open(&f.module_order, &[0; 32]).unwrap();
        assert!(o.seq > first_seq, "{} after {first_seq}", o.seq);
        let Record::FileSetPaths(p) = proto::decode(&o.inner).unwrap().1 else {
            panic!("not FileSetPaths")
        };
        if p.len() == 3 {
            let mut got: Vec<&[u8]> = p.iter().collect();
            let named: Vec<String> = module::paths_of(&f);
            assert_eq!(got, named.iter().map(|s| s.as_bytes()).collect::<Vec<_>>());
            got.sort();
            assert_eq!(got, want);
            break f.module_order;
        }
    };
    // Forged: one byte of a path changed, the seal no longer opens.
    let mut forged = order.clone();
    let n = forged.len();
    forged[n - 3] ^= 1;
    assert!(m.open(&forged, &[0; 32]).is_err());
    // Without a session: no order.
    loop {
        let f = next_file_sets(&mut plain).await;
        assert!(f.module_order.is_empty());
        if module::paths_of(&f).len() == 3 {
            break;
        }
    }
    // More path bytes than one sealed record holds: refused, nothing kept.
    let long: Vec<String> = (0..3)
        .map(|i| format!("/{i}{}", "x".repeat(3000)))
        .collect();
    let e = store
        .edit_file_set("big", FileSetEdit::Add, &long, "admin:test")
        .unwrap_err();
    assert!(e.to_string().contains("bytes of paths"), "{e}");
    assert!(store.file_set("big").unwrap().is_none());
}
