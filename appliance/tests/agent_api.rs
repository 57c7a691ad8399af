//! The agent service over real mutual TLS on 127.0.0.1, deciding with the
//! real policy engine over a real SQLite store: allow/deny round trips,
//! batches, obligations, permissive mode, strict refusal of malformed,
//! oversized and mistyped requests (nothing audited), pushes (generation
//! change, channel keys), revocation, idempotent Report, and the signed
//! offline bundle (re-decided under the current policy).

mod common;

use std::sync::Arc;

use common::{exec, start, Appliance};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use trustbind_appliance::agent_api::convert::channel_key_push;
use trustbind_appliance::agent_api::pb::agent_client::AgentClient;
use trustbind_appliance::agent_api::pb::{
    self, push, request::Target, Action, AuditBatch, AuditRecord, Hello, QualifyBatch, Verdict,
};
use trustbind_appliance::channels::{ChannelKey, ChannelTerms, Role};
use trustbind_appliance::store::{Mode, Publish, Signature};

const POLICY: &str = r#"
@id("exec-coreutils")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"coreutils");

@id("exec-tools-nice")
@nice("10")
@alert("soc")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"admin-tools");

@id("read-etc")
permit (principal, action == Trustbind::Action::"open_read", resource)
when { resource.path like "/etc/*" };
"#;

const LS: [u8; 32] = [0x11; 32];
const TOOL: [u8; 32] = [0x22; 32];
const UNKNOWN: [u8; 32] = [0x99; 32];

/// An appliance deciding with the engine over `POLICY`, and a client for
/// `web1` (group web, enforce).
async fn setup() -> (Appliance, AgentClient<Channel>) {
    setup_mode(Mode::Enforce).await
}

/// [`setup`], subscribed to the appliance's pushes.
async fn subscribed() -> (Appliance, AgentClient<Channel>, tonic::Streaming<pb::Push>) {
    let (app, mut client) = setup().await;
    let stream = client
        .subscribe(Hello::default())
        .await
        .unwrap()
        .into_inner();
    (app, client, stream)
}

async fn setup_mode(mode: Mode) -> (Appliance, AgentClient<Channel>) {
    let app = start_with_policy().await;
    let cfg = app.enrolled_in("web1", "web", mode).await;
    let client = app.agent_client(cfg).await.unwrap();
    (app, client)
}

/// An appliance whose decider is the real engine over the appliance's own
/// store, with `LS` in coreutils, `TOOL` in admin-tools and `POLICY` active.
async fn start_with_policy() -> Appliance {
    common::start_with_policy(POLICY, &[(LS, "coreutils"), (TOOL, "admin-tools")]).await
}

/// Activates a policy that allows nothing; returns the new generation.
fn activate_empty_policy(app: &Appliance) -> i64 {
    let store = &app.api.store;
    let id = store
        .create_policy_draft("// nothing allowed\n", "empty", "admin:test")
        .unwrap();
    store.activate_policy(id, "admin:test").unwrap().generation
}

/// A file request as the agent sends it: the program by its SHA-256 only
/// (no SHA-1, size or path: the PEM knows only the hash of a running
/// process's program).
fn open_read(id: u64, path: &str) -> pb::Request {
    let mut r = pb::Request {
        action: Action::OpenRead.into(),
        target: Some(Target::File(pb::FileTarget {
            path: path.into(),
            to: None,
            ..Default::default()
        })),
        ..exec(id, LS)
    };
    if let Some(p) = r.program.as_mut() {
        p.sha1.clear();
        p.size = 0;
        p.path.clear();
    }
    r
}

fn batch(requests: Vec<pb::Request>) -> QualifyBatch {
    QualifyBatch {
        requests,
        module_session: Vec::new(),
        module_version: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_round_trip_in_one_batch_and_are_audited() {
    let (app, mut client) = setup().await;
    let before = app.audit_count();
    let reply = client
        .qualify(batch(vec![
            exec(10, LS),
            exec(11, UNKNOWN),
            open_read(12, "/etc/hosts"),
            open_read(13, "/root/secret"),
        ]))
        .await
        .unwrap()
        .into_inner();
    let r = &reply.results;
    assert_eq!(r.len(), 4);
    assert_eq!(
        r.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![10, 11, 12, 13]
    );
    assert_eq!(r[0].verdict(), Verdict::Allow);
    assert_eq!(r[0].reasons, vec!["exec-coreutils".to_owned()]);
    assert_eq!(r[1].verdict(), Verdict::Deny);
    assert!(r[1].reasons.is_empty());
    assert_eq!(r[2].verdict(), Verdict::Allow);
    assert_eq!(r[2].reasons, vec!["read-etc".to_owned()]);
    assert_eq!(r[3].verdict(), Verdict::Deny);
    let generation = app.api.store.governing().unwrap().generation;
    assert!(r
        .iter()
        .all(|x| x.generation == app.api.store.generation_hint() && x.generation >= generation));
    assert!(r
        .iter()
        .all(|x| x.cacheable && !x.would_deny && x.channel_id == 0));

    // Four decision rows, by web1, with the request and the outcome.
    let rows = app.api.store.audit_rows(0, 10_000).unwrap();
    assert_eq!(rows.len(), before + 4);
    let decisions: Vec<_> = rows.iter().filter(|r| r.kind == "decision").collect();
    assert_eq!(decisions.len(), 4);
    assert!(decisions.iter().all(|r| r.actor == "web1"));
    let d: serde_json::Value = serde_json::from_str(&decisions[1].detail).unwrap();
    assert_eq!(d["id"], 11);
    assert_eq!(d["request"]["host"], "web1");
    assert_eq!(
        d["request"]["program"]["sha256"],
        trustbind_appliance::store::hex(&UNKNOWN)
    );
    assert_eq!(d["outcome"]["verdict"]["verdict"], "deny");
    assert!(app.api.store.verify_audit().unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obligations_are_delivered() {
    let (_app, mut client) = setup().await;
    let reply = client
        .qualify(batch(vec![exec(1, TOOL)]))
        .await
        .unwrap()
        .into_inner();
    let r = &reply.results[0];
    assert_eq!(r.verdict(), Verdict::AllowWithConditions);
    assert_eq!(r.obligations.get("nice").map(String::as_str), Some("10"));
    assert_eq!(r.obligations.get("alert").map(String::as_str), Some("soc"));
    assert_eq!(r.reasons, vec!["exec-tools-nice".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_host_gets_allow_with_would_deny() {
    let (_app, mut client) = setup_mode(Mode::Permissive).await;
    let reply = client
        .qualify(batch(vec![exec(1, UNKNOWN)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results[0].verdict(), Verdict::Allow);
    assert!(reply.results[0].would_deny);
}

/// Sends `b`, expects INVALID_ARGUMENT whose message contains `needle`, and
/// checks that nothing was audited.
async fn refused(
    app: &Appliance,
    client: &mut AgentClient<Channel>,
    b: QualifyBatch,
    needle: &str,
) {
    let before = app.audit_count();
    let err = client.qualify(b).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains(needle),
        "`{}` does not contain `{needle}`",
        err.message()
    );
    assert_eq!(
        app.audit_count(),
        before,
        "a refused batch wrote audit rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_naming_the_field_and_change_nothing() {
    let (app, mut client) = setup().await;
    let mut short = exec(2, LS);
    short.program.as_mut().unwrap().sha256.pop();
    refused(
        &app,
        &mut client,
        batch(vec![exec(1, LS), short]),
        "requests[1].program.sha256: expected 32 bytes, got 31",
    )
    .await;

    let mut sha1 = exec(1, LS);
    sha1.program.as_mut().unwrap().sha1 = vec![1; 19];
    refused(
        &app,
        &mut client,
        batch(vec![sha1]),
        "requests[0].program.sha1",
    )
    .await;

    let mut anc = exec(1, LS);
    anc.subject.as_mut().unwrap().ancestry.push(vec![1; 3]);
    refused(
        &app,
        &mut client,
        batch(vec![anc]),
        "requests[0].subject.ancestry[1]",
    )
    .await;

    let mut unknown_action = exec(1, LS);
    unknown_action.action = 99;
    refused(
        &app,
        &mut client,
        batch(vec![unknown_action]),
        "requests[0].action: unknown action 99",
    )
    .await;

    let mut unset = exec(1, LS);
    unset.action = 0;
    refused(
        &app,
        &mut client,
        batch(vec![unset]),
        "requests[0].action: not set",
    )
    .await;

    let mut no_subject = exec(1, LS);
    no_subject.subject = None;
    refused(
        &app,
        &mut client,
        batch(vec![no_subject]),
        "requests[0].subject: missing",
    )
    .await;

    let mut wrong_target = exec(1, LS);
    wrong_target.target = Some(Target::File(pb::FileTarget {
        path: "/x".into(),
        to: None,
        ..Default::default()
    }));
    refused(
        &app,
        &mut client,
        batch(vec![wrong_target]),
        "requests[0].target: exec needs a `exec` target",
    )
    .await;

    let mut connect = exec(1, LS);
    connect.action = Action::Connect.into();
    connect.target = Some(Target::Net(pb::NetTarget {
        proto: pb::Proto::Tcp.into(),
        src_addr: "10.0.0.1".into(),
        src_port: 70000,
        dst_addr: "10.0.0.2".into(),
        dst_port: 5432,
        established: false,
    }));
    refused(
        &app,
        &mut client,
        batch(vec![connect.clone()]),
        "requests[0].net.src_port: 70000 is not a port",
    )
    .await;
    if let Some(Target::Net(n)) = connect.target.as_mut() {
        n.src_port = 40000;
        n.dst_addr = "not-an-ip".into();
    }
    refused(
        &app,
        &mut client,
        batch(vec![connect.clone()]),
        "requests[0].net.dst_addr: `not-an-ip` is not an IP address",
    )
    .await;
    let mut accept = connect;
    accept.action = Action::Accept.into();
    if let Some(Target::Net(n)) = accept.target.as_mut() {
        n.dst_addr = "10.0.0.2".into();
        n.established = true;
    }
    refused(
        &app,
        &mut client,
        batch(vec![accept]),
        "requests[0].net.established: only for connect",
    )
    .await;

    let mut rename = open_read(1, "/etc/a");
    rename.action = Action::Rename.into();
    refused(
        &app,
        &mut client,
        batch(vec![rename]),
        "requests[0].file.to: missing",
    )
    .await;

    refused(
        &app,
        &mut client,
        batch(vec![open_read(1, "etc/a")]),
        "requests[0].file.path: not an absolute path",
    )
    .await;
    let mut create_read = open_read(1, "/etc/a");
    if let Some(Target::File(f)) = create_read.target.as_mut() {
        f.create = true;
    }
    refused(
        &app,
        &mut client,
        batch(vec![create_read]),
        "requests[0].file.create: only for open_write",
    )
    .await;
    let mut link = open_read(1, "/etc/a");
    link.action = Action::OpenWrite.into();
    if let Some(Target::File(f)) = link.target.as_mut() {
        f.link = true;
    }
    refused(
        &app,
        &mut client,
        batch(vec![link.clone()]),
        "requests[0].file.to: missing",
    )
    .await;
    if let Some(Target::File(f)) = link.target.as_mut() {
        f.link = false;
        f.to = Some("/tmp/b".into());
    }
    refused(
        &app,
        &mut client,
        batch(vec![link]),
        "requests[0].file.to: only for rename and open_write with link",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batches_are_refused_and_change_nothing() {
    let (app, mut client) = setup().await;
    let many: Vec<_> = (0..257).map(|i| exec(i, LS)).collect();
    refused(
        &app,
        &mut client,
        batch(many),
        "requests: 257 in one batch, at most 256",
    )
    .await;

    let long = "/".repeat(4096);
    let big: Vec<_> = (0..256)
        .map(|i| {
            let mut r = open_read(i, &long);
            r.program.as_mut().unwrap().path = long.clone();
            r
        })
        .collect();
    refused(&app, &mut client, batch(big), "bytes, at most 1048576").await;

    let mut too_long = open_read(1, &"/".repeat(4097));
    too_long.id = 5;
    refused(
        &app,
        &mut client,
        batch(vec![too_long]),
        "requests[0].file.path: 4097 bytes, at most 4096",
    )
    .await;

    // Beyond the transport limit tonic itself refuses; still nothing stored.
    let before = app.audit_count();
    let huge = pb::Request {
        program: Some(pb::Program {
            sha256: vec![0; 32],
            sha1: vec![0; 20],
            size: 0,
            path: "x".repeat(5 * 1024 * 1024),
            package: String::new(),
        }),
        ..exec(1, LS)
    };
    let err = client.qualify(batch(vec![huge])).await.unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    assert_eq!(app.audit_count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_change_is_pushed_on_the_stream() {
    let (app, mut client) = setup().await;
    let mut stream = client
        .subscribe(Hello {
            agent_version: "test".into(),
            generation: 0,
            module_session: Vec::new(),
            qualify_net: false,
            verdict_timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        stream.next().await.unwrap().unwrap().kind,
        Some(push::Kind::HostMode(_))
    ));
    let g0 = match stream.next().await.unwrap().unwrap().kind {
        Some(push::Kind::Generation(g)) => g.generation,
        other => panic!("first push is {other:?}"),
    };
    assert_eq!(g0, app.api.store.governing().unwrap().generation);
    // Then the protected hosts' addresses: this agent's, as the appliance
    // saw it.
    match stream.next().await.unwrap().unwrap().kind {
        Some(push::Kind::Peers(p)) => assert_eq!(p.addrs, vec!["127.0.0.1".to_owned()]),
        other => panic!("third push is {other:?}"),
    }
    // Then the protected file sets (none yet).
    match stream.next().await.unwrap().unwrap().kind {
        Some(push::Kind::FileSets(f)) => assert!(f.sets.is_empty(), "{f:?}"),
        other => panic!("fourth push is {other:?}"),
    }
    let g1 = activate_empty_policy(&app);
    assert!(g1 > g0);
    loop {
        match stream.next().await.unwrap().unwrap().kind {
            // A change made just before subscribing may be announced
            // after the first push: the same generation again is fine.
            Some(push::Kind::Generation(g)) if g.generation == g0 => {}
            Some(push::Kind::Generation(g)) => {
                assert_eq!(g.generation, g1);
                break;
            }
            Some(
                push::Kind::Ping(_)
                | push::Kind::HostMode(_)
                | push::Kind::Peers(_)
                | push::Kind::FileSets(_),
            ) => {}
            other => panic!("unexpected push {other:?}"),
        }
    }
    // And decisions now run under the new generation: everything denied.
    let reply = client
        .qualify(batch(vec![exec(1, LS)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results[0].verdict(), Verdict::Deny);
    assert_eq!(reply.results[0].generation, g1);
}

/// A bulk import approving a program the host was denied defers the
/// generation move; the appliance's generation watcher makes it once the
/// import is quiet, and pushes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_approvals_are_pushed_once_the_import_is_quiet() {
    let (app, mut client, mut stream) = subscribed().await;
    let new = [0x77; 32];
    let reply = client
        .qualify(batch(vec![exec(1, new)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results[0].verdict(), Verdict::Deny);
    let g0 = reply.results[0].generation;
    let hex = trustbind_appliance::store::hex(&new);
    let s = Signature {
        sha256: hex,
        sha1: None,
        size: 1,
        name: "new".into(),
        source: "test".into(),
    };
    let store = &app.api.store;
    store
        .put_signatures_with(&[s], Some("coreutils"), "admin:test", Publish::Deferred)
        .unwrap();
    assert_eq!(store.governing().unwrap().generation, g0);
    let t = std::time::Instant::now();
    let pushed = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            if let Some(push::Kind::Generation(g)) = stream.next().await.unwrap().unwrap().kind {
                if g.generation > g0 {
                    return g.generation;
                }
            }
        }
    })
    .await
    .expect("no generation push after the deferred approval");
    assert_eq!(pushed, g0 + 1);
    // Not before the import went quiet.
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(1_500),
        "{:?}",
        t.elapsed()
    );
    let reply = client
        .qualify(batch(vec![exec(2, new)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results[0].verdict(), Verdict::Allow);
    assert_eq!(reply.results[0].generation, g0 + 1);
}

/// The next push that is not a generation announcement, host mode or ping
/// (those may arrive at any time: enrolling a host moves the generation).
async fn next_other(s: &mut tonic::Streaming<pb::Push>) -> Option<push::Kind> {
    loop {
        match s.next().await.unwrap().unwrap().kind {
            Some(
                push::Kind::Generation(_)
                | push::Kind::Ping(_)
                | push::Kind::HostMode(_)
                | push::Kind::Peers(_)
                | push::Kind::FileSets(_),
            ) => {}
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_keys_reach_both_hosts_crossed() {
    let (app, mut a) = setup().await;
    let cfg_b = app.enrolled_in("db1", "db", Mode::Enforce).await;
    let mut b = app.agent_client(cfg_b).await.unwrap();
    let mut sa = a.subscribe(Hello::default()).await.unwrap().into_inner();
    let mut sb = b.subscribe(Hello::default()).await.unwrap().into_inner();
    sa.next().await.unwrap().unwrap();
    sb.next().await.unwrap().unwrap();

    let key = ChannelKey::generate().unwrap();
    assert!(app.api.hub.push(
        "web1",
        channel_key_push(7, &key, Role::Connect, ChannelTerms::default())
    ));
    assert!(app.api.hub.push(
        "db1",
        channel_key_push(7, &key, Role::Accept, ChannelTerms::default())
    ));
    assert!(!app.api.hub.push(
        "nobody",
        channel_key_push(7, &key, Role::Accept, ChannelTerms::default())
    ));
    let ka = match next_other(&mut sa).await {
        Some(push::Kind::ChannelKey(k)) => k,
        other => panic!("{other:?}"),
    };
    let kb = match next_other(&mut sb).await {
        Some(push::Kind::ChannelKey(k)) => k,
        other => panic!("{other:?}"),
    };
    assert_eq!(ka.channel_id, 7);
    assert_eq!(ka.key_id, key.key_id);
    assert_eq!(ka.key, kb.key);
    assert_eq!(ka.key.len(), 32);
    assert_eq!((ka.tx_iv.len(), ka.tx_salt.len()), (8, 4));
    assert_eq!(ka.tx_iv, kb.rx_iv);
    assert_eq!(ka.tx_salt, kb.rx_salt);
    assert_eq!(ka.rx_iv, kb.tx_iv);
    assert_ne!(ka.tx_salt, ka.rx_salt);
    assert_eq!(ka.role(), pb::ChannelRole::Connect);
    assert_eq!(kb.role(), pb::ChannelRole::Accept);

    // Broadcast reaches both.
    assert_eq!(
        app.api
            .hub
            .broadcast(push::Kind::ChannelDenied(pb::ChannelDenied {
                channel_id: 8,
                reason: "test".into()
            })),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_host_stream_ends_and_qualify_is_refused() {
    let (app, mut client, mut stream) = subscribed().await;
    stream.next().await.unwrap().unwrap();
    app.api.revoke_host("web1", "admin:test").unwrap();
    let mut saw_revoked = false;
    while let Some(m) = stream.next().await {
        if let Some(push::Kind::Revoked(_)) = m.unwrap().kind {
            saw_revoked = true;
        }
    }
    assert!(saw_revoked);
    let before = app.audit_count();
    let err = client.qualify(batch(vec![exec(1, LS)])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(app.audit_count(), before);
}

fn record(id: &str, what: &str) -> AuditRecord {
    AuditRecord {
        id: id.into(),
        at_ms: 1_700_000_000_000,
        what: what.into(),
        detail_json: r#"{"path":"/usr/bin/nc","verdict":"deny"}"#.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_is_idempotent_and_audited_as_agent_kinds() {
    let (app, mut client) = setup().await;
    let r = client
        .report(AuditBatch {
            records: vec![
                record("boot1:1", "offline_deny"),
                record("boot1:2", "offline_allow"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.stored, r.duplicates), (2, 0));
    let r = client
        .report(AuditBatch {
            records: vec![
                record("boot1:2", "offline_allow"),
                record("boot1:1", "offline_deny"),
                record("boot1:3", "offline_deny"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.stored, r.duplicates), (1, 2));
    let rows = app.api.store.audit_rows(0, 10_000).unwrap();
    let agent: Vec<_> = rows
        .iter()
        .filter(|r| r.kind.starts_with("agent."))
        .collect();
    assert_eq!(agent.len(), 3);
    assert_eq!(
        agent.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(),
        vec![
            "agent.offline_deny",
            "agent.offline_allow",
            "agent.offline_deny"
        ]
    );
    assert!(agent.iter().all(|r| r.actor == "web1"));
    let d: serde_json::Value = serde_json::from_str(&agent[0].detail).unwrap();
    assert_eq!(d["report_id"], "boot1:1");
    assert_eq!(d["host_at_ms"], 1_700_000_000_000_i64);
    assert_eq!(d["detail"]["path"], "/usr/bin/nc");

    // Malformed records are refused whole, naming the field.
    let before = app.audit_count();
    let mut bad = record("boot1:9", "Bad Kind");
    let err = client
        .report(AuditBatch {
            records: vec![record("boot1:8", "ok"), bad.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("records[1].what"), "{err:?}");
    bad.what = "ok".into();
    bad.detail_json = "[1,2]".into();
    let err = client
        .report(AuditBatch { records: vec![bad] })
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("records[0].detail_json: must be a JSON object"),
        "{err:?}"
    );
    assert_eq!(app.audit_count(), before);
}

/// Holds every decision until the test opens the gate.
struct Gated(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

impl trustbind_appliance::agent_api::Decider for Gated {
    fn decide(
        &self,
        _r: &trustbind_appliance::request::QualifyRequest,
    ) -> Result<trustbind_appliance::agent_api::Answer, trustbind_appliance::agent_api::DecideError>
    {
        let _ = self.0.lock().unwrap().recv();
        Ok(trustbind_appliance::agent_api::Answer {
            outcome: trustbind_appliance::policy::Outcome::bare(
                trustbind_appliance::policy::Verdict::Allow,
            ),
            generation: 0,
            cacheable: false,
            channel_id: None,
            cache_hit: false,
            mode: None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_deadline_is_honoured() {
    let (gate, rx) = std::sync::mpsc::channel();
    let app = start(Arc::new(Gated(std::sync::Mutex::new(rx)))).await;
    let cfg = app.enrolled("web1").await;
    let mut client = app.agent_client(cfg).await.unwrap();
    let mut req = tonic::Request::new(batch(vec![exec(1, LS)]));
    req.set_timeout(std::time::Duration::from_millis(300));
    let err = client.qualify(req).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    // Once decisions flow again, calls with time left are answered.
    gate.send(()).unwrap();
    gate.send(()).unwrap();
    let reply = client
        .qualify(batch(vec![exec(2, LS)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results[0].id, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_mode_is_pushed_first_and_on_change() {
    let (app, _client, mut stream) = subscribed().await;
    assert_eq!(
        stream.next().await.unwrap().unwrap().kind,
        Some(push::Kind::HostMode(pb::HostMode {
            mode: "enforce".into(),
            module_order: Vec::new(),
        }))
    );
    app.api
        .store
        .set_host_group("web", Mode::Permissive, "admin:test")
        .unwrap();
    loop {
        match stream.next().await.unwrap().unwrap().kind {
            Some(push::Kind::HostMode(m)) if m.mode == "permissive" => break,
            Some(push::Kind::HostMode(m)) => assert_eq!(m.mode, "enforce"),
            Some(
                push::Kind::Generation(_)
                | push::Kind::Ping(_)
                | push::Kind::Peers(_)
                | push::Kind::FileSets(_),
            ) => {}
            other => panic!("unexpected push {other:?}"),
        }
    }
}

fn bundle_entry(sha: [u8; 32], user: &str) -> pb::BundleEntry {
    pb::BundleEntry {
        sha256: sha.to_vec(),
        user: user.into(),
    }
}

/// Checks the signature as an agent does and returns the payload.
fn verified_payload(app: &Appliance, b: &pb::SignedBundle) -> pb::BundlePayload {
    use prost::Message as _;
    use rustls::pki_types::pem::PemObject;
    let signer =
        rustls::pki_types::CertificateDer::from_pem_slice(b.signer_cert_pem.as_bytes()).unwrap();
    let info = trustbind_appliance::pki::peer_cert(signer.as_ref()).unwrap();
    assert_eq!(info.kind, trustbind_appliance::pki::CertKind::Server);
    assert_eq!(info.serial, app.api.pki.server_serial());
    let ca = app.api.pki.ca_der().clone();
    let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
    let ee = webpki::EndEntityCert::try_from(&signer).unwrap();
    ee.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &[anchor],
        &[],
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .unwrap();
    ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, &b.payload, &b.signature)
        .unwrap();
    let mut flipped = b.payload.clone();
    flipped[3] ^= 1;
    assert!(ee
        .verify_signature(webpki::ring::ECDSA_P256_SHA256, &flipped, &b.signature)
        .is_err());
    pb::BundlePayload::decode(b.payload.as_slice()).unwrap()
}

fn verdicts(p: &pb::BundlePayload) -> Vec<([u8; 32], String, Verdict)> {
    p.entries
        .iter()
        .map(|e| {
            (
                e.sha256.as_slice().try_into().unwrap(),
                e.user.clone(),
                Verdict::try_from(e.verdict).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_bundle_is_redecided_under_the_current_policy() {
    let (app, mut client) = setup().await;
    let ask = pb::BundleRequest {
        entries: vec![
            bundle_entry(UNKNOWN, "alice"),
            bundle_entry(LS, "alice"),
            // With conditions (nice): never in a bundle.
            bundle_entry(TOOL, "alice"),
            bundle_entry(LS, "alice"),
        ],
    };
    let b = client.sign_bundle(ask.clone()).await.unwrap().into_inner();
    let p = verified_payload(&app, &b);
    assert_eq!(p.version, 1);
    assert_eq!(p.host, "web1");
    let g0 = app.api.store.governing().unwrap().generation;
    assert_eq!(p.generation, g0);
    assert_eq!(p.expires_at_ms - p.issued_at_ms, 24 * 3600 * 1000);
    // Sorted, de-duplicated, conditions left out.
    assert_eq!(
        verdicts(&p),
        vec![
            (LS, "alice".into(), Verdict::Allow),
            (UNKNOWN, "alice".into(), Verdict::Deny),
        ]
    );

    // A new policy allows nothing: the same pairs now come back denied.
    let g1 = activate_empty_policy(&app);
    let b = client.sign_bundle(ask).await.unwrap().into_inner();
    let p = verified_payload(&app, &b);
    assert_eq!(p.generation, g1);
    assert_eq!(
        verdicts(&p),
        vec![
            (LS, "alice".into(), Verdict::Deny),
            (TOOL, "alice".into(), Verdict::Deny),
            (UNKNOWN, "alice".into(), Verdict::Deny),
        ]
    );
    let signs = app
        .api
        .store
        .audit_rows(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "bundle.sign" && r.actor == "web1")
        .count();
    assert_eq!(signs, 2);
    // Re-deciding is no decision: nothing of kind `decision` was recorded.
    assert!(!app
        .api
        .store
        .audit_rows(0, 10_000)
        .unwrap()
        .iter()
        .any(|r| r.kind == "decision"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_malformed_bundle_requests_are_refused() {
    let (_app, mut client) = setup().await;
    let too_many = pb::BundleRequest {
        entries: (0..=4096_u32)
            .map(|i| {
                let mut sha = [0_u8; 32];
                sha[..4].copy_from_slice(&i.to_be_bytes());
                bundle_entry(sha, "alice")
            })
            .collect(),
    };
    let e = client.sign_bundle(too_many).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("at most 4096"), "{e:?}");
    let bad = pb::BundleRequest {
        entries: vec![pb::BundleEntry {
            sha256: vec![1; 31],
            user: "alice".into(),
        }],
    };
    let e = client.sign_bundle(bad).await.unwrap_err();
    assert!(e.message().contains("entries[0].sha256"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_verdicts_are_the_policys_whatever_the_mode() {
    let (app, mut client) = setup_mode(Mode::Permissive).await;
    let ask = pb::BundleRequest {
        entries: vec![bundle_entry(LS, "alice"), bundle_entry(UNKNOWN, "alice")],
    };
    let b = client.sign_bundle(ask.clone()).await.unwrap().into_inner();
    // Permissive: the unknown program would be denied, so DENY.
    assert_eq!(
        verdicts(&verified_payload(&app, &b)),
        vec![
            (LS, "alice".into(), Verdict::Allow),
            (UNKNOWN, "alice".into(), Verdict::Deny),
        ]
    );
    // Disabled: nothing.
    app.api
        .store
        .set_host_group("web", Mode::Disabled, "admin:test")
        .unwrap();
    let b = client.sign_bundle(ask).await.unwrap().into_inner();
    assert!(verified_payload(&app, &b).entries.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_cannot_report_past_its_quota() {
    let (app, mut client) = setup().await;
    // Records of 60 kB each: about 3.8 MB a batch.
    let big = |batch: usize, i: usize| AuditRecord {
        id: format!("flood:{batch}:{i}"),
        at_ms: 1_700_000_000_000,
        what: "offline_deny".into(),
        detail_json: format!(r#"{{"pad":"{}"}}"#, "x".repeat(60_000)),
    };
    let batch = |b: usize| AuditBatch {
        records: (0..62).map(|i| big(b, i)).collect(),
    };
    client.report(batch(0)).await.unwrap();
    let m = trustbind_appliance::metrics::metrics();
    let before = m.refused("report_quota");
    let e = client.report(batch(1)).await.unwrap_err();
    assert!(m.refused("report_quota") > before);
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("report quota of host `web1`"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("retry in"), "{}", e.message());
    // Nothing of the refused batch was stored.
    let stored = app
        .api
        .store
        .audit_rows(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.detail.contains("flood:1:"))
        .count();
    assert_eq!(stored, 0);
    // Small reports of another host go through.
    let cfg = app.enrolled("web2").await;
    let mut other = app.agent_client(cfg).await.unwrap();
    other
        .report(AuditBatch {
            records: vec![record("web2:1", "offline_deny")],
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_bundle_is_rate_limited_per_host() {
    let (app, mut client) = setup().await;
    let ask = pb::BundleRequest {
        entries: vec![bundle_entry(LS, "alice")],
    };
    for _ in 0..3 {
        client.sign_bundle(ask.clone()).await.unwrap();
    }
    let m = trustbind_appliance::metrics::metrics();
    let before = m.refused("bundle_quota");
    let e = client.sign_bundle(ask.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("SignBundle quota"), "{}", e.message());
    assert!(m.refused("bundle_quota") > before);
    let signed = app
        .api
        .store
        .audit_rows(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "bundle.sign")
        .count();
    assert_eq!(signed, 3);
    // Another host has its own allowance.
    let cfg = app.enrolled("web2").await;
    let mut other = app.agent_client(cfg).await.unwrap();
    other.sign_bundle(ask).await.unwrap();
}

/// The protected file sets are the fourth push of every stream and are
/// pushed to every subscribed agent once per change (a change that alters
/// nothing pushes nothing and keeps the generation); each change moves the
/// generation once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sets_are_pushed_first_and_once_per_change() {
    use trustbind_appliance::store::FileSetEdit;
    let (app, _client, mut stream) = subscribed().await;
    let store = &app.api.store;
    let mut pushes = Vec::new();
    for _ in 0..4 {
        pushes.push(stream.next().await.unwrap().unwrap().kind);
    }
    assert!(
        matches!(&pushes[3], Some(push::Kind::FileSets(f)) if f.sets.is_empty()),
        "{pushes:?}"
    );
    let g0 = store.governing().unwrap().generation;
    store
        .edit_file_set(
            "pgdata",
            FileSetEdit::Add,
            &["/srv/pgdata".into(), "/etc/postgresql".into()],
            "admin:test",
        )
        .unwrap();
    assert_eq!(store.governing().unwrap().generation, g0 + 1);
    // The same paths again: nothing changes, nothing moves.
    store
        .edit_file_set(
            "pgdata",
            FileSetEdit::Add,
            &["/srv/pgdata".into()],
            "admin:test",
        )
        .unwrap();
    assert_eq!(store.governing().unwrap().generation, g0 + 1);
    // Collect what the stream gets for a while (the watch polls every
    // 200 ms): exactly one FileSets, with the new set.
    let mut sets = Vec::new();
    let mut generations = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_millis(1500), async {
        loop {
            match stream.next().await.unwrap().unwrap().kind {
                Some(push::Kind::FileSets(f)) => sets.push(f),
                Some(push::Kind::Generation(g)) => generations.push(g.generation),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_eq!(
        sets[0].sets,
        vec![pb::FileSet {
            name: "pgdata".into(),
            paths: vec!["/etc/postgresql".into(), "/srv/pgdata".into()],
        }]
    );
    assert!(generations.contains(&(g0 + 1)), "{generations:?}");
    // A new subscriber gets the sets among its first pushes.
    let cfg = app.enrolled_in("web2", "web", Mode::Enforce).await;
    let mut c2 = app.agent_client(cfg).await.unwrap();
    let mut s2 = c2.subscribe(Hello::default()).await.unwrap().into_inner();
    let mut got = None;
    for _ in 0..4 {
        if let Some(push::Kind::FileSets(f)) = s2.next().await.unwrap().unwrap().kind {
            got = Some(f);
        }
    }
    assert_eq!(
        got.expect("no FileSets among the first pushes").sets,
        sets[0].sets
    );
}

/// A file decision over the wire: the file's sets decide, the flags reach
/// the policy, and every answer is audited with its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_decisions_follow_the_sets_and_are_audited() {
    use trustbind_appliance::store::FileSetEdit;
    let (app, mut client) = setup().await;
    let store = &app.api.store;
    let id = store
        .create_policy_draft(
            r#"
@id("coreutils-read-pgdata")
permit (principal, action == Trustbind::Action::"open_read", resource in Trustbind::FileSet::"pgdata")
when { context.program in Trustbind::ProgramGroup::"coreutils" };
@id("coreutils-write-pgdata-no-truncate")
permit (principal, action == Trustbind::Action::"open_write", resource in Trustbind::FileSet::"pgdata")
when { context.program in Trustbind::ProgramGroup::"coreutils" && !context.truncate };
"#,
            "files",
            "admin:test",
        )
        .unwrap();
    store.activate_policy(id, "admin:test").unwrap();
    store
        .edit_file_set(
            "pgdata",
            FileSetEdit::Add,
            &["/srv/pgdata".into()],
            "admin:test",
        )
        .unwrap();
    let write = |id: u64, truncate: bool| pb::Request {
        action: Action::OpenWrite.into(),
        target: Some(Target::File(pb::FileTarget {
            path: "/srv/pgdata/base/1".into(),
            truncate,
            ..Default::default()
        })),
        ..exec(id, LS)
    };
    let before = app.audit_count();
    let reply = client
        .qualify(batch(vec![
            open_read(1, "/srv/pgdata/base/1"),
            open_read(2, "/srv/pgdatabase"),
            write(3, false),
            write(4, true),
        ]))
        .await
        .unwrap()
        .into_inner();
    let verdicts: Vec<_> = reply.results.iter().map(|r| r.verdict()).collect();
    assert_eq!(
        verdicts,
        [Verdict::Allow, Verdict::Deny, Verdict::Allow, Verdict::Deny]
    );
    // A policy reading `truncate` may not be cached by the module.
    assert!(!reply.results[2].cacheable);
    assert_eq!(app.audit_count(), before + 4);
    let rows = store.audit_rows(0, 10_000).unwrap();
    let last: Vec<serde_json::Value> = rows[rows.len() - 4..]
        .iter()
        .map(|r| serde_json::from_str(&r.detail).unwrap())
        .collect();
    assert_eq!(last[3]["request"]["target"]["truncate"], true);
    assert_eq!(last[3]["request"]["target"]["path"], "/srv/pgdata/base/1");
    assert_eq!(
        last[3]["outcome"]["verdict"]["verdict"], "deny",
        "{}",
        last[3]
    );
}
