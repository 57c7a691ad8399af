//! Learning mode: the observed programs recorded from real `Qualify` calls
//! (permissive hosts: every exec; enforcing hosts: refusals), the caps, and
//! approvals (audited, a dry run changes nothing, unknown groups refused).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{exec, sig, start_with, Appliance};
use trustbind_appliance::agent_api::pb;
use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::store::observed::{PATH_MAX, PER_HOST, TOTAL};
use trustbind_appliance::store::{
    hex, Mode, Observation, ObservedFilter, ObservedState, Seen, Store, StoreError,
};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");
const POLICY: &str = r#"
@id("system-programs")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"system");
"#;

const LS: [u8; 32] = [0x11; 32];
const APP: [u8; 32] = [0x22; 32];
const TOOL: [u8; 32] = [0x33; 32];

/// An appliance deciding with the real engine: `LS` in `system`, the
/// policy above active, reference group `app` existing (empty).
async fn start() -> Appliance {
    start_with(|store, _| {
        sig(&store, LS, "system");
        store.create_group("app", "", "admin:test").unwrap();
        let id = store
            .create_policy_draft(POLICY, "test", "admin:test")
            .unwrap();
        store.activate_policy(id, "admin:test").unwrap();
        Arc::new(Engine::new(store, SCHEMA).unwrap())
    })
    .await
}

/// `user` runs `sha` at `path`, the agent naming `package`.
fn run(id: u64, sha: [u8; 32], user: &str, path: &str, package: &str) -> pb::Request {
    let mut r = exec(id, sha);
    r.subject = Some(common::subject(user));
    let p = r.program.as_mut().unwrap();
    p.path = path.into();
    p.package = package.into();
    r
}

async fn qualify(
    client: &mut pb::agent_client::AgentClient<tonic::transport::Channel>,
    requests: Vec<pb::Request>,
) -> Vec<pb::Result> {
    common::qualify_all(client, requests).await
}

fn all(store: &Store) -> Vec<trustbind_appliance::store::ObservedRow> {
    let f = ObservedFilter {
        state: ObservedState::All,
        ..ObservedFilter::default()
    };
    store.observed(&f, 0, 1000).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_decisions_of_permissive_hosts_and_refusals_become_observed_rows() {
    let app = start().await;
    let p = app.enrolled_in("stage1", "staging", Mode::Permissive).await;
    let e = app.enrolled_in("prod1", "prod", Mode::Enforce).await;
    let mut stage = app.agent_client(p).await.unwrap();
    let mut prod = app.agent_client(e).await.unwrap();

    let r = qualify(
        &mut stage,
        vec![
            run(1, LS, "bob", "/usr/bin/ls", "coreutils"),
            run(2, APP, "bob", "/opt/app/run", ""),
            run(3, APP, "alice", "/opt/app/run", ""),
        ],
    )
    .await;
    assert!(r.iter().all(|r| r.verdict() == pb::Verdict::Allow));
    assert!(!r[0].would_deny && r[1].would_deny && r[2].would_deny);
    let r = qualify(
        &mut prod,
        vec![
            run(4, LS, "bob", "/usr/bin/ls", "coreutils"),
            run(5, APP, "carol", "/srv/app/run", ""),
        ],
    )
    .await;
    assert_eq!(r[0].verdict(), pb::Verdict::Allow);
    assert_eq!(r[1].verdict(), pb::Verdict::Deny);

    // Every decision is audited before its reply; the observations are
    // written by the recorder's flush (every second, or now).
    let decisions = app
        .api
        .store
        .audit_rows(0, 1000)
        .unwrap()
        .iter()
        .filter(|r| r.kind == "decision")
        .count();
    assert_eq!(decisions, 5);
    app.api.learn.flush().unwrap();

    let rows = all(&app.api.store);
    let find = |host: &str, path: &str| {
        rows.iter()
            .find(|r| r.seen.host == host && r.seen.path == path)
            .unwrap_or_else(|| panic!("no row {host} {path}: {rows:?}"))
    };
    let ls = find("stage1", "/usr/bin/ls");
    assert_eq!(ls.seen.verdict, Seen::Allowed);
    assert_eq!(ls.seen.package.as_deref(), Some("coreutils"));
    assert_eq!(ls.seen.sha1.as_deref(), Some(&*"01".repeat(20)));
    let app_row = find("stage1", "/opt/app/run");
    assert_eq!(app_row.seen.sha256, hex(&APP));
    assert_eq!(app_row.seen.verdict, Seen::WouldDeny);
    assert_eq!(app_row.seen.mode, Mode::Permissive);
    assert_eq!(app_row.seen.count, 2);
    assert_eq!(
        app_row.seen.users.iter().collect::<Vec<_>>(),
        ["alice", "bob"]
    );
    assert_eq!(app_row.seen.package, None);
    // The enforcing host: its refusal only, marked denied.
    let refused = find("prod1", "/srv/app/run");
    assert_eq!(
        (refused.seen.verdict, refused.seen.mode),
        (Seen::Denied, Mode::Enforce)
    );
    assert!(!rows
        .iter()
        .any(|r| r.seen.host == "prod1" && r.seen.path == "/usr/bin/ls"));
    assert_eq!(rows.len(), 3, "{rows:?}");

    // Pending (the default listing): not allowed the last time, not approved.
    let pending = app
        .api
        .store
        .observed(&ObservedFilter::default(), 0, 1000)
        .unwrap();
    let paths: BTreeSet<_> = pending.iter().map(|r| r.seen.path.as_str()).collect();
    assert_eq!(paths, BTreeSet::from(["/opt/app/run", "/srv/app/run"]));

    // The same program again: one row updated, its count added.
    qualify(&mut stage, vec![run(6, APP, "dave", "/opt/app/run", "")]).await;
    app.api.learn.flush().unwrap();
    let again = all(&app.api.store);
    let row = again
        .iter()
        .find(|r| r.seen.host == "stage1" && r.seen.path == "/opt/app/run")
        .unwrap();
    assert_eq!(again.len(), 3);
    assert_eq!(row.seen.count, 3);
    assert_eq!(
        row.seen.users.iter().collect::<Vec<_>>(),
        ["alice", "bob", "dave"]
    );
    assert!(row.seen.last_ms >= app_row.seen.last_ms);
    assert_eq!(row.seen.first_ms, app_row.seen.first_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_package_name_is_refused_naming_the_field() {
    let app = start().await;
    let p = app.enrolled_in("stage1", "staging", Mode::Permissive).await;
    let mut stage = app.agent_client(p).await.unwrap();
    for bad in ["Coreutils", "-x", &"a".repeat(129), "core utils"] {
        let err = stage
            .qualify(pb::QualifyBatch {
                requests: vec![run(1, APP, "bob", "/opt/app/run", bad)],
                module_session: Vec::new(),
                module_version: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("requests[0].program.package"),
            "{}",
            err.message()
        );
    }
    app.api.learn.flush().unwrap();
    assert!(all(&app.api.store).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approving_puts_the_programs_in_the_group_audited_and_enforce_then_allows_them() {
    let app = start().await;
    let store = Arc::clone(&app.api.store);
    // `system` is what the policy permits; approve into it.
    let p = app.enrolled_in("stage1", "staging", Mode::Permissive).await;
    let mut stage = app.agent_client(p).await.unwrap();
    qualify(
        &mut stage,
        vec![
            run(1, APP, "bob", "/opt/app/run", ""),
            run(2, TOOL, "bob", "/opt/app/bin/tool", ""),
            run(3, [0x44; 32], "bob", "/opt/apple/x", ""),
            run(4, [0x55; 32], "bob", "/usr/bin/id", "coreutils"),
        ],
    )
    .await;
    app.api.learn.flush().unwrap();
    let f = ObservedFilter {
        path_prefix: Some("/opt/app".into()),
        ..ObservedFilter::default()
    };

    // Unknown group: refused, nothing changes.
    let head = store.audit_head().unwrap();
    let err = store
        .approve_observed(&f, &[], "nosuch", "admin:alice", false)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { what: "group", .. }),
        "{err}"
    );
    let err = store
        .approve_observed(&f, &[], "nosuch", "admin:alice", true)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { what: "group", .. }),
        "{err}"
    );

    // Dry run: the selection and the counts, nothing written.
    let members = |g: &str| {
        store
            .list_signatures(Some(g), "", 1000)
            .unwrap()
            .into_iter()
            .map(|s| s.sha256)
            .collect::<BTreeSet<_>>()
    };
    let before = (members("system"), all(&store), store.governing().unwrap());
    let dry = store
        .approve_observed(&f, &[], "system", "admin:alice", true)
        .unwrap();
    assert!(dry.dry_run);
    let paths: Vec<_> = dry.programs.iter().map(|p| p.path.as_str()).collect();
    // `/opt/apple` is not below `/opt/app`.
    assert_eq!(paths, ["/opt/app/bin/tool", "/opt/app/run"]);
    assert_eq!((dry.inserted, dry.added_to_group, dry.rows), (2, 2, 2));
    assert_eq!(store.audit_head().unwrap(), head);
    assert_eq!(
        (members("system"), all(&store), store.governing().unwrap()),
        before
    );

    // The approval: signatures, membership, rows marked, one audit row.
    let done = store
        .approve_observed(&f, &[], "system", "admin:alice", false)
        .unwrap();
    assert!(!done.dry_run);
    assert_eq!((done.inserted, done.added_to_group, done.rows), (2, 2, 2));
    assert!(members("system").contains(&hex(&APP)));
    assert!(members("system").contains(&hex(&TOOL)));
    let sig = store.signature(&hex(&APP)).unwrap().unwrap();
    assert_eq!(sig.name, "/opt/app/run");
    assert_eq!(sig.source, "trustbind learn");
    assert_eq!(sig.sha1.as_deref(), Some(&*"01".repeat(20)));
    let rows = all(&store);
    let run_row = rows.iter().find(|r| r.seen.path == "/opt/app/run").unwrap();
    assert_eq!(run_row.approved_group.as_deref(), Some("system"));
    assert_eq!(run_row.approved_by.as_deref(), Some("admin:alice"));
    assert!(rows
        .iter()
        .filter(|r| !r.seen.path.starts_with("/opt/app/"))
        .all(|r| r.approved_group.is_none()));
    let audit = store.audit_rows(head, 100).unwrap();
    let approve: Vec<_> = audit.iter().filter(|r| r.kind == "learn.approve").collect();
    assert_eq!(approve.len(), 1, "{audit:?}");
    assert_eq!(approve[0].actor, "admin:alice");
    let d: serde_json::Value = serde_json::from_str(&approve[0].detail).unwrap();
    assert_eq!(d["group"], "system");
    assert_eq!(d["count"], 2);
    assert_eq!(d["filter"]["path_prefix"], "/opt/app");
    assert_eq!(d["programs"][1][1], "/opt/app/run");
    assert!(store.verify_audit().unwrap().is_ok());

    // Nothing left to approve there; a second approval writes nothing.
    let head = store.audit_head().unwrap();
    let again = store
        .approve_observed(&f, &[], "system", "admin:alice", false)
        .unwrap();
    assert!(again.programs.is_empty());
    assert_eq!(store.audit_head().unwrap(), head);

    // Enforce: the approved programs run, another unknown one does not.
    store
        .set_host_group("staging", Mode::Enforce, "admin:alice")
        .unwrap();
    let r = qualify(
        &mut stage,
        vec![
            run(5, APP, "bob", "/opt/app/run", ""),
            run(6, TOOL, "bob", "/opt/app/bin/tool", ""),
            run(7, [0x44; 32], "bob", "/opt/apple/x", ""),
        ],
    )
    .await;
    assert_eq!(r[0].verdict(), pb::Verdict::Allow);
    assert_eq!(r[1].verdict(), pb::Verdict::Allow);
    assert_eq!(r[2].verdict(), pb::Verdict::Deny);

    // Interactive approval's `only`: just those programs of the selection.
    let only = [hex(&[0x55; 32])];
    let one = store
        .approve_observed(
            &ObservedFilter::default(),
            &only,
            "app",
            "admin:alice",
            false,
        )
        .unwrap();
    assert_eq!(one.programs.len(), 1);
    assert_eq!(one.programs[0].path, "/usr/bin/id");
}

fn obs(host: &str, n: u32) -> Observation {
    Observation {
        host: host.into(),
        sha256: format!("{n:064x}"),
        sha1: None,
        size: 1,
        path: format!("/opt/p{n}"),
        package: None,
        users: BTreeSet::from(["bob".to_owned()]),
        users_more: false,
        first_ms: 1,
        last_ms: 2,
        count: 1,
        verdict: Seen::WouldDeny,
        mode: Mode::Permissive,
    }
}

#[test]
fn the_table_is_bounded_per_host_and_in_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("a.db")).unwrap();
    let per_host = u32::try_from(PER_HOST).unwrap();
    // One host: PER_HOST rows kept, the rest left out and counted.
    let batch: Vec<_> = (0..per_host + 10).map(|n| obs("h0", n)).collect();
    let w = store.record_observed(&batch).unwrap();
    assert_eq!((w.inserted, w.left_out), (u64::from(per_host), 10));
    // Known rows go on being updated at the cap; new ones are left out.
    let w = store
        .record_observed(&[obs("h0", 0), obs("h0", per_host + 20)])
        .unwrap();
    assert_eq!((w.updated, w.left_out), (1, 1));
    let hosts = store.observed_hosts().unwrap();
    assert_eq!((hosts[0].programs, hosts[0].left_out), (PER_HOST, 11));
    // Many hosts: TOTAL rows in all.
    let hosts_needed = u32::try_from(TOTAL / PER_HOST + 1).unwrap();
    for h in 1..=hosts_needed {
        let batch: Vec<_> = (0..per_host).map(|n| obs(&format!("h{h}"), n)).collect();
        store.record_observed(&batch).unwrap();
    }
    let total: i64 = store
        .observed_hosts()
        .unwrap()
        .iter()
        .map(|h| h.programs)
        .sum();
    assert_eq!(total, TOTAL);
    let left: i64 = store
        .observed_hosts()
        .unwrap()
        .iter()
        .map(|h| h.left_out)
        .sum();
    assert_eq!(left, 11 + i64::from(hosts_needed + 1) * PER_HOST - TOTAL);
    // Forgetting a host's rows makes room and clears its left-out count.
    let gone = store
        .forget_observed(
            &ObservedFilter {
                host: Some("h0".into()),
                state: ObservedState::All,
                ..ObservedFilter::default()
            },
            "admin:alice",
        )
        .unwrap();
    assert_eq!(gone, u64::try_from(PER_HOST).unwrap());
    assert!(!store
        .observed_hosts()
        .unwrap()
        .iter()
        .any(|h| h.host == "h0"));
    let w = store.record_observed(&[obs("new", 1)]).unwrap();
    assert_eq!(w.inserted, 1);
    let last = store.audit_rows(0, 10).unwrap();
    assert_eq!(last.last().unwrap().kind, "learn.forget");
    // Long paths are cut; users past the bound are noted, not kept.
    let mut long = obs("new", 2);
    long.path = format!("/{}", "é".repeat(400));
    long.users = (0..12)
        .map(|i| format!("u{i}{}", "x".repeat(100)))
        .collect();
    store.record_observed(&[long]).unwrap();
    let f = ObservedFilter {
        host: Some("new".into()),
        state: ObservedState::All,
        ..ObservedFilter::default()
    };
    let rows = store.observed(&f, 0, 10).unwrap();
    let row = rows
        .iter()
        .find(|r| r.seen.sha256 == format!("{:064x}", 2))
        .unwrap();
    assert!(row.seen.path.len() <= PATH_MAX && row.seen.path.starts_with("/é"));
    assert_eq!(row.seen.users.len(), 8);
    assert!(
        row.seen.users.iter().all(|u| u.len() == 64),
        "{:?}",
        row.seen.users
    );
    assert!(row.seen.users_more);
}
